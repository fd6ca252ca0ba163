use super::*;
use crate::rewrite::{SqlParseError, parse_one, printer};

use crate::rewrite::classify::first_node as node;

fn sqlparser_reads(sql: &str) -> bool {
    !matches!(parse_one(sql), Err(SqlParseError::Syntax(_)))
}

/// The way `read` found, 1–3, and PostgreSQL's reading of what the printer prints from it after
/// the wrappers came off (no policy in between).
fn way(sql: &str) -> (u8, Option<String>) {
    let reading = read(&node(sql), "x").unwrap_or_else(|| panic!("no way to read {sql}"));
    let way = match (&reading.marker, pgtree::shape(&reading.tree) == pgtree::shape(&node(sql))) {
        (Some(_), _) => 3,
        (None, true) => 1,
        (None, false) => 2,
    };
    let mut parsed = reading.parsed;
    if let Some(marker) = &reading.marker {
        unwrap(&mut parsed, marker, "x").unwrap();
    }
    let printed = printer::print(parsed).unwrap().text;
    assert_eq!(pgtree::shape(&node(&printed)), pgtree::shape(&reading.tree), "{sql} printed as {printed}");
    (way, Some(printed))
}

/// Exactly which parenthesised set operations sqlparser 0.64 cannot read: in an expression, a
/// subquery must start with SELECT or WITH (scalar, `op ANY/ALL` subqueries; `IN`, `EXISTS`,
/// `ARRAY(…)` and FROM items are read), and after EXPLAIN a parenthesis starts an option list.
#[test]
fn forms_sqlparser_cannot_read_and_the_way_each_takes() {
    let cases: &[(&str, u8)] = &[
        // Django's subquery of a union (`Subquery(qs1.union(qs2))`), in WHERE and the select list.
        ("SELECT a FROM t WHERE ((SELECT b FROM u WHERE u.c = t.c) UNION (SELECT b FROM v)) IS NOT NULL", 1),
        ("SELECT ((SELECT 1) UNION (SELECT 2) LIMIT 1)", 1),
        ("SELECT ((SELECT 1) UNION (SELECT 2)) + 1, f(((SELECT 1) EXCEPT (SELECT 2)))", 1),
        ("SELECT 1 WHERE 1 = ANY ((SELECT 1) UNION (SELECT 2))", 1),
        ("SELECT 1 WHERE 1 < ALL ((SELECT 1) INTERSECT (SELECT 2))", 1),
        ("UPDATE t SET a = ((SELECT 1) UNION (SELECT 2)) WHERE id = 1", 1),
        ("DELETE FROM t WHERE id = ((SELECT 1) UNION ALL (SELECT 2) LIMIT 1)", 1),
        ("INSERT INTO t (a) VALUES (((SELECT 1) UNION (SELECT 2)))", 1),
        // Django's EXPLAIN of a union (`qs1.union(qs2).explain()`), and other parenthesised queries.
        ("EXPLAIN (SELECT a FROM t) UNION (SELECT b FROM u WHERE b = 'test')", 1),
        ("EXPLAIN (SELECT 1 LIMIT 1)", 1),
        ("EXPLAIN ((SELECT 1))", 1),
        ("EXPLAIN (VALUES (1))", 1),
        // The first operand keeps its parentheses (ORDER BY, LIMIT, OFFSET, FETCH, locking, WITH).
        ("EXPLAIN (SELECT a FROM t ORDER BY a LIMIT 1) UNION (SELECT b FROM u)", 2),
        ("EXPLAIN ((WITH c AS (SELECT 1) SELECT * FROM c) UNION (SELECT 2))", 2),
        ("SELECT ((SELECT a FROM t ORDER BY a LIMIT 1) UNION (SELECT b FROM u))", 3),
        ("SELECT ((SELECT 1 OFFSET 1) UNION ALL (SELECT 2) ORDER BY 1 LIMIT 1)", 3),
        ("SELECT ((SELECT a FROM t FOR UPDATE) UNION (SELECT 2))", 3),
        ("SELECT ((WITH c AS (SELECT 1) SELECT * FROM c) UNION (SELECT 2))", 3),
        ("SELECT ((VALUES (1)) UNION (SELECT 2))", 3),
        ("SELECT 1 WHERE 1 = ANY ((SELECT 1 LIMIT 1) UNION (SELECT 2))", 3),
        ("SELECT 1 WHERE (1, 2) = ((SELECT 1, 2 LIMIT 1) UNION (SELECT 3, 4) LIMIT 1)", 3),
        // Nested: each wrapper comes off, inner ones first.
        ("SELECT ((SELECT ((SELECT 1 LIMIT 1) UNION (SELECT 2)) LIMIT 1) UNION (SELECT 3))", 3),
        // Both at once: COSTS OFF and a wrapper.
        ("EXPLAIN (SELECT 1 LIMIT 1) UNION (SELECT ((SELECT 2 LIMIT 1) EXCEPT (SELECT 3)))", 3),
    ];
    for (sql, expected) in cases {
        assert!(!sqlparser_reads(sql), "sqlparser reads {sql}");
        assert_eq!(way(sql).0, *expected, "{sql}");
    }
    // What sqlparser reads as the client wrote it never comes here.
    for sql in [
        "(SELECT a FROM t ORDER BY a LIMIT 1) UNION (SELECT b FROM u) ORDER BY 1",
        "SELECT 1 WHERE 1 IN ((SELECT 1 LIMIT 1) UNION (SELECT 2))",
        "SELECT 1 WHERE EXISTS ((SELECT 1 LIMIT 1) UNION (SELECT 2))",
        "SELECT ARRAY((SELECT 1 LIMIT 1) UNION (SELECT 2))",
        "SELECT * FROM ((SELECT 1 LIMIT 1) UNION (SELECT 2)) s",
        "WITH c AS ((SELECT 1 LIMIT 1) UNION (SELECT 2)) SELECT * FROM c",
        "INSERT INTO t (a) (SELECT 1 LIMIT 1) UNION (SELECT 2)",
        "EXPLAIN (FORMAT JSON) (SELECT 1 LIMIT 1) UNION (SELECT 2)",
        "EXPLAIN VERBOSE (SELECT 1 LIMIT 1) UNION (SELECT 2)",
        "SELECT ((SELECT 1)) + 1",
    ] {
        assert!(sqlparser_reads(sql), "{sql}");
    }
}

#[test]
fn nothing_is_read_that_postgresql_prints_unreadably() {
    // PostgreSQL's printing is no easier for sqlparser here, and no wrapper applies.
    for sql in [
        "SELECT a NOT BETWEEN SYMMETRIC 2 AND 1",
        "SELECT (a).b, (a).* FROM t",
        "UPDATE t SET a = DEFAULT WHERE CURRENT OF c",
    ] {
        assert!(read(&node(sql), "x").is_none(), "{sql}");
    }
}

#[test]
fn explain_gets_costs_off_only_without_options() {
    let mut tree = node("EXPLAIN (SELECT 1 LIMIT 1) UNION (SELECT 2)");
    assert!(explain_costs_off(&mut tree));
    assert_eq!(pgtree::shape(&tree), pgtree::shape(&node("EXPLAIN (COSTS OFF) (SELECT 1 LIMIT 1) UNION (SELECT 2)")));
    for sql in ["EXPLAIN (VERBOSE) SELECT 1", "EXPLAIN VERBOSE SELECT 1", "SELECT 1"] {
        assert!(!explain_costs_off(&mut node(sql)), "{sql}");
    }
    // ANALYZE is an option (PostgreSQL prints it in the list): the policy refuses it as it would
    // have.
    let reading = read(&node("EXPLAIN ANALYZE (SELECT 1 LIMIT 1) UNION (SELECT 2)"), "x").unwrap();
    assert_eq!(reading.parsed.to_string(), "EXPLAIN (ANALYZE) (SELECT 1 LIMIT 1) UNION SELECT 2");
}

#[test]
fn wrappers_go_only_where_sqlparser_needs_them() {
    let mut tree = node(
        "SELECT ((SELECT 1 LIMIT 1) UNION (SELECT 2)), 1 IN ((SELECT 1 LIMIT 1) UNION (SELECT 2)), \
         EXISTS ((SELECT 1 LIMIT 1) UNION (SELECT 2)), ARRAY((SELECT 1 LIMIT 1) UNION (SELECT 2)), (SELECT 1 LIMIT 1)",
    );
    assert_eq!(wrap(&mut tree, "m"), Some(1));
    let printed = crate::rewrite::deparse(&tree, "x").unwrap();
    assert!(printed.starts_with("SELECT (SELECT * FROM ((SELECT 1 LIMIT 1) UNION SELECT 2) m), 1 IN "), "{printed}");
}

#[test]
fn the_marker_is_a_name_the_client_did_not_write() {
    let first = marker_for(&node("SELECT 1")).unwrap();
    assert_eq!(first, "struere_set_operation_0");
    for sql in [
        "SELECT 1 AS struere_set_operation_0",
        "SELECT 'STRUERE_SET_OPERATION_0'",
        "SELECT U&\"struere_set_operation_\\0030\"",
        "SELECT 1 FROM struere_set_operation_01",
    ] {
        let marker = marker_for(&node(sql)).unwrap();
        assert_eq!(marker, "struere_set_operation_1", "{sql}");
    }
    // A client's own wrapper with another name stays as written.
    let sql = "SELECT ((SELECT 1 LIMIT 1) UNION (SELECT 2)), (SELECT * FROM ((SELECT 1 LIMIT 1) UNION SELECT 2) \
               struere_set_operation_0)";
    let (_, printed) = way(sql);
    assert!(printed.unwrap().contains("struere_set_operation_0)"));
}

#[test]
fn a_wrapper_the_policy_changed_stays_and_is_refused() {
    let reading = read(&node("SELECT ((SELECT 1 LIMIT 1) UNION (SELECT 2))"), "x").unwrap();
    let marker = reading.marker.unwrap();
    // As if the policy had rewritten the wrapper itself.
    let text = reading.parsed.to_string().replace("SELECT * FROM", "SELECT *, 1 FROM");
    let mut changed = parse_one(&text).ok().unwrap();
    unwrap(&mut changed, &marker, "x").unwrap();
    assert!(printer::print(changed).unwrap().text.contains(&marker));
}
