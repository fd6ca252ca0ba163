//! `COPY t [(cols)] FROM STDIN [options] WHERE condition` (asyncpg's `copy_records_to_table(…,
//! where=…)`), which sqlparser cannot read, with PostgreSQL's tree as the authority:
//!
//! 1. the condition is taken off PostgreSQL's tree of the client's COPY; the COPY without it
//!    takes the usual way (sqlparser, gate, policy: only to or from the client, and into a table
//!    COPY FROM may write, never a managed one) and its rewrite is verified on its own;
//! 2. the condition is the one thing left: it runs once per incoming row on the server, over the
//!    target's columns, so it must pass every rule any expression of the caller passes. It takes
//!    the usual way as the WHERE of `SELECT 1 FROM t WHERE condition` over the same target (the
//!    function allowlist, the walk's relation rules, the printer, the verifier), whose rewrite
//!    must read back as exactly that SELECT: the policy had nothing to change in it;
//! 3. the condition is put back on PostgreSQL's tree of the verified COPY, which must be exactly
//!    the client's COPY without its condition, and PostgreSQL's printer prints the whole;
//!    `verify` then requires that text to read back as exactly that tree (`Form::Deparsed`, which
//!    is the client's tree) and runs the output checks on it.
//!
//! The target is a table the caller may write with COPY (a scratch table: COPY into a managed
//! table is refused, since the proxy cannot check each row there), so the condition sees only the
//! rows the client itself sends. PostgreSQL refuses subqueries, aggregates, window and
//! set-returning functions in it on its own.
//!
//! Invariant: the text forwarded is PostgreSQL's printing of the client's own COPY, and that only
//! when its COPY without the condition and its condition in a SELECT over the same table were both
//! verified unchanged by the usual way; anything else stays refused.

use pg_query::NodeEnum;
use pg_query::protobuf::Node;

use super::{Refusal, classify, pgtree};

/// The client's COPY taken apart (`split`).
#[derive(Debug)]
pub(crate) struct Split {
    /// The client's COPY without its WHERE.
    pub bare: NodeEnum,
    /// `SELECT 1 FROM <target> WHERE <condition>`: the condition over the target's rows.
    pub probe: NodeEnum,
}

/// `None` when this way does not apply: not a `COPY … FROM STDIN … WHERE` into a named table.
pub(crate) fn split(node: &NodeEnum) -> Option<Split> {
    let NodeEnum::CopyStmt(copy) = node else { return None };
    if !copy.is_from || copy.is_program || !copy.filename.is_empty() || copy.query.is_some() {
        return None;
    }
    let relation = copy.relation.clone()?;
    let condition = copy.where_clause.clone()?;
    let mut bare = copy.clone();
    bare.where_clause = None;
    let NodeEnum::SelectStmt(mut probe) = classify::parse_alone("SELECT 1 FROM t WHERE true")? else { return None };
    probe.from_clause = vec![Node { node: Some(NodeEnum::RangeVar(relation)) }];
    probe.where_clause = Some(condition);
    Some(Split { bare: NodeEnum::CopyStmt(bare), probe: NodeEnum::SelectStmt(probe) })
}

/// PostgreSQL's tree of the verified COPY `copied` with the condition of the verified SELECT
/// `probed` put back; refused unless both read as exactly what `split` made of the client's
/// statement (so the result is the client's own COPY).
pub(crate) fn reattach(copied: &str, probed: &str, split: &Split, label: &str) -> Result<NodeEnum, Refusal> {
    let refused = || Refusal::Unverifiable(format!("refused: the proxy cannot put the WHERE back on {label} (COPY)"));
    let changed = || {
        Refusal::Denied(format!(
            "refused: the WHERE of {label} (COPY … FROM STDIN … WHERE) would need the proxy's rewriting, which it \
             cannot apply to a COPY condition"
        ))
    };
    let same = |text: &str, want: &NodeEnum| -> Result<NodeEnum, Refusal> {
        let got = classify::parse_alone(text).ok_or_else(refused)?;
        match (pgtree::shape(&got), pgtree::shape(want)) {
            (Some(a), Some(b)) if a == b => Ok(got),
            (Some(_), Some(_)) => Err(changed()),
            _ => Err(refused()),
        }
    };
    let NodeEnum::SelectStmt(select) = same(probed, &split.probe)? else { return Err(refused()) };
    let NodeEnum::CopyStmt(mut copy) = same(copied, &split.bare)? else { return Err(refused()) };
    if copy.where_clause.is_some() || !copy.is_from || copy.is_program || !copy.filename.is_empty() {
        return Err(refused());
    }
    copy.where_clause = Some(select.where_clause.ok_or_else(refused)?);
    Ok(NodeEnum::CopyStmt(copy))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rewrite::classify::first_node as node;

    #[test]
    fn applies_to_copy_from_stdin_with_a_condition_only() {
        let s = split(&node("COPY t (a, b) FROM STDIN (FORMAT binary) WHERE a <> 'x' AND b > 1")).unwrap();
        assert_eq!(pgtree::shape(&s.bare), pgtree::shape(&node("COPY t (a, b) FROM STDIN (FORMAT binary)")));
        assert_eq!(pgtree::shape(&s.probe), pgtree::shape(&node("SELECT 1 FROM t WHERE a <> 'x' AND b > 1")));
        for sql in [
            "COPY t FROM STDIN",
            "COPY t TO STDOUT",
            "COPY t FROM '/etc/passwd' WHERE true",
            "COPY t FROM PROGRAM 'id' WHERE true",
            "COPY (SELECT 1) TO STDOUT",
            "SELECT 1 FROM t WHERE true",
        ] {
            assert!(split(&node(sql)).is_none(), "{sql}");
        }
    }

    #[test]
    fn the_condition_goes_back_only_on_unchanged_verified_trees() {
        let client = node("COPY s.t (a) FROM STDIN WHERE a <> 'b-999'");
        let s = split(&client).unwrap();
        let back = reattach("COPY s.t (a) FROM STDIN", "SELECT 1 FROM s.t WHERE a <> 'b-999'", &s, "x").unwrap();
        assert_eq!(pgtree::shape(&back), pgtree::shape(&client));
        // A rewritten condition or target, another statement, or several: refused.
        for (copied, probed) in [
            ("COPY s.t (a) FROM STDIN", "SELECT 1 FROM s.t WHERE a <> 'other'"),
            ("COPY s.t (a) FROM STDIN", "SELECT 1 FROM (SELECT * FROM s.t) t WHERE a <> 'b-999'"),
            ("COPY s.u (a) FROM STDIN", "SELECT 1 FROM s.t WHERE a <> 'b-999'"),
            ("COPY s.t (a) FROM STDIN WHERE true", "SELECT 1 FROM s.t WHERE a <> 'b-999'"),
            ("COPY s.t (a) TO STDOUT", "SELECT 1 FROM s.t WHERE a <> 'b-999'"),
            ("COPY s.t (a) FROM STDIN; SELECT 1", "SELECT 1 FROM s.t WHERE a <> 'b-999'"),
            ("COPY s.t (a) FROM STDIN", "SELECT 1"),
        ] {
            assert!(reattach(copied, probed, &s, "x").is_err(), "{copied} / {probed}");
        }
    }
}

/// Through the whole pipeline with the shipped policies (the demo catalog: `entities`, `users`, …
/// are managed tables in `public`).
#[cfg(test)]
mod pipeline_tests {
    use crate::auth::identity::Environment;
    use crate::rewrite::ddl::tests::{actor, dev, first_tree as tree, run};

    /// asyncpg's `copy_records_to_table(…, where=…)` and its text form: forwarded as PostgreSQL
    /// prints the client's own tree.
    #[test]
    fn copy_from_stdin_with_a_condition_into_a_scratch_table() {
        for sql in [
            "COPY \"copytab_where\" FROM STDIN (FORMAT binary) WHERE a <> 'b-999'",
            "COPY copytab_where(a, b) FROM STDIN (FORMAT csv, NULL '\\N') WHERE b > 1 AND lower(a) LIKE 'a-%'",
            "COPY t FROM STDIN WHERE c IS NOT NULL AND c < now() - interval '1 day' OR a = $$it's$$",
            "COPY t FROM STDIN WHERE t.a IN ('x', 'y')",
        ] {
            let out = dev(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(tree(&out), tree(sql), "{sql} → {out}");
            // A fixed point of the pipeline.
            assert_eq!(dev(&out).unwrap(), out, "{sql}");
        }
    }

    /// The condition passes every rule an expression of the caller passes, the target every rule
    /// of COPY FROM; whatever the usual way would have to rewrite stays refused.
    #[test]
    fn conditions_and_targets_the_usual_way_refuses_stay_refused() {
        for (sql, needle) in [
            // Functions outside the allowlist, wherever they stand in the condition.
            ("COPY t FROM STDIN WHERE pg_sleep(1) IS NULL", "pg_sleep"),
            ("COPY t FROM STDIN WHERE a = 'x' OR pg_terminate_backend(1)", "pg_terminate_backend"),
            ("COPY t FROM STDIN WHERE pg_read_file('/etc/passwd') <> a", "pg_read_file"),
            ("COPY t FROM STDIN WHERE set_config('search_path', a, false) IS NULL", "set_config"),
            // A managed table, as target or read by the condition.
            ("COPY entities FROM STDIN WHERE true", "managed table entities"),
            ("COPY t FROM STDIN WHERE a IN (SELECT id FROM entities)", "COPY"),
            // What the walk would rewrite in the condition (a namespaced channel, a qualified
            // sequence) cannot be put back: refused, not forwarded as the client wrote it.
            ("COPY t FROM STDIN WHERE pg_notify('c', a) IS NULL", "COPY"),
            ("COPY t FROM STDIN WHERE setval('s', b) > 0", "COPY"),
            ("COPY t FROM STDIN WHERE EXISTS (SELECT 1 FROM struere.api_keys)", "struere"),
            // Other tenants' and other schemas' tables, the catalog, reserved names.
            ("COPY scratch_0123456789.t FROM STDIN WHERE true", "scratch schema"),
            ("COPY pg_catalog.pg_class FROM STDIN WHERE true", "pg_class"),
            ("COPY t FROM STDIN WHERE __struere_in_scope", "reserved"),
        ] {
            match dev(sql) {
                Err(r) => assert!(r.to_string().contains(needle), "{sql}: {r}"),
                Ok(out) => panic!("{sql}: forwarded as {out}"),
            }
        }
        // Production keys and roles without unmanaged tables write no scratch table.
        for a in [actor(Environment::Production, "admin"), actor(Environment::Development, "teacher")] {
            let r = run(&a, "COPY t FROM STDIN WHERE a <> 'x'");
            assert!(r.is_err(), "{r:?}");
        }
    }
}
