//! Audit events and usage: every decision reaches `struere.events` with its environment and
//! verdict, usage reaches `struere.usage`, and `events tail` / `usage` print them.

use struere_proxy::auth::identity::{ActorType, Environment};
use tokio_postgres::Client;

use crate::cli::run;
use crate::harness::{fixture, unique};

/// Wait (without a fixed deadline in the assertion) until the writer has stored what we expect.
async fn wait_for(admin: &Client, sql: &str, org: &str, at_least: i64) -> i64 {
    let mut n = 0;
    for _ in 0..200 {
        n = admin.query_one(sql, &[&org]).await.unwrap().get(0);
        if n >= at_least {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    n
}

#[tokio::test]
async fn decisions_and_usage_are_recorded_per_environment() {
    let f = fixture();
    let org = unique("evco");
    let dev = f.as_actor(&org, Environment::Development, "teacher", ActorType::User, "t-1").await;
    let prod = f.as_actor(&org, Environment::Production, "admin", ActorType::User, "a-1").await;
    dev.simple_query("SELECT id FROM entities").await.unwrap();
    assert!(dev.simple_query("SELECT * FROM threads").await.is_err());
    prod.query("SELECT count(*) FROM entities WHERE id = $1", &[&"x"]).await.unwrap();
    let admin = f.admin().await;
    let n = wait_for(
        &admin,
        "SELECT coalesce(sum(statements), 0)::int8 FROM struere.events WHERE organization_id = $1",
        &org,
        3,
    )
    .await;
    assert!(n >= 3, "events written: {n}");
    let rows = admin
        .query(
            "SELECT environment, verdict, array_to_string(tables, ','), coalesce(reason, ''), actor, \
                    array_to_string(roles, ','), coalesce(policy_version, ''), coalesce(sql_hash, '') \
             FROM struere.events WHERE organization_id = $1 ORDER BY id",
            &[&org],
        )
        .await
        .unwrap();
    let rows: Vec<Vec<String>> = rows.iter().map(|r| (0..8).map(|i| r.get::<_, String>(i)).collect()).collect();
    let refused = rows.iter().find(|r| r[1] == "refused").expect("a refused event");
    assert_eq!(refused[0], "development");
    assert!(refused[3].contains("may not select threads"), "{refused:?}");
    assert_eq!(refused[2], "threads");
    assert_eq!((refused[4].as_str(), refused[5].as_str()), ("user:t-1", "teacher"));
    let kinds: String = admin
        .query_one(
            "SELECT array_to_string(kinds, ',') FROM struere.events WHERE organization_id = $1 AND verdict = 'refused'",
            &[&org],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kinds, "SelectStmt", "a refused statement's kind is recorded");
    let rewritten = rows.iter().find(|r| r[1] == "rewritten" && r[0] == "development").expect("a rewritten event");
    assert!(!rewritten[6].is_empty() && rewritten[7].len() == 32, "{rewritten:?}");
    assert!(rows.iter().any(|r| r[0] == "production" && r[1] == "rewritten"), "{rows:?}");

    // Usage: statements completed and errors, per environment.
    let n = wait_for(
        &admin,
        "SELECT coalesce(sum(statements), 0)::int8 FROM struere.usage WHERE organization_id = $1",
        &org,
        2,
    )
    .await;
    assert!(n >= 2, "usage statements: {n}");
    let errors: i64 = admin
        .query_one(
            "SELECT coalesce(sum(errors), 0)::int8 FROM struere.usage WHERE organization_id = $1 AND environment = 'development'",
            &[&org],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(errors, 1, "the refusal is the development key's one error");

    // The CLI prints them.
    let (ok, out, err) = run(&["events", "tail", "--org", &org, "--verdict", "refused", "--json"]);
    assert!(ok, "{err}");
    let line = out.lines().next().expect("one refused event");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["environment"], "development");
    assert!(v["reason"].as_str().unwrap_or_default().contains("may not select threads"), "{line}");
    let (ok, out, err) = run(&["events", "tail", "--org", &org, "--env", "production"]);
    assert!(ok, "{err}");
    assert!(out.lines().count() >= 1 && out.lines().all(|l| l.contains(" production ")), "{out}");
    let (ok, out, err) = run(&["usage", "--env", "production"]);
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.contains(&org)), "{out}");
}

#[tokio::test]
async fn failed_statements_carry_their_sqlstate_and_with_check_failures_are_refusals() {
    let f = fixture();
    let org = unique("evfail");
    let c = f.as_actor(&org, Environment::Development, "teacher", ActorType::User, "t-9").await;
    // The database fails it: division by zero (22012), only the code is kept.
    assert!(c.simple_query("SELECT 1 / 0").await.is_err());
    // The proxy's WITH CHECK refuses it at execution: a teacher inserting a session for another teacher.
    let e = c
        .simple_query(
            "INSERT INTO entities (id, entity_type, data) VALUES ('evfail-1', 'session', '{\"teacherId\": \"someone-else\"}')",
        )
        .await
        .unwrap_err();
    assert_eq!(crate::harness::code(&e), "42501", "{e:?}");
    let admin = f.admin().await;
    let n = wait_for(
        &admin,
        "SELECT coalesce(sum(statements), 0)::int8 FROM struere.events WHERE organization_id = $1",
        &org,
        2,
    )
    .await;
    assert!(n >= 2);
    let rows = admin
        .query(
            "SELECT verdict, coalesce(sqlstate, ''), coalesce(reason, '') FROM struere.events \
             WHERE organization_id = $1 ORDER BY id",
            &[&org],
        )
        .await
        .unwrap();
    let rows: Vec<(String, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert!(
        rows.contains(&("allowed".into(), "22012".into(), "failed in the database".into()))
            || rows.contains(&("rewritten".into(), "22012".into(), "failed in the database".into())),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|(v, code, reason)| v == "refused" && code == "42501" && reason.contains("WITH CHECK")),
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_repeated_statement_is_one_row_with_its_count() {
    let f = fixture();
    let org = unique("evagg");
    let c = f.as_actor(&org, Environment::Development, "admin", ActorType::User, "a-1").await;
    for _ in 0..50 {
        c.simple_query("SELECT count(*) FROM entities").await.unwrap();
    }
    let admin = f.admin().await;
    let sum = "SELECT coalesce(sum(statements), 0)::int8 FROM struere.events WHERE organization_id = $1";
    assert_eq!(wait_for(&admin, sum, &org, 50).await, 50, "every execution is counted");
    let row: (i64, i64) = {
        let r = admin
            .query_one(
                "SELECT count(*), coalesce(sum(rows), 0)::int8 FROM struere.events WHERE organization_id = $1",
                &[&org],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(row.0 < 50, "identical decisions of a flush share a row: {} rows for 50 statements", row.0);
    assert_eq!(row.1, 50, "rows summed (one count row per statement)");
}

#[tokio::test]
async fn a_refusal_after_a_rewrite_names_what_the_rewrite_read() {
    // A Parse under a name reserved by the proxy is rewritten, then refused: its event names
    // the statement's kind and relations (taken from the rewrite, not parsed again).
    let name = format!("__struere_{}", unique("evreserved"));
    let mut raw = crate::hostile::Raw::session().await;
    let mut batch = crate::hostile::msg(
        b'P',
        &[crate::hostile::cstr(&name), crate::hostile::cstr("SELECT id FROM entities"), vec![0, 0]].concat(),
    );
    batch.extend(crate::hostile::msg(b'S', b""));
    raw.send(&batch).await;
    let answer = raw.until_ready().await;
    assert_eq!(crate::hostile::sqlstate(&answer[0].1), "42501");
    let admin = fixture().admin().await;
    let pattern = format!("%{name}%");
    let n = wait_for(&admin, "SELECT count(*) FROM struere.events WHERE reason LIKE $1", &pattern, 1).await;
    assert_eq!(n, 1, "the refusal's event");
    let row = admin
        .query_one(
            "SELECT array_to_string(kinds, ','), array_to_string(tables, ','), verdict \
             FROM struere.events WHERE reason LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap();
    let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(got, ("SelectStmt".into(), "entities".into(), "refused".into()));
}

#[tokio::test]
async fn a_simple_query_refused_for_its_bound_value_rule_names_what_the_rewrite_read() {
    let f = fixture();
    let org = unique("evbindless");
    let dev = f.as_actor(&org, Environment::Development, "admin", ActorType::User, "a-1").await;
    let err = dev.simple_query("SELECT set_config($1, 'x', false) FROM entities").await.unwrap_err();
    assert!(err.as_db_error().is_some_and(|e| e.message().contains("only in a prepared statement")), "{err:?}");
    let row =
        the_refused_event(&f.admin().await, &org, "array_to_string(kinds, ','), array_to_string(tables, ',')").await;
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("SelectStmt".into(), "entities".into()));
}

#[tokio::test]
async fn a_refusals_reason_holds_no_value_the_parsers_quote() {
    let f = fixture();
    let org = unique("evquoted");
    let dev = f.as_actor(&org, Environment::Development, "admin", ActorType::User, "a-2").await;
    // The client is told the token PostgreSQL stopped at; the audit event is not.
    let err = dev.simple_query("SELECT 'x' 'EVENT-VALUE-4711'").await.unwrap_err();
    assert!(err.as_db_error().is_some_and(|e| e.message().contains("EVENT-VALUE-4711")), "{err:?}");
    let row = the_refused_event(&f.admin().await, &org, "sqlstate, reason").await;
    let (code, reason): (String, String) = (row.get(0), row.get(1));
    assert_eq!(code, "42601");
    assert!(reason.ends_with(r#"syntax error at or near "?""#), "{reason}");
}

/// `columns` of the one refused event of `org`, once it is stored.
async fn the_refused_event(admin: &Client, org: &str, columns: &str) -> tokio_postgres::Row {
    let refused = "FROM struere.events WHERE organization_id = $1 AND verdict = 'refused'";
    assert_eq!(wait_for(admin, &format!("SELECT count(*) {refused}"), org, 1).await, 1);
    admin.query_one(&format!("SELECT {columns} {refused}"), &[&org]).await.unwrap()
}
