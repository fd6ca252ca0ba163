//! Refusals that keep the protocol in step.
//!
//! When the proxy refuses a statement it must answer exactly where the server would have: after
//! the replies to everything the client pipelined before it, with the transaction failed if one
//! was open, and (extended protocol) with everything up to the next Sync skipped. Rather than
//! simulating the server, the proxy makes the server do it: it forwards, in the refused message's
//! place, a statement that fails at Parse time with a unique marker (a call of a function that
//! cannot exist). The server then produces the error, the skipping and the ReadyForQuery status
//! itself, in the right position; the proxy only swaps the server's error text for its own.
//!
//! Nothing of the refused statement reaches the server: the injected text is fixed.
//!
//! Invariant: a refused message is answered in exactly the protocol position and transaction state the server would
//! have produced, and the refusal's marker never reaches the client.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::protocol::backend::parse_error_fields;

/// SQLSTATE `undefined_function`, what the server answers for the marker call.
const UNDEFINED_FUNCTION: &str = "42883";
/// SQLSTATE `invalid_text_representation`, what a failed write check raises.
const INVALID_TEXT_REPRESENTATION: &str = "22P02";

struct Pending {
    marker: String,
    /// Number of the ReadyForQuery that closes the segment this refusal was injected into.
    closes_at: u64,
    error: Bytes,
}

/// What to do with one backend message.
#[derive(Debug, PartialEq, Eq)]
pub enum BackendAction {
    Forward,
    Replace(Bytes),
}

pub struct RefusalTracker {
    nonce: String,
    seq: u64,
    pending: VecDeque<Pending>,
    boundaries_sent: u64,
    boundaries_seen: u64,
}

impl RefusalTracker {
    pub fn new(nonce: String) -> RefusalTracker {
        RefusalTracker { nonce, seq: 0, pending: VecDeque::new(), boundaries_sent: 0, boundaries_seen: 0 }
    }

    /// Record a refusal whose client-facing ErrorResponse is `error`; returns the SQL text to
    /// forward instead of the refused one.
    pub fn inject(&mut self, error: Bytes) -> String {
        self.seq += 1;
        let marker = format!("struere_refused_{}_{}", self.nonce, self.seq);
        let sql = format!("SELECT \"{marker}\"()");
        self.pending.push_back(Pending { marker, closes_at: self.boundaries_sent + 1, error });
        sql
    }

    /// A message that the server answers with exactly one ReadyForQuery (Query, Sync,
    /// FunctionCall) was forwarded.
    pub fn boundary_sent(&mut self) {
        self.boundaries_sent += 1;
    }

    /// The next `n` boundaries sent and not yet answered get no ReadyForQuery of their own
    /// (`StatementLog::boundaries_ignored`).
    pub fn boundaries_ignored(&mut self, n: u64) {
        let (first, n) = crate::events::ignore_in_flight(&mut self.boundaries_sent, self.boundaries_seen, n);
        for p in &mut self.pending {
            p.closes_at = crate::events::renumbered(p.closes_at, first, n);
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Inspect one backend message (tag and body).
    pub fn on_backend(&mut self, tag: u8, body: &[u8]) -> BackendAction {
        match tag {
            b'Z' => {
                self.boundaries_seen += 1;
                let seen = self.boundaries_seen;
                // A refusal whose segment has ended without its marker error was skipped by the
                // server because an earlier message of the same segment failed: nothing to swap.
                self.pending.retain(|p| p.closes_at > seen);
                BackendAction::Forward
            }
            b'E' => {
                let fields = parse_error_fields(body);
                // A write's WITH CHECK failed (see rewrite::engine::writes): the server's error
                // carries the proxy's refusal message.
                if fields.code == INVALID_TEXT_REPRESENTATION
                    && let Some(message) = crate::rewrite::engine::writes::decode_check_failure(&fields.message)
                {
                    let mut out = bytes::BytesMut::new();
                    crate::protocol::backend::error_response(
                        &mut out,
                        crate::protocol::backend::Severity::Error,
                        crate::protocol::sqlstate::SqlState::INSUFFICIENT_PRIVILEGE,
                        &message,
                        None,
                    );
                    return BackendAction::Replace(out.freeze());
                }
                if self.pending.is_empty() {
                    return BackendAction::Forward;
                }
                if fields.code != UNDEFINED_FUNCTION {
                    return BackendAction::Forward;
                }
                match self.pending.iter().position(|p| fields.message.contains(&p.marker)) {
                    Some(i) => {
                        self.pending.remove(i).map_or(BackendAction::Forward, |p| BackendAction::Replace(p.error))
                    }
                    None => BackendAction::Forward,
                }
            }
            _ => BackendAction::Forward,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::{Severity, error_response};
    use crate::protocol::sqlstate::SqlState;
    use bytes::BytesMut;

    fn server_error(code: &str, msg: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for (k, v) in [(b'S', "ERROR"), (b'C', code), (b'M', msg)] {
            b.push(k);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    fn ours() -> Bytes {
        let mut out = BytesMut::new();
        error_response(&mut out, Severity::Error, SqlState::INSUFFICIENT_PRIVILEGE, "refused", None);
        out.freeze()
    }

    #[test]
    fn swaps_the_marker_error() {
        let mut t = RefusalTracker::new("n0".into());
        let sql = t.inject(ours());
        assert!(sql.starts_with("SELECT \"struere_refused_n0_1\""));
        t.boundary_sent();
        let msg = server_error("42883", "function struere_refused_n0_1() does not exist");
        assert_eq!(t.on_backend(b'E', &msg), BackendAction::Replace(ours()));
        assert_eq!(t.on_backend(b'Z', b"I"), BackendAction::Forward);
        assert!(!t.has_pending());
    }

    #[test]
    fn a_refusal_after_a_sync_the_server_ignored_is_still_swapped() {
        let mut t = RefusalTracker::new("n0".into());
        // COPY … Sync (ignored in copy-in mode), data, CopyDone, Sync; then a refused Parse and
        // its Sync.
        t.boundary_sent();
        t.boundaries_ignored(1);
        t.boundary_sent();
        let _ = t.inject(ours());
        t.boundary_sent();
        assert_eq!(t.on_backend(b'Z', b"I"), BackendAction::Forward);
        assert!(t.has_pending(), "the COPY's ReadyForQuery does not close the refusal's segment");
        let msg = server_error("42883", "function struere_refused_n0_1() does not exist");
        assert_eq!(t.on_backend(b'E', &msg), BackendAction::Replace(ours()));
        assert_eq!(t.on_backend(b'Z', b"I"), BackendAction::Forward);
        assert!(!t.has_pending());
    }

    #[test]
    fn leaves_real_errors_alone_and_expires_skipped_refusals() {
        let mut t = RefusalTracker::new("n0".into());
        // Pipeline: Parse(bad, real error) ; Parse(refused) ; Sync
        let _ = t.inject(ours());
        t.boundary_sent();
        let real = server_error("42P01", "relation \"nope\" does not exist");
        assert_eq!(t.on_backend(b'E', &real), BackendAction::Forward);
        assert!(t.has_pending());
        assert_eq!(t.on_backend(b'Z', b"I"), BackendAction::Forward);
        assert!(!t.has_pending(), "the skipped refusal is forgotten at its segment's end");
    }

    #[test]
    fn refusal_in_a_later_segment_survives_earlier_ready() {
        let mut t = RefusalTracker::new("n0".into());
        t.boundary_sent(); // segment 1 still in flight
        let _ = t.inject(ours()); // injected into segment 2
        t.boundary_sent();
        assert_eq!(t.on_backend(b'Z', b"T"), BackendAction::Forward);
        assert!(t.has_pending());
        let msg = server_error("42883", "function struere_refused_n0_1() does not exist");
        assert_eq!(t.on_backend(b'E', &msg), BackendAction::Replace(ours()));
    }
}
