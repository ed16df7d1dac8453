//! The validated configuration: `serve`'s flags ([`crate::cli::ServeArgs`]) checked and
//! turned into one typed struct per component before anything starts. `dev` and the tests
//! build the same structs from flag lists, so every default is the CLI's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::authn::AuthnConfig;
use crate::authz::AuthzConfig;
use crate::cli::{AdminArgs, AuthnArgs, AuthzArgs, EntraArgs, IdentityArgs, ServeArgs, ServerArgs};
use crate::exchange::authority::{parse_authority, SniProfile};
use crate::exchange::cache::{BudgetConfig, CacheConfig};
use crate::exchange::issuer::IssuerUrl;
use crate::serve::limits::LimitsConfig;
use crate::serve::tls::TlsConfig;
use crate::startup::StartError;

/// The validated configuration of one proxy, one struct per component.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub kubeconfig: Option<PathBuf>,
    /// The `timeoutSeconds` of each RBAC watch.
    pub watch_timeout: Duration,
    pub tls: TlsConfig,
    pub issuer: IssuerConfig,
    /// The bindings file.
    pub bindings: PathBuf,
    pub entra: EntraConfig,
    pub authn: AuthnConfig,
    pub authz: AuthzConfig,
    pub cache: CacheConfig,
    pub budgets: BudgetConfig,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    /// After SIGTERM, how long the proxy serves on while not ready.
    pub shutdown_delay: Duration,
    /// How often files (bindings, keys, certificates) are checked for changes.
    pub reload_period: Duration,
    /// How often the token cache looks for refreshes that are due.
    pub refresh_tick: Duration,
    /// When a newly loaded issuer key may sign.
    pub key_activation: crate::exchange::activation::ActivationConfig,
    /// How a "no matching FIC" answer is retried while a new FIC may be propagating.
    pub fic_propagation: crate::exchange::entra::FicPropagation,
    /// Sidecar mode (None: the node's proxy).
    pub sidecar: Option<crate::serve::sidecar::SidecarConfig>,
}

/// The keys that sign our assertions and the issuer URL they carry.
#[derive(Clone, Debug)]
pub struct IssuerConfig {
    pub keys: Vec<PathBuf>,
    pub url: IssuerUrl,
}

/// Where Entra is, per SNI name.
#[derive(Clone, Debug)]
pub struct EntraConfig {
    /// The authority of every SNI name without a profile.
    pub authority_host: url::Url,
    pub sni_profiles: Vec<SniProfile>,
    /// Timeout of one call to Entra.
    pub timeout: Duration,
}

/// The token port: its address, its limits and its deadlines.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub limits: LimitsConfig,
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub h2_max_streams: u32,
    pub drain_timeout: Duration,
}

/// The admin server (`/livez`, `/readyz`, `/metrics`).
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub limits: LimitsConfig,
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
    pub fn from_flags<I, T>(flags: I) -> Result<Self, StartError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("serve"))
            .chain(flags.into_iter().map(Into::into));
        let parsed =
            ServeFlags::try_parse_from(argv).map_err(|e| StartError::usage(e.to_string()))?;
        Self::from_args(&parsed.args)
    }

    pub fn from_args(a: &ServeArgs) -> Result<Self, StartError> {
        let server = server_config(&a.server)?;
        let entra = entra_config(&a.entra)?;
        for p in &entra.sni_profiles {
            if !a.tls.tls.iter().any(|t| t.name == p.name) {
                return Err(StartError::usage(format!(
                    "--sni-profile '{}' names no --tls entry; profiles apply to served SNI names",
                    p.name
                )));
            }
        }
        Ok(Self {
            kubeconfig: a.cluster.kubeconfig.clone(),
            watch_timeout: secs(a.cluster.watch_timeout_secs),
            tls: TlsConfig::from_args(&a.tls),
            issuer: issuer_config(&a.identities)?,
            bindings: a.identities.bindings.clone(),
            entra,
            authn: authn_config(&a.authn, a.cluster.state_dir.clone())?,
            authz: authz_config(&a.authz),
            cache: CacheConfig::from_args(&a.cache)?,
            budgets: BudgetConfig::from_args(&a.cache),
            server,
            admin: admin_config(&a.admin)?,
            shutdown_delay: secs(a.process.shutdown_delay_secs),
            reload_period: crate::files::RELOAD_PERIOD,
            refresh_tick: crate::exchange::cache::REFRESH_TICK,
            key_activation: crate::exchange::activation::ActivationConfig {
                delay: secs(a.key_activation.issuer_key_activation_delay_secs),
                check_period: deadline(a.key_activation.issuer_key_check_secs),
            },
            fic_propagation: crate::exchange::entra::FicPropagation {
                retries: a.fic_propagation.fic_propagation_retries,
                backoff: Duration::from_millis(a.fic_propagation.fic_propagation_backoff_ms),
            },
            sidecar: crate::serve::sidecar::config(
                &a.sidecar,
                a.server.listen,
                a.admin.admin_listen,
                a.authn.authn_mode,
            )?,
        })
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A deadline of at least one second: zero would refuse everything.
fn deadline(s: u64) -> Duration {
    Duration::from_secs(s.max(1))
}

fn positive(values: &[(&str, usize)]) -> Result<(), StartError> {
    match values.iter().find(|(_, v)| *v == 0) {
        Some((flag, _)) => Err(StartError::usage(format!("{flag} must be positive"))),
        None => Ok(()),
    }
}

fn issuer_config(a: &IdentityArgs) -> Result<IssuerConfig, StartError> {
    Ok(IssuerConfig {
        keys: a.issuer_key.clone(),
        url: IssuerUrl::parse(&a.issuer_url)?,
    })
}

fn entra_config(a: &EntraArgs) -> Result<EntraConfig, StartError> {
    Ok(EntraConfig {
        authority_host: parse_authority(&a.authority_host)?,
        sni_profiles: a.sni_profiles.clone(),
        timeout: deadline(a.entra_timeout_secs),
    })
}

fn authn_config(a: &AuthnArgs, state_dir: Option<PathBuf>) -> Result<AuthnConfig, StartError> {
    let audience = a.token_audience.trim();
    if audience.is_empty() {
        return Err(StartError::usage("--token-audience must not be empty"));
    }
    Ok(AuthnConfig {
        audience: audience.to_string(),
        mode: a.authn_mode,
        review_ttl: secs(a.tokenreview_ttl_secs),
        persist_dir: state_dir,
    })
}

fn authz_config(a: &AuthzArgs) -> AuthzConfig {
    AuthzConfig {
        allowed_ttl: secs(a.authz_allowed_ttl_secs),
        denied_ttl: secs(a.authz_denied_ttl_secs),
        allow_wildcard_grants: a.allow_wildcard_grants,
    }
}

fn server_config(a: &ServerArgs) -> Result<ServerConfig, StartError> {
    positive(&[
        ("--max-connections", a.max_connections),
        ("--max-connections-per-peer", a.max_connections_per_peer),
        ("--max-in-flight", a.max_in_flight),
        ("--max-in-flight-per-peer", a.max_in_flight_per_peer),
        (
            "--max-buffered-bytes-per-peer",
            a.max_buffered_bytes_per_peer,
        ),
    ])?;
    if a.max_body_bytes < 1024 {
        return Err(StartError::usage("--max-body-bytes must be at least 1024"));
    }
    if a.max_buffered_bytes_per_peer.min(a.max_buffered_bytes) < a.max_body_bytes {
        return Err(StartError::usage(format!(
            "--max-buffered-bytes-per-peer and --max-buffered-bytes must each hold at least one body of --max-body-bytes ({})",
            a.max_body_bytes
        )));
    }
    Ok(ServerConfig {
        listen: a.listen,
        // A per-peer share never exceeds the whole (lowering a global limit alone lowers the
        // shares with it).
        limits: LimitsConfig {
            max_connections: a.max_connections,
            max_connections_per_peer: a.max_connections_per_peer.min(a.max_connections),
            max_in_flight: a.max_in_flight,
            max_in_flight_per_peer: a.max_in_flight_per_peer.min(a.max_in_flight),
            max_buffered_bytes: a.max_buffered_bytes,
            max_buffered_bytes_per_peer: a.max_buffered_bytes_per_peer.min(a.max_buffered_bytes),
        },
        max_body_bytes: a.max_body_bytes,
        header_read_timeout: deadline(a.header_read_timeout_secs),
        body_timeout: deadline(a.body_timeout_secs),
        request_timeout: deadline(a.request_timeout_secs),
        idle_timeout: deadline(a.idle_timeout_secs),
        h2_max_streams: a.h2_max_streams.max(1),
        drain_timeout: secs(a.drain_timeout_secs),
    })
}

fn admin_config(a: &AdminArgs) -> Result<AdminConfig, StartError> {
    positive(&[("--admin-max-connections", a.admin_max_connections)])?;
    Ok(AdminConfig {
        listen: a.admin_listen,
        // The admin server answers probes and scrapes: small, and no peer takes it all.
        limits: LimitsConfig {
            max_connections: a.admin_max_connections,
            max_connections_per_peer: (a.admin_max_connections / 4).max(1),
            ..LimitsConfig::unbounded()
        },
    })
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
