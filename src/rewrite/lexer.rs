//! PostgreSQL's own lexer (`pg_query::scan`), and decoding of the few token shapes the printer
//! emits. Token boundaries come from PostgreSQL, never from our own guesses.

use std::ops::Range;

use pg_query::protobuf::Token;

/// One lexical token: byte range in the scanned text and its kind (`None` if pg_query reports
/// a token number this build does not know, which callers treat as unexpected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tok {
    pub start: usize,
    pub end: usize,
    pub token: Option<Token>,
}

/// Scans `sql` with PostgreSQL's lexer. Errors carry PostgreSQL's message.
pub(crate) fn scan(sql: &str) -> Result<Vec<Tok>, String> {
    // `scan_tokens` reads the C scanner's tokens directly, without a protobuf round trip.
    let result = pg_query::scan_tokens(sql).map_err(|e| e.to_string())?;
    let mut tokens = Vec::with_capacity(result.len());
    for t in &result {
        let (Ok(start), Ok(end)) = (usize::try_from(t.start), usize::try_from(t.end)) else {
            return Err("lexer returned a negative offset".to_string());
        };
        if start > end || sql.get(start..end).is_none() {
            return Err("lexer returned an offset outside the text".to_string());
        }
        tokens.push(Tok { start, end, token: Token::try_from(t.token).ok() });
    }
    Ok(tokens)
}

/// The tokens that lie inside `range` (tokens are sorted by position).
pub(crate) fn tokens_in(tokens: &[Tok], range: Range<usize>) -> &[Tok] {
    let first = tokens.partition_point(|t| t.start < range.start);
    let last = tokens.partition_point(|t| t.start < range.end);
    tokens.get(first..last).unwrap_or(&[])
}

pub(crate) fn is_comment(t: &Tok) -> bool {
    matches!(t.token, Some(Token::SqlComment | Token::CComment))
}

/// Shrinks `range` to run from the first to the last non-comment token inside it, so a piece
/// forwarded verbatim can be joined to others without a trailing `-- comment` swallowing the
/// separator. `None` if the range holds no token at all.
pub(crate) fn trim_to_tokens(tokens: &[Tok], range: Range<usize>) -> Option<Range<usize>> {
    let inside = tokens_in(tokens, range);
    let first = inside.iter().find(|t| !is_comment(t))?;
    let last = inside.iter().rev().find(|t| !is_comment(t))?;
    Some(first.start..last.end)
}

/// Number of `AND`/`OR` keywords in `range`. PostgreSQL flattens these into one node, but
/// sqlparser builds one tree level per operator, so this bounds how deep its tree can get.
pub(crate) fn count_boolean_operators(tokens: &[Tok], range: Range<usize>) -> usize {
    tokens_in(tokens, range).iter().filter(|t| matches!(t.token, Some(Token::And | Token::Or))).count()
}

/// Whether `range` holds a `U&"…"` identifier.
pub(crate) fn contains_unicode_identifier(tokens: &[Tok], range: Range<usize>) -> bool {
    tokens_in(tokens, range).iter().any(|t| t.token == Some(Token::Uident))
}

/// Decodes a standard string constant as the printer writes it: `'` … `'` with every quote
/// inside doubled. Anything else (E'', U&'', $$…$$, string continuation) is `None`.
pub(crate) fn decode_standard_string(text: &str) -> Option<String> {
    decode_doubled(text, '\'')
}

/// Decodes a quoted identifier as the printer writes it: `"` … `"` with `""` inside.
pub(crate) fn decode_quoted_ident(text: &str) -> Option<String> {
    decode_doubled(text, '"')
}

/// Decodes `B'0101'` / `X'ff'` (prefix letter in either case): the digits between the quotes,
/// which may not contain a quote.
pub(crate) fn decode_prefixed(text: &str, prefix: char) -> Option<String> {
    let mut chars = text.chars();
    let first = chars.next()?;
    if !first.eq_ignore_ascii_case(&prefix) {
        return None;
    }
    let rest = chars.as_str();
    let inner = rest.strip_prefix('\'')?.strip_suffix('\'')?;
    if inner.contains('\'') {
        return None;
    }
    Some(inner.to_string())
}

fn decode_doubled(text: &str, quote: char) -> Option<String> {
    let inner = text.strip_prefix(quote)?.strip_suffix(quote)?;
    let mut out = String::with_capacity(inner.len());
    // Runs between quotes are copied whole (a template fill decodes every string literal).
    let mut rest = inner;
    while let Some((run, after)) = rest.split_once(quote) {
        out.push_str(run);
        // Inside the delimiters a quote must be doubled; a lone one means the token is not
        // what the printer produced.
        rest = after.strip_prefix(quote)?;
        out.push(quote);
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<Option<Token>> {
        scan(sql).unwrap().iter().map(|t| t.token).collect()
    }

    #[test]
    fn scans_string_kinds() {
        assert_eq!(
            kinds("'a' E'b' U&'c' B'1' X'f' $$d$$ \"e\" f"),
            [
                Some(Token::Sconst),
                Some(Token::Sconst),
                Some(Token::Usconst),
                Some(Token::Bconst),
                Some(Token::Xconst),
                Some(Token::Sconst),
                Some(Token::Ident),
                Some(Token::Ident)
            ]
        );
    }

    #[test]
    fn scan_reports_lexer_errors() {
        assert!(scan("SELECT 'unterminated").is_err());
    }

    #[test]
    fn decodes_only_printer_shapes() {
        assert_eq!(decode_standard_string("'a''b'").as_deref(), Some("a'b"));
        assert_eq!(decode_standard_string("''").as_deref(), Some(""));
        assert_eq!(decode_standard_string("'a\\'").as_deref(), Some("a\\"));
        assert_eq!(decode_standard_string("'a'b'"), None);
        assert_eq!(decode_standard_string("E'a'"), None);
        assert_eq!(decode_standard_string("$$a$$"), None);
        assert_eq!(decode_standard_string("'a'\n'b'"), None);
        assert_eq!(decode_standard_string("'"), None);
        assert_eq!(decode_quoted_ident("\"a\"\"b\"").as_deref(), Some("a\"b"));
        assert_eq!(decode_quoted_ident("abc"), None);
        assert_eq!(decode_prefixed("B'0101'", 'b').as_deref(), Some("0101"));
        assert_eq!(decode_prefixed("x'FF'", 'X').as_deref(), Some("FF"));
        assert_eq!(decode_prefixed("'FF'", 'X'), None);
    }

    proptest::proptest! {
        /// What the printer quotes decodes to exactly the value; a quote that is not doubled
        /// makes it no printer's token.
        #[test]
        fn printer_quoting_decodes_to_the_value(value in "['\"a-z é]{0,12}", cut in 0usize..4) {
            let mut quoted = String::new();
            crate::rewrite::printer::push_string_literal(&mut quoted, &value);
            let decoded = decode_standard_string(&quoted);
            proptest::prop_assert_eq!(decoded.as_deref(), Some(value.as_str()));
            let mut ident = String::new();
            crate::rewrite::printer::push_quoted_ident(&mut ident, &value);
            let decoded = decode_quoted_ident(&ident);
            proptest::prop_assert_eq!(decoded.as_deref(), Some(value.as_str()));
            // One of the doubled quotes inside removed: a lone quote is left.
            let inner_quotes: Vec<usize> = quoted.match_indices('\'').map(|(i, _)| i).filter(|&i| i > 0 && i + 1 < quoted.len()).collect();
            if !inner_quotes.is_empty() {
                let mut broken = quoted.clone();
                broken.remove(inner_quotes[cut % inner_quotes.len()]);
                proptest::prop_assert_eq!(decode_standard_string(&broken), None, "{:?}", broken);
            }
        }
    }

    #[test]
    fn trims_leading_and_trailing_comments() {
        let sql = "/* a */ BEGIN /* b */ READ ONLY -- c";
        let toks = scan(sql).unwrap();
        let r = trim_to_tokens(&toks, 0..sql.len()).unwrap();
        assert_eq!(&sql[r], "BEGIN /* b */ READ ONLY");
        assert_eq!(trim_to_tokens(&toks, 0..7), None);
    }

    #[test]
    fn counts_boolean_operators() {
        let sql = "SELECT 1 WHERE a AND b OR c AND (d OR e) AND 'AND' = \"or\"";
        let toks = scan(sql).unwrap();
        assert_eq!(count_boolean_operators(&toks, 0..sql.len()), 5);
    }
}
