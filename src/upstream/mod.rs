//! The proxy's own connection to the real database: a raw protocol client that performs the
//! startup handshake (TLS, authentication, session parameters) and then hands over the stream,
//! so the proxy can relay protocol bytes as they are.
//!
//! - `config`: `UpstreamConfig` from a libpq-style URL.
//! - `connect`: the handshake and the out-of-band CancelRequest.
//! - `stream`: plain-or-TLS `UpstreamStream`.
//! - `tls`: `sslmode=require`-style TLS (encrypted, certificate not verified).
//! - `wire`: strict framing and decoding of the server's startup messages.
//! - `error`: `UpstreamError`, `ServerError`.

mod config;
mod connect;
mod error;
mod stream;
pub mod tls;
mod wire;

#[cfg(test)]
mod tests;

use std::fmt;

pub use config::{UpstreamConfig, UpstreamTls};
pub use connect::{connect, connect_with_notices, send_cancel};
pub use error::{ServerError, UpstreamError};
pub use stream::UpstreamStream;

/// A logged-in upstream connection, positioned right after its first ReadyForQuery.
pub struct UpstreamConn {
    pub stream: UpstreamStream,
    /// Every ParameterStatus of the startup, in the order received.
    pub parameters: Vec<(String, String)>,
    /// From BackendKeyData; both 0 if the server sent none.
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// From the first ReadyForQuery (normally `b'I'`).
    pub transaction_status: u8,
    /// Bytes read past that ReadyForQuery (normally empty): the relay continues from here.
    pub read_buf: bytes::BytesMut,
}

impl UpstreamConn {
    /// The last value the server reported for a parameter, e.g. `server_version`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

// By hand: the cancel secret stays out of logs.
impl fmt::Debug for UpstreamConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConn")
            .field("tls", &self.stream.is_tls())
            .field("parameters", &self.parameters)
            .field("backend_pid", &self.backend_pid)
            .field("transaction_status", &char::from(self.transaction_status))
            .field("read_buf_len", &self.read_buf.len())
            .finish_non_exhaustive()
    }
}
