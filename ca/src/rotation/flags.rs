//! Flags of the driven trust change (part of `signet-ca serve`), and the
//! `signet-ca rotation` commands an operator runs beside a serving CA.

use std::{path::PathBuf, time::Duration};

use crate::flags::{DAY, between};

/// `signet-ca serve` flags of the trust change.
#[derive(Debug, Clone, clap::Args)]
pub struct RotationArgs {
    /// Directory with the next CA key material, in the same layouts as
    /// --cacerts-dir (a second Secret mounted beside cacerts). A complete, valid set
    /// there that differs from the one in use declares a rotation: the CA
    /// distributes its roots, switches signing to it and retires the old roots,
    /// each stage once the evidence is in. Without it, only a self-signed root can
    /// be renewed (`signet-ca rotation start --self-signed`).
    #[arg(long, env = "NEXT_ROOT_CA_DIR", value_name = "DIR")]
    pub next_cacerts_dir: Option<PathBuf>,

    /// From a rotation's declaration until the old chain is retired, no leaf is
    /// issued for longer than this (shortened at random by up to half, to spread
    /// renewals): every stage after the first then ends within one window.
    #[arg(long, default_value = "1h", value_parser = between(Duration::from_secs(10), DAY), value_name = "DURATION")]
    pub rotation_window: Duration,

    /// A file the CA keeps holding its current trust bundle (PEM), written
    /// atomically on every change: the trust file of agents outside Kubernetes
    /// (their --ca-root-cert), as the root ConfigMap is in a cluster. A rotation
    /// waits until it reads the file back holding each stage's bundle.
    #[arg(long, env = "ROOT_CERT_FILE", value_name = "FILE")]
    pub root_cert_file: Option<PathBuf>,
}

/// `signet-ca rotation`: look at or steer the trust change of a serving CA.
#[derive(Debug, clap::Subcommand)]
pub enum RotationCommand {
    /// Show the stage, what it waits for, and when it ends at the latest.
    Status {
        /// The CA's HTTP listener (its --http-addr).
        #[arg(long, default_value = "127.0.0.1:15014", value_name = "ADDR")]
        http_addr: std::net::SocketAddr,
        /// Print the JSON the CA serves at /rotation instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ask the CA to go back to the old chain (before the retire stage only); it
    /// converges back the same way. Written into the CA's state directory.
    Abort {
        /// The CA's --state-dir.
        #[arg(
            long,
            env = "SIGNET_STATE_DIR",
            default_value = "./var/lib/signet-ca",
            value_name = "DIR"
        )]
        state_dir: PathBuf,
    },
    /// Declare a renewal of the self-signed root: a new root is made in
    /// `<state-dir>/next`, and the serving CA rotates to it.
    Start {
        /// Renew the self-signed root (the CA runs without --cacerts-dir material).
        #[arg(long, required = true)]
        self_signed: bool,
        /// The CA's --state-dir.
        #[arg(
            long,
            env = "SIGNET_STATE_DIR",
            default_value = "./var/lib/signet-ca",
            value_name = "DIR"
        )]
        state_dir: PathBuf,
        /// The CA's trust domain (the new root's organization, as the first one's).
        #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
    },
}

/// Why a `signet-ca rotation` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot reach the CA at http://{addr}/rotation: {source}")]
    Fetch {
        addr: std::net::SocketAddr,
        #[source]
        source: reqwest::Error,
    },
    #[error("http://{addr}/rotation answered {status}: is this a signet-ca with driven rotation?")]
    Answer {
        addr: std::net::SocketAddr,
        status: reqwest::StatusCode,
    },
    #[error("http://{addr}/rotation: not a rotation status: {source}")]
    Decode {
        addr: std::net::SocketAddr,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Abort(#[source] std::io::Error),
    #[error(transparent)]
    Start(#[from] crate::keys::cacerts::CaCertsError),
}

/// Runs a `signet-ca rotation` command; returns what to print.
pub async fn run(
    command: RotationCommand,
    now: time::OffsetDateTime,
) -> Result<String, CommandError> {
    match command {
        RotationCommand::Status { http_addr, json } => {
            let addr = http_addr;
            let answer = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map(|c| c.get(format!("http://{addr}/rotation")))
                .map_err(|source| CommandError::Fetch { addr, source })?
                .send()
                .await
                .map_err(|source| CommandError::Fetch { addr, source })?;
            if !answer.status().is_success() {
                return Err(CommandError::Answer {
                    addr,
                    status: answer.status(),
                });
            }
            let body = answer
                .bytes()
                .await
                .map_err(|source| CommandError::Fetch { addr, source })?;
            let status: super::status::Status = serde_json::from_slice(&body)
                .map_err(|source| CommandError::Decode { addr, source })?;
            Ok(if json {
                serde_json::to_string_pretty(&status).unwrap_or_default() + "\n"
            } else {
                status.text()
            })
        }
        RotationCommand::Abort { state_dir } => {
            let path = super::sets::request_abort(&state_dir).map_err(CommandError::Abort)?;
            Ok(format!(
                "abort requested ({}); the CA acts on it at its next look (--reload-interval). Follow it with `signet-ca rotation status`.\n",
                path.display()
            ))
        }
        RotationCommand::Start {
            self_signed: _,
            state_dir,
            trust_domain,
        } => {
            let dir = super::sets::start_self_signed(&state_dir, &trust_domain, now)?;
            Ok(format!(
                "a new self-signed root is in {}; the CA declares the rotation to it at its next look. Follow it with `signet-ca rotation status`.\n",
                dir.display()
            ))
        }
    }
}
