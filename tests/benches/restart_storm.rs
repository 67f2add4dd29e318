//! A restart storm: every identity of a cluster asks for its certificate at once (a
//! CA outage ends, a whole fleet restarts), in JWKS mode and then in TokenReview mode
//! against the test API server answering in 5 ms and at most 100 reviews a second
//! (429 beyond). Each identity has its own
//! token and key, made before the clock starts, so no cache helps; each retries
//! `RESOURCE_EXHAUSTED` and `UNAVAILABLE` as the agent does: after the CA's retry
//! pushback (`grpc-retry-pushback-ms`) when it sends one, else with the agent's own
//! backoff (0.5 s doubling to 60 s, jittered). In the same run, the steady-state rate of the same CA (64
//! clients looping), so the storm can be held against `identities / rate`. The CA is
//! the release binary in its own process on core 0; the fleet and the API server run
//! in this process on core 1.
//!
//! `cargo build --release -p signet-ca && cargo bench -p signet-e2e --bench
//! restart_storm`; SIGNET_BENCH_CA runs another signet-ca binary instead,
//! SIGNET_STORM_IDENTITIES sets the number of identities (default 100,000),
//! SIGNET_BENCH_SECS the steady phase (5 s), SIGNET_STORM_MODE the modes (`jwks,tokenreview`; TokenReview mode takes at least
//! identities ÷ 100 seconds, 17 minutes for 100,000).
//! Tokens are ES256 (signing 100,000 RS256 tokens would take minutes here); the CA's
//! default limits apply (`--max-pending` 512, `--max-connections` 4096).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use signet_agent::{identity::caclient::retry_pushback, identity::schedule::Backoff};
use signet_e2e::{
    TestRoot,
    fleet::{Jitter, connect, fleet_on_loopback, identities, steady_rate},
    kube::{KubeApi, TokenReviews},
    process::{CaProcess, ca_binary, cpu_time, pin},
    request,
};
use signet_proto::IstioCertificateServiceClient;
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
    let modes = std::env::var("SIGNET_STORM_MODE").unwrap_or_else(|_| "jwks,tokenreview".into());
    // Another build to hold against this one (the commit before a change, say).
    let binary = std::env::var_os("SIGNET_BENCH_CA")
        .map_or_else(|| ca_binary("release"), std::path::PathBuf::from);
    signet_e2e::install_tls_provider();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());

    let dir = tempfile::tempdir().unwrap();
    let root = TestRoot::p256("Storm Root");
    let cacerts = dir.path().join("cacerts");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    root.write_cacerts(&cacerts, "Storm Intermediate", &key, Some(0), &[]);
    let issuer = Arc::new(signet_e2e::JwtIssuer::new("storm"));

    let made = Instant::now();
    let identities = Arc::new(identities(&issuer, n, cores));
    let made = made.elapsed();
    // The CA on a core of its own, the fleet (and the API server) on the other, as
    // ca_throughput measures the steady state: 100,000 clients' own CPU is not the
    // CA's.
    let (ca_cores, fleet_cores) = if cores >= 2 { ("0", "1") } else { ("0", "0") };
    pin(std::process::id(), fleet_cores);
    let client_rt = signet_e2e::named_runtime("bench-client");

    if modes.contains("jwks") {
        println!(
            "signet-ca restart storm, JWKS mode: {n} identities (each its own ES256 token and P-256 key, made in {:.1} s before the clock starts), P-256 intermediate, {CONNECTIONS} connections, the release binary on core {ca_cores}, the fleet on core {fleet_cores}",
            made.as_secs_f64()
        );
        client_rt.block_on(async {
            let mut args = signet_e2e::jwt_ca_args(dir.path(), &issuer, &cacerts);
            args.extend(fleet_on_loopback());
            let ca = CaProcess::start(&binary, &args, ca_cores).await;
            let channels = connect(&ca, &root.pem, CONNECTIONS).await;
            let rate = steady_rate(&channels, &identities, secs, STEADY_CLIENTS).await;
            let ideal = n as f64 / rate;
            println!(
                "  steady state: {rate:.0} certificates/s with {STEADY_CLIENTS} clients, so {n} ideally take {ideal:.1} s"
            );
            let s = storm(&channels, &identities, &ca).await;
            s.print(n, ideal, "the ideal");
        });
    }

    if modes.contains("tokenreview") {
        // The API server on a runtime of its own, on the fleet's core.
        let api_rt = signet_e2e::named_runtime("kube-api");
        let api = api_rt.block_on(KubeApi::start());
        api.set_jwks(&issuer.jwks.to_string());
        api.serve_token_reviews(TokenReviews {
            latency: REVIEW_LATENCY,
            per_second: REVIEWS_PER_SECOND,
            ..TokenReviews::default()
        });
        println!(
            "signet-ca restart storm, TokenReview mode: {n} identities, an API server answering each review in {} ms and {REVIEWS_PER_SECOND} reviews a second (429 beyond), the CA's defaults (--max-token-reviews 64), the release binary on core {ca_cores}, the fleet and the API server on core {fleet_cores}",
            REVIEW_LATENCY.as_millis()
        );
        let mut args = vec![
            "--cacerts-dir".into(),
            cacerts.display().to_string(),
            "--state-dir".into(),
            dir.path().join("state-tokenreview").display().to_string(),
            "--kubeconfig".into(),
            api.kubeconfig(dir.path()).display().to_string(),
        ];
        args.extend(fleet_on_loopback());
        client_rt.block_on(async {
            let ca = CaProcess::start(&binary, &args, ca_cores).await;
            let channels = connect(&ca, &root.pem, CONNECTIONS).await;
            let floor = n as f64 / f64::from(REVIEWS_PER_SECOND);
            let s = storm(&channels, &identities, &ca).await;
            s.print(n, floor, "the API server's limit");
        });
        println!(
            "  TokenReviews: {} sent, {} answered 429; at most {} in flight at once",
            api.calls("POST tokenreviews"),
            api.calls("429 tokenreviews"),
            api.most_reviews_in_flight()
        );
        drop(api_rt);
    }
}

/// TokenReview mode: how long the API server takes to answer, and how many it answers
/// a second.
const REVIEW_LATENCY: Duration = Duration::from_millis(5);
const REVIEWS_PER_SECOND: u32 = 100;

/// What a storm measured.
struct Storm {
    /// Until the last identity held its certificate.
    total: Duration,
    /// Until half of them did.
    half: Duration,
    /// Latency of the requests that were answered with a certificate, sorted.
    admitted: Vec<Duration>,
    /// The same, of those sent after the first minute (when the fleet's first
    /// retries, which come in waves, are over), sorted.
    admitted_later: Vec<Duration>,
    exhausted: u64,
    unavailable: u64,
    /// Refusals that carried a retry pushback.
    pushed: u64,
    /// The CA's CPU time over the storm.
    ca_cpu: Duration,
    /// The CA's own latency histogram of the certificates it issued.
    ca_side: CaSide,
}

/// `signet_ca_create_certificate_duration_seconds{code="Ok"}` as the CA measured it
/// (from its handler's start to its answer: the time a request spent waiting for a
/// token review and for a signing thread, not the time before the server read it).
struct CaSide {
    count: f64,
    /// (upper bound in seconds, certificates answered within it)
    buckets: Vec<(f64, f64)>,
}

impl CaSide {
    fn read(exposition: &str) -> Self {
        let series = "signet_ca_create_certificate_duration_seconds";
        let count = signet_e2e::metric(exposition, &format!("{series}_count{{code=\"Ok\"}}"))
            .unwrap_or(0.0);
        let buckets = ["0.01", "0.1", "1"]
            .iter()
            .map(|le| {
                let within = signet_e2e::metric(
                    exposition,
                    &format!("{series}_bucket{{code=\"Ok\",le=\"{le}\"}}"),
                )
                .unwrap_or(0.0);
                (le.parse().unwrap(), within)
            })
            .collect();
        Self { count, buckets }
    }

    /// What was counted after `before` was read.
    fn minus(self, before: &Self) -> Self {
        Self {
            count: self.count - before.count,
            buckets: self
                .buckets
                .iter()
                .zip(&before.buckets)
                .map(|(&(le, now), &(_, then))| (le, now - then))
                .collect(),
        }
    }
}

impl Storm {
    fn print(&self, n: usize, reference: f64, what: &str) {
        let total = self.total.as_secs_f64();
        println!(
            "  storm: all {n} certified in {total:.1} s ({:.2} x {what}, {reference:.1} s), half by {:.1} s, {:.0} certificates/s overall",
            total / reference,
            self.half.as_secs_f64(),
            n as f64 / total
        );
        let pct = |p: f64| self.admitted[((n as f64 * p) as usize).min(n - 1)];
        println!(
            "  admitted requests: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; refusals: {} RESOURCE_EXHAUSTED, {} UNAVAILABLE ({:.2} per identity), {} of them with a retry pushback",
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            self.admitted[n - 1].as_secs_f64() * 1e3,
            self.exhausted,
            self.unavailable,
            (self.exhausted + self.unavailable) as f64 / n as f64,
            self.pushed
        );
        let answers = n as u64 + self.exhausted + self.unavailable;
        println!(
            "  CA CPU: {:.1} s over the storm ({:.0} % of its core), {:.0} us per answer (certificate or refusal)",
            self.ca_cpu.as_secs_f64(),
            self.ca_cpu.as_secs_f64() / total * 100.0,
            self.ca_cpu.as_secs_f64() * 1e6 / answers as f64
        );
        println!(
            "  the CA's own latency of the {:.0} certificates it issued (its histogram, from its handler's start): {}",
            self.ca_side.count,
            self.ca_side
                .buckets
                .iter()
                .map(|(le, within)| format!(
                    "{:.2} % within {} ms",
                    within / self.ca_side.count.max(1.0) * 100.0,
                    le * 1e3
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let later = &self.admitted_later;
        if !later.is_empty() {
            let pct = |p: f64| later[((later.len() as f64 * p) as usize).min(later.len() - 1)];
            println!(
                "  admitted requests sent after the first minute ({}): p50 {:.1} ms, p99 {:.1} ms",
                later.len(),
                pct(0.50).as_secs_f64() * 1e3,
                pct(0.99).as_secs_f64() * 1e3
            );
        }
    }
}

/// Every identity at once, each retrying with the agent's backoff until it holds a
/// certificate.
async fn storm(
    channels: &[IstioCertificateServiceClient<tonic::transport::Channel>],
    identities: &Arc<Vec<(String, String)>>,
    ca: &CaProcess,
) -> Storm {
    let n = identities.len();
    let ca_pid = ca.pid();
    let cpu_before = cpu_time(ca_pid);
    let (_, metrics_before) = signet_e2e::http_get(ca.http, "/metrics").await.unwrap();
    let exhausted = Arc::new(AtomicU64::new(0));
    let unavailable = Arc::new(AtomicU64::new(0));
    let pushed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut fleet = Vec::with_capacity(n);
    for i in 0..n {
        let mut client = channels[i % channels.len()].clone();
        let (ids, exhausted, unavailable, pushed) = (
            identities.clone(),
            exhausted.clone(),
            unavailable.clone(),
            pushed.clone(),
        );
        fleet.push(tokio::spawn(async move {
            let (token, csr) = &ids[i];
            let mut backoff = Backoff::default();
            let mut jitter = Jitter(i as u64 * 2 + 1);
            loop {
                let t = Instant::now();
                let refusal = match client
                    .create_certificate(request(csr, Some(token), 0))
                    .await
                {
                    Ok(_) => return (t.elapsed(), started.elapsed()),
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        exhausted.fetch_add(1, Ordering::Relaxed);
                        s
                    }
                    Err(s) if s.code() == Code::Unavailable => {
                        unavailable.fetch_add(1, Ordering::Relaxed);
                        s
                    }
                    Err(s) => panic!("identity {i}: {s:?}"),
                };
                // As the agent does: the CA's pushback when it sends one, else the
                // backoff's next step.
                let delay = match retry_pushback(&refusal) {
                    Some(d) => {
                        pushed.fetch_add(1, Ordering::Relaxed);
                        d
                    }
                    None => backoff.next_delay(jitter.unit()),
                };
                tokio::time::sleep(delay).await;
            }
        }));
    }
    let mut admitted = Vec::with_capacity(n);
    let mut admitted_later = Vec::new();
    let mut finish = Vec::with_capacity(n);
    for t in fleet {
        let (latency, at) = t.await.unwrap();
        admitted.push(latency);
        if at.saturating_sub(latency) > Duration::from_secs(60) {
            admitted_later.push(latency);
        }
        finish.push(at);
    }
    let ca_cpu = cpu_time(ca_pid) - cpu_before;
    let (_, exposition) = signet_e2e::http_get(ca.http, "/metrics").await.unwrap();
    finish.sort();
    admitted.sort();
    admitted_later.sort();
    Storm {
        total: finish[n - 1],
        half: finish[n / 2],
        admitted,
        admitted_later,
        exhausted: exhausted.load(Ordering::Relaxed),
        unavailable: unavailable.load(Ordering::Relaxed),
        pushed: pushed.load(Ordering::Relaxed),
        ca_cpu,
        ca_side: CaSide::read(&exposition).minus(&CaSide::read(&metrics_before)),
    }
}
