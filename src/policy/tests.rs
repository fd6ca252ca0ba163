use std::path::Path;
use std::sync::Arc;

use super::compile::{compile_policy_file, compile_tables};
use super::*;

const TABLES: &str = r#"
[tables.entities]
scope = "environment"
type_column = "entity_type"

[tables.entity_relations]
scope = "environment"

[tables.organizations]
scope = "shared"
organization_column = "id"

[tables.countries]
scope = "shared"
organization_column = false
"#;

fn tables() -> Arc<Tables> {
    Arc::new(compile_tables(Path::new("tables.toml"), TABLES).unwrap())
}

fn roles(env: Environment, text: &str) -> Result<std::collections::BTreeMap<String, Role>, PolicyErrors> {
    compile_policy_file(Path::new("p.toml"), text, env, &tables())
}

#[test]
fn tables_get_defaults() {
    let t = tables();
    let e = &t.by_name["entities"];
    assert_eq!(e.scope, TableScope::Environment);
    assert_eq!(e.organization_column.as_deref(), Some("organization_id"));
    assert_eq!(e.environment_column.as_deref(), Some("environment"));
    assert_eq!(e.type_column.as_deref(), Some("entity_type"));
    assert_eq!(e.id_column, "id");
    assert_eq!(e.schema, "public");
    assert_eq!(t.by_name["organizations"].organization_column.as_deref(), Some("id"));
    assert_eq!(t.by_name["countries"].organization_column, None);
    assert!(t.table("public", "entities").is_some());
    assert!(t.table("other", "entities").is_none());
}

#[test]
fn table_errors_have_lines() {
    let text = "[tables.a]\nscope = \"environment\"\norganization_column = false\n\n[tables.b]\nscope = \"global\"\n";
    let e = compile_tables(Path::new("tables.toml"), text).unwrap_err();
    let lines: Vec<usize> = e.0.iter().map(|e| e.line).collect();
    assert_eq!(lines, [3, 6], "{e}");
    assert!(e.to_string().contains("tables.toml:6: unknown scope \"global\""), "{e}");
    let e = compile_tables(Path::new("t.toml"), "[tables.a]\nscope = \"shared\"\nenvironment_column = \"env\"\n")
        .unwrap_err();
    assert!(e.to_string().contains("t.toml:3: a shared table has no environment column"), "{e}");
    let e = compile_tables(Path::new("t.toml"), "[tables.a]\nscope = \"shared\"\ncolour = 1\n").unwrap_err();
    assert!(e.to_string().contains("t.toml:3"), "{e}");
}

#[test]
fn a_complete_role_compiles() {
    let r = roles(
        Environment::Development,
        r#"
[roles.guardian]
unmanaged_tables = true

[[roles.guardian.resources]]
resource = "entities:student"
allow = ["select", "update"]
deny = ["delete"]
fields = ["id", "data.name", { field = "data.phone", mode = "partial", keep = 4 }, { field = "data.ssn", mode = "hash" }]
scope = [
  { field = "id", via = { table = "entity_relations", column = "to_id", actor_column = "from_id", filter = { relation_type = "guardian_of" } } },
  { field = "data.teacherId", op = "eq", value = "actor.id" },
  { field = "data.status", op = "in", literal = ["open", "closed"] },
]

[[roles.guardian.resources]]
resource = "entities:session"
allow = ["*"]
fields = ["*"]
scope = [{ field = "data.studentId", in_scope_of = "entities:student" }]
"#,
    )
    .unwrap();
    let g = &r["guardian"];
    assert!(g.unmanaged_tables);
    let student = &g.grants[0];
    assert_eq!(student.resource, Some(ResourceId { table: "entities".into(), kind: Some("student".into()) }));
    assert_eq!(student.allow, [Action::Select, Action::Update]);
    assert_eq!(student.deny, [Action::Delete]);
    assert_eq!(student.fields.visible.len(), 2);
    assert_eq!(student.fields.masked[0].1, MaskMode::Partial(4));
    assert_eq!(student.fields.masked[1].1, MaskMode::Hash);
    assert_eq!(student.scope.len(), 3);
    let ScopeRule::Via { link, .. } = &student.scope[0] else { panic!() };
    assert_eq!(link.filter, [("relation_type".to_owned(), Literal::Text("guardian_of".into()))]);
    let session = &g.grants[1];
    assert_eq!(session.allow, Action::ALL);
    assert!(session.fields.all);
    let ScopeRule::InScopeOf { target, .. } = &session.scope[0] else { panic!() };
    assert_eq!(target, &FieldRef { column: "id".into(), path: vec![] });
}

#[test]
fn role_errors_are_all_reported_with_lines() {
    let text = r#"[roles.x]
unmanaged_tables = true

[[roles.x.resources]]
resource = "nope"

[[roles.x.resources]]
resource = "organizations:kind"

[[roles.x.resources]]
resource = "entities"
allow = ["select", "drop"]
fields = [{ field = "data.x", mode = "blur" }]
scope = [
  { field = "a", op = "eq", value = "actor.email" },
  { field = "a", op = "in", literal = "x" },
  { field = "a" },
]
"#;
    let e = roles(Environment::Production, text).unwrap_err();
    let rendered = e.to_string();
    let lines: Vec<usize> = e.0.iter().map(|e| e.line).collect();
    assert_eq!(lines, [2, 5, 8, 12, 13, 15, 16, 17], "{rendered}");
    assert!(rendered.contains("p.toml:2: unmanaged_tables is only allowed in development"));
    assert!(rendered.contains("unknown table \"nope\""));
    assert!(rendered.contains("has no type_column"));
    assert!(rendered.contains("unknown action \"drop\""));
    assert!(rendered.contains("unknown mask mode \"blur\""));
    assert!(rendered.contains("unknown value \"actor.email\""));
    assert!(rendered.contains("needs literal = ["));
    assert!(rendered.contains("needs exactly one of op"));
}

#[test]
fn in_scope_cycles_are_refused() {
    let text = r#"
[[roles.a.resources]]
resource = "entities:x"
allow = ["select"]
scope = [{ field = "data.y", in_scope_of = "entities:y" }]

[[roles.b.resources]]
resource = "entities:y"
allow = ["select"]
scope = [{ field = "data.x", in_scope_of = "entities:x" }]
"#;
    let e = roles(Environment::Development, text).unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    let star = "[[roles.a.resources]]\nresource = \"*\"\nallow = [\"select\"]\nscope = [{ field = \"x\", in_scope_of = \"entities:y\" }]\n";
    assert!(roles(Environment::Development, star).is_err());
}

#[test]
fn the_shipped_policies_compile() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let p = load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(p.development.roles["admin"].unmanaged_tables);
    assert!(!p.production.roles["admin"].unmanaged_tables);
    for role in ["admin", "teacher", "guardian", "agent"] {
        assert!(p.production.roles.contains_key(role), "{role}");
    }
    assert_ne!(p.development.version, p.production.version);
    assert_eq!(p.for_env(Environment::Production).environment, Environment::Production);
}
