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
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration as StdDuration, Instant},
};

use k8s_openapi::api::{
    certificates::{v1::PodCertificateRequestStatus, v1beta1::PodCertificateRequestSpec},
    core::v1::{Pod, ServiceAccount as K8sServiceAccount},
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
use spiffe::SpiffeId;
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;

mod answer;
mod flags;

use answer::{Refusal, answered, check_binding, public_key, status_of};
pub use flags::{PodCertArgs, PodCertificates, ScopeError};

use crate::{
    issue::policy::{PodRequest, Policy, Request},
    issue::queue::{QueueError, SigningQueue},
    keys::signer::{Issued, SignError, Signer},
    kubernetes::writers::{Failures, Tally, WriteError, discover, drain, key_changes, status},
    metrics::Metrics,
    rotation::Rotation,
};

/// A PodCertificateRequest of whichever version the API server serves: `v1beta1`'s
/// spec holds `v1`'s fields and 1.35's `pkixPublicKey` too.
pub type PodCertificateRequest = Object<PodCertificateRequestSpec, PodCertificateRequestStatus>;

/// Requests answered at once.
const IN_FLIGHT: u16 = 32;
/// Attempts to answer a request: after `MAX_ATTEMPTS - 1` refused answers (400, 403,
/// 422), the next attempt writes `Failed` (`Unanswerable`) instead.
const MAX_ATTEMPTS: u32 = 5;
/// How long a request this writer answered is skipped while the watch catches up.
const SETTLED_FOR: StdDuration = StdDuration::from_secs(600);

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
    rotation: Arc<Rotation>,
    tally: Tally,
    failures: Failures,
    /// The requests of this signer name, as the controller sees them.
    requests: Store<PodCertificateRequest>,
    /// Refused answers per request UID (in memory: a new leader starts afresh).
    refused: Mutex<HashMap<String, u32>>,
    /// Requests this writer answered, by UID, whose answer the watch may not show
    /// yet: skipped, so a reconcile that starts before the watch catches up neither
    /// signs them again nor spends a write on a conflict.
    settled: Mutex<Settled>,
}

/// Requests this writer answered, by UID, and when; and when the expired ones were
/// last dropped.
struct Settled {
    at: HashMap<String, Instant>,
    pruned: Instant,
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
        let now = OffsetDateTime::now_utc();
        let mut decision =
            match self
                .policy
                .decide(Request::Pod(&request), signer.leaf_not_after_limit(), now)
            {
                Ok(d) => d,
                Err(e) => return Ok(Err(e.into())),
            };
        // During a trust change pod certificates end within the window too, never
        // under the API's one hour (the driver's window is at least two then).
        if let Some(cap) = self.rotation.cap().map(|c| c.max(Duration::HOUR))
            && decision.validity.not_after - now > cap
        {
            decision.validity =
                match crate::issue::policy::validity(now, cap, signer.leaf_not_after_limit()) {
                    Ok(v) => v,
                    Err(e) => return Ok(Err(e.into())),
                };
        }
        let (share, id) = (decision.share.clone(), decision.id.clone());
        let holder = format!(
            "{id} in pod {}/{} ({})",
            request.namespace, spec.pod_name, spec.pod_uid
        );
        let rotation = self.rotation.clone();
        let signed = self
            .queue
            .run_as(&share, move || {
                let issued = signer.sign_named(
                    &spki,
                    &decision.id,
                    &decision.validity,
                    decision.subject_cn.as_deref(),
                )?;
                rotation.note(Some(&holder), &signer, &issued, None);
                Ok(issued)
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
                        // The same request (not one made anew under its name), still
                        // unanswered: the answer was decided for its key and pod.
                        Some(fresh) if fresh.uid() == pcr.uid() && !answered(&fresh) => pcr = fresh,
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
        crate::sync::lock(&self.settled).at.contains_key(uid)
    }

    fn settle(&self, uid: &str) {
        let mut settled = crate::sync::lock(&self.settled);
        let now = Instant::now();
        // Entries normally go when the watch shows the answer (`forget`); what a
        // deleted request left is dropped here, once a settling period at most, not
        // at every answer of a burst.
        if settled.pruned + SETTLED_FOR <= now {
            settled
                .at
                .retain(|_, at| now.duration_since(*at) < SETTLED_FOR);
            settled.pruned = now;
        }
        settled.at.insert(uid.to_owned(), now);
    }

    /// Forgets a request that is answered (by anyone).
    fn forget(&self, uid: &str) {
        crate::sync::lock(&self.settled).at.remove(uid);
        crate::sync::lock(&self.refused).remove(uid);
        self.failures.succeeded(uid);
    }
}

fn uid(pcr: &PodCertificateRequest) -> String {
    pcr.uid().unwrap_or_default()
}

/// What reconciling one request comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Answered (by anyone): nothing to do, and nothing to remember.
    Forget,
    /// Answered by this writer, the watch not caught up yet: nothing to do.
    Skip,
    /// Its answers were refused too often: failed as unanswerable.
    GiveUp,
    /// Decide, sign and write it.
    Answer,
}

/// The step for a request that is `answered` or `settled` (answered here), whose
/// answers the API server has `refused` so many times.
fn step(answered: bool, settled: bool, refused: u32) -> Step {
    if answered {
        Step::Forget
    } else if settled {
        Step::Skip
    } else if refused + 1 >= MAX_ATTEMPTS {
        Step::GiveUp
    } else {
        Step::Answer
    }
}

impl RetryError {
    /// Whether the API server refused the answer itself (400, 403, 422), which counts
    /// toward failing the request; an unreachable or busy API server, or a busy
    /// signing queue, does not.
    fn is_refusal(&self) -> bool {
        matches!(self, Self::Api(WriteError::Api { source, .. })
            if matches!(status(source), Some(400 | 403 | 422)))
    }
}

/// Answers one request, unless it is answered already.
async fn reconcile(
    pcr: Arc<PodCertificateRequest>,
    ctx: Arc<Context>,
) -> Result<Action, RetryError> {
    let uid = uid(&pcr);
    let refused = crate::sync::lock(&ctx.refused)
        .get(&uid)
        .copied()
        .unwrap_or(0);
    let answer = match step(answered(&pcr), ctx.is_settled(&uid), refused) {
        Step::Forget => {
            ctx.forget(&uid);
            return Ok(Action::await_change());
        }
        Step::Skip => return Ok(Action::await_change()),
        Step::GiveUp => Err(Refusal::Unanswerable(refused)),
        Step::Answer => ctx.answer(&pcr).await?,
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
    if error.is_refusal() {
        // Entries are only added here, so requests gone meanwhile are forgotten here
        // too: not on every failure, which during an API server outage would walk
        // every pending request for each of them.
        let pending: HashSet<String> = ctx.requests.state().iter().map(|p| self::uid(p)).collect();
        let mut counts = crate::sync::lock(&ctx.refused);
        counts.retain(|u, _| pending.contains(u));
        *counts.entry(uid.clone()).or_insert(0) += 1;
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
    rotation: Arc<Rotation>,
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
        rotation,
        tally,
        failures: Failures::default(),
        requests: controller.store(),
        refused: Mutex::default(),
        settled: Mutex::new(Settled {
            at: HashMap::new(),
            pruned: Instant::now(),
        }),
    });
    drain(
        "pod-certificates",
        controller.run(reconcile, error_policy, ctx),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reconciling a request, from plain values.
    #[test]
    fn a_request_is_answered_once_and_given_up_after_its_refusals() {
        assert_eq!(step(true, false, 0), Step::Forget);
        assert_eq!(step(true, true, 3), Step::Forget);
        assert_eq!(step(false, true, 0), Step::Skip);
        assert_eq!(step(false, false, 0), Step::Answer);
        assert_eq!(step(false, false, MAX_ATTEMPTS - 2), Step::Answer);
        assert_eq!(step(false, false, MAX_ATTEMPTS - 1), Step::GiveUp);
    }

    #[test]
    fn only_the_api_servers_refusals_count_toward_giving_up() {
        let api = |code: u16| {
            RetryError::Api(WriteError::api(
                "PodCertificateRequest apps/p",
                kube::Error::Api(
                    kube::core::Status::failure("no", "Reason")
                        .with_code(code)
                        .boxed(),
                ),
            ))
        };
        for code in [400, 403, 422] {
            assert!(api(code).is_refusal(), "{code}");
        }
        for code in [409, 429, 500, 503] {
            assert!(!api(code).is_refusal(), "{code}");
        }
        assert!(!RetryError::Queue(QueueError::Full(8)).is_refusal());
    }
}
