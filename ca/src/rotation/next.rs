//! The declared next set, checked before anything is distributed: it must sign (the
//! same proof as any key material: key matches, chain verifies to a root of its
//! bundle, nothing expired), last through the rotation, stay in our trust domain, and
//! be no weaker than the set it replaces.

use std::path::PathBuf;

use rustls_pki_types::CertificateDer;
use signet_spiffe::TrustDomains;
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::keys::{KeyKind, cacerts::Source, signer::Signer};

/// Why the next set is refused; names the file and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct NextError {
    /// The file at fault.
    pub path: String,
    /// What is wrong with it.
    pub problem: String,
}

/// The file that holds a set's signing certificate.
pub fn signing_cert_file(source: &Source) -> PathBuf {
    match source {
        Source::Istio(d) => d.join("ca-cert.pem"),
        Source::CertManager(d) => d.join("tls.crt"),
        Source::SelfSigned(d) => d.join(crate::keys::cacerts::SELF_SIGNED_CERT),
    }
}

/// How the bundles change from `current` to `next`: (adds a root, drops a root).
pub fn bundle_change(current: &Signer, next: &Signer) -> (bool, bool) {
    let lacks =
        |a: &[CertificateDer<'_>], b: &[CertificateDer<'_>]| a.iter().any(|c| !b.contains(c));
    (
        lacks(next.roots(), current.roots()),
        lacks(current.roots(), next.roots()),
    )
}

/// Checks `next` (already proven to sign by [`Signer::new`]) against `current`:
/// it can sign a leaf of `leaf_lifetime` until `must_last_until` (the latest end of
/// the rotation), names no other trust domain, and its key is no weaker.
pub fn check(
    current: &Signer,
    next: &Signer,
    trust_domains: &TrustDomains,
    must_last_until: OffsetDateTime,
) -> Result<(), NextError> {
    let cert_path = signing_cert_file(next.source()).display().to_string();
    let err = |problem: String| NextError {
        path: cert_path.clone(),
        problem,
    };
    if next.leaf_not_after_limit() < must_last_until {
        return Err(err(format!(
            "the chain allows leaves only until {}, but the rotation may run until {} and the leaves issued then must last; use a set valid for longer",
            signet_telemetry::rfc3339(next.leaf_not_after_limit()),
            signet_telemetry::rfc3339(must_last_until),
        )));
    }
    if let Some(foreign) = foreign_trust_domain(&next.chain_certs()[0], trust_domains) {
        return Err(err(format!(
            "the signing certificate names the trust domain {foreign:?}, not this CA's {:?}; a rotation cannot change the trust domain",
            trust_domains.primary().as_str()
        )));
    }
    let (old, new) = (strength(current.key_kind()), strength(next.key_kind()));
    if new < old {
        return Err(NextError {
            path: signing_cert_file(next.source())
                .with_file_name(key_file(next.source()))
                .display()
                .to_string(),
            problem: format!(
                "a {} key is weaker than the {} key in use (about {new} against {old} bits of security); a rotation must not weaken the CA",
                next.key_kind(),
                current.key_kind()
            ),
        });
    }
    Ok(())
}

fn key_file(source: &Source) -> &'static str {
    match source {
        Source::Istio(_) => "ca-key.pem",
        Source::CertManager(_) => "tls.key",
        Source::SelfSigned(_) => crate::keys::cacerts::SELF_SIGNED_KEY,
    }
}

/// Security strength in bits (NIST SP 800-57).
fn strength(kind: KeyKind) -> u32 {
    match kind {
        KeyKind::P256 => 128,
        KeyKind::P384 => 192,
        KeyKind::Rsa(bits) if bits >= 15360 => 256,
        KeyKind::Rsa(bits) if bits >= 7680 => 192,
        KeyKind::Rsa(bits) if bits >= 3072 => 128,
        KeyKind::Rsa(bits) if bits >= 2048 => 112,
        KeyKind::Rsa(_) => 80,
    }
}

/// The trust domain of a `spiffe://` URI SAN on the signing certificate that is not
/// ours (CA certificates may carry one, e.g. SPIRE's).
fn foreign_trust_domain(cert: &CertificateDer<'_>, trust_domains: &TrustDomains) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => {
            let rest = uri.strip_prefix("spiffe://")?;
            let domain = rest.split('/').next().unwrap_or(rest);
            (!trust_domains.contains(domain)).then(|| domain.to_owned())
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_orders_the_key_kinds() {
        assert!(strength(KeyKind::Rsa(2048)) < strength(KeyKind::P256));
        assert_eq!(strength(KeyKind::Rsa(3072)), strength(KeyKind::P256));
        assert!(strength(KeyKind::P384) > strength(KeyKind::Rsa(4096)));
    }
}
