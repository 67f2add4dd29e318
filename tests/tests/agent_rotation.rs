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
    metric,
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

    // Half-life is 2 s (±1 %): the next certificate arrives on the same stream. (The
    // timeout is only a backstop; the assertion on the elapsed time below is the check.)
    let started = std::time::Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(30), stream.message())
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
    ca.stop().await;
    // Read once the CA is down (on a slow machine a renewal may come before the stop).
    let before = tls(&fetch(&s.socket("cart"), &["default"]).await[0]).0;
    let failed = || async {
        metric(
            &agent.metrics().await,
            r#"istio_agent_num_failed_outgoing_requests{request_type="csr"}"#,
        )
        .unwrap_or(0.0)
    };
    let failed_before = failed().await;

    // Past the refresh point (3 s) the CA is still down: the renewal fails (waited
    // for rather than slept for), and the valid certificate stays.
    until_more(
        failed_before,
        failed,
        "a failed renewal while the CA is down",
    )
    .await;
    let during = tls(&fetch(&s.socket("cart"), &["default"]).await[0]).0;
    assert_eq!(serial(&before), serial(&during));

    // The CA comes back (same root, same address): the agent renews by itself, at
    // its next retry (backoff from 0.5 s doubling: 60 s at most for a loaded machine).
    let ca = TestCa::start_at(&s.ca_args(), addr).await;
    signet_e2e::eventually(
        Duration::from_secs(60),
        "the agent to recover after the CA came back",
        async || {
            let now = tls(&fetch(&s.socket("cart"), &["default"]).await[0]).0;
            (serial(&now) != serial(&before)).then_some(())
        },
    )
    .await;
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
    let reloads = || async {
        let m = ca.metrics().await;
        metric(&m, r#"signet_ca_cacerts_reloads_total{result="success"}"#).unwrap_or(0.0)
    };
    let before = reloads().await;
    mount.publish(&staged.join("b"));
    // The CA first (waited for, not slept for), then the trust file.
    until_more(before, reloads, "the CA's reload").await;
    std::fs::write(&trust, root1.pem.clone() + &root2.pem).unwrap();
    // The agent looks at the trust file every 5 s, then asks the CA (with backoff
    // while its bundle lags): 60 s at most, generous for a loaded machine.
    let pushed = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let bundle = roots(&Secret::decode(pushed.resources[0].value.as_slice()).unwrap());
    assert_eq!(::pem::parse_many(&bundle).unwrap().len(), 2, "{bundle}");
    agent.stop().await;
    ca.stop().await;
}

/// The roots an agent serves as `ROOTCA`, DER.
async fn served_roots(socket: &std::path::Path) -> std::collections::BTreeSet<Vec<u8>> {
    signet_agent::identity::catrust::roots_of(
        roots(&fetch(socket, &["ROOTCA"]).await[0]).as_bytes(),
    )
}

fn der(pem: &str) -> Vec<u8> {
    ::pem::parse(pem).unwrap().into_contents()
}

/// Waits (`secs` at most) until the agent serves exactly `want` as `ROOTCA`.
async fn until_rootca(socket: &std::path::Path, want: &[&str], secs: u64, what: &str) {
    let want: std::collections::BTreeSet<Vec<u8>> = want.iter().map(|p| der(p)).collect();
    let what = format!("{what}: ROOTCA to hold the {} wanted root(s)", want.len());
    signet_e2e::eventually(Duration::from_secs(secs), &what, async || {
        (served_roots(socket).await == want).then_some(())
    })
    .await;
}

/// Waits (60 s at most) until `read` returns more than `before`. Generous: the agent
/// notices a trust-file change at its next look (every 5 s) and then asks the CA with
/// backoff, so a loaded machine can take well over 10 s.
async fn until_more<F, Fut>(before: f64, mut read: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    signet_e2e::eventually(Duration::from_secs(60), what, async || {
        (read().await > before).then_some(())
    })
    .await;
}

/// One step of a root rotation: the CA's key material `set` and the pods' trust file
/// `bundle`, in the chosen order. The second update waits until the first has had its
/// effect: the agent has asked the CA about the changed trust file (and got the old
/// bundle, since the CA has not reloaded), or the CA has reloaded.
async fn step(
    ca: &TestCa,
    agent: &TestAgent,
    mount: &mut signet_e2e::SecretMount,
    set: &std::path::Path,
    trust: &std::path::Path,
    bundle: &str,
    trust_file_first: bool,
) {
    let requests = || async {
        metric(
            &agent.metrics().await,
            r#"istio_agent_num_outgoing_requests{request_type="csr"}"#,
        )
        .unwrap_or(0.0)
    };
    let reloads = || async {
        let m = ca.metrics().await;
        metric(&m, r#"signet_ca_cacerts_reloads_total{result="success"}"#).unwrap_or(0.0)
    };
    if trust_file_first {
        let before = requests().await;
        std::fs::write(trust, bundle).unwrap();
        until_more(
            before,
            requests,
            "the agent's request after the trust change",
        )
        .await;
        let before = reloads().await;
        mount.publish(set);
        until_more(before, reloads, "the CA's reload").await;
    } else {
        let before = reloads().await;
        mount.publish(set);
        until_more(before, reloads, "the CA's reload").await;
        std::fs::write(trust, bundle).unwrap();
    }
}

/// Adding a root (step 2 of a rotation) and dropping one (step 4) reach the agent's
/// `ROOTCA` within seconds with hour-long certificates (no renewal comes to the
/// rescue), whether the CA's `cacerts` or the agent's trust file (in Kubernetes: the
/// Secret and the ConfigMap, which reach pods independently) is updated first.
async fn bundle_converges(trust_file_first: bool) {
    use signet_e2e::{SecretMount, TestRoot};
    let s = AgentSetup::new();
    let (old, new) = (TestRoot::p256("Old Root"), TestRoot::p256("New Root"));
    let key = || rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let (key_a, key_b) = (key(), key());
    let staged = s.dir.path().join("staged");
    let both = [old.pem.as_str(), new.pem.as_str()];
    old.write_cacerts(&staged.join("1"), "Intermediate", &key_a, Some(0), &[]);
    old.write_cacerts(&staged.join("2"), "Intermediate", &key_a, Some(0), &both);
    new.write_cacerts(&staged.join("3"), "Intermediate", &key_b, Some(0), &both);
    new.write_cacerts(&staged.join("4"), "Intermediate", &key_b, Some(0), &[]);
    let mut mount = SecretMount::new(&s.dir.path().join("cacerts"));
    mount.publish(&staged.join("1"));
    let ca = TestCa::start(&s.ca_args_with_cacerts(&mount.dir)).await;
    let trust = s.dir.path().join("istio-ca-root-cert.pem");
    std::fs::write(&trust, &old.pem).unwrap();
    let agent = TestAgent::start(&s.agent_args_trusting(
        &ca,
        "shop",
        "cart",
        &trust,
        &["--secret-ttl", "1h"],
    ))
    .await;
    agent.wait_ready().await;
    let socket = s.socket("cart");
    until_rootca(&socket, &[&old.pem], 30, "step 1").await;

    step(
        &ca,
        &agent,
        &mut mount,
        &staged.join("2"),
        &trust,
        &(old.pem.clone() + &new.pem),
        trust_file_first,
    )
    .await;
    // The agent's next look at the trust file (every 5 s) or its next retry while
    // the CA's bundle lags (backoff from 1 s doubling): generous for a loaded machine.
    until_rootca(&socket, &both, 60, "step 2 (new root added)").await;
    // Step 3: the CA alone switches to an intermediate under the new root.
    let m = ca.metrics().await;
    let reloads = metric(&m, r#"signet_ca_cacerts_reloads_total{result="success"}"#).unwrap_or(0.0);
    mount.publish(&staged.join("3"));
    until_more(
        reloads,
        || async {
            let m = ca.metrics().await;
            metric(&m, r#"signet_ca_cacerts_reloads_total{result="success"}"#).unwrap_or(0.0)
        },
        "the CA's reload of step 3",
    )
    .await;
    step(
        &ca,
        &agent,
        &mut mount,
        &staged.join("4"),
        &trust,
        &new.pem,
        trust_file_first,
    )
    .await;
    until_rootca(&socket, &[&new.pem], 60, "step 4 (old root dropped)").await;
    agent.stop().await;
    ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_converges_when_the_trust_file_changes_first() {
    bundle_converges(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_converges_when_the_cacerts_change_first() {
    bundle_converges(false).await;
}

/// A trust-file change the CA never reflects (a root nobody loaded into cacerts): the
/// agent asks for a while, then gives up, counts it and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_change_the_ca_never_reflects_is_given_up_on_and_counted() {
    let s = AgentSetup::new();
    let ca = TestCa::start(&s.ca_args()).await;
    let ca_root = std::fs::read_to_string(s.dir.path().join("state/root-cert.pem")).unwrap();
    let trust = s.dir.path().join("istio-ca-root-cert.pem");
    std::fs::write(&trust, &ca_root).unwrap();
    let agent = TestAgent::start(&s.agent_args_trusting(
        &ca,
        "shop",
        "cart",
        &trust,
        &["--secret-ttl", "1h", "--trust-sync-timeout", "2s"],
    ))
    .await;
    agent.wait_ready().await;
    let stranger = signet_e2e::TestRoot::p256("Nobody's Root");
    std::fs::write(&trust, ca_root.clone() + &stranger.pem).unwrap();
    until_more(
        0.0,
        || async {
            metric(
                &agent.metrics().await,
                "signet_agent_trust_sync_timeouts_total",
            )
            .unwrap_or(0.0)
        },
        "giving up on the trust change",
    )
    .await;
    assert_eq!(agent.ready_status().await, 200);
    until_rootca(&s.socket("cart"), &[&ca_root], 1, "after giving up").await;
    agent.stop().await;
    ca.stop().await;
}
