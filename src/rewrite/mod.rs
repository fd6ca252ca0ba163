//! The SQL rewriter: turns the text of one simple-Query or Parse message from an
//! environment-key caller into the exact text forwarded upstream, or refuses it.
//!
//! Pipeline (each step in its own file; any doubt is a refusal):
//!
//! 1. `cache` — (caller, SQL text) → an already verified output.
//! 2. `classify` — PostgreSQL's parser (pg_query) splits the text into statements and names
//!    each one's kind. It is the authority: the text is only ever cut where PostgreSQL cuts it.
//! 3. sqlparser parses each statement on its own, with a recursion limit. A statement sqlparser
//!    cannot parse is forwarded verbatim only when PostgreSQL says it is a kind that touches no
//!    data (`TransactionStmt`, `VariableShowStmt`, `ConstraintsSetStmt`); DDL of the kinds in
//!    `ddl::KINDS` is checked on PostgreSQL's own tree against an allowlist and the policy's
//!    scratch-object rules, and printed by PostgreSQL's own printer (`ddl`); a top-level SELECT's
//!    locking clause (`locking`) or a top-level UPDATE's subscripted targets (`subscript`) come
//!    off PostgreSQL's tree, the rest takes the usual way and they go back on the verified
//!    rewrite's tree; so does a `COPY … FROM STDIN … WHERE`'s condition (`copywhere`, verified
//!    as the WHERE of a SELECT over the same table); a statement sqlparser cannot read as spelled (Django's parenthesised set
//!    operations in subqueries and under EXPLAIN) takes the usual way from another spelling of
//!    it (`respell`: PostgreSQL's printing of the same tree, at most with the `COSTS OFF` the
//!    policy adds to EXPLAIN anyway and wrappers taken off again before printing); otherwise
//!    refused.
//! 4. `gate` — rules the printer's safety depends on (no changing pinned settings), on both
//!    trees; then the `StatementPolicy` (the policy engine, `engine/`).
//! 5. `printer` — prints without ever letting sqlparser's `Display` write client data.
//! 6. `verify` — PostgreSQL's parser and lexer must read the output as intended; a statement
//!    the policy did not change must parse to exactly the tree the client's text parsed to.
//!
//! Depth: every recursive step is bounded. Input is at most `MAX_SQL_BYTES`. PostgreSQL's
//! parser guards its own stack, and pg_query refuses to decode trees deeper than ~100
//! messages. sqlparser's parser has a recursion limit (and grows its stack on demand); the one
//! tree shape PostgreSQL keeps flat but sqlparser nests one level per operator — `AND`/`OR`
//! chains — is bounded by `MAX_BOOLEAN_OPERATORS` before sqlparser sees it, so displaying,
//! visiting and dropping its tree cannot exhaust the stack.

mod cache;
mod classify;
mod copywhere;
mod ddl;
pub mod engine;
mod gate;
mod lexer;
pub use logged::without_constants;
mod locking;
mod logged;
mod pgparse;
mod pgtree;
mod policy;
mod printer;
mod respell;
mod shape;
mod subscript;
mod verify;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use sqlparser::ast::Statement;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::{Parser, ParserError};

use crate::auth::identity::ActorContext;
use crate::protocol::sqlstate::SqlState;

pub use engine::ungate::ParamNeed;
pub use gate::{PINNED_SETTINGS, ParamRule};
pub use policy::{DdlTarget, StatementPolicy};
pub use printer::quoted_ident;

use classify::PgParseError;
use verify::{Expected, Form, PieceCheck};

/// Largest SQL text the rewriter accepts (1 MiB).
pub const MAX_SQL_BYTES: usize = 1024 * 1024;

/// sqlparser's recursion limit: each nested expression, subquery, table factor or type costs
/// one or more levels (59 nested parentheses pass). pg_query's decoder is usually the tighter
/// bound: about 15 nested scalar subqueries or 46 chained binary operators.
pub const SQLPARSER_RECURSION_LIMIT: usize = 64;

/// Most `AND`/`OR` keywords one statement may contain (see the module docs).
pub const MAX_BOOLEAN_OPERATORS: usize = 200;

/// Statement kinds that touch no data and may be forwarded as the client wrote them when
/// sqlparser cannot parse them.
const DATA_FREE_KINDS: &[&str] = &["TransactionStmt", "VariableShowStmt", "ConstraintsSetStmt", "FetchStmt"];

/// The message of a refusal caused by a panic inside the pipeline.
pub(crate) const INTERNAL_ERROR: &str = "refused: internal error in the proxy's SQL rewriter";

/// The rewritten text of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// Verified text to send upstream. Empty if the input held no statement (the server then
    /// answers EmptyQueryResponse).
    pub sql: String,
    /// pg_query node name of each statement, in order, e.g. `SelectStmt`, `TransactionStmt`.
    /// (This and the next three are shared by every fill of a template and every audit event.)
    pub statement_kinds: Arc<[String]>,
    /// The relations the client's statements name (CTE names excluded), for audit events.
    pub tables: Arc<[String]>,
    /// Hash of `sql` (of `bound.sql` when there is one) and the policy version (audit events):
    /// computed once, cached with the rest.
    pub sql_hash: Arc<str>,
    pub policy_version: Option<Arc<str>>,
    /// The same statement with its value literals as parameters (literal-normalised texts with
    /// a template, `shape.rs`): a session may prepare `sql` once per upstream connection and
    /// bind the values, so the server plans it once instead of once per execution.
    pub bound: Option<Bound>,
    /// Conditions on the values a Bind supplies that accepting the statement depends on
    /// (`set_config($1, …)`, `gate.rs`); empty for almost every statement. A session checks
    /// them on every Bind of the statement; a simple Query, which binds nothing, is refused.
    pub param_rules: Arc<[ParamRule]>,
    /// Set when `sql` leaves out the conversion gates of its `$n` (`engine::ungate`): what the
    /// parameters' types must be for that. A Parse whose declared types do not meet them
    /// prepares `Rewriter::rewrite_keeping_gates`'s text instead. (A simple Query binds no
    /// parameters: PostgreSQL refuses any `$n` in it before it runs.)
    pub gate_needs: Option<Arc<[ParamNeed]>>,
}

impl Rewritten {
    /// Whether a Parse declaring these parameter types may prepare `sql`.
    pub fn fits(&self, declared: &[u32]) -> bool {
        self.gate_needs.as_ref().is_none_or(|needs| needs.iter().all(|n| n.met_by(declared)))
    }
}

/// A rewritten statement as a parameterised text and the values of this execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// Verified like the rewrite: PostgreSQL reads it as the rewrite's statement with exactly
    /// one parameter where each value literal was.
    pub sql: Arc<str>,
    /// Parameter types: the literal's own type (int4, int8, numeric) or 0 (unknown) for a
    /// string literal, which PostgreSQL then types from its context exactly as the literal.
    pub types: Arc<[u32]>,
    /// The literal values in text form (strings decoded: no quoting is involved).
    pub values: Vec<String>,
}

/// `value` as a SQL string literal, quoted by the printer (for checks of `Bound` forms).
pub fn string_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    printer::push_string_literal(&mut out, value);
    out
}

/// Why a text is not forwarded. The message is for humans (it names what was refused and why)
/// and never contains values the proxy itself adds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 42601: PostgreSQL cannot parse it, or the proxy cannot parse a statement that may touch
    /// data.
    #[error("{0}")]
    Syntax(String),
    /// 42501: a rule refuses it.
    #[error("{0}")]
    Denied(String),
    /// 42501: the printed text did not verify (the message says what differed).
    #[error("{0}")]
    Unverifiable(String),
    /// 54000: too large or too deeply nested.
    #[error("{0}")]
    TooComplex(String),
}

impl Refusal {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            Refusal::Syntax(_) => SqlState::SYNTAX_ERROR,
            Refusal::Denied(_) | Refusal::Unverifiable(_) => SqlState::INSUFFICIENT_PRIVILEGE,
            Refusal::TooComplex(_) => SqlState::PROGRAM_LIMIT_EXCEEDED,
        }
    }
}

/// Rewrites SQL for environment-key callers. Cheap to share (`&self`, thread-safe).
pub struct Rewriter {
    cache: cache::RewriteCache,
    /// What is known of literal-normalised texts (`shape.rs`), keyed by (caller, shape).
    templates: cache::RewriteCache<ShapeState>,
    /// Makes the sentinels of template probes unguessable.
    nonce: String,
    /// The policy in force and its generation (bumped on every swap).
    policy: std::sync::RwLock<(Arc<dyn StatementPolicy>, u64)>,
    stats: CacheStats,
    /// A miss that takes longer is refused (and not cached).
    time_limit: std::time::Duration,
}

/// What the caches hold for a text: its rewrite, or a miss with the text's shape when the
/// shape is to be noted or its template built.
enum Lookup<'s> {
    Hit(Arc<Rewritten>),
    Miss(Option<ShapeMiss<'s>>),
}

/// A miss of a text with a shape the rewriter has no decision for yet.
struct ShapeMiss<'s> {
    shape: shape::Shape<'s>,
    /// The shape was seen before: build its template now.
    build: bool,
}

/// What the rewriter knows of one caller's shape.
enum ShapeState {
    /// Rewritten once, with no template: the second text of the shape builds it. A template
    /// costs a second rewrite (its probe) and pays off only when the shape comes back, so a text
    /// seen once (an agent's ad-hoc statement) never pays for it.
    SeenOnce,
    /// Its template, or `None` when the shape has no usable one (not built again until the
    /// cache is cleared).
    Decided(Option<shape::Template>),
}

/// How rewrites were found (metrics).
#[derive(Debug, Default)]
pub struct CacheStats {
    pub exact_hits: std::sync::atomic::AtomicU64,
    pub template_hits: std::sync::atomic::AtomicU64,
    pub misses: std::sync::atomic::AtomicU64,
}

impl Rewriter {
    /// `cache_capacity` is the number of (caller, text) entries kept; 0 disables the cache.
    pub fn new(cache_capacity: usize, policy: Arc<dyn StatementPolicy>) -> Self {
        let mut nonce = [0u8; 8];
        if getrandom::fill(&mut nonce).is_err() {
            // Uniqueness in the client's text is also checked; the nonce only adds to it.
            nonce = std::process::id().to_le_bytes().repeat(2).try_into().unwrap_or_default();
        }
        Rewriter {
            cache: cache::RewriteCache::new(cache_capacity),
            templates: cache::RewriteCache::new(cache_capacity),
            nonce: hex::encode(nonce),
            policy: std::sync::RwLock::new((policy, 0)),
            stats: CacheStats::default(),
            time_limit: std::time::Duration::MAX,
        }
    }

    /// Keep at most `capacity` exact texts (0: none), leaving the templates' capacity as it is.
    /// Without exact texts, a text seen again is a second miss of its shape, which builds the
    /// shape's template (the fuzzer's way to the template path).
    pub fn with_exact_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache = cache::RewriteCache::new(capacity);
        self
    }

    /// Refuse (54000) a statement whose rewrite takes longer than `limit`. Size and nesting
    /// limits bound the work; this bounds what a client can make one statement cost in time.
    pub fn with_time_limit(mut self, limit: std::time::Duration) -> Self {
        self.time_limit = limit;
        self
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Swap in a new policy (a reloaded policy set or catalog). Cached rewrites made under the
    /// old one are dropped.
    pub fn set_policy(&self, policy: Arc<dyn StatementPolicy>) {
        let mut current = self.policy.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = (policy, current.1.wrapping_add(1));
        self.cache.clear();
        self.templates.clear();
    }

    fn current_policy(&self) -> (Arc<dyn StatementPolicy>, u64) {
        let current = self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        (Arc::clone(&current.0), current.1)
    }

    /// The rewrite of `sql` if the cache holds it (the text, or a template its literals fill):
    /// a hash lookup and at most a lexer pass, cheap enough for the event loop. `None`: a miss,
    /// which `rewrite` works out (sessions run that off the event loop).
    pub fn cached(&self, sql: &str, actor: &ActorContext) -> Option<Arc<Rewritten>> {
        match self.lookup(sql, actor) {
            Lookup::Hit(hit) => Some(hit),
            Lookup::Miss(_) => None,
        }
    }

    fn lookup<'s>(&self, sql: &'s str, actor: &ActorContext) -> Lookup<'s> {
        use std::sync::atomic::Ordering::Relaxed;
        if sql.len() > MAX_SQL_BYTES {
            return Lookup::Miss(None);
        }
        if let Some(hit) = self.cache.get(actor, sql) {
            self.stats.exact_hits.fetch_add(1, Relaxed);
            return Lookup::Hit(hit);
        }
        // The same statement with other literal values was rewritten before: fill its template.
        let shape = if sql.len() <= cache::MAX_CACHED_SQL_BYTES { shape::scan(sql) } else { None };
        let Some(shape) = shape else { return Lookup::Miss(None) };
        match self.templates.get(actor, &shape.key).as_deref() {
            None => Lookup::Miss(Some(ShapeMiss { shape, build: false })),
            Some(ShapeState::SeenOnce) => Lookup::Miss(Some(ShapeMiss { shape, build: true })),
            Some(ShapeState::Decided(template)) => match template.as_ref().and_then(|t| t.fill(&shape)) {
                Some(filled) => {
                    self.stats.template_hits.fetch_add(1, Relaxed);
                    Lookup::Hit(Arc::new(filled))
                }
                // Tried before: no template for this shape, or one whose fixed literals differ
                // from these. Building again would cost a second rewrite for nothing.
                None => Lookup::Miss(None),
            },
        }
    }

    /// Rewrite the text of one simple-Query message (may hold several statements) or one
    /// Parse message for an environment-key caller. Returns the exact text to forward upstream.
    pub fn rewrite(&self, sql: &str, actor: &ActorContext) -> Result<Arc<Rewritten>, Refusal> {
        within_size_limit(sql)?;
        let shape = match self.lookup(sql, actor) {
            Lookup::Hit(hit) => return Ok(hit),
            Lookup::Miss(shape) => shape,
        };
        self.stats.misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let (policy, generation) = self.current_policy();
        let rewritten = Arc::new(rewrite_uncached(sql, actor, policy.as_ref())?);
        let template = shape.as_ref().filter(|miss| miss.build).map(|miss| {
            shape::Template::build(
                sql,
                &miss.shape,
                &rewritten,
                &self.nonce,
                |probe| rewrite_guarded(probe, actor, policy.as_ref(), Output::TemplateProbe, Gates::LeaveOut).ok(),
                |form, types, base| parameterised_without_gates(form, types, base, actor, policy.as_ref()),
            )
        });
        self.within_time_limit(started)?;
        self.unless_swapped(generation, || {
            match (shape, template) {
                // Texts with a template are found through it; keeping each literal variant as
                // well would only churn the exact cache.
                (Some(miss), Some(Some(template))) => {
                    self.templates.insert(actor, &miss.shape.key, Arc::new(ShapeState::Decided(Some(template))));
                }
                (Some(miss), template) => {
                    let state = match template {
                        // Built, and no usable template came of it.
                        Some(_) => ShapeState::Decided(None),
                        None => ShapeState::SeenOnce,
                    };
                    self.templates.insert(actor, &miss.shape.key, Arc::new(state));
                    self.cache.insert(actor, sql, Arc::clone(&rewritten));
                }
                (None, _) => self.cache.insert(actor, sql, Arc::clone(&rewritten)),
            }
        });
        Ok(rewritten)
    }

    /// Run `insert` (into a cache) unless the policy was swapped since `generation`: a rewrite
    /// made under a policy that was swapped out meanwhile is used once but never cached, or it
    /// would outlive the swap's cache clear. The read lock is held across the check and the
    /// insert, so a swap (write lock, then clear) cannot fall in between.
    fn unless_swapped(&self, generation: u64, insert: impl FnOnce()) {
        let current = self.policy.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.1 == generation {
            insert();
        }
    }
}

impl Rewriter {
    /// What a Parse of `sql` declaring these parameter types prepares: `rewrite`'s text, or,
    /// where the types do not meet its `gate_needs` (`Rewritten::fits`), the same statement
    /// with its conversion gates (`rewrite_keeping_gates`).
    pub fn rewrite_parse(&self, sql: &str, declared: &[u32], actor: &ActorContext) -> Result<Arc<Rewritten>, Refusal> {
        let rw = self.rewrite(sql, actor)?;
        if rw.fits(declared) { Ok(rw) } else { self.rewrite_keeping_gates(sql, actor) }
    }

    /// `rewrite_parse` when the cache holds it.
    pub fn cached_parse(&self, sql: &str, declared: &[u32], actor: &ActorContext) -> Option<Arc<Rewritten>> {
        let rw = self.cached(sql, actor)?;
        if rw.fits(declared) { Some(rw) } else { self.cached_keeping_gates(sql, actor) }
    }

    /// The rewrite of a Parse whose declared types do not meet `Rewritten::gate_needs`: the same
    /// statement with its conversion gates, cached apart from the text without them.
    pub fn rewrite_keeping_gates(&self, sql: &str, actor: &ActorContext) -> Result<Arc<Rewritten>, Refusal> {
        if let Some(hit) = self.cached_keeping_gates(sql, actor) {
            return Ok(hit);
        }
        within_size_limit(sql)?;
        self.stats.misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let (policy, generation) = self.current_policy();
        let rewritten = Arc::new(rewrite_guarded(sql, actor, policy.as_ref(), Output::Verified, Gates::Keep)?);
        self.within_time_limit(started)?;
        self.unless_swapped(generation, || self.cache.insert(actor, &keeping_gates_key(sql), Arc::clone(&rewritten)));
        Ok(rewritten)
    }

    /// `rewrite_keeping_gates` when the cache holds it.
    pub fn cached_keeping_gates(&self, sql: &str, actor: &ActorContext) -> Option<Arc<Rewritten>> {
        self.cache.get(actor, &keeping_gates_key(sql))
    }

    fn within_time_limit(&self, started: std::time::Instant) -> Result<(), Refusal> {
        let took = started.elapsed();
        if took > self.time_limit {
            return Err(Refusal::TooComplex(format!(
                "refused: rewriting this statement took {} ms; the limit is {} ms (max_rewrite_ms)",
                took.as_millis(),
                self.time_limit.as_millis()
            )));
        }
        Ok(())
    }
}

fn within_size_limit(sql: &str) -> Result<(), Refusal> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(Refusal::TooComplex(format!(
            "refused: the SQL text is {} bytes; the proxy accepts at most {MAX_SQL_BYTES}",
            sql.len()
        )));
    }
    Ok(())
}

/// The cache key of a text's rewrite with its conversion gates: no client text holds a NUL
/// (`protocol::frontend` refuses one), so it is never another text's key.
fn keeping_gates_key(sql: &str) -> String {
    format!("{sql}\0gates")
}

/// A template's parameterised form (`shape.rs`) without the conversion gates its declared
/// types make redundant (`engine::ungate::ungated_parameterised`), printed and verified like
/// every text the proxy forwards, with the types to declare for it
/// (`Ungated::parameter_types`). `None` keeps the form as it is. Runs when a template is
/// built, under the policy its probe was rewritten by.
fn parameterised_without_gates(
    sql: &str,
    types: &[u32],
    base: &Rewritten,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
) -> Option<(String, Vec<u32>)> {
    // Most forms hold no gate (the printer spells it this way, and only it).
    if !sql.contains("num_nulls(") {
        return None;
    }
    let [kind] = base.statement_kinds.as_ref() else { return None };
    let attempt = || {
        let u = engine::ungate::ungated_parameterised(&parse_one(sql).ok()?, types)?;
        let declare = u.parameter_types(types);
        let printed = printer::print(u.statement).ok()?;
        let text = printed.text;
        let checks = [PieceCheck {
            kind: kind.clone(),
            range: 0..text.len(),
            form: Form::Printed(Expected { emitted: printed.emitted, same_as: None }),
        }];
        let tokens = verify::verify(&text, &checks, &base.param_rules, policy, actor).ok()?;
        if param_uses(&text, &tokens)? != u.uses {
            return None;
        }
        Some((text, declare))
    };
    // As in `rewrite_guarded`: a panic keeps the form with its gates.
    catch_unwind(AssertUnwindSafe(attempt)).ok().flatten()
}

/// PostgreSQL's tree of `sql` as the rewriter reads it (`pgparse.c`, run on the deep stack when
/// the tree needs it), or why not; for the `pgparse` fuzz target, which compares it with
/// libpg_query's own (`pg_query::parse`). The error is PostgreSQL's message, or the failure's
/// name (`TooDeep`, `Nul`, ...).
#[doc(hidden)]
pub fn postgres_tree(sql: &str) -> Result<pg_query::protobuf::ParseResult, String> {
    let parse = || {
        pgparse::parse(sql).map_err(|e| match e {
            pgparse::Failure::Parse(message) => message,
            other => format!("{other:?}"),
        })
    };
    pgparse::with_deep_stack_retry(parse, || "no deep-stack thread".to_owned())
}

/// The statement kinds and the relations a text names (CTE names excluded), for the audit
/// event of a refused text (shared the way `Rewritten::statement_kinds` and `tables` are);
/// empty when PostgreSQL's parser cannot read it.
pub fn kinds_and_relations_named(sql: &str) -> (Arc<[String]>, Arc<[String]>) {
    if sql.len() > MAX_SQL_BYTES {
        return (Arc::default(), Arc::default());
    }
    let (mut kinds, mut tables) = (Vec::new(), std::collections::BTreeSet::new());
    if let Ok(statements) = classify::parse(sql) {
        for stmt in statements {
            tables.extend(pgtree::relations(&stmt.node));
            kinds.push(stmt.kind);
        }
    }
    (Arc::from(kinds), tables.into_iter().collect())
}

/// Whether `pipeline` leaves out the conversion gates of a single statement's `$n` where
/// declared types could make them redundant (`engine::ungate`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gates {
    LeaveOut,
    Keep,
}

/// Whether `pipeline` has PostgreSQL verify the text it built (`verify.rs`, step 6).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    /// The text will be forwarded: always.
    Verified,
    /// A template's probe (`shape::Template::build`): its text is never forwarded. The template
    /// is kept only if, filled with the original literals, it gives exactly the original's
    /// verified text, so the probe's own verification would prove nothing more (and cost a
    /// fifth of a miss).
    TemplateProbe,
}

fn rewrite_uncached(sql: &str, actor: &ActorContext, policy: &dyn StatementPolicy) -> Result<Rewritten, Refusal> {
    rewrite_guarded(sql, actor, policy, Output::Verified, Gates::LeaveOut)
}

fn rewrite_guarded(
    sql: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
    output: Output,
    gates: Gates,
) -> Result<Rewritten, Refusal> {
    // Neither parser is expected to panic, but a panic here must refuse the statement rather
    // than take the connection down with an unclear error.
    let run = || match catch_unwind(AssertUnwindSafe(|| pipeline(sql, actor, policy, output, gates))) {
        Ok(result) => result,
        Err(_) => {
            tracing::error!(sql_len = sql.len(), "SQL rewriter panicked; statement refused");
            Err(Refusal::Unverifiable(INTERNAL_ERROR.to_string()))
        }
    };
    // A tree too deep to decode on this stack (the client's, or one the rewrite built) sends the
    // whole statement to the deep stack.
    pgparse::with_deep_stack_retry(run, || {
        Refusal::TooComplex("refused: the statement is nested too deeply for the proxy's stack".to_owned())
    })
}

fn pipeline(
    sql: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
    output: Output,
    gates: Gates,
) -> Result<Rewritten, Refusal> {
    let statements = classify::parse(sql).map_err(input_parse_refusal)?;
    if statements.is_empty() {
        return Ok(Rewritten {
            sql_hash: crate::events::sql_hash(""),
            sql: String::new(),
            statement_kinds: Arc::default(),
            tables: Arc::default(),
            bound: None,
            param_rules: Arc::default(),
            gate_needs: None,
            policy_version: policy.version(actor).map(Arc::from),
        });
    }
    let tokens =
        lexer::scan(sql).map_err(|m| Refusal::Syntax(format!("refused: PostgreSQL cannot scan this SQL: {m}")))?;

    let total = statements.len();
    let mut out = String::with_capacity(sql.len() + 8 * total);
    let mut checks = Vec::with_capacity(total);
    let mut kinds = Vec::with_capacity(total);
    let mut tables = std::collections::BTreeSet::new();
    let mut rules = Vec::new();
    let mut draft = None;
    // Only a text of one statement can be a Parse's.
    let want_draft = gates == Gates::LeaveOut && total == 1;
    for (i, stmt) in statements.into_iter().enumerate() {
        tables.extend(pgtree::relations(&stmt.node));
        let (text, form, stmt_rules, stmt_draft) =
            rewrite_statement(sql, &tokens, &stmt, &statement_label(i, total), actor, policy, want_draft)?;
        draft = stmt_draft;
        rules.extend(stmt_rules);
        if !out.is_empty() {
            out.push_str("; ");
        }
        let start = out.len();
        out.push_str(&text);
        checks.push(PieceCheck { kind: stmt.kind.clone(), range: start..out.len(), form });
        kinds.push(stmt.kind);
    }

    let (gate_needs, uses) = match draft {
        Some(d) => (Some(Arc::from(d.needs)), Some(d.uses)),
        None => (None, None),
    };
    if output == Output::Verified {
        let tokens = verify::verify(&out, &checks, &rules, policy, actor)?;
        // `ParamNeed::undeclared_ok` counted the uses of each `$n` on sqlparser's tree:
        // PostgreSQL's must hold exactly those (each PARAM token of its lexer is one `$n`).
        if let Some(uses) = uses
            && param_uses(&out, &tokens) != Some(uses)
        {
            return Err(Refusal::Unverifiable(
                "refused: the rewritten SQL did not verify: PostgreSQL reads other parameter references in it"
                    .to_owned(),
            ));
        }
    }
    // A probe's hash would never be read (its text is never forwarded nor audited).
    let sql_hash = if output == Output::Verified { crate::events::sql_hash(&out) } else { Arc::from("") };
    Ok(Rewritten {
        gate_needs,
        sql_hash,
        sql: out,
        statement_kinds: Arc::from(kinds),
        tables: tables.into_iter().collect(),
        bound: None,
        param_rules: Arc::from(rules),
        policy_version: policy.version(actor).map(Arc::from),
    })
}

/// What leaving a statement's conversion gates out depends on (`engine::ungate`).
struct UngatedDraft {
    needs: Vec<ParamNeed>,
    /// The uses of each `$n` in the printed statement, as sqlparser's tree holds them.
    uses: std::collections::BTreeMap<usize, usize>,
}

/// How often each `$n` occurs in a text, by PostgreSQL's lexer (its grammar makes every PARAM
/// token a parameter reference).
fn param_uses(text: &str, tokens: &[lexer::Tok]) -> Option<std::collections::BTreeMap<usize, usize>> {
    let mut uses = std::collections::BTreeMap::new();
    for t in tokens.iter().filter(|t| t.token == Some(pg_query::protobuf::Token::Param)) {
        let n = text.get(t.start..t.end)?.strip_prefix('$')?.parse().ok()?;
        *uses.entry(n).or_insert(0usize) += 1;
    }
    Some(uses)
}

/// Steps 3–5 for one statement: its text to forward, how it was made (what the verifier must
/// find in it), the rules its bound values must pass (`gate::ParamRule`) and its text without
/// conversion gates, when it has any a Parse's types could make redundant.
fn rewrite_statement(
    sql: &str,
    tokens: &[lexer::Tok],
    stmt: &classify::PgStatement,
    label: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
    want_draft: bool,
) -> Result<(String, Form, Vec<ParamRule>, Option<UngatedDraft>), Refusal> {
    let rules = gate::check_pg(&stmt.node)?;
    policy.check_pg(&stmt.node, actor)?;
    ddl::check_names(&stmt.node, &mut |target| policy.check_ddl_target(target, actor))?;
    let bool_ops = lexer::count_boolean_operators(tokens, stmt.range.clone());
    if bool_ops > MAX_BOOLEAN_OPERATORS {
        return Err(Refusal::TooComplex(format!(
            "refused: {label} has {bool_ops} AND/OR operators; the proxy accepts at most \
             {MAX_BOOLEAN_OPERATORS} per statement"
        )));
    }
    let not_located = || Refusal::Unverifiable(format!("refused: the proxy could not locate {label}"));
    let piece = sql.get(stmt.range.clone()).ok_or_else(not_located)?;

    // sqlparser reads `U&"d\0061t"` as `U & "d\0061t"` (an operator between two columns),
    // which prints and verifies consistently but is not what the client meant.
    let unicode = lexer::contains_unicode_identifier(tokens, stmt.range.clone());
    let parsed = if unicode {
        Err(SqlParseError::Syntax("Unicode-escaped identifiers (U&\"…\") are not supported by the proxy".to_string()))
    } else {
        parse_one(piece)
    };
    let mut draft = None;
    let (text, form) = match parsed {
        Ok(parsed) => {
            policy_and_print(parsed, &stmt.node, label, actor, policy, false, None, want_draft.then_some(&mut draft))
        }
        // PostgreSQL proved this statement touches no data, so the client's own text may go
        // through unchanged (minus leading/trailing comments, see `trim_to_tokens`).
        Err(_) if DATA_FREE_KINDS.contains(&stmt.kind.as_str()) => {
            let verbatim =
                lexer::trim_to_tokens(tokens, stmt.range.clone()).and_then(|r| sql.get(r)).ok_or_else(not_located)?;
            Ok((verbatim.to_string(), Form::Verbatim))
        }
        Err(SqlParseError::Syntax(_) | SqlParseError::Count(_)) if ddl::KINDS.contains(&stmt.kind.as_str()) => {
            deparsed_ddl(stmt, label, actor, policy)
        }
        Err(SqlParseError::TooDeep) => Err(Refusal::TooComplex(format!(
            "refused: {label} is nested too deeply for the proxy (recursion limit {SQLPARSER_RECURSION_LIMIT})"
        ))),
        Err(SqlParseError::Syntax(_)) if let Some(split) = locking::split(&stmt.node) => {
            locked_select(split, label, actor, policy)
        }
        Err(SqlParseError::Syntax(_)) if let Some(split) = subscript::split(&stmt.node) => {
            subscripted_update(split, label, actor, policy)
        }
        Err(SqlParseError::Syntax(_)) if let Some(split) = copywhere::split(&stmt.node) => {
            copy_with_condition(split, label, actor, policy)
        }
        Err(SqlParseError::Syntax(_)) if let Some(stand_ins) = locking::stand_in(&stmt.node) => {
            locked_with_stand_ins(stand_ins, &stmt.kind, label, actor, policy)
        }
        // Another spelling of the same statement, which sqlparser reads (`respell`).
        Err(SqlParseError::Syntax(_)) if !unicode && let Some(done) = respelled(&stmt.node, label, actor, policy) => {
            done
        }
        Err(SqlParseError::Syntax(e)) => match pgtree::unsupported_construct(&stmt.node) {
            // PostgreSQL's tree names what the proxy's parser could not read.
            Some(construct) => {
                Err(Refusal::Syntax(format!("refused: {label} uses {construct}, which the proxy does not support yet")))
            }
            None => Err(Refusal::Syntax(format!("refused: the proxy cannot parse {label} ({}): {e}", stmt.kind))),
        },
        Err(SqlParseError::Count(n)) => Err(Refusal::Syntax(format!(
            "refused: the proxy cannot parse {label} ({}): it reads {n} statements where PostgreSQL reads one",
            stmt.kind
        ))),
    }?;
    Ok((text, form, rules, draft))
}

/// Steps 4–5 for a statement sqlparser read: the gate, the policy, the printer. `deparsed`: the
/// text sqlparser read is PostgreSQL's printing of the client's statement (`deparsed_ddl`).
/// `marker`: sqlparser read a respelling with wrappers (`respell`), taken off after the policy;
/// `node` is the tree without them. `draft`: print the statement without the conversion gates
/// of its `$n` when it has any (`engine::ungate`; what that depends on goes there).
#[allow(clippy::too_many_arguments)]
fn policy_and_print(
    mut parsed: Statement,
    node: &pg_query::NodeEnum,
    label: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
    deparsed: bool,
    marker: Option<&str>,
    draft: Option<&mut Option<UngatedDraft>>,
) -> Result<(String, Form), Refusal> {
    gate::check_sql(&parsed)?;
    let before_policy = parsed.clone();
    policy.apply(&mut parsed, actor)?;
    // Text PostgreSQL's printer wrote is forwarded only as the client's own tree.
    if deparsed && parsed != before_policy {
        return Err(Refusal::Unverifiable(format!(
            "refused: the proxy would change {label}, which only PostgreSQL's parser reads as sent"
        )));
    }
    // A statement the policy left alone must mean exactly what the client wrote: the
    // verifier compares PostgreSQL's reading of both texts.
    let same_as = if parsed == before_policy { Some(shape_of(node, label)?) } else { None };
    if let Some(marker) = marker {
        respell::unwrap(&mut parsed, marker, label)?;
    }
    if let Some(draft) = draft
        && same_as.is_none()
        && let Some(u) = engine::ungate::ungated(&parsed)
    {
        parsed = u.statement;
        *draft = Some(UngatedDraft { needs: u.needs, uses: u.uses });
    }
    let printed = printer::print(parsed)?;
    // Every wrapper came off: the marker is in no string of the client's tree, and the
    // policy's own text never holds it.
    if let Some(marker) = marker
        && printed.text.to_ascii_lowercase().contains(marker)
    {
        return Err(Refusal::Unverifiable(format!(
            "refused: the proxy rewrote a set operation of {label} it had to respell for its parser, and cannot \
             print it as the client wrote it"
        )));
    }
    Ok((printed.text, Form::Printed(Expected { emitted: printed.emitted, same_as })))
}

/// A statement sqlparser read through another spelling (`respell`): the policy and the printer
/// as usual, with the respelling's wrappers taken off before printing. `None`: no spelling
/// sqlparser reads. (Its own function: sqlparser's tree is large, and the usual way's frames
/// must stay small.)
#[inline(never)]
fn respelled(
    node: &pg_query::NodeEnum,
    label: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
) -> Option<Result<(String, Form), Refusal>> {
    let respell::Reading { parsed, tree, marker } = respell::read(node, label)?;
    Some(policy_and_print(parsed, &tree, label, actor, policy, false, marker.as_deref(), None))
}

/// DDL sqlparser cannot read: checked on PostgreSQL's tree and printed by PostgreSQL's printer
/// (`ddl`), then verified to read back as the same tree. When sqlparser can read that printing
/// (the client's spelling was the obstacle, e.g. a `U&"…"` name), it takes the usual way from
/// there, so that what the proxy forwards is a fixed point of the pipeline.
fn deparsed_ddl(
    stmt: &classify::PgStatement,
    label: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
) -> Result<(String, Form), Refusal> {
    let mut check = |target: &DdlTarget<'_>| policy.check_ddl_target(target, actor);
    let text = match ddl::print(&stmt.node, label, &mut check) {
        Ok(text) => text,
        // An index expression or predicate the allowlist does not read, with `TABLESPACE
        // pg_default` (which sqlparser cannot read): the rest of the statement on the allowlist,
        // its expressions the usual way, without the tablespace.
        Err(refusal) => {
            return match ddl::index_without_tablespace(&stmt.node, &mut check)? {
                Some(bare) => match index_in_default_tablespace(&bare, label, actor, policy) {
                    Err(Refusal::Syntax(_)) => Err(refusal),
                    done => done,
                },
                None => Err(refusal),
            };
        }
    };
    match parse_one(&text) {
        Ok(parsed) => policy_and_print(parsed, &stmt.node, label, actor, policy, true, None, None),
        Err(_) => Ok((text, Form::Deparsed { same_as: shape_of(&stmt.node, label)? })),
    }
}

/// A CREATE INDEX … TABLESPACE pg_default the allowlist does not read (`ddl::index_without_tablespace`):
/// rewritten without the tablespace, verified, and printed by PostgreSQL's printer with it put back.
fn index_in_default_tablespace(
    bare: &pg_query::NodeEnum,
    label: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
) -> Result<(String, Form), Refusal> {
    let rewritten = rewrite_cut(bare, "IndexStmt", label, actor, policy)?;
    let placed = ddl::with_default_tablespace(&rewritten, label)?;
    deparsed(&placed, label)
}

/// A top-level SELECT whose locking clause sqlparser cannot read (`locking`): rewritten without
/// it, verified, and printed by PostgreSQL's printer with the client's clause put back.
fn locked_select(
    (bare, locks): (pg_query::NodeEnum, Vec<pg_query::protobuf::Node>),
    label: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
) -> Result<(String, Form), Refusal> {
    locking::check_names(&locks)?;
    let rewritten = rewrite_cut(&bare, "SelectStmt", label, actor, policy)?;
    let locked = locking::reattach(&rewritten, locks, label)?;
    deparsed(&locked, label)
}

/// Locking clauses sqlparser cannot read below the top-level SELECT (`locking::stand_in`):
/// rewritten with stand-ins sqlparser reads, verified, and printed by PostgreSQL's printer with
/// the client's clauses in place of the stand-ins.
fn locked_with_stand_ins(
    stand_ins: locking::StandIns,
    kind: &str,
    label: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
) -> Result<(String, Form), Refusal> {
    locking::check_names(stand_ins.clauses())?;
    let rewritten = rewrite_cut(&stand_ins.tree, kind, label, actor, policy)?;
    let locked = locking::put_back(&rewritten, stand_ins, label)?;
    deparsed(&locked, label)
}

/// A top-level UPDATE (or INSERT … ON CONFLICT DO UPDATE) with subscripted assignment targets
/// sqlparser cannot read (`subscript`):
/// allowed by the policy column by column, rewritten with whole-column assignments, verified,
/// and printed by PostgreSQL's printer with the client's subscripts put back.
fn subscripted_update(
    split: subscript::Split,
    label: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
) -> Result<(String, Form), Refusal> {
    subscript::check(&split)?;
    for target in &split.targets {
        policy.check_partial_assignment(&split.relation, &target.column, actor)?;
    }
    let rewritten = rewrite_cut(&split.bare, split.kind, label, actor, policy)?;
    let updated = subscript::reattach(&rewritten, split, label)?;
    deparsed(&updated, label)
}

/// `COPY … FROM STDIN … WHERE condition`, which sqlparser cannot read (`copywhere`): the COPY
/// without its condition and the condition as the WHERE of a SELECT over the same target, each
/// rewritten and verified the usual way and unchanged by it, printed by PostgreSQL's printer with
/// the condition put back.
fn copy_with_condition(
    split: copywhere::Split,
    label: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
) -> Result<(String, Form), Refusal> {
    let copied = rewrite_cut(&split.bare, "CopyStmt", label, actor, policy)?;
    let probed = rewrite_cut(&split.probe, "SelectStmt", label, actor, policy)?;
    let placed = copywhere::reattach(&copied, &probed, &split, label)?;
    deparsed(&placed, label)
}

/// A client statement cut down on PostgreSQL's tree to what sqlparser reads (`bare`, of kind
/// `kind`): printed by PostgreSQL's printer (which must read back as exactly `bare`), then
/// rewritten and verified on its own like any statement. Returns the verified rewrite.
fn rewrite_cut(
    bare: &pg_query::NodeEnum,
    kind: &str,
    label: &str,
    actor: &ActorContext,
    policy: &dyn StatementPolicy,
) -> Result<String, Refusal> {
    // PostgreSQL's printing of `bare` (which must read back as exactly `bare`), or another
    // spelling of it (`respell`).
    print_exactly(bare, label)?;
    let (rewritten, form) = respelled(bare, label, actor, policy).unwrap_or_else(|| {
        Err(match pgtree::unsupported_construct(bare) {
            Some(construct) => {
                Refusal::Syntax(format!("refused: {label} uses {construct}, which the proxy does not support yet"))
            }
            None => Refusal::Syntax(format!("refused: the proxy cannot parse {label} ({kind})")),
        })
    })?;
    let piece = PieceCheck { kind: kind.to_owned(), range: 0..rewritten.len(), form };
    let rules = gate::check_pg(bare)?;
    verify::verify(&rewritten, std::slice::from_ref(&piece), &rules, policy, actor)?;
    Ok(rewritten)
}

/// PostgreSQL's printing of `node`, which must read back as exactly `node` (the cut-down and
/// respelled ways: `locking`, `subscript`, `respell`).
pub(crate) fn print_exactly(node: &pg_query::NodeEnum, label: &str) -> Result<String, Refusal> {
    let text = deparse(node, label)?;
    let differs = || Refusal::Unverifiable(format!("refused: {label}: PostgreSQL's printing of it reads differently"));
    let back = classify::parse(&text).map_err(|_| differs())?;
    match (back.as_slice(), pgtree::shape(node)) {
        ([one], Some(want)) if pgtree::shape(&one.node).as_ref() == Some(&want) => Ok(text),
        _ => Err(differs()),
    }
}

/// PostgreSQL's printing of a tree (pg_query's deparser); what it printed is verified by the
/// caller (`Form::Deparsed`, or a read-back).
/// PostgreSQL's printing of a tree the proxy put together, and what the verifier must find in
/// it: exactly that tree (`Form::Deparsed`).
fn deparsed(node: &pg_query::NodeEnum, label: &str) -> Result<(String, Form), Refusal> {
    Ok((deparse(node, label)?, Form::Deparsed { same_as: shape_of(node, label)? }))
}

fn deparse(node: &pg_query::NodeEnum, label: &str) -> Result<String, Refusal> {
    node.deparse(pg_query::DeparseOptions::default())
        .map_err(|e| Refusal::Unverifiable(format!("refused: PostgreSQL's printer cannot print {label}: {e}")))
}

fn shape_of(node: &pg_query::NodeEnum, label: &str) -> Result<String, Refusal> {
    pgtree::shape(node).ok_or_else(|| Refusal::Unverifiable(format!("refused: the proxy could not inspect {label}")))
}

fn statement_label(i: usize, total: usize) -> String {
    if total == 1 { "the statement".to_string() } else { format!("statement {} of {total}", i + 1) }
}

fn input_parse_refusal(e: PgParseError) -> Refusal {
    match e {
        PgParseError::Syntax(m) => Refusal::Syntax(format!("refused: cannot parse SQL: {m}")),
        PgParseError::TooDeep(m) => {
            Refusal::TooComplex(format!("refused: the SQL is nested too deeply for the proxy: {m}"))
        }
        PgParseError::Nul => Refusal::Syntax("refused: the SQL contains a NUL character".to_string()),
        PgParseError::Internal(m) => Refusal::Unverifiable(format!("refused: the proxy could not parse this SQL: {m}")),
    }
}

enum SqlParseError {
    TooDeep,
    Syntax(String),
    Count(usize),
}

/// Parses one statement's text with sqlparser (PostgreSQL dialect, bounded recursion).
fn parse_one(piece: &str) -> Result<Statement, SqlParseError> {
    let dialect = PostgreSqlDialect {};
    let to_error = |e: ParserError| match e {
        ParserError::RecursionLimitExceeded => SqlParseError::TooDeep,
        other => SqlParseError::Syntax(other.to_string()),
    };
    let mut parser =
        Parser::new(&dialect).with_recursion_limit(SQLPARSER_RECURSION_LIMIT).try_with_sql(piece).map_err(to_error)?;
    let mut statements = parser.parse_statements().map_err(to_error)?;
    match (statements.pop(), statements.len()) {
        (Some(stmt), 0) => Ok(stmt),
        (None, _) => Err(SqlParseError::Count(0)),
        (Some(_), n) => Err(SqlParseError::Count(n + 1)),
    }
}

#[cfg(test)]
mod limits_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
