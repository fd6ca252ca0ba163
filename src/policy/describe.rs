//! A policy set as canonical lines (one fact per line: a table, a role's grant, a field, a mask,
//! a scope rule) and the difference of two sets as lines only in one of them. `policy status`,
//! `dev --watch` and `deploy` print these; comparing facts rather than file text means that
//! reordering or reformatting a file is not a change, and every real change is named.

use std::collections::BTreeSet;

use super::model::*;

/// Every fact of a set, sorted.
pub fn describe(set: &PolicySet) -> BTreeSet<String> {
    let mut lines = BTreeSet::new();
    for spec in set.tables.by_name.values() {
        let mut l = format!("table {}.{}: scope={}", spec.schema, spec.name, scope(spec.scope));
        for (what, col) in [
            ("organization", &spec.organization_column),
            ("environment", &spec.environment_column),
            ("type", &spec.type_column),
        ] {
            if let Some(c) = col {
                l.push_str(&format!(" {what}={c}"));
            }
        }
        l.push_str(&format!(" id={}", spec.id_column));
        lines.insert(l);
    }
    for role in set.roles.values() {
        lines.insert(format!("role {}", role.name));
        if role.unmanaged_tables {
            lines.insert(format!("role {}: unmanaged_tables (scratch tables and DDL on them)", role.name));
        }
        for g in &role.grants {
            let on = format!("role {} on {}", role.name, resource(g.resource.as_ref()));
            lines.insert(format!("{on}: allow {}", actions(&g.allow)));
            if !g.deny.is_empty() {
                lines.insert(format!("{on}: deny {}", actions(&g.deny)));
            }
            if g.fields.all {
                lines.insert(format!("{on}: field * visible"));
            }
            for f in &g.fields.visible {
                lines.insert(format!("{on}: field {f} visible"));
            }
            for (f, mode) in &g.fields.masked {
                lines.insert(format!("{on}: field {f} masked {}", mask(mode)));
            }
            if g.scope.is_empty() {
                lines.insert(format!("{on}: rows all of the organization and environment"));
            }
            for rule in &g.scope {
                lines.insert(format!("{on}: rows where {}", scope_rule(rule)));
            }
        }
    }
    lines
}

/// Fields a set names on `table` (columns, the first segment of JSON paths), for checking them
/// against the live columns.
pub fn columns_named(set: &PolicySet, table: &str) -> BTreeSet<String> {
    let mut cols = BTreeSet::new();
    if let Some(spec) = set.tables.by_name.get(table) {
        cols.insert(spec.id_column.clone());
        cols.extend(spec.organization_column.iter().cloned());
        cols.extend(spec.environment_column.iter().cloned());
        cols.extend(spec.type_column.iter().cloned());
    }
    for role in set.roles.values() {
        for g in role.grants.iter().filter(|g| g.resource.as_ref().is_some_and(|r| r.table == table)) {
            cols.extend(g.fields.visible.iter().map(|f| f.column.clone()));
            cols.extend(g.fields.masked.iter().map(|(f, _)| f.column.clone()));
            for rule in &g.scope {
                let field = match rule {
                    ScopeRule::Match { field, .. }
                    | ScopeRule::InScopeOf { field, .. }
                    | ScopeRule::Via { field, .. } => field,
                };
                cols.insert(field.column.clone());
            }
        }
    }
    cols
}

/// Lines only in `from` (`- …`) and only in `to` (`+ …`), in order.
pub fn diff(from: &BTreeSet<String>, to: &BTreeSet<String>) -> Vec<String> {
    let mut out: Vec<(String, char)> = from.difference(to).map(|l| (l.clone(), '-')).collect();
    out.extend(to.difference(from).map(|l| (l.clone(), '+')));
    out.sort();
    out.into_iter().map(|(l, sign)| format!("{sign} {l}")).collect()
}

fn scope(s: TableScope) -> &'static str {
    match s {
        TableScope::Environment => "environment",
        TableScope::Shared => "shared",
    }
}

fn resource(r: Option<&ResourceId>) -> String {
    match r {
        None => "*".to_owned(),
        Some(ResourceId { table, kind: Some(k) }) => format!("{table}:{k}"),
        Some(ResourceId { table, kind: None }) => table.clone(),
    }
}

fn actions(a: &[Action]) -> String {
    let mut names: Vec<&str> = a.iter().map(|a| a.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names.join(",")
}

fn mask(m: &MaskMode) -> String {
    match m {
        MaskMode::Hide => "hide".to_owned(),
        MaskMode::Redact(text) => format!("redact {text:?}"),
        MaskMode::Partial(n) => format!("partial keep={n}"),
        MaskMode::Hash => "hash".to_owned(),
    }
}

fn actor(a: ActorAttr) -> &'static str {
    match a {
        ActorAttr::Id => "actor.id",
        ActorAttr::Organization => "actor.organization",
        ActorAttr::Type => "actor.type",
    }
}

fn literal(l: &Literal) -> String {
    match l {
        Literal::Text(t) => format!("{t:?}"),
        Literal::Integer(i) => i.to_string(),
        Literal::Float(f) => f.to_string(),
        Literal::Bool(b) => b.to_string(),
        Literal::List(items) => format!("[{}]", items.iter().map(literal).collect::<Vec<_>>().join(", ")),
    }
}

fn scope_rule(rule: &ScopeRule) -> String {
    match rule {
        ScopeRule::Match { field, op, value } => {
            let op = match op {
                ScopeOp::Eq => "eq",
                ScopeOp::Neq => "neq",
                ScopeOp::In => "in",
                ScopeOp::Contains => "contains",
            };
            let value = match value {
                ScopeValue::Actor(a) => actor(*a).to_owned(),
                ScopeValue::Literal(l) => literal(l),
            };
            format!("{field} {op} {value}")
        }
        ScopeRule::InScopeOf { field, resource: r, target } => {
            format!("{field} in scope of {} ({target})", resource(Some(r)))
        }
        ScopeRule::Via { field, link } => {
            let mut filter: Vec<String> = link.filter.iter().map(|(c, v)| format!("{c}={}", literal(v))).collect();
            filter.sort();
            format!(
                "{field} via {}.{} where {} = {}{}",
                link.table,
                link.column,
                link.actor_column,
                actor(link.actor),
                if filter.is_empty() { String::new() } else { format!(" and {}", filter.join(" and ")) }
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn shipped() -> crate::policy::Policies {
        crate::policy::shipped().unwrap()
    }

    #[test]
    fn describes_tables_grants_fields_masks_and_scope_rules() {
        let p = shipped();
        let lines = describe(&p.development);
        let has = |needle: &str| lines.iter().any(|l| l == needle);
        assert!(
            has("table public.entities: scope=environment organization=organization_id environment=environment \
                 type=entity_type id=id"),
            "{lines:#?}"
        );
        assert!(has("role teacher on entities:session: allow insert,select,update"), "{lines:#?}");
        assert!(has("role teacher on entities:session: field data.teacherId visible"), "{lines:#?}");
        assert!(has("role teacher on entities:session: rows where data.teacherId eq actor.id"), "{lines:#?}");
        assert!(lines.iter().any(|l| l.starts_with("role guardian on entities:student: rows where id via")));
        assert!(lines.iter().any(|l| l.contains(": field ") && l.contains(" masked partial keep=")), "{lines:#?}");
        assert!(has("role admin: unmanaged_tables (scratch tables and DDL on them)"));
        // Production's admin has no scratch tables: one of the facts that differ.
        let d = diff(&lines, &describe(&p.production));
        assert!(d.contains(&"- role admin: unmanaged_tables (scratch tables and DDL on them)".to_owned()), "{d:#?}");
    }

    #[test]
    fn reformatting_is_not_a_change_and_every_change_is_named() {
        let base = crate::policy::Bundle::shipped();
        let mut reordered = base.clone();
        let text = format!("# a comment\n\n{}", base.files["development.toml"].replace(" = ", "="));
        reordered.files.insert("development.toml".into(), text);
        let a = base.compile(Path::new("a")).unwrap();
        let b = reordered.compile(Path::new("b")).unwrap();
        assert!(diff(&describe(&a.development), &describe(&b.development)).is_empty());
        let mut changed = base.clone();
        let text =
            base.files["development.toml"].replacen("\"data.status\"", "\"data.status\", \"data.paymentAmount\"", 1);
        changed.files.insert("development.toml".into(), text);
        let c = changed.compile(Path::new("c")).unwrap();
        let d = diff(&describe(&a.development), &describe(&c.development));
        assert_eq!(d, ["+ role teacher on entities:session: field data.paymentAmount visible"]);
    }

    #[test]
    fn columns_named_covers_fields_scope_rules_and_table_columns() {
        let p = shipped();
        let cols = columns_named(&p.development, "entities");
        for c in ["id", "organization_id", "environment", "entity_type", "data"] {
            assert!(cols.contains(c), "{c}: {cols:?}");
        }
    }
}
