//! signet-agent figures: time from process start to the first `default` answer over
//! SDS (with the CA round trip measured separately), resident memory while holding
//! one identity with 100 open SDS streams (and with 100 Workload API streams), how
//! long a rotation takes to reach all 100 streams, and the agent under hostile header blocks on its socket (CPU per
//! MiB, peak and after memory, `default` latency meanwhile). The agent runs as the shipped binary (`scripts/build-release.sh
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
    spawn_agent_with(bin, dir, ca, jwt, ttl, name, &[])
}

fn spawn_agent_with(
    bin: &Path,
    dir: &Path,
    ca: &TestCa,
    jwt: &JwtIssuer,
    ttl: &str,
    name: &str,
    extra: &[&str],
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
        .args(extra)
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
    workload_api(&bin, dir.path(), &ca, &jwt, rss_one_conn).await;
    attack(&bin, dir.path(), &ca, &jwt).await;
    ca.stop().await;
}

/// Resident memory of an agent serving the SPIFFE Workload API with one and with
/// `STREAMS` `FetchX509SVID` streams on one connection, against the SDS figure of the
/// same run (`sds_kib`, SDS streams on one connection).
async fn workload_api(bin: &Path, dir: &Path, ca: &TestCa, jwt: &JwtIssuer, sds_kib: u64) {
    use signet_proto::workload::{
        X509svidRequest, spiffe_workload_api_client::SpiffeWorkloadApiClient,
    };
    let api_socket = dir.join("api/workload.sock");
    let api_arg = api_socket.display().to_string();
    let mut agent = spawn_agent_with(
        bin,
        dir,
        ca,
        jwt,
        "24h",
        "api",
        &["--workload-api-socket", &api_arg],
    );
    let channel = loop {
        match signet_agent::inspect::connect(&api_socket).await {
            Ok(channel) => break channel,
            // An older agent (SIGNET_BENCH_AGENT) refuses the flag and exits.
            Err(_) if agent.child.try_wait().unwrap().is_some() => {
                println!("  SPIFFE Workload API: not served by this agent binary");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    };
    let open = |channel: tonic::transport::Channel| async move {
        let mut request = tonic::Request::new(X509svidRequest::default());
        request
            .metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
        let mut stream = SpiffeWorkloadApiClient::new(channel)
            .fetch_x509svid(request)
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap();
        stream
    };
    let _first = open(channel.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_one = rss_kib(agent.child.id());
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        streams.push(open(channel.clone()).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_many = rss_kib(agent.child.id());
    println!(
        "  SPIFFE Workload API (another agent, --workload-api-socket): {:.1} MiB with one FetchX509SVID stream; {:.1} MiB ({rss_many} KiB) with {STREAMS} on one connection; {STREAMS} SDS streams on one connection above: {sds_kib} KiB",
        rss_one as f64 / 1024.0,
        rss_many as f64 / 1024.0,
    );
    drop(streams);
    drop(agent);
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: fields 14 and 15 are utime and stime.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK string: Huffman-coded when `huffman`.
fn string(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
    let mut coded = Vec::new();
    let (flag, bytes) = if huffman {
        httlib_huffman::encode(s, &mut coded).unwrap();
        (0x80u8, coded.as_slice())
    } else {
        (0, s)
    };
    let mut len = bytes.len();
    if len < 127 {
        out.push(flag | len as u8);
    } else {
        out.push(flag | 127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(bytes);
}

/// A gRPC request's headers (literals without indexing) and `extra` more fields of
/// ~`value_len` bytes, Huffman-coded or not.
fn request_block(extra: usize, value_len: usize, huffman: bool, tag: u32) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    for (n, v) in [
        (
            &b":path"[..],
            &b"/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets"[..],
        ),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
    ] {
        b.push(0x00);
        string(&mut b, n, huffman);
        string(&mut b, v, huffman);
    }
    for i in 0..extra {
        b.push(0x00);
        string(&mut b, format!("x-attack-{i}").as_bytes(), huffman);
        let value: Vec<u8> = format!("{tag:08}-{i:04}-")
            .bytes()
            .chain(
                b"abcdefghijklmnopqrstuvwxyz0123456789"
                    .iter()
                    .copied()
                    .cycle(),
            )
            .take(value_len)
            .collect();
        string(&mut b, &value, huffman);
    }
    b
}

/// Blocks of 3 references to a 4 KiB entry of the client's table (12 KiB decoded,
/// within the 16 KiB list limit) and a header with a name never seen before, which
/// pushes that entry out of the re-encoding side's table: each ~25-byte block comes
/// out as a 4 KiB literal.
fn table_block(tag: u32) -> Vec<u8> {
    let mut b = vec![0x80 | 62; 3];
    b.push(0x00);
    string(&mut b, format!("r{tag}").as_bytes(), false);
    string(&mut b, b"1", false);
    b
}

/// One attacker: connects, sends the preface, then header blocks as fast as the
/// socket takes them until `until`, reading and dropping whatever comes back.
/// Returns the bytes sent.
async fn attacker(socket: PathBuf, kind: &'static str, until: Instant) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(stream) = tokio::net::UnixStream::connect(&socket).await else {
        return 0;
    };
    let (mut rd, mut wr) = stream.into_split();
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while rd.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let mut sent = 0;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    if kind == "table" {
        // The 4 KiB entry, with incremental indexing, in a first request.
        let mut first = vec![0x40];
        string(&mut first, b"x-big", false);
        string(&mut first, &[b'v'; 4000], false);
        hello.extend(frame(0x1, 0x5, 1, &first));
    }
    if wr.write_all(&hello).await.is_err() {
        return 0;
    }
    sent += hello.len();
    let mut stream_id = 3u32;
    while Instant::now() < until {
        let mut batch = Vec::new();
        for _ in 0..16 {
            let block = match kind {
                "huffman" => request_block(60, 100, true, stream_id),
                _ => table_block(stream_id),
            };
            batch.extend(frame(0x1, 0x5, stream_id, &block));
            stream_id = stream_id.wrapping_add(2) & 0x7fff_ffff;
        }
        let write = tokio::time::timeout(Duration::from_millis(200), wr.write_all(&batch));
        match write.await {
            Ok(Ok(())) => sent += batch.len(),
            Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    drop(wr);
    drain.abort();
    sent
}

/// The attacks from the security report against the SDS socket: connections sending
/// Huffman-coded header blocks, and connections sending small blocks that the
/// `:authority` adapter must re-encode as 4 KiB literals. Prints the agent's CPU per
/// MiB of hostile input, its peak resident memory, the slowest `default` answer to a
/// real client meanwhile (target 100 ms), and its resident memory after the
/// attackers leave (target under 10 MiB).
async fn attack(bin: &Path, dir: &Path, ca: &TestCa, jwt: &JwtIssuer) {
    let agent = spawn_agent(bin, dir, ca, jwt, "24h", "attacked");
    while !agent.socket.exists() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (_tx, mut first) = open_stream(&agent.socket).await;
    first.message().await.unwrap().unwrap();
    let pid = agent.child.id();
    // The agent on a core of its own; this process (attackers and the real client)
    // on the other, so the client's latency is the agent's, not this process's.
    let pinned = Command::new("taskset")
        .args(["-pc", "0", &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("taskset")
            .args(["-apc", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    println!(
        "  under attack on the SDS socket (the shipped agent, 5 s each{}):",
        if pinned {
            "; the agent on core 0, attackers and the real client on core 1"
        } else {
            "; not pinned: no taskset"
        }
    );
    for (kind, connections) in [("huffman", 4), ("table", 20)] {
        let cpu_before = cpu_secs(pid);
        let until = Instant::now() + Duration::from_secs(5);
        let attackers: Vec<_> = (0..connections)
            .map(|_| tokio::spawn(attacker(agent.socket.clone(), kind, until)))
            .collect();
        // A real client meanwhile, on a thread and runtime of its own: a new
        // connection and a `default` every 50 ms.
        let socket = agent.socket.clone();
        let prober = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut slowest = Duration::ZERO;
                let mut peak_rss = 0;
                let mut answered = 0;
                while Instant::now() < until {
                    peak_rss = peak_rss.max(rss_kib(pid));
                    let t = Instant::now();
                    let got = tokio::time::timeout(Duration::from_secs(5), async {
                        let (_tx, mut s) = open_stream(&socket).await;
                        s.message().await
                    })
                    .await;
                    if matches!(got, Ok(Ok(Some(_)))) {
                        answered += 1;
                    }
                    slowest = slowest.max(t.elapsed());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (slowest, peak_rss, answered)
            })
        });
        let (slowest, peak_rss, answered) = tokio::task::spawn_blocking(move || prober.join())
            .await
            .unwrap()
            .unwrap();
        let mut sent = 0;
        for a in attackers {
            sent += a.await.unwrap();
        }
        let cpu = cpu_secs(pid) - cpu_before;
        let mib = sent as f64 / (1024.0 * 1024.0);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(pid);
        println!(
            "    {kind} ({connections} connections): {mib:.1} MiB of header blocks sent, agent CPU {:.0} ms per MiB ({cpu:.2} s in all); peak resident {:.1} MiB; slowest `default` to a real client {:.1} ms over {answered} tries (target 100 ms); resident {:.1} MiB 2 s after the attackers left (target < 10 MiB)",
            cpu * 1e3 / mib.max(1e-9),
            peak_rss as f64 / 1024.0,
            slowest.as_secs_f64() * 1e3,
            after as f64 / 1024.0,
        );
    }
    drop(agent);
}
