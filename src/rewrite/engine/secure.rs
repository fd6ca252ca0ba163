//! Secure relations: the SQL that stands in for a managed table — only the caller's environment
//! and organization, only rows its scope rules allow, with fields masked — written as text with
//! exact quoting (every identifier quoted, every literal a standard string with `'` doubled) and
//! then parsed back into the tree like client SQL, so it is printed and verified the same way.
//!
//! Evaluation order. Two forms, chosen per reference by the tree walk (guard.rs):
//!
//! - fenced (`relation_sql`): the relation ends in `OFFSET 0`, which PostgreSQL never flattens into
//!   the outer query and never pushes outer conditions into, so no expression of the client's ever
//!   sees a row (or a value) before the security predicate and the masks have been applied — the
//!   guarantee `security_barrier` gives — and no client condition can use an index.
//! - guarded (`guarded_relation_sql`, guard.rs): unfenced, so PostgreSQL flattens it and client
//!   conditions reach the table's indexes. Every column is `CASE WHEN <row predicate> THEN <masked
//!   value> END`, so whatever order PostgreSQL evaluates quals in, a client expression only ever
//!   sees NULL for an out-of-scope row; unmasked columns are also exposed raw, and the predicate as
//!   `__struere_in_scope`, for the proxy's own rewrites only: leakproof comparisons with constants
//!   (index conditions) read the raw columns, every other condition PostgreSQL could evaluate at the
//!   scan is wrapped in `CASE WHEN __struere_in_scope …` so it never runs for an out-of-scope row.
//!   What the analysis cannot prove safe falls back to the fenced form.

use std::cell::Cell;

use crate::auth::identity::ActorContext;
use crate::catalog::{CatalogSnapshot, Column};
use crate::policy::{
    Action, ActorAttr, FieldAccess, FieldRef, Literal, MaskMode, PolicySet, Role, ScopeOp, ScopeRule, ScopeValue,
    TableSpec,
};

use super::access::{Part, TableAccess, table_access};

/// `"name"` with `"` doubled: exact for any name.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with `'` doubled: exact because the proxy pins standard_conforming_strings = on.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn literal_of(l: &Literal) -> String {
    match l {
        Literal::Text(s) => literal(s),
        Literal::Integer(i) => literal(&i.to_string()),
        Literal::Float(f) => literal(&f.to_string()),
        Literal::Bool(b) => literal(if *b { "true" } else { "false" }),
        Literal::List(items) => items.iter().map(literal_of).collect::<Vec<_>>().join(", "),
    }
}

/// Everything a secure relation depends on.
pub struct Ctx<'a> {
    pub actor: &'a ActorContext,
    pub set: &'a PolicySet,
    pub roles: Vec<&'a Role>,
    pub catalog: &'a CatalogSnapshot,
    aliases: Cell<usize>,
}

impl<'a> Ctx<'a> {
    pub fn new(actor: &'a ActorContext, set: &'a PolicySet, catalog: &'a CatalogSnapshot) -> Ctx<'a> {
        let roles = super::access::roles_of(set, &actor.roles);
        Ctx { actor, set, roles, catalog, aliases: Cell::new(0) }
    }

    /// A fresh internal alias. Client text may not use the `__struere` prefix (see walk.rs), so
    /// these never collide with the client's names.
    pub(super) fn alias(&self) -> String {
        let n = self.aliases.get() + 1;
        self.aliases.set(n);
        format!("__struere_{n}")
    }

    fn actor_value(&self, a: ActorAttr) -> String {
        match a {
            ActorAttr::Id => literal(&self.actor.actor_id),
            ActorAttr::Organization => literal(&self.actor.organization),
            ActorAttr::Type => literal(self.actor.actor_type.as_str()),
        }
    }

    pub fn access(&self, table: &TableSpec, action: Action) -> Result<TableAccess, String> {
        table_access(&self.roles, &self.actor.roles, table, action)
    }

    pub(super) fn columns(&self, table: &TableSpec) -> Result<&'a [Column], String> {
        self.catalog
            .relation(&table.schema, &table.name)
            .map(|r| r.columns.as_slice())
            .ok_or_else(|| format!("managed table {}.{} is missing from the catalog", table.schema, table.name))
    }

    fn table_spec(&self, name: &str) -> Result<&'a TableSpec, String> {
        self.set.tables.by_name.get(name).ok_or_else(|| format!("unknown managed table {name}"))
    }

    /// The environment and organization predicate every reference to a managed table carries.
    pub fn tenant_predicate(&self, table: &TableSpec, alias: &str) -> Vec<String> {
        let mut preds = Vec::new();
        if let Some(env) = &table.environment_column {
            preds.push(format!("{}.{} = {}", ident(alias), ident(env), literal(self.actor.environment.as_str())));
        }
        if let Some(org) = &table.organization_column {
            preds.push(format!("{}.{} = {}", ident(alias), ident(org), literal(&self.actor.organization)));
        }
        preds
    }

    /// The full row predicate of `table` for `action` on alias `alias`: tenant, types, scope rules.
    pub fn row_predicate(&self, table: &TableSpec, alias: &str, access: &TableAccess) -> Result<String, String> {
        let mut preds = self.tenant_predicate(table, alias);
        if let (Some(tc), false) = (&table.type_column, access.denied_kinds.is_empty()) {
            let denied: Vec<String> = access.denied_kinds.iter().map(|k| literal(k)).collect();
            preds.push(format!("{}.{} NOT IN ({})", ident(alias), ident(tc), denied.join(", ")));
        }
        let mut alternatives = Vec::new();
        for part in &access.parts {
            match self.part_predicate(table, alias, part)? {
                None => {
                    alternatives.clear();
                    break;
                }
                Some(p) => alternatives.push(p),
            }
        }
        if !alternatives.is_empty() {
            preds.push(format!("({})", alternatives.join(" OR ")));
        }
        Ok(preds.join(" AND "))
    }

    /// `None` when the part covers every row (no type restriction, no rules).
    fn part_predicate(&self, table: &TableSpec, alias: &str, part: &Part) -> Result<Option<String>, String> {
        let mut conj = Vec::new();
        if let (Some(kind), Some(tc)) = (&part.kind, &table.type_column) {
            conj.push(format!("{}.{} = {}", ident(alias), ident(tc), literal(kind)));
        }
        if let Some(rules) = &part.rules {
            let ors = rules.iter().map(|r| self.rule(table, alias, r)).collect::<Result<Vec<_>, _>>()?;
            conj.push(format!("({})", ors.join(" OR ")));
        }
        Ok(if conj.is_empty() { None } else { Some(format!("({})", conj.join(" AND "))) })
    }

    fn field(&self, alias: &str, f: &FieldRef) -> String {
        if f.path.is_empty() {
            format!("{}.{}", ident(alias), ident(&f.column))
        } else {
            let path: Vec<String> = f.path.iter().map(|p| literal(p)).collect();
            format!("({}.{} #>> ARRAY[{}])", ident(alias), ident(&f.column), path.join(", "))
        }
    }

    fn rule(&self, table: &TableSpec, alias: &str, rule: &ScopeRule) -> Result<String, String> {
        match rule {
            ScopeRule::Match { field, op, value } => {
                let lhs = self.field(alias, field);
                let rhs = match value {
                    ScopeValue::Actor(a) => self.actor_value(*a),
                    ScopeValue::Literal(l) => literal_of(l),
                };
                Ok(match op {
                    ScopeOp::Eq => format!("{lhs} = {rhs}"),
                    // `<>` is NULL for a NULL field: such rows stay out of scope (fail safe).
                    ScopeOp::Neq => format!("{lhs} <> {rhs}"),
                    ScopeOp::In => format!("{lhs} IN ({rhs})"),
                    ScopeOp::Contains => self.contains(table, alias, field, &rhs)?,
                })
            }
            ScopeRule::InScopeOf { field, resource, target } => {
                let other = self.table_spec(&resource.table)?;
                let inner = self.alias();
                let mut access = self.access(other, Action::Select)?;
                // Only the rows of the named type count.
                if let Some(kind) = &resource.kind {
                    access.parts.retain(|p| p.kind.as_ref().is_none_or(|k| k == kind));
                    for p in &mut access.parts {
                        p.kind = Some(kind.clone());
                    }
                    if access.parts.is_empty() {
                        return Ok("false".to_owned());
                    }
                }
                let pred = self.row_predicate(other, &inner, &access)?;
                Ok(format!(
                    "{} IN (SELECT {} FROM {}.{} AS {} WHERE {pred})",
                    self.field(alias, field),
                    self.field(&inner, target),
                    ident(&other.schema),
                    ident(&other.name),
                    ident(&inner)
                ))
            }
            ScopeRule::Via { field, link } => {
                let spec = self.table_spec(&link.table)?;
                let inner = self.alias();
                let mut preds = self.tenant_predicate(spec, &inner);
                preds.push(format!(
                    "{}.{} = {}",
                    ident(&inner),
                    ident(&link.actor_column),
                    self.actor_value(link.actor)
                ));
                for (col, lit) in &link.filter {
                    preds.push(format!("{}.{} = {}", ident(&inner), ident(col), literal_of(lit)));
                }
                Ok(format!(
                    "{} IN (SELECT {}.{} FROM {}.{} AS {} WHERE {})",
                    self.field(alias, field),
                    ident(&inner),
                    ident(&link.column),
                    ident(&spec.schema),
                    ident(&spec.name),
                    ident(&inner),
                    preds.join(" AND ")
                ))
            }
        }
    }

    fn contains(&self, table: &TableSpec, alias: &str, field: &FieldRef, rhs: &str) -> Result<String, String> {
        if !field.path.is_empty() {
            let path: Vec<String> = field.path.iter().map(|p| literal(p)).collect();
            return Ok(format!(
                "({}.{} #> ARRAY[{}]) @> to_jsonb({rhs}::text)",
                ident(alias),
                ident(&field.column),
                path.join(", ")
            ));
        }
        let col = self
            .columns(table)?
            .iter()
            .find(|c| c.name == field.column)
            .ok_or_else(|| format!("{}.{} has no column {}", table.schema, table.name, field.column))?;
        let f = self.field(alias, field);
        Ok(if col.type_name.ends_with("[]") {
            format!("{rhs} = ANY ({f})")
        } else if col.type_name == "jsonb" {
            format!("{f} @> to_jsonb({rhs}::text)")
        } else {
            format!("strpos({f}::text, {rhs}) > 0")
        })
    }

    /// The secure relation for reading `table` under `action`'s rules (select for reads).
    pub fn relation_sql(&self, table: &TableSpec, action: Action) -> Result<String, String> {
        let access = self.access(table, action)?;
        let alias = self.alias();
        let pred = self.row_predicate(table, &alias, &access)?;
        let mut cols = Vec::new();
        for col in self.columns(table)? {
            cols.push(format!("{} AS {}", self.column_value(table, &alias, col, &access)?, ident(&col.name)));
        }
        if cols.is_empty() {
            return Err(format!("{} has no columns", table.name));
        }
        Ok(format!(
            "SELECT {} FROM {}.{} AS {} WHERE {pred} OFFSET 0",
            cols.join(", "),
            ident(&table.schema),
            ident(&table.name),
            ident(&alias)
        ))
    }

    /// What the caller sees of one column: per part, then combined.
    pub(super) fn column_value(
        &self,
        table: &TableSpec,
        alias: &str,
        col: &Column,
        access: &TableAccess,
    ) -> Result<String, String> {
        let mut exprs = Vec::new();
        for part in &access.parts {
            exprs.push(projection(alias, col, &part.fields)?);
        }
        let first = exprs.first().cloned().unwrap_or_else(|| null_of(col));
        if exprs.iter().all(|e| *e == first) {
            return Ok(first);
        }
        let mut case = String::from("CASE");
        for (part, expr) in access.parts.iter().zip(&exprs) {
            let cond = self.part_predicate(table, alias, part)?.unwrap_or_else(|| "true".to_owned());
            case.push_str(&format!(" WHEN {cond} THEN {expr}"));
        }
        case.push_str(" END");
        Ok(case)
    }
}

fn null_of(col: &Column) -> String {
    format!("NULL::{}", col.type_name)
}

fn mask(mode: &MaskMode, text_expr: &str) -> String {
    match mode {
        MaskMode::Hide => "NULL::text".to_owned(),
        MaskMode::Redact(t) => format!("CASE WHEN {text_expr} IS NULL THEN NULL ELSE {} END", literal(t)),
        MaskMode::Partial(n) => format!(
            "CASE WHEN {text_expr} IS NULL THEN NULL ELSE repeat('*', greatest(length({text_expr}) - {n}, 0)) || right({text_expr}, {n}) END"
        ),
        MaskMode::Hash => format!("encode(sha256(convert_to({text_expr}, 'UTF8')), 'hex')"),
    }
}

/// One part's view of one column.
fn projection(alias: &str, col: &Column, fields: &FieldAccess) -> Result<String, String> {
    let raw = format!("{}.{}", ident(alias), ident(&col.name));
    let whole_mask = fields.masked.iter().find(|(f, _)| f.column == col.name && f.path.is_empty());
    if let Some((_, mode)) = whole_mask {
        return Ok(mask(mode, &format!("{raw}::text")));
    }
    let whole_visible = fields.all || fields.visible.iter().any(|f| f.column == col.name && f.path.is_empty());
    let keys: Vec<&FieldRef> = fields.visible.iter().filter(|f| f.column == col.name && !f.path.is_empty()).collect();
    let masked_keys: Vec<&(FieldRef, MaskMode)> =
        fields.masked.iter().filter(|(f, _)| f.column == col.name && !f.path.is_empty()).collect();
    if whole_visible && masked_keys.is_empty() {
        return Ok(raw);
    }
    if !whole_visible && keys.is_empty() && masked_keys.is_empty() {
        return Ok(null_of(col));
    }
    if col.type_name != "jsonb" {
        return Err(format!("field masks with paths need a jsonb column; {} is {}", col.name, col.type_name));
    }
    if keys.iter().any(|f| f.path.len() > 1) || masked_keys.iter().any(|(f, _)| f.path.len() > 1) {
        return Err(format!("nested JSON paths in field masks are not supported yet (column {})", col.name));
    }
    // Rebuild the object from its allowed keys; masked keys pass through their mask.
    let value = if masked_keys.is_empty() {
        "e.value".to_owned()
    } else {
        let mut v = String::from("CASE e.key");
        for (f, mode) in &masked_keys {
            let key = f.path.first().map(String::as_str).unwrap_or_default();
            v.push_str(&format!(
                " WHEN {} THEN to_jsonb({})",
                literal(key),
                mask(mode, "(e.value #>> ARRAY[]::text[])")
            ));
        }
        v.push_str(" ELSE e.value END");
        v
    };
    let filter = if whole_visible {
        "true".to_owned()
    } else {
        let allowed: Vec<String> = keys
            .iter()
            .map(|f| f.path[0].as_str())
            .chain(masked_keys.iter().map(|(f, _)| f.path[0].as_str()))
            .map(literal)
            .collect();
        format!("e.key IN ({})", allowed.join(", "))
    };
    Ok(format!(
        "CASE WHEN jsonb_typeof({raw}) = 'object' THEN (SELECT coalesce(jsonb_object_agg(e.key, {value}), '{{}}'::jsonb) \
         FROM jsonb_each({raw}) AS e WHERE {filter}) END"
    ))
}
