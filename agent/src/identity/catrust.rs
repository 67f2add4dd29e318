//! The trust the agent verifies the CA with (`--ca-root-cert`, Istio's `CA_ROOT_CA`):
//! a PEM bundle file, usually the `istio-ca-root-cert` ConfigMap mounted by the
//! kubelet, or the system's roots. This module is the one reader of that file: the
//! CA client builds its TLS trust from it, and rotation watches its digest to notice
//! a root rotation.

use std::{collections::BTreeSet, path::PathBuf};

use sha2::{Digest, Sha256};

/// Largest trust bundle read.
const MAX_BUNDLE_BYTES: u64 = 1024 * 1024;

/// How the agent verifies the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaTrust {
    /// A PEM bundle file (re-read when it changes).
    File(PathBuf),
    /// The system's roots.
    System,
}

/// The bundle file's content, checked to hold PEM certificates, and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The PEM bytes.
    pub pem: Vec<u8>,
    /// SHA-256 of `pem`.
    pub digest: [u8; 32],
}

/// Why the trust file cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("CA trust {path}: {problem}")]
pub struct TrustError {
    path: String,
    problem: String,
}

impl CaTrust {
    /// Reads the bundle file (`None` for the system's roots). Links are followed (a
    /// kubelet mount); what is read must be a regular PEM file of at most 1 MiB.
    pub fn read(&self) -> Result<Option<Bundle>, TrustError> {
        let CaTrust::File(path) = self else {
            return Ok(None);
        };
        let err = |problem: String| TrustError {
            path: path.display().to_string(),
            problem,
        };
        let pem =
            signet_fs::read_resolved(path, MAX_BUNDLE_BYTES).map_err(|e| err(e.to_string()))?;
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            return Err(err("holds no PEM certificate".into()));
        }
        let digest = Sha256::digest(&pem).into();
        Ok(Some(Bundle { pem, digest }))
    }

    /// The digest of what the bundle file holds now; `None` for the system's roots or
    /// an unreadable file. A change means the CA's trust has changed.
    pub fn digest(&self) -> Option<[u8; 32]> {
        self.read().ok().flatten().map(|b| b.digest)
    }
}

/// The certificates of a PEM bundle, DER, as a set (order and duplicates do not
/// matter to trust).
pub type Roots = BTreeSet<Vec<u8>>;

/// The certificates of `pem`.
pub fn roots_of(pem: &[u8]) -> Roots {
    ::pem::parse_many(pem)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect()
}

/// What the CA's bundle must show once it has caught up with a change of the trust
/// file: the roots the change added are in it, the roots it dropped are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    added: Roots,
    removed: Roots,
}

impl Expected {
    /// The expectation set by a trust file going from `before` to `after`.
    pub fn between(before: &Roots, after: &Roots) -> Self {
        Self {
            added: after.difference(before).cloned().collect(),
            removed: before.difference(after).cloned().collect(),
        }
    }

    /// Whether the CA's bundle `ca` reflects the change.
    pub fn met_by(&self, ca: &Roots) -> bool {
        self.added.is_subset(ca) && self.removed.is_disjoint(ca)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_digests_and_refuses_what_is_not_a_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root-cert.pem");
        let trust = CaTrust::File(path.clone());
        assert!(trust.read().is_err(), "missing");
        assert_eq!(trust.digest(), None);
        std::fs::write(&path, "no certificate here").unwrap();
        assert!(trust.read().unwrap_err().to_string().contains("no PEM"));
        let pem = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        std::fs::write(&path, pem).unwrap();
        let first = trust.read().unwrap().unwrap();
        assert_eq!(first.pem, pem.as_bytes());
        std::fs::write(&path, pem.repeat(2)).unwrap();
        assert_ne!(trust.digest(), Some(first.digest));
        assert_eq!(CaTrust::System.read().unwrap(), None);
        assert_eq!(CaTrust::System.digest(), None);
    }

    #[test]
    fn expectations_of_a_root_rotation() {
        let set = |roots: &[&[u8]]| -> Roots { roots.iter().map(|r| r.to_vec()).collect() };
        let (old, new) = (b"old".as_slice(), b"new".as_slice());
        // Step 2: NEW added to the trust file.
        let added = Expected::between(&set(&[old]), &set(&[old, new]));
        assert!(!added.met_by(&set(&[old])), "the CA has not reloaded yet");
        assert!(added.met_by(&set(&[old, new])));
        assert!(added.met_by(&set(&[new, old])));
        // Step 4: OLD dropped.
        let dropped = Expected::between(&set(&[old, new]), &set(&[new]));
        assert!(!dropped.met_by(&set(&[old, new])));
        assert!(dropped.met_by(&set(&[new])));
        // Nothing changed in substance (same roots, reordered).
        assert!(Expected::between(&set(&[old, new]), &set(&[new, old])).met_by(&set(&[])));
        let pem = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        assert_eq!(roots_of(pem.repeat(2).as_bytes()).len(), 1);
        assert!(roots_of(b"garbage").is_empty());
    }
}
