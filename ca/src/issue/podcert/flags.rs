//! The pod certificate signer's flags (part of `signet-ca serve`): its signer name
//! and which namespaces or service accounts it serves.

use time::Duration;

use crate::issue::policy::{MIN_POD_LIFETIME, PodRules, Scope};

/// Flags of the pod certificate signer (part of `signet-ca serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct PodCertArgs {
    /// Answer Kubernetes PodCertificateRequests for this signer name
    /// (`<domain>/<path>`, e.g. `signet.example.com/spiffe`) with the pod's SPIFFE
    /// identity; its root is published as a ClusterTrustBundle of the same name.
    #[arg(long, env = "POD_CERTIFICATE_SIGNER", value_name = "SIGNER")]
    pub pod_certificate_signer: Option<String>,

    /// Issue pod certificates only to this namespace or `<namespace>/<service
    /// account>` (repeatable; default: all).
    #[arg(long = "pod-certificate-allow", value_name = "NS[/SA]", value_parser = scope)]
    pub pod_certificate_allow: Vec<Scope>,

    /// Deny pod certificates to this namespace or `<namespace>/<service account>`
    /// (repeatable; wins over --pod-certificate-allow).
    #[arg(long = "pod-certificate-deny", value_name = "NS[/SA]", value_parser = scope)]
    pub pod_certificate_deny: Vec<Scope>,
}

/// A scope flag's value that is not `NAMESPACE` or `NAMESPACE/SA`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: want NAMESPACE or NAMESPACE/SA")]
pub struct ScopeError(String);

fn scope(spec: &str) -> Result<Scope, ScopeError> {
    let (ns, sa) = match spec.split_once('/') {
        Some((ns, sa)) => (ns, Some(sa)),
        None => (spec, None),
    };
    let ok = crate::flags::is_object_name(ns)
        && !ns.contains('.')
        && sa.is_none_or(|sa| signet_spiffe::ServiceAccount::new(ns, sa).is_ok());
    ok.then(|| Scope {
        namespace: ns.to_owned(),
        service_account: sa.map(str::to_owned),
    })
    .ok_or_else(|| ScopeError(spec.to_owned()))
}

impl PodCertArgs {
    /// The signer's settings, `None` when it is off; `max_ttl` is `--max-ttl`, which
    /// must allow Kubernetes' one-hour minimum.
    pub fn validate(
        self,
        max_ttl: Duration,
    ) -> Result<Option<PodCertificates>, crate::flags::ConfigError> {
        // Parsed here rather than by clap: an empty POD_CERTIFICATE_SIGNER means off.
        let signer = crate::flags::parse_set(
            "--pod-certificate-signer",
            &self.pod_certificate_signer,
            crate::kubernetes::writers::check_signer_name,
        )?;
        let Some(signer) = signer else {
            if !self.pod_certificate_allow.is_empty() || !self.pod_certificate_deny.is_empty() {
                return Err(crate::flags::ConfigError::new(
                    "--pod-certificate-allow/--pod-certificate-deny",
                    "need --pod-certificate-signer",
                ));
            }
            return Ok(None);
        };
        if max_ttl < MIN_POD_LIFETIME {
            return Err(crate::flags::ConfigError::new(
                "--max-ttl",
                format!(
                    "{max_ttl} is under an hour, the shortest pod certificate Kubernetes accepts"
                ),
            ));
        }
        Ok(Some(PodCertificates {
            signer,
            rules: PodRules {
                allow: self.pod_certificate_allow,
                deny: self.pod_certificate_deny,
            },
        }))
    }
}

/// The pod certificate signer's settings.
#[derive(Debug, Clone)]
pub struct PodCertificates {
    /// The signer name requests name.
    pub signer: String,
    /// Which pods are served.
    pub rules: PodRules,
}
