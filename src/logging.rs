//! Logging: text or JSON lines on stderr through a writer thread, with a filter (`log_level`,
//! `STRUERE_LOG`, `RUST_LOG`) that a reload can change while the proxy runs.
//!
//! JSON lines carry the fields of the spans they happen in: the connection's (`conn`: peer,
//! user, key display prefix) and, at debug level, the statement's (`statement`: its size).
//! Invariant: no span or event field holds a key, a password or a row value (keys appear as
//! their 6-character display prefix at most; `tests/it/ops.rs` checks the JSON log).

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Changes the filter of the subscriber `init` installed.
static RELOAD: OnceLock<Reload> = OnceLock::new();

/// Install the global subscriber: `format` lines on stderr, filtered by `level` (filter
/// directives; an invalid one falls back to `info`). The guard flushes at exit.
///
/// Logs go through a writer thread: a session never waits on the terminal or a log pipe (one
/// event line per statement). Lossless: when its buffer (128k lines) is full, the logging task
/// waits rather than dropping an audit line.
pub fn init(format: LogFormat, level: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("struere-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Json => {
            let builder = builder.json().with_current_span(true).with_span_list(true).with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = RELOAD.set(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())));
            builder.init();
        }
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = RELOAD.set(Box::new(move |f| handle.reload(f).map_err(|e| e.to_string())));
            builder.init();
        }
    }
    guard
}

/// Put a new filter in force. Fails on invalid directives, or when `init` did not install the
/// subscriber (tests with their own).
pub fn set_level(level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    match RELOAD.get() {
        Some(reload) => reload(filter),
        None => Err("the log filter is not reloadable in this process".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn invalid_levels_are_refused() {
        assert!(super::set_level("info,=[").is_err());
    }
}
