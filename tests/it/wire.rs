//! The relay with tokio-postgres: simple and extended protocol, pipelining, transactions,
//! COPY, large results, binary values, cancel, and refusals that keep the session usable.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt, pin_mut};
use tokio_postgres::SimpleQueryMessage;

use crate::harness::{code, fixture, unique};

fn simple_values(msgs: &[SimpleQueryMessage]) -> Vec<Option<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn simple_protocol_multi_statement() {
    let f = fixture();
    let c = f.dev().await;
    let t = unique("simple");
    let msgs = c
        .simple_query(&format!(
            "CREATE TABLE {t} (id int, name text); INSERT INTO {t} VALUES (1, 'a'), (2, 'b'); SELECT name FROM {t} ORDER BY id"
        ))
        .await
        .unwrap();
    assert_eq!(simple_values(&msgs), [Some("a".into()), Some("b".into())]);
}

#[tokio::test]
async fn extended_protocol_named_unnamed_and_binary() {
    let f = fixture();
    let c = f.dev().await;
    let t = unique("ext");
    c.batch_execute(&format!("CREATE TABLE {t} (id int8, payload bytea, price numeric, at timestamptz)"))
        .await
        .unwrap();
    // Named prepared statement, reused with binary parameters.
    let insert = c.prepare(&format!("INSERT INTO {t} VALUES ($1, $2, $3::text::numeric, now())")).await.unwrap();
    for i in 0..5i64 {
        let payload = vec![0u8, 1, 2, 255, i as u8];
        c.execute(&insert, &[&i, &payload, &format!("{i}.5")]).await.unwrap();
    }
    // Unnamed statement via query with parameters; binary results.
    let rows = c.query(&format!("SELECT id, payload FROM {t} WHERE id >= $1 ORDER BY id"), &[&3i64]).await.unwrap();
    assert_eq!(rows.len(), 2);
    let id: i64 = rows[0].get(0);
    let payload: Vec<u8> = rows[0].get(1);
    assert_eq!(id, 3);
    assert_eq!(payload, vec![0, 1, 2, 255, 3]);
    // Parameter types are carried through Parse.
    let one: i32 = c.query_one("SELECT $1::int4 + 1", &[&41i32]).await.unwrap().get(0);
    assert_eq!(one, 42);
}

#[tokio::test]
async fn pipelined_batch_with_an_error_in_the_middle() {
    let f = fixture();
    let c = f.dev().await;
    let s1 = c.prepare("SELECT 1::int4").await.unwrap();
    let s3 = c.prepare("SELECT 3::int4").await.unwrap();
    // tokio-postgres pipelines concurrent requests on one connection.
    let (a, b, d, e) = tokio::join!(
        c.query_one(&s1, &[]),
        c.query_one("SELECT 1/0", &[]),
        c.query_one(&s3, &[]),
        c.query_one("SELECT current_setting('search_path')", &[]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(code(&b.unwrap_err()), "22012");
    assert_eq!(d.unwrap().get::<_, i32>(0), 3);
    assert!(e.unwrap().get::<_, String>(0).ends_with(", public"));
}

#[tokio::test]
async fn pipelined_refusal_in_the_middle_keeps_order() {
    let f = fixture();
    let c = f.dev().await;
    let (a, b, d) = tokio::join!(
        c.query_one("SELECT 'before'::text", &[]),
        c.query("SET standard_conforming_strings = off", &[]),
        c.query_one("SELECT 'after'::text", &[]),
    );
    assert_eq!(a.unwrap().get::<_, String>(0), "before");
    let err = b.unwrap_err();
    assert_eq!(code(&err), "42501", "{err:?}");
    assert_eq!(d.unwrap().get::<_, String>(0), "after");
}

#[tokio::test]
async fn refusal_keeps_session_usable_and_reports_why() {
    let f = fixture();
    let c = f.dev().await;
    let err = c.simple_query("SET search_path = evil").await.unwrap_err();
    assert_eq!(code(&err), "42501");
    let db = err.as_db_error().unwrap();
    assert!(db.message().contains("search_path"), "{}", db.message());
    let err = c.simple_query("SELECT set_config('standard_conforming_strings', 'off', false)").await.unwrap_err();
    assert_eq!(code(&err), "42501");
    let err = c.simple_query("SELEC 1").await.unwrap_err();
    assert_eq!(code(&err), "42601");
    // One refused statement refuses the whole message: nothing ran.
    let t = unique("atomic");
    let err = c.simple_query(&format!("CREATE TABLE {t} (a int); SET role = postgres")).await.unwrap_err();
    assert_eq!(code(&err), "42501");
    let exists: bool = c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&t]).await.unwrap().get(0);
    assert!(!exists, "the refused message must not have run its first statement");
    assert_eq!(simple_values(&c.simple_query("SELECT 'still here'").await.unwrap()), [Some("still here".into())]);
}

#[tokio::test]
async fn transactions_savepoints_and_refusals_inside_them() {
    let f = fixture();
    let mut c = f.dev().await;
    let t = unique("tx");
    c.batch_execute(&format!("CREATE TABLE {t} (v int)")).await.unwrap();
    {
        let mut tx = c.transaction().await.unwrap();
        tx.execute(&format!("INSERT INTO {t} VALUES (1)"), &[]).await.unwrap();
        let sp = tx.savepoint("sp1").await.unwrap();
        sp.execute(&format!("INSERT INTO {t} VALUES (2)"), &[]).await.unwrap();
        sp.rollback().await.unwrap();
        tx.execute(&format!("INSERT INTO {t} VALUES (3)"), &[]).await.unwrap();
        tx.commit().await.unwrap();
    }
    let rows = c.query(&format!("SELECT v FROM {t} ORDER BY v"), &[]).await.unwrap();
    let vs: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(vs, [1, 3]);

    // A refusal inside a transaction fails it, exactly like a server error: COMMIT rolls back.
    c.batch_execute(&format!("BEGIN; INSERT INTO {t} VALUES (4)")).await.unwrap();
    let err = c.batch_execute("SET ROLE postgres").await.unwrap_err();
    assert_eq!(code(&err), "42501");
    let err = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(code(&err), "25P02", "transaction must be aborted: {err:?}");
    let msgs = c.simple_query("COMMIT").await.unwrap();
    assert!(msgs.iter().any(|m| matches!(m, SimpleQueryMessage::CommandComplete(_))));
    let n: i64 = c.query_one(&format!("SELECT count(*) FROM {t} WHERE v = 4"), &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "a refused statement must not let COMMIT commit part of the work");
}

#[tokio::test]
async fn copy_in_and_out() {
    let f = fixture();
    let c = f.dev().await;
    let t = unique("copy");
    c.batch_execute(&format!("CREATE TABLE {t} (id int, name text)")).await.unwrap();
    let sink = c.copy_in(&format!("COPY {t} (id, name) FROM STDIN")).await.unwrap();
    pin_mut!(sink);
    let mut data = String::new();
    for i in 0..1000 {
        data.push_str(&format!("{i}\tname {i}\n"));
    }
    sink.send(Bytes::from(data)).await.unwrap();
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 1000);
    let stream = c.copy_out(&format!("COPY (SELECT * FROM {t} ORDER BY id) TO STDOUT")).await.unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let text: String = chunks.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    assert_eq!(text.lines().count(), 1000);
    assert!(text.starts_with("0\tname 0\n"));
}

#[tokio::test]
async fn large_result_of_100k_rows() {
    let f = fixture();
    let c = f.dev().await;
    let rows = c.query("SELECT g, repeat('x', 20) FROM generate_series(1, 100000) AS g", &[]).await.unwrap();
    assert_eq!(rows.len(), 100_000);
    let last: i32 = rows[99_999].get(0);
    assert_eq!(last, 100_000);
    let stream = c.query_raw("SELECT g FROM generate_series(1, 100000) AS g", std::iter::empty::<i32>()).await.unwrap();
    let n = stream.fold(0usize, |n, r| async move { n + usize::from(r.is_ok()) }).await;
    assert_eq!(n, 100_000);
}

#[tokio::test]
async fn cancel_a_running_query() {
    let f = fixture();
    let c = f.dev().await;
    let token = c.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let started = std::time::Instant::now();
    let err = c.simple_query("SELECT pg_sleep(20)").await.unwrap_err();
    assert_eq!(code(&err), "57014", "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    canceller.await.unwrap().unwrap();
    assert_eq!(simple_values(&c.simple_query("SELECT 'alive'").await.unwrap()), [Some("alive".into())]);
}

#[tokio::test]
async fn operator_key_forwards_verbatim_and_reaches_other_databases() {
    let f = fixture();
    let c = f.operator().await;
    // The operator key may change settings that environment keys may not.
    c.batch_execute("SET search_path = pg_catalog").await.unwrap();
    let other = crate::harness::connect_to(&format!(
        "host=127.0.0.1 port={} user=ops dbname=postgres password={} sslmode=disable",
        f.addr.port(),
        f.operator_key
    ))
    .await
    .unwrap();
    let db: String = other.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
    assert_eq!(db, "postgres");
    // Environment keys run as the least-privilege role; the operator as the owner.
    let dev_user: String = f.dev().await.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(dev_user, "struere_app");
    let op_user: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(op_user, "postgres");
    // The proxy's own schema is not readable by the least-privilege role.
    let err = f.dev().await.simple_query("SELECT * FROM struere.api_keys").await.unwrap_err();
    assert_eq!(code(&err), "42501");
}

#[tokio::test]
async fn printer_injection_inputs_are_one_statement() {
    let f = fixture();
    let c = f.dev().await;
    let t = unique("inj");
    let y = unique("victim");
    c.batch_execute(&format!("CREATE TABLE {t} (name text); CREATE TABLE {y} (a int)")).await.unwrap();
    let msgs = c.simple_query(&format!("SELECT * FROM {t} WHERE name = 'a\\''; DROP TABLE {y}; --'")).await.unwrap();
    assert_eq!(simple_values(&msgs), Vec::<Option<String>>::new());
    let still: bool = c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&y]).await.unwrap().get(0);
    assert!(still, "the victim table must survive");
    let v = simple_values(&c.simple_query("SELECT 'x''''y'").await.unwrap());
    assert_eq!(v, [Some("x''y".into())]);
    let v = simple_values(
        &c.simple_query("SELECT E'it\\'s', $q$a'b$q$, \"MiXeD\" FROM (SELECT 1 AS \"MiXeD\") s").await.unwrap(),
    );
    assert_eq!(v, [Some("it's".into())]);
}

type Notifications = tokio::sync::mpsc::UnboundedReceiver<(String, String)>;

/// A connection whose notifications (channel, payload) arrive on a channel.
async fn listener(key: &str) -> (tokio_postgres::Client, Notifications) {
    let (client, mut conn) = tokio_postgres::connect(&fixture().url(key), tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        pin_mut!(stream);
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    (client, rx)
}

#[tokio::test]
async fn notifications_are_relayed() {
    let f = fixture();
    let (client, mut rx) = listener(&f.dev_key).await;
    client.batch_execute("LISTEN struere_test").await.unwrap();
    let other = f.dev().await;
    other.batch_execute("NOTIFY struere_test, 'hello'").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, ("struere_test".to_owned(), "hello".to_owned()));
}

#[tokio::test]
async fn lost_upstream_gives_08006_and_proxy_keeps_serving() {
    let f = fixture();
    let c = f.dev().await;
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let admin = f.admin().await;
    admin.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    let text = format!("{err:?}");
    assert!(
        err.code().map(|c| c.code()) == Some("57P01")
            || err.code().map(|c| c.code()) == Some("08006")
            || err.is_closed(),
        "{text}"
    );
    let fresh = f.dev().await;
    assert_eq!(simple_values(&fresh.simple_query("SELECT 'ok'").await.unwrap()), [Some("ok".into())]);
}

#[tokio::test]
async fn tenants_never_hear_each_other() {
    let f = fixture();
    let (client, mut rx) = listener(&f.dev_key).await;
    client.batch_execute("LISTEN jobs").await.unwrap();
    // The production key of the same organization, and the operator on the raw channel name.
    f.connect(&f.prod_key).await.unwrap().batch_execute("NOTIFY jobs, 'from production'").await.unwrap();
    f.operator().await.batch_execute("NOTIFY jobs, 'raw'").await.unwrap();
    f.connect(&f.prod_key)
        .await
        .unwrap()
        .batch_execute("SELECT pg_notify('jobs', 'pg_notify from production')")
        .await
        .unwrap();
    f.dev().await.batch_execute("NOTIFY jobs, 'from development'").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, ("jobs".to_owned(), "from development".to_owned()));
    // pg_notify is namespaced like NOTIFY.
    f.dev().await.batch_execute("SELECT pg_notify('jobs', 'via pg_notify')").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, ("jobs".to_owned(), "via pg_notify".to_owned()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "nothing from other environments or raw channels");
}
