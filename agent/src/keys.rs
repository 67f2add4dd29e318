//! The workload's private key, generated in memory, and its CSR.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use spiffe::SpiffeId;

/// What went wrong making a key or CSR.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("CSR creation failed: {0}")]
    Csr(String),
}

/// Key types the agent generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// ECDSA P-256 (default; microseconds to generate).
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

/// A private key held in memory. `Debug` never shows it.
pub struct WorkloadKey {
    pair: KeyPair,
    kind: KeyType,
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkloadKey({}, <redacted>)", self.kind)
    }
}

impl WorkloadKey {
    /// Generates a key. ring signs everything, but cannot generate RSA keys: those
    /// come from the RustCrypto `rsa` crate and are handed to ring as PKCS#8.
    pub fn generate(kind: KeyType) -> Result<Self, KeyError> {
        let gen_err = |e: &dyn fmt::Display| KeyError::Generate(e.to_string());
        let pair =
            match kind {
                KeyType::EcP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| gen_err(&e))?,
                KeyType::EcP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
                    .map_err(|e| gen_err(&e))?,
                KeyType::Rsa(bits) => {
                    use rsa::pkcs8::EncodePrivateKey;
                    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
                        .map_err(|e| gen_err(&e))?;
                    let der = key.to_pkcs8_der().map_err(|e| gen_err(&e))?;
                    KeyPair::from_pkcs8_der_and_sign_algo(
                        &der.as_bytes().into(),
                        &rcgen::PKCS_RSA_SHA256,
                    )
                    .map_err(|e| gen_err(&e))?
                }
            };
        Ok(Self { pair, kind })
    }

    /// The key type.
    pub fn kind(&self) -> KeyType {
        self.kind
    }

    /// DER SubjectPublicKeyInfo.
    pub fn spki(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }

    /// PKCS#8 PEM of the private key: for Envoy and `--output-certs` only.
    pub fn pkcs8_pem(&self) -> String {
        self.pair.serialize_pem()
    }

    /// A CSR as Istio's agents make it: empty subject, one critical URI SAN.
    pub fn csr(&self, id: &SpiffeId) -> Result<String, KeyError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e: rcgen::Error| KeyError::Csr(e.to_string()))?,
        )];
        params
            .serialize_request(&self.pair)
            .and_then(|csr| csr.pem())
            .map_err(|e| KeyError::Csr(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    #[test]
    fn csr_has_empty_subject_and_critical_uri_san() {
        let key = WorkloadKey::generate(KeyType::EcP256).unwrap();
        let id = SpiffeId::new("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let pem = key.csr(&id).unwrap();
        let der = ::pem::parse(&pem).unwrap().into_contents();
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        csr.verify_signature().unwrap();
        assert_eq!(csr.certification_request_info.subject.iter().count(), 0);
        let exts: Vec<_> = csr.requested_extensions().unwrap().collect();
        assert_eq!(exts.len(), 1);
        assert_eq!(
            csr.certification_request_info.subject_pki.raw,
            key.spki().as_slice()
        );
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn rsa_keys_come_from_the_second_provider() {
        let key = WorkloadKey::generate(KeyType::Rsa(2048)).unwrap();
        assert!(key.pkcs8_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        let id = SpiffeId::new("spiffe://cluster.local/ns/a/sa/b").unwrap();
        assert!(key.csr(&id).unwrap().contains("CERTIFICATE REQUEST"));
    }
}
