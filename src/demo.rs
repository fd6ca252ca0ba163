//! `struere-proxy demo`: a throwaway PostgreSQL, the proxy schema, keys, TLS, and ready-to-paste
//! psql commands; everything is removed on Ctrl-C.
//!
//! Built in steps (`Demo::start`, then printing, then serving) so that later features (the demo
//! domain, policies, the admin dashboard) can add their own steps.

use crate::app::{AppResult, wait_for_signal};
use crate::auth::identity::{ActorContext, ActorType, Environment};
use crate::auth::store::{self, KeySpec};
use crate::cluster::TempCluster;
use crate::config::{RawConfig, Settings, TlsMode};
use crate::server::RunningProxy;

/// The least-privilege role client traffic of environment keys runs as.
pub const APP_ROLE: &str = "struere_app";
pub const APP_DATABASE: &str = "app";

/// The demo domain's tables (owned by the owner role; client traffic gets DML only).
pub const DEMO_SCHEMA: &str = include_str!("../policies/schema.sql");
/// Two organizations × two environments of demo rows.
pub const DEMO_SEED: &str = include_str!("../policies/seed.sql");

/// Defence in depth under the proxy's own function allowlist: the least-privilege role cannot
/// call what could reach other sessions even if a call slipped through.
pub const HARDENING_SQL: &str = "\
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_terminate_backend(integer, bigint) FROM PUBLIC; \
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_cancel_backend(integer) FROM PUBLIC; \
REVOKE EXECUTE ON FUNCTION pg_catalog.query_to_xml(text, boolean, boolean, text) FROM PUBLIC; \
REVOKE EXECUTE ON FUNCTION pg_catalog.query_to_xmlschema(text, boolean, boolean, text) FROM PUBLIC; \
REVOKE EXECUTE ON FUNCTION pg_catalog.query_to_xml_and_xmlschema(text, boolean, boolean, text) FROM PUBLIC;";

/// A running demo: keep it alive to keep everything up; drop it to remove everything.
pub struct Demo {
    pub proxy: RunningProxy,
    pub dev_key: String,
    pub prod_key: String,
    pub operator_key: String,
    // Field order matters: the proxy stops before the cluster it talks to.
    _tls_dir: tempfile::TempDir,
    pub cluster: TempCluster,
}

fn random_password() -> AppResult<String> {
    let mut b = [0u8; 18];
    getrandom::fill(&mut b).map_err(|e| e.to_string())?;
    Ok(hex::encode(b))
}

/// Prepare a fresh cluster the way a platform team would: an owner (the superuser here), a
/// least-privilege login role for client traffic, and the application database.
pub fn provision(cluster: &TempCluster) -> AppResult<String> {
    let app_password = random_password()?;
    cluster.psql(
        "postgres",
        &format!(
            "CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{app_password}' NOSUPERUSER NOCREATEDB NOCREATEROLE; \
             CREATE DATABASE {APP_DATABASE};"
        ),
    )?;
    cluster.psql(APP_DATABASE, DEMO_SCHEMA)?;
    cluster.psql(APP_DATABASE, DEMO_SEED)?;
    cluster.psql(APP_DATABASE, HARDENING_SQL)?;
    cluster.psql(
        APP_DATABASE,
        &format!(
            "GRANT USAGE, CREATE ON SCHEMA public TO {APP_ROLE}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {APP_ROLE};"
        ),
    )?;
    Ok(app_password)
}

impl Demo {
    pub async fn start(overrides: RawConfig) -> AppResult<Demo> {
        let cluster = tokio::task::spawn_blocking(TempCluster::start).await??;
        let app_password = provision(&cluster)?;
        let tls_dir = tempfile::tempdir()?;
        let (cert, key) = crate::net::tls::write_self_signed(tls_dir.path())?;
        let admin_url = cluster.admin_url(APP_DATABASE);
        let base = RawConfig {
            upstream: Some(cluster.url(APP_ROLE, &app_password, APP_DATABASE)),
            admin_upstream: Some(admin_url.clone()),
            database: Some(APP_DATABASE.to_owned()),
            tls_mode: Some(TlsMode::Optional),
            tls_cert: Some(cert),
            tls_key: Some(key),
            operator_keys: Some(true),
            ..RawConfig::default()
        };
        let settings = Settings::from_raw(base.overlay(overrides))?;

        let admin = store::connect_admin(&admin_url).await?;
        store::init_schema(&admin).await?;
        let mk = |env: Environment, id: &str| KeySpec {
            name: format!("demo-{}", env.as_str()),
            actor: Some(ActorContext {
                organization: "acme".to_owned(),
                environment: env,
                roles: vec!["admin".to_owned()],
                actor_type: ActorType::User,
                actor_id: id.to_owned(),
            }),
            expires_in: None,
        };
        let dev_key = store::create_key(&admin, &mk(Environment::Development, "demo-dev")).await?.secret;
        let prod_key = store::create_key(&admin, &mk(Environment::Production, "demo-prod")).await?.secret;
        let operator_key =
            store::create_key(&admin, &KeySpec { name: "demo-operator".into(), actor: None, expires_in: None })
                .await?
                .secret;

        let proxy = match RunningProxy::start(settings.clone()).await {
            Ok(p) => p,
            // The default port is taken (another proxy, a real PgBouncer): any free port will do.
            Err(_) => RunningProxy::start(Settings { listen: "127.0.0.1:0".to_owned(), ..settings }).await?,
        };
        Ok(Demo { proxy, dev_key, prod_key, operator_key, _tls_dir: tls_dir, cluster })
    }

    /// The lines a newcomer pastes. One `NAME value` per line, so scripts can grep them.
    pub fn banner(&self) -> String {
        let addr = self.proxy.addr;
        let url = |user: &str, key: &str| format!("postgres://{user}:{key}@{addr}/{APP_DATABASE}?sslmode=require");
        let psql = self.cluster.bin_dir().join("psql");
        let psql = psql.display();
        [
            "struere-proxy demo: a throwaway PostgreSQL behind the proxy; Ctrl-C removes everything.".to_owned(),
            format!("PROXY      {addr}"),
            // The throwaway cluster's owner URL, for comparisons against direct PostgreSQL.
            format!("UPSTREAM   {}", self.cluster.admin_url(APP_DATABASE)),
            format!("DEV_KEY    {}", self.dev_key),
            format!("PROD_KEY   {}", self.prod_key),
            format!("OPERATOR   {}", self.operator_key),
            format!("DEV        {psql} \"{}\"", url("dev", &self.dev_key)),
            format!("PROD       {psql} \"{}\"", url("prod", &self.prod_key)),
            format!("OPS        {psql} \"{}\"", url("ops", &self.operator_key)),
        ]
        .join("\n")
    }
}

pub async fn run(overrides: RawConfig) -> AppResult<()> {
    let demo = Demo::start(overrides).await?;
    println!("{}", demo.banner());
    wait_for_signal().await;
    eprintln!("stopping: removing the throwaway cluster");
    let Demo { proxy, cluster, .. } = demo;
    proxy.stop().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
