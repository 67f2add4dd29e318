//! `signet.v1.JwtSvidService`: JWT-SVIDs for the caller, authenticated exactly as
//! for CreateCertificate (token or client certificate, the same review slots), then
//! checked (audiences, lifetime), then signed on the signing queue under the caller's
//! share with the key set's active key. One audit line per token, without the token.

pub mod flags;

use std::{sync::Arc, time::Duration};

use signet_proto::signet_v1::{
    FetchJwtBundleRequest, FetchJwtBundleResponse, MintJwtSvidRequest, MintJwtSvidResponse,
    jwt_svid_service_server::JwtSvidService,
};
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{
    issue::authn::{Authenticator, AuthnError},
    issue::pushback::Pushback,
    issue::queue::{QueueError, SigningQueue},
    issue::service::authenticate,
    keys::jwt::{JwtKeyError, JwtKeys, Minted},
    keys::tls::TlsState,
    metrics::Metrics,
};

/// Most audiences in one token.
pub const MAX_AUDIENCES: usize = 16;
/// Longest audience, in bytes.
pub const MAX_AUDIENCE_BYTES: usize = 256;
/// Largest request message (audiences and a number).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// What the service needs beyond the request path's parts.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// Lifetime when none is asked.
    pub default_ttl: Duration,
    /// Longest lifetime; longer requests are refused.
    pub max_ttl: Duration,
    /// `iss`, when set.
    pub issuer: Option<String>,
    /// The trust domain of `sub`.
    pub trust_domain: spiffe::TrustDomain,
    /// How often holders of the bundle should fetch it again.
    pub refresh_hint: Duration,
}

/// Why a JWT-SVID request was refused.
#[derive(Debug, thiserror::Error)]
enum MintError {
    #[error(transparent)]
    Authn(#[from] AuthnError),
    #[error("{0}")]
    Request(String),
    #[error("the caller has no SPIFFE ID: {0}")]
    Identity(String),
    #[error("no JWT signing key is loaded yet; retry shortly")]
    NoKeys,
    #[error(transparent)]
    Keys(#[from] JwtKeyError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl MintError {
    fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            Self::Authn(AuthnError::Unauthenticated(_)) => Status::unauthenticated(message),
            Self::Authn(_) | Self::NoKeys | Self::Keys(JwtKeyError::NoActiveKey) => {
                Status::unavailable(message)
            }
            Self::Request(_) => Status::invalid_argument(message),
            Self::Identity(_) => Status::failed_precondition(message),
            Self::Queue(QueueError::Full(_) | QueueError::Share(_)) => {
                Status::resource_exhausted(message)
            }
            Self::Keys(_) | Self::Queue(QueueError::Failed(_)) => Status::internal(message),
        }
    }
}

/// The JWT-SVID service.
#[derive(Debug, Clone)]
pub(crate) struct JwtService {
    keys: watch::Receiver<Option<Arc<JwtKeys>>>,
    tls: Arc<TlsState>,
    authn: Arc<Authenticator>,
    queue: SigningQueue,
    metrics: Metrics,
    settings: Arc<JwtSettings>,
    /// When a caller refused for overload should come back (`grpc-retry-pushback-ms`);
    /// the CreateCertificate service's, as both share the signing queue.
    pushback: Arc<Pushback>,
}

impl JwtService {
    pub(crate) fn new(
        keys: watch::Receiver<Option<Arc<JwtKeys>>>,
        tls: Arc<TlsState>,
        authn: Arc<Authenticator>,
        queue: SigningQueue,
        metrics: Metrics,
        settings: JwtSettings,
    ) -> Self {
        Self {
            keys,
            tls,
            authn,
            queue,
            metrics,
            settings: Arc::new(settings),
            pushback: Arc::new(Pushback::default()),
        }
    }

    /// Books overload refusals in `pushback` (the CreateCertificate service's).
    pub(crate) fn with_pushback(mut self, pushback: Arc<Pushback>) -> Self {
        self.pushback = pushback;
        self
    }
}

/// The audiences as asked, checked: at least one, at most [`MAX_AUDIENCES`], each
/// non-empty printable text of at most [`MAX_AUDIENCE_BYTES`]. Nothing of a refused
/// value is echoed but its position and length.
fn check_audiences(audiences: &[String]) -> Result<(), String> {
    if audiences.is_empty() {
        return Err("audience is required: name at least one relying party".into());
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(format!(
            "{} audiences asked; at most {MAX_AUDIENCES}",
            audiences.len()
        ));
    }
    for (i, aud) in audiences.iter().enumerate() {
        if aud.is_empty() {
            return Err(format!("audience {i} is empty"));
        }
        if aud.len() > MAX_AUDIENCE_BYTES {
            return Err(format!(
                "audience {i} is {} bytes; at most {MAX_AUDIENCE_BYTES}",
                aud.len()
            ));
        }
        if aud.chars().any(char::is_control) {
            return Err(format!("audience {i} holds control characters"));
        }
    }
    Ok(())
}

/// The lifetime to mint: the default for 0; refused when negative or past `max`.
fn lifetime(asked_secs: i64, default: Duration, max: Duration) -> Result<Duration, String> {
    match u64::try_from(asked_secs) {
        Ok(0) => Ok(default),
        Ok(secs) if secs <= max.as_secs() => Ok(Duration::from_secs(secs)),
        Ok(secs) => Err(format!(
            "ttl_seconds {secs} is past the CA's maximum of {} s (--jwt-svid-max-ttl)",
            max.as_secs()
        )),
        Err(_) => Err(format!("ttl_seconds {asked_secs} is negative")),
    }
}

impl JwtService {
    async fn mint(
        &self,
        request: Request<MintJwtSvidRequest>,
        peer: &str,
    ) -> Result<MintJwtSvidResponse, MintError> {
        let caller = authenticate(&request, &self.tls, &self.authn)
            .await
            .inspect_err(|_| self.metrics.authentication_failure_count.inc())?;
        let body = request.into_inner();
        check_audiences(&body.audience).map_err(MintError::Request)?;
        let ttl = lifetime(
            body.ttl_seconds,
            self.settings.default_ttl,
            self.settings.max_ttl,
        )
        .map_err(MintError::Request)?;
        let id = caller
            .account
            .spiffe_id(&self.settings.trust_domain)
            .map_err(|e| MintError::Identity(e.to_string()))?;
        let keys = self.keys.borrow().clone().ok_or(MintError::NoKeys)?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let exp = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        let mut claims = serde_json::json!({
            "sub": id.to_string(),
            "aud": body.audience,
            "exp": exp,
            "iat": now,
        });
        if let Some(iss) = &self.settings.issuer {
            claims["iss"] = iss.clone().into();
        }
        // A share of its own beside the caller's certificate share: a workload minting
        // tokens in a loop cannot hold back its pods' certificate renewals.
        let share = format!("{}#jwt", caller.account);
        let minted: Minted = self
            .queue
            .run_as(&share, move || keys.sign(&claims, now))
            .await??;
        self.metrics.jwt_svids_issued.inc();
        self.pushback.issued();
        tracing::info!(
            target: "signet_ca::audit",
            spiffe_id = %id,
            audience = ?body.audience,
            kid = %minted.kid,
            expires_at = %signet_telemetry::rfc3339(
                OffsetDateTime::from_unix_timestamp(exp).unwrap_or(OffsetDateTime::UNIX_EPOCH)
            ),
            peer = %peer,
            method = %caller.method,
            cluster = %caller.cluster,
            pod = caller.pod.as_ref().map_or("", |p| p.name.as_str()),
            "jwt-svid issued"
        );
        Ok(MintJwtSvidResponse {
            token: minted.token,
            spiffe_id: id.to_string(),
            expires_at: exp,
        })
    }
}

#[tonic::async_trait]
impl JwtSvidService for JwtService {
    async fn mint_jwt_svid(
        &self,
        request: Request<MintJwtSvidRequest>,
    ) -> Result<Response<MintJwtSvidResponse>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        match self.mint(request, &peer).await {
            Ok(answer) => Ok(Response::new(answer)),
            Err(e) => {
                let status = e.status();
                self.metrics
                    .jwt_svid_refusals
                    .with_label_values(&[&format!("{:?}", status.code())])
                    .inc();
                let mut status = status;
                let overload = match &e {
                    MintError::Queue(QueueError::Full(_) | QueueError::Share(_)) => Some(false),
                    MintError::Authn(AuthnError::Throttled(_)) => Some(true),
                    _ => None,
                };
                // Overload: when to come back, as for certificates (a refusal before
                // authentication books no slot).
                if let Some(before_authentication) = overload {
                    self.pushback.stamp(&mut status, before_authentication);
                }
                if overload.is_some() {
                    // Overload comes in storms; the metric counts every refusal.
                    tracing::debug!(peer = %peer, code = ?status.code(), error = %e, "JWT-SVID request refused");
                } else {
                    tracing::warn!(peer = %peer, code = ?status.code(), error = %e, "JWT-SVID request refused");
                }
                Err(status)
            }
        }
    }

    async fn fetch_jwt_bundle(
        &self,
        _request: Request<FetchJwtBundleRequest>,
    ) -> Result<Response<FetchJwtBundleResponse>, Status> {
        let keys = self.keys.borrow().clone();
        let keys = keys.ok_or_else(|| MintError::NoKeys.status())?;
        Ok(Response::new(FetchJwtBundleResponse {
            trust_domain: self.settings.trust_domain.to_string(),
            jwks: keys.jwks().to_vec(),
            refresh_hint_seconds: i64::try_from(self.settings.refresh_hint.as_secs())
                .unwrap_or(i64::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_are_bounded_in_count_length_and_characters() {
        assert!(check_audiences(&["minio".into()]).is_ok());
        assert!(check_audiences(&[]).unwrap_err().contains("required"));
        let many: Vec<String> = (0..=MAX_AUDIENCES).map(|i| i.to_string()).collect();
        assert!(check_audiences(&many).unwrap_err().contains("at most 16"));
        let long = "a".repeat(MAX_AUDIENCE_BYTES + 1);
        let e = check_audiences(&["ok".into(), long.clone()]).unwrap_err();
        assert!(e.contains("audience 1") && !e.contains(&long), "{e}");
        assert!(check_audiences(&[String::new()]).is_err());
        assert!(check_audiences(&["a\nb".into()]).is_err());
    }

    #[test]
    fn lifetimes_default_and_are_refused_past_the_maximum() {
        let (d, m) = (Duration::from_secs(300), Duration::from_secs(3600));
        assert_eq!(lifetime(0, d, m).unwrap(), d);
        assert_eq!(lifetime(60, d, m).unwrap(), Duration::from_secs(60));
        assert_eq!(lifetime(3600, d, m).unwrap(), m);
        assert!(
            lifetime(3601, d, m)
                .unwrap_err()
                .contains("--jwt-svid-max-ttl")
        );
        assert!(lifetime(-1, d, m).unwrap_err().contains("negative"));
    }
}
