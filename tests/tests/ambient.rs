//! Node impersonation (Istio ambient: ztunnel asks for the identities of the pods on
//! its node) against the stateful Kubernetes-shaped API server: pods on two nodes,
//! watched by the CA through the real `kube` client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::http::Method;
use signet_e2e::{
    JwtIssuer, TestCa, TestRoot, csr, jwt_ca_args, kube::KubeApi, openssl_verify, uri_sans,
};
use signet_proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use tonic::{Code, transport::Channel};

const ZTUNNEL_A: (&str, &str) = ("ztunnel-a", "uid-za");

/// A request as ztunnel sends it: its own token, the `clusterid` header, and the
/// target in the `ImpersonatedIdentity` field of the metadata Struct.
fn ztunnel_request(
    token: &str,
    target: &str,
    csr_pem: &str,
    cluster: &str,
) -> tonic::Request<IstioCertificateRequest> {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "ImpersonatedIdentity".to_owned(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(target.to_owned())),
        },
    );
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem.to_owned(),
        validity_duration: 3600,
        metadata: Some(prost_types::Struct { fields }),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req.metadata_mut()
        .insert("clusterid", cluster.parse().unwrap());
    req
}

struct Mesh {
    _dir: tempfile::TempDir,
    api: KubeApi,
    issuer: JwtIssuer,
    root: TestRoot,
    args: Vec<String>,
}

/// Two nodes: ztunnel and `apps/web` on node-a, ztunnel and `apps/db` on node-b.
async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    api.namespaces(&["istio-system", "apps"]);
    api.pod(
        "istio-system",
        ZTUNNEL_A.0,
        ZTUNNEL_A.1,
        "ztunnel",
        "node-a",
    );
    api.pod("istio-system", "ztunnel-b", "uid-zb", "ztunnel", "node-b");
    api.pod("apps", "web-1", "uid-w1", "web", "node-a");
    api.pod("apps", "db-1", "uid-d1", "db", "node-b");
    let issuer = JwtIssuer::new("k1");
    let root = TestRoot::p256("Ambient Root");
    let cacerts = dir.path().join("cacerts");
    root.write_cacerts(
        &cacerts,
        "Ambient Intermediate",
        &rcgen::KeyPair::generate().unwrap(),
        None,
        &[],
    );
    let mut args = jwt_ca_args(dir.path(), &issuer, &cacerts);
    args.extend(
        [
            "--no-token-review",
            "--kubeconfig",
            api.kubeconfig(dir.path()).to_str().unwrap(),
            "--trusted-node-accounts",
            "istio-system/ztunnel",
        ]
        .map(str::to_owned),
    );
    Mesh {
        _dir: dir,
        api,
        issuer,
        root,
        args,
    }
}

impl Mesh {
    fn ztunnel_token(&self) -> String {
        self.issuer
            .pod_token("istio-system", "ztunnel", ZTUNNEL_A.0, ZTUNNEL_A.1)
    }
}

async fn ask(
    client: &mut IstioCertificateServiceClient<Channel>,
    token: &str,
    target: &str,
) -> Result<Vec<String>, tonic::Status> {
    ask_in(client, token, target, "Kubernetes").await
}

/// As ztunnel of cluster `cluster` asks.
async fn ask_in(
    client: &mut IstioCertificateServiceClient<Channel>,
    token: &str,
    target: &str,
    cluster: &str,
) -> Result<Vec<String>, tonic::Status> {
    let (_, csr_pem) = csr(Some(target));
    client
        .create_certificate(ztunnel_request(token, target, &csr_pem, cluster))
        .await
        .map(|r| r.into_inner().cert_chain)
}

fn refused(result: Result<Vec<String>, tonic::Status>, code: Code, words: &[&str]) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    for w in words {
        assert!(
            status.message().contains(w),
            "{w:?} in {:?}",
            status.message()
        );
    }
}

#[tokio::test]
async fn ztunnel_gets_the_identities_of_its_nodes_pods_and_nothing_else() {
    let mesh = mesh().await;
    let ca = TestCa::start(&mesh.args).await;
    let mut client = ca.client(&mesh.root.pem).await;
    let token = mesh.ztunnel_token();
    let web = "spiffe://cluster.local/ns/apps/sa/web";
    let db = "spiffe://cluster.local/ns/apps/sa/db";

    // A pod on ztunnel's node: the certificate names the pod's identity only.
    let chain = ask(&mut client, &token, web).await.unwrap();
    assert_eq!(uri_sans(&chain[0]), [web]);
    openssl_verify(&chain).unwrap();

    // A pod on the other node.
    refused(
        ask(&mut client, &token, db).await,
        Code::PermissionDenied,
        &["not allowed to impersonate", "apps/db", "node-a"],
    );
    // An untrusted caller, even one bound to a pod on the node.
    let web_token = mesh.issuer.pod_token("apps", "web", "web-1", "uid-w1");
    refused(
        ask(&mut client, &web_token, db).await,
        Code::PermissionDenied,
        &["apps/web", "--trusted-node-accounts"],
    );
    // A token whose pod UID is not the pod's (a pod deleted and recreated).
    let stale = mesh
        .issuer
        .pod_token("istio-system", "ztunnel", ZTUNNEL_A.0, "uid-old");
    refused(
        ask(&mut client, &stale, web).await,
        Code::PermissionDenied,
        &["UID"],
    );
    // Bad targets.
    for bad in [
        "spiffe://other.domain/ns/apps/sa/web",
        "spiffe://cluster.local/apps/web",
        "not a uri",
    ] {
        refused(
            ask(&mut client, &token, bad).await,
            Code::InvalidArgument,
            &["ImpersonatedIdentity"],
        );
    }

    // Pods come and go: the watch brings the answer along (30 s at most, generous
    // for a loaded machine).
    mesh.api.remove("pods", "apps", "web-1");
    mesh.api.pod("apps", "db-2", "uid-d2", "db", "node-a");
    let refusal = signet_e2e::eventually(Duration::from_secs(30), "pod changes seen", async || {
        let web_now = ask(&mut client, &token, web).await;
        let db_now = ask(&mut client, &token, db).await;
        match (web_now, db_now) {
            (Err(refusal), Ok(_)) => Some(refusal),
            _ => None,
        }
    })
    .await;
    assert_eq!(refusal.code(), Code::PermissionDenied);
    ca.stop().await;
}

#[tokio::test]
async fn until_the_pods_are_listed_impersonation_is_unavailable_and_readyz_says_why() {
    let mesh = mesh().await;
    mesh.api.inject(Method::GET, "pods", 500, 1_000_000);
    let ca = TestCa::start_unready(&mesh.args, "127.0.0.1:0".parse().unwrap()).await;
    // Well inside the 60 s the CA stays unready waiting for its pod cache.
    let body =
        signet_e2e::eventually(
            Duration::from_secs(45),
            "a readiness answer",
            async || match ca.http_get("/readyz").await {
                Ok((503, body)) if body.contains("pod cache") => Some(body),
                _ => None,
            },
        )
        .await;
    assert!(body.contains("Kubernetes"), "{body}");
    let mut client = ca.client(&mesh.root.pem).await;
    refused(
        ask(
            &mut client,
            &mesh.ztunnel_token(),
            "spiffe://cluster.local/ns/apps/sa/web",
        )
        .await,
        Code::Unavailable,
        &["not synced"],
    );
    // Requests for the caller's own identity do not wait for the pods.
    let (_, csr_pem) = csr(None);
    let own = mesh.issuer.token("apps", "web");
    client
        .create_certificate(signet_e2e::request(&csr_pem, Some(&own), 3600))
        .await
        .unwrap();

    mesh.api.clear_injected();
    // The pod watch retries with backoff (0.8 s doubling, jittered, up to 60 s), so
    // after a long failing start its next list can be far off: 90 s at most. Synced
    // only: after 60 s unsynced, /readyz says 200 too, with "not synced" in it.
    signet_e2e::eventually(
        Duration::from_secs(90),
        "the pod cache to sync",
        async || {
            let ready = ca.http_get("/readyz").await;
            ready
                .is_ok_and(|(c, body)| c == 200 && !body.contains("not synced"))
                .then_some(())
        },
    )
    .await;
    ask(
        &mut client,
        &mesh.ztunnel_token(),
        "spiffe://cluster.local/ns/apps/sa/web",
    )
    .await
    .unwrap();
    ca.stop().await;
}

#[tokio::test]
async fn a_remote_clusters_ztunnel_is_judged_by_that_clusters_pods() {
    let mut mesh = mesh().await;
    // Cluster "west": its own API server (pods), its own token issuer.
    let west = KubeApi::start().await;
    west.namespaces(&["istio-system", "apps"]);
    west.pod("istio-system", "ztunnel-w", "uid-zw", "ztunnel", "node-w");
    west.pod("apps", "cart-1", "uid-c1", "cart", "node-w");
    let west_issuer = JwtIssuer::new("west");
    let west_dir = mesh._dir.path().join("west");
    std::fs::create_dir_all(&west_dir).unwrap();
    let jwks = west_issuer.write_jwks(&west_dir);
    mesh.args.extend([
        "--remote-cluster".to_owned(),
        format!("west={}", west.kubeconfig(&west_dir).display()),
        "--remote-jwks".to_owned(),
        format!("west={},{}", signet_e2e::ISSUER, jwks.display()),
    ]);
    let ca = TestCa::start(&mesh.args).await;
    let mut client = ca.client(&mesh.root.pem).await;
    let token = west_issuer.pod_token("istio-system", "ztunnel", "ztunnel-w", "uid-zw");
    let cart = "spiffe://cluster.local/ns/apps/sa/cart";
    let web = "spiffe://cluster.local/ns/apps/sa/web";
    // Wait for west's pod cache (the CA is ready once the local one is synced).
    let chain =
        signet_e2e::eventually(
            Duration::from_secs(60),
            "west's pod cache",
            async || match ask_in(&mut client, &token, cart, "west").await {
                Ok(chain) => Some(chain),
                Err(s) if s.code() == Code::Unavailable => None,
                Err(s) => panic!("{s:?}"),
            },
        )
        .await;
    assert_eq!(uri_sans(&chain[0]), [cart]);
    // The local cluster's pod on node-a is not west's to ask for, and west's node is
    // not known to the local cluster.
    refused(
        ask_in(&mut client, &token, web, "west").await,
        Code::PermissionDenied,
        &["apps/web", "node-w"],
    );
    refused(
        ask(&mut client, &mesh.ztunnel_token(), cart).await,
        Code::PermissionDenied,
        &["apps/cart", "node-a"],
    );
    ca.stop().await;
}
