//! Defaults of the command line, read from its clap definition, so a test that depends on a
//! default follows it when it changes instead of restating it. Every test reaches the CLI's
//! types through this file alone.
#![allow(dead_code)]

use clap::CommandFactory;
use identity_binding_proxy_dev::cli::Cli;

/// The default of `serve --FLAG` (FLAG without its dashes), as the CLI would parse it.
pub fn serve_default(flag: &str) -> String {
    cli_default("serve", flag)
}

/// The default of `dev --FLAG` (FLAG without its dashes), as the CLI would parse it.
pub fn dev_default(flag: &str) -> String {
    cli_default("dev", flag)
}

fn cli_default(subcommand: &str, flag: &str) -> String {
    let cli = Cli::command();
    let sub = cli
        .find_subcommand(subcommand)
        .unwrap_or_else(|| panic!("the CLI has no `{subcommand}` subcommand"));
    let arg = sub
        .get_arguments()
        .find(|a| a.get_long() == Some(flag))
        .unwrap_or_else(|| panic!("`{subcommand}` has no flag --{flag}"));
    match arg.get_default_values() {
        [one] => one
            .to_str()
            .unwrap_or_else(|| panic!("the default of `{subcommand} --{flag}` is not UTF-8"))
            .to_string(),
        [] => panic!("`{subcommand} --{flag}` has no default"),
        many => panic!(
            "`{subcommand} --{flag}` has {} defaults, not one",
            many.len()
        ),
    }
}
