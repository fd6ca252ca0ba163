//! One client connection, from the first byte to the last: `handshake` (linear startup and
//! authentication), then `relay` (the steady state), with `refusal` keeping refusals in step
//! and `statements` keeping repeated rewritten statements prepared upstream.

pub mod handshake;
pub mod io;
pub mod refusal;
pub mod relay;
pub mod statements;
mod woken;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::error::SessionEnd;
use crate::net::stream::ClientStream;
use crate::protocol::backend::{self, Severity};
use crate::protocol::sqlstate::SqlState;
use crate::server::Proxy;
use handshake::Outcome;
use io::ClientConn;

/// Serve one client connection. Never panics on client input; every way out is logged.
pub async fn serve(proxy: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let span = tracing::info_span!("conn", %peer, user = tracing::field::Empty, key = tracing::field::Empty);
    async move {
        let client = ClientConn::new(ClientStream::Plain(tcp), proxy.current().max_message_size);
        let result = run(&proxy, client, peer).await;
        match result {
            Ok(()) | Err(SessionEnd::ClientClosed) => tracing::debug!("connection closed"),
            Err(e) => tracing::info!(reason = %e, "connection ended"),
        }
    }
    .instrument(span)
    .await
}

async fn run(proxy: &Arc<Proxy>, client: ClientConn, peer: SocketAddr) -> Result<(), SessionEnd> {
    // The startup phase has a deadline, so idle half-open connections cannot pile up.
    let handshake = tokio::time::timeout(proxy.current().connect_timeout * 3, handshake::run(proxy, client, peer));
    match handshake.await {
        Err(_) => Err(SessionEnd::fatal(SqlState::PROTOCOL_VIOLATION, "startup timed out")),
        Ok(Ok(Outcome::Session(est))) => relay::run(proxy, *est).await,
        Ok(Ok(Outcome::CancelHandled | Outcome::Closed)) => Ok(()),
        Ok(Err(e)) => Err(e),
    }
}

/// Encode a FATAL error for the startup phase.
pub fn fatal_bytes(end: &SessionEnd) -> Option<BytesMut> {
    match end {
        SessionEnd::Fatal { code, message } => {
            let mut out = BytesMut::new();
            backend::error_response_code(&mut out, Severity::Fatal, code, message, None);
            Some(out)
        }
        _ => None,
    }
}
