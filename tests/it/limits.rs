//! Session limits the proxy enforces itself (`idle_session_timeout_secs`,
//! `idle_transaction_timeout_secs`, `statement_timeout_ms`): each is reported to the client with
//! PostgreSQL's own code and a message naming the setting, and counted on /metrics.

use std::time::{Duration, Instant};

use struere_proxy::config::SessionTimeouts;

use crate::hostile::{Raw, cstr, msg, sqlstate};

fn start(timeouts: SessionTimeouts) -> (std::net::SocketAddr, std::sync::Arc<struere_proxy::server::Proxy>) {
    let mut settings = crate::harness::fixture().settings.clone();
    settings.timeouts = timeouts;
    crate::harness::fixture().start_proxy(settings)
}

fn counted(proxy: &struere_proxy::server::Proxy, kind: &str) -> u64 {
    let text = struere_proxy::metrics::render(proxy);
    let line = format!("struere_timeouts_total{{kind=\"{kind}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&line)).and_then(|n| n.parse().ok()).expect("the counter is exposed")
}

/// The FATAL error that ends the session, and its message.
async fn fatal(raw: &mut Raw) -> (String, String) {
    let msgs = raw.until(|m| m.0 == b'E').await;
    let body = &msgs.last().unwrap().1;
    let text = String::from_utf8_lossy(body).into_owned();
    assert!(text.contains("FATAL"), "{text}");
    (sqlstate(body), text)
}

#[tokio::test]
async fn an_idle_session_is_ended_with_57p05_and_an_active_one_is_not() {
    let (addr, proxy) = start(SessionTimeouts { idle_session: Some(Duration::from_secs(1)), ..Default::default() });
    let mut raw = Raw::session_at(addr).await;
    // Busy for longer than the limit in all, but never idle that long.
    for _ in 0..6 {
        raw.send(&msg(b'Q', &cstr("SELECT 1"))).await;
        raw.until_ready().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let started = Instant::now();
    let (code, text) = fatal(&mut raw).await;
    assert_eq!(code, "57P05", "{text}");
    assert!(text.contains("idle_session_timeout_secs"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(counted(&proxy, "idle_session"), 1);
}

#[tokio::test]
async fn idle_in_a_transaction_is_ended_with_25p03() {
    let (addr, proxy) = start(SessionTimeouts { idle_transaction: Some(Duration::from_secs(1)), ..Default::default() });
    let mut raw = Raw::session_at(addr).await;
    raw.send(&msg(b'Q', &cstr("BEGIN"))).await;
    let ready = raw.until_ready().await;
    assert_eq!(ready.last().unwrap().1, b"T");
    let (code, text) = fatal(&mut raw).await;
    assert_eq!(code, "25P03", "{text}");
    assert!(text.contains("idle_transaction_timeout_secs"), "{text}");
    assert_eq!(counted(&proxy, "idle_in_transaction"), 1);
    // Outside a transaction the session may stay idle (no idle_session limit here).
    let mut raw = Raw::session_at(addr).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    raw.send(&msg(b'Q', &cstr("SELECT 1"))).await;
    let answer = raw.until_ready().await;
    assert!(answer.iter().any(|m| m.0 == b'D'));
}

#[tokio::test]
async fn a_statement_over_the_limit_is_cancelled_with_57014_and_the_session_goes_on() {
    let (addr, proxy) = start(SessionTimeouts { statement: Some(Duration::from_millis(300)), ..Default::default() });
    let mut raw = Raw::session_at(addr).await;
    // The client's own setting cannot lift the proxy's limit.
    raw.send(&msg(b'Q', &cstr("SET statement_timeout = 0"))).await;
    raw.until_ready().await;
    let started = Instant::now();
    raw.send(&msg(b'Q', &cstr("SELECT pg_sleep(20)"))).await;
    let answer = raw.until_ready().await;
    let error = answer.iter().find(|m| m.0 == b'E').expect("an error");
    assert_eq!(sqlstate(&error.1), "57014");
    let text = String::from_utf8_lossy(&error.1).into_owned();
    assert!(text.contains("statement timeout") && text.contains("statement_timeout_ms"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10), "cancelled, not run to the end");
    assert_eq!(counted(&proxy, "statement"), 1);
    // The session goes on, and a client's own cancel is still its own (not a timeout).
    raw.send(&msg(b'Q', &cstr("SELECT 1"))).await;
    let answer = raw.until_ready().await;
    assert!(answer.iter().any(|m| m.0 == b'D'));
    // Short statements are untouched.
    for _ in 0..5 {
        raw.send(&msg(b'Q', &cstr("SELECT pg_sleep(0.05)"))).await;
        assert!(raw.until_ready().await.iter().all(|m| m.0 != b'E'));
    }
    assert_eq!(counted(&proxy, "statement"), 1);
}

#[tokio::test]
async fn a_statement_timeouts_cancel_never_reaches_the_statement_after() {
    // PostgreSQL cancels whatever runs when a cancel request arrives, so the session holds what
    // the client sends next until the proxy's request is through (a backend that is idle when
    // it arrives ignores it). The next statement, well under the limit, must never fail.
    let (addr, proxy) = start(SessionTimeouts { statement: Some(Duration::from_millis(40)), ..Default::default() });
    let mut raw = Raw::session_at(addr).await;
    for round in 0..60u32 {
        raw.send(&boundary_statement(round)).await;
        raw.until_ready().await;
        raw.send(&msg(b'Q', &cstr("SELECT pg_sleep(0.01)"))).await;
        assert_eq!(error_of(&raw.until_ready().await), None, "round {round}: the statement after the boundary one");
    }
    assert!(counted(&proxy, "statement") > 0, "some statements reached the limit");
}

#[tokio::test]
async fn a_statement_timeouts_cancel_never_reaches_the_next_session_of_its_connection() {
    // As above, with the session ending right after the statement: its connection goes back
    // to the pool only once the cancel is through, and the next session never sees it.
    let (addr, proxy) = start(SessionTimeouts { statement: Some(Duration::from_millis(40)), ..Default::default() });
    for round in 0..60u32 {
        let mut raw = Raw::session_at(addr).await;
        raw.send(&boundary_statement(round)).await;
        raw.until_ready().await;
        raw.send(&msg(b'X', &[])).await;
        let mut next = Raw::session_at(addr).await;
        next.send(&msg(b'Q', &cstr("SELECT pg_sleep(0.01)"))).await;
        assert_eq!(error_of(&next.until_ready().await), None, "round {round}: the next session's statement");
    }
    assert!(counted(&proxy, "statement") > 0, "some statements reached the limit");
    assert!(
        proxy.pool.stats.reused.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the sessions took over pooled connections"
    );
}

/// A statement that ends around a 40 ms limit (36 to 44 ms): the proxy's cancel of it may be
/// on its way when it has ended already.
fn boundary_statement(round: u32) -> Vec<u8> {
    let sleep_ms = 36 + round % 9;
    msg(b'Q', &cstr(&format!("SELECT pg_sleep({sleep_ms} / 1000.0)")))
}

fn error_of(answer: &[(u8, Vec<u8>)]) -> Option<String> {
    answer.iter().find(|m| m.0 == b'E').map(|m| String::from_utf8_lossy(&m.1).into_owned())
}

#[tokio::test]
async fn a_statement_that_sends_nothing_is_cancelled_at_the_limit_not_at_the_next_wake_up() {
    // The session's first statement, silent until it ends (0.9 s), against a 0.3 s limit: the
    // side that enforces limits wakes for nothing from the server before the key re-check
    // (1 s in these tests), so it must be told that a statement went out.
    let (addr, proxy) = start(SessionTimeouts { statement: Some(Duration::from_millis(300)), ..Default::default() });
    let mut raw = Raw::session_at(addr).await;
    raw.send(&msg(b'Q', &cstr("SELECT pg_sleep(0.9)"))).await;
    let error = error_of(&raw.until_ready().await).expect("cancelled at the limit");
    assert!(error.contains("statement_timeout_ms"), "{error}");
    assert_eq!(counted(&proxy, "statement"), 1);
}
