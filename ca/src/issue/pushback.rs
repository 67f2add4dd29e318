//! Retry pushback for refusals under overload: how long a refused caller should wait
//! before asking again, sent as gRPC's `grpc-retry-pushback-ms` trailer (gRFC A6).
//!
//! In a restart storm every refused caller retries on its own backoff, and a fleet
//! that started together retries together: waves of tens of thousands of requests a
//! few seconds apart, each refused at a cost, while the requests the CA could admit
//! wait behind them. Pushback spreads the retries over the time the CA needs to serve
//! them: each refusal books the next free slot at the rate the CA has been issuing
//! certificates while refusing, so callers come back about when there is room for
//! them. A slot further out than [`MAX_DELAY`] is not booked; that caller is sent to
//! a random point in the second half of it and books when it comes back.
//!
//! Pure: `now` and the jitter come from the caller; the count of certificates issued
//! is one relaxed atomic add on the success path, and the lock is only taken when
//! refusing.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The trailer a refusal carries its pushback in (milliseconds, decimal).
pub(crate) const TRAILER: &str = "grpc-retry-pushback-ms";
/// The issue rate is measured over at most this much of the recent past...
const WINDOW: Duration = Duration::from_secs(2);
/// ...and only once refusals have gone on for this long (a shorter span says too
/// little; until then callers keep their own backoff).
const MIN_SPAN: Duration = Duration::from_millis(200);
/// One sample of the count at most this often.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Below this many certificates a second the CA is not issuing at a rate worth
/// booking against (an API server refusing every review, say): no pushback.
const MIN_RATE: f64 = 1.0;
/// The earliest slot: what is already admitted takes the next moments.
const MIN_DELAY: Duration = Duration::from_millis(250);
/// The longest pushback sent: signet-agent's own longest backoff, so a pushback never
/// keeps a caller away longer than its backoff could. Longer would mean fewer
/// refusals, but a caller refused again (its slot taken by one that came back
/// unbooked) goes to the end of the line, and at a storm's end those waits leave the
/// CA idle: 300 s gave 2.4 refusals per identity and a storm 10 % over its floor.
const MAX_DELAY: Duration = Duration::from_secs(60);
/// Refusals before authentication (token reviews throttled) are spread over this
/// much, unbooked.
const UNBOOKED_SPREAD: Duration = Duration::from_secs(10);

/// The CA's pushback schedule.
#[derive(Debug, Default)]
pub(crate) struct Pushback {
    issued: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// (when, certificates issued by then), oldest first, within [`WINDOW`].
    samples: VecDeque<(Instant, u64)>,
    /// The last slot booked.
    horizon: Option<Instant>,
}

impl Pushback {
    /// Puts into `status` (a refusal for overload) when its caller should come back:
    /// a booked slot, or for a caller refused `before_authentication` an unbooked
    /// point. Returns the delay sent, if any.
    pub(crate) fn stamp(
        &self,
        status: &mut tonic::Status,
        before_authentication: bool,
    ) -> Option<Duration> {
        let now = Instant::now();
        let unit = rand::random::<f64>();
        let delay = if before_authentication {
            self.unbooked(now, unit)
        } else {
            self.refused(now, unit)
        }?;
        if let Ok(value) = delay.as_millis().to_string().parse() {
            status.metadata_mut().insert(TRAILER, value);
        }
        Some(delay)
    }

    /// Counts a certificate issued.
    pub(crate) fn issued(&self) {
        self.issued.fetch_add(1, Ordering::Relaxed);
    }

    /// How long a caller refused at `now` should wait: the next free slot at the rate
    /// certificates were issued over the last [`WINDOW`], at least [`MIN_DELAY`]
    /// away; past [`MAX_DELAY`], a point in its second half that `unit` (in [0, 1))
    /// picks. `None` while that rate is not known yet or is under [`MIN_RATE`].
    pub(crate) fn refused(&self, now: Instant, unit: f64) -> Option<Duration> {
        let mut state = crate::sync::lock(&self.state);
        let rate = self.rate(&mut state, now)?;
        let earliest = now + MIN_DELAY;
        let start = state.horizon.map_or(earliest, |h| h.max(earliest));
        // Whole nanoseconds: the rate is at least MIN_RATE, so this is under 1 s.
        let spacing = Duration::from_nanos((1e9 / rate).round() as u64);
        let slot = start + spacing;
        let delay = slot - now;
        if delay <= MAX_DELAY {
            state.horizon = Some(slot);
            Some(delay)
        } else {
            Some(MAX_DELAY.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0)))
        }
    }

    /// How long a caller refused at `now` before it was authenticated should wait: a
    /// point that `unit` picks between [`MIN_DELAY`] and [`UNBOOKED_SPREAD`], booking
    /// nothing, so anonymous callers cannot push the slots of real callers out (a
    /// flood of them booked every slot for a minute). `None` while the issue rate is
    /// not known, as for [`Self::refused`].
    pub(crate) fn unbooked(&self, now: Instant, unit: f64) -> Option<Duration> {
        let mut state = crate::sync::lock(&self.state);
        self.rate(&mut state, now)?;
        let spread = UNBOOKED_SPREAD.saturating_sub(MIN_DELAY);
        Some(MIN_DELAY + spread.mul_f64(unit.clamp(0.0, 1.0)))
    }

    /// Samples the count of certificates issued and returns the rate over the last
    /// [`WINDOW`]; `None` while it is not known or under [`MIN_RATE`].
    fn rate(&self, state: &mut State, now: Instant) -> Option<f64> {
        let count = self.issued.load(Ordering::Relaxed);
        while state
            .samples
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > WINDOW)
        {
            state.samples.pop_front();
        }
        if state
            .samples
            .back()
            .is_none_or(|&(t, _)| now.saturating_duration_since(t) >= SAMPLE_EVERY)
        {
            state.samples.push_back((now, count));
        }
        let &(since, then) = state.samples.front()?;
        let span = now.saturating_duration_since(since);
        if span < MIN_SPAN {
            return None;
        }
        let rate = count.saturating_sub(then) as f64 / span.as_secs_f64();
        (rate >= MIN_RATE).then_some(rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A schedule that has seen `rate` certificates a second for the last second,
    /// with refusals all along; returns it and the time of the last sample.
    fn warmed(rate: u64) -> (Pushback, Instant) {
        let p = Pushback::default();
        let t0 = Instant::now();
        for step in 0..=10u32 {
            for _ in 0..rate / 10 {
                p.issued();
            }
            // Refusals while warming: not yet booked against a known rate, or booked.
            let _ = p.refused(t0 + SAMPLE_EVERY * step, 0.5);
        }
        p.state.lock().unwrap().horizon = None;
        (p, t0 + SAMPLE_EVERY * 10)
    }

    #[test]
    fn refusals_before_authentication_book_nothing() {
        let (p, now) = warmed(1000);
        // A flood of anonymous refusals...
        for i in 0..10_000 {
            let d = p.unbooked(now, f64::from(i % 100) / 100.0).unwrap();
            assert!((MIN_DELAY..=UNBOOKED_SPREAD).contains(&d), "{d:?}");
        }
        // ...leaves the next real caller the first slot.
        let d = p.refused(now, 0.5).unwrap();
        assert!(d <= MIN_DELAY + Duration::from_millis(2), "{d:?}");
    }

    #[test]
    fn no_pushback_until_a_rate_is_known() {
        let p = Pushback::default();
        let t0 = Instant::now();
        assert_eq!(p.refused(t0, 0.5), None, "the first refusal has no history");
        for _ in 0..1000 {
            p.issued();
        }
        assert_eq!(p.refused(t0 + Duration::from_millis(150), 0.5), None);
        // 1000 over 200 ms: 5000 a second, so the next slot is 200 µs past the floor.
        let d = p.refused(t0 + MIN_SPAN, 0.5).unwrap();
        assert_eq!(d, MIN_DELAY + Duration::from_micros(200));
    }

    #[test]
    fn refusals_book_consecutive_slots_at_the_issue_rate() {
        let (p, now) = warmed(100);
        let delays: Vec<Duration> = (0..5).map(|_| p.refused(now, 0.5).unwrap()).collect();
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        // 100 a second: one every 10 ms.
        assert_eq!(ms, [260, 270, 280, 290, 300]);
        // Later refusals go after the booked ones, not back to the floor.
        let later = p.refused(now + Duration::from_millis(20), 0.5).unwrap();
        assert_eq!(later.as_millis(), 290);
    }

    #[test]
    fn past_the_longest_delay_nothing_is_booked_and_callers_spread_over_its_second_half() {
        let (p, now) = warmed(100);
        // 100 a second, one slot every 10 ms: 60 s holds (60 - 0.25) / 0.01 of them.
        let mut last = Duration::ZERO;
        for _ in 0..5_975 {
            last = p.refused(now, 0.5).unwrap();
        }
        assert!(
            last <= MAX_DELAY && last > MAX_DELAY - Duration::from_millis(10),
            "{last:?}"
        );
        assert_eq!(p.refused(now, 0.0), Some(MAX_DELAY / 2));
        assert_eq!(p.refused(now, 0.999_999).map(|d| d.as_secs()), Some(59));
        // The horizon did not move: once time passes, slots open up again.
        let d = p.refused(now + Duration::from_secs(1), 0.5).unwrap();
        assert!(d < MAX_DELAY, "{d:?}");
    }

    #[test]
    fn no_pushback_when_nothing_is_being_issued() {
        let (p, now) = warmed(0);
        assert_eq!(p.refused(now, 0.5), None);
    }

    #[test]
    fn an_old_storm_does_not_weigh_on_a_new_one() {
        let (p, now) = warmed(100);
        assert!(p.refused(now, 0.5).is_some());
        // An hour later the old samples are gone: no rate until refusals go on again.
        assert_eq!(p.refused(now + Duration::from_secs(3600), 0.5), None);
    }
}
