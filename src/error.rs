//! Errors that end a session, and how they reach the client: one mapping to SQLSTATE, here.

use thiserror::Error;

use crate::protocol::frame::FrameError;
use crate::protocol::frontend::DecodeError;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::StartupError;

/// Why a session ends. `Fatal` ones are reported to the client as a FATAL ErrorResponse first;
/// the others close the socket (there is nobody left to tell, or telling would help an attacker
/// no more than silence).
#[derive(Debug, Error)]
pub enum SessionEnd {
    /// `code` is a SQLSTATE: one of the proxy's own, or one relayed from the server.
    #[error("{message}")]
    Fatal { code: String, message: String },
    #[error("client closed the connection")]
    ClientClosed,
    /// Ended without a further word to the client, as PostgreSQL ends it: the server already
    /// sent its own FATAL (relayed as it came), or the first bytes were not a startup packet
    /// (PostgreSQL's "invalid length of startup packet" is only logged, never sent).
    #[error("{0}")]
    Unheard(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl SessionEnd {
    pub fn fatal(code: SqlState, message: impl Into<String>) -> SessionEnd {
        SessionEnd::Fatal { code: code.code().to_owned(), message: message.into() }
    }
}

impl SessionEnd {
    /// End the session with an error the server reported (its SQLSTATE kept).
    pub fn relayed(code: &str, message: impl Into<String>) -> SessionEnd {
        SessionEnd::Fatal { code: code.to_owned(), message: message.into() }
    }
}

impl From<FrameError> for SessionEnd {
    fn from(e: FrameError) -> Self {
        let code = match e {
            FrameError::TooLarge { .. } => SqlState::PROGRAM_LIMIT_EXCEEDED,
            _ => SqlState::PROTOCOL_VIOLATION,
        };
        SessionEnd::fatal(code, format!("protocol violation: {e}"))
    }
}

impl From<DecodeError> for SessionEnd {
    fn from(e: DecodeError) -> Self {
        SessionEnd::fatal(SqlState::PROTOCOL_VIOLATION, format!("protocol violation: {e}"))
    }
}

impl From<StartupError> for SessionEnd {
    fn from(e: StartupError) -> Self {
        let code = match e {
            StartupError::UnsupportedProtocol(..) => SqlState::FEATURE_NOT_SUPPORTED,
            _ => SqlState::PROTOCOL_VIOLATION,
        };
        SessionEnd::fatal(code, e.to_string())
    }
}
