//! Fuzz the statement rewriter: `Rewriter::new(1000, policy).rewrite(sql, &actor)`.
//!
//! The input is the SQL text. Inputs that are not UTF-8, or that contain NUL, are skipped: the frame decoders refuse
//! them before the rewriter sees them.
//!
//! Each input goes through two rewriters, both with a fixed development/admin actor:
//! 1. `PassThrough`, a policy that changes nothing. This covers the pipeline itself (classify → parse → gate → print →
//!    verify). Invariants:
//!    - no panic, and no pathological running time under `-timeout=10`;
//!    - the output has no NUL;
//!    - idempotence: a fresh rewriter, given the output, accepts it and returns the same text and the same
//!      `statement_kinds`;
//!    - rewriting the same text again on the same (caching) rewriter gives the same answer.
//! 2. The production `PolicyEngine`, over the shipped policies (`policy::shipped()`) and a catalog of the demo schema.
//!    Invariants: no panic, and the output has no NUL.
//!
//! libfuzzer-sys installs a panic hook that aborts. A panic that the rewriter's own `catch_unwind` would turn into a
//! "refused: internal error" is therefore still reported as a crash.
#![no_main]

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use sqlparser::ast::Statement;
use struere_proxy::auth::identity::{ActorContext, ActorType, Environment};
use struere_proxy::rewrite::engine::PolicyEngine;
use struere_proxy::rewrite::{Refusal, Rewriter, StatementPolicy};

/// Changes nothing: the pipeline's own properties are fuzzed without a policy set.
struct PassThrough;

impl StatementPolicy for PassThrough {
    fn check_pg(&self, _node: &pg_query::NodeEnum, _actor: &ActorContext) -> Result<(), Refusal> {
        Ok(())
    }

    fn apply(&self, _stmt: &mut Statement, _actor: &ActorContext) -> Result<(), Refusal> {
        Ok(())
    }

    fn check_output(&self, _node: &pg_query::NodeEnum, _actor: &ActorContext) -> Result<(), Refusal> {
        Ok(())
    }
}

fn actor() -> ActorContext {
    ActorContext {
        organization: "acme".into(),
        environment: Environment::Development,
        roles: vec!["admin".into()],
        actor_type: ActorType::User,
        actor_id: "u1".into(),
    }
}

fn engine() -> Arc<PolicyEngine> {
    static ENGINE: OnceLock<Arc<PolicyEngine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let policies = struere_proxy::policy::shipped().expect("shipped policies compile");
            Arc::new(PolicyEngine { policies, catalog: Arc::new(struere_proxy::catalog::demo::snapshot()), allow_functions: BTreeSet::new() })
        })
        .clone()
}

/// `STRUERE_FUZZ_VERBOSE=1` prints each input's outcome (for triage and corpus statistics).
fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("STRUERE_FUZZ_VERBOSE").is_some())
}

fn pass() -> Arc<dyn StatementPolicy> {
    Arc::new(PassThrough)
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    if sql.contains('\0') {
        return;
    }
    let actor = actor();

    // 1. The pipeline alone: no panic, no NUL, idempotent.
    let rewriter = Rewriter::new(1000, pass());
    let first = rewriter.rewrite(sql, &actor);
    if let Ok(rw) = &first {
        assert!(!rw.sql.contains('\0'), "rewritten SQL contains NUL: {:?}", rw.sql);
        // A fresh rewriter, so no cache can answer for the second pass.
        let again = match Rewriter::new(1000, pass()).rewrite(&rw.sql, &actor) {
            Ok(again) => again,
            Err(e) => panic!("rewrite is not idempotent: {sql:?}\n  -> {:?}\n  -> refused: {e}", rw.sql),
        };
        assert_eq!(again.sql, rw.sql, "rewrite is not idempotent for {sql:?}");
        assert_eq!(again.statement_kinds, rw.statement_kinds, "statement kinds changed for {sql:?}");
    }
    if verbose() {
        match &first {
            Ok(rw) => eprintln!("PASS OK {:?} -> {:?} {:?}", sql, rw.sql, rw.statement_kinds),
            Err(e) => eprintln!("PASS REFUSED {:?}: {e}", sql),
        }
    }
    // The cache answers what the pipeline answered.
    assert_eq!(rewriter.rewrite(sql, &actor), first, "cached answer differs for {sql:?}");

    // 2. The production policy engine: no panic, no NUL.
    let by_engine = Rewriter::new(0, engine()).rewrite(sql, &actor);
    if let Ok(rw) = &by_engine {
        assert!(!rw.sql.contains('\0'), "engine output contains NUL: {:?}", rw.sql);
    }
    if verbose() {
        match &by_engine {
            Ok(rw) => eprintln!("ENGINE OK {:?} -> {:?}", sql, rw.sql),
            Err(e) => eprintln!("ENGINE REFUSED {:?}: {e}", sql),
        }
    }
});
