//! Attacks from the security report against the CA port, each performed for real:
//! renewal by client certificate on a connection that outlived the certificate or
//! the trust bundle, session resumption, revoked serials, and connections that never
//! end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rcgen::KeyPair;
use signet_e2e::{
    JwtIssuer, RawTls, SecretMount, SelfSignedCa, TestCa, TestRoot, csr, jwt_ca_args, metric,
    request, serial, uri_sans, write_crl,
};

/// A certificate chain for `web/frontend` living `secs` seconds (leaf and
/// intermediates, as a client presents it), and its key (PEM).
async fn issue(ca: &TestCa, root: &str, jwt: &JwtIssuer, secs: i64) -> (String, String) {
    let (key, pem) = csr(None);
    let mut c = ca.client(root).await;
    let chain = c
        .create_certificate(request(&pem, Some(&jwt.token("web", "frontend")), secs))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    (chain[..chain.len() - 1].concat(), key.serialize_pem())
}

/// A renewal with no token, asking for 90 days as in the report.
fn renewal() -> tonic::Request<signet_proto::IstioCertificateRequest> {
    let (_, pem) = csr(None);
    request(&pem, None, 90 * 24 * 3600)
}

/// Sleeps until a second past the `notAfter` of the first certificate of `chain_pem`,
/// by the wall clock the CA checks it with: however slow the machine, it has expired.
async fn sleep_past_expiry(chain_pem: &str) {
    let not_after = signet_e2e::with_cert(chain_pem, |c| c.validity().not_after.timestamp());
    let end = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap() + 1);
    if let Ok(left) = end.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_kept_open_past_not_after_cannot_renew() {
    let SelfSignedCa {
        dir: _dir,
        jwt,
        ca,
        root,
    } = SelfSignedCa::start(&[]).await;
    // 10 s: room for a connection and a renewal before it expires on a loaded machine.
    let (cert, key) = issue(&ca, &root, &jwt, 10).await;

    let tls = RawTls::new(ca.grpc, &root, Some((&cert, &key)));
    let mut c = tls.client().await.unwrap();
    // While the certificate is valid it renews on its own.
    let renewed = c.create_certificate(renewal()).await.unwrap().into_inner();
    assert_eq!(
        uri_sans(&renewed.cert_chain[0]),
        vec!["spiffe://cluster.local/ns/web/sa/frontend"]
    );
    // The same connection, once the certificate has expired: nothing.
    sleep_past_expiry(&cert).await;
    let e = c.create_certificate(renewal()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("can no longer authenticate"), "{e:?}");
    assert_eq!(tls.connections(), 1, "one connection throughout");
    let metrics = ca.metrics().await;
    assert_eq!(
        metric(&metrics, "citadel_server_authentication_failure_count"),
        Some(1.0),
        "{metrics}"
    );
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_never_resumed_so_expiry_is_always_checked() {
    let SelfSignedCa {
        dir: _dir,
        jwt,
        ca,
        root,
    } = SelfSignedCa::start(&[]).await;
    // 10 s: room for two connections and renewals before it expires on a loaded machine.
    let (cert, key) = issue(&ca, &root, &jwt, 10).await;

    // Two connections from one client configuration (one resumption store) while
    // the certificate is valid: a server issuing tickets would let the second resume.
    let tls = RawTls::new(ca.grpc, &root, Some((&cert, &key)));
    tls.client()
        .await
        .unwrap()
        .create_certificate(renewal())
        .await
        .unwrap();
    tls.client()
        .await
        .unwrap()
        .create_certificate(renewal())
        .await
        .unwrap();
    // After expiry, the same store: the handshake or the request must fail.
    sleep_past_expiry(&cert).await;
    let after = match tls.client().await {
        Ok(mut c) => c.create_certificate(renewal()).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(after.is_err(), "an expired certificate renewed");
    let kinds = tls.handshakes.lock().unwrap().clone();
    assert!(kinds.len() >= 2, "{kinds:?}");
    assert!(
        kinds.iter().all(|k| *k == rustls::HandshakeKind::Full),
        "a session was resumed: {kinds:?}"
    );
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_root_change_old_connections_cannot_renew() {
    let dir = tempfile::tempdir().unwrap();
    let jwt = JwtIssuer::new("k1");
    let key = || KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let old_root = TestRoot::p256("Old Root");
    let new_root = TestRoot::p256("Unrelated Root");
    let staged = dir.path().join("staged");
    old_root.write_cacerts(
        &staged.join("old"),
        "Old Intermediate",
        &key(),
        Some(0),
        &[],
    );
    new_root.write_cacerts(
        &staged.join("new"),
        "New Intermediate",
        &key(),
        Some(0),
        &[],
    );
    let mut mount = SecretMount::new(&dir.path().join("cacerts"));
    mount.publish(&staged.join("old"));
    let mut args = jwt_ca_args(dir.path(), &jwt, &mount.dir);
    args.push("--allow-root-change".into());
    let ca = TestCa::start(&args).await;
    let (cert, key_pem) = issue(&ca, &old_root.pem, &jwt, 600).await;

    // Opened under the old root; both roots are trusted by this client, so it can
    // keep talking to the CA after the swap.
    let both = old_root.pem.clone() + &new_root.pem;
    let tls = RawTls::new(ca.grpc, &both, Some((&cert, &key_pem)));
    let mut c = tls.client().await.unwrap();
    c.create_certificate(renewal()).await.unwrap();

    mount.publish(&staged.join("new"));
    // Wait for the reload (60 s at most, generous for a loaded machine): a token
    // request is answered by the new intermediate.
    signet_e2e::eventually(
        Duration::from_secs(60),
        "the CA to load the new set",
        async || {
            let (_, pem) = csr(None);
            let chain = c
                .create_certificate(request(&pem, Some(&jwt.token("ns", "sa")), 0))
                .await
                .unwrap()
                .into_inner()
                .cert_chain;
            signet_e2e::with_cert(&chain[0], |c| c.issuer().to_string())
                .contains("New")
                .then_some(())
        },
    )
    .await;
    // The old-root certificate on the old connection no longer renews.
    let e = c.create_certificate(renewal()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert_eq!(tls.connections(), 1);
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_serial_cannot_renew() {
    let dir = tempfile::tempdir().unwrap();
    let jwt = JwtIssuer::new("k1");
    let root = TestRoot::p256("Root");
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let staged = dir.path().join("staged");
    root.write_cacerts(&staged.join("a"), "Intermediate", &ca_key, Some(0), &[]);
    let mut mount = SecretMount::new(&dir.path().join("cacerts"));
    mount.publish(&staged.join("a"));
    let ca = TestCa::start(&jwt_ca_args(dir.path(), &jwt, &mount.dir)).await;
    let (revoked, revoked_key) = issue(&ca, &root.pem, &jwt, 600).await;
    let (kept, kept_key) = issue(&ca, &root.pem, &jwt, 600).await;
    let tls_revoked = RawTls::new(ca.grpc, &root.pem, Some((&revoked, &revoked_key)));
    let mut c_revoked = tls_revoked.client().await.unwrap();
    c_revoked.create_certificate(renewal()).await.unwrap();

    // The same set, now with ca-crl.pem revoking the first certificate.
    let before = ca.metrics().await;
    write_crl(&staged.join("a"), &ca_key, &[serial(&revoked)]);
    mount.publish(&staged.join("a"));
    // Until the reload brings the list in (60 s at most, for a loaded machine).
    let e = signet_e2e::eventually(
        Duration::from_secs(60),
        "the revoked certificate to be refused",
        async || c_revoked.create_certificate(renewal()).await.err(),
    )
    .await;
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().to_lowercase().contains("revoked"), "{e:?}");
    let after = ca.metrics().await;
    assert_ne!(
        reloads(&before, "success"),
        reloads(&after, "success"),
        "the CRL came in by a reload"
    );
    // A new connection with the revoked certificate fails already at the handshake;
    // a certificate the list does not name still renews.
    let fresh = RawTls::new(ca.grpc, &root.pem, Some((&revoked, &revoked_key)));
    let refused_again = match fresh.client().await {
        Ok(mut c) => c.create_certificate(renewal()).await.is_err(),
        Err(_) => true,
    };
    assert!(refused_again);
    let mut c_kept = RawTls::new(ca.grpc, &root.pem, Some((&kept, &kept_key)))
        .client()
        .await
        .unwrap();
    c_kept.create_certificate(renewal()).await.unwrap();
    ca.stop().await;
}

/// The value of `signet_ca_cacerts_reloads_total{result=...}` (0 when absent).
fn reloads(metrics: &str, result: &str) -> f64 {
    metric(
        metrics,
        &format!("signet_ca_cacerts_reloads_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_closed_at_their_maximum_age() {
    let SelfSignedCa {
        dir: _dir,
        jwt,
        ca,
        root,
    } = SelfSignedCa::start(&["--max-connection-age", "1s"]).await;
    let tls = RawTls::new(ca.grpc, &root, None);
    let mut c = tls.client().await.unwrap();
    let token = jwt.token("web", "frontend");
    let (_, pem) = csr(None);
    c.create_certificate(request(&pem, Some(&token), 0))
        .await
        .unwrap();
    // The first connection is closed by the server at its maximum age (1 s); the
    // channel makes a new one, which answers. Polled rather than slept, for a loaded
    // machine, but bounded well below the hard cut at max age + 30 s grace, which would
    // pass too. A request racing the close may fail; the next one reconnects.
    signet_e2e::eventually(
        Duration::from_secs(20),
        "the old connection to be closed and a new one to answer",
        async || {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let (_, pem) = csr(None);
            let answered = c.create_certificate(request(&pem, Some(&token), 0)).await;
            (tls.connections() >= 2 && answered.is_ok()).then_some(())
        },
    )
    .await;
    ca.stop().await;
}

/// A TLS connection to the CA from `source` (a loopback address, so tests can play
/// several peers) that sends nothing after its handshake.
async fn held_tls(
    tls: &RawTls,
    ca: std::net::SocketAddr,
    source: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    let tcp = socket.connect(ca).await?;
    let name = rustls::pki_types::ServerName::try_from(signet_e2e::SERVER_NAME).unwrap();
    tokio_rustls::TlsConnector::from(tls.config())
        .connect(name, tcp)
        .await
}

/// `f`'s output, or a failed test naming `what` after 20 s.
async fn bounded<F: std::future::Future>(f: F, what: &str) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .unwrap_or_else(|_| panic!("{what} took over 20 s"))
}

/// Waits (20 s at most) until the server closes `conn`: a read that ends or fails.
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(conn: &mut S) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // The server's SETTINGS and pings: not a close.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_cannot_hold_every_connection() {
    let SelfSignedCa {
        dir: _dir,
        jwt,
        ca,
        root,
    } = SelfSignedCa::start(&[
        "--max-connections",
        "6",
        "--max-connections-per-peer",
        "3",
        "--peer-connection-share",
        "127.0.0.4=unlimited",
    ])
    .await;
    let tls = RawTls::new(ca.grpc, &root, None);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(held_tls(&tls, ca.grpc, "127.0.0.2").await.unwrap());
    }
    // Its fourth is closed at once: the handshake never completes.
    let fourth = held_tls(&tls, ca.grpc, "127.0.0.2").await;
    assert!(fourth.is_err(), "a peer opened more than its share");
    // Another peer gets its certificate meanwhile, over connections of its own.
    let token = jwt.token("web", "frontend");
    let (_, pem) = csr(None);
    let mut c = signet_e2e::client_from(ca.grpc, &root, "127.0.0.3").await;
    c.create_certificate(request(&pem, Some(&token), 0))
        .await
        .unwrap();
    // An address the operator named has no per-peer cap.
    for _ in 0..4 {
        held.push(held_tls(&tls, ca.grpc, "127.0.0.4").await.unwrap());
    }
    let metrics = ca.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"signet_ca_limit_rejections_total{limit="connections_per_peer"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_makes_room_by_closing_the_oldest_idle_connection() {
    let SelfSignedCa {
        dir: _dir,
        jwt,
        ca,
        root,
    } = SelfSignedCa::start(&["--max-connections", "4", "--max-connections-per-peer", "4"]).await;
    // The attack from the report, scaled down: one peer fills the pool and sends
    // nothing.
    let tls = RawTls::new(ca.grpc, &root, None);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(held_tls(&tls, ca.grpc, "127.0.0.2").await.unwrap());
    }
    // A workload still gets its certificate: the oldest idle connection makes room.
    let token = jwt.token("web", "frontend");
    let (_, pem) = csr(None);
    let mut c = signet_e2e::client_from(ca.grpc, &root, "127.0.0.3").await;
    c.create_certificate(request(&pem, Some(&token), 0))
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut held[0]).await,
        "the oldest idle connection stayed open"
    );
    assert!(
        ca.metric(r#"signet_ca_connections_closed_total{reason="evicted"}"#)
            .await
            >= Some(1.0)
    );
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_a_request_open_are_never_evicted() {
    let SelfSignedCa {
        dir: _dir,
        jwt: _,
        ca,
        root,
    } = SelfSignedCa::start(&["--max-connections", "2"]).await;
    // Two connections, each with a stream open (health Watch answers and stays open).
    let tls = RawTls::new(ca.grpc, &root, None);
    let mut watches = Vec::new();
    for _ in 0..2 {
        let watch = async {
            let mut health =
                tonic_health::pb::health_client::HealthClient::new(tls.channel().await.unwrap());
            let mut stream = health
                .watch(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            stream.message().await.unwrap().unwrap();
            (health, stream)
        };
        watches.push(bounded(watch, "a health watch").await);
    }
    let third = bounded(tls.client(), "a third connection").await;
    assert!(third.is_err(), "a third connection was accepted");
    let metrics = ca.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"signet_ca_limit_rejections_total{limit="connections"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"signet_ca_connections_closed_total{reason="evicted"}"#
        ),
        None,
        "{metrics}"
    );
    // A slot comes back when a connection closes.
    watches.remove(0);
    signet_e2e::eventually(
        Duration::from_secs(30),
        "the slot of a closed connection to be given back",
        async || bounded(tls.client(), "a connection").await.ok().map(drop),
    )
    .await;
    drop(watches);
    bounded(ca.stop(), "stopping the CA").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_request_is_cut() {
    let SelfSignedCa {
        dir: _dir,
        jwt: _,
        ca,
        root,
    } = SelfSignedCa::start(&["--first-request-timeout", "1s"]).await;
    let tls = RawTls::new(ca.grpc, &root, None);
    // Silent after the TLS handshake.
    let mut silent = held_tls(&tls, ca.grpc, "127.0.0.1").await.unwrap();
    // A real HTTP/2 client: sends its preface and SETTINGS and answers pings, but
    // never a request.
    let io = held_tls(&tls, ca.grpc, "127.0.0.1").await.unwrap();
    let (_send, h2_conn) = h2::client::handshake(io).await.unwrap();
    let started = std::time::Instant::now();
    assert!(
        closed_by_server(&mut silent).await,
        "a silent connection stayed open"
    );
    let ended = tokio::time::timeout(Duration::from_secs(20), h2_conn).await;
    assert!(
        ended.is_ok(),
        "an HTTP/2 connection without a request stayed open"
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(
        ca.metric(r#"signet_ca_connections_closed_total{reason="first_request_timeout"}"#)
            .await,
        Some(2.0)
    );
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_cut_and_clients_reconnect() {
    let SelfSignedCa {
        dir: _dir,
        jwt,
        ca,
        root,
    } = SelfSignedCa::start(&["--idle-timeout", "1s"]).await;
    // tonic's client pings every 200 ms while idle, and the server answers: the
    // connection carries traffic, but no request.
    let tls = RawTls::new(ca.grpc, &root, None);
    let mut c = tls.client().await.unwrap();
    let token = jwt.token("web", "frontend");
    let (_, pem) = csr(None);
    c.create_certificate(request(&pem, Some(&token), 0))
        .await
        .unwrap();
    let start = std::time::Instant::now();
    signet_e2e::eventually(
        Duration::from_secs(20),
        "the idle connection to be closed",
        async || {
            let closed = ca.metric(r#"signet_ca_connections_closed_total{reason="idle_timeout"}"#);
            (closed.await == Some(1.0)).then_some(())
        },
    )
    .await;
    assert!(start.elapsed() >= Duration::from_millis(800));
    // The next call reconnects by itself.
    let (_, pem) = csr(None);
    c.create_certificate(request(&pem, Some(&token), 0))
        .await
        .unwrap();
    assert_eq!(tls.connections(), 2);
    ca.stop().await;
}
