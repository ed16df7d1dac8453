//! The command line: every subcommand and flag, as clap types. Every flag also reads
//! `IBP_<FLAG_IN_UPPER_SNAKE>`. `serve`'s flags are validated into a
//! [`ProxyConfig`](crate::config::ProxyConfig) before anything starts.

pub mod fleet;
pub mod issuer;
pub mod process;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::authn::AuthnMode;
use crate::authn::DEFAULT_TOKEN_AUDIENCE;
use crate::exchange::authority::{SniProfile, PUBLIC_CLOUD};
use crate::exchange::cache::CacheArgs;
use crate::serve::sidecar::SidecarArgs;
use crate::serve::tls::TlsArgs;

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
    /// Run the proxy (production).
    #[command(after_help = EXIT_CODES)]
    Serve(Box<ServeArgs>),
    /// Issuer keys, published issuer documents, and FIC commands.
    #[command(subcommand)]
    Issuer(IssuerCommand),
    /// GET a loopback admin URL (e.g. http://127.0.0.1:9090/readyz); exit 0 on a 2xx. The
    /// sidecar's exec probes: kubelet's HTTP probes cannot reach a loopback listener.
    Probe(ProbeArgs),
    /// Check a live installation end to end and print each check with the fix for each
    /// failure. Exit 0: nothing failed; 3: at least one check failed (✘); 64: bad arguments;
    /// 69: the apiserver could not be reached.
    Doctor(Box<DoctorArgs>),
}

/// `doctor`'s flags: where the installation is, and what Entra holds (optional).
#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Kubeconfig file; without it the in-cluster configuration is used.
    #[arg(long, env = "IBP_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The proxy's namespace.
    #[arg(long, env = "IBP_NAMESPACE", default_value = "identity-binding-proxy")]
    pub namespace: String,
    /// The Helm release of the proxy's chart; its objects are named after it (the release
    /// name, or `<release>-identity-binding-proxy` when it does not contain the chart's name).
    #[arg(long, env = "IBP_RELEASE", default_value = "identity-binding-proxy")]
    pub release: String,
    /// The namespace of the workload identity webhook.
    #[arg(
        long,
        env = "IBP_WEBHOOK_NAMESPACE",
        default_value = "azure-workload-identity-system"
    )]
    pub webhook_namespace: String,
    /// The webhook's Deployment (its chart's name).
    #[arg(
        long,
        env = "IBP_WEBHOOK_DEPLOYMENT",
        default_value = "azure-wi-webhook-controller-manager"
    )]
    pub webhook_deployment: String,
    /// The annotation suffix pods opt in with (`azure.workload.identity/use-<suffix>: "true"`).
    #[arg(
        long,
        env = "IBP_ANNOTATION_SUFFIX",
        default_value = "identity-binding"
    )]
    pub annotation_suffix: String,
    /// Check only the opted-in pods of these namespaces (repeatable; default: every namespace).
    #[arg(
        long = "workload-namespace",
        env = "IBP_WORKLOAD_NAMESPACE",
        value_delimiter = ','
    )]
    pub workload_namespaces: Vec<String>,
    /// CLIENT_ID=FILE: the JSON of `az identity federated-credential list` for that identity
    /// (FILE `-`: standard input), compared with the FIC the proxy needs. Repeatable.
    #[arg(
        long = "federated-credentials",
        env = "IBP_FEDERATED_CREDENTIALS",
        value_delimiter = ';'
    )]
    pub federated_credentials: Vec<String>,
    /// The fleet file of `issuer publish --fleet`: check that each identity's published JWKS
    /// holds only the keys of the clusters that bind it.
    #[arg(long, env = "IBP_FLEET")]
    pub fleet: Option<PathBuf>,
    /// How the report is printed.
    #[arg(long, env = "IBP_OUTPUT", value_enum, default_value = "text")]
    pub output: DoctorOutput,
    /// Trust this CA (PEM) for the issuer host instead of the public roots: for a mirror
    /// behind a private CA. Entra itself trusts only public CAs.
    #[arg(long, env = "IBP_ISSUER_CA_FILE")]
    pub issuer_ca_file: Option<PathBuf>,
    /// Timeout of each HTTPS request to the issuer host.
    #[arg(long, env = "IBP_HTTP_TIMEOUT_SECS", default_value_t = 10)]
    pub http_timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DoctorOutput {
    Text,
    Json,
}

/// What `serve`'s exit code says (see [`crate::startup`]).
pub const EXIT_CODES: &str = "Exit codes (a failure prints one line, `error: ...`):
  0   stopped on SIGTERM or SIGINT
  64  misconfiguration: a flag, or a file that does not exist or does not parse
  69  a dependency unavailable: the apiserver at a sidecar's start, a port another process holds
  70  an internal failure: the async runtime cannot start, a bug";

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// The URL: http:// on a loopback address.
    pub url: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// `serve`'s flags, grouped by the component each configures (one struct per component,
/// so each is handed its own; `--help` shows the groups).
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub identities: IdentityArgs,
    #[command(flatten)]
    pub entra: EntraArgs,
    #[command(flatten)]
    pub authn: AuthnArgs,
    #[command(flatten)]
    pub authz: AuthzArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub key_activation: KeyActivationArgs,
    #[command(flatten)]
    pub fic_propagation: FicPropagationArgs,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "FIC propagation")]
pub struct FicPropagationArgs {
    /// Entra applies a new FIC after a delay and meanwhile answers AADSTS70021: for an identity
    /// without a token from this proxy yet, first asked for under 10 minutes ago, retry that
    /// answer this many times before passing it on (with a hint that the FIC may still be
    /// propagating).
    #[arg(long, env = "IBP_FIC_PROPAGATION_RETRIES", default_value_t = 3)]
    pub fic_propagation_retries: u32,
    /// First wait before such a retry; doubled per retry (1 s: 1 + 2 + 4 s in all by default).
    #[arg(long, env = "IBP_FIC_PROPAGATION_BACKOFF_MS", default_value_t = 1000)]
    pub fic_propagation_backoff_ms: u64,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Issuer key activation")]
pub struct KeyActivationArgs {
    /// A newly loaded issuer key signs only after it has been in the published JWKS of every
    /// bound identity for this long (Entra caches issuer keys for minutes and refuses a key it
    /// does not know yet); until then the previous key signs. 0: the last --issuer-key signs
    /// at once.
    #[arg(
        long,
        env = "IBP_ISSUER_KEY_ACTIVATION_DELAY_SECS",
        default_value_t = 900
    )]
    pub issuer_key_activation_delay_secs: u64,
    /// How often the published issuer documents are read for key activation.
    #[arg(long, env = "IBP_ISSUER_KEY_CHECK_SECS", default_value_t = 30)]
    pub issuer_key_check_secs: u64,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Cluster")]
pub struct ClusterArgs {
    /// Kubeconfig file; without it the in-cluster configuration is used.
    #[arg(long, env = "IBP_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Writable directory for state that should survive a restart (the cluster JWKS, so
    /// tokens verify even if the apiserver is down when the proxy restarts).
    #[arg(long, env = "IBP_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// How long the apiserver keeps each RBAC watch open (its `timeoutSeconds`); then the
    /// next one starts where it ended, without a list. 1 to 3600.
    #[arg(long, env = "IBP_WATCH_TIMEOUT_SECS", default_value_t = 290,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub watch_timeout_secs: u64,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Identities and issuer")]
pub struct IdentityArgs {
    /// PEM private key signing our assertions. Repeatable; the last one given signs.
    #[arg(long, env = "IBP_ISSUER_KEY", value_delimiter = ',', required = true)]
    pub issuer_key: Vec<PathBuf>,
    /// Issuer URL, or a template with {tenant} and {client_id}.
    #[arg(long, env = "IBP_ISSUER_URL")]
    pub issuer_url: String,
    /// Bindings file (YAML): the identities this cluster may serve. Hot reloaded.
    #[arg(long, env = "IBP_BINDINGS")]
    pub bindings: PathBuf,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Entra")]
pub struct EntraArgs {
    /// Entra authority host.
    #[arg(long, env = "IBP_AUTHORITY_HOST", default_value = PUBLIC_CLOUD)]
    pub authority_host: String,
    /// Per-SNI profile: NAME=cloud=public|usgov|china or NAME=authority=URL, optionally
    /// followed by ,tenant=ID (the tenant assumed when the request path names none; identities
    /// of other tenants are refused on that name). Repeatable (';' in the environment).
    #[arg(long = "sni-profile", env = "IBP_SNI_PROFILE", value_delimiter = ';')]
    pub sni_profiles: Vec<SniProfile>,
    /// Timeout of one call to Entra.
    #[arg(long, env = "IBP_ENTRA_TIMEOUT_SECS", default_value_t = 10)]
    pub entra_timeout_secs: u64,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Authentication")]
pub struct AuthnArgs {
    /// Audience required on service-account tokens.
    #[arg(long, env = "IBP_TOKEN_AUDIENCE", default_value = DEFAULT_TOKEN_AUDIENCE)]
    pub token_audience: String,
    /// How service-account tokens are authenticated.
    #[arg(long, env = "IBP_AUTHN_MODE", value_enum, default_value = "both")]
    pub authn_mode: AuthnMode,
    /// Longest time a TokenReview answer is reused (never beyond the token's expiry).
    #[arg(long, env = "IBP_TOKENREVIEW_TTL_SECS", default_value_t = 120)]
    pub tokenreview_ttl_secs: u64,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Authorization")]
pub struct AuthzArgs {
    /// How long an allowing SubjectAccessReview is reused.
    #[arg(long, env = "IBP_AUTHZ_ALLOWED_TTL_SECS", default_value_t = 300)]
    pub authz_allowed_ttl_secs: u64,
    /// How long a denying SubjectAccessReview is reused.
    #[arg(long, env = "IBP_AUTHZ_DENIED_TTL_SECS", default_value_t = 30)]
    pub authz_denied_ttl_secs: u64,
    /// Honour grants that cover every identity (a `*` rule such as cluster-admin's). Off: a
    /// caller holding one is refused with 403 naming the rule.
    #[arg(long, env = "IBP_ALLOW_WILDCARD_GRANTS")]
    pub allow_wildcard_grants: bool,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Token port")]
pub struct ServerArgs {
    #[arg(long, env = "IBP_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Largest accepted request body: the largest service-account token accepted (16 KiB)
    /// plus room for the rest of the form.
    #[arg(long, env = "IBP_MAX_BODY_BYTES", default_value_t = 20 * 1024)]
    pub max_body_bytes: usize,
    /// Deadline for a connection's first request head, from its handshake (slow clients are
    /// cut off); a later head on a keep-alive connection has the idle timeout.
    #[arg(long, env = "IBP_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Deadline for a request's whole body, from its head.
    #[arg(long, env = "IBP_BODY_TIMEOUT_SECS", default_value_t = 10)]
    pub body_timeout_secs: u64,
    /// Deadline for a whole request.
    #[arg(long, env = "IBP_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub request_timeout_secs: u64,
    /// A connection without a request in flight for this long is closed (HTTP/1.1 and h2).
    /// Longer than clients keep an idle pooled connection — Go's transport and the Go SDK
    /// (azcore) 90 s, reqwest (the Rust SDK) 90 s, .NET 60 s (120 s before .NET 6) — so the
    /// client drops it first and never sends a request into the proxy's close; and not a
    /// multiple of a minute, the period clients poll at (the how-to's sample: 60 s).
    #[arg(long, env = "IBP_IDLE_TIMEOUT_SECS", default_value_t = 150)]
    pub idle_timeout_secs: u64,
    /// Most concurrent h2 streams per connection.
    #[arg(long, env = "IBP_H2_MAX_STREAMS", default_value_t = 128)]
    pub h2_max_streams: u32,
    /// How long in-flight requests may take to finish at shutdown.
    #[arg(long, env = "IBP_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,
    /// Most client connections open at once.
    #[arg(long, env = "IBP_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Most connections one peer address (one pod) may hold open.
    #[arg(long, env = "IBP_MAX_CONNECTIONS_PER_PEER", default_value_t = 128)]
    pub max_connections_per_peer: usize,
    /// Most requests in flight at once, process-wide.
    #[arg(long, env = "IBP_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,
    /// Most requests in flight at once from one peer address.
    #[arg(long, env = "IBP_MAX_IN_FLIGHT_PER_PEER", default_value_t = 1024)]
    pub max_in_flight_per_peer: usize,
    /// Most request-body bytes buffered at once, process-wide.
    #[arg(long, env = "IBP_MAX_BUFFERED_BYTES", default_value_t = 16 << 20)]
    pub max_buffered_bytes: usize,
    /// Most request-body bytes buffered at once for one peer address.
    #[arg(long, env = "IBP_MAX_BUFFERED_BYTES_PER_PEER", default_value_t = 2 << 20)]
    pub max_buffered_bytes_per_peer: usize,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Admin server")]
pub struct AdminArgs {
    /// Admin server: /livez, /readyz, /metrics (plain HTTP).
    #[arg(long, env = "IBP_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// Most connections to the admin server at once (and a quarter of that per peer). More
    /// than the addresses of the pods a node can run (AKS allows 250 pods, twice that with
    /// dual-stack addresses): fair shares let a new peer in while fewer peers than the cap hold
    /// connections, so a probe or a scrape is never locked out.
    #[arg(long, env = "IBP_ADMIN_MAX_CONNECTIONS", default_value_t = 512)]
    pub admin_max_connections: usize,
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Process")]
pub struct ProcessArgs {
    /// After SIGTERM, how long to keep serving while not ready, so Service endpoints drop this
    /// pod before it stops accepting (SIGINT skips the delay).
    #[arg(long, env = "IBP_SHUTDOWN_DELAY_SECS", default_value_t = 5)]
    pub shutdown_delay_secs: u64,
    #[arg(long, env = "IBP_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Tokio worker threads (default: one per CPU). With 1, every task runs on the main
    /// thread (tokio's current-thread scheduler): the cheapest setting for a proxy limited to
    /// one CPU, and how the load benchmarks compare it with a single-worker nginx.
    #[arg(long, env = "IBP_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum IssuerCommand {
    /// Generate an RSA key pair for this cluster's issuer key.
    Keygen(KeygenArgs),
    /// Write the OIDC discovery document and JWKS for every bound identity.
    Publish(PublishArgs),
    /// Print the `az identity federated-credential create` command for each binding.
    Fic(FicArgs),
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Private key file to write (0600). The public key goes next to it as <out>.pub.
    #[arg(long, env = "IBP_OUT")]
    pub out: PathBuf,
    #[arg(long, env = "IBP_BITS", default_value_t = 2048)]
    pub bits: usize,
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    #[arg(long, env = "IBP_OUT")]
    pub out: PathBuf,
    /// Fleet file (YAML): each cluster's name, public key file(s) and bindings file. Each
    /// identity's JWKS then holds only the keys of the clusters that bind it.
    #[arg(long, env = "IBP_FLEET", conflicts_with_all = ["public_keys", "bindings"])]
    pub fleet: Option<PathBuf>,
    /// Public key PEM of a cluster (repeatable: one per cluster). Published for EVERY
    /// identity: prefer --fleet.
    #[arg(
        long = "public-key",
        env = "IBP_PUBLIC_KEY",
        value_delimiter = ',',
        required_unless_present = "fleet"
    )]
    pub public_keys: Vec<PathBuf>,
    #[arg(long, env = "IBP_BINDINGS", required_unless_present = "fleet")]
    pub bindings: Option<PathBuf>,
    #[arg(long, env = "IBP_ISSUER_URL")]
    pub issuer_url: String,
}

#[derive(Args, Debug)]
pub struct FicArgs {
    #[arg(long, env = "IBP_BINDINGS")]
    pub bindings: PathBuf,
    #[arg(long, env = "IBP_ISSUER_URL")]
    pub issuer_url: String,
}
