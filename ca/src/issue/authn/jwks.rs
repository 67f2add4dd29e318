//! The keys that check service account tokens offline: the cluster's JWKS, from a
//! file, an https URL or the API server (`/openid/v1/jwks`), parsed once per fetch.
//! Asymmetric keys only; a document over a megabyte, a non-https URL or redirect,
//! or a slow answer is refused.

use std::{path::PathBuf, sync::Arc, time::Duration};

use jsonwebtoken::{
    DecodingKey,
    jwk::{AlgorithmParameters, JwkSet},
};
use rustls_pki_types::{CertificateDer, pem::PemObject};

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Redirects followed when fetching a JWKS URL (https only).
const MAX_REDIRECTS: usize = 5;

/// Where the JWKS comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwksSource {
    /// A JSON file (a mounted ConfigMap, say).
    File(PathBuf),
    /// An https URL, verified against `ca` or the system's roots.
    Url {
        /// The URL.
        url: String,
        /// PEM bundle to verify the server with, instead of the system roots.
        ca: Option<PathBuf>,
    },
    /// A path on the Kubernetes API server (`/openid/v1/jwks`), fetched with the
    /// credentials of a kubeconfig or of the pod's service account.
    ApiServer {
        /// The path.
        path: String,
        /// How the API server is reached.
        access: crate::kubernetes::client::ApiAccess,
    },
}

/// Why a JWKS could not be had: at start-up (which then fails) or on a refresh (the
/// keys already loaded stay until `--jwks-max-age`).
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The bytes are not a JWKS document.
    #[error("not a JWKS document: {0}")]
    Document(#[source] serde_json::Error),
    /// Only symmetric keys, unusable ones, or none.
    #[error("the JWKS holds no usable RSA or EC public key")]
    NoKeys,
    /// A URL that is not https.
    #[error("JWKS URL {0:?} must be https")]
    NotHttps(String),
    /// The JWKS file could not be read.
    #[error("JWKS file {0}")]
    File(#[source] signet_fs::ReadError),
    /// The blocking task reading it failed.
    #[error("JWKS file: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The request failed (with the chain of causes).
    #[error("JWKS {url}: {detail}")]
    Request { url: String, detail: String },
    /// The server answered with an error status.
    #[error("JWKS {url}: HTTP {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    /// Larger than [`MAX_JWKS_BYTES`].
    #[error("JWKS {0}: over the {MAX_JWKS_BYTES}-byte limit")]
    TooLarge(String),
    /// No complete answer in time.
    #[error("JWKS {0}: no complete answer within 10s")]
    Timeout(String),
    /// The API server's JWKS could not be fetched.
    #[error("JWKS {path} (API server): {detail}")]
    ApiServer { path: String, detail: String },
    /// `--jwks-ca` is unusable.
    #[error("JWKS CA file {path}: {detail}")]
    CaFile { path: String, detail: String },
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(String),
}

/// A parsed JWKS: its asymmetric keys, each decoded once (when the set loads, not at
/// every token).
#[derive(Clone)]
pub struct Jwks(Vec<JwksKey>);

#[derive(Clone)]
struct JwksKey {
    kid: Option<String>,
    key: DecodingKey,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|k| k.kid.as_deref().unwrap_or("")))
            .finish()
    }
}

impl Jwks {
    /// The keys a token with key id `kid` may be signed by: the one of that id, or
    /// all of them when the token names none.
    pub(super) fn candidates(&self, kid: Option<&str>) -> Vec<&DecodingKey> {
        match kid {
            Some(kid) => self
                .0
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .map(|k| &k.key)
                .into_iter()
                .collect(),
            None => self.0.iter().map(|k| &k.key).collect(),
        }
    }

    /// Parses a JWKS document; fails when it holds no usable asymmetric key.
    pub fn parse(bytes: &[u8]) -> Result<Self, JwksError> {
        let set: JwkSet = serde_json::from_slice(bytes).map_err(JwksError::Document)?;
        let keys: Vec<JwksKey> = set
            .keys
            .iter()
            .filter(|k| !matches!(k.algorithm, AlgorithmParameters::OctetKey(_)))
            .filter_map(|jwk| {
                Some(JwksKey {
                    kid: jwk.common.key_id.clone(),
                    key: DecodingKey::from_jwk(jwk).ok()?,
                })
            })
            .collect();
        if keys.is_empty() {
            return Err(JwksError::NoKeys);
        }
        Ok(Self(keys))
    }
}

/// Fetches one source's JWKS, with the client it needs made once.
pub(super) struct KeySource {
    source: JwksSource,
    client: Client,
}

/// What fetches the JWKS.
enum Client {
    File,
    Http(reqwest::Client),
    Kube(kube::Client),
}

impl KeySource {
    /// What `serve --check-config` can know of `source` without contacting anything:
    /// a file is read and parsed; for a URL or the API server the client is made
    /// (its CA file read, its kubeconfig parsed), nothing is fetched.
    pub(super) async fn check(source: JwksSource) -> Result<String, JwksError> {
        let keys = Self::new(source).await?;
        Ok(match &keys.source {
            JwksSource::File(path) => {
                let jwks = fetch(&keys.source, &keys.client).await?;
                format!(
                    "JWKS file {}: {} usable key(s)",
                    path.display(),
                    jwks.0.len()
                )
            }
            JwksSource::Url { url, .. } => format!("JWKS {url}: fetched at start"),
            JwksSource::ApiServer { path, .. } => {
                format!("JWKS {path} on the API server: fetched at start")
            }
        })
    }

    /// The client for `source`; refused when it cannot be made (a non-https URL, an
    /// unusable CA file, no API access).
    pub(super) async fn new(source: JwksSource) -> Result<Self, JwksError> {
        let client = match &source {
            JwksSource::File(_) => Client::File,
            JwksSource::Url { url, ca } => {
                if !url.starts_with("https://") {
                    return Err(JwksError::NotHttps(url.clone()));
                }
                Client::Http(http_client(ca.as_deref())?)
            }
            JwksSource::ApiServer { access, path } => Client::Kube(
                crate::kubernetes::client::client(access, crate::kubernetes::client::Retries::Kube)
                    .await
                    .map_err(|e| JwksError::ApiServer {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?,
            ),
        };
        Ok(Self { source, client })
    }

    /// Fetches and parses the JWKS.
    pub(super) async fn fetch(&self) -> Result<Jwks, JwksError> {
        fetch(&self.source, &self.client).await
    }
}

/// An error and its sources, one line: reqwest's own message leaves out why.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

async fn fetch(source: &JwksSource, client: &Client) -> Result<Jwks, JwksError> {
    let too_big = |url: &str| JwksError::TooLarge(url.to_owned());
    let bytes = match (source, client) {
        (JwksSource::File(path), _) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                signet_fs::read_resolved(&path, MAX_JWKS_BYTES as u64).map_err(JwksError::File)
            })
            .await
            .map_err(JwksError::Task)??
        }
        (JwksSource::Url { url, .. }, Client::Http(client)) => {
            let fetch = async {
                let mut response =
                    client
                        .get(url)
                        .send()
                        .await
                        .map_err(|e| JwksError::Request {
                            url: url.clone(),
                            detail: with_sources(&e),
                        })?;
                if !response.status().is_success() {
                    return Err(JwksError::Status {
                        url: url.clone(),
                        status: response.status(),
                    });
                }
                if response
                    .content_length()
                    .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
                {
                    return Err(too_big(url));
                }
                // Read chunk by chunk: a server that lies about its length, or sends
                // none, still cannot make us hold more than the limit.
                let mut body = Vec::new();
                while let Some(chunk) = response.chunk().await.map_err(|e| JwksError::Request {
                    url: url.clone(),
                    detail: with_sources(&e),
                })? {
                    if body.len() + chunk.len() > MAX_JWKS_BYTES {
                        return Err(too_big(url));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(body)
            };
            tokio::time::timeout(Duration::from_secs(10), fetch)
                .await
                .map_err(|_| JwksError::Timeout(url.clone()))??
        }
        (JwksSource::ApiServer { path, .. }, Client::Kube(client)) => {
            let api_error = |detail: String| JwksError::ApiServer {
                path: path.clone(),
                detail,
            };
            let request = http::Request::get(path.as_str())
                .body(Vec::new())
                .map_err(|e| api_error(e.to_string()))?;
            let body = tokio::time::timeout(Duration::from_secs(10), client.request_text(request))
                .await
                .map_err(|_| api_error("no complete answer within 10s".into()))?
                .map_err(|e| api_error(e.to_string()))?;
            if body.len() > MAX_JWKS_BYTES {
                return Err(too_big(path));
            }
            body.into_bytes()
        }
        (source, _) => {
            return Err(JwksError::Client(format!(
                "no client for the JWKS source {source:?}"
            )));
        }
    };
    Jwks::parse(&bytes)
}

fn http_client(ca: Option<&std::path::Path>) -> Result<reqwest::Client, JwksError> {
    let ca_error = |path: &std::path::Path, detail: String| JwksError::CaFile {
        path: path.display().to_string(),
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| ca_error(path, e.to_string()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ca_error(path, "holds no usable certificate".into()));
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| JwksError::Client(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Redirects stay on https (a JWKS must never come over plain HTTP), and few.
    let redirects = reqwest::redirect::Policy::custom(|attempt| {
        if attempt.url().scheme() != "https" {
            attempt.error("the JWKS server redirected to a non-https URL")
        } else if attempt.previous().len() >= MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(redirects)
        .build()
        .map_err(|e| JwksError::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_without_a_usable_key_is_refused() {
        let only_secret = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"a"}]}"#;
        assert!(matches!(
            Jwks::parse(only_secret.as_bytes()),
            Err(JwksError::NoKeys)
        ));
        // A modulus that is not base64url: the key cannot be used, nor the set.
        let broken = r#"{"keys":[{"kty":"RSA","n":"!!!","e":"AQAB","kid":"b"}]}"#;
        assert!(matches!(
            Jwks::parse(broken.as_bytes()),
            Err(JwksError::NoKeys)
        ));
    }
}
