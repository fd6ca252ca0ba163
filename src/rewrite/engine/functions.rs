//! Which functions an environment key may call: an allowlist derived from the catalog —
//! `pg_catalog` functions that are immutable or stable — minus those that read files, run SQL
//! given as text, or expose other sessions, large objects or the server; plus a short list of
//! volatile functions that are safe; plus what the configuration allows by name.
//!
//! Invariant: an environment key calls only functions on the allowlist; none reads files, runs SQL given as text, or
//! reaches other sessions, large objects or the server.

use std::collections::BTreeSet;

use crate::catalog::CatalogSnapshot;

/// Volatile functions that reveal nothing of other tenants and change nothing shared. (`setval`
/// is not here: rewinding a managed table's sequence would break every tenant's inserts.)
const SAFE_VOLATILE: &[&str] = &[
    "random",
    "random_normal",
    "setseed",
    "gen_random_uuid",
    "uuid_generate_v4",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "now",
    "nextval",
    "currval",
    "lastval",
    "txid_current",
    "pg_current_xact_id",
    // Only `set_config('<settable setting>', …)`: the gate (rewrite/gate.rs) refuses the rest.
    "set_config",
];

/// information_schema's own helper functions (SQL functions over the catalog, immutable or
/// stable): drivers call them directly in their metadata queries (pgjdbc's getPrimaryKeys and
/// getIndexInfo use `information_schema._pg_expandarray`).
const INFORMATION_SCHEMA_HELPERS: &[&str] = &[
    "_pg_expandarray",
    "_pg_index_position",
    "_pg_truetypid",
    "_pg_truetypmod",
    "_pg_char_max_length",
    "_pg_char_octet_length",
    "_pg_numeric_precision",
    "_pg_numeric_precision_radix",
    "_pg_numeric_scale",
    "_pg_datetime_precision",
    "_pg_interval_type",
];

/// Constructs sqlparser represents as function calls although PostgreSQL's grammar reads them
/// as expressions (reserved keywords, so no function of that name can be reached unqualified),
/// among them the SQL value functions (`CURRENT_TIMESTAMP`, `CURRENT_TIMESTAMP(3)`, `LOCALTIME`,
/// `CURRENT_USER`, …), which PostgreSQL evaluates itself.
const SYNTAX_CALLS: &[&str] = &[
    "array",
    "coalesce",
    "nullif",
    "greatest",
    "least",
    "grouping",
    "row",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtime",
    "localtimestamp",
    "current_catalog",
    "current_role",
    "current_user",
    "session_user",
    "system_user",
    "user",
];

/// Stable or immutable functions that still must not be reachable (prefix match).
const DENIED_PREFIXES: &[&str] = &[
    "pg_read_",
    "pg_ls_",
    "pg_stat_get_",
    "pg_stat_file",
    "pg_current_logfile",
    "pg_stat_statements",
    "lo_",
    "query_to_xml",
    "table_to_xml",
    "cursor_to_xml",
    "schema_to_xml",
    "database_to_xml",
    "ts_stat",
    "dblink",
    "pg_advisory",
    "pg_try_advisory",
    "pg_notify",
    "pg_sleep",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_export_snapshot",
    "pg_import_system_collations",
    "pg_replication_",
    "pg_create_",
    "pg_drop_replication",
    "pg_logical_",
    "pg_switch_wal",
    "pg_backup_",
    "pg_log_backend_memory_contexts",
    "pg_get_backend_memory",
    "pg_blocking_pids",
    "pg_safe_snapshot_blocking_pids",
    "pg_stat_reset",
    "pg_stat_clear",
    "pg_prepared_",
    "pg_cursor",
    "pg_prepared_statement",
    "pg_show_all_settings",
    "pg_show_all_file_settings",
    "pg_hba_file_rules",
    "pg_ident_file_mappings",
    "pg_lock_status",
    "pg_listening_channels",
];

/// Check one function call by its (folded) name parts.
pub fn check(catalog: &CatalogSnapshot, parts: &[String], configured: &BTreeSet<String>) -> Result<(), String> {
    let (schema, name) = match parts {
        [name] => (None, name.as_str()),
        [schema, name] => (Some(schema.as_str()), name.as_str()),
        _ => return Err(format!("function name {} is not supported", parts.join("."))),
    };
    if configured.contains(name) && schema.is_none_or(|s| s == "pg_catalog") {
        return Ok(());
    }
    // Syntax sqlparser reads as a call: `ARRAY(SELECT …)`, `COALESCE(…)`.
    if schema.is_none() && SYNTAX_CALLS.contains(&name) {
        return Ok(());
    }
    if schema == Some("information_schema") && INFORMATION_SCHEMA_HELPERS.contains(&name) {
        return Ok(());
    }
    if schema.is_some_and(|s| s != "pg_catalog") {
        return Err(format!(
            "function {}.{name} is not allowed: user-defined functions must be allowlisted",
            schema.unwrap_or_default()
        ));
    }
    // Releases the session's own advisory locks, and an environment session can take none
    // (every other `pg_advisory*` is refused; operator sessions are never pooled): asyncpg's
    // pool sends it whenever it releases a connection.
    if name == "pg_advisory_unlock_all" {
        return Ok(());
    }
    if DENIED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Err(format!("function {name} is not allowed through the proxy"));
    }
    let overloads: Vec<_> =
        catalog.functions.get(name).into_iter().flatten().filter(|f| f.schema == "pg_catalog").collect();
    if overloads.is_empty() {
        return Err(format!("function {name} is not allowed: only built-in functions may be called"));
    }
    let all_safe = overloads.iter().all(|f| f.volatility != 'v') || SAFE_VOLATILE.contains(&name);
    if !all_safe {
        return Err(format!(
            "function {name} is not allowed: it is volatile and not on the proxy's list of safe functions"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Function;

    fn cat() -> CatalogSnapshot {
        let mut c = CatalogSnapshot::default();
        for (name, vol) in [
            ("lower", 'i'),
            ("now", 's'),
            ("random", 'v'),
            ("pg_sleep", 'v'),
            ("pg_read_file", 'v'),
            ("pg_stat_get_numscans", 's'),
            ("pg_backend_pid", 's'),
            ("lo_import", 'v'),
            ("pg_advisory_lock", 'v'),
            ("pg_advisory_unlock_all", 'v'),
        ] {
            c.functions.insert(
                name.into(),
                vec![Function { schema: "pg_catalog".into(), name: name.into(), leakproof: false, volatility: vol }],
            );
        }
        c.functions.insert(
            "mine".into(),
            vec![Function { schema: "public".into(), name: "mine".into(), leakproof: false, volatility: 'i' }],
        );
        c
    }

    fn ok(parts: &[&str]) -> bool {
        let p: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
        check(&cat(), &p, &BTreeSet::new()).is_ok()
    }

    #[test]
    fn allowlist() {
        assert!(ok(&["lower"]));
        assert!(ok(&["pg_catalog", "lower"]));
        assert!(ok(&["now"]));
        assert!(ok(&["random"]));
        assert!(ok(&["pg_backend_pid"]));
        assert!(!ok(&["pg_sleep"]));
        assert!(!ok(&["pg_read_file"]));
        assert!(!ok(&["pg_stat_get_numscans"]));
        assert!(!ok(&["lo_import"]));
        // No advisory lock can be taken, so releasing them all (asyncpg's pool reset) is a no-op.
        assert!(!ok(&["pg_advisory_lock"]));
        assert!(ok(&["pg_advisory_unlock_all"]));
        assert!(ok(&["pg_catalog", "pg_advisory_unlock_all"]));
        assert!(!ok(&["public", "pg_advisory_unlock_all"]));
        assert!(!ok(&["mine"]));
        assert!(!ok(&["public", "mine"]));
        assert!(!ok(&["nonexistent"]));
        // information_schema's helpers, only schema-qualified (drivers' metadata queries).
        assert!(ok(&["information_schema", "_pg_expandarray"]));
        assert!(!ok(&["_pg_expandarray"]));
        // `ROW(…)`, which sqlparser reads as a call.
        assert!(ok(&["row"]));
        assert!(!ok(&["pg_catalog", "row"]));
        for value_function in ["current_timestamp", "current_date", "localtimestamp", "current_catalog", "user"] {
            assert!(ok(&[value_function]), "{value_function}");
        }
        assert!(!ok(&["information_schema", "mine"]));
        let configured: BTreeSet<String> = ["pg_sleep".to_string()].into();
        assert!(check(&cat(), &["pg_sleep".to_string()], &configured).is_ok());
    }
}
