//! The frontend messages the proxy looks inside (Query, Parse, PasswordMessage), decoded strictly
//! from exactly one frame, and the ones it writes upstream in their place.

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
    let nul = b.iter().position(|&c| c == 0).ok_or(DecodeError::Malformed(msg, "string is not NUL-terminated"))?;
    let (s, rest) = b.split_at(nul);
    let s = std::str::from_utf8(s).map_err(|_| DecodeError::Malformed(msg, "text is not valid UTF-8"))?;
    Ok((s, rest.get(1..).unwrap_or_default()))
}

fn expect_end(msg: &'static str, rest: &[u8]) -> Result<(), DecodeError> {
    if rest.is_empty() { Ok(()) } else { Err(DecodeError::Malformed(msg, "trailing bytes after the message")) }
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
        }

        #[test]
        fn query_round_trips(sql in "[^\u{0}]{0,40}") {
            let mut out = BytesMut::new();
            encode_query(&mut out, &sql);
            prop_assert_eq!(decode_query(&out[5..]), Ok(sql.as_str()));
        }
    }
}
