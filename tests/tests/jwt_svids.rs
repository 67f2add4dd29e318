//! JWT-SVIDs end to end: signet-ca mints them (signet.v1.JwtSvidService), signet-agent
//! serves them on the SPIFFE Workload API to rust-spiffe's client (the `spiffe`
//! crate, a client we did not write), and the key set lives in a Secret of the
//! stateful test API server that two replicas share; the caller's share of the
//! signing queue holds for JWT-SVIDs as for certificates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use signet_e2e::{
    TestCa,
    agent::{AgentSetup, TestAgent},
    ca::tls_channel,
    kube::KubeApi,
};
use signet_proto::signet_v1::{
    FetchJwtBundleRequest, MintJwtSvidRequest, jwt_svid_service_client::JwtSvidServiceClient,
};
use spiffe::{TrustDomain, WorkloadApiClient};

const ID: &str = "spiffe://cluster.local/ns/batch/sa/report";

fn mint(token: &str, audience: &[&str]) -> tonic::Request<MintJwtSvidRequest> {
    let mut request = tonic::Request::new(MintJwtSvidRequest {
        audience: audience.iter().map(|a| (*a).to_owned()).collect(),
        ttl_seconds: 0,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// A CA with `ca_flags` and an agent of `batch/report` serving the Workload API,
/// ready, and rust-spiffe's client of it.
async fn start(ca_flags: &[&str]) -> (AgentSetup, TestCa, TestAgent, WorkloadApiClient) {
    let s = AgentSetup::new();
    let mut ca_args = s.ca_args();
    ca_args.extend(ca_flags.iter().map(|f| (*f).to_owned()));
    let ca = TestCa::start(&ca_args).await;
    let socket = s.dir.path().join("spiffe/api.sock");
    let socket_arg = socket.display().to_string();
    let agent = TestAgent::start(&s.agent_args(
        &ca,
        "batch",
        "report",
        &["--workload-api-socket", &socket_arg],
    ))
    .await;
    agent.wait_ready().await;
    let client = WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap();
    (s, ca, agent, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_spiffe_fetches_and_validates_jwt_svids_through_the_agent() {
    let (s, ca, agent, client) = start(&["--jwt-svids"]).await;

    let svid = client.fetch_jwt_svid(["minio"], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), ID);
    assert_eq!(svid.audience(), ["minio"]);
    // Cached per audience set: the same token again (in any order of audiences).
    let again = client.fetch_jwt_svid(["minio"], None).await.unwrap();
    assert_eq!(again.token(), svid.token());
    let two = client
        .fetch_jwt_svid(["vault", "minio"], None)
        .await
        .unwrap();
    let two_again = client
        .fetch_jwt_svid(["minio", "vault"], None)
        .await
        .unwrap();
    assert_ne!(two.token(), svid.token());
    assert_eq!(two.token(), two_again.token());

    // The bundle names the key that signed it, and is the CA's own key set.
    let td = TrustDomain::new("cluster.local").unwrap();
    let bundles = tokio::time::timeout(Duration::from_secs(30), client.fetch_jwt_bundles())
        .await
        .unwrap()
        .unwrap();
    let bundle = bundles.get(&td).expect("our trust domain's JWT bundle");
    assert!(bundle.find_jwt_authority(svid.key_id()).is_some());
    let root = std::fs::read_to_string(s.dir.path().join("state/root-cert.pem")).unwrap();
    let mut direct = JwtSvidServiceClient::new(tls_channel(ca.grpc, &root, None).await);
    let jwks = direct
        .fetch_jwt_bundle(FetchJwtBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwks.trust_domain, "cluster.local");
    let set: serde_json::Value = serde_json::from_slice(&jwks.jwks).unwrap();
    assert_eq!(set["keys"][0]["kid"], svid.key_id());

    // ValidateJWTSVID: the agent checks signature, audience and expiry.
    let valid = client
        .validate_jwt_token("minio", svid.token())
        .await
        .unwrap();
    assert_eq!(valid.spiffe_id().to_string(), ID);
    let wrong = client.validate_jwt_token("other", svid.token()).await;
    assert!(
        wrong.is_err(),
        "a token for minio is not one for another audience"
    );
    agent.stop().await;
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_as_for_certificates() {
    let s = AgentSetup::new();
    let mut args = s.ca_args();
    args.push("--jwt-svids".into());
    let ca = TestCa::start(&args).await;
    let root = std::fs::read_to_string(s.dir.path().join("state/root-cert.pem")).unwrap();
    // A workload certificate, got with the pod's token.
    let (key, csr_pem) = signet_e2e::csr(None);
    let chain = ca
        .client(&root)
        .await
        .create_certificate(signet_e2e::request(
            &csr_pem,
            Some(&s.jwt.token("batch", "report")),
            3600,
        ))
        .await
        .unwrap()
        .into_inner()
        .cert_chain;
    let cert = chain[..chain.len() - 1].concat();
    // Then a JWT-SVID with that certificate alone, no token.
    let channel = tls_channel(ca.grpc, &root, Some((&cert, &key.serialize_pem()))).await;
    let mut c = JwtSvidServiceClient::new(channel);
    let minted = c
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["minio".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(minted.spiffe_id, ID);
    // Without either: UNAUTHENTICATED.
    let mut anonymous = JwtSvidServiceClient::new(tls_channel(ca.grpc, &root, None).await);
    let refused = anonymous
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["minio".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_share_of_the_signing_queue_holds_for_jwt_svids() {
    let s = AgentSetup::new();
    let mut args = s.ca_args();
    // RSA signatures keep the one signing thread busy long enough for callers to
    // queue behind each other.
    args.extend(
        [
            "--jwt-svids",
            "--jwt-key-algorithm",
            "rs256",
            "--signing-threads",
            "1",
            "--max-pending-per-caller",
            "1",
        ]
        .map(str::to_owned),
    );
    let ca = TestCa::start(&args).await;
    let root = std::fs::read_to_string(s.dir.path().join("state/root-cert.pem")).unwrap();
    let channel = tls_channel(ca.grpc, &root, None).await;
    let token = s.jwt.token("batch", "report");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = JwtSvidServiceClient::new(channel.clone());
        let (token, barrier) = (token.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            c.mint_jwt_svid(mint(&token, &["minio"])).await.map(drop)
        }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(s.message().contains("share"), "{}", s.message());
                exhausted += 1;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        ok >= 1 && exhausted >= 1,
        "{ok} minted, {exhausted} refused"
    );
    assert_eq!(
        ca.metric(r#"signet_ca_jwt_svid_refusals_total{code="ResourceExhausted"}"#)
            .await,
        Some(exhausted as f64)
    );
    assert_eq!(
        ca.metric("signet_ca_jwt_svids_issued_total").await,
        Some(ok as f64)
    );
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_key_set_kept_in_a_secret() {
    let s = AgentSetup::new();
    let api = KubeApi::start().await;
    api.namespaces(&["istio-system"]);
    let kubeconfig = api.kubeconfig(s.dir.path());
    let args = |state: &str| {
        let mut args = s.ca_args();
        // Each replica its own state directory: only the Secret is shared.
        let i = args.iter().position(|a| a == "--state-dir").unwrap();
        args[i + 1] = s.dir.path().join(state).display().to_string();
        args.extend(
            [
                "--jwt-svids",
                "--jwt-keys-secret",
                "istio-system/signet-jwt-keys",
                "--no-token-review",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
            ]
            .map(str::to_owned),
        );
        args
    };
    // Both replicas start together: one creates the set, the other takes it.
    let (one, two) = (args("state"), args("state-2"));
    let (first, second) = tokio::join!(TestCa::start(&one), TestCa::start(&two));
    let secret = api
        .get("secrets", "istio-system", "signet-jwt-keys")
        .expect("a replica creates the Secret");
    use base64::Engine;
    let stored = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["jwt-keys.json"].as_str().unwrap())
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&stored).unwrap();
    let kid = doc["keys"][0]["kid"].as_str().unwrap().to_owned();

    let token = s.jwt.token("batch", "report");
    for ca in [&first, &second] {
        let root_path = if std::ptr::eq(ca, &first) {
            "state"
        } else {
            "state-2"
        };
        let root =
            std::fs::read_to_string(s.dir.path().join(root_path).join("root-cert.pem")).unwrap();
        let mut c = JwtSvidServiceClient::new(tls_channel(ca.grpc, &root, None).await);
        let minted = c
            .mint_jwt_svid(mint(&token, &["minio"]))
            .await
            .unwrap()
            .into_inner();
        let header = jsonwebtoken::decode_header(&minted.token).unwrap();
        assert_eq!(
            header.kid.as_deref(),
            Some(kid.as_str()),
            "one key for both replicas"
        );
    }
    assert!(
        !s.dir.path().join("state/jwt-keys.json").exists(),
        "with a Secret, nothing is written to the state directory"
    );
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_jwt_key_reaches_the_open_bundle_stream_before_it_signs() {
    let started = std::time::Instant::now();
    // The shortest rotation: the next key is published 30 s after the first signs,
    // and agents are told to fetch every 7.5 s.
    let (_s, ca, agent, client) = start(&[
        "--jwt-svids",
        "--jwt-key-rotation",
        "1m",
        "--jwt-svid-max-ttl",
        "10s",
        "--jwt-svid-ttl",
        "10s",
    ])
    .await;
    let td = TrustDomain::new("cluster.local").unwrap();
    let mut stream = client.stream_jwt_bundles().await.unwrap();
    let kids = |set: spiffe::JwtBundleSet| -> Vec<String> {
        let bundle = set.get(&td).expect("our trust domain's JWT bundle");
        bundle
            .jwt_authorities()
            .map(|a| a.key_id().to_owned())
            .collect()
    };
    let first = kids(next_set(&mut stream).await);
    assert_eq!(first.len(), 1);
    let signed_by = client.fetch_jwt_svid(["minio"], None).await.unwrap();
    assert_eq!(signed_by.key_id(), first[0]);
    // 30 s for the CA to publish the next key, at most 7.5 s more for the agent to
    // fetch it: pushed on the open stream, well before it signs (at 60 s).
    let second = kids(next_set(&mut stream).await);
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(second.contains(&first[0]), "the signing key stays");
    // Still signed by the first key: the new one is only published (it signs 60 s
    // after the first; a machine too slow to get here in 55 s proves nothing).
    let again = client.fetch_jwt_svid(["vault"], None).await.unwrap();
    if started.elapsed() < Duration::from_secs(55) {
        assert_eq!(again.key_id(), first[0]);
    }
    agent.stop().await;
    ca.stop().await;
}

/// The next JWT bundle set on a stream; 90 s is only a backstop.
async fn next_set<S, E>(stream: &mut S) -> spiffe::JwtBundleSet
where
    S: futures::Stream<Item = Result<spiffe::JwtBundleSet, E>> + Unpin,
    E: std::fmt::Debug,
{
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(90), stream.next())
        .await
        .expect("no message within 90 s")
        .expect("the stream ended")
        .unwrap()
}
