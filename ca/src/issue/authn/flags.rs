//! Flags of token authentication (part of `signet-ca serve`): the local cluster's
//! audiences and id, offline verification against a JWKS, other clusters, and the
//! review limits; checked here into an [`AuthnConfig`].

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use super::{JwksSource, JwtConfig};
use crate::{
    flags::{ConfigError, DAY, between},
    kubernetes::client::ApiAccess,
};

/// The flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthnArgs {
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
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes", value_parser = non_empty)]
    pub cluster_id: String,

    /// Issuer (`iss`) of service account tokens, for offline verification with --jwks.
    #[arg(long, env = "JWT_ISSUER", requires = "jwks")]
    pub jwt_issuer: Option<String>,

    /// The cluster's JWKS for offline token verification: a file, or an https URL.
    #[arg(long, env = "JWKS", requires = "jwt_issuer", value_name = "FILE|URL", value_parser = jwks_location)]
    pub jwks: Option<JwksLocation>,

    /// PEM bundle to verify an https --jwks URL with (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    pub jwks_ca_cert: Option<PathBuf>,

    /// Another name of this cluster in the `clusterid` header (repeatable).
    #[arg(long = "cluster-alias", value_name = "ID")]
    pub cluster_aliases: Vec<String>,

    /// Another cluster whose tokens are checked by TokenReview through its own API
    /// server, chosen by the `clusterid` header (repeatable).
    #[arg(long = "remote-cluster", value_name = "ID=KUBECONFIG", value_parser = remote_cluster)]
    pub remote_clusters: Vec<(String, PathBuf)>,

    /// Another cluster whose tokens are checked offline against its JWKS (a file or
    /// an https URL), chosen by the `clusterid` header (repeatable).
    #[arg(long = "remote-jwks", value_name = "ID=ISSUER,JWKS", value_parser = remote_jwks)]
    pub remote_jwks: Vec<RemoteJwks>,

    /// TokenReviews sent to an API server at once; requests beyond that get
    /// UNAVAILABLE at once (clients retry with backoff; 1 to 1000000).
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_token_reviews: usize,

    /// How long a JWKS fetched from a URL or file stays usable when it can no longer
    /// be refreshed; after that, tokens of that cluster fail (UNAVAILABLE) until a
    /// refresh succeeds (1s to 365 days).
    #[arg(long, default_value = "24h", value_parser = between(Duration::from_secs(1), 365 * DAY), value_name = "DURATION")]
    pub jwks_max_age: Duration,

    /// A JWKS older than this is fetched again in the background (verification goes
    /// on with the keys in hand meanwhile; 1s to 30 days).
    #[arg(long, default_value = "5m", value_parser = between(Duration::from_secs(1), 30 * DAY), value_name = "DURATION")]
    pub jwks_refresh_interval: Duration,

    /// Check tokens only offline against --jwks, even where the API server is
    /// reachable (no TokenReview, so no `system:auth-delegator` binding needed).
    #[arg(long, requires = "jwks")]
    pub no_token_review: bool,
}

/// Where a JWKS is, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksLocation {
    /// An https URL.
    Url(String),
    /// A file.
    File(PathBuf),
}

/// `--remote-jwks ID=ISSUER,JWKS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteJwks {
    id: String,
    issuer: String,
    jwks: JwksLocation,
}

/// Why a flag's value is not what it takes.
#[derive(Debug, thiserror::Error)]
pub enum AuthnFlagError {
    #[error("must not be empty")]
    Empty,
    #[error("{0:?}: want an https URL or a file path")]
    Jwks(String),
    #[error("{0:?}: want ID=KUBECONFIG")]
    RemoteCluster(String),
    #[error("{0:?}: want ID=ISSUER,JWKS")]
    RemoteJwks(String),
}

fn non_empty(s: &str) -> Result<String, AuthnFlagError> {
    let s = s.trim();
    (!s.is_empty())
        .then(|| s.to_owned())
        .ok_or(AuthnFlagError::Empty)
}

fn jwks_location(s: &str) -> Result<JwksLocation, AuthnFlagError> {
    if s.starts_with("https://") {
        Ok(JwksLocation::Url(s.to_owned()))
    } else if s.contains("://") || s.is_empty() {
        Err(AuthnFlagError::Jwks(s.to_owned()))
    } else {
        Ok(JwksLocation::File(s.into()))
    }
}

fn remote_cluster(s: &str) -> Result<(String, PathBuf), AuthnFlagError> {
    s.split_once('=')
        .filter(|(id, path)| !id.is_empty() && !path.is_empty())
        .map(|(id, path)| (id.to_owned(), path.into()))
        .ok_or_else(|| AuthnFlagError::RemoteCluster(s.to_owned()))
}

fn remote_jwks(s: &str) -> Result<RemoteJwks, AuthnFlagError> {
    let bad = || AuthnFlagError::RemoteJwks(s.to_owned());
    let (id, rest) = s.split_once('=').ok_or_else(bad)?;
    let (issuer, jwks) = rest.split_once(',').ok_or_else(bad)?;
    if id.is_empty() || issuer.is_empty() {
        return Err(bad());
    }
    Ok(RemoteJwks {
        id: id.to_owned(),
        issuer: issuer.to_owned(),
        jwks: jwks_location(jwks).map_err(|_| bad())?,
    })
}

/// How tokens of another cluster are checked.
#[derive(Debug, Clone, Default)]
pub struct RemoteCluster {
    /// TokenReview through this kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    /// Offline verification.
    pub jwt: Option<JwtConfig>,
}

/// Token authentication as configured.
#[derive(Debug, Clone)]
pub struct AuthnConfig {
    /// Audiences a token must carry.
    pub token_audiences: Vec<String>,
    /// The local cluster's id, and its other names.
    pub cluster_id: String,
    pub cluster_aliases: Vec<String>,
    /// TokenReview through the local API server; `None`: none.
    pub reviews: Option<ApiAccess>,
    /// Offline verification of the local cluster's tokens.
    pub jwt: Option<JwtConfig>,
    /// Other clusters by id.
    pub remotes: BTreeMap<String, RemoteCluster>,
    /// TokenReviews in flight per API server.
    pub max_token_reviews: usize,
}

impl AuthnArgs {
    /// Checks what one flag alone cannot say; `api` is the local API server's access.
    pub fn validate(self, api: Option<&ApiAccess>) -> Result<AuthnConfig, ConfigError> {
        let token_audiences: Vec<String> = self
            .token_audiences
            .into_iter()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        if token_audiences.is_empty() {
            return Err(ConfigError::new(
                "--token-audiences",
                "at least one audience is needed",
            ));
        }
        if self.jwks_max_age <= self.jwks_refresh_interval {
            return Err(ConfigError::new(
                "--jwks-max-age",
                format!(
                    "{} must be longer than --jwks-refresh-interval {}",
                    humantime::format_duration(self.jwks_max_age),
                    humantime::format_duration(self.jwks_refresh_interval)
                ),
            ));
        }
        let jwt_config = |issuer: String, jwks: JwksLocation| JwtConfig {
            issuer,
            audiences: token_audiences.clone(),
            source: match jwks {
                JwksLocation::Url(url) => JwksSource::Url {
                    url,
                    ca: self.jwks_ca_cert.clone(),
                },
                JwksLocation::File(path) => JwksSource::File(path),
            },
            refresh_interval: self.jwks_refresh_interval,
            max_age: self.jwks_max_age,
        };
        let mut jwt = match (self.jwt_issuer.clone(), self.jwks.clone()) {
            (Some(issuer), Some(jwks)) => Some(jwt_config(issuer, jwks)),
            _ => None,
        };
        // The API server's own JWKS is fetched with its credentials and CA, not
        // anonymously.
        if let Some(jwt) = &mut jwt
            && let JwksSource::Url { url, .. } = &jwt.source
            && let Some(path) = api_server_path(url)
        {
            let Some(access) = api.cloned() else {
                return Err(ConfigError::new(
                    "--jwks",
                    format!("{url} is the API server's; give --kubeconfig or run in a pod"),
                ));
            };
            jwt.source = JwksSource::ApiServer { path, access };
        }
        let mut remotes: BTreeMap<String, RemoteCluster> = BTreeMap::new();
        for (id, path) in &self.remote_clusters {
            remotes.entry(id.clone()).or_default().kubeconfig = Some(path.clone());
        }
        for remote in self.remote_jwks.iter().cloned() {
            remotes.entry(remote.id).or_default().jwt =
                Some(jwt_config(remote.issuer, remote.jwks));
        }
        let cluster_aliases: Vec<String> = self
            .cluster_aliases
            .into_iter()
            .filter(|a| !a.is_empty())
            .collect();
        for id in remotes.keys() {
            if *id == self.cluster_id || cluster_aliases.contains(id) {
                return Err(ConfigError::new(
                    "--remote-cluster/--remote-jwks",
                    format!("{id:?} is the local cluster"),
                ));
            }
        }
        let reviews = if self.no_token_review {
            None
        } else {
            api.cloned()
        };
        if reviews.is_none() && jwt.is_none() {
            return Err(ConfigError::new(
                "--kubeconfig",
                "no way to check tokens: give --kubeconfig, run in a pod, or give --jwks with --jwt-issuer",
            ));
        }
        Ok(AuthnConfig {
            token_audiences,
            cluster_id: self.cluster_id,
            cluster_aliases,
            reviews,
            jwt,
            remotes,
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
pub(crate) fn api_server_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.strip_suffix(":443").unwrap_or(host);
    API_SERVER_HOSTS
        .contains(&host.to_ascii_lowercase().as_str())
        .then(|| format!("/{path}"))
}
