//! Step 4: the minimal statement rules the printer's safety depends on.
//!
//! The printer writes every string as `'…'` with doubled quotes, which means exactly that only
//! while `standard_conforming_strings` is on and the client encoding is the one the proxy
//! pinned; identifiers resolve as intended only under the pinned `search_path` and role. So no
//! environment-key statement may change those settings, by any route: `SET`/`RESET` (also
//! `SET LOCAL`, `SET ROLE`, `SET SESSION AUTHORIZATION`, `SET NAMES`, `SET SCHEMA`), settings
//! attached to roles, databases, the system or functions (`ALTER … SET`, `CREATE FUNCTION …
//! SET`), or a call of `set_config`. `RESET ALL` and `DISCARD ALL` stay allowed: the pinned
//! values come from the startup packet, so they are what those restore.
//!
//! PostgreSQL's tree is authoritative and is checked completely (every string in it is
//! visited, see `pgtree`); the sqlparser tree, which is what gets printed, is checked too. The
//! verifier runs the PostgreSQL-side check again on the text actually forwarded.

use std::ops::ControlFlow;

use pg_query::NodeEnum;
use pg_query::protobuf::VariableSetKind;
use sqlparser::ast::{AlterRoleOperation, Ident, ObjectName, Reset, ResetConfig, Set, Statement, Visit, Visitor};

use super::Refusal;
use super::pgtree::{self, WalkError};

/// Settings the proxy pins at connection start (compared case-insensitively, as PostgreSQL
/// compares setting names).
pub const PINNED_SETTINGS: &[&str] = &[
    "standard_conforming_strings",
    "backslash_quote",
    "escape_string_warning",
    "client_encoding",
    "search_path",
    "role",
    "session_authorization",
];

const SET_CONFIG: &str = "set_config";

fn is_pinned(name: &str) -> bool {
    PINNED_SETTINGS.iter().any(|p| p.eq_ignore_ascii_case(name))
}

fn pinned_refusal(verb: &str, name: &str) -> Refusal {
    Refusal::Denied(format!(
        "refused: {verb} {} is not allowed through the proxy: the proxy pins it",
        name.to_ascii_lowercase()
    ))
}

fn set_config_refusal() -> Refusal {
    Refusal::Denied(
        "refused: set_config is not allowed through the proxy: it can change settings the proxy \
         pins (standard_conforming_strings, client_encoding, search_path, role, …)"
            .to_string(),
    )
}

/// Checks one statement of PostgreSQL's tree.
pub(crate) fn check_pg(node: &NodeEnum) -> Result<(), Refusal> {
    // A top-level SET/RESET gets a message naming the exact form; anything nested (ALTER ROLE
    // … SET, CREATE FUNCTION … SET, …) is caught by the walk below.
    if let NodeEnum::VariableSetStmt(set) = node
        && is_pinned(&set.name)
    {
        let verb = match VariableSetKind::try_from(set.kind) {
            Ok(VariableSetKind::VarReset) => "RESET",
            _ if set.is_local => "SET LOCAL",
            _ => "SET",
        };
        return Err(pinned_refusal(verb, &set.name));
    }
    let result = pgtree::walk_strings(node, &mut |path, value| {
        let Some(&(message, field)) = path.last() else {
            return Ok(());
        };
        if message == "VariableSetStmt" && field == "name" && is_pinned(value) {
            return Err(pinned_refusal("setting", value));
        }
        // Names in PostgreSQL's tree (functions, types, columns, operators' functions…) are
        // `String` nodes; string literals are `String` nodes inside `A_Const`. Any name equal
        // to set_config is refused, wherever it appears: broader than "a call", on purpose.
        if message == "String" && field == "sval" && value.eq_ignore_ascii_case(SET_CONFIG) {
            let inside_constant = path.iter().any(|(m, _)| *m == "AConst");
            if !inside_constant {
                return Err(set_config_refusal());
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => Ok(()),
        Err(WalkError::Stopped(refusal)) => Err(refusal),
        Err(WalkError::Serializer) => {
            Err(Refusal::Unverifiable("refused: the proxy could not inspect PostgreSQL's parse tree".to_string()))
        }
    }
}

/// Checks one statement of sqlparser's tree (the tree that will be printed).
pub(crate) fn check_sql(stmt: &Statement) -> Result<(), Refusal> {
    check_statement_form(stmt)?;
    let mut finder = SetConfigFinder;
    match stmt.visit(&mut finder) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(set_config_refusal()),
    }
}

fn check_statement_form(stmt: &Statement) -> Result<(), Refusal> {
    match stmt {
        Statement::Set(set) => match set {
            Set::SingleAssignment { variable, .. } => check_name("SET", variable),
            Set::ParenthesizedAssignments { variables, .. } => variables.iter().try_for_each(|v| check_name("SET", v)),
            Set::MultipleAssignments { assignments } => assignments.iter().try_for_each(|a| check_name("SET", &a.name)),
            Set::SetRole { .. } => Err(pinned_refusal("SET", "role")),
            Set::SetSessionAuthorization(_) => Err(pinned_refusal("SET", "session_authorization")),
            Set::SetNames { .. } | Set::SetNamesDefault {} => Err(pinned_refusal("SET", "client_encoding")),
            // Not PostgreSQL syntax; PostgreSQL would have rejected it before we got here.
            Set::SetSessionParam(_) => {
                Err(Refusal::Denied("refused: this SET form is not allowed through the proxy".to_string()))
            }
            Set::SetTimeZone { .. } | Set::SetTransaction { .. } => Ok(()),
        },
        Statement::Reset(reset) => match &reset.reset {
            Reset::ALL => Ok(()),
            Reset::SessionAuthorization => Err(pinned_refusal("RESET", "session_authorization")),
            Reset::ConfigurationParameter(name) => check_name("RESET", name),
        },
        Statement::AlterRole { operation, .. } => match operation {
            AlterRoleOperation::Set { config_name, .. } => check_name("ALTER ROLE … SET", config_name),
            AlterRoleOperation::Reset { config_name: ResetConfig::ConfigName(name), .. } => {
                check_name("ALTER ROLE … RESET", name)
            }
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

fn check_name(verb: &str, name: &ObjectName) -> Result<(), Refusal> {
    // Only a one-part name can be a built-in setting (`a.b` is a custom one).
    if let [part] = name.0.as_slice()
        && let Some(ident) = part.as_ident()
        && is_pinned(&ident.value)
    {
        return Err(pinned_refusal(verb, &ident.value));
    }
    Ok(())
}

/// Finds any identifier spelled set_config (function name, any qualification, any case).
struct SetConfigFinder;

impl Visitor for SetConfigFinder {
    type Break = ();

    fn pre_visit_ident(&mut self, ident: &Ident) -> ControlFlow<()> {
        if ident.value.eq_ignore_ascii_case(SET_CONFIG) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    fn pg(sql: &str) -> Result<(), Refusal> {
        let parsed = pg_query::parse(sql, 0).unwrap();
        check_pg(parsed.protobuf.stmts[0].stmt.as_ref().unwrap().node.as_ref().unwrap())
    }

    fn sp(sql: &str) -> Result<(), Refusal> {
        check_sql(&Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap()[0])
    }

    /// Each rule holds on each tree on its own, so neither is a single point of failure.
    #[test]
    fn both_trees_refuse_on_their_own() {
        for sql in [
            "SET search_path = a",
            "SET LOCAL search_path TO DEFAULT",
            "set CLIENT_ENCODING = 'x'",
            "SET NAMES 'x'",
            "SET ROLE x",
            "RESET ROLE",
            "SET SESSION AUTHORIZATION x",
            "RESET SESSION AUTHORIZATION",
            "RESET standard_conforming_strings",
            "ALTER ROLE r SET backslash_quote = on",
            "ALTER ROLE r RESET search_path",
            "SELECT set_config('a', 'b', false)",
            "SELECT x.SET_CONFIG('a', 'b', false)",
            "SELECT * FROM t WHERE a IN (SELECT set_config('a', 'b', false))",
        ] {
            assert!(matches!(pg(sql), Err(Refusal::Denied(_))), "pg tree: {sql}");
            assert!(matches!(sp(sql), Err(Refusal::Denied(_))), "sqlparser tree: {sql}");
        }
    }

    #[test]
    fn both_trees_allow_restoring_and_unrelated_settings() {
        for sql in ["RESET ALL", "SET statement_timeout = 5", "SET x.search_path = 1", "SELECT 'set_config'"] {
            assert_eq!(pg(sql), Ok(()), "pg tree: {sql}");
            assert_eq!(sp(sql), Ok(()), "sqlparser tree: {sql}");
        }
        assert_eq!(pg("DISCARD ALL"), Ok(()));
    }

    #[test]
    fn messages_name_the_form_and_the_setting() {
        assert_eq!(
            pg("SET standard_conforming_strings = off").unwrap_err().to_string(),
            "refused: SET standard_conforming_strings is not allowed through the proxy: the proxy pins it"
        );
        assert_eq!(
            pg("SET LOCAL ROLE x").unwrap_err().to_string(),
            "refused: SET LOCAL role is not allowed through the proxy: the proxy pins it"
        );
        assert_eq!(
            sp("RESET ROLE").unwrap_err().to_string(),
            "refused: RESET role is not allowed through the proxy: the proxy pins it"
        );
    }
}
