//! End-to-end tests of `Rewriter::rewrite`.

use super::*;
use crate::auth::identity::{ActorType, Environment};

pub(super) fn actor() -> ActorContext {
    ActorContext {
        organization: "org_1".into(),
        environment: Environment::Development,
        roles: vec!["member".into()],
        actor_type: ActorType::User,
        actor_id: "user_1".into(),
    }
}

pub(super) fn rewrite(sql: &str) -> Result<Arc<Rewritten>, Refusal> {
    Rewriter::new(16, pass()).rewrite(sql, &actor())
}

/// PostgreSQL's statement kinds of `sql`.
pub(super) fn pg_kinds(sql: &str) -> Vec<String> {
    classify::parse(sql).unwrap().into_iter().map(|s| s.kind).collect()
}

/// Every string constant in `sql`, in order, as PostgreSQL's lexer delimits them; decoded
/// assuming the printer's form (anything else fails the test).
pub(super) fn literals(sql: &str) -> Vec<String> {
    lexer::scan(sql)
        .unwrap()
        .iter()
        .filter(|t| {
            use pg_query::protobuf::Token;
            matches!(t.token, Some(Token::Sconst | Token::Usconst | Token::Bconst | Token::Xconst))
        })
        .map(|t| lexer::decode_standard_string(&sql[t.start..t.end]).unwrap())
        .collect()
}

/// Rewrites `sql`, which must be accepted, and checks the invariants every output must have:
/// same kinds as the input, re-parses to those kinds, and rewriting it again changes nothing.
#[track_caller]
pub(super) fn ok(sql: &str) -> Rewritten {
    let out = match rewrite(sql) {
        Ok(out) => out,
        Err(e) => panic!("{sql:?} was refused: {e}"),
    };
    assert_eq!(*out.statement_kinds, pg_kinds(sql), "kinds of {sql:?}");
    assert_eq!(pg_kinds(&out.sql), *out.statement_kinds, "output of {sql:?} re-parses differently");
    let again = rewrite(&out.sql).unwrap_or_else(|e| panic!("output {:?} refused: {e}", out.sql));
    assert_eq!(again.sql, out.sql, "rewriting is not idempotent for {sql:?}");
    (*out).clone()
}

#[track_caller]
fn refused(sql: &str) -> Refusal {
    match rewrite(sql) {
        Ok(out) => panic!("{sql:?} was accepted as {:?}", out.sql),
        Err(e) => e,
    }
}

#[track_caller]
fn denied(sql: &str, needle: &str) {
    let e = refused(sql);
    assert!(matches!(e, Refusal::Denied(_)), "{sql:?}: {e:?}");
    assert_eq!(e.sqlstate(), SqlState::INSUFFICIENT_PRIVILEGE);
    assert!(e.to_string().contains(needle), "{sql:?}: {e}");
}

#[test]
fn backslash_quote_stays_one_statement() {
    let out = ok("SELECT * FROM t WHERE name = 'a\\''; DROP TABLE y; --'");
    assert_eq!(*out.statement_kinds, ["SelectStmt"]);
    assert_eq!(literals(&out.sql), ["a\\'; DROP TABLE y; --"]);
    assert_eq!(out.sql, "SELECT * FROM t WHERE name = 'a\\''; DROP TABLE y; --'");
}

#[test]
fn doubled_quotes_are_kept() {
    let out = ok("SELECT 'x''''y'");
    assert_eq!(literals(&out.sql), ["x''y"]);
}

#[test]
fn escape_dollar_and_unicode_strings_become_standard_strings() {
    let out =
        ok("SELECT E'it\\'s', E'\\\\x41', E'\\x41\\101\\u00e9\\n', $$a'b$$, $tag$ $$ $tag$, U&'d\\0061t\\+000061'");
    assert_eq!(literals(&out.sql), ["it's", "\\x41", "AAé\n", "a'b", " $$ ", "data"]);
    assert_eq!(out.sql, "SELECT 'it''s', '\\x41', 'AAé\n', 'a''b', ' $$ ', 'data'");
}

#[test]
fn national_bit_and_hex_strings_keep_their_type() {
    let out = ok("SELECT N'a''b', B'0101', X'fF', b'1', x'0'");
    assert_eq!(out.sql, "SELECT N'a''b', B'0101', X'fF', B'1', X'0'");
}

#[test]
fn identifiers_keep_their_meaning() {
    let sql = "SELECT \"Select\", \"user\", \"MiXeD\", \"a\"\"b\", \"back\\slash\", Foo, \"é\" FROM \"T\"";
    assert_eq!(ok(sql).sql, sql);
}

#[test]
fn schema_qualified_names() {
    let sql = "SELECT s.t.c, \"Sch\".\"Tab\".\"Col\" FROM \"Sch\".\"Tab\" AS x JOIN public.u ON x.id = u.id";
    assert_eq!(ok(sql).sql, sql);
    let out = ok("SELECT * FROM pg_catalog.pg_class WHERE relname = 'x'");
    assert_eq!(out.sql, "SELECT * FROM pg_catalog.pg_class WHERE relname = 'x'");
}

#[test]
fn parameters_pass_through() {
    let out = ok("SELECT * FROM t WHERE a = $1 AND b = $2::text LIMIT $3");
    assert_eq!(out.sql, "SELECT * FROM t WHERE a = $1 AND b = $2::TEXT LIMIT $3");
}

#[test]
fn ordinary_statements() {
    for sql in [
        "INSERT INTO t (a, b) VALUES ('x', 1), ('y', 2) ON CONFLICT (a) DO UPDATE SET b = excluded.b RETURNING *",
        "UPDATE t SET a = 'z' WHERE id = 1",
        "DELETE FROM t WHERE a LIKE 'x%' ESCAPE '!'",
        "WITH c AS (SELECT 1 AS one) SELECT * FROM c",
        "SELECT a->>'k', b @> '{}'::jsonb, DATE '2020-01-01', INTERVAL '1 day' FROM t",
        "SELECT count(*) FILTER (WHERE a > 1) OVER (PARTITION BY b ORDER BY c) FROM t",
        "SELECT ARRAY['a', 'b'], CASE WHEN a THEN 'y' ELSE 'n' END FROM t",
        "SELECT 1 FROM t FOR UPDATE",
        "SHOW search_path",
        "SET statement_timeout = 1000",
        "SET application_name = 'app'",
        "SET TIME ZONE 'UTC'",
        "RESET ALL",
        "DISCARD ALL",
        "BEGIN",
        "COMMIT",
        "SAVEPOINT s1",
        "ROLLBACK TO SAVEPOINT s1",
        "PREPARE p AS SELECT 1",
        "EXECUTE p",
        "DEALLOCATE p",
        "CREATE TABLE t (id int PRIMARY KEY, name text DEFAULT 'x')",
        "SELECT 1 - -1, - 1",
    ] {
        ok(sql);
    }
}

#[test]
fn multi_statement_input() {
    let out = ok("SELECT 1; INSERT INTO t VALUES ('a;b'); BEGIN; SET CONSTRAINTS ALL DEFERRED; COMMIT;");
    assert_eq!(
        *out.statement_kinds,
        ["SelectStmt", "InsertStmt", "TransactionStmt", "ConstraintsSetStmt", "TransactionStmt"]
    );
    assert_eq!(out.sql, "SELECT 1; INSERT INTO t VALUES ('a;b'); BEGIN; SET CONSTRAINTS ALL DEFERRED; COMMIT");
}

#[test]
fn empty_input_is_an_empty_query() {
    for sql in ["", "   ", ";", ";;", " ; ; ", "-- just a comment", "/* c */", "/* a */ ; -- b\n"] {
        let out = rewrite(sql).unwrap();
        assert_eq!(
            *out,
            Rewritten {
                sql: String::new(),
                statement_kinds: Arc::default(),
                tables: Arc::default(),
                sql_hash: crate::events::sql_hash(""),
                bound: None,
                param_rules: Arc::default(),
                gate_needs: None,
                policy_version: None
            },
            "{sql:?}"
        );
    }
}

#[test]
fn data_free_statements_sqlparser_cannot_parse_are_forwarded_verbatim() {
    let sql = "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE";
    assert!(parse_one(sql).is_err(), "test premise: sqlparser fails");
    let out = ok(sql);
    assert_eq!(out.sql, sql);
    assert_eq!(*out.statement_kinds, ["TransactionStmt"]);

    let sql = "SET CONSTRAINTS ALL DEFERRED";
    assert!(parse_one(sql).is_err(), "test premise: sqlparser fails");
    assert_eq!(ok(sql).sql, sql);
}

#[test]
fn verbatim_pieces_lose_comments_that_could_swallow_the_separator() {
    let out = ok("/* lead */ SET CONSTRAINTS ALL /* mid */ DEFERRED -- tail\n; SELECT 'x' -- end");
    assert_eq!(out.sql, "SET CONSTRAINTS ALL /* mid */ DEFERRED; SELECT 'x'");
    let out = ok("SELECT 1; SET CONSTRAINTS ALL DEFERRED -- trailing");
    assert_eq!(out.sql, "SELECT 1; SET CONSTRAINTS ALL DEFERRED");
}

#[test]
fn statements_that_may_touch_data_must_parse() {
    let e = refused("DO $$ BEGIN PERFORM 1; END $$");
    assert!(matches!(e, Refusal::Syntax(_)), "{e:?}");
    assert_eq!(e.sqlstate(), SqlState::SYNTAX_ERROR);
    assert!(e.to_string().contains("DoStmt"), "{e}");

    let e = refused("SELECT 1; SELECT 2; DO $$ BEGIN END $$");
    assert!(e.to_string().starts_with("refused: the proxy cannot parse statement 3 of 3 (DoStmt): "), "{e}");
}

#[test]
fn postgres_syntax_errors() {
    let e = refused("SELEKT 1");
    assert!(matches!(e, Refusal::Syntax(_)));
    assert!(e.to_string().contains("syntax error at or near \"SELEKT\""), "{e}");
    let e = refused("SELECT 1; SELECT 'unterminated");
    assert!(matches!(e, Refusal::Syntax(_)), "{e:?}");
    let e = refused("SELECT '\0'");
    assert!(matches!(e, Refusal::Syntax(_)), "{e:?}");
}

#[test]
fn gate_refuses_pinned_settings() {
    for (sql, needle) in [
        (
            "SET standard_conforming_strings = off",
            "SET standard_conforming_strings is not allowed through the proxy: the proxy pins it",
        ),
        ("SET standard_conforming_strings TO 'off'", "standard_conforming_strings"),
        ("SET client_encoding TO sql_ascii", "client_encoding"),
        ("set Standard_Conforming_Strings = off", "standard_conforming_strings"),
        ("SET \"standard_conforming_strings\" = off", "standard_conforming_strings"),
        ("SET backslash_quote = on", "backslash_quote"),
        ("SET escape_string_warning = off", "escape_string_warning"),
        ("SET client_encoding = 'SJIS'", "client_encoding"),
        ("SET NAMES 'SJIS'", "client_encoding"),
        ("SET search_path = evil, public", "SET search_path"),
        ("SET search_path TO DEFAULT", "search_path"),
        ("SET LOCAL search_path = evil", "SET LOCAL search_path"),
        ("SET SESSION search_path = evil", "search_path"),
        ("SET SCHEMA 'evil'", "search_path"),
        ("SET ROLE admin", "role"),
        ("SET SESSION ROLE admin", "role"),
        ("SET LOCAL ROLE admin", "role"),
        ("SET role = admin", "role"),
        ("RESET ROLE", "RESET role"),
        ("SET SESSION AUTHORIZATION admin", "session_authorization"),
        ("SET SESSION AUTHORIZATION DEFAULT", "session_authorization"),
        ("SET session_authorization = admin", "session_authorization"),
        ("RESET SESSION AUTHORIZATION", "session_authorization"),
        ("ALTER ROLE me SET search_path = evil", "search_path"),
        ("ALTER ROLE me IN DATABASE d SET client_encoding = 'SJIS'", "client_encoding"),
        ("ALTER DATABASE d SET standard_conforming_strings = off", "standard_conforming_strings"),
        ("ALTER SYSTEM SET backslash_quote = on", "backslash_quote"),
        ("ALTER FUNCTION f() SET search_path = evil", "search_path"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = evil AS 'select 1'", "search_path"),
        ("SELECT 1; SET search_path = evil; SELECT 2", "search_path"),
    ] {
        denied(sql, needle);
    }
}

#[test]
fn gate_refuses_set_config_anywhere() {
    for sql in [
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        "SELECT pg_catalog.set_config('search_path', 'evil', false)",
        "SELECT PG_CATALOG.SET_CONFIG('search_path', 'evil', false)",
        "SELECT \"set_config\"('search_path', 'evil', false)",
        "SELECT * FROM t WHERE a = (SELECT set_config('role', 'x', true))",
        "SELECT * FROM set_config('search_path', 'evil', false)",
        "WITH x AS (SELECT Set_Config('a', 'b', false)) SELECT * FROM x",
        "INSERT INTO t SELECT set_config('a', 'b', false)",
        "UPDATE t SET a = set_config('a', 'b', false)",
        "SELECT 1; SELECT set_config('a', 'b', false)",
    ] {
        denied(sql, "set_config is not allowed through the proxy");
    }
    // The name as a string value is data, not a call.
    ok("SELECT 'set_config'");
}

#[test]
fn gate_allows_restoring_settings() {
    ok("RESET ALL");
    ok("DISCARD ALL");
    ok("SET search_path_extra.x = 1");
    ok("SHOW standard_conforming_strings");
    // Setting a pinned setting to the value it is pinned to changes nothing.
    assert_eq!(ok("SET standard_conforming_strings TO on").sql, "SET standard_conforming_strings = on");
    assert_eq!(ok("SET client_encoding TO 'UTF-8'").sql, "SET client_encoding = 'UTF-8'");
}

#[test]
fn strings_sqlparser_keeps_outside_values_are_printed_by_us() {
    // sqlparser writes these plain `String` fields as `'{field}'` with no escaping at all.
    let out = ok("NOTIFY chan, 'it''s; DROP TABLE x; --'");
    assert_eq!(out.sql, "NOTIFY chan, 'it''s; DROP TABLE x; --'");
    assert_eq!(literals(&out.sql), ["it's; DROP TABLE x; --"]);
    assert_eq!(ok("COMMENT ON TABLE t IS 'a''b'").sql, "COMMENT ON TABLE t IS 'a''b'");
    let out = ok("COPY t FROM STDIN WITH (FORMAT csv, NULL 'n''a', ENCODING 'UTF8')");
    assert_eq!(literals(&out.sql), ["n'a", "UTF8"]);
}

#[test]
fn other_strings_sqlparser_keeps_outside_values_are_refused_not_misprinted() {
    // Display writes these itself; the verifier sees strings the printer did not write.
    for sql in ["COPY t FROM '/tmp/x'", "COPY t TO STDOUT WITH (DELIMITER ';')"] {
        let e = refused(sql);
        assert!(matches!(e, Refusal::Unverifiable(_)), "{sql:?}: {e:?}");
    }
}

#[test]
fn oversized_input_is_too_complex() {
    let sql = format!("SELECT '{}'", "x".repeat(MAX_SQL_BYTES));
    let e = refused(&sql);
    assert!(matches!(e, Refusal::TooComplex(_)), "{e:?}");
    assert_eq!(e.sqlstate(), SqlState::PROGRAM_LIMIT_EXCEEDED);
    // Just under the limit is fine.
    let sql = format!("SELECT '{}'", "x".repeat(MAX_SQL_BYTES - 20));
    assert_eq!(*rewrite(&sql).unwrap().statement_kinds, ["SelectStmt"]);
}

#[test]
fn cache_reuses_verified_text_per_actor() {
    let rewriter = Rewriter::new(8, pass());
    let a = actor();
    let first = rewriter.rewrite("SELECT 'a'", &a).unwrap();
    let second = rewriter.rewrite("SELECT 'a'", &a).unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    let mut b = actor();
    b.organization = "org_2".into();
    let other = rewriter.rewrite("SELECT 'a'", &b).unwrap();
    assert!(!Arc::ptr_eq(&first, &other));
    assert_eq!(*first, *other);
    // Refusals are not cached and stay refusals.
    assert!(rewriter.rewrite("SET ROLE x", &a).is_err());
    assert!(rewriter.rewrite("SET ROLE x", &a).is_err());
}

#[test]
fn sqlstates() {
    assert_eq!(Refusal::Syntax(String::new()).sqlstate().code(), "42601");
    assert_eq!(Refusal::Denied(String::new()).sqlstate().code(), "42501");
    assert_eq!(Refusal::Unverifiable(String::new()).sqlstate().code(), "42501");
    assert_eq!(Refusal::TooComplex(String::new()).sqlstate().code(), "54000");
}

#[test]
fn boolean_chains_are_bounded() {
    let at_limit = format!("SELECT 1 WHERE true{}", " AND true".repeat(MAX_BOOLEAN_OPERATORS));
    ok(&at_limit);
    let over = format!("SELECT 1 WHERE true{}", " OR true".repeat(MAX_BOOLEAN_OPERATORS + 1));
    assert!(matches!(refused(&over), Refusal::TooComplex(_)));
}

#[test]
fn unicode_escaped_identifiers_are_refused() {
    let e = refused("SELECT U&\"d\\0061t\" FROM t");
    assert!(matches!(e, Refusal::Syntax(_)), "{e:?}");
    assert!(e.to_string().contains("Unicode-escaped identifiers"), "{e}");
    // Unicode-escaped strings are decoded correctly and re-printed as standard strings.
    assert_eq!(ok("SELECT 'a' || U&'\\0041'").sql, "SELECT 'a' || 'A'");
}

/// A ~1.5 KB catalog query of the kind psql and drivers send.
pub(super) const CATALOG_QUERY: &str = "SELECT n.nspname AS \"Schema\", c.relname AS \"Name\", \
CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' \
WHEN 'i' THEN 'index' WHEN 'S' THEN 'sequence' WHEN 't' THEN 'TOAST table' WHEN 'f' THEN 'foreign table' \
WHEN 'p' THEN 'partitioned table' WHEN 'I' THEN 'partitioned index' END AS \"Type\", \
pg_catalog.pg_get_userbyid(c.relowner) AS \"Owner\", \
CASE c.relpersistence WHEN 'p' THEN 'permanent' WHEN 't' THEN 'temporary' WHEN 'u' THEN 'unlogged' END AS \"Persistence\", \
am.amname AS \"Access method\", \
pg_catalog.pg_size_pretty(pg_catalog.pg_table_size(c.oid)) AS \"Size\", \
pg_catalog.obj_description(c.oid, 'pg_class') AS \"Description\", \
(SELECT count(*) FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS \"Columns\", \
(SELECT string_agg(i.relname, ', ' ORDER BY i.relname) FROM pg_catalog.pg_index x \
JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = c.oid) AS \"Indexes\" \
FROM pg_catalog.pg_class c \
LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam \
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', '') \
AND n.nspname <> 'pg_catalog' AND n.nspname !~ '^pg_toast' AND n.nspname <> 'information_schema' \
AND c.relname OPERATOR(pg_catalog.~) '^(orders|customers|line_items)$' COLLATE pg_catalog.default \
AND pg_catalog.pg_table_is_visible(c.oid) \
ORDER BY 1, 2 LIMIT 500";

#[test]
fn catalog_query_is_accepted() {
    assert!((1400..1700).contains(&CATALOG_QUERY.len()), "{}", CATALOG_QUERY.len());
    let out = ok(CATALOG_QUERY);
    assert_eq!(literals(&out.sql), literals(CATALOG_QUERY));
    assert_eq!(pg_kinds(&out.sql), ["SelectStmt"]);
}

/// Per-rewrite cost, cache miss and hit. Run in release:
/// `cargo test --release --lib rewrite::tests::timing -- --ignored --nocapture`
#[test]
#[ignore]
fn timing() {
    use std::time::Instant;
    let small = "SELECT id, name FROM users WHERE id = $1";
    let a = actor();
    for (name, sql, iters) in [("40-byte SELECT", small, 20_000u32), ("1.5 KB catalog query", CATALOG_QUERY, 2_000)] {
        let uncached = Rewriter::new(0, pass());
        uncached.rewrite(sql, &a).unwrap();
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(uncached.rewrite(std::hint::black_box(sql), &a).unwrap());
        }
        let miss = start.elapsed() / iters;

        let cached = Rewriter::new(1024, pass());
        cached.rewrite(sql, &a).unwrap();
        let start = Instant::now();
        for _ in 0..iters * 10 {
            std::hint::black_box(cached.rewrite(std::hint::black_box(sql), &a).unwrap());
        }
        let hit = start.elapsed() / (iters * 10);

        // Where a miss goes.
        let stage = |f: &dyn Fn()| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed() / iters
        };
        let pg_parse = stage(&|| drop(std::hint::black_box(classify::parse(sql).unwrap())));
        let pg_scan = stage(&|| drop(std::hint::black_box(lexer::scan(sql).unwrap())));
        let sp_parse = stage(&|| drop(std::hint::black_box(parse_one(sql).ok().unwrap())));
        let print = stage(&|| drop(std::hint::black_box(printer::print(parse_one(sql).ok().unwrap()).unwrap())));
        let node = classify::parse(sql).unwrap().remove(0).node;
        let gate = stage(&|| drop(gate::check_pg(&node).unwrap()));
        let shape = stage(&|| drop(std::hint::black_box(pgtree::shape(&node))));
        println!(
            "{name} ({} bytes): miss {miss:?}, hit {hit:?} | pg_query parse {pg_parse:?}, scan {pg_scan:?}, \
             sqlparser parse {sp_parse:?}, sqlparser parse+print {print:?}, gate walk {gate:?}, shape {shape:?}",
            sql.len()
        );
    }
}

/// Statements that are valid PostgreSQL but that the proxy refuses today, and why. Kept as a
/// test so that a change in behaviour is noticed.
const KNOWN_REFUSALS: &[(&str, &str)] = &[
    // sqlparser 0.64 cannot parse these.
    ("SELECT a NOT BETWEEN SYMMETRIC 2 AND 1", "cannot parse"),
    ("SELECT (a).b, (a).* FROM t", "cannot parse"),
    // A locking clause below the top level that the stand-ins cannot reach (`locking.rs`), or
    // where equal stand-ins would stand for different clauses.
    ("SELECT 1 LIMIT (SELECT 1 FROM t FOR NO KEY UPDATE)", "uses FOR NO KEY UPDATE, which the proxy does not support"),
    (
        "SELECT * FROM (SELECT * FROM t FOR KEY SHARE) a, (SELECT * FROM t FOR SHARE) b",
        "uses FOR KEY SHARE, which the proxy does not support",
    ),
    // A set operation whose first operand keeps its parentheses, as a subquery in a position
    // pg_query's node iterator does not enter (`respell.rs` cannot wrap it), or a multi-column
    // assignment's subquery (not wrapped).
    ("SELECT ((SELECT true LIMIT 1) UNION (SELECT false)) IS TRUE", "cannot parse"),
    ("SELECT 1 LIMIT ((SELECT 1 LIMIT 1) UNION (SELECT 2))", "cannot parse"),
    ("SELECT count(*) FILTER (WHERE ((SELECT true LIMIT 1) UNION (SELECT false))) FROM t", "cannot parse"),
    ("UPDATE t SET (a, b) = ((SELECT 1, 2 LIMIT 1) UNION (SELECT 3, 4))", "cannot parse"),
    ("UPDATE t SET a = DEFAULT WHERE CURRENT OF c", "cannot parse"),
    ("WITH w AS (UPDATE t SET a[1] = 1 RETURNING a) SELECT * FROM w", "SET col[i] = …) in an UPDATE inside"),
    ("INSERT INTO t (a[1]) VALUES (1)", "INSERT column list"),
];

#[test]
fn common_statements_round_trip() {
    for sql in CORPUS {
        ok(sql);
    }
    for (sql, why) in KNOWN_REFUSALS {
        let e = refused(sql);
        assert!(e.to_string().contains(why), "{sql:?}: {e}");
    }
}

/// Valid PostgreSQL of many shapes that must round-trip unchanged in meaning.
const CORPUS: &[&str] = &[
    // sqlparser reads PostgreSQL's printing of these (`respell.rs`).
    "SELECT * FROM t WHERE b NOTNULL AND c ISNULL",
    "TABLE t",
    // `LIMIT ALL` / `LIMIT NULL` (no limit), which sqlparser does not print (SQLAlchemy's offsets).
    "SELECT * FROM t ORDER BY a LIMIT ALL OFFSET 2",
    "SELECT * FROM t LIMIT NULL",
    "SELECT * FROM (SELECT a FROM t LIMIT ALL OFFSET $1::integer) s WHERE a IN (SELECT b FROM u LIMIT ALL)",
    "SELECT a BETWEEN 1 AND 2, a NOT BETWEEN 2 AND 1",
    "SELECT * FROM t WHERE a IS NOT NULL AND b IS NULL",
    "SELECT x::timestamptz, y::timestamp with time zone, z::double precision, w::numeric(10,2), v::bool, u::char(3), t::varchar(5)[]",
    "SELECT CAST(a AS integer), a::bigint, a::smallint, a::real, a::float8, a::jsonb, a::uuid, a::bytea",
    "SELECT now(), current_timestamp, current_date, current_user, session_user, localtimestamp",
    "SELECT EXTRACT(YEAR FROM d), date_trunc('day', d), d + INTERVAL '1 hour', age(d)",
    "SELECT substring(s FROM 1 FOR 2), position('a' IN s), trim(both 'x' from s), overlay(s placing 'a' from 1)",
    "SELECT coalesce(a, b), nullif(a, b), greatest(a, b), least(a, b)",
    "SELECT a IS DISTINCT FROM b, a IS NOT DISTINCT FROM b, a IS TRUE, a IS NOT FALSE, a IS UNKNOWN",
    "SELECT a LIKE 'x', a NOT ILIKE 'y', a SIMILAR TO 'z', a ~* 'w', a !~ 'v'",
    "SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b DESC NULLS LAST",
    "SELECT a, count(*) FROM t GROUP BY a HAVING count(*) > 1 ORDER BY 2 DESC LIMIT 10 OFFSET 5",
    "SELECT * FROM t FETCH FIRST 5 ROWS ONLY",
    "SELECT * FROM t ORDER BY a OFFSET 5 ROWS FETCH NEXT 5 ROWS WITH TIES",
    "SELECT * FROM a LEFT JOIN b USING (id) RIGHT JOIN c ON c.id = b.id FULL OUTER JOIN d ON true CROSS JOIN e",
    "SELECT * FROM a NATURAL JOIN b",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT n FROM r",
    "SELECT * FROM t WHERE a = ANY($1) AND b = ALL(ARRAY[1,2]) AND c IN (SELECT x FROM y) AND EXISTS (SELECT 1)",
    "SELECT row_number() OVER w, sum(a) OVER (PARTITION BY b ORDER BY c ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) FROM t WINDOW w AS (ORDER BY a)",
    "SELECT array_agg(a ORDER BY b), string_agg(a, ',') FILTER (WHERE a IS NOT NULL) FROM t",
    "SELECT a->'b'->>'c', a#>'{b,c}', a#>>'{b}', a @> '{\"x\":1}', a ? 'k', a ?| array['a'], a ?& array['b'] FROM t",
    "SELECT a[1], a[1:2], a[:3] FROM t",
    "SELECT ROW(1, 2), (1, 2) = (3, 4)",
    "SELECT 1 UNION SELECT 2 INTERSECT SELECT 3 EXCEPT SELECT 4",
    "(SELECT 1) UNION ALL (SELECT 2) ORDER BY 1",
    "SELECT * FROM generate_series(1, 10) AS g(i)",
    "SELECT * FROM t, LATERAL (SELECT * FROM u WHERE u.t_id = t.id) s",
    "SELECT * FROM t TABLESAMPLE SYSTEM (10)",
    "SELECT * FROM ONLY t",
    "SELECT * FROM t FOR UPDATE OF t NOWAIT",
    "SELECT * FROM t FOR SHARE SKIP LOCKED",
    "INSERT INTO t DEFAULT VALUES",
    "INSERT INTO t (a) SELECT a FROM u ON CONFLICT ON CONSTRAINT t_pkey DO NOTHING",
    "INSERT INTO t AS x (a) VALUES (1) ON CONFLICT (a) WHERE a > 0 DO UPDATE SET a = x.a + 1 WHERE x.a < 10 RETURNING x.a",
    "UPDATE t SET (a, b) = (1, 2) FROM u WHERE t.id = u.id RETURNING t.*",
    "UPDATE t SET a[1] = 5, j['k']['l'] = $1::jsonb, b[1:2] = '{1,2}', c[$2::int][2] = 3 WHERE id = 1 RETURNING a",
    "WITH u AS (SELECT 1 AS id) UPDATE t SET a[1] = 5, (b[1], c) = (SELECT 1, 2) FROM u WHERE t.id = u.id",
    "DELETE FROM t USING u WHERE t.id = u.id RETURNING *",
    "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = u.a WHEN NOT MATCHED THEN INSERT (id, a) VALUES (u.id, u.a)",
    "CREATE TABLE IF NOT EXISTS t (id bigserial PRIMARY KEY, a text NOT NULL UNIQUE, b int REFERENCES u(id) ON DELETE CASCADE, c timestamptz DEFAULT now(), CHECK (b > 0))",
    "CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON t USING btree (a DESC) WHERE b > 0",
    "CREATE VIEW v AS SELECT a FROM t",
    "ALTER TABLE t ADD COLUMN d text DEFAULT 'x'",
    "ALTER TABLE t RENAME COLUMN a TO b",
    "DROP TABLE IF EXISTS t CASCADE",
    "TRUNCATE t RESTART IDENTITY",
    "CREATE SCHEMA s",
    "CREATE SEQUENCE s START 1",
    "SELECT nextval('s'), currval('s'), setval('s', 5)",
    "EXPLAIN SELECT 1",
    "EXPLAIN (ANALYZE, FORMAT JSON) SELECT 1",
    "ANALYZE t",
    "VACUUM t",
    "LISTEN ch",
    "UNLISTEN ch",
    "UNLISTEN *",
    "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
    "DECLARE c CURSOR FOR SELECT 1",
    "FETCH NEXT FROM c",
    "CLOSE c",
    "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "BEGIN READ WRITE",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "COMMIT AND CHAIN",
    "ROLLBACK",
    "RELEASE SAVEPOINT s",
    "PREPARE TRANSACTION 'x'",
    "SELECT pg_advisory_lock(1), pg_try_advisory_xact_lock(2)",
    "SELECT $1::text IS NULL OR a = $1",
    "SELECT 'a' || 'b' || $1",
    "SELECT 1 + 2 * 3 - 4 / 5 % 6 ^ 7",
    "SELECT -a, +a, @ a, ~a, a & b, a | b, a # b, a << 1, a >> 1",
    "SELECT NOT a AND b OR c",
    "SELECT a = b IS NULL",
    "SELECT 'x' COLLATE \"C\", a COLLATE pg_catalog.\"default\"",
    "SELECT a AT TIME ZONE 'UTC' AT TIME ZONE 'Europe/Paris'",
    "SELECT CASE a WHEN 1 THEN 'x' END, CASE WHEN a THEN 1 ELSE 2 END",
    "SELECT xmin, ctid FROM t",
    "SELECT t.* FROM t",
    "SELECT 1 AS \"Weird \"\" name\"",
    "SELECT oid::regclass FROM pg_class",
    "SELECT 'a'::regclass::oid",
    "SELECT * FROM unnest(ARRAY[1,2]) WITH ORDINALITY AS u(x, n)",
    "SELECT json_build_object('a', 1), jsonb_agg(t) FROM t",
    "SELECT B'101' | B'010', X'1F'::int",
    "SELECT 1e10, 1.5, .5, 5., 0x1F, 0o17, 0b101, 1_000_000",
    "SELECT count(DISTINCT a) FROM t",
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY a) FROM t",
    "SELECT * FROM t WHERE (a, b) IN ((1, 2), (3, 4))",
    "SELECT ARRAY(SELECT 1)",
    "SELECT a FROM t WHERE a ILIKE ANY (ARRAY['%x%'])",
    "VALUES (1), (2) ORDER BY 1",
    "SELECT * FROM (VALUES (1, 'a')) AS v(n, s)",
    "SELECT NULL::int, TRUE, FALSE",
    "SELECT interval '1' day, interval '2 hours 3 minutes'",
    "SELECT timestamp '2020-01-01 00:00', time '12:00', date '2020-01-01'",
    "SELECT a !~~ 'x', a ~~* 'y', a != b, a <> b",
    "SELECT pg_sleep(0.1)",
    "SELECT * FROM t WHERE a = $1 ORDER BY b LIMIT $2 OFFSET $3",
    "SELECT version()",
    "SELECT current_setting('search_path')",
    "SELECT pg_catalog.current_schema()",
    "SELECT typname, oid FROM pg_type WHERE oid = $1",
    "SELECT t.typname, t.typtype, t.typelem, r.rngsubtype, t.typbasetype, n.nspname, t.typrelid FROM pg_catalog.pg_type t LEFT OUTER JOIN pg_catalog.pg_range r ON r.rngtypid = t.oid INNER JOIN pg_catalog.pg_namespace n ON t.typnamespace = n.oid WHERE t.oid = $1",
];

fn pass() -> std::sync::Arc<dyn super::StatementPolicy> {
    std::sync::Arc::new(super::policy::PassThrough)
}

/// Parenthesised set operations sqlparser cannot read as sent (`respell.rs`): forwarded as the
/// proxy's printing of the same statement, which PostgreSQL reads as exactly the client's tree
/// (the pass-through policy changes nothing, so the verifier compares the two).
#[test]
fn parenthesised_set_operations_take_another_spelling() {
    for (sql, expected) in [
        (
            "SELECT a FROM t WHERE ((SELECT b FROM u WHERE u.c = t.c) UNION (SELECT b FROM v)) IS NOT NULL",
            "SELECT a FROM t WHERE (SELECT b FROM u WHERE u.c = t.c UNION SELECT b FROM v) IS NOT NULL",
        ),
        (
            "SELECT ((SELECT b FROM u ORDER BY b LIMIT 1) UNION (SELECT b FROM v)) FROM t",
            "SELECT ((SELECT b FROM u ORDER BY b LIMIT 1) UNION SELECT b FROM v) FROM t",
        ),
        (
            "SELECT 1 WHERE 1 = ANY ((SELECT 1 LIMIT 1) UNION (SELECT 2))",
            "SELECT 1 WHERE 1 = ANY((SELECT 1 LIMIT 1) UNION SELECT 2)",
        ),
        ("EXPLAIN (SELECT a FROM t) UNION (SELECT b FROM u)", "EXPLAIN SELECT a FROM t UNION SELECT b FROM u"),
        (
            "EXPLAIN (SELECT a FROM t ORDER BY a LIMIT 1) UNION (SELECT b FROM u)",
            "EXPLAIN (COSTS OFF) (SELECT a FROM t ORDER BY a LIMIT 1) UNION SELECT b FROM u",
        ),
        ("TABLE t", "SELECT * FROM t"),
    ] {
        assert_eq!(ok(sql).sql, expected, "{sql}");
    }
    // A name the client wrote that looks like the proxy's wrapper is the client's own.
    let sql = "SELECT ((SELECT 1 LIMIT 1) UNION (SELECT 2)), (SELECT * FROM ((SELECT 1 LIMIT 1) UNION (SELECT 2)) \
               struere_set_operation_0)";
    assert!(ok(sql).sql.ends_with("UNION SELECT 2) struere_set_operation_0)"), "{}", ok(sql).sql);
    // Unicode-escaped identifiers stay refused, whatever the spelling.
    let e = refused("SELECT ((SELECT U&\"d\\0061t\" FROM t LIMIT 1) UNION (SELECT 2))");
    assert!(e.to_string().contains("Unicode-escaped identifiers"), "{e}");
}
