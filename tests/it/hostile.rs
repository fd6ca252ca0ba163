//! Hostile and odd bytes on a raw socket: each bad connection ends with an error and the proxy
//! keeps serving everyone else. Also the protocol corners no driver exercises on purpose.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::fixture;

pub(crate) fn startup_packet(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&((3i32 << 16) | i32::from(minor)).to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

pub(crate) fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

pub(crate) fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Backend messages as (tag, body).
pub(crate) fn split(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if b.len() < 1 + len {
            break;
        }
        out.push((b[0], b[5..1 + len].to_vec()));
        b = &b[1 + len..];
    }
    out
}

pub(crate) fn sqlstate(body: &[u8]) -> String {
    let mut rest = body;
    while let Some((&k, after)) = rest.split_first() {
        if k == 0 {
            break;
        }
        let end = after.iter().position(|&c| c == 0).unwrap_or(after.len());
        if k == b'C' {
            return String::from_utf8_lossy(&after[..end]).into_owned();
        }
        rest = &after[(end + 1).min(after.len())..];
    }
    String::new()
}

pub(crate) struct Raw {
    pub(crate) s: TcpStream,
    buf: Vec<u8>,
    pub(crate) pid: i32,
    pub(crate) secret: i32,
}

impl Raw {
    async fn connect() -> TcpStream {
        TcpStream::connect(fixture().addr).await.unwrap()
    }

    /// Start up and authenticate with the dev key; read through the first ReadyForQuery.
    pub(crate) async fn session() -> Raw {
        Raw::session_at(fixture().addr).await
    }

    /// `session` with the proxy at `addr`.
    pub(crate) async fn session_at(addr: std::net::SocketAddr) -> Raw {
        Raw::session_with(addr, &fixture().dev_key, &[]).await.0
    }

    /// A session with `key` and extra startup parameters; also returns the startup's messages.
    pub(crate) async fn session_with(
        addr: std::net::SocketAddr,
        key: &str,
        params: &[(&str, &str)],
    ) -> (Raw, Vec<(u8, Vec<u8>)>) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let all: Vec<(&str, &str)> =
            [("user", "raw"), ("database", "app")].into_iter().chain(params.iter().copied()).collect();
        s.write_all(&startup_packet(0, &all)).await.unwrap();
        let mut raw = Raw { s, buf: Vec::new(), pid: 0, secret: 0 };
        let r = raw.until(|m| m.0 == b'R').await;
        assert_eq!(r.last().unwrap().1, 3i32.to_be_bytes(), "cleartext password requested");
        raw.s.write_all(&msg(b'p', &cstr(key))).await.unwrap();
        let msgs = raw.until_ready().await;
        let k = msgs.iter().find(|m| m.0 == b'K').expect("BackendKeyData");
        raw.pid = i32::from_be_bytes(k.1[0..4].try_into().unwrap());
        raw.secret = i32::from_be_bytes(k.1[4..8].try_into().unwrap());
        (raw, msgs)
    }

    pub(crate) async fn until(&mut self, stop: impl Fn(&(u8, Vec<u8>)) -> bool) -> Vec<(u8, Vec<u8>)> {
        let mut chunk = [0u8; 65536];
        loop {
            let msgs = split(&self.buf);
            if let Some(i) = msgs.iter().position(&stop) {
                let consumed: usize = msgs[..=i].iter().map(|m| m.1.len() + 5).sum();
                self.buf.drain(..consumed);
                return msgs[..=i].to_vec();
            }
            let n = tokio::time::timeout(Duration::from_secs(20), self.s.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "connection closed early; got {:?}", msgs.iter().map(|m| m.0 as char).collect::<String>());
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub(crate) async fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        self.until(|m| m.0 == b'Z').await
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }
}

/// Read until EOF (with a deadline) and return everything.
pub(crate) async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("server closes");
    out
}

async fn proxy_still_serves() {
    let c = fixture().dev().await;
    let v: i32 = c.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
}

fn fatal_code(bytes: &[u8]) -> String {
    let msgs = split(bytes);
    let e = msgs.iter().find(|m| m.0 == b'E').unwrap_or_else(|| panic!("no ErrorResponse in {bytes:?}"));
    sqlstate(&e.1)
}

/// Bytes that are not a startup packet end the connection without a word, as PostgreSQL ends it
/// (its "invalid length of startup packet" is only logged).
#[tokio::test]
async fn garbage_before_startup() {
    let mut s = Raw::connect().await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let out = read_to_end(&mut s).await;
    assert!(out.is_empty(), "{out:?}");
    let mut s = Raw::connect().await;
    s.write_all(&[0, 0, 0, 4]).await.unwrap();
    let out = read_to_end(&mut s).await;
    assert!(out.is_empty(), "{out:?}");
    proxy_still_serves().await;
}

#[tokio::test]
async fn truncated_startup_and_truncated_message() {
    let mut s = Raw::connect().await;
    s.write_all(&[0, 0, 0, 40, 0, 3, 0, 0, b'u']).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = read_to_end(&mut s).await;
    let mut raw = Raw::session().await;
    // A Query header announcing 100 bytes, then only 10, then EOF.
    let mut q = vec![b'Q'];
    q.extend_from_slice(&104i32.to_be_bytes());
    q.extend_from_slice(b"SELECT 1; ");
    raw.send(&q).await;
    raw.s.shutdown().await.unwrap();
    let _ = read_to_end(&mut raw.s).await;
    proxy_still_serves().await;
}

#[tokio::test]
async fn absurd_length_after_startup() {
    let mut raw = Raw::session().await;
    raw.send(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await;
    let out = read_to_end(&mut raw.s).await;
    assert_eq!(fatal_code(&out), "54000");
    let mut raw = Raw::session().await;
    raw.send(&[b'Q', 0xff, 0xff, 0xff, 0xf0]).await;
    let out = read_to_end(&mut raw.s).await;
    assert_eq!(fatal_code(&out), "08P01");
    proxy_still_serves().await;
}

#[tokio::test]
async fn unknown_message_type() {
    let mut raw = Raw::session().await;
    raw.send(&msg(b'!', b"boom")).await;
    let out = read_to_end(&mut raw.s).await;
    assert_eq!(fatal_code(&out), "08P01");
    proxy_still_serves().await;
}

#[tokio::test]
async fn invalid_utf8_query_ends_the_connection() {
    let mut raw = Raw::session().await;
    raw.send(&msg(b'Q', b"SELECT '\xff\xfe'\0")).await;
    let out = read_to_end(&mut raw.s).await;
    assert_eq!(fatal_code(&out), "08P01");
    proxy_still_serves().await;
}

#[tokio::test]
async fn fastpath_function_call_is_refused_and_session_survives() {
    let mut raw = Raw::session().await;
    // FunctionCall: oid 1 (anything), 0 arg formats, 0 args, result format 0.
    let mut body = 1i32.to_be_bytes().to_vec();
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    raw.send(&msg(b'F', &body)).await;
    let msgs = raw.until_ready().await;
    assert_eq!(msgs[0].0, b'E');
    assert_eq!(sqlstate(&msgs[0].1), "42501");
    raw.send(&msg(b'Q', &cstr("SELECT 'ok'"))).await;
    let msgs = raw.until_ready().await;
    assert!(msgs.iter().any(|m| m.0 == b'D'));
}

#[tokio::test]
async fn extended_refusal_discards_until_sync_in_order() {
    let mut raw = Raw::session().await;
    let mut batch = Vec::new();
    // 1: fine
    batch.extend(msg(b'P', &[cstr(""), cstr("SELECT 1"), vec![0, 0]].concat()));
    batch.extend(msg(b'B', &[cstr(""), cstr(""), vec![0, 0, 0, 0, 0, 0]].concat()));
    batch.extend(msg(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()));
    // 2: refused, and what follows up to Sync is skipped
    batch.extend(msg(b'P', &[cstr("s2"), cstr("SET search_path = x"), vec![0, 0]].concat()));
    batch.extend(msg(b'B', &[cstr(""), cstr("s2"), vec![0, 0, 0, 0, 0, 0]].concat()));
    batch.extend(msg(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()));
    batch.extend(msg(b'S', b""));
    // 3: after Sync everything works again
    batch.extend(msg(b'P', &[cstr(""), cstr("SELECT 3"), vec![0, 0]].concat()));
    batch.extend(msg(b'B', &[cstr(""), cstr(""), vec![0, 0, 0, 0, 0, 0]].concat()));
    batch.extend(msg(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()));
    batch.extend(msg(b'S', b""));
    raw.send(&batch).await;
    let first = raw.until_ready().await;
    let tags: String = first.iter().map(|m| m.0 as char).collect();
    assert_eq!(tags, "12DCEZ", "ParseComplete, BindComplete, DataRow, CommandComplete, Error, Ready");
    assert_eq!(sqlstate(&first[4].1), "42501");
    assert_eq!(first[5].1, b"I");
    let second = raw.until_ready().await;
    let tags: String = second.iter().map(|m| m.0 as char).collect();
    assert_eq!(tags, "12DCZ");
}

#[tokio::test]
async fn newer_protocol_minor_is_negotiated_down() {
    let f = fixture();
    let mut s = Raw::connect().await;
    s.write_all(&startup_packet(2, &[("user", "raw"), ("database", "app"), ("_pq_.frobnicate", "1")])).await.unwrap();
    let mut raw = Raw { s, buf: Vec::new(), pid: 0, secret: 0 };
    let msgs = raw.until(|m| m.0 == b'R').await;
    assert_eq!(msgs[0].0, b'v', "NegotiateProtocolVersion first");
    assert_eq!(&msgs[0].1[0..4], &0i32.to_be_bytes(), "newest minor 0");
    assert!(String::from_utf8_lossy(&msgs[0].1).contains("_pq_.frobnicate"));
    raw.send(&msg(b'p', &cstr(&f.dev_key))).await;
    raw.until_ready().await;
}

#[tokio::test]
async fn forged_cancel_does_nothing_and_real_cancel_works() {
    let mut raw = Raw::session().await;
    raw.send(&msg(b'Q', &cstr("SELECT pg_sleep(1.5)"))).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cancel = |pid: i32, secret: i32| async move {
        let mut c = Raw::connect().await;
        let mut p = 16i32.to_be_bytes().to_vec();
        p.extend_from_slice(&80_877_102i32.to_be_bytes());
        p.extend_from_slice(&pid.to_be_bytes());
        p.extend_from_slice(&secret.to_be_bytes());
        c.write_all(&p).await.unwrap();
        let _ = read_to_end(&mut c).await;
    };
    cancel(raw.pid, raw.secret.wrapping_add(1)).await;
    let msgs = raw.until_ready().await;
    assert!(msgs.iter().all(|m| m.0 != b'E'), "a forged cancel must not cancel anything");
    raw.send(&msg(b'Q', &cstr("SELECT pg_sleep(20)"))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel(raw.pid, raw.secret).await;
    let msgs = raw.until_ready().await;
    let e = msgs.iter().find(|m| m.0 == b'E').expect("cancelled");
    assert_eq!(sqlstate(&e.1), "57014");
}

#[tokio::test]
async fn password_that_is_not_utf8() {
    let mut s = Raw::connect().await;
    s.write_all(&startup_packet(0, &[("user", "raw"), ("database", "app")])).await.unwrap();
    s.write_all(&msg(b'p', b"\xff\xfe\0")).await.unwrap();
    let out = read_to_end(&mut s).await;
    assert_eq!(fatal_code(&out), "08P01");
    proxy_still_serves().await;
}

#[tokio::test]
async fn encodings_other_than_utf8_are_refused_for_environment_keys() {
    let mut s = Raw::connect().await;
    s.write_all(&startup_packet(0, &[("user", "raw"), ("database", "app"), ("client_encoding", "SJIS")]))
        .await
        .unwrap();
    s.write_all(&msg(b'p', &cstr(&fixture().dev_key))).await.unwrap();
    let out = read_to_end(&mut s).await;
    assert_eq!(fatal_code(&out), "42501");
}

/// An operator key's statements go as sent, so its client may use any encoding the server
/// knows: the bytes of a LATIN1 client reach the server and come back unchanged.
#[tokio::test]
async fn operator_keys_keep_the_clients_encoding() {
    let f = fixture();
    let (mut raw, startup) = Raw::session_with(f.addr, &f.operator_key, &[("client_encoding", "LATIN1")]).await;
    let status: Vec<&[u8]> = startup.iter().filter(|m| m.0 == b'S').map(|m| m.1.as_slice()).collect();
    assert!(status.contains(&&b"client_encoding\0LATIN1\0"[..]), "ParameterStatus: {status:?}");
    // 'café' in LATIN1 (é = 0xE9), not valid UTF-8; the server reads it as LATIN1.
    raw.send(&msg(b'Q', b"SELECT 'caf\xe9' AS w, length('caf\xe9') AS n\0")).await;
    let msgs = raw.until_ready().await;
    let row = msgs.iter().find(|m| m.0 == b'D').unwrap_or_else(|| panic!("no row: {msgs:?}"));
    // DataRow: 2 columns, 'caf\xe9' (4 bytes) and '4'.
    assert_eq!(row.1, [&[0u8, 2][..], &4i32.to_be_bytes(), b"caf\xe9", &1i32.to_be_bytes(), b"4"].concat());
}

#[tokio::test]
async fn parse_with_two_statements_is_refused() {
    let mut raw = Raw::session().await;
    let mut batch = msg(b'P', &[cstr(""), cstr("SELECT 1; SELECT 2"), vec![0, 0]].concat());
    batch.extend(msg(b'S', b""));
    raw.send(&batch).await;
    let msgs = raw.until_ready().await;
    assert_eq!(msgs[0].0, b'E');
    assert_eq!(sqlstate(&msgs[0].1), "42601");
}

#[tokio::test]
async fn oversized_or_wrong_message_before_authentication() {
    // Found by fuzzing: a 5-byte header must not make the proxy wait for (and reserve) 16 MiB
    // from a client that has not authenticated.
    let mut s = Raw::connect().await;
    s.write_all(&startup_packet(0, &[("user", "raw"), ("database", "app")])).await.unwrap();
    s.write_all(&[b'p', 0x00, 0xff, 0xff, 0xff]).await.unwrap();
    let out = read_to_end(&mut s).await;
    assert_eq!(fatal_code(&out), "54000");
    let mut s = Raw::connect().await;
    s.write_all(&startup_packet(0, &[("user", "raw"), ("database", "app")])).await.unwrap();
    s.write_all(&[b'Q', 0x00, 0x00, 0x10, 0x00]).await.unwrap();
    let out = read_to_end(&mut s).await;
    assert_eq!(fatal_code(&out), "08P01");
    proxy_still_serves().await;
}
