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

/// One demo key: an actor of the demo domain.
#[derive(Debug, Clone)]
pub struct DemoKey {
    pub environment: Environment,
    pub organization: String,
    pub role: String,
    pub actor_type: ActorType,
    pub actor_id: String,
    pub secret: String,
}

/// The demo organizations (seed.sql).
pub const DEMO_ORGANIZATIONS: &[&str] = &["acme", "globex"];

/// Who holds each demo role: seeded `users` rows for teachers and guardians, `agents` rows for
/// agents; administrators (and any other role a policy set adds) are system actors.
fn demo_actor(org: &str, role: &str) -> (ActorType, String) {
    match role {
        "teacher" => (ActorType::User, format!("{org}-teacher-1")),
        "guardian" => (ActorType::User, format!("{org}-guardian-1")),
        "agent" => (ActorType::Agent, format!("{org}-agent-1")),
        other => (ActorType::System, format!("{org}-{other}")),
    }
}

/// A running demo: keep it alive to keep everything up; drop it to remove everything.
pub struct Demo {
    pub proxy: RunningProxy,
    /// acme's development and production administrators (what tests and benches use).
    pub dev_key: String,
    pub prod_key: String,
    pub operator_key: String,
    /// One key per role × organization × environment.
    pub keys: Vec<DemoKey>,
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

        let mut admin = store::connect_admin(&admin_url).await?;
        store::init_schema(&admin).await?;
        // The policies go through the same lifecycle a user's do: synced to development, then
        // promoted to production.
        let (bundle, label) = match &settings.policies {
            Some(dir) => (crate::policy::Bundle::from_dir(dir)?, dir.clone()),
            None => (crate::policy::Bundle::shipped(), std::path::PathBuf::from("policies")),
        };
        crate::lifecycle::sync_development(&mut admin, &bundle, &label).await?;
        crate::lifecycle::deploy(&mut admin).await?;
        let policies = bundle.compile(&label)?;
        let mut keys = Vec::new();
        for env in [Environment::Development, Environment::Production] {
            for org in DEMO_ORGANIZATIONS {
                for role in policies.for_env(env).roles.keys() {
                    let (actor_type, actor_id) = demo_actor(org, role);
                    let spec = KeySpec {
                        name: format!("demo-{}-{org}-{role}", env.as_str()),
                        actor: Some(ActorContext {
                            organization: (*org).to_owned(),
                            environment: env,
                            roles: vec![role.clone()],
                            actor_type,
                            actor_id: actor_id.clone(),
                        }),
                        expires_in: None,
                    };
                    let secret = store::create_key(&admin, &spec).await?.secret;
                    keys.push(DemoKey {
                        environment: env,
                        organization: (*org).to_owned(),
                        role: role.clone(),
                        actor_type,
                        actor_id,
                        secret,
                    });
                }
            }
        }
        let admin_of = |env: Environment| {
            keys.iter()
                .find(|k| k.environment == env && k.organization == "acme" && k.role == "admin")
                .map(|k| k.secret.clone())
                .ok_or_else(|| format!("the {} policy set has no admin role for the demo", env.as_str()))
        };
        let dev_key = admin_of(Environment::Development)?;
        let prod_key = admin_of(Environment::Production)?;
        let operator_key =
            store::create_key(&admin, &KeySpec { name: "demo-operator".into(), actor: None, expires_in: None })
                .await?
                .secret;

        let proxy = match RunningProxy::start(settings.clone()).await {
            Ok(p) => p,
            // The default port is taken (another proxy, a real PgBouncer): any free port will do.
            Err(_) => RunningProxy::start(Settings { listen: "127.0.0.1:0".to_owned(), ..settings }).await?,
        };
        Ok(Demo { proxy, dev_key, prod_key, operator_key, keys, _tls_dir: tls_dir, cluster })
    }

    /// What the demo prints on stdout, one item per line (scripts rely on this format):
    /// `UPSTREAM <owner URL>`, `LISTEN <host:port>`, `KEY <environment> <organization> <role>
    /// <actor_type>:<actor_id> <key>` for every key, `OPERATOR <key>`, ready-to-paste psql
    /// commands, and `READY` last.
    pub fn banner(&self) -> String {
        let addr = self.proxy.addr;
        let url = |user: &str, key: &str| format!("postgres://{user}:{key}@{addr}/{APP_DATABASE}?sslmode=require");
        let psql = self.cluster.bin_dir().join("psql");
        let psql = psql.display();
        let mut lines = vec![format!("UPSTREAM {}", self.cluster.admin_url(APP_DATABASE)), format!("LISTEN {addr}")];
        for k in &self.keys {
            lines.push(format!(
                "KEY {} {} {} {}:{} {}",
                k.environment.as_str(),
                k.organization,
                k.role,
                k.actor_type.as_str(),
                k.actor_id,
                k.secret
            ));
        }
        lines.push(format!("OPERATOR {}", self.operator_key));
        // acme's keys, ready to paste (the user name is only a label).
        for k in self.keys.iter().filter(|k| k.organization == "acme") {
            let user = format!("{}-{}", k.role, k.environment.as_str());
            lines.push(format!("{psql} \"{}\"", url(&user, &k.secret)));
        }
        lines.push(format!("{psql} \"{}\"", url("operator", &self.operator_key)));
        lines.push("READY".to_owned());
        lines.join("\n")
    }
}

pub async fn run(overrides: RawConfig) -> AppResult<()> {
    let demo = Demo::start(overrides).await?;
    eprintln!("struere-proxy demo: a throwaway PostgreSQL behind the proxy; Ctrl-C removes everything.");
    println!("{}", demo.banner());
    wait_for_signal().await;
    eprintln!("stopping: removing the throwaway cluster");
    let Demo { proxy, cluster, .. } = demo;
    proxy.stop().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
