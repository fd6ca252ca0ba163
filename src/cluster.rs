//! A throwaway local PostgreSQL server in a temporary directory, for `struere-proxy demo` and for
//! every integration test.
//!
//! Everything here is blocking and uses only std plus the PostgreSQL command-line tools; call it
//! from `spawn_blocking` or before a runtime starts.
//!
//! initdb and pg_ctl refuse to run as root. When the process is root, they run as the `postgres`
//! OS user through `runuser`, and the temp directory is handed to that user. The directory keeps
//! mode 0700 because the local socket inside it uses `trust` authentication: only its owner (and
//! root) may reach it.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The address the server listens on; nothing leaves loopback.
const HOST: &str = "127.0.0.1";
/// The bootstrap superuser initdb creates.
const SUPERUSER: &str = "postgres";
/// The OS user the server runs as when this process is root.
const OS_USER: &str = "postgres";
/// How often `start` picks a new port when another process took the one it chose.
const START_ATTEMPTS: u32 = 5;
/// Seconds `pg_ctl` waits for start and stop.
const PG_CTL_WAIT_SECS: &str = "60";
/// The line the postmaster logs when it handles a reload; `reload` waits for it.
const RELOAD_LOG_LINE: &str = "received SIGHUP, reloading configuration files";
/// How much of the server log an error carries.
const LOG_TAIL_BYTES: u64 = 4096;

/// Settings appended to `postgresql.conf`. Durability is off: the data is thrown away; WAL is
/// kept small so bulk loads in tests do not fill a small disk.
const SERVER_SETTINGS: &str = "\
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = minimal
max_wal_senders = 0
max_wal_size = 64MB
min_wal_size = 32MB
max_connections = 300
max_prepared_transactions = 10
password_encryption = 'scram-sha-256'
lc_messages = 'C'
";

/// Why a cluster could not be found, started, used or stopped. Each variant names the step.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("PostgreSQL server binaries not found: {0}")]
    BinariesNotFound(String),
    #[error("{step}: {source}")]
    Io {
        step: String,
        #[source]
        source: io::Error,
    },
    /// A command ran and failed; `output` holds its stderr (and the server log's tail where useful).
    #[error("{step} failed ({status}): {output}")]
    Command { step: String, status: String, output: String },
}

impl ClusterError {
    fn io(step: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
        let step = step.into();
        move |source| ClusterError::Io { step, source }
    }
}

/// How the PostgreSQL tools are run: directly, or as the `postgres` OS user when we are root.
#[derive(Debug, Clone, Copy)]
enum Runner {
    Direct,
    AsPostgres { uid: u32, gid: u32 },
}

impl Runner {
    fn command(self, program: &Path) -> Command {
        match self {
            Runner::Direct => Command::new(program),
            Runner::AsPostgres { .. } => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", OS_USER, "--"]).arg(program);
                cmd
            }
        }
    }

    /// Hands `path` to the server's OS user (a no-op when not root).
    fn give(self, path: &Path) -> Result<(), ClusterError> {
        match self {
            Runner::Direct => Ok(()),
            Runner::AsPostgres { uid, gid } => std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(ClusterError::io(format!("chown {}", path.display()))),
        }
    }
}

/// A running PostgreSQL server in a temporary directory. Dropping it stops the server and
/// removes the directory.
pub struct TempCluster {
    /// Removed by its own `Drop`, which runs after ours has stopped the server.
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    password: String,
    runner: Runner,
    running: bool,
}

// By hand, so the superuser password never reaches a log.
impl fmt::Debug for TempCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempCluster")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .field("bin_dir", &self.bin_dir)
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

impl TempCluster {
    /// Creates a cluster with initdb and starts it on a free port of 127.0.0.1.
    ///
    /// Authentication: scram-sha-256 over TCP (127.0.0.1/32 and ::1/128), trust on the unix
    /// socket, which lives in the temp directory. The superuser `postgres` gets a random password.
    pub fn start() -> Result<TempCluster, ClusterError> {
        let bin_dir = find_pg_bin_dir()?;
        let dir =
            tempfile::Builder::new().prefix("struere-pg-").tempdir().map_err(ClusterError::io("create temp dir"))?;
        // A directory we just created is owned by our effective uid: that tells us if we are root.
        let euid = fs::metadata(dir.path()).map_err(ClusterError::io("stat temp dir"))?.uid();
        let runner = if euid == 0 {
            let (uid, gid) = os_user_ids(OS_USER)?;
            Runner::AsPostgres { uid, gid }
        } else {
            Runner::Direct
        };
        runner.give(dir.path())?;

        let mut cluster = TempCluster {
            data_dir: dir.path().join("data"),
            dir,
            bin_dir,
            port: 0,
            password: random_password()?,
            runner,
            running: false,
        };
        cluster.initdb()?;
        cluster.start_on_free_port()?;
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        HOST
    }

    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    pub fn superuser_password(&self) -> &str {
        &self.password
    }

    /// `postgres://user:password@127.0.0.1:port/database`, with every part percent-encoded.
    pub fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}",
            percent_encode(user),
            percent_encode(password),
            HOST,
            self.port,
            percent_encode(database)
        )
    }

    /// The superuser's URL for `database`.
    pub fn admin_url(&self, database: &str) -> String {
        self.url(SUPERUSER, &self.password, database)
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server's log file (inside the temp directory).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The data directory (inside the temp directory).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the unix socket (the temp directory).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `sql` as the superuser with the bundled psql over the unix socket
    /// (`-X -q -A -t -v ON_ERROR_STOP=1`, script read from stdin so it may hold many statements)
    /// and returns its stdout: unaligned rows, one per line, no headers.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = self.psql_command();
        cmd.arg("-h").arg(self.dir.path()).arg("-p").arg(self.port.to_string()).args(["-U", SUPERUSER, "-d", database]);
        run_with_stdin(cmd, sql, "psql")
    }

    /// Prepends `line` to `pg_hba.conf` (so it wins over the defaults) and reloads the server.
    pub fn add_hba_line_first(&self, line: &str) -> Result<(), ClusterError> {
        if line.contains(['\n', '\r']) {
            return Err(ClusterError::Command {
                step: "add hba line".into(),
                status: "refused".into(),
                output: "the line must not contain a line break".into(),
            });
        }
        let path = self.data_dir.join("pg_hba.conf");
        let old = fs::read_to_string(&path).map_err(ClusterError::io("read pg_hba.conf"))?;
        // Writing over the existing file keeps its owner.
        fs::write(&path, format!("{line}\n{old}")).map_err(ClusterError::io("write pg_hba.conf"))?;
        self.reload()
    }

    /// Asks the server to re-read its configuration files and waits until it has.
    ///
    /// `pg_ctl reload` only sends SIGHUP; the postmaster logs a line when it handles it, so the
    /// wait counts those lines. A connection made after that sees the new `pg_hba.conf`.
    pub fn reload(&self) -> Result<(), ClusterError> {
        let before = self.count_log_lines(RELOAD_LOG_LINE)?;
        let mut cmd = self.runner.command(&self.bin_dir.join("pg_ctl"));
        cmd.arg("reload").arg("-D").arg(&self.data_dir);
        self.run_checked(cmd, "pg_ctl reload")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.count_log_lines(RELOAD_LOG_LINE)? <= before {
            if Instant::now() > deadline {
                return Err(ClusterError::Command {
                    step: "pg_ctl reload".into(),
                    status: "timed out".into(),
                    output: self.log_tail_from(0),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
        // The reload line is logged before the files are re-read; leave the postmaster a moment.
        thread::sleep(Duration::from_millis(100));
        Ok(())
    }

    /// Turns TLS on: a fresh self-signed certificate for `localhost` and `127.0.0.1`
    /// (server.crt / server.key in the data directory, mode 0600), `ssl = on`, reload, then a
    /// check that a `sslmode=require` connection really is encrypted.
    pub fn enable_ssl(&self) -> Result<(), ClusterError> {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string(), HOST.to_string()]).map_err(|e| {
                ClusterError::Command {
                    step: "generate certificate".into(),
                    status: "rcgen".into(),
                    output: e.to_string(),
                }
            })?;
        self.write_private_file("server.crt", &certified.cert.pem())?;
        self.write_private_file("server.key", &certified.signing_key.serialize_pem())?;
        self.append_config("ssl = on\n")?;
        self.reload()?;

        let mut cmd = self.psql_command();
        cmd.env("PGPASSWORD", &self.password)
            .arg(format!("host={HOST} port={} user={SUPERUSER} dbname=postgres sslmode=require", self.port));
        let out = run_with_stdin(cmd, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();", "psql over TLS")?;
        if out.trim() == "t" {
            Ok(())
        } else {
            Err(ClusterError::Command {
                step: "enable ssl".into(),
                status: format!("pg_stat_ssl says {:?}", out.trim()),
                output: self.log_tail_from(0),
            })
        }
    }

    /// Stops the server (`pg_ctl stop -m fast`). Calling it again does nothing.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        if !self.running {
            return Ok(());
        }
        self.pg_ctl_stop("fast")?;
        self.running = false;
        Ok(())
    }

    fn initdb(&self) -> Result<(), ClusterError> {
        // initdb reads the password from a file; it lives only until initdb is done.
        let pwfile = self.dir.path().join("pwfile");
        self.write_file(&pwfile, &self.password, 0o600)?;
        let mut cmd = self.runner.command(&self.bin_dir.join("initdb"));
        cmd.arg("-D").arg(&self.data_dir).args(["-U", SUPERUSER]).arg(format!("--pwfile={}", pwfile.display())).args([
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]);
        let result = self.run_checked(cmd, "initdb");
        let _ = fs::remove_file(&pwfile);
        result?;

        let socket_dir = self.dir.path().to_string_lossy().replace('\'', "''");
        self.append_config(&format!(
            "\n# struere-proxy TempCluster\n{SERVER_SETTINGS}unix_socket_directories = '{socket_dir}'\n"
        ))
    }

    /// Picks a free port and starts; another process may grab the port between the probe and
    /// the server's bind, so a bind failure retries with a new port.
    fn start_on_free_port(&mut self) -> Result<(), ClusterError> {
        let log = self.log_path();
        // pg_ctl opens the log as the server's user, so the file must already belong to it.
        self.write_file(&log, "", 0o600)?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            let log_offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            let mut cmd = self.runner.command(&self.bin_dir.join("pg_ctl"));
            cmd.arg("start")
                .args(["-w", "-t", PG_CTL_WAIT_SECS, "-D"])
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&log)
                .arg("-o")
                .arg(format!("-p {port}"));
            let out = self.run(cmd, "pg_ctl start")?;
            if out.status.success() {
                self.port = port;
                self.running = true;
                return Ok(());
            }
            let tail = self.log_tail_from(log_offset);
            let err = ClusterError::Command {
                step: format!("pg_ctl start on port {port}"),
                status: out.status.to_string(),
                output: format!("{}\n--- server log ---\n{tail}", String::from_utf8_lossy(&out.stderr).trim()),
            };
            let port_race = tail.contains("could not bind") || tail.contains("already in use");
            if !port_race {
                return Err(err);
            }
            // A half-started server may hold the data directory's lock; make sure it is gone.
            let _ = self.pg_ctl_stop("immediate");
            last_error = Some(err);
        }
        Err(last_error.unwrap_or_else(|| ClusterError::Command {
            step: "pg_ctl start".into(),
            status: "no attempt made".into(),
            output: String::new(),
        }))
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), ClusterError> {
        let mut cmd = self.runner.command(&self.bin_dir.join("pg_ctl"));
        cmd.arg("stop").arg("-D").arg(&self.data_dir).args(["-m", mode, "-w", "-t", PG_CTL_WAIT_SECS]);
        self.run_checked(cmd, &format!("pg_ctl stop -m {mode}")).map(drop)
    }

    fn psql_command(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("psql"));
        // The caller's PG* environment must not redirect these commands elsewhere.
        for var in [
            "PGHOST",
            "PGHOSTADDR",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGPASSWORD",
            "PGPASSFILE",
            "PGSERVICE",
            "PGSERVICEFILE",
            "PGOPTIONS",
            "PGSSLMODE",
            "PGCONNECT_TIMEOUT",
        ] {
            cmd.env_remove(var);
        }
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]);
        cmd
    }

    /// Runs a command in the temp directory (the server's user may not enter our cwd).
    fn run(&self, mut cmd: Command, step: &str) -> Result<Output, ClusterError> {
        cmd.current_dir(self.dir.path()).stdin(Stdio::null()).output().map_err(ClusterError::io(step))
    }

    fn run_checked(&self, cmd: Command, step: &str) -> Result<Output, ClusterError> {
        let out = self.run(cmd, step)?;
        if out.status.success() { Ok(out) } else { Err(command_error(step, &out)) }
    }

    fn append_config(&self, text: &str) -> Result<(), ClusterError> {
        let path = self.data_dir.join("postgresql.conf");
        let mut file = OpenOptions::new().append(true).open(&path).map_err(ClusterError::io("open postgresql.conf"))?;
        file.write_all(text.as_bytes()).map_err(ClusterError::io("write postgresql.conf"))
    }

    fn write_private_file(&self, name: &str, contents: &str) -> Result<(), ClusterError> {
        self.write_file(&self.data_dir.join(name), contents, 0o600)
    }

    /// Writes a file owned by the server's user with the given mode.
    fn write_file(&self, path: &Path, contents: &str, mode: u32) -> Result<(), ClusterError> {
        let step = format!("write {}", path.display());
        fs::write(path, contents).map_err(ClusterError::io(step.clone()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(ClusterError::io(step))?;
        self.runner.give(path)
    }

    fn count_log_lines(&self, needle: &str) -> Result<usize, ClusterError> {
        let log = fs::read(self.log_path()).map_err(ClusterError::io("read server log"))?;
        Ok(String::from_utf8_lossy(&log).matches(needle).count())
    }

    /// The last few KiB of the server log written after `offset`, for error messages.
    fn log_tail_from(&self, offset: u64) -> String {
        let read = || -> io::Result<String> {
            let mut file = fs::File::open(self.log_path())?;
            let len = file.metadata()?.len();
            let start = offset.max(len.saturating_sub(LOG_TAIL_BYTES));
            file.seek(SeekFrom::Start(start))?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        };
        read().unwrap_or_else(|e| format!("(server log unreadable: {e})"))
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if self.running && self.stop().is_err() {
            let _ = self.pg_ctl_stop("immediate");
        }
    }
}

/// Where the PostgreSQL server binaries are: `$STRUERE_PG_BIN`, else `pg_config --bindir` if it
/// holds `initdb`, else the highest `/usr/lib/postgresql/<version>/bin` (Debian's layout).
pub fn find_pg_bin_dir() -> Result<PathBuf, ClusterError> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("STRUERE_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if has_initdb(&dir) {
            Ok(dir)
        } else {
            Err(ClusterError::BinariesNotFound(format!("STRUERE_PG_BIN={} has no initdb", dir.display())))
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_initdb(&dir) {
            return Ok(dir);
        }
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let version = entry.file_name().to_str().and_then(|name| name.split('.').next()?.parse::<u32>().ok());
            let bin = entry.path().join("bin");
            if let Some(version) = version
                && has_initdb(&bin)
                && best.as_ref().is_none_or(|(v, _)| version > *v)
            {
                best = Some((version, bin));
            }
        }
    }
    best.map(|(_, dir)| dir).ok_or_else(|| {
        ClusterError::BinariesNotFound(
            "set STRUERE_PG_BIN, put pg_config on PATH, or install PostgreSQL under /usr/lib/postgresql".into(),
        )
    })
}

/// Runs `cmd` with `input` on stdin and returns stdout, or an error carrying stderr.
fn run_with_stdin(mut cmd: Command, input: &str, step: &str) -> Result<String, ClusterError> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ClusterError::io(step))?;
    // Feed stdin from another thread so a large result can't block on a full stdout pipe.
    let writer = child.stdin.take().map(|mut stdin| {
        let input = input.to_owned();
        thread::spawn(move || stdin.write_all(input.as_bytes()))
    });
    let out = child.wait_with_output().map_err(ClusterError::io(step))?;
    if let Some(writer) = writer {
        // A write error (psql stopped reading after an error) shows up in the exit status.
        let _ = writer.join();
    }
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(command_error(step, &out))
    }
}

fn command_error(step: &str, out: &Output) -> ClusterError {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ClusterError::Command {
        step: step.to_owned(),
        status: out.status.to_string(),
        output: format!("{}\n{}", stderr.trim(), stdout.trim()).trim().to_owned(),
    }
}

/// Numeric uid and gid of an OS user, via `id` (no unsafe libc calls needed).
fn os_user_ids(user: &str) -> Result<(u32, u32), ClusterError> {
    let id = |flag: &str| -> Result<u32, ClusterError> {
        let step = format!("id {flag} {user}");
        let out = Command::new("id").args([flag, user]).output().map_err(ClusterError::io(step.clone()))?;
        if !out.status.success() {
            return Err(command_error(&step, &out));
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|e| ClusterError::Command {
            step,
            status: "unparsable output".into(),
            output: format!("{e}"),
        })
    };
    Ok((id("-u")?, id("-g")?))
}

/// Asks the kernel for a free port on 127.0.0.1. The port is released before the server binds
/// it, hence the retry in `start_on_free_port`.
fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(ClusterError::io("probe free port"))?;
    let port = listener.local_addr().map_err(ClusterError::io("probe free port"))?.port();
    Ok(port)
}

fn random_password() -> Result<String, ClusterError> {
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes)
        .map_err(|e| ClusterError::Io { step: "generate password".into(), source: io::Error::other(e.to_string()) })?;
    Ok(hex::encode(bytes))
}

/// Percent-encodes everything except RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_covers_url_syntax() {
        assert_eq!(percent_encode("a-b.c_d~e"), "a-b.c_d~e");
        assert_eq!(percent_encode("p@ss:w/rd?#%"), "p%40ss%3Aw%2Frd%3F%23%25");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn url_round_trips_through_tokio_postgres() {
        // The encoding `url` uses must survive tokio-postgres's URL parser.
        let cfg: tokio_postgres::Config = format!(
            "postgres://{}:{}@127.0.0.1:5/{}",
            percent_encode("us er"),
            percent_encode("p@ss:w/rd"),
            percent_encode("my db")
        )
        .parse()
        .unwrap();
        assert_eq!(cfg.get_user(), Some("us er"));
        assert_eq!(cfg.get_password(), Some(&b"p@ss:w/rd"[..]));
        assert_eq!(cfg.get_dbname(), Some("my db"));
    }

    #[test]
    fn finds_binaries() {
        let dir = find_pg_bin_dir().unwrap();
        assert!(dir.join("pg_ctl").is_file(), "{}", dir.display());
    }

    async fn select_one_over_scram(url: String) {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        let task = tokio::spawn(conn);
        let row = client.query_one("SELECT 1::int4", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 1);
        drop(client);
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cluster_lifecycle() {
        let mut cluster = tokio::task::spawn_blocking(TempCluster::start).await.unwrap().unwrap();
        let root = cluster.socket_dir().to_path_buf();
        assert!(root.is_dir());
        assert_eq!(cluster.host(), "127.0.0.1");
        assert_eq!(cluster.superuser(), "postgres");
        assert!(!format!("{cluster:?}").contains(cluster.superuser_password()));

        assert_eq!(cluster.psql("postgres", "SELECT 1;").unwrap().trim(), "1");
        let err = cluster.psql("postgres", "SELECT nope;").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");

        select_one_over_scram(cluster.admin_url("postgres")).await;

        // A wrong password is refused: scram is really in force over TCP.
        let bad = cluster.url("postgres", "wrong", "postgres");
        let err = tokio_postgres::connect(&bad, tokio_postgres::NoTls).await.err().unwrap();
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD));

        let cluster = tokio::task::spawn_blocking(move || {
            cluster.stop().unwrap();
            cluster.stop().unwrap(); // idempotent
            cluster
        })
        .await
        .unwrap();
        assert!(tokio_postgres::connect(&cluster.admin_url("postgres"), tokio_postgres::NoTls).await.is_err());
        drop(cluster);
        assert!(!root.exists(), "temp dir left behind: {}", root.display());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_clusters_run_side_by_side() {
        let a = tokio::task::spawn_blocking(TempCluster::start);
        let b = tokio::task::spawn_blocking(TempCluster::start);
        let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        assert_ne!(a.port(), b.port());
        assert_ne!(a.socket_dir(), b.socket_dir());
        a.psql("postgres", "CREATE DATABASE only_in_a;").unwrap();
        let in_b = b.psql("postgres", "SELECT count(*) FROM pg_database WHERE datname = 'only_in_a';").unwrap();
        assert_eq!(in_b.trim(), "0");
        select_one_over_scram(a.admin_url("only_in_a")).await;
        select_one_over_scram(b.admin_url("postgres")).await;
        let roots = (a.socket_dir().to_path_buf(), b.socket_dir().to_path_buf());
        tokio::task::spawn_blocking(move || drop((a, b))).await.unwrap();
        assert!(!roots.0.exists() && !roots.1.exists());
    }

    #[test]
    fn hba_line_and_reload() {
        let cluster = TempCluster::start().unwrap();
        cluster.psql("postgres", "CREATE ROLE blocked LOGIN PASSWORD 'pw';").unwrap();
        cluster.add_hba_line_first("host all blocked 127.0.0.1/32 reject").unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let err = rt
            .block_on(tokio_postgres::connect(&cluster.url("blocked", "pw", "postgres"), tokio_postgres::NoTls))
            .err()
            .unwrap();
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION), "{err:?}");
        assert!(cluster.add_hba_line_first("a\nb").is_err());
    }
}
