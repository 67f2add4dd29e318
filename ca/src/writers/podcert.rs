//! signet-ca as a signer of Kubernetes pod certificates: it answers each
//! PodCertificateRequest for its signer name (`certificates.k8s.io/v1` from 1.37,
//! `v1beta1` on 1.35-1.36) exactly once, through the `/status` subresource: issued
//! with the pod's SPIFFE identity, denied (unsupported key type, unknown
//! annotations, excluded by policy), or failed (signing failed, or it could not be
//! answered after several attempts). The kubelet made the key and put the pod's key
//! and chain on disk; the root reaches pods through the ClusterTrustBundle of the
//! same signer name. Kubernetes binds a request's pod fields only when a node makes
//! it, so each request's pod and service account are looked up first: it is denied
//! (`PodNotBound`) unless the pod exists, is not finished, and has the request's UID,
//! service account and node, and the service account has the request's UID.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration as StdDuration, Instant},
};

use futures::StreamExt;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, PostParams},
    runtime::{reflector, watcher},
};
use rand::Rng;
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
};

use k8s_openapi::api::core::v1::{Pod, ServiceAccount as K8sServiceAccount};
use signet_spiffe::ServiceAccount;

use super::{
    Driver,
    apply::{WriteError, status},
    discover, watch_into,
};
use crate::{keys::KeyKind, signer::Signer};

/// The API's floor for an issued lifetime.
const MIN_LIFETIME: Duration = Duration::hours(1);
/// Answers written at once.
const IN_FLIGHT: usize = 32;
/// Requests decided (and signed) in one go off the reactor.
const DECIDE_CHUNK: usize = 16;
/// Attempts to answer one request before it is failed.
const MAX_ATTEMPTS: u32 = 5;
/// The key types Signet signs, in the API's names.
pub(super) const SUPPORTED_KEY_TYPES: &str = "RSA3072, RSA4096, ECDSAP256, ECDSAP384";

/// A namespace, or a namespace and service account, in an allow or deny list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The namespace.
    pub namespace: String,
    /// The service account; `None` for all of the namespace.
    pub service_account: Option<String>,
}

impl Scope {
    fn covers(&self, namespace: &str, sa: &str) -> bool {
        self.namespace == namespace && self.service_account.as_deref().is_none_or(|s| s == sa)
    }
}

/// The pod certificate signer's settings.
#[derive(Debug, Clone)]
pub struct PodCertificates {
    /// The signer name requests name.
    pub signer: String,
    /// Issued identities are in this trust domain.
    pub trust_domain: spiffe::TrustDomain,
    /// Longest lifetime issued (`--max-ttl`).
    pub max_ttl: Duration,
    /// When not empty, only these namespaces or service accounts are served.
    pub allow: Vec<Scope>,
    /// These are denied.
    pub deny: Vec<Scope>,
    /// Chunks of requests signed at once (`--signing-threads`, as for CreateCertificate).
    pub signing_threads: usize,
}

/// One request's failed attempts to answer it.
#[derive(Debug)]
struct Attempts {
    /// Answers the API server refused (400, 403, 422): at [`MAX_ATTEMPTS`], `Failed`.
    refused: u32,
    /// Failures of any kind, for the backoff.
    failed: u32,
    /// When to try again.
    next: Instant,
}

/// What one request gets.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// The status to write: chain, times, condition.
    Issued(Value),
    Denied {
        reason: &'static str,
        message: String,
    },
    Failed {
        reason: &'static str,
        message: String,
    },
}

fn condition(kind: &str, reason: &str, message: &str, now: OffsetDateTime) -> Value {
    json!({
        "type": kind, "status": "True", "reason": reason, "message": message,
        "lastTransitionTime": rfc3339(now),
    })
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Whether the request has been answered (by anyone).
fn answered(pcr: &DynamicObject) -> bool {
    let status = &pcr.data["status"];
    status["certificateChain"]
        .as_str()
        .is_some_and(|c| !c.is_empty())
        || status["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                matches!(c["type"].as_str(), Some("Issued" | "Denied" | "Failed"))
                    && c["status"] == "True"
            })
        })
}

/// Decides a request and, when it is to be issued, signs it.
fn decide(
    pcr: &DynamicObject,
    config: &PodCertificates,
    signer: &Signer,
    now: OffsetDateTime,
) -> Answer {
    let spec = &pcr.data["spec"];
    let namespace = pcr.metadata.namespace.as_deref().unwrap_or("");
    let sa = spec["serviceAccountName"].as_str().unwrap_or("");
    if let Some(keys) = spec["unverifiedUserAnnotations"].as_object()
        && !keys.is_empty()
    {
        let mut names: Vec<&str> = keys.keys().map(String::as_str).collect();
        names.sort_unstable();
        // Bounded: the API refuses long condition messages.
        let mut listed = names
            .iter()
            .take(10)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        listed.truncate(1000);
        let more = names.len().saturating_sub(10);
        return Answer::Denied {
            reason: "UnknownAnnotations",
            message: format!(
                "Signet recognises no userAnnotations; unknown: {listed}{}",
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ),
        };
    }
    let excluded = config.deny.iter().any(|s| s.covers(namespace, sa))
        || (!config.allow.is_empty() && !config.allow.iter().any(|s| s.covers(namespace, sa)));
    if excluded {
        return Answer::Denied {
            reason: "NotAllowed",
            message: format!("pod certificates are not issued to {namespace}/{sa} by policy"),
        };
    }
    let account = match ServiceAccount::new(namespace, sa) {
        Ok(a) => a,
        Err(e) => {
            return Answer::Denied {
                reason: "InvalidIdentity",
                message: e.to_string(),
            };
        }
    };
    let (spki, key) = match public_key(spec) {
        Ok(k) => k,
        Err(denied) => return denied,
    };
    if matches!(key, KeyKind::Rsa(bits) if bits != 3072 && bits != 4096) {
        return Answer::Denied {
            reason: "UnsupportedKeyType",
            message: format!("{key}; Signet signs {SUPPORTED_KEY_TYPES}"),
        };
    }
    let id = match account.spiffe_id(&config.trust_domain) {
        Ok(id) => id,
        Err(e) => {
            return Answer::Denied {
                reason: "InvalidIdentity",
                message: e.to_string(),
            };
        }
    };
    // Total validity (NotAfter - NotBefore) = min(maxExpirationSeconds, --max-ttl,
    // what the signing certificate leaves), at least an hour; the signer backdates
    // NotBefore by two minutes, which is taken from the lifetime so the total stays
    // within maxExpirationSeconds.
    let max = spec["maxExpirationSeconds"]
        .as_i64()
        .map_or(Duration::hours(24), Duration::seconds);
    let left = signer.leaf_not_after_limit() - now;
    let total = max.min(config.max_ttl).min(left);
    if total < MIN_LIFETIME {
        return Answer::Failed {
            reason: "SignerExpiring",
            message: format!(
                "the signing certificate leaves {left} and requests allow {max}: under the one-hour minimum"
            ),
        };
    }
    let backdate = (total / 10_i32).min(Duration::minutes(2));
    let issued = match signer.sign(&spki, &id, total - backdate, now) {
        Ok(i) => i,
        Err(e) => {
            return Answer::Failed {
                reason: "SigningFailed",
                message: e.to_string(),
            };
        }
    };
    let roots = signer.roots();
    let mut chain = issued.cert_chain.first().cloned().unwrap_or_default();
    for cert in signer.chain_certs().iter().filter(|c| !roots.contains(c)) {
        chain.push_str(&signet_spiffe::pem_cert(cert));
    }
    let lifetime = issued.not_after - issued.not_before;
    let jitter = lifetime.as_seconds_f64() * rand::rng().random_range(-0.01..0.01);
    let refresh = issued.not_before + lifetime / 2 + Duration::seconds_f64(jitter);
    Answer::Issued(json!({
        "certificateChain": chain,
        "notBefore": rfc3339(issued.not_before),
        "notAfter": rfc3339(issued.not_after),
        "beginRefreshAt": rfc3339(refresh),
        "conditions": [condition("Issued", "Issued", &format!("issued {id}, serial {}", issued.serial), now)],
    }))
}

/// Why a request's pod fields do not hold: Kubernetes binds them only for requests
/// made by a node, so any other principal allowed to create PodCertificateRequests
/// could name any service account of its namespace. The request is answered only
/// when the pod exists, is not finished, has the request's UID, service account and
/// node, and the service account has the request's UID.
fn check_binding(
    spec: &Value,
    pod: Option<&Pod>,
    account: Option<&K8sServiceAccount>,
) -> Result<(), String> {
    let field = |name: &str| spec[name].as_str().unwrap_or("");
    let (pod_name, sa) = (field("podName"), field("serviceAccountName"));
    let Some(pod) = pod else {
        return Err(format!("pod {pod_name:?} does not exist"));
    };
    if pod.metadata.uid.as_deref() != Some(field("podUID")) {
        return Err(format!(
            "pod {pod_name:?} has another UID than the request's podUID"
        ));
    }
    let pod_spec = pod.spec.as_ref();
    let runs_as = pod_spec
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    if runs_as != sa {
        return Err(format!(
            "pod {pod_name:?} runs as service account {runs_as:?}, not {sa:?}"
        ));
    }
    let node = pod_spec.and_then(|s| s.node_name.as_deref()).unwrap_or("");
    if node != field("nodeName") {
        return Err(format!(
            "pod {pod_name:?} is on node {node:?}, not {:?}",
            field("nodeName")
        ));
    }
    if let Some(phase @ ("Succeeded" | "Failed")) =
        pod.status.as_ref().and_then(|s| s.phase.as_deref())
    {
        return Err(format!("pod {pod_name:?} has finished ({phase})"));
    }
    match account {
        None => Err(format!("service account {sa:?} does not exist")),
        Some(a) if a.metadata.uid.as_deref() != Some(field("serviceAccountUID")) => Err(format!(
            "service account {sa:?} has another UID than the request's serviceAccountUID"
        )),
        Some(_) => Ok(()),
    }
}

/// Looks up the pod and service account a request names and checks them
/// ([`check_binding`]): `Some(Denied)` when they do not match, `None` when they do.
async fn binding(client: &kube::Client, pcr: &DynamicObject) -> Result<Option<Answer>, WriteError> {
    let namespace = pcr.metadata.namespace.as_deref().unwrap_or_default();
    let spec = &pcr.data["spec"];
    let name = |field: &str| spec[field].as_str().unwrap_or("").to_owned();
    let (pod_name, sa) = (name("podName"), name("serviceAccountName"));
    if pod_name.is_empty() || sa.is_empty() {
        return Ok(Some(Answer::Denied {
            reason: "InvalidRequest",
            message: "spec.podName and spec.serviceAccountName are required".into(),
        }));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods
        .get_opt(&pod_name)
        .await
        .map_err(|e| WriteError::api(format!("pod {namespace}/{pod_name}"), e))?;
    let accounts: Api<K8sServiceAccount> = Api::namespaced(client.clone(), namespace);
    let account = accounts
        .get_opt(&sa)
        .await
        .map_err(|e| WriteError::api(format!("service account {namespace}/{sa}"), e))?;
    Ok(check_binding(spec, pod.as_ref(), account.as_ref())
        .err()
        .map(|message| Answer::Denied {
            reason: "PodNotBound",
            message,
        }))
}

/// The pod's public key: from `stubPKCS10Request` (1.36 and later), or from
/// `pkixPublicKey` (1.35's v1beta1). The API server has already checked the proof of
/// possession; here the key must parse and be of a type Signet signs.
fn public_key(spec: &Value) -> Result<(Vec<u8>, KeyKind), Answer> {
    let invalid = |message: String| Answer::Denied {
        reason: "InvalidRequest",
        message,
    };
    let unsupported = |why: String| Answer::Denied {
        reason: "UnsupportedKeyType",
        message: format!("{why}; Signet signs {SUPPORTED_KEY_TYPES}"),
    };
    if let Some(stub) = spec["stubPKCS10Request"].as_str() {
        let der = base64_decode(stub)
            .filter(|d| !d.is_empty())
            .ok_or_else(|| invalid("spec.stubPKCS10Request is not base64 DER".into()))?;
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        return match crate::csr::parse(&pem) {
            Ok(csr) => Ok((csr.spki, csr.key)),
            Err(crate::csr::CsrError::Key(why)) => Err(unsupported(why)),
            Err(e) => Err(invalid(format!("spec.stubPKCS10Request: {e}"))),
        };
    }
    let der = spec["pkixPublicKey"]
        .as_str()
        .and_then(base64_decode)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| invalid("neither spec.stubPKCS10Request nor spec.pkixPublicKey".into()))?;
    use x509_parser::prelude::FromDer;
    let (rest, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&der)
        .map_err(|e| invalid(format!("spec.pkixPublicKey: {e}")))?;
    if !rest.is_empty() {
        return Err(invalid("spec.pkixPublicKey: trailing data".into()));
    }
    let key = KeyKind::of_spki(&parsed).map_err(|e| unsupported(e.to_string()))?;
    Ok((der.clone(), key))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// The status a request gets for `answer`.
fn status_of(answer: &Answer, now: OffsetDateTime) -> Value {
    match answer {
        Answer::Issued(status) => status.clone(),
        Answer::Denied { reason, message } => {
            json!({"conditions": [condition("Denied", reason, message, now)]})
        }
        Answer::Failed { reason, message } => {
            json!({"conditions": [condition("Failed", reason, message, now)]})
        }
    }
}

/// Writes `answer` as the request's status, unless someone answered it first.
/// `Ok(true)` when written.
async fn write(
    client: &kube::Client,
    resource: &ApiResource,
    mut pcr: DynamicObject,
    answer: &Answer,
    sync: &Driver,
) -> Result<bool, WriteError> {
    let namespace = pcr.metadata.namespace.clone().unwrap_or_default();
    let name = pcr.metadata.name.clone().unwrap_or_default();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, resource);
    let what = || format!("PodCertificateRequest {namespace}/{name}");
    for _ in 0..3 {
        pcr.data["status"] = status_of(answer, OffsetDateTime::now_utc());
        match api
            .replace_status(&name, &PostParams::default(), &pcr)
            .await
        {
            Ok(_) => {
                sync.wrote();
                return Ok(true);
            }
            Err(e) if status(&e) == Some(409) => {
                sync.conflict();
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

/// Runs the signer until aborted.
pub(super) async fn run(
    client: kube::Client,
    config: PodCertificates,
    signer: watch::Receiver<Arc<Signer>>,
    sync: Driver,
) {
    let Some(resource) = discover(&client, "PodCertificateRequest", "podcertificaterequests").await
    else {
        return;
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let changed = Arc::new(Notify::new());
    let writer = reflector::store::Writer::new(resource.clone());
    let store = writer.as_reader();
    let mut watches = JoinSet::new();
    watches.spawn(watch_into(
        api,
        watcher::Config::default().fields(&format!("spec.signerName={}", config.signer)),
        writer,
        changed.clone(),
        "pod certificate requests",
    ));
    if store.wait_until_ready().await.is_err() {
        return;
    }
    tracing::info!(version = %resource.api_version, signer = %config.signer, "signing pod certificates");
    // Failed attempts per request UID (in memory: a new leader starts afresh).
    let attempts: Mutex<HashMap<String, Attempts>> = Mutex::default();
    // Requests this writer answered (or found answered) whose answer the watch has not
    // shown yet: skipped, so a pass that starts before the watch catches up neither
    // signs them again nor spends a write on a conflict.
    let settled: Mutex<HashSet<String>> = Mutex::default();
    let (client, config, resource, sync_ref, attempts, settled) =
        (&client, &config, &resource, &sync, &attempts, &settled);
    sync.drive(changed, signer, |current| {
        let pending: Vec<Arc<DynamicObject>> = store
            .state()
            .into_iter()
            .filter(|p| p.data["spec"]["signerName"] == config.signer.as_str() && !answered(p))
            .collect();
        async move {
            let now = Instant::now();
            let due: Vec<Arc<DynamicObject>> = {
                let pending_uids: HashSet<&str> =
                    pending.iter().filter_map(|p| p.metadata.uid.as_deref()).collect();
                let mut attempts = attempts.lock().unwrap_or_else(|p| p.into_inner());
                let mut settled = settled.lock().unwrap_or_else(|p| p.into_inner());
                // Requests no longer pending (answered or deleted) are forgotten.
                attempts.retain(|uid, _| pending_uids.contains(uid.as_str()));
                settled.retain(|uid| pending_uids.contains(uid.as_str()));
                pending
                    .iter()
                    .filter(|p| {
                        let uid = p.metadata.uid.as_deref().unwrap_or_default();
                        !settled.contains(uid)
                            && attempts.get(uid).is_none_or(|a| a.next <= now)
                    })
                    .cloned()
                    .collect()
            };
            // Decided (and signed) a chunk at a time off the reactor, the next chunk while
            // the answers of the last are written.
            let chunks: Vec<Vec<Arc<DynamicObject>>> =
                due.chunks(DECIDE_CHUNK).map(<[_]>::to_vec).collect();
            let results: Vec<(String, Result<bool, WriteError>)> = futures::stream::iter(chunks)
                .map(|chunk| {
                    let current = current.clone();
                    let config = config.clone();
                    let tries: Vec<u32> = {
                        let attempts = attempts.lock().unwrap_or_else(|p| p.into_inner());
                        chunk
                            .iter()
                            .map(|p| {
                                let uid = p.metadata.uid.as_deref().unwrap_or_default();
                                attempts.get(uid).map_or(0, |a| a.refused)
                            })
                            .collect()
                    };
                    async move {
                        // What each request gets before anything is signed: failed
                        // when past its attempts, else denied when the pod and service
                        // account it names do not match it; `Ok(None)`: to be decided.
                        let mut early = Vec::with_capacity(chunk.len());
                        for (pcr, tries) in chunk.iter().zip(tries) {
                            early.push(if tries + 1 >= MAX_ATTEMPTS {
                                Ok(Some(Answer::Failed {
                                    reason: "Unanswerable",
                                    message: format!(
                                        "no answer could be written after {tries} attempts"
                                    ),
                                }))
                            } else {
                                binding(client, pcr).await
                            });
                        }
                        // The rest is decided (and signed) off the reactor.
                        let undecided: Vec<Arc<DynamicObject>> = chunk
                            .iter()
                            .zip(&early)
                            .filter(|(_, e)| matches!(e, Ok(None)))
                            .map(|(p, _)| p.clone())
                            .collect();
                        let count = undecided.len();
                        let decided = tokio::task::spawn_blocking(move || {
                            undecided
                                .iter()
                                .map(|pcr| decide(pcr, &config, &current, OffsetDateTime::now_utc()))
                                .collect::<Vec<_>>()
                        })
                        .await
                        .unwrap_or_else(|e| {
                            vec![
                                Answer::Failed {
                                    reason: "SigningFailed",
                                    message: format!("signing task: {e}"),
                                };
                                count
                            ]
                        });
                        let mut decided = decided.into_iter();
                        let answers: Vec<Result<Answer, WriteError>> = early
                            .into_iter()
                            .map(|e| {
                                e.map(|known| {
                                    // One decided answer per undecided request, in order.
                                    known.or_else(|| decided.next()).unwrap_or(Answer::Failed {
                                        reason: "SigningFailed",
                                        message: "no answer was decided".into(),
                                    })
                                })
                            })
                            .collect();
                        futures::stream::iter(chunk.into_iter().zip(answers))
                    }
                })
                .buffered(config.signing_threads.clamp(1, 64))
                .flatten()
                .map(|(pcr, answer)| async move {
                    let uid = pcr.metadata.uid.clone().unwrap_or_default();
                    let answer = match answer {
                        Ok(answer) => answer,
                        // The lookup failed: nothing written, retried with backoff.
                        Err(e) => return (uid, Err(e)),
                    };
                    let result = write(client, resource, (*pcr).clone(), &answer, sync_ref).await;
                    if result.is_ok() {
                        settled
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(uid.clone());
                    }
                    if let Ok(true) = result {
                        let (label, what) = match &answer {
                            Answer::Issued(_) => ("issued", String::new()),
                            Answer::Denied { reason, .. } => ("denied", (*reason).to_owned()),
                            Answer::Failed { reason, .. } => ("failed", (*reason).to_owned()),
                        };
                        sync_ref.metrics.pod_certificates.with_label_values(&[label]).inc();
                        if !what.is_empty() {
                            tracing::info!(request = %uid, result = label, reason = %what, "pod certificate request answered");
                        }
                    }
                    (uid, result)
                })
                .buffer_unordered(IN_FLIGHT)
                .collect()
                .await;
            let mut first_error = None;
            {
                let mut attempts = attempts.lock().unwrap_or_else(|p| p.into_inner());
                for (uid, result) in results {
                    match result {
                        Ok(_) => {
                            attempts.remove(&uid);
                        }
                        Err(e) => {
                            // Only a refusal counts toward failing the request; while the
                            // API server is away (5xx, 429, timeouts) it waits, unanswered.
                            let refused = matches!(&e, WriteError::Api { source, .. }
                                if matches!(status(source), Some(400 | 403 | 422)));
                            let entry = attempts.entry(uid).or_insert(Attempts {
                                refused: 0,
                                failed: 0,
                                next: now,
                            });
                            if refused {
                                entry.refused += 1;
                            }
                            // 2 s doubling to 64 s, whatever the failure.
                            entry.failed = entry.failed.saturating_add(1);
                            let wait = StdDuration::from_secs(1 << entry.failed.clamp(1, 6));
                            entry.next = Instant::now() + wait;
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            match first_error {
                // Counted and retried with the driver's backoff.
                Some(e) => Err(e),
                // Wake when the next request waiting for a retry is due.
                None => Ok(attempts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .map(|a| a.next.saturating_duration_since(Instant::now()))
                    .min()),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn answered_means_a_terminal_condition_or_a_chain() {
        let resource = ApiResource {
            group: "certificates.k8s.io".into(),
            version: "v1".into(),
            api_version: "certificates.k8s.io/v1".into(),
            kind: "PodCertificateRequest".into(),
            plural: "podcertificaterequests".into(),
        };
        let mut pcr = DynamicObject::new("p", &resource);
        assert!(!answered(&pcr));
        pcr.data["status"] = json!({"conditions": [{"type": "Denied", "status": "True"}]});
        assert!(answered(&pcr));
        pcr.data["status"] = json!({"conditions": [{"type": "Issued", "status": "False"}]});
        assert!(!answered(&pcr));
        pcr.data["status"] = json!({"certificateChain": "PEM"});
        assert!(answered(&pcr));
    }

    #[test]
    fn a_request_binds_to_its_running_pod_and_account_only() {
        let spec = json!({
            "podName": "web-1", "podUID": "pod-uid", "serviceAccountName": "web",
            "serviceAccountUID": "sa-uid", "nodeName": "node-a",
        });
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
        assert_eq!(
            check_binding(&spec, Some(&good), Some(&account("sa-uid"))),
            Ok(())
        );
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
            assert!(err.contains(why), "{err}");
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
