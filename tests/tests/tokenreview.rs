//! TokenReview through the real `kube` client against the stateful test API server
//! (`signet_e2e::kube::KubeApi`), which verifies real RS256 tokens against its JWKS
//! and their audiences and answers TokenReview JSON, as an API server does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, time::Duration};

use axum::http::Method;
use signet_e2e::{
    JwtIssuer, TestCa, csr, eventually,
    kube::{KubeApi, TokenReviews},
    openssl_verify, request, uri_sans,
};
use tokio::net::TcpListener;

/// The test API server answering TokenReviews as `reviews` says, for tokens of
/// `issuer`.
async fn api_server(issuer: &JwtIssuer, reviews: TokenReviews) -> KubeApi {
    let api = KubeApi::start().await;
    api.set_jwks(&issuer.jwks.to_string());
    api.serve_token_reviews(reviews);
    api
}

fn ca_args(dir: &Path, kubeconfig: &Path) -> Vec<String> {
    vec![
        "--cacerts-dir".into(),
        dir.join("none").display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ]
}

async fn start_ca(dir: &Path, kubeconfig: &Path) -> (TestCa, String) {
    let ca = TestCa::start(&ca_args(dir, kubeconfig)).await;
    let root = std::fs::read_to_string(dir.join("state/root-cert.pem")).unwrap();
    (ca, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenreview_accepts_service_accounts_and_caches() {
    let issuer = JwtIssuer::rsa("k1");
    let dir = tempfile::tempdir().unwrap();
    let api = api_server(&issuer, TokenReviews::default()).await;
    let (ca, root) = start_ca(dir.path(), &api.kubeconfig(dir.path())).await;
    let mut client = ca.client(&root).await;

    let token = issuer.token("shop", "cart");
    let (_, pem) = csr(None);
    let chain = client
        .create_certificate(request(&pem, Some(&token), 0))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    assert_eq!(
        uri_sans(&chain[0]),
        vec!["spiffe://cluster.local/ns/shop/sa/cart"]
    );
    openssl_verify(&chain).unwrap();
    assert_eq!(api.calls("POST tokenreviews"), 1);
    // Same token again: answered from the cache.
    client
        .create_certificate(request(&pem, Some(&token), 0))
        .await
        .unwrap();
    assert_eq!(api.calls("POST tokenreviews"), 1);

    // Wrong audience, expired, signed by another key: UNAUTHENTICATED, never the
    // token, and never the API server's own words (those go to the CA's log). The
    // first two are refused without a review: their claims already say no.
    let other = JwtIssuer::rsa("k1");
    let bad_tokens = [
        issuer.token_with("shop", "cart", signet_e2e::ISSUER, &["other"], 3600),
        issuer.token_with("shop", "cart", signet_e2e::ISSUER, &["istio-ca"], -600),
        other.token("shop", "cart"),
    ];
    let reasons = [
        "none of the audiences",
        "has expired",
        "did not authenticate",
    ];
    for (bad, reason) in bad_tokens.iter().zip(reasons) {
        let status = client
            .create_certificate(request(&pem, Some(bad), 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains(reason), "{}", status.message());
        assert!(
            !status.message().contains("invalid bearer token"),
            "{}",
            status.message()
        );
        assert!(!status.message().contains(bad.as_str()));
    }
    assert_eq!(
        api.calls("POST tokenreviews"),
        2,
        "only the forged token was reviewed"
    );
    // A refused token replayed is refused again without another review.
    let reviews = api.calls("POST tokenreviews");
    for _ in 0..5 {
        let status = client
            .create_certificate(request(&pem, Some(&bad_tokens[0]), 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    assert_eq!(api.calls("POST tokenreviews"), reviews);
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_audiences_does_not_authenticate() {
    let issuer = JwtIssuer::rsa("k1");
    let dir = tempfile::tempdir().unwrap();
    let api = api_server(
        &issuer,
        TokenReviews {
            audiences: false,
            ..TokenReviews::default()
        },
    )
    .await;
    let (ca, root) = start_ca(dir.path(), &api.kubeconfig(dir.path())).await;
    let mut client = ca.client(&root).await;
    let token = issuer.token("shop", "cart");
    let (_, pem) = csr(None);
    let status = client
        .create_certificate(request(&pem, Some(&token), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("audiences"),
        "{}",
        status.message()
    );
    assert_eq!(api.calls("POST tokenreviews"), 1);
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_trouble_is_unavailable_never_success() {
    let issuer = JwtIssuer::rsa("k1");
    let dir = tempfile::tempdir().unwrap();
    // The API server refuses the CA (RBAC missing): UNAVAILABLE.
    let api = api_server(&issuer, TokenReviews::default()).await;
    api.inject(Method::POST, "tokenreviews", 403, usize::MAX);
    let (ca, root) = start_ca(dir.path(), &api.kubeconfig(dir.path())).await;
    let mut client = ca.client(&root).await;
    let token = issuer.token("shop", "cart");
    let (_, pem) = csr(None);
    let status = client
        .create_certificate(request(&pem, Some(&token), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("could not review"),
        "{}",
        status.message()
    );
    assert!(
        !status.message().contains("403") && !status.message().contains("Forbidden"),
        "the API server's answer reached the caller: {}",
        status.message()
    );
    assert!(api.calls("POST tokenreviews") >= 1);
    // The API server answers its probe (refusing reviews is the CA's RBAC, not an
    // outage): ready.
    assert_eq!(ca.metric("signet_ca_api_server_up").await, Some(1.0));
    ca.stop().await;

    // The API server is gone: the CA is not ready, so the Service sends callers to
    // replicas that can review their tokens; the probe's metrics say why; a request
    // that still arrives gets UNAVAILABLE.
    let dir = tempfile::tempdir().unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    // A kubeconfig as before, for a port nothing listens on.
    let kubeconfig = api.kubeconfig(dir.path());
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    std::fs::write(
        &kubeconfig,
        text.replace(&api.addr.to_string(), &closed.to_string()),
    )
    .unwrap();
    let ca = TestCa::start_unready(
        &ca_args(dir.path(), &kubeconfig),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let why = eventually(
        Duration::from_secs(30),
        "/readyz to name the API server",
        async || {
            let (code, body) = ca.http_get("/readyz").await.ok()?;
            (code == 503 && body.contains("API server")).then_some(body)
        },
    )
    .await;
    assert!(why.contains("tokens cannot be reviewed"), "{why}");
    assert_eq!(ca.metric("signet_ca_api_server_up").await, Some(0.0));
    assert!(
        ca.metric("signet_ca_api_server_probe_failures_total")
            .await
            .unwrap()
            >= 1.0
    );
    let root = std::fs::read_to_string(dir.path().join("state/root-cert.pem")).unwrap();
    let mut client = ca.client(&root).await;
    let status = client
        .create_certificate(request(&pem, Some(&token), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    ca.stop().await;
}

/// An API server that rate-limits TokenReviews (429, as API Priority and Fairness
/// answers) is not retried by the CA: the caller hears UNAVAILABLE at once and backs
/// off itself, and for a second after a 429 no review is sent at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_api_server_is_unavailable_at_once_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = JwtIssuer::new("k1");
    // One review a second, a bucket one deep.
    let api = api_server(
        &issuer,
        TokenReviews {
            latency: Duration::from_millis(5),
            per_second: 1,
            ..TokenReviews::default()
        },
    )
    .await;
    let (ca, root) = start_ca(dir.path(), &api.kubeconfig(dir.path())).await;
    let mut client = ca.client(&root).await;
    let (_, pem) = csr(None);
    let mut ask = async |sa: &str| {
        let token = issuer.token("shop", sa);
        let started = std::time::Instant::now();
        let result = client
            .create_certificate(request(&pem, Some(&token), 0))
            .await;
        (result.map(|_| ()).map_err(|s| s.code()), started.elapsed())
    };

    assert_eq!(ask("a").await.0, Ok(()));
    // The bucket is empty: 429, UNAVAILABLE without kube's own retries (which began
    // at 5 ms and went on for 15 attempts).
    let (second, took) = ask("b").await;
    assert_eq!(second, Err(tonic::Code::Unavailable));
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(api.calls("POST tokenreviews"), 2);
    assert_eq!(api.calls("429 tokenreviews"), 1);
    // Within the pause: refused without asking.
    assert_eq!(ask("c").await.0, Err(tonic::Code::Unavailable));
    assert_eq!(api.calls("POST tokenreviews"), 2);
    // A trickle still goes out during the pause (one review every 250 ms); the
    // bucket is still empty, so it is answered 429 and the pause goes on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ask("c2").await.0, Err(tonic::Code::Unavailable));
    assert_eq!(api.calls("POST tokenreviews"), 3);
    assert_eq!(api.calls("429 tokenreviews"), 2);
    // After it, reviews resume.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(ask("d").await.0, Ok(()));
    assert_eq!(api.calls("POST tokenreviews"), 4);
    ca.stop().await;
}

/// The attack from the security report: an API server answering in 300 ms, and one
/// address sending 240 requests with tokens that look right but that no API server
/// accepts (another key), while six new pods ask for their first certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_callers_cannot_take_the_review_slots_or_push_real_callers_back() {
    let issuer = JwtIssuer::rsa("k1");
    let forger = JwtIssuer::rsa("forged");
    let dir = tempfile::tempdir().unwrap();
    let api = api_server(
        &issuer,
        TokenReviews {
            latency: Duration::from_millis(300),
            ..TokenReviews::default()
        },
    )
    .await;
    let (ca, root) = start_ca(dir.path(), &api.kubeconfig(dir.path())).await;
    let (_, pem) = csr(None);

    let mut attackers = Vec::new();
    for c in 0..3 {
        let client = signet_e2e::client_from(ca.grpc, &root, "127.0.0.2").await;
        for i in 0..80 {
            let mut client = client.clone();
            let token = forger.token("shop", &format!("x{c}-{i}"));
            let pem = pem.clone();
            attackers.push(tokio::spawn(async move {
                client
                    .create_certificate(request(&pem, Some(&token), 0))
                    .await
            }));
        }
    }
    // Let the flood take what it can.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut pods = Vec::new();
    for i in 0..6 {
        let mut client = signet_e2e::client_from(ca.grpc, &root, "127.0.0.3").await;
        let token = issuer.token("shop", &format!("pod{i}"));
        let pem = pem.clone();
        pods.push(tokio::spawn(async move {
            client
                .create_certificate(request(&pem, Some(&token), 0))
                .await
        }));
    }
    for pod in pods {
        let answer = tokio::time::timeout(Duration::from_secs(20), pod)
            .await
            .expect("a pod's first request took over 20 s")
            .unwrap();
        assert!(
            answer.is_ok(),
            "a new pod's first request failed: {answer:?}"
        );
    }
    let mut throttled = 0;
    for a in attackers {
        let status = tokio::time::timeout(Duration::from_secs(20), a)
            .await
            .expect("an attacker's request took over 20 s")
            .unwrap()
            .unwrap_err();
        // Refused before authentication: no retry slot booked for them, so at most
        // the unbooked spread (10 s) when they get a pushback at all.
        if let Some(ms) = status.metadata().get("grpc-retry-pushback-ms") {
            let ms: u64 = ms.to_str().unwrap().parse().unwrap();
            assert!(ms <= 10_000, "{ms} ms");
        }
        if status.code() == tonic::Code::Unavailable {
            throttled += 1;
        }
    }
    // The address held at most its quarter of the 64 slots at a time.
    assert!(throttled > 0, "the flood was never held to its share");
    assert!(
        api.most_reviews_in_flight() <= 16 + 6,
        "{}",
        api.most_reviews_in_flight()
    );
    ca.stop().await;
}
