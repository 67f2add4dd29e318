//! Runs the agent: the rotation loop, the SDS server on the Unix socket, the SPIFFE
//! Workload API on its own socket when asked, the HTTP listener for readiness and
//! metrics, and `--output-certs`.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, http::StatusCode, routing::get};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::watch,
};
use tokio_stream::{StreamExt, wrappers::UnixListenerStream};

use signet_fs::watch::{Poll, Reported, read_off_thread};

use crate::{
    config::RunConfig,
    identity::caclient::{CaClient, GrpcCaClient},
    identity::rotation::{Clock, Rotation, SystemClock},
    metrics::Metrics,
    sds::{Sds, authority::Normalized},
    secrets::output,
    secrets::store::SecretStore,
};

/// How often `--federated-bundles` is read again.
const FEDERATION_POLL: Duration = Duration::from_secs(2);
/// How long one read of it may take (a stuck mount must not hold the agent's thread).
const FEDERATION_READ_LIMIT: Duration = Duration::from_secs(2);

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("SDS server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// The agent's listeners, bound by the caller (see [`crate::sds::bind`]), so tests
/// can use port 0 and temporary sockets.
#[derive(Debug)]
pub struct Listeners {
    /// The SDS socket.
    pub sds: UnixListener,
    /// `/healthz/ready` and `/metrics`.
    pub http: TcpListener,
    /// The SPIFFE Workload API's socket (`--workload-api-socket`).
    pub workload_api: Option<UnixListener>,
}

/// Runs until `shutdown`.
pub async fn run(
    config: RunConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let config = Arc::new(config);
    let ca: Arc<dyn CaClient> = Arc::new(GrpcCaClient::new(config.ca.clone()));
    run_with(config, ca, Arc::new(SystemClock), listeners, shutdown).await
}

/// [`run`] with the CA and the clock supplied (tests use fakes).
pub async fn run_with(
    config: Arc<RunConfig>,
    ca: Arc<dyn CaClient>,
    clock: Arc<dyn Clock>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let Listeners {
        sds: socket,
        http,
        workload_api,
    } = listeners;
    let metrics = Metrics::new()?;
    if config.identity.key_type == crate::identity::keys::KeyType::EcP384 {
        // Seen with Envoy 1.40 (tests/python/test_envoy_mesh.py): the handshake fails.
        tracing::warn!(
            "--key-type ec-p384: Envoy clients on TLS 1.2 (Envoy's client default; Istio's sidecars use TLS 1.3) with their default curves (X25519, P-256) refuse a P-384 server certificate; such peers must allow TLS 1.3 or list P-384 in ecdh_curves of their UpstreamTlsContext (docs/agent.md, \"Key types and Envoy\"), or use ec-p256 or an RSA key"
        );
    }
    let store = SecretStore::with_file_policy(config.file_secrets.clone());
    let (stop_tx, stop_rx) = watch::channel(false);

    let rotation = Rotation {
        ca: ca.clone(),
        store: store.clone(),
        clock: clock.clone(),
        id: config.identity.spiffe_id.clone(),
        key_type: config.identity.key_type,
        ttl: config.identity.ttl,
        grace_ratio: config.identity.grace_ratio,
        grace_jitter: config.identity.grace_jitter,
        metrics: metrics.clone(),
        ca_trust: config.ca.trust.clone(),
        trust_sync_timeout: config.identity.trust_sync_timeout,
    };
    tokio::spawn(rotation.run(stop_rx.clone()));

    if let Some(dir) = config.output_certs.clone() {
        let mut svid = store.watch_svid();
        tokio::spawn(async move {
            while svid.changed().await.is_ok() {
                let Some(current) = svid.borrow_and_update().clone() else {
                    continue;
                };
                if let Err(e) = output::write_certs(&dir, &current) {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot write --output-certs");
                }
            }
        });
    }

    if let Some(path) = config.federated_bundles.clone() {
        let store = store.clone();
        let mut poll = Poll::new(FEDERATION_POLL, Some(stop_rx.clone()));
        tokio::spawn(async move {
            let mut reported = Reported::default();
            loop {
                let file = path.clone();
                let read = read_off_thread(FEDERATION_READ_LIMIT, move || {
                    crate::secrets::federation::load(&file)
                })
                .await;
                match read {
                    Ok(Ok(bundles)) => {
                        store.set_federated(bundles);
                        reported.clear();
                    }
                    Ok(Err(e)) => {
                        if reported.is_new(&e) {
                            tracing::warn!(error = %e, "cannot read --federated-bundles; keeping the bundles already loaded");
                        }
                    }
                    Err(e) => {
                        if reported.is_new(&e) {
                            tracing::warn!(error = %e, "reading --federated-bundles failed; keeping the bundles already loaded");
                        }
                    }
                }
                if !poll.tick().await {
                    return;
                }
            }
        });
    }

    let http_server = tokio::spawn(serve_http(
        http,
        store.clone(),
        metrics,
        clock,
        stop_rx.clone(),
    ));
    let workload_api = workload_api.map(|listener| {
        let mut api_stop = stop_rx.clone();
        let jwt = crate::jwt::JwtSvids::new(ca.clone(), config.identity.spiffe_id.to_string());
        tokio::spawn(jwt.clone().keep_bundle(stop_rx.clone()));
        let service = crate::workload::WorkloadApi::new(store.clone(), jwt, stop_rx.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .max_concurrent_streams(Some(SDS_MAX_STREAMS))
                .add_service(service.into_service())
                // gRPC C-core clients (grpcio, and py-spiffe with it) send the
                // socket path as `:authority`, which h2 refuses: the same adapter
                // as the SDS socket's.
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener).map(|conn| conn.map(Normalized::new)),
                    async move {
                        let _ = api_stop.wait_for(|s| *s).await;
                    },
                ),
        )
    });
    let mut sds_stop = stop_rx.clone();
    let sds = tonic::transport::Server::builder()
        // tonic leaves a connection's streams unlimited (hyper's own default is
        // 200): each open stream holds its request's headers, so a local client
        // could queue them without end.
        .max_concurrent_streams(Some(SDS_MAX_STREAMS))
        .add_service(Sds::new(store, stop_rx.clone()).into_service())
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(socket).map(|conn| conn.map(Normalized::new)),
            async move {
                let _ = sds_stop.wait_for(|s| *s).await;
            },
        );
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    tracing::info!(
        id = %config.identity.spiffe_id,
        socket = %config.socket.display(),
        ca = %config.ca.addr,
        workload_api = ?config.workload_api_socket.as_ref().map(|p| p.display().to_string()),
        compliance_policy = %config.ca.compliance_policy,
        "signet-agent running"
    );
    sds.await?;
    if let Some(api) = workload_api {
        match api.await {
            Ok(result) => result?,
            Err(e) => tracing::warn!(error = %e, "Workload API task failed"),
        }
    }
    match http_server.await {
        Ok(result) => result?,
        Err(e) => tracing::warn!(error = %e, "HTTP task failed"),
    }
    Ok(())
}

/// What `/trust` answers: the trust bundle served as `ROOTCA` and what the CA said
/// of its trust change with it (`signet-agent inspect` shows it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrustView {
    /// SHA-256 of each root served, lowercase hex, sorted.
    pub roots: Vec<String>,
    /// The stage of the CA's trust change the bundle belongs to; `None` when the CA
    /// did not say (istiod).
    pub stage: Option<String>,
    /// Whether the CA has been told that these roots are served.
    pub reported: bool,
    /// The certificate that came with the bundle (serial, hex).
    pub serial: String,
}

impl TrustView {
    fn of(svid: &crate::identity::svid::Svid) -> Self {
        Self {
            roots: svid.root_digests.iter().map(hex::encode).collect(),
            stage: svid.trust.stage.clone(),
            reported: svid.trust.reported,
            serial: svid.serial.clone(),
        }
    }
}

/// Streams one SDS connection may have open at once: Envoy opens one per secret it
/// subscribes to (a sidecar a handful; the agent bench models 100).
const SDS_MAX_STREAMS: u32 = 128;

async fn serve_http(
    listener: TcpListener,
    store: Arc<SecretStore>,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), std::io::Error> {
    let ready_store = store.clone();
    let trust_store = store.clone();
    let app = Router::new()
        .route(
            "/healthz/ready",
            get(move || {
                let ready = ready_store.svid().is_some();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "no certificate yet\n")
                    }
                }
            }),
        )
        .route(
            "/trust",
            get(move || {
                let view = trust_store.svid().map(|s| TrustView::of(&s));
                async move {
                    match view {
                        Some(view) => (
                            StatusCode::OK,
                            [(axum::http::header::CONTENT_TYPE, "application/json")],
                            serde_json::to_string(&view).unwrap_or_default(),
                        ),
                        None => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            "no certificate yet\n".to_owned(),
                        ),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                if let Some(svid) = store.svid() {
                    let left = (svid.not_after - clock.now()).as_seconds_f64();
                    metrics
                        .cert_expiry_seconds
                        .with_label_values(&["default"])
                        .set(left);
                }
                let body = metrics.render();
                async move { body }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}
