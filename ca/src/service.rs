//! `istio.v1.auth.IstioCertificateService`: authenticate, check the CSR, sign, answer.
//! Errors become gRPC statuses here and nowhere else.

use std::{sync::Arc, time::Instant};

use rustls::pki_types::UnixTime;
use signet_proto::{IstioCertificateRequest, IstioCertificateResponse, IstioCertificateService};
use spiffe::TrustDomain;
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};

use crate::{
    authn::{Authenticator, AuthnError, Caller, ClientCert, Token},
    csr::{self, CsrError},
    metrics::Metrics,
    queue::{QueueError, SigningQueue},
    signer::{self, Issued, SignError, Signer},
    tls::TlsState,
};

/// Largest request message accepted (a CSR is about 1 KiB).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Lifetime policy and trust domains for issued certificates.
#[derive(Debug, Clone)]
pub struct IssuePolicy {
    /// The trust domain certificates are issued in.
    pub trust_domain: TrustDomain,
    /// Aliases a CSR's URI SAN may name instead.
    pub trust_domain_aliases: Vec<String>,
    /// Lifetime when none is requested.
    pub default_ttl: Duration,
    /// Upper bound on lifetimes.
    pub max_ttl: Duration,
}

/// The CreateCertificate service.
#[derive(Debug, Clone)]
pub struct CaService {
    signer: watch::Receiver<Arc<Signer>>,
    tls: Arc<TlsState>,
    authn: Arc<Authenticator>,
    queue: SigningQueue,
    metrics: Metrics,
    policy: Arc<IssuePolicy>,
}

#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(transparent)]
    Authn(#[from] AuthnError),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("the CSR asks for {claimed:?}, but the caller is authenticated as {caller}")]
    Identity {
        claimed: Vec<String>,
        caller: String,
    },
    #[error("{0}")]
    Impersonation(String),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl RequestError {
    fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            Self::Authn(AuthnError::Unauthenticated(_)) => Status::unauthenticated(message),
            Self::Authn(AuthnError::Unavailable(_) | AuthnError::Throttled(_)) => {
                Status::unavailable(message)
            }
            Self::Csr(_) | Self::Sign(SignError::PublicKey(_)) => Status::invalid_argument(message),
            Self::Identity { .. } | Self::Impersonation(_) => Status::permission_denied(message),
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
            Self::Authn(_) | Self::Impersonation(_) => None,
            Self::Csr(_) | Self::Identity { .. } | Self::Sign(SignError::PublicKey(_)) => {
                Some("CSR_ERROR")
            }
            Self::Sign(SignError::Expired(_)) => Some("CA_NOT_READY"),
            Self::Sign(_) | Self::Queue(QueueError::Failed(_)) => Some("CERT_GEN_ERROR"),
            Self::Queue(QueueError::Full(_) | QueueError::Share(_)) => Some("OVERLOADED"),
        }
    }
}

impl CaService {
    /// A service signing with whatever signer `signer` holds at each request.
    pub fn new(
        signer: watch::Receiver<Arc<Signer>>,
        tls: Arc<TlsState>,
        authn: Arc<Authenticator>,
        queue: SigningQueue,
        metrics: Metrics,
        policy: IssuePolicy,
    ) -> Self {
        Self {
            signer,
            tls,
            authn,
            queue,
            metrics,
            policy: Arc::new(policy),
        }
    }

    async fn handle(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<(Caller, Issued), RequestError> {
        let metadata = request.metadata();
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(Token::from_header);
        let cluster_id = metadata
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let peer_certs = request.peer_certs();
        let refusal;
        let client_cert = match peer_certs.as_deref().map(Vec::as_slice) {
            None | Some([]) => ClientCert::Absent,
            Some(chain) => match self.tls.reverify_client(chain, UnixTime::now()) {
                Ok(()) => ClientCert::Verified(chain),
                Err(e) => {
                    refusal = e.to_string();
                    ClientCert::Refused(&refusal)
                }
            },
        };
        let caller = self
            .authn
            .authenticate(client_cert, token.as_ref(), &cluster_id)
            .await
            .inspect_err(|_| self.metrics.authentication_failure_count.inc())?;

        let body = request.into_inner();
        if let Some(target) = impersonation_target(&body) {
            return Err(RequestError::Impersonation(format!(
                "{} asked to act for {target:?}, but node impersonation is not enabled on this CA",
                caller.account
            )));
        }
        let lifetime = signer::lifetime(
            body.validity_duration,
            self.policy.default_ttl,
            self.policy.max_ttl,
        );
        let id = caller
            .account
            .spiffe_id(&self.policy.trust_domain)
            .map_err(|e| RequestError::Csr(CsrError::Key(e.to_string())))?;
        let signer = self.signer.borrow().clone();
        let policy = self.policy.clone();
        let share = caller.account.to_string();
        let issued = self
            .queue
            .run_as(&share, move || -> Result<Issued, RequestError> {
                let checked = csr::check(&body.csr)?;
                let mut domains = vec![policy.trust_domain.as_str()];
                domains.extend(policy.trust_domain_aliases.iter().map(String::as_str));
                let foreign = checked.foreign_sans(&id, &domains);
                if !foreign.is_empty() {
                    return Err(RequestError::Identity {
                        claimed: foreign,
                        caller: id.to_string(),
                    });
                }
                Ok(signer.sign(&checked.spki, &id, lifetime, OffsetDateTime::now_utc())?)
            })
            .await??;
        Ok((caller, issued))
    }
}

/// The `ImpersonatedIdentity` metadata value, when a non-empty one was sent.
fn impersonation_target(body: &IstioCertificateRequest) -> Option<String> {
    let value = body.metadata.as_ref()?.fields.get("ImpersonatedIdentity")?;
    match &value.kind {
        Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
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
        let code = match &result {
            Ok((caller, issued)) => {
                self.metrics.success_cert_issuance_count.inc();
                tracing::info!(
                    target: "signet_ca::audit",
                    serial = %issued.serial,
                    spiffe_id = %caller.account.spiffe_id(&self.policy.trust_domain).map(|i| i.to_string()).unwrap_or_default(),
                    public_key_sha256 = %issued.public_key_sha256,
                    not_after = %issued
                        .not_after
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                    peer = %peer,
                    method = %caller.method,
                    cluster = %caller.cluster,
                    pod = caller.pod.as_deref().unwrap_or(""),
                    "certificate issued"
                );
                Code::Ok
            }
            Err(e) => {
                if let Some(label) = e.sign_error_label() {
                    self.metrics
                        .csr_sign_err_count
                        .with_label_values(&[label])
                        .inc();
                }
                match e {
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
                let status = e.status();
                tracing::warn!(peer = %peer, code = ?status.code(), error = %e, "certificate request refused");
                status.code()
            }
        };
        self.metrics
            .request_latency
            .with_label_values(&[&format!("{code:?}")])
            .observe(started.elapsed().as_secs_f64());
        result
            .map(|(_, issued)| {
                Response::new(IstioCertificateResponse {
                    cert_chain: issued.cert_chain,
                })
            })
            .map_err(|e| e.status())
    }
}
