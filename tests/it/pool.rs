//! Session pooling: a client that leaves politely hands its upstream connection to the next
//! session of the same tenant and startup parameters, reset (`ROLLBACK`, `DISCARD ALL`); other
//! tenants and environments never get it; a connection with something in flight is closed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use struere_proxy::auth::identity::{ActorContext, ActorType, Environment};
use struere_proxy::server::Proxy;
use tokio_postgres::Client;

use crate::harness::{code, connect_to, fixture, unique};

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
