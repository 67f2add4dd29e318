//! Wires everything together: key material, authenticators, the TLS gRPC server
//! (the accept loop in `accept`), the HTTP side (`health`: metrics and health),
//! key-material reload and certificate renewal; with JWT-SVIDs, the key set's keeper
//! and OIDC discovery (`oidc`).

mod accept;
mod health;
mod oidc;

use std::{future::Future, sync::Arc, time::Duration as StdDuration};

use signet_proto::{
    IstioCertificateServiceServer, signet_v1::jwt_svid_service_server::JwtSvidServiceServer,
};
use time::OffsetDateTime;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tokio_stream::wrappers::ReceiverStream;

use accept::{Conn, accept_tls};
use health::{Readiness, serve_http};

use crate::{
    cli::config::ServeConfig,
    conns::{ActivityLayer, Pool},
    issue::authn::{Authenticator, ClusterAuth},
    issue::jwtsvid::JwtService,
    issue::policy::{NodeImpersonation, Policy},
    issue::queue::SigningQueue,
    issue::service::{CaService, MAX_REQUEST_BYTES},
    keys::cacerts::CaCertsError,
    keys::reload,
    keys::signer::{SignError, Signer},
    keys::tls::{TlsError, TlsState},
    kubernetes::client::ApiAccess,
    kubernetes::pods::PodCache,
    kubernetes::reachability::{self, Reachability},
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
    #[error(transparent)]
    Rotation(#[from] crate::rotation::driver::DriverError),
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
    #[error("driven rotation: reading the stage of cluster {cluster}: {source}")]
    RotationPeer {
        cluster: String,
        #[source]
        source: crate::issue::authn::KubeClientError,
    },
    #[error("Kubernetes API access for the writers: {0}")]
    Writers(#[source] crate::issue::authn::KubeClientError),
    #[error("Kubernetes API access: {0}")]
    ApiProbe(#[source] crate::issue::authn::KubeClientError),
    #[error(transparent)]
    JwtKeys(#[from] crate::keys::jwtstore::KeeperError),
    #[error("JWT key set: {0}")]
    JwtKeySet(#[from] crate::keys::jwt::JwtKeyError),
    #[error("Kubernetes API access for --jwt-keys-secret: {0}")]
    JwtSecret(#[source] crate::issue::authn::KubeClientError),
    #[error("--jwt-keys-secret needs API access (--kubeconfig, or running in a pod)")]
    JwtSecretAccess,
    #[error(transparent)]
    Oidc(#[from] oidc::OidcError),
    #[error("--oidc-addr is set but no OIDC listener was bound")]
    OidcListener,
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

/// The other clusters on the shared root, read through the kubeconfigs of
/// `--remote-cluster`; or why a rotation cannot be declared with them (`None` for
/// both without other clusters).
async fn peers(
    config: &ServeConfig,
) -> Result<
    (
        Option<Arc<dyn crate::rotation::shared::Peers>>,
        Option<&'static str>,
    ),
    ServeError,
> {
    let remotes = &config.authn.remotes;
    if remotes.is_empty() {
        return Ok((None, None));
    }
    let Some(writers) = &config.writers else {
        return Ok((
            None,
            Some(
                "with other clusters on the shared root (--remote-cluster), a driven rotation needs the writers (the stage lives in the API server, where the other clusters read it): rotate by the manual steps of docs/root-rotation.md",
            ),
        ));
    };
    let mut clusters = Vec::new();
    for (id, remote) in remotes {
        let Some(kubeconfig) = &remote.kubeconfig else {
            return Ok((
                None,
                Some(
                    "every other cluster on the shared root needs a kubeconfig (--remote-cluster ID=KUBECONFIG) for its rotation stage to be read: rotate by the manual steps of docs/root-rotation.md",
                ),
            ));
        };
        let client = crate::kubernetes::client::client(
            &ApiAccess::Kubeconfig(kubeconfig.clone()),
            crate::kubernetes::client::Retries::Kube,
        )
        .await
        .map_err(|source| ServeError::RotationPeer {
            cluster: id.clone(),
            source,
        })?;
        clusters.push((id.clone(), client));
    }
    Ok((
        Some(Arc::new(
            crate::kubernetes::writers::rotationcm::RemoteRotations::new(
                writers.lease.namespace.clone(),
                clusters,
            ),
        )),
        None,
    ))
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

/// The CA's listeners, bound by the caller so tests can use port 0.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC (TLS) listener.
    pub grpc: TcpListener,
    /// Metrics and health (plain HTTP).
    pub http: TcpListener,
    /// OIDC discovery (`--oidc-addr`).
    pub oidc: Option<TcpListener>,
}

/// Runs the CA until `shutdown` completes.
pub async fn run(
    config: ServeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let Listeners { grpc, http, oidc } = listeners;
    let metrics = Metrics::new()?;
    let now = OffsetDateTime::now_utc();
    // In cluster mode the replicas share the rotation's record through the API
    // server, and only the one holding the writers' Lease advances it.
    let (leading_tx, leading_rx) = watch::channel(false);
    let shared: Option<Arc<dyn crate::rotation::shared::Shared>> = match &config.writers {
        Some(writers) => {
            let client = crate::kubernetes::client::client(
                &writers.access,
                crate::kubernetes::client::Retries::Kube,
            )
            .await
            .map_err(ServeError::Writers)?;
            Some(Arc::new(
                crate::kubernetes::writers::rotationcm::RotationConfigMap::new(
                    client,
                    writers.clone(),
                ),
            ))
        }
        None => None,
    };
    let (peers, unavailable) = peers(&config).await?;
    let driver = crate::rotation::driver::Driver::start(
        crate::rotation::driver::Settings {
            keys: config.keys.clone(),
            rotation: config.rotation.clone(),
            trust_domains: config.policy.trust_domains.clone(),
            default_ttl: config.policy.default_ttl,
            unavailable,
            // Pod certificates last an hour at least: the window holds two then.
            min_window: if config.pods.is_some() {
                time::Duration::hours(2)
            } else {
                time::Duration::ZERO
            },
            leading: shared.as_ref().map(|_| leading_rx),
            shared,
            peers,
        },
        now,
    )
    .await?;
    let signer = driver.published();
    let rotation = driver.rotation();
    tracing::info!(
        source = %signer.source(),
        key = %signer.key_kind(),
        signing_cert_expires = %signet_telemetry::rfc3339(signer.signing_not_after()),
        "CA key material loaded"
    );
    metrics.set_expiries(signer.root_not_after(), signer.signing_not_after());
    let authn = Arc::new(authenticator(&config).await?);
    let tls = TlsState::new(&signer, config.serving_dns_names.clone(), now)?;
    let tls_configs = Arc::new(tls.server_configs(config.compliance_policy)?);
    let (signer_tx, signer_rx) = watch::channel(signer);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);

    let api = api_probe(&config, &metrics, &stop_rx).await?;
    let impersonation = node_impersonation(&config, &stop_rx).await?;
    let policy = policy(&config, impersonation.as_ref());
    // One queue for both entry points: CreateCertificate calls and pod certificates.
    let queue = SigningQueue::new(config.queue)?;
    let service = CaService::new(
        signer_rx.clone(),
        tls.clone(),
        authn.clone(),
        queue.clone(),
        metrics.clone(),
        policy.clone(),
        rotation.clone(),
    );
    let (jwt, oidc_task) = match &config.jwt {
        Some(settings) => {
            let (jwt, task) = jwt_service(
                &config, settings, &tls, authn, &queue, &metrics, oidc, &stop_rx,
            )
            .await?;
            (Some(jwt.with_pushback(service.pushback())), task)
        }
        None => (None, None),
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<IstioCertificateServiceServer<CaService>>()
        .await;

    let (conn_tx, conn_rx) = mpsc::channel::<Result<Conn, std::io::Error>>(256);
    let max_age = config.conns.max_age;
    let pool = Pool::new(config.conns.clone());
    tokio::spawn(accept_tls(
        grpc,
        tls_configs,
        max_age + CONNECTION_AGE_GRACE,
        pool.clone(),
        metrics.clone(),
        conn_tx,
        stop_rx.clone(),
    ));
    tokio::spawn(driver.run(signer_tx, tls.clone(), metrics.clone(), stop_rx.clone()));
    let writers = spawn_writers(
        &config,
        leading_tx,
        signer_rx.clone(),
        &metrics,
        RequestPath {
            policy,
            queue,
            rotation: rotation.clone(),
        },
        stop_rx.clone(),
    )
    .await?;
    tokio::spawn(renew_serving_cert(
        signer_rx,
        tls,
        metrics.clone(),
        stop_rx.clone(),
    ));

    let http_server = tokio::spawn(serve_http(
        http,
        metrics,
        ready_rx,
        readiness(&config, impersonation.as_ref(), api),
        rotation,
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
        .add_optional_service(jwt.map(|service| {
            JwtSvidServiceServer::new(service)
                .max_decoding_message_size(crate::issue::jwtsvid::MAX_REQUEST_BYTES)
        }))
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
    tracing::info!(
        grpc = %config.grpc_addr,
        http = %config.http_addr,
        compliance_policy = %config.compliance_policy,
        "signet-ca serving"
    );
    grpc_server.await?;
    if let Some(task) = oidc_task {
        // Discovery requests in flight finish (each connection lives 30 s at most).
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, task).await;
    }
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

/// The JWT-SVID service: its key set kept in the state directory or the Secret (a
/// first round before serving; with a Secret that cannot be read yet, minting
/// answers UNAVAILABLE until it can), and OIDC discovery when asked (its task).
#[allow(clippy::too_many_arguments)]
async fn jwt_service(
    config: &ServeConfig,
    settings: &crate::issue::jwtsvid::flags::JwtConfig,
    tls: &Arc<TlsState>,
    authn: Arc<Authenticator>,
    queue: &SigningQueue,
    metrics: &Metrics,
    oidc: Option<TcpListener>,
    stop: &watch::Receiver<bool>,
) -> Result<(JwtService, Option<tokio::task::JoinHandle<()>>), ServeError> {
    use crate::issue::jwtsvid::flags::KeyPlace;
    use crate::keys::jwtstore::{self, FileStore, Keeper, KeyStore};
    let store: Arc<dyn KeyStore> = match &settings.keys {
        KeyPlace::StateDir => Arc::new(FileStore::in_dir(&config.keys.state_dir)),
        KeyPlace::Secret { namespace, name } => {
            let access = config
                .api_access
                .as_ref()
                .ok_or(ServeError::JwtSecretAccess)?;
            let client =
                crate::kubernetes::client::client(access, crate::kubernetes::client::Retries::Kube)
                    .await
                    .map_err(ServeError::JwtSecret)?;
            Arc::new(crate::kubernetes::jwtsecret::SecretStore::new(
                client, namespace, name,
            ))
        }
    };
    let keeper = Keeper::new(store, settings.schedule);
    let (keys_tx, keys_rx) = watch::channel(None);
    let mut last = None;
    match keeper.round(OffsetDateTime::now_utc(), None).await {
        Ok(doc) => jwtstore::publish(&keys_tx, &mut last, doc)?,
        Err(e) if matches!(settings.keys, KeyPlace::Secret { .. }) => {
            tracing::warn!(error = %e, "JWT key set not available yet; JWT-SVID requests are answered UNAVAILABLE until it is");
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(
        alg = %settings.schedule.alg,
        rotation = %humantime::format_duration(settings.schedule.rotate_every),
        issuer = settings.issuer.as_deref().unwrap_or(""),
        "JWT-SVIDs enabled"
    );
    tokio::spawn(jwtstore::keep(keeper, keys_tx, last, stop.clone()));
    let mut oidc_task = None;
    if let (Some(oidc_config), Some(issuer)) = (&settings.oidc, &settings.issuer) {
        let listener = oidc.ok_or(ServeError::OidcListener)?;
        let discovery = oidc::Discovery {
            issuer: issuer.clone(),
            tls_files: oidc_config.tls_files.clone(),
            policy: config.compliance_policy,
            max_age: jwtstore::cache_hint(&settings.schedule),
        };
        oidc_task = Some(oidc::spawn(
            listener,
            discovery,
            tls,
            keys_rx.clone(),
            metrics.clone(),
            stop.clone(),
        )?);
        tracing::info!(addr = %oidc_config.addr, %issuer, "OIDC discovery serving");
    }
    let service = JwtService::new(
        keys_rx,
        tls.clone(),
        authn,
        queue.clone(),
        metrics.clone(),
        crate::issue::jwtsvid::JwtSettings {
            default_ttl: settings.default_ttl,
            max_ttl: settings.max_ttl,
            issuer: settings.issuer.clone(),
            trust_domain: config.policy.trust_domains.primary().clone(),
            // Well within the time a key is published before it signs.
            refresh_hint: jwtstore::cache_hint(&settings.schedule),
        },
    );
    Ok((service, oidc_task))
}

/// Policy as configured: node impersonation when there are pod caches, the pod
/// certificate rules when that signer is on.
fn policy(config: &ServeConfig, impersonation: Option<&NodeImpersonation>) -> Arc<Policy> {
    let mut policy = Policy::new(
        config.policy.trust_domains.clone(),
        config.policy.default_ttl,
        config.policy.max_ttl,
    );
    if let Some(imp) = impersonation {
        policy = policy.with_impersonation(imp.clone());
    }
    if let Some(pods) = &config.pods {
        policy = policy.with_pods(pods.rules.clone());
    }
    if let Some(subject_cn) = &config.policy.subject_cn {
        policy = policy.with_subject_cn(subject_cn.clone());
    }
    Arc::new(policy)
}

/// What every request is decided, queued and noted with, shared by both entry
/// points.
struct RequestPath {
    policy: Arc<Policy>,
    queue: SigningQueue,
    rotation: Arc<crate::rotation::Rotation>,
}

/// The elected replica's work, when anything is to be written: the writers, and the
/// pod certificate signer beside them (on the request path, handed in as a leader
/// task with the policy and queue every request uses).
async fn spawn_writers(
    config: &ServeConfig,
    leading: watch::Sender<bool>,
    signer: watch::Receiver<Arc<Signer>>,
    metrics: &Metrics,
    path: RequestPath,
    stop: watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>, ServeError> {
    let RequestPath {
        policy,
        queue,
        rotation,
    } = path;
    let Some(writers) = config.writers.clone() else {
        return Ok(None);
    };
    let client = crate::kubernetes::client::client(
        &writers.access,
        crate::kubernetes::client::Retries::Kube,
    )
    .await
    .map_err(ServeError::Writers)?;
    let mut tasks: Vec<crate::kubernetes::writers::LeaderTask> = Vec::new();
    if let Some(pods) = config.pods.clone() {
        let (client, signer, metrics) = (client.clone(), signer.clone(), metrics.clone());
        tasks.push(Box::new(move || {
            Box::pin(crate::issue::podcert::run(
                client.clone(),
                pods.clone(),
                policy.clone(),
                queue.clone(),
                signer.clone(),
                rotation.clone(),
                metrics.clone(),
            ))
        }));
    }
    Ok(Some(tokio::spawn(crate::kubernetes::writers::run(
        writers,
        client,
        leading,
        signer,
        metrics.clone(),
        tasks,
        stop,
    ))))
}

/// With API access, the probe of the local API server; start-up readiness depends on
/// it where TokenReview is the only way local tokens are checked.
async fn api_probe(
    config: &ServeConfig,
    metrics: &Metrics,
    stop: &watch::Receiver<bool>,
) -> Result<Option<Arc<Reachability>>, ServeError> {
    let Some(access) = &config.api_access else {
        return Ok(None);
    };
    let client =
        crate::kubernetes::client::client(access, crate::kubernetes::client::Retries::Never)
            .await
            .map_err(ServeError::ApiProbe)?;
    metrics.register_api_server_probe()?;
    let reach = Reachability::new(config.authn.reviews.is_some() && config.authn.jwt.is_none());
    tokio::spawn(reachability::probe(
        client,
        reach.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    Ok(Some(reach))
}

/// What `/readyz` watches: the API server where TokenReview needs it, and the pod
/// caches (aliases of the local cluster share its cache; each cache is reported
/// once).
fn readiness(
    config: &ServeConfig,
    impersonation: Option<&NodeImpersonation>,
    api: Option<Arc<Reachability>>,
) -> Readiness {
    let caches = impersonation
        .map(|imp| {
            imp.pods
                .iter()
                .filter(|(c, _)| !config.authn.cluster_aliases.contains(c))
                .map(|(c, p)| (c.clone(), p.clone()))
                .collect()
        })
        .unwrap_or_default();
    Readiness {
        api,
        caches,
        local: config.authn.cluster_id.clone(),
        started: std::time::Instant::now(),
    }
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
