//! Watches: the events after a `resourceVersion` (or the objects as ADDED), then
//! new ones as they come, until `timeoutSeconds` or the client goes away.

use std::{collections::HashMap, convert::Infallible, time::Duration};

use axum::{
    body::{Body, Bytes},
    response::Response,
};
use serde_json::{Value, json};

use super::{
    routes::{Target, status_response},
    selectors::selected,
    store::Server,
};

impl Server {
    /// A watch: the events after `resourceVersion` (or the current objects as
    /// ADDED when it is absent or "0"), then new ones as they come, until
    /// `timeoutSeconds` or the client goes away.
    pub(super) async fn watch(self, target: Target, q: HashMap<String, String>) -> Response {
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
