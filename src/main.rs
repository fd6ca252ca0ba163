//! `struere-proxy`: parse the command line, set up logging, run the subcommand.

use clap::Parser;
use struere_proxy::cli::{Cli, Command};
use struere_proxy::config::{DEFAULT_CONFIG_FILE, LogFormat, RawConfig};
use struere_proxy::{app, demo};

fn load_raw(cli: &Cli) -> Result<RawConfig, Box<dyn std::error::Error + Send + Sync>> {
    let file = match &cli.config {
        Some(path) => RawConfig::from_file(path)?,
        None if std::path::Path::new(DEFAULT_CONFIG_FILE).exists() => {
            RawConfig::from_file(std::path::Path::new(DEFAULT_CONFIG_FILE))?
        }
        None => RawConfig::default(),
    };
    Ok(file.overlay(cli.overrides.to_raw()))
}

/// Logs go to stderr through a writer thread: a session never waits on the terminal or a log
/// pipe (one event line per statement). Lossless: when its buffer (128k lines) is full, the
/// logging task waits rather than dropping an audit line. The guard flushes at exit.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRUERE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("struere-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let raw = match load_raw(&cli) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let _log_guard = init_logging(raw.log_format.unwrap_or(LogFormat::Text));
    let result = match cli.command {
        Command::Serve => app::serve(raw).await,
        Command::Init => app::init(&raw).await,
        Command::Keys(k) => app::keys(&raw, k).await,
        Command::Demo { port } => {
            let mut raw = raw;
            if let Some(p) = port {
                raw.listen = Some(format!("127.0.0.1:{p}"));
            }
            // For the demo, --upstream (flag or environment, not the configuration file) is the
            // owner URL of the database to use; the demo derives its own upstream settings.
            raw.upstream = None;
            raw.admin_upstream = None;
            demo::run(cli.overrides.upstream.clone(), raw).await
        }
        // 1: differences (`status --exit-code`); 2: could not run.
        Command::Policy(p) => match app::policy(&raw, p).await {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        Command::Events(crate_events) => app::events(&raw, crate_events).await,
        Command::Usage { env } => app::usage(&raw, env).await,
        Command::Explain(args) => match app::explain(&raw, args).await {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Migrate(m) => app::migrate(&raw, m).await,
        // Exit 1 when the report has an ERROR (and, as for every command, when it cannot run).
        Command::Doctor => match app::doctor(&raw).await {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
