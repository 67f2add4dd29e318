//! Command line and environment: `signet-agent run` and `signet-agent inspect`. The
//! CA client ([`crate::identity::caclient::CaArgs`]) and the identity and its renewal
//! ([`crate::identity::rotation::IdentityArgs`]) own their flags and checks; this module
//! flattens them into `run` beside the listeners and the secrets' sources.

use std::{net::SocketAddr, path::PathBuf, time::Duration as StdDuration};

use clap::{Args, Parser, Subcommand};

pub use crate::identity::catrust::CaTrust;
use crate::{
    identity::caclient::{CaArgs, CaConfig},
    identity::rotation::{IdentityArgs, IdentityConfig},
    secrets::filesecret::FilePolicy,
};
pub use signet_flags::ConfigError;
use signet_flags::between;

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
    #[command(flatten)]
    pub ca: CaArgs,

    #[command(flatten)]
    pub identity: IdentityArgs,

    /// Unix socket Envoy reads secrets from.
    #[arg(
        long,
        default_value = "./var/run/secrets/workload-spiffe-uds/socket",
        value_name = "PATH"
    )]
    pub socket: PathBuf,

    /// Also serve the SPIFFE Workload API (X.509-SVIDs and bundles) on this Unix
    /// socket (mode 0660), for workloads without Envoy; they find it through
    /// SPIFFE_ENDPOINT_SOCKET=unix://<path>.
    #[arg(long, env = "SIGNET_WORKLOAD_API_SOCKET", value_name = "PATH")]
    pub workload_api_socket: Option<PathBuf>,

    /// Also write key.pem, cert-chain.pem and root-cert.pem here (mode 0600).
    #[arg(long, env = "OUTPUT_CERTS", value_name = "DIR")]
    pub output_certs: Option<PathBuf>,

    /// Address of the HTTP listener for /healthz/ready and /metrics (`[::]`: IPv4
    /// and IPv6).
    #[arg(
        long,
        env = "SIGNET_HTTP_ADDR",
        default_value = "[::]:15020",
        value_name = "ADDR"
    )]
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

    /// The agent's HTTP listener, asked (at /trust) which stage of the CA's trust
    /// change the served bundle belongs to; an unspecified address (`[::]`, as
    /// `run` listens) means this host.
    #[arg(
        long,
        env = "SIGNET_HTTP_ADDR",
        default_value = "127.0.0.1:15020",
        value_name = "ADDR"
    )]
    pub agent_addr: std::net::SocketAddr,

    /// How long to wait for the secrets (100ms to 1h).
    #[arg(long, default_value = "5s", value_parser = between(StdDuration::from_millis(100), StdDuration::from_secs(3600)), value_name = "DURATION")]
    pub timeout: StdDuration,
}

/// Validated settings of `run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The CA client's.
    pub ca: CaConfig,
    /// The identity asked for and its renewal.
    pub identity: IdentityConfig,
    pub socket: PathBuf,
    /// The SPIFFE Workload API's socket, when served.
    pub workload_api_socket: Option<PathBuf>,
    pub output_certs: Option<PathBuf>,
    pub http_addr: SocketAddr,
    pub federated_bundles: Option<PathBuf>,
    /// Which directories file-backed SDS names may read from.
    pub file_secrets: FilePolicy,
}

impl RunArgs {
    /// Checks what clap's parsers cannot; `env` is the process environment (for
    /// `CA_HEADER_*`).
    pub fn validate(
        self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RunConfig, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let workload_api_socket = self
            .workload_api_socket
            .filter(|p| !p.as_os_str().is_empty());
        if workload_api_socket.as_ref() == Some(&self.socket) {
            return Err(ConfigError::new(
                "--workload-api-socket",
                "is the SDS socket (--socket); give the Workload API a socket of its own",
            ));
        }
        Ok(RunConfig {
            identity: self.identity.validate(&env)?,
            ca: self.ca.validate(env)?,
            socket: self.socket,
            workload_api_socket,
            output_certs: self.output_certs,
            http_addr: self.http_addr,
            federated_bundles: self.federated_bundles,
            file_secrets: FilePolicy::from_flags(self.file_secret_dirs)?,
        })
    }
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
        assert_eq!(c.ca.server_name, "istiod.istio-system.svc");
        assert_eq!(
            c.identity.spiffe_id.to_string(),
            "spiffe://cluster.local/ns/ns/sa/sa"
        );
        assert_eq!(
            c.socket,
            PathBuf::from("./var/run/secrets/workload-spiffe-uds/socket")
        );
        assert_eq!(c.identity.ttl, time::Duration::hours(24));
        assert_eq!(c.identity.key_type, crate::identity::keys::KeyType::EcP256);
        assert_eq!(c.http_addr.port(), 15020);
    }

    #[test]
    fn the_workload_api_needs_a_socket_of_its_own() {
        assert_eq!(parse(&[], &[]).unwrap().workload_api_socket, None);
        let c = parse(&["--workload-api-socket", "/run/spiffe/agent.sock"], &[]).unwrap();
        assert_eq!(
            c.workload_api_socket,
            Some(PathBuf::from("/run/spiffe/agent.sock"))
        );
        let err = parse(
            &[
                "--socket",
                "/run/s.sock",
                "--workload-api-socket",
                "/run/s.sock",
            ],
            &[],
        )
        .unwrap_err();
        assert!(err.contains("--workload-api-socket"), "{err}");
    }

    #[test]
    fn localhost_maps_to_istiod_and_headers_pass_through() {
        let c = parse(
            &["--ca-addr", "localhost:15012"],
            &[("CA_HEADER_X_TENANT", "blue"), ("OTHER", "x")],
        )
        .unwrap();
        assert_eq!(c.ca.server_name, "istiod.istio-system.svc");
        assert_eq!(
            c.ca.headers.get("x-tenant").map(String::as_str),
            Some("blue")
        );
        assert_eq!(c.ca.headers.len(), 1);
        let c = parse(&["--ca-addr", "ca.example:443"], &[]).unwrap();
        assert_eq!(c.ca.server_name, "ca.example");
        let c = parse(&["--ca-root-cert", "SYSTEM"], &[]).unwrap();
        assert_eq!(c.ca.trust, CaTrust::System);
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
        for (addr, says) in [
            ("http://ca:15012", "plain HTTP"),
            ("grpc://ca:15012", "other than https"),
            ("https://ca:15012/x", "path"),
            ("ca.example", "port is needed"),
        ] {
            let e = parse(&["--ca-addr", addr], &[]).unwrap_err();
            assert!(e.contains("--ca-addr") && e.contains(says), "{addr}: {e}");
        }
        for (var, value) in [
            ("ECC_SIGNATURE_ALGORITHM", "RSA"),
            ("WORKLOAD_RSA_KEY_SIZE", "1024"),
            ("FILE_MOUNTED_CERTS", "true"),
        ] {
            let e = parse(&[], &[(var, value)]).unwrap_err();
            assert!(e.contains(var), "{var}: {e}");
        }
        assert!(
            parse(
                &[],
                &[("ECC_SIGNATURE_ALGORITHM", "ECDSA"), ("ECC_CURVE", "P521")]
            )
            .unwrap_err()
            .contains("ECC_CURVE")
        );
        assert!(
            parse(&["--grace-ratio-jitter", "0.5"], &[])
                .unwrap_err()
                .contains("--grace-ratio-jitter")
        );
        assert!(
            parse(&[], &[("CA_HEADER_BAD", "a\nb")])
                .unwrap_err()
                .contains("CA_HEADER")
        );
    }

    #[test]
    fn https_ca_addresses_and_other_spellings_are_understood() {
        let c = parse(&["--ca-addr", "https://ca.example:15012/"], &[]).unwrap();
        assert_eq!(c.ca.addr, "ca.example:15012");
        assert_eq!(c.ca.server_name, "ca.example");
        use crate::identity::keys::KeyType;
        for (spelling, want) in [
            ("rsa-2048", KeyType::Rsa(2048)),
            ("rsa2048", KeyType::Rsa(2048)),
            ("rsa-4096", KeyType::Rsa(4096)),
            ("ec-p384", KeyType::EcP384),
        ] {
            let c = parse(&["--key-type", spelling], &[]).unwrap();
            assert_eq!(c.identity.key_type, want, "{spelling}");
        }
    }

    #[test]
    fn pilot_agents_key_variables_apply_unless_the_flag_is_given() {
        use crate::identity::keys::KeyType;
        let key = |args: &[&str], env: &[(&str, &str)]| parse(args, env).unwrap().identity.key_type;
        assert_eq!(
            key(&[], &[("ECC_SIGNATURE_ALGORITHM", "ECDSA")]),
            KeyType::EcP256
        );
        assert_eq!(
            key(
                &[],
                &[("ECC_SIGNATURE_ALGORITHM", "ECDSA"), ("ECC_CURVE", "P384")]
            ),
            KeyType::EcP384
        );
        assert_eq!(
            key(&[], &[("WORKLOAD_RSA_KEY_SIZE", "3072")]),
            KeyType::Rsa(3072)
        );
        assert_eq!(
            key(
                &["--key-type", "ec-p256"],
                &[("WORKLOAD_RSA_KEY_SIZE", "3072")]
            ),
            KeyType::EcP256
        );
        assert_eq!(
            key(&[], &[("FILE_MOUNTED_CERTS", "false")]),
            KeyType::EcP256
        );
    }

    #[test]
    fn the_refresh_jitter_is_pilot_agents() {
        assert_eq!(parse(&[], &[]).unwrap().identity.grace_jitter, 0.01);
        let none = parse(&["--grace-ratio-jitter", "0"], &[]).unwrap();
        assert_eq!(none.identity.grace_jitter, 0.0);
    }
}
