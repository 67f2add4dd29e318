//! Two workloads complete mutual TLS with only what their agents served, each
//! checking the other's SPIFFE ID; a stranger under another root is refused; trust
//! domains federate through Envoy's SPIFFE validator.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use signet_e2e::{
    TestCa,
    agent::{AgentSetup, TestAgent},
    mtls::{handshake, verifies},
    sds::{fetch, served, spiffe_bundles, tls},
    uri_sans,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workloads_complete_mutual_tls_and_a_stranger_is_refused() {
    let s = AgentSetup::new();
    let ca = TestCa::start(&s.ca_args()).await;
    let a1 = TestAgent::start(&s.agent_args(&ca, "shop", "frontend", &[])).await;
    let a2 = TestAgent::start(&s.agent_args(&ca, "shop", "backend", &[])).await;
    a1.wait_ready().await;
    a2.wait_ready().await;
    let frontend = served(&s.socket("frontend")).await;
    let backend = served(&s.socket("backend")).await;
    let fe = "spiffe://cluster.local/ns/shop/sa/frontend";
    let be = "spiffe://cluster.local/ns/shop/sa/backend";
    handshake(&backend, &frontend, be, fe).await.unwrap();
    handshake(&frontend, &backend, fe, be).await.unwrap();
    // Each side checks who the other is: expecting someone else fails.
    assert!(
        handshake(
            &backend,
            &frontend,
            "spiffe://cluster.local/ns/shop/sa/db",
            fe
        )
        .await
        .is_err()
    );

    // A workload certified by an unrelated CA (another root) is refused.
    let other = AgentSetup::new();
    let other_ca = TestCa::start(&other.ca_args()).await;
    let a3 = TestAgent::start(&other.agent_args(&other_ca, "shop", "frontend", &[])).await;
    a3.wait_ready().await;
    let impostor = served(&other.socket("frontend")).await;
    // Refused for the right reason: the chain does not verify to the other side's
    // bundle (both roots are named O=cluster.local, so webpki finds the "issuer" by
    // name and the signature fails), not a SAN mismatch or an I/O error.
    let err = handshake(&backend, &impostor, be, fe).await.unwrap_err();
    assert!(
        err.contains("chain: InvalidSignatureForPublicKey") || err.contains("chain: UnknownIssuer"),
        "{err}"
    );

    for agent in [a1, a2, a3] {
        agent.stop().await;
    }
    ca.stop().await;
    other_ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_trust_domains_through_the_spiffe_validator() {
    // Two meshes with different trust domains and unrelated roots.
    let a = AgentSetup::new();
    let b = AgentSetup::new();
    let with_td = |mut args: Vec<String>, td: &str| {
        args.extend(["--trust-domain".to_string(), td.to_string()]);
        args
    };
    let ca_a = TestCa::start(&with_td(a.ca_args(), "a.example")).await;
    let ca_b = TestCa::start(&with_td(b.ca_args(), "b.example")).await;
    // Agent A knows B's bundle (and B's file appears only after start, to show the
    // directory is watched).
    let federation = a.dir.path().join("federation");
    std::fs::create_dir_all(&federation).unwrap();
    let mut args = a.agent_args(&ca_a, "shop", "web", &["--trust-domain", "a.example"]);
    args.extend([
        "--federated-bundles".into(),
        federation.display().to_string(),
    ]);
    let agent_a = TestAgent::start(&args).await;
    let agent_b =
        TestAgent::start(&b.agent_args(&ca_b, "shop", "api", &["--trust-domain", "b.example"]))
            .await;
    agent_a.wait_ready().await;
    agent_b.wait_ready().await;
    let only_a = spiffe_bundles(&fetch(&a.socket("web"), &["ALL"]).await[0]);
    assert_eq!(only_a.keys().collect::<Vec<_>>(), ["a.example"]);
    let b_root = std::fs::read_to_string(b.dir.path().join("state/root-cert.pem")).unwrap();
    std::fs::write(federation.join("b.example.pem"), &b_root).unwrap();
    // The directory is read every 2 s; 30 s at most, for a loaded machine.
    drop(only_a);
    let all = signet_e2e::eventually(Duration::from_secs(30), "both bundles in ALL", async || {
        let all = spiffe_bundles(&fetch(&a.socket("web"), &["ALL"]).await[0]);
        (all.len() == 2).then_some(all)
    })
    .await;
    assert_eq!(all.keys().collect::<Vec<_>>(), ["a.example", "b.example"]);
    let just_b = spiffe_bundles(&fetch(&a.socket("web"), &["spiffe://b.example"]).await[0]);
    assert_eq!(just_b.keys().collect::<Vec<_>>(), ["b.example"]);

    // B's workload verifies under B's bundle, never under A's.
    let b_chain = tls(&fetch(&b.socket("api"), &["default"]).await[0]).0;
    assert_eq!(
        uri_sans(&b_chain),
        vec!["spiffe://b.example/ns/shop/sa/api"]
    );
    assert!(verifies(&b_chain, &all["b.example"]));
    assert!(!verifies(&b_chain, &all["a.example"]));
    let a_chain = tls(&fetch(&a.socket("web"), &["default"]).await[0]).0;
    assert!(verifies(&a_chain, &all["a.example"]));
    assert!(!verifies(&a_chain, &all["b.example"]));

    for agent in [agent_a, agent_b] {
        agent.stop().await;
    }
    ca_a.stop().await;
    ca_b.stop().await;
}
