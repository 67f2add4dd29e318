//! Flags of what the elected replica writes (part of `signet-ca serve`): the root
//! ConfigMap, the ClusterTrustBundle, istiod's Secret, and the Lease that elects the
//! writer; checked here into a [`WriterConfig`].

use std::time::Duration;

use crate::{
    flags::{ConfigError, DAY, between, dns_name, lifetime_between, object_name, parse_set},
    kubernetes::client::ApiAccess,
};

/// The writers' flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WriterArgs {
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

    /// Lifetime of istiod's certificate (10s to 365 days).
    #[arg(long, default_value = "24h", value_parser = lifetime_between(Duration::from_secs(10), 365 * DAY), value_name = "DURATION")]
    pub istiod_cert_ttl: time::Duration,

    #[command(flatten)]
    pub lease: LeaseArgs,
}

/// Leader election's flags (client-go's names and defaults).
#[derive(Debug, Clone, clap::Args)]
pub struct LeaseArgs {
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

    /// This replica's name in the Lease (default: the host name and a random suffix;
    /// at most 253 printable characters).
    #[arg(long, env = "POD_NAME", value_name = "ID")]
    pub leader_election_identity: Option<String>,

    /// How long a Lease holds without renewal before another replica may take it
    /// (whole seconds, 1s to 1h; longer than --lease-renew-deadline).
    #[arg(long, default_value = "15s", value_parser = between(Duration::from_secs(1), Duration::from_secs(3600)), value_name = "DURATION")]
    pub lease_duration: Duration,

    /// The leader stops writing when it could not renew for this long (over 1.2 x
    /// --lease-retry-period).
    #[arg(long, default_value = "10s", value_parser = between(Duration::from_millis(100), Duration::from_secs(3600)), value_name = "DURATION")]
    pub lease_renew_deadline: Duration,

    /// How often the Lease is renewed or tried (100ms to 1h).
    #[arg(long, default_value = "2s", value_parser = between(Duration::from_millis(100), Duration::from_secs(3600)), value_name = "DURATION")]
    pub lease_retry_period: Duration,
}

/// Why a writer flag's value is not what it takes.
#[derive(Debug, thiserror::Error)]
pub enum WriterFlagError {
    #[error("not a label selector")]
    Selector,
    #[error("{0:?}: want NAMESPACE/NAME")]
    NamespacedName(String),
    #[error("at most 253 printable characters")]
    Identity,
}

fn label_selector(s: &str) -> Result<String, WriterFlagError> {
    let s = s.trim();
    if s.len() > 1024 || s.chars().any(char::is_control) {
        return Err(WriterFlagError::Selector);
    }
    Ok(s.to_owned())
}

fn namespaced_name(s: &str) -> Result<(String, String), WriterFlagError> {
    s.trim()
        .split_once('/')
        .and_then(|(ns, name)| Some((object_name(ns).ok()?, object_name(name).ok()?)))
        .ok_or_else(|| WriterFlagError::NamespacedName(s.to_owned()))
}

fn holder_identity(s: &str) -> Result<String, WriterFlagError> {
    let s = s.trim();
    if s.len() > 253 || s.chars().any(char::is_control) {
        return Err(WriterFlagError::Identity);
    }
    Ok(s.to_owned())
}

/// The root ConfigMap writer's settings.
#[derive(Debug, Clone)]
pub struct RootConfigMap {
    /// The ConfigMap's name (`istio-ca-root-cert`).
    pub name: String,
    /// Only namespaces matching this label selector.
    pub namespace_selector: Option<String>,
}

/// The istiod Secret writer's settings.
#[derive(Debug, Clone)]
pub struct IstiodSecret {
    /// Namespace of the Secret.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// DNS names of the certificate, `istiod.<namespace>.svc` first.
    pub dns_names: Vec<String>,
    /// Lifetime of the certificate; renewed at half of it.
    pub ttl: time::Duration,
}

/// Leader election settings (client-go's names and defaults).
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's holder identity.
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub duration: Duration,
    /// The leader stops writing when it could not renew for this long.
    pub renew_deadline: Duration,
    /// How often the Lease is renewed or tried.
    pub retry_period: Duration,
}

/// Everything the elected replica writes, and how it is elected.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// How the API server is reached.
    pub access: ApiAccess,
    /// The root ConfigMap in every namespace.
    pub root_configmap: Option<RootConfigMap>,
    /// The signer names ClusterTrustBundles are kept for.
    pub trust_bundle_signers: Vec<String>,
    /// istiod's serving Secret.
    pub istiod_secret: Option<IstiodSecret>,
    /// Leader election.
    pub lease: LeaseConfig,
}

impl WriterArgs {
    /// The writers to run, with `pod_signer` the pod certificate signer's name (its
    /// roots need a ClusterTrustBundle of that name, and it runs on the elected
    /// replica): `None` when nothing is to be written. Writing needs `api`.
    pub fn validate(
        self,
        pod_signer: Option<&str>,
        api: Option<&ApiAccess>,
    ) -> Result<Option<WriterConfig>, ConfigError> {
        // These come from environment variables too, where empty means unset; so
        // they are parsed here rather than by clap, which would refuse "".
        let selector = parse_set(
            "--root-configmap-namespace-selector",
            &self.root_configmap_namespace_selector,
            label_selector,
        )?;
        let root_configmap = match parse_set("--root-configmap", &self.root_configmap, object_name)?
        {
            Some(name) => Some(RootConfigMap {
                name,
                namespace_selector: selector,
            }),
            None if selector.is_some() => {
                return Err(ConfigError::new(
                    "--root-configmap-namespace-selector",
                    "needs --root-configmap",
                ));
            }
            None => None,
        };
        let mut trust_bundle_signers: Vec<String> = parse_set(
            "--cluster-trust-bundle-signer",
            &self.cluster_trust_bundle_signer,
            super::check_signer_name,
        )?
        .into_iter()
        .collect();
        // Pods project the root from the ClusterTrustBundle of the same name.
        if let Some(signer) = pod_signer
            && !trust_bundle_signers.iter().any(|s| s == signer)
        {
            trust_bundle_signers.push(signer.to_owned());
        }
        let istiod_secret = match parse_set(
            "--istiod-cert-secret",
            &self.istiod_cert_secret,
            namespaced_name,
        )? {
            Some((namespace, name)) => {
                let mut dns_names = vec![format!("istiod.{namespace}.svc")];
                for n in &self.istiod_cert_dns_names {
                    let n = n.trim();
                    if n.is_empty() || dns_names.iter().any(|d| d == n) {
                        continue;
                    }
                    let n = dns_name(n)
                        .map_err(|e| ConfigError::new("--istiod-cert-dns-names", e.to_string()))?;
                    dns_names.push(n);
                }
                Some(IstiodSecret {
                    namespace,
                    name,
                    dns_names,
                    ttl: self.istiod_cert_ttl,
                })
            }
            None => None,
        };
        if root_configmap.is_none() && trust_bundle_signers.is_empty() && istiod_secret.is_none() {
            return Ok(None);
        }
        let Some(access) = api.cloned() else {
            return Err(ConfigError::new(
                "--kubeconfig",
                "writing to the API server (--root-configmap, --cluster-trust-bundle-signer, --istiod-cert-secret, --pod-certificate-signer) needs --kubeconfig or running in a pod",
            ));
        };
        Ok(Some(WriterConfig {
            access,
            root_configmap,
            trust_bundle_signers,
            istiod_secret,
            lease: self.lease.validate()?,
        }))
    }
}

impl LeaseArgs {
    /// client-go's rules: the lease outlives the renew deadline, which leaves room
    /// for more than one retry; a Lease records whole seconds.
    pub fn validate(self) -> Result<LeaseConfig, ConfigError> {
        // Checked here, not by clap: POD_NAMESPACE is set in every pod, and a value
        // no writer uses must not stop a CA that writes nothing.
        let lease = LeaseConfig {
            namespace: object_name(&self.leader_election_namespace)
                .map_err(|e| ConfigError::new("--leader-election-namespace", e.to_string()))?,
            name: object_name(&self.leader_election_lease)
                .map_err(|e| ConfigError::new("--leader-election-lease", e.to_string()))?,
            identity: parse_set(
                "--leader-election-identity",
                &self.leader_election_identity,
                holder_identity,
            )?
            .unwrap_or_else(super::default_identity),
            duration: self.lease_duration,
            renew_deadline: self.lease_renew_deadline,
            retry_period: self.lease_retry_period,
        };
        if lease.renew_deadline.as_secs_f64() <= lease.retry_period.as_secs_f64() * 1.2 {
            return Err(ConfigError::new(
                "--lease-renew-deadline",
                format!(
                    "{} must be over 1.2 x --lease-retry-period {}",
                    humantime::format_duration(lease.renew_deadline),
                    humantime::format_duration(lease.retry_period)
                ),
            ));
        }
        if lease.duration.subsec_nanos() != 0 {
            return Err(ConfigError::new(
                "--lease-duration",
                "whole seconds, at least 1s (a Lease records seconds)",
            ));
        }
        if lease.duration <= lease.renew_deadline {
            return Err(ConfigError::new(
                "--lease-duration",
                format!(
                    "{} must be longer than --lease-renew-deadline {}",
                    humantime::format_duration(lease.duration),
                    humantime::format_duration(lease.renew_deadline)
                ),
            ));
        }
        Ok(lease)
    }
}
