//! The few JOSE pieces ValidateJWTSVID needs, over ring (already in the agent for
//! TLS): a JWKS of ES256 and RS256 public keys, and a compact JWS checked against
//! one of them. A general JOSE crate brought every algorithm and key format along
//! and grew the agent's resident code by more than 100 KiB (docs/performance.md),
//! against issue 13's memory target; the signature checks themselves are ring's.

use std::collections::HashMap;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::{Map, Value};

/// A public key of a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PublicKey {
    /// P-256, the uncompressed point.
    Es256(Vec<u8>),
    /// RSA modulus and exponent, big-endian.
    Rs256 { n: Vec<u8>, e: Vec<u8> },
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

#[derive(Deserialize)]
struct Document {
    keys: Vec<Jwk>,
}

/// A JWKS's ES256 and RS256 keys by key id; keys of other kinds are left out.
#[derive(Debug, Clone, Default)]
pub(crate) struct Jwks {
    keys: HashMap<String, PublicKey>,
}

fn b64(field: Option<&String>, name: &str) -> Result<Vec<u8>, String> {
    let value = field.ok_or_else(|| format!("no {name}"))?;
    B64URL
        .decode(value)
        .map_err(|e| format!("{name} is not base64url: {e}"))
}

impl Jwks {
    /// Parses a JWKS document.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, String> {
        let doc: Document = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let mut keys = HashMap::new();
        for jwk in doc.keys {
            let Some(kid) = jwk.kid.clone() else { continue };
            let key = match (jwk.kty.as_str(), jwk.alg.as_deref(), jwk.crv.as_deref()) {
                ("EC", Some("ES256") | None, Some("P-256")) => {
                    let (x, y) = (b64(jwk.x.as_ref(), "x")?, b64(jwk.y.as_ref(), "y")?);
                    if x.len() != 32 || y.len() != 32 {
                        return Err(format!("key {kid:?}: not a P-256 point"));
                    }
                    let mut point = Vec::with_capacity(65);
                    point.push(4);
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    PublicKey::Es256(point)
                }
                ("RSA", Some("RS256") | None, _) => PublicKey::Rs256 {
                    n: b64(jwk.n.as_ref(), "n")?,
                    e: b64(jwk.e.as_ref(), "e")?,
                },
                _ => continue,
            };
            keys.insert(kid, key);
        }
        Ok(Self { keys })
    }

    /// Whether `kid` is in the set.
    pub(crate) fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<Value>,
}

/// A compact JWS split and decoded, not yet checked.
pub(crate) struct Unverified<'a> {
    signing_input: &'a str,
    signature: Vec<u8>,
    alg: String,
    /// The key the header names.
    pub(crate) kid: Option<String>,
    /// The claims.
    pub(crate) claims: Map<String, Value>,
}

impl<'a> Unverified<'a> {
    /// Splits and decodes `token`; nothing is verified.
    pub(crate) fn parse(token: &'a str) -> Result<Self, String> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWS (three parts)".into());
        };
        let header: Header =
            serde_json::from_slice(&B64URL.decode(header).map_err(|e| format!("header: {e}"))?)
                .map_err(|e| format!("header: {e}"))?;
        // JWT-SVID: `typ`, when present, is JWT or JOSE; no extension this check
        // does not know may be made critical.
        if header
            .typ
            .as_deref()
            .is_some_and(|t| t != "JWT" && t != "JOSE")
        {
            return Err(format!(
                "typ {:?} is not JWT or JOSE",
                header.typ.unwrap_or_default()
            ));
        }
        if header.crit.is_some() {
            return Err("the header makes extensions critical (crit)".into());
        }
        let claims: Map<String, Value> =
            serde_json::from_slice(&B64URL.decode(payload).map_err(|e| format!("claims: {e}"))?)
                .map_err(|e| format!("claims: {e}"))?;
        Ok(Self {
            signing_input: &token[..header_and_payload_len(token)],
            signature: B64URL
                .decode(signature)
                .map_err(|e| format!("signature: {e}"))?,
            alg: header.alg,
            kid: header.kid,
            claims,
        })
    }

    /// Checks the signature with the key `kid` of `keys` (the algorithm must be the
    /// key's), then `exp` (after `now`, no leeway), `aud` (holding `audience`) and
    /// `sub`; the claims when all hold.
    pub(crate) fn verify(
        self,
        keys: &Jwks,
        audience: &str,
        now: i64,
    ) -> Result<Map<String, Value>, String> {
        let kid = self.kid.as_deref().ok_or("the header names no key (kid)")?;
        let key = keys
            .keys
            .get(kid)
            .ok_or_else(|| format!("key {kid:?} is not in the bundle"))?;
        let input = self.signing_input.as_bytes();
        let checked = match (key, self.alg.as_str()) {
            (PublicKey::Es256(point), "ES256") => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(input, &self.signature)
            }
            (PublicKey::Rs256 { n, e }, "RS256") => RsaPublicKeyComponents { n, e }.verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                input,
                &self.signature,
            ),
            (_, alg) => return Err(format!("algorithm {alg:?} is not key {kid:?}'s")),
        };
        checked.map_err(|_| "the signature does not verify".to_owned())?;
        let exp = self
            .claims
            .get("exp")
            .and_then(Value::as_f64)
            .ok_or("no exp claim")?;
        if now as f64 >= exp {
            return Err("expired".into());
        }
        let holds = match self.claims.get("aud") {
            Some(Value::String(one)) => one == audience,
            Some(Value::Array(many)) => many.iter().any(|a| a.as_str() == Some(audience)),
            _ => return Err("no aud claim".into()),
        };
        if !holds {
            return Err(format!("audience {audience:?} is not in aud"));
        }
        if !self.claims.get("sub").is_some_and(Value::is_string) {
            return Err("no sub claim".into());
        }
        Ok(self.claims)
    }
}

/// Length of `header.payload` in a compact JWS.
fn header_and_payload_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(token.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::{
        rand::SystemRandom,
        signature::{EcdsaKeyPair, KeyPair},
    };

    fn es256() -> (EcdsaKeyPair, Vec<u8>) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "k1",
            "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..]),
        }]});
        (pair, jwks.to_string().into_bytes())
    }

    fn token(pair: &EcdsaKeyPair, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let sig = pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", B64URL.encode(sig.as_ref()))
    }

    #[test]
    fn a_token_verifies_only_with_its_key_audience_and_time() {
        let (pair, doc) = es256();
        let keys = Jwks::parse(&doc).unwrap();
        let header = serde_json::json!({"alg": "ES256", "kid": "k1"});
        let claims = serde_json::json!({"sub": "spiffe://td/x", "aud": ["a", "b"], "exp": 100});
        let good = token(&pair, &header, &claims);
        let ok = Unverified::parse(&good)
            .unwrap()
            .verify(&keys, "b", 99)
            .unwrap();
        assert_eq!(ok["sub"], "spiffe://td/x");
        let err = |t: &str, aud, now| {
            Unverified::parse(t)
                .unwrap()
                .verify(&keys, aud, now)
                .unwrap_err()
        };
        assert!(err(&good, "c", 99).contains("audience"));
        assert!(err(&good, "a", 100).contains("expired"));
        // A changed claim breaks the signature.
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = B64URL.encode(
            serde_json::json!({"sub": "spiffe://td/y", "aud": ["a"], "exp": 100}).to_string(),
        );
        parts[1] = &forged;
        assert!(err(&parts.join("."), "a", 99).contains("signature"));
        // The header cannot pick another algorithm or key.
        let rs = token(
            &pair,
            &serde_json::json!({"alg": "RS256", "kid": "k1"}),
            &claims,
        );
        assert!(err(&rs, "a", 99).contains("algorithm"));
        let other = token(
            &pair,
            &serde_json::json!({"alg": "ES256", "kid": "k2"}),
            &claims,
        );
        assert!(err(&other, "a", 99).contains("not in the bundle"));
        let none = token(
            &pair,
            &serde_json::json!({"alg": "none", "kid": "k1"}),
            &claims,
        );
        assert!(err(&none, "a", 99).contains("algorithm"));
        let typ = token(
            &pair,
            &serde_json::json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"}),
            &claims,
        );
        assert!(Unverified::parse(&typ).is_err());
        let crit = token(
            &pair,
            &serde_json::json!({"alg": "ES256", "kid": "k1", "crit": ["b64"]}),
            &claims,
        );
        assert!(Unverified::parse(&crit).is_err());
        for bad in ["", "a.b", "a.b.c.d", "!.!.!"] {
            assert!(Unverified::parse(bad).is_err(), "{bad}");
        }
    }
}
