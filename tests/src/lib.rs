//! Helpers for Signet's end-to-end tests: a CA on 127.0.0.1:0, token issuers, CSRs,
//! and the openssl CLI as an independent verifier.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

pub mod agent;
pub mod cluster;
pub mod kube;
pub mod mtls;
pub mod sds;

use base64::Engine;
use rcgen::{CertificateParams, KeyPair, SanType};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use signet_proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// Issuer used for test tokens.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The name the CA's serving certificate carries by default.
pub const SERVER_NAME: &str = "istiod.istio-system.svc";

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Parses `signet-ca serve` arguments exactly as the binary does.
pub fn parse_serve(args: &[String]) -> signet_ca::config::ServeConfig {
    use clap::Parser;
    use signet_ca::config::{Cli, Command};
    let mut full = vec!["signet-ca".to_string(), "serve".to_string()];
    full.extend_from_slice(args);
    let Command::Serve(serve) = Cli::try_parse_from(full).unwrap().command else {
        unreachable!()
    };
    serve.validate(false).unwrap()
}

/// A JWT issuer (ES256, or RS256 as Kubernetes clusters sign by default) and its JWKS.
pub struct JwtIssuer {
    key: jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
    /// The key id in token headers.
    pub kid: String,
    /// The JWKS document.
    pub jwks: serde_json::Value,
}

impl JwtIssuer {
    /// A fresh P-256 signing key.
    pub fn new(kid: &str) -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng).unwrap();
        let point = pair.public_key().as_ref();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }]});
        Self {
            key: jsonwebtoken::EncodingKey::from_ec_der(&pkcs8),
            alg: jsonwebtoken::Algorithm::ES256,
            kid: kid.to_owned(),
            jwks,
        }
    }

    /// An RS256 issuer with a 2048-bit key made by the openssl CLI (ring cannot
    /// generate RSA keys).
    pub fn rsa(kid: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let modulus = sh(
            "openssl genrsa -traditional -out k.pem 2048 2>/dev/null && openssl rsa -in k.pem -traditional -outform DER -out k.der 2>/dev/null && openssl rsa -in k.pem -noout -modulus",
            dir.path(),
        );
        let hex = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [{
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
            "n": b64(&n), "e": b64(&[1, 0, 1]),
        }]});
        Self {
            key: jsonwebtoken::EncodingKey::from_rsa_der(
                &std::fs::read(dir.path().join("k.der")).unwrap(),
            ),
            alg: jsonwebtoken::Algorithm::RS256,
            kid: kid.to_owned(),
            jwks,
        }
    }

    /// A service account token for `ns/sa` with audience `istio-ca`, valid an hour.
    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.token_with(ns, sa, ISSUER, &["istio-ca"], 3600)
    }

    /// A token for `ns/sa` bound to pod `pod` with UID `uid`, as the kubelet
    /// projects them.
    pub fn pod_token(&self, ns: &str, sa: &str, pod: &str, uid: &str) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": ISSUER, "aud": ["istio-ca"], "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "iat": now, "nbf": now, "exp": now + 3600,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"},
                              "pod": {"name": pod, "uid": uid}},
        });
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }

    /// A token with every knob.
    pub fn token_with(&self, ns: &str, sa: &str, iss: &str, aud: &[&str], exp_in: i64) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": iss, "aud": aud, "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "iat": now, "nbf": now, "exp": now + exp_in,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"}},
        });
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }

    /// Writes the JWKS to `dir/jwks.json` and returns its path.
    pub fn write_jwks(&self, dir: &Path) -> PathBuf {
        let path = dir.join("jwks.json");
        std::fs::write(&path, self.jwks.to_string()).unwrap();
        path
    }
}

/// `signet-ca serve` flags for a CA with key material in `cacerts` (self-signed in
/// `dir/state` when that holds none) checking tokens of `issuer` offline.
pub fn jwt_ca_args(dir: &Path, issuer: &JwtIssuer, cacerts: &Path) -> Vec<String> {
    vec![
        "--cacerts-dir".into(),
        cacerts.display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--jwks".into(),
        issuer.write_jwks(dir).display().to_string(),
        "--jwt-issuer".into(),
        ISSUER.into(),
    ]
}

/// A signet-ca server running in this process.
pub struct TestCa {
    /// gRPC (TLS) address.
    pub grpc: SocketAddr,
    /// HTTP (metrics) address.
    pub http: SocketAddr,
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
        let _ = rustls::crypto::ring::default_provider().install_default();
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
        let (stop, stopped) = oneshot::channel();
        let handle = tokio::spawn(signet_ca::server::run(
            config,
            grpc_listener,
            http_listener,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            grpc,
            http,
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
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if self
                .http_get("/readyz")
                .await
                .is_ok_and(|(code, _)| code == 200)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("CA not ready after 60s");
    }

    /// GET a path of the HTTP listener: (status, body).
    pub async fn http_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.http).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
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

/// Our own Rust client: tonic over rustls, verifying `SERVER_NAME` against `root_pem`,
/// optionally presenting a client certificate (`cert_pem`, `key_pem`).
pub async fn client(
    addr: SocketAddr,
    root_pem: &str,
    identity: Option<(&str, &str)>,
) -> IstioCertificateServiceClient<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name(SERVER_NAME);
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
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
        let channel = tonic::transport::Endpoint::from_static("http://signet.test")
            .connect_with_connector(connector)
            .await?;
        Ok(IstioCertificateServiceClient::new(channel))
    }

    /// How many connections were established.
    pub fn connections(&self) -> usize {
        self.handshakes.lock().unwrap().len()
    }
}

/// Writes `ca-crl.pem` into an Istio cacerts directory: a CRL signed by its
/// `ca-cert.pem` with `ca_key`, revoking `serials`.
pub fn write_crl(cacerts: &Path, ca_key: &KeyPair, serials: &[Vec<u8>]) {
    let now = time::OffsetDateTime::now_utc();
    let ca_pem = std::fs::read_to_string(cacerts.join("ca-cert.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(1),
        next_update: now + time::Duration::days(1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(s),
                revocation_time: now - time::Duration::minutes(1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer).unwrap();
    std::fs::write(cacerts.join("ca-crl.pem"), crl.pem().unwrap()).unwrap();
}

/// Serves `app` over HTTPS (HTTP/1.1 and HTTP/2) on 127.0.0.1 with a certificate for
/// `127.0.0.1` and `localhost` from a fresh CA: the Kubernetes-shaped endpoints of
/// the tests (API server, JWKS). Returns the address and the CA's PEM, for a
/// kubeconfig or `--jwks-ca-cert`.
pub async fn https_server(app: axum::Router) -> (SocketAddr, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    (addr, ca_cert.pem())
}

/// The value of the sample `series` (a metric name with its labels, as printed) in
/// a Prometheus text exposition; `None` when absent.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// The serial number of a PEM certificate, big-endian bytes.
pub fn serial(pem: &str) -> Vec<u8> {
    with_cert(pem, |c| c.tbs_certificate.raw_serial().to_vec())
}

/// Starts signet-agent in this process with `args` (flags of `signet-agent run`),
/// its HTTP listener on port 0. Returns the HTTP address and a stop handle.
pub async fn start_agent(args: &[String]) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
    use clap::Parser;
    use signet_agent::config::{Cli, Command};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut full = vec!["signet-agent".to_string(), "run".to_string()];
    full.extend_from_slice(args);
    let Command::Run(run) = Cli::try_parse_from(full).unwrap().command else {
        unreachable!()
    };
    let config = run.validate(Vec::new()).unwrap();
    let socket = signet_agent::sds::bind(&config.socket).unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        signet_agent::server::run(config, socket, http, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, stop, handle)
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

/// Runs `openssl verify` on `chain[0]` with the middle elements as untrusted
/// intermediates and the last element as the trust bundle.
pub fn openssl_verify(chain: &[String]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&root, chain.last().unwrap()).unwrap();
    std::fs::write(&leaf, &chain[0]).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.arg("verify").arg("-CAfile").arg(&root);
    if chain.len() > 2 {
        let untrusted = dir.path().join("untrusted.pem");
        std::fs::write(&untrusted, chain[1..chain.len() - 1].concat()).unwrap();
        cmd.arg("-untrusted").arg(untrusted);
    }
    let out = cmd.arg(&leaf).output().expect("openssl is installed");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Runs a shell command and panics with its output on failure.
pub fn sh(cmd: &str, dir: &Path) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Parses a PEM certificate with x509-parser and hands it to `f`.
pub fn with_cert<T>(
    pem: &str,
    f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> T,
) -> T {
    let der = ::pem::parse(pem).unwrap().into_contents();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    f(&cert)
}

/// The URI SANs of a PEM certificate.
pub fn uri_sans(pem: &str) -> Vec<String> {
    with_cert(pem, |c| {
        c.subject_alternative_name()
            .unwrap()
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// A test root CA made with rcgen.
pub struct TestRoot {
    key: KeyPair,
    params: CertificateParams,
    /// The root certificate, PEM.
    pub pem: String,
}

impl TestRoot {
    /// A self-signed root with `key`, valid from yesterday for ten years.
    pub fn new(name: &str, key: KeyPair) -> Self {
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Signet Tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let pem = params.self_signed(&key).unwrap().pem();
        Self { key, params, pem }
    }

    /// A P-256 root.
    pub fn p256(name: &str) -> Self {
        Self::new(
            name,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        )
    }

    /// Writes an Istio cacerts set into `dir`: an intermediate named `cn` with key
    /// `ca_key` (pathlen `pathlen`, valid `days` from yesterday), the chain, and
    /// `bundle` (this root when empty) as root-cert.pem.
    pub fn write_cacerts(
        &self,
        dir: &Path,
        cn: &str,
        ca_key: &KeyPair,
        pathlen: Option<u8>,
        bundle: &[&str],
    ) {
        let now = time::OffsetDateTime::now_utc();
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let mut ca = CertificateParams::default();
        ca.distinguished_name = rcgen::DistinguishedName::new();
        ca.distinguished_name.push(rcgen::DnType::CommonName, cn);
        ca.is_ca = rcgen::IsCa::Ca(match pathlen {
            Some(n) => rcgen::BasicConstraints::Constrained(n),
            None => rcgen::BasicConstraints::Unconstrained,
        });
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        ca.use_authority_key_identifier_extension = true;
        ca.not_before = now - time::Duration::days(1);
        ca.not_after = now + time::Duration::days(730);
        let cert = ca.signed_by(ca_key, &issuer).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("ca-key.pem"), ca_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("cert-chain.pem"), cert.pem() + &self.pem).unwrap();
        let bundle = if bundle.is_empty() {
            self.pem.clone()
        } else {
            bundle.concat()
        };
        std::fs::write(dir.join("root-cert.pem"), bundle).unwrap();
    }
}

/// A directory laid out the way the kubelet mounts a Secret: files are links into
/// `..data`, itself a link to a timestamped directory swapped atomically on update.
pub struct SecretMount {
    /// The mount point.
    pub dir: PathBuf,
    generation: usize,
}

impl SecretMount {
    /// An empty mount at `dir`.
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        Self {
            dir: dir.to_owned(),
            generation: 0,
        }
    }

    /// Publishes the files of `from` as the new content, as the kubelet does.
    pub fn publish(&mut self, from: &Path) {
        use std::os::unix::fs::symlink;
        self.generation += 1;
        let version = format!("..2026_11_22_{:04}", self.generation);
        let target = self.dir.join(&version);
        std::fs::create_dir(&target).unwrap();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name();
            std::fs::copy(entry.path(), target.join(&name)).unwrap();
            names.push(name);
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for name in names {
            let link = self.dir.join(&name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(&name), &link).unwrap();
            }
        }
    }
}
