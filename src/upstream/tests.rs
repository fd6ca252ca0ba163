//! Handshakes against a real PostgreSQL (a `TempCluster` per test) and against scripted fake
//! servers that send broken or hostile bytes.

use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::wire::{self, Frame};
use super::*;
use crate::cluster::TempCluster;

const TIMEOUT: Duration = Duration::from_secs(10);

async fn start_cluster() -> TempCluster {
    tokio::task::spawn_blocking(TempCluster::start).await.unwrap().unwrap()
}

fn config(url: &str) -> UpstreamConfig {
    UpstreamConfig::from_url(url).unwrap()
}

async fn login(cfg: &UpstreamConfig) -> Result<UpstreamConn, UpstreamError> {
    connect(cfg, &cfg.database, &[], TIMEOUT).await
}

/// Sends a simple Query and returns every message up to and including ReadyForQuery.
async fn simple_query(conn: &mut UpstreamConn, sql: &str) -> Vec<Frame> {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out).unwrap();
    conn.stream.write_all(&out).await.unwrap();
    conn.stream.flush().await.unwrap();
    let mut frames = Vec::new();
    loop {
        while let Some(frame) = wire::split_frame(&mut conn.read_buf).unwrap() {
            let done = frame.tag == b'Z';
            frames.push(frame);
            if done {
                return frames;
            }
        }
        let n = tokio::time::timeout(TIMEOUT, conn.stream.read_buf(&mut conn.read_buf))
            .await
            .expect("query timed out")
            .unwrap();
        assert_ne!(n, 0, "server closed the connection");
    }
}

/// The first column of every DataRow, as text.
fn first_column(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.tag == b'D')
        .map(|f| {
            let mut body = f.body.clone();
            assert!(body.get_i16() >= 1);
            let len = usize::try_from(body.get_i32()).unwrap();
            String::from_utf8(body[..len].to_vec()).unwrap()
        })
        .collect()
}

fn error_code(frames: &[Frame]) -> Option<String> {
    frames.iter().find(|f| f.tag == b'E').map(|f| wire::parse_error_response(&f.body).unwrap().code)
}

/// Waits until a backend runs `pg_sleep`, so a cancel cannot arrive before the query does.
async fn wait_for_sleeper(cluster: &TempCluster) {
    for _ in 0..200 {
        let active = cluster
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE state = 'active' AND query LIKE 'SELECT pg_sleep%';",
            )
            .unwrap();
        if active.trim() == "1" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("pg_sleep never started");
}

/// Runs `SELECT pg_sleep(10)` on `conn`, cancels it with `send_cancel` and checks 57014.
async fn cancel_sleeping_query(cluster: &TempCluster, cfg: &UpstreamConfig, mut conn: UpstreamConn) {
    let (pid, secret) = (conn.backend_pid, conn.backend_secret);
    let sleeper = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let frames = simple_query(&mut conn, "SELECT pg_sleep(10)").await;
        (frames, started.elapsed())
    });
    wait_for_sleeper(cluster).await;
    send_cancel(cfg, pid, secret).await.unwrap();
    let (frames, elapsed) = sleeper.await.unwrap();
    assert_eq!(error_code(&frames).as_deref(), Some("57014"));
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
}

#[tokio::test]
async fn scram_login_then_query_and_cancel() {
    let cluster = start_cluster().await;
    // No sslmode: prefer, and this server has no TLS, so it falls back to plain text.
    let cfg = config(&cluster.admin_url("postgres"));
    assert_eq!(cfg.tls, UpstreamTls::Prefer);
    let params = [("application_name".to_string(), "struere-test".to_string())];
    let mut conn = connect(&cfg, "template1", &params, TIMEOUT).await.unwrap();
    assert!(!conn.stream.is_tls());
    assert_eq!(conn.transaction_status, b'I');
    assert!(conn.read_buf.is_empty());
    assert_ne!(conn.backend_pid, 0);
    assert_eq!(conn.parameter("application_name"), Some("struere-test"));
    assert!(conn.parameter("server_version").is_some());
    assert!(!format!("{conn:?}").contains(&conn.backend_secret.to_string()));

    let frames = simple_query(&mut conn, "SELECT 1").await;
    assert_eq!(first_column(&frames), ["1"]);
    let frames = simple_query(&mut conn, "SELECT current_database()").await;
    assert_eq!(first_column(&frames), ["template1"]);

    let sleeper = login(&cfg).await.unwrap();
    cancel_sleeping_query(&cluster, &cfg, sleeper).await;
    // The first connection is unaffected.
    assert_eq!(first_column(&simple_query(&mut conn, "SELECT 2").await), ["2"]);
}

#[tokio::test]
async fn md5_and_cleartext_logins() {
    // Both roles store md5 hashes, which SCRAM cannot use: a login only succeeds if the hba
    // lines below really select md5 and cleartext.
    let cluster = start_cluster().await;
    cluster
        .psql(
            "postgres",
            "SET password_encryption = 'md5';\
             CREATE ROLE md5user LOGIN PASSWORD 'md5 p@ss';\
             CREATE ROLE plainuser LOGIN PASSWORD 'plain';",
        )
        .unwrap();
    cluster.add_hba_line_first("host all md5user 127.0.0.1/32 md5").unwrap();
    cluster.add_hba_line_first("host all plainuser 127.0.0.1/32 password").unwrap();

    let cfg = config(&format!("{}?sslmode=disable", cluster.url("md5user", "md5 p@ss", "postgres")));
    let mut conn = login(&cfg).await.unwrap();
    assert_eq!(first_column(&simple_query(&mut conn, "SELECT current_user").await), ["md5user"]);
    let wrong = config(&cluster.url("md5user", "nope", "postgres"));
    let err = login(&wrong).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");

    let cfg = config(&cluster.url("plainuser", "plain", "postgres"));
    let mut conn = login(&cfg).await.unwrap();
    assert_eq!(first_column(&simple_query(&mut conn, "SELECT current_user").await), ["plainuser"]);
}

#[tokio::test]
async fn refusals_carry_their_cause() {
    let cluster = start_cluster().await;

    let wrong = config(&cluster.url("postgres", "wrong", "postgres"));
    match login(&wrong).await {
        Err(UpstreamError::Server(e)) => {
            assert_eq!((e.code.as_str(), e.severity.as_str()), ("28P01", "FATAL"));
            assert!(e.message.contains("password authentication failed"), "{e}");
        }
        other => panic!("{other:?}"),
    }

    let cfg = config(&cluster.admin_url("postgres"));
    let err = connect(&cfg, "no_such_db", &[], TIMEOUT).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("3D000"), "{err}");

    let mut no_password = cfg.clone();
    no_password.password = None;
    assert!(matches!(login(&no_password).await, Err(UpstreamError::Auth(_))));

    // An unknown startup parameter is the server's error, not a panic or a hang.
    let params = [("no_such_setting".to_string(), "1".to_string())];
    let err = connect(&cfg, "postgres", &params, TIMEOUT).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");

    let port = cluster.port();
    drop(cluster);
    let gone = config(&format!("postgres://u:p@127.0.0.1:{port}/db"));
    let err = login(&gone).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Io(_)), "{err:?}");
    assert!(err.to_string().starts_with("cannot reach upstream"), "{err}");
}

#[tokio::test]
async fn tls_required_and_cancel_over_tls() {
    let cluster = start_cluster().await;
    cluster.enable_ssl().unwrap();
    let cfg = config(&format!("{}?sslmode=require", cluster.admin_url("postgres")));
    let mut conn = login(&cfg).await.unwrap();
    assert!(conn.stream.is_tls());
    let frames = simple_query(&mut conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await;
    assert_eq!(first_column(&frames), ["t"]);

    // prefer picks TLS when the server offers it.
    let prefer = config(&cluster.admin_url("postgres"));
    assert!(login(&prefer).await.unwrap().stream.is_tls());

    let sleeper = login(&cfg).await.unwrap();
    cancel_sleeping_query(&cluster, &cfg, sleeper).await;
}

/// A server that reads one length-prefixed packet (SSLRequest or StartupMessage), answers
/// `reply`, then either closes or keeps the socket open without another word.
async fn fake_server(reply: Vec<u8>, close: bool) -> UpstreamConfig {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let len = sock.read_i32().await.unwrap();
        let mut packet = vec![0; usize::try_from(len - 4).unwrap()];
        sock.read_exact(&mut packet).await.unwrap();
        sock.write_all(&reply).await.unwrap();
        if !close {
            let mut sink = Vec::new();
            let _ = sock.read_to_end(&mut sink).await;
        }
    });
    config(&format!("postgres://u:pw@127.0.0.1:{port}/db?sslmode=disable"))
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    buf.put_u8(tag);
    buf.put_i32(i32::try_from(body.len() + 4).unwrap());
    buf.put_slice(body);
    buf.to_vec()
}

const AUTH_OK: &[u8] = &[0, 0, 0, 0];

#[tokio::test]
async fn fake_server_happy_path_keeps_bytes_past_ready() {
    let mut reply = msg(b'R', AUTH_OK);
    reply.extend(msg(b'N', b"SNOTICE\0Mhello\0\0"));
    reply.extend(msg(b'S', b"server_version\x0015.0\0"));
    reply.extend(msg(b'K', &[0, 0, 0, 42, 0, 0, 0, 7]));
    reply.extend(msg(b'Z', b"I"));
    reply.extend(msg(b'A', b"early")); // not part of the handshake
    let conn = login(&fake_server(reply, false).await).await.unwrap();
    assert_eq!((conn.backend_pid, conn.backend_secret), (42, 7));
    assert_eq!(conn.parameters, [("server_version".into(), "15.0".into())]);
    assert_eq!(&conn.read_buf[..], &msg(b'A', b"early")[..]);
}

#[tokio::test]
async fn fake_server_garbage_is_an_error_not_a_panic() {
    let with_ok = |rest: Vec<u8>| {
        let mut reply = msg(b'R', AUTH_OK);
        reply.extend(rest);
        reply
    };
    let protocol_cases: Vec<Vec<u8>> = vec![
        b"R\0\0\0\x02".to_vec(),               // length below 4
        b"R\x7f\xff\xff\xff".to_vec(),         // absurd length
        b"R\xff\xff\xff\xf0".to_vec(),         // negative length
        msg(b'R', &[0, 0, 0, 5, 1]),           // md5 without its salt
        msg(b'R', b"\0\0\0\x0aSCRAM-SHA-256"), // unterminated mechanism
        msg(b'X', b""),                        // unknown message
        msg(b'K', &[0; 8]),                    // key data before auth
        with_ok(msg(b'S', b"a")),              // bad ParameterStatus
        with_ok(msg(b'K', &[0; 12])),          // 3.2-style long key
        with_ok(msg(b'Z', b"Q")),              // bad transaction status
        with_ok(msg(b'R', AUTH_OK)),           // auth again
        with_ok(msg(b'E', b"SFATAL")),         // unterminated error
    ];
    for reply in protocol_cases {
        let err = login(&fake_server(reply.clone(), false).await).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Protocol(_)), "{reply:?}: {err:?}");
    }

    let plus_only = msg(b'R', b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0\0");
    let err = login(&fake_server(plus_only, false).await).await.unwrap_err();
    assert!(matches!(&err, UpstreamError::Auth(m) if m.contains("SCRAM-SHA-256-PLUS")), "{err:?}");
    let gssapi = msg(b'R', &[0, 0, 0, 7]);
    let err = login(&fake_server(gssapi, false).await).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Auth(_)), "{err:?}");

    // A SCRAM server that answers the first message with garbage.
    let mut scram = msg(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0");
    scram.extend(msg(b'R', b"\0\0\0\x0bnot scram"));
    let err = login(&fake_server(scram, false).await).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Auth(_)), "{err:?}");

    let refusal = msg(b'E', b"SFATAL\0C53300\0Mtoo many\0\0");
    let err = login(&fake_server(refusal, false).await).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("53300"));

    // A message cut short by a close.
    let mut cut = msg(b'R', AUTH_OK);
    cut.truncate(6);
    let err = login(&fake_server(cut, true).await).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Io(_)), "{err:?}");
}

#[tokio::test]
async fn fake_server_silence_times_out() {
    let cfg = fake_server(Vec::new(), false).await;
    let err = connect(&cfg, "db", &[], Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Timeout), "{err:?}");
}

#[tokio::test]
async fn ssl_request_answers() {
    let require = |mut cfg: UpstreamConfig| {
        cfg.tls = UpstreamTls::Require;
        cfg
    };
    let err = login(&require(fake_server(b"N".to_vec(), false).await)).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Tls(_)), "{err:?}");
    let err = login(&require(fake_server(b"X".to_vec(), false).await)).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Protocol(_)), "{err:?}");
    // An ErrorResponse in place of the one-byte answer.
    let refusal = msg(b'E', b"SFATAL\0C53300\0Mfull\0\0");
    let err = login(&require(fake_server(refusal, false).await)).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("53300"), "{err:?}");
    // 'S' then a peer that speaks no TLS: a TLS error, not a hang.
    let err = login(&require(fake_server(b"Sgarbage".to_vec(), true).await)).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Tls(_)), "{err:?}");
}
