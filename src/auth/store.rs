//! The key store: a table in the proxy's own schema in the upstream database, read through the
//! owner (admin) connection and cached with a bounded TTL.
//!
//! Positive and negative lookups are both cached, so a flood of wrong keys does not become a
//! flood of queries, and a revocation takes effect on every proxy within the TTL (immediately on
//! the proxy that revoked it, which invalidates its own entry).
//!
//! Invariant: a revoked or expired key stops authenticating, and ends its open sessions, within the cache TTL; lookups
//! go only through the owner connection, never the environment keys' role.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use thiserror::Error;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use super::api_key::{self, KeyHash};
use super::identity::{ActorContext, ActorType, Caller, Environment};

/// The proxy's own schema. Never reachable through an environment key.
pub const PROXY_SCHEMA: &str = "struere";

/// Idempotent DDL run by `init`.
pub const INIT_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS struere;
REVOKE ALL ON SCHEMA struere FROM PUBLIC;
CREATE TABLE IF NOT EXISTS struere.api_keys (
    id              bigserial PRIMARY KEY,
    key_hash        bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    prefix          text NOT NULL,
    name            text NOT NULL,
    operator        boolean NOT NULL DEFAULT false,
    organization_id text,
    environment     text CHECK (environment IN ('development', 'production')),
    roles           text[] NOT NULL DEFAULT '{}',
    actor_type      text CHECK (actor_type IN ('user', 'agent', 'system', 'webhook')),
    actor_id        text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    revoked_at      timestamptz,
    last_used_at    timestamptz,
    CONSTRAINT environment_keys_are_bound CHECK (
        operator OR (organization_id IS NOT NULL AND environment IS NOT NULL
                     AND actor_type IS NOT NULL AND actor_id IS NOT NULL)),
    CONSTRAINT operator_keys_are_unbound CHECK (
        NOT operator OR (organization_id IS NULL AND environment IS NULL))
);
-- Statement decisions (events.rs), per environment ('operator' for operator keys).
CREATE TABLE IF NOT EXISTS struere.events (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL,
    environment     text NOT NULL CHECK (environment IN ('development', 'production', 'operator')),
    organization_id text,
    key_prefix      text NOT NULL,
    actor           text,
    roles           text[] NOT NULL DEFAULT '{}',
    kinds           text[] NOT NULL DEFAULT '{}',
    tables          text[] NOT NULL DEFAULT '{}',
    verdict         text NOT NULL CHECK (verdict IN ('allowed', 'rewritten', 'refused')),
    reason          text,
    sqlstate        text,
    policy_version  text,
    sql_hash        text,
    rows            bigint NOT NULL DEFAULT 0,
    duration_us     bigint NOT NULL DEFAULT 0
);
-- One row holds `statements` identical decisions of one flush, from `at` to `last_at`.
ALTER TABLE struere.events ADD COLUMN IF NOT EXISTS statements bigint NOT NULL DEFAULT 1;
ALTER TABLE struere.events ADD COLUMN IF NOT EXISTS last_at timestamptz;
CREATE INDEX IF NOT EXISTS events_env_at ON struere.events (environment, at);
-- Executions per key, environment and organization (cumulative).
CREATE TABLE IF NOT EXISTS struere.usage (
    key_prefix      text NOT NULL,
    environment     text NOT NULL,
    organization_id text NOT NULL,
    statements      bigint NOT NULL DEFAULT 0,
    rows            bigint NOT NULL DEFAULT 0,
    errors          bigint NOT NULL DEFAULT 0,
    time_us         bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_prefix, environment, organization_id)
);
-- Deployed policy bundles (policy/store.rs): one history per environment, the newest version
-- in force. Rows are only ever added (a rollback adds a copy of an older bundle).
CREATE TABLE IF NOT EXISTS struere.policy_versions (
    environment     text NOT NULL CHECK (environment IN ('development', 'production')),
    version         integer NOT NULL CHECK (version > 0),
    content_hash    text NOT NULL,
    files           jsonb NOT NULL,
    source          text NOT NULL,
    deployed_by     text NOT NULL,
    deployed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (environment, version)
);
REVOKE ALL ON ALL TABLES IN SCHEMA struere FROM PUBLIC;
"#;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("key store unavailable: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("key store row is invalid: {0}")]
    BadRow(String),
    #[error("cannot generate a key: {0}")]
    Random(String),
}

/// One stored key, as the proxy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: i64,
    pub prefix: String,
    pub name: String,
    pub caller: Caller,
    pub expires_at: Option<SystemTime>,
    pub revoked: bool,
}

/// The outcome of presenting a key. The three failures are told apart only in logs: the client
/// gets the same 28P01 for each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStatus {
    Valid(Arc<KeyRecord>),
    Unknown,
    Revoked,
    Expired,
}

impl KeyStatus {
    pub fn reason(&self) -> &'static str {
        match self {
            KeyStatus::Valid(_) => "valid",
            KeyStatus::Unknown => "unknown key",
            KeyStatus::Revoked => "revoked key",
            KeyStatus::Expired => "expired key",
        }
    }
}

fn evaluate(record: Option<&Arc<KeyRecord>>, now: SystemTime) -> KeyStatus {
    match record {
        None => KeyStatus::Unknown,
        Some(r) if r.revoked => KeyStatus::Revoked,
        Some(r) if r.expires_at.is_some_and(|e| e <= now) => KeyStatus::Expired,
        Some(r) => KeyStatus::Valid(Arc::clone(r)),
    }
}

/// A lazily (re)connected owner connection. tokio-postgres pipelines concurrent queries on one
/// connection, which is plenty for key lookups that are mostly cache hits.
pub struct AdminDb {
    url: String,
    client: Mutex<Option<Arc<Client>>>,
}

impl AdminDb {
    pub fn new(url: String) -> AdminDb {
        AdminDb { url, client: Mutex::new(None) }
    }

    pub async fn client(&self) -> Result<Arc<Client>, tokio_postgres::Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(c));
        }
        let client = Arc::new(connect_admin(&self.url).await?);
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }
}

/// Connect with tokio-postgres and drive the connection on a background task.
pub async fn connect_admin(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "admin connection closed");
        }
    });
    Ok(client)
}

struct Cached {
    record: Option<Arc<KeyRecord>>,
    fetched: Instant,
}

/// Cache entries beyond this many are pruned (expired first, then everything).
const MAX_CACHE_ENTRIES: usize = 100_000;

pub struct KeyStore {
    db: AdminDb,
    cache: DashMap<KeyHash, Cached>,
    /// The cache TTL in milliseconds (a reload may change it).
    ttl_ms: std::sync::atomic::AtomicU64,
}

impl KeyStore {
    pub fn new(admin_url: String, ttl: Duration) -> KeyStore {
        let ttl_ms = std::sync::atomic::AtomicU64::new(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        KeyStore { db: AdminDb::new(admin_url), cache: DashMap::new(), ttl_ms }
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// A new TTL for lookups from now on (`key_cache_ttl_secs` reloaded).
    pub fn set_ttl(&self, ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.ttl_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn admin(&self) -> &AdminDb {
        &self.db
    }

    /// Resolve a key hash, from the cache while it is fresh, else from the table.
    pub async fn lookup(&self, hash: &KeyHash) -> Result<KeyStatus, StoreError> {
        let now = SystemTime::now();
        let ttl = self.ttl();
        if let Some(c) = self.cache.get(hash).filter(|c| c.fetched.elapsed() < ttl) {
            return Ok(evaluate(c.record.as_ref(), now));
        }
        let record = self.fetch(hash).await?.map(Arc::new);
        if self.cache.len() >= MAX_CACHE_ENTRIES {
            self.cache.retain(|_, c| c.fetched.elapsed() < ttl);
        }
        let status = evaluate(record.as_ref(), now);
        self.cache.insert(*hash, Cached { record, fetched: Instant::now() });
        Ok(status)
    }

    /// Forget a cached entry so the next lookup reads the table (used after a local revoke).
    pub fn invalidate(&self, hash: &KeyHash) {
        self.cache.remove(hash);
    }

    /// Forget every cached entry.
    pub fn invalidate_all(&self) {
        self.cache.clear();
    }

    async fn fetch(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let client = self.db.client().await?;
        let row = client
            .query_opt(
                "SELECT id, prefix, name, operator, organization_id, environment, roles, actor_type, \
                 actor_id, expires_at, revoked_at IS NOT NULL \
                 FROM struere.api_keys WHERE key_hash = $1",
                &[&&hash.0[..]],
            )
            .await?;
        row.map(|r| record_from_row(&r)).transpose()
    }

    /// Stamp `last_used_at`; best effort, never on the authentication path's critical section.
    pub fn touch(self: &Arc<Self>, id: i64) {
        let store = Arc::clone(self);
        tokio::spawn(async move {
            if let Ok(c) = store.db.client().await {
                let _ = c.execute("UPDATE struere.api_keys SET last_used_at = now() WHERE id = $1", &[&id]).await;
            }
        });
    }
}

fn record_from_row(r: &tokio_postgres::Row) -> Result<KeyRecord, StoreError> {
    let operator: bool = r.try_get(3)?;
    let caller = if operator {
        Caller::Operator
    } else {
        let org: Option<String> = r.try_get(4)?;
        let env: Option<String> = r.try_get(5)?;
        let actor_type: Option<String> = r.try_get(7)?;
        let actor_id: Option<String> = r.try_get(8)?;
        let bad = |what: &str| StoreError::BadRow(format!("environment key without {what}"));
        Caller::Environment(ActorContext {
            organization: org.ok_or_else(|| bad("organization"))?,
            environment: env.ok_or_else(|| bad("environment"))?.parse::<Environment>().map_err(StoreError::BadRow)?,
            roles: r.try_get(6)?,
            actor_type: actor_type
                .ok_or_else(|| bad("actor type"))?
                .parse::<ActorType>()
                .map_err(StoreError::BadRow)?,
            actor_id: actor_id.ok_or_else(|| bad("actor id"))?,
        })
    };
    Ok(KeyRecord {
        id: r.try_get(0)?,
        prefix: r.try_get(1)?,
        name: r.try_get(2)?,
        caller,
        expires_at: r.try_get(9)?,
        revoked: r.try_get(10)?,
    })
}

/// What `keys create` asks for.
#[derive(Debug, Clone)]
pub struct KeySpec {
    pub name: String,
    /// `None` makes an operator key.
    pub actor: Option<ActorContext>,
    pub expires_in: Option<Duration>,
}

/// Create the proxy schema (idempotent).
pub async fn init_schema(client: &Client) -> Result<(), StoreError> {
    client.batch_execute(INIT_SQL).await?;
    Ok(())
}

/// Insert a new key and return its secret (shown once, never stored).
pub async fn create_key(client: &Client, spec: &KeySpec) -> Result<api_key::NewKey, StoreError> {
    let env = spec.actor.as_ref().map(|a| a.environment);
    let key = api_key::generate(env).map_err(|e| StoreError::Random(e.to_string()))?;
    let expires_at = spec.expires_in.map(|d| SystemTime::now() + d);
    let (org, env, roles, actor_type, actor_id) = match &spec.actor {
        Some(a) => (
            Some(a.organization.as_str()),
            Some(a.environment.as_str()),
            a.roles.clone(),
            Some(a.actor_type.as_str()),
            Some(a.actor_id.as_str()),
        ),
        None => (None, None, Vec::new(), None, None),
    };
    client
        .execute(
            "INSERT INTO struere.api_keys (key_hash, prefix, name, operator, organization_id, \
             environment, roles, actor_type, actor_id, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                &&key.hash.0[..],
                &key.display_prefix,
                &spec.name,
                &spec.actor.is_none(),
                &org,
                &env,
                &roles,
                &actor_type,
                &actor_id,
                &expires_at,
            ],
        )
        .await?;
    Ok(key)
}

/// One row of `keys list` (no secret, no hash).
#[derive(Debug, Clone)]
pub struct KeyListing {
    pub id: i64,
    pub prefix: String,
    pub name: String,
    pub operator: bool,
    pub organization: Option<String>,
    pub environment: Option<String>,
    pub roles: Vec<String>,
    pub actor: Option<String>,
    pub created_at: SystemTime,
    pub expires_at: Option<SystemTime>,
    pub revoked_at: Option<SystemTime>,
    pub last_used_at: Option<SystemTime>,
}

impl KeyListing {
    /// `active`, `revoked` or `expired` at `now`.
    pub fn state(&self, now: SystemTime) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        }
    }
}

pub async fn list_keys(client: &Client) -> Result<Vec<KeyListing>, StoreError> {
    let rows = client
        .query(
            "SELECT id, prefix, name, operator, organization_id, environment, roles, \
             actor_type || ':' || actor_id, created_at, expires_at, revoked_at, last_used_at \
             FROM struere.api_keys ORDER BY id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(KeyListing {
                id: r.try_get(0)?,
                prefix: r.try_get(1)?,
                name: r.try_get(2)?,
                operator: r.try_get(3)?,
                organization: r.try_get(4)?,
                environment: r.try_get(5)?,
                roles: r.try_get(6)?,
                actor: r.try_get(7)?,
                created_at: r.try_get(8)?,
                expires_at: r.try_get(9)?,
                revoked_at: r.try_get(10)?,
                last_used_at: r.try_get(11)?,
            })
        })
        .collect()
}

/// Revoke keys by id, display prefix or name. Returns how many were revoked now.
pub async fn revoke_key(client: &Client, selector: &str) -> Result<u64, StoreError> {
    let id: Option<i64> = selector.parse().ok();
    Ok(client
        .execute(
            "UPDATE struere.api_keys SET revoked_at = now() \
             WHERE revoked_at IS NULL AND (id = $1 OR prefix = $2 OR name = $2)",
            &[&id, &selector],
        )
        .await?)
}

/// Revoke the key with this id (the dashboard's action). Returns whether it was active.
pub async fn revoke_id(client: &Client, id: i64) -> Result<bool, StoreError> {
    let n = client
        .execute("UPDATE struere.api_keys SET revoked_at = now() WHERE revoked_at IS NULL AND id = $1", &[&id])
        .await?;
    Ok(n > 0)
}

/// Revoke exactly the keys with these hashes (what a process that created them, like the demo,
/// knows of them). Returns how many were active.
pub async fn revoke_hashes(client: &Client, hashes: &[KeyHash]) -> Result<u64, StoreError> {
    let bytes: Vec<&[u8]> = hashes.iter().map(|h| h.0.as_slice()).collect();
    Ok(client
        .execute(
            "UPDATE struere.api_keys SET revoked_at = now() WHERE revoked_at IS NULL AND key_hash = ANY($1)",
            &[&bytes],
        )
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(revoked: bool, expires_at: Option<SystemTime>) -> Arc<KeyRecord> {
        Arc::new(KeyRecord {
            id: 1,
            prefix: "sk_dev_abcdef".into(),
            name: "t".into(),
            caller: Caller::Operator,
            expires_at,
            revoked,
        })
    }

    #[test]
    fn evaluation_order() {
        let now = SystemTime::now();
        assert_eq!(evaluate(None, now), KeyStatus::Unknown);
        assert_eq!(evaluate(Some(&record(true, None)), now), KeyStatus::Revoked);
        let past = now - Duration::from_secs(1);
        assert_eq!(evaluate(Some(&record(false, Some(past))), now), KeyStatus::Expired);
        let future = now + Duration::from_secs(60);
        assert!(matches!(evaluate(Some(&record(false, Some(future))), now), KeyStatus::Valid(_)));
    }
}
