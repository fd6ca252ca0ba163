//! Named statements the proxy keeps on a session's upstream connection, so that PostgreSQL
//! parses and plans a repeated rewritten statement once instead of on every execution.
//!
//! * Simple Query texts whose rewrite has a parameterised form (`rewrite::Bound`: literal
//!   values as typed parameters) are sent as Parse (first time only) + Bind + Describe portal +
//!   Execute + Sync. The server's ParseComplete, BindComplete, CloseComplete and NoData for those
//!   messages are the proxy's own and never reach the client (`Synthetic`); everything else —
//!   RowDescription, DataRow, CommandComplete, ErrorResponse, ReadyForQuery — is what the simple
//!   Query would have produced.
//! * A client's unnamed Parse of a statement prepared before becomes a Parse of the empty
//!   string (which still answers ParseComplete), and its Bind / Describe of the unnamed
//!   statement name the prepared one.
//!
//! Names carry the reserved prefix (`__struere`), which clients may not use, so a client can
//! neither reach nor replace them. A statement whose round trip reported an error is not trusted
//! again: the next use closes it and prepares a fresh name. The map lives as long as the session;
//! a pooled connection is reset with DISCARD ALL before anyone else gets it, and a client's own
//! DISCARD / DEALLOCATE empties the map.

use std::collections::HashMap;
use std::sync::Arc;

/// Statement names start with this (the rewriter's reserved prefix).
pub const NAME_PREFIX: &str = "__struere_s";

/// At most this many statements per upstream connection (each holds a plan in the backend).
const MAX_STATEMENTS: usize = 64;
/// At most this many statements prepared in one session in all: a client's DISCARD empties the
/// map even when it fails (in a transaction block), so the per-connection bound alone could be
/// walked around by a client repeating failed DISCARDs.
const MAX_PREPARED_PER_SESSION: u64 = 1024;

/// The statement kinds worth preparing (a plan to reuse; no catalog change).
pub fn preparable(kinds: &[String]) -> bool {
    matches!(kinds, [k] if matches!(k.as_str(), "SelectStmt" | "InsertStmt" | "UpdateStmt" | "DeleteStmt"))
}

/// Whether a client's statement drops the connection's prepared statements.
pub fn forgets_statements(kinds: &[String]) -> bool {
    kinds.iter().any(|k| k == "DiscardStmt" || k == "DeallocateStmt")
}

/// Whether a client names a statement or portal the proxy reserves.
pub fn is_reserved(name: &str) -> bool {
    name.get(..crate::rewrite::engine::walk::RESERVED_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(crate::rewrite::engine::walk::RESERVED_PREFIX))
}

#[derive(Debug)]
struct Entry {
    types: Arc<[u32]>,
    name: Arc<str>,
    /// False once a round trip using it reported an error.
    trusted: bool,
}

/// What to send for a statement text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Use {
    /// Prepared before on this connection: bind it.
    Existing(Arc<str>),
    /// Parse it under `name` first (after closing `close`, a distrusted earlier name).
    Prepare { name: Arc<str>, close: Option<Arc<str>> },
}

impl Use {
    pub fn name(&self) -> &Arc<str> {
        match self {
            Use::Existing(n) | Use::Prepare { name: n, .. } => n,
        }
    }
}

/// The named statements of one upstream connection, by rewritten text and parameter types.
#[derive(Debug, Default)]
pub struct UpstreamStatements {
    by_text: HashMap<Arc<str>, Vec<Entry>, crate::TextHasher>,
    count: usize,
    next: u64,
}

impl UpstreamStatements {
    /// How to run `sql` with `types` as a named statement; `None` when the connection holds as
    /// many as it may (the statement then goes as it is).
    pub fn use_for(&mut self, sql: &str, types: &[u32]) -> Option<Use> {
        if let Some(entry) = self.by_text.get_mut(sql).and_then(|v| v.iter_mut().find(|e| *e.types == *types)) {
            if entry.trusted {
                return Some(Use::Existing(Arc::clone(&entry.name)));
            }
            let close = std::mem::replace(&mut entry.name, fresh_name(&mut self.next));
            entry.trusted = true;
            return Some(Use::Prepare { name: Arc::clone(&entry.name), close: Some(close) });
        }
        if self.count >= MAX_STATEMENTS || self.next >= MAX_PREPARED_PER_SESSION {
            return None;
        }
        let name = fresh_name(&mut self.next);
        self.by_text.entry(Arc::from(sql)).or_default().push(Entry {
            types: Arc::from(types),
            name: Arc::clone(&name),
            trusted: true,
        });
        self.count += 1;
        Some(Use::Prepare { name, close: None })
    }

    /// A round trip that used these names reported an error: prepare them afresh next time
    /// (the statement may not exist, or its plan may no longer fit the tables).
    pub fn distrust(&mut self, names: &[Arc<str>]) {
        for entry in self.by_text.values_mut().flatten() {
            if names.contains(&entry.name) {
                entry.trusted = false;
            }
        }
    }

    /// The connection's statements are gone (DISCARD ALL, DEALLOCATE).
    pub fn clear(&mut self) {
        self.by_text.clear();
        self.count = 0;
    }
}

fn fresh_name(next: &mut u64) -> Arc<str> {
    *next += 1;
    Arc::from(format!("{NAME_PREFIX}{next}"))
}

/// The server's answers to messages the proxy added in one round trip (up to a ReadyForQuery),
/// which the client did not send and must not see. These messages have no body, so which of
/// several equal ones is dropped makes no difference to the client.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Synthetic {
    pub parse_complete: u32,
    pub bind_complete: u32,
    pub close_complete: u32,
    pub no_data: u32,
    /// Statement names this round trip used (distrusted if it reports an error).
    pub names: Vec<Arc<str>>,
}

impl Synthetic {
    /// Take on the answers still owed for `other`, a round trip merged into this one.
    pub fn absorb(&mut self, other: Synthetic) {
        self.parse_complete += other.parse_complete;
        self.bind_complete += other.bind_complete;
        self.close_complete += other.close_complete;
        self.no_data += other.no_data;
        self.names.extend(other.names);
    }

    /// Whether the backend message with this tag is one of the proxy's own (and consume it).
    pub fn swallow(&mut self, tag: u8) -> bool {
        let counter = match tag {
            b'1' => &mut self.parse_complete,
            b'2' => &mut self.bind_complete,
            b'3' => &mut self.close_complete,
            b'n' => &mut self.no_data,
            _ => return false,
        };
        if *counter == 0 {
            return false;
        }
        *counter -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_is_prepared_once_and_then_bound() {
        let mut s = UpstreamStatements::default();
        let first = s.use_for("SELECT $1", &[23]).unwrap();
        let Use::Prepare { name, close: None } = &first else { panic!("{first:?}") };
        assert!(name.starts_with(NAME_PREFIX) && is_reserved(name));
        assert_eq!(s.use_for("SELECT $1", &[23]), Some(Use::Existing(Arc::clone(name))));
        // Other parameter types or text: another statement.
        let other = s.use_for("SELECT $1", &[0]).unwrap();
        assert!(matches!(&other, Use::Prepare { name: n, close: None } if n != name));
        assert!(matches!(s.use_for("SELECT $1 + 1", &[23]), Some(Use::Prepare { .. })));
    }

    #[test]
    fn a_distrusted_statement_is_closed_and_prepared_under_a_new_name() {
        let mut s = UpstreamStatements::default();
        let name = s.use_for("SELECT $1", &[23]).unwrap().name().clone();
        s.distrust(std::slice::from_ref(&name));
        let again = s.use_for("SELECT $1", &[23]).unwrap();
        let Use::Prepare { name: fresh, close: Some(closed) } = &again else { panic!("{again:?}") };
        assert_eq!(closed, &name);
        assert_ne!(fresh, &name);
        assert_eq!(s.use_for("SELECT $1", &[23]), Some(Use::Existing(Arc::clone(fresh))));
    }

    #[test]
    fn the_connection_holds_a_bounded_number_and_clear_forgets_them() {
        let mut s = UpstreamStatements::default();
        for i in 0..MAX_STATEMENTS {
            assert!(s.use_for(&format!("SELECT {i}"), &[]).is_some());
        }
        assert_eq!(s.use_for("SELECT 'one more'", &[]), None);
        assert!(matches!(s.use_for("SELECT 0", &[]), Some(Use::Existing(_))), "known texts still bind");
        s.clear();
        assert!(matches!(s.use_for("SELECT 0", &[]), Some(Use::Prepare { close: None, .. })));
        // However often the map is emptied, a session prepares a bounded number in all.
        let mut prepared = 0;
        for round in 0..40 {
            s.clear();
            for i in 0..MAX_STATEMENTS {
                prepared += u64::from(s.use_for(&format!("SELECT {round}, {i}"), &[]).is_some());
            }
        }
        assert!(prepared < MAX_PREPARED_PER_SESSION, "{prepared}");
    }

    #[test]
    fn only_the_proxys_own_answers_are_swallowed() {
        let mut syn = Synthetic { parse_complete: 1, bind_complete: 1, no_data: 1, ..Synthetic::default() };
        assert!(syn.swallow(b'1') && !syn.swallow(b'1'));
        assert!(syn.swallow(b'2') && !syn.swallow(b'2'));
        assert!(!syn.swallow(b'3'));
        assert!(syn.swallow(b'n') && !syn.swallow(b'n'));
        for tag in [b'T', b'D', b'C', b'E', b'Z', b'N', b'A', b'S'] {
            assert!(!syn.swallow(tag));
        }
    }

    #[test]
    fn kinds_and_names() {
        let k = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(preparable(&k(&["SelectStmt"])) && preparable(&k(&["UpdateStmt"])));
        assert!(!preparable(&k(&["SelectStmt", "SelectStmt"])) && !preparable(&k(&["CreateStmt"])));
        assert!(forgets_statements(&k(&["DiscardStmt"])) && forgets_statements(&k(&["DeallocateStmt"])));
        assert!(is_reserved("__STRUERE_s1") && is_reserved("__struere") && !is_reserved("__s") && !is_reserved(""));
    }
}
