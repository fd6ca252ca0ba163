//! The admin HTTP endpoint (off unless `admin_listen` is set; the demo binds it to loopback):
//! `GET /metrics` (Prometheus text), `/healthz` (the process answers), `/readyz` (the upstream
//! answers and every environment has a deployed policy set). One request per connection,
//! HTTP/1.x, bounded reads: it is for operators and scrapers, not for the world.
//!
//! Invariant: nothing served here carries a key, a tenant's data or a statement (see
//! `metrics.rs` for the labels).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::auth::identity::Environment;
use crate::server::Proxy;

/// Largest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request; also bounds the readiness probe.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Serve admin requests until `shutdown` flips.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(TIMEOUT * 2, handle(&proxy, tcp)).await {
                tracing::debug!(error = %e, "admin request timed out");
            }
        });
    }
}

/// The method and path of a request head, if it is one.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    // The query string does not select anything here.
    Some((method, target.split('?').next().unwrap_or(target)))
}

async fn handle(proxy: &Proxy, mut tcp: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST {
            return respond(&mut tcp, 431, "text/plain", "request header too large\n").await;
        }
        let n =
            tokio::time::timeout(TIMEOUT, tcp.read(&mut chunk)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    let Some((method, path)) = request_line(&head) else {
        return respond(&mut tcp, 400, "text/plain", "bad request\n").await;
    };
    if method != "GET" && method != "HEAD" {
        return respond(&mut tcp, 405, "text/plain", "only GET\n").await;
    }
    match path {
        "/metrics" => {
            let body = crate::metrics::render(proxy);
            respond(&mut tcp, 200, "text/plain; version=0.0.4", &body).await
        }
        "/healthz" => respond(&mut tcp, 200, "text/plain", "ok\n").await,
        "/readyz" => {
            let problems = readiness(proxy).await;
            if problems.is_empty() {
                respond(&mut tcp, 200, "text/plain", "ready\n").await
            } else {
                respond(&mut tcp, 503, "text/plain", &format!("not ready:\n{}\n", problems.join("\n"))).await
            }
        }
        _ => respond(&mut tcp, 404, "text/plain", "not found\n").await,
    }
}

/// What keeps the proxy from serving every environment: the upstream not answering, an
/// environment without a deployed policy set.
pub async fn readiness(proxy: &Proxy) -> Vec<String> {
    let mut problems = Vec::new();
    let probe = async {
        let client = proxy.keys.admin().client().await?;
        client.simple_query("SELECT 1").await.map(|_| ())
    };
    match tokio::time::timeout(TIMEOUT, probe).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("upstream: {e}")),
        Err(_) => problems.push("upstream: no answer within 5 s".to_owned()),
    }
    for env in [Environment::Development, Environment::Production] {
        if !proxy.policy_set(env).is_deployed() {
            problems.push(format!("{}: no policy set is deployed", env.as_str()));
        }
    }
    problems
}

async fn respond(tcp: &mut TcpStream, status: u16, content_type: &str, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    tcp.shutdown().await
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_lines() {
        assert_eq!(super::request_line(b"GET /metrics?x=1 HTTP/1.1\r\nhost: a\r\n\r\n"), Some(("GET", "/metrics")));
        assert_eq!(super::request_line(b"GET /readyz HTTP/1.0\r\n\r\n"), Some(("GET", "/readyz")));
        assert_eq!(super::request_line(b"GET /x HTTP/2\r\n\r\n"), None);
        assert_eq!(super::request_line(b"GET /x y HTTP/1.1\r\n\r\n"), None);
        assert_eq!(super::request_line(b"\xff\r\n\r\n"), None);
    }
}
