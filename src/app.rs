//! The subcommands, wired to the library. Kept apart from `main.rs` so tests can call them.

use std::io::Write;

use crate::auth::identity::{ActorContext, ActorType, Environment};
use crate::auth::store::{self, KeySpec};
use crate::cli::{CreateKey, EventsCommand, ExplainArgs, KeysCommand, MigrateCommand, PolicyCommand, TailArgs};
use crate::config::{ConfigError, ConfigSource, DEFAULT_CONFIG_FILE, RawConfig};
use crate::server::RunningProxy;

pub type AppResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The configuration layers: the file (`--config`, else `struere-proxy.toml` when present), then
/// the environment and flags (`overrides`).
pub fn load_raw(config: Option<&std::path::Path>, overrides: &crate::cli::Overrides) -> Result<RawConfig, ConfigError> {
    let default = std::path::Path::new(DEFAULT_CONFIG_FILE);
    let file = match config {
        Some(path) => RawConfig::from_file(path)?,
        None if default.exists() => RawConfig::from_file(default)?,
        None => RawConfig::default(),
    };
    Ok(file.overlay(overrides.to_raw()))
}

/// The owner-role URL for `init` and `keys` (falls back to `upstream`).
pub fn admin_url(raw: &RawConfig) -> AppResult<String> {
    raw.admin_upstream
        .clone()
        .or_else(|| raw.upstream.clone())
        .ok_or_else(|| "missing setting admin_upstream (or upstream)".into())
}

pub async fn init(raw: &RawConfig) -> AppResult<()> {
    let client = store::connect_admin(&admin_url(raw)?).await?;
    store::init_schema(&client).await?;
    eprintln!("proxy schema \"{}\" is ready", store::PROXY_SCHEMA);
    Ok(())
}

pub async fn keys(raw: &RawConfig, cmd: KeysCommand) -> AppResult<()> {
    let client = store::connect_admin(&admin_url(raw)?).await?;
    match cmd {
        KeysCommand::Create(c) => {
            let spec = key_spec(c)?;
            let key = store::create_key(&client, &spec).await?;
            println!("{}", key.secret);
        }
        KeysCommand::List => {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<5} {:<16} {:<20} {:<12} {:<12} {:<20} {:<24} state",
                "id", "prefix", "name", "org", "env", "roles", "actor"
            )?;
            for k in store::list_keys(&client).await? {
                let state = k.state(std::time::SystemTime::now());
                let dash = || "-".to_owned();
                writeln!(
                    out,
                    "{:<5} {:<16} {:<20} {:<12} {:<12} {:<20} {:<24} {}",
                    k.id,
                    k.prefix,
                    k.name,
                    k.organization.unwrap_or_else(dash),
                    if k.operator { "operator".to_owned() } else { k.environment.unwrap_or_else(dash) },
                    k.roles.join(","),
                    k.actor.unwrap_or_else(dash),
                    state
                )?;
            }
        }
        KeysCommand::Revoke { selector } => {
            let n = store::revoke_key(&client, &selector).await?;
            if n == 0 {
                return Err(format!("no active key matches {selector:?}").into());
            }
            eprintln!("revoked {n} key(s); proxies drop their sessions within the key cache TTL");
        }
    }
    Ok(())
}

fn key_spec(c: CreateKey) -> AppResult<KeySpec> {
    if c.operator {
        return Ok(KeySpec { name: c.name, actor: None, expires_in: c.expires_in });
    }
    let org = c.org.ok_or("--org is required")?;
    let env: Environment = c.env.ok_or("--env is required")?.parse()?;
    let actor_type: ActorType = c.actor_type.parse()?;
    let actor_id = c.actor_id.unwrap_or_else(|| c.name.clone());
    Ok(KeySpec {
        name: c.name,
        actor: Some(ActorContext { organization: org, environment: env, roles: c.roles, actor_type, actor_id }),
        expires_in: c.expires_in,
    })
}

/// The local policy directory: the configured one, else `./policies`.
fn policy_dir(raw: &RawConfig) -> std::path::PathBuf {
    raw.policies.clone().unwrap_or_else(|| std::path::PathBuf::from("policies"))
}

/// `policy …`. `Ok(false)`: `status --exit-code` found differences.
pub async fn policy(raw: &RawConfig, cmd: PolicyCommand) -> AppResult<bool> {
    use crate::lifecycle;
    let dir = policy_dir(raw);
    match cmd {
        PolicyCommand::Check => {
            let p = crate::policy::load_dir(&dir)?;
            println!(
                "ok: {} tables; development {} ({} roles); production {} ({} roles)",
                p.development.tables.by_name.len(),
                p.development.hash,
                p.development.roles.len(),
                p.production.hash,
                p.production.roles.len()
            );
            Ok(true)
        }
        PolicyCommand::Dev { watch } => {
            let mut client = store::connect_admin(&admin_url(raw)?).await?;
            if !watch {
                let bundle = crate::policy::Bundle::from_dir(&dir)?;
                print_change(&lifecycle::sync_development(&mut client, &bundle, &dir).await?)?;
                return Ok(true);
            }
            watch_and_sync(&mut client, &dir).await?;
            Ok(true)
        }
        PolicyCommand::Deploy { dry_run } => {
            let mut client = store::connect_admin(&admin_url(raw)?).await?;
            let (dev, changes) = lifecycle::plan_deploy(&client).await?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "production ← development v{} ({}):", dev.version, dev.bundle.hash())?;
            print_lines(&mut out, &changes)?;
            drop(out);
            if !dry_run {
                print_change(&lifecycle::deploy(&mut client).await?)?;
            }
            Ok(true)
        }
        PolicyCommand::Status { exit_code } => {
            let client = store::connect_admin(&admin_url(raw)?).await?;
            let local = crate::policy::Bundle::from_dir(&dir).ok();
            let status = lifecycle::status(&client, local.as_ref().map(|b| (b, dir.as_path()))).await?;
            let mut out = std::io::stdout().lock();
            for v in &status.versions {
                writeln!(out, "{v}")?;
            }
            if local.is_none() {
                writeln!(out, "(no readable policy files in {}: local files not compared)", dir.display())?;
            }
            for section in &status.sections {
                writeln!(out, "\n## {}", section.title)?;
                print_lines(&mut out, &section.lines)?;
            }
            let n = status.differences();
            writeln!(out, "\n{n} difference(s) to act on")?;
            Ok(!(exit_code && n > 0))
        }
        PolicyCommand::History { env } => {
            let env = env.map(|e| e.parse::<Environment>()).transpose()?;
            let client = store::connect_admin(&admin_url(raw)?).await?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:<12} {:>7} {:<16} {:<20} {:<24} source", "env", "version", "hash", "deployed_at", "by")?;
            for v in crate::policy::store::history(&client, env).await? {
                writeln!(
                    out,
                    "{:<12} {:>7} {:<16} {:<20} {:<24} {}",
                    v.environment.as_str(),
                    format!("v{}", v.version),
                    v.content_hash,
                    v.deployed_at,
                    v.deployed_by,
                    v.source
                )?;
            }
            Ok(true)
        }
        PolicyCommand::Rollback { env, to } => {
            let env: Environment = env.parse()?;
            let mut client = store::connect_admin(&admin_url(raw)?).await?;
            print_change(&lifecycle::rollback(&mut client, env, to).await?)?;
            Ok(true)
        }
    }
}

fn print_lines(out: &mut impl Write, lines: &[String]) -> std::io::Result<()> {
    if lines.is_empty() {
        writeln!(out, "  (no differences)")?;
    }
    for l in lines {
        writeln!(out, "  {l}")?;
    }
    Ok(())
}

fn print_change(change: &crate::lifecycle::Change) -> std::io::Result<()> {
    use crate::policy::store::Published;
    let mut out = std::io::stdout().lock();
    match change.published {
        Published::New(v) => writeln!(out, "{}: v{v} is now in force", change.environment.as_str())?,
        Published::Unchanged(v) => writeln!(out, "{}: unchanged (v{v} is in force)", change.environment.as_str())?,
    }
    print_lines(&mut out, &change.diff)?;
    out.flush()
}

/// `policy dev --watch`: poll the files (twice a second) and try every new content once: sync
/// it and print what changed, or print why it was not synced (the last good version stays).
async fn watch_and_sync(client: &mut tokio_postgres::Client, dir: &std::path::Path) -> AppResult<()> {
    // The last content tried, or the last read error: each is reported once.
    let mut last: Option<Result<crate::policy::Bundle, String>> = None;
    eprintln!("watching {} (Ctrl-C to stop)", dir.display());
    loop {
        let read = crate::policy::Bundle::from_dir(dir).map_err(|e| e.to_string());
        if last.as_ref() != Some(&read) {
            match &read {
                Ok(bundle) => match crate::lifecycle::sync_development(client, bundle, dir).await {
                    Ok(change) => print_change(&change)?,
                    Err(crate::lifecycle::LifecycleError::Db(e)) => return Err(e.into()),
                    Err(e) => println!("not synced (development keeps its version):\n{e}"),
                },
                Err(e) => println!("not synced (development keeps its version):\n{e}"),
            }
            std::io::stdout().flush()?;
            last = Some(read);
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `explain`: the rewritten SQL on stdout (exit 0), or the refusal on stderr (exit 1).
pub async fn explain(raw: &RawConfig, args: ExplainArgs) -> AppResult<bool> {
    let mut settings_raw = raw.clone();
    settings_raw.admin_upstream = Some(admin_url(raw)?);
    if settings_raw.upstream.is_none() {
        settings_raw.upstream = settings_raw.admin_upstream.clone();
    }
    let settings = crate::config::Settings::from_raw(settings_raw)?;
    let engine = crate::server::load_engine(&settings).await?;
    let actor = match &args.key {
        Some(key) => {
            let store = crate::auth::store::KeyStore::new(settings.admin_upstream.clone(), settings.key_cache_ttl);
            match store.lookup(&crate::auth::api_key::KeyHash::of(key)).await? {
                crate::auth::store::KeyStatus::Valid(r) => match &r.caller {
                    crate::auth::identity::Caller::Environment(a) => a.clone(),
                    crate::auth::identity::Caller::Operator => {
                        println!("{}", args.sql);
                        eprintln!("operator key: statements are forwarded as sent");
                        return Ok(true);
                    }
                },
                other => return Err(format!("the key is not usable: {}", other.reason()).into()),
            }
        }
        None => ActorContext {
            organization: args.org.clone().ok_or("--org is required")?,
            environment: args.env.clone().ok_or("--env is required")?.parse()?,
            roles: args.roles.clone(),
            actor_type: args.actor_type.parse()?,
            actor_id: args.actor_id.clone(),
        },
    };
    let declared: Vec<u32> = match args.parse.as_deref() {
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| t.parse().map_err(|_| format!("--parse: not a type OID: {t}")))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    let rewriter = crate::rewrite::Rewriter::new(0, engine);
    let rewritten = match args.parse {
        Some(_) => rewriter.rewrite_parse(&args.sql, &declared, &actor),
        None => rewriter.rewrite(&args.sql, &actor),
    };
    match rewritten {
        Ok(r) => {
            println!("{}", r.sql);
            Ok(true)
        }
        Err(refusal) => {
            eprintln!("{}: {refusal}", refusal.sqlstate().code());
            Ok(false)
        }
    }
}

/// `migrate add-environment`: the steps and their row counts on stdout.
pub async fn migrate(raw: &RawConfig, cmd: MigrateCommand) -> AppResult<()> {
    match cmd {
        MigrateCommand::AddEnvironment(args) => {
            let client = store::connect_admin(&admin_url(raw)?).await?;
            let tables = managed_tables(raw, &client).await?;
            let target = crate::migrate::Target::resolve(&args.table, &tables)?;
            let default: Environment = args.default.parse()?;
            crate::migrate::add_environment(&client, &target, default, args.batch_size, &mut std::io::stdout()).await?;
            Ok(())
        }
    }
}

/// The managed tables `doctor` and `migrate` work on: those of the policy directory when one is
/// given (checking files before they are deployed), else those the deployed policies manage
/// (both environments), else those of `./policies`.
async fn managed_tables(raw: &RawConfig, client: &tokio_postgres::Client) -> AppResult<crate::policy::Tables> {
    if let Some(dir) = &raw.policies {
        return Ok(crate::policy::load_dir(dir)?.all_tables());
    }
    let deployed = crate::server::load_policies(client).await?;
    if !deployed.development.is_deployed() && !deployed.production.is_deployed() {
        return Ok(crate::policy::load_dir(&policy_dir(raw))?.all_tables());
    }
    Ok(deployed.all_tables())
}

/// `doctor`: one line per finding and a summary on stdout. `Ok(false)` when there is an ERROR.
pub async fn doctor(raw: &RawConfig) -> AppResult<bool> {
    use crate::doctor::{Finding, Report, RoleAudit, check_tables};
    let client = store::connect_admin(&admin_url(raw)?).await?;
    let tables = &managed_tables(raw, &client).await?;
    let mut report = Report::default();
    report.findings.extend(check_tables(&client, tables).await?);
    match &raw.upstream {
        Some(url) => {
            let role = crate::upstream::UpstreamConfig::from_url(url)?.user;
            report.findings.extend(RoleAudit::run(&client, &role, tables).await?.findings);
        }
        None => report.findings.push(Finding::warn(
            "upstream",
            "not configured: the upstream role was not checked",
            "set upstream (STRUERE_UPSTREAM or --upstream) and run doctor again",
        )),
    }
    let mut out = std::io::stdout().lock();
    for finding in &report.findings {
        writeln!(out, "{finding}")?;
    }
    writeln!(out, "{}", report.summary())?;
    Ok(!report.has_errors())
}

/// `serve`: run until SIGINT/SIGTERM; SIGHUP reloads the configuration from `source`.
pub async fn serve(source: ConfigSource) -> AppResult<()> {
    let settings = crate::config::Settings::from_raw(source()?)?;
    let running = RunningProxy::start(settings).await?;
    running.proxy.set_config_source(source);
    crate::server::reload_on_sighup(&running.proxy)?;
    eprintln!("struere-proxy listening on {}", running.addr);
    wait_for_signal().await;
    // The drain timeout in force now (a reload may have changed it).
    let timeout = running.proxy.current().shutdown_timeout;
    eprintln!("draining: no new clients; sessions end when idle (at most {} s)", timeout.as_secs());
    let forced = running.drain(timeout).await;
    if forced > 0 {
        eprintln!("ended {forced} session(s) still busy at the drain timeout");
    }
    Ok(())
}

/// `healthcheck --url http://host:port/path`: one GET; Ok on 200. For container health checks.
pub async fn healthcheck(url: &str, timeout: std::time::Duration) -> AppResult<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").ok_or("--url must start with http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || path.contains(char::is_whitespace) {
        return Err(format!("invalid --url {url:?}").into());
    }
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(authority).await?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        (&mut tcp).take(64 * 1024).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer =
        tokio::time::timeout(timeout, exchange).await.map_err(|_| format!("{url}: no answer within {timeout:?}"))??;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1).unwrap_or_default();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim()).unwrap_or_default();
    if status == "200" {
        println!("{url}: {status} {body}");
        Ok(())
    } else {
        Err(format!("{url}: {status} {body}").into())
    }
}

pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `events tail`: the last events (oldest first); with `--follow`, then every new one.
pub async fn events(raw: &RawConfig, cmd: EventsCommand) -> AppResult<()> {
    let EventsCommand::Tail(args) = cmd;
    if let Some(v) = &args.verdict
        && !matches!(v.as_str(), "allowed" | "rewritten" | "refused")
    {
        return Err(format!("--verdict must be allowed, rewritten or refused, not {v:?}").into());
    }
    let client = store::connect_admin(&admin_url(raw)?).await?;
    let mut filter = crate::reports::EventFilter {
        after_id: 0,
        environment: args.env.clone(),
        organization: args.org.clone(),
        verdict: args.verdict.clone(),
        limit: args.limit.max(0),
    };
    loop {
        let rows = crate::reports::recent_events(&client, &filter).await?;
        let mut out = std::io::stdout().lock();
        for r in rows.iter().rev() {
            filter.after_id = filter.after_id.max(r.id);
            print_event(&mut out, r, &args)?;
        }
        out.flush()?;
        drop(out);
        if !args.follow {
            return Ok(());
        }
        filter.limit = 1000;
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Control characters a tenant could put in a quoted identifier (newlines, escape sequences)
/// are shown escaped, so an event can never forge a line or drive the operator's terminal.
fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

fn print_event(out: &mut impl Write, r: &crate::reports::EventRow, args: &TailArgs) -> AppResult<()> {
    let t = |s: &str| printable(s);
    if args.json {
        let obj = serde_json::json!({
            "id": r.id, "at": t(&r.at), "environment": t(&r.environment), "organization": t(&r.organization),
            "key": t(&r.key_prefix), "actor": t(&r.actor), "roles": t(&r.roles), "kinds": t(&r.kinds),
            "tables": t(&r.tables), "verdict": t(&r.verdict), "reason": t(&r.reason), "sqlstate": t(&r.sqlstate),
            "policy_version": t(&r.policy_version), "sql_hash": t(&r.sql_hash), "rows": r.rows,
            "duration_us": r.duration_us, "statements": r.statements,
        });
        writeln!(out, "{obj}")?;
    } else {
        let reason = if r.reason.is_empty() { String::new() } else { format!(" {} {}", t(&r.sqlstate), t(&r.reason)) };
        writeln!(
            out,
            "{} {} {} key={} actor={} roles={} {} [{}] tables={} rows={} {}us{}{}",
            t(&r.at),
            t(&r.environment),
            t(&r.organization),
            t(&r.key_prefix),
            t(&r.actor),
            t(&r.roles),
            t(&r.verdict),
            t(&r.kinds),
            t(&r.tables),
            r.rows,
            r.duration_us,
            if r.statements > 1 { format!(" x{}", r.statements) } else { String::new() },
            reason
        )?;
    }
    Ok(())
}

/// `usage`: executions per key, environment and organization.
pub async fn usage(raw: &RawConfig, env: Option<String>) -> AppResult<()> {
    let client = store::connect_admin(&admin_url(raw)?).await?;
    let rows = crate::reports::usage(&client, env.as_deref(), false).await?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<12} {:<12} {:<18} {:>10} {:>10} {:>8} {:>12}",
        "env", "org", "key", "statements", "rows", "errors", "time_ms"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<12} {:<12} {:<18} {:>10} {:>10} {:>8} {:>12.1}",
            r.environment,
            r.organization,
            r.key_prefix,
            r.statements,
            r.rows,
            r.errors,
            r.time_us as f64 / 1000.0
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_text_cannot_forge_lines_or_escape_sequences() {
        assert_eq!(super::printable("x\n2026 production \u{1b}[31mRED\r"), "x\\n2026 production \\u{1b}[31mRED\\r");
        assert_eq!(super::printable("plain tables=users"), "plain tables=users");
    }
}
