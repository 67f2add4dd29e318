//! Command line and environment: `signet-ca serve` and its flags.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use spiffe::TrustDomain;
use time::Duration;

use crate::authn::{JwksSource, JwtConfig};

/// Signet's certificate authority: Istio's CreateCertificate API, served over TLS.
#[derive(Debug, Parser)]
#[command(name = "signet-ca", version, about, long_about = None)]
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
    /// Serve IstioCertificateService/CreateCertificate over TLS.
    Serve(Box<ServeArgs>),
    /// PKI tooling: roots, per-cluster intermediates, bundles, and checks.
    #[command(subcommand)]
    Pki(crate::pki::PkiCommand),
}

/// Flags of `signet-ca serve`. Durations are written like `24h`, `90m` or `8s`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory with the CA key material: Istio's layout (ca-cert.pem, ca-key.pem,
    /// cert-chain.pem, root-cert.pem) or cert-manager's (tls.crt, tls.key, ca.crt).
    /// Watched for changes. When it holds none of these files, a self-signed root is
    /// created in --state-dir.
    #[arg(
        long,
        env = "ROOT_CA_DIR",
        default_value = "./etc/cacerts",
        value_name = "DIR"
    )]
    pub cacerts_dir: PathBuf,

    /// Where the self-signed root (root-cert.pem, root-key.pem) is created and kept.
    #[arg(
        long,
        env = "SIGNET_STATE_DIR",
        default_value = "./var/lib/signet-ca",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,

    /// Address of the gRPC (TLS) listener.
    #[arg(long, default_value = "0.0.0.0:15012", value_name = "ADDR")]
    pub grpc_addr: SocketAddr,

    /// Address of the plain HTTP listener for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:15014", value_name = "ADDR")]
    pub http_addr: SocketAddr,

    /// Trust domain of issued SPIFFE IDs: spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Lifetime of a certificate when the request asks for none.
    #[arg(long, env = "DEFAULT_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub default_ttl: Duration,

    /// Longest lifetime issued; longer requests are shortened to this.
    #[arg(long, env = "MAX_WORKLOAD_CERT_TTL", default_value = "2160h", value_parser = parse_duration, value_name = "DURATION")]
    pub max_ttl: Duration,

    /// Audiences a service account token must carry (comma separated).
    #[arg(
        long,
        env = "TOKEN_AUDIENCES",
        default_value = "istio-ca",
        value_delimiter = ',',
        value_name = "AUD"
    )]
    pub token_audiences: Vec<String>,

    /// This cluster's id, as clients send it in the `clusterid` header.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// Kubeconfig for TokenReview. Unset: the in-cluster configuration when running
    /// in a pod, else no TokenReview.
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Issuer (`iss`) of service account tokens, for offline verification with --jwks.
    #[arg(long, env = "JWT_ISSUER", requires = "jwks")]
    pub jwt_issuer: Option<String>,

    /// The cluster's JWKS for offline token verification: a file, or an https URL.
    #[arg(long, env = "JWKS", requires = "jwt_issuer", value_name = "FILE|URL")]
    pub jwks: Option<String>,

    /// PEM bundle to verify an https --jwks URL with (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    pub jwks_ca_cert: Option<PathBuf>,

    /// DNS names in the CA's serving certificate (comma separated): the names
    /// clients dial and verify.
    #[arg(
        long,
        env = "SERVING_DNS_NAMES",
        value_delimiter = ',',
        default_value = "istiod.istio-system.svc,istiod.istio-system.svc.cluster.local,istiod.istio-system,istiod"
    )]
    pub serving_dns_names: Vec<String>,

    /// Another name of this cluster in the `clusterid` header (repeatable).
    #[arg(long = "cluster-alias", value_name = "ID")]
    pub cluster_aliases: Vec<String>,

    /// A trust domain accepted as an alias of --trust-domain in CSRs and client
    /// certificates; certificates always carry the primary one (repeatable).
    #[arg(long = "trust-domain-alias", value_name = "DOMAIN")]
    pub trust_domain_aliases: Vec<String>,

    /// Another cluster whose tokens are checked by TokenReview through its own API
    /// server, chosen by the `clusterid` header (repeatable).
    #[arg(long = "remote-cluster", value_name = "ID=KUBECONFIG")]
    pub remote_clusters: Vec<String>,

    /// Another cluster whose tokens are checked offline against its JWKS (a file or
    /// an https URL), chosen by the `clusterid` header (repeatable).
    #[arg(long = "remote-jwks", value_name = "ID=ISSUER,JWKS")]
    pub remote_jwks: Vec<String>,

    /// Accept new key material whose roots do not include the root of the chain in
    /// use (workloads holding old certificates will fail to connect to new ones).
    #[arg(long)]
    pub allow_root_change: bool,

    /// How often the cacerts directory is checked for changes.
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub reload_interval: Duration,

    /// Signing requests allowed to wait; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 512)]
    pub max_pending: usize,

    /// Threads that sign (default: one per CPU).
    #[arg(long)]
    pub signing_threads: Option<usize>,

    /// Share of --max-pending one caller (service account) may hold at once; more
    /// from that caller are refused with RESOURCE_EXHAUSTED (default: a quarter of
    /// --max-pending).
    #[arg(long, value_name = "N")]
    pub max_pending_per_caller: Option<usize>,

    /// Open connections (including TLS handshakes in progress) allowed at once; more
    /// are closed as soon as they are accepted.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_connections: usize,

    /// Concurrent gRPC streams one connection may open (HTTP/2 SETTINGS).
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub max_streams_per_connection: u32,

    /// Connections are closed gracefully (GOAWAY) after this long, so nothing a
    /// connection proved at its handshake lives forever; clients reconnect.
    #[arg(long, default_value = "30m", value_parser = parse_duration, value_name = "DURATION")]
    pub max_connection_age: Duration,

    /// TokenReviews sent to an API server at once; requests beyond that get
    /// UNAVAILABLE at once (clients retry with backoff).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_token_reviews: usize,

    /// How long a JWKS fetched from a URL or file stays usable when it can no longer
    /// be refreshed; after that, tokens of that cluster fail (UNAVAILABLE) until a
    /// refresh succeeds.
    #[arg(long, default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub jwks_max_age: Duration,

    /// A JWKS older than this is fetched again in the background (verification goes
    /// on with the keys in hand meanwhile).
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub jwks_refresh_interval: Duration,
}

/// The largest value a limit flag takes.
const MAX_LIMIT: usize = 1_000_000;

/// A flag value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {problem}")]
pub struct ConfigError {
    flag: &'static str,
    problem: String,
}

/// How tokens of another cluster are checked.
#[derive(Debug, Clone, Default)]
pub struct RemoteCluster {
    /// TokenReview through this kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    /// Offline verification.
    pub jwt: Option<JwtConfig>,
}

/// Validated settings for [`crate::server::run`].
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub cacerts_dir: PathBuf,
    pub state_dir: PathBuf,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub trust_domain: TrustDomain,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub token_audiences: Vec<String>,
    pub cluster_id: String,
    /// `Some(None)`: in-cluster configuration; `None`: no TokenReview.
    pub kubeconfig: Option<Option<PathBuf>>,
    pub jwt: Option<JwtConfig>,
    pub cluster_aliases: Vec<String>,
    pub trust_domain_aliases: Vec<TrustDomain>,
    /// Other clusters by id: TokenReview kubeconfig and/or offline JWT.
    pub remotes: std::collections::BTreeMap<String, RemoteCluster>,
    pub serving_dns_names: Vec<String>,
    pub allow_root_change: bool,
    pub reload_interval: Duration,
    pub max_pending: usize,
    pub signing_threads: usize,
    pub max_pending_per_caller: usize,
    pub max_connections: usize,
    pub max_streams_per_connection: u32,
    pub max_connection_age: Duration,
    pub max_token_reviews: usize,
}

impl ServeConfig {
    /// `--trust-domain` with its `--trust-domain-alias`es.
    pub fn trust_domains(&self) -> signet_spiffe::TrustDomains {
        signet_spiffe::TrustDomains::new(
            self.trust_domain.clone(),
            self.trust_domain_aliases.clone(),
        )
    }
}

impl ServeArgs {
    /// Checks values that clap cannot; `in_cluster` says whether we run in a pod.
    pub fn validate(self, in_cluster: bool) -> Result<ServeConfig, ConfigError> {
        let err = |flag, problem: String| ConfigError { flag, problem };
        let trust_domain = signet_spiffe::trust_domain(&self.trust_domain)
            .map_err(|e| err("--trust-domain", e.to_string()))?;
        if self.default_ttl <= Duration::ZERO {
            return Err(err("--default-ttl", "must be positive".into()));
        }
        if self.max_ttl < self.default_ttl {
            return Err(err(
                "--max-ttl",
                format!(
                    "{} is shorter than --default-ttl {}",
                    self.max_ttl, self.default_ttl
                ),
            ));
        }
        let token_audiences: Vec<String> = self
            .token_audiences
            .into_iter()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        if token_audiences.is_empty() {
            return Err(err(
                "--token-audiences",
                "at least one audience is needed".into(),
            ));
        }
        if self.cluster_id.trim().is_empty() {
            return Err(err("--cluster-id", "must not be empty".into()));
        }
        let serving_dns_names: Vec<String> = self
            .serving_dns_names
            .into_iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        if serving_dns_names.is_empty() {
            return Err(err(
                "--serving-dns-names",
                "at least one name is needed".into(),
            ));
        }
        for name in &serving_dns_names {
            if rustls::pki_types::DnsName::try_from(name.as_str()).is_err() {
                return Err(err(
                    "--serving-dns-names",
                    format!("{name:?} is not a DNS name"),
                ));
            }
        }
        let jwks_source = |flag: &'static str, jwks: String| -> Result<JwksSource, ConfigError> {
            if jwks.starts_with("https://") {
                Ok(JwksSource::Url {
                    url: jwks,
                    ca: self.jwks_ca_cert.clone(),
                })
            } else if jwks.contains("://") || jwks.is_empty() {
                Err(err(
                    flag,
                    format!("{jwks:?}: want an https URL or a file path"),
                ))
            } else {
                Ok(JwksSource::File(jwks.into()))
            }
        };
        let jwt = match (self.jwt_issuer, self.jwks) {
            (Some(issuer), Some(jwks)) => Some(JwtConfig {
                issuer,
                audiences: token_audiences.clone(),
                source: jwks_source("--jwks", jwks)?,
                refresh_interval: self.jwks_refresh_interval,
                max_age: self.jwks_max_age,
            }),
            _ => None,
        };
        let mut remotes: std::collections::BTreeMap<String, RemoteCluster> = Default::default();
        for spec in &self.remote_clusters {
            let (id, path) = spec
                .split_once('=')
                .filter(|(id, path)| !id.is_empty() && !path.is_empty())
                .ok_or_else(|| err("--remote-cluster", format!("{spec:?}: want ID=KUBECONFIG")))?;
            remotes.entry(id.to_owned()).or_default().kubeconfig = Some(path.into());
        }
        for spec in &self.remote_jwks {
            let parsed = spec.split_once('=').and_then(|(id, rest)| {
                let (issuer, jwks) = rest.split_once(',')?;
                (!id.is_empty() && !issuer.is_empty()).then_some((id, issuer, jwks))
            });
            let (id, issuer, jwks) = parsed
                .ok_or_else(|| err("--remote-jwks", format!("{spec:?}: want ID=ISSUER,JWKS")))?;
            remotes.entry(id.to_owned()).or_default().jwt = Some(JwtConfig {
                issuer: issuer.to_owned(),
                audiences: token_audiences.clone(),
                source: jwks_source("--remote-jwks", jwks.to_owned())?,
                refresh_interval: self.jwks_refresh_interval,
                max_age: self.jwks_max_age,
            });
        }
        let cluster_aliases: Vec<String> = self
            .cluster_aliases
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect();
        for id in remotes.keys() {
            if *id == self.cluster_id || cluster_aliases.contains(id) {
                return Err(err(
                    "--remote-cluster/--remote-jwks",
                    format!("{id:?} is the local cluster"),
                ));
            }
        }
        let trust_domain_aliases = self
            .trust_domain_aliases
            .iter()
            .map(|td| {
                signet_spiffe::trust_domain(td)
                    .map_err(|e| err("--trust-domain-alias", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let kubeconfig = match self.kubeconfig {
            Some(path) if !path.as_os_str().is_empty() => Some(Some(path)),
            _ if in_cluster => Some(None),
            _ => None,
        };
        if kubeconfig.is_none() && jwt.is_none() {
            return Err(err(
                "--kubeconfig",
                "no way to check tokens: give --kubeconfig, run in a pod, or give --jwks with --jwt-issuer".into(),
            ));
        }
        if self.reload_interval < Duration::milliseconds(100) {
            return Err(err("--reload-interval", "must be at least 100ms".into()));
        }
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let signing_threads = self.signing_threads.unwrap_or(cpus);
        if signing_threads == 0 {
            return Err(err("--signing-threads", "must be at least 1".into()));
        }
        if self.max_pending == 0 {
            return Err(err("--max-pending", "must be at least 1".into()));
        }
        let max_pending_per_caller = self
            .max_pending_per_caller
            .unwrap_or((self.max_pending / 4).max(1));
        if max_pending_per_caller == 0 {
            return Err(err("--max-pending-per-caller", "must be at least 1".into()));
        }
        // Bounded above as well: each becomes a semaphore or a queue allocated up
        // front, and a typo of a few extra digits must be an error, not a panic.
        for (flag, value) in [
            ("--max-connections", self.max_connections),
            ("--max-token-reviews", self.max_token_reviews),
            ("--max-pending", self.max_pending),
            ("--max-pending-per-caller", max_pending_per_caller),
            (
                "--max-streams-per-connection",
                self.max_streams_per_connection as usize,
            ),
        ] {
            if value == 0 {
                return Err(err(flag, "must be at least 1".into()));
            }
            if value > MAX_LIMIT {
                return Err(err(flag, format!("{value} is over {MAX_LIMIT}")));
            }
        }
        if signing_threads > 4096 {
            return Err(err(
                "--signing-threads",
                format!("{signing_threads} is over 4096"),
            ));
        }
        if self.max_connection_age < Duration::seconds(1) {
            return Err(err("--max-connection-age", "must be at least 1s".into()));
        }
        if self.jwks_refresh_interval < Duration::seconds(1) {
            return Err(err("--jwks-refresh-interval", "must be at least 1s".into()));
        }
        if self.jwks_max_age <= self.jwks_refresh_interval {
            return Err(err(
                "--jwks-max-age",
                format!(
                    "{} must be longer than --jwks-refresh-interval {}",
                    self.jwks_max_age, self.jwks_refresh_interval
                ),
            ));
        }
        Ok(ServeConfig {
            cacerts_dir: self.cacerts_dir,
            state_dir: self.state_dir,
            grpc_addr: self.grpc_addr,
            http_addr: self.http_addr,
            trust_domain,
            default_ttl: self.default_ttl,
            max_ttl: self.max_ttl,
            token_audiences,
            cluster_id: self.cluster_id,
            kubeconfig,
            jwt,
            cluster_aliases,
            trust_domain_aliases,
            remotes,
            serving_dns_names,
            allow_root_change: self.allow_root_change,
            reload_interval: self.reload_interval,
            max_pending: self.max_pending,
            signing_threads,
            max_pending_per_caller,
            max_connections: self.max_connections,
            max_streams_per_connection: self.max_streams_per_connection,
            max_connection_age: self.max_connection_age,
            max_token_reviews: self.max_token_reviews,
        })
    }
}

/// Parses `24h`, `90m`, `8s`, `1h30m` into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 24h, 90m or 8s ({e})"))?;
    Duration::try_from(d).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServeConfig, String> {
        let mut full = vec![
            "signet-ca",
            "serve",
            "--jwks",
            "/x.json",
            "--jwt-issuer",
            "iss",
        ];
        full.extend_from_slice(args);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        args.validate(false).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_istio() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.default_ttl, Duration::hours(24));
        assert_eq!(c.max_ttl, Duration::hours(2160));
        assert_eq!(c.token_audiences, vec!["istio-ca"]);
        assert_eq!(c.cluster_id, "Kubernetes");
        assert_eq!(c.trust_domain.as_str(), "cluster.local");
        assert!(
            c.serving_dns_names
                .contains(&"istiod.istio-system.svc".to_string())
        );
        assert_eq!(c.grpc_addr.port(), 15012);
    }

    #[test]
    fn bad_values_are_named() {
        assert!(
            parse(&["--default-ttl", "soon"])
                .unwrap_err()
                .contains("--default-ttl")
        );
        assert!(
            parse(&["--max-ttl", "1h"])
                .unwrap_err()
                .contains("--max-ttl")
        );
        assert!(
            parse(&["--trust-domain", "a b"])
                .unwrap_err()
                .contains("--trust-domain")
        );
        assert!(
            parse(&["--token-audiences", ","])
                .unwrap_err()
                .contains("--token-audiences")
        );
        assert!(
            parse(&["--serving-dns-names", "not a name"])
                .unwrap_err()
                .contains("--serving-dns-names")
        );
        assert!(
            parse(&["--grpc-addr", "nowhere"])
                .unwrap_err()
                .contains("--grpc-addr")
        );
        for flag in [
            "--max-connections",
            "--max-pending",
            "--max-token-reviews",
            "--max-pending-per-caller",
        ] {
            assert!(
                parse(&[flag, "99999999999999"]).unwrap_err().contains(flag),
                "{flag}"
            );
            assert!(parse(&[flag, "0"]).unwrap_err().contains(flag), "{flag}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90m").unwrap(), Duration::minutes(90));
        assert_eq!(parse_duration("8s").unwrap(), Duration::seconds(8));
        assert!(parse_duration("-1s").is_err());
    }
}
