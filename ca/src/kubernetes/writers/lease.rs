//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: the
//! holder renews every retry period; a follower takes the Lease over when it has
//! seen no renewal for the lease duration (measured on its own clock, so clock skew
//! between replicas does not matter); a leader that cannot renew within the renew
//! deadline stops writing, which is before any follower may take over. Every write
//! carries the Lease's `resourceVersion`, so two replicas cannot both win one round.

use std::time::{Duration as StdDuration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, api::PostParams};
use tokio::sync::watch;

use super::{LeaseConfig, apply::status};
use crate::metrics::Metrics;

/// What this replica last saw of the Lease, and when (on its own clock).
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    duration: Option<i32>,
}

/// The outcome of one round.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Round {
    /// This replica holds the Lease now.
    Held,
    /// Another replica holds it, and it has not expired.
    Other,
    /// A write lost a race (409): nothing is known until the next round.
    Conflict,
}

/// One replica's view of the election.
#[derive(Debug)]
struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    seen: Option<(Seen, Instant)>,
}

/// Whether a Lease last changed at `changed_at` (holder `holder`) may be taken by
/// `me` at `now`.
fn may_take(
    seen: &Seen,
    changed_at: Instant,
    now: Instant,
    me: &str,
    fallback: StdDuration,
) -> bool {
    let holder = seen.holder.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return true;
    }
    let duration = seen
        .duration
        .and_then(|d| u64::try_from(d).ok())
        .map_or(fallback, StdDuration::from_secs);
    now.duration_since(changed_at) > duration
}

impl Elector {
    /// One round: acquire or renew.
    async fn try_acquire_or_renew(&mut self) -> Result<Round, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let me = self.config.identity.clone();
        let duration_secs = i32::try_from(self.config.duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Round::Held),
                Err(e) if status(&e) == Some(409) => Ok(Round::Conflict),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let seen = Seen {
            holder: spec.holder_identity.clone(),
            renew_time: spec.renew_time.clone(),
            duration: spec.lease_duration_seconds,
        };
        let observed = Instant::now();
        let changed_at = match &self.seen {
            Some((previous, at)) if *previous == seen => *at,
            _ => observed,
        };
        self.seen = Some((seen.clone(), changed_at));
        if !may_take(&seen, changed_at, observed, &me, self.config.duration) {
            return Ok(Round::Other);
        }
        let holding = seen.holder.as_deref() == Some(me.as_str());
        let mut new = spec;
        if !holding {
            new.acquire_time = Some(now.clone());
            new.lease_transitions = Some(new.lease_transitions.unwrap_or(0) + 1);
            new.holder_identity = Some(me);
        }
        new.renew_time = Some(now);
        new.lease_duration_seconds = Some(duration_secs);
        lease.spec = Some(new);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Round::Held),
            Err(e) if status(&e) == Some(409) => Ok(Round::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up so a follower takes over at once instead of after the
    /// lease duration. Called once the writers have stopped.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.config.name, "writer lease released"),
            Err(e) => {
                tracing::warn!(lease = %self.config.name, error = %e, "cannot release the writer lease")
            }
        }
    }
}

/// Up to a fifth more than `d`, at random, so replicas do not retry in step.
fn jittered(d: StdDuration) -> StdDuration {
    use rand::Rng;
    d.mul_f64(1.0 + rand::rng().random_range(0.0..0.2))
}

/// Runs the election until `stop`, reporting leadership on `leading`.
pub(super) async fn run(
    config: LeaseConfig,
    client: kube::Client,
    metrics: Metrics,
    leading: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let retry = config.retry_period;
    let renew_deadline = config.renew_deadline;
    let mut elector = Elector {
        api: Api::namespaced(client, &config.namespace),
        config,
        seen: None,
    };
    let mut last_error: Option<String> = None;
    loop {
        // Follower: try every retry period until the Lease is ours.
        loop {
            match tokio::time::timeout(renew_deadline, elector.try_acquire_or_renew()).await {
                Ok(Ok(Round::Held)) => break,
                Ok(Ok(Round::Other | Round::Conflict)) => last_error = None,
                Ok(Err(e)) => {
                    let e = e.to_string();
                    if last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(lease = %elector.config.name, error = %e, "cannot read or take the writer lease");
                        last_error = Some(e);
                    }
                }
                Err(_) => {
                    tracing::warn!(lease = %elector.config.name, "the API server did not answer about the writer lease")
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(jittered(retry)) => {}
            }
        }
        tracing::info!(lease = %elector.config.name, identity = %elector.config.identity, "elected: this replica writes to the API server");
        metrics.leader.set(1);
        let _ = leading.send(true);
        // Leader: renew every retry period; step down when another holds the Lease
        // or no renewal succeeded for the renew deadline. A renewal counts from when
        // it was sent (the server may have committed it any time after), so the
        // deadline never runs past what followers see.
        let mut renewed = Instant::now();
        let stopping = loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break true,
                _ = tokio::time::sleep(retry) => {}
            }
            let left = renew_deadline.saturating_sub(renewed.elapsed());
            let sent = Instant::now();
            match tokio::time::timeout(left, elector.try_acquire_or_renew()).await {
                Ok(Ok(Round::Held)) => renewed = sent,
                Ok(Ok(Round::Other)) => {
                    tracing::warn!(lease = %elector.config.name, "another replica holds the writer lease; stepping down");
                    break false;
                }
                Ok(Ok(Round::Conflict)) => {
                    tracing::debug!(lease = %elector.config.name, "writer lease renewal lost a race; trying again");
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %elector.config.name, error = %e, "cannot renew the writer lease")
                }
                Err(_) => {}
            }
            if renewed.elapsed() >= renew_deadline {
                tracing::warn!(lease = %elector.config.name, "writer lease not renewed within the renew deadline; stepping down");
                break false;
            }
        };
        metrics.leader.set(0);
        let _ = leading.send(false);
        if stopping {
            return;
        }
    }
}

/// Releases the Lease if this replica holds it (after its writers have stopped).
pub(super) async fn release(config: LeaseConfig, client: kube::Client) {
    let elector = Elector {
        api: Api::namespaced(client, &config.namespace),
        config,
        seen: None,
    };
    elector.release().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(holder: Option<&str>, duration: Option<i32>) -> Seen {
        Seen {
            holder: holder.map(str::to_owned),
            renew_time: None,
            duration,
        }
    }

    #[test]
    fn a_lease_is_taken_only_when_free_ours_or_unrenewed_for_its_duration() {
        let t0 = Instant::now();
        let d = StdDuration::from_secs(15);
        assert!(may_take(&seen(None, Some(15)), t0, t0, "me", d));
        assert!(may_take(&seen(Some(""), Some(15)), t0, t0, "me", d));
        assert!(may_take(&seen(Some("me"), Some(15)), t0, t0, "me", d));
        let other = seen(Some("other"), Some(15));
        assert!(!may_take(
            &other,
            t0,
            t0 + StdDuration::from_secs(15),
            "me",
            d
        ));
        assert!(may_take(
            &other,
            t0,
            t0 + StdDuration::from_secs(16),
            "me",
            d
        ));
        // The Lease's own duration wins over ours; a released Lease (1 s) goes fast.
        let released = seen(Some("other"), Some(1));
        assert!(may_take(
            &released,
            t0,
            t0 + StdDuration::from_millis(1100),
            "me",
            d
        ));
        // A nonsensical duration falls back to ours.
        let negative = seen(Some("other"), Some(-5));
        assert!(!may_take(
            &negative,
            t0,
            t0 + StdDuration::from_secs(10),
            "me",
            d
        ));
    }
}
