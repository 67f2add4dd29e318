//! HTTP routes: a URL becomes a [`Target`] (kind, version, namespace, name,
//! subresource), discovery of a group version, and the verbs read, list, create,
//! replace (with the `resourceVersion` precondition and Kubernetes' immutability
//! rules), merge patch and delete; Kubernetes `Status` answers for refusals.

use std::collections::HashMap;

use axum::{
    body::Bytes,
    http::{Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{
    Kind, podcert::status_update_refusal, selectors::selected, store::Server,
    store::injected_response,
};

/// What a URL names.
pub(super) struct Target {
    pub(super) kind: Kind,
    pub(super) version: String,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) subresource: Option<String>,
}

pub(super) fn status_response(code: u16, reason: &str, message: &str) -> Response {
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
pub(super) fn not_found(target: &Target, name: &str) -> Response {
    status_response(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", target.kind.plural),
    )
}

pub(super) fn ok(value: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

pub(super) fn query(uri: &Uri) -> HashMap<String, String> {
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

impl Server {
    pub(super) fn kind(&self, plural: &str) -> Option<Kind> {
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

    pub(super) fn api_version(kind: &Kind, version: &str) -> String {
        if kind.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", kind.group)
        }
    }

    /// The object as served in `version`.
    pub(super) fn shown(kind: &Kind, version: &str, mut object: Value) -> Value {
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

    pub(super) async fn handle(self, method: Method, uri: Uri, body: Bytes) -> Response {
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

    fn create(&self, target: &Target, mut body: Value) -> Response {
        // `generateName`: the prefix and five more characters, as the API server
        // does (a counter here, so names never collide).
        if body["metadata"]["name"].is_null()
            && let Some(prefix) = body["metadata"]["generateName"].as_str()
        {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            body["metadata"]["name"] = Value::String(format!("{prefix}{n:05}"));
        }
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
            if target.kind.plural == "podcertificaterequests"
                && let Some(refusal) = status_update_refusal(&current, &body["status"])
            {
                return refusal;
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
}
