//! Step 5: a printer that never guesses.
//!
//! sqlparser's `Display` is not safe for literals or quoted identifiers: it decides whether a
//! quote inside a value is "already escaped" by looking at its neighbours, so the value
//! `a\'; DROP TABLE y; --` prints as `'a\'; DROP TABLE y; --'` — two statements to PostgreSQL —
//! and `x''y` prints as `'x''y'`, losing a quote.
//!
//! So the printer never lets `Display` write client data. Every string-like `Value` and every
//! quoted `Ident` is swapped for a sentinel (a placeholder `Display` writes verbatim, carrying
//! a random per-call nonce and an index); the statement is displayed; then each sentinel, which
//! must occur exactly once, is replaced by text we write ourselves:
//!
//! * strings (standard, `E''`, `U&''`, dollar-quoted): `'` + value with `'` doubled + `'`. That
//!   is exact because the proxy pins `standard_conforming_strings = on` (see `gate`);
//! * national strings: `N'…'`; bit strings `B'…'` and hex strings `X'…'` after checking
//!   their digits;
//! * quoted identifiers: `"` + value with `"` doubled + `"`.
//!
//! A few statements keep a string in a plain `String` field that `Display` wraps in quotes
//! without any escaping (the NOTIFY payload, COMMENT ON's text, COPY's NULL/ENCODING options);
//! those get a sentinel of their own kind, replaced together with the quotes around it. Any
//! other such field is left to `Display`, and the verifier refuses the unexpected string.
//!
//! Unquoted identifiers stay as written when they are plain words (PostgreSQL folds them just
//! as it would have folded the client's text); anything else is refused. The sequence of
//! replacements in print order is what the verifier compares PostgreSQL's lexer output with.
//!
//! Invariant: client data (string literals, quoted identifiers) is printed only from its decoded value with exact
//! quoting, so printed text can never contain more statements or different literals than the tree it was printed from.

use std::ops::ControlFlow;

use sqlparser::ast::{CopyOption, Ident, Statement, Value, ValueWithSpan, VisitMut, VisitorMut};

use super::Refusal;

/// One piece of client data the printer wrote itself, in print order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Emitted {
    /// `'…'`
    Str(String),
    /// `N'…'`
    National(String),
    /// `B'…'` (digits 0/1)
    Bit(String),
    /// `X'…'` (hex digits)
    Hex(String),
    /// `"…"`
    QuotedIdent(String),
}

impl Emitted {
    fn render(&self, out: &mut String) {
        match self {
            Emitted::Str(v) => push_string_literal(out, v),
            Emitted::National(v) => {
                out.push('N');
                push_doubled(out, v, '\'');
            }
            Emitted::Bit(v) => {
                out.push('B');
                push_doubled(out, v, '\'');
            }
            Emitted::Hex(v) => {
                out.push('X');
                push_doubled(out, v, '\'');
            }
            Emitted::QuotedIdent(v) => push_doubled(out, v, '"'),
        }
    }
}

/// A standard string literal for `value`, exactly as the printer writes one (literal
/// normalisation fills templates with it: `shape.rs`).
pub(crate) fn push_string_literal(out: &mut String, value: &str) {
    push_doubled(out, value, '\'');
}

/// A quoted identifier for `name`, exactly as the printer writes one: `"` + the name with every
/// `"` doubled + `"` (PostgreSQL reads it as exactly `name`, whatever it holds).
pub(crate) fn push_quoted_ident(out: &mut String, name: &str) {
    push_doubled(out, name, '"');
}

fn push_doubled(out: &mut String, value: &str, quote: char) {
    out.push(quote);
    // Runs are copied whole, each quote doubled where its run ends.
    for run in value.split_inclusive(quote) {
        out.push_str(run);
        if run.ends_with(quote) {
            out.push(quote);
        }
    }
    out.push(quote);
}

/// A printed statement and the client data in it, in the order it appears in `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Printed {
    pub text: String,
    pub emitted: Vec<Emitted>,
}

/// An identifier the rewriter itself adds (a policy column, a schema): folded to lower case
/// the way PostgreSQL folds an unquoted name, then quoted, so it can never be read as a keyword
/// or change case. (PostgreSQL folds only ASCII letters; so does this.)
pub fn quoted_ident(name: &str) -> Ident {
    Ident::with_quote('"', name.to_ascii_lowercase())
}

/// Prints `stmt` (consumed: its values are replaced by sentinels on the way).
pub(crate) fn print(mut stmt: Statement) -> Result<Printed, Refusal> {
    let nonce = nonce()?;
    let mut swapper = Swapper { prefix: format!("_struere{nonce}"), items: Vec::new(), refusal: None };
    if let ControlFlow::Break(()) = stmt.visit(&mut swapper) {
        return Err(swapper.refusal.unwrap_or_else(|| cannot_print("an unsupported value")));
    }
    let displayed = stmt.to_string();
    substitute(&displayed, &swapper.prefix, swapper.items)
}

fn nonce() -> Result<String, Refusal> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| Refusal::Unverifiable(format!("refused: the proxy could not draw a random nonce: {e}")))?;
    Ok(hex::encode(bytes))
}

fn nul_refusal() -> Refusal {
    Refusal::Syntax("refused: a string literal contains a NUL character".to_string())
}

fn cannot_print(what: &str) -> Refusal {
    Refusal::Unverifiable(format!("refused: the proxy cannot safely print {what}"))
}

/// Marker after the nonce: the sentinel stands alone / sits inside quotes `Display` wrote.
const BARE: char = 'x';
const QUOTED: char = 'y';

/// What sentinel `i` stands for.
struct Slot {
    item: Emitted,
    quoted_by_display: bool,
}

/// Replaces client data by sentinels; `items[i]` is what sentinel `i` stands for.
struct Swapper {
    prefix: String,
    items: Vec<Slot>,
    refusal: Option<Refusal>,
}

impl Swapper {
    /// A sentinel for a value `Display` writes bare (a `Value::Placeholder` or an `Ident`).
    fn sentinel(&mut self, item: Emitted) -> String {
        let s = self.next_name(BARE);
        self.items.push(Slot { item, quoted_by_display: false });
        s
    }

    /// `<prefix><marker><index>_` for the next item. Built by hand: a miss names dozens, and
    /// `format!` cost about a thousand instructions each.
    fn next_name(&self, marker: char) -> String {
        let mut digits = [0u8; 20];
        let mut n = self.items.len();
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let digits = &digits[start..];
        let mut s = String::with_capacity(self.prefix.len() + 2 + digits.len());
        s.push_str(&self.prefix);
        s.push(marker);
        // ASCII digits.
        s.extend(digits.iter().map(|&d| char::from(d)));
        s.push('_');
        s
    }

    /// A sentinel for a plain `String` field that `Display` writes as `'{field}'` without
    /// escaping (e.g. the NOTIFY payload); the quotes it adds are replaced along with it.
    fn quoted_sentinel(&mut self, value: &mut String) -> Result<(), Refusal> {
        if value.contains('\0') {
            return Err(nul_refusal());
        }
        let s = self.next_name(QUOTED);
        self.items.push(Slot { item: Emitted::Str(std::mem::replace(value, s)), quoted_by_display: true });
        Ok(())
    }

    fn refuse(&mut self, refusal: Refusal) -> ControlFlow<()> {
        self.refusal = Some(refusal);
        ControlFlow::Break(())
    }
}

impl VisitorMut for Swapper {
    type Break = ();

    /// Strings sqlparser keeps as plain `String` fields rather than `Value`s, for the
    /// statements where that matters in practice. Any other such field is printed by `Display`
    /// itself; the verifier then finds a string the printer did not write and refuses.
    fn pre_visit_statement(&mut self, stmt: &mut Statement) -> ControlFlow<()> {
        let result = match stmt {
            Statement::NOTIFY { payload: Some(payload), .. } => self.quoted_sentinel(payload),
            Statement::Comment { comment: Some(comment), .. } => self.quoted_sentinel(comment),
            Statement::Copy { payload: Some(_), .. } => {
                Err(cannot_print("COPY with inline data (send the data as CopyData messages)"))
            }
            Statement::Copy { options, .. } => options.iter_mut().try_for_each(|option| match option {
                CopyOption::Null(s) | CopyOption::Encoding(s) => self.quoted_sentinel(s),
                _ => Ok(()),
            }),
            _ => Ok(()),
        };
        match result {
            Ok(()) => ControlFlow::Continue(()),
            Err(refusal) => self.refuse(refusal),
        }
    }

    fn pre_visit_value(&mut self, value: &mut ValueWithSpan) -> ControlFlow<()> {
        let item = match &value.value {
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) | Value::UnicodeStringLiteral(s) => {
                Emitted::Str(s.clone())
            }
            Value::DollarQuotedString(d) => Emitted::Str(d.value.clone()),
            Value::NationalStringLiteral(s) => Emitted::National(s.clone()),
            Value::SingleQuotedByteStringLiteral(s) => {
                if !s.chars().all(|c| c == '0' || c == '1') {
                    return self.refuse(cannot_print("a bit-string literal with non-binary digits"));
                }
                Emitted::Bit(s.clone())
            }
            Value::HexStringLiteral(s) => {
                if !s.chars().all(|c| c.is_ascii_hexdigit()) {
                    return self.refuse(cannot_print("a hex-string literal with non-hex digits"));
                }
                Emitted::Hex(s.clone())
            }
            Value::Number(n, long) => {
                // Printed verbatim by Display, so it must be a plain numeric token.
                let plain = !*long
                    && n.starts_with(|c: char| c.is_ascii_digit() || c == '.')
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
                if !plain {
                    return self.refuse(cannot_print(&format!("the number {n:?}")));
                }
                return ControlFlow::Continue(());
            }
            Value::Placeholder(p) => {
                // Only PostgreSQL's `$n` parameters are placeholders to PostgreSQL.
                let is_param =
                    p.strip_prefix('$').is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()));
                if !is_param {
                    return self.refuse(cannot_print(&format!("the placeholder {p:?}")));
                }
                return ControlFlow::Continue(());
            }
            Value::Boolean(_) | Value::Null => return ControlFlow::Continue(()),
            // Other dialects' literal syntaxes (triple-quoted, raw, "double quoted" strings, Q'…')
            // mean something else, or nothing, to PostgreSQL.
            other => {
                return self.refuse(cannot_print(&format!(
                    "a literal of a kind PostgreSQL does not have ({})",
                    value_kind(other)
                )));
            }
        };
        if item_has_nul(&item) {
            return self.refuse(nul_refusal());
        }
        let sentinel = self.sentinel(item);
        value.value = Value::Placeholder(sentinel);
        ControlFlow::Continue(())
    }

    fn pre_visit_ident(&mut self, ident: &mut Ident) -> ControlFlow<()> {
        if ident.value.contains('\0') {
            return self.refuse(Refusal::Syntax("refused: an identifier contains a NUL character".to_string()));
        }
        match ident.quote_style {
            Some('"') => {
                let sentinel = self.sentinel(Emitted::QuotedIdent(ident.value.clone()));
                ident.value = sentinel;
                ident.quote_style = None;
                ControlFlow::Continue(())
            }
            // sqlparser keeps a few string literals as identifiers quoted with `'` (the labels
            // of `CREATE TYPE … AS ENUM ('a', 'b')`): printed as the string literal they are.
            Some('\'') => {
                let sentinel = self.sentinel(Emitted::Str(ident.value.clone()));
                ident.value = sentinel;
                ident.quote_style = None;
                ControlFlow::Continue(())
            }
            // `*` appears as an identifier in `UNLISTEN *`; it is one operator token either way.
            None if is_plain_word(&ident.value) || ident.value == "*" => ControlFlow::Continue(()),
            None => self.refuse(cannot_print(&format!("the identifier {:?}", ident.value))),
            Some(q) => self.refuse(cannot_print(&format!("an identifier quoted with {q:?}"))),
        }
    }
}

/// A word PostgreSQL's lexer reads as one unquoted identifier (or keyword) and folds exactly
/// as it folded the client's text: ASCII letters, digits, `_`, `$`, or non-ASCII letters, not
/// starting with a digit or `$`.
fn is_plain_word(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$' || (!c.is_ascii() && c.is_alphabetic());
    match s.chars().next() {
        Some(first) => !first.is_ascii_digit() && first != '$' && s.chars().all(ok),
        None => false,
    }
}

fn item_has_nul(item: &Emitted) -> bool {
    match item {
        Emitted::Str(v) | Emitted::National(v) | Emitted::Bit(v) | Emitted::Hex(v) | Emitted::QuotedIdent(v) => {
            v.contains('\0')
        }
    }
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::TripleSingleQuotedString(_) | Value::TripleDoubleQuotedString(_) => "triple-quoted string",
        Value::DoubleQuotedString(_) => "double-quoted string",
        Value::DoubleQuotedByteStringLiteral(_)
        | Value::TripleSingleQuotedByteStringLiteral(_)
        | Value::TripleDoubleQuotedByteStringLiteral(_) => "byte string",
        Value::SingleQuotedRawStringLiteral(_)
        | Value::DoubleQuotedRawStringLiteral(_)
        | Value::TripleSingleQuotedRawStringLiteral(_)
        | Value::TripleDoubleQuotedRawStringLiteral(_) => "raw string",
        Value::QuoteDelimitedStringLiteral(_) | Value::NationalQuoteDelimitedStringLiteral(_) => {
            "quote-delimited string"
        }
        _ => "other",
    }
}

/// Replaces each sentinel in `displayed` by its rendering. Every sentinel must appear exactly
/// once (and a quoted one between the quotes `Display` wrote); the order of appearance is the
/// print order returned in `Printed::emitted`.
fn substitute(displayed: &str, prefix: &str, items: Vec<Slot>) -> Result<Printed, Refusal> {
    let malformed = || cannot_print("this statement (a malformed value marker was printed)");
    let mut slots: Vec<Option<Slot>> = items.into_iter().map(Some).collect();
    let mut text = String::with_capacity(displayed.len() + 16 * slots.len());
    let mut emitted = Vec::with_capacity(slots.len());
    let mut rest = displayed;
    // One searcher for every sentinel (`str::find` would build one per call: a few percent of a
    // cache miss).
    let finder = memchr::memmem::Finder::new(prefix.as_bytes());
    while let Some(pos) = finder.find(rest.as_bytes()) {
        let (before, from_prefix) = rest.split_at_checked(pos).ok_or_else(malformed)?;
        let after_prefix = from_prefix.strip_prefix(prefix).ok_or_else(malformed)?;
        let (quoted, after_marker) = if let Some(r) = after_prefix.strip_prefix(BARE) {
            (false, r)
        } else if let Some(r) = after_prefix.strip_prefix(QUOTED) {
            (true, r)
        } else {
            return Err(malformed());
        };
        let digits_len = after_marker.bytes().take_while(u8::is_ascii_digit).count();
        let (digits, after_digits) = after_marker.split_at_checked(digits_len).ok_or_else(malformed)?;
        let (Ok(index), Some(mut after)) = (digits.parse::<usize>(), after_digits.strip_prefix('_')) else {
            return Err(malformed());
        };
        let Some(slot) = slots.get_mut(index).and_then(Option::take) else {
            return Err(cannot_print("this statement (a value was printed twice)"));
        };
        if slot.quoted_by_display != quoted {
            return Err(malformed());
        }
        if quoted {
            // Drop the quotes Display put around the sentinel; the rendering brings its own.
            let (Some(b), Some(a)) = (before.strip_suffix('\''), after.strip_prefix('\'')) else {
                return Err(malformed());
            };
            text.push_str(b);
            after = a;
        } else {
            text.push_str(before);
        }
        slot.item.render(&mut text);
        emitted.push(slot.item);
        rest = after;
    }
    text.push_str(rest);
    if slots.iter().any(Option::is_some) {
        return Err(cannot_print("this statement (a value was dropped while printing)"));
    }
    Ok(Printed { text, emitted })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    fn print_sql(sql: &str) -> Result<Printed, Refusal> {
        let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql).unwrap();
        assert_eq!(stmts.len(), 1);
        print(stmts.remove(0))
    }

    /// Replaces the select list of a `SELECT` statement by one expression.
    fn set_projection(stmt: &mut Statement, expr: sqlparser::ast::Expr) {
        let Statement::Query(q) = stmt else { panic!("not a query") };
        let sqlparser::ast::SetExpr::Select(s) = q.body.as_mut() else { panic!("not a select") };
        s.projection = vec![sqlparser::ast::SelectItem::UnnamedExpr(expr)];
    }

    fn text(sql: &str) -> String {
        print_sql(sql).unwrap().text
    }

    #[test]
    fn sentinel_names_are_prefix_marker_index() {
        let mut swapper = Swapper { prefix: "_struere7".to_owned(), items: Vec::new(), refusal: None };
        for n in 0..=1234usize {
            assert_eq!(swapper.next_name(BARE), format!("_struere7{BARE}{n}_"));
            assert_eq!(swapper.next_name(QUOTED), format!("_struere7{QUOTED}{n}_"));
            swapper.items.push(Slot { item: Emitted::Str(String::new()), quoted_by_display: false });
        }
    }

    #[test]
    fn strings_are_printed_with_doubled_quotes_only() {
        let p = print_sql("SELECT * FROM t WHERE name = 'a\\''; DROP TABLE y; --'").unwrap();
        assert_eq!(p.text, "SELECT * FROM t WHERE name = 'a\\''; DROP TABLE y; --'");
        assert_eq!(p.emitted, [Emitted::Str("a\\'; DROP TABLE y; --".into())]);
        assert_eq!(text("SELECT 'x''''y'"), "SELECT 'x''''y'");
        assert_eq!(text("SELECT E'it\\'s', E'\\\\x41'"), "SELECT 'it''s', '\\x41'");
        assert_eq!(text("SELECT $$a'b$$, $tag$ $$ $tag$"), "SELECT 'a''b', ' $$ '");
        assert_eq!(text("SELECT U&'d\\0061t\\+000061'"), "SELECT 'data'");
        assert_eq!(text("SELECT N'a''b', B'0101', X'fF'"), "SELECT N'a''b', B'0101', X'fF'");
    }

    #[test]
    fn enum_labels_are_printed_as_string_literals() {
        let p = print_sql("CREATE TYPE mood AS ENUM ('sad', 'it''s ok', 'a\\''); DROP TABLE y; --')").unwrap();
        assert_eq!(p.text, "CREATE TYPE mood AS ENUM ('sad', 'it''s ok', 'a\\''); DROP TABLE y; --')");
        assert_eq!(
            p.emitted,
            [
                Emitted::Str("sad".into()),
                Emitted::Str("it's ok".into()),
                Emitted::Str("a\\'); DROP TABLE y; --".into())
            ]
        );
    }

    #[test]
    fn emitted_follows_print_order() {
        let p = print_sql("SELECT \"B\" FROM \"T\" WHERE x = 'one' AND y = E'two'").unwrap();
        assert_eq!(
            p.emitted,
            [
                Emitted::QuotedIdent("B".into()),
                Emitted::QuotedIdent("T".into()),
                Emitted::Str("one".into()),
                Emitted::Str("two".into())
            ]
        );
    }

    #[test]
    fn identifiers_keep_their_meaning() {
        assert_eq!(
            text("SELECT \"Select\", \"user\", \"MiXeD\", \"a\"\"b\", \"back\\slash\", Foo FROM s.\"T\""),
            "SELECT \"Select\", \"user\", \"MiXeD\", \"a\"\"b\", \"back\\slash\", Foo FROM s.\"T\""
        );
        assert_eq!(text("SELECT é FROM café"), "SELECT é FROM café");
    }

    #[test]
    fn numbers_parameters_and_keywords_pass_through() {
        assert_eq!(text("SELECT 1, 1.5e-3, $1, NULL, true"), "SELECT 1, 1.5e-3, $1, NULL, true");
    }

    #[test]
    fn quoted_ident_folds_and_quotes() {
        let i = quoted_ident("Tenant_ID");
        assert_eq!(i.value, "tenant_id");
        assert_eq!(i.quote_style, Some('"'));
        let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, "SELECT a FROM t").unwrap();
        set_projection(&mut stmts[0], sqlparser::ast::Expr::Identifier(quoted_ident("Org\"Id")));
        assert_eq!(print(stmts.remove(0)).unwrap().text, "SELECT \"org\"\"id\" FROM t");
    }

    #[test]
    fn plain_words() {
        for ok in ["a", "A_b$1", "_x", "été", "Ωmega"] {
            assert!(is_plain_word(ok), "{ok}");
        }
        for bad in ["", "1a", "$a", "a b", "a\"b", "a-b", "a;b", "😀"] {
            assert!(!is_plain_word(bad), "{bad}");
        }
    }

    #[test]
    fn substitute_requires_each_sentinel_exactly_once() {
        let bare = || vec![Slot { item: Emitted::Str("v".into()), quoted_by_display: false }];
        assert_eq!(substitute("a Px0_ b", "P", bare()).unwrap().text, "a 'v' b");
        assert!(substitute("a Px0_ Px0_", "P", bare()).is_err());
        assert!(substitute("a b", "P", bare()).is_err());
        assert!(substitute("a Px1_", "P", bare()).is_err());
        assert!(substitute("a Px0", "P", bare()).is_err());
        assert!(substitute("a Pxx_", "P", bare()).is_err());
        assert!(substitute("a Pz0_", "P", bare()).is_err());
        assert!(substitute("a 'Py0_'", "P", bare()).is_err());
        let quoted = || vec![Slot { item: Emitted::Str("it's".into()), quoted_by_display: true }];
        assert_eq!(substitute("a 'Py0_' b", "P", quoted()).unwrap().text, "a 'it''s' b");
        assert!(substitute("a Py0_ b", "P", quoted()).is_err());
        assert!(substitute("a 'Px0_' b", "P", quoted()).is_err());
    }

    #[test]
    fn values_without_a_postgres_meaning_are_refused() {
        let mut stmts = Parser::parse_sql(&PostgreSqlDialect {}, "SELECT 1").unwrap();
        set_projection(&mut stmts[0], sqlparser::ast::Expr::Value(Value::DoubleQuotedString("x".into()).into()));
        assert!(matches!(print(stmts.remove(0)), Err(Refusal::Unverifiable(_))));
    }
}
