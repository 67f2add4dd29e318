//! Durations as flags take them (`24h`, `90m`, `8s`, `1h30m`). A leaf: both the serve
//! flags (`config`) and the `pki` subcommands use it.

use time::Duration;

/// Parses `24h`, `90m`, `8s`, `1h30m` into a duration.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 24h, 90m or 8s ({e})"))?;
    Duration::try_from(d).map_err(|e| format!("{s:?}: {e}"))
}
