//! Caller authentication (contract §2): a TLS client certificate under our trust
//! bundle, a Kubernetes TokenReview, or an offline JWT check against the cluster's
//! JWKS. The first that succeeds wins; the `clusterid` header picks the cluster.

pub mod flags;
mod jwks;
mod jwt;
mod token;
mod tokenreview;

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use rustls_pki_types::CertificateDer;
use spiffe::SpiffeId;
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use signet_spiffe::{ServiceAccount, TrustDomains};

pub use crate::kubernetes::client::KubeClientError;
pub use jwks::{Jwks, JwksError, JwksSource};

/// `serve --check-config`'s look at a JWKS source: a file read and parsed, the
/// client of a URL or of the API server made, nothing fetched.
pub(crate) async fn check_jwks(source: JwksSource) -> Result<String, JwksError> {
    jwks::KeySource::check(source).await
}
pub use jwt::{JwtAuthenticator, JwtConfig};
pub use token::Token;
pub use tokenreview::{
    CachedReviewer, KubeTokenReviewer, Precheck, ReviewError, ReviewFuture, Reviewed, TokenReviewer,
};

/// How a caller proved who it is (for the audit log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// A TLS client certificate issued under our trust bundle.
    ClientCert,
    /// Kubernetes TokenReview.
    TokenReview,
    /// Offline JWT verification against a JWKS.
    Jwt,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClientCert => "client-certificate",
            Self::TokenReview => "tokenreview",
            Self::Jwt => "jwt",
        })
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The service account the certificate will name.
    pub account: ServiceAccount,
    /// How it was proven.
    pub method: Method,
    /// The cluster whose authenticator accepted it.
    pub cluster: String,
    /// The pod the credential is bound to, when it says.
    pub pod: Option<PodRef>,
}

/// A pod a token is bound to (projected service-account tokens name it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    /// The pod's name (in the caller's namespace).
    pub name: String,
    /// Its UID, when the credential carries it.
    pub uid: Option<String>,
}

/// Why authentication did not produce a caller.
#[derive(Debug, thiserror::Error)]
pub enum AuthnError {
    /// The credentials were missing or wrong: `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(String),
    /// The authority that could have decided was unreachable: `UNAVAILABLE`.
    #[error("{0}")]
    Unavailable(String),
    /// Too many token reviews in flight: `UNAVAILABLE`, counted as a limit.
    #[error("{0}")]
    Throttled(String),
}

/// Turns a bearer token into the service account it proves (TokenReview, offline
/// JWT, or a fake in tests). The one seam every token check goes through.
pub trait TokenAuthenticator: Send + Sync + fmt::Debug {
    /// How it proves the caller (for the audit line and error messages).
    fn method(&self) -> Method;
    /// Checks `token` at `now` for a caller at `peer`.
    fn authenticate<'a>(
        &'a self,
        token: &'a Token,
        now: OffsetDateTime,
        peer: Option<IpAddr>,
    ) -> ReviewFuture<'a>;
}

impl TokenAuthenticator for CachedReviewer {
    fn method(&self) -> Method {
        Method::TokenReview
    }
    fn authenticate<'a>(
        &'a self,
        token: &'a Token,
        _now: OffsetDateTime,
        peer: Option<IpAddr>,
    ) -> ReviewFuture<'a> {
        Box::pin(self.review(token, peer))
    }
}

impl TokenAuthenticator for JwtAuthenticator {
    fn method(&self) -> Method {
        Method::Jwt
    }
    fn authenticate<'a>(
        &'a self,
        token: &'a Token,
        now: OffsetDateTime,
        _peer: Option<IpAddr>,
    ) -> ReviewFuture<'a> {
        Box::pin(self.verify(token, now))
    }
}

/// The token authenticators of one cluster, tried in order.
#[derive(Debug, Default)]
pub struct ClusterAuth {
    authenticators: Vec<Box<dyn TokenAuthenticator>>,
}

impl ClusterAuth {
    /// Adds an authenticator, tried after those already there.
    pub fn with(mut self, authenticator: impl TokenAuthenticator + 'static) -> Self {
        self.authenticators.push(Box::new(authenticator));
        self
    }

    /// The authenticators of a cluster as configured: TokenReview through
    /// `access` (`None`: no TokenReview) with at most
    /// `max_token_reviews` in flight (a quarter of them for one peer address, except
    /// the addresses in `crowds`), then offline JWT.
    pub async fn build(
        access: Option<&crate::kubernetes::client::ApiAccess>,
        jwt: Option<&JwtConfig>,
        audiences: &[String],
        max_token_reviews: usize,
        crowds: &[ipnet::IpNet],
    ) -> Result<Self, BuildError> {
        let mut auth = Self::default();
        if let Some(access) = access {
            let reviewer = KubeTokenReviewer::connect(access, audiences.to_vec()).await?;
            let reviewer = CachedReviewer::new(Arc::new(reviewer), max_token_reviews)
                .with_precheck(Precheck {
                    audiences: audiences.to_vec(),
                    issuer: jwt.map(|j| j.issuer.clone()),
                })
                .with_peer_share((max_token_reviews / 4).max(1), crowds.to_vec());
            auth = auth.with(reviewer);
        }
        if let Some(jwt) = jwt {
            auth = auth.with(JwtAuthenticator::new(jwt.clone()).await?);
        }
        Ok(auth)
    }
}

/// Why a cluster's authenticators could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// TokenReview: no client for the API server.
    #[error("TokenReview: {0}")]
    TokenReview(#[from] KubeClientError),
    /// Offline JWT: no JWKS.
    #[error(transparent)]
    Jwks(#[from] JwksError),
}

/// What the TLS layer holds of a request's client certificate, judged at the time of
/// the request (not of the handshake).
#[derive(Debug, Clone, Copy)]
pub enum ClientCert<'a> {
    /// None was presented.
    Absent,
    /// The chain verifies now against the trust bundle loaded now.
    Verified(&'a [CertificateDer<'a>]),
    /// A chain was presented but no longer verifies (expired, revoked, or under a
    /// root that is no longer trusted); the reason is for the caller.
    Refused(&'a str),
}

/// Everything needed to authenticate a request.
#[derive(Debug)]
pub struct Authenticator {
    local_cluster: String,
    aliases: Vec<String>,
    clusters: BTreeMap<String, Arc<ClusterAuth>>,
    trust_domains: TrustDomains,
}

impl Authenticator {
    /// Client certificates are accepted in any of `trust_domains`.
    pub fn new(local_cluster: String, local: ClusterAuth, trust_domains: TrustDomains) -> Self {
        let mut clusters = BTreeMap::new();
        clusters.insert(local_cluster.clone(), Arc::new(local));
        Self {
            local_cluster,
            aliases: Vec::new(),
            clusters,
            trust_domains,
        }
    }

    /// Adds another cluster, chosen when a request's `clusterid` names it.
    pub fn with_cluster(mut self, id: String, auth: ClusterAuth) -> Self {
        self.clusters.insert(id, Arc::new(auth));
        self
    }

    /// Other names the local cluster answers to in the `clusterid` header.
    pub fn with_aliases(mut self, aliases: Vec<String>) -> Self {
        self.aliases = aliases;
        self
    }

    /// Authenticates a request: its client certificate chain (verified again at
    /// request time, see [`ClientCert`]), its bearer token and `clusterid`; `peer` is
    /// the caller's address, for shares of limited resources.
    pub async fn authenticate(
        &self,
        client_cert: ClientCert<'_>,
        token: Option<&Token>,
        cluster_id: &str,
        peer: Option<IpAddr>,
    ) -> Result<Caller, AuthnError> {
        match client_cert {
            ClientCert::Verified(chain) => {
                if let Some(caller) = self.client_cert_caller(chain) {
                    return Ok(caller);
                }
            }
            ClientCert::Refused(why) if token.is_none() => {
                return Err(AuthnError::Unauthenticated(format!(
                    "the client certificate can no longer authenticate: {why}; send a service account token instead"
                )));
            }
            ClientCert::Refused(_) | ClientCert::Absent => {}
        }
        let cluster = self.cluster(cluster_id)?;
        let Some(token) = token else {
            return Err(AuthnError::Unauthenticated(
                "no credentials: send 'authorization: Bearer <service account token>' or a client certificate issued by this CA".into(),
            ));
        };
        let Some(auth) = self.clusters.get(&cluster) else {
            return Err(AuthnError::Unauthenticated(format!(
                "cluster {cluster:?} is not configured"
            )));
        };
        let mut failures = Vec::new();
        let mut unavailable = false;
        let mut throttled = false;
        let now = OffsetDateTime::now_utc();
        for authenticator in &auth.authenticators {
            let method = authenticator.method();
            match authenticator.authenticate(token, now, peer).await {
                Ok(r) => {
                    return Ok(Caller {
                        account: r.account,
                        method,
                        cluster,
                        pod: r.pod,
                    });
                }
                Err(ReviewError::Rejected(why)) => failures.push(format!("{method}: {why}")),
                Err(ReviewError::Unavailable(why)) => {
                    unavailable = true;
                    failures.push(format!("{method}: {why}"));
                }
                Err(ReviewError::Throttled(why)) => {
                    throttled = true;
                    failures.push(format!("{method}: {why}"));
                }
            }
        }
        if failures.is_empty() {
            failures.push(format!("cluster {cluster:?} has no token authenticator"));
        }
        let why = format!("authentication failed: {}", failures.join("; "));
        // An authority we could not reach might have said yes: never turn that into
        // a definite "no" the client would not retry.
        Err(if unavailable {
            AuthnError::Unavailable(why)
        } else if throttled {
            AuthnError::Throttled(why)
        } else {
            AuthnError::Unauthenticated(why)
        })
    }

    /// Resolves the `clusterid` header to a configured cluster.
    fn cluster(&self, id: &str) -> Result<String, AuthnError> {
        if id.is_empty() || id == self.local_cluster || self.aliases.iter().any(|a| a == id) {
            return Ok(self.local_cluster.clone());
        }
        if self.clusters.contains_key(id) {
            return Ok(id.to_owned());
        }
        let known: Vec<&str> = self
            .clusters
            .keys()
            .map(String::as_str)
            .chain(self.aliases.iter().map(String::as_str))
            .collect();
        // The list of clusters is for the operator, not for an anonymous caller.
        tracing::warn!(
            cluster_id = id,
            known = %known.join(","),
            "request names an unknown cluster id"
        );
        Err(AuthnError::Unauthenticated(format!(
            "unknown cluster id {id:?} in the clusterid header"
        )))
    }

    /// The SPIFFE ID of a verified client certificate, when it names a service
    /// account in one of our trust domains.
    fn client_cert_caller(&self, chain: &[CertificateDer<'_>]) -> Option<Caller> {
        let (_, leaf) = X509Certificate::from_der(chain.first()?).ok()?;
        let san = leaf.subject_alternative_name().ok()??;
        let mut uris = san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
        let uri = uris.next()?;
        if uris.next().is_some() {
            return None;
        }
        let id = SpiffeId::new(uri).ok()?;
        if !self.trust_domains.iter().any(|td| id.is_member_of(td)) {
            return None;
        }
        Some(Caller {
            account: ServiceAccount::from_spiffe_id(&id)?,
            method: Method::ClientCert,
            cluster: self.local_cluster.clone(),
            pod: None,
        })
    }
}
