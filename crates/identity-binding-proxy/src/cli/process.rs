//! How a binary of the proxy runs: parse the command line, build the async runtime, run the
//! subcommand, flush the log, and exit with a code that says how it ended. Configuration
//! errors exit with 64 (EX_USAGE) and one line saying what is wrong.
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

const EX_USAGE: u8 = 64;
/// How long the exit waits for the log's last lines: a reader that stopped reading cannot
/// hold it longer.
const LOG_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs a binary whose command line is `C`: `workers` reads the worker threads it asks for,
/// `run` runs the parsed command on the runtime.
pub fn main<C, F, Fut>(workers: fn(&C) -> Option<usize>, run: F) -> ExitCode
where
    C: Parser,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
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
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = match runtime(workers(&cli)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Every line of the run (the drain's included) is out before the process is.
    crate::serve::logpipe::flush(LOG_FLUSH_LIMIT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(EX_USAGE)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Err(Failure::Exit(code)) => ExitCode::from(code),
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

/// How a command failed.
pub enum Failure {
    /// Bad configuration: exit 64.
    Usage(String),
    /// Anything else: exit 1.
    Runtime(anyhow::Error),
    /// The command has said what went wrong itself: exit with its status.
    Exit(u8),
}

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure::Usage(e.to_string())
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
pub async fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Serve(args) => {
            init_logs(args.process.log_format);
            let config = ProxyConfig::from_args(&args).map_err(usage)?;
            // Everything `start` refuses is configuration: files, keys, addresses.
            let running = server::start(config)
                .await
                .map_err(|e| usage(format!("{e:#}")))?;
            running.serve_until_signal().await;
            Ok(())
        }
        Command::Issuer(cmd) => issuer::run(cmd).map_err(Failure::Usage),
        Command::Probe(a) => crate::serve::sidecar::probe(&a.url)
            .await
            .map_err(|e| Failure::Runtime(anyhow::anyhow!(e))),
        // The report is the command's output; its exit status says whether a check failed.
        Command::Doctor(args) => {
            crate::crypto::install_provider();
            match crate::doctor::run(&args).await {
                0 => Ok(()),
                code => Err(Failure::Exit(code)),
            }
        }
    }
}
