//! signet-agent with the real signet-ca: a certificate rotated at half-life reaches
//! the open SDS stream, the agent keeps serving while the CA is down and recovers by
//! itself, and a new root in the CA trust file reaches ROOTCA at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use envoy_types::pb::envoy::{
    extensions::transport_sockets::tls::v3::Secret, service::discovery::v3::DiscoveryRequest,
};
use prost::Message;
use signet_e2e::{
    TestCa,
    agent::{AgentSetup, TestAgent},
    sds::{SECRET_TYPE, fetch, roots, serial, subscribe, tls},
    uri_sans, with_cert,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotates_on_time_and_pushes_to_the_open_stream() {
    let s = AgentSetup::new();
    let ca = TestCa::start(&s.ca_args()).await;
    let agent = TestAgent::start(&s.agent_args(&ca, "shop", "cart", &["--secret-ttl", "4s"])).await;
    agent.wait_ready().await;

    let (tx, mut stream) = subscribe(&s.socket("cart"), &["default"]).await;
    let first = stream.message().await.unwrap().unwrap();
    let first_secret = Secret::decode(first.resources[0].value.as_slice()).unwrap();
    assert_eq!(first_secret.name, "default");
    let (chain, key) = tls(&first_secret);
    assert_eq!(
        uri_sans(&chain),
        vec!["spiffe://cluster.local/ns/shop/sa/cart"]
    );
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    let lifetime = with_cert(&chain, |c| {
        c.validity().not_after.timestamp() - c.validity().not_before.timestamp()
    });
    assert!((4..=5).contains(&lifetime), "{lifetime}");
    // ACK it, as Envoy does.
    tx.send(DiscoveryRequest {
        resource_names: vec!["default".into()],
        type_url: SECRET_TYPE.into(),
        version_info: first.version_info.clone(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Half-life is 2 s (±1 %): the next certificate arrives on the same stream.
    let started = std::time::Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(6), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (chain2, key2) = tls(&Secret::decode(second.resources[0].value.as_slice()).unwrap());
    assert_ne!(serial(&chain), serial(&chain2));
    assert_ne!(key, key2, "each certificate gets a fresh key");
    assert_ne!(first.version_info, second.version_info);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    agent.stop().await;
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_serving_while_the_ca_is_down_then_recovers() {
    let s = AgentSetup::new();
    let ca = TestCa::start(&s.ca_args()).await;
    let addr = ca.grpc;
    let agent = TestAgent::start(&s.agent_args(&ca, "shop", "cart", &["--secret-ttl", "6s"])).await;
    agent.wait_ready().await;
    let before = tls(&fetch(&s.socket("cart"), &["default"]).await[0]).0;
    ca.stop().await;

    // Past the refresh point (3 s) the CA is still down: the valid certificate stays.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = tls(&fetch(&s.socket("cart"), &["default"]).await[0]).0;
    assert_eq!(serial(&before), serial(&during));

    // The CA comes back (same root, same address): the agent renews by itself.
    let ca = TestCa::start_at(&s.ca_args(), addr).await;
    let mut renewed = None;
    for _ in 0..80 {
        let now = tls(&fetch(&s.socket("cart"), &["default"]).await[0]).0;
        if serial(&now) != serial(&before) {
            renewed = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        renewed.is_some(),
        "the agent did not recover after the CA came back"
    );
    agent.stop().await;
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_root_in_the_ca_trust_reaches_rootca_without_waiting_for_rotation() {
    use signet_e2e::{SecretMount, TestRoot};
    let s = AgentSetup::new();
    let root1 = TestRoot::p256("Root One");
    let root2 = TestRoot::p256("Root Two");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let staged = s.dir.path().join("staged");
    root1.write_cacerts(&staged.join("a"), "Intermediate A", &key, Some(0), &[]);
    root1.write_cacerts(
        &staged.join("b"),
        "Intermediate A",
        &key,
        Some(0),
        &[&root1.pem, &root2.pem],
    );
    let mut mount = SecretMount::new(&s.dir.path().join("cacerts"));
    mount.publish(&staged.join("a"));
    let ca = TestCa::start(&s.ca_args_with_cacerts(&mount.dir)).await;

    // The agent trusts the CA through a file, as pods do with istio-ca-root-cert.
    let trust = s.dir.path().join("ca-root.pem");
    std::fs::write(&trust, &root1.pem).unwrap();
    let agent = TestAgent::start(&s.agent_args_trusting(&ca, "shop", "cart", &trust, &[])).await;
    agent.wait_ready().await;

    // Held open: a closed request side would end the stream.
    let (_requests, mut stream) = subscribe(&s.socket("cart"), &["ROOTCA"]).await;
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(
        ::pem::parse_many(roots(
            &Secret::decode(first.resources[0].value.as_slice()).unwrap()
        ))
        .unwrap()
        .len(),
        1
    );

    // Step 2 of a root rotation: the CA bundles both roots, and the trust file that
    // pods mount is updated. The 24-hour certificate is nowhere near its refresh.
    mount.publish(&staged.join("b"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    std::fs::write(&trust, root1.pem.clone() + &root2.pem).unwrap();
    let pushed = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let bundle = roots(&Secret::decode(pushed.resources[0].value.as_slice()).unwrap());
    assert_eq!(::pem::parse_many(&bundle).unwrap().len(), 2, "{bundle}");
    agent.stop().await;
    ca.stop().await;
}
