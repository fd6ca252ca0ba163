//! Literal normalisation for the rewrite cache: statements that differ only in literal values
//! (pgbench's `WHERE aid = 48213`, an ORM's inlined ids) share one verified rewrite, with the
//! literals re-inserted.
//!
//! * `scan` is a cheap lexer pass (no parse) that turns a text into its *shape*: the text with
//!   every numeric and plain string literal replaced by a marker of its class, and the literals.
//!   It handles a deliberately small subset of the lexical grammar and gives up (no shape, the
//!   exact-text cache still applies) on anything else: comments, dollar quotes, prefixed strings
//!   (`E''`, `B''`, `U&''`…), string continuation across lines, numbers glued to other tokens.
//! * `Template::build` runs once per shape, on its second miss (the first only notes the shape:
//!   a text seen once never pays for a template). It decides which literals are *slots*:
//!   only those that sqlparser's tree shows in a value position no decision of the rewriter
//!   depends on — an operand of `= <> < <= > >=`, `IN (…)` or `BETWEEN` whose other side is a
//!   plain column reference. JSON keys (`data->>'guardianPhone'`), function arguments (setting
//!   names, channels), VALUES and SET items (the type column picks the rules) are never slots:
//!   they stay part of the key, compared exactly. The rewriter's only use of such operands is
//!   their class (integer / bigint / numeric / string: `guard.rs`), which the key keeps.
//!   It rewrites a probe text with a unique sentinel in each slot, cuts the verified output at
//!   the sentinels, and keeps the template only if filling it with the original literals gives
//!   back exactly the original's verified rewrite.
//! * A hit fills the template: numbers as their digits, strings through the printer's own
//!   guess-free quoting (`printer::push_string_literal`), so the text sent is what a miss would
//!   have printed and verified.
//!
//! * The template also gives a *parameterised form* (`Bound`): the same text with `$k` in each
//!   slot, typed by the literal's class, and the literal values. It is kept only if PostgreSQL's
//!   parser reads it as one statement of the original's kind holding exactly one parameter per
//!   slot (a `$k` anywhere else — inside a string, after a type name — fails that). Sessions
//!   prepare it once per upstream connection and bind the values (`session/statements.rs`):
//!   values travel as data, never as text to quote.
//!
//! Invariant: a template is only ever filled with literals of the same class in the same
//! positions of a text whose every other byte equals the text it was built from, and its
//! non-slot literals must match exactly.

use std::sync::Arc;

use sqlparser::ast::{BinaryOperator, CastKind, Expr, InTarget, Spanned, UnaryOperator, Value};

use super::Rewritten;

/// Marks a literal in a shape's key (the byte cannot occur in a text that has a shape).
const MARK: char = '\u{1}';

/// What the rewriter can tell apart about a literal: PostgreSQL types an integer literal by its
/// size and a decimal one as numeric; strings are untyped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Int4,
    Int8,
    Numeric,
    Str,
}

impl Class {
    fn tag(self) -> char {
        match self {
            Class::Int4 => 'i',
            Class::Int8 => 'l',
            Class::Numeric => 'n',
            Class::Str => 's',
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lit<'a> {
    /// The token as written (`42`, `'it''s'`).
    pub text: &'a str,
    pub start: usize,
    pub class: Class,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shape<'a> {
    pub key: String,
    pub literals: Vec<Lit<'a>>,
}

/// A byte that continues an identifier (PostgreSQL's `ident_cont`, any byte of a multi-byte
/// character included). `BYTE_CLASS` is derived from it.
const fn ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// What a byte can start, for `scan` (one table lookup per byte instead of a chain of tests).
#[derive(Clone, Copy, PartialEq, Eq)]
enum ByteClass {
    /// Nothing `scan` looks at: whitespace, operators, punctuation.
    Plain,
    /// A letter, `_` or a byte of a multi-byte character: an identifier or keyword starts.
    Word,
    Digit,
    Dollar,
    Quote,
    DoubleQuote,
    Dash,
    Slash,
}

const BYTE_CLASS: [ByteClass; 256] = {
    let mut table = [ByteClass::Plain; 256];
    let mut b = 0usize;
    while b < 256 {
        // `b < 256`: the cast is exact.
        let byte = b as u8;
        table[b] = match byte {
            b'0'..=b'9' => ByteClass::Digit,
            b'$' => ByteClass::Dollar,
            b'\'' => ByteClass::Quote,
            b'"' => ByteClass::DoubleQuote,
            b'-' => ByteClass::Dash,
            b'/' => ByteClass::Slash,
            // The identifier bytes other than digits and `$`, which the arms above took.
            _ if ident_byte(byte) => ByteClass::Word,
            _ => ByteClass::Plain,
        };
        b += 1;
    }
    table
};

fn class_of(b: u8) -> ByteClass {
    BYTE_CLASS[usize::from(b)]
}

/// The end of the run of identifier bytes (`ident_byte`) starting at `i`. The classes are the
/// table's partition of `ident_byte`: one lookup instead of four tests per byte.
fn word_end(bytes: &[u8], mut i: usize) -> usize {
    while bytes.get(i).is_some_and(|&c| matches!(class_of(c), ByteClass::Word | ByteClass::Digit | ByteClass::Dollar)) {
        i += 1;
    }
    i
}

/// The first index at or after `i` whose byte may start something `scan` acts on, or the
/// text's length. Every such byte (`'`, `"`, `$`, `-`, `/`, a digit) lies in 0x22..=0x39, so
/// eight bytes at a time are tested for that range; the few others in it (`(`, `,`, `.`, …)
/// come back too and are stepped over as plain. Letters, spaces, `_`, `=` and every byte of a
/// multi-byte character are outside it.
fn next_candidate(bytes: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = bytes.get(i..).and_then(<[u8]>::first_chunk::<8>) {
        let x = u64::from_le_bytes(*chunk);
        // Per byte, on its low seven bits (no carry crosses a byte: 0x7f + 0x5e < 0x100): the
        // high bit of `low + 0x5e` is set when low >= 0x22, that of `low + 0x46` when low > 0x39.
        let low = x & !HIGH;
        let from_first = (low + 0x5e * ONES) & HIGH;
        let past_last = (low + 0x46 * ONES) & HIGH;
        let hits = from_first & !past_last & !x & HIGH;
        if hits != 0 {
            // Little-endian: the lowest set bit is the first byte in range.
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while bytes.get(i).is_some_and(|b| !(0x22..=0x39).contains(b)) {
        i += 1;
    }
    i
}

/// The index just past the quoted token (`'…'` or `"…"`, the quote doubled inside) that opens
/// at `open`; `None` when it is not closed.
fn quoted_end(bytes: &[u8], open: usize, quote: u8) -> Option<usize> {
    let mut j = open + 1;
    loop {
        j += memchr::memchr(quote, bytes.get(j..)?)?;
        if bytes.get(j + 1) == Some(&quote) {
            j += 2;
        } else {
            return Some(j + 1);
        }
    }
}

/// The end of the number token starting with the digit at `start` (`12`, `1.5`, `2e-3`), or
/// `None` where PostgreSQL would read the bytes some other way (`.5`, `1e`, `123abc`, `1.2.3`).
fn number_end(bytes: &[u8], start: usize) -> Option<usize> {
    if start > 0 && bytes.get(start - 1) == Some(&b'.') {
        return None;
    }
    let digits_from = |mut i: usize| {
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = digits_from(start);
    if bytes.get(i) == Some(&b'.') {
        i = digits_from(i + 1);
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(bytes.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !bytes.get(i).is_some_and(u8::is_ascii_digit) {
            return None;
        }
        i = digits_from(i);
    }
    if bytes.get(i).is_some_and(|&c| ident_byte(c) || c == b'.') {
        return None;
    }
    Some(i)
}

/// Whether the string literal ending at `end` goes on after a line break (`'a'` newline `'b'`
/// is one literal to PostgreSQL), which the subset leaves out.
fn continues_on_a_later_line(bytes: &[u8], end: usize) -> bool {
    let mut k = end;
    let mut newline = false;
    while let Some(&c) = bytes.get(k) {
        match c {
            b' ' | b'\t' | b'\x0c' => {}
            b'\n' | b'\r' => newline = true,
            _ => break,
        }
        k += 1;
    }
    newline && bytes.get(k) == Some(&b'\'')
}

/// Add the literal at `at` to a shape: the text before it (from `copied`) and its class's marker
/// to the key, the literal to the list.
#[inline(always)]
fn push_literal<'a>(
    sql: &'a str,
    key: &mut String,
    literals: &mut Vec<Lit<'a>>,
    copied: &mut usize,
    at: std::ops::Range<usize>,
    class: Class,
) -> Option<()> {
    key.push_str(sql.get(*copied..at.start)?);
    key.push(MARK);
    key.push(class.tag());
    literals.push(Lit { text: sql.get(at.clone())?, start: at.start, class });
    *copied = at.end;
    Some(())
}

fn number_class(text: &str) -> Class {
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        Class::Numeric
    } else if text.parse::<i32>().is_ok() {
        Class::Int4
    } else if text.parse::<i64>().is_ok() {
        Class::Int8
    } else {
        Class::Numeric
    }
}

/// The shape of `sql`, or `None` when it holds no literal or anything outside the subset.
///
/// It runs on every simple-protocol statement the exact cache does not hold (a template
/// fill), so it skips eight bytes at a time to the next byte that may matter
/// (`next_candidate`) and finds closing quotes with `memchr`.
pub(crate) fn scan(sql: &str) -> Option<Shape<'_>> {
    let bytes = sql.as_bytes();
    // The marker byte anywhere (even inside a literal or an identifier) could make two texts
    // look alike; NUL is refused by the full pipeline, so it must never reach a template.
    if memchr::memchr2(0x00, 0x01, bytes).is_some() {
        return None;
    }
    let mut key = String::with_capacity(sql.len());
    // Room for an ORM's or psql's handful without growing on the way.
    let mut literals = Vec::with_capacity(16);
    // Start of the verbatim run not yet copied into `key`.
    let mut copied = 0;
    let mut i = 0;
    loop {
        i = next_candidate(bytes, i);
        let Some(&b) = bytes.get(i) else { break };
        match class_of(b) {
            // Bytes in the candidates' range that start nothing.
            ByteClass::Plain | ByteClass::Word => i += 1,
            // A digit or `$` right after a letter continues an identifier (`t1`, `a$b`): the
            // bytes skipped since the last token were letters or plain, so the identifier
            // started with a letter.
            ByteClass::Digit | ByteClass::Dollar
                if i > 0 && bytes.get(i - 1).is_some_and(|&p| class_of(p) == ByteClass::Word) =>
            {
                i = word_end(bytes, i);
            }
            ByteClass::Quote => {
                // A prefix glued to the quote makes another kind of string (E'', B'', U&'').
                if i > 0 && bytes.get(i - 1).is_some_and(|&p| ident_byte(p) || p == b'&') {
                    return None;
                }
                let end = quoted_end(bytes, i, b'\'')?;
                if continues_on_a_later_line(bytes, end) {
                    return None;
                }
                push_literal(sql, &mut key, &mut literals, &mut copied, i..end, Class::Str)?;
                i = end;
            }
            ByteClass::DoubleQuote => i = quoted_end(bytes, i, b'"')?,
            ByteClass::Dash if bytes.get(i + 1) == Some(&b'-') => return None,
            ByteClass::Slash if bytes.get(i + 1) == Some(&b'*') => return None,
            ByteClass::Dash | ByteClass::Slash => i += 1,
            ByteClass::Dollar => {
                // `$1` is a parameter; anything else starts a dollar quote.
                if !bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    return None;
                }
                i += 1;
                while bytes.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
            }
            ByteClass::Digit => {
                let start = i;
                i = number_end(bytes, start)?;
                let class = number_class(sql.get(start..i)?);
                push_literal(sql, &mut key, &mut literals, &mut copied, start..i, class)?;
            }
        }
    }
    if literals.is_empty() {
        return None;
    }
    key.push_str(sql.get(copied..)?);
    Some(Shape { key, literals })
}

/// A verified rewrite with holes where slot literals go.
#[derive(Debug)]
pub(crate) struct Template {
    /// Output text between slots: one more piece than slots.
    pieces: Vec<String>,
    /// The input literal (index) each slot takes.
    slots: Vec<usize>,
    /// Literals that are not slots, with the exact text they must have.
    fixed: Vec<(usize, String)>,
    /// Kinds, tables and policy version of the statements (the same for every fill).
    base: Arc<Rewritten>,
    /// The class of the literal each slot takes (the key fixes them).
    slot_classes: Vec<Class>,
    /// The text with `$k` for slot k (one parameter per slot) and its parameter types. Built
    /// with the template, on the shape's second miss, which runs off the event loop: it costs
    /// a parse by PostgreSQL's parser (and, for a form with gates, a second verified text),
    /// which a fill, looked up on the event loop, must not.
    params: Option<ParamForm>,
}

#[derive(Debug)]
struct ParamForm {
    sql: Arc<str>,
    types: Arc<[u32]>,
    /// `events::sql_hash` of `sql`: the audit events of every fill name the statement, not
    /// its values (identical decisions then share an events row).
    hash: Arc<str>,
}

/// PostgreSQL's type of a literal of this class in the same position (`pg_type` OIDs); 0 leaves
/// a string's type to its context, as it does for the literal.
fn param_type(class: Class) -> u32 {
    match class {
        Class::Int4 => 23,
        Class::Int8 => 20,
        Class::Numeric => 1700,
        Class::Str => 0,
    }
}

/// A literal's value as a parameter in text format.
fn param_value(lit: &Lit) -> Option<String> {
    match lit.class {
        Class::Str => super::lexer::decode_standard_string(lit.text),
        Class::Int4 | Class::Int8 | Class::Numeric => Some(lit.text.to_owned()),
    }
}

/// At most this many parameters in a parameterised form (a Parse message counts them in 16 bits).
const MAX_PARAMS: usize = 1000;

/// The parameterised form of a template (see the module docs), if PostgreSQL reads it right;
/// `without_gates` may give the same form without conversion gates its types make redundant
/// (`Rewriter::parameterised_without_gates`), with the types to declare for it.
fn param_form(
    pieces: &[String],
    classes: &[Class],
    kinds: &[String],
    without_gates: impl FnOnce(&str, &[u32]) -> Option<(String, Vec<u32>)>,
) -> Option<ParamForm> {
    let slots = classes.len();
    if kinds.len() != 1 || slots == 0 || slots > MAX_PARAMS {
        return None;
    }
    let mut sql = String::with_capacity(pieces.iter().map(String::len).sum::<usize>() + 6 * slots);
    let mut types = Vec::with_capacity(slots);
    for (k, piece) in pieces.iter().enumerate() {
        sql.push_str(piece);
        if let Some(&class) = classes.get(k) {
            sql.push('$');
            sql.push_str(&(k + 1).to_string());
            types.push(param_type(class));
        }
    }
    let statements = super::classify::parse(&sql).ok()?;
    let [statement] = statements.as_slice() else { return None };
    if statement.kind != *kinds.first()? {
        return None;
    }
    let mut numbers = super::pgtree::param_numbers(&statement.node)?;
    numbers.sort_unstable();
    let expected: Vec<i32> = (1..=i32::try_from(slots).ok()?).collect();
    if numbers != expected {
        return None;
    }
    let (sql, types) = without_gates(&sql, &types).unwrap_or((sql, types));
    Some(ParamForm { hash: crate::events::sql_hash(&sql), sql: Arc::from(sql), types: Arc::from(types) })
}

impl Template {
    /// The rewrite of the text `shape` was scanned from, if it fits: a lexer pass's literals
    /// put into the verified text, cheap enough for the event loop.
    pub(crate) fn fill(&self, shape: &Shape) -> Option<Rewritten> {
        for (i, text) in &self.fixed {
            if shape.literals.get(*i)?.text != text {
                return None;
            }
        }
        // Each slot's value, decoded once: printed into the text, and bound as it is.
        let values = self.slot_values(shape)?;
        let sql = self.render(&values)?;
        let params = self.params.as_ref();
        let bound = params.map(|p| super::Bound { sql: Arc::clone(&p.sql), types: Arc::clone(&p.types), values });
        Some(Rewritten {
            sql_hash: params.map_or_else(|| crate::events::sql_hash(&sql), |p| Arc::clone(&p.hash)),
            sql,
            statement_kinds: Arc::clone(&self.base.statement_kinds),
            tables: Arc::clone(&self.base.tables),
            policy_version: self.base.policy_version.clone(),
            bound,
            param_rules: Arc::clone(&self.base.param_rules),
            gate_needs: self.base.gate_needs.clone(),
        })
    }

    /// The value of the literal each slot takes from `shape`, as a parameter in text format.
    fn slot_values(&self, shape: &Shape) -> Option<Vec<String>> {
        self.slots.iter().map(|&i| param_value(shape.literals.get(i)?)).collect()
    }

    /// The text with slot k holding `values[k]`: numbers as their digits, strings through the
    /// printer's own quoting.
    /// `None` if a slot lacks its value or class (never by construction): a text missing a
    /// literal is not filled.
    fn render(&self, values: &[String]) -> Option<String> {
        let extra: usize = values.iter().map(String::len).sum();
        let mut sql = String::with_capacity(self.pieces.iter().map(String::len).sum::<usize>() + 2 * extra + 2);
        let (last, before) = self.pieces.split_last()?;
        for (k, piece) in before.iter().enumerate() {
            sql.push_str(piece);
            match self.slot_classes.get(k)? {
                Class::Str => super::printer::push_string_literal(&mut sql, values.get(k)?),
                Class::Int4 | Class::Int8 | Class::Numeric => sql.push_str(values.get(k)?),
            }
        }
        sql.push_str(last);
        Some(sql)
    }

    /// Build the template of `sql` (whose verified rewrite is `original`) by rewriting a probe
    /// with `rewrite`. `None` when no literal is a slot or anything does not line up.
    /// `without_gates`: see `param_form`.
    pub(crate) fn build(
        sql: &str,
        shape: &Shape,
        original: &Arc<Rewritten>,
        nonce: &str,
        rewrite: impl FnOnce(&str) -> Option<Rewritten>,
        without_gates: impl FnOnce(&str, &[u32], &Rewritten) -> Option<(String, Vec<u32>)>,
    ) -> Option<Template> {
        let slot_of = slot_literals(sql, shape)?;
        if !slot_of.iter().any(|s| *s) {
            return None;
        }
        // The probe: each slot literal replaced by a sentinel of its class, unique in the text.
        let mut probe = String::with_capacity(sql.len() + 32 * shape.literals.len());
        let mut sentinels = Vec::new();
        let mut copied = 0;
        for (i, lit) in shape.literals.iter().enumerate() {
            if !slot_of.get(i).copied().unwrap_or(false) {
                continue;
            }
            let sentinel = match lit.class {
                Class::Str => format!("'struere_slot_{nonce}_{i}'"),
                Class::Int4 => (2_000_000_000u64 + i as u64).to_string(),
                Class::Int8 => (8_000_000_000_000_000_000u64 + i as u64).to_string(),
                Class::Numeric => format!("{}.{nonce_digits}", 7_000_000_000u64 + i as u64, nonce_digits = 864_213),
            };
            if sql.contains(&sentinel) {
                return None;
            }
            probe.push_str(sql.get(copied..lit.start)?);
            probe.push_str(&sentinel);
            copied = lit.start + lit.text.len();
            sentinels.push((i, sentinel));
        }
        probe.push_str(sql.get(copied..)?);
        let rewritten = rewrite(&probe)?;
        let out = rewritten.sql.as_str();

        // Every occurrence of every sentinel in the output, as a whole token.
        let mut cuts: Vec<(usize, usize, usize)> = Vec::new();
        for (i, sentinel) in &sentinels {
            let mut from = 0;
            while let Some(pos) = out.get(from..).and_then(|rest| rest.find(sentinel.as_str())) {
                let (start, end) = (from + pos, from + pos + sentinel.len());
                let glued = |b: Option<&u8>| b.is_some_and(|&c| ident_byte(c) || c == b'.' || c == b'\'');
                if glued(start.checked_sub(1).and_then(|p| out.as_bytes().get(p))) || glued(out.as_bytes().get(end)) {
                    return None;
                }
                cuts.push((start, end, *i));
                from = end;
            }
        }
        cuts.sort_unstable();
        let mut pieces = Vec::with_capacity(cuts.len() + 1);
        let mut slots = Vec::with_capacity(cuts.len());
        let mut at = 0;
        for (start, end, i) in cuts {
            pieces.push(out.get(at..start)?.to_owned());
            slots.push(i);
            at = end;
        }
        pieces.push(out.get(at..)?.to_owned());
        let fixed = shape
            .literals
            .iter()
            .enumerate()
            .filter(|(i, _)| !slot_of.get(*i).copied().unwrap_or(false))
            .map(|(i, l)| (i, l.text.to_owned()))
            .collect();
        let slot_classes = slots.iter().map(|&i| shape.literals.get(i).map(|l| l.class)).collect::<Option<_>>()?;
        let mut template = Template { pieces, slots, fixed, base: Arc::clone(original), slot_classes, params: None };
        // Filled with the original literals it must give exactly the original's rewrite. This
        // exact equality with a verified text is also why the probe itself is not verified
        // (`Output::TemplateProbe` in mod.rs): it must stay exact.
        if template.render(&template.slot_values(shape)?)? != original.sql
            || rewritten.statement_kinds != original.statement_kinds
        {
            return None;
        }
        template.params =
            param_form(&template.pieces, &template.slot_classes, &original.statement_kinds, |sql, types| {
                without_gates(sql, types, original)
            });
        Some(template)
    }
}

/// For each literal of `shape`: whether it is in a value position (see the module docs).
fn slot_literals(sql: &str, shape: &Shape) -> Option<Vec<bool>> {
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;
    let statements = Parser::new(&PostgreSqlDialect {})
        .with_recursion_limit(super::SQLPARSER_RECURSION_LIMIT)
        .try_with_sql(sql)
        .ok()?
        .parse_statements()
        .ok()?;
    let mut spans = Vec::new();
    let _ = sqlparser::ast::visit_expressions(&statements, |expr| {
        value_operands(expr, &mut spans);
        std::ops::ControlFlow::<()>::Continue(())
    });
    // sqlparser's locations: 1-based line, 1-based column in characters.
    let mut out = Vec::with_capacity(shape.literals.len());
    for lit in &shape.literals {
        let before = sql.get(..lit.start)?;
        let line = before.matches('\n').count() as u64 + 1;
        let line_start = before.rfind('\n').map_or(0, |p| p + 1);
        let column = before.get(line_start..)?.chars().count() as u64 + 1;
        out.push(spans.iter().any(|(l, c, class)| *l == line && *c == column && class_fits(*class, lit.class)));
    }
    Some(out)
}

/// A value in the tree: `true` for a string, `false` for a number.
fn class_fits(is_string: bool, class: Class) -> bool {
    is_string == (class == Class::Str)
}

/// Literal operands of comparisons, IN lists and BETWEEN whose other side is a plain column.
fn value_operands(expr: &Expr, spans: &mut Vec<(u64, u64, bool)>) {
    let column = |e: &Expr| matches!(e, Expr::Identifier(_) | Expr::CompoundIdentifier(_));
    let mut push = |e: &Expr| {
        if let Some(found) = literal(e) {
            spans.push(found);
        }
    };
    match expr {
        Expr::BinaryOp {
            left,
            op:
                BinaryOperator::Eq
                | BinaryOperator::NotEq
                | BinaryOperator::Lt
                | BinaryOperator::LtEq
                | BinaryOperator::Gt
                | BinaryOperator::GtEq,
            right,
        } => {
            if column(left) {
                push(right);
            }
            if column(right) {
                push(left);
            }
        }
        Expr::In { expr, target: InTarget::List(list), .. } if column(expr) => list.iter().for_each(push),
        Expr::Between { expr, low, high, .. } if column(expr) => {
            push(low);
            push(high);
        }
        _ => {}
    }
}

/// A plain number or string literal (or a negated number): its start and whether a string.
fn literal(e: &Expr) -> Option<(u64, u64, bool)> {
    match e {
        Expr::Value(v) => {
            let is_string = match &v.value {
                Value::Number(_, false) => false,
                Value::SingleQuotedString(_) => true,
                _ => return None,
            };
            let start = v.span().start;
            Some((start.line, start.column, is_string))
        }
        Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match literal(expr)? {
            (l, c, false) => Some((l, c, false)),
            _ => None,
        },
        // `5::text`, `CAST('7' AS int)`: the type is part of the key, the value is not.
        Expr::Cast { kind: CastKind::Cast | CastKind::DoubleColon, expr, format: None, .. }
            if matches!(expr.as_ref(), Expr::Value(_) | Expr::UnaryOp { .. }) =>
        {
            literal(expr)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
