//! Logging: what `FERRY_LOG` means, the JSON lines of `--log-format json`, and how fatal
//! errors are written in either format.
//!
//! `FERRY_LOG` takes levels and `target=level` directives (`debug`, `info,ferry_core=debug`).
//! A word that is neither would, read as tracing's filter syntax, name a target and switch
//! off every other line, warnings included; ferry refuses it instead. The clients ferry
//! uses (the AWS SDK, hyper, rustls, ...) stay at `info` unless a directive names them,
//! so `FERRY_LOG=debug` shows ferry's own decisions rather than every HTTP frame.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, WorkerGuard};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The format of log lines (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people: `2026-01-01T00:00:00Z  INFO ferry started routes=["orders"]`.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Targets of libraries whose debug lines describe their own work, not ferry's; capped at
/// `info` unless `FERRY_LOG` names them.
const CLIENTS: [&str; 13] = [
    "aws",
    "hyper",
    "h2",
    "reqwest",
    "rustls",
    "tower",
    "axum",
    "lapin",
    "rdkafka",
    "redis",
    "rumqttc",
    "async_nats",
    "opentelemetry",
];

const LEVELS: &str = "error, warn, info, debug, trace or off";

/// The filter `FERRY_LOG` asks for (`None` or blank: `info`), or a one-line error.
pub fn filter(ferry_log: Option<&str>) -> Result<EnvFilter, String> {
    let raw = ferry_log.map(str::trim).filter(|s| !s.is_empty());
    let mut directives = Vec::new();
    let mut base: Option<Level> = None;
    let mut named: Vec<String> = Vec::new();
    let mut base_off = false;
    for part in raw.unwrap_or("info").split(',').map(str::trim) {
        if part.is_empty() {
            continue;
        }
        match part.split_once('=') {
            None => {
                let level = level(part).ok_or_else(|| {
                    format!(
                        "FERRY_LOG: {part:?} is not a level (use {LEVELS}, optionally followed \
                         by target=level directives, e.g. info,ferry_core=debug)"
                    )
                })?;
                match level {
                    Some(l) => base = Some(l),
                    None => base_off = true,
                }
                directives.push(level_name(level).to_owned());
            }
            Some((target, lvl)) => {
                let level = level(lvl.trim()).ok_or_else(|| {
                    format!("FERRY_LOG: {lvl:?} in {part:?} is not a level (use {LEVELS})")
                })?;
                let target = target.trim();
                if target.is_empty() {
                    return Err(format!("FERRY_LOG: {part:?} names no target before '='"));
                }
                named.push(target.to_owned());
                directives.push(format!("{target}={}", level_name(level)));
            }
        }
    }
    // A client's lines never show more than ferry's own base level, nor more than `info`.
    let cap = match base {
        Some(l) if !base_off => std::cmp::min_by_key(l, Level::INFO, |l| verbosity(*l)),
        _ => Level::ERROR,
    };
    for client in CLIENTS {
        let mentioned = named
            .iter()
            .any(|t| t.starts_with(client) || client.starts_with(t.as_str()));
        if mentioned {
            continue;
        }
        // lapin logs every closed connection or channel at ERROR on its own; ferry reports
        // the same event once, with the route and what to fix.
        if client == "lapin" {
            directives.push("lapin=off".to_owned());
        } else if client == "aws" && base.is_some() && !base_off {
            // Its credentials chain warns of every source it tried, each with a dump of
            // the request; ferry says once that none gave credentials, and where it looked.
            directives.push(format!("aws={cap}"));
            directives.push("aws_config=error".to_owned());
        } else if base.is_some() && !base_off {
            directives.push(format!("{client}={cap}"));
        }
    }
    EnvFilter::builder()
        .parse(directives.join(","))
        .map_err(|e| format!("FERRY_LOG: {e}"))
}

/// A level by name (`Some(None)` is `off`); `warning` is taken for `warn`.
fn level(name: &str) -> Option<Option<Level>> {
    Some(Some(match name.to_ascii_lowercase().as_str() {
        "off" | "none" => return Some(None),
        "error" => Level::ERROR,
        "warn" | "warning" => Level::WARN,
        "info" => Level::INFO,
        "debug" => Level::DEBUG,
        "trace" => Level::TRACE,
        _ => return None,
    }))
}

fn level_name(level: Option<Level>) -> &'static str {
    match level {
        None => "off",
        Some(l) if l == Level::ERROR => "error",
        Some(l) if l == Level::WARN => "warn",
        Some(l) if l == Level::INFO => "info",
        Some(l) if l == Level::DEBUG => "debug",
        Some(_) => "trace",
    }
}

fn verbosity(level: Level) -> u8 {
    match level {
        Level::ERROR => 0,
        Level::WARN => 1,
        Level::INFO => 2,
        Level::DEBUG => 3,
        _ => 4,
    }
}

/// Log lines held for stderr while it does not take them; beyond, lines are dropped (and
/// counted) rather than wait.
const HELD_LINES: usize = 8_192;

/// How many log lines were dropped because stderr did not take them, once logging is up.
static DROPPED: std::sync::OnceLock<ErrorCounter> = std::sync::OnceLock::new();

/// Installs the subscriber: `filter` on stderr, in `format`. Lines are written by a thread
/// of their own: a write to stderr blocks while the pipe behind it is full (a log shipper
/// that stalled, a parent that never reads), and a blocked runtime thread would stop every
/// delivery, ack and lease renewal, and the handling of SIGTERM. Lines that find the queue
/// full are dropped and counted (`ferry_log_lines_dropped_total`). Keep the guard until
/// the end: dropping it writes out what is queued.
pub fn init(format: LogFormat, filter: EnvFilter) -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(HELD_LINES)
        .thread_name("ferry-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.event_format(JsonLine).init(),
    }
    guard
}

/// Log lines dropped so far because stderr did not take them.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// An error that ends ferry.
pub struct Fatal {
    /// The key path or file it is about, when there is one.
    pub at: Option<String>,
    /// What is wrong.
    pub what: String,
    /// The whole error as one line of text (`at: what`, control characters escaped).
    pub line: String,
}

impl Fatal {
    /// An error about no key in particular.
    pub fn new(what: String) -> Self {
        Self {
            at: None,
            line: what.clone(),
            what,
        }
    }
}

/// One line to stderr; a stderr that is gone is no reason to panic on the way out.
fn write_err(text: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Writes the errors that end ferry: `ferry: <error>` lines for people, JSON lines (with
/// the key path as `at` where there is one) for machines.
pub fn fatal(format: LogFormat, errors: &[Fatal]) {
    for e in errors {
        match format {
            LogFormat::Text => write_err(&format!("ferry: {}", e.line)),
            LogFormat::Json => {
                let mut fields = Map::new();
                fields.insert("message".into(), Value::String(e.what.clone()));
                if let Some(at) = &e.at {
                    fields.insert("at".into(), Value::String(at.clone()));
                }
                write_err(&line("ERROR", "ferry", fields).to_string());
            }
        }
    }
}

/// One JSON log line: `{"timestamp", "level", "fields": {...}, "target"}`, the shape of
/// tracing's own JSON format, except that a field recorded as a list (`routes = ?names`)
/// is a JSON array rather than the text of one.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let meta = event.metadata();
        writeln!(
            writer,
            "{}",
            line(meta.level().as_str(), meta.target(), fields.0)
        )
    }
}

fn line(level: &str, target: &str, fields: Map<String, Value>) -> Value {
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    let mut object = Map::new();
    object.insert("timestamp".into(), Value::String(now));
    object.insert("level".into(), Value::String(level.to_owned()));
    object.insert("fields".into(), Value::Object(fields));
    object.insert("target".into(), Value::String(target.to_owned()));
    Value::Object(object)
}

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        // A list of texts or numbers prints as a JSON array would; anything else (a
        // duration, a struct) stays the text it printed.
        let value = match serde_json::from_str::<Value>(&text) {
            Ok(list @ Value::Array(_)) if text.starts_with('[') => list,
            _ => Value::String(text),
        };
        self.0.insert(field.name().to_owned(), value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(ferry_log: Option<&str>) -> String {
        filter(ferry_log).expect("accepted").to_string()
    }

    #[test]
    fn blank_means_info() {
        for blank in [None, Some(""), Some("  ")] {
            let f = rendered(blank);
            assert!(f.starts_with("info") || f.contains(",info"), "{f}");
        }
    }

    #[test]
    fn unknown_words_are_refused_by_name() {
        for bad in ["verbose", "loud", "info,ferry_core=chatty", "=debug"] {
            let e = filter(Some(bad)).expect_err(bad);
            assert!(e.starts_with("FERRY_LOG: "), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(rendered(Some("warning")).contains("warn"));
        assert!(rendered(Some("WARN")).contains("warn"));
    }

    #[test]
    fn clients_stay_at_info_unless_named() {
        let f = rendered(Some("debug"));
        assert!(f.contains("aws=info") && f.contains("hyper=info"), "{f}");
        assert!(f.contains("lapin=off"), "{f}");
        let f = rendered(Some("debug,aws=debug"));
        assert!(f.contains("aws=debug") && !f.contains("aws=info"), "{f}");
        // Never more than the base level either.
        let f = rendered(Some("warn"));
        assert!(f.contains("aws=warn"), "{f}");
    }

    #[test]
    fn lists_are_arrays_in_json_lines() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("buffer").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(JsonLine)
            .finish();
        let names = vec!["orders", "b\"c"];
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(routes = ?names, grace = ?std::time::Duration::from_millis(1500), n = 3, "ferry started");
        });
        let text = String::from_utf8(buffer.0.lock().expect("buffer").clone()).expect("utf-8");
        let line: Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["fields"]["message"], "ferry started");
        assert_eq!(
            line["fields"]["routes"],
            serde_json::json!(["orders", "b\"c"])
        );
        assert_eq!(line["fields"]["grace"], "1.5s");
        assert_eq!(line["fields"]["n"], 3);
    }
}
