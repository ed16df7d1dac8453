//! The command line. Every flag also reads `IBP_<FLAG_IN_UPPER_SNAKE>`. `serve` arguments are
//! validated into a typed [`ProxyConfig`] before anything starts; `dev` builds the same struct.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::authn::AuthnMode;
use crate::issuer::IssuerUrl;
use crate::limits::LimitsConfig;
use crate::tls::TlsEntry;

pub const PUBLIC_CLOUD: &str = "https://login.microsoftonline.com";
pub const DEFAULT_TOKEN_AUDIENCE: &str = "api://AKSIdentityBinding";

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
    Serve(Box<ServeArgs>),
    /// Run the whole system on loopback: kube and Entra emulators, issuer host, and the proxy.
    #[cfg(feature = "emulators")]
    Dev(DevArgs),
    /// Run one emulator alone.
    #[cfg(feature = "emulators")]
    #[command(subcommand)]
    Emulate(EmulateCommand),
    /// Issuer keys, published issuer documents, and FIC commands.
    #[command(subcommand)]
    Issuer(IssuerCommand),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Kubeconfig file; without it the in-cluster configuration is used.
    #[arg(long, env = "IBP_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// NAME=CERT.pem,KEY.pem: the certificate served for SNI name NAME. Repeatable (in the
    /// environment, separate entries with ';').
    #[arg(long, env = "IBP_TLS", value_delimiter = ';', required = true)]
    pub tls: Vec<TlsEntry>,
    /// SNI name used for clients that send no SNI at all (else they are refused).
    #[arg(long, env = "IBP_DEFAULT_SNI")]
    pub default_sni: Option<String>,
    /// PEM private key signing our assertions. Repeatable; the last one given signs.
    #[arg(long, env = "IBP_ISSUER_KEY", value_delimiter = ',', required = true)]
    pub issuer_key: Vec<PathBuf>,
    /// Issuer URL, or a template with {tenant} and {client_id}.
    #[arg(long, env = "IBP_ISSUER_URL")]
    pub issuer_url: String,
    /// Bindings file (YAML): the identities this cluster may serve. Hot reloaded.
    #[arg(long, env = "IBP_BINDINGS")]
    pub bindings: PathBuf,
    /// Entra authority host.
    #[arg(long, env = "IBP_AUTHORITY_HOST", default_value = PUBLIC_CLOUD)]
    pub authority_host: String,
    /// Per-SNI profile: NAME=cloud=public|usgov|china or NAME=authority=URL, optionally
    /// followed by ,tenant=ID (the tenant assumed when the request path names none; identities
    /// of other tenants are refused on that name). Repeatable (';' in the environment).
    #[arg(long = "sni-profile", env = "IBP_SNI_PROFILE", value_delimiter = ';')]
    pub sni_profiles: Vec<SniProfile>,
    /// Audience required on service-account tokens.
    #[arg(long, env = "IBP_TOKEN_AUDIENCE", default_value = DEFAULT_TOKEN_AUDIENCE)]
    pub token_audience: String,
    #[arg(long, env = "IBP_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Admin server: /livez, /readyz, /metrics (plain HTTP).
    #[arg(long, env = "IBP_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// How service-account tokens are authenticated.
    #[arg(long, env = "IBP_AUTHN_MODE", value_enum, default_value = "both")]
    pub authn_mode: AuthnMode,
    /// Longest time a TokenReview answer is reused (never beyond the token's expiry).
    #[arg(long, env = "IBP_TOKENREVIEW_TTL_SECS", default_value_t = 120)]
    pub tokenreview_ttl_secs: u64,
    /// How long an allowing SubjectAccessReview is reused.
    #[arg(long, env = "IBP_AUTHZ_ALLOWED_TTL_SECS", default_value_t = 300)]
    pub authz_allowed_ttl_secs: u64,
    /// How long a denying SubjectAccessReview is reused.
    #[arg(long, env = "IBP_AUTHZ_DENIED_TTL_SECS", default_value_t = 30)]
    pub authz_denied_ttl_secs: u64,
    /// Most tokens kept in the cache.
    #[arg(long, env = "IBP_CACHE_CAPACITY", default_value_t = 10_000)]
    pub cache_capacity: u64,
    /// Cached tokens with less than this left are not served.
    #[arg(long, env = "IBP_CACHE_MIN_REMAINING_SECS", default_value_t = 300)]
    pub cache_min_remaining_secs: u64,
    /// Timeout of one call to Entra.
    #[arg(long, env = "IBP_ENTRA_TIMEOUT_SECS", default_value_t = 10)]
    pub entra_timeout_secs: u64,
    /// Largest accepted request body: the largest service-account token accepted (16 KiB)
    /// plus room for the rest of the form.
    #[arg(long, env = "IBP_MAX_BODY_BYTES", default_value_t = 20 * 1024)]
    pub max_body_bytes: usize,
    /// Deadline for a request's whole body, from its head.
    #[arg(long, env = "IBP_BODY_TIMEOUT_SECS", default_value_t = 10)]
    pub body_timeout_secs: u64,
    /// A connection without a request in flight for this long is closed.
    #[arg(long, env = "IBP_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
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
    /// Token requests per minute that one caller (namespace/service account) may send to
    /// Entra through cache misses; over it, 429 with Retry-After.
    #[arg(long, env = "IBP_CALLER_MISS_BUDGET", default_value_t = 120)]
    pub caller_miss_budget: u32,
    /// Token requests with `claims` per minute that one caller may send; over it, 429.
    #[arg(long, env = "IBP_CALLER_CLAIMS_BUDGET", default_value_t = 30)]
    pub caller_claims_budget: u32,
    /// Most cached tokens (distinct scope sets) one identity may hold; beyond it a token is
    /// served but not cached, so one identity cannot evict the others.
    #[arg(long, env = "IBP_CACHE_MAX_KEYS_PER_IDENTITY", default_value_t = 64)]
    pub cache_max_keys_per_identity: usize,
    /// Honour grants that cover every identity (a `*` rule such as cluster-admin's). Off: a
    /// caller holding one is refused with 403 naming the rule.
    #[arg(long, env = "IBP_ALLOW_WILDCARD_GRANTS")]
    pub allow_wildcard_grants: bool,
    /// Most connections to the admin server at once (and a quarter of that per peer).
    #[arg(long, env = "IBP_ADMIN_MAX_CONNECTIONS", default_value_t = 64)]
    pub admin_max_connections: usize,
    /// Deadline for a TLS handshake.
    #[arg(long, env = "IBP_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,
    /// Deadline for reading request headers (slow clients are cut off).
    #[arg(long, env = "IBP_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Deadline for a whole request.
    #[arg(long, env = "IBP_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub request_timeout_secs: u64,
    /// Most client connections open at once.
    #[arg(long, env = "IBP_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Most concurrent h2 streams per connection.
    #[arg(long, env = "IBP_H2_MAX_STREAMS", default_value_t = 128)]
    pub h2_max_streams: u32,
    /// How long in-flight requests may take to finish at shutdown.
    #[arg(long, env = "IBP_DRAIN_TIMEOUT_SECS", default_value_t = 20)]
    pub drain_timeout_secs: u64,
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
    /// Writable directory for state that should survive a restart (the cluster JWKS, so
    /// tokens verify even if the apiserver is down when the proxy restarts).
    #[arg(long, env = "IBP_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

/// The validated configuration of one proxy.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub kubeconfig: Option<PathBuf>,
    pub tls: Vec<TlsEntry>,
    pub default_sni: Option<String>,
    pub issuer_keys: Vec<PathBuf>,
    pub issuer_url: IssuerUrl,
    pub bindings: PathBuf,
    pub authority_host: url::Url,
    pub sni_profiles: Vec<SniProfile>,
    pub token_audience: String,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub authn_mode: AuthnMode,
    pub tokenreview_ttl: Duration,
    pub authz_allowed_ttl: Duration,
    pub authz_denied_ttl: Duration,
    pub cache_capacity: u64,
    pub cache_min_remaining: Duration,
    pub entra_timeout: Duration,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub limits: LimitsConfig,
    pub caller_miss_budget: u32,
    pub caller_claims_budget: u32,
    pub cache_max_keys_per_identity: usize,
    pub allow_wildcard_grants: bool,
    pub admin_limits: LimitsConfig,
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub h2_max_streams: u32,
    pub drain_timeout: Duration,
    pub shutdown_delay: Duration,
    /// How often files (bindings, certificates) are checked for changes.
    pub reload_period: Duration,
    /// How often the token cache looks for refreshes that are due.
    pub refresh_tick: Duration,
    pub state_dir: Option<PathBuf>,
}

/// `serve`'s flags alone, for building a configuration from a flag list.
#[derive(Parser, Debug)]
#[command(name = "serve", args_override_self = true)]
struct ServeFlags {
    #[command(flatten)]
    args: ServeArgs,
}

impl ProxyConfig {
    /// A configuration from `serve` flags (e.g. `["--tls", "n=c.pem,k.pem", ...]`), with every
    /// default exactly as `serve` has it. `dev` and the tests build their proxies this way.
    pub fn from_flags<I, T>(flags: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("serve"))
            .chain(flags.into_iter().map(Into::into));
        let parsed = ServeFlags::try_parse_from(argv).map_err(|e| e.to_string())?;
        Self::from_args(&parsed.args)
    }

    pub fn from_args(a: &ServeArgs) -> Result<Self, String> {
        let authority_host = parse_authority(&a.authority_host)?;
        let issuer_url = IssuerUrl::parse(&a.issuer_url)?;
        for p in &a.sni_profiles {
            if !a.tls.iter().any(|t| t.name == p.name) {
                return Err(format!(
                    "--sni-profile '{}' names no --tls entry; profiles apply to served SNI names",
                    p.name
                ));
            }
        }
        if a.token_audience.trim().is_empty() {
            return Err("--token-audience must not be empty".into());
        }
        if a.cache_capacity == 0 || a.max_connections == 0 || a.max_body_bytes < 1024 {
            return Err("--cache-capacity and --max-connections must be positive and --max-body-bytes at least 1024".into());
        }
        let positive = [
            ("--max-connections-per-peer", a.max_connections_per_peer),
            ("--max-in-flight", a.max_in_flight),
            ("--max-in-flight-per-peer", a.max_in_flight_per_peer),
            (
                "--max-buffered-bytes-per-peer",
                a.max_buffered_bytes_per_peer,
            ),
            (
                "--cache-max-keys-per-identity",
                a.cache_max_keys_per_identity,
            ),
            ("--admin-max-connections", a.admin_max_connections),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{flag} must be positive"));
        }
        if a.max_buffered_bytes_per_peer.min(a.max_buffered_bytes) < a.max_body_bytes {
            return Err(format!(
                "--max-buffered-bytes-per-peer and --max-buffered-bytes must each hold at least one body of --max-body-bytes ({})",
                a.max_body_bytes
            ));
        }
        let secs = Duration::from_secs;
        Ok(Self {
            kubeconfig: a.kubeconfig.clone(),
            tls: a.tls.clone(),
            default_sni: a.default_sni.clone(),
            issuer_keys: a.issuer_key.clone(),
            issuer_url,
            bindings: a.bindings.clone(),
            authority_host,
            sni_profiles: a.sni_profiles.clone(),
            token_audience: a.token_audience.trim().to_string(),
            listen: a.listen,
            admin_listen: a.admin_listen,
            authn_mode: a.authn_mode,
            tokenreview_ttl: secs(a.tokenreview_ttl_secs),
            authz_allowed_ttl: secs(a.authz_allowed_ttl_secs),
            authz_denied_ttl: secs(a.authz_denied_ttl_secs),
            cache_capacity: a.cache_capacity,
            cache_min_remaining: secs(a.cache_min_remaining_secs),
            entra_timeout: secs(a.entra_timeout_secs.max(1)),
            max_body_bytes: a.max_body_bytes,
            body_timeout: secs(a.body_timeout_secs.max(1)),
            idle_timeout: secs(a.idle_timeout_secs.max(1)),
            limits: LimitsConfig {
                // A per-peer share never exceeds the whole (lowering a global limit alone
                // lowers the shares with it).
                max_connections: a.max_connections,
                max_connections_per_peer: a.max_connections_per_peer.min(a.max_connections),
                max_in_flight: a.max_in_flight,
                max_in_flight_per_peer: a.max_in_flight_per_peer.min(a.max_in_flight),
                max_buffered_bytes: a.max_buffered_bytes,
                max_buffered_bytes_per_peer: a
                    .max_buffered_bytes_per_peer
                    .min(a.max_buffered_bytes),
            },
            caller_miss_budget: a.caller_miss_budget,
            caller_claims_budget: a.caller_claims_budget,
            cache_max_keys_per_identity: a.cache_max_keys_per_identity,
            allow_wildcard_grants: a.allow_wildcard_grants,
            // The admin server answers probes and scrapes: small, and no peer takes it all.
            admin_limits: LimitsConfig {
                max_connections: a.admin_max_connections,
                max_connections_per_peer: (a.admin_max_connections / 4).max(1),
                ..LimitsConfig::unbounded()
            },
            handshake_timeout: secs(a.handshake_timeout_secs.max(1)),
            header_read_timeout: secs(a.header_read_timeout_secs.max(1)),
            request_timeout: secs(a.request_timeout_secs.max(1)),
            h2_max_streams: a.h2_max_streams.max(1),
            drain_timeout: secs(a.drain_timeout_secs),
            shutdown_delay: secs(a.shutdown_delay_secs),
            reload_period: Duration::from_secs(2),
            refresh_tick: Duration::from_secs(1),
            state_dir: a.state_dir.clone(),
        })
    }
}

/// Authority hosts of the sovereign clouds, by the names operators use.
pub fn cloud_authority(cloud: &str) -> Option<&'static str> {
    match cloud.to_ascii_lowercase().as_str() {
        "public" | "azurepubliccloud" => Some(PUBLIC_CLOUD),
        "usgov" | "azureusgovernment" => Some("https://login.microsoftonline.us"),
        "china" | "azurechinacloud" => Some("https://login.chinacloudapi.cn"),
        _ => None,
    }
}

/// The Entra settings of one SNI name: which cloud its identities live in, and the tenant
/// assumed for requests whose path names none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniProfile {
    pub name: String,
    pub authority: url::Url,
    pub tenant: Option<String>,
}

impl std::str::FromStr for SniProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("--sni-profile '{s}': {why}");
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=cloud=..|authority=..[,tenant=..]"))?;
        let mut authority = None;
        let mut tenant = None;
        for pair in rest.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| bad(&format!("'{pair}' is not key=value")))?;
            match k.trim() {
                "cloud" => {
                    let host = cloud_authority(v.trim()).ok_or_else(|| {
                        bad(&format!("unknown cloud '{v}' (public, usgov or china)"))
                    })?;
                    authority = Some(parse_authority(host)?);
                }
                "authority" => authority = Some(parse_authority(v.trim())?),
                "tenant" => {
                    let t = v.trim().to_ascii_lowercase();
                    if crate::token::parse_guid(&t).is_none() && !t.contains('.') {
                        return Err(bad("tenant must be a GUID or a domain"));
                    }
                    tenant = Some(t);
                }
                other => return Err(bad(&format!("unknown key '{other}'"))),
            }
        }
        Ok(Self {
            name: name.trim().to_ascii_lowercase(),
            authority: authority.ok_or_else(|| bad("cloud= or authority= is required"))?,
            tenant,
        })
    }
}

/// An Entra authority host: https, or http on loopback (emulators).
pub fn parse_authority(s: &str) -> Result<url::Url, String> {
    let url =
        url::Url::parse(s).map_err(|e| format!("--authority-host '{s}' is not a URL: {e}"))?;
    let ok = url.scheme() == "https" || (url.scheme() == "http" && crate::http::is_loopback(&url));
    if !ok {
        return Err(format!(
            "--authority-host '{s}' must be https (plain http only for loopback emulators)"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "--authority-host '{s}' must not have a query or fragment"
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_profiles_parse_clouds_authorities_and_tenants() {
        let p: SniProfile = "gov.example=cloud=usgov,tenant=contoso.onmicrosoft.us"
            .parse()
            .unwrap();
        assert_eq!(p.authority.as_str(), "https://login.microsoftonline.us/");
        assert_eq!(p.tenant.as_deref(), Some("contoso.onmicrosoft.us"));
        let p: SniProfile = "a=authority=http://127.0.0.1:9000".parse().unwrap();
        assert_eq!(p.tenant, None);
        assert!("a=cloud=mars".parse::<SniProfile>().is_err());
        assert!("a=authority=http://login.example"
            .parse::<SniProfile>()
            .is_err());
        assert!("a=tenant=x.example".parse::<SniProfile>().is_err());
        assert!("a=cloud=china,color=blue".parse::<SniProfile>().is_err());
    }
}

#[cfg(feature = "emulators")]
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

#[cfg(feature = "emulators")]
#[derive(Subcommand, Debug)]
pub enum DevCommand {
    /// Print a service-account token signed by the dev kube emulator's key.
    Token(DevTokenArgs),
}

#[cfg(feature = "emulators")]
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

#[cfg(feature = "emulators")]
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

#[cfg(feature = "emulators")]
#[derive(Args, Debug)]
pub struct EmulateStaticArgs {
    #[arg(long, env = "IBP_LISTEN", default_value = "127.0.0.1:8480")]
    pub listen: SocketAddr,
    /// The directory to serve (e.g. the `issuer publish --out` directory).
    #[arg(long, env = "IBP_DIR")]
    pub dir: PathBuf,
}

#[cfg(feature = "emulators")]
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

#[cfg(feature = "emulators")]
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
    /// Reuse an assertion issuer's discovery document and JWKS for this long, as Entra does
    /// (0: fetch them for every exchange, so a removed key fails the next call at once).
    #[arg(long, env = "IBP_ISSUER_METADATA_TTL_SECS", default_value_t = 0)]
    pub issuer_metadata_ttl_secs: u64,
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
    /// Public key PEM of a cluster (repeatable: one per cluster).
    #[arg(
        long = "public-key",
        env = "IBP_PUBLIC_KEY",
        value_delimiter = ',',
        required = true
    )]
    pub public_keys: Vec<PathBuf>,
    #[arg(long, env = "IBP_BINDINGS")]
    pub bindings: PathBuf,
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
