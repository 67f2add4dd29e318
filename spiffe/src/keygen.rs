//! Fresh private keys for workloads, roots and serving certificates. ring signs
//! everything but cannot generate RSA keys: those come from the RustCrypto `rsa` crate
//! and are handed to ring as PKCS#8.

use std::fmt;

use rcgen::KeyPair;

/// Key types Signet generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// ECDSA P-256 (microseconds to generate).
    EcP256,
    /// ECDSA P-384.
    EcP384,
    /// RSA with this many bits (2048, 3072 or 4096; about 0.1–2 s to generate).
    Rsa(usize),
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EcP256 => f.write_str("ECDSA P-256"),
            Self::EcP384 => f.write_str("ECDSA P-384"),
            Self::Rsa(bits) => write!(f, "RSA-{bits}"),
        }
    }
}

/// Why no key could be generated.
#[derive(Debug, thiserror::Error)]
#[error("generating a {kind} key: {why}")]
pub struct KeyGenError {
    kind: KeyType,
    why: String,
}

/// A fresh key of type `kind`, ready for rcgen to sign with (RSA keys sign with
/// SHA-256).
pub fn generate_key(kind: KeyType) -> Result<KeyPair, KeyGenError> {
    let fail = |e: &dyn fmt::Display| KeyGenError {
        kind,
        why: e.to_string(),
    };
    match kind {
        KeyType::EcP256 => {
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| fail(&e))
        }
        KeyType::EcP384 => {
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| fail(&e))
        }
        KeyType::Rsa(bits) => {
            use rsa::pkcs8::EncodePrivateKey;
            let key =
                rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).map_err(|e| fail(&e))?;
            let der = key.to_pkcs8_der().map_err(|e| fail(&e))?;
            KeyPair::from_pkcs8_der_and_sign_algo(&der.as_bytes().into(), &rcgen::PKCS_RSA_SHA256)
                .map_err(|e| fail(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_type_generates_a_key_of_that_type() {
        assert_eq!(
            generate_key(KeyType::EcP256).unwrap().algorithm(),
            &rcgen::PKCS_ECDSA_P256_SHA256
        );
        assert_eq!(
            generate_key(KeyType::EcP384).unwrap().algorithm(),
            &rcgen::PKCS_ECDSA_P384_SHA384
        );
        let rsa = generate_key(KeyType::Rsa(2048)).unwrap();
        assert_eq!(rsa.algorithm(), &rcgen::PKCS_RSA_SHA256);
        // 2048 bits: the modulus in the SubjectPublicKeyInfo is 256 bytes long.
        use rcgen::PublicKeyData;
        assert!(rsa.der_bytes().len() > 256);
    }

    #[test]
    fn an_impossible_size_is_an_error_naming_the_type() {
        let e = generate_key(KeyType::Rsa(1)).unwrap_err();
        assert!(e.to_string().contains("RSA-1"), "{e}");
    }
}
