//! Guarded relations on enough rows for plans to matter (160k entities, 160k messages in two
//! organizations of their own × two environments): index plans through the proxy, results equal
//! to the fenced relation's, and no client expression evaluated on — or reporting — another
//! tenant's or environment's rows.

use std::net::SocketAddr;

use struere_proxy::auth::identity::{ActorContext, ActorType, Environment};
use tokio::sync::OnceCell;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{code, fixture, unique};

/// Rows per organization and environment: entities, and threads × messages per thread.
const ENTITIES: i64 = 40_000;
const THREADS: i64 = 400;
const MESSAGES_PER_THREAD: i64 = 100;

/// Organizations no other test uses (isolation.rs counts acme's and globex's rows). Every value
/// names where it lives (`NOTINT-bulk-b-production-17`), so a leak shows what leaked; `n` is
/// text that fails an integer cast.
fn bulk_sql() -> String {
    let tenants = "unnest(ARRAY['bulk-a', 'bulk-b']) AS o, unnest(ARRAY['development', 'production']) AS e";
    format!(
        "INSERT INTO organizations (id, name) VALUES ('bulk-a', 'Bulk A'), ('bulk-b', 'Bulk B') ON CONFLICT DO NOTHING;
         INSERT INTO agents (id, organization_id, slug, name)
         VALUES ('bulk-a-agent', 'bulk-a', 'bulk', 'Bulk'), ('bulk-b-agent', 'bulk-b', 'bulk', 'Bulk')
         ON CONFLICT DO NOTHING;
         INSERT INTO entities (id, organization_id, environment, entity_type, data, created_at, updated_at)
         SELECT o || '-' || e || '-e-' || n, o, e, CASE WHEN n % 2 = 0 THEN 'session' ELSE 'student' END,
                jsonb_build_object('n', 'NOTINT-' || o || '-' || e || '-' || n),
                timestamptz '2026-01-01 00:00:00+00' + n * interval '1 minute', timestamptz '2026-01-01 00:00:00+00'
         FROM {tenants}, generate_series(1, {ENTITIES}) AS n ON CONFLICT DO NOTHING;
         INSERT INTO threads (id, organization_id, environment, agent_id, created_at)
         SELECT o || '-' || e || '-t-' || n, o, e, o || '-agent', timestamptz '2026-01-01 00:00:00+00' + n * interval '1 hour'
         FROM {tenants}, generate_series(1, {THREADS}) AS n ON CONFLICT DO NOTHING;
         INSERT INTO messages (id, organization_id, environment, thread_id, role, content, created_at)
         SELECT o || '-' || e || '-t-' || t || '-m-' || k, o, e, o || '-' || e || '-t-' || t, 'user',
                'MESSAGE ' || k || ' of ' || o || '/' || e,
                timestamptz '2026-01-01 00:00:00+00' + (t * {MESSAGES_PER_THREAD} + k) * interval '1 minute'
         FROM {tenants}, generate_series(1, {THREADS}) AS t, generate_series(1, {MESSAGES_PER_THREAD}) AS k
         ON CONFLICT DO NOTHING;
         ANALYZE entities; ANALYZE threads; ANALYZE messages;
         CREATE OR REPLACE FUNCTION public.leak_notice(v text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001
         AS $$ BEGIN RAISE NOTICE 'LEAK[%]', v; RETURN true; END $$;
         GRANT EXECUTE ON FUNCTION public.leak_notice(text) TO PUBLIC;"
    )
}

static BULK: OnceCell<()> = OnceCell::const_new();

/// Load the bulk rows once for the whole binary (one statement per table).
async fn bulk() {
    BULK.get_or_init(|| async {
        fixture().admin().await.batch_execute(&bulk_sql()).await.expect("bulk load");
    })
    .await;
}

/// A second proxy that allows the NOTICE-raising function (created before it starts, so its
/// catalog knows the function).
static LEAKY_PROXY: OnceCell<SocketAddr> = OnceCell::const_new();

async fn leaky_proxy() -> SocketAddr {
    *LEAKY_PROXY
        .get_or_init(|| async {
            bulk().await;
            tokio::task::spawn_blocking(|| fixture().extra_proxy(|s| s.allow_functions.push("leak_notice".into())))
                .await
                .expect("extra proxy")
        })
        .await
}

fn admin_of(org: &str, env: Environment) -> ActorContext {
    ActorContext {
        organization: org.into(),
        environment: env,
        roles: vec!["admin".into()],
        actor_type: ActorType::User,
        actor_id: format!("{org}-admin"),
    }
}

/// A bulk-a development admin through the fixture's proxy.
async fn tenant() -> Client {
    bulk().await;
    fixture().as_actor("bulk-a", Environment::Development, "admin", ActorType::User, "bulk-a-admin").await
}

/// A bulk-a development admin through the leaky proxy; NOTICE texts arrive on the channel.
async fn tenant_with_notices() -> (Client, UnboundedReceiver<String>) {
    let addr = leaky_proxy().await;
    let f = fixture();
    let key = f.create_key_for(&unique("bulk"), admin_of("bulk-a", Environment::Development), None).await;
    let url = format!("host=127.0.0.1 port={} user=tester dbname=app password={key} sslmode=disable", addr.port());
    crate::harness::connect_with_notices(&url).await
}

fn drain(rx: &mut UnboundedReceiver<String>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(m) = rx.try_recv() {
        out.push(m);
    }
    out
}

/// The plan PostgreSQL chose for `sql` as the proxy forwarded it (EXPLAIN without ANALYZE).
async fn plan(c: &Client, sql: &str) -> String {
    let msgs = c.simple_query(&format!("EXPLAIN {sql}")).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let mut out = String::new();
    for m in msgs {
        if let SimpleQueryMessage::Row(r) = m {
            out.push_str(r.get(0).unwrap_or_default());
            out.push('\n');
        }
    }
    out
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")).get(0)
}

#[tokio::test]
async fn a_primary_key_lookup_is_an_index_scan_on_the_primary_key() {
    let c = tenant().await;
    let p = plan(&c, "SELECT * FROM entities WHERE id = 'bulk-a-development-e-5000'").await;
    assert!(p.starts_with("Index Scan using entities_pkey on entities"), "{p}");
    assert!(!p.contains("Seq Scan") && !p.contains("Subquery Scan"), "{p}");
    // A parameter (extended protocol), as drivers send it.
    let sql = "SELECT id, data->>'n' FROM entities WHERE id = $1";
    let rows = c.query(sql, &[&"bulk-a-development-e-5000"]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(1), "NOTINT-bulk-a-development-5000");
    for other in ["bulk-b-development-e-5000", "bulk-a-production-e-5000"] {
        assert!(c.query(sql, &[&other]).await.unwrap().is_empty(), "{other} is out of scope");
    }
    let rows = c.query(&format!("EXPLAIN {sql}"), &[&"bulk-a-development-e-5000"]).await.unwrap();
    let p: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert!(p[0].starts_with("Index Scan using entities_pkey"), "{p:?}");
}

#[tokio::test]
async fn a_range_on_an_indexed_column_uses_the_index() {
    let c = tenant().await;
    let sql = "SELECT count(*) FROM entities WHERE created_at >= '2026-01-05' AND created_at < '2026-01-05 06:00'";
    let p = plan(&c, sql).await;
    assert!(p.contains("Index Scan using entities_created") || p.contains("Index Scan on entities_created"), "{p}");
    assert!(!p.contains("Seq Scan"), "{p}");
    assert_eq!(count(&c, sql).await, 360, "six hours of one tenant's minutes");
}

#[tokio::test]
async fn a_join_on_an_indexed_column_is_a_nested_loop_with_an_index_on_the_inner_side() {
    let c = tenant().await;
    for (sql, rows) in [
        (
            "SELECT m.id, m.content FROM messages m JOIN threads t ON m.thread_id = t.id \
             WHERE t.id = 'bulk-a-development-t-300'",
            MESSAGES_PER_THREAD,
        ),
        // Several threads: the inner index scan is parameterized by the outer row.
        (
            "SELECT m.id, m.content FROM messages m JOIN threads t ON m.thread_id = t.id \
             WHERE t.id IN ('bulk-a-development-t-5', 'bulk-a-development-t-6', 'bulk-b-development-t-5')",
            2 * MESSAGES_PER_THREAD,
        ),
    ] {
        let p = plan(&c, sql).await;
        let lines: Vec<&str> = p.lines().collect();
        assert!(lines[0].starts_with("Nested Loop"), "{p}");
        // The two children of the join, outer first.
        let children: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("  ->  ")).collect();
        assert_eq!(children.len(), 2, "{p}");
        assert!(children[0].contains("Index Scan using threads_pkey on threads"), "outer: {p}");
        assert!(children[1].contains("on messages"), "inner: {p}");
        assert!(
            p.contains("Index Scan on messages_thread") || p.contains("Index Scan using messages_thread"),
            "inner side through the thread index: {p}"
        );
        assert!(!p.contains("Seq Scan") && !p.contains("Hash"), "{p}");
        let got = c.query(sql, &[]).await.unwrap();
        assert_eq!(got.len() as i64, rows, "{sql}");
        assert!(got.iter().all(|r| r.get::<_, String>(1).ends_with("of bulk-a/development")));
    }
    let p = plan(
        &c,
        "SELECT m.id FROM messages m JOIN threads t ON m.thread_id = t.id \
         WHERE t.id IN ('bulk-a-development-t-5', 'bulk-a-development-t-6')",
    )
    .await;
    assert!(p.contains("Index Cond: (thread_id = __struere_"), "parameterized inner scan: {p}");
}

/// The same statement, fenced: a LATERAL subquery in the FROM makes every secure relation of
/// the Select fall back to `OFFSET 0` (and changes no result).
fn fenced(from: &str) -> String {
    format!("{from}, LATERAL (SELECT 1) AS fence")
}

#[tokio::test]
async fn guarded_results_equal_the_fenced_relations_and_the_tenants_own_rows() {
    let c = tenant().await;
    let admin = fixture().admin().await;
    // (FROM, WHERE, the same rows counted directly for bulk-a/development)
    let cases = [
        (
            "entities e",
            "e.id >= 'bulk-a-development-e-100' AND e.id < 'bulk-a-development-e-101'",
            "SELECT count(*) FROM entities e WHERE e.id >= 'bulk-a-development-e-100' AND e.id < 'bulk-a-development-e-101'",
        ),
        ("entities e", "e.id >= 'bulk-b-development-e-100' AND e.id < 'bulk-b-development-e-101'", "SELECT 0::bigint"),
        (
            "entities e",
            "e.created_at BETWEEN '2026-01-03' AND '2026-01-04' AND lower(e.entity_type) = 'session'",
            "SELECT count(*) FROM entities e WHERE organization_id = 'bulk-a' AND environment = 'development' \
             AND e.created_at BETWEEN '2026-01-03' AND '2026-01-04' AND e.entity_type = 'session'",
        ),
        (
            "messages m JOIN threads t ON m.thread_id = t.id",
            "t.id IN ('bulk-a-development-t-7', 'bulk-a-production-t-7', 'bulk-b-development-t-7') \
             AND m.content LIKE 'MESSAGE 1%'",
            "SELECT count(*) FROM messages WHERE thread_id = 'bulk-a-development-t-7' AND content LIKE 'MESSAGE 1%'",
        ),
        (
            "threads t LEFT JOIN messages m ON m.thread_id = t.id AND m.id = 'bulk-a-development-t-9-m-1'",
            "t.id >= 'bulk-a-development-t-9' AND t.id < 'bulk-a-development-t-9z' AND m.id IS NULL",
            "SELECT count(*) - 1 FROM threads WHERE id >= 'bulk-a-development-t-9' AND id < 'bulk-a-development-t-9z'",
        ),
    ];
    for (from, cond, truth) in cases {
        let guarded = format!("SELECT count(*) FROM {from} WHERE {cond}");
        let fence = format!("SELECT count(*) FROM {} WHERE {cond}", fenced(from));
        let gp = plan(&c, &guarded).await;
        let fp = plan(&c, &fence).await;
        assert!(!gp.contains("Subquery Scan"), "guarded: {gp}");
        assert!(fp.contains("Subquery Scan"), "fenced: {fp}");
        let want: i64 = admin.query_one(truth, &[]).await.unwrap().get(0);
        assert_eq!(count(&c, &guarded).await, want, "{guarded}");
        assert_eq!(count(&c, &fence).await, want, "{fence}");
    }
}

#[tokio::test]
async fn a_cheap_notice_function_never_sees_another_tenants_rows() {
    let (c, mut notices) = tenant_with_notices().await;
    // The caller's own rows: every value the function prints is the caller's.
    let own = "SELECT count(*) FROM entities e \
               WHERE e.id >= 'bulk-a-development-e-1000' AND e.id < 'bulk-a-development-e-1001' \
               AND leak_notice(e.data->>'n')";
    let n = count(&c, own).await;
    let seen = drain(&mut notices);
    assert!(n > 0 && seen.len() as i64 >= n, "{n} rows, notices {seen:?}");
    assert!(seen.iter().all(|m| m.starts_with("LEAK[NOTINT-bulk-a-development-")), "{seen:?}");
    // Another tenant's and another environment's rows, selected through index conditions on
    // raw columns: the function is never called for them, not even with NULL.
    for prefix in ["bulk-b-development", "bulk-a-production", "bulk-b-production"] {
        for arg in ["e.data->>'n'", "e.id", "'tick'"] {
            let sql = format!(
                "SELECT count(*) FROM entities e WHERE e.id >= '{prefix}-e-1000' AND e.id < '{prefix}-e-1001' \
                 AND leak_notice({arg})"
            );
            assert_eq!(count(&c, &sql).await, 0, "{sql}");
            let seen = drain(&mut notices);
            assert!(seen.is_empty(), "{sql}: {seen:?}");
        }
    }
    // A join through raw keys: the same.
    let sql = "SELECT count(*) FROM messages m JOIN threads t ON m.thread_id = t.id \
               WHERE t.id = 'bulk-b-development-t-3' AND leak_notice(m.content) AND leak_notice('tick')";
    assert_eq!(count(&c, sql).await, 0);
    assert!(drain(&mut notices).is_empty());
    // Plans stay indexed with the function in the condition.
    let p =
        plan(&c, "SELECT id FROM entities e WHERE e.id = 'bulk-b-development-e-1000' AND leak_notice(e.data->>'n')")
            .await;
    assert!(p.starts_with("Index Scan using entities_pkey"), "{p}");
}

#[tokio::test]
async fn an_erroring_cast_reports_only_the_callers_values() {
    let c = tenant().await;
    let err = c
        .query(
            "SELECT id FROM entities e WHERE e.id >= 'bulk-a-development-e-5' AND e.id < 'bulk-a-development-e-6' \
             AND (e.data->>'n')::int > 0",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), "22P02", "{err:?}");
    let msg = err.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
    assert!(msg.contains("NOTINT-bulk-a-development-"), "only the caller's own value: {msg}");
    // Out-of-scope rows reached through raw index conditions never reach the cast, whatever
    // the cast's argument makes of a guarded NULL.
    for prefix in ["bulk-b-development", "bulk-a-production"] {
        for expr in ["(e.data->>'n')::int > 0", "(CASE WHEN e.data IS NULL THEN 'x' ELSE e.data->>'n' END)::int > 0"] {
            let sql =
                format!("SELECT id FROM entities e WHERE e.id >= '{prefix}-e-5' AND e.id < '{prefix}-e-6' AND {expr}");
            let rows = c.query(&sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            assert!(rows.is_empty(), "{sql}");
        }
    }
}

#[tokio::test]
async fn a_write_by_primary_key_finds_its_row_through_the_index() {
    let c = tenant().await;
    for sql in [
        "UPDATE entities SET data = data WHERE id = 'bulk-a-development-e-7000'",
        "DELETE FROM entities WHERE id = 'bulk-a-development-e-7001' RETURNING id",
    ] {
        let p = plan(&c, sql).await;
        assert!(p.contains("Index Scan using entities_pkey on entities"), "{sql}: {p}");
        assert!(!p.contains("Seq Scan") && !p.contains("Subquery Scan") && !p.contains("Bitmap"), "{sql}: {p}");
    }
    // And it changes exactly that row, and nothing of another tenant with the same key shape.
    let n = c
        .execute("UPDATE entities SET data = data || '{\"touched\": 1}' WHERE id = $1", &[&"bulk-a-development-e-7000"])
        .await
        .unwrap();
    assert_eq!(n, 1);
    let n = c.execute("UPDATE entities SET data = data WHERE id = $1", &[&"bulk-b-development-e-7000"]).await.unwrap();
    assert_eq!(n, 0);
}
