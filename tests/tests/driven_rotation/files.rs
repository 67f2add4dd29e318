//! Trust changes the CA drives (docs/root-rotation.md): the next set is declared once
//! by putting it in --next-cacerts-dir, and the CA goes through distribute, switch
//! and retire by itself while workloads keep connecting to each other: two
//! signet-agents (their trust file is the CA's --root-cert-file, as the root
//! ConfigMap is in a cluster) and a client that renews only at half its lifetime, as
//! ztunnel does, which trusts whatever the last answer said.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use signet_e2e::{
    TestCa, TestRoot,
    agent::{AgentSetup, TestAgent},
    mtls::handshake,
    publish_set,
    sds::served,
    with_cert,
};

const WINDOW: &str = "10s";
const FE: &str = "spiffe://cluster.local/ns/mesh/sa/frontend";
const BE: &str = "spiffe://cluster.local/ns/mesh/sa/backend";
const ZT: &str = "spiffe://cluster.local/ns/mesh/sa/scheduled";

type Served = (String, String, String);

fn key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn issuer_of(chain_pem: &str) -> String {
    with_cert(chain_pem, |c| c.issuer().to_string())
}

fn roots_in(pem: &str) -> usize {
    ::pem::parse_many(pem).map(|p| p.len()).unwrap_or(0)
}

/// An old and a new root, with a set under each in `s/old` and `s/new`.
fn old_and_new(s: &Path) -> (TestRoot, TestRoot) {
    let old_root = TestRoot::p256("Old Root");
    let new_root = TestRoot::p256("New Root");
    old_root.write_cacerts(&s.join("old"), "Old Intermediate", &key(), Some(0), &[]);
    new_root.write_cacerts(&s.join("new"), "New Intermediate", &key(), Some(0), &[]);
    (old_root, new_root)
}

/// The CA, its directories and the workloads' agents.
struct Rig {
    setup: AgentSetup,
    cacerts: PathBuf,
    next: PathBuf,
    trust: PathBuf,
    args: Vec<String>,
    ca: TestCa,
}

impl Rig {
    async fn start(initial: &Path, extra: &[&str]) -> Self {
        Self::start_with(initial, extra, |_| {}).await
    }

    /// [`Self::start`], with `prepare` run on the scratch directory first.
    async fn start_with(initial: &Path, extra: &[&str], prepare: impl FnOnce(&Path)) -> Self {
        let setup = AgentSetup::new();
        prepare(setup.dir.path());
        let cacerts = setup.dir.path().join("cacerts");
        publish_set(initial, &cacerts);
        let next = setup.dir.path().join("cacerts-next");
        let trust = setup.dir.path().join("istio-ca-root-cert.pem");
        let mut args = setup.ca_args_with_cacerts(&cacerts);
        args.extend(
            [
                "--next-cacerts-dir",
                next.to_str().unwrap(),
                "--rotation-window",
                WINDOW,
                "--root-cert-file",
                trust.to_str().unwrap(),
                "--default-ttl",
                "30s",
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let ca = TestCa::start(&args).await;
        Self {
            setup,
            cacerts,
            next,
            trust,
            args,
            ca,
        }
    }

    /// An agent of `sa` with a pod-bound token, 30 s certificates.
    async fn agent(&self, sa: &str) -> TestAgent {
        let args = self.setup.agent_args_trusting(
            &self.ca,
            "mesh",
            sa,
            &self.trust,
            &["--secret-ttl", "30s"],
        );
        let token = self
            .setup
            .jwt
            .pod_token("mesh", sa, &format!("{sa}-0"), &format!("uid-{sa}"));
        std::fs::write(self.setup.token_file(sa), token).unwrap();
        let agent = TestAgent::start(&args).await;
        agent.wait_ready().await;
        agent
    }

    async fn status(&self) -> serde_json::Value {
        let (code, body) = self.ca.http_get("/rotation").await.unwrap();
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn stage(&self) -> String {
        self.status().await["stage"].as_str().unwrap().to_owned()
    }

    /// Waits for `stage`; on timeout, fails with the last status.
    async fn wait_stage(&self, stage: &str, within: Duration) -> serde_json::Value {
        let start = std::time::Instant::now();
        loop {
            let s = self.status().await;
            if s["stage"] == stage {
                return s;
            }
            assert!(
                start.elapsed() < within,
                "no stage {stage} after {within:?}; the CA says {s:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The same CA stopped and started again where it was.
    async fn restarted(self) -> Self {
        let Rig {
            setup,
            cacerts,
            next,
            trust,
            args,
            ca,
        } = self;
        let grpc = ca.grpc;
        ca.stop().await;
        // The old listener may take a moment to close after the stop.
        signet_e2e::eventually(Duration::from_secs(10), "the gRPC port free", async || {
            std::net::TcpListener::bind(grpc).ok().map(drop)
        })
        .await;
        let ca = TestCa::start_at(&args, grpc).await;
        Rig {
            setup,
            cacerts,
            next,
            trust,
            args,
            ca,
        }
    }
}

/// A client that asks for 30 s certificates and renews only at half their lifetime,
/// whatever the CA's bundle does, trusting the roots of its last answer (ztunnel
/// and pilot-agent read the answer's last element as their roots).
struct Scheduled {
    held: Served,
    renew_at: std::time::Instant,
    renewals: u32,
}

impl Scheduled {
    /// What was served, the certificate's lifetime, and how long until it renews.
    async fn fetch(
        ca: std::net::SocketAddr,
        trust: &Path,
        token: &str,
    ) -> (Served, Duration, Duration) {
        Self::try_fetch(ca, trust, token).await.unwrap()
    }

    /// `None` while the CA is away (restarting).
    async fn try_fetch(
        ca: std::net::SocketAddr,
        trust: &Path,
        token: &str,
    ) -> Option<(Served, Duration, Duration)> {
        let (key, csr) = signet_e2e::csr(Some(ZT));
        let ca_roots = std::fs::read_to_string(trust).ok()?;
        let channel = tonic::transport::Channel::from_shared(format!("https://{ca}"))
            .ok()?
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&ca_roots))
                    .domain_name(signet_e2e::SERVER_NAME),
            )
            .ok()?
            .connect()
            .await
            .ok()?;
        let answer = signet_proto::IstioCertificateServiceClient::new(channel)
            .create_certificate(signet_e2e::request(&csr, Some(token), 30))
            .await
            .ok()?
            .into_inner();
        let chain = &answer.cert_chain;
        let roots = chain.last().unwrap().clone();
        // As ztunnel and pilot-agent do: half of NotBefore to NotAfter (NotBefore is
        // backdated), on the wall clock.
        let (lifetime, renew_in) = with_cert(&chain[0], |c| {
            let v = c.validity();
            let (nb, na) = (v.not_before.timestamp(), v.not_after.timestamp());
            let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9;
            let renew_in = (nb as f64 + (na - nb) as f64 / 2.0 - now).max(0.0);
            (
                Duration::from_secs((na - nb) as u64),
                Duration::from_secs_f64(renew_in),
            )
        });
        Some((
            (
                chain[..chain.len() - 1].concat(),
                key.serialize_pem(),
                roots,
            ),
            lifetime,
            renew_in,
        ))
    }
}

/// Handshakes between every pair of workloads until stopped: (ok, failures).
fn traffic(
    sockets: (PathBuf, PathBuf),
    scheduled: Arc<tokio::sync::Mutex<Scheduled>>,
    ca: std::net::SocketAddr,
    trust: PathBuf,
    token: String,
    running: Arc<AtomicBool>,
    tried: Arc<AtomicU32>,
) -> tokio::task::JoinHandle<(u32, Vec<String>)> {
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, Vec::new());
        while running.load(Ordering::Relaxed) {
            let fe = served(&sockets.0).await;
            let be = served(&sockets.1).await;
            let zt = {
                let mut s = scheduled.lock().await;
                if std::time::Instant::now() >= s.renew_at
                    && let Some((held, _, renew_in)) =
                        Scheduled::try_fetch(ca, &trust, &token).await
                {
                    s.held = held;
                    s.renew_at = std::time::Instant::now() + renew_in;
                    s.renewals += 1;
                }
                s.held.clone()
            };
            for (srv, cli, srv_id, cli_id) in [
                (&be, &fe, BE, FE),
                (&fe, &be, FE, BE),
                (&fe, &zt, FE, ZT),
                (&zt, &be, ZT, BE),
            ] {
                match handshake(srv, cli, srv_id, cli_id).await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(format!(
                        "{cli_id} -> {srv_id}: {e} (server issued by {}, client by {}; server trusts {} roots, client {})",
                        issuer_of(&srv.0),
                        issuer_of(&cli.0),
                        roots_in(&srv.2),
                        roots_in(&cli.2),
                    )),
                }
                tried.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (ok, failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_root_rotation_goes_through_every_stage_without_a_failed_handshake() {
    let staged = tempfile::tempdir().unwrap();
    let s = staged.path();
    let (_old_root, new_root) = old_and_new(s);

    let mut rig = Rig::start(&s.join("old"), &[]).await;
    assert_eq!(rig.stage().await, "idle");
    assert_eq!(roots_in(&std::fs::read_to_string(&rig.trust).unwrap()), 1);
    let fe = rig.agent("frontend").await;
    let be = rig.agent("backend").await;
    let zt_token = rig
        .setup
        .jwt
        .pod_token("mesh", "scheduled", "ztunnel-0", "uid-zt");
    let (held, lifetime, renew_in) = Scheduled::fetch(rig.ca.grpc, &rig.trust, &zt_token).await;
    assert!(
        lifetime > Duration::from_secs(25),
        "issued before the declaration: {lifetime:?}"
    );
    let scheduled = Arc::new(tokio::sync::Mutex::new(Scheduled {
        held,
        renew_at: std::time::Instant::now() + renew_in,
        renewals: 0,
    }));
    let running = Arc::new(AtomicBool::new(true));
    let tried = Arc::new(AtomicU32::new(0));
    let traffic = traffic(
        (rig.setup.socket("frontend"), rig.setup.socket("backend")),
        scheduled.clone(),
        rig.ca.grpc,
        rig.trust.clone(),
        zt_token.clone(),
        running.clone(),
        tried.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The one operator step: the next set in place.
    publish_set(&s.join("new"), &rig.next);
    let distribute = rig.wait_stage("distribute", Duration::from_secs(30)).await;
    assert_eq!(distribute["roots"], 2, "{distribute}");
    assert!(distribute["expected_end"].is_string(), "{distribute}");
    assert_eq!(roots_in(&std::fs::read_to_string(&rig.trust).unwrap()), 2);
    // The agents fetch at once on their trust file's change and serve both roots.
    for sa in ["frontend", "backend"] {
        let socket = rig.setup.socket(sa);
        signet_e2e::eventually(
            Duration::from_secs(30),
            "ROOTCA with both roots",
            async || (roots_in(&served(&socket).await.2) == 2).then_some(()),
        )
        .await;
    }
    // The scheduled client has not renewed: the stage waits for it, and names it.
    let waiting = rig.status().await;
    assert_eq!(waiting["stage"], "distribute", "{waiting}");
    let text = signet_ca::rotation::status::Status::text(
        &serde_json::from_value(waiting.clone()).unwrap(),
    );
    assert!(text.contains("stage:        distribute"), "{text}");
    // A restart in the middle of the stage goes on from the record.
    rig = rig.restarted().await;
    assert_eq!(rig.stage().await, "distribute");

    // Distribute ends once the scheduled client renewed (about 30 s after its
    // first certificate); then switch, retire, done with no step in between.
    let done = rig.wait_stage("done", Duration::from_secs(150)).await;
    let stages: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["distribute", "switch", "retire", "done"], "{done}");
    // The figures docs/root-rotation.md quotes.
    eprintln!(
        "stage changes (declared {}): {:#}",
        done["declared_at"], done["history"]
    );
    assert_eq!(done["roots"], 1, "{done}");
    // The old root is gone from every bundle: the trust file, the agents, answers.
    let trust_now = std::fs::read_to_string(&rig.trust).unwrap();
    assert_eq!(trust_now.trim(), new_root.pem.trim());
    for sa in ["frontend", "backend"] {
        let socket = rig.setup.socket(sa);
        signet_e2e::eventually(
            Duration::from_secs(30),
            "ROOTCA with the new root only",
            async || {
                let x = served(&socket).await;
                (x.2.trim() == new_root.pem.trim() && issuer_of(&x.0).contains("New Intermediate"))
                    .then_some(())
            },
        )
        .await;
    }
    let (answer, _, _) = Scheduled::fetch(rig.ca.grpc, &rig.trust, &zt_token).await;
    assert_eq!(answer.2.trim(), new_root.pem.trim());
    // Traffic keeps going in the final state for a moment.
    let seen = tried.load(Ordering::Relaxed);
    signet_e2e::eventually(Duration::from_secs(60), "more handshakes", async || {
        (tried.load(Ordering::Relaxed) > seen + 20).then_some(())
    })
    .await;
    running.store(false, Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed handshakes of {}: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        scheduled.lock().await.renewals >= 2,
        "the scheduled client renewed on its own"
    );

    // The operator makes the next set the CA's own; the CA is idle on it.
    publish_set(&s.join("new"), &rig.cacerts);
    let idle = rig.wait_stage("idle", Duration::from_secs(30)).await;
    assert_eq!(idle["roots"], 1, "{idle}");
    std::fs::remove_dir_all(&rig.next).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rig.stage().await, "idle");
    let metrics = rig.ca.metrics().await;
    assert_eq!(
        signet_e2e::metric(&metrics, "signet_ca_rotation_stage{stage=\"idle\"}"),
        Some(1.0),
    );
    fe.stop().await;
    be.stop().await;
    rig.ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_intermediate_under_the_same_root_needs_no_wait_and_a_bad_next_set_is_refused() {
    let staged = tempfile::tempdir().unwrap();
    let s = staged.path();
    let root = TestRoot::p256("Root");
    let other = TestRoot::p256("Other Root");
    let old_key = key();
    root.write_cacerts(&s.join("old"), "Intermediate 1", &old_key, Some(0), &[]);
    root.write_cacerts(&s.join("new"), "Intermediate 2", &key(), Some(0), &[]);
    // A set whose key is not the certificate's.
    root.write_cacerts(&s.join("bad"), "Intermediate 3", &key(), Some(0), &[]);
    std::fs::write(s.join("bad/ca-key.pem"), key().serialize_pem()).unwrap();
    // A set whose intermediate is not under the root it bundles.
    other.write_cacerts(&s.join("orphan"), "Intermediate 4", &key(), Some(0), &[]);
    std::fs::write(s.join("orphan/root-cert.pem"), &root.pem).unwrap();

    let rig = Rig::start(&s.join("old"), &[]).await;
    let fe = rig.agent("frontend").await;

    for (set, names) in [("bad", "ca-cert.pem"), ("orphan", "root-cert.pem")] {
        publish_set(&s.join(set), &rig.next);
        let refused = signet_e2e::eventually(Duration::from_secs(30), "a refusal", async || {
            let st = rig.status().await;
            st["problem"]
                .as_str()
                .filter(|p| p.contains(names))
                .map(str::to_owned)
        })
        .await;
        assert!(refused.contains(names), "{set}: {refused}");
        assert_eq!(rig.stage().await, "idle", "{set}: nothing distributed");
        assert_eq!(roots_in(&std::fs::read_to_string(&rig.trust).unwrap()), 1);
    }
    assert!(
        signet_e2e::metric(&rig.ca.metrics().await, "signet_ca_rotation_refusals_total").unwrap()
            >= 2.0
    );

    publish_set(&s.join("new"), &rig.next);
    let done = rig.wait_stage("done", Duration::from_secs(30)).await;
    assert_eq!(done["roots"], 1, "the bundle never changed: {done}");
    let socket = rig.setup.socket("frontend");
    // The agent's next certificate comes from the new intermediate (its trust file
    // did not change, so it renews on its schedule: at half of 30 s).
    signet_e2e::eventually(
        Duration::from_secs(60),
        "a leaf of Intermediate 2",
        async || {
            issuer_of(&served(&socket).await.0)
                .contains("Intermediate 2")
                .then_some(())
        },
    )
    .await;
    fe.stop().await;
    rig.ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_in_distribute_drops_the_new_roots_and_is_not_declared_again() {
    let staged = tempfile::tempdir().unwrap();
    let s = staged.path();
    let (old_root, _new_root) = old_and_new(s);
    let rig = Rig::start(&s.join("old"), &[]).await;
    // A caller bound to no pod: its leaf keeps distribute to its latest end.
    let token = rig.setup.jwt.token("mesh", "scheduled");
    Scheduled::fetch(rig.ca.grpc, &rig.trust, &token).await;

    publish_set(&s.join("new"), &rig.next);
    let st = rig.wait_stage("distribute", Duration::from_secs(30)).await;
    assert_eq!(st["complete"], false, "{st}");
    let report = signet_ca::rotation::flags::run(
        signet_ca::rotation::flags::RotationCommand::Abort {
            state_dir: rig.setup.dir.path().join("state"),
        },
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    assert!(report.contains("abort requested"), "{report}");
    let idle = rig.wait_stage("idle", Duration::from_secs(30)).await;
    assert_eq!(idle["roots"], 1, "{idle}");
    assert_eq!(
        std::fs::read_to_string(&rig.trust).unwrap().trim(),
        old_root.pem.trim()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        rig.stage().await,
        "idle",
        "the aborted set is not declared again"
    );
    // Emptied and put back, it is.
    std::fs::remove_dir_all(&rig.next).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    publish_set(&s.join("new"), &rig.next);
    rig.wait_stage("distribute", Duration::from_secs(30)).await;
    rig.ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_that_cannot_be_written_leaves_the_ca_serving_and_declaring_nothing() {
    let staged = tempfile::tempdir().unwrap();
    let s = staged.path();
    old_and_new(s);
    // The state directory (`<dir>/state`) is under a regular file: not even root
    // can create it, as with a read-only root filesystem and no volume.
    let rig = Rig::start_with(&s.join("old"), &[], |dir| {
        std::fs::write(dir.join("state"), "not a directory").unwrap();
    })
    .await;
    // It serves.
    let token = rig
        .setup
        .jwt
        .pod_token("mesh", "scheduled", "zt-0", "uid-zt");
    let ((_, _, roots), _, _) = Scheduled::fetch(rig.ca.grpc, &rig.trust, &token).await;
    assert_eq!(roots_in(&roots), 1);
    // A next set is refused, and the status says why.
    publish_set(&s.join("new"), &rig.next);
    let st = signet_e2e::eventually(Duration::from_secs(30), "the refusal", async || {
        let st = rig.status().await;
        st["problem"]
            .as_str()
            .is_some_and(|p| p.contains("a next set is in place"))
            .then_some(st)
    })
    .await;
    assert_eq!(st["stage"], "idle", "{st}");
    let problem = st["problem"].as_str().unwrap();
    assert!(
        problem.contains("state directory") && problem.contains("--state-dir"),
        "{problem}"
    );
    rig.ca.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_root_is_renewed_and_moved_in_place() {
    let setup = AgentSetup::new();
    let trust = setup.dir.path().join("trust.pem");
    let state = setup.dir.path().join("state");
    let mut args = setup.ca_args();
    args.extend(
        [
            "--root-cert-file",
            trust.to_str().unwrap(),
            "--rotation-window",
            "10s",
            "--default-ttl",
            "10s",
        ]
        .map(String::from),
    );
    let ca = TestCa::start(&args).await;
    let old_root = std::fs::read_to_string(state.join("root-cert.pem")).unwrap();
    assert_eq!(std::fs::read_to_string(&trust).unwrap(), old_root);
    let agent = TestAgent::start(&setup.agent_args_trusting(
        &ca,
        "mesh",
        "frontend",
        &trust,
        &["--secret-ttl", "10s"],
    ))
    .await;
    agent.wait_ready().await;

    let report = signet_ca::rotation::flags::run(
        signet_ca::rotation::flags::RotationCommand::Start {
            self_signed: true,
            state_dir: state.clone(),
            trust_domain: "cluster.local".into(),
        },
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    assert!(report.contains("new self-signed root"), "{report}");
    let status = |ca: &TestCa| {
        let http = ca.http;
        async move {
            let (_, body) = signet_e2e::http_get(http, "/rotation").await.unwrap();
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        }
    };
    // Done, then idle again once the new root is moved into the state directory.
    signet_e2e::eventually(
        Duration::from_secs(90),
        "back to idle on the new root",
        async || {
            let st = status(&ca).await;
            let moved = std::fs::read_to_string(state.join("root-cert.pem")).unwrap() != old_root;
            (st["stage"] == "idle" && moved).then_some(())
        },
    )
    .await;
    let new_root = std::fs::read_to_string(state.join("root-cert.pem")).unwrap();
    assert_ne!(new_root, old_root);
    assert!(!state.join("next").exists());
    assert_eq!(std::fs::read_to_string(&trust).unwrap(), new_root);
    let socket = setup.socket("frontend");
    signet_e2e::eventually(
        Duration::from_secs(30),
        "the agent on the new root",
        async || (served(&socket).await.2 == new_root).then_some(()),
    )
    .await;
    agent.stop().await;
    ca.stop().await;
}
