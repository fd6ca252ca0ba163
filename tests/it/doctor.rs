//! `migrate add-environment`, `doctor`, and the serve-time refusal of production keys while the
//! upstream role has a hole. Every test works on tables of its own, in schemas of its own.

use std::path::Path;

use struere_proxy::auth::identity::Environment;
use tokio_postgres::Client;

use crate::cli::bin;
use crate::harness::{code, connect_to, fixture, unique};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Run the binary with the owner URL (and the upstream URL when given), as an operator would.
fn run(upstream: Option<&str>, args: &[&str]) -> Run {
    let f = fixture();
    let mut cmd = bin();
    cmd.env("STRUERE_ADMIN_UPSTREAM", &f.admin_url).env_remove("STRUERE_UPSTREAM").env_remove("STRUERE_POLICIES");
    if let Some(url) = upstream {
        cmd.env("STRUERE_UPSTREAM", url);
    }
    let out = cmd.args(args).output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn migrate(table: &str, extra: &[&str]) -> Run {
    let mut args = vec!["migrate", "add-environment", "--table", table];
    args.extend_from_slice(extra);
    run(None, &args)
}

/// A fresh schema and `<schema>.t (id, organization_id NOT NULL, payload)` with `rows` rows.
async fn table_with_rows(admin: &Client, prefix: &str, rows: i32) -> (String, String) {
    let schema = unique(prefix);
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; \
             CREATE TABLE {schema}.t (id bigserial PRIMARY KEY, organization_id text NOT NULL, payload text); \
             INSERT INTO {schema}.t (organization_id, payload) \
             SELECT CASE WHEN i % 2 = 0 THEN 'acme' ELSE 'globex' END, 'row ' || i FROM generate_series(1, {rows}) i"
        ))
        .await
        .unwrap();
    let table = format!("{schema}.t");
    (schema, table)
}

/// Everything the migration could change about a table: columns, constraints, indexes, and
/// the row versions (xmin changes when a row is updated).
async fn table_state(admin: &Client, schema: &str) -> Vec<String> {
    let sql = format!(
        "SELECT 'column ' || attname || ' ' || format_type(atttypid, atttypmod) || ' ' || attnotnull \
           FROM pg_attribute WHERE attrelid = '{schema}.t'::regclass AND attnum > 0 AND NOT attisdropped \
         UNION ALL SELECT 'constraint ' || conname || ' ' || convalidated || ' ' || pg_get_constraintdef(oid) \
           FROM pg_constraint WHERE conrelid = '{schema}.t'::regclass \
         UNION ALL SELECT 'index ' || indexname || ' ' || indexdef FROM pg_indexes WHERE schemaname = '{schema}' \
         UNION ALL SELECT 'rows ' || count(*) || ' ' || coalesce(sum(xmin::text::bigint), 0) FROM {schema}.t \
         ORDER BY 1"
    );
    admin.query(&sql, &[]).await.unwrap().iter().map(|r| r.get::<_, String>(0)).collect()
}

async fn count(admin: &Client, sql: &str) -> i64 {
    admin.query_one(sql, &[]).await.unwrap().get(0)
}

fn step_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.split_once(' ').is_some_and(|(n, _)| n.ends_with("/5"))).collect()
}

#[tokio::test]
async fn migrate_add_environment_backfills_in_batches_and_is_idempotent() {
    let admin = fixture().admin().await;
    let (schema, table) = table_with_rows(&admin, "doctor_mig", 5000).await;

    let r = migrate(&table, &["--batch-size", "300"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let steps = step_lines(&r.stdout);
    assert_eq!(steps.len(), 5, "{}", r.stdout);
    assert_eq!(steps[0], "1/5 column: added \"environment\" text (nullable)");
    assert!(steps[1].starts_with("2/5 backfill: set 5000 rows to 'development' in "), "{}", steps[1]);
    assert!(steps[1].ends_with("5000 of 5000 rows were NULL at the start)"), "{}", steps[1]);
    // At most 300 rows per transaction: at least 17 of them.
    let transactions: u64 = steps[1].split(" in ").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert!(transactions >= 17, "{}", steps[1]);
    assert!(steps[2].starts_with("3/5 check: added CHECK t_environment_check"), "{}", steps[2]);
    assert!(steps[3].starts_with("4/5 not null: set NOT NULL (0 rows written with NULL"), "{}", steps[3]);
    assert_eq!(
        steps[4],
        "5/5 index: created t_organization_id_environment_idx on (organization_id, environment) concurrently"
    );
    assert!(r.stdout.ends_with("done: 5 of 5 steps changed the table; 5000 rows updated\n"), "{}", r.stdout);

    let t = &table;
    assert_eq!(count(&admin, &format!("SELECT count(*) FROM {t} WHERE environment = 'development'")).await, 5000);
    let state = table_state(&admin, &schema).await;
    assert!(state.contains(&"column environment text true".to_owned()), "NOT NULL: {state:#?}");
    assert!(
        state.iter().any(|s| s.starts_with("constraint t_environment_check true CHECK ((environment = ANY")),
        "a validated CHECK: {state:#?}"
    );
    assert!(!state.iter().any(|s| s.contains("not_null")), "the helper constraint is gone: {state:#?}");
    assert!(
        state.iter().any(|s| s.ends_with("USING btree (organization_id, environment)")),
        "the tenant index: {state:#?}"
    );
    let staging = format!("INSERT INTO {t} (organization_id, environment) VALUES ('acme', 'staging')");
    assert_eq!(code(&admin.execute(&staging, &[]).await.unwrap_err()), "23514", "the CHECK holds");
    let null = format!("INSERT INTO {t} (organization_id) VALUES ('acme')");
    assert_eq!(code(&admin.execute(&null, &[]).await.unwrap_err()), "23502", "NOT NULL holds");

    // Again: every step is already done, and nothing (not even a row version) changes.
    let r = migrate(&table, &["--batch-size", "300"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let steps = step_lines(&r.stdout);
    assert_eq!(steps.len(), 5, "{}", r.stdout);
    assert!(steps.iter().all(|s| s.ends_with(" — already done")), "{}", r.stdout);
    assert!(steps[1].contains("no NULL rows among 5000"), "{}", steps[1]);
    assert!(r.stdout.ends_with("done: nothing to change, every step was already done\n"), "{}", r.stdout);
    assert_eq!(table_state(&admin, &schema).await, state);
}

#[tokio::test]
async fn migrate_add_environment_finishes_a_partial_state() {
    let admin = fixture().admin().await;
    let (schema, table) = table_with_rows(&admin, "doctor_partial", 1500).await;
    // An earlier, interrupted attempt: the column exists, part of it is filled, the CHECK was
    // added but not validated, and the application kept writing rows without an environment.
    admin
        .batch_execute(&format!(
            "ALTER TABLE {table} ADD COLUMN environment text; \
             UPDATE {table} SET environment = 'production' WHERE id <= 900; \
             ALTER TABLE {table} ADD CONSTRAINT custom_env_check \
                 CHECK (environment IN ('development', 'production')) NOT VALID; \
             INSERT INTO {table} (organization_id) SELECT 'acme' FROM generate_series(1, 100)"
        ))
        .await
        .unwrap();

    let r = migrate(&table, &["--batch-size", "64"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let steps = step_lines(&r.stdout);
    assert_eq!(steps[0], "1/5 column: \"environment\" exists (text) — already done");
    assert!(steps[1].starts_with("2/5 backfill: set 700 rows to 'development'"), "{}", steps[1]);
    assert!(steps[1].ends_with("700 of 1600 rows were NULL at the start)"), "{}", steps[1]);
    assert_eq!(steps[2], "3/5 check: validated the existing CHECK custom_env_check");
    assert!(steps[3].starts_with("4/5 not null: set NOT NULL"), "{}", steps[3]);
    assert!(steps[4].starts_with("5/5 index: created"), "{}", steps[4]);
    let by_env = format!("SELECT count(*) FROM {table} WHERE environment = ");
    assert_eq!(count(&admin, &format!("{by_env}'production'")).await, 900, "filled rows keep their value");
    assert_eq!(count(&admin, &format!("{by_env}'development'")).await, 700);
    let state = table_state(&admin, &schema).await;
    assert!(state.iter().any(|s| s.starts_with("constraint custom_env_check true")), "{state:#?}");
    assert!(!state.iter().any(|s| s.contains("t_environment_check")), "no second CHECK: {state:#?}");

    // Values outside the two environments: refused before any change.
    let (schema, table) = table_with_rows(&admin, "doctor_bad", 10).await;
    admin
        .batch_execute(&format!(
            "ALTER TABLE {table} ADD COLUMN environment text; UPDATE {table} SET environment = 'staging' WHERE id <= 3"
        ))
        .await
        .unwrap();
    let before = table_state(&admin, &schema).await;
    let r = migrate(&table, &[]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("3 rows of") && r.stderr.contains("nothing was changed"), "{}", r.stderr);
    assert_eq!(table_state(&admin, &schema).await, before);

    let r = migrate(&table, &["--default", "staging"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("development") && r.stderr.contains("production"), "{}", r.stderr);
}

#[tokio::test]
async fn migrate_add_environment_while_the_application_writes_nulls() {
    let admin = fixture().admin().await;
    let (_, table) = table_with_rows(&admin, "doctor_live", 20_000).await;
    admin.batch_execute(&format!("ALTER TABLE {table} ADD COLUMN environment text")).await.unwrap();
    // The application inserts rows without an environment until NOT NULL stops it.
    let writer = {
        let table = table.clone();
        let client = connect_to(&fixture().admin_url).await.unwrap();
        tokio::spawn(async move {
            let sql = format!("INSERT INTO {table} (organization_id) VALUES ('acme')");
            let mut written = 0u64;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                match client.execute(&sql, &[]).await {
                    Ok(_) => written += 1,
                    Err(e) => return (written, code(&e)),
                }
            }
            (written, "deadline".to_owned())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let target = table.clone();
    let r = tokio::task::spawn_blocking(move || migrate(&target, &["--batch-size", "500"])).await.unwrap();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let (written, stopped_by) = writer.await.unwrap();
    // Stopped by the NOT NULL helper CHECK (23514) the moment it exists, or by NOT NULL (23502).
    assert!(["23514", "23502"].contains(&stopped_by.as_str()), "{stopped_by} after {written} rows");
    assert!(written > 0);
    assert_eq!(count(&admin, &format!("SELECT count(*) FROM {table} WHERE environment IS NULL")).await, 0);
    let total = count(&admin, &format!("SELECT count(*) FROM {table}")).await;
    assert_eq!(total, 20_000 + i64::try_from(written).unwrap(), "{}", r.stdout);
}

/// A copy of the shipped policies with `extra` appended to tables.toml.
fn policies_with(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for f in ["tables.toml", "development.toml", "production.toml"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let tables = dir.path().join("tables.toml");
    let text = std::fs::read_to_string(&tables).unwrap() + extra;
    std::fs::write(tables, text).unwrap();
    dir
}

/// The lines of a doctor report about `subject` that are not OK.
fn problems<'a>(out: &'a str, subject: &str) -> Vec<&'a str> {
    let marker = format!(" {subject}: ");
    out.lines().filter(|l| l.contains(&marker) && !l.starts_with("OK ")).collect()
}

#[tokio::test]
async fn doctor_reports_what_a_new_managed_table_lacks() {
    let f = fixture();
    let admin = f.admin().await;
    let schema = unique("doctor_pol");
    let (loose, shared, bare) = (unique("loose"), unique("shared"), unique("bare"));
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; \
             CREATE TABLE {schema}.{loose} (id text PRIMARY KEY, organization_id text, environment text); \
             CREATE TABLE {schema}.{shared} (id text PRIMARY KEY, organization_id text); \
             CREATE TABLE {schema}.{bare} (id text PRIMARY KEY, tenant_id text NOT NULL)"
        ))
        .await
        .unwrap();
    let dir = policies_with(&format!(
        "\n[tables.{loose}]\nscope = \"environment\"\nschema = \"{schema}\"\n\
         \n[tables.{shared}]\nscope = \"shared\"\nschema = \"{schema}\"\n\
         \n[tables.{bare}]\nscope = \"environment\"\nschema = \"{schema}\"\n\
         organization_column = \"tenant_id\"\nenvironment_column = \"env\"\n"
    ));
    let policies = dir.path().to_str().unwrap();
    let doctor = || run(Some(&f.settings.upstream), &["doctor", "--policies", policies]);

    let r = doctor();
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let loose_problems = problems(&r.stdout, &format!("{schema}.{loose}"));
    assert_eq!(loose_problems.len(), 4, "{}", r.stdout);
    assert!(loose_problems[0].starts_with("ERROR") && loose_problems[0].contains("\"organization_id\" allows NULL"));
    assert!(loose_problems[1].starts_with("ERROR") && loose_problems[1].contains("\"environment\" allows NULL"));
    assert!(
        loose_problems[1].contains(&format!("fix: struere-proxy migrate add-environment --table {schema}.{loose}"))
    );
    assert!(loose_problems[2].starts_with("WARN") && loose_problems[2].contains("no CHECK or enum"));
    assert!(loose_problems[3].starts_with("WARN") && loose_problems[3].contains("no index leads with"));
    let shared_problems = problems(&r.stdout, &format!("{schema}.{shared}"));
    assert_eq!(shared_problems.len(), 1, "{}", r.stdout);
    assert!(shared_problems[0].starts_with("ERROR") && shared_problems[0].contains("\"organization_id\" allows NULL"));
    let bare_problems = problems(&r.stdout, &format!("{schema}.{bare}"));
    assert_eq!(bare_problems.len(), 1, "{}", r.stdout);
    assert!(
        bare_problems[0].starts_with("ERROR") && bare_problems[0].contains("environment column \"env\" is missing")
    );
    // Nothing else is an error: the demo tables and the least-privilege role are sound.
    assert_eq!(r.stdout.lines().filter(|l| l.starts_with("ERROR")).count(), 4, "{}", r.stdout);
    assert!(r.stdout.contains("\nsummary: 4 errors, "), "{}", r.stdout);

    // The fixes: migrate the two environment-scoped tables (the columns come from the policy),
    // and make the organization columns NOT NULL.
    for t in [&loose, &bare] {
        let r = run(None, &["migrate", "add-environment", "--table", t, "--policies", policies]);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    }
    let r = doctor();
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert_eq!(
        problems(&r.stdout, &format!("{schema}.{loose}")).len(),
        1,
        "only the organization column: {}",
        r.stdout
    );
    assert!(problems(&r.stdout, &format!("{schema}.{bare}")).is_empty(), "{}", r.stdout);
    assert!(
        r.stdout.contains(&format!("OK {schema}.{bare}: index {bare}_tenant_id_env_idx leads with (tenant_id, env)")),
        "{}",
        r.stdout
    );
    for t in [&loose, &shared] {
        admin
            .batch_execute(&format!("ALTER TABLE {schema}.{t} ALTER COLUMN organization_id SET NOT NULL"))
            .await
            .unwrap();
    }
    let r = doctor();
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(r.stdout.contains("\nsummary: 0 errors, "), "{}", r.stdout);
}

#[test]
fn doctor_on_the_demo_finds_no_error() {
    let f = fixture();
    let r = run(Some(&f.settings.upstream), &["doctor"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(!r.stdout.lines().any(|l| l.starts_with("ERROR")), "{}", r.stdout);
    assert!(r.stdout.contains("OK public.entities: environment column \"environment\" is NOT NULL"), "{}", r.stdout);
    assert!(r.stdout.contains("OK role struere_app: is not a superuser"), "{}", r.stdout);
    assert!(r.stdout.contains("OK role struere_app: owns no managed table"), "{}", r.stdout);
    // Every managed table of the demo has the index the proxy's predicates need.
    assert!(!r.stdout.lines().any(|l| l.starts_with("WARN public.")), "{}", r.stdout);
    // The demo grants CREATE on public (development scratch tables): reported, not an error.
    assert!(r.stdout.contains("WARN role struere_app: may CREATE in schema public"), "{}", r.stdout);
    assert!(r.stdout.lines().last().is_some_and(|l| l.starts_with("summary: 0 errors, ")), "{}", r.stdout);
}

fn url(addr: std::net::SocketAddr, key: &str) -> String {
    format!("host=127.0.0.1 port={} user=tester dbname=app password={key} sslmode=disable", addr.port())
}

#[tokio::test]
async fn a_superuser_upstream_role_is_a_hole() {
    let f = fixture();
    let r = run(Some(&f.admin_url), &["doctor"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("ERROR role postgres: is a superuser"), "{}", r.stdout);
    assert!(r.stdout.contains("ERROR role postgres: owns managed table public.entities"), "{}", r.stdout);

    // A proxy whose upstream is the superuser: production keys are refused at connect…
    let unsafe_proxy = f.extra_proxy(|s| s.upstream = fixture().admin_url.clone());
    let Err(e) = connect_to(&url(unsafe_proxy, &f.prod_key)).await else { panic!("production key connected") };
    assert_eq!(code(&e), "28000", "{e}");
    let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
    assert!(message.contains("struere-proxy doctor") && message.contains("production keys are refused"), "{message}");
    // …development keys (and operator keys) still work…
    let dev = connect_to(&url(unsafe_proxy, &f.dev_key)).await.expect("development key connects");
    assert!(dev.query_one("SELECT count(*) FROM entities", &[]).await.unwrap().get::<_, i64>(0) > 0);
    let op = connect_to(&url(unsafe_proxy, &f.operator_key)).await.expect("operator key connects");
    op.simple_query("SELECT 1").await.unwrap();
    let other_prod = f.create_key(&unique("prod"), Environment::Production, None).await;
    assert_eq!(code(&connect_to(&url(unsafe_proxy, &other_prod)).await.unwrap_err()), "28000");

    // …unless the operator accepts the risk.
    let allowed = f.extra_proxy(|s| {
        s.upstream = fixture().admin_url.clone();
        s.allow_unsafe_upstream_role = true;
    });
    let prod = connect_to(&url(allowed, &f.prod_key)).await.expect("production key connects when allowed");
    prod.simple_query("SELECT 1 FROM messages LIMIT 1").await.unwrap();
    // The fixture's own proxy (least-privilege upstream) serves production keys.
    f.connect(&f.prod_key).await.expect("production key connects through the safe proxy");
}

#[tokio::test]
async fn a_role_granted_pg_read_all_data_is_a_hole() {
    let f = fixture();
    let role = crate::harness::unique("reader").replace('-', "_");
    let admin = f.admin().await;
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD 'pw' NOSUPERUSER; GRANT pg_read_all_data TO {role}"))
        .await
        .unwrap();
    let r = run(Some(&format!("postgres://{role}:pw@127.0.0.1:1/app")), &["doctor"]);
    admin.batch_execute(&format!("DROP ROLE {role}")).await.unwrap();
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains(&format!("ERROR role {role}: is a member of pg_read_all_data")), "{}", r.stdout);
}
