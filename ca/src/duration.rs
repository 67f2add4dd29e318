//! Durations as flags take them (`24h`, `90m`, `8s`, `1h30m`), optionally within
//! bounds the flag's help states. A leaf: the serve flags of every subsystem and the
//! `pki` subcommands use it.

use std::time::Duration as StdDuration;

use time::Duration;

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

/// A value parser for durations from `min` to `max` (both included).
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
