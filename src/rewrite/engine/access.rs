//! What a caller's roles allow on one managed table for one action: which rows (per resource
//! type), and which fields. Pure: policy model in, decision out.

use crate::policy::{Action, FieldAccess, PolicySet, Role, ScopeRule, TableSpec};

/// One allowing grant, narrowed to a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// The resource type this part covers (`entities:session` → `session`); `None`: every row.
    pub kind: Option<String>,
    /// `None`: every row (of the kind) in the caller's organization and environment.
    /// `Some(rules)`: rows matching any rule.
    pub rules: Option<Vec<ScopeRule>>,
    pub fields: FieldAccess,
}

/// The caller's access to one table for one action.
#[derive(Debug, Clone, PartialEq)]
pub struct TableAccess {
    pub parts: Vec<Part>,
    /// Resource types a role denies: excluded whatever the allows say.
    pub denied_kinds: Vec<String>,
}

impl TableAccess {
    /// Whether the row predicate of this access (`Ctx::scope_predicate`) reads the row alone:
    /// no scope rule looks rows up in another table (`in_scope_of`, `via`: `x IN (SELECT …)`,
    /// which PostgreSQL may make a semi-join above the row's scan). PostgreSQL then evaluates
    /// the whole predicate at the row's scan, before anything computes a value of the row.
    pub fn predicate_reads_the_row_alone(&self) -> bool {
        self.parts.iter().flat_map(|p| p.rules.iter().flatten()).all(|r| matches!(r, ScopeRule::Match { .. }))
    }
}

/// The caller's roles as defined in the environment's policy set (unknown role names grant nothing).
pub fn roles_of<'a>(set: &'a PolicySet, names: &[String]) -> Vec<&'a Role> {
    names.iter().filter_map(|n| set.roles.get(n)).collect()
}

/// Deny overrides allow; no allow means denied. `Err` carries the refusal message.
pub fn table_access(
    roles: &[&Role],
    role_names: &[String],
    table: &TableSpec,
    action: Action,
) -> Result<TableAccess, String> {
    let mut parts = Vec::new();
    let mut denied_kinds = Vec::new();
    for role in roles {
        for g in &role.grants {
            let kind = match &g.resource {
                None => None,
                Some(r) if r.table == table.name => r.kind.clone(),
                Some(_) => continue,
            };
            if g.deny.contains(&action) {
                match kind {
                    None => {
                        return Err(format!("role \"{}\" is denied {action} on {}", role.name, table.name));
                    }
                    Some(k) => denied_kinds.push(k),
                }
                continue;
            }
            if g.allow.contains(&action) {
                let rules = if g.scope.is_empty() { None } else { Some(g.scope.clone()) };
                parts.push(Part { kind, rules, fields: g.fields.clone() });
            }
        }
    }
    parts.retain(|p| p.kind.as_ref().is_none_or(|k| !denied_kinds.contains(k)));
    if parts.is_empty() {
        let who = if role_names.is_empty() {
            "a key with no roles".to_owned()
        } else {
            format!("role{} {}", if role_names.len() > 1 { "s" } else { "" }, quote_list(role_names))
        };
        return Err(format!("{who} may not {action} {}", table.name));
    }
    // The most visible part first: a row several parts cover is shown through the widest one.
    parts.sort_by_key(|p| std::cmp::Reverse(visibility(&p.fields)));
    denied_kinds.sort();
    denied_kinds.dedup();
    Ok(TableAccess { parts, denied_kinds })
}

fn visibility(f: &FieldAccess) -> usize {
    if f.all { usize::MAX - f.masked.len() } else { f.visible.len() * 2 + f.masked.len() }
}

fn quote_list(names: &[String]) -> String {
    names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ActorAttr, FieldRef, Grant, ResourceId, ScopeOp, ScopeValue, TableScope};

    fn table() -> TableSpec {
        TableSpec {
            schema: "public".into(),
            name: "entities".into(),
            scope: TableScope::Environment,
            organization_column: Some("organization_id".into()),
            environment_column: Some("environment".into()),
            type_column: Some("entity_type".into()),
            id_column: "id".into(),
        }
    }

    fn grant(kind: Option<&str>, allow: &[Action], deny: &[Action], scoped: bool) -> Grant {
        Grant {
            resource: Some(ResourceId { table: "entities".into(), kind: kind.map(str::to_owned) }),
            allow: allow.to_vec(),
            deny: deny.to_vec(),
            fields: FieldAccess { all: true, ..Default::default() },
            scope: if scoped {
                vec![ScopeRule::Match {
                    field: FieldRef { column: "data".into(), path: vec!["teacherId".into()] },
                    op: ScopeOp::Eq,
                    value: ScopeValue::Actor(ActorAttr::Id),
                }]
            } else {
                vec![]
            },
        }
    }

    fn role(name: &str, grants: Vec<Grant>) -> Role {
        Role { name: name.into(), unmanaged_tables: false, grants }
    }

    #[test]
    fn no_allow_is_denied_and_names_the_role() {
        let r = role("teacher", vec![grant(Some("session"), &[Action::Select], &[], true)]);
        let e = table_access(&[&r], &["teacher".into()], &table(), Action::Update).unwrap_err();
        assert_eq!(e, "role \"teacher\" may not update entities");
        let e = table_access(&[], &[], &table(), Action::Select).unwrap_err();
        assert_eq!(e, "a key with no roles may not select entities");
    }

    #[test]
    fn deny_overrides_allow_across_roles() {
        let a = role("a", vec![grant(None, &[Action::Select], &[], false)]);
        let b = role("b", vec![grant(None, &[], &[Action::Select], false)]);
        assert!(table_access(&[&a, &b], &[], &table(), Action::Select).is_err());
        // A typed deny only removes that type.
        let c = role("c", vec![grant(Some("student"), &[], &[Action::Select], false)]);
        let acc = table_access(&[&a, &c], &[], &table(), Action::Select).unwrap();
        assert_eq!(acc.denied_kinds, ["student"]);
        assert_eq!(acc.parts.len(), 1);
    }

    #[test]
    fn allows_union_and_star_grants_apply() {
        let a = role("a", vec![grant(Some("session"), &[Action::Select], &[], true)]);
        let star = Role {
            name: "s".into(),
            unmanaged_tables: false,
            grants: vec![Grant { resource: None, ..grant(None, &[Action::Select], &[], false) }],
        };
        let acc = table_access(&[&a, &star], &[], &table(), Action::Select).unwrap();
        assert_eq!(acc.parts.len(), 2);
        let only_typed = table_access(&[&a], &[], &table(), Action::Select).unwrap();
        assert_eq!(only_typed.parts[0].kind.as_deref(), Some("session"));
        assert!(only_typed.parts[0].rules.is_some());
    }
}
