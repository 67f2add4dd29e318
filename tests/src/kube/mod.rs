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

//!
//! One job per file: `kinds` (what it serves), `store` (objects, resource versions,
//! events, injected failures), `routes` (URLs and verbs), `watches`, `selectors`,
//! `tokenreview`, and `podcert` (the status rules of pod certificate requests); this
//! file is [`KubeApi`], the handle a test holds.

mod kinds;
mod podcert;
mod routes;
mod selectors;
mod store;
mod tokenreview;
mod watches;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use axum::{
    body::Bytes,
    http::{Method, Uri},
};
use serde_json::{Value, json};
use tokio::sync::watch;

pub use kinds::{Kind, cluster_trust_bundle, default_kinds, pod_certificate_request};
pub use podcert::pod_certificate_status;
pub use tokenreview::{TokenReviews, review_audiences};

use routes::status_response;
use store::{Injected, Server, State};
use tokenreview::Reviews;

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
        // `/version` is public on a real API server (system:public-info-viewer).
        let version = axum::routing::get(|| async {
            axum::Json(serde_json::json!({
                "major": "1", "minor": "35", "gitVersion": "v1.35.0",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean", "buildDate": "2026-08-26T00:00:00Z",
                "goVersion": "go1.25.0", "compiler": "gc", "platform": "linux/amd64",
            }))
        });
        let router = axum::Router::new()
            .route("/version", version)
            .fallback(handler);
        let (addr, ca_pem) = crate::https_server(router).await;
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
