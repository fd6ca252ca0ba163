//! The walk over one statement's tree: resolves every relation the way PostgreSQL would (CTE
//! names first, in their exact scope; then the pinned search_path), swaps managed tables for
//! secure relations, and checks every function call and catalog relation.

use std::ops::ControlFlow;

use sqlparser::ast::{Expr, Ident, ObjectName, ObjectNamePart, Query, TableAlias, TableFactor, VisitMut, VisitorMut};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::functions;
use super::guard::Tracker;
use super::secure::Ctx;
use crate::auth::identity::Environment;
use crate::auth::store::PROXY_SCHEMA;

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

pub struct Walker<'c, 'a> {
    pub ctx: &'c Ctx<'a>,
    pub allow_functions: &'c std::collections::BTreeSet<String>,
    frames: Vec<Frame>,
    pub error: Option<String>,
    /// A managed table was read somewhere in the statement.
    pub read_managed: bool,
    /// Statements entered so far (the walked statement itself is the first).
    statements: usize,
    /// Which Selects hold guarded relations (guard.rs).
    guard: Tracker<'a>,
}

impl<'c, 'a> Walker<'c, 'a> {
    pub fn new(ctx: &'c Ctx<'a>, allow_functions: &'c std::collections::BTreeSet<String>) -> Self {
        Walker {
            ctx,
            allow_functions,
            frames: Vec::new(),
            error: None,
            read_managed: false,
            statements: 0,
            guard: Tracker::default(),
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

    /// Whether a read of this relation is allowed as it is (catalogs, unmanaged scratch tables).
    pub fn check_plain_relation(&self, schema: &str, name: &str) -> Result<(), String> {
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
        if self.unmanaged_allowed() {
            return Ok(());
        }
        Err(format!(
            "relation {schema}.{name} is not managed by the policy (unmanaged tables need a development role granted unmanaged_tables)"
        ))
    }

    fn secure(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
        let TableFactor::Table { name, alias, args, .. } = tf else {
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
        if args.is_some() {
            // `FROM f(...)`: a set-returning function call.
            return match functions::check(self.ctx.catalog, &parts, self.allow_functions) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => self.fail(e),
            };
        }
        let (schema, table) = match self.resolve(&parts) {
            Ok(Resolved::Cte) => return ControlFlow::Continue(()),
            Ok(Resolved::Relation { schema, name }) => (schema, name),
            Err(e) => return self.fail(e),
        };
        let Some(spec) = self.ctx.set.tables.table(&schema, &table) else {
            return match self.check_plain_relation(&schema, &table) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => self.fail(e),
            };
        };
        let alias = alias.take().unwrap_or_else(|| TableAlias {
            explicit: true,
            name: Ident::with_quote('"', table.clone()),
            columns: vec![],
            at: None,
        });
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
        use sqlparser::ast::Statement as S;
        self.statements += 1;
        // Data-modifying statements inside a query (writable CTEs) bypass the statement-level
        // write rules: refused until writes to managed tables are rewritten.
        let nested = self.statements > 1 || !self.frames.is_empty();
        if nested && matches!(stmt, S::Insert(_) | S::Update(_) | S::Delete(_) | S::Merge(_)) {
            return self.fail(
                "data-modifying statements inside a query (WITH … INSERT/UPDATE/DELETE) are not supported yet"
                    .to_owned(),
            );
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
            if let Err(msg) = functions::check(self.ctx.catalog, &parts, self.allow_functions) {
                return self.fail(msg);
            }
        }
        ControlFlow::Continue(())
    }
}
