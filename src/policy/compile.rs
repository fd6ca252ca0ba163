//! Raw TOML → validated model, with `file:line` for every problem found (all of them, not just
//! the first), so `policy check` can be fixed in one pass.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use toml::Spanned;

use super::model::*;
use super::raw::*;
use crate::auth::identity::Environment;

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Every problem found in a policy directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// A source file being compiled: its path and text, to turn byte offsets into lines.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text.get(..offset).map_or(1, |t| t.bytes().filter(|&b| b == b'\n').count() + 1)
    }

    fn err<T>(&self, span: &Spanned<T>, message: impl Into<String>) -> PolicyError {
        PolicyError { file: self.path.to_owned(), line: self.line_of(span.span().start), message: message.into() }
    }

    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, PolicyError> {
        toml::from_str(self.text).map_err(|e| PolicyError {
            file: self.path.to_owned(),
            line: e.span().map_or(1, |s| self.line_of(s.start)),
            message: e.message().to_owned(),
        })
    }
}

/// Names PostgreSQL would accept unquoted and that we print quoted: letters, digits, `_`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// A configured column name, or `default` (recording an error for an invalid one).
fn column(src: &Source, s: Option<&Spanned<String>>, default: &str, errors: &mut Vec<PolicyError>) -> String {
    match s {
        Some(c) if valid_name(c.get_ref()) => c.get_ref().clone(),
        Some(c) => {
            errors.push(src.err(c, format!("invalid column name {:?}", c.get_ref())));
            default.to_owned()
        }
        None => default.to_owned(),
    }
}

pub fn compile_tables(path: &Path, text: &str) -> Result<Tables, PolicyErrors> {
    let src = Source { path, text };
    let raw: RawTables = src.parse().map_err(|e| PolicyErrors(vec![e]))?;
    let mut errors = Vec::new();
    let mut tables = Tables::default();
    for (name, t) in raw.tables {
        let schema = column(&src, t.schema.as_ref(), "public", &mut errors);
        let id_column = column(&src, t.id_column.as_ref(), "id", &mut errors);
        let type_column = t.type_column.as_ref().map(|c| column(&src, Some(c), "", &mut errors));
        let scope = match t.scope.get_ref().as_str() {
            "environment" => TableScope::Environment,
            "shared" => TableScope::Shared,
            other => {
                errors.push(src.err(&t.scope, format!("unknown scope {other:?} (environment or shared)")));
                continue;
            }
        };
        let organization_column = match t.organization_column.as_ref().map(|s| (s, s.get_ref())) {
            None => Some("organization_id".to_owned()),
            Some((_, ColumnOrOff::Column(c))) if valid_name(c) => Some(c.clone()),
            Some((s, ColumnOrOff::Column(c))) => {
                errors.push(src.err(s, format!("invalid column name {c:?}")));
                None
            }
            Some((_, ColumnOrOff::Off(false))) if scope == TableScope::Shared => None,
            Some((s, ColumnOrOff::Off(_))) => {
                errors.push(src.err(
                    s,
                    "organization_column can only be false on a shared table (environment-scoped tables need one)",
                ));
                None
            }
        };
        let environment_column = match scope {
            TableScope::Environment => Some(column(&src, t.environment_column.as_ref(), "environment", &mut errors)),
            TableScope::Shared => {
                if let Some(c) = &t.environment_column {
                    errors.push(src.err(c, "a shared table has no environment column"));
                }
                None
            }
        };
        if !valid_name(name.get_ref()) {
            errors.push(src.err(&name, format!("invalid table name {:?}", name.get_ref())));
            continue;
        }
        tables.by_name.insert(
            name.get_ref().clone(),
            TableSpec {
                schema,
                name: name.into_inner(),
                scope,
                organization_column,
                environment_column,
                type_column,
                id_column,
            },
        );
    }
    if errors.is_empty() {
        Ok(tables)
    } else {
        errors.sort_by_key(|e| e.line);
        Err(PolicyErrors(errors))
    }
}

fn parse_field(s: &str) -> Option<FieldRef> {
    let mut parts = s.split('.');
    let column = parts.next().filter(|c| valid_name(c))?.to_owned();
    let path: Vec<String> = parts.map(str::to_owned).collect();
    // JSON keys may be any text but empty or containing the separator.
    if path.iter().any(|p| p.is_empty() || p.len() > 255) {
        return None;
    }
    Some(FieldRef { column, path })
}

fn parse_actor(s: &str) -> Option<ActorAttr> {
    match s {
        "actor.id" => Some(ActorAttr::Id),
        "actor.organization" => Some(ActorAttr::Organization),
        "actor.type" => Some(ActorAttr::Type),
        _ => None,
    }
}

fn parse_literal(v: &toml::Value) -> Result<Literal, String> {
    Ok(match v {
        toml::Value::String(s) if s.contains('\0') => return Err("literal contains NUL".into()),
        toml::Value::String(s) => Literal::Text(s.clone()),
        toml::Value::Integer(i) => Literal::Integer(*i),
        toml::Value::Float(f) if f.is_finite() => Literal::Float(*f),
        toml::Value::Boolean(b) => Literal::Bool(*b),
        toml::Value::Array(a) => Literal::List(a.iter().map(parse_literal).collect::<Result<_, _>>()?),
        other => return Err(format!("unsupported literal {other}")),
    })
}

fn parse_action(s: &str) -> Option<Vec<Action>> {
    match s {
        "*" => Some(Action::ALL.to_vec()),
        "select" => Some(vec![Action::Select]),
        "insert" => Some(vec![Action::Insert]),
        "update" => Some(vec![Action::Update]),
        "delete" => Some(vec![Action::Delete]),
        _ => None,
    }
}

struct RoleCompiler<'a> {
    src: Source<'a>,
    tables: &'a Tables,
    environment: Environment,
    errors: Vec<PolicyError>,
}

impl RoleCompiler<'_> {
    fn resource(&mut self, s: &Spanned<String>) -> Option<Option<ResourceId>> {
        self.resource_str(s.get_ref()).map_err(|m| self.errors.push(self.src.err(s, m))).ok()
    }

    fn resource_str(&self, s: &str) -> Result<Option<ResourceId>, String> {
        if s == "*" {
            return Ok(None);
        }
        let (table, kind) = match s.split_once(':') {
            Some((t, k)) => (t, Some(k.to_owned())),
            None => (s, None),
        };
        let spec =
            self.tables.by_name.get(table).ok_or_else(|| format!("unknown table {table:?} in resource {s:?}"))?;
        if kind.is_some() && spec.type_column.is_none() {
            return Err(format!("table {table:?} has no type_column, so {s:?} cannot name a type"));
        }
        if kind.as_deref().is_some_and(|k| k.is_empty() || k.contains('\0')) {
            return Err(format!("invalid type in resource {s:?}"));
        }
        Ok(Some(ResourceId { table: table.to_owned(), kind }))
    }

    fn grant(&mut self, g: RawGrant) -> Option<Grant> {
        let resource = self.resource(&g.resource)?;
        let actions = |list: &[Spanned<String>], errors: &mut Vec<PolicyError>| -> Vec<Action> {
            let mut out = Vec::new();
            for a in list {
                match parse_action(a.get_ref()) {
                    Some(v) => out.extend(v),
                    None => errors.push(
                        self.src
                            .err(a, format!("unknown action {:?} (select, insert, update, delete or *)", a.get_ref())),
                    ),
                }
            }
            out.sort();
            out.dedup();
            out
        };
        let mut errors = Vec::new();
        let allow = actions(&g.allow, &mut errors);
        let deny = actions(&g.deny, &mut errors);
        self.errors.extend(errors);
        let mut fields = FieldAccess::default();
        for f in &g.fields {
            match f.get_ref() {
                RawField::Visible(s) if s == "*" => fields.all = true,
                RawField::Visible(s) => match parse_field(s) {
                    Some(fr) => fields.visible.push(fr),
                    None => self.errors.push(self.src.err(f, format!("invalid field {s:?}"))),
                },
                RawField::Masked(m) => match (parse_field(&m.field), self.mask_mode(m)) {
                    (Some(fr), Ok(mode)) => fields.masked.push((fr, mode)),
                    (None, _) => self.errors.push(self.src.err(f, format!("invalid field {:?}", m.field))),
                    (_, Err(msg)) => self.errors.push(self.src.err(f, msg)),
                },
            }
        }
        let mut scope = Vec::new();
        for s in &g.scope {
            match self.scope_rule(s.get_ref()) {
                Ok(ScopeRule::InScopeOf { .. }) if resource.is_none() => self.errors.push(self.src.err(
                    s,
                    "a grant on every resource (*) cannot use in_scope_of: it would scope the target by itself",
                )),
                Ok(r) => scope.push(r),
                Err(msg) => self.errors.push(self.src.err(s, msg)),
            }
        }
        Some(Grant { resource, allow, deny, fields, scope })
    }

    fn mask_mode(&self, m: &RawMaskedField) -> Result<MaskMode, String> {
        match m.mode.as_str() {
            "hide" => Ok(MaskMode::Hide),
            "redact" => Ok(MaskMode::Redact(m.text.clone().unwrap_or_else(|| "***".to_owned()))),
            "partial" => match m.keep {
                Some(n) if (0..=64).contains(&n) => Ok(MaskMode::Partial(n as u32)),
                _ => Err("partial masks need keep = 0..64".to_owned()),
            },
            "hash" => Ok(MaskMode::Hash),
            other => Err(format!("unknown mask mode {other:?} (hide, redact, partial, hash)")),
        }
    }

    fn scope_rule(&self, s: &RawScope) -> Result<ScopeRule, String> {
        let field = parse_field(&s.field).ok_or_else(|| format!("invalid field {:?}", s.field))?;
        match (&s.op, &s.in_scope_of, &s.via) {
            (Some(op), None, None) => {
                let op = match op.as_str() {
                    "eq" => ScopeOp::Eq,
                    "neq" => ScopeOp::Neq,
                    "in" => ScopeOp::In,
                    "contains" => ScopeOp::Contains,
                    other => return Err(format!("unknown operator {other:?} (eq, neq, in, contains)")),
                };
                let value = match (&s.value, &s.literal) {
                    (Some(v), None) => ScopeValue::Actor(
                        parse_actor(v)
                            .ok_or_else(|| format!("unknown value {v:?} (actor.id, actor.organization, actor.type; use literal = … for constants)"))?,
                    ),
                    (None, Some(l)) => ScopeValue::Literal(parse_literal(l)?),
                    _ => return Err("a field match needs exactly one of value or literal".to_owned()),
                };
                if op == ScopeOp::In && !matches!(value, ScopeValue::Literal(Literal::List(_))) {
                    return Err("op = \"in\" needs literal = [ … ]".to_owned());
                }
                Ok(ScopeRule::Match { field, op, value })
            }
            (None, Some(other), None) => {
                let resource =
                    self.resource_str(other)?.ok_or_else(|| "in_scope_of needs a resource, not *".to_owned())?;
                let target = match &s.target {
                    Some(t) => parse_field(t).ok_or_else(|| format!("invalid target {t:?}"))?,
                    None => FieldRef {
                        column: self
                            .tables
                            .by_name
                            .get(&resource.table)
                            .map_or("id".to_owned(), |t| t.id_column.clone()),
                        path: vec![],
                    },
                };
                Ok(ScopeRule::InScopeOf { field, resource, target })
            }
            (None, None, Some(via)) => {
                if !self.tables.by_name.contains_key(&via.table) {
                    return Err(format!("unknown link table {:?} (link tables must be managed)", via.table));
                }
                for c in [&via.column, &via.actor_column] {
                    if !valid_name(c) {
                        return Err(format!("invalid column name {c:?}"));
                    }
                }
                let actor = match &via.actor {
                    None => ActorAttr::Id,
                    Some(a) => parse_actor(a).ok_or_else(|| format!("unknown actor value {a:?}"))?,
                };
                let mut filter = Vec::new();
                for (k, v) in &via.filter {
                    if !valid_name(k) {
                        return Err(format!("invalid column name {k:?}"));
                    }
                    filter.push((k.clone(), parse_literal(v)?));
                }
                Ok(ScopeRule::Via {
                    field,
                    link: Link {
                        table: via.table.clone(),
                        column: via.column.clone(),
                        actor_column: via.actor_column.clone(),
                        actor,
                        filter,
                    },
                })
            }
            _ => Err("a scope rule needs exactly one of op (field match), in_scope_of or via".to_owned()),
        }
    }

    fn role(&mut self, name: &Spanned<String>, raw: RawRole) -> Option<Role> {
        if !valid_name(name.get_ref()) {
            self.errors.push(self.src.err(name, format!("invalid role name {:?}", name.get_ref())));
            return None;
        }
        let unmanaged_tables = match raw.unmanaged_tables {
            Some(u) if *u.get_ref() && self.environment == Environment::Production => {
                self.errors.push(self.src.err(&u, "unmanaged_tables is only allowed in development"));
                false
            }
            Some(u) => u.into_inner(),
            None => false,
        };
        let grants = raw.resources.into_iter().filter_map(|g| self.grant(g)).collect();
        Some(Role { name: name.get_ref().clone(), unmanaged_tables, grants })
    }
}

pub fn compile_policy_file(
    path: &Path,
    text: &str,
    environment: Environment,
    tables: &Arc<Tables>,
) -> Result<BTreeMap<String, Role>, PolicyErrors> {
    let src = Source { path, text };
    let raw: RawPolicyFile = src.parse().map_err(|e| PolicyErrors(vec![e]))?;
    let mut c = RoleCompiler { src, tables, environment, errors: Vec::new() };
    let mut roles = BTreeMap::new();
    for (name, role) in raw.roles {
        if let Some(r) = c.role(&name, role) {
            roles.insert(r.name.clone(), r);
        }
    }
    // Relations must form no cycle, or a secure relation would reference itself forever.
    if let Some(cycle) = c.errors.is_empty().then(|| find_cycle(&roles)).flatten() {
        c.errors.push(PolicyError {
            file: path.to_owned(),
            line: 1,
            message: format!("in_scope_of rules form a cycle: {cycle}"),
        });
    }
    if c.errors.is_empty() {
        Ok(roles)
    } else {
        c.errors.sort_by_key(|e| e.line);
        Err(PolicyErrors(c.errors))
    }
}

/// A cycle among `in_scope_of` references, across all roles (the caller may hold several).
fn find_cycle(roles: &BTreeMap<String, Role>) -> Option<String> {
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for role in roles.values() {
        for g in &role.grants {
            let Some(from) = &g.resource else { continue };
            for rule in &g.scope {
                if let ScopeRule::InScopeOf { resource, .. } = rule {
                    edges.entry(from.to_string()).or_default().push(resource.to_string());
                }
            }
        }
    }
    fn visit(n: &str, edges: &BTreeMap<String, Vec<String>>, stack: &mut Vec<String>) -> Option<String> {
        if stack.iter().any(|s| s == n) {
            stack.push(n.to_owned());
            return Some(stack.join(" -> "));
        }
        stack.push(n.to_owned());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, stack) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    edges.keys().find_map(|n| visit(n, &edges, &mut Vec::new()))
}
