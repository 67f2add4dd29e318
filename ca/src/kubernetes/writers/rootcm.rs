//! The root ConfigMap (`istio-ca-root-cert`, key `root-cert.pem`) in every
//! namespace, as istiod keeps it: pilot-agent mounts it to verify the CA and istiod.
//! Created when a namespace appears, recreated when deleted, restored when edited,
//! updated when the key material changes; terminating namespaces are skipped.

use std::{collections::BTreeMap, sync::Arc};

use futures::FutureExt;

use k8s_openapi::{
    api::core::v1::{ConfigMap, Namespace},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        controller::{self, Action},
        reflector::{self, ObjectRef},
        watcher,
    },
};
use tokio::sync::watch;

use super::{
    Failures, MANAGED_BY, RootConfigMap, Tally,
    apply::{WriteError, ensure, status},
    drain, key_changes, requeue, retry_after,
};
use crate::keys::signer::Signer;

/// The data key pilot-agent reads.
pub(crate) const ROOT_KEY: &str = "root-cert.pem";
/// The label istiod puts on it.
const ISTIO_CONFIG: (&str, &str) = ("istio.io/config", "true");
/// Namespaces written at once.
const PARALLEL_WRITES: u16 = 16;

/// The ConfigMap as it should be, starting from `current`; `None` when it is.
fn desired(
    current: Option<&ConfigMap>,
    name: &str,
    namespace: &str,
    bundle: &str,
) -> Option<ConfigMap> {
    let mut cm = current.cloned().unwrap_or_else(|| ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    });
    let labels = cm.metadata.labels.get_or_insert_with(BTreeMap::new);
    let mut changed = current.is_none();
    for (k, v) in [ISTIO_CONFIG, MANAGED_BY] {
        if labels.get(k).map(String::as_str) != Some(v) {
            labels.insert(k.to_owned(), v.to_owned());
            changed = true;
        }
    }
    let data = cm.data.get_or_insert_with(BTreeMap::new);
    if data.get(ROOT_KEY).map(String::as_str) != Some(bundle) {
        data.insert(ROOT_KEY.to_owned(), bundle.to_owned());
        changed = true;
    }
    changed.then_some(cm)
}

fn terminating(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_some()
        || ns
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Terminating")
}

/// What reconciling one namespace reads.
struct Context {
    client: kube::Client,
    config: RootConfigMap,
    /// The root ConfigMaps, by the watch the controller is also woken by.
    configmaps: reflector::Store<ConfigMap>,
    signer: watch::Receiver<Arc<Signer>>,
    tally: Tally,
    failures: Failures,
}

/// Makes namespace `ns`'s root ConfigMap hold the current trust bundle.
async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, WriteError> {
    let namespace = ns.name_any();
    if terminating(&ns) {
        ctx.failures.succeeded(&namespace);
        return Ok(Action::await_change());
    }
    // A ConfigMap is known absent only once its watch has listed them all. Not
    // awaited: kube-runtime's store keeps one oneshot receiver behind a lock, so of
    // several reconciles waiting at once only the last one polled would be woken.
    // Asked again with the namespace's backoff, so a watch that never lists (no
    // RBAC to list ConfigMaps) does not keep every namespace cycling at 100 ms.
    if ctx.configmaps.wait_until_ready().now_or_never().is_none() {
        return Ok(Action::requeue(ctx.failures.failed(&namespace)));
    }
    let name = &ctx.config.name;
    let bundle = ctx.signer.borrow().roots_pem().to_owned();
    let known = ctx
        .configmaps
        .get(&ObjectRef::new(name).within(&namespace))
        .map(|cm| (*cm).clone());
    let desire = |cm: Option<&ConfigMap>| desired(cm, name, &namespace, &bundle);
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), &namespace);
    let result = match ensure(&api, name, Some(known), &ctx.tally, desire).await {
        Err(refused @ WriteError::Api { .. }) if is_unprocessable(&refused) => {
            recreate_immutable(&api, name, &ctx.tally, refused, desire).await
        }
        other => other,
    };
    match result {
        Ok(written) => {
            if written {
                tracing::debug!(configmap = %name, %namespace, "root ConfigMap written");
            }
        }
        // The namespace went away meanwhile: nothing to write.
        Err(WriteError::Api { source, .. })
            if matches!(status(&source), Some(403 | 404)) && is_namespace_gone(&source) =>
        {
            ctx.failures.succeeded(&namespace);
            return Ok(Action::await_change());
        }
        // Refused for good (e.g. an admission policy): said, counted, and tried again
        // at the resync rather than with a backoff.
        Err(WriteError::Api { what, source }) if status(&source) == Some(422) => {
            ctx.tally.error();
            tracing::warn!(object = %what, error = %source, "cannot write the root ConfigMap; fix or delete it");
            ctx.failures.succeeded(&namespace);
            return Ok(requeue(None));
        }
        Err(e) => return Err(e),
    }
    ctx.failures.succeeded(&namespace);
    ctx.tally.synced();
    Ok(requeue(None))
}

fn is_unprocessable(e: &WriteError) -> bool {
    matches!(e, WriteError::Api { source, .. } if status(source) == Some(422))
}

fn error_policy(ns: Arc<Namespace>, error: &WriteError, ctx: Arc<Context>) -> Action {
    retry_after(&ctx.tally, &ctx.failures, &ns.name_any(), error)
}

/// Runs the writer until aborted.
pub(super) async fn run(
    client: kube::Client,
    config: RootConfigMap,
    signer: watch::Receiver<Arc<Signer>>,
    tally: Tally,
) {
    let (configmaps, cm_writer) = reflector::store::<ConfigMap>();
    let cm_watch = watcher(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", config.name)),
    )
    .default_backoff()
    .reflect(cm_writer)
    .touched_objects();
    let mut ns_watch = watcher::Config::default();
    if let Some(selector) = &config.namespace_selector {
        ns_watch = ns_watch.labels(selector);
    }
    tracing::info!(configmap = %config.name, "publishing the trust bundle in every namespace");
    let controller = Controller::new(Api::<Namespace>::all(client.clone()), ns_watch)
        .watches_stream(cm_watch, |cm: ConfigMap| {
            cm.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns))
        })
        .reconcile_all_on(key_changes(signer.clone()))
        .with_config(controller::Config::default().concurrency(PARALLEL_WRITES));
    let name = tally.name();
    let ctx = Arc::new(Context {
        client,
        config,
        configmaps,
        signer,
        tally,
        failures: Failures::default(),
    });
    drain(name, controller.run(reconcile, error_policy, ctx)).await;
}

/// Replaces the ConfigMap `name` when it is immutable: deleted (only that object, as
/// it was read: the delete carries its UID and resourceVersion as preconditions) and
/// created again as `desire` says. A mutable one is left as it is, and `refused`,
/// why its write failed, is returned.
async fn recreate_immutable(
    api: &Api<ConfigMap>,
    name: &str,
    tally: &Tally,
    refused: WriteError,
    desire: impl FnMut(Option<&ConfigMap>) -> Option<ConfigMap>,
) -> Result<bool, WriteError> {
    let what = || format!("{} {name}", api.resource_url());
    let Some(current) = api
        .get_opt(name)
        .await
        .map_err(|e| WriteError::api(what(), e))?
    else {
        return ensure(api, name, Some(None), tally, desire).await;
    };
    if current.immutable != Some(true) {
        return Err(refused);
    }
    let preconditions = kube::api::Preconditions {
        uid: current.metadata.uid.clone(),
        resource_version: current.metadata.resource_version.clone(),
    };
    let params = kube::api::DeleteParams {
        preconditions: Some(preconditions),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => {}
        // Changed or deleted meanwhile: the next pass sees it as it is now.
        Err(e) if matches!(status(&e), Some(404 | 409)) => return Ok(false),
        Err(e) => return Err(WriteError::api(what(), e)),
    }
    tracing::warn!(object = %what(), "the root ConfigMap was made immutable; replaced it");
    ensure(api, name, Some(None), tally, desire).await
}

/// Whether an API error says the namespace is terminating or gone.
fn is_namespace_gone(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.reason == "NotFound" || s.message.contains("being terminated"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configmap_is_written_only_when_data_or_labels_differ() {
        let fresh = desired(None, "istio-ca-root-cert", "ns1", "PEM").unwrap();
        assert_eq!(fresh.metadata.namespace.as_deref(), Some("ns1"));
        assert_eq!(fresh.data.as_ref().unwrap()[ROOT_KEY], "PEM");
        assert_eq!(
            fresh.metadata.labels.as_ref().unwrap()["istio.io/config"],
            "true"
        );
        assert!(desired(Some(&fresh), "istio-ca-root-cert", "ns1", "PEM").is_none());
        let updated = desired(Some(&fresh), "istio-ca-root-cert", "ns1", "NEW").unwrap();
        assert_eq!(updated.data.as_ref().unwrap()[ROOT_KEY], "NEW");
        // Someone else's extra key and label stay; a removed label comes back.
        let mut edited = fresh.clone();
        edited
            .data
            .as_mut()
            .unwrap()
            .insert("extra".into(), "x".into());
        edited
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .remove("istio.io/config");
        let restored = desired(Some(&edited), "istio-ca-root-cert", "ns1", "PEM").unwrap();
        assert_eq!(restored.data.as_ref().unwrap()["extra"], "x");
        assert_eq!(
            restored.metadata.labels.as_ref().unwrap()["istio.io/config"],
            "true"
        );
    }

    /// Reconciling a namespace, from plain values: a terminating one is left alone,
    /// an active one gets the ConfigMap when it is missing or differs.
    #[test]
    fn terminating_namespaces_are_left_and_active_ones_get_the_bundle() {
        let ns = |phase: Option<&str>, deleting: bool| -> Namespace {
            let mut ns = Namespace::default();
            ns.metadata.name = Some("apps".into());
            if deleting {
                ns.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                    ));
            }
            ns.status = phase.map(|p| k8s_openapi::api::core::v1::NamespaceStatus {
                phase: Some(p.into()),
                ..Default::default()
            });
            ns
        };
        assert!(terminating(&ns(Some("Terminating"), false)));
        assert!(terminating(&ns(None, true)));
        assert!(!terminating(&ns(Some("Active"), false)));
        assert!(desired(None, "istio-ca-root-cert", "apps", "PEM").is_some());
    }
}
