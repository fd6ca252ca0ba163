//! The startup phase: what the first packet of a connection asks for, and which of the client's
//! startup parameters may reach the upstream server.

use bytes::Bytes;
use thiserror::Error;

const SSL_REQUEST_CODE: i32 = 80_877_103;
const GSSENC_REQUEST_CODE: i32 = 80_877_104;
const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// The first packet of a connection, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRequest {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: i32 },
    Startup(StartupMessage),
}

/// A StartupMessage. Parameters keep the client's spelling; lookups are case-insensitive the way
/// PostgreSQL's GUC names are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("startup packet is truncated")]
    Truncated,
    #[error("unsupported frontend protocol {0}.{1}: the proxy supports 3.0")]
    UnsupportedProtocol(u16, u16),
    #[error("startup packet is malformed: {0}")]
    Malformed(&'static str),
}

/// Decode a startup packet body (the bytes after the length word).
pub fn parse_startup(body: &Bytes) -> Result<StartupRequest, StartupError> {
    let code = read_i32(body, 0).ok_or(StartupError::Truncated)?;
    match code {
        SSL_REQUEST_CODE if body.len() == 4 => Ok(StartupRequest::SslRequest),
        GSSENC_REQUEST_CODE if body.len() == 4 => Ok(StartupRequest::GssEncRequest),
        CANCEL_REQUEST_CODE if body.len() == 12 => {
            let pid = read_i32(body, 4).ok_or(StartupError::Truncated)?;
            let secret = read_i32(body, 8).ok_or(StartupError::Truncated)?;
            Ok(StartupRequest::Cancel { pid, secret })
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            Err(StartupError::Malformed("special request has the wrong length"))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol(major, minor));
            }
            let params = parse_params(body.get(4..).ok_or(StartupError::Truncated)?)?;
            Ok(StartupRequest::Startup(StartupMessage { major, minor, params }))
        }
    }
}

fn read_i32(b: &[u8], at: usize) -> Option<i32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// name\0value\0 ... \0 — strictly: UTF-8, no empty names, terminated exactly once, no duplicates.
fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        match rest {
            [] => return Err(StartupError::Malformed("parameter list is not terminated")),
            [0] => return Ok(params),
            _ => {}
        }
        let (name, after) = cstr(rest)?;
        let (value, after) = cstr(after)?;
        if name.is_empty() {
            return Err(StartupError::Malformed("empty parameter name"));
        }
        if params.iter().any(|(k, _)| k.eq_ignore_ascii_case(name)) {
            return Err(StartupError::Malformed("duplicate parameter"));
        }
        params.push((name.to_owned(), value.to_owned()));
        rest = after;
    }
}

fn cstr(b: &[u8]) -> Result<(&str, &[u8]), StartupError> {
    let nul = memchr::memchr(0, b).ok_or(StartupError::Malformed("unterminated string"))?;
    let (s, rest) = b.split_at(nul);
    let s = std::str::from_utf8(s).map_err(|_| StartupError::Malformed("parameter is not UTF-8"))?;
    Ok((s, rest.get(1..).unwrap_or_default()))
}

/// What the proxy does with one client startup parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamVerdict {
    /// Harmless session cosmetics: forwarded upstream as sent.
    Forward,
    /// Consumed by the proxy itself (user, database, a UTF-8 client_encoding).
    Consume,
    /// A protocol extension (`_pq_.*`): reported unsupported via NegotiateProtocolVersion.
    ProtocolOption,
    /// Forwarded for operator keys (their statements go as sent, never parsed); refused with
    /// this reason for environment keys.
    OperatorOnly(String),
    /// Refused with a reason: the session does not start.
    Refuse(String),
}

/// Startup parameters that only change how values are presented or how long things may take.
/// Anything else could change what a statement means (search_path, role, ...) and is refused
/// for environment keys (operator keys' are forwarded: their statements go as sent).
const FORWARDED_PARAMS: &[&str] = &[
    "application_name",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "intervalstyle",
    "bytea_output",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "geqo",
];

/// The names of the settings an `options` startup parameter sets (`-c name=value`,
/// `-cname=value`, `--name=value`), lower-cased with `-` read as `_`, as PostgreSQL splits and
/// reads it (`pg_split_opts`: whitespace separates, a backslash takes the next byte literally).
pub fn options_settings(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut names = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next()
        } else {
            w.strip_prefix("--").or_else(|| w.strip_prefix("-c")).map(str::to_owned)
        };
        if let Some(name) = setting.as_deref().and_then(|s| s.split_once('=')).map(|(n, _)| n) {
            names.push(name.to_ascii_lowercase().replace('-', "_"));
        }
    }
    names
}

/// Decide what happens to one startup parameter.
pub fn classify_param(name: &str, value: &str) -> ParamVerdict {
    let lower = name.to_ascii_lowercase();
    match lower.as_str() {
        "user" | "database" => ParamVerdict::Consume,
        "client_encoding" => {
            // The proxy parses UTF-8: an encoding like SJIS or GBK could hide a quote inside a
            // multi-byte character that the proxy and the server would read differently.
            let v = value.trim().trim_matches('\'').to_ascii_lowercase().replace(['-', '_'], "");
            if v == "utf8" || v == "unicode" {
                ParamVerdict::Consume
            } else {
                ParamVerdict::OperatorOnly(format!(
                    "client_encoding {value:?} is not supported for environment keys: the proxy parses their SQL as UTF8"
                ))
            }
        }
        "options" if value.trim().is_empty() => ParamVerdict::Consume,
        "options" => ParamVerdict::OperatorOnly(
            "the startup parameter \"options\" is refused: it can set any server setting (role, search_path, ...)"
                .to_owned(),
        ),
        "replication" => ParamVerdict::Refuse("replication connections are not supported through the proxy".to_owned()),
        n if n.starts_with("_pq_.") => ParamVerdict::ProtocolOption,
        // And the settings an environment key may SET (asyncpg's `server_settings` send
        // `client_min_messages` here): as a startup value it is what `SET` would make it.
        n if FORWARDED_PARAMS.contains(&n) || crate::rewrite::engine::ALLOWED_SETTINGS.contains(&n) => {
            ParamVerdict::Forward
        }
        // Any other server setting, as PostgreSQL takes it in a startup packet (asyncpg's
        // `server_settings`, `search_path=…`): an operator key's, as sent.
        _ => ParamVerdict::OperatorOnly(format!("the startup parameter {name:?} is not allowed through the proxy")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_body(params: &[(&str, &str)], minor: u16) -> Bytes {
        let mut b = Vec::new();
        b.extend_from_slice(&((3i32 << 16) | i32::from(minor)).to_be_bytes());
        for (k, v) in params {
            b.extend_from_slice(k.as_bytes());
            b.push(0);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        Bytes::from(b)
    }

    #[test]
    fn decodes_startup() {
        let body = startup_body(&[("user", "bob"), ("database", "app")], 0);
        let StartupRequest::Startup(m) = parse_startup(&body).unwrap() else { panic!("not a startup") };
        assert_eq!((m.major, m.minor), (3, 0));
        assert_eq!(m.get("USER"), Some("bob"));
        assert_eq!(m.get("database"), Some("app"));
    }

    #[test]
    fn decodes_special_requests() {
        let ssl = Bytes::from_static(&[0x04, 0xd2, 0x16, 0x2f]);
        assert_eq!(parse_startup(&ssl), Ok(StartupRequest::SslRequest));
        let gss = Bytes::from_static(&[0x04, 0xd2, 0x16, 0x30]);
        assert_eq!(parse_startup(&gss), Ok(StartupRequest::GssEncRequest));
        let mut c = vec![0x04, 0xd2, 0x16, 0x2e];
        c.extend_from_slice(&7i32.to_be_bytes());
        c.extend_from_slice(&(-9i32).to_be_bytes());
        assert_eq!(parse_startup(&Bytes::from(c)), Ok(StartupRequest::Cancel { pid: 7, secret: -9 }));
        let short_cancel = Bytes::from_static(&[0x04, 0xd2, 0x16, 0x2e, 0, 0]);
        assert!(parse_startup(&short_cancel).is_err());
    }

    #[test]
    fn refuses_malformed_startups() {
        assert!(parse_startup(&Bytes::from_static(&[0, 2, 0, 0, 0])).is_err());
        assert!(parse_startup(&Bytes::from_static(&[0, 3, 0, 0, b'u', 0])).is_err());
        assert!(parse_startup(&Bytes::from_static(&[0, 3, 0, 0, b'u', 0, b'v'])).is_err());
        let dup = startup_body(&[("user", "a"), ("USER", "b")], 0);
        assert!(parse_startup(&dup).is_err());
        let bad_utf8 = Bytes::from_static(&[0, 3, 0, 0, 0xff, 0, b'v', 0, 0]);
        assert!(parse_startup(&bad_utf8).is_err());
        assert!(parse_startup(&Bytes::from_static(&[0, 3])).is_err());
    }

    #[test]
    fn newer_minor_versions_are_decoded_for_negotiation() {
        let body = startup_body(&[("user", "x"), ("_pq_.foo", "1")], 2);
        let StartupRequest::Startup(m) = parse_startup(&body).unwrap() else { panic!() };
        assert_eq!(m.minor, 2);
        assert_eq!(classify_param("_pq_.foo", "1"), ParamVerdict::ProtocolOption);
    }

    #[test]
    fn parameter_policy() {
        assert_eq!(classify_param("application_name", "psql"), ParamVerdict::Forward);
        assert_eq!(classify_param("DateStyle", "ISO"), ParamVerdict::Forward);
        assert_eq!(classify_param("client_min_messages", "debug"), ParamVerdict::Forward);
        assert_eq!(classify_param("client_encoding", "UTF8"), ParamVerdict::Consume);
        assert_eq!(classify_param("client_encoding", "utf-8"), ParamVerdict::Consume);
        assert_eq!(classify_param("client_encoding", "'utf-8'"), ParamVerdict::Consume);
        assert!(matches!(classify_param("client_encoding", "SJIS"), ParamVerdict::OperatorOnly(_)));
        assert!(matches!(classify_param("client_encoding", "GBK"), ParamVerdict::OperatorOnly(_)));
        assert!(matches!(classify_param("options", "-c role=admin"), ParamVerdict::OperatorOnly(_)));
        assert_eq!(classify_param("options", " "), ParamVerdict::Consume);
        assert!(matches!(classify_param("search_path", "evil"), ParamVerdict::OperatorOnly(_)));
        assert!(matches!(classify_param("role", "postgres"), ParamVerdict::OperatorOnly(_)));
        assert!(matches!(classify_param("replication", "true"), ParamVerdict::Refuse(_)));
    }

    #[test]
    fn reads_the_settings_of_options() {
        assert_eq!(options_settings("-c search_path=foo"), ["search_path"]);
        assert_eq!(options_settings("  -cSearch-Path=a\\ b --geqo=off -x -c"), ["search_path", "geqo"]);
        assert_eq!(options_settings("-c a\\=b=c"), ["a"]);
        assert!(options_settings("-c nothing").is_empty());
    }
}
