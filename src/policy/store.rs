//! Deployed policy bundles in the upstream database (`struere.policy_versions`): one append-only
//! history per environment whose newest row is in force. Publishing a version and notifying
//! every proxy (`NOTIFY struere_policy`) happen in one transaction, so a proxy never hears of a
//! version it cannot read yet, and a failed publish tells nobody.

use tokio_postgres::Client;

use super::bundle::{Bundle, DeployedBundle};
use crate::auth::identity::Environment;

/// The channel proxies LISTEN on; the payload is `<environment> <version>`.
pub const CHANNEL: &str = "struere_policy";

#[derive(Debug, thiserror::Error)]
pub enum PolicyStoreError {
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error("stored policy bundle {environment} v{version} is not a set of policy files")]
    Corrupt { environment: String, version: i32 },
    #[error("unknown environment {0:?} in struere.policy_versions")]
    Environment(String),
}

/// One row of an environment's history (without the files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub environment: Environment,
    pub version: i32,
    pub content_hash: String,
    pub source: String,
    pub deployed_by: String,
    /// UTC, ISO 8601.
    pub deployed_at: String,
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// A new version is in force.
    New(i32),
    /// The newest version already holds exactly this bundle: nothing was written.
    Unchanged(i32),
}

impl Published {
    pub fn version(&self) -> i32 {
        match self {
            Published::New(v) | Published::Unchanged(v) => *v,
        }
    }
}

/// `files` is read as text (`files::text`) and parsed here.
fn bundle_of(environment: Environment, version: i32, files: &str) -> Result<DeployedBundle, PolicyStoreError> {
    let bundle = serde_json::from_str(files)
        .ok()
        .and_then(|v| Bundle::from_json(&v))
        .ok_or_else(|| PolicyStoreError::Corrupt { environment: environment.as_str().to_owned(), version })?;
    Ok(DeployedBundle { environment, version, bundle })
}

/// The bundle in force for `env` (its newest version), if any was ever deployed.
pub async fn latest(client: &Client, env: Environment) -> Result<Option<DeployedBundle>, PolicyStoreError> {
    let row = client
        .query_opt(
            "SELECT version, files::text FROM struere.policy_versions WHERE environment = $1 ORDER BY version DESC LIMIT 1",
            &[&env.as_str()],
        )
        .await?;
    row.map(|r| bundle_of(env, r.try_get(0)?, r.try_get(1)?)).transpose()
}

/// One version of `env`'s history.
pub async fn version(client: &Client, env: Environment, v: i32) -> Result<Option<DeployedBundle>, PolicyStoreError> {
    let row = client
        .query_opt(
            "SELECT files::text FROM struere.policy_versions WHERE environment = $1 AND version = $2",
            &[&env.as_str(), &v],
        )
        .await?;
    row.map(|r| bundle_of(env, v, r.try_get(0)?)).transpose()
}

/// The history of one environment or both, newest first.
pub async fn history(client: &Client, env: Option<Environment>) -> Result<Vec<VersionInfo>, PolicyStoreError> {
    let rows = client
        .query(
            "SELECT environment, version, content_hash, source, deployed_by, \
                    to_char(deployed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
             FROM struere.policy_versions WHERE $1::text IS NULL OR environment = $1 \
             ORDER BY environment, version DESC",
            &[&env.map(|e| e.as_str())],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let env: String = r.try_get(0)?;
            Ok(VersionInfo {
                environment: env.parse().map_err(|_| PolicyStoreError::Environment(env.clone()))?,
                version: r.try_get(1)?,
                content_hash: r.try_get(2)?,
                source: r.try_get(3)?,
                deployed_by: r.try_get(4)?,
                deployed_at: r.try_get(5)?,
            })
        })
        .collect()
}

/// Make `bundle` the version in force for `env` and tell every proxy, atomically. Publishing
/// the bundle already in force writes nothing. Concurrent publishes are serialised.
pub async fn publish(
    client: &mut Client,
    env: Environment,
    bundle: &Bundle,
    source: &str,
    deployed_by: &str,
) -> Result<Published, PolicyStoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('struere.policy_versions'))", &[]).await?;
    let hash = bundle.hash();
    let newest = tx
        .query_opt(
            "SELECT version, content_hash FROM struere.policy_versions WHERE environment = $1 \
             ORDER BY version DESC LIMIT 1",
            &[&env.as_str()],
        )
        .await?;
    let next = match newest {
        Some(r) => {
            let (v, h): (i32, String) = (r.try_get(0)?, r.try_get(1)?);
            if h == hash {
                return Ok(Published::Unchanged(v));
            }
            v + 1
        }
        None => 1,
    };
    tx.execute(
        "INSERT INTO struere.policy_versions (environment, version, content_hash, files, source, deployed_by) \
         VALUES ($1, $2, $3, $4::text::jsonb, $5, $6)",
        &[&env.as_str(), &next, &hash, &bundle.to_json().to_string(), &source, &deployed_by],
    )
    .await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &format!("{} {next}", env.as_str())]).await?;
    tx.commit().await?;
    Ok(Published::New(next))
}

/// Who is publishing, for the history: the OS user and host.
pub fn publisher() -> String {
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    match host.trim() {
        "" => user,
        host => format!("{user}@{host}"),
    }
}
