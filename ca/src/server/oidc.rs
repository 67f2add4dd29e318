//! OIDC discovery over HTTPS on a listener of its own (`--oidc-addr`): the discovery
//! document at `<issuer>/.well-known/openid-configuration` and the JWKS it names at
//! `<issuer>/keys`, the same key set the JWT-SVID service signs with and agents serve
//! as the Workload API's JWT bundle. Relying parties (MinIO, AWS IAM, Vault) are given
//! the issuer URL and find the keys from there.
//!
//! The listener is public and anonymous, so its work is bounded: at most
//! [`MAX_CONNECTIONS`] at once and [`MAX_PER_PEER`] from one address, handshakes
//! concurrent under a deadline, every connection closed [`CONNECTION_LIFETIME`]
//! after it was accepted, GET and HEAD only.

use std::{
    collections::HashMap,
    future::Future as _,
    io,
    net::IpAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
};
use tokio_rustls::server::TlsStream;

use super::{HANDSHAKE_TIMEOUT, accept::handshake_done};
use crate::{keys::jwt::JwtKeys, keys::tls::TlsState, metrics::Metrics};

/// The listener's name in the TLS metrics.
const LISTENER: &str = "oidc";
/// Connections served at once; more wait in the kernel's backlog.
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// Connections one address may hold; more are closed at once.
pub(crate) const MAX_PER_PEER: usize = 16;
/// Time from accept to close, whatever the client does.
pub(crate) const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// How often --oidc-tls-cert and --oidc-tls-key are checked for changes.
const CERT_POLL: Duration = Duration::from_secs(10);

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("OIDC serving certificate {path}: {problem}")]
    Cert { path: String, problem: String },
    #[error("OIDC listener TLS: {0}")]
    Tls(String),
}

/// What the routes read.
#[derive(Clone)]
struct Documents {
    /// The discovery document, made once.
    configuration: Arc<[u8]>,
    keys: watch::Receiver<Option<Arc<JwtKeys>>>,
    /// `Cache-Control`: well inside the time a key is published before it signs.
    cache_control: HeaderValue,
}

/// The listener's settings.
#[derive(Debug, Clone)]
pub(crate) struct Discovery {
    /// `iss`, and where the documents are.
    pub(crate) issuer: String,
    /// Certificate and key files; `None`: the CA's serving certificate.
    pub(crate) tls_files: Option<(PathBuf, PathBuf)>,
    /// What TLS it accepts.
    pub(crate) policy: signet_tls::CompliancePolicy,
    /// How long relying parties may cache the documents.
    pub(crate) max_age: Duration,
}

/// Serves discovery on `listener` until `stop`.
pub(crate) fn spawn(
    listener: TcpListener,
    discovery: Discovery,
    serving: &Arc<TlsState>,
    keys: watch::Receiver<Option<Arc<JwtKeys>>>,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, OidcError> {
    let Discovery {
        issuer,
        tls_files,
        policy,
        max_age,
    } = discovery;
    let cache_control = HeaderValue::try_from(format!("public, max-age={}", max_age.as_secs()))
        .map_err(|e| OidcError::Tls(e.to_string()))?;
    let resolver: Arc<dyn ResolvesServerCert> = match tls_files {
        Some((cert, key)) => {
            let files = Arc::new(FileCert::load(cert, key)?);
            tokio::spawn(files.clone().watch(stop.clone()));
            files
        }
        None => serving.cert_resolver(),
    };
    let configs = signet_tls::ServerConfigs::new(policy, |provider, versions| {
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    })
    .map_err(|e| OidcError::Tls(e.to_string()))?;
    let path_prefix = issuer_path(&issuer);
    let app = Router::new().fallback(route).with_state((
        Documents {
            configuration: serde_json::json!({
                "issuer": issuer,
                "jwks_uri": format!("{issuer}/keys"),
                "authorization_endpoint": "",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256", "RS256"],
                "claims_supported": ["sub", "aud", "exp", "iat", "iss"],
            })
            .to_string()
            .into_bytes()
            .into(),
            keys,
            cache_control,
        },
        path_prefix,
    ));
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept(
        listener,
        Arc::new(configs),
        metrics,
        tx,
        stop.clone(),
    ));
    let mut stop = stop;
    Ok(tokio::spawn(async move {
        let served = axum::serve(Incoming(rx), app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "OIDC listener stopped");
        }
    }))
}

/// The path part of an issuer URL (`https://h/mesh` -> `/mesh`, `https://h` -> ``).
fn issuer_path(issuer: &str) -> String {
    let rest = issuer.strip_prefix("https://").unwrap_or(issuer);
    rest.find('/')
        .map_or_else(String::new, |i| rest[i..].to_owned())
}

async fn route(
    State((docs, prefix)): State<(Documents, String)>,
    method: Method,
    uri: Uri,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
        )
            .into_response();
    }
    let Some(path) = uri.path().strip_prefix(prefix.as_str()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match path {
        "/.well-known/openid-configuration" => {
            json(&docs.cache_control, docs.configuration.to_vec())
        }
        "/keys" => match docs.keys.borrow().clone() {
            Some(keys) => json(&docs.cache_control, keys.jwks().to_vec()),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the JWT key set is not loaded yet\n",
            )
                .into_response(),
        },
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

fn json(cache_control: &HeaderValue, body: Vec<u8>) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, cache_control.clone()),
        ],
        body,
    )
        .into_response()
}

/// Accepts connections while a slot is free, handshakes concurrently, and hands
/// finished TLS connections to the HTTP server.
async fn accept(
    listener: TcpListener,
    tls: Arc<signet_tls::ServerConfigs>,
    metrics: Metrics,
    out: mpsc::Sender<Bounded>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let peers = Arc::new(std::sync::Mutex::new(HashMap::<IpAddr, usize>::new()));
    loop {
        let permit = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "OIDC listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(peer_slot) = PeerSlot::take(&peers, peer.ip()) else {
            metrics
                .limit_rejections
                .with_label_values(&["oidc_connections_per_peer"])
                .inc();
            continue;
        };
        let (tls, metrics, out) = (tls.clone(), metrics.clone(), out.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + CONNECTION_LIFETIME;
            let done = tokio::time::timeout(HANDSHAKE_TIMEOUT, signet_tls::accept(&tls, tcp)).await;
            if let Some(stream) = handshake_done(done, peer, &metrics, LISTENER) {
                let _ = out
                    .send(Bounded {
                        stream,
                        peer,
                        cut: Box::pin(tokio::time::sleep_until(deadline)),
                        _permit: permit,
                        _peer_slot: peer_slot,
                    })
                    .await;
            }
        });
    }
}

/// One of a peer address's connections, given back on drop.
struct PeerSlot {
    peers: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PeerSlot {
    fn take(peers: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut held = crate::sync::lock(peers);
        let count = held.entry(ip).or_insert(0);
        if *count >= MAX_PER_PEER {
            return None;
        }
        *count += 1;
        Some(Self {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = crate::sync::lock(&self.peers);
        if let Some(count) = held.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// A TLS connection holding a slot, whose reads, writes, flushes and shutdown fail
/// once its lifetime is over (which makes the HTTP server drop it).
struct Bounded {
    stream: TlsStream<TcpStream>,
    peer: std::net::SocketAddr,
    cut: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
    _peer_slot: PeerSlot,
}

impl Bounded {
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.cut
            .as_mut()
            .poll(cx)
            .is_ready()
            .then(|| io::Error::new(io::ErrorKind::TimedOut, "OIDC connection past its lifetime"))
    }
}

impl AsyncRead for Bounded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The handshaken connections, as axum's listener.
struct Incoming(mpsc::Receiver<Bounded>);

impl axum::serve::Listener for Incoming {
    type Io = Bounded;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.0.recv().await {
            Some(conn) => {
                let peer = conn.peer;
                (conn, peer)
            }
            // The accept loop ended (stop): wait for the graceful shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Err(io::Error::other(
            "the OIDC listener's address is not tracked here",
        ))
    }
}

/// The serving certificate from files, read again when they change: the parsed
/// pair and a digest of the files (never their bytes: one holds the key).
struct FileCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, [u8; 32])>,
}

impl std::fmt::Debug for FileCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of the two files' contents.
fn digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

impl FileCert {
    fn load(cert_path: PathBuf, key_path: PathBuf) -> Result<Self, OidcError> {
        let (key, seen) = read_pair(&cert_path, &key_path)?;
        Ok(Self {
            cert_path,
            key_path,
            current: RwLock::new((key, seen)),
        })
    }

    async fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(CERT_POLL) => {}
            }
            let unchanged = match (
                std::fs::read(&self.cert_path),
                std::fs::read(&self.key_path),
            ) {
                (Ok(c), Ok(k)) => {
                    let k = zeroize::Zeroizing::new(k);
                    crate::sync::read(&self.current).1 == digest(&c, &k)
                }
                _ => false,
            };
            if unchanged {
                continue;
            }
            match read_pair(&self.cert_path, &self.key_path) {
                Ok(next) => {
                    *crate::sync::write(&self.current) = next;
                    tracing::info!(cert = %self.cert_path.display(), "OIDC serving certificate reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "OIDC serving certificate not reloaded; the previous one stays")
                }
            }
        }
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(crate::sync::read(&self.current).0.clone())
    }
}

/// The chain and key, checked to belong together; and the files' digest.
fn read_pair(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<(Arc<CertifiedKey>, [u8; 32]), OidcError> {
    let bad = |path: &std::path::Path, problem: String| OidcError::Cert {
        path: path.display().to_string(),
        problem,
    };
    let cert_pem = std::fs::read(cert_path).map_err(|e| bad(cert_path, e.to_string()))?;
    let key_pem =
        zeroize::Zeroizing::new(std::fs::read(key_path).map_err(|e| bad(key_path, e.to_string()))?);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert_path, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(bad(cert_path, "holds no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| bad(key_path, format!("no private key: {e}")))?;
    let signing = crate::keys::tls::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(key_path, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| bad(key_path, format!("does not match the certificate: {e}")))?;
    Ok((Arc::new(certified), digest(&cert_pem, &key_pem)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_paths() {
        assert_eq!(issuer_path("https://h"), "");
        assert_eq!(issuer_path("https://h:8443/mesh/a"), "/mesh/a");
    }
}
