//! Statements sqlparser cannot read as the client spelled them, read through another spelling,
//! with PostgreSQL's tree as the authority:
//!
//! 1. **PostgreSQL's own printing** of the client's tree (pg_query's deparser), which must read
//!    back as exactly that tree. It drops parentheses PostgreSQL does not need, so Django's
//!    `((SELECT …) UNION (SELECT …))` subquery and `EXPLAIN (SELECT …) UNION (SELECT …)` reach
//!    sqlparser as `(SELECT … UNION SELECT …)` and `EXPLAIN SELECT … UNION SELECT …`. Sending
//!    this text is the same as the client sending it: it means exactly what the client wrote.
//! 2. For an **EXPLAIN without options**, the same with `COSTS OFF`: sqlparser reads
//!    `EXPLAIN (` as the start of an option list, so `EXPLAIN (SELECT … LIMIT 1) UNION …` (whose
//!    parentheses PostgreSQL needs) cannot be read without one. `COSTS OFF` is the option the
//!    policy adds to every EXPLAIN anyway (estimates come from every tenant's rows), so the
//!    statement forwarded is the one the client's would have become.
//! 3. **Set operations in expressions** whose first operand needs its parentheses (`ORDER BY`,
//!    `LIMIT`, `OFFSET`, `FETCH`, a locking clause or `WITH` inside them:
//!    `x = ((SELECT … LIMIT 1) UNION (SELECT …))`), which sqlparser reads only after `SELECT` or
//!    `WITH`: the subquery of each scalar, `op ANY`/`op ALL` sublink holding a set operation (or a
//!    bare `VALUES`) is wrapped on PostgreSQL's tree as `(SELECT * FROM (<subquery>) <marker>)`,
//!    which PostgreSQL's printer prints and sqlparser reads. The policy rewrites the wrapped
//!    statement as usual; on sqlparser's tree of the rewrite each wrapper, still exactly
//!    `SELECT * FROM (…) <marker>`, is replaced by the subquery it holds, and the proxy's printer
//!    prints the result, which the verifier checks like any rewrite. The marker is a name found
//!    nowhere in the client's tree; a statement whose output still holds it is refused. Only the
//!    sublinks pg_query's node iterator reaches are wrapped (the select list, WHERE, JOIN … ON,
//!    GROUP BY, HAVING, ORDER BY, CASE, COALESCE, function arguments, `UPDATE … SET`, CTE and
//!    FROM subqueries, …); elsewhere (`IS TRUE`, `LIMIT`, `FILTER`, `RETURNING`, `VALUES`,
//!    `SET (a, b) = …`) sqlparser's refusal stands.
//!
//! Why unwrapping is sound: `(SELECT * FROM (q) m)` and `(q)` give a scalar, `ANY` or `ALL`
//! sublink the same rows and columns (the order of rows matters to none of them, which is why
//! `ARRAY(…)` is never wrapped); `m` is visible to nothing in `q` (not LATERAL) and to nothing
//! outside the wrapper. The policy secures `q` in the wrapper: its operands are arms of a set
//! operation, never a guarded Select (only the statement's own query and scalar/EXISTS subqueries
//! are, `engine/guard.rs`), so every managed table in them is read through the fenced secure
//! relation, which is safe in any position; a conjunct holding the sublink holds a subquery
//! either way, so the enclosing query is secured the same way.
//!
//! Invariant: what sqlparser reads is PostgreSQL's printing of the client's tree (step 1), of
//! the client's EXPLAIN with the option the policy adds anyway (step 2), or of that with
//! equivalent wrappers the rewrite's tree loses again before printing (step 3); the forwarded
//! text is printed by the proxy's printer and verified like any rewrite, and must read as
//! exactly the tree of steps 1–2 where the policy changed nothing.

use std::ops::ControlFlow;

use pg_query::NodeEnum;
use pg_query::protobuf::{self as pb, Node};
use sqlparser::ast::{Expr, Query, SetExpr, Statement, TableFactor, VisitMut, VisitorMut};

use super::{Refusal, classify, lexer, pgtree};

/// A statement sqlparser read through another spelling of the client's.
#[derive(Debug)]
pub(crate) struct Reading {
    /// sqlparser's tree of the spelling it read.
    pub parsed: Statement,
    /// PostgreSQL's tree the forwarded statement must read as if the policy changes nothing:
    /// the client's (step 1), with `COSTS OFF` (step 2).
    pub tree: NodeEnum,
    /// Step 3: the name of the wrappers to take off after the policy.
    pub marker: Option<String>,
}

/// Tries the spellings above in order; the first sqlparser reads, or `None`.
pub(crate) fn read(node: &NodeEnum, label: &str) -> Option<Reading> {
    let mut tree = node.clone();
    if let Some(parsed) = readable(&tree, label) {
        return Some(Reading { parsed, tree, marker: None });
    }
    if explain_costs_off(&mut tree)
        && let Some(parsed) = readable(&tree, label)
    {
        return Some(Reading { parsed, tree, marker: None });
    }
    let marker = marker_for(&tree)?;
    let mut wrapped = tree.clone();
    if wrap(&mut wrapped, &marker)? == 0 {
        return None;
    }
    let parsed = readable(&wrapped, label)?;
    Some(Reading { parsed, tree, marker: Some(marker) })
}

/// sqlparser's reading of PostgreSQL's printing of `tree`, when that printing reads back as
/// exactly `tree` and holds no `U&"…"` identifier (which sqlparser misreads).
fn readable(tree: &NodeEnum, label: &str) -> Option<Statement> {
    let text = super::print_exactly(tree, label).ok()?;
    let tokens = lexer::scan(&text).ok()?;
    if lexer::contains_unicode_identifier(&tokens, 0..text.len()) {
        return None;
    }
    super::parse_one(&text).ok()
}

/// Step 2: `COSTS OFF` on an EXPLAIN without options, as PostgreSQL's parser makes the option.
fn explain_costs_off(tree: &mut NodeEnum) -> bool {
    let NodeEnum::ExplainStmt(explain) = tree else { return false };
    if !explain.options.is_empty() {
        return false;
    }
    let Some(NodeEnum::ExplainStmt(mut template)) = classify::parse_alone("EXPLAIN (COSTS OFF) SELECT") else {
        return false;
    };
    explain.options = std::mem::take(&mut template.options);
    explain.options.len() == 1
}

/// A wrapper alias no string of `tree` contains (so no client text can spell a wrapper).
fn marker_for(tree: &NodeEnum) -> Option<String> {
    let shape = pgtree::shape(tree)?.to_ascii_lowercase();
    (0..100).map(|n| format!("struere_set_operation_{n}")).find(|m| !shape.contains(m.as_str()))
}

/// PostgreSQL's tree of `SELECT * FROM (SELECT) AS <marker>`: the wrapper, its subquery to be
/// replaced.
fn wrapper(marker: &str) -> Option<pb::SelectStmt> {
    match classify::parse_alone(&format!("SELECT * FROM (SELECT) AS {marker}"))? {
        NodeEnum::SelectStmt(s) => Some(*s),
        _ => None,
    }
}

/// Whether sqlparser needs this sublink's subquery wrapped: a scalar or `op ANY/ALL` sublink
/// (sqlparser reads `IN`, `EXISTS` and `ARRAY` subqueries that start with a parenthesis) over a
/// set operation or a bare VALUES.
fn wrappable(link: &pb::SubLink) -> bool {
    use pb::SubLinkType as T;
    let kind = T::try_from(link.sub_link_type).unwrap_or(T::Undefined);
    let position = match kind {
        T::ExprSublink | T::AllSublink => true,
        // `IN (…)` is an ANY sublink without an operator name.
        T::AnySublink => !link.oper_name.is_empty(),
        _ => false,
    };
    let body = match link.subselect.as_deref().and_then(|n| n.node.as_ref()) {
        Some(NodeEnum::SelectStmt(s)) => s.op != pb::SetOperation::SetopNone as i32 || !s.values_lists.is_empty(),
        _ => false,
    };
    position && body
}

/// Step 3 on PostgreSQL's tree: wraps the subquery of every sublink sqlparser needs wrapped.
/// Returns how many were wrapped (`None`: the wrapper could not be built). Sublinks pg_query's
/// node iterator does not reach stay as they are, and sqlparser still refuses them.
fn wrap(tree: &mut NodeEnum, marker: &str) -> Option<usize> {
    let template = wrapper(marker)?;
    let mut count = 0;
    // SAFETY: every pointer comes from `tree`, which is neither moved nor dropped until after
    // the loop; only SubLink pointers are dereferenced. A wrapped subquery's box is moved into
    // its wrapper, not its contents, so the pointers to nodes inside it stay valid, and nothing
    // is freed.
    unsafe {
        for (n, ..) in tree.nodes_mut() {
            let pg_query::NodeMut::SubLink(ptr) = n else { continue };
            let Some(link) = ptr.as_mut() else { continue };
            if !wrappable(link) {
                continue;
            }
            let mut shell = template.clone();
            let Some(Node { node: Some(NodeEnum::RangeSubselect(from)) }) = shell.from_clause.first_mut() else {
                return None;
            };
            from.subquery = link.subselect.take();
            link.subselect = Some(Box::new(Node { node: Some(NodeEnum::SelectStmt(Box::new(shell))) }));
            count += 1;
        }
    }
    Some(count)
}

/// Step 3 on sqlparser's tree of the rewrite: every subquery that is exactly the wrapper
/// (`SELECT * FROM (q) <marker>`, as sqlparser reads PostgreSQL's printing of it) becomes `q`.
pub(crate) fn unwrap(stmt: &mut Statement, marker: &str, label: &str) -> Result<(), Refusal> {
    let refused = || Refusal::Unverifiable(format!("refused: the proxy could not respell {label}"));
    let mut shell = wrapper(marker).ok_or_else(refused)?;
    if let Some(Node { node: Some(NodeEnum::RangeSubselect(from)) }) = shell.from_clause.first_mut() {
        from.subquery = classify::parse_alone("SELECT 1").map(|n| Box::new(Node { node: Some(n) }));
    }
    let text = super::print_exactly(&NodeEnum::SelectStmt(Box::new(shell)), label)?;
    let Ok(Statement::Query(template)) = super::parse_one(&text) else { return Err(refused()) };
    let placeholder = derived(&template, marker).cloned().ok_or_else(refused)?;
    let mut unwrapper = Unwrapper { marker, template: &template, placeholder: &placeholder };
    let _ = stmt.visit(&mut unwrapper);
    Ok(())
}

struct Unwrapper<'a> {
    marker: &'a str,
    /// The wrapper around `SELECT 1`.
    template: &'a Query,
    placeholder: &'a Query,
}

impl Unwrapper<'_> {
    /// The subquery of a wrapper left exactly as printed.
    fn inner(&self, q: &Query) -> Option<Query> {
        let inner = derived(q, self.marker)?.clone();
        let mut shell = q.clone();
        if let SetExpr::Select(select) = shell.body.as_mut()
            && let Some(TableFactor::Derived { subquery, .. }) = select.from.first_mut().map(|f| &mut f.relation)
        {
            **subquery = self.placeholder.clone();
        }
        (shell == *self.template).then_some(inner)
    }
}

impl VisitorMut for Unwrapper<'_> {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Expr::Subquery(q) = expr
            && let Some(inner) = self.inner(q)
        {
            **q = inner;
        }
        ControlFlow::Continue(())
    }
}

/// The subquery of `SELECT … FROM (subquery) <marker>`.
fn derived<'q>(q: &'q Query, marker: &str) -> Option<&'q Query> {
    let SetExpr::Select(select) = q.body.as_ref() else { return None };
    let [from] = select.from.as_slice() else { return None };
    match &from.relation {
        TableFactor::Derived { subquery, alias: Some(alias), .. } if alias.name.value == marker => Some(subquery),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
