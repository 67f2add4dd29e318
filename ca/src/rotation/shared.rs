//! What the replicas of one cluster share about a trust change, behind a small trait
//! (an API-server object in cluster mode, `crate::kubernetes::writers::rotationcm`):
//! the stage record the elected replica writes and every replica follows, an abort
//! request, each replica's report (its issuance marks and what it counts as pending),
//! the consumers read back, and an Event per stage change.

use std::{collections::BTreeMap, fmt, future::Future, pin::Pin};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{
    ledger::{Marks, Pending, Serving},
    stage::{Record, Stage},
};

/// A report older than this is not taken as evidence: its replica may be gone.
pub const REPORT_FRESH_SECS: i64 = 30;

/// The future every [`Shared`] method returns.
pub type SharedFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// What one replica says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The latest renewal point and expiry of anything it issued.
    pub marks: Marks,
    /// The stage its count is about, and since when.
    pub stage: Stage,
    /// See `stage`.
    pub since: i64,
    /// Holders it counts as keeping the stage from ending.
    pub pending: usize,
    /// Of those, holders it gave a leaf after the declaration without the next
    /// roots (see [`Pending::late`]).
    #[serde(default)]
    pub late: usize,
    /// What the holders it issued to say they serve.
    #[serde(default)]
    pub serving: Serving,
    /// Whether it knows every holder it issued to.
    pub complete: bool,
    /// Some of them.
    pub sample: Vec<String>,
    /// When it said so (Unix seconds).
    pub at: i64,
}

/// What [`Shared::read`] finds.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// The stage record, when one was written.
    pub record: Option<Record>,
    /// Whether an operator asked for an abort.
    pub abort: bool,
    /// Every replica's report, by replica.
    pub reports: BTreeMap<String, Report>,
}

/// The cluster-wide side of a trust change.
pub trait Shared: Send + Sync + fmt::Debug {
    /// Reads the record, the abort request and the reports.
    fn read(&self) -> SharedFuture<'_, State>;
    /// Writes the record (the elected replica only), clearing an abort request
    /// when `aborted`.
    fn write(&self, record: &Record, aborted: bool) -> SharedFuture<'_, ()>;
    /// Writes this replica's report.
    fn report(&self, replica: &str, report: &Report) -> SharedFuture<'_, ()>;
    /// Asks the elected replica to abort (`signet-ca rotation abort` run in any
    /// replica's pod).
    fn request_abort(&self) -> SharedFuture<'_, ()>;
    /// Removes the reports of `replicas` (gone, their leaves over).
    fn forget(&self, replicas: Vec<String>) -> SharedFuture<'_, ()>;
    /// The consumers (root ConfigMaps, ClusterTrustBundles, istiod's Secret) that
    /// do not hold exactly the roots of `bundle` (PEM), by name.
    fn lagging(&self, bundle: &str) -> SharedFuture<'_, Vec<String>>;
    /// One Event for a stage change.
    fn event(&self, stage: Stage, note: String) -> SharedFuture<'_, ()>;
    /// This replica's name in the reports.
    fn replica(&self) -> &str;
    /// Where the record lives, for messages.
    fn place(&self) -> String;
}

/// This replica's count for `record`'s stage put together with the others'
/// reports: a fresh report about the same stage adds its count; a fresh report about
/// another stage is a replica left behind (it signs as that stage says), named in
/// `behind`; a silent replica must have its marks over (its leaves due to renew, or
/// expired) for the count to be complete, since nobody can see its holders.
pub fn combine(
    own: Pending,
    replica: &str,
    reports: &BTreeMap<String, Report>,
    record: &Record,
    now: OffsetDateTime,
) -> Pending {
    let t = now.unix_timestamp();
    let mut all = own;
    for (name, report) in reports {
        if name == replica {
            continue;
        }
        let alive = t - report.at <= REPORT_FRESH_SECS;
        let same = report.stage == record.stage && report.since == record.since;
        if alive && !same {
            all.behind
                .push(format!("replica {name} ({})", report.stage));
            all.complete = false;
        } else if alive {
            all.count += report.pending;
            all.late += report.late;
            all.serving.add(&report.serving);
            all.complete &= report.complete;
            all.sample.extend(
                report
                    .sample
                    .iter()
                    .take(10_usize.saturating_sub(all.sample.len()))
                    .cloned(),
            );
        } else {
            let over = match record.stage {
                Stage::Distribute => report.marks.renew_by <= t,
                _ => report.marks.expire_by <= t,
            };
            all.complete &= over;
            // What it issued may have lacked the new roots (given before it took
            // the stage): that holds distribute even past its latest end, until
            // its marks say all of it was due to renew.
            if record.stage == Stage::Distribute && record.adds_roots && report.marks.renew_by > t {
                all.count += 1;
                all.late += 1;
                all.sample.push(format!(
                    "(leaves of replica {name}, silent since it issued them)"
                ));
            }
        }
    }
    all
}

/// Another cluster on the shared root, as its own rotation record says.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its cluster id (`--remote-cluster`).
    pub cluster: String,
    /// Its record (`None`: it has none yet), or why it could not be read.
    pub record: Result<Option<Record>, String>,
}

/// The other clusters on the shared root (read through their kubeconfigs).
pub trait Peers: Send + Sync + fmt::Debug {
    /// Every other cluster's record.
    fn read(&self) -> SharedFuture<'_, Vec<Peer>>;
}

/// What the other clusters allow `own` to do: (every one holds the next roots in
/// its bundles, every one is past the old chain), with a line per cluster that does
/// not. A cluster holds the next roots when its bundle has them and it is past its
/// own distribution (or idle on them); it is past the old chain once its switch's
/// evidence is in, or its bundle holds only roots of the next bundle.
pub fn peers_allow(own: &Record, peers: &[Peer]) -> (bool, bool, Vec<String>) {
    let (mut distributed, mut switched, mut notes) = (true, true, Vec::new());
    let subset = |a: &[String], b: &[String]| a.iter().all(|x| b.contains(x));
    for peer in peers {
        let record = match &peer.record {
            Ok(Some(r)) => r,
            Ok(None) => {
                distributed = false;
                switched = false;
                notes.push(format!("cluster {}: no rotation record yet", peer.cluster));
                continue;
            }
            Err(e) => {
                distributed = false;
                switched = false;
                notes.push(format!(
                    "cluster {}: cannot read its record: {e}",
                    peer.cluster
                ));
                continue;
            }
        };
        let holds_next = subset(&own.next_roots, &record.roots);
        let on_next_alone = subset(&record.roots, &own.next_roots);
        let d = holds_next
            && match record.stage {
                Stage::Distribute => record.ready,
                Stage::Switch | Stage::Retire | Stage::Done => true,
                // Idle with the next roots: only once it is on them alone (done);
                // roots added by hand say nothing of its workloads.
                Stage::Idle => on_next_alone,
                Stage::Aborting => false,
            };
        let w = match record.stage {
            Stage::Switch => record.ready && record.next_roots == own.next_roots,
            Stage::Retire | Stage::Done | Stage::Idle => on_next_alone,
            Stage::Distribute | Stage::Aborting => false,
        };
        distributed &= d;
        switched &= w;
        if !d || !w {
            let what = if !holds_next {
                "its bundle lacks the next roots"
            } else if !d {
                "still distributing them"
            } else {
                "its old chain may still be in use"
            };
            notes.push(format!(
                "cluster {}: {}{}, {what}",
                peer.cluster,
                record.stage,
                if record.ready { " (ready)" } else { "" }
            ));
        }
    }
    (distributed, switched, notes)
}

/// Why `own` may not be aborted now: another cluster is past the point it could
/// follow an abort (in `distribute`: one that switched; in `switch`: one that
/// retires the old roots).
pub fn abort_blocked(own: &Record, peers: &[Peer]) -> Option<String> {
    peers.iter().find_map(|peer| {
        let r = peer.record.as_ref().ok()?.as_ref()?;
        let past = match own.stage {
            Stage::Distribute => matches!(r.stage, Stage::Switch | Stage::Retire | Stage::Done),
            Stage::Switch => matches!(r.stage, Stage::Retire | Stage::Done),
            _ => false,
        };
        (past && r.next_roots == own.next_roots).then(|| {
            format!(
                "cluster {} is already in stage {}: its workloads would not trust this cluster's after an abort; abort there first, or go on",
                peer.cluster, r.stage
            )
        })
    })
}

/// Replicas whose reports can go: silent for an hour, and every leaf they issued
/// expired (their marks prove nothing any more).
pub fn gone(reports: &BTreeMap<String, Report>, now: OffsetDateTime) -> Vec<String> {
    let t = now.unix_timestamp();
    reports
        .iter()
        .filter(|(_, r)| t - r.at > 3600 && r.marks.expire_by <= t)
        .map(|(name, _)| name.clone())
        .collect()
}

/// The latest renewal point any replica reported (for a declaration).
pub fn renew_by(reports: &BTreeMap<String, Report>) -> i64 {
    reports
        .values()
        .map(|r| r.marks.renew_by)
        .max()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::stage::Declared;

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    fn record() -> Record {
        Record::idle("a".into(), t(0)).declare(
            Declared {
                to: "b".into(),
                window: time::Duration::seconds(60),
                first_stage_end: t(100),
                adds_roots: true,
                drops_roots: true,
                next_roots: Vec::new(),
                slack: time::Duration::ZERO,
            },
            t(0),
        )
    }

    fn report(at: i64, pending: usize, complete: bool, renew_by: i64) -> Report {
        Report {
            marks: Marks {
                renew_by: 1_800_000_000 + renew_by,
                expire_by: 1_800_000_000 + renew_by * 2,
            },
            stage: Stage::Distribute,
            since: 1_800_000_000,
            pending,
            late: 0,
            serving: Serving::default(),
            complete,
            sample: vec![format!("holder {pending}")],
            at: 1_800_000_000 + at,
        }
    }

    fn own() -> Pending {
        Pending {
            count: 1,
            complete: true,
            late: 0,
            serving: Serving::default(),
            sample: vec!["mine".into()],
            behind: Vec::new(),
        }
    }

    #[test]
    fn a_cluster_that_has_not_declared_holds_both_gates_and_one_that_finished_holds_none() {
        let mut own = record();
        own.roots = vec!["old".into(), "new".into()];
        own.next_roots = vec!["new".into()];
        let peer = |stage: Stage, ready: bool, roots: &[&str]| {
            let mut r = record();
            r.stage = stage;
            r.ready = ready;
            r.roots = roots.iter().map(|s| s.to_string()).collect();
            r.next_roots = vec!["new".into()];
            Peer {
                cluster: "west".into(),
                record: Ok(Some(r)),
            }
        };
        let idle_old = peer(Stage::Idle, false, &["old"]);
        let (d, w, notes) = peers_allow(&own, &[idle_old]);
        assert!(!d && !w);
        assert!(notes[0].contains("lacks the next roots"), "{notes:?}");
        let distributing = peer(Stage::Distribute, false, &["old", "new"]);
        assert!(!peers_allow(&own, &[distributing]).0);
        let ready = peer(Stage::Distribute, true, &["old", "new"]);
        let (d, w, _) = peers_allow(&own, &[ready]);
        assert!(d && !w, "distributed, not yet switched");
        let switched = peer(Stage::Switch, true, &["old", "new"]);
        assert!(peers_allow(&own, &[switched]).1);
        let by_hand = peer(Stage::Idle, false, &["old", "new"]);
        assert!(
            !peers_allow(&own, &[by_hand]).0,
            "roots added by hand prove nothing"
        );
        let switched_peer = peer(Stage::Switch, false, &["old", "new"]);
        assert!(abort_blocked(&own, &[switched_peer]).is_some());
        let finished = peer(Stage::Idle, false, &["new"]);
        let (d, w, notes) = peers_allow(&own, &[finished]);
        assert!(d && w && notes.is_empty());
        let unreadable = Peer {
            cluster: "west".into(),
            record: Err("connection refused".into()),
        };
        assert!(!peers_allow(&own, &[unreadable]).0);
    }

    #[test]
    fn fresh_reports_add_their_counts_and_stale_ones_need_their_marks_over() {
        let r = record();
        let mut reports = BTreeMap::new();
        reports.insert("me".to_owned(), report(10, 99, false, 500));
        reports.insert("b".to_owned(), report(10, 2, true, 500));
        let p = combine(own(), "me", &reports, &r, t(20));
        assert_eq!(
            (p.count, p.complete),
            (3, true),
            "my own report is not counted twice"
        );
        assert_eq!(p.sample, vec!["mine", "holder 2"]);
        // Gone quiet: only its marks can vouch for its holders (and until they are
        // due, it counts as one late holder).
        let p = combine(own(), "me", &reports, &r, t(100));
        assert_eq!((p.count, p.late, p.complete), (2, 1, false));
        let p = combine(own(), "me", &reports, &r, t(600));
        assert!(p.complete, "its leaves were all due to renew by then");
        reports.insert("c".to_owned(), report(10, 0, false, 5));
        assert!(!combine(own(), "me", &reports, &r, t(20)).complete);
        // Alive, but on another stage: left behind.
        let mut late = report(10, 0, true, 5);
        late.stage = Stage::Idle;
        reports.insert("d".to_owned(), late);
        assert_eq!(
            combine(own(), "me", &reports, &r, t(20)).behind,
            vec!["replica d (idle)"]
        );
        assert_eq!(renew_by(&reports), 1_800_000_500);
        assert!(
            gone(&reports, t(1000)).is_empty(),
            "heard from within the hour"
        );
        assert_eq!(gone(&reports, t(3700)), vec!["b", "c", "d", "me"]);
    }

    #[test]
    fn a_quiet_replica_that_gave_out_the_old_bundle_late_holds_distribute() {
        let r = record();
        // Quiet since 10; its marks say its leaves are due to renew by 5,000.
        let quiet = report(10, 0, true, 5_000);
        let reports = BTreeMap::from([("q".to_owned(), quiet)]);
        let p = combine(own(), "me", &reports, &r, t(100));
        assert_eq!((p.late, p.count), (1, 2), "{p:?}");
        assert_eq!(combine(own(), "me", &reports, &r, t(5_001)).late, 0);
    }
}
