//! The stages of a trust change and when each may end: plain functions of the
//! persisted record, the evidence gathered now, and `now`.
//!
//! ```text
//! idle ──declare──▶ distribute ──▶ switch ──▶ retire ──▶ done ──(cacerts = next)──▶ idle
//!                       │abort        │abort
//!                       ▼             ▼
//!                     idle ◀──── aborting
//! ```
//!
//! | stage      | signs with | bundle      | ends when                                              |
//! |------------|------------|-------------|--------------------------------------------------------|
//! | distribute | old chain  | old ∪ new   | consumers hold the union, and every leaf issued before  |
//! |            |            |             | the declaration was due to renew (or all holders have)  |
//! | switch     | new chain  | old ∪ new   | no leaf of the old chain can still be in use            |
//! | retire     | new chain  | new         | consumers hold the new bundle                           |
//! | aborting   | old chain  | old ∪ new   | no leaf of the new chain can still be in use            |
//!
//! A gate about leaves is empty when the bundles do not change by it: a new
//! intermediate under the same root adds no root (nothing to distribute) and drops
//! none (nothing to retire).

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

/// Where a trust change stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// No change under way: the cacerts set signs and is the bundle.
    Idle,
    /// The old chain signs; every bundle holds old and new roots.
    Distribute,
    /// The new chain signs; every bundle still holds both.
    Switch,
    /// The new chain signs; the old roots leave the bundles.
    Retire,
    /// The new chain alone, until the operator makes it the cacerts set.
    Done,
    /// Back to the old chain after an abort in `switch`; both roots stay until no
    /// leaf of the new chain can be in use.
    Aborting,
}

impl Stage {
    /// Every stage, in order (for metrics).
    pub const ALL: [Stage; 6] = [
        Stage::Idle,
        Stage::Distribute,
        Stage::Switch,
        Stage::Retire,
        Stage::Done,
        Stage::Aborting,
    ];

    /// The lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Idle => "idle",
            Stage::Distribute => "distribute",
            Stage::Switch => "switch",
            Stage::Retire => "retire",
            Stage::Done => "done",
            Stage::Aborting => "aborting",
        }
    }

    /// Which set signs in this stage.
    pub fn signs_with_next(self) -> bool {
        matches!(self, Stage::Switch | Stage::Retire | Stage::Done)
    }

    /// Whether the bundle is the union of both sets' roots.
    pub fn bundles_both(self) -> bool {
        matches!(self, Stage::Distribute | Stage::Switch | Stage::Aborting)
    }

    /// Whether issued lifetimes are capped at the rotation window: from the
    /// declaration until the old chain no longer signs or is no longer trusted.
    pub fn caps_lifetimes(self) -> bool {
        matches!(self, Stage::Distribute | Stage::Switch | Stage::Aborting)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One stage change, as kept in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The stage entered.
    pub stage: Stage,
    /// When, Unix seconds.
    pub at: i64,
}

/// The persisted state of the trust change: what every restart starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The stage.
    pub stage: Stage,
    /// Since when, Unix seconds.
    pub since: i64,
    /// When the next set was declared (Unix seconds; 0 when idle from the start).
    pub declared_at: i64,
    /// Digest (hex) of the set that signed before: the cacerts set.
    pub from: String,
    /// Digest (hex) of the declared next set.
    pub to: String,
    /// The cap on issued lifetimes from the declaration on, seconds.
    pub window_secs: i64,
    /// Added to a window's end: how late a replica may take a stage change (it reads
    /// the record every look) and a leaf issued just before it.
    #[serde(default)]
    pub slack_secs: i64,
    /// The latest renewal point of any leaf issued before the declaration (Unix
    /// seconds): the latest end of `distribute`.
    pub first_stage_end: i64,
    /// Whether the next set adds a root to the bundle (else `distribute` waits for
    /// consumers only).
    pub adds_roots: bool,
    /// Whether the next set drops a root from the bundle (else `switch` need not wait
    /// for leaves of the old chain).
    pub drops_roots: bool,
    /// A next set (digest) that was aborted: not declared again until it changes.
    #[serde(default)]
    pub declined: Option<String>,
    /// The roots of the bundle now (SHA-256 of each, hex, sorted): what other
    /// clusters on the shared root read of this one.
    #[serde(default)]
    pub roots: Vec<String>,
    /// The roots of the next set's bundle (as `roots`): what other clusters must be
    /// rotating to as well.
    #[serde(default)]
    pub next_roots: Vec<String>,
    /// This cluster's own evidence for the stage is in (other clusters wait on it).
    #[serde(default)]
    pub ready: bool,
    /// Every stage change of this rotation.
    #[serde(default)]
    pub history: Vec<Change>,
}

impl Record {
    /// Nothing under way, signing with the set of digest `from`.
    pub fn idle(from: String, now: OffsetDateTime) -> Self {
        Self {
            stage: Stage::Idle,
            since: now.unix_timestamp(),
            declared_at: 0,
            from,
            to: String::new(),
            window_secs: 0,
            slack_secs: 0,
            first_stage_end: 0,
            adds_roots: false,
            drops_roots: false,
            declined: None,
            roots: Vec::new(),
            next_roots: Vec::new(),
            ready: false,
            history: Vec::new(),
        }
    }

    /// The next set declared at `now`: `distribute` begins.
    pub fn declare(&self, declared: Declared, now: OffsetDateTime) -> Self {
        let at = now.unix_timestamp();
        Self {
            stage: Stage::Distribute,
            since: at,
            declared_at: at,
            from: self.from.clone(),
            to: declared.to,
            window_secs: declared.window.whole_seconds(),
            slack_secs: declared.slack.whole_seconds(),
            first_stage_end: declared.first_stage_end.unix_timestamp().max(at),
            adds_roots: declared.adds_roots,
            drops_roots: declared.drops_roots,
            declined: None,
            roots: self.roots.clone(),
            next_roots: declared.next_roots,
            ready: false,
            history: vec![Change {
                stage: Stage::Distribute,
                at,
            }],
        }
    }

    /// The same rotation in `stage` from `now`.
    pub fn enter(&self, stage: Stage, now: OffsetDateTime) -> Self {
        let at = now.unix_timestamp();
        let mut next = self.clone();
        next.stage = stage;
        next.since = at;
        next.ready = false;
        next.history.push(Change { stage, at });
        next
    }

    /// The cap on lifetimes.
    pub fn window(&self) -> Duration {
        Duration::seconds(self.window_secs)
    }

    /// See [`Record::slack_secs`].
    pub fn slack(&self) -> Duration {
        Duration::seconds(self.slack_secs)
    }

    /// When the current stage began.
    pub fn since(&self) -> OffsetDateTime {
        at(self.since)
    }

    /// When the stage ends at the latest, as far as leaves decide it: `None` for
    /// stages that wait on consumers only (or nothing).
    pub fn latest_end(&self) -> Option<OffsetDateTime> {
        match self.stage {
            Stage::Distribute if self.adds_roots => Some(at(self.first_stage_end)),
            Stage::Switch if self.drops_roots => Some(self.since() + self.window() + self.slack()),
            // The abort drops the new roots again; leaves of the new chain were capped.
            Stage::Aborting if self.adds_roots => Some(self.since() + self.window() + self.slack()),
            _ => None,
        }
    }
}

/// What a declaration fixes.
#[derive(Debug, Clone)]
pub struct Declared {
    /// Digest (hex) of the next set.
    pub to: String,
    /// `--rotation-window`.
    pub window: Duration,
    /// See [`Record::slack_secs`].
    pub slack: Duration,
    /// The latest renewal point of leaves issued before now.
    pub first_stage_end: OffsetDateTime,
    /// The next bundle has a root the current one lacks.
    pub adds_roots: bool,
    /// The current bundle has a root the next one lacks.
    pub drops_roots: bool,
    /// See [`Record::next_roots`].
    pub next_roots: Vec<String>,
}

/// What the CA knows now about its stage's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    /// Holders whose leaves keep the stage from ending (renewal or expiry due).
    pub pending: usize,
    /// Of those, in `distribute`, holders given a leaf after the declaration
    /// without the next roots (a replica took the stage late): their renewal is
    /// waited for even past the stage's latest end, which leaves issued after the
    /// declaration do not move.
    pub late: usize,
    /// Whether the issuance record knows every holder that matters, so `pending ==
    /// 0` may end the stage before its latest end.
    pub complete: bool,
    /// Every consumer the CA writes (the trust file, the root ConfigMaps, ...) was
    /// read back holding this stage's bundle.
    pub consumers_converged: bool,
    /// Every other cluster on the shared root reports the union distributed (true
    /// when there are none).
    pub peers_distributed: bool,
    /// Every other cluster reports no leaf of the old chain in use any more (true
    /// when there are none): the old roots may leave the bundles only then, or a
    /// lagging cluster's leaves would stop being trusted here.
    pub peers_switched: bool,
    /// Every live replica of this cluster signs as the record says (its fresh report
    /// is about this very stage): none is left behind on an earlier one.
    pub replicas_follow: bool,
}

/// Whether `record`'s own evidence (this cluster's) for its stage is in at `now`,
/// other clusters aside: what it tells them as [`Record::ready`].
pub fn ready(record: &Record, evidence: &Evidence, now: OffsetDateTime) -> bool {
    let alone = Evidence {
        peers_distributed: true,
        peers_switched: true,
        replicas_follow: true,
        ..*evidence
    };
    advance(record, &alone, now).is_some()
}

/// The stage that follows `record` given `evidence` at `now`, or `None` to stay.
pub fn advance(record: &Record, evidence: &Evidence, now: OffsetDateTime) -> Option<Stage> {
    if !evidence.replicas_follow {
        return None;
    }
    let leaves_done = || match record.latest_end() {
        None => true,
        Some(end) => {
            (now >= end && evidence.late == 0) || (evidence.complete && evidence.pending == 0)
        }
    };
    match record.stage {
        Stage::Idle | Stage::Done => None,
        Stage::Distribute => {
            (evidence.consumers_converged && evidence.peers_distributed && leaves_done())
                .then_some(Stage::Switch)
        }
        Stage::Switch => (leaves_done() && evidence.peers_switched).then_some(Stage::Retire),
        Stage::Retire => evidence.consumers_converged.then_some(Stage::Done),
        Stage::Aborting => leaves_done().then_some(Stage::Idle),
    }
}

/// What an abort does in `stage`: `Ok(next stage)`, or the reason it cannot.
pub fn abort(stage: Stage) -> Result<Stage, &'static str> {
    match stage {
        // Nothing was signed under the new chain: the union may go at once.
        Stage::Distribute => Ok(Stage::Idle),
        Stage::Switch => Ok(Stage::Aborting),
        Stage::Idle => Err("no rotation is under way"),
        Stage::Aborting => Err("the rotation is already being aborted"),
        Stage::Retire | Stage::Done => Err(
            "too late: the old roots are leaving the bundles; rotate back by declaring the old set as the next one",
        ),
    }
}

fn at(unix: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(unix).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> OffsetDateTime {
        at(1_800_000_000 + s)
    }

    fn declared(first_stage_end: i64) -> Record {
        Record::idle("aa".into(), t(0)).declare(
            Declared {
                to: "bb".into(),
                window: Duration::minutes(60),
                first_stage_end: t(first_stage_end),
                adds_roots: true,
                drops_roots: true,
                next_roots: vec!["cc".into()],
                slack: Duration::ZERO,
            },
            t(0),
        )
    }

    const READY: Evidence = Evidence {
        pending: 0,
        late: 0,
        complete: false,
        consumers_converged: true,
        peers_distributed: true,
        peers_switched: true,
        replicas_follow: true,
    };

    #[test]
    fn distribute_waits_for_the_last_renewal_point_unless_every_holder_renewed() {
        let r = declared(12 * 3600);
        assert_eq!(advance(&r, &READY, t(3600)), None);
        assert_eq!(advance(&r, &READY, t(12 * 3600)), Some(Stage::Switch));
        let known = Evidence {
            complete: true,
            ..READY
        };
        assert_eq!(advance(&r, &known, t(60)), Some(Stage::Switch));
        let pending = Evidence {
            pending: 3,
            ..known
        };
        assert_eq!(advance(&r, &pending, t(60)), None);
        // A holder given the old bundle after the declaration (a replica took the
        // stage late) is waited for past the latest end, until its renewal.
        let late = Evidence {
            pending: 1,
            late: 1,
            ..known
        };
        assert_eq!(advance(&r, &late, t(12 * 3600)), None);
        // The same count without late holders ends at the latest end.
        let pending_only = Evidence { late: 0, ..late };
        assert_eq!(
            advance(&r, &pending_only, t(12 * 3600)),
            Some(Stage::Switch)
        );
    }

    #[test]
    fn distribute_never_ends_before_consumers_and_peers_hold_the_union() {
        let r = declared(0);
        let lagging = Evidence {
            consumers_converged: false,
            ..READY
        };
        assert_eq!(advance(&r, &lagging, t(10)), None);
        let peer = Evidence {
            peers_distributed: false,
            ..READY
        };
        assert_eq!(advance(&r, &peer, t(10_000_000)), None);
        assert_eq!(advance(&r, &READY, t(10)), Some(Stage::Switch));
    }

    #[test]
    fn a_replica_left_behind_holds_every_stage_and_slack_lengthens_the_window() {
        let r = declared(0);
        let behind = Evidence {
            replicas_follow: false,
            ..READY
        };
        assert_eq!(advance(&r, &behind, t(10_000_000)), None);
        let mut switched = r.enter(Stage::Switch, t(100));
        switched.slack_secs = 9;
        assert_eq!(switched.latest_end(), Some(t(100 + 3600 + 9)));
    }

    #[test]
    fn a_lagging_cluster_holds_the_switch_and_the_retire_and_readiness_ignores_it() {
        let r = declared(0);
        let lagging = Evidence {
            peers_distributed: false,
            peers_switched: false,
            ..READY
        };
        assert_eq!(advance(&r, &lagging, t(10)), None);
        assert!(
            ready(&r, &lagging, t(10)),
            "this cluster's own evidence is in"
        );
        let switched = r.enter(Stage::Switch, t(10));
        assert!(!switched.ready, "readiness is per stage");
        assert_eq!(advance(&switched, &lagging, t(10_000)), None);
        assert_eq!(advance(&switched, &READY, t(10_000)), Some(Stage::Retire));
    }

    #[test]
    fn switch_ends_one_window_after_it_began_or_when_every_holder_renewed() {
        let r = declared(0).enter(Stage::Switch, t(100));
        assert_eq!(r.latest_end(), Some(t(100 + 3600)));
        assert_eq!(advance(&r, &READY, t(3699)), None);
        assert_eq!(advance(&r, &READY, t(3700)), Some(Stage::Retire));
        let known = Evidence {
            complete: true,
            ..READY
        };
        assert_eq!(advance(&r, &known, t(200)), Some(Stage::Retire));
    }

    #[test]
    fn a_new_intermediate_under_the_same_root_has_no_leaf_gates() {
        let mut r = declared(12 * 3600);
        r.adds_roots = false;
        r.drops_roots = false;
        assert_eq!(advance(&r, &READY, t(1)), Some(Stage::Switch));
        let r = r.enter(Stage::Switch, t(1));
        assert_eq!(advance(&r, &READY, t(2)), Some(Stage::Retire));
    }

    #[test]
    fn retire_ends_when_consumers_hold_the_new_bundle_and_done_stays() {
        let r = declared(0).enter(Stage::Retire, t(5));
        let lagging = Evidence {
            consumers_converged: false,
            ..READY
        };
        assert_eq!(advance(&r, &lagging, t(9)), None);
        assert_eq!(advance(&r, &READY, t(9)), Some(Stage::Done));
        assert_eq!(advance(&r.enter(Stage::Done, t(9)), &READY, t(99)), None);
    }

    #[test]
    fn abort_goes_straight_back_from_distribute_and_through_aborting_from_switch() {
        assert_eq!(abort(Stage::Distribute), Ok(Stage::Idle));
        assert_eq!(abort(Stage::Switch), Ok(Stage::Aborting));
        assert!(abort(Stage::Retire).is_err());
        assert!(abort(Stage::Idle).is_err());
        let r = declared(0).enter(Stage::Aborting, t(50));
        assert_eq!(advance(&r, &READY, t(100)), None);
        assert_eq!(advance(&r, &READY, t(50 + 3600)), Some(Stage::Idle));
    }

    #[test]
    fn the_record_survives_json() {
        let r = declared(10).enter(Stage::Switch, t(20));
        let back: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.history.len(), 2);
    }

    #[test]
    fn signing_and_bundles_follow_the_stage() {
        assert!(!Stage::Distribute.signs_with_next());
        assert!(Stage::Switch.signs_with_next());
        assert!(Stage::Distribute.bundles_both() && Stage::Aborting.bundles_both());
        assert!(!Stage::Retire.bundles_both());
        assert!(Stage::Switch.caps_lifetimes() && !Stage::Retire.caps_lifetimes());
    }
}
