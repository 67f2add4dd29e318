//! What a request gets, decided before anything is queued: the identity the
//! certificate names, its validity window, whether the caller may act for someone
//! else, whether the SANs the CSR asks for are the caller's own, and whose share of
//! the signing queue it takes. Both entry points ask here: a CreateCertificate call
//! ([`Request::Istio`]) and a Kubernetes PodCertificateRequest ([`Request::Pod`]).
//! The signer signs what policy decided and nothing else.

use std::collections::BTreeMap;

use spiffe::SpiffeId;
use time::{Duration, OffsetDateTime};

use signet_spiffe::{IdentityError, ServiceAccount, TrustDomains};

mod flags;
mod pods;
mod subject;

pub use crate::keys::signer::{MAX_BACKDATE, Validity};
use crate::{
    issue::authn::{Caller, Method},
    issue::csr::ParsedCsr,
    keys::signer,
    kubernetes::pods::PodCache,
};
pub use flags::{PolicyArgs, PolicyConfig};
pub use pods::{MIN_POD_LIFETIME, POD_KEY_TYPES, PodRequest, PodRules, Scope};
pub use subject::{CnError, MAX_CN_LEN, SubjectCn};

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
    #[error("the service account cannot be given a SPIFFE ID: {0}")]
    Identity(#[source] IdentityError),
    /// The signing chain leaves no time for a certificate (expired, or expiring
    /// now): `INTERNAL`, Istio's `CA_NOT_READY`.
    #[error("the CA's signing certificate is not valid at this time (valid until {0})")]
    ChainExpired(OffsetDateTime),
    /// A pod certificate request carries `unverifiedUserAnnotations` Signet does not
    /// know (all of them: it knows none).
    #[error("Signet recognises no userAnnotations; unknown: {0}")]
    UnknownAnnotations(String),
    /// `--pod-certificate-allow` / `--pod-certificate-deny` exclude the pod's account.
    #[error("pod certificates are not issued to {namespace}/{service_account} by policy")]
    PodNotAllowed {
        namespace: String,
        service_account: String,
    },
    /// The pod's key is not one of the API's key types Signet signs.
    #[error("{0}; Signet signs {POD_KEY_TYPES}")]
    PodKeyType(String),
    /// What the chain leaves, or what the request allows, is under the API's
    /// one-hour minimum.
    #[error(
        "the signing certificate leaves {left} and requests allow {allowed}: under the one-hour minimum"
    )]
    PodLifetime { left: Duration, allowed: Duration },
}

/// What one request asks for, from either entry point.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// `CreateCertificate`: the authenticated caller, the requested seconds (0 or
    /// less: the default), the identity it would act for, and its CSR.
    Istio {
        caller: &'a Caller,
        requested_secs: i64,
        impersonate: Option<&'a str>,
        csr: &'a ParsedCsr,
    },
    /// A PodCertificateRequest whose pod and service account have been checked.
    Pod(&'a PodRequest),
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The identity the certificate names.
    pub id: SpiffeId,
    /// When it is valid, computed once here: the signer signs exactly this.
    pub validity: Validity,
    /// For node impersonation: the caller's node.
    pub node: Option<String>,
    /// Whose share of the signing queue the request takes: the service account, or
    /// for a node agent acting for its node's pods, the account on that node.
    pub share: String,
    /// The Subject common name, where `--subject-cn-template` applies.
    pub subject_cn: Option<String>,
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
    pods: PodRules,
    subject_cn: Option<SubjectCn>,
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
            pods: PodRules::default(),
            subject_cn: None,
        }
    }

    /// Gives certificates in the chosen namespaces a Subject CN.
    pub fn with_subject_cn(mut self, subject_cn: SubjectCn) -> Self {
        self.subject_cn = Some(subject_cn);
        self
    }

    /// The Subject CN for a certificate naming `id`, if the profile applies; a name
    /// too long for X.509 is left out with a warning, the certificate still issued.
    pub(crate) fn subject_cn(&self, id: &SpiffeId) -> Option<String> {
        match self.subject_cn.as_ref()?.render(id)? {
            Ok(cn) => Some(cn),
            Err(e) => {
                tracing::warn!(spiffe_id = %id, error = %e, "--subject-cn-template");
                None
            }
        }
    }

    /// Which pods get pod certificates (all, unless told otherwise).
    pub fn with_pods(mut self, pods: PodRules) -> Self {
        self.pods = pods;
        self
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

    /// Decides `request`, to be signed by a chain that allows no leaf past `limit`.
    pub fn decide(
        &self,
        request: Request<'_>,
        limit: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Decision, PolicyError> {
        match request {
            Request::Istio {
                caller,
                requested_secs,
                impersonate,
                csr,
            } => self.decide_istio(caller, requested_secs, impersonate, csr, limit, now),
            Request::Pod(pod) => self.decide_pod(pod, limit, now),
        }
    }

    fn decide_istio(
        &self,
        caller: &Caller,
        requested_secs: i64,
        impersonate: Option<&str>,
        csr: &ParsedCsr,
        limit: OffsetDateTime,
        now: OffsetDateTime,
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
        let lifetime = lifetime(requested_secs, self.default_ttl, self.max_ttl);
        // Fair shares per caller; a node agent acting for its node's pods gets one
        // share per node, not one for the whole mesh.
        let share = match &node {
            Some(node) => format!("{}@{node}", caller.account),
            None => caller.account.to_string(),
        };
        Ok(Decision {
            subject_cn: self.subject_cn(&id),
            id,
            validity: validity(now, lifetime, limit)?,
            node,
            share,
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

/// [`signer::validity`], refused when the chain leaves no time.
pub fn validity(
    now: OffsetDateTime,
    lifetime: Duration,
    limit: OffsetDateTime,
) -> Result<Validity, PolicyError> {
    signer::validity(now, lifetime, limit).ok_or(PolicyError::ChainExpired(limit))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::issue::authn::Method;
    use crate::keys::KeyKind;
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

    const NOW: i64 = 1_800_000_000;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(NOW).unwrap()
    }

    /// A CreateCertificate request decided under a chain valid ten years.
    fn istio(
        p: &Policy,
        caller: &Caller,
        requested_secs: i64,
        impersonate: Option<&str>,
        csr: &ParsedCsr,
    ) -> Result<Decision, PolicyError> {
        let request = Request::Istio {
            caller,
            requested_secs,
            impersonate,
            csr,
        };
        p.decide(request, now() + Duration::days(3650), now())
    }

    fn csr(uri: Option<&str>) -> ParsedCsr {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        if let Some(uri) = uri {
            params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        }
        crate::issue::csr::parse(&params.serialize_request(&key).unwrap().pem().unwrap()).unwrap()
    }

    #[test]
    fn identity_and_lifetime() {
        let p = policy();
        let d = istio(&p, &caller(), 0, None, &csr(None)).unwrap();
        assert_eq!(d.id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(d.validity.not_after - now(), Duration::hours(24));
        assert_eq!(d.share, "shop/cart");
        let d = istio(&p, &caller(), 3, None, &csr(None)).unwrap();
        assert_eq!(d.validity.not_after - now(), Duration::seconds(3));
        let d = istio(&p, &caller(), 100 * 365 * 86_400, None, &csr(None)).unwrap();
        assert_eq!(d.validity.not_after - now(), Duration::days(90));
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
            assert!(
                istio(&p, &caller(), 0, None, &csr(Some(ok))).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "spiffe://cluster.local/ns/shop/sa/admin",
            "spiffe://evil.example/ns/shop/sa/cart",
            "https://example.com/",
        ] {
            assert!(
                matches!(
                    istio(&p, &caller(), 0, None, &csr(Some(bad))),
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
        let e = istio(&p, &caller, 0, Some(target), &csr(None)).unwrap_err();
        assert!(e.to_string().contains("client certificate"), "{e}");
        caller.method = Method::Jwt;
        let e = istio(&p, &caller, 0, Some(target), &csr(None)).unwrap_err();
        assert!(matches!(e, PolicyError::PodsNotSynced(_)), "{e}");
        let e = istio(&p, &caller, 0, Some("spiffe://cluster.local/x"), &csr(None)).unwrap_err();
        assert!(matches!(e, PolicyError::BadTarget { .. }), "{e}");
        let e = istio(&p, &self::caller(), 0, Some(target), &csr(None)).unwrap_err();
        assert!(e.to_string().contains("--trusted-node-accounts"), "{e}");
    }

    #[test]
    fn impersonation_is_refused_naming_both() {
        let e = istio(
            &policy(),
            &caller(),
            0,
            Some("spiffe://cluster.local/ns/x/sa/y"),
            &csr(None),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("shop/cart") && e.contains("ns/x/sa/y"), "{e}");
    }

    #[test]
    fn backdate_is_a_small_fraction() {
        let now = now();
        let far = now + Duration::days(3650);
        let v = validity(now, Duration::seconds(60), far).unwrap();
        assert_eq!(now - v.not_before, Duration::seconds(6));
        assert_eq!(v.not_after - now, Duration::seconds(60));
        let v = validity(now, Duration::hours(24), far).unwrap();
        assert_eq!(now - v.not_before, MAX_BACKDATE);
        // Clamped to the chain, and refused when nothing is left.
        let soon = now + Duration::hours(1);
        let v = validity(now, Duration::hours(24), soon).unwrap();
        assert_eq!(v.not_after, soon);
        assert!(matches!(
            validity(now, Duration::hours(1), now - Duration::seconds(1)),
            Err(PolicyError::ChainExpired(_))
        ));
    }

    fn pod(key: KeyKind, max: Option<i64>) -> PodRequest {
        PodRequest {
            namespace: "apps".into(),
            service_account: "web".into(),
            key,
            max_expiration: max.map(Duration::seconds),
            annotations: vec![],
        }
    }

    fn decide_pod(p: &Policy, pod: &PodRequest, left: Duration) -> Result<Decision, PolicyError> {
        p.decide(Request::Pod(pod), now() + left, now())
    }

    #[test]
    fn a_pod_certificate_window_is_what_the_request_allows_backdating_included() {
        let p = policy();
        let far = Duration::days(3650);
        let d = decide_pod(&p, &pod(KeyKind::P256, None), far).unwrap();
        assert_eq!(d.id.to_string(), "spiffe://cluster.local/ns/apps/sa/web");
        assert_eq!(d.share, "apps/web");
        let v = d.validity;
        assert_eq!(v.not_after - v.not_before, Duration::hours(24));
        assert_eq!(now() - v.not_before, MAX_BACKDATE);
        let d = decide_pod(&p, &pod(KeyKind::Rsa(4096), Some(3600)), far).unwrap();
        assert_eq!(
            d.validity.not_after - d.validity.not_before,
            Duration::hours(1)
        );
        // --max-ttl bounds it (90 days here), and so does the chain.
        let d = decide_pod(&p, &pod(KeyKind::P384, Some(400 * 86_400)), far).unwrap();
        assert_eq!(
            d.validity.not_after - d.validity.not_before,
            Duration::days(90)
        );
        let d = decide_pod(&p, &pod(KeyKind::P256, None), Duration::hours(5)).unwrap();
        assert_eq!(
            d.validity.not_after,
            now() + Duration::hours(5) - MAX_BACKDATE
        );
        for (max, left) in [(Some(3599), far), (None, Duration::minutes(59))] {
            let e = decide_pod(&p, &pod(KeyKind::P256, max), left).unwrap_err();
            assert!(matches!(e, PolicyError::PodLifetime { .. }), "{e}");
        }
    }

    #[test]
    fn pod_rules_refuse_keys_scopes_and_annotations() {
        let far = Duration::days(3650);
        let e = decide_pod(&policy(), &pod(KeyKind::Rsa(2048), None), far).unwrap_err();
        assert!(matches!(e, PolicyError::PodKeyType(_)), "{e}");
        assert!(e.to_string().contains("RSA-2048") && e.to_string().contains("ECDSAP256"));
        let mut annotated = pod(KeyKind::P256, None);
        annotated.annotations = (0..12).map(|n| format!("example.com/a{n:02}")).collect();
        let e = decide_pod(&policy(), &annotated, far)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("example.com/a00") && e.contains("and 2 more"),
            "{e}"
        );
        let scope = |ns: &str, sa: Option<&str>| Scope {
            namespace: ns.into(),
            service_account: sa.map(Into::into),
        };
        for (rules, ok) in [
            (PodRules::default(), true),
            (
                PodRules {
                    allow: vec![scope("apps", None)],
                    deny: vec![],
                },
                true,
            ),
            (
                PodRules {
                    allow: vec![scope("apps", Some("db"))],
                    deny: vec![],
                },
                false,
            ),
            (
                PodRules {
                    allow: vec![],
                    deny: vec![scope("apps", Some("web"))],
                },
                false,
            ),
        ] {
            let p = policy().with_pods(rules.clone());
            let d = decide_pod(&p, &pod(KeyKind::P256, None), far);
            assert_eq!(d.is_ok(), ok, "{rules:?}");
            if let Err(e) = d {
                assert!(matches!(e, PolicyError::PodNotAllowed { .. }), "{e}");
            }
        }
    }

    #[test]
    fn scopes_cover_a_namespace_or_one_account() {
        let ns = Scope {
            namespace: "apps".into(),
            service_account: None,
        };
        let one = Scope {
            namespace: "apps".into(),
            service_account: Some("web".into()),
        };
        assert!(ns.covers("apps", "db") && one.covers("apps", "web"));
        assert!(!one.covers("apps", "db") && !ns.covers("other", "web"));
    }
}
