//! Splitting a byte stream into exactly one message at a time.
//!
//! This is the first thing client bytes meet. A length is checked against the limits before it is
//! trusted (PgBouncer's "don't believe nonsense"), a negative length is refused before any cast,
//! and a decoder is only ever handed the bytes of its own message.
//!
//! Invariant: no client-supplied length is used before it is checked against the limits, and a decoder never sees bytes
//! beyond its own message; malformed input is an error, never a panic.

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

/// PostgreSQL's own limit for a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// The largest message PostgreSQL will ever accept or send (1 GiB - 1).
pub const MAX_PROTOCOL_MESSAGE: usize = 0x3fff_ffff;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("unknown frontend message type {0:#04x}")]
    UnknownType(u8),
}

/// One complete typed message: `tag`, and `body` (the bytes after the length word).
/// `raw` keeps the whole message so it can be relayed without re-encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
    pub raw: Bytes,
}

/// The frontend message types a client may send after startup.
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(tag, b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'H' | b'X' | b'F' | b'd' | b'c' | b'f' | b'p')
}

/// The largest body a frontend message of this type may have. Messages that carry no payload
/// must be exactly empty; small fixed-shape ones get a small bound; payload-carrying messages
/// get the configured limit.
fn frontend_body_limit(tag: u8, configured: usize) -> usize {
    match tag {
        b'S' | b'H' | b'X' | b'c' => 0,
        b'D' | b'C' | b'E' | b'f' => MAX_STARTUP_PACKET.min(configured).max(1024),
        _ => configured,
    }
}

/// Split one typed frontend message off the front of `buf`, or `Ok(None)` if more bytes are needed.
/// On error the connection must be closed: the stream can no longer be trusted to be in step.
pub fn split_frontend(buf: &mut BytesMut, max_message: usize) -> Result<Option<Frame>, FrameError> {
    let total = frontend_message(buf, max_message)?.map(|m| m.raw.len());
    Ok(total.map(|total| split_off(buf, total)))
}

/// Split one backend message (tag + length + body). The server is trusted more than a client,
/// but its bytes are still never indexed blindly.
pub fn split_backend(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    let total = backend_message(buf)?.map(|m| m.raw.len());
    Ok(total.map(|total| split_off(buf, total)))
}

/// One complete typed message, read where it lies in the buffer: the relay's way, which hands
/// out no reference-counted handle per message (rows come one message each, and a prepared
/// statement's execution is three client messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub tag: u8,
    /// The bytes after the length word.
    pub body: &'a [u8],
    /// The whole message.
    pub raw: &'a [u8],
}

/// The frontend message at the front of `buf`, left there (the caller advances past
/// `raw.len()` bytes), or `Ok(None)` if more bytes are needed; checked as `split_frontend`
/// checks it (which splits off exactly this message).
pub fn frontend_message(buf: &mut BytesMut, max_message: usize) -> Result<Option<Message<'_>>, FrameError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    if !is_frontend_tag(tag) {
        return Err(FrameError::UnknownType(tag));
    }
    let limit = frontend_body_limit(tag, max_message);
    in_place(buf, limit)
}

/// The backend message at the front of `buf`, left there (the caller advances past
/// `raw.len()` bytes), or `Ok(None)` if more bytes are needed.
pub fn backend_message(buf: &mut BytesMut) -> Result<Option<Message<'_>>, FrameError> {
    in_place(buf, MAX_PROTOCOL_MESSAGE)
}

fn in_place(buf: &mut BytesMut, body_limit: usize) -> Result<Option<Message<'_>>, FrameError> {
    let Some(total) = complete_len(buf, body_limit)? else {
        return Ok(None);
    };
    let (Some(raw), Some(&tag)) = (buf.get(..total), buf.first()) else {
        return Ok(None);
    };
    Ok(Some(Message { tag, body: raw.get(5..).unwrap_or_default(), raw }))
}

/// The first `total` bytes of `buf` (a whole message `in_place` found) as a `Frame`.
fn split_off(buf: &mut BytesMut, total: usize) -> Frame {
    let raw = buf.split_to(total).freeze();
    Frame { tag: raw.first().copied().unwrap_or_default(), body: raw.slice(5..), raw }
}

/// The length of the typed message at the front of `buf` (tag, length word, body) once all of
/// it is there; `Ok(None)` while more bytes are needed (space for them is reserved).
fn complete_len(buf: &mut BytesMut, body_limit: usize) -> Result<Option<usize>, FrameError> {
    let Some(len_bytes) = buf.get(1..5) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    if len < 4 {
        return Err(FrameError::BadLength(i64::from(len)));
    }
    // `len` is positive and fits in usize on every platform tokio supports.
    let body_len = (len as usize) - 4;
    if body_len > body_limit {
        return Err(FrameError::TooLarge { len: body_len, limit: body_limit });
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        // Reserve now so a large message is read without repeated reallocation.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(total))
}

/// Split one untyped startup-phase packet (length word first, no tag): SSLRequest, GSSENCRequest,
/// CancelRequest or StartupMessage. Returns the packet body after the length word.
pub fn split_startup(buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    let Some(len_bytes) = buf.get(0..4) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    // A startup packet holds at least the 4-byte protocol code after the length word.
    if len < 8 {
        return Err(FrameError::BadLength(i64::from(len)));
    }
    let len = len as usize;
    if len > MAX_STARTUP_PACKET {
        return Err(FrameError::TooLarge { len, limit: MAX_STARTUP_PACKET });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    Ok(Some(packet.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(tag: u8, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&[tag]);
        b.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn splits_exactly_one_message() {
        let mut buf = msg(b'Q', b"SELECT 1\0");
        buf.extend_from_slice(&msg(b'S', b""));
        let f = split_frontend(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(&f.body[..], b"SELECT 1\0");
        let s = split_frontend(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(s.tag, b'S');
        assert!(buf.is_empty());
        assert_eq!(split_frontend(&mut buf, 1 << 20), Ok(None));
    }

    #[test]
    fn waits_for_partial_messages() {
        let full = msg(b'Q', b"SELECT 1\0");
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(split_frontend(&mut buf, 1 << 20), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn refuses_bad_lengths_and_types() {
        let mut neg = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(split_frontend(&mut neg, 100), Err(FrameError::BadLength(-1)));
        let mut short = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(split_frontend(&mut short, 100), Err(FrameError::BadLength(3)));
        let mut huge = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(split_frontend(&mut huge, 100), Err(FrameError::TooLarge { .. })));
        let mut unknown = msg(b'!', b"");
        assert_eq!(split_frontend(&mut unknown, 100), Err(FrameError::UnknownType(b'!')));
        // Sync carries no payload.
        let mut fat_sync = msg(b'S', b"x");
        assert!(matches!(split_frontend(&mut fat_sync, 100), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn backend_messages_are_read_in_place() {
        let mut buf = msg(b'D', b"\0\x01\0\0\0\x01x");
        buf.extend_from_slice(&msg(b'Z', b"I"));
        let first = backend_message(&mut buf).unwrap().unwrap();
        assert_eq!((first.tag, first.body, first.raw.len()), (b'D', &b"\0\x01\0\0\0\x01x"[..], 12));
        // Left in the buffer: the same message again until the caller advances.
        let len = first.raw.len();
        assert_eq!(backend_message(&mut buf).unwrap().map(|m| m.tag), Some(b'D'));
        buf.advance(len);
        let ready = backend_message(&mut buf).unwrap().unwrap();
        assert_eq!((ready.tag, ready.body), (b'Z', &b"I"[..]));
        let full = msg(b'C', b"SELECT 1\0");
        for cut in 0..full.len() {
            let mut partial = BytesMut::from(&full[..cut]);
            assert_eq!(backend_message(&mut partial), Ok(None), "cut at {cut}");
        }
        let mut neg = BytesMut::from(&[b'D', 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(backend_message(&mut neg), Err(FrameError::BadLength(-1)));
    }

    #[test]
    fn frontend_messages_are_read_in_place_and_checked_as_split() {
        let bind = b"\0s1\0\0\0\0\0\0\0";
        let mut buf = msg(b'B', bind);
        buf.extend_from_slice(&msg(b'S', b""));
        let first = frontend_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!((first.tag, first.body, first.raw.len()), (b'B', &bind[..], bind.len() + 5));
        let len = first.raw.len();
        buf.advance(len);
        assert_eq!(frontend_message(&mut buf, 1 << 20).unwrap().map(|m| (m.tag, m.body)), Some((b'S', &b""[..])));
        // The same refusals as the splitter's: type, length, and the per-type limit.
        let mut unknown = msg(b'!', b"");
        assert_eq!(frontend_message(&mut unknown, 100), Err(FrameError::UnknownType(b'!')));
        let mut fat_sync = msg(b'S', b"x");
        assert!(matches!(frontend_message(&mut fat_sync, 100), Err(FrameError::TooLarge { .. })));
        let mut neg = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(frontend_message(&mut neg, 100), Err(FrameError::BadLength(-1)));
        let full = msg(b'Q', b"SELECT 1\0");
        for cut in 0..full.len() {
            let mut partial = BytesMut::from(&full[..cut]);
            assert_eq!(frontend_message(&mut partial, 1 << 20), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn startup_packets() {
        let mut ssl = BytesMut::from(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f][..]);
        let body = split_startup(&mut ssl).unwrap().unwrap();
        assert_eq!(&body[..], &[0x04, 0xd2, 0x16, 0x2f]);
        let mut big = BytesMut::from(&[0, 1, 0, 0, 0, 3, 0, 0][..]);
        assert!(matches!(split_startup(&mut big), Err(FrameError::TooLarge { .. })));
        let mut tiny = BytesMut::from(&[0, 0, 0, 4][..]);
        assert_eq!(split_startup(&mut tiny), Err(FrameError::BadLength(4)));
        let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(split_startup(&mut garbage).is_err());
    }

    proptest! {
        #[test]
        fn frontend_splitter_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            loop {
                // The relay's in-place reader sees exactly what the splitter splits off.
                let seen = frontend_message(&mut buf.clone(), 32).map(|o| o.map(|m| m.raw.to_vec()));
                let split = split_frontend(&mut buf, 32);
                let split_raw = match &split {
                    Ok(o) => Ok(o.as_ref().map(|f| f.raw.to_vec())),
                    Err(e) => Err(e.clone()),
                };
                prop_assert_eq!(&seen, &split_raw);
                match split {
                    Ok(Some(f)) => prop_assert_eq!(f.raw.len(), f.body.len() + 5),
                    _ => break,
                }
            }
        }

        #[test]
        fn backend_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(m)) = backend_message(&mut buf) {
                prop_assert_eq!(m.raw.len(), m.body.len() + 5);
                let len = m.raw.len();
                buf.advance(len);
            }
        }

        #[test]
        fn startup_splitter_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = split_startup(&mut buf);
        }
    }
}
