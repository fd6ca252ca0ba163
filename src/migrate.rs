//! `struere-proxy migrate add-environment`: give an existing table its environment column
//! without locking it for long, so it can become an environment-scoped managed table.
//!
//! Five steps, each skipped (and reported "already done") when the database already has what it
//! would make, so the command can be re-run after an interruption or on a finished table:
//!
//! 1. `ADD COLUMN <env> text`, nullable (no rewrite, a brief exclusive lock).
//! 2. Backfill the NULL rows with the default in batches, each its own transaction. Batches walk
//!    the heap in ranges of blocks (TID range scans), so the whole pass reads the table about
//!    once instead of rescanning the already-filled part for every batch.
//! 3. `CHECK (<env> IN ('development', 'production'))`, added `NOT VALID` and then validated
//!    (validation does not block reads or writes).
//! 4. NOT NULL, through a helper `CHECK (<env> IS NOT NULL) NOT VALID`: once it exists, no new
//!    NULL can appear; rows written with NULL since step 2 are backfilled, the helper validated,
//!    and `SET NOT NULL` then proves the column from it without a scan under the exclusive lock.
//! 5. `CREATE INDEX CONCURRENTLY` on (organization, environment) unless a valid index leads with
//!    those two columns.
//!
//! DDL waits at most `LOCK_TIMEOUT` for its lock (a long transaction on the table would otherwise
//! queue every other statement behind the waiting DDL); on a timeout, run the command again.

use std::io::Write;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::app::AppResult;
use crate::auth::identity::Environment;
use crate::doctor::{ENVIRONMENT_VALUES, IndexLead, Restriction, TableFacts, environment_check_expr, object_name};
use crate::doctor::{qualified, quote_ident};
use crate::policy::Tables;

/// How long a DDL statement waits for its table lock before giving up.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Backfill progress goes to stderr at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
const STEPS: usize = 5;

/// The table and the columns the migration works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub schema: String,
    pub name: String,
    pub environment_column: String,
    pub organization_column: String,
    /// Whether the columns came from the policy (the table is managed).
    pub managed: bool,
}

impl Target {
    /// `name` or `schema.name`. A managed table takes its schema and columns from the policy;
    /// any other table is looked up in `public` (unless qualified) with the default columns
    /// `environment` and `organization_id`.
    pub fn resolve(table: &str, tables: &Tables) -> Result<Target, String> {
        let (schema, name) = match table.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, table),
        };
        if name.is_empty() || schema.is_some_and(str::is_empty) || name.contains('.') {
            return Err(format!("invalid table {table:?}: expected name or schema.name"));
        }
        match tables.by_name.get(name).filter(|spec| schema.is_none_or(|s| s == spec.schema)) {
            Some(spec) => Ok(Target {
                schema: spec.schema.clone(),
                name: spec.name.clone(),
                environment_column: spec.environment_column.clone().unwrap_or_else(|| "environment".to_owned()),
                organization_column: spec.organization_column.clone().ok_or_else(|| {
                    format!(
                        "{}.{} has no organization column in the policy (organization_column = false); \
                         environment-scoped tables need one",
                        spec.schema, spec.name
                    )
                })?,
                managed: true,
            }),
            None => Ok(Target {
                schema: schema.unwrap_or("public").to_owned(),
                name: name.to_owned(),
                environment_column: "environment".to_owned(),
                organization_column: "organization_id".to_owned(),
                managed: false,
            }),
        }
    }

    fn subject(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// What a run changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Steps that changed something (the others were already done).
    pub steps_changed: usize,
    pub rows_updated: u64,
}

struct Migration<'a> {
    client: &'a Client,
    target: &'a Target,
    table: String,
    env: String,
    org: String,
    literal: String,
    batch_size: u32,
    out: &'a mut dyn Write,
    summary: Summary,
}

/// Run the five steps on `target`, printing one line per step to `out`.
pub async fn add_environment(
    client: &Client,
    target: &Target,
    default: Environment,
    batch_size: u32,
    out: &mut dyn Write,
) -> AppResult<Summary> {
    let mut m = Migration {
        client,
        target,
        table: qualified(&target.schema, &target.name),
        env: quote_ident(&target.environment_column),
        org: quote_ident(&target.organization_column),
        // One of two fixed names: safe to inline (and valid for text, varchar and enum columns).
        literal: format!("'{}'", default.as_str()),
        batch_size: batch_size.max(1),
        out,
        summary: Summary::default(),
    };
    m.client.batch_execute(&format!("SET lock_timeout = '{}ms'", LOCK_TIMEOUT.as_millis())).await?;
    m.preflight(default).await?;
    m.add_column().await?;
    m.backfill().await?;
    m.check().await?;
    m.not_null().await?;
    m.index().await?;
    let s = m.summary.clone();
    if s.steps_changed == 0 {
        writeln!(m.out, "done: nothing to change, every step was already done")?;
    } else {
        writeln!(
            m.out,
            "done: {} of {STEPS} steps changed the table; {} rows updated",
            s.steps_changed, s.rows_updated
        )?;
    }
    Ok(s)
}

impl Migration<'_> {
    async fn facts(&self) -> AppResult<TableFacts> {
        TableFacts::load(self.client, &self.target.schema, &self.target.name)
            .await?
            .ok_or_else(|| format!("table {} does not exist", self.target.subject()).into())
    }

    fn step(&mut self, n: usize, name: &str, what: &str, changed: bool) -> AppResult<()> {
        let done = if changed { "" } else { " — already done" };
        writeln!(self.out, "{n}/{STEPS} {name}: {what}{done}")?;
        self.summary.steps_changed += usize::from(changed);
        Ok(())
    }

    /// Everything that would make a later step fail is checked before the first change.
    async fn preflight(&mut self, default: Environment) -> AppResult<()> {
        let t = self.target;
        let subject = t.subject();
        let facts = self.facts().await?;
        if facts.kind != 'r' {
            return Err(format!("{subject} is not a plain table (relkind {})", facts.kind).into());
        }
        if facts.column(&t.organization_column).is_none() {
            return Err(format!(
                "{subject} has no organization column {:?}: add and fill it first (environment-scoped tables need both)",
                t.organization_column
            )
            .into());
        }
        if let Some(col) = facts.column(&t.environment_column) {
            if !col.string_like && col.enum_labels.is_none() {
                return Err(format!(
                    "{subject}.{} has type {}; an environment column must be text (or an enum)",
                    t.environment_column, col.type_name
                )
                .into());
            }
            if let Some(labels) = &col.enum_labels
                && !labels.iter().any(|l| l == default.as_str())
            {
                return Err(format!("the enum type {} has no label {:?}", col.type_name, default.as_str()).into());
            }
            let sql = format!(
                "SELECT count(*) FROM {} WHERE {} IS NOT NULL AND NOT ({})",
                self.table,
                self.env,
                environment_check_expr(&t.environment_column, false)
            );
            let bad: i64 = self.client.query_one(&sql, &[]).await?.try_get(0)?;
            if bad > 0 {
                return Err(format!(
                    "{bad} rows of {subject} have an environment other than {}: fix them first (nothing was changed)",
                    ENVIRONMENT_VALUES.join(" or ")
                )
                .into());
            }
        }
        writeln!(
            self.out,
            "migrate add-environment {subject}: environment column {:?}, organization column {:?}{}, default {}, \
             batches of {} rows",
            t.environment_column,
            t.organization_column,
            if t.managed { " (from the policy)" } else { "" },
            default.as_str(),
            self.batch_size
        )?;
        Ok(())
    }

    async fn add_column(&mut self) -> AppResult<()> {
        let facts = self.facts().await?;
        let name = &self.target.environment_column;
        if let Some(col) = facts.column(name) {
            return self.step(1, "column", &format!("{name:?} exists ({})", col.type_name), false);
        }
        self.client.batch_execute(&format!("ALTER TABLE {} ADD COLUMN {} text", self.table, self.env)).await?;
        self.step(1, "column", &format!("added {name:?} text (nullable)"), true)
    }

    async fn backfill(&mut self) -> AppResult<()> {
        let sql = format!("SELECT count(*), count(*) FILTER (WHERE {} IS NULL) FROM {}", self.env, self.table);
        let row = self.client.query_one(&sql, &[]).await?;
        let (total, nulls): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        if nulls == 0 {
            return self.step(2, "backfill", &format!("no NULL rows among {total}"), false);
        }
        let started = Instant::now();
        let (rows, batches) = self.backfill_by_block_ranges(total, nulls).await?;
        self.summary.rows_updated += rows;
        let what = format!(
            "set {rows} rows to {} in {batches} transactions of at most {} rows ({:.1} s; {nulls} of {total} rows \
             were NULL at the start)",
            self.literal,
            self.batch_size,
            started.elapsed().as_secs_f64()
        );
        self.step(2, "backfill", &what, true)
    }

    /// Walk the heap in ranges of blocks sized to hold about one batch, updating at most a
    /// batch of NULL rows per transaction (a range is repeated while a batch comes back full).
    /// Rows written into earlier blocks meanwhile are caught by step 4.
    async fn backfill_by_block_ranges(&mut self, total: i64, nulls: i64) -> AppResult<(u64, u64)> {
        let facts = self.facts().await?;
        let sql = "SELECT pg_relation_size(($1::oid)::regclass) / current_setting('block_size')::bigint";
        let blocks: i64 = self.client.query_one(sql, &[&facts.oid]).await?.try_get(0)?;
        let end = u64::try_from(blocks).unwrap_or(0).min(u64::from(u32::MAX));
        let total = u64::try_from(total).unwrap_or(0).max(1);
        let batch = u64::from(self.batch_size);
        let span =
            u64::try_from(u128::from(batch) * u128::from(end) / u128::from(total)).unwrap_or(end).clamp(1, end.max(1));
        let (mut rows, mut transactions, mut lo) = (0u64, 0u64, 0u64);
        let mut last_progress = Instant::now();
        while lo < end {
            let hi = (lo + span).min(u64::from(u32::MAX));
            let sql = format!(
                "UPDATE {t} SET {e} = {v} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t} WHERE ctid >= '({lo},0)'::tid \
                 AND ctid < '({hi},0)'::tid AND {e} IS NULL LIMIT {batch})) AND {e} IS NULL",
                t = self.table,
                e = self.env,
                v = self.literal,
            );
            let n = self.client.execute(&sql, &[]).await?;
            rows += n;
            transactions += 1;
            if n < batch {
                lo = hi;
            }
            if last_progress.elapsed() >= PROGRESS_EVERY {
                eprintln!("backfill: {rows} of {nulls} rows, block {lo} of {end}");
                last_progress = Instant::now();
            }
        }
        Ok((rows, transactions))
    }

    /// Batches over the whole table until no NULL row is left (step 4, after the NOT NULL
    /// helper constraint stops new ones).
    async fn backfill_remaining(&mut self) -> AppResult<u64> {
        let sql = format!(
            "UPDATE {t} SET {e} = {v} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t} WHERE {e} IS NULL LIMIT {b})) \
             AND {e} IS NULL",
            t = self.table,
            e = self.env,
            v = self.literal,
            b = self.batch_size
        );
        let mut rows = 0;
        loop {
            let n = self.client.execute(&sql, &[]).await?;
            if n == 0 {
                return Ok(rows);
            }
            rows += n;
        }
    }

    async fn check(&mut self) -> AppResult<()> {
        let facts = self.facts().await?;
        let t = self.target;
        match facts.environment_restriction(&t.environment_column) {
            Restriction::Enum { type_name } => {
                self.step(3, "check", &format!("values restricted by enum type {type_name}"), false)
            }
            Restriction::Check { name, validated: true } => {
                self.step(3, "check", &format!("values restricted by CHECK {name}"), false)
            }
            Restriction::Check { name, validated: false } => {
                self.validate(&name).await?;
                self.step(3, "check", &format!("validated the existing CHECK {name}"), true)
            }
            Restriction::None => {
                let text_typed = facts.column(&t.environment_column).is_some_and(|c| c.string_like);
                let expr = environment_check_expr(&t.environment_column, text_typed);
                let name = object_name(&format!("{}_{}", t.name, t.environment_column), "check");
                let sql = format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} CHECK ({expr}) NOT VALID",
                    self.table,
                    quote_ident(&name)
                );
                self.client.batch_execute(&sql).await?;
                self.validate(&name).await?;
                self.step(3, "check", &format!("added CHECK {name} ({expr}) NOT VALID, then validated it"), true)
            }
        }
    }

    async fn validate(&self, constraint: &str) -> AppResult<()> {
        let sql = format!("ALTER TABLE {} VALIDATE CONSTRAINT {}", self.table, quote_ident(constraint));
        Ok(self.client.batch_execute(&sql).await?)
    }

    async fn not_null(&mut self) -> AppResult<()> {
        let facts = self.facts().await?;
        let t = self.target;
        let helper = object_name(&format!("{}_{}", t.name, t.environment_column), "not_null");
        let helper_exists = facts.checks.iter().any(|c| c.name == helper);
        let drop_helper = format!("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", self.table, quote_ident(&helper));
        let not_null = facts.column(&t.environment_column).is_some_and(|c| c.not_null);
        if not_null {
            if helper_exists {
                // An earlier run stopped between SET NOT NULL and dropping its helper.
                self.client.batch_execute(&drop_helper).await?;
                return self.step(
                    4,
                    "not null",
                    &format!("NOT NULL; dropped the leftover helper CHECK {helper}"),
                    true,
                );
            }
            return self.step(4, "not null", "the column is NOT NULL", false);
        }
        if !helper_exists {
            let sql = format!(
                "ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID",
                self.table,
                quote_ident(&helper),
                self.env
            );
            self.client.batch_execute(&sql).await?;
        }
        let late = self.backfill_remaining().await?;
        self.summary.rows_updated += late;
        self.validate(&helper).await?;
        self.client
            .batch_execute(&format!("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL", self.table, self.env))
            .await?;
        self.client.batch_execute(&drop_helper).await?;
        let what = format!(
            "set NOT NULL ({late} rows written with NULL since the backfill were set first; proven by the validated \
             helper CHECK {helper}, then dropped)"
        );
        self.step(4, "not null", &what, true)
    }

    async fn index(&mut self) -> AppResult<()> {
        let facts = self.facts().await?;
        let t = self.target;
        let (org, env) = (&t.organization_column, &t.environment_column);
        if let IndexLead::Both(name) = facts.leading_index(org, env) {
            return self.step(5, "index", &format!("{name} leads with ({org}, {env})"), false);
        }
        let name = object_name(&format!("{}_{org}_{env}", t.name), "idx");
        let index = qualified(&t.schema, &name);
        let mut dropped = String::new();
        if facts.indexes.iter().any(|i| i.name == name && !i.valid) {
            // A CREATE INDEX CONCURRENTLY that failed earlier left it behind, invalid.
            self.client.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}")).await?;
            dropped = format!(" (after dropping the invalid index {name} an earlier run left)");
        }
        // A concurrent build waits for every transaction that could use the old snapshot: no
        // lock timeout here, it writes nothing until they end.
        self.client.batch_execute("SET lock_timeout = 0").await?;
        let sql = format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} ({}, {})",
            quote_ident(&name),
            self.table,
            self.org,
            self.env
        );
        let built = self.client.batch_execute(&sql).await;
        self.client.batch_execute(&format!("SET lock_timeout = '{}ms'", LOCK_TIMEOUT.as_millis())).await?;
        built?;
        if self.facts().await?.leading_index(org, env) != IndexLead::Both(name.clone()) {
            return Err(format!("index {name} exists but does not lead with ({org}, {env}): rename or drop it").into());
        }
        self.step(5, "index", &format!("created {name} on ({org}, {env}) concurrently{dropped}"), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{TableScope, TableSpec};

    fn tables() -> Tables {
        let mut t = Tables::default();
        t.by_name.insert(
            "things".into(),
            TableSpec {
                schema: "app".into(),
                name: "things".into(),
                scope: TableScope::Environment,
                organization_column: Some("tenant".into()),
                environment_column: Some("env".into()),
                type_column: None,
                id_column: "id".into(),
            },
        );
        t.by_name.insert(
            "global".into(),
            TableSpec {
                schema: "public".into(),
                name: "global".into(),
                scope: TableScope::Shared,
                organization_column: None,
                environment_column: None,
                type_column: None,
                id_column: "id".into(),
            },
        );
        t
    }

    #[test]
    fn managed_tables_take_their_columns_from_the_policy() {
        let t = Target::resolve("things", &tables()).unwrap();
        assert_eq!(
            (t.schema.as_str(), t.environment_column.as_str(), t.organization_column.as_str()),
            ("app", "env", "tenant")
        );
        assert!(t.managed);
        assert_eq!(Target::resolve("app.things", &tables()).unwrap(), t);
        // Same name in another schema: not the managed table.
        let other = Target::resolve("public.things", &tables()).unwrap();
        assert!(!other.managed);
        assert_eq!(
            (other.environment_column.as_str(), other.organization_column.as_str()),
            ("environment", "organization_id")
        );
    }

    #[test]
    fn unmanaged_tables_default_to_public() {
        let t = Target::resolve("scratch", &tables()).unwrap();
        assert_eq!((t.schema.as_str(), t.name.as_str()), ("public", "scratch"));
        assert!(Target::resolve("global", &tables()).unwrap_err().contains("organization_column = false"));
        for bad in ["", ".t", "s.", "a.b.c"] {
            assert!(Target::resolve(bad, &tables()).is_err(), "{bad:?}");
        }
    }
}
