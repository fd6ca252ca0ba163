//! `struere-proxy demo`: a throwaway PostgreSQL, the proxy schema, keys, TLS, and ready-to-paste
//! psql commands; everything is removed on Ctrl-C.
//!
//! Built in steps (`Demo::start`, then printing, then serving) so that later features (the demo
//! domain, policies, the admin dashboard) can add their own steps.

use crate::app::{AppResult, wait_for_signal};
use crate::auth::identity::{ActorContext, ActorType, Environment};
use crate::auth::store::{self, KeySpec};
use crate::cluster::TempCluster;
use crate::config::{ConfigSource, RawConfig, Settings, TlsMode};
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
pub fn demo_actor(org: &str, role: &str) -> (ActorType, String) {
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
    /// The admin dashboard's operator token (random per run unless configured).
    pub admin_token: String,
    /// One key per role × organization × environment.
    pub keys: Vec<DemoKey>,
    /// The owner connection to the demo database.
    pub admin_url: String,
    /// The psql binary the printed commands use.
    pub psql: std::path::PathBuf,
    // Field order matters: the proxy stops before the cluster it talks to.
    _tls_dir: tempfile::TempDir,
    /// The throwaway cluster (`None` with `--upstream`: the given database is kept).
    pub cluster: Option<TempCluster>,
}

fn random_password() -> AppResult<String> {
    let mut b = [0u8; 18];
    getrandom::fill(&mut b).map_err(|e| e.to_string())?;
    Ok(hex::encode(b))
}

/// What the least-privilege role `role` may do on the demo database: DML on its tables, and
/// CREATE on `public` for development scratch objects (doctor reports the latter as a WARN).
pub fn grants_sql(role: &str) -> String {
    format!(
        "GRANT USAGE, CREATE ON SCHEMA public TO {role}; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};"
    )
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
    cluster.psql(APP_DATABASE, &grants_sql(APP_ROLE))?;
    Ok(app_password)
}

/// Load the demo into an existing database over its owner connection (`demo --upstream`): a
/// least-privilege role of its own for this run (roles are cluster-wide: an existing one is
/// never touched), the demo schema and seed unless its tables are already there, and the
/// grants. Returns the role and its password.
pub async fn provision_existing(admin: &tokio_postgres::Client) -> AppResult<(String, String)> {
    let app_password = random_password()?;
    let mut suffix = [0u8; 4];
    getrandom::fill(&mut suffix).map_err(|e| e.to_string())?;
    let role = format!("{APP_ROLE}_{}", hex::encode(suffix));
    // Role name and password are hex: safe as an identifier and inside a literal.
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{app_password}' NOSUPERUSER NOCREATEDB NOCREATEROLE"
        ))
        .await?;
    let loaded: bool = admin.query_one("SELECT to_regclass('public.entities') IS NOT NULL", &[]).await?.try_get(0)?;
    if loaded {
        eprintln!("demo: the demo tables already exist in this database; their rows are kept as they are");
    } else {
        admin.batch_execute(DEMO_SCHEMA).await?;
        admin.batch_execute(DEMO_SEED).await?;
    }
    if let Err(e) = admin.batch_execute(HARDENING_SQL).await {
        eprintln!("demo: could not revoke the session-reaching functions from PUBLIC ({e}); run doctor");
    }
    admin.batch_execute(&grants_sql(&role)).await?;
    Ok((role, app_password))
}

/// `url`'s server and database, reached as `user`/`password`.
fn url_as(url: &str, user: &str, password: &str) -> AppResult<String> {
    use crate::cluster::percent_encode;
    use crate::upstream::UpstreamTls;
    let cfg = crate::upstream::UpstreamConfig::from_url(url)?;
    let host = if cfg.host.contains(':') { format!("[{}]", cfg.host) } else { cfg.host.clone() };
    let sslmode = match cfg.tls {
        UpstreamTls::Disable => "disable",
        UpstreamTls::Prefer => "prefer",
        UpstreamTls::Require => "require",
    };
    Ok(format!(
        "postgres://{}:{}@{host}:{}/{}?sslmode={sslmode}",
        percent_encode(user),
        percent_encode(password),
        cfg.port,
        percent_encode(&cfg.database)
    ))
}

impl Demo {
    /// The demo on a throwaway cluster of its own.
    pub async fn start(overrides: RawConfig) -> AppResult<Demo> {
        Demo::start_from(std::sync::Arc::new(move || Ok(overrides.clone()))).await
    }

    /// The demo on a throwaway cluster, its settings layered over `overrides`, which reloads
    /// read again.
    pub async fn start_from(overrides: ConfigSource) -> AppResult<Demo> {
        let cluster = tokio::task::spawn_blocking(TempCluster::start).await??;
        let app_password = provision(&cluster)?;
        let admin_url = cluster.admin_url(APP_DATABASE);
        let upstream = cluster.url(APP_ROLE, &app_password, APP_DATABASE);
        let psql = cluster.bin_dir().join("psql");
        Demo::finish(overrides, admin_url, upstream, APP_DATABASE, psql, Some(cluster)).await
    }

    /// The demo in an existing database, given its owner's URL (`demo --upstream URL`).
    pub async fn start_with_upstream(owner_url: &str, overrides: ConfigSource) -> AppResult<Demo> {
        let admin = store::connect_admin(owner_url).await?;
        let (role, app_password) = provision_existing(&admin).await?;
        let upstream = url_as(owner_url, &role, &app_password)?;
        let database = crate::upstream::UpstreamConfig::from_url(owner_url)?.database;
        let psql = crate::cluster::find_pg_bin_dir().map(|d| d.join("psql")).unwrap_or_else(|_| "psql".into());
        Demo::finish(overrides, owner_url.to_owned(), upstream, &database, psql, None).await
    }

    async fn finish(
        overrides: ConfigSource,
        admin_url: String,
        upstream: String,
        database: &str,
        psql: std::path::PathBuf,
        cluster: Option<TempCluster>,
    ) -> AppResult<Demo> {
        let tls_dir = tempfile::tempdir()?;
        let (cert, key) = crate::net::tls::write_self_signed(tls_dir.path())?;
        let base = RawConfig {
            upstream: Some(upstream),
            admin_upstream: Some(admin_url.clone()),
            database: Some(database.to_owned()),
            tls_mode: Some(TlsMode::Optional),
            tls_cert: Some(cert),
            tls_key: Some(key),
            operator_keys: Some(true),
            // The admin endpoint on loopback, any free port, and its dashboard's token.
            admin_listen: Some("127.0.0.1:0".to_owned()),
            admin_token: Some(format!("adm_{}", random_password()?)),
            ..RawConfig::default()
        };
        let settings = Settings::from_raw(base.clone().overlay(overrides()?))?;
        let admin_token = settings.admin_token.clone().ok_or("the demo needs an admin token")?;

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

        let (proxy, fallback) = match RunningProxy::start(settings.clone()).await {
            Ok(p) => (p, None),
            // The default port is taken (another proxy, a real PgBouncer): any free port will do.
            Err(_) => {
                let any = "127.0.0.1:0".to_owned();
                (RunningProxy::start(Settings { listen: any.clone(), ..settings }).await?, Some(any))
            }
        };
        // A reload reads the same layers again: the demo's own settings under the file, the
        // environment and the flags.
        proxy.proxy.set_config_source(std::sync::Arc::new(move || {
            let mut raw = base.clone().overlay(overrides()?);
            if fallback.is_some() {
                raw.listen.clone_from(&fallback);
            }
            Ok(raw)
        }));
        Ok(Demo {
            proxy,
            dev_key,
            prod_key,
            operator_key,
            admin_token,
            keys,
            admin_url,
            psql,
            _tls_dir: tls_dir,
            cluster,
        })
    }

    /// What the demo prints on stdout, one item per line (scripts rely on this format):
    /// `UPSTREAM <owner URL>`, `LISTEN <host:port>`, `ADMIN <url>`, `ADMIN_TOKEN <token>` (the
    /// dashboard's), `KEY <environment> <organization> <role>
    /// <actor_type>:<actor_id> <key>` for every key, `OPERATOR <key>`, ready-to-paste psql
    /// commands, and `READY` last.
    pub fn banner(&self) -> String {
        let addr = self.proxy.addr;
        let database = &self.proxy.proxy.settings.database;
        let url = |user: &str, key: &str| format!("postgres://{user}:{key}@{addr}/{database}?sslmode=require");
        let psql = self.psql.display();
        let mut lines = vec![format!("UPSTREAM {}", self.admin_url), format!("LISTEN {addr}")];
        if let Some(admin) = self.proxy.admin_addr {
            lines.push(format!("ADMIN http://{admin}"));
            lines.push(format!("ADMIN_TOKEN {}", self.admin_token));
        }
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

/// `demo [--upstream URL]`: serve until Ctrl-C, then remove the throwaway cluster (or, in a
/// given database, revoke the keys the demo created; its data stays).
pub async fn run(upstream: Option<String>, overrides: ConfigSource) -> AppResult<()> {
    let demo = match &upstream {
        Some(url) => Demo::start_with_upstream(url, overrides).await?,
        None => Demo::start_from(overrides).await?,
    };
    crate::server::reload_on_sighup(&demo.proxy.proxy)?;
    match upstream {
        Some(_) => {
            eprintln!("struere-proxy demo: the given database behind the proxy; Ctrl-C revokes the demo's keys.")
        }
        None => eprintln!("struere-proxy demo: a throwaway PostgreSQL behind the proxy; Ctrl-C removes everything."),
    }
    println!("{}", demo.banner());
    wait_for_signal().await;
    let Demo { proxy, cluster, keys, operator_key, admin_url, .. } = demo;
    let proxy_upstream = proxy.proxy.settings.upstream.clone();
    proxy.stop().await;
    match cluster {
        Some(cluster) => {
            eprintln!("stopping: removing the throwaway cluster");
            tokio::task::spawn_blocking(move || drop(cluster)).await?;
        }
        None => {
            eprintln!("stopping: revoking the demo's keys and dropping its role");
            let admin = store::connect_admin(&admin_url).await?;
            let role = crate::upstream::UpstreamConfig::from_url(&proxy_upstream)?.user;
            let hashes: Vec<_> = keys
                .iter()
                .map(|k| &k.secret)
                .chain([&operator_key])
                .map(|secret| crate::auth::api_key::KeyHash::of(secret))
                .collect();
            store::revoke_hashes(&admin, &hashes).await?;
            // What the role owns here is the tenants' scratch schemas of this run.
            if let Err(e) = admin.batch_execute(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\"")).await {
                eprintln!("could not drop the demo's role {role}: {e}");
            }
        }
    }
    Ok(())
}
