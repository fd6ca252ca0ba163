//! What logs and audit events may hold of what a client sent. A client's statement is never
//! logged; an operator's is audited with its constants left out (`without_constants`), and a
//! refusal's message with the client's values the parsers quote left out (`Refusal::logged`).
//! The client's own ErrorResponse keeps the whole message: it only shows the client what it sent.

use std::borrow::Cow;

use pg_query::protobuf::Token;

use super::Refusal;
use super::lexer::scan;

/// `sql` with every constant PostgreSQL's lexer finds in it (a string in any quoting, a number,
/// a bit string) replaced by `?`: what the audit log may hold of an operator's statement, which
/// is forwarded as sent and may carry a role's password or a row's values. `None` when the lexer
/// cannot read the text (an unterminated quote): then none of it may be logged.
pub fn without_constants(sql: &str) -> Option<String> {
    let tokens = scan(sql).ok()?;
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    for t in tokens.iter().filter(|t| {
        matches!(
            t.token,
            Some(Token::Sconst | Token::Usconst | Token::Bconst | Token::Xconst | Token::Iconst | Token::Fconst)
        )
    }) {
        out.push_str(sql.get(copied..t.start)?);
        out.push('?');
        copied = t.end;
    }
    out.push_str(sql.get(copied..)?);
    Some(out)
}

impl Refusal {
    /// The message as the "refused" log line and the audit event's reason hold it. A refusal of
    /// text the parsers cannot read carries their message, and they quote the client's text in
    /// it: PostgreSQL the token it stopped at (`syntax error at or near "'4111 1111'"`, and for
    /// an unterminated string everything after its quote), sqlparser the token or expression it
    /// found (`found: 'secret'`, `found: $$ … $$`) or a literal it could not read
    /// (`Could not parse '99…' as u64`). Each quoted part that is not a word or an operator
    /// (a keyword, a name: what says where the text went wrong) becomes `?`. Policy refusals name
    /// roles, relations, columns and settings, never values, and pass unchanged.
    pub fn logged(&self) -> Cow<'_, str> {
        let (Refusal::Syntax(m) | Refusal::Denied(m) | Refusal::Unverifiable(m) | Refusal::TooComplex(m)) = self;
        quoted_values_left_out(m)
    }
}

/// PostgreSQL's scanner errors end in `at or near "<token>"`; the token is printed raw, quotes
/// and all, so it ends at the message's last `"`.
const PG_NEAR: &str = " at or near \"";
/// sqlparser's `Expected: …, found: <token>` and `…, found: <expression>`, followed by the
/// token's place when it has one.
const FOUND: &str = "found: ";
const SQLPARSER_PLACE: &str = " at Line: ";

/// What `Refusal::logged` leaves of `message`.
fn quoted_values_left_out(message: &str) -> Cow<'_, str> {
    if !message.contains(['"', '\'']) && !message.contains(FOUND) {
        return Cow::Borrowed(message);
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some((at, quote)) = next_quote(rest) {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        rest = match quote {
            Quoted::Near => {
                out.push_str(PG_NEAR);
                let after = from.strip_prefix(PG_NEAR).unwrap_or_default();
                match after.rsplit_once('"') {
                    Some((token, tail)) => {
                        out.push_str(word_or_mark(token));
                        out.push('"');
                        tail
                    }
                    None => {
                        out.push_str(word_or_mark(after));
                        ""
                    }
                }
            }
            Quoted::Found => {
                out.push_str(FOUND);
                let after = from.strip_prefix(FOUND).unwrap_or_default();
                let (token, tail) = after.rfind(SQLPARSER_PLACE).map_or((after, ""), |place| after.split_at(place));
                out.push_str(word_or_mark(token));
                // The place is the message's own text: no quotes, nothing more to look at.
                out.push_str(tail);
                ""
            }
            Quoted::By(q) => {
                out.push(q);
                let after = from.strip_prefix(q).unwrap_or_default();
                match after.split_once(q) {
                    Some((token, tail)) => {
                        // Between apostrophes is a string, whatever it reads like.
                        out.push_str(if q == '"' { word_or_mark(token) } else { mark(token) });
                        out.push(q);
                        tail
                    }
                    None => {
                        out.push_str(mark(after));
                        ""
                    }
                }
            }
        };
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[derive(Clone, Copy)]
enum Quoted {
    /// PostgreSQL's `at or near "…"`.
    Near,
    /// sqlparser's `found: …`.
    Found,
    /// A part between two of these quotes (an apostrophe inside a word is not one).
    By(char),
}

/// Where the next quoted part of `text` starts, and how it is quoted.
fn next_quote(text: &str) -> Option<(usize, Quoted)> {
    let mut after_word = false;
    let quote = text.char_indices().find_map(|(i, c)| {
        let opens = c == '"' || (c == '\'' && !after_word);
        after_word = c.is_alphanumeric();
        opens.then_some((i, Quoted::By(c)))
    });
    [text.find(PG_NEAR).map(|i| (i, Quoted::Near)), text.find(FOUND).map(|i| (i, Quoted::Found)), quote]
        .into_iter()
        .flatten()
        .min_by_key(|&(i, _)| i)
}

/// `token` if it is a word (a keyword or a name), a parameter (`$1`) or an operator or
/// punctuation: what a parser's message may keep; else `mark(token)` (a string in any quoting,
/// a number, an expression).
fn word_or_mark(token: &str) -> &str {
    let word = token.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && token.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.'));
    let parameter = token.strip_prefix('$').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let operator = !token.is_empty() && token.chars().all(|c| "+-*/<>=~!@#%^&|`?()[]{},;:.".contains(c));
    if word || parameter || operator { token } else { mark(token) }
}

/// `?` in place of a value; nothing for nothing (so what is logged is never longer than the
/// message).
fn mark(token: &str) -> &str {
    if token.is_empty() { token } else { "?" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_left_out_of_what_is_logged() {
        for (sql, logged) in [
            ("ALTER ROLE app PASSWORD 'hunter2'", "ALTER ROLE app PASSWORD ?"),
            (
                "CREATE USER u WITH PASSWORD $pw$it's$pw$ VALID UNTIL '2030-01-01'",
                "CREATE USER u WITH PASSWORD ? VALID UNTIL ?",
            ),
            (
                "INSERT INTO t VALUES (E'a\\'b', 42, -1.5e3, B'101', X'1F', U&'d\\0061t')",
                "INSERT INTO t VALUES (?, ?, -?, ?, ?, ?)",
            ),
            ("SELECT \"it's\", $1, 'a' 'b' -- 'kept: a comment'", "SELECT \"it's\", $1, ? ? -- 'kept: a comment'"),
            ("SELECT 1; SELECT 'x'", "SELECT ?; SELECT ?"),
            ("VACUUM", "VACUUM"),
        ] {
            assert_eq!(without_constants(sql).as_deref(), Some(logged), "{sql}");
        }
        // Unreadable: nothing of it is logged.
        assert_eq!(without_constants("SELECT 'unterminated"), None);
    }

    #[test]
    fn parser_messages_keep_words_and_operators_and_lose_values() {
        for (message, logged) in [
            ("refused: cannot parse SQL: syntax error at or near \"FROM\"", None),
            ("refused: cannot parse SQL: syntax error at or near \"'SECRET'\"", Some("syntax error at or near \"?\"")),
            (
                "refused: cannot parse SQL: unterminated quoted string at or near \"'SECRET \"x\" more\"",
                Some("unterminated quoted string at or near \"?\""),
            ),
            ("trailing junk after numeric literal at or near \"4111x\"", Some("literal at or near \"?\"")),
            ("syntax error at or near \")\"", None),
            ("syntax error at or near \"$1\"", None),
            ("syntax error at end of input", None),
            (
                "Expected: end of statement, found: 'SECRET' at Line: 1, Column: 17",
                Some("found: ? at Line: 1, Column: 17"),
            ),
            ("Expected: end of statement, found: 4111 at Line: 1, Column: 17", Some("found: ? at Line: 1, Column: 17")),
            ("Expected: an expression, found: EOF", None),
            ("Expected an expression, found: a = 'SECRET'", Some("found: ?")),
            ("Could not parse 'SECRET' as u64: number too large at Line: 1, Column: 3", Some("parse '?' as u64")),
            (
                "refused: statement and portal names starting with __struere_ are reserved by the proxy (\"__struere_x\")",
                None,
            ),
            ("refused: PostgreSQL's printing of it reads differently; the proxy's own", None),
            ("refused: unterminated \"SECRET", Some("unterminated \"?")),
            ("refused: cannot parse SQL: syntax error at or near \"'SECRET", Some("at or near \"?")),
            ("Expected: an expression, found: ''", Some("found: ?")),
            ("a '' b \"\" c", None),
        ] {
            let refusal = Refusal::Syntax(message.to_owned());
            let got = refusal.logged();
            match logged {
                None => assert_eq!(got, message, "nothing of it is a value"),
                Some(part) => {
                    assert!(got.contains(part), "{got:?} lacks {part:?}");
                    assert!(!got.contains("SECRET") && !got.contains("4111"), "{got:?}");
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn what_is_logged_is_never_longer_than_the_message(message in "(.|'|\"| at or near \"|found: | at Line: )*") {
            proptest::prop_assert!(quoted_values_left_out(&message).len() <= message.len());
        }
    }

    /// The parsers' real messages for texts with values where they stop.
    #[test]
    fn refusals_of_unreadable_texts_log_no_value() {
        use crate::rewrite::tests::rewrite;
        for sql in [
            "SELECT 'x' 'SECRET-1'",
            "SELECT 1 FROM t WHERE a = 'SECRET-2",
            "SELECT 'x' FROM t WHERE a = $q$SECRET-3",
            "SELECT 41114111x",
            "SELECT 1 FROM t GROUP BY DISTINCT 'SECRET-5'",
            "SELECT '1'::int 'SECRET-6'",
        ] {
            let refusal = rewrite(sql).expect_err(sql);
            let (told, logged) = (refusal.to_string(), refusal.logged());
            // The client is told what it sent; the log does not hold it.
            assert!(told.contains("SECRET") || told.contains("4111"), "{sql}: {told}");
            assert!(!logged.contains("SECRET") && !logged.contains("4111"), "{sql}: {logged}");
            let marked = logged.contains(" at or near \"?\"") || logged.contains("found: ? at Line");
            assert!(logged.starts_with("refused: ") && marked, "{sql}: {logged}");
        }
    }
}
