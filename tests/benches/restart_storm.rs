//! A restart storm in JWKS mode: every identity of a cluster asks for its certificate
//! at once (a CA outage ends, a whole fleet restarts). Each identity has its own
//! token and key, made before the clock starts, so no cache helps; each retries
//! `RESOURCE_EXHAUSTED` and `UNAVAILABLE` with the agent's own backoff (0.5 s doubling
//! to 60 s, jittered). In the same run, the steady-state rate of the same CA (64
//! clients looping), so the storm can be held against `identities / rate`.
//!
//! `cargo bench -p signet-e2e --bench restart_storm`; SIGNET_STORM_IDENTITIES sets the
//! number of identities (default 100,000), SIGNET_BENCH_SECS the steady phase (5 s).
//! Tokens are ES256 (signing 100,000 RS256 tokens would take minutes here); the CA's
//! default limits apply (`--max-pending` 512, `--max-connections` 4096).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use signet_agent::rotation::Backoff;
use signet_e2e::{JwtIssuer, TestCa, TestRoot, request};
use tonic::Code;

/// Connections the fleet shares (the CA allows 100 streams on each).
const CONNECTIONS: usize = 1000;
/// Clients of the steady phase.
const STEADY_CLIENTS: usize = 64;

fn main() {
    let n: usize = std::env::var("SIGNET_STORM_IDENTITIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let secs: u64 = std::env::var("SIGNET_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());

    let dir = tempfile::tempdir().unwrap();
    let root = TestRoot::p256("Storm Root");
    let cacerts = dir.path().join("cacerts");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    root.write_cacerts(&cacerts, "Storm Intermediate", &key, Some(0), &[]);
    let issuer = Arc::new(JwtIssuer::new("storm"));

    let made = Instant::now();
    let identities = Arc::new(identities(&issuer, n, cores));
    println!(
        "signet-ca restart storm, JWKS mode: {n} identities (each its own ES256 token and P-256 key, made in {:.1} s before the clock starts), {cores} cores, P-256 intermediate, {CONNECTIONS} connections",
        made.elapsed().as_secs_f64()
    );

    let ca_rt = signet_e2e::named_runtime("signet-ca");
    let client_rt = signet_e2e::named_runtime("bench-client");
    let ca = ca_rt.block_on(TestCa::start(&signet_e2e::jwt_ca_args(
        dir.path(),
        &issuer,
        &cacerts,
    )));

    client_rt.block_on(async {
        let mut channels = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            channels.push(ca.client(&root.pem).await);
        }

        // Steady state: 64 clients, one request after another, for `secs`.
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut steady = Vec::new();
        for (i, client) in channels.iter().take(STEADY_CLIENTS).enumerate() {
            let mut client = client.clone();
            let (ids, stop, done) = (identities.clone(), stop.clone(), done.clone());
            steady.push(tokio::spawn(async move {
                let mut k = i;
                while !stop.load(Ordering::Relaxed) {
                    let (token, csr) = &ids[k % ids.len()];
                    if client
                        .create_certificate(request(csr, Some(token), 0))
                        .await
                        .is_ok()
                    {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    k += STEADY_CLIENTS;
                }
            }));
        }
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        for t in steady {
            t.await.unwrap();
        }
        let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        let ideal = n as f64 / rate;
        println!("  steady state: {rate:.0} certificates/s with {STEADY_CLIENTS} clients, so {n} ideally take {ideal:.1} s");

        // The storm: every identity at once.
        let exhausted = Arc::new(AtomicU64::new(0));
        let unavailable = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut fleet = Vec::with_capacity(n);
        for i in 0..n {
            let mut client = channels[i % CONNECTIONS].clone();
            let (ids, exhausted, unavailable) =
                (identities.clone(), exhausted.clone(), unavailable.clone());
            fleet.push(tokio::spawn(async move {
                let (token, csr) = &ids[i];
                let mut backoff = Backoff::default();
                let mut jitter = Jitter(i as u64 * 2 + 1);
                loop {
                    let t = Instant::now();
                    match client
                        .create_certificate(request(csr, Some(token), 0))
                        .await
                    {
                        Ok(_) => return (t.elapsed(), started.elapsed()),
                        Err(s) if s.code() == Code::ResourceExhausted => {
                            exhausted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(s) if s.code() == Code::Unavailable => {
                            unavailable.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(s) => panic!("identity {i}: {s:?}"),
                    }
                    tokio::time::sleep(backoff.next_delay(jitter.unit())).await;
                }
            }));
        }
        let mut admitted = Vec::with_capacity(n);
        let mut last = Duration::ZERO;
        let mut at_half = Duration::ZERO;
        let mut finish: Vec<Duration> = Vec::with_capacity(n);
        for t in fleet {
            let (latency, at) = t.await.unwrap();
            admitted.push(latency);
            finish.push(at);
            last = last.max(at);
        }
        finish.sort();
        if let Some(h) = finish.get(n / 2) {
            at_half = *h;
        }
        admitted.sort();
        let pct = |p: f64| admitted[((n as f64 * p) as usize).min(n - 1)];
        let total = last.as_secs_f64();
        println!(
            "  storm: all {n} certified in {total:.1} s ({:.2} x the ideal; target <= 1.2), half by {:.1} s, {:.0} certificates/s overall",
            total / ideal,
            at_half.as_secs_f64(),
            n as f64 / total
        );
        println!(
            "  admitted requests: p50 {:.1} ms, p99 {:.1} ms; refusals: {} RESOURCE_EXHAUSTED, {} UNAVAILABLE ({:.2} per identity)",
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            exhausted.load(Ordering::Relaxed),
            unavailable.load(Ordering::Relaxed),
            (exhausted.load(Ordering::Relaxed) + unavailable.load(Ordering::Relaxed)) as f64
                / n as f64
        );
    });
    ca_rt.block_on(ca.stop());
}

/// `n` identities, `bench-<i>/sa`: an ES256 token each and a CSR for a fresh P-256 key,
/// made on every core.
fn identities(issuer: &Arc<JwtIssuer>, n: usize, cores: usize) -> Vec<(String, String)> {
    let per = n.div_ceil(cores);
    let workers: Vec<_> = (0..cores)
        .map(|c| {
            let issuer = issuer.clone();
            std::thread::spawn(move || {
                (c * per..((c + 1) * per).min(n))
                    .map(|i| {
                        let token = issuer.token(&format!("bench-{i}"), "sa");
                        let (_, csr) = signet_e2e::csr(None);
                        (token, csr)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect()
}

/// A small xorshift for the backoff's jitter (the agent draws it at random).
struct Jitter(u64);

impl Jitter {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}
