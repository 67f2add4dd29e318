//! The CA client: CreateCertificate over TLS to signet-ca or istiod, with the pod's
//! token re-read for every request.

use std::{future::Future, path::Path, pin::Pin, sync::Mutex, time::Duration as StdDuration};

use signet_proto::{
    IstioCertificateRequest, IstioCertificateServiceClient,
    signet_v1::{
        FetchJwtBundleRequest, FetchJwtBundleResponse, MintJwtSvidRequest,
        jwt_svid_service_client::JwtSvidServiceClient,
    },
    trust,
};
use time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use signet_flags::ConfigError;

use crate::identity::catrust::CaTrust;

/// Flags of the CA client (part of `signet-agent run`).
#[derive(Debug, Clone, clap::Args)]
pub struct CaArgs {
    /// Address of the CA (signet-ca or istiod), host:port.
    #[arg(long, env = "CA_ADDR", default_value = "istiod.istio-system.svc:15012", value_parser = host_port)]
    pub ca_addr: String,

    /// PEM bundle to verify the CA's TLS certificate with, or SYSTEM for the
    /// system's roots.
    #[arg(
        long,
        env = "CA_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub ca_root_cert: String,

    /// TLS name to verify the CA as (default: the host of --ca-addr; any host
    /// containing "localhost" becomes istiod.istio-system.svc, as in Istio).
    #[arg(long, env = "ISTIOD_SAN")]
    pub ca_server_name: Option<String>,

    /// Service account token sent to the CA, re-read for every request.
    #[arg(
        long,
        env = "SIGNET_TOKEN_FILE",
        default_value = "./var/run/secrets/tokens/istio-token",
        value_name = "FILE"
    )]
    pub token_file: std::path::PathBuf,

    /// Cluster id sent to the CA in the `clusterid` header.
    #[arg(long, env = "ISTIO_META_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    #[command(flatten)]
    pub compliance: signet_tls::ComplianceArgs,
}

/// A `--ca-addr` that is not `host:port`.
#[derive(Debug, thiserror::Error)]
#[error("{given:?} {why}")]
pub struct HostPortError {
    given: String,
    why: &'static str,
}

/// `host:port`; `https://host:port` (with or without a trailing `/`) is understood as
/// the same, any other scheme or a path is refused with what to write instead.
fn host_port(s: &str) -> Result<String, HostPortError> {
    let refuse = |why| HostPortError {
        given: s.to_owned(),
        why,
    };
    let bare = match s.split_once("://") {
        Some(("https", rest)) => rest.strip_suffix('/').unwrap_or(rest),
        Some(("http", _)) => {
            return Err(refuse(
                "names plain HTTP; the CA is reached over TLS: give host:port (as istiod.istio-system.svc:15012)",
            ));
        }
        Some(_) => {
            return Err(refuse(
                "has a scheme other than https://; give host:port (as istiod.istio-system.svc:15012)",
            ));
        }
        None => s,
    };
    if bare.contains('/') {
        return Err(refuse(
            "has a path; give host:port (as istiod.istio-system.svc:15012)",
        ));
    }
    match bare.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(bare.to_owned())
        }
        _ => Err(refuse(
            "is not host:port; the port is needed (istiod's is 15012)",
        )),
    }
}

/// What the CA client needs.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// host:port.
    pub addr: String,
    /// What the CA's certificate is verified with.
    pub trust: CaTrust,
    /// The name it is verified as.
    pub server_name: String,
    /// The pod's token.
    pub token_file: std::path::PathBuf,
    /// Sent as `clusterid`.
    pub cluster_id: String,
    /// Extra request headers from `CA_HEADER_<NAME>` variables.
    pub headers: std::collections::BTreeMap<String, String>,
    /// Istio's `COMPLIANCE_POLICY`: what the TLS client offers. tonic builds its TLS
    /// from the process's default rustls provider, so `main` installs
    /// [`signet_tls::provider`] of this before the first connection.
    pub compliance_policy: signet_tls::CompliancePolicy,
}

impl CaArgs {
    /// Checks what one flag alone cannot say; `env` is the process environment (for
    /// `CA_HEADER_*`).
    pub fn validate(
        self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<CaConfig, ConfigError> {
        let host = self
            .ca_addr
            .rsplit_once(':')
            .map_or("", |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let server_name = match self.ca_server_name.filter(|s| !s.is_empty()) {
            Some(name) => name,
            None if host.contains("localhost") => "istiod.istio-system.svc".to_owned(),
            None => host.to_owned(),
        };
        if rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
            return Err(ConfigError::new(
                "--ca-server-name",
                format!("{server_name:?} is not a DNS name or IP address"),
            ));
        }
        let trust = if self.ca_root_cert.eq_ignore_ascii_case("SYSTEM") {
            CaTrust::System
        } else if self.ca_root_cert.is_empty() {
            return Err(ConfigError::new(
                "--ca-root-cert",
                "must be a file or SYSTEM",
            ));
        } else {
            CaTrust::File(self.ca_root_cert.into())
        };
        let mut headers = std::collections::BTreeMap::new();
        for (key, value) in env {
            if let Some(name) = key.strip_prefix("CA_HEADER_") {
                let name = name.to_ascii_lowercase().replace('_', "-");
                if http::HeaderName::try_from(name.as_str()).is_err()
                    || http::HeaderValue::try_from(value.as_str()).is_err()
                {
                    return Err(ConfigError::new(
                        "CA_HEADER_*",
                        format!("{key} is not a valid header"),
                    ));
                }
                headers.insert(name, value);
            }
        }
        Ok(CaConfig {
            addr: self.ca_addr,
            trust,
            server_name,
            token_file: self.token_file,
            cluster_id: self.cluster_id,
            headers,
            compliance_policy: self.compliance.compliance_policy,
        })
    }
}

/// Why no answer came back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CaError {
    #[error("service account token {path}: {problem}")]
    Token { path: String, problem: String },
    #[error(transparent)]
    Trust(#[from] crate::identity::catrust::TrustError),
    #[error("cannot reach the CA at {addr}: {problem}")]
    Connect { addr: String, problem: String },
    #[error("the CA refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("the CA is overloaded and asks to retry in {} ms: {code:?}: {message}", retry_in.as_millis())]
    Overloaded {
        code: tonic::Code,
        message: String,
        retry_in: StdDuration,
    },
}

impl CaError {
    /// How long the CA asked this caller to wait before asking again, if it did.
    pub fn retry_in(&self) -> Option<StdDuration> {
        match self {
            Self::Overloaded { retry_in, .. } => Some(*retry_in),
            _ => None,
        }
    }
}

/// The longest retry pushback taken from a CA; a longer one is cut to this.
pub const PUSHBACK_MAX: StdDuration = StdDuration::from_secs(300);
/// The shortest: a CA answering "retry now" (0) cannot make the agent loop on it.
pub const PUSHBACK_MIN: StdDuration = StdDuration::from_millis(250);

/// The CA's retry pushback on a refusal (the `grpc-retry-pushback-ms` trailer of
/// gRFC A6, which signet-ca sends when it refuses for overload): a whole number of
/// milliseconds, taken as at least [`PUSHBACK_MIN`] and at most [`PUSHBACK_MAX`]. `None` when absent or not a number; A6
/// reads that as "do not retry", but an agent must keep asking, so it keeps its own
/// backoff then.
pub fn retry_pushback(status: &tonic::Status) -> Option<StdDuration> {
    let value = status
        .metadata()
        .get("grpc-retry-pushback-ms")?
        .to_str()
        .ok()?;
    if value.is_empty() || value.len() > 12 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ms: u64 = value.parse().ok()?;
    Some(StdDuration::from_millis(ms).clamp(PUSHBACK_MIN, PUSHBACK_MAX))
}

/// A boxed future of a CA answer (the `cert_chain`).
pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<String>, CaError>> + Send + 'a>>;

/// A CA's answer to a CSR, with what it said beside it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The `cert_chain`: leaf, intermediates, then the trust bundle.
    pub chain: Vec<String>,
    /// The stage of signet-ca's trust change the bundle belongs to
    /// (`signet-trust-stage`); `None` when the CA did not say (istiod).
    pub trust_stage: Option<String>,
}

/// A boxed future of an [`Answer`].
pub type AnswerFuture<'a> = Pin<Box<dyn Future<Output = Result<Answer, CaError>> + Send + 'a>>;

/// A boxed future of a JWT answer.
pub type JwtFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, CaError>> + Send + 'a>>;

/// A JWT-SVID as the CA minted it.
#[derive(Clone)]
pub struct MintedJwt {
    /// The compact JWS.
    pub token: String,
    /// Its `sub`.
    pub spiffe_id: String,
    /// Its `exp`, Unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for MintedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedJwt")
            .field("token", &"<redacted>")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Anything that signs CSRs: the real CA, or a fake in tests.
pub trait CaClient: Send + Sync {
    /// Sends one CSR asking for `ttl`.
    fn sign<'a>(&'a self, csr: &'a str, ttl: Duration) -> SignFuture<'a>;

    /// [`Self::sign`], telling the CA the roots served now (SHA-256 of each) and
    /// hearing which stage of its trust change the answer's bundle belongs to.
    fn sign_telling<'a>(
        &'a self,
        csr: &'a str,
        ttl: Duration,
        _served: &'a [[u8; 32]],
    ) -> AnswerFuture<'a> {
        Box::pin(async move {
            Ok(Answer {
                chain: self.sign(csr, ttl).await?,
                trust_stage: None,
            })
        })
    }

    /// Asks for a JWT-SVID for `audiences`, of the CA's default lifetime.
    fn mint_jwt<'a>(&'a self, _audiences: &'a [String]) -> JwtFuture<'a, MintedJwt> {
        Box::pin(async { Err(no_jwt()) })
    }

    /// The CA's JWT bundle.
    fn jwt_bundle(&self) -> JwtFuture<'_, FetchJwtBundleResponse> {
        Box::pin(async { Err(no_jwt()) })
    }
}

fn no_jwt() -> CaError {
    CaError::Refused {
        code: tonic::Code::Unimplemented,
        message: "this CA client does not mint JWT-SVIDs".into(),
    }
}

/// The gRPC client.
#[derive(Debug)]
pub struct GrpcCaClient {
    config: CaConfig,
    /// The channel and a digest of the trust it was built with; rebuilt when the
    /// trust file changes (a rotated CA root, for instance).
    channel: Mutex<Option<(Channel, [u8; 32])>>,
}

impl GrpcCaClient {
    /// A client for `config.addr`; connects on first use.
    pub fn new(config: CaConfig) -> Self {
        Self {
            config,
            channel: Mutex::new(None),
        }
    }

    fn channel(&self) -> Result<Channel, CaError> {
        let (tls, digest) = match self.config.trust.read()? {
            Some(bundle) => (
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(bundle.pem)),
                bundle.digest,
            ),
            None => (ClientTlsConfig::new().with_native_roots(), [0; 32]),
        };
        let mut cached = crate::sync::lock(&self.channel);
        if let Some((channel, d)) = cached.as_ref()
            && *d == digest
        {
            return Ok(channel.clone());
        }
        let addr = &self.config.addr;
        let connect = |problem: String| CaError::Connect {
            addr: addr.clone(),
            problem,
        };
        // tonic builds its client TLS from rustls's process default: it must be the
        // policy's, or the policy would silently not apply.
        let policy = self.config.compliance_policy;
        if !rustls::crypto::CryptoProvider::get_default()
            .is_some_and(|p| signet_tls::follows(policy, p))
        {
            return Err(connect(format!(
                "the process's TLS provider is not what COMPLIANCE_POLICY={policy} allows (install signet_tls::provider as rustls's default first)"
            )));
        }
        let channel = Channel::from_shared(format!("https://{addr}"))
            .map_err(|e| connect(e.to_string()))?
            .tls_config(tls.domain_name(self.config.server_name.clone()))
            .map_err(|e| connect(e.to_string()))?
            .connect_timeout(StdDuration::from_secs(5))
            .timeout(StdDuration::from_secs(15))
            .connect_lazy();
        *cached = Some((channel.clone(), digest));
        Ok(channel)
    }
}

/// Whether a failed call never got an answer from the CA: UNAVAILABLE, or a status
/// tonic made from a transport error (connection refused, TLS failure, reset).
fn is_transport(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        || std::error::Error::source(status)
            .is_some_and(|source| source.is::<tonic::transport::Error>())
}

/// Reads the token file; the kubelet rotates it, so it is read for every request.
pub fn read_token(path: &Path) -> Result<String, CaError> {
    let err = |problem: String| CaError::Token {
        path: path.display().to_string(),
        problem,
    };
    let token = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    if token.len() > 16 * 1024 || token.contains(char::is_whitespace) {
        return Err(err("the file does not hold one token".into()));
    }
    Ok(token.to_owned())
}

impl GrpcCaClient {
    /// `body` with the pod's token, cluster id and extra headers.
    fn authorized<T>(&self, body: T) -> Result<tonic::Request<T>, CaError> {
        let token = read_token(&self.config.token_file)?;
        let mut request = tonic::Request::new(body);
        let md = request.metadata_mut();
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| CaError::Token {
                path: self.config.token_file.display().to_string(),
                problem: "not a valid header value".into(),
            })?;
        md.insert("authorization", bearer);
        if let Ok(v) = self.config.cluster_id.parse() {
            md.insert("clusterid", v);
        }
        for (name, value) in &self.config.headers {
            if let (Ok(k), Ok(v)) = (
                name.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                value.parse(),
            ) {
                md.insert(k, v);
            }
        }
        Ok(request)
    }

    /// A failed call as the agent acts on it.
    fn failed(&self, status: &tonic::Status) -> CaError {
        match retry_pushback(status) {
            Some(retry_in) => CaError::Overloaded {
                code: status.code(),
                message: status.message().to_owned(),
                retry_in,
            },
            None if is_transport(status) => CaError::Connect {
                addr: self.config.addr.clone(),
                problem: status.message().to_owned(),
            },
            None => CaError::Refused {
                code: status.code(),
                message: status.message().to_owned(),
            },
        }
    }
}

impl GrpcCaClient {
    /// One CreateCertificate call, saying the roots `served` when given.
    async fn create(
        &self,
        csr: &str,
        ttl: Duration,
        served: Option<&[[u8; 32]]>,
    ) -> Result<Answer, CaError> {
        let mut request = self.authorized(IstioCertificateRequest {
            csr: csr.to_owned(),
            validity_duration: ttl.whole_seconds(),
            metadata: None,
        })?;
        // More roots than the header may name: not said (the CA then counts this
        // agent by its renewals alone).
        if let Some(served) = served.filter(|s| s.len() <= trust::MAX_ROOTS)
            && let Ok(value) = trust::encode_roots(served).parse()
        {
            request.metadata_mut().insert(trust::SERVED_ROOTS, value);
        }
        let mut client = IstioCertificateServiceClient::new(self.channel()?);
        match client.create_certificate(request).await {
            Ok(answer) => Ok(Answer {
                trust_stage: answer
                    .metadata()
                    .get(trust::TRUST_STAGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(stage_name)
                    .map(str::to_owned),
                chain: answer.into_inner().cert_chain,
            }),
            Err(status) => Err(self.failed(&status)),
        }
    }
}

/// A stage name as signet-ca sends it: a short lowercase word; anything else is not
/// shown.
fn stage_name(value: &str) -> Option<&str> {
    (!value.is_empty() && value.len() <= 16 && value.bytes().all(|b| b.is_ascii_lowercase()))
        .then_some(value)
}

impl CaClient for GrpcCaClient {
    fn sign<'a>(&'a self, csr: &'a str, ttl: Duration) -> SignFuture<'a> {
        Box::pin(async move { Ok(self.create(csr, ttl, None).await?.chain) })
    }

    fn sign_telling<'a>(
        &'a self,
        csr: &'a str,
        ttl: Duration,
        served: &'a [[u8; 32]],
    ) -> AnswerFuture<'a> {
        Box::pin(self.create(csr, ttl, Some(served)))
    }

    fn mint_jwt<'a>(&'a self, audiences: &'a [String]) -> JwtFuture<'a, MintedJwt> {
        Box::pin(async move {
            let request = self.authorized(MintJwtSvidRequest {
                audience: audiences.to_vec(),
                ttl_seconds: 0,
            })?;
            let mut client = JwtSvidServiceClient::new(self.channel()?);
            match client.mint_jwt_svid(request).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    Ok(MintedJwt {
                        token: answer.token,
                        spiffe_id: answer.spiffe_id,
                        expires_at: answer.expires_at,
                    })
                }
                Err(status) => Err(self.failed(&status)),
            }
        })
    }

    fn jwt_bundle(&self) -> JwtFuture<'_, FetchJwtBundleResponse> {
        Box::pin(async move {
            let mut client = JwtSvidServiceClient::new(self.channel()?);
            match client.fetch_jwt_bundle(FetchJwtBundleRequest {}).await {
                Ok(answer) => Ok(answer.into_inner()),
                Err(status) => Err(self.failed(&status)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(pushback: Option<&str>) -> tonic::Status {
        let mut status = tonic::Status::resource_exhausted("the signing queue is full");
        if let Some(v) = pushback {
            status
                .metadata_mut()
                .insert("grpc-retry-pushback-ms", v.parse().unwrap());
        }
        status
    }

    #[test]
    fn retry_pushback_is_whole_milliseconds_between_a_quarter_second_and_five_minutes() {
        let ms = StdDuration::from_millis;
        assert_eq!(retry_pushback(&refusal(Some("1500"))), Some(ms(1500)));
        assert_eq!(retry_pushback(&refusal(Some("0"))), Some(PUSHBACK_MIN));
        assert_eq!(
            retry_pushback(&refusal(Some("86400000"))),
            Some(PUSHBACK_MAX)
        );
        // Absent, negative (A6's "do not retry"), fractional, signed, too long or
        // not a number: the agent's own backoff.
        for bad in [
            None,
            Some("-1"),
            Some("1.5"),
            Some("+5"),
            Some(""),
            Some("1 "),
            Some("99999999999999"),
            Some("soon"),
        ] {
            assert_eq!(retry_pushback(&refusal(bad)), None, "{bad:?}");
        }
    }
}
