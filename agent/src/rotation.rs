//! Keeping the certificate fresh: when to renew, how to back off, and the loop that
//! does it. The timing functions are pure; the loop reads the time through [`Clock`]
//! so tests can run it on paused time.

use std::{sync::Arc, time::Duration as StdDuration};

use rand::Rng;
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;

use crate::{
    caclient::{CaClient, CaError},
    catrust::{Bundle, CaTrust, Expected, roots_of},
    keys::{KeyError, KeyType, WorkloadKey},
    metrics::Metrics,
    store::SecretStore,
    svid::{self, AnswerError, Svid},
};

/// Why one attempt to get a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The key or the CSR could not be made.
    #[error("cannot make the key or CSR: {0}")]
    Key(#[from] KeyError),
    /// The key generation task died.
    #[error("the key generation task failed: {0}")]
    Task(String),
    /// No answer from the CA, or a refusal.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The CA's answer failed a check.
    #[error("refusing the CA's answer: {0}")]
    Answer(#[from] AnswerError),
}

impl FetchError {
    /// How long the CA asked to wait before the next attempt, if it did.
    pub fn retry_in(&self) -> Option<StdDuration> {
        match self {
            Self::Ca(e) => e.retry_in(),
            _ => None,
        }
    }
}

/// Jitter on the refresh point: ±1 % of the lifetime, so a fleet does not renew in
/// lockstep.
pub const JITTER: f64 = 0.01;
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

/// Longest single sleep: the wall clock is re-read at least this often, so a
/// suspended machine or a clock jump cannot leave an expired certificate in place.
pub const MAX_SLEEP: StdDuration = StdDuration::from_secs(5);

/// Wall-clock time.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// When to renew a certificate valid from `not_before` to `not_after`: when
/// `grace_ratio` of its lifetime is left, moved by `jitter` (a fraction of the
/// lifetime, within ±[`JITTER`]).
pub fn refresh_at(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    grace_ratio: f64,
    jitter: f64,
) -> OffsetDateTime {
    let lifetime = not_after - not_before;
    let jitter = jitter.clamp(-JITTER, JITTER);
    not_after - lifetime * grace_ratio + lifetime * jitter
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

/// Sleeps until `deadline` on the wall clock, re-reading it every [`MAX_SLEEP`] at
/// most. Returns early (false) when `stop` turns true.
pub async fn sleep_until(
    clock: &dyn Clock,
    deadline: OffsetDateTime,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    sleep_until_or(clock, deadline, stop, &mut || false).await
}

/// [`sleep_until`], also ending (true) as soon as `wake` says so; `wake` is asked
/// after every nap.
pub async fn sleep_until_or(
    clock: &dyn Clock,
    deadline: OffsetDateTime,
    stop: &mut watch::Receiver<bool>,
    wake: &mut (dyn FnMut() -> bool + Send),
) -> bool {
    loop {
        let left = deadline - clock.now();
        if left <= Duration::ZERO || wake() {
            return true;
        }
        let nap = StdDuration::try_from(left)
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP);
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
}

/// What the rotation loop needs.
pub struct Rotation {
    /// The CA.
    pub ca: Arc<dyn CaClient>,
    /// Where certificates are published.
    pub store: Arc<SecretStore>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Identity to ask for.
    pub id: spiffe::SpiffeId,
    /// Key type to generate.
    pub key_type: KeyType,
    /// Lifetime to ask for.
    pub ttl: Duration,
    /// Renew when this fraction of the lifetime is left.
    pub grace_ratio: f64,
    /// Counters.
    pub metrics: Metrics,
    /// What the CA is trusted with (`--ca-root-cert`): when that file changes, the
    /// CA's trust has changed (a root rotation), so a new certificate and bundle are
    /// fetched at once instead of at the next refresh.
    pub ca_trust: CaTrust,
    /// How long to keep asking for a bundle that reflects a trust-file change.
    pub trust_sync_timeout: Duration,
}

impl Rotation {
    /// Fetches a certificate now, then renews it for ever: at the refresh point after
    /// a success, with backoff after a failure. The certificate being served is only
    /// replaced by one that passed every check.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::default();
        let mut retries = 0u64;
        // Set when the trust file changed: what the CA's bundle must show, since when,
        // and how long to wait before asking again.
        let mut sync: Option<(Expected, OffsetDateTime, Backoff)> = None;
        // The trust file as last seen; a change against it sets `sync`.
        let mut known = self.ca_trust.read().ok().flatten();
        let digest = |b: &Option<Bundle>| b.as_ref().map(|b| b.digest);
        let roots = |b: &Option<Bundle>| b.as_ref().map(|b| roots_of(&b.pem)).unwrap_or_default();
        loop {
            match self.fetch().await {
                Ok(svid) => {
                    let at = refresh_at(
                        svid.not_before,
                        svid.not_after,
                        self.grace_ratio,
                        rand::rng().random_range(-JITTER..=JITTER),
                    );
                    tracing::info!(
                        id = %svid.id, serial = %svid.serial, not_after = %svid.not_after,
                        refresh_at = %at, "certificate obtained"
                    );
                    let ca_roots = roots_of(svid.roots_pem.as_bytes());
                    self.store.set_svid(Arc::new(svid));
                    backoff.reset();
                    retries = 0;
                    // A change of the trust file since it was last seen (also one made
                    // while retrying for an earlier change) sets what the CA's bundle
                    // must show now.
                    let current = self.ca_trust.read().ok().flatten();
                    if digest(&current) != digest(&known) {
                        sync = Some((
                            Expected::between(&roots(&known), &roots(&current)),
                            self.clock.now(),
                            trust_sync_backoff(rand::rng().random::<f64>()),
                        ));
                        known = current;
                    }
                    if let Some((want, since, sync_backoff)) = &mut sync {
                        if want.met_by(&ca_roots) {
                            tracing::info!("the CA's bundle now reflects the trust file");
                            sync = None;
                        } else if self.clock.now() - *since > self.trust_sync_timeout {
                            tracing::warn!(
                                waited = %(self.clock.now() - *since),
                                "the CA's bundle still does not reflect the change of the CA trust file; back to the normal schedule (is the CA's cacerts updated?)"
                            );
                            self.metrics.trust_sync_timeouts.inc();
                            sync = None;
                        } else {
                            let delay = sync_backoff.next_delay(rand::rng().random::<f64>());
                            tracing::info!(
                                retry_in = ?delay,
                                "the CA's bundle does not reflect the changed CA trust file yet; asking again"
                            );
                            // Never past the certificate's own refresh point: a short
                            // lifetime must not run out while the CA's bundle lags.
                            let deadline = (self.clock.now()
                                + Duration::try_from(delay).unwrap_or(Duration::seconds(30)))
                            .min(at);
                            if !sleep_until(self.clock.as_ref(), deadline, &mut stop).await {
                                return;
                            }
                            continue;
                        }
                    }
                    let trusted = digest(&known);
                    let mut trust_changed = || self.ca_trust.digest() != trusted;
                    if !sleep_until_or(self.clock.as_ref(), at, &mut stop, &mut trust_changed).await
                    {
                        return;
                    }
                    if self.ca_trust.digest() != trusted {
                        tracing::info!(
                            "the CA trust file changed; fetching a new certificate and bundle now"
                        );
                    }
                }
                Err(e) => {
                    self.metrics.failed_requests.inc();
                    // An overloaded CA says when it has room (gRFC A6 pushback): that
                    // replaces the backoff's step, which stays where it was.
                    let delay = e
                        .retry_in()
                        .unwrap_or_else(|| backoff.next_delay(rand::rng().random::<f64>()));
                    let held = self.store.svid().map(|s| s.not_after.to_string());
                    tracing::warn!(
                        error = %e, retry_in = ?delay, attempt = retries + 1,
                        serving_until = held.as_deref().unwrap_or("nothing held yet"),
                        "cannot renew the certificate; the one held keeps being served"
                    );
                    retries += 1;
                    self.metrics.retries.inc();
                    let deadline = self.clock.now()
                        + Duration::try_from(delay).unwrap_or(Duration::seconds(60));
                    if !sleep_until(self.clock.as_ref(), deadline, &mut stop).await {
                        return;
                    }
                }
            }
        }
    }

    /// One attempt: a fresh key, a CSR, the CA's answer, its checks.
    pub async fn fetch(&self) -> Result<Svid, FetchError> {
        let key_type = self.key_type;
        // RSA generation takes long enough to keep it off the reactor.
        let key = tokio::task::spawn_blocking(move || WorkloadKey::generate(key_type))
            .await
            .map_err(|e| FetchError::Task(e.to_string()))??;
        let csr = key.csr(&self.id)?;
        let started = std::time::Instant::now();
        self.metrics.outgoing_requests.inc();
        let answer = self.ca.sign(&csr, self.ttl).await;
        self.metrics
            .outgoing_latency
            .observe(started.elapsed().as_secs_f64());
        let chain = answer?;
        Ok(svid::check_answer(
            &chain,
            &self.id,
            &key.spki(),
            key.pkcs8_pem(),
            self.clock.now(),
        )?)
    }
}

impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation")
            .field("id", &self.id.to_string())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn refresh_at_half_life_with_bounded_jitter() {
        assert_eq!(refresh_at(t(0), t(86_400), 0.5, 0.0), t(43_200));
        assert_eq!(refresh_at(t(0), t(86_400), 0.5, 0.01), t(43_200 + 864));
        assert_eq!(refresh_at(t(0), t(86_400), 0.5, -0.01), t(43_200 - 864));
        // Jitter beyond 1 % is clamped.
        assert_eq!(refresh_at(t(0), t(86_400), 0.5, 0.5), t(43_200 + 864));
        assert_eq!(refresh_at(t(0), t(100), 0.25, 0.0), t(75));
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

    /// Wall time that follows tokio's (pausable) clock.
    struct TokioClock {
        base: OffsetDateTime,
        start: tokio::time::Instant,
        jump: std::sync::Mutex<Duration>,
    }
    impl Clock for TokioClock {
        fn now(&self) -> OffsetDateTime {
            self.base
                + Duration::try_from(self.start.elapsed()).unwrap()
                + *self.jump.lock().unwrap()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sleeps_follow_the_wall_clock_not_the_timer() {
        let clock = Arc::new(TokioClock {
            base: t(0),
            start: tokio::time::Instant::now(),
            jump: Default::default(),
        });
        let (_stop_tx, mut stop) = watch::channel(false);
        let c = clock.clone();
        let sleeper =
            tokio::spawn(async move { sleep_until(c.as_ref(), t(3600), &mut stop).await });
        tokio::time::advance(StdDuration::from_secs(60)).await;
        assert!(!sleeper.is_finished());
        // The machine was suspended for two hours: the wall clock jumps past the
        // deadline and the sleeper wakes within one MAX_SLEEP, not in an hour.
        *clock.jump.lock().unwrap() = Duration::hours(2);
        tokio::time::advance(MAX_SLEEP + StdDuration::from_millis(1)).await;
        assert!(sleeper.await.unwrap());
    }
}
