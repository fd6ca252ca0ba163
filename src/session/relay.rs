//! The steady state of a session: two directions running concurrently.
//!
//! * client → upstream: frames the client's bytes, rewrites Query and Parse for environment keys,
//!   refuses what the rewriter refuses (see `refusal.rs`), relays everything else untouched.
//! * upstream → client: relays the server's messages without decoding row data; swaps the marker
//!   error of an injected refusal for the proxy's own; watches ParameterStatus; re-checks the key.
//!
//! Only the upstream → client direction writes to the client while the session runs, so replies
//! can never interleave out of order. The directions run concurrently so that neither side's full
//! socket buffer can deadlock the other (a client pipelining large results while still sending).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tracing::Instrument;

use crate::auth::api_key::KeyHash;
use crate::auth::identity::{ActorContext, Caller};
use crate::auth::store::KeyStatus;
use crate::cancel::CancelTarget;
use crate::config::SessionTimeouts;
use crate::error::SessionEnd;
use crate::events::{Event, Origin, StatementLog, Usage, UsageKey, Verdict};
use crate::metrics::SessionLimit;
use crate::net::stream::ClientStream;
use crate::protocol::backend::parse_error_fields;
use crate::protocol::backend::{self, Severity, parse_parameter_status};
use crate::protocol::frame;
use crate::protocol::frontend::{
    decode_bind_names, decode_bind_values, decode_parse, decode_query, decode_target, encode_bind_renamed,
    encode_bind_text, encode_execute_sync, encode_parse, encode_query, encode_target, statement_text_lossy,
};
use crate::protocol::sqlstate::SqlState;
use crate::rewrite::{Bound, ParamRule, Refusal, Rewritten};
use crate::server::{Drain, Proxy};
use crate::session::handshake::Established;
use crate::session::refusal::{BackendAction, RefusalTracker};
use crate::session::statements::{self, Synthetic, UpstreamStatements, Use};
use crate::upstream::{UpstreamConn, UpstreamStream};

/// What both directions of a session keep in step: injected refusals, the decisions awaiting
/// the server's answers (events.rs), and the proxy's own prepared statements with the answers
/// to its added messages (statements.rs).
struct Book {
    refusals: RefusalTracker,
    statements: StatementLog,
    prepared: UpstreamStatements,
    /// Added messages of the round trip the client has not ended with Sync yet.
    open_unit: Synthetic,
    /// Each round trip sent and not yet answered with ReadyForQuery.
    units: VecDeque<Unit>,
    /// The proxy cancelled the running statement (`statement_timeout_ms`): the server's 57014
    /// for it is reported as a statement timeout.
    timed_out: bool,
    /// This session's turn under `pool_max_active` (`pool::ActiveLimit`).
    active: crate::pool::ActiveHold,
}

/// One round trip sent and not yet answered.
struct Unit {
    /// The answers to the proxy's own added messages in it.
    added: Synthetic,
    /// It ended with a Sync, and no COPY data had gone since the round trip before it. If the
    /// server turns out to be in COPY FROM STDIN's copy-in mode (CopyInResponse), it ignores
    /// such a Sync (`Book::copy_in_began`).
    sync_before_copy_data: bool,
}

impl Book {
    /// A message the server answers with exactly one ReadyForQuery was forwarded;
    /// `sync_before_copy_data`: see `Unit`.
    fn boundary_sent(&mut self, sync_before_copy_data: bool) {
        self.refusals.boundary_sent();
        self.statements.boundary_sent();
        self.units.push_back(Unit { added: std::mem::take(&mut self.open_unit), sync_before_copy_data });
    }

    /// The server sent CopyInResponse for the round trip it is answering: it reads COPY data
    /// now, and ignores every Sync until the copy ends. The Syncs sent after the COPY's Execute
    /// and before any of its data (libpq and tokio-postgres send one at once) will get no
    /// ReadyForQuery: their round trips join the next one, in every count kept of them. (A
    /// Sync sent among the data is counted: were an earlier CopyData to fail, the server would
    /// read it.)
    fn copy_in_began(&mut self) {
        let ignored = self.units.iter().take_while(|u| u.sync_before_copy_data).count();
        if ignored == 0 {
            return;
        }
        let mut merged = Synthetic::default();
        for unit in self.units.drain(..ignored) {
            merged.absorb(unit.added);
        }
        match self.units.front_mut() {
            Some(next) => next.added.absorb(merged),
            None => self.open_unit.absorb(merged),
        }
        let n = u64::try_from(ignored).unwrap_or(u64::MAX);
        self.refusals.boundaries_ignored(n);
        self.statements.boundaries_ignored(n);
    }

    /// The round trip the server is answering now.
    fn answering(&mut self) -> &mut Synthetic {
        match self.units.front_mut() {
            Some(unit) => &mut unit.added,
            None => &mut self.open_unit,
        }
    }

    /// The server reported an error: statements used in this round trip are prepared afresh.
    fn answer_failed(&mut self) {
        let names = std::mem::take(&mut self.answering().names);
        if !names.is_empty() {
            self.prepared.distrust(&names);
        }
    }
}

type Tracker = Arc<Mutex<Book>>;

fn lock(t: &Tracker) -> std::sync::MutexGuard<'_, Book> {
    // The book holds no invariant a panic elsewhere could break halfway.
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

pub async fn run(proxy: &Arc<Proxy>, est: Established) -> Result<(), SessionEnd> {
    // `_cancel` keeps this session's cancel key registered until the session ends.
    // `_key_slot` holds this session's place in its key's connection budget until it ends.
    let Established { client, upstream, caller, key_hash, key_prefix, cancel, pool_key, key_slot: _key_slot } = est;
    let max_message = client.max_message;
    let (client_r, mut client_w) = tokio::io::split(client.stream);
    let UpstreamConn { stream, parameters, backend_pid, backend_secret, transaction_status, read_buf } = upstream;
    let (up_r, up_w) = tokio::io::split(stream);
    let origin = Origin::of(&caller, &key_prefix);
    let tracker: Tracker = Arc::new(Mutex::new(Book {
        refusals: RefusalTracker::new(proxy.refusal_nonce.clone()),
        statements: StatementLog::default(),
        prepared: UpstreamStatements::default(),
        open_unit: Synthetic::default(),
        units: VecDeque::new(),
        timed_out: false,
        active: crate::pool::ActiveHold::default(),
    }));

    let cancel_target = proxy.cancels.resolve(cancel.pid, cancel.secret);
    let statement_starts = Arc::new(StatementStarts::default());
    // Before the server side's first turn: the client's first statement may already be here.
    statement_starts.watch(proxy.current().timeouts);
    let cancels_in_flight = cancel_target.as_ref().map(|t| Arc::clone(&t.in_flight));
    let mut inbound = ClientToUpstream {
        proxy,
        caller: &caller,
        reader: client_r,
        buf: client.buf,
        max_message,
        upstream: up_w,
        tracker: Arc::clone(&tracker),
        discard_until_sync: false,
        copy_traffic: false,
        extended_open: false,
        unnamed: None,
        unnamed_rules: Arc::default(),
        named_rules: std::collections::HashMap::new(),
        origin: Arc::clone(&origin),
        pooled: pool_key.is_some(),
        ahead: None,
        refusal_described: std::cell::Cell::new(None),
        cancels_in_flight: cancels_in_flight.clone(),
        statement_starts: Arc::clone(&statement_starts),
    };
    let notify_prefix = caller.actor().map(crate::rewrite::engine::notify_prefix);
    let mut outbound = UpstreamToClient {
        proxy,
        is_operator: caller.is_operator(),
        notify_prefix,
        key_hash,
        reader: up_r,
        buf: read_buf,
        tracker: Arc::clone(&tracker),
        usage: UsageKey::of(&origin),
        last_status: transaction_status,
        cancel_target,
        statement_starts,
        started: Instant::now(),
        cancel_sent: false,
        pending_usage: Usage::default(),
        usage_pushed: Instant::now(),
        server_ended: false,
        own_pid: (backend_pid != cancel.pid).then_some((backend_pid, cancel.pid)),
    };
    // Ok(true): the client sent Terminate, which was kept from the (pooled) upstream.
    let result = {
        let c2u = inbound.run();
        let u2c = outbound.run(&mut client_w);
        tokio::pin!(c2u, u2c);
        // Both run until the session ends; each is polled only when woken for itself.
        super::woken::first_to_finish(c2u, u2c, |r: Result<(), SessionEnd>| r.map(|()| false)).await
    };
    let terminated = matches!(result, Ok(true));
    let result = result.map(|_| ());
    match &result {
        Err(SessionEnd::Fatal { code, message }) => {
            let mut out = BytesMut::new();
            backend::error_response_code(&mut out, Severity::Fatal, code, message, None);
            let _ = client_w.write_all(&out).await;
            let _ = client_w.flush().await;
        }
        Ok(()) | Err(SessionEnd::ClientClosed) => {}
        Err(SessionEnd::Io(_) | SessionEnd::Unheard(_)) => {}
    }
    let _ = client_w.shutdown().await;
    outbound.push_usage();
    let quiescent = lock(&tracker).statements.quiescent();
    // Decisions the server never answered (the session ended) are reported as they are.
    for e in lock(&tracker).statements.drain() {
        proxy.events.record(e);
    }
    // The cancel key goes first: a late CancelRequest of this client must not reach the
    // connection once another session has it.
    drop(cancel);
    if let (true, Some(key)) = (terminated, pool_key) {
        let stream = outbound.reader.unsplit(inbound.upstream);
        let conn = UpstreamConn {
            stream,
            parameters,
            backend_pid,
            backend_secret,
            transaction_status: outbound.last_status,
            read_buf: outbound.buf,
        };
        let pool = Arc::clone(&proxy.pool);
        if quiescent {
            let status = outbound.last_status;
            tokio::spawn(async move {
                // A cancel still on its way would reach whoever has the connection next.
                let through = match &cancels_in_flight {
                    Some(flight) => flight.settled().await,
                    None => true,
                };
                if through {
                    pool.give_back(key, conn, status).await;
                } else {
                    pool.discard(conn).await;
                }
            });
        } else {
            // Something was still in flight: the connection is not in a state to hand over.
            tokio::spawn(async move { pool.discard(conn).await });
        }
    }
    result
}

struct ClientToUpstream<'a> {
    proxy: &'a Arc<Proxy>,
    caller: &'a Caller,
    reader: ReadHalf<ClientStream>,
    buf: BytesMut,
    max_message: usize,
    upstream: WriteHalf<UpstreamStream>,
    tracker: Tracker,
    /// After a refused extended-protocol message the server skips until Sync; so does the proxy.
    discard_until_sync: bool,
    /// CopyData, CopyDone or CopyFail went upstream since the last boundary.
    copy_traffic: bool,
    /// Extended-protocol messages were sent since the last Sync (a simple Query then goes as
    /// it is, so that the proxy's added messages never share a round trip with the client's).
    extended_open: bool,
    /// The proxy's prepared statement that stands for the client's unnamed statement now.
    unnamed: Option<Arc<str>>,
    /// The rules a Bind of that statement must pass (`gate::ParamRule`). A statement with
    /// rules is never the server's own unnamed statement: that one is replaced by Parses the
    /// server may skip (after an error, up to Sync), so the proxy could not tell which
    /// statement a Bind of it reaches. The proxy's names stand for fixed texts.
    unnamed_rules: Arc<[ParamRule]>,
    /// The rules of the client's named statements. Only ever added to: a Parse or Close the
    /// server skipped or failed must not lift a rule of a statement that still exists (a name
    /// reused for another statement is checked against both; at worst a refusal too many).
    named_rules: std::collections::HashMap<String, Vec<ParamRule>>,
    /// Who this session's decisions are made for (audit events).
    origin: Arc<Origin>,
    /// The upstream connection may go back to the pool: Terminate is not forwarded.
    pooled: bool,
    /// The rewrite of the message about to be handled, worked out off the event loop (a
    /// cache miss); taken by the next `rewrite`.
    ahead: Option<Ahead>,
    /// The description of the refusal about to be recorded for this message, for `refused`:
    /// from the rewrite ahead that refused it, or from a rewrite that went through
    /// (`refuse_rewritten`). Cleared after every message.
    refusal_described: std::cell::Cell<Option<Described>>,
    /// Cancels on their way to this session's backend (a statement timeout's, the client's
    /// own): nothing more goes upstream until they are through (`cancel::CancelsInFlight`).
    cancels_in_flight: Option<Arc<crate::cancel::CancelsInFlight>>,
    /// Says when something went upstream, for the other side's statement limit.
    statement_starts: Arc<StatementStarts>,
}

/// A rewrite worked out on a blocking thread, and how long it took there.
struct Ahead {
    result: Result<Arc<Rewritten>, Refusal>,
    took: std::time::Duration,
    /// For a refusal: the statement kinds and relations its audit event names
    /// (`rewrite::kinds_and_relations_named`, a parse of the whole text), worked out there too.
    described: Option<Described>,
}

/// Wait until no cancel is on its way to the backend: one arriving once its statement has ended
/// would cancel whatever is sent next. The statements held meanwhile are timed from when they
/// go out. (A free function: the session's state is not `Sync`.)
async fn cancels_through(in_flight: Option<&crate::cancel::CancelsInFlight>, tracker: &Tracker) {
    if let Some(flight) = in_flight.filter(|f| !f.none()) {
        flight.settled().await;
        lock(tracker).statements.held_until_now();
    }
}

/// How the client side tells the server side that something went upstream, for the statement
/// limit: the server side arms its alarm only when it wakes, and a statement that sends nothing
/// until it ends would not wake it. Each notice costs a wake-up, so it is given only while the
/// server side watches (a statement limit is configured).
#[derive(Default)]
struct StatementStarts {
    watched: std::sync::atomic::AtomicBool,
    notice: tokio::sync::Notify,
}

impl StatementStarts {
    fn went_out(&self) {
        if self.watched.load(std::sync::atomic::Ordering::Relaxed) {
            self.notice.notify_one();
        }
    }

    /// Watch while `limits` has a statement limit; `true` if it does.
    fn watch(&self, limits: SessionTimeouts) -> bool {
        let on = limits.statement.is_some();
        self.watched.store(on, std::sync::atomic::Ordering::Relaxed);
        on
    }

    /// The next notice (one given while nobody waited is kept for the next wait).
    async fn told(self: Arc<Self>) {
        self.notice.notified().await;
    }
}

/// Statement kinds and relations named, for a refusal's audit event.
type Described = (Arc<[String]>, Arc<[String]>);

impl ClientToUpstream<'_> {
    /// `Ok(true)`: the client sent Terminate and the upstream connection stays open for the pool.
    async fn run(&mut self) -> Result<bool, SessionEnd> {
        let mut out = BytesMut::with_capacity(8192);
        loop {
            // Messages are read where they lie (no reference-counted handle per message).
            let mut buf = std::mem::take(&mut self.buf);
            let handled = self.handle_buffered(&mut buf, &mut out).await;
            self.buf = buf;
            if let Some(pooled) = handled? {
                return Ok(pooled);
            }
            if !out.is_empty() {
                cancels_through(self.cancels_in_flight.as_deref(), &self.tracker).await;
                self.take_turn().await?;
                self.upstream.write_all(&out).await?;
                out.clear();
                self.statement_starts.went_out();
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(8192);
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return Err(SessionEnd::ClientClosed);
            }
        }
    }

    /// Handle every complete message in `buf`; `Some(pooled)` when the client sent Terminate
    /// (`pooled`: the upstream connection stays open for the pool).
    async fn handle_buffered(&mut self, buf: &mut BytesMut, out: &mut BytesMut) -> Result<Option<bool>, SessionEnd> {
        while let Some(frame) = frame::frontend_message(buf, self.max_message)? {
            if frame.tag == b'X' {
                if !out.is_empty() {
                    // What came before Terminate in the same read still runs upstream.
                    self.take_turn().await?;
                }
                if self.pooled {
                    cancels_through(self.cancels_in_flight.as_deref(), &self.tracker).await;
                    self.upstream.write_all(out).await?;
                    self.upstream.flush().await?;
                    return Ok(Some(true));
                }
                out.extend_from_slice(frame.raw);
                self.upstream.write_all(out).await?;
                let _ = self.upstream.shutdown().await;
                return Ok(Some(false));
            }
            self.rewrite_ahead(frame).await;
            let handled = self.handle(frame, out);
            self.ahead = None;
            self.refusal_described.set(None);
            let len = frame.raw.len();
            handled?;
            buf.advance(len);
        }
        Ok(None)
    }

    /// A message the server answers with exactly one ReadyForQuery (`sync`: a Sync, which
    /// copy-in mode would ignore) was forwarded.
    fn boundary_sent(&mut self, sync: bool) {
        let sync_before_copy_data = sync && !self.copy_traffic;
        self.copy_traffic = false;
        lock(&self.tracker).boundary_sent(sync_before_copy_data);
    }

    /// Under `pool_max_active`, hold a turn before anything goes upstream: at once if the
    /// session holds one (its transaction, or answers still owed) or one is free, else in
    /// order of arrival; ended (53300) after `pool_wait_timeout_secs`.
    async fn take_turn(&mut self) -> Result<(), SessionEnd> {
        let limit = &self.proxy.pool.active;
        if !limit.enabled() {
            return Ok(());
        }
        let needed = {
            let mut book = lock(&self.tracker);
            book.active.sending(self.extended_open);
            book.active.needs_turn()
        };
        if needed {
            match limit.turn().await {
                Ok(Some(turn)) => lock(&self.tracker).active.hold(turn),
                Ok(None) => {}
                Err(crate::pool::WaitedTooLong) => {
                    return Err(SessionEnd::fatal(
                        SqlState::TOO_MANY_CONNECTIONS,
                        format!(
                            "no upstream connection was free for {} s (pool_max_active = {}); try again later",
                            limit.wait_timeout().as_secs(),
                            limit.max()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A Query or Parse of an environment session whose rewrite the cache does not hold: work
    /// it out on a blocking thread. A miss costs from a few hundred microseconds up to
    /// `max_rewrite_ms`; on the event loop (one worker thread by default) it would stall every
    /// other session meanwhile. Hits (a lookup, at most a template fill) stay inline.
    async fn rewrite_ahead(&mut self, frame: frame::Message<'_>) {
        let Caller::Environment(actor) = self.caller else { return };
        if self.discard_until_sync {
            return;
        }
        let (sql, declared) = match frame.tag {
            b'Q' => (decode_query(frame.body).ok(), None),
            b'P' => match decode_parse(frame.body) {
                Ok(p) => (Some(p.query), Some(p.param_types)),
                Err(_) => (None, None),
            },
            _ => (None, None),
        };
        // A malformed message is `handle`'s to report.
        let Some(sql) = sql else { return };
        let started = Instant::now();
        let rewriter = &self.proxy.rewriter;
        let cached = match &declared {
            Some(types) => rewriter.cached_parse(sql, types, actor),
            None => rewriter.cached(sql, actor),
        };
        let (result, described) = match cached {
            Some(hit) => (Ok(hit), None),
            None => {
                let (proxy, sql, actor) = (Arc::clone(self.proxy), sql.to_owned(), actor.clone());
                tokio::task::spawn_blocking(move || {
                    let result = match declared {
                        Some(types) => proxy.rewriter.rewrite_parse(&sql, &types, &actor),
                        None => proxy.rewriter.rewrite(&sql, &actor),
                    };
                    // A refused text can be as large as any: its parse stays off the event loop too.
                    let described = result.is_err().then(|| crate::rewrite::kinds_and_relations_named(&sql));
                    (result, described)
                })
                .await
                .unwrap_or_else(|_| {
                    // `rewrite` catches the rewriter's panics; this is the thread itself failing.
                    (Err(Refusal::Unverifiable(crate::rewrite::INTERNAL_ERROR.to_owned())), None)
                })
            }
        };
        self.ahead = Some(Ahead { result, took: started.elapsed(), described });
    }

    fn handle(&mut self, frame: frame::Message<'_>, out: &mut BytesMut) -> Result<(), SessionEnd> {
        lock(&self.tracker).statements.touch();
        if self.discard_until_sync {
            match frame.tag {
                b'S' => self.discard_until_sync = false,
                // Flush still makes the server send what it has, including the error.
                b'H' => {}
                _ => return Ok(()),
            }
        }
        match frame.tag {
            b'Q' => {
                // A simple Query ends the unnamed statement (as the server does).
                self.unnamed = None;
                self.boundary_sent(false);
                match self.caller {
                    // Forwarded as sent, in whatever encoding the client chose.
                    Caller::Operator => {
                        let sql = statement_text_lossy(b'Q', frame.body);
                        self.operator_statement(&sql);
                        self.decided(self.forwarded(&sql), true);
                        out.extend_from_slice(frame.raw);
                    }
                    Caller::Environment(actor) => {
                        let sql = decode_query(frame.body)?;
                        match self.rewrite(sql, actor).and_then(|rw| self.bindless(rw)) {
                            Ok(rw) => {
                                self.decided(self.rewritten(&rw), true);
                                if statements::forgets_statements(&rw.statement_kinds) {
                                    lock(&self.tracker).prepared.clear();
                                }
                                let bound = rw.bound.as_ref().filter(|_| statements::preparable(&rw.statement_kinds));
                                if !bound.is_some_and(|b| !self.extended_open && self.send_bound(b, out)) {
                                    encode_query(out, &rw.sql)
                                }
                            }
                            Err(refusal) => {
                                let injected = self.refuse(&refusal);
                                self.decided(self.refused(&refusal, Some(actor), sql), true);
                                encode_query(out, &injected);
                            }
                        }
                    }
                }
            }
            b'P' => {
                self.extended_open = true;
                match self.caller {
                    Caller::Operator => {
                        let sql = statement_text_lossy(b'P', frame.body);
                        self.operator_statement(&sql);
                        self.decided(self.forwarded(&sql), false);
                        out.extend_from_slice(frame.raw);
                    }
                    Caller::Environment(actor) => {
                        let parse = decode_parse(frame.body)?;
                        match self.rewrite_one(parse.query, &parse.param_types, actor) {
                            Ok(rw) if statements::is_reserved(parse.name) => {
                                self.refuse_rewritten(reserved_name(parse.name), &rw, actor, parse.query, out);
                            }
                            Ok(rw) => {
                                let declared =
                                    rw.param_rules.iter().try_for_each(|r| r.check_declared(&parse.param_types));
                                if let Err(refusal) = declared {
                                    self.refuse_rewritten(refusal, &rw, actor, parse.query, out);
                                    return Ok(());
                                }
                                if parse.name.is_empty() {
                                    self.unnamed = None;
                                    if statements::preparable(&rw.statement_kinds)
                                        && self.parse_unnamed(&rw, &parse.param_types, out)
                                    {
                                        self.decided(self.rewritten(&rw), false);
                                        return Ok(());
                                    }
                                    if !rw.param_rules.is_empty() {
                                        let refusal = Refusal::Denied(
                                            "refused: set_config with a parameter needs a prepared statement of the \
                                             proxy's, and this connection holds as many as it may (run DISCARD ALL)"
                                                .to_owned(),
                                        );
                                        self.refuse_rewritten(refusal, &rw, actor, parse.query, out);
                                        return Ok(());
                                    }
                                } else if let Err(refusal) = self.note_named_rules(parse.name, &rw.param_rules) {
                                    self.refuse_rewritten(refusal, &rw, actor, parse.query, out);
                                    return Ok(());
                                }
                                self.decided(self.rewritten(&rw), false);
                                encode_parse(out, parse.name, &rw.sql, &parse.param_types)
                            }
                            Err(refusal) => self.refuse_extended(refusal, Some(actor), parse.query, out),
                        }
                    }
                }
            }
            b'F' => {
                // Fastpath function calls bypass SQL entirely: never forwarded.
                let refusal = Refusal::Denied(
                    "refused: the fastpath FunctionCall protocol is not supported through the proxy; call the function in SQL"
                        .to_owned(),
                );
                self.boundary_sent(false);
                let injected = self.refuse(&refusal);
                self.decided(self.refused(&refusal, None, ""), true);
                encode_query(out, &injected);
            }
            b'S' => {
                self.extended_open = false;
                self.boundary_sent(true);
                out.extend_from_slice(frame.raw);
            }
            b'B' | b'D' | b'C' if !self.caller.is_operator() => {
                self.extended_open = true;
                self.named_message(frame, out)?;
            }
            b'B' | b'D' | b'C' | b'E' | b'H' => {
                self.extended_open = true;
                out.extend_from_slice(frame.raw);
            }
            b'p' => {
                return Err(SessionEnd::fatal(
                    SqlState::PROTOCOL_VIOLATION,
                    "protocol violation: unexpected password message after authentication",
                ));
            }
            // CopyData, CopyDone, CopyFail: no SQL text.
            b'd' | b'c' | b'f' => {
                self.copy_traffic = true;
                out.extend_from_slice(frame.raw);
            }
            _ => out.extend_from_slice(frame.raw),
        }
        Ok(())
    }

    /// Send a rewritten simple Query as a prepared statement with its values bound; false when
    /// the connection holds no more statements (the caller sends the text as it is).
    fn send_bound(&mut self, bound: &Bound, out: &mut BytesMut) -> bool {
        let mut book = lock(&self.tracker);
        let Some(chosen) = book.prepared.use_for(&bound.sql, &bound.types) else { return false };
        self.count_use(&chosen);
        // This Query's round trip: its boundary was counted before the rewrite.
        let Some(unit) = book.units.back_mut().map(|u| &mut u.added) else { return false };
        if let Use::Prepare { name, close } = &chosen {
            if let Some(old) = close {
                encode_target(out, b'C', b'S', old);
                unit.close_complete += 1;
            }
            encode_parse(out, name, &bound.sql, &bound.types);
            unit.parse_complete += 1;
        }
        let name = chosen.name();
        encode_bind_text(out, name, &bound.values);
        unit.bind_complete += 1;
        encode_target(out, b'D', b'P', "");
        unit.no_data += 1;
        encode_execute_sync(out);
        unit.names.push(Arc::clone(name));
        true
    }

    /// A client's unnamed Parse of a rewritten statement: prepared once under the proxy's name;
    /// later Parses of the same text only parse the empty string (the client still gets its
    /// ParseComplete) and its Bind and Describe name the prepared statement. False (nothing
    /// written): the connection holds as many statements as it may.
    fn parse_unnamed(&mut self, rw: &Rewritten, param_types: &[u32], out: &mut BytesMut) -> bool {
        let sql = rw.sql.as_str();
        let mut book = lock(&self.tracker);
        let Some(chosen) = book.prepared.use_for(sql, param_types) else {
            return false;
        };
        self.count_use(&chosen);
        match &chosen {
            Use::Existing(_) => encode_parse(out, "", "", &[]),
            Use::Prepare { name, close } => {
                if let Some(old) = close {
                    encode_target(out, b'C', b'S', old);
                    book.open_unit.close_complete += 1;
                }
                encode_parse(out, name, sql, param_types);
            }
        }
        book.open_unit.names.push(Arc::clone(chosen.name()));
        self.unnamed = Some(Arc::clone(chosen.name()));
        self.unnamed_rules = Arc::clone(&rw.param_rules);
        true
    }

    /// A client's named Parse of a statement with rules: its Binds are checked from now on.
    fn note_named_rules(&mut self, name: &str, rules: &[ParamRule]) -> Result<(), Refusal> {
        if rules.is_empty() {
            return Ok(());
        }
        let held: usize = self.named_rules.values().map(Vec::len).sum();
        if held + rules.len() > MAX_NAMED_RULES {
            return Err(Refusal::Denied(format!(
                "refused: a session may prepare statements with at most {MAX_NAMED_RULES} set_config parameters"
            )));
        }
        let entry = self.named_rules.entry(name.to_owned()).or_default();
        for rule in rules {
            if !entry.contains(rule) {
                entry.push(rule.clone());
            }
        }
        Ok(())
    }

    /// The rules of the statement a client's Bind names: checked on the values it binds.
    fn check_bind(&self, statement: &str, rest: &[u8]) -> Result<Result<(), Refusal>, SessionEnd> {
        let rules: &[ParamRule] = match (statement.is_empty(), &self.unnamed) {
            (true, Some(_)) => &self.unnamed_rules,
            // The server's own unnamed statement never has rules (see `unnamed_rules`).
            (true, None) => &[],
            (false, _) => self.named_rules.get(statement).map_or(&[], Vec::as_slice),
        };
        if rules.is_empty() {
            return Ok(Ok(()));
        }
        let values = decode_bind_values(rest)?;
        Ok(rules.iter().try_for_each(|r| r.check(values.get(usize::from(r.param()) - 1).copied().flatten())))
    }

    fn count_use(&self, chosen: &Use) {
        let counter = match chosen {
            Use::Existing(_) => &self.proxy.metrics.statements_reused,
            Use::Prepare { .. } => &self.proxy.metrics.statements_prepared,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bind, Describe and Close of an environment session: the proxy's names are out of reach,
    /// and the unnamed statement may stand for one of the proxy's prepared statements.
    fn named_message(&mut self, frame: frame::Message<'_>, out: &mut BytesMut) -> Result<(), SessionEnd> {
        let (statement, portal) = match frame.tag {
            b'B' => {
                let names = decode_bind_names(frame.body)?;
                if let Err(refusal) = self.check_bind(names.statement, names.rest)? {
                    self.refuse_extended(refusal, self.caller.actor(), "", out);
                    return Ok(());
                }
                if let (true, Some(name)) = (names.statement.is_empty(), &self.unnamed) {
                    encode_bind_renamed(out, &names, name);
                    return Ok(());
                }
                (names.statement, names.portal)
            }
            tag => {
                let what = if tag == b'D' { "Describe" } else { "Close" };
                match decode_target(what, frame.body)? {
                    (b'S', name) => {
                        if name.is_empty()
                            && let Some(standing) = &self.unnamed
                        {
                            if tag == b'D' {
                                encode_target(out, b'D', b'S', standing);
                                return Ok(());
                            }
                            self.unnamed = None;
                        }
                        (name, "")
                    }
                    (_, portal) => ("", portal),
                }
            }
        };
        for name in [statement, portal] {
            if statements::is_reserved(name) {
                self.refuse_extended(reserved_name(name), self.caller.actor(), "", out);
                return Ok(());
            }
        }
        out.extend_from_slice(frame.raw);
        Ok(())
    }

    /// `refuse_extended` for a Parse whose text was rewritten (and so read by PostgreSQL's parser
    /// already): its audit event names the rewrite's statement kinds and relations, the same
    /// ones a parse of the text would give, without parsing it again on the event loop.
    fn refuse_rewritten(
        &mut self,
        refusal: Refusal,
        rw: &Rewritten,
        actor: &ActorContext,
        sql: &str,
        out: &mut BytesMut,
    ) {
        self.refusing_rewritten(rw);
        self.refuse_extended(refusal, Some(actor), sql, out);
    }

    /// A refusal of `rw`'s text is coming: its audit event names the kinds and relations the
    /// rewrite read from PostgreSQL's parse of the text, the same as
    /// `rewrite::kinds_and_relations_named` would parse again on the event loop.
    fn refusing_rewritten(&self, rw: &Rewritten) {
        self.refusal_described.set(Some((Arc::clone(&rw.statement_kinds), Arc::clone(&rw.tables))));
    }

    /// A simple Query's rewrite, which binds no values: one whose acceptance depends on bound
    /// values (`gate::ParamRule`) is refused.
    fn bindless(&self, rw: Arc<Rewritten>) -> Result<Arc<Rewritten>, Refusal> {
        if rw.param_rules.is_empty() {
            return Ok(rw);
        }
        self.refusing_rewritten(&rw);
        Err(Refusal::Denied(
            "refused: set_config with a parameter is accepted only in a prepared statement (Parse, then Bind), whose \
             bound values the proxy checks"
                .to_owned(),
        ))
    }

    /// Refuse an extended-protocol message: the client gets the refusal in its place, and the
    /// rest of its messages up to Sync are skipped, as the server does after an error.
    fn refuse_extended(&mut self, refusal: Refusal, actor: Option<&ActorContext>, sql: &str, out: &mut BytesMut) {
        let injected = self.refuse(&refusal);
        self.decided(self.refused(&refusal, actor, sql), false);
        encode_parse(out, "", &injected, &[]);
        self.discard_until_sync = true;
    }

    /// Rewrite a text for an environment key; DDL that went through schedules a catalog re-read.
    fn rewrite(&mut self, sql: &str, actor: &ActorContext) -> Result<Arc<Rewritten>, Refusal> {
        let ahead = self.ahead.take();
        self.observed_rewrite(sql, ahead, |rewriter| rewriter.rewrite(sql, actor))
    }

    /// A rewrite (worked out ahead, or by `run` now) with its latency metric, its log line and
    /// the catalog refresh DDL asks for.
    fn observed_rewrite(
        &self,
        sql: &str,
        ahead: Option<Ahead>,
        run: impl FnOnce(&crate::rewrite::Rewriter) -> Result<Arc<Rewritten>, Refusal>,
    ) -> Result<Arc<Rewritten>, Refusal> {
        let span = tracing::debug_span!("statement", bytes = sql.len());
        let _g = span.enter();
        let (r, took) = match ahead {
            Some(Ahead { result, took, described }) => {
                self.refusal_described.set(described);
                (result, took)
            }
            None => {
                let started = std::time::Instant::now();
                (run(&self.proxy.rewriter), started.elapsed())
            }
        };
        self.proxy.metrics.rewrite_latency.observe(took);
        match &r {
            Ok(rw) => {
                tracing::debug!(kinds = ?rw.statement_kinds, "rewritten");
                if rw.statement_kinds.iter().any(|k| DDL_KINDS.contains(&k.as_str())) {
                    self.proxy.request_refresh();
                }
            }
            Err(refusal) => {
                self.proxy.metrics.refusal(refusal);
                tracing::info!(code = refusal.sqlstate().code(), reason = %refusal.logged(), "refused")
            }
        }
        r
    }

    /// A Parse message holds at most one statement, as the server requires. Its declared types
    /// decide whether the text without conversion gates fits it (`Rewriter::rewrite_parse`,
    /// which the rewrite ahead called already).
    fn rewrite_one(&mut self, sql: &str, declared: &[u32], actor: &ActorContext) -> Result<Arc<Rewritten>, Refusal> {
        let ahead = self.ahead.take();
        let rw = self.observed_rewrite(sql, ahead, |rewriter| rewriter.rewrite_parse(sql, declared, actor))?;
        if rw.statement_kinds.len() > 1 {
            self.refusing_rewritten(&rw);
            return Err(Refusal::Syntax("cannot insert multiple commands into a prepared statement".to_owned()));
        }
        Ok(rw)
    }

    /// An operator statement is forwarded as sent: audit it, and re-read the catalog after DDL.
    fn operator_statement(&self, sql: &str) {
        audit_operator(sql);
        if looks_like_ddl(sql) {
            self.proxy.request_refresh();
        }
    }

    /// Build the client-facing error and return the SQL to forward in the refused one's place.
    fn refuse(&self, refusal: &Refusal) -> String {
        let mut err = BytesMut::new();
        backend::error_response(&mut err, Severity::Error, refusal.sqlstate(), &refusal.to_string(), None);
        lock(&self.tracker).refusals.inject(err.freeze())
    }

    /// Record a decision; it is reported once the server has answered its segment.
    fn decided(&self, event: Event, own_boundary: bool) {
        self.proxy.metrics.statement(event.origin.environment, event.verdict);
        lock(&self.tracker).statements.decided(event, own_boundary);
    }

    fn forwarded(&self, sql: &str) -> Event {
        let mut e = Event::new(&self.origin, Verdict::Allowed);
        e.sql_hash = Some(crate::events::sql_hash(sql));
        e
    }

    /// A rewritten text's event: everything but the caller comes from the (cached) rewrite.
    fn rewritten(&self, rw: &Rewritten) -> Event {
        let mut e = Event::new(&self.origin, Verdict::Rewritten);
        e.kinds = Arc::clone(&rw.statement_kinds);
        e.tables = Arc::clone(&rw.tables);
        e.policy_version = rw.policy_version.clone();
        e.sql_hash = Some(Arc::clone(&rw.sql_hash));
        e
    }

    fn refused(&self, refusal: &Refusal, actor: Option<&ActorContext>, sql: &str) -> Event {
        let mut e = Event::new(&self.origin, Verdict::Refused);
        // Worked out off the event loop by the rewrite ahead that refused this text, or taken
        // from a rewrite that went through (`refusing_rewritten`); parsed here only for what was
        // never rewritten (a Bind, a fastpath call: no text, nothing to parse).
        (e.kinds, e.tables) =
            self.refusal_described.take().unwrap_or_else(|| crate::rewrite::kinds_and_relations_named(sql));
        e.reason = Some(refusal.logged().into_owned());
        e.sqlstate = Some(refusal.sqlstate().code().to_owned());
        e.policy_version = actor.map(|a| Arc::from(self.proxy.policy_version(a.environment)));
        e
    }
}

/// At most this many rules of named statements per session (`note_named_rules`).
const MAX_NAMED_RULES: usize = 4096;

/// The server's 57014 for a statement the proxy cancelled, told as what it was.
fn timed_out_error(body: &[u8]) -> Option<Bytes> {
    let fields = parse_error_fields(body);
    if fields.code != SqlState::QUERY_CANCELED.code() {
        return None;
    }
    let mut out = BytesMut::new();
    backend::error_response(
        &mut out,
        Severity::Error,
        SqlState::QUERY_CANCELED,
        "canceling statement due to statement timeout (the proxy's statement_timeout_ms)",
        None,
    );
    Some(out.freeze())
}

/// A client's statement or portal name in the proxy's reserved namespace.
fn reserved_name(name: &str) -> Refusal {
    Refusal::Denied(format!(
        "refused: statement and portal names starting with {} are reserved by the proxy ({name:?})",
        crate::rewrite::engine::walk::RESERVED_PREFIX
    ))
}

/// How often a session adds its usage to the process-wide counters.
const USAGE_PUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// How a session ends when the proxy shuts down (PostgreSQL's own code and wording).
fn shutting_down() -> SessionEnd {
    SessionEnd::fatal(
        SqlState::ADMIN_SHUTDOWN,
        "terminating connection due to administrator command (the proxy is shutting down)",
    )
}

/// pg_query statement kinds that change the catalog.
const DDL_KINDS: &[&str] = &[
    "CreateStmt",
    "CreateTableAsStmt",
    "AlterTableStmt",
    "DropStmt",
    "IndexStmt",
    "RenameStmt",
    "ViewStmt",
    "CommentStmt",
];

/// A cheap test for operator statements (which are not parsed) that may change the catalog; a
/// false positive only costs a catalog re-read.
fn looks_like_ddl(sql: &str) -> bool {
    sql.split(';').any(|piece| {
        let head = piece.trim_start();
        ["create", "alter", "drop", "comment"]
            .iter()
            .any(|k| head.get(..k.len()).is_some_and(|h| h.eq_ignore_ascii_case(k)))
    })
}

fn audit_operator(sql: &str) {
    // Its shape, not its values: a role's password or a row's contents never reach the log (the
    // field is computed only when the line is logged).
    tracing::info!(
        target: "struere_proxy::audit",
        bytes = sql.len(),
        statement = crate::rewrite::without_constants(sql).as_deref().unwrap_or("(not readable by PostgreSQL's lexer)"),
        "operator statement"
    );
}

struct UpstreamToClient<'a> {
    proxy: &'a Arc<Proxy>,
    is_operator: bool,
    /// Environment sessions: channels are namespaced per organization and environment.
    notify_prefix: Option<String>,
    key_hash: KeyHash,
    reader: ReadHalf<UpstreamStream>,
    buf: BytesMut,
    tracker: Tracker,
    usage: UsageKey,
    /// The transaction status of the last ReadyForQuery.
    last_status: u8,
    /// Where a statement that outlives `statement_timeout_ms` is cancelled.
    cancel_target: Option<CancelTarget>,
    started: Instant,
    /// The statement in flight was cancelled for its timeout (until the next ReadyForQuery).
    cancel_sent: bool,
    /// Usage counted since the last push to the process-wide counters.
    pending_usage: Usage,
    usage_pushed: Instant,
    /// The server sent a FATAL (or PANIC) ErrorResponse, relayed to the client: the close that
    /// follows is the one the client expects, with no error of the proxy's after it.
    server_ended: bool,
    /// The upstream backend's pid and the one this client was given, where they differ: the
    /// session's own notifications (NOTIFY on a channel it listens to) carry the client's, as
    /// they would from the server.
    own_pid: Option<(i32, i32)>,
    /// Hears when something went upstream: the statement limit is armed from then.
    statement_starts: Arc<StatementStarts>,
}

impl UpstreamToClient<'_> {
    async fn run<W: AsyncWrite + Unpin>(&mut self, client: &mut W) -> Result<(), SessionEnd> {
        let mut out = BytesMut::with_capacity(16 * 1024);
        let recheck_every = self.proxy.keys.ttl();
        let mut recheck_at = tokio::time::Instant::now() + recheck_every;
        // One timer for the rare deadlines (the next key re-check, the next session limit),
        // and one wait for a drain, both made once and kept across wake-ups: the loop turns
        // once per answer of the server, and making (and dropping) an interval tick, a sleep
        // and a watch wait each time cost more than relaying the answer.
        let alarm = tokio::time::sleep_until(recheck_at);
        tokio::pin!(alarm);
        let mut armed = recheck_at;
        let mut drain_wait = Box::pin(drain_changed(self.proxy.drain.subscribe()));
        let mut draining = *self.proxy.drain.borrow() != Drain::Running;
        let mut drain_open = true;
        let mut started_wait = std::pin::pin!(Arc::clone(&self.statement_starts).told());
        loop {
            // Relay whatever complete messages are buffered (leftovers from the handshake first).
            self.relay_buffered(&mut out)?;
            if !out.is_empty() {
                client.write_all(&out).await?;
                out.clear();
            }
            // Draining: a session ends as soon as it is idle (no transaction, nothing in flight).
            if draining && self.last_status == b'I' && lock(&self.tracker).statements.quiescent() {
                return Err(shutting_down());
            }
            let limits = self.proxy.current().timeouts;
            let limit = self.next_limit(limits);
            let watching = self.statement_starts.watch(limits);
            let due = limit.map_or(recheck_at, |(at, _)| recheck_at.min(at.into()));
            if due != armed {
                alarm.as_mut().reset(due);
                armed = due;
            }
            tokio::select! {
                // In this order, and without drawing a random number per wake-up: the rare
                // branches first, so that a server that always has more to send never delays
                // a limit, a key re-check or a drain.
                biased;
                () = &mut alarm => {
                    let now = tokio::time::Instant::now();
                    if now >= recheck_at {
                        recheck_at = now + recheck_every;
                        self.push_usage();
                        self.recheck_key().instrument(tracing::debug_span!("key_recheck")).await?
                    }
                    if limit.is_some() {
                        self.limit_reached()?;
                    }
                }
                // A statement went out: the loop's next turn arms its limit.
                () = &mut started_wait, if watching => started_wait.set(Arc::clone(&self.statement_starts).told()),
                (rx, state) = &mut drain_wait, if drain_open => match state {
                    Some(Drain::Force) => return Err(shutting_down()),
                    Some(Drain::Draining) => {
                        draining = true;
                        drain_wait = Box::pin(drain_changed(rx));
                    }
                    Some(Drain::Running) => drain_wait = Box::pin(drain_changed(rx)),
                    // The proxy is gone: no drain can come any more.
                    None => drain_open = false,
                },
                n = read_more(&mut self.reader, &mut self.buf) => {
                    if n? == 0 {
                        // After the server's own FATAL (`pg_terminate_backend`, an admin
                        // shutdown) the client has heard why, and expects only the close, as
                        // from the server itself.
                        if self.server_ended {
                            return Err(SessionEnd::Unheard("the upstream database ended the session".to_owned()));
                        }
                        return Err(SessionEnd::fatal(
                            SqlState::CONNECTION_FAILURE,
                            "the upstream database closed the connection",
                        ));
                    }
                }
            }
        }
    }

    /// Add this session's usage since the last push to the process-wide counters: at a
    /// ReadyForQuery at most every `USAGE_PUSH`, at every key re-check, and when the session
    /// ends (the counters go to the database every few seconds anyway; a push per statement
    /// would only cost a shared-map update per statement).
    fn push_usage(&mut self) {
        let pending = std::mem::take(&mut self.pending_usage);
        if pending != Usage::default() {
            self.proxy.events.count(&self.usage, pending);
        }
        self.usage_pushed = Instant::now();
    }

    /// The next session limit due (`config::SessionTimeouts`): while something is in flight,
    /// the statement timeout from its start; while idle, the idle or idle-in-transaction
    /// timeout from the server's last answer.
    fn next_limit(&self, limits: SessionTimeouts) -> Option<(Instant, SessionLimit)> {
        if limits == SessionTimeouts::default() {
            return None;
        }
        let book = lock(&self.tracker);
        if let Some(since) = book.statements.busy_since() {
            let limit = limits.statement.filter(|_| !self.cancel_sent && self.cancel_target.is_some())?;
            return Some((since + limit, SessionLimit::Statement));
        }
        let since = book.statements.last_answer().unwrap_or(self.started);
        match self.last_status {
            b'I' => limits.idle_session.map(|d| (since + d, SessionLimit::IdleSession)),
            _ => limits.idle_transaction.map(|d| (since + d, SessionLimit::IdleTransaction)),
        }
    }

    /// A limit's deadline passed: act if it still holds (the client may have sent something
    /// meanwhile: an idle limit armed before it no longer applies).
    fn limit_reached(&mut self) -> Result<(), SessionEnd> {
        let limits = self.proxy.current().timeouts;
        let Some((at, limit)) = self.next_limit(limits) else { return Ok(()) };
        if at > Instant::now() {
            return Ok(());
        }
        self.proxy.metrics.timeout(limit);
        let secs = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_secs());
        match limit {
            SessionLimit::IdleSession => {
                tracing::info!(limit = limit.as_str(), "session limit reached: disconnecting");
                Err(SessionEnd::fatal(
                    SqlState::IDLE_SESSION_TIMEOUT,
                    format!(
                        "terminating connection due to idle-session timeout (the proxy's idle_session_timeout_secs is {})",
                        secs(limits.idle_session)
                    ),
                ))
            }
            SessionLimit::IdleTransaction => {
                tracing::info!(limit = limit.as_str(), "session limit reached: disconnecting");
                Err(SessionEnd::fatal(
                    SqlState::IDLE_IN_TRANSACTION_TIMEOUT,
                    format!(
                        "terminating connection due to idle-in-transaction timeout (the proxy's \
                         idle_transaction_timeout_secs is {})",
                        secs(limits.idle_transaction)
                    ),
                ))
            }
            SessionLimit::Statement => {
                tracing::info!(limit = limit.as_str(), "session limit reached: cancelling the running statement");
                self.cancel_sent = true;
                lock(&self.tracker).timed_out = true;
                if let Some(t) = &self.cancel_target {
                    let cancel = t.cancel();
                    tokio::spawn(async move {
                        if let Err(e) = cancel.await {
                            tracing::warn!(error = %e, "statement timeout: cancel request failed");
                        }
                    });
                }
                Ok(())
            }
        }
    }

    /// Relay every complete message in the read buffer. Messages are read where they lie (no
    /// per-message handle on the buffer: a result's rows pass through here one by one).
    fn relay_buffered(&mut self, out: &mut BytesMut) -> Result<(), SessionEnd> {
        let mut buf = std::mem::take(&mut self.buf);
        let relayed = self.relay_messages(&mut buf, out);
        self.buf = buf;
        relayed
    }

    fn relay_messages(&mut self, buf: &mut BytesMut, out: &mut BytesMut) -> Result<(), SessionEnd> {
        loop {
            let message = match frame::backend_message(buf) {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(e) => {
                    return Err(SessionEnd::fatal(
                        SqlState::CONNECTION_FAILURE,
                        format!("the upstream database sent an invalid message: {e}"),
                    ));
                }
            };
            let relayed = self.relay_message(message, out);
            let len = message.raw.len();
            relayed?;
            buf.advance(len);
        }
    }

    /// One message from the server: to the client as it is, changed, or not at all.
    fn relay_message(&mut self, frame: frame::Message<'_>, out: &mut BytesMut) -> Result<(), SessionEnd> {
        match frame.tag {
            // Answers to messages the proxy added (statements.rs) never reach the client.
            b'1' | b'2' | b'3' | b'n' if lock(&self.tracker).answering().swallow(frame.tag) => return Ok(()),
            b'A' if self.notify_prefix.is_some() => {
                let prefix = self.notify_prefix.as_deref().unwrap_or_default();
                // Another tenant's channel (or a malformed message) never reaches this client.
                if let Some(mut own) = strip_channel_prefix(frame.body, prefix) {
                    own_notification_pid(&mut own, self.own_pid);
                    out.extend_from_slice(&own);
                }
                return Ok(());
            }
            b'A' => {
                let start = out.len();
                out.extend_from_slice(frame.raw);
                own_notification_pid(&mut out[start..], self.own_pid);
                return Ok(());
            }
            b'S' if !self.is_operator => check_parameter(frame.body)?,
            b'C' => {
                let tag = frame.body.split(|b| *b == 0).next().unwrap_or_default();
                let rows = lock(&self.tracker).statements.command_complete(tag);
                self.pending_usage.statements += 1;
                self.pending_usage.rows += rows;
                out.extend_from_slice(frame.raw);
                return Ok(());
            }
            b'G' => {
                lock(&self.tracker).copy_in_began();
                out.extend_from_slice(frame.raw);
                return Ok(());
            }
            b'E' => self.pending_usage.errors += 1,
            b'Z' => self.last_status = frame.body.first().copied().unwrap_or(b'E'),
            _ => {
                out.extend_from_slice(frame.raw);
                return Ok(());
            }
        }
        let mut tracker = lock(&self.tracker);
        // ReadyForQuery: the decisions it completes, and how long the server took (one clock
        // read, `ready`'s, also dates the usage push).
        let ready = (frame.tag == b'Z').then(|| {
            let (done, took) = tracker.statements.ready();
            (done, took, tracker.statements.last_answer())
        });
        let action = tracker.refusals.on_backend(frame.tag, frame.body);
        if frame.tag == b'Z' {
            tracker.units.pop_front();
            let unanswered = tracker.units.len();
            tracker.active.ready(self.last_status, unanswered);
            tracker.timed_out = false;
            self.cancel_sent = false;
        }
        let action = match action {
            BackendAction::Forward if frame.tag == b'E' && tracker.timed_out => {
                timed_out_error(frame.body).map_or(BackendAction::Forward, BackendAction::Replace)
            }
            other => other,
        };
        if frame.tag == b'E' {
            tracker.answer_failed();
            let (fields, ours) = match &action {
                BackendAction::Forward => (parse_error_fields(frame.body), false),
                BackendAction::Replace(b) => (parse_error_fields(b.get(5..).unwrap_or_default()), true),
            };
            if matches!(fields.severity.as_str(), "FATAL" | "PANIC") {
                self.server_ended = true;
            }
            tracker.statements.failed(&fields.code, ours.then_some(fields.message.as_str()));
        }
        drop(tracker);
        if let Some((done, took, answered_at)) = ready {
            self.proxy.metrics.upstream_latency.observe(took);
            self.pending_usage.time_us += u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            if answered_at.is_some_and(|at| at.saturating_duration_since(self.usage_pushed) >= USAGE_PUSH) {
                self.push_usage();
            }
            for e in done {
                self.proxy.events.record(e);
            }
        }
        match action {
            BackendAction::Forward => out.extend_from_slice(frame.raw),
            BackendAction::Replace(b) => out.extend_from_slice(&b),
        }
        Ok(())
    }

    async fn recheck_key(&self) -> Result<(), SessionEnd> {
        match self.proxy.keys.lookup(&self.key_hash).await {
            Ok(KeyStatus::Valid(_)) => Ok(()),
            Ok(status) => {
                tracing::warn!(reason = status.reason(), "terminating session: key no longer valid");
                Err(SessionEnd::fatal(
                    SqlState::ADMIN_SHUTDOWN,
                    format!("terminating connection: the API key is no longer valid ({})", status.reason()),
                ))
            }
            // The key store being briefly unreachable is no reason to drop working sessions;
            // the next tick checks again.
            Err(e) => {
                tracing::warn!(error = %e, "key re-check failed");
                Ok(())
            }
        }
    }
}

/// The next drain state, with the receiver to wait for the one after; `None` once the proxy
/// is gone (its sender dropped).
async fn drain_changed(mut rx: watch::Receiver<Drain>) -> (watch::Receiver<Drain>, Option<Drain>) {
    let state = match rx.changed().await {
        Ok(()) => Some(*rx.borrow_and_update()),
        Err(_) => None,
    };
    (rx, state)
}

async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 8192 {
        buf.reserve(32 * 1024);
    }
    r.read_buf(buf).await
}

/// In a whole NotificationResponse message, the upstream backend's own pid becomes the one its
/// client was given (`own`: upstream, client); any other pid is left as the server sent it.
fn own_notification_pid(message: &mut [u8], own: Option<(i32, i32)>) {
    let Some((upstream, client)) = own else { return };
    if let Some(pid) = message.get_mut(5..9)
        && *pid == upstream.to_be_bytes()
    {
        pid.copy_from_slice(&client.to_be_bytes());
    }
}

/// A NotificationResponse body (pid, channel, payload) on one of this tenant's channels,
/// re-encoded with the prefix removed; `None` for any other channel.
fn strip_channel_prefix(body: &[u8], prefix: &str) -> Option<BytesMut> {
    let pid = body.get(..4)?;
    let rest = body.get(4..)?;
    let nul = rest.iter().position(|&c| c == 0)?;
    let channel = rest.get(..nul)?.strip_prefix(prefix.as_bytes())?;
    let payload = rest.get(nul + 1..)?;
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.extend_from_slice(b"A");
    out.extend_from_slice(&((4 + pid.len() + channel.len() + 1 + payload.len()) as i32).to_be_bytes());
    out.extend_from_slice(pid);
    out.extend_from_slice(channel);
    out.extend_from_slice(b"\0");
    out.extend_from_slice(payload);
    Some(out)
}

/// The printer's safety rests on these settings; a session where they changed is ended.
fn check_parameter(body: &[u8]) -> Result<(), SessionEnd> {
    let Some((name, value)) = parse_parameter_status(body) else {
        return Ok(());
    };
    let ok = match name {
        "standard_conforming_strings" => value == "on",
        "client_encoding" => value == "UTF8",
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(SessionEnd::fatal(
            SqlState::PROTOCOL_VIOLATION,
            format!("terminating connection: {name} changed to {value:?}, which the proxy cannot parse safely"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(channel: &str, payload: &str) -> Vec<u8> {
        let mut b = 42i32.to_be_bytes().to_vec();
        b.extend_from_slice(channel.as_bytes());
        b.push(0);
        b.extend_from_slice(payload.as_bytes());
        b.push(0);
        b
    }

    #[test]
    fn ddl_detection() {
        assert!(looks_like_ddl("CREATE TABLE x (a int)"));
        assert!(looks_like_ddl("  alter table x add b int"));
        assert!(looks_like_ddl("SELECT 1; DROP TABLE x"));
        assert!(!looks_like_ddl("SELECT 'create'"));
        assert!(!looks_like_ddl("INSERT INTO t VALUES (1)"));
        assert!(!looks_like_ddl(""));
    }

    #[test]
    fn notifications_are_filtered_by_tenant_prefix() {
        let out = strip_channel_prefix(&notification("tabc_jobs", "hi"), "tabc_").unwrap();
        let mut expected = b"A".to_vec();
        let body = notification("jobs", "hi");
        expected.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        expected.extend_from_slice(&body);
        assert_eq!(&out[..], &expected[..]);
        assert!(strip_channel_prefix(&notification("tzzz_jobs", "hi"), "tabc_").is_none());
        assert!(strip_channel_prefix(&notification("jobs", "hi"), "tabc_").is_none());
        assert!(strip_channel_prefix(b"\0\0", "tabc_").is_none());
        assert!(strip_channel_prefix(b"\0\0\0\0tabc_x", "tabc_").is_none());
    }
}
