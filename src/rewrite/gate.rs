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
//! `set_config` is accepted in three forms only, each call checked on its own: a constant
//! name of a setting an environment key may `SET`; a constant pinned name with the constant
//! value it is pinned to (a no-op); and, in a top-level SELECT (whose parameters are the ones a
//! Bind supplies), a parameter as the name, or a parameter as the value of a pinned name. The
//! last two depend on values the proxy has not seen yet: they come back as [`ParamRule`]s,
//! which the rewrite carries (cached with it) and the session checks on every Bind of the
//! statement before forwarding it (`session/relay.rs`); a simple Query cannot bind them and
//! is refused.
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

/// A condition on a value the client binds later, on which accepting a statement depends
/// (`set_config` with a parameter). Numbers are the statement's `$n`, from 1.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ParamRule {
    /// `set_config($n, …)`: the value must name a setting an environment key may `SET`.
    SettingName { param: u16 },
    /// `set_config('<pinned>', $n, …)`: the value must be the one `setting` is pinned to.
    PinnedValue { param: u16, setting: &'static str },
}

/// Parameter types a rule's parameter may be declared with in Parse: unspecified (the server
/// takes `text` from set_config's signature), `text` and `varchar`. Their input and receive
/// functions give back exactly the bytes bound, in either format, so the value the proxy
/// checks is the value the server uses.
pub const RULE_PARAM_TYPES: &[u32] = &[0, 25, 1043];

impl ParamRule {
    pub fn param(&self) -> u16 {
        match self {
            ParamRule::SettingName { param } | ParamRule::PinnedValue { param, .. } => *param,
        }
    }

    /// The Parse that prepares the statement declares `types`: each rule's parameter must be
    /// one whose bound bytes the server reads as they are.
    pub fn check_declared(&self, types: &[u32]) -> Result<(), Refusal> {
        let declared = types.get(usize::from(self.param()) - 1).copied().unwrap_or(0);
        if RULE_PARAM_TYPES.contains(&declared) {
            return Ok(());
        }
        Err(Refusal::Denied(format!(
            "refused: parameter ${} of set_config must be declared as text (or left unspecified), not type {declared}",
            self.param()
        )))
    }

    /// A Bind supplies `value` (`None`: NULL or not supplied) for the rule's parameter.
    pub fn check(&self, value: Option<&[u8]>) -> Result<(), Refusal> {
        let text = value.and_then(|v| std::str::from_utf8(v).ok()).filter(|t| !t.contains('\0'));
        match self {
            ParamRule::SettingName { param } => {
                if text.is_some_and(settable) {
                    return Ok(());
                }
                Err(Refusal::Denied(format!(
                    "refused: set_config's setting name (parameter ${param}) must be a setting an environment key \
                     may SET; the value bound is not one"
                )))
            }
            ParamRule::PinnedValue { param, setting } => {
                if text.is_some_and(|t| keeps_pinned_value(setting, t)) {
                    return Ok(());
                }
                Err(Refusal::Denied(format!(
                    "refused: set_config of {setting} (parameter ${param}) may only set the value the proxy pins \
                     it to; the value bound is another"
                )))
            }
        }
    }
}

/// The pinned settings a statement may set to the value they are pinned to (canonical names).
const PINNED_WITH_VALUE: &[&str] = &["client_encoding", "standard_conforming_strings"];

/// Pinned settings whose pinned value is their startup value (`session/handshake.rs`,
/// `pinned_params`), so `RESET` of one restores exactly that value, as `RESET ALL` does: a
/// no-op (psycopg's tests send `RESET search_path`). `role` and `session_authorization` are not
/// startup values here and stay refused.
const RESET_TO_STARTUP: &[&str] = &["search_path", "client_encoding", "standard_conforming_strings"];

fn resets_to_startup_value(name: &str) -> bool {
    RESET_TO_STARTUP.iter().any(|s| s.eq_ignore_ascii_case(name))
}

/// `RESET name` on sqlparser's tree restores a startup value the proxy pins (a no-op).
pub(crate) fn resets_pinned_startup_value(name: &ObjectName) -> bool {
    matches!(name.0.as_slice(), [part] if part.as_ident().is_some_and(|i| resets_to_startup_value(&i.value)))
}

/// Checks one statement of PostgreSQL's tree; the rules its bound values must pass.
pub(crate) fn check_pg(node: &NodeEnum) -> Result<Vec<ParamRule>, Refusal> {
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
            return Ok(Vec::new());
        }
        if VariableSetKind::try_from(set.kind) == Ok(VariableSetKind::VarReset) && resets_to_startup_value(&set.name) {
            return Ok(Vec::new());
        }
        let verb = match VariableSetKind::try_from(set.kind) {
            Ok(VariableSetKind::VarReset) => "RESET",
            _ if set.is_local => "SET LOCAL",
            _ => "SET",
        };
        return Err(pinned_refusal(verb, &set.name));
    }
    // The accepted `set_config` calls (asyncpg sends `set_config('jit', 'off', false)`, psycopg
    // `set_config($1, $2, false)` and `set_config('client_encoding', $1, false)`) are the
    // accepted uses of the name; every other occurrence is refused.
    let (mut harmless_calls, rules) = harmless_set_config_calls_pg(node);
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
        Ok(()) => Ok(rules),
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

/// A `set_config` argument as the gate tells them apart.
enum Arg<'a> {
    Constant(&'a str),
    Param(u16),
    Other,
}

/// What a `set_config(name, value, is_local)` call with these arguments needs to be accepted:
/// `None` refused; `Some(None)` accepted as it is; `Some(Some(rule))` accepted when its bound
/// value passes `rule`. `params`: the statement's parameters are the ones a Bind supplies (a
/// top-level SELECT: not a PREPARE's, nor a function body's).
fn accepted_call(name: Arg, value: Arg, params: bool) -> Option<Option<ParamRule>> {
    match (name, value) {
        (Arg::Constant(n), _) if settable(n) => Some(None),
        (Arg::Constant(n), Arg::Constant(v)) if keeps_pinned_value(n, v) => Some(None),
        (Arg::Param(param), _) if params => Some(Some(ParamRule::SettingName { param })),
        (Arg::Constant(n), Arg::Param(param)) if params => {
            let setting = PINNED_WITH_VALUE.iter().find(|s| s.eq_ignore_ascii_case(n))?;
            Some(Some(ParamRule::PinnedValue { param, setting }))
        }
        _ => None,
    }
}

fn param_number(n: i64) -> Option<u16> {
    u16::try_from(n).ok().filter(|n| *n > 0)
}

/// The `set_config` calls in PostgreSQL's tree that are accepted (each accounts for one
/// occurrence of the name), and the rules of those that depend on bound values. A complete walk
/// (`pgtree::visit`): a call pg_query's `nodes()` skips (in VALUES, say) would otherwise not be
/// counted, and its accepted name refused.
fn harmless_set_config_calls_pg(node: &NodeEnum) -> (usize, Vec<ParamRule>) {
    let params = matches!(node, NodeEnum::SelectStmt(_));
    fn arg(a: Option<&pg_query::protobuf::Node>) -> Arg<'_> {
        match a.and_then(|a| a.node.as_ref()) {
            Some(NodeEnum::AConst(c)) => match &c.val {
                Some(pg_query::protobuf::a_const::Val::Sval(s)) => Arg::Constant(s.sval.as_str()),
                _ => Arg::Other,
            },
            Some(NodeEnum::ParamRef(p)) => param_number(i64::from(p.number)).map_or(Arg::Other, Arg::Param),
            _ => Arg::Other,
        }
    }
    let mut count = 0;
    let mut rules = Vec::new();
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
        // A plain call: three positional arguments, nothing else (`agg_*`, `over`, named
        // arguments and VARIADIC make it something else).
        let plain = f.args.len() == 3
            && f.agg_order.is_empty()
            && f.agg_filter.is_none()
            && f.over.is_none()
            && !f.agg_star
            && !f.agg_distinct
            && !f.func_variadic
            && !f.agg_within_group;
        if named
            && plain
            && let Some(rule) = accepted_call(arg(f.args.first()), arg(f.args.get(1)), params)
        {
            count += 1;
            rules.extend(rule);
        }
        Ok(())
    });
    // A tree that cannot be walked accounts for no accepted call (fail closed).
    if walked.is_err() {
        return (0, Vec::new());
    }
    rules.sort();
    (count, rules)
}

/// Checks one statement of sqlparser's tree (the tree that will be printed).
pub(crate) fn check_sql(stmt: &Statement) -> Result<(), Refusal> {
    check_statement_form(stmt)?;
    let params = matches!(stmt, Statement::Query(_));
    let mut finder = SetConfigFinder { harmless: 0, names: 0, params };
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
            Reset::ConfigurationParameter(name) if resets_pinned_startup_value(name) => Ok(()),
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
/// accepted calls (`accepted_call`, unquoted name) that account for them.
struct SetConfigFinder {
    harmless: usize,
    names: usize,
    /// The statement's parameters are the ones a Bind supplies (a query).
    params: bool,
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
        fn arg(a: Option<&FunctionArg>) -> Arg<'_> {
            match a {
                Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) => match &v.value {
                    Value::SingleQuotedString(s) => Arg::Constant(s.as_str()),
                    Value::Placeholder(p) => p
                        .strip_prefix('$')
                        .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|d| d.parse::<i64>().ok())
                        .and_then(param_number)
                        .map_or(Arg::Other, Arg::Param),
                    _ => Arg::Other,
                },
                _ => Arg::Other,
            }
        }
        let plain = list.args.len() == 3
            && list.clauses.is_empty()
            && list.duplicate_treatment.is_none()
            && f.filter.is_none()
            && f.over.is_none()
            && f.within_group.is_empty()
            && matches!(f.parameters, FunctionArguments::None);
        if named && plain && accepted_call(arg(list.args.first()), arg(list.args.get(1)), self.params).is_some() {
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

    fn pg_rules(sql: &str) -> Result<Vec<ParamRule>, Refusal> {
        check_pg(&crate::rewrite::classify::first_node(sql))
    }

    fn pg(sql: &str) -> Result<(), Refusal> {
        pg_rules(sql).map(|rules| assert_eq!(rules, [], "{sql}"))
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
            "RESET backslash_quote",
            "RESET escape_string_warning",
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
            // The startup values the proxy pins: what RESET ALL restores too.
            "RESET search_path",
            "reset Client_Encoding",
            "RESET standard_conforming_strings",
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
            "ALTER ROLE r RESET client_encoding",
        ] {
            assert!(matches!(pg(sql), Err(Refusal::Denied(_))), "pg tree: {sql}");
            if let Ok(stmts) = Parser::parse_sql(&PostgreSqlDialect {}, sql) {
                assert!(matches!(check_sql(&stmts[0]), Err(Refusal::Denied(_))), "sqlparser tree: {sql}");
            }
        }
    }

    /// `set_config` whose decision depends on a bound value: accepted only in a query (whose
    /// parameters a Bind supplies), with the rule the session checks on every Bind.
    #[test]
    fn set_config_with_parameters_comes_with_rules() {
        use ParamRule::{PinnedValue, SettingName};
        for (sql, rules) in [
            ("select set_config($1, $2, false)", vec![SettingName { param: 1 }]),
            ("SELECT pg_catalog.set_config($2, 'x', true)", vec![SettingName { param: 2 }]),
            (
                "select set_config('client_encoding', $1, false)",
                vec![PinnedValue { param: 1, setting: "client_encoding" }],
            ),
            (
                "SELECT set_config('Standard_Conforming_Strings', $3, false)",
                vec![PinnedValue { param: 3, setting: "standard_conforming_strings" }],
            ),
            (
                "SELECT set_config($1, 'a', false), set_config('jit', $2, false) FROM (SELECT set_config($3, 'b', true)) s",
                vec![SettingName { param: 1 }, SettingName { param: 3 }],
            ),
            ("SELECT set_config('client_encoding', 'UTF-8', false)", vec![]),
            ("SELECT set_config('standard_conforming_strings', 'on', true)", vec![]),
        ] {
            assert_eq!(pg_rules(sql), Ok(rules), "pg tree: {sql}");
            assert_eq!(sp(sql), Ok(()), "sqlparser tree: {sql}");
        }
        for sql in [
            // Parameters that are not the Bind's: a PREPARE's, a function body's.
            "PREPARE p AS SELECT set_config($1, 'x', false)",
            "CREATE FUNCTION f(text) RETURNS text RETURN set_config($1, 'x', false)",
            "INSERT INTO t VALUES (set_config($1, 'x', false))",
            "UPDATE t SET a = set_config($1, 'x', false)",
            // Anything but a bare parameter or constant.
            "SELECT set_config($1::text, 'x', false)",
            "SELECT set_config(lower($1), 'x', false)",
            "SELECT set_config('client_encoding', $1 || '', false)",
            "SELECT set_config('search_path', $1, false)",
            "SELECT set_config('role', $1, false)",
            "SELECT set_config('client_encoding', 'latin1', false)",
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            "SELECT set_config(VARIADIC ARRAY[$1, 'x', 'false'])",
            "SELECT set_config($1, $2)",
            "SELECT x.set_config($1, 'x', false)",
        ] {
            assert!(matches!(pg_rules(sql), Err(Refusal::Denied(_))), "pg tree: {sql}");
            if let Ok(stmts) = Parser::parse_sql(&PostgreSqlDialect {}, sql) {
                assert!(matches!(check_sql(&stmts[0]), Err(Refusal::Denied(_))), "sqlparser tree: {sql}");
            }
        }
    }

    #[test]
    fn rules_check_the_bound_value_and_the_declared_type() {
        let name = ParamRule::SettingName { param: 2 };
        assert_eq!(name.check(Some(b"jit")), Ok(()));
        assert_eq!(name.check(Some(b"TimeZone")), Ok(()));
        assert_eq!(name.check(Some(b"default_transaction_isolation")), Ok(()));
        for bad in [&b"search_path"[..], b"ROLE", b"client_encoding", b"jit ", b"jit\0", b"a.b", b"\xff", b""] {
            assert!(matches!(name.check(Some(bad)), Err(Refusal::Denied(_))), "{bad:?}");
        }
        assert!(name.check(None).is_err());
        let encoding = ParamRule::PinnedValue { param: 1, setting: "client_encoding" };
        for good in ["utf8", "UTF-8", "utf_8", "Unicode"] {
            assert_eq!(encoding.check(Some(good.as_bytes())), Ok(()), "{good}");
        }
        for bad in ["latin1", "sql_ascii", "", "utf8\0"] {
            assert!(encoding.check(Some(bad.as_bytes())).is_err(), "{bad}");
        }
        let scs = ParamRule::PinnedValue { param: 1, setting: "standard_conforming_strings" };
        assert_eq!(scs.check(Some(b"on")), Ok(()));
        assert!(scs.check(Some(b"off")).is_err());
        // Unspecified, text and varchar read the bound bytes as they are; nothing else is taken.
        for ok in [&[][..], &[0, 0], &[25, 25], &[23, 1043]] {
            assert_eq!(name.check_declared(ok), Ok(()), "{ok:?}");
        }
        for bad in [&[0, 18][..], &[0, 19], &[0, 1042], &[0, 17]] {
            assert!(name.check_declared(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            name.check(Some(b"role")).unwrap_err().to_string(),
            "refused: set_config's setting name (parameter $2) must be a setting an environment key may SET; the \
             value bound is not one"
        );
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
