//! Conversion gates a Parse's parameter types make redundant.
//!
//! A guarded Select's conversion gate (`num_nulls(CAST($n AS T), …) >= 0`, `guard.rs`) has
//! PostgreSQL convert the client's values once, before it reads any row, so that a conversion
//! error can never depend on the data. In a generic plan it is a Result node over the scan, and
//! it is most of what the guarded statement costs PostgreSQL over the client's own (pgbench -S's
//! rewrite, PL/pgSQL loop under callgrind: 44,200 instructions per execution, 36,900 without the
//! gate, 27,100 for the client's statement).
//!
//! It converts nothing when `$n` already has type T when the statement runs: declared as T in
//! the Parse (or `varchar` for `text`, a relabelling), or left undeclared with every use of `$n`
//! in the statement a `CAST($n AS T)`, which makes PostgreSQL give `$n` type T. So the rewrite of
//! a single statement leaves its gates out (`Rewritten::gate_needs` says for which types), and a
//! Parse declaring other types prepares the same statement with them
//! (`Rewriter::rewrite_keeping_gates`, cached apart). A simple Query cannot bind a `$n` at all.
//! The text is verified like every other, and the uses of each `$n` counted here must be the
//! ones PostgreSQL's own tree of it holds.
//!
//! A gate is redundant as well where the conversion can never fail, whatever the value (an
//! integer widened, a number printed as text: `converts_without_error`): the gate exists only so
//! that a conversion that can fail fails once, before any row is read.
//!
//! A simple Query's parameterised form (`shape.rs`: a template's text with one `$k` for each
//! value literal, declared with the literal's type) leaves its gates out the same way
//! (`ungated_parameterised`): its undeclared `$k` (string literals) each occur once, so
//! PostgreSQL types each from its only context and converts it at Bind.
//!
//! A conjunct is taken off only where it has exactly the gate's shape: the last conjunct of a
//! Select's WHERE (or the whole WHERE). A client's own conjunct of that shape would be taken off
//! with it, and that changes nothing either: `num_nulls` of values that convert to themselves is
//! a number, so the conjunct is true.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, CastKind, DataType, Expr, Select, Statement, Value, Visit, VisitMut, Visitor, VisitorMut,
};

use super::guard::{
    BOOL, FLOAT4, FLOAT8, INT2, INT4, INT8, NUMERIC, TEXT, UNKNOWN, UUID, VARCHAR, exact_type, gate_arguments, is_param,
};

/// What a Parse's declared type of one parameter must be for the gates to convert nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamNeed {
    /// `$number`, from 1.
    pub number: usize,
    /// The type every gate casts it to.
    pub type_oid: u32,
    /// Left undeclared (0), PostgreSQL gives it `type_oid` (every use casts it to that type).
    pub undeclared_ok: bool,
}

impl ParamNeed {
    pub fn met_by(&self, declared: &[u32]) -> bool {
        let d = self.number.checked_sub(1).and_then(|i| declared.get(i)).copied().unwrap_or(0);
        // Declared `unknown`, a parameter is typed as an undeclared one is (PostgreSQL's
        // `variable_coerce_param_hook` resolves both from their uses).
        ((d == 0 || d == UNKNOWN) && self.undeclared_ok) || converts_without_error(d, self.type_oid)
    }
}

/// Whether PostgreSQL's cast of any value of type `from` to type `to` succeeds: the same type;
/// `varchar` to `text`, a binary coercion (PostgreSQL relabels the value, no function runs;
/// JDBC declares `setString`'s parameters varchar); an integer widened, or made numeric or
/// float8, and float4 made float8 (exact or rounded, never out of range); a number, boolean or
/// uuid as text (its output function, which has no error). Narrowing, text to anything else,
/// numeric to float (overflow) and the date and time types (out of range) can fail.
fn converts_without_error(from: u32, to: u32) -> bool {
    from != 0
        && (from == to
            || match to {
                TEXT => matches!(from, VARCHAR | INT2 | INT4 | INT8 | NUMERIC | FLOAT4 | FLOAT8 | BOOL | UUID),
                INT4 => from == INT2,
                INT8 => matches!(from, INT2 | INT4),
                NUMERIC => matches!(from, INT2 | INT4 | INT8),
                FLOAT8 => matches!(from, INT2 | INT4 | INT8 | FLOAT4),
                _ => false,
            })
}

/// A statement without its conversion gates, and when it may run instead of the gated one.
#[derive(Debug)]
pub struct Ungated {
    pub statement: Statement,
    /// One per parameter a gate converts.
    pub needs: Vec<ParamNeed>,
    /// How often each `$n` occurs in `statement`; PostgreSQL's tree of the printed text must
    /// hold exactly these (a use sqlparser's tree hides would make `undeclared_ok` a guess).
    pub uses: BTreeMap<usize, usize>,
}

impl Ungated {
    /// The types a parameterised form without its gates (`ungated_parameterised`) declares:
    /// the form's own, except that a parameter only a gate held, left undeclared, is declared
    /// `text` (PostgreSQL cannot type a parameter nothing uses; its value is a string literal's).
    pub fn parameter_types(&self, declared: &[u32]) -> Vec<u32> {
        let used = |k: usize| self.uses.contains_key(&(k + 1));
        declared.iter().enumerate().map(|(k, &t)| if t == 0 && !used(k) { TEXT } else { t }).collect()
    }
}

/// `stmt` without its conversion gates, when every gate converts only `$n` or literals with
/// a cast to a type without modifiers; `None` when it has none, when they convert only literals
/// (PostgreSQL folds those gates away at planning), or when no declared types could meet them.
pub fn ungated(stmt: &Statement) -> Option<Ungated> {
    if !matches!(stmt, Statement::Query(_) | Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_)) {
        return None;
    }
    let mut found = false;
    let _ = stmt.visit(&mut GateFinder(&mut found));
    if !found {
        return None;
    }
    let mut statement = stmt.clone();
    let mut remover = GateRemover { casts: Vec::new(), usable: true };
    let _ = VisitMut::visit(&mut statement, &mut remover);
    if !remover.usable || remover.casts.is_empty() {
        return None;
    }
    let mut counter = ParamUses::default();
    let _ = statement.visit(&mut counter);
    let mut needs: Vec<ParamNeed> = Vec::new();
    for (number, type_oid) in remover.casts {
        match needs.iter().find(|n| n.number == number) {
            Some(n) if n.type_oid == type_oid => continue,
            // Converted to two types: one of them converts whatever is declared.
            Some(_) => return None,
            None => {}
        }
        let casts = counter.casts.get(&number).map(Vec::as_slice).unwrap_or_default();
        let undeclared_ok =
            counter.uses.get(&number).copied() == Some(casts.len()) && casts.iter().all(|t| *t == Some(type_oid));
        needs.push(ParamNeed { number, type_oid, undeclared_ok });
    }
    Some(Ungated { statement, needs, uses: counter.uses })
}

/// A parameterised form's statement (`shape.rs`) without its conversion gates, when the types
/// the form declares (`declared`: a literal's own type, 0 for a string) make them redundant.
/// Every `$k` of such a form occurs once (`shape::param_form` checks it, and so does this for
/// those left after the gates), so an undeclared one is typed by its only context while
/// PostgreSQL parses the statement (a cast of it declares its type) and its value is converted
/// at Bind, before anything runs: only declared types need meeting. Parameters only the gates
/// held occur no more (`Ungated::uses` does not list them).
pub fn ungated_parameterised(stmt: &Statement, declared: &[u32]) -> Option<Ungated> {
    let u = ungated(stmt)?;
    let once = u.uses.iter().all(|(&k, &n)| k != 0 && n == 1);
    (once && u.needs.iter().all(|n| ParamNeed { undeclared_ok: true, ..*n }.met_by(declared))).then_some(u)
}

/// `stmt` with every conversion gate taken off, whatever it converts (for checks: the tests and
/// the fuzz target compare a parameterised form without gates with the text it was made from).
pub fn without_any_gates(stmt: &Statement) -> Statement {
    let mut statement = stmt.clone();
    let _ = VisitMut::visit(&mut statement, &mut GateRemover { casts: Vec::new(), usable: true });
    statement
}

fn unnested(mut e: &Expr) -> &Expr {
    while let Expr::Nested(inner) = e {
        e = inner;
    }
    e
}

/// `$n` when `e` is one.
fn param_number(e: &Expr) -> Option<usize> {
    match unnested(e) {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) if is_param(p) => p.get(1..)?.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

/// `CAST(<inner> AS <type>)` (or `::`), as the gate and the raw conditions write it.
fn plain_cast(e: &Expr) -> Option<(&Expr, &DataType)> {
    match unnested(e) {
        Expr::Cast { kind: CastKind::Cast | CastKind::DoubleColon, expr, data_type, format: None } => {
            Some((expr.as_ref(), data_type))
        }
        _ => None,
    }
}

/// A literal, or a signed number (what `guard.rs` takes as a constant besides `$n`).
fn literal(e: &Expr) -> bool {
    let value = |e: &Expr| matches!(unnested(e), Expr::Value(v) if !matches!(v.value, Value::Placeholder(_)));
    match unnested(e) {
        Expr::UnaryOp { expr, .. } => matches!(unnested(expr), Expr::Value(v) if matches!(v.value, Value::Number(..))),
        other => value(other),
    }
}

struct GateFinder<'a>(&'a mut bool);

impl Visitor for GateFinder<'_> {
    type Break = ();

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if select.selection.as_ref().is_some_and(|w| last_conjunct_gate(w).is_some()) {
            *self.0 = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

/// The gate's arguments when `where_` is a gate or `(…) AND <gate>`.
fn last_conjunct_gate(where_: &Expr) -> Option<Vec<&Expr>> {
    match where_ {
        Expr::BinaryOp { op: BinaryOperator::And, right, .. } => gate_arguments(right),
        other => gate_arguments(other),
    }
}

struct GateRemover {
    /// (`$n`, type) per parameter cast a removed gate held.
    casts: Vec<(usize, u32)>,
    usable: bool,
}

impl GateRemover {
    fn note(&mut self, args: &[&Expr]) {
        for arg in args {
            match plain_cast(arg) {
                Some((inner, ty)) => match (param_number(inner), exact_type(ty)) {
                    (Some(n), Some(oid)) => self.casts.push((n, oid)),
                    // A cast of a literal: PostgreSQL converts it while planning.
                    (None, _) if literal(inner) => {}
                    _ => self.usable = false,
                },
                None => self.usable = false,
            }
        }
    }
}

impl VisitorMut for GateRemover {
    type Break = ();

    fn post_visit_select(&mut self, select: &mut Select) -> ControlFlow<()> {
        let Some(where_) = select.selection.take() else { return ControlFlow::Continue(()) };
        select.selection = match where_ {
            Expr::BinaryOp { left, op: BinaryOperator::And, right } => match gate_arguments(&right) {
                Some(args) => {
                    self.note(&args);
                    Some(match *left {
                        Expr::Nested(inner) => *inner,
                        other => other,
                    })
                }
                None => Some(Expr::BinaryOp { left, op: BinaryOperator::And, right }),
            },
            other => match gate_arguments(&other) {
                Some(args) => {
                    self.note(&args);
                    None
                }
                None => Some(other),
            },
        };
        ControlFlow::Continue(())
    }
}

/// Every use of each `$n`, and the type of each use that is a plain cast of it (`None`: a
/// cast to a type with modifiers, or one the fast path does not know).
#[derive(Default)]
struct ParamUses {
    uses: BTreeMap<usize, usize>,
    casts: BTreeMap<usize, Vec<Option<u32>>>,
}

impl Visitor for ParamUses {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Value(v) = e
            && let Value::Placeholder(_) = &v.value
        {
            // A placeholder that is not `$n` has no number: counted apart, it can never match.
            *self.uses.entry(param_number(e).unwrap_or(0)).or_default() += 1;
        }
        if let Expr::Cast { kind: CastKind::Cast | CastKind::DoubleColon, expr, data_type, format: None } = e
            && let Some(n) = param_number(expr)
        {
            self.casts.entry(n).or_default().push(exact_type(data_type));
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    fn parse(sql: &str) -> Statement {
        Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap().remove(0)
    }

    fn without_gates(sql: &str) -> Option<(String, Vec<ParamNeed>)> {
        ungated(&parse(sql)).map(|u| (u.statement.to_string(), u.needs))
    }

    #[test]
    fn a_gate_is_taken_off_with_what_its_parameters_must_be() {
        let (sql, needs) = without_gates(
            "SELECT a FROM t WHERE (t.raw_id = CAST($1 AS pg_catalog.int4)) AND num_nulls(CAST($1 AS pg_catalog.int4)) >= 0",
        )
        .unwrap();
        assert_eq!(sql, "SELECT a FROM t WHERE t.raw_id = CAST($1 AS pg_catalog.int4)");
        assert_eq!(needs, vec![ParamNeed { number: 1, type_oid: INT4, undeclared_ok: true }]);
        assert!(needs[0].met_by(&[]));
        assert!(needs[0].met_by(&[0]));
        // Declared `unknown`: PostgreSQL types it from its uses, as an undeclared one.
        assert!(needs[0].met_by(&[UNKNOWN]));
        assert!(needs[0].met_by(&[INT4]));
        assert!(!needs[0].met_by(&[TEXT]));
        assert!(!needs[0].met_by(&[VARCHAR]));
        assert!(!needs[0].met_by(&[20]));
    }

    #[test]
    fn a_conversion_that_cannot_fail_needs_no_gate() {
        let need = |type_oid| ParamNeed { number: 1, type_oid, undeclared_ok: false };
        const DATE: u32 = 1082;
        const TIMESTAMPTZ: u32 = 1184;
        const BPCHAR: u32 = 1042;
        for (to, met, unmet) in [
            (
                TEXT,
                &[TEXT, VARCHAR, INT2, INT4, INT8, NUMERIC, FLOAT4, FLOAT8, BOOL, UUID][..],
                &[0, UNKNOWN, BPCHAR, DATE, TIMESTAMPTZ][..],
            ),
            (INT4, &[INT4, INT2], &[INT8, NUMERIC, FLOAT8, TEXT, VARCHAR, 0]),
            (INT8, &[INT8, INT4, INT2], &[NUMERIC, FLOAT4, FLOAT8, TEXT]),
            (NUMERIC, &[NUMERIC, INT2, INT4, INT8], &[FLOAT4, FLOAT8, TEXT]),
            (FLOAT8, &[FLOAT8, FLOAT4, INT2, INT4, INT8], &[NUMERIC, TEXT]),
            (FLOAT4, &[FLOAT4], &[FLOAT8, INT4, NUMERIC]),
            (TIMESTAMPTZ, &[TIMESTAMPTZ], &[DATE, 1114, TEXT, UNKNOWN]),
            (UUID, &[UUID], &[TEXT, VARCHAR]),
        ] {
            for d in met {
                assert!(need(to).met_by(&[*d]), "{d} to {to}");
            }
            for d in unmet {
                assert!(!need(to).met_by(&[*d]), "{d} to {to}");
            }
        }
    }

    #[test]
    fn a_parameterised_forms_gates_need_only_its_declared_types() {
        // A string literal cast: one `$k` in the condition, one in the gate, both undeclared.
        let stmt = parse(
            "SELECT a FROM t WHERE (t.c > CAST($1 AS pg_catalog.timestamptz)) AND num_nulls(CAST($2 AS pg_catalog.timestamptz)) >= 0",
        );
        let u = ungated_parameterised(&stmt, &[0, 0]).unwrap();
        assert_eq!(u.statement.to_string(), "SELECT a FROM t WHERE t.c > CAST($1 AS pg_catalog.timestamptz)");
        assert_eq!(u.uses, BTreeMap::from([(1, 1)]));
        assert_eq!(u.parameter_types(&[0, 0]), [0, TEXT]);
        // A Parse's rule would keep that gate: its `$2` occurs nowhere else.
        assert!(!u.needs.iter().all(|n| n.met_by(&[0, 0])));
        // Numeric literals: declared with their own type.
        let stmt = parse("SELECT a FROM t WHERE (t.n = $1::INT4) AND num_nulls($2::INT4) >= 0");
        assert!(ungated_parameterised(&stmt, &[INT4, INT4]).is_some());
        assert!(ungated_parameterised(&stmt, &[INT2, INT2]).is_some());
        // An int8 literal cast to int4 may overflow: converted at run time, the gate stays.
        assert!(ungated_parameterised(&stmt, &[INT8, INT8]).is_none());
        assert!(ungated_parameterised(&stmt, &[NUMERIC, NUMERIC]).is_none());
        // A `$k` used twice is no parameterised form's: its type could come from the other use.
        let stmt = parse(
            "SELECT $1, a FROM t WHERE (t.c = CAST($1 AS pg_catalog.text)) AND num_nulls(CAST($2 AS pg_catalog.text)) >= 0",
        );
        assert!(ungated_parameterised(&stmt, &[0, 0]).is_none());
        // Nothing but literals: no form to make.
        let stmt = parse("SELECT a FROM t WHERE (t.n = 1::INT4) AND num_nulls(1::INT4) >= 0");
        assert!(ungated_parameterised(&stmt, &[]).is_none());
    }

    #[test]
    fn a_gate_alone_leaves_no_where() {
        let (sql, _) = without_gates("SELECT 1 FROM t WHERE num_nulls(CAST($2 AS pg_catalog.text)) >= 0").unwrap();
        assert_eq!(sql, "SELECT 1 FROM t");
    }

    #[test]
    fn another_use_of_the_parameter_needs_it_declared() {
        // `SELECT $1`: PostgreSQL could type $1 from it first, and the gate's cast would convert.
        let (_, needs) = without_gates(
            "SELECT $1, a FROM t WHERE (t.raw_id = CAST($1 AS pg_catalog.text)) AND num_nulls(CAST($1 AS pg_catalog.text)) >= 0",
        )
        .unwrap();
        assert_eq!(needs, vec![ParamNeed { number: 1, type_oid: TEXT, undeclared_ok: false }]);
        assert!(!needs[0].met_by(&[]));
        assert!(needs[0].met_by(&[TEXT]));
        // varchar relabels as text.
        assert!(needs[0].met_by(&[VARCHAR]));
        assert!(!needs[0].met_by(&[UNKNOWN]));
        // Cast to another type elsewhere.
        let (_, needs) = without_gates(
            "SELECT $1::int8, a FROM t WHERE (t.raw_id = CAST($1 AS pg_catalog.text)) AND num_nulls(CAST($1 AS pg_catalog.text)) >= 0",
        )
        .unwrap();
        assert!(!needs[0].undeclared_ok);
        // A cast with a length converts (it may truncate).
        let (_, needs) = without_gates(
            "SELECT a FROM t WHERE (t.raw_id = CAST($1 AS pg_catalog.text)) AND $1::varchar(3) <> '' AND num_nulls(CAST($1 AS pg_catalog.text)) >= 0",
        )
        .unwrap();
        assert!(!needs[0].undeclared_ok);
    }

    #[test]
    fn gates_in_subqueries_are_taken_off_too() {
        let u = ungated(&parse(
            "SELECT a FROM t WHERE (t.raw_id = CAST($1 AS pg_catalog.int4) AND EXISTS (SELECT 1 FROM u \
             WHERE (u.raw_k = CAST($2 AS pg_catalog.text)) AND num_nulls(CAST($2 AS pg_catalog.text)) >= 0)) \
             AND num_nulls(CAST($1 AS pg_catalog.int4)) >= 0",
        ))
        .unwrap();
        let sql = u.statement.to_string();
        assert!(!sql.contains("num_nulls"), "{sql}");
        assert_eq!(u.needs.len(), 2);
        assert_eq!(u.uses, BTreeMap::from([(1, 1), (2, 1)]));
    }

    #[test]
    fn no_ungated_form_where_nothing_could_meet_the_gates() {
        // Literals only: PostgreSQL folds the gate while planning.
        assert!(
            without_gates(
                "SELECT a FROM t WHERE t.c > '2026-01-01'::timestamptz AND num_nulls('2026-01-01'::timestamptz) >= 0"
            )
            .is_none()
        );
        // One parameter converted to two types.
        assert!(
            without_gates(
                "SELECT a FROM t WHERE (t.x = CAST($1 AS pg_catalog.int4) AND EXISTS (SELECT 1 FROM u \
                 WHERE (u.k = CAST($1 AS pg_catalog.text)) AND num_nulls(CAST($1 AS pg_catalog.text)) >= 0)) \
                 AND num_nulls(CAST($1 AS pg_catalog.int4)) >= 0"
            )
            .is_none()
        );
        // A gate argument of another shape.
        assert!(without_gates("SELECT a FROM t WHERE num_nulls(CAST(now() AS pg_catalog.text)) >= 0").is_none());
        assert!(without_gates("SELECT a FROM t WHERE num_nulls(CAST($1 AS varchar(4))) >= 0").is_none());
        // Not a gate: another comparison, a filter, a schema.
        assert!(without_gates("SELECT a FROM t WHERE num_nulls(CAST($1 AS pg_catalog.int4)) > 0").is_none());
        assert!(without_gates("SELECT a FROM t WHERE x.num_nulls(CAST($1 AS pg_catalog.int4)) >= 0").is_none());
        // A gate that is not the last conjunct is left alone.
        assert!(without_gates("SELECT a FROM t WHERE num_nulls(CAST($1 AS pg_catalog.int4)) >= 0 AND a = 1").is_none());
        // Not a query or a write.
        assert!(
            without_gates("PREPARE p AS SELECT a FROM t WHERE num_nulls(CAST($1 AS pg_catalog.int4)) >= 0").is_none()
        );
    }
}
