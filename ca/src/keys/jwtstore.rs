//! Where the JWT key set is kept ([`KeyStore`]: a file in the state directory here,
//! a Kubernetes Secret in `crate::kubernetes::jwtsecret`) and the task that keeps it:
//! every replica reads the set, applies [`jwt::plan`], writes the result back unless
//! another replica did first (then reads again), and publishes what it read.

use std::{fmt, future::Future, path::PathBuf, pin::Pin, sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::sync::watch;
use zeroize::Zeroizing;

use super::jwt::{self, JwtKeyError, JwtKeys, KeyDocument, Schedule, StoreError};

/// The file name in the state directory, and the key in a Secret.
pub const FILE_NAME: &str = "jwt-keys.json";
/// How often the set is read again, at most (shorter rotation periods read more often).
const REFRESH: Duration = Duration::from_secs(30);
/// Writes lost to another replica before a round gives up until the next.
const CONFLICT_RETRIES: usize = 3;

/// A stored document and the version it was read at (a Secret's `resourceVersion`).
pub struct Loaded {
    pub bytes: Zeroizing<Vec<u8>>,
    pub version: Option<String>,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("bytes", &"<redacted>")
            .field("version", &self.version)
            .finish()
    }
}

/// A boxed store future.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Storage for the key set, shared by every replica that signs.
pub trait KeyStore: Send + Sync + fmt::Debug {
    /// Where it is, for messages.
    fn describe(&self) -> String;
    /// The stored document, `None` when there is none yet.
    fn load(&self) -> StoreFuture<'_, Option<Loaded>>;
    /// Stores `bytes` if the store is still at `version` (`None`: still empty);
    /// [`StoreError::Conflict`] otherwise.
    fn save<'a>(&'a self, bytes: &'a [u8], version: Option<&'a str>) -> StoreFuture<'a, ()>;
}

/// The key set as a file (mode 0600) in the state directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// `dir/jwt-keys.json`.
    pub fn in_dir(dir: &std::path::Path) -> Self {
        Self {
            path: dir.join(FILE_NAME),
        }
    }
}

impl KeyStore for FileStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn load(&self) -> StoreFuture<'_, Option<Loaded>> {
        Box::pin(async move {
            match std::fs::read(&self.path) {
                Ok(bytes) => Ok(Some(Loaded {
                    bytes: Zeroizing::new(bytes),
                    version: None,
                })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::Failed(format!("{}: {e}", self.path.display()))),
            }
        })
    }

    fn save<'a>(&'a self, bytes: &'a [u8], _version: Option<&'a str>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let fail =
                |e: std::io::Error| StoreError::Failed(format!("{}: {e}", self.path.display()));
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(fail)?;
            }
            signet_fs::write_atomic(&self.path, bytes, 0o600).map_err(fail)
        })
    }
}

/// Why a round could not bring the set up to date.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("JWT key set in {store}: {source}")]
    Store {
        store: String,
        #[source]
        source: StoreError,
    },
    #[error("JWT key set in {store}: {source}")]
    Keys {
        store: String,
        #[source]
        source: JwtKeyError,
    },
}

/// Keeps the set in one store.
#[derive(Debug, Clone)]
pub struct Keeper {
    store: Arc<dyn KeyStore>,
    schedule: Schedule,
}

impl Keeper {
    /// Keeps the set in `store` on `schedule`.
    pub fn new(store: Arc<dyn KeyStore>, schedule: Schedule) -> Self {
        Self { store, schedule }
    }

    fn store_err(&self, source: StoreError) -> KeeperError {
        KeeperError::Store {
            store: self.store.describe(),
            source,
        }
    }

    fn keys_err(&self, source: JwtKeyError) -> KeeperError {
        KeeperError::Keys {
            store: self.store.describe(),
            source,
        }
    }

    /// Reads the set, writes what [`jwt::plan`] makes of it, and returns the set as
    /// stored now. `in_use` is the set this replica publishes, if any: should the
    /// store have lost the set altogether (a deleted Secret or file), it is written
    /// back rather than replaced by a new key nobody has yet.
    pub async fn round(
        &self,
        now: OffsetDateTime,
        in_use: Option<&KeyDocument>,
    ) -> Result<KeyDocument, KeeperError> {
        let mut conflicts = 0;
        loop {
            let loaded = self.store.load().await.map_err(|e| self.store_err(e))?;
            let restore = loaded.is_none() && in_use.is_some();
            let (doc, version) = match &loaded {
                // An empty Secret made by hand is ours to fill.
                Some(l) if l.bytes.is_empty() => (KeyDocument::default(), l.version.as_deref()),
                Some(l) => (
                    KeyDocument::parse(&l.bytes).map_err(|e| self.keys_err(e))?,
                    l.version.as_deref(),
                ),
                None => match in_use {
                    Some(doc) => {
                        tracing::warn!(store = %self.store.describe(), "the JWT key set is gone from its store; writing back the keys in use");
                        (doc.clone(), None)
                    }
                    None => (KeyDocument::default(), None),
                },
            };
            let planned = jwt::plan(&doc, &self.schedule, now.unix_timestamp(), jwt::generate)
                .map_err(|e| self.keys_err(e))?;
            let next = match planned {
                Some(next) => next,
                None if restore => doc.clone(),
                None => return Ok(doc),
            };
            match self.store.save(&next.to_bytes(), version).await {
                Ok(()) => {
                    log_changes(&doc, &next, &self.store.describe());
                    return Ok(next);
                }
                Err(StoreError::Conflict) if conflicts < CONFLICT_RETRIES => conflicts += 1,
                Err(e) => return Err(self.store_err(e)),
            }
        }
    }

    /// How often [`keep`] runs a round.
    fn every(&self) -> Duration {
        (self.schedule.rotate_every / 8).clamp(Duration::from_secs(1), REFRESH)
    }

    /// How long the set read last may be used when no round succeeds: a key is
    /// published half a period before it signs, so the last set read holds every
    /// key that can sign until then, less the time holders cache the JWKS.
    fn stale_after(&self) -> Duration {
        let half = self.schedule.rotate_every / 2;
        half.saturating_sub(cache_hint(&self.schedule))
            .max(self.every())
    }
}

/// How long agents and relying parties may hold the JWKS before asking again: an
/// eighth of the rotation period, from 5 s to 5 min.
pub fn cache_hint(schedule: &Schedule) -> Duration {
    (schedule.rotate_every / 8).clamp(Duration::from_secs(5), Duration::from_secs(300))
}

fn log_changes(before: &KeyDocument, after: &KeyDocument, store: &str) {
    for key in &after.keys {
        match before.keys.iter().find(|k| k.kid == key.kid) {
            None => tracing::info!(
                kid = %key.kid,
                alg = %key.alg,
                signs_from = %signet_telemetry::rfc3339(unix(key.active_from)),
                store,
                "JWT signing key published"
            ),
            Some(old) if old.retire_at.is_none() && key.retire_at.is_some() => tracing::info!(
                kid = %key.kid,
                retire_at = %signet_telemetry::rfc3339(unix(key.retire_at.unwrap_or_default())),
                store,
                "JWT signing key superseded; it stays published until its last token expires"
            ),
            Some(_) => {}
        }
    }
    for key in &before.keys {
        if !after.keys.iter().any(|k| k.kid == key.kid) {
            tracing::info!(kid = %key.kid, store, "JWT signing key retired");
        }
    }
}

fn unix(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Parses `doc` unless it is what is already published.
pub fn publish(
    tx: &watch::Sender<Option<Arc<JwtKeys>>>,
    last: &mut Option<KeyDocument>,
    doc: KeyDocument,
) -> Result<(), JwtKeyError> {
    if last.as_ref() == Some(&doc) {
        return Ok(());
    }
    let keys = JwtKeys::new(&doc)?;
    tracing::debug!(kids = ?keys.kids(), "JWT key set in use");
    tx.send_replace(Some(Arc::new(keys)));
    *last = Some(doc);
    Ok(())
}

/// Runs rounds until `stop`, publishing each result on `tx`. A failed round keeps
/// the published set while it can still hold every key that signs (see
/// [`Keeper::stale_after`]); past that the replica stops minting and publishing
/// (`None`: UNAVAILABLE, 503) rather than sign with, or publish, a set the other
/// replicas have moved on from.
pub async fn keep(
    keeper: Keeper,
    tx: watch::Sender<Option<Arc<JwtKeys>>>,
    mut last: Option<KeyDocument>,
    mut stop: watch::Receiver<bool>,
) {
    let mut read_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(keeper.every()) => {}
        }
        let result = keeper.round(OffsetDateTime::now_utc(), last.as_ref()).await;
        match result.and_then(|doc| publish(&tx, &mut last, doc).map_err(|e| keeper.keys_err(e))) {
            Ok(()) => read_at = tokio::time::Instant::now(),
            Err(e) if read_at.elapsed() < keeper.stale_after() || last.is_none() => {
                tracing::warn!(error = %e, "cannot bring the JWT key set up to date; the published keys stay in use for now");
            }
            Err(e) => {
                tracing::error!(error = %e, stale_for = ?read_at.elapsed(), "the JWT key set could not be read for too long: JWT-SVIDs are refused (UNAVAILABLE) until it can");
                tx.send_replace(None);
                last = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::jwt::JwtAlg;
    use std::sync::Mutex;

    /// A store another replica writes to between our read and our write, `races`
    /// times; then it behaves.
    #[derive(Debug, Default)]
    struct Racing {
        stored: Mutex<Option<(Vec<u8>, u64)>>,
        races: Mutex<usize>,
        saves: Mutex<usize>,
    }

    impl KeyStore for Racing {
        fn describe(&self) -> String {
            "racing".into()
        }

        fn load(&self) -> StoreFuture<'_, Option<Loaded>> {
            Box::pin(async move {
                Ok(self.stored.lock().unwrap().as_ref().map(|(b, v)| Loaded {
                    bytes: Zeroizing::new(b.clone()),
                    version: Some(v.to_string()),
                }))
            })
        }

        fn save<'a>(&'a self, bytes: &'a [u8], version: Option<&'a str>) -> StoreFuture<'a, ()> {
            Box::pin(async move {
                let mut stored = self.stored.lock().unwrap();
                let mut races = self.races.lock().unwrap();
                if *races > 0 {
                    // Another replica's set lands first.
                    *races -= 1;
                    let theirs = jwt::plan(&KeyDocument::default(), &schedule(), 1, jwt::generate)
                        .unwrap()
                        .unwrap();
                    let v = stored.as_ref().map_or(1, |(_, v)| v + 1);
                    *stored = Some((theirs.to_bytes().to_vec(), v));
                    return Err(StoreError::Conflict);
                }
                let current = stored.as_ref().map(|(_, v)| v.to_string());
                if current.as_deref() != version {
                    return Err(StoreError::Conflict);
                }
                *self.saves.lock().unwrap() += 1;
                let v = stored.as_ref().map_or(1, |(_, v)| v + 1);
                *stored = Some((bytes.to_vec(), v));
                Ok(())
            })
        }
    }

    fn schedule() -> Schedule {
        Schedule {
            alg: JwtAlg::Es256,
            rotate_every: Duration::from_secs(86400),
            max_token_ttl: Duration::from_secs(3600),
        }
    }

    #[tokio::test]
    async fn a_replica_that_loses_the_race_takes_the_winners_key() {
        let store = Arc::new(Racing::default());
        *store.races.lock().unwrap() = 1;
        let keeper = Keeper::new(store.clone(), schedule());
        // `now` near the winner's: its key is current, nothing to add.
        let doc = keeper
            .round(OffsetDateTime::from_unix_timestamp(2).unwrap(), None)
            .await
            .unwrap();
        let stored = store.stored.lock().unwrap().clone().unwrap();
        assert_eq!(
            doc,
            KeyDocument::parse(&stored.0).unwrap(),
            "the winner's set, read again"
        );
        assert_eq!(
            *store.saves.lock().unwrap(),
            0,
            "nothing of ours written over it"
        );
        // More races than retries: the round fails, to be tried again.
        let store = Arc::new(Racing::default());
        *store.races.lock().unwrap() = 10;
        let keeper = Keeper::new(store, schedule());
        assert!(keeper.round(OffsetDateTime::now_utc(), None).await.is_err());
    }

    #[tokio::test]
    async fn a_deleted_set_is_written_back_from_the_one_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let keeper = Keeper::new(Arc::new(FileStore::in_dir(dir.path())), schedule());
        let now = OffsetDateTime::now_utc();
        let in_use = keeper.round(now, None).await.unwrap();
        std::fs::remove_file(dir.path().join(FILE_NAME)).unwrap();
        let again = keeper.round(now, Some(&in_use)).await.unwrap();
        assert_eq!(again, in_use);
        assert!(dir.path().join(FILE_NAME).exists());
        // Emptied by hand (keys removed on purpose): respected, a fresh key signs.
        std::fs::write(dir.path().join(FILE_NAME), br#"{"version": 1, "keys": []}"#).unwrap();
        let fresh = keeper.round(now, Some(&in_use)).await.unwrap();
        assert_ne!(fresh.keys[0].kid, in_use.keys[0].kid);
    }

    #[test]
    fn a_replica_stops_using_its_last_read_before_an_unseen_key_could_sign() {
        let keeper = Keeper::new(Arc::new(Racing::default()), schedule());
        // Half a day, less the five minutes holders may cache the JWKS.
        assert_eq!(keeper.stale_after(), Duration::from_secs(43_200 - 300));
        let short = Keeper::new(
            Arc::new(Racing::default()),
            Schedule {
                rotate_every: Duration::from_secs(60),
                ..schedule()
            },
        );
        assert_eq!(short.stale_after(), Duration::from_millis(22_500));
    }

    #[tokio::test]
    async fn the_file_store_creates_a_private_set_and_keeps_it_across_restarts() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let schedule = Schedule {
            alg: JwtAlg::Es256,
            rotate_every: Duration::from_secs(86400),
            max_token_ttl: Duration::from_secs(3600),
        };
        let keeper = Keeper::new(Arc::new(FileStore::in_dir(dir.path())), schedule);
        let now = OffsetDateTime::now_utc();
        let first = keeper.round(now, None).await.unwrap();
        let path = dir.path().join(FILE_NAME);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second replica (or a restart) reads the same key.
        let again = Keeper::new(Arc::new(FileStore::in_dir(dir.path())), schedule)
            .round(now, None)
            .await
            .unwrap();
        assert_eq!(first, again);
        std::fs::write(&path, b"{ not json").unwrap();
        let e = keeper.round(now, None).await.unwrap_err().to_string();
        assert!(e.contains(FILE_NAME) && e.contains("does not parse"), "{e}");
    }
}
