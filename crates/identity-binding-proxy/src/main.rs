//! identity-binding-proxy: the production binary (`serve`, `issuer`, `probe`, `doctor`). How it
//! parses, runs and exits is in [`identity_binding_proxy::cli::process`].

use std::process::ExitCode;

use identity_binding_proxy::cli::process;
use identity_binding_proxy::cli::Cli;

/// jemalloc instead of glibc's malloc: its background thread hands freed pages back to the
/// kernel (after its decay time), so memory that a burst of connections took — the node's
/// pods are untrusted and may open many — returns when they close, where glibc's per-thread
/// arenas keep it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    process::main(
        |cli: &Cli| process::workers(&cli.command),
        |cli: Cli| process::dispatch(cli.command),
    )
}
