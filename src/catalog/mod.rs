//! What the upstream database holds, as far as the rewriter needs to know: relations and their
//! columns, and which functions and operators are leakproof or otherwise callable.
//!
//! A `CatalogSnapshot` is plain data, read once (`load`) and again after DDL the proxy forwards;
//! validation against the policy (`check_policy`) is a pure function over it.

pub mod demo;

use std::collections::{BTreeMap, BTreeSet};

use crate::policy::{TableScope, Tables};

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// `format_type` of the column, e.g. `text`, `jsonb`, `timestamp with time zone`.
    pub type_name: String,
    pub type_oid: u32,
    pub not_null: bool,
}

/// A relation's kind as `pg_class.relkind` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelKind {
    Table,
    PartitionedTable,
    View,
    MaterializedView,
    ForeignTable,
    Sequence,
    Other,
}

impl RelKind {
    fn from_relkind(c: i8) -> RelKind {
        match c as u8 {
            b'r' => RelKind::Table,
            b'p' => RelKind::PartitionedTable,
            b'v' => RelKind::View,
            b'm' => RelKind::MaterializedView,
            b'f' => RelKind::ForeignTable,
            b'S' => RelKind::Sequence,
            _ => RelKind::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub schema: String,
    pub name: String,
    pub kind: RelKind,
    /// In attribute-number order.
    pub columns: Vec<Column>,
    pub primary_key: Vec<String>,
    /// An inheritance child or a partition of another relation.
    pub is_child: bool,
    /// Foreign keys of this relation.
    pub foreign_keys: Vec<ForeignKey>,
}

/// `columns` of a relation reference `ref_columns` of `ref_schema.ref_table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignKey {
    pub columns: Vec<String>,
    pub ref_schema: String,
    pub ref_table: String,
    pub ref_columns: Vec<String>,
}

impl Relation {
    /// A plain table with primary key `id` and the given (name, type) columns: for tests,
    /// benches and fuzz targets that need a catalog without a server.
    pub fn plain_table(schema: &str, name: &str, columns: &[(&str, &str)]) -> Relation {
        Relation {
            schema: schema.into(),
            name: name.into(),
            kind: RelKind::Table,
            columns: columns
                .iter()
                .map(|(n, t)| Column { name: (*n).into(), type_name: (*t).into(), type_oid: 0, not_null: false })
                .collect(),
            primary_key: vec!["id".into()],
            is_child: false,
            foreign_keys: Vec::new(),
        }
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// A function or operator implementation the rewriter may reason about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub schema: String,
    pub name: String,
    pub leakproof: bool,
    /// `i`mmutable, `s`table or `v`olatile.
    pub volatility: char,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogSnapshot {
    /// Keyed by (schema, name).
    pub relations: BTreeMap<(String, String), Relation>,
    /// Functions by name (overloads share a name; a name is leakproof only if every overload is).
    pub functions: BTreeMap<String, Vec<Function>>,
    /// Operators by (symbol, left type oid, right type oid): is the implementing function leakproof.
    pub operators: BTreeMap<(String, u32, u32), bool>,
    /// Installed extensions (`CREATE EXTENSION IF NOT EXISTS` of one of them is a no-op).
    pub extensions: std::collections::BTreeSet<String>,
}

impl CatalogSnapshot {
    pub fn relation(&self, schema: &str, name: &str) -> Option<&Relation> {
        self.relations.get(&(schema.to_owned(), name.to_owned()))
    }

    /// True when every overload of `name` in `pg_catalog` is leakproof.
    pub fn function_is_leakproof(&self, name: &str) -> bool {
        self.functions
            .get(name)
            .is_some_and(|fs| !fs.is_empty() && fs.iter().all(|f| f.schema == "pg_catalog" && f.leakproof))
    }

    /// True when the operator `symbol` for these operand types exists and is leakproof.
    pub fn operator_is_leakproof(&self, symbol: &str, left: u32, right: u32) -> bool {
        self.operators.get(&(symbol.to_owned(), left, right)).copied().unwrap_or(false)
    }
}

const RELATIONS_SQL: &str = "\
SELECT n.nspname, c.relname, c.relkind, \
       coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'), \
       coalesce(array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'), \
       coalesce(array_agg(a.atttypid ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'), \
       coalesce(array_agg(a.attnotnull ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}'), \
       coalesce((SELECT array_agg(pa.attname::text ORDER BY pa.attnum) FROM pg_index i \
                 JOIN pg_attribute pa ON pa.attrelid = i.indrelid AND pa.attnum = ANY (i.indkey) \
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}'), \
       c.relispartition OR EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = c.oid) \
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND NOT a.attisdropped \
WHERE n.nspname <> 'pg_toast' AND n.nspname NOT LIKE 'pg_temp%' \
  AND n.nspname NOT LIKE 'pg_toast_temp%' AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') \
GROUP BY n.nspname, c.relname, c.relkind, c.oid, c.relispartition";

const FUNCTIONS_SQL: &str = "\
SELECT n.nspname, p.proname, p.proleakproof, p.provolatile::text \
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
WHERE n.nspname NOT IN ('information_schema') AND n.nspname NOT LIKE 'pg_temp%'";

const FOREIGN_KEYS_SQL: &str = "\
SELECT n.nspname, c.relname, rn.nspname, r.relname, \
       (SELECT array_agg(a.attname::text ORDER BY k.i) FROM unnest(con.conkey) WITH ORDINALITY AS k(att, i) \
        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.att), \
       (SELECT array_agg(a.attname::text ORDER BY k.i) FROM unnest(con.confkey) WITH ORDINALITY AS k(att, i) \
        JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.att) \
FROM pg_constraint con \
JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
JOIN pg_class r ON r.oid = con.confrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace \
WHERE con.contype = 'f'";

const OPERATORS_SQL: &str = "\
SELECT o.oprname, o.oprleft, o.oprright, p.proleakproof FROM pg_operator o JOIN pg_proc p ON p.oid = o.oprcode";

/// Read the catalog through an owner connection.
pub async fn load(client: &tokio_postgres::Client) -> Result<CatalogSnapshot, tokio_postgres::Error> {
    let mut snap = CatalogSnapshot::default();
    for row in client.query(RELATIONS_SQL, &[]).await? {
        let names: Vec<String> = row.try_get(3)?;
        let types: Vec<String> = row.try_get(4)?;
        let oids: Vec<u32> = row.try_get(5)?;
        let not_null: Vec<bool> = row.try_get(6)?;
        let columns = names
            .into_iter()
            .zip(types)
            .zip(oids)
            .zip(not_null)
            .map(|(((name, type_name), type_oid), not_null)| Column { name, type_name, type_oid, not_null })
            .collect();
        let rel = Relation {
            schema: row.try_get(0)?,
            name: row.try_get(1)?,
            kind: RelKind::from_relkind(row.try_get(2)?),
            columns,
            primary_key: row.try_get(7)?,
            is_child: row.try_get(8)?,
            foreign_keys: Vec::new(),
        };
        snap.relations.insert((rel.schema.clone(), rel.name.clone()), rel);
    }
    for row in client.query(FUNCTIONS_SQL, &[]).await? {
        let f = Function {
            schema: row.try_get(0)?,
            name: row.try_get(1)?,
            leakproof: row.try_get(2)?,
            volatility: row.try_get::<_, String>(3)?.chars().next().unwrap_or('v'),
        };
        snap.functions.entry(f.name.clone()).or_default().push(f);
    }
    for row in client.query(FOREIGN_KEYS_SQL, &[]).await? {
        let key: (String, String) = (row.try_get(0)?, row.try_get(1)?);
        let fk = ForeignKey {
            ref_schema: row.try_get(2)?,
            ref_table: row.try_get(3)?,
            columns: row.try_get::<_, Option<Vec<String>>>(4)?.unwrap_or_default(),
            ref_columns: row.try_get::<_, Option<Vec<String>>>(5)?.unwrap_or_default(),
        };
        if let Some(rel) = snap.relations.get_mut(&key) {
            rel.foreign_keys.push(fk);
        }
    }
    for row in client.query(OPERATORS_SQL, &[]).await? {
        snap.operators.insert((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?), row.try_get(3)?);
    }
    for row in client.query("SELECT extname::text FROM pg_catalog.pg_extension", &[]).await? {
        snap.extensions.insert(row.try_get(0)?);
    }
    Ok(snap)
}

/// Problems that make the policy unusable against this database: the proxy refuses to start.
pub fn check_policy(catalog: &CatalogSnapshot, tables: &Tables) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for spec in tables.by_name.values() {
        let qualified = format!("{}.{}", spec.schema, spec.name);
        let Some(rel) = catalog.relation(&spec.schema, &spec.name) else {
            problems.push(format!("policy names table {qualified}, which does not exist"));
            continue;
        };
        if !matches!(rel.kind, RelKind::Table) {
            problems.push(format!("{qualified} is a {:?}, not a plain table", rel.kind));
        }
        let mut required: BTreeSet<(&str, &str)> = BTreeSet::new();
        required.insert(("id column", spec.id_column.as_str()));
        if let Some(c) = &spec.organization_column {
            required.insert(("organization column", c));
        }
        if let Some(c) = &spec.environment_column {
            required.insert(("environment column", c));
        }
        if let Some(c) = &spec.type_column {
            required.insert(("type column", c));
        }
        for (role, col) in required {
            if rel.column(col).is_none() {
                problems.push(format!("{qualified} lacks its {role} {col:?}"));
            }
        }
        if spec.scope == TableScope::Environment && spec.environment_column.is_none() {
            problems.push(format!("{qualified} is environment-scoped but has no environment column"));
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::TableSpec;

    fn rel(name: &str, cols: &[&str]) -> Relation {
        let typed: Vec<(&str, &str)> = cols.iter().map(|c| (*c, "text")).collect();
        Relation::plain_table("public", name, &typed)
    }

    fn spec(name: &str, scope: TableScope) -> TableSpec {
        TableSpec {
            schema: "public".into(),
            name: name.into(),
            scope,
            organization_column: Some("organization_id".into()),
            environment_column: (scope == TableScope::Environment).then(|| "environment".into()),
            type_column: None,
            id_column: "id".into(),
        }
    }

    #[test]
    fn policy_check_finds_missing_tables_and_columns() {
        let mut cat = CatalogSnapshot::default();
        for r in [rel("threads", &["id", "organization_id"]), rel("agents", &["id", "organization_id"])] {
            cat.relations.insert((r.schema.clone(), r.name.clone()), r);
        }
        let mut tables = Tables::default();
        tables.by_name.insert("threads".into(), spec("threads", TableScope::Environment));
        tables.by_name.insert("agents".into(), spec("agents", TableScope::Shared));
        tables.by_name.insert("ghosts".into(), spec("ghosts", TableScope::Shared));
        let problems = check_policy(&cat, &tables).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("ghosts, which does not exist")));
        assert!(problems.iter().any(|p| p.contains("public.threads lacks its environment column")));
    }

    #[test]
    fn leakproofness_needs_every_overload() {
        let mut cat = CatalogSnapshot::default();
        let f = |leakproof| Function { schema: "pg_catalog".into(), name: "int4eq".into(), leakproof, volatility: 'i' };
        cat.functions.insert("int4eq".into(), vec![f(true)]);
        cat.functions.insert("mixed".into(), vec![f(true), f(false)]);
        cat.operators.insert(("=".into(), 23, 23), true);
        cat.operators.insert(("~".into(), 25, 25), false);
        assert!(cat.function_is_leakproof("int4eq"));
        assert!(!cat.function_is_leakproof("mixed"));
        assert!(!cat.function_is_leakproof("missing"));
        assert!(cat.operator_is_leakproof("=", 23, 23));
        assert!(!cat.operator_is_leakproof("=", 23, 20));
        assert!(!cat.operator_is_leakproof("~", 25, 25));
    }
}
