//! `signet-ca serve --check-config`: everything `serve` would refuse at start, found
//! without binding a port or contacting anything. The flags are validated first
//! (`ServeArgs::validate`); then the key material is loaded and checked as `serve`
//! loads it, every kubeconfig is read and a client made from it, and every JWKS file
//! is read and parsed.

use time::OffsetDateTime;

use crate::{
    cli::config::ServeConfig,
    issue::authn::{JwksError, JwtConfig, KubeClientError, check_jwks},
    keys::{
        cacerts::{self, CaCertsError},
        reload::ReloadError,
        signer::{SignError, Signer},
    },
    kubernetes::client::{ApiAccess, Retries, client},
};

/// What `serve` would fail on.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    CaCerts(#[from] CaCertsError),
    #[error(transparent)]
    Signer(#[from] SignError),
    /// `--require-cacerts` and no key material in the directory.
    #[error(transparent)]
    Keys(#[from] ReloadError),
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: KubeClientError,
    },
    #[error("{what}: {source}")]
    Jwks {
        what: String,
        #[source]
        source: JwksError,
    },
}

/// Checks `config`; on success, one line per thing checked.
pub async fn check(config: &ServeConfig, now: OffsetDateTime) -> Result<Vec<String>, CheckError> {
    let mut seen = Vec::new();
    let keys = &config.keys;
    match cacerts::load_dir(&keys.cacerts_dir)? {
        Some(material) => {
            let signer = Signer::new(material, now)?;
            seen.push(format!(
                "key material: {} ({}), signing certificate valid until {}",
                signer.source(),
                signer.key_kind(),
                signet_telemetry::rfc3339(signer.signing_not_after())
            ));
        }
        None if keys.require_cacerts => {
            return Err(ReloadError::NoCaCerts(keys.cacerts_dir.display().to_string()).into());
        }
        None => seen.push(format!(
            "key material: none in {}; a self-signed root in {} (created at start if absent)",
            keys.cacerts_dir.display(),
            keys.state_dir.display()
        )),
    }
    if let Some(access) = &config.api_access {
        kube_client("the local cluster", access).await?;
        seen.push(format!("Kubernetes API access: {}", describe(access)));
    }
    let authn = &config.authn;
    if let Some(jwt) = &authn.jwt {
        seen.push(jwks(&format!("cluster {}", authn.cluster_id), jwt).await?);
    }
    for (id, remote) in &authn.remotes {
        if let Some(path) = &remote.kubeconfig {
            let access = ApiAccess::Kubeconfig(path.clone());
            kube_client(&format!("--remote-cluster {id}"), &access).await?;
            seen.push(format!(
                "cluster {id}: TokenReview via {}",
                describe(&access)
            ));
        }
        if let Some(jwt) = &remote.jwt {
            seen.push(jwks(&format!("--remote-jwks {id}"), jwt).await?);
        }
    }
    Ok(seen)
}

async fn kube_client(what: &str, access: &ApiAccess) -> Result<(), CheckError> {
    client(access, Retries::Never)
        .await
        .map(drop)
        .map_err(|source| CheckError::Kube {
            what: what.to_owned(),
            source,
        })
}

async fn jwks(what: &str, jwt: &JwtConfig) -> Result<String, CheckError> {
    let found = check_jwks(jwt.source.clone())
        .await
        .map_err(|source| CheckError::Jwks {
            what: what.to_owned(),
            source,
        })?;
    Ok(format!("{what}: {found}"))
}

fn describe(access: &ApiAccess) -> String {
    match access {
        ApiAccess::InCluster => "in-cluster (the pod's service account)".into(),
        ApiAccess::Kubeconfig(path) => format!("kubeconfig {}", path.display()),
    }
}
