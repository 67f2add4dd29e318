//! A rollout's burst of PodCertificateRequests: 10,000 created at once against the
//! stateful test API server, answered by an in-process signet-ca (P-256
//! intermediate). Prints requests per second, API calls per certificate, and, as
//! the limit to compare with, the signer's own speed on the same cores (signing
//! alone, no API server).
//!
//! `cargo bench -p signet-e2e --bench pod_certificates`; SIGNET_BENCH_PCRS sets the
//! burst size.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;
use signet_e2e::cluster::Setup;

const SIGNER: &str = "signet.dev/pods";
const PLURAL: &str = "podcertificaterequests";

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("SIGNET_BENCH_PCRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let setup = Setup::new(&["apps"]).await;
    let api = &setup.api;
    let key = rcgen::KeyPair::generate().unwrap();
    let stub = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let stub = base64::engine::general_purpose::STANDARD.encode(stub);
    let ca = setup.ca(&["--pod-certificate-signer", SIGNER]).await;
    // Wait until the signer watches (its trust bundle is written first).
    while api
        .get("clustertrustbundles", "", "signet.dev:pods:bundle")
        .is_none()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls_before = api.total_calls();
    let started = Instant::now();
    for i in 0..n {
        api.put(
            PLURAL,
            json!({
                "metadata": {"namespace": "apps", "name": format!("web-{i}")},
                "spec": {"signerName": SIGNER, "podName": format!("web-{i}"), "podUID": format!("uid-{i}"),
                         "serviceAccountName": "web", "serviceAccountUID": "sa", "nodeName": "node-a",
                         "nodeUID": "n", "maxExpirationSeconds": 86400, "stubPKCS10Request": stub},
            }),
        );
    }
    loop {
        if api.count(PLURAL, |p| p["status"]["certificateChain"].is_string()) == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    let calls = api.total_calls() - calls_before;
    ca.stop().await;

    // The limit: the same signer signing the same leaves, on every core, no API.
    let material = signet_ca::cacerts::load_dir(&setup.cacerts)
        .unwrap()
        .unwrap();
    let signer = std::sync::Arc::new(
        signet_ca::signer::Signer::new(material, time::OffsetDateTime::now_utc()).unwrap(),
    );
    let pem = pem::encode(&pem::Pem::new(
        "CERTIFICATE REQUEST",
        base64::engine::general_purpose::STANDARD
            .decode(&stub)
            .unwrap(),
    ));
    let csr = signet_ca::csr::parse(&pem).unwrap();
    let id = spiffe::SpiffeId::new("spiffe://cluster.local/ns/apps/sa/web").unwrap();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per_thread = (n / threads).max(1);
    let sign_started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (signer, csr, id) = (signer.clone(), csr.clone(), id.clone());
            s.spawn(move || {
                for _ in 0..per_thread {
                    csr.verify().unwrap();
                    signer
                        .sign(
                            &csr.spki,
                            &id,
                            time::Duration::hours(24),
                            time::OffsetDateTime::now_utc(),
                        )
                        .unwrap();
                }
            });
        }
    });
    let limit = (per_thread * threads) as f64 / sign_started.elapsed().as_secs_f64();
    let rate = n as f64 / took.as_secs_f64();
    println!("pod certificates: {n} requests created at once, {threads} cores, P-256 intermediate");
    println!(
        "  all answered in {:.2} s: {rate:.0} requests/s",
        took.as_secs_f64()
    );
    println!(
        "  signing alone (CSR check + signature, same cores): {limit:.0}/s; ratio {:.2}",
        rate / limit
    );
    println!(
        "  API calls per certificate: {:.2} ({calls} calls, watches included)",
        calls as f64 / n as f64
    );
}
