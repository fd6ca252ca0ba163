//! The catalog as the proxy reads it from a real server, checked against the shipped policies.

use std::path::Path;

use struere_proxy::catalog::{self, RelKind};

use crate::harness::fixture;

#[tokio::test]
async fn shipped_policies_match_the_demo_schema() {
    let f = fixture();
    let admin = f.admin().await;
    let cat = catalog::load(&admin).await.unwrap();
    let entities = cat.relation("public", "entities").expect("entities exists");
    assert_eq!(entities.kind, RelKind::Table);
    assert_eq!(entities.primary_key, ["id"]);
    let data = entities.column("data").unwrap();
    assert_eq!(data.type_name, "jsonb");
    assert!(entities.column("organization_id").unwrap().not_null);
    let policies = struere_proxy::policy::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap();
    catalog::check_policy(&cat, &policies.development.tables).unwrap();
    // int4eq is leakproof in every PostgreSQL; textlike is not.
    assert!(cat.function_is_leakproof("int4eq"));
    assert!(!cat.function_is_leakproof("textlike"));
    // int4 = int4 and text = text are leakproof; text ~ text (regex) is not.
    assert!(cat.operator_is_leakproof("=", 23, 23));
    assert!(cat.operator_is_leakproof("=", 25, 25));
    assert!(!cat.operator_is_leakproof("~", 25, 25));
    // The proxy schema is visible to the owner's catalog read.
    assert!(cat.relation("struere", "api_keys").is_some());
}

#[tokio::test]
async fn ddl_by_an_operator_refreshes_the_catalog() {
    let f = fixture();
    let op = f.operator().await;
    // A new column on a managed table becomes visible through the secure relation once the
    // proxy has re-read the catalog (it does so right after DDL it forwards).
    op.batch_execute("ALTER TABLE trigger_runs ADD COLUMN IF NOT EXISTS note text DEFAULT 'fresh'").await.unwrap();
    let dev = f.dev().await;
    let mut seen = None;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if let Ok(rows) = dev.query("SELECT note FROM trigger_runs", &[]).await {
            seen = rows.first().map(|r| r.get::<_, String>(0));
            break;
        }
    }
    assert_eq!(seen.as_deref(), Some("fresh"));
}
