//! PostgreSQL's parser, through libpg_query's C interface, with the depth of its tree bounded
//! before the tree is decoded.
//!
//! Why not `pg_query::parse`: it hands libpg_query's protobuf bytes straight to prost, whose
//! decoder refuses messages nested deeper than 100 levels. A Node wrapper and its struct are two
//! levels each, so that was about 15 nested scalar subqueries, 46 chained `+`, or Django's
//! `EXPLAIN` of a 101-operand `UNION` (each operand one SelectStmt deeper). `pg_query::parse`
//! also builds a summary of tables, functions and columns with its own walk and hash sets, which
//! the proxy never read.
//!
//! Decoding and every walk over the tree recurse, and a debug build's decoder takes about 20 KiB
//! of stack per level, so two bounds apply, both checked on the bytes before prost (built with
//! `no-recursion-limit`) decodes them:
//! - on an ordinary stack (a tokio worker's 2 MiB) at most [`ORDINARY_STACK_DEPTH`] levels; a
//!   deeper tree is not decoded, and the request is noted ([`take_deep_stack_request`]), so that
//!   the rewriter can run the statement again on a stack of its own ([`on_deep_stack`]);
//! - on that stack at most [`MAX_TREE_DEPTH`] levels: deeper is refused (54000).
//!
//! The depth check does not know the schema, so every length-delimited field is read as a
//! possible nested message: a string whose bytes happen to read as nested messages can only make
//! the bound larger than the tree's true depth (a refusal, never a deeper decode).

use std::ffi::{CStr, CString, c_char, c_int};

use pg_query::protobuf as pb;
use prost::Message;

/// Deepest tree (in protobuf messages, the whole parse result being 1) the proxy decodes and
/// walks, on the deep stack. PostgreSQL's own bound is its 2 MB `max_stack_depth`.
pub const MAX_TREE_DEPTH: usize = 400;

/// Deepest tree decoded on an ordinary stack; `limits_tests` runs every deep shape through the
/// whole rewrite on a 2 MiB stack in a debug build.
pub const ORDINARY_STACK_DEPTH: usize = 64;

/// The deep stack: every walk over a [`MAX_TREE_DEPTH`] tree fits, in a debug build. Only the
/// pages a statement touches are committed, and the thread is gone when it returns.
const DEEP_STACK_BYTES: usize = 128 * 1024 * 1024;

thread_local! {
    /// Whether this thread is a deep-stack thread.
    static ON_DEEP_STACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Whether a decode was declined since the last [`take_deep_stack_request`], for want of the
    /// deep stack.
    static DEEP_STACK_REQUESTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on a thread of its own with a stack of [`DEEP_STACK_BYTES`], on which trees up to
/// [`MAX_TREE_DEPTH`] decode (or here, if this is such a thread already); `None` when no thread
/// could be started. A thread, not a stack switch on this one (`stacker`): libpg_query sizes its
/// own stack-depth check from the thread's stack, which a switched stack is not part of.
pub(crate) fn on_deep_stack<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
    if ON_DEEP_STACK.get() {
        return Some(f());
    }
    // The statement's log lines keep their session's and statement's span.
    let span = tracing::Span::current();
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new().name("struere-deep-stack".to_owned()).stack_size(DEEP_STACK_BYTES);
        let handle = thread
            .spawn_scoped(scope, move || {
                let _entered = span.enter();
                ON_DEEP_STACK.set(true);
                f()
            })
            .ok()?;
        match handle.join() {
            Ok(done) => Some(done),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Whether a decode was declined for want of the deep stack since the last call (and forgets
/// it).
pub(crate) fn take_deep_stack_request() -> bool {
    DEEP_STACK_REQUESTED.replace(false)
}

/// Why the text did not become a decoded tree.
#[derive(Debug)]
pub(crate) enum Failure {
    /// PostgreSQL's message (a syntax error, or its own stack-depth or protobuf-depth guard).
    Parse(String),
    /// The tree is deeper than [`MAX_TREE_DEPTH`].
    TooDeep,
    /// The tree is deeper than [`ORDINARY_STACK_DEPTH`], and this is an ordinary stack.
    NeedsDeepStack,
    /// The text holds a NUL byte.
    Nul,
    /// libpg_query's bytes did not decode.
    Decode(String),
}

// libpg_query's C interface (pg_query.h of the pg_query crate this crate's lock file pins, whose
// static library that crate links): the two functions `pg_query::parse` itself calls.
#[repr(C)]
struct PgQueryProtobuf {
    len: usize,
    data: *mut c_char,
}

#[repr(C)]
struct PgQueryError {
    message: *mut c_char,
    funcname: *mut c_char,
    filename: *mut c_char,
    lineno: c_int,
    cursorpos: c_int,
    context: *mut c_char,
}

#[repr(C)]
struct PgQueryProtobufParseResult {
    parse_tree: PgQueryProtobuf,
    stderr_buffer: *mut c_char,
    error: *mut PgQueryError,
}

unsafe extern "C" {
    fn pg_query_parse_protobuf_opts(input: *const c_char, parser_options: c_int) -> PgQueryProtobufParseResult;
    fn pg_query_free_protobuf_parse_result(result: PgQueryProtobufParseResult);
}

/// PostgreSQL's tree of `sql` (default parser mode), decoded only if it is at most
/// [`MAX_TREE_DEPTH`] messages deep.
pub(crate) fn parse(sql: &str) -> Result<pb::ParseResult, Failure> {
    let input = CString::new(sql).map_err(|_| Failure::Nul)?;
    // SAFETY: `input` is a NUL-terminated string that outlives the call; the result is freed
    // exactly once below, after its bytes and message were copied or decoded.
    let result = unsafe { pg_query_parse_protobuf_opts(input.as_ptr(), 0) };
    let outcome = if result.error.is_null() {
        let bytes: &[u8] = if result.parse_tree.data.is_null() || result.parse_tree.len == 0 {
            &[]
        } else {
            // SAFETY: libpg_query returns `len` bytes at `data`, valid until the result is freed.
            unsafe { std::slice::from_raw_parts(result.parse_tree.data.cast::<u8>(), result.parse_tree.len) }
        };
        decode(bytes)
    } else {
        // SAFETY: a non-null error carries a non-null, NUL-terminated message.
        let message = unsafe { (*result.error).message };
        let text = match message.is_null() {
            true => "PostgreSQL's parser failed without a message".to_owned(),
            false => unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned(),
        };
        Err(Failure::Parse(text))
    };
    // SAFETY: the result came from `pg_query_parse_protobuf_opts` and is not used after this.
    unsafe { pg_query_free_protobuf_parse_result(result) };
    outcome
}

fn decode(bytes: &[u8]) -> Result<pb::ParseResult, Failure> {
    let limit = if ON_DEEP_STACK.get() { MAX_TREE_DEPTH } else { ORDINARY_STACK_DEPTH };
    match message_depth(bytes, MAX_TREE_DEPTH) {
        Depth::Within(depth) if depth <= limit => {
            pb::ParseResult::decode(bytes).map_err(|e| Failure::Decode(e.to_string()))
        }
        // Only on an ordinary stack: on the deep one `limit` is the maximum.
        Depth::Within(_) => {
            DEEP_STACK_REQUESTED.set(true);
            Err(Failure::NeedsDeepStack)
        }
        Depth::Deeper => Err(Failure::TooDeep),
        Depth::NotAMessage => Err(Failure::Decode("libpg_query's protobuf bytes are malformed".to_owned())),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Depth {
    /// At most this many messages deep (the outer message counts 1).
    Within(usize),
    /// Deeper than the limit, if every length-delimited field that reads as a message is one.
    Deeper,
    /// The bytes are not one protobuf message.
    NotAMessage,
}

/// An upper bound on the nesting depth of the protobuf message in `bytes`, computed without
/// recursion. Each length-delimited field whose payload reads as a whole message is counted as a
/// nested message (a string may be counted too: the bound only grows). Each byte is read once, by
/// the innermost payload that contains it.
fn message_depth(bytes: &[u8], limit: usize) -> Depth {
    struct Frame {
        pos: usize,
        end: usize,
        /// Depth of the deepest nested message found so far below this one.
        below: usize,
    }
    let mut stack = vec![Frame { pos: 0, end: bytes.len(), below: 0 }];
    loop {
        let Some(top) = stack.last_mut() else { return Depth::NotAMessage };
        if top.pos == top.end {
            let depth = top.below + 1;
            stack.pop();
            match stack.last_mut() {
                Some(parent) => parent.below = parent.below.max(depth),
                None => return Depth::Within(depth),
            }
            continue;
        }
        match next_field(bytes, top.pos, top.end) {
            Some(Field::Scalar { next }) => top.pos = next,
            Some(Field::Nested { start, end }) => {
                top.pos = end;
                if start < end {
                    if stack.len() >= limit {
                        return Depth::Deeper;
                    }
                    stack.push(Frame { pos: start, end, below: 0 });
                } else {
                    top.below = top.below.max(1);
                }
            }
            None if stack.len() == 1 => return Depth::NotAMessage,
            // This payload is not a message (a string or packed numbers): a leaf.
            None => {
                stack.pop();
            }
        }
    }
}

enum Field {
    Scalar { next: usize },
    Nested { start: usize, end: usize },
}

/// The field at `pos` of a message that ends at `end`; `None` when the bytes there are not one.
#[inline]
fn next_field(bytes: &[u8], pos: usize, end: usize) -> Option<Field> {
    let (key, pos) = varint(bytes, pos, end)?;
    if key >> 3 == 0 {
        return None;
    }
    let skip = |n: usize| pos.checked_add(n).filter(|&next| next <= end).map(|next| Field::Scalar { next });
    match key & 7 {
        0 => varint(bytes, pos, end).map(|(_, next)| Field::Scalar { next }),
        1 => skip(8),
        5 => skip(4),
        2 => {
            let (len, start) = varint(bytes, pos, end)?;
            let end = start.checked_add(usize::try_from(len).ok()?).filter(|&e| e <= end)?;
            Some(Field::Nested { start, end })
        }
        // Groups (3, 4) are not used by libpg_query's schema; anything else is not protobuf.
        _ => None,
    }
}

#[inline]
fn varint(bytes: &[u8], pos: usize, end: usize) -> Option<(u64, usize)> {
    let window = bytes.get(pos..end)?;
    let mut value = 0u64;
    // At most 10 bytes (the tenth holds bit 63).
    for (i, &byte) in window.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some((value, pos + i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf message nested `n` deep: field 1 holding the next level, the innermost
    /// holding a varint field.
    fn nested(n: usize) -> Vec<u8> {
        let varint_len = |mut v: usize| {
            let mut k = 1;
            while v >= 0x80 {
                v >>= 7;
                k += 1;
            }
            k
        };
        // Payload lengths from the innermost level out.
        let mut lens = vec![2usize];
        for _ in 1..n {
            let inner = *lens.last().unwrap();
            lens.push(1 + varint_len(inner) + inner);
        }
        let mut out = Vec::with_capacity(*lens.last().unwrap());
        for &inner in lens[..n - 1].iter().rev() {
            out.push(0x0a);
            let mut v = inner;
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        out.extend([0x08, 0x01]);
        out
    }

    #[test]
    fn the_depth_bound_counts_nested_messages_without_recursion() {
        assert_eq!(message_depth(&[], 10), Depth::Within(1));
        assert_eq!(message_depth(&nested(1), 10), Depth::Within(1));
        assert_eq!(message_depth(&nested(7), 10), Depth::Within(7));
        assert_eq!(message_depth(&nested(10), 10), Depth::Within(10));
        assert_eq!(message_depth(&nested(11), 10), Depth::Deeper);
        // Far deeper than any stack would allow a recursive count.
        assert_eq!(message_depth(&nested(200_000), 1_000_000), Depth::Within(200_000));
        // A payload that is not a message is a leaf; one that reads as a message counts.
        assert_eq!(message_depth(&[0x12, 0x02, 0xff, 0xff], 10), Depth::Within(1));
        assert_eq!(message_depth(&[0x12, 0x02, 0x08, 0x01], 10), Depth::Within(2));
        assert_eq!(message_depth(&[0x12, 0x00], 10), Depth::Within(2));
        // Varints up to ten bytes; an eleventh continuation byte is not a varint.
        let long = [0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(message_depth(&long, 10), Depth::Within(1));
        let longer = [0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(message_depth(&longer, 10), Depth::NotAMessage);
        // Truncated or malformed outer messages are not messages.
        for bad in [&[0x0a, 0x05, 0x08][..], &[0x08], &[0x00, 0x01], &[0x0b], &[0x09, 1, 2]] {
            assert_eq!(message_depth(bad, 10), Depth::NotAMessage, "{bad:?}");
        }
    }

    #[test]
    fn the_bound_is_never_below_the_decoded_depth() {
        // Depth by prost's own counting: a tree exactly at a depth decodes with the default
        // limit of 100 only when the bound says at most 100.
        for (sql, deep) in [
            ("SELECT 1", false),
            (&format!("SELECT {}1{}", "(SELECT ".repeat(10), ")".repeat(10)), false),
            (&format!("SELECT 1{}", " UNION SELECT 1".repeat(120)), true),
        ] {
            let bytes = on_deep_stack(|| raw_bytes(sql)).unwrap().unwrap_or_else(|e| panic!("{sql}: {e}"));
            match message_depth(&bytes, 100) {
                Depth::Within(d) => assert!(!deep && d <= 100, "{sql}: {d}"),
                other => assert!(deep, "{sql}: {other:?}"),
            }
        }
    }

    fn raw_bytes(sql: &str) -> Result<Vec<u8>, String> {
        let tree = parse(sql).map_err(|e| format!("{e:?}"))?;
        Ok(tree.encode_to_vec())
    }

    #[test]
    fn deep_trees_decode_on_the_deep_stack_up_to_the_limit() {
        let union = |n: usize| format!("SELECT 1{}", " UNION SELECT 1".repeat(n));
        assert!(parse(&union(20)).is_ok());
        assert!(!take_deep_stack_request());
        assert!(matches!(parse(&union(150)), Err(Failure::NeedsDeepStack)));
        assert!(take_deep_stack_request());
        assert!(!take_deep_stack_request());
        assert!(on_deep_stack(|| parse(&union(150)).is_ok()).unwrap());
        assert!(on_deep_stack(|| parse(&union(MAX_TREE_DEPTH - 10)).is_ok()).unwrap());
        assert!(!ON_DEEP_STACK.get());
        assert!(matches!(parse(&union(MAX_TREE_DEPTH + 10)), Err(Failure::TooDeep)));
        assert!(on_deep_stack(|| matches!(parse(&union(MAX_TREE_DEPTH + 10)), Err(Failure::TooDeep))).unwrap());
        assert!(!take_deep_stack_request());
        assert!(matches!(parse("SELECT 'a\0'"), Err(Failure::Nul)));
        match parse("SELEC 1") {
            Err(Failure::Parse(m)) => assert!(m.contains("syntax error"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_panic_on_the_deep_stack_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| on_deep_stack(|| panic!("x")));
        assert!(r.is_err());
        assert!(!ON_DEEP_STACK.get());
    }
}
