//! The workload's private key, generated in memory, and its CSR.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use spiffe::SpiffeId;

/// What went wrong making a key or CSR.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Generate(#[from] signet_spiffe::KeyGenError),
    #[error("CSR creation failed: {0}")]
    Csr(String),
}

/// Key types the agent generates (shared with the CA's `pki` commands).
pub use signet_spiffe::KeyType;

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
    /// Generates a key (RSA keys take 0.1–2 s: keep them off the reactor).
    pub fn generate(kind: KeyType) -> Result<Self, KeyError> {
        Ok(Self {
            pair: signet_spiffe::generate_key(kind)?,
            kind,
        })
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
