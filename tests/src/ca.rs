//! signet-ca in the test process: `TestCa` on 127.0.0.1:0 (stopped on drop), its
//! flags parsed as the binary parses them, our own clients (tonic, and raw rustls
//! connections that record how each handshake went), and requests with CSRs.

use std::{net::SocketAddr, time::Duration};

use rcgen::{CertificateParams, KeyPair, SanType};
use signet_proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// The name the CA's serving certificate carries by default.
pub const SERVER_NAME: &str = "istiod.istio-system.svc";

/// Parses `signet-ca serve` arguments exactly as the binary does.
pub fn parse_serve(args: &[String]) -> signet_ca::cli::config::ServeConfig {
    use clap::Parser;
    use signet_ca::cli::config::{Cli, Command};
    let mut full = vec!["signet-ca".to_string(), "serve".to_string()];
    full.extend_from_slice(args);
    let Command::Serve(serve) = Cli::try_parse_from(full).unwrap().command else {
        unreachable!()
    };
    serve.validate(false).unwrap()
}

/// A signet-ca server running in this process.
pub struct TestCa {
    /// gRPC (TLS) address.
    pub grpc: SocketAddr,
    /// HTTP (metrics) address.
    pub http: SocketAddr,
    /// OIDC discovery (HTTPS) address, with --oidc-addr.
    pub oidc: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), signet_ca::server::ServeError>>>,
}

impl TestCa {
    /// Starts a CA with `args` (flags of `signet-ca serve`); listeners on port 0.
    pub async fn start(args: &[String]) -> Self {
        Self::start_at(args, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts a CA whose gRPC listener is at `grpc` (to restart one where it was),
    /// without waiting for it to be ready.
    pub async fn start_unready(args: &[String], grpc: SocketAddr) -> Self {
        crate::install_tls_provider();
        let grpc_listener = TcpListener::bind(grpc).await.unwrap();
        let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = grpc_listener.local_addr().unwrap();
        let http = http_listener.local_addr().unwrap();
        let mut all = args.to_vec();
        all.extend([
            "--grpc-addr".into(),
            grpc.to_string(),
            "--http-addr".into(),
            http.to_string(),
            "--reload-interval".into(),
            "200ms".into(),
        ]);
        let config = parse_serve(&all);
        // OIDC discovery on port 0 too, whatever --oidc-addr said.
        let oidc_listener = match config.jwt.as_ref().and_then(|j| j.oidc.as_ref()) {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            None => None,
        };
        let oidc = oidc_listener.as_ref().map(|l| l.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel();
        let listeners = signet_ca::server::Listeners {
            grpc: grpc_listener,
            http: http_listener,
            oidc: oidc_listener,
        };
        let handle = tokio::spawn(signet_ca::server::run(config, listeners, async move {
            let _ = stopped.await;
        }));
        Self {
            grpc,
            http,
            oidc,
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// Starts a CA and waits until `/readyz` says ready.
    pub async fn start_at(args: &[String], grpc: SocketAddr) -> Self {
        let ca = Self::start_unready(args, grpc).await;
        ca.wait_ready().await;
        ca
    }

    /// Waits (60 s at most: generous for a loaded machine, and free when fast)
    /// until `/readyz` says 200. With node impersonation that includes the first
    /// list of the pods.
    async fn wait_ready(&self) {
        crate::eventually(Duration::from_secs(60), "the CA to be ready", async || {
            let ready = self.http_get("/readyz").await;
            ready.is_ok_and(|(code, _)| code == 200).then_some(())
        })
        .await;
    }

    /// GET a path of the HTTP listener: (status, body).
    pub async fn http_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.http, path).await
    }

    /// The Prometheus exposition from `/metrics`.
    pub async fn metrics(&self) -> String {
        let (code, body) = self.http_get("/metrics").await.unwrap();
        assert_eq!(code, 200, "/metrics: {body}");
        body
    }

    /// One series' value from `/metrics` (see [`crate::metric`]).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        crate::metric(&self.metrics().await, series)
    }

    /// A gRPC client that verifies the CA against `root_pem`.
    pub async fn client(&self, root_pem: &str) -> IstioCertificateServiceClient<Channel> {
        client(self.grpc, root_pem, None).await
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// GET `path` from a plain HTTP listener at `addr`: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((code, body))
}

/// Our own Rust client: tonic over rustls, verifying `SERVER_NAME` against `root_pem`,
/// optionally presenting a client certificate (`cert_pem`, `key_pem`).
pub async fn client(
    addr: SocketAddr,
    root_pem: &str,
    identity: Option<(&str, &str)>,
) -> IstioCertificateServiceClient<Channel> {
    IstioCertificateServiceClient::new(tls_channel(addr, root_pem, identity).await)
}

/// A channel to the CA's gRPC listener at `addr` (see [`client`]).
pub async fn tls_channel(
    addr: SocketAddr,
    root_pem: &str,
    identity: Option<(&str, &str)>,
) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name(SERVER_NAME);
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Our own Rust client whose connections come from `source` (a loopback address other
/// than 127.0.0.1 plays another peer).
pub async fn client_from(
    addr: SocketAddr,
    root_pem: &str,
    source: &str,
) -> IstioCertificateServiceClient<Channel> {
    use rustls::pki_types::ServerName;
    let config = RawTls::new(addr, root_pem, None).config();
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = config.clone();
        async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(source)?;
            let tcp = socket.connect(addr).await?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://signet.test")
        .connect_with_connector(connector)
        .await
        .unwrap();
    IstioCertificateServiceClient::new(channel)
}

/// CreateCertificate clients over TLS connections we make ourselves with rustls: one
/// `ClientConfig`, and so one session-resumption store, for every connection, and a
/// record of how each handshake went (full or resumed).
pub struct RawTls {
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    /// How each connection so far was established.
    pub handshakes: std::sync::Arc<std::sync::Mutex<Vec<rustls::HandshakeKind>>>,
}

impl RawTls {
    /// Trusts `root_pem` and presents `identity` (certificate chain, key) if given.
    pub fn new(addr: SocketAddr, root_pem: &str, identity: Option<(&str, &str)>) -> Self {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(cert.as_bytes())
                        .collect::<Result<_, _>>()
                        .unwrap(),
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Self {
            addr,
            config: std::sync::Arc::new(config),
            handshakes: Default::default(),
        }
    }

    /// A client on a new connection (the handshake happens here).
    pub async fn client(
        &self,
    ) -> Result<IstioCertificateServiceClient<Channel>, tonic::transport::Error> {
        Ok(IstioCertificateServiceClient::new(self.channel().await?))
    }

    /// A channel on a new connection (the handshake happens here); it reconnects
    /// through the same configuration when the server closes the connection.
    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        use rustls::pki_types::ServerName;
        let (addr, config, log) = (self.addr, self.config.clone(), self.handshakes.clone());
        let connector = tower::service_fn(move |_: http::Uri| {
            let config = config.clone();
            let log = log.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
                    .await?;
                if let Some(kind) = tls.get_ref().1.handshake_kind() {
                    log.lock().unwrap().push(kind);
                }
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        tonic::transport::Endpoint::from_static("http://signet.test")
            // Pings while idle, which the server answers: traffic that is not a request.
            .http2_keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
            .connect_with_connector(connector)
            .await
    }

    /// The client configuration (roots, identity, ALPN h2).
    pub fn config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// How many connections were established.
    pub fn connections(&self) -> usize {
        self.handshakes.lock().unwrap().len()
    }
}

/// A CreateCertificate request with a bearer token.
pub fn request(
    csr: &str,
    token: Option<&str>,
    ttl: i64,
) -> tonic::Request<IstioCertificateRequest> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_owned(),
        validity_duration: ttl,
        metadata: None,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

/// A P-256 key and a PEM CSR, optionally with a URI SAN.
pub fn csr(uri: Option<&str>) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(uri) = uri {
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    }
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

/// A CA with a self-signed root (no cacerts) checking tokens of its own issuer: the
/// usual start of a test about the CA alone. The CA stops when this is dropped.
pub struct SelfSignedCa {
    /// The CA's state directory lives here.
    pub dir: tempfile::TempDir,
    /// Signs the callers' tokens.
    pub jwt: crate::JwtIssuer,
    /// The running CA.
    pub ca: TestCa,
    /// The root it created (`state/root-cert.pem`).
    pub root: String,
}

impl SelfSignedCa {
    /// Starts one with `extra` flags beyond the usual.
    pub async fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let jwt = crate::JwtIssuer::new("k1");
        let mut args = crate::jwt_ca_args(dir.path(), &jwt, &dir.path().join("none"));
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let ca = TestCa::start(&args).await;
        let root = std::fs::read_to_string(dir.path().join("state/root-cert.pem")).unwrap();
        Self { dir, jwt, ca, root }
    }
}
