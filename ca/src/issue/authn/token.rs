//! The bearer token, kept out of logs.

use std::fmt;

use base64::Engine;
use sha2::{Digest, Sha256};

/// Seconds past `exp` a token is still sent for review (the API server's leeway).
const EXP_LEEWAY_SECS: i64 = 60;
/// The issuer of legacy, Secret-based service account tokens.
const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";

/// A service account token. `Debug` shows only a short hash prefix.
#[derive(Clone)]
pub struct Token(String);

/// Why no API server could accept a token for us, seen without asking one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unpassable {
    #[error("the token is not a JWT, as every service account token is")]
    NotJwt,
    #[error("the token has expired")]
    Expired,
    #[error("the token's exp claim is not a number")]
    ExpNotANumber,
    #[error("the token's aud claim is neither a string nor a list")]
    AudNotAList,
    #[error("the token is for none of the audiences {0:?}")]
    Audience(Vec<String>),
    #[error("the token is from another issuer than this cluster's")]
    Issuer,
}

impl Token {
    /// Longest token accepted; Kubernetes tokens are around 1 KiB.
    pub const MAX_LEN: usize = 16 * 1024;

    /// Takes the value of an `authorization` header: `Bearer <token>`.
    pub fn from_header(value: &str) -> Option<Self> {
        let (scheme, token) = value.trim().split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= Self::MAX_LEN)
            .then(|| Self(token.to_owned()))
    }

    /// Wraps a raw token string.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The secret itself, for the one place that must send or verify it.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the token: the cache key, safe to keep.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }

    /// The `exp` claim read without verifying anything. Only ever used to shorten
    /// how long a positive answer is cached, never to accept a token.
    pub fn unverified_expiry(&self) -> Option<i64> {
        self.unverified_claims()?.get("exp")?.as_i64()
    }

    /// The claims of a JWT, read without verifying anything.
    fn unverified_claims(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        let mut parts = self.0.split('.');
        let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        match serde_json::from_slice(&bytes).ok()? {
            serde_json::Value::Object(claims) => Some(claims),
            _ => None,
        }
    }

    /// Refuses, without asking anyone, a token that no API server could accept for
    /// us: not a JWT (every service account token is one), expired at `now` (Unix
    /// seconds), for none of `audiences` when it names any, or from another issuer
    /// than `issuer` when that is known. Nothing here accepts a token: it only saves
    /// a TokenReview slot from tokens that cannot pass. Legacy tokens (no `exp`, no
    /// `aud`) go on to the review.
    pub fn precheck(
        &self,
        audiences: &[String],
        issuer: Option<&str>,
        now: i64,
    ) -> Result<(), Unpassable> {
        let claims = self.unverified_claims().ok_or(Unpassable::NotJwt)?;
        match claims.get("exp") {
            None => {}
            // NumericDate: an integer, though a fraction is allowed (RFC 7519 §2).
            Some(exp) => match exp.as_i64().or_else(|| exp.as_f64().map(|f| f as i64)) {
                // The API server allows a minute of skew past `exp` (go-jose's
                // leeway): so does this check, which must never refuse what it accepts.
                Some(exp) if exp.saturating_add(EXP_LEEWAY_SECS) > now => {}
                Some(_) => return Err(Unpassable::Expired),
                None => return Err(Unpassable::ExpNotANumber),
            },
        }
        match claims.get("aud") {
            None => {}
            Some(aud) => {
                let named: Vec<&str> = match aud {
                    serde_json::Value::String(a) => vec![a.as_str()],
                    serde_json::Value::Array(list) => {
                        list.iter().filter_map(|a| a.as_str()).collect()
                    }
                    _ => return Err(Unpassable::AudNotAList),
                };
                if !audiences.is_empty() && !named.iter().any(|a| audiences.iter().any(|w| w == a))
                {
                    return Err(Unpassable::Audience(audiences.to_vec()));
                }
            }
        }
        // Legacy Secret-based tokens carry the fixed issuer below, whatever the
        // cluster's issuer is.
        if let Some(issuer) = issuer
            && let Some(iss) = claims.get("iss")
            && iss.as_str() != Some(issuer)
            && iss.as_str() != Some(LEGACY_ISSUER)
        {
            return Err(Unpassable::Issuer);
        }
        Ok(())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(sha256:{}…)", &hex::encode(self.digest())[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing_and_redaction() {
        let t = Token::from_header("Bearer abc.def.ghi").unwrap();
        assert_eq!(t.secret(), "abc.def.ghi");
        assert!(!format!("{t:?}").contains("abc"));
        assert!(Token::from_header("bearer x").is_some());
        assert!(Token::from_header("Basic x").is_none());
        assert!(Token::from_header("Bearer ").is_none());
        assert!(Token::from_header("Bearer").is_none());
    }

    #[test]
    fn expiry_peek() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let t = Token::new(format!("{}.{}.sig", b64("{}"), b64(r#"{"exp":1234}"#)));
        assert_eq!(t.unverified_expiry(), Some(1234));
        assert_eq!(Token::new("garbage").unverified_expiry(), None);
    }

    #[test]
    fn precheck_refuses_tokens_no_review_could_accept() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = |claims: &str| Token::new(format!("{}.{}.sig", b64("{}"), b64(claims)));
        let aud = vec!["istio-ca".to_string()];
        let iss = Some("https://kubernetes.default.svc");
        let ok = jwt(r#"{"exp":2000,"aud":["istio-ca"],"iss":"https://kubernetes.default.svc"}"#);
        assert_eq!(ok.precheck(&aud, iss, 1000), Ok(()));
        // Legacy tokens carry neither exp nor aud, and their own issuer: left to the
        // review, also where the cluster's issuer is known.
        assert_eq!(
            jwt(r#"{"iss":"kubernetes/serviceaccount"}"#).precheck(&aud, iss, 1000),
            Ok(())
        );
        // Within the API server's minute of leeway past `exp`: still reviewed.
        assert_eq!(jwt(r#"{"exp":950}"#).precheck(&aud, iss, 1000), Ok(()));
        assert_eq!(
            jwt(r#"{"aud":"istio-ca"}"#).precheck(&aud, iss, 1000),
            Ok(())
        );
        for (token, why) in [
            (Token::new("random-garbage"), "not a JWT"),
            (Token::new("a.b.c.d"), "not a JWT"),
            (Token::new(format!("x.{}.y", b64("[1]"))), "not a JWT"),
            (jwt(r#"{"exp":939}"#), "expired"),
            (jwt(r#"{"exp":"soon"}"#), "not a number"),
            (
                jwt(r#"{"exp":2000,"aud":["api"]}"#),
                "none of the audiences",
            ),
            (jwt(r#"{"aud":7}"#), "neither a string"),
            (
                jwt(r#"{"exp":2000,"aud":"istio-ca","iss":"https://evil"}"#),
                "another issuer",
            ),
        ] {
            let err = token.precheck(&aud, iss, 1000).unwrap_err().to_string();
            assert!(err.contains(why), "{token:?}: {err}");
        }
    }
}
