//! Slowing down failed authentications, per source address and per key prefix.
//!
//! The delay is applied only after a failure has been decided, right before the failure is
//! reported, so a correct key is never delayed no matter how many failures preceded it.
//!
//! Invariant: every failed authentication is delayed exponentially per source address and per key prefix, with bounded
//! memory; a correct key is never delayed.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// After this long without a failure, a source starts from a clean slate.
const FORGET_AFTER: Duration = Duration::from_secs(300);
const BASE_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Entries beyond this are pruned so an attacker cycling addresses cannot grow memory forever.
const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

#[derive(Debug, Default)]
pub struct AuthThrottle {
    by_addr: DashMap<IpAddr, Failures>,
    by_prefix: DashMap<String, Failures>,
}

fn bump<K: std::hash::Hash + Eq + Clone>(map: &DashMap<K, Failures>, key: &K, now: Instant) -> u32 {
    if map.len() >= MAX_ENTRIES {
        map.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
    }
    let mut entry = map.entry(key.clone()).or_insert(Failures { count: 0, last: now });
    if now.duration_since(entry.last) >= FORGET_AFTER {
        entry.count = 0;
    }
    entry.count = entry.count.saturating_add(1);
    entry.last = now;
    entry.count
}

/// Exponential in the number of recent failures, capped.
fn delay_for(count: u32) -> Duration {
    let exp = count.saturating_sub(1).min(10);
    (BASE_DELAY * 2u32.pow(exp)).min(MAX_DELAY)
}

impl AuthThrottle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a failure and return how long to wait before answering it.
    pub fn record_failure(&self, addr: IpAddr, key_prefix: &str) -> Duration {
        let now = Instant::now();
        let a = bump(&self.by_addr, &addr, now);
        let p = bump(&self.by_prefix, &key_prefix.to_owned(), now);
        delay_for(a.max(p))
    }

    /// Number of recent failures recorded for an address (for logs and tests).
    pub fn failures_from(&self, addr: IpAddr) -> u32 {
        self.by_addr.get(&addr).map_or(0, |f| f.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_grows_and_caps() {
        let t = AuthThrottle::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let d1 = t.record_failure(ip, "sk_dev_aaaaaa");
        let d2 = t.record_failure(ip, "sk_dev_bbbbbb");
        let d3 = t.record_failure(ip, "sk_dev_cccccc");
        assert_eq!(d1, BASE_DELAY);
        assert!(d2 > d1 && d3 > d2);
        for _ in 0..20 {
            assert!(t.record_failure(ip, "x") <= MAX_DELAY);
        }
        assert_eq!(t.failures_from(ip), 23);
    }

    #[test]
    fn prefix_is_tracked_across_addresses() {
        let t = AuthThrottle::new();
        for i in 0..5u8 {
            t.record_failure(IpAddr::from([10, 0, 0, i]), "sk_prod_abcdef");
        }
        // A fresh address guessing the same prefix is slowed by the prefix's history.
        assert!(t.record_failure(IpAddr::from([10, 0, 1, 1]), "sk_prod_abcdef") > BASE_DELAY * 8);
    }
}
