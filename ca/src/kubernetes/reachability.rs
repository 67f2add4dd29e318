//! Whether the local API server answers. A replica that uses API access asks for
//! `GET /version` every [`PROBE_EVERY`]; `signet_ca_api_server_up` says how the last
//! probe went. Where TokenReview is the only way the local cluster's tokens are
//! checked, a replica starting without an answer is not ready, for at most
//! [`START_GRACE`]: it would refuse every new workload. Later outages leave it ready
//! (every replica shares the API server, and unready replicas would also turn away
//! client-certificate renewals and other clusters' callers); `/readyz` and the
//! metric say so.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::watch;

use crate::metrics::Metrics;

/// How often the API server is asked.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(10);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a starting replica that needs the API server waits for its first answer
/// before it is ready anyway (as long as the pod cache's wait, `POD_SYNC_GRACE`).
pub(crate) const START_GRACE: Duration = Duration::from_secs(60);
/// Without an answer for this long, `/readyz` says the API server is down.
pub(crate) const DOWN_AFTER: Duration = Duration::from_secs(30);

/// What the probes found.
#[derive(Debug)]
pub(crate) struct Reachability {
    /// Start-up readiness depends on it (TokenReview is the only way local tokens
    /// are checked).
    pub(crate) needed_for_readiness: bool,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last_answer: Option<Instant>,
    last_error: Option<String>,
}

impl Reachability {
    pub(crate) fn new(needed_for_readiness: bool) -> Arc<Self> {
        Arc::new(Self {
            needed_for_readiness,
            started: Instant::now(),
            state: Mutex::default(),
        })
    }

    /// Why this replica is not ready, if the API server is the reason: it needs it,
    /// has never had an answer, and started less than [`START_GRACE`] ago.
    pub(crate) fn unready_reason(&self) -> Option<String> {
        let state = crate::sync::lock(&self.state);
        if !self.needed_for_readiness
            || state.last_answer.is_some()
            || self.started.elapsed() >= START_GRACE
        {
            return None;
        }
        let error = state.last_error.as_deref().unwrap_or("no answer yet");
        Some(format!(
            "the Kubernetes API server has not answered yet ({error}); tokens cannot be reviewed"
        ))
    }

    /// What a ready replica says of the API server when it is down.
    pub(crate) fn down_note(&self) -> Option<String> {
        let state = crate::sync::lock(&self.state);
        let error = state.last_error.as_deref()?;
        let since = state.last_answer.unwrap_or(self.started).elapsed();
        (since >= DOWN_AFTER || state.last_answer.is_none()).then(|| {
            format!(
                "the Kubernetes API server has not answered for {}s ({error}): token reviews and the writers fail",
                since.as_secs()
            )
        })
    }

    fn record(&self, result: Result<(), String>, metrics: &Metrics) {
        let mut state = crate::sync::lock(&self.state);
        match result {
            Ok(()) => {
                if state.last_error.take().is_some() {
                    tracing::info!("the Kubernetes API server answers again");
                }
                state.last_answer = Some(Instant::now());
                metrics.api_server_up.set(1);
            }
            Err(e) => {
                if state.last_error.is_none() {
                    tracing::warn!(error = %e, "the Kubernetes API server does not answer");
                }
                state.last_error = Some(e);
                metrics.api_server_up.set(0);
                metrics.api_server_probe_failures.inc();
            }
        }
    }
}

/// Probes until `stop`.
pub(crate) async fn probe(
    client: kube::Client,
    reach: Arc<Reachability>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let result = match tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "GET /version took longer than {}s",
                PROBE_TIMEOUT.as_secs()
            )),
        };
        reach.record(result, &metrics);
        tokio::select! {
            () = tokio::time::sleep(PROBE_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_a_start_without_any_answer_is_unready() {
        let metrics = Metrics::new().unwrap();
        let reach = Reachability::new(true);
        assert!(reach.unready_reason().unwrap().contains("no answer yet"));
        reach.record(Err("connection refused".into()), &metrics);
        let why = reach.unready_reason().unwrap();
        assert!(why.contains("connection refused"), "{why}");
        assert!(reach.down_note().unwrap().contains("connection refused"));
        assert_eq!(metrics.api_server_up.get(), 0);
        reach.record(Ok(()), &metrics);
        assert_eq!(reach.unready_reason(), None);
        assert_eq!(reach.down_note(), None);
        assert_eq!(metrics.api_server_up.get(), 1);
        // An outage later: still ready; after DOWN_AFTER the note says so.
        reach.record(Err("timeout".into()), &metrics);
        assert_eq!(reach.unready_reason(), None);
        assert_eq!(reach.down_note(), None);
        crate::sync::lock(&reach.state).last_answer =
            Some(Instant::now() - DOWN_AFTER - Duration::from_secs(1));
        let note = reach.down_note().unwrap();
        assert!(
            note.contains("has not answered for 31s (timeout)"),
            "{note}"
        );
        assert_eq!(reach.unready_reason(), None);
        assert_eq!(metrics.api_server_probe_failures.get(), 2);

        // Past the start-up grace without any answer: ready, with the note.
        let late = Arc::new(Reachability {
            needed_for_readiness: true,
            started: Instant::now() - START_GRACE,
            state: Mutex::default(),
        });
        late.record(Err("refused".into()), &metrics);
        assert_eq!(late.unready_reason(), None);
        assert!(late.down_note().is_some());

        // Where local tokens have another way in, never unready.
        let not_needed = Reachability::new(false);
        not_needed.record(Err("refused".into()), &metrics);
        assert_eq!(not_needed.unready_reason(), None);
    }
}
