//! identity-binding-proxy: dispatches subcommands. Configuration errors exit with 64
//! (EX_USAGE) and one line saying what is wrong.

use std::process::ExitCode;

use clap::Parser;
use identity_binding_proxy::cli::{Cli, Command, LogFormat};
use identity_binding_proxy::config::ProxyConfig;
use identity_binding_proxy::{issuer, server};

const EX_USAGE: u8 = 64;
/// How long the exit waits for the log's last lines: a reader that stopped reading cannot
/// hold it longer.
const LOG_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// jemalloc instead of glibc's malloc: its background thread hands freed pages back to the
/// kernel (after its decay time), so memory that a burst of connections took — the node's
/// pods are untrusted and may open many — returns when they close, where glibc's per-thread
/// arenas keep it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    flush_logs_on_panic();
    let cli = match Cli::try_parse() {
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
    let workers = match &cli.command {
        Command::Serve(args) => args.process.worker_threads.filter(|n| *n > 0),
        _ => None,
    };
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
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Doctor(args) = &cli.command {
        identity_binding_proxy::http::install_crypto_provider();
        return ExitCode::from(runtime.block_on(identity_binding_proxy::doctor::run(args)));
    }
    let result = runtime.block_on(dispatch(cli.command));
    // Every line of the run (the drain's included) is out before the process is.
    identity_binding_proxy::logpipe::flush(LOG_FLUSH_LIMIT);
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
    }
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
            identity_binding_proxy::logpipe::flush(PANIC_FLUSH_LIMIT);
        }
        report(info);
    }));
}

enum Failure {
    /// Bad configuration: exit 64.
    Usage(String),
    #[cfg_attr(not(feature = "emulators"), allow(dead_code))]
    Runtime(anyhow::Error),
}

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure::Usage(e.to_string())
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours for a person at a terminal only: a log redirected to a file or a pipe stays
    // plain text (and NO_COLOR, https://no-color.org, turns them off everywhere).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(identity_binding_proxy::logpipe::install(std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder
            .event_format(identity_binding_proxy::logline::JsonLine)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn dispatch(command: Command) -> Result<(), Failure> {
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
        #[cfg(feature = "emulators")]
        Command::Dev(args) => {
            init_logs(args.log_format);
            identity_binding_proxy::dev::run(args)
                .await
                .map_err(Failure::Runtime)
        }
        #[cfg(feature = "emulators")]
        Command::Emulate(cmd) => {
            init_logs(LogFormat::Text);
            match cmd {
                identity_binding_proxy::cli::EmulateCommand::Kube(a) => {
                    identity_binding_proxy::dev::emulate_kube(a).await
                }
                identity_binding_proxy::cli::EmulateCommand::Entra(a) => {
                    identity_binding_proxy::dev::emulate_entra(a).await
                }
                identity_binding_proxy::cli::EmulateCommand::Static(a) => {
                    identity_binding_proxy::dev::emulate_static(a).await
                }
            }
            .map_err(Failure::Runtime)
        }
        Command::Issuer(cmd) => issuer::run(cmd).map_err(Failure::Usage),
        // Run before dispatch: its exit status is its report's.
        Command::Doctor(_) => Ok(()),
        Command::Probe(a) => identity_binding_proxy::sidecar::probe(&a.url)
            .await
            .map_err(|e| Failure::Runtime(anyhow::anyhow!(e))),
    }
}
