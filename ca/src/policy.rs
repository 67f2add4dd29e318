//! What a request gets, decided before anything is queued: the identity the
//! certificate names, its lifetime, whether the caller may act for someone else, and
//! whether the SANs the CSR asks for are the caller's own. The signer signs what
//! policy decided and nothing else.

use spiffe::SpiffeId;
use time::Duration;

use signet_spiffe::{IdentityError, TrustDomains};

use crate::{authn::Caller, csr::ParsedCsr};

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
        "{caller} asked to act for {target:?}, but node impersonation is not enabled on this CA"
    )]
    Impersonation { caller: String, target: String },
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
}

/// Identity, lifetime and SAN rules.
#[derive(Debug, Clone)]
pub struct Policy {
    trust_domains: TrustDomains,
    default_ttl: Duration,
    max_ttl: Duration,
}

impl Policy {
    /// Certificates in `trust_domains.primary()`, living `default_ttl` unless asked
    /// otherwise, never longer than `max_ttl`.
    pub fn new(trust_domains: TrustDomains, default_ttl: Duration, max_ttl: Duration) -> Self {
        Self {
            trust_domains,
            default_ttl,
            max_ttl,
        }
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
        if let Some(target) = impersonate {
            return Err(PolicyError::Impersonation {
                caller: caller.account.to_string(),
                target: target.to_owned(),
            });
        }
        let id = caller
            .account
            .spiffe_id(self.trust_domains.primary())
            .map_err(PolicyError::Identity)?;
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
        })
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
