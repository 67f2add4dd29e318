//! A fleet of identities for the benches that hold a CA against many clients (the
//! restart storm, renewals during a rotation): tokens and CSRs made before the clock
//! starts, shared connections, the CA's steady rate measured in the same run.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use signet_proto::IstioCertificateServiceClient;
use tonic::transport::Channel;

use crate::{JwtIssuer, process::CaProcess, request};

/// `n` identities, `bench-<i>/sa`: an ES256 token each and a CSR for a fresh P-256
/// key, made on every core.
pub fn identities(issuer: &Arc<JwtIssuer>, n: usize, cores: usize) -> Vec<(String, String)> {
    let per = n.div_ceil(cores.max(1));
    let workers: Vec<_> = (0..cores.max(1))
        .map(|c| {
            let issuer = issuer.clone();
            std::thread::spawn(move || {
                (c * per..((c + 1) * per).min(n))
                    .map(|i| {
                        let token = issuer.token(&format!("bench-{i}"), "sa");
                        let (_, csr) = crate::csr(None);
                        (token, csr)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect()
}

/// `count` connections to `ca`, trusting `root_pem`.
pub async fn connect(
    ca: &CaProcess,
    root_pem: &str,
    count: usize,
) -> Vec<IstioCertificateServiceClient<Channel>> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        channels.push(crate::client(ca.grpc, root_pem, None).await);
    }
    channels
}

/// Certificates per second with `clients` clients, one request after another, for
/// `secs`: the rate the CA sustains.
pub async fn steady_rate(
    channels: &[IstioCertificateServiceClient<Channel>],
    identities: &Arc<Vec<(String, String)>>,
    secs: u64,
    clients: usize,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut steady = Vec::new();
    for (i, client) in channels.iter().take(clients).enumerate() {
        let mut client = client.clone();
        let (ids, stop, done) = (identities.clone(), stop.clone(), done.clone());
        steady.push(tokio::spawn(async move {
            let mut k = i;
            while !stop.load(Ordering::Relaxed) {
                let (token, csr) = &ids[k % ids.len()];
                if client
                    .create_certificate(request(csr, Some(token), 0))
                    .await
                    .is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                k += clients;
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in steady {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// A small xorshift for jitter (agents draw it at random).
pub struct Jitter(pub u64);

impl Jitter {
    /// A number in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The fleet's pods each have an address of their own in a cluster; here they all
/// come from loopback, so loopback gets no per-peer connection cap.
pub fn fleet_on_loopback() -> [String; 2] {
    [
        "--peer-connection-share".into(),
        "127.0.0.0/8=unlimited".into(),
    ]
}
