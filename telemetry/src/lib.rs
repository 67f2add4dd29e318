//! Signet's logs and metrics, shared by the CA and the agent.
//!
//! Logs go to stderr, as text or as one JSON object per line (`--log-format`). In
//! the text format every field value, the message included, has its control
//! characters escaped: a value an attacker chose (a token header, a CSR field, an SDS
//! resource name) can never start a line of its own and forge an audit record. JSON
//! escapes them by construction.
#![forbid(unsafe_code)]

use std::str::FromStr;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `2026-11-23T05:39:00Z INFO target: message key=value`, control characters escaped.
    #[default]
    Text,
    /// One JSON object per line, as log pipelines expect.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("{other:?} is not a log format (text or json)")),
        }
    }
}

/// Installs the global logger: stderr, filtered by `SIGNET_LOG` (`info` by default;
/// directives like `warn,signet_ca::audit=info`, read by tracing-subscriber's
/// `Targets`, which needs no regex engine).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::{filter::Targets, fmt, prelude::*};
    let default = || Targets::new().with_default(tracing::Level::INFO);
    let filter = match std::env::var("SIGNET_LOG") {
        Ok(spec) => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!(
                "warning: SIGNET_LOG={} is not a log filter ({e}); using info",
                escape_control(&spec)
            );
            default()
        }),
        Err(_) => default(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .fmt_fields(escaping_fields())
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
    }
}

/// The text format's field writer: `message key=value ...`, every value escaped.
pub fn escaping_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let rendered = escape_control(&format!("{value:?}"));
        if field.name() == "message" {
            writer.write_str(&rendered)
        } else {
            write!(writer, "{}={rendered}", field.name())
        }
    })
    .delimited(" ")
}

/// `s` with every control character (newline, carriage return, escape, ...) written
/// as a Rust escape sequence, so it stays on one line and cannot drive a terminal.
pub fn escape_control(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `t` as RFC 3339 in UTC (`2026-12-07T06:13:48Z`), the form of every time in
/// Signet's logs and JSON.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// `error` and its sources as one line, `outer: inner: innermost`, each message
/// once: a source whose text the line already holds (an error that writes its
/// source into its own message) is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = e.source();
    }
    line
}

/// The source revision the binary was built from: `SIGNET_REVISION` at build time
/// (`scripts/build-release.sh` sets it from git), else `unknown`.
pub const REVISION: &str = match option_env!("SIGNET_REVISION") {
    Some(r) => r,
    None => "unknown",
};

/// A registry holding what every Prometheus exporter serves: the `process_*` metrics
/// (CPU seconds, resident and virtual memory, open and maximum file descriptors,
/// threads, start time; Linux only) and `<prefix>_build_info{version,revision}`,
/// always 1.
pub fn registry(prefix: &str, version: &str) -> Result<prometheus::Registry, prometheus::Error> {
    let registry = prometheus::Registry::new();
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let build = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            format!("{prefix}_build_info"),
            "Always 1; the labels say which build this is.",
        ),
        &["version", "revision"],
    )?;
    build.with_label_values(&[version, REVISION]).set(1);
    registry.register(Box::new(build))?;
    Ok(registry)
}

/// The Prometheus text exposition of `registry`.
pub fn render_metrics(registry: &prometheus::Registry) -> String {
    let mut out = Vec::new();
    if let Err(e) = prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &registry.gather(),
        &mut out,
    ) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const FORGED: &str = "RS256\u{1b}[2K\r\n2026-11-23T00:00:00Z  INFO signet_ca::audit: certificate issued spiffe_id=spiffe://cluster.local/ns/kube-system/sa/admin";

    fn lines(format: LogFormat) -> Vec<String> {
        use tracing_subscriber::{fmt, prelude::*};
        let buf = Buf::default();
        let writer = buf.clone();
        let make = move || writer.clone();
        let dispatch: tracing::Dispatch = match format {
            LogFormat::Text => tracing_subscriber::registry()
                .with(
                    fmt::layer()
                        .fmt_fields(escaping_fields())
                        .with_ansi(false)
                        .with_writer(make),
                )
                .into(),
            LogFormat::Json => tracing_subscriber::registry()
                .with(
                    fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_ansi(false)
                        .with_writer(make),
                )
                .into(),
        };
        tracing::dispatcher::with_default(&dispatch, || {
            let error = format!("unknown variant `{FORGED}`");
            tracing::warn!(peer = "127.0.0.1:1", error = %error, "certificate request refused");
            tracing::warn!("message itself: {FORGED}");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        out.lines().map(str::to_owned).collect()
    }

    #[test]
    fn attacker_newlines_cannot_forge_a_log_line() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let lines = lines(format);
            assert_eq!(lines.len(), 2, "{format:?}: {lines:#?}");
            for line in &lines {
                assert!(line.contains("WARN"), "{format:?}: {line}");
                assert!(!line.contains("\u{1b}"));
            }
            assert!(
                !lines
                    .iter()
                    .any(|l| l.contains(" INFO ") && !l.contains("WARN")),
                "{format:?}: {lines:#?}"
            );
        }
        assert!(lines(LogFormat::Text)[0].contains(r"RS256\u{1b}[2K\r\n2026"));
    }

    #[test]
    fn error_chains_say_each_message_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("JWKS file /x: {0}")]
        struct Outer(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("cluster c")]
        struct Top(#[source] Outer);
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(error_chain(&Outer(io())), "JWKS file /x: no such file");
        assert_eq!(
            error_chain(&Top(Outer(io()))),
            "cluster c: JWKS file /x: no such file"
        );
    }

    #[test]
    fn times_are_rfc3339_in_utc() {
        let t = time::OffsetDateTime::from_unix_timestamp(2_111_111_111)
            .unwrap()
            .to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        assert_eq!(rfc3339(t), "2036-11-24T03:45:11Z");
    }

    #[test]
    fn formats_parse() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!("text".parse::<LogFormat>().unwrap(), LogFormat::Text);
        assert!("xml".parse::<LogFormat>().is_err());
        assert_eq!(escape_control("a\r\nb\u{1b}[31m"), "a\\r\\nb\\u{1b}[31m");
    }
}
