//! What the command-line flags of both programs share: [`ConfigError`], the error
//! that names a flag and its problem (one line, exit code 64), and durations
//! (`24h`, `90m`, `8s`, `1h30m`) within the bounds a flag's help states, as clap value
//! parsers.
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
