//! The demo domain's catalog without a server: one definition for unit tests, the criterion
//! benches and the fuzz targets, so they all rewrite against the same tables, types, foreign
//! keys and leakproof operators.

use super::{CatalogSnapshot, Function, Relation};

fn table(name: &str, cols: &[(&str, &str)]) -> Relation {
    Relation::plain_table("public", name, cols)
}

/// The demo schema (`policies/schema.sql`) as `load` would read it from a server, with the
/// functions and operators the tests need: for unit tests, benches and fuzz targets.
pub fn snapshot() -> CatalogSnapshot {
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
        if r.name == "threads" {
            r.foreign_keys.push(crate::catalog::ForeignKey {
                columns: vec!["agent_id".into()],
                ref_schema: "public".into(),
                ref_table: "agents".into(),
                ref_columns: vec!["id".into()],
            });
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
    let mut prepared = table("pg_prepared_statements", &[("name", "text"), ("statement", "text")]);
    prepared.schema = "pg_catalog".into();
    c.relations.insert(("pg_catalog".into(), "pg_prepared_statements".into()), prepared);
    for (name, vol) in [
        ("lower", 'i'),
        ("count", 'i'),
        ("now", 's'),
        ("pg_sleep", 'v'),
        ("setval", 'v'),
        ("pg_get_serial_sequence", 's'),
        ("jsonb_build_object", 's'),
        ("to_jsonb", 's'),
        ("jsonb_set", 'i'),
        ("nextval", 'v'),
        ("currval", 'v'),
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
