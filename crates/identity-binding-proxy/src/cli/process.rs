//! How a binary of the proxy runs: parse the command line, build the async runtime, run the
//! subcommand, flush the log, and exit with a code that says how it ended: a failure prints
//! one line, `error: ...`, and exits with its [`StartError::exit_code`] — 64 (EX_USAGE) for a
//! misconfiguration, 69 (EX_UNAVAILABLE) for a dependency that cannot be reached, 70
//! (EX_SOFTWARE) for our own failure (see [`crate::startup`]).
//!
//! The production binary runs [`Command`]; a binary that offers more subcommands (the
//! workspace's `dev` binary) flattens [`Command`] into its own and hands its variants to
//! [`dispatch`].

use std::future::Future;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::issuer;
use crate::cli::{Command, LogFormat};
use crate::config::ProxyConfig;
use crate::serve as server;
use crate::startup::{Kind, StartError};
/// How long the exit waits for the log's last lines: a reader that stopped reading cannot
/// hold it longer.
const LOG_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs a binary whose command line is `C`: `workers` reads the worker threads it asks for,
/// `run` runs the parsed command on the runtime and gives the status it ended with (0, or a
/// command's own, such as doctor's "a check failed"), or why it could not run.
pub fn main<C, F, Fut>(workers: fn(&C) -> Option<usize>, run: F) -> ExitCode
where
    C: Parser,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<u8, StartError>>,
{
    flush_logs_on_panic();
    let cli = match C::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("{first} (see --help)");
            return ExitCode::from(Kind::Usage.exit_code());
        }
    };
    let runtime = match runtime(workers(&cli)) {
        Ok(rt) => rt,
        Err(e) => {
            let e = StartError::internal("cannot start the async runtime").because(e);
            eprintln!("error: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let result = runtime.block_on(run(cli));
    // Every line of the run (the drain's included) is out before the process is.
    crate::serve::logpipe::flush(LOG_FLUSH_LIMIT);
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The worker threads `serve` asks for (0 or none: tokio's default).
pub fn workers(command: &Command) -> Option<usize> {
    match command {
        Command::Serve(args) => args.process.worker_threads.filter(|n| *n > 0),
        _ => None,
    }
}

fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    // One worker asked for: the current-thread scheduler, which has no work-stealing
    // machinery to pay for on every wake-up (the same threads do the same work otherwise).
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

/// How long a panic of the main thread waits for the log: the lines before it tell what led
/// there, and a reader that stopped reading cannot hold the exit for longer.
const PANIC_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_millis(200);

/// A panic of the main thread ends the process without main's flush: the hook flushes first,
/// then reports the panic as the default hook does.
fn flush_logs_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some("main") {
            crate::serve::logpipe::flush(PANIC_FLUSH_LIMIT);
        }
        report(info);
    }));
}

/// Sends the log to stderr, as JSON lines or as text.
pub fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours for a person at a terminal only: a log redirected to a file or a pipe stays
    // plain text (and NO_COLOR, https://no-color.org, turns them off everywhere).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(crate::serve::logpipe::install(std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder
            .event_format(crate::serve::logline::JsonLine)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs one of the production subcommands.
pub async fn dispatch(command: Command) -> Result<u8, StartError> {
    match command {
        Command::Serve(args) => {
            init_logs(args.process.log_format);
            let config = ProxyConfig::from_args(&args)?;
            let running = server::start(config).await?;
            running.serve_until_signal().await;
            Ok(0)
        }
        Command::Issuer(cmd) => issuer::run(cmd).map(|()| 0),
        Command::Probe(a) => crate::serve::sidecar::probe(&a.url).await.map(|()| 0),
        // The report is the command's output; its status says whether a check failed.
        Command::Doctor(args) => {
            crate::crypto::install_provider();
            crate::doctor::run(&args).await
        }
    }
}
