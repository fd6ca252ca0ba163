//! One test (at least) per attack class of the security review that no other file covers
//! through the proxy, against the real PostgreSQL. Each asserts the safe outcome: a refusal with
//! its SQLSTATE and reason, or rows confined to the caller, and that nothing changed. The table in
//! docs/security.md (`## Attack classes`) maps every class to its tests, here and elsewhere.

use std::time::{Duration, Instant};

use struere_proxy::auth::identity::{ActorContext, ActorType, Environment};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{code, fixture, unique};

/// The tenants a statement's rows belong to, as `org/env`, deduplicated and sorted.
const TENANT: &str = "organization_id || '/' || environment";

/// Every value of every row, as text (`NULL` for NULL).
async fn rows(c: &Client, sql: &str) -> Vec<Vec<String>> {
    let msgs = c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_owned()).collect()),
            _ => None,
        })
        .collect()
}

/// The first column of every row.
async fn column(c: &Client, sql: &str) -> Vec<String> {
    rows(c, sql).await.into_iter().map(|mut r| r.swap_remove(0)).collect()
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")).get(0)
}

/// The refusal of `sql` (simple protocol): SQLSTATE and message.
async fn refusal(c: &Client, sql: &str) -> (String, String) {
    match c.simple_query(sql).await {
        Ok(r) => panic!("{sql} must be refused; it returned {} messages", r.len()),
        Err(e) => (code(&e), e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default()),
    }
}

/// `sql` is refused with 42501 and a message containing `reason`.
async fn denied(c: &Client, sql: &str, reason: &str) {
    let (state, msg) = refusal(c, sql).await;
    assert_eq!(state, "42501", "{sql}: {msg}");
    assert!(msg.contains(reason), "{sql}: the reason must name {reason:?}: {msg}");
}

/// Rows of `table` per organization and environment (acme and globex), read directly by the owner.
async fn census(table: &str) -> Vec<Vec<String>> {
    let admin = fixture().admin().await;
    // Other tests add organizations of their own; the demo's two are this file's witnesses.
    rows(
        &admin,
        &format!(
            "SELECT {TENANT}, count(*)::text FROM {table} \
             WHERE organization_id IN ('acme', 'globex') GROUP BY 1 ORDER BY 1"
        ),
    )
    .await
}

/// What the owner sees for acme/development in `table`.
async fn acme_dev_count(table: &str) -> i64 {
    let admin = fixture().admin().await;
    count(
        &admin,
        &format!("SELECT count(*) FROM {table} WHERE organization_id = 'acme' AND environment = 'development'"),
    )
    .await
}

fn actor(org: &str, env: Environment, role: &str) -> ActorContext {
    ActorContext {
        organization: org.into(),
        environment: env,
        roles: vec![role.into()],
        actor_type: ActorType::User,
        actor_id: format!("{org}-{role}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Reads: precedence, names, shadowing, CTEs, set operations, subqueries, masks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn precedence_cannot_widen_a_read_or_a_write() {
    let f = fixture();
    let dev = f.dev().await;
    let own = acme_dev_count("entities").await;
    for sql in [
        "SELECT count(*) FROM entities WHERE organization_id = 'globex' OR true",
        "SELECT count(*) FROM entities WHERE true OR environment = 'production' AND organization_id = 'globex'",
        "SELECT count(*) FROM entities WHERE NOT (organization_id = 'acme' AND false) OR 1 = 1",
        "SELECT count(*) FROM entities e \
         WHERE (e.organization_id, e.environment) <> ('acme', 'development') OR e.id IS NOT NULL",
    ] {
        assert_eq!(count(&dev, sql).await, own, "{sql}");
    }
    assert_eq!(
        count(&dev, "SELECT count(*) FROM entities WHERE NOT (organization_id = 'acme') OR environment = 'production'")
            .await,
        0
    );
    // A write's WHERE with an OR cannot widen its target either (rolled back).
    let teacher = f.as_actor("acme", Environment::Development, "teacher", ActorType::User, "acme-teacher-1").await;
    teacher.batch_execute("BEGIN").await.unwrap();
    let n = teacher
        .execute("UPDATE entities SET data = data WHERE id = 'globex-production-session-1' OR 1 = 1", &[])
        .await
        .unwrap();
    teacher.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(n, 2, "only the teacher's own two sessions");
}

#[tokio::test]
async fn aliases_quoting_and_schema_qualification_all_reach_the_secure_relation() {
    let f = fixture();
    let dev = f.dev().await;
    for from in [
        "entities",
        "public.entities",
        "\"public\".\"entities\"",
        "PUBLIC.ENTITIES",
        "public.\"entities\"",
        "entities AS users",
        "entities AS \"public.entities\"",
        "ONLY entities",
        "ONLY public.entities",
    ] {
        let sql = format!("SELECT DISTINCT {TENANT} FROM {from}");
        assert_eq!(column(&dev, &sql).await, ["acme/development"], "{sql}");
    }
    // Aliases that swap the names of two managed tables.
    let sql = "SELECT DISTINCT users.organization_id || '/' || users.environment, entities.organization_id \
               FROM users AS entities JOIN entities AS users ON true";
    assert_eq!(rows(&dev, sql).await, [vec!["acme/development", "acme"]], "{sql}");
    // Spellings that are not the managed table are not a way around it.
    let teacher = f.as_actor("acme", Environment::Development, "teacher", ActorType::User, "acme-teacher-1").await;
    for (sql, reason) in [
        ("SELECT * FROM app.public.entities", "not supported"),
        ("SELECT * FROM \"Entities\"", "not managed"),
        ("SELECT * FROM \"public.entities\"", "not managed"),
        ("SELECT * FROM __struere_t", "reserved"),
        ("SELECT e.__struere_in_scope FROM entities e", "reserved"),
    ] {
        denied(&teacher, sql, reason).await;
    }
}

#[tokio::test]
async fn temporary_objects_cannot_shadow_managed_tables() {
    let f = fixture();
    let dev = f.dev().await;
    for sql in [
        "CREATE TEMP TABLE entities (id text, organization_id text, environment text)",
        "CREATE TEMPORARY TABLE users AS SELECT 'x' AS id",
        "CREATE TABLE pg_temp.threads (id text)",
    ] {
        denied(&dev, sql, "temporary table may not be named like the managed table").await;
    }
    denied(&dev, "CREATE TEMP VIEW entities AS SELECT 1 AS id", "TEMPORARY").await;
    denied(&dev, "CREATE FUNCTION pg_temp.lower(text) RETURNS text LANGUAGE sql AS 'SELECT $1'", "").await;
    // A temporary table of another name works, and the managed name still means the managed table.
    dev.batch_execute("CREATE TEMP TABLE IF NOT EXISTS temp_probe (organization_id text, environment text)")
        .await
        .unwrap();
    dev.batch_execute("INSERT INTO temp_probe VALUES ('globex', 'production')").await.unwrap();
    assert_eq!(column(&dev, &format!("SELECT DISTINCT {TENANT} FROM entities")).await, ["acme/development"]);
    assert_eq!(column(&dev, &format!("SELECT DISTINCT {TENANT} FROM public.entities")).await, ["acme/development"]);
}

#[tokio::test]
async fn ctes_named_like_managed_tables_and_writable_ctes_stay_confined() {
    let f = fixture();
    let dev = f.dev().await;
    for sql in [
        format!("WITH entities AS (SELECT * FROM public.entities) SELECT DISTINCT {TENANT} FROM entities"),
        format!("WITH x AS MATERIALIZED (SELECT * FROM entities) SELECT DISTINCT {TENANT} FROM x"),
        format!(
            "WITH RECURSIVE r AS (SELECT id, {TENANT} AS t, 1 AS n FROM entities UNION ALL \
             SELECT e.id, e.{TENANT}, r.n + 1 FROM r JOIN entities e ON e.id > r.id WHERE r.n < 2) \
             SELECT DISTINCT t FROM r"
        ),
        format!(
            "WITH users AS (SELECT 'globex' AS organization_id) \
             SELECT DISTINCT e.{TENANT} FROM public.entities e \
             WHERE e.organization_id NOT IN (SELECT organization_id FROM users)"
        ),
    ] {
        let got = column(&dev, &sql).await;
        assert!(got.iter().all(|t| t == "acme/development"), "{sql}: {got:?}");
        assert!(!got.is_empty(), "{sql}");
    }
    // Writable CTEs: the write and the read both stay in the tenant (rolled back).
    let own = acme_dev_count("entities").await;
    dev.batch_execute("BEGIN").await.unwrap();
    let got = rows(
        &dev,
        &format!(
            "WITH d AS (UPDATE entities SET data = data WHERE true OR organization_id = 'globex' \
             RETURNING {TENANT} AS t) \
             SELECT t, count(*)::text FROM d GROUP BY t"
        ),
    )
    .await;
    dev.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(got, [vec!["acme/development".to_owned(), own.to_string()]]);
    // A writable CTE may not copy managed rows into an unmanaged table.
    dev.batch_execute("CREATE TABLE IF NOT EXISTS cte_sink (id text)").await.unwrap();
    denied(
        &dev,
        "WITH x AS (INSERT INTO cte_sink SELECT id FROM entities RETURNING id) SELECT count(*) FROM x",
        "may not read managed tables",
    )
    .await;
}

#[tokio::test]
async fn set_operations_and_scalar_and_correlated_subqueries_are_confined() {
    let f = fixture();
    let dev = f.dev().await;
    let own = acme_dev_count("entities").await;
    let messages = acme_dev_count("messages").await;
    let threads = acme_dev_count("threads").await;
    assert_eq!(count(&dev, "SELECT (SELECT count(*) FROM entities)").await, own);
    assert_eq!(
        count(&dev, "SELECT count(*) FROM (SELECT id FROM entities UNION SELECT id FROM public.entities) s").await,
        own
    );
    assert_eq!(
        count(&dev, "SELECT count(*) FROM (SELECT id FROM entities INTERSECT ALL SELECT id FROM entities) s").await,
        own
    );
    assert_eq!(
        count(&dev, "SELECT count(*) FROM (SELECT organization_id FROM threads EXCEPT SELECT 'acme') s").await,
        0,
        "no organization but the caller's"
    );
    // Correlated subqueries in the select list, WHERE and HAVING.
    let per_thread = rows(
        &dev,
        "SELECT t.id, (SELECT count(*) FROM messages m WHERE m.thread_id = t.id)::text FROM threads t ORDER BY t.id",
    )
    .await;
    assert_eq!(per_thread.len() as i64, threads);
    assert_eq!(per_thread.iter().map(|r| r[1].parse::<i64>().unwrap()).sum::<i64>(), messages);
    assert_eq!(
        count(
            &dev,
            "SELECT count(*) FROM (VALUES ('globex'), ('acme')) v(o) \
             WHERE EXISTS (SELECT 1 FROM users u WHERE u.organization_id = v.o)"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &dev,
            "SELECT count(*) FROM entities \
             WHERE organization_id IN (SELECT 'globex' UNION SELECT organization_id FROM users)"
        )
        .await,
        own
    );
    assert_eq!(
        count(
            &dev,
            "SELECT count(*) FROM (SELECT entity_type FROM entities GROUP BY entity_type \
             HAVING count(*) > (SELECT count(*) FROM entities WHERE organization_id = 'globex')) s"
        )
        .await,
        count(&dev, "SELECT count(DISTINCT entity_type) FROM entities").await
    );
}

#[tokio::test]
async fn masked_values_stay_masked_in_where_order_by_group_by_and_aggregates() {
    let f = fixture();
    let t = f.as_actor("acme", Environment::Development, "teacher", ActorType::User, "acme-teacher-1").await;
    // paymentAmount and notes are hidden from teachers: every use of them sees NULL.
    assert_eq!(
        rows(
            &t,
            "SELECT count(*)::text, count(data->>'paymentAmount')::text, \
             coalesce(max(data->>'paymentAmount'), 'NONE'), \
             coalesce(string_agg(data->>'notes', ','), 'NONE'), bool_or(data ? 'paymentAmount')::text FROM entities"
        )
        .await,
        [vec!["2", "0", "NONE", "NONE", "false"]]
    );
    assert_eq!(count(&t, "SELECT count(*) FROM entities WHERE data->>'paymentAmount' IS NOT NULL").await, 0);
    assert_eq!(count(&t, "SELECT count(*) FROM entities WHERE data::text LIKE '%PAYMENT%'").await, 0);
    assert_eq!(
        count(&t, "SELECT count(*) FROM (SELECT 1 FROM entities GROUP BY data->>'paymentAmount') g").await,
        1,
        "one group: every hidden value is NULL"
    );
    assert_eq!(
        column(&t, "SELECT id FROM entities ORDER BY data->>'paymentAmount' DESC NULLS LAST, id").await,
        column(&t, "SELECT id FROM entities ORDER BY id").await,
        "ordering by a hidden value orders by NULL"
    );
    assert_eq!(
        count(&t, "SELECT count(*) FROM entities WHERE (SELECT max(length(data->>'paymentAmount')) FROM entities) > 0")
            .await,
        0
    );
    // A partially masked column (agents see users' emails as `***…`) is masked in every clause.
    let a = f.as_actor("acme", Environment::Development, "agent", ActorType::Agent, "acme-agent-1").await;
    assert_eq!(count(&a, "SELECT count(*) FROM users WHERE email LIKE '%@%'").await, 0);
    let groups = column(&a, "SELECT email FROM users GROUP BY email ORDER BY email").await;
    assert!(groups.iter().all(|e| e.starts_with('*') && !e.contains('@')), "{groups:?}");
    let agg = column(&a, "SELECT string_agg(email, ',' ORDER BY email) FROM users").await;
    assert!(!agg[0].contains('@'), "{agg:?}");
}

// ---------------------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn insert_select_copies_only_the_callers_rows_and_never_into_unmanaged_tables() {
    let f = fixture();
    let dev = f.dev().await;
    let before = census("entities").await;
    let own = acme_dev_count("entities").await;
    let tag = unique("copy");
    dev.batch_execute("BEGIN").await.unwrap();
    let n = dev
        .execute(
            &format!(
                "INSERT INTO entities (id, entity_type, data) \
                 SELECT id || '-{tag}', entity_type, data FROM public.entities WHERE organization_id <> 'acme' OR true"
            ),
            &[],
        )
        .await
        .unwrap();
    let copies = column(&dev, &format!("SELECT DISTINCT {TENANT} FROM entities WHERE id LIKE '%-{tag}'")).await;
    dev.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(n as i64, own, "only the caller's rows were read");
    assert_eq!(copies, ["acme/development"]);
    dev.batch_execute("CREATE TABLE IF NOT EXISTS insert_sink (id text, data jsonb)").await.unwrap();
    denied(&dev, "INSERT INTO insert_sink SELECT id, data FROM entities", "may not read managed tables").await;
    denied(&dev, "CREATE TABLE insert_sink2 AS SELECT id, data FROM entities", "may not read managed tables").await;
    assert_eq!(census("entities").await, before, "nothing changed");
}

#[tokio::test]
async fn copy_to_program_or_file_and_copy_into_managed_tables_are_refused() {
    let f = fixture();
    let dev = f.dev().await;
    dev.batch_execute("CREATE TABLE IF NOT EXISTS copy_scratch (a text)").await.unwrap();
    for sql in [
        "COPY entities TO PROGRAM 'cat > /tmp/struere_stolen'",
        "COPY (SELECT * FROM entities) TO PROGRAM 'cat'",
        "COPY (SELECT 1) TO '/tmp/struere_stolen'",
        "COPY entities TO '/tmp/struere_stolen'",
        "COPY copy_scratch FROM PROGRAM 'id'",
        "COPY copy_scratch FROM '/etc/passwd'",
        "COPY entities FROM PROGRAM 'id'",
    ] {
        let (state, msg) = refusal(&dev, sql).await;
        assert_eq!(state, "42501", "{sql}: {msg}");
    }
    let e = dev.copy_in::<_, bytes::Bytes>("COPY users FROM STDIN").await.err().expect("COPY into users refused");
    assert_eq!(code(&e), "42501");
    // COPY … TO STDOUT reads through the secure relation (isolation.rs checks its rows).
    use futures_util::TryStreamExt;
    let out: Vec<bytes::Bytes> = dev
        .copy_out(&format!("COPY (SELECT {TENANT} FROM entities WHERE true OR organization_id = 'globex') TO STDOUT"))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let text: String = out.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    assert!(text.lines().all(|l| l == "acme/development"), "{text}");
    assert_eq!(text.lines().count() as i64, acme_dev_count("entities").await);
}

#[tokio::test]
async fn explain_analyze_of_writes_is_refused_and_changes_nothing() {
    let f = fixture();
    let dev = f.dev().await;
    let before = census("entities").await;
    for sql in [
        "EXPLAIN ANALYZE DELETE FROM entities",
        "EXPLAIN ANALYSE UPDATE entities SET data = '{}'",
        "EXPLAIN (ANALYZE) DELETE FROM entities WHERE true",
        "EXPLAIN (ANALYZE true, FORMAT JSON) INSERT INTO entities (id, entity_type) VALUES ('explain-x', 'note')",
        "EXPLAIN (ANALYZE on, BUFFERS) UPDATE entities SET data = data",
        "EXPLAIN (FORMAT TEXT, ANALYZE 1) DELETE FROM entities",
        "EXPLAIN (BUFFERS) SELECT * FROM entities",
    ] {
        // 42601 where the proxy's parser does not read the statement (`ANALYSE`): refused all the same.
        let (state, msg) = refusal(&dev, sql).await;
        assert!(state == "42501" || state == "42601", "{sql}: {state} {msg}");
        assert!(msg.starts_with("refused") && (msg.contains("EXPLAIN") || msg.contains("ExplainStmt")), "{sql}: {msg}");
    }
    // Plain EXPLAIN of a write shows the tenant filter and runs nothing.
    let plan = column(&dev, "EXPLAIN DELETE FROM entities").await.join("\n");
    assert!(plan.contains("'development'") && plan.contains("'acme'"), "{plan}");
    assert_eq!(census("entities").await, before, "nothing changed");
}

#[tokio::test]
async fn prepared_writes_and_cursors_stay_confined() {
    let f = fixture();
    let dev = f.dev().await;
    let own = acme_dev_count("entities").await;
    let name = unique("w");
    dev.batch_execute(&format!("PREPARE {name}(text) AS UPDATE entities SET data = data WHERE id = $1 OR true"))
        .await
        .unwrap();
    dev.batch_execute("BEGIN").await.unwrap();
    let got = dev.simple_query(&format!("EXECUTE {name}('globex-production-session-1')")).await.unwrap();
    dev.batch_execute("ROLLBACK").await.unwrap();
    let n = got.iter().find_map(|m| match m {
        SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert_eq!(n, Some(own as u64));
    // A prepared statement or cursor cannot be created around the rewriter.
    denied(&dev, "PREPARE p2 AS SELECT * FROM struere.api_keys", "struere").await;
    let cursor = unique("c");
    dev.batch_execute(&format!("DECLARE {cursor} CURSOR WITH HOLD FOR SELECT organization_id FROM users"))
        .await
        .unwrap();
    let seen = column(&dev, &format!("FETCH ALL FROM {cursor}")).await;
    dev.batch_execute(&format!("CLOSE {cursor}")).await.unwrap();
    assert!(!seen.is_empty() && seen.iter().all(|t| t == "acme"), "{seen:?}");
}

#[tokio::test]
async fn truncate_and_merge_on_managed_tables_are_refused() {
    let f = fixture();
    let dev = f.dev().await;
    let before = census("entities").await;
    for (sql, reason) in [
        ("TRUNCATE entities", "TRUNCATE"),
        ("TRUNCATE ONLY public.entities CASCADE", "TRUNCATE"),
        ("TRUNCATE TABLE agents, threads RESTART IDENTITY", "TRUNCATE"),
        (
            "MERGE INTO entities e USING (SELECT 'x' AS id) s ON e.id = s.id WHEN MATCHED THEN DELETE \
             WHEN NOT MATCHED THEN INSERT (id, entity_type) VALUES (s.id, 'note')",
            "MERGE",
        ),
        ("MERGE INTO public.users u USING users s ON true WHEN MATCHED THEN DELETE", "MERGE"),
    ] {
        denied(&dev, sql, reason).await;
    }
    assert_eq!(census("entities").await, before, "nothing changed");
    // A scratch table of the caller's own may be truncated.
    dev.batch_execute("CREATE TABLE IF NOT EXISTS trunc_scratch (a int); TRUNCATE trunc_scratch").await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Statements, settings, functions and catalogs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn settings_role_and_session_authorization_tricks_are_refused_and_reset_restores_the_pins() {
    let f = fixture();
    let dev = f.dev().await;
    for (sql, reason) in [
        ("SET search_path TO public, pg_temp", "search_path"),
        ("SET LOCAL search_path = pg_temp", "search_path"),
        ("SET standard_conforming_strings = off", "standard_conforming_strings"),
        ("SET client_encoding = 'LATIN1'", "client_encoding"),
        ("SET SESSION AUTHORIZATION postgres", ""),
        ("SET ROLE postgres", ""),
        ("SET LOCAL ROLE NONE", ""),
        ("SET row_security = off", "row_security"),
        ("SET session_replication_role = replica", "session_replication_role"),
        ("RESET ROLE", ""),
        ("RESET SESSION AUTHORIZATION", ""),
        ("SELECT set_config('standard_conforming_strings', 'off', true)", "set_config"),
        ("SELECT set_config('search_path', 'pg_temp', false)", "set_config"),
        ("SELECT set_config('session_authorization', 'postgres', false)", "set_config"),
        ("ALTER ROLE CURRENT_USER SET search_path = pg_temp", ""),
        ("ALTER DATABASE app SET standard_conforming_strings = off", ""),
    ] {
        let (state, msg) = refusal(&dev, sql).await;
        assert_eq!(state, "42501", "{sql}: {msg}");
        assert!(msg.contains(reason), "{sql}: {msg}");
    }
    let pinned = |c: &'static str| format!("SELECT current_setting('{c}')");
    let path_before = column(&dev, &pinned("search_path")).await;
    // RESET ALL and DISCARD ALL are allowed: the pinned values come from the startup packet.
    dev.batch_execute("SET application_name = 'attacker'; RESET ALL").await.unwrap();
    dev.batch_execute("DISCARD ALL").await.unwrap();
    // So is RESET of one of them: it restores the same startup value (psycopg's tests).
    dev.batch_execute("RESET search_path; RESET client_encoding; RESET standard_conforming_strings").await.unwrap();
    // Setting a pinned setting to its pinned value (psycopg, ORMs) goes through and changes nothing.
    dev.batch_execute("SET client_encoding TO utf8; SET standard_conforming_strings = on").await.unwrap();
    assert_eq!(column(&dev, &pinned("search_path")).await, path_before);
    assert_eq!(column(&dev, &pinned("standard_conforming_strings")).await, ["on"]);
    assert_eq!(column(&dev, &pinned("client_encoding")).await, ["UTF8"]);
    assert_eq!(column(&dev, "SELECT current_user::text").await, [struere_proxy::demo::APP_ROLE]);
    assert_eq!(column(&dev, &format!("SELECT DISTINCT {TENANT} FROM entities")).await, ["acme/development"]);
}

#[tokio::test]
async fn do_blocks_and_function_creation_are_refused() {
    let f = fixture();
    let dev = f.dev().await;
    let name = unique("evil_fn");
    for sql in [
        "DO $$ BEGIN PERFORM 1; END $$".to_owned(),
        "DO LANGUAGE plpgsql 'BEGIN NULL; END'".to_owned(),
        format!("CREATE FUNCTION {name}() RETURNS int LANGUAGE sql AS 'SELECT 1'"),
        format!("CREATE OR REPLACE FUNCTION {name}(text) RETURNS text LANGUAGE sql SECURITY DEFINER AS 'SELECT $1'"),
        format!("CREATE PROCEDURE {name}() LANGUAGE sql AS 'SELECT 1'"),
        format!("CREATE AGGREGATE {name}(int) (SFUNC = int4pl, STYPE = int)"),
        "CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = int4eq)".to_owned(),
        format!("CREATE TRIGGER {name} BEFORE INSERT ON entities FOR EACH ROW EXECUTE FUNCTION {name}()"),
        format!("CREATE RULE {name} AS ON SELECT TO entities DO INSTEAD SELECT 1"),
        "CREATE EXTENSION IF NOT EXISTS dblink".to_owned(),
        format!("CALL {name}()"),
        "LOAD 'plpgsql'".to_owned(),
        "ALTER SYSTEM SET log_statement = 'all'".to_owned(),
        "GRANT SELECT ON entities TO PUBLIC".to_owned(),
    ] {
        let (state, msg) = refusal(&dev, &sql).await;
        assert!(state == "42501" || state == "42601", "{sql}: {state} {msg}");
        assert!(msg.starts_with("refused"), "refused by the proxy, not by the server: {sql}: {msg}");
    }
    // Kinds sqlparser cannot read are refused by their rule too, not as unparseable.
    for (sql, kind) in [
        ("DO $$ BEGIN PERFORM 1; END $$", "DO"),
        ("LOAD 'plpgsql'", "LOAD"),
        ("CREATE USER someone LOGIN PASSWORD 'x'", "CREATE USER"),
    ] {
        let (state, msg) = refusal(&dev, sql).await;
        assert_eq!(
            (state.as_str(), msg.as_str()),
            ("42501", &*format!("refused: {kind} is not allowed through an environment key"))
        );
    }
    let admin = f.admin().await;
    let n = count(&admin, &format!("SELECT count(*) FROM pg_proc WHERE proname = '{name}'")).await;
    assert_eq!(n, 0, "no function was created");
}

#[tokio::test]
async fn file_and_sql_executing_functions_are_refused() {
    let f = fixture();
    let dev = f.dev().await;
    for (sql, function) in [
        ("SELECT pg_read_file('/etc/passwd')", "pg_read_file"),
        ("SELECT pg_read_binary_file('postgresql.conf')", "pg_read_binary_file"),
        ("SELECT * FROM pg_ls_dir('.')", "pg_ls_dir"),
        ("SELECT pg_stat_file('postgresql.conf')", "pg_stat_file"),
        ("SELECT lo_import('/etc/passwd')", "lo_import"),
        ("SELECT lo_export(1, '/tmp/struere_x')", "lo_export"),
        ("SELECT lo_get(1)", "lo_get"),
        ("SELECT query_to_xml('SELECT * FROM public.entities', true, true, '')", "query_to_xml"),
        ("SELECT table_to_xml('public.entities', true, true, '')", "table_to_xml"),
        ("SELECT database_to_xml(true, true, '')", "database_to_xml"),
        ("SELECT cursor_to_xml('c', 1, true, true, '')", "cursor_to_xml"),
        ("SELECT query_to_xml_and_xmlschema('SELECT 1', true, true, '')", "query_to_xml_and_xmlschema"),
        ("SELECT pg_terminate_backend(1)", "pg_terminate_backend"),
        ("SELECT pg_cancel_backend(1)", "pg_cancel_backend"),
        ("SELECT pg_reload_conf()", "pg_reload_conf"),
        ("SELECT pg_advisory_lock(1)", "pg_advisory_lock"),
        ("SELECT pg_stat_get_live_tuples('public.entities'::regclass)", "pg_stat_get_live_tuples"),
        ("SELECT dblink('dbname=app', 'SELECT 1')", "dblink"),
        ("SELECT * FROM entities WHERE pg_catalog.pg_read_file('x') IS NULL", "pg_read_file"),
    ] {
        denied(&dev, sql, function).await;
    }
}

#[tokio::test]
async fn statistics_catalogs_are_refused() {
    let f = fixture();
    let dev = f.dev().await;
    for sql in [
        "SELECT * FROM pg_stats WHERE tablename = 'entities'",
        "SELECT * FROM pg_catalog.pg_statistic",
        "SELECT * FROM pg_stats_ext",
        "SELECT query FROM pg_stat_activity",
        "SELECT n_live_tup FROM pg_stat_user_tables",
        "SELECT * FROM pg_catalog.pg_stat_all_indexes",
        "SELECT * FROM pg_statio_user_tables",
        "SELECT * FROM pg_stat_database",
        "SELECT * FROM pg_locks",
        "SELECT * FROM pg_prepared_xacts",
        "SELECT rolpassword FROM pg_authid",
        "SELECT * FROM pg_shadow",
        "SELECT * FROM pg_user_mappings",
    ] {
        let (state, msg) = refusal(&dev, sql).await;
        assert_eq!(state, "42501", "{sql}: {msg}");
        assert!(msg.contains("exposes other tenants") || msg.contains("not allowed"), "{sql}: {msg}");
    }
}

#[tokio::test]
async fn views_children_and_partitions_of_managed_tables_are_refused() {
    // Created by the DBA (through the operator key, so the proxy re-reads its catalog): a view,
    // a materialized view and an inheritance child over a managed table, readable by the
    // upstream role. Read directly they would show every tenant's rows, so even a development
    // admin (granted unmanaged tables) is refused them; through the managed parent, the secure
    // relation applies to the child's rows too.
    let f = fixture();
    let op = f.operator().await;
    let view = unique("all_entities_v");
    let matview = unique("all_entities_m");
    let child = unique("trigger_runs_child");
    let app = struere_proxy::demo::APP_ROLE;
    op.batch_execute(&format!(
        "CREATE VIEW public.{view} AS SELECT * FROM public.entities;
         CREATE MATERIALIZED VIEW public.{matview} AS SELECT * FROM public.entities;
         CREATE TABLE public.{child} () INHERITS (public.trigger_runs);
         INSERT INTO public.{child} (id, organization_id, environment, trigger, status)
             VALUES ('{child}-row', '{child}', 'production', 'nightly', 'ok');
         GRANT SELECT, INSERT, UPDATE, DELETE ON public.{view}, public.{matview}, public.{child} TO {app}"
    ))
    .await
    .unwrap();
    let dev = f.dev().await;
    let mut outcome = Vec::new();
    for rel in [&view, &matview, &child] {
        // The catalog is re-read right after the operator's DDL; wait for it.
        let mut last = None;
        for _ in 0..50 {
            match dev.simple_query(&format!("SELECT {TENANT} FROM {rel}")).await {
                Err(e) => {
                    last = Some((code(&e), e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default()));
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        outcome.push((rel.clone(), last));
    }
    // Through the parent, the child's row (another organization's) is not the caller's.
    let through_parent =
        column(&dev, &format!("SELECT DISTINCT {TENANT} FROM trigger_runs WHERE id = '{child}-row' OR true")).await;
    let write = dev.simple_query(&format!("DELETE FROM public.{child}")).await.map(|_| ()).map_err(|e| code(&e));
    op.batch_execute(&format!(
        "DROP VIEW public.{view}; DROP MATERIALIZED VIEW public.{matview}; DROP TABLE public.{child}"
    ))
    .await
    .unwrap();
    for (rel, last) in outcome {
        let (state, msg) = last.unwrap_or_else(|| panic!("{rel} was readable by an environment key"));
        assert_eq!(state, "42501", "{rel}: {msg}");
        assert!(msg.contains("managed table"), "{rel}: {msg}");
    }
    assert_eq!(through_parent, ["acme/development"]);
    assert_eq!(write, Err("42501".to_owned()), "the child may not be written directly either");
    // Partitioned tables cannot be managed at all (the proxy refuses to start on one), and a
    // partition or child of a managed table can only be created by its owner: refused here.
    denied(&dev, "CREATE TABLE part_probe PARTITION OF entities FOR VALUES IN ('x')", "").await;
    let (state, _) = refusal(&dev, "CREATE TABLE inherit_probe () INHERITS (entities)").await;
    assert!(state == "42501", "{state}");
}

// ---------------------------------------------------------------------------------------------
// Protocol: multi-statement messages, channels, cancel, keys, limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn multi_statement_messages_mixing_allowed_and_refused_statements_run_nothing() {
    let f = fixture();
    let dev = f.dev().await;
    let table = unique("multi");
    dev.batch_execute(&format!("CREATE TABLE {table} (a int)")).await.unwrap();
    let before = census("entities").await;
    for sql in [
        format!("INSERT INTO {table} VALUES (1); DELETE FROM entities WHERE true; SELECT pg_read_file('/etc/passwd')"),
        format!("SELECT * FROM struere.api_keys; INSERT INTO {table} VALUES (2)"),
        format!("BEGIN; INSERT INTO {table} VALUES (3); SET ROLE postgres; COMMIT"),
        format!("INSERT INTO {table} VALUES (4); EXPLAIN ANALYZE DELETE FROM entities"),
    ] {
        let (state, msg) = refusal(&dev, &sql).await;
        assert_eq!(state, "42501", "{sql}: {msg}");
    }
    assert_eq!(count(&dev, &format!("SELECT count(*) FROM {table}")).await, 0, "no statement of a refused message ran");
    assert_eq!(census("entities").await, before);
    // The session is usable and not inside a transaction.
    dev.batch_execute(&format!("INSERT INTO {table} VALUES (5)")).await.unwrap();
    assert_eq!(count(&dev, &format!("SELECT count(*) FROM {table}")).await, 1);
}

#[tokio::test]
async fn a_channel_named_with_another_tenants_prefix_hears_nothing_of_it() {
    use futures_util::{StreamExt, pin_mut};
    let f = fixture();
    let globex_prefix =
        struere_proxy::rewrite::engine::notify_prefix(&actor("globex", Environment::Development, "admin"));
    let (client, mut conn) = tokio_postgres::connect(&f.url(&f.dev_key), tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        pin_mut!(stream);
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    // acme listens on globex's prefixed name, quoted and not.
    client.batch_execute(&format!("LISTEN \"{globex_prefix}jobs\"; LISTEN {globex_prefix}jobs")).await.unwrap();
    let globex = f.as_actor("globex", Environment::Development, "admin", ActorType::User, "globex-admin").await;
    globex.batch_execute("NOTIFY jobs, 'globex secret'; SELECT pg_notify('jobs', 'globex secret 2')").await.unwrap();
    // A raw NOTIFY on globex's real channel (the operator) does not reach acme either.
    f.operator().await.batch_execute(&format!("NOTIFY \"{globex_prefix}jobs\", 'raw'")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "acme heard another tenant's channel");
    denied(&client, "SELECT pg_notify(c, 'x') FROM (SELECT 'jobs' AS c) s", "pg_notify").await;
}

#[tokio::test]
async fn cancel_requests_aimed_at_another_session_cancel_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture();
    // Session A runs a query; B is the attacker's own session (it knows B's cancel key only).
    let a = f.dev().await;
    let b = crate::hostile::Raw::session().await;
    let cancel = |pid: i32, secret: i32| async move {
        let mut c = tokio::net::TcpStream::connect(fixture().addr).await.unwrap();
        let mut p = 16i32.to_be_bytes().to_vec();
        p.extend_from_slice(&80_877_102i32.to_be_bytes());
        p.extend_from_slice(&pid.to_be_bytes());
        p.extend_from_slice(&secret.to_be_bytes());
        c.write_all(&p).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
        out
    };
    let running = tokio::spawn(async move { a.simple_query("SELECT pg_sleep(1.5)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // B's own key, B's pid with guessed secrets, neighbouring pids with B's secret, and the
    // upstream backend pids (the cancel keys the server gave the proxy) with B's secret.
    let admin = f.admin().await;
    let upstream_pids: Vec<i32> = admin
        .query("SELECT pid FROM pg_stat_activity WHERE usename = $1", &[&struere_proxy::demo::APP_ROLE])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut attempts = vec![(b.pid, b.secret), (b.pid, 0), (b.pid, -1)];
    for d in 1..=8 {
        attempts.push((b.pid.wrapping_add(d), b.secret));
        attempts.push((b.pid.wrapping_sub(d), b.secret));
    }
    attempts.extend(upstream_pids.iter().map(|&p| (p, b.secret)));
    for (pid, secret) in attempts {
        let out = cancel(pid, secret).await;
        assert!(out.is_empty(), "a CancelRequest is never answered");
    }
    let outcome = running.await.unwrap();
    assert!(outcome.is_ok(), "session A was cancelled by another session's request: {outcome:?}");
}

#[tokio::test]
async fn key_brute_force_is_slowed_per_address_and_a_real_key_is_not() {
    let f = fixture();
    // A proxy of its own, so its throttle's state is this test's alone.
    let addr = f.extra_proxy(|_| {});
    let url =
        |key: &str| format!("host=127.0.0.1 port={} user=x dbname=app password={key} sslmode=disable", addr.port());
    let mut delays = Vec::new();
    let mut messages = Vec::new();
    for i in 0..5 {
        let guess = format!("sk_dev_{:064x}", 0xdead_beef_u64 + i);
        let started = Instant::now();
        let Err(e) = crate::harness::connect_to(&url(&guess)).await else { panic!("a guessed key is refused") };
        delays.push(started.elapsed());
        assert_eq!(code(&e), "28P01");
        messages.push(e.as_db_error().unwrap().message().to_owned());
    }
    assert!(messages.iter().all(|m| m == &messages[0]), "{messages:?}");
    // 100 ms, 200 ms, 400 ms, 800 ms, 1.6 s: each failure waits longer. Lower bounds only (a
    // loaded machine only adds; comparing two attempts' times failed once, when the first one,
    // a fresh proxy's first connection, took 480 ms).
    for (i, delay) in delays.iter().enumerate() {
        assert!(*delay >= Duration::from_millis(90 << i), "attempt {}: {delays:?}", i + 1);
    }
    // The right key is never delayed, however many failures came before from this address.
    let started = Instant::now();
    let c = crate::harness::connect_to(&url(&f.dev_key)).await.expect("the real key connects");
    let took = started.elapsed();
    assert_eq!(count(&c, "SELECT 7::bigint").await, 7);
    assert!(took < Duration::from_millis(1500), "a correct key waited {took:?}");
}

/// Statements deeper than pg_query's own decoder took (100 protobuf levels) are rewritten on the
/// proxy's deep stack (`pgparse`), with the same policy: a long UNION (and its `EXPLAIN`, as
/// Django's `test_multi_page_text_explain` sends) and nested subqueries over a managed table see
/// only the caller's rows.
#[tokio::test]
async fn deep_statements_are_rewritten_on_the_deep_stack() {
    let f = fixture();
    let dev = f.dev().await;
    let own = acme_dev_count("entities").await;
    // 110 operands (a statement may name managed tables at most 64 times), the NULLs one row.
    let union = format!(
        "SELECT id FROM entities{}{}",
        " UNION SELECT id FROM entities".repeat(10),
        " UNION SELECT NULL".repeat(100)
    );
    assert_eq!(count(&dev, &format!("SELECT count(*) FROM ({union}) u")).await, own + 1);
    let nested = format!("SELECT {}count(*) FROM entities{}", "(SELECT ".repeat(20), ")".repeat(20));
    assert_eq!(count(&dev, &nested).await, own);
    let plan = dev.simple_query(&format!("EXPLAIN {union}")).await.expect("EXPLAIN of 111 operands");
    let lines = plan.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
    assert!(lines > 100, "{lines} plan lines");
    // The session and the proxy are fine afterwards.
    assert_eq!(count(&dev, "SELECT 7::bigint").await, 7);
}

#[tokio::test]
async fn deeply_nested_sql_and_huge_statements_are_refused_cleanly() {
    let f = fixture();
    let dev = f.dev().await;
    for (what, sql) in [
        ("10,000 parentheses", format!("SELECT {}1{}", "(".repeat(10_000), ")".repeat(10_000))),
        ("5,000 nested subqueries", format!("SELECT {}1{}", "(SELECT ".repeat(5_000), ")".repeat(5_000))),
        (
            "1,000 nested subqueries over a managed table",
            format!("SELECT {}1{} FROM entities", "(SELECT ".repeat(1_000), ")".repeat(1_000)),
        ),
        ("2,000 ANDs", format!("SELECT 1 FROM entities WHERE true{}", " AND true".repeat(2_000))),
        ("a 2 MiB statement", format!("SELECT '{}'", "x".repeat(2 * 1024 * 1024))),
    ] {
        let (state, msg) = refusal(&dev, &sql).await;
        assert_eq!(state, "54000", "{what}: {msg}");
        assert!(msg.contains("nested too deeply") || msg.contains("at most"), "{what}: {msg}");
    }
    // An unterminated one is a syntax error, not a crash.
    let (state, _) = refusal(&dev, &format!("SELECT {}1", "(".repeat(10_000))).await;
    assert!(state == "42601" || state == "54000", "{state}");
    // The session survived every refusal, and so did the proxy.
    assert_eq!(count(&dev, "SELECT 7::bigint").await, 7);
    // A message over max_message_size ends only that connection (hostile.rs sends the header
    // alone; here the bytes really follow).
    let limit = f.settings.max_message_size;
    let e = dev.simple_query(&format!("SELECT '{}'", "y".repeat(limit + 1))).await.unwrap_err();
    assert!(e.code().map(|c| c.code()) == Some("54000") || e.is_closed(), "{e:?}");
    assert_eq!(count(&f.dev().await, "SELECT 7::bigint").await, 7);
}
