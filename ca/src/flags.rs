//! What the flags of every subsystem share: the error that names a flag, durations
//! (`24h`, `90m`, `8s`, `1h30m`) within the bounds a flag's help states, and
//! Kubernetes names. A leaf: each subsystem's flag group (`authn::flags`,
//! `writers::flags`, `policy`, `queue`, ...) and `pki` use it.

pub(crate) use signet_flags::{
    ConfigError, DAY, DurationError, between, lifetime_between, parse_duration,
};

/// `value` of `flag` through `parser`; `None` when unset or blank. For flags that
/// also come from environment variables, where empty means unset (clap would hand
/// the parser "").
pub(crate) fn parse_set<T, E: std::fmt::Display>(
    flag: &'static str,
    value: &Option<String>,
    parser: impl FnOnce(&str) -> Result<T, E>,
) -> Result<Option<T>, ConfigError> {
    match value.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => parser(v)
            .map(Some)
            .map_err(|e| ConfigError::new(flag, e.to_string())),
        None => Ok(None),
    }
}

/// Why a flag's value is not a name it takes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NameError {
    #[error("{0:?} is not a Kubernetes object name (lowercase DNS labels, at most 253 characters)")]
    Object(String),
    #[error("{0:?} is not a DNS name")]
    Dns(String),
}

/// Whether `name` is a Kubernetes object name (a DNS-1123 subdomain).
pub(crate) fn is_object_name(name: &str) -> bool {
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

/// A value parser for Kubernetes object names.
pub(crate) fn object_name(s: &str) -> Result<String, NameError> {
    let s = s.trim();
    is_object_name(s)
        .then(|| s.to_owned())
        .ok_or_else(|| NameError::Object(s.to_owned()))
}

/// A value parser for DNS names (as a certificate's SAN holds them).
pub(crate) fn dns_name(s: &str) -> Result<String, NameError> {
    let s = s.trim();
    rustls::pki_types::DnsName::try_from(s)
        .map(|_| s.to_owned())
        .map_err(|_| NameError::Dns(s.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            object_name(" istio-ca-root-cert ").unwrap(),
            "istio-ca-root-cert"
        );
        for bad in ["Bad_Name", "", "-x", "a..b"] {
            assert!(object_name(bad).is_err(), "{bad}");
        }
        assert!(dns_name("istiod.istio-system.svc").is_ok());
        assert!(dns_name("not a name").is_err());
    }
}
