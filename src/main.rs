//! `struere-proxy`: parse the command line, set up logging, run the subcommand.

use std::sync::Arc;

use clap::Parser;
use struere_proxy::cli::{Cli, Command};
use struere_proxy::config::{ConfigError, ConfigSource, LogFormat};
use struere_proxy::{app, demo, logging};

/// mimalloc, not the system allocator: a cache miss builds and drops several parse trees
/// (thousands of small allocations), and glibc's malloc spent about a fifth of a miss in
/// malloc/free and in page faults from trimming (criterion `rewrite miss *`: 15–20% faster).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The file, the environment and the flags, layered; read again by every reload.
    let source: ConfigSource = {
        let (config, overrides) = (cli.config.clone(), cli.overrides.clone());
        Arc::new(move || app::load_raw(config.as_deref(), &overrides))
    };
    let raw = match source() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let _log_guard =
        logging::init(raw.log_format.unwrap_or(LogFormat::Text), raw.log_level.as_deref().unwrap_or("info"));
    let runtime = match session_runtime(raw.worker_threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    runtime.block_on(run(cli, source, raw))
}

/// The runtime sessions run on, with `worker_threads` threads (`config::worker_threads`).
///
/// One thread (the default) is tokio's current-thread scheduler, on the thread that starts the
/// proxy: a multi-thread scheduler with one worker keeps per-wake-up statistics (two clock reads
/// and a `pow` per batch of polled tasks, to tune work stealing there is no one to steal from)
/// and runs the accept loop on a second thread.
fn session_runtime(setting: Option<usize>) -> Result<tokio::runtime::Runtime, ConfigError> {
    let threads = struere_proxy::config::worker_threads(setting)?;
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build().map_err(|e| ConfigError::Invalid { name: "worker_threads", reason: e.to_string() })
}

async fn run(cli: Cli, source: ConfigSource, raw: struere_proxy::config::RawConfig) -> std::process::ExitCode {
    let result = match cli.command {
        Command::Serve => app::serve(source).await,
        Command::Init => app::init(&raw).await,
        Command::Keys(k) => app::keys(&raw, k).await,
        Command::Demo { port } => {
            // For the demo, --upstream (flag or environment, not the configuration file) is the
            // owner URL of the database to use; the demo derives its own upstream settings.
            let overrides: ConfigSource = Arc::new(move || {
                let mut raw = source()?;
                if let Some(p) = port {
                    raw.listen = Some(format!("127.0.0.1:{p}"));
                }
                raw.upstream = None;
                raw.admin_upstream = None;
                Ok(raw)
            });
            demo::run(cli.overrides.upstream.clone(), overrides).await
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
        Command::Healthcheck { url, timeout } => {
            app::healthcheck(&url, std::time::Duration::from_secs(timeout.max(1))).await
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
