//! A trust change's cluster-wide side in the API server: the ConfigMap
//! `signet-ca-rotation` in the Lease's namespace holds the stage record
//! (`record.json`, written by the elected replica), an operator's abort request
//! (`abort`), and each replica's report (`replica.<id>.json`), every key written
//! with a JSON merge patch so replicas never overwrite each other. The consumers the
//! writers keep are read back here, and each stage change is an
//! `events.k8s.io/v1` Event on that ConfigMap.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
};

use k8s_openapi::api::{
    core::v1::{ConfigMap, ObjectReference, Secret},
    events::v1::Event,
};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde_json::json;

use super::{WriterConfig, apply::status, discover, rootcm::ROOT_KEY, trustbundle::object_name};
use crate::{
    rotation::{
        shared::{Peer, Peers, Report, Shared, SharedFuture, State},
        stage::{Record, Stage},
    },
    sync::lock,
};

/// The ConfigMap's name.
pub const NAME: &str = "signet-ca-rotation";
/// Its key for the record.
pub const RECORD_KEY: &str = "record.json";
/// Its key for an abort request (any value).
pub const ABORT_KEY: &str = "abort";
/// The controller name on Events.
const REPORTER: &str = "signet-ca";

/// The ConfigMap, the writers' objects to read back, and this replica's name.
pub struct RotationConfigMap {
    client: kube::Client,
    namespace: String,
    writers: WriterConfig,
    replica: String,
    trust_bundles: Mutex<Option<ApiResource>>,
}

impl std::fmt::Debug for RotationConfigMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotationConfigMap")
            .field("namespace", &self.namespace)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl RotationConfigMap {
    /// The share of the cluster whose writers are `writers` (its Lease's namespace
    /// holds the ConfigMap; its identity names this replica's report).
    pub fn new(client: kube::Client, writers: WriterConfig) -> Self {
        Self {
            client,
            namespace: writers.lease.namespace.clone(),
            replica: writers.lease.identity.clone(),
            writers,
            trust_bundles: Mutex::new(None),
        }
    }

    fn api(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Sets `data` keys (a `null` removes one), creating the ConfigMap when missing.
    async fn merge(&self, data: serde_json::Value) -> Result<(), String> {
        let api = self.api();
        let patch = json!({ "data": data });
        match api
            .patch(NAME, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => {
                let mut cm = ConfigMap::default();
                cm.metadata.name = Some(NAME.into());
                cm.metadata.labels = Some(BTreeMap::from([(
                    super::MANAGED_BY.0.to_owned(),
                    super::MANAGED_BY.1.to_owned(),
                )]));
                match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => {}
                    Err(e) if status(&e) == Some(409) => {}
                    Err(e) => {
                        return Err(format!("creating ConfigMap {}/{NAME}: {e}", self.namespace));
                    }
                }
                api.patch(NAME, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("ConfigMap {}/{NAME}: {e}", self.namespace))
            }
            Err(e) => Err(format!("ConfigMap {}/{NAME}: {e}", self.namespace)),
        }
    }

    async fn trust_bundle_resource(&self) -> Option<ApiResource> {
        if let Some(r) = lock(&self.trust_bundles).clone() {
            return Some(r);
        }
        let found = discover(&self.client, "ClusterTrustBundle", "clustertrustbundles").await?;
        *lock(&self.trust_bundles) = Some(found.clone());
        Some(found)
    }

    async fn read_back(&self, bundle: &str) -> Result<Vec<String>, String> {
        let want = cert_set(bundle);
        let mut lagging = Vec::new();
        if let Some(cm) = &self.writers.root_configmap {
            let api: Api<ConfigMap> = Api::all(self.client.clone());
            let params = ListParams::default()
                .fields(&format!("metadata.name={}", cm.name))
                .labels(&format!("{}={}", super::MANAGED_BY.0, super::MANAGED_BY.1));
            let list = api
                .list(&params)
                .await
                .map_err(|e| format!("listing the root ConfigMaps: {e}"))?;
            for item in list.items {
                let have = item
                    .data
                    .as_ref()
                    .and_then(|d| d.get(ROOT_KEY))
                    .map(String::as_str)
                    .unwrap_or("");
                if cert_set(have) != want {
                    lagging.push(format!(
                        "ConfigMap {}/{}",
                        item.metadata.namespace.unwrap_or_default(),
                        cm.name
                    ));
                }
            }
        }
        if !self.writers.trust_bundle_signers.is_empty()
            && let Some(resource) = self.trust_bundle_resource().await
        {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            for signer in &self.writers.trust_bundle_signers {
                let name = object_name(signer);
                let have = api
                    .get_opt(&name)
                    .await
                    .map_err(|e| format!("reading ClusterTrustBundle {name}: {e}"))?
                    .and_then(|o| o.data["spec"]["trustBundle"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                if cert_set(&have) != want {
                    lagging.push(format!("ClusterTrustBundle {name}"));
                }
            }
        }
        if let Some(secret) = &self.writers.istiod_secret {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &secret.namespace);
            let have = api
                .get_opt(&secret.name)
                .await
                .map_err(|e| format!("reading Secret {}/{}: {e}", secret.namespace, secret.name))?
                .and_then(|s| s.data)
                .and_then(|d| {
                    d.get("ca.crt")
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                })
                .unwrap_or_default();
            if cert_set(&have) != want {
                lagging.push(format!("Secret {}/{}", secret.namespace, secret.name));
            }
        }
        Ok(lagging)
    }
}

/// The certificates of a PEM bundle, as a set (order and duplicates aside; the
/// ClusterTrustBundle keeps CA certificates only, which roots are).
fn cert_set(pem: &str) -> BTreeSet<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| c.as_ref().to_vec())
        .collect()
}

impl Shared for RotationConfigMap {
    fn read(&self) -> SharedFuture<'_, State> {
        Box::pin(async move {
            let cm = self
                .api()
                .get_opt(NAME)
                .await
                .map_err(|e| format!("reading ConfigMap {}/{NAME}: {e}", self.namespace))?;
            let Some(data) = cm.and_then(|cm| cm.data) else {
                return Ok(State::default());
            };
            let record = match data.get(RECORD_KEY) {
                Some(json) => Some(serde_json::from_str::<Record>(json).map_err(|e| {
                    format!(
                        "ConfigMap {}/{NAME}, {RECORD_KEY}: not a rotation record Signet wrote: {e}",
                        self.namespace
                    )
                })?),
                None => None,
            };
            let reports = data
                .iter()
                .filter_map(|(k, v)| {
                    let replica = k.strip_prefix("replica.")?.strip_suffix(".json")?;
                    // A report that does not parse is no evidence; it is rewritten
                    // by its replica or pruned.
                    Some((replica.to_owned(), serde_json::from_str::<Report>(v).ok()?))
                })
                .collect();
            Ok(State {
                record,
                abort: data.contains_key(ABORT_KEY),
                reports,
            })
        })
    }

    fn write(&self, record: &Record, aborted: bool) -> SharedFuture<'_, ()> {
        let json = serde_json::to_string(record).unwrap_or_default();
        Box::pin(async move {
            let mut data = json!({ RECORD_KEY: json });
            if aborted {
                data[ABORT_KEY] = serde_json::Value::Null;
            }
            self.merge(data).await
        })
    }

    fn report(&self, replica: &str, report: &Report) -> SharedFuture<'_, ()> {
        let key = format!("replica.{replica}.json");
        let json = serde_json::to_string(report).unwrap_or_default();
        Box::pin(async move { self.merge(json!({ key: json })).await })
    }

    fn request_abort(&self) -> SharedFuture<'_, ()> {
        Box::pin(async move { self.merge(json!({ ABORT_KEY: "requested" })).await })
    }

    fn forget(&self, replicas: Vec<String>) -> SharedFuture<'_, ()> {
        Box::pin(async move {
            let data: serde_json::Map<String, serde_json::Value> = replicas
                .iter()
                .map(|r| (format!("replica.{r}.json"), serde_json::Value::Null))
                .collect();
            self.merge(serde_json::Value::Object(data)).await
        })
    }

    fn lagging(&self, bundle: &str) -> SharedFuture<'_, Vec<String>> {
        let bundle = bundle.to_owned();
        Box::pin(async move { self.read_back(&bundle).await })
    }

    fn event(&self, stage: Stage, note: String) -> SharedFuture<'_, ()> {
        Box::pin(async move {
            let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                k8s_openapi::jiff::Timestamp::now(),
            );
            let mut event = Event {
                action: Some("Rotate".into()),
                event_time: Some(now),
                note: Some(note.chars().take(1024).collect()),
                reason: Some(format!("Stage{}", capitalized(stage.name()))),
                regarding: Some(ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("ConfigMap".into()),
                    name: Some(NAME.into()),
                    namespace: Some(self.namespace.clone()),
                    ..Default::default()
                }),
                reporting_controller: Some(format!("{REPORTER}/rotation")),
                reporting_instance: Some(self.replica.clone()),
                type_: Some("Normal".into()),
                ..Default::default()
            };
            event.metadata.generate_name = Some(format!("{NAME}-"));
            Api::<Event>::namespaced(self.client.clone(), &self.namespace)
                .create(&PostParams::default(), &event)
                .await
                .map(|_| ())
                .map_err(|e| format!("creating an Event in {}: {e}", self.namespace))
        })
    }

    fn replica(&self) -> &str {
        &self.replica
    }

    fn place(&self) -> String {
        format!("ConfigMap {}/{NAME}", self.namespace)
    }
}

/// The other clusters on the shared root: each one's `signet-ca-rotation`, read
/// through the kubeconfig this CA already has for it (`--remote-cluster`), in the
/// same namespace as this cluster's.
pub struct RemoteRotations {
    namespace: String,
    clusters: Vec<(String, kube::Client)>,
}

impl std::fmt::Debug for RemoteRotations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteRotations")
            .field("namespace", &self.namespace)
            .field(
                "clusters",
                &self.clusters.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl RemoteRotations {
    /// Reads `namespace/signet-ca-rotation` in each of `clusters`.
    pub fn new(namespace: String, clusters: Vec<(String, kube::Client)>) -> Self {
        Self {
            namespace,
            clusters,
        }
    }
}

impl Peers for RemoteRotations {
    fn read(&self) -> SharedFuture<'_, Vec<Peer>> {
        Box::pin(async move {
            let mut peers = Vec::with_capacity(self.clusters.len());
            for (cluster, client) in &self.clusters {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), &self.namespace);
                let record = match api.get_opt(NAME).await {
                    Err(e) => Err(e.to_string()),
                    Ok(cm) => match cm
                        .and_then(|c| c.data)
                        .and_then(|d| d.get(RECORD_KEY).cloned())
                    {
                        None => Ok(None),
                        Some(json) => serde_json::from_str::<Record>(&json)
                            .map(Some)
                            .map_err(|e| format!("{RECORD_KEY}: {e}")),
                    },
                };
                peers.push(Peer {
                    cluster: cluster.clone(),
                    record,
                });
            }
            Ok(peers)
        })
    }
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_compare_as_sets_of_certificates() {
        let a = rcgen::generate_simple_self_signed(vec!["a".into()])
            .unwrap()
            .cert
            .pem();
        let b = rcgen::generate_simple_self_signed(vec!["b".into()])
            .unwrap()
            .cert
            .pem();
        assert_eq!(
            cert_set(&(a.clone() + &b)),
            cert_set(&(b.clone() + &a + &a))
        );
        assert_ne!(cert_set(&a), cert_set(&(a.clone() + &b)));
        assert!(cert_set("").is_empty());
        assert_eq!(capitalized("distribute"), "Distribute");
    }
}
