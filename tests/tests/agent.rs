//! signet-agent end to end with the real signet-ca: obtaining a certificate,
//! rotation pushed to an open SDS stream, surviving a CA restart, mutual TLS between
//! two workloads with what their agents served, and the errors an operator meets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, sync::Arc, time::Duration};

use envoy_types::pb::envoy::{
    config::core::v3::data_source::Specifier,
    extensions::transport_sockets::tls::v3::{Secret, secret},
    service::{
        discovery::v3::DiscoveryRequest,
        secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
    },
};
use prost::Message;
use signet_e2e::{JwtIssuer, TestCa, start_agent, uri_sans, with_cert};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

struct Setup {
    dir: tempfile::TempDir,
    jwt: JwtIssuer,
}

impl Setup {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            jwt: JwtIssuer::new("k1"),
        }
    }

    fn ca_args(&self) -> Vec<String> {
        let d = self.dir.path();
        vec![
            "--cacerts-dir".into(),
            d.join("none").display().to_string(),
            "--state-dir".into(),
            d.join("state").display().to_string(),
            "--jwks".into(),
            self.jwt.write_jwks(d).display().to_string(),
            "--jwt-issuer".into(),
            signet_e2e::ISSUER.into(),
        ]
    }

    /// Flags for an agent of `ns/sa` talking to `ca`, its socket under the temp dir.
    fn agent_args(&self, ca: &TestCa, ns: &str, sa: &str, extra: &[&str]) -> Vec<String> {
        let d = self.dir.path();
        let token = d.join(format!("token-{sa}"));
        std::fs::write(&token, self.jwt.token(ns, sa)).unwrap();
        let mut args: Vec<String> = vec![
            "--ca-addr".into(),
            format!("localhost:{}", ca.grpc.port()),
            "--ca-root-cert".into(),
            d.join("state/root-cert.pem").display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
            "--namespace".into(),
            ns.into(),
            "--service-account".into(),
            sa.into(),
            "--socket".into(),
            self.socket(sa).display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn socket(&self, sa: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("sds-{sa}/socket"))
    }
}

async fn sds(socket: &Path) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
    SecretDiscoveryServiceClient::new(signet_agent::inspect::connect(socket).await.unwrap())
}

fn bytes(source: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>) -> Vec<u8> {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => b.clone(),
        other => panic!("want inline bytes, got {other:?}"),
    }
}

/// (chain PEM, key PEM) of a `default` secret.
fn tls(secret: &Secret) -> (String, String) {
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(t)) => (
            String::from_utf8(bytes(&t.certificate_chain)).unwrap(),
            String::from_utf8(bytes(&t.private_key)).unwrap(),
        ),
        other => panic!("not a TLS certificate: {other:?}"),
    }
}

fn roots(secret: &Secret) -> String {
    match &secret.r#type {
        Some(secret::Type::ValidationContext(v)) => {
            String::from_utf8(bytes(&v.trusted_ca)).unwrap()
        }
        other => panic!("not a validation context: {other:?}"),
    }
}

async fn fetch(socket: &Path, names: &[&str]) -> Vec<Secret> {
    let mut client = sds(socket).await;
    let response = client
        .fetch_secrets(DiscoveryRequest {
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            type_url: SECRET_TYPE.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    response
        .resources
        .iter()
        .map(|a| Secret::decode(a.value.as_slice()).unwrap())
        .collect()
}

async fn wait_ready(http: std::net::SocketAddr) {
    for _ in 0..200 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(http).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            if out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("agent never became ready");
}

fn serial(chain_pem: &str) -> String {
    with_cert(chain_pem, |c| hex_serial(c.raw_serial()))
}

fn hex_serial(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotates_on_time_and_pushes_to_the_open_stream() {
    let s = Setup::new();
    let ca = TestCa::start(&s.ca_args()).await;
    let (http, stop, agent) =
        start_agent(&s.agent_args(&ca, "shop", "cart", &["--secret-ttl", "4s"])).await;
    wait_ready(http).await;

    let mut client = sds(&s.socket("cart")).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        resource_names: vec!["default".into()],
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let first_secret = Secret::decode(first.resources[0].value.as_slice()).unwrap();
    assert_eq!(first_secret.name, "default");
    let (chain, key) = tls(&first_secret);
    assert_eq!(
        uri_sans(&chain),
        vec!["spiffe://cluster.local/ns/shop/sa/cart"]
    );
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    let lifetime = with_cert(&chain, |c| {
        c.validity().not_after.timestamp() - c.validity().not_before.timestamp()
    });
    assert!((4..=5).contains(&lifetime), "{lifetime}");
    // ACK it, as Envoy does.
    tx.send(DiscoveryRequest {
        resource_names: vec!["default".into()],
        type_url: SECRET_TYPE.into(),
        version_info: first.version_info.clone(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Half-life is 2 s (±1 %): the next certificate arrives on the same stream.
    let started = std::time::Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(6), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (chain2, key2) = tls(&Secret::decode(second.resources[0].value.as_slice()).unwrap());
    assert_ne!(serial(&chain), serial(&chain2));
    assert_ne!(key, key2, "each certificate gets a fresh key");
    assert_ne!(first.version_info, second.version_info);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let _ = stop.send(());
    agent.await.unwrap();
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_serving_while_the_ca_is_down_then_recovers() {
    let s = Setup::new();
    let ca = TestCa::start(&s.ca_args()).await;
    let addr = ca.grpc;
    let (http, stop, agent) =
        start_agent(&s.agent_args(&ca, "shop", "cart", &["--secret-ttl", "6s"])).await;
    wait_ready(http).await;
    let before = tls(&fetch(&s.socket("cart"), &["default"]).await[0]).0;
    ca.stop().await;

    // Past the refresh point (3 s) the CA is still down: the valid certificate stays.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = tls(&fetch(&s.socket("cart"), &["default"]).await[0]).0;
    assert_eq!(serial(&before), serial(&during));

    // The CA comes back (same root, same address): the agent renews by itself.
    let ca = TestCa::start_at(&s.ca_args(), addr).await;
    let mut renewed = None;
    for _ in 0..80 {
        let now = tls(&fetch(&s.socket("cart"), &["default"]).await[0]).0;
        if serial(&now) != serial(&before) {
            renewed = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        renewed.is_some(),
        "the agent did not recover after the CA came back"
    );
    let _ = stop.send(());
    agent.await.unwrap();
    ca.stop().await;
}

/// A verifier for SPIFFE peers: the chain must verify to `roots` and the leaf must
/// carry exactly `expected` as its URI SAN. (DNS names play no part.)
#[derive(Debug)]
struct SpiffePeer {
    roots: Vec<rustls::pki_types::TrustAnchor<'static>>,
    expected: String,
}

impl SpiffePeer {
    fn check(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
        server: bool,
    ) -> Result<(), rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("{e:?}")))?;
        let usage = if server {
            webpki::KeyUsage::server_auth()
        } else {
            webpki::KeyUsage::client_auth()
        };
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("chain: {e:?}")))?;
        let pem = signet_spiffe::pem_cert(end_entity);
        let ids = uri_sans(&pem);
        if ids != vec![self.expected.clone()] {
            return Err(rustls::Error::General(format!(
                "peer is {ids:?}, want {}",
                self.expected
            )));
        }
        Ok(())
    }
}

/// ring's signature algorithms, for both verifiers below.
fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

impl rustls::client::danger::ServerCertVerifier for SpiffePeer {
    fn verify_server_cert(
        &self,
        ee: &rustls::pki_types::CertificateDer<'_>,
        im: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.check(ee, im, now, true)
            .map(|_| rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &algorithms())
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &algorithms())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        algorithms().supported_schemes()
    }
}

impl rustls::server::danger::ClientCertVerifier for SpiffePeer {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        ee: &rustls::pki_types::CertificateDer<'_>,
        im: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.check(ee, im, now, false)
            .map(|_| rustls::server::danger::ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &algorithms())
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &algorithms())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// What one workload's agent served: (chain, key, roots).
async fn served(socket: &Path) -> (String, String, String) {
    let secrets = fetch(socket, &["default", "ROOTCA"]).await;
    let (chain, key) = tls(&secrets[0]);
    (chain, key, roots(&secrets[1]))
}

fn certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    ::pem::parse_many(pem)
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents().into())
        .collect()
}

fn peer(roots_pem: &str, expected: &str) -> Arc<SpiffePeer> {
    Arc::new(SpiffePeer {
        roots: certs(roots_pem)
            .iter()
            .map(|c| webpki::anchor_from_trusted_cert(c).unwrap().to_owned())
            .collect(),
        expected: expected.into(),
    })
}

/// One mutual TLS handshake: server `srv` expects `client_id`, client `cli` expects
/// `server_id`. Ok when both sides accepted each other.
async fn handshake(
    srv: &(String, String, String),
    cli: &(String, String, String),
    server_id: &str,
    client_id: &str,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = |pem: &str| {
        rustls::pki_types::PrivateKeyDer::Pkcs8(::pem::parse(pem).unwrap().into_contents().into())
    };
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(peer(&srv.2, client_id))
        .with_single_cert(certs(&srv.0), key(&srv.1))
        .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(peer(&cli.2, server_id))
        .with_client_auth_cert(certs(&cli.0), key(&cli.1))
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| format!("server: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("server read: {e}"))?;
        tls.write_all(b"pong")
            .await
            .map_err(|e| format!("server write: {e}"))?;
        tls.shutdown().await.ok();
        Ok::<_, String>(())
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("workload.invalid").unwrap();
    let client_result = async {
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("client: {e}"))?;
        tls.write_all(b"ping")
            .await
            .map_err(|e| format!("client write: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("client read: {e}"))?;
        assert_eq!(&buf, b"pong");
        Ok::<_, String>(())
    }
    .await;
    let server_result = server_side.await.unwrap();
    client_result.and(server_result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workloads_complete_mutual_tls_and_a_stranger_is_refused() {
    let s = Setup::new();
    let ca = TestCa::start(&s.ca_args()).await;
    let (h1, stop1, a1) = start_agent(&s.agent_args(&ca, "shop", "frontend", &[])).await;
    let (h2, stop2, a2) = start_agent(&s.agent_args(&ca, "shop", "backend", &[])).await;
    wait_ready(h1).await;
    wait_ready(h2).await;
    let frontend = served(&s.socket("frontend")).await;
    let backend = served(&s.socket("backend")).await;
    let fe = "spiffe://cluster.local/ns/shop/sa/frontend";
    let be = "spiffe://cluster.local/ns/shop/sa/backend";
    handshake(&backend, &frontend, be, fe).await.unwrap();
    handshake(&frontend, &backend, fe, be).await.unwrap();
    // Each side checks who the other is: expecting someone else fails.
    assert!(
        handshake(
            &backend,
            &frontend,
            "spiffe://cluster.local/ns/shop/sa/db",
            fe
        )
        .await
        .is_err()
    );

    // A workload certified by an unrelated CA (another root) is refused.
    let other = Setup::new();
    let other_ca = TestCa::start(&other.ca_args()).await;
    let (h3, stop3, a3) = start_agent(&other.agent_args(&other_ca, "shop", "frontend", &[])).await;
    wait_ready(h3).await;
    let impostor = served(&other.socket("frontend")).await;
    // Refused for the right reason: the chain does not verify to the other side's
    // bundle (both roots are named O=cluster.local, so webpki finds the "issuer" by
    // name and the signature fails), not a SAN mismatch or an I/O error.
    let err = handshake(&backend, &impostor, be, fe).await.unwrap_err();
    assert!(
        err.contains("chain: InvalidSignatureForPublicKey") || err.contains("chain: UnknownIssuer"),
        "{err}"
    );

    for (stop, agent) in [(stop1, a1), (stop2, a2), (stop3, a3)] {
        let _ = stop.send(());
        agent.await.unwrap();
    }
    ca.stop().await;
    other_ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_a_clear_error_and_the_agent_recovers() {
    let s = Setup::new();
    let ca = TestCa::start(&s.ca_args()).await;
    let mut args = s.agent_args(&ca, "shop", "cart", &[]);
    let token = s.dir.path().join("token-cart");
    std::fs::remove_file(&token).unwrap();
    args.extend([
        "--output-certs".to_string(),
        s.dir.path().join("out").display().to_string(),
    ]);
    let (http, stop, agent) = start_agent(&args).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut s_http = tokio::net::TcpStream::connect(http).await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s_http
            .write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s_http.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    }
    // An empty token is no better.
    std::fs::write(&token, "").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(&token, s.jwt.token("shop", "cart")).unwrap();
    wait_ready(http).await;
    // --output-certs wrote the files, private ones 0600.
    use std::os::unix::fs::PermissionsExt;
    for f in ["key.pem", "cert-chain.pem", "root-cert.pem"] {
        let path = s.dir.path().join("out").join(f);
        // Written by its own task just after the certificate is published.
        for _ in 0..100 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let _ = stop.send(());
    agent.await.unwrap();
    ca.stop().await;
}

#[test]
fn socket_paths_that_cannot_work_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = signet_agent::sds::bind(dir.path()).unwrap_err().to_string();
    assert!(err.contains("is a directory"), "{err}");
    let file = dir.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let err = signet_agent::sds::bind(&file.join("socket"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot create its directory"), "{err}");
    let err = signet_agent::sds::bind(&file).unwrap_err().to_string();
    assert!(err.contains("not a socket"), "{err}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let socket = dir.path().join("live/socket");
        let _live = signet_agent::sds::bind(&socket).unwrap();
        let err = signet_agent::sds::bind(&socket).unwrap_err().to_string();
        assert!(err.contains("another server"), "{err}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
            0o660
        );
    });
    // A stale socket file (nobody listening) is replaced.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let socket = dir.path().join("stale/socket");
        drop(signet_agent::sds::bind(&socket).unwrap());
        assert!(socket.exists());
        signet_agent::sds::bind(&socket).unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_root_in_the_ca_trust_reaches_rootca_without_waiting_for_rotation() {
    use signet_e2e::{SecretMount, TestRoot};
    let s = Setup::new();
    let root1 = TestRoot::p256("Root One");
    let root2 = TestRoot::p256("Root Two");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let staged = s.dir.path().join("staged");
    root1.write_cacerts(&staged.join("a"), "Intermediate A", &key, Some(0), &[]);
    root1.write_cacerts(
        &staged.join("b"),
        "Intermediate A",
        &key,
        Some(0),
        &[&root1.pem, &root2.pem],
    );
    let mut mount = SecretMount::new(&s.dir.path().join("cacerts"));
    mount.publish(&staged.join("a"));
    let mut ca_args = s.ca_args();
    ca_args[1] = mount.dir.display().to_string();
    let ca = TestCa::start(&ca_args).await;

    // The agent trusts the CA through a file, as pods do with istio-ca-root-cert.
    let trust = s.dir.path().join("ca-root.pem");
    std::fs::write(&trust, &root1.pem).unwrap();
    let mut args = s.agent_args(&ca, "shop", "cart", &[]);
    args[3] = trust.display().to_string();
    let (http, stop, agent) = start_agent(&args).await;
    wait_ready(http).await;

    let mut client = sds(&s.socket("cart")).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        resource_names: vec!["ROOTCA".into()],
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(
        ::pem::parse_many(roots(
            &Secret::decode(first.resources[0].value.as_slice()).unwrap()
        ))
        .unwrap()
        .len(),
        1
    );

    // Step 2 of a root rotation: the CA bundles both roots, and the trust file that
    // pods mount is updated. The 24-hour certificate is nowhere near its refresh.
    mount.publish(&staged.join("b"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    std::fs::write(&trust, root1.pem.clone() + &root2.pem).unwrap();
    let pushed = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let bundle = roots(&Secret::decode(pushed.resources[0].value.as_slice()).unwrap());
    assert_eq!(::pem::parse_many(&bundle).unwrap().len(), 2, "{bundle}");
    let _ = stop.send(());
    agent.await.unwrap();
    ca.stop().await;
}

/// The trust bundles inside a SPIFFE-validator secret: trust domain -> PEM.
fn spiffe_bundles(secret: &Secret) -> std::collections::BTreeMap<String, String> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SpiffeCertValidatorConfig;
    let Some(secret::Type::ValidationContext(v)) = &secret.r#type else {
        panic!("not a validation context")
    };
    let custom = v
        .custom_validator_config
        .as_ref()
        .expect("a custom validator");
    assert_eq!(custom.name, "envoy.tls.cert_validator.spiffe");
    let any = custom.typed_config.as_ref().unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
    );
    let config = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
    config
        .trust_domains
        .iter()
        .map(|td| {
            (
                td.name.clone(),
                String::from_utf8(bytes(&td.trust_bundle)).unwrap(),
            )
        })
        .collect()
}

fn verifies(leaf_chain_pem: &str, roots_pem: &str) -> bool {
    let chain = certs(leaf_chain_pem);
    let anchors: Vec<_> = certs(roots_pem)
        .iter()
        .map(|c| webpki::anchor_from_trusted_cert(c).unwrap().to_owned())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_trust_domains_through_the_spiffe_validator() {
    // Two meshes with different trust domains and unrelated roots.
    let a = Setup::new();
    let b = Setup::new();
    let with_td = |mut args: Vec<String>, td: &str| {
        args.extend(["--trust-domain".to_string(), td.to_string()]);
        args
    };
    let ca_a = TestCa::start(&with_td(a.ca_args(), "a.example")).await;
    let ca_b = TestCa::start(&with_td(b.ca_args(), "b.example")).await;
    // Agent A knows B's bundle (and B's file appears only after start, to show the
    // directory is watched).
    let federation = a.dir.path().join("federation");
    std::fs::create_dir_all(&federation).unwrap();
    let mut args = a.agent_args(&ca_a, "shop", "web", &["--trust-domain", "a.example"]);
    args.extend([
        "--federated-bundles".into(),
        federation.display().to_string(),
    ]);
    let (ha, stop_a, agent_a) = start_agent(&args).await;
    let (hb, stop_b, agent_b) =
        start_agent(&b.agent_args(&ca_b, "shop", "api", &["--trust-domain", "b.example"])).await;
    wait_ready(ha).await;
    wait_ready(hb).await;
    let only_a = spiffe_bundles(&fetch(&a.socket("web"), &["ALL"]).await[0]);
    assert_eq!(only_a.keys().collect::<Vec<_>>(), ["a.example"]);
    let b_root = std::fs::read_to_string(b.dir.path().join("state/root-cert.pem")).unwrap();
    std::fs::write(federation.join("b.example.pem"), &b_root).unwrap();
    let mut all = only_a;
    for _ in 0..60 {
        all = spiffe_bundles(&fetch(&a.socket("web"), &["ALL"]).await[0]);
        if all.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(all.keys().collect::<Vec<_>>(), ["a.example", "b.example"]);
    let just_b = spiffe_bundles(&fetch(&a.socket("web"), &["spiffe://b.example"]).await[0]);
    assert_eq!(just_b.keys().collect::<Vec<_>>(), ["b.example"]);

    // B's workload verifies under B's bundle, never under A's.
    let b_chain = tls(&fetch(&b.socket("api"), &["default"]).await[0]).0;
    assert_eq!(
        uri_sans(&b_chain),
        vec!["spiffe://b.example/ns/shop/sa/api"]
    );
    assert!(verifies(&b_chain, &all["b.example"]));
    assert!(!verifies(&b_chain, &all["a.example"]));
    let a_chain = tls(&fetch(&a.socket("web"), &["default"]).await[0]).0;
    assert!(verifies(&a_chain, &all["a.example"]));
    assert!(!verifies(&a_chain, &all["b.example"]));

    for (stop, agent) in [(stop_a, agent_a), (stop_b, agent_b)] {
        let _ = stop.send(());
        agent.await.unwrap();
    }
    ca_a.stop().await;
    ca_b.stop().await;
}

/// One cluster of the root-rotation test: its CA (key material in a kubelet-style
/// mount), and an agent whose CA trust file is what pods mount from
/// `istio-ca-root-cert`.
struct Cluster {
    setup: Setup,
    mount: signet_e2e::SecretMount,
    trust: std::path::PathBuf,
    ca: TestCa,
    agent: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
    sa: &'static str,
}

impl Cluster {
    async fn start(name: &'static str, sa: &'static str, initial: &Path, bundle: &str) -> Self {
        let setup = Setup::new();
        let mut mount = signet_e2e::SecretMount::new(&setup.dir.path().join("cacerts"));
        mount.publish(initial);
        let mut ca_args = setup.ca_args();
        ca_args[1] = mount.dir.display().to_string();
        ca_args.extend(["--cluster-id".into(), name.into()]);
        let ca = TestCa::start(&ca_args).await;
        let trust = setup.dir.path().join("istio-ca-root-cert.pem");
        std::fs::write(&trust, bundle).unwrap();
        let mut args = setup.agent_args(
            &ca,
            "mesh",
            sa,
            &["--secret-ttl", "4s", "--cluster-id", name],
        );
        args[3] = trust.display().to_string();
        let (http, stop, handle) = start_agent(&args).await;
        wait_ready(http).await;
        Self {
            setup,
            mount,
            trust,
            ca,
            agent: Some((stop, handle)),
            sa,
        }
    }

    /// A step of the procedure in this cluster: new key material for the CA, and
    /// the bundle pods trust the CA with.
    fn roll(&mut self, set: &Path, bundle: &str) {
        self.mount.publish(set);
        std::fs::write(&self.trust, bundle).unwrap();
    }

    fn socket(&self) -> std::path::PathBuf {
        self.setup.socket(self.sa)
    }

    async fn stop(mut self) {
        if let Some((stop, handle)) = self.agent.take() {
            let _ = stop.send(());
            handle.await.unwrap();
        }
        self.ca.stop().await;
    }
}

/// What a workload's agent serves: (chain, key, roots).
type Served = (String, String, String);
/// A condition on what an agent serves.
type Check = Box<dyn Fn(&Served) -> bool + Send>;

fn issuer_of(chain_pem: &str) -> String {
    with_cert(chain_pem, |c| c.issuer().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_in_four_steps_without_a_failed_handshake() {
    use signet_e2e::TestRoot;
    let staged = tempfile::tempdir().unwrap();
    let s = staged.path();
    let old_root = TestRoot::p256("Old Root");
    let new_root = TestRoot::p256("New Root");
    let both = old_root.pem.clone() + &new_root.pem;
    let key = || rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let (east_old_key, west_old_key) = (key(), key());
    // Step 1 sets: each cluster's intermediate under the old root, old root only.
    old_root.write_cacerts(&s.join("east1"), "East Old", &east_old_key, Some(0), &[]);
    old_root.write_cacerts(&s.join("west1"), "West Old", &west_old_key, Some(0), &[]);
    // Step 2: same intermediates, both roots bundled.
    old_root.write_cacerts(
        &s.join("east2"),
        "East Old",
        &east_old_key,
        Some(0),
        &[&old_root.pem, &new_root.pem],
    );
    old_root.write_cacerts(
        &s.join("west2"),
        "West Old",
        &west_old_key,
        Some(0),
        &[&old_root.pem, &new_root.pem],
    );
    // Step 3: new intermediates under the new root, both roots still bundled.
    let (east_new_key, west_new_key) = (key(), key());
    new_root.write_cacerts(
        &s.join("east3"),
        "East New",
        &east_new_key,
        Some(0),
        &[&old_root.pem, &new_root.pem],
    );
    new_root.write_cacerts(
        &s.join("west3"),
        "West New",
        &west_new_key,
        Some(0),
        &[&old_root.pem, &new_root.pem],
    );
    // Step 4: the old root dropped.
    new_root.write_cacerts(&s.join("east4"), "East New", &east_new_key, Some(0), &[]);
    new_root.write_cacerts(&s.join("west4"), "West New", &west_new_key, Some(0), &[]);

    let mut east = Cluster::start("east", "frontend", &s.join("east1"), &old_root.pem).await;
    let mut west = Cluster::start("west", "backend", &s.join("west1"), &old_root.pem).await;
    let fe = "spiffe://cluster.local/ns/mesh/sa/frontend".to_string();
    let be = "spiffe://cluster.local/ns/mesh/sa/backend".to_string();

    // Workloads keep connecting to each other, in both directions, with exactly
    // what their agents serve at that moment, for the whole procedure.
    let (sockets, ids) = ((east.socket(), west.socket()), (fe.clone(), be.clone()));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let traffic = {
        let running = running.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let a = served(&sockets.0).await;
                let b = served(&sockets.1).await;
                for (srv, cli, srv_id, cli_id) in
                    [(&b, &a, &ids.1, &ids.0), (&a, &b, &ids.0, &ids.1)]
                {
                    match handshake(srv, cli, srv_id, cli_id).await {
                        Ok(()) => ok += 1,
                        Err(e) => failed.push(format!(
                            "{e} (server issued by {}, client by {})",
                            issuer_of(&srv.0),
                            issuer_of(&cli.0)
                        )),
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failed)
        })
    };

    let wait_for = |socket: std::path::PathBuf, what: &'static str, want: Check| async move {
        for _ in 0..200 {
            if want(&served(&socket).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} never reached: {what}", socket.display());
    };
    let roots_count = |n: usize| -> Check {
        Box::new(move |x| ::pem::parse_many(&x.2).map(|p| p.len()) == Ok(n))
    };
    let issued_by = |cn: &'static str| -> Check { Box::new(move |x| issuer_of(&x.0).contains(cn)) };

    // Step 1 runs for a moment, then step 2: bundles grow, ROOTCA follows without restarts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    east.roll(&s.join("east2"), &both);
    west.roll(&s.join("west2"), &both);
    wait_for(east.socket(), "ROOTCA with both roots", roots_count(2)).await;
    wait_for(west.socket(), "ROOTCA with both roots", roots_count(2)).await;

    // Step 3: new intermediates; new leaves chain to the new root.
    east.roll(&s.join("east3"), &both);
    west.roll(&s.join("west3"), &both);
    wait_for(east.socket(), "a leaf from East New", issued_by("East New")).await;
    wait_for(west.socket(), "a leaf from West New", issued_by("West New")).await;
    // Every leaf issued under the old root expires within one lifetime (4 s).
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Step 4: the old root goes.
    east.roll(&s.join("east4"), &new_root.pem);
    west.roll(&s.join("west4"), &new_root.pem);
    wait_for(
        east.socket(),
        "ROOTCA with the new root only",
        roots_count(1),
    )
    .await;
    wait_for(
        west.socket(),
        "ROOTCA with the new root only",
        roots_count(1),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed handshakes of {}: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 20, "only {ok} handshakes");
    let final_east = served(&east.socket()).await;
    assert!(issuer_of(&final_east.0).contains("East New"));

    // The opposite: a workload still holding a leaf under the old root is refused by
    // a peer whose bundle dropped that root too early.
    let stale = {
        // A leaf under the old root, as served before step 3.
        let now = time::OffsetDateTime::now_utc();
        let signer = signet_ca::signer::Signer::new(
            signet_ca::cacerts::load_dir(&s.join("east2"))
                .unwrap()
                .unwrap(),
            now,
        )
        .unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        use rcgen::PublicKeyData;
        let chain = signer
            .sign(
                &key.subject_public_key_info(),
                &spiffe::SpiffeId::new(&fe).unwrap(),
                time::Duration::hours(1),
                now,
            )
            .unwrap()
            .cert_chain;
        (
            chain[0].clone() + &chain[1],
            key.serialize_pem(),
            both.clone(),
        )
    };
    let west_now = served(&west.socket()).await;
    let refused = handshake(&west_now, &stale, &be, &fe).await;
    assert!(
        refused.is_err(),
        "an old-root leaf must fail against a bundle without the old root"
    );

    east.stop().await;
    west.stop().await;
}
