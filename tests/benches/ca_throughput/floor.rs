//! The least a TLS gRPC request costs a server on this machine, whatever it does with
//! it: a server that answers every CreateCertificate with the same certificate chain,
//! built once, run as its own process pinned like the CA and driven by the same 64
//! clients. Two of them: on tonic (over hyper, h2 and rustls, as signet-ca serves) and
//! on the h2 crate and rustls alone (no hyper, no tonic), the least any gRPC server on
//! Rust's HTTP/2 stack could spend.
//!
//! The bench runs itself again as that server: `SIGNET_BENCH_FLOOR=<kind>:<addr>:<dir>`,
//! with the serving certificate, its key and the answer in `dir`.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use signet_proto::{
    IstioCertificateRequest, IstioCertificateResponse, IstioCertificateService,
    IstioCertificateServiceServer,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const ENV: &str = "SIGNET_BENCH_FLOOR";

/// Which server answers.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    /// tonic's server over hyper, as signet-ca.
    Tonic,
    /// The h2 crate directly.
    H2,
}

impl Kind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::Tonic => "on tonic (hyper, h2, rustls) as signet-ca",
            Self::H2 => "on the h2 crate and rustls alone",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Tonic => "tonic",
            Self::H2 => "h2",
        }
    }
}

/// A canned server as its own process; killed when dropped.
pub(crate) struct FloorServer {
    process: signet_e2e::process::Killed,
    pub(crate) addr: SocketAddr,
    /// The root its serving certificate is signed by (self-signed: the certificate).
    pub(crate) root_pem: String,
    _dir: tempfile::TempDir,
}

impl FloorServer {
    /// Starts a `kind` server pinned to `cores` that answers `answer` to every request.
    pub(crate) async fn start(kind: Kind, answer: &IstioCertificateResponse, cores: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec![signet_e2e::SERVER_NAME.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(
            dir.path().join("answer.bin"),
            prost::Message::encode_to_vec(answer),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", signet_e2e::cluster::free_port())
            .parse()
            .unwrap();
        let mut child = Command::new("taskset")
            .args(["-c", cores])
            .arg(std::env::current_exe().unwrap())
            .env(
                ENV,
                format!("{}:{addr}:{}", kind.name(), dir.path().display()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // It says "listening" once its socket is bound; end of file means it died.
        let stdout = child.stdout.take().unwrap();
        let mut process = signet_e2e::process::Killed(child);
        let said = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .map(|_| line)
        })
        .await
        .unwrap();
        if said.ok().as_deref() != Some("listening\n") {
            panic!(
                "the {} floor server did not start: {:?}",
                kind.name(),
                process.0.wait()
            );
        }
        Self {
            process,
            addr,
            root_pem: cert.pem(),
            _dir: dir,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// In the bench's own process: if it was started as a floor server, serves until
/// killed and never returns.
pub(crate) fn serve_if_asked() {
    let Ok(spec) = std::env::var(ENV) else {
        return;
    };
    let mut parts = spec.splitn(4, ':');
    let kind = parts.next().unwrap().to_owned();
    let addr: SocketAddr = format!("{}:{}", parts.next().unwrap(), parts.next().unwrap())
        .parse()
        .unwrap();
    let dir = Path::new(parts.next().unwrap()).to_owned();
    // As signet-ca: the multi-threaded runtime, one worker per core it may use.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("cert.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("key.pem")).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let answer = std::fs::read(dir.join("answer.bin")).unwrap();
        let listener = TcpListener::bind(addr).await.unwrap();
        println!("listening");
        match kind.as_str() {
            "tonic" => tonic_server(listener, acceptor, answer).await,
            "h2" => h2_server(listener, acceptor, answer).await,
            other => panic!("no floor server of kind {other:?}"),
        }
    });
    std::process::exit(0);
}

/// TLS connections, accepted and handshaken one task each as signet-ca does.
fn tls_connections(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> tokio::sync::mpsc::Receiver<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(tls).await;
                }
            });
        }
    });
    rx
}

struct Canned(IstioCertificateResponse);

#[tonic::async_trait]
impl IstioCertificateService for Canned {
    async fn create_certificate(
        &self,
        _request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.0.clone()))
    }
}

async fn tonic_server(listener: TcpListener, acceptor: TlsAcceptor, answer: Vec<u8>) {
    let answer: IstioCertificateResponse = prost::Message::decode(answer.as_slice()).unwrap();
    let incoming = tokio_stream::wrappers::ReceiverStream::new(tls_connections(listener, acceptor));
    tonic::transport::Server::builder()
        .add_service(IstioCertificateServiceServer::new(Canned(answer)))
        .serve_with_incoming(tokio_stream::StreamExt::map(
            incoming,
            Ok::<_, std::io::Error>,
        ))
        .await
        .unwrap();
}

async fn h2_server(listener: TcpListener, acceptor: TlsAcceptor, answer: Vec<u8>) {
    // One gRPC message: uncompressed, its length, the protobuf.
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(answer.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&answer);
    let framed = bytes::Bytes::from(framed);
    let mut conns = tls_connections(listener, acceptor);
    while let Some(tls) = conns.recv().await {
        let framed = framed.clone();
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(tls).await else {
                return;
            };
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                let framed = framed.clone();
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    while let Some(chunk) = body.data().await {
                        let Ok(chunk) = chunk else { return };
                        let _ = body.flow_control().release_capacity(chunk.len());
                    }
                    let head = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    let Ok(mut send) = respond.send_response(head, false) else {
                        return;
                    };
                    let _ = send.send_data(framed, false);
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let _ = send.send_trailers(trailers);
                });
            }
        });
    }
}
