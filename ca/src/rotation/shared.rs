//! What the replicas of one cluster share about a trust change, behind a small trait
//! (an API-server object in cluster mode, `crate::kubernetes::writers::rotationcm`):
//! the stage record the elected replica writes and every replica follows, an abort
//! request, each replica's report (its issuance marks and what it counts as pending),
//! the consumers read back, and an Event per stage change.

use std::{collections::BTreeMap, fmt, future::Future, pin::Pin};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{
    ledger::{Marks, Pending},
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
/// reports: a fresh report about the same stage adds its count; any other replica
/// must have its marks over (its leaves due to renew, or expired) for the count to
/// be complete, since nobody can see its holders.
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
        let fresh = t - report.at <= REPORT_FRESH_SECS
            && report.stage == record.stage
            && report.since == record.since;
        if fresh {
            all.count += report.pending;
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
        }
    }
    all
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
            complete,
            sample: vec![format!("holder {pending}")],
            at: 1_800_000_000 + at,
        }
    }

    fn own() -> Pending {
        Pending {
            count: 1,
            complete: true,
            sample: vec!["mine".into()],
        }
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
        // Gone quiet: only its marks can vouch for its holders.
        let p = combine(own(), "me", &reports, &r, t(100));
        assert_eq!((p.count, p.complete), (1, false));
        let p = combine(own(), "me", &reports, &r, t(600));
        assert!(p.complete, "its leaves were all due to renew by then");
        reports.insert("c".to_owned(), report(10, 0, false, 5));
        assert!(!combine(own(), "me", &reports, &r, t(20)).complete);
        assert_eq!(renew_by(&reports), 1_800_000_500);
        assert!(gone(&reports, t(1000)).is_empty(), "heard from within the hour");
        assert_eq!(gone(&reports, t(3700)), vec!["b", "c", "me"]);
    }
}
