//! The trust bundle as a ClusterTrustBundle for Signet's signer name, so pods can
//! project it with a `clusterTrustBundle` volume source (by name, or by signer name
//! and the `app.kubernetes.io/managed-by: signet-ca` label). `certificates.k8s.io/v1`
//! from Kubernetes 1.37, `v1beta1` on 1.33 to 1.36: the served version is
//! discovered; with neither, the writer says so once and stops.

use std::sync::Arc;

use k8s_openapi::api::certificates::v1::ClusterTrustBundleSpec;
use kube::{
    Api, ResourceExt,
    api::ApiResource,
    core::{NotUsed, Object},
    runtime::controller::Action,
};
use tokio::sync::watch;

use super::{
    Failures, MANAGED_BY, Tally,
    apply::{WriteError, ensure},
    discover, drain, key_changes, requeue, retry_after, singleton,
};
use crate::keys::signer::Signer;

/// A ClusterTrustBundle of whichever version the API server serves (their specs are
/// the same).
type ClusterTrustBundle = Object<ClusterTrustBundleSpec, NotUsed>;

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
    current: Option<&ClusterTrustBundle>,
    resource: &ApiResource,
    signer: &str,
    bundle: &str,
) -> Option<ClusterTrustBundle> {
    let want = ClusterTrustBundleSpec {
        signer_name: Some(signer.to_owned()),
        trust_bundle: bundle.to_owned(),
    };
    let mut object = current
        .cloned()
        .unwrap_or_else(|| Object::new(&object_name(signer), resource, want.clone()));
    let mut changed = current.is_none();
    let labels = object.labels_mut();
    if labels.get(MANAGED_BY.0).map(String::as_str) != Some(MANAGED_BY.1) {
        labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
        changed = true;
    }
    if object.spec != want {
        object.spec = want;
        changed = true;
    }
    changed.then_some(object)
}

/// What reconciling the bundle reads.
struct Context {
    api: Api<ClusterTrustBundle>,
    resource: ApiResource,
    signer_name: String,
    signer: watch::Receiver<Arc<Signer>>,
    tally: Tally,
    failures: Failures,
}

/// Makes the bundle hold the current roots. `current` is the object as the API server
/// has it, or a skeleton without a `resourceVersion` while it has none.
async fn reconcile(
    current: Arc<ClusterTrustBundle>,
    ctx: Arc<Context>,
) -> Result<Action, WriteError> {
    let name = current.name_any();
    let known = current.resource_version().map(|_| (*current).clone());
    let bundle = ca_bundle(&ctx.signer.borrow());
    let written = ensure(&ctx.api, &name, Some(known), &ctx.tally, |o| {
        desired(o, &ctx.resource, &ctx.signer_name, &bundle)
    })
    .await?;
    if written {
        tracing::info!(object = %name, "ClusterTrustBundle written");
    }
    ctx.failures.succeeded(&name);
    ctx.tally.synced();
    Ok(requeue(None))
}

fn error_policy(current: Arc<ClusterTrustBundle>, error: &WriteError, ctx: Arc<Context>) -> Action {
    retry_after(&ctx.tally, &ctx.failures, &current.name_any(), error)
}

/// Runs the writer until aborted.
pub(super) async fn run(
    client: kube::Client,
    signer_name: String,
    signer: watch::Receiver<Arc<Signer>>,
    tally: Tally,
) {
    let Some(resource) = discover(&client, "ClusterTrustBundle", "clustertrustbundles").await
    else {
        return;
    };
    let name = object_name(&signer_name);
    let api: Api<ClusterTrustBundle> = Api::all_with(client, &resource);
    let skeleton = Object::new(
        &name,
        &resource,
        ClusterTrustBundleSpec {
            signer_name: Some(signer_name.clone()),
            trust_bundle: String::new(),
        },
    );
    tracing::info!(version = %resource.api_version, object = %name, "publishing the trust bundle as a ClusterTrustBundle");
    let controller = singleton(api.clone(), skeleton, resource.clone())
        .reconcile_all_on(key_changes(signer.clone()));
    let writer = tally.name();
    let ctx = Arc::new(Context {
        api,
        resource,
        signer_name,
        signer,
        tally,
        failures: Failures::default(),
    });
    drain(writer, controller.run(reconcile, error_policy, ctx)).await;
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
        assert_eq!(fresh.spec.trust_bundle, "PEM");
        assert_eq!(fresh.spec.signer_name.as_deref(), Some("signet.dev/spiffe"));
        assert_eq!(fresh.name_any(), "signet.dev:spiffe:bundle");
        assert!(desired(Some(&fresh), &resource, "signet.dev/spiffe", "PEM").is_none());
        assert!(desired(Some(&fresh), &resource, "signet.dev/spiffe", "NEW").is_some());
    }
}
