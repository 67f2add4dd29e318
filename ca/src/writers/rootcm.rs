//! The root ConfigMap (`istio-ca-root-cert`, key `root-cert.pem`) in every
//! namespace, as istiod keeps it: pilot-agent mounts it to verify the CA and istiod.
//! Created when a namespace appears, recreated when deleted, restored when edited,
//! updated when the key material changes; terminating namespaces are skipped.

use std::{collections::BTreeMap, sync::Arc};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Namespace},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, ResourceExt,
    runtime::{reflector, watcher},
};
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
};

use super::{
    Driver, MANAGED_BY, RootConfigMap,
    apply::{WriteError, ensure, status},
    watch_into,
};
use crate::signer::Signer;

/// The data key pilot-agent reads.
pub(crate) const ROOT_KEY: &str = "root-cert.pem";
/// The label istiod puts on it.
const ISTIO_CONFIG: (&str, &str) = ("istio.io/config", "true");
/// Namespaces written at once.
const PARALLEL_WRITES: usize = 16;

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

/// Runs the writer until aborted.
pub(super) async fn run(
    client: kube::Client,
    config: RootConfigMap,
    signer: watch::Receiver<Arc<Signer>>,
    sync: Driver,
) {
    let changed = Arc::new(Notify::new());
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let (configmaps, cm_writer) = reflector::store::<ConfigMap>();
    let mut watches = JoinSet::new();
    let mut ns_watch = watcher::Config::default();
    if let Some(selector) = &config.namespace_selector {
        ns_watch = ns_watch.labels(selector);
    }
    watches.spawn(watch_into(
        Api::<Namespace>::all(client.clone()),
        ns_watch,
        ns_writer,
        changed.clone(),
        "namespaces",
    ));
    watches.spawn(watch_into(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", config.name)),
        cm_writer,
        changed.clone(),
        "root configmaps",
    ));
    if namespaces.wait_until_ready().await.is_err() || configmaps.wait_until_ready().await.is_err()
    {
        return;
    }
    tracing::info!(configmap = %config.name, "publishing the trust bundle in every namespace");
    let sync_ref = &sync;
    let config = &config;
    let client = &client;
    sync.drive(changed, signer, |current| {
        let namespaces = namespaces.state();
        let configmaps = configmaps.clone();
        async move {
            let bundle = current.roots_pem();
            let work = namespaces
                .into_iter()
                .filter(|ns| !terminating(ns))
                .filter_map(|ns| {
                    let namespace = ns.name_any();
                    let key = reflector::ObjectRef::new(&config.name).within(&namespace);
                    let known = configmaps.get(&key).map(|cm| (*cm).clone());
                    // Already right as last seen: nothing to do (the watch tells of edits).
                    if known.as_ref().is_some_and(|cm| {
                        desired(Some(cm), &config.name, &namespace, bundle).is_none()
                    }) {
                        return None;
                    }
                    Some((namespace, known))
                });
            let results: Vec<Result<bool, WriteError>> = futures::stream::iter(work)
                .map(|(namespace, known)| async move {
                    let api = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
                    let result = ensure(&api, &config.name, Some(known), sync_ref, |cm| {
                        desired(cm, &config.name, &namespace, bundle)
                    })
                    .await;
                    // Refused as invalid: an immutable ConfigMap (a namespace editor can
                    // set `immutable: true`), which would break the namespace at the
                    // next root change. It is replaced: deleted and created again.
                    let result = match result {
                        Err(refused @ WriteError::Api { .. })
                            if matches!(&refused, WriteError::Api { source, .. } if status(source) == Some(422)) =>
                        {
                            recreate_immutable(&api, &config.name, sync_ref, refused, |cm| {
                                desired(cm, &config.name, &namespace, bundle)
                            })
                            .await
                        }
                        other => other,
                    };
                    match result {
                        // The namespace went away or began terminating meanwhile.
                        Err(WriteError::Api { source, .. })
                            if matches!(status(&source), Some(403 | 404))
                                && is_namespace_gone(&source) =>
                        {
                            Ok(false)
                        }
                        // Refused as invalid (an immutable ConfigMap, say): retrying
                        // cannot help, so say so and go on with the other namespaces.
                        Err(WriteError::Api { what, source }) if status(&source) == Some(422) => {
                            sync_ref.error();
                            tracing::warn!(object = %what, error = %source, "cannot write the root ConfigMap; fix or delete it");
                            Ok(false)
                        }
                        other => other,
                    }
                })
                .buffer_unordered(PARALLEL_WRITES)
                .collect()
                .await;
            let written = results.iter().filter(|r| matches!(r, Ok(true))).count();
            if written > 0 {
                tracing::info!(configmap = %config.name, written, "root ConfigMaps written");
            }
            match results.into_iter().find_map(Result::err) {
                Some(e) => Err(e),
                None => Ok(None),
            }
        }
    })
    .await;
}

/// Replaces the ConfigMap `name` when it is immutable: deleted (only that object, as
/// it was read: the delete carries its UID and resourceVersion as preconditions) and
/// created again as `desire` says. A mutable one is left as it is, and `refused`,
/// why its write failed, is returned.
async fn recreate_immutable(
    api: &Api<ConfigMap>,
    name: &str,
    sync: &Driver,
    refused: WriteError,
    desire: impl FnMut(Option<&ConfigMap>) -> Option<ConfigMap>,
) -> Result<bool, WriteError> {
    let what = || format!("{} {name}", api.resource_url());
    let Some(current) = api
        .get_opt(name)
        .await
        .map_err(|e| WriteError::api(what(), e))?
    else {
        return ensure(api, name, Some(None), sync, desire).await;
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
    ensure(api, name, Some(None), sync, desire).await
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
}
