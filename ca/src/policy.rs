//! What a request gets, decided before anything is queued: the identity the
//! certificate names, its lifetime, whether the caller may act for someone else, and
//! whether the SANs the CSR asks for are the caller's own. The signer signs what
//! policy decided and nothing else.

use std::collections::BTreeMap;

use spiffe::SpiffeId;
use time::Duration;

use signet_spiffe::{IdentityError, ServiceAccount, TrustDomains};

use crate::{
    authn::{Caller, Method},
    csr::ParsedCsr,
    pods::PodCache,
};

/// Why policy refused a request.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The CSR names someone else: `PERMISSION_DENIED`.
    #[error("the CSR asks for {claimed:?}, but the caller is authenticated as {caller}")]
    ForeignSan {
        claimed: Vec<String>,
        caller: String,
    },
    /// The caller asked to act for another identity: `PERMISSION_DENIED`.
    #[error(
        "{caller} asked to act for {target:?}, but node impersonation is not enabled on this CA (--trusted-node-accounts)"
    )]
    Impersonation { caller: String, target: String },
    /// The caller may not act for this identity (Istio's wording): `PERMISSION_DENIED`.
    #[error("{caller} is not allowed to impersonate {target:?}: {reason}")]
    ImpersonationRefused {
        caller: String,
        target: String,
        reason: String,
    },
    /// `ImpersonatedIdentity` is not a SPIFFE ID of our trust domain for a service
    /// account: `INVALID_ARGUMENT`.
    #[error("ImpersonatedIdentity {target:?}: {reason}")]
    BadTarget { target: String, reason: String },
    /// The pods of the caller's cluster are not known yet: `UNAVAILABLE`.
    #[error("the pod cache of cluster {0:?} is not synced yet; node impersonation is unavailable")]
    PodsNotSynced(String),
    /// The caller's service account cannot be written as a SPIFFE ID in our trust
    /// domain (too long): `FAILED_PRECONDITION`.
    #[error("the caller cannot be given a SPIFFE ID: {0}")]
    Identity(#[source] IdentityError),
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The identity the certificate names.
    pub id: SpiffeId,
    /// How long it lives (the signer may shorten it to the chain's NotAfter).
    pub lifetime: Duration,
    /// For node impersonation: the caller's node.
    pub node: Option<String>,
}

/// Who may ask for the identities of the pods on their node (ztunnel), and the pods
/// of each cluster by cluster id.
#[derive(Debug, Clone, Default)]
pub struct NodeImpersonation {
    /// `--trusted-node-accounts`.
    pub trusted: Vec<ServiceAccount>,
    /// Pod caches by cluster id (the local cluster under its id and aliases).
    pub pods: BTreeMap<String, PodCache>,
}

/// Identity, lifetime and SAN rules.
#[derive(Debug, Clone)]
pub struct Policy {
    trust_domains: TrustDomains,
    default_ttl: Duration,
    max_ttl: Duration,
    impersonation: Option<NodeImpersonation>,
}

impl Policy {
    /// Certificates in `trust_domains.primary()`, living `default_ttl` unless asked
    /// otherwise, never longer than `max_ttl`.
    pub fn new(trust_domains: TrustDomains, default_ttl: Duration, max_ttl: Duration) -> Self {
        Self {
            trust_domains,
            default_ttl,
            max_ttl,
            impersonation: None,
        }
    }

    /// Lets the trusted node accounts act for the pods on their node.
    pub fn with_impersonation(mut self, impersonation: NodeImpersonation) -> Self {
        self.impersonation = Some(impersonation);
        self
    }

    /// Our trust domain and its aliases.
    pub fn trust_domains(&self) -> &TrustDomains {
        &self.trust_domains
    }

    /// Decides a request of `caller` asking for `requested_secs` (0 or less: the
    /// default), optionally to act for `impersonate`, with `csr`.
    pub fn decide(
        &self,
        caller: &Caller,
        requested_secs: i64,
        impersonate: Option<&str>,
        csr: &ParsedCsr,
    ) -> Result<Decision, PolicyError> {
        let (id, node) = match impersonate {
            Some(target) => {
                let (id, node) = self.impersonate(caller, target)?;
                (id, Some(node))
            }
            None => (
                caller
                    .account
                    .spiffe_id(self.trust_domains.primary())
                    .map_err(PolicyError::Identity)?,
                None,
            ),
        };
        let foreign = self.foreign_sans(&id, &csr.uri_sans);
        if !foreign.is_empty() {
            return Err(PolicyError::ForeignSan {
                claimed: foreign,
                caller: id.to_string(),
            });
        }
        Ok(Decision {
            id,
            lifetime: lifetime(requested_secs, self.default_ttl, self.max_ttl),
            node,
        })
    }

    /// Istio's rules for node impersonation: a trusted node account, authenticated
    /// by a token bound to its pod, whose pod (same UID and service account) runs on
    /// a node where some pod of the target identity is scheduled. Returns the
    /// target's SPIFFE ID exactly as asked (our trust domain or an alias: ztunnel
    /// refuses a certificate that names anything else) and the node.
    fn impersonate(
        &self,
        caller: &Caller,
        target: &str,
    ) -> Result<(SpiffeId, String), PolicyError> {
        let Some(imp) = &self.impersonation else {
            return Err(PolicyError::Impersonation {
                caller: caller.account.to_string(),
                target: target.to_owned(),
            });
        };
        let refuse = |reason: String| PolicyError::ImpersonationRefused {
            caller: caller.account.to_string(),
            target: target.to_owned(),
            reason,
        };
        let bad = |reason: &str| PolicyError::BadTarget {
            target: target.to_owned(),
            reason: reason.to_owned(),
        };
        if caller.method == Method::ClientCert {
            return Err(refuse(
                "impersonation needs a service-account token, not a client certificate".into(),
            ));
        }
        if !imp.trusted.contains(&caller.account) {
            return Err(refuse(
                "the caller is not in --trusted-node-accounts".into(),
            ));
        }
        let requested = SpiffeId::new(target).map_err(|e| bad(&format!("not a SPIFFE ID: {e}")))?;
        if !self.trust_domains.contains(requested.trust_domain_name()) {
            return Err(bad("not in this CA's trust domain"));
        }
        let account = ServiceAccount::from_spiffe_id(&requested)
            .ok_or_else(|| bad("the path is not /ns/<namespace>/sa/<service account>"))?;
        // Issued exactly as asked (an alias trust domain included): ztunnel refuses a
        // certificate that names anything else.
        let id = requested;
        let pods = imp
            .pods
            .get(&caller.cluster)
            .ok_or_else(|| refuse(format!("no pod watch for cluster {:?}", caller.cluster)))?;
        if !pods.synced() {
            return Err(PolicyError::PodsNotSynced(caller.cluster.clone()));
        }
        let pod_ref = caller
            .pod
            .as_ref()
            .ok_or_else(|| refuse("the caller's token is not bound to a pod".into()))?;
        let ns = caller.account.namespace();
        let pod = pods.pod(ns, &pod_ref.name).ok_or_else(|| {
            refuse(format!(
                "the caller's pod {ns}/{} is not known",
                pod_ref.name
            ))
        })?;
        if pod_ref.uid.as_deref() != Some(&*pod.uid) {
            return Err(refuse(format!(
                "the caller's pod {ns}/{} has UID {}, the token names {}",
                pod_ref.name,
                pod.uid,
                pod_ref.uid.as_deref().unwrap_or("no UID")
            )));
        }
        if &*pod.service_account != caller.account.name() {
            return Err(refuse(format!(
                "the caller's pod {ns}/{} runs as service account {}",
                pod_ref.name, pod.service_account
            )));
        }
        if pod.node.is_empty() {
            return Err(refuse(format!(
                "the caller's pod {ns}/{} is not scheduled",
                pod_ref.name
            )));
        }
        if !pods.has_pod_on(&pod.node, account.namespace(), account.name()) {
            return Err(refuse(format!(
                "no pod of {account} is scheduled to the caller's node {}",
                pod.node
            )));
        }
        Ok((id, pod.node.to_string()))
    }

    /// URI SANs that are not `id` (nor its path in an alias trust domain).
    fn foreign_sans(&self, id: &SpiffeId, sans: &[String]) -> Vec<String> {
        sans.iter()
            .filter(|san| {
                let Ok(claimed) = SpiffeId::new(san.as_str()) else {
                    return true;
                };
                !(claimed.path() == id.path()
                    && self.trust_domains.contains(claimed.trust_domain_name()))
            })
            .cloned()
            .collect()
    }
}

/// The lifetime to issue: the requested seconds, or `default` when zero or negative,
/// clamped to `max`.
pub fn lifetime(requested_secs: i64, default: Duration, max: Duration) -> Duration {
    let requested = if requested_secs <= 0 {
        default
    } else {
        Duration::seconds(requested_secs)
    };
    requested.min(max)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::authn::Method;
    use signet_spiffe::ServiceAccount;

    fn policy() -> Policy {
        let td = |n: &str| signet_spiffe::trust_domain(n).unwrap();
        Policy::new(
            TrustDomains::new(td("cluster.local"), vec![td("old.example")]),
            Duration::hours(24),
            Duration::days(90),
        )
    }

    fn caller() -> Caller {
        Caller {
            account: ServiceAccount::new("shop", "cart").unwrap(),
            method: Method::Jwt,
            cluster: "Kubernetes".into(),
            pod: None,
        }
    }

    fn csr(uri: Option<&str>) -> ParsedCsr {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        if let Some(uri) = uri {
            params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        }
        crate::csr::parse(&params.serialize_request(&key).unwrap().pem().unwrap()).unwrap()
    }

    #[test]
    fn identity_and_lifetime() {
        let d = policy().decide(&caller(), 0, None, &csr(None)).unwrap();
        assert_eq!(d.id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(d.lifetime, Duration::hours(24));
        let d = policy().decide(&caller(), 3, None, &csr(None)).unwrap();
        assert_eq!(d.lifetime, Duration::seconds(3));
        let d = policy()
            .decide(&caller(), 100 * 365 * 86_400, None, &csr(None))
            .unwrap();
        assert_eq!(d.lifetime, Duration::days(90));
        assert_eq!(
            lifetime(-5, Duration::hours(1), Duration::hours(2)),
            Duration::hours(1)
        );
    }

    #[test]
    fn sans_must_name_the_caller() {
        let p = policy();
        for ok in [
            "spiffe://cluster.local/ns/shop/sa/cart",
            "spiffe://old.example/ns/shop/sa/cart",
        ] {
            assert!(p.decide(&caller(), 0, None, &csr(Some(ok))).is_ok(), "{ok}");
        }
        for bad in [
            "spiffe://cluster.local/ns/shop/sa/admin",
            "spiffe://evil.example/ns/shop/sa/cart",
            "https://example.com/",
        ] {
            assert!(
                matches!(
                    p.decide(&caller(), 0, None, &csr(Some(bad))),
                    Err(PolicyError::ForeignSan { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn impersonation_needs_a_trusted_token_caller_and_a_synced_cache() {
        let ztunnel = ServiceAccount::new("istio-system", "ztunnel").unwrap();
        let p = policy().with_impersonation(NodeImpersonation {
            trusted: vec![ztunnel.clone()],
            pods: [("Kubernetes".to_owned(), PodCache::default())].into(),
        });
        let target = "spiffe://cluster.local/ns/apps/sa/web";
        let mut caller = Caller {
            account: ztunnel,
            method: Method::ClientCert,
            ..caller()
        };
        let e = p.decide(&caller, 0, Some(target), &csr(None)).unwrap_err();
        assert!(e.to_string().contains("client certificate"), "{e}");
        caller.method = Method::Jwt;
        let e = p.decide(&caller, 0, Some(target), &csr(None)).unwrap_err();
        assert!(matches!(e, PolicyError::PodsNotSynced(_)), "{e}");
        let e = p
            .decide(&caller, 0, Some("spiffe://cluster.local/x"), &csr(None))
            .unwrap_err();
        assert!(matches!(e, PolicyError::BadTarget { .. }), "{e}");
        let e = p
            .decide(&self::caller(), 0, Some(target), &csr(None))
            .unwrap_err();
        assert!(e.to_string().contains("--trusted-node-accounts"), "{e}");
    }

    #[test]
    fn impersonation_is_refused_naming_both() {
        let e = policy()
            .decide(
                &caller(),
                0,
                Some("spiffe://cluster.local/ns/x/sa/y"),
                &csr(None),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("shop/cart") && e.contains("ns/x/sa/y"), "{e}");
    }
}
