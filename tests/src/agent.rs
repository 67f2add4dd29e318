//! signet-agent in the end-to-end tests: the flags for an agent of a workload, and
//! a running agent that stops when dropped.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::{JwtIssuer, TestCa};

/// A temp directory and a token issuer shared by a test's CA and agents.
pub struct AgentSetup {
    /// Where everything lives.
    pub dir: tempfile::TempDir,
    /// Signs the workloads' tokens; the CA checks them against its JWKS.
    pub jwt: JwtIssuer,
}

impl Default for AgentSetup {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentSetup {
    /// A fresh directory and issuer.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            jwt: JwtIssuer::new("k1"),
        }
    }

    /// Flags for a CA with a self-signed root in `<dir>/state`.
    pub fn ca_args(&self) -> Vec<String> {
        crate::jwt_ca_args(self.dir.path(), &self.jwt, &self.dir.path().join("none"))
    }

    /// Flags for a CA whose key material is in `cacerts`.
    pub fn ca_args_with_cacerts(&self, cacerts: &Path) -> Vec<String> {
        crate::jwt_ca_args(self.dir.path(), &self.jwt, cacerts)
    }

    /// Flags for an agent of `ns/sa` talking to `ca`, trusting the CA's self-signed
    /// root, its socket under the temp dir.
    pub fn agent_args(&self, ca: &TestCa, ns: &str, sa: &str, extra: &[&str]) -> Vec<String> {
        let trust = self.dir.path().join("state/root-cert.pem");
        self.agent_args_trusting(ca, ns, sa, &trust, extra)
    }

    /// [`Self::agent_args`] with the CA trusted through `trust` (as pods mount
    /// `istio-ca-root-cert`).
    pub fn agent_args_trusting(
        &self,
        ca: &TestCa,
        ns: &str,
        sa: &str,
        trust: &Path,
        extra: &[&str],
    ) -> Vec<String> {
        let token = self.token_file(sa);
        std::fs::write(&token, self.jwt.token(ns, sa)).unwrap();
        let mut args: Vec<String> = vec![
            "--ca-addr".into(),
            format!("localhost:{}", ca.grpc.port()),
            "--ca-root-cert".into(),
            trust.display().to_string(),
            "--token-file".into(),
            token.display().to_string(),
            "--namespace".into(),
            ns.into(),
            "--service-account".into(),
            sa.into(),
            "--socket".into(),
            self.socket(sa).display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// The token file of the agent of `sa`.
    pub fn token_file(&self, sa: &str) -> PathBuf {
        self.dir.path().join(format!("token-{sa}"))
    }

    /// The SDS socket of the agent of `sa`.
    pub fn socket(&self, sa: &str) -> PathBuf {
        self.dir.path().join(format!("sds-{sa}/socket"))
    }
}

/// signet-agent running in this process; stopped when dropped.
pub struct TestAgent {
    /// Its HTTP listener (`/healthz/ready`, `/metrics`).
    pub http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl TestAgent {
    /// Starts an agent with `args` (flags of `signet-agent run`).
    pub async fn start(args: &[String]) -> Self {
        let (http, stop, handle) = start_agent(args).await;
        Self {
            http,
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// Waits until `/healthz/ready` says 200 (it holds a certificate).
    pub async fn wait_ready(&self) {
        wait_ready(self.http).await;
    }

    /// The HTTP status of `/healthz/ready` now.
    pub async fn ready_status(&self) -> u16 {
        ready_status(self.http).await.unwrap_or(0)
    }

    /// The agent's `/metrics` text.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.http).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()
    }

    /// Stops the agent and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap();
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn ready_status(http: SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await.ok()?;
    s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.split(' ').nth(1)?.parse().ok()
}

/// Waits (60 s at most) until the agent at `http` is ready. Generous: an agent
/// that failed its first requests (no token yet, the CA not up) retries with
/// backoff (0.5 s doubling), and a loaded machine is slow to start.
pub async fn wait_ready(http: SocketAddr) {
    crate::eventually(
        Duration::from_secs(60),
        "the agent to be ready",
        async || (ready_status(http).await == Some(200)).then_some(()),
    )
    .await;
}

/// Starts signet-agent in this process with `args` (flags of `signet-agent run`),
/// its HTTP listener on port 0. Returns the HTTP address and a stop handle.
async fn start_agent(args: &[String]) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
    use clap::Parser;
    use signet_agent::config::{Cli, Command};
    crate::install_tls_provider();
    let mut full = vec!["signet-agent".to_string(), "run".to_string()];
    full.extend_from_slice(args);
    let Command::Run(run) = Cli::try_parse_from(full).unwrap().command else {
        unreachable!()
    };
    let config = run.validate(Vec::new()).unwrap();
    let listeners = signet_agent::server::Listeners {
        sds: signet_agent::sds::bind(&config.socket).unwrap(),
        http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        workload_api: config
            .workload_api_socket
            .as_ref()
            .map(|p| signet_agent::sds::bind_as(p, "Workload API socket").unwrap()),
    };
    let addr = listeners.http.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        signet_agent::server::run(config, listeners, async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, stop, handle)
}
