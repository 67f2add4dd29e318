//! The CA's writers against the stateful Kubernetes-shaped API server in
//! `tests/src/kube.rs`, reached by the real `kube` client through a kubeconfig:
//! root ConfigMaps, the ClusterTrustBundle, istiod's Secret, conflicts, leader
//! election between two real `signet-ca` processes, and JWKS from the API server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use axum::http::Method;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use signet_e2e::{
    JwtIssuer, TestCa, TestRoot,
    cluster::{CaProcess, Setup, cacerts, eventually, free_port},
    csr,
    kube::KubeApi,
    metric, openssl_verify, request, sh, uri_sans,
};

const CM: &str = "istio-ca-root-cert";
const SIGNER: &str = "signet.dev/spiffe";
const BUNDLE_OBJECT: &str = "signet.dev:spiffe:bundle";

fn root_of(cm: &Value) -> Option<String> {
    cm["data"]["root-cert.pem"].as_str().map(str::to_owned)
}

/// A writing CA with the root ConfigMap and a ClusterTrustBundle, against an API
/// server with a few namespaces and one terminating; and each ConfigMap once written.
async fn writing_ca(setup: &Setup) -> TestCa {
    let api = &setup.api;
    api.namespaces(&["leaving"]);
    api.terminate_namespace("leaving");
    let ca = setup
        .ca(&[
            "--root-configmap",
            CM,
            "--cluster-trust-bundle-signer",
            SIGNER,
        ])
        .await;
    for ns in ["signet", "default", "kube-system", "apps"] {
        eventually(Duration::from_secs(60), ns, async || {
            api.get("configmaps", ns, CM)
        })
        .await;
    }
    ca
}

#[tokio::test]
async fn every_active_namespace_gets_the_root_configmap_and_the_bundle_is_published() {
    let setup = Setup::new(&["default", "kube-system", "apps"]).await;
    let (api, root) = (&setup.api, &setup.root);
    let ca = writing_ca(&setup).await;

    // Every active namespace gets the bundle, labelled as istiod labels it.
    for ns in ["signet", "default", "kube-system", "apps"] {
        let cm = api.get("configmaps", ns, CM).unwrap();
        assert_eq!(root_of(&cm).unwrap(), root.pem);
        assert_eq!(cm["metadata"]["labels"]["istio.io/config"], "true");
    }
    // Skipped, not tried and refused (the API server refuses creates there anyway).
    assert!(api.get("configmaps", "leaving", CM).is_none());
    assert_eq!(
        api.calls("POST configmaps in leaving"),
        0,
        "a write to a terminating namespace was tried"
    );
    let ctb = eventually(Duration::from_secs(60), "ClusterTrustBundle", async || {
        api.get("clustertrustbundles", "", BUNDLE_OBJECT)
    })
    .await;
    assert_eq!(ctb["spec"]["signerName"], SIGNER);
    assert_eq!(ctb["spec"]["trustBundle"], root.pem.as_str());
    assert_eq!(ctb["apiVersion"], "certificates.k8s.io/v1");
    ca.stop().await;
    // A clean stop hands the Lease back.
    let lease = api.get("leases", "signet", "signet-ca-writer").unwrap();
    assert!(lease["spec"]["holderIdentity"].is_null(), "{lease}");
}

#[tokio::test]
async fn root_configmaps_follow_new_namespaces_deletions_and_edits() {
    let setup = Setup::new(&["default", "kube-system", "apps"]).await;
    let (api, root) = (&setup.api, &setup.root);
    let ca = writing_ca(&setup).await;

    // Through the real client, as a user would: a new namespace, a deleted and an
    // edited ConfigMap.
    let client = api.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut fresh = Namespace::default();
    fresh.metadata.name = Some("newcomer".into());
    namespaces
        .create(&PostParams::default(), &fresh)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "ConfigMap in a new namespace",
        async || api.get("configmaps", "newcomer", CM),
    )
    .await;
    let apps: Api<ConfigMap> = Api::namespaced(client.clone(), "apps");
    apps.delete(CM, &DeleteParams::default()).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "deleted ConfigMap recreated",
        async || api.get("configmaps", "apps", CM),
    )
    .await;
    let default: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    default
        .patch(
            CM,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"root-cert.pem": "tampered"}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "edited ConfigMap restored",
        async || {
            api.get("configmaps", "default", CM)
                .filter(|cm| root_of(cm).as_deref() == Some(root.pem.as_str()))
        },
    )
    .await;
    ca.stop().await;
}

#[tokio::test]
async fn a_reload_reaches_every_configmap_even_an_immutable_one_and_the_bundle() {
    let setup = Setup::new(&["default", "kube-system", "apps"]).await;
    let (api, root) = (&setup.api, &setup.root);
    let ca = writing_ca(&setup).await;
    eventually(Duration::from_secs(60), "ClusterTrustBundle", async || {
        api.get("clustertrustbundles", "", BUNDLE_OBJECT)
    })
    .await;

    // A namespace editor makes it immutable: the next bundle change must still reach
    // that namespace (the ConfigMap is replaced, checked below).
    let client = api.client().await;
    let default: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    default
        .patch(
            CM,
            &PatchParams::default(),
            &Patch::Merge(json!({"immutable": true})),
        )
        .await
        .unwrap();
    assert_eq!(
        api.get("configmaps", "default", CM).unwrap()["immutable"],
        true
    );

    // A reload that adds a second root to the bundle reaches every ConfigMap and the
    // ClusterTrustBundle within seconds (60 s at most, for a loaded machine).
    let other = TestRoot::p256("Next Root");
    root.write_cacerts(
        &setup.cacerts,
        "Writers Intermediate",
        &rcgen::KeyPair::generate().unwrap(),
        None,
        &[&root.pem, &other.pem],
    );
    let both = format!("{}{}", root.pem, other.pem);
    eventually(
        Duration::from_secs(60),
        "bundle update everywhere",
        async || {
            let all = ["signet", "default", "kube-system", "apps"]
                .iter()
                .all(|ns| {
                    api.get("configmaps", ns, CM)
                        .and_then(|c| root_of(&c))
                        .as_deref()
                        == Some(both.as_str())
                });
            let ctb = api.get("clustertrustbundles", "", BUNDLE_OBJECT).unwrap();
            (all && ctb["spec"]["trustBundle"] == both.as_str()).then_some(())
        },
    )
    .await;
    assert!(
        api.get("configmaps", "default", CM).unwrap()["immutable"].is_null(),
        "the immutable ConfigMap was replaced by a mutable one"
    );

    // It leads and counted its writes: four ConfigMaps created and four updated, the
    // bundle created and updated. (A machine stalled past the 2 s renew deadline makes
    // it step down; it takes the Lease back at its next try: polled, 30 s at most.)
    let metrics = eventually(Duration::from_secs(30), "it leads", async || {
        let metrics = ca.metrics().await;
        (metric(&metrics, "signet_ca_leader") == Some(1.0)).then_some(metrics)
    })
    .await;
    assert!(
        metric(
            &metrics,
            "signet_ca_writer_writes_total{writer=\"root-configmap\"}"
        )
        .unwrap()
            >= 8.0
    );
    assert!(
        metric(
            &metrics,
            "signet_ca_writer_writes_total{writer=\"cluster-trust-bundle\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert!(
        metric(
            &metrics,
            "signet_ca_writer_last_sync_timestamp_seconds{writer=\"root-configmap\"}"
        )
        .unwrap()
            > 0.0
    );
    ca.stop().await;
}

#[tokio::test]
async fn a_namespace_selector_limits_the_root_configmap() {
    let setup = Setup::new(&["plain"]).await;
    let api = &setup.api;
    api.put(
        "namespaces",
        json!({"metadata": {"name": "meshed", "labels": {"istio-injection": "enabled"}}}),
    );
    let ca = setup
        .ca(&[
            "--root-configmap",
            CM,
            "--root-configmap-namespace-selector",
            "istio-injection=enabled",
        ])
        .await;
    eventually(Duration::from_secs(60), "selected namespace", async || {
        api.get("configmaps", "meshed", CM)
    })
    .await;
    // The sync that wrote it has finished (it would have written every namespace the
    // watch holds): what is not there now was left out by the selector.
    eventually(Duration::from_secs(60), "a completed sync", async || {
        let metrics = ca.http_get("/metrics").await.ok()?.1;
        let synced = "signet_ca_writer_last_sync_timestamp_seconds{writer=\"root-configmap\"}";
        metric(&metrics, synced).filter(|t| *t > 0.0)
    })
    .await;
    assert!(api.get("configmaps", "plain", CM).is_none());
    assert!(api.get("configmaps", "signet", CM).is_none());
    ca.stop().await;
}

#[tokio::test]
async fn conflicts_are_retried_with_fresh_reads() {
    let setup = Setup::new(&["apps"]).await;
    let (api, root) = (&setup.api, &setup.root);
    let ca = setup.ca(&["--root-configmap", CM]).await;
    eventually(Duration::from_secs(60), "first write", async || {
        api.get("configmaps", "apps", CM)
    })
    .await;

    // Someone edits the ConfigMap; the CA's next two updates are refused as stale.
    api.inject(Method::PUT, "configmaps", 409, 2);
    let mut cm = api.get("configmaps", "apps", CM).unwrap();
    cm["data"]["root-cert.pem"] = json!("someone else's");
    api.put("configmaps", cm);
    eventually(
        Duration::from_secs(60),
        "restored after conflicts",
        async || {
            api.get("configmaps", "apps", CM)
                .filter(|cm| root_of(cm).as_deref() == Some(root.pem.as_str()))
        },
    )
    .await;
    let metrics = ca.metrics().await;
    assert!(
        metric(
            &metrics,
            "signet_ca_writer_conflicts_total{writer=\"root-configmap\"}"
        )
        .unwrap()
            >= 2.0
    );
    // A conflict makes the writer read the object again before the next attempt.
    assert!(api.calls("GET configmaps") >= 2);
    ca.stop().await;
}

#[tokio::test]
async fn cluster_trust_bundle_uses_the_version_the_server_serves() {
    use signet_e2e::kube::{cluster_trust_bundle, default_kinds};
    // Kubernetes 1.33-1.36: v1beta1 only.
    let mut kinds: Vec<_> = default_kinds()
        .into_iter()
        .filter(|k| k.plural != "clustertrustbundles")
        .collect();
    kinds.push(cluster_trust_bundle(&["v1beta1"]));
    let setup = Setup::with_api(KubeApi::start_with(kinds.clone()).await, &[]);
    let (api, root) = (&setup.api, &setup.root);
    let ca = setup.ca(&["--cluster-trust-bundle-signer", SIGNER]).await;
    let ctb = eventually(Duration::from_secs(60), "v1beta1 bundle", async || {
        api.get("clustertrustbundles", "", BUNDLE_OBJECT)
    })
    .await;
    assert_eq!(ctb["apiVersion"], "certificates.k8s.io/v1beta1");
    assert_eq!(ctb["spec"]["trustBundle"], root.pem.as_str());
    ca.stop().await;

    // Neither version: the other writers go on.
    kinds.retain(|k| k.plural != "clustertrustbundles");
    let setup = Setup::with_api(KubeApi::start_with(kinds).await, &["apps"]);
    let api = &setup.api;
    let ca = setup
        .ca(&[
            "--cluster-trust-bundle-signer",
            SIGNER,
            "--root-configmap",
            CM,
        ])
        .await;
    eventually(
        Duration::from_secs(60),
        "ConfigMap without CTB",
        async || api.get("configmaps", "apps", CM),
    )
    .await;
    assert_eq!(api.calls("POST clustertrustbundles"), 0);
    ca.stop().await;
}

/// (tls.crt, tls.key, ca.crt) of the Secret, decoded.
fn secret_files(secret: &Value) -> (String, String, String) {
    use base64::Engine;
    let get = |k: &str| {
        let b64 = secret["data"][k].as_str().unwrap_or("");
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    };
    (get("tls.crt"), get("tls.key"), get("ca.crt"))
}

#[tokio::test]
async fn istiod_secret_is_created_renewed_and_restored() {
    let setup = Setup::new(&["istio-system"]).await;
    let (api, root) = (&setup.api, &setup.root);
    let ca = setup
        .ca(&[
            "--istiod-cert-secret",
            "istio-system/istiod-tls",
            "--istiod-cert-dns-names",
            "istiod.istio-system.svc.cluster.local",
            "--istiod-cert-ttl",
            "12s",
        ])
        .await;
    let secret = eventually(Duration::from_secs(60), "istiod secret", async || {
        api.get("secrets", "istio-system", "istiod-tls")
    })
    .await;
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let (crt, key, ca_crt) = secret_files(&secret);
    assert_eq!(ca_crt, root.pem);
    // The chain verifies with openssl against the bundle, for istiod's names.
    let work = setup.dir.path().join("istiod");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("tls.crt"), &crt).unwrap();
    std::fs::write(work.join("tls.key"), &key).unwrap();
    std::fs::write(work.join("ca.crt"), &ca_crt).unwrap();
    let verified = sh(
        "openssl verify -CAfile ca.crt -untrusted tls.crt -verify_hostname istiod.istio-system.svc -purpose sslserver tls.crt",
        &work,
    );
    assert!(verified.contains("tls.crt: OK"), "{verified}");
    let text = sh("openssl x509 -in tls.crt -noout -ext subjectAltName", &work);
    assert!(
        text.contains("DNS:istiod.istio-system.svc.cluster.local"),
        "{text}"
    );
    // The key is the certificate's.
    let a = sh("openssl x509 -in tls.crt -noout -pubkey", &work);
    let b = sh("openssl pkey -in tls.key -pubout", &work);
    assert_eq!(a, b);
    assert!(
        uri_sans(&crt).is_empty(),
        "no SPIFFE ID in istiod's serving certificate"
    );

    // Renewed at half-life (12 s lifetime); 60 s at most, for a loaded machine.
    let first = signet_e2e::serial(&crt);
    eventually(Duration::from_secs(60), "renewal", async || {
        let s = api.get("secrets", "istio-system", "istiod-tls")?;
        (signet_e2e::serial(&secret_files(&s).0) != first).then_some(())
    })
    .await;

    // Deleted: back at once.
    let client = api.client().await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, "istio-system");
    secrets
        .delete("istiod-tls", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "secret restored", async || {
        api.get("secrets", "istio-system", "istiod-tls")
    })
    .await;
    let metrics = ca.metrics().await;
    assert!(
        metric(
            &metrics,
            "signet_ca_writer_writes_total{writer=\"istiod-secret\"}"
        )
        .unwrap()
            >= 3.0
    );
    ca.stop().await;
}

#[tokio::test]
async fn jwks_is_fetched_from_the_api_server_with_the_callers_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let issuer = JwtIssuer::new("k1");
    api.set_jwks(&issuer.jwks.to_string());
    let (root, cacerts_dir) = cacerts(dir.path());
    let args: Vec<String> = [
        "--cacerts-dir",
        cacerts_dir.to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
        "--jwt-issuer",
        signet_e2e::ISSUER,
        "--jwks",
        "https://kubernetes.default.svc/openid/v1/jwks",
        "--no-token-review",
        "--kubeconfig",
        api.kubeconfig(dir.path()).to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec();
    let ca = TestCa::start(&args).await;
    assert_eq!(api.calls("GET jwks"), 1);
    let mut client = ca.client(&root.pem).await;
    let (_, csr_pem) = csr(None);
    let token = issuer.token("apps", "web");
    let answer = client
        .create_certificate(request(&csr_pem, Some(&token), 3600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        uri_sans(&answer.cert_chain[0]),
        ["spiffe://cluster.local/ns/apps/sa/web"]
    );
    openssl_verify(&answer.cert_chain).unwrap();
    ca.stop().await;
}

fn holder(api: &KubeApi) -> Option<String> {
    api.get("leases", "signet", "signet-ca-writer")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

// Several threads: the test blocks on child processes while the API server, in
// this runtime, must keep answering them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_writer_and_hand_over_when_it_dies() {
    let setup = Setup::new(&["apps"]).await;
    let api = &setup.api;
    let args = setup.args(&["--root-configmap", CM]);
    let mut a = CaProcess::start(&args, free_port(), "replica-a");
    let mut b = CaProcess::start(&args, free_port(), "replica-b");
    // Two processes start and elect: 60 s at most, for a loaded machine.
    let first = eventually(Duration::from_secs(60), "a leader", async || holder(api)).await;
    eventually(Duration::from_secs(60), "ConfigMap", async || {
        api.get("configmaps", "apps", CM)
    })
    .await;
    // Exactly one of them says it leads.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    let leaders = [
        metric(&ma, "signet_ca_leader"),
        metric(&mb, "signet_ca_leader"),
    ];
    assert_eq!(
        leaders.iter().filter(|l| **l == Some(1.0)).count(),
        1,
        "{leaders:?}"
    );
    assert_eq!(
        holder(api).as_deref(),
        Some(first.as_str()),
        "the lease does not flap"
    );

    // The leader dies without a word: the other takes over within the lease time
    // (3 s, counted from the last renewal it saw) plus a retry period.
    let (dead, survivor) = if first == "replica-a" {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    dead.kill();
    let killed = Instant::now();
    // (The bound on `took` below is the check; this one is a backstop.)
    let second = eventually(Duration::from_secs(30), "takeover", async || {
        holder(api).filter(|h| *h != first)
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_millis(3000 + 300 * 2 + 1500),
        "takeover after {took:?}"
    );
    assert_ne!(second, first);
    // The new leader writes: a deleted ConfigMap comes back.
    let client = api.client().await;
    Api::<ConfigMap>::namespaced(client, "apps")
        .delete(CM, &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "new leader restores", async || {
        api.get("configmaps", "apps", CM)
    })
    .await;
    assert_eq!(
        metric(&survivor.metrics().await, "signet_ca_leader"),
        Some(1.0)
    );

    // A clean stop releases the Lease, so a newcomer takes it at once.
    let survivor_is_a = second == "replica-a";
    if survivor_is_a {
        a.terminate()
    } else {
        b.terminate()
    }
    assert_eq!(holder(api), None);
    let released = Instant::now();
    let _c = CaProcess::start(&args, free_port(), "replica-c");
    // (The bound on the elapsed time below is the check; this one is a backstop.)
    eventually(Duration::from_secs(30), "newcomer leads", async || {
        holder(api).filter(|h| h == "replica-c")
    })
    .await;
    assert!(
        released.elapsed() < Duration::from_secs(3),
        "took {:?}",
        released.elapsed()
    );
}
