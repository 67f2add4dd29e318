//! A CA that writes to the stateful test API server ([`crate::kube`]): its flags,
//! key material, in-process or as a real `signet-ca` process, and polling.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use rcgen::KeyPair;

pub use crate::eventually;
use crate::{JwtIssuer, TestCa, TestRoot, jwt_ca_args, kube::KubeApi, workspace};

/// Flags for a writing CA: key material in `cacerts`, JWT tokens, the API server.
pub fn writer_args(dir: &Path, api: &KubeApi, cacerts: &Path, extra: &[&str]) -> Vec<String> {
    let issuer = JwtIssuer::new("k1");
    let mut args = jwt_ca_args(dir, &issuer, cacerts);
    args.extend(
        [
            "--no-token-review",
            "--kubeconfig",
            api.kubeconfig(dir).to_str().unwrap(),
            "--leader-election-namespace",
            "signet",
            "--lease-duration",
            "3s",
            "--lease-renew-deadline",
            "2s",
            "--lease-retry-period",
            "300ms",
        ]
        .map(str::to_owned),
    );
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

pub fn cacerts(dir: &Path) -> (TestRoot, std::path::PathBuf) {
    let root = TestRoot::p256("Writers Root");
    let path = dir.join("cacerts");
    root.write_cacerts(
        &path,
        "Writers Intermediate",
        &KeyPair::generate().unwrap(),
        None,
        &[],
    );
    (root, path)
}

/// A CA with key material of its own, writing to a fresh API server that holds
/// `namespaces` ("signet", the Lease's, always).
pub struct Setup {
    /// Scratch directory (kubeconfig, cacerts, state).
    pub dir: tempfile::TempDir,
    /// The API server.
    pub api: KubeApi,
    /// The root the CA's intermediate chains to.
    pub root: TestRoot,
    /// The cacerts directory.
    pub cacerts: std::path::PathBuf,
}

impl Setup {
    /// With a fresh API server.
    pub async fn new(namespaces: &[&str]) -> Self {
        Self::with_api(KubeApi::start().await, namespaces)
    }

    /// With `api`.
    pub fn with_api(api: KubeApi, namespaces: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        api.namespaces(&["signet"]);
        api.namespaces(namespaces);
        let (root, cacerts) = cacerts(dir.path());
        Self {
            dir,
            api,
            root,
            cacerts,
        }
    }

    /// `signet-ca serve` flags writing to the API server, plus `extra`.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        writer_args(self.dir.path(), &self.api, &self.cacerts, extra)
    }

    /// An in-process CA with those flags.
    pub async fn ca(&self, extra: &[&str]) -> TestCa {
        TestCa::start(&self.args(extra)).await
    }
}

/// A `signet-ca serve` process (the binary `cargo build` made).
pub struct CaProcess {
    child: Child,
    http: String,
}

impl CaProcess {
    /// Starts one with `args`, metrics on `http_port`, Lease identity `identity`.
    pub fn start(args: &[String], http_port: u16, identity: &str) -> Self {
        let binary = workspace().join("target/debug/signet-ca");
        assert!(
            binary.exists(),
            "build the workspace first: {} is missing",
            binary.display()
        );
        let http = format!("127.0.0.1:{http_port}");
        let child = Command::new(binary)
            .arg("serve")
            .args(args)
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                &http,
                "--leader-election-identity",
                identity,
            ])
            .env("SIGNET_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, http }
    }

    /// Its metrics exposition (empty while it does not answer).
    pub async fn metrics(&self) -> String {
        let url_ok = tokio::net::TcpStream::connect(&self.http).await;
        let Ok(mut s) = url_ok else {
            return String::new();
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = s
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    /// SIGKILL: dies without a word.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and waits for the exit.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
