//! Istio's file-backed SDS names, `file-cert:<cert>~<key>` and `file-root:<path>`,
//! served only from directories the operator allowed (`--file-secret-dir`).
//!
//! Anyone who can reach the SDS socket can ask for any name, so a name is a request
//! to read a file with the agent's privileges. The rules:
//! - the path must be absolute, free of `..`, and inside an allowed directory, both as
//!   written and as the kernel resolves it beneath an opened handle of that directory
//!   (kubelet mounts are links; a link leading out fails the open itself);
//! - only a regular file of at most [`MAX_FILE_BYTES`] is read, opened without
//!   blocking (a FIFO or device is refused, never read), on a blocking thread with a
//!   time limit, so a stuck file system cannot stall SDS, readiness or rotation;
//! - a name is watched only while some stream holds a [`FileLease`] for it, at most
//!   [`MAX_FILE_SECRETS`] names are watched at once, and one stream holds at most
//!   [`MAX_FILE_SECRETS_PER_STREAM`].

use std::{
    collections::HashMap,
    path::{Component, Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use signet_fs::watch::{OffThreadError, Poll, read_off_thread};

use crate::{
    secrets::names::SecretName,
    secrets::resources::{digest, roots_secret, tls_secret},
};

/// Largest file read for a file secret.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// File-backed names watched at most at once.
pub const MAX_FILE_SECRETS: usize = 64;
/// File-backed names one SDS stream may hold at once, so one client cannot take
/// every slot of [`MAX_FILE_SECRETS`].
pub const MAX_FILE_SECRETS_PER_STREAM: usize = 16;
/// How often watched files are re-read.
const POLL: Duration = Duration::from_secs(2);
/// How long one read may take before it is given up on.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a file-backed name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileSecretError {
    /// The path is outside every allowed directory: `PERMISSION_DENIED`.
    #[error("{path}: file secrets are served only from {allowed}")]
    NotAllowed { path: String, allowed: String },
    /// The path cannot be judged (relative, `..`): `INVALID_ARGUMENT`.
    #[error("{path}: {problem}")]
    BadPath { path: String, problem: &'static str },
    /// What is there cannot be served (not a regular file, too large, unreadable,
    /// no PEM): `INVALID_ARGUMENT`.
    #[error("{0}")]
    Unreadable(String),
    /// Too many names are watched already: `RESOURCE_EXHAUSTED`.
    #[error(
        "too many file secrets are in use (at most {MAX_FILE_SECRETS}); close streams that hold others"
    )]
    TooMany,
}

/// Which directories file secrets may come from.
#[derive(Debug, Clone, Default)]
pub struct FilePolicy {
    dirs: Vec<PathBuf>,
}

impl FilePolicy {
    /// Allows files below `dirs` (absolute paths).
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self { dirs }
    }

    /// The policy for `--file-secret-dir`s as given: each made absolute; `/` refused,
    /// since it would expose every file the agent can read; empty ones skipped.
    pub fn from_flags(dirs: Vec<PathBuf>) -> Result<Self, signet_flags::ConfigError> {
        let flag = "--file-secret-dir";
        let mut absolute = Vec::new();
        for dir in dirs {
            if dir.as_os_str().is_empty() {
                continue;
            }
            if dir == std::path::Path::new("/") {
                return Err(signet_flags::ConfigError::new(
                    flag,
                    "/ would expose every file the agent can read",
                ));
            }
            absolute.push(std::path::absolute(&dir).map_err(|e| {
                signet_flags::ConfigError::new(flag, format!("{}: {e}", dir.display()))
            })?);
        }
        Ok(Self::new(absolute))
    }

    /// The directories allowed.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn allowed(&self) -> String {
        if self.dirs.is_empty() {
            "directories given with --file-secret-dir, and none is".into()
        } else {
            let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
            format!("--file-secret-dir directories ({})", dirs.join(", "))
        }
    }

    /// Checks a requested path as written.
    pub fn check(&self, path: &Path) -> Result<(), FileSecretError> {
        let shown = path.display().to_string();
        if !path.is_absolute() {
            return Err(FileSecretError::BadPath {
                path: shown,
                problem: "must be an absolute path",
            });
        }
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(FileSecretError::BadPath {
                path: shown,
                problem: "must not contain . or .. components",
            });
        }
        if self.dirs.iter().any(|d| path.starts_with(d)) {
            Ok(())
        } else {
            Err(FileSecretError::NotAllowed {
                path: shown,
                allowed: self.allowed(),
            })
        }
    }

    /// Reads a file whose path passed [`Self::check`], resolved by the kernel beneath
    /// an opened handle of the allowed directory it is in (see
    /// [`signet_fs::read_beneath`]): links are followed while they stay inside that
    /// directory, and nothing is resolved first and opened after, so whoever can write
    /// inside it cannot swap in a link between a check and the read. `Ok(None)` while
    /// the file does not exist.
    pub fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, FileSecretError> {
        // The longest allowed directory holding the path, as written.
        let Some((dir, relative)) = self
            .dirs
            .iter()
            .filter_map(|d| path.strip_prefix(d).ok().map(|rest| (d, rest)))
            .max_by_key(|(d, _)| d.as_os_str().len())
        else {
            return Err(FileSecretError::NotAllowed {
                path: path.display().to_string(),
                allowed: self.allowed(),
            });
        };
        match signet_fs::read_beneath(dir, relative, MAX_FILE_BYTES) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(signet_fs::ReadError::Missing(_)) => Ok(None),
            Err(signet_fs::ReadError::Escapes(_)) => Err(FileSecretError::NotAllowed {
                path: format!(
                    "{} (a link on it leads out of {})",
                    path.display(),
                    dir.display()
                ),
                allowed: self.allowed(),
            }),
            Err(e) => Err(FileSecretError::Unreadable(e.to_string())),
        }
    }
}

/// One watched name.
#[derive(Debug)]
struct Entry {
    /// The secret (version, message), `None` until the files are there.
    secret: Option<(String, Secret)>,
    /// Leases held.
    holders: usize,
}

/// The file-backed names being watched and their current content.
#[derive(Debug)]
pub struct FileSecrets {
    policy: FilePolicy,
    entries: Mutex<HashMap<SecretName, Entry>>,
}

/// Keeps a file-backed name watched; the watch ends when the last lease is dropped.
#[derive(Debug)]
pub struct FileLease {
    owner: Weak<FileSecrets>,
    name: SecretName,
}

impl Drop for FileLease {
    fn drop(&mut self) {
        let Some(owner) = self.owner.upgrade() else {
            return;
        };
        let mut entries = owner.lock();
        if let Some(entry) = entries.get_mut(&self.name) {
            entry.holders -= 1;
            if entry.holders == 0 {
                entries.remove(&self.name);
            }
        }
    }
}

impl FileSecrets {
    /// No names watched yet.
    pub fn new(policy: FilePolicy) -> Arc<Self> {
        Arc::new(Self {
            policy,
            entries: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SecretName, Entry>> {
        // Every update is one insert, remove or field store: a poisoned map is whole.
        crate::sync::lock(&self.entries)
    }

    /// The current secret of a watched name.
    pub fn current(&self, name: &SecretName) -> Option<(String, Secret)> {
        self.lock().get(name)?.secret.clone()
    }

    /// Starts (or joins) watching `name`: checks the paths, reads the files once
    /// (refusing what cannot be served), and from then on re-reads them while a lease
    /// is held, calling `changed` when the content changes. Names that are not
    /// file-backed need no lease.
    pub async fn lease(
        self: &Arc<Self>,
        name: &SecretName,
        changed: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Option<FileLease>, FileSecretError> {
        let paths = file_paths(name);
        if paths.is_empty() {
            return Ok(None);
        }
        for path in &paths {
            self.policy.check(path)?;
        }
        {
            let mut entries = self.lock();
            if let Some(entry) = entries.get_mut(name) {
                entry.holders += 1;
                return Ok(Some(FileLease {
                    owner: Arc::downgrade(self),
                    name: name.clone(),
                }));
            }
            if entries.len() >= MAX_FILE_SECRETS {
                return Err(FileSecretError::TooMany);
            }
        }
        let first = self.load(name).await?;
        {
            let mut entries = self.lock();
            let entry = entries.entry(name.clone()).or_insert(Entry {
                secret: None,
                holders: 0,
            });
            entry.holders += 1;
            if entry.holders > 1 {
                // Another stream won the race and its poller runs already.
                return Ok(Some(FileLease {
                    owner: Arc::downgrade(self),
                    name: name.clone(),
                }));
            }
            entry.secret = first;
        }
        tokio::spawn(poll(Arc::downgrade(self), name.clone(), changed));
        Ok(Some(FileLease {
            owner: Arc::downgrade(self),
            name: name.clone(),
        }))
    }

    /// Reads a name's files on a blocking thread, within [`READ_TIMEOUT`].
    async fn load(&self, name: &SecretName) -> Result<Option<(String, Secret)>, FileSecretError> {
        let policy = self.policy.clone();
        let owned = name.clone();
        match read_off_thread(READ_TIMEOUT, move || build(&policy, &owned)).await {
            Ok(result) => result,
            Err(OffThreadError::Failed(e)) => {
                Err(FileSecretError::Unreadable(format!("reading failed: {e}")))
            }
            Err(OffThreadError::TimedOut(_)) => Err(FileSecretError::Unreadable(format!(
                "reading {} took longer than {}s",
                file_paths(name)
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" and "),
                READ_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// Re-reads a watched name until its last lease is gone.
async fn poll(owner: Weak<FileSecrets>, name: SecretName, changed: Arc<dyn Fn() + Send + Sync>) {
    // No stop signal: the loop ends when the owner or the last lease is gone.
    let mut poll = Poll::new(POLL, None);
    while poll.tick().await {
        let Some(files) = owner.upgrade() else { return };
        if !files.lock().contains_key(&name) {
            return;
        }
        let fresh = match files.load(&name).await {
            Ok(fresh) => fresh,
            Err(e) => {
                // Keep serving what was read before; a file being replaced is often
                // briefly unreadable.
                tracing::warn!(error = %e, "file secret not re-read");
                continue;
            }
        };
        let is_new = {
            let mut entries = files.lock();
            let Some(entry) = entries.get_mut(&name) else {
                return;
            };
            let is_new = fresh.is_some()
                && entry.secret.as_ref().map(|s| &s.0) != fresh.as_ref().map(|s| &s.0);
            if fresh.is_some() {
                entry.secret = fresh;
            }
            is_new
        };
        if is_new {
            changed();
        }
    }
}

fn file_paths(name: &SecretName) -> Vec<&Path> {
    match name {
        SecretName::FileCert { cert, key } => vec![cert.as_path(), key.as_path()],
        SecretName::FileRoot(path) => vec![path.as_path()],
        _ => Vec::new(),
    }
}

/// Reads and builds the secret of a file-backed name; `None` while a file is missing.
fn build(
    policy: &FilePolicy,
    name: &SecretName,
) -> Result<Option<(String, Secret)>, FileSecretError> {
    let read = |path: &Path| -> Result<Option<Vec<u8>>, FileSecretError> {
        let Some(bytes) = policy.read(path)? else {
            return Ok(None);
        };
        if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(FileSecretError::Unreadable(format!(
                "{}: holds no PEM block",
                path.display()
            )));
        }
        Ok(Some(bytes))
    };
    Ok(match name {
        SecretName::FileCert { cert, key } => {
            let (Some(c), Some(k)) = (read(cert)?, read(key)?) else {
                return Ok(None);
            };
            let version = digest(&[c.as_slice(), k.as_slice()].concat());
            Some((version, tls_secret("", &c, &k)))
        }
        SecretName::FileRoot(path) => read(path)?.map(|r| (digest(&r), roots_secret("", &r))),
        _ => None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";

    #[test]
    fn paths_are_judged_as_written_and_where_they_lead() {
        let top = tempfile::tempdir().unwrap();
        let allowed = top.path().join("certs");
        let secret = top.path().join("state");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(allowed.join("root.pem"), PEM).unwrap();
        std::fs::write(secret.join("root-key.pem"), PEM).unwrap();
        let policy = FilePolicy::new(vec![allowed.clone()]);

        assert!(policy.check(&allowed.join("root.pem")).is_ok());
        assert!(matches!(
            policy.check(&secret.join("root-key.pem")),
            Err(FileSecretError::NotAllowed { .. })
        ));
        assert!(matches!(
            policy.check(&allowed.join("../state/root-key.pem")),
            Err(FileSecretError::BadPath { .. })
        ));
        assert!(matches!(
            policy.check(Path::new("certs/root.pem")),
            Err(FileSecretError::BadPath { .. })
        ));
        // Nothing is allowed by default.
        assert!(matches!(
            FilePolicy::default().check(&allowed.join("root.pem")),
            Err(FileSecretError::NotAllowed { .. })
        ));

        // A link planted inside the allowed directory that leads out of it.
        symlink(secret.join("root-key.pem"), allowed.join("planted.pem")).unwrap();
        assert!(policy.check(&allowed.join("planted.pem")).is_ok());
        assert!(matches!(
            policy.read(&allowed.join("planted.pem")),
            Err(FileSecretError::NotAllowed { .. })
        ));
        // A kubelet-style link that stays inside is followed.
        std::fs::create_dir_all(allowed.join("..2026_11_23")).unwrap();
        std::fs::write(allowed.join("..2026_11_23/cert.pem"), PEM).unwrap();
        symlink("..2026_11_23/cert.pem", allowed.join("cert.pem")).unwrap();
        assert_eq!(
            policy.read(&allowed.join("cert.pem")).unwrap().unwrap(),
            PEM.as_bytes()
        );
        // Missing: not yet there, not an error.
        assert_eq!(policy.read(&allowed.join("later.pem")).unwrap(), None);
    }

    /// Whoever can write inside the allowed directory swaps a directory component of
    /// a path already checked and read for a link out of it: the next read refuses
    /// it. (That the open itself refuses it, leaving no window between a check and
    /// the open, is `signet_fs`'s `reads_beneath_a_directory_never_follow_a_link_out_of_it`.)
    #[test]
    fn a_component_swapped_for_a_link_out_is_never_followed() {
        let top = tempfile::tempdir().unwrap();
        let allowed = top.path().join("certs");
        let secret = top.path().join("state");
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(allowed.join("sub/root.pem"), PEM).unwrap();
        std::fs::write(secret.join("root.pem"), "the CA's secret").unwrap();
        let policy = FilePolicy::new(vec![allowed.clone()]);
        let path = allowed.join("sub/root.pem");
        policy.check(&path).unwrap();
        assert_eq!(policy.read(&path).unwrap().unwrap(), PEM.as_bytes());
        // `sub` becomes a link to the secret directory: a directory component, which
        // a check of the final component alone would not see.
        std::fs::rename(allowed.join("sub"), allowed.join("old")).unwrap();
        symlink(&secret, allowed.join("sub")).unwrap();
        assert!(matches!(
            policy.read(&path),
            Err(FileSecretError::NotAllowed { .. })
        ));
        // A relative link climbing out with `..` is refused the same way.
        std::fs::remove_file(allowed.join("sub")).unwrap();
        symlink("../state", allowed.join("sub")).unwrap();
        assert!(matches!(
            policy.read(&path),
            Err(FileSecretError::NotAllowed { .. })
        ));
    }

    #[test]
    fn only_small_regular_files_with_pem_are_served() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().to_owned();
        let policy = FilePolicy::new(vec![dir.clone()]);
        let fifo = dir.join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        assert!(matches!(
            build(&policy, &SecretName::FileRoot(fifo)),
            Err(FileSecretError::Unreadable(m)) if m.contains("FIFO")
        ));
        std::fs::write(dir.join("big.pem"), vec![b'A'; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            build(&policy, &SecretName::FileRoot(dir.join("big.pem"))),
            Err(FileSecretError::Unreadable(m)) if m.contains("limit")
        ));
        std::fs::write(dir.join("text"), "not pem").unwrap();
        assert!(build(&policy, &SecretName::FileRoot(dir.join("text"))).is_err());
        std::fs::write(dir.join("ok.pem"), PEM).unwrap();
        assert!(
            build(&policy, &SecretName::FileRoot(dir.join("ok.pem")))
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn names_are_released_with_their_last_lease() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().to_owned();
        let files = FileSecrets::new(FilePolicy::new(vec![dir.clone()]));
        let noop: Arc<dyn Fn() + Send + Sync> = Arc::new(|| {});
        let mut held = Vec::new();
        for i in 0..MAX_FILE_SECRETS {
            let name = SecretName::FileRoot(dir.join(format!("r{i}.pem")));
            held.push(files.lease(&name, noop.clone()).await.unwrap().unwrap());
        }
        let one_more = SecretName::FileRoot(dir.join("one-more.pem"));
        assert_eq!(
            files.lease(&one_more, noop.clone()).await.unwrap_err(),
            FileSecretError::TooMany
        );
        // Two holders of one name: the name stays until both let go.
        let again = files
            .lease(&SecretName::FileRoot(dir.join("r0.pem")), noop.clone())
            .await
            .unwrap()
            .unwrap();
        held.remove(0);
        assert_eq!(files.lock().len(), MAX_FILE_SECRETS);
        drop(again);
        assert_eq!(files.lock().len(), MAX_FILE_SECRETS - 1);
        assert!(files.lease(&one_more, noop.clone()).await.is_ok());
        held.clear();
        assert_eq!(files.lock().len(), 0);
    }
}
