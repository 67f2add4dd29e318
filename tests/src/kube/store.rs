//! The server's state: objects by kind, namespace and name, each write bumping
//! one `resourceVersion` and leaving an event for the watches; injected failures
//! and call counts for the tests.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use axum::{http::Method, response::Response};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{
    Kind,
    routes::{Target, status_response},
    tokenreview::Reviews,
};

/// One change, as a watch reports it.
#[derive(Clone, Debug)]
pub(super) struct Event {
    pub(super) rv: u64,
    pub(super) plural: &'static str,
    pub(super) namespace: String,
    pub(super) kind_type: &'static str,
    pub(super) object: Value,
}

/// A failure to answer instead of the real one, for the next `count` matching calls.
#[derive(Clone, Debug)]
pub(super) struct Injected {
    pub(super) method: Method,
    pub(super) plural: String,
    pub(super) code: u16,
    pub(super) count: usize,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) rv: u64,
    /// (plural, namespace or "", name) -> object.
    pub(super) objects: BTreeMap<(String, String, String), Value>,
    pub(super) events: Vec<Event>,
    pub(super) injected: Vec<Injected>,
    /// Calls by "METHOD plural" (watch counts as WATCH).
    pub(super) calls: HashMap<String, usize>,
    /// The service-account issuer's keys at `/openid/v1/jwks`.
    pub(super) jwks: Option<String>,
    /// How TokenReviews are answered; none are until set.
    pub(super) reviews: Option<Reviews>,
    /// TokenReviews being answered now, and the most there ever were at once.
    pub(super) reviews_in_flight: (usize, usize),
}

impl State {
    /// The code of a failure injected for the next `method` call on `plural`, if
    /// one is due (and counts it off).
    pub(super) fn take_injected(&mut self, method: &Method, plural: &str) -> Option<u16> {
        let i = self
            .injected
            .iter_mut()
            .find(|i| i.method == method && i.plural == plural && i.count > 0)?;
        i.count -= 1;
        Some(i.code)
    }
}

/// A Kubernetes Status answer for an injected failure.
pub(super) fn injected_response(code: u16) -> Response {
    let reason = match code {
        403 => "Forbidden",
        409 => "Conflict",
        429 => "TooManyRequests",
        _ => "InternalError",
    };
    status_response(code, reason, "injected by the test")
}

/// The request side: one per request, sharing the state.
pub(super) struct Server {
    pub(super) kinds: Arc<Vec<Kind>>,
    pub(super) state: Arc<Mutex<State>>,
    pub(super) changed: watch::Sender<u64>,
}

impl Server {
    pub(super) fn key(target: &Target, name: &str) -> (String, String, String) {
        (
            target.kind.plural.to_owned(),
            target.namespace.clone().unwrap_or_default(),
            name.to_owned(),
        )
    }

    /// Stores `object`, bumping the resource version and recording the event.
    pub(super) fn store(
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

    pub(super) fn namespace_refusal(&self, state: &State, target: &Target) -> Option<Response> {
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
}
