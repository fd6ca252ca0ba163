//! Subscripted assignment targets sqlparser cannot read (`UPDATE t SET arr[i] = …`,
//! `SET jb['k'] = …`, `SET a[1:2] = …`, `SET a[i][j] = …`, `SET c[1].f = …`) in a top-level
//! UPDATE or in the `ON CONFLICT … DO UPDATE SET` of a top-level INSERT, with PostgreSQL's tree
//! as the authority:
//!
//! 1. the subscripts (each target's indirection) are taken off PostgreSQL's tree of the client's
//!    statement, leaving whole-column assignments of the same values; what is left is printed by
//!    PostgreSQL's printer and must read back as exactly that tree;
//! 2. that text takes the usual way (sqlparser, gate, policy, printer) and its rewrite is
//!    verified on its own, like any rewrite;
//! 3. each target's subscripts are put back on PostgreSQL's tree of the verified rewrite, on the
//!    top-level target list entry of the same position and column, and only where the rewrite left
//!    that entry's value exactly as the client's (`pgtree::shape`); PostgreSQL's printer prints the
//!    result, and `verify` requires it to read back as exactly that tree (`Form::Deparsed`).
//!
//! The rewrite in step 2 decides on a whole-column assignment, but the statement forwarded
//! assigns only part of the column. That is sound only where no decision reads the column's new
//! value, so before anything else the policy must accept a partial assignment of each such
//! column (`StatementPolicy::check_partial_assignment`: no scope rule, WITH CHECK, tenant
//! predicate or mask reads it). Where the policy rewrites the assignment itself (a write to a
//! managed table computes its values in a subquery), step 3 refuses.
//!
//! The subscripts are not part of the text the policy sees in step 2, so they may hold only
//! constants, parameters and casts of them to plainly named types: nothing that reads a row, a
//! relation or calls a function (a subquery in an index could copy another table's rows into the
//! updated one). Field names must not use the proxy's reserved prefix.
//!
//! Invariant: the text forwarded is PostgreSQL's printing of a verified rewrite's tree plus the
//! client's own subscripts (constants and parameters only) on assignments whose values the
//! rewrite left as the client wrote them, to columns no decision of the policy reads; anything
//! else is refused.

use pg_query::NodeEnum;
use pg_query::protobuf::{self as pb, Node};

use super::Refusal;
use super::classify;
use super::engine::walk::RESERVED_PREFIX;
use super::pgtree;

/// A top-level UPDATE, or INSERT … ON CONFLICT DO UPDATE, with its subscripts taken off.
#[derive(Debug)]
pub(crate) struct Split {
    /// The client's statement with whole-column assignments.
    pub bare: NodeEnum,
    /// PostgreSQL's name of the statement's kind (`UpdateStmt`, `InsertStmt`).
    pub kind: &'static str,
    /// The target relation as the client named it (catalog, schema, relation; the parts given).
    pub relation: Vec<String>,
    /// The assignments that were subscripted.
    pub targets: Vec<Subscripted>,
}

/// One subscripted assignment of the client's target list.
#[derive(Debug)]
pub(crate) struct Subscripted {
    /// Position in the target list.
    position: usize,
    /// The column assigned in part.
    pub column: String,
    /// The client's subscripts and field selections, in order.
    indirection: Vec<Node>,
    /// `pgtree::shape` of the assigned value (`None`: no value, which PostgreSQL never produces).
    value: Option<String>,
}

/// The client's top-level UPDATE (or INSERT … ON CONFLICT DO UPDATE) without subscripts;
/// `None` when this way does not apply (another statement, no subscripted target at its top
/// level, or an INSERT whose column list is subscripted).
pub(crate) fn split(node: &NodeEnum) -> Option<Split> {
    if let NodeEnum::InsertStmt(insert) = node
        && insert.cols.iter().any(|c| matches!(&c.node, Some(NodeEnum::ResTarget(r)) if !r.indirection.is_empty()))
    {
        return None;
    }
    let mut bare = node.clone();
    let kind = match &bare {
        NodeEnum::UpdateStmt(_) => "UpdateStmt",
        NodeEnum::InsertStmt(_) => "InsertStmt",
        _ => return None,
    };
    let mut targets = Vec::new();
    for (position, item) in assignments_mut(&mut bare)?.iter_mut().enumerate() {
        let Some(NodeEnum::ResTarget(target)) = item.node.as_mut() else { continue };
        if target.indirection.is_empty() {
            continue;
        }
        let value = target.val.as_deref().and_then(|v| v.node.as_ref()).and_then(pgtree::shape);
        targets.push(Subscripted {
            position,
            column: target.name.clone(),
            indirection: std::mem::take(&mut target.indirection),
            value,
        });
    }
    if targets.is_empty() {
        return None;
    }
    let relation = target_relation(node)
        .map(|r| [&r.catalogname, &r.schemaname, &r.relname].into_iter().filter(|p| !p.is_empty()).cloned().collect())
        .unwrap_or_default();
    Some(Split { bare, kind, relation, targets })
}

/// The assignments of a statement: an UPDATE's SET list, an INSERT's `ON CONFLICT … DO UPDATE
/// SET` list (empty for `DO NOTHING` or no ON CONFLICT).
fn assignments_mut(node: &mut NodeEnum) -> Option<&mut Vec<Node>> {
    match node {
        NodeEnum::UpdateStmt(u) => Some(&mut u.target_list),
        NodeEnum::InsertStmt(i) => Some(match i.on_conflict_clause.as_deref_mut() {
            Some(c) => &mut c.target_list,
            None => return None,
        }),
        _ => None,
    }
}

/// The relation a statement writes to.
fn target_relation(node: &NodeEnum) -> Option<&pb::RangeVar> {
    match node {
        NodeEnum::UpdateStmt(u) => u.relation.as_ref(),
        NodeEnum::InsertStmt(i) => i.relation.as_ref(),
        _ => None,
    }
}

/// The subscripts hold only constants, parameters and casts of them; field names are plain.
pub(crate) fn check(split: &Split) -> Result<(), Refusal> {
    for target in &split.targets {
        let column = &target.column;
        for item in &target.indirection {
            match &item.node {
                Some(NodeEnum::AIndices(ix)) => {
                    let bounds = [ix.lidx.as_deref(), ix.uidx.as_deref()];
                    if !bounds.into_iter().flatten().all(constant) {
                        return Err(Refusal::Denied(format!(
                            "refused: the subscript of {column}[…] may only be a constant, a parameter or a cast of \
                             one (the proxy does not rewrite subscripts, so they may not read rows or call functions)"
                        )));
                    }
                }
                Some(NodeEnum::String(field)) => {
                    if field.sval.to_ascii_lowercase().starts_with(RESERVED_PREFIX) {
                        return Err(Refusal::Denied(format!(
                            "refused: names starting with {RESERVED_PREFIX} are reserved by the proxy"
                        )));
                    }
                }
                _ => {
                    return Err(Refusal::Denied(format!(
                        "refused: an assignment to {column} through an indirection the proxy does not know \
                         (only subscripts col[i], slices col[i:j] and field names col.f)"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// A constant, a parameter, or a cast of one to a plainly named type.
fn constant(node: &Node) -> bool {
    match &node.node {
        Some(NodeEnum::AConst(_) | NodeEnum::ParamRef(_)) => true,
        Some(NodeEnum::TypeCast(cast)) => {
            cast.arg.as_deref().is_some_and(constant) && cast.type_name.as_ref().is_some_and(plain_type)
        }
        _ => false,
    }
}

/// A type named unqualified (found through the pinned search_path) or in `pg_catalog`, with
/// constant modifiers.
fn plain_type(t: &pb::TypeName) -> bool {
    let names: Vec<&str> = t
        .names
        .iter()
        .map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<_>>()
        .unwrap_or_default();
    let named = matches!(names.as_slice(), [_] | ["pg_catalog", _]);
    let modifiers = t.typmods.iter().all(|m| matches!(m.node, Some(NodeEnum::AConst(_))));
    named && modifiers && !t.setof && !t.pct_type
}

/// PostgreSQL's tree of the verified rewrite `rewritten` (one UPDATE, or INSERT … ON CONFLICT DO
/// UPDATE, without subscripts), with the client's subscripts put back on the assignments they
/// came from.
pub(crate) fn reattach(rewritten: &str, split: Split, label: &str) -> Result<NodeEnum, Refusal> {
    let refused = || Refusal::Unverifiable(format!("refused: the proxy cannot put the subscripts back on {label}"));
    let mut out = classify::parse_alone(rewritten).ok_or_else(refused)?;
    let mut bare = split.bare;
    // The same statement kind and target relation, as the client named it (a write to a
    // managed table is rebuilt around the real table under the proxy's alias).
    let relation =
        |n: &NodeEnum| target_relation(n).map(|r| NodeEnum::RangeVar(r.clone())).and_then(|r| pgtree::shape(&r));
    let same_kind = std::mem::discriminant(&out) == std::mem::discriminant(&bare);
    let counts = (assignments_mut(&mut out).map(|a| a.len()), assignments_mut(&mut bare).map(|a| a.len()));
    if !same_kind
        || relation(&out).is_none()
        || relation(&out) != relation(&bare)
        || counts.0.is_none()
        || counts.0 != counts.1
    {
        return Err(Refusal::Unverifiable(format!(
            "refused: the proxy rewrote the target of {label} (as it does for writes to managed tables), so it cannot \
             put the subscripts back: assignments to an element or a field are supported where the target and the \
             value are forwarded as written, as on the tenant's own tables; assign the whole column instead"
        )));
    }
    let assignments = assignments_mut(&mut out).ok_or_else(refused)?;
    for target in split.targets {
        let column = target.column;
        let entry = assignments.get_mut(target.position).and_then(|n| match n.node.as_mut() {
            Some(NodeEnum::ResTarget(r)) => Some(r),
            _ => None,
        });
        let Some(entry) = entry else { return Err(refused()) };
        let value = entry.val.as_deref().and_then(|v| v.node.as_ref()).and_then(pgtree::shape);
        if entry.name != column || !entry.indirection.is_empty() || value.is_none() || value != target.value {
            return Err(Refusal::Unverifiable(format!(
                "refused: the proxy rewrote the value assigned to {column} in {label}, so it cannot put the \
                 subscripts back; assign the whole column instead"
            )));
        }
        entry.indirection = target.indirection;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rewrite::classify::first_node as node;

    fn shape(sql: &str) -> Option<String> {
        pgtree::shape(&node(sql))
    }

    fn print(n: &NodeEnum) -> String {
        super::super::deparse(n, "x").unwrap()
    }

    #[test]
    fn applies_to_subscripted_targets_of_a_top_level_update_or_on_conflict_only() {
        for sql in [
            "UPDATE t SET a = 1",
            "SELECT a[1] FROM t",
            "INSERT INTO t (a[1]) VALUES (1)",
            "INSERT INTO t (a[1]) VALUES (1) ON CONFLICT (id) DO UPDATE SET a[1] = 2",
            "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = 2",
            "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING",
            "WITH u AS (UPDATE t SET a[1] = 2 RETURNING id) SELECT * FROM u",
            "DELETE FROM t WHERE a[1] = 2",
            "UPDATE t SET a = b[1] WHERE (c)[2] = 3",
        ] {
            assert!(split(&node(sql)).is_none(), "{sql}");
        }
        let s =
            split(&node("UPDATE ONLY s.t AS x SET b = 1, a[1] = 2, c.f = 3, d[1:2][3] = '{}' WHERE id = 1")).unwrap();
        assert_eq!(s.relation, ["s", "t"]);
        let columns: Vec<(&str, usize)> = s.targets.iter().map(|t| (t.column.as_str(), t.position)).collect();
        assert_eq!(columns, [("a", 1), ("c", 2), ("d", 3)]);
        assert_eq!(print(&s.bare), "UPDATE ONLY s.t x SET b = 1, a = 2, c = 3, d = '{}' WHERE id = 1");
        check(&s).unwrap();
        let s = split(&node("INSERT INTO s.t AS x (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET b = 1, a[1] = 2"))
            .unwrap();
        assert_eq!((s.kind, s.relation.as_slice()), ("InsertStmt", &["s".to_owned(), "t".to_owned()][..]));
        assert_eq!(s.targets.iter().map(|t| (t.column.as_str(), t.position)).collect::<Vec<_>>(), [("a", 1)]);
        assert_eq!(print(&s.bare), "INSERT INTO s.t AS x (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET b = 1, a = 2");
    }

    #[test]
    fn reattaches_on_conflict_assignments_of_the_same_insert() {
        let sql = "INSERT INTO t (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET a[1] = excluded.id, b = 2";
        let bare = "INSERT INTO t (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET a = excluded.id, b = 2";
        let back = reattach(bare, split(&node(sql)).unwrap(), "x").unwrap();
        assert_eq!(pgtree::shape(&back), shape(sql));
        for rewritten in [
            "INSERT INTO t (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET a = excluded.id + 1, b = 2",
            "INSERT INTO u (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET a = excluded.id, b = 2",
            "INSERT INTO t (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
            "INSERT INTO t (id) VALUES ($1)",
            "UPDATE t SET a = excluded.id, b = 2",
        ] {
            let e = reattach(rewritten, split(&node(sql)).unwrap(), "x").unwrap_err();
            assert!(matches!(e, Refusal::Unverifiable(_)), "{rewritten}: {e:?}");
        }
    }

    #[test]
    fn subscripts_are_constants_parameters_and_casts() {
        for sql in [
            "UPDATE t SET a[1] = 1",
            "UPDATE t SET a[-1][2] = 1",
            "UPDATE t SET a[$1::integer] = $2::integer",
            "UPDATE t SET a[$1::pg_catalog.int8] = 1",
            "UPDATE t SET j['k'] = '1'",
            "UPDATE t SET j['k']['l'] = $1::jsonb",
            "UPDATE t SET j[$1::varchar(10)] = '1'",
            "UPDATE t SET a[:2] = '{}', b[2:] = '{}', c[:] = '{}'",
            "UPDATE t SET a[1:$1] = '{}'",
            "UPDATE t SET c[1].f = 1",
            "UPDATE t SET a[NULL] = 1",
            "UPDATE t SET a['1'::text::int] = 1",
        ] {
            check(&split(&node(sql)).unwrap()).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        for sql in [
            "UPDATE t SET a[(SELECT max(x) FROM u)] = 1",
            "UPDATE t SET a[b] = 1",
            "UPDATE t SET a[t.b] = 1",
            "UPDATE t SET a[1 + 1] = 1",
            "UPDATE t SET a[length('x')] = 1",
            "UPDATE t SET a[$1::other.int] = 1",
            "UPDATE t SET a[1:(SELECT 1)] = 1",
            "UPDATE t SET a[1::setof int] = 1",
            "UPDATE t SET a['x' COLLATE \"C\"] = 1",
            "UPDATE t SET a[1][b] = 1",
            "UPDATE t SET c[1].__struere_raw_x = 1",
            "UPDATE t SET c[1].\"__STRUERE_x\" = 1",
        ] {
            let Ok(statements) = classify::parse(sql) else { continue };
            let e = check(&split(&statements[0].node).unwrap()).unwrap_err();
            assert!(matches!(e, Refusal::Denied(_)), "{sql}: {e:?}");
        }
    }

    #[test]
    fn reattaches_only_on_the_same_entry_with_the_same_value() {
        let sql = "UPDATE t SET a[$1::int] = $2::int, b = 1, c['k'][2] = '{}'::jsonb WHERE id = 3";
        let s = split(&node(sql)).unwrap();
        assert_eq!(print(&s.bare), "UPDATE t SET a = $2::int, b = 1, c = '{}'::jsonb WHERE id = 3");
        // The rewrite may change the rest of the statement (here: its WHERE and another value).
        let back = reattach("UPDATE t SET a = $2::int, b = 2, c = '{}'::jsonb WHERE id = 4", s, "x").unwrap();
        assert_eq!(
            pgtree::shape(&back),
            shape("UPDATE t SET a[$1::int] = $2::int, b = 2, c['k'][2] = '{}'::jsonb WHERE id = 4")
        );
        assert_eq!(print(&back), "UPDATE t SET a[$1::int] = $2::int, b = 2, c['k'][2] = '{}'::jsonb WHERE id = 4");
        for rewritten in [
            // The value changed.
            "UPDATE t SET a = $2::int8, b = 1, c = '{}'::jsonb WHERE id = 3",
            "UPDATE t SET a = $2::int, b = 1, c = '{}' WHERE id = 3",
            // Another column, another position, another count.
            "UPDATE t SET x = $2::int, b = 1, c = '{}'::jsonb WHERE id = 3",
            "UPDATE t SET b = 1, a = $2::int, c = '{}'::jsonb WHERE id = 3",
            "UPDATE t SET a = $2::int, b = 1 WHERE id = 3",
            "UPDATE t SET a = $2::int, b = 1, c = '{}'::jsonb, d = 1 WHERE id = 3",
            // Already subscripted, another target, another statement.
            "UPDATE t SET a[1] = $2::int, b = 1, c = '{}'::jsonb WHERE id = 3",
            "UPDATE u SET a = $2::int, b = 1, c = '{}'::jsonb WHERE id = 3",
            "UPDATE t AS x SET a = $2::int, b = 1, c = '{}'::jsonb WHERE id = 3",
            "UPDATE s.t SET a = $2::int, b = 1, c = '{}'::jsonb WHERE id = 3",
            "DELETE FROM t WHERE id = 3",
            "UPDATE t SET a = $2::int, b = 1, c = '{}'::jsonb; SELECT 1",
        ] {
            let s = split(&node(sql)).unwrap();
            let e = reattach(rewritten, s, "x").unwrap_err();
            assert!(matches!(e, Refusal::Unverifiable(_)), "{rewritten}: {e:?}");
        }
    }

    #[test]
    fn several_targets_of_one_column_and_tuple_assignments() {
        let sql = "UPDATE t SET a[1] = 1, a[2] = 2, (b[1], c) = (3, 4)";
        let s = split(&node(sql)).unwrap();
        let bare = print(&s.bare);
        assert_eq!(bare, "UPDATE t SET a = 1, a = 2, (b, c) = (3, 4)");
        let back = reattach(&bare, s, "x").unwrap();
        assert_eq!(pgtree::shape(&back), shape(sql));
        // A tuple's value is the whole row: any change to it refuses.
        let s = split(&node(sql)).unwrap();
        assert!(reattach("UPDATE t SET a = 1, a = 2, (b, c) = (3, 5)", s, "x").is_err());
    }
}
