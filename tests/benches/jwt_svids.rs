//! MintJwtSvid: JWT-SVIDs minted per second per core against the crypto each one
//! needs. The release `signet-ca` runs as its own process pinned to core 0, behind
//! TLS with JWKS (RS256) authentication, driven from core 1 by 64 tonic clients
//! (each on its own TLS connection, each its own service account) asking for
//! JWT-SVIDs for one audience. Its CPU time comes from `/proc/<pid>/stat`.
//!
//! The crypto of one JWT-SVID is the caller's token check (RS256 verification) and
//! the JWT-SVID's signature (ES256, or RS256 with `--jwt-key-algorithm rs256`),
//! measured in the same run on core 0 with ring alone, just before and just after
//! each phase. The figure of merit is server CPU per token ÷ that crypto. A phase of
//! requests refused before any crypto (a token that is not a JWT) shows what a TLS
//! gRPC request costs this server by itself, the floor under that ratio.
//!
//! `cargo build --release -p signet-ca && cargo bench -p signet-e2e --bench
//! jwt_svids`; SIGNET_BENCH_SECS sets each phase's length (default 5).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, RsaKeyPair},
};
use signet_e2e::{
    JwtIssuer, TestRoot,
    ca::tls_channel,
    process::{CaProcess, ca_binary, cpu_time, per_op, pin},
};
use signet_proto::signet_v1::{MintJwtSvidRequest, jwt_svid_service_client::JwtSvidServiceClient};

const CLIENTS: usize = 64;

fn main() {
    let secs: u64 = std::env::var("SIGNET_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let phase = Duration::from_secs(secs);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_core = if cores >= 2 { "1" } else { "0" };
    signet_e2e::install_tls_provider();
    let me = std::process::id();
    let binary = ca_binary("release");
    let issuer = JwtIssuer::rsa("bench");
    println!(
        "signet-ca MintJwtSvid (release binary, its own process on core 0, load on core {load_core}): {CLIENTS} TLS clients, JWKS (RS256 2048) tokens, one audience, {secs} s per phase"
    );
    for alg in ["es256", "rs256"] {
        let dir = tempfile::tempdir().unwrap();
        let root = TestRoot::p256("Bench Root");
        let cacerts = dir.path().join("cacerts");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        root.write_cacerts(&cacerts, "Bench Intermediate", &key, Some(0), &[]);
        let mut args = signet_e2e::jwt_ca_args(dir.path(), &issuer, &cacerts);
        args.extend(["--jwt-svids", "--jwt-key-algorithm", alg].map(str::to_owned));

        let crypto = |me| {
            pin(me, "0");
            Crypto::measure(alg, &issuer)
        };
        let before = crypto(me);
        pin(me, load_core);
        let rt = signet_e2e::named_runtime("bench-client");
        let (minted, refused) = rt.block_on(async {
            let ca = CaProcess::start(&binary, &args, "0").await;
            let minted = drive(&ca, &root.pem, &issuer, phase, true).await;
            let refused = drive(&ca, &root.pem, &issuer, phase, false).await;
            (minted, refused)
        });
        drop(rt);
        let after = crypto(me);
        let ring = f64::midpoint(before.total(), after.total());
        println!(
            "{} JWT-SVIDs: ring's crypto per token on one core {:.0} us (token check {:.0} + signature {:.0}); {:.0} before the phase, {:.0} after",
            alg.to_uppercase(),
            ring,
            after.token,
            after.sign,
            before.total(),
            after.total(),
        );
        let cpu = minted.cpu_per_op.as_secs_f64() * 1e6;
        println!(
            "  minted: {:.0} tokens/s on 1 core (the crypto alone allows {:.0}); p50 {:.1} ms, p99 {:.1} ms; server CPU {cpu:.0} us/token = {:.2} x ring's crypto",
            minted.rate,
            1e6 / ring,
            minted.p50.as_secs_f64() * 1e3,
            minted.p99.as_secs_f64() * 1e3,
            cpu / ring,
        );
        let floor = refused.cpu_per_op.as_secs_f64() * 1e6;
        println!(
            "  refused before any crypto (a token that is not a JWT): {:.0} requests/s, server CPU {floor:.0} us each = {:.2} x ring's crypto; so a JWT-SVID costs at least {:.2} x its crypto on this transport",
            refused.rate,
            floor / ring,
            1.0 + floor / ring,
        );
    }
}

/// The crypto of one JWT-SVID with ring alone, in µs on one core.
struct Crypto {
    token: f64,
    sign: f64,
}

impl Crypto {
    fn total(&self) -> f64 {
        self.token + self.sign
    }

    fn measure(alg: &str, issuer: &JwtIssuer) -> Self {
        let rng = SystemRandom::new();
        // A JWT-SVID's signing input is about 300 bytes.
        let input = vec![0x5a_u8; 300];
        let sign = if alg == "es256" {
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .unwrap();
            let pair = EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                pkcs8.as_ref(),
                &rng,
            )
            .unwrap();
            per_op(|| {
                pair.sign(&rng, &input).unwrap();
            })
        } else {
            let key = signet_spiffe::generate_key(signet_spiffe::KeyType::Rsa(2048)).unwrap();
            let pair = RsaKeyPair::from_pkcs8(&key.serialize_der()).unwrap();
            let mut out = vec![0; pair.public().modulus_len()];
            per_op(|| {
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, &input, &mut out)
                    .unwrap();
            })
        };
        let token = issuer.ring_check_us();
        Self { token, sign }
    }
}

struct Served {
    rate: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_op: Duration,
}

/// 64 clients looping for `phase`: minting (`mint`), or sending a token that is not
/// a JWT.
async fn drive(
    ca: &CaProcess,
    root_pem: &str,
    issuer: &JwtIssuer,
    phase: Duration,
    mint: bool,
) -> Served {
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let client = JwtSvidServiceClient::new(tls_channel(ca.grpc, root_pem, None).await);
        let token = if mint {
            issuer.token("bench", &format!("sa{i}"))
        } else {
            "not-a-jwt".to_owned()
        };
        clients.push((client, token));
    }
    // One request each before the clock: handshakes and first allocations.
    for (client, token) in &mut clients {
        call(client, token, mint).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let pid = ca.pid();
    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(mut client, token)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    call(&mut client, &token, mint).await;
                    latencies.push(t.elapsed());
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
        cpu_per_op: cpu / all.len() as u32,
    }
}

/// One MintJwtSvid call with `token`; minted when `mint`, else refused as
/// UNAUTHENTICATED.
async fn call(
    client: &mut JwtSvidServiceClient<tonic::transport::Channel>,
    token: &str,
    mint: bool,
) {
    let mut request = tonic::Request::new(MintJwtSvidRequest {
        audience: vec!["minio".into()],
        ttl_seconds: 0,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    match (mint, client.mint_jwt_svid(request).await) {
        (true, Ok(_)) => {}
        (false, Err(s)) if s.code() == tonic::Code::Unauthenticated => {}
        (_, other) => panic!("unexpected answer: {other:?}"),
    }
}
