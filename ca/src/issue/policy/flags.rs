//! Policy's flags (part of `signet-ca serve`): trust domains, lifetimes, and who may
//! act for the pods on their node.

use time::Duration;

use signet_spiffe::{IdentityError, ServiceAccount, TrustDomains};

/// Flags of policy (part of `signet-ca serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// Trust domain of issued SPIFFE IDs: spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local", value_parser = trust_domain)]
    pub trust_domain: spiffe::TrustDomain,

    /// A trust domain accepted as an alias of --trust-domain in CSRs and client
    /// certificates; certificates always carry the primary one (repeatable).
    #[arg(long = "trust-domain-alias", value_name = "DOMAIN", value_parser = trust_domain)]
    pub trust_domain_aliases: Vec<spiffe::TrustDomain>,

    /// Lifetime of a certificate when the request asks for none (1s to 100 years).
    #[arg(long, env = "DEFAULT_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = ttl_flag(), value_name = "DURATION")]
    pub default_ttl: Duration,

    /// Longest lifetime issued; longer requests are shortened to this (1s to 100
    /// years, at least --default-ttl).
    #[arg(long, env = "MAX_WORKLOAD_CERT_TTL", default_value = "2160h", value_parser = ttl_flag(), value_name = "DURATION")]
    pub max_ttl: Duration,

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

    /// A Subject common name for issued certificates, from a template of text and
    /// {ns}, {sa}, {td}, for client-certificate STS (MinIO's
    /// AssumeRoleWithCertificate names its policy by the CN); only in the namespaces
    /// of --subject-cn-namespaces. A name past 64 characters is left out.
    #[arg(long, env = "SIGNET_SUBJECT_CN_TEMPLATE", value_name = "TEMPLATE")]
    pub subject_cn_template: Option<String>,

    /// Namespaces whose certificates carry the --subject-cn-template name (comma
    /// separated; `*` for all).
    #[arg(
        long,
        env = "SIGNET_SUBJECT_CN_NAMESPACES",
        value_delimiter = ',',
        value_name = "NS"
    )]
    pub subject_cn_namespaces: Vec<String>,
}

fn trust_domain(s: &str) -> Result<spiffe::TrustDomain, IdentityError> {
    signet_spiffe::trust_domain(s)
}

fn ttl_flag() -> impl Fn(&str) -> Result<Duration, crate::flags::DurationError> + Clone + Send + Sync
{
    crate::flags::lifetime_between(
        std::time::Duration::from_secs(1),
        36_525 * crate::flags::DAY,
    )
}

/// Policy's settings, checked.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Our trust domain and its aliases.
    pub trust_domains: TrustDomains,
    /// Lifetime when none is asked.
    pub default_ttl: Duration,
    /// Longest lifetime.
    pub max_ttl: Duration,
    /// Who may act for the pods on their node (empty: nobody).
    pub trusted_node_accounts: Vec<ServiceAccount>,
    /// The Subject CN profile, when asked for.
    pub subject_cn: Option<super::SubjectCn>,
}

impl PolicyArgs {
    /// Checks what one flag alone cannot say; `api_access`: whether the API server
    /// is reachable (node impersonation watches pods).
    pub fn validate(self, api_access: bool) -> Result<PolicyConfig, crate::flags::ConfigError> {
        use crate::flags::ConfigError;
        if self.max_ttl < self.default_ttl {
            return Err(ConfigError::new(
                "--max-ttl",
                format!(
                    "{} is shorter than --default-ttl {}",
                    self.max_ttl, self.default_ttl
                ),
            ));
        }
        // Parsed here rather than by clap: an empty CA_TRUSTED_NODE_ACCOUNTS (as a
        // chart renders an empty list) means nobody, not an error.
        let mut trusted_node_accounts = Vec::new();
        for spec in self
            .trusted_node_accounts
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
        {
            let account = spec
                .split_once('/')
                .and_then(|(ns, sa)| ServiceAccount::new(ns, sa).ok())
                .ok_or_else(|| {
                    ConfigError::new(
                        "--trusted-node-accounts",
                        format!("{spec:?}: want <namespace>/<service account>"),
                    )
                })?;
            trusted_node_accounts.push(account);
        }
        if !trusted_node_accounts.is_empty() && !api_access {
            return Err(ConfigError::new(
                "--trusted-node-accounts",
                "node impersonation watches pods: give --kubeconfig or run in a pod",
            ));
        }
        let subject_cn = match self
            .subject_cn_template
            .as_deref()
            .filter(|t| !t.is_empty())
        {
            Some(template) => Some(
                super::SubjectCn::parse(template, &self.subject_cn_namespaces)
                    .map_err(|e| ConfigError::new("--subject-cn-template", e))?,
            ),
            None if self
                .subject_cn_namespaces
                .iter()
                .any(|n| !n.trim().is_empty()) =>
            {
                return Err(ConfigError::new(
                    "--subject-cn-namespaces",
                    "needs --subject-cn-template (the name to give)",
                ));
            }
            None => None,
        };
        Ok(PolicyConfig {
            subject_cn,
            trust_domains: TrustDomains::new(self.trust_domain, self.trust_domain_aliases),
            default_ttl: self.default_ttl,
            max_ttl: self.max_ttl,
            trusted_node_accounts,
        })
    }
}
