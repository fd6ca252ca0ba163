//! Backend messages: the ones the proxy emits itself (encoded with pgwire's message types) and the
//! few it reads from the server's stream (ErrorResponse fields, ParameterStatus, ReadyForQuery).

use bytes::BytesMut;
use pgwire::messages::Message;
use pgwire::messages::response::{ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey};

use super::sqlstate::SqlState;

/// Severity of an error the proxy reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session lives on.
    Error,
    /// The session ends after this message.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

// pgwire's encoders only fail on values that do not fit the protocol (e.g. a count above i16);
// the proxy emits none, so a failure is a bug we log rather than a reason to panic.
fn encode(msg: &impl Message, out: &mut BytesMut) {
    if let Err(e) = msg.encode(out) {
        tracing::error!(error = %e, "failed to encode a backend message");
    }
}

/// ErrorResponse with severity, SQLSTATE, message and an optional detail.
pub fn error_response(out: &mut BytesMut, severity: Severity, code: SqlState, message: &str, detail: Option<&str>) {
    error_response_code(out, severity, code.code(), message, detail);
}

/// ErrorResponse with a SQLSTATE given as text (one relayed from the server).
pub fn error_response_code(out: &mut BytesMut, severity: Severity, code: &str, message: &str, detail: Option<&str>) {
    let clean = |s: &str| s.replace('\0', "");
    let mut fields = vec![
        (b'S', severity.as_str().to_owned()),
        (b'V', severity.as_str().to_owned()),
        (b'C', code.to_owned()),
        (b'M', clean(message)),
    ];
    if let Some(d) = detail {
        fields.push((b'D', clean(d)));
    }
    encode(&ErrorResponse::new(fields), out);
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    encode(&ReadyForQuery::new(status), out);
}

/// A message relayed as the server framed it (`tag`, then the length, then `body`).
pub fn raw_message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.reserve(5 + body.len());
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

pub fn auth_cleartext_request(out: &mut BytesMut) {
    encode(&Authentication::CleartextPassword, out);
}

pub fn auth_ok(out: &mut BytesMut) {
    encode(&Authentication::Ok, out);
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    encode(&ParameterStatus::new(name.to_owned(), value.to_owned()), out);
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    encode(&BackendKeyData::new(pid, SecretKey::I32(secret)), out);
}

/// Tell a client asking for protocol 3.x (x > 0) that the proxy speaks 3.0, and which `_pq_.`
/// options it does not understand.
pub fn negotiate_protocol_version(out: &mut BytesMut, unsupported: Vec<String>) {
    encode(&NegotiateProtocolVersion::new(0, unsupported), out);
}

/// Fields of an ErrorResponse or NoticeResponse body, decoded without trusting the bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut fields = ErrorFields::default();
    let mut rest = body;
    while let Some((&kind, after)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = after.iter().position(|&c| c == 0).unwrap_or(after.len());
        let value = String::from_utf8_lossy(after.get(..end).unwrap_or_default()).into_owned();
        match kind {
            b'V' => fields.severity = value,
            b'S' if fields.severity.is_empty() => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
        rest = after.get(end + 1..).unwrap_or_default();
    }
    fields
}

/// A ParameterStatus body: name and value.
pub fn parse_parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let mut parts = body.split(|&c| c == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trips_through_the_field_parser() {
        let mut out = BytesMut::new();
        error_response(&mut out, Severity::Error, SqlState::INSUFFICIENT_PRIVILEGE, "refused: no", None);
        assert_eq!(out[0], b'E');
        let f = parse_error_fields(&out[5..]);
        assert_eq!(f.code, "42501");
        assert_eq!(f.severity, "ERROR");
        assert_eq!(f.message, "refused: no");
    }

    #[test]
    fn ready_for_query_encodes_status() {
        let mut out = BytesMut::new();
        ready_for_query(&mut out, b'E');
        assert_eq!(&out[..], &[b'Z', 0, 0, 0, 5, b'E']);
    }

    #[test]
    fn field_parser_survives_garbage() {
        for body in [&b""[..], b"C", b"C4250", b"\xff\xff\0", b"M\0\0\0"] {
            let _ = parse_error_fields(body);
            let _ = parse_parameter_status(body);
        }
    }
}
