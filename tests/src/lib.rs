//! Helpers for Signet's end-to-end tests, by subject: [`ca`] (signet-ca in the test
//! process, clients, requests), [`jwt`] (token issuers), [`pki`] (roots, cacerts, CRLs,
//! kubelet-style mounts), [`agent`] and [`sds`] (signet-agent and an SDS client),
//! [`mtls`], [`kube`] (the stateful Kubernetes-shaped API server), [`cluster`] (CA
//! processes against it) and [`process`] (pinning and CPU time, for the benches);
//! here, what they share: an HTTPS test server, metrics parsing, and the openssl CLI
//! as an independent verifier.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

pub mod agent;
pub mod ca;
pub mod cluster;
pub mod fleet;
pub mod jwt;
pub mod kube;
pub mod mtls;
pub mod pki;
pub mod process;
pub mod sds;

pub use ca::{
    RawTls, SERVER_NAME, SelfSignedCa, TestCa, client, client_from, csr, http_get, parse_serve,
    request,
};
pub use jwt::{ISSUER, JwtIssuer, jwt_ca_args};
pub use pki::{SecretMount, TestRoot, publish_set, write_crl};

use rcgen::{CertificateParams, KeyPair};
use tokio::net::TcpListener;

/// A multi-threaded runtime whose threads are named `name` (the benches tell the CA's
/// CPU from the load generator's by thread name).
/// Installs rustls's process-wide default provider as signet-agent's `main` does with
/// no compliance policy (the hybrid group first), so in-process agents' CA clients
/// and our own tonic clients run on what ships; the first call wins.
pub fn install_tls_provider() {
    let _ = signet_tls::provider(signet_tls::CompliancePolicy::Unset).install_default();
}

pub fn named_runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Serves `app` over HTTPS (HTTP/1.1 and HTTP/2) on 127.0.0.1 with a certificate for
/// `127.0.0.1` and `localhost` from a fresh CA: the Kubernetes-shaped endpoints of
/// the tests (API server, JWKS). Returns the address and the CA's PEM, for a
/// kubeconfig or `--jwks-ca-cert`.
pub async fn https_server(app: axum::Router) -> (SocketAddr, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    (addr, ca_cert.pem())
}

/// The value of the sample `series` (a metric name with its labels, as printed) in
/// a Prometheus text exposition; `None` when absent.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// The serial number of a PEM certificate, big-endian bytes.
pub fn serial(pem: &str) -> Vec<u8> {
    with_cert(pem, |c| c.tbs_certificate.raw_serial().to_vec())
}

/// Asks `check` every 50 ms until it gives a value, and returns it; fails the test,
/// naming `what`, when `within` passes first. The one way tests wait for something to
/// happen.
pub async fn eventually<T>(
    within: std::time::Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A signed leaf as a CreateCertificate answer lists it: leaf, signing chain, roots.
pub fn istio_chain(issued: signet_ca::keys::signer::Issued) -> Vec<String> {
    std::iter::once(issued.leaf)
        .chain(issued.chain.into_iter().map(|c| c.pem))
        .chain([issued.roots])
        .collect()
}

/// Runs `openssl verify` on `chain[0]` with the middle elements as untrusted
/// intermediates and the last element as the trust bundle.
pub fn openssl_verify(chain: &[String]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    let leaf = dir.path().join("leaf.pem");
    std::fs::write(&root, chain.last().unwrap()).unwrap();
    std::fs::write(&leaf, &chain[0]).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.arg("verify").arg("-CAfile").arg(&root);
    if chain.len() > 2 {
        let untrusted = dir.path().join("untrusted.pem");
        std::fs::write(&untrusted, chain[1..chain.len() - 1].concat()).unwrap();
        cmd.arg("-untrusted").arg(untrusted);
    }
    let out = cmd.arg(&leaf).output().expect("openssl is installed");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Runs a shell command and panics with its output on failure.
pub fn sh(cmd: &str, dir: &Path) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Parses a PEM certificate with x509-parser and hands it to `f`.
pub fn with_cert<T>(
    pem: &str,
    f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> T,
) -> T {
    let der = ::pem::parse(pem).unwrap().into_contents();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    f(&cert)
}

/// The URI SANs of a PEM certificate.
pub fn uri_sans(pem: &str) -> Vec<String> {
    with_cert(pem, |c| {
        c.subject_alternative_name()
            .unwrap()
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}
