//! Root rotation in four steps across two clusters, with mutual TLS in both
//! directions throughout and no failed handshake (docs/root-rotation.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, sync::Arc, time::Duration};

use signet_e2e::{
    TestCa,
    agent::{AgentSetup, TestAgent},
    mtls::handshake,
    sds::served,
    with_cert,
};

/// One cluster of the root-rotation test: its CA (key material in a kubelet-style
/// mount), and an agent whose CA trust file is what pods mount from
/// `istio-ca-root-cert`.
struct Cluster {
    setup: AgentSetup,
    mount: signet_e2e::SecretMount,
    trust: std::path::PathBuf,
    ca: TestCa,
    agent: TestAgent,
    sa: &'static str,
}

impl Cluster {
    async fn start(name: &'static str, sa: &'static str, initial: &Path, bundle: &str) -> Self {
        let setup = AgentSetup::new();
        let mut mount = signet_e2e::SecretMount::new(&setup.dir.path().join("cacerts"));
        mount.publish(initial);
        let mut ca_args = setup.ca_args_with_cacerts(&mount.dir);
        ca_args.extend(["--cluster-id".into(), name.into()]);
        let ca = TestCa::start(&ca_args).await;
        let trust = setup.dir.path().join("istio-ca-root-cert.pem");
        std::fs::write(&trust, bundle).unwrap();
        let args = setup.agent_args_trusting(
            &ca,
            "mesh",
            sa,
            &trust,
            &["--secret-ttl", "4s", "--cluster-id", name],
        );
        let agent = TestAgent::start(&args).await;
        agent.wait_ready().await;
        Self {
            setup,
            mount,
            trust,
            ca,
            agent,
            sa,
        }
    }

    /// A step of the procedure in this cluster: new key material for the CA, and
    /// the bundle pods trust the CA with.
    fn roll(&mut self, set: &Path, bundle: &str) {
        self.mount.publish(set);
        std::fs::write(&self.trust, bundle).unwrap();
    }

    fn socket(&self) -> std::path::PathBuf {
        self.setup.socket(self.sa)
    }

    async fn stop(self) {
        self.agent.stop().await;
        self.ca.stop().await;
    }
}

/// What a workload's agent serves: (chain, key, roots).
type Served = (String, String, String);
/// A condition on what an agent serves.
type Check = Box<dyn Fn(&Served) -> bool + Send>;

fn issuer_of(chain_pem: &str) -> String {
    with_cert(chain_pem, |c| c.issuer().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_in_four_steps_without_a_failed_handshake() {
    use signet_e2e::TestRoot;
    let staged = tempfile::tempdir().unwrap();
    let s = staged.path();
    let old_root = TestRoot::p256("Old Root");
    let new_root = TestRoot::p256("New Root");
    let both = old_root.pem.clone() + &new_root.pem;
    let key = || rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let (east_old_key, west_old_key) = (key(), key());
    // Step 1 sets: each cluster's intermediate under the old root, old root only.
    old_root.write_cacerts(&s.join("east1"), "East Old", &east_old_key, Some(0), &[]);
    old_root.write_cacerts(&s.join("west1"), "West Old", &west_old_key, Some(0), &[]);
    // Step 2: same intermediates, both roots bundled.
    old_root.write_cacerts(
        &s.join("east2"),
        "East Old",
        &east_old_key,
        Some(0),
        &[&old_root.pem, &new_root.pem],
    );
    old_root.write_cacerts(
        &s.join("west2"),
        "West Old",
        &west_old_key,
        Some(0),
        &[&old_root.pem, &new_root.pem],
    );
    // Step 3: new intermediates under the new root, both roots still bundled.
    let (east_new_key, west_new_key) = (key(), key());
    new_root.write_cacerts(
        &s.join("east3"),
        "East New",
        &east_new_key,
        Some(0),
        &[&old_root.pem, &new_root.pem],
    );
    new_root.write_cacerts(
        &s.join("west3"),
        "West New",
        &west_new_key,
        Some(0),
        &[&old_root.pem, &new_root.pem],
    );
    // Step 4: the old root dropped.
    new_root.write_cacerts(&s.join("east4"), "East New", &east_new_key, Some(0), &[]);
    new_root.write_cacerts(&s.join("west4"), "West New", &west_new_key, Some(0), &[]);

    let mut east = Cluster::start("east", "frontend", &s.join("east1"), &old_root.pem).await;
    let mut west = Cluster::start("west", "backend", &s.join("west1"), &old_root.pem).await;
    let fe = "spiffe://cluster.local/ns/mesh/sa/frontend".to_string();
    let be = "spiffe://cluster.local/ns/mesh/sa/backend".to_string();

    // Workloads keep connecting to each other, in both directions, with exactly
    // what their agents serve at that moment, for the whole procedure.
    let (sockets, ids) = ((east.socket(), west.socket()), (fe.clone(), be.clone()));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Handshakes tried so far, for the end to wait for enough of them.
    let tried = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let traffic = {
        let running = running.clone();
        let tried = tried.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let a = served(&sockets.0).await;
                let b = served(&sockets.1).await;
                for (srv, cli, srv_id, cli_id) in
                    [(&b, &a, &ids.1, &ids.0), (&a, &b, &ids.0, &ids.1)]
                {
                    match handshake(srv, cli, srv_id, cli_id).await {
                        Ok(()) => ok += 1,
                        Err(e) => failed.push(format!(
                            "{e} (server issued by {}, client by {})",
                            issuer_of(&srv.0),
                            issuer_of(&cli.0)
                        )),
                    }
                    tried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failed)
        })
    };

    // 60 s at most: generous for a loaded machine, free when it is fast.
    let wait_for = |socket: std::path::PathBuf, what: &'static str, want: Check| async move {
        let what = format!("{}: {what}", socket.display());
        signet_e2e::eventually(Duration::from_secs(60), &what, async || {
            want(&served(&socket).await).then_some(())
        })
        .await;
    };
    let roots_count = |n: usize| -> Check {
        Box::new(move |x| ::pem::parse_many(&x.2).map(|p| p.len()) == Ok(n))
    };
    let issued_by = |cn: &'static str| -> Check { Box::new(move |x| issuer_of(&x.0).contains(cn)) };

    // Step 1 runs for a moment, then step 2: bundles grow, ROOTCA follows without restarts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    east.roll(&s.join("east2"), &both);
    west.roll(&s.join("west2"), &both);
    wait_for(east.socket(), "ROOTCA with both roots", roots_count(2)).await;
    wait_for(west.socket(), "ROOTCA with both roots", roots_count(2)).await;

    // Step 3: new intermediates; new leaves chain to the new root.
    east.roll(&s.join("east3"), &both);
    west.roll(&s.join("west3"), &both);
    wait_for(east.socket(), "a leaf from East New", issued_by("East New")).await;
    wait_for(west.socket(), "a leaf from West New", issued_by("West New")).await;
    // Every leaf issued under the old root expires within one lifetime (4 s).
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Step 4: the old root goes.
    east.roll(&s.join("east4"), &new_root.pem);
    west.roll(&s.join("west4"), &new_root.pem);
    wait_for(
        east.socket(),
        "ROOTCA with the new root only",
        roots_count(1),
    )
    .await;
    wait_for(
        west.socket(),
        "ROOTCA with the new root only",
        roots_count(1),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Enough traffic for the counts below however slow the machine: it goes on (in
    // the final state) until over 20 handshakes were tried, 60 s at most.
    signet_e2e::eventually(Duration::from_secs(60), "over 20 handshakes", async || {
        (tried.load(std::sync::atomic::Ordering::Relaxed) > 20).then_some(())
    })
    .await;

    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed handshakes of {}: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 20, "only {ok} handshakes");
    let final_east = served(&east.socket()).await;
    assert!(issuer_of(&final_east.0).contains("East New"));

    // The opposite: a workload still holding a leaf under the old root is refused by
    // a peer whose bundle dropped that root too early.
    let stale = {
        // A leaf under the old root, as served before step 3.
        let now = time::OffsetDateTime::now_utc();
        let signer = signet_ca::keys::signer::Signer::new(
            signet_ca::keys::cacerts::load_dir(&s.join("east2"))
                .unwrap()
                .unwrap(),
            now,
        )
        .unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        use rcgen::PublicKeyData;
        let issued = signer
            .sign(
                &key.subject_public_key_info(),
                &spiffe::SpiffeId::new(&fe).unwrap(),
                &signer.window(time::Duration::hours(1), now).unwrap(),
            )
            .unwrap();
        (
            issued.leaf + &issued.chain[0].pem,
            key.serialize_pem(),
            both.clone(),
        )
    };
    let west_now = served(&west.socket()).await;
    let refused = handshake(&west_now, &stale, &be, &fe).await;
    assert!(
        refused.is_err(),
        "an old-root leaf must fail against a bundle without the old root"
    );

    east.stop().await;
    west.stop().await;
}
