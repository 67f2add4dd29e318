//! `istio.v1.auth.IstioCertificateService`. A request goes authenticate -> parse the
//! CSR -> policy -> (queue) verify the CSR's signature and sign -> answer. Errors
//! become gRPC statuses here and nowhere else.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rustls::pki_types::UnixTime;
use signet_proto::{
    IstioCertificateRequest, IstioCertificateResponse, IstioCertificateService, trust,
};
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};

use crate::{
    issue::authn::{Authenticator, AuthnError, Caller, ClientCert, Token},
    issue::csr::{self, CsrError},
    issue::policy::{self, Decision, Policy, PolicyError},
    issue::pushback::Pushback,
    issue::queue::{QueueError, SigningQueue},
    keys::signer::{Issued, SignError, Signer},
    keys::tls::TlsState,
    metrics::Metrics,
    rotation::{Rotation, stage::Stage},
};

/// Largest request message accepted (a CSR is about 1 KiB).
pub(crate) const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The CreateCertificate service.
#[derive(Debug, Clone)]
pub(crate) struct CaService {
    signer: watch::Receiver<Arc<Signer>>,
    tls: Arc<TlsState>,
    authn: Arc<Authenticator>,
    queue: SigningQueue,
    metrics: Metrics,
    policy: Arc<Policy>,
    rotation: Arc<Rotation>,
    overload_log: Arc<OverloadLog>,
    /// Malformed `signet-served-roots` values: ignored (the header is advisory),
    /// one warning a second at most.
    served_log: Arc<OverloadLog>,
    pushback: Arc<Pushback>,
}

/// Refusals for overload (a full signing queue, a caller's share used up, token
/// reviews throttled) come in storms, a million in a fleet's restart: at most one
/// warning a second says how many there were, each of the others is a debug line.
/// The counts are in the metrics either way. Every other refusal is a warning of its
/// own. (Malformed reports of served roots are warned about the same way: one
/// warning a second with the count, the others not logged.)
#[derive(Debug)]
struct OverloadLog {
    started: Instant,
    /// Milliseconds after `started` of the last warning, `u64::MAX` before the first.
    last_warning_ms: AtomicU64,
    /// Overload refusals since the last warning.
    since: AtomicU64,
}

impl OverloadLog {
    const EVERY: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Self {
            started: Instant::now(),
            last_warning_ms: AtomicU64::new(u64::MAX),
            since: AtomicU64::new(0),
        }
    }

    /// Counts one refusal; `Some(n)` when this one is to be a warning, `n` the
    /// refusals since the last warning (this one included).
    fn count(&self) -> Option<u64> {
        self.since.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= Self::EVERY.as_millis() as u64;
        if due
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.since.swap(0, Ordering::Relaxed))
        } else {
            None
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(transparent)]
    Authn(#[from] AuthnError),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl RequestError {
    /// A refusal because the CA or the API server is at a limit, not because of
    /// anything wrong with the request.
    fn is_overload(&self) -> bool {
        matches!(
            self,
            Self::Queue(QueueError::Full(_) | QueueError::Share(_))
                | Self::Authn(AuthnError::Throttled(_))
        )
    }

    /// A refusal that came before the caller was known.
    fn before_authentication(&self) -> bool {
        matches!(self, Self::Authn(_))
    }

    fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            Self::Authn(AuthnError::Unauthenticated(_)) => Status::unauthenticated(message),
            Self::Authn(AuthnError::Unavailable(_) | AuthnError::Throttled(_)) => {
                Status::unavailable(message)
            }
            Self::Csr(_) | Self::Sign(SignError::PublicKey(_)) => Status::invalid_argument(message),
            Self::Policy(
                PolicyError::ForeignSan { .. }
                | PolicyError::Impersonation { .. }
                | PolicyError::ImpersonationRefused { .. },
            ) => Status::permission_denied(message),
            Self::Policy(PolicyError::BadTarget { .. }) => Status::invalid_argument(message),
            Self::Policy(PolicyError::PodsNotSynced(_)) => Status::unavailable(message),
            Self::Policy(PolicyError::Identity(_)) => Status::failed_precondition(message),
            Self::Policy(PolicyError::ChainExpired(_)) => Status::internal(message),
            // Pod certificate refusals; a CreateCertificate call never gets them.
            Self::Policy(
                PolicyError::UnknownAnnotations(_)
                | PolicyError::PodNotAllowed { .. }
                | PolicyError::PodKeyType(_),
            ) => Status::permission_denied(message),
            Self::Policy(PolicyError::PodLifetime { .. }) => Status::failed_precondition(message),
            Self::Sign(_) => Status::internal(message),
            Self::Queue(QueueError::Full(_) | QueueError::Share(_)) => {
                Status::resource_exhausted(message)
            }
            Self::Queue(QueueError::Failed(_)) => Status::internal(message),
        }
    }

    /// Istio's `error` label values for `citadel_server_csr_sign_err_count`.
    fn sign_error_label(&self) -> Option<&'static str> {
        match self {
            Self::Authn(_)
            | Self::Policy(
                PolicyError::Impersonation { .. }
                | PolicyError::ImpersonationRefused { .. }
                | PolicyError::BadTarget { .. }
                | PolicyError::PodsNotSynced(_),
            ) => None,
            Self::Csr(_)
            | Self::Policy(PolicyError::ForeignSan { .. } | PolicyError::Identity(_))
            | Self::Sign(SignError::PublicKey(_)) => Some("CSR_ERROR"),
            Self::Sign(SignError::Expired(_)) | Self::Policy(PolicyError::ChainExpired(_)) => {
                Some("CA_NOT_READY")
            }
            Self::Policy(
                PolicyError::UnknownAnnotations(_)
                | PolicyError::PodNotAllowed { .. }
                | PolicyError::PodKeyType(_)
                | PolicyError::PodLifetime { .. },
            ) => Some("CSR_ERROR"),
            Self::Sign(_) | Self::Queue(QueueError::Failed(_)) => Some("CERT_GEN_ERROR"),
            Self::Queue(QueueError::Full(_) | QueueError::Share(_)) => Some("OVERLOADED"),
        }
    }
}

impl CaService {
    /// The pushback schedule of overload refusals (the JWT-SVID service books in it
    /// too: both share the signing queue).
    pub(crate) fn pushback(&self) -> Arc<Pushback> {
        self.pushback.clone()
    }

    /// A service signing with whatever signer `signer` holds at each request.
    pub(crate) fn new(
        signer: watch::Receiver<Arc<Signer>>,
        tls: Arc<TlsState>,
        authn: Arc<Authenticator>,
        queue: SigningQueue,
        metrics: Metrics,
        policy: Arc<Policy>,
        rotation: Arc<Rotation>,
    ) -> Self {
        Self {
            signer,
            tls,
            authn,
            queue,
            metrics,
            policy,
            rotation,
            overload_log: Arc::new(OverloadLog::new()),
            served_log: Arc::new(OverloadLog::new()),
            pushback: Arc::new(Pushback::default()),
        }
    }

    async fn handle(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<(Caller, Decision, Issued, Stage), RequestError> {
        let caller = authenticate(&request, &self.tls, &self.authn)
            .await
            .inspect_err(|_| self.metrics.authentication_failure_count.inc())?;

        let served = match served_roots(request.metadata()) {
            Ok(served) => served,
            Err(e) => {
                // Advisory: a bad value must not cost the caller its certificate.
                if let Some(n) = self.served_log.count() {
                    tracing::warn!(error = %e, caller = %caller.account, ignored = n, "ignoring a malformed report of the roots a caller serves");
                }
                None
            }
        };
        let body = request.into_inner();
        let csr = csr::parse(&body.csr)?;
        let target = impersonation_target(&body)?;
        let signer = self.signer.borrow().clone();
        // The stage as the signer is read (at a stage change the stage is set a
        // moment before the signer is published, so for that moment they differ).
        let stage = self.rotation.stage();
        let request = policy::Request::Istio {
            caller: &caller,
            requested_secs: body.validity_duration,
            impersonate: target.as_deref(),
            csr: &csr,
        };
        let now = OffsetDateTime::now_utc();
        let mut decision = self
            .policy
            .decide(request, signer.leaf_not_after_limit(), now)?;
        // During a trust change every leaf ends within the rotation window.
        if let Some(cap) = self.rotation.cap()
            && decision.validity.not_after - now > cap
        {
            decision.validity = policy::validity(now, cap, signer.leaf_not_after_limit())?;
        }
        let decided = decision.clone();
        let holder = holder(&caller, &decision);
        let rotation = self.rotation.clone();
        let issued = self
            .queue
            .run_as(&decision.share, move || -> Result<Issued, RequestError> {
                csr.verify()?;
                let issued = signer.sign_named(
                    &csr.spki,
                    &decision.id,
                    &decision.validity,
                    decision.subject_cn.as_deref(),
                )?;
                // Noted before the answer leaves: the marks on disk must cover it.
                rotation.note(holder.as_deref(), &signer, &issued, served.as_deref());
                Ok(issued)
            })
            .await??;
        Ok((caller, decided, issued, stage))
    }
}

/// The roots a signet-agent says it serves (`signet-served-roots`); `None` from
/// other clients, which do not say.
fn served_roots(
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Option<Vec<[u8; 32]>>, trust::RootsError> {
    let Some(value) = metadata.get(trust::SERVED_ROOTS) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| trust::RootsError("not ASCII".into()))?;
    trust::decode_roots(value).map(Some)
}

/// Who holds a leaf, as a trust change tracks renewals: the identity and the pod
/// (or, for a node agent, the node) the credential is bound to; `None` when it names
/// neither, and replicas of one service account cannot be told apart.
fn holder(caller: &Caller, decision: &Decision) -> Option<String> {
    let id = &decision.id;
    if let Some(node) = &decision.node {
        return Some(format!("{id} on node {node}"));
    }
    let pod = caller.pod.as_ref()?;
    let ns = caller.account.namespace();
    Some(match &pod.uid {
        Some(uid) => format!("{id} in pod {ns}/{} ({uid})", pod.name),
        None => format!("{id} in pod {ns}/{}", pod.name),
    })
}

/// The caller of a gRPC request: its token (`authorization: Bearer`) or its client
/// certificate, checked again against the chain in use, for the cluster it names
/// (`clusterid`). CreateCertificate and the JWT-SVID service share it.
pub(crate) async fn authenticate<T>(
    request: &Request<T>,
    tls: &TlsState,
    authn: &Authenticator,
) -> Result<Caller, AuthnError> {
    let metadata = request.metadata();
    let token = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(Token::from_header);
    let cluster_id = metadata
        .get("clusterid")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let peer_certs = request.peer_certs();
    let refusal;
    let client_cert = match peer_certs.as_deref().map(Vec::as_slice) {
        None | Some([]) => ClientCert::Absent,
        Some(chain) => match tls.reverify_client(chain, UnixTime::now()) {
            Ok(()) => ClientCert::Verified(chain),
            Err(e) => {
                refusal = e.to_string();
                ClientCert::Refused(&refusal)
            }
        },
    };
    authn
        .authenticate(
            client_cert,
            token.as_ref(),
            cluster_id,
            request.remote_addr().map(|a| a.ip()),
        )
        .await
}

/// The `ImpersonatedIdentity` metadata value, when a non-empty one was sent. An empty
/// string means none (as in Istio); any other kind of value is refused rather than
/// ignored, so a malformed request is never decided as the caller's own.
fn impersonation_target(body: &IstioCertificateRequest) -> Result<Option<String>, PolicyError> {
    use prost_types::value::Kind;
    let Some(value) = body
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("ImpersonatedIdentity"))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
        Some(Kind::StringValue(s)) => Ok(Some(s.clone())),
        Some(Kind::NullValue(_)) | None => Ok(None),
        Some(other) => {
            let kind = match other {
                Kind::NumberValue(_) => "a number",
                Kind::BoolValue(_) => "a bool",
                Kind::StructValue(_) => "a struct",
                _ => "a list",
            };
            Err(PolicyError::BadTarget {
                target: kind.into(),
                reason: "must be a string holding a SPIFFE ID".into(),
            })
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        self.metrics.csr_count.inc();
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let result = self.handle(request).await;
        let answer = match result {
            Ok((caller, decision, issued, stage)) => {
                self.metrics.success_cert_issuance_count.inc();
                self.pushback.issued();
                tracing::info!(
                    target: "signet_ca::audit",
                    serial = %issued.serial,
                    spiffe_id = %decision.id,
                    public_key_sha256 = %issued.public_key_sha256,
                    not_after = %signet_telemetry::rfc3339(issued.not_after),
                    peer = %peer,
                    method = %caller.method,
                    cluster = %caller.cluster,
                    pod = caller.pod.as_ref().map_or("", |p| p.name.as_str()),
                    caller = %caller.account,
                    node = decision.node.as_deref().unwrap_or(""),
                    "certificate issued"
                );
                // Istio's order: leaf, the signing chain, then the trust bundle.
                let mut cert_chain = Vec::with_capacity(issued.chain.len() + 2);
                cert_chain.push(issued.leaf);
                cert_chain.extend(issued.chain.into_iter().map(|c| c.pem));
                cert_chain.push(issued.roots);
                let mut answer = Response::new(IstioCertificateResponse { cert_chain });
                // Which stage's bundle this is, for signet-agents (others ignore it).
                answer.metadata_mut().insert(
                    trust::TRUST_STAGE,
                    tonic::metadata::MetadataValue::from_static(stage.name()),
                );
                Ok(answer)
            }
            Err(e) => Err(self.refuse(&e, &peer)),
        };
        let code = answer.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics
            .request_latency
            .with_label_values(&[&format!("{code:?}")])
            .observe(started.elapsed().as_secs_f64());
        answer
    }
}

impl CaService {
    /// Counts and logs a refusal and makes its status; one for overload tells the
    /// caller when to come back (`grpc-retry-pushback-ms`), once the CA knows its
    /// rate.
    fn refuse(&self, e: &RequestError, peer: &str) -> Status {
        if let Some(label) = e.sign_error_label() {
            self.metrics
                .csr_sign_err_count
                .with_label_values(&[label])
                .inc();
        }
        match e {
            RequestError::Csr(_) => self.metrics.csr_parsing_err_count.inc(),
            RequestError::Policy(PolicyError::Identity(_) | PolicyError::BadTarget { .. }) => {
                self.metrics.id_extraction_err_count.inc();
            }
            RequestError::Queue(QueueError::Full(_)) => self.metrics.overloaded.inc(),
            RequestError::Queue(QueueError::Share(_)) => self
                .metrics
                .limit_rejections
                .with_label_values(&["caller_share"])
                .inc(),
            RequestError::Authn(AuthnError::Throttled(_)) => self
                .metrics
                .limit_rejections
                .with_label_values(&["token_reviews"])
                .inc(),
            _ => {}
        }
        let mut status = e.status();
        if !e.is_overload() {
            tracing::warn!(peer = %peer, code = ?status.code(), error = %e, "certificate request refused");
            return status;
        }
        // A refusal before authentication books no slot: anonymous callers must not
        // push real callers' retries out. It is still spread (at random, unbooked).
        let retry_in_ms = self
            .pushback
            .stamp(&mut status, e.before_authentication())
            .map(|d| d.as_millis());
        if let Some(refused) = self.overload_log.count() {
            tracing::warn!(peer = %peer, code = ?status.code(), error = %e, refused, retry_in_ms, "certificate requests refused for overload (one line a second at most; `refused` counts them since the last)");
        } else {
            tracing::debug!(peer = %peer, code = ?status.code(), error = %e, retry_in_ms, "certificate request refused");
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_refusals_warn_once_a_second_with_their_count() {
        let log = OverloadLog::new();
        assert_eq!(log.count(), Some(1), "the first refusal is a warning");
        for _ in 0..999 {
            assert_eq!(log.count(), None);
        }
        // A second later the next warning tells the 999 in between and itself.
        log.last_warning_ms.store(0, Ordering::Relaxed);
        let log = OverloadLog {
            started: Instant::now() - Duration::from_millis(1500),
            ..log
        };
        assert_eq!(log.count(), Some(1000));
        assert_eq!(log.count(), None);
    }
}
