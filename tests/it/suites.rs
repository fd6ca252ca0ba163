//! What the client suites run from their public source found (README, "Suites run from their
//! public source"): node-postgres' and asyncpg's own tests, run directly and through an operator
//! key, differed in these ways, each now as the server behaves.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::fixture;
use crate::hostile::{Raw, cstr, msg, read_to_end, split, sqlstate, startup_packet};

/// The text columns of a DataRow body.
fn columns(row: &[u8]) -> Vec<Option<String>> {
    let n = u16::from_be_bytes([row[0], row[1]]) as usize;
    let mut rest = &row[2..];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(rest[..4].try_into().unwrap());
        rest = &rest[4..];
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(String::from_utf8(rest[..len as usize].to_vec()).unwrap()));
            rest = &rest[len as usize..];
        }
    }
    out
}

async fn query_row(raw: &mut Raw, sql: &str) -> Vec<Option<String>> {
    raw.send(&msg(b'Q', &cstr(sql))).await;
    let msgs = raw.until_ready().await;
    let row = msgs.iter().find(|m| m.0 == b'D').unwrap_or_else(|| panic!("no row for {sql}: {msgs:?}"));
    columns(&row.1)
}

/// node-postgres' `client.connect(); client.end()` writes Terminate before its startup packet
/// (quick-disconnect-tests.js): PostgreSQL closes without a word ("invalid length of startup
/// packet" is only logged), and so does the proxy; a FATAL there was an unhandled error event.
#[tokio::test]
async fn terminate_before_the_startup_packet_closes_unheard() {
    let f = fixture();
    let mut s = TcpStream::connect(f.addr).await.unwrap();
    let mut bytes = msg(b'X', b"");
    bytes.extend(startup_packet(0, &[("user", "raw"), ("database", "app")]));
    s.write_all(&bytes).await.unwrap();
    let out = read_to_end(&mut s).await;
    assert!(out.is_empty(), "the proxy answered {out:?}");
}

/// `pg_terminate_backend` of a session's backend: the server's FATAL 57P01 reaches the client,
/// then the close, as from the server; no error of the proxy's follows it (node-postgres' pool
/// tests expect a query queued behind it to fail with "Connection terminated unexpectedly").
#[tokio::test]
async fn a_terminated_backend_is_reported_once_by_the_server() {
    let f = fixture();
    for key in [&f.operator_key, &f.dev_key] {
        let (mut raw, _) = Raw::session_with(f.addr, key, &[]).await;
        let pid: i32 = query_row(&mut raw, "SELECT pg_backend_pid()").await[0].as_deref().unwrap().parse().unwrap();
        f.admin().await.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A query after the termination, as node-postgres queues one: only the close answers it.
        let _ = raw.s.write_all(&msg(b'Q', &cstr("SELECT 1"))).await;
        let out = read_to_end(&mut raw.s).await;
        let errors: Vec<String> = split(&out).iter().filter(|m| m.0 == b'E').map(|m| sqlstate(&m.1)).collect();
        assert_eq!(errors, ["57P01"], "{}", String::from_utf8_lossy(&out));
    }
}

/// An operator session's BackendKeyData carries its backend's own pid (asyncpg's
/// `get_server_pid()` is compared with notification pids and passed to `pg_terminate_backend`);
/// the secret is still the proxy's. A session's own notifications carry the pid its client was
/// given, for environment keys too (whose pid is the proxy's).
#[tokio::test]
async fn sessions_see_their_own_pid_in_key_data_and_notifications() {
    let f = fixture();
    let (mut op, _) = Raw::session_with(f.addr, &f.operator_key, &[]).await;
    let backend: i32 = query_row(&mut op, "SELECT pg_backend_pid()").await[0].as_deref().unwrap().parse().unwrap();
    assert_eq!(op.pid, backend);
    for raw in [&mut op, &mut Raw::session_with(f.addr, &f.dev_key, &[]).await.0] {
        raw.send(&msg(b'Q', &cstr("LISTEN suites_own; NOTIFY suites_own, 'x'"))).await;
        let mut msgs = raw.until_ready().await;
        if !msgs.iter().any(|m| m.0 == b'A') {
            msgs = raw.until(|m| m.0 == b'A').await;
        }
        let note = msgs.iter().find(|m| m.0 == b'A').unwrap();
        assert_eq!(i32::from_be_bytes(note.1[..4].try_into().unwrap()), raw.pid);
        assert!(note.1[4..].starts_with(b"suites_own\0x\0"), "{:?}", note.1);
    }
    // Cancel still goes through the proxy's key: a wrong secret with the real pid does nothing.
    let mut cancel = TcpStream::connect(f.addr).await.unwrap();
    let mut req = 16i32.to_be_bytes().to_vec();
    req.extend(80877102i32.to_be_bytes());
    req.extend(op.pid.to_be_bytes());
    req.extend(op.secret.wrapping_add(1).to_be_bytes());
    cancel.write_all(&req).await.unwrap();
    let _ = read_to_end(&mut cancel).await;
    assert_eq!(query_row(&mut op, "SELECT 1").await, [Some("1".into())]);
}

/// An operator key's startup parameters go as sent (node-postgres' `options`, asyncpg's
/// `server_settings`), and win over the settings the proxy pins; an environment key may send
/// the settings it may SET, and nothing else.
#[tokio::test]
async fn operator_startup_settings_are_forwarded() {
    let f = fixture();
    let params = [("options", "-c search_path=suites_path,public"), ("enable_hashjoin", "off")];
    let (mut op, _) = Raw::session_with(f.addr, &f.operator_key, &params).await;
    let row = query_row(&mut op, "SELECT current_setting('search_path'), current_setting('enable_hashjoin')").await;
    assert_eq!(row, [Some("suites_path,public".into()), Some("off".into())]);
    let (mut dev, _) = Raw::session_with(f.addr, &f.dev_key, &[("client_min_messages", "warning")]).await;
    assert_eq!(query_row(&mut dev, "SHOW client_min_messages").await, [Some("warning".into())]);
    for refused in [("options", "-c search_path=evil"), ("enable_hashjoin", "off")] {
        let mut s = TcpStream::connect(f.addr).await.unwrap();
        s.write_all(&startup_packet(0, &[("user", "raw"), ("database", "app"), refused])).await.unwrap();
        s.write_all(&msg(b'p', &cstr(&f.dev_key))).await.unwrap();
        let out = read_to_end(&mut s).await;
        let e = split(&out).into_iter().find(|m| m.0 == b'E').unwrap_or_else(|| panic!("{refused:?}: {out:?}"));
        assert_eq!(sqlstate(&e.1), "42501", "{refused:?}");
    }
}

/// asyncpg's type-cache tests change their composite types' attributes (`ALTER TYPE … ADD /
/// DROP / ALTER ATTRIBUTE`): allowed through a development key on its own scratch types, as
/// PostgreSQL prints the client's tree; the server applies it. Another schema's type stays refused.
#[tokio::test]
async fn scratch_composite_types_change_their_attributes() {
    let f = fixture();
    let dev = f.dev().await;
    let t = crate::harness::unique("suites_typ");
    dev.batch_execute(&format!("CREATE TYPE {t} AS (x int, y int)")).await.unwrap();
    for sql in [
        format!("ALTER TYPE {t} ADD ATTRIBUTE c text"),
        format!("ALTER TYPE {t} DROP ATTRIBUTE x"),
        format!("ALTER TYPE {t} ALTER ATTRIBUTE y TYPE bigint"),
    ] {
        dev.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let row = dev.query_one(&format!("SELECT (ROW(1, 'a')::{t}).c, pg_typeof((ROW(1, 'a')::{t}).y)::text"), &[]).await;
    let row = row.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("a".to_owned(), "bigint".to_owned()));
    let e = dev.batch_execute(&format!("ALTER TYPE public.{t} ADD ATTRIBUTE d text")).await.unwrap_err();
    assert_eq!(crate::harness::code(&e), "42501");
    dev.batch_execute(&format!("DROP TYPE {t}")).await.unwrap();
}

/// asyncpg's `copy_records_to_table(…, where=…)`: `COPY … FROM STDIN … WHERE` into a scratch table
/// goes through, and the server filters the rows; a condition outside the function allowlist and
/// a managed target stay refused.
#[tokio::test]
async fn copy_from_stdin_with_a_condition() {
    use futures_util::{SinkExt, pin_mut};
    let f = fixture();
    let dev = f.dev().await;
    let t = crate::harness::unique("suites_copy_where");
    dev.batch_execute(&format!("CREATE TABLE {t} (a text, b int)")).await.unwrap();
    let sink = dev.copy_in(&format!("COPY {t} (a, b) FROM STDIN WHERE a <> 'b-999' AND b > 0")).await.unwrap();
    pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"a-1\t1\nb-999\t2\na-0\t0\na-2\t2\n")).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    let n: i64 = dev.query_one(&format!("SELECT count(*) FROM {t}"), &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    for sql in
        [format!("COPY {t} FROM STDIN WHERE pg_terminate_backend(0)"), "COPY users FROM STDIN WHERE true".to_owned()]
    {
        let e = dev.copy_in::<_, bytes::Bytes>(&sql).await.err().unwrap_or_else(|| panic!("{sql} went through"));
        assert_eq!(crate::harness::code(&e), "42501", "{sql}");
    }
}
