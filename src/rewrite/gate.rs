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
//!
//! Invariant: no statement that changes a setting the printer or name resolution relies on
//! (`standard_conforming_strings`, `client_encoding`, `search_path`, role, session authorization) is ever forwarded for
//! an environment key, whichever tree (sqlparser's or PostgreSQL's) shows it.

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

/// Whether `value` is the value the proxy pins `name` to, spelled as PostgreSQL accepts it:
/// setting it again changes nothing (psycopg sets `client_encoding` to `utf8` on every
/// connection; ORMs set `standard_conforming_strings` to `on`).
fn keeps_pinned_value(name: &str, value: &str) -> bool {
    if name.eq_ignore_ascii_case("client_encoding") {
        // PostgreSQL compares encoding names without case and without non-alphanumerics.
        let clean: String = value.chars().filter(char::is_ascii_alphanumeric).collect::<String>().to_ascii_lowercase();
        return matches!(clean.as_str(), "utf8" | "unicode");
    }
    name.eq_ignore_ascii_case("standard_conforming_strings")
        && ["on", "true", "yes"].iter().any(|v| v.eq_ignore_ascii_case(value))
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
        if let (Ok(VariableSetKind::VarSetValue), [value]) = (VariableSetKind::try_from(set.kind), set.args.as_slice())
            && let Some(NodeEnum::AConst(c)) = &value.node
            && let Some(pg_query::protobuf::a_const::Val::Sval(v)) = &c.val
            && keeps_pinned_value(&set.name, &v.sval)
        {
            return Ok(());
        }
        let verb = match VariableSetKind::try_from(set.kind) {
            Ok(VariableSetKind::VarReset) => "RESET",
            _ if set.is_local => "SET LOCAL",
            _ => "SET",
        };
        return Err(pinned_refusal(verb, &set.name));
    }
    // `set_config('<harmless setting>', …)` (asyncpg sends `set_config('jit', 'off', false)`)
    // is the one accepted use of the name; every other occurrence is refused.
    let mut harmless_calls = harmless_set_config_calls_pg(node);
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
                if harmless_calls == 0 {
                    return Err(set_config_refusal());
                }
                harmless_calls -= 1;
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

/// Settings a `set_config` call may name: the ones an environment key may SET.
fn settable(name: &str) -> bool {
    super::engine::ALLOWED_SETTINGS.iter().any(|s| s.eq_ignore_ascii_case(name)) && !is_pinned(name)
}

/// The number of `set_config` calls in PostgreSQL's tree that name, as a constant, a setting an
/// environment key may change (each accounts for one occurrence of the name).
/// A complete walk (`pgtree::visit`): a call pg_query's `nodes()` skips (in VALUES, say) would
/// otherwise not be counted, and its harmless name refused.
fn harmless_set_config_calls_pg(node: &NodeEnum) -> usize {
    let mut count = 0usize;
    let walked = pgtree::visit::<()>(node, &mut |n| {
        let pg_query::NodeRef::FuncCall(f) = n else { return Ok(()) };
        let name: Vec<&str> = f
            .funcname
            .iter()
            .filter_map(|n| match &n.node {
                Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                _ => None,
            })
            .collect();
        let named = matches!(name.as_slice(), [SET_CONFIG] | ["pg_catalog", SET_CONFIG]);
        let first = f.args.first().and_then(|a| match &a.node {
            Some(NodeEnum::AConst(c)) => match &c.val {
                Some(pg_query::protobuf::a_const::Val::Sval(s)) => Some(s.sval.as_str()),
                _ => None,
            },
            _ => None,
        });
        if named && f.args.len() == 3 && first.is_some_and(settable) {
            count += 1;
        }
        Ok(())
    });
    // A tree that cannot be walked accounts for no harmless call (fail closed).
    if walked.is_ok() { count } else { 0 }
}

/// Checks one statement of sqlparser's tree (the tree that will be printed).
pub(crate) fn check_sql(stmt: &Statement) -> Result<(), Refusal> {
    check_statement_form(stmt)?;
    let mut finder = SetConfigFinder { harmless: 0, names: 0 };
    let _ = stmt.visit(&mut finder);
    if finder.names > finder.harmless { Err(set_config_refusal()) } else { Ok(()) }
}

fn check_statement_form(stmt: &Statement) -> Result<(), Refusal> {
    match stmt {
        Statement::Set(set) => match set {
            Set::SingleAssignment { variable, values, .. } if sets_pinned_value(variable, values) => Ok(()),
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

/// `SET <variable> = <values>` (sqlparser's tree) sets a pinned setting to the value it is
/// pinned to (`keeps_pinned_value`), which changes nothing.
pub(crate) fn sets_pinned_value(variable: &ObjectName, values: &[sqlparser::ast::Expr]) -> bool {
    use sqlparser::ast::{Expr, Value};
    let value = match values {
        [Expr::Value(v)] => match &v.value {
            Value::SingleQuotedString(s) => Some(s.as_str()),
            Value::Boolean(true) => Some("on"),
            _ => None,
        },
        [Expr::Identifier(i)] if i.quote_style.is_none() => Some(i.value.as_str()),
        _ => None,
    };
    match (variable.0.as_slice(), value) {
        ([part], Some(value)) => part.as_ident().is_some_and(|i| keeps_pinned_value(&i.value, value)),
        _ => false,
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

/// Counts identifiers spelled set_config (function name, any qualification, any case) and the
/// harmless calls (`set_config('<settable>', …, …)`, unquoted name) that account for them.
struct SetConfigFinder {
    harmless: usize,
    names: usize,
}

impl Visitor for SetConfigFinder {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &sqlparser::ast::Expr) -> ControlFlow<()> {
        use sqlparser::ast::{Expr, FunctionArg, FunctionArgExpr, FunctionArguments, Value};
        let Expr::Function(f) = e else { return ControlFlow::Continue(()) };
        let name: Vec<&Ident> = f.name.0.iter().filter_map(|p| p.as_ident()).collect();
        let plain = |i: &Ident, v: &str| i.quote_style.is_none() && i.value.eq_ignore_ascii_case(v);
        let named = match name.as_slice() {
            [n] => plain(n, SET_CONFIG),
            [s, n] => plain(s, "pg_catalog") && plain(n, SET_CONFIG),
            _ => false,
        };
        let FunctionArguments::List(list) = &f.args else { return ControlFlow::Continue(()) };
        let first = match list.args.first() {
            Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) => match &v.value {
                Value::SingleQuotedString(s) => Some(s.as_str()),
                _ => None,
            },
            _ => None,
        };
        if named && list.args.len() == 3 && list.clauses.is_empty() && first.is_some_and(settable) {
            self.harmless += 1;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_ident(&mut self, ident: &Ident) -> ControlFlow<()> {
        if ident.value.eq_ignore_ascii_case(SET_CONFIG) {
            self.names += 1;
        }
        ControlFlow::Continue(())
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
            "SELECT set_config('search_path', 'evil', false)",
            "SELECT set_config('jit', 'off', false), set_config('role', 'x', false)",
            "SELECT set_config('jit', set_config('role', 'x', false), false)",
            "SELECT set_config(name, 'off', false) FROM (SELECT 'jit' AS name) s",
            "SELECT x.set_config('jit', 'off', false)",
            "SELECT * FROM t WHERE a IN (SELECT set_config('a', 'b', false))",
        ] {
            assert!(matches!(pg(sql), Err(Refusal::Denied(_))), "pg tree: {sql}");
            assert!(matches!(sp(sql), Err(Refusal::Denied(_))), "sqlparser tree: {sql}");
        }
    }

    #[test]
    fn both_trees_allow_restoring_and_unrelated_settings() {
        for sql in [
            "RESET ALL",
            "SET statement_timeout = 5",
            "SET x.search_path = 1",
            "SELECT 'set_config'",
            "SELECT set_config('jit', 'off', false)",
            "SELECT pg_catalog.set_config('statement_timeout', $1, true)",
        ] {
            assert_eq!(pg(sql), Ok(()), "pg tree: {sql}");
            assert_eq!(sp(sql), Ok(()), "sqlparser tree: {sql}");
        }
        assert_eq!(pg("DISCARD ALL"), Ok(()));
    }

    #[test]
    fn both_trees_allow_setting_a_pinned_setting_to_its_pinned_value() {
        for sql in [
            "SET client_encoding TO utf8",
            "SET client_encoding = 'UTF-8'",
            "SET LOCAL client_encoding TO 'unicode'",
            "SET standard_conforming_strings = on",
            "SET standard_conforming_strings TO 'true'",
        ] {
            assert_eq!(pg(sql), Ok(()), "pg tree: {sql}");
            assert_eq!(sp(sql), Ok(()), "sqlparser tree: {sql}");
        }
        for sql in [
            "SET client_encoding TO latin1",
            "SET client_encoding TO DEFAULT",
            "SET client_encoding TO 'utf8', 'x'",
            "SET standard_conforming_strings = off",
            "SET standard_conforming_strings = 0",
            "SET search_path = 'utf8'",
            "SET role = 'on'",
            "RESET client_encoding",
        ] {
            assert!(matches!(pg(sql), Err(Refusal::Denied(_))), "pg tree: {sql}");
            if let Ok(stmts) = Parser::parse_sql(&PostgreSqlDialect {}, sql) {
                assert!(matches!(check_sql(&stmts[0]), Err(Refusal::Denied(_))), "sqlparser tree: {sql}");
            }
        }
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
