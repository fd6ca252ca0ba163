//! The listener and the state every session shares.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::store::KeyStore;
use crate::auth::throttle::AuthThrottle;
use crate::cancel::CancelRegistry;
use crate::config::{ConfigSource, SettingChange, Settings};
use crate::doctor::RoleAudit;
use crate::protocol::backend::{self, Severity};
use crate::protocol::sqlstate::SqlState;
use crate::rewrite::Rewriter;
use crate::rewrite::engine::PolicyEngine;
use crate::upstream::UpstreamConfig;

/// Everything sessions share. Cheap to reach from any task through an `Arc`.
pub struct Proxy {
    /// The settings the proxy started with. Those a reload can change are read through
    /// [`Proxy::current`]; the others (addresses, upstream, TLS, pool, …) stay as here until a
    /// restart.
    pub settings: Settings,
    /// The settings in force: `settings` with what reloads changed since (`reload`).
    live: std::sync::RwLock<Arc<Settings>>,
    /// Where `reload` reads the configuration again (`None`: a proxy built from settings alone).
    config_source: std::sync::Mutex<Option<ConfigSource>>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    /// The sessions past authentication, for the dashboard (no secrets in them).
    live_sessions: Arc<dashmap::DashMap<u64, LiveSession>>,
    next_session: std::sync::atomic::AtomicU64,
    pub keys: Arc<KeyStore>,
    pub throttle: AuthThrottle,
    pub rewriter: Rewriter,
    pub cancels: Arc<CancelRegistry>,
    pub upstream: Arc<UpstreamConfig>,
    pub admin_upstream: Arc<UpstreamConfig>,
    pub tls: Option<TlsAcceptor>,
    /// Random per process: makes the marker of an injected refusal unguessable.
    pub refusal_nonce: String,
    /// The engine the rewriter uses now (policies + catalog), to tell whether a reload changed it.
    engine: std::sync::Mutex<Arc<PolicyEngine>>,
    /// A catalog refresh is already scheduled.
    refresh_pending: std::sync::atomic::AtomicBool,
    /// Scratch schemas known to exist.
    scratch_schemas: dashmap::DashSet<String>,
    /// Audit events and usage (events.rs).
    pub events: Arc<crate::events::EventSink>,
    /// The events' queue, until `start_on` hands it to the writer task.
    event_rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<crate::events::Event>>>,
    /// The upstream role's last audit (at start, then with every periodic refresh): while it
    /// has a hole, production keys are refused unless `allow_unsafe_upstream_role` is set.
    role_audit: std::sync::Mutex<Arc<RoleAudit>>,
    /// Warm upstream connections of environment sessions (pool.rs).
    pub pool: Arc<crate::pool::UpstreamPool>,
    /// What the admin endpoint exposes (metrics.rs).
    pub metrics: crate::metrics::Metrics,
    /// Open sessions per key id (max_connections_per_key).
    key_sessions: Arc<dashmap::DashMap<i64, usize>>,
    /// Shutdown state sessions watch (`RunningProxy::drain`).
    pub drain: watch::Sender<Drain>,
}

/// Where a shutdown stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    Running,
    /// No new clients; each session ends (57P01) once idle: running statements and open
    /// transactions finish first.
    Draining,
    /// The drain timeout passed: every remaining session ends now (57P01).
    Force,
}

/// One session's hold on its key's connection budget (and its line in the live sessions);
/// released when dropped.
pub struct KeySlot {
    sessions: Arc<dashmap::DashMap<i64, usize>>,
    key_id: i64,
    live: Arc<dashmap::DashMap<u64, LiveSession>>,
    session_id: u64,
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        self.sessions.remove_if_mut(&self.key_id, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
        self.live.remove(&self.session_id);
    }
}

/// A session past authentication, as the dashboard lists it: who and since when, never a
/// secret or a statement.
#[derive(Debug, Clone)]
pub struct LiveSession {
    pub key_id: i64,
    /// The key's display prefix (`sk_dev_7c449c`).
    pub key_prefix: String,
    pub key_name: String,
    /// `None` for an operator key.
    pub environment: Option<crate::auth::identity::Environment>,
    pub organization: Option<String>,
    pub roles: Vec<String>,
    /// `type:id`.
    pub actor: Option<String>,
    pub peer: std::net::SocketAddr,
    pub since: std::time::SystemTime,
}

/// What a production key hears while the upstream role has a hole. Which hole is logged, not
/// told to the client.
pub const PRODUCTION_REFUSED: &str = "production keys are refused: the proxy's upstream role failed its safety checks \
     (a superuser, an owner of a managed table, or BYPASSRLS); the operator must run `struere-proxy doctor` and fix \
     what it reports";

/// How long after a forwarded DDL statement the catalog is re-read (the statement has usually
/// committed by then; the periodic refresh catches the rest).
const DDL_REFRESH_DELAY: std::time::Duration = std::time::Duration::from_millis(300);
/// Policies and catalog are re-read this often, whatever happens.
pub const PERIODIC_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid upstream URL: {0}")]
    Upstream(String),
    #[error(transparent)]
    Tls(#[from] crate::net::tls::TlsError),
    #[error("cannot generate randomness or temporary files: {0}")]
    Random(String),
    #[error("invalid policies:\n{0}")]
    Policy(#[from] crate::policy::PolicyErrors),
    #[error("cannot read the deployed policies: {0}")]
    PolicyStore(#[from] crate::policy::store::PolicyStoreError),
    #[error("cannot read the upstream catalog: {0}")]
    Catalog(#[from] tokio_postgres::Error),
    #[error("the policies do not match the database:\n{}", .0.join("\n"))]
    Mismatch(Vec<String>),
    #[error("cannot audit the upstream role: {0}")]
    RoleAudit(tokio_postgres::Error),
}

/// The policy sets deployed to each environment (`struere.policy_versions`), checked against
/// the catalog. An environment with nothing deployed gets the empty set: its keys are refused.
pub async fn load_engine(settings: &Settings) -> Result<Arc<PolicyEngine>, StartError> {
    let admin = crate::auth::store::connect_admin(&settings.admin_upstream).await?;
    load_engine_with(&admin, settings).await
}

/// `load_engine` over an open owner connection.
pub async fn load_engine_with(
    admin: &tokio_postgres::Client,
    settings: &Settings,
) -> Result<Arc<PolicyEngine>, StartError> {
    let policies = load_policies(admin).await?;
    let catalog = crate::catalog::load(admin).await?;
    build_engine(policies, Arc::new(catalog), settings)
}

/// The sets deployed to each environment.
pub async fn load_policies(admin: &tokio_postgres::Client) -> Result<crate::policy::Policies, StartError> {
    use crate::auth::identity::Environment;
    use crate::policy::store;
    let development = store::latest(admin, Environment::Development).await?;
    let production = store::latest(admin, Environment::Production).await?;
    Ok(crate::policy::bundle::assemble(development.as_ref(), production.as_ref())?)
}

/// Policies over a catalog, once every table they manage is checked to be there.
fn build_engine(
    policies: crate::policy::Policies,
    catalog: Arc<crate::catalog::CatalogSnapshot>,
    settings: &Settings,
) -> Result<Arc<PolicyEngine>, StartError> {
    crate::catalog::check_policy(&catalog, &policies.all_tables()).map_err(StartError::Mismatch)?;
    Ok(Arc::new(PolicyEngine {
        policies,
        catalog,
        allow_functions: settings.allow_functions.iter().cloned().collect(),
    }))
}

impl Proxy {
    /// Load the policies and the catalog, check one against the other, audit the upstream role,
    /// and build the proxy. Refuses to start when a policy names a missing table or column.
    pub async fn load(settings: Settings) -> Result<Proxy, StartError> {
        let engine = load_engine(&settings).await?;
        let role = UpstreamConfig::from_url(&settings.upstream).map_err(|e| StartError::Upstream(e.to_string()))?.user;
        let admin = crate::auth::store::connect_admin(&settings.admin_upstream).await?;
        let audit =
            RoleAudit::run(&admin, &role, &engine.policies.all_tables()).await.map_err(StartError::RoleAudit)?;
        log_role_audit(&audit, settings.allow_unsafe_upstream_role);
        Proxy::new(settings, engine, audit)
    }

    pub fn new(settings: Settings, engine: Arc<PolicyEngine>, role_audit: RoleAudit) -> Result<Proxy, StartError> {
        let upstream = UpstreamConfig::from_url(&settings.upstream).map_err(|e| StartError::Upstream(e.to_string()))?;
        let admin_upstream =
            UpstreamConfig::from_url(&settings.admin_upstream).map_err(|e| StartError::Upstream(e.to_string()))?;
        let tls = match (&settings.tls_cert, &settings.tls_key, settings.tls_mode) {
            (_, _, crate::config::TlsMode::Disabled) => None,
            (Some(c), Some(k), _) => Some(crate::net::tls::acceptor(c, k)?),
            _ if settings.tls_self_signed => {
                // Exposed without a certificate: a self-signed one, made for this process (the
                // files are removed right after loading).
                let dir = tempfile::tempdir().map_err(|e| StartError::Random(e.to_string()))?;
                let (c, k) = crate::net::tls::write_self_signed(dir.path())?;
                tracing::warn!(
                    listen = %settings.listen,
                    "listening off loopback without a certificate: TLS is required with a self-signed certificate \
                     (configure tls_cert/tls_key, or tls_mode explicitly)"
                );
                Some(crate::net::tls::acceptor(&c, &k)?)
            }
            _ => None,
        };
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| StartError::Random(e.to_string()))?;
        let (events, event_rx) = crate::events::EventSink::new(settings.event_store);
        Ok(Proxy {
            events,
            event_rx: std::sync::Mutex::new(Some(event_rx)),
            keys: Arc::new(KeyStore::new(settings.admin_upstream.clone(), settings.key_cache_ttl)),
            throttle: AuthThrottle::new(),
            rewriter: Rewriter::new(settings.rewrite_cache_capacity, Arc::clone(&engine) as _)
                .with_time_limit(settings.max_rewrite_time),
            engine: std::sync::Mutex::new(engine),
            refresh_pending: std::sync::atomic::AtomicBool::new(false),
            scratch_schemas: dashmap::DashSet::new(),
            role_audit: std::sync::Mutex::new(Arc::new(role_audit)),
            cancels: Arc::new(CancelRegistry::default()),
            live: std::sync::RwLock::new(Arc::new(settings.clone())),
            config_source: std::sync::Mutex::new(None),
            reloading: tokio::sync::Mutex::new(()),
            live_sessions: Arc::new(dashmap::DashMap::new()),
            next_session: std::sync::atomic::AtomicU64::new(1),
            pool: Arc::new(crate::pool::UpstreamPool::new(settings.pool)),
            metrics: crate::metrics::Metrics::default(),
            key_sessions: Arc::new(dashmap::DashMap::new()),
            drain: watch::channel(Drain::Running).0,
            upstream: Arc::new(upstream),
            admin_upstream: Arc::new(admin_upstream),
            tls,
            refusal_nonce: hex::encode(nonce),
            settings,
        })
    }

    /// The policy set in force for `env`.
    pub fn policy_set(&self, env: crate::auth::identity::Environment) -> Arc<crate::policy::PolicySet> {
        let engine = self.engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(engine.policies.for_env(env))
    }

    /// The version of the policy set in force for `env` (`v<N>`, or `none`).
    pub fn policy_version(&self, env: crate::auth::identity::Environment) -> String {
        self.policy_set(env).version.clone()
    }

    /// Re-read the policies and the catalog. An invalid policy set, or one that no longer
    /// matches the database, is reported and the last good engine stays in force.
    pub async fn refresh_engine(&self) -> Result<bool, StartError> {
        // Over the key store's owner connection, kept open: a new connection per refresh cost a
        // backend start and, where the server asks for SCRAM, 4,096 PBKDF2 rounds computed on
        // the event loop, every 30 s and after every DDL statement.
        let admin = self.keys.admin().client().await?;
        let fresh = load_engine_with(&admin, &self.current()).await?;
        Ok(self.install_engine(fresh))
    }

    /// The settings in force (those a reload changed included).
    pub fn current(&self) -> Arc<Settings> {
        Arc::clone(&self.live.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Where `reload` reads the configuration again.
    pub fn set_config_source(&self, source: ConfigSource) {
        *self.config_source.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(source);
    }

    /// Read the configuration again (SIGHUP, `POST /reload`) and put in force what can change
    /// while running: the admin token, the log filter, limits (clients, sessions per key,
    /// message size), timeouts, the key cache TTL, operator keys, the unsafe-role override and
    /// the extra allowed functions. Every other change is logged as needing a restart. An
    /// invalid configuration changes nothing. Returns every difference found.
    pub async fn reload(&self) -> Result<Vec<SettingChange>, String> {
        let _one_at_a_time = self.reloading.lock().await;
        let source = self
            .config_source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or("this proxy was started without a configuration source: nothing to reload")?;
        let fresh = source().and_then(Settings::from_raw).map_err(|e| {
            tracing::error!(error = %e, "reload: invalid configuration; nothing changed");
            format!("invalid configuration, nothing changed: {e}")
        })?;
        let current = self.current();
        let mut changes = current.changes_to(&fresh);
        let mut applied = current.with_live_from(&fresh);
        if applied.log_level != current.log_level
            && let Err(e) = crate::logging::set_level(&applied.log_level)
        {
            applied.log_level = current.log_level.clone();
            for c in changes.iter_mut().filter(|c| c.name == "log_level") {
                c.live = false;
                c.detail = format!("{} (not applied: {e})", c.detail);
            }
        }
        self.keys.set_ttl(applied.key_cache_ttl);
        let functions_changed = applied.allow_functions != current.allow_functions;
        *self.live.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(applied);
        if functions_changed && let Err(e) = self.refresh_engine().await {
            tracing::error!(error = %e, "reload: cannot rebuild the policy engine; keeping the last good one");
        }
        for c in &changes {
            if c.live {
                tracing::info!(setting = c.name, change = %c.detail, "reload: applied");
            } else {
                tracing::warn!(setting = c.name, change = %c.detail, "reload: this setting needs a restart to change");
            }
        }
        tracing::info!(changes = changes.len(), "configuration reloaded");
        Ok(changes)
    }

    /// The sessions past authentication now, oldest first.
    pub fn live_sessions(&self) -> Vec<LiveSession> {
        let mut all: Vec<LiveSession> = self.live_sessions.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|s| s.since);
        all
    }

    /// Put `fresh` in force if it differs from the engine in use; true when it did.
    fn install_engine(&self, fresh: Arc<PolicyEngine>) -> bool {
        let mut current = self.engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let same = current.policies == fresh.policies
            && current.catalog == fresh.catalog
            && current.allow_functions == fresh.allow_functions;
        if !same {
            *current = Arc::clone(&fresh);
            self.rewriter.set_policy(fresh);
            tracing::info!(
                development = %current.policies.development.version,
                production = %current.policies.production.version,
                "policies or catalog changed: new rewrites use them"
            );
        }
        !same
    }

    /// A session slot for `key`, or `None` when it holds `max_connections_per_key` already.
    pub fn take_key_slot(&self, key: &crate::auth::store::KeyRecord, peer: std::net::SocketAddr) -> Option<KeySlot> {
        let key_id = key.id;
        {
            let mut n = self.key_sessions.entry(key_id).or_insert(0);
            if *n >= self.current().max_connections_per_key {
                return None;
            }
            *n += 1;
        }
        let session_id = self.next_session.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let actor = key.caller.actor();
        self.live_sessions.insert(
            session_id,
            LiveSession {
                key_id,
                key_prefix: key.prefix.clone(),
                key_name: key.name.clone(),
                environment: actor.map(|a| a.environment),
                organization: actor.map(|a| a.organization.clone()),
                roles: actor.map(|a| a.roles.clone()).unwrap_or_default(),
                actor: actor.map(|a| format!("{}:{}", a.actor_type.as_str(), a.actor_id)),
                peer,
                since: std::time::SystemTime::now(),
            },
        );
        Some(KeySlot {
            sessions: Arc::clone(&self.key_sessions),
            key_id,
            live: Arc::clone(&self.live_sessions),
            session_id,
        })
    }

    /// The upstream role's last audit.
    pub fn role_audit(&self) -> Arc<RoleAudit> {
        Arc::clone(&self.role_audit.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// True while production keys must be refused: the upstream role has a hole and
    /// `allow_unsafe_upstream_role` is off.
    pub fn refuses_production(&self) -> bool {
        !self.current().allow_unsafe_upstream_role && self.role_audit().has_holes()
    }

    /// Audit the upstream role again: a role fixed since the start lets production keys in, a
    /// new hole shuts them out (sessions already open keep running).
    pub async fn refresh_role_audit(&self) -> Result<(), tokio_postgres::Error> {
        let tables = {
            let engine = self.engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            engine.policies.all_tables()
        };
        let client = self.keys.admin().client().await?;
        let fresh = RoleAudit::run(&client, &self.upstream.user, &tables).await?;
        let mut current = self.role_audit.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if **current != fresh {
            log_role_audit(&fresh, self.current().allow_unsafe_upstream_role);
            *current = Arc::new(fresh);
        }
        Ok(())
    }

    /// Create the caller's scratch schema (owned by the least-privilege role) if needed. Best
    /// effort: without it, unqualified DDL fails with PostgreSQL's "no schema has been selected".
    pub async fn ensure_scratch_schema(&self, actor: &crate::auth::identity::ActorContext) {
        let schema = crate::rewrite::engine::scratch_schema(actor);
        if self.scratch_schemas.contains(&schema) {
            return;
        }
        let sql = format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\" AUTHORIZATION \"{}\"",
            self.upstream.user.replace('"', "\"\"")
        );
        match self.keys.admin().client().await {
            Ok(c) => match c.batch_execute(&sql).await {
                Ok(()) => {
                    self.scratch_schemas.insert(schema);
                }
                Err(e) => tracing::warn!(error = %e, "cannot create the scratch schema"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot create the scratch schema"),
        }
    }

    /// Schedule a refresh soon (after DDL went through); several requests coalesce into one.
    pub fn request_refresh(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.refresh_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let proxy = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(DDL_REFRESH_DELAY).await;
            proxy.refresh_pending.store(false, Ordering::Release);
            if let Err(e) = proxy.refresh_engine().await {
                tracing::error!(error = %e, "policy/catalog refresh failed; keeping the last good set");
            }
        });
    }
}

/// Reload the configuration on every SIGHUP for as long as the process runs (`serve` and `demo`
/// install it; signals are per process, so tests call `Proxy::reload` instead).
pub fn reload_on_sighup(proxy: &Arc<Proxy>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())?;
    let proxy = Arc::downgrade(proxy);
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let Some(proxy) = proxy.upgrade() else { return };
            tracing::info!("SIGHUP: reloading the configuration");
            if let Err(e) = proxy.reload().await {
                tracing::error!(error = %e, "reload failed");
            }
        }
    });
    Ok(())
}

/// Log the audit's holes and what they mean for production keys.
fn log_role_audit(audit: &RoleAudit, allow_unsafe: bool) {
    if !audit.has_holes() {
        tracing::info!(role = %audit.role, "upstream role audit: no holes");
        return;
    }
    for hole in audit.holes() {
        tracing::warn!(role = %audit.role, hole = %hole.what, "upstream role hole");
    }
    if allow_unsafe {
        tracing::warn!("production keys are served anyway: allow_unsafe_upstream_role = true");
    } else {
        tracing::warn!(
            "production keys are refused until the upstream role is fixed (run `struere-proxy doctor`); \
             development keys keep working"
        );
    }
}

/// Refresh policies, catalog and the upstream role audit periodically until the proxy stops.
async fn refresh_periodically(proxy: Arc<Proxy>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PERIODIC_REFRESH);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = proxy.refresh_engine().await {
                    tracing::error!(error = %e, "policy/catalog refresh failed; keeping the last good set");
                }
                if let Err(e) = proxy.refresh_role_audit().await {
                    tracing::error!(error = %e, "upstream role audit failed; keeping the last result");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Close pooled connections idle for too long, every few seconds until the proxy stops.
async fn reap_pool(pool: Arc<crate::pool::UpstreamPool>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => pool.reap().await,
            _ = shutdown.changed() => return,
        }
    }
}

/// LISTEN for deployments and switch to a new version as soon as one is published (new
/// statements use it; a statement already rewritten finishes under the old one). The
/// connection is re-made when lost, and the policies are re-read after every (re)connect, so a
/// deployment made while it was down is picked up then (the periodic refresh is the backstop).
async fn follow_deployments(proxy: Arc<Proxy>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = std::time::Duration::from_millis(250);
    loop {
        match tokio_postgres::connect(&proxy.settings.admin_upstream, tokio_postgres::NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        if let tokio_postgres::AsyncMessage::Notification(n) = message
                            && tx.send(n.payload().to_owned()).is_err()
                        {
                            return;
                        }
                    }
                });
                let listen = format!("LISTEN {}", crate::policy::store::CHANNEL);
                match client.batch_execute(&listen).await {
                    Ok(()) => {
                        backoff = std::time::Duration::from_millis(250);
                        switch_policies(&proxy, &client, "listening for deployments").await;
                        loop {
                            tokio::select! {
                                payload = rx.recv() => match payload {
                                    Some(payload) => switch_policies(&proxy, &client, &payload).await,
                                    None => break,
                                },
                                _ = shutdown.changed() => {
                                    driver.abort();
                                    return;
                                }
                            }
                        }
                        tracing::warn!("lost the deployment listener connection; reconnecting");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot LISTEN for policy deployments"),
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect to listen for policy deployments"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
    }
}

/// Re-read the deployed policies over the listener's own connection (no connection set-up on
/// the switch path) and put them in force. A set that does not match the catalog in use is
/// refused (logged) and the last good one stays.
async fn switch_policies(proxy: &Proxy, client: &tokio_postgres::Client, why: &str) {
    // install_engine logs the versions when they changed.
    // A deployment changes policies, not the catalog: the catalog in use is kept (DDL and the
    // periodic refresh re-read it), which keeps the switch to a couple of small queries.
    let fresh = async {
        let policies = load_policies(client).await?;
        let catalog = Arc::clone(&proxy.engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner).catalog);
        let settings = proxy.current();
        match build_engine(policies, catalog, &settings) {
            // The set names a table created since the catalog was read: read it again.
            Err(StartError::Mismatch(_)) => load_engine_with(client, &settings).await,
            other => other,
        }
    };
    match fresh.await.map(|fresh| proxy.install_engine(fresh)) {
        Ok(changed) => tracing::debug!(trigger = why, changed, "deployed policies re-read"),
        Err(e) => {
            tracing::error!(error = %e, trigger = why, "cannot load the deployed policies; keeping the last good set")
        }
    }
}

/// Accept clients until `shutdown` flips to true. Each client runs on its own task; a panic or
/// error in one never reaches another.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // Clients admitted and not yet gone; only this loop admits, so the check below holds
    // (`max_clients` is read at every accept: a reload changes it for the next client).
    let admitted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tracing::info!(addr = %listener.local_addr()?, "listening");
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        if admitted.load(std::sync::atomic::Ordering::Acquire) >= proxy.current().max_clients {
            let refused = proxy.metrics.clients_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            // Reported, but not once per client of a flood (the metric counts them all).
            if refused == 1 || refused.is_multiple_of(100) {
                tracing::warn!(limit = proxy.current().max_clients, refused, "client refused: max_clients reached");
            }
            tokio::spawn(refuse_too_many(tcp));
            continue;
        }
        admitted.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let slot = ClientSlot(Arc::clone(&admitted));
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            proxy.metrics.clients_total.fetch_add(1, Relaxed);
            proxy.metrics.clients_current.fetch_add(1, Relaxed);
            crate::session::serve(Arc::clone(&proxy), tcp, peer).await;
            proxy.metrics.clients_current.fetch_sub(1, Relaxed);
            drop(slot);
        });
    }
}

/// An admitted client's place under `max_clients`, given back when its task ends (or panics).
struct ClientSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn refuse_too_many(mut tcp: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let mut out = bytes::BytesMut::new();
    backend::error_response(
        &mut out,
        Severity::Fatal,
        SqlState::TOO_MANY_CONNECTIONS,
        "sorry, too many clients already (max_clients reached)",
        None,
    );
    let _ = tcp.write_all(&out).await;
}

/// A proxy serving on a bound listener: what `serve`, `demo` and the tests start.
pub struct RunningProxy {
    pub addr: std::net::SocketAddr,
    /// The admin HTTP endpoint, when `admin_listen` is set.
    pub admin_addr: Option<std::net::SocketAddr>,
    pub proxy: Arc<Proxy>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningProxy {
    /// Bind `settings.listen` and start accepting.
    pub async fn start(settings: Settings) -> Result<RunningProxy, Box<dyn std::error::Error + Send + Sync>> {
        let listener = TcpListener::bind(&settings.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
        Self::start_on(settings, listener).await
    }

    pub async fn start_on(
        settings: Settings,
        listener: TcpListener,
    ) -> Result<RunningProxy, Box<dyn std::error::Error + Send + Sync>> {
        let addr = listener.local_addr()?;
        let proxy = Arc::new(Proxy::load(settings).await?);
        let (tx, rx) = watch::channel(false);
        tokio::spawn(refresh_periodically(Arc::clone(&proxy), rx.clone()));
        tokio::spawn(follow_deployments(Arc::clone(&proxy), rx.clone()));
        tokio::spawn(reap_pool(Arc::clone(&proxy.pool), rx.clone()));
        let event_rx = proxy.event_rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(event_rx) = event_rx {
            let url = proxy.settings.admin_upstream.clone();
            let (written, dropped) = (Arc::clone(&proxy.events.written), Arc::clone(&proxy.events.dropped));
            tokio::spawn(crate::events::write_events(event_rx, url.clone(), written, dropped));
            tokio::spawn(crate::events::flush_usage(url, Arc::downgrade(&proxy.events)));
        }
        let admin_addr = match &proxy.settings.admin_listen {
            Some(at) => {
                let admin = TcpListener::bind(at).await.map_err(|e| format!("cannot listen on {at} (admin): {e}"))?;
                let admin_addr = admin.local_addr()?;
                tokio::spawn(crate::admin::serve(Arc::clone(&proxy), admin, rx.clone()));
                tracing::info!(addr = %admin_addr, "admin endpoint listening");
                Some(admin_addr)
            }
            None => None,
        };
        let task = tokio::spawn(serve(Arc::clone(&proxy), listener, rx));
        Ok(RunningProxy { addr, admin_addr, proxy, shutdown: tx, task })
    }

    /// Stop accepting new clients (sessions already running finish on their own).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Graceful shutdown: stop accepting, let every session end once idle (its running
    /// statement and open transaction finish), and after `timeout` end the rest; each client
    /// hears 57P01. Returns how many sessions had to be ended by force.
    pub async fn drain(self, timeout: std::time::Duration) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let proxy = Arc::clone(&self.proxy);
        self.stop().await;
        proxy.drain.send_replace(Drain::Draining);
        let open = || proxy.metrics.clients_current.load(Relaxed);
        tracing::info!(sessions = open(), timeout_s = timeout.as_secs(), "draining");
        let deadline = tokio::time::Instant::now() + timeout;
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let forced = open();
        if forced > 0 {
            tracing::warn!(sessions = forced, "drain timeout: ending the remaining sessions");
            proxy.drain.send_replace(Drain::Force);
            let grace = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
            while open() > 0 && tokio::time::Instant::now() < grace {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        forced
    }
}
