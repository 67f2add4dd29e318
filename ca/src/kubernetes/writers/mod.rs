//! What the elected replica keeps in the Kubernetes API server, as istiod does when
//! it is the mesh's CA: the root ConfigMap in every namespace ([`rootcm`]), a
//! ClusterTrustBundle ([`trustbundle`]) and istiod's serving Secret ([`istiod`]);
//! and, handed in by the server, the pod certificate signer's loop.
//!
//! Every replica signs; only the holder of a `coordination.k8s.io/v1` Lease
//! ([`lease`]) writes. Each writer is a kube-runtime controller: a `reconcile(object,
//! context) -> Action` that compares one object with what it should be and writes
//! only the difference, with `resourceVersion` preconditions ([`apply`]), so two
//! replicas that both believe they lead cannot make an object flap; an
//! `error_policy` that backs off per object with jitter; woken by the watch of what
//! it owns, by new key material (`reconcile_all_on`), and by its own requeue.

mod apply;
pub mod flags;
mod istiod;
pub(crate) mod lease;
mod rootcm;
pub mod rotationcm;
mod trustbundle;

use std::{
    collections::HashMap,
    fmt::Debug,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration as StdDuration,
};

use futures::{StreamExt, future::BoxFuture};
use kube::{
    Api, Resource,
    runtime::{
        Controller,
        controller::{self, Action},
        reflector::{self, ObjectRef},
        watcher,
    },
};
use rand::Rng;
use serde::de::DeserializeOwned;
use tokio::{sync::watch, task::JoinSet};

use crate::{keys::signer::Signer, metrics::Metrics};

pub(crate) use apply::{WriteError, status};
pub use flags::{IstiodSecret, LeaseConfig, RootConfigMap, WriterConfig};

/// Label on every object Signet writes; pods select the ClusterTrustBundle by it.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "signet-ca");

/// A signer name the API server would refuse.
#[derive(Debug, thiserror::Error)]
pub enum SignerNameError {
    #[error("{0:?}: want <domain>/<path> with one '/', e.g. signet.example.com/spiffe")]
    Shape(String),
    #[error("{0:?}: {1:?} is not a fully qualified DNS domain (lowercase labels)")]
    Domain(String, String),
    #[error("{0:?}: signer names under kubernetes.io are reserved")]
    Reserved(String),
    #[error("{0:?}: the path {1:?} must be lowercase DNS labels separated by '.'")]
    Path(String, String),
}

/// Checks a signer name as kube-apiserver does (`ValidateSignerName`): exactly one
/// `/` between a fully qualified domain of DNS labels (at most 253 characters) and a
/// path of dot-separated lowercase DNS labels; and not under Kubernetes' reserved
/// `kubernetes.io`. A name the API server would refuse fails at start, not as a 422 on
/// every write.
pub fn check_signer_name(signer: &str) -> Result<String, SignerNameError> {
    fn label(l: &str) -> bool {
        let b = l.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    }
    let (domain, path) = signer
        .split_once('/')
        .filter(|(_, path)| !path.contains('/'))
        .ok_or_else(|| SignerNameError::Shape(signer.to_owned()))?;
    let domain_ok = domain.len() <= 253 && domain.contains('.') && domain.split('.').all(label);
    if !domain_ok {
        return Err(SignerNameError::Domain(
            signer.to_owned(),
            domain.to_owned(),
        ));
    }
    if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
        return Err(SignerNameError::Reserved(signer.to_owned()));
    }
    let path_ok = path.len() <= 253 + 63 + 1 && path.split('.').all(label);
    if !path_ok {
        return Err(SignerNameError::Path(signer.to_owned(), path.to_owned()));
    }
    Ok(signer.to_owned())
}

/// This replica's default identity in the Lease: the host name (the pod name in
/// Kubernetes) and a random suffix, so two processes on one host differ.
pub fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "signet-ca".to_owned());
    format!("{host}_{:08x}", rand::rng().random::<u32>())
}

/// Work that runs on the elected replica only, beside the writers: started anew each
/// time this replica comes to lead, aborted when it stops.
pub type LeaderTask = Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// Elects, and while this replica leads, runs the configured writers and `tasks`;
/// until `stop`. `leading_tx` says whether this replica leads (the rotation driver
/// advances a trust change only then).
pub async fn run(
    config: WriterConfig,
    client: kube::Client,
    leading_tx: watch::Sender<bool>,
    signer: watch::Receiver<Arc<Signer>>,
    metrics: Metrics,
    tasks: Vec<LeaderTask>,
    stop: watch::Receiver<bool>,
) {
    let mut leading = leading_tx.subscribe();
    let elector = tokio::spawn(lease::run(
        config.lease.clone(),
        client.clone(),
        metrics.clone(),
        leading_tx,
        stop.clone(),
    ));
    let mut stop_rx = stop.clone();
    loop {
        tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => break,
            r = leading.wait_for(|l| *l) => if r.is_err() { break },
        }
        let mut writers = JoinSet::new();
        if let Some(cm) = &config.root_configmap {
            writers.spawn(rootcm::run(
                client.clone(),
                cm.clone(),
                signer.clone(),
                Tally::new("root-configmap", &metrics),
            ));
        }
        for name in &config.trust_bundle_signers {
            writers.spawn(trustbundle::run(
                client.clone(),
                name.clone(),
                signer.clone(),
                Tally::new("cluster-trust-bundle", &metrics),
            ));
        }
        if let Some(secret) = &config.istiod_secret {
            writers.spawn(istiod::run(
                client.clone(),
                secret.clone(),
                signer.clone(),
                Tally::new("istiod-secret", &metrics),
            ));
        }
        for task in &tasks {
            writers.spawn(task());
        }
        tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => {}
            _ = leading.wait_for(|l| !*l) => {}
        }
        // Aborted where they wait: a write in flight is dropped, and its
        // resourceVersion precondition keeps a late one from undoing the new leader's.
        writers.shutdown().await;
        if *stop_rx.borrow() {
            break;
        }
    }
    let _ = elector.await;
    // Only now that no writer runs: client-go's ReleaseOnCancel.
    lease::release(config.lease, client).await;
}

/// A writer's name in the metrics, and its counters.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    name: &'static str,
    metrics: Metrics,
}

impl Tally {
    pub(crate) fn new(name: &'static str, metrics: &Metrics) -> Self {
        Self {
            name,
            metrics: metrics.clone(),
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// An object found (or made) as it should be.
    pub(crate) fn synced(&self) {
        self.metrics
            .writer_last_sync
            .with_label_values(&[self.name])
            .set(time::OffsetDateTime::now_utc().unix_timestamp() as f64);
    }

    pub(crate) fn wrote(&self) {
        self.metrics
            .writer_writes
            .with_label_values(&[self.name])
            .inc();
    }

    pub(crate) fn error(&self) {
        self.metrics
            .writer_errors
            .with_label_values(&[self.name])
            .inc();
    }

    pub(crate) fn conflict(&self) {
        self.metrics
            .writer_conflicts
            .with_label_values(&[self.name])
            .inc();
    }
}

/// How long an object that is as it should be waits for its next check when nothing
/// changes.
const RESYNC: StdDuration = StdDuration::from_secs(300);
/// The first retry after a failure; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: StdDuration = StdDuration::from_secs(1);
const MAX_BACKOFF: StdDuration = StdDuration::from_secs(60);

/// `wait` give or take a fifth, so that objects (and replicas) checked together do
/// not stay in step.
pub(crate) fn jitter(wait: StdDuration) -> StdDuration {
    wait.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// The next check of an object that is as it should be: after `wait` (the time it
/// asked for, e.g. a renewal point) or [`RESYNC`], whichever is sooner, jittered.
pub(crate) fn requeue(wait: Option<StdDuration>) -> Action {
    Action::requeue(jitter(wait.map_or(RESYNC, |w| w.min(RESYNC))))
}

/// Failed reconciles per object, for the backoff; forgotten on success.
#[derive(Debug, Default)]
pub(crate) struct Failures(Mutex<HashMap<String, u32>>);

impl Failures {
    /// Counts a failure of `key`; returns how long to wait before the next try:
    /// [`FIRST_BACKOFF`] doubling per failure to [`MAX_BACKOFF`], jittered.
    pub(crate) fn failed(&self, key: &str) -> StdDuration {
        let mut failures = crate::sync::lock(&self.0);
        let n = failures.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        jitter(backoff(*n))
    }

    pub(crate) fn succeeded(&self, key: &str) {
        crate::sync::lock(&self.0).remove(key);
    }
}

/// The unjittered wait after `failures` failures in a row.
fn backoff(failures: u32) -> StdDuration {
    FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// An item each time the key material changes: `reconcile_all_on`'s trigger.
pub(crate) fn key_changes(
    signer: watch::Receiver<Arc<Signer>>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    tokio_stream::wrappers::WatchStream::from_changes(signer).map(|_| ())
}

/// The failure a writer's `error_policy` reports: counted, logged, retried after the
/// object's backoff.
pub(crate) fn retry_after(
    tally: &Tally,
    failures: &Failures,
    key: &str,
    error: &WriteError,
) -> Action {
    tally.error();
    let wait = failures.failed(key);
    tracing::warn!(writer = tally.name(), object = key, error = %error, retry_in = ?wait, "sync failed");
    Action::requeue(wait)
}

/// A controller for the one object `name` that Signet keeps in existence (a Secret,
/// a ClusterTrustBundle). A `Controller` reconciles only objects its store holds and
/// is not woken by deletions, so on its own it could neither create the object nor
/// bring a deleted one back before a resync. This one's store holds the object as the
/// API server has it or, while the server has none, `skeleton` (the name alone, no
/// `resourceVersion`: reconcile creates it), and every watch event wakes it,
/// deletions included.
pub(crate) fn singleton<K>(api: Api<K>, skeleton: K, dyntype: K::DynamicType) -> Controller<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Debug + Eq + Hash + Unpin + Send + Sync,
{
    let mut writer = reflector::store::Writer::new(dyntype.clone());
    let store = writer.as_reader();
    let name = skeleton.meta().name.clone().unwrap_or_default();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let reader = store.clone();
    let trigger = kube::runtime::WatchStreamExt::default_backoff(watcher(api, config)).filter_map(
        move |event| {
            let wake = match event {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    let settled = matches!(
                        event,
                        watcher::Event::Apply(_)
                            | watcher::Event::Delete(_)
                            | watcher::Event::InitDone
                    );
                    if settled && reader.is_empty() {
                        writer.apply_watcher_event(&watcher::Event::Apply(skeleton.clone()));
                    }
                    settled
                        .then(|| reader.state().first().map(|o| Ok((**o).clone())))
                        .flatten()
                }
                Err(e) => Some(Err(e)),
            };
            std::future::ready(wake)
        },
    );
    Controller::for_stream_with(trigger, store, dyntype)
}

/// Runs a controller's output to its end. Reconcile failures were reported by the
/// writer's `error_policy`; a failing watch is said once until it recovers.
pub(crate) async fn drain<K, E>(
    name: &'static str,
    results: impl futures::Stream<
        Item = Result<(ObjectRef<K>, Action), controller::Error<E, watcher::Error>>,
    >,
) where
    K: Resource,
    E: std::error::Error + 'static,
{
    let mut results = std::pin::pin!(results);
    let mut failing = false;
    while let Some(result) = results.next().await {
        match result {
            Err(controller::Error::QueueError(e)) => {
                if !failing {
                    tracing::warn!(writer = name, error = %e, "watch failed; retrying");
                }
                failing = true;
            }
            Err(controller::Error::ObjectNotFound(object)) => {
                tracing::debug!(writer = name, %object, "gone before it was reconciled");
            }
            Ok(_) | Err(_) => failing = false,
        }
    }
}

/// Which version of `kind` (group `certificates.k8s.io`) the API server serves,
/// `v1` before `v1beta1`. Retried with backoff while the API server cannot say;
/// `None`, said once in the log, when it serves neither.
pub(crate) async fn discover(
    client: &kube::Client,
    kind: &str,
    plural: &str,
) -> Option<kube::api::ApiResource> {
    const GROUP: &str = "certificates.k8s.io";
    let mut failures = 0;
    'retry: loop {
        for version in ["v1", "v1beta1"] {
            let api_version = format!("{GROUP}/{version}");
            match client.list_api_group_resources(&api_version).await {
                Ok(list) if list.resources.iter().any(|r| r.name == plural) => {
                    return Some(kube::api::ApiResource {
                        group: GROUP.into(),
                        version: version.into(),
                        api_version,
                        kind: kind.into(),
                        plural: plural.into(),
                    });
                }
                Ok(_) => {}
                Err(e) if apply::status(&e) == Some(404) => {}
                Err(e) => {
                    failures += 1;
                    let wait = jitter(backoff(failures));
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot discover {kind} in {api_version}; retrying");
                    tokio::time::sleep(wait).await;
                    continue 'retry;
                }
            }
        }
        tracing::warn!(
            "the API server serves no {kind} ({GROUP} v1 or v1beta1); that writer does nothing"
        );
        return None;
    }
}

#[cfg(test)]
mod signer_name_tests {
    use super::{backoff, check_signer_name, jitter};
    use std::time::Duration;

    #[test]
    fn jitter_stays_within_a_fifth() {
        for _ in 0..1000 {
            let j = jitter(Duration::from_secs(100));
            assert!(
                j >= Duration::from_secs(80) && j <= Duration::from_secs(120),
                "{j:?}"
            );
        }
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX).as_secs(), 60);
    }

    #[test]
    fn signer_names_follow_the_api_servers_rules() {
        for good in [
            "signet.dev/spiffe",
            "mesh.example.com/pods",
            "a.b/x.y-z",
            "a1.b2/3c",
        ] {
            assert_eq!(check_signer_name(good).unwrap(), good);
        }
        for bad in [
            "signet/spiffe",
            "signet.dev",
            "signet.dev/",
            "signet.dev/mesh/roots",
            "Signet.dev/spiffe",
            "signet.dev/Spiffe",
            "signet.dev/spi_ffe",
            "-signet.dev/spiffe",
            "signet-.dev/spiffe",
            "signet.dev/-x",
            "signet.dev/x..y",
            "kubernetes.io/spiffe",
            "pods.kubernetes.io/spiffe",
        ] {
            assert!(check_signer_name(bad).is_err(), "{bad}");
        }
    }
}
