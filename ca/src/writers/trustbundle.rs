//! The trust bundle as a ClusterTrustBundle for Signet's signer name, so pods can
//! project it with a `clusterTrustBundle` volume source (by name, or by signer name
//! and the `app.kubernetes.io/managed-by: signet-ca` label). `certificates.k8s.io/v1`
//! from Kubernetes 1.37, `v1beta1` on 1.33 to 1.36: the served version is
//! discovered; with neither, the writer says so once and stops.

use std::sync::Arc;

use kube::{
    Api,
    api::{ApiResource, DynamicObject},
    runtime::{reflector, watcher},
};
use serde_json::json;
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
};

use super::{Driver, MANAGED_BY, apply::ensure, discover, watch_into};
use crate::signer::Signer;

/// The object's name: the API requires `<signer name with / as :>:` in front.
pub(crate) fn object_name(signer: &str) -> String {
    format!("{}:bundle", signer.replace('/', ":"))
}

/// The trust bundle as the API accepts it: each CA certificate once.
fn ca_bundle(signer: &Signer) -> String {
    let mut seen = std::collections::HashSet::new();
    signer
        .roots()
        .iter()
        .filter(|der| x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| c.is_ca()))
        .filter(|der| seen.insert(der.as_ref().to_vec()))
        .map(|der| signet_spiffe::pem_cert(der))
        .collect()
}

/// The object as it should be, from `current`; `None` when it is.
fn desired(
    current: Option<&DynamicObject>,
    resource: &ApiResource,
    signer: &str,
    bundle: &str,
) -> Option<DynamicObject> {
    let name = object_name(signer);
    let mut object = current
        .cloned()
        .unwrap_or_else(|| DynamicObject::new(&name, resource));
    let mut changed = current.is_none();
    let labels = object.metadata.labels.get_or_insert_with(Default::default);
    if labels.get(MANAGED_BY.0).map(String::as_str) != Some(MANAGED_BY.1) {
        labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
        changed = true;
    }
    let spec = &object.data["spec"];
    if spec["signerName"] != signer || spec["trustBundle"] != bundle {
        // spec.signerName is immutable: an object with another one cannot be
        // fixed by an update (the API server will refuse it, and the error says so).
        object.data["spec"] = json!({ "signerName": signer, "trustBundle": bundle });
        changed = true;
    }
    changed.then_some(object)
}

/// Runs the writer until aborted.
pub(super) async fn run(
    client: kube::Client,
    signer_name: String,
    signer: watch::Receiver<Arc<Signer>>,
    sync: Driver,
) {
    let Some(resource) = discover(&client, "ClusterTrustBundle", "clustertrustbundles").await
    else {
        return;
    };
    let name = object_name(&signer_name);
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let changed = Arc::new(Notify::new());
    let writer = reflector::store::Writer::new(resource.clone());
    let store = writer.as_reader();
    let mut watches = JoinSet::new();
    watches.spawn(watch_into(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
        writer,
        changed.clone(),
        "cluster trust bundle",
    ));
    if store.wait_until_ready().await.is_err() {
        return;
    }
    tracing::info!(version = %resource.api_version, object = %name, "publishing the trust bundle as a ClusterTrustBundle");
    let (api, name, resource, signer_name, sync_ref) =
        (&api, &name, &resource, &signer_name, &sync);
    sync.drive(changed, signer, |current| {
        let known = store
            .get(&reflector::ObjectRef::new_with(name, resource.clone()))
            .map(|o| (*o).clone());
        async move {
            let bundle = &ca_bundle(&current);
            if ensure(api, name, Some(known), sync_ref, |o| {
                desired(o, resource, signer_name, bundle)
            })
            .await?
            {
                tracing::info!(object = %name, "ClusterTrustBundle written");
            }
            Ok(None)
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_contents_follow_the_api_rules() {
        assert_eq!(object_name("signet.dev/spiffe"), "signet.dev:spiffe:bundle");
        let resource = ApiResource {
            group: "certificates.k8s.io".into(),
            version: "v1".into(),
            api_version: "certificates.k8s.io/v1".into(),
            kind: "ClusterTrustBundle".into(),
            plural: "clustertrustbundles".into(),
        };
        let fresh = desired(None, &resource, "signet.dev/spiffe", "PEM").unwrap();
        assert_eq!(fresh.data["spec"]["trustBundle"], "PEM");
        assert_eq!(fresh.data["spec"]["signerName"], "signet.dev/spiffe");
        assert!(desired(Some(&fresh), &resource, "signet.dev/spiffe", "PEM").is_none());
        assert!(desired(Some(&fresh), &resource, "signet.dev/spiffe", "NEW").is_some());
    }
}
