//! Fuzz the wire framing (`split_frontend`, `split_backend`, `split_startup`) and the decoders that
//! are handed the frames it splits off (`decode_query`, `decode_parse`, `decode_password`,
//! `decode_bind_names`, `decode_bind_values`, `decode_target`,
//! `parse_error_fields`, `parse_parameter_status`), and the checks the session runs on bound values
//! (`ParamRule::check`, `ParamRule::check_declared`).
//!
//! Input layout (3 header bytes, then the byte stream):
//!   byte 0: mode — 0 frontend, 1 backend, 2 startup, 3 a session (startup packets until a
//!           StartupMessage-looking packet, then frontend messages)
//!   byte 1: chunk size for the streaming pass (0 = 1 byte at a time, else 1..=255)
//!   byte 2: index into MAX_MESSAGES (the `max_message` handed to `split_frontend`)
//!
//! Invariants checked:
//! - no panic, for any bytes;
//! - every Frame has `raw.len() == body.len() + 5`, `raw[0] == tag`, `raw[1..5]` is the length word,
//!   `raw[5..] == body`, and the frame is exactly the bytes at the front of the input;
//! - a frontend Frame has a frontend tag and a body within the per-type limit;
//! - a startup packet is exactly `len - 4` bytes, `8 <= len <= MAX_STARTUP_PACKET`;
//! - total bytes consumed never exceed the input, and `Ok(None)` never consumes anything;
//! - feeding the same stream in small chunks (as the socket does) yields exactly the same frames
//!   and the same final outcome as feeding it all at once;
//! - strict decoders round-trip: a Query/Parse that decodes re-encodes to the identical bytes;
//! - an ErrorResponse the proxy encodes is read back by `parse_error_fields` unchanged;
//! - Bind values (`decode_bind_values`, on the rest of every frame whose names decode) are exactly what the message
//!   holds: as many as its count says, each the bytes at its place; the formats and values re-encode to the front of
//!   the rest byte for byte; text values round-trip through `encode_bind_text`;
//! - a bound value passes a `set_config` rule only if it is UTF-8 without NUL and names a setting an environment key
//!   may SET (not a pinned one), or is the value a pinned setting is pinned to; a declared type passes only if the
//!   server reads the bound bytes as they are (unspecified, text, varchar).
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use struere_proxy::protocol::backend::{self, Severity};
use struere_proxy::protocol::frame::{self, Frame, FrameError, MAX_PROTOCOL_MESSAGE, MAX_STARTUP_PACKET};
use struere_proxy::protocol::frontend;
use struere_proxy::rewrite::ParamRule;

const MAX_MESSAGES: [usize; 8] = [0, 1, 16, 1024, 8192, 16 << 20, MAX_PROTOCOL_MESSAGE, usize::MAX];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Frontend,
    Backend,
    Startup,
    Session,
}

/// What one split call produced.
#[derive(Debug, PartialEq, Eq)]
enum Item {
    Typed(Frame),
    Startup(Bytes),
}

/// The outcome of splitting a whole stream: every item, then how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    items: Vec<Item>,
    end: Result<(), FrameError>,
    /// Bytes left unconsumed (only comparable between passes when the stream ended in `Ok(None)`).
    left: usize,
}

/// State of a session-mode splitter: still in the startup phase, or after it.
struct Splitter {
    mode: Mode,
    in_startup: bool,
    max_message: usize,
}

impl Splitter {
    fn new(mode: Mode, max_message: usize) -> Self {
        Splitter { mode, in_startup: matches!(mode, Mode::Startup | Mode::Session), max_message }
    }

    /// One split call, with its invariants checked.
    fn split(&mut self, buf: &mut BytesMut) -> Result<Option<Item>, FrameError> {
        let before = buf.clone();
        let res = if self.in_startup {
            frame::split_startup(buf).map(|o| o.map(Item::Startup))
        } else if self.mode == Mode::Backend {
            frame::split_backend(buf).map(|o| o.map(Item::Typed))
        } else {
            frame::split_frontend(buf, self.max_message).map(|o| o.map(Item::Typed))
        };
        // (Not where the splitter wants more bytes: both readers reserve room for the whole
        // message there, up to 1 GiB from a length word, and a second reservation per call
        // slowed the target fiftyfold. `frame`'s unit tests cover partial messages.)
        if !self.in_startup && !matches!(res, Ok(None)) {
            // The relay's in-place readers see exactly the message the splitter splits off.
            let mut in_place = before.clone();
            let seen = match self.mode {
                Mode::Backend => frame::backend_message(&mut in_place),
                _ => frame::frontend_message(&mut in_place, self.max_message),
            };
            match (seen, &res) {
                (Ok(Some(m)), Ok(Some(Item::Typed(f)))) => {
                    assert_eq!((m.tag, m.body, m.raw), (f.tag, &f.body[..], &f.raw[..]), "in place vs split");
                }
                (Ok(None), Ok(None)) => {}
                (Err(a), Err(b)) => assert_eq!(&a, b, "in place vs split"),
                (seen, split) => panic!("the in-place reader gave {seen:?}, the splitter {split:?}"),
            }
        }
        match &res {
            Ok(None) | Err(_) => assert_eq!(&buf[..], &before[..], "no bytes may be consumed without a frame"),
            Ok(Some(Item::Typed(f))) => {
                check_typed(f, &before, buf.len(), self.mode, self.max_message);
            }
            Ok(Some(Item::Startup(body))) => {
                let len = body.len() + 4;
                assert!((8..=MAX_STARTUP_PACKET).contains(&len), "startup packet of {len} bytes");
                assert_eq!(&before[..4], &(len as i32).to_be_bytes(), "length word");
                assert_eq!(&before[4..len], &body[..], "startup body is the bytes after the length");
                assert_eq!(buf.len() + len, before.len(), "startup consumed exactly one packet");
                assert_eq!(&buf[..], &before[len..]);
                // In a session, a packet that is not a special request starts the message phase.
                if self.mode == Mode::Session {
                    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    if !matches!(code, 80_877_102..=80_877_104) {
                        self.in_startup = false;
                    }
                }
            }
        }
        res
    }
}

fn check_typed(f: &Frame, before: &[u8], left: usize, mode: Mode, max_message: usize) {
    assert_eq!(f.raw.len(), f.body.len() + 5, "raw = tag + length + body");
    assert_eq!(f.raw[0], f.tag);
    assert_eq!(&f.raw[1..5], &((f.body.len() + 4) as i32).to_be_bytes(), "length word");
    assert_eq!(&f.raw[5..], &f.body[..]);
    assert!(f.raw.len() <= before.len(), "consumed more than the buffer held");
    assert_eq!(&before[..f.raw.len()], &f.raw[..], "frame is the front of the buffer");
    assert_eq!(left + f.raw.len(), before.len(), "consumed exactly one frame");
    if mode == Mode::Backend {
        assert!(f.body.len() <= MAX_PROTOCOL_MESSAGE);
    } else {
        assert!(frame::is_frontend_tag(f.tag), "non-frontend tag {:#04x} accepted", f.tag);
        let limit = match f.tag {
            b'S' | b'H' | b'X' | b'c' => 0,
            b'D' | b'C' | b'E' | b'f' => MAX_STARTUP_PACKET.min(max_message).max(1024),
            _ => max_message,
        };
        assert!(f.body.len() <= limit, "body of {} bytes over the limit {limit}", f.body.len());
    }
}

/// Split everything at once.
fn split_all(mode: Mode, max_message: usize, data: &[u8]) -> Outcome {
    let mut s = Splitter::new(mode, max_message);
    let mut buf = BytesMut::from(data);
    let mut items = Vec::new();
    let mut consumed = 0usize;
    loop {
        match s.split(&mut buf) {
            Ok(Some(item)) => {
                consumed += match &item {
                    Item::Typed(f) => f.raw.len(),
                    Item::Startup(b) => b.len() + 4,
                };
                assert!(consumed <= data.len(), "consumed {consumed} of {} bytes", data.len());
                items.push(item);
            }
            Ok(None) => {
                assert_eq!(consumed + buf.len(), data.len());
                return Outcome { items, end: Ok(()), left: buf.len() };
            }
            Err(e) => return Outcome { items, end: Err(e), left: buf.len() },
        }
    }
}

/// Split the same bytes as they would arrive from a socket: a chunk at a time, splitting as much
/// as possible after each chunk, stopping at the first error.
fn split_streamed(mode: Mode, max_message: usize, data: &[u8], chunk: usize) -> Outcome {
    let mut s = Splitter::new(mode, max_message);
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match s.split(&mut buf) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => return Outcome { items, end: Err(e), left: buf.len() },
            }
        }
    }
    Outcome { items, end: Ok(()), left: buf.len() }
}

fn decode_checks(f: &Frame) {
    let body = &f.body[..];
    if let Ok(sql) = frontend::decode_query(body) {
        assert!(!sql.contains('\0'));
        if f.tag == b'Q' {
            let mut out = BytesMut::new();
            frontend::encode_query(&mut out, sql);
            assert_eq!(&out[..], &f.raw[..], "Query does not round-trip");
        }
    }
    if let Ok(pw) = frontend::decode_password(body) {
        assert!(!pw.contains('\0'));
    }
    if let Ok(p) = frontend::decode_parse(body) {
        assert!(!p.name.contains('\0') && !p.query.contains('\0'));
        for param in 1..=4u16 {
            let rule = ParamRule::SettingName { param };
            let declared = p.param_types.get(usize::from(param) - 1).copied().unwrap_or(0);
            assert_eq!(
                rule.check_declared(&p.param_types).is_ok(),
                matches!(declared, 0 | 25 | 1043),
                "declared type {declared} of ${param}"
            );
        }
        assert!(p.param_types.len() <= i16::MAX as usize);
        if f.tag == b'P' {
            let mut out = BytesMut::new();
            frontend::encode_parse(&mut out, p.name, p.query, &p.param_types);
            assert_eq!(&out[..], &f.raw[..], "Parse does not round-trip");
        }
    }
    if let Ok(b) = frontend::decode_bind_names(body) {
        assert!(!b.portal.contains('\0') && !b.statement.contains('\0'));
        bind_value_checks(b.statement, b.rest);
        if f.tag == b'B' {
            // Renaming the statement keeps everything else byte for byte.
            let mut out = BytesMut::new();
            frontend::encode_bind_renamed(&mut out, &b, b.statement);
            assert_eq!(&out[..], &f.raw[..], "Bind does not round-trip");
        }
    }
    if let Ok((kind, name)) = frontend::decode_target("Describe", body) {
        assert!((kind == b'S' || kind == b'P') && !name.contains('\0'));
        if f.tag == b'D' || f.tag == b'C' {
            let mut out = BytesMut::new();
            frontend::encode_target(&mut out, f.tag, kind, name);
            assert_eq!(&out[..], &f.raw[..], "Describe/Close does not round-trip");
        }
    }
    let fields = backend::parse_error_fields(body);
    if let Some((name, value)) = backend::parse_parameter_status(body) {
        assert!(!name.contains('\0') && !value.contains('\0'));
    }
    // What the proxy itself emits must read back unchanged, for any message text it is handed
    // (a relayed server message here: lossy UTF-8 of hostile bytes, NULs included).
    let message = String::from_utf8_lossy(body);
    let mut out = BytesMut::new();
    backend::error_response_code(&mut out, Severity::Error, &fields.code, &message, Some(&fields.message));
    let mut out_buf = out.clone();
    let emitted = frame::split_backend(&mut out_buf).expect("own ErrorResponse splits").expect("complete");
    assert!(out_buf.is_empty());
    assert_eq!(emitted.tag, b'E');
    let back = backend::parse_error_fields(&emitted.body);
    assert_eq!(back.severity, "ERROR");
    assert_eq!(back.message, message.replace('\0', ""));
    // A code containing NUL would split into a second field; the proxy only relays server codes,
    // which `parse_error_fields` never returns with a NUL.
    assert_eq!(back.code, fields.code);
}

/// `decode_bind_values` on the bytes after a Bind's names, and the rules the session checks bound values with.
fn bind_value_checks(statement: &str, rest: &[u8]) {
    let Ok(values) = frontend::decode_bind_values(rest) else { return };
    // Re-encode what was read: the format codes as they were, then the values.
    let formats = usize::try_from(i16::from_be_bytes([rest[0], rest[1]])).expect("a decoded count is not negative");
    let mut out = Vec::with_capacity(rest.len());
    out.extend_from_slice(&rest[..2 + 2 * formats]);
    assert!(rest[2..2 + 2 * formats].chunks_exact(2).all(|c| c == [0, 0] || c == [0, 1]), "format code accepted");
    out.extend_from_slice(&(values.len() as i16).to_be_bytes());
    let base = rest.as_ptr() as usize;
    for v in &values {
        match v {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                // Each value is the bytes at its place in the message, not a copy or a neighbour.
                let at = v.as_ptr() as usize - base;
                assert_eq!(at, out.len() + 4, "a value is not read where it is");
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    assert!(out.len() <= rest.len() && out[..] == rest[..out.len()], "formats and values do not re-encode");
    // Text values round-trip through the proxy's own Bind.
    if let Some(texts) = values.iter().map(|v| v.and_then(|v| std::str::from_utf8(v).ok())).collect::<Option<Vec<_>>>()
    {
        let texts: Vec<String> = texts.into_iter().map(str::to_owned).collect();
        let mut own = BytesMut::new();
        frontend::encode_bind_text(&mut own, statement, &texts);
        let names = frontend::decode_bind_names(&own[5..]).expect("own Bind names decode");
        assert_eq!(names.statement, statement);
        let back = frontend::decode_bind_values(names.rest).expect("own Bind values decode");
        assert_eq!(back, values, "own Bind does not round-trip");
    }
    // The rules of `set_config($n, …)` and `set_config('<pinned>', $n, …)`.
    for (i, v) in values.iter().enumerate().take(8) {
        let param = u16::try_from(i + 1).expect("small");
        let text = v.and_then(|v| std::str::from_utf8(v).ok()).filter(|t| !t.contains('\0'));
        let name_ok = ParamRule::SettingName { param }.check(*v).is_ok();
        let settable = text.is_some_and(|t| {
            struere_proxy::rewrite::engine::ALLOWED_SETTINGS.iter().any(|s| s.eq_ignore_ascii_case(t))
                && !struere_proxy::rewrite::PINNED_SETTINGS.iter().any(|s| s.eq_ignore_ascii_case(t))
        });
        assert_eq!(name_ok, settable, "set_config name {v:?}");
        let encoding_ok = ParamRule::PinnedValue { param, setting: "client_encoding" }.check(*v).is_ok();
        let utf8 = text.is_some_and(|t| {
            let clean: String = t.chars().filter(char::is_ascii_alphanumeric).collect::<String>().to_ascii_lowercase();
            clean == "utf8" || clean == "unicode"
        });
        assert_eq!(encoding_ok, utf8, "client_encoding value {v:?}");
        let scs_ok = ParamRule::PinnedValue { param, setting: "standard_conforming_strings" }.check(*v).is_ok();
        assert_eq!(scs_ok, text.is_some_and(|t| ["on", "true", "yes"].iter().any(|s| s.eq_ignore_ascii_case(t))));
        for other in ["search_path", "role", "session_authorization", "backslash_quote"] {
            assert!(ParamRule::PinnedValue { param, setting: other }.check(*v).is_err(), "{other} = {v:?}");
        }
    }
    // A value not supplied is refused.
    assert!(ParamRule::SettingName { param: 1 }.check(None).is_err());
}

fuzz_target!(|input: &[u8]| {
    let [mode, chunk, max_idx, data @ ..] = input else {
        return;
    };
    let mode = match mode & 3 {
        0 => Mode::Frontend,
        1 => Mode::Backend,
        2 => Mode::Startup,
        _ => Mode::Session,
    };
    let chunk = usize::from(*chunk).max(1);
    let max_message = MAX_MESSAGES[usize::from(*max_idx) % MAX_MESSAGES.len()];

    let whole = split_all(mode, max_message, data);
    for item in &whole.items {
        match item {
            Item::Typed(f) => decode_checks(f),
            Item::Startup(body) => {
                // Startup bodies are also fed to the decoders: they must not care where bytes came from.
                let _ = frontend::decode_query(body);
                let _ = frontend::decode_parse(body);
                let _ = frontend::decode_password(body);
                if let Ok(b) = frontend::decode_bind_names(body) {
                    bind_value_checks(b.statement, b.rest);
                }
                let _ = frontend::decode_target("Close", body);
                let _ = backend::parse_error_fields(body);
                let _ = backend::parse_parameter_status(body);
            }
        }
    }

    let streamed = split_streamed(mode, max_message, data, chunk);
    assert_eq!(whole.items, streamed.items, "streaming in chunks of {chunk} changed the frames");
    assert_eq!(whole.end, streamed.end, "streaming in chunks of {chunk} changed the outcome");
    if whole.end.is_ok() {
        assert_eq!(whole.left, streamed.left, "streaming in chunks of {chunk} left other bytes");
    }
});
