//! CreateCertificate throughput: 64 concurrent TLS clients with JWKS (RS256) tokens
//! against signet-ca, for a P-256 and an RSA-2048 intermediate. In the same run, the
//! crypto limit: CSR verification + certificate signature + token verification per
//! request on all cores, with nothing else; the ratio of the two is the figure of
//! merit (target >= 0.7).
//!
//! `cargo bench -p signet-e2e --bench ca_throughput`; SIGNET_BENCH_SECS sets the
//! length of each phase (default 5).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rcgen::KeyPair;
use signet_ca::{
    authn::{JwksSource, JwtAuthenticator, JwtConfig, Token},
    cacerts, csr,
    signer::Signer,
};
use signet_e2e::{JwtIssuer, TestCa, TestRoot, request, sh};
use spiffe::SpiffeId;

const CLIENTS: usize = 64;

fn main() {
    let secs: u64 = std::env::var("SIGNET_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let phase = Duration::from_secs(secs);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = rustls::crypto::ring::default_provider().install_default();
    println!(
        "signet-ca CreateCertificate: {CLIENTS} concurrent TLS clients, JWKS (RS256) tokens, P-256 workload keys, {cores} cores, {secs} s per phase"
    );
    println!(
        "{:<14} {:>9} {:>8} {:>8} {:>14} {:>6}",
        "intermediate", "certs/s", "p50 ms", "p99 ms", "crypto limit/s", "ratio"
    );
    let issuer = JwtIssuer::rsa("bench");
    for (name, ca_key) in [
        (
            "P-256",
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        ),
        ("RSA-2048", openssl_rsa(2048)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let root = TestRoot::p256("Bench Root");
        let cacerts_dir = dir.path().join("cacerts");
        root.write_cacerts(&cacerts_dir, "Bench Intermediate", &ca_key, Some(0), &[]);
        let jwks = issuer.write_jwks(dir.path());

        breakdown(name, &cacerts_dir, &jwks, &issuer);
        let limit = crypto_limit(&cacerts_dir, &jwks, &issuer, cores, phase);
        let s = serve_rate(dir.path(), &cacerts_dir, &root.pem, &issuer, phase);
        let server_only = cores as f64 / s.server_cpu_per_cert.as_secs_f64();
        println!(
            "{name:<14} {:>9.0} {:>8.2} {:>8.2} {limit:>14.0} {:>6.2}   server CPU {:.0} us/cert, {:.2} of the limit with the load generator elsewhere",
            s.rate,
            s.p50.as_secs_f64() * 1e3,
            s.p99.as_secs_f64() * 1e3,
            s.rate / limit,
            s.server_cpu_per_cert.as_secs_f64() * 1e6,
            server_only / limit,
        );
    }
}

/// Single-core cost of each step, for the record.
fn breakdown(name: &str, cacerts_dir: &Path, jwks: &Path, issuer: &JwtIssuer) {
    let now = time::OffsetDateTime::now_utc();
    let signer = Signer::new(cacerts::load_dir(cacerts_dir).unwrap().unwrap(), now).unwrap();
    let csrs = csrs(64);
    let id = SpiffeId::new("spiffe://cluster.local/ns/bench/sa/x").unwrap();
    let token = Token::new(issuer.token("bench", "x"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let jwt = rt
        .block_on(JwtAuthenticator::new(JwtConfig {
            issuer: signet_e2e::ISSUER.into(),
            audiences: vec!["istio-ca".into()],
            source: JwksSource::File(jwks.to_owned()),
            refresh_interval: time::Duration::minutes(5),
            max_age: time::Duration::hours(24),
        }))
        .unwrap();
    let n = 400;
    let time = |f: &mut dyn FnMut(usize)| {
        let t = Instant::now();
        for i in 0..n {
            f(i)
        }
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    let checked: Vec<_> = csrs.iter().map(|c| csr::check(c).unwrap()).collect();
    let csr_us = time(&mut |i| {
        csr::check(&csrs[i % 64]).unwrap();
    });
    let sign_us = time(&mut |i| {
        signer
            .sign(&checked[i % 64].spki, &id, time::Duration::hours(24), now)
            .unwrap();
    });
    let jwt_us = time(&mut |_| {
        rt.block_on(jwt.verify(&token, now)).unwrap();
    });
    println!(
        "  {name}: CSR check {csr_us:.0} us, signature and leaf checks {sign_us:.0} us, token {jwt_us:.0} us (one core)"
    );
}

fn openssl_rsa(bits: u32) -> KeyPair {
    let dir = tempfile::tempdir().unwrap();
    sh(
        &format!(
            "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:{bits} -out k.pem 2>/dev/null"
        ),
        dir.path(),
    );
    KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("k.pem")).unwrap()).unwrap()
}

fn csrs(n: usize) -> Vec<String> {
    (0..n).map(|_| signet_e2e::csr(None).1).collect()
}

/// Requests per second the crypto alone allows: each core loops over CSR check,
/// signature and token verification.
fn crypto_limit(
    cacerts_dir: &Path,
    jwks: &Path,
    issuer: &JwtIssuer,
    cores: usize,
    phase: Duration,
) -> f64 {
    let now = time::OffsetDateTime::now_utc();
    let signer =
        Arc::new(Signer::new(cacerts::load_dir(cacerts_dir).unwrap().unwrap(), now).unwrap());
    let csrs = Arc::new(csrs(64));
    let tokens: Arc<Vec<Token>> = Arc::new(
        (0..64)
            .map(|i| Token::new(issuer.token("bench", &format!("sa{i}"))))
            .collect(),
    );
    let config = JwtConfig {
        issuer: signet_e2e::ISSUER.into(),
        audiences: vec!["istio-ca".into()],
        source: JwksSource::File(jwks.to_owned()),
        refresh_interval: time::Duration::minutes(5),
        max_age: time::Duration::hours(24),
    };
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let threads: Vec<_> = (0..cores)
        .map(|t| {
            let (signer, csrs, tokens, config, done, stop) = (
                signer.clone(),
                csrs.clone(),
                tokens.clone(),
                config.clone(),
                done.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let jwt = JwtAuthenticator::new(config).await.unwrap();
                    let id = SpiffeId::new("spiffe://cluster.local/ns/bench/sa/x").unwrap();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        let checked = csr::check(&csrs[i % csrs.len()]).unwrap();
                        signer
                            .sign(
                                &checked.spki,
                                &id,
                                time::Duration::hours(24),
                                time::OffsetDateTime::now_utc(),
                            )
                            .unwrap();
                        jwt.verify(&tokens[i % tokens.len()], time::OffsetDateTime::now_utc())
                            .await
                            .unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                });
            })
        })
        .collect();
    std::thread::sleep(phase);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// CPU seconds used so far by this process's threads whose names start with `prefix`.
fn cpu_seconds(prefix: &str) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that closes the name: utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 12 {
            total +=
                (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / ticks;
        }
    }
    total
}

/// What one serving phase measured.
struct Served {
    rate: f64,
    p50: Duration,
    p99: Duration,
    /// CPU the CA used (its runtime and signing threads) per certificate.
    server_cpu_per_cert: Duration,
}

/// Certificates per second, p50/p99 latency and server CPU per certificate of the
/// real server. The CA runs on its own runtime (threads `signet-ca*` and
/// `signet-sign-*`), the load generator on another (`bench-client*`).
fn serve_rate(
    dir: &Path,
    cacerts_dir: &Path,
    root_pem: &str,
    issuer: &JwtIssuer,
    phase: Duration,
) -> Served {
    let ca_rt = signet_e2e::named_runtime("signet-ca");
    let client_rt = signet_e2e::named_runtime("bench-client");
    let ca = ca_rt.block_on(TestCa::start(&signet_e2e::jwt_ca_args(
        dir,
        issuer,
        cacerts_dir,
    )));
    let served = client_rt.block_on(async {
        let csrs = Arc::new(csrs(256));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            clients.push(ca.client(root_pem).await);
        }
        let cpu_before = cpu_seconds("signet-ca") + cpu_seconds("signet-sign");
        let started = Instant::now();
        for (i, mut client) in clients.into_iter().enumerate() {
            let token = issuer.token("bench", &format!("sa{i}"));
            let csrs = csrs.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    client
                        .create_certificate(request(&csrs[n % csrs.len()], Some(&token), 0))
                        .await
                        .unwrap();
                    latencies.push(t.elapsed());
                    n += 1;
                }
                latencies
            }));
        }
        tokio::time::sleep(phase).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let elapsed = started.elapsed();
        let cpu = cpu_seconds("signet-ca") + cpu_seconds("signet-sign") - cpu_before;
        all.sort();
        let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
        Served {
            rate: all.len() as f64 / elapsed.as_secs_f64(),
            p50: pct(0.50),
            p99: pct(0.99),
            server_cpu_per_cert: Duration::from_secs_f64(cpu / all.len() as f64),
        }
    });
    ca_rt.block_on(ca.stop());
    served
}
