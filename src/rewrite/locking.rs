//! Locking clauses sqlparser cannot read (`FOR NO KEY UPDATE`, `FOR KEY SHARE`, `FOR UPDATE OF
//! a, b`) on a top-level SELECT, with PostgreSQL's tree as the authority:
//!
//! 1. the locking clauses are taken off PostgreSQL's tree of the client's statement; what is left
//!    is printed by PostgreSQL's printer and must read back as exactly that tree;
//! 2. that text takes the usual way (sqlparser, gate, policy, printer) and its rewrite is verified
//!    on its own, like any rewrite;
//! 3. the client's locking clauses are put back on PostgreSQL's tree of the verified rewrite,
//!    which PostgreSQL's printer prints; `verify` then requires that text to read back as exactly
//!    that tree (`Form::Deparsed`), and runs the output checks on it.
//!
//! A locking clause names only FROM items of its own SELECT, whose names the rewrite keeps (a
//! secure relation is aliased with the client's alias or the table's name), and it locks only
//! rows the SELECT returns: the same as `FOR UPDATE [OF t]`, which sqlparser reads.
//!
//! Invariant: the text forwarded is PostgreSQL's printing of a verified rewrite's tree plus the
//! client's own locking clauses, and nothing else; a locking clause anywhere but on the
//! top-level SELECT is refused.

use pg_query::NodeEnum;
use pg_query::protobuf::{self as pb, Node};

use super::Refusal;
use super::classify;
use super::engine::walk::RESERVED_PREFIX;
use super::pgtree;

/// The client's top-level SELECT without its locking clauses, and the clauses; `None` when
/// this way does not apply (not a plain SELECT, no locking clause, or one nested elsewhere).
pub(crate) fn split(node: &NodeEnum) -> Option<(NodeEnum, Vec<Node>)> {
    let NodeEnum::SelectStmt(select) = node else { return None };
    if select.locking_clause.is_empty() || select.op != pb::SetOperation::SetopNone as i32 {
        return None;
    }
    let mut bare = select.clone();
    let locks = std::mem::take(&mut bare.locking_clause);
    let bare = NodeEnum::SelectStmt(bare);
    // Any other locking clause (a subquery's, a CTE's) stays refused.
    if pgtree::contains_node(&bare, "LockingClause") {
        return None;
    }
    Some((bare, locks))
}

/// The relations a locking clause names are FROM items of the client's own SELECT: plain
/// names, never the proxy's reserved ones (its secure relations' inner aliases).
pub(crate) fn check_names(locks: &[Node]) -> Result<(), Refusal> {
    for lock in locks {
        let Some(NodeEnum::LockingClause(l)) = &lock.node else {
            return Err(Refusal::Unverifiable("refused: a locking clause the proxy does not know".to_owned()));
        };
        for rel in &l.locked_rels {
            let Some(NodeEnum::RangeVar(rv)) = &rel.node else {
                return Err(Refusal::Denied("refused: a locking clause may only name relations".to_owned()));
            };
            let parts = [&rv.catalogname, &rv.schemaname, &rv.relname];
            if parts.iter().any(|p| p.to_ascii_lowercase().starts_with(RESERVED_PREFIX)) {
                return Err(Refusal::Denied(format!(
                    "refused: names starting with {RESERVED_PREFIX} are reserved by the proxy"
                )));
            }
        }
    }
    Ok(())
}

/// PostgreSQL's tree of the verified rewrite `rewritten` (one SELECT without locking clauses),
/// with the client's `locks` put back on it.
pub(crate) fn reattach(rewritten: &str, locks: Vec<Node>, label: &str) -> Result<NodeEnum, Refusal> {
    let refused = || Refusal::Unverifiable(format!("refused: the proxy cannot put the locking clause back on {label}"));
    let mut statements = classify::parse(rewritten).map_err(|_| refused())?;
    let (Some(statement), true) = (statements.pop(), statements.is_empty()) else { return Err(refused()) };
    let NodeEnum::SelectStmt(mut select) = statement.node else { return Err(refused()) };
    if select.op != pb::SetOperation::SetopNone as i32 || !select.locking_clause.is_empty() {
        return Err(refused());
    }
    select.locking_clause = locks;
    Ok(NodeEnum::SelectStmt(select))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(sql: &str) -> NodeEnum {
        classify::parse(sql).unwrap().remove(0).node
    }

    #[test]
    fn applies_to_a_top_level_select_only() {
        assert!(split(&node("SELECT 1 FROM t FOR NO KEY UPDATE")).is_some());
        assert!(split(&node("SELECT 1 FROM t, u FOR UPDATE OF t, u FOR KEY SHARE OF u")).is_some());
        for sql in [
            "SELECT 1 FROM t",
            "SELECT 1 FROM (SELECT 1 FROM t FOR NO KEY UPDATE) s FOR UPDATE",
            "WITH c AS (SELECT 1 FROM t FOR KEY SHARE) SELECT 1 FROM c FOR UPDATE",
            "SELECT (SELECT 1 FROM t FOR UPDATE OF t) FROM u FOR UPDATE OF u, u",
            "(SELECT 1 FROM t) UNION (SELECT 1 FROM u) FOR UPDATE",
            "INSERT INTO t SELECT 1 FROM u FOR UPDATE",
        ] {
            assert!(split(&node(sql)).is_none(), "{sql}");
        }
        // A string that spells a node name is only a string.
        assert!(split(&node("SELECT 'LockingClause{' FROM t FOR NO KEY UPDATE")).is_some());
        let (bare, locks) = split(&node("SELECT a FROM t WHERE a = 1 FOR NO KEY UPDATE OF t SKIP LOCKED")).unwrap();
        assert_eq!(super::super::print_exactly(&bare, "x").unwrap(), "SELECT a FROM t WHERE a = 1");
        let back = reattach("SELECT a FROM t WHERE a = 1", locks, "x").unwrap();
        assert_eq!(
            pgtree::shape(&back),
            pgtree::shape(&node("select a from t where a = 1 for no key update of t skip locked"))
        );
        assert!(reattach("SELECT 1 FOR UPDATE", vec![], "x").is_err());
        assert!(reattach("SELECT 1; SELECT 2", vec![], "x").is_err());
    }
}
