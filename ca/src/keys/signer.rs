//! Issuing workload certificates under the loaded CA key material.

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, TrustAnchor, UnixTime};
use sha2::{Digest, Sha256};
use spiffe::SpiffeId;
use time::{Duration, OffsetDateTime};
use x509_parser::{certificate::X509Certificate, extensions::ParsedExtension, prelude::FromDer};

use super::checks::{
    chain_not_after, check_signing_cert, check_time, describe_webpki, material, trust_anchors,
};
use crate::{
    keys::KeyKind,
    keys::cacerts::{KeyMaterial, Source},
};

/// Why key material cannot sign, or why one signature failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The key material is unusable; names the file and the problem.
    #[error("{path}: {problem}")]
    Material { path: String, problem: String },
    /// The signing certificate (or chain) has expired or is not yet valid.
    #[error("the CA's signing certificate is not valid at this time (valid until {0})")]
    Expired(OffsetDateTime),
    /// A CSR public key rcgen could not use.
    #[error("the CSR's public key cannot be used: {0}")]
    PublicKey(String),
    /// The signature operation or the post-signing check failed.
    #[error("signing failed: {0}")]
    Internal(String),
}

/// A freshly issued certificate, with the chain and roots it was issued under, kept
/// apart: each entry point puts them in its own wire order.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The leaf, PEM.
    pub leaf: String,
    /// The signing certificate and the operator's chain above it, as
    /// `cert-chain.pem` holds them (the root too, when the operator put it there).
    pub chain: Vec<ChainCert>,
    /// The trust bundle, PEM.
    pub roots: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the workload's SubjectPublicKeyInfo, lowercase hex.
    pub public_key_sha256: String,
    /// Validity start.
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
}

/// Istio backdates NotBefore by this much for clock skew; Signet never backdates more.
pub const MAX_BACKDATE: Duration = Duration::minutes(2);

/// A certificate's validity, whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// NotBefore.
    pub not_before: OffsetDateTime,
    /// NotAfter.
    pub not_after: OffsetDateTime,
}

/// NotBefore and NotAfter for `lifetime` from `now`: backdated by at most 10 % of
/// the lifetime (and [`MAX_BACKDATE`]), so that a short certificate is not due for
/// renewal the moment it arrives; NotAfter clamped to `limit`. `None` when `limit`
/// leaves no time.
pub fn validity(
    now: OffsetDateTime,
    lifetime: Duration,
    limit: OffsetDateTime,
) -> Option<Validity> {
    let backdate = (lifetime / 10_i32).min(MAX_BACKDATE);
    let not_after = (now + lifetime).min(limit);
    (not_after > now).then(|| Validity {
        not_before: seconds(now - backdate),
        not_after: seconds(not_after),
    })
}

/// Whole seconds: X.509 times have no fractions, and truncating keeps both bounds
/// inside what was asked.
pub(crate) fn seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// One certificate of the signing chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainCert {
    /// PEM.
    pub pem: String,
    /// Also in the trust bundle (a root the operator put in `cert-chain.pem`).
    pub is_root: bool,
}

/// A CA ready to sign: key material that passed every load-time check.
#[derive(Debug)]
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    kind: KeyKind,
    source: Source,
    digest: [u8; 32],
    signing_cert: CertificateDer<'static>,
    /// The signing certificate's subject (DER) and key identifier, which every leaf
    /// must name.
    signing_subject: Vec<u8>,
    signing_key_id: Option<Vec<u8>>,
    chain: Vec<CertificateDer<'static>>,
    chain_pem: Vec<ChainCert>,
    roots: Vec<CertificateDer<'static>>,
    /// SHA-256 of each root, sorted, without repeats.
    root_digests: Vec<[u8; 32]>,
    roots_pem: String,
    crls: Vec<CertificateRevocationListDer<'static>>,
    anchor: TrustAnchor<'static>,
    signing_not_after: OffsetDateTime,
    root_not_after: OffsetDateTime,
    leaf_not_after_limit: OffsetDateTime,
}

impl Signer {
    /// Checks the key material and builds a signer: the key matches the certificate,
    /// the certificate may sign certificates, nothing is expired, and a probe leaf
    /// signed with this very code verifies through the chain to a root of the bundle.
    ///
    /// Whatever the files hold, this answers: a panic inside the certificate
    /// libraries on some input nobody has found yet becomes an error naming the
    /// signing certificate, so a bad reload cannot take the reload task down.
    pub fn new(m: KeyMaterial, now: OffsetDateTime) -> Result<Self, SignError> {
        let cert_path = m.signing_cert_path.display().to_string();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::checked(m, now)))
            .unwrap_or_else(|_| {
                Err(SignError::Material {
                    path: cert_path,
                    problem: "the certificate libraries failed on this key material".into(),
                })
            })
    }

    fn checked(m: KeyMaterial, now: OffsetDateTime) -> Result<Self, SignError> {
        let cert_path = m.signing_cert_path.display().to_string();
        let roots_path = m.roots_path.display().to_string();
        let (_, signing) = X509Certificate::from_der(&m.signing_cert)
            .map_err(|e| material(&cert_path, format!("malformed certificate: {e}")))?;
        check_signing_cert(&signing, &m.key, &cert_path, now)?;
        let signing_not_after = signing.validity().not_after.to_datetime();
        let leaf_not_after_limit = chain_not_after(&m.chain, signing_not_after, &cert_path, now)?;
        let anchors = trust_anchors(&m.roots, &roots_path)?;
        let first_anchor = anchors
            .first()
            .cloned()
            .ok_or_else(|| material(&roots_path, "no root certificate".into()))?;
        let issuer = Issuer::from_ca_cert_der(&m.signing_cert, m.key.pair).map_err(|e| {
            material(
                &cert_path,
                format!("cannot sign with this certificate: {e}"),
            )
        })?;
        let to_pem = |c: &CertificateDer<'_>| signet_spiffe::pem_cert(c);
        let signing_subject = signing.subject().as_raw().to_vec();
        let signing_key_id = signing
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0.to_vec()),
                _ => None,
            });
        let mut signer = Self {
            issuer,
            kind: m.key.kind,
            source: m.source,
            digest: m.digest,
            chain_pem: m
                .chain
                .iter()
                .map(|c| ChainCert {
                    pem: to_pem(c),
                    is_root: m.roots.contains(c),
                })
                .collect(),
            chain: m.chain,
            roots_pem: m.roots.iter().map(to_pem).collect(),
            root_digests: digests(&m.roots),
            signing_cert: m.signing_cert,
            signing_subject,
            signing_key_id,
            roots: m.roots,
            crls: m.crls,
            anchor: first_anchor,
            signing_not_after,
            root_not_after: signing_not_after,
            leaf_not_after_limit,
        };
        signer.prove(&anchors, &cert_path, &roots_path, now)?;
        Ok(signer)
    }

    /// The probe: signs a real leaf with the very code that signs requests and
    /// verifies it with webpki exactly as a peer would, through the chain to a root of
    /// the bundle; then bounds every leaf by the root the chain ends at.
    fn prove(
        &mut self,
        anchors: &[TrustAnchor<'static>],
        cert_path: &str,
        roots_path: &str,
        now: OffsetDateTime,
    ) -> Result<(), SignError> {
        let probe_key = crate::keys::generate_p256()
            .map_err(|e| SignError::Internal(format!("probe key: {e}")))?;
        let probe_id = SpiffeId::new("spiffe://signet.invalid/probe")
            .map_err(|e| SignError::Internal(e.to_string()))?;
        let probe = self.sign(
            &probe_key.pair.subject_public_key_info(),
            &probe_id,
            &self.window(Duration::minutes(1), now)?,
        )?;
        let leaf = CertificateDer::from(
            pem::parse(&probe.leaf)
                .map_err(|e| SignError::Internal(e.to_string()))?
                .into_contents(),
        );
        let ee = webpki::EndEntityCert::try_from(&leaf)
            .map_err(|e| SignError::Internal(format!("probe certificate: {e:?}")))?;
        let verify_time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(now.unix_timestamp()).unwrap_or(0),
        ));
        let chain_certs = self.chain_certs();
        let path = ee
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                anchors,
                &chain_certs,
                verify_time,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(|e| {
                material(
                    roots_path,
                    format!(
                        "the signing chain from {cert_path} does not verify to a root in this bundle: {}",
                        describe_webpki(&e)
                    ),
                )
            })?;
        let anchor = path.anchor().to_owned();
        // The root the chain ends at bounds every leaf too. It is found through the
        // anchor webpki hands back, which was made from the roots in order (names are
        // not compared: x509-parser's raw subject keeps its SEQUENCE header, webpki's
        // does not). Several roots can make the same anchor (one re-issued with the
        // same key and name): the one valid now that lasts longest is the chain's end.
        let root_not_after = anchors
            .iter()
            .zip(&self.roots)
            .filter(|(a, _)| **a == anchor)
            .filter_map(|(_, der)| X509Certificate::from_der(der).ok().map(|(_, c)| c))
            .filter(|c| check_time(c, now).is_ok())
            .map(|c| c.validity().not_after.to_datetime())
            .max()
            .ok_or_else(|| {
                material(
                    roots_path,
                    "the root the signing chain ends at is not valid at this time".into(),
                )
            })?;
        self.root_not_after = root_not_after;
        self.leaf_not_after_limit = self.leaf_not_after_limit.min(root_not_after);
        self.anchor = anchor;
        Ok(())
    }

    /// Signs a workload leaf for `id` over the public key `spki_der`, valid exactly
    /// for `validity` (as policy decided); refused when that ends past what the chain
    /// allows (the key material changed since).
    ///
    /// The leaf's signature is not verified again per request: the load-time probe
    /// (see [`Signer::new`]) verified this exact code path with webpki through the
    /// whole chain, and ring checks its own RSA signatures against faults. Each leaf
    /// gets the cheap structural checks of [`Self::check_leaf`].
    pub fn sign(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        validity: &Validity,
    ) -> Result<Issued, SignError> {
        self.sign_named(spki_der, id, validity, None)
    }

    /// [`Self::sign`] with a Subject common name (`--subject-cn-template`); without
    /// one the subject is empty and the SAN extension critical, as RFC 5280 wants.
    pub fn sign_named(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        validity: &Validity,
        subject_cn: Option<&str>,
    ) -> Result<Issued, SignError> {
        let uri = id
            .to_string()
            .try_into()
            .map_err(|e| SignError::Internal(format!("SPIFFE ID as URI: {e}")))?;
        let eku = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(spki_der, vec![SanType::URI(uri)], eku, validity, subject_cn)
    }

    /// Signs the CA's own TLS serving certificate for `dns_names`.
    pub fn sign_server(
        &self,
        spki_der: &[u8],
        dns_names: &[String],
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<Issued, SignError> {
        let sans = dns_names
            .iter()
            .map(|n| {
                n.clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e| SignError::Internal(format!("DNS name {n:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let validity = self.window(lifetime, now)?;
        self.issue(
            spki_der,
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            &validity,
            None,
        )
    }

    /// Policy's window for `lifetime` from `now` under this chain, for the CA's own
    /// certificates (serving certificates, the load-time probe).
    pub fn window(&self, lifetime: Duration, now: OffsetDateTime) -> Result<Validity, SignError> {
        validity(now, lifetime, self.leaf_not_after_limit)
            .ok_or(SignError::Expired(self.leaf_not_after_limit))
    }

    fn issue(
        &self,
        spki_der: &[u8],
        sans: Vec<SanType>,
        eku: Vec<ExtendedKeyUsagePurpose>,
        validity: &Validity,
        subject_cn: Option<&str>,
    ) -> Result<Issued, SignError> {
        let Validity {
            not_before,
            not_after,
        } = *validity;
        if not_after > self.leaf_not_after_limit || not_before >= not_after {
            return Err(SignError::Expired(self.leaf_not_after_limit));
        }
        let mut params = CertificateParams::default();
        // An empty subject makes rcgen mark the SAN extension critical (RFC 5280).
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = subject_cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = eku;
        params.use_authority_key_identifier_extension = true;
        let serial = crate::keys::random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        params.not_before = not_before;
        params.not_after = not_after;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| SignError::PublicKey(e.to_string()))?;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| SignError::Internal(e.to_string()))?;
        self.check_leaf(cert.der())?;

        Ok(Issued {
            leaf: cert.pem(),
            chain: self.chain_pem.clone(),
            roots: self.roots_pem.clone(),
            serial: serial_hex,
            public_key_sha256: hex::encode(Sha256::digest(spki_der)),
            not_before,
            not_after,
        })
    }

    /// The leaf names the signing certificate as its issuer, by subject and by key
    /// identifier: what a verifier uses to build the path the probe proved.
    fn check_leaf(&self, leaf: &[u8]) -> Result<(), SignError> {
        let bad = |what: &str| {
            SignError::Internal(format!("issued certificate failed its check: {what}"))
        };
        let (_, leaf) = X509Certificate::from_der(leaf).map_err(|_| bad("does not parse"))?;
        if leaf.issuer().as_raw() != self.signing_subject.as_slice() {
            return Err(bad(
                "issuer name differs from the signing certificate's subject",
            ));
        }
        let aki = leaf
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref(),
                _ => None,
            });
        if let Some(ski) = &self.signing_key_id
            && aki.map(|k| k.0) != Some(ski.as_slice())
        {
            return Err(bad(
                "authority key identifier differs from the signing certificate's",
            ));
        }
        Ok(())
    }

    /// The signing certificate followed by the operator's chain, DER.
    pub fn chain_certs(&self) -> Vec<CertificateDer<'static>> {
        let mut certs = Vec::with_capacity(self.chain.len() + 1);
        certs.push(self.signing_cert.clone());
        certs.extend(
            self.chain
                .iter()
                .filter(|c| **c != self.signing_cert)
                .cloned(),
        );
        certs
    }

    /// The CA key's type.
    pub fn key_kind(&self) -> KeyKind {
        self.kind
    }
    /// Where the key material came from.
    pub fn source(&self) -> &Source {
        &self.source
    }
    /// Digest of the files this signer was loaded from.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }
    /// The trust bundle, DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
    /// Revocation lists from `ca-crl.pem` (empty when there is none).
    pub fn crls(&self) -> &[CertificateRevocationListDer<'static>] {
        &self.crls
    }
    /// SHA-256 of each root of the bundle, sorted, without repeats.
    pub fn root_digests(&self) -> &[[u8; 32]] {
        &self.root_digests
    }
    /// The trust bundle as the PEM string sent as the last `cert_chain` element.
    pub fn roots_pem(&self) -> &str {
        &self.roots_pem
    }
    /// The root the signing chain verified to.
    pub fn anchor(&self) -> &TrustAnchor<'static> {
        &self.anchor
    }
    /// Whether `roots` (DER) include the root this signer's chain ends at.
    pub fn anchor_in(&self, roots: &[CertificateDer<'_>]) -> bool {
        roots.iter().any(|r| {
            webpki::anchor_from_trusted_cert(r).is_ok_and(|a| {
                a.subject.as_ref() == self.anchor.subject.as_ref()
                    && a.subject_public_key_info.as_ref()
                        == self.anchor.subject_public_key_info.as_ref()
            })
        })
    }
    /// NotAfter of the signing certificate.
    pub fn signing_not_after(&self) -> OffsetDateTime {
        self.signing_not_after
    }
    /// NotAfter of the root the chain ends at.
    pub fn root_not_after(&self) -> OffsetDateTime {
        self.root_not_after
    }
    /// The latest NotAfter any leaf can get.
    pub fn leaf_not_after_limit(&self) -> OffsetDateTime {
        self.leaf_not_after_limit
    }
}

/// SHA-256 of each of `roots`, sorted, without repeats.
fn digests(roots: &[CertificateDer<'_>]) -> Vec<[u8; 32]> {
    let mut all: Vec<[u8; 32]> = roots
        .iter()
        .map(|r| Sha256::digest(r.as_ref()).into())
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An Istio-layout cacerts directory: a root valid `root_days`, an intermediate
    /// under it valid `intermediate_days`, both from `now` less a day; `cert-chain.pem`
    /// holds the root after the intermediate when `chain_with_root`.
    fn cacerts(
        now: OffsetDateTime,
        root_days: i64,
        intermediate_days: i64,
        chain_with_root: bool,
    ) -> tempfile::TempDir {
        let ca = |name: &str, days: i64| {
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, name.to_owned());
            p.distinguished_name
                .push(rcgen::DnType::OrganizationName, "Signet test".to_owned());
            p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p.not_before = now - Duration::days(1);
            p.not_after = now + Duration::days(days);
            p
        };
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let root = ca("root", root_days).self_signed(&root_key).unwrap();
        let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let root_issuer = Issuer::new(ca("root", root_days), &root_key);
        let int = ca("intermediate", intermediate_days)
            .signed_by(&int_key, &root_issuer)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let write = |n: &str, c: String| std::fs::write(dir.path().join(n), c).unwrap();
        write("ca-cert.pem", int.pem());
        write("ca-key.pem", int_key.serialize_pem());
        write("root-cert.pem", root.pem());
        let tail = if chain_with_root {
            root.pem()
        } else {
            String::new()
        };
        write("cert-chain.pem", format!("{}{tail}", int.pem()));
        dir
    }

    fn leaf_key() -> Vec<u8> {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .subject_public_key_info()
    }

    #[test]
    fn the_root_behind_an_intermediate_gives_the_root_expiry() {
        // Whole seconds, as certificates keep them.
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let dir = cacerts(now, 3650, 365, true);
        let m = crate::keys::cacerts::load_dir(dir.path()).unwrap().unwrap();
        let signer = Signer::new(m, now).unwrap();
        let day = |d: OffsetDateTime| (d - now).whole_days();
        assert_eq!(day(signer.root_not_after()), 3650, "the root's NotAfter");
        assert_eq!(day(signer.signing_not_after()), 365);
        // A leaf may last as long as the intermediate, which the root outlives.
        let id = SpiffeId::new("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let issued = signer
            .sign(
                &leaf_key(),
                &id,
                &signer.window(Duration::days(400), now).unwrap(),
            )
            .unwrap();
        assert_eq!(issued.not_after, signer.signing_not_after());
    }

    #[test]
    fn a_root_expiring_before_its_intermediate_bounds_every_leaf() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        // Only the root bounds the leaf: cert-chain.pem does not hold it.
        let dir = cacerts(now, 3, 365, false);
        let m = crate::keys::cacerts::load_dir(dir.path()).unwrap().unwrap();
        let signer = Signer::new(m, now).unwrap();
        assert_eq!((signer.root_not_after() - now).whole_days(), 3);
        let id = SpiffeId::new("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let issued = signer
            .sign(
                &leaf_key(),
                &id,
                &signer.window(Duration::days(10), now).unwrap(),
            )
            .unwrap();
        assert_eq!(
            issued.not_after,
            signer.root_not_after(),
            "a 10-day leaf under a 3-day root ends with the root"
        );
        assert_eq!(signer.leaf_not_after_limit(), signer.root_not_after());
    }
}
