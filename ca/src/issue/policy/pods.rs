//! Policy for pod certificates: which pods are served (allow and deny scopes), the
//! key types the API names, no unknown annotations, and the validity window
//! Kubernetes allows (`maxExpirationSeconds`, at least an hour, backdating taken from
//! the window).

use time::{Duration, OffsetDateTime};

use signet_spiffe::ServiceAccount;

use super::{Decision, MAX_BACKDATE, Policy, PolicyError, Validity};
use crate::keys::{KeyKind, signer::seconds};

/// The Kubernetes API's floor for a pod certificate's lifetime.
pub const MIN_POD_LIFETIME: Duration = Duration::hours(1);
/// A pod certificate's lifetime when the request sets no `maxExpirationSeconds`.
const DEFAULT_POD_LIFETIME: Duration = Duration::hours(24);
/// The key types pod certificates are signed for, in the API's names.
pub const POD_KEY_TYPES: &str = "RSA3072, RSA4096, ECDSAP256, ECDSAP384";

/// A PodCertificateRequest as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRequest {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's service account.
    pub service_account: String,
    /// The pod's public key.
    pub key: KeyKind,
    /// `spec.maxExpirationSeconds`.
    pub max_expiration: Option<Duration>,
    /// The keys of `spec.unverifiedUserAnnotations`.
    pub annotations: Vec<String>,
}

/// A namespace, or a namespace and service account, in an allow or deny list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The namespace.
    pub namespace: String,
    /// The service account; `None` for all of the namespace.
    pub service_account: Option<String>,
}

impl Scope {
    pub(super) fn covers(&self, namespace: &str, sa: &str) -> bool {
        self.namespace == namespace && self.service_account.as_deref().is_none_or(|s| s == sa)
    }
}

/// Which pods get pod certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRules {
    /// When not empty, only these namespaces or service accounts are served.
    pub allow: Vec<Scope>,
    /// These are denied.
    pub deny: Vec<Scope>,
}

impl Policy {
    /// Kubernetes' rules for pod certificates and Signet's: no unknown annotations,
    /// the pod's account in scope, a key type of the API's list, and a lifetime of
    /// `min(maxExpirationSeconds or 24 h, --max-ttl, what the chain leaves)` that is
    /// at least an hour. The lifetime is the whole window, NotAfter - NotBefore: the
    /// backdating is taken from it, so the window stays within `maxExpirationSeconds`.
    pub(super) fn decide_pod(
        &self,
        pod: &PodRequest,
        limit: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<Decision, PolicyError> {
        if !pod.annotations.is_empty() {
            let mut names: Vec<&str> = pod.annotations.iter().map(String::as_str).collect();
            names.sort_unstable();
            // Bounded: the API refuses long condition messages.
            let mut listed = names
                .iter()
                .take(10)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            let mut end = listed.len().min(1000);
            while !listed.is_char_boundary(end) {
                end -= 1;
            }
            listed.truncate(end);
            let more = names.len().saturating_sub(10);
            if more > 0 {
                listed.push_str(&format!(" and {more} more"));
            }
            return Err(PolicyError::UnknownAnnotations(listed));
        }
        let (namespace, sa) = (pod.namespace.as_str(), pod.service_account.as_str());
        let rules = &self.pods;
        if rules.deny.iter().any(|s| s.covers(namespace, sa))
            || (!rules.allow.is_empty() && !rules.allow.iter().any(|s| s.covers(namespace, sa)))
        {
            return Err(PolicyError::PodNotAllowed {
                namespace: namespace.to_owned(),
                service_account: sa.to_owned(),
            });
        }
        let account = ServiceAccount::new(namespace, sa).map_err(PolicyError::Identity)?;
        if matches!(pod.key, KeyKind::Rsa(bits) if bits != 3072 && bits != 4096) {
            return Err(PolicyError::PodKeyType(pod.key.to_string()));
        }
        let id = account
            .spiffe_id(self.trust_domains.primary())
            .map_err(PolicyError::Identity)?;
        let allowed = pod.max_expiration.unwrap_or(DEFAULT_POD_LIFETIME);
        let left = limit - now;
        let total = allowed.min(self.max_ttl).min(left);
        let backdate = (total / 10_i32).min(MAX_BACKDATE);
        let not_before = seconds(now - backdate);
        let not_after = seconds(not_before + total);
        if not_after - not_before < MIN_POD_LIFETIME {
            return Err(PolicyError::PodLifetime { left, allowed });
        }
        Ok(Decision {
            subject_cn: self.subject_cn(&id),
            id,
            validity: Validity {
                not_before,
                not_after,
            },
            node: None,
            share: account.to_string(),
        })
    }
}
