//! Table-driven tests of the engine: SQL in → rewritten SQL or refusal, over the shipped
//! policies and a catalog of the demo schema.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use super::PolicyEngine;
use crate::auth::identity::{ActorContext, ActorType, Environment};
use crate::catalog::{CatalogSnapshot, Function, Relation};
use crate::rewrite::{Refusal, Rewriter};

fn table(name: &str, cols: &[(&str, &str)]) -> Relation {
    Relation::plain_table("public", name, cols)
}

pub(crate) fn demo_catalog() -> CatalogSnapshot {
    let mut c = CatalogSnapshot::default();
    let env = [("id", "text"), ("organization_id", "text"), ("environment", "text")];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        env.iter().copied().chain(extra.iter().copied()).collect()
    };
    let rels = vec![
        table("organizations", &[("id", "text"), ("name", "text")]),
        table(
            "users",
            &[("id", "text"), ("organization_id", "text"), ("email", "text"), ("name", "text"), ("phone", "text")],
        ),
        table(
            "agents",
            &[("id", "text"), ("organization_id", "text"), ("slug", "text"), ("name", "text"), ("description", "text")],
        ),
        table(
            "tool_permissions",
            &[
                ("id", "text"),
                ("organization_id", "text"),
                ("agent_id", "text"),
                ("tool", "text"),
                ("allowed", "boolean"),
            ],
        ),
        table("entity_types", &with(&[("slug", "text"), ("schema", "jsonb")])),
        table(
            "entities",
            &with(&[
                ("entity_type", "text"),
                ("data", "jsonb"),
                ("created_at", "timestamp with time zone"),
                ("updated_at", "timestamp with time zone"),
            ]),
        ),
        table("entity_relations", &with(&[("from_id", "text"), ("to_id", "text"), ("relation_type", "text")])),
        table(
            "agent_configs",
            &with(&[("agent_id", "text"), ("system_prompt", "text"), ("model", "text"), ("tools", "jsonb")]),
        ),
        table(
            "threads",
            &with(&[("agent_id", "text"), ("user_id", "text"), ("created_at", "timestamp with time zone")]),
        ),
        table(
            "messages",
            &with(&[
                ("thread_id", "text"),
                ("role", "text"),
                ("content", "text"),
                ("created_at", "timestamp with time zone"),
            ]),
        ),
        table(
            "trigger_runs",
            &with(&[("trigger", "text"), ("status", "text"), ("started_at", "timestamp with time zone")]),
        ),
    ];
    for mut r in rels {
        for col in &mut r.columns {
            col.type_oid = type_oid(&col.type_name);
        }
        c.relations.insert((r.schema.clone(), r.name.clone()), r);
    }
    // Comparison operators as PostgreSQL 15 marks them: leakproof for text, timestamptz and
    // boolean, not for jsonb.
    for (ty, leakproof) in [(25, true), (1184, true), (16, true), (3802, false)] {
        for op in ["=", "<>", "<", "<=", ">", ">="] {
            c.operators.insert((op.into(), ty, ty), leakproof);
        }
    }
    let mut pg_class = table("pg_class", &[("oid", "oid"), ("relname", "name")]);
    pg_class.schema = "pg_catalog".into();
    c.relations.insert(("pg_catalog".into(), "pg_class".into()), pg_class);
    for (name, vol) in [
        ("lower", 'i'),
        ("count", 'i'),
        ("now", 's'),
        ("pg_sleep", 'v'),
        ("jsonb_build_object", 's'),
        ("to_jsonb", 's'),
        ("nextval", 'v'),
    ] {
        c.functions.insert(
            name.into(),
            vec![Function { schema: "pg_catalog".into(), name: name.into(), leakproof: false, volatility: vol }],
        );
    }
    c
}

fn type_oid(name: &str) -> u32 {
    match name {
        "boolean" => 16,
        "text" => 25,
        "jsonb" => 3802,
        "timestamp with time zone" => 1184,
        _ => 0,
    }
}

pub(crate) fn engine() -> Arc<PolicyEngine> {
    let policies = crate::policy::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap();
    Arc::new(PolicyEngine { policies, catalog: Arc::new(demo_catalog()), allow_functions: BTreeSet::new() })
}

pub(super) fn actor(env: Environment, roles: &[&str], id: &str) -> ActorContext {
    ActorContext {
        organization: "acme".into(),
        environment: env,
        roles: roles.iter().map(|r| r.to_string()).collect(),
        actor_type: ActorType::User,
        actor_id: id.into(),
    }
}

pub(super) fn run(a: &ActorContext, sql: &str) -> Result<String, Refusal> {
    Rewriter::new(0, engine()).rewrite(sql, a).map(|r| r.sql.clone())
}

pub(super) fn admin_dev() -> ActorContext {
    actor(Environment::Development, &["admin"], "u-admin")
}

#[test]
fn every_secure_relation_parses_and_verifies() {
    let e = engine();
    for env in [Environment::Development, Environment::Production] {
        for role in ["admin", "teacher", "guardian", "agent"] {
            let a = actor(env, &[role], "x'; DROP TABLE y; --");
            let ctx = super::secure::Ctx::new(&a, e.policies.for_env(env), &e.catalog);
            for (name, spec) in &e.policies.development.tables.by_name {
                let Ok(sql) = ctx.relation_sql(spec, crate::policy::Action::Select) else { continue };
                super::walk::parse_query(&sql).unwrap_or_else(|err| panic!("{role} {name}: {err}\n{sql}"));
                // Through the whole pipeline too: printed, verified, the actor id one literal.
                let out =
                    run(&a, &format!("SELECT * FROM {name}")).unwrap_or_else(|err| panic!("{role} {name}: {err}"));
                assert!(!out.contains("DROP TABLE y; --'") || out.contains("'x''; DROP TABLE y; --'"), "{out}");
            }
        }
    }
}

#[test]
fn managed_reads_become_secure_relations() {
    let out = run(&admin_dev(), "SELECT id FROM threads WHERE lower(id) = 't1'").unwrap();
    assert!(out.contains("FROM \"public\".\"threads\" AS \"__struere_"), "{out}");
    assert!(out.contains("\".\"environment\" = 'development'"), "{out}");
    assert!(out.contains("\".\"organization_id\" = 'acme'"), "{out}");
    assert!(out.contains("OFFSET 0) AS \"threads\""), "{out}");
    assert!(out.ends_with("WHERE lower(id) = 't1'"), "{out}");
    // A condition PostgreSQL may use as an index condition: the guarded form (guard_tests.rs).
    let out = run(&admin_dev(), "SELECT id FROM threads WHERE id = 't1'").unwrap();
    assert!(out.contains(") AS \"threads\" WHERE \"threads\".\"__struere_raw_id\" = 't1'"), "{out}");
    assert!(!out.contains("OFFSET 0"), "{out}");
    let prod = run(&actor(Environment::Production, &["admin"], "u"), "SELECT * FROM threads").unwrap();
    assert!(prod.contains("= 'production'"), "{prod}");
}

#[test]
fn shared_tables_get_no_environment_filter() {
    let out = run(&admin_dev(), "SELECT name FROM organizations").unwrap();
    assert!(out.contains("\"__struere_1\".\"id\" = 'acme'"), "{out}");
    assert!(!out.contains("'development'"), "{out}");
}

#[test]
fn scope_rules_and_masks() {
    let teacher = actor(Environment::Development, &["teacher"], "t-1");
    let out = run(&teacher, "SELECT data FROM entities").unwrap();
    assert!(out.contains("\"entity_type\" = 'session'"), "{out}");
    assert!(out.contains("#>> ARRAY['teacherId']) = 't-1'"), "{out}");
    // data is rebuilt from the allowed keys only.
    assert!(out.contains("jsonb_each"), "{out}");
    assert!(out.contains("'studentId'") && !out.contains("'paymentAmount'"), "{out}");
    let guardian = actor(Environment::Development, &["guardian"], "g-1");
    let out = run(&guardian, "SELECT * FROM entities e WHERE e.entity_type = 'session'").unwrap();
    assert!(out.contains("'guardian_of'") && out.contains("\"from_id\" = 'g-1'"), "{out}");
    let agent = actor(Environment::Development, &["agent"], "a-1");
    let out = run(&agent, "SELECT email FROM users").unwrap();
    assert!(out.contains("repeat('*'"), "{out}");
}

#[test]
fn refusals_name_the_construct() {
    let teacher = actor(Environment::Development, &["teacher"], "t-1");
    let e = run(&teacher, "SELECT * FROM threads").unwrap_err();
    assert_eq!(e.to_string(), "refused: role \"teacher\" may not select threads");
    let e = run(&teacher, "UPDATE entities SET data = '{}'").unwrap_err();
    assert!(e.to_string().contains("managed table entities"), "{e}");
    let e = run(&admin_dev(), "SELECT * FROM struere.api_keys").unwrap_err();
    assert!(e.to_string().contains("proxy's own schema"), "{e}");
    let e = run(&admin_dev(), "SELECT * FROM pg_catalog.pg_stat_user_tables").unwrap_err();
    assert!(e.to_string().contains("pg_stat_user_tables"), "{e}");
    let e = run(&admin_dev(), "SELECT * FROM pg_stats").unwrap_err();
    assert!(e.to_string().contains("pg_stats"), "{e}");
    let e = run(&admin_dev(), "SELECT pg_sleep(1)").unwrap_err();
    assert!(e.to_string().contains("pg_sleep"), "{e}");
    let e = run(&admin_dev(), "EXPLAIN ANALYZE SELECT * FROM threads").unwrap_err();
    assert!(e.to_string().contains("EXPLAIN ANALYZE"), "{e}");
    let e = run(&admin_dev(), "SELECT 1 AS __struere_x").unwrap_err();
    assert!(e.to_string().contains("reserved"), "{e}");
    let e = run(&admin_dev(), "ALTER TABLE entities ADD COLUMN x int").unwrap_err();
    assert!(e.to_string().contains("DDL on them is never allowed"), "{e}");
    let e = run(&actor(Environment::Production, &["admin"], "u"), "CREATE TABLE scratch (a int)").unwrap_err();
    assert!(e.to_string().contains("production"), "{e}");
    let e = run(&admin_dev(), "CREATE TABLE copy_of AS SELECT * FROM entities").unwrap_err();
    assert!(e.to_string().contains("may not read managed tables"), "{e}");
    let e = run(&admin_dev(), "INSERT INTO scratch SELECT id FROM threads").unwrap_err();
    assert!(e.to_string().contains("may not read managed tables"), "{e}");
    let e = run(&admin_dev(), "SET work_mem_x = 1").unwrap_err();
    assert!(e.to_string().contains("work_mem_x"), "{e}");
    let e = run(&admin_dev(), "COPY threads FROM STDIN").unwrap_err();
    assert!(e.to_string().contains("managed table threads"), "{e}");
    for sql in [
        "WITH x AS (INSERT INTO entities (id) VALUES ('x') RETURNING *) SELECT * FROM x",
        "WITH x AS (DELETE FROM scratch RETURNING *) SELECT * FROM x",
        "WITH x AS (UPDATE entities SET data = '{}' RETURNING *) SELECT 1",
        "SELECT * INTO stolen FROM entities",
    ] {
        let e = run(&admin_dev(), sql).unwrap_err();
        assert!(e.to_string().contains("not supported yet") || e.to_string().contains("INTO"), "{sql}: {e}");
    }
    // Found by red-teaming: syntax sqlparser represents differently is caught on PostgreSQL's tree.
    for sql in [
        "SELECT * FROM (TABLE entities) t",
        "WITH x AS MATERIALIZED (TABLE public.entities) SELECT count(*) FROM x",
        "SELECT x FROM LATERAL query_to_xml('select 1', true, true, '') x",
        "SELECT * FROM (SELECT 1) a, LATERAL pg_notify('tabc_alerts', 'x') n",
        "SELECT * FROM (SELECT 1) a, LATERAL pg_terminate_backend(1) t",
        "CREATE TABLE pg_temp.entities (x int)",
    ] {
        assert!(run(&admin_dev(), sql).is_err(), "{sql}");
    }
    for sql in ["PREPARE TRANSACTION 'g1'", "COMMIT PREPARED 'g1'", "ROLLBACK PREPARED 'g1'"] {
        let e = run(&admin_dev(), sql).unwrap_err();
        assert!(e.to_string().contains("two-phase commit"), "{sql}: {e}");
    }
    let e = run(&actor(Environment::Development, &["teacher"], "t"), "SELECT * FROM scratch").unwrap_err();
    assert!(e.to_string().contains("not managed by the policy"), "{e}");
}

#[test]
fn cte_names_resolve_in_their_scope() {
    // A CTE named like a managed table would shadow it where PostgreSQL says it does; the
    // output check cannot tell the two apart, so such CTEs are refused.
    let e = run(&admin_dev(), "WITH threads AS (SELECT 1 AS id) SELECT id FROM threads").unwrap_err();
    assert!(e.to_string().contains("outside its secure relation"), "{e}");
    let out = run(&admin_dev(), "WITH t AS (SELECT 1 AS id) SELECT id FROM t").unwrap();
    assert!(!out.contains("__struere"), "the CTE is not a table: {out}");
    // Non-recursive: a CTE body cannot see a later sibling, so `b` here is the real table name b…
    let out = run(&admin_dev(), "WITH a AS (SELECT * FROM threads), threads AS (SELECT 1) SELECT * FROM a").unwrap();
    assert!(out.contains("\"public\".\"threads\""), "the first CTE reads the real table: {out}");
    let out = run(
        &admin_dev(),
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
    )
    .unwrap();
    assert!(!out.contains("__struere"), "{out}");
}

#[test]
fn subqueries_unions_and_copy_are_secured() {
    for sql in [
        "SELECT (SELECT count(*) FROM threads)",
        "SELECT 1 WHERE EXISTS (SELECT 1 FROM threads t WHERE t.id = 'x')",
        "SELECT id FROM threads UNION SELECT id FROM messages",
        "SELECT * FROM (SELECT * FROM threads) AS s",
        "SELECT * FROM users u JOIN threads t ON t.user_id = u.id",
    ] {
        let out = run(&admin_dev(), sql).unwrap();
        assert!(out.contains("FROM \"public\".\"threads\" AS \"__struere_"), "{sql} → {out}");
        assert!(!out.contains("FROM threads"), "{sql} → {out}");
    }
    let out = run(&admin_dev(), "COPY threads TO STDOUT").unwrap();
    assert!(out.starts_with("COPY (SELECT * FROM (SELECT"), "{out}");
}

#[test]
fn unmanaged_tables_for_granted_development_roles() {
    for sql in [
        "CREATE TABLE scratch (a int)",
        "INSERT INTO scratch VALUES (1)",
        "SELECT * FROM scratch JOIN threads ON true",
        "DROP TABLE scratch",
        "SELECT * FROM pg_class",
        "SET application_name = 'x'",
        "BEGIN",
        "SHOW TimeZone",
    ] {
        run(&admin_dev(), sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}
