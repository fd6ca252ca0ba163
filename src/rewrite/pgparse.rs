//! PostgreSQL's parser, through libpg_query's C interface, with the depth of its tree bounded
//! before the tree is decoded.
//!
//! The tree comes from `pgparse.c` (compiled by build.rs against the pg_query crate's sources):
//! libpg_query's own walk over PostgreSQL's tree, writing its protobuf message directly. libpg_query's
//! `pg_query_parse_protobuf_opts` builds the same message with upb, whose encoder visits all ~270
//! fields of the `Node` oneof for every node: about a third of a rewrite cache miss. The two
//! decode to the same tree (this module's tests compare them over PostgreSQL's regression SQL).
//!
//! Why not `pg_query::parse`: it hands libpg_query's protobuf bytes straight to prost, whose
//! decoder refuses messages nested deeper than 100 levels. A Node wrapper and its struct are two
//! levels each, so that was about 15 nested scalar subqueries, 46 chained `+`, or Django's
//! `EXPLAIN` of a 101-operand `UNION` (each operand one SelectStmt deeper). `pg_query::parse`
//! also builds a summary of tables, functions and columns with its own walk and hash sets, which
//! the proxy never read.
//!
//! Decoding and every walk over the tree recurse, and a debug build's decoder takes about 20 KiB
//! of stack per level, so two bounds apply to the message's depth, which `pgparse.c` measures
//! while writing it, before prost (built with `no-recursion-limit`) decodes it:
//! - on an ordinary stack (a tokio worker's 2 MiB) at most [`ORDINARY_STACK_DEPTH`] levels; a
//!   deeper tree is not decoded, and the request is noted, so that the rewriter runs the whole
//!   statement again on a stack of its own ([`with_deep_stack_retry`]);
//! - on that stack at most [`MAX_TREE_DEPTH`] levels: deeper is refused (54000); `pgparse.c`
//!   stops writing there.

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
fn on_deep_stack<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
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

/// `run`, and when a tree was too deep to decode on this stack while it ran and it failed, `run`
/// again on the deep stack (where every parse and walk it makes runs again); `no_thread`'s error
/// when that thread could not start.
pub(crate) fn with_deep_stack_retry<T: Send, E: Send>(
    run: impl Fn() -> Result<T, E> + Send,
    no_thread: impl FnOnce() -> E,
) -> Result<T, E> {
    take_deep_stack_request();
    match run() {
        Err(_) if take_deep_stack_request() => on_deep_stack(run).unwrap_or_else(|| Err(no_thread())),
        done => done,
    }
}

/// Whether a decode was declined for want of the deep stack since the last call (and forgets
/// it).
fn take_deep_stack_request() -> bool {
    DEEP_STACK_REQUESTED.replace(false)
}

/// Why the text did not become a decoded tree.
#[derive(Debug)]
pub(crate) enum Failure {
    /// PostgreSQL's message (a syntax error, or its stack-depth guard).
    Parse(String),
    /// The tree is deeper than [`MAX_TREE_DEPTH`].
    TooDeep,
    /// The tree is deeper than [`ORDINARY_STACK_DEPTH`], and this is an ordinary stack.
    NeedsDeepStack,
    /// The text holds a NUL byte.
    Nul,
    /// The message `pgparse.c` wrote did not decode (a string that is not UTF-8).
    Decode(String),
}

// libpg_query's C interface (pg_query.h of the pg_query crate Cargo.toml pins, whose static
// library that crate links), and `pgparse.c`'s function, which returns libpg_query's result type.
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
    fn struere_parse_protobuf(
        input: *const c_char,
        parser_options: c_int,
        max_depth: usize,
        depth: *mut usize,
    ) -> PgQueryProtobufParseResult;
    fn pg_query_free_protobuf_parse_result(result: PgQueryProtobufParseResult);
    #[cfg(test)]
    fn pg_query_parse_protobuf_opts(input: *const c_char, parser_options: c_int) -> PgQueryProtobufParseResult;
}

/// PostgreSQL's tree of `sql` (default parser mode), decoded only if it is at most
/// [`MAX_TREE_DEPTH`] messages deep.
pub(crate) fn parse(sql: &str) -> Result<pb::ParseResult, Failure> {
    let input = CString::new(sql).map_err(|_| Failure::Nul)?;
    let mut depth = 0usize;
    // SAFETY: `input` is a NUL-terminated string that outlives the call, `depth` a valid place
    // for the result's depth; the result is freed exactly once, by `take_result`.
    let result = unsafe { struere_parse_protobuf(input.as_ptr(), 0, MAX_TREE_DEPTH, &mut depth) };
    // SAFETY: the result came from libpg_query's result type, and is not used after this.
    unsafe { take_result(result, |bytes| decode(bytes, depth)) }
}

/// Reads a libpg_query protobuf parse result: its error's message, or `decode` of its bytes;
/// then frees it.
///
/// # Safety
/// `result` is a `PgQueryProtobufParseResult` as libpg_query (or `pgparse.c`) returned it, not
/// yet freed; it is freed here.
unsafe fn take_result<T>(
    result: PgQueryProtobufParseResult,
    decode: impl FnOnce(&[u8]) -> Result<T, Failure>,
) -> Result<T, Failure> {
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
    // SAFETY: the caller hands the result over; it is not used after this.
    unsafe { pg_query_free_protobuf_parse_result(result) };
    outcome
}

/// Decodes a message `depth` deep (as `pgparse.c` measured it; `MAX_TREE_DEPTH + 1` when it
/// stopped writing).
fn decode(bytes: &[u8], depth: usize) -> Result<pb::ParseResult, Failure> {
    let limit = if ON_DEEP_STACK.get() { MAX_TREE_DEPTH } else { ORDINARY_STACK_DEPTH };
    if depth > MAX_TREE_DEPTH {
        Err(Failure::TooDeep)
    } else if depth > limit {
        // Only on an ordinary stack: on the deep one `limit` is the maximum.
        DEEP_STACK_REQUESTED.set(true);
        Err(Failure::NeedsDeepStack)
    } else {
        pb::ParseResult::decode(bytes).map_err(|e| Failure::Decode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    // The depth bound the proxy computed from libpg_query's bytes before `pgparse.c` measured
    // the depth itself: kept as an oracle for that measurement.
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

    /// A parser's message: its bytes, or the parser's error message.
    type Written = Result<Vec<u8>, String>;

    /// libpg_query's own message for `sql` (built with upb), and `pgparse.c`'s with the depth it
    /// measured (`max_depth` as given).
    fn both_messages(sql: &str, max_depth: usize) -> (Written, Written, usize) {
        let input = CString::new(sql).unwrap();
        let bytes = |b: &[u8]| Ok(b.to_vec());
        let message = |r: Result<Vec<u8>, Failure>| {
            r.map_err(|e| match e {
                Failure::Parse(m) => m,
                other => format!("{other:?}"),
            })
        };
        // SAFETY: as in `parse`; each result is freed once, by `take_result`.
        let theirs = unsafe { take_result(pg_query_parse_protobuf_opts(input.as_ptr(), 0), bytes) };
        let mut depth = 0;
        let ours = unsafe { take_result(struere_parse_protobuf(input.as_ptr(), 0, max_depth, &mut depth), bytes) };
        (message(theirs), message(ours), depth)
    }

    /// Checks that `pgparse.c`'s message decodes to libpg_query's, or fails with its message, and
    /// that its depth is within the byte-level bound of libpg_query's; returns whether it parsed
    /// and whether the depth equals that bound.
    fn check_same_tree(sql: &str) -> (bool, bool) {
        let (theirs, ours, depth) = both_messages(sql, 100_000);
        match (theirs, ours) {
            (Ok(theirs), Ok(ours)) => {
                let Depth::Within(bound) = message_depth(&theirs, 100_000) else { panic!("{sql}: bound") };
                assert!(depth >= 1 && depth <= bound, "{sql}: depth {depth}, libpg_query's bytes {bound}");
                // Decoding, comparing and dropping recurse: on a stack deep enough for any tree.
                on_deep_stack(|| {
                    let theirs = pb::ParseResult::decode(theirs.as_slice()).unwrap();
                    let ours = pb::ParseResult::decode(ours.as_slice()).unwrap_or_else(|e| panic!("{sql}: {e}"));
                    assert!(theirs == ours, "{sql}:\nlibpg_query {theirs:?}\npgparse.c {ours:?}");
                })
                .unwrap();
                (true, depth == bound)
            }
            (Err(theirs), Err(ours)) => {
                assert_eq!(theirs, ours, "{sql}");
                (false, false)
            }
            (theirs, ours) => panic!("{sql}: libpg_query {theirs:?}, pgparse.c {ours:?}"),
        }
    }

    /// Statements whose every construct libpg_query writes with a field of its own: literals of
    /// each kind (and default-valued ones, which proto3 leaves out), NULL nodes in lists, enums,
    /// char fields, bitmapsets, and statements of each family.
    const STATEMENTS: &[&str] = &[
        "SELECT 1",
        "SELECT 0, -1, 2147483647, -2147483648, 9223372036854775807, 1.5, -0.0, 1e300, 'a', '', B'101', X'ff', \
         true, false, NULL, $1, $2::int8, E'\\n', U&'\\0041', interval '1 day'",
        "SELECT DISTINCT ON (a) a, b AS c, t.* FROM t WHERE a = 1 AND NOT (b IS NULL OR c IS NOT TRUE) \
         GROUP BY ROLLUP (a, b), CUBE (c) HAVING count(*) > 0 ORDER BY a DESC NULLS LAST, b USING < \
         LIMIT 10 OFFSET 5 FOR UPDATE OF t SKIP LOCKED",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) \
         SEARCH DEPTH FIRST BY n SET ord CYCLE n SET c USING p SELECT * FROM r",
        "SELECT a, sum(b) FILTER (WHERE b > 0) OVER w, rank() OVER (PARTITION BY a ORDER BY b \
         ROWS BETWEEN 1 PRECEDING AND CURRENT ROW EXCLUDE TIES) FROM t WINDOW w AS (ORDER BY a)",
        "SELECT x->>'k', x #> '{a,b}', x @> '{}'::jsonb, x[1:2], (x).f, ARRAY[1, 2], ROW(1, 'a'), \
         CASE WHEN a THEN 1 ELSE 2 END, COALESCE(a, b), NULLIF(a, b), GREATEST(a, b), a IS DISTINCT FROM b, \
         a BETWEEN SYMMETRIC 1 AND 2, a IN (1, 2), a = ANY (ARRAY[1]), EXISTS (SELECT 1), a LIKE 'x%' ESCAPE '!', \
         a COLLATE \"C\", CURRENT_TIMESTAMP, CURRENT_USER, SESSION_USER, CAST(a AS numeric(10, 2)[])",
        "SELECT * FROM a NATURAL JOIN b LEFT JOIN c USING (id) AS j FULL JOIN LATERAL (SELECT 1) s ON true, \
         generate_series(1, 3) WITH ORDINALITY g(i, o), ROWS FROM (f(1), g(2)), t TABLESAMPLE SYSTEM (10) REPEATABLE (1)",
        "SELECT JSON_OBJECT('a': 1 ABSENT ON NULL RETURNING jsonb), JSON_ARRAYAGG(a ORDER BY a), \
         JSON_EXISTS(j, '$.a' PASSING 1 AS x), JSON_VALUE(j, '$.a' RETURNING int DEFAULT 0 ON EMPTY), \
         j IS JSON OBJECT WITH UNIQUE KEYS, XMLELEMENT(NAME x, XMLATTRIBUTES(1 AS a), 'c')",
        "SELECT * FROM JSON_TABLE(j, '$[*]' COLUMNS (a int PATH '$.a', NESTED PATH '$.b[*]' COLUMNS (b text)))",
        "INSERT INTO t (a, b) VALUES (1, DEFAULT), (2, 'x') ON CONFLICT (a) WHERE a > 0 DO UPDATE SET b = EXCLUDED.b \
         WHERE t.b <> EXCLUDED.b RETURNING *",
        "INSERT INTO t OVERRIDING SYSTEM VALUE SELECT * FROM s ON CONFLICT ON CONSTRAINT c DO NOTHING",
        "UPDATE t SET (a, b) = (SELECT 1, 2), c = c + 1 FROM s WHERE t.id = s.id AND CURRENT OF cur",
        "UPDATE t SET a = 1 WHERE id = 1 RETURNING OLD.a, NEW.a",
        "DELETE FROM ONLY t USING s WHERE t.id = s.id RETURNING t.*",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.d THEN DELETE WHEN MATCHED THEN UPDATE SET a = s.a \
         WHEN NOT MATCHED BY SOURCE THEN DELETE WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.a) RETURNING merge_action()",
        "COPY t (a, b) FROM STDIN WITH (FORMAT csv, HEADER true, DELIMITER ';') WHERE a > 1",
        "COPY (SELECT 1) TO STDOUT",
        "CREATE TABLE IF NOT EXISTS s.t (id bigserial PRIMARY KEY, a text NOT NULL DEFAULT 'x' COLLATE \"C\", \
         b int CHECK (b > 0) REFERENCES u (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED, \
         c numeric(10, 2) GENERATED ALWAYS AS (b * 2) STORED, d int GENERATED BY DEFAULT AS IDENTITY (START 5), \
         UNIQUE NULLS NOT DISTINCT (a, b), EXCLUDE USING gist (a WITH =)) PARTITION BY RANGE (id) WITH (fillfactor = 70)",
        "CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (MINVALUE) TO (10)",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON t USING btree (lower(a) DESC NULLS FIRST) INCLUDE (b) WHERE b > 0",
        "ALTER TABLE t ADD COLUMN x int, DROP COLUMN IF EXISTS y CASCADE, ALTER COLUMN z TYPE text USING z::text, \
         ALTER COLUMN z SET DEFAULT 1, ENABLE ROW LEVEL SECURITY, ADD CONSTRAINT c CHECK (x > 0) NOT VALID",
        "CREATE POLICY p ON t AS RESTRICTIVE FOR SELECT TO r USING (org = current_setting('app.org')) WITH CHECK (true)",
        "CREATE FUNCTION f(a int, OUT b text, VARIADIC c int[] DEFAULT '{}') RETURNS SETOF record LANGUAGE sql \
         STABLE STRICT SECURITY DEFINER PARALLEL SAFE COST 10 SET search_path = public AS $$ SELECT 1 $$",
        "CREATE VIEW v WITH (security_barrier) AS SELECT * FROM t WITH CASCADED CHECK OPTION",
        "CREATE MATERIALIZED VIEW m AS SELECT 1 WITH NO DATA",
        "CREATE TRIGGER tr BEFORE INSERT OR UPDATE OF a ON t FOR EACH ROW WHEN (NEW.a > 0) EXECUTE FUNCTION f()",
        "CREATE TYPE e AS ENUM ('a', 'b')",
        "CREATE DOMAIN d AS int CHECK (VALUE > 0)",
        "CREATE SEQUENCE s INCREMENT 2 MINVALUE 1 NO MAXVALUE CACHE 10 CYCLE OWNED BY t.id",
        "GRANT SELECT (a), UPDATE ON t TO r WITH GRANT OPTION",
        "REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC CASCADE",
        "ALTER DEFAULT PRIVILEGES IN SCHEMA s GRANT SELECT ON TABLES TO r",
        "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
        "SAVEPOINT s; RELEASE SAVEPOINT s; ROLLBACK TO s; COMMIT AND CHAIN",
        "SET LOCAL search_path TO a, b; SET TIME ZONE 'UTC'; RESET ALL; SHOW work_mem",
        "PREPARE p (int) AS SELECT $1; EXECUTE p(1); DEALLOCATE ALL",
        "DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT 1; FETCH BACKWARD 5 FROM c; CLOSE c",
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT json) SELECT 1",
        "VACUUM (FULL, ANALYZE) t (a); ANALYZE t; CLUSTER t USING i; REINDEX TABLE CONCURRENTLY t",
        "LISTEN ch; NOTIFY ch, 'x'; UNLISTEN *",
        "LOCK TABLE t IN ACCESS EXCLUSIVE MODE NOWAIT",
        "DO $$ BEGIN RAISE NOTICE 'x'; END $$ LANGUAGE plpgsql",
        "CALL p(1, b => 2)",
        "TRUNCATE t RESTART IDENTITY CASCADE",
        "DROP TABLE IF EXISTS a, b CASCADE; DROP FUNCTION f(int)",
        "COMMENT ON COLUMN t.a IS 'x'; SECURITY LABEL ON TABLE t IS 'x'",
        "CREATE EXTENSION IF NOT EXISTS pgcrypto WITH SCHEMA s VERSION '1.3'",
        "CREATE PUBLICATION p FOR TABLE t (a, b) WHERE (a > 0)",
        "CREATE STATISTICS s (ndistinct, dependencies) ON a, b FROM t",
        "ALTER SYSTEM SET work_mem = '64MB'",
        "SELECT $1 UNION SELECT 2 INTERSECT SELECT 3 EXCEPT ALL SELECT 4",
        "SELECT 1 INTO TEMP TABLE x",
        "VALUES (1, 'a'), (2, NULL) ORDER BY 1",
        "TABLE t",
        "SELECT f(a := 1, b => 2), g(VARIADIC ARRAY[1]), count(DISTINCT a ORDER BY a), \
         percentile_cont(0.5) WITHIN GROUP (ORDER BY a), t.f(*)",
        "SELECT a FROM t WHERE (a, b) > (1, 2) AND a OPERATOR(pg_catalog.+) 1 = 2 AND a SIMILAR TO 'x' \
         AND a IS NOT DOCUMENT AND a IS NORMALIZED AND b IS UNKNOWN",
        "",
        ";;",
        "-- only a comment",
        "SELEC 1",
        "SELECT (",
        "SELECT 'unterminated",
    ];

    #[test]
    fn pgparse_c_writes_the_message_libpg_query_writes() {
        let mut exact = 0;
        for sql in STATEMENTS {
            exact += usize::from(check_same_tree(sql).1);
        }
        // Only a string whose bytes read as a nested message makes the bytes' bound larger.
        assert!(exact + 2 >= STATEMENTS.len() - 5, "{exact} of {}", STATEMENTS.len());
    }

    /// The same over every statement of PostgreSQL's own SQL scripts (the server's catalog
    /// views, information schema and extension scripts, from Debian's PostgreSQL server package:
    /// the newest major version installed).
    #[test]
    fn pgparse_c_matches_libpg_query_over_postgresqls_scripts() {
        let root = Path::new("/usr/share/postgresql");
        let share = std::fs::read_dir(root)
            .unwrap_or_else(|e| panic!("{}: {e} (PostgreSQL's server package installs it)", root.display()))
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .map(|major| root.join(major.to_string()))
            .unwrap_or_else(|| panic!("no PostgreSQL version under {}", root.display()));
        let mut files: Vec<_> = [share.to_path_buf(), share.join("extension")]
            .iter()
            .flat_map(|d| std::fs::read_dir(d).unwrap_or_else(|e| panic!("{}: {e}", d.display())))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        let (mut parsed, mut failed) = (0, 0);
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            for sql in pg_query::split_with_scanner(&text).unwrap_or_default() {
                match check_same_tree(sql).0 {
                    true => parsed += 1,
                    false => failed += 1,
                }
            }
        }
        assert!(files.len() > 100 && parsed > 3000, "{} files, {parsed} statements parsed, {failed} not", files.len());
    }

    #[test]
    fn depth_is_measured_and_bounded_while_writing() {
        let union = |n: usize| format!("SELECT 1{}", " UNION SELECT 1".repeat(n));
        let (_, ours, depth) = both_messages(&union(120), 100_000);
        assert!(ours.is_ok());
        // Stops at the bound: no bytes, no error, one past it.
        let (theirs, ours, stopped) = both_messages(&union(120), depth - 1);
        assert!(theirs.is_ok());
        assert_eq!((ours, stopped), (Ok(vec![]), depth));
        let (_, ours, exact) = both_messages(&union(120), depth);
        assert_eq!((ours.is_ok(), exact), (true, depth));
        check_same_tree(&union(120));
        check_same_tree(&format!("SELECT {}1{}", "(SELECT ".repeat(40), ")".repeat(40)));
        check_same_tree(&format!("SELECT 1{}", " + 1".repeat(500)));
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
