//! `signet-ca pki`: the operator's tooling for a shared root and per-cluster
//! intermediates, written as ready `cacerts` directories, and `inspect`, which checks
//! a directory exactly as `serve` loads it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use clap::{Args, Subcommand, ValueEnum};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use crate::{
    keys::cacerts,
    keys::random_serial,
    keys::signer::Signer,
    keys::{self, KeyKind},
};

/// `signet-ca pki ...`.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a root CA: root-key.pem (0600) and a self-signed root-cert.pem.
    Root(RootArgs),
    /// Create a per-cluster intermediate under a root, as a ready cacerts directory.
    Intermediate(IntermediateArgs),
    /// Write a trust bundle of several roots, deduplicated.
    Bundle(BundleArgs),
    /// Check a cacerts directory exactly as `serve` would load it, and warn.
    Inspect(InspectArgs),
}

/// Key types the tooling generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyTypeArg {
    /// RSA 4096 bits (Istio's tools' default).
    Rsa4096,
    /// ECDSA P-256.
    EcP256,
    /// ECDSA P-384.
    EcP384,
}

/// Flags of `pki root`.
#[derive(Debug, Args)]
pub struct RootArgs {
    /// Directory to write root-cert.pem and root-key.pem into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Key type.
    #[arg(long, value_enum, default_value_t = KeyTypeArg::Rsa4096)]
    pub key_type: KeyTypeArg,
    /// Lifetime in days.
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
    /// Organization (O) of the subject.
    #[arg(long, default_value = "Istio")]
    pub org: String,
    /// Overwrite an existing key file.
    #[arg(long)]
    pub force: bool,
}

/// Flags of `pki intermediate`.
#[derive(Debug, Args)]
pub struct IntermediateArgs {
    /// Directory holding root-cert.pem and root-key.pem.
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// The cluster's name (subject L=<cluster>).
    #[arg(long)]
    pub cluster: String,
    /// Directory to write the cacerts set into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Key type.
    #[arg(long, value_enum, default_value_t = KeyTypeArg::Rsa4096)]
    pub key_type: KeyTypeArg,
    /// Lifetime in days (never past the root's).
    #[arg(long, default_value_t = 730)]
    pub days: u32,
    /// Overwrite an existing key file.
    #[arg(long)]
    pub force: bool,
}

/// Flags of `pki bundle`.
#[derive(Debug, Args)]
pub struct BundleArgs {
    /// File to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// PEM files with root certificates.
    #[arg(required = true, value_name = "ROOT")]
    pub roots: Vec<PathBuf>,
}

/// Flags of `pki inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The cacerts directory.
    pub dir: PathBuf,
    /// The longest lifetime workload certificates hold: what the agents ask for
    /// (SECRET_TTL) or the CA's --default-ttl, 24h by default; the CA's --max-ttl when
    /// clients ask for long lifetimes. Warns when the intermediate has less than this
    /// left, and is the wait before dropping a root.
    #[arg(long, default_value = "24h", value_parser = crate::flags::parse_duration)]
    pub leaf_ttl: Duration,
    /// The set in use now (a cacerts directory): warns when DIR's bundle drops a root
    /// that certificates issued under the current set still chain to.
    #[arg(long, value_name = "DIR")]
    pub previous: Option<PathBuf>,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("{0}")]
    Invalid(String),
}

fn file_err(path: &Path, problem: impl ToString) -> PkiError {
    PkiError::File {
        path: path.to_owned(),
        problem: problem.to_string(),
    }
}

/// Runs one `pki` command; returns what to print.
pub fn run(command: PkiCommand, now: OffsetDateTime) -> Result<String, PkiError> {
    match command {
        PkiCommand::Root(a) => root(&a, now),
        PkiCommand::Intermediate(a) => intermediate(&a, now),
        PkiCommand::Bundle(a) => bundle(&a),
        PkiCommand::Inspect(a) => inspect(&a.dir, a.leaf_ttl, a.previous.as_deref(), now),
    }
}

fn generate(kind: KeyTypeArg) -> Result<KeyPair, PkiError> {
    let kind = match kind {
        KeyTypeArg::EcP256 => signet_spiffe::KeyType::EcP256,
        KeyTypeArg::EcP384 => signet_spiffe::KeyType::EcP384,
        KeyTypeArg::Rsa4096 => signet_spiffe::KeyType::Rsa(4096),
    };
    signet_spiffe::generate_key(kind).map_err(|e| PkiError::Invalid(e.to_string()))
}

/// Refuses to replace a key file unless forced.
fn guard_key(path: &Path, force: bool) -> Result<(), PkiError> {
    if path.exists() && !force {
        return Err(file_err(
            path,
            "exists; pass --force to replace it (the old key is lost)",
        ));
    }
    Ok(())
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    signet_fs::write_atomic(path, contents.as_bytes(), mode).map_err(|e| file_err(path, e))
}

fn days(n: u32) -> Result<Duration, PkiError> {
    if n == 0 || n > 36_500 {
        return Err(PkiError::Invalid(format!("--days {n}: want 1 to 36500")));
    }
    Ok(Duration::days(i64::from(n)))
}

/// Creates `dir`, refuses to replace `dir/name` unless forced, and generates the key
/// that will be written there.
fn new_key(
    dir: &Path,
    name: &str,
    kind: KeyTypeArg,
    force: bool,
) -> Result<(PathBuf, KeyPair), PkiError> {
    fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let path = dir.join(name);
    guard_key(&path, force)?;
    Ok((path, generate(kind)?))
}

/// The profile shared by roots and intermediates: a CA that may sign certificates
/// and CRLs, backdated five minutes for clock skew, with a random serial.
fn ca_params(
    subject: &[(DnType, &str)],
    constraints: BasicConstraints,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    for (ty, value) in subject {
        params.distinguished_name.push(ty.clone(), *value);
    }
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::minutes(5);
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params
}

fn root(a: &RootArgs, now: OffsetDateTime) -> Result<String, PkiError> {
    let lifetime = days(a.days)?;
    let (key_path, key) = new_key(&a.out, "root-key.pem", a.key_type, a.force)?;
    let params = ca_params(
        &[
            (DnType::OrganizationName, &a.org),
            (DnType::CommonName, "Root CA"),
        ],
        BasicConstraints::Unconstrained,
        now,
        now + lifetime,
    );
    let cert = params
        .self_signed(&key)
        .map_err(|e| PkiError::Invalid(e.to_string()))?;
    write(&key_path, &key.serialize_pem(), 0o600)?;
    write(&a.out.join("root-cert.pem"), &cert.pem(), 0o644)?;
    Ok(format!(
        "wrote {0}/root-cert.pem and {0}/root-key.pem (keep the key offline)\n",
        a.out.display()
    ))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = fs::read(path).map_err(|e| file_err(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

fn intermediate(a: &IntermediateArgs, now: OffsetDateTime) -> Result<String, PkiError> {
    let lifetime = days(a.days)?;
    if a.cluster.is_empty() || a.cluster.contains(['/', ',', '=', '\n']) {
        return Err(PkiError::Invalid(format!(
            "--cluster {:?}: want a plain name",
            a.cluster
        )));
    }
    let root_cert_path = a.root.join("root-cert.pem");
    let root_key_path = a.root.join("root-key.pem");
    let root_der = read_certs(&root_cert_path)?.swap_remove(0);
    let root_key =
        keys::load_signing_key(&fs::read(&root_key_path).map_err(|e| file_err(&root_key_path, e))?)
            .map_err(|e| file_err(&root_key_path, e))?;
    let (_, parsed) =
        X509Certificate::from_der(&root_der).map_err(|e| file_err(&root_cert_path, e))?;
    if parsed.public_key().subject_public_key.data.as_ref() != root_key.pair.public_key_raw() {
        return Err(file_err(&root_key_path, "does not match root-cert.pem"));
    }
    let root_not_after = parsed.validity().not_after.to_datetime();
    let root_pem = signet_spiffe::pem_cert(&root_der);
    let issuer = Issuer::from_ca_cert_der(&root_der, root_key.pair)
        .map_err(|e| file_err(&root_cert_path, e))?;

    let (key_path, key) = new_key(&a.out, "ca-key.pem", a.key_type, a.force)?;
    let mut params = ca_params(
        &[
            (DnType::OrganizationName, "Istio"),
            (DnType::CommonName, "Intermediate CA"),
            (DnType::LocalityName, &a.cluster),
        ],
        BasicConstraints::Constrained(0),
        now,
        (now + lifetime).min(root_not_after),
    );
    params.subject_alt_names = vec![SanType::DnsName(
        "istiod.istio-system.svc"
            .try_into()
            .map_err(|e: rcgen::Error| PkiError::Invalid(e.to_string()))?,
    )];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| PkiError::Invalid(e.to_string()))?;
    write(&key_path, &key.serialize_pem(), 0o600)?;
    write(&a.out.join("ca-cert.pem"), &cert.pem(), 0o644)?;
    write(
        &a.out.join("cert-chain.pem"),
        &(cert.pem() + &root_pem),
        0o644,
    )?;
    write(&a.out.join("root-cert.pem"), &root_pem, 0o644)?;
    let mut out = format!(
        "wrote cacerts for cluster {} to {}: ca-cert.pem ca-key.pem cert-chain.pem root-cert.pem\n",
        a.cluster,
        a.out.display()
    );
    if now + lifetime > root_not_after {
        out.push_str(&format!(
            "warning: shortened to the root's expiry, {root_not_after}\n"
        ));
    }
    Ok(out)
}

fn bundle(a: &BundleArgs) -> Result<String, PkiError> {
    let mut all: Vec<CertificateDer<'static>> = Vec::new();
    for path in &a.roots {
        for cert in read_certs(path)? {
            if !all.contains(&cert) {
                all.push(cert);
            }
        }
    }
    let pem: String = all.iter().map(|c| signet_spiffe::pem_cert(c)).collect();
    write(&a.out, &pem, 0o644)?;
    Ok(format!(
        "wrote {} root(s) to {}\n",
        all.len(),
        a.out.display()
    ))
}

fn describe(der: &[u8], now: OffsetDateTime) -> String {
    match X509Certificate::from_der(der) {
        Ok((_, c)) => {
            let kind =
                KeyKind::of_spki(c.public_key()).map_or_else(|e| e.to_string(), |k| k.to_string());
            let left = c.validity().not_after.to_datetime() - now;
            let (key_id, issuer_key_id) = signet_spiffe::key_ids(der);
            format!(
                "{}\n    issuer {}\n    key {kind}, sha256 {}\n    key id {}\n    issuer key id {}\n    expires {} ({} days left)",
                c.subject(),
                c.issuer(),
                hex::encode(Sha256::digest(der)),
                key_id.as_deref().unwrap_or("(none)"),
                issuer_key_id.as_deref().unwrap_or("(none)"),
                c.validity().not_after,
                left.whole_days()
            )
        }
        Err(e) => format!("(unparseable: {e})"),
    }
}

/// Loads `dir` as `serve` does; errors are returned, warnings printed in the report.
pub fn inspect(
    dir: &Path,
    leaf_ttl: Duration,
    previous: Option<&Path>,
    now: OffsetDateTime,
) -> Result<String, PkiError> {
    let material = cacerts::load_dir(dir)
        .map_err(|e| PkiError::Invalid(e.to_string()))?
        .ok_or_else(|| {
            PkiError::Invalid(format!(
                "{}: no cacerts files (Istio or cert-manager layout)",
                dir.display()
            ))
        })?;
    let chain = material.chain.clone();
    let roots = material.roots.clone();
    let signing = material.signing_cert.clone();
    let signer = Signer::new(material, now).map_err(|e| PkiError::Invalid(e.to_string()))?;
    let mut out = format!(
        "{}: loads as `signet-ca serve` would ({})\n",
        dir.display(),
        signer.source()
    );
    out.push_str(&format!(
        "signing certificate: {}\n",
        describe(&signing, now)
    ));
    for (i, c) in chain.iter().enumerate().filter(|(_, c)| **c != signing) {
        out.push_str(&format!("chain[{i}]: {}\n", describe(c, now)));
    }
    for r in &roots {
        out.push_str(&format!("root: {}\n", describe(r, now)));
    }
    let mut warnings = Vec::new();
    let left = signer.signing_not_after() - now;
    if left < Duration::days(30) {
        warnings.push(format!(
            "the intermediate expires in {} days: rotate it now",
            left.whole_days()
        ));
    }
    let leaf_left = signer.leaf_not_after_limit() - now;
    if leaf_left < leaf_ttl {
        warnings.push(format!(
            "workload certificates of {leaf_ttl} would be cut short: only {leaf_left} is left on the chain"
        ));
    }
    if let Some(previous) = previous {
        let old = cacerts::load_dir(previous)
            .map_err(|e| PkiError::Invalid(format!("--previous: {e}")))?
            .ok_or_else(|| {
                PkiError::Invalid(format!(
                    "--previous {}: no cacerts files",
                    previous.display()
                ))
            })?;
        let old_roots = old.roots.clone();
        let old_signer =
            Signer::new(old, now).map_err(|e| PkiError::Invalid(format!("--previous: {e}")))?;
        let (a, b) = (old_signer.anchor(), signer.anchor());
        if a.subject != b.subject || a.subject_public_key_info != b.subject_public_key_info {
            out.push_str(&format!(
                "this set signs under a different root than the set in use: once every cluster serves it, wait {leaf_ttl} (--leaf-ttl) before dropping the old root from any bundle\n"
            ));
        }
        for root in old_roots.iter().filter(|r| !roots.contains(r)) {
            let name = X509Certificate::from_der(root)
                .map(|(_, c)| c.subject().to_string())
                .unwrap_or_default();
            if old_signer.anchor_in(std::slice::from_ref(root)) {
                warnings.push(format!(
                    "the bundle drops {name}, the root the set in use signs under: every certificate it issued (up to {leaf_ttl} old) stops verifying at once. Switch to an intermediate under the new root first and wait one leaf lifetime"
                ));
            } else {
                warnings.push(format!(
                    "the bundle drops {name}: certificates issued under it in the last {leaf_ttl} stop verifying; drop it only a full leaf lifetime after the switch away from it"
                ));
            }
        }
    }
    for w in &warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    if warnings.is_empty() {
        out.push_str("no warnings\n");
    }
    Ok(out)
}
