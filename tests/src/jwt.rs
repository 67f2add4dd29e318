//! Service-account tokens as Kubernetes issues them: a JWT issuer with its JWKS, and
//! the CA flags that check its tokens offline.

use std::path::{Path, PathBuf};

use base64::Engine;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

use crate::sh;

/// Issuer used for test tokens.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// A JWT issuer (ES256, or RS256 as Kubernetes clusters sign by default) and its JWKS.
pub struct JwtIssuer {
    key: jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
    /// The key id in token headers.
    pub kid: String,
    /// The JWKS document.
    pub jwks: serde_json::Value,
}

impl JwtIssuer {
    /// A fresh P-256 signing key.
    pub fn new(kid: &str) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng).unwrap();
        let point = pair.public_key().as_ref();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }]});
        Self {
            key: jsonwebtoken::EncodingKey::from_ec_der(&pkcs8),
            alg: jsonwebtoken::Algorithm::ES256,
            kid: kid.to_owned(),
            jwks,
        }
    }

    /// An RS256 issuer with a 2048-bit key made by the openssl CLI (ring cannot
    /// generate RSA keys).
    pub fn rsa(kid: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let modulus = sh(
            "openssl genrsa -traditional -out k.pem 2048 2>/dev/null && openssl rsa -in k.pem -traditional -outform DER -out k.der 2>/dev/null && openssl rsa -in k.pem -noout -modulus",
            dir.path(),
        );
        let hex = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
            "n": b64(&n), "e": b64(&[1, 0, 1]),
        }]});
        Self {
            key: jsonwebtoken::EncodingKey::from_rsa_der(
                &std::fs::read(dir.path().join("k.der")).unwrap(),
            ),
            alg: jsonwebtoken::Algorithm::RS256,
            kid: kid.to_owned(),
            jwks,
        }
    }

    /// Microseconds ring takes to check one of this (RSA) issuer's tokens: the
    /// crypto of a token check, for the benches.
    pub fn ring_check_us(&self) -> f64 {
        use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
        let token = self.token("bench", "x");
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let sig = b64.decode(sig).unwrap();
        let n = b64
            .decode(self.jwks["keys"][0]["n"].as_str().unwrap())
            .unwrap();
        let public = RsaPublicKeyComponents {
            n,
            e: vec![1, 0, 1],
        };
        crate::process::per_op(|| {
            public
                .verify(&RSA_PKCS1_2048_8192_SHA256, signed.as_bytes(), &sig)
                .unwrap();
        })
    }

    /// A service account token for `ns/sa` with audience `istio-ca`, valid an hour.
    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.token_with(ns, sa, ISSUER, &["istio-ca"], 3600)
    }

    /// A token for `ns/sa` bound to pod `pod` with UID `uid`, as the kubelet
    /// projects them.
    pub fn pod_token(&self, ns: &str, sa: &str, pod: &str, uid: &str) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": ["istio-ca"], "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "iat": now, "nbf": now, "exp": now + 3600,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"},
                              "pod": {"name": pod, "uid": uid}},
        });
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }

    /// A token with every knob.
    pub fn token_with(&self, ns: &str, sa: &str, iss: &str, aud: &[&str], exp_in: i64) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": iss, "aud": aud, "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "iat": now, "nbf": now, "exp": now + exp_in,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"}},
        });
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }

    /// Writes the JWKS to `dir/jwks.json` and returns its path.
    pub fn write_jwks(&self, dir: &Path) -> PathBuf {
        let path = dir.join("jwks.json");
        std::fs::write(&path, self.jwks.to_string()).unwrap();
        path
    }
}

/// `signet-ca serve` flags for a CA with key material in `cacerts` (self-signed in
/// `dir/state` when that holds none) checking tokens of `issuer` offline.
pub fn jwt_ca_args(dir: &Path, issuer: &JwtIssuer, cacerts: &Path) -> Vec<String> {
    vec![
        "--cacerts-dir".into(),
        cacerts.display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--jwks".into(),
        issuer.write_jwks(dir).display().to_string(),
        "--jwt-issuer".into(),
        ISSUER.into(),
    ]
}
