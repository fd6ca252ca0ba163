//! Counters and histograms the admin endpoint exposes in Prometheus' text format.
//!
//! Invariant: labels carry only bounded, non-secret values — environment, verdict, refusal
//! class (the SQLSTATE's meaning), policy version. Never a key, an actor, a tenant's data or a
//! statement.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::auth::identity::Environment;

/// Upper bounds of the latency buckets, in microseconds.
const BUCKETS_US: [u64; 16] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 5_000_000,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|&b| us <= b)
            && let Some(bucket) = self.buckets.get(i)
        {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_US.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Environments as metric labels (operator keys are their own).
const ENVS: [&str; 3] = ["development", "production", "operator"];
const VERDICTS: [&str; 3] = ["allowed", "rewritten", "refused"];
/// Refusal classes (what the SQLSTATE says).
const REFUSALS: [&str; 4] = ["denied", "syntax", "unverifiable", "too_complex"];

fn env_index(env: Option<Environment>) -> usize {
    match env {
        Some(Environment::Development) => 0,
        Some(Environment::Production) => 1,
        None => 2,
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub clients_current: AtomicU64,
    pub clients_total: AtomicU64,
    pub auth_failures: AtomicU64,
    /// Clients turned away: max_clients reached.
    pub clients_refused: AtomicU64,
    statements: [[AtomicU64; 3]; 3],
    refusals: [AtomicU64; 4],
    pub rewrite_latency: Histogram,
    pub upstream_latency: Histogram,
    /// Rewritten statements prepared on an upstream connection (session/statements.rs).
    pub statements_prepared: AtomicU64,
    /// Executions that bound values to a statement prepared before on the same connection.
    pub statements_reused: AtomicU64,
    /// Session limits hit: idle session, idle in transaction, statement (`SessionLimit`).
    timeouts: [AtomicU64; 3],
}

/// A session limit the proxy enforces (`config::SessionTimeouts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionLimit {
    IdleSession,
    IdleTransaction,
    Statement,
}

impl SessionLimit {
    const ALL: [SessionLimit; 3] = [SessionLimit::IdleSession, SessionLimit::IdleTransaction, SessionLimit::Statement];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionLimit::IdleSession => "idle_session",
            SessionLimit::IdleTransaction => "idle_in_transaction",
            SessionLimit::Statement => "statement",
        }
    }
}

impl Metrics {
    pub fn timeout(&self, limit: SessionLimit) {
        self.timeouts[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn statement(&self, env: Option<Environment>, verdict: crate::events::Verdict) {
        let v = match verdict {
            crate::events::Verdict::Allowed => 0,
            crate::events::Verdict::Rewritten => 1,
            crate::events::Verdict::Refused => 2,
        };
        if let Some(c) = self.statements.get(env_index(env)).and_then(|row| row.get(v)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn refusal(&self, r: &crate::rewrite::Refusal) {
        use crate::rewrite::Refusal;
        let i = match r {
            Refusal::Denied(_) => 0,
            Refusal::Syntax(_) => 1,
            Refusal::Unverifiable(_) => 2,
            Refusal::TooComplex(_) => 3,
        };
        if let Some(c) = self.refusals.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One gauge or counter line.
fn line(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

/// Everything the proxy reports, in Prometheus' text exposition format.
pub fn render(proxy: &crate::server::Proxy) -> String {
    let m = &proxy.metrics;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::with_capacity(8192);
    line(&mut out, "struere_clients", "gauge", "Client connections open now.", get(&m.clients_current));
    line(&mut out, "struere_clients_total", "counter", "Client connections accepted.", get(&m.clients_total));
    line(
        &mut out,
        "struere_clients_refused_total",
        "counter",
        "Client connections refused because max_clients was reached.",
        get(&m.clients_refused),
    );
    line(&mut out, "struere_auth_failures_total", "counter", "Failed key authentications.", get(&m.auth_failures));
    let _ = writeln!(
        out,
        "# HELP struere_timeouts_total Session limits hit (idle_session_timeout_secs, idle_transaction_timeout_secs, \
         statement_timeout_ms).\n# TYPE struere_timeouts_total counter"
    );
    for limit in SessionLimit::ALL {
        let _ =
            writeln!(out, "struere_timeouts_total{{kind=\"{}\"}} {}", limit.as_str(), get(&m.timeouts[limit as usize]));
    }
    line(
        &mut out,
        "struere_upstream_statements_prepared_total",
        "counter",
        "Rewritten statements prepared on an upstream connection.",
        get(&m.statements_prepared),
    );
    line(
        &mut out,
        "struere_upstream_statements_reused_total",
        "counter",
        "Executions of a rewritten statement prepared before on the same upstream connection.",
        get(&m.statements_reused),
    );
    let pool = &proxy.pool.stats;
    line(
        &mut out,
        "struere_upstream_connects_total",
        "counter",
        "Upstream connections opened for sessions.",
        get(&pool.connected),
    );
    line(&mut out, "struere_pool_reused_total", "counter", "Sessions given a pooled connection.", get(&pool.reused));
    line(&mut out, "struere_pool_returned_total", "counter", "Connections reset and pooled.", get(&pool.returned));
    line(&mut out, "struere_pool_closed_total", "counter", "Pooled or returned connections closed.", get(&pool.closed));
    line(&mut out, "struere_pool_idle", "gauge", "Idle pooled upstream connections.", proxy.pool.idle_count() as u64);
    let active = &proxy.pool.active;
    line(
        &mut out,
        "struere_pool_active",
        "gauge",
        "Upstream connections holding a turn under pool_max_active (0 without a limit).",
        active.in_use() as u64,
    );
    line(&mut out, "struere_pool_waiting", "gauge", "Sessions waiting for a turn.", get(&active.stats.waiting));
    line(&mut out, "struere_pool_waits_total", "counter", "Turns that had to wait.", get(&active.stats.waits));
    let _ = writeln!(
        out,
        "# HELP struere_pool_wait_seconds_total Time sessions waited for a turn.\n# TYPE struere_pool_wait_seconds_total counter\nstruere_pool_wait_seconds_total {:.6}",
        get(&active.stats.wait_us) as f64 / 1e6
    );
    line(
        &mut out,
        "struere_pool_wait_timeouts_total",
        "counter",
        "Sessions ended after pool_wait_timeout_secs without a turn.",
        get(&active.stats.wait_timeouts),
    );

    let _ =
        writeln!(out, "# HELP struere_statements_total Statement decisions.\n# TYPE struere_statements_total counter");
    for (env, row) in ENVS.iter().zip(&m.statements) {
        for (verdict, c) in VERDICTS.iter().zip(row) {
            let _ = writeln!(out, "struere_statements_total{{environment=\"{env}\",verdict=\"{verdict}\"}} {}", get(c));
        }
    }
    let _ = writeln!(out, "# HELP struere_refusals_total Refusals by class.\n# TYPE struere_refusals_total counter");
    for (class, c) in REFUSALS.iter().zip(&m.refusals) {
        let _ = writeln!(out, "struere_refusals_total{{class=\"{class}\"}} {}", get(c));
    }
    let _ = writeln!(
        out,
        "# HELP struere_rewrite_cache_total Rewrite cache lookups.\n# TYPE struere_rewrite_cache_total counter"
    );
    let cache = proxy.rewriter.stats();
    for (result, c) in
        [("exact_hit", &cache.exact_hits), ("template_hit", &cache.template_hits), ("miss", &cache.misses)]
    {
        let _ = writeln!(out, "struere_rewrite_cache_total{{result=\"{result}\"}} {}", get(c));
    }
    m.rewrite_latency.render(&mut out, "struere_rewrite_seconds", "Time to rewrite one message (cache included).");
    m.upstream_latency.render(
        &mut out,
        "struere_upstream_seconds",
        "Time from forwarding a message to the server's ReadyForQuery.",
    );
    let events = &proxy.events;
    line(
        &mut out,
        "struere_event_queue_depth",
        "gauge",
        "Audit events waiting for the database.",
        events.queued() as u64,
    );
    line(
        &mut out,
        "struere_events_written_total",
        "counter",
        "Audit events written to the database.",
        get(&events.written),
    );
    line(
        &mut out,
        "struere_events_dropped_total",
        "counter",
        "Audit events not written to the database (queue full or write failed); they are in the log.",
        get(&events.dropped),
    );
    let _ = writeln!(
        out,
        "# HELP struere_policy_version_info The policy version in force per environment.\n# TYPE struere_policy_version_info gauge"
    );
    for env in [Environment::Development, Environment::Production] {
        let _ = writeln!(
            out,
            "struere_policy_version_info{{environment=\"{}\",version=\"{}\"}} 1",
            env.as_str(),
            proxy.policy_version(env)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.000025\"} 0\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.00005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"5\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\nx_sum 60.00006\nx_count 3\n"), "{out}");
    }
}
