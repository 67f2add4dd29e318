//! What the hybrid key exchange costs a handshake: CPU per full TLS 1.3 handshake on
//! each side, by key-exchange group, with signet-ca's server configurations
//! (`signet_tls::ServerConfigs`, an ECDSA P-256 certificate as the CA serves) and the
//! agent's client provider, in memory (no sockets), one thread; and the ML-KEM-768
//! operations alone. Prints the figures and the hybrid's ratio to X25519 measured in
//! the same run.
//!
//! `cargo bench -p signet-e2e --bench tls_handshake`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
    crypto::{CryptoProvider, SupportedKxGroup, ring::kx_group},
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    server::Acceptor,
};
use signet_tls::{CompliancePolicy, ServerConfigs, X25519MLKEM768};

const HANDSHAKES: u32 = 2000;

#[derive(Default)]
struct Totals {
    server: Duration,
    client: Duration,
    client_hello: usize,
    server_flight: usize,
    group: &'static str,
}

fn server_configs(policy: CompliancePolicy) -> (ServerConfigs, RootCertStore) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["istiod.istio-system.svc".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let configs = ServerConfigs::new(policy, |provider, versions| {
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        // As signet-ca: no resumption, every handshake is a full one.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    })
    .unwrap();
    (configs, roots)
}

fn client_config(groups: Vec<&'static dyn SupportedKxGroup>, roots: RootCertStore) -> ClientConfig {
    let provider = CryptoProvider {
        kx_groups: groups,
        ..signet_tls::provider(CompliancePolicy::Unset)
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // No resumption and no remembered group: each handshake starts from nothing,
    // as a client's first connection does.
    config.resumption = rustls::client::Resumption::disabled();
    config
}

/// Moves everything `from` has to send into a buffer.
fn drain(from: &mut dyn FnMut(&mut Vec<u8>) -> usize) -> Vec<u8> {
    let mut buf = Vec::new();
    while from(&mut buf) > 0 {}
    buf
}

/// One full handshake, each side's work timed apart.
fn handshake(configs: &ServerConfigs, client: &Arc<ClientConfig>, totals: &mut Totals) {
    let name = ServerName::try_from("istiod.istio-system.svc").unwrap();
    let t = Instant::now();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let mut to_server = drain(&mut |b| c.write_tls(b).unwrap());
    totals.client += t.elapsed();
    totals.client_hello += to_server.len();

    // The server: reads the ClientHello, chooses its configuration, answers; again
    // after a HelloRetryRequest.
    let t = Instant::now();
    let mut acceptor = Acceptor::default();
    acceptor.read_tls(&mut &to_server[..]).unwrap();
    let accepted = acceptor.accept().unwrap().unwrap();
    let config = configs.for_hello(&accepted.client_hello());
    let mut s: ServerConnection = accepted.into_connection(config).unwrap();
    let mut to_client = drain(&mut |b| s.write_tls(b).unwrap());
    totals.server += t.elapsed();
    totals.server_flight += to_client.len();

    while c.is_handshaking() || s.is_handshaking() {
        let t = Instant::now();
        c.read_tls(&mut &to_client[..]).unwrap();
        c.process_new_packets().unwrap();
        to_server = drain(&mut |b| c.write_tls(b).unwrap());
        totals.client += t.elapsed();
        if to_server.is_empty() {
            break;
        }
        let t = Instant::now();
        s.read_tls(&mut &to_server[..]).unwrap();
        s.process_new_packets().unwrap();
        to_client = drain(&mut |b| s.write_tls(b).unwrap());
        totals.server += t.elapsed();
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    totals.group = signet_tls::group_name(s.negotiated_key_exchange_group().unwrap().name());
}

fn run(
    label: &str,
    configs: &ServerConfigs,
    roots: &RootCertStore,
    groups: Vec<&'static dyn SupportedKxGroup>,
) -> Totals {
    let client = Arc::new(client_config(groups, roots.clone()));
    let mut totals = Totals::default();
    // Warm-up.
    for _ in 0..50 {
        handshake(configs, &client, &mut totals);
    }
    totals = Totals::default();
    for _ in 0..HANDSHAKES {
        handshake(configs, &client, &mut totals);
    }
    println!(
        "  {label:<48} {:<15} server {:>6.1} µs   client {:>6.1} µs   ClientHello {:>5} B   server's first flight {:>5} B",
        totals.group,
        micros(totals.server),
        micros(totals.client),
        totals.client_hello / HANDSHAKES as usize,
        totals.server_flight / HANDSHAKES as usize,
    );
    totals
}

fn micros(total: Duration) -> f64 {
    total.as_secs_f64() * 1e6 / f64::from(HANDSHAKES)
}

fn mlkem_alone() {
    let n = 5000;
    let t = Instant::now();
    let mut shares = Vec::with_capacity(n);
    for _ in 0..n {
        shares.push(X25519MLKEM768.start().unwrap());
    }
    let start = t.elapsed();
    let t = Instant::now();
    let mut answers = Vec::with_capacity(n);
    for share in &shares {
        answers.push(X25519MLKEM768.start_and_complete(share.pub_key()).unwrap());
    }
    let encaps = t.elapsed();
    let t = Instant::now();
    for (share, answer) in shares.into_iter().zip(&answers) {
        share.complete(&answer.pub_key).unwrap();
    }
    let decaps = t.elapsed();
    let x = Instant::now();
    for _ in 0..n {
        let a = kx_group::X25519.start().unwrap();
        let b = kx_group::X25519.start_and_complete(a.pub_key()).unwrap();
        a.complete(&b.pub_key).unwrap();
    }
    let x25519 = x.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "  X25519MLKEM768 alone ({n} runs): client key pair {:.1} µs, server encapsulation + X25519 {:.1} µs, client decapsulation + X25519 {:.1} µs; a whole X25519 exchange (both sides) {:.1} µs",
        per(start),
        per(encaps),
        per(decaps),
        per(x25519)
    );
}

fn main() {
    println!(
        "TLS 1.3 full handshakes in memory, ECDSA P-256 server certificate, no client certificate, {HANDSHAKES} per row, one thread"
    );
    let (unset, roots) = server_configs(CompliancePolicy::Unset);
    let x25519 = run(
        "X25519 client, no policy",
        &unset,
        &roots,
        vec![kx_group::X25519],
    );
    run(
        "P-256 client, no policy",
        &unset,
        &roots,
        vec![kx_group::SECP256R1],
    );
    let hybrid = run(
        "agent's client (hybrid first), no policy",
        &unset,
        &roots,
        CompliancePolicy::Unset.kx_groups(),
    );
    run(
        "X25519 first, hybrid listed (HelloRetryRequest)",
        &unset,
        &roots,
        vec![kx_group::X25519, X25519MLKEM768],
    );
    let (pqc, pqc_roots) = server_configs(CompliancePolicy::Pqc);
    run(
        "hybrid only, CA under pqc",
        &pqc,
        &pqc_roots,
        vec![X25519MLKEM768],
    );
    mlkem_alone();
    println!(
        "ratio X25519MLKEM768 / X25519 (same run): server CPU {:.2}, client CPU {:.2}",
        hybrid.server.as_secs_f64() / x25519.server.as_secs_f64(),
        hybrid.client.as_secs_f64() / x25519.client.as_secs_f64(),
    );
}
