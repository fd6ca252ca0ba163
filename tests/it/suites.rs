//! What the client suites run from their public source found (README, "Suites run from their
//! public source"): node-postgres', asyncpg's and psycopg's own tests, run directly and through
//! an operator or a development key, differed in these ways, each now as the server behaves.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::{code, fixture};
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

fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut body = [cstr(name), cstr(sql)].concat();
    body.extend((types.len() as i16).to_be_bytes());
    for t in types {
        body.extend(t.to_be_bytes());
    }
    msg(b'P', &body)
}

/// Bind with text values (no format codes, no result formats).
fn bind(statement: &str, values: &[&str]) -> Vec<u8> {
    let mut body = [cstr(""), cstr(statement)].concat();
    body.extend(0i16.to_be_bytes());
    body.extend((values.len() as i16).to_be_bytes());
    for v in values {
        body.extend((v.len() as i32).to_be_bytes());
        body.extend(v.as_bytes());
    }
    body.extend(0i16.to_be_bytes());
    msg(b'B', &body)
}

fn execute_sync() -> Vec<u8> {
    [msg(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()), msg(b'S', b"")].concat()
}

/// The SQLSTATEs of a round trip's errors. (Boxed: `Raw`'s reads keep a 64 KiB buffer in
/// their futures, and a debug build gives each await of a long test its own copy.)
async fn round_trip(raw: &mut Raw, bytes: &[u8]) -> Vec<String> {
    raw.send(bytes).await;
    let msgs = Box::pin(raw.until_ready()).await;
    msgs.iter().filter(|m| m.0 == b'E').map(|m| sqlstate(&m.1)).collect()
}

/// `query_row`, boxed (see `round_trip`).
async fn boxed_row(raw: &mut Raw, sql: &str) -> Vec<Option<String>> {
    Box::pin(query_row(raw, sql)).await
}

/// psycopg's `test_prepared.py` counts `pg_prepared_statements`: the statements the proxy
/// prepares for a development key's unnamed Parses (and for simple Queries with literals) are
/// the proxy's own, and a client sees only the ones it prepared, as it would directly.
#[tokio::test]
async fn prepared_statements_list_only_the_clients_own() {
    let mut raw = Raw::session().await;
    for _ in 0..3 {
        let batch = [parse("", "SELECT $1::int", &[]), bind("", &["7"]), execute_sync()].concat();
        assert_eq!(round_trip(&mut raw, &batch).await, Vec::<String>::new());
        boxed_row(&mut raw, "SELECT relname FROM pg_class WHERE relname = 'pg_class'").await;
    }
    let count = "SELECT count(*) FROM pg_prepared_statements WHERE name <> ''";
    assert_eq!(boxed_row(&mut raw, count).await, [Some("0".to_owned())]);
    assert_eq!(round_trip(&mut raw, &[parse("mine", "SELECT 1", &[]), msg(b'S', b"")].concat()).await, [""; 0]);
    let names = "SELECT string_agg(p.name, ',') FROM pg_catalog.pg_prepared_statements AS p";
    assert_eq!(boxed_row(&mut raw, names).await, [Some("mine".to_owned())]);
}

/// psycopg sends `select set_config($1, $2, false)` and `select set_config('client_encoding',
/// $1, false)`: the setting (or the pinned setting's value) is a bound value, checked by the
/// proxy on every Bind before it is forwarded (42501 otherwise, the session goes on), also when
/// the statement's rewrite comes from the cache.
#[tokio::test]
async fn set_config_with_a_parameter_is_checked_on_every_bind() {
    let c = fixture().dev().await;
    let sql = "select set_config($1, $2, false)";
    for _ in 0..2 {
        c.query(sql, &[&"application_name", &"psy"]).await.unwrap();
        for (name, value) in [("search_path", "evil"), ("ROLE", "postgres"), ("client_encoding", "utf8")] {
            let e = c.query(sql, &[&name, &value]).await.unwrap_err();
            assert_eq!(code(&e), "42501", "{name}: {e}");
        }
    }
    let shown: String = c.query_one("SHOW application_name", &[]).await.unwrap().get(0);
    assert_eq!(shown, "psy");
    let pinned = "select set_config('client_encoding', $1, false)";
    c.query(pinned, &[&"utf-8"]).await.unwrap();
    assert_eq!(code(&c.query(pinned, &[&"latin1"]).await.unwrap_err()), "42501");
    let encoding: String = c.query_one("SHOW client_encoding", &[]).await.unwrap().get(0);
    let path: String = c.query_one("SHOW search_path", &[]).await.unwrap().get(0);
    assert_eq!(encoding, "UTF8");
    assert!(!path.contains("evil"), "{path}");
    // A simple Query binds nothing; a PREPARE's parameters are EXECUTE's, which no Bind checks.
    for text in ["SELECT set_config($1, 'x', false)", "PREPARE p AS SELECT set_config($1, 'x', false)"] {
        assert_eq!(code(&c.simple_query(text).await.unwrap_err()), "42501", "{text}");
    }
}

/// The same on the wire: unnamed and named statements, pipelined, a parameter declared with a
/// type whose input is not the bytes bound, and a Close the server skipped (after an error up
/// to Sync), which must not lift the named statement's rule.
#[tokio::test]
async fn set_config_parameters_on_the_wire() {
    let mut raw = Raw::session().await;
    let sql = "select set_config($1, $2, false)";
    let bad = [parse("", sql, &[]), bind("", &["search_path", "evil"]), execute_sync()].concat();
    assert_eq!(round_trip(&mut raw, &bad).await, ["42501"]);
    let good = [parse("", sql, &[]), bind("", &["jit", "off"]), execute_sync()].concat();
    assert_eq!(round_trip(&mut raw, &good).await, [""; 0]);
    // Bound again without a new Parse: the rules of the statement the unnamed one stands for.
    assert_eq!(round_trip(&mut raw, &[bind("", &["search_path", "evil"]), execute_sync()].concat()).await, ["42501"]);
    assert_eq!(round_trip(&mut raw, &[bind("", &["jit", "on"]), execute_sync()].concat()).await, [""; 0]);
    // `name` truncates and `bpchar` trims what it reads: only text, varchar or unspecified.
    let typed = [parse("", sql, &[19]), bind("", &["jit", "off"]), execute_sync()].concat();
    assert_eq!(round_trip(&mut raw, &typed).await, ["42501"]);
    // A named statement; a later Close of it that the server skips keeps its rule.
    assert_eq!(round_trip(&mut raw, &[parse("n", sql, &[25, 25]), msg(b'S', b"")].concat()).await, [""; 0]);
    let skipped_close = [
        parse("", "SELECT no_such_column FROM pg_class", &[]),
        msg(b'C', &[vec![b'S'], cstr("n")].concat()),
        msg(b'S', b""),
    ]
    .concat();
    assert_eq!(round_trip(&mut raw, &skipped_close).await, ["42703"]);
    assert_eq!(round_trip(&mut raw, &[bind("n", &["role", "postgres"]), execute_sync()].concat()).await, ["42501"]);
    assert_eq!(round_trip(&mut raw, &[bind("n", &["TimeZone", "UTC"]), execute_sync()].concat()).await, [""; 0]);
    let path = boxed_row(&mut raw, "SHOW search_path").await;
    assert!(!path[0].as_deref().unwrap_or_default().contains("evil"), "{path:?}");
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
