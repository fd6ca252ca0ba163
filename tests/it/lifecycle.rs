//! The policy lifecycle on a real PostgreSQL: fail-closed start with nothing deployed, `policy
//! dev` (development only), `deploy`, `status` differences, `rollback`, `history`, and the switch
//! on every proxy serving the database (LISTEN/NOTIFY). Each test works in a database of its own
//! so changing what is deployed never touches the other tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use struere_proxy::auth::identity::{ActorContext, ActorType, Environment};
use struere_proxy::auth::store::{self, KeySpec};
use struere_proxy::lifecycle::{self, LifecycleError};
use struere_proxy::policy::Bundle;
use struere_proxy::policy::store::Published;
use struere_proxy::server::Proxy;
use tokio_postgres::Client;

use crate::cli::bin;
use crate::harness::{code, connect_to, fixture};

struct Db {
    name: String,
    admin_url: String,
    settings: struere_proxy::config::Settings,
}

impl Db {
    async fn new(prefix: &str) -> Db {
        let name = crate::harness::unique(prefix).replace('-', "_");
        let (settings, admin_url) = fixture().scratch_database(&name).await;
        Db { name, admin_url, settings }
    }

    async fn owner(&self) -> Client {
        connect_to(&self.admin_url).await.expect("owner connects")
    }

    async fn key(&self, env: Environment, role: &str, actor: &str) -> String {
        let actor = ActorContext {
            organization: "acme".into(),
            environment: env,
            roles: vec![role.into()],
            actor_type: ActorType::User,
            actor_id: actor.into(),
        };
        let spec = KeySpec { name: crate::harness::unique(role), actor: Some(actor), expires_in: None };
        store::create_key(&self.owner().await, &spec).await.expect("key").secret
    }

    async fn connect(&self, addr: SocketAddr, key: &str) -> Result<Client, tokio_postgres::Error> {
        let url =
            format!("host=127.0.0.1 port={} user=t dbname={} password={key} sslmode=disable", addr.port(), self.name);
        connect_to(&url).await
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = bin()
            .env("STRUERE_ADMIN_UPSTREAM", &self.admin_url)
            .env_remove("STRUERE_POLICIES")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .expect("run the binary");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
    }
}

/// Wait until `proxy` reports `version` for `env`: the switch is asynchronous (NOTIFY), so the
/// test waits for it to be reported, with a generous bound only so a broken switch fails.
async fn wait_for_version(proxy: &Arc<Proxy>, env: Environment, version: &str) {
    let start = Instant::now();
    while proxy.policy_version(env) != version {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{env} never switched to {version} (still {})",
            proxy.policy_version(env)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn shipped_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"))
}

/// The shipped bundle with teachers allowed to see `paymentAmount`.
fn teacher_sees_payments() -> Bundle {
    let mut b = Bundle::shipped();
    let text = b.files["development.toml"].replacen("\"data.status\"]", "\"data.status\", \"data.paymentAmount\"]", 1);
    assert_ne!(text, b.files["development.toml"]);
    b.files.insert("development.toml".into(), text);
    b
}

/// What acme's first teacher reads of its sessions' payment amounts.
async fn payments_seen(db: &Db, addr: SocketAddr, key: &str) -> Vec<Option<String>> {
    let c = db.connect(addr, key).await.expect("teacher connects");
    let rows = c
        .query("SELECT data->>'paymentAmount' FROM entities WHERE entity_type = 'session' ORDER BY id", &[])
        .await
        .expect("teacher reads sessions");
    assert!(!rows.is_empty(), "the teacher has sessions");
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn nothing_deployed_fails_closed_and_dev_sync_opens_development_only() {
    let db = Db::new("lc_closed").await;
    let (addr, proxy) = fixture().start_proxy(db.settings.clone());
    assert_eq!(proxy.policy_version(Environment::Development), "none");
    let dev_key = db.key(Environment::Development, "admin", "ops").await;
    let prod_key = db.key(Environment::Production, "admin", "ops").await;
    for key in [&dev_key, &prod_key] {
        let e = db.connect(addr, key).await.expect_err("nothing deployed: refused");
        assert_eq!(code(&e), "28000");
        let msg = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
        assert!(msg.contains("no policy set is deployed for the"), "{msg}");
    }

    // `policy dev` from the binary: development only.
    let (status, out, err) = db.cli(&["policy", "dev"]);
    assert_eq!(status, 0, "{out}{err}");
    assert!(out.contains("development: v1 is now in force"), "{out}");
    assert!(out.contains("+ role teacher on entities:session: allow insert,select,update"), "{out}");
    wait_for_version(&proxy, Environment::Development, "v1").await;
    let c = db.connect(addr, &dev_key).await.expect("development is deployed");
    let n: i64 = c.query_one("SELECT count(*) FROM entities", &[]).await.unwrap().get(0);
    assert!(n > 0);
    assert_eq!(proxy.policy_version(Environment::Production), "none");
    let e = db.connect(addr, &prod_key).await.expect_err("production still has nothing");
    assert_eq!(code(&e), "28000");

    // Syncing the same files again publishes nothing.
    let (status, out, _) = db.cli(&["policy", "dev"]);
    assert_eq!(status, 0);
    assert!(out.contains("development: unchanged (v1 is in force)"), "{out}");

    // A proxy started now (nothing in production yet) serves development and refuses production.
    let (addr2, _) = fixture().start_proxy(db.settings.clone());
    assert!(db.connect(addr2, &dev_key).await.is_ok());
    assert!(db.connect(addr2, &prod_key).await.is_err());
}

#[tokio::test]
async fn dev_deploy_status_rollback_and_the_switch_on_a_second_proxy() {
    let db = Db::new("lc_flow").await;
    let mut owner = db.owner().await;
    let shipped = Bundle::from_dir(shipped_dir()).unwrap();
    let change = lifecycle::sync_development(&mut owner, &shipped, shipped_dir()).await.unwrap();
    assert_eq!(change.published, Published::New(1));
    let (dry_status, dry, _) = db.cli(&["policy", "deploy", "--dry-run"]);
    assert_eq!(dry_status, 0);
    assert!(dry.contains("production ← development v1") && dry.contains("+ role admin"), "{dry}");
    assert_eq!(lifecycle::deploy(&mut owner).await.unwrap().published, Published::New(1));

    // Two proxies serving the same database.
    let (a, proxy_a) = fixture().start_proxy(db.settings.clone());
    let (b, proxy_b) = fixture().start_proxy(db.settings.clone());
    let teacher = db.key(Environment::Development, "teacher", "acme-teacher-1").await;
    let prod_teacher = db.key(Environment::Production, "teacher", "acme-teacher-1").await;
    assert!(payments_seen(&db, b, &teacher).await.iter().all(Option::is_none), "hidden in v1");

    // Local files now differ from development: status names the difference, exit code 1.
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in &teacher_sees_payments().files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let dir_s = dir.path().to_str().unwrap();
    let (status, out, err) = db.cli(&["policy", "status", "--exit-code", "--policies", dir_s]);
    assert_eq!(status, 1, "{out}{err}");
    assert!(out.contains("+ role teacher on entities:session: field data.paymentAmount visible"), "{out}");
    assert!(out.contains("1 difference(s) to act on"), "{out}");
    let (status, _, _) = db.cli(&["policy", "status", "--policies", dir_s]);
    assert_eq!(status, 0, "without --exit-code, status exits 0 when it ran");

    // Sync: development switches on both proxies; production does not change.
    let (status, out, err) = db.cli(&["policy", "dev", "--policies", dir_s]);
    assert_eq!(status, 0, "{out}{err}");
    assert!(out.contains("development: v2 is now in force"), "{out}");
    for p in [&proxy_a, &proxy_b] {
        wait_for_version(p, Environment::Development, "v2").await;
        assert_eq!(p.policy_version(Environment::Production), "v1");
    }
    assert!(payments_seen(&db, b, &teacher).await.iter().all(Option::is_some), "visible in v2 through B");
    assert!(payments_seen(&db, a, &teacher).await.iter().all(Option::is_some), "visible in v2 through A");
    assert!(payments_seen(&db, a, &prod_teacher).await.iter().all(Option::is_none), "production unchanged");

    // Status now: local = development, development's production file = production's (the
    // change was in development.toml only).
    let (status, out, _) = db.cli(&["policy", "status", "--exit-code", "--policies", dir_s]);
    assert_eq!(status, 0, "{out}");

    // Rollback of development to v1: a new version (v3) with v1's content.
    let change = lifecycle::rollback(&mut owner, Environment::Development, 1).await.unwrap();
    assert_eq!(change.published, Published::New(3));
    assert_eq!(change.diff, ["- role teacher on entities:session: field data.paymentAmount visible"]);
    wait_for_version(&proxy_b, Environment::Development, "v3").await;
    assert!(payments_seen(&db, b, &teacher).await.iter().all(Option::is_none), "hidden again after rollback");
    let e = lifecycle::rollback(&mut owner, Environment::Production, 9).await.unwrap_err();
    assert!(matches!(e, LifecycleError::NoSuchVersion { version: 9, .. }), "{e}");

    let (status, out, _) = db.cli(&["policy", "history", "--env", "development"]);
    assert_eq!(status, 0);
    let lines: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].contains("v3") && lines[0].ends_with("rollback to v1"), "{out}");
    assert!(lines[2].contains("v1") && lines[2].ends_with("policy dev"), "{out}");
    let (_, out, _) = db.cli(&["policy", "history", "--env", "production"]);
    assert!(out.contains("deploy of development v1"), "{out}");
}

#[tokio::test]
async fn nothing_invalid_is_published() {
    let db = Db::new("lc_invalid").await;
    let mut owner = db.owner().await;
    // A bundle naming a table the database lacks is refused by `policy dev`.
    let mut missing = Bundle::shipped();
    let tables = format!("{}\n[tables.no_such_table]\nscope = \"shared\"\n", missing.files["tables.toml"]);
    missing.files.insert("tables.toml".into(), tables);
    let e = lifecycle::sync_development(&mut owner, &missing, Path::new("bad")).await.unwrap_err();
    assert!(e.to_string().contains("no_such_table, which does not exist"), "{e}");
    // Files that do not compile: refused with file:line.
    let mut broken = Bundle::shipped();
    broken.files.insert(
        "development.toml".into(),
        "[[roles.x.resources]]\nresource = \"no_such_table\"\nallow = [\"select\"]\n".into(),
    );
    let e = lifecycle::sync_development(&mut owner, &broken, Path::new("bad")).await.unwrap_err();
    assert!(matches!(e, LifecycleError::Policy(_)), "{e}");
    let deployed = struere_proxy::policy::store::latest(&owner, Environment::Development).await.unwrap();
    assert!(deployed.is_none(), "nothing was published");

    // Deploy with nothing in development is refused; so is one the live catalog no longer matches.
    assert!(matches!(lifecycle::deploy(&mut owner).await.unwrap_err(), LifecycleError::NothingInDevelopment));
    lifecycle::sync_development(&mut owner, &Bundle::shipped(), Path::new("policies")).await.unwrap();
    owner.batch_execute("ALTER TABLE trigger_runs RENAME COLUMN environment TO env").await.unwrap();
    let e = lifecycle::deploy(&mut owner).await.unwrap_err();
    assert!(e.to_string().contains("trigger_runs lacks its environment column"), "{e}");
    let (status, out, _) = db.cli(&["policy", "deploy"]);
    assert_eq!(status, 2, "{out}");
    let (_, out, _) = db.cli(&["policy", "status", "--exit-code"]);
    assert!(out.contains("a policy names column environment, which the table lacks"), "{out}");
    assert!(out.contains("production: nothing deployed"), "{out}");
}

#[tokio::test]
async fn dev_watch_resyncs_every_change_and_reports_bad_files() {
    use std::io::{BufRead, BufReader};
    let db = Db::new("lc_watch").await;
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in &Bundle::shipped().files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let mut child = bin()
        .env("STRUERE_ADMIN_UPSTREAM", &db.admin_url)
        .args(["policy", "dev", "--watch", "--policies", dir.path().to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // Read lines until one contains `needle` (or the watcher has been silent for a minute).
    let wait_for = |needle: &str| -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
            let done = line.contains(needle);
            seen.push(line);
            if done {
                return seen;
            }
        }
        panic!("the watcher never printed {needle:?}; it printed {seen:#?}");
    };
    wait_for("development: v1 is now in force");
    let dev = dir.path().join("development.toml");
    std::fs::write(&dev, &teacher_sees_payments().files["development.toml"]).unwrap();
    let seen = wait_for("development: v2 is now in force");
    let seen = [seen, wait_for("paymentAmount")].concat();
    assert!(seen.iter().any(|l| l.contains("+ role teacher on entities:session: field data.paymentAmount visible")));
    // A file that does not compile is reported with its line and not synced.
    std::fs::write(&dev, "[roles.admin]\nunmanaged_tables = \"yes\"\n").unwrap();
    let seen = wait_for("not synced");
    let seen = [seen, wait_for("development.toml:")].concat();
    assert!(seen.iter().any(|l| l.contains("development.toml:")), "{seen:#?}");
    child.kill().unwrap();
    let _ = child.wait();
    let deployed = struere_proxy::policy::store::latest(&db.owner().await, Environment::Development).await.unwrap();
    assert_eq!(deployed.map(|d| d.version), Some(2), "the bad file was not published");
}
