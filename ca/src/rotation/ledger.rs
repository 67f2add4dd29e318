//! The issuance record a trust change is gated by: per holder, the latest leaf this
//! process issued it (when it was due to renew, when it expires, under which chain);
//! and, kept on disk ahead of every leaf, the latest renewal point and expiry of
//! anything ever issued, so a restarted CA knows what it cannot see.
//!
//! A holder is an identity and the pod its credential is bound to (or, for a node
//! agent, the node it asks for). A caller whose credential names no pod cannot be
//! told from its replicas; such leaves count by their marks alone, so they never
//! end a stage early.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use super::stage::{Record, Stage};
use crate::sync::lock;

/// File in the state directory that holds the marks.
pub const MARKS_FILE: &str = "issuance.json";
/// How far ahead of the leaves issued the marks are written: one write per this much
/// time, not one per leaf.
const HEADROOM: Duration = Duration::minutes(10);
/// Holders remembered; past this the record is incomplete (stages end at their
/// latest end, never early).
pub const MAX_HOLDERS: usize = 250_000;
/// Slack past a leaf's renewal point before its holder counts as having missed
/// renewal (holders renew on timers, not to the second): this much, or a twentieth
/// of the lifetime when that is less.
pub const RENEWAL_GRACE: Duration = Duration::seconds(30);
/// A CA that restarted during `distribute` gives holders this long (at most a
/// quarter window) to renew before the stage may end at its latest end: those whose
/// renewal fell while it was down are retrying on their backoff (signet-agent's
/// longest step is 60 s).
pub const RESTART_ALLOWANCE: Duration = Duration::seconds(60);
/// After a failed write of the marks, the next attempt waits this long (a failing
/// disk is not retried under the ledger's lock for every leaf).
const WRITE_RETRY: i64 = 10;
/// Pending identities shown by `rotation status`.
const SAMPLE: usize = 10;

/// The latest renewal point and expiry of every leaf issued, Unix seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    /// Latest renewal point.
    pub renew_by: i64,
    /// Latest NotAfter.
    pub expire_by: i64,
}

impl Marks {
    /// Raised to at least `other`.
    pub fn absorb(&mut self, other: &Marks) {
        self.raise(other.renew_by, other.expire_by);
    }

    fn raise(&mut self, renew_at: i64, not_after: i64) {
        self.renew_by = self.renew_by.max(renew_at);
        self.expire_by = self.expire_by.max(not_after);
    }
}

/// The marks of a leaf of `lifetime` issued at `now`: what a first start assumes.
fn assumption(lifetime: Duration, now: OffsetDateTime) -> Marks {
    Marks {
        renew_by: renewal_point(now, now + lifetime).unix_timestamp(),
        expire_by: (now + lifetime).unix_timestamp(),
    }
}

/// When a holder is due to renew a leaf it received at `issued`, valid until
/// `not_after`: half of what is left of it, as pilot-agent, ztunnel and signet-agent
/// renew, counted from receipt (not from the backdated NotBefore), plus pilot-agent's
/// 1 % jitter (`SECRET_GRACE_PERIOD_RATIO_JITTER`) and grace.
pub fn renewal_point(issued: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    let life = not_after - issued;
    issued + life * 0.51 + RENEWAL_GRACE.min(life / 20_i32)
}

/// What a holder says it serves (signet-agents say it in every request), against
/// the roots of the declared next set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Serves {
    /// It did not say, or no trust change was under way.
    #[default]
    Unknown,
    /// A bundle without every next root.
    Lacking,
    /// The next roots and others (the union).
    Both,
    /// The next roots alone.
    NextAlone,
}

/// What one leaf's request and answer tell about the trust change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// Whether the answer's bundle held every next root: `Some(false)` when no trust
    /// change was under way as far as the request path knew (so a leaf issued after
    /// a declaration by a replica that had not taken it yet); `None` when one was
    /// but its next roots are not known (nothing to judge by).
    pub given_next: Option<bool>,
    /// What the holder said it serves when it asked.
    pub serves: Serves,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When the CA issued it (the holder had it a moment later).
    issued: i64,
    renew_at: i64,
    not_after: i64,
    chain: u64,
    seen: Seen,
}

#[derive(Debug)]
struct Inner {
    holders: HashMap<Box<str>, Entry>,
    overflow: bool,
    /// What was issued before this process: from the marks file at start.
    unknown: Marks,
    /// Whether `unknown` is only the first start's assumption (no marks were found).
    assumed: bool,
    /// When this process began recording.
    started: i64,
    /// Leaves of callers bound to no pod, per chain.
    unbound: HashMap<u64, Marks>,
    /// What is on disk (or would be, without a state directory).
    written: Marks,
    write_failed: bool,
    /// No write is tried before this (Unix seconds) after a failure.
    retry_at: i64,
}

/// The issuance record.
#[derive(Debug)]
pub struct Ledger {
    inner: Mutex<Inner>,
    file: Option<PathBuf>,
}

/// Why the marks could not be kept.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct LedgerError {
    path: String,
    problem: String,
    /// The marks could not be written (as opposed to read: a file that is there
    /// but is not the marks, or cannot be read, is never taken as none).
    pub unwritable: bool,
}

/// Holders that said what they serve (signet-agents) since the declaration, by what
/// they said last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Serving {
    /// A bundle without the next roots.
    pub lacking: usize,
    /// The union of old and next roots.
    pub both: usize,
    /// The next roots alone.
    pub next_alone: usize,
}

impl Serving {
    /// Every holder counted.
    pub fn total(&self) -> usize {
        self.lacking + self.both + self.next_alone
    }

    pub(crate) fn add(&mut self, other: &Serving) {
        self.lacking += other.lacking;
        self.both += other.both;
        self.next_alone += other.next_alone;
    }
}

/// The gate's view of the record for one stage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pending {
    /// Holders keeping the stage from ending.
    pub count: usize,
    /// Of those, in `distribute`, holders given a leaf after the declaration whose
    /// bundle lacked the next roots (a replica had not taken the stage yet): the
    /// stage waits for their renewal even past its latest end.
    pub late: usize,
    /// What the holders that say it serve.
    pub serving: Serving,
    /// Whether every holder that matters is known.
    pub complete: bool,
    /// Some of them, for `rotation status`.
    pub sample: Vec<String>,
    /// Live replicas that report another stage (they have not followed the record).
    pub behind: Vec<String>,
}

impl Ledger {
    /// The record kept in `state_dir` (none: memory only, as in tests). A missing
    /// marks file (a first start) means a leaf of `assumed` (`--default-ttl`: what
    /// Istio's clients get) may have been issued just before, by this CA's key
    /// under another CA process: longer ones are not assumed, or a first rotation
    /// would wait half of `--max-ttl` (45 days by default).
    pub fn open(
        state_dir: Option<&Path>,
        assumed: Duration,
        now: OffsetDateTime,
    ) -> Result<Self, LedgerError> {
        let file = state_dir.map(|d| d.join(MARKS_FILE));
        let (unknown, only_assumed) = match &file {
            None => (Marks::default(), false),
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => {
                    let marks = serde_json::from_slice::<Marks>(&bytes).map_err(|e| LedgerError {
                        path: path.display().to_string(),
                        problem: format!(
                            "not the issuance marks Signet writes ({e}); remove it to assume a leaf of --default-ttl was issued just now"
                        ),
                        unwritable: false,
                    })?;
                    (marks, false)
                }
                // None there (or none can be: a parent is a file).
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    (assumption(assumed, now), true)
                }
                Err(e) => {
                    return Err(LedgerError {
                        path: path.display().to_string(),
                        problem: e.to_string(),
                        unwritable: false,
                    });
                }
            },
        };
        let ledger = Self::with(unknown, only_assumed, file, now);
        // The assumption about the past is itself written down, so that a restart
        // before the first leaf does not forget it.
        if let Some(path) = &ledger.file
            && only_assumed
        {
            write_marks(path, &unknown)?;
        }
        Ok(ledger)
    }

    /// A record kept in memory only, for a CA whose state directory cannot hold the
    /// marks: like a first start, it assumes a leaf of `assumed` was issued just
    /// before, so it never underestimates what it cannot see.
    pub fn unkept(assumed: Duration, now: OffsetDateTime) -> Self {
        Self::with(assumption(assumed, now), true, None, now)
    }

    fn with(unknown: Marks, assumed: bool, file: Option<PathBuf>, now: OffsetDateTime) -> Self {
        Self {
            inner: Mutex::new(Inner {
                holders: HashMap::new(),
                overflow: false,
                unknown,
                assumed,
                started: now.unix_timestamp(),
                unbound: HashMap::new(),
                written: unknown,
                write_failed: false,
                retry_at: 0,
            }),
            file,
        }
    }

    /// Takes `marks` (this replica's, as its last report in the shared record says)
    /// as issued before this process too: a replica whose state directory was lost
    /// still knows what it issued.
    pub fn absorb(&self, marks: &Marks) {
        let mut inner = lock(&self.inner);
        if marks.renew_by > inner.unknown.renew_by || marks.expire_by > inner.unknown.expire_by {
            inner.unknown.absorb(marks);
            inner.written.absorb(marks);
            inner.assumed = false;
        }
    }

    /// Notes a leaf issued at `issued` to `holder` (`None`: bound to no pod) under the
    /// chain `chain`. The marks reach the disk before this returns (and so before the
    /// leaf leaves the CA) whenever the leaf goes past them; after a failed write the
    /// next try waits [`WRITE_RETRY`] seconds, and only the first failure of a run is
    /// returned (the caller logs it).
    pub fn record(
        &self,
        holder: Option<&str>,
        chain: u64,
        issued: OffsetDateTime,
        not_after: OffsetDateTime,
        seen: Seen,
    ) -> Result<(), LedgerError> {
        let renew_at = renewal_point(issued, not_after).unix_timestamp();
        let not_after = not_after.unix_timestamp();
        let t = issued.unix_timestamp();
        let mut inner = lock(&self.inner);
        let entry = Entry {
            issued: t,
            renew_at,
            not_after,
            chain,
            seen,
        };
        let kept = match holder {
            Some(h) => {
                if let Some(e) = inner.holders.get_mut(h) {
                    *e = entry;
                    true
                } else if inner.holders.len() < MAX_HOLDERS {
                    inner.holders.insert(h.into(), entry);
                    true
                } else {
                    // Past the bound, a holder is counted by its marks alone, as one
                    // bound to no pod: the record is then incomplete, never wrong.
                    inner.overflow = true;
                    false
                }
            }
            None => false,
        };
        if !kept {
            inner
                .unbound
                .entry(chain)
                .or_default()
                .raise(renew_at, not_after);
        }
        if renew_at <= inner.written.renew_by && not_after <= inner.written.expire_by {
            return Ok(());
        }
        // Ahead by the headroom, or a quarter of the lifetime when that is less (so
        // short-lived leaves do not leave marks far past their end).
        let headroom = HEADROOM
            .min(Duration::seconds((not_after - t).max(0) / 4))
            .whole_seconds();
        let mut ahead = inner.written;
        ahead.raise(renew_at + headroom, not_after + headroom);
        let Some(path) = &self.file else {
            inner.written = ahead;
            return Ok(());
        };
        if t < inner.retry_at {
            return Ok(());
        }
        match write_marks(path, &ahead) {
            Ok(()) => {
                inner.written = ahead;
                inner.write_failed = false;
                Ok(())
            }
            Err(e) => {
                inner.retry_at = t + WRITE_RETRY;
                let first = !inner.write_failed;
                inner.write_failed = true;
                if first { Err(e) } else { Ok(()) }
            }
        }
    }

    /// The latest renewal point of anything issued so far (for a declaration).
    pub fn renew_by(&self, now: OffsetDateTime) -> OffsetDateTime {
        let inner = lock(&self.inner);
        let latest = inner
            .holders
            .values()
            .map(|e| e.renew_at)
            .chain(inner.unbound.values().map(|m| m.renew_by))
            .chain([inner.unknown.renew_by, now.unix_timestamp()])
            .max()
            .unwrap_or_default();
        OffsetDateTime::from_unix_timestamp(latest).unwrap_or(now)
    }

    /// Who keeps `record`'s stage from ending at `now`, given the chains `old` and
    /// `new` (signer digests' first bytes).
    pub fn pending(&self, record: &Record, old: u64, new: u64, now: OffsetDateTime) -> Pending {
        let t = now.unix_timestamp();
        let mut inner = lock(&self.inner);
        // Forget what has expired: it can neither renew nor be used.
        inner.holders.retain(|_, e| e.not_after > t);
        let declared = record.declared_at;
        let chain = match record.stage {
            Stage::Distribute | Stage::Switch => Some(old),
            Stage::Aborting => Some(new),
            Stage::Idle | Stage::Retire | Stage::Done => None,
        };
        // Whether a holder is known to hold the next roots: given them since the
        // declaration, and, if it says what it serves (a signet-agent), serving them.
        let serves_next = |e: &Entry| {
            e.issued >= declared
                && e.seen.given_next != Some(false)
                && e.seen.serves != Serves::Lacking
        };
        // Given a leaf without the next roots after the declaration (only asked of
        // holders that hold the stage, so not yet due to renew).
        let late = |e: &Entry| e.issued >= declared && e.seen.given_next == Some(false);
        let holds = |e: &Entry| match record.stage {
            // Holders not known to hold the next roots, until their leaf is due to
            // renew (its renewal brings them).
            Stage::Distribute => !serves_next(e) && e.renew_at > t,
            // Leaves of the old chain still valid (those from before the declaration
            // only until they were due to renew: their holders have moved on).
            Stage::Switch => {
                e.chain == old
                    && if e.issued < declared {
                        e.renew_at > t
                    } else {
                        e.not_after > t
                    }
            }
            Stage::Aborting => e.chain == new,
            Stage::Idle | Stage::Retire | Stage::Done => false,
        };
        let mut count = 0;
        let mut late_count = 0;
        let mut serving = Serving::default();
        let mut sample = Vec::new();
        for (holder, entry) in &inner.holders {
            if holds(entry) {
                count += 1;
                if sample.len() < SAMPLE {
                    sample.push(holder.to_string());
                }
                if record.stage == Stage::Distribute && record.adds_roots && late(entry) {
                    late_count += 1;
                }
            }
            if entry.issued >= declared {
                match entry.seen.serves {
                    Serves::Unknown => {}
                    Serves::Lacking => serving.lacking += 1,
                    Serves::Both => serving.both += 1,
                    Serves::NextAlone => serving.next_alone += 1,
                }
            }
        }
        sample.sort();
        // Past the stage's latest end, what this replica cannot see still holds it
        // (only when the next set adds roots: else the stage has no latest end).
        if record.stage == Stage::Distribute && record.adds_roots {
            // Holders whose renewal fell while this CA was down retry after it is back.
            let allowance = RESTART_ALLOWANCE
                .min(record.window() / 4_i32)
                .whole_seconds();
            let restarted = inner.started > declared;
            if restarted && t < inner.started + allowance {
                count += 1;
                late_count += 1;
                sample
                    .push("(holders that may have tried to renew while this CA restarted)".into());
            }
            // What a previous run of this replica issued may have lacked the new
            // roots (given before it took the stage): waited for until due to renew.
            if restarted && !inner.assumed && inner.unknown.renew_by > t {
                count += 1;
                late_count += 1;
                sample.push("(leaves this replica issued before it restarted)".into());
            }
        }
        // What the record cannot see must be over by itself: leaves from before this
        // process (only their renewal when they all predate the declaration) and
        // leaves of callers bound to no pod.
        let unknown_over = if inner.started <= declared {
            inner.unknown.renew_by <= t
        } else {
            inner.unknown.expire_by <= t
        };
        let unbound_over = chain.is_none_or(|c| {
            inner.unbound.get(&c).is_none_or(|m| match record.stage {
                Stage::Distribute => m.renew_by <= t,
                _ => m.expire_by <= t,
            })
        });
        Pending {
            count,
            late: late_count,
            serving,
            complete: !inner.overflow && unknown_over && unbound_over,
            sample,
            behind: Vec::new(),
        }
    }

    /// The marks as written (ahead of every leaf issued).
    pub fn marks(&self) -> Marks {
        lock(&self.inner).written
    }

    /// Whether the last write of the marks failed (a restart would underestimate).
    pub fn write_failed(&self) -> bool {
        lock(&self.inner).write_failed
    }
}

fn write_marks(path: &Path, marks: &Marks) -> Result<(), LedgerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| LedgerError {
            path: dir.display().to_string(),
            problem: format!("cannot create the state directory: {e}"),
            unwritable: true,
        })?;
    }
    let json = serde_json::to_vec(marks).map_err(|e| LedgerError {
        path: path.display().to_string(),
        problem: e.to_string(),
        unwritable: true,
    })?;
    signet_fs::write_atomic(path, &json, 0o600).map_err(|e| LedgerError {
        path: path.display().to_string(),
        problem: e.to_string(),
        unwritable: true,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rotation::stage::Declared;

    const OLD: u64 = 1;
    const NEW: u64 = 2;
    const NONE: Seen = Seen {
        given_next: Some(false),
        serves: Serves::Unknown,
    };
    const GIVEN: Seen = Seen {
        given_next: Some(true),
        serves: Serves::Unknown,
    };

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap()
    }

    fn record_at(declared: i64) -> Record {
        Record::idle("a".into(), t(0)).declare(
            Declared {
                to: "b".into(),
                window: Duration::seconds(600),
                first_stage_end: t(declared),
                adds_roots: true,
                drops_roots: true,
                next_roots: Vec::new(),
                slack: Duration::ZERO,
            },
            t(declared),
        )
    }

    #[test]
    fn distribute_counts_holders_of_earlier_leaves_until_they_renew() {
        let ledger = Ledger::open(None, Duration::hours(24), t(0)).unwrap();
        ledger
            .record(Some("a@p1"), OLD, t(0), t(3600), NONE)
            .unwrap();
        ledger
            .record(Some("a@p2"), OLD, t(0), t(3600), NONE)
            .unwrap();
        let r = record_at(100);
        let p = ledger.pending(&r, OLD, NEW, t(200));
        assert_eq!((p.count, p.complete), (2, true));
        assert_eq!(p.sample, vec!["a@p1", "a@p2"]);
        // One replica renews after the declaration: the other is still pending.
        ledger
            .record(Some("a@p1"), OLD, t(300), t(900), GIVEN)
            .unwrap();
        assert_eq!(ledger.pending(&r, OLD, NEW, t(310)).count, 1);
        ledger
            .record(Some("a@p2"), OLD, t(320), t(900), GIVEN)
            .unwrap();
        assert_eq!(ledger.pending(&r, OLD, NEW, t(330)).count, 0);
        // A holder that never renews stops counting at its renewal point.
        ledger.record(Some("b@p"), OLD, t(0), t(100), NONE).unwrap();
        assert_eq!(ledger.pending(&r, OLD, NEW, t(340)).count, 0, "due at 56");
    }

    #[test]
    fn an_agent_counts_once_it_says_it_serves_the_next_roots_and_a_late_leaf_counts_apart() {
        let ledger = Ledger::open(None, Duration::hours(24), t(0)).unwrap();
        let r = record_at(100);
        let seen = |serves| Seen {
            given_next: Some(true),
            serves,
        };
        // The agent's renewal brings the union, but it asked while serving the old
        // roots: it counts until it says it serves the new ones (or is due again).
        ledger
            .record(Some("agent"), OLD, t(200), t(800), seen(Serves::Lacking))
            .unwrap();
        // Another client renewed with the union and does not say what it serves.
        ledger
            .record(Some("ztunnel"), OLD, t(200), t(800), GIVEN)
            .unwrap();
        // A replica not yet in the stage gave this one the old bundle alone.
        ledger
            .record(Some("late"), OLD, t(200), t(86_600), NONE)
            .unwrap();
        let p = ledger.pending(&r, OLD, NEW, t(210));
        assert_eq!((p.count, p.late), (2, 1), "{p:?}");
        assert_eq!(
            p.serving,
            Serving {
                lacking: 1,
                both: 0,
                next_alone: 0
            }
        );
        ledger
            .record(Some("agent"), OLD, t(203), t(800), seen(Serves::Both))
            .unwrap();
        let p = ledger.pending(&r, OLD, NEW, t(210));
        assert_eq!((p.count, p.late, p.serving.both), (1, 1, 1), "{p:?}");
        assert_eq!(p.sample, vec!["late"]);
        // An agent that never says so stops counting when it is due to renew.
        ledger
            .record(Some("agent"), OLD, t(204), t(800), seen(Serves::Lacking))
            .unwrap();
        assert_eq!(
            ledger.pending(&r, OLD, NEW, t(600)).count,
            1,
            "the late one"
        );
    }

    #[test]
    fn a_replica_restarted_in_distribute_waits_for_what_it_issued_before() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ledger::open(Some(dir.path()), Duration::seconds(60), t(0)).unwrap();
        // Given the old bundle at 200, after the declaration at 100 (this replica
        // had not taken it): late, until due to renew at 200 + 3672 + 30.
        first
            .record(Some("late"), OLD, t(200), t(7400), NONE)
            .unwrap();
        let r = record_at(100);
        assert_eq!(first.pending(&r, OLD, NEW, t(210)).late, 1);
        drop(first);
        let second = Ledger::open(Some(dir.path()), Duration::seconds(60), t(300)).unwrap();
        // For a minute (a quarter window at most) it also waits for holders that
        // tried to renew while it was down; and for what it issued before, by its
        // marks (written ahead by a quarter of the lifetime at most).
        let p = second.pending(&r, OLD, NEW, t(310));
        assert_eq!((p.late, p.count), (2, 2), "{p:?}");
        let p = second.pending(&r, OLD, NEW, t(360));
        assert_eq!((p.late, p.count), (1, 1), "{p:?}");
        assert_eq!(second.pending(&r, OLD, NEW, t(200 + 3702 + 1800)).late, 0);
        // A first start (nothing known, only assumed) waits for the minute alone.
        let fresh_dir = tempfile::tempdir().unwrap();
        let fresh = Ledger::open(Some(fresh_dir.path()), Duration::hours(24), t(300)).unwrap();
        assert_eq!(fresh.pending(&r, OLD, NEW, t(310)).late, 1);
        assert_eq!(fresh.pending(&r, OLD, NEW, t(400)).late, 0);
        // Its last report's marks, absorbed, count as known.
        fresh.absorb(&Marks {
            renew_by: t(100_000).unix_timestamp(),
            expire_by: t(200_000).unix_timestamp(),
        });
        assert_eq!(fresh.pending(&r, OLD, NEW, t(400)).late, 1);
    }

    #[test]
    fn switch_counts_valid_leaves_of_the_old_chain() {
        let ledger = Ledger::open(None, Duration::hours(24), t(0)).unwrap();
        let r = record_at(0).enter(Stage::Switch, t(100));
        ledger
            .record(Some("a@p"), OLD, t(50), t(650), NONE)
            .unwrap();
        assert_eq!(ledger.pending(&r, OLD, NEW, t(200)).count, 1);
        ledger
            .record(Some("a@p"), NEW, t(210), t(810), NONE)
            .unwrap();
        assert_eq!(ledger.pending(&r, OLD, NEW, t(220)).count, 0);
        // The aborted rotation waits for the new chain's leaves instead.
        let aborting = r.enter(Stage::Aborting, t(230));
        assert_eq!(ledger.pending(&aborting, OLD, NEW, t(240)).count, 1);
    }

    #[test]
    fn callers_bound_to_no_pod_keep_the_record_incomplete_until_their_leaves_are_over() {
        let ledger = Ledger::open(None, Duration::hours(24), t(0)).unwrap();
        ledger.record(None, OLD, t(0), t(1000), NONE).unwrap();
        let r = record_at(100);
        let p = ledger.pending(&r, OLD, NEW, t(200));
        assert_eq!((p.count, p.complete), (0, false));
        assert!(
            ledger.pending(&r, OLD, NEW, t(600)).complete,
            "past renewal"
        );
    }

    #[test]
    fn a_restart_knows_the_marks_of_what_it_issued_before() {
        let dir = tempfile::tempdir().unwrap();
        // A short --default-ttl, so that the first start's assumption is over soon.
        let first = Ledger::open(Some(dir.path()), Duration::seconds(60), t(0)).unwrap();
        first.record(Some("a@p"), OLD, t(0), t(7200), NONE).unwrap();
        drop(first);
        let second = Ledger::open(Some(dir.path()), Duration::hours(24), t(10)).unwrap();
        // The marks are written with headroom: never below what was issued.
        assert!(second.renew_by(t(10)) >= renewal_point(t(0), t(7200)));
        let r = record_at(20);
        let p = second.pending(&r, OLD, NEW, t(30));
        assert!(
            !p.complete,
            "the restarted CA cannot see the earlier holder"
        );
        assert!(second.pending(&r, OLD, NEW, t(3702 + 600)).complete);
    }

    #[test]
    fn a_first_start_assumes_a_default_lifetime_was_just_issued() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(Some(dir.path()), Duration::hours(24), t(0)).unwrap();
        assert_eq!(ledger.renew_by(t(0)), renewal_point(t(0), t(24 * 3600)));
        assert_eq!(
            renewal_point(t(0), t(24 * 3600)),
            t(12 * 3600 + 864) + RENEWAL_GRACE,
            "half a day, pilot-agent's 1 % jitter, and grace"
        );
        assert!(dir.path().join(MARKS_FILE).exists());
        std::fs::write(dir.path().join(MARKS_FILE), "nonsense").unwrap();
        let e = Ledger::open(Some(dir.path()), Duration::hours(24), t(0)).unwrap_err();
        assert!(e.to_string().contains("issuance.json"), "{e}");
    }

    #[test]
    fn a_record_kept_in_memory_assumes_a_default_lifetime_was_just_issued() {
        let ledger = Ledger::unkept(Duration::hours(24), t(0));
        assert_eq!(ledger.renew_by(t(0)), renewal_point(t(0), t(24 * 3600)));
        let r = record_at(10);
        assert!(!ledger.pending(&r, OLD, NEW, t(20)).complete);
    }

    #[test]
    fn marks_are_written_once_per_headroom_not_per_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MARKS_FILE);
        let ledger = Ledger::open(Some(dir.path()), Duration::seconds(60), t(0)).unwrap();
        ledger.record(Some("a"), OLD, t(0), t(120), NONE).unwrap();
        let first = std::fs::read(&path).unwrap();
        ledger.record(Some("b"), OLD, t(5), t(125), NONE).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), first, "within the headroom");
        ledger.record(Some("c"), OLD, t(700), t(760), NONE).unwrap();
        assert_ne!(std::fs::read(&path).unwrap(), first);
    }
}
