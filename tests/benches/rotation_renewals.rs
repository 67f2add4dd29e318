//! Renewals during a driven rotation, against the CA's steady rate measured in the
//! same run: how much extra load the rotation window's capped, jittered lifetimes
//! put on the CA.
//!
//! Time is compressed: a fleet renews at a rate proportional to identities ÷
//! window (each holder renews at half a lifetime drawn between half a window and a
//! whole one), so `N × test window ÷ real window` identities under a test window
//! renew exactly as fast as `N` under the real one: 1,667 identities and a 60 s window
//! stand for 100,000 and the default hour. Each identity first holds a certificate
//! of `--default-ttl` (120 s here), issued at staggered times as in a fleet in steady
//! state, and renews only at half of each certificate's lifetime from receipt, as
//! ztunnel and pilot-agent do. Then the next set is put in place and the CA drives
//! the rotation to `done` by itself; renewals are counted per second and per stage.
//! The CA is the release binary on core 0; the fleet runs on core 1.
//!
//! `cargo build --release -p signet-ca && cargo bench -p signet-e2e --bench
//! rotation_renewals`; SIGNET_ROTATION_IDENTITIES (100,000), SIGNET_ROTATION_WINDOW
//! (the real window in seconds, 3600), SIGNET_ROTATION_TEST_WINDOW (60),
//! SIGNET_BENCH_SECS (the steady phase, 5), SIGNET_BENCH_CA (another binary).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use signet_e2e::{
    JwtIssuer, TestRoot,
    fleet::{Jitter, connect, fleet_on_loopback, identities, steady_rate},
    process::{CaProcess, ca_binary, pin},
    publish_set, request,
};

/// The certificates' lifetime before the declaration (`--default-ttl`).
const FIRST_LIFETIME: u64 = 120;
/// Connections the fleet shares.
const CONNECTIONS: usize = 64;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let n = env("SIGNET_ROTATION_IDENTITIES", 100_000);
    let real_window = env("SIGNET_ROTATION_WINDOW", 3600);
    let test_window = env("SIGNET_ROTATION_TEST_WINDOW", 60);
    let secs = env("SIGNET_BENCH_SECS", 5);
    let simulated = ((n * test_window).div_ceil(real_window)).max(1) as usize;
    let binary = std::env::var_os("SIGNET_BENCH_CA")
        .map_or_else(|| ca_binary("release"), std::path::PathBuf::from);
    signet_e2e::install_tls_provider();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let (ca_cores, fleet_cores) = if cores >= 2 { ("0", "1") } else { ("0", "0") };

    let dir = tempfile::tempdir().unwrap();
    let old_root = TestRoot::p256("Bench Old Root");
    let new_root = TestRoot::p256("Bench New Root");
    let key = || rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cacerts = dir.path().join("cacerts");
    old_root.write_cacerts(&cacerts, "Bench Old", &key(), Some(0), &[]);
    let staged = dir.path().join("staged");
    new_root.write_cacerts(&staged, "Bench New", &key(), Some(0), &[]);
    let next = dir.path().join("next");
    let issuer = Arc::new(JwtIssuer::new("rotation"));
    let identities = Arc::new(identities(&issuer, simulated, cores));
    pin(std::process::id(), fleet_cores);
    let rt = signet_e2e::named_runtime("bench-client");

    println!(
        "signet-ca renewals during a driven rotation: {simulated} identities under a {test_window} s window, standing for {n} under a {real_window} s one (renewal rate ∝ identities ÷ window); certificates of {FIRST_LIFETIME} s before the declaration; the release binary on core {ca_cores}, the fleet on core {fleet_cores}"
    );
    rt.block_on(async {
        let mut args = signet_e2e::jwt_ca_args(dir.path(), &issuer, &cacerts);
        args.extend(fleet_on_loopback());
        args.extend(
            [
                "--next-cacerts-dir",
                next.to_str().unwrap(),
                "--rotation-window",
                &format!("{test_window}s"),
                "--default-ttl",
                &format!("{FIRST_LIFETIME}s"),
            ]
            .map(String::from),
        );
        let ca = CaProcess::start(&binary, &args, ca_cores).await;
        // The roots the fleet trusts the CA with: both, as the trust file holds them
        // during the rotation (the CA's own certificate moves to the new chain).
        let both = old_root.pem.clone() + &new_root.pem;
        let channels = connect(&ca, &both, CONNECTIONS).await;
        let rate = steady_rate(&channels, &identities, secs, CONNECTIONS).await;
        println!("  steady rate: {rate:.0} certificates/s ({CONNECTIONS} clients, one request after another)");

        // The fleet: each identity gets its first certificate at a staggered time
        // over half a lifetime (a fleet in steady state), then renews on its own.
        let start = Instant::now();
        let counts = Arc::new(Mutex::new(BTreeMap::<u64, u64>::new()));
        let refused = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let stagger = Duration::from_secs(FIRST_LIFETIME / 2);
        let mut fleet = Vec::with_capacity(simulated);
        for i in 0..simulated {
            let mut client = channels[i % channels.len()].clone();
            let (ids, counts, refused, running) =
                (identities.clone(), counts.clone(), refused.clone(), running.clone());
            let first = stagger.mul_f64(i as f64 / simulated as f64);
            fleet.push(tokio::spawn(async move {
                tokio::time::sleep(first).await;
                let mut jitter = Jitter(i as u64 * 2 + 1);
                while running.load(Ordering::Relaxed) {
                    let (token, csr) = &ids[i];
                    match client.create_certificate(request(csr, Some(token), 0)).await {
                        Ok(answer) => {
                            let second = start.elapsed().as_secs();
                            *counts.lock().unwrap().entry(second).or_default() += 1;
                            let leaf = &answer.into_inner().cert_chain[0];
                            let not_after =
                                signet_e2e::with_cert(leaf, |c| c.validity().not_after.timestamp());
                            let left = (not_after
                                - time::OffsetDateTime::now_utc().unix_timestamp())
                            .max(1) as f64;
                            // Half of what is left, with pilot-agent's jitter of 1 %.
                            let wait = left * (0.49 + 0.02 * jitter.unit());
                            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                        }
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_secs_f64(0.5 + jitter.unit())).await;
                        }
                    }
                }
            }));
        }
        // A steady state first: the last first certificate, then a window more.
        tokio::time::sleep(stagger + Duration::from_secs(test_window)).await;
        let declared = start.elapsed().as_secs();
        publish_set(&staged, &next);
        let mut stages: Vec<(String, u64)> = Vec::new();
        loop {
            let (_, body) = signet_e2e::http_get(ca.http, "/rotation").await.unwrap();
            let status: serde_json::Value = serde_json::from_str(&body).unwrap();
            let stage = status["stage"].as_str().unwrap_or("").to_owned();
            if stages.last().is_none_or(|(s, _)| *s != stage) {
                stages.push((stage.clone(), start.elapsed().as_secs()));
            }
            if stage == "done" {
                break;
            }
            assert!(
                start.elapsed().as_secs() < declared + 30 * test_window,
                "no end: {status}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        running.store(false, Ordering::Relaxed);
        let counts = counts.lock().unwrap().clone();
        let per_second = |from: u64, to: u64| -> (f64, u64) {
            let seconds: Vec<u64> = (from..to.max(from + 1))
                .map(|s| counts.get(&s).copied().unwrap_or(0))
                .collect();
            let total: u64 = seconds.iter().sum();
            (total as f64 / seconds.len() as f64, seconds.into_iter().max().unwrap_or(0))
        };
        let (before, before_peak) = per_second(declared.saturating_sub(test_window), declared);
        println!(
            "  before the declaration ({} s): {before:.1} renewals/s, peak {before_peak}/s",
            test_window
        );
        let ends: Vec<u64> = stages.iter().skip(1).map(|(_, at)| *at).collect();
        for (k, (stage, at)) in stages.iter().enumerate() {
            let until = ends.get(k).copied().unwrap_or(*at + 1);
            if stage == "done" || stage == "idle" {
                continue;
            }
            let (mean, peak) = per_second(*at, until);
            println!(
                "  {stage} ({} s): {mean:.1} renewals/s, peak {peak}/s = {:.3} x the steady rate",
                until - at,
                peak as f64 / rate
            );
        }
        let (mean, peak) = per_second(declared, stages.last().map_or(declared, |(_, at)| *at));
        println!(
            "  the whole rotation: {mean:.1} renewals/s on average, peak {peak}/s = {:.3} x the steady rate ({rate:.0}/s); {} requests refused",
            peak as f64 / rate,
            refused.load(Ordering::Relaxed)
        );
        for t in fleet {
            t.abort();
        }
    });
}
