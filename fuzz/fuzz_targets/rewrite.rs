//! Fuzz the statement rewriter: `Rewriter::new(1000).rewrite(sql, &actor)`.
//!
//! The input is the SQL text (non-UTF-8 inputs and inputs containing NUL are skipped: the frame
//! decoders refuse those before the rewriter ever sees them).
//!
//! Invariants checked:
//! - no panic (and, run with `-timeout=10`, no pathological running time), for any text;
//! - if the rewrite succeeds, its output contains no NUL (it goes straight into a Query message);
//! - idempotence: rewriting the output again succeeds and yields the same text and the same
//!   `statement_kinds`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use struere_proxy::auth::identity::{ActorContext, ActorType, Environment};
use struere_proxy::rewrite::Rewriter;

fn actor() -> ActorContext {
    ActorContext {
        organization: "acme".into(),
        environment: Environment::Development,
        roles: vec!["admin".into()],
        actor_type: ActorType::User,
        actor_id: "u1".into(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    if sql.contains('\0') {
        return;
    }
    let actor = actor();
    let rewriter = Rewriter::new(1000);
    let Ok(rw) = rewriter.rewrite(sql, &actor) else {
        return;
    };
    assert!(!rw.sql.contains('\0'), "rewritten SQL contains NUL: {:?}", rw.sql);
    // A fresh rewriter, so a cache cannot answer for the second pass.
    let again = match Rewriter::new(1000).rewrite(&rw.sql, &actor) {
        Ok(again) => again,
        Err(e) => panic!("rewrite is not idempotent: {sql:?}\n  -> {:?}\n  -> refused: {e}", rw.sql),
    };
    assert_eq!(again.sql, rw.sql, "rewrite is not idempotent for {sql:?}");
    assert_eq!(again.statement_kinds, rw.statement_kinds, "statement kinds changed for {sql:?}");
});
