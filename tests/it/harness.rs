//! The shared fixture: one throwaway cluster and one proxy per test binary, started on first use
//! on a runtime of their own (so every `#[tokio::test]` runtime can come and go), and stopped at
//! process exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use struere_proxy::auth::identity::{ActorContext, ActorType, Environment};
use struere_proxy::auth::store::{self, KeySpec};
use struere_proxy::config::{RawConfig, Settings};
use struere_proxy::demo::Demo;
use struere_proxy::server::{Proxy, RunningProxy};
use tokio_postgres::{Client, NoTls};

pub struct Fixture {
    pub addr: SocketAddr,
    /// The admin HTTP endpoint (the demo turns it on).
    pub admin_addr: Option<SocketAddr>,
    pub dev_key: String,
    pub prod_key: String,
    pub operator_key: String,
    /// The admin dashboard's operator token (the demo makes one).
    pub admin_token: String,
    pub admin_url: String,
    pub settings: Settings,
    pub psql: PathBuf,
    runtime: tokio::runtime::Runtime,
}

/// The demo (cluster + proxy), kept in a static so `atexit` can stop the cluster.
static DEMO: Mutex<Option<Demo>> = Mutex::new(None);
static FIXTURE: OnceLock<Fixture> = OnceLock::new();

extern "C" fn stop_cluster() {
    let demo = DEMO.lock().ok().and_then(|mut d| d.take());
    if let Some(demo) = demo {
        // Dropping stops the server and removes its directory.
        drop(demo);
    }
}

pub fn fixture() -> &'static Fixture {
    // Built on a thread of its own: a test's runtime may not block on another runtime.
    FIXTURE.get_or_init(|| std::thread::spawn(build_fixture).join().expect("fixture thread"))
}

fn build_fixture() -> Fixture {
    // STRUERE_TEST_LOG=debug shows the proxy's logs for a failing test.
    if let Ok(filter) = std::env::var("STRUERE_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
    {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let overrides = RawConfig {
            listen: Some("127.0.0.1:0".into()),
            key_cache_ttl_secs: Some(1),
            // The cancel tests need something slow to cancel.
            allow_functions: Some(vec!["pg_sleep".into()]),
            ..RawConfig::default()
        };
        let demo = runtime.block_on(Demo::start(overrides)).expect("demo starts");
        let fixture = Fixture {
            addr: demo.proxy.addr,
            admin_addr: demo.proxy.admin_addr,
            dev_key: demo.dev_key.clone(),
            prod_key: demo.prod_key.clone(),
            operator_key: demo.operator_key.clone(),
            admin_token: demo.admin_token.clone(),
            admin_url: demo.admin_url.clone(),
            settings: demo.proxy.proxy.settings.clone(),
            psql: demo.psql.clone(),
            runtime,
        };
        *DEMO.lock().expect("demo lock") = Some(demo);
        // SAFETY: registering a plain `extern "C" fn` with no preconditions.
        unsafe { libc_atexit(stop_cluster) };
        fixture
    }
}

unsafe extern "C" {
    #[link_name = "atexit"]
    fn libc_atexit(cb: extern "C" fn()) -> i32;
}

impl Fixture {
    pub fn url(&self, key: &str) -> String {
        format!("host=127.0.0.1 port={} user=tester dbname=app password={key} sslmode=disable", self.addr.port())
    }

    pub async fn connect(&self, key: &str) -> Result<Client, tokio_postgres::Error> {
        connect_to(&self.url(key)).await
    }

    pub async fn dev(&self) -> Client {
        self.connect(&self.dev_key).await.expect("dev key connects")
    }

    pub async fn operator(&self) -> Client {
        self.connect(&self.operator_key).await.expect("operator key connects")
    }

    pub async fn admin(&self) -> Client {
        connect_to(&self.admin_url).await.expect("admin connects directly")
    }

    /// Create an acme admin key with the owner connection (as `keys create` does).
    pub async fn create_key(&self, name: &str, env: Environment, expires_in: Option<std::time::Duration>) -> String {
        let actor = ActorContext {
            organization: "acme".into(),
            environment: env,
            roles: vec!["admin".into()],
            actor_type: ActorType::User,
            actor_id: name.to_owned(),
        };
        self.create_key_for(name, actor, expires_in).await
    }

    pub async fn create_key_for(
        &self,
        name: &str,
        actor: ActorContext,
        expires_in: Option<std::time::Duration>,
    ) -> String {
        let admin = self.admin().await;
        let spec = KeySpec { name: name.to_owned(), actor: Some(actor), expires_in };
        store::create_key(&admin, &spec).await.expect("create key").secret
    }

    /// A connection for an actor of the demo domain.
    pub async fn as_actor(&self, org: &str, env: Environment, role: &str, actor_type: ActorType, id: &str) -> Client {
        let actor = ActorContext {
            organization: org.into(),
            environment: env,
            roles: vec![role.into()],
            actor_type,
            actor_id: id.into(),
        };
        let key = self.create_key_for(&crate::harness::unique(role), actor, None).await;
        self.connect(&key).await.expect("actor key connects")
    }

    /// Start one more proxy (same cluster) with changed settings, on the fixture's runtime.
    pub fn extra_proxy(&self, change: impl FnOnce(&mut Settings)) -> SocketAddr {
        let mut settings = self.settings.clone();
        change(&mut settings);
        self.start_proxy(settings).0
    }

    /// Start a proxy with these settings (on any free port) on the fixture's runtime; it lives
    /// as long as the test binary.
    pub fn start_proxy(&self, mut settings: Settings) -> (SocketAddr, Arc<Proxy>) {
        settings.listen = "127.0.0.1:0".into();
        let handle = self.runtime.handle().clone();
        std::thread::spawn(move || {
            let running = handle.block_on(RunningProxy::start(settings)).expect("extra proxy");
            let started = (running.addr, Arc::clone(&running.proxy));
            // Leak the handle: the proxy lives as long as the test binary.
            std::mem::forget(running);
            started
        })
        .join()
        .expect("extra proxy thread")
    }

    /// Start a proxy with these settings on the fixture's runtime and hand over its handle
    /// (tests that stop or drain it).
    pub fn start_running(&self, mut settings: Settings) -> RunningProxy {
        settings.listen = "127.0.0.1:0".into();
        let handle = self.runtime.handle().clone();
        std::thread::spawn(move || handle.block_on(RunningProxy::start(settings)).expect("proxy starts"))
            .join()
            .expect("proxy thread")
    }

    /// A new database in the fixture's cluster with the demo schema, seed and proxy schema but
    /// no deployed policies, for tests that change what is deployed; settings for a proxy
    /// serving it, and its owner URL.
    pub async fn scratch_database(&self, name: &str) -> (Settings, String) {
        self.admin().await.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
        let with_db = |url: &str| format!("{}/{name}", url.rsplit_once('/').expect("url has a database").0);
        let admin_url = with_db(&self.admin_url);
        let admin = connect_to(&admin_url).await.expect("owner connects");
        let grants = struere_proxy::demo::grants_sql(struere_proxy::demo::APP_ROLE);
        for sql in [struere_proxy::demo::DEMO_SCHEMA, struere_proxy::demo::DEMO_SEED, &grants] {
            admin.batch_execute(sql).await.expect("load the demo schema");
        }
        store::init_schema(&admin).await.expect("proxy schema");
        let mut settings = self.settings.clone();
        settings.upstream = with_db(&settings.upstream);
        settings.admin_upstream = admin_url.clone();
        settings.database = name.to_owned();
        (settings, admin_url)
    }
}

/// A client whose server's NOTICE texts arrive on the channel.
pub async fn connect_with_notices(url: &str) -> (Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use futures_util::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(url, NoTls).await.expect("connects");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notice(n) = m {
                let _ = tx.send(n.message().to_owned());
            }
        }
    });
    (client, rx)
}

pub async fn connect_to(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The SQLSTATE of a failed statement.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_else(|| format!("no sqlstate: {e}"))
}

/// A table name no other test uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// `COPY table FROM STDIN` of `data` as tokio-postgres sends it (Bind, Execute and Sync, then
/// the data, CopyDone and Sync): the rows copied.
pub async fn copy_in(c: &Client, table: &str, data: &'static [u8]) -> Result<u64, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = c.copy_in::<_, bytes::Bytes>(&format!("COPY {table} FROM STDIN")).await?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(data)).await?;
    sink.finish().await
}
