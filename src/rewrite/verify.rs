//! Step 6: before any text goes upstream, PostgreSQL's own parser and lexer must read it the
//! way the proxy meant it:
//!
//! * it parses, into the same number of statements, of the same kinds, in the same order, with
//!   each statement exactly where the proxy put it;
//! * the gate's PostgreSQL-side rules pass on what will actually run, and the bound values
//!   they depend on (`gate::ParamRule`) are exactly the ones the client's text depended on;
//! * in every printed (not verbatim) statement, the string constants (`SCONST`, and any
//!   `USCONST`/`BCONST`/`XCONST`) and quoted identifiers, in text order, are exactly the ones
//!   the printer wrote, with the same values; and there is no comment (the printer never writes
//!   one, so a comment would mean text was swallowed).
//!
//! Statements forwarded verbatim are the client's own data-free text (see `mod.rs`); only
//! their kind, position and the gate are checked. Statements PostgreSQL's deparser printed from
//! the client's own tree (DDL sqlparser cannot read, `ddl.rs`) must parse back to exactly that
//! tree (every node, field and value; only byte offsets may differ), with no comment.
//!
//! Invariant: no text goes upstream unless PostgreSQL's parser reads it as exactly the statements, kinds and string
//! literals the proxy printed; any difference is a refusal, never a best effort.

use std::ops::Range;

use pg_query::protobuf::Token;

use super::Refusal;
use super::classify::{self, PgParseError};
use super::gate;
use super::lexer::{self, Tok};
use super::pgtree;
use super::printer::Emitted;

/// What the proxy expects PostgreSQL to find in one statement of the text it built.
#[derive(Debug, Clone)]
pub(crate) struct PieceCheck {
    pub kind: String,
    /// Byte range of the statement in the built text.
    pub range: Range<usize>,
    pub form: Form,
}

/// How a statement of the built text was made, and so what it must hold.
#[derive(Debug, Clone)]
pub(crate) enum Form {
    /// The client's own text of a data-free statement.
    Verbatim,
    /// Printed by the proxy's printer.
    Printed(Expected),
    /// Printed by PostgreSQL's deparser from the client's tree, which the policy checked and
    /// left alone: PostgreSQL must read it as a tree of exactly this shape (`pgtree::shape`).
    Deparsed { same_as: String },
}

/// What a printed statement must contain.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    /// The printer's strings and quoted identifiers, in print order.
    pub emitted: Vec<Emitted>,
    /// When set, PostgreSQL's tree of the printed statement must have exactly this shape
    /// (`pgtree::shape`): the shape of the client's statement, which the policy left alone.
    pub same_as: Option<String>,
}

fn unverifiable(what: impl std::fmt::Display) -> Refusal {
    Refusal::Unverifiable(format!("refused: the rewritten SQL did not verify: {what}"))
}

/// Returns PostgreSQL's tokens of `text`.
pub(crate) fn verify(
    text: &str,
    pieces: &[PieceCheck],
    rules: &[gate::ParamRule],
    policy: &dyn super::StatementPolicy,
    actor: &crate::auth::identity::ActorContext,
) -> Result<Vec<Tok>, Refusal> {
    let statements = classify::parse(text).map_err(|e| match e {
        PgParseError::Syntax(m) | PgParseError::TooDeep(m) | PgParseError::Internal(m) => {
            unverifiable(format!("PostgreSQL cannot parse it: {m}"))
        }
        PgParseError::Nul => unverifiable("it contains a NUL byte"),
    })?;
    if statements.len() != pieces.len() {
        return Err(unverifiable(format!(
            "PostgreSQL reads {} statement(s) where the proxy wrote {}",
            statements.len(),
            pieces.len()
        )));
    }
    let mut found_rules = Vec::with_capacity(rules.len());
    for (i, (stmt, piece)) in statements.iter().zip(pieces).enumerate() {
        let n = i + 1;
        if stmt.kind != piece.kind {
            return Err(unverifiable(format!(
                "statement {n} is a {} to PostgreSQL but was a {}",
                stmt.kind, piece.kind
            )));
        }
        if stmt.range != piece.range {
            return Err(unverifiable(format!("statement {n} does not start and end where the proxy put it")));
        }
        found_rules.extend(gate::check_pg(&stmt.node)?);
        policy.check_output(&stmt.node, actor)?;
        let same_as = match &piece.form {
            Form::Verbatim => None,
            Form::Printed(e) => e.same_as.as_ref(),
            Form::Deparsed { same_as } => Some(same_as),
        };
        if let Some(same_as) = same_as
            && pgtree::shape(&stmt.node).as_ref() != Some(same_as)
        {
            return Err(unverifiable(format!(
                "PostgreSQL reads statement {n} differently from what the client sent \
                 (the proxy's re-printed text changed its meaning)"
            )));
        }
    }
    // The bound values the session will check are exactly the ones the forwarded text's
    // set_config calls depend on.
    if found_rules != rules {
        return Err(unverifiable("its set_config calls depend on other parameters than the client's"));
    }
    let tokens = lexer::scan(text).map_err(|m| unverifiable(format!("PostgreSQL cannot scan it: {m}")))?;
    check_tokens(text, &tokens, pieces)?;
    Ok(tokens)
}

fn check_tokens(text: &str, tokens: &[Tok], pieces: &[PieceCheck]) -> Result<(), Refusal> {
    let mut next_piece = 0usize;
    let mut idx = 0usize;
    while let Some(tok) = tokens.get(idx) {
        let piece = pieces.get(next_piece);
        match piece {
            Some(p) if tok.start >= p.range.start => {
                let inside = lexer::tokens_in(tokens, p.range.clone());
                if inside.is_empty() {
                    return Err(unverifiable(format!("statement {} has no tokens", next_piece + 1)));
                }
                if inside.last().is_some_and(|t| t.end > p.range.end) {
                    return Err(unverifiable(format!("a token runs past the end of statement {}", next_piece + 1)));
                }
                match &p.form {
                    Form::Verbatim => {}
                    Form::Printed(expected) => check_printed(text, inside, &expected.emitted, next_piece + 1)?,
                    Form::Deparsed { .. } => check_deparsed(inside, next_piece + 1)?,
                }
                idx += inside.len();
                next_piece += 1;
            }
            // Between statements the only token allowed is the separator the proxy wrote.
            _ if tok.token == Some(Token::Ascii59) => idx += 1,
            _ => return Err(unverifiable("text outside the statements the proxy wrote")),
        }
    }
    if next_piece != pieces.len() {
        return Err(unverifiable("a statement has no tokens"));
    }
    Ok(())
}

/// The deparser writes no comment and no Unicode escape; its strings and identifiers are
/// checked by the tree comparison (`verify`).
fn check_deparsed(tokens: &[Tok], n: usize) -> Result<(), Refusal> {
    for tok in tokens {
        match tok.token {
            None => return Err(unverifiable(format!("statement {n} contains a token the proxy does not know"))),
            Some(Token::SqlComment | Token::CComment) => {
                return Err(unverifiable(format!("statement {n} contains a comment")));
            }
            Some(Token::Usconst | Token::Uident) => {
                return Err(unverifiable(format!("statement {n} contains a Unicode-escape token")));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn check_printed(text: &str, tokens: &[Tok], expected: &[Emitted], n: usize) -> Result<(), Refusal> {
    let mut want = expected.iter();
    let mut count = 0usize;
    let mut prev: Option<&Tok> = None;
    for tok in tokens {
        let Some(kind) = tok.token else {
            return Err(unverifiable(format!("statement {n} contains a token the proxy does not know")));
        };
        let raw = text.get(tok.start..tok.end).unwrap_or_default();
        let found = match kind {
            Token::SqlComment | Token::CComment => {
                return Err(unverifiable(format!("statement {n} contains a comment")));
            }
            Token::Usconst | Token::Uident => {
                return Err(unverifiable(format!("statement {n} contains a Unicode-escape token")));
            }
            Token::Sconst => {
                let nchar_before = prev.is_some_and(|p| p.token == Some(Token::Nchar) && p.end == tok.start);
                lexer::decode_standard_string(raw)
                    .map(|v| if nchar_before { Emitted::National(v) } else { Emitted::Str(v) })
            }
            Token::Bconst => lexer::decode_prefixed(raw, 'B').map(Emitted::Bit),
            Token::Xconst => lexer::decode_prefixed(raw, 'X').map(Emitted::Hex),
            Token::Ident if raw.starts_with('"') => lexer::decode_quoted_ident(raw).map(Emitted::QuotedIdent),
            _ => {
                prev = Some(tok);
                continue;
            }
        };
        count += 1;
        let Some(found) = found else {
            return Err(unverifiable(format!(
                "string or identifier {count} of statement {n} is not in the form the proxy prints"
            )));
        };
        match want.next() {
            Some(w) if *w == found => {}
            Some(_) => {
                return Err(unverifiable(format!(
                    "string or identifier {count} of statement {n} differs from what the proxy printed"
                )));
            }
            None => {
                return Err(unverifiable(format!(
                    "statement {n} contains more strings or quoted identifiers than the proxy printed"
                )));
            }
        }
        prev = Some(tok);
    }
    if want.next().is_some() {
        return Err(unverifiable(format!(
            "statement {n} contains fewer strings or quoted identifiers than the proxy printed"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, pieces: &[PieceCheck]) -> Result<(), Refusal> {
        let actor = crate::auth::identity::ActorContext {
            organization: "o".into(),
            environment: crate::auth::identity::Environment::Development,
            roles: vec![],
            actor_type: crate::auth::identity::ActorType::User,
            actor_id: "a".into(),
        };
        verify(text, pieces, &[], &crate::rewrite::policy::PassThrough, &actor).map(drop)
    }

    fn printed(kind: &str, range: Range<usize>, emitted: Vec<Emitted>) -> PieceCheck {
        PieceCheck { kind: kind.into(), range, form: Form::Printed(Expected { emitted, same_as: None }) }
    }

    fn shape_of(sql: &str) -> String {
        let stmts = classify::parse(sql).unwrap();
        pgtree::shape(&stmts[0].node).unwrap()
    }

    fn s(v: &str) -> Emitted {
        Emitted::Str(v.into())
    }

    #[test]
    fn accepts_what_was_printed() {
        let text = "SELECT 'a''b', \"X\" FROM t; BEGIN /* c */ READ ONLY";
        let pieces = [
            printed("SelectStmt", 0..25, vec![s("a'b"), Emitted::QuotedIdent("X".into())]),
            PieceCheck { kind: "TransactionStmt".into(), range: 27..text.len(), form: Form::Verbatim },
        ];
        check(text, &pieces).unwrap();
    }

    #[test]
    fn refuses_statement_count_kind_and_position_changes() {
        let two = "SELECT 'a\\'; DROP TABLE y; --'";
        let err = check(two, &[printed("SelectStmt", 0..two.len(), vec![s("a\\'; DROP TABLE y; --")])]);
        assert!(matches!(&err, Err(Refusal::Unverifiable(m)) if m.contains("2 statement")), "{err:?}");
        let err = check("BEGIN", &[printed("SelectStmt", 0..5, vec![])]);
        assert!(matches!(err, Err(Refusal::Unverifiable(m)) if m.contains("TransactionStmt")));
        let err = check(" SELECT 1", &[printed("SelectStmt", 0..9, vec![])]);
        assert!(matches!(err, Err(Refusal::Unverifiable(_))));
    }

    #[test]
    fn refuses_literal_differences() {
        let cases: &[(&str, Vec<Emitted>)] = &[
            ("SELECT 'x''y'", vec![s("x''y")]),
            ("SELECT 'a', 'b'", vec![s("b"), s("a")]),
            ("SELECT 'a', 'b'", vec![s("a")]),
            ("SELECT 'a'", vec![s("a"), s("b")]),
            ("SELECT E'a'", vec![s("a")]),
            ("SELECT $$a$$", vec![s("a")]),
            ("SELECT U&'a'", vec![s("a")]),
            ("SELECT N'a'", vec![s("a")]),
            ("SELECT 'a'", vec![Emitted::National("a".into())]),
            ("SELECT B'01'", vec![Emitted::Hex("01".into())]),
            ("SELECT \"a\"", vec![Emitted::QuotedIdent("b".into())]),
            ("SELECT a", vec![Emitted::QuotedIdent("a".into())]),
            ("SELECT U&\"a\"", vec![Emitted::QuotedIdent("a".into())]),
            ("SELECT 1 -- c", vec![]),
            ("SELECT /* c */ 1", vec![]),
        ];
        for (text, emitted) in cases {
            let r = check(text, &[printed("SelectStmt", 0..text.len(), emitted.clone())]);
            assert!(matches!(r, Err(Refusal::Unverifiable(_))), "{text}: {r:?}");
        }
    }

    #[test]
    fn accepts_national_bit_and_hex() {
        let text = "SELECT N'a''b', B'01', X'fF'";
        let emitted = vec![Emitted::National("a'b".into()), Emitted::Bit("01".into()), Emitted::Hex("fF".into())];
        check(text, &[printed("SelectStmt", 0..text.len(), emitted)]).unwrap();
    }

    #[test]
    fn compares_meaning_with_the_clients_statement() {
        let client = shape_of("select  E'it\\'s'::int, \"A\", b FROM t -- c");
        let text = "SELECT 'it''s'::INT, \"A\", b FROM t";
        let emitted = vec![s("it's"), Emitted::QuotedIdent("A".into())];
        let piece = |same_as: String| PieceCheck {
            kind: "SelectStmt".into(),
            range: 0..text.len(),
            form: Form::Printed(Expected { emitted: emitted.clone(), same_as: Some(same_as) }),
        };
        check(text, &[piece(client)]).unwrap();
        for other in ["SELECT 'it''s'::int, \"a\", b FROM t", "SELECT 'it''s'::int, \"A\", b FROM t LIMIT 1"] {
            let r = check(text, &[piece(shape_of(other))]);
            assert!(matches!(&r, Err(Refusal::Unverifiable(m)) if m.contains("differently")), "{other}: {r:?}");
        }
    }

    #[test]
    fn deparsed_statements_must_read_back_as_the_clients_tree() {
        let piece = |text: &str, client: &str| PieceCheck {
            kind: "AlterSeqStmt".into(),
            range: 0..text.len(),
            form: Form::Deparsed { same_as: shape_of(client) },
        };
        let ok = "ALTER SEQUENCE s RESTART 1";
        check(ok, &[piece(ok, "alter sequence \"s\" restart with 1")]).unwrap();
        // Strings and identifiers are compared through the tree, so E'' strings pass.
        let text = "COMMENT ON CONSTRAINT c ON t IS E'a\\\\b'";
        let comment = PieceCheck {
            kind: "CommentStmt".into(),
            range: 0..text.len(),
            form: Form::Deparsed { same_as: shape_of("COMMENT ON CONSTRAINT c ON t IS 'a\\b'") },
        };
        check(text, &[comment]).unwrap();
        for (text, client) in [
            ("ALTER SEQUENCE s RESTART 2", ok),
            ("ALTER SEQUENCE \"S\" RESTART 1", ok),
            ("ALTER SEQUENCE s RESTART /* c */ 1", ok),
            ("ALTER SEQUENCE U&\"s\" RESTART 1", ok),
        ] {
            let r = check(text, &[piece(text, client)]);
            assert!(matches!(r, Err(Refusal::Unverifiable(_))), "{text}: {r:?}");
        }
    }

    #[test]
    fn runs_the_gate_on_the_output() {
        let text = "SELECT set_config('a', 'b', false)";
        let r = check(text, &[printed("SelectStmt", 0..text.len(), vec![s("a"), s("b")])]);
        assert!(matches!(r, Err(Refusal::Denied(_))), "{r:?}");
    }
}
