//! The pods of a cluster, as node impersonation needs them (ambient mode: ztunnel
//! asks for the identities of the pods on its node). Filled from a watch of the API
//! server; of each pod only its UID, service account and node are kept, with
//! namespace, service account and node names shared between pods, and an index of
//! which (namespace, service account) pairs have a pod on which node. 100,000 pods
//! take a few tens of MiB (see the `pod_cache` bench).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

/// What is kept of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.uid`.
    pub uid: Box<str>,
    /// `spec.serviceAccountName`.
    pub service_account: Arc<str>,
    /// `spec.nodeName`; empty while unscheduled.
    pub node: Arc<str>,
}

/// How long a cache whose watch keeps failing is still trusted.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

/// (node, namespace, service account).
type NodeKey = (Arc<str>, Arc<str>, Arc<str>);

/// Of a pod, what is kept: namespace, name, UID, service account, node. A pod that
/// has finished (phase Succeeded or Failed) counts as on no node.
fn fields(pod: &Pod) -> Option<(&str, &str, &str, &str, &str)> {
    let namespace = pod.metadata.namespace.as_deref()?;
    let name = pod.metadata.name.as_deref()?;
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let spec = pod.spec.as_ref().filter(|_| !finished);
    Some((
        namespace,
        name,
        pod.metadata.uid.as_deref().unwrap_or(""),
        pod.spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default"),
        spec.and_then(|s| s.node_name.as_deref()).unwrap_or(""),
    ))
}

/// The indexed pods.
#[derive(Debug, Default)]
struct Pods {
    /// (namespace, name) -> pod.
    by_name: HashMap<(Arc<str>, Box<str>), PodInfo>,
    /// (node, namespace, service account) -> number of such pods.
    on_node: HashMap<NodeKey, u32>,
    /// Shared names.
    names: HashSet<Arc<str>>,
    /// Removals since names no pod uses were last dropped.
    removals: usize,
}

impl Pods {
    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(s) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(s);
        self.names.insert(shared.clone());
        shared
    }

    fn upsert(&mut self, namespace: &str, name: &str, uid: &str, sa: &str, node: &str) {
        self.remove(namespace, name);
        let namespace = self.intern(namespace);
        let info = PodInfo {
            uid: uid.into(),
            service_account: self.intern(sa),
            node: self.intern(node),
        };
        if !info.node.is_empty() {
            *self
                .on_node
                .entry((
                    info.node.clone(),
                    namespace.clone(),
                    info.service_account.clone(),
                ))
                .or_default() += 1;
        }
        self.by_name.insert((namespace, name.into()), info);
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        let Some(namespace) = self.names.get(namespace).cloned() else {
            return;
        };
        let Some(old) = self.by_name.remove(&(namespace.clone(), name.into())) else {
            return;
        };
        if old.node.is_empty() {
            return;
        }
        let key = (old.node, namespace, old.service_account);
        if let Some(n) = self.on_node.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.on_node.remove(&key);
            }
        }
        drop(key);
        // Names of namespaces and nodes that came and went would pile up: now and
        // then, drop those only the table itself still holds.
        self.removals += 1;
        if self.removals >= 4096 {
            self.removals = 0;
            self.names.retain(|n| Arc::strong_count(n) > 1);
        }
    }
}

/// One cluster's pods, shared by the watch that fills it and the requests that
/// read it.
#[derive(Debug, Clone)]
pub struct PodCache {
    pods: Arc<RwLock<Pods>>,
    synced: watch::Sender<bool>,
}

impl Default for PodCache {
    fn default() -> Self {
        Self {
            pods: Arc::default(),
            synced: watch::channel(false).0,
        }
    }
}

impl PodCache {
    /// A synced cache holding exactly `pods` (a snapshot; tests and benches).
    pub fn from_snapshot<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Self {
        let cache = Self::default();
        let mut fresh = Pods::default();
        for pod in pods {
            if let Some((namespace, name, uid, sa, node)) = fields(pod) {
                fresh.upsert(namespace, name, uid, sa, node);
            }
        }
        cache.replace(fresh);
        cache
    }

    /// Whether the first full list has been taken in.
    pub fn synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the first full list has been taken in.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        let pods = crate::sync::read(&self.pods);
        let namespace = pods.names.get(namespace)?.clone();
        pods.by_name.get(&(namespace, name.into())).cloned()
    }

    /// Whether some pod of `namespace/service_account` is scheduled to `node`.
    pub fn has_pod_on(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let pods = crate::sync::read(&self.pods);
        let (Some(node), Some(namespace), Some(sa)) = (
            pods.names.get(node),
            pods.names.get(namespace),
            pods.names.get(service_account),
        ) else {
            return false;
        };
        pods.on_node
            .contains_key(&(node.clone(), namespace.clone(), sa.clone()))
    }

    /// How many pods are held.
    pub fn len(&self) -> usize {
        crate::sync::read(&self.pods).by_name.len()
    }

    /// Whether no pod is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes in a created or changed pod.
    pub fn apply(&self, pod: &Pod) {
        if let Some((namespace, name, uid, sa, node)) = fields(pod) {
            let mut pods = crate::sync::write(&self.pods);
            pods.upsert(namespace, name, uid, sa, node);
        }
    }

    /// Forgets a deleted pod.
    pub fn delete(&self, pod: &Pod) {
        if let Some((namespace, name, ..)) = fields(pod) {
            let mut pods = crate::sync::write(&self.pods);
            pods.remove(namespace, name);
        }
    }

    /// Replaces everything with a fresh list (after a relist).
    fn replace(&self, fresh: Pods) {
        *crate::sync::write(&self.pods) = fresh;
        self.synced.send_replace(true);
    }

    /// Keeps the cache in step with the API server until the task is dropped;
    /// relists (and so recovers from any missed event) as the watcher decides, and
    /// also after the watch has been failing for [`STALE_AFTER`].
    pub async fn watch(self, client: kube::Client, cluster: String) {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let api: kube::Api<Pod> = kube::Api::all(client);
        loop {
            // A new watcher starts with a list. Lists read from etcd (not a lagging
            // cache), so a deleted pod cannot return.
            let stream = watcher(api.clone(), watcher::Config::default()).default_backoff();
            let mut stream = std::pin::pin!(stream);
            let mut fresh: Option<Pods> = None;
            let mut health = WatchHealth::default();
            loop {
                let Some(event) = stream.next().await else {
                    return;
                };
                let event = match event {
                    Ok(event) => {
                        health.ok();
                        event
                    }
                    Err(e) => {
                        let now = std::time::Instant::now();
                        if health.error(now) {
                            tracing::warn!(cluster = %cluster, error = %e, "pod watch failed; retrying (the cache keeps what it had)");
                        }
                        // Deleted pods go unseen while the watch is down: after a
                        // while the cache is no longer trusted, and only a new list
                        // (a new watcher) brings it back.
                        if health.stale(now) && self.synced() {
                            tracing::warn!(cluster = %cluster, "pod watch down for {STALE_AFTER:?}; node impersonation unavailable until a new list");
                            self.synced.send_replace(false);
                            break;
                        }
                        continue;
                    }
                };
                match event {
                    watcher::Event::Init => fresh = Some(Pods::default()),
                    watcher::Event::InitApply(pod) => {
                        if let Some(fresh) = fresh.as_mut()
                            && let Some((ns, name, uid, sa, node)) = fields(&pod)
                        {
                            fresh.upsert(ns, name, uid, sa, node);
                        }
                    }
                    watcher::Event::InitDone => {
                        if let Some(fresh) = fresh.take() {
                            let was = self.synced();
                            self.replace(fresh);
                            if !was {
                                tracing::info!(cluster = %cluster, pods = self.len(), "pod cache synced; node impersonation enabled");
                            }
                        }
                    }
                    watcher::Event::Apply(pod) => self.apply(&pod),
                    watcher::Event::Delete(pod) => self.delete(&pod),
                }
            }
        }
    }
}

/// Whether the pod watch has been failing without a break. The watcher retries with
/// a backoff of at most 30 s and, after a failed watch that it resumes, sends nothing
/// in a quiet cluster; so errors further apart than [`RECOVERED_AFTER`] are separate
/// outages, not one long one.
#[derive(Debug, Default)]
struct WatchHealth {
    failing_since: Option<std::time::Instant>,
    last_error: Option<std::time::Instant>,
}

/// A gap between two watch errors that means the watch worked in between: well over
/// the watcher's longest backoff (30 s) and a request's timeouts.
const RECOVERED_AFTER: std::time::Duration = std::time::Duration::from_secs(120);

impl WatchHealth {
    /// An event arrived: the watch works.
    fn ok(&mut self) {
        *self = Self::default();
    }

    /// An error at `now`; true when it starts a new outage.
    fn error(&mut self, now: std::time::Instant) -> bool {
        let recovered = self
            .last_error
            .is_none_or(|last| now.saturating_duration_since(last) > RECOVERED_AFTER);
        self.last_error = Some(now);
        if recovered {
            self.failing_since = Some(now);
        }
        recovered
    }

    /// Whether the current outage has lasted [`STALE_AFTER`].
    fn stale(&self, now: std::time::Instant) -> bool {
        self.failing_since
            .is_some_and(|since| now.saturating_duration_since(since) >= STALE_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{api::core::v1::PodSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some(sa.into()),
                node_name: node.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_an_unbroken_outage_makes_the_cache_stale() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut health = WatchHealth::default();
        // One error, then the resumed watch is quiet for an hour: a later single
        // error is a new outage, not the sixty-first minute of the first.
        assert!(health.error(at(0)));
        assert!(!health.stale(at(0)));
        assert!(health.error(at(3600)));
        assert!(!health.stale(at(3600)));
        // Errors every 30 s (the watcher's longest backoff) for five minutes: stale.
        let mut s = 3600;
        while s < 3600 + 300 {
            s += 30;
            assert!(!health.error(at(s)), "one outage");
        }
        assert!(health.stale(at(s)));
        // Any event resets it.
        health.ok();
        assert!(!health.stale(at(s)));
        assert!(health.error(at(s + 1)));
        assert!(!health.stale(at(s + 1)));
    }

    #[test]
    fn the_node_index_follows_pods_as_they_come_move_and_go() {
        let cache = PodCache::default();
        cache.apply(&pod("apps", "web-1", "u1", "web", Some("node-a")));
        cache.apply(&pod("apps", "web-2", "u2", "web", Some("node-a")));
        cache.apply(&pod("apps", "db-1", "u3", "db", None));
        assert!(cache.has_pod_on("node-a", "apps", "web"));
        assert!(!cache.has_pod_on("node-b", "apps", "web"));
        assert!(!cache.has_pod_on("node-a", "apps", "db"), "unscheduled");
        assert_eq!(cache.pod("apps", "web-1").unwrap().uid.as_ref(), "u1");
        // Scheduled later.
        cache.apply(&pod("apps", "db-1", "u3", "db", Some("node-b")));
        assert!(cache.has_pod_on("node-b", "apps", "db"));
        // One of two pods leaves: the pair still qualifies; both: it no longer does.
        cache.delete(&pod("apps", "web-1", "u1", "web", Some("node-a")));
        assert!(cache.has_pod_on("node-a", "apps", "web"));
        cache.delete(&pod("apps", "web-2", "u2", "web", Some("node-a")));
        assert!(!cache.has_pod_on("node-a", "apps", "web"));
        assert!(cache.pod("apps", "web-2").is_none());
        assert_eq!(cache.len(), 1);
        // A finished pod (a completed Job) is on no node.
        let mut done = pod("apps", "job-1", "u4", "job", Some("node-c"));
        done.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        cache.apply(&done);
        assert!(!cache.has_pod_on("node-c", "apps", "job"));
        cache.delete(&done);
        // Deleting what is not there changes nothing.
        cache.delete(&pod("other", "x", "u9", "web", Some("node-a")));
        assert_eq!(cache.len(), 1);
    }
}
