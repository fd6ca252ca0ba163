//! Logging: text or JSON lines on stderr, gathered in memory for a writer thread, with a filter (`log_level`,
//! `STRUERE_LOG`, `RUST_LOG`) that a reload can change while the proxy runs.
//!
//! JSON lines carry the fields of the spans they happen in: the connection's (`conn`: peer,
//! user, key display prefix) and, at debug level, the statement's (`statement`: its size).
//! Invariant: no span or event field holds a key, a password or a row value (keys appear as
//! their 6-character display prefix at most; `tests/it/ops.rs` checks the JSON log).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Changes the filter of the subscriber `init` installed.
static RELOAD: OnceLock<Reload> = OnceLock::new();

/// Install the global subscriber: `format` lines on stderr, filtered by `level` (filter
/// directives; an invalid one falls back to `info`). The guard flushes at exit.
///
/// Logs go through `LogBuffer`: a session appends its line to memory and never waits on the
/// terminal or a log pipe; a writer thread writes what gathered every `FLUSH_EVERY` (or at once
/// past `FLUSH_AT` bytes). One event line per statement would otherwise cost a thread wake-up per
/// statement. Lossless: past `MAX_PENDING` bytes the logging task writes the backlog itself.
pub fn init(format: LogFormat, level: &str) -> LogGuard {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let buffer = LogBuffer::start();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(buffer.clone());
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
    LogGuard(buffer)
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
