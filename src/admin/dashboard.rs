//! The operator dashboard: server-rendered pages for one environment at a time
//! (`?env=development|production`, every panel, link and form following it) — the policy
//! version in force and its history, development vs production, keys, live sessions, recent
//! events with filters, usage per organization — and two actions: revoke a key, roll back a
//! policy version (after a confirmation page).
//!
//! Invariants: every value printed goes through `html::escape`; nothing shown is a key, a key
//! hash in full, a password or a masked value (keys appear as their display prefix, bundles by
//! a shortened content hash); every action is a POST carrying the operator's CSRF token.

use std::fmt::Write as _;

use super::auth::Operator;
use super::html::{escape, page, utc};
use super::http::{Response, parse_pairs};
use crate::auth::identity::Environment;
use crate::auth::store;
use crate::server::Proxy;

/// Events shown at most.
const EVENTS_SHOWN: i64 = 50;

/// What the page shows: the environment and the events' filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub env: Environment,
    pub org: Option<String>,
    pub verdict: Option<String>,
    pub notice: Option<Notice>,
}

/// The outcome of an action, shown once after its redirect (fixed texts: nothing from the
/// request is reflected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Revoked,
    AlreadyRevoked,
    RolledBack,
    Unchanged,
}

impl Notice {
    fn code(self) -> &'static str {
        match self {
            Notice::Revoked => "revoked",
            Notice::AlreadyRevoked => "already-revoked",
            Notice::RolledBack => "rolled-back",
            Notice::Unchanged => "unchanged",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Notice::Revoked => {
                "Key revoked: it can no longer connect, and its open sessions end within the key cache TTL."
            }
            Notice::AlreadyRevoked => "That key was not active (already revoked, or unknown); nothing changed.",
            Notice::RolledBack => "Rolled back: the restored version is recorded as a new version and is in force now.",
            Notice::Unchanged => "That version is already the one in force; nothing was written.",
        }
    }

    fn parse(s: &str) -> Option<Notice> {
        [Notice::Revoked, Notice::AlreadyRevoked, Notice::RolledBack, Notice::Unchanged]
            .into_iter()
            .find(|n| n.code() == s)
    }
}

fn parse_env(s: Option<&String>) -> Result<Environment, String> {
    match s.map(String::as_str) {
        None | Some("") => Ok(Environment::Development),
        Some("development") => Ok(Environment::Development),
        Some("production") => Ok(Environment::Production),
        Some(_) => Err("env must be development or production".to_owned()),
    }
}

impl View {
    /// Parse the dashboard's query string strictly.
    pub fn parse(query: &str) -> Result<View, String> {
        let q = parse_pairs(query, &["env", "org", "verdict", "notice"])?;
        let env = parse_env(q.get("env"))?;
        let org = q.get("org").filter(|o| !o.is_empty()).cloned();
        if org.as_ref().is_some_and(|o| o.chars().count() > 200) {
            return Err("org is too long".to_owned());
        }
        let verdict = match q.get("verdict").map(String::as_str) {
            None | Some("") => None,
            Some(v @ ("allowed" | "rewritten" | "refused")) => Some(v.to_owned()),
            Some(_) => return Err("verdict must be allowed, rewritten or refused".to_owned()),
        };
        let notice = match q.get("notice") {
            Some(n) => Some(Notice::parse(n).ok_or("unknown notice")?),
            None => None,
        };
        Ok(View { env, org, verdict, notice })
    }
}

/// The dashboard's URL for `env` (the filters are left behind: they name one environment's
/// organizations and events).
pub fn dashboard_url(env: Environment) -> String {
    format!("/dashboard?env={}", env.as_str())
}

fn env_class(env: Environment) -> String {
    format!("env-{}", env.as_str())
}

fn header(op: &Operator, env: Environment) -> String {
    let mut h = String::from("<header><h1>struere-proxy</h1><nav>");
    for e in [Environment::Development, Environment::Production] {
        let class = if e == env { " class=\"on\"" } else { "" };
        let _ = write!(h, "<a id=\"env-{0}\" href=\"{1}\"{class}>{0}</a> ", e.as_str(), escape(&dashboard_url(e)));
    }
    h.push_str("</nav>");
    let _ = write!(
        h,
        "<form method=\"post\" action=\"/reload\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <button type=\"submit\">reload configuration</button></form>",
        csrf = escape(op.csrf())
    );
    if matches!(op, Operator::Cookie { .. }) {
        let _ = write!(
            h,
            "<form method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\">log out</button></form>",
            escape(op.csrf())
        );
    }
    h.push_str("</header>");
    h
}

fn opt(s: Option<&str>) -> String {
    escape(s.unwrap_or("—"))
}

fn short_hash(h: &str) -> String {
    let short: String = h.chars().take(12).collect();
    if short.len() < h.len() { format!("{short}…") } else { short }
}

/// The whole dashboard page for `view`.
pub async fn render(proxy: &Proxy, op: &Operator, view: &View) -> String {
    let env = view.env;
    let mut body = header(op, env);
    body.push_str("<main>");
    if let Some(n) = view.notice {
        let _ = write!(body, "<section id=\"notice\" class=\"ok\">{}</section>", escape(n.text()));
    }
    let client = match proxy.keys.admin().client().await {
        Ok(c) => Some(c),
        Err(e) => {
            let _ =
                write!(body, "<section class=\"err\">cannot reach the database: {}</section>", escape(&e.to_string()));
            None
        }
    };
    body.push_str(&policy_panel(proxy, client.as_deref(), env).await);
    body.push_str(&diff_panel(client.as_deref()).await);
    body.push_str(&keys_panel(proxy, client.as_deref(), op, env).await);
    body.push_str(&sessions_panel(proxy, env));
    body.push_str(&events_panel(client.as_deref(), view).await);
    body.push_str(&usage_panel(client.as_deref(), env).await);
    body.push_str("</main>");
    page(&format!("struere-proxy — {}", env.as_str()), &env_class(env), &body)
}

async fn policy_panel(proxy: &Proxy, client: Option<&tokio_postgres::Client>, env: Environment) -> String {
    let mut s = String::from("<section id=\"policy\"><h2>Policy</h2>");
    let _ = write!(
        s,
        "<p>In force in this proxy for <b>{}</b>: <b id=\"policy-version\">{}</b></p>",
        escape(env.as_str()),
        escape(&proxy.policy_version(env))
    );
    let Some(client) = client else { return s + "</section>" };
    match crate::policy::store::history(client, Some(env)).await {
        Ok(history) if history.is_empty() => {
            s.push_str("<p class=\"err\">Nothing is deployed to this environment: its keys are refused.</p>");
        }
        Ok(history) => {
            s.push_str(
                "<table id=\"history\"><tr><th>version</th><th>deployed</th><th>source</th><th>by</th>\
                 <th>content</th><th></th></tr>",
            );
            let newest = history.first().map(|v| v.version);
            for v in &history {
                let action = if Some(v.version) == newest {
                    "<span class=\"muted\">in force</span>".to_owned()
                } else {
                    format!(
                        "<a href=\"/rollback?env={}&amp;to={}\">roll back to v{}</a>",
                        escape(env.as_str()),
                        v.version,
                        v.version
                    )
                };
                let _ = write!(
                    s,
                    "<tr><td>v{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{action}</td></tr>",
                    v.version,
                    escape(&v.deployed_at),
                    escape(&v.source),
                    escape(&v.deployed_by),
                    escape(&short_hash(&v.content_hash))
                );
            }
            s.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(s, "<p class=\"err\">cannot read the history: {}</p>", escape(&e.to_string()));
        }
    }
    s + "</section>"
}

/// Development vs production, as `policy status` reports it (the same function).
async fn diff_panel(client: Option<&tokio_postgres::Client>) -> String {
    let mut s = String::from("<section id=\"diff\"><h2>Development vs production</h2>");
    let Some(client) = client else { return s + "</section>" };
    match crate::lifecycle::status(client, None).await {
        Ok(status) => {
            let _ = write!(s, "<p>{}</p>", status.versions.iter().map(|v| escape(v)).collect::<Vec<_>>().join("<br>"));
            for section in &status.sections {
                let _ = write!(s, "<h3>{}</h3>", escape(&section.title));
                if section.lines.is_empty() {
                    s.push_str("<p class=\"muted\">no differences</p>");
                } else {
                    let lines: Vec<String> = section.lines.iter().map(|l| escape(l)).collect();
                    let _ = write!(s, "<pre>{}</pre>", lines.join("\n"));
                }
            }
        }
        Err(e) => {
            let _ = write!(s, "<p class=\"err\">cannot compare the environments: {}</p>", escape(&e.to_string()));
        }
    }
    s + "</section>"
}

async fn keys_panel(proxy: &Proxy, client: Option<&tokio_postgres::Client>, op: &Operator, env: Environment) -> String {
    let mut s = format!("<section id=\"keys\"><h2>Keys — {}</h2>", escape(env.as_str()));
    let Some(client) = client else { return s + "</section>" };
    let keys = match store::list_keys(client).await {
        Ok(k) => k,
        Err(e) => {
            let _ = write!(s, "<p class=\"err\">cannot list the keys: {}</p>", escape(&e.to_string()));
            return s + "</section>";
        }
    };
    let sessions = proxy.live_sessions();
    let now = std::time::SystemTime::now();
    let table = |title: &str, rows: Vec<&store::KeyListing>| {
        let mut t = format!(
            "<h3>{}</h3><table class=\"keys\"><tr><th>prefix</th><th>name</th><th>org</th><th>roles</th>\
             <th>actor</th><th>created</th><th>last used</th><th>expires</th><th>state</th><th>sessions</th><th></th></tr>",
            escape(title)
        );
        for k in rows {
            let state = k.state(now);
            let open = sessions.iter().filter(|x| x.key_id == k.id).count();
            let action = if state == "active" {
                format!(
                    "<form method=\"post\" action=\"/keys/revoke\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                     <input type=\"hidden\" name=\"env\" value=\"{}\"><input type=\"hidden\" name=\"id\" value=\"{}\">\
                     <button type=\"submit\" id=\"revoke-{}\">revoke</button></form>",
                    escape(op.csrf()),
                    escape(env.as_str()),
                    k.id,
                    k.id
                )
            } else {
                String::new()
            };
            let _ = write!(
                t,
                "<tr id=\"key-{}\" data-state=\"{state}\"><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{state}</td><td>{open}</td><td>{action}</td></tr>",
                k.id,
                escape(&k.prefix),
                escape(&k.name),
                opt(k.organization.as_deref()),
                escape(&k.roles.join(", ")),
                opt(k.actor.as_deref()),
                utc(k.created_at),
                k.last_used_at.map(utc).unwrap_or_else(|| "never".to_owned()),
                k.expires_at.map(utc).unwrap_or_else(|| "—".to_owned()),
                if state == "active" { "ok" } else { "refused" },
            );
        }
        t.push_str("</table>");
        t
    };
    let env_keys: Vec<_> =
        keys.iter().filter(|k| !k.operator && k.environment.as_deref() == Some(env.as_str())).collect();
    let operator_keys: Vec<_> = keys.iter().filter(|k| k.operator).collect();
    s.push_str(&table(&format!("{} keys ({})", env.as_str(), env_keys.len()), env_keys));
    s.push_str(&table(&format!("operator keys, every environment ({})", operator_keys.len()), operator_keys));
    s + "</section>"
}

fn sessions_panel(proxy: &Proxy, env: Environment) -> String {
    let all = proxy.live_sessions();
    let here: Vec<_> = all.iter().filter(|s| s.environment == Some(env)).collect();
    let operator = all.iter().filter(|s| s.environment.is_none()).count();
    let mut s = format!(
        "<section id=\"sessions\"><h2>Live sessions — {}</h2><p><b id=\"session-count\">{}</b> in {}, {} operator \
         session(s), {} client connection(s) in all, {} idle pooled upstream connection(s).</p>",
        escape(env.as_str()),
        here.len(),
        escape(env.as_str()),
        operator,
        proxy.metrics.clients_current.load(std::sync::atomic::Ordering::Relaxed),
        proxy.pool.idle_count()
    );
    if !here.is_empty() {
        s.push_str(
            "<table><tr><th>key</th><th>name</th><th>org</th><th>roles</th><th>actor</th><th>from</th><th>since</th></tr>",
        );
        for x in here {
            let _ = write!(
                s,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&x.key_prefix),
                escape(&x.key_name),
                opt(x.organization.as_deref()),
                escape(&x.roles.join(", ")),
                opt(x.actor.as_deref()),
                escape(&x.peer.to_string()),
                utc(x.since)
            );
        }
        s.push_str("</table>");
    }
    s + "</section>"
}

async fn events_panel(client: Option<&tokio_postgres::Client>, view: &View) -> String {
    let env = view.env;
    let mut s = format!("<section id=\"events\"><h2>Recent events — {}</h2>", escape(env.as_str()));
    let selected = |v: &str| if view.verdict.as_deref() == Some(v) { " selected" } else { "" };
    let _ = write!(
        s,
        "<form method=\"get\" action=\"/dashboard\" id=\"event-filter\"><input type=\"hidden\" name=\"env\" value=\"{}\">\
         <label>organization <input name=\"org\" value=\"{}\"></label> <label>verdict <select name=\"verdict\">\
         <option value=\"\">any</option><option{}>allowed</option><option{}>rewritten</option><option{}>refused</option>\
         </select></label> <button type=\"submit\">filter</button></form>",
        escape(env.as_str()),
        escape(view.org.as_deref().unwrap_or("")),
        selected("allowed"),
        selected("rewritten"),
        selected("refused")
    );
    let Some(client) = client else { return s + "</section>" };
    let filter = crate::reports::EventFilter {
        after_id: 0,
        environment: Some(env.as_str().to_owned()),
        organization: view.org.clone(),
        verdict: view.verdict.clone(),
        limit: EVENTS_SHOWN,
    };
    match crate::reports::recent_events(client, &filter).await {
        Ok(rows) if rows.is_empty() => s.push_str("<p class=\"muted\">no events</p>"),
        Ok(rows) => {
            s.push_str(
                "<table id=\"event-rows\"><tr><th>at</th><th>org</th><th>key</th><th>actor</th><th>roles</th>\
                 <th>statement</th><th>tables</th><th>verdict</th><th>reason</th><th>policy</th><th>times</th>\
                 <th>rows</th><th>µs</th></tr>",
            );
            for r in rows {
                let reason = if r.reason.is_empty() { String::new() } else { format!("{} {}", r.sqlstate, r.reason) };
                let _ = write!(
                    s,
                    "<tr class=\"{}\"><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td>\
                     <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&r.verdict),
                    escape(&r.at),
                    escape(&r.organization),
                    escape(&r.key_prefix),
                    escape(&r.actor),
                    escape(&r.roles),
                    escape(&r.kinds),
                    escape(&r.tables),
                    escape(&r.verdict),
                    escape(&reason),
                    escape(&r.policy_version),
                    r.statements,
                    r.rows,
                    r.duration_us
                );
            }
            s.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(s, "<p class=\"err\">cannot read the events: {}</p>", escape(&e.to_string()));
        }
    }
    s + "</section>"
}

async fn usage_panel(client: Option<&tokio_postgres::Client>, env: Environment) -> String {
    let mut s = format!("<section id=\"usage\"><h2>Usage per organization — {}</h2>", escape(env.as_str()));
    let Some(client) = client else { return s + "</section>" };
    match crate::reports::usage(client, Some(env.as_str()), true).await {
        Ok(rows) if rows.is_empty() => s.push_str("<p class=\"muted\">no usage recorded yet</p>"),
        Ok(rows) => {
            s.push_str(
                "<table><tr><th>organization</th><th>statements</th><th>rows</th><th>errors</th><th>time (ms)</th></tr>",
            );
            for r in rows {
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td></tr>",
                    escape(&r.organization),
                    r.statements,
                    r.rows,
                    r.errors,
                    r.time_us as f64 / 1000.0
                );
            }
            s.push_str("</table>");
        }
        Err(e) => {
            let _ = write!(s, "<p class=\"err\">cannot read the usage: {}</p>", escape(&e.to_string()));
        }
    }
    s + "</section>"
}

/// The login form (`message`: a fixed text).
pub fn login_page(message: Option<&str>) -> String {
    let message = message.map(|m| format!("<p class=\"err\" id=\"login-error\">{}</p>", escape(m))).unwrap_or_default();
    let body = format!(
        "<header><h1>struere-proxy</h1></header><main><section><h2>Operator login</h2>{message}\
         <form method=\"post\" action=\"/login\"><label>operator token <input type=\"password\" name=\"token\" \
         id=\"token\" autocomplete=\"current-password\" required></label> <button type=\"submit\" id=\"login\">log in\
         </button></form><p class=\"muted\">The token is the proxy's <code>admin_token</code> setting \
         (<code>STRUERE_ADMIN_TOKEN</code>); the demo prints it as <code>ADMIN_TOKEN</code>. Tenant keys are \
         never accepted here.</p></section></main>"
    );
    page("struere-proxy — login", "", &body)
}

/// `POST /keys/revoke` (CSRF already checked): revoke the key with that id, and make this proxy
/// forget its cached lookups so the key is refused at once here (other proxies: within the TTL).
pub async fn revoke(proxy: &Proxy, form: &std::collections::BTreeMap<String, String>) -> Response {
    let Ok(env) = parse_env(form.get("env")) else {
        return Response::text(400, "env must be development or production\n");
    };
    let Some(id) = form.get("id").and_then(|i| i.parse::<i64>().ok()) else {
        return Response::text(400, "id must be a key id\n");
    };
    let client = match proxy.keys.admin().client().await {
        Ok(c) => c,
        Err(e) => return Response::text(503, format!("cannot reach the database: {e}\n")),
    };
    match store::revoke_id(&client, id).await {
        Ok(revoked) => {
            proxy.keys.invalidate_all();
            if revoked {
                tracing::info!(key_id = id, "dashboard: key revoked");
            }
            let notice = if revoked { Notice::Revoked } else { Notice::AlreadyRevoked };
            Response::redirect(format!("{}&notice={}", dashboard_url(env), notice.code()))
        }
        Err(e) => Response::text(503, format!("cannot revoke: {e}\n")),
    }
}

fn rollback_target(pairs: &std::collections::BTreeMap<String, String>) -> Result<(Environment, i32), &'static str> {
    let env = parse_env(pairs.get("env")).map_err(|_| "env must be development or production")?;
    let to = pairs.get("to").and_then(|v| v.parse::<i32>().ok()).filter(|v| *v > 0).ok_or("to must be a version")?;
    Ok((env, to))
}

/// `GET /rollback?env=…&to=N`: what the rollback would change, and the button that does it.
pub async fn rollback_confirm(proxy: &Proxy, op: &Operator, query: &str) -> Response {
    let pairs = match parse_pairs(query, &["env", "to"]) {
        Ok(p) => p,
        Err(e) => return Response::text(400, format!("{e}\n")),
    };
    let (env, to) = match rollback_target(&pairs) {
        Ok(t) => t,
        Err(e) => return Response::text(400, format!("{e}\n")),
    };
    let client = match proxy.keys.admin().client().await {
        Ok(c) => c,
        Err(e) => return Response::text(503, format!("cannot reach the database: {e}\n")),
    };
    let mut body = header(op, env);
    body.push_str("<main><section id=\"confirm\">");
    match crate::lifecycle::plan_rollback(&client, env, to).await {
        Ok((_, changes)) => {
            let _ = write!(
                body,
                "<h2>Roll {} back to v{to}?</h2><p>The bundle of v{to} becomes the newest version of {} (the history \
                 keeps every step). What changes:</p>",
                escape(env.as_str()),
                escape(env.as_str())
            );
            if changes.is_empty() {
                let _ = write!(body, "<p class=\"muted\">nothing: v{to} holds the rules in force</p>");
            } else {
                let lines: Vec<String> = changes.iter().map(|l| escape(l)).collect();
                let _ = write!(body, "<pre id=\"rollback-diff\">{}</pre>", lines.join("\n"));
            }
            let _ = write!(
                body,
                "<form method=\"post\" action=\"/rollback\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <input type=\"hidden\" name=\"env\" value=\"{}\"><input type=\"hidden\" name=\"to\" value=\"{to}\">\
                 <input type=\"hidden\" name=\"confirm\" value=\"yes\"><button type=\"submit\" id=\"confirm-rollback\">\
                 roll back {} to v{to}</button> <a href=\"{}\">cancel</a></form>",
                escape(op.csrf()),
                escape(env.as_str()),
                escape(env.as_str()),
                escape(&dashboard_url(env))
            );
        }
        Err(e) => {
            let _ = write!(body, "<p class=\"err\">cannot roll back: {}</p>", escape(&e.to_string()));
        }
    }
    body.push_str("</section></main>");
    Response::html(200, page("struere-proxy — confirm rollback", &env_class(env), &body))
}

/// `POST /rollback` (CSRF already checked; `confirm=yes` required): the lifecycle's rollback.
pub async fn rollback(proxy: &Proxy, form: &std::collections::BTreeMap<String, String>) -> Response {
    let (env, to) = match rollback_target(form) {
        Ok(t) => t,
        Err(e) => return Response::text(400, format!("{e}\n")),
    };
    if form.get("confirm").map(String::as_str) != Some("yes") {
        return Response::text(400, "a rollback needs its confirmation (confirm=yes)\n");
    }
    let mut client = match store::connect_admin(&proxy.settings.admin_upstream).await {
        Ok(c) => c,
        Err(e) => return Response::text(503, format!("cannot reach the database: {e}\n")),
    };
    let by = format!("dashboard ({})", crate::policy::store::publisher());
    match crate::lifecycle::rollback_by(&mut client, env, to, &by).await {
        Ok(change) => {
            let notice = match change.published {
                crate::policy::store::Published::New(v) => {
                    tracing::info!(environment = env.as_str(), to, version = v, "dashboard: policy rolled back");
                    Notice::RolledBack
                }
                crate::policy::store::Published::Unchanged(_) => Notice::Unchanged,
            };
            Response::redirect(format!("{}&notice={}", dashboard_url(env), notice.code()))
        }
        Err(e) => Response::text(409, format!("cannot roll back: {e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_parse_strictly() {
        let v = View::parse("").unwrap();
        assert_eq!((v.env, v.org, v.verdict), (Environment::Development, None, None));
        let v = View::parse("env=production&org=acme&verdict=refused&notice=revoked").unwrap();
        assert_eq!(v.env, Environment::Production);
        assert_eq!((v.org.as_deref(), v.verdict.as_deref()), (Some("acme"), Some("refused")));
        assert_eq!(v.notice, Some(Notice::Revoked));
        assert!(View::parse("env=staging").is_err());
        assert!(View::parse("verdict=maybe").is_err());
        assert!(View::parse("notice=%3Cscript%3E").is_err(), "notices are fixed texts");
        assert!(View::parse("x=1").is_err());
        assert_eq!(View::parse("env=development&org=&verdict=").unwrap().org, None);
    }

    #[test]
    fn hashes_are_shortened() {
        assert_eq!(short_hash(&"a".repeat(64)), format!("{}…", "a".repeat(12)));
        assert_eq!(short_hash("abc"), "abc");
    }
}
