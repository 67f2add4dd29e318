//! A rollout's burst of PodCertificateRequests: 10,000 created at once against the
//! stateful test API server, answered by a signet-ca process (the release binary,
//! P-256 intermediate). The CA runs on a core of its own (core 0) and the API server,
//! the load and the limit on the other (core 1), so what is measured is the CA's own
//! cost. Prints requests per second, API calls per certificate, the CA's CPU time per
//! answer (from /proc) and, as the limit to compare with, what the same answer's
//! crypto costs on one core of the same machine (CSR parse + certificate signature;
//! the API server has already checked the CSR's signature).
//!
//! `cargo build --release -p signet-ca && cargo bench -p signet-e2e --bench
//! pod_certificates`; SIGNET_BENCH_PCRS sets the burst size.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use serde_json::json;
use signet_e2e::{
    cluster::Setup,
    metric,
    process::{Killed, ca_binary, cpu_time, pin},
};

const SIGNER: &str = "signet.dev/pods";
const PLURAL: &str = "podcertificaterequests";

async fn metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::var("SIGNET_BENCH_PCRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let binary = ca_binary("release");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cores >= 2;
    if pinned {
        pin(std::process::id(), "1");
    }
    signet_e2e::install_tls_provider();
    let setup = Setup::new(&["apps"]).await;
    let api = &setup.api;
    let key = rcgen::KeyPair::generate().unwrap();
    let stub_der = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let stub = base64::engine::general_purpose::STANDARD.encode(&stub_der);

    let http = format!("127.0.0.1:{}", signet_e2e::cluster::free_port());
    let child = Command::new(&binary)
        .arg("serve")
        .args(setup.args(&["--pod-certificate-signer", SIGNER]))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", &http])
        .args(["--leader-election-identity", "bench"])
        .env("SIGNET_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let ca = Killed(child);
    if pinned {
        pin(pid, "0");
    }
    // Wait until the signer watches (its trust bundle is written first).
    while api
        .get("clustertrustbundles", "", "signet.dev:pods:bundle")
        .is_none()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = cpu_time(pid);
    let calls_before = api.total_calls();
    let started = Instant::now();
    for i in 0..n {
        api.put_bound_request(
            PLURAL,
            json!({
                "metadata": {"namespace": "apps", "name": format!("web-{i}")},
                "spec": {"signerName": SIGNER, "podName": format!("web-{i}"), "podUID": format!("uid-{i}"),
                         "serviceAccountName": "web", "serviceAccountUID": "sa", "nodeName": "node-a",
                         "nodeUID": "n", "maxExpirationSeconds": 86400, "stubPKCS10Request": stub},
            }),
        );
    }
    let issued = "signet_ca_pod_certificates_total{result=\"issued\"}";
    loop {
        if metric(&metrics(&http).await, issued).unwrap_or(0.0) as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    let ca_cpu = cpu_time(pid) - cpu_before;
    let calls = api.total_calls() - calls_before;
    let answered = api.count(PLURAL, |p| p["status"]["certificateChain"].is_string());
    assert_eq!(answered, n, "every request carries a chain");
    drop(ca);

    // The limit: the crypto of one answer (parse the CSR, sign the leaf) on one core,
    // with the CA's own signer and key material.
    let material = signet_ca::keys::cacerts::load_dir(&setup.cacerts)
        .unwrap()
        .unwrap();
    let signer =
        signet_ca::keys::signer::Signer::new(material, time::OffsetDateTime::now_utc()).unwrap();
    let pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", stub_der));
    let id = spiffe::SpiffeId::new("spiffe://cluster.local/ns/apps/sa/web").unwrap();
    let rounds = n.min(5_000);
    let sign_started = Instant::now();
    for _ in 0..rounds {
        let csr = signet_ca::issue::csr::parse(&pem).unwrap();
        let window = signer
            .window(time::Duration::hours(24), time::OffsetDateTime::now_utc())
            .unwrap();
        signer.sign(&csr.spki, &id, &window).unwrap();
    }
    let crypto = sign_started.elapsed() / rounds as u32;
    let per_answer = ca_cpu / n as u32;
    let rate = n as f64 / took.as_secs_f64();
    println!(
        "pod certificates: {n} requests created at once, P-256 intermediate, {}",
        if pinned {
            "CA on core 0, API server and load on core 1"
        } else {
            "one core shared by all"
        }
    );
    println!(
        "  all answered in {:.2} s: {rate:.0} requests/s",
        took.as_secs_f64()
    );
    println!(
        "  CA CPU per answer: {:.0} µs; crypto alone (CSR parse + signature, one core): {:.0} µs, {:.0}/s",
        per_answer.as_secs_f64() * 1e6,
        crypto.as_secs_f64() * 1e6,
        1.0 / crypto.as_secs_f64()
    );
    println!(
        "  CA CPU per answer ÷ crypto: {:.2}; requests/s ÷ one core's crypto limit: {:.2}",
        per_answer.as_secs_f64() / crypto.as_secs_f64(),
        rate * crypto.as_secs_f64()
    );
    println!(
        "  API calls per certificate: {:.2} ({calls} calls, watches included)",
        calls as f64 / n as f64
    );
}
