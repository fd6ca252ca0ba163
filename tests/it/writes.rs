//! Writes to managed tables through the proxy, on organizations of their own (so the seeded
//! acme/globex rows other tests count stay as they are): confined to the caller's environment,
//! organization and scope; checked like row-level security's WITH CHECK; hidden fields neither
//! written, read, nor lost.

use struere_proxy::auth::identity::{ActorType, Environment};
use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::harness::{code, fixture, unique};

/// A fresh organization with two sessions per environment: `<org>-<env>-s1` (teacher t1) and
/// `<org>-<env>-s2` (teacher t2), each with hidden fields carrying the org and environment.
async fn organization() -> (String, Client) {
    let f = fixture();
    let admin = f.admin().await;
    let org = unique("wco");
    admin.execute("INSERT INTO organizations (id, name) VALUES ($1, $1)", &[&org]).await.unwrap();
    admin
        .execute(
            "INSERT INTO entities (id, organization_id, environment, entity_type, data)
             SELECT $1 || '-' || e || '-s' || n, $1, e, 'session',
                    jsonb_build_object('teacherId', $1 || '-t' || n, 'status', 'open',
                                       'paymentAmount', 'PAYMENT-' || $1 || '-' || e || '-' || n)
             FROM unnest(ARRAY['development', 'production']) AS e, generate_series(1, 2) AS n",
            &[&org],
        )
        .await
        .unwrap();
    (org, admin)
}

async fn client(org: &str, env: Environment, role: &str, id: &str) -> Client {
    fixture().as_actor(org, env, role, ActorType::User, id).await
}

async fn data_of(admin: &Client, id: &str) -> serde_json::Value {
    let text: String = admin.query_one("SELECT data::text FROM entities WHERE id = $1", &[&id]).await.unwrap().get(0);
    serde_json::from_str(&text).unwrap()
}

async fn rows_of(admin: &Client, org: &str) -> Vec<String> {
    admin
        .query(
            "SELECT id || '|' || environment || '|' || organization_id || '|' || (data->>'status')::text
             FROM entities WHERE organization_id = $1 ORDER BY id",
            &[&org],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string())
}

#[tokio::test]
async fn writes_stay_in_the_callers_environment_and_organization() {
    let (org, admin) = organization().await;
    let dev = client(&org, Environment::Development, "admin", "a1").await;
    let before_prod: Vec<String> =
        rows_of(&admin, &org).await.into_iter().filter(|r| r.contains("production")).collect();

    // INSERT without tenant columns: the proxy sets them.
    let n = dev
        .execute(
            "INSERT INTO entities (id, entity_type, data) VALUES ($1, 'note', '{\"status\": \"new\"}')",
            &[&format!("{org}-n1")],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let row = admin
        .query_one("SELECT environment, organization_id FROM entities WHERE id = $1", &[&format!("{org}-n1")])
        .await
        .unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("development".into(), org.clone()));

    // Naming another environment or organization is refused, and nothing is written.
    for sql in [
        "INSERT INTO entities (id, environment, entity_type) VALUES ('x1', 'production', 'note')",
        "INSERT INTO entities (id, organization_id, entity_type) VALUES ('x2', 'acme', 'note')",
        "INSERT INTO entities (id, entity_type, environment) SELECT 'x3', 'note', 'production'",
        "WITH x AS (INSERT INTO entities (id, environment, entity_type) VALUES ('x4', 'production', 'n') RETURNING id) SELECT * FROM x",
        "UPDATE entities SET organization_id = 'acme'",
        "UPDATE entities SET environment = 'production'",
        "INSERT INTO entities (id, entity_type) VALUES ('x5', 'n') ON CONFLICT (id) DO UPDATE SET environment = 'production'",
    ] {
        let e = dev.simple_query(sql).await.unwrap_err();
        assert_eq!(code(&e), "42501", "{sql}: {e:?}");
        assert!(message(&e).contains("environment") || message(&e).contains("organization"), "{sql}: {e:?}");
    }
    let e = dev
        .simple_query("INSERT INTO entities (id, environment, entity_type) VALUES ('x1', 'production', 'note')")
        .await
        .unwrap_err();
    assert!(message(&e).contains("may not name another environment or organization"), "{e:?}");
    for id in ["x1", "x2", "x3", "x4", "x5"] {
        let n: i64 = admin.query_one("SELECT count(*) FROM entities WHERE id = $1", &[&id]).await.unwrap().get(0);
        assert_eq!(n, 0, "{id} was written");
    }

    // UPDATE and DELETE of everything reach only the caller's environment and organization.
    let n =
        dev.execute("UPDATE entities SET data = jsonb_set(data, '{status}', '\"dev-touched\"')", &[]).await.unwrap();
    assert_eq!(n, 3, "two seeded sessions and the note");
    let prod = client(&org, Environment::Production, "admin", "a2").await;
    let n = prod.execute("DELETE FROM entities WHERE data->>'status' = 'dev-touched' OR true", &[]).await.unwrap();
    assert_eq!(n, 2, "only production rows");
    let rows = rows_of(&admin, &org).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r.contains("|development|") && r.contains("dev-touched")), "{rows:?}");
    assert!(!before_prod.is_empty());
    // The seeded tenants were not touched.
    let other: i64 = admin
        .query_one(
            "SELECT count(*) FROM entities WHERE data->>'status' = 'dev-touched' AND organization_id <> $1",
            &[&org],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(other, 0);
}

#[tokio::test]
async fn with_check_refuses_rows_outside_the_scope_and_a_refusal_fails_the_transaction() {
    let (org, admin) = organization().await;
    let t1 = client(&org, Environment::Development, "teacher", &format!("{org}-t1")).await;
    let s1 = format!("{org}-development-s1");
    let s2 = format!("{org}-development-s2");

    // Only its own session is reachable.
    let n = t1.execute("UPDATE entities SET data = jsonb_set(data, '{status}', '\"mine\"')", &[]).await.unwrap();
    assert_eq!(n, 1);
    assert_eq!(data_of(&admin, &s2).await["status"], "open", "another teacher's session");

    // Handing the session to another teacher would move it out of scope: refused, not written.
    let e = t1
        .execute("UPDATE entities SET data = jsonb_set(data, '{teacherId}', '\"someone-else\"') WHERE id = $1", &[&s1])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501");
    assert!(message(&e).contains("WITH CHECK") && message(&e).contains("teacher"), "{e:?}");
    assert!(!message(&e).contains("struere_check"), "the marker never reaches the client: {e:?}");
    assert_eq!(data_of(&admin, &s1).await["teacherId"], format!("{org}-t1"));

    // A new session for another teacher, or of a type the role may not insert: refused.
    for (sql, id) in [
        ("INSERT INTO entities (id, entity_type, data) VALUES ($1, 'session', '{\"teacherId\": \"other\"}')", "i1"),
        ("INSERT INTO entities (id, entity_type, data) VALUES ($1, 'student', '{\"teacherId\": \"TEACHER\"}')", "i2"),
    ] {
        let sql = sql.replace("TEACHER", &format!("{org}-t1"));
        let e = t1.execute(&sql, &[&format!("{org}-{id}")]).await.unwrap_err();
        assert_eq!(code(&e), "42501", "{sql}");
    }
    // Its own session is fine.
    t1.execute(
        "INSERT INTO entities (id, entity_type, data) VALUES ($1, 'session', jsonb_build_object('teacherId', $2::text))",
        &[&format!("{org}-i3"), &format!("{org}-t1")],
    )
    .await
    .unwrap();

    // A refusal inside an open transaction fails it: COMMIT rolls the earlier write back.
    t1.batch_execute("BEGIN").await.unwrap();
    t1.execute("UPDATE entities SET data = jsonb_set(data, '{status}', '\"in-tx\"') WHERE id = $1", &[&s1])
        .await
        .unwrap();
    let e = t1
        .execute("UPDATE entities SET data = jsonb_set(data, '{teacherId}', '\"x\"') WHERE id = $1", &[&s1])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501");
    let e = t1.execute("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(code(&e), "25P02", "the transaction is failed");
    t1.batch_execute("COMMIT").await.unwrap();
    assert_eq!(data_of(&admin, &s1).await["status"], "mine", "the transaction was rolled back");
    // The session stays usable.
    let n: i64 = t1.query_one("SELECT count(*) FROM entities", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

#[tokio::test]
async fn hidden_fields_are_kept_never_copied_and_never_returned() {
    let (org, admin) = organization().await;
    let t1 = client(&org, Environment::Development, "teacher", &format!("{org}-t1")).await;
    let s1 = format!("{org}-development-s1");
    let payment = format!("PAYMENT-{org}-development-1");

    // Copying a hidden field into a visible one copies the masked value (nothing).
    let rows = t1
        .simple_query(&format!(
            "UPDATE entities SET data = jsonb_set(data, '{{status}}', coalesce(data->'paymentAmount', '\"masked\"')) \
             WHERE id = '{s1}' RETURNING data, to_jsonb(entities)"
        ))
        .await
        .unwrap();
    let returned = format!("{rows:?}");
    assert!(!returned.contains("PAYMENT"), "{returned}");
    let stored = data_of(&admin, &s1).await;
    assert_eq!(stored["status"], "masked");
    // Writing the whole column keeps the keys the caller cannot see.
    assert_eq!(stored["paymentAmount"], payment.as_str());
    t1.execute(
        "UPDATE entities SET data = '{\"teacherId\": \"TEACHER\", \"paymentAmount\": 0}'::jsonb WHERE id = $1"
            .replace("TEACHER", &format!("{org}-t1"))
            .as_str(),
        &[&s1],
    )
    .await
    .unwrap();
    let stored = data_of(&admin, &s1).await;
    assert_eq!(stored["paymentAmount"], payment.as_str(), "a hidden key cannot be overwritten: {stored}");
    assert!(stored.get("status").is_none(), "visible keys are replaced: {stored}");

    // A write's condition on a hidden field sees the masked value, and an erroring cast on it
    // reveals nothing.
    let n =
        t1.execute("UPDATE entities SET data = data WHERE data->>'paymentAmount' LIKE 'PAYMENT%'", &[]).await.unwrap();
    assert_eq!(n, 0, "no counting oracle on hidden fields");
    // (The teacher may not delete; an UPDATE is the write with a condition here.)
    let n = t1.execute("UPDATE entities SET data = data WHERE (data->>'paymentAmount')::int > 0", &[]).await.unwrap();
    assert_eq!(n, 0, "the masked value is NULL: no error, no row");

    // An admin sees everything of its own tenant: an erroring cast shows only its own values.
    let a = client(&org, Environment::Development, "admin", "a1").await;
    let e =
        a.execute("UPDATE entities SET data = data WHERE (data->>'paymentAmount')::int > 0", &[]).await.unwrap_err();
    let m = message(&e);
    assert!(m.contains(&format!("{org}-development")) || m.contains("\"0\""), "only the caller's values: {m}");
}

#[tokio::test]
async fn on_conflict_never_touches_a_row_outside_the_callers_scope() {
    let (org, admin) = organization().await;
    let a = client(&org, Environment::Development, "admin", "a1").await;
    // The production row with this id belongs to the same organization's other environment.
    let prod_id = format!("{org}-production-s1");
    let before = data_of(&admin, &prod_id).await;
    let n = a
        .execute(
            "INSERT INTO entities (id, entity_type, data) VALUES ($1, 'session', '{}')
             ON CONFLICT (id) DO UPDATE SET data = '{\"stolen\": true}'",
            &[&prod_id],
        )
        .await
        .unwrap();
    assert_eq!(n, 0, "the conflicting row is outside the caller's scope: left alone");
    assert_eq!(data_of(&admin, &prod_id).await, before);
    // Another organization's seeded row, likewise.
    let n = a
        .execute(
            "INSERT INTO entities (id, entity_type) VALUES ('acme-development-session-1', 'session')
             ON CONFLICT (id) DO UPDATE SET data = excluded.data",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 0);
    // Its own row is updated, the client's expressions seeing the existing row and EXCLUDED.
    let own = format!("{org}-development-s1");
    let rows = a
        .query(
            "INSERT INTO entities AS e (id, entity_type, data) VALUES ($1, 'session', '{\"status\": \"again\"}')
             ON CONFLICT (id) DO UPDATE SET data = e.data || excluded.data WHERE e.entity_type = 'session'
             RETURNING data->>'status', data->>'paymentAmount'",
            &[&own],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), "again");
    // A teacher's ON CONFLICT on another teacher's session does nothing.
    let t1 = client(&org, Environment::Development, "teacher", &format!("{org}-t1")).await;
    let n = t1
        .execute(
            "INSERT INTO entities (id, entity_type, data) VALUES ($1, 'session', jsonb_build_object('teacherId', $2::text))
             ON CONFLICT (id) DO UPDATE SET data = excluded.data",
            &[&format!("{org}-development-s2"), &format!("{org}-t1")],
        )
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(data_of(&admin, &format!("{org}-development-s2")).await["teacherId"], format!("{org}-t2"));
}

#[tokio::test]
async fn update_from_delete_using_and_writable_ctes_are_confined() {
    let (org, admin) = organization().await;
    let a = client(&org, Environment::Development, "admin", "a1").await;
    admin
        .execute(
            "INSERT INTO entity_relations (id, organization_id, environment, from_id, to_id, relation_type)
             VALUES ($1 || '-r1', $1, 'development', 'x', $1 || '-development-s1', 'flag'),
                    ($1 || '-r2', $1, 'production', 'x', $1 || '-production-s2', 'flag'),
                    ($1 || '-r3', 'acme', 'development', 'x', 'acme-development-session-1', 'flag')",
            &[&org],
        )
        .await
        .unwrap();
    // UPDATE … FROM: the FROM item is a secure relation too; everything outside stays.
    let n = a
        .execute(
            "UPDATE entities e SET data = jsonb_set(e.data, '{status}', '\"flagged\"') FROM entity_relations r
             WHERE r.to_id = e.id OR r.relation_type = 'flag'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 2, "both development sessions (the OR cannot widen the target)");
    let flagged: i64 =
        admin.query_one("SELECT count(*) FROM entities WHERE data->>'status' = 'flagged'", &[]).await.unwrap().get(0);
    assert_eq!(flagged, 2);
    // DELETE … USING, in a writable CTE.
    let n: i64 = a
        .query_one(
            "WITH d AS (DELETE FROM entities e USING entity_relations r WHERE r.to_id = e.id RETURNING e.id)
             SELECT count(*) FROM d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let left: Vec<String> = rows_of(&admin, &org).await;
    assert_eq!(left.len(), 3, "{left:?}");
    let acme: i64 = admin
        .query_one("SELECT count(*) FROM entities WHERE id = 'acme-development-session-1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(acme, 1);
    // RETURNING through the masked view.
    let t1 = client(&org, Environment::Development, "teacher", &format!("{org}-t1")).await;
    let rows = t1.simple_query("UPDATE entities SET data = data RETURNING *").await.unwrap();
    assert!(!format!("{rows:?}").contains("PAYMENT"), "{rows:?}");
}

#[tokio::test]
async fn parameters_keep_their_column_types_and_refused_writes_name_the_reason() {
    let (org, _admin) = organization().await;
    let a = client(&org, Environment::Development, "admin", "a1").await;
    let st = a.prepare("INSERT INTO entities (id, entity_type, data) VALUES ($1, $2, $3) RETURNING id").await.unwrap();
    assert_eq!(st.params(), &[Type::TEXT, Type::TEXT, Type::JSONB]);
    let st = a.prepare("UPDATE entities SET data = $1 WHERE id = $2").await.unwrap();
    assert_eq!(st.params(), &[Type::JSONB, Type::TEXT]);
    let t1 = client(&org, Environment::Development, "teacher", &format!("{org}-t1")).await;
    for (sql, reason) in [
        ("DELETE FROM entities", "may not delete entities"),
        ("TRUNCATE entities", "TRUNCATE"),
        ("MERGE INTO entities t USING entities s ON t.id = s.id WHEN MATCHED THEN DELETE", "MERGE"),
    ] {
        let e = t1.simple_query(sql).await.unwrap_err();
        assert_eq!(code(&e), "42501", "{sql}");
        assert!(message(&e).contains(reason), "{sql}: {e:?}");
    }
    let e = a.copy_in::<_, bytes::Bytes>("COPY entities FROM STDIN").await.err().expect("COPY FROM refused");
    assert_eq!(code(&e), "42501");
}

#[tokio::test]
async fn rows_refer_only_to_rows_of_the_callers_organization_and_environment() {
    let (org, admin) = organization().await;
    admin
        .execute("INSERT INTO agents (id, organization_id, slug, name) VALUES ($1 || '-agent', $1, 'a', 'A')", &[&org])
        .await
        .unwrap();
    let a = client(&org, Environment::Development, "admin", "a1").await;
    let own_agent = format!("{org}-agent");
    // Another organization's agent, and an agent that exists nowhere: the same refusal, so the
    // foreign key tells nothing about other tenants' ids.
    let mut messages = Vec::new();
    for agent in ["globex-agent-1", "no-such-agent"] {
        let e = a
            .execute("INSERT INTO threads (id, agent_id) VALUES ($1, $2)", &[&format!("{org}-th-{agent}"), &agent])
            .await
            .unwrap_err();
        assert_eq!(code(&e), "42501", "{agent}: {e:?}");
        messages.push(message(&e));
    }
    assert_eq!(messages[0], messages[1]);
    assert!(messages[0].contains("agent_id of threads must refer to a row of agents"), "{messages:?}");
    a.execute("INSERT INTO threads (id, agent_id) VALUES ($1, $2)", &[&format!("{org}-th-1"), &own_agent])
        .await
        .unwrap();
    let e = a
        .execute("UPDATE threads SET agent_id = 'globex-agent-1' WHERE id = $1", &[&format!("{org}-th-1")])
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501");
    // Another environment's thread of the same organization.
    admin
        .execute(
            "INSERT INTO threads (id, organization_id, environment, agent_id) VALUES ($1 || '-prod-th', $1, 'production', $1 || '-agent')",
            &[&org],
        )
        .await
        .unwrap();
    let e = a
        .execute(
            "INSERT INTO messages (id, thread_id, role, content) VALUES ($1, $2, 'user', 'x')",
            &[&format!("{org}-m1"), &format!("{org}-prod-th")],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42501");
    let n: i64 = admin
        .query_one("SELECT count(*) FROM threads WHERE agent_id = 'globex-agent-1' AND organization_id = $1", &[&org])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}
