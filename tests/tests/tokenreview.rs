//! TokenReview through the real `kube` client against a Kubernetes-shaped HTTPS
//! endpoint started here: it verifies real RS256 tokens and their audiences and
//! answers TokenReview JSON, as an API server does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{Json, Router, extract::State, http::HeaderMap, routing::post};
use base64::Engine;
use serde_json::{Value, json};
use signet_e2e::{TestCa, csr, https_server, openssl_verify, request, sh, uri_sans};
use tokio::net::TcpListener;

const API_TOKEN: &str = "signet-ca-service-account-token";

struct ApiServer {
    verify_key: jsonwebtoken::DecodingKey,
    reviews: AtomicUsize,
    mode: Mode,
}

/// How the test API server answers.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// As Kubernetes does.
    Normal,
    /// 403 to every review (the CA's RBAC is missing).
    Refuse,
    /// Authenticated, but `status.audiences` left empty (the report's finding 5).
    NoAudiences,
}

/// The RSA key tokens are signed with (openssl-made, since ring cannot generate RSA).
struct RsaKey {
    pkcs1_der: Vec<u8>,
    public_pkcs1_der: Vec<u8>,
}

fn rsa_key() -> RsaKey {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        "openssl genrsa -traditional -out k.pem 2048 2>/dev/null && openssl rsa -in k.pem -traditional -outform DER -out k.der 2>/dev/null && openssl rsa -in k.pem -RSAPublicKey_out -outform DER -out pub.der 2>/dev/null",
        d,
    );
    RsaKey {
        pkcs1_der: std::fs::read(d.join("k.der")).unwrap(),
        public_pkcs1_der: std::fs::read(d.join("pub.der")).unwrap(),
    }
}

fn sa_token(key: &RsaKey, ns: &str, sa: &str, aud: &[&str], exp_in: i64) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({
        "iss": "https://kubernetes.default.svc", "aud": aud,
        "sub": format!("system:serviceaccount:{ns}:{sa}"), "exp": now + exp_in, "iat": now,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "u"}, "pod": {"name": "web-0", "uid": "p"}},
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_der(&key.pkcs1_der),
    )
    .unwrap()
}

async fn token_review(
    State(api): State<Arc<ApiServer>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (axum::http::StatusCode, Json<Value>) {
    api.reviews.fetch_add(1, Ordering::SeqCst);
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {API_TOKEN}"))
        || api.mode == Mode::Refuse
    {
        return (
            axum::http::StatusCode::FORBIDDEN,
            Json(
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                        "message": "tokenreviews.authentication.k8s.io is forbidden"}),
            ),
        );
    }
    assert_eq!(body["kind"], "TokenReview");
    assert_eq!(body["apiVersion"], "authentication.k8s.io/v1");
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let wanted = signet_e2e::kube::review_audiences(&body);
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&wanted);
    validation.set_issuer(&["https://kubernetes.default.svc"]);
    let status = match jsonwebtoken::decode::<Value>(token, &api.verify_key, &validation) {
        Ok(data) => {
            let c = data.claims;
            let aud: Vec<Value> = match &c["aud"] {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            json!({
                "authenticated": true,
                "audiences": if api.mode == Mode::NoAudiences { vec![] } else {
                    aud.into_iter().filter(|a| wanted.iter().any(|w| a == w)).collect::<Vec<_>>()
                },
                "user": {
                    "username": c["sub"], "uid": "u",
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", c["kubernetes.io"]["namespace"].as_str().unwrap())],
                    "extra": {"authentication.kubernetes.io/pod-name": [c["kubernetes.io"]["pod"]["name"]]},
                },
            })
        }
        Err(e) => json!({"authenticated": false, "error": format!("[invalid bearer token, {e}]")}),
    };
    (
        axum::http::StatusCode::CREATED,
        Json(
            json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {}, "spec": body["spec"], "status": status}),
        ),
    )
}

/// Starts the API server and writes a kubeconfig that trusts its CA.
async fn api_server(key: &RsaKey, dir: &Path, mode: Mode) -> (Arc<ApiServer>, std::path::PathBuf) {
    let state = Arc::new(ApiServer {
        verify_key: jsonwebtoken::DecodingKey::from_rsa_der(&key.public_pkcs1_der),
        reviews: AtomicUsize::new(0),
        mode,
    });
    let app = Router::new()
        .route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(token_review),
        )
        .with_state(state.clone());
    let (addr, ca_pem) = https_server(app).await;
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &format!("https://{addr}"), &ca_pem);
    (state, kubeconfig)
}

fn write_kubeconfig(path: &Path, server: &str, ca_pem: &str) {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: signet-ca\n  user:\n    token: {API_TOKEN}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: signet-ca\ncurrent-context: test\n"
        ),
    )
    .unwrap();
}

async fn start_ca(dir: &Path, kubeconfig: &Path) -> (TestCa, String) {
    let ca = TestCa::start(&[
        "--cacerts-dir".into(),
        dir.join("none").display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ])
    .await;
    let root = std::fs::read_to_string(dir.join("state/root-cert.pem")).unwrap();
    (ca, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenreview_accepts_service_accounts_and_caches() {
    let key = rsa_key();
    let dir = tempfile::tempdir().unwrap();
    let (api, kubeconfig) = api_server(&key, dir.path(), Mode::Normal).await;
    let (ca, root) = start_ca(dir.path(), &kubeconfig).await;
    let mut client = ca.client(&root).await;

    let token = sa_token(&key, "shop", "cart", &["istio-ca"], 3600);
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
    assert_eq!(api.reviews.load(Ordering::SeqCst), 1);
    // Same token again: answered from the cache.
    client
        .create_certificate(request(&pem, Some(&token), 0))
        .await
        .unwrap();
    assert_eq!(api.reviews.load(Ordering::SeqCst), 1);

    // Wrong audience, expired, signed by another key: UNAUTHENTICATED, never the
    // token, and never the API server's own words (those go to the CA's log).
    let other = rsa_key();
    let bad_tokens = [
        sa_token(&key, "shop", "cart", &["other"], 3600),
        sa_token(&key, "shop", "cart", &["istio-ca"], -600),
        sa_token(&other, "shop", "cart", &["istio-ca"], 3600),
    ];
    for bad in &bad_tokens {
        let status = client
            .create_certificate(request(&pem, Some(bad), 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains("did not authenticate"),
            "{}",
            status.message()
        );
        assert!(
            !status.message().contains("invalid bearer token"),
            "{}",
            status.message()
        );
        assert!(!status.message().contains(bad.as_str()));
    }
    // A refused token replayed is refused again without another review.
    let reviews = api.reviews.load(Ordering::SeqCst);
    for _ in 0..5 {
        let status = client
            .create_certificate(request(&pem, Some(&bad_tokens[0]), 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    }
    assert_eq!(api.reviews.load(Ordering::SeqCst), reviews);
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_audiences_does_not_authenticate() {
    let key = rsa_key();
    let dir = tempfile::tempdir().unwrap();
    let (api, kubeconfig) = api_server(&key, dir.path(), Mode::NoAudiences).await;
    let (ca, root) = start_ca(dir.path(), &kubeconfig).await;
    let mut client = ca.client(&root).await;
    let token = sa_token(&key, "shop", "cart", &["istio-ca"], 3600);
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
    assert_eq!(api.reviews.load(Ordering::SeqCst), 1);
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_trouble_is_unavailable_never_success() {
    let key = rsa_key();
    let dir = tempfile::tempdir().unwrap();
    // The API server refuses the CA (RBAC missing): UNAVAILABLE.
    let (_, kubeconfig) = api_server(&key, dir.path(), Mode::Refuse).await;
    let (ca, root) = start_ca(dir.path(), &kubeconfig).await;
    let mut client = ca.client(&root).await;
    let token = sa_token(&key, "shop", "cart", &["istio-ca"], 3600);
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
        !status.message().contains("403") && !status.message().contains("forbidden"),
        "the API server's answer reached the caller: {}",
        status.message()
    );
    ca.stop().await;

    // The API server is gone: UNAVAILABLE.
    let dir = tempfile::tempdir().unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(&kubeconfig, &format!("https://{closed}"), "");
    let (ca, root) = start_ca(dir.path(), &kubeconfig).await;
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
    use signet_e2e::{JwtIssuer, kube::KubeApi, kube::TokenReviews};
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let issuer = JwtIssuer::new("k1");
    api.set_jwks(&issuer.jwks.to_string());
    // One review a second, a bucket one deep.
    api.serve_token_reviews(TokenReviews {
        latency: std::time::Duration::from_millis(5),
        per_second: 1,
    });
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
    assert!(took < std::time::Duration::from_millis(500), "{took:?}");
    assert_eq!(api.calls("POST tokenreviews"), 2);
    assert_eq!(api.calls("429 tokenreviews"), 1);
    // Within the pause: refused without asking.
    assert_eq!(ask("c").await.0, Err(tonic::Code::Unavailable));
    assert_eq!(api.calls("POST tokenreviews"), 2);
    // After it, reviews resume.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(ask("d").await.0, Ok(()));
    assert_eq!(api.calls("POST tokenreviews"), 3);
    ca.stop().await;
}
