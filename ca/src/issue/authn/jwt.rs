//! Offline verification of Kubernetes service account tokens against the cluster's
//! JWKS ([`super::jwks`] fetches and parses it): signature, issuer, audience, lifetime
//! and the Kubernetes claims; the keys refreshed in the background, and a token with
//! an unknown key id waits briefly for a refresh it starts.

use std::{
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use jsonwebtoken::{Algorithm, Validation, errors::ErrorKind};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{
    PodRef, ReviewError, Reviewed, Token,
    jwks::{Jwks, JwksError, JwksSource, KeySource},
};
use signet_spiffe::ServiceAccount;

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: i64 = 30;
/// A refresh is started at most this often (or every refresh interval, if shorter).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// How long a token with an unknown `kid` waits for the refresh it started.
const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(3);

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
    pub refresh_interval: Duration,
    /// Keys that could not be refreshed for this long are no longer trusted.
    pub max_age: Duration,
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
    keys_source: KeySource,
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
        let keys = KeySource::new(config.source.clone()).await?;
        let jwks = keys.fetch().await?;
        Ok(Self(Arc::new(Inner {
            config,
            keys_source: keys,
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
        if age > self.0.config.refresh_interval {
            self.start_refresh();
        }
        if age > self.0.config.max_age {
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
            let spacing = MIN_REFRESH_INTERVAL.min(self.0.config.refresh_interval);
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
            match inner.keys_source.fetch().await {
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
        let candidates = jwks.candidates(header.kid.as_deref());
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

enum VerifyFailure {
    NoKey,
    Bad(String),
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
            refresh_interval: Duration::from_secs(300),
            max_age: Duration::from_secs(86_400),
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
