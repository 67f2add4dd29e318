//! Reloading key material while the CA serves: when the cacerts directory changes,
//! the new set takes over only if it is whole, proven (`Signer::new` signs and
//! verifies a probe leaf) and keeps trusting what was issued before.

use std::{path::Path, time::Duration};

use time::OffsetDateTime;

use crate::{
    cacerts::{self, CaCertsError},
    signer::{SignError, Signer},
};

/// How long to wait between the two reads that must agree.
const SETTLE: Duration = Duration::from_millis(200);

/// Why a changed set was refused (the current one keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    CaCerts(#[from] CaCertsError),
    #[error("the CA key material disappeared while being read")]
    Vanished,
    #[error(transparent)]
    Signer(#[from] SignError),
    #[error(
        "the new root bundle ({source_of_set}) does not include the root the current chain ends at; workloads holding current certificates would stop being trusted. Bundle old and new roots first, or pass --allow-root-change"
    )]
    RootChange { source_of_set: String },
}

/// The signer for the key material now in `dir`, when it differs from `current`'s:
/// `Ok(None)` when nothing changed, the directory is empty (a deleted Secret must not
/// stop the CA) or mid-update (two reads `SETTLE` apart disagree).
pub async fn changed(
    dir: &Path,
    current: &Signer,
    allow_root_change: bool,
    now: OffsetDateTime,
) -> Result<Option<Signer>, ReloadError> {
    let Some(first) = cacerts::load_dir(dir)? else {
        return Ok(None);
    };
    if first.digest == current.digest() {
        return Ok(None);
    }
    // Kubernetes swaps the `..data` link atomically, but four reads are not atomic:
    // take the set only when two reads a moment apart agree.
    tokio::time::sleep(SETTLE).await;
    let second = cacerts::load_dir(dir)?.ok_or(ReloadError::Vanished)?;
    if second.digest != first.digest {
        return Ok(None);
    }
    let new = Signer::new(second, now)?;
    if !allow_root_change && !current.anchor_in(new.roots()) {
        return Err(ReloadError::RootChange {
            source_of_set: new.source().to_string(),
        });
    }
    Ok(Some(new))
}
