//! Checks on a workload's certificate signing request. Only the public key of a CSR is
//! used; everything else in it is either checked or ignored, never copied.

use rustls_pki_types::{CertificateSigningRequestDer, pem::PemObject};
use x509_parser::{
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    oid_registry,
    prelude::FromDer,
};

use crate::keys::KeyKind;

/// Largest CSR PEM accepted; real ones are under 2 KiB.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// What was wrong with a CSR. Every variant maps to `INVALID_ARGUMENT`.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is empty")]
    Empty,
    #[error("the CSR is {0} bytes, over the {MAX_CSR_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("the CSR is not a PEM CERTIFICATE REQUEST: {0}")]
    Pem(String),
    #[error("the CSR is not a valid PKCS#10 request: {0}")]
    Der(String),
    #[error("the CSR's key is not accepted: {0}")]
    Key(String),
    #[error("the CSR is signed with {0}, which is not accepted (use SHA-256 or stronger)")]
    WeakSignature(String),
    #[error(
        "the CSR's signature does not verify with its own public key (no proof of key possession)"
    )]
    BadSignature,
}

/// A CSR that parsed, with an accepted key, reduced to what policy and signing need.
/// Its self-signature is checked by [`ParsedCsr::verify`] (the costly part, which
/// runs on the signing threads).
#[derive(Clone, Debug)]
pub struct ParsedCsr {
    der: Vec<u8>,
    /// DER SubjectPublicKeyInfo of the workload key.
    pub spki: Vec<u8>,
    /// The key's type.
    pub key: KeyKind,
    /// URI SANs the CSR asked for (the caller's own claim, judged by policy).
    pub uri_sans: Vec<String>,
}

impl ParsedCsr {
    /// Verifies the self-signature: proof that the caller holds the key.
    pub fn verify(&self) -> Result<(), CsrError> {
        let (_, csr) = X509CertificationRequest::from_der(&self.der)
            .map_err(|e| CsrError::Der(e.to_string()))?;
        csr.verify_signature().map_err(|_| CsrError::BadSignature)
    }
}

/// [`parse`] and [`ParsedCsr::verify`] in one.
pub fn check(pem: &str) -> Result<ParsedCsr, CsrError> {
    let parsed = parse(pem)?;
    parsed.verify()?;
    Ok(parsed)
}

/// Parses a PEM CSR and checks everything but its signature: size, encoding (the
/// unsigned envelope byte for byte), key type and size, signature algorithm.
pub fn parse(pem: &str) -> Result<ParsedCsr, CsrError> {
    if pem.trim().is_empty() {
        return Err(CsrError::Empty);
    }
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(pem.len()));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CsrError::Pem(e.to_string()))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrError::Der(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Der(format!(
            "{} bytes of trailing data",
            rest.len()
        )));
    }
    strict_envelope(der.as_ref(), csr.certification_request_info.raw)?;
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let key = KeyKind::of_spki(spki).map_err(|e| CsrError::Key(e.to_string()))?;
    if let KeyKind::Rsa(bits) = key
        && !(2048..=8192).contains(&bits)
    {
        return Err(CsrError::Key(format!(
            "RSA-{bits} (want 2048 to 8192 bits)"
        )));
    }
    let alg = &csr.signature_algorithm.algorithm;
    if *alg == oid_registry::OID_PKCS1_SHA1WITHRSA || *alg == oid_registry::OID_SHA1_WITH_RSA {
        return Err(CsrError::WeakSignature("SHA-1".into()));
    }
    let mut uri_sans = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uri_sans.push((*uri).to_owned());
                }
            }
        }
    }
    Ok(ParsedCsr {
        spki: spki.raw.to_vec(),
        key,
        uri_sans,
        der: der.as_ref().to_vec(),
    })
}

/// x509-parser reads the unsigned envelope of a CSR leniently (any tag class on the
/// outer SEQUENCE, the algorithm identifier or the signature BIT STRING). Nothing
/// there is signed, so nothing there may vary: the envelope must be exactly
/// `SEQUENCE { info, SEQUENCE { OID, [params] }, BIT STRING (0 unused bits) }` in DER.
fn strict_envelope(der: &[u8], info: &[u8]) -> Result<(), CsrError> {
    let bad = |what: &str| CsrError::Der(format!("not DER: {what}"));
    let (outer, rest) = tlv(der, 0x30).ok_or_else(|| bad("outer SEQUENCE"))?;
    if !rest.is_empty() {
        return Err(bad("data after the request"));
    }
    let body = outer
        .strip_prefix(info)
        .ok_or_else(|| bad("request info"))?;
    let (alg, rest) = tlv(body, 0x30).ok_or_else(|| bad("signature algorithm"))?;
    let (_, params) = tlv(alg, 0x06).ok_or_else(|| bad("signature algorithm OID"))?;
    // No parameters, NULL (RSA PKCS#1) or a SEQUENCE (RSA-PSS).
    if !(params.is_empty()
        || params == [0x05, 0x00]
        || tlv(params, 0x30).is_some_and(|(_, r)| r.is_empty()))
    {
        return Err(bad("signature algorithm parameters"));
    }
    let (signature, rest) = tlv(rest, 0x03).ok_or_else(|| bad("signature BIT STRING"))?;
    if !rest.is_empty() || signature.first() != Some(&0) {
        return Err(bad("signature BIT STRING"));
    }
    Ok(())
}

/// One DER element with tag `tag` (single byte) and a minimally encoded definite
/// length: `(content, rest)`.
fn tlv(bytes: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, bytes) = bytes.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, bytes) = bytes.split_first()?;
    let (len, bytes) = if first < 0x80 {
        (usize::from(first), bytes)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || bytes.len() < n || bytes[0] == 0 {
            return None;
        }
        let len = bytes[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        if len < 0x80 {
            return None;
        }
        (len, &bytes[n..])
    };
    (bytes.len() >= len).then(|| bytes.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn csr_for(key: &KeyPair, uri: Option<&str>) -> String {
        let mut params = CertificateParams::default();
        if let Some(uri) = uri {
            params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        }
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn accepts_p256_and_reads_sans() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let checked = check(&csr_for(&key, Some("spiffe://cluster.local/ns/a/sa/b"))).unwrap();
        assert_eq!(checked.key, KeyKind::P256);
        assert_eq!(checked.uri_sans, vec!["spiffe://cluster.local/ns/a/sa/b"]);
    }

    #[test]
    fn rejects_garbage_and_tampering() {
        assert!(matches!(check(""), Err(CsrError::Empty)));
        assert!(matches!(check("hello"), Err(CsrError::Pem(_))));
        let big = "A".repeat(MAX_CSR_BYTES + 1);
        assert!(matches!(check(&big), Err(CsrError::TooLarge(_))));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let pem = csr_for(&key, None);
        // Truncated body.
        let lines: Vec<&str> = pem.lines().collect();
        let truncated = format!("{}\n{}\n{}\n", lines[0], lines[1], lines[lines.len() - 1]);
        assert!(matches!(
            check(&truncated),
            Err(CsrError::Der(_) | CsrError::Pem(_))
        ));
        // Flip a byte inside the signature.
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let n = bytes.len();
        bytes[n - 5] ^= 0x01;
        let tampered = pem_encode(&bytes);
        assert!(matches!(check(&tampered), Err(CsrError::BadSignature)));
    }

    /// Hostile input never panics: thousands of random mutations of a valid CSR
    /// (flipped bytes, truncations, junk appended) each come back as an answer.
    #[test]
    fn mutated_csrs_never_panic() {
        use rand::Rng;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = csr_for(&key, Some("spiffe://cluster.local/ns/a/sa/b"));
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // Seeded, so a failure reproduces; every mutation of a signed request must
        // fail (a change inside the signed part breaks the signature, and the
        // envelope around it is checked byte for byte).
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5167_4e37);
        let mut accepted = Vec::new();
        for _ in 0..3000 {
            let mut bytes = der.clone();
            match rng.random_range(0..3) {
                0 => {
                    for _ in 0..rng.random_range(1..4) {
                        let i = rng.random_range(0..bytes.len());
                        bytes[i] = rng.random();
                    }
                }
                1 => bytes.truncate(rng.random_range(0..bytes.len())),
                _ => bytes.extend((0..rng.random_range(1..16)).map(|_| rng.random::<u8>())),
            }
            if bytes != der && check(&pem_encode(&bytes)).is_ok() {
                accepted.push(hex::encode(&bytes));
            }
        }
        assert!(accepted.is_empty(), "mutated CSRs accepted: {accepted:#?}");
    }

    /// Every single-byte change of a signed request, at every position, is refused:
    /// the envelope x509-parser reads leniently included.
    #[test]
    fn every_single_byte_change_is_refused() {
        for key in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let key = KeyPair::generate_for(key).unwrap();
            let pem = csr_for(&key, Some("spiffe://cluster.local/ns/a/sa/b"));
            let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
            for i in 0..der.len() {
                for flip in [0x01u8, 0x40, 0x80, 0xff] {
                    let mut bytes = der.clone();
                    bytes[i] ^= flip;
                    assert!(
                        check(&pem_encode(&bytes)).is_err(),
                        "byte {i} ^ {flip:#04x} accepted"
                    );
                }
            }
        }
    }

    pub(crate) fn pem_encode(der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE REQUEST-----\n");
        out
    }
}
