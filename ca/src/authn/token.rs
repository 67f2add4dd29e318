//! The bearer token, kept out of logs.

use std::fmt;

use base64::Engine;
use sha2::{Digest, Sha256};

/// A service account token. `Debug` shows only a short hash prefix.
#[derive(Clone)]
pub struct Token(String);

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
        let payload = self.0.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        claims.get("exp")?.as_i64()
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
}
