//! The per-message hot path, without a network: framing and decoding a client message, and the
//! rewrite of a statement on a cache miss and on a cache hit.

use std::hint::black_box;

/// The allocator the binary uses (`src/main.rs`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::sync::Arc;
use struere_proxy::auth::identity::{ActorContext, ActorType, Environment};
use struere_proxy::protocol::frame::split_frontend;
use struere_proxy::protocol::frontend::{decode_parse, decode_query, encode_parse, encode_query};

use struere_proxy::catalog::{Function, Relation};
use struere_proxy::rewrite::Rewriter;
use struere_proxy::rewrite::engine::PolicyEngine;

const SMALL: &str = "SELECT id, name FROM users WHERE organization_id = $1 AND email = 'a@b.c'";
const CATALOG: &str = "SELECT n.nspname as \"Schema\", c.relname as \"Name\", CASE c.relkind WHEN 'r' THEN 'table' \
     WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'i' THEN 'index' WHEN 'S' THEN 'sequence' \
     WHEN 't' THEN 'TOAST table' WHEN 'f' THEN 'foreign table' WHEN 'p' THEN 'partitioned table' \
     WHEN 'I' THEN 'partitioned index' END as \"Type\", pg_catalog.pg_get_userbyid(c.relowner) as \"Owner\" \
     FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam WHERE c.relkind IN ('r','p','') \
     AND n.nspname <> 'pg_catalog' AND n.nspname !~ '^pg_toast' AND n.nspname <> 'information_schema' \
     AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 1,2";

/// Writes by a scoped role: secure relation, WITH CHECK over the new row, hidden JSON keys merged.
const UPDATE: &str = "UPDATE entities SET data = jsonb_set(data, '{status}', '\"done\"') WHERE id = $1 RETURNING id";
const INSERT: &str = "INSERT INTO entities (id, entity_type, data) VALUES ($1, 'session', $2)";
/// A key lookup: the secure relation is guarded (index-preserving).
const LOOKUP: &str = "SELECT * FROM entities WHERE id = $1";

fn actor_with(role: &str) -> ActorContext {
    ActorContext {
        organization: "acme".into(),
        environment: Environment::Development,
        roles: vec![role.into()],
        actor_type: ActorType::User,
        actor_id: "u1".into(),
    }
}

fn actor() -> ActorContext {
    actor_with("admin")
}

/// The shipped policies over the demo catalog, plus what psql's catalog query calls.
fn engine() -> Arc<PolicyEngine> {
    let mut catalog = struere_proxy::catalog::demo::snapshot();
    for f in ["pg_get_userbyid", "pg_table_is_visible"] {
        catalog.functions.insert(
            f.into(),
            vec![Function { schema: "pg_catalog".into(), name: f.into(), leakproof: false, volatility: 's' }],
        );
    }
    for r in ["pg_namespace", "pg_am"] {
        catalog.relations.insert(("pg_catalog".into(), r.into()), Relation::plain_table("pg_catalog", r, &[]));
    }
    let policies = struere_proxy::policy::shipped().expect("shipped policies compile");
    Arc::new(PolicyEngine { policies, catalog: Arc::new(catalog), allow_functions: Default::default() })
}

fn framing(c: &mut Criterion) {
    let mut q = BytesMut::new();
    encode_query(&mut q, SMALL);
    let mut p = BytesMut::new();
    encode_parse(&mut p, "s1", SMALL, &[25]);
    c.bench_function("frame+decode Query", |b| {
        b.iter(|| {
            let mut buf = q.clone();
            let f = split_frontend(&mut buf, 1 << 24).ok().flatten().map(|f| f.body);
            black_box(f.as_deref().and_then(|body| decode_query(body).ok()).map(str::len))
        })
    });
    // What the audit log holds of an operator's statement (forwarded as sent): PostgreSQL's
    // lexer over the text, on the event loop, once per statement.
    c.bench_function("operator statement without constants", |b| {
        b.iter(|| black_box(struere_proxy::rewrite::without_constants(black_box(SMALL)).map(|s| s.len())))
    });
    // What a refusal's audit event names (kinds, relations): PostgreSQL's parse of the whole
    // text, worked out off the event loop with the rewrite that refused it.
    c.bench_function("refusal description catalog", |b| {
        b.iter(|| black_box(struere_proxy::rewrite::kinds_and_relations_named(black_box(CATALOG)).1.len()))
    });
    c.bench_function("frame+decode Parse", |b| {
        b.iter(|| {
            let mut buf = p.clone();
            let f = split_frontend(&mut buf, 1 << 24).ok().flatten().map(|f| f.body);
            black_box(f.as_deref().and_then(|body| decode_parse(body).ok()).map(|p| p.param_types.len()))
        })
    });
}

fn rewrite(c: &mut Criterion) {
    let engine = engine();
    for (name, sql, actor) in [
        ("small", SMALL, actor()),
        ("catalog", CATALOG, actor()),
        ("lookup (teacher)", LOOKUP, actor_with("teacher")),
        ("update (teacher)", UPDATE, actor_with("teacher")),
        ("insert (teacher)", INSERT, actor_with("teacher")),
    ] {
        c.bench_function(&format!("rewrite miss {name}"), |b| {
            b.iter(|| {
                // A fresh rewriter per iteration: always a cache miss, the first text of its
                // shape (no template is built until a second one comes).
                let r = Rewriter::new(16, engine.clone());
                black_box(r.rewrite(sql, &actor).map(|rw| rw.sql.len()))
            })
        });
        let warm = Rewriter::new(1024, engine.clone());
        let _ = warm.rewrite(sql, &actor);
        c.bench_function(&format!("rewrite hit {name}"), |b| {
            b.iter(|| black_box(warm.rewrite(sql, &actor).map(|rw| rw.sql.len())))
        });
    }
}

/// Simple-protocol statements that differ only in literal values (pgbench -S, ORMs inlining
/// ids): after the second, each is a template fill — lexer pass, lookup, literals re-inserted.
fn normalised(c: &mut Criterion) {
    let engine = engine();
    // psql's `\dt` with another schema excluded: a 1.4 KB text with 12 literals, one of them a slot.
    let catalog = CATALOG.replace("'information_schema'", "'information_schema_{}'");
    for (name, shape, actor) in [
        ("lookup by literal (teacher)", "SELECT * FROM entities WHERE id = 'acme-session-{}'", actor_with("teacher")),
        ("small by literal (admin)", "SELECT id, name FROM users WHERE id = '{}' AND email = 'a@b.c'", actor()),
        // A cast literal in a guarded condition is gated: the second miss, which builds the
        // template, also takes the gate out of its parameterised form and verifies that text
        // (`rewrite::parameterised_without_gates`).
        ("lookup by cast literal (teacher)", "SELECT * FROM entities WHERE id = '{}'::text", actor_with("teacher")),
        ("catalog by literal (admin)", catalog.as_str(), actor()),
    ] {
        let warm = Rewriter::new(1024, engine.clone());
        // The first text of a shape notes it, the second builds its template.
        let _ = warm.rewrite(&shape.replace("{}", "first"), &actor);
        let _ = warm.rewrite(&shape.replace("{}", "second"), &actor);
        let texts: Vec<String> = (0..1024).map(|i| shape.replace("{}", &i.to_string())).collect();
        // The second text of a shape: a miss that also builds the shape's template.
        c.bench_function(&format!("rewrite second miss {name}"), |b| {
            b.iter_batched_ref(
                || {
                    let r = Rewriter::new(16, engine.clone());
                    let _ = r.rewrite(&shape.replace("{}", "first"), &actor);
                    r
                },
                |r| black_box(r.rewrite(&shape.replace("{}", "second"), &actor).map(|rw| rw.sql.len())),
                BatchSize::SmallInput,
            )
        });
        // The third text: the template's first fill, looked up where sessions look (`cached`,
        // on the event loop), so whatever it costs stalls every session of that thread.
        c.bench_function(&format!("rewrite first fill {name}"), |b| {
            b.iter_batched_ref(
                || {
                    let r = Rewriter::new(16, engine.clone());
                    let _ = r.rewrite(&shape.replace("{}", "first"), &actor);
                    let _ = r.rewrite(&shape.replace("{}", "second"), &actor);
                    r
                },
                |r| black_box(r.cached(&shape.replace("{}", "third"), &actor).map(|rw| rw.sql.len())),
                BatchSize::SmallInput,
            )
        });
        let mut i = 0;
        c.bench_function(&format!("rewrite normalised hit {name}"), |b| {
            b.iter(|| {
                i = (i + 1) % texts.len();
                black_box(warm.rewrite(&texts[i], &actor).map(|rw| rw.sql.len()))
            })
        });
    }
}

criterion_group!(benches, framing, rewrite, normalised);
criterion_main!(benches);
