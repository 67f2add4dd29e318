//! The load-time checks of a key material set, one certificate at a time: the
//! signing certificate can sign with its key, the chain and roots are valid now,
//! names can be written back into leaves; and webpki's verdicts in words.

use rustls_pki_types::{CertificateDer, TrustAnchor};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::signer::SignError;

pub(super) fn material(path: &str, problem: String) -> SignError {
    SignError::Material {
        path: path.to_owned(),
        problem,
    }
}

/// The signing certificate can sign with this key: the key is its key, it is a CA
/// allowed to sign certificates, valid now, and its name can be written into leaves.
pub(super) fn check_signing_cert(
    signing: &X509Certificate<'_>,
    key: &crate::keys::SigningKey,
    cert_path: &str,
    now: OffsetDateTime,
) -> Result<(), SignError> {
    if signing.public_key().subject_public_key.data.as_ref() != key.pair.public_key_raw() {
        return Err(material(
            cert_path,
            "the private key does not match this certificate's public key".into(),
        ));
    }
    match signing.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => {
            return Err(material(
                cert_path,
                "not a CA certificate (basicConstraints CA:TRUE is missing)".into(),
            ));
        }
    }
    if let Ok(Some(ku)) = signing.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(material(
            cert_path,
            "keyUsage lacks keyCertSign, so it may not sign certificates".into(),
        ));
    }
    check_time(signing, now).map_err(|p| material(cert_path, p.to_string()))?;
    check_name_oids(signing.subject()).map_err(|p| material(cert_path, p.to_string()))
}

/// The latest NotAfter a leaf can get under `chain`, from the signing certificate's
/// `signing_not_after`; every chain certificate must be valid now.
pub(super) fn chain_not_after(
    chain: &[CertificateDer<'static>],
    signing_not_after: OffsetDateTime,
    cert_path: &str,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, SignError> {
    let mut limit = signing_not_after;
    for cert in chain {
        let (_, c) = X509Certificate::from_der(cert)
            .map_err(|e| material(cert_path, format!("malformed chain certificate: {e}")))?;
        check_time(&c, now)
            .map_err(|p| material(cert_path, format!("chain certificate {}: {p}", c.subject())))?;
        limit = limit.min(c.validity().not_after.to_datetime());
    }
    Ok(limit)
}

/// The bundle's roots as webpki trust anchors, in order.
pub(super) fn trust_anchors(
    roots: &[CertificateDer<'static>],
    roots_path: &str,
) -> Result<Vec<TrustAnchor<'static>>, SignError> {
    roots
        .iter()
        .map(|root| {
            webpki::anchor_from_trusted_cert(root)
                .map(|a| a.to_owned())
                .map_err(|e| material(roots_path, format!("unusable root certificate: {e:?}")))
        })
        .collect()
}

/// rcgen writes the issuer's name anew into every certificate it signs, and its DER
/// writer panics on an object identifier DER cannot encode (a first arc over 2, or a
/// second arc over 39 under arcs 0 and 1). A signing certificate whose subject holds
/// one is refused here, at load, instead of panicking when it signs. (Found by the
/// `cacerts` fuzz target.)
pub(super) fn check_name_oids(name: &x509_parser::x509::X509Name<'_>) -> Result<(), CertProblem> {
    for attr in name.iter_attributes() {
        let oid = attr.attr_type();
        let arcs: Option<Vec<u64>> = oid.iter().map(Iterator::collect);
        let encodable = arcs.is_some_and(|a| a.len() >= 2 && a[0] <= 2 && (a[0] == 2 || a[1] < 40));
        if !encodable {
            return Err(CertProblem::UnencodableOid(oid.to_string()));
        }
    }
    Ok(())
}

/// What makes one certificate of a set unusable.
#[derive(Debug, thiserror::Error)]
pub(super) enum CertProblem {
    #[error("not valid until {0}")]
    NotYetValid(String),
    #[error("expired on {0}")]
    Expired(String),
    #[error(
        "its subject holds an attribute type ({0}) that cannot be written back into issued certificates"
    )]
    UnencodableOid(String),
}

pub(super) fn check_time(
    cert: &X509Certificate<'_>,
    now: OffsetDateTime,
) -> Result<(), CertProblem> {
    let v = cert.validity();
    if now < v.not_before.to_datetime() {
        return Err(CertProblem::NotYetValid(v.not_before.to_string()));
    }
    if now > v.not_after.to_datetime() {
        return Err(CertProblem::Expired(v.not_after.to_string()));
    }
    Ok(())
}

pub(super) fn describe_webpki(e: &webpki::Error) -> String {
    use webpki::Error as E;
    match e {
        E::UnknownIssuer => "no certificate in the chain is issued by a root in the bundle".into(),
        E::CertExpired { .. } => "a certificate in the chain has expired".into(),
        E::CertNotValidYet { .. } => "a certificate in the chain is not yet valid".into(),
        E::PathLenConstraintViolated => "a pathlen constraint in the chain is violated".into(),
        E::CaUsedAsEndEntity | E::EndEntityUsedAsCa => {
            "a certificate in the chain is not marked as a CA".into()
        }
        E::InvalidSignatureForPublicKey => "a signature in the chain does not verify".into(),
        other => format!("{other:?}"),
    }
}
