//! The CA's key material over its life: loaded at start (the cacerts directory, or the
//! self-signed root in the state directory), then read again while the CA serves (by
//! [`crate::rotation::driver`], which also drives trust changes). When the cacerts
//! directory changes, the new set takes over only if it is whole, proven
//! (`Signer::new` signs and verifies a probe leaf) and keeps trusting what was issued
//! before; otherwise it is refused (logged and counted) and the old set keeps serving.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use time::OffsetDateTime;

use crate::{
    keys::cacerts::{self, CaCertsError},
    keys::signer::{SignError, Signer},
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
    #[error(transparent)]
    Serving(#[from] crate::keys::tls::TlsError),
    #[error(
        "the new root bundle ({source_of_set}) does not include the root the current chain ends at; workloads holding current certificates would stop being trusted. Bundle old and new roots first, or pass --allow-root-change"
    )]
    RootChange { source_of_set: String },
    #[error(
        "--require-cacerts: {0} holds no CA key material (Istio's ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem, or cert-manager's tls.crt, tls.key, ca.crt)"
    )]
    NoCaCerts(String),
}

/// The signer for the key material now in `dir`, when it differs from `current`'s:
/// `Ok(None)` when nothing changed, the directory is empty (a deleted Secret must not
/// stop the CA) or mid-update (two reads `SETTLE` apart disagree).
pub(crate) async fn changed(
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

/// The key material to start with: the cacerts directory, or (unless
/// `--require-cacerts`) the self-signed root in the state directory, created on first
/// use, when that directory holds none. A cacerts directory that does not exist at
/// all is worth a warning: a mistyped path or a missing mount looks just like that.
pub(crate) fn initial(
    keys: &KeyArgs,
    trust_domain: &str,
    now: OffsetDateTime,
) -> Result<Signer, ReloadError> {
    let (cacerts_dir, state_dir) = (&keys.cacerts_dir, &keys.state_dir);
    let material = match cacerts::load_dir(cacerts_dir)? {
        Some(m) => m,
        None if keys.require_cacerts => {
            return Err(ReloadError::NoCaCerts(cacerts_dir.display().to_string()));
        }
        None if !cacerts_dir.exists() => {
            tracing::warn!(
                cacerts = %cacerts_dir.display(),
                state = %state_dir.display(),
                "the cacerts directory does not exist; using a self-signed root instead (--require-cacerts makes this an error)"
            );
            cacerts::load_or_create_self_signed(state_dir, trust_domain, now)?
        }
        None => {
            tracing::info!(
                cacerts = %cacerts_dir.display(),
                state = %state_dir.display(),
                "no CA key material in the cacerts directory; using a self-signed root"
            );
            cacerts::load_or_create_self_signed(state_dir, trust_domain, now)?
        }
    };
    Ok(Signer::new(material, now)?)
}

/// Flags of the key material (part of `signet-ca serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct KeyArgs {
    /// Directory with the CA key material: Istio's layout (ca-cert.pem, ca-key.pem,
    /// cert-chain.pem, root-cert.pem) or cert-manager's (tls.crt, tls.key, ca.crt).
    /// Watched for changes. When it holds none of these files, a self-signed root is
    /// created in --state-dir.
    #[arg(
        long,
        env = "ROOT_CA_DIR",
        default_value = "./etc/cacerts",
        value_name = "DIR"
    )]
    pub cacerts_dir: PathBuf,

    /// Where the self-signed root (root-cert.pem, root-key.pem) is created and kept.
    #[arg(
        long,
        env = "SIGNET_STATE_DIR",
        default_value = "./var/lib/signet-ca",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,

    /// Accept new key material whose roots do not include the root of the chain in
    /// use (workloads holding old certificates will fail to connect to new ones).
    #[arg(long)]
    pub allow_root_change: bool,

    /// Refuse to start without key material in --cacerts-dir instead of creating a
    /// self-signed root (several replicas, or clusters sharing a root, need the
    /// operator's). The chart sets it unless `cacerts.selfSigned`.
    #[arg(long, env = "REQUIRE_CACERTS", value_parser = clap::builder::FalseyValueParser::new())]
    pub require_cacerts: bool,

    /// How often the cacerts directory is checked for changes (100ms to 24h).
    #[arg(long, default_value = "2s", value_parser = crate::flags::between(Duration::from_millis(100), crate::flags::DAY), value_name = "DURATION")]
    pub reload_interval: Duration,
}
