//! The frontend messages the proxy looks inside (Query, Parse, PasswordMessage, and the statement
//! names of Bind, Describe and Close), decoded strictly from exactly one frame, and the ones it
//! writes upstream in their place.

use bytes::{BufMut, BytesMut};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("{0} message is malformed: {1}")]
    Malformed(&'static str, &'static str),
}

/// A decoded Parse message. Borrowed from the frame: nothing is copied until the rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub query: &'a str,
    pub param_types: Vec<u32>,
}

/// Read a NUL-terminated UTF-8 string from the front of `b`.
fn cstr<'a>(msg: &'static str, b: &'a [u8]) -> Result<(&'a str, &'a [u8]), DecodeError> {
    let nul = memchr::memchr(0, b).ok_or(DecodeError::Malformed(msg, "string is not NUL-terminated"))?;
    let (s, rest) = b.split_at(nul);
    let s = std::str::from_utf8(s).map_err(|_| DecodeError::Malformed(msg, "text is not valid UTF-8"))?;
    Ok((s, rest.get(1..).unwrap_or_default()))
}

fn expect_end(msg: &'static str, rest: &[u8]) -> Result<(), DecodeError> {
    if rest.is_empty() { Ok(()) } else { Err(DecodeError::Malformed(msg, "trailing bytes after the message")) }
}

/// The SQL text of a Query (`b'Q'`) or Parse (`b'P'`) body as far as it reads, invalid UTF-8
/// replaced: for the audit log of operator sessions, which forward messages as sent and may use
/// any client encoding.
pub fn statement_text_lossy(tag: u8, body: &[u8]) -> std::borrow::Cow<'_, str> {
    let mut strings = body.split(|b| *b == 0);
    if tag == b'P' {
        strings.next();
    }
    String::from_utf8_lossy(strings.next().unwrap_or_default())
}

/// Query: exactly one NUL-terminated UTF-8 string and nothing after it.
pub fn decode_query(body: &[u8]) -> Result<&str, DecodeError> {
    let (sql, rest) = cstr("Query", body)?;
    expect_end("Query", rest)?;
    Ok(sql)
}

/// PasswordMessage: one NUL-terminated UTF-8 string.
pub fn decode_password(body: &[u8]) -> Result<&str, DecodeError> {
    let (pw, rest) = cstr("PasswordMessage", body)?;
    expect_end("PasswordMessage", rest)?;
    Ok(pw)
}

/// Parse: name, query, Int16 count, count × Int32 type OIDs.
pub fn decode_parse(body: &[u8]) -> Result<Parse<'_>, DecodeError> {
    const M: &str = "Parse";
    let (name, rest) = cstr(M, body)?;
    let (query, rest) = cstr(M, rest)?;
    let count_bytes = rest.get(0..2).ok_or(DecodeError::Malformed(M, "missing parameter count"))?;
    let count = i16::from_be_bytes([count_bytes[0], count_bytes[1]]);
    if count < 0 {
        return Err(DecodeError::Malformed(M, "negative parameter count"));
    }
    let oids = rest.get(2..).unwrap_or_default();
    if oids.len() != count as usize * 4 {
        return Err(DecodeError::Malformed(M, "parameter types do not match the count"));
    }
    let param_types = oids.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(Parse { name, query, param_types })
}

/// The names a Bind message refers to; `rest` is everything after them (formats, values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindNames<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    pub rest: &'a [u8],
}

/// Bind: portal and statement names (the rest is relayed as sent, the server checks it).
pub fn decode_bind_names(body: &[u8]) -> Result<BindNames<'_>, DecodeError> {
    let (portal, rest) = cstr("Bind", body)?;
    let (statement, rest) = cstr("Bind", rest)?;
    Ok(BindNames { portal, statement, rest })
}

/// The parameter values of a Bind, from its `rest` (after the names): `None` for NULL. The
/// parameter format codes are checked and passed over; the result format codes are not read.
pub fn decode_bind_values(rest: &[u8]) -> Result<Vec<Option<&[u8]>>, DecodeError> {
    const M: &str = "Bind";
    fn count(b: &[u8]) -> Result<(usize, &[u8]), DecodeError> {
        let n = b.get(0..2).ok_or(DecodeError::Malformed(M, "missing a count"))?;
        let n = i16::from_be_bytes([n[0], n[1]]);
        let n = usize::try_from(n).map_err(|_| DecodeError::Malformed(M, "negative count"))?;
        Ok((n, b.get(2..).unwrap_or_default()))
    }
    let (formats, rest) = count(rest)?;
    let codes = rest.get(..2 * formats).ok_or(DecodeError::Malformed(M, "truncated format codes"))?;
    if codes.chunks_exact(2).any(|c| c != [0, 0] && c != [0, 1]) {
        return Err(DecodeError::Malformed(M, "format code is neither text nor binary"));
    }
    let (values, mut rest) = count(rest.get(2 * formats..).unwrap_or_default())?;
    // Each value takes at least its 4-byte length: a short message cannot make a large reservation.
    let mut out = Vec::with_capacity(values.min(rest.len() / 4));
    for _ in 0..values {
        let len = rest.get(0..4).ok_or(DecodeError::Malformed(M, "truncated parameter"))?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        rest = rest.get(4..).unwrap_or_default();
        if len == -1 {
            out.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| DecodeError::Malformed(M, "negative parameter length"))?;
        out.push(Some(rest.get(..len).ok_or(DecodeError::Malformed(M, "truncated parameter"))?));
        rest = rest.get(len..).unwrap_or_default();
    }
    Ok(out)
}

/// Describe and Close: `S` (statement) or `P` (portal), then a name, and nothing after it.
pub fn decode_target<'a>(msg: &'static str, body: &'a [u8]) -> Result<(u8, &'a str), DecodeError> {
    let (&kind, rest) = body.split_first().ok_or(DecodeError::Malformed(msg, "empty message"))?;
    if kind != b'S' && kind != b'P' {
        return Err(DecodeError::Malformed(msg, "target is neither S nor P"));
    }
    let (name, rest) = cstr(msg, rest)?;
    expect_end(msg, rest)?;
    Ok((kind, name))
}

fn put_message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let len_at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - len_at) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Write a Query message. `sql` comes from the rewriter, which never emits NUL.
pub fn encode_query(out: &mut BytesMut, sql: &str) {
    put_message(out, b'Q', |b| {
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
    });
}

/// Write a Parse message.
pub fn encode_parse(out: &mut BytesMut, name: &str, sql: &str, param_types: &[u32]) {
    put_message(out, b'P', |b| {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_i16(param_types.len() as i16);
        for t in param_types {
            b.put_u32(*t);
        }
    });
}

/// Write a Bind message whose statement name is `statement` and whose formats and values are
/// `rest`, as a client's Bind carried them.
pub fn encode_bind_renamed(out: &mut BytesMut, names: &BindNames, statement: &str) {
    put_message(out, b'B', |b| {
        b.put_slice(names.portal.as_bytes());
        b.put_u8(0);
        b.put_slice(statement.as_bytes());
        b.put_u8(0);
        b.put_slice(names.rest);
    });
}

/// Write a Bind of `statement` to the unnamed portal with text-format parameters and results.
pub fn encode_bind_text(out: &mut BytesMut, statement: &str, values: &[String]) {
    put_message(out, b'B', |b| {
        b.put_u8(0);
        b.put_slice(statement.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
        b.put_i16(values.len() as i16);
        for v in values {
            b.put_i32(v.len() as i32);
            b.put_slice(v.as_bytes());
        }
        b.put_i16(0);
    });
}

/// Write a Describe (`kind` S or P) or a Close (`tag` b'C') of `name`.
pub fn encode_target(out: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    put_message(out, tag, |b| {
        b.put_u8(kind);
        b.put_slice(name.as_bytes());
        b.put_u8(0);
    });
}

/// Write an Execute of the unnamed portal (all rows) and a Sync.
pub fn encode_execute_sync(out: &mut BytesMut) {
    put_message(out, b'E', |b| {
        b.put_u8(0);
        b.put_i32(0);
    });
    put_message(out, b'S', |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn query_is_strict() {
        assert_eq!(decode_query(b"SELECT 1\0"), Ok("SELECT 1"));
        assert!(decode_query(b"SELECT 1").is_err());
        assert!(decode_query(b"SELECT 1\0x").is_err());
        assert!(decode_query(b"SELECT\0 1\0").is_err());
        assert!(decode_query(b"SELECT '\xff'\0").is_err());
    }

    #[test]
    fn parse_round_trips() {
        let mut out = BytesMut::new();
        encode_parse(&mut out, "s1", "SELECT $1::int", &[23]);
        let p = decode_parse(&out[5..]).unwrap();
        assert_eq!(p, Parse { name: "s1", query: "SELECT $1::int", param_types: vec![23] });
    }

    #[test]
    fn bind_names_round_trip_and_keep_the_rest() {
        let mut out = BytesMut::new();
        encode_bind_text(&mut out, "s1", &["it's".into(), "42".into()]);
        let names = decode_bind_names(&out[5..]).unwrap();
        assert_eq!((names.portal, names.statement), ("", "s1"));
        let mut renamed = BytesMut::new();
        encode_bind_renamed(&mut renamed, &names, "other");
        let again = decode_bind_names(&renamed[5..]).unwrap();
        assert_eq!((again.portal, again.statement, again.rest), ("", "other", names.rest));
        assert_eq!(names.rest, b"\0\0\0\x02\0\0\0\x04it's\0\0\0\x0242\0\0");
        assert_eq!(i32::from_be_bytes(renamed[1..5].try_into().unwrap()) as usize, renamed.len() - 1);
        assert!(decode_bind_names(b"portal\0stmt").is_err());
    }

    #[test]
    fn bind_values_are_read_strictly() {
        let mut out = BytesMut::new();
        encode_bind_text(&mut out, "s1", &["jit".into(), "".into()]);
        let names = decode_bind_names(&out[5..]).unwrap();
        assert_eq!(decode_bind_values(names.rest), Ok(vec![Some(&b"jit"[..]), Some(&b""[..])]));
        // One binary format code for all, a NULL, then the result formats (not read).
        let rest = b"\0\x01\0\x01\0\x02\xff\xff\xff\xff\0\0\0\x01x\0\x01\0\x01";
        assert_eq!(decode_bind_values(rest), Ok(vec![None, Some(&b"x"[..])]));
        for bad in [
            &b""[..],
            b"\0\x01",                     // a format code missing
            b"\0\x01\0\x02\0\0",           // format code 2
            b"\xff\xff\0\0",               // negative count
            b"\0\0\0\x01\0\0\0\x05abc",    // truncated value
            b"\0\0\0\x01\xff\xff\xff\xfe", // length -2
            b"\0\0\0\x02\0\0\0\0",         // a value missing
        ] {
            assert!(decode_bind_values(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn describe_and_close_targets_are_strict() {
        let mut out = BytesMut::new();
        encode_target(&mut out, b'D', b'S', "s1");
        assert_eq!(decode_target("Describe", &out[5..]), Ok((b'S', "s1")));
        assert!(decode_target("Describe", b"Xs1\0").is_err());
        assert!(decode_target("Describe", b"S\0x").is_err());
        assert!(decode_target("Close", b"").is_err());
        assert!(decode_target("Close", b"Pp").is_err());
    }

    #[test]
    fn parse_is_strict() {
        assert!(decode_parse(b"s\0SELECT 1\0").is_err());
        assert!(decode_parse(b"s\0SELECT 1\0\xff\xff").is_err());
        assert!(decode_parse(b"s\0SELECT 1\0\0\x02\0\0\0\x17").is_err());
        assert!(decode_parse(b"s\0SELECT 1\0\0\x01\0\0\0\x17\0").is_err());
        assert!(decode_parse(b"s\0SELECT 1\0\0\x00").is_ok());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..48)) {
            let _ = decode_query(&bytes);
            let _ = decode_parse(&bytes);
            let _ = decode_password(&bytes);
            let _ = decode_bind_names(&bytes);
            let _ = decode_bind_values(&bytes);
            let _ = decode_target("Describe", &bytes);
        }

        #[test]
        fn query_round_trips(sql in "[^\u{0}]{0,40}") {
            let mut out = BytesMut::new();
            encode_query(&mut out, &sql);
            prop_assert_eq!(decode_query(&out[5..]), Ok(sql.as_str()));
        }
    }
}
