//! What the elected replica keeps in the Kubernetes API server, as istiod does when
//! it is the mesh's CA: the root ConfigMap in every namespace ([`rootcm`]), a
//! ClusterTrustBundle ([`trustbundle`]) and istiod's serving Secret ([`istiod`]);
//! and it answers PodCertificateRequests for Signet's signer name ([`podcert`]).
//!
//! Every replica signs; only the holder of a `coordination.k8s.io/v1` Lease
//! ([`lease`]) writes. Each writer is level-triggered: it watches the objects it
//! owns, and on any change, on a change of key material, and every few minutes it
//! compares them with what they should be and writes only the differences, with
//! `resourceVersion` preconditions ([`apply`]), so two replicas that both believe
//! they lead cannot make an object flap.

mod apply;
mod istiod;
pub(crate) mod lease;
mod podcert;
mod rootcm;
mod trustbundle;

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration as StdDuration};

use rand::Rng;
use time::Duration;
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
};

use crate::{metrics::Metrics, signer::Signer};

pub use podcert::{PodCertificates, Scope};

/// The root ConfigMap writer's settings.
#[derive(Debug, Clone)]
pub struct RootConfigMap {
    /// The ConfigMap's name (`istio-ca-root-cert`).
    pub name: String,
    /// Only namespaces matching this label selector.
    pub namespace_selector: Option<String>,
}

/// The istiod Secret writer's settings.
#[derive(Debug, Clone)]
pub struct IstiodSecret {
    /// Namespace of the Secret.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// DNS names of the certificate, `istiod.<namespace>.svc` first.
    pub dns_names: Vec<String>,
    /// Lifetime of the certificate; renewed at half of it.
    pub ttl: Duration,
}

/// Leader election settings (client-go's names and defaults).
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's holder identity.
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub duration: Duration,
    /// The leader stops writing when it could not renew for this long.
    pub renew_deadline: Duration,
    /// How often the Lease is renewed or tried.
    pub retry_period: Duration,
}

/// Everything the elected replica writes, and how it is elected.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// The kubeconfig; `None` for the in-cluster configuration.
    pub kubeconfig: Option<PathBuf>,
    /// The root ConfigMap in every namespace.
    pub root_configmap: Option<RootConfigMap>,
    /// The signer names ClusterTrustBundles are kept for.
    pub trust_bundle_signers: Vec<String>,
    /// Answering PodCertificateRequests.
    pub pod_certificates: Option<PodCertificates>,
    /// istiod's serving Secret.
    pub istiod_secret: Option<IstiodSecret>,
    /// Leader election.
    pub lease: LeaseConfig,
}

/// Label on every object Signet writes; pods select the ClusterTrustBundle by it.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "signet-ca");

/// Checks a signer name as kube-apiserver does (`ValidateSignerName`): exactly one
/// `/` between a fully qualified domain of DNS labels (at most 253 characters) and a
/// path of dot-separated lowercase DNS labels; and not under Kubernetes' reserved
/// `kubernetes.io`. A name the API server would refuse fails at start, not as a 422 on
/// every write.
pub fn check_signer_name(signer: &str) -> Result<String, String> {
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
        .ok_or_else(|| {
            format!("{signer:?}: want <domain>/<path> with one '/', e.g. signet.example.com/spiffe")
        })?;
    let domain_ok = domain.len() <= 253 && domain.contains('.') && domain.split('.').all(label);
    if !domain_ok {
        return Err(format!(
            "{signer:?}: {domain:?} is not a fully qualified DNS domain (lowercase labels)"
        ));
    }
    if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
        return Err(format!(
            "{signer:?}: signer names under kubernetes.io are reserved"
        ));
    }
    let path_ok = path.len() <= 253 + 63 + 1 && path.split('.').all(label);
    if !path_ok {
        return Err(format!(
            "{signer:?}: the path {path:?} must be lowercase DNS labels separated by '.'"
        ));
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

/// Elects, and while this replica leads, runs the configured writers; until `stop`.
pub async fn run(
    config: WriterConfig,
    client: kube::Client,
    signer: watch::Receiver<Arc<Signer>>,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
) {
    let (leading_tx, mut leading) = watch::channel(false);
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
                Driver::new("root-configmap", &metrics),
            ));
        }
        for name in &config.trust_bundle_signers {
            writers.spawn(trustbundle::run(
                client.clone(),
                name.clone(),
                signer.clone(),
                Driver::new("cluster-trust-bundle", &metrics),
            ));
        }
        if let Some(pods) = &config.pod_certificates {
            writers.spawn(podcert::run(
                client.clone(),
                pods.clone(),
                signer.clone(),
                Driver::new("pod-certificates", &metrics),
            ));
        }
        if let Some(secret) = &config.istiod_secret {
            writers.spawn(istiod::run(
                client.clone(),
                secret.clone(),
                signer.clone(),
                Driver::new("istiod-secret", &metrics),
            ));
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

/// What a writer's sync loop needs: its name, metrics, and retry state.
#[derive(Debug, Clone)]
struct Driver {
    name: &'static str,
    metrics: Metrics,
}

/// How long a writer waits before checking everything again when nothing happens.
const RESYNC: StdDuration = StdDuration::from_secs(300);

impl Driver {
    fn new(name: &'static str, metrics: &Metrics) -> Self {
        Self {
            name,
            metrics: metrics.clone(),
        }
    }

    /// Calls `sync` now and again whenever `changed` fires, the key material changes,
    /// the time `sync` asked for passes, or (after an error) the backoff passes.
    async fn drive<F, Fut>(
        &self,
        changed: Arc<Notify>,
        mut signer: watch::Receiver<Arc<Signer>>,
        mut sync: F,
    ) where
        F: FnMut(Arc<Signer>) -> Fut,
        Fut: Future<Output = Result<Option<StdDuration>, apply::WriteError>>,
    {
        let mut backoff = StdDuration::from_secs(1);
        loop {
            let current = signer.borrow_and_update().clone();
            let wait = match sync(current).await {
                Ok(next) => {
                    backoff = StdDuration::from_secs(1);
                    self.metrics
                        .writer_last_sync
                        .with_label_values(&[self.name])
                        .set(time::OffsetDateTime::now_utc().unix_timestamp() as f64);
                    next.map_or(RESYNC, |n| n.min(RESYNC))
                }
                Err(e) => {
                    self.error();
                    tracing::warn!(writer = self.name, error = %e, retry_in = ?backoff, "sync failed");
                    let wait = backoff;
                    backoff = (backoff * 2).min(StdDuration::from_secs(60));
                    wait
                }
            };
            tokio::select! {
                _ = changed.notified() => {
                    // Let a burst of watch events settle into one sync.
                    tokio::time::sleep(StdDuration::from_millis(50)).await;
                }
                r = signer.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn wrote(&self) {
        self.metrics
            .writer_writes
            .with_label_values(&[self.name])
            .inc();
    }

    fn error(&self) {
        self.metrics
            .writer_errors
            .with_label_values(&[self.name])
            .inc();
    }

    fn conflict(&self) {
        self.metrics
            .writer_conflicts
            .with_label_values(&[self.name])
            .inc();
    }
}

/// Which version of `kind` (group `certificates.k8s.io`) the API server serves,
/// `v1` before `v1beta1`. Retried with backoff while the API server cannot say;
/// `None`, said once in the log, when it serves neither.
async fn discover(
    client: &kube::Client,
    kind: &str,
    plural: &str,
) -> Option<kube::api::ApiResource> {
    const GROUP: &str = "certificates.k8s.io";
    let mut backoff = StdDuration::from_secs(1);
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
                    tracing::warn!(error = %e, "cannot discover {kind} in {api_version}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(StdDuration::from_secs(60));
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

/// Runs a watch of `api` under `config` into the reflector `writer`, firing
/// `changed` on every event; restarts with backoff on errors.
async fn watch_into<K>(
    api: kube::Api<K>,
    config: kube::runtime::watcher::Config,
    writer: kube::runtime::reflector::store::Writer<K>,
    changed: Arc<Notify>,
    what: &'static str,
) where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    let stream = kube::runtime::watcher(api, config)
        .default_backoff()
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => {
                failing = false;
                changed.notify_one();
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(watch = what, error = %e, "watch failed; retrying");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod signer_name_tests {
    use super::check_signer_name;

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
