//! When the rotation loop wakes next, and why: the refresh point after a success,
//! the backoff (or the CA's pushback) after a failure, and, after the CA trust file
//! changed, the retries until the CA's bundle reflects the change. Pure: the time, the
//! trust file as read and the random draws are all inputs, so every rule is tested
//! with plain values.

use std::time::Duration as StdDuration;

use time::{Duration, OffsetDateTime};

use crate::{
    identity::catrust::{Bundle, Expected, roots_of},
    identity::svid::Svid,
};

/// The most the refresh point may move either way, as a fraction of the lifetime
/// (`--grace-ratio-jitter` is at most this; pilot-agent's default is 0.01).
pub const MAX_JITTER: f64 = 0.1;
/// First retry delay after a failure.
pub const BACKOFF_MIN: StdDuration = StdDuration::from_millis(500);
/// Longest retry delay.
pub const BACKOFF_MAX: StdDuration = StdDuration::from_secs(60);
/// First delay when asking again for a bundle that reflects a trust-file change.
pub const TRUST_SYNC_MIN: StdDuration = StdDuration::from_secs(1);
/// Longest such delay.
pub const TRUST_SYNC_MAX: StdDuration = StdDuration::from_secs(30);
/// The first step of that backoff is drawn up to this long: the agents of a
/// namespace all see the same ConfigMap edit, and a CA whose bundle lags would
/// otherwise get the whole namespace back in lockstep, step after step.
pub const TRUST_SYNC_SPREAD: StdDuration = StdDuration::from_secs(10);

/// Shortest wait before telling signet-ca, during its trust change, the roots now
/// served (the next request says them).
pub const REPORT_MIN: StdDuration = StdDuration::from_secs(1);
/// Longest: the agents of a namespace learn the new bundle together, and tell it
/// spread over this much.
pub const REPORT_SPREAD: StdDuration = StdDuration::from_secs(5);
/// At most this many such requests in a row: answers from replicas in different
/// stages (behind a load balancer) cannot keep an agent asking.
pub const MAX_REPORTS_IN_ROW: u8 = 3;

/// Whether signet-ca uses, in `stage`, what agents say they serve: while bundles
/// change (`distribute` gates on it; `switch` and `retire` show it).
fn reports_matter(stage: &str) -> bool {
    matches!(stage, "distribute" | "switch" | "retire")
}

/// The backoff for asking again after a trust-file change; `unit` in [0, 1) picks
/// its first step between [`TRUST_SYNC_MIN`] and [`TRUST_SYNC_SPREAD`].
pub fn trust_sync_backoff(unit: f64) -> Backoff {
    let spread = TRUST_SYNC_SPREAD.saturating_sub(TRUST_SYNC_MIN);
    Backoff {
        step: TRUST_SYNC_MIN + spread.mul_f64(unit.clamp(0.0, 1.0)),
        min: TRUST_SYNC_MIN,
        max: TRUST_SYNC_MAX,
    }
}

/// When to renew a certificate valid from `not_before` to `not_after`: when
/// `grace_ratio` of its lifetime is left, moved by `jitter` (a fraction of the
/// lifetime, within ±[`MAX_JITTER`]).
pub fn refresh_at(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    grace_ratio: f64,
    jitter: f64,
) -> OffsetDateTime {
    let lifetime = not_after - not_before;
    let jitter = jitter.clamp(-MAX_JITTER, MAX_JITTER);
    // The part of the lifetime still left at the refresh point, kept inside the
    // lifetime as pilot-agent keeps it: a small ratio with a large jitter must not
    // move the refresh past expiry, nor a large one before issue.
    let left = (grace_ratio - jitter).clamp(0.01, 0.99);
    not_after - lifetime * left
}

/// Exponential backoff with jitter: 500 ms doubling to 60 s, each delay drawn
/// between half and all of the current step.
#[derive(Debug, Clone)]
pub struct Backoff {
    step: StdDuration,
    min: StdDuration,
    max: StdDuration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::between(BACKOFF_MIN, BACKOFF_MAX)
    }
}

impl Backoff {
    /// Steps from `min` doubling to `max`.
    pub fn between(min: StdDuration, max: StdDuration) -> Self {
        Self {
            step: min,
            min,
            max,
        }
    }

    /// The next delay; `unit` in [0, 1) picks where in the jitter range it falls.
    pub fn next_delay(&mut self, unit: f64) -> StdDuration {
        let delay = self.step.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0));
        self.step = (self.step * 2).min(self.max);
        delay.max(self.min / 2)
    }

    /// Back to the first step after a success.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

/// Why the loop wakes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The refresh point of the certificate just published; a change of the trust
    /// file ends the sleep early.
    Refresh,
    /// The CA's bundle does not reflect the changed trust file yet: ask again after
    /// `delay` (never past the refresh point).
    TrustSync { delay: StdDuration },
    /// Attempt `attempt` failed; retry after `delay`, the CA's pushback when it sent
    /// one, else the backoff's step.
    Retry { delay: StdDuration, attempt: u64 },
    /// signet-ca is in a trust change and does not know yet that the roots just
    /// published are served: the next request, after `delay`, tells it (the CA
    /// counts this agent as holding the next roots only then).
    Report { delay: StdDuration },
}

/// How a wait for the CA's bundle to reflect a trust-file change ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustSyncEnd {
    /// It does now.
    Reflected,
    /// It still does not after `--trust-sync-timeout` (waited this long): back to the
    /// normal schedule.
    TimedOut(Duration),
}

/// When to wake and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    /// When.
    pub at: OffsetDateTime,
    /// Why.
    pub why: Why,
    /// The certificate's refresh point (after a success).
    pub refresh: Option<OffsetDateTime>,
    /// A trust sync that ended with this answer.
    pub ended: Option<TrustSyncEnd>,
}

/// A trust-file change the CA's bundle must come to show.
#[derive(Debug, Clone)]
struct TrustSync {
    want: Expected,
    since: OffsetDateTime,
    backoff: Backoff,
}

/// The rotation's timing state between attempts.
pub struct Schedule {
    grace_ratio: f64,
    jitter: f64,
    trust_sync_timeout: StdDuration,
    backoff: Backoff,
    retries: u64,
    /// The trust file as last seen; a change against it starts a [`TrustSync`].
    known: Option<Bundle>,
    sync: Option<TrustSync>,
    /// Requests made in a row only to tell the CA the roots served.
    reports_in_row: u8,
    /// Draws in [0, 1): jitter and backoff spread.
    draw: Box<dyn FnMut() -> f64 + Send>,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("retries", &self.retries)
            .field("syncing", &self.sync.is_some())
            .finish_non_exhaustive()
    }
}

impl Schedule {
    /// Renewing when `grace_ratio` of a lifetime is left, give or take up to `jitter`
    /// of it, asking for a bundle that reflects a trust-file change for at most
    /// `trust_sync_timeout`; `trust` is the trust file as read at start, `draw` the
    /// source of randomness.
    pub fn new(
        grace_ratio: f64,
        jitter: f64,
        trust_sync_timeout: StdDuration,
        trust: Option<Bundle>,
        draw: Box<dyn FnMut() -> f64 + Send>,
    ) -> Self {
        Self {
            grace_ratio,
            jitter,
            trust_sync_timeout,
            backoff: Backoff::default(),
            retries: 0,
            known: trust,
            sync: None,
            reports_in_row: 0,
            draw,
        }
    }

    /// The digest of the trust file as last seen: a sleep until the refresh point
    /// ends early when the file's differs.
    pub fn trusted(&self) -> Option<[u8; 32]> {
        self.known.as_ref().map(|b| b.digest)
    }

    /// After `svid` was obtained and published, with `trust` the trust file as read
    /// now: the refresh point, or sooner while the CA's bundle must still come to
    /// reflect a change of the trust file (also one made while retrying for an
    /// earlier change).
    pub fn after_success(
        &mut self,
        svid: &Svid,
        trust: Option<Bundle>,
        now: OffsetDateTime,
    ) -> Next {
        self.backoff.reset();
        self.retries = 0;
        let jitter = (2.0 * (self.draw)() - 1.0) * self.jitter;
        let refresh = refresh_at(svid.not_before, svid.not_after, self.grace_ratio, jitter);
        let digest = |b: &Option<Bundle>| b.as_ref().map(|b| b.digest);
        if digest(&trust) != digest(&self.known) {
            let roots =
                |b: &Option<Bundle>| b.as_ref().map(|b| roots_of(&b.pem)).unwrap_or_default();
            self.sync = Some(TrustSync {
                want: Expected::between(&roots(&self.known), &roots(&trust)),
                since: now,
                backoff: trust_sync_backoff((self.draw)()),
            });
            self.known = trust;
        }
        // A signet-ca in a trust change hears what is served from the next request.
        let report_due = svid.trust.stage.as_deref().is_some_and(reports_matter)
            && !svid.trust.reported
            && self.reports_in_row < MAX_REPORTS_IN_ROW;
        let reports_in_row = &mut self.reports_in_row;
        let mut refreshing = |ended| {
            if !report_due {
                *reports_in_row = 0;
                return Next {
                    at: refresh,
                    why: Why::Refresh,
                    refresh: Some(refresh),
                    ended,
                };
            }
            *reports_in_row += 1;
            let spread = REPORT_SPREAD.saturating_sub(REPORT_MIN);
            let delay = REPORT_MIN + spread.mul_f64((self.draw)().clamp(0.0, 1.0));
            Next {
                at: (now + Duration::try_from(delay).unwrap_or(Duration::seconds(5))).min(refresh),
                why: Why::Report { delay },
                refresh: Some(refresh),
                ended,
            }
        };
        let Some(sync) = &mut self.sync else {
            return refreshing(None);
        };
        if sync.want.met_by(&roots_of(svid.roots_pem.as_bytes())) {
            self.sync = None;
            return refreshing(Some(TrustSyncEnd::Reflected));
        }
        let waited = now - sync.since;
        if waited > self.trust_sync_timeout {
            self.sync = None;
            return refreshing(Some(TrustSyncEnd::TimedOut(waited)));
        }
        let delay = sync.backoff.next_delay((self.draw)());
        // Never past the certificate's own refresh point: a short lifetime must not
        // run out while the CA's bundle lags.
        let at = (now + Duration::try_from(delay).unwrap_or(Duration::seconds(30))).min(refresh);
        Next {
            at,
            why: Why::TrustSync { delay },
            refresh: Some(refresh),
            ended: None,
        }
    }

    /// After an attempt failed: the CA's retry `pushback` when it sent one (which
    /// leaves the backoff's step where it was), else the backoff's next step.
    pub fn after_failure(&mut self, pushback: Option<StdDuration>, now: OffsetDateTime) -> Next {
        let delay = match pushback {
            Some(pushback) => pushback,
            None => self.backoff.next_delay((self.draw)()),
        };
        self.retries += 1;
        Next {
            at: now + Duration::try_from(delay).unwrap_or(Duration::seconds(60)),
            why: Why::Retry {
                delay,
                attempt: self.retries,
            },
            refresh: None,
            ended: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn refresh_at_half_life_with_bounded_jitter() {
        assert_eq!(refresh_at(t(0), t(86_400), 0.5, 0.0), t(43_200));
        assert_eq!(refresh_at(t(0), t(86_400), 0.5, 0.01), t(43_200 + 864));
        assert_eq!(refresh_at(t(0), t(86_400), 0.5, -0.01), t(43_200 - 864));
        // Jitter beyond 10 % is clamped.
        assert_eq!(refresh_at(t(0), t(86_400), 0.5, 0.5), t(43_200 + 8_640));
        assert_eq!(refresh_at(t(0), t(100), 0.25, 0.0), t(75));
        // Never past expiry nor before issue, whatever the ratio and jitter.
        assert_eq!(refresh_at(t(0), t(100_000), 0.05, 0.1), t(99_000));
        assert_eq!(refresh_at(t(0), t(100_000), 0.95, -0.1), t(1_000));
    }

    #[test]
    fn agents_spread_their_retries_after_a_trust_change() {
        // A namespace of 100 agents whose CA lags behind a trust-file change: their
        // first retries spread over ten seconds, and so do the ones after (each
        // agent's steps double from its own start), instead of all in the same second.
        for retry in 0..3 {
            let mut per_second = std::collections::BTreeMap::<u64, usize>::new();
            for i in 0..100 {
                let mut backoff = trust_sync_backoff((i as f64 + 0.5) / 100.0);
                let mut at = StdDuration::ZERO;
                for _ in 0..=retry {
                    at += backoff.next_delay(1.0);
                }
                *per_second.entry(at.as_secs()).or_default() += 1;
            }
            let most = per_second.values().max().copied().unwrap_or(0);
            assert!(most <= 25, "retry {retry}: {per_second:?}");
        }
        let first = trust_sync_backoff(0.0).next_delay(1.0);
        assert_eq!(first, TRUST_SYNC_MIN);
    }

    #[test]
    fn backoff_doubles_to_a_minute_and_resets() {
        let mut b = Backoff::default();
        let fulls: Vec<_> = (0..10).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(fulls[0], StdDuration::from_millis(500));
        assert_eq!(fulls[1], StdDuration::from_secs(1));
        assert_eq!(fulls[2], StdDuration::from_secs(2));
        assert_eq!(*fulls.last().unwrap(), BACKOFF_MAX);
        let mut b = Backoff::default();
        assert_eq!(b.next_delay(0.0), StdDuration::from_millis(250));
        b.reset();
        assert_eq!(b.next_delay(1.0), BACKOFF_MIN);
    }

    /// A certificate living a day from `t(0)` whose CA sent `roots`.
    fn svid(roots: &str) -> Svid {
        Svid {
            id: spiffe::SpiffeId::new("spiffe://cluster.local/ns/a/sa/b").unwrap(),
            chain_pem: String::new(),
            key_pem: String::new(),
            roots_pem: roots.to_owned(),
            serial: "01".into(),
            issuer: String::new(),
            not_before: t(0),
            not_after: t(86_400),
            chain_len: 1,
            root_digests: Vec::new(),
            trust: Default::default(),
        }
    }

    fn pem(n: u8) -> String {
        ::pem::encode(&::pem::Pem::new("CERTIFICATE", vec![n; 8]))
    }

    fn bundle(pems: &[&str]) -> Option<Bundle> {
        let pem: Vec<u8> = pems.concat().into_bytes();
        use sha2::Digest;
        let digest = sha2::Sha256::digest(&pem).into();
        Some(Bundle { pem, digest })
    }

    /// Draws always in the middle: no jitter, mid-range backoff steps.
    fn schedule(trust: Option<Bundle>) -> Schedule {
        Schedule::new(
            0.5,
            0.01,
            StdDuration::from_secs(600),
            trust,
            Box::new(|| 0.5),
        )
    }

    #[test]
    fn a_success_wakes_at_the_refresh_point_and_resets_the_backoff() {
        let mut s = schedule(None);
        let first = s.after_failure(None, t(0));
        let second = s.after_failure(None, t(1));
        assert_eq!(
            first.why,
            Why::Retry {
                delay: StdDuration::from_millis(375),
                attempt: 1
            }
        );
        assert_eq!(
            second.why,
            Why::Retry {
                delay: StdDuration::from_millis(750),
                attempt: 2
            }
        );
        assert_eq!(second.at, t(1) + Duration::milliseconds(750));
        let next = s.after_success(&svid(&pem(1)), None, t(10));
        assert_eq!(
            (next.at, next.why, next.ended),
            (t(43_200), Why::Refresh, None)
        );
        let again = s.after_failure(None, t(43_200));
        assert_eq!(
            again.why,
            Why::Retry {
                delay: StdDuration::from_millis(375),
                attempt: 1
            }
        );
    }

    #[test]
    fn the_cas_pushback_replaces_the_backoffs_step_without_advancing_it() {
        let mut s = schedule(None);
        let next = s.after_failure(Some(StdDuration::from_secs(7)), t(0));
        assert_eq!(
            next.why,
            Why::Retry {
                delay: StdDuration::from_secs(7),
                attempt: 1
            }
        );
        assert_eq!(next.at, t(7));
        let next = s.after_failure(None, t(7));
        assert_eq!(
            next.why,
            Why::Retry {
                delay: StdDuration::from_millis(375),
                attempt: 2
            }
        );
    }

    #[test]
    fn a_trust_change_is_asked_about_until_the_cas_bundle_shows_it() {
        let (old, new) = (pem(1), pem(2));
        let mut s = schedule(bundle(&[&old]));
        // The trust file gains the new root; the CA still sends only the old one.
        let next = s.after_success(&svid(&old), bundle(&[&old, &new]), t(100));
        let Why::TrustSync { delay } = next.why else {
            panic!("{next:?}")
        };
        // The first step is spread over 1-10 s: 5.5 s mid-range, drawn at 3/4 of it.
        assert_eq!(delay, StdDuration::from_millis(4_125));
        assert_eq!(next.at, t(100) + Duration::milliseconds(4_125));
        assert_eq!(next.refresh, Some(t(43_200)));
        // The CA's bundle shows it now: back to the refresh point.
        let next = s.after_success(&svid(&format!("{old}{new}")), bundle(&[&old, &new]), t(103));
        assert_eq!(
            (next.why, next.ended),
            (Why::Refresh, Some(TrustSyncEnd::Reflected))
        );
    }

    #[test]
    fn a_trust_sync_gives_up_after_its_timeout_and_never_passes_the_refresh_point() {
        let (old, new) = (pem(1), pem(2));
        let mut s = schedule(bundle(&[&old]));
        let next = s.after_success(&svid(&old), bundle(&[&new]), t(43_199));
        assert_eq!(next.at, t(43_200), "the refresh point comes first");
        let next = s.after_success(&svid(&old), bundle(&[&new]), t(43_199 + 601));
        assert_eq!(next.why, Why::Refresh);
        assert_eq!(
            next.ended,
            Some(TrustSyncEnd::TimedOut(Duration::seconds(601)))
        );
        assert_eq!(s.trusted(), bundle(&[&new]).map(|b| b.digest));
    }

    #[test]
    fn during_a_cas_trust_change_a_new_bundle_is_reported_by_the_next_request_soon() {
        let (old, new) = (pem(1), pem(2));
        let mut s = schedule(bundle(&[&old]));
        let mut union = svid(&format!("{old}{new}"));
        union.trust.stage = Some("distribute".into());
        // The request that brought the union said the old roots: tell the CA soon,
        // spread over 1-5 s (drawn mid-range), never past the refresh point.
        let next = s.after_success(&union, bundle(&[&old, &new]), t(100));
        assert_eq!(
            (next.why.clone(), next.ended),
            (
                Why::Report {
                    delay: StdDuration::from_secs(3)
                },
                Some(TrustSyncEnd::Reflected)
            )
        );
        assert_eq!(next.at, t(103));
        // Told: back to the refresh point.
        union.trust.reported = true;
        let next = s.after_success(&union, bundle(&[&old, &new]), t(104));
        assert_eq!(next.why, Why::Refresh);
        // Answers that keep changing (replicas in different stages) are reported a
        // few times in a row at most; then the refresh point.
        let mut flapping = union.clone();
        flapping.trust.reported = false;
        let whys: Vec<Why> = (0..=MAX_REPORTS_IN_ROW)
            .map(|i| {
                s.after_success(&flapping, bundle(&[&old, &new]), t(110 + i64::from(i)))
                    .why
            })
            .collect();
        let (reports, last) = whys.split_at(usize::from(MAX_REPORTS_IN_ROW));
        assert!(
            reports.iter().all(|w| matches!(w, Why::Report { .. })),
            "{whys:?}"
        );
        assert_eq!(last, [Why::Refresh]);
        // A CA that says nothing (istiod), or is idle or done, is not told anything
        // sooner.
        for stage in [None, Some("idle".to_owned()), Some("done".to_owned())] {
            let mut quiet = svid(&new);
            quiet.trust.stage = stage;
            assert_eq!(
                s.after_success(&quiet, bundle(&[&old, &new]), t(200)).why,
                Why::Refresh
            );
        }
    }
}
