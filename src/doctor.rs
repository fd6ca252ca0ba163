//! `struere-proxy doctor`: the managed tables and the proxy's upstream role, checked against the
//! policy set and the live database.
//!
//! Facts are read from the catalog (`TableFacts`, `RoleFacts`); turning them into findings is
//! pure (`table_findings`, `role_findings`), so every rule is unit-tested without a server. The
//! role checks (`RoleAudit`) are shared with the server, which refuses production keys while the
//! upstream role has a hole (an ERROR finding) unless `allow_unsafe_upstream_role` is set.

use std::collections::BTreeMap;
use std::fmt;

use tokio_postgres::Client;

use crate::policy::{TableScope, TableSpec, Tables};

/// The values an environment column may hold.
pub const ENVIRONMENT_VALUES: [&str; 2] = ["development", "production"];

/// How bad a finding is. `Error`s make `doctor` exit 1; on the upstream role they are holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Ok,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// One line of the report: `LEVEL subject: what — fix: …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    /// A table (`public.entities`) or a role (`role struere_app`).
    pub subject: String,
    pub what: String,
    /// SQL to run or an action to take; `None` for OK findings.
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(subject: &str, what: impl Into<String>) -> Finding {
        Finding { level: Level::Ok, subject: subject.to_owned(), what: what.into(), fix: None }
    }

    pub fn warn(subject: &str, what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { level: Level::Warn, subject: subject.to_owned(), what: what.into(), fix: Some(fix.into()) }
    }

    pub fn error(subject: &str, what: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding { level: Level::Error, subject: subject.to_owned(), what: what.into(), fix: Some(fix.into()) }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.level.as_str(), self.subject, self.what)?;
        if let Some(fix) = &self.fix {
            write!(f, " — fix: {fix}")?;
        }
        Ok(())
    }
}

/// Every finding of one `doctor` run, in the order they were made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    pub fn has_errors(&self) -> bool {
        self.count(Level::Error) > 0
    }

    /// `summary: 2 errors, 3 warnings, 40 ok`.
    pub fn summary(&self) -> String {
        let plural = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        format!(
            "summary: {}, {}, {} ok",
            plural(self.count(Level::Error), "error", "errors"),
            plural(self.count(Level::Warn), "warning", "warnings"),
            self.count(Level::Ok)
        )
    }
}

/// `"name"`, with embedded quotes doubled: always correct, whatever the name (keywords, case).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// PostgreSQL keeps at most 63 bytes of a name (NAMEDATALEN - 1).
const MAX_NAME_BYTES: usize = 63;

/// `<base>_<suffix>` as PostgreSQL would store it: the base is cut (at a character boundary) so
/// the whole stays within 63 bytes and the suffix survives, as PostgreSQL's own generated names do.
pub fn object_name(base: &str, suffix: &str) -> String {
    let room = MAX_NAME_BYTES.saturating_sub(suffix.len() + 1);
    let mut end = base.len().min(room);
    while !base.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}_{suffix}", &base[..end])
}

/// One column of a table, as the checks need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnFacts {
    pub attnum: i16,
    /// `format_type`, e.g. `text`, `character varying(20)`.
    pub type_name: String,
    pub not_null: bool,
    /// A string type (type category `S`): text, varchar, char, citext, …
    pub string_like: bool,
    /// The labels, when the column's type is an enum.
    pub enum_labels: Option<Vec<String>>,
}

/// A CHECK constraint of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFacts {
    pub name: String,
    pub validated: bool,
    /// Attribute numbers of the columns it references.
    pub columns: Vec<i16>,
    /// `pg_get_constraintdef`, e.g. `CHECK ((environment = ANY (ARRAY['development'::text, …])))`.
    pub definition: String,
}

/// An index of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexFacts {
    pub name: String,
    /// Valid and ready (a failed `CREATE INDEX CONCURRENTLY` leaves an invalid one).
    pub valid: bool,
    pub partial: bool,
    pub btree: bool,
    /// Attribute numbers of the key columns, in order (0 for an expression).
    pub key_columns: Vec<i16>,
}

/// What the database holds about one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFacts {
    pub oid: u32,
    /// `pg_class.relkind`: `r` for a plain table.
    pub kind: char,
    pub owner: String,
    pub columns: BTreeMap<String, ColumnFacts>,
    pub checks: Vec<CheckFacts>,
    pub indexes: Vec<IndexFacts>,
}

/// How an environment column's values are restricted to development and production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restriction {
    /// An enum type whose labels are all environment names.
    Enum {
        type_name: String,
    },
    /// A CHECK constraint on the column alone naming both environments.
    Check {
        name: String,
        validated: bool,
    },
    None,
}

/// The best index for tenant lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexLead {
    /// Its first two key columns are the organization and environment columns (either order).
    Both(String),
    /// It leads with the organization column.
    OrganizationOnly(String),
    None,
}

const TABLE_SQL: &str = "\
SELECT c.oid, c.relkind, pg_get_userbyid(c.relowner) \
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2";

const COLUMNS_SQL: &str = "\
SELECT a.attname::text, a.attnum, format_type(a.atttypid, a.atttypmod), a.attnotnull, t.typcategory = 'S', \
       CASE WHEN t.typtype = 'e' THEN \
            ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder) END \
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped";

const CHECKS_SQL: &str = "\
SELECT conname::text, convalidated, coalesce(conkey, '{}'), pg_get_constraintdef(oid) \
FROM pg_constraint WHERE conrelid = $1 AND contype = 'c' ORDER BY conname";

const INDEXES_SQL: &str = "\
SELECT ic.relname::text, i.indisvalid AND i.indisready, i.indpred IS NOT NULL, am.amname = 'btree', \
       (i.indkey::int2[])[0:i.indnkeyatts - 1] \
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam \
WHERE i.indrelid = $1 ORDER BY ic.relname";

impl TableFacts {
    /// Read one table's facts; `None` when `schema.name` does not exist.
    pub async fn load(client: &Client, schema: &str, name: &str) -> Result<Option<TableFacts>, tokio_postgres::Error> {
        let Some(row) = client.query_opt(TABLE_SQL, &[&schema, &name]).await? else {
            return Ok(None);
        };
        let oid: u32 = row.try_get(0)?;
        let kind: i8 = row.try_get(1)?;
        let mut facts = TableFacts {
            oid,
            kind: char::from(kind as u8),
            owner: row.try_get(2)?,
            columns: BTreeMap::new(),
            checks: Vec::new(),
            indexes: Vec::new(),
        };
        for r in client.query(COLUMNS_SQL, &[&oid]).await? {
            let column = ColumnFacts {
                attnum: r.try_get(1)?,
                type_name: r.try_get(2)?,
                not_null: r.try_get(3)?,
                string_like: r.try_get(4)?,
                enum_labels: r.try_get(5)?,
            };
            facts.columns.insert(r.try_get(0)?, column);
        }
        for r in client.query(CHECKS_SQL, &[&oid]).await? {
            facts.checks.push(CheckFacts {
                name: r.try_get(0)?,
                validated: r.try_get(1)?,
                columns: r.try_get(2)?,
                definition: r.try_get(3)?,
            });
        }
        for r in client.query(INDEXES_SQL, &[&oid]).await? {
            facts.indexes.push(IndexFacts {
                name: r.try_get(0)?,
                valid: r.try_get(1)?,
                partial: r.try_get(2)?,
                btree: r.try_get(3)?,
                key_columns: r.try_get::<_, Option<Vec<i16>>>(4)?.unwrap_or_default(),
            });
        }
        Ok(Some(facts))
    }

    pub fn column(&self, name: &str) -> Option<&ColumnFacts> {
        self.columns.get(name)
    }

    /// How `column`'s values are restricted to the environment names (a validated CHECK wins
    /// over one that is NOT VALID).
    pub fn environment_restriction(&self, column: &str) -> Restriction {
        let Some(col) = self.column(column) else {
            return Restriction::None;
        };
        if let Some(labels) = &col.enum_labels
            && labels.iter().all(|l| ENVIRONMENT_VALUES.contains(&l.as_str()))
        {
            return Restriction::Enum { type_name: col.type_name.clone() };
        }
        let names_both = |def: &str| ENVIRONMENT_VALUES.iter().all(|v| def.contains(&format!("'{v}'")));
        let mut found = Restriction::None;
        for c in self.checks.iter().filter(|c| c.columns == [col.attnum] && names_both(&c.definition)) {
            found = Restriction::Check { name: c.name.clone(), validated: c.validated };
            if c.validated {
                break;
            }
        }
        found
    }

    /// The best valid, non-partial btree index for `(organization, environment)` lookups.
    pub fn leading_index(&self, organization: &str, environment: &str) -> IndexLead {
        let (Some(org), env) = (self.column(organization), self.column(environment)) else {
            return IndexLead::None;
        };
        let env = env.map(|c| c.attnum);
        let mut found = IndexLead::None;
        for ix in self.indexes.iter().filter(|i| i.valid && !i.partial && i.btree) {
            match ix.key_columns.as_slice() {
                [a, b, ..] if env.is_some_and(|e| (*a, *b) == (org.attnum, e) || (*a, *b) == (e, org.attnum)) => {
                    return IndexLead::Both(ix.name.clone());
                }
                [a, ..] if *a == org.attnum && found == IndexLead::None => {
                    found = IndexLead::OrganizationOnly(ix.name.clone());
                }
                _ => {}
            }
        }
        found
    }
}

/// `ALTER TABLE … ADD CONSTRAINT … CHECK (env IN ('development', 'production'))`: the CHECK
/// `migrate add-environment` adds and `doctor` suggests (a cast to text for non-text columns).
pub fn environment_check_expr(column: &str, text_typed: bool) -> String {
    let values = ENVIRONMENT_VALUES.map(|v| format!("'{v}'")).join(", ");
    let col = quote_ident(column);
    if text_typed { format!("{col} IN ({values})") } else { format!("{col}::text IN ({values})") }
}

/// Findings for one managed table (`facts` is `None` when it does not exist). Pure.
pub fn table_findings(spec: &TableSpec, facts: Option<&TableFacts>) -> Vec<Finding> {
    let subject = format!("{}.{}", spec.schema, spec.name);
    let table = qualified(&spec.schema, &spec.name);
    let Some(facts) = facts else {
        return vec![Finding::error(
            &subject,
            "the policy names this table but it does not exist",
            "create it, or remove it from tables.toml",
        )];
    };
    if facts.kind != 'r' {
        return vec![Finding::error(
            &subject,
            format!("is not a plain table (relkind {})", facts.kind),
            "managed tables must be plain tables: change tables.toml or the schema",
        )];
    }
    let mut out = Vec::new();
    for (role, col) in [("id", Some(&spec.id_column)), ("type", spec.type_column.as_ref())] {
        if let Some(col) = col
            && facts.column(col).is_none()
        {
            out.push(Finding::error(
                &subject,
                format!("{role} column {col:?} is missing (the proxy refuses to start)"),
                format!("add the column, or fix {role}_column in tables.toml"),
            ));
        }
    }
    if let Some(org) = &spec.organization_column {
        out.push(match facts.column(org) {
            None => Finding::error(
                &subject,
                format!("organization column {org:?} is missing"),
                format!(
                    "ALTER TABLE {table} ADD COLUMN {} text; fill it; then ALTER TABLE {table} ALTER COLUMN {} SET NOT NULL",
                    quote_ident(org),
                    quote_ident(org)
                ),
            ),
            Some(c) if !c.not_null => Finding::error(
                &subject,
                format!("organization column {org:?} allows NULL (rows without a tenant)"),
                format!("fill the NULL rows, then ALTER TABLE {table} ALTER COLUMN {} SET NOT NULL", quote_ident(org)),
            ),
            Some(_) => Finding::ok(&subject, format!("organization column {org:?} is NOT NULL")),
        });
    }
    if spec.scope != TableScope::Environment {
        return out;
    }
    let Some(env) = &spec.environment_column else {
        out.push(Finding::error(
            &subject,
            "is environment-scoped but has no environment column in the policy",
            "set environment_column in tables.toml",
        ));
        return out;
    };
    let migrate = format!("struere-proxy migrate add-environment --table {}.{}", spec.schema, spec.name);
    let Some(env_col) = facts.column(env) else {
        out.push(Finding::error(&subject, format!("environment column {env:?} is missing"), migrate));
        return out;
    };
    out.push(if env_col.not_null {
        Finding::ok(&subject, format!("environment column {env:?} is NOT NULL"))
    } else {
        Finding::error(&subject, format!("environment column {env:?} allows NULL (rows no environment sees)"), migrate)
    });
    let check_name = object_name(&format!("{}_{env}", spec.name), "check");
    out.push(match facts.environment_restriction(env) {
        Restriction::Enum { type_name } => {
            Finding::ok(&subject, format!("environment values restricted by enum type {type_name}"))
        }
        Restriction::Check { name, validated: true } => {
            Finding::ok(&subject, format!("environment values restricted by CHECK {name}"))
        }
        Restriction::Check { name, validated: false } => Finding::warn(
            &subject,
            format!("CHECK {name} on the environment is NOT VALID (existing rows are unchecked)"),
            format!("ALTER TABLE {table} VALIDATE CONSTRAINT {}", quote_ident(&name)),
        ),
        Restriction::None => Finding::warn(
            &subject,
            format!("no CHECK or enum restricts environment column {env:?} to development/production"),
            format!(
                "ALTER TABLE {table} ADD CONSTRAINT {c} CHECK ({}) NOT VALID; ALTER TABLE {table} VALIDATE CONSTRAINT {c}",
                environment_check_expr(env, env_col.string_like),
                c = quote_ident(&check_name),
            ),
        ),
    });
    if let Some(org) = &spec.organization_column
        && facts.column(org).is_some()
    {
        out.push(match facts.leading_index(org, env) {
            IndexLead::Both(name) => Finding::ok(&subject, format!("index {name} leads with ({org}, {env})")),
            IndexLead::OrganizationOnly(name) => Finding::ok(&subject, format!("index {name} leads with {org}")),
            IndexLead::None => Finding::warn(
                &subject,
                format!("no index leads with ({org}, {env}): every tenant's statements scan the whole table"),
                format!(
                    "CREATE INDEX CONCURRENTLY {} ON {table} ({}, {})",
                    quote_ident(&object_name(&format!("{}_{org}_{env}", spec.name), "idx")),
                    quote_ident(org),
                    quote_ident(env)
                ),
            ),
        });
    }
    out
}

/// Check every managed table of the policy set (in name order).
pub async fn check_tables(client: &Client, tables: &Tables) -> Result<Vec<Finding>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for spec in tables.by_name.values() {
        let facts = TableFacts::load(client, &spec.schema, &spec.name).await?;
        out.extend(table_findings(spec, facts.as_ref()));
    }
    Ok(out)
}

/// A managed table the role can act as the owner of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedTable {
    /// `schema.name`.
    pub table: String,
    pub owner: String,
    /// The role is the owner itself (else it is a member of the owner role).
    pub direct: bool,
}

/// What the database says about the upstream role.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoleFacts {
    pub exists: bool,
    pub superuser: bool,
    pub bypass_rls: bool,
    pub create_role: bool,
    /// Managed tables it owns or whose owner it is a member of.
    pub owned: Vec<OwnedTable>,
    /// Superuser or BYPASSRLS roles it is a member of: (name, superuser, bypassrls).
    pub privileged_memberships: Vec<(String, bool, bool)>,
    /// Predefined roles of `PREDEFINED_HOLES` and `PREDEFINED_WARNINGS` it is a member of.
    pub predefined_memberships: Vec<String>,
    pub database: String,
    pub create_on_database: bool,
    pub temp_on_database: bool,
    /// `None` when there is no schema `public`.
    pub create_on_public: Option<bool>,
}

const ROLE_SQL: &str = "\
SELECT r.oid, r.rolsuper, r.rolbypassrls, r.rolcreaterole, current_database()::text, \
       has_database_privilege(r.oid, current_database(), 'CREATE'), \
       has_database_privilege(r.oid, current_database(), 'TEMP'), \
       CASE WHEN to_regnamespace('public') IS NOT NULL THEN has_schema_privilege(r.oid, 'public', 'CREATE') END \
FROM pg_roles r WHERE r.rolname = $1";

const OWNED_SQL: &str = "\
SELECT m.s, m.t, pg_get_userbyid(c.relowner)::text, c.relowner = $1 \
FROM unnest($2::text[], $3::text[]) AS m(s, t) \
JOIN pg_namespace n ON n.nspname = m.s JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = m.t \
WHERE pg_has_role($1, c.relowner, 'MEMBER') ORDER BY 1, 2";

const MEMBERSHIPS_SQL: &str = "\
SELECT o.rolname::text, o.rolsuper, o.rolbypassrls FROM pg_roles o \
WHERE o.oid <> $1 AND (o.rolsuper OR o.rolbypassrls) AND pg_has_role($1, o.oid, 'MEMBER') ORDER BY 1";

/// Predefined roles that reach past the proxy: every table's rows (the proxy's own schema
/// included), the server's files and programs.
const PREDEFINED_HOLES: [&str; 5] = [
    "pg_read_all_data",
    "pg_write_all_data",
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_execute_server_program",
];
/// Predefined roles that see or touch other sessions (query texts of every tenant, signals).
const PREDEFINED_WARNINGS: [&str; 4] = ["pg_monitor", "pg_read_all_stats", "pg_read_all_settings", "pg_signal_backend"];

const PREDEFINED_SQL: &str = "\
SELECT o.rolname::text FROM pg_roles o WHERE o.rolname = ANY($2::text[]) AND pg_has_role($1::oid, o.oid, 'MEMBER') ORDER BY 1";

impl RoleFacts {
    pub async fn load(client: &Client, role: &str, tables: &Tables) -> Result<RoleFacts, tokio_postgres::Error> {
        let Some(row) = client.query_opt(ROLE_SQL, &[&role]).await? else {
            return Ok(RoleFacts::default());
        };
        let oid: u32 = row.try_get(0)?;
        let mut facts = RoleFacts {
            exists: true,
            superuser: row.try_get(1)?,
            bypass_rls: row.try_get(2)?,
            create_role: row.try_get(3)?,
            database: row.try_get(4)?,
            create_on_database: row.try_get(5)?,
            temp_on_database: row.try_get(6)?,
            create_on_public: row.try_get(7)?,
            ..RoleFacts::default()
        };
        let schemas: Vec<&str> = tables.by_name.values().map(|t| t.schema.as_str()).collect();
        let names: Vec<&str> = tables.by_name.values().map(|t| t.name.as_str()).collect();
        for r in client.query(OWNED_SQL, &[&oid, &schemas, &names]).await? {
            let (schema, name): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            facts.owned.push(OwnedTable {
                table: format!("{schema}.{name}"),
                owner: r.try_get(2)?,
                direct: r.try_get(3)?,
            });
        }
        for r in client.query(MEMBERSHIPS_SQL, &[&oid]).await? {
            facts.privileged_memberships.push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
        }
        let predefined: Vec<&str> = PREDEFINED_HOLES.iter().chain(&PREDEFINED_WARNINGS).copied().collect();
        for r in client.query(PREDEFINED_SQL, &[&oid, &predefined]).await? {
            facts.predefined_memberships.push(r.try_get(0)?);
        }
        Ok(facts)
    }
}

/// Findings for the upstream role. ERRORs are holes: ways for statements the proxy forwards to
/// reach past its rewrites (a superuser or BYPASSRLS role, the owner of a managed table, or a
/// member of one of those). Pure.
pub fn role_findings(role: &str, facts: &RoleFacts) -> Vec<Finding> {
    let subject = format!("role {role}");
    let r = quote_ident(role);
    if !facts.exists {
        return vec![Finding::error(
            &subject,
            "the upstream role does not exist",
            "create a least-privilege login role (NOSUPERUSER NOBYPASSRLS, DML grants on the managed tables) \
             and name it in upstream",
        )];
    }
    let mut out = Vec::new();
    out.push(if facts.superuser {
        Finding::error(
            &subject,
            "is a superuser: privileges, row security and the proxy's own schema mean nothing to it",
            format!(
                "point upstream at a least-privilege role (CREATE ROLE … LOGIN NOSUPERUSER NOBYPASSRLS; \
                 GRANT SELECT, INSERT, UPDATE, DELETE on the managed tables), or ALTER ROLE {r} NOSUPERUSER"
            ),
        )
    } else {
        Finding::ok(&subject, "is not a superuser")
    });
    // A superuser has every attribute and privilege and is a member of every role: what it
    // owns itself is the only other thing worth listing.
    if !facts.superuser {
        out.push(if facts.bypass_rls {
            Finding::error(
                &subject,
                "has BYPASSRLS: row-level security policies do not apply to it",
                format!("ALTER ROLE {r} NOBYPASSRLS"),
            )
        } else {
            Finding::ok(&subject, "does not bypass row-level security")
        });
    }
    let owned: Vec<&OwnedTable> = facts.owned.iter().filter(|o| o.direct || !facts.superuser).collect();
    for o in &owned {
        out.push(if o.direct {
            Finding::error(
                &subject,
                format!("owns managed table {}: an owner skips grants and can alter or drop it", o.table),
                format!("ALTER TABLE {} OWNER TO <the migration role>", quote_table(&o.table)),
            )
        } else {
            Finding::error(
                &subject,
                format!("is a member of {:?}, which owns managed table {}", o.owner, o.table),
                format!("REVOKE {} FROM {r}", quote_ident(&o.owner)),
            )
        });
    }
    if owned.is_empty() && !facts.superuser {
        out.push(Finding::ok(&subject, "owns no managed table, directly or through a role"));
    }
    if !facts.superuser {
        for (name, superuser, bypass) in &facts.privileged_memberships {
            let kind = match (superuser, bypass) {
                (true, true) => "a superuser role with BYPASSRLS",
                (true, false) => "a superuser role",
                _ => "a BYPASSRLS role",
            };
            out.push(Finding::error(
                &subject,
                format!("is a member of {name:?}, {kind}"),
                format!("REVOKE {} FROM {r}", quote_ident(name)),
            ));
        }
        if facts.privileged_memberships.is_empty() {
            out.push(Finding::ok(&subject, "is a member of no superuser or BYPASSRLS role"));
        }
        let mut holes = 0;
        for name in &facts.predefined_memberships {
            let fix = format!("REVOKE {name} FROM {r}");
            if PREDEFINED_HOLES.contains(&name.as_str()) {
                holes += 1;
                out.push(Finding::error(
                    &subject,
                    format!("is a member of {name}: it reaches every table's rows or the server's files"),
                    fix,
                ));
            } else {
                out.push(Finding::warn(
                    &subject,
                    format!("is a member of {name}: it sees or signals other sessions"),
                    fix,
                ));
            }
        }
        if holes == 0 {
            out.push(Finding::ok(&subject, "is a member of no data- or file-reaching predefined role"));
        }
    }
    if facts.superuser {
        return out;
    }
    if facts.create_role {
        out.push(Finding::warn(
            &subject,
            "has CREATEROLE: it can create roles and grant itself theirs",
            format!("ALTER ROLE {r} NOCREATEROLE"),
        ));
    }
    let db = quote_ident(&facts.database);
    if facts.create_on_database {
        out.push(Finding::warn(
            &subject,
            format!("may CREATE schemas in database {:?}", facts.database),
            format!("REVOKE CREATE ON DATABASE {db} FROM {r}"),
        ));
    }
    if facts.create_on_public == Some(true) {
        out.push(Finding::warn(
            &subject,
            "may CREATE in schema public (needed only if development roles with unmanaged_tables create objects there)",
            format!("REVOKE CREATE ON SCHEMA public FROM PUBLIC, {r}"),
        ));
    }
    if facts.temp_on_database {
        out.push(Finding::warn(
            &subject,
            "may create temporary tables (needed only if development roles with unmanaged_tables use them)",
            format!("REVOKE TEMP ON DATABASE {db} FROM PUBLIC, {r}"),
        ));
    }
    out
}

/// `schema.name` (as `OwnedTable::table` spells it) quoted.
fn quote_table(table: &str) -> String {
    match table.split_once('.') {
        Some((schema, name)) => qualified(schema, name),
        None => quote_ident(table),
    }
}

/// The upstream role's audit: what `doctor` reports about it, and what the server consults
/// before it lets a production key in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleAudit {
    pub role: String,
    pub findings: Vec<Finding>,
}

impl RoleAudit {
    pub async fn run(client: &Client, role: &str, tables: &Tables) -> Result<RoleAudit, tokio_postgres::Error> {
        let facts = RoleFacts::load(client, role, tables).await?;
        Ok(RoleAudit { role: role.to_owned(), findings: role_findings(role, &facts) })
    }

    /// The ERROR findings: while there is one, production keys are refused.
    pub fn holes(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| f.level == Level::Error)
    }

    pub fn has_holes(&self) -> bool {
        self.holes().next().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(attnum: i16, not_null: bool) -> ColumnFacts {
        ColumnFacts { attnum, type_name: "text".into(), not_null, string_like: true, enum_labels: None }
    }

    fn facts(columns: &[(&str, ColumnFacts)]) -> TableFacts {
        TableFacts {
            oid: 1,
            kind: 'r',
            owner: "owner".into(),
            columns: columns.iter().map(|(n, c)| ((*n).to_owned(), c.clone())).collect(),
            checks: Vec::new(),
            indexes: Vec::new(),
        }
    }

    fn index(name: &str, key_columns: &[i16]) -> IndexFacts {
        IndexFacts { name: name.into(), valid: true, partial: false, btree: true, key_columns: key_columns.to_vec() }
    }

    fn spec(scope: TableScope) -> TableSpec {
        TableSpec {
            schema: "public".into(),
            name: "things".into(),
            scope,
            organization_column: Some("organization_id".into()),
            environment_column: (scope == TableScope::Environment).then(|| "environment".into()),
            type_column: None,
            id_column: "id".into(),
        }
    }

    fn clean() -> TableFacts {
        let mut f = facts(&[("id", col(1, true)), ("organization_id", col(2, true)), ("environment", col(3, true))]);
        f.checks.push(CheckFacts {
            name: "things_environment_check".into(),
            validated: true,
            columns: vec![3],
            definition: "CHECK ((environment = ANY (ARRAY['development'::text, 'production'::text])))".into(),
        });
        f.indexes.push(index("things_org_env", &[2, 3]));
        f
    }

    fn levels(findings: &[Finding]) -> Vec<(Level, String)> {
        findings.iter().map(|f| (f.level, f.what.clone())).collect()
    }

    #[test]
    fn finding_lines() {
        let f = Finding::error("public.t", "environment column \"environment\" allows NULL", "do X");
        assert_eq!(f.to_string(), "ERROR public.t: environment column \"environment\" allows NULL — fix: do X");
        assert_eq!(Finding::ok("role app", "is not a superuser").to_string(), "OK role app: is not a superuser");
        let report = Report { findings: vec![f.clone(), f, Finding::warn("t", "w", "x"), Finding::ok("t", "o")] };
        assert_eq!(report.summary(), "summary: 2 errors, 1 warning, 1 ok");
        assert!(report.has_errors());
        assert!(!Report::default().has_errors());
    }

    #[test]
    fn names_are_quoted_and_kept_within_63_bytes() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(qualified("public", "order"), "\"public\".\"order\"");
        assert_eq!(object_name("t_environment", "check"), "t_environment_check");
        let long = "é".repeat(40);
        let name = object_name(&long, "idx");
        assert!(name.len() <= 63 && name.ends_with("_idx"), "{name} ({} bytes)", name.len());
        assert!(name.starts_with("éé"));
    }

    #[test]
    fn clean_environment_table_is_all_ok() {
        let findings = table_findings(&spec(TableScope::Environment), Some(&clean()));
        assert!(findings.iter().all(|f| f.level == Level::Ok), "{findings:#?}");
        assert_eq!(findings.len(), 4, "{findings:#?}");
    }

    #[test]
    fn nullable_unchecked_unindexed_table() {
        let f = facts(&[("id", col(1, true)), ("organization_id", col(2, false)), ("environment", col(3, false))]);
        let findings = table_findings(&spec(TableScope::Environment), Some(&f));
        let got = levels(&findings);
        assert_eq!(got.len(), 4, "{findings:#?}");
        assert_eq!(got[0].0, Level::Error);
        assert!(got[0].1.contains("organization column \"organization_id\" allows NULL"));
        assert_eq!(got[1].0, Level::Error);
        assert!(got[1].1.contains("environment column \"environment\" allows NULL"));
        assert_eq!(got[2].0, Level::Warn);
        assert!(got[2].1.contains("no CHECK or enum"));
        assert_eq!(got[3].0, Level::Warn);
        assert!(got[3].1.contains("no index leads with (organization_id, environment)"));
        let fix = findings[3].fix.as_deref().unwrap_or_default();
        assert_eq!(
            fix,
            "CREATE INDEX CONCURRENTLY \"things_organization_id_environment_idx\" ON \"public\".\"things\" \
             (\"organization_id\", \"environment\")"
        );
        assert!(
            findings[1].fix.as_deref().unwrap_or_default().contains("migrate add-environment --table public.things")
        );
    }

    #[test]
    fn missing_table_and_columns() {
        let findings = table_findings(&spec(TableScope::Environment), None);
        assert_eq!(levels(&findings).len(), 1);
        assert!(findings[0].what.contains("does not exist") && findings[0].level == Level::Error);
        let f = facts(&[("id", col(1, true)), ("organization_id", col(2, true))]);
        let findings = table_findings(&spec(TableScope::Environment), Some(&f));
        assert!(
            findings
                .iter()
                .any(|x| x.level == Level::Error && x.what.contains("environment column \"environment\" is missing")),
            "{findings:#?}"
        );
        let mut view = clean();
        view.kind = 'v';
        assert_eq!(table_findings(&spec(TableScope::Environment), Some(&view))[0].level, Level::Error);
    }

    #[test]
    fn shared_tables_need_only_their_organization_column() {
        let f = facts(&[("id", col(1, true)), ("organization_id", col(2, false))]);
        let findings = table_findings(&spec(TableScope::Shared), Some(&f));
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].level, Level::Error);
        let mut no_org = spec(TableScope::Shared);
        no_org.organization_column = None;
        assert!(table_findings(&no_org, Some(&f)).is_empty());
    }

    #[test]
    fn restriction_by_check_or_enum() {
        let mut f = clean();
        assert_eq!(
            f.environment_restriction("environment"),
            Restriction::Check { name: "things_environment_check".into(), validated: true }
        );
        f.checks[0].validated = false;
        let findings = table_findings(&spec(TableScope::Environment), Some(&f));
        assert!(findings.iter().any(|x| x.level == Level::Warn && x.what.contains("NOT VALID")), "{findings:#?}");
        // A check on other columns, or naming only one environment, does not count.
        f.checks[0].validated = true;
        f.checks[0].columns = vec![2, 3];
        assert_eq!(f.environment_restriction("environment"), Restriction::None);
        f.checks[0].columns = vec![3];
        f.checks[0].definition = "CHECK ((environment = 'development'::text))".into();
        assert_eq!(f.environment_restriction("environment"), Restriction::None);
        let mut e = col(3, true);
        e.type_name = "env".into();
        e.enum_labels = Some(vec!["development".into(), "production".into()]);
        f.columns.insert("environment".into(), e.clone());
        assert_eq!(f.environment_restriction("environment"), Restriction::Enum { type_name: "env".into() });
        e.enum_labels = Some(vec!["development".into(), "staging".into()]);
        f.columns.insert("environment".into(), e);
        assert_eq!(f.environment_restriction("environment"), Restriction::None);
    }

    #[test]
    fn leading_index_in_either_order() {
        let mut f = clean();
        f.indexes = vec![index("org_only", &[2]), index("env_org", &[3, 2, 1])];
        assert_eq!(f.leading_index("organization_id", "environment"), IndexLead::Both("env_org".into()));
        f.indexes = vec![index("id_org_env", &[1, 2, 3]), index("org_created", &[2, 0])];
        assert_eq!(
            f.leading_index("organization_id", "environment"),
            IndexLead::OrganizationOnly("org_created".into())
        );
        let mut invalid = index("invalid", &[2, 3]);
        invalid.valid = false;
        let mut partial = index("partial", &[2, 3]);
        partial.partial = true;
        let mut gin = index("gin", &[2, 3]);
        gin.btree = false;
        f.indexes = vec![invalid, partial, gin, index("id_org_env", &[1, 2, 3])];
        assert_eq!(f.leading_index("organization_id", "environment"), IndexLead::None);
    }

    fn least_privilege() -> RoleFacts {
        RoleFacts { exists: true, database: "app".into(), ..RoleFacts::default() }
    }

    #[test]
    fn least_privilege_role_has_no_holes() {
        let findings = role_findings("app", &least_privilege());
        assert!(findings.iter().all(|f| f.level == Level::Ok), "{findings:#?}");
        let mut f = least_privilege();
        f.create_on_database = true;
        f.temp_on_database = true;
        f.create_on_public = Some(true);
        f.create_role = true;
        let findings = role_findings("app", &f);
        assert_eq!(findings.iter().filter(|x| x.level == Level::Warn).count(), 4, "{findings:#?}");
        assert!(findings.iter().all(|x| x.level != Level::Error));
    }

    #[test]
    fn data_and_file_reaching_predefined_roles_are_holes() {
        let mut f = least_privilege();
        f.predefined_memberships = vec!["pg_monitor".into(), "pg_read_all_data".into()];
        let findings = role_findings("app", &f);
        let errors: Vec<_> = findings.iter().filter(|x| x.level == Level::Error).collect();
        assert_eq!(errors.len(), 1, "{findings:#?}");
        assert!(errors[0].what.contains("pg_read_all_data"));
        assert!(errors[0].fix.as_deref().is_some_and(|f| f.starts_with("REVOKE pg_read_all_data FROM")));
        assert!(findings.iter().any(|x| x.level == Level::Warn && x.what.contains("pg_monitor")));
    }

    #[test]
    fn holes_are_errors() {
        let mut f = least_privilege();
        f.bypass_rls = true;
        f.owned = vec![
            OwnedTable { table: "public.a".into(), owner: "app".into(), direct: true },
            OwnedTable { table: "public.b".into(), owner: "owners".into(), direct: false },
        ];
        f.privileged_memberships = vec![("admins".into(), true, false)];
        let audit = RoleAudit { role: "app".into(), findings: role_findings("app", &f) };
        let holes: Vec<String> = audit.holes().map(|h| h.to_string()).collect();
        assert_eq!(holes.len(), 4, "{holes:#?}");
        assert!(holes[0].contains("BYPASSRLS") && holes[0].contains("ALTER ROLE \"app\" NOBYPASSRLS"));
        assert!(holes[1].contains("owns managed table public.a") && holes[1].contains("ALTER TABLE \"public\".\"a\""));
        assert!(holes[2].contains("member of \"owners\"") && holes[2].contains("REVOKE \"owners\" FROM \"app\""));
        assert!(holes[3].contains("\"admins\", a superuser role"));
        assert!(audit.has_holes());
    }

    #[test]
    fn superuser_reports_itself_and_what_it_owns() {
        let mut f = least_privilege();
        f.superuser = true;
        f.owned = vec![
            OwnedTable { table: "public.a".into(), owner: "postgres".into(), direct: true },
            OwnedTable { table: "public.b".into(), owner: "other".into(), direct: false },
        ];
        f.privileged_memberships = vec![("other_superuser".into(), true, false)];
        (f.bypass_rls, f.create_role, f.create_on_database, f.temp_on_database) = (true, true, true, true);
        let findings = role_findings("postgres", &f);
        assert_eq!(findings.len(), 2, "nothing but the superuser and what it owns: {findings:#?}");
        let errors: Vec<&Finding> = findings.iter().filter(|x| x.level == Level::Error).collect();
        assert_eq!(errors.len(), 2, "{findings:#?}");
        assert!(errors[0].what.contains("is a superuser"));
        assert!(errors[1].what.contains("owns managed table public.a"));
        assert_eq!(role_findings("ghost", &RoleFacts::default())[0].level, Level::Error);
    }
}
