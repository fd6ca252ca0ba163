//! Step 2: split and classify with PostgreSQL's own parser (pg_query), the authority on where
//! statements begin and end and what kind each one is.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};

use pg_query::NodeEnum;

use super::pgparse::{self, Failure, MAX_TREE_DEPTH, ORDINARY_STACK_DEPTH};
use super::pgtree;

/// One top-level statement as PostgreSQL sees it.
#[derive(Debug, Clone)]
pub(crate) struct PgStatement {
    /// pg_query node name, e.g. `SelectStmt`.
    pub kind: String,
    /// Byte range of the statement in the parsed text: from its first token up to (not
    /// including) the `;` that ends it, or to the end of the text for the last statement.
    pub range: Range<usize>,
    pub node: NodeEnum,
}

/// Why PostgreSQL's parser did not produce statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PgParseError {
    /// PostgreSQL rejects the text; carries its message.
    Syntax(String),
    /// The tree is too deep for the parser's stack guard or for pg_query's decoder.
    TooDeep(String),
    /// The text contains a NUL byte, which no PostgreSQL string can hold.
    Nul,
    /// pg_query returned something inconsistent (or panicked).
    Internal(String),
}

/// Parses `sql` into its top-level statements. Empty statements (`;;`, comments only) produce
/// none, exactly as in PostgreSQL.
pub(crate) fn parse(sql: &str) -> Result<Vec<PgStatement>, PgParseError> {
    if sql.contains('\0') {
        return Err(PgParseError::Nul);
    }
    // Decoding cannot panic on bytes libpg_query wrote, but a panic must become a refusal, not
    // a dead connection task.
    let parsed = match catch_unwind(AssertUnwindSafe(|| pgparse::parse(sql))) {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(Failure::Parse(msg))) if is_depth_error(&msg) => return Err(PgParseError::TooDeep(msg)),
        Ok(Err(Failure::Parse(msg))) => return Err(PgParseError::Syntax(msg)),
        Ok(Err(Failure::TooDeep)) => {
            return Err(PgParseError::TooDeep(format!(
                "the parse tree is deeper than the {MAX_TREE_DEPTH} levels the proxy reads"
            )));
        }
        // Only where no deep stack is taken (the rewriter takes it): an audit's description.
        Ok(Err(Failure::NeedsDeepStack)) => {
            return Err(PgParseError::TooDeep(format!(
                "the parse tree is deeper than the {ORDINARY_STACK_DEPTH} levels read on this stack"
            )));
        }
        Ok(Err(Failure::Nul)) => return Err(PgParseError::Nul),
        Ok(Err(Failure::Decode(msg))) => return Err(PgParseError::Internal(msg)),
        Err(_) => return Err(PgParseError::Internal("pg_query panicked".to_string())),
    };

    let mut out = Vec::with_capacity(parsed.stmts.len());
    // The trees are moved out, not cloned: a clone of a large rewritten statement's tree costs
    // as much as decoding it.
    for raw in parsed.stmts {
        let Some(node) = raw.stmt.and_then(|n| n.node) else {
            return Err(PgParseError::Internal("statement without a node".to_string()));
        };
        let start = usize::try_from(raw.stmt_location)
            .map_err(|_| PgParseError::Internal("negative statement location".to_string()))?;
        let len = usize::try_from(raw.stmt_len)
            .map_err(|_| PgParseError::Internal("negative statement length".to_string()))?;
        // PostgreSQL reports length 0 for "up to the end of the string".
        let end = if len == 0 { sql.len() } else { start.saturating_add(len) };
        if sql.get(start..end).is_none() {
            return Err(PgParseError::Internal("statement range outside the text".to_string()));
        }
        out.push(PgStatement { kind: pgtree::node_kind(&node), range: start..end, node });
    }
    Ok(out)
}

/// The one statement PostgreSQL reads in `sql`; `None` when it reads none, several, or cannot
/// read the text (the proxy's own texts and rewrites, whose trees are put together again).
pub(crate) fn parse_alone(sql: &str) -> Option<NodeEnum> {
    let mut statements = parse(sql).ok()?;
    match (statements.pop(), statements.is_empty()) {
        (Some(statement), true) => Some(statement.node),
        _ => None,
    }
}

/// Test helper: PostgreSQL's tree of the first statement of `sql`.
#[cfg(test)]
pub(crate) fn first_node(sql: &str) -> NodeEnum {
    parse(sql).unwrap().remove(0).node
}

fn is_depth_error(msg: &str) -> bool {
    // "stack depth limit exceeded" comes from check_stack_depth(); bison reports "memory
    // exhausted" when its own parser stack overflows; libpg_query's protobuf encoder has a
    // depth cap of its own ("parse tree is nested too deeply to serialize to protobuf").
    // Only PostgreSQL's own words count: the part after "at or near" quotes the client's SQL
    // (found by fuzzing: `SELECT 'stack depth limit exceeded` is a syntax error, not depth).
    let own = msg.split(" at or near ").next().unwrap_or(msg);
    own.starts_with("stack depth limit exceeded")
        || own.starts_with("memory exhausted")
        || own.contains("nested too deeply to serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_errors_are_recognised_only_in_postgresqls_own_words() {
        assert!(is_depth_error("stack depth limit exceeded"));
        assert!(is_depth_error("memory exhausted at or near \"(\""));
        assert!(is_depth_error("parse tree is nested too deeply to serialize to protobuf"));
        assert!(!is_depth_error("unterminated quoted string at or near \"'stack depth limit exceeded\""));
        assert!(!is_depth_error("syntax error at or near \"memory exhausted\""));
        assert!(matches!(parse("SELECT 'stack depth limit exceeded"), Err(PgParseError::Syntax(_))));
    }

    fn kinds_and_texts(sql: &str) -> Vec<(String, String)> {
        parse(sql).unwrap().into_iter().map(|s| (s.kind, sql[s.range].to_string())).collect()
    }

    #[test]
    fn splits_like_postgres() {
        assert_eq!(
            kinds_and_texts("  /* c */ SELECT 1 ; ; -- x\n BEGIN -- tail"),
            [
                ("SelectStmt".to_string(), "SELECT 1 ".to_string()),
                ("TransactionStmt".to_string(), "BEGIN -- tail".to_string())
            ]
        );
        assert_eq!(kinds_and_texts("SELECT 1;"), [("SelectStmt".to_string(), "SELECT 1".to_string())]);
        assert_eq!(
            kinds_and_texts("SELECT ';' ; SHOW x"),
            [
                ("SelectStmt".to_string(), "SELECT ';' ".to_string()),
                ("VariableShowStmt".to_string(), "SHOW x".to_string())
            ]
        );
    }

    #[test]
    fn empty_inputs_have_no_statements() {
        for sql in ["", " ", ";", " ;; ", "-- only\n", "/* c */ ; -- x"] {
            assert!(parse(sql).unwrap().is_empty(), "{sql:?}");
        }
    }

    #[test]
    fn errors_are_classified() {
        assert!(matches!(parse("SELEKT 1"), Err(PgParseError::Syntax(m)) if m.contains("syntax error")));
        assert_eq!(parse("SELECT '\0'").unwrap_err(), PgParseError::Nul);
        let deep = format!("SELECT {}1{}", "(SELECT ".repeat(200), ")".repeat(200));
        let r = parse(&deep);
        assert!(matches!(r, Err(PgParseError::TooDeep(_))), "{r:?}");
    }

    #[test]
    fn multibyte_ranges_are_char_boundaries() {
        let sql = "SELECT 'é'; SELECT 'ü'";
        let stmts = parse(sql).unwrap();
        assert_eq!(stmts.len(), 2);
        assert_eq!(&sql[stmts[1].range.clone()], "SELECT 'ü'");
    }
}
