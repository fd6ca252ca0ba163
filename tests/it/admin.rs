//! The admin HTTP endpoint: health, readiness and Prometheus metrics over real HTTP.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::fixture;

/// (status, body) of `GET path`.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: admin\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// The value of one metric line (exact name and labels).
fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let f = fixture();
    let admin = f.admin_addr.expect("the demo turns the admin endpoint on");
    assert_eq!(get(admin, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(get(admin, "/readyz").await, (200, "ready\n".to_owned()));
    assert_eq!(get(admin, "/nope").await.0, 404);

    let (_, before) = get(admin, "/metrics").await;
    let c = f.dev().await;
    c.simple_query("SELECT 1").await.unwrap();
    assert!(c.simple_query("TRUNCATE entities").await.is_err());
    let (status, body) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let refused = "struere_statements_total{environment=\"development\",verdict=\"refused\"}";
    assert!(metric(&body, refused) > metric(&before, refused), "{body}");
    assert!(metric(&body, "struere_refusals_total{class=\"denied\"}") >= 1.0);
    assert!(metric(&body, "struere_clients") >= 1.0);
    assert!(metric(&body, "struere_rewrite_seconds_count") >= 2.0);
    assert!(metric(&body, "struere_upstream_seconds_count") >= 1.0);
    assert_eq!(metric(&body, "struere_policy_version_info{environment=\"production\",version=\"v1\"}"), 1.0);
    assert!(body.contains("struere_pool_idle "), "{body}");
    assert!(body.contains("struere_events_dropped_total "), "{body}");
    // No key material, no tenant data in what is exposed.
    assert!(!body.contains("sk_") && !body.contains("acme"), "{body}");
}

#[tokio::test]
async fn not_ready_while_an_environment_has_no_policy() {
    let name = crate::harness::unique("adm").replace('-', "_");
    let (mut settings, _) = fixture().scratch_database(&name).await;
    settings.admin_listen = Some("127.0.0.1:0".into());
    let (_, proxy) = fixture().start_proxy(settings);
    let readiness = struere_proxy::admin::readiness(&proxy).await;
    assert_eq!(
        readiness,
        ["development: no policy set is deployed", "production: no policy set is deployed"],
        "{readiness:?}"
    );
}
