//! Guarded relations: secure relations PostgreSQL may flatten, so a tenant's primary-key lookups,
//! range scans and key joins keep their index plans, without any client expression ever seeing
//! (or being evaluated on) a row outside the caller's scope.
//!
//! The fenced relation (`Ctx::relation_sql`) ends in `OFFSET 0`: nothing of the client's is pushed
//! into it, so nothing of the client's can use an index either. A guarded relation is the same
//! subquery without the fence, and
//!
//! - every output column is guarded: `CASE WHEN <row predicate> THEN <masked value> END`, so an
//!   expression that PostgreSQL evaluates on a row before the predicate has filtered it only ever
//!   sees NULL. (Not where nothing could: no wrapped conjunct reads the relation and PostgreSQL
//!   evaluates the whole predicate at its scan; see `Ctx::guarded_relation`.);
//! - every column the caller sees unmasked may also be exposed raw, as `__struere_raw_<col>`, and
//!   the predicate itself as `__struere_in_scope` (in the forwarded text: only those the rewritten
//!   conditions read). Client text may not name either (reserved prefix).
//!
//! While a Select is walked its managed tables are placeholders; once its conditions are
//! analysed (`Tracker::decide`) each becomes the guarded or the fenced relation.
//!
//! After a Select's FROM items are secured, its WHERE and JOIN … ON conjuncts are sorted:
//!
//! - **raw**: a comparison (`= <> < <= > >=`, `IN (…)`, `BETWEEN`, `IS [NOT] NULL`) of a raw-exposed
//!   column with a row-independent value (a literal, a `$n` placeholder — cast to the column's type —
//!   or a cast of one), or of two raw-exposed columns of the same type, whose operator the catalog
//!   says is leakproof. It reads the raw columns: PostgreSQL may evaluate it on any row, use it as
//!   an index condition, and it reveals nothing (leakproof, and the operands are ours or constant);
//! - **wrapped**: any other conjunct PostgreSQL could evaluate at a guarded relation's scan (it
//!   references only guarded relations of this Select, possibly outer values, no subquery) becomes
//!   `CASE WHEN x."__struere_in_scope" THEN (conjunct) END`: it never runs for an out-of-scope row,
//!   whatever order PostgreSQL evaluates quals in (so no side effect — an error, a NOTICE, a sequence
//!   step — can count or probe other tenants' rows);
//! - **left as is**: a join clause with an unguarded relation, or a row-independent non-volatile
//!   conjunct: PostgreSQL evaluates these only on rows that passed the guarded relation's scan.
//!
//! Anything the analysis does not understand makes the reference fall back to the fenced relation
//! (`OFFSET 0`, no raw columns): whole-row references (`x`, `x.*` in an expression), NATURAL/USING
//! joins, LATERAL subqueries, HAVING on a guarded relation, a subquery or an outer join that would
//! change a wrapped conjunct's meaning, a Select PostgreSQL could flatten into an enclosing query
//! (only the statement's own query, scalar subqueries and EXISTS subqueries are guarded), and any
//! reference without at least one raw condition (then the guard buys no plan, only cost).
//! Security never depends on the fast path; only plans do.
//!
//! Invariant: in a guarded (flattenable) relation no client expression is evaluated on an out-of-scope row: only
//! leakproof comparisons of raw columns with constants run unguarded; everything else is wrapped in the row predicate
//! or the relation falls back to the fenced form.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::ControlFlow;

use sqlparser::ast::helpers::attached_token::AttachedToken;
use sqlparser::ast::{
    BinaryOperator, CaseWhen, CastKind, DataType, Expr, Function, Ident, InTarget, JoinConstraint, JoinOperator,
    ObjectName, ObjectNamePart, Query, Select, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, TableAlias,
    TableFactor, TableWithJoins, TimezoneInfo, UnaryOperator, Value, Visit, Visitor, WildcardAdditionalOptions,
};

use super::secure::{Ctx, ident};
use super::walk::{RESERVED_PREFIX, fold, parse_query};
use crate::catalog::{CatalogSnapshot, Column};
use crate::policy::{Action, TableSpec};

/// Raw columns are exposed as `__struere_raw_<column>`.
pub const RAW_PREFIX: &str = "__struere_raw_";
/// The row predicate, exposed as a boolean column.
pub const IN_SCOPE: &str = "__struere_in_scope";
/// PostgreSQL truncates longer identifiers.
const MAX_IDENT_BYTES: usize = 63;

/// The guarded form of a secure relation.
#[derive(Debug, Clone)]
pub struct GuardedRelation {
    pub sql: String,
    /// Columns exposed raw (the caller sees them unmasked).
    pub raw: BTreeSet<String>,
    /// Every column, in catalog order (the guarded outputs, named like the table's columns).
    pub columns: Vec<Column>,
}

/// The name a raw column is exposed under.
pub fn raw_name(column: &str) -> String {
    format!("{RAW_PREFIX}{column}")
}

impl Ctx<'_> {
    /// Every column of `table`, and those the caller sees unmasked under `action` (which the
    /// guarded form exposes raw).
    pub fn guard_columns(&self, table: &TableSpec, action: Action) -> Result<(Vec<Column>, BTreeSet<String>), String> {
        let access = self.access(table, action)?;
        let alias = "t";
        let mut raw = BTreeSet::new();
        let columns = self.columns(table)?;
        for col in columns {
            let plain = format!("{}.{}", ident(alias), ident(&col.name));
            if self.column_value(table, alias, col, &access)? == plain && raw_name(&col.name).len() <= MAX_IDENT_BYTES {
                raw.insert(col.name.clone());
            }
        }
        Ok((columns.to_vec(), raw))
    }

    /// The guarded secure relation for reading `table` under `action`'s rules: unfenced, every
    /// column guarded by the row predicate, unmasked columns also exposed raw.
    pub fn guarded_relation_sql(&self, table: &TableSpec, action: Action) -> Result<GuardedRelation, String> {
        self.guarded_relation(table, action, None, None)
    }

    /// As `guarded_relation_sql`; with `used`, only the raw columns (and the in-scope flag) the
    /// rewritten conditions read are exposed, which keeps the forwarded text short.
    /// `also`: a write's action, whose scope rules the rows must satisfy too (see
    /// `relation_sql_also`).
    fn guarded_relation(
        &self,
        table: &TableSpec,
        action: Action,
        also: Option<Action>,
        used: Option<&Used>,
    ) -> Result<GuardedRelation, String> {
        let access = self.access(table, action)?;
        let alias = self.alias();
        let mut pred = self.row_predicate(table, &alias, &access)?;
        if let Some(also) = also {
            let extra = self.access(table, also)?;
            // (Often the same rules as select's: then once is enough.)
            if let Some(p) = self.scope_predicate(table, &super::secure::RowRef::Alias(&alias), &extra)?
                && !pred.contains(&p)
            {
                pred = if pred.is_empty() { p } else { format!("{pred} AND {p}") };
            }
        }
        let pred = if pred.is_empty() { "true".to_owned() } else { pred };
        let columns = self.columns(table)?;
        if columns.is_empty() {
            return Err(format!("{} has no columns", table.name));
        }
        // The column guards keep a value from any expression of the client's that PostgreSQL
        // evaluates on a row before the predicate excluded it: a wrapped conjunct (which reads
        // `__struere_in_scope` too). Where the rewritten conditions wrap none on this relation
        // (all raw), and PostgreSQL evaluates the whole predicate at the row's scan (no scope
        // rule with a subquery), what the client's expressions read of the relation is computed
        // at or above that scan, so only on rows the predicate let through: the guards would
        // only repeat the predicate for every column of every row. (Not for a write's target:
        // its rows are re-checked, and its expressions read, elsewhere.)
        let guard_columns =
            !(used.is_some_and(|u| !u.in_scope) && also.is_none() && access.predicate_reads_the_row_alone());
        let mut guarded = Vec::new();
        let mut raw_items = Vec::new();
        let mut raw = BTreeSet::new();
        for col in columns {
            let value = self.column_value(table, &alias, col, &access)?;
            guarded.push(if guard_columns {
                format!("CASE WHEN ({pred}) THEN {value} END AS {}", ident(&col.name))
            } else {
                format!("{value} AS {}", ident(&col.name))
            });
            let plain = format!("{}.{}", ident(&alias), ident(&col.name));
            let exposed = raw_name(&col.name);
            let wanted = used.is_none_or(|u| u.raw.contains(&col.name));
            if value == plain && exposed.len() <= MAX_IDENT_BYTES && wanted {
                raw_items.push(format!("{plain} AS {}", ident(&exposed)));
                raw.insert(col.name.clone());
            }
        }
        let mut items = guarded;
        items.extend(raw_items);
        if used.is_none_or(|u| u.in_scope) {
            items.push(format!("({pred}) AS {}", ident(IN_SCOPE)));
        }
        let sql = format!(
            "SELECT {} FROM {}.{} AS {} WHERE {pred}",
            items.join(", "),
            ident(&table.schema),
            ident(&table.name),
            ident(&alias)
        );
        Ok(GuardedRelation { sql, raw, columns: columns.to_vec() })
    }
}

/// What the rewritten conditions read of one guarded relation.
#[derive(Debug, Default)]
struct Used {
    raw: BTreeSet<String>,
    in_scope: bool,
}

/// One managed-table reference secured in the guarded form, awaiting its Select's decision.
struct Candidate<'a> {
    /// The client's alias (or the table name), as it is printed.
    alias: Ident,
    /// The alias as PostgreSQL folds it.
    name: String,
    spec: &'a TableSpec,
    columns: Vec<Column>,
    raw: BTreeSet<String>,
    /// The guarded subquery in the tree (its box's address).
    subquery: *const Query,
    /// The target of a write: its rows must also be in this action's scope.
    also: Option<Action>,
}

struct QueryFrame<'a> {
    /// The query's body, when the query is in a position PostgreSQL never flattens into an
    /// enclosing query and its body is a plain Select.
    root_select: Option<*const Select>,
    /// The walked query itself (not a subquery of it): nothing encloses it.
    top_level: bool,
    /// Candidates of that Select, handed over when it has been walked.
    pending: Vec<Candidate<'a>>,
}

struct SelectFrame<'a> {
    root: bool,
    candidates: Vec<Candidate<'a>>,
}

/// Walk-time bookkeeping: which Selects may hold guarded relations, and the guarded relations
/// each holds. Driven by the tree walk's hooks (walk.rs).
#[derive(Default)]
pub struct Tracker<'a> {
    /// Scalar and EXISTS subqueries: PostgreSQL never flattens their FROM into the enclosing query
    /// (EXISTS becomes a semi-join whose inner side keeps its own quals).
    sublinks: HashSet<*const Query>,
    /// `= ANY (SELECT …)` / `ALL`: pulled up like IN, whose select list becomes a join clause.
    not_root: HashSet<*const Query>,
    queries: Vec<QueryFrame<'a>>,
    selects: Vec<SelectFrame<'a>>,
    /// Every secure relation's subquery (generated SQL, not the client's).
    ours: HashSet<*const Query>,
}

impl<'a> Tracker<'a> {
    /// Before a subquery expression's query is walked.
    pub fn note_expr(&mut self, e: &Expr) {
        match e {
            Expr::AnyOp { right, .. } | Expr::AllOp { right, .. } => {
                if let Expr::Subquery(q) = right.as_ref() {
                    self.not_root.insert(&**q as *const Query);
                }
            }
            Expr::Subquery(q) => {
                let ptr = &**q as *const Query;
                if !self.not_root.contains(&ptr) {
                    self.sublinks.insert(ptr);
                }
            }
            Expr::Exists { subquery, .. } => {
                self.sublinks.insert(&**subquery as *const Query);
            }
            _ => {}
        }
    }

    /// `in_statement`: the walk entered a statement node (INSERT, DECLARE, …), so a query met
    /// with no enclosing query is that statement's part, not the walked query itself.
    pub fn enter_query(&mut self, q: &Query, in_statement: bool) {
        let ptr = q as *const Query;
        let top_level = self.queries.is_empty() && !in_statement;
        let root = top_level || self.sublinks.contains(&ptr);
        let root_select = match (root, q.body.as_ref()) {
            (true, SetExpr::Select(s)) => Some(&**s as *const Select),
            _ => None,
        };
        self.queries.push(QueryFrame { root_select, top_level, pending: Vec::new() });
    }

    pub fn enter_select(&mut self, s: &Select) {
        // Without a condition shaped like a raw one, no reference is worth a candidate.
        let mut conditions = false;
        for_each_clause(s, &mut |_, clause| for_each_conjunct(clause, &mut |c| conditions |= raw_shaped(c)));
        let root = conditions && self.queries.last().and_then(|f| f.root_select) == Some(s as *const Select);
        self.selects.push(SelectFrame { root, candidates: Vec::new() });
    }

    pub fn leave_select(&mut self) {
        if let Some(frame) = self.selects.pop()
            && frame.root
            && !frame.candidates.is_empty()
            && let Some(q) = self.queries.last_mut()
        {
            q.pending = frame.candidates;
        }
    }

    /// After a query has been walked: decide its Select's guarded relations.
    pub fn leave_query(&mut self, q: &mut Query, ctx: &Ctx<'a>) -> Result<(), String> {
        let Some(frame) = self.queries.pop() else { return Ok(()) };
        if frame.pending.is_empty() {
            return Ok(());
        }
        self.decide(ctx, q, frame.pending, frame.top_level)
    }

    /// The secure relation standing in for one reference to a managed table: fenced, unless it
    /// is a FROM item of a root Select. Then it is a candidate: a placeholder until the Select's
    /// conditions have been analysed, replaced by the guarded or the fenced form (`decide`). A
    /// placeholder left behind by a bug fails at PostgreSQL (an undefined function), never reads.
    pub fn secure_relation(
        &mut self,
        ctx: &Ctx<'a>,
        spec: &'a TableSpec,
        alias: &TableAlias,
    ) -> Result<Box<Query>, String> {
        let root = self.selects.last().is_some_and(|s| s.root);
        if !root || !alias.columns.is_empty() {
            return self.fenced(ctx, spec);
        }
        let (columns, raw) = ctx.guard_columns(spec, Action::Select)?;
        let q = parse_ours(PLACEHOLDER, spec)?;
        let ptr = &*q as *const Query;
        self.ours.insert(ptr);
        if let Some(frame) = self.selects.last_mut() {
            frame.candidates.push(Candidate {
                alias: alias.name.clone(),
                name: fold(&alias.name),
                spec,
                columns,
                raw,
                subquery: ptr,
                also: None,
            });
        }
        Ok(q)
    }

    fn fenced(&mut self, ctx: &Ctx<'a>, spec: &TableSpec) -> Result<Box<Query>, String> {
        self.fenced_also(ctx, spec, None)
    }

    /// The fenced relation; for a write's target (`also`), only rows the write may change.
    pub fn fenced_also(&mut self, ctx: &Ctx<'a>, spec: &TableSpec, also: Option<Action>) -> Result<Box<Query>, String> {
        let sql = ctx.relation_sql_also(spec, Action::Select, also)?;
        let q = parse_ours(&sql, spec)?;
        self.ours.insert(&*q as *const Query);
        Ok(q)
    }

    /// A write's row-finding query (writes.rs: the target's secure relation, fenced, first in
    /// its FROM, joined with the client's FROM/USING items under the client's WHERE): the target
    /// becomes guarded when that WHERE allows, so `UPDATE … WHERE id = $1` is an index lookup.
    /// Nothing of the client's is evaluated outside this query but SET values and RETURNING,
    /// which run only on rows that passed every condition.
    pub fn guard_write(
        &mut self,
        ctx: &Ctx<'a>,
        q: &mut Query,
        spec: &'a TableSpec,
        also: Action,
    ) -> Result<(), String> {
        let SetExpr::Select(select) = q.body.as_ref() else { return Ok(()) };
        let mut conditions = false;
        for_each_clause(select, &mut |_, clause| for_each_conjunct(clause, &mut |c| conditions |= raw_shaped(c)));
        let Some(TableWithJoins { relation: TableFactor::Derived { subquery, alias: Some(alias), .. }, .. }) =
            select.from.first()
        else {
            return Ok(());
        };
        if !conditions || !alias.columns.is_empty() {
            return Ok(());
        }
        let (columns, raw) = ctx.guard_columns(spec, Action::Select)?;
        let cand = Candidate {
            alias: alias.name.clone(),
            name: fold(&alias.name),
            spec,
            columns,
            raw,
            subquery: &**subquery as *const Query,
            also: Some(also),
        };
        self.ours.insert(cand.subquery);
        self.decide(ctx, q, vec![cand], true)
    }

    fn decide(
        &mut self,
        ctx: &Ctx<'a>,
        q: &mut Query,
        mut cands: Vec<Candidate<'a>>,
        top_level: bool,
    ) -> Result<(), String> {
        let (live, decisions) = match q.body.as_ref() {
            SetExpr::Select(select) => {
                let mut a = Analysis::new(&cands, select, &self.ours, ctx.catalog, top_level);
                a.static_fallbacks(q, select);
                let decisions = a.converge(select);
                (a.live, decisions)
            }
            _ => (vec![false; cands.len()], Vec::new()),
        };
        let SetExpr::Select(select) = q.body.as_mut() else {
            return Err("internal error: a guarded relation outside a Select".to_owned());
        };
        let mut used: Vec<Used> = cands.iter().map(|_| Used::default()).collect();
        for d in &decisions {
            match d {
                Decision::Raw(e) => {
                    let mut v = RawRefs(Vec::new());
                    let _ = e.visit(&mut v);
                    for (alias, col) in v.0 {
                        if let Some(u) = cands.iter().position(|c| c.name == alias).and_then(|i| used.get_mut(i)) {
                            u.raw.insert(col);
                        }
                    }
                }
                Decision::Wrap(who) => {
                    for i in who {
                        if let Some(u) = used.get_mut(*i) {
                            u.in_scope = true;
                        }
                    }
                }
                Decision::Leave | Decision::Fallback(_) => {}
            }
        }
        for ((c, live), used) in cands.iter_mut().zip(&live).zip(&used) {
            let q = if *live {
                parse_ours(&ctx.guarded_relation(c.spec, Action::Select, c.also, Some(used))?.sql, c.spec)?
            } else {
                self.fenced_also(ctx, c.spec, c.also)?
            };
            let ptr = &*q as *const Query;
            if !replace_subquery(&mut select.from, c.subquery, &mut Some(q)) {
                return Err("internal error: a secure relation went missing".to_owned());
            }
            self.ours.remove(&c.subquery);
            self.ours.insert(ptr);
            c.subquery = ptr;
        }
        if !live.iter().any(|l| *l) {
            return Ok(());
        }
        let mut at = 0;
        let mut failed = None;
        for_each_clause_mut(select, &mut |_, clause| {
            for_each_conjunct_mut(clause, &mut |conj| {
                match decisions.get(at) {
                    Some(Decision::Raw(new)) => *conj = (**new).clone(),
                    Some(Decision::Wrap(who)) => {
                        let aliases: Vec<Ident> =
                            who.iter().filter_map(|i| cands.get(*i)).map(|c| c.alias.clone()).collect();
                        let inner = std::mem::replace(conj, Expr::Value(Value::Null.into()));
                        *conj = wrap(inner, &aliases);
                    }
                    Some(Decision::Leave) => {}
                    Some(Decision::Fallback(_)) | None => failed = Some(at),
                }
                at += 1;
            })
        });
        if failed.is_some() || at != decisions.len() {
            return Err("internal error: the guarded conditions changed under the proxy".to_owned());
        }
        // Conversions of the client's values that raw conditions compare with run once, up front,
        // whatever the data: a `$n` declared with another type than the column's is converted
        // at run time under a generic plan, and evaluated per row (in a filter, after the cheap
        // conditions and before a scope rule's semi-join) its error would tell whether an
        // out-of-scope row passed the raw conditions (found by red-teaming: a binary search read
        // whole values). `num_nulls(…) >= 0` is always true and has no columns, so PostgreSQL
        // makes it a one-time filter evaluated before any row is read (and folds it away for
        // constants).
        let mut casts = Vec::new();
        for d in &decisions {
            if let Decision::Raw(e) = d {
                let _ = e.visit(&mut CastCollector(&mut casts));
            }
        }
        if !casts.is_empty() {
            let gate = conversion_gate(casts)?;
            select.selection = Some(match select.selection.take() {
                Some(w) => Expr::BinaryOp {
                    left: Box::new(Expr::Nested(Box::new(w))),
                    op: BinaryOperator::And,
                    right: Box::new(gate),
                },
                None => gate,
            });
        }
        expand_projection(select, &cands, &live);
        Ok(())
    }
}

/// What stands in for a candidate until its Select is decided.
const PLACEHOLDER: &str = "SELECT \"__struere_undecided\"()";

fn parse_ours(sql: &str, spec: &TableSpec) -> Result<Box<Query>, String> {
    parse_query(sql).map_err(|e| format!("internal error building the secure relation for {}: {e}", spec.name))
}

/// What becomes of one conjunct.
#[derive(Debug, Clone)]
enum Decision {
    /// Replaced by this expression on raw columns.
    Raw(Box<Expr>),
    /// Wrapped in `CASE WHEN <in scope of each> THEN … END`.
    Wrap(Vec<usize>),
    Leave,
    /// These candidates must be fenced.
    Fallback(Vec<usize>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClauseKind {
    Where,
    On,
}

/// An item of the Select's FROM, in `*` expansion order.
#[derive(Debug, Clone)]
enum Item {
    Cand(usize),
    Other(Ident),
}

/// What the FROM clause looks like to the analysis.
#[derive(Debug, Default)]
struct Shape {
    items: Vec<Item>,
    /// Every item has a name `*` can be expanded to.
    expandable: bool,
    /// Names of items that are not candidates.
    others: BTreeSet<String>,
    /// Candidates on the nullable side of an outer join.
    nullable: BTreeSet<usize>,
    /// Candidates that must be fenced whatever their conditions.
    fenced: BTreeSet<usize>,
    /// Everything must be fenced (NATURAL/USING, LATERAL subqueries, unknown constructs).
    fence_all: bool,
    /// The FROM clause is exactly this one candidate.
    single: Option<usize>,
}

impl Shape {
    fn of(from: &[TableWithJoins], cands: &[Candidate]) -> Shape {
        let mut s = Shape { expandable: true, ..Shape::default() };
        for twj in from {
            s.table_with_joins(twj, false, false, cands, &mut Vec::new());
        }
        if let [only] = from
            && only.joins.is_empty()
            && let TableFactor::Derived { subquery, .. } = &only.relation
        {
            s.single = cands.iter().position(|c| std::ptr::eq(c.subquery, &**subquery));
        }
        s
    }

    fn table_with_joins(
        &mut self,
        twj: &TableWithJoins,
        nullable: bool,
        hidden: bool,
        cands: &[Candidate],
        acc: &mut Vec<usize>,
    ) {
        let mut left = Vec::new();
        self.factor(&twj.relation, nullable, hidden, cands, &mut left);
        for j in &twj.joins {
            let (left_nullable, right_nullable, constraint) = match &j.join_operator {
                JoinOperator::Join(c) | JoinOperator::Inner(c) | JoinOperator::CrossJoin(c) => (false, false, Some(c)),
                JoinOperator::Left(c) | JoinOperator::LeftOuter(c) => (false, true, Some(c)),
                JoinOperator::Right(c) | JoinOperator::RightOuter(c) => (true, false, Some(c)),
                JoinOperator::FullOuter(c) => (true, true, Some(c)),
                _ => (false, false, None),
            };
            match constraint {
                None | Some(JoinConstraint::Natural | JoinConstraint::Using(_) | JoinConstraint::UsingAlias(..)) => {
                    self.fence_all = true;
                }
                Some(JoinConstraint::On(_) | JoinConstraint::None) => {}
            }
            if left_nullable {
                self.nullable.extend(left.iter().copied());
            }
            let mut right = Vec::new();
            self.factor(&j.relation, nullable || right_nullable, hidden, cands, &mut right);
            left.extend(right);
        }
        acc.extend(left);
    }

    fn factor(&mut self, tf: &TableFactor, nullable: bool, hidden: bool, cands: &[Candidate], acc: &mut Vec<usize>) {
        let named = |alias: &Option<TableAlias>| alias.as_ref().map(|a| a.name.clone());
        let other = match tf {
            TableFactor::Derived { subquery, alias, lateral, .. } => {
                let ptr = &**subquery as *const Query;
                if let Some(i) = cands.iter().position(|c| c.subquery == ptr) {
                    acc.push(i);
                    if nullable {
                        self.nullable.insert(i);
                    }
                    if hidden {
                        self.fenced.insert(i);
                    }
                    if !hidden {
                        self.items.push(Item::Cand(i));
                    }
                    return;
                }
                if *lateral {
                    // A LATERAL subquery is flattened; its expressions on a guarded relation would
                    // reach that relation's scan unwrapped.
                    self.fence_all = true;
                }
                named(alias)
            }
            TableFactor::Table { name, alias, args, .. } => match (alias, args) {
                (Some(a), _) => Some(a.name.clone()),
                (None, None) => match name.0.last() {
                    Some(ObjectNamePart::Identifier(i)) => Some(i.clone()),
                    _ => None,
                },
                (None, Some(_)) => None,
            },
            TableFactor::Function { alias, .. }
            | TableFactor::UNNEST { alias, .. }
            | TableFactor::TableFunction { alias, .. } => named(alias),
            TableFactor::NestedJoin { table_with_joins, alias } => {
                match alias {
                    Some(a) => {
                        // `(a JOIN b) AS j`: `j.*` and `j` would carry the raw columns.
                        self.table_with_joins(table_with_joins, nullable, true, cands, acc);
                        Some(a.name.clone())
                    }
                    None => {
                        self.table_with_joins(table_with_joins, nullable, hidden, cands, acc);
                        return;
                    }
                }
            }
            _ => {
                self.fence_all = true;
                None
            }
        };
        match other {
            Some(id) => {
                self.others.insert(fold(&id));
                if !hidden {
                    self.items.push(Item::Other(id));
                }
            }
            None => self.expandable = false,
        }
    }
}

/// A reference to a guarded relation's column.
#[derive(Debug, Clone, Copy)]
struct ColRef<'s> {
    cand: usize,
    col: &'s Column,
    /// The type the column is compared as.
    ty: u32,
}

/// What a conjunct references.
#[derive(Debug, Default)]
struct Refs {
    touch: BTreeSet<usize>,
    /// A reference to a FROM item that is not a live candidate.
    sibling: bool,
    /// A reference that may be to the enclosing query's row (or to an item the analysis cannot
    /// tell).
    outer: bool,
    subquery: bool,
    volatile: bool,
}

struct Analysis<'s, 'a> {
    cands: &'s [Candidate<'a>],
    by_name: BTreeMap<String, usize>,
    live: Vec<bool>,
    shape: Shape,
    ours: &'s HashSet<*const Query>,
    catalog: &'s CatalogSnapshot,
    /// The Select is the walked query's own: an unresolved name is a FROM item's column, never
    /// the enclosing query's.
    top_level: bool,
}

impl<'s, 'a> Analysis<'s, 'a> {
    fn new(
        cands: &'s [Candidate<'a>],
        select: &Select,
        ours: &'s HashSet<*const Query>,
        catalog: &'s CatalogSnapshot,
        top_level: bool,
    ) -> Self {
        let mut live = vec![true; cands.len()];
        let mut by_name = BTreeMap::new();
        for (i, c) in cands.iter().enumerate() {
            if let Some(j) = by_name.insert(c.name.clone(), i) {
                live[i] = false;
                live[j] = false;
            }
        }
        let shape = Shape::of(&select.from, cands);
        Analysis { cands, by_name, live, shape, ours, catalog, top_level }
    }

    fn kill(&mut self, i: usize) -> bool {
        match self.live.get_mut(i) {
            Some(l) if *l => {
                *l = false;
                true
            }
            _ => false,
        }
    }

    fn kill_all(&mut self) {
        self.live.iter_mut().for_each(|l| *l = false);
    }

    /// Fallbacks that do not depend on the conditions.
    fn static_fallbacks(&mut self, q: &Query, select: &Select) {
        let unsupported = select.prewhere.is_some()
            || !select.connect_by.is_empty()
            || !select.lateral_views.is_empty()
            || select.qualify.is_some()
            || select.value_table_mode.is_some();
        if self.shape.fence_all || unsupported {
            self.kill_all();
            return;
        }
        for i in self.shape.fenced.clone() {
            self.kill(i);
        }
        // Whole-row references anywhere in the query (and any other use of the alias the
        // analysis does not recognise as a column reference).
        let mut census = Census::new(self, select);
        let _ = q.visit(&mut census);
        let unsafe_refs: Vec<usize> =
            census.total.iter().zip(&census.safe).enumerate().filter(|(_, (t, s))| t > s).map(|(i, _)| i).collect();
        for i in unsafe_refs {
            self.kill(i);
        }
        // HAVING without aggregates is moved into WHERE by the planner, unwrapped.
        if let Some(h) = &select.having {
            for i in self.refs(h).touch {
                self.kill(i);
            }
        }
        // `*` must be expandable to exclude the raw columns.
        for item in &select.projection {
            match item {
                SelectItem::Wildcard(opts) if !self.shape.expandable || !plain_wildcard(opts) => self.kill_all(),
                SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(n), opts) => {
                    if let Some(i) = single_name(n).and_then(|n| self.by_name.get(&n).copied())
                        && !plain_wildcard(opts)
                    {
                        self.kill(i);
                    }
                }
                _ => {}
            }
        }
    }

    /// Classify every conjunct, fencing what must be fenced, until nothing changes.
    fn converge(&mut self, select: &Select) -> Vec<Decision> {
        loop {
            let mut decisions = Vec::new();
            let mut raw_count = vec![0usize; self.cands.len()];
            // Raw conjuncts first: whether a residual one can reach a scan depends on them.
            let mut conjuncts = Vec::new();
            for_each_clause(select, &mut |kind, clause| {
                for_each_conjunct(clause, &mut |c| conjuncts.push((kind, c)));
            });
            let raw: Vec<Option<(Expr, Vec<usize>)>> = conjuncts.iter().map(|(_, c)| self.try_raw(c)).collect();
            for (_, who) in raw.iter().flatten() {
                for i in who {
                    if let Some(n) = raw_count.get_mut(*i) {
                        *n += 1;
                    }
                }
            }
            for ((kind, c), raw) in conjuncts.iter().zip(raw) {
                decisions.push(match raw {
                    Some((new, _)) => Decision::Raw(Box::new(new)),
                    None => self.residual(*kind, c),
                });
            }
            let mut changed = false;
            for d in &decisions {
                if let Decision::Fallback(who) = d {
                    for i in who {
                        changed |= self.kill(*i);
                    }
                }
            }
            // A guarded relation without a single raw condition buys no plan: fence it.
            for (i, n) in raw_count.iter().enumerate() {
                if *n == 0 {
                    changed |= self.kill(i);
                }
            }
            if !changed {
                return decisions;
            }
        }
    }

    /// A conjunct that reads no raw column.
    fn residual(&self, kind: ClauseKind, e: &Expr) -> Decision {
        let refs = self.refs(e);
        let mut touch: Vec<usize> = refs.touch.iter().copied().collect();
        if touch.is_empty() {
            if !refs.volatile {
                // Row-independent: a one-time filter, or a condition on unguarded items only.
                return Decision::Leave;
            }
            // A volatile condition without columns runs once per row of the whole FROM clause.
            let live: Vec<usize> = (0..self.cands.len()).filter(|i| self.live[*i]).collect();
            if kind == ClauseKind::On {
                return Decision::Fallback(live);
            }
            if !self.shape.others.is_empty() || live.is_empty() {
                return Decision::Leave;
            }
            touch = live;
        }
        if refs.subquery || refs.outer {
            // A subquery may be pulled up, and a correlated condition may become a join clause
            // with the enclosing query: wrapped, neither could be hashed or pushed down.
            return Decision::Fallback(touch);
        }
        // Whatever else it references (an unguarded item, another guarded relation), a conjunct
        // on a guarded relation is wrapped. Rows that passed a guarded scan are not yet known to
        // be in scope: a scope rule with a subquery (`thread_id IN (SELECT …)`) becomes a
        // semi-join above the scan, and PostgreSQL may flatten a sibling (`(SELECT 0) v`) into a
        // constant and evaluate the conjunct at the scan. (Found by red-teaming: a division by
        // zero told an agent role whether a message id outside its scope existed.)
        if touch.iter().any(|i| self.shape.nullable.contains(i)) {
            // `CASE WHEN in_scope …` is NULL for a null-extended row, where the conjunct might not be.
            return Decision::Fallback(touch);
        }
        Decision::Wrap(touch)
    }

    fn refs(&self, e: &Expr) -> Refs {
        let mut v = RefsVisitor { a: self, depth: 0, refs: Refs::default() };
        let _ = e.visit(&mut v);
        v.refs
    }

    fn live_cand(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied().filter(|i| self.live.get(*i).copied().unwrap_or(false))
    }

    /// `x.c` or (single FROM item) `c`, a column of a live candidate.
    fn col_ref(&self, e: &Expr) -> Option<ColRef<'s>> {
        let cands: &'s [Candidate<'a>] = self.cands;
        let (i, name) = match e {
            Expr::Nested(inner) => return self.col_ref(inner),
            Expr::CompoundIdentifier(parts) => match parts.as_slice() {
                [q, c] => (self.live_cand(&fold(q))?, fold(c)),
                _ => return None,
            },
            Expr::Identifier(c) => {
                let i = self.shape.single.filter(|i| self.live.get(*i).copied().unwrap_or(false))?;
                (i, fold(c))
            }
            _ => return None,
        };
        let col = cands.get(i)?.columns.iter().find(|c| c.name == name)?;
        Some(ColRef { cand: i, col, ty: compared_as(col.type_oid) })
    }

    fn raw_col(&self, e: &Expr) -> Option<ColRef<'s>> {
        let c = self.col_ref(e)?;
        (c.ty != 0 && self.cands.get(c.cand)?.raw.contains(&c.col.name)).then_some(c)
    }

    fn raw_expr(&self, c: ColRef) -> Option<Expr> {
        let cand = self.cands.get(c.cand)?;
        Some(Expr::CompoundIdentifier(vec![cand.alias.clone(), Ident::with_quote('"', raw_name(&c.col.name))]))
    }

    fn leakproof(&self, op: &str, left: u32, right: u32) -> bool {
        self.catalog.operator_is_leakproof(op, left, right)
    }

    /// The conjunct on raw columns, when it is one of the recognised leakproof forms.
    fn try_raw(&self, e: &Expr) -> Option<(Expr, Vec<usize>)> {
        match e {
            Expr::Nested(inner) => self.try_raw(inner),
            Expr::BinaryOp { left, op, right } => {
                let sym = comparison(op)?;
                match (self.raw_col(left), self.raw_col(right)) {
                    (Some(l), Some(r)) => {
                        (l.ty == r.ty && self.leakproof(sym, l.ty, l.ty)).then_some(())?;
                        let new = Expr::BinaryOp {
                            left: Box::new(self.raw_expr(l)?),
                            op: op.clone(),
                            right: Box::new(self.raw_expr(r)?),
                        };
                        Some((new, vec![l.cand, r.cand]))
                    }
                    (Some(l), None) => {
                        let rhs = self.operand(right, sym, l.ty, true)?;
                        let new =
                            Expr::BinaryOp { left: Box::new(self.raw_expr(l)?), op: op.clone(), right: Box::new(rhs) };
                        Some((new, vec![l.cand]))
                    }
                    (None, Some(r)) => {
                        let lhs = self.operand(left, sym, r.ty, false)?;
                        let new =
                            Expr::BinaryOp { left: Box::new(lhs), op: op.clone(), right: Box::new(self.raw_expr(r)?) };
                        Some((new, vec![r.cand]))
                    }
                    (None, None) => None,
                }
            }
            Expr::In { expr, target: InTarget::List(items), negated, global: false } if !items.is_empty() => {
                let c = self.raw_col(expr)?;
                self.leakproof(if *negated { "<>" } else { "=" }, c.ty, c.ty).then_some(())?;
                let items = items.iter().map(|it| self.list_item(it, c.ty)).collect::<Option<Vec<_>>>()?;
                let new = Expr::In {
                    expr: Box::new(self.raw_expr(c)?),
                    target: InTarget::List(items),
                    negated: *negated,
                    global: false,
                };
                Some((new, vec![c.cand]))
            }
            Expr::Between { expr, negated, low, high } => {
                let c = self.raw_col(expr)?;
                let (lo, hi) = if *negated { ("<", ">") } else { (">=", "<=") };
                let new = Expr::Between {
                    expr: Box::new(self.raw_expr(c)?),
                    negated: *negated,
                    low: Box::new(self.operand(low, lo, c.ty, true)?),
                    high: Box::new(self.operand(high, hi, c.ty, true)?),
                };
                Some((new, vec![c.cand]))
            }
            Expr::IsNull(inner) => {
                let c = self.raw_col(inner)?;
                Some((Expr::IsNull(Box::new(self.raw_expr(c)?)), vec![c.cand]))
            }
            Expr::IsNotNull(inner) => {
                let c = self.raw_col(inner)?;
                Some((Expr::IsNotNull(Box::new(self.raw_expr(c)?)), vec![c.cand]))
            }
            _ => None,
        }
    }

    /// The row-independent side of `column OP value` (`column_left`) or `value OP column`, as
    /// it is to be printed, if PostgreSQL will pick a leakproof operator for it.
    fn operand(&self, e: &Expr, op: &str, ty: u32, column_left: bool) -> Option<Expr> {
        match constant_kind(e)? {
            Constant::Unknown => self.leakproof(op, ty, ty).then(|| e.clone()),
            Constant::Param => {
                if !self.leakproof(op, ty, ty) {
                    return None;
                }
                cast_param(e, ty)
            }
            Constant::Typed(other) => {
                let (l, r) = if column_left { (ty, other) } else { (other, ty) };
                self.leakproof(op, l, r).then(|| e.clone())
            }
        }
    }

    /// One value of `column IN (…)`: PostgreSQL compares in the list's common type, which must
    /// be the column's own.
    fn list_item(&self, e: &Expr, ty: u32) -> Option<Expr> {
        match constant_kind(e)? {
            Constant::Unknown => Some(e.clone()),
            Constant::Param => cast_param(e, ty),
            Constant::Typed(other) if other == ty || (ty == INT8 && other == INT4) => Some(e.clone()),
            Constant::Typed(_) => None,
        }
    }
}

/// Could this conjunct be a raw condition (ignoring names and types)?
fn raw_shaped(e: &Expr) -> bool {
    let column = |e: &Expr| {
        let mut e = e;
        while let Expr::Nested(inner) = e {
            e = inner;
        }
        matches!(e, Expr::Identifier(_)) || matches!(e, Expr::CompoundIdentifier(p) if p.len() == 2)
    };
    let operand = |e: &Expr| column(e) || constant_kind(e).is_some();
    match e {
        Expr::Nested(inner) => raw_shaped(inner),
        Expr::BinaryOp { left, op, right } => {
            comparison(op).is_some() && operand(left) && operand(right) && (column(left) || column(right))
        }
        Expr::In { expr, target: InTarget::List(items), .. } => {
            column(expr) && items.iter().all(|i| constant_kind(i).is_some())
        }
        Expr::Between { expr, low, high, .. } => {
            column(expr) && constant_kind(low).is_some() && constant_kind(high).is_some()
        }
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => column(inner),
        _ => false,
    }
}

fn comparison(op: &BinaryOperator) -> Option<&'static str> {
    Some(match op {
        BinaryOperator::Eq => "=",
        BinaryOperator::NotEq => "<>",
        BinaryOperator::Lt => "<",
        BinaryOperator::LtEq => "<=",
        BinaryOperator::Gt => ">",
        BinaryOperator::GtEq => ">=",
        _ => return None,
    })
}

fn plain_wildcard(o: &WildcardAdditionalOptions) -> bool {
    o.opt_ilike.is_none()
        && o.opt_exclude.is_none()
        && o.opt_except.is_none()
        && o.opt_replace.is_none()
        && o.opt_rename.is_none()
        && o.opt_alias.is_none()
}

fn single_name(n: &ObjectName) -> Option<String> {
    match n.0.as_slice() {
        [ObjectNamePart::Identifier(i)] => Some(fold(i)),
        _ => None,
    }
}

pub(super) const BOOL: u32 = 16;
pub(super) const INT8: u32 = 20;
pub(super) const INT2: u32 = 21;
pub(super) const INT4: u32 = 23;
pub(super) const TEXT: u32 = 25;
pub(super) const FLOAT4: u32 = 700;
pub(super) const FLOAT8: u32 = 701;
/// `unknown`: what a Parse may declare for a parameter it leaves to PostgreSQL to type.
pub(super) const UNKNOWN: u32 = 705;
pub(super) const VARCHAR: u32 = 1043;
const DATE: u32 = 1082;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
pub(super) const NUMERIC: u32 = 1700;
pub(super) const UUID: u32 = 2950;

/// Built-in types the fast path compares, by OID, with their name in `pg_catalog`.
const TYPES: &[(u32, &str)] = &[
    (BOOL, "bool"),
    (INT8, "int8"),
    (INT2, "int2"),
    (INT4, "int4"),
    (TEXT, "text"),
    (FLOAT4, "float4"),
    (FLOAT8, "float8"),
    (DATE, "date"),
    (TIMESTAMP, "timestamp"),
    (TIMESTAMPTZ, "timestamptz"),
    (UUID, "uuid"),
];

/// The type a column of this type is compared as: `varchar` compares as `text` (a binary
/// coercion, no function). Unknown types compare as nothing (0): never raw.
fn compared_as(oid: u32) -> u32 {
    match oid {
        VARCHAR => TEXT,
        o if TYPES.iter().any(|(t, _)| *t == o) => o,
        _ => 0,
    }
}

/// A row-independent operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Constant {
    /// A string literal: PostgreSQL gives it the other operand's type.
    Unknown,
    /// `$n`: typed by the client, possibly out of band; cast to the column's type when used.
    Param,
    /// A numeric or boolean literal, or a cast/typed literal, of this type.
    Typed(u32),
}

fn constant_kind(e: &Expr) -> Option<Constant> {
    match e {
        Expr::Nested(inner) => constant_kind(inner),
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(_) | Value::EscapedStringLiteral(_) | Value::DollarQuotedString(_) => {
                Some(Constant::Unknown)
            }
            Value::Placeholder(p) if is_param(p) => Some(Constant::Param),
            Value::Number(n, false) => Some(Constant::Typed(number_type(n))),
            Value::Boolean(_) => Some(Constant::Typed(BOOL)),
            _ => None,
        },
        Expr::UnaryOp { op: UnaryOperator::Minus | UnaryOperator::Plus, expr } => match expr.as_ref() {
            Expr::Value(v) => match &v.value {
                Value::Number(n, false) => Some(Constant::Typed(number_type(n))),
                _ => None,
            },
            _ => None,
        },
        // A cast of a literal is folded before execution; a cast of a parameter only types it
        // (unless the client declared another type; see ARCHITECTURE.md).
        // Only one cast, of a literal or a parameter: a cast of a typed value might run per row.
        Expr::Cast { kind: CastKind::Cast | CastKind::DoubleColon, expr, data_type, format: None } => {
            let mut inner = expr.as_ref();
            while let Expr::Nested(e) = inner {
                inner = e;
            }
            if !matches!(inner, Expr::Value(_) | Expr::UnaryOp { .. }) {
                return None;
            }
            constant_kind(inner)?;
            Some(Constant::Typed(type_of(data_type)?))
        }
        Expr::TypedString(t) => match &t.value.value {
            Value::SingleQuotedString(_) => Some(Constant::Typed(type_of(&t.data_type)?)),
            _ => None,
        },
        _ => None,
    }
}

pub(super) fn is_param(p: &str) -> bool {
    p.strip_prefix('$').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// PostgreSQL's type for a numeric literal: int4 if it fits, else int8, else numeric.
fn number_type(n: &str) -> u32 {
    if !n.bytes().all(|b| b.is_ascii_digit()) {
        return NUMERIC;
    }
    if n.parse::<i32>().is_ok() {
        INT4
    } else if n.parse::<i64>().is_ok() {
        INT8
    } else {
        NUMERIC
    }
}

/// The OID of a cast's target type, for the types the fast path knows (compared-as form).
fn type_of(t: &DataType) -> Option<u32> {
    cast_target(t).map(|(oid, _)| compared_as(oid))
}

/// The OID of a cast's target type exactly as PostgreSQL reads it (`varchar` is `varchar`), when
/// it carries no length or other modifier: casting a value of that type to it converts nothing.
pub(super) fn exact_type(t: &DataType) -> Option<u32> {
    cast_target(t).and_then(|(oid, modified)| (!modified).then_some(oid))
}

/// A cast's target type as written, for the types the fast path knows, and whether it carries
/// a modifier (`varchar(10)`).
fn cast_target(t: &DataType) -> Option<(u32, bool)> {
    let oid = match t {
        DataType::Varchar(len) | DataType::CharacterVarying(len) => return Some((VARCHAR, len.is_some())),
        DataType::Text => TEXT,
        DataType::Int(None) | DataType::Integer(None) | DataType::Int4(None) => INT4,
        DataType::BigInt(None) | DataType::Int8(None) => INT8,
        DataType::SmallInt(None) | DataType::Int2(None) => INT2,
        DataType::Boolean | DataType::Bool => BOOL,
        DataType::Uuid => UUID,
        DataType::Date => DATE,
        DataType::Timestamp(None, TimezoneInfo::Tz | TimezoneInfo::WithTimeZone) => TIMESTAMPTZ,
        DataType::Timestamp(None, TimezoneInfo::None | TimezoneInfo::WithoutTimeZone) => TIMESTAMP,
        DataType::Real | DataType::Float4 => FLOAT4,
        DataType::Float8 | DataType::DoublePrecision => FLOAT8,
        DataType::Custom(name, mods) if mods.is_empty() => {
            let parts: Vec<String> = name
                .0
                .iter()
                .map(|p| match p {
                    ObjectNamePart::Identifier(i) => Some(fold(i)),
                    _ => None,
                })
                .collect::<Option<_>>()?;
            let base = match parts.as_slice() {
                [n] => n.as_str(),
                [s, n] if s == "pg_catalog" => n.as_str(),
                _ => return None,
            };
            if base == "varchar" {
                return Some((VARCHAR, false));
            }
            TYPES.iter().find(|(_, n)| *n == base).map(|(o, _)| *o)?
        }
        _ => return None,
    };
    Some((oid, false))
}

/// `CAST($n AS pg_catalog.<type>)`: the operator is then exactly (type, type), and the column
/// never passes through a cast.
fn cast_param(e: &Expr, ty: u32) -> Option<Expr> {
    let name = TYPES.iter().find(|(o, _)| *o == ty).map(|(_, n)| *n)?;
    Some(Expr::Cast {
        kind: CastKind::Cast,
        expr: Box::new(e.clone()),
        data_type: DataType::Custom(ObjectName::from(vec![Ident::new("pg_catalog"), Ident::new(name)]), vec![]),
        format: None,
    })
}

/// Row-independent casts (of the client's parameters and literals) in a raw condition.
struct CastCollector<'c>(&'c mut Vec<Expr>);

impl Visitor for CastCollector<'_> {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &Expr) -> std::ops::ControlFlow<()> {
        if let Expr::Cast { expr, .. } = e {
            let mut columns = false;
            let _ = expr.visit(&mut ColumnFinder(&mut columns));
            if !columns && !self.0.contains(e) {
                self.0.push(e.clone());
            }
        }
        std::ops::ControlFlow::Continue(())
    }
}

struct ColumnFinder<'c>(&'c mut bool);

impl Visitor for ColumnFinder<'_> {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &Expr) -> std::ops::ControlFlow<()> {
        if matches!(e, Expr::Identifier(_) | Expr::CompoundIdentifier(_)) {
            *self.0 = true;
            return std::ops::ControlFlow::Break(());
        }
        std::ops::ControlFlow::Continue(())
    }
}

/// `num_nulls(<casts>) >= 0`.
fn conversion_gate(casts: Vec<Expr>) -> Result<Expr, String> {
    let q = parse_query("SELECT num_nulls(NULL) >= 0")?;
    let SetExpr::Select(s) = *q.body else { return Err("internal error: conversion gate".to_owned()) };
    let Some(SelectItem::UnnamedExpr(mut gate)) = s.projection.into_iter().next() else {
        return Err("internal error: conversion gate".to_owned());
    };
    if let Expr::BinaryOp { left, .. } = &mut gate
        && let Expr::Function(f) = left.as_mut()
        && let sqlparser::ast::FunctionArguments::List(list) = &mut f.args
    {
        list.args = casts
            .into_iter()
            .map(|c| sqlparser::ast::FunctionArg::Unnamed(sqlparser::ast::FunctionArgExpr::Expr(c)))
            .collect();
        return Ok(gate);
    }
    Err("internal error: conversion gate".to_owned())
}

/// The arguments of a conversion gate (`conversion_gate`'s shape, `num_nulls(…) >= 0`), if `e`
/// is one.
pub(super) fn gate_arguments(e: &Expr) -> Option<Vec<&Expr>> {
    let Expr::BinaryOp { left, op: BinaryOperator::GtEq, right } = e else { return None };
    let zero = matches!(right.as_ref(), Expr::Value(v) if matches!(&v.value, Value::Number(n, false) if n == "0"));
    let Expr::Function(f) = left.as_ref() else { return None };
    let plain = matches!(f.name.0.as_slice(), [ObjectNamePart::Identifier(i)] if i.quote_style.is_none() && i.value.eq_ignore_ascii_case("num_nulls"))
        && !f.uses_odbc_syntax
        && matches!(f.parameters, sqlparser::ast::FunctionArguments::None)
        && f.filter.is_none()
        && f.null_treatment.is_none()
        && f.over.is_none()
        && f.within_group.is_empty();
    let sqlparser::ast::FunctionArguments::List(list) = &f.args else { return None };
    if !zero || !plain || list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
        return None;
    }
    list.args
        .iter()
        .map(|a| match a {
            sqlparser::ast::FunctionArg::Unnamed(sqlparser::ast::FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        })
        .collect()
}

fn wrap(conjunct: Expr, aliases: &[Ident]) -> Expr {
    let mut cond: Option<Expr> = None;
    for a in aliases {
        let flag = Expr::CompoundIdentifier(vec![a.clone(), Ident::with_quote('"', IN_SCOPE)]);
        cond = Some(match cond {
            None => flag,
            Some(c) => Expr::BinaryOp { left: Box::new(c), op: BinaryOperator::And, right: Box::new(flag) },
        });
    }
    let Some(condition) = cond else { return conjunct };
    Expr::Case {
        case_token: AttachedToken::empty(),
        end_token: AttachedToken::empty(),
        operand: None,
        conditions: vec![CaseWhen { condition, result: Expr::Nested(Box::new(conjunct)) }],
        else_result: None,
    }
}

/// The WHERE clause and every JOIN … ON condition of a Select, in a fixed order.
fn for_each_clause<'e>(select: &'e Select, f: &mut impl FnMut(ClauseKind, &'e Expr)) {
    if let Some(w) = &select.selection {
        f(ClauseKind::Where, w);
    }
    fn twj<'e>(t: &'e TableWithJoins, f: &mut impl FnMut(ClauseKind, &'e Expr)) {
        factor(&t.relation, f);
        for j in &t.joins {
            factor(&j.relation, f);
            if let Some(JoinConstraint::On(e)) = join_constraint(&j.join_operator) {
                f(ClauseKind::On, e);
            }
        }
    }
    fn factor<'e>(tf: &'e TableFactor, f: &mut impl FnMut(ClauseKind, &'e Expr)) {
        if let TableFactor::NestedJoin { table_with_joins, .. } = tf {
            twj(table_with_joins, f);
        }
    }
    for t in &select.from {
        twj(t, f);
    }
}

fn for_each_clause_mut(select: &mut Select, f: &mut impl FnMut(ClauseKind, &mut Expr)) {
    if let Some(w) = &mut select.selection {
        f(ClauseKind::Where, w);
    }
    fn twj(t: &mut TableWithJoins, f: &mut impl FnMut(ClauseKind, &mut Expr)) {
        factor(&mut t.relation, f);
        for j in &mut t.joins {
            factor(&mut j.relation, f);
            if let Some(JoinConstraint::On(e)) = join_constraint_mut(&mut j.join_operator) {
                f(ClauseKind::On, e);
            }
        }
    }
    fn factor(tf: &mut TableFactor, f: &mut impl FnMut(ClauseKind, &mut Expr)) {
        if let TableFactor::NestedJoin { table_with_joins, .. } = tf {
            twj(table_with_joins, f);
        }
    }
    for t in &mut select.from {
        twj(t, f);
    }
}

fn join_constraint(op: &JoinOperator) -> Option<&JoinConstraint> {
    match op {
        JoinOperator::Join(c)
        | JoinOperator::Inner(c)
        | JoinOperator::Left(c)
        | JoinOperator::LeftOuter(c)
        | JoinOperator::Right(c)
        | JoinOperator::RightOuter(c)
        | JoinOperator::FullOuter(c)
        | JoinOperator::CrossJoin(c) => Some(c),
        _ => None,
    }
}

fn join_constraint_mut(op: &mut JoinOperator) -> Option<&mut JoinConstraint> {
    match op {
        JoinOperator::Join(c)
        | JoinOperator::Inner(c)
        | JoinOperator::Left(c)
        | JoinOperator::LeftOuter(c)
        | JoinOperator::Right(c)
        | JoinOperator::RightOuter(c)
        | JoinOperator::FullOuter(c)
        | JoinOperator::CrossJoin(c) => Some(c),
        _ => None,
    }
}

/// The top-level AND operands of a condition (through parentheses).
fn for_each_conjunct<'e>(e: &'e Expr, f: &mut impl FnMut(&'e Expr)) {
    match e {
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            for_each_conjunct(left, f);
            for_each_conjunct(right, f);
        }
        Expr::Nested(inner) if matches!(inner.as_ref(), Expr::BinaryOp { op: BinaryOperator::And, .. }) => {
            for_each_conjunct(inner, f);
        }
        other => f(other),
    }
}

fn for_each_conjunct_mut(e: &mut Expr, f: &mut impl FnMut(&mut Expr)) {
    match e {
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            for_each_conjunct_mut(left, f);
            for_each_conjunct_mut(right, f);
        }
        Expr::Nested(inner) if matches!(inner.as_ref(), Expr::BinaryOp { op: BinaryOperator::And, .. }) => {
            for_each_conjunct_mut(inner, f);
        }
        other => f(other),
    }
}

/// Swap the subquery at `target` (in this FROM clause) for `new`.
fn replace_subquery(from: &mut [TableWithJoins], target: *const Query, new: &mut Option<Box<Query>>) -> bool {
    fn factor(tf: &mut TableFactor, target: *const Query, new: &mut Option<Box<Query>>) -> bool {
        match tf {
            TableFactor::Derived { subquery, .. } if std::ptr::eq(&**subquery, target) => match new.take() {
                Some(q) => {
                    *subquery = q;
                    true
                }
                None => false,
            },
            TableFactor::NestedJoin { table_with_joins, .. } => {
                replace_subquery(std::slice::from_mut(table_with_joins.as_mut()), target, new)
            }
            _ => false,
        }
    }
    for t in from {
        if factor(&mut t.relation, target, new) {
            return true;
        }
        for j in &mut t.joins {
            if factor(&mut j.relation, target, new) {
                return true;
            }
        }
    }
    false
}

/// `*` and `x.*` of a Select with guarded relations: their columns listed, never the raw ones.
fn expand_projection(select: &mut Select, cands: &[Candidate], live: &[bool]) {
    let shape = Shape::of(&select.from, cands);
    let is_live = |i: usize| live.get(i).copied().unwrap_or(false);
    let columns_of = |c: &Candidate| -> Vec<SelectItem> {
        c.columns
            .iter()
            .map(|col| {
                SelectItem::UnnamedExpr(Expr::CompoundIdentifier(vec![
                    c.alias.clone(),
                    Ident::with_quote('"', col.name.clone()),
                ]))
            })
            .collect()
    };
    let all_of = |id: &Ident| {
        SelectItem::QualifiedWildcard(
            SelectItemQualifiedWildcardKind::ObjectName(ObjectName::from(vec![id.clone()])),
            WildcardAdditionalOptions::default(),
        )
    };
    let items = std::mem::take(&mut select.projection);
    for item in items {
        match item {
            SelectItem::Wildcard(_) => {
                for it in &shape.items {
                    match it {
                        Item::Cand(i) => match cands.get(*i) {
                            Some(c) if is_live(*i) => select.projection.extend(columns_of(c)),
                            Some(c) => select.projection.push(all_of(&c.alias)),
                            None => {}
                        },
                        Item::Other(id) => select.projection.push(all_of(id)),
                    }
                }
            }
            SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(n), opts) => {
                let cand = single_name(&n).and_then(|name| cands.iter().position(|c| c.name == name));
                match cand.and_then(|i| cands.get(i).filter(|_| is_live(i))) {
                    Some(c) => select.projection.extend(columns_of(c)),
                    None => select
                        .projection
                        .push(SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(n), opts)),
                }
            }
            other => select.projection.push(other),
        }
    }
}

/// Counts, per candidate, every identifier naming it and the ones in positions the analysis
/// understands (`x.col`, its own alias, `x.*` in the Select's own list, a bare column name): any
/// other use (a whole-row reference, `x.*` inside an expression, a shadowing alias…) fences it.
struct Census<'s> {
    names: BTreeMap<String, usize>,
    columns: Vec<BTreeSet<String>>,
    subqueries: Vec<*const Query>,
    ours: &'s HashSet<*const Query>,
    select: *const Select,
    depth: usize,
    total: Vec<usize>,
    safe: Vec<usize>,
}

impl<'s> Census<'s> {
    fn new(a: &Analysis<'s, '_>, select: &Select) -> Self {
        let n = a.cands.len();
        Census {
            names: a.cands.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect(),
            columns: a.cands.iter().map(|c| c.columns.iter().map(|col| col.name.clone()).collect()).collect(),
            subqueries: a.cands.iter().map(|c| c.subquery).collect(),
            ours: a.ours,
            select: select as *const Select,
            depth: 0,
            total: vec![0; n],
            safe: vec![0; n],
        }
    }

    fn add_safe(&mut self, i: usize, k: usize) {
        if let Some(s) = self.safe.get_mut(i) {
            *s += k;
        }
    }

    fn is_column(&self, i: usize, name: &str) -> bool {
        self.columns.get(i).is_some_and(|c| c.contains(name))
    }
}

impl Visitor for Census<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if self.ours.contains(&(q as *const Query)) {
            self.depth += 1;
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if self.ours.contains(&(q as *const Query)) {
            self.depth = self.depth.saturating_sub(1);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, s: &Select) -> ControlFlow<()> {
        if self.depth == 0 && std::ptr::eq(s, self.select) {
            for item in &s.projection {
                if let SelectItem::QualifiedWildcard(SelectItemQualifiedWildcardKind::ObjectName(n), _) = item
                    && let Some(i) = single_name(n).and_then(|n| self.names.get(&n).copied())
                {
                    self.add_safe(i, 1);
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        if self.depth == 0
            && let TableFactor::Derived { subquery, alias: Some(a), .. } = tf
            && let Some(i) = self.names.get(&fold(&a.name)).copied()
            && self.subqueries.get(i) == Some(&(&**subquery as *const Query))
        {
            self.add_safe(i, 1);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.depth > 0 {
            return ControlFlow::Continue(());
        }
        match e {
            Expr::CompoundIdentifier(parts) => {
                if let [q, c] = parts.as_slice()
                    && let Some(i) = self.names.get(&fold(q)).copied()
                {
                    let col = fold(c);
                    if self.is_column(i, &col) || c.value.starts_with(RESERVED_PREFIX) {
                        let also_col = self.names.get(&col) == Some(&i);
                        self.add_safe(i, if also_col { 2 } else { 1 });
                    }
                }
            }
            Expr::Identifier(id) => {
                let name = fold(id);
                if let Some(i) = self.names.get(&name).copied()
                    && self.is_column(i, &name)
                {
                    self.add_safe(i, 1);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_ident(&mut self, id: &Ident) -> ControlFlow<()> {
        if self.depth == 0
            && let Some(i) = self.names.get(&fold(id)).copied()
            && let Some(t) = self.total.get_mut(i)
        {
            *t += 1;
        }
        ControlFlow::Continue(())
    }
}

/// The raw columns a rewritten condition reads, as (alias, column).
struct RawRefs(Vec<(String, String)>);

impl Visitor for RawRefs {
    type Break = ();

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::CompoundIdentifier(parts) = e
            && let [q, c] = parts.as_slice()
            && let Some(col) = c.value.strip_prefix(RAW_PREFIX)
        {
            self.0.push((fold(q), col.to_owned()));
        }
        ControlFlow::Continue(())
    }
}

/// Collects what one conjunct references (outside the proxy's own subqueries).
struct RefsVisitor<'v, 's, 'a> {
    a: &'v Analysis<'s, 'a>,
    depth: usize,
    refs: Refs,
}

impl RefsVisitor<'_, '_, '_> {
    fn function(&mut self, f: &Function) {
        let name = match f.name.0.last() {
            Some(ObjectNamePart::Identifier(i)) => fold(i),
            _ => {
                self.refs.volatile = true;
                return;
            }
        };
        if self.a.catalog.functions.get(&name).is_some_and(|fs| fs.iter().any(|f| f.volatility == 'v')) {
            self.refs.volatile = true;
        }
    }
}

impl Visitor for RefsVisitor<'_, '_, '_> {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if self.a.ours.contains(&(q as *const Query)) {
            self.depth += 1;
        } else if self.depth == 0 {
            self.refs.subquery = true;
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if self.a.ours.contains(&(q as *const Query)) {
            self.depth = self.depth.saturating_sub(1);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.depth > 0 {
            return ControlFlow::Continue(());
        }
        match e {
            Expr::Identifier(id) => {
                let name = fold(id);
                let mut found = false;
                for (i, c) in self.a.cands.iter().enumerate() {
                    if self.a.live.get(i).copied().unwrap_or(false) && c.columns.iter().any(|col| col.name == name) {
                        self.refs.touch.insert(i);
                        found = true;
                    }
                }
                // Another item's column, or the enclosing query's: either way not known to be
                // evaluated only after the guarded scans. (With one FROM item and no enclosing
                // query it can be neither.)
                let only_item = self.a.top_level && self.a.shape.single.is_some();
                if !found && !only_item {
                    self.refs.outer = true;
                }
            }
            Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                if let Some(q) = parts.get(parts.len() - 2) {
                    let q = fold(q);
                    match self.a.live_cand(&q) {
                        Some(i) => {
                            self.refs.touch.insert(i);
                        }
                        None if self.a.shape.others.contains(&q) || self.a.by_name.contains_key(&q) => {
                            self.refs.sibling = true;
                        }
                        None => self.refs.outer = true,
                    }
                }
            }
            Expr::Function(f) => self.function(f),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_ident(&mut self, id: &Ident) -> ControlFlow<()> {
        if self.depth == 0
            && let Some(i) = self.a.live_cand(&fold(id))
        {
            self.refs.touch.insert(i);
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
#[path = "guard_tests.rs"]
mod tests;
