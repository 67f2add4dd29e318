//! Offline verification of Kubernetes service account tokens against the cluster's
//! JWKS (`/openid/v1/jwks` of the API server, or a file). Asymmetric algorithms only.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
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

use super::{ReviewError, Reviewed, Token};
use crate::identity::ServiceAccount;

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: i64 = 30;
/// An unknown `kid` triggers a JWKS refresh at most this often.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// A JWKS is refreshed when a token is verified and it is older than this.
const MAX_JWKS_AGE: Duration = Duration::from_secs(300);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

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
}

/// A parsed JWKS, with symmetric keys removed.
#[derive(Debug, Clone)]
pub struct Jwks(JwkSet);

impl Jwks {
    /// Parses a JWKS document; fails when it holds no usable asymmetric key.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let mut set: JwkSet =
            serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
        set.keys
            .retain(|k| !matches!(k.algorithm, AlgorithmParameters::OctetKey(_)));
        if set.keys.is_empty() {
            return Err("the JWKS holds no RSA or EC public key".into());
        }
        Ok(Self(set))
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
    pod: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    name: String,
}

/// Verifies tokens against one issuer's JWKS.
pub struct JwtAuthenticator {
    config: JwtConfig,
    http: Option<reqwest::Client>,
    keys: RwLock<(Arc<Jwks>, Instant)>,
    refresh: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Loads the JWKS once; start-up fails when it cannot be had.
    pub async fn new(config: JwtConfig) -> Result<Self, String> {
        let http = match &config.source {
            JwksSource::File(_) => None,
            JwksSource::Url { url, ca } => {
                if !url.starts_with("https://") {
                    return Err(format!("JWKS URL {url:?} must be https"));
                }
                Some(http_client(ca.as_deref())?)
            }
        };
        let jwks = fetch(&config.source, http.as_ref()).await?;
        Ok(Self {
            config,
            http,
            keys: RwLock::new((Arc::new(jwks), Instant::now())),
            refresh: tokio::sync::Mutex::new(None),
        })
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
        let (_, loaded) = self.current();
        if loaded.elapsed() > MAX_JWKS_AGE {
            self.try_refresh().await;
        }
        let mut result = self.verify_with(&self.current().0, token, &header, now);
        if matches!(result, Err(VerifyFailure::NoKey)) && self.try_refresh().await {
            result = self.verify_with(&self.current().0, token, &header, now);
        }
        result.map_err(|f| match f {
            VerifyFailure::NoKey => reject(match &header.kid {
                Some(kid) => format!(
                    "no key with kid {kid:?} in the JWKS of {}",
                    self.config.issuer
                ),
                None => format!(
                    "no {alg:?} key in the JWKS of {} verifies the token",
                    self.config.issuer
                ),
            }),
            VerifyFailure::Bad(why) => reject(why),
        })
    }

    fn current(&self) -> (Arc<Jwks>, Instant) {
        let guard = self.keys.read().unwrap_or_else(|p| p.into_inner());
        (guard.0.clone(), guard.1)
    }

    /// Reloads the JWKS unless that was tried moments ago; true when it changed.
    async fn try_refresh(&self) -> bool {
        let mut last = self.refresh.lock().await;
        if last.is_some_and(|t| t.elapsed() < MIN_REFRESH_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        match fetch(&self.config.source, self.http.as_ref()).await {
            Ok(jwks) => {
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) =
                    (Arc::new(jwks), Instant::now());
                true
            }
            Err(e) => {
                tracing::warn!(issuer = %self.config.issuer, error = %e, "cannot refresh the JWKS; keeping the keys already loaded");
                false
            }
        }
    }

    fn verify_with(
        &self,
        jwks: &Jwks,
        token: &Token,
        header: &jsonwebtoken::Header,
        now: OffsetDateTime,
    ) -> Result<Reviewed, VerifyFailure> {
        let candidates: Vec<_> = match &header.kid {
            Some(kid) => jwks.0.find(kid).into_iter().collect(),
            None => jwks.0.keys.iter().collect(),
        };
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&self.config.audiences);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // Lifetime is checked below against `now`, not the library's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let mut last = VerifyFailure::NoKey;
        for jwk in candidates {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match jsonwebtoken::decode::<Claims>(token.secret(), &key, &validation) {
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
            pod = k.pod.map(|p| p.name);
        }
        Ok(Reviewed { account, pod })
    }
}

enum VerifyFailure {
    NoKey,
    Bad(String),
}

async fn fetch(source: &JwksSource, http: Option<&reqwest::Client>) -> Result<Jwks, String> {
    let bytes = match (source, http) {
        (JwksSource::File(path), _) => tokio::fs::read(path)
            .await
            .map_err(|e| format!("JWKS file {}: {e}", path.display()))?,
        (JwksSource::Url { url, .. }, Some(client)) => {
            let response = client
                .get(url)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .map_err(|e| format!("JWKS {url}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("JWKS {url}: HTTP {}", response.status()));
            }
            let body = response
                .bytes()
                .await
                .map_err(|e| format!("JWKS {url}: {e}"))?;
            body.to_vec()
        }
        (JwksSource::Url { url, .. }, None) => return Err(format!("JWKS {url}: no HTTP client")),
    };
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(format!(
            "JWKS is {} bytes, over the 1 MiB limit",
            bytes.len()
        ));
    }
    Jwks::parse(&bytes)
}

fn http_client(ca: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("JWKS CA file {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "JWKS CA file {} holds no usable certificate",
                    path.display()
                ));
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
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
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
        let mut rng = rand::rng();
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
