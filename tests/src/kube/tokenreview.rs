//! TokenReviews, answered against the JWKS the server publishes: with a latency and
//! a rate limit of their own (429 beyond it, as API Priority and Fairness answers),
//! with or without `status.audiences`, or with an injected failure.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Bytes,
    http::{Method, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{
    routes::status_response,
    store::{Server, State, injected_response},
};

/// How the server answers TokenReviews.
#[derive(Clone, Copy, Debug)]
pub struct TokenReviews {
    /// How long each answer takes.
    pub latency: Duration,
    /// Reviews answered a second at most (a token bucket as deep as this); beyond,
    /// 429 TooManyRequests.
    pub per_second: u32,
    /// Whether an authenticated answer says which of the requested audiences the
    /// token is for (`status.audiences`), as Kubernetes does; `false` leaves them out,
    /// as an API server without audience support would.
    pub audiences: bool,
}

impl Default for TokenReviews {
    /// At once, without a rate limit, as Kubernetes answers.
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            per_second: 1_000_000,
            audiences: true,
        }
    }
}

/// TokenReview settings and the token bucket.
#[derive(Debug)]
pub(super) struct Reviews {
    pub(super) config: TokenReviews,
    pub(super) tokens: f64,
    pub(super) refilled: std::time::Instant,
}

impl Reviews {
    pub(super) fn admit(&mut self) -> bool {
        let rate = f64::from(self.config.per_second);
        let now = std::time::Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate).min(rate);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The audiences a TokenReview's `spec.audiences` asks for (none when absent).
pub fn review_audiences(review: &Value) -> Vec<String> {
    review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// One TokenReview being answered; counted down when its answer is done or dropped.
struct InFlight(Arc<Mutex<State>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().unwrap().reviews_in_flight.0 -= 1;
    }
}

/// The answer to a TokenReview of `token` for `audiences`, checked against `jwks`.
fn review_status(jwks: &str, token: &str, audiences: &[String]) -> Value {
    let refuse = |why: String| json!({"authenticated": false, "error": why});
    let Ok(set) = serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(jwks) else {
        return refuse("no signing keys".into());
    };
    let Ok(header) = jsonwebtoken::decode_header(token) else {
        return refuse("[invalid bearer token, not a JWT]".into());
    };
    let Some(key) = header
        .kid
        .as_deref()
        .and_then(|kid| set.find(kid))
        .and_then(|jwk| jsonwebtoken::DecodingKey::from_jwk(jwk).ok())
    else {
        return refuse("[invalid bearer token, unknown key]".into());
    };
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(audiences);
    validation.set_issuer(&[crate::ISSUER]);
    match jsonwebtoken::decode::<Value>(token, &key, &validation) {
        Ok(data) => {
            let c = data.claims;
            let k8s = &c["kubernetes.io"];
            let ns = k8s["namespace"].as_str().unwrap_or_default();
            let sa = k8s["serviceaccount"]["name"].as_str().unwrap_or_default();
            let mut extra = json!({});
            if let Some(pod) = k8s["pod"]["name"].as_str() {
                extra["authentication.kubernetes.io/pod-name"] = json!([pod]);
                extra["authentication.kubernetes.io/pod-uid"] = json!([k8s["pod"]["uid"]]);
            }
            let aud: Vec<Value> = match &c["aud"] {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            json!({
                "authenticated": true,
                "audiences": aud.into_iter().filter(|a| audiences.iter().any(|w| a == w)).collect::<Vec<_>>(),
                "user": {
                    "username": format!("system:serviceaccount:{ns}:{sa}"),
                    "uid": k8s["serviceaccount"]["uid"],
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                    "extra": extra,
                },
            })
        }
        Err(e) => refuse(format!("[invalid bearer token, {e}]")),
    }
}

impl Server {
    /// A TokenReview: rate-limited, answered after the configured latency.
    pub(super) async fn token_review(&self, body: &Bytes) -> Response {
        let (latency, audiences_in_answer, jwks) = {
            let mut state = self.state.lock().unwrap();
            *state.calls.entry("POST tokenreviews".into()).or_default() += 1;
            if let Some(code) = state.take_injected(&Method::POST, "tokenreviews") {
                return injected_response(code);
            }
            let jwks = state.jwks.clone().unwrap_or_default();
            let Some(reviews) = state.reviews.as_mut() else {
                return status_response(404, "NotFound", "TokenReviews are not served");
            };
            if !reviews.admit() {
                *state.calls.entry("429 tokenreviews".into()).or_default() += 1;
                return status_response(
                    429,
                    "TooManyRequests",
                    "the server has received too many requests and has asked us to try again later",
                );
            }
            let (latency, audiences) = (reviews.config.latency, reviews.config.audiences);
            let (now, most) = &mut state.reviews_in_flight;
            *now += 1;
            *most = (*most).max(*now);
            (latency, audiences, jwks)
        };
        let answering = InFlight(self.state.clone());
        tokio::time::sleep(latency).await;
        drop(answering);
        let Ok(review) = serde_json::from_slice::<Value>(body) else {
            return status_response(400, "BadRequest", "the body is not JSON");
        };
        if review["kind"] != "TokenReview" || review["apiVersion"] != "authentication.k8s.io/v1" {
            return status_response(
                400,
                "BadRequest",
                "not an authentication.k8s.io/v1 TokenReview",
            );
        }
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let audiences = review_audiences(&review);
        let mut status = review_status(&jwks, token, &audiences);
        if !audiences_in_answer && let Some(status) = status.as_object_mut() {
            status.remove("audiences");
        }
        (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {},
                   "spec": review["spec"], "status": status})
            .to_string(),
        )
            .into_response()
    }
}
