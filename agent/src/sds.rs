//! Envoy's Secret Discovery Service on a Unix socket: `StreamSecrets` (state of the
//! world), `DeltaSecrets` and `FetchSecrets`.
//!
//! Rules Envoy depends on (contract §5): every response holds exactly one secret,
//! named as requested; an ACK is answered with nothing; a NACK is logged and never
//! answered with the same version again; a request echoing an older nonce is stale
//! and ignored; empty `resource_names` unsubscribes; a changed name set is answered
//! for the new names; a secret that changes is pushed to every stream holding it.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use envoy_types::pb::{
    envoy::service::{
        discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            Resource,
        },
        secret::v3::secret_discovery_service_server::SecretDiscoveryService,
    },
    google::protobuf::Any,
};
use prost::Message;
use tokio::{
    net::UnixListener,
    sync::{mpsc, watch},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    filesecret::{FileLease, FileSecretError},
    store::{Resolved, SecretName, SecretStore},
};

/// The only resource type served.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("SDS socket {path}: {problem}")]
    Path { path: String, problem: String },
}

/// Prepares the socket path and listens: creates the directory, refuses a path that
/// is a directory or held by a live server, replaces a stale socket file, and sets
/// mode 0660.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |problem: String| SocketError::Path {
        path: path.display().to_string(),
        problem,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create its directory: {e}")))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => return Err(err("is a directory".into())),
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err("another server is listening there (is pilot-agent or another signet-agent running?)".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
        }
        Ok(_) => return Err(err("exists and is not a socket".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| err(format!("cannot listen: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(format!("cannot set mode 0660: {e}")))?;
    Ok(listener)
}

/// The SDS service.
#[derive(Debug, Clone)]
pub struct Sds {
    store: Arc<SecretStore>,
    nonces: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
}

impl Sds {
    /// Serves the secrets of `store`; open streams end when `stop` turns true, so a
    /// graceful shutdown does not wait for Envoy to hang up.
    pub fn new(store: Arc<SecretStore>, stop: watch::Receiver<bool>) -> Self {
        Self {
            store,
            nonces: Arc::new(AtomicU64::new(0)),
            stop,
        }
    }

    /// The tonic service.
    pub fn into_service(self) -> SdsServer {
        SdsServer(Arc::new(self))
    }

    fn nonce(&self) -> String {
        format!("{:x}", self.nonces.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Parses requested names and takes a lease on each file-backed one (which
    /// checks and reads its files); the error is the stream's end status.
    async fn subscribe(&self, names: &[String]) -> Result<Vec<Subscribed>, Status> {
        let mut out: Vec<Subscribed> = Vec::with_capacity(names.len());
        for raw in names {
            if out.iter().any(|s| s.raw == *raw) {
                continue;
            }
            let name = SecretName::parse(raw).map_err(Status::invalid_argument)?;
            let lease = self
                .store
                .lease_file(&name)
                .await
                .map_err(|e| file_status(&e))?;
            out.push(Subscribed {
                raw: raw.clone(),
                name,
                lease,
            });
        }
        Ok(out)
    }
}

/// A requested name, parsed, with the lease that keeps a file-backed one watched.
#[derive(Debug)]
struct Subscribed {
    raw: String,
    name: SecretName,
    lease: Option<FileLease>,
}

fn file_status(e: &FileSecretError) -> Status {
    let message = e.to_string();
    match e {
        FileSecretError::NotAllowed { .. } => Status::permission_denied(message),
        FileSecretError::BadPath { .. } | FileSecretError::Unreadable(_) => {
            Status::invalid_argument(message)
        }
        FileSecretError::TooMany => Status::resource_exhausted(message),
    }
}

/// A request answering an older response than the last one sent is stale. Before
/// this stream has sent anything, no nonce can be stale (a client may carry one over
/// from a previous stream).
fn is_stale(nonce: &str, last_sent: Option<&str>) -> bool {
    !nonce.is_empty() && last_sent.is_some_and(|last| last != nonce)
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn any(secret: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret) -> Any {
    Any {
        type_url: SECRET_TYPE.to_owned(),
        value: secret.encode_to_vec(),
    }
}

fn check_type(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "unsupported type_url {type_url:?}: this server serves only {SECRET_TYPE}"
        )))
    }
}

/// What a stream task hands to the response stream. Boxed so that the channel's
/// fixed blocks of 32 slots stay small: an open stream is mostly idle, and an agent
/// may hold a hundred of them.
type Outbound<T> = Result<Box<T>, Box<Status>>;

/// The response stream tonic reads: unboxes what the stream task sent.
#[derive(Debug)]
pub struct Unboxed<T>(ReceiverStream<Outbound<T>>);

impl<T> tokio_stream::Stream for Unboxed<T> {
    type Item = Result<T, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|item| item.map(|r| r.map(|b| *b).map_err(|s| *s)))
    }
}

/// What differs between the state-of-the-world and the delta protocol; [`drive`]
/// runs either.
trait Protocol: Send + Sized + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    fn sds(&self) -> &Sds;
    fn tx(&self) -> &mpsc::Sender<Outbound<Self::Response>>;
    /// Handles one request; an error ends the stream with that status.
    fn on_request(&mut self, req: Self::Request)
    -> impl Future<Output = Result<(), Status>> + Send;
    /// Sends what changed; false when the client is gone.
    fn push(&mut self) -> impl Future<Output = bool> + Send;
}

/// Runs one stream until the client leaves, the agent stops, or a request is bad.
async fn drive<P: Protocol>(mut stream: P, mut inbound: Streaming<P::Request>) {
    let mut changes = stream.sds().store.changes();
    let mut stop = stream.sds().stop.clone();
    let tx = stream.tx().clone();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => return,
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if let Err(status) = stream.on_request(req).await {
                        let _ = tx.send(Err(Box::new(status))).await;
                        return;
                    }
                }
                Ok(None) | Err(_) => return,
            },
            changed = changes.changed() => {
                if changed.is_err() || !stream.push().await {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

/// One state-of-the-world stream.
struct SotwStream {
    sds: Sds,
    tx: mpsc::Sender<Outbound<DiscoveryResponse>>,
    names: Vec<(String, SecretName)>,
    /// Keeps the file-backed names of `names` watched.
    leases: Vec<FileLease>,
    sent: HashMap<String, String>,
    last_nonce: Option<String>,
}

impl Protocol for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn sds(&self) -> &Sds {
        &self.sds
    }

    fn tx(&self) -> &mpsc::Sender<Outbound<DiscoveryResponse>> {
        &self.tx
    }

    async fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        check_type(&req.type_url)?;
        if is_stale(&req.response_nonce, self.last_nonce.as_deref()) {
            tracing::debug!(nonce = %req.response_nonce, "stale SDS request ignored");
            return Ok(());
        }
        if let Some(error) = &req.error_detail {
            // A NACK: Envoy keeps the version it had. Sending the same content
            // again would only be refused again, so nothing is resent.
            tracing::warn!(names = ?req.resource_names, version = %req.version_info, error = %error.message, "Envoy rejected a secret (NACK)");
        }
        let wanted = self.sds.subscribe(&req.resource_names).await?;
        if wanted.is_empty() {
            self.names.clear();
            self.sent.clear();
            self.leases.clear();
            return Ok(());
        }
        self.sent
            .retain(|name, _| wanted.iter().any(|w| w.raw == *name));
        // The new leases are taken before the old ones go, so a name kept across
        // the change is never released in between.
        let mut names = Vec::with_capacity(wanted.len());
        let mut leases = Vec::new();
        for Subscribed { raw, name, lease } in wanted {
            names.push((raw, name));
            leases.extend(lease);
        }
        self.names = names;
        self.leases = leases;
        self.push().await;
        Ok(())
    }

    /// Sends every subscribed secret whose version differs from what this stream
    /// last sent. False when the client is gone.
    async fn push(&mut self) -> bool {
        for (raw, name) in &self.names {
            let Some(Resolved { version, secret }) = self.sds.store.resolve(name, raw) else {
                continue;
            };
            if self.sent.get(raw) == Some(&version) {
                continue;
            }
            let nonce = self.sds.nonce();
            let response = DiscoveryResponse {
                version_info: version.clone(),
                resources: vec![any(&secret)],
                type_url: SECRET_TYPE.to_owned(),
                nonce: nonce.clone(),
                ..Default::default()
            };
            if self.tx.send(Ok(Box::new(response))).await.is_err() {
                return false;
            }
            self.last_nonce = Some(nonce);
            self.sent.insert(raw.clone(), version);
        }
        true
    }
}

/// One delta stream.
struct DeltaStream {
    sds: Sds,
    tx: mpsc::Sender<Outbound<DeltaDiscoveryResponse>>,
    names: BTreeMap<String, SecretName>,
    /// Keeps the file-backed names of `names` watched.
    leases: HashMap<String, FileLease>,
    known: HashMap<String, String>,
    last_nonce: Option<String>,
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn sds(&self) -> &Sds {
        &self.sds
    }

    fn tx(&self) -> &mpsc::Sender<Outbound<DeltaDiscoveryResponse>> {
        &self.tx
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        check_type(&req.type_url)?;
        if self.last_nonce.is_none() {
            // First request: what the client already holds from a previous stream.
            self.known.extend(req.initial_resource_versions.clone());
        }
        if is_stale(&req.response_nonce, self.last_nonce.as_deref()) {
            return Ok(());
        }
        if let Some(error) = &req.error_detail {
            tracing::warn!(error = %error.message, "Envoy rejected a secret (delta NACK)");
        }
        for Subscribed { raw, name, lease } in
            self.sds.subscribe(&req.resource_names_subscribe).await?
        {
            if let Some(lease) = lease {
                self.leases.insert(raw.clone(), lease);
            }
            self.names.insert(raw, name);
        }
        for raw in &req.resource_names_unsubscribe {
            self.names.remove(raw);
            self.known.remove(raw);
            self.leases.remove(raw);
        }
        self.push().await;
        Ok(())
    }

    async fn push(&mut self) -> bool {
        let mut resources = Vec::new();
        for (raw, name) in &self.names {
            let Some(Resolved { version, secret }) = self.sds.store.resolve(name, raw) else {
                continue;
            };
            if self.known.get(raw) == Some(&version) {
                continue;
            }
            self.known.insert(raw.clone(), version.clone());
            resources.push(Resource {
                name: raw.clone(),
                version,
                resource: Some(any(&secret)),
                ..Default::default()
            });
        }
        if resources.is_empty() {
            return true;
        }
        let nonce = self.sds.nonce();
        let response = DeltaDiscoveryResponse {
            resources,
            type_url: SECRET_TYPE.to_owned(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        self.last_nonce = Some(nonce);
        self.tx.send(Ok(Box::new(response))).await.is_ok()
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = Unboxed<DiscoveryResponse>;
    type DeltaSecretsStream = Unboxed<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        let stream = SotwStream {
            sds: self.clone(),
            tx,
            names: Vec::new(),
            leases: Vec::new(),
            sent: HashMap::new(),
            last_nonce: None,
        };
        tokio::spawn(drive(stream, request.into_inner()));
        Ok(Response::new(Unboxed(ReceiverStream::new(rx))))
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        let stream = DeltaStream {
            sds: self.clone(),
            tx,
            names: BTreeMap::new(),
            leases: HashMap::new(),
            known: HashMap::new(),
            last_nonce: None,
        };
        tokio::spawn(drive(stream, request.into_inner()));
        Ok(Response::new(Unboxed(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let req = request.into_inner();
        check_type(&req.type_url)?;
        // The leases in `names` keep file-backed names readable for this call only.
        let names = self.subscribe(&req.resource_names).await?;
        if names.is_empty() {
            return Err(Status::invalid_argument(
                "FetchSecrets needs at least one resource name",
            ));
        }
        let mut resources = Vec::with_capacity(names.len());
        let mut versions = Vec::with_capacity(names.len());
        for Subscribed { raw, name, .. } in &names {
            let resolved = self.store.resolve(name, raw).ok_or_else(|| {
                Status::unavailable(format!("secret {raw:?} is not available yet"))
            })?;
            versions.push(resolved.version);
            resources.push(any(&resolved.secret));
        }
        Ok(Response::new(DiscoveryResponse {
            version_info: versions.join("/"),
            resources,
            type_url: SECRET_TYPE.to_owned(),
            nonce: self.nonce(),
            ..Default::default()
        }))
    }
}

/// The gRPC service as registered on the server. It routes the three SDS methods
/// to [`Sds`] like the generated `SecretDiscoveryServiceServer`, but with a codec
/// whose buffers start at 1 KiB instead of 8 KiB: an SDS message is a few KiB at most
/// and every open stream holds one buffer each way, so this is most of what a stream
/// costs in memory.
#[derive(Debug, Clone)]
pub struct SdsServer(Arc<Sds>);

const SERVICE: &str = "envoy.service.secret.v3.SecretDiscoveryService";
/// Largest request accepted (a DiscoveryRequest names a few secrets).
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

impl tonic::server::NamedService for SdsServer {
    const NAME: &'static str = SERVICE;
}

/// prost's codec with small initial buffers.
#[derive(Debug)]
struct SmallCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SmallCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

fn buffers() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(1024, 32 * 1024)
}

impl<T, U> tonic::codec::Codec for SmallCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(buffers())
    }
}

struct StreamSvc(Arc<Sds>);
impl tonic::server::StreamingService<DiscoveryRequest> for StreamSvc {
    type Response = DiscoveryResponse;
    type ResponseStream = Unboxed<DiscoveryResponse>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;
    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let sds = self.0.clone();
        Box::pin(async move { sds.stream_secrets(request).await })
    }
}

struct DeltaSvc(Arc<Sds>);
impl tonic::server::StreamingService<DeltaDiscoveryRequest> for DeltaSvc {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = Unboxed<DeltaDiscoveryResponse>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;
    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let sds = self.0.clone();
        Box::pin(async move { sds.delta_secrets(request).await })
    }
}

struct FetchSvc(Arc<Sds>);
impl tonic::server::UnaryService<DiscoveryRequest> for FetchSvc {
    type Response = DiscoveryResponse;
    type Future = tonic::codegen::BoxFuture<Response<DiscoveryResponse>, Status>;
    fn call(&mut self, request: Request<DiscoveryRequest>) -> Self::Future {
        let sds = self.0.clone();
        Box::pin(async move { sds.fetch_secrets(request).await })
    }
}

impl<B> tower::Service<http::Request<B>> for SdsServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let sds = self.0.clone();
        let path = req.uri().path().to_owned();
        let method = path
            .strip_prefix(&format!("/{SERVICE}/"))
            .map(str::to_owned);
        Box::pin(async move {
            Ok(match method.as_deref() {
                Some("StreamSecrets") => {
                    let mut grpc = tonic::server::Grpc::new(SmallCodec::default())
                        .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                    grpc.streaming(StreamSvc(sds), req).await
                }
                Some("DeltaSecrets") => {
                    let mut grpc = tonic::server::Grpc::new(SmallCodec::default())
                        .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                    grpc.streaming(DeltaSvc(sds), req).await
                }
                Some("FetchSecrets") => {
                    let mut grpc = tonic::server::Grpc::new(SmallCodec::default())
                        .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                    grpc.unary(FetchSvc(sds), req).await
                }
                _ => Status::unimplemented(format!("{path} is not a method of {SERVICE}"))
                    .into_http(),
            })
        })
    }
}
