//! A Kubernetes-shaped API server that keeps state, for tests of the CA's
//! controllers. It speaks the parts of the API the real `kube` client and
//! `kube-runtime` watchers use: discovery of a group version; list and watch with
//! `resourceVersion`, `fieldSelector` (`metadata.name`, `metadata.namespace`) and
//! `labelSelector` (`k=v`, `k!=v`, `k`, `!k`); create, replace (with the
//! `resourceVersion` precondition: 409 Conflict when stale), merge patch, delete,
//! and the `status` subresource; 404 NotFound, 409 AlreadyExists, 403 for writes
//! into a terminating namespace, 422 for a changed immutable field. Objects of
//! several versions of one group share storage, as in Kubernetes. TokenReviews are
//! answered against the JWKS the server publishes, with a latency and a rate limit
//! of their own (429 beyond it, as API Priority and Fairness answers), with or
//! without `status.audiences`, or with an injected failure (403 when the caller's
//! RBAC is missing).
//!
//! It is served over HTTPS by [`crate::https_server`] and reached through a
//! kubeconfig ([`KubeApi::kubeconfig`]), exactly as the CA reaches a real one.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::watch;

/// A kind the server knows: where it lives and how it is named.
#[derive(Clone, Debug)]
pub struct Kind {
    /// API group ("" for the core group).
    pub group: &'static str,
    /// Versions served, newest first.
    pub versions: Vec<&'static str>,
    /// `kind`.
    pub kind: &'static str,
    /// Plural resource name in URLs.
    pub plural: &'static str,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Top-level fields that may not change once set (`type` of a Secret, ...).
    pub immutable: &'static [&'static str],
    /// Whether `status` is only written through the `/status` subresource.
    pub status_subresource: bool,
}

/// The kinds Signet's controllers use. ClusterTrustBundle is served as `v1` and
/// `v1beta1`, as on Kubernetes 1.37; [`KubeApi::start_with`] picks other sets.
pub fn default_kinds() -> Vec<Kind> {
    let kind = |group, versions: &[&'static str], kind, plural, namespaced| Kind {
        group,
        versions: versions.to_vec(),
        kind,
        plural,
        namespaced,
        immutable: &[],
        status_subresource: false,
    };
    vec![
        Kind {
            status_subresource: true,
            ..kind("", &["v1"], "Namespace", "namespaces", false)
        },
        kind("", &["v1"], "ConfigMap", "configmaps", true),
        kind("", &["v1"], "ServiceAccount", "serviceaccounts", true),
        Kind {
            immutable: &["type"],
            ..kind("", &["v1"], "Secret", "secrets", true)
        },
        kind("coordination.k8s.io", &["v1"], "Lease", "leases", true),
        Kind {
            status_subresource: true,
            ..kind("", &["v1"], "Pod", "pods", true)
        },
        cluster_trust_bundle(&["v1", "v1beta1"]),
        pod_certificate_request(&["v1", "v1beta1"]),
    ]
}

/// PodCertificateRequest served in `versions`; its status is written once.
pub fn pod_certificate_request(versions: &[&'static str]) -> Kind {
    Kind {
        group: "certificates.k8s.io",
        versions: versions.to_vec(),
        kind: "PodCertificateRequest",
        plural: "podcertificaterequests",
        namespaced: true,
        immutable: &["spec"],
        status_subresource: true,
    }
}

/// ClusterTrustBundle served in `versions`.
pub fn cluster_trust_bundle(versions: &[&'static str]) -> Kind {
    Kind {
        group: "certificates.k8s.io",
        versions: versions.to_vec(),
        kind: "ClusterTrustBundle",
        plural: "clustertrustbundles",
        namespaced: false,
        immutable: &[],
        status_subresource: false,
    }
}

/// One change, as a watch reports it.
#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    plural: &'static str,
    namespace: String,
    kind_type: &'static str,
    object: Value,
}

/// A failure to answer instead of the real one, for the next `count` matching calls.
#[derive(Clone, Debug)]
struct Injected {
    method: Method,
    plural: String,
    code: u16,
    count: usize,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// (plural, namespace or "", name) -> object.
    objects: BTreeMap<(String, String, String), Value>,
    events: Vec<Event>,
    injected: Vec<Injected>,
    /// Calls by "METHOD plural" (watch counts as WATCH).
    calls: HashMap<String, usize>,
    /// The service-account issuer's keys at `/openid/v1/jwks`.
    jwks: Option<String>,
    /// How TokenReviews are answered; none are until set.
    reviews: Option<Reviews>,
    /// TokenReviews being answered now, and the most there ever were at once.
    reviews_in_flight: (usize, usize),
}

impl State {
    /// The code of a failure injected for the next `method` call on `plural`, if
    /// one is due (and counts it off).
    fn take_injected(&mut self, method: &Method, plural: &str) -> Option<u16> {
        let i = self
            .injected
            .iter_mut()
            .find(|i| i.method == method && i.plural == plural && i.count > 0)?;
        i.count -= 1;
        Some(i.code)
    }
}

/// A Kubernetes Status answer for an injected failure.
fn injected_response(code: u16) -> Response {
    let reason = match code {
        403 => "Forbidden",
        409 => "Conflict",
        429 => "TooManyRequests",
        _ => "InternalError",
    };
    status_response(code, reason, "injected by the test")
}

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
struct Reviews {
    config: TokenReviews,
    tokens: f64,
    refilled: std::time::Instant,
}

impl Reviews {
    fn admit(&mut self) -> bool {
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

/// The running server.
#[derive(Clone)]
pub struct KubeApi {
    /// Its address.
    pub addr: SocketAddr,
    /// PEM of the CA its serving certificate chains to.
    pub ca_pem: String,
    kinds: Arc<Vec<Kind>>,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
}

const TOKEN: &str = "signet-test-api-token";

impl KubeApi {
    /// Starts a server with [`default_kinds`].
    pub async fn start() -> Self {
        Self::start_with(default_kinds()).await
    }

    /// Starts a server that knows `kinds`.
    pub async fn start_with(kinds: Vec<Kind>) -> Self {
        let kinds = Arc::new(kinds);
        let state = Arc::new(Mutex::new(State::default()));
        let changed = watch::channel(0).0;
        let handler = {
            let (kinds, state, changed) = (kinds.clone(), state.clone(), changed.clone());
            move |method: Method, uri: Uri, headers: axum::http::HeaderMap, body: Bytes| {
                let (kinds, state, changed) = (kinds.clone(), state.clone(), changed.clone());
                async move {
                    let authorized = headers.get("authorization").and_then(|v| v.to_str().ok())
                        == Some(&format!("Bearer {TOKEN}"));
                    if !authorized {
                        return status_response(401, "Unauthorized", "no valid bearer token");
                    }
                    let api = Server {
                        kinds,
                        state,
                        changed,
                    };
                    api.handle(method, uri, body).await
                }
            }
        };
        let (addr, ca_pem) = crate::https_server(axum::Router::new().fallback(handler)).await;
        Self {
            addr,
            ca_pem,
            kinds,
            state,
            changed,
        }
    }

    /// Writes a kubeconfig for this server into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://{}\n    certificate-authority-data: {ca}\nusers:\n- name: signet\n  user:\n    token: {TOKEN}\ncontexts:\n- name: test\n  context: {{cluster: test, user: signet}}\ncurrent-context: test\n",
                self.addr
            ),
        )
        .unwrap();
        path
    }

    /// A `kube` client for this server, as a test's own user.
    pub async fn client(&self) -> kube::Client {
        let dir = tempfile::tempdir().unwrap();
        let file = kube::config::Kubeconfig::read_from(self.kubeconfig(dir.path())).unwrap();
        let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    }

    /// The stored object, if any.
    pub fn get(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .get(&(plural.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// Every stored object of `plural`.
    pub fn list(&self, plural: &str) -> Vec<Value> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .iter()
            .filter(|((p, _, _), _)| p == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Answers the next `count` `method` calls on `plural` with HTTP `code`
    /// (`POST tokenreviews` for TokenReviews).
    pub fn inject(&self, method: Method, plural: &str, code: u16, count: usize) {
        self.state.lock().unwrap().injected.push(Injected {
            method,
            plural: plural.into(),
            code,
            count,
        });
    }

    /// How many calls were made as "METHOD plural" (GET, LIST, WATCH, POST, PUT,
    /// PATCH, DELETE).
    pub fn calls(&self, what: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .calls
            .get(what)
            .copied()
            .unwrap_or(0)
    }

    /// How many objects of `plural` satisfy `pred` (no copies made).
    pub fn count(&self, plural: &str, pred: impl Fn(&Value) -> bool) -> usize {
        let state = self.state.lock().unwrap();
        state
            .objects
            .iter()
            .filter(|((p, _, _), v)| p == plural && pred(v))
            .count()
    }

    /// Every call made so far.
    pub fn total_calls(&self) -> usize {
        let state = self.state.lock().unwrap();
        // The per-namespace counts repeat the others.
        state
            .calls
            .iter()
            .filter(|(what, _)| !what.contains(" in "))
            .map(|(_, n)| n)
            .sum()
    }

    /// Creates or replaces an object directly (the test as another writer).
    pub fn put(&self, plural: &str, object: Value) {
        let server = Server {
            kinds: self.kinds.clone(),
            state: self.state.clone(),
            changed: self.changed.clone(),
        };
        let kind = server.kind(plural).unwrap();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let mut state = self.state.lock().unwrap();
        let exists = state
            .objects
            .contains_key(&(plural.into(), namespace.clone(), name.clone()));
        server.store(
            &mut state,
            &kind,
            &namespace,
            &name,
            object,
            if exists { "MODIFIED" } else { "ADDED" },
        );
    }

    /// Stops answering with injected failures.
    pub fn clear_injected(&self) {
        self.state.lock().unwrap().injected.clear();
    }

    /// Creates or replaces pod `namespace/name` (UID `uid`) running as `sa`,
    /// scheduled to `node`.
    pub fn pod(&self, namespace: &str, name: &str, uid: &str, sa: &str, node: &str) {
        self.put(
            "pods",
            json!({"metadata": {"name": name, "namespace": namespace, "uid": uid},
                   "spec": {"serviceAccountName": sa, "nodeName": node, "containers": [{"name": "app", "image": "app"}]},
                   "status": {"phase": "Running"}}),
        );
    }

    /// Creates or replaces service account `namespace/name` with UID `uid`.
    pub fn service_account(&self, namespace: &str, name: &str, uid: &str) {
        self.put(
            "serviceaccounts",
            json!({"metadata": {"name": name, "namespace": namespace, "uid": uid}}),
        );
    }

    /// Puts a PodCertificateRequest and what a kubelet's request is bound to: the
    /// running pod and the service account its spec names, with their UIDs.
    pub fn put_bound_request(&self, plural: &str, request: Value) {
        let spec = &request["spec"];
        let namespace = request["metadata"]["namespace"].as_str().unwrap_or("");
        let field = |name: &str| spec[name].as_str().unwrap_or("").to_owned();
        self.pod(
            namespace,
            &field("podName"),
            &field("podUID"),
            &field("serviceAccountName"),
            &field("nodeName"),
        );
        self.service_account(
            namespace,
            &field("serviceAccountName"),
            &field("serviceAccountUID"),
        );
        self.put(plural, request);
    }

    /// Deletes an object directly, as another client would.
    pub fn remove(&self, plural: &str, namespace: &str, name: &str) {
        let server = Server {
            kinds: self.kinds.clone(),
            state: self.state.clone(),
            changed: self.changed.clone(),
        };
        let kind = server.kind(plural).unwrap();
        let mut state = self.state.lock().unwrap();
        let key = (plural.to_owned(), namespace.to_owned(), name.to_owned());
        let current = state.objects.get(&key).cloned().unwrap();
        server.store(&mut state, &kind, namespace, name, current, "DELETED");
    }

    /// Serves `jwks` at `/openid/v1/jwks` (to authenticated callers only).
    pub fn set_jwks(&self, jwks: &str) {
        self.state.lock().unwrap().jwks = Some(jwks.to_owned());
    }

    /// Answers TokenReviews (`POST /apis/authentication.k8s.io/v1/tokenreviews`) as
    /// `config` says, for tokens signed by a key of the JWKS set with [`Self::set_jwks`]
    /// and issued by [`crate::ISSUER`].
    pub fn serve_token_reviews(&self, config: TokenReviews) {
        self.state.lock().unwrap().reviews = Some(Reviews {
            config,
            tokens: f64::from(config.per_second),
            refilled: std::time::Instant::now(),
        });
    }

    /// The most TokenReviews that were ever being answered at once.
    pub fn most_reviews_in_flight(&self) -> usize {
        self.state.lock().unwrap().reviews_in_flight.1
    }

    /// Creates namespaces directly.
    pub fn namespaces(&self, names: &[&str]) {
        for name in names {
            self.put(
                "namespaces",
                json!({"metadata": {"name": name}, "status": {"phase": "Active"}}),
            );
        }
    }

    /// Marks a namespace as terminating, as a delete does before its contents go.
    pub fn terminate_namespace(&self, name: &str) {
        let mut ns = self.get("namespaces", "", name).unwrap();
        ns["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        ns["status"] = json!({"phase": "Terminating"});
        self.put("namespaces", ns);
    }
}

/// The request side: one per request, sharing the state.
struct Server {
    kinds: Arc<Vec<Kind>>,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
}

/// What a URL names.
struct Target {
    kind: Kind,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// What kube-apiserver checks of a PodCertificateRequest's new status (its
/// `ValidatePodCertificateRequestStatusUpdate`), so a signer whose answer the real
/// API server would refuse fails here too: exactly one condition of `Issued`,
/// `Denied` or `Failed` with status `True`, a well-formed reason and a transition
/// time; an issued answer carries a PEM chain whose leaf holds the request's key and
/// whose validity is `notBefore`/`notAfter` exactly, lives at least an hour and at most
/// `maxExpirationSeconds`, with `beginRefreshAt` at least 10 minutes inside it; a
/// refusal carries no chain and no times.
pub fn pod_certificate_status(spec: &Value, status: &Value) -> Result<(), String> {
    use time::{OffsetDateTime, format_description::well_known::Rfc3339};
    use x509_parser::prelude::FromDer;
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    let [condition] = conditions.as_slice() else {
        return Err(format!(
            "status.conditions: want exactly one condition, got {}",
            conditions.len()
        ));
    };
    let kind = condition["type"].as_str().unwrap_or("");
    if !["Issued", "Denied", "Failed"].contains(&kind) || condition["status"] != "True" {
        return Err(format!("status.conditions[0]: bad type/status {condition}"));
    }
    let reason = condition["reason"].as_str().unwrap_or("");
    let reason_ok = reason
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && reason
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_,:".contains(c))
        && !reason.ends_with([',', ':'])
        && reason.len() <= 1024;
    if !reason_ok {
        return Err(format!("status.conditions[0].reason: invalid {reason:?}"));
    }
    let when = |field: &str, v: &Value| {
        v.as_str()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .ok_or_else(|| format!("{field}: Required value (RFC 3339)"))
    };
    when(
        "status.conditions[0].lastTransitionTime",
        &condition["lastTransitionTime"],
    )?;
    let chain = status["certificateChain"].as_str().unwrap_or("");
    if kind != "Issued" {
        for field in [
            "certificateChain",
            "notBefore",
            "notAfter",
            "beginRefreshAt",
        ] {
            if !status[field].is_null() && status[field] != "" {
                return Err(format!("status.{field}: Forbidden: only with Issued"));
            }
        }
        return Ok(());
    }
    let blocks = pem::parse_many(chain).map_err(|e| format!("status.certificateChain: {e}"))?;
    if blocks.is_empty() || blocks.iter().any(|b| b.tag() != "CERTIFICATE") {
        return Err("status.certificateChain: want one or more CERTIFICATE blocks".into());
    }
    for b in &blocks {
        x509_parser::parse_x509_certificate(b.contents())
            .map_err(|e| format!("status.certificateChain: unparsable certificate: {e}"))?;
    }
    let (_, leaf) = x509_parser::parse_x509_certificate(blocks[0].contents())
        .map_err(|e| format!("status.certificateChain: {e}"))?;
    let b64 = |v: &Value| {
        use base64::Engine;
        v.as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
    };
    let spki = if let Some(der) = b64(&spec["pkixPublicKey"]) {
        der
    } else {
        let der = b64(&spec["stubPKCS10Request"]).ok_or("spec has no key")?;
        let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
            .map_err(|e| format!("spec.stubPKCS10Request: {e}"))?;
        csr.certification_request_info.subject_pki.raw.to_vec()
    };
    if leaf.public_key().raw != spki.as_slice() {
        return Err(
            "status.certificateChain: leaf certificate does not contain the requested public key"
                .into(),
        );
    }
    let not_before = when("status.notBefore", &status["notBefore"])?;
    let not_after = when("status.notAfter", &status["notAfter"])?;
    let refresh = when("status.beginRefreshAt", &status["beginRefreshAt"])?;
    let leaf_nb = leaf.validity().not_before.timestamp();
    let leaf_na = leaf.validity().not_after.timestamp();
    if not_before.unix_timestamp() != leaf_nb || not_after.unix_timestamp() != leaf_na {
        return Err("status.notBefore/notAfter: must equal the leaf certificate's".into());
    }
    let lifetime = leaf_na - leaf_nb;
    let max = spec["maxExpirationSeconds"].as_i64().unwrap_or(86_400);
    if lifetime < 3600 || lifetime > max {
        return Err(format!(
            "status.certificateChain: leaf lifetime {lifetime}s must be in [3600, {max}]"
        ));
    }
    let ten = time::Duration::minutes(10);
    if refresh < not_before + ten || refresh > not_after - ten {
        return Err(
            "status.beginRefreshAt: must be at least 10 minutes after notBefore and before notAfter"
                .into(),
        );
    }
    Ok(())
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

fn status_response(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// 404 for object `name` of the target's kind.
fn not_found(target: &Target, name: &str) -> Response {
    status_response(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", target.kind.plural),
    )
}

fn ok(value: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `object` passes the field and label selectors of a list or watch.
fn selected(object: &Value, fields: Option<&str>, labels: Option<&str>) -> Result<bool, String> {
    for term in fields.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
        let (key, want, equal) = if let Some((k, v)) = term.split_once("!=") {
            (k, v, false)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (k, v, true)
        } else {
            return Err(format!("field selector {term:?}"));
        };
        let have = match key {
            "metadata.name" => object["metadata"]["name"].as_str(),
            "metadata.namespace" => object["metadata"]["namespace"].as_str(),
            "spec.signerName" => object["spec"]["signerName"].as_str(),
            _ => return Err(format!("field label not supported: {key}")),
        }
        .unwrap_or("");
        if (have == want) != equal {
            return Ok(false);
        }
    }
    let object_labels = &object["metadata"]["labels"];
    for term in labels.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
        let pass = if let Some((k, v)) = term.split_once("!=") {
            object_labels[k].as_str() != Some(v)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            object_labels[k].as_str() == Some(v)
        } else if let Some(k) = term.strip_prefix('!') {
            object_labels.get(k).is_none()
        } else if term.contains([' ', '(', ')']) {
            return Err(format!("label selector {term:?}"));
        } else {
            object_labels.get(term).is_some()
        };
        if !pass {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Server {
    fn kind(&self, plural: &str) -> Option<Kind> {
        self.kinds.iter().find(|k| k.plural == plural).cloned()
    }

    #[allow(clippy::result_large_err)] // test code: the error is the answer itself
    fn parse(&self, path: &str) -> Result<Option<Target>, Response> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => {
                return Err(status_response(
                    404,
                    "NotFound",
                    &format!("no route {path}"),
                ));
            }
        };
        if rest.is_empty() {
            return Ok(None);
        }
        let (namespace, plural, name, subresource) = match rest {
            ["namespaces", ns, plural, more @ ..] => {
                (Some(*ns), *plural, more.first(), more.get(1))
            }
            [plural, more @ ..] => (None, *plural, more.first(), more.get(1)),
            [] => unreachable!(),
        };
        let kind = self
            .kinds
            .iter()
            .find(|k| k.group == group && k.plural == plural && k.versions.contains(&version))
            .cloned()
            .ok_or_else(|| {
                status_response(
                    404,
                    "NotFound",
                    &format!("the server could not find the requested resource {path}"),
                )
            })?;
        Ok(Some(Target {
            kind,
            version: version.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.map(|n| (*n).to_owned()),
            subresource: subresource.map(|s| (*s).to_owned()),
        }))
    }

    fn api_version(kind: &Kind, version: &str) -> String {
        if kind.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", kind.group)
        }
    }

    /// The object as served in `version`.
    fn shown(kind: &Kind, version: &str, mut object: Value) -> Value {
        object["apiVersion"] = json!(Self::api_version(kind, version));
        object["kind"] = json!(kind.kind);
        object
    }

    fn discovery(&self, path: &str) -> Response {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version) = match segments.as_slice() {
            ["api", version] => ("", *version),
            ["apis", group, version] => (*group, *version),
            _ => return status_response(404, "NotFound", "no such group"),
        };
        let resources: Vec<Value> = self
            .kinds
            .iter()
            .filter(|k| k.group == group && k.versions.contains(&version))
            .map(|k| {
                json!({"name": k.plural, "singularName": "", "namespaced": k.namespaced, "kind": k.kind,
                       "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
            })
            .collect();
        if resources.is_empty() {
            return status_response(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        let group_version = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        ok(
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
        )
    }

    /// A TokenReview: rate-limited, answered after the configured latency.
    async fn token_review(&self, body: &Bytes) -> Response {
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

    async fn handle(self, method: Method, uri: Uri, body: Bytes) -> Response {
        let path = uri.path().to_owned();
        if path == "/openid/v1/jwks" && method == Method::GET {
            let mut state = self.state.lock().unwrap();
            *state.calls.entry("GET jwks".into()).or_default() += 1;
            return match &state.jwks {
                Some(jwks) => ok(serde_json::from_str(jwks).unwrap_or(Value::Null)),
                None => status_response(404, "NotFound", "no JWKS"),
            };
        }
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" && method == Method::POST {
            return self.token_review(&body).await;
        }
        let target = match self.parse(&path) {
            Ok(Some(t)) => t,
            Ok(None) if method == Method::GET => return self.discovery(&path),
            Ok(None) => return status_response(405, "MethodNotAllowed", "not allowed"),
            Err(r) => return r,
        };
        let q = query(&uri);
        let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (&method, &target.name, watching) {
            (&Method::GET, None, true) => "WATCH".to_owned(),
            (&Method::GET, None, false) => "LIST".to_owned(),
            (m, _, _) => m.to_string(),
        };
        {
            let mut state = self.state.lock().unwrap();
            *state
                .calls
                .entry(format!("{verb} {}", target.kind.plural))
                .or_default() += 1;
            // Also by namespace, to tell that a write was not even tried there.
            if let Some(ns) = &target.namespace {
                *state
                    .calls
                    .entry(format!("{verb} {} in {ns}", target.kind.plural))
                    .or_default() += 1;
            }
            if let Some(code) = state.take_injected(&method, target.kind.plural) {
                return injected_response(code);
            }
        }
        if target.kind.namespaced != target.namespace.is_some()
            && !(target.namespace.is_none() && target.name.is_none() && method == Method::GET)
        {
            return status_response(404, "NotFound", "namespace required or not allowed here");
        }
        let body = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice::<Value>(&body) {
                Ok(v) => v,
                Err(e) => return status_response(400, "BadRequest", &format!("body: {e}")),
            }
        };
        match (method, target.name.clone()) {
            (Method::GET, None) if watching => self.watch(target, q).await,
            (Method::GET, None) => self.list(&target, &q),
            (Method::GET, Some(name)) => self.read(&target, &name),
            (Method::POST, None) => self.create(&target, body),
            (Method::PUT, Some(name)) => self.replace(&target, &name, body),
            (Method::PATCH, Some(name)) => self.patch(&target, &name, body),
            (Method::DELETE, Some(name)) => self.delete(&target, &name),
            _ => status_response(405, "MethodNotAllowed", "not allowed"),
        }
    }

    fn key(target: &Target, name: &str) -> (String, String, String) {
        (
            target.kind.plural.to_owned(),
            target.namespace.clone().unwrap_or_default(),
            name.to_owned(),
        )
    }

    fn read(&self, target: &Target, name: &str) -> Response {
        let state = self.state.lock().unwrap();
        match state.objects.get(&Self::key(target, name)) {
            Some(o) => ok(Self::shown(&target.kind, &target.version, o.clone())),
            None => not_found(target, name),
        }
    }

    fn list(&self, target: &Target, q: &HashMap<String, String>) -> Response {
        let state = self.state.lock().unwrap();
        let mut items = Vec::new();
        for ((plural, ns, _), object) in &state.objects {
            if plural != target.kind.plural
                || target.namespace.as_ref().is_some_and(|want| want != ns)
            {
                continue;
            }
            match selected(
                object,
                q.get("fieldSelector").map(String::as_str),
                q.get("labelSelector").map(String::as_str),
            ) {
                Ok(true) => items.push(Self::shown(&target.kind, &target.version, object.clone())),
                Ok(false) => {}
                Err(e) => return status_response(400, "BadRequest", &e),
            }
        }
        ok(json!({
            "kind": format!("{}List", target.kind.kind),
            "apiVersion": Self::api_version(&target.kind, &target.version),
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items,
        }))
    }

    /// Stores `object`, bumping the resource version and recording the event.
    fn store(
        &self,
        state: &mut State,
        kind: &Kind,
        namespace: &str,
        name: &str,
        mut object: Value,
        event: &'static str,
    ) -> Value {
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{rv}"));
            object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        if kind.namespaced {
            object["metadata"]["namespace"] = json!(namespace);
        }
        let object = Self::shown(kind, kind.versions[0], object);
        let key = (
            kind.plural.to_owned(),
            namespace.to_owned(),
            name.to_owned(),
        );
        if event == "DELETED" {
            state.objects.remove(&key);
        } else {
            state.objects.insert(key, object.clone());
        }
        state.events.push(Event {
            rv,
            plural: kind.plural,
            namespace: namespace.to_owned(),
            kind_type: event,
            object: object.clone(),
        });
        self.changed.send_replace(rv);
        object
    }

    fn namespace_refusal(&self, state: &State, target: &Target) -> Option<Response> {
        let ns = target.namespace.as_ref()?;
        match state
            .objects
            .get(&("namespaces".to_owned(), String::new(), ns.clone()))
        {
            None => Some(status_response(
                404,
                "NotFound",
                &format!("namespaces \"{ns}\" not found"),
            )),
            Some(o) if !o["metadata"]["deletionTimestamp"].is_null() => Some(status_response(
                403,
                "Forbidden",
                &format!(
                    "unable to create new content in namespace {ns} because it is being terminated"
                ),
            )),
            Some(_) => None,
        }
    }

    fn create(&self, target: &Target, mut body: Value) -> Response {
        let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
            return status_response(422, "Invalid", "metadata.name: Required value");
        };
        let mut state = self.state.lock().unwrap();
        if let Some(refusal) = self.namespace_refusal(&state, target) {
            return refusal;
        }
        if state.objects.contains_key(&Self::key(target, &name)) {
            return status_response(
                409,
                "AlreadyExists",
                &format!("{} \"{name}\" already exists", target.kind.plural),
            );
        }
        if let Some(meta) = body["metadata"].as_object_mut() {
            meta.remove("resourceVersion");
            meta.remove("uid");
        }
        let ns = target.namespace.clone().unwrap_or_default();
        let stored = self.store(&mut state, &target.kind, &ns, &name, body, "ADDED");
        (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            Self::shown(&target.kind, &target.version, stored).to_string(),
        )
            .into_response()
    }

    fn replace(&self, target: &Target, name: &str, mut body: Value) -> Response {
        let mut state = self.state.lock().unwrap();
        let Some(current) = state.objects.get(&Self::key(target, name)).cloned() else {
            return not_found(target, name);
        };
        if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
            && rv
                != current["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
        {
            return status_response(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    target.kind.plural
                ),
            );
        }
        if target.subresource.as_deref() == Some("status") {
            // A pod certificate request's status fields are immutable once set.
            let status = &current["status"];
            if target.kind.plural == "podcertificaterequests"
                && (status["certificateChain"].is_string() || status["conditions"].is_array())
                && body["status"] != *status
            {
                return status_response(
                    422,
                    "Invalid",
                    "status: Forbidden: the request has already been answered",
                );
            }
            if target.kind.plural == "podcertificaterequests"
                && let Err(why) = pod_certificate_status(&current["spec"], &body["status"])
            {
                return status_response(422, "Invalid", &why);
            }
            let mut object = current.clone();
            object["status"] = body["status"].take();
            let ns = target.namespace.clone().unwrap_or_default();
            let stored = self.store(&mut state, &target.kind, &ns, name, object, "MODIFIED");
            return ok(Self::shown(&target.kind, &target.version, stored));
        }
        // ConfigMaps and Secrets marked `immutable: true` keep their data and the mark.
        if matches!(target.kind.plural, "configmaps" | "secrets")
            && current["immutable"] == true
            && ["data", "binaryData", "stringData", "immutable"]
                .iter()
                .any(|f| body[*f] != current[*f])
        {
            return status_response(
                422,
                "Invalid",
                "data: Forbidden: field is immutable when `immutable` is set",
            );
        }
        for field in target.kind.immutable {
            if !current[*field].is_null() && body[*field] != current[*field] {
                return status_response(
                    422,
                    "Invalid",
                    &format!("{field}: Invalid value: field is immutable"),
                );
            }
        }
        if target.kind.plural == "clustertrustbundles"
            && body["spec"]["signerName"] != current["spec"]["signerName"]
        {
            return status_response(
                422,
                "Invalid",
                "spec.signerName: Invalid value: field is immutable",
            );
        }
        if target.kind.status_subresource {
            body["status"] = current["status"].clone();
        }
        // Metadata the server owns survives a replace.
        for field in ["uid", "creationTimestamp", "deletionTimestamp"] {
            body["metadata"][field] = current["metadata"][field].clone();
        }
        let ns = target.namespace.clone().unwrap_or_default();
        let stored = self.store(&mut state, &target.kind, &ns, name, body, "MODIFIED");
        ok(Self::shown(&target.kind, &target.version, stored))
    }

    fn patch(&self, target: &Target, name: &str, patch: Value) -> Response {
        fn merge(into: &mut Value, patch: &Value) {
            match (into, patch) {
                (Value::Object(into), Value::Object(patch)) => {
                    for (k, v) in patch {
                        if v.is_null() {
                            into.remove(k);
                        } else {
                            merge(into.entry(k.clone()).or_insert(Value::Null), v);
                        }
                    }
                }
                (into, patch) => *into = patch.clone(),
            }
        }
        let current = {
            let state = self.state.lock().unwrap();
            state.objects.get(&Self::key(target, name)).cloned()
        };
        let Some(mut object) = current else {
            return not_found(target, name);
        };
        let rv = object["metadata"]["resourceVersion"].clone();
        merge(&mut object, &patch);
        if patch["metadata"]["resourceVersion"].is_null() {
            object["metadata"]["resourceVersion"] = rv;
        }
        self.replace(target, name, object)
    }

    fn delete(&self, target: &Target, name: &str) -> Response {
        let mut state = self.state.lock().unwrap();
        let Some(current) = state.objects.get(&Self::key(target, name)).cloned() else {
            return not_found(target, name);
        };
        let ns = target.namespace.clone().unwrap_or_default();
        self.store(
            &mut state,
            &target.kind,
            &ns,
            name,
            current.clone(),
            "DELETED",
        );
        ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}))
    }

    /// A watch: the events after `resourceVersion` (or the current objects as
    /// ADDED when it is absent or "0"), then new ones as they come, until
    /// `timeoutSeconds` or the client goes away.
    async fn watch(self, target: Target, q: HashMap<String, String>) -> Response {
        let fields = q.get("fieldSelector").cloned();
        let labels = q.get("labelSelector").cloned();
        if let Err(e) = selected(&json!({}), fields.as_deref(), labels.as_deref()) {
            return status_response(400, "BadRequest", &e);
        }
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(300u64)
            .min(300);
        let since: u64 = q
            .get("resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
        let wanted = move |plural: &str, namespace: &str, object: &Value| {
            plural == target.kind.plural
                && target
                    .namespace
                    .as_ref()
                    .is_none_or(|want| want == namespace)
                && selected(object, fields.as_deref(), labels.as_deref()).unwrap_or(false)
        };
        let line = {
            let kind = target.kind.clone();
            let version = target.version.clone();
            move |event: &str, object: &Value| {
                let object = Self::shown(&kind, &version, object.clone());
                Bytes::from(format!("{}\n", json!({"type": event, "object": object})))
            }
        };
        let mut first = Vec::new();
        let mut last = {
            let state = self.state.lock().unwrap();
            if since == 0 {
                for ((plural, ns, _), object) in &state.objects {
                    if wanted(plural, ns, object) {
                        first.push(line("ADDED", object));
                    }
                }
                state.rv
            } else {
                since
            }
        };
        let mut changed = self.changed.subscribe();
        let state = self.state.clone();
        tokio::spawn(async move {
            for l in first {
                if tx.send(Ok(l)).await.is_err() {
                    return;
                }
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
            loop {
                let lines: Vec<Bytes> = {
                    let state = state.lock().unwrap();
                    let start = state.events.partition_point(|e| e.rv <= last);
                    let new = &state.events[start..];
                    if let Some(e) = new.last() {
                        last = e.rv;
                    }
                    new.iter()
                        .filter(|e| wanted(e.plural, &e.namespace, &e.object))
                        .map(|e| line(e.kind_type, &e.object))
                        .collect()
                };
                for l in lines {
                    if tx.send(Ok(l)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep_until(deadline) => return,
                    _ = tx.closed() => return,
                }
            }
        });
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .unwrap()
    }
}
