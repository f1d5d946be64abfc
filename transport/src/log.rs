//! How every blockferry service logs: to stderr, filtered by `RUST_LOG`, as
//! plain text (colour only on a terminal, so a pipe or journald gets no escape
//! codes) or as JSON, one object per line (`--log-format json`).
//!
//! Warnings and errors are throttled: the same message from the same place
//! (callsite, `message` and `error` fields) is written at most once per
//! [`REPEAT_INTERVAL`]; the repeats in between are counted and reported by one
//! summary event (`suppressed` = the count, `origin` = the repeated event's
//! target) with the first warning or error after the interval has passed
//! (there is no timer: a storm that ends in silence leaves its last count
//! unreported until something else warns). A reconnect loop during a long
//! outage, a forwarder retrying, or a target refusing a sender over and over
//! then logs a line per interval instead of a storm, and nothing is hidden:
//! the count says how often it happened. The first occurrence of each message
//! is always written at once.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::callsite::{Callsite, Identifier};
use tracing::field::{Field, FieldSet, Value, Visit};
use tracing::metadata::Kind;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber, span};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colour only when stderr is a terminal and
    /// `NO_COLOR` is unset.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`
    /// (`message` and the event's fields), and `span`/`spans` inside a span.
    Json,
}

/// A `--log-format` value that is neither `text` nor `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log format `{0}`: use `text` or `json`")]
pub struct UnknownLogFormat(String);

impl std::str::FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(UnknownLogFormat(other.to_owned())),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// How long a repeated warning or error stays quiet after it was written.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Distinct messages tracked at once; past this, new messages are written
/// untracked (never dropped) until old windows expire.
const TRACKED_MESSAGES: usize = 256;

/// Installs the global subscriber; `default_level` applies when `RUST_LOG`
/// is unset or invalid (e.g. `"info"`).
pub fn init(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            let fmt = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour);
            registry.with(Throttled::new(fmt, REPEAT_INTERVAL)).init();
        }
        LogFormat::Json => {
            // Not flattened: an event field named like a top-level key
            // (`target`, `level`) would give an object with duplicate keys.
            let fmt = tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr);
            registry.with(Throttled::new(fmt, REPEAT_INTERVAL)).init();
        }
    }
}

/// What [`Throttle::admit`] decides about one occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it.
    Log,
    /// A repeat within the interval: counted, not written.
    Suppress,
}

/// The rate limiter's logic, without clocks or output: per key, the first
/// occurrence passes, repeats within `interval` are counted, and
/// [`Throttle::expire`] hands back the counts of windows that have ended.
#[derive(Debug)]
pub struct Throttle<K> {
    interval: Duration,
    capacity: usize,
    windows: HashMap<K, Window>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    suppressed: u64,
}

impl<K: Hash + Eq + Clone> Throttle<K> {
    /// At most one occurrence of a key per `interval`; at most `capacity`
    /// keys tracked (others always pass).
    pub fn new(interval: Duration, capacity: usize) -> Self {
        Throttle {
            interval,
            capacity,
            windows: HashMap::new(),
        }
    }

    /// Decides about one occurrence of `key` at `now`.
    pub fn admit(&mut self, key: &K, now: Instant) -> Verdict {
        match self.windows.get_mut(key) {
            Some(w) if now.saturating_duration_since(w.start) < self.interval => {
                w.suppressed += 1;
                Verdict::Suppress
            }
            Some(w) => {
                // An ended window not yet expired: its count is still owed,
                // so leave it for `expire` and only restart the clock here.
                w.start = now;
                Verdict::Log
            }
            None => {
                if self.windows.len() < self.capacity {
                    self.windows.insert(
                        key.clone(),
                        Window {
                            start: now,
                            suppressed: 0,
                        },
                    );
                }
                Verdict::Log
            }
        }
    }

    /// Removes the windows that ended by `now` and returns those that
    /// suppressed anything, with their counts.
    pub fn expire(&mut self, now: Instant) -> Vec<(K, u64)> {
        let mut ended = Vec::new();
        self.windows.retain(|k, w| {
            if now.saturating_duration_since(w.start) < self.interval {
                return true;
            }
            if w.suppressed > 0 {
                ended.push((k.clone(), w.suppressed));
            }
            false
        });
        ended
    }
}

/// Identifies "the same message from the same place".
#[derive(Clone)]
struct Key {
    meta: &'static Metadata<'static>,
    text: String,
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.meta.callsite() == other.meta.callsite() && self.text == other.text
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.meta.callsite().hash(state);
        self.text.hash(state);
    }
}

/// Collects the `message` and `error` fields of an event.
#[derive(Default)]
struct MessageText {
    message: String,
    error: String,
}

impl Visit for MessageText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "error" => {
                let _ = write!(self.error, "{value:?}");
            }
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "error" => self.error.push_str(value),
            _ => {}
        }
    }
}

/// Wraps the layer that writes (text or JSON) and keeps repeated warnings
/// and errors from reaching it; see the module doc.
pub struct Throttled<L> {
    inner: L,
    throttle: Mutex<Throttle<Key>>,
    clock: Arc<dyn Fn() -> Instant + Send + Sync>,
}

impl<L> std::fmt::Debug for Throttled<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttled").finish_non_exhaustive()
    }
}

impl<L> Throttled<L> {
    pub fn new(inner: L, interval: Duration) -> Self {
        Self::with_clock(inner, interval, Arc::new(Instant::now))
    }

    /// With a clock of the caller's (tests advance it by hand).
    pub fn with_clock(
        inner: L,
        interval: Duration,
        clock: Arc<dyn Fn() -> Instant + Send + Sync>,
    ) -> Self {
        Throttled {
            inner,
            throttle: Mutex::new(Throttle::new(interval, TRACKED_MESSAGES)),
            clock,
        }
    }
}

impl<S: Subscriber, L: Layer<S>> Layer<S> for Throttled<L> {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.inner.on_register_dispatch(subscriber);
    }

    fn on_layer(&mut self, subscriber: &mut S) {
        self.inner.on_layer(subscriber);
    }

    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.inner.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &Metadata<'_>, ctx: Context<'_, S>) -> bool {
        self.inner.enabled(metadata, ctx)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.inner.max_level_hint()
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_new_span(attrs, id, ctx);
    }

    fn on_record(&self, span: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        self.inner.on_record(span, values, ctx);
    }

    fn on_follows_from(&self, span: &span::Id, follows: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_follows_from(span, follows, ctx);
    }

    fn on_enter(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_enter(id, ctx);
    }

    fn on_exit(&self, id: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_exit(id, ctx);
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        self.inner.on_close(id, ctx);
    }

    fn on_id_change(&self, old: &span::Id, new: &span::Id, ctx: Context<'_, S>) {
        self.inner.on_id_change(old, new, ctx);
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        // Only warnings and errors can storm; progress and debug output is
        // rate-limited where it is produced.
        if *meta.level() > Level::WARN {
            self.inner.on_event(event, ctx);
            return;
        }
        let mut text = MessageText::default();
        event.record(&mut text);
        let key = Key {
            meta,
            text: if text.error.is_empty() {
                text.message
            } else {
                format!("{} error={}", text.message, text.error)
            },
        };
        let now = (self.clock)();
        let (ended, verdict) = {
            // A poisoned lock only means another thread panicked while
            // logging; the counts it holds are still usable.
            let mut t = self.throttle.lock().unwrap_or_else(|p| p.into_inner());
            let ended = t.expire(now);
            (ended, t.admit(&key, now))
        };
        for (k, suppressed) in ended {
            self.summary(&k, suppressed, ctx.clone());
        }
        if verdict == Verdict::Log {
            self.inner.on_event(event, ctx);
        }
    }
}

impl<L> Throttled<L> {
    /// Hands the writing layer one event saying how many repeats of `key`
    /// were not written.
    fn summary<S: Subscriber>(&self, key: &Key, suppressed: u64, ctx: Context<'_, S>)
    where
        L: Layer<S>,
    {
        let meta: &'static Metadata<'static> = if *key.meta.level() == Level::ERROR {
            &SUMMARY_ERROR
        } else {
            &SUMMARY_WARN
        };
        let fields = meta.fields();
        let (Some(message), Some(count), Some(origin)) = (
            fields.field("message"),
            fields.field("suppressed"),
            fields.field("origin"),
        ) else {
            return;
        };
        let secs = self
            .throttle
            .lock()
            .map(|t| t.interval.as_secs())
            .unwrap_or_else(|p| p.into_inner().interval.as_secs());
        let text = format_args!(
            "{suppressed} repeats not logged in the last {secs}s: {}",
            key.text
        );
        let target = key.meta.target();
        let values: [(&Field, Option<&dyn Value>); 3] = [
            (&message, Some(&text as &dyn Value)),
            (&count, Some(&suppressed as &dyn Value)),
            (&origin, Some(&target as &dyn Value)),
        ];
        let values = fields.value_set(&values);
        self.inner.on_event(&Event::new(meta, &values), ctx);
    }
}

/// The callsite of the summary events (never registered: they go straight
/// to the writing layer, past any filter).
struct SummaryCallsite(&'static Metadata<'static>);

impl Callsite for SummaryCallsite {
    fn set_interest(&self, _: Interest) {}

    fn metadata(&self) -> &Metadata<'_> {
        self.0
    }
}

const SUMMARY_FIELDS: &[&str] = &["message", "suppressed", "origin"];
const SUMMARY_TARGET: &str = "blockferry::log";

static SUMMARY_WARN_CALLSITE: SummaryCallsite = SummaryCallsite(&SUMMARY_WARN);
static SUMMARY_WARN: Metadata<'static> = Metadata::new(
    "repeats not logged",
    SUMMARY_TARGET,
    Level::WARN,
    Some(file!()),
    Some(line!()),
    Some(module_path!()),
    FieldSet::new(SUMMARY_FIELDS, Identifier(&SUMMARY_WARN_CALLSITE)),
    Kind::EVENT,
);
static SUMMARY_ERROR_CALLSITE: SummaryCallsite = SummaryCallsite(&SUMMARY_ERROR);
static SUMMARY_ERROR: Metadata<'static> = Metadata::new(
    "repeats not logged",
    SUMMARY_TARGET,
    Level::ERROR,
    Some(file!()),
    Some(line!()),
    Some(module_path!()),
    FieldSet::new(SUMMARY_FIELDS, Identifier(&SUMMARY_ERROR_CALLSITE)),
    Kind::EVENT,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_text_and_json_and_names_the_choices_otherwise() {
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        let e = "yaml".parse::<LogFormat>().unwrap_err().to_string();
        assert!(e.contains("`text` or `json`"), "{e}");
    }

    #[test]
    fn throttle_passes_the_first_occurrence_and_counts_the_repeats_of_its_window() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(30), 16);
        assert_eq!(t.admit(&"a", t0), Verdict::Log);
        for i in 1..=41 {
            assert_eq!(
                t.admit(&"a", t0 + Duration::from_millis(i)),
                Verdict::Suppress
            );
        }
        // Another message is not held back by the first one's window.
        assert_eq!(t.admit(&"b", t0 + Duration::from_secs(1)), Verdict::Log);
        assert!(t.expire(t0 + Duration::from_secs(29)).is_empty());
        let ended = t.expire(t0 + Duration::from_secs(30));
        assert_eq!(
            ended,
            vec![("a", 41)],
            "b's window ended with nothing suppressed"
        );
        // After its window, the message is written again at once.
        assert_eq!(t.admit(&"a", t0 + Duration::from_secs(31)), Verdict::Log);
    }

    #[test]
    fn throttle_past_its_capacity_writes_new_messages_untracked() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(30), 1);
        assert_eq!(t.admit(&1, t0), Verdict::Log);
        assert_eq!(t.admit(&2, t0), Verdict::Log);
        assert_eq!(t.admit(&2, t0), Verdict::Log, "untracked, never dropped");
        assert_eq!(t.admit(&1, t0), Verdict::Suppress);
    }

    /// Collects what the writing layer writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    #[test]
    fn a_storm_of_one_warning_is_written_once_then_summarised_with_its_count() {
        let out = Captured::default();
        let t0 = Instant::now();
        let now = Arc::new(Mutex::new(t0));
        let clock = {
            let now = now.clone();
            Arc::new(move || *now.lock().unwrap())
        };
        let writer = out.clone();
        let fmt = tracing_subscriber::fmt::layer()
            .json()
            .with_writer(move || writer.clone());
        let subscriber = tracing_subscriber::registry().with(Throttled::with_clock(
            fmt,
            Duration::from_secs(30),
            clock,
        ));
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..100 {
                tracing::warn!(error = "connection refused", "link to the peer lost");
            }
            // A different error from the same place is its own message.
            tracing::warn!(error = "timed out", "link to the peer lost");
            for i in 0..5 {
                tracing::info!(i, "progress is never throttled");
            }
            *now.lock().unwrap() = t0 + Duration::from_secs(31);
            tracing::warn!(error = "connection refused", "link to the peer lost");
        });
        let lines: Vec<serde_json::Value> = out
            .lines()
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| {
                let mut fields = v["fields"].clone();
                fields["level"] = v["level"].clone();
                fields
            })
            .collect();
        let refused = |v: &&serde_json::Value| v["error"] == "connection refused";
        assert_eq!(lines.iter().filter(refused).count(), 2, "{lines:#?}");
        assert_eq!(
            lines.iter().filter(|v| v["error"] == "timed out").count(),
            1
        );
        assert_eq!(
            lines
                .iter()
                .filter(|v| v["message"] == "progress is never throttled")
                .count(),
            5
        );
        let summaries: Vec<_> = lines
            .iter()
            .filter(|v| v.get("suppressed").is_some())
            .collect();
        assert_eq!(summaries.len(), 1, "{lines:#?}");
        let s = summaries[0];
        assert_eq!(s["suppressed"], 99);
        assert_eq!(s["level"], "WARN");
        assert_eq!(s["origin"], module_path!());
        let message = s["message"].as_str().unwrap();
        assert!(
            message.contains("link to the peer lost error=connection refused"),
            "{message}"
        );
        // The summary comes before the message's next occurrence.
        let summary = lines.iter().position(|v| v.get("suppressed").is_some());
        let last_refused = lines.iter().rposition(|v| refused(&v));
        assert!(summary < last_refused, "{lines:#?}");
    }
}
