//! The walk over one statement's tree: resolves every relation the way PostgreSQL would (CTE
//! names first, in their exact scope; then the pinned search_path), swaps managed tables for
//! secure relations, and checks every function call and catalog relation.
//!
//! Invariant: every relation name resolves as PostgreSQL would resolve it; every managed table becomes a secure
//! relation, and every other relation or function is allowed only when it cannot expose another tenant's rows (catalog,
//! the caller's scratch schema, allowlisted functions), otherwise the statement is refused.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, Ident, ObjectName, ObjectNamePart, Query, TableAlias, TableFactor, TableWithJoins, VisitMut, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::functions;
use super::guard::Tracker;
use super::secure::Ctx;
use super::writes;
use crate::auth::identity::Environment;
use crate::auth::store::PROXY_SCHEMA;
use crate::catalog::RelKind;
use crate::policy::Action;

/// At most this many managed-table references per statement: each becomes a secure relation,
/// and PostgreSQL's planning time grows quickly with them (red-teaming: 400 chained CTEs over
/// a managed table took 98 s to plan and could not be cancelled).
pub const MAX_SECURE_RELATIONS: usize = 64;

/// Internal names start with this; client text may not use it.
pub const RESERVED_PREFIX: &str = "__struere";

/// Catalog relations that expose other tenants' values or queries.
const HIDDEN_CATALOG_RELATIONS: &[&str] = &[
    "pg_statistic",
    "pg_statistic_ext_data",
    "pg_stats",
    "pg_stats_ext",
    "pg_stats_ext_exprs",
    "pg_stat_activity",
    "pg_stat_statements",
    "pg_stat_statements_info",
    "pg_authid",
    "pg_shadow",
    "pg_user_mapping",
    "pg_user_mappings",
    "pg_largeobject",
    "pg_prepared_xacts",
    "pg_locks",
    "pg_file_settings",
    "pg_hba_file_rules",
    "pg_ident_file_mappings",
    "pg_replication_slots",
    "pg_stat_replication",
    "pg_stat_wal_receiver",
    "pg_stat_subscription",
    "pg_subscription",
    "pg_backend_memory_contexts",
    // last_value of every sequence: other tenants' scratch sequences and the proxy's own.
    "pg_sequences",
];

/// Folds an identifier as PostgreSQL does: unquoted → lower case.
pub fn fold(i: &Ident) -> String {
    if i.quote_style.is_some() { i.value.clone() } else { i.value.to_lowercase() }
}

/// The parts of an object name, folded; `None` for a part sqlparser did not read as an identifier.
pub fn name_parts(n: &ObjectName) -> Option<Vec<String>> {
    n.0.iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => Some(fold(i)),
            _ => None,
        })
        .collect()
}

/// A relation reference, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Cte,
    Relation { schema: String, name: String },
}

struct Frame {
    names: Vec<String>,
    recursive: bool,
    cte_ptrs: Vec<*const Query>,
    /// Index of the CTE whose body is being walked.
    current: Option<usize>,
    /// CTEs fully walked (the body sees all of them).
    done: usize,
}

impl Frame {
    fn visible(&self) -> &[String] {
        if self.recursive {
            return &self.names;
        }
        let n = self.current.unwrap_or(self.done).min(self.names.len());
        self.names.get(..n).unwrap_or_default()
    }
}

/// A write statement being walked whose target is a managed table.
struct PendingWrite<'a> {
    spec: &'a crate::policy::TableSpec,
    action: Action,
    /// The target's table factor (UPDATE, DELETE): secured for the write rather than for reading.
    target: *const TableFactor,
}

pub struct Walker<'c, 'a> {
    pub ctx: &'c Ctx<'a>,
    pub allow_functions: &'c std::collections::BTreeSet<String>,
    frames: Vec<Frame>,
    pub error: Option<String>,
    /// A managed table was read somewhere in the statement.
    pub read_managed: bool,
    /// An unmanaged table is written somewhere in the statement.
    pub writes_unmanaged: bool,
    /// Write statements entered and not yet left (`None`: an unmanaged target).
    writes: Vec<Option<PendingWrite<'a>>>,
    /// Statements entered so far (a query walked on its own is not one).
    statements: usize,
    /// Which Selects hold guarded relations (guard.rs).
    guard: Tracker<'a>,
    /// Managed-table references secured so far.
    secured: usize,
}

impl<'c, 'a> Walker<'c, 'a> {
    pub fn new(ctx: &'c Ctx<'a>, allow_functions: &'c std::collections::BTreeSet<String>) -> Self {
        Walker {
            ctx,
            allow_functions,
            frames: Vec::new(),
            error: None,
            read_managed: false,
            writes_unmanaged: false,
            writes: Vec::new(),
            statements: 0,
            guard: Tracker::default(),
            secured: 0,
        }
    }

    /// Walk a statement (or any node), rewriting in place.
    pub fn run<V: VisitMut>(&mut self, node: &mut V) -> Result<(), String> {
        let _ = node.visit(self);
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn unmanaged_allowed(&self) -> bool {
        self.ctx.actor.environment == Environment::Development && self.ctx.roles.iter().any(|r| r.unmanaged_tables)
    }

    fn fail(&mut self, msg: String) -> ControlFlow<()> {
        if self.error.is_none() {
            self.error = Some(msg);
        }
        ControlFlow::Break(())
    }

    fn is_cte(&self, name: &str) -> bool {
        self.frames.iter().rev().any(|f| f.visible().iter().any(|n| n == name))
    }

    /// Resolve a relation name the way PostgreSQL does with the pinned search_path.
    pub fn resolve(&self, parts: &[String]) -> Result<Resolved, String> {
        match parts {
            [name] if self.is_cte(name) => Ok(Resolved::Cte),
            [name] => {
                // pg_catalog is searched before the search_path.
                let schema =
                    if self.ctx.catalog.relation("pg_catalog", name).is_some() { "pg_catalog" } else { "public" };
                Ok(Resolved::Relation { schema: schema.to_owned(), name: name.clone() })
            }
            [schema, name] => Ok(Resolved::Relation { schema: schema.clone(), name: name.clone() }),
            _ => Err(format!("relation name {} is not supported (use schema.table)", parts.join("."))),
        }
    }

    /// Resolve the target of a write: CTE names never apply to it (as in PostgreSQL).
    pub fn resolve_table(&self, name: &ObjectName) -> Result<(String, String), String> {
        let parts = name_parts(name).ok_or_else(|| format!("relation name {name} is not supported"))?;
        self.resolve_table_parts(&parts)
    }

    /// [`Self::resolve_table`] on a folded name.
    pub fn resolve_table_parts(&self, parts: &[String]) -> Result<(String, String), String> {
        match parts {
            [name] => {
                let schema =
                    if self.ctx.catalog.relation("pg_catalog", name).is_some() { "pg_catalog" } else { "public" };
                Ok((schema.to_owned(), name.clone()))
            }
            [schema, name] => Ok((schema.clone(), name.clone())),
            _ => Err(format!("relation name {} is not supported (use schema.table)", parts.join("."))),
        }
    }

    /// The managed table a write targets (`None`: an unmanaged table the caller may write).
    pub fn write_target(&self, name: &ObjectName, verb: &str) -> Result<Option<&'a crate::policy::TableSpec>, String> {
        let (schema, table) = self.resolve_table(name)?;
        if let Some(spec) = self.ctx.set.tables.table(&schema, &table) {
            return Ok(Some(spec));
        }
        self.check_plain_relation(&schema, &table)?;
        if schema == "pg_catalog" || schema == "information_schema" {
            return Err(format!("cannot {verb} the catalog relation {schema}.{table}"));
        }
        Ok(None)
    }

    /// Whether a read of this relation is allowed as it is (catalogs, unmanaged scratch tables).
    pub fn check_plain_relation(&self, schema: &str, name: &str) -> Result<(), String> {
        self.ctx.set.managed(schema, name)?;
        // Hidden catalog relations are refused under any schema the name might resolve to
        // (except a real table of the same name in public).
        let own_public_table = schema == "public" && self.ctx.catalog.relation("public", name).is_some();
        // Statistics views count and time every tenant's rows and statements.
        // (pg_statistic_ext holds only statistics definitions, which psql's \d reads.)
        let statistics = (name.starts_with("pg_stat_") || name.starts_with("pg_statio_")) && schema == "pg_catalog";
        if (HIDDEN_CATALOG_RELATIONS.contains(&name) || statistics) && !own_public_table {
            return Err(format!("{name} exposes other tenants' data or queries"));
        }
        if schema == PROXY_SCHEMA {
            return Err(format!(
                "the proxy's own schema ({schema}.{name}) is not reachable through an environment key"
            ));
        }
        if schema == "pg_catalog" || schema == "information_schema" {
            if HIDDEN_CATALOG_RELATIONS.contains(&name) {
                return Err(format!("{schema}.{name} exposes other tenants' data or queries"));
            }
            return Ok(());
        }
        if schema.starts_with(super::SCRATCH_PREFIX) && schema != super::scratch_schema(self.ctx.actor) {
            return Err(format!("relation {schema}.{name} belongs to another tenant's scratch schema"));
        }
        if schema.starts_with("pg_temp") || schema.starts_with("pg_toast") {
            return Err(format!("relation {schema}.{name} is not allowed"));
        }
        // Outside the caller's scratch schema, a view (it reads with its owner's rights), a
        // materialized view or foreign table (copies or other sources of rows), and an inheritance
        // child or partition (it holds rows its parent shows) could hand out a managed table's
        // rows without its secure relation. Only plain unmanaged tables are reachable directly.
        if schema != super::scratch_schema(self.ctx.actor)
            && let Some(rel) = self.ctx.catalog.relation(schema, name)
        {
            let what = match rel.kind {
                RelKind::View => Some("a view"),
                RelKind::MaterializedView => Some("a materialized view"),
                RelKind::ForeignTable => Some("a foreign table"),
                _ if rel.is_child => Some("an inheritance child or partition"),
                _ => None,
            };
            if let Some(what) = what {
                return Err(format!(
                    "relation {schema}.{name} is {what} outside the tenant's scratch schema: read directly, it could \
                     show a managed table's rows without the policy (use the managed tables themselves)"
                ));
            }
        }
        if self.unmanaged_allowed() {
            return Ok(());
        }
        Err(format!(
            "relation {schema}.{name} is not managed by the policy (unmanaged tables need a development role granted unmanaged_tables)"
        ))
    }

    fn secure(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
        let tf_ptr = tf as *const TableFactor;
        let TableFactor::Table { name, args, .. } = tf else {
            return match tf {
                TableFactor::Derived { .. }
                | TableFactor::NestedJoin { .. }
                | TableFactor::TableFunction { .. }
                | TableFactor::Function { .. }
                | TableFactor::UNNEST { .. } => ControlFlow::Continue(()),
                other => self.fail(format!("the table expression {other} is not supported by the proxy")),
            };
        };
        let Some(parts) = name_parts(name) else {
            return self.fail(format!("relation name {name} is not supported"));
        };
        // The target of a write to a managed table: the rows the caller may see and change.
        if let Some(Some(w)) = self.writes.last()
            && std::ptr::eq(w.target, tf_ptr)
        {
            let (spec, action) = (w.spec, w.action);
            let subquery = match self.guard.fenced_also(self.ctx, spec, Some(action)) {
                Ok(q) => q,
                Err(e) => return self.fail(format!("{e} ({action} reads the rows it changes)")),
            };
            let alias = take_alias(tf, &spec.name);
            self.read_managed = true;
            *tf = TableFactor::Derived { lateral: false, subquery, alias: Some(alias), sample: None };
            return ControlFlow::Continue(());
        }
        if args.is_some() {
            // `FROM f(...)`: a set-returning function call.
            return match functions::check(self.ctx.catalog, &parts, self.allow_functions) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => self.fail(e),
            };
        }
        let (schema, table) = match self.resolve(&parts) {
            Ok(Resolved::Cte) => {
                // A CTE named like a managed table is renamed (here and in its WITH clause, see
                // post_visit_query), so the output check never mistakes it for the table.
                if let [cte] = parts.as_slice()
                    && self.ctx.set.tables.by_name.contains_key(cte)
                    && let TableFactor::Table { name, alias, .. } = tf
                {
                    let original = Ident::with_quote('"', cte.clone());
                    *name = ObjectName::from(vec![Ident::with_quote('"', cte_name(cte))]);
                    if alias.is_none() {
                        *alias = Some(TableAlias { explicit: true, name: original, columns: vec![], at: None });
                    }
                }
                return ControlFlow::Continue(());
            }
            Ok(Resolved::Relation { schema, name }) => (schema, name),
            Err(e) => return self.fail(e),
        };
        let Some(spec) = self.ctx.set.tables.table(&schema, &table) else {
            return match self.check_plain_relation(&schema, &table) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => self.fail(e),
            };
        };
        self.secured += 1;
        if self.secured > MAX_SECURE_RELATIONS {
            return self.fail(format!(
                "a statement may reference managed tables at most {MAX_SECURE_RELATIONS} times (each becomes a secure relation)"
            ));
        }
        let alias = take_alias(tf, &table);
        // Guarded in a Select that may hold guarded relations, fenced elsewhere.
        let subquery = match self.guard.secure_relation(self.ctx, spec, &alias) {
            Ok(q) => q,
            Err(e) => return self.fail(e),
        };
        self.read_managed = true;
        *tf = TableFactor::Derived { lateral: false, subquery, alias: Some(alias), sample: None };
        ControlFlow::Continue(())
    }
}

/// The client's alias of a table factor about to be secured, or the table's name as one.
fn take_alias(tf: &mut TableFactor, table: &str) -> TableAlias {
    let given = match tf {
        TableFactor::Table { alias, .. } => alias.take(),
        _ => None,
    };
    given.unwrap_or_else(|| TableAlias {
        explicit: true,
        name: Ident::with_quote('"', table.to_owned()),
        columns: vec![],
        at: None,
    })
}

/// `pg_notify` or `pg_catalog.pg_notify`.
pub fn is_pg_notify(parts: &[String]) -> bool {
    matches!(parts, [n] if n == "pg_notify") || matches!(parts, [s, n] if s == "pg_catalog" && n == "pg_notify")
}

/// `pg_notify('<channel>', payload)` → `pg_notify('<tenant prefix><channel>', payload)`, as NOTIFY
/// is namespaced; a channel that is not a constant cannot be namespaced and is refused.
fn namespace_pg_notify(f: &mut sqlparser::ast::Function, prefix: &str) -> Result<(), String> {
    use sqlparser::ast::{FunctionArg, FunctionArgExpr, FunctionArguments, Value};
    let refused =
        || "pg_notify needs a constant channel name (it is namespaced per organization and environment)".to_owned();
    let FunctionArguments::List(list) = &mut f.args else { return Err(refused()) };
    if list.args.len() != 2 || !list.clauses.is_empty() || list.duplicate_treatment.is_some() {
        return Err(refused());
    }
    let Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) = list.args.first_mut() else {
        return Err(refused());
    };
    let Value::SingleQuotedString(channel) = &mut v.value else { return Err(refused()) };
    let namespaced = format!("{prefix}{channel}");
    if namespaced.len() > 63 {
        return Err(format!("channel name {channel} is too long"));
    }
    *channel = namespaced;
    Ok(())
}

/// The name a CTE named like a managed table is given in the forwarded SQL.
fn cte_name(name: &str) -> String {
    format!("{RESERVED_PREFIX}_cte_{name}")
}

/// Parse SQL the engine generated into a query.
pub fn parse_query(sql: &str) -> Result<Box<Query>, String> {
    let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| e.to_string())?;
    match (stmts.pop(), stmts.is_empty()) {
        (Some(sqlparser::ast::Statement::Query(q)), true) => Ok(q),
        _ => Err("expected one query".to_owned()),
    }
}

impl VisitorMut for Walker<'_, '_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
        let ptr = q as *const Query;
        if let Some(top) = self.frames.last_mut()
            && let Some(i) = top.cte_ptrs.iter().position(|p| *p == ptr)
        {
            top.current = Some(i);
        }
        let (names, recursive, cte_ptrs) = match &q.with {
            Some(w) => (
                w.cte_tables.iter().map(|c| fold(&c.alias.name)).collect(),
                w.recursive,
                w.cte_tables.iter().map(|c| &*c.query as *const Query).collect(),
            ),
            None => (Vec::new(), false, Vec::new()),
        };
        self.frames.push(Frame { names, recursive, cte_ptrs, current: None, done: 0 });
        self.guard.enter_query(q, self.statements > 0);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, q: &mut Query) -> ControlFlow<()> {
        self.frames.pop();
        if let Some(with) = q.with.as_mut() {
            for cte in &mut with.cte_tables {
                let folded = fold(&cte.alias.name);
                if self.ctx.set.tables.by_name.contains_key(&folded) {
                    cte.alias.name = Ident::with_quote('"', cte_name(&folded));
                }
            }
        }
        let ptr = q as *const Query;
        if let Some(top) = self.frames.last_mut()
            && let Some(i) = top.cte_ptrs.iter().position(|p| *p == ptr)
        {
            top.current = None;
            top.done = i + 1;
        }
        if let Err(e) = self.guard.leave_query(q, self.ctx) {
            return self.fail(e);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, stmt: &mut sqlparser::ast::Statement) -> ControlFlow<()> {
        use sqlparser::ast::{FromTable, Statement as S, TableObject};
        self.statements += 1;
        let (name, action, target, verb) = match stmt {
            S::Insert(ins) => match &ins.table {
                TableObject::TableName(n) => (n.clone(), Action::Insert, std::ptr::null(), "insert into"),
                _ => return self.fail("INSERT INTO a table function is not supported".to_owned()),
            },
            S::Update(u) => match &u.table.relation {
                TableFactor::Table { name, .. } => {
                    (name.clone(), Action::Update, &u.table.relation as *const TableFactor, "update")
                }
                other => return self.fail(format!("UPDATE of {other} is not supported")),
            },
            S::Delete(d) => match &d.from {
                FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => match t.as_slice() {
                    [TableWithJoins { relation: tf @ TableFactor::Table { name, .. }, .. }] => {
                        (name.clone(), Action::Delete, tf as *const TableFactor, "delete from")
                    }
                    _ => return self.fail("DELETE from this target is not supported".to_owned()),
                },
            },
            S::Merge(_) => {
                return self.fail(
                    "MERGE is not supported through the proxy; use INSERT … ON CONFLICT, UPDATE and DELETE".to_owned(),
                );
            }
            _ => return ControlFlow::Continue(()),
        };
        match self.write_target(&name, verb) {
            Ok(Some(spec)) => self.writes.push(Some(PendingWrite { spec, action, target })),
            Ok(None) => {
                self.writes_unmanaged = true;
                self.writes.push(None);
            }
            Err(e) => return self.fail(e),
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, stmt: &mut sqlparser::ast::Statement) -> ControlFlow<()> {
        use sqlparser::ast::Statement as S;
        if !matches!(stmt, S::Insert(_) | S::Update(_) | S::Delete(_)) {
            return ControlFlow::Continue(());
        }
        let Some(Some(pending)) = self.writes.pop() else { return ControlFlow::Continue(()) };
        let target = match writes::Target::new(self.ctx, pending.spec) {
            Ok(t) => t,
            Err(e) => return self.fail(e),
        };
        let rewritten = match stmt {
            S::Insert(ins) => writes::insert(&target, ins),
            S::Update(u) => writes::update(&target, u, &mut self.guard),
            S::Delete(d) => writes::delete(&target, d, &mut self.guard),
            _ => return ControlFlow::Continue(()),
        };
        match rewritten {
            Ok(new) => *stmt = new,
            Err(e) => return self.fail(e),
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &mut sqlparser::ast::Select) -> ControlFlow<()> {
        if select.into.is_some() {
            return self.fail("SELECT … INTO is not allowed: use CREATE TABLE (unmanaged tables only)".to_owned());
        }
        self.guard.enter_select(select);
        ControlFlow::Continue(())
    }

    fn post_visit_select(&mut self, _select: &mut sqlparser::ast::Select) -> ControlFlow<()> {
        self.guard.leave_select();
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        self.guard.note_expr(e);
        ControlFlow::Continue(())
    }

    fn post_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
        self.secure(tf)
    }

    fn pre_visit_ident(&mut self, ident: &mut Ident) -> ControlFlow<()> {
        if ident.value.to_ascii_lowercase().starts_with(RESERVED_PREFIX) {
            return self.fail(format!("names starting with {RESERVED_PREFIX} are reserved by the proxy"));
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            let Some(parts) = name_parts(&f.name) else {
                return self.fail(format!("function name {} is not supported", f.name));
            };
            if is_pg_notify(&parts) {
                return match namespace_pg_notify(f, &super::notify_prefix(self.ctx.actor)) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => self.fail(e),
                };
            }
            if super::is_setval(&parts) {
                if !self.unmanaged_allowed() {
                    return self.fail("setval needs a development role granted unmanaged_tables".to_owned());
                }
                return match super::qualify_setval(f, self.ctx.actor) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => self.fail(e),
                };
            }
            if let Err(msg) = functions::check(self.ctx.catalog, &parts, self.allow_functions) {
                return self.fail(msg);
            }
        }
        ControlFlow::Continue(())
    }
}
