//! Fuzz `pgparse.c`, the proxy's writer of PostgreSQL's parse tree, against libpg_query's own
//! (`pg_query::parse`, whose message upb writes).
//!
//! The input is SQL text (inputs that are not UTF-8 or hold NUL are skipped, as the frame decoders
//! refuse them). Invariants:
//! - no crash and no pathological running time, for any text;
//! - where the proxy's parse succeeds, libpg_query's does, and the two trees are equal;
//! - where PostgreSQL's parser refuses the text, both report its same message;
//! - the proxy refuses a tree only as deeper than it decodes (`TooDeep`) or past PostgreSQL's stack
//!   budget, never otherwise.
#![no_main]

use libfuzzer_sys::fuzz_target;

const STACK_DEPTH: &str = "stack depth limit exceeded";

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    if sql.contains('\0') {
        return;
    }
    match struere_proxy::rewrite::postgres_tree(sql) {
        // At most the proxy's decode depth (400 messages): libpg_query's own decode (prost,
        // recursive) fits this thread's stack.
        Ok(ours) => match pg_query::parse(sql, 0) {
            Ok(theirs) => assert!(theirs.protobuf == ours, "{sql:?}: the trees differ"),
            // upb's encoder checks PostgreSQL's stack budget at each level, which under this
            // harness (instrumented Rust frames below the call) can be under 100 kB: its refusal,
            // not a difference between the trees.
            Err(pg_query::Error::Parse(e)) if e == STACK_DEPTH => {}
            Err(e) => panic!("{sql:?}: the proxy parsed it, libpg_query did not: {e}"),
        },
        Err(message) if message == "TooDeep" || message == STACK_DEPTH => {}
        // No tree exists, so libpg_query's parse decodes nothing.
        Err(message) => match pg_query::parse(sql, 0) {
            Err(pg_query::Error::Parse(theirs)) => assert_eq!(theirs, message, "{sql:?}"),
            other => panic!("{sql:?}: the proxy refused it ({message}), libpg_query: {:?}", other.map(|_| ())),
        },
    }
});
