//! Audit events and usage, per environment.
//!
//! Every statement decision (a Query or Parse message of a session) is an [`Event`]: who
//! (environment, organization, key prefix, actor, roles), what (statement kinds, tables), the
//! verdict (forwarded as sent, rewritten, refused + reason), the policy version, a hash of the
//! forwarded SQL, and — once the server has answered that message's segment — rows and duration.
//! Events go to the structured log (target `struere_proxy::events`) and, through a bounded queue
//! and a background writer, in batches to `struere.events`. When the database falls behind and
//! the queue is full, events are dropped from the database copy and counted
//! ([`EventSink::dropped`]); a refusal that cannot be queued is logged at WARN with everything it
//! carries, so none is dropped silently (the log always has every event).
//!
//! Usage ("executions") is counted from what the server answers — statements completed, rows,
//! errors and time per key, environment and organization — in memory, and flushed periodically
//! to `struere.usage` (cumulative counters).
//!
//! `StatementLog` is the per-session bookkeeping that pairs decisions with the server's answers;
//! it is pure and unit-tested.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::auth::identity::{Caller, Environment};

/// What the proxy did with a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Forwarded as the client sent it (operator keys; data-free statements).
    Allowed,
    /// Printed from the rewritten tree.
    Rewritten,
    Refused,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Rewritten => "rewritten",
            Verdict::Refused => "refused",
        }
    }
}

/// Who decided: the same for every decision of a session, so built once per session and shared
/// by its events (a statement's event then costs no copies of names and roles).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// `None` for an operator key.
    pub environment: Option<Environment>,
    pub organization: Option<String>,
    pub key_prefix: String,
    /// `type:id`.
    pub actor: Option<String>,
    pub roles: Vec<String>,
}

impl Origin {
    pub fn of(caller: &Caller, key_prefix: &str) -> Arc<Origin> {
        let actor = caller.actor();
        Arc::new(Origin {
            environment: actor.map(|a| a.environment),
            organization: actor.map(|a| a.organization.clone()),
            key_prefix: key_prefix.to_owned(),
            actor: actor.map(|a| format!("{}:{}", a.actor_type.as_str(), a.actor_id)),
            roles: actor.map(|a| a.roles.clone()).unwrap_or_default(),
        })
    }
}

/// One statement decision. What the statement is (kinds, tables, policy version, hash) is
/// shared with the cached rewrite it came from.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: SystemTime,
    pub origin: Arc<Origin>,
    pub kinds: Arc<[String]>,
    pub tables: Arc<[String]>,
    pub verdict: Verdict,
    pub reason: Option<String>,
    pub sqlstate: Option<String>,
    pub policy_version: Option<Arc<str>>,
    /// Hex SHA-256 (first 16 bytes) of the text forwarded; of its parameterised form when its
    /// literals were sent as bound values (the statement, not its values).
    pub sql_hash: Option<Arc<str>>,
    pub rows: u64,
    pub duration: Duration,
}

impl Event {
    pub fn new(origin: &Arc<Origin>, verdict: Verdict) -> Event {
        Event {
            at: SystemTime::now(),
            origin: Arc::clone(origin),
            kinds: Arc::default(),
            tables: Arc::default(),
            verdict,
            reason: None,
            sqlstate: None,
            policy_version: None,
            sql_hash: None,
            rows: 0,
            duration: Duration::ZERO,
        }
    }
}

/// Hex of the first 16 bytes of SHA-256: identifies a forwarded text without storing it.
pub fn sql_hash(sql: &str) -> Arc<str> {
    use sha2::{Digest, Sha256};
    Arc::from(hex::encode(&Sha256::digest(sql.as_bytes())[..16]))
}

struct Open {
    event: Event,
    /// Number of the ReadyForQuery that ends the segment this decision was sent in.
    closes_at: u64,
    started: Instant,
}

/// Pairs a session's decisions with the server's answers: rows from CommandComplete and the
/// segment's end (ReadyForQuery). Rows of a segment go to its last decision (drivers send one
/// Parse per Sync; a simple Query is one decision for all its statements).
#[derive(Default)]
pub struct StatementLog {
    open: VecDeque<Open>,
    sent: u64,
    seen: u64,
    /// When the segment being sent began (its first message).
    segment_start: Option<Instant>,
    /// Start times of the segments sent and not yet answered.
    segments: VecDeque<Instant>,
    /// When the server last answered a segment (ReadyForQuery).
    last_answer: Option<Instant>,
}

impl StatementLog {
    /// Any client message was forwarded (it belongs to the current segment).
    pub fn touch(&mut self) {
        self.segment_start.get_or_insert_with(Instant::now);
    }

    /// Nothing is in flight: every boundary sent was answered, and nothing was forwarded since
    /// the last one (an unsynced extended-protocol message leaves the server mid-exchange).
    pub fn quiescent(&self) -> bool {
        self.sent == self.seen && self.segment_start.is_none()
    }

    /// Since when something has been in flight (the oldest unanswered segment, or messages
    /// sent since the last boundary); `None` while quiescent.
    pub fn busy_since(&self) -> Option<Instant> {
        self.segments.front().copied().or(self.segment_start)
    }

    /// What was held back while a cancel was on its way goes out now: whatever is in flight is
    /// timed from now, as the hold was the proxy's, not the statements'. (A statement sent
    /// before the hold is timed anew too: it is the one being cancelled, or queued behind it.)
    pub fn held_until_now(&mut self) {
        let now = Instant::now();
        self.segments.iter_mut().for_each(|s| *s = now);
        if let Some(s) = &mut self.segment_start {
            *s = now;
        }
    }

    /// When the server last answered (`None`: not yet in this session).
    pub fn last_answer(&self) -> Option<Instant> {
        self.last_answer
    }

    /// A message the server answers with exactly one ReadyForQuery (Query, Sync, FunctionCall)
    /// was forwarded.
    pub fn boundary_sent(&mut self) {
        self.sent += 1;
        let start = self.segment_start.take().unwrap_or_else(Instant::now);
        self.segments.push_back(start);
    }

    /// The next `n` boundaries sent and not yet answered get no ReadyForQuery of their own:
    /// Syncs PostgreSQL read in COPY FROM STDIN's copy-in mode, which it ignores (libpq and
    /// tokio-postgres send one right after the COPY's Execute). They join the segment after
    /// them, which began when the first of them did.
    pub fn boundaries_ignored(&mut self, n: u64) {
        let (first, n) = ignore_in_flight(&mut self.sent, self.seen, n);
        if n == 0 {
            return;
        }
        for o in &mut self.open {
            o.closes_at = renumbered(o.closes_at, first, n);
        }
        let count = usize::try_from(n).unwrap_or(usize::MAX).min(self.segments.len());
        let start = self.segments.drain(..count).next();
        match (start, self.segments.front_mut()) {
            (Some(start), Some(next)) => *next = start,
            (Some(start), None) => self.segment_start = Some(start),
            (None, _) => {}
        }
    }

    /// A decision on a Query (`own_boundary`: its ReadyForQuery was already counted) or a
    /// Parse (ends with the next Sync).
    pub fn decided(&mut self, event: Event, own_boundary: bool) {
        let closes_at = if own_boundary { self.sent } else { self.sent + 1 };
        self.open.push_back(Open { event, closes_at, started: Instant::now() });
    }

    /// CommandComplete: `tag` like `INSERT 0 5`, `UPDATE 3`, `SELECT 10`; returns its rows.
    pub fn command_complete(&mut self, tag: &[u8]) -> u64 {
        let count = tag.rsplit(|b| *b == b' ').next().unwrap_or_default();
        let rows = std::str::from_utf8(count).ok().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        if let Some(o) = self.answered_now() {
            o.event.rows += rows;
        }
        rows
    }

    /// The decision the server is answering now: the last one of the segment being answered.
    fn answered_now(&mut self) -> Option<&mut Open> {
        let segment = self.seen + 1;
        self.open.iter_mut().rev().find(|o| o.closes_at == segment)
    }

    /// ErrorResponse for the segment being answered. `ours`: the proxy wrote this error (a
    /// write's WITH CHECK failed): the decision becomes a refusal with the proxy's message. Else
    /// the database failed the statement: only its SQLSTATE is kept (its message may quote row
    /// values). A decision that was already a refusal keeps its own reason.
    pub fn failed(&mut self, code: &str, ours: Option<&str>) {
        let Some(o) = self.answered_now() else { return };
        if o.event.verdict == Verdict::Refused {
            return;
        }
        o.event.sqlstate = Some(code.to_owned());
        match ours {
            Some(message) => {
                o.event.verdict = Verdict::Refused;
                o.event.reason = Some(message.to_owned());
            }
            None => o.event.reason = Some("failed in the database".to_owned()),
        }
    }

    /// ReadyForQuery: the decisions of the segment that ended, complete, and how long the
    /// server took to answer the segment.
    pub fn ready(&mut self) -> (Vec<Event>, Duration) {
        self.seen += 1;
        // One clock read for all of it: this runs on every ReadyForQuery.
        let now = Instant::now();
        self.last_answer = Some(now);
        let took = self.segments.pop_front().map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        let mut done = Vec::new();
        while self.open.front().is_some_and(|o| o.closes_at <= self.seen) {
            if let Some(mut o) = self.open.pop_front() {
                o.event.duration = now.saturating_duration_since(o.started);
                done.push(o.event);
            }
        }
        (done, took)
    }

    /// Decisions still waiting for the server (the session ended): reported as they are.
    pub fn drain(&mut self) -> Vec<Event> {
        self.open.drain(..).map(|o| o.event).collect()
    }
}

/// Of the boundaries `sent`, `seen` of them answered, the next `n` in flight turned out to get
/// no ReadyForQuery (`StatementLog::boundaries_ignored`, `RefusalTracker::boundaries_ignored`):
/// takes them off `sent` and returns the number the first of them had and how many there were,
/// never more than are in flight (nor any, should the server have answered more than was sent).
pub fn ignore_in_flight(sent: &mut u64, seen: u64, n: u64) -> (u64, u64) {
    let n = n.min(sent.saturating_sub(seen));
    *sent -= n;
    (seen + 1, n)
}

/// The number of the ReadyForQuery that ends a segment once the `n` boundaries numbered from
/// `first` turned out to get none (`StatementLog::boundaries_ignored`): a segment that ended at
/// one of them ends at the next real one, numbered `first` now; later ones move down by `n`.
pub fn renumbered(closes_at: u64, first: u64, n: u64) -> u64 {
    if closes_at < first {
        closes_at
    } else if closes_at < first + n {
        first
    } else {
        closes_at - n
    }
}

/// Usage counters of one key in one environment and organization.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Usage {
    pub statements: u64,
    pub rows: u64,
    pub errors: u64,
    pub time_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UsageKey {
    pub key_prefix: String,
    /// `operator` for operator keys.
    pub environment: String,
    pub organization: String,
}

impl UsageKey {
    pub fn of(origin: &Origin) -> UsageKey {
        UsageKey {
            key_prefix: origin.key_prefix.clone(),
            environment: origin.environment.map_or("operator", |e| e.as_str()).to_owned(),
            organization: origin.organization.clone().unwrap_or_default(),
        }
    }
}

/// Queue capacity of events waiting for the database writer.
pub const EVENT_QUEUE: usize = 10_000;
/// Events per INSERT.
const BATCH: usize = 500;
/// Usage is flushed this often.
pub const USAGE_FLUSH: Duration = Duration::from_secs(5);

/// The process-wide destination of events and usage.
pub struct EventSink {
    tx: mpsc::Sender<Event>,
    /// Which events go to the database.
    store: crate::config::EventStore,
    /// Events not written to the database (queue full, or the database refused the batch).
    pub dropped: Arc<AtomicU64>,
    /// Events written to the database.
    pub written: Arc<AtomicU64>,
    usage: DashMap<UsageKey, Usage>,
}

impl EventSink {
    /// The sink and the receiving end the writer task drains.
    pub fn new(store: crate::config::EventStore) -> (Arc<EventSink>, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let sink = EventSink {
            tx,
            store,
            dropped: Arc::new(AtomicU64::new(0)),
            written: Arc::new(AtomicU64::new(0)),
            usage: DashMap::new(),
        };
        (Arc::new(sink), rx)
    }

    /// Events queued for the database writer now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity().saturating_sub(self.tx.capacity())
    }

    /// Log the event and queue it for the database, never blocking the session. Refusals are
    /// logged at info; forwarded statements at debug (every one is in `struere.events`; a line
    /// per statement at info would be the proxy's largest cost at high rates).
    pub fn record(&self, e: Event) {
        let env = e.origin.environment.map_or("operator", |e| e.as_str());
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "struere_proxy::events",
                    environment = env,
                    organization = e.origin.organization.as_deref().unwrap_or(""),
                    key = %e.origin.key_prefix,
                    actor = e.origin.actor.as_deref().unwrap_or(""),
                    roles = ?e.origin.roles,
                    kinds = ?e.kinds,
                    tables = ?e.tables,
                    verdict = e.verdict.as_str(),
                    reason = e.reason.as_deref().unwrap_or(""),
                    policy = e.policy_version.as_deref().unwrap_or(""),
                    sql_hash = e.sql_hash.as_deref().unwrap_or(""),
                    rows = e.rows,
                    duration_us = e.duration.as_micros() as u64,
                    "statement"
                )
            };
        }
        match e.verdict {
            Verdict::Refused => line!(info),
            Verdict::Allowed | Verdict::Rewritten => line!(debug),
        }
        let stored = match self.store {
            crate::config::EventStore::All => true,
            crate::config::EventStore::Refused => e.verdict == Verdict::Refused,
            crate::config::EventStore::Off => false,
        };
        if !stored {
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e)) = self.tx.try_send(e) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            if e.verdict == Verdict::Refused {
                tracing::warn!(
                    target: "struere_proxy::events",
                    key = %e.origin.key_prefix,
                    reason = e.reason.as_deref().unwrap_or(""),
                    "event queue full: this refusal is only in the log"
                );
            }
        }
    }

    /// Add to a key's usage: statements completed, rows, errors, time the server took.
    pub fn count(&self, key: &UsageKey, add: Usage) {
        let mut u = self.usage.entry(key.clone()).or_default();
        u.statements += add.statements;
        u.errors += add.errors;
        u.rows += add.rows;
        u.time_us += add.time_us;
    }

    /// Take the counters accumulated since the last flush.
    pub fn take_usage(&self) -> Vec<(UsageKey, Usage)> {
        let keys: Vec<UsageKey> = self.usage.iter().map(|e| e.key().clone()).collect();
        keys.into_iter().filter_map(|k| self.usage.remove(&k)).collect()
    }

    /// Put counters back after a failed flush.
    pub fn restore_usage(&self, taken: Vec<(UsageKey, Usage)>) {
        for (k, u) in taken {
            let mut cur = self.usage.entry(k).or_default();
            cur.statements += u.statements;
            cur.rows += u.rows;
            cur.errors += u.errors;
            cur.time_us += u.time_us;
        }
    }
}

const INSERT_EVENT: &str = "INSERT INTO struere.events \
    (at, last_at, statements, environment, organization_id, key_prefix, actor, roles, kinds, tables, verdict, \
     reason, sqlstate, policy_version, sql_hash, rows, duration_us) \
    SELECT e.at, e.last_at, e.statements, e.environment, e.organization_id, e.key_prefix, e.actor, \
           e.roles::text[], e.kinds::text[], e.tables::text[], e.verdict, e.reason, e.sqlstate, e.policy_version, \
           e.sql_hash, e.rows, e.duration_us \
    FROM unnest($1::timestamptz[], $2::timestamptz[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[], \
     $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], \
     $16::int8[], $17::int8[]) \
     AS e(at, last_at, statements, environment, organization_id, key_prefix, actor, roles, kinds, tables, verdict, \
          reason, sqlstate, policy_version, sql_hash, rows, duration_us)";

/// Identical decisions of one batch (same key, caller, verdict, reason, policy version and
/// forwarded text): one row carries them all with their count, first and last time, and summed
/// rows and time. A busy key repeating one statement costs one row per flush, not one per
/// execution; every decision is still counted (and each is in the log).
#[derive(Debug)]
pub(crate) struct Aggregate {
    pub event: Event,
    pub last_at: SystemTime,
    pub statements: u64,
}

pub(crate) fn aggregate(batch: Vec<Event>) -> Vec<Aggregate> {
    // Two passes, for the same rows as one grouping by content. A session's events share its
    // origin, and every execution of a cached statement shares the cache's kinds, tables and
    // hashes, so the batch is first grouped by those allocations (hashing a few addresses, not
    // the caller's and the statement's strings per event); then the few groups are merged by
    // content. Equal addresses mean equal contents, and no address is reused within a batch
    // (every event of it holds its allocations), so the merge sees every content class once
    // per group. The rows come in the order of each class's first event either way.
    let by_allocation = group(batch.into_iter().map(Aggregate::of), |e| {
        (
            Arc::as_ptr(&e.origin) as usize,
            Arc::as_ptr(&e.kinds).cast::<String>() as usize,
            Arc::as_ptr(&e.tables).cast::<String>() as usize,
            e.verdict,
            e.reason.clone(),
            e.sqlstate.clone(),
            e.policy_version.as_ref().map(|v| Arc::as_ptr(v).cast::<u8>() as usize),
            e.sql_hash.as_ref().map(|h| Arc::as_ptr(h).cast::<u8>() as usize),
        )
    });
    group(by_allocation.into_iter(), |e| {
        (
            Arc::clone(&e.origin),
            Arc::clone(&e.kinds),
            Arc::clone(&e.tables),
            e.verdict,
            e.reason.clone(),
            e.sqlstate.clone(),
            e.policy_version.clone(),
            e.sql_hash.clone(),
        )
    })
}

/// `items` merged where `key_of` their event is equal, in the order of each key's first item.
fn group<K: std::hash::Hash + Eq>(
    items: impl Iterator<Item = Aggregate>,
    key_of: impl Fn(&Event) -> K,
) -> Vec<Aggregate> {
    let mut out: Vec<Aggregate> = Vec::new();
    let mut index: std::collections::HashMap<K, usize, crate::TextHasher> = Default::default();
    for item in items {
        match index.entry(key_of(&item.event)) {
            std::collections::hash_map::Entry::Occupied(at) => {
                if let Some(a) = out.get_mut(*at.get()) {
                    a.absorb(item);
                }
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(out.len());
                out.push(item);
            }
        }
    }
    out
}

impl Aggregate {
    fn of(event: Event) -> Aggregate {
        Aggregate { last_at: event.at, event, statements: 1 }
    }

    /// Counts `other`'s decisions in this row (same key).
    fn absorb(&mut self, other: Aggregate) {
        self.statements += other.statements;
        self.event.rows = self.event.rows.saturating_add(other.event.rows);
        self.event.duration = self.event.duration.saturating_add(other.event.duration);
        self.event.at = self.event.at.min(other.event.at);
        self.last_at = self.last_at.max(other.last_at);
    }
}

/// Arrays become text (`{a,b}`) in the unnest above and are cast back by the column types.
fn array_text(items: &[String]) -> String {
    let quoted: Vec<String> =
        items.iter().map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    format!("{{{}}}", quoted.join(","))
}

/// Write queued events in batches until the sink is dropped. Runs off the query path; a failed
/// batch is counted as dropped and logged (the log has every event anyway).
/// How long the writer lets events gather before a partial batch is written.
const LINGER: std::time::Duration = std::time::Duration::from_millis(100);

pub async fn write_events(
    mut rx: mpsc::Receiver<Event>,
    admin_url: String,
    written: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
) {
    let mut client = None;
    let mut batch: Vec<Event> = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        // A trickle of events gathers for a moment: one INSERT per linger period rather than
        // one per statement (each would cost the database more than the statement did).
        if batch.len() < BATCH {
            tokio::time::sleep(LINGER).await;
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
        }
        if client.is_none() {
            client = crate::auth::store::connect_admin(&admin_url).await.ok();
        }
        let events = batch.len() as u64;
        let rows = aggregate(std::mem::take(&mut batch));
        let ok = match &client {
            Some(c) => insert_events(c, &rows).await.is_ok(),
            None => false,
        };
        if ok {
            written.fetch_add(events, Ordering::Relaxed);
        } else {
            dropped.fetch_add(events, Ordering::Relaxed);
            tracing::warn!(events, "could not write events to the database; they are in the log only");
            client = None;
        }
    }
}

async fn insert_events(c: &tokio_postgres::Client, batch: &[Aggregate]) -> Result<(), tokio_postgres::Error> {
    let col = |f: &dyn Fn(&Event) -> Option<String>| batch.iter().map(|a| f(&a.event)).collect::<Vec<Option<String>>>();
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let at: Vec<SystemTime> = batch.iter().map(|a| a.event.at).collect();
    let last_at: Vec<SystemTime> = batch.iter().map(|a| a.last_at).collect();
    let statements: Vec<i64> = batch.iter().map(|a| int(a.statements)).collect();
    let environment = col(&|e| Some(e.origin.environment.map_or("operator", |x| x.as_str()).to_owned()));
    let organization = col(&|e| e.origin.organization.clone());
    let key = col(&|e| Some(e.origin.key_prefix.clone()));
    let actor = col(&|e| e.origin.actor.clone());
    let roles = col(&|e| Some(array_text(&e.origin.roles)));
    let kinds = col(&|e| Some(array_text(&e.kinds)));
    let tables = col(&|e| Some(array_text(&e.tables)));
    let verdict = col(&|e| Some(e.verdict.as_str().to_owned()));
    let reason = col(&|e| e.reason.clone());
    let sqlstate = col(&|e| e.sqlstate.clone());
    let policy = col(&|e| e.policy_version.as_deref().map(str::to_owned));
    let hash = col(&|e| e.sql_hash.as_deref().map(str::to_owned));
    let rows: Vec<i64> = batch.iter().map(|a| int(a.event.rows)).collect();
    let dur: Vec<i64> =
        batch.iter().map(|a| int(u64::try_from(a.event.duration.as_micros()).unwrap_or(u64::MAX))).collect();
    c.execute(
        INSERT_EVENT,
        &[
            &at,
            &last_at,
            &statements,
            &environment,
            &organization,
            &key,
            &actor,
            &roles,
            &kinds,
            &tables,
            &verdict,
            &reason,
            &sqlstate,
            &policy,
            &hash,
            &rows,
            &dur,
        ],
    )
    .await?;
    Ok(())
}

const UPSERT_USAGE: &str = "INSERT INTO struere.usage \
    (key_prefix, environment, organization_id, statements, rows, errors, time_us, updated_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, now()) \
    ON CONFLICT (key_prefix, environment, organization_id) DO UPDATE SET \
      statements = usage.statements + excluded.statements, rows = usage.rows + excluded.rows, \
      errors = usage.errors + excluded.errors, time_us = usage.time_us + excluded.time_us, updated_at = now()";

/// Flush usage every [`USAGE_FLUSH`] until the sink is gone.
pub async fn flush_usage(admin_url: String, sink: std::sync::Weak<EventSink>) {
    let mut tick = tokio::time::interval(USAGE_FLUSH);
    let mut client = None;
    loop {
        tick.tick().await;
        let Some(sink) = sink.upgrade() else { return };
        let taken = sink.take_usage();
        if taken.is_empty() {
            continue;
        }
        if client.is_none() {
            client = crate::auth::store::connect_admin(&admin_url).await.ok();
        }
        let mut failed = Vec::new();
        for (k, u) in taken {
            let ok = match &client {
                Some(c) => {
                    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                    c.execute(
                        UPSERT_USAGE,
                        &[
                            &k.key_prefix,
                            &k.environment,
                            &k.organization,
                            &n(u.statements),
                            &n(u.rows),
                            &n(u.errors),
                            &n(u.time_us),
                        ],
                    )
                    .await
                    .is_ok()
                }
                None => false,
            };
            if !ok {
                failed.push((k, u));
            }
        }
        if !failed.is_empty() {
            client = None;
            sink.restore_usage(failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::{ActorContext, ActorType};

    #[test]
    fn statements_held_back_are_timed_from_when_they_go_out() {
        let mut log = StatementLog::default();
        assert_eq!(log.busy_since(), None);
        log.touch();
        log.boundary_sent();
        log.touch();
        let first = log.busy_since().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        log.held_until_now();
        let held = log.busy_since().unwrap();
        assert!(held > first, "timed from the release, not from the decision");
        log.ready();
        // The open segment (sent after the boundary) was restarted too.
        assert!(log.busy_since().unwrap() >= held);
        log.boundary_sent();
        log.ready();
        assert_eq!(log.busy_since(), None);
    }

    #[test]
    fn boundaries_the_server_ignores_join_the_segment_after_them() {
        assert_eq!(renumbered(3, 5, 2), 3, "ended before them");
        assert_eq!(renumbered(5, 5, 2), 5, "ended at one of them: at the next real one");
        assert_eq!(renumbered(6, 5, 2), 5);
        assert_eq!(renumbered(9, 5, 2), 7, "later ones move down");
        let mut log = StatementLog::default();
        // COPY's Parse/Bind/Execute, then the Sync the server will ignore.
        log.touch();
        log.decided(ev(), false);
        log.boundary_sent();
        log.boundaries_ignored(1);
        assert!(!log.quiescent(), "the server is mid-exchange");
        // Its data, CopyDone and the Sync that counts.
        log.touch();
        log.boundary_sent();
        let (done, _) = log.ready();
        assert_eq!(done.len(), 1, "the COPY's decision ends with the one ReadyForQuery");
        assert!(log.quiescent());
        // Never more than is in flight.
        log.boundaries_ignored(3);
        assert!(log.quiescent());
    }

    #[test]
    fn boundaries_ignored_are_at_most_those_in_flight() {
        let mut sent = 5;
        assert_eq!(ignore_in_flight(&mut sent, 3, 4), (4, 2));
        assert_eq!(sent, 3);
        // A server that answered more than was sent leaves nothing to take off.
        let mut sent = 2;
        assert_eq!(ignore_in_flight(&mut sent, 3, 1), (4, 0));
        assert_eq!(sent, 2);
    }

    fn ev() -> Event {
        let actor = ActorContext {
            organization: "acme".into(),
            environment: Environment::Development,
            roles: vec!["teacher".into()],
            actor_type: ActorType::User,
            actor_id: "t1".into(),
        };
        Event::new(&Origin::of(&Caller::Environment(actor), "sk_dev_abc"), Verdict::Rewritten)
    }

    /// `e` decided by an origin that differs as `f` says.
    fn from_origin(e: &mut Event, f: impl Fn(&mut Origin)) {
        let mut o = (*e.origin).clone();
        f(&mut o);
        e.origin = Arc::new(o);
    }

    #[test]
    fn identical_decisions_of_a_batch_share_one_row_and_every_difference_splits_them() {
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let with = |ms: u64, rows: u64, f: &dyn Fn(&mut Event)| {
            let mut e = ev();
            e.at = at(ms);
            e.rows = rows;
            e.duration = Duration::from_micros(10);
            e.sql_hash = Some("h1".into());
            f(&mut e);
            e
        };
        let same = |_: &mut Event| {};
        let batch = vec![
            with(30, 1, &same),
            with(10, 2, &same),
            with(20, 3, &same),
            with(5, 1, &|e| e.sql_hash = Some("h2".into())),
            with(5, 1, &|e| e.verdict = Verdict::Refused),
            with(5, 1, &|e| e.reason = Some("r".into())),
            with(5, 1, &|e| from_origin(e, |o| o.organization = Some("globex".into()))),
            with(5, 1, &|e| from_origin(e, |o| o.actor = Some("user:t2".into()))),
            with(5, 1, &|e| from_origin(e, |o| o.roles = vec!["admin".into()])),
            with(5, 1, &|e| from_origin(e, |o| o.environment = Some(Environment::Production))),
            with(5, 1, &|e| from_origin(e, |o| o.key_prefix = "sk_dev_other".into())),
            with(5, 1, &|e| e.policy_version = Some("v9".into())),
            with(5, 1, &|e| e.sqlstate = Some("22012".into())),
            with(5, 1, &|e| e.tables = Arc::from(vec!["users".to_owned()])),
            with(5, 1, &|e| e.kinds = Arc::from(vec!["UpdateStmt".to_owned()])),
        ];
        let rows = aggregate(batch);
        assert_eq!(rows.len(), 13, "the first three are one row; each other differs in one field");
        let first = &rows[0];
        assert_eq!(first.statements, 3);
        assert_eq!((first.event.at, first.last_at), (at(10), at(30)));
        assert_eq!(first.event.rows, 6);
        assert_eq!(first.event.duration, Duration::from_micros(30));
        assert!(rows[1..].iter().all(|a| a.statements == 1));
    }

    #[test]
    fn shared_and_equal_allocations_group_alike_in_first_seen_order() {
        // One session's executions of one cached statement share every allocation; another
        // session's of the same statement are equal in content only.
        let mut shared = ev();
        shared.sql_hash = Some("h1".into());
        shared.kinds = Arc::from(vec!["SelectStmt".to_owned()]);
        let copy = |e: &Event, ms: u64| Event { at: SystemTime::UNIX_EPOCH + Duration::from_millis(ms), ..e.clone() };
        let mut other_session = ev();
        other_session.sql_hash = Some("h1".into());
        other_session.kinds = Arc::from(vec!["SelectStmt".to_owned()]);
        let mut other_statement = copy(&shared, 0);
        other_statement.sql_hash = Some("h2".into());
        let batch = vec![
            copy(&other_statement, 1),
            copy(&shared, 2),
            copy(&other_session, 3),
            copy(&shared, 4),
            copy(&other_statement, 5),
            copy(&other_session, 6),
        ];
        let rows = aggregate(batch);
        let summary: Vec<_> = rows.iter().map(|a| (a.event.sql_hash.as_deref(), a.statements)).collect();
        assert_eq!(summary, vec![(Some("h2"), 2), (Some("h1"), 4)]);
        assert_eq!(
            (rows[1].event.at, rows[1].last_at),
            (SystemTime::UNIX_EPOCH + Duration::from_millis(2), SystemTime::UNIX_EPOCH + Duration::from_millis(6))
        );
    }

    #[test]
    fn a_query_completes_at_its_own_ready_for_query_with_its_rows() {
        let mut log = StatementLog::default();
        log.boundary_sent(); // Query
        log.decided(ev(), true);
        log.command_complete(b"UPDATE 3");
        log.command_complete(b"SELECT 2");
        let (done, _) = log.ready();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].rows, 5);
        assert_eq!(done[0].origin.actor.as_deref(), Some("user:t1"));
    }

    #[test]
    fn errors_mark_the_decision_of_their_segment() {
        let mut log = StatementLog::default();
        log.boundary_sent();
        log.decided(ev(), true);
        log.failed("23505", None);
        let (done, _) = log.ready();
        assert_eq!(done[0].sqlstate.as_deref(), Some("23505"));
        assert_eq!(done[0].reason.as_deref(), Some("failed in the database"));
        assert_eq!(done[0].verdict, Verdict::Rewritten);
        // The proxy's own error (WITH CHECK) turns the decision into a refusal with its message.
        log.boundary_sent();
        log.decided(ev(), true);
        log.failed("42501", Some("refused: WITH CHECK"));
        let (done, _) = log.ready();
        assert_eq!((done[0].verdict, done[0].reason.as_deref()), (Verdict::Refused, Some("refused: WITH CHECK")));
        // A refusal keeps its reason.
        log.boundary_sent();
        let mut refused = ev();
        refused.verdict = Verdict::Refused;
        refused.reason = Some("refused: TRUNCATE".into());
        log.decided(refused, true);
        log.failed("42501", None);
        let (done, _) = log.ready();
        assert_eq!(done[0].reason.as_deref(), Some("refused: TRUNCATE"));
    }

    #[test]
    fn pipelined_segments_complete_in_order() {
        let mut log = StatementLog::default();
        // Parse(a) Sync ; Parse(b) Sync — sent before any answer.
        log.decided(ev(), false);
        log.boundary_sent();
        let mut b = ev();
        b.kinds = Arc::from(vec!["b".to_owned()]);
        log.decided(b, false);
        log.boundary_sent();
        log.command_complete(b"INSERT 0 1");
        let (first, _) = log.ready();
        assert_eq!((first.len(), first[0].rows), (1, 1));
        log.command_complete(b"DELETE 4");
        let (second, _) = log.ready();
        assert_eq!(second.len(), 1);
        assert_eq!((&second[0].kinds[..], second[0].rows), (&["b".to_owned()][..], 4));
        assert!(log.ready().0.is_empty());
    }

    #[test]
    fn usage_counts_and_restores() {
        let (sink, _rx) = EventSink::new(crate::config::EventStore::All);
        let k = UsageKey { key_prefix: "p".into(), environment: "development".into(), organization: "acme".into() };
        sink.count(&k, Usage { statements: 1, rows: 3, errors: 0, time_us: 10 });
        sink.count(&k, Usage { statements: 0, rows: 0, errors: 1, time_us: 5 });
        let taken = sink.take_usage();
        assert_eq!(taken, vec![(k.clone(), Usage { statements: 1, rows: 3, errors: 1, time_us: 15 })]);
        assert!(sink.take_usage().is_empty());
        sink.restore_usage(taken);
        assert_eq!(sink.take_usage()[0].1.rows, 3);
    }

    #[test]
    fn the_event_store_setting_chooses_what_reaches_the_database() {
        let (sink, mut rx) = EventSink::new(crate::config::EventStore::Refused);
        sink.record(ev());
        let mut refused = ev();
        refused.verdict = Verdict::Refused;
        sink.record(refused);
        assert_eq!(rx.try_recv().map(|e| e.verdict).ok(), Some(Verdict::Refused));
        assert!(rx.try_recv().is_err());
        let (off, mut rx) = EventSink::new(crate::config::EventStore::Off);
        off.record(ev());
        assert!(rx.try_recv().is_err());
        assert_eq!(off.dropped.load(Ordering::Relaxed), 0, "not stored by choice is not dropped");
    }

    #[test]
    fn arrays_are_quoted_for_postgres() {
        assert_eq!(array_text(&["a".into(), "b\"c".into(), "d\\e".into()]), r#"{"a","b\"c","d\\e"}"#);
        assert_eq!(array_text(&[]), "{}");
    }
}
