//! The policy hook between the gate and the printer.
//!
//! The pipeline (parse → gate → policy → print → verify) is independent of what the policy
//! does; the policy engine (`engine/`) is the production implementation. Whatever a policy adds
//! is printed and verified like client text. Identifiers it introduces must be quoted after
//! folding (`printer::quoted_ident`).

use sqlparser::ast::Statement;

use super::Refusal;
use crate::auth::identity::ActorContext;

/// A name in DDL that only PostgreSQL's parser could read (`ddl.rs`), for the policy's
/// scratch-object rules. Names are folded as PostgreSQL folds them (its tree holds them so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdlTarget<'a> {
    /// A relation (table, index or sequence) the statement creates, changes, drops, comments
    /// on or references: the rules DDL read by sqlparser gets (`verb` words the refusal).
    /// `creates`: `Some(temporary)` when the statement creates it.
    Relation { parts: &'a [String], verb: &'a str, creates: Option<bool> },
    /// A type, collation or operator class the statement names (`what` words the refusal).
    Uses { parts: &'a [String], what: &'a str },
}

/// Rewrites one parsed statement for a caller, in place, or refuses it.
pub trait StatementPolicy: Send + Sync {
    /// Checks PostgreSQL's own reading of the statement, before anything else; this is the only
    /// check a statement forwarded verbatim (sqlparser could not parse it, pg_query proved it
    /// data-free) gets.
    fn check_pg(&self, node: &pg_query::NodeEnum, actor: &ActorContext) -> Result<(), Refusal>;

    fn apply(&self, stmt: &mut Statement, actor: &ActorContext) -> Result<(), Refusal>;

    /// Checks one name of DDL sqlparser could not read, which is forwarded as PostgreSQL's own
    /// printer prints PostgreSQL's tree (`ddl.rs`): every name it holds is checked here.
    fn check_ddl_target(&self, target: &DdlTarget<'_>, actor: &ActorContext) -> Result<(), Refusal>;

    /// An UPDATE of the relation `target` (its name as the client wrote it, folded) assigns only
    /// part of `column`: an element, a slice or a field (`SET col[i] = …`, `rewrite/subscript.rs`).
    /// The statement is rewritten as if it assigned the whole column, so this must refuse unless
    /// no decision of the policy for this caller reads the column's new value (scope rules, WITH
    /// CHECK, tenant predicates, column or JSON-field masks).
    fn check_partial_assignment(&self, target: &[String], column: &str, actor: &ActorContext) -> Result<(), Refusal>;

    /// Checks PostgreSQL's reading of the text about to be forwarded (defence in depth against
    /// anything the sqlparser tree represented differently).
    fn check_output(&self, node: &pg_query::NodeEnum, actor: &ActorContext) -> Result<(), Refusal>;

    /// The version of the rules applied for `actor` (for audit events); cached with the rewrite,
    /// which the rewriter drops whenever the policy changes.
    fn version(&self, _actor: &ActorContext) -> Option<String> {
        None
    }
}

/// Test-only: leaves every statement as it is, so the pipeline's own properties (printing,
/// verification, limits) can be tested without a policy set.
#[cfg(test)]
pub(crate) struct PassThrough;

#[cfg(test)]
impl StatementPolicy for PassThrough {
    fn check_pg(&self, _node: &pg_query::NodeEnum, _actor: &ActorContext) -> Result<(), Refusal> {
        Ok(())
    }

    fn apply(&self, _stmt: &mut Statement, _actor: &ActorContext) -> Result<(), Refusal> {
        Ok(())
    }

    fn check_ddl_target(&self, _target: &DdlTarget<'_>, _actor: &ActorContext) -> Result<(), Refusal> {
        Ok(())
    }

    fn check_partial_assignment(
        &self,
        _target: &[String],
        _column: &str,
        _actor: &ActorContext,
    ) -> Result<(), Refusal> {
        Ok(())
    }

    fn check_output(&self, _node: &pg_query::NodeEnum, _actor: &ActorContext) -> Result<(), Refusal> {
        Ok(())
    }
}
