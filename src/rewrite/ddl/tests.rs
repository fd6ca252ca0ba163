//! The allowlist walk and its printing, through the whole pipeline with the shipped policies
//! (the demo catalog: `entities`, `threads`, … are managed tables in `public`). Its helpers
//! (`actor`, `run`, `dev`, `first_tree`) serve the other pipeline tests of the rewrite too.

use crate::auth::identity::{ActorContext, ActorType, Environment};
use crate::rewrite::engine::scratch_schema;
use crate::rewrite::engine::tests::engine;
use crate::rewrite::{Refusal, Rewriter};

pub(crate) fn actor(env: Environment, role: &str) -> ActorContext {
    ActorContext {
        organization: "acme".into(),
        environment: env,
        roles: vec![role.to_owned()],
        actor_type: ActorType::User,
        actor_id: "u-1".into(),
    }
}

fn admin() -> ActorContext {
    actor(Environment::Development, "admin")
}

pub(crate) fn run(a: &ActorContext, sql: &str) -> Result<String, Refusal> {
    Rewriter::new(0, engine()).rewrite(sql, a).map(|r| r.sql.clone())
}

pub(crate) fn dev(sql: &str) -> Result<String, Refusal> {
    run(&admin(), sql)
}

/// A refusal with 42501 whose message contains `needle`.
fn refused(sql: &str, needle: &str) {
    match dev(sql) {
        Err(r @ (Refusal::Denied(_) | Refusal::Unverifiable(_))) => {
            assert!(r.to_string().contains(needle), "{sql}: {r}");
        }
        other => panic!("{sql}: expected a 42501 refusal naming {needle:?}, got {other:?}"),
    }
}

pub(crate) fn first_tree(sql: &str) -> String {
    let stmts = crate::rewrite::classify::parse(sql).unwrap();
    assert_eq!(stmts.len(), 1, "{sql}");
    crate::rewrite::pgtree::shape(&stmts[0].node).unwrap()
}

/// Each form sqlparser cannot read is forwarded as PostgreSQL prints it, reading back as the
/// client's own tree.
#[test]
fn scratch_ddl_sqlparser_cannot_read_is_printed_by_postgresql() {
    let cases: &[(&str, &str)] = &[
        ("ALTER SEQUENCE s RESTART WITH 1", "ALTER SEQUENCE s RESTART 1"),
        ("ALTER SEQUENCE s RESTART", "ALTER SEQUENCE s RESTART"),
        ("ALTER SEQUENCE IF EXISTS s AS bigint", "ALTER SEQUENCE IF EXISTS s AS bigint"),
        (
            "alter sequence s increment by -2 no minvalue maxvalue 99999999999999 start 5 cache 1 no cycle",
            "ALTER SEQUENCE s INCREMENT -2 NO MINVALUE MAXVALUE 99999999999999 START 5 CACHE 1 NO CYCLE",
        ),
        ("ALTER SEQUENCE s OWNED BY t.id", "ALTER SEQUENCE s OWNED BY t.id"),
        // PostgreSQL's tree holds NONE as the name "none", which is what its printer quotes.
        ("ALTER SEQUENCE s OWNED BY NONE", "ALTER SEQUENCE s OWNED BY \"none\""),
        ("ALTER SEQUENCE s RENAME TO s2", "ALTER SEQUENCE s RENAME TO s2"),
        (
            "ALTER TABLE \"t\" ALTER COLUMN \"c\" DROP IDENTITY IF EXISTS",
            "ALTER TABLE t ALTER COLUMN c DROP IDENTITY IF EXISTS",
        ),
        ("ALTER TABLE ONLY t ALTER COLUMN c DROP IDENTITY", "ALTER TABLE ONLY t ALTER COLUMN c DROP IDENTITY"),
        ("ALTER TABLE t ALTER COLUMN c SET STATISTICS 100", "ALTER TABLE t ALTER COLUMN c SET STATISTICS 100"),
        (
            "ALTER TABLE t ALTER COLUMN c TYPE varchar(10) COLLATE \"C\"",
            "ALTER TABLE t ALTER COLUMN c TYPE varchar(10) COLLATE \"C\"",
        ),
        (
            "ALTER TABLE t ALTER COLUMN c SET DATA TYPE text COLLATE pg_catalog.\"default\"",
            "ALTER TABLE t ALTER COLUMN c TYPE text COLLATE pg_catalog.\"default\"",
        ),
        (
            "ALTER TABLE t ALTER COLUMN c DROP IDENTITY, ALTER COLUMN c DROP NOT NULL, ALTER COLUMN c SET DEFAULT 'x'::text, \
             ADD COLUMN d int NOT NULL DEFAULT 1 UNIQUE, ADD CONSTRAINT k CHECK (d), DROP CONSTRAINT k2, DROP COLUMN e CASCADE",
            "ALTER TABLE t ALTER COLUMN c DROP IDENTITY, ALTER COLUMN c DROP NOT NULL, ALTER COLUMN c SET DEFAULT 'x'::text, \
             ADD COLUMN d int NOT NULL DEFAULT 1 UNIQUE, ADD CONSTRAINT k CHECK (d), DROP CONSTRAINT k2, DROP e CASCADE",
        ),
        ("CREATE INDEX i ON t (c) TABLESPACE pg_default", "CREATE INDEX i ON t USING btree (c) TABLESPACE pg_default"),
        (
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS \"i\" ON \"t\" USING gin (\"c\" text_pattern_ops DESC NULLS LAST) \
             INCLUDE (\"d\") WITH (fastupdate = off, fillfactor = 70) TABLESPACE \"pg_default\"",
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON t USING gin (c text_pattern_ops DESC NULLS LAST) \
             INCLUDE (d) WITH (fastupdate=off, fillfactor=70) TABLESPACE pg_default",
        ),
        (
            "CREATE INDEX i ON t (c COLLATE \"C\", (d::text)) TABLESPACE pg_default",
            "CREATE INDEX i ON t USING btree (c COLLATE \"C\", (d::text)) TABLESPACE pg_default",
        ),
        ("DROP INDEX CONCURRENTLY IF EXISTS i", "DROP INDEX CONCURRENTLY IF EXISTS i"),
        ("DROP INDEX CONCURRENTLY i CASCADE", "DROP INDEX CONCURRENTLY i CASCADE"),
        ("COMMENT ON CONSTRAINT c ON t IS 'it''s'", "COMMENT ON CONSTRAINT c ON t IS 'it''s'"),
        ("COMMENT ON CONSTRAINT c ON t IS NULL", "COMMENT ON CONSTRAINT c ON t IS NULL"),
        // A backslash: PostgreSQL's printer writes an E'' string, whatever the server's settings.
        ("COMMENT ON CONSTRAINT c ON t IS 'a\\b'", "COMMENT ON CONSTRAINT c ON t IS E'a\\\\b'"),
        (
            "CREATE TABLE t3 (a int, b int, FOREIGN KEY (a, b) REFERENCES t4 (a, b) ON DELETE SET NULL (b))",
            "CREATE TABLE t3 (a int, b int, FOREIGN KEY (a, b) REFERENCES t4 (a, b) ON DELETE SET NULL (b))",
        ),
        (
            "CREATE TEMP TABLE t3 (id bigint GENERATED BY DEFAULT AS IDENTITY (START WITH 5) PRIMARY KEY, \
             b int REFERENCES t4 ON DELETE SET DEFAULT (b) DEFERRABLE INITIALLY DEFERRED) ON COMMIT DROP",
            "CREATE TEMPORARY TABLE t3 (id bigint GENERATED BY DEFAULT AS IDENTITY (START 5 ) PRIMARY KEY, \
             b int REFERENCES t4 ON DELETE SET DEFAULT (b) DEFERRABLE INITIALLY DEFERRED) ON COMMIT DROP",
        ),
        (
            "CREATE TABLE t2 (a int, CONSTRAINT u UNIQUE (a) USING INDEX TABLESPACE pg_default)",
            "CREATE TABLE t2 (a int, CONSTRAINT u UNIQUE (a) USING INDEX TABLESPACE pg_default)",
        ),
    ];
    for (sql, want) in cases {
        let out = dev(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(&out, want, "{sql}");
        assert_eq!(first_tree(&out), first_tree(sql), "{sql}");
    }
}

/// Names in the caller's own scratch schema or `pg_temp` may be qualified, like DDL sqlparser
/// reads; types and collations may also come from the catalog.
#[test]
fn qualified_names_in_the_callers_own_schemas() {
    let own = scratch_schema(&admin());
    for sql in [
        format!("ALTER SEQUENCE {own}.s RESTART"),
        format!("DROP INDEX CONCURRENTLY {own}.i"),
        format!("COMMENT ON CONSTRAINT c ON {own}.t IS 'x'"),
        format!("ALTER TABLE pg_temp.t ALTER COLUMN c TYPE {own}.mood COLLATE pg_catalog.\"C\""),
        format!("CREATE INDEX i ON {own}.t (c {own}.ops) TABLESPACE pg_default"),
        format!("CREATE TABLE {own}.t3 (a pg_catalog.int4 REFERENCES {own}.t4 ON DELETE SET NULL (a))"),
    ] {
        dev(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// Names that need quoting come out quoted by PostgreSQL's printer (`quote_identifier`), and
/// odd characters survive exactly.
#[test]
fn names_are_quoted_by_postgresql() {
    let cases: &[(&str, &str)] = &[
        ("DROP INDEX CONCURRENTLY \"Select\"", "DROP INDEX CONCURRENTLY \"Select\""),
        ("DROP INDEX CONCURRENTLY \"select\"", "DROP INDEX CONCURRENTLY \"select\""),
        (
            "ALTER TABLE \"order\" ALTER COLUMN \"from\" DROP IDENTITY",
            "ALTER TABLE \"order\" ALTER COLUMN \"from\" DROP IDENTITY",
        ),
        // Unicode escapes in, plain names out.
        ("DROP INDEX CONCURRENTLY U&\"\\0069\"", "DROP INDEX CONCURRENTLY i"),
        (
            "COMMENT ON CONSTRAINT \"c\"\"; DROP TABLE x; --\" ON \"t \"\"odd\"\" \" IS 'it''s; --'",
            "COMMENT ON CONSTRAINT \"c\"\"; DROP TABLE x; --\" ON \"t \"\"odd\"\" \" IS 'it''s; --'",
        ),
        ("ALTER SEQUENCE \"s\\'\" RESTART WITH 1", "ALTER SEQUENCE \"s\\'\" RESTART 1"),
        ("DROP INDEX CONCURRENTLY \"é ü\"", "DROP INDEX CONCURRENTLY \"é ü\""),
    ];
    for (sql, want) in cases {
        let out = dev(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(&out, want, "{sql}");
        assert_eq!(first_tree(&out), first_tree(sql), "{sql}");
    }
}

#[test]
fn other_schemas_managed_tables_and_catalogs_are_refused() {
    for (sql, needle) in [
        ("ALTER SEQUENCE public.s RESTART", "unmanaged objects live in the tenant's own scratch schema"),
        ("ALTER SEQUENCE scratch_0123456789.s RESTART", "scratch schema"),
        ("ALTER SEQUENCE pg_catalog.s RESTART", "pg_catalog.s"),
        ("ALTER SEQUENCE app.public.s RESTART", "not supported"),
        ("ALTER SEQUENCE s OWNED BY entities.id", "managed table entities"),
        ("ALTER SEQUENCE s OWNED BY public.t.id", "public.t"),
        ("ALTER SEQUENCE s RENAME TO entities", "managed table entities"),
        ("ALTER SEQUENCE public.s RENAME TO s2", "public.s"),
        ("ALTER TABLE entities ALTER COLUMN id DROP IDENTITY", "managed table entities"),
        ("ALTER TABLE public.threads ALTER COLUMN id SET STATISTICS 0", "managed table threads"),
        ("ALTER TABLE scratch_0123456789.t ALTER COLUMN c DROP IDENTITY", "scratch schema"),
        ("ALTER TABLE information_schema.t ALTER COLUMN c DROP IDENTITY", "information_schema.t"),
        ("CREATE INDEX i ON entities (id) TABLESPACE pg_default", "managed table entities"),
        ("CREATE INDEX entities ON t (c) TABLESPACE pg_default", "managed table entities"),
        ("CREATE INDEX i ON pg_catalog.pg_class (oid) TABLESPACE pg_default", "pg_catalog.pg_class"),
        ("DROP INDEX CONCURRENTLY public.entities_pkey", "public.entities_pkey"),
        ("DROP INDEX CONCURRENTLY pg_catalog.pg_class_oid_index", "pg_catalog"),
        // Every object of a DROP: one managed or foreign name refuses the statement.
        ("DROP INDEX CONCURRENTLY IF EXISTS i, entities", "managed table entities"),
        ("DROP INDEX CONCURRENTLY IF EXISTS i, public.j", "public.j"),
        ("COMMENT ON CONSTRAINT c ON entities IS 'x'", "managed table entities"),
        ("COMMENT ON CONSTRAINT c ON scratch_0123456789.t IS 'x'", "scratch schema"),
        ("COMMENT ON CONSTRAINT c ON pg_catalog.pg_class IS 'x'", "pg_catalog.pg_class"),
        ("CREATE TABLE t3 (a int REFERENCES entities ON DELETE SET NULL (a))", "managed table entities"),
        ("CREATE TABLE t3 (a int REFERENCES scratch_0123456789.t ON DELETE SET NULL (a))", "scratch schema"),
        ("CREATE TABLE public.t3 (a int REFERENCES t ON DELETE SET NULL (a))", "public.t3"),
        ("CREATE TEMP TABLE entities (a int REFERENCES t ON DELETE SET NULL (a))", "managed table entities"),
        ("CREATE TABLE t3 (a scratch_0123456789.mood REFERENCES t ON DELETE SET NULL (a))", "the type"),
        ("ALTER TABLE t ALTER COLUMN c TYPE text COLLATE public.\"C\"", "the collation public.C"),
        ("ALTER TABLE t ALTER COLUMN c TYPE text COLLATE scratch_0123456789.x", "the collation"),
        ("CREATE INDEX i ON t (c public.ops) TABLESPACE pg_default", "the operator class public.ops"),
    ] {
        refused(sql, needle);
    }
}

#[test]
fn code_tablespaces_and_other_constructs_are_refused() {
    for (sql, needle) in [
        // Function calls, operators and subqueries, wherever an expression may stand.
        ("ALTER TABLE t ALTER COLUMN c DROP IDENTITY, ALTER COLUMN d SET DEFAULT now()", "a function call"),
        ("ALTER TABLE t ALTER COLUMN c DROP IDENTITY, ALTER COLUMN d SET DEFAULT (SELECT 1)", "a subquery"),
        ("ALTER TABLE t ALTER COLUMN c TYPE text COLLATE \"C\" USING lower(c)", "a function call"),
        ("ALTER TABLE t ALTER COLUMN c TYPE text COLLATE \"C\" USING (SELECT data FROM entities)", "a subquery"),
        ("CREATE TABLE t3 (a int DEFAULT nextval('s') REFERENCES t ON DELETE SET NULL (a))", "a function call"),
        ("CREATE TABLE t3 (a int CHECK (a IS NULL) REFERENCES t ON DELETE SET NULL (a))", "NullTest"),
        // A call outside the allowlist is refused before the DDL walk (the complete walk of
        // `check_pg`; pg_query's nodes() skips column constraints).
        ("CREATE TABLE t3 (a int CHECK (pg_sleep(1) IS NULL) REFERENCES t ON DELETE SET NULL (a))", "pg_sleep"),
        (
            "CREATE TABLE t3 (a int GENERATED ALWAYS AS (a) STORED, FOREIGN KEY (a) REFERENCES t ON DELETE SET NULL (a))",
            "GENERATED",
        ),
        ("ALTER TABLE t ADD COLUMN x int DEFAULT $1, ALTER COLUMN c DROP IDENTITY", "a parameter"),
        // Tablespaces are cluster-wide.
        ("CREATE INDEX i ON t (c) TABLESPACE other", "tablespace other"),
        ("CREATE TABLE t2 (a int, UNIQUE (a) USING INDEX TABLESPACE other)", "tablespace other"),
        ("CREATE TABLE t2 (a int REFERENCES t ON DELETE SET NULL (a)) TABLESPACE other", "tablespace other"),
        ("ALTER TABLE t SET TABLESPACE other, ALTER COLUMN c DROP IDENTITY", "SetTableSpace"),
        // Statements and clauses outside the allowlist.
        ("ALTER TABLE t OWNER TO postgres, ALTER COLUMN c DROP IDENTITY", "ChangeOwner"),
        ("ALTER TABLE t DISABLE TRIGGER ALL, ALTER COLUMN c DROP IDENTITY", "DisableTrig"),
        ("ALTER TABLE t ALTER COLUMN c SET STORAGE PLAIN, ALTER COLUMN c DROP IDENTITY", "SetStorage"),
        ("ALTER INDEX i ALTER COLUMN 1 SET STATISTICS 100", "ALTER INDEX"),
        ("ALTER SEQUENCE s SEQUENCE NAME public.x", "the sequence option sequence_name"),
        (
            "ALTER TABLE t ADD COLUMN id int GENERATED BY DEFAULT AS IDENTITY (SEQUENCE NAME public.x), \
             ALTER COLUMN c DROP IDENTITY",
            "sequence_name",
        ),
        ("CREATE TABLE t5 (LIKE entities, a int REFERENCES t ON DELETE SET NULL (a))", "TableLikeClause"),
        ("CREATE TABLE t5 (a int REFERENCES t ON DELETE SET NULL (a)) INHERITS (entities)", "INHERITS"),
        ("CREATE TABLE t5 (a int STORAGE PLAIN REFERENCES t ON DELETE SET NULL (a))", "STORAGE"),
        ("CREATE INDEX i ON t (c) WITH (autovacuum_enabled = off) TABLESPACE pg_default", "autovacuum_enabled"),
        ("CREATE INDEX i ON t USING bloom (c) TABLESPACE pg_default", "access method bloom"),
        ("DROP INDEX CONCURRENTLY __struere_i", "reserved"),
        ("COMMENT ON CONSTRAINT __struere_raw_x ON t IS 'x'", "reserved"),
        ("COMMENT ON CONSTRAINT c ON DOMAIN d IS 'x'", "TypeName"),
        ("COMMENT ON COLLATION c IS 'x'", "COMMENT ON COLLATION"),
        ("ALTER TABLE t ALTER COLUMN c DROP IDENTITY, FORCE ROW LEVEL SECURITY", "ForceRowSecurity"),
        ("ALTER TABLE t ALTER COLUMN c DROP IDENTITY, INHERIT entities", "AddInherit"),
    ] {
        refused(sql, needle);
    }
}

/// Partial and expression indexes with `TABLESPACE pg_default` (Django's `*_partial_tablespace`
/// tests): the allowlist reads no expression, so they take the usual way without the tablespace
/// (the policy's CREATE INDEX rules and function allowlist), and PostgreSQL's printer prints the
/// verified rewrite with the tablespace put back. Everything but the expressions still passes the
/// allowlist.
#[test]
fn partial_and_expression_indexes_in_the_default_tablespace() {
    for (sql, want) in [
        (
            "CREATE INDEX \"test_op_class_descending_partial_tablespace\" ON \"postgres_tests_textfieldmodel\" \
             ((LOWER(\"field\")) text_pattern_ops DESC) TABLESPACE \"pg_default\" WHERE \"field\"::text LIKE '%China%'",
            "CREATE INDEX test_op_class_descending_partial_tablespace ON postgres_tests_textfieldmodel USING btree \
             (lower(field) text_pattern_ops DESC) TABLESPACE pg_default WHERE field::text LIKE '%China%'",
        ),
        (
            "CREATE INDEX \"char_field_gin_partial_idx\" ON \"postgres_tests_charfieldmodel\" USING gin (\"field\") \
             TABLESPACE \"pg_default\" WHERE LOWER(\"field\") = 'x'",
            "CREATE INDEX char_field_gin_partial_idx ON postgres_tests_charfieldmodel USING gin (field) \
             TABLESPACE pg_default WHERE lower(field) = 'x'",
        ),
        (
            "CREATE UNIQUE INDEX IF NOT EXISTS i ON t (c, (d || 'x') COLLATE \"C\") INCLUDE (e) TABLESPACE pg_default WHERE c > 0",
            "CREATE UNIQUE INDEX IF NOT EXISTS i ON t USING btree (c, (d || 'x') COLLATE \"C\") INCLUDE (e) \
             TABLESPACE pg_default WHERE c > 0",
        ),
    ] {
        let out = dev(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(out, want, "{sql}");
        assert_eq!(first_tree(&out), first_tree(sql), "{sql}");
    }
    for (sql, needle) in [
        // The policy decides on the expressions, as without the tablespace.
        ("CREATE INDEX i ON t (pg_sleep(1)) TABLESPACE pg_default", "pg_sleep"),
        ("CREATE INDEX i ON t (c) TABLESPACE pg_default WHERE pg_sleep(1) IS NULL", "pg_sleep"),
        // The rest is the allowlist's.
        ("CREATE INDEX entities ON t (lower(c)) TABLESPACE pg_default", "managed table entities"),
        ("CREATE INDEX __struere_i ON t (lower(c)) TABLESPACE pg_default", "reserved"),
        ("CREATE INDEX i ON entities (lower(c)) TABLESPACE pg_default", "entities"),
        ("CREATE INDEX i ON t USING bloom (lower(c)) TABLESPACE pg_default", "access method bloom"),
        ("CREATE INDEX i ON t (lower(c)) WITH (autovacuum_enabled = off) TABLESPACE pg_default", "autovacuum_enabled"),
        ("CREATE INDEX i ON t (lower(c) public.my_ops) TABLESPACE pg_default", "operator class"),
        ("CREATE INDEX i ON t (lower(c)) TABLESPACE other", "tablespace other"),
        ("CREATE INDEX i ON t (c) TABLESPACE other WHERE c > 0", "tablespace other"),
    ] {
        refused(sql, needle);
    }
    let r = run(&actor(Environment::Production, "admin"), "CREATE INDEX i ON t (lower(c)) TABLESPACE pg_default");
    assert!(matches!(r, Err(Refusal::Denied(_))), "{r:?}");
}

/// `ALTER COLUMN … TYPE … COLLATE … USING …` (Django's change of a column's type and collation):
/// pg_query 18.1's printer writes the COLLATE after the USING expression, where PostgreSQL reads it
/// as a collation of that expression, so the proxy prints this form itself from the allowlisted
/// tree, and the verifier proves it reads back as the client's tree.
#[test]
fn alter_column_type_with_collate_and_using_is_printed_by_the_proxy() {
    let cases: &[(&str, &str)] = &[
        (
            "ALTER TABLE \"schema_note\" ALTER COLUMN \"info\" TYPE varchar(255) COLLATE \"sv-x-icu\" USING \"info\"::varchar(255)",
            "ALTER TABLE \"schema_note\" ALTER COLUMN \"info\" TYPE \"pg_catalog\".\"varchar\"(255) COLLATE \"sv-x-icu\" \
             USING CAST(\"info\" AS \"pg_catalog\".\"varchar\"(255))",
        ),
        (
            "ALTER TABLE IF EXISTS ONLY t ALTER COLUMN \"A b\" SET DATA TYPE text[] COLLATE pg_catalog.\"default\" \
             USING NULL, ALTER c TYPE numeric(10, 2) COLLATE \"C\" USING -1.5e3",
            "ALTER TABLE IF EXISTS ONLY \"t\" ALTER COLUMN \"A b\" TYPE \"text\"[] COLLATE \"pg_catalog\".\"default\" USING NULL, \
             ALTER COLUMN \"c\" TYPE \"pg_catalog\".\"numeric\"(10, 2) COLLATE \"C\" USING -1.5e3",
        ),
    ];
    for (sql, want) in cases {
        let out = dev(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(&out, want, "{sql}");
        assert_eq!(first_tree(&out), first_tree(sql), "{sql}");
    }
    // Whatever the type, constant or quoting, the printing reads back as the client's tree.
    let own = scratch_schema(&admin());
    for (t, using) in [
        ("timestamp(3) with time zone", "'2020-01-01 00:00'::timestamptz"),
        ("interval day to second(3)", "CAST('1 day' AS interval hour)"),
        ("\"char\"", "'x'"),
        ("char", "E'it\\'s \\\\ \"q\"'"),
        ("character varying(5)", "('x' COLLATE \"C\")::text"),
        ("bit varying(5)", "B'0101'::varbit"),
        ("bytea", "X'1F'::bytea"),
        ("double precision", "-5"),
        ("boolean", "true"),
        ("int[3][]", "'{}'::int[]"),
        ("\"My Type\"", "c::\"My Type\""),
        (&format!("{own}.mood"), "c::text::mood"),
        ("text", "$$dollar ' quoted$$"),
        ("text", "U&'\\0041'"),
    ] {
        let sql = format!("ALTER TABLE t ALTER COLUMN c TYPE {t} COLLATE \"C\" USING {using}");
        let out = dev(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(first_tree(&out), first_tree(&sql), "{sql} → {out}");
    }
    // Only the allowlist's expressions, and this form only on its own.
    for (sql, needle) in [
        ("ALTER TABLE t ALTER COLUMN c TYPE text COLLATE \"C\" USING c || 'x'", "an operator"),
        ("ALTER TABLE t ALTER COLUMN c TYPE text COLLATE \"C\" USING t.c", "a qualified column reference"),
        (
            "ALTER TABLE t ALTER COLUMN c TYPE text COLLATE \"C\" USING c, ALTER COLUMN d DROP NOT NULL",
            "together with other subcommands",
        ),
        ("ALTER TABLE entities ALTER COLUMN c TYPE text COLLATE \"C\" USING c", "entities"),
        ("ALTER TABLE t ALTER COLUMN c TYPE text COLLATE public.\"C\" USING c", "the collation public.C"),
    ] {
        refused(sql, needle);
    }
}

/// DDL rules follow the caller: production keys and roles without unmanaged tables run none.
#[test]
fn only_development_roles_granted_unmanaged_tables() {
    for a in [actor(Environment::Production, "admin"), actor(Environment::Development, "teacher")] {
        for sql in
            ["ALTER SEQUENCE s RESTART", "DROP INDEX CONCURRENTLY i", "CREATE INDEX i ON t (c) TABLESPACE pg_default"]
        {
            let r = run(&a, sql);
            assert!(matches!(r, Err(Refusal::Denied(_))), "{sql}: {r:?}");
        }
    }
}

/// Statements sqlparser reads never take this way, and kinds outside the list keep their
/// syntax refusal.
#[test]
fn only_statements_sqlparser_cannot_read_of_the_listed_kinds() {
    // sqlparser reads it: its own printer, not PostgreSQL's (which would add USING btree).
    assert_eq!(dev("CREATE INDEX i ON t (c)").unwrap(), "CREATE INDEX i ON t(c)");
    let r = dev("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO public");
    assert!(matches!(r, Err(Refusal::Syntax(_) | Refusal::Denied(_))), "{r:?}");
    let r = dev("ALTER SEQUENCE s SET SCHEMA public");
    assert!(matches!(r, Err(Refusal::Syntax(_))), "{r:?}");
    let r = dev("SELECT 1 LIMIT (SELECT 1 FROM t FOR NO KEY UPDATE)");
    assert!(matches!(r, Err(Refusal::Syntax(_))), "{r:?}");
}

/// Several statements in one message: each goes its own way, and the whole is verified.
#[test]
fn mixed_with_other_statements() {
    let out =
        dev("BEGIN; ALTER SEQUENCE s RESTART WITH 1; SELECT 1; DROP INDEX CONCURRENTLY IF EXISTS i; COMMIT").unwrap();
    assert_eq!(out, "BEGIN; ALTER SEQUENCE s RESTART 1; SELECT 1; DROP INDEX CONCURRENTLY IF EXISTS i; COMMIT");
}

/// Foreign-key targets, tablespaces, types and collations are checked on PostgreSQL's tree for
/// DDL sqlparser reads too (pg_query's node iterator never reaches a constraint).
#[test]
fn references_and_tablespaces_of_ddl_sqlparser_reads() {
    for sql in [
        "CREATE TABLE x (a int REFERENCES t (id))",
        "ALTER TABLE x ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES t (id) DEFERRABLE INITIALLY DEFERRED",
        "CREATE TABLE x (a text COLLATE \"C\", b pg_catalog.int4) TABLESPACE pg_default",
    ] {
        dev(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    for (sql, needle) in [
        ("CREATE TABLE x (a int REFERENCES scratch_0123456789.t (id))", "scratch schema"),
        ("CREATE TABLE x (a int, FOREIGN KEY (a) REFERENCES entities)", "managed table entities"),
        ("CREATE TABLE x (a int REFERENCES public.entities (id))", "managed table entities"),
        ("ALTER TABLE x ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES scratch_0123456789.t (id)", "scratch schema"),
        ("ALTER TABLE x ADD COLUMN b int REFERENCES public.other", "public.other"),
        ("CREATE TABLE x (a scratch_0123456789.mood)", "the type scratch_0123456789.mood"),
        ("CREATE TABLE x (a text COLLATE scratch_0123456789.c)", "the collation"),
        ("CREATE TABLE x (a int) TABLESPACE foo", "tablespace foo"),
        ("CREATE TABLE x (a int PRIMARY KEY USING INDEX TABLESPACE foo)", "tablespace foo"),
        ("CREATE TABLE x TABLESPACE foo AS SELECT 1 AS a", "tablespace foo"),
    ] {
        refused(sql, needle);
    }
}

/// What the pipeline forwards is a fixed point of it (the fuzz target's idempotence): when
/// sqlparser can read PostgreSQL's printing, the usual printer prints it.
#[test]
fn outputs_are_fixed_points() {
    let pass = || Rewriter::new(0, std::sync::Arc::new(crate::rewrite::policy::PassThrough));
    for sql in [
        "CREATE INDEX U&\"\\0069\" ON t (c)",
        "DROP TABLE U&\"\\0074\"",
        "DROP INDEX CONCURRENTLY U&\"\\0069\"",
        "ALTER SEQUENCE s OWNED BY NONE",
        "CREATE TEMP TABLE t3 (b int REFERENCES t4 ON DELETE SET NULL (b)) ON COMMIT DROP",
        "COMMENT ON CONSTRAINT c ON t IS 'a\\b'",
        "CREATE INDEX i ON t (c) TABLESPACE pg_default",
    ] {
        for rewriter in [pass(), Rewriter::new(0, engine())] {
            let first = rewriter.rewrite(sql, &admin()).unwrap_or_else(|e| panic!("{sql}: {e}"));
            let again = rewriter.rewrite(&first.sql, &admin()).unwrap_or_else(|e| panic!("{}: {e}", first.sql));
            assert_eq!(again.sql, first.sql, "{sql}");
            assert_eq!(first_tree(&first.sql), first_tree(sql), "{sql}");
        }
    }
}

/// The same for SELECTs whose locking clause sqlparser cannot read (rewrite/locking.rs).
#[test]
fn locked_selects_are_fixed_points() {
    let pass = Rewriter::new(0, std::sync::Arc::new(crate::rewrite::policy::PassThrough));
    for sql in [
        "select a, 'it''s' from t where a = 1 for no key update",
        "SELECT t.a FROM t JOIN u ON t.a = u.a FOR UPDATE OF t, u NOWAIT",
        "SELECT a FROM t FOR KEY SHARE OF t FOR NO KEY UPDATE OF t SKIP LOCKED",
    ] {
        let first = pass.rewrite(sql, &admin()).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let again = pass.rewrite(&first.sql, &admin()).unwrap_or_else(|e| panic!("{}: {e}", first.sql));
        assert_eq!(again.sql, first.sql, "{sql}");
        assert_eq!(first_tree(&first.sql), first_tree(sql), "{sql}");
    }
}

/// `ALTER TYPE … ADD / DROP / ALTER ATTRIBUTE` (asyncpg's type-cache tests) on the caller's own
/// composite types: PostgreSQL's printing of the client's tree, attributes as `CREATE TYPE … AS
/// (…)` declares them.
#[test]
fn alter_type_attributes_of_scratch_composite_types() {
    let own = scratch_schema(&admin());
    for sql in [
        "ALTER TYPE typ1 ADD ATTRIBUTE c text".to_owned(),
        "ALTER TYPE typ1 DROP ATTRIBUTE x".to_owned(),
        "ALTER TYPE typ1 DROP ATTRIBUTE IF EXISTS x CASCADE".to_owned(),
        "ALTER TYPE typ1 ALTER ATTRIBUTE x TYPE text".to_owned(),
        "ALTER TYPE typ1 ALTER ATTRIBUTE x SET DATA TYPE varchar(10) COLLATE \"C\" RESTRICT".to_owned(),
        "ALTER TYPE typ1 DROP ATTRIBUTE y, ADD ATTRIBUTE y bigint[] COLLATE pg_catalog.\"default\"".to_owned(),
        format!("ALTER TYPE {own}.typ1 ADD ATTRIBUTE c {own}.mood"),
        "ALTER TYPE pg_temp.typ1 ADD ATTRIBUTE \"Odd \"\" name\" pg_catalog.int4".to_owned(),
    ] {
        let out = dev(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(first_tree(&out), first_tree(&sql), "{sql} → {out}");
    }
    for (sql, needle) in [
        // Another schema, another tenant's scratch schema, the catalog, a managed table's name.
        ("ALTER TYPE public.typ1 ADD ATTRIBUTE c text", "cannot alter the type public.typ1"),
        ("ALTER TYPE scratch_0123456789.typ1 ADD ATTRIBUTE c text", "cannot alter the type scratch_0123456789.typ1"),
        ("ALTER TYPE pg_catalog.pg_class ADD ATTRIBUTE c text", "pg_catalog.pg_class"),
        ("ALTER TYPE entities ADD ATTRIBUTE c text", "managed table entities"),
        // Attribute types and collations from the catalog or the caller's own schemas only.
        ("ALTER TYPE typ1 ADD ATTRIBUTE c scratch_0123456789.mood", "the type scratch_0123456789.mood"),
        ("ALTER TYPE typ1 ADD ATTRIBUTE c public.mood", "the type public.mood"),
        ("ALTER TYPE typ1 ALTER ATTRIBUTE c TYPE other.t", "the type other.t"),
        ("ALTER TYPE typ1 ADD ATTRIBUTE c text COLLATE public.\"C\"", "the collation public.C"),
        ("ALTER TYPE typ1 ALTER ATTRIBUTE c TYPE text COLLATE scratch_0123456789.c", "the collation"),
        ("ALTER TYPE typ1 ADD ATTRIBUTE __struere_raw_c text", "reserved"),
        ("ALTER TYPE typ1 DROP ATTRIBUTE __struere_in_scope", "reserved"),
    ] {
        match dev(sql) {
            Err(r @ (Refusal::Denied(_) | Refusal::Unverifiable(_) | Refusal::Syntax(_))) => {
                assert!(r.to_string().contains(needle), "{sql}: {r}");
            }
            other => panic!("{sql}: expected a refusal naming {needle:?}, got {other:?}"),
        }
    }
    // Everything else ALTER TYPE does stays refused (other statement kinds).
    for sql in [
        "ALTER TYPE typ1 OWNER TO postgres",
        "ALTER TYPE typ1 SET SCHEMA public",
        "ALTER TYPE typ1 RENAME ATTRIBUTE a TO b",
        "ALTER TYPE typ1 RENAME TO typ2",
        "ALTER TYPE mood ADD VALUE 'x'",
    ] {
        assert!(dev(sql).is_err(), "{sql}");
    }
    // Production keys and roles without unmanaged tables alter no type.
    for a in [actor(Environment::Production, "admin"), actor(Environment::Development, "teacher")] {
        let r = run(&a, "ALTER TYPE typ1 ADD ATTRIBUTE c text");
        assert!(matches!(r, Err(Refusal::Denied(_))), "{r:?}");
    }
}

/// `CREATE TYPE … AS (…)`, which sqlparser reads: its attributes' types and collations follow the
/// rules of a table's columns (`ddl::check_names`), so a composite type never pins another tenant's
/// scratch type or reaches another schema.
#[test]
fn composite_type_attributes_are_checked_like_columns() {
    let own = scratch_schema(&admin());
    for sql in [
        "CREATE TYPE typ1 AS (a int, b text COLLATE \"C\", c pg_catalog.int8[])".to_owned(),
        format!("CREATE TYPE typ2 AS (a {own}.mood, b text COLLATE {own}.c)"),
    ] {
        dev(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    for (sql, needle) in [
        ("CREATE TYPE typ1 AS (a scratch_0123456789.mood)", "the type scratch_0123456789.mood"),
        ("CREATE TYPE typ1 AS (a int, b public.x)", "the type public.x"),
        ("CREATE TYPE typ1 AS (a text COLLATE other.c)", "the collation other.c"),
    ] {
        refused(sql, needle);
    }
}
