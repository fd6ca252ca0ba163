//! The admin HTTP endpoint (off unless `admin_listen` is set; the demo binds it to loopback):
//! `GET /metrics` (Prometheus text), `/healthz` (the process answers), `/readyz` (the upstream
//! answers and every environment has a deployed policy set), the operator dashboard
//! (`/dashboard`, `/login`, actions; `dashboard.rs`) and `POST /reload`. One request per
//! connection, HTTP/1.x, bounded reads (`http.rs`): it is for operators and scrapers, not for
//! the world.
//!
//! Invariants: `/metrics`, `/healthz` and `/readyz` carry no key, tenant data or statement (see
//! `metrics.rs` for the labels); everything else needs the operator token (`auth.rs`), and is
//! refused outright while none is configured.

pub mod auth;
pub mod dashboard;
pub mod html;
pub mod http;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::auth::identity::Environment;
use crate::server::Proxy;
use auth::{AdminAuth, Denied, Operator};
use http::{Method, Request, Response};

/// Time a client has to send its request; also bounds the readiness probe.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a wrong token waits for its answer (slows down guessing).
const FAILURE_DELAY: Duration = Duration::from_millis(300);

/// Serve admin requests until `shutdown` flips.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let auth = match AdminAuth::new() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            tracing::error!(error = %e, "admin endpoint off: no randomness for its sessions");
            return;
        }
    };
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
        let (proxy, auth) = (Arc::clone(&proxy), Arc::clone(&auth));
        tokio::spawn(async move {
            // Long enough for a dashboard page (several queries) or a rollback.
            if let Err(e) = tokio::time::timeout(TIMEOUT * 6, handle(&proxy, &auth, tcp)).await {
                tracing::debug!(error = %e, "admin request timed out");
            }
        });
    }
}

async fn handle(proxy: &Proxy, auth: &AdminAuth, mut tcp: TcpStream) -> std::io::Result<()> {
    let req = match http::read_request(&mut tcp, TIMEOUT).await {
        Ok(Some(req)) => req,
        Ok(None) => return Ok(()),
        Err(refused) => {
            http::write_response(&mut tcp, &Response::refused(&refused), true).await?;
            // Read what the client is still sending (briefly, boundedly) so that closing with
            // unread input does not reset the connection before it reads the answer.
            let mut sink = [0u8; 4096];
            let mut left = 1usize << 20;
            let drain = async {
                while let Ok(n @ 1..) = tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await {
                    left = left.saturating_sub(n);
                    if left == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
            return Ok(());
        }
    };
    let resp = route(proxy, auth, &req).await;
    http::write_response(&mut tcp, &resp, req.method != Method::Head).await
}

fn method_not_allowed(allow: &str) -> Response {
    Response::text(405, "method not allowed\n").with("allow", allow.to_owned())
}

/// The page or answer for one request.
pub async fn route(proxy: &Proxy, auth: &AdminAuth, req: &Request) -> Response {
    let get = matches!(req.method, Method::Get | Method::Head);
    match req.path.as_str() {
        "/metrics" | "/healthz" | "/readyz" if !get => method_not_allowed("GET, HEAD"),
        "/metrics" => {
            let mut r = Response::text(200, crate::metrics::render(proxy));
            r.content_type = "text/plain; version=0.0.4";
            r
        }
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" => {
            let problems = readiness(proxy).await;
            if problems.is_empty() {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, format!("not ready:\n{}\n", problems.join("\n")))
            }
        }
        "/" if get => Response::redirect("/dashboard".to_owned()),
        "/login" if get => match proxy.current().admin_token {
            Some(_) => Response::html(200, dashboard::login_page(None)),
            None => off(),
        },
        "/login" => login(proxy, auth, req).await,
        "/dashboard" | "/rollback" | "/keys/revoke" | "/logout" | "/reload" => operator_route(proxy, auth, req).await,
        "/" => method_not_allowed("GET, HEAD"),
        _ => Response::text(404, "not found\n"),
    }
}

/// The dashboard while no operator token is configured.
fn off() -> Response {
    Response::text(
        403,
        "the dashboard is off: no operator token is configured (set admin_token or STRUERE_ADMIN_TOKEN)\n",
    )
}

async fn login(proxy: &Proxy, auth: &AdminAuth, req: &Request) -> Response {
    if req.method != Method::Post {
        return method_not_allowed("GET, HEAD, POST");
    }
    if !req.is_form() {
        return Response::text(415, "expected application/x-www-form-urlencoded\n");
    }
    let form = match std::str::from_utf8(&req.body)
        .map_err(|e| e.to_string())
        .and_then(|b| http::parse_pairs(b, &["token"]))
    {
        Ok(f) => f,
        Err(e) => return Response::text(400, format!("{e}\n")),
    };
    let configured = proxy.current().admin_token.clone();
    match auth.login(form.get("token").map(String::as_str).unwrap_or(""), configured.as_deref()) {
        Ok(cookie) => {
            tracing::info!("dashboard: operator logged in");
            Response::redirect(dashboard::dashboard_url(Environment::Development))
                .with("set-cookie", auth::session_cookie(&cookie))
        }
        Err(Denied::Off) => off(),
        Err(_) => {
            tracing::warn!("dashboard: failed login");
            tokio::time::sleep(FAILURE_DELAY).await;
            Response::html(401, dashboard::login_page(Some("wrong token")))
        }
    }
}

/// Routes that need the operator.
async fn operator_route(proxy: &Proxy, auth: &AdminAuth, req: &Request) -> Response {
    let configured = proxy.current().admin_token.clone();
    let op = match auth.check(req, configured.as_deref()) {
        Ok(op) => op,
        Err(Denied::Off) => return off(),
        Err(Denied::WrongToken) => {
            tracing::warn!(path = %req.path, "admin: wrong operator token");
            tokio::time::sleep(FAILURE_DELAY).await;
            return Response::text(401, "wrong operator token\n").with("www-authenticate", "Bearer".to_owned());
        }
        Err(Denied::Anonymous) if req.method == Method::Get && req.path == "/dashboard" => {
            return Response::redirect("/login".to_owned());
        }
        Err(Denied::Anonymous) => {
            return Response::text(401, "log in (POST /login) or send Authorization: Bearer <operator token>\n")
                .with("www-authenticate", "Bearer".to_owned());
        }
    };
    let get = matches!(req.method, Method::Get | Method::Head);
    match (req.path.as_str(), get) {
        ("/dashboard", true) => match dashboard::View::parse(&req.query) {
            Ok(view) => Response::html(200, dashboard::render(proxy, &op, &view).await),
            Err(e) => Response::text(400, format!("{e}\n")),
        },
        ("/rollback", true) => dashboard::rollback_confirm(proxy, &op, &req.query).await,
        ("/dashboard", false) => method_not_allowed("GET, HEAD"),
        ("/keys/revoke" | "/logout" | "/reload", true) => method_not_allowed("POST"),
        (path, _) => action(proxy, auth, &op, path, req).await,
    }
}

/// A POST action: CSRF checked (`/reload` by bearer needs none: no browser sends a bearer token
/// on its own), form parsed strictly, then done.
async fn action(proxy: &Proxy, auth: &AdminAuth, op: &Operator, path: &str, req: &Request) -> Response {
    let fields: &[&str] = match path {
        "/keys/revoke" => &["csrf", "env", "id"],
        "/rollback" => &["csrf", "env", "to", "confirm"],
        _ => &["csrf"],
    };
    let bearer_reload = path == "/reload" && matches!(op, Operator::Bearer { .. });
    if !req.body.is_empty() && !req.is_form() {
        return Response::text(415, "expected application/x-www-form-urlencoded\n");
    }
    let form =
        match std::str::from_utf8(&req.body).map_err(|e| e.to_string()).and_then(|b| http::parse_pairs(b, fields)) {
            Ok(f) => f,
            Err(e) => return Response::text(400, format!("{e}\n")),
        };
    if !bearer_reload && !op.csrf_matches(form.get("csrf").map(String::as_str)) {
        tracing::warn!(path, "admin: action refused: missing or wrong CSRF token");
        return Response::text(403, "missing or wrong CSRF token: reload the dashboard and try again\n");
    }
    match path {
        "/keys/revoke" => dashboard::revoke(proxy, &form).await,
        "/rollback" => dashboard::rollback(proxy, &form).await,
        "/logout" => {
            auth.logout(op);
            Response::redirect("/login".to_owned()).with("set-cookie", auth::cleared_cookie())
        }
        _ => match proxy.reload().await {
            Ok(changes) if changes.is_empty() => Response::text(200, "reloaded: no changes\n"),
            Ok(changes) => {
                let lines: Vec<String> = changes.iter().map(ToString::to_string).collect();
                Response::text(200, format!("reloaded:\n{}\n", lines.join("\n")))
            }
            Err(e) => Response::text(500, format!("reload failed: {e}\n")),
        },
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
