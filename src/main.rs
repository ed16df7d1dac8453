//! The workspace's binary: the production subcommands (`serve`, `issuer`, `probe`) plus `dev`
//! and `emulate`. It parses, runs and exits as the production binary does
//! ([`identity_binding_proxy::cli::process`]).

use std::process::ExitCode;

use identity_binding_proxy::cli::process;
use identity_binding_proxy::cli::LogFormat;
use identity_binding_proxy::startup::{Kind, StartError};
use identity_binding_proxy_dev::cli::{Cli, Command, EmulateCommand};
use identity_binding_proxy_dev::dev;

/// The same allocator as the production binary's (see its main.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    process::main(workers, |cli: Cli| dispatch(cli.command))
}

fn workers(cli: &Cli) -> Option<usize> {
    match &cli.command {
        Command::Product(command) => process::workers(command),
        _ => None,
    }
}

async fn dispatch(command: Command) -> Result<u8, StartError> {
    match command {
        Command::Product(command) => process::dispatch(command).await,
        Command::Dev(args) => {
            process::init_logs(args.log_format);
            dev::run(args).await.map(|()| 0).map_err(dev_failure)
        }
        Command::Emulate(cmd) => {
            process::init_logs(LogFormat::Text);
            match cmd {
                EmulateCommand::Kube(a) => dev::emulate_kube(a).await,
                EmulateCommand::Entra(a) => dev::emulate_entra(a).await,
                EmulateCommand::Static(a) => dev::emulate_static(a).await,
            }
            .map(|()| 0)
            .map_err(dev_failure)
        }
    }
}

/// A failure of `dev` or `emulate`: a start-up step of the proxy keeps its kind (and exit
/// code); anything else went wrong in the emulators or dev's own state, which are ours (70).
fn dev_failure(e: anyhow::Error) -> StartError {
    let kind = e
        .downcast_ref::<StartError>()
        .map_or(Kind::Internal, StartError::kind);
    StartError::new(kind, format!("{e:#}"))
}
