//! Fuzz the startup phase: `split_startup` + `parse_startup` + `classify_param`.
//!
//! The input is used two ways: as a byte stream of startup packets (split, then each body parsed),
//! and directly as one packet body (so the parser is reached without the length word having to
//! be right).
//!
//! Invariants checked:
//! - no panic, for any bytes;
//! - a decoded StartupMessage is protocol 3.x, has non-empty parameter names without NUL, no two
//!   names equal ignoring ASCII case, and re-encodes to the exact body it was decoded from;
//! - `StartupMessage::get` finds every parameter, case-insensitively;
//! - special requests (SSL, GSSENC, Cancel) are recognised only at their exact lengths;
//! - `classify_param` is a whitelist: `Forward` only for the listed harmless names, `Consume` only
//!   for user/database, a UTF-8 client_encoding, or an empty `options`; `ProtocolOption` only for
//!   `_pq_.` names; everything else is refused.
//!
//! (The upstream side's parsers in `src/upstream/wire.rs` are `pub(crate)`, so not reachable here.)
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use struere_proxy::protocol::frame;
use struere_proxy::protocol::startup::{self, ParamVerdict, StartupMessage, StartupRequest};

const FORWARDED: &[&str] = &[
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

fn encode_startup(m: &StartupMessage) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&((u32::from(m.major) << 16) | u32::from(m.minor)).to_be_bytes());
    for (k, v) in &m.params {
        b.extend_from_slice(k.as_bytes());
        b.push(0);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b.push(0);
    b
}

fn check_classify(name: &str, value: &str) {
    let lower = name.to_ascii_lowercase();
    match startup::classify_param(name, value) {
        ParamVerdict::Forward => {
            // Cosmetics, or a setting an environment key may SET anyway; never a pinned one.
            let settable = struere_proxy::rewrite::engine::ALLOWED_SETTINGS.contains(&lower.as_str());
            assert!(FORWARDED.contains(&lower.as_str()) || settable, "{name:?} forwarded but not whitelisted");
            assert!(
                !struere_proxy::rewrite::PINNED_SETTINGS.iter().any(|p| p.eq_ignore_ascii_case(&lower)),
                "the pinned {name:?} forwarded"
            );
        }
        ParamVerdict::Consume => match lower.as_str() {
            "user" | "database" => {}
            "client_encoding" => {
                let v = value.trim().trim_matches('\'').to_ascii_lowercase().replace(['-', '_'], "");
                assert!(v == "utf8" || v == "unicode", "client_encoding {value:?} consumed");
            }
            "options" => assert!(value.trim().is_empty(), "options {value:?} consumed"),
            _ => panic!("{name:?} = {value:?} consumed"),
        },
        ParamVerdict::ProtocolOption => assert!(lower.starts_with("_pq_."), "{name:?} is a protocol option"),
        // Refused for every key, or for environment keys (operator keys' go as sent).
        ParamVerdict::Refuse(reason) | ParamVerdict::OperatorOnly(reason) => {
            assert!(!reason.is_empty());
            assert!(
                !FORWARDED.contains(&lower.as_str()) && !matches!(lower.as_str(), "user" | "database"),
                "{name:?} refused"
            );
        }
    }
}

fn check_body(body: &Bytes) {
    let Ok(req) = startup::parse_startup(body) else {
        return;
    };
    let code = || i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    match req {
        StartupRequest::SslRequest => assert_eq!((code(), body.len()), (80_877_103, 4)),
        StartupRequest::GssEncRequest => assert_eq!((code(), body.len()), (80_877_104, 4)),
        StartupRequest::Cancel { pid, secret } => {
            assert_eq!((code(), body.len()), (80_877_102, 12));
            assert_eq!(&body[4..8], &pid.to_be_bytes());
            assert_eq!(&body[8..12], &secret.to_be_bytes());
        }
        StartupRequest::Startup(m) => {
            assert_eq!(m.major, 3);
            assert_eq!(encode_startup(&m), &body[..], "StartupMessage does not round-trip");
            for (i, (k, v)) in m.params.iter().enumerate() {
                assert!(!k.is_empty() && !k.contains('\0') && !v.contains('\0'));
                for (k2, _) in &m.params[..i] {
                    assert!(!k.eq_ignore_ascii_case(k2), "duplicate parameter {k:?}");
                }
                assert_eq!(m.get(k), Some(v.as_str()));
                assert_eq!(m.get(&k.to_ascii_uppercase()), Some(v.as_str()));
                check_classify(k, v);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // As a stream of packets.
    let mut buf = BytesMut::from(data);
    let mut consumed = 0usize;
    while let Ok(Some(body)) = frame::split_startup(&mut buf) {
        consumed += body.len() + 4;
        assert!(consumed <= data.len());
        assert_eq!(consumed + buf.len(), data.len());
        check_body(&body);
    }
    // As one packet body.
    check_body(&Bytes::copy_from_slice(data));
    // The classifier on arbitrary (lossy) text, split at the first NUL.
    let text = String::from_utf8_lossy(data);
    let (name, value) = text.split_once('\0').unwrap_or((&text, ""));
    check_classify(name, value);
});
