//! The `sentinel` binary: the daemon (`sentinel run`) and its CLI.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use sentinel::cli::{self, Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = || {
        cli.config
            .clone()
            .unwrap_or_else(|| PathBuf::from(cli::DEFAULT_CONFIG))
    };

    if cli.validate || matches!(cli.command, Some(Command::Validate)) {
        return ExitCode::from(cli::validate(&config()) as u8);
    }
    let result = match &cli.command {
        None => {
            eprintln!("error: no command given; see `sentinel --help`");
            return ExitCode::from(2);
        }
        Some(Command::Run) => run_daemon(config()),
        Some(command) => cli::client_command(&cli, command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`sentinel deny list | head`) is the reader being
        // done, not a failure.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            match error.downcast_ref::<sentinel::config::ConfigError>() {
                Some(config_error) => cli::print_config_error(config_error),
                None => eprintln!("error: {}", one_line(&error)),
            }
            ExitCode::FAILURE
        }
    }
}

fn run_daemon(config: PathBuf) -> anyhow::Result<()> {
    // Logging and the runtime are set up before the daemon reads the file
    // for good; a file that does not load is reported by the daemon.
    let early = sentinel::config::Config::load(&config).ok();
    let json = early
        .as_ref()
        .is_some_and(|c| c.observability.access_log.format == sentinel::config::LogFormat::Json);
    let filter = EnvFilter::try_from_env("SENTINEL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().flatten_event(true).init();
    } else {
        logs.init();
    }
    let threads = early
        .as_ref()
        .map(|c| c.system.worker_threads)
        .filter(|n| *n > 0);
    let mut runtime = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if let Some(threads) = threads.filter(|n| *n > 1) {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.enable_all().thread_name("sentinel").build()?;
    runtime.block_on(sentinel::daemon::run(&config))
}

/// The error and its causes on one line, leaving out causes whose text the
/// message already carries (many of our messages name their cause).
fn one_line(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
