//! Command line and environment: `signet-agent run` and `signet-agent inspect`.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use spiffe::{SpiffeId, TrustDomain};
use time::Duration;

use crate::keys::KeyType;

/// Signet's workload agent: keys, certificates and Envoy SDS for one pod or node.
#[derive(Debug, Parser)]
#[command(name = "signet-agent", version, about, long_about = None)]
pub struct Cli {
    /// Log line format: text (control characters escaped) or json (one object per
    /// line). The filter is read from SIGNET_LOG (default info).
    #[arg(
        long,
        global = true,
        env = "SIGNET_LOG_FORMAT",
        default_value = "text",
        value_name = "text|json"
    )]
    pub log_format: signet_telemetry::LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Obtain and rotate the workload certificate and serve it to Envoy over SDS.
    Run(Box<RunArgs>),
    /// Connect to an SDS socket as Envoy would and print every secret it serves.
    Inspect(InspectArgs),
}

/// Flags of `signet-agent run`. Durations are written like `24h`, `90m` or `8s`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address of the CA (signet-ca or istiod), host:port.
    #[arg(long, env = "CA_ADDR", default_value = "istiod.istio-system.svc:15012")]
    pub ca_addr: String,

    /// PEM bundle to verify the CA's TLS certificate with, or SYSTEM for the
    /// system's roots.
    #[arg(
        long,
        env = "CA_ROOT_CA",
        default_value = "./var/run/secrets/istio/root-cert.pem"
    )]
    pub ca_root_cert: String,

    /// TLS name to verify the CA as (default: the host of --ca-addr; any host
    /// containing "localhost" becomes istiod.istio-system.svc, as in Istio).
    #[arg(long, env = "ISTIOD_SAN")]
    pub ca_server_name: Option<String>,

    /// Service account token sent to the CA, re-read for every request.
    #[arg(
        long,
        default_value = "./var/run/secrets/tokens/istio-token",
        value_name = "FILE"
    )]
    pub token_file: PathBuf,

    /// The pod's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,

    /// The pod's service account.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    pub service_account: String,

    /// Trust domain of the SPIFFE ID.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Cluster id sent to the CA in the `clusterid` header.
    #[arg(long, env = "ISTIO_META_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// Unix socket Envoy reads secrets from.
    #[arg(
        long,
        default_value = "./var/run/secrets/workload-spiffe-uds/socket",
        value_name = "PATH"
    )]
    pub socket: PathBuf,

    /// Certificate lifetime to ask for.
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub secret_ttl: Duration,

    /// Rotate when this fraction of the lifetime is left (0 < r < 1).
    #[arg(long, env = "SECRET_GRACE_PERIOD_RATIO", default_value_t = 0.5)]
    pub grace_ratio: f64,

    /// After the CA trust file changes (a root rotation), keep asking the CA (with
    /// backoff from 1 s to 30 s) until its bundle reflects the change, for at most
    /// this long; then warn, count it, and return to the normal schedule.
    #[arg(long, env = "TRUST_SYNC_TIMEOUT", default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub trust_sync_timeout: Duration,

    /// Type of the private key generated for each certificate.
    #[arg(long, value_enum, default_value_t = KeyTypeArg::EcP256)]
    pub key_type: KeyTypeArg,

    /// Also write key.pem, cert-chain.pem and root-cert.pem here (mode 0600).
    #[arg(long, env = "OUTPUT_CERTS", value_name = "DIR")]
    pub output_certs: Option<PathBuf>,

    /// Address of the HTTP listener for /healthz/ready and /metrics.
    #[arg(long, default_value = "0.0.0.0:15020", value_name = "ADDR")]
    pub http_addr: SocketAddr,

    /// Bundles of other trust domains, served through Envoy's SPIFFE validator as
    /// `ALL` and `spiffe://<trust-domain>`: a directory of `<trust-domain>.pem` or
    /// `<trust-domain>.json` (SPIFFE bundle) files, or one JSON file mapping trust
    /// domains to SPIFFE bundles. Re-read every 2 seconds.
    #[arg(long, env = "FEDERATED_BUNDLES", value_name = "PATH")]
    pub federated_bundles: Option<PathBuf>,

    /// A directory that Istio's file-backed SDS names (`file-cert:<cert>~<key>`,
    /// `file-root:<path>`) may read from (repeatable; comma separated in the
    /// variable). None by default: such names are refused with PERMISSION_DENIED,
    /// since anyone on the socket could otherwise read any file the agent can.
    #[arg(
        long = "file-secret-dir",
        env = "FILE_SECRET_DIRS",
        value_delimiter = ',',
        value_name = "DIR"
    )]
    pub file_secret_dirs: Vec<PathBuf>,
}

/// Key types on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyTypeArg {
    /// ECDSA P-256.
    EcP256,
    /// ECDSA P-384.
    EcP384,
    /// RSA 2048 bits.
    Rsa2048,
    /// RSA 3072 bits.
    Rsa3072,
    /// RSA 4096 bits.
    Rsa4096,
}

impl From<KeyTypeArg> for KeyType {
    fn from(k: KeyTypeArg) -> Self {
        match k {
            KeyTypeArg::EcP256 => Self::EcP256,
            KeyTypeArg::EcP384 => Self::EcP384,
            KeyTypeArg::Rsa2048 => Self::Rsa(2048),
            KeyTypeArg::Rsa3072 => Self::Rsa(3072),
            KeyTypeArg::Rsa4096 => Self::Rsa(4096),
        }
    }
}

/// Flags of `signet-agent inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The SDS socket.
    #[arg(
        long,
        default_value = "./var/run/secrets/workload-spiffe-uds/socket",
        value_name = "PATH"
    )]
    pub socket: PathBuf,

    /// Secret names to ask for.
    #[arg(long, value_delimiter = ',', default_value = "default,ROOTCA")]
    pub names: Vec<String>,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// How long to wait for the secrets.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

/// A flag value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {problem}")]
pub struct ConfigError {
    flag: &'static str,
    problem: String,
}

pub use crate::catrust::CaTrust;

/// Validated settings of `run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub ca_addr: String,
    pub ca_trust: CaTrust,
    pub ca_server_name: String,
    pub token_file: PathBuf,
    pub spiffe_id: SpiffeId,
    pub trust_domain: TrustDomain,
    pub cluster_id: String,
    pub socket: PathBuf,
    pub secret_ttl: Duration,
    pub grace_ratio: f64,
    pub trust_sync_timeout: Duration,
    pub key_type: KeyType,
    pub output_certs: Option<PathBuf>,
    pub http_addr: SocketAddr,
    pub federated_bundles: Option<PathBuf>,
    /// Absolute directories file-backed SDS names may read from.
    pub file_secret_dirs: Vec<PathBuf>,
    /// Extra request headers from `CA_HEADER_<NAME>` variables.
    pub ca_headers: BTreeMap<String, String>,
}

impl RunArgs {
    /// Checks what clap cannot; `env` is the process environment (for CA_HEADER_*).
    pub fn validate(
        self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RunConfig, ConfigError> {
        let err = |flag, problem: String| ConfigError { flag, problem };
        let (host, port) = self
            .ca_addr
            .rsplit_once(':')
            .ok_or_else(|| err("--ca-addr", format!("{:?} is not host:port", self.ca_addr)))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(err(
                "--ca-addr",
                format!("{:?} is not host:port", self.ca_addr),
            ));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ca_server_name = match self.ca_server_name.filter(|s| !s.is_empty()) {
            Some(name) => name,
            None if host.contains("localhost") => "istiod.istio-system.svc".to_owned(),
            None => host.to_owned(),
        };
        if rustls_pki_types::ServerName::try_from(ca_server_name.as_str()).is_err() {
            return Err(err(
                "--ca-server-name",
                format!("{ca_server_name:?} is not a DNS name or IP address"),
            ));
        }
        let ca_trust = if self.ca_root_cert.eq_ignore_ascii_case("SYSTEM") {
            CaTrust::System
        } else if self.ca_root_cert.is_empty() {
            return Err(err("--ca-root-cert", "must be a file or SYSTEM".into()));
        } else {
            CaTrust::File(self.ca_root_cert.into())
        };
        let trust_domain = signet_spiffe::trust_domain(&self.trust_domain)
            .map_err(|e| err("--trust-domain", e.to_string()))?;
        if self.namespace.is_empty() {
            return Err(err("--namespace", "must not be empty".into()));
        }
        if self.service_account.is_empty() {
            return Err(err("--service-account", "must not be empty".into()));
        }
        let spiffe_id = SpiffeId::from_segments(
            trust_domain.clone(),
            &["ns", &self.namespace, "sa", &self.service_account],
        )
        .map_err(|e| {
            err(
                "--namespace/--service-account",
                format!("not usable in a SPIFFE ID: {e}"),
            )
        })?;
        if self.secret_ttl < Duration::seconds(1) {
            return Err(err("--secret-ttl", "must be at least 1s".into()));
        }
        if !(self.grace_ratio > 0.0 && self.grace_ratio < 1.0) {
            return Err(err(
                "--grace-ratio",
                format!("{} is not between 0 and 1", self.grace_ratio),
            ));
        }
        let mut file_secret_dirs = Vec::new();
        for dir in self.file_secret_dirs {
            if dir.as_os_str().is_empty() {
                continue;
            }
            if dir == std::path::Path::new("/") {
                return Err(err(
                    "--file-secret-dir",
                    "/ would expose every file the agent can read".into(),
                ));
            }
            let absolute = std::path::absolute(&dir)
                .map_err(|e| err("--file-secret-dir", format!("{}: {e}", dir.display())))?;
            file_secret_dirs.push(absolute);
        }
        let mut ca_headers = BTreeMap::new();
        for (key, value) in env {
            if let Some(name) = key.strip_prefix("CA_HEADER_") {
                let name = name.to_ascii_lowercase().replace('_', "-");
                if http::HeaderName::try_from(name.as_str()).is_err()
                    || http::HeaderValue::try_from(value.as_str()).is_err()
                {
                    return Err(err("CA_HEADER_*", format!("{key} is not a valid header")));
                }
                ca_headers.insert(name, value);
            }
        }
        Ok(RunConfig {
            ca_addr: self.ca_addr,
            ca_trust,
            ca_server_name,
            token_file: self.token_file,
            spiffe_id,
            trust_domain,
            cluster_id: self.cluster_id,
            socket: self.socket,
            secret_ttl: self.secret_ttl,
            grace_ratio: self.grace_ratio,
            trust_sync_timeout: self.trust_sync_timeout,
            key_type: self.key_type.into(),
            output_certs: self.output_certs,
            http_addr: self.http_addr,
            federated_bundles: self.federated_bundles,
            file_secret_dirs,
            ca_headers,
        })
    }
}

/// Why a flag's value is not a duration.
#[derive(Debug, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration like 24h, 90m or 8s ({1})")]
    Syntax(String, #[source] humantime::DurationError),
    #[error("{0:?} is too long")]
    TooLong(String),
}

/// Parses `24h`, `90m`, `8s` into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let d =
        humantime::parse_duration(s.trim()).map_err(|e| DurationError::Syntax(s.to_owned(), e))?;
    Duration::try_from(d).map_err(|_| DurationError::TooLong(s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<RunConfig, String> {
        let mut full = vec![
            "signet-agent",
            "run",
            "--namespace",
            "ns",
            "--service-account",
            "sa",
        ];
        full.extend_from_slice(args);
        let Command::Run(run) = Cli::try_parse_from(full)
            .map_err(|e| e.to_string())?
            .command
        else {
            unreachable!()
        };
        run.validate(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_pilot_agent() {
        let c = parse(&[], &[]).unwrap();
        assert_eq!(c.ca_server_name, "istiod.istio-system.svc");
        assert_eq!(
            c.spiffe_id.to_string(),
            "spiffe://cluster.local/ns/ns/sa/sa"
        );
        assert_eq!(
            c.socket,
            PathBuf::from("./var/run/secrets/workload-spiffe-uds/socket")
        );
        assert_eq!(c.secret_ttl, Duration::hours(24));
        assert_eq!(c.key_type, KeyType::EcP256);
        assert_eq!(c.http_addr.port(), 15020);
    }

    #[test]
    fn localhost_maps_to_istiod_and_headers_pass_through() {
        let c = parse(
            &["--ca-addr", "localhost:15012"],
            &[("CA_HEADER_X_TENANT", "blue"), ("OTHER", "x")],
        )
        .unwrap();
        assert_eq!(c.ca_server_name, "istiod.istio-system.svc");
        assert_eq!(
            c.ca_headers.get("x-tenant").map(String::as_str),
            Some("blue")
        );
        assert_eq!(c.ca_headers.len(), 1);
        let c = parse(&["--ca-addr", "ca.example:443"], &[]).unwrap();
        assert_eq!(c.ca_server_name, "ca.example");
        let c = parse(&["--ca-root-cert", "SYSTEM"], &[]).unwrap();
        assert_eq!(c.ca_trust, CaTrust::System);
    }

    #[test]
    fn bad_values_are_named() {
        assert!(
            parse(&["--ca-addr", "nohostport"], &[])
                .unwrap_err()
                .contains("--ca-addr")
        );
        assert!(
            parse(&["--grace-ratio", "1.5"], &[])
                .unwrap_err()
                .contains("--grace-ratio")
        );
        assert!(
            parse(&["--secret-ttl", "0s"], &[])
                .unwrap_err()
                .contains("--secret-ttl")
        );
        assert!(
            parse(&["--trust-domain", "a b"], &[])
                .unwrap_err()
                .contains("--trust-domain")
        );
        assert!(parse(&["--key-type", "dsa"], &[]).is_err());
        assert!(
            parse(&[], &[("CA_HEADER_BAD", "a\nb")])
                .unwrap_err()
                .contains("CA_HEADER")
        );
    }
}
