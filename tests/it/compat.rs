//! Client compatibility in CI (issue 6): the runner's psql checks (`scripts/compat/psql.sql`)
//! and JDBC program (`scripts/compat/jdbc/Compat.java`, Debian's pgjdbc) through a development
//! key and an operator key, and regression tests for what the full runner (`scripts/compat.sh`)
//! surfaced.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use struere_proxy::auth::identity::{ActorType, Environment};

use crate::harness::{code, fixture, unique};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every check name of the psql script, in order.
fn psql_checks() -> Vec<String> {
    let script = std::fs::read_to_string(repo().join("scripts/compat/psql.sql")).expect("psql.sql");
    script.lines().filter_map(|l| l.strip_prefix("\\echo PASS ")).map(|s| s.trim().to_owned()).collect()
}

/// `refused`: the checks this key deliberately refuses (`REFUSED name`).
fn run_psql_checks(key: &str, label: &str, refused: &[&str]) {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let table = unique(&format!("compat_psql_{label}"));
    let out = Command::new(&f.psql)
        .arg("-X")
        .arg("-f")
        .arg(repo().join("scripts/compat/psql.sql"))
        .args(["-v", &format!("t={table}"), "-v", &format!("dir={}", dir.path().display())])
        .arg(format!("host=127.0.0.1 port={} user=compat dbname=app password={key} sslmode=prefer", f.addr.port()))
        .output()
        .expect("psql runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let passed: Vec<String> = stdout.lines().filter_map(|l| l.strip_prefix("PASS ")).map(str::to_owned).collect();
    assert!(out.status.success(), "psql checks through the {label} key failed:\n{stdout}\n{stderr}");
    let got_refused: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("REFUSED ")).collect();
    assert_eq!(got_refused, refused, "{stdout}");
    let expected: Vec<String> = psql_checks().into_iter().filter(|c| !refused.contains(&c.as_str())).collect();
    assert_eq!(passed, expected, "{stdout}");
    assert!(stdout.contains("gexec_value"), "{stdout}");
}

#[test]
fn psql_checks_through_a_development_key() {
    // \dt+ shows table sizes: pg_table_size is refused (README, deliberate refusals).
    run_psql_checks(&fixture().dev_key, "dev", &["dt_plus"]);
}

#[test]
fn psql_checks_through_an_operator_key() {
    run_psql_checks(&fixture().operator_key, "op", &[]);
}

const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Compat.java compiled once per test binary (scripts/setup.sh test installs the JDK and the
/// driver).
fn jdbc_classes() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        assert!(Path::new(JDBC_JAR).exists(), "{JDBC_JAR} is missing: run bash scripts/setup.sh test");
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("javac")
            .args(["-cp", JDBC_JAR, "-d"])
            .arg(dir.path())
            .arg(repo().join("scripts/compat/jdbc/Compat.java"))
            .output()
            .expect("javac runs (bash scripts/setup.sh test installs it)");
        assert!(out.status.success(), "javac: {}", String::from_utf8_lossy(&out.stderr));
        dir
    })
    .path()
}

fn run_jdbc(key: &str, label: &str) {
    let f = fixture();
    let classes = jdbc_classes();
    let table = unique(&format!("compat_jdbc_{label}"));
    let out = Command::new("java")
        .arg("-cp")
        .arg(format!("{JDBC_JAR}:{}", classes.display()))
        .arg("Compat")
        .args(["127.0.0.1", &f.addr.port().to_string(), "app", "compat", key, &table])
        .output()
        .expect("java runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "JDBC checks through the {label} key failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    for check in
        ["batch_insert", "named_prepared_binary_roundtrip", "fetch_size_cursor", "savepoints", "copy_in_and_out"]
    {
        assert!(stdout.contains(&format!("PASS {check}\n")), "{check}: {stdout}");
    }
    for check in ["listen_notify", "cancel", "database_metadata"] {
        assert!(stdout.contains(&format!("PASS {check}\n")), "{check}: {stdout}");
    }
}

#[test]
fn jdbc_program_through_a_development_key() {
    run_jdbc(&fixture().dev_key, "dev");
}

#[test]
fn jdbc_program_through_an_operator_key() {
    run_jdbc(&fixture().operator_key, "op");
}

/// psql scripts and ORMs comment their tables; on the caller's own scratch tables that is DDL
/// like any other, on a managed table it is refused.
#[tokio::test]
async fn comments_on_scratch_tables_and_columns() {
    let f = fixture();
    let c = f.dev().await;
    let t = unique("compat_comment");
    c.batch_execute(&format!("CREATE TABLE {t} (id int PRIMARY KEY, name text)")).await.unwrap();
    c.batch_execute(&format!("COMMENT ON TABLE {t} IS 'it''s a scratch table'")).await.unwrap();
    c.batch_execute(&format!("COMMENT ON COLUMN {t}.name IS 'a name'")).await.unwrap();
    let row = c
        .query_one(
            &format!("SELECT obj_description('{t}'::regclass, 'pg_class'), col_description('{t}'::regclass, 2)"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("it's a scratch table"));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("a name"));
    c.batch_execute(&format!("COMMENT ON TABLE {t} IS NULL")).await.unwrap();
    for refused in [
        "COMMENT ON TABLE entities IS 'x'",
        "COMMENT ON COLUMN entities.data IS 'x'",
        "COMMENT ON TABLE public.organizations IS 'x'",
        "COMMENT ON SCHEMA public IS 'x'",
    ] {
        let e = c.batch_execute(refused).await.expect_err(refused);
        assert_eq!(code(&e), "42501", "{refused}: {e}");
    }
    c.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

/// Sequences in the scratch schema (ORMs create them for identity-less serials and their own
/// id generators); a qualified one elsewhere is refused like any scratch DDL.
#[tokio::test]
async fn sequences_in_the_scratch_schema() {
    let f = fixture();
    let c = f.dev().await;
    let s = unique("compat_seq");
    c.batch_execute(&format!("CREATE SEQUENCE {s} START 10 INCREMENT BY 5")).await.unwrap();
    let row = c.query_one(&format!("SELECT nextval('{s}'), nextval('{s}')"), &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (10, 15));
    let schema: String = c
        .query_one(
            &format!(
                "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relname = '{s}' AND c.relkind = 'S'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(schema.starts_with("scratch_"), "{schema}");
    c.batch_execute(&format!("DROP SEQUENCE {s}")).await.unwrap();
    let e = c.batch_execute("CREATE SEQUENCE public.compat_elsewhere").await.unwrap_err();
    assert_eq!(code(&e), "42501", "{e}");
}

/// pgjdbc's getPrimaryKeys and getIndexInfo call information_schema's helper functions.
#[tokio::test]
async fn information_schema_helpers_for_driver_metadata() {
    let f = fixture();
    let c = f.dev().await;
    let rows = c
        .query(
            "SELECT (information_schema._pg_expandarray(i.indkey)).n FROM pg_catalog.pg_index i \
             WHERE i.indrelid = 'entities'::regclass AND i.indisprimary",
            &[],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty());
    let e = c.query("SELECT _pg_expandarray(ARRAY[1])", &[]).await.unwrap_err();
    assert_eq!(code(&e), "42501", "{e}");
}

/// NoticeResponses the server sends during startup (here: the 65-character application_name
/// is truncated) reach the client, as they would directly (tokio-postgres' `notices` test).
#[tokio::test]
async fn startup_notices_reach_the_client() {
    let f = fixture();
    for key in [&f.dev_key, &f.operator_key] {
        // A name of its own: a pooled connection's startup notices are long gone.
        let name = format!("{:x<65}", unique("n"));
        let url = format!("{} application_name={name}", f.url(key));
        let (client, mut notices) = crate::harness::connect_with_notices(&url).await;
        client.batch_execute("SELECT 1").await.unwrap();
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), notices.recv()).await;
        let first = first.expect("a startup notice").expect("notice channel open");
        assert!(first.contains("will be truncated"), "{first}");
    }
}

/// Enum and composite types in the scratch schema (tokio-postgres' custom_enum and
/// custom_composite tests); range types name support functions and stay refused.
#[tokio::test]
async fn enum_and_composite_types_in_the_scratch_schema() {
    let f = fixture();
    let c = f.dev().await;
    let e = unique("compat_mood");
    let p = unique("compat_pair");
    c.batch_execute(&format!("CREATE TYPE {e} AS ENUM ('sad', 'ok', 'happy')")).await.unwrap();
    c.batch_execute(&format!("CREATE TYPE {p} AS (a int, b text)")).await.unwrap();
    let row = c.query_one(&format!("SELECT 'ok'::{e}::text, (ROW(1, 'x')::{p}).b"), &[]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("ok".to_owned(), "x".to_owned()));
    let schema: String = c
        .query_one(
            &format!("SELECT n.nspname::text FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.typname = '{e}'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(schema.starts_with("scratch_"), "{schema}");
    c.batch_execute(&format!("DROP TYPE {e}; DROP TYPE {p}")).await.unwrap();
    // In the session's own temporary schema too (tokio-postgres' tests use pg_temp.mood).
    c.batch_execute(
        "CREATE TYPE pg_temp.compat_temp_mood AS ENUM ('a', 'b'); \
                     CREATE TEMP TABLE compat_temp_t (m pg_temp.compat_temp_mood); \
                     INSERT INTO compat_temp_t VALUES ('b')",
    )
    .await
    .unwrap();
    let m: String = c.query_one("SELECT m::text FROM compat_temp_t", &[]).await.unwrap().get(0);
    assert_eq!(m, "b");
    for refused in [
        "CREATE TYPE compat_floatrange AS RANGE (subtype = float8, subtype_diff = float8mi)",
        "CREATE TYPE public.compat_elsewhere AS ENUM ('a')",
        // Another session's temporary schema is not the caller's.
        "CREATE TYPE pg_temp_3.compat_elsewhere AS ENUM ('a')",
        "CREATE DOMAIN compat_posint AS int CHECK (VALUE > 0)",
        // Forms sqlparser cannot read (SQLAlchemy's domain fixtures): the same rule, not 42601.
        "CREATE DOMAIN compat_nn INTEGER NOT NULL DEFAULT 42",
        "CREATE OR REPLACE FUNCTION compat_f() RETURNS int LANGUAGE sql COST 1 AS 'SELECT 1'",
    ] {
        let err = c.batch_execute(refused).await.expect_err(refused);
        assert_eq!(code(&err), "42501", "{refused}: {err}");
    }
}

/// ORMs reset their tables' sequences (Django's sql_flush); setval reaches only sequences of the
/// caller's scratch schema, whatever the name resolves to.
#[tokio::test]
async fn setval_on_scratch_sequences_only() {
    let f = fixture();
    let c = f.dev().await;
    let t = unique("compat_flush");
    c.batch_execute(&format!(
        "CREATE TABLE {t} (id serial PRIMARY KEY, v text); INSERT INTO {t} (v) VALUES ('a'), ('b')"
    ))
    .await
    .unwrap();
    c.batch_execute(&format!("SELECT setval(pg_get_serial_sequence('\"{t}\"','id'), 1, false)")).await.unwrap();
    c.batch_execute(&format!("TRUNCATE {t}; INSERT INTO {t} (v) VALUES ('c')")).await.unwrap();
    let id: i32 = c.query_one(&format!("SELECT id FROM {t}"), &[]).await.unwrap().get(0);
    assert_eq!(id, 1);
    let seq = format!("{t}_id_seq");
    let v: i64 = c.query_one(&format!("SELECT setval('{seq}', 41)"), &[]).await.unwrap().get(0);
    assert_eq!(v, 41);
    let next: i64 = c.query_one(&format!("SELECT nextval('{seq}')"), &[]).await.unwrap().get(0);
    assert_eq!(next, 42);
    // A managed table's sequence: by name it resolves to public, so it is refused outright
    // qualified and not found unqualified (setval names the scratch schema).
    for sql in [
        "SELECT setval('public.entities_id_seq', 1)",
        "SELECT setval(pg_get_serial_sequence('public.entities', 'id'), 1)",
        "SELECT setval((SELECT 'public.x'), 1)",
    ] {
        let e = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(code(&e), "42501", "{sql}: {e}");
    }
    let e = c.batch_execute("SELECT setval('entities_id_seq', 1)").await.unwrap_err();
    assert_eq!(code(&e), "42P01", "{e}");
    c.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

/// SQLAlchemy's provisioning sends `CREATE EXTENSION IF NOT EXISTS hstore`: a no-op for an
/// installed extension goes through; anything that could install one is refused.
#[tokio::test]
async fn create_extension_if_not_exists_of_an_installed_one() {
    let f = fixture();
    let c = f.dev().await;
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS plpgsql").await.unwrap();
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS \"plpgsql\"").await.unwrap();
    for refused in [
        "CREATE EXTENSION plpgsql",
        "CREATE EXTENSION IF NOT EXISTS compat_no_such_extension",
        "CREATE EXTENSION IF NOT EXISTS \"PLPGSQL\"",
    ] {
        let e = c.batch_execute(refused).await.expect_err(refused);
        assert_eq!(code(&e), "42501", "{refused}: {e}");
    }
}

/// SQL value functions, which sqlparser reads as calls (SQLAlchemy's `func.current_timestamp()`).
#[tokio::test]
async fn sql_value_functions() {
    let f = fixture();
    let c = f.dev().await;
    let row = c
        .query_one(
            "SELECT CURRENT_TIMESTAMP <= now(), current_timestamp(2) IS NOT NULL, CURRENT_DATE, LOCALTIME, \
             LOCALTIMESTAMP, CURRENT_TIME, current_user, session_user, current_role, current_catalog, user, \
             coalesce(NULL, CURRENT_TIMESTAMP) IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1) && row.get::<_, bool>(11));
    assert_eq!(row.get::<_, String>(9), "app");
}

/// SQLAlchemy's offset without a limit: `LIMIT ALL OFFSET $1` (sqlparser prints no LIMIT for
/// it; the meaning check reads LIMIT ALL as no limit).
#[tokio::test]
async fn limit_all_with_an_offset() {
    let f = fixture();
    let c = f.dev().await;
    let rows = c
        .query("SELECT x FROM generate_series(1, 5) AS g(x) ORDER BY x LIMIT ALL OFFSET $1::INTEGER", &[&3i32])
        .await
        .unwrap();
    assert_eq!(rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(), [4, 5]);
    let n: i64 = c.query_one("SELECT count(*) FROM (SELECT id FROM entities LIMIT NULL) s", &[]).await.unwrap().get(0);
    assert!(n > 0);
}

/// Partitioned scratch tables (SQLAlchemy's reflection tests): `PARTITION BY RANGE (col)`,
/// which sqlparser reads as a call of `range`.
#[tokio::test]
async fn partitioned_scratch_tables() {
    let f = fixture();
    let c = f.dev().await;
    let t = unique("compat_parts");
    c.batch_execute(&format!("CREATE TABLE {t} (modulus int NOT NULL, data text) PARTITION BY range(modulus)"))
        .await
        .unwrap();
    c.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
    let e = c.batch_execute(&format!("CREATE TABLE {t} (m int) PARTITION BY range(lower(m::text))")).await.unwrap_err();
    assert_eq!(code(&e), "42501", "{e}");
}

/// DDL ORMs' test suites send that sqlparser cannot read (Django, SQLAlchemy): on the caller's
/// own scratch objects it is checked on PostgreSQL's tree, printed by PostgreSQL's printer and
/// runs (README, *Client compatibility*).
#[tokio::test]
async fn scratch_ddl_sqlparser_cannot_read() {
    let f = fixture();
    let c = f.dev().await;
    let t = unique("compat_ddl");
    let s = format!("{t}_seq");
    c.batch_execute(&format!(
        "CREATE TABLE {t} (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, c varchar(5), d text); \
         CREATE SEQUENCE {s}"
    ))
    .await
    .unwrap();
    let one = |sql: String| {
        let c = &c;
        async move { c.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")) }
    };
    let value = |sql: String| {
        let c = &c;
        async move {
            let row = c.query_one(&sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            row.get::<_, Option<String>>(0)
        }
    };

    // ALTER SEQUENCE (Django's sequence resets and AutoField changes).
    one(format!("SELECT nextval('{s}'), nextval('{s}')")).await;
    one(format!("ALTER SEQUENCE {s} RESTART WITH 1")).await;
    one(format!("ALTER SEQUENCE {s} INCREMENT BY 5 NO MAXVALUE")).await;
    one(format!("ALTER SEQUENCE IF EXISTS {s} AS bigint")).await;
    one(format!("ALTER SEQUENCE {s} OWNED BY {t}.d")).await;
    let next: i64 = c.query_one(&format!("SELECT nextval('{s}')"), &[]).await.unwrap().get(0);
    assert_eq!(next, 1);
    let next: i64 = c.query_one(&format!("SELECT nextval('{s}')"), &[]).await.unwrap().get(0);
    assert_eq!(next, 6);
    one(format!("ALTER SEQUENCE {s} RENAME TO {s}_renamed")).await;
    one(format!("ALTER SEQUENCE {s}_renamed RENAME TO {s}")).await;

    // ALTER TABLE … ALTER COLUMN forms.
    one(format!("ALTER TABLE \"{t}\" ALTER COLUMN \"id\" DROP IDENTITY IF EXISTS")).await;
    one(format!("ALTER TABLE \"{t}\" ALTER COLUMN \"id\" DROP IDENTITY IF EXISTS")).await;
    one(format!("ALTER TABLE {t} ALTER COLUMN c SET STATISTICS 100")).await;
    one(format!("ALTER TABLE {t} ALTER COLUMN c TYPE varchar(10) COLLATE \"C\"")).await;
    let identity = value(format!(
        "SELECT attidentity::text FROM pg_attribute WHERE attrelid = '{t}'::regclass AND attname = 'id'"
    ))
    .await;
    assert_eq!(identity.as_deref(), Some(""));
    let collation = value(format!(
        "SELECT collation_name::text FROM information_schema.columns WHERE table_name = '{t}' AND column_name = 'c'"
    ))
    .await;
    assert_eq!(collation.as_deref(), Some("C"));
    let statistics = value(format!(
        "SELECT attstattarget::text FROM pg_attribute WHERE attrelid = '{t}'::regclass AND attname = 'c'"
    ))
    .await;
    assert_eq!(statistics.as_deref(), Some("100"));
    // Django's change of type and collation at once: the proxy prints `TYPE … COLLATE … USING …`
    // itself (PostgreSQL's printer puts the COLLATE after the USING expression).
    one(format!("ALTER TABLE \"{t}\" ALTER COLUMN \"c\" TYPE varchar(20) COLLATE \"POSIX\" USING \"c\"::varchar(20)"))
        .await;
    let column = value(format!(
        "SELECT data_type::text || '(' || character_maximum_length || ') ' || collation_name::text \
         FROM information_schema.columns WHERE table_name = '{t}' AND column_name = 'c'"
    ))
    .await;
    assert_eq!(column.as_deref(), Some("character varying(20) POSIX"));

    // CREATE INDEX … TABLESPACE pg_default, DROP INDEX CONCURRENTLY IF EXISTS (outside a
    // transaction block: one statement per simple Query).
    one(format!(
        "CREATE INDEX \"{t}_c\" ON \"{t}\" (\"c\" varchar_pattern_ops) INCLUDE (\"d\") TABLESPACE \"pg_default\""
    ))
    .await;
    one(format!("DROP INDEX CONCURRENTLY IF EXISTS \"{t}_c\"")).await;
    one(format!("DROP INDEX CONCURRENTLY IF EXISTS \"{t}_c\"")).await;
    // Partial and expression indexes with TABLESPACE pg_default (Django's `*_partial_tablespace`
    // tests): the expressions take the usual way, the tablespace goes back on the rewrite.
    one(format!(
        "CREATE INDEX \"{t}_p\" ON \"{t}\" ((LOWER(\"c\")) text_pattern_ops DESC) TABLESPACE \"pg_default\" \
         WHERE \"c\"::text LIKE '%China%'"
    ))
    .await;
    one(format!("CREATE INDEX \"{t}_l\" ON \"{t}\" (\"d\") TABLESPACE \"pg_default\" WHERE LENGTH(\"d\") = 40")).await;
    let definitions = value(format!(
        "SELECT string_agg(indexdef, ' / ' ORDER BY indexname)::text FROM pg_indexes \
         WHERE indexname IN ('{t}_p', '{t}_l')"
    ))
    .await
    .unwrap_or_default();
    assert!(
        definitions.contains("(lower((c)::text) text_pattern_ops DESC) WHERE ((c)::text ~~ '%China%'::text)")
            && definitions.contains("(d) WHERE (length(d) = 40)"),
        "{definitions}"
    );
    one(format!("DROP INDEX \"{t}_p\"; DROP INDEX \"{t}_l\"")).await;

    // COMMENT ON CONSTRAINT, with a string PostgreSQL's printer writes as E''.
    one(format!("COMMENT ON CONSTRAINT {t}_pkey ON {t} IS 'it''s a \\ key'")).await;
    let comment = value(format!(
        "SELECT d.description::text FROM pg_description d JOIN pg_constraint k ON k.oid = d.objoid \
         WHERE k.conname = '{t}_pkey'"
    ))
    .await;
    assert_eq!(comment.as_deref(), Some("it's a \\ key"));

    // CREATE TABLE … ON DELETE SET NULL (col), USING INDEX TABLESPACE pg_default.
    let p = format!("{t}_parent");
    let k = format!("{t}_child");
    one(format!("CREATE TABLE {p} (a int, b int, UNIQUE (a, b) USING INDEX TABLESPACE pg_default)")).await;
    one(format!("CREATE TABLE {k} (a int, b int, FOREIGN KEY (a, b) REFERENCES {p} (a, b) ON DELETE SET NULL (b))"))
        .await;
    one(format!("INSERT INTO {p} VALUES (1, 2); INSERT INTO {k} VALUES (1, 2); DELETE FROM {p}")).await;
    let row = c.query_one(&format!("SELECT a, b FROM {k}"), &[]).await.unwrap();
    assert_eq!((row.get::<_, Option<i32>>(0), row.get::<_, Option<i32>>(1)), (Some(1), None));

    one(format!("DROP TABLE {k}; DROP TABLE {p}; DROP TABLE {t}; DROP SEQUENCE IF EXISTS {s}")).await;
}

/// The same statements aimed at anything but the caller's own scratch objects, or holding
/// code or a tablespace, are refused (42501) and the session goes on.
#[tokio::test]
async fn scratch_ddl_sqlparser_cannot_read_refuses_everything_else() {
    let f = fixture();
    let acme = f.dev().await;
    let t = unique("compat_ddl_hostile");
    acme.batch_execute(&format!("CREATE TABLE {t} (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, c text)"))
        .await
        .unwrap();
    let schema: String = acme
        .query_one(&format!("SELECT table_schema::text FROM information_schema.tables WHERE table_name = '{t}'"), &[])
        .await
        .unwrap()
        .get(0);
    let hostile = [
        format!("ALTER SEQUENCE public.{t}_id_seq RESTART"),
        "ALTER SEQUENCE entities_id_seq OWNED BY entities.id".to_owned(),
        "ALTER TABLE entities ALTER COLUMN id SET STATISTICS 0".to_owned(),
        "ALTER TABLE public.entities ALTER COLUMN data TYPE text COLLATE \"C\"".to_owned(),
        format!("ALTER TABLE {t} ALTER COLUMN c DROP IDENTITY IF EXISTS, ALTER COLUMN c SET DEFAULT pg_sleep(0)::text"),
        format!(
            "ALTER TABLE {t} ALTER COLUMN c TYPE text COLLATE \"C\" USING (SELECT data::text FROM entities LIMIT 1)"
        ),
        format!("CREATE INDEX ON {t} (c) TABLESPACE pg_global"),
        "CREATE INDEX ON entities (id) TABLESPACE pg_default".to_owned(),
        format!("DROP INDEX CONCURRENTLY IF EXISTS {t}_pkey, public.entities_pkey"),
        format!("DROP INDEX CONCURRENTLY IF EXISTS {t}_pkey, entities"),
        "DROP INDEX CONCURRENTLY pg_catalog.pg_class_oid_index".to_owned(),
        "COMMENT ON CONSTRAINT entities_pkey ON entities IS 'x'".to_owned(),
        "COMMENT ON CONSTRAINT pg_class_oid_index ON pg_catalog.pg_class IS 'x'".to_owned(),
        format!("CREATE TABLE {t}_k (a int REFERENCES entities (id) ON DELETE SET NULL (a))"),
    ];
    for sql in &hostile {
        let e = acme.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&e), "42501", "{sql}: {e}");
        let one: i32 = acme.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    }
    // In a transaction: the refusal fails it, as the server's own error would.
    acme.batch_execute("BEGIN").await.unwrap();
    let e = acme.batch_execute("ALTER SEQUENCE public.x RESTART").await.unwrap_err();
    assert_eq!(code(&e), "42501", "{e}");
    let e = acme.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02", "{e}");
    acme.batch_execute("ROLLBACK").await.unwrap();

    // Another tenant may not reach this tenant's scratch objects, qualified or not.
    let globex = f.as_actor("globex", Environment::Development, "admin", ActorType::User, "globex-ddl").await;
    for sql in [
        format!("ALTER SEQUENCE \"{schema}\".{t}_id_seq RESTART WITH 1"),
        format!("ALTER TABLE \"{schema}\".{t} ALTER COLUMN id DROP IDENTITY"),
        format!("DROP INDEX CONCURRENTLY IF EXISTS \"{schema}\".{t}_pkey"),
        format!("COMMENT ON CONSTRAINT {t}_pkey ON \"{schema}\".{t} IS 'x'"),
        format!("CREATE TABLE globex_k (a int REFERENCES \"{schema}\".{t} (id) ON DELETE SET NULL (a))"),
    ] {
        let e = globex.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(code(&e), "42501", "{sql}: {e}");
    }
    // Unqualified, the other tenant's objects are not on its search_path.
    let e = globex.batch_execute(&format!("ALTER SEQUENCE {t}_id_seq RESTART WITH 1")).await.unwrap_err();
    assert_eq!(code(&e), "42P01", "{e}");
    let e = globex.batch_execute(&format!("DROP INDEX CONCURRENTLY {t}_pkey")).await.unwrap_err();
    assert_eq!(code(&e), "42704", "{e}");
    // Production keys run no DDL at all.
    let prod = f.connect(&f.prod_key).await.unwrap();
    let e = prod.batch_execute(&format!("ALTER SEQUENCE {t}_id_seq RESTART")).await.unwrap_err();
    assert_eq!(code(&e), "42501", "{e}");

    acme.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

/// A foreign key is a probe of the rows it references (an insert fails or not) and pins them
/// (their owner can no longer delete them): its target follows the scratch-object rules, whichever
/// parser reads the statement. So do tablespaces, which are cluster-wide.
#[tokio::test]
async fn foreign_keys_reference_only_the_callers_own_scratch_tables() {
    let f = fixture();
    let acme = f.dev().await;
    let t = unique("compat_fk_target");
    acme.batch_execute(&format!("CREATE TABLE {t} (id int PRIMARY KEY); INSERT INTO {t} VALUES (42)")).await.unwrap();
    let schema: String = acme
        .query_one(&format!("SELECT table_schema::text FROM information_schema.tables WHERE table_name = '{t}'"), &[])
        .await
        .unwrap()
        .get(0);
    let globex = f.as_actor("globex", Environment::Development, "admin", ActorType::User, "globex-fk").await;
    let k = unique("compat_fk_probe");
    for sql in [
        format!("CREATE TABLE {k} (a int REFERENCES \"{schema}\".{t} (id))"),
        format!("CREATE TABLE {k} (a int, FOREIGN KEY (a) REFERENCES \"{schema}\".{t})"),
        format!("CREATE TABLE {k} (a int)"),
        format!("ALTER TABLE {k} ADD CONSTRAINT probe FOREIGN KEY (a) REFERENCES \"{schema}\".{t} (id)"),
        format!("ALTER TABLE {k} ADD COLUMN b int REFERENCES \"{schema}\".{t} (id)"),
        format!("CREATE TABLE {k}_2 (a int REFERENCES entities (id))"),
        format!("CREATE TABLE {k}_3 (a int) TABLESPACE pg_global"),
    ] {
        if sql == format!("CREATE TABLE {k} (a int)") {
            globex.batch_execute(&sql).await.unwrap();
            continue;
        }
        let e = globex.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(code(&e), "42501", "{sql}: {e}");
    }
    globex.batch_execute(&format!("DROP TABLE {k}")).await.unwrap();
    // Its own scratch tables: as before.
    acme.batch_execute(&format!(
        "CREATE TABLE {k} (a int REFERENCES {t} (id)); ALTER TABLE {k} ADD COLUMN b int REFERENCES \"{schema}\".{t}; \
         INSERT INTO {k} VALUES (42, 42); DROP TABLE {k}; DROP TABLE {t}"
    ))
    .await
    .unwrap();
}

/// Django's `select_for_update(no_key=True)` and `select_for_update(of=(…))`: `FOR NO KEY UPDATE`,
/// `FOR KEY SHARE` and `FOR UPDATE OF a, b`, which sqlparser cannot read, lock exactly the rows the
/// caller's SELECT returns (rewrite/locking.rs), also below the top level (a job queue's pick).
#[tokio::test]
async fn locking_clauses_sqlparser_cannot_read() {
    let f = fixture();
    let acme = f.dev().await;
    acme.batch_execute("BEGIN").await.unwrap();
    let rows =
        acme.query("SELECT organization_id || '/' || environment FROM entities FOR NO KEY UPDATE", &[]).await.unwrap();
    assert!(!rows.is_empty());
    assert!(rows.iter().all(|r| r.get::<_, String>(0) == "acme/development"));
    // The caller's rows are locked: another session of the tenant cannot take them.
    let other = f.dev().await;
    other.batch_execute("BEGIN").await.unwrap();
    let e = other.query("SELECT id FROM entities FOR UPDATE NOWAIT", &[]).await.unwrap_err();
    assert_eq!(code(&e), "55P03", "{e}");
    other.batch_execute("ROLLBACK").await.unwrap();
    // Other tenants' rows are not: their own sessions lock them at once.
    let prod = f.connect(&f.prod_key).await.unwrap();
    prod.batch_execute("BEGIN").await.unwrap();
    assert!(!prod.query("SELECT id FROM entities FOR UPDATE NOWAIT", &[]).await.unwrap().is_empty());
    prod.batch_execute("ROLLBACK").await.unwrap();
    acme.batch_execute("ROLLBACK").await.unwrap();

    for sql in [
        "SELECT e.id FROM entities e JOIN threads t ON true FOR UPDATE OF e, t",
        "SELECT e.id FROM entities e, threads t FOR KEY SHARE OF e FOR NO KEY UPDATE OF t SKIP LOCKED",
    ] {
        acme.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    // Scratch tables too (Django's select_for_update tests lock their own tables).
    let t = unique("compat_lock");
    acme.batch_execute(&format!(
        "CREATE TABLE {t}_a (id int PRIMARY KEY); CREATE TABLE {t}_b (id int PRIMARY KEY); \
         INSERT INTO {t}_a VALUES (1); INSERT INTO {t}_b VALUES (1)"
    ))
    .await
    .unwrap();
    let n = acme
        .query(&format!("SELECT a.id FROM {t}_a a JOIN {t}_b b USING (id) FOR NO KEY UPDATE OF a, b"), &[])
        .await
        .unwrap()
        .len();
    assert_eq!(n, 1);
    acme.batch_execute(&format!("DROP TABLE {t}_a; DROP TABLE {t}_b")).await.unwrap();

    // Below the top level (stand-ins): a job queue's workers each pick other jobs.
    let jobs = unique("compat_jobs");
    acme.batch_execute(&format!(
        "CREATE TABLE {jobs} (id int PRIMARY KEY, state text); \
         INSERT INTO {jobs} SELECT g, 'queued' FROM generate_series(1, 4) g"
    ))
    .await
    .unwrap();
    let pick = format!(
        "UPDATE {jobs} SET state = 'running' WHERE id IN (SELECT id FROM {jobs} WHERE state = 'queued' \
         ORDER BY id LIMIT 2 FOR NO KEY UPDATE SKIP LOCKED) RETURNING id"
    );
    let worker = f.dev().await;
    let mut picked = Vec::new();
    for c in [&acme, &worker] {
        c.batch_execute("BEGIN").await.unwrap();
        let mut ids: Vec<i32> = c.query(&pick, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        picked.push(ids);
    }
    assert_eq!(picked, [vec![1, 2], vec![3, 4]]);
    for c in [&acme, &worker] {
        c.batch_execute("COMMIT").await.unwrap();
    }
    // And on a managed table, in a CTE: the caller's rows only.
    let n: i64 = acme
        .query_one(
            "WITH next AS (SELECT id, organization_id FROM entities ORDER BY id LIMIT 3 FOR KEY SHARE) \
             SELECT count(*) FROM next WHERE organization_id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    acme.batch_execute(&format!("DROP TABLE {jobs}")).await.unwrap();

    for (sql, sqlstate) in [
        ("SELECT id FROM entities FOR NO KEY UPDATE OF __struere_1", "42501"),
        ("SELECT pg_read_file('/etc/passwd') FROM entities FOR KEY SHARE", "42501"),
        ("SELECT * FROM (SELECT id FROM entities FOR NO KEY UPDATE OF __struere_1) s", "42501"),
        ("SELECT 1 LIMIT (SELECT 1 FROM entities FOR NO KEY UPDATE)", "42601"),
    ] {
        let e = acme.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&e), sqlstate, "{sql}: {e}");
    }
    let one: i32 = acme.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// SQLAlchemy's array and jsonb element updates: `UPDATE … SET arr[i] = …` and `SET jb['k'] = …`,
/// which sqlparser cannot read, change exactly that element of the caller's own tables
/// (rewrite/subscript.rs). Where a rule or mask of the caller reads the column, where the write is
/// rewritten around a managed table, or where the table is another tenant's, they are refused.
#[tokio::test]
async fn subscripted_assignments_sqlparser_cannot_read() {
    let f = fixture();
    let acme = f.dev().await;
    let t = unique("compat_subscript");
    acme.batch_execute(&format!(
        "CREATE TABLE {t} (id int PRIMARY KEY, a int[], m int[], j jsonb); \
         INSERT INTO {t} VALUES (1, '{{1,2,3}}', '{{{{1,2}},{{3,4}}}}', '{{\"k\": 1, \"l\": {{\"x\": 1}}}}'), \
                                (2, '{{1,2,3}}', NULL, '{{}}')"
    ))
    .await
    .unwrap();
    acme.batch_execute(&format!("UPDATE {t} SET a[2] = 20, m[2][1] = 30, j['k'] = '\"v\"' WHERE id = 1"))
        .await
        .unwrap();
    // Parameters in the subscripts and the values (SQLAlchemy with psycopg 3 sends these).
    let n = acme
        .execute(
            &format!("UPDATE {t} SET a[$1::int] = $2::int, j['l']['x'] = $3::text::jsonb WHERE id = $4::int"),
            &[&3i32, &33i32, &"2", &1i32],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    acme.batch_execute(&format!("UPDATE {t} SET a[1:2] = '{{7,8}}' WHERE id = 2")).await.unwrap();
    let rows = acme.query(&format!("SELECT a::text, m::text, j::text FROM {t} ORDER BY id"), &[]).await.unwrap();
    let got: Vec<(String, Option<String>, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        got,
        [
            ("{1,20,33}".to_owned(), Some("{{1,2},{30,4}}".to_owned()), r#"{"k": "v", "l": {"x": 2}}"#.to_owned()),
            ("{7,8,3}".to_owned(), None, "{}".to_owned()),
        ]
    );
    // A RETURNING list and a FROM item are rewritten as usual.
    let a: String = acme
        .query_one(
            &format!("UPDATE {t} SET a[1] = 0 FROM (SELECT 2 AS id) s WHERE {t}.id = s.id RETURNING a::text"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(a, "{0,8,3}");
    // The same in an INSERT's ON CONFLICT DO UPDATE (a conflict on row 2, a new row 3).
    for id in [2, 3] {
        acme.execute(
            &format!(
                "INSERT INTO {t} AS x (id, a) VALUES ($1::int, '{{5}}') ON CONFLICT (id) DO UPDATE \
                 SET a[2] = excluded.a[1] + 1, j['n'] = to_jsonb($1::int) WHERE x.id = $1::int"
            ),
            &[&id],
        )
        .await
        .unwrap();
    }
    let rows = acme.query(&format!("SELECT a::text, j::text FROM {t} WHERE id >= 2 ORDER BY id"), &[]).await.unwrap();
    let got: Vec<(String, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, [("{0,6,3}".to_owned(), Some(r#"{"n": 2}"#.to_owned())), ("{5}".to_owned(), None)]);

    // The subscripts are not rewritten: constants and parameters only.
    for sql in [
        format!("UPDATE {t} SET a[(SELECT count(*) FROM entities)::int] = 1"),
        format!("UPDATE {t} SET a[id] = 1"),
        format!("UPDATE {t} SET a[1] = (SELECT count(*) FROM entities)::int"),
        format!("INSERT INTO {t} (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET a[(SELECT 1)] = 1"),
    ] {
        let e = acme.batch_execute(&sql).await.expect_err(&sql);
        assert_eq!(code(&e), "42501", "{sql}: {e}");
    }
    // Managed tables: a row rule of the teacher reads `data` (its sessions are those whose
    // data.teacherId is the teacher's), a mask hides part of `email` from support, and writes by
    // admin are rebuilt around the table (the value moves into a subquery): all refused, nothing
    // written.
    let teacher = f.as_actor("acme", Environment::Development, "teacher", ActorType::User, "acme-teacher-1").await;
    let support = f.as_actor("acme", Environment::Development, "support", ActorType::User, "acme-support-1").await;
    for (who, sql) in [
        (
            &teacher,
            "UPDATE entities SET data['teacherId'] = '\"acme-teacher-2\"' WHERE id = 'acme-development-session-2'",
        ),
        (&teacher, "UPDATE entities SET data['status'] = '\"done\"' WHERE id = 'acme-development-session-2'"),
        (&support, "UPDATE users SET email[1] = 'x' WHERE id = 'acme-teacher-1'"),
        (&acme, "UPDATE entities SET data['status'] = '\"done\"' WHERE id = 'acme-development-session-2'"),
        (
            &acme,
            "INSERT INTO entities (id, entity_type, data) VALUES ('acme-development-session-2', 'session', '{}') \
             ON CONFLICT (id) DO UPDATE SET data['status'] = '\"done\"'",
        ),
    ] {
        let e = who.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&e), "42501", "{sql}: {e}");
    }
    let owner = f.admin().await;
    let data: String = owner
        .query_one("SELECT data::text FROM entities WHERE id = 'acme-development-session-2'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(data.contains("\"teacherId\": \"acme-teacher-1\"") && data.contains("\"status\": \"scheduled\""), "{data}");

    // Another tenant's scratch table stays out of reach.
    let globex = f.as_actor("globex", Environment::Development, "admin", ActorType::User, "globex-subscript").await;
    let k = unique("compat_subscript_globex");
    globex.batch_execute(&format!("CREATE TABLE {k} (a int[]); INSERT INTO {k} VALUES ('{{1}}')")).await.unwrap();
    let schema: String = globex
        .query_one(&format!("SELECT table_schema::text FROM information_schema.tables WHERE table_name = '{k}'"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(schema.starts_with("scratch_"), "{schema}");
    let e = acme.batch_execute(&format!("UPDATE \"{schema}\".{k} SET a[1] = 9")).await.unwrap_err();
    assert_eq!(code(&e), "42501", "{e}");
    let a: String = globex.query_one(&format!("SELECT a::text FROM {k}"), &[]).await.unwrap().get(0);
    assert_eq!(a, "{1}");
    globex.batch_execute(&format!("DROP TABLE {k}")).await.unwrap();
    acme.batch_execute(&format!("DROP TABLE {t}")).await.unwrap();
}

/// The rows of a simple query, one line per row, columns separated by `|`.
async fn text_rows(c: &tokio_postgres::Client, sql: &str) -> String {
    let msgs = c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let mut out = String::new();
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let cols: Vec<&str> = (0..r.len()).map(|i| r.get(i).unwrap_or("NULL")).collect();
            out.push_str(&cols.join("|"));
            out.push('\n');
        }
    }
    out
}

/// Django's set operations in a subquery and under EXPLAIN (`Subquery(qs1.union(qs2))`,
/// `qs1.union(qs2).explain()`): `((SELECT …) UNION (SELECT …))` and `EXPLAIN (SELECT …) UNION
/// (SELECT …)`, which sqlparser cannot read as sent, go through another spelling of the same
/// statement (rewrite/respell.rs): on the tenant's scratch tables as Django sends them, on managed
/// tables through secure relations; EXPLAIN shows the rewritten plan and ANALYZE stays refused.
#[tokio::test]
async fn parenthesised_set_operations_sqlparser_cannot_read() {
    let f = fixture();
    let acme = f.dev().await;
    let t = unique("compat_union");
    let (n, r) = (format!("{t}_number"), format!("{t}_reserved"));
    acme.batch_execute(&format!(
        "CREATE TABLE {n} (num int); CREATE TABLE {r} (\"order\" int); \
         INSERT INTO {n} VALUES (1), (5), (8), (9); INSERT INTO {r} VALUES (8), (1), (5)"
    ))
    .await
    .unwrap();
    // Django's test_union_in_subquery, as it sends it.
    let sql = format!(
        "SELECT \"{r}\".\"order\" AS \"order\" FROM \"{r}\" WHERE ((SELECT U0.\"num\" AS \"num\" FROM \"{n}\" U0 \
         WHERE (U0.\"num\" = (\"{r}\".\"order\") AND U0.\"num\" > 7)) UNION (SELECT U0.\"num\" AS \"num\" FROM \
         \"{n}\" U0 WHERE (U0.\"num\" = (\"{r}\".\"order\") AND U0.\"num\" < 2))) IS NOT NULL ORDER BY 1"
    );
    assert_eq!(text_rows(&acme, &sql).await, "1\n8\n");
    // The first arm keeps its parentheses (ORDER BY … LIMIT inside them).
    let sql = format!(
        "SELECT \"order\", ((SELECT num FROM {n} WHERE num > \"order\" ORDER BY num LIMIT 1) UNION \
         (SELECT num FROM {n} WHERE false)) FROM {r} ORDER BY 1"
    );
    assert_eq!(text_rows(&acme, &sql).await, "1|5\n5|8\n8|9\n");
    let sql = format!(
        "SELECT \"order\" FROM {r} WHERE \"order\" = ANY ((SELECT num FROM {n} ORDER BY num DESC LIMIT 2) UNION \
         (SELECT 1)) ORDER BY 1"
    );
    assert_eq!(text_rows(&acme, &sql).await, "1\n8\n");
    // Django's EXPLAIN of a union, with and without a format.
    for sql in [
        format!("EXPLAIN (SELECT num FROM {n}) UNION (SELECT num FROM {n} WHERE num = 1)"),
        format!("EXPLAIN (FORMAT TEXT) (SELECT num FROM {n}) UNION (SELECT num FROM {n} WHERE num = 1)"),
        format!("EXPLAIN (SELECT num FROM {n} ORDER BY num LIMIT 1) UNION (SELECT 1)"),
    ] {
        let plan = text_rows(&acme, &sql).await;
        assert!(plan.contains("Append") && !plan.contains("cost="), "{sql}: {plan}");
    }

    // Managed tables: only the caller's rows, and the plan of the rewritten statement.
    let all: i64 = acme.query_one("SELECT count(*) FROM entities", &[]).await.unwrap().get(0);
    assert!(all > 0);
    let sql = "SELECT count(*) FROM entities e WHERE ((SELECT x.id FROM entities x WHERE x.id = e.id ORDER BY x.id \
               LIMIT 1) UNION (SELECT x.id FROM entities x WHERE x.id = e.id)) IS NOT NULL";
    assert_eq!(text_rows(&acme, sql).await, format!("{all}\n"));
    let sql = "SELECT ((SELECT id::text FROM entities WHERE organization_id = 'globex' ORDER BY id LIMIT 1) UNION \
               (SELECT id::text FROM entities WHERE environment = 'production'))";
    assert_eq!(text_rows(&acme, sql).await, "NULL\n");
    let plan = text_rows(
        &acme,
        "EXPLAIN (SELECT id FROM entities ORDER BY id LIMIT 1) UNION (SELECT id FROM entities WHERE id IS NULL)",
    )
    .await;
    assert!(plan.contains("'acme'") && plan.contains("'development'") && !plan.contains("cost="), "{plan}");

    for (sql, sqlstate) in [
        ("EXPLAIN ANALYZE (SELECT id FROM entities LIMIT 1) UNION (SELECT id FROM entities)", "42501"),
        ("EXPLAIN (ANALYZE) (SELECT id FROM entities) UNION (SELECT id FROM entities)", "42501"),
        ("SELECT ((SELECT pg_read_file('/etc/passwd') LIMIT 1) UNION (SELECT 'x'))", "42501"),
        ("SELECT ((SELECT 1 AS __struere_in_scope LIMIT 1) UNION (SELECT 2))", "42501"),
    ] {
        let e = acme.batch_execute(sql).await.expect_err(sql);
        assert_eq!(code(&e), sqlstate, "{sql}: {e}");
    }
    acme.batch_execute(&format!("DROP TABLE {n}; DROP TABLE {r}")).await.unwrap();
}
