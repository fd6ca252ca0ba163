//! Graceful shutdown: no new clients; idle sessions end at once with 57P01; a running statement
//! and an open transaction finish first; what is still busy at the timeout is ended.

use std::time::Duration;

use crate::harness::{connect_to, fixture};

fn url(addr: std::net::SocketAddr) -> String {
    format!("host=127.0.0.1 port={} user=t dbname=app password={} sslmode=disable", addr.port(), fixture().dev_key)
}

async fn closed_within(c: &tokio_postgres::Client, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while !c.is_closed() {
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_lets_running_work_finish_and_ends_idle_sessions() {
    let running = fixture().start_running(fixture().settings.clone());
    let addr = running.addr;
    let idle = connect_to(&url(addr)).await.unwrap();
    let in_tx = connect_to(&url(addr)).await.unwrap();
    in_tx.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let busy = connect_to(&url(addr)).await.unwrap();
    let slow = tokio::spawn(async move {
        let r = busy.simple_query("SELECT pg_sleep(1.37)").await.map(|_| ());
        (r, busy)
    });
    // The drain starts once the statement runs upstream (a duration no other test sleeps for),
    // not after a fixed pause, which a loaded machine's first rewrite of the text can outlast:
    // the session was then still idle.
    let owner = fixture().admin().await;
    let start = std::time::Instant::now();
    loop {
        let running: i64 = owner
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%pg_sleep(1.37)%' \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running > 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the statement never ran upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain = tokio::spawn(running.drain(Duration::from_secs(20)));

    assert!(closed_within(&idle, Duration::from_secs(10)).await, "the idle session ends at once");
    let (result, busy) = slow.await.unwrap();
    assert!(result.is_ok(), "the running statement finishes: {result:?}");
    assert!(closed_within(&busy, Duration::from_secs(10)).await, "then its session ends");
    // The open transaction goes on until it commits.
    let one: i32 = in_tx.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    in_tx.batch_execute("COMMIT").await.unwrap();
    assert!(closed_within(&in_tx, Duration::from_secs(10)).await);
    assert!(connect_to(&url(addr)).await.is_err(), "no new clients while draining");
    assert_eq!(drain.await.unwrap(), 0, "nothing had to be ended by force");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_still_busy_at_the_timeout_get_57p01() {
    let running = fixture().start_running(fixture().settings.clone());
    let in_tx = connect_to(&url(running.addr)).await.unwrap();
    in_tx.batch_execute("BEGIN").await.unwrap();
    let forced = running.drain(Duration::from_millis(300)).await;
    assert_eq!(forced, 1);
    let e = in_tx.simple_query("SELECT 1").await.unwrap_err();
    let code = e.as_db_error().map(|d| d.code().code().to_owned());
    assert!(code.as_deref() == Some("57P01") || e.is_closed(), "{e:?}");
}

/// Under `pool_max_active`, a session waiting for its turn when the drain starts is not idle: it
/// gets the turn when the transaction holding it ends, runs its statement, then ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_waiting_for_its_turn_runs_its_statement_before_the_drain_ends_it() {
    let mut settings = fixture().settings.clone();
    settings.pool.max_active = 1;
    let running = fixture().start_running(settings);
    let addr = running.addr;
    let proxy = std::sync::Arc::clone(&running.proxy);
    let holder = connect_to(&url(addr)).await.unwrap();
    let waiter = connect_to(&url(addr)).await.unwrap();
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiting = tokio::spawn(async move {
        let r = waiter.simple_query("SELECT 2").await.map(|_| ());
        (r, waiter)
    });
    let start = std::time::Instant::now();
    while proxy.pool.active.stats.waiting.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the second session never waited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = tokio::spawn(running.drain(Duration::from_secs(20)));
    holder.batch_execute("COMMIT").await.unwrap();
    let (result, waiter) = waiting.await.unwrap();
    assert!(result.is_ok(), "the waiting statement runs once the turn is free: {result:?}");
    assert!(closed_within(&waiter, Duration::from_secs(10)).await, "then its session ends");
    assert!(closed_within(&holder, Duration::from_secs(10)).await);
    assert_eq!(drain.await.unwrap(), 0, "nothing had to be ended by force");
}
