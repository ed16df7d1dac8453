//! The command line of the workspace's binary: every production subcommand (`serve`, `issuer`,
//! `probe`, `doctor`, flattened from the production crate's [`Command`](ProductCommand)) plus
//! `dev` and `emulate`. Every flag also reads `IBP_<FLAG_IN_UPPER_SNAKE>`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use identity_binding_proxy::authn::DEFAULT_TOKEN_AUDIENCE;
use identity_binding_proxy::cli::{Command as ProductCommand, LogFormat};

#[derive(Parser, Debug)]
#[command(
    name = "identity-binding-proxy",
    version,
    about = "Per-node token proxy for Microsoft Entra workload identity (identity binding)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    #[command(flatten)]
    Product(ProductCommand),
    /// Run the whole system on loopback: kube and Entra emulators, issuer host, and the proxy.
    /// Unlike Entra (and `emulate entra`), dev's Entra emulator applies FIC and issuer key
    /// changes at once instead of after minutes.
    Dev(DevArgs),
    /// Run one emulator alone.
    #[command(subcommand)]
    Emulate(EmulateCommand),
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    #[command(subcommand)]
    pub command: Option<DevCommand>,
    /// Where dev keeps its keys, certificates, tokens and dev.json.
    #[arg(long, env = "IBP_STATE_DIR", default_value = "./.ibp-dev")]
    pub state_dir: PathBuf,
    #[arg(long, env = "IBP_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    #[arg(long, env = "IBP_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,
    /// RBAC YAML (ClusterRoles, ClusterRoleBindings, Roles, RoleBindings), watched. Default:
    /// the demo RBAC written to <state-dir>/rbac.yaml.
    #[arg(long, env = "IBP_RBAC")]
    pub rbac: Option<PathBuf>,
    /// Delay added to every emulated Entra token call.
    #[arg(long, env = "IBP_ENTRA_LATENCY_MS", default_value_t = 0)]
    pub entra_latency_ms: u64,
    /// Lifetime of tokens the Entra emulator issues.
    #[arg(long, env = "IBP_ENTRA_TOKEN_LIFETIME_SECS", default_value_t = 3599)]
    pub entra_token_lifetime_secs: u64,
    /// Cached tokens with less than this left are not served.
    #[arg(long, env = "IBP_CACHE_MIN_REMAINING_SECS", default_value_t = 300)]
    pub cache_min_remaining_secs: u64,
    /// How long a denying SubjectAccessReview is reused (RBAC edits also drop it at once).
    #[arg(long, env = "IBP_AUTHZ_DENIED_TTL_SECS", default_value_t = 30)]
    pub authz_denied_ttl_secs: u64,
    /// How long an allowing SubjectAccessReview is reused (RBAC edits also drop it at once).
    #[arg(long, env = "IBP_AUTHZ_ALLOWED_TTL_SECS", default_value_t = 300)]
    pub authz_allowed_ttl_secs: u64,
    /// Longest time a TokenReview answer is reused.
    #[arg(long, env = "IBP_TOKENREVIEW_TTL_SECS", default_value_t = 120)]
    pub tokenreview_ttl_secs: u64,
    /// Most tokens kept in the cache.
    #[arg(long, env = "IBP_CACHE_CAPACITY", default_value_t = 10_000)]
    pub cache_capacity: u64,
    #[arg(long, env = "IBP_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Further `serve` flags for the dev proxy, after `--` (e.g. `-- --authn-mode local`);
    /// they override dev's own choices.
    #[arg(last = true)]
    pub proxy_flags: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum DevCommand {
    /// Print a service-account token signed by the dev kube emulator's key.
    Token(DevTokenArgs),
    /// Rotate a running dev's CA one step at a time, in the order that fails no client:
    /// bundle (publish [old, new]), restart what read the CA before, leaf (serve the new CA's
    /// certificate), drop-old. Without --step: where the rotation stands.
    RotateCa(DevRotateCaArgs),
}

#[derive(Args, Debug)]
pub struct DevRotateCaArgs {
    #[arg(long, env = "IBP_STATE_DIR", default_value = "./.ibp-dev")]
    pub state_dir: PathBuf,
    /// The step to take; each is refused unless the one before it is done.
    #[arg(long, value_enum, default_value = "status")]
    pub step: RotateStep,
}

/// The steps of a CA rotation, in their order.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotateStep {
    /// Say where the rotation stands and what comes next; changes nothing.
    Status,
    /// Make a new CA and publish the bundle [old, new]: every client that reads the CA file
    /// from now on trusts both.
    Bundle,
    /// Serve a certificate of the new CA and publish [new, old] (refused while a process that
    /// read the CA file before the bundle still runs).
    Leaf,
    /// Publish [new] only (refused until the new CA's certificate is served).
    DropOld,
}

#[derive(Args, Debug)]
pub struct DevTokenArgs {
    #[arg(long, env = "IBP_STATE_DIR", default_value = "./.ibp-dev")]
    pub state_dir: PathBuf,
    #[arg(long, env = "IBP_NAMESPACE")]
    pub namespace: String,
    #[arg(long, env = "IBP_SERVICE_ACCOUNT")]
    pub service_account: String,
    #[arg(long, env = "IBP_AUDIENCE", default_value = DEFAULT_TOKEN_AUDIENCE)]
    pub audience: String,
    /// Lifetime in seconds; negative gives an already expired token.
    #[arg(
        long,
        env = "IBP_EXPIRES_IN",
        default_value_t = 3600,
        allow_negative_numbers = true
    )]
    pub expires_in: i64,
}

#[derive(Subcommand, Debug)]
pub enum EmulateCommand {
    /// The kube-apiserver emulator: TokenReview, SubjectAccessReview, JWKS, RBAC list/watch.
    Kube(EmulateKubeArgs),
    /// The Entra emulator: client credentials with federated assertions.
    Entra(EmulateEntraArgs),
    /// A static file host (plain HTTP, loopback): serves `issuer publish` output to the Entra
    /// emulator, standing in for the HTTPS host a real issuer uses.
    Static(EmulateStaticArgs),
}

#[derive(Args, Debug)]
pub struct EmulateStaticArgs {
    #[arg(long, env = "IBP_LISTEN", default_value = "127.0.0.1:8480")]
    pub listen: SocketAddr,
    /// The directory to serve (e.g. the `issuer publish --out` directory).
    #[arg(long, env = "IBP_DIR")]
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct EmulateKubeArgs {
    #[arg(long, env = "IBP_LISTEN", default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,
    #[arg(long, env = "IBP_STATE_DIR")]
    pub state_dir: PathBuf,
    #[arg(long, env = "IBP_RBAC")]
    pub rbac: Option<PathBuf>,
    /// Service-account issuer URL (default: generated once and kept in the state dir).
    #[arg(long, env = "IBP_ISSUER")]
    pub issuer: Option<String>,
}

#[derive(Args, Debug)]
pub struct EmulateEntraArgs {
    #[arg(long, env = "IBP_LISTEN", default_value = "127.0.0.1:8444")]
    pub listen: SocketAddr,
    /// client_id=..,issuer=..,subject=..,audience=.. (repeatable; ';' between entries in the
    /// environment).
    #[arg(long, env = "IBP_FIC", value_delimiter = ';')]
    pub fic: Vec<String>,
    #[arg(long, env = "IBP_TOKEN_LIFETIME_SECS", default_value_t = 3599)]
    pub token_lifetime_secs: u64,
    #[arg(long, env = "IBP_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Reuse an assertion issuer's discovery document and JWKS for this long, as Entra does:
    /// meanwhile a newly published key is refused (AADSTS7000272) and a removed one still
    /// verifies. 0: fetch them for every exchange, so key changes act at once.
    #[arg(long, env = "IBP_ISSUER_METADATA_TTL_SECS", default_value_t = 300)]
    pub issuer_metadata_ttl_secs: u64,
    /// A FIC added or removed at run time takes this long to apply, as in Entra (AADSTS70021
    /// meanwhile for a new one; a removed one keeps matching). 0: at once.
    #[arg(long, env = "IBP_FIC_PROPAGATION_SECS", default_value_t = 60)]
    pub fic_propagation_secs: u64,
}
