//! The few backend messages a startup handshake sees: strict framing and decoding of untrusted
//! server bytes. Pure functions, no I/O; every malformed input is an error, never a panic.

use bytes::{Buf, Bytes, BytesMut};

use super::{ServerError, UpstreamError};

/// The largest backend message accepted (length field included), as the brief for the proxy
/// fixes it. Nothing is allocated up front from a declared length: the buffer only grows as
/// bytes really arrive, and the handshake timeout bounds how long that may take.
pub(crate) const MAX_BACKEND_MESSAGE_LEN: usize = 1 << 30;

/// One backend message: its tag and its body (without tag and length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

fn violation(msg: impl Into<String>) -> UpstreamError {
    UpstreamError::Protocol(msg.into())
}

/// Splits one complete message off the front of `buf`. `Ok(None)` means more bytes are needed;
/// an impossible length is an error as soon as the 5-byte header is in.
pub(crate) fn split_frame(buf: &mut BytesMut) -> Result<Option<Frame>, UpstreamError> {
    let Some(&[tag, a, b, c, d]) = buf.get(..5) else {
        return Ok(None);
    };
    // The length is signed on the wire; read it as such so a negative value is refused before
    // it could turn into a huge usize.
    let len = i32::from_be_bytes([a, b, c, d]);
    let len = usize::try_from(len)
        .ok()
        .filter(|len| (4..=MAX_BACKEND_MESSAGE_LEN).contains(len))
        .ok_or_else(|| violation(format!("message {} declares length {len}", printable(tag))))?;
    // len counts itself but not the tag.
    let total = len + 1;
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(5);
    Ok(Some(Frame { tag, body: frame.freeze() }))
}

/// A tag for error messages: the character if printable, else its hex value.
pub(crate) fn printable(tag: u8) -> String {
    if tag.is_ascii_graphic() { format!("'{}'", char::from(tag)) } else { format!("0x{tag:02x}") }
}

/// A bounds-checked cursor over one message body.
struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(body: &'a [u8], what: &'static str) -> Self {
        Reader { rest: body, what }
    }

    fn short(&self) -> UpstreamError {
        violation(format!("{} is truncated", self.what))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], UpstreamError> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or_else(|| self.short())?;
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, UpstreamError> {
        let (&byte, tail) = self.rest.split_first().ok_or_else(|| self.short())?;
        self.rest = tail;
        Ok(byte)
    }

    fn i32(&mut self) -> Result<i32, UpstreamError> {
        let bytes = self.take(4)?;
        let arr: [u8; 4] = bytes.try_into().map_err(|_| self.short())?;
        Ok(i32::from_be_bytes(arr))
    }

    /// A NUL-terminated string, without the NUL.
    fn cstr(&mut self) -> Result<&'a [u8], UpstreamError> {
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| violation(format!("{} has an unterminated string", self.what)))?;
        let s = self.take(end)?;
        self.take(1)?;
        Ok(s)
    }

    fn utf8(&mut self) -> Result<&'a str, UpstreamError> {
        let what = self.what;
        std::str::from_utf8(self.cstr()?).map_err(|_| violation(format!("{what} holds a string that is not UTF-8")))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Checks that the whole body was consumed.
    fn finish(&self) -> Result<(), UpstreamError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(violation(format!("{} has {} unexpected trailing bytes", self.what, self.rest.len())))
        }
    }
}

/// An Authentication ('R') message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthRequest<'a> {
    Ok,
    Cleartext,
    Md5 {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<&'a str>,
    },
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    /// Kerberos, GSSAPI, SSPI or an unknown code: the caller refuses it by number.
    Other(i32),
}

pub(crate) fn parse_auth(body: &[u8]) -> Result<AuthRequest<'_>, UpstreamError> {
    let mut r = Reader::new(body, "Authentication message");
    let request = match r.i32()? {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => {
            let salt = r.take(4)?.try_into().map_err(|_| r.short())?;
            AuthRequest::Md5 { salt }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let name = r.utf8()?;
                if name.is_empty() {
                    break;
                }
                mechanisms.push(name);
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(r.rest()),
        12 => AuthRequest::SaslFinal(r.rest()),
        other => return Ok(AuthRequest::Other(other)),
    };
    r.finish()?;
    Ok(request)
}

/// An ErrorResponse ('E') or NoticeResponse body. Unknown fields are skipped, as the protocol
/// asks; missing ones get neutral defaults so a terse server still yields a readable error.
pub(crate) fn parse_error_response(body: &[u8]) -> Result<ServerError, UpstreamError> {
    let mut r = Reader::new(body, "ErrorResponse");
    let (mut localized, mut severity, mut code, mut message, mut detail) = (None, None, None, None, None);
    loop {
        let field = r.u8()?;
        if field == 0 {
            break;
        }
        // Lossy: this text is only shown, never relayed byte for byte.
        let value = String::from_utf8_lossy(r.cstr()?).into_owned();
        match field {
            b'S' => localized = Some(value),
            b'V' => severity = Some(value),
            b'C' => code = Some(value),
            b'M' => message = Some(value),
            b'D' => detail = Some(value),
            _ => {}
        }
    }
    r.finish()?;
    Ok(ServerError {
        severity: severity.or(localized).unwrap_or_else(|| "ERROR".into()),
        code: code.unwrap_or_else(|| "XX000".into()),
        message: message.unwrap_or_else(|| "(no message)".into()),
        detail,
    })
}

/// A ParameterStatus ('S') body: name and value. Strict UTF-8, since callers relay them.
pub(crate) fn parse_parameter_status(body: &[u8]) -> Result<(String, String), UpstreamError> {
    let mut r = Reader::new(body, "ParameterStatus");
    let name = r.utf8()?.to_owned();
    let value = r.utf8()?.to_owned();
    r.finish()?;
    if name.is_empty() {
        return Err(violation("ParameterStatus has an empty name"));
    }
    Ok((name, value))
}

/// A BackendKeyData ('K') body of protocol 3.0: process id and secret key.
pub(crate) fn parse_backend_key(body: &[u8]) -> Result<(i32, i32), UpstreamError> {
    let mut r = Reader::new(body, "BackendKeyData");
    let pid = r.i32()?;
    let secret = r.i32()?;
    r.finish()?;
    Ok((pid, secret))
}

/// A ReadyForQuery ('Z') body: the transaction status, one of `I`, `T`, `E`.
pub(crate) fn parse_ready_for_query(body: &[u8]) -> Result<u8, UpstreamError> {
    let mut r = Reader::new(body, "ReadyForQuery");
    let status = r.u8()?;
    r.finish()?;
    match status {
        b'I' | b'T' | b'E' => Ok(status),
        other => Err(violation(format!("ReadyForQuery has transaction status {}", printable(other)))),
    }
}

/// A NegotiateProtocolVersion ('v') body: the newest minor version the server supports and
/// the startup options it did not recognise.
pub(crate) fn parse_negotiate_protocol_version(body: &[u8]) -> Result<(i32, Vec<String>), UpstreamError> {
    let mut r = Reader::new(body, "NegotiateProtocolVersion");
    let minor = r.i32()?;
    let count = r.i32()?;
    let count =
        usize::try_from(count).map_err(|_| violation("NegotiateProtocolVersion has a negative option count"))?;
    // Each option takes at least one byte, so the count cannot exceed the body: no huge
    // allocation from a forged number.
    let mut options = Vec::with_capacity(count.min(body.len()));
    for _ in 0..count {
        options.push(r.utf8()?.to_owned());
    }
    r.finish()?;
    Ok((minor, options))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use proptest::prelude::*;

    fn message(tag: u8, body: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u8(tag);
        buf.put_i32(i32::try_from(body.len() + 4).unwrap());
        buf.put_slice(body);
        buf
    }

    #[test]
    fn splits_exactly_one_frame_and_keeps_the_rest() {
        let mut buf = message(b'Z', b"I");
        buf.extend_from_slice(&message(b'S', b"a\0b\0"));
        buf.extend_from_slice(b"D\0\0"); // a partial third message
        let first = split_frame(&mut buf).unwrap().unwrap();
        assert_eq!((first.tag, &first.body[..]), (b'Z', &b"I"[..]));
        let second = split_frame(&mut buf).unwrap().unwrap();
        assert_eq!(second.tag, b'S');
        assert_eq!(split_frame(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"D\0\0");
    }

    #[test]
    fn waits_for_truncated_frames() {
        let full = message(b'K', &[0; 8]);
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert_eq!(split_frame(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn refuses_impossible_lengths() {
        for len in [i32::MIN, -1, 0, 3, (1 << 30) + 1, i32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_u8(b'D');
            buf.put_i32(len);
            assert!(matches!(split_frame(&mut buf), Err(UpstreamError::Protocol(_))), "{len}");
        }
        // An empty body (length 4) is fine.
        let mut buf = message(b'I', b"");
        assert_eq!(split_frame(&mut buf).unwrap().unwrap().body.len(), 0);
    }

    #[test]
    fn parses_auth_requests() {
        assert_eq!(parse_auth(&[0, 0, 0, 0]).unwrap(), AuthRequest::Ok);
        assert_eq!(parse_auth(&[0, 0, 0, 3]).unwrap(), AuthRequest::Cleartext);
        assert_eq!(parse_auth(&[0, 0, 0, 5, 1, 2, 3, 4]).unwrap(), AuthRequest::Md5 { salt: [1, 2, 3, 4] });
        assert_eq!(
            parse_auth(b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0").unwrap(),
            AuthRequest::Sasl { mechanisms: vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"] }
        );
        assert_eq!(parse_auth(b"\0\0\0\x0br=abc").unwrap(), AuthRequest::SaslContinue(b"r=abc"));
        assert_eq!(parse_auth(&[0, 0, 0, 7]).unwrap(), AuthRequest::Other(7));
    }

    #[test]
    fn refuses_malformed_auth_requests() {
        for body in [
            &b""[..],
            &[0, 0, 0],
            &[0, 0, 0, 0, 9],             // trailing byte after Ok
            &[0, 0, 0, 5, 1, 2, 3],       // short salt
            &[0, 0, 0, 5, 1, 2, 3, 4, 5], // long salt
            b"\0\0\0\x0aSCRAM-SHA-256\0", // list not terminated
            b"\0\0\0\x0aSCRAM",           // name not terminated
            b"\0\0\0\x0a\xff\0\0",        // not UTF-8
        ] {
            assert!(matches!(parse_auth(body), Err(UpstreamError::Protocol(_))), "{body:?}");
        }
    }

    #[test]
    fn parses_error_fields() {
        let e =
            parse_error_response(b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed\0Dsome detail\0Rauth.c\0\0")
                .unwrap();
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "28P01");
        assert_eq!(e.message, "password authentication failed");
        assert_eq!(e.detail.as_deref(), Some("some detail"));
        // Localized severity only, missing fields, odd bytes: still an error value.
        let e = parse_error_response(b"SFEHLER\0M\xff\0\0").unwrap();
        assert_eq!((e.severity.as_str(), e.code.as_str()), ("FEHLER", "XX000"));
        assert_eq!(e.message, "\u{fffd}");
        assert!(parse_error_response(b"\0").is_ok());
    }

    #[test]
    fn refuses_malformed_error_responses() {
        for body in [&b""[..], b"SFATAL", b"SFATAL\0", b"SFATAL\0\0x"] {
            assert!(parse_error_response(body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn parses_small_messages() {
        assert_eq!(parse_parameter_status(b"TimeZone\0UTC\0").unwrap(), ("TimeZone".into(), "UTC".into()));
        for body in [&b""[..], b"a\0", b"a\0b", b"\0b\0", b"a\0b\0c", b"a\0\xff\0"] {
            assert!(parse_parameter_status(body).is_err(), "{body:?}");
        }
        assert_eq!(parse_backend_key(&[0, 0, 0, 7, 0xff, 0xff, 0xff, 0xfe]).unwrap(), (7, -2));
        for len in [0, 4, 7, 9, 36] {
            assert!(parse_backend_key(&vec![1; len]).is_err(), "{len}");
        }
        assert_eq!(parse_ready_for_query(b"T").unwrap(), b'T');
        for body in [&b""[..], b"X", b"II"] {
            assert!(parse_ready_for_query(body).is_err(), "{body:?}");
        }
        assert_eq!(
            parse_negotiate_protocol_version(b"\0\0\0\0\0\0\0\x01_pq_.x\0").unwrap(),
            (0, vec!["_pq_.x".to_string()])
        );
        for body in [&b"\0\0\0\0\xff\xff\xff\xff"[..], b"\0\0\0\0\x7f\xff\xff\xff", b"\0\0\0\0\0\0\0\x02a\0"] {
            assert!(parse_negotiate_protocol_version(body).is_err(), "{body:?}");
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_auth(&bytes);
            let _ = parse_error_response(&bytes);
            let _ = parse_parameter_status(&bytes);
            let _ = parse_backend_key(&bytes);
            let _ = parse_ready_for_query(&bytes);
            let _ = parse_negotiate_protocol_version(&bytes);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(frame)) = split_frame(&mut buf) {
                prop_assert!(frame.body.len() + 5 <= bytes.len());
            }
        }
    }
}
