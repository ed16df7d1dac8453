//! The workspace's binary, `identity-binding-proxy-dev`: the production subcommands (`serve`,
//! `issuer`, `probe`, `doctor`) plus `dev` and `emulate`. It parses, runs and exits as the
//! production binary does ([`identity_binding_proxy::cli::process`]): every failure, `dev`'s
//! refusals included, is a [`StartError`] and its exit code.

use std::process::ExitCode;

use identity_binding_proxy::cli::process;
use identity_binding_proxy::cli::LogFormat;
use identity_binding_proxy::startup::StartError;
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
            dev::run(args).await.map(|()| 0)
        }
        Command::Emulate(cmd) => {
            process::init_logs(LogFormat::Text);
            match cmd {
                EmulateCommand::Kube(a) => dev::emulate_kube(a).await,
                EmulateCommand::Entra(a) => dev::emulate_entra(a).await,
                EmulateCommand::Static(a) => dev::emulate_static(a).await,
            }
            .map(|()| 0)
            .map_err(dev::failure)
        }
    }
}
