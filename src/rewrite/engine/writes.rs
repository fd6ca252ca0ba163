//! Writes to managed tables: INSERT (with ON CONFLICT), UPDATE and DELETE, rewritten so that
//!
//! - they reach only rows the caller may change (tenant + the action's scope rules), and see
//!   only rows and values it may read: every client expression (SET values, WHERE, RETURNING,
//!   ON CONFLICT … WHERE) is evaluated over the target's secure relation or its masked row,
//!   never over the raw target;
//! - new rows satisfy the action's scope rules, as row-level security's `WITH CHECK`: a
//!   violating row makes the statement fail with 42501 and nothing is written;
//! - environment and organization are set by the proxy (an INSERT naming other values fails,
//!   an UPDATE may not assign them); hidden and masked fields cannot be written, and writing a
//!   jsonb column keeps the keys the caller cannot see as they were.
//!
//! Shapes (`t` = the caller's name for the target, `T` = `__struere_t`, the real target):
//!
//! ```text
//! UPDATE s.tbl AS T SET c = CASE WHEN <check> THEN W.v1 END, …
//!   FROM (SELECT t.pk AS pk1, CAST(<client value> AS type) AS v1, …
//!         FROM (<secure relation: select ∧ update scope>) AS t, <client FROM> WHERE <client WHERE>) AS W
//!   WHERE T.pk = W.pk1 AND <tenant + update scope on T>
//!   RETURNING (SELECT <client item> FROM (SELECT <masked columns of T>) AS t), …
//! DELETE FROM s.tbl AS T USING (SELECT t.pk … same …) AS W WHERE T.pk = W.pk1 AND <delete scope on T>
//! INSERT INTO s.tbl AS T (cols…, env, org) SELECT S.c…, 'env', 'org'
//!   FROM (<client VALUES with casts, or client query>) AS S(cols…) WHERE <check>
//!   [ON CONFLICT … DO UPDATE SET (cols) = (SELECT … FROM (SELECT <values> FROM (<masked T>) AS t) AS N)
//!    WHERE CASE WHEN <scope on T> THEN (SELECT <client WHERE> FROM (<masked T>) AS t) ELSE false END]
//! ```
//!
//! The check is an expression that is `true` or raises an error whose text carries
//! [`check_marker`] and the number of the refusal message; the session layer turns that error
//! into the 42501 refusal. The marker holds a per-process random nonce; a client that learns it
//! (EXPLAIN of its own write shows it) can only make the proxy show one of its own messages.
//!
//! Invariant: a write changes only rows the caller may change, writes only rows it may see (WITH CHECK), never assigns
//! the environment or organization, and evaluates every client expression over masked values.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::sync::OnceLock;

use sqlparser::ast::{
    Assignment, AssignmentTarget, Delete, Expr, FromTable, Insert, ObjectNamePart, OnConflictAction, OnInsert,
    SelectItem, SetExpr, Statement, TableFactor, TableWithJoins, Update, UpdateTableFromKind, VisitMut, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::access::TableAccess;
use super::guard::Tracker;
use super::secure::{Ctx, RowRef, ident, literal};
use super::walk::fold;
use crate::catalog::Column;
use crate::policy::{Action, FieldAccess, TableSpec};

/// The real target's alias, the client-values subquery, the new-values subquery.
const TARGET: &str = "__struere_t";
const WORK: &str = "__struere_w";
const SOURCE: &str = "__struere_s";
const NEW: &str = "__struere_n";
/// Placeholders in the generated skeleton, filled with the client's (already walked) nodes.
const SLOT: &str = "__struere_slot_";
const FROM_SLOT: &str = "__struere_from";

/// `struere_check_<nonce>_`: the start of every check failure's text.
pub fn check_marker() -> &'static str {
    static MARKER: OnceLock<String> = OnceLock::new();
    MARKER.get_or_init(|| {
        let mut nonce = [0u8; 8];
        if getrandom::fill(&mut nonce).is_err() {
            // No randomness: still unique per process and not derivable from client input.
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            nonce = (t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
        }
        format!("struere_check_{}_", hex::encode(nonce))
    })
}

/// The refusal messages check failures carry, by number. The error text a client can provoke
/// (or read, e.g. in an EXPLAIN of its own write) holds only the marker and a number, so a
/// forged marker can only ever bring up one of the proxy's own messages. Messages depend on
/// tables, actions, roles and column names only, so the registry stays small; past its bound a
/// generic message is used.
struct Messages {
    ids: std::collections::HashMap<String, usize>,
    texts: Vec<String>,
}

const MAX_MESSAGES: usize = 100_000;
const GENERIC_CHECK_MESSAGE: &str =
    "refused: the written row is outside the caller's scope (WITH CHECK); nothing was written";

fn messages() -> std::sync::MutexGuard<'static, Messages> {
    static MESSAGES: OnceLock<std::sync::Mutex<Messages>> = OnceLock::new();
    MESSAGES
        .get_or_init(|| {
            std::sync::Mutex::new(Messages {
                ids: std::collections::HashMap::new(),
                texts: vec![GENERIC_CHECK_MESSAGE.to_owned()],
            })
        })
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn message_id(message: &str) -> usize {
    let mut m = messages();
    if let Some(id) = m.ids.get(message) {
        return *id;
    }
    if m.texts.len() >= MAX_MESSAGES {
        return 0;
    }
    let id = m.texts.len();
    m.texts.push(message.to_owned());
    m.ids.insert(message.to_owned(), id);
    id
}

/// An expression that raises an error carrying `message` (by number) when evaluated. It is
/// volatile (`random()`), so PostgreSQL never folds it at plan time: it fails only for a row
/// that reaches it.
pub fn fail_expr(message: &str) -> String {
    let text = format!("{}{}_", check_marker(), message_id(message));
    format!("(({} || random()::pg_catalog.text)::pg_catalog.bool)", literal(&text))
}

/// The refusal message of a server error raised by [`fail_expr`], if it is one.
pub fn decode_check_failure(server_message: &str) -> Option<String> {
    let marker = check_marker();
    let start = server_message.find(marker)? + marker.len();
    let rest = server_message.get(start..)?;
    let id: usize = rest.split('_').next()?.parse().ok()?;
    messages().texts.get(id).cloned()
}

/// `true` when every condition holds; otherwise an error with the first failing one's message.
/// A NULL condition fails (as in `WITH CHECK`). CASE fixes the evaluation order.
fn check_all(conds: Vec<(String, String)>) -> Option<String> {
    if conds.is_empty() {
        return None;
    }
    let mut acc = "true".to_owned();
    for (cond, message) in conds.into_iter().rev() {
        acc = format!("CASE WHEN coalesce(({cond}), false) THEN {acc} ELSE {} END", fail_expr(&message));
    }
    Some(acc)
}

/// What of one column a write may set.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Writable {
    Whole,
    /// A jsonb column of which only some keys may be set; the others keep their values.
    Keys(KeySet),
    No,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeySet {
    Only(BTreeSet<String>),
    AllExcept(BTreeSet<String>),
}

impl KeySet {
    /// SQL condition: the jsonb key `key_expr` may be written.
    fn condition(&self, key_expr: &str) -> String {
        let list = |keys: &BTreeSet<String>| keys.iter().map(|k| literal(k)).collect::<Vec<_>>().join(", ");
        match self {
            KeySet::Only(k) if k.is_empty() => "false".to_owned(),
            KeySet::Only(k) => format!("{key_expr} IN ({})", list(k)),
            KeySet::AllExcept(k) if k.is_empty() => "true".to_owned(),
            KeySet::AllExcept(k) => format!("{key_expr} NOT IN ({})", list(k)),
        }
    }

    fn intersect(self, other: KeySet) -> KeySet {
        match (self, other) {
            (KeySet::Only(a), KeySet::Only(b)) => KeySet::Only(a.intersection(&b).cloned().collect()),
            (KeySet::Only(a), KeySet::AllExcept(m)) | (KeySet::AllExcept(m), KeySet::Only(a)) => {
                KeySet::Only(a.difference(&m).cloned().collect())
            }
            (KeySet::AllExcept(a), KeySet::AllExcept(b)) => KeySet::AllExcept(a.union(&b).cloned().collect()),
        }
    }
}

/// A field is writable when it is visible unmasked: a masked value written back would replace
/// the real one, and a hidden one could be overwritten blind.
fn writable_in(fields: &FieldAccess, col: &Column) -> Writable {
    let whole_masked = fields.masked.iter().any(|(f, _)| f.column == col.name && f.path.is_empty());
    if whole_masked {
        return Writable::No;
    }
    let whole = fields.all || fields.visible.iter().any(|f| f.column == col.name && f.path.is_empty());
    let masked_keys: BTreeSet<String> = fields
        .masked
        .iter()
        .filter(|(f, _)| f.column == col.name)
        .filter_map(|(f, _)| f.path.first().cloned())
        .collect();
    let keys: BTreeSet<String> = fields
        .visible
        .iter()
        .filter(|f| f.column == col.name && f.path.len() == 1)
        .filter_map(|f| f.path.first().cloned())
        .collect();
    if whole && masked_keys.is_empty() {
        return Writable::Whole;
    }
    if col.type_name != "jsonb" {
        return Writable::No;
    }
    if whole {
        Writable::Keys(KeySet::AllExcept(masked_keys))
    } else if keys.is_empty() {
        Writable::No
    } else {
        Writable::Keys(KeySet::Only(keys))
    }
}

/// Writable under every part of the access (a row may fall under any of them).
fn writable(access: &TableAccess, col: &Column) -> Writable {
    let mut acc = Writable::Whole;
    for part in &access.parts {
        acc = match (acc, writable_in(&part.fields, col)) {
            (Writable::No, _) | (_, Writable::No) => Writable::No,
            (Writable::Whole, w) | (w, Writable::Whole) => w,
            (Writable::Keys(a), Writable::Keys(b)) => Writable::Keys(a.intersect(b)),
        };
    }
    acc
}

/// The jsonb value to store when the caller writes `new` over `old` (None for an INSERT) but
/// may only set `keys`: the caller's writable keys from `new`, every other key from `old`.
fn merge_json(old: Option<&str>, new: &str, keys: &KeySet, column: &str) -> String {
    let take = |src: &str, alias: &str, keep: bool| {
        let cond = keys.condition(&format!("{alias}.key"));
        let cond = if keep { cond } else { format!("NOT ({cond})") };
        format!(
            "coalesce((SELECT jsonb_object_agg({alias}.key, {alias}.value) FROM jsonb_each({src}) AS {alias} WHERE {cond}), '{{}}'::pg_catalog.jsonb)"
        )
    };
    let not_object = fail_expr(&format!(
        "refused: column {column} holds fields the caller cannot see, so it must be written as a JSON object"
    ));
    let fresh = take(new, "__struere_nk", true);
    let merged = match old {
        None => fresh,
        Some(old) => {
            let old_obj =
                format!("(CASE WHEN jsonb_typeof({old}) = 'object' THEN {old} ELSE '{{}}'::pg_catalog.jsonb END)");
            format!("{} || {fresh}", take(&old_obj, "__struere_ok", false))
        }
    };
    let null_case =
        if old.is_none() { format!("WHEN ({new}) IS NULL THEN NULL::pg_catalog.jsonb ") } else { String::new() };
    format!(
        "(CASE {null_case}WHEN jsonb_typeof({new}) = 'object' THEN {merged} WHEN {not_object} THEN NULL::pg_catalog.jsonb END)"
    )
}

fn slot(slots: &mut Vec<Option<Expr>>, e: Expr) -> String {
    slots.push(Some(e));
    ident(&format!("{SLOT}{}", slots.len() - 1))
}

fn is_default(e: &Expr) -> bool {
    matches!(e, Expr::Identifier(i) if i.quote_style.is_none() && i.value.eq_ignore_ascii_case("default"))
}

fn assignment_column(a: &Assignment) -> Result<String, String> {
    match &a.target {
        AssignmentTarget::ColumnName(n) => match n.0.as_slice() {
            [ObjectNamePart::Identifier(i)] => Ok(fold(i)),
            _ => Err(format!("assigning {n} (a field or element of a column) is not supported on a managed table")),
        },
        AssignmentTarget::Tuple(_) => {
            Err("SET (a, b) = … is not supported on a managed table; assign the columns one by one".to_owned())
        }
    }
}

/// Everything one write rewrite needs about its target.
pub struct Target<'c, 'a> {
    pub ctx: &'c Ctx<'a>,
    pub spec: &'a TableSpec,
    columns: &'a [Column],
}

impl<'c, 'a> Target<'c, 'a> {
    pub fn new(ctx: &'c Ctx<'a>, spec: &'a TableSpec) -> Result<Self, String> {
        Ok(Target { ctx, spec, columns: ctx.columns(spec)? })
    }

    fn column(&self, name: &str) -> Result<&'a Column, String> {
        self.columns.iter().find(|c| c.name == name).ok_or_else(|| format!("{} has no column {name}", self.spec.name))
    }

    fn is_tenant_column(&self, name: &str) -> bool {
        self.spec.environment_column.as_deref() == Some(name) || self.spec.organization_column.as_deref() == Some(name)
    }

    fn access(&self, action: Action, what: &str) -> Result<TableAccess, String> {
        self.ctx.access(self.spec, action).map_err(|e| format!("{e} ({what})"))
    }

    /// The primary key the rewritten write joins on. It must be visible unmasked, since the
    /// client's view of the target carries it.
    fn key(&self, select: &TableAccess) -> Result<Vec<String>, String> {
        let rel = self
            .ctx
            .catalog
            .relation(&self.spec.schema, &self.spec.name)
            .ok_or_else(|| format!("managed table {} is missing from the catalog", self.spec.name))?;
        if rel.primary_key.is_empty() {
            return Err(format!("writes to {} need a primary key on the table", self.spec.name));
        }
        for k in &rel.primary_key {
            let col = self.column(k)?;
            let seen = self.ctx.column_value(self.spec, "k", col, select)?;
            if seen != format!("{}.{}", ident("k"), ident(k)) {
                return Err(format!(
                    "writes to {} need its primary key column {k} visible unmasked to the caller",
                    self.spec.name
                ));
            }
        }
        Ok(rel.primary_key.clone())
    }

    /// `(SELECT <masked columns of T>) AS "alias"`: the caller's view of the row T holds.
    fn masked_row(&self, select: &TableAccess, alias: &str) -> Result<String, String> {
        let mut cols = Vec::new();
        for c in self.columns {
            cols.push(format!("{} AS {}", self.ctx.column_value(self.spec, TARGET, c, select)?, ident(&c.name)));
        }
        Ok(format!("(SELECT {}) AS {}", cols.join(", "), ident(alias)))
    }

    /// RETURNING over the masked new (or deleted) row. `others`: the statement has FROM/USING
    /// items, which `*` would include and which RETURNING cannot reach after the rewrite.
    fn returning(
        &self,
        items: Option<Vec<SelectItem>>,
        alias: &str,
        others: bool,
        slots: &mut Vec<Option<Expr>>,
    ) -> Result<String, String> {
        let Some(items) = items else { return Ok(String::new()) };
        let select = self.access(Action::Select, "RETURNING reads the written rows")?;
        let row = self.masked_row(&select, alias)?;
        let mut out = Vec::new();
        let all_columns = |out: &mut Vec<String>| {
            for c in self.columns {
                out.push(format!("(SELECT {}.{} FROM {row}) AS {}", ident(alias), ident(&c.name), ident(&c.name)));
            }
        };
        for item in items {
            match item {
                SelectItem::UnnamedExpr(e) => out.push(format!("(SELECT {} FROM {row})", slot(slots, e))),
                SelectItem::ExprWithAlias { expr, alias: a } => {
                    out.push(format!("(SELECT {} FROM {row}) AS {}", slot(slots, expr), ident(&fold(&a))))
                }
                SelectItem::Wildcard(_) if others => {
                    return Err("RETURNING * with FROM/USING items is not supported on a managed table; list the target's columns".to_owned());
                }
                SelectItem::Wildcard(_) => all_columns(&mut out),
                SelectItem::QualifiedWildcard(kind, _) => {
                    let name = kind.to_string();
                    let parts: Vec<&str> = name.split('.').collect();
                    let own = parts.last().is_some_and(|p| p.trim_matches('"').eq_ignore_ascii_case(alias));
                    if !own || parts.len() != 1 {
                        return Err(format!("RETURNING {name}.* is not supported on a managed table"));
                    }
                    all_columns(&mut out);
                }
                other => return Err(format!("RETURNING {other} is not supported")),
            }
        }
        Ok(format!(" RETURNING {}", out.join(", ")))
    }

    /// The client's assignments as (column, value), refusing what may not be written.
    fn assignments(&self, assignments: Vec<Assignment>, access: &TableAccess) -> Result<Vec<Assign<'a>>, String> {
        let mut out = Vec::new();
        for a in assignments {
            let name = assignment_column(&a)?;
            let col = self.column(&name)?;
            if self.is_tenant_column(&name) {
                return Err(format!(
                    "the environment and organization columns of {} ({name}) can never be changed",
                    self.spec.name
                ));
            }
            let how = writable(access, col);
            if how == Writable::No {
                return Err(format!(
                    "column {name} of {} is hidden or masked for the caller and cannot be written",
                    self.spec.name
                ));
            }
            out.push(Assign { col, how, value: a.value });
        }
        Ok(out)
    }

    /// The new values of assigned columns (in terms of `values_of(i)`), the SET list with the
    /// check folded into its first item, and the check itself.
    fn set_list(
        &self,
        assigns: &[(&'a Column, Writable, Option<String>)],
        access: &TableAccess,
        message: &str,
    ) -> Result<Vec<(String, String)>, String> {
        let mut new_values = BTreeMap::new();
        let mut unknown = BTreeSet::new();
        let mut sets = Vec::new();
        for (col, how, value) in assigns {
            let target_col = format!("{}.{}", ident(TARGET), ident(&col.name));
            let Some(v) = value else {
                unknown.insert(col.name.clone());
                sets.push((col.name.clone(), "DEFAULT".to_owned()));
                continue;
            };
            let new = match how {
                Writable::Keys(keys) => merge_json(Some(&target_col), v, keys, &col.name),
                _ => v.clone(),
            };
            new_values.insert(col.name.clone(), new.clone());
            sets.push((col.name.clone(), new));
        }
        let row = RowRef::Values { values: &new_values, fallback: Some(TARGET), unknown: &unknown };
        let mut conds: Vec<(String, String)> =
            self.ctx.scope_predicate(self.spec, &row, access)?.into_iter().map(|p| (p, message.to_owned())).collect();
        conds.extend(self.reference_checks(&row, |c| new_values.contains_key(c) || unknown.contains(c))?);
        if let (Some(check), Some(first)) = (check_all(conds), sets.iter_mut().find(|(_, v)| v != "DEFAULT")) {
            first.1 = format!("CASE WHEN {check} THEN {} END", first.1);
        }
        Ok(sets)
    }

    /// Foreign keys of the target that reference a managed table: a written row may only refer
    /// to rows of the caller's own organization and environment. (PostgreSQL checks foreign keys
    /// across all rows: without this, a tenant could attach rows to another tenant's, blocking
    /// its deletes, and learn which ids exist elsewhere.) `written(col)`: the statement sets col.
    fn reference_checks(&self, row: &RowRef, written: impl Fn(&str) -> bool) -> Result<Vec<(String, String)>, String> {
        let Some(rel) = self.ctx.catalog.relation(&self.spec.schema, &self.spec.name) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for fk in &rel.foreign_keys {
            let Some(target) = self.ctx.set.tables.table(&fk.ref_schema, &fk.ref_table) else { continue };
            if !fk.columns.iter().any(|c| written(c)) || fk.columns.len() != fk.ref_columns.len() {
                continue;
            }
            let alias = self.ctx.alias();
            let tenant = self.ctx.tenant_predicate(target, &alias);
            if tenant.is_empty() {
                continue;
            }
            let mut nulls = Vec::new();
            let mut matches = Vec::new();
            for (c, r) in fk.columns.iter().zip(&fk.ref_columns) {
                let v = row.col(c)?;
                nulls.push(format!("{v} IS NULL"));
                matches.push(format!("{}.{} = {v}", ident(&alias), ident(r)));
            }
            matches.extend(tenant);
            out.push((
                format!(
                    "{} OR EXISTS (SELECT 1 FROM {}.{} AS {} WHERE {})",
                    nulls.join(" OR "),
                    ident(&target.schema),
                    ident(&target.name),
                    ident(&alias),
                    matches.join(" AND ")
                ),
                format!(
                    "refused: {} of {} must refer to a row of {} in the caller's organization and environment",
                    fk.columns.join(", "),
                    self.spec.name,
                    target.name
                ),
            ));
        }
        Ok(out)
    }

    fn scope_message(&self, action: Action) -> String {
        let roles = self.ctx.actor.roles.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", ");
        format!(
            "refused: the {} row is outside what role{} {roles} may {action} in {} (WITH CHECK); nothing was written",
            if action == Action::Insert { "new" } else { "updated" },
            if self.ctx.actor.roles.len() == 1 { "" } else { "s" },
            self.spec.name
        )
    }

    fn qualified(&self) -> String {
        format!("{}.{}", ident(&self.spec.schema), ident(&self.spec.name))
    }
}

struct Assign<'a> {
    col: &'a Column,
    how: Writable,
    value: Expr,
}

/// The client's name for a secured target (its alias, or the table name).
fn secured_alias(tf: &TableFactor) -> Result<String, String> {
    match tf {
        TableFactor::Derived { alias: Some(a), .. } => Ok(fold(&a.name)),
        _ => Err("internal error: the write target was not secured".to_owned()),
    }
}

/// Refuse a client expression that names a column the caller cannot see at all.
fn refuse_hidden(t: &Target, select: &TableAccess, exprs: &[&Expr]) -> Result<(), String> {
    let mut hidden = BTreeSet::new();
    for c in t.columns {
        if t.ctx.column_value(t.spec, "h", c, select)? == format!("NULL::{}", c.type_name) {
            hidden.insert(c.name.clone());
        }
    }
    if hidden.is_empty() {
        return Ok(());
    }
    struct Finder<'h> {
        hidden: &'h BTreeSet<String>,
        found: Option<String>,
    }
    impl sqlparser::ast::Visitor for Finder<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            let name = match e {
                Expr::Identifier(i) => Some(fold(i)),
                Expr::CompoundIdentifier(parts) => parts.last().map(fold),
                _ => None,
            };
            if let Some(n) = name.filter(|n| self.hidden.contains(n)) {
                self.found = Some(n);
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let mut f = Finder { hidden: &hidden, found: None };
    for e in exprs {
        let _ = sqlparser::ast::Visit::visit(*e, &mut f);
    }
    match f.found {
        Some(n) => Err(format!("column {n} of {} is hidden for the caller and cannot be used in a write", t.spec.name)),
        None => Ok(()),
    }
}

/// Whether an UPDATE may assign only part of `column` (an element, slice or field: `SET col[i] =
/// …`, `rewrite/subscript.rs`). Such a statement is rewritten and checked as a whole-column
/// assignment, so nothing the rewrite decides may read the column's new value: not the tenant
/// predicate, not a row rule of select or update (the row predicate, the WITH CHECK, the choice of
/// a part's masks), not a reference check into a managed table; and the caller must see and
/// write the column unmasked (a masked or partly visible column is written through a merge of
/// its new value).
pub fn partial_assignment(t: &Target, column: &str) -> Result<(), String> {
    let select = t.access(Action::Select, "UPDATE reads the rows it changes")?;
    let update = t.access(Action::Update, "UPDATE")?;
    let col = t.column(column)?;
    let refused = |why: &str| {
        format!(
            "the assignment to part of column {column} of {} (SET {column}[…] = …) cannot be checked: {why}; the \
             proxy checks only whole values of such a column (assign the whole column)",
            t.spec.name
        )
    };
    if t.is_tenant_column(column) {
        return Err(refused("it is the environment or organization column"));
    }
    for (action, access) in [(Action::Select, &select), (Action::Update, &update)] {
        if t.ctx.reads_column(t.spec, access, column)? {
            return Err(refused(&format!("a {action} row rule of the caller's roles reads it")));
        }
    }
    let plain = format!("{}.{}", ident("c"), ident(column));
    if t.ctx.column_value(t.spec, "c", col, &select)? != plain || writable(&update, col) != Writable::Whole {
        return Err(refused("it is masked or partly hidden for the caller"));
    }
    let (values, unknown) = (BTreeMap::new(), BTreeSet::from([column.to_owned()]));
    let row = RowRef::Values { values: &values, fallback: Some(TARGET), unknown: &unknown };
    if t.reference_checks(&row, |c| c == column).is_err() {
        return Err(refused("a reference check into a managed table reads it"));
    }
    Ok(())
}

pub fn update<'a>(t: &Target<'_, 'a>, u: &mut Update, guard: &mut Tracker<'a>) -> Result<Statement, String> {
    let select = t.access(Action::Select, "UPDATE reads the rows it changes")?;
    let access = t.access(Action::Update, "UPDATE")?;
    let key = t.key(&select)?;
    let alias = secured_alias(&u.table.relation)?;
    if !u.table.joins.is_empty() {
        return Err("UPDATE of a join is not supported".to_owned());
    }
    let assigns = t.assignments(std::mem::take(&mut u.assignments), &access)?;
    {
        let mut exprs: Vec<&Expr> = assigns.iter().map(|a| &a.value).collect();
        exprs.extend(u.selection.iter());
        refuse_hidden(t, &select, &exprs)?;
    }
    let mut slots = Vec::new();
    let mut work_items: Vec<String> = key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{}.{} AS {}", ident(&alias), ident(k), ident(&format!("__struere_pk{i}"))))
        .collect();
    let mut shaped = Vec::new();
    for (i, a) in assigns.into_iter().enumerate() {
        if is_default(&a.value) {
            shaped.push((a.col, a.how, None));
            continue;
        }
        let name = format!("__struere_v{i}");
        work_items.push(format!("CAST({} AS {}) AS {}", slot(&mut slots, a.value), a.col.type_name, ident(&name)));
        shaped.push((a.col, a.how, Some(format!("{}.{}", ident(WORK), ident(&name)))));
    }
    let sets = t.set_list(&shaped, &access, &t.scope_message(Action::Update))?;
    let set_sql = sets.iter().map(|(c, v)| format!("{} = {v}", ident(c))).collect::<Vec<_>>().join(", ");
    let where_sql = match u.selection.take() {
        Some(e) => format!(" WHERE {}", slot(&mut slots, e)),
        None => String::new(),
    };
    let from_items = match u.from.take() {
        None => Vec::new(),
        Some(UpdateTableFromKind::AfterSet(items)) => items,
        Some(UpdateTableFromKind::BeforeSet(_)) => return Err("UPDATE FROM … SET is not PostgreSQL syntax".to_owned()),
    };
    let returning = t.returning(u.returning.take(), &alias, !from_items.is_empty(), &mut slots)?;
    let join = key_join(&key);
    let pred = t.ctx.row_predicate(t.spec, TARGET, &access)?;
    let sql = format!(
        "UPDATE {} AS {} SET {set_sql} FROM (SELECT {} FROM {}{where_sql}) AS {} WHERE {join} AND {pred}{returning}",
        t.qualified(),
        ident(TARGET),
        work_items.join(", "),
        ident(FROM_SLOT),
        ident(WORK),
    );
    let mut from = vec![u.table.clone()];
    from.extend(from_items);
    let mut stmt = fill(&sql, slots, Some(from), None)?;
    if let Statement::Update(Update { from: Some(UpdateTableFromKind::AfterSet(items)), .. }) = &mut stmt
        && let Some(q) = work_query(items)
    {
        guard.guard_write(t.ctx, q, t.spec, Action::Update)?;
    }
    Ok(stmt)
}

/// The row-finding subquery (`__struere_w`) of a rewritten UPDATE or DELETE.
fn work_query(items: &mut [TableWithJoins]) -> Option<&mut sqlparser::ast::Query> {
    match items.first_mut().map(|t| &mut t.relation) {
        Some(TableFactor::Derived { subquery, alias: Some(a), .. }) if a.name.value == WORK => Some(subquery),
        _ => None,
    }
}

pub fn delete<'a>(t: &Target<'_, 'a>, d: &mut Delete, guard: &mut Tracker<'a>) -> Result<Statement, String> {
    let select = t.access(Action::Select, "DELETE reads the rows it removes")?;
    let access = t.access(Action::Delete, "DELETE")?;
    let key = t.key(&select)?;
    let target = match &mut d.from {
        FromTable::WithFromKeyword(v) | FromTable::WithoutKeyword(v) if v.len() == 1 => v.remove(0),
        _ => return Err("DELETE from several tables is not PostgreSQL syntax".to_owned()),
    };
    if !target.joins.is_empty() || !d.tables.is_empty() {
        return Err("DELETE of a join is not supported".to_owned());
    }
    let alias = secured_alias(&target.relation)?;
    refuse_hidden(t, &select, &d.selection.iter().collect::<Vec<_>>())?;
    let mut slots = Vec::new();
    let work_items: Vec<String> = key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{}.{} AS {}", ident(&alias), ident(k), ident(&format!("__struere_pk{i}"))))
        .collect();
    let where_sql = match d.selection.take() {
        Some(e) => format!(" WHERE {}", slot(&mut slots, e)),
        None => String::new(),
    };
    let using = d.using.take().unwrap_or_default();
    let returning = t.returning(d.returning.take(), &alias, !using.is_empty(), &mut slots)?;
    let sql = format!(
        "DELETE FROM {} AS {} USING (SELECT {} FROM {}{where_sql}) AS {} WHERE {} AND {}{returning}",
        t.qualified(),
        ident(TARGET),
        work_items.join(", "),
        ident(FROM_SLOT),
        ident(WORK),
        key_join(&key),
        t.ctx.row_predicate(t.spec, TARGET, &access)?,
    );
    let mut from = vec![target];
    from.extend(using);
    let mut stmt = fill(&sql, slots, Some(from), None)?;
    if let Statement::Delete(Delete { using: Some(items), .. }) = &mut stmt
        && let Some(q) = work_query(items)
    {
        guard.guard_write(t.ctx, q, t.spec, Action::Delete)?;
    }
    Ok(stmt)
}

fn key_join(key: &[String]) -> String {
    key.iter()
        .enumerate()
        .map(|(i, k)| {
            format!("{}.{} = {}.{}", ident(TARGET), ident(k), ident(WORK), ident(&format!("__struere_pk{i}")))
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

pub fn insert(t: &Target, ins: &mut Insert) -> Result<Statement, String> {
    let access = t.access(Action::Insert, "INSERT")?;
    let alias = match &ins.table_alias {
        Some(a) => fold(&a.alias),
        None => t.spec.name.clone(),
    };
    if ins.overriding.is_some() {
        return Err("INSERT … OVERRIDING is not supported on a managed table".to_owned());
    }
    let mut columns: Vec<String> = Vec::new();
    for c in &ins.columns {
        match c.0.as_slice() {
            [ObjectNamePart::Identifier(i)] => columns.push(fold(i)),
            _ => return Err(format!("INSERT column {c} is not supported on a managed table")),
        }
    }
    let mut source = ins.source.take();
    // The client's rows, with each value cast to its column's type (so literals and
    // parameters are typed as if they were inserted directly).
    let plain_values = source.as_ref().is_some_and(|q| {
        matches!(q.body.as_ref(), SetExpr::Values(_))
            && q.with.is_none()
            && q.order_by.is_none()
            && q.limit_clause.is_none()
            && q.fetch.is_none()
    });
    let width = match source.as_deref().map(|q| q.body.as_ref()) {
        None => 0,
        Some(SetExpr::Values(v)) => v.rows.first().map_or(0, |r| r.len()),
        Some(SetExpr::Select(s))
            if !s
                .projection
                .iter()
                .any(|p| matches!(p, SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..))) =>
        {
            s.projection.len()
        }
        Some(_) => columns.len(),
    };
    if columns.is_empty() {
        if width == 0 && source.is_some() {
            return Err("INSERT … SELECT * into a managed table needs a column list".to_owned());
        }
        columns = t.columns.iter().take(width).map(|c| c.name.clone()).collect();
        if columns.len() < width {
            return Err(format!("INSERT has more values than {} has columns", t.spec.name));
        }
    }
    let cols: Vec<&Column> = columns.iter().map(|c| t.column(c)).collect::<Result<_, _>>()?;
    if plain_values
        && let Some(q) = source.as_mut()
        && let SetExpr::Values(v) = q.body.as_mut()
    {
        // Columns that are DEFAULT in every row are left to their defaults.
        let mut keep = vec![true; cols.len()];
        for (j, k) in keep.iter_mut().enumerate() {
            let defaults = v.rows.iter().filter(|r| r.get(j).is_some_and(is_default)).count();
            if defaults == v.rows.len() && defaults > 0 {
                *k = false;
            } else if defaults > 0 {
                return Err(
                    "DEFAULT in only some rows of a multi-row VALUES is not supported on a managed table".to_owned()
                );
            }
        }
        let templates: Vec<Expr> = cols.iter().map(|c| cast_template(&c.type_name)).collect::<Result<_, _>>()?;
        for row in v.rows.iter_mut() {
            if row.len() != cols.len() {
                return Err("INSERT has a different number of values than columns".to_owned());
            }
            let old = std::mem::take(&mut row.content);
            row.content = old
                .into_iter()
                .zip(templates.iter().zip(&keep))
                .filter(|(_, (_, k))| **k)
                .map(|(e, (tpl, _))| with_cast(tpl.clone(), e))
                .collect();
        }
        let mut it = keep.iter();
        columns.retain(|_| *it.next().unwrap_or(&true));
    } else if let Some(SetExpr::Select(sel)) = source.as_deref_mut().map(|q| q.body.as_mut())
        && sel.distinct.is_none()
    {
        // PostgreSQL gives an untyped literal (or parameter) of an INSERT … SELECT target list
        // its column's type; once the query is a subquery of the rewrite it would be text, so
        // `SELECT '{}'` into a jsonb column would fail. Cast exactly those, as PostgreSQL would.
        for (item, col) in sel.projection.iter_mut().zip(&cols) {
            let expr = match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e,
                _ => continue,
            };
            if is_untyped_literal(expr) {
                let value = std::mem::replace(expr, Expr::value(sqlparser::ast::Value::Null));
                *expr = with_cast(cast_template(&col.type_name)?, value);
            }
        }
    }
    let cols: Vec<&Column> = columns.iter().map(|c| t.column(c)).collect::<Result<_, _>>()?;
    // Values as the check and the projection read them.
    let mut values = BTreeMap::new();
    let mut projection = Vec::new();
    let mut conds = Vec::new();
    let tenant = t.ctx.tenant_values(t.spec);
    for c in &cols {
        let src = format!("{}.{}", ident(SOURCE), ident(&c.name));
        if let Some((_, value)) = tenant.iter().find(|(n, _)| *n == c.name) {
            conds.push((
                format!("{src} = {value}"),
                format!(
                    "refused: INSERT into {} may not name another environment or organization ({} is set from the key)",
                    t.spec.name, c.name
                ),
            ));
            values.insert(c.name.clone(), src.clone());
            projection.push(src);
            continue;
        }
        let v = match writable(&access, c) {
            Writable::No => {
                return Err(format!(
                    "column {} of {} is hidden or masked for the caller and cannot be written",
                    c.name, t.spec.name
                ));
            }
            Writable::Whole => src,
            Writable::Keys(keys) => merge_json(None, &src, &keys, &c.name),
        };
        values.insert(c.name.clone(), v.clone());
        projection.push(v);
    }
    let mut all_columns = columns.clone();
    for (name, value) in &tenant {
        if !columns.iter().any(|c| c == name) {
            let col = t.column(name)?;
            let v = format!("CAST({value} AS {})", col.type_name);
            values.insert((*name).to_owned(), v.clone());
            projection.push(v);
            all_columns.push((*name).to_owned());
        }
    }
    let unknown = BTreeSet::new();
    let row = RowRef::Values { values: &values, fallback: None, unknown: &unknown };
    if let Some(scope) = t.ctx.scope_predicate(t.spec, &row, &access)? {
        conds.push((scope, t.scope_message(Action::Insert)));
    }
    // Keys whose columns are all supplied (the others take their defaults).
    let supplied = |c: &str| values.contains_key(c);
    let all_supplied = |cols: &[String]| cols.iter().all(|c| supplied(c));
    let keys = t.ctx.catalog.relation(&t.spec.schema, &t.spec.name).map(|r| r.foreign_keys.clone()).unwrap_or_default();
    let complete: BTreeSet<String> =
        keys.iter().filter(|fk| all_supplied(&fk.columns)).flat_map(|fk| fk.columns.clone()).collect();
    conds.extend(t.reference_checks(&row, |c| complete.contains(c))?);
    let check = check_all(conds).map(|c| format!(" WHERE {c}")).unwrap_or_default();
    let mut slots = Vec::new();
    let on_conflict = match ins.on.take() {
        None => None,
        Some(OnInsert::OnConflict(oc)) => Some(on_conflict(t, oc, &alias)?),
        Some(other) => return Err(format!("{other} is not PostgreSQL syntax")),
    };
    let returning = t.returning(ins.returning.take(), &alias, false, &mut slots)?;
    let from = match &source {
        Some(_) if !columns.is_empty() => format!(
            " FROM (SELECT 1) AS {}({})",
            ident(SOURCE),
            columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ")
        ),
        // Every supplied value was DEFAULT: one row per VALUES row, nothing read from it.
        Some(_) => format!(" FROM (SELECT 1) AS {}", ident(SOURCE)),
        None => String::new(),
    };
    let sql = format!(
        "INSERT INTO {} AS {} ({}) SELECT {}{from}{check}{returning}",
        t.qualified(),
        ident(TARGET),
        all_columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", "),
        projection.join(", ")
    );
    let mut stmt = fill(&sql, slots, None, source)?;
    if let (Statement::Insert(new), Some(oc)) = (&mut stmt, on_conflict) {
        new.on = Some(OnInsert::OnConflict(oc));
    }
    Ok(stmt)
}

/// ON CONFLICT: DO NOTHING as written; DO UPDATE confined to the caller's rows (a conflicting
/// row outside its scope is left alone), its values and condition computed over the masked
/// existing row, its new row checked.
fn on_conflict(
    t: &Target,
    mut oc: sqlparser::ast::OnConflict,
    alias: &str,
) -> Result<sqlparser::ast::OnConflict, String> {
    let OnConflictAction::DoUpdate(du) = &mut oc.action else { return Ok(oc) };
    let select = t.access(Action::Select, "ON CONFLICT DO UPDATE reads the existing row")?;
    let access = t.access(Action::Update, "ON CONFLICT DO UPDATE")?;
    let assigns = t.assignments(std::mem::take(&mut du.assignments), &access)?;
    {
        let mut exprs: Vec<&Expr> = assigns.iter().map(|a| &a.value).collect();
        exprs.extend(du.selection.iter());
        refuse_hidden(t, &select, &exprs)?;
    }
    let row = t.masked_row(&select, alias)?;
    let mut items = Vec::new();
    let mut shaped = Vec::new();
    let mut local = Vec::new();
    for (i, a) in assigns.into_iter().enumerate() {
        if is_default(&a.value) {
            return Err("SET … = DEFAULT in ON CONFLICT DO UPDATE is not supported on a managed table".to_owned());
        }
        let name = format!("__struere_v{i}");
        items.push(format!("CAST({} AS {}) AS {}", slot(&mut local, a.value), a.col.type_name, ident(&name)));
        shaped.push((a.col, a.how, Some(format!("{}.{}", ident(NEW), ident(&name)))));
    }
    let sets = t.set_list(&shaped, &access, &t.scope_message(Action::Update))?;
    let mut pred = t.ctx.row_predicate(t.spec, TARGET, &select)?;
    if let Some(p) = t.ctx.scope_predicate(t.spec, &RowRef::Alias(TARGET), &access)? {
        pred = format!("{pred} AND {p}");
    }
    let condition = match du.selection.take() {
        Some(e) => {
            format!("CASE WHEN {pred} THEN coalesce((SELECT {} FROM {row}), false) ELSE false END", slot(&mut local, e))
        }
        None => pred,
    };
    // A skeleton of its own (slots numbered from 0), from which the clause is taken.
    let sql = format!(
        "INSERT INTO {} VALUES (1) ON CONFLICT DO UPDATE SET ({}) = (SELECT {} FROM (SELECT {} FROM {row}) AS {}) WHERE {condition}",
        ident(TARGET),
        sets.iter().map(|(c, _)| ident(c)).collect::<Vec<_>>().join(", "),
        sets.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>().join(", "),
        items.join(", "),
        ident(NEW),
    );
    match fill(&sql, local, None, None)? {
        Statement::Insert(Insert { on: Some(OnInsert::OnConflict(mut built)), .. }) => {
            built.conflict_target = oc.conflict_target;
            Ok(built)
        }
        _ => Err("internal error building ON CONFLICT".to_owned()),
    }
}

fn cast_template(type_name: &str) -> Result<Expr, String> {
    let sql = format!("SELECT CAST(NULL AS {type_name})");
    let stmts = Parser::parse_sql(&PostgreSqlDialect {}, &sql).map_err(|e| format!("internal error: {e}"))?;
    let Some(Statement::Query(q)) = stmts.into_iter().next() else {
        return Err("internal error: cast template".to_owned());
    };
    match *q.body {
        SetExpr::Select(s) => match s.projection.into_iter().next() {
            Some(SelectItem::UnnamedExpr(e @ Expr::Cast { .. })) => Ok(e),
            _ => Err("internal error: cast template".to_owned()),
        },
        _ => Err("internal error: cast template".to_owned()),
    }
}

/// A string literal, NULL or parameter: what PostgreSQL types by its use.
fn is_untyped_literal(e: &Expr) -> bool {
    use sqlparser::ast::Value;
    matches!(e, Expr::Value(v) if matches!(&v.value,
        Value::SingleQuotedString(_) | Value::EscapedStringLiteral(_) | Value::DollarQuotedString(_)
            | Value::Null | Value::Placeholder(_)))
}

fn with_cast(template: Expr, value: Expr) -> Expr {
    match template {
        Expr::Cast { kind, data_type, format, .. } => Expr::Cast { kind, expr: Box::new(value), data_type, format },
        _ => value,
    }
}

/// Parse the generated skeleton and put the client's nodes into its placeholders.
fn fill(
    sql: &str,
    slots: Vec<Option<Expr>>,
    from: Option<Vec<TableWithJoins>>,
    source: Option<Box<sqlparser::ast::Query>>,
) -> Result<Statement, String> {
    let mut stmts =
        Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| format!("internal error building a write: {e}"))?;
    let mut stmt = match (stmts.pop(), stmts.is_empty()) {
        (Some(s), true) => s,
        _ => return Err("internal error building a write: expected one statement".to_owned()),
    };
    let mut filler = Filler { slots, from, source, error: None };
    let _ = stmt.visit(&mut filler);
    if let Some(e) = filler.error {
        return Err(e);
    }
    if filler.slots.iter().any(Option::is_some) || filler.from.is_some() || filler.source.is_some() {
        return Err("internal error building a write: a placeholder was not filled".to_owned());
    }
    Ok(stmt)
}

struct Filler {
    slots: Vec<Option<Expr>>,
    from: Option<Vec<TableWithJoins>>,
    source: Option<Box<sqlparser::ast::Query>>,
    error: Option<String>,
}

impl VisitorMut for Filler {
    type Break = ();

    fn post_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Expr::Identifier(i) = e
            && let Some(n) = i.value.strip_prefix(SLOT)
        {
            match n.parse::<usize>().ok().and_then(|n| self.slots.get_mut(n)).and_then(Option::take) {
                Some(v) => *e = v,
                None => {
                    self.error = Some("internal error building a write: bad placeholder".to_owned());
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn post_visit_select(&mut self, s: &mut sqlparser::ast::Select) -> ControlFlow<()> {
        let is_slot = matches!(s.from.as_slice(), [TableWithJoins { relation: TableFactor::Table { name, .. }, .. }]
            if name.to_string() == ident(FROM_SLOT));
        if is_slot && let Some(from) = self.from.take() {
            s.from = from;
        }
        ControlFlow::Continue(())
    }

    fn post_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
        if let TableFactor::Derived { subquery, alias: Some(a), .. } = tf
            && a.name.value == SOURCE
            && let Some(q) = self.source.take()
        {
            *subquery = q;
        }
        ControlFlow::Continue(())
    }
}
