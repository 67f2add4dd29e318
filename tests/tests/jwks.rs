//! Offline token checks against a JWKS served over HTTPS, the way an API server's
//! `/openid/v1/jwks` is: refresh in the background without holding up verification,
//! a new signing key picked up by its first token, fail-closed keys once they cannot
//! be refreshed, the size limit on a body without a length, and redirects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use signet_ca::issue::authn::{
    JwksError, JwksSource, JwtAuthenticator, JwtConfig, ReviewError, Token,
};
use signet_e2e::{ISSUER, JwtIssuer, https_server};

#[derive(Default)]
struct Jwks {
    document: Mutex<serde_json::Value>,
    delay_ms: AtomicU64,
    fail: AtomicBool,
    fetches: AtomicUsize,
    port: AtomicU64,
}

async fn jwks(State(s): State<Arc<Jwks>>) -> Response {
    s.fetches.fetch_add(1, Ordering::SeqCst);
    let delay = s.delay_ms.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if s.fail.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    Json(s.document.lock().unwrap().clone()).into_response()
}

/// Two MiB in chunks, with no Content-Length.
async fn huge() -> Response {
    let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![b' '; 32 * 1024]));
    Response::new(Body::from_stream(tokio_stream::iter(chunks)))
}

async fn redirect(State(s): State<Arc<Jwks>>, scheme: &str) -> Response {
    let port = s.port.load(Ordering::SeqCst);
    (
        StatusCode::FOUND,
        [(
            header::LOCATION,
            format!("{scheme}://127.0.0.1:{port}/openid/v1/jwks"),
        )],
    )
        .into_response()
}

async fn serve(
    document: serde_json::Value,
) -> (Arc<Jwks>, String, std::path::PathBuf, tempfile::TempDir) {
    let state = Arc::new(Jwks::default());
    *state.document.lock().unwrap() = document;
    let app = Router::new()
        .route("/openid/v1/jwks", get(jwks))
        .route("/huge", get(huge))
        .route(
            "/to-http",
            get(|s: State<Arc<Jwks>>| async move { redirect(s, "http").await }),
        )
        .route(
            "/to-https",
            get(|s: State<Arc<Jwks>>| async move { redirect(s, "https").await }),
        )
        .with_state(state.clone());
    let (addr, ca_pem) = https_server(app).await;
    state.port.store(u64::from(addr.port()), Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    (state, format!("https://127.0.0.1:{}", addr.port()), ca, dir)
}

fn config(url: String, ca: &std::path::Path, refresh: u64, max_age: u64) -> JwtConfig {
    JwtConfig {
        issuer: ISSUER.into(),
        audiences: vec!["istio-ca".into()],
        source: JwksSource::Url {
            url,
            ca: Some(ca.to_owned()),
        },
        refresh_interval: std::time::Duration::from_secs(refresh),
        max_age: std::time::Duration::from_secs(max_age),
    }
}

async fn verify(auth: &JwtAuthenticator, token: &str) -> Result<(), ReviewError> {
    auth.verify(&Token::new(token), time::OffsetDateTime::now_utc())
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_refresh_never_holds_up_verification() {
    let k1 = JwtIssuer::new("k1");
    let (jwks, base, ca, _dir) = serve(k1.jwks.clone()).await;
    let auth = JwtAuthenticator::new(config(format!("{base}/openid/v1/jwks"), &ca, 1, 3600))
        .await
        .unwrap();
    let token = k1.token("shop", "cart");
    verify(&auth, &token).await.unwrap();
    // The keys are now older than the refresh interval, and the JWKS server takes
    // 6 s to answer: verification goes on with the keys in hand.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    jwks.delay_ms.store(6000, Ordering::SeqCst);
    let started = Instant::now();
    for _ in 0..20 {
        verify(&auth, &token).await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "verification waited for the refresh: {:?}",
        started.elapsed()
    );
    // One refresh went out (it may reach the server a moment after the tokens were
    // checked; 30 s at most, for a loaded machine), not one per token.
    signet_e2e::eventually(Duration::from_secs(30), "the refresh", async || {
        (jwks.fetches.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        2,
        "one refresh, not one per token"
    );
    // A token with an unknown kid waits for that refresh, boundedly, then fails.
    let stranger = JwtIssuer::new("k9").token("shop", "cart");
    let started = Instant::now();
    let e = verify(&auth, &stranger).await.unwrap_err();
    assert!(matches!(e, ReviewError::Rejected(_)), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_signing_key_is_picked_up_by_its_first_token() {
    let k1 = JwtIssuer::new("k1");
    let k2 = JwtIssuer::new("k2");
    let (jwks, base, ca, _dir) = serve(k1.jwks.clone()).await;
    let auth = JwtAuthenticator::new(config(format!("{base}/openid/v1/jwks"), &ca, 300, 3600))
        .await
        .unwrap();
    // The cluster rotates its service-account signing key.
    let both =
        serde_json::json!({"keys": [k1.jwks["keys"][0].clone(), k2.jwks["keys"][0].clone()]});
    *jwks.document.lock().unwrap() = both;
    verify(&auth, &k2.token("shop", "cart")).await.unwrap();
    verify(&auth, &k1.token("shop", "cart")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_cannot_be_refreshed_stop_being_trusted() {
    let k1 = JwtIssuer::new("k1");
    let (jwks, base, ca, _dir) = serve(k1.jwks.clone()).await;
    let auth = JwtAuthenticator::new(config(format!("{base}/openid/v1/jwks"), &ca, 1, 6))
        .await
        .unwrap();
    // The keys were loaded by now: their age is never less than the time since.
    let loaded = Instant::now();
    let token = k1.token("shop", "cart");
    verify(&auth, &token).await.unwrap();
    jwks.fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Past the refresh interval, the refresh fails: the keys in hand still serve.
    // (--jwks-max-age is 6 s: 4.5 s of room for a loaded machine.)
    verify(&auth, &token).await.unwrap();
    let expired = tokio::time::Instant::from_std(loaded + Duration::from_millis(6500));
    tokio::time::sleep_until(expired).await;
    // Past --jwks-max-age: fail closed, as "no answer", not as "bad token".
    let e = verify(&auth, &token).await.unwrap_err();
    assert!(
        matches!(&e, ReviewError::Unavailable(m) if m.contains("could not be refreshed")),
        "{e:?}"
    );
    // The JWKS comes back: so does verification.
    jwks.fail.store(false, Ordering::SeqCst);
    // At the next refresh (one a second at most): 30 s at most, for a loaded machine.
    signet_e2e::eventually(
        Duration::from_secs(30),
        "verification to come back",
        async || verify(&auth, &token).await.ok(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_and_redirects_off_https_are_refused() {
    let k1 = JwtIssuer::new("k1");
    let (_, base, ca, _dir) = serve(k1.jwks.clone()).await;
    let e = JwtAuthenticator::new(config(format!("{base}/huge"), &ca, 300, 3600))
        .await
        .unwrap_err();
    assert!(matches!(e, JwksError::TooLarge(_)), "{e}");
    let e = JwtAuthenticator::new(config(format!("{base}/to-http"), &ca, 300, 3600))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, JwksError::Request { detail, .. } if detail.contains("non-https")),
        "{e}"
    );
    // Redirects that stay on https are followed.
    let auth = JwtAuthenticator::new(config(format!("{base}/to-https"), &ca, 300, 3600))
        .await
        .unwrap();
    verify(&auth, &k1.token("shop", "cart")).await.unwrap();
}
