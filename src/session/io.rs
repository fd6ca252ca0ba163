//! Buffered, framed reading from the client. Partial bytes live in the struct, so a read that is
//! cancelled by `select!` loses nothing (cancel safety).

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::SessionEnd;
use crate::net::stream::ClientStream;
use crate::protocol::frame::{self, Frame};

pub struct ClientConn {
    pub stream: ClientStream,
    pub buf: BytesMut,
    pub max_message: usize,
}

impl ClientConn {
    pub fn new(stream: ClientStream, max_message: usize) -> ClientConn {
        ClientConn { stream, buf: BytesMut::with_capacity(8192), max_message }
    }

    /// Read one untyped startup packet body. `Ok(None)` on a clean EOF before any byte. A
    /// length PostgreSQL would not read as a startup packet's ends the connection unheard, as
    /// PostgreSQL does (its "invalid length of startup packet" is logged, not sent): a client
    /// that wrote Terminate before its startup packet (node-postgres' `connect(); end()`) sees a
    /// clean close, not an error.
    pub async fn read_startup(&mut self) -> Result<Option<Bytes>, SessionEnd> {
        loop {
            let packet = frame::split_startup(&mut self.buf)
                .map_err(|e| SessionEnd::Unheard(format!("invalid startup packet: {e}")))?;
            if let Some(p) = packet {
                return Ok(Some(p));
            }
            if self.fill().await? == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(SessionEnd::ClientClosed) };
            }
        }
    }

    /// Read one message that must have type `tag` and at most `max_body` bytes: used before
    /// authentication, so an unauthenticated client can make the proxy hold at most that much
    /// (PostgreSQL allows 64 KiB for an authentication message) and a wrong type is refused on
    /// its first byte.
    pub async fn read_expected(&mut self, tag: u8, max_body: usize, what: &str) -> Result<Frame, SessionEnd> {
        loop {
            if let Some(&first) = self.buf.first()
                && first != tag
            {
                return Err(SessionEnd::fatal(
                    crate::protocol::sqlstate::SqlState::PROTOCOL_VIOLATION,
                    format!("protocol violation: expected {what}"),
                ));
            }
            if let Some(f) = frame::split_frontend(&mut self.buf, max_body)? {
                return Ok(f);
            }
            self.fill_or_closed().await?;
        }
    }

    /// The next complete frame already buffered, without reading.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, SessionEnd> {
        Ok(frame::split_frontend(&mut self.buf, self.max_message)?)
    }

    /// Read one typed frontend message; EOF is `ClientClosed`.
    pub async fn read_frame(&mut self) -> Result<Frame, SessionEnd> {
        loop {
            if let Some(f) = self.buffered_frame()? {
                return Ok(f);
            }
            self.fill_or_closed().await?;
        }
    }

    /// Read more bytes into the buffer; EOF is `ClientClosed`. Cancel safe.
    pub async fn fill_or_closed(&mut self) -> Result<usize, SessionEnd> {
        match self.fill().await? {
            0 => Err(SessionEnd::ClientClosed),
            n => Ok(n),
        }
    }

    async fn fill(&mut self) -> Result<usize, SessionEnd> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8192);
        }
        Ok(self.stream.read_buf(&mut self.buf).await?)
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionEnd> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }
}
