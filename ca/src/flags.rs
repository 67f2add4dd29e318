//! What the flags of every subsystem share: the error that names a flag, durations
//! (`24h`, `90m`, `8s`, `1h30m`) within the bounds a flag's help states, and
//! Kubernetes names. A leaf: each subsystem's flag group (`authn::flags`,
//! `writers::flags`, `policy`, `queue`, ...) and `pki` use it.

use std::time::Duration as StdDuration;

use time::Duration;

/// A flag value that cannot work: the flag and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {problem}")]
pub struct ConfigError {
    flag: &'static str,
    problem: String,
}

impl ConfigError {
    /// `flag` cannot take its value, because of `problem`.
    pub(crate) fn new(flag: &'static str, problem: impl Into<String>) -> Self {
        Self {
            flag,
            problem: problem.into(),
        }
    }
}

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

/// Why a flag's value is not a duration it takes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DurationError {
    #[error("{0:?} is not a duration like 24h, 90m or 8s ({1})")]
    Syntax(String, #[source] humantime::DurationError),
    #[error("{0:?} is too long")]
    TooLong(String),
    #[error("{input:?} is not between {min} and {max}")]
    OutOfRange {
        input: String,
        min: humantime::FormattedDuration,
        max: humantime::FormattedDuration,
    },
}

/// Parses `24h`, `90m`, `8s`, `1h30m` into a duration.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let d = parse_std(s)?;
    Duration::try_from(d).map_err(|_| DurationError::TooLong(s.to_owned()))
}

fn parse_std(s: &str) -> Result<StdDuration, DurationError> {
    humantime::parse_duration(s.trim()).map_err(|e| DurationError::Syntax(s.to_owned(), e))
}

/// A value parser for run-time intervals from `min` to `max` (both included).
pub(crate) fn between(
    min: StdDuration,
    max: StdDuration,
) -> impl Fn(&str) -> Result<StdDuration, DurationError> + Clone + Send + Sync + 'static {
    move |s| {
        let d = parse_std(s)?;
        if d < min || d > max {
            return Err(DurationError::OutOfRange {
                input: s.to_owned(),
                min: humantime::format_duration(min),
                max: humantime::format_duration(max),
            });
        }
        Ok(d)
    }
}

/// A value parser for certificate lifetimes from `min` to `max`.
pub(crate) fn lifetime_between(
    min: StdDuration,
    max: StdDuration,
) -> impl Fn(&str) -> Result<Duration, DurationError> + Clone + Send + Sync + 'static {
    let parse = between(min, max);
    move |s| {
        let d = parse(s)?;
        Duration::try_from(d).map_err(|_| DurationError::TooLong(s.to_owned()))
    }
}

/// Seconds in a day, for bounds.
pub(crate) const DAY: StdDuration = StdDuration::from_secs(86_400);

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
    fn durations() {
        assert_eq!(parse_duration("90m").unwrap(), Duration::minutes(90));
        assert_eq!(parse_duration("8s").unwrap(), Duration::seconds(8));
        assert!(parse_duration("-1s").is_err());
        let bounded = between(StdDuration::from_millis(100), DAY);
        assert_eq!(bounded("2s").unwrap(), StdDuration::from_secs(2));
        for bad in ["50ms", "25h", "soon"] {
            assert!(bounded(bad).is_err(), "{bad}");
        }
    }

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
