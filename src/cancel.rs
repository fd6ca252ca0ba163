//! Cancel keys. Each client gets the proxy's own random BackendKeyData (an operator session: its
//! backend's own pid, with the proxy's random secret); a CancelRequest carrying it is translated
//! into the upstream's key for exactly that session. A wrong secret does nothing.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use dashmap::DashMap;
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use crate::upstream::{UpstreamConfig, UpstreamError};

/// Where a client's cancel goes.
#[derive(Clone)]
pub struct CancelTarget {
    pub secret: i32,
    pub upstream: Arc<UpstreamConfig>,
    pub upstream_pid: i32,
    pub upstream_secret: i32,
    /// The cancels on their way to this backend, shared by every clone.
    pub in_flight: Arc<CancelsInFlight>,
}

impl CancelTarget {
    /// Ask the server to cancel what the backend runs. The request counts as in flight from
    /// this call (not from the future's first poll) until the future ends or is dropped.
    pub fn cancel(&self) -> impl Future<Output = Result<(), UpstreamError>> + Send + use<> {
        let flight = Flight::start(&self.in_flight);
        let (upstream, pid, secret) = (Arc::clone(&self.upstream), self.upstream_pid, self.upstream_secret);
        async move {
            let sent = crate::upstream::send_cancel(&upstream, pid, secret).await;
            flight.end(sent.is_ok());
            sent
        }
    }
}

/// The cancel requests on their way to one backend. PostgreSQL cancels whatever the backend
/// runs when the request arrives, so a request still travelling when its statement has ended
/// hits the next one: the session's next statement, or, once the connection is back in the
/// pool, another session's. Until the requests are through (`send_cancel` returns once the
/// server has taken one; a backend that is idle when it arrives ignores it), the session sends
/// the server nothing more, and the pool does not take the connection.
#[derive(Default)]
pub struct CancelsInFlight {
    count: AtomicUsize,
    /// A request failed or was dropped: whether the server took it is unknown.
    unsure: AtomicBool,
    settled: Notify,
}

impl CancelsInFlight {
    /// No request is on its way (one load: the relay asks before each write upstream).
    pub fn none(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Once no request is on its way: `true` if every request so far went through, `false`
    /// if one may still reach the backend later (it failed or was dropped).
    pub async fn settled(&self) -> bool {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            // Registered before the count is read: an end in between still wakes this.
            notified.as_mut().enable();
            if self.none() {
                return !self.unsure.load(Ordering::Acquire);
            }
            notified.await;
        }
    }
}

/// One request in flight; its end (or drop) is counted once.
struct Flight {
    of: Arc<CancelsInFlight>,
    went_through: bool,
}

impl Flight {
    fn start(of: &Arc<CancelsInFlight>) -> Flight {
        of.count.fetch_add(1, Ordering::AcqRel);
        Flight { of: Arc::clone(of), went_through: false }
    }

    fn end(mut self, went_through: bool) {
        self.went_through = went_through;
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if !self.went_through {
            self.of.unsure.store(true, Ordering::Release);
        }
        self.of.count.fetch_sub(1, Ordering::AcqRel);
        self.of.settled.notify_waiters();
    }
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
        let target =
            CancelTarget { secret: random_i32(), upstream, upstream_pid, upstream_secret, in_flight: Arc::default() };
        let secret = target.secret;
        if let Some(pid) = pid.filter(|&p| p > 0)
            && let dashmap::Entry::Vacant(v) = self.targets.entry(pid)
        {
            v.insert(target);
            return CancelGuard { registry: Arc::clone(self), pid, secret };
        }
        loop {
            // Positive pids look like real backend pids to clients that print them.
            let pid = random_i32() & 0x7fff_ffff;
            if pid == 0 {
                continue;
            }
            if let dashmap::Entry::Vacant(v) = self.targets.entry(pid) {
                v.insert(target);
                return CancelGuard { registry: Arc::clone(self), pid, secret };
            }
        }
    }

    /// The target for a CancelRequest, if and only if the secret matches.
    pub fn resolve(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        self.matching(pid, secret).map(|t| t.clone())
    }

    /// The registered entry for `pid`, if `secret` is its own (compared in constant time).
    fn matching(&self, pid: i32, secret: i32) -> Option<dashmap::mapref::one::Ref<'_, i32, CancelTarget>> {
        let t = self.targets.get(&pid)?;
        let ok: bool = t.secret.to_be_bytes().ct_eq(&secret.to_be_bytes()).into();
        ok.then_some(t)
    }

    /// The cancel a CancelRequest asks for, if and only if the secret matches. It counts as in
    /// flight before the key can be unregistered (the map's entry is held meanwhile), so a
    /// session that ends waits for it before its connection goes back to the pool.
    pub fn cancel(
        &self,
        pid: i32,
        secret: i32,
    ) -> Option<impl Future<Output = Result<(), UpstreamError>> + Send + use<>> {
        // Started while the entry is held: unregistering waits for it.
        self.matching(pid, secret).map(|t| t.cancel())
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target whose server refuses connections: its cancels fail at once.
    fn unreachable_target() -> (Arc<CancelRegistry>, CancelGuard) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let upstream = Arc::new(UpstreamConfig::from_url(&format!("postgres://u@127.0.0.1:{port}/db")).unwrap());
        let registry = Arc::new(CancelRegistry::default());
        let guard = registry.register(upstream, 42, 7);
        (registry, guard)
    }

    #[tokio::test]
    async fn a_cancel_is_in_flight_from_the_request_until_it_ends() {
        let (registry, guard) = unreachable_target();
        let target = registry.resolve(guard.pid, guard.secret).unwrap();
        assert!(target.in_flight.none());
        assert!(target.in_flight.settled().await, "nothing sent: nothing unsure");
        // Counted before its first poll: a session that ends meanwhile waits for it.
        let cancel = registry.cancel(guard.pid, guard.secret).unwrap();
        assert!(!target.in_flight.none());
        let waiting = tokio::spawn({
            let in_flight = Arc::clone(&target.in_flight);
            async move { in_flight.settled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "settled only once the cancel has ended");
        assert!(cancel.await.is_err(), "the server is not there");
        // It did not go through: a later arrival cannot be ruled out, so not through.
        assert!(!waiting.await.unwrap());
        assert!(target.in_flight.none());
    }

    #[tokio::test]
    async fn a_dropped_cancel_ends_its_flight_unsure() {
        let (registry, guard) = unreachable_target();
        let target = registry.resolve(guard.pid, guard.secret).unwrap();
        let cancel = target.cancel();
        assert!(!target.in_flight.none());
        drop(cancel);
        assert!(target.in_flight.none());
        assert!(!target.in_flight.settled().await);
    }

    #[test]
    fn only_a_registered_key_with_its_secret_starts_a_cancel() {
        let (registry, guard) = unreachable_target();
        let (pid, secret) = (guard.pid, guard.secret);
        let in_flight = Arc::clone(&registry.resolve(pid, secret).unwrap().in_flight);
        assert!(registry.cancel(pid, secret.wrapping_add(1)).is_none());
        assert!(registry.cancel(pid.wrapping_add(1), secret).is_none());
        assert!(in_flight.none(), "a refused request is never in flight");
        drop(guard);
        assert!(registry.cancel(pid, secret).is_none(), "unregistered with its session");
        assert!(registry.is_empty());
    }
}
