//! What can go wrong talking to the upstream server, and the server's own error report.

use std::fmt;
use std::io;

/// An ErrorResponse the server sent during startup, reduced to the fields callers act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// The non-localized severity (`V` field) when present, else the localized one (`S`).
    pub severity: String,
    /// The SQLSTATE (`C` field).
    pub code: String,
    /// The primary message (`M` field).
    pub message: String,
    /// The detail (`D` field), if any.
    pub detail: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (SQLSTATE {})", self.severity, self.message, self.code)?;
        if let Some(detail) = &self.detail {
            write!(f, "; {detail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// Why connecting to, authenticating with or cancelling on the upstream server failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection failed or broke (including the server closing it mid-handshake).
    #[error("cannot reach upstream: {0}")]
    Io(#[from] io::Error),
    /// TLS was required but refused, or the TLS handshake failed.
    #[error("upstream TLS failed: {0}")]
    Tls(String),
    /// The client side of authentication could not proceed (method unsupported, no password,
    /// SCRAM verification failed). A rejected password arrives as `Server` with 28P01.
    #[error("upstream authentication failed: {0}")]
    Auth(String),
    /// The server sent an ErrorResponse during startup.
    #[error("upstream refused the connection: {0}")]
    Server(ServerError),
    /// The server's bytes broke the protocol (bad framing, unexpected message, malformed body).
    #[error("upstream protocol violation: {0}")]
    Protocol(String),
    /// The handshake (or cancel) did not finish in time.
    #[error("upstream did not answer in time")]
    Timeout,
    /// The URL or the arguments are unusable.
    #[error("invalid upstream configuration: {0}")]
    Config(String),
}

impl UpstreamError {
    /// The server's SQLSTATE, when the server itself reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            UpstreamError::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}
