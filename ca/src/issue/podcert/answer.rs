//! What a request gets: its binding checked, its key read, and its answer as a
//! status, an issued chain and times or a refusal's condition (`Refusal::condition`,
//! the one map from a refusal to the API's reasons).

use k8s_openapi::{
    api::{
        certificates::{v1::PodCertificateRequestStatus, v1beta1::PodCertificateRequestSpec},
        core::v1::{Pod, ServiceAccount as K8sServiceAccount},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use rand::Rng;
use spiffe::SpiffeId;
use time::{Duration, OffsetDateTime};

use super::PodCertificateRequest;
use crate::{
    issue::policy::{POD_KEY_TYPES, PolicyError},
    keys::KeyKind,
    keys::signer::{Issued, SignError},
};

/// Why a request is refused: the condition it gets says so.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
    /// The request itself is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The pod or service account it names does not match it.
    #[error("{0}")]
    NotBound(String),
    /// Its key is of a type Signet does not sign.
    #[error("{0}; Signet signs {POD_KEY_TYPES}")]
    KeyType(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("no answer could be written after {0} attempts")]
    Unanswerable(u32),
}

impl Refusal {
    /// The one map from a refusal to its condition: `Denied` or `Failed`, and the
    /// reason.
    pub(super) fn condition(&self) -> (&'static str, &'static str) {
        const DENIED: &str = "Denied";
        const FAILED: &str = "Failed";
        match self {
            Self::Invalid(_) => (DENIED, "InvalidRequest"),
            Self::NotBound(_) => (DENIED, "PodNotBound"),
            Self::KeyType(_) | Self::Policy(PolicyError::PodKeyType(_)) => {
                (DENIED, "UnsupportedKeyType")
            }
            Self::Policy(PolicyError::UnknownAnnotations(_)) => (DENIED, "UnknownAnnotations"),
            Self::Policy(PolicyError::PodNotAllowed { .. }) => (DENIED, "NotAllowed"),
            Self::Policy(PolicyError::Identity(_)) => (DENIED, "InvalidIdentity"),
            Self::Policy(PolicyError::PodLifetime { .. } | PolicyError::ChainExpired(_)) => {
                (FAILED, "SignerExpiring")
            }
            // CreateCertificate's refusals; a pod request never gets them.
            Self::Policy(
                PolicyError::ForeignSan { .. }
                | PolicyError::Impersonation { .. }
                | PolicyError::ImpersonationRefused { .. }
                | PolicyError::BadTarget { .. }
                | PolicyError::PodsNotSynced(_),
            ) => (DENIED, "NotAllowed"),
            Self::Sign(_) => (FAILED, "SigningFailed"),
            Self::Unanswerable(_) => (FAILED, "Unanswerable"),
        }
    }
}

/// Whether the request has been answered (by anyone).
pub(super) fn answered(pcr: &PodCertificateRequest) -> bool {
    pcr.status.as_ref().is_some_and(|s| {
        s.certificate_chain
            .as_deref()
            .is_some_and(|c| !c.is_empty())
            || s.conditions.iter().flatten().any(|c| {
                matches!(c.type_.as_str(), "Issued" | "Denied" | "Failed") && c.status == "True"
            })
    })
}

/// Why a request's pod fields do not hold: Kubernetes binds them only for requests
/// made by a node, so any other principal allowed to create PodCertificateRequests
/// could name any service account of its namespace.
pub(super) fn check_binding(
    spec: &PodCertificateRequestSpec,
    pod: Option<&Pod>,
    account: Option<&K8sServiceAccount>,
) -> Result<(), Refusal> {
    let (pod_name, sa) = (&spec.pod_name, &spec.service_account_name);
    let Some(pod) = pod else {
        return Err(Refusal::NotBound(format!(
            "pod {pod_name:?} does not exist"
        )));
    };
    if pod.metadata.uid.as_deref() != Some(spec.pod_uid.as_str()) {
        return Err(Refusal::NotBound(format!(
            "pod {pod_name:?} has another UID than the request's podUID"
        )));
    }
    let pod_spec = pod.spec.as_ref();
    let runs_as = pod_spec
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    if runs_as != sa {
        return Err(Refusal::NotBound(format!(
            "pod {pod_name:?} runs as service account {runs_as:?}, not {sa:?}"
        )));
    }
    let node = pod_spec.and_then(|s| s.node_name.as_deref()).unwrap_or("");
    if node != spec.node_name {
        return Err(Refusal::NotBound(format!(
            "pod {pod_name:?} is on node {node:?}, not {:?}",
            spec.node_name
        )));
    }
    if let Some(phase @ ("Succeeded" | "Failed")) =
        pod.status.as_ref().and_then(|s| s.phase.as_deref())
    {
        return Err(Refusal::NotBound(format!(
            "pod {pod_name:?} has finished ({phase})"
        )));
    }
    match account {
        None => Err(Refusal::NotBound(format!(
            "service account {sa:?} does not exist"
        ))),
        Some(a) if a.metadata.uid.as_deref() != Some(spec.service_account_uid.as_str()) => {
            Err(Refusal::NotBound(format!(
                "service account {sa:?} has another UID than the request's serviceAccountUID"
            )))
        }
        Some(_) => Ok(()),
    }
}

/// The pod's public key: from `stubPKCS10Request` (1.36 and later), or from
/// `pkixPublicKey` (1.35's v1beta1). The API server has already checked the proof of
/// possession; here the key must parse and be of a type Signet signs.
pub(super) fn public_key(spec: &PodCertificateRequestSpec) -> Result<(Vec<u8>, KeyKind), Refusal> {
    let stub = &spec.stub_pkc_s10_request.0;
    if !stub.is_empty() {
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", stub.clone()));
        return match crate::issue::csr::parse(&pem) {
            Ok(csr) => Ok((csr.spki, csr.key)),
            Err(crate::issue::csr::CsrError::Key(why)) => Err(Refusal::KeyType(why)),
            Err(e) => Err(Refusal::Invalid(format!("spec.stubPKCS10Request: {e}"))),
        };
    }
    let der = spec
        .pkix_public_key
        .as_ref()
        .map(|k| k.0.as_slice())
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            Refusal::Invalid("neither spec.stubPKCS10Request nor spec.pkixPublicKey".into())
        })?;
    use x509_parser::prelude::FromDer;
    let (rest, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der)
        .map_err(|e| Refusal::Invalid(format!("spec.pkixPublicKey: {e}")))?;
    if !rest.is_empty() {
        return Err(Refusal::Invalid("spec.pkixPublicKey: trailing data".into()));
    }
    let key = KeyKind::of_spki(&parsed).map_err(|e| Refusal::KeyType(e.to_string()))?;
    Ok((der.to_vec(), key))
}

fn time(t: OffsetDateTime) -> Time {
    Time(Timestamp::from_second(t.unix_timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn condition(kind: &str, reason: &str, message: String, now: OffsetDateTime) -> Condition {
    Condition {
        type_: kind.to_owned(),
        status: "True".to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: time(now),
        observed_generation: None,
    }
}

/// The status a request gets: the leaf and the chain above it (roots excluded: pods
/// take those from the ClusterTrustBundle), its times, and a refresh point around
/// half its life; or the refusal's condition.
pub(super) fn status_of(
    answer: &Result<(SpiffeId, Issued), Refusal>,
    now: OffsetDateTime,
) -> PodCertificateRequestStatus {
    match answer {
        Ok((id, issued)) => {
            let mut chain = issued.leaf.clone();
            for cert in issued.chain.iter().filter(|c| !c.is_root) {
                chain.push_str(&cert.pem);
            }
            let lifetime = issued.not_after - issued.not_before;
            let jitter = lifetime.as_seconds_f64() * rand::rng().random_range(-0.01..0.01);
            let refresh = issued.not_before + lifetime / 2 + Duration::seconds_f64(jitter);
            let message = format!("issued {id}, serial {}", issued.serial);
            PodCertificateRequestStatus {
                certificate_chain: Some(chain),
                not_before: Some(time(issued.not_before)),
                not_after: Some(time(issued.not_after)),
                begin_refresh_at: Some(time(refresh)),
                conditions: Some(vec![condition("Issued", "Issued", message, now)]),
            }
        }
        Err(refusal) => {
            let (kind, reason) = refusal.condition();
            PodCertificateRequestStatus {
                conditions: Some(vec![condition(kind, reason, refusal.to_string(), now)]),
                ..Default::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kube::{api::ApiResource, core::Object};
    use serde_json::json;

    fn resource() -> ApiResource {
        ApiResource {
            group: "certificates.k8s.io".into(),
            version: "v1".into(),
            api_version: "certificates.k8s.io/v1".into(),
            kind: "PodCertificateRequest".into(),
            plural: "podcertificaterequests".into(),
        }
    }

    fn with_status(status: serde_json::Value) -> PodCertificateRequest {
        let mut pcr = Object::new("p", &resource(), PodCertificateRequestSpec::default());
        pcr.status = serde_json::from_value(status).unwrap();
        pcr
    }

    #[test]
    fn answered_means_a_terminal_condition_or_a_chain() {
        let pcr = Object::new("p", &resource(), PodCertificateRequestSpec::default());
        assert!(!answered(&pcr));
        let condition = |kind: &str, status: &str| {
            json!({"conditions": [{"type": kind, "status": status, "reason": "R", "message": "",
                                   "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
        };
        assert!(answered(&with_status(condition("Denied", "True"))));
        assert!(!answered(&with_status(condition("Issued", "False"))));
        assert!(answered(&with_status(json!({"certificateChain": "PEM"}))));
    }

    #[test]
    fn a_request_binds_to_its_running_pod_and_account_only() {
        let spec: PodCertificateRequestSpec = serde_json::from_value(json!({
            "signerName": "signet.dev/spiffe",
            "podName": "web-1", "podUID": "pod-uid", "serviceAccountName": "web",
            "serviceAccountUID": "sa-uid", "nodeName": "node-a", "nodeUID": "node-uid",
        }))
        .unwrap();
        let pod = |uid: &str, sa: &str, node: &str, phase: &str| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "web-1", "namespace": "apps", "uid": uid},
                "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        let account = |uid: &str| -> K8sServiceAccount {
            serde_json::from_value(json!({"metadata": {"name": "web", "uid": uid}})).unwrap()
        };
        let good = pod("pod-uid", "web", "node-a", "Running");
        assert!(check_binding(&spec, Some(&good), Some(&account("sa-uid"))).is_ok());
        for (pod, sa, why) in [
            (None, Some(account("sa-uid")), "does not exist"),
            (
                Some(pod("other", "web", "node-a", "Running")),
                Some(account("sa-uid")),
                "another UID",
            ),
            (
                Some(pod("pod-uid", "admin", "node-a", "Running")),
                Some(account("sa-uid")),
                "runs as service account \"admin\"",
            ),
            (
                Some(pod("pod-uid", "web", "node-b", "Running")),
                Some(account("sa-uid")),
                "node \"node-b\"",
            ),
            (
                Some(pod("pod-uid", "web", "node-a", "Succeeded")),
                Some(account("sa-uid")),
                "finished",
            ),
            (
                Some(pod("pod-uid", "web", "node-a", "Failed")),
                Some(account("sa-uid")),
                "finished",
            ),
            (
                Some(good.clone()),
                Some(account("old-uid")),
                "serviceAccountUID",
            ),
            (
                Some(good.clone()),
                None,
                "service account \"web\" does not exist",
            ),
        ] {
            let err = check_binding(&spec, pod.as_ref(), sa.as_ref()).unwrap_err();
            assert!(matches!(err, Refusal::NotBound(_)), "{err}");
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn every_refusal_is_denied_or_failed_with_the_apis_reasons() {
        let denied = [
            (Refusal::Invalid("x".into()), "InvalidRequest"),
            (Refusal::NotBound("x".into()), "PodNotBound"),
            (Refusal::KeyType("Ed25519".into()), "UnsupportedKeyType"),
            (
                Refusal::Policy(PolicyError::PodKeyType("RSA-2048".into())),
                "UnsupportedKeyType",
            ),
            (
                Refusal::Policy(PolicyError::UnknownAnnotations("a".into())),
                "UnknownAnnotations",
            ),
        ];
        for (refusal, reason) in denied {
            assert_eq!(refusal.condition(), ("Denied", reason), "{refusal}");
        }
        let lifetime = PolicyError::PodLifetime {
            left: Duration::minutes(5),
            allowed: Duration::hours(24),
        };
        assert_eq!(
            Refusal::Policy(lifetime).condition(),
            ("Failed", "SignerExpiring")
        );
        assert_eq!(
            Refusal::Unanswerable(4).condition(),
            ("Failed", "Unanswerable")
        );
        let status = status_of(
            &Err(Refusal::KeyType("Ed25519".into())),
            OffsetDateTime::now_utc(),
        );
        let c = &status.conditions.unwrap()[0];
        assert_eq!(
            (c.type_.as_str(), c.reason.as_str()),
            ("Denied", "UnsupportedKeyType")
        );
        assert!(c.message.contains("ECDSAP256"), "{}", c.message);
        assert!(status.certificate_chain.is_none());
    }
}
