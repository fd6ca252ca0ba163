//! The policy hook between the gate and the printer.

use sqlparser::ast::Statement;

use super::Refusal;
use crate::auth::identity::ActorContext;

/// Applies the caller's policy to one statement, in place, or refuses it.
///
/// The policy engine plugs in here: it will add tenant/environment predicates, rewrite table
/// references and refuse what the caller's roles do not allow. It runs after the gate and
/// before the printer, so whatever it adds is printed and verified like client text.
/// Identifiers it introduces must come from `printer::quoted_ident`, which folds and quotes
/// them. Today it is the identity.
pub(crate) fn apply_policy(_stmt: &mut Statement, _actor: &ActorContext) -> Result<(), Refusal> {
    Ok(())
}
