//! The operator dashboard: HTTP-level checks (who gets in, CSRF, strict parsing, escaping,
//! rollback with confirmation, reload) and a real headless browser (Debian's chromium driven
//! through chromedriver) that logs in, switches environment, filters events and revokes a key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use struere_proxy::auth::identity::Environment;
use struere_proxy::config::RawConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{code, fixture, unique};

/// One HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Send `raw` as is and read the answer.
pub async fn send(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8(out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers =
        lines.filter_map(|l| l.split_once(": ")).map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned())).collect();
    Reply { status, headers, body: body.to_owned() }
}

/// A request with these headers (and a form body when `form` is given).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    form: Option<&str>,
) -> Reply {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nhost: admin\r\n");
    for (n, v) in headers {
        raw.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(body) = form {
        raw.push_str(&format!(
            "content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        raw.push_str("\r\n");
    }
    send(addr, raw.as_bytes()).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The CSRF token a page's forms carry.
pub fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("the page has a form with a CSRF token") + 19;
    page[at..].split('"').next().unwrap().to_owned()
}

async fn key_id(name: &str) -> i64 {
    let admin = fixture().admin().await;
    admin.query_one("SELECT id FROM struere.api_keys WHERE name = $1", &[&name]).await.unwrap().get(0)
}

#[tokio::test]
async fn the_dashboard_is_refused_without_a_configured_token() {
    let f = fixture();
    let mut settings = f.settings.clone();
    settings.admin_listen = Some("127.0.0.1:0".into());
    settings.admin_token = None;
    let running = f.start_running(settings);
    let admin = running.admin_addr.unwrap();
    let r = request(admin, "GET", "/dashboard", &[], None).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("no operator token is configured"), "{}", r.body);
    // Not even the right-looking credentials, nor a tenant key, open it.
    for token in [f.admin_token.as_str(), f.dev_key.as_str(), f.operator_key.as_str()] {
        let b = bearer(token);
        assert_eq!(request(admin, "GET", "/dashboard", &[("authorization", &b)], None).await.status, 403);
        let form = format!("token={token}");
        assert_eq!(request(admin, "POST", "/login", &[], Some(&form)).await.status, 403);
    }
    assert_eq!(
        request(admin, "POST", "/reload", &[("authorization", &bearer(&f.admin_token))], None).await.status,
        403
    );
    // Health and metrics stay as they are.
    assert_eq!(request(admin, "GET", "/healthz", &[], None).await.status, 200);
    assert_eq!(request(admin, "GET", "/metrics", &[], None).await.status, 200);
    running.stop().await;
}

#[tokio::test]
async fn operator_token_by_bearer_or_login_cookie_and_csrf_on_actions() {
    let f = fixture();
    let admin = f.admin_addr.unwrap();
    let good = bearer(&f.admin_token);

    // Anonymous: sent to the login page; a wrong token: 401; a tenant key is a wrong token.
    let r = request(admin, "GET", "/dashboard", &[], None).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/login")));
    for wrong in [bearer("not-the-token-0123456789"), bearer(&f.dev_key), "Basic b3A6cHc=".to_owned()] {
        let r = request(admin, "GET", "/dashboard", &[("authorization", &wrong)], None).await;
        assert_eq!(r.status, 401, "{wrong}");
        assert!(!r.body.contains("policy"), "{}", r.body);
    }

    // Bearer: the page, every panel, no secret.
    let r = request(admin, "GET", "/dashboard?env=development", &[("authorization", &good)], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    for panel in ["id=\"policy\"", "id=\"diff\"", "id=\"keys\"", "id=\"sessions\"", "id=\"events\"", "id=\"usage\""] {
        assert!(r.body.contains(panel), "no {panel}");
    }
    assert!(r.body.contains("id=\"policy-version\">v1<"), "{}", r.body);
    assert!(!r.body.contains(&f.dev_key) && !r.body.contains(&f.admin_token) && !r.body.contains(&f.operator_key));
    assert!(!r.body.contains(&f.dev_key[..20]), "not even a long part of a key");
    let header_of = |name: &str| r.header(name).map(str::to_owned);
    assert_eq!(header_of("x-frame-options").as_deref(), Some("DENY"));
    assert!(header_of("content-security-policy").unwrap().contains("default-src 'none'"));
    let bearer_csrf = csrf_of(&r.body);

    // A key to revoke, connected first.
    let name = unique("dash-http");
    let key = f.create_key(&name, Environment::Development, None).await;
    let id = key_id(&name).await.to_string();
    f.connect(&key).await.expect("the new key connects").simple_query("SELECT 1").await.unwrap();

    // Actions need the CSRF token: missing, wrong, or another credential's: refused.
    let revoke = |csrf: &str| format!("csrf={csrf}&env=development&id={id}");
    let r =
        request(admin, "POST", "/keys/revoke", &[("authorization", &good)], Some(&format!("env=development&id={id}")))
            .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = request(admin, "POST", "/keys/revoke", &[("authorization", &good)], Some(&revoke("00ff"))).await;
    assert_eq!(r.status, 403);

    // Login form: wrong token 401, right token a cookie session.
    let r = request(admin, "POST", "/login", &[], Some("token=wrong-token-0123456789")).await;
    assert_eq!(r.status, 401);
    assert!(r.header("set-cookie").is_none());
    let form = format!("token={}", f.admin_token);
    let r = request(admin, "POST", "/login", &[], Some(&form)).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let set_cookie = r.header("set-cookie").unwrap().to_owned();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let r = request(admin, "GET", "/dashboard", &[("cookie", &cookie)], None).await;
    assert_eq!(r.status, 200);
    let cookie_csrf = csrf_of(&r.body);
    assert_ne!(cookie_csrf, bearer_csrf);
    // The bearer's CSRF token is not the cookie session's.
    let r = request(admin, "POST", "/keys/revoke", &[("cookie", &cookie)], Some(&revoke(&bearer_csrf))).await;
    assert_eq!(r.status, 403);
    f.connect(&key).await.expect("nothing was revoked yet");

    // With its own token, the revoke goes through and the key is refused at once.
    let r = request(admin, "POST", "/keys/revoke", &[("cookie", &cookie)], Some(&revoke(&cookie_csrf))).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/dashboard?env=development&notice=revoked"));
    let Err(e) = f.connect(&key).await else { panic!("the revoked key connected") };
    assert_eq!(code(&e), "28P01");
    let r = request(admin, "GET", "/dashboard?env=development&notice=revoked", &[("cookie", &cookie)], None).await;
    assert!(r.body.contains(&format!("<tr id=\"key-{id}\" data-state=\"revoked\">")), "{}", r.body);

    // Bearer actions work with the bearer's token; logging out ends the cookie session.
    let r = request(admin, "POST", "/keys/revoke", &[("authorization", &good)], Some(&revoke(&bearer_csrf))).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/dashboard?env=development&notice=already-revoked")));
    let r = request(admin, "POST", "/logout", &[("cookie", &cookie)], Some(&format!("csrf={cookie_csrf}"))).await;
    assert_eq!(r.status, 303);
    assert_eq!(request(admin, "GET", "/dashboard", &[("cookie", &cookie)], None).await.status, 303);
}

#[tokio::test]
async fn hostile_values_are_escaped() {
    let f = fixture();
    let admin = f.admin_addr.unwrap();
    let name = format!("<script>alert('{}')</script>\"><img src=x onerror=alert(2)>", unique("x"));
    let _key = f.create_key(&name, Environment::Development, None).await;
    let r =
        request(admin, "GET", "/dashboard?env=development", &[("authorization", &bearer(&f.admin_token))], None).await;
    assert_eq!(r.status, 200);
    assert!(!r.body.contains("<script>") && !r.body.contains("<img src=x"), "a hostile name reached the page raw");
    assert!(r.body.contains("&lt;script&gt;alert(&#39;"), "the name is shown, escaped");
    assert!(r.body.contains("&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"));
    // Filters are echoed escaped too.
    let r = request(
        admin,
        "GET",
        "/dashboard?env=development&org=%22%3E%3Cscript%3Ex%3C%2Fscript%3E",
        &[("authorization", &bearer(&f.admin_token))],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!r.body.contains("\"><script>x") && r.body.contains("&quot;&gt;&lt;script&gt;x"));
}

#[tokio::test]
async fn requests_are_parsed_strictly() {
    let f = fixture();
    let admin = f.admin_addr.unwrap();
    let good = bearer(&f.admin_token);
    let auth = [("authorization", good.as_str())];
    assert_eq!(request(admin, "DELETE", "/dashboard", &auth, None).await.status, 405);
    let r = request(admin, "PUT", "/reload", &auth, None).await;
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD, POST")));
    assert_eq!(request(admin, "POST", "/dashboard", &auth, Some("")).await.status, 405);
    assert_eq!(request(admin, "GET", "/keys/revoke", &auth, None).await.status, 405);
    assert_eq!(request(admin, "POST", "/metrics", &[], None).await.status, 405);
    assert_eq!(request(admin, "GET", "/dashboard?env=staging", &auth, None).await.status, 400);
    assert_eq!(request(admin, "GET", "/dashboard?env=production&x=1", &auth, None).await.status, 400);
    // Bodies: only forms, only known fields, at most 16 KiB, no chunking.
    let json = b"POST /keys/revoke HTTP/1.1\r\nauthorization: Bearer x\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    let json = String::from_utf8_lossy(json).replace("Bearer x", &good);
    assert_eq!(send(admin, json.as_bytes()).await.status, 415);
    assert_eq!(request(admin, "POST", "/keys/revoke", &auth, Some("csrf=a&csrf=b")).await.status, 400);
    assert_eq!(request(admin, "POST", "/keys/revoke", &auth, Some("what=1")).await.status, 400);
    assert_eq!(request(admin, "POST", "/keys/revoke", &auth, Some("csrf=%zz")).await.status, 400);
    let big = format!("POST /login HTTP/1.1\r\ncontent-length: {}\r\n\r\n", 1 << 20);
    assert_eq!(send(admin, big.as_bytes()).await.status, 413);
    let chunked = "POST /login HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(send(admin, chunked.as_bytes()).await.status, 501);
    let huge_head = format!("GET /dashboard HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(send(admin, huge_head.as_bytes()).await.status, 431);
    assert_eq!(send(admin, b"GARBAGE\r\n\r\n").await.status, 400);
}

#[tokio::test]
async fn rollback_shows_what_changes_and_needs_confirmation() {
    let f = fixture();
    let name = unique("dashrb").replace('-', "_");
    let (mut settings, owner_url) = f.scratch_database(&name).await;
    // Two versions of development: the shipped set, then one where teachers lose a column.
    let mut owner = crate::harness::connect_to(&owner_url).await.unwrap();
    let shipped = struere_proxy::policy::Bundle::shipped();
    let label = std::path::Path::new("policies");
    struere_proxy::lifecycle::sync_development(&mut owner, &shipped, label).await.unwrap();
    struere_proxy::lifecycle::deploy(&mut owner).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for file in ["tables.toml", "development.toml", "production.toml"] {
        std::fs::copy(format!("{}/policies/{file}", env!("CARGO_MANIFEST_DIR")), dir.path().join(file)).unwrap();
    }
    let dev = std::fs::read_to_string(dir.path().join("development.toml")).unwrap();
    std::fs::write(dir.path().join("development.toml"), dev.replacen("\"data.startTime\", ", "", 1)).unwrap();
    let changed = struere_proxy::policy::Bundle::from_dir(dir.path()).unwrap();
    let v2 = struere_proxy::lifecycle::sync_development(&mut owner, &changed, dir.path()).await.unwrap();
    assert_eq!(v2.published.version(), 2, "{v2:?}");

    settings.admin_listen = Some("127.0.0.1:0".into());
    settings.admin_token = Some("rollback-token-0123456789".into());
    let running = f.start_running(settings);
    let admin = running.admin_addr.unwrap();
    let good = bearer("rollback-token-0123456789");
    let auth = [("authorization", good.as_str())];

    let page = request(admin, "GET", "/dashboard?env=development", &auth, None).await;
    assert!(page.body.contains("href=\"/rollback?env=development&amp;to=1\""), "{}", page.body);
    let confirm = request(admin, "GET", "/rollback?env=development&to=1", &auth, None).await;
    assert_eq!(confirm.status, 200, "{}", confirm.body);
    assert!(confirm.body.contains("id=\"rollback-diff\"") && confirm.body.contains("startTime"), "{}", confirm.body);
    let csrf = csrf_of(&confirm.body);
    // Without the confirmation, or without CSRF: nothing happens.
    let no_confirm = format!("csrf={csrf}&env=development&to=1");
    assert_eq!(request(admin, "POST", "/rollback", &auth, Some(&no_confirm)).await.status, 400);
    assert_eq!(request(admin, "POST", "/rollback", &auth, Some("env=development&to=1&confirm=yes")).await.status, 403);
    let history = struere_proxy::policy::store::history(&owner, Some(Environment::Development)).await.unwrap();
    assert_eq!(history.len(), 2);
    let r = request(admin, "POST", "/rollback", &auth, Some(&format!("{no_confirm}&confirm=yes"))).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/dashboard?env=development&notice=rolled-back")), "{r:?}");
    let history = struere_proxy::policy::store::history(&owner, Some(Environment::Development)).await.unwrap();
    assert_eq!((history[0].version, history[0].source.as_str()), (3, "rollback to v1"));
    assert!(history[0].deployed_by.starts_with("dashboard"), "{:?}", history[0]);
    assert_eq!(history[0].content_hash, history[2].content_hash, "v3 is v1's bundle");
    // The proxy hears of it (NOTIFY) and puts it in force.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while running.proxy.policy_version(Environment::Development) != "v3" {
        assert!(tokio::time::Instant::now() < deadline, "v3 never came into force");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An unknown version is refused with the lifecycle's message.
    let r = request(admin, "GET", "/rollback?env=production&to=9", &auth, None).await;
    assert!(r.body.contains("production has no version 9"), "{}", r.body);
    running.stop().await;
}

#[tokio::test]
async fn reload_over_http_applies_live_settings_and_reports_the_rest() {
    let f = fixture();
    let mut settings = f.settings.clone();
    settings.admin_listen = Some("127.0.0.1:0".into());
    settings.admin_token = Some("first-token-0123456789".into());
    let running = f.start_running(settings.clone());
    let admin = running.admin_addr.unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    let write_config = |token: &str, per_key: usize, listen: &str| {
        let text = format!(
            "upstream = {:?}\nadmin_upstream = {:?}\ndatabase = {:?}\nlisten = {listen:?}\nadmin_listen = \"127.0.0.1:0\"\n\
             tls_mode = \"optional\"\ntls_cert = {:?}\ntls_key = {:?}\nkey_cache_ttl_secs = 1\noperator_keys = true\n\
             allow_functions = [\"pg_sleep\"]\nadmin_token = {token:?}\nmax_connections_per_key = {per_key}\n",
            settings.upstream,
            settings.admin_upstream,
            settings.database,
            settings.tls_cert.as_ref().unwrap(),
            settings.tls_key.as_ref().unwrap(),
        );
        std::fs::write(file.path(), text).unwrap();
    };
    let path = file.path().to_owned();
    running.proxy.set_config_source(Arc::new(move || RawConfig::from_file(&path)));

    // The token and a limit change; the listen address needs a restart.
    write_config("second-token-0123456789", 1, "127.0.0.1:1");
    let r = request(admin, "POST", "/reload", &[("authorization", &bearer("first-token-0123456789"))], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("admin_token: (value not shown) (applied)"), "{}", r.body);
    assert!(r.body.contains("max_connections_per_key: 100 -> 1 (applied)"), "{}", r.body);
    assert!(r.body.contains("listen: \"127.0.0.1:0\" -> \"127.0.0.1:1\" (needs a restart)"), "{}", r.body);
    assert!(!r.body.contains("second-token") && !r.body.contains("postgres://"), "{}", r.body);
    let old = bearer("first-token-0123456789");
    assert_eq!(request(admin, "GET", "/dashboard", &[("authorization", &old)], None).await.status, 401);
    let new = bearer("second-token-0123456789");
    assert_eq!(request(admin, "GET", "/dashboard", &[("authorization", &new)], None).await.status, 200);
    assert_eq!(running.proxy.current().listen, settings.listen, "the listen address stays until a restart");

    // The new per-key limit holds for the next session.
    let key = f.create_key(&unique("reload"), Environment::Development, None).await;
    let url = format!("host=127.0.0.1 port={} user=t dbname=app password={key} sslmode=disable", running.addr.port());
    let first = crate::harness::connect_to(&url).await.expect("one session");
    let Err(e) = crate::harness::connect_to(&url).await else { panic!("a second session got in") };
    assert_eq!(code(&e), "53300");
    drop(first);

    // An invalid configuration changes nothing.
    std::fs::write(file.path(), "admin_token = 1").unwrap();
    let r = request(admin, "POST", "/reload", &[("authorization", &new)], None).await;
    assert_eq!(r.status, 500);
    assert!(r.body.contains("invalid configuration, nothing changed"), "{}", r.body);
    assert_eq!(request(admin, "GET", "/dashboard", &[("authorization", &new)], None).await.status, 200);
    // From a cookie session, reload needs the CSRF token like any action.
    let login = request(admin, "POST", "/login", &[], Some("token=second-token-0123456789")).await;
    let cookie = login.header("set-cookie").unwrap().split(';').next().unwrap().to_owned();
    assert_eq!(request(admin, "POST", "/reload", &[("cookie", &cookie)], None).await.status, 403);
    running.stop().await;
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_serving_process() {
    use std::io::BufRead;
    let f = fixture();
    let admin_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    let write_config = |token: &str, listen: &str| {
        let text = format!(
            "upstream = {:?}\nadmin_upstream = {:?}\nlisten = {listen:?}\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
             admin_token = {token:?}\nmax_clients = 50\n",
            f.settings.upstream, f.admin_url
        );
        std::fs::write(&config, text).unwrap();
    };
    write_config("hup-token-one-0123456789", "127.0.0.1:0");
    let mut child = crate::cli::bin()
        .env("STRUERE_LOG", "info")
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(admin).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "serve never came up: {}", log.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = |token: &'static str| async move {
        request(admin, "GET", "/dashboard", &[("authorization", &bearer(token))], None).await.status
    };
    assert_eq!(status("hup-token-one-0123456789").await, 200);

    write_config("hup-token-two-0123456789", "127.0.0.1:1");
    let hup = std::process::Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    assert!(hup.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while status("hup-token-two-0123456789").await != 200 {
        assert!(tokio::time::Instant::now() < deadline, "SIGHUP did not reload: {}", log.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status("hup-token-one-0123456789").await, 401);
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP does not end the process");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !log.lock().unwrap().contains("needs a restart") {
        assert!(tokio::time::Instant::now() < deadline, "no restart notice: {}", log.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = log.lock().unwrap().clone();
    let line = text.lines().find(|l| l.contains("needs a restart")).unwrap();
    assert!(line.contains("listen"), "{line}");
    assert!(!text.contains("hup-token-two") && !text.contains("hup-token-one"), "a token reached the log: {text}");
    let term = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let exit = tokio::task::block_in_place(|| child.wait().unwrap());
    assert!(exit.success(), "{exit:?}");
}

/// chromedriver, stopped when dropped.
struct Driver(std::process::Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Where the screenshot goes: `$CARGO_TARGET_DIR` or `./target`.
fn screenshot_path() -> std::path::PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("dashboard.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_logs_in_switches_environment_filters_and_revokes_a_key() {
    // Not skipped when missing: CI installs both (scripts/setup.sh).
    for bin in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: apt-get install chromium chromium-driver (scripts/setup.sh does it as root)"
        );
    }
    let f = fixture();
    let admin = f.admin_addr.unwrap();
    // A production key to revoke, with an open session the dashboard lists.
    let name = unique("browser-victim");
    let key = f.create_key(&name, Environment::Production, None).await;
    let id = key_id(&name).await;
    let session = f.connect(&key).await.expect("the production key connects");
    session.simple_query("SELECT 1").await.unwrap();
    // A refusal in development, for the event filter.
    let dev = f.dev().await;
    assert!(dev.simple_query("TRUNCATE entities").await.is_err());

    let port = free_port();
    let driver = Driver(
        std::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = tempfile::tempdir().unwrap();
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,2200",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain([format!("--user-data-dir={}", profile.path().display())])
    .collect::<Vec<_>>();
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), serde_json::json!({ "binary": CHROMIUM, "args": args }));
    let browser = fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a chromium session");
    let outcome = drive(&browser, admin, id, &f.admin_token).await;
    let _ = browser.close().await;
    drop(driver);
    outcome.unwrap();

    // The revoked key no longer gets in through the proxy (the open session ends within the TTL).
    let Err(e) = f.connect(&key).await else { panic!("the revoked key connected") };
    assert_eq!(code(&e), "28P01");
    drop(session);
}

/// Wait until the browser shows `expected`.
async fn wait_url(b: &fantoccini::Client, expected: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = b.current_url().await.map_err(|e| format!("url: {e}"))?;
        if now.as_str() == expected {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the browser shows {now}, not {expected}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The browser's walk; errors carry what the page showed.
async fn drive(b: &fantoccini::Client, admin: SocketAddr, id: i64, token: &str) -> Result<(), String> {
    use fantoccini::Locator::{Css, Id};
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    let base = format!("http://{admin}");
    b.goto(&format!("{base}/dashboard")).await.map_err(|e| fail("goto", &e))?;
    // Anonymous: the login page. The form sets the cookie.
    b.find(Id("token"))
        .await
        .map_err(|e| fail("login form", &e))?
        .send_keys(token)
        .await
        .map_err(|e| fail("type", &e))?;
    b.find(Id("login")).await.map_err(|e| fail("login button", &e))?.click().await.map_err(|e| fail("click", &e))?;
    let version = b.wait().for_element(Id("policy-version")).await.map_err(|e| fail("dashboard after login", &e))?;
    let url = b.current_url().await.map_err(|e| fail("url", &e))?;
    if !url.as_str().ends_with("/dashboard?env=development") {
        return Err(format!("after login: {url}"));
    }
    if version.text().await.map_err(|e| fail("version", &e))? != "v1" {
        return Err("development's version is not v1".into());
    }
    for panel in ["policy", "diff", "keys", "sessions", "events", "usage"] {
        b.find(Id(panel)).await.map_err(|e| fail(panel, &e))?;
    }
    let keys = b.find(Id("keys")).await.map_err(|e| fail("keys", &e))?.text().await.map_err(|e| fail("text", &e))?;
    if !keys.contains("sk_dev_") || keys.contains("sk_prod_") {
        return Err(format!("development's keys panel shows other keys: {keys}"));
    }

    // Events filtered by organization and verdict through the form.
    let filter = b.find(Id("event-filter")).await.map_err(|e| fail("filter", &e))?;
    filter
        .find(Css("input[name=org]"))
        .await
        .map_err(|e| fail("org", &e))?
        .send_keys("acme")
        .await
        .map_err(|e| fail("org", &e))?;
    filter
        .find(Css("select[name=verdict] option:nth-child(4)"))
        .await
        .map_err(|e| fail("refused option", &e))?
        .click()
        .await
        .map_err(|e| fail("select", &e))?;
    filter
        .find(Css("button"))
        .await
        .map_err(|e| fail("filter button", &e))?
        .click()
        .await
        .map_err(|e| fail("filter", &e))?;
    wait_url(b, &format!("{base}/dashboard?env=development&org=acme&verdict=refused")).await?;
    let rows = b.find_all(Css("#event-rows tr.refused")).await.map_err(|e| fail("event rows", &e))?;
    let others =
        b.find_all(Css("#event-rows tr.allowed, #event-rows tr.rewritten")).await.map_err(|e| fail("rows", &e))?;
    if rows.is_empty() || !others.is_empty() {
        return Err(format!("filtered events: {} refused, {} others", rows.len(), others.len()));
    }

    // Switch to production: every panel follows.
    b.find(Id("env-production"))
        .await
        .map_err(|e| fail("env link", &e))?
        .click()
        .await
        .map_err(|e| fail("switch", &e))?;
    wait_url(b, &format!("{base}/dashboard?env=production")).await?;
    let keys = b.find(Id("keys")).await.map_err(|e| fail("keys", &e))?.text().await.map_err(|e| fail("text", &e))?;
    if !keys.contains("sk_prod_") || keys.contains("sk_dev_") {
        return Err(format!("production's keys panel: {keys}"));
    }
    let sessions = b
        .find(Id("session-count"))
        .await
        .map_err(|e| fail("sessions", &e))?
        .text()
        .await
        .map_err(|e| fail("text", &e))?;
    if sessions.parse::<u32>().unwrap_or(0) < 1 {
        return Err(format!("production sessions: {sessions}"));
    }
    let version = b
        .find(Id("policy-version"))
        .await
        .map_err(|e| fail("version", &e))?
        .text()
        .await
        .map_err(|e| fail("text", &e))?;
    if version != "v1" {
        return Err(format!("production's version: {version}"));
    }

    // Revoke the production key.
    b.find(Id(&format!("revoke-{id}")))
        .await
        .map_err(|e| fail("revoke button", &e))?
        .click()
        .await
        .map_err(|e| fail("revoke", &e))?;
    let notice = b.wait().for_element(Id("notice")).await.map_err(|e| fail("notice", &e))?;
    if !notice.text().await.map_err(|e| fail("notice", &e))?.starts_with("Key revoked") {
        return Err("no revoke notice".into());
    }
    let row = b.find(Id(&format!("key-{id}"))).await.map_err(|e| fail("key row", &e))?;
    if row.attr("data-state").await.map_err(|e| fail("state", &e))?.as_deref() != Some("revoked") {
        return Err("the key is not shown revoked".into());
    }
    let png = b.screenshot().await.map_err(|e| fail("screenshot", &e))?;
    std::fs::write(screenshot_path(), png).map_err(|e| fail("write screenshot", &e))?;
    Ok(())
}
