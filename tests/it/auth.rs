//! API keys end to end: good, bad, revoked and expired keys, revocation of open sessions,
//! the database check, TLS, and startup parameters.

use std::time::Duration;

use struere_proxy::auth::identity::Environment;
use struere_proxy::auth::store;
use struere_proxy::config::TlsMode;

use crate::harness::{code, connect_to, fixture};

#[tokio::test]
async fn unknown_revoked_and_expired_keys_get_the_same_28p01() {
    let f = fixture();
    let unknown = f.connect("sk_dev_0000000000000000000000000000000000000000000000000000000000000000").await;
    let not_a_key = f.connect("hunter2").await;
    let expired_key = f.create_key("expired", Environment::Development, Some(Duration::ZERO)).await;
    let expired = f.connect(&expired_key).await;
    let revoked_key = f.create_key("revoked", Environment::Development, None).await;
    let admin = f.admin().await;
    assert_eq!(store::revoke_key(&admin, "revoked").await.unwrap(), 1);
    let revoked = f.connect(&revoked_key).await;
    let messages: Vec<String> = [unknown, not_a_key, expired, revoked]
        .into_iter()
        .map(|r| {
            let Err(e) = r else { panic!("must be refused") };
            assert_eq!(code(&e), "28P01", "{e:?}");
            e.as_db_error().unwrap().message().to_owned()
        })
        .collect();
    assert!(messages.iter().all(|m| m == &messages[0]), "failures must be indistinguishable: {messages:?}");
}

#[tokio::test]
async fn revoking_a_key_closes_its_open_sessions_within_the_ttl() {
    let f = fixture();
    let key = f.create_key("to-revoke", Environment::Production, None).await;
    let c = f.connect(&key).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    let admin = f.admin().await;
    store::revoke_key(&admin, "to-revoke").await.unwrap();
    // TTL is 1 s in the fixture; allow a few.
    let mut closed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(e) = c.simple_query("SELECT 1").await {
            let ok = e.is_closed() || e.code().map(|c| c.code()) == Some("57P01");
            assert!(ok, "{e:?}");
            closed = true;
            break;
        }
    }
    assert!(closed, "the session of a revoked key must be terminated");
}

#[tokio::test]
async fn expiry_while_connected_ends_the_session() {
    let f = fixture();
    let key = f.create_key("short-lived", Environment::Development, Some(Duration::from_secs(2))).await;
    let c = f.connect(&key).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(c.simple_query("SELECT 1").await.is_err());
}

#[tokio::test]
async fn database_name_must_be_the_configured_one() {
    let f = fixture();
    let url =
        format!("host=127.0.0.1 port={} user=x dbname=postgres password={} sslmode=disable", f.addr.port(), f.dev_key);
    let e = connect_to(&url).await.err().unwrap();
    assert_eq!(code(&e), "3D000");
}

#[tokio::test]
async fn operator_keys_are_refused_when_disabled() {
    let f = fixture();
    let addr = f.extra_proxy(|s| s.operator_keys = false);
    let url =
        format!("host=127.0.0.1 port={} user=x dbname=app password={} sslmode=disable", addr.port(), f.operator_key);
    let e = connect_to(&url).await.err().unwrap();
    assert_eq!(code(&e), "28P01");
    // Environment keys still work there.
    let url = format!("host=127.0.0.1 port={} user=x dbname=app password={} sslmode=disable", addr.port(), f.dev_key);
    connect_to(&url).await.unwrap();
}

#[tokio::test]
async fn startup_parameters_are_screened() {
    let f = fixture();
    let base =
        format!("host=127.0.0.1 port={} user=x dbname=app password={} sslmode=disable", f.addr.port(), f.dev_key);
    let e = connect_to(&format!("{base} options='-c search_path=evil'")).await.err().unwrap();
    assert_eq!(code(&e), "42501");
    assert!(e.as_db_error().unwrap().message().contains("options"));
    // Allowed cosmetics are forwarded.
    let c = connect_to(&format!("{base} application_name=struere-it")).await.unwrap();
    let name: String = c.query_one("SELECT current_setting('application_name')", &[]).await.unwrap().get(0);
    assert_eq!(name, "struere-it");
    // Pinned settings.
    let row = c
        .query_one(
            "SELECT current_setting('search_path'), current_setting('standard_conforming_strings'), current_setting('client_encoding')",
            &[],
        )
        .await
        .unwrap();
    let search_path: String = row.get(0);
    assert!(search_path.starts_with("\"scratch_") && search_path.ends_with("\", public"), "{search_path}");
    assert_eq!((row.get::<_, String>(1), row.get::<_, String>(2)), ("on".into(), "UTF8".into()));
    // RESET ALL restores them (they are startup values).
    c.batch_execute("SET application_name = 'x'; RESET ALL").await.unwrap();
    let sp: String = c.query_one("SELECT current_setting('search_path')", &[]).await.unwrap().get(0);
    assert_eq!(sp, search_path);
}

#[tokio::test]
async fn tls_required_mode_refuses_plaintext() {
    let f = fixture();
    let addr = f.extra_proxy(|s| s.tls_mode = TlsMode::Required);
    let url = format!("host=127.0.0.1 port={} user=x dbname=app password={} sslmode=disable", addr.port(), f.dev_key);
    let e = connect_to(&url).await.err().unwrap();
    assert_eq!(code(&e), "28000");
    assert!(e.as_db_error().unwrap().message().contains("TLS"));
}

#[tokio::test]
async fn production_and_development_keys_both_connect() {
    let f = fixture();
    for key in [&f.dev_key, &f.prod_key] {
        let c = f.connect(key).await.unwrap();
        let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    }
}

#[tokio::test]
async fn exposed_without_a_certificate_tls_is_required_with_a_self_signed_one() {
    let f = fixture();
    // What `Settings::from_raw` gives for a non-loopback listen address and no TLS settings.
    let addr = f.extra_proxy(|s| {
        s.tls_mode = TlsMode::Required;
        s.tls_cert = None;
        s.tls_key = None;
        s.tls_self_signed = true;
    });
    let plain = format!("host=127.0.0.1 port={} user=x dbname=app password={} sslmode=disable", addr.port(), f.dev_key);
    assert_eq!(code(&connect_to(&plain).await.err().unwrap()), "28000");
    let url = format!("postgres://x:{}@127.0.0.1:{}/app?sslmode=require", f.dev_key, addr.port());
    let out =
        std::process::Command::new(&f.psql).arg(&url).args(["-X", "-A", "-t", "-c", "SELECT 6 * 7"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn a_key_holds_at_most_max_connections_per_key_sessions() {
    let f = fixture();
    let addr = f.extra_proxy(|s| s.max_connections_per_key = 2);
    let url = format!("host=127.0.0.1 port={} user=x dbname=app password={} sslmode=disable", addr.port(), f.dev_key);
    let first = connect_to(&url).await.unwrap();
    let _second = connect_to(&url).await.unwrap();
    let e = connect_to(&url).await.err().unwrap();
    assert_eq!(code(&e), "53300");
    assert!(e.as_db_error().unwrap().message().contains("max_connections_per_key = 2"), "{e:?}");
    // Another key is not affected; a closed session frees its slot.
    let other =
        format!("host=127.0.0.1 port={} user=x dbname=app password={} sslmode=disable", addr.port(), f.prod_key);
    assert!(connect_to(&other).await.is_ok());
    drop(first);
    let start = std::time::Instant::now();
    while connect_to(&url).await.is_err() {
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "the slot was never freed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A TLS client as libpq's `sslmode=require` (the fixture's certificate is self-signed), offering
/// `alpn`.
fn direct_tls_connector(alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut config = (*struere_proxy::upstream::tls::client_config().unwrap()).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// PostgreSQL 17's `sslnegotiation=direct`: TLS from the first byte, with the `postgresql` ALPN
/// protocol; without it the proxy closes the connection, as the server does.
#[tokio::test]
async fn direct_tls_needs_the_postgresql_alpn_protocol() {
    use crate::hostile::{cstr, msg, split, startup_packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    let tcp = tokio::net::TcpStream::connect(f.addr).await.unwrap();
    let mut tls = direct_tls_connector(&[b"postgresql"]).connect(name.clone(), tcp).await.expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    tls.write_all(&startup_packet(0, &[("user", "raw"), ("database", "app")])).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let mut read_until = async |tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>, tag: u8| loop {
        let msgs = split(&buf);
        if let Some(i) = msgs.iter().position(|m| m.0 == tag) {
            buf.drain(..msgs[..=i].iter().map(|m| m.1.len() + 5).sum::<usize>());
            return msgs[..=i].to_vec();
        }
        let n = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "closed early: {msgs:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let auth = read_until(&mut tls, b'R').await;
    assert_eq!(auth.last().unwrap().1, 3i32.to_be_bytes(), "cleartext password requested");
    tls.write_all(&msg(b'p', &cstr(&f.dev_key))).await.unwrap();
    read_until(&mut tls, b'Z').await;
    tls.write_all(&msg(b'Q', &cstr("SELECT 40 + 2"))).await.unwrap();
    let answer = read_until(&mut tls, b'Z').await;
    let row = answer.iter().find(|m| m.0 == b'D').expect("a row");
    assert_eq!(row.1, [&[0u8, 1][..], &2i32.to_be_bytes(), b"42"].concat());

    // No ALPN: the handshake completes, then the proxy closes without a word.
    let tcp = tokio::net::TcpStream::connect(f.addr).await.unwrap();
    let mut tls = direct_tls_connector(&[]).connect(name, tcp).await.expect("handshake");
    tls.write_all(&startup_packet(0, &[("user", "raw"), ("database", "app")])).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut rest)).await.unwrap();
    assert!(read.is_err() || rest.is_empty(), "nothing is answered: {rest:?}");
}
