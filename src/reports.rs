//! Reading the audit trail back: recent events (`events tail`, the dashboard) and usage
//! (`usage`, the dashboard), one query each, shared by both.
//!
//! Invariant: what is read here is what `events.rs` wrote — decisions, key display prefixes,
//! reasons — never a statement's text or a row value.

use tokio_postgres::Client;

/// Which events to read.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only events with an id above this (for `--follow`).
    pub after_id: i64,
    pub environment: Option<String>,
    pub organization: Option<String>,
    pub verdict: Option<String>,
    pub limit: i64,
}

/// One stored event, as text (times in UTC, ISO 8601; arrays comma-joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub id: i64,
    pub at: String,
    pub environment: String,
    pub organization: String,
    pub key_prefix: String,
    pub actor: String,
    pub roles: String,
    pub kinds: String,
    pub tables: String,
    pub verdict: String,
    pub reason: String,
    pub sqlstate: String,
    pub policy_version: String,
    pub sql_hash: String,
    pub rows: i64,
    pub duration_us: i64,
    /// Identical decisions this row holds (events.rs aggregates them per flush).
    pub statements: i64,
}

const EVENTS_SQL: &str = "\
SELECT id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), environment, \
       coalesce(organization_id, ''), key_prefix, coalesce(actor, ''), array_to_string(roles, ','), \
       array_to_string(kinds, ','), array_to_string(tables, ','), verdict, coalesce(reason, ''), \
       coalesce(sqlstate, ''), coalesce(policy_version, ''), coalesce(sql_hash, ''), rows, duration_us, statements \
FROM struere.events \
WHERE id > $1 AND ($2::text IS NULL OR environment = $2) AND ($3::text IS NULL OR organization_id = $3) \
  AND ($4::text IS NULL OR verdict = $4) \
ORDER BY id DESC LIMIT $5";

/// The newest events matching `filter`, newest first.
pub async fn recent_events(client: &Client, filter: &EventFilter) -> Result<Vec<EventRow>, tokio_postgres::Error> {
    let rows = client
        .query(
            EVENTS_SQL,
            &[&filter.after_id, &filter.environment, &filter.organization, &filter.verdict, &filter.limit.max(0)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(EventRow {
                id: r.try_get(0)?,
                at: r.try_get(1)?,
                environment: r.try_get(2)?,
                organization: r.try_get(3)?,
                key_prefix: r.try_get(4)?,
                actor: r.try_get(5)?,
                roles: r.try_get(6)?,
                kinds: r.try_get(7)?,
                tables: r.try_get(8)?,
                verdict: r.try_get(9)?,
                reason: r.try_get(10)?,
                sqlstate: r.try_get(11)?,
                policy_version: r.try_get(12)?,
                sql_hash: r.try_get(13)?,
                rows: r.try_get(14)?,
                duration_us: r.try_get(15)?,
                statements: r.try_get(16)?,
            })
        })
        .collect()
}

/// Cumulative executions of one key (or, `per_organization`, one organization) in one
/// environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub environment: String,
    pub organization: String,
    /// Empty when summed per organization.
    pub key_prefix: String,
    pub statements: i64,
    pub rows: i64,
    pub errors: i64,
    pub time_us: i64,
}

/// Usage in `env` (all environments when `None`), per key, or summed per organization.
pub async fn usage(
    client: &Client,
    env: Option<&str>,
    per_organization: bool,
) -> Result<Vec<UsageRow>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT environment, organization_id, CASE WHEN $2 THEN '' ELSE key_prefix END AS key, \
                    sum(statements)::int8, sum(rows)::int8, sum(errors)::int8, sum(time_us)::int8 \
             FROM struere.usage WHERE $1::text IS NULL OR environment = $1 \
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            &[&env, &per_organization],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(UsageRow {
                environment: r.try_get(0)?,
                organization: r.try_get(1)?,
                key_prefix: r.try_get(2)?,
                statements: r.try_get(3)?,
                rows: r.try_get(4)?,
                errors: r.try_get(5)?,
                time_us: r.try_get(6)?,
            })
        })
        .collect()
}
