//! The compiled policy model: what the rewriter consults. Built only by `compile.rs`, so every
//! value here has been validated.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::auth::identity::Environment;

/// Whether a table's rows belong to one environment or to both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableScope {
    /// Every read and write is confined to the caller's environment and organization.
    Environment,
    /// No environment filter; the organization boundary still applies when the table has one.
    Shared,
}

/// A managed table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    pub schema: String,
    pub name: String,
    pub scope: TableScope,
    pub organization_column: Option<String>,
    pub environment_column: Option<String>,
    pub type_column: Option<String>,
    pub id_column: String,
}

/// `table` or `table:type`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId {
    pub table: String,
    pub kind: Option<String>,
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Some(k) => write!(f, "{} (type {k})", self.table),
            None => f.write_str(&self.table),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Select,
    Insert,
    Update,
    Delete,
}

impl Action {
    pub const ALL: [Action; 4] = [Action::Select, Action::Insert, Action::Update, Action::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Select => "select",
            Action::Insert => "insert",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A column, or a path inside a jsonb column (`data.teacherId` → column `data`, path `[teacherId]`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FieldRef {
    pub column: String,
    pub path: Vec<String>,
}

impl fmt::Display for FieldRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.column)?;
        for p in &self.path {
            write!(f, ".{p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeOp {
    Eq,
    Neq,
    In,
    Contains,
}

/// A value an actor-dependent rule compares with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorAttr {
    Id,
    Organization,
    Type,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
    List(Vec<Literal>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ScopeValue {
    Actor(ActorAttr),
    Literal(Literal),
}

/// One row-level rule. Several rules for one role and resource combine with OR.
#[derive(Debug, Clone, PartialEq)]
pub enum ScopeRule {
    /// `field op value`.
    Match { field: FieldRef, op: ScopeOp, value: ScopeValue },
    /// `field` equals `target` of a row of `resource` that is in scope for the caller.
    InScopeOf { field: FieldRef, resource: ResourceId, target: FieldRef },
    /// `field` equals `link.column` of a row of the link table whose `actor_column` equals the actor
    /// attribute and that matches `filter`.
    Via { field: FieldRef, link: Link },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub table: String,
    pub column: String,
    pub actor_column: String,
    pub actor: ActorAttr,
    pub filter: Vec<(String, Literal)>,
}

/// How a visible-but-masked field is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskMode {
    /// NULL.
    Hide,
    /// A fixed text.
    Redact(String),
    /// Only the last `n` characters.
    Partial(u32),
    /// Hex SHA-256 of the value.
    Hash,
}

/// Which fields of a resource a role sees, and how. An allowlist: what is not listed is hidden.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldAccess {
    /// `*`: every column and JSON field is visible (unless masked below).
    pub all: bool,
    /// Visible fields (unmasked).
    pub visible: Vec<FieldRef>,
    /// Visible through a mask.
    pub masked: Vec<(FieldRef, MaskMode)>,
}

/// What one role says about one resource (or `*`).
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// `None`: every managed resource.
    pub resource: Option<ResourceId>,
    pub allow: Vec<Action>,
    pub deny: Vec<Action>,
    pub fields: FieldAccess,
    pub scope: Vec<ScopeRule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Role {
    pub name: String,
    pub unmanaged_tables: bool,
    pub grants: Vec<Grant>,
}

/// The managed tables, by name (schema-qualified lookups go through `table`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tables {
    pub by_name: BTreeMap<String, TableSpec>,
}

impl Tables {
    pub fn table(&self, schema: &str, name: &str) -> Option<&TableSpec> {
        self.by_name.get(name).filter(|t| t.schema == schema)
    }
}

/// Where a policy set in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyOrigin {
    /// Compiled from local files (`policy check`, `explain --local`, tests).
    Files,
    /// The environment's deployed bundle of this version (`struere.policy_versions`).
    Deployed { version: i32 },
    /// Nothing is deployed for the environment: its keys are refused (fail closed).
    NotDeployed,
}

/// The roles of one environment, over its managed tables.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySet {
    pub environment: Environment,
    pub tables: Arc<Tables>,
    pub roles: BTreeMap<String, Role>,
    /// What audit events record: `v<N>` for a deployed bundle, `local:<hash>` for files.
    pub version: String,
    /// Hex SHA-256 (first 8 bytes) of the files this set was compiled from.
    pub hash: String,
    pub origin: PolicyOrigin,
    /// Tables the *other* environment's deployed policy manages and this one does not. They are
    /// never treated as unmanaged (scratch) tables here: a development bundle that stopped
    /// managing a table must not open production's rows of it to development keys.
    pub managed_elsewhere: Arc<Tables>,
}

impl PolicySet {
    /// The set in force for an environment nothing was deployed to: no roles, no tables.
    pub fn not_deployed(environment: Environment) -> PolicySet {
        PolicySet {
            environment,
            tables: Arc::default(),
            roles: BTreeMap::new(),
            version: "none".to_owned(),
            hash: String::new(),
            origin: PolicyOrigin::NotDeployed,
            managed_elsewhere: Arc::default(),
        }
    }

    /// Whether this environment's keys may be served at all.
    pub fn is_deployed(&self) -> bool {
        self.origin != PolicyOrigin::NotDeployed
    }

    /// The managed table `schema.name` in this environment's policy, or `Err` when only the
    /// other environment's policy manages it.
    pub fn managed(&self, schema: &str, name: &str) -> Result<Option<&TableSpec>, String> {
        if let Some(spec) = self.tables.table(schema, name) {
            return Ok(Some(spec));
        }
        if self.managed_elsewhere.table(schema, name).is_some() {
            return Err(format!(
                "{schema}.{name} is managed by the other environment's deployed policy but not by {}'s; deploy a \
                 policy set that manages it here too",
                self.environment.as_str()
            ));
        }
        Ok(None)
    }
}
