//! signet-agent figures: time from process start to the first `default` answer over
//! SDS (with the CA round trip measured separately), resident memory while holding
//! one identity with 100 open SDS streams, and how long a rotation takes to reach
//! all 100 streams. The agent runs as the shipped binary (`scripts/build-release.sh
//! agent`: the agent profile, statically linked) in its own process; the CA runs in
//! this process on 127.0.0.1.
//!
//! `cargo bench -p signet-e2e --bench agent` (builds the shipped agent first);
//! SIGNET_BENCH_AGENT runs another agent binary instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::service::{
    discovery::v3::{DiscoveryRequest, DiscoveryResponse},
    secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient,
};
use signet_e2e::{JwtIssuer, TestCa, workspace};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const STREAMS: usize = 100;

fn agent_binary() -> PathBuf {
    // Another build of the agent to compare with (a static one, say).
    if let Some(path) = std::env::var_os("SIGNET_BENCH_AGENT") {
        return PathBuf::from(path);
    }
    // Built as it ships (the agent profile, statically linked).
    let status = Command::new(workspace().join("scripts/build-release.sh"))
        .arg("agent")
        .current_dir(workspace())
        .status()
        .unwrap();
    assert!(status.success());
    workspace().join("target/dist/signet-agent")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Resident KiB of process `pid` by what the pages hold: the agent binary's code,
/// read-only data and writable data, the shared libraries, the heap, other anonymous
/// memory (thread stacks, allocator arenas) and the main stack.
fn pages(pid: u32, binary: &Path) -> Vec<(&'static str, u64)> {
    let binary = binary.canonicalize().unwrap();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut sums: Vec<(&'static str, u64)> = [
        "binary code",
        "binary read-only data",
        "binary writable data",
        "shared libraries",
        "heap",
        "anonymous",
        "stack",
        "other",
    ]
    .iter()
    .map(|k| (*k, 0))
    .collect();
    let mut kind = "other";
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            let perms = fields.get(1).copied().unwrap_or("");
            let path = fields.get(5).copied().unwrap_or("");
            kind = if Path::new(path) == binary {
                match perms {
                    p if p.contains('x') => "binary code",
                    p if p.contains('w') => "binary writable data",
                    _ => "binary read-only data",
                }
            } else if path.starts_with('/') {
                "shared libraries"
            } else if path == "[heap]" {
                "heap"
            } else if path == "[stack]" {
                "stack"
            } else if path.is_empty() {
                "anonymous"
            } else {
                "other"
            };
        } else if fields.first() == Some(&"Rss:") {
            let kib: u64 = fields[1].parse().unwrap_or(0);
            if let Some(entry) = sums.iter_mut().find(|(k, _)| *k == kind) {
                entry.1 += kib;
            }
        }
    }
    sums.retain(|(_, kib)| *kib > 0);
    sums
}

struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_agent(
    bin: &Path,
    dir: &Path,
    ca: &TestCa,
    jwt: &JwtIssuer,
    ttl: &str,
    name: &str,
) -> Agent {
    let token = dir.join("token");
    std::fs::write(&token, jwt.token("bench", "web")).unwrap();
    let socket = dir.join(format!("{name}/socket"));
    let child = Command::new(bin)
        .args(["run", "--ca-addr", &format!("localhost:{}", ca.grpc.port())])
        .arg("--ca-root-cert")
        .arg(dir.join("state/root-cert.pem"))
        .arg("--token-file")
        .arg(&token)
        .args([
            "--namespace",
            "bench",
            "--service-account",
            "web",
            "--secret-ttl",
            ttl,
        ])
        .arg("--socket")
        .arg(&socket)
        .args(["--http-addr", "127.0.0.1:0"])
        .env("SIGNET_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Agent { child, socket }
}

async fn open_stream(
    socket: &Path,
) -> (
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
) {
    // The socket's file appears at bind(2), a moment before listen(2).
    let channel = loop {
        match signet_agent::inspect::connect(socket).await {
            Ok(channel) => break channel,
            Err(_) => tokio::time::sleep(Duration::from_micros(100)).await,
        }
    };
    open_stream_on(channel).await
}

async fn open_stream_on(
    channel: tonic::transport::Channel,
) -> (
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<DiscoveryResponse>,
) {
    let mut client = SecretDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        resource_names: vec!["default".into()],
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = client
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

#[tokio::main]
async fn main() {
    let bin = agent_binary();
    let dir = tempfile::tempdir().unwrap();
    let jwt = JwtIssuer::new("bench");
    let ca = TestCa::start(&[
        "--cacerts-dir".into(),
        dir.path().join("none").display().to_string(),
        "--state-dir".into(),
        dir.path().join("state").display().to_string(),
        "--jwks".into(),
        jwt.write_jwks(dir.path()).display().to_string(),
        "--jwt-issuer".into(),
        signet_e2e::ISSUER.into(),
    ])
    .await;
    let root = std::fs::read_to_string(dir.path().join("state/root-cert.pem")).unwrap();

    // The CA round trip as a fresh client pays it: TLS handshake plus one signature.
    let mut round_trips = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let mut c = ca.client(&root).await;
        let (_, pem) = signet_e2e::csr(Some("spiffe://cluster.local/ns/bench/sa/web"));
        c.create_certificate(signet_e2e::request(
            &pem,
            Some(&jwt.token("bench", "web")),
            0,
        ))
        .await
        .unwrap();
        round_trips.push(t.elapsed());
    }
    round_trips.sort();
    let round_trip = round_trips[round_trips.len() / 2];

    // Start to first `default`: spawn, poll for the socket, subscribe, first answer.
    let mut firsts = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        let agent = spawn_agent(&bin, dir.path(), &ca, &jwt, "24h", &format!("start{i}"));
        while !agent.socket.exists() {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let (_tx, mut stream) = open_stream(&agent.socket).await;
        stream.message().await.unwrap().unwrap();
        firsts.push(t.elapsed());
    }
    firsts.sort();
    let first = firsts[firsts.len() / 2];

    // Memory with 100 streams: multiplexed on one connection as Envoy does, then
    // each on a connection of its own.
    let agent = spawn_agent(&bin, dir.path(), &ca, &jwt, "6s", "steady");
    while !agent.socket.exists() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (_idle_tx, mut idle) = open_stream(&agent.socket).await;
    idle.message().await.unwrap().unwrap();
    let rss_idle = rss_kib(agent.child.id());
    let shared = signet_agent::inspect::connect(&agent.socket).await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let (tx, mut stream) = open_stream_on(shared.clone()).await;
        stream.message().await.unwrap().unwrap();
        streams.push((tx, stream));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_one_conn = rss_kib(agent.child.id());
    let pages_one_conn = pages(agent.child.id(), &bin);
    let mut separate = Vec::new();
    for _ in 0..STREAMS {
        let (tx, mut stream) = open_stream(&agent.socket).await;
        stream.message().await.unwrap().unwrap();
        separate.push((tx, stream));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_both = rss_kib(agent.child.id());
    drop(separate);

    // A rotation (ttl 6 s: every ~3 s) reaching the 100 multiplexed streams.
    let mut tasks = Vec::new();
    for (tx, mut stream) in streams {
        tasks.push(tokio::spawn(async move {
            let _keep = tx;
            stream.message().await.unwrap().unwrap();
            Instant::now()
        }));
    }
    let mut arrivals = Vec::new();
    for t in tasks {
        arrivals.push(t.await.unwrap());
    }
    arrivals.sort();
    let spread = *arrivals.last().unwrap() - arrivals[0];

    println!(
        "signet-agent ({}), one identity, P-256, local CA on 127.0.0.1",
        bin.display()
    );
    println!(
        "  start to first `default` over SDS: median {:.1} ms of 10 starts (CA round trip, TLS handshake + signature: median {:.1} ms; agent's own share {:.1} ms; target < 20 ms + round trip)",
        first.as_secs_f64() * 1e3,
        round_trip.as_secs_f64() * 1e3,
        (first.saturating_sub(round_trip)).as_secs_f64() * 1e3
    );
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "  resident memory: {:.1} MiB with one stream; {:.1} MiB ({rss_one_conn} KiB) with {STREAMS} streams on one connection (as Envoy multiplexes them; target <= 6 MiB); {:.1} MiB with another {STREAMS} on a connection each (target < 10 MiB)",
        mib(rss_idle),
        mib(rss_one_conn),
        mib(rss_both)
    );
    println!(
        "  what the pages are with {STREAMS} streams on one connection (/proc/<pid>/smaps, KiB resident): {}",
        pages_one_conn
            .iter()
            .map(|(what, kib)| format!("{what} {kib}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  rotation reaching all {STREAMS} streams: {:.2} ms from the first stream to the last",
        spread.as_secs_f64() * 1e3
    );
    drop(agent);
    ca.stop().await;
}
