//! Every answer a CA can get wrong, fed to the agent's rotation by a fake CA that
//! signs with signet-ca's real signer: each is refused with a clear reason and the
//! certificate already held keeps being served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{Arc, Mutex},
    time::Duration as StdDuration,
};

use signet_agent::{
    identity::caclient::{CaClient, CaError, SignFuture},
    identity::keys::KeyType,
    identity::rotation::{Rotation, SystemClock},
    metrics::Metrics,
    secrets::store::SecretStore,
};
use signet_ca::keys::{cacerts, signer::Signer};
use spiffe::SpiffeId;
use time::{Duration, OffsetDateTime};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    Good,
    Garbage,
    LeafOnly,
    WrongIdentity,
    WrongKey,
    Expired,
    OtherRoots,
    Refused,
    /// Refused for overload, asking to come back in 2 s.
    Overloaded,
}

struct FakeCa {
    signer: Signer,
    stranger: Signer,
    script: Mutex<Vec<Answer>>,
}

impl FakeCa {
    fn new(script: Vec<Answer>) -> Self {
        let now = OffsetDateTime::now_utc();
        let make = || {
            let dir = tempfile::tempdir().unwrap();
            Signer::new(
                cacerts::load_or_create_self_signed(dir.path(), "cluster.local", now).unwrap(),
                now,
            )
            .unwrap()
        };
        Self {
            signer: make(),
            stranger: make(),
            script: Mutex::new(script),
        }
    }
}

impl CaClient for FakeCa {
    fn sign<'a>(&'a self, csr: &'a str, ttl: Duration) -> SignFuture<'a> {
        Box::pin(async move {
            let answer = {
                let mut script = self.script.lock().unwrap();
                if script.len() > 1 {
                    script.remove(0)
                } else {
                    script[0]
                }
            };
            let checked = signet_ca::issue::csr::check(csr).unwrap();
            let me = SpiffeId::new(&checked.uri_sans[0]).unwrap();
            let now = OffsetDateTime::now_utc();
            let sign = |signer: &Signer, spki: &[u8], id: &SpiffeId, at: OffsetDateTime| {
                signet_e2e::istio_chain(
                    signer
                        .sign(spki, id, &signer.window(ttl, at).unwrap())
                        .unwrap(),
                )
            };
            Ok(match answer {
                Answer::Good => sign(&self.signer, &checked.spki, &me, now),
                Answer::Garbage => vec!["garbage".into(), "more garbage".into()],
                Answer::LeafOnly => vec![sign(&self.signer, &checked.spki, &me, now).remove(0)],
                Answer::WrongIdentity => {
                    let other =
                        SpiffeId::new("spiffe://cluster.local/ns/kube-system/sa/admin").unwrap();
                    sign(&self.signer, &checked.spki, &other, now)
                }
                Answer::WrongKey => {
                    let key = rcgen::KeyPair::generate().unwrap();
                    use rcgen::PublicKeyData;
                    sign(&self.signer, &key.subject_public_key_info(), &me, now)
                }
                Answer::Expired => sign(&self.signer, &checked.spki, &me, now - Duration::days(2)),
                Answer::OtherRoots => {
                    let mut chain = sign(&self.signer, &checked.spki, &me, now);
                    let last = chain.len() - 1;
                    chain[last] = self.stranger.roots_pem().to_owned();
                    chain
                }
                Answer::Refused => {
                    return Err(CaError::Refused {
                        code: tonic::Code::Unauthenticated,
                        message: "bad token".into(),
                    });
                }
                Answer::Overloaded => {
                    return Err(CaError::Overloaded {
                        code: tonic::Code::ResourceExhausted,
                        message: "the signing queue is full".into(),
                        retry_in: PUSHBACK,
                    });
                }
            })
        })
    }
}

/// The pushback of [`Answer::Overloaded`]: four times the backoff's first step.
const PUSHBACK: StdDuration = StdDuration::from_secs(2);

fn rotation(ca: Arc<FakeCa>, ttl: Duration) -> Rotation {
    Rotation {
        ca,
        store: SecretStore::new(),
        clock: Arc::new(SystemClock),
        id: SpiffeId::new("spiffe://cluster.local/ns/shop/sa/cart").unwrap(),
        key_type: KeyType::EcP256,
        ttl,
        grace_ratio: 0.5,
        grace_jitter: 0.01,
        metrics: Metrics::new().unwrap(),
        ca_trust: signet_agent::identity::catrust::CaTrust::System,
        trust_sync_timeout: std::time::Duration::from_secs(600),
    }
}

#[tokio::test]
async fn each_bad_answer_is_refused_with_its_reason() {
    for (answer, reason) in [
        (Answer::Garbage, "not a PEM certificate"),
        (Answer::LeafOnly, "answered 1 certificate"),
        (Answer::WrongIdentity, "kube-system/sa/admin"),
        (Answer::WrongKey, "not for our key"),
        (Answer::Expired, "expired"),
        (Answer::OtherRoots, "does not verify"),
        (Answer::Refused, "Unauthenticated"),
    ] {
        let r = rotation(Arc::new(FakeCa::new(vec![answer])), Duration::hours(1));
        let err = r.fetch().await.unwrap_err().to_string();
        assert!(err.contains(reason), "{answer:?}: {err}");
    }
    let r = rotation(
        Arc::new(FakeCa::new(vec![Answer::Good])),
        Duration::hours(1),
    );
    let svid = r.fetch().await.unwrap();
    assert_eq!(
        svid.id.to_string(),
        "spiffe://cluster.local/ns/shop/sa/cart"
    );
    assert_eq!(
        svid.chain_len, 1,
        "the root travels in ROOTCA, not in the chain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_renewal_leaves_the_held_certificate_in_place() {
    let ca = Arc::new(FakeCa::new(vec![Answer::Good, Answer::WrongIdentity]));
    let r = rotation(ca, Duration::seconds(4));
    let store = r.store.clone();
    let metrics = r.metrics.clone();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(r.run(stop));
    // Bounds are generous for a loaded machine; they cost nothing when it is fast.
    let first = signet_e2e::eventually(StdDuration::from_secs(30), "a certificate", async || {
        store.current().map(|s| s.serial.clone())
    })
    .await;
    // The refresh point (about 2 s) passes; every renewal is refused. Polled rather
    // than slept: two refusals come about 2.5 s after the first certificate.
    signet_e2e::eventually(
        StdDuration::from_secs(30),
        "two refused renewals",
        async || (metrics.failed_requests.get() >= 2).then_some(()),
    )
    .await;
    assert_eq!(store.current().unwrap().serial, first);
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

/// A CA refusing for overload with a retry pushback is asked again after the pushback,
/// not after the backoff's first step (250-500 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_cas_pushback_replaces_the_backoff() {
    let ca = Arc::new(FakeCa::new(vec![Answer::Overloaded, Answer::Good]));
    let r = rotation(ca, Duration::hours(1));
    let store = r.store.clone();
    let metrics = r.metrics.clone();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let started = std::time::Instant::now();
    let task = tokio::spawn(r.run(stop));
    while metrics.failed_requests.get() < 1 && started.elapsed() < StdDuration::from_secs(30) {
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
    let refused_at = started.elapsed();
    // Past the backoff's longest first step, well before the pushback ends.
    tokio::time::sleep(StdDuration::from_millis(1200)).await;
    assert!(
        store.current().is_none(),
        "asked again {:?} after the refusal, before its pushback of {PUSHBACK:?}",
        started.elapsed() - refused_at
    );
    assert_eq!(metrics.outgoing_requests.get(), 1);
    while store.current().is_none() && started.elapsed() < StdDuration::from_secs(30) {
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    assert!(
        store.current().is_some(),
        "no certificate after the pushback"
    );
    // `refused_at` is when the poll above saw the refusal, up to a poll's interval
    // (and a busy machine's delay) after it: allowed for, far above the backoff's
    // 500 ms.
    let waited = started.elapsed() - refused_at;
    assert!(
        waited >= PUSHBACK - StdDuration::from_millis(100),
        "{waited:?}"
    );
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

/// The real gRPC client: a CA that cannot be reached (nothing listening) is "no
/// answer" (retried as such), not a refusal.
#[tokio::test]
async fn an_unreachable_ca_is_a_connect_error_not_a_refusal() {
    use clap::Parser;
    use signet_agent::{
        config::{Cli, Command},
        identity::caclient::GrpcCaClient,
    };
    signet_e2e::install_tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "a.b.c").unwrap();
    let root = signet_e2e::TestRoot::p256("Some Root");
    let trust = dir.path().join("root.pem");
    std::fs::write(&trust, &root.pem).unwrap();
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let args = [
        "signet-agent",
        "run",
        "--ca-addr",
        &closed.to_string(),
        "--ca-root-cert",
        trust.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--namespace",
        "shop",
        "--service-account",
        "cart",
    ];
    let Command::Run(run) = Cli::try_parse_from(args).unwrap().command else {
        unreachable!()
    };
    let client = GrpcCaClient::new(run.validate(Vec::new()).unwrap().ca);
    let err = client.sign("csr", Duration::hours(1)).await.unwrap_err();
    assert!(matches!(err, CaError::Connect { .. }), "{err:?}");
}
