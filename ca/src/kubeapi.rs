//! Access to a Kubernetes API server: a `kube` client from a kubeconfig file, or the
//! pod's in-cluster configuration (service-account token and cluster CA).

use std::path::Path;

/// A client from `kubeconfig`, or the in-cluster configuration when `None`.
pub(crate) async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::incluster()
            .map_err(|e| format!("in-cluster Kubernetes configuration: {e}"))?,
    };
    kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}
