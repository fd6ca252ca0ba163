//! Session pooling: a client that leaves politely hands its upstream connection to the next
//! session of the same tenant and startup parameters, reset (`ROLLBACK`, `DISCARD ALL`); other
//! tenants and environments never get it; a connection with something in flight is closed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use struere_proxy::auth::identity::{ActorContext, ActorType, Environment};
use struere_proxy::server::Proxy;
use tokio_postgres::Client;

use crate::harness::{code, connect_to, copy_in, fixture, unique};

struct Pooled {
    addr: std::net::SocketAddr,
    proxy: Arc<Proxy>,
}

impl Pooled {
    fn start() -> Pooled {
        let (addr, proxy) = fixture().start_proxy(fixture().settings.clone());
        Pooled { addr, proxy }
    }

    async fn connect(&self, key: &str) -> Client {
        let url = format!("host=127.0.0.1 port={} user=t dbname=app password={key} sslmode=disable", self.addr.port());
        connect_to(&url).await.expect("connects")
    }

    /// Wait until `n` connections have been returned to the pool in all (the reset runs after
    /// the client has gone).
    async fn wait_returned(&self, n: u64) {
        let start = Instant::now();
        while self.proxy.pool.stats.returned.load(Ordering::Relaxed) < n {
            assert!(start.elapsed() < Duration::from_secs(30), "the connection never came back to the pool");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn key(org: &str, env: Environment) -> String {
    let actor = ActorContext {
        organization: org.into(),
        environment: env,
        roles: vec!["admin".into()],
        actor_type: ActorType::User,
        actor_id: "pool-user".into(),
    };
    fixture().create_key_for(&unique("pool"), actor, None).await
}

async fn pid(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn a_polite_client_hands_a_reset_connection_to_the_next_session_of_its_tenant() {
    let p = Pooled::start();
    let acme = key("acme", Environment::Development).await;
    let c = p.connect(&acme).await;
    let first = pid(&c).await;
    c.batch_execute(
        "SET TimeZone = 'Asia/Tokyo'; PREPARE pooled_stmt AS SELECT 1; CREATE TEMP TABLE pooled_tmp (x int)",
    )
    .await
    .unwrap();
    drop(c);
    p.wait_returned(1).await;

    let c = p.connect(&acme).await;
    assert_eq!(pid(&c).await, first, "the same backend, no new connection");
    assert_eq!(p.proxy.pool.stats.reused.load(Ordering::Relaxed), 1);
    let tz: String = c.query_one("SELECT current_setting('TimeZone')", &[]).await.unwrap().get(0);
    assert_ne!(tz, "Asia/Tokyo", "settings are reset");
    let e = c.batch_execute("EXECUTE pooled_stmt").await.unwrap_err();
    assert_eq!(code(&e), "26000", "prepared statements are deallocated: {e:?}");
    let e = c.batch_execute("SELECT * FROM pooled_tmp").await.unwrap_err();
    assert_eq!(code(&e), "42P01", "temporary tables are dropped: {e:?}");
    // A transaction left open: rolled back before the next session gets the connection.
    c.batch_execute("BEGIN").await.unwrap();
    let id = unique("pool-row");
    c.execute("INSERT INTO entities (id, entity_type, data) VALUES ($1, 'session', '{}')", &[&id]).await.unwrap();
    drop(c);
    p.wait_returned(2).await;
    let c = p.connect(&acme).await;
    assert_eq!(pid(&c).await, first);
    let n: i64 = c.query_one("SELECT count(*) FROM entities WHERE id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!(n, 0, "the open transaction was rolled back");

    // Other tenants and the other environment never get it (while it is idle in the pool).
    drop(c);
    p.wait_returned(3).await;
    for other in [key("globex", Environment::Development).await, key("acme", Environment::Production).await] {
        let o = p.connect(&other).await;
        assert_ne!(pid(&o).await, first, "a pooled connection crossed tenants or environments");
    }
    assert_eq!(pid(&p.connect(&acme).await).await, first);
}

#[tokio::test]
async fn a_connection_left_with_a_query_in_flight_is_closed_not_pooled() {
    use crate::hostile::{cstr, msg, startup_packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = Pooled::start();
    let acme = key("acme", Environment::Development).await;
    let first = pid(&p.connect(&acme).await).await;
    p.wait_returned(1).await;
    // A raw client: log in, start a slow query and send Terminate without waiting for it.
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&startup_packet(0, &[("user", "t"), ("database", "app")])).await.unwrap();
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf).await.unwrap(); // AuthenticationCleartextPassword
    s.write_all(&msg(b'p', &cstr(&acme))).await.unwrap();
    let mut seen = Vec::new();
    while !seen.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "logged in");
        seen.extend_from_slice(&buf[..n]);
    }
    let mut bytes = msg(b'Q', &cstr("SELECT pg_sleep(0.3)"));
    bytes.extend(msg(b'X', &[]));
    s.write_all(&bytes).await.unwrap();
    let start = Instant::now();
    while p.proxy.pool.stats.closed.load(Ordering::Relaxed) == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the busy connection was never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.proxy.pool.stats.returned.load(Ordering::Relaxed), 1, "only the first, idle one came back");
    // The pooled (idle) connection was the one the raw client got; the next session connects anew.
    let c = p.connect(&acme).await;
    assert_ne!(pid(&c).await, first);
}

// ---------------------------------------------------------------------------------------------
// pool_max_active: at most N upstream connections busy at once; the others wait their turn.

fn limited(max_active: usize, wait_timeout: Duration) -> Pooled {
    let mut settings = fixture().settings.clone();
    settings.pool.max_active = max_active;
    settings.pool.wait_timeout = wait_timeout;
    let (addr, proxy) = fixture().start_proxy(settings);
    Pooled { addr, proxy }
}

impl Pooled {
    fn turns_held(&self) -> usize {
        self.proxy.pool.active.in_use()
    }

    /// Wait until no turn is held. (`query_one` returns at CommandComplete, which may reach
    /// the client before the proxy has read the ReadyForQuery that gives the turn back.)
    async fn no_turn_held(&self, after: &str) {
        let start = Instant::now();
        while self.turns_held() != 0 {
            assert!(start.elapsed() < Duration::from_secs(30), "a turn was kept after {after}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Wait until `n` sessions wait for a turn.
    async fn wait_waiting(&self, n: u64) {
        let start = Instant::now();
        while self.proxy.pool.active.stats.waiting.load(Ordering::Relaxed) != n {
            assert!(start.elapsed() < Duration::from_secs(30), "no session came to wait for a turn");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test]
async fn a_transaction_keeps_its_turn_and_the_next_session_waits_for_it() {
    let p = limited(1, Duration::from_secs(60));
    let acme = key("acme", Environment::Development).await;
    let (a, b) = (p.connect(&acme).await, p.connect(&acme).await);
    a.batch_execute("BEGIN").await.unwrap();
    a.query_one("SELECT 1", &[]).await.unwrap();
    assert_eq!(p.turns_held(), 1);
    let waiting = tokio::spawn(async move { b.query_one("SELECT 2", &[]).await.map(|r| r.get::<_, i32>(0)) });
    p.wait_waiting(1).await;
    // The transaction goes on; the other session still waits (it holds no turn).
    a.query_one("SELECT 3", &[]).await.unwrap();
    assert!(!waiting.is_finished());
    assert_eq!(p.proxy.pool.active.stats.waiting.load(Ordering::Relaxed), 1);
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(waiting.await.unwrap().unwrap(), 2);
    p.no_turn_held("after the waiting session's statement").await;
    assert_eq!(p.proxy.pool.active.stats.waits.load(Ordering::Relaxed), 1);
    let metrics = struere_proxy::metrics::render(&p.proxy);
    assert!(metrics.contains("\nstruere_pool_waits_total 1\n"), "{metrics}");
}

/// Every kind of exchange gives its turn back once the connection is idle and owes nothing:
/// a turn kept by mistake would stall every other session for good.
#[tokio::test]
async fn every_kind_of_round_trip_gives_its_turn_back_when_it_is_answered() {
    let p = limited(1, Duration::from_secs(60));
    let acme = key("acme", Environment::Development).await;
    let c = p.connect(&acme).await;
    c.batch_execute("SELECT 1; SELECT 2").await.unwrap();
    p.no_turn_held("simple Query, two statements").await;
    let statement = c.prepare("SELECT $1::int + 1").await.unwrap();
    c.query_one(&statement, &[&1i32]).await.unwrap();
    p.no_turn_held("Parse/Describe/Sync, then Bind/Execute/Sync").await;
    // Pipelined: tokio-postgres sends each query's messages without waiting for the others'.
    let (x, y, z) = tokio::join!(
        c.query_one(&statement, &[&1i32]),
        c.query_one(&statement, &[&2i32]),
        c.query_one("SELECT count(*) FROM users", &[])
    );
    x.unwrap();
    y.unwrap();
    z.unwrap();
    p.no_turn_held("pipelined round trips").await;
    assert_eq!(code(&c.query_one("SELECT 1/0", &[]).await.unwrap_err()), "22012");
    p.no_turn_held("a statement the server fails").await;
    let refused = c.query_one("SELECT * FROM pg_authid", &[]).await.unwrap_err();
    assert_eq!(code(&refused), "42501");
    p.no_turn_held("a statement the proxy refuses").await;
    let copied = c.copy_out("COPY (SELECT 1) TO STDOUT").await.unwrap();
    let rows: Vec<_> = futures_util::TryStreamExt::try_collect::<Vec<_>>(copied).await.unwrap();
    assert_eq!(rows.concat(), b"1\n".as_slice());
    p.no_turn_held("COPY TO STDOUT").await;
    let table = unique("turns");
    c.batch_execute(&format!("CREATE TABLE {table} (n int)")).await.unwrap();
    assert_eq!(copy_in(&c, &table, b"1\n2\n").await.unwrap(), 2);
    p.no_turn_held("COPY FROM STDIN").await;
    c.batch_execute(&format!("DROP TABLE {table}")).await.unwrap();
    c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    assert_eq!(p.turns_held(), 1, "an open transaction keeps it");
    c.batch_execute("ROLLBACK").await.unwrap();
    p.no_turn_held("ROLLBACK").await;
    // A client that leaves in the middle of its transaction gives its turn back too.
    c.batch_execute("BEGIN").await.unwrap();
    drop(c);
    p.no_turn_held("a client gone in its transaction").await;
    let next = p.connect(&acme).await;
    next.query_one("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn a_session_that_waits_longer_than_pool_wait_timeout_secs_is_ended_with_53300() {
    let p = limited(1, Duration::from_secs(1));
    let acme = key("acme", Environment::Development).await;
    let (a, b) = (p.connect(&acme).await, p.connect(&acme).await);
    a.batch_execute("BEGIN").await.unwrap();
    let err = b.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(code(&err), "53300", "{err}");
    let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
    assert!(message.contains("pool_max_active = 1"), "{message}");
    // FATAL: the session is over.
    assert!(b.batch_execute("SELECT 1").await.unwrap_err().is_closed());
    assert_eq!(p.proxy.pool.active.stats.wait_timeouts.load(Ordering::Relaxed), 1);
    // The session holding the turn goes on, and gives it back at its end.
    a.batch_execute("SELECT 1; COMMIT").await.unwrap();
    p.no_turn_held("COMMIT").await;
    p.connect(&acme).await.query_one("SELECT 1", &[]).await.unwrap();
}
