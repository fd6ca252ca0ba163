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
}

impl UpstreamPool {
    pub fn new(settings: PoolSettings) -> UpstreamPool {
        UpstreamPool { settings, idle: DashMap::new(), stats: PoolStats::default() }
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
