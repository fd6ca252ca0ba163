//! The TOML files as written, mirrored field for field (with spans for `file:line` errors).
//! Nothing here is validated beyond TOML types; `compile.rs` turns it into the model.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// `policies/tables.toml`: the managed tables, shared by both environments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTables {
    #[serde(default)]
    pub tables: BTreeMap<Spanned<String>, RawTable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTable {
    /// `environment` or `shared`.
    pub scope: Spanned<String>,
    pub schema: Option<Spanned<String>>,
    /// Column name, or `false` for a shared table with no organization boundary.
    pub organization_column: Option<Spanned<ColumnOrOff>>,
    pub environment_column: Option<Spanned<String>>,
    pub type_column: Option<Spanned<String>>,
    pub id_column: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ColumnOrOff {
    Column(String),
    Off(bool),
}

/// `policies/<environment>.toml`: the roles of one environment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicyFile {
    #[serde(default)]
    pub roles: BTreeMap<Spanned<String>, RawRole>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRole {
    pub description: Option<String>,
    /// Development only: scratch tables the policy does not name, including DDL on them.
    #[serde(default)]
    pub unmanaged_tables: Option<Spanned<bool>>,
    #[serde(default)]
    pub resources: Vec<RawGrant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    /// `table`, `table:type`, or `*` (every managed resource).
    pub resource: Spanned<String>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    /// Visible fields: `"column"`, `"column.json.path"`, `"*"`, or a masked field table.
    #[serde(default)]
    pub fields: Vec<Spanned<RawField>>,
    /// Row scope rules, combined with OR.
    #[serde(default)]
    pub scope: Vec<Spanned<RawScope>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawField {
    Visible(String),
    Masked(RawMaskedField),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMaskedField {
    pub field: String,
    /// `hide`, `redact`, `partial`, `hash`.
    pub mode: String,
    /// `redact`: the replacement text (default `***`).
    pub text: Option<String>,
    /// `partial`: how many trailing characters stay visible.
    pub keep: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScope {
    /// The row's column or JSON path (`data.teacherId`).
    pub field: String,
    /// Field match: `eq`, `neq`, `in`, `contains`.
    pub op: Option<String>,
    /// Field match against the caller: `actor.id`, `actor.organization`, `actor.type`.
    pub value: Option<String>,
    /// Field match against a literal (string, number, boolean, or an array for `in`).
    pub literal: Option<toml::Value>,
    /// Relation: the field equals `target` of rows of this resource that are in scope for the caller.
    pub in_scope_of: Option<String>,
    /// With `in_scope_of`: the other resource's field (default: its id column).
    pub target: Option<String>,
    /// Relation through a link table that ties the row to the caller.
    pub via: Option<RawVia>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVia {
    /// The link table (managed; confined to the caller's environment and organization).
    pub table: String,
    /// The link table's column that must equal the row's `field`.
    pub column: String,
    /// The link table's column that must equal `actor`.
    pub actor_column: String,
    /// `actor.id` (default), `actor.organization` or `actor.type`.
    pub actor: Option<String>,
    /// Extra equality conditions on the link table (`{ relation_type = "guardian_of" }`).
    #[serde(default)]
    pub filter: BTreeMap<String, toml::Value>,
}
