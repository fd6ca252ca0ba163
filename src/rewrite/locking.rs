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
//! Below the top-level SELECT (a subquery, a CTE, the WHERE of an UPDATE: a job queue's
//! `… WHERE id IN (SELECT id … FOR NO KEY UPDATE SKIP LOCKED)`), the clauses cannot be taken off
//! and put back by position, because the rewrite adds SELECTs around and inside the client's.
//! There each SELECT's list of locking clauses is replaced by a *stand-in* sqlparser reads: the
//! same clauses with `FOR UPDATE` for `FOR NO KEY UPDATE`, `FOR SHARE` for `FOR KEY SHARE`, and
//! one clause per relation for `OF a, b`. sqlparser's way never changes locking clauses (the
//! policy's rule for them, update access to every managed table named, is checked on the
//! client's own tree), so the verified rewrite holds the same stand-in lists; each is replaced by
//! the client's list it stands for. Where two SELECTs' stand-ins are equal, their clients' lists
//! must be equal too, so which SELECT is which never matters; a clause the replacement cannot
//! reach (pg_query's `nodes_mut`, which is not a complete walk) refuses the statement.
//!
//! Invariant: the text forwarded is PostgreSQL's printing of a verified rewrite's tree plus the
//! client's own locking clauses, each on the SELECT whose stand-in the rewrite kept, and nothing
//! else.

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
pub(crate) fn check_names<'a>(locks: impl IntoIterator<Item = &'a Node>) -> Result<(), Refusal> {
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
    let Some(NodeEnum::SelectStmt(mut select)) = classify::parse_alone(rewritten) else { return Err(refused()) };
    if select.op != pb::SetOperation::SetopNone as i32 || !select.locking_clause.is_empty() {
        return Err(refused());
    }
    select.locking_clause = locks;
    Ok(NodeEnum::SelectStmt(select))
}

/// A statement whose SELECTs' locking lists were replaced by stand-ins (see the module docs).
#[derive(Debug)]
pub(crate) struct StandIns {
    /// The client's statement with every SELECT's locking list replaced by its stand-in.
    pub tree: NodeEnum,
    /// For each SELECT with locking clauses: its stand-in list (`pgtree::shape`) and the client's
    /// list.
    lists: Vec<(String, Vec<Node>)>,
}

impl StandIns {
    /// Every locking clause of the client's statement.
    pub(crate) fn clauses(&self) -> impl Iterator<Item = &Node> {
        self.lists.iter().flat_map(|(_, list)| list)
    }
}

/// The client's statement with stand-ins for its locking lists; `None` when this way does not
/// apply (every locking clause is one sqlparser reads, or one is out of the replacement's reach,
/// or two equal stand-ins stand for different clauses).
pub(crate) fn stand_in(node: &NodeEnum) -> Option<StandIns> {
    let (total, unreadable) = clause_count(node)?;
    if !unreadable {
        return None;
    }
    let mut tree = node.clone();
    let mut lists = Vec::new();
    let mut reached = 0usize;
    for_each_locking_list(&mut tree, |list| {
        let client = std::mem::take(list);
        *list = stand_in_list(&client)?;
        reached += client.len();
        lists.push((list_shape(list)?, client));
        Some(())
    })?;
    if reached != total {
        return None;
    }
    // Equal stand-ins must stand for equal lists.
    for (i, (key, list)) in lists.iter().enumerate() {
        for (other_key, other) in lists.iter().skip(i + 1) {
            if key == other_key && list_shape(list) != list_shape(other) {
                return None;
            }
        }
    }
    Some(StandIns { tree, lists })
}

/// PostgreSQL's tree of the verified rewrite `rewritten` of the stand-in statement, with each
/// stand-in list replaced by the client's list it stands for.
pub(crate) fn put_back(rewritten: &str, stand_ins: StandIns, label: &str) -> Result<NodeEnum, Refusal> {
    let refused =
        || Refusal::Unverifiable(format!("refused: the proxy cannot put the locking clauses back on {label}"));
    let mut out = classify::parse_alone(rewritten).ok_or_else(refused)?;
    let (total, _) = clause_count(&out).ok_or_else(refused)?;
    let mut unused: Vec<Option<(String, Vec<Node>)>> = stand_ins.lists.into_iter().map(Some).collect();
    let mut reached = 0usize;
    for_each_locking_list(&mut out, |list| {
        let key = list_shape(list)?;
        let slot = unused.iter_mut().find(|u| u.as_ref().is_some_and(|(k, _)| *k == key))?;
        let (_, client) = slot.take()?;
        reached += list.len();
        *list = client;
        Some(())
    })
    .ok_or_else(refused)?;
    // Every stand-in came back exactly once, and none was out of reach.
    if reached != total || unused.iter().any(Option::is_some) {
        return Err(refused());
    }
    Ok(out)
}

/// The number of locking clauses anywhere in `node` (the complete walk), and whether one of them
/// is one sqlparser cannot read.
fn clause_count(node: &NodeEnum) -> Option<(usize, bool)> {
    let (mut total, mut unreadable) = (0usize, false);
    pgtree::visit(node, &mut |n| {
        if let pg_query::NodeRef::SelectStmt(sel) = n {
            total += sel.locking_clause.len();
            unreadable |= sel.locking_clause.iter().any(|c| !readable(c));
        }
        Ok::<(), ()>(())
    })
    .ok()?;
    Some((total, unreadable))
}

/// Calls `f` on the locking list of every SELECT in `tree` that has one and that pg_query's
/// `nodes_mut` reaches (not every one: callers compare counts with `clause_count`); stops at the
/// first `None`.
fn for_each_locking_list(tree: &mut NodeEnum, mut f: impl FnMut(&mut Vec<Node>) -> Option<()>) -> Option<()> {
    // SAFETY: `nodes_mut` hands out pointers into `tree`, which is not otherwise touched while
    // they are used; `f` replaces only a SELECT's own locking list, and no pointer leads into a
    // locking list (pg_query's walk does not enter them), so none is left dangling.
    for (n, _, _) in unsafe { tree.nodes_mut() } {
        let pg_query::NodeMut::SelectStmt(select) = n else { continue };
        let Some(select) = (unsafe { select.as_mut() }) else { continue };
        if !select.locking_clause.is_empty() {
            f(&mut select.locking_clause)?;
        }
    }
    Some(())
}

/// A locking clause sqlparser reads: `FOR UPDATE` or `FOR SHARE`, of at most one relation.
fn readable(clause: &Node) -> bool {
    use pg_query::protobuf::LockClauseStrength as S;
    match &clause.node {
        Some(NodeEnum::LockingClause(l)) => {
            matches!(S::try_from(l.strength), Ok(S::LcsForupdate | S::LcsForshare)) && l.locked_rels.len() <= 1
        }
        _ => false,
    }
}

/// The stand-in of a SELECT's locking list; `None` for a node that is not a locking clause.
fn stand_in_list(list: &[Node]) -> Option<Vec<Node>> {
    use pg_query::protobuf::LockClauseStrength as S;
    let mut out = Vec::with_capacity(list.len());
    for clause in list {
        let Some(NodeEnum::LockingClause(l)) = &clause.node else { return None };
        let strength = match S::try_from(l.strength).ok()? {
            S::LcsFornokeyupdate | S::LcsForupdate => S::LcsForupdate,
            S::LcsForkeyshare | S::LcsForshare => S::LcsForshare,
            S::LcsNone | S::Undefined => return None,
        } as i32;
        let one = |rels: Vec<Node>| Node {
            node: Some(NodeEnum::LockingClause(pb::LockingClause {
                locked_rels: rels,
                strength,
                wait_policy: l.wait_policy,
            })),
        };
        match l.locked_rels.len() {
            0 | 1 => out.push(one(l.locked_rels.clone())),
            _ => out.extend(l.locked_rels.iter().map(|rel| one(vec![rel.clone()]))),
        }
    }
    Some(out)
}

fn list_shape(list: &[Node]) -> Option<String> {
    pgtree::shape(&NodeEnum::List(pb::List { items: list.to_vec() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rewrite::classify::first_node as node;

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

    fn print(n: &NodeEnum) -> String {
        super::super::deparse(n, "x").unwrap()
    }

    #[test]
    fn stand_ins_replace_every_locking_list_below_the_top() {
        for (sql, printed) in [
            ("SELECT * FROM (SELECT 1 FROM t FOR NO KEY UPDATE) s", "SELECT * FROM (SELECT 1 FROM t FOR UPDATE) s"),
            (
                "WITH c AS (SELECT id FROM t FOR KEY SHARE SKIP LOCKED) SELECT * FROM c FOR UPDATE",
                "WITH c AS (SELECT id FROM t FOR SHARE SKIP LOCKED) SELECT * FROM c FOR UPDATE",
            ),
            (
                "UPDATE t SET a = 1 WHERE id IN (SELECT id FROM t FOR NO KEY UPDATE SKIP LOCKED LIMIT 10)",
                "UPDATE t SET a = 1 WHERE id IN (SELECT id FROM t LIMIT 10 FOR UPDATE SKIP LOCKED)",
            ),
            (
                "SELECT (SELECT 1 FROM t, u FOR KEY SHARE OF t, u NOWAIT) FROM v",
                "SELECT (SELECT 1 FROM t, u FOR SHARE OF t NOWAIT FOR SHARE OF u NOWAIT) FROM v",
            ),
        ] {
            let s = stand_in(&node(sql)).unwrap_or_else(|| panic!("{sql}"));
            assert_eq!(print(&s.tree), printed, "{sql}");
            // The rewrite kept the stand-ins: the client's clauses go back.
            let back = put_back(printed, s, "x").unwrap();
            assert_eq!(pgtree::shape(&back), pgtree::shape(&node(sql)), "{sql}");
        }
        for sql in [
            // Nothing sqlparser cannot read.
            "SELECT * FROM (SELECT 1 FROM t FOR UPDATE) s FOR SHARE",
            // Equal stand-ins for different clauses: which is which would matter.
            "SELECT * FROM (SELECT 1 FROM t FOR NO KEY UPDATE) a, (SELECT 1 FROM t FOR UPDATE) b",
            // Out of the replacement's reach (pg_query's `nodes_mut` does not enter LIMIT).
            "SELECT 1 LIMIT (SELECT 1 FROM t FOR KEY SHARE)",
        ] {
            assert!(stand_in(&node(sql)).is_none(), "{sql}");
        }
        // Equal stand-ins for equal clauses.
        let sql = "SELECT * FROM (SELECT 1 FROM t FOR KEY SHARE) a, (SELECT 1 FROM t FOR KEY SHARE) b";
        assert!(stand_in(&node(sql)).is_some());
    }

    #[test]
    fn clauses_go_back_only_where_the_rewrite_kept_every_stand_in() {
        let sql = "SELECT * FROM (SELECT 1 FROM t FOR NO KEY UPDATE) s, (SELECT 2 FROM u FOR KEY SHARE) v";
        // The rewrite may add SELECTs and change other parts.
        let back = put_back(
            "SELECT * FROM (SELECT 1 FROM (SELECT * FROM t WHERE o = 1) t FOR UPDATE) s, \
             (SELECT 2 FROM u WHERE w FOR SHARE) v WHERE true",
            stand_in(&node(sql)).unwrap(),
            "x",
        )
        .unwrap();
        assert_eq!(
            print(&back),
            "SELECT * FROM (SELECT 1 FROM (SELECT * FROM t WHERE o = 1) t FOR NO KEY UPDATE) s, \
             (SELECT 2 FROM u WHERE w FOR KEY SHARE) v WHERE true"
        );
        for rewritten in [
            // A stand-in lost, added, changed, doubled, or out of reach.
            "SELECT * FROM (SELECT 1 FROM t) s, (SELECT 2 FROM u FOR SHARE) v",
            "SELECT * FROM (SELECT 1 FROM t FOR UPDATE) s, (SELECT 2 FROM u FOR SHARE) v FOR UPDATE",
            "SELECT * FROM (SELECT 1 FROM t FOR UPDATE NOWAIT) s, (SELECT 2 FROM u FOR SHARE) v",
            "SELECT * FROM (SELECT 1 FROM t FOR UPDATE) s, (SELECT 2 FROM u FOR UPDATE) v",
            "SELECT * FROM (SELECT 1 FROM t FOR UPDATE) s, (SELECT 2 FROM u FOR SHARE) v LIMIT (SELECT 1 FOR SHARE)",
            "SELECT 1; SELECT 2",
        ] {
            let e = put_back(rewritten, stand_in(&node(sql)).unwrap(), "x").unwrap_err();
            assert!(matches!(e, Refusal::Unverifiable(_)), "{rewritten}: {e:?}");
        }
    }
}
