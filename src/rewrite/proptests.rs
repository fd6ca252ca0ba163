//! Property tests: literal values survive every PostgreSQL string syntax exactly, and no input
//! makes the rewriter panic.

use proptest::prelude::*;

use super::tests::{literals, pg_kinds, rewrite};
use super::*;

/// Values biased towards the characters that matter to quoting, plus arbitrary unicode.
fn value() -> impl Strategy<Value = String> {
    let special = prop::sample::select(vec![
        '\'', '\\', '$', '"', ';', '-', '/', '*', '\n', '\r', '\t', ' ', 'a', 'E', 'U', '&', 't', 'q', '0', 'x', 'é',
        '😀', '\u{8}', '\u{c}',
    ]);
    let any_char = any::<char>().prop_filter("PostgreSQL text cannot hold NUL", |c| *c != '\0');
    prop::collection::vec(prop_oneof![4 => special, 1 => any_char], 0..24).prop_map(|chars| chars.into_iter().collect())
}

/// How a value is written as a literal; the `u8` picks among equivalent spellings per char.
#[derive(Debug, Clone)]
enum Syntax {
    Standard,
    Escape(Vec<u8>),
    Dollar,
    Unicode(Vec<u8>),
}

fn syntax() -> impl Strategy<Value = Syntax> {
    let choices = || prop::collection::vec(any::<u8>(), 24);
    prop_oneof![
        Just(Syntax::Standard),
        choices().prop_map(Syntax::Escape),
        Just(Syntax::Dollar),
        choices().prop_map(Syntax::Unicode),
    ]
}

fn literal(value: &str, syntax: &Syntax) -> String {
    match syntax {
        Syntax::Standard => format!("'{}'", value.replace('\'', "''")),
        Syntax::Escape(choices) => {
            let mut out = String::from("E'");
            for (i, c) in value.chars().enumerate() {
                let pick = choices.get(i).copied().unwrap_or(0) % 4;
                match (c, pick) {
                    ('\'', 0 | 1) => out.push_str("\\'"),
                    ('\'', _) => out.push_str("''"),
                    ('\\', _) => out.push_str("\\\\"),
                    ('\n', 0) => out.push_str("\\n"),
                    ('\r', 0) => out.push_str("\\r"),
                    ('\t', 0) => out.push_str("\\t"),
                    ('\u{8}', _) => out.push_str("\\b"),
                    ('\u{c}', _) => out.push_str("\\f"),
                    // Fixed-width escapes, so a following digit is never taken as part of them.
                    (c, 1) if c.is_ascii() => out.push_str(&format!("\\x{:02x}", c as u32)),
                    (c, 2) if c.is_ascii() => out.push_str(&format!("\\{:03o}", c as u32)),
                    (c, 1) if (c as u32) <= 0xFFFF => out.push_str(&format!("\\u{:04X}", c as u32)),
                    (c, 2) => out.push_str(&format!("\\U{:08x}", c as u32)),
                    (c, _) => out.push(c),
                }
            }
            out.push('\'');
            out
        }
        Syntax::Dollar => {
            // The first tag whose closing delimiter does not occur early inside the value.
            let tag = (0..)
                .map(|i| if i == 0 { String::new() } else { format!("q{i}") })
                .find(|tag| {
                    let delim = format!("${tag}$");
                    format!("{value}{delim}").find(&delim) == Some(value.len())
                })
                .unwrap();
            format!("${tag}${value}${tag}$")
        }
        Syntax::Unicode(choices) => {
            let mut out = String::from("U&'");
            for (i, c) in value.chars().enumerate() {
                let pick = choices.get(i).copied().unwrap_or(0) % 3;
                match (c, pick) {
                    ('\'', _) => out.push_str("''"),
                    ('\\', _) => out.push_str("\\\\"),
                    (c, 0) if c.is_ascii() => out.push(c),
                    (c, _) if (c as u32) <= 0xFFFF => out.push_str(&format!("\\{:04X}", c as u32)),
                    (c, _) => out.push_str(&format!("\\+{:06X}", c as u32)),
                }
            }
            out.push('\'');
            out
        }
    }
}

/// Fragments for generating SQL-shaped noise: keywords, quotes, comments, operators.
fn sql_soup() -> impl Strategy<Value = String> {
    let fragment = prop::sample::select(vec![
        "SELECT",
        "FROM",
        "WHERE",
        "t",
        "a",
        "\"A\"",
        "'x'",
        "'",
        "\"",
        "E'\\''",
        "E'",
        "$$",
        "$q$",
        "$1",
        "(",
        ")",
        ",",
        ";",
        "--",
        "/*",
        "*/",
        "AND",
        "OR",
        "NOT",
        "=",
        "+",
        "-",
        "::",
        "int",
        "SET",
        "search_path",
        "ROLE",
        "set_config",
        "BEGIN",
        "COMMIT",
        "INSERT",
        "INTO",
        "VALUES",
        "UPDATE",
        "DELETE",
        "JOIN",
        "ON",
        "U&",
        "\\",
        "\n",
        " ",
        "N",
        "B'01'",
        "X'ff'",
        "CASE",
        "WHEN",
        "THEN",
        "END",
        "ARRAY[",
        "]",
        "1",
        "1e5",
        "NULL",
        "true",
        "RESET",
        "ALL",
        "SHOW",
        "DO",
        "WITH",
        "AS",
        "UNION",
        "ORDER BY",
        "LIMIT",
        "é",
        "😀",
    ]);
    (prop::collection::vec(fragment, 0..30), any::<bool>())
        .prop_map(|(parts, spaced)| parts.join(if spaced { " " } else { "" }))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn literal_values_survive_every_syntax(value in value(), syntax in syntax(), filtered in any::<bool>()) {
        let lit = literal(&value, &syntax);
        let sql = if filtered { format!("SELECT * FROM t WHERE a = {lit}") } else { format!("SELECT {lit}") };
        prop_assert_eq!(pg_kinds(&sql), ["SelectStmt"], "test premise: PostgreSQL accepts {:?}", sql);
        let out = rewrite(&sql).map_err(|e| TestCaseError::fail(format!("{sql:?} refused: {e}")))?;
        prop_assert_eq!(&*out.statement_kinds, &["SelectStmt"]);
        prop_assert_eq!(pg_kinds(&out.sql), ["SelectStmt"]);
        prop_assert_eq!(literals(&out.sql), [value]);
        prop_assert_eq!(&rewrite(&out.sql).unwrap().sql, &out.sql);
    }

    #[test]
    fn values_where_a_refused_text_stops_never_reach_the_logged_reason(
        value in value(),
        syntax in syntax(),
        unterminated in any::<bool>(),
    ) {
        let lit = literal(&format!("VAL{value}"), &syntax);
        // PostgreSQL stops at the second of two adjacent constants, or at an unterminated one
        // (quoted in its message to the end of the text).
        let sql = if unterminated {
            format!("SELECT 1 WHERE a = {}", &lit[..lit.len() - 1])
        } else {
            format!("SELECT 'x' {lit}")
        };
        let Err(refusal) = rewrite(&sql) else { return Err(TestCaseError::reject("accepted")) };
        // The client is told what it sent (unless an escape spelled the marker).
        prop_assume!(refusal.to_string().contains("VAL"));
        prop_assert!(!refusal.logged().contains("VAL"), "{:?} logged as {:?}", sql, refusal.logged());
    }

    #[test]
    fn arbitrary_text_never_panics(sql in any::<String>().prop_filter("no NUL", |s| !s.contains('\0'))) {
        check_never_panics(&sql)?;
    }

    #[test]
    fn sql_shaped_noise_never_panics(sql in sql_soup()) {
        check_never_panics(&sql)?;
    }
}

fn check_never_panics(sql: &str) -> Result<(), TestCaseError> {
    match rewrite(sql) {
        Ok(out) => {
            // Whatever is accepted keeps PostgreSQL's reading and is a fixed point.
            prop_assert_eq!(&pg_kinds(&out.sql), &*out.statement_kinds);
            prop_assert_eq!(&pg_kinds(sql), &*out.statement_kinds);
            prop_assert_eq!(&rewrite(&out.sql).unwrap().sql, &out.sql);
        }
        Err(e) => {
            prop_assert_ne!(e.to_string(), INTERNAL_ERROR, "{:?} panicked the rewriter", sql);
            // What is logged of it is worked out without panicking either.
            prop_assert!(e.logged().len() <= e.to_string().len());
        }
    }
    Ok(())
}
