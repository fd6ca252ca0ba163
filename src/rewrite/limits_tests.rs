//! Depth and size limits: deep or long inputs must become clean refusals, never a stack
//! overflow. Run on threads with a 2 MiB stack (tokio's default worker stack size).

use super::tests::rewrite;
use super::*;

const SMALL_STACK: usize = 2 * 1024 * 1024;

/// Runs `f` on a fresh thread with a 2 MiB stack; a stack overflow would abort the test binary.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match std::thread::Builder::new().stack_size(SMALL_STACK).spawn(f).unwrap().join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Inputs nested (or chained) `n` deep in many different ways.
fn deep_inputs(n: usize) -> Vec<(&'static str, String)> {
    let rep = |s: &str| s.repeat(n);
    vec![
        ("parentheses", format!("SELECT {}1{}", rep("("), rep(")"))),
        ("subqueries", format!("SELECT {}1{}", rep("(SELECT "), rep(")"))),
        ("NOT", format!("SELECT {}true", rep("NOT "))),
        ("unary minus", format!("SELECT {}1", rep("- "))),
        ("function calls", format!("SELECT {}1{}", rep("f("), rep(")"))),
        ("arrays", format!("SELECT {}1{}", rep("ARRAY["), rep("]"))),
        ("CASE", format!("SELECT {}1{}", rep("CASE WHEN true THEN "), rep(" END"))),
        ("CAST", format!("SELECT {}1{}", rep("CAST("), rep(" AS int)"))),
        ("table parentheses", format!("SELECT * FROM {}t{}", rep("("), rep(")"))),
        ("join chain", format!("SELECT * FROM t0 {}", rep("JOIN t ON true "))),
        ("nested joins", format!("SELECT * FROM {}t{}", rep("(t JOIN "), rep(" ON true)"))),
        ("nested unions", format!("{}SELECT 1{}", rep("(SELECT 1 UNION "), rep(")"))),
        ("union chain", format!("SELECT 1{}", rep(" UNION SELECT 1"))),
        ("plus chain", format!("SELECT 1{}", rep(" + 1"))),
        ("concat chain", format!("SELECT 'a'{}", rep(" || 'a'"))),
        ("AND chain", format!("SELECT 1 WHERE true{}", rep(" AND true"))),
        ("OR chain", format!("SELECT 1 WHERE false{}", rep(" OR x = 1"))),
        ("EXISTS", format!("SELECT {}1{}", rep("EXISTS (SELECT "), rep(")"))),
        ("IN subqueries", format!("SELECT 1 WHERE 1 IN {}1{}", rep("(SELECT 1 WHERE 1 IN "), rep(")"))),
        ("CTEs", format!("{}SELECT 1{}", rep("WITH a AS ("), rep(") SELECT 1"))),
        ("ROW", format!("SELECT {}1{}", rep("ROW("), rep(")"))),
        ("casts", format!("SELECT 1{}", rep("::int"))),
        ("subscripts", format!("SELECT a{}", rep("[1]"))),
        ("json arrows", format!("SELECT a{}", rep("->'a'"))),
        ("INSERT SELECT", format!("INSERT INTO t {}SELECT 1{}", rep("("), rep(")"))),
        ("LATERAL", format!("SELECT * FROM {}t{}", rep("LATERAL (SELECT * FROM "), rep(")"))),
        ("IS NULL chain", format!("SELECT 1{}", rep(" IS NULL"))),
        ("COLLATE chain", format!("SELECT 'a'{}", rep(" COLLATE \"C\""))),
        ("AT TIME ZONE chain", format!("SELECT now(){}", rep(" AT TIME ZONE 'UTC'"))),
        ("BETWEEN chain", format!("SELECT 1{}", rep(" BETWEEN 1 AND 2"))),
        ("INTERVAL", format!("SELECT {}'1 day'", rep("INTERVAL "))),
        ("aggregates", format!("SELECT {}1{}", rep("count("), rep(") FILTER (WHERE true)"))),
        ("mixed parens", format!("SELECT {}1{}", rep("(-("), rep("))"))),
        ("comparison chain", format!("SELECT 1 WHERE a{}", rep(" = a"))),
        ("IN lists", format!("SELECT 1 WHERE a IN ({})", vec!["1"; n].join(", "))),
        ("select list", format!("SELECT {}", vec!["a"; n].join(", "))),
        ("statements", "SELECT 1;".repeat(n)),
    ]
}

fn assert_clean(name: &str, n: usize, result: &Result<Arc<Rewritten>, Refusal>) {
    if let Err(e) = result {
        assert_ne!(e.to_string(), INTERNAL_ERROR, "{name} x{n}: the rewriter panicked");
    }
}

#[test]
fn ten_thousand_nested_parentheses_are_refused() {
    let r = on_small_stack(|| rewrite(&format!("SELECT {}1{}", "(".repeat(10_000), ")".repeat(10_000))));
    assert!(matches!(&r, Err(Refusal::TooComplex(_))), "{r:?}");
}

#[test]
fn five_thousand_nested_subqueries_are_refused() {
    let r = on_small_stack(|| rewrite(&format!("SELECT {}1{}", "(SELECT ".repeat(5_000), ")".repeat(5_000))));
    assert!(matches!(&r, Err(Refusal::TooComplex(_))), "{r:?}");
}

#[test]
fn every_deep_shape_is_refused_cleanly_on_a_small_stack() {
    let results =
        on_small_stack(|| deep_inputs(10_000).into_iter().map(|(name, sql)| (name, rewrite(&sql))).collect::<Vec<_>>());
    for (name, result) in &results {
        assert_clean(name, 10_000, result);
        // Flat lists and statement sequences are long, not deep: those may pass.
        if !matches!(*name, "IN lists" | "select list" | "statements" | "subscripts") {
            assert!(matches!(result, Err(Refusal::TooComplex(_) | Refusal::Syntax(_))), "{name}: {result:?}");
        }
    }
}

#[test]
fn moderately_deep_shapes_never_crash_on_a_small_stack() {
    // Depths around the parsers' limits: each shape either passes or is refused, but the
    // whole pipeline (parse, visit, print, verify, drop) must fit in 2 MiB.
    // Beyond 16 or so, the deep stack (`pgparse::on_deep_stack`) takes over.
    for n in [8, 16, 24, 40, 64, 100, 150] {
        let results = on_small_stack(move || {
            deep_inputs(n)
                .into_iter()
                // sqlparser's parenthesized-join parser has very large frames in debug builds
                // (over its own 128 KiB stack-growth red zone), so only release builds run it
                // on the small stack; see `nested_joins_in_debug_builds` below.
                .filter(|(name, _)| cfg!(not(debug_assertions)) || *name != "nested joins")
                .map(|(name, sql)| (name, rewrite(&sql)))
                .collect::<Vec<_>>()
        });
        for (name, result) in &results {
            assert_clean(name, n, result);
        }
    }
}

#[test]
fn nested_joins_in_debug_builds() {
    let results = std::thread::Builder::new()
        .stack_size(16 * SMALL_STACK)
        .spawn(|| {
            [8, 16, 24, 40, 64]
                .into_iter()
                .map(|n| {
                    let sql = format!("SELECT * FROM {}t{}", "(t JOIN ".repeat(n), " ON true)".repeat(n));
                    (n, rewrite(&sql))
                })
                .collect::<Vec<_>>()
        })
        .unwrap()
        .join()
        .unwrap();
    for (n, result) in &results {
        assert_clean("nested joins", *n, result);
    }
    assert!(results[0].1.is_ok(), "{:?}", results[0].1);
}

#[test]
fn reasonable_nesting_is_accepted() {
    on_small_stack(|| {
        for sql in [
            format!("SELECT {}1{}", "(SELECT ".repeat(8), ")".repeat(8)),
            format!("SELECT {}1{}", "(".repeat(40), ")".repeat(40)),
            format!("SELECT 1{}", " + 1".repeat(30)),
            format!("SELECT 1 WHERE true{}", " AND x = 'a'".repeat(100)),
            format!("SELECT * FROM t0 {}", "JOIN t ON true ".repeat(20)),
            // Deeper than pg_query's own decoder took (100 protobuf levels): on the deep stack.
            format!("SELECT {}1{}", "(SELECT ".repeat(20), ")".repeat(20)),
            format!("SELECT 1{}", " + 1".repeat(100)),
            format!("SELECT 'a'{}", " || 'a'".repeat(150)),
            // Django's `test_multi_page_text_explain`: a 101-operand UNION, explained.
            format!("SELECT a FROM t{}", " UNION SELECT a FROM t".repeat(100)),
            format!("EXPLAIN SELECT a FROM t{}", " UNION SELECT a FROM t".repeat(100)),
            // The longest AND chain allowed, as deep inside subqueries as PostgreSQL allows.
            format!(
                "SELECT {}(SELECT 1 WHERE true{}){}",
                "(SELECT ".repeat(12),
                " AND x = 1".repeat(MAX_BOOLEAN_OPERATORS),
                ")".repeat(12)
            ),
        ] {
            let r = rewrite(&sql);
            assert!(r.is_ok(), "{}…: {r:?}", &sql[..60.min(sql.len())]);
        }
    });
}

#[test]
fn a_rewrite_over_the_time_limit_is_refused_and_not_cached() {
    use crate::rewrite::policy::PassThrough;
    let actor = super::tests::actor();
    let slow = Rewriter::new(16, Arc::new(PassThrough)).with_time_limit(std::time::Duration::from_nanos(1));
    for _ in 0..2 {
        match slow.rewrite("SELECT 1", &actor) {
            Err(Refusal::TooComplex(m)) => assert!(m.contains("the limit is 0 ms (max_rewrite_ms)"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
    let fine = Rewriter::new(16, Arc::new(PassThrough)).with_time_limit(std::time::Duration::from_secs(60));
    assert!(fine.rewrite("SELECT 1", &actor).is_ok());
}
