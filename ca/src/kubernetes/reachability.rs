//! Whether the local API server answers. A replica with API access asks for
//! `GET /version` every [`PROBE_EVERY`]; `signet_ca_api_server_up` says how the last
//! probe went. Where every token needs the API server (TokenReview), `/readyz` turns
//! 503 once it has not answered for [`UNREADY_AFTER`], so the Service sends callers to
//! replicas that can authenticate them; the probes go on and readiness comes back
//! with the first answer.

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
/// Without an answer for this long, a replica that needs one is not ready.
pub(crate) const UNREADY_AFTER: Duration = Duration::from_secs(30);

/// What the probes found.
#[derive(Debug)]
pub(crate) struct Reachability {
    /// Readiness depends on it (TokenReview is how local tokens are checked).
    pub(crate) needed_for_readiness: bool,
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
            state: Mutex::default(),
        })
    }

    /// Why this replica is not ready, if the API server is the reason.
    pub(crate) fn unready_reason(&self) -> Option<String> {
        if !self.needed_for_readiness {
            return None;
        }
        let state = crate::sync::lock(&self.state);
        let error = state.last_error.as_deref().unwrap_or("no answer yet");
        match state.last_answer {
            Some(at) if at.elapsed() < UNREADY_AFTER => None,
            Some(at) => Some(format!(
                "the Kubernetes API server has not answered for {}s ({error}); tokens cannot be reviewed",
                at.elapsed().as_secs()
            )),
            None => Some(format!(
                "the Kubernetes API server has not answered yet ({error}); tokens cannot be reviewed"
            )),
        }
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
    fn readiness_follows_the_last_answer_only_where_it_is_needed() {
        let metrics = Metrics::new().unwrap();
        let reach = Reachability::new(true);
        assert!(reach.unready_reason().unwrap().contains("no answer yet"));
        reach.record(Err("connection refused".into()), &metrics);
        assert!(
            reach
                .unready_reason()
                .unwrap()
                .contains("connection refused")
        );
        assert_eq!(metrics.api_server_up.get(), 0);
        reach.record(Ok(()), &metrics);
        assert_eq!(reach.unready_reason(), None);
        assert_eq!(metrics.api_server_up.get(), 1);
        // An error after a recent answer: still ready until UNREADY_AFTER passes.
        reach.record(Err("timeout".into()), &metrics);
        assert_eq!(reach.unready_reason(), None);
        crate::sync::lock(&reach.state).last_answer =
            Some(Instant::now() - UNREADY_AFTER - Duration::from_secs(1));
        let why = reach.unready_reason().unwrap();
        assert!(why.contains("has not answered for 31s (timeout)"), "{why}");
        assert_eq!(metrics.api_server_probe_failures.get(), 2);

        let not_needed = Reachability::new(false);
        not_needed.record(Err("refused".into()), &metrics);
        assert_eq!(not_needed.unready_reason(), None);
    }
}
