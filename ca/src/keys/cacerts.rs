//! CA key material: Istio's `cacerts` directory, cert-manager's `tls.*` layout, or a
//! self-signed root kept in the state directory.
//!
//! This module reads and parses files. Whether the set can sign (key matches, chain
//! verifies, nothing expired) is decided by [`crate::keys::signer::Signer::new`], which
//! signs and verifies a probe certificate with exactly the code that serves requests.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, pem::PemObject};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::keys::{self, KeyError, SigningKey};

/// Istio's plugged-in CA files (contract §4).
pub const ISTIO_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
];
/// Istio's optional revocation list beside the plugged-in CA files: serials listed
/// there cannot renew by client certificate.
pub const CRL_FILE: &str = "ca-crl.pem";
/// cert-manager's secret layout.
pub const CERT_MANAGER_FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];
/// File names of the self-signed root in the state directory.
pub const SELF_SIGNED_CERT: &str = "root-cert.pem";
/// See [`SELF_SIGNED_CERT`].
pub const SELF_SIGNED_KEY: &str = "root-key.pem";
/// Lifetime of a generated self-signed root (as istiod's: 10 years).
pub const SELF_SIGNED_LIFETIME: Duration = Duration::days(3650);

/// What was wrong with the key material.
#[derive(Debug, thiserror::Error)]
pub enum CaCertsError {
    #[error(
        "{dir}: incomplete CA set: found {found:?} but {missing:?} missing ({layout} layout needs all of {needs:?})"
    )]
    Partial {
        dir: PathBuf,
        layout: &'static str,
        found: Vec<&'static str>,
        missing: Vec<&'static str>,
        needs: Vec<&'static str>,
    },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("{path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("cannot create the self-signed root: {0}")]
    Generate(String),
}

/// Where a set of key material came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Istio's `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`.
    Istio(PathBuf),
    /// cert-manager's `tls.crt`, `tls.key`, `ca.crt`.
    CertManager(PathBuf),
    /// A root Signet generated and keeps in its state directory.
    SelfSigned(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Istio(d) => write!(f, "cacerts {}", d.display()),
            Self::CertManager(d) => write!(f, "cert-manager secret {}", d.display()),
            Self::SelfSigned(d) => write!(f, "self-signed root in {}", d.display()),
        }
    }
}

/// Parsed key material, not yet checked for coherence.
#[derive(Debug)]
pub struct KeyMaterial {
    /// Where it came from.
    pub source: Source,
    /// The certificate new leaves are issued under.
    pub signing_cert: CertificateDer<'static>,
    /// Its private key.
    pub key: SigningKey,
    /// Path of the signing certificate file, for error messages.
    pub signing_cert_path: PathBuf,
    /// Certificates between the leaf and the trust bundle, as the operator gave them
    /// (`cert-chain.pem`: signing cert up to and including the root). Empty when the
    /// signing certificate is itself the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The trust bundle: one or more roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// Path of the trust bundle file.
    pub roots_path: PathBuf,
    /// Revocation lists (`ca-crl.pem`), checked when a caller renews with its
    /// client certificate.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// SHA-256 over every file read, to tell a changed set from an unchanged one.
    pub digest: [u8; 32],
}

/// Reads a cacerts directory. `Ok(None)` when it holds none of the files of either
/// layout (or does not exist): the caller then falls back to a self-signed root.
pub fn load_dir(dir: &Path) -> Result<Option<KeyMaterial>, CaCertsError> {
    let present = |names: &[&'static str]| -> Vec<&'static str> {
        names
            .iter()
            .copied()
            .filter(|n| dir.join(n).exists())
            .collect()
    };
    let istio = present(&ISTIO_FILES);
    let cm = present(&CERT_MANAGER_FILES);
    if istio.is_empty() && cm.is_empty() {
        return Ok(None);
    }
    let (layout, needs, found): (&str, &[&'static str], Vec<&'static str>) = if !istio.is_empty() {
        ("Istio", &ISTIO_FILES, istio)
    } else {
        ("cert-manager", &CERT_MANAGER_FILES, cm)
    };
    let missing: Vec<&'static str> = needs
        .iter()
        .copied()
        .filter(|n| !found.contains(n))
        .collect();
    if !missing.is_empty() {
        return Err(CaCertsError::Partial {
            dir: dir.to_owned(),
            layout,
            found,
            missing,
            needs: needs.to_vec(),
        });
    }
    let mut hasher = Sha256::new();
    let mut read = |name: &str| -> Result<(PathBuf, Vec<u8>), CaCertsError> {
        let path = dir.join(name);
        let bytes = fs::read(&path).map_err(|source| CaCertsError::Read {
            path: path.clone(),
            source,
        })?;
        hasher.update(name.as_bytes());
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(&bytes);
        Ok((path, bytes))
    };
    let material = if layout == "Istio" {
        let (cert_path, cert) = read("ca-cert.pem")?;
        let (key_path, key) = read("ca-key.pem")?;
        let (chain_path, chain) = read("cert-chain.pem")?;
        let (roots_path, roots) = read("root-cert.pem")?;
        let crls = if dir.join(CRL_FILE).exists() {
            let (crl_path, crl) = read(CRL_FILE)?;
            crls(&crl_path, &crl)?
        } else {
            Vec::new()
        };
        let signing_cert = single_cert(&cert_path, &cert)?;
        let mut chain = certs_allow_empty(&chain_path, &chain)?;
        // The runbook's cert-chain.pem starts with the signing certificate; accept a
        // file that lists only the certificates above it.
        if chain.first().is_some_and(|c| c != &signing_cert) {
            chain.insert(0, signing_cert.clone());
        }
        KeyMaterial {
            source: Source::Istio(dir.to_owned()),
            key: load_key(&key_path, &key)?,
            signing_cert,
            signing_cert_path: cert_path,
            chain,
            roots: certs(&roots_path, &roots)?,
            roots_path,
            crls,
            digest: [0; 32],
        }
    } else {
        let (cert_path, cert) = read("tls.crt")?;
        let (key_path, key) = read("tls.key")?;
        let (roots_path, roots) = read("ca.crt")?;
        let mut chain = certs(&cert_path, &cert)?;
        let roots = certs(&roots_path, &roots)?;
        let signing_cert = chain[0].clone();
        for root in &roots {
            if !chain.contains(root) {
                chain.push(root.clone());
            }
        }
        KeyMaterial {
            source: Source::CertManager(dir.to_owned()),
            key: load_key(&key_path, &key)?,
            signing_cert,
            signing_cert_path: cert_path,
            chain,
            roots,
            roots_path,
            crls: Vec::new(),
            digest: [0; 32],
        }
    };
    Ok(Some(KeyMaterial {
        digest: hasher.finalize().into(),
        ..material
    }))
}

/// Loads the self-signed root from `state_dir`, creating it on first use.
pub fn load_or_create_self_signed(
    state_dir: &Path,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<KeyMaterial, CaCertsError> {
    if let Some(material) = load_self_signed(state_dir)? {
        return Ok(material);
    }
    create_self_signed(state_dir, trust_domain, now)?;
    load_self_signed(state_dir)?.ok_or_else(|| CaCertsError::Invalid {
        path: state_dir.join(SELF_SIGNED_CERT),
        problem: "disappeared right after it was created".into(),
    })
}

/// Reads a self-signed root (`root-cert.pem`, `root-key.pem`) from `dir`; `Ok(None)`
/// when neither file is there.
pub fn load_self_signed(dir: &Path) -> Result<Option<KeyMaterial>, CaCertsError> {
    let state_dir = dir;
    let cert_path = state_dir.join(SELF_SIGNED_CERT);
    let key_path = state_dir.join(SELF_SIGNED_KEY);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {}
        (false, false) => return Ok(None),
        (has_cert, _) => {
            let (have, lack) = if has_cert {
                (&cert_path, &key_path)
            } else {
                (&key_path, &cert_path)
            };
            return Err(CaCertsError::Invalid {
                path: lack.clone(),
                problem: format!(
                    "missing while {} exists; restore it or remove both to create a new root",
                    have.display()
                ),
            });
        }
    }
    let read = |path: &Path| {
        fs::read(path).map_err(|source| CaCertsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert = read(&cert_path)?;
    let key = read(&key_path)?;
    let mut hasher = Sha256::new();
    hasher.update(&cert);
    hasher.update(&key);
    let signing_cert = single_cert(&cert_path, &cert)?;
    Ok(Some(KeyMaterial {
        source: Source::SelfSigned(state_dir.to_owned()),
        key: load_key(&key_path, &key)?,
        roots: vec![signing_cert.clone()],
        signing_cert,
        signing_cert_path: cert_path.clone(),
        chain: Vec::new(),
        roots_path: cert_path,
        crls: Vec::new(),
        digest: hasher.finalize().into(),
    }))
}

/// Creates a self-signed root in `dir` (a new directory, or one without a root).
pub fn create_self_signed_in(
    dir: &Path,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<(), CaCertsError> {
    create_self_signed(dir, trust_domain, now)
}

impl KeyMaterial {
    /// Adds the roots of `other` that this set's bundle lacks, after its own: the
    /// bundle of a trust change in progress. The digest stays this set's.
    pub fn add_roots(&mut self, other: &[CertificateDer<'static>]) {
        for root in other {
            if !self.roots.contains(root) {
                self.roots.push(root.clone());
            }
        }
    }
}

fn create_self_signed(
    state_dir: &Path,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<(), CaCertsError> {
    let gen_err = |e: &dyn fmt::Display| CaCertsError::Generate(e.to_string());
    fs::create_dir_all(state_dir).map_err(|source| CaCertsError::Read {
        path: state_dir.to_owned(),
        source,
    })?;
    let key = keys::generate_p256().map_err(|e| gen_err(&e))?;
    let mut params = CertificateParams::default();
    // rcgen's default subject carries a placeholder CN; istiod's root has O only.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + SELF_SIGNED_LIFETIME;
    params.serial_number = Some(keys::random_serial());
    let cert = params.self_signed(&key.pair).map_err(|e| gen_err(&e))?;
    // Key first: a crash between the two writes leaves a key without a cert, which
    // the loader reports instead of silently making a second root.
    signet_fs::write_atomic(
        &state_dir.join(SELF_SIGNED_KEY),
        key.pair.serialize_pem().as_bytes(),
        0o600,
    )
    .map_err(|e| gen_err(&e))?;
    signet_fs::write_atomic(
        &state_dir.join(SELF_SIGNED_CERT),
        cert.pem().as_bytes(),
        0o644,
    )
    .map_err(|e| gen_err(&e))?;
    tracing::info!(dir = %state_dir.display(), "created a self-signed root CA (ECDSA P-256, 10 years)");
    Ok(())
}

/// Every `X509 CRL` block of a PEM file; a file with none is an error (an empty
/// `ca-crl.pem` is more likely a mistake than an intent).
fn crls(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateRevocationListDer<'static>>, CaCertsError> {
    let found = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaCertsError::Invalid {
            path: path.to_owned(),
            problem: format!("not a PEM revocation list: {e}"),
        })?;
    if found.is_empty() {
        return Err(CaCertsError::Invalid {
            path: path.to_owned(),
            problem: "holds no X509 CRL block".into(),
        });
    }
    Ok(found)
}

fn load_key(path: &Path, pem: &[u8]) -> Result<SigningKey, CaCertsError> {
    keys::load_signing_key(pem).map_err(|source| CaCertsError::Key {
        path: path.to_owned(),
        source,
    })
}

fn certs_allow_empty(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, CaCertsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaCertsError::Invalid {
            path: path.to_owned(),
            problem: format!("malformed PEM certificate: {e}"),
        })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaCertsError> {
    let certs = certs_allow_empty(path, pem)?;
    if certs.is_empty() {
        return Err(CaCertsError::Invalid {
            path: path.to_owned(),
            problem: "no PEM CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

fn single_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, CaCertsError> {
    let mut all = certs(path, pem)?;
    Ok(all.swap_remove(0))
}
