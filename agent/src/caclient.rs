//! The CA client: CreateCertificate over TLS to signet-ca or istiod, with the pod's
//! token re-read for every request.

use std::{
    future::Future,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration as StdDuration,
};

use signet_proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::config::RunConfig;

/// Why no answer came back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CaError {
    #[error("service account token {path}: {problem}")]
    Token { path: String, problem: String },
    #[error(transparent)]
    Trust(#[from] crate::catrust::TrustError),
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

/// Anything that signs CSRs: the real CA, or a fake in tests.
pub trait CaClient: Send + Sync {
    /// Sends one CSR asking for `ttl`.
    fn sign<'a>(&'a self, csr: &'a str, ttl: Duration) -> SignFuture<'a>;
}

/// The gRPC client.
#[derive(Debug)]
pub struct GrpcCaClient {
    config: Arc<RunConfig>,
    /// The channel and a digest of the trust it was built with; rebuilt when the
    /// trust file changes (a rotated CA root, for instance).
    channel: Mutex<Option<(Channel, [u8; 32])>>,
}

impl GrpcCaClient {
    /// A client for `config.ca_addr`; connects on first use.
    pub fn new(config: Arc<RunConfig>) -> Self {
        Self {
            config,
            channel: Mutex::new(None),
        }
    }

    fn channel(&self) -> Result<Channel, CaError> {
        let (tls, digest) = match self.config.ca_trust.read()? {
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
        let addr = &self.config.ca_addr;
        let connect = |problem: String| CaError::Connect {
            addr: addr.clone(),
            problem,
        };
        let channel = Channel::from_shared(format!("https://{addr}"))
            .map_err(|e| connect(e.to_string()))?
            .tls_config(tls.domain_name(self.config.ca_server_name.clone()))
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

impl CaClient for GrpcCaClient {
    fn sign<'a>(&'a self, csr: &'a str, ttl: Duration) -> SignFuture<'a> {
        Box::pin(async move {
            let token = read_token(&self.config.token_file)?;
            let mut client = IstioCertificateServiceClient::new(self.channel()?);
            let mut request = tonic::Request::new(IstioCertificateRequest {
                csr: csr.to_owned(),
                validity_duration: ttl.whole_seconds(),
                metadata: None,
            });
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
            for (name, value) in &self.config.ca_headers {
                if let (Ok(k), Ok(v)) = (
                    name.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                    value.parse(),
                ) {
                    md.insert(k, v);
                }
            }
            match client.create_certificate(request).await {
                Ok(answer) => Ok(answer.into_inner().cert_chain),
                Err(status) => Err(match retry_pushback(&status) {
                    Some(retry_in) => CaError::Overloaded {
                        code: status.code(),
                        message: status.message().to_owned(),
                        retry_in,
                    },
                    None if is_transport(&status) => CaError::Connect {
                        addr: self.config.ca_addr.clone(),
                        problem: status.message().to_owned(),
                    },
                    None => CaError::Refused {
                        code: status.code(),
                        message: status.message().to_owned(),
                    },
                }),
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
