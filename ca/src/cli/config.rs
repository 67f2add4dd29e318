//! Command line and environment: `signet-ca serve`. Each subsystem owns its flags as
//! a clap group with its own checks (`crate::keys::reload::KeyArgs`,
//! [`crate::issue::policy::PolicyArgs`], [`crate::issue::authn::flags::AuthnArgs`],
//! `crate::keys::tls::TlsArgs`, `crate::issue::queue::QueueArgs`, [`crate::conns::ConnArgs`],
//! [`crate::issue::podcert::PodCertArgs`], [`crate::kubernetes::writers::flags::WriterArgs`],
//! [`crate::issue::jwtsvid::flags::JwtArgs`]); this
//! module flattens them into one command and puts their results together.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{
    conns::ConnArgs,
    issue::{
        authn::flags::AuthnArgs, jwtsvid::flags::JwtArgs, podcert::PodCertArgs, policy::PolicyArgs,
        queue::QueueArgs,
    },
    keys::{reload::KeyArgs, tls::TlsArgs},
    kubernetes::writers::flags::WriterArgs,
    rotation::flags::RotationArgs,
};
pub use crate::{
    issue::authn::flags::{AuthnConfig, RemoteCluster},
    kubernetes::client::ApiAccess,
};
pub use signet_flags::ConfigError;

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
    Pki(crate::cli::pki::PkiCommand),
    /// Trust changes the CA drives: status, abort, renewing a self-signed root.
    #[command(subcommand)]
    Rotation(crate::rotation::flags::RotationCommand),
}

/// Flags of `signet-ca serve`. Durations are written like `24h`, `90m` or `8s`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Check the configuration and exit: 0 when `serve` would start with it, 64 with
    /// the reason otherwise. The flags and their environment variables, the key
    /// material, every kubeconfig and every JWKS file are read and checked; no port
    /// is bound and nothing is contacted (a JWKS URL is not fetched).
    #[arg(long)]
    pub check_config: bool,

    /// Check only the flags and their environment variables and exit (0, or 64 with
    /// the reason): nothing is read, so the files they name need not exist here.
    #[arg(long, conflicts_with = "check_config")]
    pub check_flags: bool,

    /// Address of the gRPC (TLS) listener.
    #[arg(long, default_value = "0.0.0.0:15012", value_name = "ADDR")]
    pub grpc_addr: SocketAddr,

    /// Address of the plain HTTP listener for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:15014", value_name = "ADDR")]
    pub http_addr: SocketAddr,

    /// Kubeconfig for the API server (TokenReview, the pod watch, the writers).
    /// Unset: the in-cluster configuration when running in a pod, else none.
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    #[command(flatten)]
    pub keys: KeyArgs,

    #[command(flatten)]
    pub policy: PolicyArgs,

    #[command(flatten)]
    pub authn: AuthnArgs,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub queue: QueueArgs,

    #[command(flatten)]
    pub conns: ConnArgs,

    #[command(flatten)]
    pub pods: PodCertArgs,

    #[command(flatten)]
    pub writers: WriterArgs,

    #[command(flatten)]
    pub jwt: JwtArgs,

    #[command(flatten)]
    pub rotation: RotationArgs,
}

/// Validated settings for `server::run`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Key material and its reload.
    pub keys: KeyArgs,
    /// Driven trust changes.
    pub rotation: RotationArgs,
    /// Identity, lifetimes, node impersonation.
    pub policy: crate::issue::policy::PolicyConfig,
    /// Token authentication.
    pub authn: AuthnConfig,
    /// Names in the CA's serving certificate.
    pub serving_dns_names: Vec<String>,
    /// Istio's `COMPLIANCE_POLICY`: what the TLS listeners accept.
    pub compliance_policy: signet_tls::CompliancePolicy,
    /// The signing queue's sizes.
    pub queue: crate::issue::queue::QueueConfig,
    /// Connection limits.
    pub conns: crate::conns::ConnLimits,
    /// The pod certificate signer; `None` when off.
    pub pods: Option<crate::issue::podcert::PodCertificates>,
    /// What the elected replica keeps in the API server; `None` when nothing.
    pub writers: Option<crate::kubernetes::writers::WriterConfig>,
    /// JWT-SVIDs and OIDC discovery; `None` when off.
    pub jwt: Option<crate::issue::jwtsvid::flags::JwtConfig>,
    /// Access to the local API server; `None` without, or when nothing uses it.
    pub api_access: Option<ApiAccess>,
}

impl ServeArgs {
    /// Checks what clap's parsers cannot (one flag against another, or against the
    /// API access); `in_cluster` says whether we run in a pod.
    pub fn validate(self, in_cluster: bool) -> Result<ServeConfig, ConfigError> {
        let api_access = match self.kubeconfig {
            Some(path) if !path.as_os_str().is_empty() => Some(ApiAccess::Kubeconfig(path)),
            _ if in_cluster => Some(ApiAccess::InCluster),
            _ => None,
        };
        let policy = self.policy.validate(api_access.is_some())?;
        let pods = self.pods.validate(policy.max_ttl)?;
        let pod_signer = pods.as_ref().map(|p| p.signer.as_str());
        let writers = self.writers.validate(pod_signer, api_access.as_ref())?;
        let authn = self.authn.validate(api_access.as_ref())?;
        let jwt = self.jwt.validate(api_access.is_some())?;
        let jwt_secret = matches!(
            jwt.as_ref().map(|j| &j.keys),
            Some(crate::issue::jwtsvid::flags::KeyPlace::Secret { .. })
        );
        // API access that nothing uses is dropped: a JWKS-only CA in a pod neither
        // needs the pod's credentials nor probes the API server.
        let jwks_on_api = matches!(
            authn.jwt.as_ref().map(|j| &j.source),
            Some(crate::issue::authn::JwksSource::ApiServer { .. })
        );
        let used = authn.reviews.is_some()
            || jwks_on_api
            || writers.is_some()
            || pods.is_some()
            || jwt_secret
            || !policy.trusted_node_accounts.is_empty();
        let api_access = api_access.filter(|_| used);
        Ok(ServeConfig {
            grpc_addr: self.grpc_addr,
            http_addr: self.http_addr,
            keys: self.keys,
            rotation: self.rotation,
            policy,
            authn,
            serving_dns_names: self.tls.names()?,
            compliance_policy: self.tls.compliance.compliance_policy,
            queue: self.queue.config(),
            conns: self.conns.limits(),
            pods,
            writers,
            jwt,
            api_access,
        })
    }
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
    fn api_access_nothing_uses_is_dropped() {
        // JWKS from a file, no TokenReview, no writers: the kubeconfig is not used.
        let c = parse(&["--kubeconfig", "/kc", "--no-token-review"]).unwrap();
        assert_eq!(c.api_access, None);
        // TokenReview uses it.
        let c = parse(&["--kubeconfig", "/kc"]).unwrap();
        assert_eq!(c.api_access, Some(ApiAccess::Kubeconfig("/kc".into())));
        // So do the writers.
        let c = parse(&[
            "--kubeconfig",
            "/kc",
            "--no-token-review",
            "--root-configmap",
            "istio-ca-root-cert",
        ])
        .unwrap();
        assert!(c.api_access.is_some());
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
        assert!(c.authn.reviews.is_none(), "--no-token-review");
        let w = c.writers.unwrap();
        assert_eq!(w.access, ApiAccess::Kubeconfig("/kc".into()));
        let istiod = w.istiod_secret.unwrap();
        assert_eq!(
            istiod.dns_names,
            [
                "istiod.istio-system.svc",
                "istiod.istio-system.svc.cluster.local"
            ]
        );
        assert_eq!(w.lease.duration, std::time::Duration::from_secs(15));
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
        assert!(parse(&[]).unwrap().policy.trusted_node_accounts.is_empty());
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
            .policy
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
        use crate::issue::authn::{JwksSource, flags::api_server_path};
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
            c.authn.jwt.unwrap().source,
            JwksSource::ApiServer { ref path, .. } if path == "/openid/v1/jwks"
        ));
    }

    #[test]
    fn defaults_match_istio() {
        let c = parse(&[]).unwrap();
        use time::Duration;
        assert_eq!(c.policy.default_ttl, Duration::hours(24));
        assert_eq!(c.policy.max_ttl, Duration::hours(2160));
        assert_eq!(c.authn.token_audiences, vec!["istio-ca"]);
        assert_eq!(c.authn.cluster_id, "Kubernetes");
        assert_eq!(c.policy.trust_domains.primary().as_str(), "cluster.local");
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
}
