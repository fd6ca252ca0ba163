//! The reference enforcement of a policy set in PostgreSQL itself, for differential testing: the
//! same rules as native row-level security policies (with WITH CHECK) and `security_barrier`
//! views, so that a statement run through the proxy and run natively on a database prepared with
//! this DDL must give the same answer.
//!
//! Written from the policy model independently of the rewriter (`rewrite/engine/`): sharing its
//! predicate or mask code would make the two agree by construction and hide exactly the bugs the
//! comparison is for. Only the documented meaning of the policy files is shared.
//!
//! Layout of the reference database (the managed tables themselves stay in their schema):
//!
//! - `struere_ref.identity`: one row per backend pid (organization, environment, actor id and
//!   type), written only by the superuser harness; `struere_ref.org()`, `env()`, `actor_id()` and
//!   `actor_type()` read the caller's row. Only a superuser can write the table, so the statement
//!   under test cannot change who it runs as.
//! - one login-less role and one schema per (environment, policy role), e.g. `ref_development_teacher`:
//!   the harness runs `SET ROLE` and puts the schema first on `search_path`, so unqualified table
//!   names resolve to the schema's views.
//! - per managed table: row-level security enabled; for each role a RESTRICTIVE tenant policy
//!   (environment and organization, USING and WITH CHECK) and a PERMISSIVE policy per allowed
//!   action: SELECT `USING (select scope)`, INSERT `WITH CHECK (insert scope)`, UPDATE `USING
//!   (select scope AND update scope) WITH CHECK (update scope)`, DELETE `USING (select scope AND
//!   delete scope)`; table privileges only for allowed actions.
//! - per role and table: a `security_barrier, security_invoker` view with the caller's masks,
//!   auto-updatable where every writable column is a plain column; where the caller may write a
//!   jsonb column only in part, INSTEAD OF INSERT/UPDATE triggers keep the keys it cannot see.
//!   Scope rules that read another table (`in_scope_of`, `via`) call SECURITY DEFINER functions
//!   with the explicit predicate (a policy reading its own table through RLS would recurse).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use thiserror::Error;

use super::{
    Action, ActorAttr, FieldAccess, FieldRef, Literal, MaskMode, Policies, PolicySet, Role, ScopeOp, ScopeRule,
    ScopeValue, TableSpec,
};
use crate::auth::identity::Environment;
use crate::catalog::{CatalogSnapshot, Column, Relation};

/// The schema of the reference's own objects.
pub const REF_SCHEMA: &str = "struere_ref";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RlsError {
    #[error("managed table {0} is missing from the catalog")]
    MissingTable(String),
    #[error("{table} has no column {column}")]
    MissingColumn { table: String, column: String },
    #[error("{0} has no primary key")]
    NoPrimaryKey(String),
    #[error("the reference does not support {0}")]
    Unsupported(String),
}

/// One (environment, policy role) of the reference: the role and schema the harness switches to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefRole {
    pub environment: Environment,
    pub role: String,
    /// Both the PostgreSQL role and the schema of its views.
    pub name: String,
}

/// The reference DDL and the roles it creates.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Run once, as a superuser, on a database that holds the managed tables.
    pub setup_sql: String,
    pub roles: Vec<RefRole>,
}

impl Reference {
    pub fn role(&self, env: Environment, role: &str) -> Option<&RefRole> {
        self.roles.iter().find(|r| r.environment == env && r.role == role)
    }
}

/// The SQL a superuser harness runs (inside the transaction of the statement under test) to make
/// the current session act as an identity: the pid-keyed identity row, the role, the views first.
pub fn identity_sql(role: &RefRole, organization: &str, actor_id: &str, actor_type: &str) -> String {
    format!(
        "INSERT INTO {REF_SCHEMA}.identity (pid, organization, environment, actor_id, actor_type) \
         VALUES (pg_backend_pid(), {}, {}, {}, {}) ON CONFLICT (pid) DO UPDATE SET organization = EXCLUDED.organization, \
         environment = EXCLUDED.environment, actor_id = EXCLUDED.actor_id, actor_type = EXCLUDED.actor_type; \
         SET LOCAL search_path = {}, public; SET LOCAL ROLE {}",
        lit(organization),
        lit(role.environment.as_str()),
        lit(actor_id),
        lit(actor_type),
        ident(&role.name),
        ident(&role.name)
    )
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn lit(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn literal(l: &Literal) -> String {
    match l {
        Literal::Text(s) => lit(s),
        Literal::Integer(i) => lit(&i.to_string()),
        Literal::Float(f) => lit(&f.to_string()),
        Literal::Bool(b) => lit(if *b { "true" } else { "false" }),
        Literal::List(items) => items.iter().map(literal).collect::<Vec<_>>().join(", "),
    }
}

fn actor(a: ActorAttr) -> String {
    let f = match a {
        ActorAttr::Id => "actor_id",
        ActorAttr::Organization => "org",
        ActorAttr::Type => "actor_type",
    };
    format!("{REF_SCHEMA}.{f}()")
}

/// What one role's grants allow on one table for one action.
#[derive(Debug, Clone)]
struct Allowed {
    /// (resource type or every row, scope rules or every row, fields), widest fields first.
    parts: Vec<(Option<String>, Vec<ScopeRule>, FieldAccess)>,
    denied_kinds: Vec<String>,
}

/// The documented meaning of allow/deny: a grant applies to its table (or to every table for
/// `*`); deny overrides allow (a typed deny removes that type); nothing allowed is denied.
fn allowed(role: &Role, table: &str, action: Action) -> Option<Allowed> {
    let mut parts = Vec::new();
    let mut denied_kinds = Vec::new();
    for g in &role.grants {
        let kind = match &g.resource {
            None => None,
            Some(r) if r.table == table => r.kind.clone(),
            Some(_) => continue,
        };
        if g.deny.contains(&action) {
            denied_kinds.push(kind?);
        } else if g.allow.contains(&action) {
            parts.push((kind, g.scope.clone(), g.fields.clone()));
        }
    }
    parts.retain(|(k, _, _)| k.as_ref().is_none_or(|k| !denied_kinds.contains(k)));
    // A row several grants cover is shown through the one that shows the most.
    parts.sort_by_key(|(_, _, f)| {
        std::cmp::Reverse(if f.all { usize::MAX - f.masked.len() } else { f.visible.len() * 2 + f.masked.len() })
    });
    (!parts.is_empty()).then_some(Allowed { parts, denied_kinds })
}

/// Generates predicates and helper functions for one role.
struct Gen<'a> {
    set: &'a PolicySet,
    role: &'a Role,
    catalog: &'a CatalogSnapshot,
    /// Prefix of this role's helper functions.
    prefix: String,
    functions: String,
    counter: usize,
}

impl Gen<'_> {
    fn relation(&self, t: &TableSpec) -> Result<&Relation, RlsError> {
        self.catalog.relation(&t.schema, &t.name).ok_or_else(|| RlsError::MissingTable(t.name.clone()))
    }

    fn spec(&self, name: &str) -> Result<&TableSpec, RlsError> {
        self.set.tables.by_name.get(name).ok_or_else(|| RlsError::MissingTable(name.to_owned()))
    }

    fn column<'c>(&self, rel: &'c Relation, name: &str) -> Result<&'c Column, RlsError> {
        rel.column(name).ok_or_else(|| RlsError::MissingColumn { table: rel.name.clone(), column: name.to_owned() })
    }

    /// `q` is a qualifier with its dot (`r.`) or empty for a policy's own row.
    fn tenant(&self, t: &TableSpec, q: &str) -> Vec<String> {
        let mut preds = Vec::new();
        if let Some(env) = &t.environment_column {
            preds.push(format!("{q}{} = {REF_SCHEMA}.env()", ident(env)));
        }
        if let Some(org) = &t.organization_column {
            preds.push(format!("{q}{} = {REF_SCHEMA}.org()", ident(org)));
        }
        preds
    }

    fn field(&self, q: &str, f: &FieldRef) -> String {
        if f.path.is_empty() {
            format!("{q}{}", ident(&f.column))
        } else {
            let path: Vec<String> = f.path.iter().map(|p| lit(p)).collect();
            format!("({q}{} #>> ARRAY[{}]::text[])", ident(&f.column), path.join(", "))
        }
    }

    /// Scope of an action (without the tenant): denied types excluded, any part's rules.
    fn scope(&mut self, t: &TableSpec, q: &str, a: &Allowed) -> Result<String, RlsError> {
        let mut conj = Vec::new();
        if let (Some(tc), false) = (&t.type_column, a.denied_kinds.is_empty()) {
            let list: Vec<String> = a.denied_kinds.iter().map(|k| lit(k)).collect();
            conj.push(format!("{q}{} NOT IN ({})", ident(tc), list.join(", ")));
        }
        let mut any = Vec::new();
        for (kind, rules, _) in &a.parts {
            any.push(self.part(t, q, kind.as_deref(), rules)?);
        }
        if !any.iter().any(|p| p == "true") {
            conj.push(format!("({})", any.join(" OR ")));
        }
        Ok(if conj.is_empty() { "true".to_owned() } else { conj.join(" AND ") })
    }

    fn part(&mut self, t: &TableSpec, q: &str, kind: Option<&str>, rules: &[ScopeRule]) -> Result<String, RlsError> {
        let mut conj = Vec::new();
        if let (Some(kind), Some(tc)) = (kind, &t.type_column) {
            conj.push(format!("{q}{} = {}", ident(tc), lit(kind)));
        }
        if !rules.is_empty() {
            let ors = rules.iter().map(|r| self.rule(t, q, r)).collect::<Result<Vec<_>, _>>()?;
            conj.push(format!("({})", ors.join(" OR ")));
        }
        Ok(if conj.is_empty() { "true".to_owned() } else { format!("({})", conj.join(" AND ")) })
    }

    fn rule(&mut self, t: &TableSpec, q: &str, rule: &ScopeRule) -> Result<String, RlsError> {
        match rule {
            ScopeRule::Match { field, op, value } => {
                let lhs = self.field(q, field);
                let rhs = match value {
                    ScopeValue::Actor(a) => actor(*a),
                    ScopeValue::Literal(l) => literal(l),
                };
                Ok(match op {
                    ScopeOp::Eq => format!("{lhs} = {rhs}"),
                    ScopeOp::Neq => format!("{lhs} <> {rhs}"),
                    ScopeOp::In => format!("{lhs} IN ({rhs})"),
                    ScopeOp::Contains if !field.path.is_empty() => {
                        let path: Vec<String> = field.path.iter().map(|p| lit(p)).collect();
                        format!(
                            "({q}{} #> ARRAY[{}]::text[]) @> to_jsonb(({rhs})::text)",
                            ident(&field.column),
                            path.join(", ")
                        )
                    }
                    ScopeOp::Contains => {
                        let rel = self.relation(t)?;
                        let ty = &self.column(rel, &field.column)?.type_name;
                        if ty.ends_with("[]") {
                            format!("{rhs} = ANY ({lhs})")
                        } else if ty == "jsonb" {
                            format!("{lhs} @> to_jsonb(({rhs})::text)")
                        } else {
                            format!("strpos({lhs}::text, {rhs}) > 0")
                        }
                    }
                })
            }
            ScopeRule::InScopeOf { field, resource, target } => {
                let other = self.spec(&resource.table)?.clone();
                // The other resource's rows the caller may select, of the named type only.
                let body = match allowed(self.role, &other.name, Action::Select) {
                    None => None,
                    Some(mut a) => {
                        if let Some(kind) = &resource.kind {
                            a.parts.retain(|(k, _, _)| k.as_ref().is_none_or(|k| k == kind));
                            for p in &mut a.parts {
                                p.0 = Some(kind.clone());
                            }
                        }
                        if a.parts.is_empty() {
                            None
                        } else {
                            let mut preds = self.tenant(&other, "o.");
                            preds.push(self.scope(&other, "o.", &a)?);
                            Some(format!(
                                "SELECT {} FROM {}.{} AS o WHERE {}",
                                self.field("o.", target),
                                ident(&other.schema),
                                ident(&other.name),
                                preds.join(" AND ")
                            ))
                        }
                    }
                };
                match body {
                    None => Ok("false".to_owned()),
                    Some(body) => Ok(format!("{} IN (SELECT {})", self.field(q, field), self.function(&body))),
                }
            }
            ScopeRule::Via { field, link } => {
                let spec = self.spec(&link.table)?.clone();
                let mut preds = self.tenant(&spec, "l.");
                preds.push(format!("l.{} = {}", ident(&link.actor_column), actor(link.actor)));
                for (col, value) in &link.filter {
                    preds.push(format!("l.{} = {}", ident(col), literal(value)));
                }
                let body = format!(
                    "SELECT l.{}::text FROM {}.{} AS l WHERE {}",
                    ident(&link.column),
                    ident(&spec.schema),
                    ident(&spec.name),
                    preds.join(" AND ")
                );
                Ok(format!("{}::text IN (SELECT {})", self.field(q, field), self.function(&body)))
            }
        }
    }

    /// A SECURITY DEFINER set-returning function over `body` (its owner, the superuser, is not
    /// subject to row security, so the function applies exactly the predicate it states).
    fn function(&mut self, body: &str) -> String {
        self.counter += 1;
        let name = format!("{REF_SCHEMA}.{}", ident(&format!("{}_{}", self.prefix, self.counter)));
        let _ = writeln!(
            self.functions,
            "CREATE FUNCTION {name}() RETURNS SETOF text LANGUAGE sql STABLE SECURITY DEFINER \
             SET search_path = pg_catalog, pg_temp AS $fn$ SELECT x::text FROM ({body}) AS s(x) $fn$;"
        );
        format!("{name}()")
    }
}

fn mask(mode: &MaskMode, v: &str) -> String {
    match mode {
        MaskMode::Hide => "NULL::text".to_owned(),
        MaskMode::Redact(t) => format!("CASE WHEN {v} IS NULL THEN NULL ELSE {} END", lit(t)),
        // Stars for all but the last n characters.
        MaskMode::Partial(n) => {
            format!(
                "CASE WHEN {v} IS NULL THEN NULL ELSE repeat('*', greatest(length({v}) - {n}, 0)) || right({v}, {n}) END"
            )
        }
        MaskMode::Hash => format!("encode(sha256(convert_to({v}, 'UTF8')), 'hex')"),
    }
}

/// What one grant's fields show of one column, over the raw value `raw`.
fn projection(col: &Column, raw: &str, fields: &FieldAccess) -> Result<String, RlsError> {
    if let Some((_, mode)) = fields.masked.iter().find(|(f, _)| f.column == col.name && f.path.is_empty()) {
        return Ok(mask(mode, &format!("{raw}::text")));
    }
    let whole = fields.all || fields.visible.iter().any(|f| f.column == col.name && f.path.is_empty());
    let visible: BTreeSet<&str> = fields
        .visible
        .iter()
        .filter(|f| f.column == col.name && !f.path.is_empty())
        .map(|f| path_key(f))
        .collect::<Result<_, _>>()?;
    let masked: BTreeMap<&str, &MaskMode> = fields
        .masked
        .iter()
        .filter(|(f, _)| f.column == col.name && !f.path.is_empty())
        .map(|(f, m)| path_key(f).map(|k| (k, m)))
        .collect::<Result<_, _>>()?;
    if masked.is_empty() && (whole || visible.is_empty()) {
        return Ok(if whole { raw.to_owned() } else { format!("NULL::{}", col.type_name) });
    }
    if col.type_name != "jsonb" {
        return Err(RlsError::Unsupported(format!("JSON fields of the non-jsonb column {}", col.name)));
    }
    // Only an object shows keys; only the listed keys (or all, under `*`); masked keys masked.
    let mut value = String::from("j.value");
    if !masked.is_empty() {
        value = String::from("CASE j.key");
        for (k, m) in &masked {
            let _ = write!(value, " WHEN {} THEN to_jsonb({})", lit(k), mask(m, "(j.value #>> '{}')"));
        }
        value.push_str(" ELSE j.value END");
    }
    let filter = if whole {
        "true".to_owned()
    } else {
        let keys: Vec<String> = visible.iter().chain(masked.keys()).map(|k| lit(k)).collect();
        format!("j.key IN ({})", keys.join(", "))
    };
    Ok(format!(
        "CASE WHEN jsonb_typeof({raw}) = 'object' THEN (SELECT coalesce(jsonb_object_agg(j.key, {value}), '{{}}'::jsonb) \
         FROM jsonb_each({raw}) AS j WHERE {filter}) END"
    ))
}

/// The first-level key of a JSON field; deeper paths are not needed by the demo policies.
fn path_key(f: &FieldRef) -> Result<&str, RlsError> {
    match f.path.as_slice() {
        [k] => Ok(k),
        _ => Err(RlsError::Unsupported(format!("nested JSON field {f}"))),
    }
}

/// Which keys of a jsonb column a write may set.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Keys {
    Only(BTreeSet<String>),
    AllBut(BTreeSet<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Write {
    Whole,
    Keys(Keys),
    No,
}

/// A field can be written when the caller sees it unmasked; under several grants, only what all
/// of them allow.
fn writable(a: &Allowed, col: &Column) -> Write {
    let mut acc = Write::Whole;
    for (_, _, f) in &a.parts {
        let here = if f.masked.iter().any(|(m, _)| m.column == col.name && m.path.is_empty()) {
            Write::No
        } else {
            let whole = f.all || f.visible.iter().any(|v| v.column == col.name && v.path.is_empty());
            let masked: BTreeSet<String> = f
                .masked
                .iter()
                .filter(|(m, _)| m.column == col.name)
                .filter_map(|(m, _)| m.path.first().cloned())
                .collect();
            let keys: BTreeSet<String> = f
                .visible
                .iter()
                .filter(|v| v.column == col.name && v.path.len() == 1)
                .filter_map(|v| v.path.first().cloned())
                .collect();
            match (whole, masked.is_empty(), col.type_name == "jsonb") {
                (true, true, _) => Write::Whole,
                (_, _, false) => Write::No,
                (true, false, true) => Write::Keys(Keys::AllBut(masked)),
                (false, _, true) if keys.is_empty() => Write::No,
                (false, _, true) => Write::Keys(Keys::Only(keys)),
            }
        };
        acc = match (acc, here) {
            (Write::No, _) | (_, Write::No) => Write::No,
            (Write::Whole, w) | (w, Write::Whole) => w,
            (Write::Keys(x), Write::Keys(y)) => Write::Keys(match (x, y) {
                (Keys::Only(a), Keys::Only(b)) => Keys::Only(a.intersection(&b).cloned().collect()),
                (Keys::Only(a), Keys::AllBut(m)) | (Keys::AllBut(m), Keys::Only(a)) => {
                    Keys::Only(a.difference(&m).cloned().collect())
                }
                (Keys::AllBut(a), Keys::AllBut(b)) => Keys::AllBut(a.union(&b).cloned().collect()),
            }),
        };
    }
    acc
}

impl Keys {
    fn condition(&self, key: &str) -> String {
        let list = |k: &BTreeSet<String>| k.iter().map(|s| lit(s)).collect::<Vec<_>>().join(", ");
        match self {
            Keys::Only(k) if k.is_empty() => "false".to_owned(),
            Keys::Only(k) => format!("{key} IN ({})", list(k)),
            Keys::AllBut(k) if k.is_empty() => "true".to_owned(),
            Keys::AllBut(k) => format!("{key} NOT IN ({})", list(k)),
        }
    }

    /// The keys of `src` (an object) this set allows (`keep`) or does not.
    fn take(&self, src: &str, keep: bool) -> String {
        let cond = self.condition("k.key");
        let cond = if keep { cond } else { format!("NOT ({cond})") };
        format!(
            "coalesce((SELECT jsonb_object_agg(k.key, k.value) FROM jsonb_each({src}) AS k WHERE {cond}), '{{}}'::jsonb)"
        )
    }
}

const DENIED: &str = "USING ERRCODE = 'insufficient_privilege'";

/// INSTEAD OF triggers for a view whose caller may write a jsonb column only in part: the caller's
/// keys from the new value, every other key as it was; the new row read back through the view.
fn partial_write_triggers(
    schema: &str,
    t: &TableSpec,
    rel: &Relation,
    action: Action,
    cols: &[(&Column, Write)],
) -> String {
    let view = format!("{}.{}", ident(schema), ident(&t.name));
    let base = format!("{}.{}", ident(&t.schema), ident(&t.name));
    let pk_new: Vec<String> = rel.primary_key.iter().map(|k| format!("v.{0} = NEW.{0}", ident(k))).collect();
    let tenant: Vec<&String> = t.environment_column.iter().chain(t.organization_column.iter()).collect();
    let mut body = String::new();
    let fname = format!("{REF_SCHEMA}.{}", ident(&format!("{schema}_{}_{}", t.name, action.as_str())));
    let not_object = |c: &str| {
        format!(
            "IF jsonb_typeof(NEW.{c}) IS DISTINCT FROM 'object' THEN RAISE EXCEPTION 'column {c} must be written as a JSON object' {DENIED}; END IF; "
        )
    };
    match action {
        Action::Insert => {
            let mut names = Vec::new();
            let mut values = Vec::new();
            for (c, w) in cols {
                let n = ident(&c.name);
                match w {
                    Write::No if !tenant.contains(&&c.name) => continue,
                    Write::Keys(keys) => {
                        body.push_str(&format!("IF NEW.{n} IS NOT NULL THEN {} END IF; ", not_object(&n)));
                        values.push(format!(
                            "CASE WHEN NEW.{n} IS NULL THEN NULL ELSE {} END",
                            keys.take(&format!("NEW.{n}"), true)
                        ));
                    }
                    _ => values.push(format!("NEW.{n}")),
                }
                names.push(n);
            }
            let _ = write!(body, "INSERT INTO {base} ({}) VALUES ({}); ", names.join(", "), values.join(", "));
        }
        _ => {
            let mut sets = Vec::new();
            for (c, w) in cols {
                let n = ident(&c.name);
                if tenant.contains(&&c.name) || *w == Write::No {
                    let _ = write!(
                        body,
                        "IF NEW.{n} IS DISTINCT FROM OLD.{n} THEN RAISE EXCEPTION 'column {} may not be changed' {DENIED}; END IF; ",
                        c.name
                    );
                    continue;
                }
                match w {
                    Write::Keys(keys) => {
                        body.push_str(&not_object(&n));
                        let old =
                            format!("(CASE WHEN jsonb_typeof(b.{n}) = 'object' THEN b.{n} ELSE '{{}}'::jsonb END)");
                        sets.push(format!(
                            "{n} = {} || {}",
                            keys.take(&old, false),
                            keys.take(&format!("NEW.{n}"), true)
                        ));
                    }
                    _ => sets.push(format!("{n} = NEW.{n}")),
                }
            }
            let pk_old: Vec<String> = rel.primary_key.iter().map(|k| format!("b.{0} = OLD.{0}", ident(k))).collect();
            let _ = write!(
                body,
                "UPDATE {base} AS b SET {} WHERE {}; IF NOT FOUND THEN RETURN NULL; END IF; ",
                sets.join(", "),
                pk_old.join(" AND ")
            );
        }
    }
    format!(
        "CREATE FUNCTION {fname}() RETURNS trigger LANGUAGE plpgsql AS $fn$ DECLARE r record; BEGIN {body}\
         SELECT * INTO r FROM {view} AS v WHERE {}; IF FOUND THEN RETURN r; END IF; RETURN NEW; END $fn$;\n\
         CREATE TRIGGER {} INSTEAD OF {} ON {view} FOR EACH ROW EXECUTE FUNCTION {fname}();\n",
        pk_new.join(" AND "),
        ident(&format!("partial_{}", action.as_str())),
        action.as_str().to_uppercase()
    )
}

/// The reference for both environments' policy sets over the catalog's managed tables.
pub fn reference(policies: &Policies, catalog: &CatalogSnapshot) -> Result<Reference, RlsError> {
    let mut sql = format!(
        "CREATE SCHEMA {REF_SCHEMA};\n\
         CREATE TABLE {REF_SCHEMA}.identity (pid int PRIMARY KEY, organization text NOT NULL, \
         environment text NOT NULL, actor_id text NOT NULL, actor_type text NOT NULL);\n\
         REVOKE ALL ON {REF_SCHEMA}.identity FROM PUBLIC;\n"
    );
    for (f, col) in
        [("org", "organization"), ("env", "environment"), ("actor_id", "actor_id"), ("actor_type", "actor_type")]
    {
        let _ = writeln!(
            sql,
            "CREATE FUNCTION {REF_SCHEMA}.{f}() RETURNS text LANGUAGE sql STABLE SECURITY DEFINER \
             SET search_path = pg_catalog, pg_temp AS $fn$ SELECT {col} FROM {REF_SCHEMA}.identity WHERE pid = pg_backend_pid() $fn$;"
        );
    }
    let tables = &policies.development.tables;
    for t in tables.by_name.values() {
        let _ = writeln!(sql, "ALTER TABLE {}.{} ENABLE ROW LEVEL SECURITY;", ident(&t.schema), ident(&t.name));
    }
    let mut roles = Vec::new();
    for set in [&policies.development, &policies.production] {
        for role in set.roles.values() {
            let name = format!("ref_{}_{}", set.environment.as_str(), role.name);
            let mut g = Gen { set, role, catalog, prefix: name.clone(), functions: String::new(), counter: 0 };
            let body = role_sql(&mut g, &name)?;
            let q = ident(&name);
            let _ = writeln!(
                sql,
                "CREATE ROLE {q} NOLOGIN;\nCREATE SCHEMA {q};\nGRANT USAGE ON SCHEMA {q}, {REF_SCHEMA} TO {q};"
            );
            sql.push_str(&g.functions);
            sql.push_str(&body);
            roles.push(RefRole { environment: set.environment, role: role.name.clone(), name });
        }
    }
    // Views take the tables' column defaults (INSTEAD OF triggers see only the view's).
    let schemas: Vec<String> = roles.iter().map(|r| lit(&r.name)).collect();
    let _ = writeln!(
        sql,
        "DO $do$ DECLARE d record; BEGIN FOR d IN SELECT vn.nspname AS vs, c.relname, a.attname, pg_get_expr(ad.adbin, ad.adrelid) AS def \
         FROM pg_attrdef ad JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum \
         JOIN pg_class c ON c.oid = ad.adrelid JOIN pg_class v ON v.relname = c.relname AND v.relkind = 'v' \
         JOIN pg_namespace vn ON vn.oid = v.relnamespace AND vn.nspname IN ({}) \
         JOIN pg_attribute va ON va.attrelid = v.oid AND va.attname = a.attname \
         WHERE NOT EXISTS (SELECT FROM pg_attrdef x WHERE x.adrelid = v.oid AND x.adnum = va.attnum) LOOP \
         EXECUTE format('ALTER VIEW %I.%I ALTER COLUMN %I SET DEFAULT %s', d.vs, d.relname, d.attname, d.def); END LOOP; END $do$;",
        schemas.join(", ")
    );
    Ok(Reference { setup_sql: sql, roles })
}

fn role_sql(g: &mut Gen, name: &str) -> Result<String, RlsError> {
    let q = ident(name);
    let mut sql = String::new();
    for t in g.set.tables.by_name.values() {
        let rel = g.relation(t)?.clone();
        if rel.primary_key.is_empty() {
            return Err(RlsError::NoPrimaryKey(t.name.clone()));
        }
        let base = format!("{}.{}", ident(&t.schema), ident(&t.name));
        let view = format!("{q}.{}", ident(&t.name));
        let access: Vec<(Action, Allowed)> =
            Action::ALL.iter().filter_map(|&a| allowed(g.role, &t.name, a).map(|x| (a, x))).collect();
        let get = |a: Action| access.iter().find(|(x, _)| *x == a).map(|(_, x)| x.clone());
        let privileges: Vec<&str> = access.iter().map(|(a, _)| sql_action(*a)).collect();
        // The view: what the caller sees of every column (raw where it may not select at all:
        // it then has no SELECT privilege on it).
        let mut cols = Vec::new();
        for c in &rel.columns {
            let expr = match get(Action::Select) {
                None => format!("r.{}", ident(&c.name)),
                Some(sel) => column_expr(g, t, c, &sel)?,
            };
            cols.push(format!("{expr} AS {}", ident(&c.name)));
        }
        let _ = writeln!(
            sql,
            "CREATE VIEW {view} WITH (security_barrier = true, security_invoker = true) AS SELECT {} FROM {base} AS r;",
            cols.join(", ")
        );
        if let Some(env) = &t.environment_column {
            let _ = writeln!(sql, "ALTER VIEW {view} ALTER COLUMN {} SET DEFAULT {REF_SCHEMA}.env();", ident(env));
        }
        if let Some(org) = &t.organization_column {
            let _ = writeln!(sql, "ALTER VIEW {view} ALTER COLUMN {} SET DEFAULT {REF_SCHEMA}.org();", ident(org));
        }
        if !privileges.is_empty() {
            let _ = writeln!(sql, "GRANT {0} ON {view} TO {q};\nGRANT {0} ON {base} TO {q};", privileges.join(", "));
        }
        let tenant = g.tenant(t, "");
        if !tenant.is_empty() {
            let _ = writeln!(
                sql,
                "CREATE POLICY {} ON {base} AS RESTRICTIVE FOR ALL TO {q} USING ({1}) WITH CHECK ({1});",
                ident(&format!("{name}_tenant")),
                tenant.join(" AND ")
            );
        }
        sql.push_str(&reference_checks(g, t, &rel, name)?);
        let select = match get(Action::Select) {
            Some(a) => g.scope(t, "", &a)?,
            None => "false".to_owned(),
        };
        for (action, a) in &access {
            let scope = g.scope(t, "", a)?;
            let clause = match action {
                Action::Select => format!("USING ({scope})"),
                Action::Insert => format!("WITH CHECK ({scope})"),
                Action::Update => format!("USING (({select}) AND ({scope})) WITH CHECK ({scope})"),
                Action::Delete => format!("USING (({select}) AND ({scope}))"),
            };
            let _ = writeln!(
                sql,
                "CREATE POLICY {} ON {base} AS PERMISSIVE FOR {} TO {q} {clause};",
                ident(&format!("{name}_{}", action.as_str())),
                sql_action(*action)
            );
            if matches!(action, Action::Insert | Action::Update) {
                let writes: Vec<(&Column, Write)> = rel.columns.iter().map(|c| (c, writable(a, c))).collect();
                if writes.iter().any(|(_, w)| matches!(w, Write::Keys(_))) {
                    sql.push_str(&partial_write_triggers(name, t, &rel, *action, &writes));
                }
            }
        }
    }
    Ok(sql)
}

/// A written reference to a managed table must name a row of the caller's tenant (the proxy checks
/// it before PostgreSQL's foreign key does, so another tenant's rows cannot be attached to).
fn reference_checks(g: &mut Gen, t: &TableSpec, rel: &Relation, name: &str) -> Result<String, RlsError> {
    let mut sql = String::new();
    for (i, fk) in rel.foreign_keys.iter().enumerate() {
        let Some(target) = g.set.tables.table(&fk.ref_schema, &fk.ref_table).cloned() else { continue };
        let tenant = g.tenant(&target, "o.");
        let ([col], [ref_col]) = (fk.columns.as_slice(), fk.ref_columns.as_slice()) else {
            return Err(RlsError::Unsupported(format!("multi-column foreign key on {}", t.name)));
        };
        if tenant.is_empty() {
            continue;
        }
        let body = format!(
            "SELECT o.{} FROM {}.{} AS o WHERE {}",
            ident(ref_col),
            ident(&target.schema),
            ident(&target.name),
            tenant.join(" AND ")
        );
        let check = format!("{0} IS NULL OR {0}::text IN (SELECT {1})", ident(col), g.function(&body));
        for action in ["INSERT", "UPDATE"] {
            let _ = writeln!(
                sql,
                "CREATE POLICY {} ON {}.{} AS RESTRICTIVE FOR {action} TO {} WITH CHECK ({check});",
                ident(&format!("{name}_fk{i}_{}", action.to_lowercase())),
                ident(&t.schema),
                ident(&t.name),
                ident(name)
            );
        }
    }
    Ok(sql)
}

fn sql_action(a: Action) -> &'static str {
    match a {
        Action::Select => "SELECT",
        Action::Insert => "INSERT",
        Action::Update => "UPDATE",
        Action::Delete => "DELETE",
    }
}

/// One column of the view: each grant's projection; where they differ, the first grant whose
/// scope covers the row decides.
fn column_expr(g: &mut Gen, t: &TableSpec, c: &Column, sel: &Allowed) -> Result<String, RlsError> {
    let raw = format!("r.{}", ident(&c.name));
    let exprs = sel.parts.iter().map(|(_, _, f)| projection(c, &raw, f)).collect::<Result<Vec<_>, _>>()?;
    if exprs.windows(2).all(|w| w[0] == w[1]) {
        return Ok(exprs.into_iter().next().unwrap_or_else(|| format!("NULL::{}", c.type_name)));
    }
    let mut case = String::from("CASE");
    for ((kind, rules, _), e) in sel.parts.iter().zip(&exprs) {
        let _ = write!(case, " WHEN {} THEN {e}", g.part(t, "r.", kind.as_deref(), rules)?);
    }
    case.push_str(" END");
    Ok(case)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::demo::snapshot;

    fn demo() -> Reference {
        let policies = crate::policy::shipped().unwrap();
        reference(&policies, &snapshot()).unwrap()
    }

    #[test]
    fn every_role_of_both_environments_gets_a_role_and_views() {
        let r = demo();
        let policies = crate::policy::shipped().unwrap();
        for set in [&policies.development, &policies.production] {
            for role in set.roles.keys() {
                let rr = r.role(set.environment, role).unwrap();
                assert!(r.setup_sql.contains(&format!("CREATE ROLE \"{}\" NOLOGIN", rr.name)));
                assert!(r.setup_sql.contains(&format!("CREATE VIEW \"{}\".\"entities\"", rr.name)));
            }
        }
        assert!(r.role(Environment::Production, "support").is_none());
    }

    #[test]
    fn scope_rules_become_policies_with_check() {
        let sql = demo().setup_sql;
        // The teacher's own sessions, for select, and as the insert WITH CHECK.
        let teacher =
            "((\"entity_type\" = 'session' AND ((\"data\" #>> ARRAY['teacherId']::text[]) = struere_ref.actor_id())))";
        assert!(
            sql.contains(&format!(
                "CREATE POLICY \"ref_development_teacher_insert\" ON \"public\".\"entities\" AS PERMISSIVE FOR INSERT \
             TO \"ref_development_teacher\" WITH CHECK ({teacher});"
            )),
            "{sql}"
        );
        // Update reads through select.
        assert!(sql.contains(&format!("USING (({teacher}) AND ({teacher})) WITH CHECK ({teacher})")), "{sql}");
        // The tenant is a restrictive policy.
        assert!(sql.contains(
            "CREATE POLICY \"ref_production_agent_tenant\" ON \"public\".\"messages\" AS RESTRICTIVE FOR ALL TO \
             \"ref_production_agent\" USING (\"environment\" = struere_ref.env() AND \"organization_id\" = struere_ref.org())"
        ));
        // No policy and no privilege where nothing is allowed.
        assert!(!sql.contains("\"ref_development_teacher_select\" ON \"public\".\"threads\""));
        assert!(!sql.contains("ON \"ref_development_teacher\".\"threads\" TO"));
    }

    #[test]
    fn rules_on_other_tables_go_through_definer_functions() {
        let sql = demo().setup_sql;
        // The guardian's students: via entity_relations; its sessions: in scope of those students.
        assert!(sql.contains("SELECT l.\"to_id\"::text FROM \"public\".\"entity_relations\" AS l WHERE l.\"environment\" = struere_ref.env()"));
        assert!(sql.contains("l.\"from_id\" = struere_ref.actor_id() AND l.\"relation_type\" = 'guardian_of'"));
        assert!(
            sql.contains(
                "(\"data\" #>> ARRAY['studentId']::text[]) IN (SELECT struere_ref.\"ref_development_guardian_"
            )
        );
    }

    #[test]
    fn masks_follow_the_field_lists() {
        let sql = demo().setup_sql;
        let agent_users =
            sql.lines().find(|l| l.starts_with("CREATE VIEW \"ref_production_agent\".\"users\"")).unwrap();
        assert!(agent_users.contains("repeat('*', greatest(length(r.\"email\"::text) - 4, 0))"), "{agent_users}");
        assert!(agent_users.contains("r.\"name\" AS \"name\""));
        // The teacher's sessions show only the listed keys.
        let teacher =
            sql.lines().find(|l| l.starts_with("CREATE VIEW \"ref_development_teacher\".\"entities\"")).unwrap();
        assert!(teacher.contains("j.key IN ('startTime', 'status', 'studentId', 'teacherId')"), "{teacher}");
        // The guardian's students and sessions differ: the row's grant decides.
        let guardian =
            sql.lines().find(|l| l.starts_with("CREATE VIEW \"ref_development_guardian\".\"entities\"")).unwrap();
        assert!(guardian.contains("CASE WHEN (r.\"entity_type\" = 'student'"), "{guardian}");
        // The support role never sees phones.
        assert!(sql.contains("NULL::text AS \"phone\""));
    }

    #[test]
    fn partial_json_writes_get_merging_triggers() {
        let sql = demo().setup_sql;
        assert!(sql.contains(
            "CREATE TRIGGER \"partial_insert\" INSTEAD OF INSERT ON \"ref_development_teacher\".\"entities\""
        ));
        assert!(sql.contains(
            "CREATE TRIGGER \"partial_update\" INSTEAD OF UPDATE ON \"ref_production_teacher\".\"entities\""
        ));
        // Admins write whole columns: plain auto-updatable views.
        assert!(!sql.contains("INSTEAD OF INSERT ON \"ref_development_admin\""));
    }

    #[test]
    fn unsupported_shapes_are_errors() {
        let col = Column { name: "data".into(), type_name: "jsonb".into(), type_oid: 0, not_null: false };
        let nested = FieldAccess {
            all: false,
            visible: vec![FieldRef { column: "data".into(), path: vec!["a".into(), "b".into()] }],
            masked: vec![],
        };
        assert!(matches!(projection(&col, "r.data", &nested), Err(RlsError::Unsupported(_))));
    }
}
