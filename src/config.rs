//! Configuration: a TOML file, overridden by environment variables, overridden by flags.
//!
//! The raw layers are plain optional fields; `Settings` is built only once all layers are merged
//! and validated, so the rest of the proxy never sees a half-checked value.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("missing setting {0}: set it in the config file, the environment or a flag")]
    Missing(&'static str),
}

/// How the client side treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Never offer TLS (answer `N` to SSLRequest).
    Disabled,
    /// Offer TLS when a certificate is configured; plaintext sessions are allowed.
    Optional,
    /// Refuse sessions that did not negotiate TLS.
    Required,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disabled" | "off" => Ok(TlsMode::Disabled),
            "optional" | "prefer" => Ok(TlsMode::Optional),
            "required" | "require" => Ok(TlsMode::Required),
            other => Err(format!("unknown TLS mode {other:?} (disabled, optional, required)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?} (text, json)")),
        }
    }
}

/// Which audit events are written to `struere.events` (all of them always go to the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStore {
    All,
    Refused,
    Off,
}

impl std::str::FromStr for EventStore {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(EventStore::All),
            "refused" => Ok(EventStore::Refused),
            "off" => Ok(EventStore::Off),
            other => Err(format!("unknown event store {other:?} (all, refused, off)")),
        }
    }
}

/// One layer of configuration: every field optional. The TOML file deserialises into it; the
/// environment and flags are read into it by the CLI.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub admin_upstream: Option<String>,
    pub database: Option<String>,
    pub tls_mode: Option<TlsMode>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub key_cache_ttl_secs: Option<u64>,
    pub max_message_size: Option<usize>,
    pub log_format: Option<LogFormat>,
    pub event_store: Option<EventStore>,
    pub operator_keys: Option<bool>,
    pub search_path: Option<String>,
    pub max_clients: Option<usize>,
    pub rewrite_cache_capacity: Option<usize>,
    pub connect_timeout_secs: Option<u64>,
    /// Policy directory (tables.toml, development.toml, production.toml); default: the shipped example set.
    pub policies: Option<PathBuf>,
    /// Functions allowed beyond the built-in allowlist (e.g. `pg_sleep`, advisory locks).
    pub allow_functions: Option<Vec<String>>,
    /// Serve production keys even when the upstream role has holes (`struere-proxy doctor`).
    pub allow_unsafe_upstream_role: Option<bool>,
    /// Idle upstream connections kept per pool (tenant × startup parameters); 0 turns pooling off.
    pub pool_max_idle: Option<usize>,
    /// Seconds an idle pooled upstream connection is kept.
    pub pool_idle_timeout_secs: Option<u64>,
    /// Upstream connections busy at once (in a transaction, or answering), across all sessions;
    /// the others wait their turn. 0: no limit.
    pub pool_max_active: Option<usize>,
    /// Longest a session waits for its turn under `pool_max_active`, in seconds; then it is ended (53300).
    pub pool_wait_timeout_secs: Option<u64>,
    /// Address of the admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); off when unset.
    pub admin_listen: Option<String>,
    /// Concurrent sessions one key may hold.
    pub max_connections_per_key: Option<usize>,
    /// Longest a statement's rewrite may take, in milliseconds; a slower one is refused (54000).
    pub max_rewrite_ms: Option<u64>,
    /// On SIGTERM/SIGINT, how long running statements and transactions may take to finish.
    pub shutdown_timeout_secs: Option<u64>,
    /// A client idle outside a transaction this long is disconnected (57P05); 0: never.
    pub idle_session_timeout_secs: Option<u64>,
    /// A client idle inside a transaction this long is disconnected (25P03); 0: never.
    pub idle_transaction_timeout_secs: Option<u64>,
    /// A statement running this long is cancelled (57014); 0: never.
    pub statement_timeout_ms: Option<u64>,
    /// Operator token of the admin dashboard (`Authorization: Bearer …` or its login form);
    /// the dashboard is refused while it is unset. Never a tenant key.
    pub admin_token: Option<String>,
    /// Log filter (`info`, `warn,struere_proxy=debug`, …); `STRUERE_LOG` or `RUST_LOG` override it.
    pub log_level: Option<String>,
    /// Threads that run sessions; 0: one per core. Default 1 (see `Settings::worker_threads`).
    pub worker_threads: Option<usize>,
}

impl RawConfig {
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source: Box::new(source) })
    }

    /// Layer `over` on top of `self`: any field `over` sets wins.
    pub fn overlay(self, over: RawConfig) -> RawConfig {
        RawConfig {
            listen: over.listen.or(self.listen),
            upstream: over.upstream.or(self.upstream),
            admin_upstream: over.admin_upstream.or(self.admin_upstream),
            database: over.database.or(self.database),
            tls_mode: over.tls_mode.or(self.tls_mode),
            tls_cert: over.tls_cert.or(self.tls_cert),
            tls_key: over.tls_key.or(self.tls_key),
            key_cache_ttl_secs: over.key_cache_ttl_secs.or(self.key_cache_ttl_secs),
            max_message_size: over.max_message_size.or(self.max_message_size),
            log_format: over.log_format.or(self.log_format),
            event_store: over.event_store.or(self.event_store),
            operator_keys: over.operator_keys.or(self.operator_keys),
            search_path: over.search_path.or(self.search_path),
            max_clients: over.max_clients.or(self.max_clients),
            rewrite_cache_capacity: over.rewrite_cache_capacity.or(self.rewrite_cache_capacity),
            connect_timeout_secs: over.connect_timeout_secs.or(self.connect_timeout_secs),
            policies: over.policies.or(self.policies),
            allow_functions: over.allow_functions.or(self.allow_functions),
            allow_unsafe_upstream_role: over.allow_unsafe_upstream_role.or(self.allow_unsafe_upstream_role),
            pool_max_idle: over.pool_max_idle.or(self.pool_max_idle),
            pool_idle_timeout_secs: over.pool_idle_timeout_secs.or(self.pool_idle_timeout_secs),
            pool_max_active: over.pool_max_active.or(self.pool_max_active),
            pool_wait_timeout_secs: over.pool_wait_timeout_secs.or(self.pool_wait_timeout_secs),
            admin_listen: over.admin_listen.or(self.admin_listen),
            max_connections_per_key: over.max_connections_per_key.or(self.max_connections_per_key),
            max_rewrite_ms: over.max_rewrite_ms.or(self.max_rewrite_ms),
            shutdown_timeout_secs: over.shutdown_timeout_secs.or(self.shutdown_timeout_secs),
            idle_session_timeout_secs: over.idle_session_timeout_secs.or(self.idle_session_timeout_secs),
            idle_transaction_timeout_secs: over.idle_transaction_timeout_secs.or(self.idle_transaction_timeout_secs),
            statement_timeout_ms: over.statement_timeout_ms.or(self.statement_timeout_ms),
            admin_token: over.admin_token.or(self.admin_token),
            log_level: over.log_level.or(self.log_level),
            worker_threads: over.worker_threads.or(self.worker_threads),
        }
    }
}

/// Validated settings. Built by [`Settings::from_raw`]; every field has its final value.
#[derive(Clone)]
pub struct Settings {
    pub listen: String,
    /// Least-privilege role used for client traffic of environment keys.
    pub upstream: String,
    /// Owner role: `init`, `keys`, key lookups and operator sessions.
    pub admin_upstream: String,
    /// The database name clients must ask for (operator keys may name any).
    pub database: String,
    pub tls_mode: TlsMode,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub key_cache_ttl: Duration,
    pub max_message_size: usize,
    pub log_format: LogFormat,
    /// Which audit events go to the database (events.rs).
    pub event_store: EventStore,
    pub operator_keys: bool,
    pub search_path: String,
    pub max_clients: usize,
    pub rewrite_cache_capacity: usize,
    pub connect_timeout: Duration,
    pub policies: Option<PathBuf>,
    pub allow_functions: Vec<String>,
    /// Serve production keys although the upstream role is a superuser, owns a managed table or
    /// bypasses row security (see `crate::doctor::RoleAudit`). Off by default.
    pub allow_unsafe_upstream_role: bool,
    /// Session pooling of environment keys' upstream connections (`pool.rs`).
    pub pool: PoolSettings,
    /// The admin HTTP endpoint's address (`admin.rs`); `None`: off.
    pub admin_listen: Option<String>,
    pub max_connections_per_key: usize,
    pub max_rewrite_time: Duration,
    pub shutdown_timeout: Duration,
    pub timeouts: SessionTimeouts,
    /// TLS is required because the listen address is not loopback and nothing else was
    /// configured: without a certificate, the proxy makes a self-signed one at start.
    pub tls_self_signed: bool,
    /// The admin dashboard's operator token; `None`: the dashboard is refused.
    pub admin_token: Option<String>,
    /// The log filter directives in force (`logging.rs`).
    pub log_level: String,
    /// Threads of the runtime that runs sessions. One by default: a session's work per
    /// statement is a few microseconds, and with more threads than the proxy has cores of its
    /// own, waking a parked thread for each message costs more than the work (on 2 cores
    /// shared with PostgreSQL, one thread relayed ~35% more pgbench -S statements per second
    /// than two). More (0: one per core) pays once the proxy has cores of its own.
    pub worker_threads: usize,
}

/// Most threads `worker_threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 256;

/// The session runtime's thread count for a `worker_threads` setting (0: one per core).
pub fn worker_threads(setting: Option<usize>) -> Result<usize, ConfigError> {
    match setting.unwrap_or(1) {
        0 => Ok(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)),
        n if n > MAX_WORKER_THREADS => Err(ConfigError::Invalid {
            name: "worker_threads",
            reason: format!("must be at most {MAX_WORKER_THREADS} (0: one per core)"),
        }),
        n => Ok(n),
    }
}

/// The `search_path` setting, checked: a list of schema names as PostgreSQL reads it
/// (`SplitIdentifierString`: comma-separated, each double-quoted or folded to lower case), not
/// empty, and without `pg_catalog`. Environment keys' sessions put the tenant's scratch schema
/// first (`handshake::pinned_params`); a path that names `pg_catalog` would then search it after
/// the scratch schema, so a tenant's own types and operators would shadow the built-in ones the
/// rewriter's conditions name unqualified. Left out, PostgreSQL searches it before any other.
pub fn search_path(setting: Option<String>) -> Result<String, ConfigError> {
    let Some(path) = setting else { return Ok("public".to_owned()) };
    let invalid = |reason: &str| ConfigError::Invalid { name: "search_path", reason: reason.to_owned() };
    let mut rest = path.trim_start();
    if rest.is_empty() {
        return Err(invalid("must name at least one schema"));
    }
    loop {
        let name = if let Some(quoted) = rest.strip_prefix('"') {
            let mut name = String::new();
            let mut chars = quoted.char_indices();
            loop {
                match chars.next() {
                    Some((i, '"')) if quoted.get(i + 1..).is_some_and(|r| r.starts_with('"')) => {
                        name.push('"');
                        chars.next();
                    }
                    Some((i, '"')) => {
                        rest = quoted.get(i + 1..).unwrap_or_default();
                        break;
                    }
                    Some((_, c)) => name.push(c),
                    None => return Err(invalid("has an unterminated quoted name")),
                }
            }
            name
        } else {
            let end = rest.find(|c: char| c == ',' || c.is_whitespace()).unwrap_or(rest.len());
            let (name, after) = rest.split_at(end);
            rest = after;
            name.to_lowercase()
        };
        if name.is_empty() {
            return Err(invalid("has an empty schema name"));
        }
        if name == "pg_catalog" {
            return Err(invalid(
                "names pg_catalog: environment keys search their scratch schema first, so their own types \
                 and operators would shadow built-in ones; leave it out (PostgreSQL then searches it first)",
            ));
        }
        rest = rest.trim_start();
        match rest.strip_prefix(',') {
            Some(after) => rest = after.trim_start(),
            None if rest.is_empty() => return Ok(path),
            None => return Err(invalid("is not a comma-separated list of schema names")),
        }
    }
}

/// Limits on how long a client session may sit idle or a statement may run (`None`: no limit).
/// The proxy enforces them itself, so a client's own `SET statement_timeout` cannot lift them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionTimeouts {
    pub idle_session: Option<Duration>,
    pub idle_transaction: Option<Duration>,
    pub statement: Option<Duration>,
}

/// Session pooling: what to keep warm, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Idle connections kept per pool key; 0: no pooling (every session connects and closes).
    pub max_idle: usize,
    pub idle_timeout: Duration,
    /// Upstream connections busy at once across all sessions (`pool::ActiveLimit`); 0: no limit.
    pub max_active: usize,
    /// How long a session waits for its turn before it is ended.
    pub wait_timeout: Duration,
}

impl std::fmt::Debug for Settings {
    // Upstream URLs carry passwords: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("database", &self.database)
            .field("tls_mode", &self.tls_mode)
            .field("key_cache_ttl", &self.key_cache_ttl)
            .field("max_message_size", &self.max_message_size)
            .field("operator_keys", &self.operator_keys)
            .field("allow_unsafe_upstream_role", &self.allow_unsafe_upstream_role)
            .finish_non_exhaustive()
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:6432";
pub const DEFAULT_CONFIG_FILE: &str = "struere-proxy.toml";

impl Settings {
    pub fn from_raw(raw: RawConfig) -> Result<Settings, ConfigError> {
        let upstream = raw.upstream.ok_or(ConfigError::Missing("upstream"))?;
        let admin_upstream = raw.admin_upstream.unwrap_or_else(|| upstream.clone());
        let database = match raw.database {
            Some(d) => d,
            None => database_of(&upstream)?,
        };
        let listen = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        // Off loopback, plaintext is never the default: TLS is required (with a self-signed
        // certificate when none is configured) unless tls_mode says otherwise.
        let exposed = !is_loopback(&listen);
        let has_cert = raw.tls_cert.is_some() && raw.tls_key.is_some();
        let tls_mode = raw.tls_mode.unwrap_or(if exposed {
            TlsMode::Required
        } else if raw.tls_cert.is_some() {
            TlsMode::Optional
        } else {
            TlsMode::Disabled
        });
        let tls_self_signed = raw.tls_mode.is_none() && exposed && !has_cert;
        if tls_mode != TlsMode::Disabled && !has_cert && !tls_self_signed {
            return Err(ConfigError::Invalid {
                name: "tls_mode",
                reason: "TLS needs both tls_cert and tls_key".into(),
            });
        }
        let max_message_size = raw.max_message_size.unwrap_or(16 << 20);
        if !(1024..=crate::protocol::frame::MAX_PROTOCOL_MESSAGE).contains(&max_message_size) {
            return Err(ConfigError::Invalid {
                name: "max_message_size",
                reason: "must be between 1 KiB and 1 GiB".into(),
            });
        }
        let ttl = raw.key_cache_ttl_secs.unwrap_or(5);
        if ttl == 0 || ttl > 3600 {
            return Err(ConfigError::Invalid {
                name: "key_cache_ttl_secs",
                reason: "must be between 1 and 3600 seconds".into(),
            });
        }
        if let Some(token) = &raw.admin_token
            && (token.len() < MIN_ADMIN_TOKEN || token.len() > 512 || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ConfigError::Invalid {
                name: "admin_token",
                reason: format!("must be {MIN_ADMIN_TOKEN} to 512 printable ASCII characters without spaces"),
            });
        }
        let log_level = raw.log_level.unwrap_or_else(|| "info".to_owned());
        if let Err(reason) = crate::logging::parse_filter(&log_level) {
            return Err(ConfigError::Invalid { name: "log_level", reason });
        }
        let worker_threads = worker_threads(raw.worker_threads)?;
        Ok(Settings {
            worker_threads,
            listen,
            upstream,
            admin_upstream,
            database,
            tls_mode,
            tls_cert: raw.tls_cert,
            tls_key: raw.tls_key,
            key_cache_ttl: Duration::from_secs(ttl),
            max_message_size,
            log_format: raw.log_format.unwrap_or(LogFormat::Text),
            event_store: raw.event_store.unwrap_or(EventStore::All),
            operator_keys: raw.operator_keys.unwrap_or(false),
            search_path: search_path(raw.search_path)?,
            max_clients: raw.max_clients.unwrap_or(1000).max(1),
            rewrite_cache_capacity: raw.rewrite_cache_capacity.unwrap_or(10_000),
            connect_timeout: Duration::from_secs(raw.connect_timeout_secs.unwrap_or(10).max(1)),
            policies: raw.policies,
            allow_functions: raw.allow_functions.unwrap_or_default(),
            allow_unsafe_upstream_role: raw.allow_unsafe_upstream_role.unwrap_or(false),
            pool: PoolSettings {
                max_idle: raw.pool_max_idle.unwrap_or(32),
                idle_timeout: Duration::from_secs(raw.pool_idle_timeout_secs.unwrap_or(300).max(1)),
                max_active: raw.pool_max_active.unwrap_or(0),
                // PgBouncer's query_wait_timeout.
                wait_timeout: Duration::from_secs(raw.pool_wait_timeout_secs.unwrap_or(120).max(1)),
            },
            admin_listen: raw.admin_listen,
            max_connections_per_key: raw.max_connections_per_key.unwrap_or(100).max(1),
            max_rewrite_time: Duration::from_millis(raw.max_rewrite_ms.unwrap_or(2_000).max(1)),
            shutdown_timeout: Duration::from_secs(raw.shutdown_timeout_secs.unwrap_or(30)),
            timeouts: SessionTimeouts {
                idle_session: raw.idle_session_timeout_secs.filter(|&n| n > 0).map(Duration::from_secs),
                idle_transaction: raw.idle_transaction_timeout_secs.filter(|&n| n > 0).map(Duration::from_secs),
                statement: raw.statement_timeout_ms.filter(|&n| n > 0).map(Duration::from_millis),
            },
            tls_self_signed,
            admin_token: raw.admin_token,
            log_level,
        })
    }

    /// What differs in `new`, setting by setting: whether it applies to a running proxy
    /// (`reload`) or needs a restart. Secrets (URLs with passwords, the admin token) are named,
    /// never shown.
    pub fn changes_to(&self, new: &Settings) -> Vec<SettingChange> {
        let mut out = Vec::new();
        macro_rules! shown {
            ($live:expr, $($field:ident),+) => {$(
                if self.$field != new.$field {
                    out.push(SettingChange {
                        name: stringify!($field),
                        live: $live,
                        detail: format!("{:?} -> {:?}", self.$field, new.$field),
                    });
                }
            )+};
        }
        macro_rules! hidden {
            ($live:expr, $($field:ident),+) => {$(
                if self.$field != new.$field {
                    out.push(SettingChange { name: stringify!($field), live: $live, detail: "(value not shown)".into() });
                }
            )+};
        }
        // Keep in step with `with_live_from`.
        hidden!(true, admin_token);
        shown!(
            true,
            log_level,
            key_cache_ttl,
            max_clients,
            max_connections_per_key,
            max_message_size,
            connect_timeout,
            shutdown_timeout,
            timeouts,
            operator_keys,
            allow_unsafe_upstream_role,
            allow_functions
        );
        hidden!(false, upstream, admin_upstream);
        shown!(
            false,
            listen,
            database,
            tls_mode,
            tls_cert,
            tls_key,
            log_format,
            event_store,
            search_path,
            rewrite_cache_capacity,
            policies,
            pool,
            admin_listen,
            max_rewrite_time,
            worker_threads
        );
        out
    }

    /// `self` with the settings of `new` that a running proxy can take on (see `changes_to`);
    /// the others keep their values until a restart.
    pub fn with_live_from(&self, new: &Settings) -> Settings {
        Settings {
            admin_token: new.admin_token.clone(),
            log_level: new.log_level.clone(),
            key_cache_ttl: new.key_cache_ttl,
            max_clients: new.max_clients,
            max_connections_per_key: new.max_connections_per_key,
            max_message_size: new.max_message_size,
            connect_timeout: new.connect_timeout,
            shutdown_timeout: new.shutdown_timeout,
            timeouts: new.timeouts,
            operator_keys: new.operator_keys,
            allow_unsafe_upstream_role: new.allow_unsafe_upstream_role,
            allow_functions: new.allow_functions.clone(),
            ..self.clone()
        }
    }
}

/// Where a reload reads the configuration again (the file, the environment and the flags the
/// process was started with, layered as at start).
pub type ConfigSource = std::sync::Arc<dyn Fn() -> Result<RawConfig, ConfigError> + Send + Sync>;

/// Shortest admin token accepted.
pub const MIN_ADMIN_TOKEN: usize = 16;

/// One setting that differs between two configurations (`Settings::changes_to`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingChange {
    pub name: &'static str,
    /// Applied by a reload; otherwise it needs a restart.
    pub live: bool,
    pub detail: String,
}

impl std::fmt::Display for SettingChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.live { "applied" } else { "needs a restart" };
        write!(f, "{}: {} ({what})", self.name, self.detail)
    }
}

/// Whether a listen address only accepts local connections (`127.0.0.1:…`, `[::1]:…`,
/// `localhost:…`). Anything else, `0.0.0.0` included, is exposed.
pub fn is_loopback(listen: &str) -> bool {
    let host = match listen.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => listen,
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn database_of(url: &str) -> Result<String, ConfigError> {
    let cfg: tokio_postgres::Config =
        url.parse().map_err(|e| ConfigError::Invalid { name: "upstream", reason: format!("{e}") })?;
    Ok(cfg.get_dbname().or(cfg.get_user()).unwrap_or("postgres").to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_in_order() {
        let file: RawConfig = toml::from_str(
            r#"
            listen = "0.0.0.0:7000"
            upstream = "postgres://app:pw@db:5432/appdb"
            key_cache_ttl_secs = 30
            allow_unsafe_upstream_role = false
            "#,
        )
        .unwrap();
        let env = RawConfig { listen: Some("127.0.0.1:7001".into()), ..Default::default() };
        let s = Settings::from_raw(file.overlay(env)).unwrap();
        assert_eq!(s.listen, "127.0.0.1:7001");
        assert_eq!(s.database, "appdb");
        assert_eq!(s.key_cache_ttl, Duration::from_secs(30));
        assert_eq!(s.admin_upstream, s.upstream);
        assert!(!s.operator_keys);
        assert!(!s.allow_unsafe_upstream_role, "production keys are refused on an unsafe role by default");
        assert!(!format!("{s:?}").contains("pw"));
    }

    #[test]
    fn search_path_is_a_list_of_schemas_without_pg_catalog() {
        for ok in ["public", "app, public", " \"My Schema\" ,public", "\"a\"\"b\"", "$user, public", "pg_temp, public"]
        {
            assert_eq!(search_path(Some(ok.to_owned())).unwrap(), ok);
        }
        assert_eq!(search_path(None).unwrap(), "public");
        for bad in [
            "",
            "  ",
            "public,",
            ",public",
            "a,,b",
            "a b",
            "\"unterminated",
            "\"\"",
            "public, pg_catalog",
            "PG_Catalog",
            "\"pg_catalog\"",
        ] {
            assert!(
                matches!(search_path(Some(bad.to_owned())), Err(ConfigError::Invalid { name: "search_path", .. })),
                "{bad:?}"
            );
        }
        // Quoted, case is kept: another schema.
        assert!(search_path(Some("\"PG_CATALOG\"".to_owned())).is_ok());
    }

    #[test]
    fn tls_is_required_off_loopback_unless_configured() {
        let base = RawConfig { upstream: Some("postgres://a@h/db".into()), ..Default::default() };
        let local = Settings::from_raw(base.clone()).unwrap();
        assert_eq!((local.tls_mode, local.tls_self_signed), (TlsMode::Disabled, false));
        let exposed = Settings::from_raw(RawConfig { listen: Some("0.0.0.0:6432".into()), ..base.clone() }).unwrap();
        assert_eq!((exposed.tls_mode, exposed.tls_self_signed), (TlsMode::Required, true));
        let v6 = Settings::from_raw(RawConfig { listen: Some("[::1]:6432".into()), ..base.clone() }).unwrap();
        assert_eq!(v6.tls_mode, TlsMode::Disabled);
        let explicit = RawConfig { listen: Some("10.0.0.5:6432".into()), tls_mode: Some(TlsMode::Disabled), ..base };
        assert_eq!(Settings::from_raw(explicit).unwrap().tls_mode, TlsMode::Disabled, "an explicit choice stands");
        for (addr, local) in [("127.0.0.1:1", true), ("localhost:5", true), ("0.0.0.0:1", false), ("[::]:1", false)] {
            assert_eq!(is_loopback(addr), local, "{addr}");
        }
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Settings::from_raw(RawConfig::default()).is_err());
        let base = RawConfig { upstream: Some("postgres://a@h/db".into()), ..Default::default() };
        let no_key = RawConfig { tls_mode: Some(TlsMode::Required), ..base.clone() };
        assert!(Settings::from_raw(no_key).is_err());
        let tiny = RawConfig { max_message_size: Some(10), ..base.clone() };
        assert!(Settings::from_raw(tiny).is_err());
        assert!(toml::from_str::<RawConfig>("lisen = 1").is_err());
        for bad_token in ["short", "has a space in it here", "tab\there-0123456789"] {
            let raw = RawConfig { admin_token: Some(bad_token.into()), ..base.clone() };
            assert!(Settings::from_raw(raw).is_err(), "{bad_token:?}");
        }
        let bad_level = RawConfig { log_level: Some("info,=[".into()), ..base };
        assert!(Settings::from_raw(bad_level).is_err());
    }

    #[test]
    fn reload_tells_live_settings_from_restart_ones_and_hides_secrets() {
        let base = RawConfig {
            upstream: Some("postgres://a:pw1@h/db".into()),
            admin_token: Some("old-token-0123456789".into()),
            ..Default::default()
        };
        let old = Settings::from_raw(base.clone()).unwrap();
        let new = Settings::from_raw(RawConfig {
            upstream: Some("postgres://a:pw2@h/db".into()),
            admin_token: Some("new-token-0123456789".into()),
            listen: Some("127.0.0.1:7777".into()),
            max_clients: Some(7),
            log_level: Some("debug".into()),
            pool_max_idle: Some(3),
            ..base
        })
        .unwrap();
        let changes = old.changes_to(&new);
        let names = |live: bool| changes.iter().filter(|c| c.live == live).map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(names(true), ["admin_token", "log_level", "max_clients"]);
        // admin_upstream follows upstream when unset.
        assert_eq!(names(false), ["upstream", "admin_upstream", "listen", "pool"]);
        let text = changes.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(!text.contains("pw2") && !text.contains("new-token"), "{text}");
        assert!(text.contains("max_clients: 1000 -> 7 (applied)"), "{text}");
        // What a reload puts in force: exactly the live changes; the rest waits for a restart.
        let applied = old.with_live_from(&new);
        let left = applied.changes_to(&new);
        assert!(left.iter().all(|c| !c.live), "{left:?}");
        assert_eq!(left.len(), names(false).len());
        assert_eq!(applied.listen, old.listen);
        assert!(!format!("{applied:?}").contains("token"));
    }

    #[test]
    fn worker_threads_default_to_one_and_zero_means_one_per_core() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(worker_threads(None).unwrap(), 1);
        assert_eq!(worker_threads(Some(3)).unwrap(), 3);
        assert_eq!(worker_threads(Some(0)).unwrap(), cores);
        assert!(worker_threads(Some(MAX_WORKER_THREADS + 1)).is_err());
    }
}
