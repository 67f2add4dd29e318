//! What the command-line flags of both programs share: [`ConfigError`], the error
//! that names a flag and its problem (one line, exit code 64), durations (`24h`,
//! `90m`, `8s`, `1h30m`) within the bounds a flag's help states, as clap value
//! parsers, and [`bind_listener`] for the `--*-addr` flags.
#![forbid(unsafe_code)]

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
    pub fn new(flag: &'static str, problem: impl Into<String>) -> Self {
        Self {
            flag,
            problem: problem.into(),
        }
    }
}

/// Why a flag's value is not a duration it takes.
#[derive(Debug, thiserror::Error)]
pub enum DurationError {
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

/// Seconds in a day, for bounds.
pub const DAY: StdDuration = StdDuration::from_secs(86_400);

/// Parses `24h`, `90m`, `8s`, `1h30m` into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let d = parse_std(s)?;
    Duration::try_from(d).map_err(|_| DurationError::TooLong(s.to_owned()))
}

fn parse_std(s: &str) -> Result<StdDuration, DurationError> {
    humantime::parse_duration(s.trim()).map_err(|e| DurationError::Syntax(s.to_owned(), e))
}

/// A value parser for run-time intervals from `min` to `max` (both included).
pub fn between(
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
pub fn lifetime_between(
    min: StdDuration,
    max: StdDuration,
) -> impl Fn(&str) -> Result<Duration, DurationError> + Clone + Send + Sync + 'static {
    let parse = between(min, max);
    move |s| {
        let d = parse(s)?;
        Duration::try_from(d).map_err(|_| DurationError::TooLong(s.to_owned()))
    }
}

/// A TCP listener at `addr` (a `--*-addr` flag). `[::]` takes IPv4 and IPv6; where the
/// kernel has no IPv6 at all it cannot be bound, and `0.0.0.0` on the same port is
/// bound instead: the second value then says so, for the caller to log as a warning.
pub async fn bind_listener(
    addr: std::net::SocketAddr,
) -> std::io::Result<(tokio::net::TcpListener, Option<String>)> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => Ok((listener, None)),
        Err(e)
            if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && e.kind() != std::io::ErrorKind::AddrInUse =>
        {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
            let listener = tokio::net::TcpListener::bind(v4).await?;
            Ok((
                listener,
                Some(format!(
                    "cannot listen on {addr} ({e}); listening on {v4}, IPv4 only"
                )),
            ))
        }
        Err(e) => Err(e),
    }
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
        for bad in ["50ms", "25h", "soon", "0s"] {
            assert!(bounded(bad).is_err(), "{bad}");
        }
        let l = lifetime_between(StdDuration::from_secs(1), DAY);
        assert_eq!(l("8s").unwrap(), Duration::seconds(8));
    }
}
