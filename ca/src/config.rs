//! Command line and environment: `signet-ca serve` and its flags.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use spiffe::TrustDomain;
use time::Duration;

use crate::{
    authn::{JwksSource, JwtConfig},
    duration::parse_duration,
    writers::{IstiodSecret, LeaseConfig, RootConfigMap, WriterConfig},
};

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
    /// Check the flags (and their environment variables) and exit: 0 when `serve`
    /// would accept them, 64 with the reason otherwise. Nothing is read, bound or
    /// contacted, so key material and the API server need not be there.
    #[arg(long)]
    pub check_config: bool,

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

    #[command(flatten)]
    pub conns: crate::conns::ConnArgs,

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

    /// Service accounts (`<namespace>/<name>`, comma separated) that may ask for the
    /// identities of the pods on their own node, as ztunnel does in Istio's ambient
    /// mode (Istio's default: istio-system/ztunnel). Needs API access to watch pods.
    #[arg(
        long,
        env = "CA_TRUSTED_NODE_ACCOUNTS",
        value_delimiter = ',',
        value_name = "NS/SA"
    )]
    pub trusted_node_accounts: Vec<String>,

    /// Check tokens only offline against --jwks, even where the API server is
    /// reachable (no TokenReview, so no `system:auth-delegator` binding needed).
    #[arg(long, requires = "jwks")]
    pub no_token_review: bool,

    /// Publish the trust bundle as a ConfigMap of this name (key `root-cert.pem`) in
    /// every namespace, as istiod does with `istio-ca-root-cert`; recreated when
    /// deleted, restored when edited. Written by the elected replica only.
    #[arg(long, env = "ROOT_CONFIGMAP", value_name = "NAME")]
    pub root_configmap: Option<String>,

    /// Only namespaces matching this label selector get the root ConfigMap
    /// (Kubernetes selector syntax, e.g. `istio-injection=enabled`).
    #[arg(
        long,
        env = "ROOT_CONFIGMAP_NAMESPACE_SELECTOR",
        value_name = "SELECTOR"
    )]
    pub root_configmap_namespace_selector: Option<String>,

    /// Publish the trust bundle as a ClusterTrustBundle for this signer name
    /// (`<domain>/<path>`), so pods can project it with a `clusterTrustBundle` volume.
    #[arg(long, env = "CLUSTER_TRUST_BUNDLE_SIGNER", value_name = "SIGNER")]
    pub cluster_trust_bundle_signer: Option<String>,

    /// Answer Kubernetes PodCertificateRequests for this signer name
    /// (`<domain>/<path>`, e.g. `signet.example.com/spiffe`) with the pod's SPIFFE
    /// identity; its root is published as a ClusterTrustBundle of the same name.
    #[arg(long, env = "POD_CERTIFICATE_SIGNER", value_name = "SIGNER")]
    pub pod_certificate_signer: Option<String>,

    /// Issue pod certificates only to this namespace or `<namespace>/<service
    /// account>` (repeatable; default: all).
    #[arg(long = "pod-certificate-allow", value_name = "NS[/SA]")]
    pub pod_certificate_allow: Vec<String>,

    /// Deny pod certificates to this namespace or `<namespace>/<service account>`
    /// (repeatable; wins over --pod-certificate-allow).
    #[arg(long = "pod-certificate-deny", value_name = "NS[/SA]")]
    pub pod_certificate_deny: Vec<String>,

    /// Keep a `kubernetes.io/tls` Secret (tls.crt, tls.key, ca.crt) for istiod's
    /// serving certificate, issued here and renewed at half-life, for istiod with
    /// ENABLE_CA_SERVER=false.
    #[arg(long, env = "ISTIOD_CERT_SECRET", value_name = "NAMESPACE/NAME")]
    pub istiod_cert_secret: Option<String>,

    /// DNS names in istiod's certificate besides `istiod.<namespace>.svc`
    /// (comma separated).
    #[arg(
        long,
        env = "ISTIOD_CERT_DNS_NAMES",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub istiod_cert_dns_names: Vec<String>,

    /// Lifetime of istiod's certificate.
    #[arg(long, default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub istiod_cert_ttl: Duration,

    /// Namespace of the Lease that elects the one replica that writes.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "istio-system",
        value_name = "NAMESPACE"
    )]
    pub leader_election_namespace: String,

    /// Name of that Lease.
    #[arg(long, default_value = "signet-ca-writer", value_name = "NAME")]
    pub leader_election_lease: String,

    /// This replica's name in the Lease (default: the host name and a random suffix).
    #[arg(long, env = "POD_NAME", value_name = "ID")]
    pub leader_election_identity: Option<String>,

    /// How long a Lease holds without renewal before another replica may take it.
    #[arg(long, default_value = "15s", value_parser = parse_duration, value_name = "DURATION")]
    pub lease_duration: Duration,

    /// The leader stops writing when it could not renew for this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub lease_renew_deadline: Duration,

    /// How often the Lease is renewed or tried.
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub lease_retry_period: Duration,
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
    pub conns: crate::conns::ConnLimits,
    pub max_streams_per_connection: u32,
    pub max_connection_age: Duration,
    pub max_token_reviews: usize,
    /// What the elected replica keeps in the API server; `None` when nothing.
    pub writers: Option<WriterConfig>,
    /// Who may impersonate the pods on their node (empty: nobody).
    pub trusted_node_accounts: Vec<signet_spiffe::ServiceAccount>,
    /// Access to the local API server: `Some(None)` in-cluster, `None` without.
    pub api_access: Option<Option<PathBuf>>,
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
        let api_access = match &self.kubeconfig {
            Some(path) if !path.as_os_str().is_empty() => Some(Some(path.clone())),
            _ if in_cluster => Some(None),
            _ => None,
        };
        let trust_domain = signet_spiffe::trust_domain(&self.trust_domain)
            .map_err(|e| err("--trust-domain", e.to_string()))?;
        let writers = writer_config(&self, api_access.as_ref())?;
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
        let mut jwt = match (self.jwt_issuer.clone(), self.jwks.clone()) {
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
        if let Some(jwt) = &mut jwt
            && let JwksSource::Url { url, .. } = &jwt.source
            && let Some(path) = api_server_path(url)
        {
            let Some(kubeconfig) = api_access.clone() else {
                return Err(err(
                    "--jwks",
                    format!("{url} is the API server's; give --kubeconfig or run in a pod"),
                ));
            };
            jwt.source = JwksSource::ApiServer { path, kubeconfig };
        }
        let mut trusted_node_accounts = Vec::new();
        for spec in self
            .trusted_node_accounts
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
        {
            let account = spec
                .split_once('/')
                .and_then(|(ns, sa)| signet_spiffe::ServiceAccount::new(ns, sa).ok())
                .ok_or_else(|| {
                    err(
                        "--trusted-node-accounts",
                        format!("{spec:?}: want <namespace>/<service account>"),
                    )
                })?;
            trusted_node_accounts.push(account);
        }
        if !trusted_node_accounts.is_empty() && api_access.is_none() {
            return Err(err(
                "--trusted-node-accounts",
                "node impersonation watches pods: give --kubeconfig or run in a pod".into(),
            ));
        }
        let kubeconfig = if self.no_token_review {
            None
        } else {
            api_access.clone()
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
            writers,
            trusted_node_accounts,
            api_access,
            cluster_aliases,
            trust_domain_aliases,
            remotes,
            serving_dns_names,
            allow_root_change: self.allow_root_change,
            reload_interval: self.reload_interval,
            max_pending: self.max_pending,
            signing_threads,
            max_pending_per_caller,
            conns: self.conns.limits(),
            max_streams_per_connection: self.max_streams_per_connection,
            max_connection_age: self.max_connection_age,
            max_token_reviews: self.max_token_reviews,
        })
    }
}

/// The host names under which a pod reaches its own API server.
const API_SERVER_HOSTS: [&str; 4] = [
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "kubernetes.default",
    "kubernetes",
];

/// The path of an https URL that names the in-cluster API server (fetched with the
/// service account's credentials and the cluster's CA, not anonymously).
fn api_server_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.strip_suffix(":443").unwrap_or(host);
    API_SERVER_HOSTS
        .contains(&host.to_ascii_lowercase().as_str())
        .then(|| format!("/{path}"))
}

/// Whether `name` is a Kubernetes object name (a DNS-1123 subdomain).
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Reads the writer flags: `None` when no writer is configured.
fn writer_config(
    args: &ServeArgs,
    api_access: Option<&Option<PathBuf>>,
) -> Result<Option<WriterConfig>, ConfigError> {
    let err = |flag, problem: String| ConfigError { flag, problem };
    fn set(v: &Option<String>) -> Option<&str> {
        v.as_deref().map(str::trim).filter(|v| !v.is_empty())
    }
    let root_configmap = match set(&args.root_configmap) {
        Some(name) if !is_object_name(name) => {
            return Err(err(
                "--root-configmap",
                format!("{name:?} is not a Kubernetes object name"),
            ));
        }
        Some(name) => {
            let namespace_selector =
                set(&args.root_configmap_namespace_selector).map(str::to_owned);
            if namespace_selector
                .as_deref()
                .is_some_and(|s| s.len() > 1024 || s.chars().any(char::is_control))
            {
                return Err(err(
                    "--root-configmap-namespace-selector",
                    "not a label selector".into(),
                ));
            }
            Some(RootConfigMap {
                name: name.to_owned(),
                namespace_selector,
            })
        }
        None if set(&args.root_configmap_namespace_selector).is_some() => {
            return Err(err(
                "--root-configmap-namespace-selector",
                "needs --root-configmap".into(),
            ));
        }
        None => None,
    };
    let mut trust_bundle_signers = Vec::new();
    if let Some(signer) = set(&args.cluster_trust_bundle_signer) {
        trust_bundle_signers.push(
            crate::writers::check_signer_name(signer)
                .map_err(|e| err("--cluster-trust-bundle-signer", e.to_string()))?,
        );
    }
    let pod_certificates = match set(&args.pod_certificate_signer) {
        Some(signer) => {
            let signer = crate::writers::check_signer_name(signer)
                .map_err(|e| err("--pod-certificate-signer", e.to_string()))?;
            if args.max_ttl < Duration::hours(1) {
                return Err(err(
                    "--max-ttl",
                    format!(
                        "{} is under an hour, the shortest pod certificate Kubernetes accepts",
                        args.max_ttl
                    ),
                ));
            }
            // Pods project the root from the ClusterTrustBundle of the same name.
            if !trust_bundle_signers.contains(&signer) {
                trust_bundle_signers.push(signer.clone());
            }
            let scopes = |flag: &'static str, specs: &[String]| {
                specs
                    .iter()
                    .map(|spec| {
                        let (ns, sa) = match spec.split_once('/') {
                            Some((ns, sa)) => (ns, Some(sa)),
                            None => (spec.as_str(), None),
                        };
                        let ok = is_object_name(ns)
                            && !ns.contains('.')
                            && sa.is_none_or(|sa| {
                                signet_spiffe::ServiceAccount::new(ns, sa).is_ok()
                            });
                        ok.then(|| crate::policy::Scope {
                            namespace: ns.to_owned(),
                            service_account: sa.map(str::to_owned),
                        })
                        .ok_or_else(|| {
                            err(flag, format!("{spec:?}: want NAMESPACE or NAMESPACE/SA"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            Some(crate::podcert::PodCertificates {
                signer,
                rules: crate::policy::PodRules {
                    allow: scopes("--pod-certificate-allow", &args.pod_certificate_allow)?,
                    deny: scopes("--pod-certificate-deny", &args.pod_certificate_deny)?,
                },
            })
        }
        None if !args.pod_certificate_allow.is_empty() || !args.pod_certificate_deny.is_empty() => {
            return Err(err(
                "--pod-certificate-allow/--pod-certificate-deny",
                "need --pod-certificate-signer".into(),
            ));
        }
        None => None,
    };
    let istiod_secret = match set(&args.istiod_cert_secret) {
        Some(spec) => {
            let (namespace, name) = spec
                .split_once('/')
                .filter(|(ns, name)| is_object_name(ns) && is_object_name(name))
                .ok_or_else(|| {
                    err(
                        "--istiod-cert-secret",
                        format!("{spec:?}: want NAMESPACE/NAME"),
                    )
                })?;
            let mut dns_names = vec![format!("istiod.{namespace}.svc")];
            for n in &args.istiod_cert_dns_names {
                let n = n.trim();
                if n.is_empty() || dns_names.iter().any(|d| d == n) {
                    continue;
                }
                if rustls::pki_types::DnsName::try_from(n).is_err() {
                    return Err(err(
                        "--istiod-cert-dns-names",
                        format!("{n:?} is not a DNS name"),
                    ));
                }
                dns_names.push(n.to_owned());
            }
            if args.istiod_cert_ttl < Duration::seconds(10) {
                return Err(err("--istiod-cert-ttl", "must be at least 10s".into()));
            }
            Some(IstiodSecret {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                dns_names,
                ttl: args.istiod_cert_ttl,
            })
        }
        None => None,
    };
    if root_configmap.is_none()
        && trust_bundle_signers.is_empty()
        && istiod_secret.is_none()
        && pod_certificates.is_none()
    {
        return Ok(None);
    }
    let Some(kubeconfig) = api_access.cloned() else {
        return Err(err(
            "--kubeconfig",
            "writing to the API server (--root-configmap, --cluster-trust-bundle-signer, --istiod-cert-secret, --pod-certificate-signer) needs --kubeconfig or running in a pod".into(),
        ));
    };
    let lease = LeaseConfig {
        namespace: args.leader_election_namespace.trim().to_owned(),
        name: args.leader_election_lease.trim().to_owned(),
        identity: match set(&args.leader_election_identity) {
            Some(id) => id.to_owned(),
            None => crate::writers::default_identity(),
        },
        duration: args.lease_duration,
        renew_deadline: args.lease_renew_deadline,
        retry_period: args.lease_retry_period,
    };
    if !is_object_name(&lease.namespace) {
        return Err(err(
            "--leader-election-namespace",
            format!("{:?} is not a namespace name", lease.namespace),
        ));
    }
    if !is_object_name(&lease.name) {
        return Err(err(
            "--leader-election-lease",
            format!("{:?} is not a Kubernetes object name", lease.name),
        ));
    }
    if lease.identity.len() > 253 || lease.identity.chars().any(char::is_control) {
        return Err(err(
            "--leader-election-identity",
            "at most 253 printable characters".into(),
        ));
    }
    // client-go's rules: the lease outlives the renew deadline, which leaves room
    // for more than one retry.
    if lease.retry_period < Duration::milliseconds(100) {
        return Err(err("--lease-retry-period", "must be at least 100ms".into()));
    }
    if lease.renew_deadline <= lease.retry_period * 1.2 {
        return Err(err(
            "--lease-renew-deadline",
            format!(
                "{} must be over 1.2 x --lease-retry-period {}",
                lease.renew_deadline, lease.retry_period
            ),
        ));
    }
    if lease.duration.subsec_nanoseconds() != 0 || lease.duration < Duration::seconds(1) {
        return Err(err(
            "--lease-duration",
            "whole seconds, at least 1s (a Lease records seconds)".into(),
        ));
    }
    if lease.duration <= lease.renew_deadline {
        return Err(err(
            "--lease-duration",
            format!(
                "{} must be longer than --lease-renew-deadline {}",
                lease.duration, lease.renew_deadline
            ),
        ));
    }
    Ok(Some(WriterConfig {
        kubeconfig,
        root_configmap,
        trust_bundle_signers,
        pod_certificates,
        istiod_secret,
        lease,
    }))
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
    fn writer_flags_need_api_access_and_valid_names() {
        assert!(parse(&[]).unwrap().writers.is_none());
        let e = parse(&["--root-configmap", "istio-ca-root-cert"]).unwrap_err();
        assert!(e.contains("--kubeconfig"), "{e}");
        let with = |extra: &[&str]| {
            let mut args = vec!["--kubeconfig", "/kc", "--no-token-review"];
            args.extend_from_slice(extra);
            parse(&args)
        };
        let c = with(&[
            "--root-configmap",
            "istio-ca-root-cert",
            "--istiod-cert-secret",
            "istio-system/istiod-tls",
            "--istiod-cert-dns-names",
            "istiod.istio-system.svc.cluster.local,istiod.istio-system.svc",
            "--cluster-trust-bundle-signer",
            "signet.dev/spiffe",
        ])
        .unwrap();
        assert!(c.kubeconfig.is_none(), "--no-token-review");
        let w = c.writers.unwrap();
        assert_eq!(w.kubeconfig.as_deref(), Some(std::path::Path::new("/kc")));
        let istiod = w.istiod_secret.unwrap();
        assert_eq!(
            istiod.dns_names,
            [
                "istiod.istio-system.svc",
                "istiod.istio-system.svc.cluster.local"
            ]
        );
        assert_eq!(w.lease.duration, Duration::seconds(15));
        assert!(!w.lease.identity.is_empty());
        for (args, flag) in [
            (&["--root-configmap", "Bad_Name"][..], "--root-configmap"),
            (
                &["--istiod-cert-secret", "istiod-tls"][..],
                "--istiod-cert-secret",
            ),
            (
                &["--cluster-trust-bundle-signer", "kubernetes.io/mine"][..],
                "--cluster-trust-bundle-signer",
            ),
            (
                &["--cluster-trust-bundle-signer", "nodomain"][..],
                "--cluster-trust-bundle-signer",
            ),
            (
                &["--root-configmap-namespace-selector", "a=b"][..],
                "--root-configmap-namespace-selector",
            ),
            (
                &["--root-configmap", "x", "--lease-duration", "5s"][..],
                "--lease-duration",
            ),
        ] {
            let e = with(args).unwrap_err();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }

    #[test]
    fn trusted_node_accounts_are_namespace_slash_name_and_need_api_access() {
        assert!(parse(&[]).unwrap().trusted_node_accounts.is_empty());
        let e = parse(&["--trusted-node-accounts", "istio-system/ztunnel"]).unwrap_err();
        assert!(e.contains("--kubeconfig"), "{e}");
        let c = parse(&[
            "--kubeconfig",
            "/kc",
            "--trusted-node-accounts",
            "istio-system/ztunnel, kube-system/ztunnel",
        ])
        .unwrap();
        let names: Vec<String> = c
            .trusted_node_accounts
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(names, ["istio-system/ztunnel", "kube-system/ztunnel"]);
        for bad in ["ztunnel", "a/b/c", "/x", "Bad NS/x"] {
            let e = parse(&["--kubeconfig", "/kc", "--trusted-node-accounts", bad]).unwrap_err();
            assert!(e.contains("--trusted-node-accounts"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_api_servers_jwks_url_is_fetched_with_api_credentials() {
        let url = "https://kubernetes.default.svc/openid/v1/jwks";
        assert_eq!(api_server_path(url).as_deref(), Some("/openid/v1/jwks"));
        assert_eq!(api_server_path("https://example.com/jwks"), None);
        let parse = |extra: &[&str]| {
            let mut full = vec!["signet-ca", "serve", "--jwt-issuer", "iss", "--jwks", url];
            full.extend_from_slice(extra);
            let Command::Serve(args) = Cli::try_parse_from(full).unwrap().command else {
                unreachable!()
            };
            args.validate(false).map_err(|e| e.to_string())
        };
        let e = parse(&[]).unwrap_err();
        assert!(e.contains("--kubeconfig"), "{e}");
        let c = parse(&["--kubeconfig", "/kc"]).unwrap();
        assert!(matches!(
            c.jwt.unwrap().source,
            JwksSource::ApiServer { ref path, .. } if path == "/openid/v1/jwks"
        ));
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
