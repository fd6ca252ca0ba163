//! Session pooling of upstream connections (the pooler of PgBouncer's layout): a client session
//! of an environment key that ends politely (Terminate, nothing in flight) leaves its upstream
//! connection here, reset with `DISCARD ALL` (after `ROLLBACK` if a transaction was open); the
//! next session with the same key takes it instead of paying a backend start.
//!
//! Invariant: a connection is only reused by sessions whose startup packet would have been
//! identical — same role, database and parameters, and the parameters include the pinned
//! `search_path` that names the tenant's scratch schema — so `RESET ALL` in the next session
//! restores exactly what a fresh connection would have, and nothing is shared across tenants or
//! environments. Anything unexpected during the reset closes the connection instead.
//! Transaction pooling would hand connections over at ReadyForQuery 'I' instead of at Terminate;
//! the key and the reset stay the same.
//!
//! Apart from the pool, `pool_max_active` bounds how many upstream connections are busy at once
//! ([`ActiveLimit`]): a session takes a turn when it sends something while it holds none, and
//! gives it back at a ReadyForQuery that leaves it idle with nothing else sent ([`ActiveHold`]).
//! Idle sessions keep their backends but cost PostgreSQL nothing; what the bound saves is the
//! CPU many runnable backends waste on a few cores (PgBouncer's transaction mode gets the same
//! from its pool size). A transaction keeps its turn until it ends, so only a session outside
//! any transaction ever waits for one (and holds no lock then, save session-level advisory
//! locks, which `allow_functions` would have to allow).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dashmap::DashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::PoolSettings;
use crate::protocol::frame;
use crate::protocol::frontend::encode_query;
use crate::upstream::UpstreamConn;

/// How long the reset may take before the connection is given up.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// What makes two sessions' upstream connections interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// `user@host:port` of the upstream role.
    pub server: String,
    pub database: String,
    /// The startup parameters, sorted.
    pub params: Vec<(String, String)>,
}

impl PoolKey {
    pub fn new(server: String, database: &str, params: &[(String, String)]) -> PoolKey {
        let mut params = params.to_vec();
        params.sort();
        PoolKey { server, database: database.to_owned(), params }
    }
}

struct Idle {
    conn: UpstreamConn,
    since: Instant,
}

/// Counters for the metrics endpoint and the logs.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Sessions that got a pooled connection.
    pub reused: AtomicU64,
    /// Sessions that had to connect (pool empty, or pooling off for them).
    pub connected: AtomicU64,
    /// Connections reset and kept.
    pub returned: AtomicU64,
    /// Connections closed: found dead, reset failed, pool full, or idle too long.
    pub closed: AtomicU64,
}

pub struct UpstreamPool {
    settings: PoolSettings,
    idle: DashMap<PoolKey, Vec<Idle>>,
    pub stats: PoolStats,
    /// The bound on busy upstream connections, pooled or not.
    pub active: ActiveLimit,
}

impl UpstreamPool {
    pub fn new(settings: PoolSettings) -> UpstreamPool {
        UpstreamPool {
            settings,
            idle: DashMap::new(),
            stats: PoolStats::default(),
            active: ActiveLimit::new(settings.max_active, settings.wait_timeout),
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.max_idle > 0
    }

    /// Idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.idle.iter().map(|e| e.value().len()).sum()
    }

    /// The most recently returned live connection for `key`, if any.
    pub async fn take(&self, key: &PoolKey) -> Option<UpstreamConn> {
        loop {
            let candidate = self.idle.get_mut(key)?.pop()?;
            if candidate.since.elapsed() > self.settings.idle_timeout {
                self.close(candidate.conn).await;
                continue;
            }
            let mut conn = candidate.conn;
            if still_idle(&mut conn).await {
                self.stats.reused.fetch_add(1, Ordering::Relaxed);
                return Some(conn);
            }
            self.stats.closed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A session had to connect.
    pub fn connected(&self) {
        self.stats.connected.fetch_add(1, Ordering::Relaxed);
    }

    /// Reset a connection its client left (`status`: the last ReadyForQuery's) and keep it for
    /// the next session of `key`, or close it.
    pub async fn give_back(&self, key: PoolKey, mut conn: UpstreamConn, status: u8) {
        if let Err(why) = reset(&mut conn, status).await {
            tracing::debug!(why, "pooled connection not reusable; closed");
            self.stats.closed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let full = {
            let mut list = self.idle.entry(key).or_default();
            if list.len() >= self.settings.max_idle {
                Some(conn)
            } else {
                list.push(Idle { conn, since: Instant::now() });
                None
            }
        };
        match full {
            Some(conn) => self.close(conn).await,
            None => {
                self.stats.returned.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Close the connections idle for longer than the timeout.
    pub async fn reap(&self) {
        let timeout = self.settings.idle_timeout;
        let mut expired = Vec::new();
        for mut entry in self.idle.iter_mut() {
            let list = entry.value_mut();
            let (old, keep): (Vec<Idle>, Vec<Idle>) = list.drain(..).partition(|i| i.since.elapsed() > timeout);
            *list = keep;
            expired.extend(old);
        }
        self.idle.retain(|_, list| !list.is_empty());
        for idle in expired {
            self.close(idle.conn).await;
        }
    }

    /// Close a connection a client left in a state the pool cannot take over.
    pub async fn discard(&self, conn: UpstreamConn) {
        self.close(conn).await;
    }

    /// Say goodbye (Terminate) and close.
    async fn close(&self, mut conn: UpstreamConn) {
        self.stats.closed.fetch_add(1, Ordering::Relaxed);
        let _ = conn.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
        let _ = conn.stream.shutdown().await;
    }
}

/// At most `max_active` upstream connections busy at once, across all sessions (`pool_max_active`).
pub struct ActiveLimit {
    /// `None`: no limit.
    turns: Option<Arc<tokio::sync::Semaphore>>,
    max: usize,
    wait_timeout: Duration,
    pub stats: ActiveStats,
}

/// A session's turn: given back when dropped.
pub type Turn = tokio::sync::OwnedSemaphorePermit;

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct ActiveStats {
    /// Sessions waiting for a turn now.
    pub waiting: AtomicU64,
    /// Turns that had to wait.
    pub waits: AtomicU64,
    /// Time spent waiting, in microseconds.
    pub wait_us: AtomicU64,
    /// Sessions ended for having waited `pool_wait_timeout_secs`.
    pub wait_timeouts: AtomicU64,
}

impl ActiveLimit {
    pub fn new(max: usize, wait_timeout: Duration) -> ActiveLimit {
        let turns = (max > 0).then(|| Arc::new(tokio::sync::Semaphore::new(max)));
        ActiveLimit { turns, max, wait_timeout, stats: ActiveStats::default() }
    }

    pub fn enabled(&self) -> bool {
        self.turns.is_some()
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn wait_timeout(&self) -> Duration {
        self.wait_timeout
    }

    /// Turns held now.
    pub fn in_use(&self) -> usize {
        self.turns.as_ref().map_or(0, |t| self.max.saturating_sub(t.available_permits()))
    }

    /// A turn: at once if one is free, else in order of arrival (tokio's semaphore is fair).
    /// `None` without a limit; `Err` after `wait_timeout`.
    pub async fn turn(&self) -> Result<Option<Turn>, WaitedTooLong> {
        let Some(turns) = &self.turns else { return Ok(None) };
        if let Ok(turn) = Arc::clone(turns).try_acquire_owned() {
            return Ok(Some(turn));
        }
        let waiting = Waiting::new(&self.stats);
        let waited = tokio::time::timeout(self.wait_timeout, Arc::clone(turns).acquire_owned()).await;
        drop(waiting);
        match waited {
            // The semaphore is never closed.
            Ok(turn) => Ok(turn.ok()),
            Err(_) => {
                self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(WaitedTooLong)
            }
        }
    }
}

/// One session's wait, counted in the stats until it ends, also when the session ends first
/// (its wait dropped).
struct Waiting<'a> {
    stats: &'a ActiveStats,
    started: Instant,
}

impl<'a> Waiting<'a> {
    fn new(stats: &'a ActiveStats) -> Waiting<'a> {
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting { stats, started: Instant::now() }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        self.stats.waits.fetch_add(1, Ordering::Relaxed);
        let took = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats.wait_us.fetch_add(took, Ordering::Relaxed);
    }
}

/// No turn came within `pool_wait_timeout_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitedTooLong;

/// What one session holds of the [`ActiveLimit`], kept beside the round trips it has sent.
#[derive(Debug, Default)]
pub struct ActiveHold {
    turn: Option<Turn>,
    /// Extended-protocol messages went upstream after the last Sync: the server owes answers
    /// that no ReadyForQuery announces yet.
    trailing: bool,
}

impl ActiveHold {
    /// Whether the session must take a turn before it sends (only asked under a limit).
    pub fn needs_turn(&self) -> bool {
        self.turn.is_none()
    }

    pub fn hold(&mut self, turn: Turn) {
        self.turn = Some(turn);
    }

    /// Something is about to go upstream; `trailing`: extended-protocol messages without their
    /// Sync are among what has gone since the last Sync.
    pub fn sending(&mut self, trailing: bool) {
        self.trailing = trailing;
    }

    /// A ReadyForQuery with transaction status `status` came, with `unanswered` round trips
    /// still owed one: the turn goes back when the connection is idle and owes nothing.
    pub fn ready(&mut self, status: u8, unanswered: usize) {
        if status == b'I' && unanswered == 0 && !self.trailing {
            self.turn = None;
        }
    }
}

/// An idle backend sends nothing: any byte waiting (or the end of the stream) means it is
/// terminating, or in a state the pool did not leave it in.
async fn still_idle(conn: &mut UpstreamConn) -> bool {
    if !conn.read_buf.is_empty() {
        return false;
    }
    let mut probe = [0u8; 1];
    // A zero timeout polls the read once: pending means nothing is there.
    tokio::time::timeout(Duration::ZERO, conn.stream.read(&mut probe)).await.is_err()
}

/// `ROLLBACK` (when a transaction was open) and `DISCARD ALL`; the connection must answer with
/// exactly their completions and end idle.
async fn reset(conn: &mut UpstreamConn, status: u8) -> Result<(), &'static str> {
    let mut out = BytesMut::new();
    let mut expected = 1;
    if status != b'I' {
        encode_query(&mut out, "ROLLBACK");
        expected += 1;
    }
    encode_query(&mut out, "DISCARD ALL");
    let exchange = async {
        conn.stream.write_all(&out).await.map_err(|_| "write failed")?;
        conn.stream.flush().await.map_err(|_| "flush failed")?;
        let mut ready = 0;
        loop {
            while let Some(f) = frame::split_backend(&mut conn.read_buf).map_err(|_| "invalid message")? {
                match f.tag {
                    b'Z' => {
                        ready += 1;
                        if ready == expected {
                            return if f.body.first() == Some(&b'I') { Ok(()) } else { Err("not idle after reset") };
                        }
                    }
                    // Completions, notices, reported settings and late notifications.
                    b'C' | b'N' | b'S' | b'A' => {}
                    b'E' => return Err("the reset failed"),
                    _ => return Err("unexpected message during the reset"),
                }
            }
            conn.read_buf.reserve(4096);
            if conn.stream.read_buf(&mut conn.read_buf).await.map_err(|_| "read failed")? == 0 {
                return Err("closed during the reset");
            }
        }
    };
    tokio::time::timeout(RESET_TIMEOUT, exchange).await.map_err(|_| "reset timed out")??;
    conn.transaction_status = b'I';
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn without_a_limit_no_turn_is_taken() {
        let limit = ActiveLimit::new(0, WAIT);
        assert!(!limit.enabled());
        assert!(limit.turn().await.unwrap().is_none());
        assert_eq!(limit.in_use(), 0);
    }

    #[tokio::test]
    async fn turns_are_bounded_and_a_wait_ends_after_the_timeout() {
        let limit = ActiveLimit::new(2, WAIT);
        let a = limit.turn().await.unwrap();
        let b = limit.turn().await.unwrap();
        assert!(a.is_some() && b.is_some());
        assert_eq!(limit.in_use(), 2);
        assert_eq!(limit.turn().await.unwrap_err(), WaitedTooLong);
        assert_eq!(limit.stats.wait_timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(limit.stats.waits.load(Ordering::Relaxed), 1);
        assert_eq!(limit.stats.waiting.load(Ordering::Relaxed), 0);
        drop(a);
        assert_eq!(limit.in_use(), 1);
        assert!(limit.turn().await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_wait_given_up_is_no_longer_counted_as_waiting() {
        let limit = ActiveLimit::new(1, Duration::from_secs(30));
        let _held = limit.turn().await.unwrap();
        let mut wait = Box::pin(limit.turn());
        assert!(futures_util::poll!(wait.as_mut()).is_pending());
        assert_eq!(limit.stats.waiting.load(Ordering::Relaxed), 1);
        // The session ended while it waited.
        drop(wait);
        assert_eq!(limit.stats.waiting.load(Ordering::Relaxed), 0);
        assert_eq!(limit.stats.waits.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_waiting_session_gets_the_turn_given_back() {
        let limit = Arc::new(ActiveLimit::new(1, Duration::from_secs(30)));
        let held = limit.turn().await.unwrap();
        let waiter = tokio::spawn({
            let limit = Arc::clone(&limit);
            async move { limit.turn().await.map(|t| t.is_some()) }
        });
        while limit.stats.waiting.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished());
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(true));
    }

    /// The hold's rule: the turn goes back only at a ReadyForQuery that leaves the connection
    /// idle, owing no other ReadyForQuery and no answers to unsynced extended messages.
    #[tokio::test]
    async fn a_turn_is_kept_through_transactions_and_owed_answers() {
        let limit = ActiveLimit::new(1, WAIT);
        let mut hold = ActiveHold::default();
        assert!(hold.needs_turn());
        hold.sending(false);
        hold.hold(limit.turn().await.unwrap().unwrap());
        // BEGIN: in a transaction ('T'), then failed ('E'): kept.
        hold.ready(b'T', 0);
        hold.ready(b'E', 0);
        assert!(!hold.needs_turn());
        // Idle, but another Query's ReadyForQuery is still owed: kept.
        hold.ready(b'I', 1);
        assert!(!hold.needs_turn());
        // Idle, but a Parse/Bind/Execute went up without its Sync: kept.
        hold.sending(true);
        hold.ready(b'I', 0);
        assert!(!hold.needs_turn());
        assert_eq!(limit.in_use(), 1);
        // The Sync went, and its ReadyForQuery says idle: given back.
        hold.sending(false);
        hold.ready(b'I', 0);
        assert!(hold.needs_turn());
        assert_eq!(limit.in_use(), 0);
    }
}
