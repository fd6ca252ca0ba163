//! The allowlist walk and its printing, through the whole pipeline with the shipped policies
//! (the demo catalog: `entities`, `threads`, … are managed tables).

use crate::auth::identity::{ActorContext, ActorType, Environment};
use crate::rewrite::engine::tests::engine;
use crate::rewrite::{Refusal, Rewriter};

fn actor(env: Environment, role: &str) -> ActorContext {
    ActorContext {
        organization: "acme".into(),
        environment: env,
        roles: vec![role.to_owned()],
        actor_type: ActorType::User,
        actor_id: "u-1".into(),
    }
}

fn dev(sql: &str) -> Result<String, Refusal> {
    Rewriter::new(0, engine()).rewrite(sql, &actor(Environment::Development, "admin")).map(|r| r.sql.clone())
}

#[test]
fn probe() {
    for sql in [
        "ALTER SEQUENCE s RESTART WITH 1",
        "ALTER SEQUENCE IF EXISTS s AS bigint",
        "ALTER SEQUENCE s OWNED BY t.id",
        "ALTER TABLE t ALTER COLUMN c DROP IDENTITY IF EXISTS",
        "ALTER TABLE t ALTER COLUMN c SET STATISTICS 100",
        "ALTER TABLE t ALTER COLUMN c TYPE varchar(10) COLLATE \"C\"",
        "ALTER TABLE \"t\" ALTER COLUMN \"c\" TYPE varchar(10) COLLATE \"C\" USING \"c\"::varchar(10)",
        "ALTER TABLE t ADD COLUMN d text COLLATE \"C\" NOT NULL DEFAULT 'x', ALTER COLUMN c TYPE text COLLATE \"C\"",
        "CREATE INDEX i ON t (c) TABLESPACE pg_default",
        "CREATE INDEX \"i\" ON \"t\" (\"c\" text_pattern_ops) INCLUDE (\"d\") TABLESPACE \"pg_default\"",
        "CREATE TABLE t2 (a int, CONSTRAINT u UNIQUE (a) USING INDEX TABLESPACE pg_default)",
        "DROP INDEX CONCURRENTLY IF EXISTS i",
        "COMMENT ON CONSTRAINT c ON t IS 'x\\y'",
        "CREATE TABLE t3 (a int, b int, FOREIGN KEY (a, b) REFERENCES t4 (a, b) ON DELETE SET NULL (b))",
        "ALTER SEQUENCE backends_person_id_seq RENAME TO pers_seq",
    ] {
        eprintln!("{sql}\n  => {:?}", dev(sql));
    }
}
