//! The policy engine: decides, statement by statement, what an environment key may run, and
//! rewrites what it may into what it may see.
//!
//! - `access.rs`: roles → which rows and fields of a table, for an action.
//! - `secure.rs`: the secure relation (tenant + scope + masks) as SQL.
//! - `guard.rs`: guarded relations (unfenced, for index plans) and the conditions that may read them raw.
//! - `walk.rs`: name resolution (CTE scopes, pinned search_path) and the tree walk.
//! - `functions.rs`: the function allowlist.
//!
//! Status: reads of managed tables go through secure relations; writes to managed tables are
//! refused until `WITH CHECK` enforcement lands; statements not listed below are refused.

pub mod access;
pub mod functions;
pub mod guard;
pub mod secure;
pub mod ungate;
pub mod walk;
pub mod writes;

use std::collections::BTreeSet;
use std::sync::Arc;

use sqlparser::ast::{CopySource, CopyTarget, CreateTable, ObjectName, Reset, ResetStatement, Set, Statement};

use super::policy::DdlTarget;
use super::{Refusal, StatementPolicy};
use crate::auth::identity::{ActorContext, Environment};
use crate::catalog::CatalogSnapshot;
use crate::policy::{Policies, PolicySet};
use secure::Ctx;
use walk::{Resolved, Walker, name_parts};

/// Settings an environment key may SET, SHOW or RESET.
pub const ALLOWED_SETTINGS: &[&str] = &[
    "application_name",
    "timezone",
    "time zone",
    "datestyle",
    "intervalstyle",
    "extra_float_digits",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "jit",
    "bytea_output",
    "client_min_messages",
    "default_transaction_isolation",
    "default_transaction_read_only",
    // As `SET TRANSACTION … DEFERRABLE`, which is allowed (psycopg sets it through set_config).
    "default_transaction_deferrable",
    "transaction_deferrable",
    "transaction_read_only",
    "transaction_isolation",
    "work_mem",
    "geqo",
    "enable_seqscan",
    "random_page_cost",
    "search_path_warning",
    "lc_messages",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "xmloption",
    "default_text_search_config",
];

/// The policies of both environments and the catalog they are checked against.
pub struct PolicyEngine {
    pub policies: Policies,
    pub catalog: Arc<CatalogSnapshot>,
    /// Functions the configuration allows beyond the built-in allowlist (e.g. `pg_sleep`).
    pub allow_functions: BTreeSet<String>,
}

/// Why an environment's keys are refused when nothing is deployed to it.
pub fn not_deployed_message(env: Environment) -> String {
    let how = match env {
        Environment::Development => "`struere-proxy policy dev`",
        Environment::Production => "`struere-proxy policy deploy`",
    };
    format!("no policy set is deployed for the {} environment (the operator deploys one with {how})", env.as_str())
}

fn denied(msg: impl Into<String>) -> Refusal {
    Refusal::Denied(format!("refused: {}", msg.into()))
}

impl StatementPolicy for PolicyEngine {
    fn version(&self, actor: &ActorContext) -> Option<String> {
        Some(self.policies.for_env(actor.environment).version.clone())
    }

    fn check_pg(&self, node: &pg_query::NodeEnum, actor: &ActorContext) -> Result<(), Refusal> {
        use pg_query::protobuf::TransactionStmtKind as K;
        // Fail closed: an environment with no deployed policy runs nothing (sessions are
        // refused at startup too; this covers one that was open when it happened).
        if !self.policies.for_env(actor.environment).is_deployed() {
            return Err(denied(not_deployed_message(actor.environment)));
        }
        if let pg_query::NodeEnum::TransactionStmt(t) = node
            && matches!(
                K::try_from(t.kind),
                Ok(K::TransStmtPrepare | K::TransStmtCommitPrepared | K::TransStmtRollbackPrepared)
            )
        {
            // Every environment key runs as the same upstream role, which may finish any
            // prepared transaction of that role: another tenant's included.
            return Err(denied(
                "two-phase commit (PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED) is not allowed through an environment key",
            ));
        }
        // Kinds never allowed through an environment key are refused on PostgreSQL's tree, so
        // the refusal names the rule (42501) also where sqlparser cannot read the statement
        // (`CREATE DOMAIN d INTEGER NOT NULL`, a function with `COST`), as on sqlparser's tree.
        if let Some(kind) = never_allowed_kind(node) {
            return Err(denied(format!("{kind} is not allowed through an environment key")));
        }
        // Every function call PostgreSQL sees, whatever syntax sqlparser read it as
        // (`LATERAL f()`, `ROWS FROM`, `EXTRACT`, …) and wherever it is, must be on the
        // allowlist. pg_notify with a constant channel is namespaced by the tree walk (in FROM it
        // stays refused there; any other form is refused by the walk too); setval is qualified
        // by the tree walk; both are checked again on the output (`check_output`).
        let checked = super::pgtree::visit(node, &mut |n| match n {
            pg_query::NodeRef::FuncCall(f) => {
                let parts = string_list(&f.funcname);
                if (walk::is_pg_notify(&parts) && f.args.len() == 2) || is_setval(&parts) {
                    return Ok(());
                }
                functions::check(&self.catalog, &parts, &self.allow_functions).map_err(denied)
            }
            _ => Ok(()),
        });
        match checked {
            Ok(()) => {}
            Err(super::pgtree::WalkError::Stopped(refusal)) => return Err(refusal),
            Err(super::pgtree::WalkError::Serializer) => {
                return Err(denied("the statement's function calls could not be read"));
            }
        }
        self.check_locking(node, actor)
    }

    fn check_output(&self, node: &pg_query::NodeEnum, actor: &ActorContext) -> Result<(), Refusal> {
        // Every reference PostgreSQL will resolve to a managed table must be the proxy's own,
        // inside a secure relation (aliased `__struere_N`): a reference the tree walk missed
        // (sqlparser represented it as something else) is refused here.
        let set = self.policies.for_env(actor.environment);
        let prefix = notify_prefix(actor);
        if let pg_query::NodeEnum::ExplainStmt(e) = node {
            explain_output_ok(e)?;
        }
        // A complete walk: pg_query's `nodes()` never enters VALUES lists, LIMIT, `ARRAY[…]`
        // and other clauses, where these calls and references would go unchecked.
        // The names of a locking clause (`FOR UPDATE OF e`) are FROM items, resolved against the
        // query's own, never tables: SelectStmt comes before its clauses in the walk.
        let mut lock_targets: Vec<*const pg_query::protobuf::RangeVar> = Vec::new();
        let checked = super::pgtree::visit(node, &mut |n| {
            match n {
                pg_query::NodeRef::SelectStmt(s) => {
                    let clauses = s.locking_clause.iter().filter_map(|c| match &c.node {
                        Some(pg_query::NodeEnum::LockingClause(l)) => Some(l),
                        _ => None,
                    });
                    let named = clauses.flat_map(|l| &l.locked_rels).filter_map(|r| match &r.node {
                        Some(pg_query::NodeEnum::RangeVar(rv)) => Some(std::ptr::from_ref(rv)),
                        _ => None,
                    });
                    lock_targets.extend(named);
                }
                pg_query::NodeRef::RangeVar(rv) if lock_targets.iter().any(|p| std::ptr::eq(*p, rv)) => return Ok(()),
                _ => {}
            }
            self.check_output_node(n, set, &prefix, actor)
        });
        match checked {
            Ok(()) => Ok(()),
            Err(super::pgtree::WalkError::Stopped(refusal)) => Err(refusal),
            Err(super::pgtree::WalkError::Serializer) => {
                Err(Refusal::Unverifiable("refused: the rewritten statement's tree could not be read".to_owned()))
            }
        }
    }

    fn apply(&self, stmt: &mut Statement, actor: &ActorContext) -> Result<(), Refusal> {
        let set = self.policies.for_env(actor.environment);
        let ctx = Ctx::new(actor, set, &self.catalog);
        let mut walker = Walker::new(&ctx, &self.allow_functions);
        self.statement(stmt, &mut walker)
    }

    fn check_ddl_target(&self, target: &DdlTarget<'_>, actor: &ActorContext) -> Result<(), Refusal> {
        let set = self.policies.for_env(actor.environment);
        let ctx = Ctx::new(actor, set, &self.catalog);
        let w = Walker::new(&ctx, &self.allow_functions);
        match *target {
            DdlTarget::Relation { parts, verb, creates } => {
                if let Some(temporary) = creates {
                    self.temporary_shadow(&w, parts, temporary)?;
                }
                self.ddl_target_parts(&w, parts, verb)
            }
            DdlTarget::Uses { parts, what } => used_by_ddl(parts, what, actor),
        }
    }

    fn check_partial_assignment(&self, target: &[String], column: &str, actor: &ActorContext) -> Result<(), Refusal> {
        let set = self.policies.for_env(actor.environment);
        let ctx = Ctx::new(actor, set, &self.catalog);
        let w = Walker::new(&ctx, &self.allow_functions);
        // Resolved as the walk resolves a write's target; whether the caller may write it at all
        // is the walk's to decide (an unmanaged table has no rules that could read the column).
        let (schema, table) = w.resolve_table_parts(target).map_err(denied)?;
        let Some(spec) = set.managed(&schema, &table).map_err(denied)? else { return Ok(()) };
        let t = writes::Target::new(&ctx, spec).map_err(denied)?;
        writes::partial_assignment(&t, column).map_err(denied)
    }
}

impl PolicyEngine {
    /// `check_output` for one node of PostgreSQL's tree of the rewritten statement.
    fn check_output_node(
        &self,
        n: pg_query::NodeRef<'_>,
        set: &PolicySet,
        prefix: &str,
        actor: &ActorContext,
    ) -> Result<(), Refusal> {
        if let pg_query::NodeRef::FuncCall(f) = n {
            let parts = string_list(&f.funcname);
            // nextval/currval only on sequences of the caller's own scratch schema or shared
            // schemas (another tenant's scratch sequence would be advanced or read).
            if matches!(parts.as_slice(), [n] | [_, n] if n == "nextval" || n == "currval") {
                return sequence_allowed(f.args.first(), actor);
            }
            if is_setval(&parts) {
                return setval_output_allowed(f, actor);
            }
            // Every pg_notify that reaches the server sends on the caller's own namespace.
            if walk::is_pg_notify(&parts) {
                let channel = f.args.first().and_then(|a| match &a.node {
                    Some(pg_query::NodeEnum::AConst(c)) => match &c.val {
                        Some(pg_query::protobuf::a_const::Val::Sval(s)) => Some(s.sval.as_str()),
                        _ => None,
                    },
                    _ => None,
                });
                if !channel.is_some_and(|c| c.starts_with(prefix)) {
                    return Err(Refusal::Unverifiable(
                        "refused: a pg_notify call would reach the server outside the caller's channel namespace"
                            .to_owned(),
                    ));
                }
            }
            return Ok(());
        }
        let pg_query::NodeRef::RangeVar(rv) = n else { return Ok(()) };
        let schema = if !rv.schemaname.is_empty() {
            rv.schemaname.clone()
        } else if self.catalog.relation("pg_catalog", &rv.relname).is_some() {
            "pg_catalog".to_owned()
        } else {
            "public".to_owned()
        };
        // A table only the other environment manages never reaches the server from here.
        if set.managed(&schema, &rv.relname).map_err(|e| Refusal::Unverifiable(format!("refused: {e}")))?.is_none() {
            return Ok(());
        }
        let ours = rv.alias.as_ref().is_some_and(|a| a.aliasname.starts_with(walk::RESERVED_PREFIX));
        if !ours {
            return Err(Refusal::Unverifiable(format!(
                "refused: a reference to the managed table {} would reach the server outside its secure relation \
                 (a construct the proxy could not resolve names it)",
                rv.relname
            )));
        }
        Ok(())
    }

    /// A locking clause (`FOR UPDATE`, `FOR NO KEY UPDATE`, `FOR SHARE`, `FOR KEY SHARE`) holds
    /// rows locked against writers until the transaction ends, which PostgreSQL allows only with
    /// UPDATE privilege on the table. A role that may only read a managed table must not be able
    /// to block its writers, so a statement with any locking clause needs update access to
    /// every managed table it names (stricter than PostgreSQL for `FOR UPDATE OF t`, which locks
    /// only `t`'s rows: the simpler rule fails closed).
    fn check_locking(&self, node: &pg_query::NodeEnum, actor: &ActorContext) -> Result<(), Refusal> {
        if !super::pgtree::contains_node(node, "LockingClause") {
            return Ok(());
        }
        let unreadable = || denied("the statement's relations could not be read for its locking clause");
        let (relations, ctes) = super::pgtree::relations_and_ctes(node).ok_or_else(unreadable)?;
        let set = self.policies.for_env(actor.environment);
        let ctx = Ctx::new(actor, set, &self.catalog);
        let w = Walker::new(&ctx, &self.allow_functions);
        for (schema, name) in relations {
            let parts = match schema.is_empty() {
                true if ctes.contains(&name) => continue,
                true => vec![name],
                false => vec![schema, name],
            };
            // A name that cannot be resolved is refused (the walk refuses it too): fail closed.
            let (schema, table) = w.resolve_table_parts(&parts).map_err(denied)?;
            let Some(spec) = set.managed(&schema, &table).map_err(denied)? else { continue };
            if ctx.access(spec, crate::policy::Action::Update).is_err() {
                return Err(denied(format!(
                    "a locking clause (FOR UPDATE, FOR NO KEY UPDATE, FOR SHARE, FOR KEY SHARE) needs update access \
                     to {table}, which the caller's roles may only read (locked rows would block its writers)"
                )));
            }
        }
        Ok(())
    }
}

/// A type, collation or operator class named in scratch DDL: unqualified (found through the
/// pinned search_path: the catalog, the session's temporary schema, the caller's scratch schema,
/// public), or qualified with `pg_catalog`, the caller's own scratch schema or `pg_temp`. Another
/// tenant's scratch objects are never reached, nor any other schema's.
fn used_by_ddl(parts: &[String], what: &str, actor: &ActorContext) -> Result<(), Refusal> {
    match parts {
        [_] => Ok(()),
        [schema, _] if schema == "pg_catalog" || schema == "pg_temp" || *schema == scratch_schema(actor) => Ok(()),
        _ => Err(denied(format!(
            "the {what} {} is outside the catalog and the tenant's own scratch schema",
            parts.join(".")
        ))),
    }
}

impl PolicyEngine {
    fn statement(&self, stmt: &mut Statement, w: &mut Walker) -> Result<(), Refusal> {
        match stmt {
            // A query may hold writes (WITH … AS (INSERT/UPDATE/DELETE …)).
            Statement::Query(_) => self.walk_write(w, stmt),
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) => self.walk_write(w, stmt),
            Statement::Truncate(t) => {
                for target in &t.table_names {
                    if w.write_target(&target.name, "truncate").map_err(denied)?.is_some() {
                        return Err(denied(format!("TRUNCATE of the managed table {} is not allowed", target.name)));
                    }
                }
                Ok(())
            }
            Statement::CreateTable(ct) => self.create_table(w, ct),
            Statement::CreateIndex(ci) => {
                let name = ci.table_name.clone();
                self.ddl_target(w, &name, "create an index on")?;
                self.walk_write(w, stmt)
            }
            Statement::AlterTable(at) => {
                let name = at.name.clone();
                self.ddl_target(w, &name, "alter")?;
                self.walk_write(w, stmt)
            }
            // Enum and composite types in the scratch schema (clients' own tests and ORMs' enum
            // columns); they hold no rows and call no functions. Range, base and shell types
            // name support functions and are refused with the other kinds.
            Statement::CreateType { name, representation } => {
                use sqlparser::ast::UserDefinedTypeRepresentation as R;
                if !matches!(representation, Some(R::Enum { .. } | R::Composite { .. })) {
                    return Err(denied(
                        "CREATE TYPE is only allowed as an enum or a composite type through an environment key",
                    ));
                }
                let name = name.clone();
                self.ddl_target(w, &name, "create the type")?;
                w.run(stmt).map_err(denied)
            }
            // ORM test suites make sure their extensions exist (SQLAlchemy's provisioning:
            // `CREATE EXTENSION IF NOT EXISTS hstore`): a no-op for one already installed, which
            // is all an environment key may send.
            Statement::CreateExtension(ce) => {
                let name = match ce.name.quote_style {
                    None => ce.name.value.to_ascii_lowercase(),
                    Some(_) => ce.name.value.clone(),
                };
                if ce.if_not_exists && self.catalog.extensions.contains(&name) {
                    Ok(())
                } else {
                    Err(denied(
                        "CREATE EXTENSION is not allowed through an environment key (only IF NOT EXISTS of an installed one)",
                    ))
                }
            }
            Statement::CreateSequence { name, .. } => {
                let name = name.clone();
                self.ddl_target(w, &name, "create")
            }
            // Comments on the caller's own scratch tables and their columns (ORMs and psql
            // scripts write them); a comment is DDL on its table.
            Statement::Comment { object_type, object_name, .. } => {
                use sqlparser::ast::CommentObject;
                let table = match object_type {
                    CommentObject::Table => object_name.clone(),
                    CommentObject::Column if object_name.0.len() >= 2 => {
                        let mut table = object_name.clone();
                        table.0.pop();
                        table
                    }
                    other => {
                        return Err(denied(format!("COMMENT ON {other} is not allowed through an environment key")));
                    }
                };
                self.ddl_target(w, &table, "comment on")
            }
            Statement::Drop { names, object_type, .. } => {
                use sqlparser::ast::ObjectType;
                if !matches!(
                    object_type,
                    ObjectType::Table | ObjectType::Index | ObjectType::Sequence | ObjectType::Type
                ) {
                    return Err(denied(format!("DROP {object_type} is not allowed through an environment key")));
                }
                for n in names.clone() {
                    self.ddl_target(w, &n, "drop")?;
                }
                Ok(())
            }
            Statement::Copy { source, to, target, .. } => self.copy(w, source, *to, target),
            Statement::LISTEN { channel } | Statement::UNLISTEN { channel } => namespace_channel(channel, w.ctx.actor),
            Statement::NOTIFY { channel, .. } => namespace_channel(channel, w.ctx.actor),
            Statement::Set(s) => self.set(s),
            Statement::ShowVariable { .. } | Statement::Discard { .. } => Ok(()),
            Statement::Reset(ResetStatement { reset }) => match reset {
                Reset::ALL => Ok(()),
                Reset::SessionAuthorization => Err(denied("RESET SESSION AUTHORIZATION is not allowed")),
                // The startup value the proxy pins: what RESET ALL restores too (`gate.rs`).
                Reset::ConfigurationParameter(n) if super::gate::resets_pinned_startup_value(n) => Ok(()),
                Reset::ConfigurationParameter(n) => self.setting_allowed(n),
            },
            Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. } => Ok(()),
            Statement::Explain { analyze, statement, options, estimate, query_plan, .. } => {
                if *analyze || *estimate || *query_plan {
                    return Err(denied(
                        "EXPLAIN ANALYZE is not allowed: its row counts reveal rows outside the caller's scope",
                    ));
                }
                explain_options(options)?;
                self.statement(statement, w)
            }
            Statement::Prepare { statement, .. } => self.statement(statement, w),
            Statement::Execute { .. } | Statement::Deallocate { .. } => w.run(stmt).map_err(denied),
            Statement::Declare { .. } | Statement::Fetch { .. } | Statement::Close { .. } => {
                w.run(stmt).map_err(denied)
            }
            other => Err(denied(format!("{} is not allowed through an environment key", statement_name(other)))),
        }
    }

    /// Walk a statement that writes. Writes to managed tables are rewritten by the walk
    /// (writes.rs); a statement writing an unmanaged object may not read managed tables: it
    /// would persist one tenant's rows where every development key can read them.
    fn walk_write(&self, w: &mut Walker, stmt: &mut Statement) -> Result<(), Refusal> {
        match stmt {
            // A query is walked on its own: its Select is the statement's own (guard.rs).
            Statement::Query(q) => w.run(q.as_mut()).map_err(denied)?,
            other => w.run(other).map_err(denied)?,
        }
        if w.read_managed && w.writes_unmanaged {
            return Err(denied(
                "a statement that writes to an unmanaged table may not read managed tables (their rows would leave the tenant's scope)",
            ));
        }
        Ok(())
    }

    /// DDL: only on unmanaged tables, only in development, only with the grant, only in the
    /// tenant's own scratch schema (unqualified names land there through the pinned search_path).
    fn ddl_target(&self, w: &Walker, name: &ObjectName, verb: &str) -> Result<(), Refusal> {
        let parts = name_parts(name).ok_or_else(|| denied(format!("relation name {name} is not supported")))?;
        self.ddl_target_parts(w, &parts, verb)
    }

    /// [`Self::ddl_target`] on a folded name: the one place the scratch-object rules for DDL live,
    /// for DDL sqlparser reads and DDL only PostgreSQL's parser reads (`rewrite/ddl.rs`).
    fn ddl_target_parts(&self, w: &Walker, parts: &[String], verb: &str) -> Result<(), Refusal> {
        let (schema, table) = self.resolve_target(w, parts)?;
        w.ctx.set.managed(&schema, &table).map_err(denied)?;
        let qualified = parts.len() > 1;
        // `pg_temp` (exactly: the session's own temporary schema) holds session-local objects
        // like the temporary tables an unqualified `CREATE TEMP TABLE` makes.
        let own_schema = schema == scratch_schema(w.ctx.actor) || schema == "pg_temp";
        if qualified && !own_schema && w.ctx.set.tables.table(&schema, &table).is_none() {
            return Err(denied(format!(
                "cannot {verb} {schema}.{table}: unmanaged objects live in the tenant's own scratch schema (use an unqualified name)"
            )));
        }
        if w.ctx.set.tables.table(&schema, &table).is_some() {
            return Err(denied(format!(
                "cannot {verb} the managed table {table}: both environments share managed tables, so DDL on them is never allowed through an environment key"
            )));
        }
        if w.ctx.actor.environment == Environment::Production {
            return Err(denied("DDL is not allowed in production"));
        }
        if !w.unmanaged_allowed() {
            return Err(denied("DDL needs a development role granted unmanaged_tables"));
        }
        if matches!(schema.as_str(), "pg_catalog" | "information_schema" | crate::auth::store::PROXY_SCHEMA) {
            return Err(denied(format!("cannot {verb} {schema}.{table}")));
        }
        Ok(())
    }

    fn resolve_target(&self, w: &Walker, parts: &[String]) -> Result<(String, String), Refusal> {
        match w.resolve(parts).map_err(denied)? {
            Resolved::Cte => Err(denied(format!("{} names a CTE, which cannot be the target here", parts.join(".")))),
            Resolved::Relation { schema, name } => Ok((schema, name)),
        }
    }

    /// A temporary table may not shadow a managed one, even though the proxy always names
    /// managed tables schema-qualified.
    fn temporary_shadow(&self, w: &Walker, parts: &[String], temporary: bool) -> Result<(), Refusal> {
        let (schema, table) = self.resolve_target(w, parts)?;
        if (temporary || schema.starts_with("pg_temp")) && w.ctx.set.tables.by_name.contains_key(&table) {
            return Err(denied(format!("a temporary table may not be named like the managed table {table}")));
        }
        Ok(())
    }

    fn create_table(&self, w: &mut Walker, ct: &mut CreateTable) -> Result<(), Refusal> {
        let parts =
            name_parts(&ct.name).ok_or_else(|| denied(format!("relation name {} is not supported", ct.name)))?;
        self.temporary_shadow(w, &parts, ct.temporary)?;
        self.ddl_target_parts(w, &parts, "create")?;
        // `PARTITION BY RANGE (a)` / `LIST` / `HASH`: sqlparser reads the strategy as a call; it
        // is checked here (columns only) and kept out of the function check.
        let partition_by = ct.partition_by.take();
        if let Some(p) = &partition_by {
            partition_strategy_ok(p)?;
        }
        let walked = w.run(ct).map_err(denied);
        ct.partition_by = partition_by;
        walked?;
        if w.read_managed {
            return Err(denied(
                "CREATE TABLE … AS may not read managed tables (their rows would leave the tenant's scope)",
            ));
        }
        Ok(())
    }

    /// COPY: only to the client or from it. A managed table copied out becomes a copy of its
    /// secure relation; copying into a managed table is refused until WITH CHECK lands.
    fn copy(&self, w: &mut Walker, source: &mut CopySource, to: bool, target: &CopyTarget) -> Result<(), Refusal> {
        if !matches!(target, CopyTarget::Stdin | CopyTarget::Stdout) {
            return Err(denied("COPY to or from a server file or program is not allowed"));
        }
        match source {
            CopySource::Query(q) => w.run(q.as_mut()).map_err(denied),
            CopySource::Table { table_name, columns } => {
                if !to {
                    if w.write_target(table_name, "copy into").map_err(denied)?.is_some() {
                        return Err(denied(format!(
                            "COPY … FROM STDIN into the managed table {table_name} is not supported: use INSERT \
                             (the proxy sets environment and organization and checks each row there)"
                        )));
                    }
                    return Ok(());
                }
                let parts = name_parts(table_name)
                    .ok_or_else(|| denied(format!("relation name {table_name} is not supported")))?;
                let (schema, table) = self.resolve_target(w, &parts)?;
                if w.ctx.set.tables.table(&schema, &table).is_none() {
                    return w.check_plain_relation(&schema, &table).map_err(denied);
                }
                // COPY t (cols) TO STDOUT  →  COPY (SELECT cols FROM t) TO STDOUT, then secured.
                let cols = if columns.is_empty() {
                    "*".to_owned()
                } else {
                    columns.iter().map(|c| secure::ident(&walk::fold(c))).collect::<Vec<_>>().join(", ")
                };
                let sql = format!("SELECT {cols} FROM {}.{}", secure::ident(&schema), secure::ident(&table));
                let mut q = walk::parse_query(&sql).map_err(|e| denied(format!("internal error: {e}")))?;
                w.run(q.as_mut()).map_err(denied)?;
                *source = CopySource::Query(q);
                Ok(())
            }
        }
    }

    fn set(&self, s: &Set) -> Result<(), Refusal> {
        match s {
            // A pinned setting set to its pinned value (psycopg's `SET client_encoding TO utf8`).
            Set::SingleAssignment { variable, values, .. } if super::gate::sets_pinned_value(variable, values) => {
                Ok(())
            }
            Set::SingleAssignment { variable, .. } => self.setting_allowed(variable),
            Set::ParenthesizedAssignments { variables, .. } => {
                variables.iter().try_for_each(|v| self.setting_allowed(v))
            }
            Set::MultipleAssignments { assignments } => {
                assignments.iter().try_for_each(|a| self.setting_allowed(&a.name))
            }
            Set::SetTimeZone { .. } | Set::SetTransaction { .. } => Ok(()),
            Set::SetRole { .. } => Err(denied("SET ROLE is not allowed through the proxy")),
            Set::SetSessionAuthorization(_) => {
                Err(denied("SET SESSION AUTHORIZATION is not allowed through the proxy"))
            }
            other => Err(denied(format!("{other} is not allowed through the proxy"))),
        }
    }

    fn setting_allowed(&self, name: &ObjectName) -> Result<(), Refusal> {
        let parts = name_parts(name).unwrap_or_default();
        let setting = parts.join(".");
        if ALLOWED_SETTINGS.contains(&setting.as_str()) {
            Ok(())
        } else {
            Err(denied(format!("the setting {setting} may not be changed through an environment key")))
        }
    }
}

/// EXPLAIN options: nothing that executes the statement (ANALYZE and what needs it), and no cost
/// estimates — they come from statistics over every tenant's rows (the reason `pg_stats` is
/// hidden), e.g. a row estimate for `email = 'someone@else'` tells whether that value is common.
/// `COSTS OFF` is added unless the client wrote it.
fn explain_options(options: &mut Option<Vec<sqlparser::ast::UtilityOption>>) -> Result<(), Refusal> {
    use sqlparser::ast::{Expr, Ident, UtilityOption, Value};
    let list = options.get_or_insert_with(Vec::new);
    let mut costs_off = false;
    for o in list.iter() {
        let name = o.name.value.to_ascii_lowercase();
        let off = match &o.arg {
            None => false,
            Some(Expr::Value(v)) => match &v.value {
                Value::Boolean(b) => !*b,
                Value::Number(n, _) => n == "0",
                Value::SingleQuotedString(t) => matches!(t.to_ascii_lowercase().as_str(), "off" | "false" | "0" | "no"),
                _ => false,
            },
            Some(Expr::Identifier(i)) => matches!(i.value.to_ascii_lowercase().as_str(), "off" | "false" | "no"),
            Some(_) => false,
        };
        match name.as_str() {
            "format" | "verbose" | "settings" | "summary" | "generic_plan" | "memory" => {}
            "costs" if off => costs_off = true,
            "costs" => {
                return Err(denied(
                    "EXPLAIN with costs is not allowed: estimates come from statistics over every tenant's rows (use COSTS OFF)",
                ));
            }
            "analyze" | "buffers" | "timing" | "wal" | "serialize" if off => {}
            _ => {
                return Err(denied(format!(
                    "EXPLAIN option {} is not allowed: EXPLAIN ANALYZE's row counts reveal rows outside the caller's scope",
                    o.name.value
                )));
            }
        }
    }
    if !costs_off {
        list.push(UtilityOption { name: Ident::new("COSTS"), arg: Some(Expr::Identifier(Ident::new("OFF"))) });
    }
    Ok(())
}

/// A partitioning strategy as sqlparser reads it: `range|list|hash(col, …)` over plain columns.
fn partition_strategy_ok(e: &sqlparser::ast::Expr) -> Result<(), Refusal> {
    use sqlparser::ast::{Expr, FunctionArg, FunctionArgExpr, FunctionArguments};
    let refused = || denied("PARTITION BY is only allowed as RANGE, LIST or HASH over plain columns");
    let Expr::Function(f) = e else { return Err(refused()) };
    let strategy = name_parts(&f.name).filter(|p| p.len() == 1).map(|p| p[0].clone()).unwrap_or_default();
    if !matches!(strategy.as_str(), "range" | "list" | "hash") {
        return Err(refused());
    }
    let FunctionArguments::List(list) = &f.args else { return Err(refused()) };
    let columns = list.args.iter().all(|a| {
        matches!(a, FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Identifier(i))) if i.quote_style.is_none() || i.quote_style == Some('"'))
    });
    if list.args.is_empty() || !columns || f.filter.is_some() || f.over.is_some() || !f.within_group.is_empty() {
        return Err(refused());
    }
    Ok(())
}

/// `setval` / `pg_catalog.setval`.
pub(crate) fn is_setval(parts: &[String]) -> bool {
    matches!(parts, [n] if n == "setval") || matches!(parts, [s, n] if s == "pg_catalog" && n == "setval")
}

/// `setval` only on the caller's own sequences: ORMs reset their tables' sequences between tests
/// (Django's `sql_flush`: `setval(pg_get_serial_sequence('"t"','id'), 1, false)`). The sequence
/// argument — a constant name, a constant cast to regclass, or `pg_get_serial_sequence` of a
/// constant table — is rewritten to name the caller's scratch schema explicitly, so a name that
/// resolves elsewhere (a managed table's sequence in `public`) can never be reached; an
/// explicit schema must be that scratch schema or `pg_temp`. Anything else is refused.
/// (A sequence is owned by a table of its own schema, so pg_get_serial_sequence of a scratch
/// table names a scratch sequence.)
pub(crate) fn qualify_setval(f: &mut sqlparser::ast::Function, actor: &ActorContext) -> Result<(), String> {
    use sqlparser::ast::{Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Value};
    let refused = || {
        "setval needs a constant sequence name (or pg_get_serial_sequence of a constant table name) of the \
         caller's own scratch schema"
            .to_owned()
    };
    let scratch = scratch_schema(actor);
    let qualify = |text: &mut String| -> Result<(), String> {
        let parts = split_qualified(text).ok_or_else(refused)?;
        let (schema, name) = match parts.as_slice() {
            [name] => (scratch.clone(), name.clone()),
            [schema, name] if *schema == scratch || schema == "pg_temp" => (schema.clone(), name.clone()),
            _ => return Err(refused()),
        };
        *text = format!("\"{}\".\"{}\"", schema.replace('"', "\"\""), name.replace('"', "\"\""));
        Ok(())
    };
    fn first_arg(f: &mut sqlparser::ast::Function) -> Option<&mut Expr> {
        match &mut f.args {
            FunctionArguments::List(l) => match l.args.first_mut() {
                Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(e))) => Some(e),
                _ => None,
            },
            _ => None,
        }
    }
    fn constant(e: &mut Expr) -> Option<&mut String> {
        match e {
            Expr::Value(v) => match &mut v.value {
                Value::SingleQuotedString(s) => Some(s),
                _ => None,
            },
            Expr::Cast { expr, .. } => constant(expr),
            Expr::Nested(e) => constant(e),
            _ => None,
        }
    }
    let arg = first_arg(f).ok_or_else(refused)?;
    if let Some(text) = constant(arg) {
        return qualify(text);
    }
    if let Expr::Function(inner) = arg
        && name_parts(&inner.name).is_some_and(|p| {
            matches!(p.as_slice(), [n] | [_, n] if n == "pg_get_serial_sequence")
                && (p.len() == 1 || p[0] == "pg_catalog")
        })
        && let Some(table) = first_arg(inner).and_then(constant)
    {
        return qualify(table);
    }
    Err(refused())
}

/// What reaches the server: setval's sequence argument names the caller's scratch schema or
/// `pg_temp` explicitly (see [`qualify_setval`]).
fn setval_output_allowed(f: &pg_query::protobuf::FuncCall, actor: &ActorContext) -> Result<(), Refusal> {
    use pg_query::NodeEnum as N;
    let refused =
        || Refusal::Unverifiable("refused: setval would reach a sequence outside the caller's scratch schema".into());
    let constant = |n: Option<&N>| -> Option<String> {
        let n = match n {
            Some(N::TypeCast(t)) => t.arg.as_deref().and_then(|a| a.node.as_ref()),
            other => other,
        };
        match n {
            Some(N::AConst(c)) => match &c.val {
                Some(pg_query::protobuf::a_const::Val::Sval(s)) => Some(s.sval.clone()),
                _ => None,
            },
            _ => None,
        }
    };
    let scratch = scratch_schema(actor);
    let own = |text: Option<String>| {
        text.and_then(|t| split_qualified(&t))
            .is_some_and(|p| matches!(p.as_slice(), [schema, _] if *schema == scratch || schema == "pg_temp"))
    };
    let arg = f.args.first().and_then(|a| a.node.as_ref());
    let ok = match arg {
        Some(N::FuncCall(inner)) => {
            let name = string_list(&inner.funcname);
            let serial = match name.as_slice() {
                [n] => n == "pg_get_serial_sequence",
                [s, n] => s == "pg_catalog" && n == "pg_get_serial_sequence",
                _ => false,
            };
            serial && own(constant(inner.args.first().and_then(|a| a.node.as_ref())))
        }
        other => own(constant(other)),
    };
    if ok { Ok(()) } else { Err(refused()) }
}

/// A sequence argument (`'name'` or `'name'::regclass`) names a sequence outside other tenants'
/// scratch schemas and the proxy's schema; anything not a constant is refused.
fn sequence_allowed(arg: Option<&pg_query::protobuf::Node>, actor: &ActorContext) -> Result<(), Refusal> {
    use pg_query::NodeEnum as N;
    let refused = |why: &str| Refusal::Unverifiable(format!("refused: nextval/currval {why}"));
    let constant = |n: Option<&N>| match n {
        Some(N::AConst(c)) => match &c.val {
            Some(pg_query::protobuf::a_const::Val::Sval(s)) => Some(s.sval.clone()),
            _ => None,
        },
        _ => None,
    };
    let node = arg.and_then(|a| a.node.as_ref());
    let text = match node {
        Some(N::TypeCast(t)) => constant(t.arg.as_deref().and_then(|a| a.node.as_ref())),
        other => constant(other),
    }
    .ok_or_else(|| refused("needs the sequence name as a constant"))?;
    let parts = split_qualified(&text).ok_or_else(|| refused("needs a plain sequence name"))?;
    match parts.as_slice() {
        [_] => Ok(()),
        [schema, _] => {
            let other_scratch = schema.starts_with(SCRATCH_PREFIX) && *schema != scratch_schema(actor);
            if other_scratch || schema == crate::auth::store::PROXY_SCHEMA {
                Err(refused(&format!("may not use a sequence of schema {schema}")))
            } else {
                Ok(())
            }
        }
        _ => Err(refused("needs a plain sequence name")),
    }
}

/// `a.b` / `"A"."b.c"` as PostgreSQL reads a qualified name in text (unquoted parts folded).
fn split_qualified(text: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == '.' {
                    break;
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
            if part.is_empty() {
                return None;
            }
        }
        parts.push(part);
        match chars.next() {
            None => return Some(parts),
            Some('.') => continue,
            Some(_) => return None,
        }
    }
}

/// What reaches the server as EXPLAIN executes nothing and shows no estimates.
fn explain_output_ok(e: &pg_query::protobuf::ExplainStmt) -> Result<(), Refusal> {
    use pg_query::NodeEnum as N;
    let mut costs_off = false;
    for o in &e.options {
        let Some(N::DefElem(d)) = &o.node else { continue };
        let off = match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
            Some(N::String(s)) => matches!(s.sval.to_ascii_lowercase().as_str(), "off" | "false" | "0" | "no"),
            Some(N::Boolean(b)) => !b.boolval,
            Some(N::Integer(i)) => i.ival == 0,
            _ => false,
        };
        match d.defname.to_ascii_lowercase().as_str() {
            "costs" if off => costs_off = true,
            "analyze" | "buffers" | "timing" | "wal" | "serialize" | "costs" if !off => {
                return Err(Refusal::Unverifiable(format!(
                    "refused: the EXPLAIN reaching the server would show {} (checked on PostgreSQL's tree)",
                    d.defname
                )));
            }
            _ => {}
        }
    }
    if costs_off {
        Ok(())
    } else {
        Err(Refusal::Unverifiable("refused: the EXPLAIN reaching the server would show cost estimates".to_owned()))
    }
}

/// The strings of a list of `String` nodes (a qualified name in PostgreSQL's tree).
fn string_list(nodes: &[pg_query::protobuf::Node]) -> Vec<String> {
    nodes
        .iter()
        .filter_map(|n| match &n.node {
            Some(pg_query::NodeEnum::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect()
}

/// The channel prefix of one organization and environment: tenants never hear each other.
/// NotificationResponses are filtered and un-prefixed on the way back (session relay).
pub fn notify_prefix(actor: &ActorContext) -> String {
    format!("t{}_", tenant_hash(actor))
}

/// The schema holding one organization's and environment's unmanaged (scratch) objects. It is
/// first on the session's pinned search_path, so unqualified DDL lands there; references to
/// another tenant's scratch schema are refused.
pub fn scratch_schema(actor: &ActorContext) -> String {
    format!("{SCRATCH_PREFIX}{}", tenant_hash(actor))
}

pub const SCRATCH_PREFIX: &str = "scratch_";

/// 40 bits of SHA-256 over (organization, environment): short enough for identifiers.
fn tenant_hash(actor: &ActorContext) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(actor.organization.as_bytes());
    h.update([0]);
    h.update(actor.environment.as_str().as_bytes());
    hex::encode(&h.finalize()[..5])
}

/// PostgreSQL channel names are identifiers: at most 63 bytes.
const MAX_CHANNEL_BYTES: usize = 63;

fn namespace_channel(channel: &mut sqlparser::ast::Ident, actor: &ActorContext) -> Result<(), Refusal> {
    // `UNLISTEN *` stays as it is: it only affects this session's own channels.
    if channel.value == "*" && channel.quote_style.is_none() {
        return Ok(());
    }
    let name = format!("{}{}", notify_prefix(actor), walk::fold(channel));
    if name.len() > MAX_CHANNEL_BYTES {
        return Err(denied(format!("channel name {} is too long", walk::fold(channel))));
    }
    *channel = sqlparser::ast::Ident::with_quote('"', name);
    Ok(())
}

/// Statement kinds no environment key may send, whatever they hold (their sqlparser forms fall
/// to the refusal of `statement`'s last arm), named as that refusal names them.
fn never_allowed_kind(node: &pg_query::NodeEnum) -> Option<&'static str> {
    use pg_query::NodeEnum as N;
    use pg_query::protobuf::RoleStmtType;
    match node {
        N::CreateDomainStmt(_) => Some("CREATE DOMAIN"),
        N::CreateFunctionStmt(f) if f.is_procedure => Some("CREATE PROCEDURE"),
        N::CreateFunctionStmt(_) => Some("CREATE FUNCTION"),
        N::DoStmt(_) => Some("DO"),
        N::CreateRoleStmt(r) => Some(match RoleStmtType::try_from(r.stmt_type) {
            Ok(RoleStmtType::RolestmtUser) => "CREATE USER",
            Ok(RoleStmtType::RolestmtGroup) => "CREATE GROUP",
            _ => "CREATE ROLE",
        }),
        N::AlterRoleStmt(_) | N::AlterRoleSetStmt(_) => Some("ALTER ROLE"),
        N::DropRoleStmt(_) => Some("DROP ROLE"),
        N::GrantStmt(g) => Some(if g.is_grant { "GRANT" } else { "REVOKE" }),
        N::GrantRoleStmt(g) => Some(if g.is_grant { "GRANT" } else { "REVOKE" }),
        N::AlterSystemStmt(_) => Some("ALTER SYSTEM"),
        N::LoadStmt(_) => Some("LOAD"),
        N::CreatedbStmt(_) => Some("CREATE DATABASE"),
        N::DropdbStmt(_) => Some("DROP DATABASE"),
        N::CreateSchemaStmt(_) => Some("CREATE SCHEMA"),
        N::CreateRangeStmt(_) => Some("CREATE TYPE … AS RANGE"),
        _ => None,
    }
}

/// A short human name for a statement kind, for refusals, as its leading keywords name it: the
/// verb, the object kind and the words that say what kind of object (`TEMPORARY`,
/// `MATERIALIZED`), not `OR REPLACE` (`CREATE OR REPLACE FUNCTION f…` is `CREATE FUNCTION`, `CREATE MATERIALIZED VIEW
/// v…` is `CREATE MATERIALIZED VIEW`, `CREATE TEMP VIEW v…` is `CREATE TEMPORARY VIEW`).
fn statement_name(s: &Statement) -> String {
    statement_name_of(&s.to_string())
}

fn statement_name_of(text: &str) -> String {
    // Words before the object kind that belong to the name of the kind.
    const QUALIFIERS: &[&str] = &[
        "TEMP",
        "TEMPORARY",
        "UNLOGGED",
        "RECURSIVE",
        "TRUSTED",
        "PROCEDURAL",
        "GLOBAL",
        "LOCAL",
        "MATERIALIZED",
        "FOREIGN",
        "EVENT",
        "ACCESS",
        "TEXT",
        "SEARCH",
        "DATA",
    ];
    let words: Vec<String> = text
        .split_whitespace()
        .take(8)
        .map(|w| w.chars().filter(char::is_ascii_alphabetic).collect::<String>().to_uppercase())
        .collect();
    let mut words = words.iter().map(String::as_str).take_while(|w| !w.is_empty());
    let Some(verb) = words.next() else { return String::new() };
    let mut name = vec![verb];
    for w in words.filter(|w| !matches!(*w, "OR" | "REPLACE")) {
        name.push(w);
        if !QUALIFIERS.contains(&w) {
            break;
        }
    }
    name.join(" ")
}

#[cfg(test)]
pub(crate) mod tests;
