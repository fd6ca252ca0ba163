//! Command-line interface: subcommands and the flag/environment layer of the configuration.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{LogFormat, RawConfig, TlsMode};

#[derive(Debug, Parser)]
#[command(
    name = "struere-proxy",
    version,
    about = "PostgreSQL proxy that makes one shared database safe for many tenants, environments and roles"
)]
pub struct Cli {
    /// TOML configuration file (default: struere-proxy.toml if present).
    #[arg(long, global = true, env = "STRUERE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: Overrides,
    #[command(subcommand)]
    pub command: Command,
}

/// Settings that flags and environment variables can override (flags win over the environment,
/// both win over the file).
#[derive(Debug, Clone, Default, Args)]
pub struct Overrides {
    /// Address to listen on (default 127.0.0.1:6432).
    #[arg(long, global = true, env = "STRUERE_LISTEN")]
    pub listen: Option<String>,
    /// Upstream URL of the least-privilege role used for client traffic.
    #[arg(long, global = true, env = "STRUERE_UPSTREAM", hide_env_values = true)]
    pub upstream: Option<String>,
    /// Upstream URL of the owner role (init, keys, key lookups, operator sessions).
    #[arg(long, global = true, env = "STRUERE_ADMIN_UPSTREAM", hide_env_values = true)]
    pub admin_upstream: Option<String>,
    /// Database name clients must ask for (default: the upstream URL's).
    #[arg(long, global = true, env = "STRUERE_DATABASE")]
    pub database: Option<String>,
    /// disabled | optional | required
    #[arg(long, global = true, env = "STRUERE_TLS_MODE")]
    pub tls_mode: Option<TlsMode>,
    #[arg(long, global = true, env = "STRUERE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "STRUERE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Seconds a key lookup (positive or negative) is cached; also the revocation delay.
    #[arg(long, global = true, env = "STRUERE_KEY_CACHE_TTL")]
    pub key_cache_ttl: Option<u64>,
    /// Largest client message accepted, in bytes.
    #[arg(long, global = true, env = "STRUERE_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<usize>,
    /// text | json
    #[arg(long, global = true, env = "STRUERE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Audit events written to the database: all | refused | off (all go to the log).
    #[arg(long, global = true, env = "STRUERE_EVENT_STORE")]
    pub event_store: Option<crate::config::EventStore>,
    /// Accept operator (break-glass) keys.
    #[arg(long, global = true, env = "STRUERE_OPERATOR_KEYS")]
    pub operator_keys: Option<bool>,
    /// Local policy directory, for `policy check|dev|status` (default ./policies) and the set the
    /// demo deploys (default: the shipped example set). `serve` uses the deployed sets only.
    #[arg(long, global = true, env = "STRUERE_POLICIES")]
    pub policies: Option<PathBuf>,
    /// Address of the admin HTTP endpoint (/metrics, /healthz, /readyz); off when unset.
    #[arg(long, global = true, env = "STRUERE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Serve production keys even when `doctor` finds holes in the upstream role.
    #[arg(long, global = true, env = "STRUERE_ALLOW_UNSAFE_UPSTREAM_ROLE")]
    pub allow_unsafe_upstream_role: Option<bool>,
    /// Operator token of the admin dashboard (off while unset). Prefer the environment or the
    /// file to the flag: command lines are visible to other users.
    #[arg(long, global = true, env = "STRUERE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Log filter, e.g. `info` or `warn,struere_proxy=debug` (else RUST_LOG, else the file's
    /// log_level, else info).
    #[arg(long, global = true, env = "STRUERE_LOG")]
    pub log_level: Option<String>,
    /// Threads that run sessions (default 1; 0: one per core).
    #[arg(long, global = true, env = "STRUERE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

impl Overrides {
    pub fn to_raw(&self) -> RawConfig {
        RawConfig {
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
            admin_upstream: self.admin_upstream.clone(),
            database: self.database.clone(),
            tls_mode: self.tls_mode,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            key_cache_ttl_secs: self.key_cache_ttl,
            max_message_size: self.max_message_size,
            log_format: self.log_format,
            event_store: self.event_store,
            operator_keys: self.operator_keys,
            policies: self.policies.clone(),
            allow_unsafe_upstream_role: self.allow_unsafe_upstream_role,
            admin_listen: self.admin_listen.clone(),
            admin_token: self.admin_token.clone(),
            worker_threads: self.worker_threads,
            log_level: self.log_level.clone().or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty())),
            ..RawConfig::default()
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Serve,
    /// Create the proxy's own schema in the upstream database (idempotent).
    Init,
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Start a throwaway PostgreSQL (or, with --upstream URL, use that database through its
    /// owner URL), load the demo, deploy its policies, create keys, and serve until Ctrl-C.
    Demo {
        /// Listen on 127.0.0.1:PORT (default 6432, or any free port if it is taken).
        #[arg(long)]
        port: Option<u16>,
        // `demo --upstream URL` (the global flag, or STRUERE_UPSTREAM) names the owner connection
        // of an existing database to load the demo into instead of a throwaway PostgreSQL; its
        // data is kept on exit and the demo's keys are revoked.
    },
    /// Work with the policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show what the proxy would forward for a statement (or why it would refuse it).
    Explain(ExplainArgs),
    /// Audit events (statement decisions) recorded in the database.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Executions per key and environment: statements, rows, errors, time.
    Usage {
        /// development | production | operator
        #[arg(long)]
        env: Option<String>,
    },
    /// Schema migrations for the environment workflow (owner connection).
    #[command(subcommand)]
    Migrate(MigrateCommand),
    /// Check the managed tables and the upstream role against the policies. One line per finding
    /// (ERROR, WARN or OK); exit code 0 when there is no ERROR, 1 otherwise.
    Doctor,
    /// GET an admin endpoint URL (`http://host:port/readyz`); exit 0 on 200, 1 otherwise. For
    /// container health checks (no curl needed).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:9090/readyz")]
        url: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print the last events, oldest first, one per line.
    Tail(TailArgs),
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// development | production | operator
    #[arg(long)]
    pub env: Option<String>,
    #[arg(long)]
    pub org: Option<String>,
    /// allowed | rewritten | refused
    #[arg(long)]
    pub verdict: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
    /// Keep printing new events as they are written.
    #[arg(long)]
    pub follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Give a table its environment column: add it (nullable), backfill NULL rows in batches,
    /// restrict its values with a CHECK, set NOT NULL, and index (organization, environment).
    /// Idempotent: a step already done is reported as such.
    AddEnvironment(AddEnvironmentArgs),
}

#[derive(Debug, Args)]
pub struct AddEnvironmentArgs {
    /// The table: `name` or `schema.name` (a managed table's schema and columns come from the policy).
    #[arg(long)]
    pub table: String,
    /// The environment existing rows belong to.
    #[arg(long, default_value = "development", value_parser = ["development", "production"])]
    pub default: String,
    /// Rows updated per transaction while backfilling.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_size: u32,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Take the identity from an existing key instead of the flags below.
    #[arg(long, conflicts_with_all = ["env", "org", "roles", "actor_id"])]
    pub key: Option<String>,
    /// development | production
    #[arg(long, required_unless_present = "key")]
    pub env: Option<String>,
    #[arg(long, required_unless_present = "key")]
    pub org: Option<String>,
    #[arg(long = "role")]
    pub roles: Vec<String>,
    #[arg(long, default_value = "user")]
    pub actor_type: String,
    #[arg(long, default_value = "explain")]
    pub actor_id: String,
    /// Print what a Parse of the text prepares instead of a simple Query's text, with these
    /// declared parameter types (comma-separated OIDs, 0 = undeclared; none given: all
    /// undeclared, as libpq, pgbench -M prepared and most drivers send): `--parse`, `--parse=25,0`.
    #[arg(long, value_name = "OIDS", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    pub parse: Option<String>,
    /// The SQL text (one message: may hold several statements).
    pub sql: String,
}

/// The policy lifecycle. Local files live in the policy directory (`--policies`, default
/// `./policies`); deployed bundles live in the database (`--admin-upstream`), one history per
/// environment. Exit codes: 0 done, 1 differences found (`status --exit-code`), 2 could not run.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate the local policy directory; every problem is printed as file:line: message.
    Check,
    /// Validate the local files (and against the live catalog) and sync them to development.
    /// Production never changes this way.
    Dev {
        /// Keep running: re-sync on every change of the files and print what changed.
        #[arg(long)]
        watch: bool,
    },
    /// Promote development's bundle to production, printing the difference first.
    Deploy {
        /// Print the difference only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Compare the local files, development, production and the live catalog; print the
    /// differences (the check to run before deploying).
    Status {
        /// Exit 1 when there are differences.
        #[arg(long)]
        exit_code: bool,
    },
    /// The deployed versions, newest first.
    History {
        /// development | production (default: both)
        #[arg(long)]
        env: Option<String>,
    },
    /// Make an older version the one in force (recorded as a new version).
    Rollback {
        /// development | production
        #[arg(long)]
        env: String,
        /// The version to restore (see `policy history`).
        #[arg(long)]
        to: i32,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (alone) on stdout. It is shown only this once.
    Create(CreateKey),
    /// List keys (prefix, name, scope, state); never secrets.
    List,
    /// Revoke keys by id, display prefix or name.
    Revoke { selector: String },
}

#[derive(Debug, Args)]
pub struct CreateKey {
    #[arg(long, required_unless_present = "operator")]
    pub org: Option<String>,
    /// development | production
    #[arg(long, required_unless_present = "operator")]
    pub env: Option<String>,
    /// Role name; repeat for several.
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// user | agent | system | webhook
    #[arg(long, default_value = "system")]
    pub actor_type: String,
    /// Actor id (default: the key's name).
    #[arg(long)]
    pub actor_id: Option<String>,
    #[arg(long)]
    pub name: String,
    /// Lifetime, e.g. 3600, 90s, 15m, 12h, 30d.
    #[arg(long, value_parser = parse_duration)]
    pub expires_in: Option<Duration>,
    /// Break-glass key bound to no organization or environment (statements forwarded as sent).
    #[arg(long, conflicts_with_all = ["org", "env", "roles"])]
    pub operator: bool,
}

/// `3600`, `90s`, `15m`, `12h`, `30d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("invalid duration unit in {s:?} (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "struere-proxy",
            "keys",
            "create",
            "--org",
            "acme",
            "--env",
            "development",
            "--role",
            "admin",
            "--role",
            "teacher",
            "--name",
            "ci-bot",
        ])
        .unwrap();
        let Command::Keys(KeysCommand::Create(c)) = cli.command else { panic!() };
        assert_eq!(c.roles, ["admin", "teacher"]);
        assert!(Cli::try_parse_from(["struere-proxy", "keys", "create", "--name", "x"]).is_err());
        assert!(Cli::try_parse_from(["struere-proxy", "keys", "create", "--name", "x", "--operator"]).is_ok());
    }

    #[test]
    fn policy_commands_parse() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["struere-proxy", "policy"], args].concat());
        assert!(matches!(
            parse(&["dev", "--watch"]).unwrap().command,
            Command::Policy(PolicyCommand::Dev { watch: true })
        ));
        assert!(matches!(
            parse(&["status", "--exit-code"]).unwrap().command,
            Command::Policy(PolicyCommand::Status { exit_code: true })
        ));
        let cli = parse(&["rollback", "--env", "production", "--to", "3"]).unwrap();
        let Command::Policy(PolicyCommand::Rollback { env, to }) = cli.command else { panic!() };
        assert_eq!((env.as_str(), to), ("production", 3));
        assert!(parse(&["rollback", "--env", "production"]).is_err());
        assert!(parse(&["deploy", "--dry-run", "--admin-upstream", "postgres://x@y/z"]).is_ok());
    }

    #[test]
    fn migrate_add_environment_parses() {
        let cli = Cli::try_parse_from(["struere-proxy", "migrate", "add-environment", "--table", "s.t"]).unwrap();
        let Command::Migrate(MigrateCommand::AddEnvironment(a)) = cli.command else { panic!() };
        assert_eq!((a.table.as_str(), a.default.as_str(), a.batch_size), ("s.t", "development", 5000));
        let args = ["struere-proxy", "migrate", "add-environment", "--table", "t", "--default", "production"];
        assert!(Cli::try_parse_from(args).is_ok());
        for bad in [["--default", "staging"], ["--default", "prod"], ["--batch-size", "0"]] {
            let args = ["struere-proxy", "migrate", "add-environment", "--table", "t", bad[0], bad[1]];
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from(["struere-proxy", "doctor", "--allow-unsafe-upstream-role", "true"]).unwrap();
        assert_eq!(cli.overrides.allow_unsafe_upstream_role, Some(true));
    }
}
