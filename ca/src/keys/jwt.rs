//! The keys that sign JWT-SVIDs, apart from the X.509 key material: a stored key set
//! (one document, in the state directory or a Kubernetes Secret every replica reads),
//! its rotation plan, the JWKS it publishes and the signing itself.
//!
//! Rotation keeps three promises, each a plain function of the stored set and `now`
//! ([`plan`]): a key is in the JWKS at least half a rotation period before it signs
//! anything (relying parties and agents refresh well within that); it stays there
//! until every token it signed has expired (the maximum lifetime after it stopped
//! signing, plus leeway); and at any instant every replica signs with the same key,
//! because the switch is a time written in the set, not a decision each replica takes.

use std::{fmt, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Time a key stays published after the last token it signed could have expired,
/// for relying parties whose clock runs behind.
pub const RETIRE_LEEWAY_SECS: i64 = 60;
/// The document's format version.
const VERSION: u32 = 1;
/// Keys a schedule may need at once (`--jwt-key-rotation` against
/// `--jwt-svid-max-ttl` is checked against it).
pub const MAX_KEYS: usize = 16;
/// Stored sets larger than this are refused as not Signet's (another configuration's
/// set may hold more than this one's needs).
const MAX_STORED_KEYS: usize = 64;

/// The JWS algorithm of new keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JwtAlg {
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// RSA-2048 PKCS#1 v1.5 with SHA-256.
    Rs256,
}

impl JwtAlg {
    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Rs256 => "RS256",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "ES256" => Some(Self::Es256),
            "RS256" => Some(Self::Rs256),
            _ => None,
        }
    }
}

impl fmt::Display for JwtAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What is wrong with the key set.
#[derive(Debug, thiserror::Error)]
pub enum JwtKeyError {
    #[error("the JWT key set does not parse: {0}")]
    Document(String),
    #[error("JWT key {kid}: {problem}")]
    Key { kid: String, problem: String },
    #[error("generating a JWT signing key: {0}")]
    Generate(String),
    #[error("signing a JWT-SVID: {0}")]
    Sign(String),
    #[error("no JWT signing key is active yet")]
    NoActiveKey,
}

/// Where the set lives: a file in the state directory, or a Secret.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else (another replica) wrote it since it was read.
    #[error("the JWT key set changed since it was read")]
    Conflict,
    #[error("{0}")]
    Failed(String),
}

/// A stored key: PKCS#8, and when it signs and stops being published.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredKey {
    /// RFC 7638 thumbprint of the public key.
    pub kid: String,
    /// `ES256` or `RS256`.
    pub alg: String,
    /// PKCS#8 DER, base64.
    pkcs8: String,
    /// Unix seconds: created (and published).
    pub created: i64,
    /// Unix seconds: signs from here until a later key's `active_from`.
    pub active_from: i64,
    /// Unix seconds: leaves the set; set once a later key signs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<i64>,
    /// The longest token lifetime any replica allowed while this key signed, in
    /// seconds: how long it stays published after it stops signing.
    #[serde(default)]
    pub max_token_ttl: i64,
}

impl fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("pkcs8", &"<redacted>")
            .field("active_from", &self.active_from)
            .field("retire_at", &self.retire_at)
            .finish()
    }
}

/// The stored key set.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyDocument {
    version: u32,
    /// Oldest first.
    pub keys: Vec<StoredKey>,
}

impl KeyDocument {
    /// Parses a stored document.
    pub fn parse(bytes: &[u8]) -> Result<Self, JwtKeyError> {
        let doc: Self =
            serde_json::from_slice(bytes).map_err(|e| JwtKeyError::Document(e.to_string()))?;
        if doc.version != VERSION {
            return Err(JwtKeyError::Document(format!(
                "version {} (this signet-ca reads version {VERSION})",
                doc.version
            )));
        }
        if doc.keys.len() > MAX_STORED_KEYS {
            return Err(JwtKeyError::Document(format!(
                "{} keys (at most {MAX_STORED_KEYS})",
                doc.keys.len()
            )));
        }
        Ok(doc)
    }

    /// The document as stored (it holds private keys: store it as a secret).
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        // Serialising plain strings and numbers cannot fail.
        Zeroizing::new(serde_json::to_vec_pretty(self).unwrap_or_default())
    }
}

/// How keys rotate.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// The algorithm of new keys.
    pub alg: JwtAlg,
    /// How long a key signs; its successor is published half of this before.
    pub rotate_every: Duration,
    /// The longest JWT-SVID lifetime issued.
    pub max_token_ttl: Duration,
}

impl Schedule {
    /// How many keys the set holds at most on this schedule: the one signing, the
    /// next, and those that stopped signing but whose tokens may still be valid.
    pub fn keys_needed(&self) -> u64 {
        let rotate = self.rotate_every.as_secs().max(1);
        let kept = self.max_token_ttl.as_secs() + RETIRE_LEEWAY_SECS.unsigned_abs();
        2 + kept.div_ceil(rotate)
    }
}

/// Makes a key of `alg`, published at `now`, signing from `active_from`.
pub fn generate(alg: JwtAlg, now: i64, active_from: i64) -> Result<StoredKey, JwtKeyError> {
    let pkcs8 = match alg {
        JwtAlg::Es256 => Zeroizing::new(
            EcdsaKeyPair::generate_pkcs8(
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .map_err(|e| JwtKeyError::Generate(e.to_string()))?
            .as_ref()
            .to_vec(),
        ),
        JwtAlg::Rs256 => Zeroizing::new(
            signet_spiffe::generate_key(signet_spiffe::KeyType::Rsa(2048))
                .map_err(|e| JwtKeyError::Generate(e.to_string()))?
                .serialize_der(),
        ),
    };
    let parsed = ParsedKey::from_pkcs8(alg, &pkcs8, "new")?;
    Ok(StoredKey {
        kid: parsed.kid.clone(),
        alg: alg.name().to_owned(),
        pkcs8: base64::engine::general_purpose::STANDARD.encode(&*pkcs8),
        created: now,
        active_from,
        retire_at: None,
        max_token_ttl: 0,
    })
}

/// What the set should be at `now`, if it is to change: retired keys dropped, a
/// first key when there is none, a key that stopped signing given its retirement, and
/// the next key published half a period before it signs (sooner, for a new
/// algorithm). `make` creates keys (tests pass a cheap one).
pub fn plan(
    doc: &KeyDocument,
    schedule: &Schedule,
    now: i64,
    mut make: impl FnMut(JwtAlg, i64, i64) -> Result<StoredKey, JwtKeyError>,
) -> Result<Option<KeyDocument>, JwtKeyError> {
    let mut keys: Vec<StoredKey> = doc
        .keys
        .iter()
        .filter(|k| k.retire_at.is_none_or(|at| at > now))
        .cloned()
        .collect();
    let rotate = i64::try_from(schedule.rotate_every.as_secs()).unwrap_or(i64::MAX / 4);
    let max_ttl = i64::try_from(schedule.max_token_ttl.as_secs()).unwrap_or(i64::MAX / 4);
    let current = |keys: &[StoredKey]| {
        keys.iter()
            .filter(|k| k.active_from <= now)
            .max_by_key(|k| (k.active_from, k.created))
            .cloned()
    };
    let Some(signing) = current(&keys) else {
        // Nothing signs yet. A key already published waits its turn; otherwise the
        // first key signs at once (nobody can hold a token from this set yet).
        if !keys.iter().any(|k| k.active_from > now) {
            let mut first = make(schedule.alg, now, now)?;
            first.max_token_ttl = max_ttl;
            keys.push(first);
        }
        return Ok(changed(doc, keys));
    };
    // The signing key remembers the longest lifetime allowed while it signs (any
    // replica may raise it, none lowers it), so a lowered flag or a replica with
    // other flags cannot retire it while its tokens are valid.
    for key in &mut keys {
        if key.kid == signing.kid && key.max_token_ttl < max_ttl {
            key.max_token_ttl = max_ttl;
        }
    }
    // Keys that signed before the current one: published until their last token ends.
    for key in &mut keys {
        if key.active_from < signing.active_from && key.retire_at.is_none() {
            let ttl = key.max_token_ttl.max(max_ttl);
            key.retire_at = Some(
                signing
                    .active_from
                    .saturating_add(ttl)
                    .saturating_add(RETIRE_LEEWAY_SECS),
            );
        }
    }
    let pending = keys.iter().any(|k| k.active_from > now);
    let half = rotate / 2;
    let wrong_alg = signing.alg != schedule.alg.name();
    if !pending && (wrong_alg || now >= signing.active_from.saturating_add(half)) {
        // A new algorithm signs as soon as it has been published half a period;
        // otherwise keys take turns a period apart.
        let active_from = if wrong_alg {
            now.saturating_add(half)
        } else {
            signing
                .active_from
                .saturating_add(rotate)
                .max(now.saturating_add(half))
        };
        keys.push(make(schedule.alg, now, active_from)?);
    }
    Ok(changed(doc, keys))
}

fn changed(doc: &KeyDocument, keys: Vec<StoredKey>) -> Option<KeyDocument> {
    (keys != doc.keys).then_some(KeyDocument {
        version: VERSION,
        keys,
    })
}

/// A parsed key, ready to sign.
struct ParsedKey {
    kid: String,
    alg: JwtAlg,
    active_from: i64,
    pair: Pair,
    jwk: serde_json::Value,
}

enum Pair {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl ParsedKey {
    fn from_pkcs8(alg: JwtAlg, pkcs8: &[u8], kid: &str) -> Result<Self, JwtKeyError> {
        let bad = |problem: String| JwtKeyError::Key {
            kid: kid.to_owned(),
            problem,
        };
        let (pair, jwk, thumbprint) = match alg {
            JwtAlg::Es256 => {
                let pair = EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    pkcs8,
                    &SystemRandom::new(),
                )
                .map_err(|e| bad(format!("not a P-256 PKCS#8 key: {e}")))?;
                // The uncompressed point: 0x04, x, y.
                let point = pair.public_key().as_ref();
                if point.len() != 65 {
                    return Err(bad("unexpected public key encoding".into()));
                }
                let (x, y) = (B64URL.encode(&point[1..33]), B64URL.encode(&point[33..]));
                let thumbprint = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
                let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "x": x, "y": y});
                (Pair::Ec(pair), jwk, thumbprint)
            }
            JwtAlg::Rs256 => {
                let pair = RsaKeyPair::from_pkcs8(pkcs8)
                    .map_err(|e| bad(format!("not an RSA PKCS#8 key: {e}")))?;
                let public = signature::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                let (e, n) = (B64URL.encode(&public.e), B64URL.encode(&public.n));
                let thumbprint = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
                let jwk = serde_json::json!({"kty": "RSA", "e": e, "n": n});
                (Pair::Rsa(pair), jwk, thumbprint)
            }
        };
        // RFC 7638: the SHA-256 of the required members, in lexicographic order and
        // without whitespace (written out above: serde_json's map order depends on
        // its features).
        Ok(Self {
            kid: B64URL.encode(Sha256::digest(thumbprint.as_bytes())),
            alg,
            active_from: 0,
            pair,
            jwk,
        })
    }

    fn public_jwk(&self) -> serde_json::Value {
        let mut jwk = self.jwk.clone();
        if let Some(map) = jwk.as_object_mut() {
            map.insert("kid".into(), self.kid.clone().into());
            map.insert("alg".into(), self.alg.name().into());
            map.insert("use".into(), "sig".into());
        }
        jwk
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, JwtKeyError> {
        let rng = SystemRandom::new();
        match &self.pair {
            Pair::Ec(pair) => pair
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|e| JwtKeyError::Sign(e.to_string())),
            Pair::Rsa(pair) => {
                let mut out = vec![0; pair.public().modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut out)
                    .map_err(|e| JwtKeyError::Sign(e.to_string()))?;
                Ok(out)
            }
        }
    }
}

/// The key set in use: every published key parsed, and the JWKS.
pub struct JwtKeys {
    keys: Vec<ParsedKey>,
    jwks: Arc<[u8]>,
}

impl fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKeys")
            .field("kids", &self.kids())
            .finish_non_exhaustive()
    }
}

/// A minted token and what the audit line says of it.
#[derive(Clone)]
pub struct Minted {
    /// The compact JWS.
    pub token: String,
    /// The key that signed it.
    pub kid: String,
}

impl fmt::Debug for Minted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minted")
            .field("token", &"<redacted>")
            .field("kid", &self.kid)
            .finish()
    }
}

impl JwtKeys {
    /// Parses every key of `doc`; a key that does not parse makes the whole set
    /// refused (the previous one stays in use).
    pub fn new(doc: &KeyDocument) -> Result<Self, JwtKeyError> {
        let mut keys = Vec::with_capacity(doc.keys.len());
        for stored in &doc.keys {
            let bad = |problem: String| JwtKeyError::Key {
                kid: stored.kid.clone(),
                problem,
            };
            let alg = JwtAlg::from_name(&stored.alg)
                .ok_or_else(|| bad(format!("unknown algorithm {:?}", stored.alg)))?;
            let der = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(&stored.pkcs8)
                    .map_err(|e| bad(format!("the key is not base64: {e}")))?,
            );
            let mut key = ParsedKey::from_pkcs8(alg, &der, &stored.kid)?;
            if key.kid != stored.kid {
                return Err(bad(format!(
                    "the key's thumbprint is {}, not its kid",
                    key.kid
                )));
            }
            key.active_from = stored.active_from;
            keys.push(key);
        }
        let jwks = serde_json::json!({
            "keys": keys.iter().map(ParsedKey::public_jwk).collect::<Vec<_>>(),
        });
        Ok(Self {
            keys,
            jwks: jwks.to_string().into_bytes().into(),
        })
    }

    /// The JWKS document (public keys only).
    pub fn jwks(&self) -> Arc<[u8]> {
        self.jwks.clone()
    }

    /// Key ids, in stored order.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }

    /// The key that signs at `now`: the latest whose time has come.
    fn signing(&self, now: i64) -> Option<&ParsedKey> {
        self.keys
            .iter()
            .filter(|k| k.active_from <= now)
            .max_by_key(|k| k.active_from)
    }

    /// Signs `claims` (a JSON object) with the key active at `now`.
    ///
    /// The JWS is put together here rather than with `jsonwebtoken::encode`, which
    /// parses the PKCS#8 key again for every signature.
    pub fn sign(&self, claims: &serde_json::Value, now: i64) -> Result<Minted, JwtKeyError> {
        let key = self.signing(now).ok_or(JwtKeyError::NoActiveKey)?;
        let header = serde_json::json!({"alg": key.alg.name(), "kid": key.kid, "typ": "JWT"});
        let mut token = B64URL.encode(header.to_string());
        token.push('.');
        token.push_str(&B64URL.encode(claims.to_string()));
        let signature = key.sign(token.as_bytes())?;
        token.push('.');
        token.push_str(&B64URL.encode(signature));
        Ok(Minted {
            token,
            kid: key.kid.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3600;

    fn schedule() -> Schedule {
        Schedule {
            alg: JwtAlg::Es256,
            rotate_every: Duration::from_secs(24 * 3600),
            max_token_ttl: Duration::from_secs(3600),
        }
    }

    fn step(doc: &KeyDocument, s: &Schedule, now: i64) -> KeyDocument {
        plan(doc, s, now, generate)
            .unwrap()
            .unwrap_or_else(|| doc.clone())
    }

    #[test]
    fn keys_are_published_half_a_period_before_they_sign_and_kept_until_their_tokens_expire() {
        let s = schedule();
        let t0 = 1_000_000;
        let doc = step(&KeyDocument::default(), &s, t0);
        assert_eq!(doc.keys.len(), 1);
        assert_eq!(doc.keys[0].active_from, t0, "the first key signs at once");
        assert!(plan(&doc, &s, t0 + 11 * HOUR, generate).unwrap().is_none());

        // Half a period in: the successor is published, to sign a day after the first.
        let doc = step(&doc, &s, t0 + 12 * HOUR);
        assert_eq!(doc.keys.len(), 2);
        let (first, next) = (doc.keys[0].kid.clone(), doc.keys[1].kid.clone());
        assert_eq!(doc.keys[1].active_from, t0 + 24 * HOUR);
        let keys = JwtKeys::new(&doc).unwrap();
        assert_eq!(
            keys.sign(&serde_json::json!({}), t0 + 24 * HOUR - 1)
                .unwrap()
                .kid,
            first
        );
        assert_eq!(
            keys.sign(&serde_json::json!({}), t0 + 24 * HOUR)
                .unwrap()
                .kid,
            next
        );
        let jwks: serde_json::Value = serde_json::from_slice(&keys.jwks()).unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2, "both published");

        // Once the successor signs, the first stays for the longest token and leeway.
        let doc = step(&doc, &s, t0 + 24 * HOUR);
        let retire = t0 + 25 * HOUR + RETIRE_LEEWAY_SECS;
        assert_eq!(doc.keys[0].retire_at, Some(retire));
        let doc = step(&doc, &s, retire - 1);
        assert_eq!(doc.keys.len(), 2);
        let doc = step(&doc, &s, retire);
        assert_eq!(doc.keys.iter().map(|k| &k.kid).collect::<Vec<_>>(), [&next]);
    }

    /// Over many periods and schedules, with rounds at uneven times: every key is
    /// published at least half a period before it signs, stays published until the
    /// last token it could have signed has expired, and the set never outgrows what
    /// the schedule needs.
    #[test]
    fn rotation_keeps_its_promises_over_many_periods() {
        let cheap = |alg, now, active_from| -> Result<StoredKey, JwtKeyError> {
            Ok(StoredKey {
                kid: format!("k{now}-{active_from}"),
                alg: JwtAlg::name(alg).to_owned(),
                pkcs8: String::new(),
                created: now,
                active_from,
                retire_at: None,
                max_token_ttl: 0,
            })
        };
        for (rotate, max_ttl, step) in [
            (86_400, 3600, 30),
            (86_400, 86_400, 97),
            (3600, 3600, 29),
            (600, 60, 7),
            (60, 10, 3),
            (7200, 600, 1),
        ] {
            let s = Schedule {
                alg: JwtAlg::Es256,
                rotate_every: Duration::from_secs(rotate),
                max_token_ttl: Duration::from_secs(max_ttl),
            };
            let half = (rotate / 2) as i64;
            let mut doc = KeyDocument::default();
            // When each key was first seen published, and the last time it signed.
            let mut published: std::collections::HashMap<String, i64> = Default::default();
            let mut signed: std::collections::HashMap<String, i64> = Default::default();
            let mut now = 1_000_000;
            let end = now + 10 * rotate as i64;
            while now < end {
                if let Some(next) = plan(&doc, &s, now, cheap).unwrap() {
                    doc = next;
                }
                assert!(
                    doc.keys.len() as u64 <= s.keys_needed(),
                    "{rotate}/{max_ttl}: {doc:?}"
                );
                for k in &doc.keys {
                    published.entry(k.kid.clone()).or_insert(now);
                }
                let signer = doc
                    .keys
                    .iter()
                    .filter(|k| k.active_from <= now)
                    .max_by_key(|k| k.active_from)
                    .unwrap();
                let first_seen = published[&signer.kid];
                assert!(
                    signer.active_from == first_seen && first_seen == 1_000_000
                        || signer.active_from - first_seen >= half - step as i64,
                    "{rotate}/{max_ttl}: {} signs {} s after it was published",
                    signer.kid,
                    signer.active_from - first_seen
                );
                signed.insert(signer.kid.clone(), now);
                // Every key that signed a token still valid is published.
                for (kid, last) in &signed {
                    if now < last + max_ttl as i64 {
                        assert!(
                            doc.keys.iter().any(|k| &k.kid == kid),
                            "{kid} retired early"
                        );
                    }
                }
                now += step as i64;
            }
        }
    }

    #[test]
    fn a_lowered_maximum_does_not_retire_a_key_early() {
        let mut s = schedule();
        let t0 = 1_000_000;
        let doc = step(&KeyDocument::default(), &s, t0);
        let doc = step(&doc, &s, t0 + 12 * HOUR);
        // The maximum is lowered to ten minutes before the first key stops signing.
        s.max_token_ttl = Duration::from_secs(600);
        let doc = step(&doc, &s, t0 + 24 * HOUR);
        assert_eq!(
            doc.keys[0].retire_at,
            Some(t0 + 25 * HOUR + RETIRE_LEEWAY_SECS)
        );
    }

    #[test]
    fn a_new_algorithm_is_published_before_it_signs() {
        let mut s = schedule();
        let t0 = 1_000_000;
        let doc = step(&KeyDocument::default(), &s, t0);
        s.alg = JwtAlg::Rs256;
        let doc = step(&doc, &s, t0 + 60);
        assert_eq!(doc.keys.len(), 2);
        assert_eq!(doc.keys[1].alg, "RS256");
        assert_eq!(doc.keys[1].active_from, t0 + 60 + 12 * HOUR);
        // RS256 tokens verify with the published modulus.
        let keys = JwtKeys::new(&doc).unwrap();
        let minted = keys
            .sign(&serde_json::json!({"sub": "x"}), t0 + 13 * HOUR)
            .unwrap();
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&keys.jwks()).unwrap();
        let jwk = jwks.find(&minted.kid).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        jsonwebtoken::decode::<serde_json::Value>(&minted.token, &key, &v).unwrap();
    }

    #[test]
    fn es256_tokens_verify_with_the_published_key_and_name_its_thumbprint() {
        let doc = step(&KeyDocument::default(), &schedule(), 100);
        let keys = JwtKeys::new(&doc).unwrap();
        let minted = keys
            .sign(&serde_json::json!({"sub": "spiffe://td/x"}), 100)
            .unwrap();
        let header = jsonwebtoken::decode_header(&minted.token).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some(minted.kid.as_str()));
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&keys.jwks()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(jwks.find(&minted.kid).unwrap()).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        let claims = jsonwebtoken::decode::<serde_json::Value>(&minted.token, &key, &v).unwrap();
        assert_eq!(claims.claims["sub"], "spiffe://td/x");
        // No private member in the JWKS.
        assert!(!String::from_utf8_lossy(&keys.jwks()).contains("\"d\""));
    }

    #[test]
    fn a_tampered_set_is_refused() {
        let doc = step(&KeyDocument::default(), &schedule(), 100);
        let mut bad = doc.clone();
        bad.keys[0].kid = "other".into();
        assert!(
            JwtKeys::new(&bad)
                .unwrap_err()
                .to_string()
                .contains("thumbprint")
        );
        let mut text = String::from_utf8(doc.to_bytes().to_vec()).unwrap();
        text = text.replace("\"version\": 1", "\"version\": 2");
        assert!(
            KeyDocument::parse(text.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("version 2")
        );
        assert!(KeyDocument::parse(b"{").is_err());
    }
}
