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
//!
//! Invariant: a secure relation yields only rows of the caller's organization and environment that its scope rules
//! allow, with every hidden or masked value replaced, and reads the schema-qualified table so nothing can shadow it.

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
    doubled_within('"', name)
}

/// `'text'` with `'` doubled: exact because the proxy pins standard_conforming_strings = on.
pub fn literal(text: &str) -> String {
    doubled_within('\'', text)
}

/// `text` between two `quote`s, each `quote` in it doubled. Built by hand rather than with
/// `format!` and `replace`: a miss quotes a few hundred names.
fn doubled_within(quote: char, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for (i, part) in text.split(quote).enumerate() {
        if i > 0 {
            out.push(quote);
            out.push(quote);
        }
        out.push_str(part);
    }
    out.push(quote);
    out
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

/// Whose columns a generated predicate reads: a table alias, or (for a row being written) the
/// expressions that will become its columns.
pub enum RowRef<'r> {
    Alias(&'r str),
    /// Columns listed in `values` read those expressions; the rest read `fallback`'s columns, or
    /// are an error naming the column when there is no fallback (an INSERT that leaves a column
    /// its row scope checks to its default).
    Values {
        values: &'r std::collections::BTreeMap<String, String>,
        fallback: Option<&'r str>,
        /// Columns whose new value the proxy cannot know (set to DEFAULT): an error if read.
        unknown: &'r std::collections::BTreeSet<String>,
    },
}

impl RowRef<'_> {
    pub fn col(&self, name: &str) -> Result<String, String> {
        match self {
            RowRef::Alias(a) => Ok(format!("{}.{}", ident(a), ident(name))),
            RowRef::Values { values, fallback, unknown } => match (values.get(name), fallback) {
                (Some(v), _) => Ok(format!("({v})")),
                (None, Some(a)) if !unknown.contains(name) => Ok(format!("{}.{}", ident(a), ident(name))),
                _ => Err(format!(
                    "the statement must set column {name} to a value (not its default): the row scope checks it"
                )),
            },
        }
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
        self.tenant_values(table)
            .into_iter()
            .map(|(col, value)| format!("{}.{} = {value}", ident(alias), ident(col)))
            .collect()
    }

    /// The environment and organization columns of `table` and the caller's values for them.
    pub fn tenant_values<'t>(&self, table: &'t TableSpec) -> Vec<(&'t str, String)> {
        let mut values = Vec::new();
        if let Some(env) = &table.environment_column {
            values.push((env.as_str(), literal(self.actor.environment.as_str())));
        }
        if let Some(org) = &table.organization_column {
            values.push((org.as_str(), literal(&self.actor.organization)));
        }
        values
    }

    /// The full row predicate of `table` for `action` on alias `alias`: tenant, types, scope rules.
    pub fn row_predicate(&self, table: &TableSpec, alias: &str, access: &TableAccess) -> Result<String, String> {
        let mut preds = self.tenant_predicate(table, alias);
        preds.extend(self.scope_predicate(table, &RowRef::Alias(alias), access)?);
        Ok(preds.join(" AND "))
    }

    /// The row predicate without the tenant: resource types and scope rules, over any row
    /// (`None` when every row of the tenant qualifies). What a write's new row must satisfy.
    pub fn scope_predicate(
        &self,
        table: &TableSpec,
        row: &RowRef,
        access: &TableAccess,
    ) -> Result<Option<String>, String> {
        let mut preds = Vec::new();
        if let (Some(tc), false) = (&table.type_column, access.denied_kinds.is_empty()) {
            let denied: Vec<String> = access.denied_kinds.iter().map(|k| literal(k)).collect();
            preds.push(format!("{} NOT IN ({})", row.col(tc)?, denied.join(", ")));
        }
        let mut alternatives = Vec::new();
        for part in &access.parts {
            match self.part_predicate(table, row, part)? {
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
        Ok(if preds.is_empty() { None } else { Some(preds.join(" AND ")) })
    }

    /// `None` when the part covers every row (no type restriction, no rules).
    fn part_predicate(&self, table: &TableSpec, row: &RowRef, part: &Part) -> Result<Option<String>, String> {
        let mut conj = Vec::new();
        if let (Some(kind), Some(tc)) = (&part.kind, &table.type_column) {
            conj.push(format!("{} = {}", row.col(tc)?, literal(kind)));
        }
        if let Some(rules) = &part.rules {
            let ors = rules.iter().map(|r| self.rule(table, row, r)).collect::<Result<Vec<_>, _>>()?;
            conj.push(format!("({})", ors.join(" OR ")));
        }
        Ok(if conj.is_empty() { None } else { Some(format!("({})", conj.join(" AND "))) })
    }

    /// Whether a row decision of `access` on `table` reads `column` of the row: the tenant
    /// predicate, the denied resource types, or the type restriction or scope rules of any part
    /// (each part on its own: `column_value` picks a part's masks by its predicate, and
    /// `scope_predicate` stops at the first part that covers every row). Found by building the
    /// predicates over a row whose `column` cannot be read, so the answer is what the generated
    /// SQL reads, not a second reading of the rules.
    pub fn reads_column(&self, table: &TableSpec, access: &TableAccess, column: &str) -> Result<bool, String> {
        if self.tenant_values(table).iter().any(|(c, _)| *c == column) {
            return Ok(true);
        }
        let values = std::collections::BTreeMap::new();
        let (readable, unreadable) =
            (std::collections::BTreeSet::new(), std::collections::BTreeSet::from([column.to_owned()]));
        let row = |unknown| RowRef::Values { values: &values, fallback: Some("r"), unknown };
        // Any other failure is the caller's to report, not a read of the column.
        self.scope_predicate(table, &row(&readable), access)?;
        for part in &access.parts {
            self.part_predicate(table, &row(&readable), part)?;
        }
        Ok(self.scope_predicate(table, &row(&unreadable), access).is_err()
            || access.parts.iter().any(|p| self.part_predicate(table, &row(&unreadable), p).is_err()))
    }

    fn field(&self, row: &RowRef, f: &FieldRef) -> Result<String, String> {
        let col = row.col(&f.column)?;
        Ok(if f.path.is_empty() {
            col
        } else {
            let path: Vec<String> = f.path.iter().map(|p| literal(p)).collect();
            format!("({col} #>> ARRAY[{}])", path.join(", "))
        })
    }

    fn rule(&self, table: &TableSpec, row: &RowRef, rule: &ScopeRule) -> Result<String, String> {
        match rule {
            ScopeRule::Match { field, op, value } => {
                let lhs = self.field(row, field)?;
                let rhs = match value {
                    ScopeValue::Actor(a) => self.actor_value(*a),
                    ScopeValue::Literal(l) => literal_of(l),
                };
                Ok(match op {
                    ScopeOp::Eq => format!("{lhs} = {rhs}"),
                    // `<>` is NULL for a NULL field: such rows stay out of scope (fail safe).
                    ScopeOp::Neq => format!("{lhs} <> {rhs}"),
                    ScopeOp::In => format!("{lhs} IN ({rhs})"),
                    ScopeOp::Contains => self.contains(table, row, field, &rhs)?,
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
                    self.field(row, field)?,
                    self.field(&RowRef::Alias(&inner), target)?,
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
                    self.field(row, field)?,
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

    fn contains(&self, table: &TableSpec, row: &RowRef, field: &FieldRef, rhs: &str) -> Result<String, String> {
        if !field.path.is_empty() {
            let path: Vec<String> = field.path.iter().map(|p| literal(p)).collect();
            return Ok(format!(
                "({} #> ARRAY[{}]) @> to_jsonb({rhs}::pg_catalog.text)",
                row.col(&field.column)?,
                path.join(", ")
            ));
        }
        let col = self
            .columns(table)?
            .iter()
            .find(|c| c.name == field.column)
            .ok_or_else(|| format!("{}.{} has no column {}", table.schema, table.name, field.column))?;
        let f = self.field(row, field)?;
        Ok(if col.type_name.ends_with("[]") {
            format!("{rhs} = ANY ({f})")
        } else if col.type_name == "jsonb" {
            format!("{f} @> to_jsonb({rhs}::pg_catalog.text)")
        } else {
            format!("strpos({f}::pg_catalog.text, {rhs}) > 0")
        })
    }

    /// The secure relation for reading `table` under `action`'s rules (select for reads).
    pub fn relation_sql(&self, table: &TableSpec, action: Action) -> Result<String, String> {
        self.relation_sql_also(table, action, None)
    }

    /// The secure relation a write reads its target through: the rows the caller may both see
    /// (`action`, select) and change (`also`: update or delete), with the select masks.
    pub fn relation_sql_also(&self, table: &TableSpec, action: Action, also: Option<Action>) -> Result<String, String> {
        let access = self.access(table, action)?;
        let alias = self.alias();
        let mut pred = self.row_predicate(table, &alias, &access)?;
        if let Some(also) = also {
            let extra = self.access(table, also)?;
            // (Often the same rules as select's: then once is enough.)
            if let Some(p) = self.scope_predicate(table, &RowRef::Alias(&alias), &extra)?
                && !pred.contains(&p)
            {
                pred = format!("{pred} AND {p}");
            }
        }
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
            let cond = self.part_predicate(table, &RowRef::Alias(alias), part)?.unwrap_or_else(|| "true".to_owned());
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
        MaskMode::Hide => "NULL::pg_catalog.text".to_owned(),
        MaskMode::Redact(t) => format!("CASE WHEN {text_expr} IS NULL THEN NULL ELSE {} END", literal(t)),
        MaskMode::Partial(n) => format!(
            "CASE WHEN {text_expr} IS NULL THEN NULL ELSE repeat('*', greatest(length({text_expr}) - {n}, 0)) || right({text_expr}, {n}) END"
        ),
        MaskMode::Hash => format!("encode(sha256(convert_to({text_expr}, 'UTF8')), 'hex')"),
    }
}

/// What of a jsonb value is visible: everything (`all`, minus deeper masks), or only the
/// listed keys; a key may be masked or have its own object rules.
#[derive(Debug, Default)]
struct JsonView {
    all: bool,
    keys: std::collections::BTreeMap<String, JsonKey>,
}

#[derive(Debug)]
enum JsonKey {
    Masked(MaskMode),
    Object(JsonView),
}

impl JsonView {
    fn insert(&mut self, path: &[String], leaf: Option<&MaskMode>) {
        let Some((first, rest)) = path.split_first() else { return };
        if rest.is_empty() {
            let key = match leaf {
                Some(mode) => JsonKey::Masked(mode.clone()),
                None => match self.keys.remove(first) {
                    // A key made visible whole keeps the masks already set below it.
                    Some(JsonKey::Object(mut v)) => {
                        v.all = true;
                        JsonKey::Object(v)
                    }
                    Some(masked @ JsonKey::Masked(_)) => masked,
                    None => JsonKey::Object(JsonView { all: true, keys: Default::default() }),
                },
            };
            self.keys.insert(first.clone(), key);
            return;
        }
        // Under a fully visible level, an intermediate key is fully visible too (but for what is
        // masked deeper); under a listed level, only what is listed below it.
        let all = self.all;
        let child = self
            .keys
            .entry(first.clone())
            .or_insert_with(|| JsonKey::Object(JsonView { all, keys: Default::default() }));
        if let JsonKey::Object(v) = child {
            v.insert(rest, leaf);
        }
    }

    /// SQL for the visible part of the jsonb `expr`. `depth` keeps the aliases of nested
    /// levels apart.
    fn render(&self, expr: &str, depth: usize) -> String {
        if self.all && self.keys.is_empty() {
            return expr.to_owned();
        }
        let k = if depth == 0 { "e".to_owned() } else { format!("e{depth}") };
        let mut value = String::new();
        for (key, rule) in &self.keys {
            let inner = match rule {
                JsonKey::Masked(mode) => {
                    format!("to_jsonb({})", mask(mode, &format!("({k}.value #>> ARRAY[]::pg_catalog.text[])")))
                }
                JsonKey::Object(v) if v.all && v.keys.is_empty() => continue,
                JsonKey::Object(v) => v.render(&format!("{k}.value"), depth + 1),
            };
            value.push_str(&format!(" WHEN {} THEN {inner}", literal(key)));
        }
        let value =
            if value.is_empty() { format!("{k}.value") } else { format!("CASE {k}.key{value} ELSE {k}.value END") };
        let filter = if self.all {
            "true".to_owned()
        } else {
            let allowed: Vec<String> = self.keys.keys().map(|key| literal(key)).collect();
            format!("{k}.key IN ({})", allowed.join(", "))
        };
        // A value that is not an object: shown as it is where everything is visible (nested
        // levels), hidden where only listed keys are.
        let otherwise = if self.all && depth > 0 { format!(" ELSE {expr}") } else { String::new() };
        format!(
            "CASE WHEN jsonb_typeof({expr}) = 'object' THEN (SELECT coalesce(jsonb_object_agg({k}.key, {value}), '{{}}'::pg_catalog.jsonb) \
             FROM jsonb_each({expr}) AS {k} WHERE {filter}){otherwise} END"
        )
    }
}

/// One part's view of one column.
fn projection(alias: &str, col: &Column, fields: &FieldAccess) -> Result<String, String> {
    let raw = format!("{}.{}", ident(alias), ident(&col.name));
    let whole_mask = fields.masked.iter().find(|(f, _)| f.column == col.name && f.path.is_empty());
    if let Some((_, mode)) = whole_mask {
        return Ok(mask(mode, &format!("{raw}::pg_catalog.text")));
    }
    let whole_visible = fields.all || fields.visible.iter().any(|f| f.column == col.name && f.path.is_empty());
    let mut view = JsonView { all: whole_visible, keys: Default::default() };
    for f in fields.visible.iter().filter(|f| f.column == col.name && !f.path.is_empty()) {
        view.insert(&f.path, None);
    }
    for (f, mode) in fields.masked.iter().filter(|(f, _)| f.column == col.name && !f.path.is_empty()) {
        view.insert(&f.path, Some(mode));
    }
    if whole_visible && view.keys.values().all(|k| matches!(k, JsonKey::Object(v) if v.all && v.keys.is_empty())) {
        return Ok(raw);
    }
    if !whole_visible && view.keys.is_empty() {
        return Ok(null_of(col));
    }
    if col.type_name != "jsonb" {
        return Err(format!("field masks with paths need a jsonb column; {} is {}", col.name, col.type_name));
    }
    Ok(view.render(&raw, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: &str) -> Column {
        Column { name: name.into(), type_name: ty.into(), type_oid: 0, not_null: false }
    }

    fn path(p: &str) -> FieldRef {
        let mut parts = p.split('.').map(str::to_owned);
        FieldRef { column: parts.next().unwrap_or_default(), path: parts.collect() }
    }

    #[test]
    fn names_and_literals_are_quoted_with_the_quote_doubled() {
        for text in ["", "a", "\"", "'", "a\"b'c", "\"\"", "''x''", "é\"ü'", "x\"", "\"x"] {
            assert_eq!(ident(text), format!("\"{}\"", text.replace('"', "\"\"")), "{text}");
            assert_eq!(literal(text), format!("'{}'", text.replace('\'', "''")), "{text}");
        }
    }

    #[test]
    fn nested_json_paths_are_rebuilt_level_by_level() {
        let fields = FieldAccess {
            all: false,
            visible: vec![path("data.name"), path("data.address.city")],
            masked: vec![(path("data.address.phone"), MaskMode::Partial(4))],
        };
        let sql = projection("t", &col("data", "jsonb"), &fields).unwrap();
        // Top level: only name and address; inside address: only city and the masked phone.
        assert!(sql.contains("e.key IN ('address', 'name')"), "{sql}");
        assert!(sql.contains("WHEN 'address' THEN CASE WHEN jsonb_typeof(e.value) = 'object'"), "{sql}");
        assert!(sql.contains("e1.key IN ('city', 'phone')"), "{sql}");
        assert!(
            sql.contains("WHEN 'phone' THEN to_jsonb(CASE WHEN (e1.value #>> ARRAY[]::pg_catalog.text[]) IS NULL"),
            "{sql}"
        );
        // Everything visible except one nested field.
        let fields =
            FieldAccess { all: true, visible: vec![], masked: vec![(path("data.address.phone"), MaskMode::Hide)] };
        let sql = projection("t", &col("data", "jsonb"), &fields).unwrap();
        assert!(sql.contains("WHERE true"), "{sql}");
        assert!(sql.contains("e1.key WHEN 'phone' THEN to_jsonb(NULL::pg_catalog.text) ELSE e1.value END"), "{sql}");
        assert!(sql.contains("WHERE true) ELSE e.value END ELSE e.value END"), "a non-object address is kept: {sql}");
        // A whole key made visible after a deeper mask keeps the mask.
        let fields = FieldAccess {
            all: false,
            visible: vec![path("data.address")],
            masked: vec![(path("data.address.phone"), MaskMode::Hash)],
        };
        let sql = projection("t", &col("data", "jsonb"), &fields).unwrap();
        assert!(sql.contains("sha256") && sql.contains("e.key IN ('address')"), "{sql}");
        // Paths on a non-jsonb column are refused.
        assert!(
            projection(
                "t",
                &col("name", "text"),
                &FieldAccess { all: false, visible: vec![path("name.x")], masked: vec![] }
            )
            .is_err()
        );
    }
}
