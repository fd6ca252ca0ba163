//! Logging: text or JSON lines on stderr, gathered in memory for a writer thread, with a filter (`log_level`,
//! `STRUERE_LOG`, `RUST_LOG`) that a reload can change while the proxy runs.
//!
//! JSON lines carry the fields of the spans they happen in: the connection's (`conn`: peer,
//! user, key display prefix) and, at debug level, the statement's (`statement`: its size).
//! Invariant: no span or event field holds a key, a password or a row value (keys appear as
//! their 6-character display prefix at most; `tests/it/ops.rs` checks the JSON log).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, RwLock};

use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// The filter of the subscriber `init` installed.
static LIVE: OnceLock<LiveFilter> = OnceLock::new();

/// Install the global subscriber: `format` lines on stderr, filtered by `level` (directives
/// `level` and `target=level`, comma-separated; an invalid one falls back to `info`). The guard
/// flushes at exit.
///
/// Logs go through `LogBuffer`: a session appends its line to memory and never waits on the
/// terminal or a log pipe; a writer thread writes what gathered every `FLUSH_EVERY` (or at once
/// past `FLUSH_AT` bytes). One event line per statement would otherwise cost a thread wake-up per
/// statement. Lossless: past `MAX_PENDING` bytes the logging task writes the backlog itself.
pub fn init(format: LogFormat, level: &str) -> LogGuard {
    let targets = parse_filter(level).unwrap_or_else(|_| Targets::new().with_default(LevelFilter::INFO));
    let filter = LiveFilter(Arc::new(RwLock::new(targets)));
    let _ = LIVE.set(filter.clone());
    let buffer = LogBuffer::start();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let lines = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(buffer.clone());
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => registry.with(lines.json().with_current_span(true).with_span_list(true)).try_init(),
        LogFormat::Text => registry.with(lines).try_init(),
    };
    LogGuard(buffer)
}

/// Filter directives: `level` and `target=level`, comma-separated (`info,struere_proxy=debug`).
pub fn parse_filter(directives: &str) -> Result<Targets, String> {
    directives.parse().map_err(|e: tracing_subscriber::filter::ParseError| e.to_string())
}

/// The log filter, which a reload replaces. It decides per call site, once (and again after a
/// reload), and takes no part in entering and leaving spans: the connection span is entered at
/// every wake-up of its session, and a filter that can match spans (tracing-subscriber's
/// `EnvFilter`, behind its reload layer) took three lock reads and a map lookup each time.
#[derive(Clone)]
struct LiveFilter(Arc<RwLock<Targets>>);

impl LiveFilter {
    fn targets(&self) -> std::sync::RwLockReadGuard<'_, Targets> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn replace(&self, targets: Targets) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = targets;
        // Every call site's decision, and the global maximum level, are worked out again.
        tracing::callsite::rebuild_interest_cache();
    }
}

impl<S: Subscriber> Layer<S> for LiveFilter {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if self.targets().would_enable(metadata.target(), metadata.level()) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
        self.targets().would_enable(metadata.target(), metadata.level())
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        <Targets as Layer<S>>::max_level_hint(&self.targets())
    }
}

/// How long a log line may wait in memory.
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
/// The writer thread is woken at once when this much has gathered.
const FLUSH_AT: usize = 256 * 1024;
/// Past this backlog (a stalled stderr), the logging task writes it itself and so waits.
const MAX_PENDING: usize = 64 * 1024 * 1024;

/// Log lines gathered in memory for the writer thread.
#[derive(Clone)]
pub struct LogBuffer(Arc<(Mutex<Vec<u8>>, Condvar)>);

impl LogBuffer {
    fn start() -> LogBuffer {
        let buffer = LogBuffer(Arc::new((Mutex::new(Vec::with_capacity(FLUSH_AT)), Condvar::new())));
        let writer = buffer.clone();
        let _ = std::thread::Builder::new().name("struere-log".into()).spawn(move || {
            loop {
                let pending = {
                    let (lock, wake) = &*writer.0;
                    let guard = lock.lock().unwrap_or_else(PoisonError::into_inner);
                    let (mut guard, _) = wake.wait_timeout(guard, FLUSH_EVERY).unwrap_or_else(PoisonError::into_inner);
                    std::mem::take(&mut *guard)
                };
                write_out(&pending);
            }
        });
        buffer
    }

    /// Write everything gathered so far (at exit).
    pub fn flush(&self) {
        let pending = std::mem::take(&mut *self.0.0.lock().unwrap_or_else(PoisonError::into_inner));
        write_out(&pending);
    }
}

fn write_out(bytes: &[u8]) {
    if !bytes.is_empty() {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(bytes);
        let _ = err.flush();
    }
}

impl Write for LogBuffer {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let (lock, wake) = &*self.0;
        let mut pending = lock.lock().unwrap_or_else(PoisonError::into_inner);
        pending.extend_from_slice(line);
        if pending.len() >= MAX_PENDING {
            let backlog = std::mem::take(&mut *pending);
            drop(pending);
            write_out(&backlog);
        } else if pending.len() >= FLUSH_AT {
            wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;

    fn make_writer(&'a self) -> LogBuffer {
        self.clone()
    }
}

/// Flushes the log at exit.
pub struct LogGuard(LogBuffer);

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.0.flush();
    }
}

/// Put a new filter in force. Fails on invalid directives, or when `init` did not install the
/// subscriber (tests with their own).
pub fn set_level(level: &str) -> Result<(), String> {
    let targets = parse_filter(level)?;
    LIVE.get().ok_or("the log filter is not reloadable in this process")?.replace(targets);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn invalid_levels_are_refused() {
        assert!(super::set_level("info,=[").is_err());
    }

    #[test]
    fn a_replaced_filter_decides_again() {
        use tracing_subscriber::layer::SubscriberExt;
        let filter = super::LiveFilter(std::sync::Arc::new(std::sync::RwLock::new(
            super::parse_filter("warn,struere_proxy=debug").unwrap(),
        )));
        let buffer = super::LogBuffer(std::sync::Arc::default());
        let lines = tracing_subscriber::fmt::layer().with_ansi(false).with_writer(buffer.clone());
        let subscriber = tracing_subscriber::registry().with(filter.clone()).with(lines);
        let logged = || String::from_utf8(std::mem::take(&mut *buffer.0.0.lock().unwrap())).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn", peer = "p");
            let _in = span.enter();
            // One call site each, used before and after the change: decisions are cached per
            // call site, so these fail unless the change works them out again.
            let debug = |m: &str| tracing::debug!(target: "struere_proxy::session", "{m}");
            let info = |m: &str| tracing::info!(target: "tokio_postgres", "{m}");
            debug("one");
            info("two");
            tracing::warn!(target: "tokio_postgres", "three");
            let first = logged();
            assert!(
                first.contains("one") && first.contains("conn") && !first.contains("two") && first.contains("three")
            );
            filter.replace(super::parse_filter("info").unwrap());
            debug("four");
            info("five");
            let second = logged();
            assert!(!second.contains("four") && second.contains("five"), "{second}");
        });
    }

    #[test]
    fn lines_gather_in_memory_until_flushed() {
        use std::io::Write;
        let buffer = super::LogBuffer(std::sync::Arc::default());
        let mut w = buffer.clone();
        w.write_all(b"one\n").unwrap();
        w.write_all(b"two\n").unwrap();
        assert_eq!(&*buffer.0.0.lock().unwrap(), b"one\ntwo\n", "nothing written yet, no thread woken");
    }
}
