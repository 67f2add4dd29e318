//! The CA server end to end with our own Rust client (tonic over rustls): issuing,
//! renewal with a client certificate, gRPC health, overload, and key-material reload
//! through a kubelet-style `..data` swap.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rcgen::KeyPair;
use signet_e2e::{
    JwtIssuer, SecretMount, TestCa, TestRoot, client, csr, jwt_ca_args, metric, openssl_verify,
    request, uri_sans, with_cert,
};

fn issuer_cn(pem: &str) -> String {
    with_cert(pem, |c| c.issuer().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_renews_with_client_cert_and_reports_health() {
    let dir = tempfile::tempdir().unwrap();
    let jwt = JwtIssuer::new("k1");
    let ca = TestCa::start(&jwt_ca_args(dir.path(), &jwt, &dir.path().join("none"))).await;
    let root = std::fs::read_to_string(dir.path().join("state/root-cert.pem")).unwrap();
    let mut c = ca.client(&root).await;

    let (key, pem) = csr(Some("spiffe://cluster.local/ns/web/sa/frontend"));
    let chain = c
        .create_certificate(request(&pem, Some(&jwt.token("web", "frontend")), 600))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(chain.len(), 2);
    openssl_verify(&chain).unwrap();

    // Renewal: the issued certificate authenticates the next request on its own.
    let mut renewing = client(ca.grpc, &root, Some((&chain[0], &key.serialize_pem()))).await;
    let (_, pem2) = csr(None);
    let renewed = renewing
        .create_certificate(request(&pem2, None, 600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        uri_sans(&renewed.cert_chain[0]),
        vec!["spiffe://cluster.local/ns/web/sa/frontend"]
    );

    // Standard gRPC health service.
    let channel = tonic::transport::Channel::from_shared(format!("https://{}", ca.grpc))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&root))
                .domain_name(signet_e2e::SERVER_NAME),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "istio.v1.auth.IstioCertificateService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // The audit trail counts it.
    let metrics = ca.metrics().await;
    assert_eq!(
        metric(&metrics, "citadel_server_success_cert_issuance_count"),
        Some(2.0),
        "{metrics}"
    );
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_promptly_with_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let jwt = JwtIssuer::new("k1");
    // An RSA-4096 intermediate: each signature takes milliseconds, so 64 requests
    // released at once are bound to find the one worker busy and the one slot taken.
    let root = TestRoot::p256("Overload Root");
    signet_e2e::sh(
        "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:4096 -out k.pem 2>/dev/null",
        dir.path(),
    );
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("k.pem")).unwrap()).unwrap();
    root.write_cacerts(
        &dir.path().join("cacerts"),
        "Slow Intermediate",
        &ca_key,
        Some(0),
        &[],
    );
    let mut args = jwt_ca_args(dir.path(), &jwt, &dir.path().join("cacerts"));
    args.extend([
        "--signing-threads".into(),
        "1".into(),
        "--max-pending".into(),
        "1".into(),
    ]);
    let ca = TestCa::start(&args).await;
    let token = jwt.token("a", "b");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = ca.client(&root.pem).await;
        let token = token.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let (_, pem) = csr(None);
            barrier.wait().await;
            let started = std::time::Instant::now();
            let result = c
                .create_certificate(request(&pem, Some(&token), 0))
                .await
                .map(|_| ())
                .map_err(|s| s.code());
            (result, started.elapsed())
        }));
    }
    let mut ok = 0;
    let mut exhausted = 0;
    for t in tasks {
        match t.await.unwrap() {
            (Ok(()), _) => ok += 1,
            (Err(tonic::Code::ResourceExhausted), took) => {
                exhausted += 1;
                // Refused at once, not after waiting in line.
                assert!(took < Duration::from_secs(2), "{took:?}");
            }
            (Err(other), _) => panic!("unexpected {other:?}"),
        }
    }
    assert!(ok >= 1, "some requests must succeed");
    assert!(
        exhausted >= 1,
        "a one-slot queue must refuse some of 64 concurrent requests ({ok} succeeded)"
    );
    let metrics = ca.metrics().await;
    // Each refusal is counted once: as a full queue, or as the caller's share of it
    // (all 64 requests come from one service account).
    let full = metric(&metrics, "signet_ca_overload_rejections_total").unwrap_or(0.0);
    let share = metric(
        &metrics,
        r#"signet_ca_limit_rejections_total{limit="caller_share"}"#,
    )
    .unwrap_or(0.0);
    assert_eq!(full + share, exhausted as f64, "{metrics}");
    ca.stop().await;
}

/// Waits (60 s at most, generous for a loaded machine) until a new certificate is
/// issued by `want`.
async fn wait_for_issuer(ca: &TestCa, root: &str, jwt: &JwtIssuer, want: &str) -> String {
    let what = format!("a certificate issued by {want}");
    signet_e2e::eventually(Duration::from_secs(60), &what, async || {
        let mut c = ca.client(root).await;
        let (_, pem) = csr(None);
        let chain = c
            .create_certificate(request(&pem, Some(&jwt.token("ns", "sa")), 0))
            .await
            .unwrap()
            .into_inner()
            .cert_chain;
        let issuer = issuer_cn(&chain[0]);
        issuer.contains(want).then(|| {
            openssl_verify(&chain).unwrap();
            issuer
        })
    })
    .await
}

/// The number of refused reloads the CA has counted.
async fn reload_failures(ca: &TestCa) -> f64 {
    ca.metric(r#"signet_ca_cacerts_reloads_total{result="failure"}"#)
        .await
        .unwrap_or(0.0)
}

/// Waits (60 s at most, generous for a loaded machine) until the CA has counted
/// `more` refused reloads beyond `before`.
async fn until_reload_failures(ca: &TestCa, before: f64, more: f64) {
    signet_e2e::eventually(
        Duration::from_secs(60),
        "the CA to look at the new set",
        async || (reload_failures(ca).await >= before + more).then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_valid_sets_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let jwt = JwtIssuer::new("k1");
    let root = TestRoot::p256("Root One");
    let staged = dir.path().join("staged");
    let key = || KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    root.write_cacerts(&staged.join("a"), "Intermediate A", &key(), Some(0), &[]);
    root.write_cacerts(&staged.join("b"), "Intermediate B", &key(), Some(0), &[]);
    let mut mount = SecretMount::new(&dir.path().join("cacerts"));
    mount.publish(&staged.join("a"));

    let ca = TestCa::start(&jwt_ca_args(dir.path(), &jwt, &mount.dir)).await;
    wait_for_issuer(&ca, &root.pem, &jwt, "Intermediate A").await;

    // A new intermediate under the same root takes over without a restart.
    mount.publish(&staged.join("b"));
    wait_for_issuer(&ca, &root.pem, &jwt, "Intermediate B").await;

    // Garbage: refused, counted, and B keeps serving.
    let garbage = staged.join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        std::fs::write(garbage.join(f), "not a pem file").unwrap();
    }
    let failures = reload_failures(&ca).await;
    mount.publish(&garbage);
    // Refused at the next look (waited for rather than slept for).
    until_reload_failures(&ca, failures, 1.0).await;
    assert!(
        wait_for_issuer(&ca, &root.pem, &jwt, "Intermediate B")
            .await
            .contains("B")
    );
    let metrics = ca.metrics().await;
    let failures = metric(
        &metrics,
        r#"signet_ca_cacerts_reloads_total{result="failure"}"#,
    );
    assert!(failures.is_some_and(|n| n >= 1.0), "{metrics}");
    // One successful reload so far: B (A was loaded at start, not reloaded).
    assert_eq!(
        metric(
            &metrics,
            r#"signet_ca_cacerts_reloads_total{result="success"}"#
        ),
        Some(1.0),
        "{metrics}"
    );

    // A set under an unrelated root would strand every current certificate: refused.
    let other_root = TestRoot::p256("Root Two");
    other_root.write_cacerts(&staged.join("c"), "Intermediate C", &key(), Some(0), &[]);
    let failures = reload_failures(&ca).await;
    mount.publish(&staged.join("c"));
    // The garbage is refused at every look: two more refusals mean at least one
    // look read the new set (a look under way at the swap may have read the old).
    until_reload_failures(&ca, failures, 2.0).await;
    wait_for_issuer(&ca, &root.pem, &jwt, "Intermediate B").await;

    // The same set with both roots bundled is accepted, and answers carry both roots.
    other_root.write_cacerts(
        &staged.join("d"),
        "Intermediate D",
        &key(),
        Some(0),
        &[&root.pem, &other_root.pem],
    );
    mount.publish(&staged.join("d"));
    wait_for_issuer(
        &ca,
        &(root.pem.clone() + &other_root.pem),
        &jwt,
        "Intermediate D",
    )
    .await;
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_against_the_cluster_they_claim() {
    let dir = tempfile::tempdir().unwrap();
    let local = JwtIssuer::new("local");
    let east = JwtIssuer::new("east");
    let east_dir = dir.path().join("east");
    std::fs::create_dir_all(&east_dir).unwrap();
    let east_jwks = east.write_jwks(&east_dir);
    let mut args = jwt_ca_args(dir.path(), &local, &dir.path().join("none"));
    args.extend([
        "--remote-jwks".into(),
        format!("east=https://east.example,{}", east_jwks.display()),
        "--cluster-alias".into(),
        "Kubernetes-primary".into(),
        "--trust-domain-alias".into(),
        "old.example".into(),
    ]);
    let ca = TestCa::start(&args).await;
    let root = std::fs::read_to_string(dir.path().join("state/root-cert.pem")).unwrap();
    let mut c = ca.client(&root).await;
    let call = |token: String, cluster: &str, uri: Option<&str>| {
        let (_, pem) = csr(uri);
        let mut req = request(&pem, Some(&token), 0);
        if !cluster.is_empty() {
            req.metadata_mut()
                .insert("clusterid", cluster.parse().unwrap());
        }
        req
    };
    let east_token = east.token_with("shop", "cart", "https://east.example", &["istio-ca"], 600);

    // East's token, claimed as east: checked against east's JWKS.
    let chain = c
        .create_certificate(call(east_token.clone(), "east", None))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(
        uri_sans(&chain[0]),
        vec!["spiffe://cluster.local/ns/shop/sa/cart"]
    );
    // East's token presented as the local cluster, and the local token as east: refused.
    let e = c
        .create_certificate(call(east_token.clone(), "", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = c
        .create_certificate(call(local.token("shop", "cart"), "east", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // The local cluster under its alias.
    c.create_certificate(call(
        local.token("shop", "cart"),
        "Kubernetes-primary",
        None,
    ))
    .await
    .unwrap();
    let e = c
        .create_certificate(call(local.token("shop", "cart"), "west", None))
        .await
        .unwrap_err();
    // The caller is told which id is unknown, not which clusters exist.
    assert!(e.message().contains("\"west\""), "{}", e.message());
    assert!(
        !e.message().contains("east") && !e.message().contains("Kubernetes"),
        "{}",
        e.message()
    );

    // A CSR naming the alias trust domain is accepted; the certificate carries the primary.
    let chain = c
        .create_certificate(call(
            local.token("shop", "cart"),
            "",
            Some("spiffe://old.example/ns/shop/sa/cart"),
        ))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(
        uri_sans(&chain[0]),
        vec!["spiffe://cluster.local/ns/shop/sa/cart"]
    );
    let e = c
        .create_certificate(call(
            local.token("shop", "cart"),
            "",
            Some("spiffe://evil.example/ns/shop/sa/cart"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    ca.stop().await;
}
