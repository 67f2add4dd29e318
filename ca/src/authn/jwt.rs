//! Offline verification of Kubernetes service account tokens against the cluster's
//! JWKS (`/openid/v1/jwks` of the API server, or a file). Asymmetric algorithms only.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, JwkSet},
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{PodRef, ReviewError, Reviewed, Token};
use signet_spiffe::ServiceAccount;

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: i64 = 30;
/// A refresh is started at most this often (or every refresh interval, if shorter).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How long a token with an unknown `kid` waits for the refresh it started.
const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(3);
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
    /// credentials of a kubeconfig or, when `None`, of the pod's service account.
    ApiServer {
        /// The path.
        path: String,
        /// The kubeconfig; `None` for the in-cluster configuration.
        kubeconfig: Option<PathBuf>,
    },
}

/// What fetches the JWKS.
enum Fetcher {
    File,
    Http(reqwest::Client),
    Kube(kube::Client),
}

/// Offline JWT settings for one cluster.
#[derive(Clone, Debug)]
pub struct JwtConfig {
    /// Required `iss`.
    pub issuer: String,
    /// Accepted `aud` values (any one of them).
    pub audiences: Vec<String>,
    /// The JWKS.
    pub source: JwksSource,
    /// Keys older than this are refreshed in the background.
    pub refresh_interval: time::Duration,
    /// Keys that could not be refreshed for this long are no longer trusted.
    pub max_age: time::Duration,
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

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    nbf: Option<i64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    serviceaccount: Option<Named>,
    pod: Option<NamedUid>,
}

#[derive(Deserialize)]
struct NamedUid {
    name: String,
    uid: Option<String>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

/// Verifies tokens against one issuer's JWKS.
///
/// Verification never waits for a fetch: keys older than the refresh interval (five
/// minutes by default) are refreshed in the background while the current ones keep
/// verifying. Only a token whose `kid`
/// is unknown waits, briefly, for the refresh it triggers. Keys that could not be
/// refreshed for [`JwtConfig::max_age`] stop being trusted (fail closed).
#[derive(Clone)]
pub struct JwtAuthenticator(Arc<Inner>);

struct Inner {
    config: JwtConfig,
    fetcher: Fetcher,
    /// The keys and when they were last fetched successfully.
    keys: RwLock<(Arc<Jwks>, Instant)>,
    /// When a refresh was last started (rate limit).
    last_attempt: Mutex<Option<Instant>>,
    /// A refresh is running.
    refreshing: AtomicBool,
    /// Ticks when a refresh ends, whatever its outcome.
    refreshed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field("config", &self.0.config)
            .finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Loads the JWKS once; start-up fails when it cannot be had.
    pub async fn new(config: JwtConfig) -> Result<Self, JwksError> {
        let fetcher = match &config.source {
            JwksSource::File(_) => Fetcher::File,
            JwksSource::Url { url, ca } => {
                if !url.starts_with("https://") {
                    return Err(JwksError::NotHttps(url.clone()));
                }
                Fetcher::Http(http_client(ca.as_deref())?)
            }
            JwksSource::ApiServer { kubeconfig, path } => Fetcher::Kube(
                crate::kubeapi::client(kubeconfig.as_deref(), crate::kubeapi::Retries::Kube)
                    .await
                    .map_err(|e| JwksError::ApiServer {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?,
            ),
        };
        let jwks = fetch(&config.source, &fetcher).await?;
        Ok(Self(Arc::new(Inner {
            config,
            fetcher,
            keys: RwLock::new((Arc::new(jwks), Instant::now())),
            last_attempt: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            refreshed: tokio::sync::watch::channel(0).0,
        })))
    }

    /// Verifies a token's signature, issuer, audience and lifetime at `now`.
    pub async fn verify(
        &self,
        token: &Token,
        now: OffsetDateTime,
    ) -> Result<Reviewed, ReviewError> {
        let reject = |s: String| ReviewError::Rejected(s);
        let header = jsonwebtoken::decode_header(token.secret())
            .map_err(|e| reject(format!("malformed token: {e}")))?;
        let alg = header.alg;
        if matches!(
            alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 | Algorithm::EdDSA
        ) {
            return Err(reject(format!(
                "tokens signed with {alg:?} are refused (accepted: RS256/384/512, PS256/384/512, ES256/384)"
            )));
        }
        let (keys, loaded) = self.0.current();
        let age = loaded.elapsed();
        if age > std_duration(self.0.config.refresh_interval) {
            self.start_refresh();
        }
        if age > std_duration(self.0.config.max_age) {
            return Err(ReviewError::Unavailable(format!(
                "the signing keys of {} could not be refreshed for {}s; tokens are refused until they can",
                self.0.config.issuer,
                age.as_secs()
            )));
        }
        let mut result = self.0.verify_with(&keys, token, &header, now);
        if matches!(result, Err(VerifyFailure::NoKey))
            && let Some(mut done) = self.start_refresh()
        {
            let _ = tokio::time::timeout(UNKNOWN_KID_WAIT, done.changed()).await;
            result = self.0.verify_with(&self.0.current().0, token, &header, now);
        }
        result.map_err(|f| match f {
            VerifyFailure::NoKey => reject(match &header.kid {
                Some(kid) => format!(
                    "no key with kid {kid:?} in the JWKS of {}",
                    self.0.config.issuer
                ),
                None => format!(
                    "no {alg:?} key in the JWKS of {} verifies the token",
                    self.0.config.issuer
                ),
            }),
            VerifyFailure::Bad(why) => reject(why),
        })
    }

    /// Starts a background refresh unless one runs or one started moments ago.
    /// Returns a receiver that ticks when the running refresh ends, or `None` when
    /// no refresh is running or coming.
    fn start_refresh(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        let done = self.0.refreshed.subscribe();
        if self.0.refreshing.load(Ordering::Acquire) {
            return Some(done);
        }
        {
            let mut last = crate::sync::lock(&self.0.last_attempt);
            let spacing = MIN_REFRESH_INTERVAL.min(std_duration(self.0.config.refresh_interval));
            if last.is_some_and(|t| t.elapsed() < spacing) {
                return None;
            }
            if self.0.refreshing.swap(true, Ordering::AcqRel) {
                return Some(done);
            }
            *last = Some(Instant::now());
        }
        let inner = self.0.clone();
        tokio::spawn(async move {
            match fetch(&inner.config.source, &inner.fetcher).await {
                Ok(jwks) => {
                    *crate::sync::write(&inner.keys) = (Arc::new(jwks), Instant::now());
                }
                Err(e) => {
                    tracing::warn!(issuer = %inner.config.issuer, error = %e, "cannot refresh the JWKS; keeping the keys already loaded until --jwks-max-age");
                }
            }
            inner.refreshing.store(false, Ordering::Release);
            inner.refreshed.send_modify(|n| *n = n.wrapping_add(1));
        });
        Some(done)
    }
}

impl Inner {
    fn current(&self) -> (Arc<Jwks>, Instant) {
        let guard = crate::sync::read(&self.keys);
        (guard.0.clone(), guard.1)
    }

    fn verify_with(
        &self,
        jwks: &Jwks,
        token: &Token,
        header: &jsonwebtoken::Header,
        now: OffsetDateTime,
    ) -> Result<Reviewed, VerifyFailure> {
        let candidates: Vec<&DecodingKey> = match &header.kid {
            Some(kid) => jwks
                .0
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .map(|k| &k.key)
                .into_iter()
                .collect(),
            None => jwks.0.iter().map(|k| &k.key).collect(),
        };
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&self.config.audiences);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Lifetime is checked below against `now`, not the library's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let mut last = VerifyFailure::NoKey;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token.secret(), key, &validation) {
                Ok(data) => return self.check_claims(data.claims, now),
                Err(e) => {
                    last = match e.kind() {
                        // A key of another family or a wrong signature: try the next.
                        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidSignature
                            if header.kid.is_none() =>
                        {
                            continue;
                        }
                        ErrorKind::InvalidSignature => VerifyFailure::Bad(format!(
                            "the token's signature does not verify with the issuer's key {:?}",
                            header.kid.as_deref().unwrap_or("")
                        )),
                        ErrorKind::InvalidAlgorithm => VerifyFailure::Bad(format!(
                            "the token's algorithm {:?} does not match its key's type",
                            header.alg
                        )),
                        ErrorKind::InvalidAudience => VerifyFailure::Bad(format!(
                            "the token's audience is not one of {:?}",
                            self.config.audiences
                        )),
                        ErrorKind::InvalidIssuer => VerifyFailure::Bad(format!(
                            "the token's issuer is not {:?}",
                            self.config.issuer
                        )),
                        ErrorKind::MissingRequiredClaim(c) => {
                            VerifyFailure::Bad(format!("the token has no {c:?} claim"))
                        }
                        other => VerifyFailure::Bad(format!("invalid token: {other:?}")),
                    };
                    break;
                }
            }
        }
        Err(last)
    }

    fn check_claims(&self, claims: Claims, now: OffsetDateTime) -> Result<Reviewed, VerifyFailure> {
        let now = now.unix_timestamp();
        if claims.exp + LEEWAY_SECS < now {
            return Err(VerifyFailure::Bad(format!(
                "the token expired {} seconds ago",
                now - claims.exp
            )));
        }
        if claims.nbf.is_some_and(|nbf| nbf - LEEWAY_SECS > now) {
            return Err(VerifyFailure::Bad("the token is not valid yet".into()));
        }
        let account = ServiceAccount::from_username(&claims.sub)
            .map_err(|e| VerifyFailure::Bad(e.to_string()))?;
        let mut pod = None;
        if let Some(k) = claims.kubernetes {
            let ns_ok = k
                .namespace
                .as_deref()
                .is_none_or(|ns| ns == account.namespace());
            let sa_ok = k
                .serviceaccount
                .as_ref()
                .is_none_or(|sa| sa.name == account.name());
            if !ns_ok || !sa_ok {
                return Err(VerifyFailure::Bad(
                    "the token's kubernetes.io claim disagrees with its subject".into(),
                ));
            }
            pod = k.pod.map(|p| PodRef {
                name: p.name,
                uid: p.uid,
            });
        }
        Ok(Reviewed { account, pod })
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

fn std_duration(d: time::Duration) -> Duration {
    Duration::try_from(d).unwrap_or(Duration::MAX)
}

enum VerifyFailure {
    NoKey,
    Bad(String),
}

async fn fetch(source: &JwksSource, fetcher: &Fetcher) -> Result<Jwks, JwksError> {
    let too_big = |url: &str| JwksError::TooLarge(url.to_owned());
    let bytes = match (source, fetcher) {
        (JwksSource::File(path), _) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                signet_fs::read_resolved(&path, MAX_JWKS_BYTES as u64).map_err(JwksError::File)
            })
            .await
            .map_err(JwksError::Task)??
        }
        (JwksSource::Url { url, .. }, Fetcher::Http(client)) => {
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
        (JwksSource::ApiServer { path, .. }, Fetcher::Kube(client)) => {
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
    use base64::Engine;
    use rand::Rng;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

    async fn setup(dir: &std::path::Path) -> (JwtAuthenticator, jsonwebtoken::EncodingKey) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [
            {"kty": "oct", "k": b64(b"a shared secret that must never be used"), "kid": "k1"},
            {"kty": "EC", "crv": "P-256", "kid": "k1", "x": b64(&point[1..33]), "y": b64(&point[33..65])},
        ]});
        let path = dir.join("jwks.json");
        std::fs::write(&path, jwks.to_string()).unwrap();
        let auth = JwtAuthenticator::new(JwtConfig {
            issuer: "iss".into(),
            audiences: vec!["istio-ca".into()],
            source: JwksSource::File(path),
            refresh_interval: time::Duration::minutes(5),
            max_age: time::Duration::hours(24),
        })
        .await
        .unwrap();
        (auth, jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()))
    }

    fn token(key: &jsonwebtoken::EncodingKey, exp: i64) -> String {
        let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        let claims = serde_json::json!({"iss": "iss", "aud": "istio-ca", "sub": "system:serviceaccount:ns:sa", "exp": exp});
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

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

    #[tokio::test]
    async fn symmetric_keys_are_dropped_and_mutations_never_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, key) = setup(dir.path()).await;
        let now = OffsetDateTime::now_utc();
        let good = token(&key, now.unix_timestamp() + 600);
        let ok = auth.verify(&Token::new(good.clone()), now).await.unwrap();
        assert_eq!(ok.account.to_string(), "ns/sa");
        // Expiry is judged against the `now` given, with 30 s of leeway.
        assert!(
            auth.verify(&Token::new(good.clone()), now + time::Duration::minutes(11))
                .await
                .is_err()
        );
        // An HS256 token signed with the `oct` key from the same JWKS is refused.
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let claims = serde_json::json!({"iss": "iss", "aud": "istio-ca", "sub": "system:serviceaccount:ns:sa", "exp": now.unix_timestamp() + 600});
        let hs = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"a shared secret that must never be used"),
        )
        .unwrap();
        assert!(auth.verify(&Token::new(hs), now).await.is_err());
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6a77_7473);
        let chars: Vec<char> = good.chars().collect();
        for _ in 0..1500 {
            let mut mutated = chars.clone();
            let i = rng.random_range(0..mutated.len());
            mutated[i] = *['A', 'z', '0', '.', '-', '_', '=', '~']
                .get(rng.random_range(0..8))
                .unwrap();
            let mutated: String = mutated.into_iter().collect();
            if mutated != good {
                assert!(auth.verify(&Token::new(mutated), now).await.is_err());
            }
        }
    }
}
