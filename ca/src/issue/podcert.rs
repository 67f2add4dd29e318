//! The second entry point of the request path: signet-ca as the signer of
//! Kubernetes pod certificates. Each PodCertificateRequest for its signer name
//! (`certificates.k8s.io/v1` from 1.37, `v1beta1` on 1.35-1.36) is answered exactly
//! once, through the `/status` subresource, on the same path a CreateCertificate
//! call takes: the pod is authenticated by its binding, policy decides identity and
//! validity ([`Request::Pod`]), the signing queue signs under the service account's
//! share; then the answer is written: issued with the pod's SPIFFE identity, denied,
//! or failed (signing failed, or no answer could be written after several
//! attempts). The kubelet made the key and puts the pod's key and chain on disk;
//! the root reaches pods through the ClusterTrustBundle of the same signer name.
//!
//! Kubernetes binds a request's pod fields only when a node makes it, so each
//! request's pod and service account are looked up first: it is denied
//! (`PodNotBound`) unless the pod exists, is not finished, and has the request's UID,
//! service account and node, and the service account has the request's UID.
//!
//! The loop is a kube-runtime controller over the requests of this signer name, run
//! by the elected replica only.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration as StdDuration, Instant},
};

use k8s_openapi::{
    api::{
        certificates::{v1::PodCertificateRequestStatus, v1beta1::PodCertificateRequestSpec},
        core::v1::{Pod, ServiceAccount as K8sServiceAccount},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{ApiResource, PostParams},
    core::Object,
    runtime::{
        Controller,
        controller::{self, Action},
        reflector::Store,
        watcher,
    },
};
use rand::Rng;
use spiffe::SpiffeId;
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;

use crate::{
    issue::policy::{
        MIN_POD_LIFETIME, POD_KEY_TYPES, PodRequest, PodRules, Policy, PolicyError, Request, Scope,
    },
    issue::queue::{QueueError, SigningQueue},
    keys::KeyKind,
    keys::signer::{Issued, SignError, Signer},
    kubernetes::writers::{Failures, Tally, WriteError, discover, drain, key_changes, status},
    metrics::Metrics,
};

/// A PodCertificateRequest of whichever version the API server serves: `v1beta1`'s
/// spec holds `v1`'s fields and 1.35's `pkixPublicKey` too.
pub type PodCertificateRequest = Object<PodCertificateRequestSpec, PodCertificateRequestStatus>;

/// Requests answered at once.
const IN_FLIGHT: u16 = 32;
/// Refused answers (400, 403, 422) before a request is failed instead.
const MAX_ATTEMPTS: u32 = 5;
/// How long a request this writer answered is skipped while the watch catches up.
const SETTLED_FOR: StdDuration = StdDuration::from_secs(600);

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

/// Why a request is refused: the condition it gets says so.
#[derive(Debug, thiserror::Error)]
enum Refusal {
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
    fn condition(&self) -> (&'static str, &'static str) {
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

/// Why a request could not be answered now: retried with backoff, unanswered.
#[derive(Debug, thiserror::Error)]
enum RetryError {
    /// The API server: looking up the pod, or writing the answer.
    #[error(transparent)]
    Api(#[from] WriteError),
    /// The signing queue is full, or this service account's share of it used up.
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// What reconciling one request reads, and what is remembered between attempts.
struct Context {
    client: kube::Client,
    resource: ApiResource,
    policy: Arc<Policy>,
    queue: SigningQueue,
    signer: watch::Receiver<Arc<Signer>>,
    tally: Tally,
    failures: Failures,
    /// The requests of this signer name, as the controller sees them.
    requests: Store<PodCertificateRequest>,
    /// Refused answers per request UID (in memory: a new leader starts afresh).
    refused: Mutex<HashMap<String, u32>>,
    /// Requests this writer answered, by UID, whose answer the watch may not show
    /// yet: skipped, so a reconcile that starts before the watch catches up neither
    /// signs them again nor spends a write on a conflict.
    settled: Mutex<HashMap<String, Instant>>,
}

/// Whether the request has been answered (by anyone).
fn answered(pcr: &PodCertificateRequest) -> bool {
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
fn check_binding(
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
fn public_key(spec: &PodCertificateRequestSpec) -> Result<(Vec<u8>, KeyKind), Refusal> {
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
fn status_of(
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

impl Context {
    /// Authenticates the request by its binding, decides it and signs it: the
    /// answer, or an error when it cannot be answered now.
    async fn answer(
        &self,
        pcr: &PodCertificateRequest,
    ) -> Result<Result<(SpiffeId, Issued), Refusal>, RetryError> {
        let spec = &pcr.spec;
        let namespace = pcr.namespace().unwrap_or_default();
        if spec.pod_name.is_empty() || spec.service_account_name.is_empty() {
            return Ok(Err(Refusal::Invalid(
                "spec.podName and spec.serviceAccountName are required".into(),
            )));
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let pod = pods
            .get_opt(&spec.pod_name)
            .await
            .map_err(|e| WriteError::api(format!("pod {namespace}/{}", spec.pod_name), e))?;
        let accounts: Api<K8sServiceAccount> = Api::namespaced(self.client.clone(), &namespace);
        let sa = &spec.service_account_name;
        let account = accounts
            .get_opt(sa)
            .await
            .map_err(|e| WriteError::api(format!("service account {namespace}/{sa}"), e))?;
        if let Err(refusal) = check_binding(spec, pod.as_ref(), account.as_ref()) {
            return Ok(Err(refusal));
        }
        let (spki, key) = match public_key(spec) {
            Ok(k) => k,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let request = PodRequest {
            namespace,
            service_account: sa.clone(),
            key,
            max_expiration: spec
                .max_expiration_seconds
                .map(|s| Duration::seconds(s.into())),
            annotations: spec
                .unverified_user_annotations
                .iter()
                .flat_map(BTreeMap::keys)
                .cloned()
                .collect(),
        };
        let signer = self.signer.borrow().clone();
        let decision = match self.policy.decide(
            Request::Pod(&request),
            signer.leaf_not_after_limit(),
            OffsetDateTime::now_utc(),
        ) {
            Ok(d) => d,
            Err(e) => return Ok(Err(e.into())),
        };
        let (share, id) = (decision.share.clone(), decision.id.clone());
        let signed = self
            .queue
            .run_as(&share, move || {
                signer.sign(&spki, &decision.id, &decision.validity)
            })
            .await;
        match signed {
            Ok(issued) => Ok(issued.map(|i| (id, i)).map_err(Refusal::Sign)),
            Err(QueueError::Failed(why)) => Ok(Err(Refusal::Sign(SignError::Internal(why)))),
            Err(busy) => Err(busy.into()),
        }
    }

    /// Writes `answer` as the request's status, unless someone answered it first.
    /// `Ok(true)` when written.
    async fn write(
        &self,
        mut pcr: PodCertificateRequest,
        answer: &Result<(SpiffeId, Issued), Refusal>,
    ) -> Result<bool, WriteError> {
        let namespace = pcr.namespace().unwrap_or_default();
        let name = pcr.name_any();
        let api: Api<PodCertificateRequest> =
            Api::namespaced_with(self.client.clone(), &namespace, &self.resource);
        let what = || format!("PodCertificateRequest {namespace}/{name}");
        for _ in 0..3 {
            pcr.status = Some(status_of(answer, OffsetDateTime::now_utc()));
            match api
                .replace_status(&name, &PostParams::default(), &pcr)
                .await
            {
                Ok(_) => {
                    self.tally.wrote();
                    return Ok(true);
                }
                Err(e) if status(&e) == Some(409) => {
                    self.tally.conflict();
                    match api
                        .get_opt(&name)
                        .await
                        .map_err(|e| WriteError::api(what(), e))?
                    {
                        Some(fresh) if !answered(&fresh) => pcr = fresh,
                        // Answered meanwhile, or gone.
                        _ => return Ok(false),
                    }
                }
                Err(e) if status(&e) == Some(404) => return Ok(false),
                Err(e) => return Err(WriteError::api(what(), e)),
            }
        }
        Err(WriteError::Conflicts(what()))
    }

    fn is_settled(&self, uid: &str) -> bool {
        crate::sync::lock(&self.settled).contains_key(uid)
    }

    fn settle(&self, uid: &str) {
        let mut settled = crate::sync::lock(&self.settled);
        let now = Instant::now();
        settled.retain(|_, at| now.duration_since(*at) < SETTLED_FOR);
        settled.insert(uid.to_owned(), now);
    }

    /// Forgets a request that is answered (by anyone).
    fn forget(&self, uid: &str) {
        crate::sync::lock(&self.settled).remove(uid);
        crate::sync::lock(&self.refused).remove(uid);
        self.failures.succeeded(uid);
    }
}

fn uid(pcr: &PodCertificateRequest) -> String {
    pcr.uid().unwrap_or_default()
}

/// Answers one request, unless it is answered already.
async fn reconcile(
    pcr: Arc<PodCertificateRequest>,
    ctx: Arc<Context>,
) -> Result<Action, RetryError> {
    let uid = uid(&pcr);
    if answered(&pcr) {
        ctx.forget(&uid);
        return Ok(Action::await_change());
    }
    if ctx.is_settled(&uid) {
        return Ok(Action::await_change());
    }
    let refused = crate::sync::lock(&ctx.refused)
        .get(&uid)
        .copied()
        .unwrap_or(0);
    let answer = if refused + 1 >= MAX_ATTEMPTS {
        Err(Refusal::Unanswerable(refused))
    } else {
        ctx.answer(&pcr).await?
    };
    let written = ctx.write((*pcr).clone(), &answer).await?;
    ctx.settle(&uid);
    crate::sync::lock(&ctx.refused).remove(&uid);
    ctx.failures.succeeded(&uid);
    ctx.tally.synced();
    if written {
        let (label, reason) = match &answer {
            Ok(_) => ("issued", ""),
            Err(refusal) => match refusal.condition() {
                ("Denied", reason) => ("denied", reason),
                (_, reason) => ("failed", reason),
            },
        };
        ctx.tally
            .metrics()
            .pod_certificates
            .with_label_values(&[label])
            .inc();
        if !reason.is_empty() {
            tracing::info!(request = %uid, result = label, reason, "pod certificate request answered");
        }
    }
    Ok(Action::await_change())
}

/// Retries a request that could not be answered, with backoff. Only a refused answer
/// (400, 403, 422) counts toward failing it; while the API server is away (5xx,
/// 429, timeouts) or the signing queue is busy, it waits, unanswered.
fn error_policy(pcr: Arc<PodCertificateRequest>, error: &RetryError, ctx: Arc<Context>) -> Action {
    let uid = uid(&pcr);
    let refused = matches!(error, RetryError::Api(WriteError::Api { source, .. })
        if matches!(status(source), Some(400 | 403 | 422)));
    {
        let pending: Vec<String> = ctx.requests.state().iter().map(|p| self::uid(p)).collect();
        let mut counts = crate::sync::lock(&ctx.refused);
        // Requests gone meanwhile are forgotten.
        counts.retain(|u, _| pending.contains(u));
        if refused {
            *counts.entry(uid.clone()).or_insert(0) += 1;
        }
    }
    ctx.tally.error();
    let wait = ctx.failures.failed(&uid);
    if !matches!(error, RetryError::Queue(_)) {
        tracing::warn!(writer = ctx.tally.name(), request = %uid, %error, retry_in = ?wait, "cannot answer a pod certificate request now");
    }
    Action::requeue(wait)
}

/// Answers this signer's requests until aborted.
pub(crate) async fn run(
    client: kube::Client,
    config: PodCertificates,
    policy: Arc<Policy>,
    queue: SigningQueue,
    signer: watch::Receiver<Arc<Signer>>,
    metrics: Metrics,
) {
    let Some(resource) = discover(&client, "PodCertificateRequest", "podcertificaterequests").await
    else {
        return;
    };
    let api: Api<PodCertificateRequest> = Api::all_with(client.clone(), &resource);
    let requests = watcher::Config::default().fields(&format!("spec.signerName={}", config.signer));
    tracing::info!(version = %resource.api_version, signer = %config.signer, "signing pod certificates");
    let controller = Controller::new_with(api, requests, resource.clone())
        .reconcile_all_on(key_changes(signer.clone()))
        .with_config(controller::Config::default().concurrency(IN_FLIGHT));
    let tally = Tally::new("pod-certificates", &metrics);
    let ctx = Arc::new(Context {
        client,
        resource,
        policy,
        queue,
        signer,
        tally,
        failures: Failures::default(),
        requests: controller.store(),
        refused: Mutex::default(),
        settled: Mutex::default(),
    });
    drain(
        "pod-certificates",
        controller.run(reconcile, error_policy, ctx),
    )
    .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
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
