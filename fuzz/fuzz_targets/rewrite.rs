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
//! 2. The production `PolicyEngine`, over the shipped policies (`policy::shipped()`) and a catalog of the demo schema
//!    (plus `set_config` and `pg_notify`, whose uses the gate and the engine decide on).
//!    The engine adds predicates, secure relations and channel prefixes, so its output is not a fixed point of the
//!    engine in general. Invariants, for an accepted input `x` with output `y`:
//!    - no panic, and `y` has no NUL;
//!    - `y` re-parses: PostgreSQL's parser (pg_query, independently of the rewriter's own verifier) reads exactly as
//!      many statements as `statement_kinds` lists;
//!    - `y` re-prints to itself: the pipeline without a policy (`PassThrough`) either returns `y` unchanged with the
//!      same `statement_kinds`, or refuses it only as too complex (54000: the secure relations nest deeper or hold
//!      more AND/OR than a client's text may); where sqlparser cannot read `y` as printed (a set operation in an
//!      expression whose first operand keeps its parentheses, put back after the policy: `rewrite/respell.rs`), the
//!      pipeline forwards its own spelling of the same statement, which PostgreSQL's printer prints as it prints `y`;
//!    - `y` is not accepted back as client text when it carries the proxy's machinery: if the engine introduced the
//!      reserved `__struere` prefix (absent from `x`), the engine refuses `y` (42501, or 54000 when it is too deep
//!      to read), so a client cannot submit a forged "already secured" relation;
//!    - where the engine changed nothing (`y` is what `PassThrough` prints for `x`), the engine re-rewrites `y` to
//!      itself: a fixed point after one round;
//!    - determinism: a fresh engine rewriter gives the identical answer (text or refusal) for `x`.
//! 3. For both, the properties of the newer ways (`check_new_ways`): bound-value rules (`set_config($1, …)`) only on one
//!    top-level SELECT and naming its parameters, the same on a re-rewrite and from the cache; a `COPY … FROM STDIN …
//!    WHERE` forwarded as the client's own statement; and no relation or constant nextval/currval/setval sequence of
//!    another tenant's scratch schema in an output of the engine (in any clause, as the complete walk must find them).
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
use struere_proxy::rewrite::{DdlTarget, Refusal, Rewriter, Rewritten, StatementPolicy};

/// Changes nothing: the pipeline's own properties are fuzzed without a policy set.
struct PassThrough;

impl StatementPolicy for PassThrough {
    fn check_pg(&self, _node: &pg_query::NodeEnum, _actor: &ActorContext) -> Result<(), Refusal> {
        Ok(())
    }

    fn apply(&self, _stmt: &mut Statement, _actor: &ActorContext) -> Result<(), Refusal> {
        Ok(())
    }

    fn check_ddl_target(&self, _target: &DdlTarget<'_>, _actor: &ActorContext) -> Result<(), Refusal> {
        Ok(())
    }

    fn check_partial_assignment(
        &self,
        _target: &[String],
        _column: &str,
        _actor: &ActorContext,
    ) -> Result<(), Refusal> {
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
            // The demo catalog, with the built-in functions the gate's own rules are about (`set_config` with bound
            // parameters, `pg_notify`'s channel), so that the engine reaches those rules too.
            let mut catalog = struere_proxy::catalog::demo::snapshot();
            for name in ["set_config", "pg_notify"] {
                catalog.functions.entry(name.into()).or_insert_with(|| {
                    vec![struere_proxy::catalog::Function {
                        schema: "pg_catalog".into(),
                        name: name.into(),
                        leakproof: false,
                        volatility: 'v',
                    }]
                });
            }
            Arc::new(PolicyEngine { policies, catalog: Arc::new(catalog), allow_functions: BTreeSet::new() })
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

    // 1. The pipeline alone: no panic, no NUL, idempotent. No exact-text cache, so the text's
    // second rewrite builds its shape's template and the third fills it.
    let rewriter = Rewriter::new(1000, pass()).with_exact_cache_capacity(0);
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
        assert_eq!(again.param_rules, rw.param_rules, "bound-value rules changed for {sql:?}");
        check_new_ways(sql, rw, &actor, false);
    }
    if let Err(e) = &first {
        // What is logged of a refusal only ever leaves things out (`Refusal::logged`).
        assert!(e.logged().len() <= e.to_string().len(), "logged reason grew: {e}");
    }
    if verbose() {
        match &first {
            Ok(rw) => eprintln!("PASS OK {:?} -> {:?} {:?}", sql, rw.sql, rw.statement_kinds),
            Err(e) => eprintln!("PASS REFUSED {:?}: {e}", sql),
        }
    }
    // The cache answers what the pipeline answered (a template hit may add the parameterised
    // form and name it in the event hash; the text and kinds are the same): the second time
    // (the template's build) and the third (its fill, or another miss).
    for _ in 0..2 {
        check_cached(&rewriter, sql, &actor, &first);
    }

    // 2. The production policy engine.
    let by_engine = Rewriter::new(0, engine()).rewrite(sql, &actor);
    if verbose() {
        match &by_engine {
            Ok(rw) => eprintln!("ENGINE OK {:?} -> {:?}", sql, rw.sql),
            Err(e) => eprintln!("ENGINE REFUSED {:?}: {e}", sql),
        }
    }
    assert_eq!(Rewriter::new(0, engine()).rewrite(sql, &actor), by_engine, "engine is not deterministic for {sql:?}");
    if let Ok(rw) = &by_engine {
        check_new_ways(sql, rw, &actor, true);
        check_engine_output(sql, rw, first.as_deref().ok(), &actor);
    }
    // A text whose rewrite holds conversion gates: its template's fill, whose parameterised form
    // may leave them out (`Rewriter::parameterised_without_gates`), answers the same.
    if let Ok(rw) = &by_engine
        && rw.sql.contains("num_nulls(")
    {
        let templates = Rewriter::new(1000, engine()).with_exact_cache_capacity(0);
        for _ in 0..3 {
            check_cached(&templates, sql, &actor, &by_engine);
        }
    }
    // A Parse whose declared types the text without conversion gates does not fit gets the same
    // statement with them (`rewrite/engine/ungate.rs`): accepted whenever that text is.
    if let Ok(rw) = &by_engine
        && rw.gate_needs.is_some()
    {
        match Rewriter::new(0, engine()).rewrite_keeping_gates(sql, &actor) {
            Ok(gated) => {
                assert!(gated.gate_needs.is_none() && gated.statement_kinds == rw.statement_kinds, "{sql:?}");
                check_engine_output(sql, &gated, first.as_deref().ok(), &actor);
            }
            Err(e) => panic!("{sql:?} is refused with its conversion gates: {e}"),
        }
    }
});

/// The rewriter's answer for `sql` now (from a cache, or a miss) is the pipeline's `first`.
fn check_cached(rewriter: &Rewriter, sql: &str, actor: &ActorContext, first: &Result<Arc<Rewritten>, Refusal>) {
    let cached = rewriter.rewrite(sql, actor);
    match (&cached, first) {
        (Ok(c), Ok(f)) => {
            assert_eq!(
                (&c.sql, &c.statement_kinds, &c.param_rules),
                (&f.sql, &f.statement_kinds, &f.param_rules),
                "cached answer differs for {sql:?}"
            );
            if let Some(b) = &c.bound {
                check_bound(b, &c.sql);
            }
        }
        _ => assert_eq!(&cached, first, "cached answer differs for {sql:?}"),
    }
}

/// A parameterised form is one statement with one typed parameter per value, and with the values
/// put back as literals (through the printer's quoting) it is the filled text; where the form left
/// out conversion gates (its parameters only they held then occur no more), the filled text
/// without its gates, as sqlparser reads both.
fn check_bound(b: &struere_proxy::rewrite::Bound, filled: &str) {
    assert_eq!(b.types.len(), b.values.len());
    let parsed = pg_query::parse(&b.sql, 0).expect("the parameterised form parses");
    assert_eq!(parsed.protobuf.stmts.len(), 1, "one statement: {}", b.sql);
    let ungated = !b.sql.contains("num_nulls(") && filled.contains("num_nulls(");
    // The parameters as PostgreSQL's lexer finds them (a `$1` inside a string or a name is none).
    let scanned = pg_query::scan(&b.sql).expect("the parameterised form scans");
    let params: Vec<(usize, usize)> = scanned
        .tokens
        .iter()
        .filter(|t| t.token == pg_query::protobuf::Token::Param as i32)
        .map(|t| (t.start as usize, t.end as usize))
        .collect();
    let number = |&(start, end): &(usize, usize)| b.sql[start + 1..end].parse::<usize>().expect("a parameter number");
    let counts: Vec<usize> = (1..=b.values.len()).map(|k| params.iter().filter(|p| number(p) == k).count()).collect();
    assert!(counts.iter().all(|&n| n == 1 || (ungated && n == 0)), "each parameter once: {counts:?} in {}", b.sql);
    assert_eq!(counts.iter().sum::<usize>(), params.len(), "no parameter beyond the values: {}", b.sql);
    // Each parameter where the lexer found it, back to front, replaced by its value as a literal.
    let mut text = b.sql.to_string();
    for p in params.iter().rev() {
        let k = number(p) - 1;
        let literal = match b.types[k] {
            0 => struere_proxy::rewrite::string_literal(&b.values[k]),
            _ => b.values[k].clone(),
        };
        text.replace_range(p.0..p.1, &literal);
    }
    if !ungated {
        assert_eq!(text, filled, "the parameterised form is not the filled text");
        return;
    }
    let read = |sql: &str| sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql);
    let (Ok(mut form), Ok(mut filled_stmts)) = (read(&text), read(filled)) else {
        panic!("sqlparser reads neither the filled text nor the form: {filled:?} / {text:?}")
    };
    let (Some(form), Some(whole)) = (form.pop(), filled_stmts.pop()) else { panic!("no statement: {filled:?}") };
    assert_eq!(
        form,
        struere_proxy::rewrite::engine::ungate::without_any_gates(&whole),
        "the parameterised form is not the filled text without its gates: {filled:?} / {text:?}"
    );
}

/// The engine's output re-parses, re-prints to itself, is refused back when it carries reserved names, and is a fixed
/// point where the engine changed nothing (see the module docs).
fn check_engine_output(sql: &str, rw: &Rewritten, passed: Option<&Rewritten>, actor: &ActorContext) {
    let y = &rw.sql;
    assert!(!y.contains('\0'), "engine output contains NUL: {y:?}");
    match pg_query::parse(y, 0) {
        Ok(parsed) => assert_eq!(
            parsed.protobuf.stmts.len(),
            rw.statement_kinds.len(),
            "engine output has another statement count: {sql:?} -> {y:?}"
        ),
        Err(e) => panic!("engine output does not parse: {sql:?} -> {y:?}: {e}"),
    }
    match Rewriter::new(0, pass()).rewrite(y, actor) {
        Ok(again) => {
            if again.sql != *y && unreadable_by_sqlparser(y) {
                let printed =
                    |s: &str| pg_query::parse(s, 0).and_then(|p| p.deparse(pg_query::DeparseOptions::default())).ok();
                assert_eq!(
                    printed(&again.sql),
                    printed(y),
                    "engine output is respelled as another statement for {sql:?}"
                );
            } else {
                assert_eq!(&again.sql, y, "engine output does not re-print to itself for {sql:?}");
            }
            assert_eq!(again.statement_kinds, rw.statement_kinds, "engine output changes kinds for {sql:?}");
        }
        Err(Refusal::TooComplex(_)) => {}
        Err(e) => panic!("engine output is refused by the bare pipeline: {sql:?} -> {y:?}: {e}"),
    }
    let again = Rewriter::new(0, engine()).rewrite(y, actor);
    // Only where the engine introduced a name starting with the prefix (its aliases are always quoted): the client's
    // own text may hold the prefix in a literal, and a namespaced channel may hold it mid-name (found by fuzzing:
    // `LISTEN _struere5bb87b` becomes `LISTEN "t…__struere5bb87b"`, a channel, not a reserved name).
    if y.to_ascii_lowercase().contains("\"__struere") && !sql.to_ascii_lowercase().contains("__struere") {
        match &again {
            Err(Refusal::Denied(_) | Refusal::TooComplex(_)) => {}
            other => panic!("engine accepts its own secured output back: {sql:?} -> {y:?} -> {other:?}"),
        }
    }
    if passed.is_some_and(|p| p.sql == *y) {
        match &again {
            Ok(z) => assert_eq!(&z.sql, y, "engine is not a fixed point on unchanged text {sql:?}"),
            Err(e) => panic!("engine refuses its own unchanged output: {sql:?} -> {y:?}: {e}"),
        }
    }
}

/// sqlparser cannot read `sql` as written, so the pipeline reads another spelling of it (`rewrite/respell.rs`).
fn unreadable_by_sqlparser(sql: &str) -> bool {
    sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql).is_err()
}

/// Properties of the ways added with COPY … FROM STDIN WHERE, `set_config` with bound parameters and the complete tree
/// walk (`pgtree::visit`), for any accepted output `rw` of `sql` (pass-through or engine):
/// - bound-value rules (`ParamRule`) come only with one top-level SELECT, and name parameters `$n` of its text;
/// - a `COPY … FROM STDIN … WHERE` is forwarded as the client's own statement: PostgreSQL's printing of the output is
///   PostgreSQL's printing of the input (nothing of the condition is dropped or changed);
/// - no relation of the output, and no sequence named by a constant in nextval/currval/setval (in any clause: VALUES,
///   LIMIT, ARRAY[], FILTER, …), lies in another tenant's scratch schema (for the pass-through policy, only where the
///   client's text did not name one itself).
fn check_new_ways(sql: &str, rw: &Rewritten, actor: &ActorContext, strict: bool) {
    let y = &rw.sql;
    if !rw.param_rules.is_empty() {
        assert_eq!(&*rw.statement_kinds, ["SelectStmt".to_string()], "rules on a non-SELECT: {sql:?} -> {y:?}");
        for r in rw.param_rules.iter() {
            assert!(r.param() >= 1 && y.contains(&format!("${}", r.param())), "rule {r:?} names no parameter of {y:?}");
        }
    }
    let Ok(input) = pg_query::parse(sql, 0) else { return };
    let Ok(output) = pg_query::parse(y, 0) else { return };
    if let [one] = input.protobuf.stmts.as_slice()
        && let Some(pg_query::NodeEnum::CopyStmt(c)) = one.stmt.as_ref().and_then(|s| s.node.as_ref())
        && c.is_from
        && c.where_clause.is_some()
    {
        let printed = |p: &pg_query::ParseResult| p.deparse(pg_query::DeparseOptions::default()).ok();
        assert_eq!(printed(&output), printed(&input), "COPY … WHERE is not forwarded as sent: {sql:?} -> {y:?}");
    }
    let own = struere_proxy::rewrite::engine::scratch_schema(actor);
    let foreign = |names: Vec<String>| -> Vec<String> {
        names.into_iter().filter(|n| n.starts_with("scratch_") && *n != own).collect()
    };
    let bad = foreign(scratch_references(&output));
    if !bad.is_empty() {
        // The engine refuses every one; the pass-through policy forwards what the client wrote.
        let client = foreign(scratch_references(&input));
        assert!(
            !strict && bad.iter().all(|b| client.contains(b)),
            "output names another tenant's scratch schema: {sql:?} -> {y:?}: {bad:?}"
        );
    }
}

/// Every schema named in the tree: a relation's schema, and the schema part of a constant sequence name passed to
/// nextval/currval/setval (also cast to regclass). A complete walk of pg_query's tree through its serde form.
fn scratch_references(tree: &pg_query::ParseResult) -> Vec<String> {
    fn schema_of_sequence(text: &str) -> Option<String> {
        // `schema.seq`, `"Schema".seq`: the next-to-last part of the name as regclass reads it (unquoted parts
        // folded to lower case, quoted ones as written with `""` for `"`).
        let (mut parts, mut part, mut quoted, mut chars) = (Vec::new(), String::new(), false, text.chars().peekable());
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    chars.next();
                    part.push('"');
                }
                '"' => quoted = !quoted,
                '.' if !quoted => parts.push(std::mem::take(&mut part)),
                c if quoted => part.push(c),
                c => part.push(c.to_ascii_lowercase()),
            }
        }
        parts.push(part);
        let n = parts.len();
        (n >= 2).then(|| parts.swap_remove(n - 2))
    }
    fn constant(arg: &serde_json::Value) -> Option<&str> {
        let node = arg.get("node")?;
        if let Some(c) = node.get("AConst") {
            return c.get("val")?.get("Sval")?.get("sval")?.as_str();
        }
        constant(node.get("TypeCast")?.get("arg")?)
    }
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                // A RangeVar, whether held by a Node or directly by a field (`relation`, `typevar`, …).
                if m.contains_key("relname")
                    && let Some(s) = m.get("schemaname").and_then(|s| s.as_str())
                    && !s.is_empty()
                {
                    out.push(s.to_string());
                }
                if let Some(f) = m.get("FuncCall") {
                    let name = f
                        .get("funcname")
                        .and_then(|n| n.as_array())
                        .and_then(|n| n.last())
                        .and_then(|n| n.get("node")?.get("String")?.get("sval")?.as_str());
                    if matches!(name, Some("nextval" | "currval" | "setval"))
                        && let Some(text) = f.get("args").and_then(|a| a.get(0)).and_then(constant)
                        && let Some(schema) = schema_of_sequence(text)
                    {
                        out.push(schema);
                    }
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = serde_json::to_value(&tree.protobuf) {
        walk(&v, &mut out);
    }
    out
}
