//! Key material for tests: a root made with rcgen that writes `cacerts` directories,
//! CRLs, and a kubelet-style Secret mount (`..data` swapped atomically).

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, KeyPair};

/// Writes `ca-crl.pem` into an Istio cacerts directory: a CRL signed by its
/// `ca-cert.pem` with `ca_key`, revoking `serials`.
pub fn write_crl(cacerts: &Path, ca_key: &KeyPair, serials: &[Vec<u8>]) {
    let now = time::OffsetDateTime::now_utc();
    let ca_pem = std::fs::read_to_string(cacerts.join("ca-cert.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(1),
        next_update: now + time::Duration::days(1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(s),
                revocation_time: now - time::Duration::minutes(1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer).unwrap();
    std::fs::write(cacerts.join("ca-crl.pem"), crl.pem().unwrap()).unwrap();
}

/// A test root CA made with rcgen.
pub struct TestRoot {
    key: KeyPair,
    params: CertificateParams,
    /// The root certificate, PEM.
    pub pem: String,
}

impl TestRoot {
    /// A self-signed root with `key`, valid from yesterday for ten years.
    pub fn new(name: &str, key: KeyPair) -> Self {
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Signet Tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let pem = params.self_signed(&key).unwrap().pem();
        Self { key, params, pem }
    }

    /// A P-256 root.
    pub fn p256(name: &str) -> Self {
        Self::new(
            name,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        )
    }

    /// Writes an Istio cacerts set into `dir`: an intermediate named `cn` with key
    /// `ca_key` (pathlen `pathlen`, valid `days` from yesterday), the chain, and
    /// `bundle` (this root when empty) as root-cert.pem.
    pub fn write_cacerts(
        &self,
        dir: &Path,
        cn: &str,
        ca_key: &KeyPair,
        pathlen: Option<u8>,
        bundle: &[&str],
    ) {
        let now = time::OffsetDateTime::now_utc();
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let mut ca = CertificateParams::default();
        ca.distinguished_name = rcgen::DistinguishedName::new();
        ca.distinguished_name.push(rcgen::DnType::CommonName, cn);
        ca.is_ca = rcgen::IsCa::Ca(match pathlen {
            Some(n) => rcgen::BasicConstraints::Constrained(n),
            None => rcgen::BasicConstraints::Unconstrained,
        });
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        ca.use_authority_key_identifier_extension = true;
        ca.not_before = now - time::Duration::days(1);
        ca.not_after = now + time::Duration::days(730);
        let cert = ca.signed_by(ca_key, &issuer).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("ca-key.pem"), ca_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("cert-chain.pem"), cert.pem() + &self.pem).unwrap();
        let bundle = if bundle.is_empty() {
            self.pem.clone()
        } else {
            bundle.concat()
        };
        std::fs::write(dir.join("root-cert.pem"), bundle).unwrap();
    }
}

/// A directory laid out the way the kubelet mounts a Secret: files are links into
/// `..data`, itself a link to a timestamped directory swapped atomically on update.
pub struct SecretMount {
    /// The mount point.
    pub dir: PathBuf,
    generation: usize,
}

impl SecretMount {
    /// An empty mount at `dir`.
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        Self {
            dir: dir.to_owned(),
            generation: 0,
        }
    }

    /// Publishes the files of `from` as the new content, as the kubelet does.
    pub fn publish(&mut self, from: &Path) {
        use std::os::unix::fs::symlink;
        self.generation += 1;
        let version = format!("..2026_11_22_{:04}", self.generation);
        let target = self.dir.join(&version);
        std::fs::create_dir(&target).unwrap();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name();
            std::fs::copy(entry.path(), target.join(&name)).unwrap();
            names.push(name);
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for name in names {
            let link = self.dir.join(&name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(&name), &link).unwrap();
            }
        }
    }
}

/// Copies the set in `staged` to `dir` at once, as a Secret mount changes: into a
/// sibling directory first, then renamed in place.
pub fn publish_set(staged: &Path, dir: &Path) {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    for entry in std::fs::read_dir(staged).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.join(entry.file_name())).unwrap();
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).unwrap();
}
