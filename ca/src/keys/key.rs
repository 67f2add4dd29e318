//! Private and public keys: loading CA keys in any PEM form operators use, and
//! classifying public keys from certificates and CSRs.

use std::fmt;

use pkcs8::der::{Decode, Encode, asn1::AnyRef};
use rcgen::{KeyPair, SignatureAlgorithm};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
use x509_parser::{oid_registry, public_key::PublicKey, x509::SubjectPublicKeyInfo};

/// What was wrong with a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No private key PEM block, or a malformed one.
    #[error("no PEM private key found (want PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY): {0}")]
    Pem(String),
    /// A DER structure inside the PEM did not parse.
    #[error("malformed {kind} private key: {detail}")]
    Malformed { kind: &'static str, detail: String },
    /// The key type or size is not one Signet signs with.
    #[error("unsupported key: {0}")]
    Unsupported(String),
}

/// The kinds of key Signet accepts, for CA keys and for workload keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA with the modulus size in bits.
    Rsa(usize),
    /// ECDSA on NIST P-256.
    P256,
    /// ECDSA on NIST P-384.
    P384,
}

impl KeyKind {
    /// The signature algorithm a CA with this key signs with (contract §3).
    pub fn signature_algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            Self::Rsa(_) => &rcgen::PKCS_RSA_SHA256,
            Self::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }

    /// Classifies a public key; `None` for algorithms Signet does not accept at all.
    pub fn of_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, KeyError> {
        let alg = &spki.algorithm.algorithm;
        if *alg == oid_registry::OID_PKCS1_RSAENCRYPTION {
            match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => Ok(Self::Rsa(rsa.key_size())),
                _ => Err(KeyError::Unsupported("malformed RSA public key".into())),
            }
        } else if *alg == oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == oid_registry::OID_EC_P256 => Ok(Self::P256),
                Some(c) if c == oid_registry::OID_NIST_EC_P384 => Ok(Self::P384),
                Some(c) => Err(KeyError::Unsupported(format!(
                    "EC curve {c} (want P-256 or P-384)"
                ))),
                None => Err(KeyError::Unsupported("EC key without a named curve".into())),
            }
        } else {
            Err(KeyError::Unsupported(format!(
                "public key algorithm {alg} (want RSA, ECDSA P-256 or P-384)"
            )))
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rsa(bits) => write!(f, "RSA-{bits}"),
            Self::P256 => f.write_str("ECDSA P-256"),
            Self::P384 => f.write_str("ECDSA P-384"),
        }
    }
}

/// A CA signing key with its kind. `Debug` never shows key material.
pub struct SigningKey {
    /// The key pair rcgen signs with.
    pub pair: KeyPair,
    /// Its type and size.
    pub kind: KeyKind,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, <redacted>)", self.kind)
    }
}

const OID_RSA_ENCRYPTION: pkcs8::ObjectIdentifier =
    pkcs8::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_EC_PUBLIC_KEY: pkcs8::ObjectIdentifier =
    pkcs8::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: pkcs8::ObjectIdentifier =
    pkcs8::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: pkcs8::ObjectIdentifier = pkcs8::ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// Loads a private key in PKCS#1, SEC1 or PKCS#8 PEM. RSA keys must be 2048 to 4096
/// bits (what ring signs with); EC keys P-256 or P-384.
pub fn load_signing_key(pem: &[u8]) -> Result<SigningKey, KeyError> {
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| KeyError::Pem(e.to_string()))?;
    // ring (through rcgen) reads only PKCS#8, so wrap the other two forms.
    let pkcs8 = match &key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => wrap_pkcs8(OID_RSA_ENCRYPTION, None, k.secret_pkcs1_der())?,
        PrivateKeyDer::Sec1(k) => {
            let der = k.secret_sec1_der();
            let ec = sec1::EcPrivateKey::from_der(der).map_err(|e| KeyError::Malformed {
                kind: "SEC1 EC",
                detail: e.to_string(),
            })?;
            let curve = match ec.parameters.and_then(|p| p.named_curve()) {
                Some(oid) => oid,
                // Without parameters the scalar's length tells the curve apart.
                None if ec.private_key.len() == 32 => OID_P256,
                None if ec.private_key.len() == 48 => OID_P384,
                None => {
                    return Err(KeyError::Unsupported(
                        "EC private key without a named curve".into(),
                    ));
                }
            };
            wrap_pkcs8(OID_EC_PUBLIC_KEY, Some(curve), der)?
        }
        _ => return Err(KeyError::Unsupported("unknown private key encoding".into())),
    };
    let info = pkcs8::PrivateKeyInfo::from_der(&pkcs8).map_err(|e| KeyError::Malformed {
        kind: "PKCS#8",
        detail: e.to_string(),
    })?;
    let kind = if info.algorithm.oid == OID_RSA_ENCRYPTION {
        let rsa = rsa_modulus_bits(info.private_key)?;
        if !(2048..=4096).contains(&rsa) {
            return Err(KeyError::Unsupported(format!(
                "RSA-{rsa} private key (want 2048 to 4096 bits)"
            )));
        }
        KeyKind::Rsa(rsa)
    } else if info.algorithm.oid == OID_EC_PUBLIC_KEY {
        match info.algorithm.parameters_oid().ok() {
            Some(c) if c == OID_P256 => KeyKind::P256,
            Some(c) if c == OID_P384 => KeyKind::P384,
            other => {
                return Err(KeyError::Unsupported(format!(
                    "EC curve {other:?} (want P-256 or P-384)"
                )));
            }
        }
    } else {
        return Err(KeyError::Unsupported(format!(
            "private key algorithm {} (want RSA or ECDSA)",
            info.algorithm.oid
        )));
    };
    let pair =
        KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8.as_slice().into(), kind.signature_algorithm())
            .map_err(|e| KeyError::Malformed {
                kind: "PKCS#8",
                detail: format!("the crypto library refused it: {e}"),
            })?;
    Ok(SigningKey { pair, kind })
}

/// Generates a fresh ECDSA P-256 key (for self-signed roots and serving certificates).
pub fn generate_p256() -> Result<SigningKey, KeyError> {
    let pair = signet_spiffe::generate_key(signet_spiffe::KeyType::EcP256)
        .map_err(|e| KeyError::Unsupported(e.to_string()))?;
    Ok(SigningKey {
        pair,
        kind: KeyKind::P256,
    })
}

fn wrap_pkcs8(
    alg: pkcs8::ObjectIdentifier,
    curve: Option<pkcs8::ObjectIdentifier>,
    inner: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let malformed = |e: pkcs8::der::Error| KeyError::Malformed {
        kind: "PKCS#8",
        detail: e.to_string(),
    };
    let curve_der;
    let parameters = match curve {
        Some(c) => {
            curve_der = c.to_der().map_err(malformed)?;
            Some(AnyRef::from_der(&curve_der).map_err(malformed)?)
        }
        None => Some(AnyRef::NULL),
    };
    let info = pkcs8::PrivateKeyInfo::new(
        pkcs8::AlgorithmIdentifierRef {
            oid: alg,
            parameters,
        },
        inner,
    );
    info.to_der().map_err(malformed)
}

/// Modulus size of a PKCS#1 RSAPrivateKey, read from its first two fields only.
fn rsa_modulus_bits(pkcs1: &[u8]) -> Result<usize, KeyError> {
    use pkcs8::der::{Header, SliceReader, asn1::UintRef};
    let malformed = |e: pkcs8::der::Error| KeyError::Malformed {
        kind: "RSA",
        detail: e.to_string(),
    };
    let mut reader = SliceReader::new(pkcs1).map_err(malformed)?;
    Header::decode(&mut reader).map_err(malformed)?; // RSAPrivateKey SEQUENCE
    UintRef::decode(&mut reader).map_err(malformed)?; // version
    let modulus = UintRef::decode(&mut reader).map_err(malformed)?;
    let bytes = modulus.as_bytes();
    Ok(bytes.len() * 8 - bytes.first().map_or(8, |b| b.leading_zeros() as usize))
}

/// A random positive serial number of at most 128 bits (126 random bits).
pub fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Clear the sign bit and set the next one so the DER integer is positive and
    // always 16 bytes long.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    rcgen::SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// A key in each encoding Istio's cacerts may hold, made by the openssl CLI:
    /// PKCS#8, SEC1 (`EC PRIVATE KEY`) and PKCS#1 (`RSA PRIVATE KEY`).
    fn openssl_keys() -> Vec<(String, KeyKind)> {
        let dir = tempfile::tempdir().unwrap();
        let run = |cmd: &str| {
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(cmd)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "{cmd}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        vec![
            (
                run("openssl ecparam -name prime256v1 -genkey -noout"),
                KeyKind::P256,
            ),
            (
                run("openssl ecparam -name secp384r1 -genkey -noout"),
                KeyKind::P384,
            ),
            (
                run("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256"),
                KeyKind::P256,
            ),
            (
                run("openssl genrsa -traditional 2048 2>/dev/null"),
                KeyKind::Rsa(2048),
            ),
            (
                run("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 2>/dev/null"),
                KeyKind::Rsa(2048),
            ),
        ]
    }

    #[test]
    fn every_encoding_loads_and_mutations_never_panic() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b65_7973);
        let keys = openssl_keys();
        let labels: Vec<&str> = keys
            .iter()
            .map(|(pem, _)| pem.lines().next().unwrap_or_default())
            .collect();
        for want in ["EC PRIVATE KEY", "RSA PRIVATE KEY", "BEGIN PRIVATE KEY"] {
            assert!(labels.iter().any(|l| l.contains(want)), "{labels:?}");
        }
        for (pem, kind) in keys {
            let loaded = load_signing_key(pem.as_bytes()).unwrap();
            assert_eq!(
                loaded.kind,
                kind,
                "{}",
                pem.lines().next().unwrap_or_default()
            );
            assert!(!format!("{loaded:?}").contains("PRIVATE"));
            let parsed = ::pem::parse(&pem).unwrap();
            let der = parsed.contents().to_vec();
            for _ in 0..400 {
                let mut bytes = der.clone();
                let i = rng.random_range(0..bytes.len());
                bytes[i] = rng.random();
                if rng.random_bool(0.3) {
                    bytes.truncate(rng.random_range(0..bytes.len()));
                }
                for label in ["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"] {
                    let mutated = ::pem::encode(&::pem::Pem::new(label, bytes.clone()));
                    let _ = load_signing_key(mutated.as_bytes());
                }
            }
        }
    }
}
