//! The startup handshake with the upstream server, as one linear function: TCP → SSL
//! negotiation → StartupMessage → authentication → parameters until ReadyForQuery. Plus the
//! out-of-band CancelRequest.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::wire::{self, AuthRequest, Frame};
use super::{UpstreamConfig, UpstreamConn, UpstreamError, UpstreamStream, UpstreamTls, tls};

/// How long `send_cancel` may take in all.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);
/// How much the read buffer grows by per read.
const READ_CHUNK: usize = 8 * 1024;
/// Startup parameters a caller may not set: they would change who logs in, or the protocol.
const RESERVED_PARAMETERS: [&str; 3] = ["user", "database", "replication"];

/// Connects to the upstream server and logs in, returning the stream positioned right after the
/// first ReadyForQuery.
///
/// `database` overrides `cfg.database`. `params` are extra startup parameters sent verbatim after
/// `user` and `database` (protocol 3.0); `user`, `database` and `replication` are refused there.
/// `timeout` bounds the whole handshake, DNS and TCP connect included.
pub async fn connect(
    cfg: &UpstreamConfig,
    database: &str,
    params: &[(String, String)],
    timeout: Duration,
) -> Result<UpstreamConn, UpstreamError> {
    connect_with_notices(cfg, database, params, timeout).await.map(|(conn, _)| conn)
}

/// [`connect`], also returning the bodies of the NoticeResponses the server sent between
/// AuthenticationOk and ReadyForQuery (e.g. a truncated `application_name`), which a client
/// connecting directly would have seen.
pub async fn connect_with_notices(
    cfg: &UpstreamConfig,
    database: &str,
    params: &[(String, String)],
    timeout: Duration,
) -> Result<(UpstreamConn, Vec<bytes::Bytes>), UpstreamError> {
    let startup = startup_message(&cfg.user, database, params)?;
    tokio::time::timeout(timeout, handshake(cfg, &startup)).await.map_err(|_| UpstreamError::Timeout)?
}

/// Asks the server to cancel the query running in backend `pid`, on a new connection, and waits
/// until the server has closed it (as libpq does: the close means the request was processed).
///
/// Plain TCP unless `cfg.tls` is `Require`, then SSLRequest first. Bounded by 10 seconds.
pub async fn send_cancel(cfg: &UpstreamConfig, pid: i32, secret: i32) -> Result<(), UpstreamError> {
    let cancel = async {
        let tls = match cfg.tls {
            UpstreamTls::Require => UpstreamTls::Require,
            UpstreamTls::Prefer | UpstreamTls::Disable => UpstreamTls::Disable,
        };
        let mut stream = open(cfg, tls).await?;
        let mut buf = BytesMut::new();
        frontend::cancel_request(pid, secret, &mut buf);
        stream.write_all(&buf).await?;
        stream.flush().await?;
        // The server answers nothing and closes. Any read error after the request went out
        // (a TLS peer closing without close_notify, a reset) also means it is done with us.
        let mut sink = [0u8; 64];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
        Ok(())
    };
    tokio::time::timeout(CANCEL_TIMEOUT, cancel).await.map_err(|_| UpstreamError::Timeout)?
}

/// Encodes the StartupMessage, refusing parameters that cannot be sent safely.
fn startup_message(user: &str, database: &str, params: &[(String, String)]) -> Result<BytesMut, UpstreamError> {
    for (name, _) in params {
        if name.is_empty() {
            // An empty name would end the parameter list early on the server.
            return Err(UpstreamError::Config("empty startup parameter name".into()));
        }
        if RESERVED_PARAMETERS.contains(&name.as_str()) {
            return Err(UpstreamError::Config(format!("startup parameter {name:?} may not be overridden")));
        }
    }
    let pairs = [("user", user), ("database", database)]
        .into_iter()
        .chain(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut buf = BytesMut::new();
    frontend::startup_message(pairs, &mut buf)
        .map_err(|e| UpstreamError::Config(format!("startup parameters: {e}")))?;
    Ok(buf)
}

async fn handshake(cfg: &UpstreamConfig, startup: &[u8]) -> Result<(UpstreamConn, Vec<bytes::Bytes>), UpstreamError> {
    let stream = open(cfg, cfg.tls).await?;
    let mut wire = Wire { stream, read_buf: BytesMut::with_capacity(READ_CHUNK) };
    wire.send(startup).await?;
    authenticate(&mut wire, cfg).await?;
    read_session_info(wire).await
}

/// Opens TCP and negotiates TLS per `tls`.
async fn open(cfg: &UpstreamConfig, tls: UpstreamTls) -> Result<UpstreamStream, UpstreamError> {
    let mut tcp = TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
    tcp.set_nodelay(true)?;
    if tls == UpstreamTls::Disable {
        return Ok(UpstreamStream::Plain(tcp));
    }
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    // Exactly one byte: anything the server sent beyond it before the TLS handshake would be
    // unauthenticated plaintext (CVE-2021-23222), so none of it may be buffered.
    match tcp.read_u8().await? {
        b'S' => Ok(UpstreamStream::Tls(Box::new(tls::handshake(tcp, &cfg.host).await?))),
        b'N' if tls == UpstreamTls::Prefer => Ok(UpstreamStream::Plain(tcp)),
        b'N' => Err(UpstreamError::Tls("the server does not accept TLS connections (sslmode=require)".into())),
        b'E' => {
            // An ErrorResponse instead of an answer (a server refusing connections outright).
            let mut wire = Wire { stream: UpstreamStream::Plain(tcp), read_buf: BytesMut::from(&b"E"[..]) };
            let frame = wire.recv().await?;
            Err(UpstreamError::Server(wire::parse_error_response(&frame.body)?))
        }
        other => Err(UpstreamError::Protocol(format!("answer {} to SSLRequest", wire::printable(other)))),
    }
}

/// Runs the authentication exchange until AuthenticationOk.
async fn authenticate(wire: &mut Wire, cfg: &UpstreamConfig) -> Result<(), UpstreamError> {
    loop {
        let frame = wire.recv().await?;
        match frame.tag {
            b'R' => match wire::parse_auth(&frame.body)? {
                AuthRequest::Ok => return Ok(()),
                AuthRequest::Cleartext => {
                    let mut buf = BytesMut::new();
                    frontend::password_message(password(cfg)?.as_bytes(), &mut buf).map_err(unencodable)?;
                    wire.send(&buf).await?;
                }
                AuthRequest::Md5 { salt } => {
                    let hash = md5_hash(cfg.user.as_bytes(), password(cfg)?.as_bytes(), salt);
                    let mut buf = BytesMut::new();
                    frontend::password_message(hash.as_bytes(), &mut buf).map_err(unencodable)?;
                    wire.send(&buf).await?;
                }
                AuthRequest::Sasl { mechanisms } => {
                    let mechanism = choose_scram(&mechanisms)?;
                    scram_exchange(wire, cfg, mechanism).await?;
                }
                AuthRequest::SaslContinue(_) | AuthRequest::SaslFinal(_) => {
                    return Err(UpstreamError::Protocol("SASL message outside a SASL exchange".into()));
                }
                AuthRequest::Other(code) => {
                    return Err(UpstreamError::Auth(format!(
                        "the server asks for {} (authentication request {code}), which is not supported",
                        auth_method_name(code)
                    )));
                }
            },
            b'E' => return Err(server_error(&frame)?),
            b'N' => {}
            // Sent when the server ignores `_pq_.` startup options; it then carries on.
            b'v' => {
                let (minor, unknown) = wire::parse_negotiate_protocol_version(&frame.body)?;
                tracing::debug!(minor, ?unknown, "upstream ignored startup options");
            }
            other => return Err(unexpected(other, "authentication")),
        }
    }
}

/// Picks SCRAM-SHA-256 from the offered mechanisms. Channel binding is not implemented, so a
/// server offering only the -PLUS variant is refused.
fn choose_scram(mechanisms: &[&str]) -> Result<&'static str, UpstreamError> {
    if mechanisms.contains(&SCRAM_SHA_256) {
        Ok(SCRAM_SHA_256)
    } else if mechanisms.contains(&SCRAM_SHA_256_PLUS) {
        Err(UpstreamError::Auth(
            "the server only offers SCRAM-SHA-256-PLUS (channel binding), which is not supported".into(),
        ))
    } else {
        Err(UpstreamError::Auth(format!("no supported SASL mechanism among {mechanisms:?}")))
    }
}

/// SASLInitialResponse → SASLContinue → SASLResponse → SASLFinal. The server's final message
/// is verified, so a server that does not know the password cannot pretend it does.
async fn scram_exchange(wire: &mut Wire, cfg: &UpstreamConfig, mechanism: &str) -> Result<(), UpstreamError> {
    let mut scram = ScramSha256::new(password(cfg)?.as_bytes(), ChannelBinding::unsupported());
    let mut buf = BytesMut::new();
    frontend::sasl_initial_response(mechanism, scram.message(), &mut buf).map_err(unencodable)?;
    wire.send(&buf).await?;

    let frame = wire.recv_auth().await?;
    match wire::parse_auth(&frame.body)? {
        AuthRequest::SaslContinue(data) => {
            scram.update(data).map_err(|e| UpstreamError::Auth(format!("SCRAM: {e}")))?
        }
        _ => return Err(UpstreamError::Protocol("expected SASLContinue".into())),
    }
    buf.clear();
    frontend::sasl_response(scram.message(), &mut buf).map_err(unencodable)?;
    wire.send(&buf).await?;

    let frame = wire.recv_auth().await?;
    match wire::parse_auth(&frame.body)? {
        AuthRequest::SaslFinal(data) => {
            scram.finish(data).map_err(|e| UpstreamError::Auth(format!("SCRAM server verification: {e}")))
        }
        _ => Err(UpstreamError::Protocol("expected SASLFinal".into())),
    }
}

/// After AuthenticationOk: ParameterStatus and BackendKeyData until ReadyForQuery.
async fn read_session_info(mut wire: Wire) -> Result<(UpstreamConn, Vec<bytes::Bytes>), UpstreamError> {
    let mut parameters = Vec::new();
    let mut key = None;
    let mut notices = Vec::new();
    loop {
        let frame = wire.recv().await?;
        match frame.tag {
            b'S' => parameters.push(wire::parse_parameter_status(&frame.body)?),
            b'K' => key = Some(wire::parse_backend_key(&frame.body)?),
            b'N' => notices.push(frame.body),
            b'E' => return Err(server_error(&frame)?),
            b'Z' => {
                let transaction_status = wire::parse_ready_for_query(&frame.body)?;
                // No BackendKeyData (some poolers): 0/0, and cancel is impossible.
                let (backend_pid, backend_secret) = key.unwrap_or((0, 0));
                let conn = UpstreamConn {
                    stream: wire.stream,
                    parameters,
                    backend_pid,
                    backend_secret,
                    transaction_status,
                    read_buf: wire.read_buf,
                };
                return Ok((conn, notices));
            }
            other => return Err(unexpected(other, "startup")),
        }
    }
}

fn password(cfg: &UpstreamConfig) -> Result<&str, UpstreamError> {
    cfg.password
        .as_deref()
        .ok_or_else(|| UpstreamError::Auth("the server asks for a password but none is configured".into()))
}

/// The frontend encoders fail only on a NUL inside a string (a password, say): a config problem.
fn unencodable(e: io::Error) -> UpstreamError {
    UpstreamError::Config(format!("cannot encode message: {e}"))
}

fn server_error(frame: &Frame) -> Result<UpstreamError, UpstreamError> {
    Ok(UpstreamError::Server(wire::parse_error_response(&frame.body)?))
}

fn unexpected(tag: u8, phase: &str) -> UpstreamError {
    UpstreamError::Protocol(format!("unexpected message {} during {phase}", wire::printable(tag)))
}

fn auth_method_name(code: i32) -> &'static str {
    match code {
        2 => "Kerberos V5",
        6 => "SCM credentials",
        7 | 8 => "GSSAPI",
        9 => "SSPI",
        _ => "an unknown method",
    }
}

/// The stream plus the bytes read from it but not yet consumed.
struct Wire {
    stream: UpstreamStream,
    read_buf: BytesMut,
}

impl Wire {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        self.stream.write_all(bytes).await?;
        // TLS buffers records until flushed.
        self.stream.flush().await?;
        Ok(())
    }

    /// The next complete message. Bytes after it stay in `read_buf`.
    async fn recv(&mut self) -> Result<Frame, UpstreamError> {
        loop {
            if let Some(frame) = wire::split_frame(&mut self.read_buf)? {
                return Ok(frame);
            }
            self.read_buf.reserve(READ_CHUNK);
            if self.stream.read_buf(&mut self.read_buf).await? == 0 {
                return Err(UpstreamError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during startup",
                )));
            }
        }
    }

    /// The next Authentication message of a SASL exchange; an ErrorResponse becomes `Server`.
    async fn recv_auth(&mut self) -> Result<Frame, UpstreamError> {
        let frame = self.recv().await?;
        match frame.tag {
            b'R' => Ok(frame),
            b'E' => Err(server_error(&frame)?),
            other => Err(unexpected(other, "SASL authentication")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_message_layout() {
        let buf = startup_message("app", "db", &[("application_name".into(), "proxy".into())]).unwrap();
        let mut expected = Vec::new();
        expected.extend_from_slice(&[0, 3, 0, 0]);
        expected.extend_from_slice(b"user\0app\0database\0db\0application_name\0proxy\0\0");
        let len = u32::try_from(expected.len() + 4).unwrap().to_be_bytes();
        assert_eq!(&buf[..4], &len);
        assert_eq!(&buf[4..], &expected[..]);
    }

    #[test]
    fn startup_message_refuses_unsafe_parameters() {
        for (name, value) in [
            ("user", "postgres"),
            ("database", "other"),
            ("replication", "database"),
            ("", "x"),
            ("a\0b", "x"),
            ("options", "x\0y"),
        ] {
            let params = [(name.to_string(), value.to_string())];
            assert!(matches!(startup_message("app", "db", &params), Err(UpstreamError::Config(_))), "{name:?}");
        }
        assert!(matches!(startup_message("a\0pp", "db", &[]), Err(UpstreamError::Config(_))));
    }

    #[test]
    fn scram_choice() {
        assert_eq!(choose_scram(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]).unwrap(), "SCRAM-SHA-256");
        let err = choose_scram(&["SCRAM-SHA-256-PLUS"]).unwrap_err();
        assert!(err.to_string().contains("SCRAM-SHA-256-PLUS"), "{err}");
        assert!(matches!(choose_scram(&[]), Err(UpstreamError::Auth(_))));
    }
}
