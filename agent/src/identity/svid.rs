//! The workload's certificate (its X.509 SVID) and the checks an answer from the CA
//! must pass before it replaces the one being served.

use std::fmt;

use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe::SpiffeId;
use time::{Duration, OffsetDateTime};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

/// How far in the future a NotBefore may be (clock skew between CA and agent).
const MAX_FUTURE_NOT_BEFORE: Duration = Duration::minutes(10);
/// Longest lifetime believed; anything longer is a misconfigured or hostile CA.
const MAX_LIFETIME: Duration = Duration::days(366);

/// Why an answer from the CA was not used.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error(
        "the CA answered {0} certificate(s); want the leaf, any intermediates and the roots last"
    )]
    TooShort(usize),
    #[error("element {index} of the CA's answer is not a PEM certificate: {problem}")]
    Pem { index: usize, problem: String },
    #[error("the issued certificate names {got:?}, not {want}")]
    WrongIdentity { got: Vec<String>, want: String },
    #[error("the issued certificate is not for our key")]
    WrongKey,
    #[error("the issued chain does not verify to the roots in the answer: {0}")]
    Untrusted(String),
    #[error("the issued certificate's lifetime is not sane: {0}")]
    Lifetime(String),
}

/// A checked certificate with its key and trust bundle.
#[derive(Clone)]
pub struct Svid {
    /// The SPIFFE ID.
    pub id: SpiffeId,
    /// Leaf and intermediates (no root), PEM: Envoy's `certificate_chain`.
    pub chain_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The trust bundle from the answer, PEM.
    pub roots_pem: String,
    /// Leaf serial, hex.
    pub serial: String,
    /// Issuer of the leaf.
    pub issuer: String,
    /// Validity.
    pub not_before: OffsetDateTime,
    /// Validity.
    pub not_after: OffsetDateTime,
    /// Number of certificates in `chain_pem`.
    pub chain_len: usize,
    /// SHA-256 of each root in `roots_pem`, sorted, without repeats.
    pub root_digests: Vec<[u8; 32]>,
    /// What the CA said of its trust change with this answer.
    pub trust: TrustNote,
}

/// What signet-ca says of its trust change with an answer (other CAs say nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustNote {
    /// The stage of the CA's trust change the answer's bundle belongs to
    /// (`distribute`, ...); `None` when the CA did not say.
    pub stage: Option<String>,
    /// Whether the request that brought it told the CA these very roots as the ones
    /// served; if not, the CA learns it from the next request.
    pub reported: bool,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.to_string())
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// The lifetime from NotBefore to NotAfter.
    pub fn lifetime(&self) -> Duration {
        self.not_after - self.not_before
    }
}

/// Checks a `cert_chain` answer: element 0 is a leaf for `id` over our public key
/// `spki`, it verifies through the middle elements to a root of the last element,
/// and its lifetime makes sense at `now`.
pub fn check_answer(
    cert_chain: &[String],
    id: &SpiffeId,
    spki: &[u8],
    key_pem: String,
    now: OffsetDateTime,
) -> Result<Svid, AnswerError> {
    if cert_chain.len() < 2 {
        return Err(AnswerError::TooShort(cert_chain.len()));
    }
    let parse = |index: usize, pem: &str| -> Result<Vec<CertificateDer<'static>>, AnswerError> {
        let certs = ::pem::parse_many(pem).map_err(|e| AnswerError::Pem {
            index,
            problem: e.to_string(),
        })?;
        let certs: Vec<_> = certs
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(|p| CertificateDer::from(p.into_contents()))
            .collect();
        if certs.is_empty() {
            return Err(AnswerError::Pem {
                index,
                problem: "no CERTIFICATE block".into(),
            });
        }
        Ok(certs)
    };
    let leaf = parse(0, &cert_chain[0])?.swap_remove(0);
    let roots = parse(cert_chain.len() - 1, &cert_chain[cert_chain.len() - 1])?;
    let mut intermediates = Vec::new();
    for (i, pem) in cert_chain
        .iter()
        .enumerate()
        .take(cert_chain.len() - 1)
        .skip(1)
    {
        intermediates.extend(parse(i, pem)?);
    }

    let (_, cert) = X509Certificate::from_der(&leaf).map_err(|e| AnswerError::Pem {
        index: 0,
        problem: e.to_string(),
    })?;
    if cert.public_key().raw != spki {
        return Err(AnswerError::WrongKey);
    }
    let (uris, _) = signet_spiffe::san_names(&cert);
    if uris.len() != 1 || uris[0] != id.to_string() {
        return Err(AnswerError::WrongIdentity {
            got: uris,
            want: id.to_string(),
        });
    }
    let not_before = cert.validity().not_before.to_datetime();
    let not_after = cert.validity().not_after.to_datetime();
    if not_after <= now {
        return Err(AnswerError::Lifetime(format!("it expired at {not_after}")));
    }
    if not_before > now + MAX_FUTURE_NOT_BEFORE {
        return Err(AnswerError::Lifetime(format!(
            "it is not valid until {not_before}"
        )));
    }
    if not_after - not_before > MAX_LIFETIME {
        return Err(AnswerError::Lifetime(format!(
            "{} is longer than a year",
            not_after - not_before
        )));
    }

    let anchors: Vec<_> = roots
        .iter()
        .filter_map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .ok()
                .map(|a| a.to_owned())
        })
        .collect();
    let ee = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| AnswerError::Untrusted(format!("{e:?}")))?;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now.unix_timestamp()).unwrap_or(0),
    ));
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        time,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| AnswerError::Untrusted(format!("{e:?}")))?;

    // Envoy gets leaf and intermediates; roots it gets through ROOTCA.
    let mut chain_pem = cert_chain[0].trim_end().to_owned() + "\n";
    let mut chain_len = 1;
    for der in intermediates.iter().filter(|c| !roots.contains(c)) {
        chain_pem.push_str(&signet_spiffe::pem_cert(der));
        chain_len += 1;
    }
    let roots_pem: String = roots.iter().map(|r| signet_spiffe::pem_cert(r)).collect();
    let mut root_digests: Vec<[u8; 32]> = roots
        .iter()
        .map(|r| {
            use sha2::Digest;
            sha2::Sha256::digest(r.as_ref()).into()
        })
        .collect();
    root_digests.sort_unstable();
    root_digests.dedup();
    Ok(Svid {
        id: id.clone(),
        chain_pem,
        key_pem,
        roots_pem,
        serial: hex::encode(cert.raw_serial()),
        issuer: cert.issuer().to_string(),
        not_before,
        not_after,
        chain_len,
        root_digests,
        trust: TrustNote::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Whatever a CA sends, the checks answer; they never panic.
    #[test]
    fn hostile_answers_never_panic() {
        let id = SpiffeId::new("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
        let cert = params.self_signed(&key).unwrap().pem();
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7376_6964);
        let now = OffsetDateTime::now_utc();
        use rcgen::PublicKeyData;
        let spki = key.subject_public_key_info();
        for _ in 0..500 {
            let mut bytes = cert.clone().into_bytes();
            let i = rng.random_range(28..bytes.len() - 26);
            bytes[i] = b"AZaz09+/="[rng.random_range(0..9)];
            let mutated = String::from_utf8_lossy(&bytes).into_owned();
            let answer = vec![mutated.clone(), mutated];
            let _ = check_answer(&answer, &id, &spki, String::new(), now);
        }
        for answer in [
            vec![],
            vec![String::new()],
            vec!["x".repeat(100_000), String::new()],
        ] {
            assert!(check_answer(&answer, &id, &spki, String::new(), now).is_err());
        }
    }
}
