//! Cancel keys. Each client gets the proxy's own random BackendKeyData (an operator session: its
//! backend's own pid, with the proxy's random secret); a CancelRequest carrying it is translated
//! into the upstream's key for exactly that session. A wrong secret does nothing.

use std::sync::Arc;

use dashmap::DashMap;
use subtle::ConstantTimeEq;

use crate::upstream::UpstreamConfig;

/// Where a client's cancel goes.
#[derive(Clone)]
pub struct CancelTarget {
    pub secret: i32,
    pub upstream: Arc<UpstreamConfig>,
    pub upstream_pid: i32,
    pub upstream_secret: i32,
}

#[derive(Default)]
pub struct CancelRegistry {
    targets: DashMap<i32, CancelTarget>,
}

fn random_i32() -> i32 {
    let mut b = [0u8; 4];
    // getrandom only fails when the OS has no entropy source at all; fall back to time-based
    // bits rather than aborting a session (the secret is still checked in constant time).
    if getrandom::fill(&mut b).is_err() {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        b = nanos.to_be_bytes();
    }
    i32::from_be_bytes(b)
}

/// Removes the session's key when the session ends.
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry.targets.remove(&self.pid);
    }
}

impl CancelRegistry {
    /// Allocate a fresh (pid, secret) for a session and remember where it cancels.
    pub fn register(
        self: &Arc<Self>,
        upstream: Arc<UpstreamConfig>,
        upstream_pid: i32,
        upstream_secret: i32,
    ) -> CancelGuard {
        self.register_preferring(upstream, upstream_pid, upstream_secret, None)
    }

    /// As `register`, with `pid` as the session's pid while no other session has it (an operator
    /// session shows its backend's own pid, as the server would: `pg_backend_pid()`,
    /// `pg_terminate_backend(pid)` and the pid of its own notifications agree with it). The
    /// secret is the proxy's own either way.
    pub fn register_preferring(
        self: &Arc<Self>,
        upstream: Arc<UpstreamConfig>,
        upstream_pid: i32,
        upstream_secret: i32,
        pid: Option<i32>,
    ) -> CancelGuard {
        let secret = random_i32();
        if let Some(pid) = pid.filter(|&p| p > 0)
            && let dashmap::Entry::Vacant(v) = self.targets.entry(pid)
        {
            v.insert(CancelTarget { secret, upstream, upstream_pid, upstream_secret });
            return CancelGuard { registry: Arc::clone(self), pid, secret };
        }
        loop {
            // Positive pids look like real backend pids to clients that print them.
            let pid = random_i32() & 0x7fff_ffff;
            if pid == 0 {
                continue;
            }
            if let dashmap::Entry::Vacant(v) = self.targets.entry(pid) {
                v.insert(CancelTarget { secret, upstream, upstream_pid, upstream_secret });
                return CancelGuard { registry: Arc::clone(self), pid, secret };
            }
        }
    }

    /// The target for a CancelRequest, if and only if the secret matches.
    pub fn resolve(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let t = self.targets.get(&pid)?;
        let ok: bool = t.secret.to_be_bytes().ct_eq(&secret.to_be_bytes()).into();
        ok.then(|| t.clone())
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}
