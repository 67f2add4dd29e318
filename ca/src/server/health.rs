//! The plain HTTP side: `/metrics`, `/healthz`, `/rotation` (the trust change's
//! status as JSON, for `signet-ca rotation status`), and `/readyz`, which also says
//! whether the API server answers (where TokenReview needs it) and whether the pod
//! caches behind node impersonation have synced.

use std::{sync::Arc, time::Duration as StdDuration};

use axum::{Router, http::StatusCode, routing::get};
use tokio::{net::TcpListener, sync::watch};

use crate::{
    kubernetes::{pods::PodCache, reachability::Reachability},
    metrics::Metrics,
    rotation::Rotation,
};

/// How long a replica stays unready waiting for its local pod cache: long enough
/// for a first list, short enough that an API server outage at start does not keep
/// it from signing workload certificates.
const POD_SYNC_GRACE: StdDuration = StdDuration::from_secs(60);

/// What `/readyz` says beyond "serving": the API server, the pod caches behind node
/// impersonation.
#[derive(Debug, Clone)]
pub(super) struct Readiness {
    pub(super) api: Option<Arc<Reachability>>,
    pub(super) caches: Vec<(String, PodCache)>,
    pub(super) local: String,
    pub(super) started: std::time::Instant,
}

impl Readiness {
    /// Not ready while a starting replica that needs the API server has no answer
    /// from it, or while the local cluster's pod cache has not synced (each for at
    /// most a minute); ready otherwise, naming an API server that is down or any
    /// cluster whose impersonation requests are still answered UNAVAILABLE.
    fn readiness(&self) -> (StatusCode, String) {
        if let Some(why) = self.api.as_ref().and_then(|api| api.unready_reason()) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            );
        }
        let (code, body) = self.pods_readiness();
        match self.api.as_ref().and_then(|api| api.down_note()) {
            Some(note) if code == StatusCode::OK => (code, format!("ready; {note}\n")),
            _ => (code, body),
        }
    }

    /// The pod caches' part of [`Self::readiness`].
    fn pods_readiness(&self) -> (StatusCode, String) {
        let unsynced: Vec<&str> = self
            .caches
            .iter()
            .filter(|(_, pods)| !pods.synced())
            .map(|(cluster, _)| cluster.as_str())
            .collect();
        if unsynced.is_empty() {
            return (StatusCode::OK, "ready\n".to_owned());
        }
        let why = format!(
            "the pod cache for node impersonation is not synced (cluster {})",
            unsynced.join(", ")
        );
        if unsynced.contains(&self.local.as_str()) && self.started.elapsed() < POD_SYNC_GRACE {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            )
        } else {
            (
                StatusCode::OK,
                format!("ready; {why}: impersonation requests get UNAVAILABLE\n"),
            )
        }
    }
}

pub(super) async fn serve_http(
    listener: TcpListener,
    metrics: Metrics,
    ready: watch::Receiver<bool>,
    pods: Readiness,
    rotation: Arc<Rotation>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), std::io::Error> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { metrics.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/rotation",
            get(move || {
                let json = serde_json::to_string_pretty(&*rotation.status()).unwrap_or_default();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        json,
                    )
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let answer = if *ready.borrow() {
                    pods.readiness()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned())
                };
                async move { answer }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}
