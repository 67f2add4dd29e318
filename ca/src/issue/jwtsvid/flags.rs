//! Flags of JWT-SVIDs and OIDC discovery (part of `signet-ca serve`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    flags::{ConfigError, DAY, between},
    keys::jwt::{JwtAlg, Schedule},
};

/// Flags of JWT-SVIDs and OIDC discovery.
#[derive(Debug, Clone, clap::Args)]
pub struct JwtArgs {
    /// Mint JWT-SVIDs (signet.v1.JwtSvidService on the gRPC listener) for callers
    /// that authenticate as for CreateCertificate, signed by keys the CA keeps in
    /// --state-dir or --jwt-keys-secret.
    #[arg(long, env = "SIGNET_JWT_SVIDS")]
    pub jwt_svids: bool,

    /// Lifetime of a JWT-SVID when the request asks for none (10s to 24h).
    #[arg(long, env = "SIGNET_JWT_SVID_TTL", default_value = "5m", value_parser = between(Duration::from_secs(10), DAY), value_name = "DURATION")]
    pub jwt_svid_ttl: Duration,

    /// Longest JWT-SVID lifetime; longer requests are refused (10s to 24h, at least
    /// --jwt-svid-ttl). Keys stay published this long after they stop signing.
    #[arg(long, env = "SIGNET_JWT_SVID_MAX_TTL", default_value = "1h", value_parser = between(Duration::from_secs(10), DAY), value_name = "DURATION")]
    pub jwt_svid_max_ttl: Duration,

    /// Algorithm of new JWT signing keys. A change takes effect through a normal
    /// rotation step: the new key is published half a rotation period before it signs.
    #[arg(
        long,
        env = "SIGNET_JWT_KEY_ALGORITHM",
        value_enum,
        default_value = "es256"
    )]
    pub jwt_key_algorithm: JwtAlg,

    /// How long a JWT signing key signs; its successor is published half of this
    /// before (1m to 365d).
    #[arg(long, env = "SIGNET_JWT_KEY_ROTATION", default_value = "24h", value_parser = between(Duration::from_secs(60), 365 * DAY), value_name = "DURATION")]
    pub jwt_key_rotation: Duration,

    /// Keep the JWT key set in this Secret (`<namespace>/<name>`, key
    /// `jwt-keys.json`), read and written by every replica, rather than in
    /// --state-dir. Needs API access.
    #[arg(long, env = "SIGNET_JWT_KEYS_SECRET", value_name = "NS/NAME")]
    pub jwt_keys_secret: Option<String>,

    /// The `iss` of JWT-SVIDs and of the OIDC discovery document: an https URL
    /// without query or fragment, under which /.well-known/openid-configuration is
    /// reached.
    #[arg(long, env = "SIGNET_OIDC_ISSUER", value_name = "URL")]
    pub oidc_issuer: Option<String>,

    /// Serve OIDC discovery (/.well-known/openid-configuration and its JWKS, /keys)
    /// over HTTPS on this address. Needs --jwt-svids and --oidc-issuer.
    #[arg(long, env = "SIGNET_OIDC_ADDR", value_name = "ADDR")]
    pub oidc_addr: Option<SocketAddr>,

    /// Serving certificate chain (PEM) of the OIDC listener, read again when it
    /// changes; unset: the CA's own serving certificate, which relying parties then
    /// verify with the mesh root.
    #[arg(
        long,
        env = "SIGNET_OIDC_TLS_CERT",
        value_name = "FILE",
        requires = "oidc_tls_key"
    )]
    pub oidc_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --oidc-tls-cert.
    #[arg(
        long,
        env = "SIGNET_OIDC_TLS_KEY",
        value_name = "FILE",
        requires = "oidc_tls_cert"
    )]
    pub oidc_tls_key: Option<PathBuf>,
}

/// Where the key set is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPlace {
    /// `--state-dir`.
    StateDir,
    /// A Secret.
    Secret { namespace: String, name: String },
}

/// The OIDC listener's settings.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub addr: SocketAddr,
    /// Its certificate and key files; `None`: the CA's serving certificate.
    pub tls_files: Option<(PathBuf, PathBuf)>,
}

/// JWT-SVID settings, checked.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub schedule: Schedule,
    pub keys: KeyPlace,
    /// `iss`, when set.
    pub issuer: Option<String>,
    pub oidc: Option<OidcConfig>,
}

impl JwtArgs {
    /// `None` without --jwt-svids; `has_api` says whether there is API access.
    pub fn validate(&self, has_api: bool) -> Result<Option<JwtConfig>, ConfigError> {
        if !self.jwt_svids {
            for (set, flag) in [
                (self.jwt_keys_secret.is_some(), "--jwt-keys-secret"),
                (self.oidc_addr.is_some(), "--oidc-addr"),
                (self.oidc_issuer.is_some(), "--oidc-issuer"),
            ] {
                if set {
                    return Err(ConfigError::new(flag, "needs --jwt-svids"));
                }
            }
            return Ok(None);
        }
        if self.jwt_svid_max_ttl < self.jwt_svid_ttl {
            return Err(ConfigError::new(
                "--jwt-svid-max-ttl",
                format!(
                    "{} is shorter than --jwt-svid-ttl {}",
                    humantime::format_duration(self.jwt_svid_max_ttl),
                    humantime::format_duration(self.jwt_svid_ttl)
                ),
            ));
        }
        let schedule = Schedule {
            alg: self.jwt_key_algorithm,
            rotate_every: self.jwt_key_rotation,
            max_token_ttl: self.jwt_svid_max_ttl,
        };
        let needed = schedule.keys_needed();
        if needed > crate::keys::jwt::MAX_KEYS as u64 {
            return Err(ConfigError::new(
                "--jwt-key-rotation",
                format!(
                    "{} with --jwt-svid-max-ttl {} keeps up to {needed} keys published (a key stays until its last token expires); at most {}: rotate less often or shorten --jwt-svid-max-ttl",
                    humantime::format_duration(self.jwt_key_rotation),
                    humantime::format_duration(self.jwt_svid_max_ttl),
                    crate::keys::jwt::MAX_KEYS
                ),
            ));
        }
        let keys = match self.jwt_keys_secret.as_deref().map(str::trim) {
            None | Some("") => KeyPlace::StateDir,
            Some(value) => {
                let (namespace, name) = value
                    .split_once('/')
                    .filter(|(ns, n)| {
                        crate::flags::is_object_name(ns) && crate::flags::is_object_name(n)
                    })
                    .ok_or_else(|| {
                        ConfigError::new(
                            "--jwt-keys-secret",
                            format!("{value:?} is not <namespace>/<name>"),
                        )
                    })?;
                if !has_api {
                    return Err(ConfigError::new(
                        "--jwt-keys-secret",
                        "needs API access (--kubeconfig, or running in a pod)",
                    ));
                }
                KeyPlace::Secret {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                }
            }
        };
        let issuer = match self.oidc_issuer.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => Some(issuer_url(url).map_err(|e| ConfigError::new("--oidc-issuer", e))?),
        };
        let oidc = match self.oidc_addr {
            None => None,
            Some(_) if issuer.is_none() => {
                return Err(ConfigError::new(
                    "--oidc-addr",
                    "needs --oidc-issuer (the URL relying parties are given)",
                ));
            }
            Some(addr) => Some(OidcConfig {
                addr,
                tls_files: self.oidc_tls_cert.clone().zip(self.oidc_tls_key.clone()),
            }),
        };
        Ok(Some(JwtConfig {
            default_ttl: self.jwt_svid_ttl,
            max_ttl: self.jwt_svid_max_ttl,
            schedule,
            keys,
            issuer,
            oidc,
        }))
    }
}

/// An OIDC issuer: `https://host[:port][/path]`, no query, fragment or trailing
/// slash (relying parties compare `iss` with it byte for byte).
fn issuer_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?} is not an https URL (OIDC requires https)"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{url:?} has no host"));
    }
    if url.contains(['?', '#']) || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{url:?} must not hold a query, a fragment or spaces"
        ));
    }
    if url.ends_with('/') {
        return Err(format!("{url:?}: leave out the trailing slash"));
    }
    Ok(url.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_are_https_urls_relying_parties_can_compare() {
        assert_eq!(
            issuer_url("https://oidc.example.com").unwrap(),
            "https://oidc.example.com"
        );
        assert!(issuer_url("https://h:8443/mesh").is_ok());
        for bad in [
            "http://h",
            "https://",
            "https:///x",
            "https://h/",
            "https://h?x",
            "https://h x",
        ] {
            assert!(issuer_url(bad).is_err(), "{bad}");
        }
    }
}
