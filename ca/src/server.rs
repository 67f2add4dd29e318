//! Wires everything together: key material, authenticators, the TLS gRPC server,
//! the HTTP side (metrics and health), key-material reload and certificate renewal.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration as StdDuration,
};

use axum::{Router, http::StatusCode, routing::get};
use signet_proto::IstioCertificateServiceServer;
use time::OffsetDateTime;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    cli::config::ServeConfig,
    conns::{ActivityLayer, ConnInfo, Deadlines, Pool, Refused},
    issue::authn::{Authenticator, ClusterAuth},
    issue::policy::{NodeImpersonation, Policy},
    issue::queue::SigningQueue,
    issue::service::{CaService, MAX_REQUEST_BYTES},
    keys::cacerts::CaCertsError,
    keys::reload,
    keys::signer::{SignError, Signer},
    keys::tls::{TlsError, TlsState},
    kubernetes::client::ApiAccess,
    kubernetes::pods::PodCache,
    metrics::Metrics,
};

/// How long a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: StdDuration = StdDuration::from_secs(10);
/// How long requests in flight get to finish when the server stops.
const SHUTDOWN_GRACE: StdDuration = StdDuration::from_secs(5);
/// How long a connection past its maximum age gets to finish requests in flight
/// before it is cut (tonic's own grace option skips the graceful close altogether).
const CONNECTION_AGE_GRACE: StdDuration = StdDuration::from_secs(30);

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    CaCerts(#[from] CaCertsError),
    #[error(transparent)]
    Signer(#[from] SignError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    KeyMaterial(#[from] reload::ReloadError),
    #[error("token authentication for cluster {cluster}: {source}")]
    Authn {
        cluster: String,
        #[source]
        source: crate::issue::authn::BuildError,
    },
    #[error("node impersonation: the pod watch of cluster {cluster}: {source}")]
    PodWatch {
        cluster: String,
        #[source]
        source: crate::issue::authn::KubeClientError,
    },
    #[error("Kubernetes API access for the writers: {0}")]
    Writers(#[source] crate::issue::authn::KubeClientError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// Builds the authenticator: the local cluster, its aliases, and remote clusters.
pub async fn authenticator(config: &ServeConfig) -> Result<Authenticator, ServeError> {
    // Addresses the operator named as crowds (gateways, ztunnel nodes) have no share
    // of their own of the review slots either.
    let crowds: Vec<ipnet::IpNet> = config.conns.shares.iter().map(|s| s.net).collect();
    let settings = &config.authn;
    let local = ClusterAuth::build(
        settings.reviews.as_ref(),
        settings.jwt.as_ref(),
        &settings.token_audiences,
        settings.max_token_reviews,
        &crowds,
    )
    .await
    .map_err(|source| ServeError::Authn {
        cluster: settings.cluster_id.clone(),
        source,
    })?;
    let mut authn = Authenticator::new(
        settings.cluster_id.clone(),
        local,
        config.policy.trust_domains.clone(),
    )
    .with_aliases(settings.cluster_aliases.clone());
    for (id, remote) in &settings.remotes {
        let access = remote.kubeconfig.clone().map(ApiAccess::Kubeconfig);
        let auth = ClusterAuth::build(
            access.as_ref(),
            remote.jwt.as_ref(),
            &settings.token_audiences,
            settings.max_token_reviews,
            &crowds,
        )
        .await
        .map_err(|source| ServeError::Authn {
            cluster: id.clone(),
            source,
        })?;
        authn = authn.with_cluster(id.clone(), auth);
    }
    Ok(authn)
}

/// With `--trusted-node-accounts`: a pod cache per cluster (the local one under its
/// id and aliases; remote clusters with a kubeconfig), each filled by a watch task.
async fn node_impersonation(
    config: &ServeConfig,
    stop: &watch::Receiver<bool>,
) -> Result<Option<NodeImpersonation>, ServeError> {
    let trusted = &config.policy.trusted_node_accounts;
    if trusted.is_empty() {
        return Ok(None);
    }
    let mut imp = NodeImpersonation {
        trusted: trusted.clone(),
        pods: Default::default(),
    };
    let watch = |id: &str, access: ApiAccess, cache: PodCache| {
        let id = id.to_owned();
        let mut stop = stop.clone();
        async move {
            let client = crate::kubernetes::client::client(
                &access,
                crate::kubernetes::client::Retries::Kube,
            )
            .await
            .map_err(|source| ServeError::PodWatch {
                cluster: id.clone(),
                source,
            })?;
            tokio::spawn(async move {
                tokio::select! {
                    _ = cache.watch(client, id) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
            Ok::<_, ServeError>(())
        }
    };
    let local = PodCache::default();
    let authn = &config.authn;
    if let Some(access) = &config.api_access {
        watch(&authn.cluster_id, access.clone(), local.clone()).await?;
    }
    for id in std::iter::once(&authn.cluster_id).chain(&authn.cluster_aliases) {
        imp.pods.insert(id.clone(), local.clone());
    }
    for (id, remote) in &authn.remotes {
        if let Some(kubeconfig) = &remote.kubeconfig {
            let cache = PodCache::default();
            watch(id, ApiAccess::Kubeconfig(kubeconfig.clone()), cache.clone()).await?;
            imp.pods.insert(id.clone(), cache);
        }
    }
    tracing::info!(trusted = ?trusted.iter().map(ToString::to_string).collect::<Vec<_>>(), "node impersonation enabled");
    Ok(Some(imp))
}

/// Runs the CA until `shutdown` completes. The listeners are bound by the caller, so
/// tests can use port 0.
pub async fn run(
    config: ServeConfig,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let metrics = Metrics::new()?;
    let now = OffsetDateTime::now_utc();
    let signer = reload::initial(
        &config.keys.cacerts_dir,
        &config.keys.state_dir,
        config.policy.trust_domains.primary().as_str(),
        now,
    )?;
    tracing::info!(
        source = %signer.source(),
        key = %signer.key_kind(),
        signing_cert_expires = %signer.signing_not_after(),
        "CA key material loaded"
    );
    metrics.set_expiries(signer.root_not_after(), signer.signing_not_after());
    let authn = Arc::new(authenticator(&config).await?);
    let tls = TlsState::new(&signer, config.serving_dns_names.clone(), now)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls.server_config()?));
    let (signer_tx, signer_rx) = watch::channel(Arc::new(signer));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);

    let impersonation = node_impersonation(&config, &stop_rx).await?;
    let mut policy = Policy::new(
        config.policy.trust_domains.clone(),
        config.policy.default_ttl,
        config.policy.max_ttl,
    );
    if let Some(imp) = &impersonation {
        policy = policy.with_impersonation(imp.clone());
    }
    let pod_certificates = config.pods.clone();
    if let Some(pods) = &pod_certificates {
        policy = policy.with_pods(pods.rules.clone());
    }
    let policy = Arc::new(policy);
    // One queue for both entry points: CreateCertificate calls and pod certificates.
    let queue = SigningQueue::new(config.queue)?;
    let service = CaService::new(
        signer_rx.clone(),
        tls.clone(),
        authn,
        queue.clone(),
        metrics.clone(),
        policy.clone(),
    );
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<IstioCertificateServiceServer<CaService>>()
        .await;

    let (conn_tx, conn_rx) = mpsc::channel::<Result<Conn, std::io::Error>>(256);
    let max_age = config.conns.max_age;
    let pool = Pool::new(config.conns.clone());
    tokio::spawn(accept_tls(
        grpc,
        acceptor,
        max_age + CONNECTION_AGE_GRACE,
        pool.clone(),
        metrics.clone(),
        conn_tx,
        stop_rx.clone(),
    ));
    tokio::spawn(reload::watch(
        config.keys.settings(),
        signer_tx,
        tls.clone(),
        metrics.clone(),
        stop_rx.clone(),
    ));
    let writers = match config.writers.clone() {
        Some(writers) => {
            let client = crate::kubernetes::client::client(
                &writers.access,
                crate::kubernetes::client::Retries::Kube,
            )
            .await
            .map_err(ServeError::Writers)?;
            // The pod certificate signer runs on the elected replica beside the writers.
            let mut tasks: Vec<crate::kubernetes::writers::LeaderTask> = Vec::new();
            if let Some(pods) = pod_certificates {
                let (client, signer, metrics) =
                    (client.clone(), signer_rx.clone(), metrics.clone());
                tasks.push(Box::new(move || {
                    Box::pin(crate::issue::podcert::run(
                        client.clone(),
                        pods.clone(),
                        policy.clone(),
                        queue.clone(),
                        signer.clone(),
                        metrics.clone(),
                    ))
                }));
            }
            Some(tokio::spawn(crate::kubernetes::writers::run(
                writers,
                client,
                signer_rx.clone(),
                metrics.clone(),
                tasks,
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    tokio::spawn(renew_serving_cert(
        signer_rx,
        tls,
        metrics.clone(),
        stop_rx.clone(),
    ));

    // Aliases of the local cluster share its cache; each cache is reported once.
    let pod_caches: Vec<(String, PodCache)> = impersonation
        .as_ref()
        .map(|imp| {
            imp.pods
                .iter()
                .filter(|(c, _)| !config.authn.cluster_aliases.contains(c))
                .map(|(c, p)| (c.clone(), p.clone()))
                .collect()
        })
        .unwrap_or_default();
    let http_server = tokio::spawn(serve_http(
        http,
        metrics,
        ready_rx,
        PodReadiness {
            caches: pod_caches,
            local: config.authn.cluster_id.clone(),
            started: std::time::Instant::now(),
        },
        stop_rx.clone(),
    ));

    let mut grpc_stop = stop_rx.clone();
    let grpc_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(StdDuration::from_secs(30)))
        .max_concurrent_streams(config.conns.max_streams)
        .max_connection_age(max_age)
        .layer(tower::util::MapResponseLayer::new(
            oversize_is_resource_exhausted,
        ))
        .layer(ActivityLayer)
        .add_service(health_service)
        .add_service(
            IstioCertificateServiceServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
            let _ = grpc_stop.wait_for(|stop| *stop).await;
            // Requests in flight get a grace period; streams that never end (a health
            // Watch) would otherwise hold the shutdown forever.
            tokio::spawn(async move {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
                pool.cut_all();
            });
        });
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let _ = ready_tx.send(true);
    tracing::info!(grpc = %config.grpc_addr, http = %config.http_addr, "signet-ca serving");
    grpc_server.await?;
    if let Some(writers) = writers {
        // Gives the writer Lease up, so another replica takes over at once.
        let _ = tokio::time::timeout(StdDuration::from_secs(5), writers).await;
    }
    match http_server.await {
        Ok(result) => result?,
        Err(e) => tracing::warn!(error = %e, "HTTP server task failed"),
    }
    Ok(())
}

/// tonic reports a message over the size limit as OUT_OF_RANGE; gRPC's status code
/// table (and grpc-go, which Istio's clients use) says RESOURCE_EXHAUSTED. Our
/// handlers never return OUT_OF_RANGE, so every such status comes from that limit.
fn oversize_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let out_of_range = (tonic::Code::OutOfRange as i32).to_string();
    if response
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == out_of_range.as_bytes())
    {
        let exhausted = (tonic::Code::ResourceExhausted as i32).to_string();
        if let Ok(value) = http::HeaderValue::from_str(&exhausted) {
            response.headers_mut().insert("grpc-status", value);
        }
    }
    response
}

/// Accepts TCP connections and completes TLS handshakes concurrently, so one slow
/// client cannot hold up the others. Each connection holds a slot of `pool` from
/// accept to close (see [`crate::conns`]); a connection still open `cut_after` its
/// handshake is cut.
async fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    cut_after: StdDuration,
    pool: Arc<Pool>,
    metrics: Metrics,
    conns: mpsc::Sender<Result<Conn, std::io::Error>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(StdDuration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match pool.admit(peer) {
            Ok(slot) => slot,
            Err(refused) => {
                let limit = match refused {
                    Refused::PeerShare(_) => "connections_per_peer",
                    Refused::Full(_) => "connections",
                };
                metrics.limit_rejections.with_label_values(&[limit]).inc();
                tracing::debug!(%peer, reason = %refused, "closing a new connection");
                continue;
            }
        };
        if slot.evicted {
            metrics
                .connections_closed
                .with_label_values(&[crate::conns::Cut::Evicted.label()])
                .inc();
        }
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let conns = conns.clone();
        let closed = metrics.connections_closed.clone();
        tokio::spawn(async move {
            let evicted = Deadlines::evicted(&slot);
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            tokio::select! {
                _ = evicted => tracing::debug!(%peer, "evicted during its TLS handshake"),
                done = handshake => match done {
                    Ok(Ok(tls)) => {
                        let _ = conns
                            .send(Ok(Conn {
                                tls,
                                deadlines: Deadlines::start(slot, cut_after),
                                closed,
                                counted: false,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }
}

/// A TLS connection and its deadlines (with the pool slot it holds until dropped).
/// tonic closes a connection gracefully at its maximum age; one evicted, silent, idle
/// or past the grace period after its maximum age gets its reads and writes failed
/// here, which closes it.
#[derive(Debug)]
struct Conn {
    tls: TlsStream<TcpStream>,
    deadlines: Deadlines,
    closed: prometheus::IntCounterVec,
    counted: bool,
}

impl Conn {
    fn cut(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let cut = self.deadlines.poll_cut(cx)?;
        if !self.counted {
            self.counted = true;
            // An evicted connection was counted when it was chosen.
            if cut != crate::conns::Cut::Evicted {
                self.closed.with_label_values(&[cut.label()]).inc();
            }
            if let Ok(peer) = self.tls.get_ref().0.peer_addr() {
                tracing::debug!(%peer, reason = cut.label(), "connection closed by the CA");
            }
        }
        Some(Deadlines::error(cut))
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            tls: self.tls.connect_info(),
            conn: self.deadlines.conn().clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// Renews the CA's own serving certificate at half its life, and keeps the expiry
/// gauges current.
async fn renew_serving_cert(
    signer: watch::Receiver<Arc<Signer>>,
    tls: Arc<TlsState>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(StdDuration::from_secs(30)) => {}
        }
        let current = signer.borrow().clone();
        metrics.set_expiries(current.root_not_after(), current.signing_not_after());
        let now = OffsetDateTime::now_utc();
        if now >= tls.renew_at() {
            match tls.refresh(&current, now) {
                Ok(()) => tracing::info!("serving certificate renewed"),
                Err(e) => tracing::error!(error = %e, "cannot renew the serving certificate"),
            }
        }
    }
}

/// How long a replica stays unready waiting for its local pod cache: long enough
/// for a first list, short enough that an API server outage at start does not keep
/// it from signing workload certificates.
const POD_SYNC_GRACE: StdDuration = StdDuration::from_secs(60);

/// What `/readyz` says of the pod caches behind node impersonation.
#[derive(Debug, Clone)]
struct PodReadiness {
    caches: Vec<(String, PodCache)>,
    local: String,
    started: std::time::Instant,
}

impl PodReadiness {
    /// Not ready while the local cluster's cache has not synced (for at most
    /// [`POD_SYNC_GRACE`]); ready otherwise, naming any cluster whose impersonation
    /// requests are still answered UNAVAILABLE.
    fn readiness(&self) -> (StatusCode, String) {
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

async fn serve_http(
    listener: TcpListener,
    metrics: Metrics,
    ready: watch::Receiver<bool>,
    pods: PodReadiness,
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
