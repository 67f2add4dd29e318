//! Access to a Kubernetes API server: a `kube` client from a kubeconfig file, or the
//! pod's in-cluster configuration (service-account token and cluster CA).

use std::path::PathBuf;

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    /// The kubeconfig file is unreadable or not a kubeconfig.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Not in a pod, or the pod's service-account files are missing.
    #[error("in-cluster Kubernetes configuration: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    /// The configuration was read but no client could be built from it.
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Whether the client retries 429, 503 and 504 answers by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retries {
    /// kube's default: up to 15 times, backing off from 5 ms (or as `Retry-After`
    /// says). Right for watches and writes, which nobody waits on.
    Kube,
    /// Never: for calls a caller is waiting on (TokenReview). An overloaded API
    /// server's 429 becomes UNAVAILABLE at once and the caller backs off, instead of
    /// its request (and one of the bounded review slots) hanging in kube's backoff.
    Never,
}

/// How signet-ca reaches a Kubernetes API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAccess {
    /// The pod's service account and the cluster's CA.
    InCluster,
    /// A kubeconfig file.
    Kubeconfig(PathBuf),
}

/// A client by `access`.
pub(crate) async fn client(
    access: &ApiAccess,
    retries: Retries,
) -> Result<kube::Client, KubeClientError> {
    let mut config = match access {
        ApiAccess::Kubeconfig(path) => {
            let kubeconfig_error = |source| KubeClientError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let file = kube::config::Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(kubeconfig_error)?
        }
        ApiAccess::InCluster => kube::Config::incluster().map_err(KubeClientError::InCluster)?,
    };
    config.default_retry = retries == Retries::Kube;
    kube::Client::try_from(config).map_err(KubeClientError::Client)
}
