//! CreateCertificate: the server's CPU per certificate against the crypto each
//! certificate needs. The release `signet-ca` binary runs as its own process, pinned
//! with `taskset` to one core and then to two, behind TLS with JWKS (RS256)
//! authentication, driven by 64 tonic clients (each on its own TLS connection) asking
//! for P-256 certificates; for a P-256, an RSA-2048 and an RSA-4096 intermediate (the
//! runbook's). Its CPU time comes from `/proc/<pid>/stat`.
//!
//! The crypto a certificate needs is the CSR's P-256 signature check, the
//! certificate's signature with the intermediate's key and the RS256 token's check. It
//! is measured in the same run on one core with ring alone (the library Signet uses)
//! and with `openssl speed` (the hardware's limit), so that the gap of the library
//! and the gap of our code both show. The figure of merit is server CPU per
//! certificate ÷ ring's crypto per certificate (target <= 1.3), and it should not grow
//! from one core to two. The machine's speed drifts, so ring's crypto is measured again
//! just before and just after each serving phase and the phase is held against their
//! mean.
//!
//! Once per run it also serves the same clients with servers that do no crypto: the CA
//! refusing a token that is not a JWT, and two servers answering a canned certificate
//! chain (`floor`: on tonic, and on the h2 crate alone), the least a TLS gRPC request
//! costs a server here.
//!
//! `cargo build --release -p signet-ca && cargo bench -p signet-e2e --bench
//! ca_throughput`; SIGNET_BENCH_SECS sets each phase's length (default 5),
//! SIGNET_BENCH_PROFILE the binary's profile (`profiling` to run it under perf),
//! SIGNET_BENCH_INTERMEDIATES which intermediates (`P-256,RSA-2048,RSA-4096`),
//! SIGNET_BENCH_CA another signet-ca binary to run instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use rcgen::KeyPair;
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, RsaKeyPair, UnparsedPublicKey},
};
use signet_e2e::{
    JwtIssuer, TestRoot,
    process::{CaProcess, ca_binary, cpu_time, per_op, pin},
    request, sh,
};
use signet_proto::IstioCertificateResponse;
use x509_parser::prelude::FromDer;

const CLIENTS: usize = 64;

#[path = "ca_throughput/floor.rs"]
mod floor;

fn main() {
    floor::serve_if_asked();
    let secs: u64 = std::env::var("SIGNET_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let profile = std::env::var("SIGNET_BENCH_PROFILE").unwrap_or_else(|_| "release".into());
    // Another build to hold against this one (the commit before a change, say).
    let binary = std::env::var_os("SIGNET_BENCH_CA")
        .map_or_else(|| ca_binary(&profile), std::path::PathBuf::from);
    let phase = Duration::from_secs(secs);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    signet_e2e::install_tls_provider();
    let me = std::process::id();
    let all_cores = if cores >= 2 { "0,1" } else { "0" };

    println!(
        "signet-ca CreateCertificate ({profile} binary, its own process): {CLIENTS} TLS clients, JWKS (RS256 2048) tokens, P-256 workload keys, {secs} s per phase, {cores} cores"
    );
    // Crypto alone, on core 0 while nothing else runs there.
    pin(me, "0");
    let openssl = OpensslSpeed::measure();
    let issuer = JwtIssuer::rsa("bench");
    let csrs: Arc<Vec<String>> = Arc::new((0..256).map(|_| signet_e2e::csr(None).1).collect());
    let only = std::env::var("SIGNET_BENCH_INTERMEDIATES").unwrap_or_default();
    let mut floor_done = false;
    for name in ["P-256", "RSA-2048", "RSA-4096"] {
        if !only.is_empty() && !only.split(',').any(|n| n == name) {
            continue;
        }
        let ca_key = match name {
            "P-256" => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
            "RSA-2048" => openssl_rsa(2048),
            _ => openssl_rsa(4096),
        };
        let dir = tempfile::tempdir().unwrap();
        let root = TestRoot::p256("Bench Root");
        let cacerts = dir.path().join("cacerts");
        root.write_cacerts(&cacerts, "Bench Intermediate", &ca_key, Some(0), &[]);

        pin(me, "0");
        let ring = RingCrypto::measure(&ca_key, &csrs[0], &issuer);
        let ossl = openssl.per_certificate(name);
        let own = OwnSteps::measure(&cacerts, dir.path(), &issuer, &csrs[0]);
        println!("{name} intermediate");
        println!(
            "  crypto per certificate, one core: ring {:.0} us (CSR check {:.0} + signature {:.0} + token {:.0}); openssl speed {:.0} us (ring / openssl {:.2})",
            ring.total(),
            ring.csr,
            ring.sign,
            ring.token,
            ossl,
            ring.total() / ossl
        );
        println!(
            "  Signet's own steps, one core: CSR parse and check {:.0} us, certificate {:.0} us, token {:.0} us (= {:.2} x ring's crypto)",
            own.csr,
            own.sign,
            own.token,
            (own.csr + own.sign + own.token) / ring.total()
        );
        let ring_at_start = ring.total();
        let mut layouts = vec![("1 core", "0", if cores >= 2 { "1" } else { "0" })];
        if cores >= 2 {
            layouts.push(("2 cores", all_cores, all_cores));
        }
        let run = |cores: (&str, &str), load: Load| {
            serve(
                &binary,
                dir.path(),
                &cacerts,
                &root.pem,
                &issuer,
                &csrs,
                cores,
                phase,
                load,
            )
        };
        // This machine's speed drifts by tens of per cent within minutes, so each
        // phase is held against ring's crypto measured just before and just after it
        // (the figure after one phase is the figure before the next).
        let mut last = ring_at_start;
        let mut around = |phase: &dyn Fn() -> Served| {
            let served = phase();
            let after = ring_on_core0(me, &ca_key, &csrs[0], &issuer);
            let before = std::mem::replace(&mut last, after);
            (served, Drift { before, after })
        };
        for (label, server, load) in layouts {
            let (s, ring) = around(&|| run((server, load), Load::Certificates));
            let k = server.split(',').count() as f64;
            let cpu_us = s.cpu_per_cert.as_secs_f64() * 1e6;
            println!(
                "  server on {label}: {:.0} certs/s, {:.0} per core; p50 {:.1} ms, p99 {:.1} ms; server CPU {cpu_us:.0} us/cert = {:.2} x ring's crypto (target <= 1.3; {ring}), {:.2} x openssl's; server busy {:.0} % of its cores{}",
                s.rate,
                s.rate / k,
                s.p50.as_secs_f64() * 1e3,
                s.p99.as_secs_f64() * 1e3,
                cpu_us / ring.mean(),
                cpu_us / ossl,
                s.busy / k * 100.0,
                if server == load {
                    " (the load generator shares them)"
                } else {
                    ", load generator on the other"
                },
            );
        }
        if !floor_done && cores >= 2 {
            // Once: what a request costs that does no crypto, and what the least
            // server on this stack spends on one.
            floor_done = true;
            let own = own.csr + own.sign + own.token;
            let (s, ring) = around(&|| run(("0", "1"), Load::Refused));
            let cpu_us = s.cpu_per_cert.as_secs_f64() * 1e6;
            println!(
                "  a request refused before any crypto (a token that is not a JWT), server on 1 core: {:.0} requests/s, server CPU {cpu_us:.0} us each = {:.2} x ring's {name} crypto ({ring})",
                s.rate,
                cpu_us / ring.mean(),
            );
            let answer = sample_answer(&cacerts, &csrs[0]);
            for kind in [floor::Kind::Tonic, floor::Kind::H2] {
                let (s, ring) = around(&|| serve_floor(kind, &answer, &issuer, &csrs, phase));
                let cpu_us = s.cpu_per_cert.as_secs_f64() * 1e6;
                println!(
                    "  a server that answers every request with the same certificate chain, built once, {}, on 1 core: {:.0} requests/s, server CPU {cpu_us:.0} us each = {:.2} x ring's {name} crypto ({ring}); so a {name} certificate costs at least {:.2} x ring's crypto on it with ring's primitives alone, {:.2} x with Signet's own steps",
                    kind.describe(),
                    s.rate,
                    cpu_us / ring.mean(),
                    1.0 + cpu_us / ring.mean(),
                    (own / ring_at_start + cpu_us / ring.mean()),
                );
            }
        }
    }
}

/// Ring's crypto per certificate, measured on core 0 while nothing else runs there.
fn ring_on_core0(me: u32, ca_key: &KeyPair, csr_pem: &str, issuer: &JwtIssuer) -> f64 {
    pin(me, "0");
    RingCrypto::measure(ca_key, csr_pem, issuer).total()
}

/// Ring's crypto per certificate just before and just after a phase, in µs.
struct Drift {
    before: f64,
    after: f64,
}

impl Drift {
    fn mean(&self) -> f64 {
        f64::midpoint(self.before, self.after)
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ring {:.0} us before the phase, {:.0} after",
            self.before, self.after
        )
    }
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

/// The crypto of one certificate with ring's primitives and nothing else, in
/// microseconds on one core.
struct RingCrypto {
    csr: f64,
    sign: f64,
    token: f64,
}

impl RingCrypto {
    fn total(&self) -> f64 {
        self.csr + self.sign + self.token
    }

    fn measure(ca_key: &KeyPair, csr_pem: &str, issuer: &JwtIssuer) -> Self {
        let rng = SystemRandom::new();
        // The CSR's signed bytes, signature and key, as the CA checks them.
        let der = pem::parse(csr_pem).unwrap().into_contents();
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        let info = csr.certification_request_info.raw.to_vec();
        let sig = csr.signature_value.data.to_vec();
        let spki = csr
            .certification_request_info
            .subject_pki
            .subject_public_key
            .data
            .to_vec();
        let csr_key = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, spki);
        let csr_us = per_op(|| csr_key.verify(&info, &sig).unwrap());

        // A leaf's to-be-signed part is about 500 bytes; its length hardly matters.
        let tbs = vec![0x5a_u8; 512];
        let pkcs8 = ca_key.serialize_der();
        let sign_us = if ca_key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 {
            let pair =
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
                    .unwrap();
            per_op(|| {
                pair.sign(&rng, &tbs).unwrap();
            })
        } else {
            let pair = RsaKeyPair::from_pkcs8(&pkcs8).unwrap();
            let mut out = vec![0; pair.public().modulus_len()];
            per_op(|| {
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, &tbs, &mut out)
                    .unwrap();
            })
        };

        let token_us = issuer.ring_check_us();
        Self {
            csr: csr_us,
            sign: sign_us,
            token: token_us,
        }
    }
}

/// The same three steps through Signet's own code (csr::check, Signer::sign,
/// JwtAuthenticator::verify), in microseconds on one core.
struct OwnSteps {
    csr: f64,
    sign: f64,
    token: f64,
}

impl OwnSteps {
    fn measure(cacerts: &Path, dir: &Path, issuer: &JwtIssuer, csr_pem: &str) -> Self {
        use signet_ca::{
            issue::{
                authn::{JwksSource, JwtAuthenticator, JwtConfig, Token},
                csr,
            },
            keys::{cacerts, signer::Signer},
        };
        let now = time::OffsetDateTime::now_utc();
        let signer = Signer::new(cacerts::load_dir(cacerts).unwrap().unwrap(), now).unwrap();
        let id = spiffe::SpiffeId::new("spiffe://cluster.local/ns/bench/sa/x").unwrap();
        let token = Token::new(issuer.token("bench", "x"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let jwt = rt
            .block_on(JwtAuthenticator::new(JwtConfig {
                issuer: signet_e2e::ISSUER.into(),
                audiences: vec!["istio-ca".into()],
                source: JwksSource::File(issuer.write_jwks(dir)),
                refresh_interval: std::time::Duration::from_secs(300),
                max_age: std::time::Duration::from_secs(86_400),
            }))
            .unwrap();
        let checked = csr::check(csr_pem).unwrap();
        Self {
            csr: per_op(|| {
                csr::check(csr_pem).unwrap();
            }),
            sign: per_op(|| {
                let window = signer.window(time::Duration::hours(24), now).unwrap();
                signer.sign(&checked.spki, &id, &window).unwrap();
            }),
            token: per_op(|| {
                rt.block_on(jwt.verify(&token, now)).unwrap();
            }),
        }
    }
}

/// What the CA answers: a leaf signed through `cacerts` for `csr_pem`, its chain and
/// the root, as the floor servers answer every request.
fn sample_answer(cacerts: &Path, csr_pem: &str) -> IstioCertificateResponse {
    use signet_ca::{
        issue::csr,
        keys::{cacerts, signer::Signer},
    };
    let now = time::OffsetDateTime::now_utc();
    let signer = Signer::new(cacerts::load_dir(cacerts).unwrap().unwrap(), now).unwrap();
    let id = spiffe::SpiffeId::new("spiffe://cluster.local/ns/bench/sa/x").unwrap();
    let checked = csr::check(csr_pem).unwrap();
    let window = signer.window(time::Duration::hours(24), now).unwrap();
    let issued = signer.sign(&checked.spki, &id, &window).unwrap();
    IstioCertificateResponse {
        cert_chain: signet_e2e::istio_chain(issued),
    }
}

/// Operations per second from `openssl speed` on core 0.
struct OpensslSpeed {
    p256: (f64, f64),
    rsa2048: (f64, f64),
    rsa4096: (f64, f64),
}

impl OpensslSpeed {
    fn measure() -> Self {
        let out = Command::new("taskset")
            .args(["-c", "0", "openssl", "speed", "-seconds", "2"])
            .args(["ecdsap256", "rsa2048", "rsa4096"])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        // "rsa 2048 bits 0.000308s 0.000016s 3252.0 61360.0" and
        // " 256 bits ecdsa (nistp256) 0.0000s 0.0001s 48263.0 15323.0": the last two
        // fields are signatures and verifications per second.
        let rates = |prefix: &str| {
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with(prefix))
                .unwrap_or_else(|| panic!("openssl speed printed no '{prefix}' line:\n{text}"));
            let f: Vec<f64> = line
                .split_whitespace()
                .rev()
                .take(2)
                .map(|v| v.parse().unwrap())
                .collect();
            (f[1], f[0])
        };
        Self {
            p256: rates("256 bits ecdsa (nistp256)"),
            rsa2048: rates("rsa 2048 bits"),
            rsa4096: rates("rsa 4096 bits"),
        }
    }

    /// Microseconds of one certificate's crypto with an intermediate `name`.
    fn per_certificate(&self, name: &str) -> f64 {
        let sign = match name {
            "P-256" => self.p256.0,
            "RSA-2048" => self.rsa2048.0,
            _ => self.rsa4096.0,
        };
        1e6 / sign + 1e6 / self.p256.1 + 1e6 / self.rsa2048.1
    }
}

/// What the 64 clients ask for.
#[derive(Clone, Copy)]
enum Load {
    /// Certificates, with valid tokens.
    Certificates,
    /// Nothing the CA grants: a token that is not a JWT, refused (UNAUTHENTICATED)
    /// before any crypto. What the server spends on such a request is the cost of a
    /// TLS gRPC request itself (HTTP/2, TLS, protobuf, runtime, one log line).
    Refused,
}

impl Load {
    fn check(self, answer: Result<tonic::Response<IstioCertificateResponse>, tonic::Status>) {
        match (self, answer) {
            (Self::Certificates, Ok(_)) => {}
            (Self::Refused, Err(s)) if s.code() == tonic::Code::Unauthenticated => {}
            (_, other) => panic!("unexpected answer: {other:?}"),
        }
    }
}

/// What one serving phase measured.
struct Served {
    rate: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_cert: Duration,
    /// Server CPU time ÷ wall time: cores kept busy.
    busy: f64,
}

/// Runs `binary` pinned to `cores.0`, this process (the load) pinned to `cores.1`,
/// and measures one phase of 64 clients looping.
#[allow(clippy::too_many_arguments)]
fn serve(
    binary: &Path,
    dir: &Path,
    cacerts: &Path,
    root_pem: &str,
    issuer: &JwtIssuer,
    csrs: &Arc<Vec<String>>,
    cores: (&str, &str),
    phase: Duration,
    load: Load,
) -> Served {
    pin(std::process::id(), cores.1);
    let rt = signet_e2e::named_runtime("bench-client");
    rt.block_on(async {
        let ca = CaProcess::start(
            binary,
            &signet_e2e::jwt_ca_args(dir, issuer, cacerts),
            cores.0,
        )
        .await;
        drive(ca.grpc, root_pem, ca.pid(), issuer, csrs, phase, load).await
    })
}

/// Runs a canned `kind` server (see `floor`) on core 0, the load on core 1, and
/// measures one phase of the 64 clients asking it for certificates.
fn serve_floor(
    kind: floor::Kind,
    answer: &IstioCertificateResponse,
    issuer: &JwtIssuer,
    csrs: &Arc<Vec<String>>,
    phase: Duration,
) -> Served {
    pin(std::process::id(), "1");
    let rt = signet_e2e::named_runtime("bench-client");
    rt.block_on(async {
        let server = floor::FloorServer::start(kind, answer, "0").await;
        drive(
            server.addr,
            &server.root_pem,
            server.pid(),
            issuer,
            csrs,
            phase,
            Load::Certificates,
        )
        .await
    })
}

/// 64 clients of the server at `grpc` (process `pid`, trusted through `root_pem`)
/// looping for `phase`.
async fn drive(
    grpc: std::net::SocketAddr,
    root_pem: &str,
    pid: u32,
    issuer: &JwtIssuer,
    csrs: &Arc<Vec<String>>,
    phase: Duration,
    load: Load,
) -> Served {
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = signet_e2e::client(grpc, root_pem, None).await;
        let token = match load {
            Load::Certificates => issuer.token("bench", &format!("sa{i}")),
            Load::Refused => "not-a-jwt".to_owned(),
        };
        // One request each before the clock: handshakes and first allocations.
        load.check(
            client
                .create_certificate(request(&csrs[i], Some(&token), 0))
                .await,
        );
        clients.push((client, token));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, (mut client, token))| {
            let (csrs, stop) = (csrs.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    load.check(
                        client
                            .create_certificate(request(&csrs[n % csrs.len()], Some(&token), 0))
                            .await,
                    );
                    latencies.push(t.elapsed());
                    n += 1;
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time(pid) - cpu_before;
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Served {
        rate: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        cpu_per_cert: cpu / all.len() as u32,
        busy: cpu.as_secs_f64() / elapsed.as_secs_f64(),
    }
}
