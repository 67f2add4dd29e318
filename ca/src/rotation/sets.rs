//! The key material on disk, as the rotation driver reads it: where the next set is,
//! reading a set whole (two reads that agree), composing the signer of a stage (the
//! set that signs with the bundle of the stage), the stage record's file, moving a
//! renewed self-signed root in place, and the two operator commands that write into
//! the state directory.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use time::OffsetDateTime;

use super::{
    driver::{ABORT_FILE, DriverError, RECORD_FILE, SELF_SIGNED_NEXT, Settings},
    next,
    stage::{Record, Stage},
};
use crate::keys::{
    cacerts::{self, CaCertsError, KeyMaterial, Source},
    signer::Signer,
};

/// What the published signer is made of.
pub(crate) fn key(
    stage: Stage,
    base: &Signer,
    next: Option<&Arc<Signer>>,
) -> (Stage, [u8; 32], Option<[u8; 32]>) {
    (stage, base.digest(), next.map(|n| n.digest()))
}

/// The signer of `stage`: the set that signs, with the union bundle while both
/// roots are distributed.
pub(crate) fn compose(
    stage: Stage,
    base: &Arc<Signer>,
    next: Option<&Arc<Signer>>,
    now: OffsetDateTime,
) -> Result<Arc<Signer>, DriverError> {
    let Some(next) = next else {
        return Ok(base.clone());
    };
    let (signs, other) = if stage.signs_with_next() {
        (next, base)
    } else {
        (base, next)
    };
    if !stage.bundles_both() {
        return Ok(signs.clone());
    }
    let mut material = reread(signs)?;
    material.add_roots(other.roots());
    Ok(Arc::new(Signer::new(material, now)?))
}

/// The key material of `signer`, read again from where it came from (and checked to
/// be the same).
fn reread(signer: &Signer) -> Result<KeyMaterial, DriverError> {
    let material = match signer.source() {
        Source::SelfSigned(dir) => cacerts::load_self_signed(dir)?,
        Source::Istio(dir) | Source::CertManager(dir) => cacerts::load_dir(dir)?,
    };
    let path = next::signing_cert_file(signer.source())
        .display()
        .to_string();
    match material {
        Some(m) if m.digest == signer.digest() => Ok(m),
        _ => Err(DriverError::Record {
            path,
            problem: "changed or vanished while the signer of the next stage was being made; the sets must stay as declared during a rotation".into(),
        }),
    }
}

/// Where the next set is looked for: `--next-cacerts-dir`, or for a self-signed
/// CA, `<state-dir>/next`.
pub(crate) fn next_dir(settings: &Settings, base: &Signer) -> Option<PathBuf> {
    match (&settings.rotation.next_cacerts_dir, base.source()) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Source::SelfSigned(dir)) => Some(dir.join(SELF_SIGNED_NEXT)),
        (None, _) => None,
    }
}

/// The set in `dir`: the cacerts layouts, or a self-signed root for a self-signed
/// CA's `<state-dir>/next`.
pub(crate) fn load(dir: &Path, base: &Signer) -> Result<Option<KeyMaterial>, CaCertsError> {
    match base.source() {
        Source::SelfSigned(state) if dir == state.join(SELF_SIGNED_NEXT) => {
            cacerts::load_self_signed(dir)
        }
        _ => cacerts::load_dir(dir),
    }
}

/// The set in `dir` when two reads a moment apart agree (Kubernetes swaps a Secret
/// mount atomically, but reading four files is not).
pub(crate) async fn settled(
    dir: &Path,
    base: &Signer,
) -> Result<Option<KeyMaterial>, CaCertsError> {
    let Some(first) = load(dir, base)? else {
        return Ok(None);
    };
    if first.digest == base.digest() {
        return Ok(Some(first));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    Ok(load(dir, base)?.filter(|second| second.digest == first.digest))
}

pub(crate) fn read_record(state_dir: &Path) -> Result<Option<Record>, DriverError> {
    let path = state_dir.join(RECORD_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| DriverError::Record {
                path: path.display().to_string(),
                problem: format!("not a rotation record Signet wrote: {e}"),
            }),
        // No record can be there (a parent that is a file): none, as when missing.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(DriverError::Record {
            path: path.display().to_string(),
            problem: e.to_string(),
        }),
    }
}

/// Moves a renewed self-signed root from `<state-dir>/next` in place: key first, so
/// that a crash in between leaves the certificate to move on the next start.
pub(crate) fn promote_self_signed(state_dir: &Path) -> std::io::Result<()> {
    let next = state_dir.join(SELF_SIGNED_NEXT);
    for name in [cacerts::SELF_SIGNED_KEY, cacerts::SELF_SIGNED_CERT] {
        let from = next.join(name);
        if from.exists() {
            std::fs::rename(&from, state_dir.join(name))?;
        }
    }
    if next.exists() {
        let _ = std::fs::remove_dir(&next);
    }
    Ok(())
}

pub(crate) fn short(digest: &str) -> String {
    digest.chars().take(16).collect()
}

/// Writes the abort request a serving CA picks up (`signet-ca rotation abort`).
pub fn request_abort(state_dir: &Path) -> std::io::Result<PathBuf> {
    let path = state_dir.join(ABORT_FILE);
    if !state_dir.join(RECORD_FILE).exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{} does not exist: is {} the state directory of a CA that rotates?",
                state_dir.join(RECORD_FILE).display(),
                state_dir.display()
            ),
        ));
    }
    signet_fs::write_atomic(&path, b"abort\n", 0o600)?;
    Ok(path)
}

/// Makes a new self-signed root in `<state-dir>/next` (`signet-ca rotation start
/// --self-signed`); the serving CA declares it on its next look.
pub fn start_self_signed(
    state_dir: &Path,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<PathBuf, CaCertsError> {
    if cacerts::load_self_signed(state_dir)?.is_none() {
        return Err(CaCertsError::Invalid {
            path: state_dir.join(cacerts::SELF_SIGNED_CERT),
            problem: "there is no self-signed root here to renew (is this the CA's --state-dir?)"
                .into(),
        });
    }
    let dir = state_dir.join(SELF_SIGNED_NEXT);
    if cacerts::load_self_signed(&dir)?.is_some() {
        return Err(CaCertsError::Invalid {
            path: dir,
            problem: "a next root is already there; remove it first to make another".into(),
        });
    }
    cacerts::create_self_signed_in(&dir, trust_domain, now)?;
    Ok(dir)
}

/// Writes the stage record into the state directory (created when missing); a
/// record equal to the one there is not written again.
pub(crate) fn write_record(state_dir: &Path, record: &Record) -> Result<(), DriverError> {
    if read_record(state_dir).ok().flatten().as_ref() == Some(record) {
        return Ok(());
    }
    let path = state_dir.join(RECORD_FILE);
    let err = |problem: String| DriverError::Record {
        path: path.display().to_string(),
        problem,
    };
    let json = serde_json::to_vec_pretty(record).map_err(|e| err(e.to_string()))?;
    std::fs::create_dir_all(state_dir).map_err(|e| err(e.to_string()))?;
    signet_fs::write_atomic(&path, &json, 0o600).map_err(|e| err(e.to_string()))
}

/// The set where `base` came from, as it is now (the cacerts directory, or the
/// self-signed root in the state directory).
pub(crate) fn in_place(
    settings: &Settings,
    base: &Signer,
) -> Result<Option<KeyMaterial>, CaCertsError> {
    match base.source() {
        Source::SelfSigned(dir) => cacerts::load_self_signed(dir),
        _ => cacerts::load_dir(&settings.keys.cacerts_dir),
    }
}

/// The roots of `signer`'s bundle as a rotation record keeps them: SHA-256 of each,
/// hex, sorted.
pub(crate) fn root_digests(signer: &Signer) -> Vec<String> {
    // Sorted as bytes is sorted as lowercase hex.
    signer.root_digests().iter().map(hex::encode).collect()
}
