//! The startup phase, as one linear function: TLS negotiation, the StartupMessage, the API key,
//! the upstream connection. Anything unexpected ends the connection with a FATAL error.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;

use crate::auth::api_key::{KeyHash, display_prefix};
use crate::auth::identity::{Caller, Environment};
use crate::auth::store::KeyStatus;
use crate::cancel::CancelGuard;
use crate::config::TlsMode;
use crate::error::SessionEnd;
use crate::net::stream::ClientStream;
use crate::pool::PoolKey;
use crate::protocol::backend;
use crate::protocol::frontend::decode_password;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::{ParamVerdict, StartupMessage, StartupRequest, classify_param, parse_startup};
use crate::server::Proxy;
use crate::session::io::ClientConn;
use crate::upstream::{self, UpstreamConn, UpstreamError};

/// Largest password message accepted before authentication (PostgreSQL's limit for
/// authentication messages).
const MAX_AUTH_MESSAGE: usize = 65_535;

/// A session that passed the startup phase.
pub struct Established {
    pub client: ClientConn,
    pub upstream: UpstreamConn,
    pub caller: Caller,
    pub key_hash: KeyHash,
    pub key_prefix: String,
    pub cancel: CancelGuard,
    /// Where the upstream connection goes back when the client leaves politely (`None`: it is
    /// closed; operator sessions are never pooled).
    pub pool_key: Option<PoolKey>,
    /// This session's share of its key's connection budget.
    pub key_slot: crate::server::KeySlot,
}

/// What the startup steps produce besides the client connection.
struct Admitted {
    upstream: UpstreamConn,
    caller: Caller,
    key_hash: KeyHash,
    key_prefix: String,
    cancel: CancelGuard,
    pool_key: Option<PoolKey>,
    key_slot: crate::server::KeySlot,
}

pub enum Outcome {
    Session(Box<Established>),
    /// A CancelRequest was handled (or ignored); the connection is done.
    CancelHandled,
    /// The client went away before starting.
    Closed,
}

/// Settings the proxy pins in the upstream startup packet. Because they are startup values,
/// `RESET ALL` and `DISCARD ALL` restore them. `client_encoding` is UTF8 but for an operator
/// session whose client asked for another (`Screened::operator_only`); an operator session
/// leaves out the ones its client set itself.
fn pinned_params(proxy: &Proxy, caller: &Caller, client_encoding: String) -> Vec<(String, String)> {
    let search_path = match caller {
        // The tenant's scratch schema first: unqualified DDL lands there, never in a schema
        // other tenants share. Managed tables are always printed schema-qualified.
        Caller::Environment(actor) => {
            format!("\"{}\", {}", crate::rewrite::engine::scratch_schema(actor), proxy.settings.search_path)
        }
        Caller::Operator => proxy.settings.search_path.clone(),
    };
    vec![
        ("search_path".to_owned(), search_path),
        ("standard_conforming_strings".to_owned(), "on".to_owned()),
        ("client_encoding".to_owned(), client_encoding),
    ]
}

/// Run the startup phase. A failure that the client should hear about is sent to it as a
/// FATAL ErrorResponse before the error is returned.
pub async fn run(proxy: &Arc<Proxy>, mut client: ClientConn, peer: SocketAddr) -> Result<Outcome, SessionEnd> {
    match steps(proxy, &mut client, peer).await {
        Ok(Some(Admitted { upstream, caller, key_hash, key_prefix, cancel, pool_key, key_slot })) => {
            Ok(Outcome::Session(Box::new(Established {
                client,
                upstream,
                caller,
                key_hash,
                key_prefix,
                cancel,
                pool_key,
                key_slot,
            })))
        }
        Ok(None) => Ok(Outcome::Closed),
        Err(Early::Cancel) => Ok(Outcome::CancelHandled),
        Err(Early::End(e)) => {
            if let Some(bytes) = super::fatal_bytes(&e) {
                let _ = client.send(&bytes).await;
            }
            Err(e)
        }
    }
}

enum Early {
    Cancel,
    End(SessionEnd),
}

impl<E: Into<SessionEnd>> From<E> for Early {
    fn from(e: E) -> Self {
        Early::End(e.into())
    }
}

type Steps = Option<Admitted>;

async fn steps(proxy: &Arc<Proxy>, client: &mut ClientConn, peer: SocketAddr) -> Result<Steps, Early> {
    // 1. Direct TLS (a ClientHello where SSLRequest would be), then special requests until a
    // StartupMessage.
    if opens_with_tls(client).await? {
        direct_tls(proxy, client).await?;
    }
    let startup = loop {
        let Some(packet) = client.read_startup().await? else {
            return Ok(None);
        };
        match parse_startup(&packet)? {
            StartupRequest::SslRequest => negotiate_tls(proxy, client).await?,
            StartupRequest::GssEncRequest => client.send(b"N").await?,
            StartupRequest::Cancel { pid, secret } => {
                handle_cancel(proxy, pid, secret).await;
                return Err(Early::Cancel);
            }
            StartupRequest::Startup(m) => break m,
        }
    };
    if proxy.settings.tls_mode == TlsMode::Required && !client.stream.is_tls() {
        return Err(SessionEnd::fatal(
            SqlState::INVALID_AUTHORIZATION,
            "this proxy requires TLS: connect with sslmode=require (or stronger)",
        )
        .into());
    }

    // 2. Startup parameters.
    let user = startup.get("user").unwrap_or_default().to_owned();
    let database = startup.get("database").filter(|d| !d.is_empty()).unwrap_or(&user).to_owned();
    let Screened { forwarded, unsupported, operator_only } = screen_params(&startup)?;
    let mut out = BytesMut::new();
    if startup.minor > 0 || !unsupported.is_empty() {
        backend::negotiate_protocol_version(&mut out, unsupported);
    }
    tracing::Span::current().record("user", user.as_str());

    // 3. The API key, as a cleartext password (the connection is expected to be TLS).
    backend::auth_cleartext_request(&mut out);
    client.send(&out).await?;
    let frame = client.read_expected(b'p', MAX_AUTH_MESSAGE, "a password message").await?;
    let presented = decode_password(&frame.body)?;
    let key_hash = KeyHash::of(presented);
    let key_prefix = display_prefix(presented);
    tracing::Span::current().record("key", key_prefix.as_str());
    let record = match proxy.keys.lookup(&key_hash).await {
        Ok(KeyStatus::Valid(r)) if r.caller.is_operator() && !proxy.current().operator_keys => {
            Err("operator key presented but operator keys are disabled")
        }
        Ok(KeyStatus::Valid(r)) => Ok(r),
        Ok(other) => Err(other.reason()),
        Err(e) => {
            tracing::error!(error = %e, "key store lookup failed");
            return Err(SessionEnd::fatal(
                SqlState::CANNOT_CONNECT_NOW,
                "the proxy cannot verify keys right now: key store unavailable",
            )
            .into());
        }
    };
    let record = match record {
        Ok(r) => r,
        Err(reason) => {
            proxy.metrics.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let delay = proxy.throttle.record_failure(peer.ip(), &key_prefix);
            tracing::warn!(reason, delay_ms = delay.as_millis() as u64, "authentication failed");
            tokio::time::sleep(delay).await;
            return Err(SessionEnd::fatal(
                SqlState::INVALID_PASSWORD,
                format!("password authentication failed for user \"{user}\""),
            )
            .into());
        }
    };
    let caller = record.caller.clone();
    // Fail closed: no deployed policy set, no session for that environment.
    if let Caller::Environment(actor) = &caller
        && !proxy.policy_set(actor.environment).is_deployed()
    {
        tracing::warn!(environment = %actor.environment, "key refused: no policy set is deployed for its environment");
        return Err(SessionEnd::fatal(
            SqlState::INVALID_AUTHORIZATION,
            crate::rewrite::engine::not_deployed_message(actor.environment),
        )
        .into());
    }
    // A production key needs an upstream role without holes (`struere-proxy doctor`).
    if let Caller::Environment(actor) = &caller
        && actor.environment == Environment::Production
        && proxy.refuses_production()
    {
        tracing::warn!("production key refused: the upstream role has holes");
        return Err(SessionEnd::fatal(SqlState::INVALID_AUTHORIZATION, crate::server::PRODUCTION_REFUSED).into());
    }
    proxy.keys.touch(record.id);
    let Some(key_slot) = proxy.take_key_slot(&record, peer) else {
        let limit = proxy.current().max_connections_per_key;
        tracing::warn!(limit, "key refused: too many sessions");
        return Err(SessionEnd::fatal(
            SqlState::TOO_MANY_CONNECTIONS,
            format!("too many connections for this key (max_connections_per_key = {limit})"),
        )
        .into());
    };

    // 4. The database: environment keys only reach the configured one.
    if !caller.is_operator() && database != proxy.settings.database {
        return Err(SessionEnd::fatal(
            SqlState::INVALID_CATALOG_NAME,
            format!("database \"{database}\" is not served by this proxy (use \"{}\")", proxy.settings.database),
        )
        .into());
    }

    // 5. Upstream: environment keys use the least-privilege role, operator keys the owner role.
    let target = if caller.is_operator() { &proxy.admin_upstream } else { &proxy.upstream };
    // An environment key's text is parsed as UTF-8, so another encoding is refused, and so is
    // any setting that could change what a statement means. Operator keys' statements go as
    // sent: their client keeps its own encoding, `options` and settings, which win over the
    // proxy's pins as they would over the server's defaults.
    let mut params = forwarded;
    let mut client_encoding = "UTF8".to_owned();
    match &caller {
        Caller::Environment(_) => {
            if let Some((_, _, reason)) = operator_only.first() {
                return Err(SessionEnd::fatal(SqlState::INSUFFICIENT_PRIVILEGE, format!("refused: {reason}")).into());
            }
        }
        Caller::Operator => {
            for (name, value, _) in operator_only {
                if name.eq_ignore_ascii_case("client_encoding") {
                    client_encoding = value;
                } else {
                    params.push((name, value));
                }
            }
        }
    }
    let client_set: Vec<String> = params
        .iter()
        .flat_map(|(name, value)| {
            if name.eq_ignore_ascii_case("options") {
                crate::protocol::startup::options_settings(value)
            } else {
                vec![name.to_ascii_lowercase()]
            }
        })
        .collect();
    let pinned = pinned_params(proxy, &caller, client_encoding);
    params.extend(pinned.into_iter().filter(|(name, _)| !(caller.is_operator() && client_set.contains(name))));
    if let Caller::Environment(actor) = &caller {
        proxy.ensure_scratch_schema(actor).await;
    }
    // Environment sessions take a pooled connection of the same key when there is one.
    let pool_key = (!caller.is_operator() && proxy.pool.enabled())
        .then(|| PoolKey::new(format!("{}@{}:{}", target.user, target.host, target.port), &database, &params));
    let pooled = match &pool_key {
        Some(key) => proxy.pool.take(key).await,
        None => None,
    };
    let (upstream, notices) = match pooled {
        Some(conn) => (conn, Vec::new()),
        None => {
            proxy.pool.connected();
            upstream::connect_with_notices(target, &database, &params, proxy.current().connect_timeout)
                .await
                .map_err(upstream_failure)?
        }
    };
    let cancel = proxy.cancels.register_preferring(
        Arc::clone(target),
        upstream.backend_pid,
        upstream.backend_secret,
        caller.is_operator().then_some(upstream.backend_pid),
    );

    // 6. Tell the client it is in, as the server would.
    let mut out = BytesMut::new();
    backend::auth_ok(&mut out);
    for (name, value) in &upstream.parameters {
        backend::parameter_status(&mut out, name, value);
    }
    backend::backend_key_data(&mut out, cancel.pid, cancel.secret);
    // The server's startup notices (a fresh connection's), where the server would send them.
    for body in &notices {
        backend::raw_message(&mut out, b'N', body);
    }
    backend::ready_for_query(&mut out, upstream.transaction_status);
    client.send(&out).await?;
    tracing::info!(operator = caller.is_operator(), %database, "session started");
    Ok(Some(Admitted { upstream, caller, key_hash, key_prefix, cancel, pool_key, key_slot }))
}

/// The client's startup parameters, screened before the key is known.
struct Screened {
    /// Forwarded upstream.
    forwarded: Vec<(String, String)>,
    /// `_pq_.` options, reported as unsupported.
    unsupported: Vec<String>,
    /// Parameters only an operator key may send (a `client_encoding` other than UTF8, `options`,
    /// any other server setting) and why an environment key may not: forwarded for operator
    /// keys, refused for environment keys once the key is known.
    operator_only: Vec<(String, String, String)>,
}

/// Screen the client's startup parameters; any refused parameter ends the session.
fn screen_params(m: &StartupMessage) -> Result<Screened, SessionEnd> {
    let mut forwarded = Vec::new();
    let mut unsupported = Vec::new();
    let mut operator_only = Vec::new();
    for (name, value) in &m.params {
        match classify_param(name, value) {
            ParamVerdict::Forward => forwarded.push((name.clone(), value.clone())),
            ParamVerdict::Consume => {}
            ParamVerdict::ProtocolOption => unsupported.push(name.clone()),
            ParamVerdict::OperatorOnly(reason) => operator_only.push((name.clone(), value.clone(), reason)),
            ParamVerdict::Refuse(reason) => {
                return Err(SessionEnd::fatal(SqlState::INSUFFICIENT_PRIVILEGE, format!("refused: {reason}")));
            }
        }
    }
    Ok(Screened { forwarded, unsupported, operator_only })
}

async fn negotiate_tls(proxy: &Proxy, client: &mut ClientConn) -> Result<(), SessionEnd> {
    if client.stream.is_tls() {
        return Err(SessionEnd::fatal(SqlState::PROTOCOL_VIOLATION, "SSLRequest received inside TLS"));
    }
    let Some(acceptor) = proxy.tls.as_ref() else {
        return client.send(b"N").await;
    };
    // Bytes sent after SSLRequest but before the handshake would be read as if they came over
    // TLS (CVE-2021-23214): refuse them.
    if !client.buf.is_empty() {
        return Err(SessionEnd::fatal(SqlState::PROTOCOL_VIOLATION, "data received before the TLS handshake"));
    }
    client.send(b"S").await?;
    let ClientStream::Plain(tcp) = std::mem::replace(&mut client.stream, ClientStream::Detached) else {
        return Err(SessionEnd::fatal(SqlState::PROTOCOL_VIOLATION, "SSLRequest on a detached stream"));
    };
    let tls = acceptor.accept(tcp).await?;
    client.stream = ClientStream::Tls(Box::new(tls));
    Ok(())
}

/// The TLS record type of a handshake message: no PostgreSQL startup packet starts with it (its
/// first byte is the high byte of a length, at most 0x00 for any packet the proxy accepts).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Whether a plain connection's first byte starts a TLS record (PostgreSQL 17's
/// `sslnegotiation=direct`). Peeked, so a startup packet is read as usual.
async fn opens_with_tls(client: &ClientConn) -> Result<bool, SessionEnd> {
    let ClientStream::Plain(tcp) = &client.stream else { return Ok(false) };
    if !client.buf.is_empty() {
        return Ok(false);
    }
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await?;
    Ok(n == 1 && first[0] == TLS_HANDSHAKE_RECORD)
}

/// Direct TLS: the handshake starts at once, and (as PostgreSQL requires) the client must have
/// negotiated the `postgresql` ALPN protocol; otherwise the connection is closed, since a
/// plaintext error could not be read by a TLS client.
async fn direct_tls(proxy: &Proxy, client: &mut ClientConn) -> Result<(), SessionEnd> {
    let Some(acceptor) = proxy.tls.as_ref() else {
        tracing::info!("direct TLS connection without a configured certificate: closed");
        return Err(SessionEnd::ClientClosed);
    };
    let ClientStream::Plain(tcp) = std::mem::replace(&mut client.stream, ClientStream::Detached) else {
        return Err(SessionEnd::ClientClosed);
    };
    let tls = acceptor.accept(tcp).await?;
    if tls.get_ref().1.alpn_protocol() != Some(crate::net::tls::POSTGRESQL_ALPN) {
        tracing::info!("direct TLS connection without the postgresql ALPN protocol: closed");
        return Err(SessionEnd::ClientClosed);
    }
    client.stream = ClientStream::Tls(Box::new(tls));
    Ok(())
}

async fn handle_cancel(proxy: &Proxy, pid: i32, secret: i32) {
    match proxy.cancels.cancel(pid, secret) {
        Some(cancel) => {
            tracing::info!(pid, "cancel request forwarded");
            if let Err(e) = cancel.await {
                tracing::warn!(error = %e, "cancel request failed");
            }
        }
        // A wrong pid or secret does nothing, and says nothing (as the server does).
        None => tracing::warn!(pid, "cancel request with an unknown key ignored"),
    }
}

/// How a failed upstream connection is reported to the client.
fn upstream_failure(e: UpstreamError) -> SessionEnd {
    match e {
        UpstreamError::Server(s) => SessionEnd::relayed(&s.code, s.message),
        other => {
            tracing::error!(error = %other, "upstream connection failed");
            SessionEnd::fatal(SqlState::CANNOT_CONNECT_NOW, format!("upstream database unavailable: {other}"))
        }
    }
}
