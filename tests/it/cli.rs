//! The binary itself: `init`, `keys create|list|revoke`, `policy check` and `demo`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{code, fixture};

pub(crate) fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_struere-proxy"));
    c.env_remove("STRUERE_CONFIG").env("STRUERE_LOG", "warn");
    c
}

pub(crate) fn run(args: &[&str]) -> (bool, String, String) {
    let f = fixture();
    let out = bin().env("STRUERE_ADMIN_UPSTREAM", &f.admin_url).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn keys_lifecycle_through_the_cli() {
    let f = fixture();
    let (ok, _, err) = run(&["init"]);
    assert!(ok, "init is idempotent: {err}");
    let (ok, out, err) = run(&[
        "keys",
        "create",
        "--org",
        "globex",
        "--env",
        "production",
        "--role",
        "admin",
        "--role",
        "agent",
        "--actor-type",
        "agent",
        "--actor-id",
        "agent-7",
        "--name",
        "cli-bot",
        "--expires-in",
        "1h",
    ]);
    assert!(ok, "{err}");
    let key = out.trim().to_owned();
    assert_eq!(out.lines().count(), 1, "the key alone on stdout: {out:?}");
    assert!(key.starts_with("sk_prod_") && key.len() == "sk_prod_".len() + 64, "{key}");
    let c = f.connect(&key).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();

    let (ok, out, _) = run(&["keys", "list"]);
    assert!(ok);
    let line = out.lines().find(|l| l.contains("cli-bot")).expect("listed");
    assert!(
        line.contains("globex")
            && line.contains("production")
            && line.contains("admin,agent")
            && line.contains("active")
    );
    assert!(line.contains("agent:agent-7"), "{line}");
    assert!(!out.contains(&key), "never the secret");

    let (ok, _, err) = run(&["keys", "revoke", "cli-bot"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["keys", "revoke", "cli-bot"]);
    assert!(!ok && err.contains("no active key"), "{err}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let Err(e) = f.connect(&key).await else { panic!("revoked key connected") };
    assert_eq!(code(&e), "28P01");
}

#[test]
fn operator_keys_need_no_scope() {
    let (ok, out, err) = run(&["keys", "create", "--operator", "--name", "cli-dba"]);
    assert!(ok, "{err}");
    assert!(out.trim().starts_with("sk_op_"));
    let (ok, _, err) = run(&["keys", "create", "--operator", "--org", "acme", "--name", "x"]);
    assert!(!ok, "operator keys take no org: {err}");
    let (ok, _, err) = run(&["keys", "create", "--org", "acme", "--env", "staging", "--name", "x"]);
    assert!(!ok && err.contains("unknown environment"), "{err}");
}

#[test]
fn policy_check_reports_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for f in ["tables.toml", "development.toml", "production.toml"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let out = bin().args(["policy", "check", "--policies"]).arg(dir.path()).output().unwrap();
    assert!(out.status.success());
    let prod = dir.path().join("production.toml");
    let text = std::fs::read_to_string(&prod).unwrap().replacen("allow = [\"select\"]", "allow = [\"selct\"]", 1);
    std::fs::write(&prod, text).unwrap();
    let out = bin().args(["policy", "check", "--policies"]).arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("production.toml:") && err.contains("unknown action \"selct\""), "{err}");
}

/// What the demo printed up to READY.
struct Banner {
    values: std::collections::HashMap<String, String>,
    /// `<env> <org> <role> <type>:<id> <key>`, split.
    keys: Vec<Vec<String>>,
    commands: Vec<String>,
}

fn read_banner(child: &mut std::process::Child) -> Banner {
    let stdout = child.stdout.take().unwrap();
    let mut banner = Banner { values: Default::default(), keys: Vec::new(), commands: Vec::new() };
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line == "READY" {
            break;
        }
        match line.split_once(' ') {
            Some(("KEY", rest)) => banner.keys.push(rest.split(' ').map(str::to_owned).collect::<Vec<_>>()),
            Some((k @ ("UPSTREAM" | "LISTEN" | "ADMIN" | "ADMIN_TOKEN" | "OPERATOR"), v)) => {
                banner.values.insert(k.to_owned(), v.to_owned());
            }
            _ => banner.commands.push(line),
        }
    }
    banner
}

#[test]
fn demo_prints_keys_serves_and_cleans_up() {
    let mut child =
        bin().args(["demo", "--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let Banner { values: banner, keys, commands } = read_banner(&mut child);
    assert!(banner["ADMIN"].starts_with("http://127.0.0.1:"), "{banner:?}");
    let token = &banner["ADMIN_TOKEN"];
    assert!(token.starts_with("adm_") && token.len() > 30, "the dashboard's token: {token}");
    // One key per role × organization × environment: `<env> <org> <role> <type>:<id> <key>`.
    assert!(keys.iter().all(|k| k.len() == 5), "{keys:?}");
    for env in ["development", "production"] {
        for org in ["acme", "globex"] {
            for role in ["admin", "teacher", "guardian", "agent"] {
                assert!(
                    keys.iter().any(|k| k[0] == env && k[1] == org && k[2] == role),
                    "no {env} {org} {role} key: {keys:?}"
                );
            }
        }
    }
    let teacher = keys.iter().find(|k| k[0] == "development" && k[1] == "acme" && k[2] == "teacher").unwrap();
    assert_eq!(teacher[3], "user:acme-teacher-1");
    // A printed psql command, run exactly as printed, with a query.
    let (psql, url) = commands.first().expect("psql commands").split_once(' ').unwrap();
    let out =
        Command::new(psql).arg(url.trim_matches('"')).args(["-X", "-A", "-t", "-c", "SELECT 40 + 2"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "{}", String::from_utf8_lossy(&out.stderr));
    // The teacher key sees only its own sessions, through the LISTEN address.
    let listen = &banner["LISTEN"];
    let url = format!("postgres://t:{}@{listen}/app?sslmode=require", teacher[4]);
    let out = Command::new(psql)
        .arg(&url)
        .args(["-X", "-A", "-t", "-c", "SELECT DISTINCT data->>'teacherId' FROM entities"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "acme-teacher-1",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let upstream_port: u16 = banner["UPSTREAM"].rsplit(':').next().unwrap().split('/').next().unwrap().parse().unwrap();
    // Ctrl-C: everything it created goes away, the cluster included.
    send_sigint(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", upstream_port)).is_err(), "the throwaway cluster is stopped");
}

fn send_sigint(pid: u32) {
    let status = Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

#[test]
fn explain_prints_the_rewrite_or_the_refusal() {
    let (ok, out, err) = run(&[
        "explain",
        "--env",
        "development",
        "--org",
        "acme",
        "--role",
        "teacher",
        "--actor-id",
        "acme-teacher-1",
        "SELECT id FROM entities",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("'acme'") && out.contains("'development'") && out.contains("'acme-teacher-1'"), "{out}");
    let (ok, out, err) =
        run(&["explain", "--env", "production", "--org", "acme", "--role", "teacher", "SELECT * FROM threads"]);
    assert!(!ok && out.is_empty());
    assert!(err.contains("42501: refused: role \"teacher\" may not select threads"), "{err}");
    let f = fixture();
    let (ok, out, err) = run(&["explain", "--key", &f.prod_key, "SELECT 1 FROM messages"]);
    assert!(ok, "{err}");
    assert!(out.contains("'production'"), "{out}");
    // What a Parse prepares: without the conversion gate when `$1` converts nothing.
    let lookup = "SELECT data FROM entities WHERE id = $1";
    let cases = [
        (&[][..], false),
        (&["--parse"], false),
        (&["--parse=0"], false),
        (&["--parse=1043"], false),
        // An int8 converts to text without fail; the proxy counts no date or time type among those.
        (&["--parse=20"], false),
        (&["--parse=1184"], true),
    ];
    for (args, gated) in cases {
        let (ok, out, err) = run(&[&["explain", "--key", &f.dev_key][..], args, &[lookup]].concat());
        assert!(ok, "{args:?}: {err}");
        assert!(out.contains("__struere_raw_id"), "{args:?}: {out}");
        assert_eq!(out.contains("num_nulls"), gated, "{args:?}: {out}");
    }
    let (ok, _, err) = run(&["explain", "--key", &f.dev_key, "--parse=text", lookup]);
    assert!(!ok && err.contains("not a type OID: text"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_upstream_loads_an_existing_database_and_revokes_its_keys_on_exit() {
    let f = fixture();
    let name = crate::harness::unique("given").replace('-', "_");
    f.admin().await.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    let owner_url = format!("{}/{name}", f.admin_url.rsplit_once('/').unwrap().0);
    let mut child = bin()
        .args(["demo", "--listen", "127.0.0.1:0", "--upstream", &owner_url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let banner = tokio::task::block_in_place(|| read_banner(&mut child));
    assert_eq!(banner.values["UPSTREAM"], owner_url);
    let teacher = banner.keys.iter().find(|k| k[0] == "development" && k[1] == "acme" && k[2] == "teacher").unwrap();
    let listen = &banner.values["LISTEN"];
    let url = format!("postgres://t:{}@{listen}/{name}?sslmode=disable", teacher[4]);
    let c = crate::harness::connect_to(&url).await.expect("the teacher connects to the given database");
    let rows = c.query("SELECT DISTINCT data->>'teacherId' FROM entities", &[]).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), ["acme-teacher-1"]);
    drop(c);
    send_sigint(child.id());
    let status = tokio::task::block_in_place(|| child.wait().unwrap());
    assert!(status.success(), "{status:?}");
    // The database and its data stay; the demo's keys do not.
    let owner = crate::harness::connect_to(&owner_url).await.unwrap();
    let n: i64 = owner.query_one("SELECT count(*) FROM entities", &[]).await.unwrap().get(0);
    assert!(n > 0);
    let active: i64 =
        owner.query_one("SELECT count(*) FROM struere.api_keys WHERE revoked_at IS NULL", &[]).await.unwrap().get(0);
    assert_eq!(active, 0, "every demo key is revoked");
    let roles: i64 = owner
        .query_one("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'struere\\_app\\_%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(roles, 0, "the run's own role is dropped");
    let e = crate::harness::connect_to(&url).await;
    assert!(e.is_err(), "the proxy is gone");
}

/// A demo on any port logging at debug (plus `env`) to a file: the log, the process, its banner.
fn demo_logging_debug(env: &[(&str, &str)]) -> (tempfile::NamedTempFile, std::process::Child, Banner) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = bin()
        .env("STRUERE_LOG", "debug")
        .envs(env.iter().copied())
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let banner = read_banner(&mut child);
    (log, child, banner)
}

#[test]
fn keys_and_masked_values_never_reach_the_log() {
    let (log, mut child, banner) = demo_logging_debug(&[]);
    let listen = &banner.values["LISTEN"];
    let psql = banner.commands.first().unwrap().split_once(' ').unwrap().0.to_owned();
    let bad_key = format!("sk_dev_{}", "ab".repeat(32));
    let teacher = banner.keys.iter().find(|k| k[0] == "development" && k[2] == "teacher").unwrap();
    let admin = banner.keys.iter().find(|k| k[0] == "development" && k[2] == "admin").unwrap();
    let run = |key: &str, sql: &str| {
        Command::new(&psql)
            .arg(format!("postgres://t:{key}@{listen}/app?sslmode=require"))
            .args(["-X", "-A", "-t", "-c", sql])
            .output()
            .unwrap()
    };
    // Masked and hidden values are read, refused statements name them, a bad key is tried.
    let out = run(&teacher[4], "SELECT data FROM entities");
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("SESSION-PHONE"));
    let admin_out = run(&admin[4], "SELECT data->>'guardianPhone' FROM entities WHERE entity_type = 'session'");
    assert!(String::from_utf8_lossy(&admin_out.stdout).contains("SESSION-PHONE"), "the admin sees them");
    let _ = run(&teacher[4], "SELECT * FROM threads WHERE id = 'SESSION-PHONE-literal'");
    // A refusal's reason quotes no value the parsers stopped at (the client is told it).
    let out = run(&teacher[4], "SELECT 'x' 'SYNTAX-VALUE-4711'");
    assert!(String::from_utf8_lossy(&out.stderr).contains("SYNTAX-VALUE-4711"), "{out:?}");
    let _ = run(&bad_key, "SELECT 1");
    // An operator's statements are forwarded as sent and audited without their values.
    let operator = &banner.values["OPERATOR"];
    let out = run(operator, "SELECT 'OPERATOR-VALUE-4711' AS v, 90210417 AS n");
    assert!(String::from_utf8_lossy(&out.stdout).contains("OPERATOR-VALUE-4711|90210417"), "{out:?}");
    let _ = run(operator, "CREATE ROLE struere_log_probe PASSWORD 'OPERATOR-PASSWORD-4711'");
    send_sigint(child.id());
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert!(text.contains("statement"), "the log has the per-statement events: {text}");
    assert!(text.contains("SELECT ? AS v, ? AS n") && text.contains("PASSWORD ?"), "operator statements: {text}");
    assert!(text.contains(r#"syntax error at or near \"?\""#), "the refusal is logged: {text}");
    for value in ["OPERATOR-VALUE-4711", "90210417", "OPERATOR-PASSWORD-4711", "SYNTAX-VALUE-4711"] {
        assert!(!text.contains(value), "a value reached the log: {value}");
    }
    assert!(!text.contains(&banner.values["ADMIN_TOKEN"][4..]), "the admin token reached the log");
    for k in banner.keys.iter().map(|k| &k[4]).chain([&banner.values["OPERATOR"], &bad_key]) {
        // At most the display prefix (sk_xxx_ + 6 characters) of a key is logged.
        let secret_part = &k[k.len() - 40..];
        assert!(!text.contains(secret_part), "a key reached the log");
    }
    assert!(!text.contains("SESSION-PHONE-acme"), "a row value reached the log");
    assert!(!text.contains("NOTES-"), "a row value reached the log");
}

#[test]
fn json_logs_carry_the_connection_and_statement_spans_and_no_secret() {
    let (log, mut child, banner) = demo_logging_debug(&[("STRUERE_LOG_FORMAT", "json")]);
    let listen = &banner.values["LISTEN"];
    let psql = banner.commands.first().unwrap().split_once(' ').unwrap().0.to_owned();
    let teacher = banner.keys.iter().find(|k| k[0] == "development" && k[2] == "teacher").unwrap();
    let out = Command::new(&psql)
        .arg(format!("postgres://t:{}@{listen}/app?sslmode=require", teacher[4]))
        .args(["-X", "-A", "-t", "-c", "SELECT data FROM entities"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    send_sigint(child.id());
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(log.path()).unwrap();
    // Log lines are JSON; the demo's own messages to the person running it (`eprintln!`) are not logs.
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(lines.len() > 10, "{text}");
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()));
    // A statement's lines carry both spans' fields: the connection (peer, key prefix) and the statement.
    let in_statement = lines
        .iter()
        .find(|l| l["spans"].as_array().is_some_and(|s| s.iter().any(|s| s["name"] == "statement")))
        .unwrap_or_else(|| panic!("no line inside a statement span:\n{text}"));
    let conn = in_statement["spans"].as_array().unwrap().iter().find(|s| s["name"] == "conn").expect("conn span");
    assert!(conn["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{conn}");
    let prefix = &teacher[4][..13];
    assert_eq!(conn["key"].as_str(), Some(prefix), "{conn}");
    // Never a key, the admin token, the upstream password or a masked value.
    let upstream_password = banner.values["UPSTREAM"].split_once("://").unwrap().1.split_once('@').unwrap().0;
    let upstream_password = upstream_password.split_once(':').map(|(_, p)| p).unwrap_or("");
    assert!(upstream_password.len() > 8, "{}", banner.values["UPSTREAM"]);
    for secret in banner
        .keys
        .iter()
        .map(|k| &k[4][k[4].len() - 40..])
        .chain([&banner.values["ADMIN_TOKEN"][4..], upstream_password])
    {
        assert!(!text.contains(secret), "a secret reached the JSON log");
    }
    assert!(!text.contains("SESSION-PHONE-acme") && !text.contains("NOTES-"), "a row value reached the log");
}
