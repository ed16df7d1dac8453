//! Sidecar mode: the proxy as a native sidecar in ONE workload pod, for nodes where DaemonSets
//! do not run (virtual and serverless nodes). The request path is the DaemonSet's; what
//! differs is decided here:
//!
//! - it listens on loopback only (the token port and the admin port), so only the containers
//!   of its own pod reach it;
//! - it serves only its own pod's service account: between authentication and authorization
//!   [`check`] refuses (403) an assertion of any other account, naming both;
//! - it authenticates locally against the cluster JWKS (the pod may read it through the
//!   default `system:service-account-issuer-discovery` binding) and authorizes with a
//!   SelfSubjectAccessReview made with the pod's own API token
//!   ([`crate::cluster::ReviewMode::OwnToken`]), so the workload needs no RBAC beyond its
//!   grant of the identity; it cannot watch RBAC, so a revoked grant takes effect within the
//!   allow TTL (`--authz-allowed-ttl-secs`);
//! - who "its own account" is, the apiserver says at start (a SelfSubjectReview with the same
//!   token the reviews use), so the check and the reviews can never name different accounts;
//! - optionally it makes its own CA and serving certificate at start (`--sidecar-ca-out`), so
//!   no certificate has to be distributed to the workload's namespace.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::authn::{AuthnMode, Caller};
use crate::cluster::{Cluster, ClusterError};
use crate::request::error::{ProxyError, Result};
use crate::serve::tls::TlsConfig;
use crate::startup::StartError;
use clap::Args;

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Sidecar mode")]
pub struct SidecarArgs {
    /// Run as the native sidecar of one workload pod: loopback only, serving only the pod's
    /// own service account, authorizing with SelfSubjectAccessReviews made with the pod's own
    /// API token (no RBAC watch: a revoked grant takes effect within the allow TTL).
    #[arg(long, env = "IBP_SIDECAR")]
    pub sidecar: bool,
    /// Make a CA and the --tls certificates at start (written to each entry's CERT and KEY),
    /// and write the CA certificate to this file: the app's AZURE_KUBERNETES_CA_FILE.
    #[arg(long, env = "IBP_SIDECAR_CA_OUT", requires = "sidecar")]
    pub sidecar_ca_out: Option<PathBuf>,
}

/// Sidecar mode's settings, validated.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    /// Where the CA certificate of the certificates made at start goes (the app container's
    /// `AZURE_KUBERNETES_CA_FILE`); None: the `--tls` files are used as they are.
    pub ca_out: Option<PathBuf>,
}

/// Sidecar mode from its flags and the addresses and authentication it constrains: None
/// without `--sidecar`; an error naming the flag for anything a sidecar cannot do.
pub fn config(
    args: &SidecarArgs,
    listen: SocketAddr,
    admin_listen: SocketAddr,
    authn_mode: AuthnMode,
) -> std::result::Result<Option<SidecarConfig>, StartError> {
    if !args.sidecar {
        return Ok(None);
    }
    for (addr, flag) in [(listen, "--listen"), (admin_listen, "--admin-listen")] {
        if !addr.ip().is_loopback() {
            return Err(StartError::usage(format!(
                "--sidecar serves its own pod only: {flag} must be a loopback address \
                 (e.g. 127.0.0.1:{}), not {addr}",
                addr.port()
            )));
        }
    }
    if authn_mode != AuthnMode::Local {
        return Err(StartError::usage(
            "--sidecar authenticates against the cluster JWKS only: set --authn-mode local \
             (a workload pod has no right to create TokenReviews)",
        ));
    }
    Ok(Some(SidecarConfig {
        ca_out: args.sidecar_ca_out.clone(),
    }))
}

/// How long the sidecar keeps asking an unreachable apiserver who it is before it gives up
/// (and kubelet restarts it, with its own backoff).
pub const DISCOVER_PATIENCE: Duration = Duration::from_secs(30);

/// The one service account this sidecar serves: its pod's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnAccount {
    pub namespace: String,
    pub name: String,
    /// `system:serviceaccount:<namespace>:<name>`.
    pub username: String,
}

impl OwnAccount {
    /// From the user name the apiserver gives our own credentials; they must be a service
    /// account's.
    pub fn from_username(username: &str) -> std::result::Result<Self, StartError> {
        let parsed = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'));
        match parsed {
            Some((namespace, name)) => Ok(Self {
                namespace: namespace.to_string(),
                name: name.to_string(),
                username: username.to_string(),
            }),
            None => Err(StartError::usage(format!(
                "--sidecar: the apiserver takes this pod's API credentials for '{username}', \
                 which is not a service account; a sidecar runs with its pod's service-account \
                 token"
            ))),
        }
    }

    /// Asks the apiserver who our own credentials are (a SelfSubjectReview). An apiserver that
    /// is unreachable or failing is asked again for up to [`DISCOVER_PATIENCE`] (a pod often
    /// starts while its node's network is still coming up); any other answer fails at once.
    /// An apiserver still unreachable then is an unavailable dependency; a refusal (4xx) is
    /// the pod's configuration (its token, or a cluster older than 1.28).
    pub async fn discover(cluster: &Cluster) -> std::result::Result<Self, StartError> {
        let deadline = tokio::time::Instant::now() + DISCOVER_PATIENCE;
        let mut wait = Duration::from_millis(250);
        let username = loop {
            match cluster.whoami().await {
                Ok(username) => break username,
                Err(ClusterError::Unavailable(m))
                    if tokio::time::Instant::now() + wait < deadline =>
                {
                    tracing::warn!(error = %m, "sidecar: cannot ask the apiserver who this pod is yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(4));
                }
                Err(e @ ClusterError::Unavailable(_)) => {
                    return Err(StartError::unavailable(format!(
                        "--sidecar: cannot learn this pod's service account: no answer from the \
                         apiserver within {} s; check that the pod reaches it",
                        DISCOVER_PATIENCE.as_secs()
                    ))
                    .because(e))
                }
                Err(e @ ClusterError::Unexpected(_)) => {
                    return Err(StartError::usage(
                        "--sidecar: cannot learn this pod's service account (SelfSubjectReview, \
                         Kubernetes 1.28 or later, with the pod's own token)",
                    )
                    .because(e))
                }
            }
        };
        Self::from_username(&username)
    }
}

/// The apiserver connection as the mode wants it, and the account served: unchanged and None
/// for the node's proxy; for a sidecar, reviews made with its own token and its own account,
/// learned from the apiserver.
pub async fn as_configured(
    cluster: Cluster,
    sidecar: Option<&SidecarConfig>,
) -> std::result::Result<(std::sync::Arc<Cluster>, Option<OwnAccount>), StartError> {
    if sidecar.is_none() {
        return Ok((std::sync::Arc::new(cluster), None));
    }
    let own = OwnAccount::discover(&cluster).await?;
    tracing::info!(service_account = %own.username, "sidecar: serving this service account only");
    let cluster = cluster.with_review_mode(crate::cluster::ReviewMode::OwnToken);
    Ok((std::sync::Arc::new(cluster), Some(own)))
}

/// In sidecar mode, refuses (403) a caller that is not the pod's own service account. Runs
/// after authentication and before authorization, so another account learns nothing about
/// grants or bindings. A no-op without sidecar mode.
pub fn check(own: Option<&OwnAccount>, caller: &Caller) -> Result<()> {
    match own {
        Some(own) if caller.username != own.username => Err(ProxyError::Forbidden(format!(
            "This token proxy is the sidecar of one pod and serves only that pod's service \
             account {}; the assertion is a token of {}. Send the request from a pod running \
             as {} to its own sidecar (or to the node's proxy where a DaemonSet runs).",
            own.username, caller.username, caller.username
        ))),
        _ => Ok(()),
    }
}

/// With `--sidecar-ca-out`: a new CA and, for every `--tls` name, a serving certificate it
/// signs, written to that entry's CERT and KEY files (the key readable by its owner only),
/// then the CA certificate to `--sidecar-ca-out` LAST, so whoever waits for that file finds
/// everything in place. Made anew at every start: nothing to rotate, nothing to distribute
/// (clients re-read the CA file on every request).
pub fn make_certificates(
    config: &SidecarConfig,
    tls: &TlsConfig,
) -> std::result::Result<(), StartError> {
    let Some(ca_out) = &config.ca_out else {
        return Ok(());
    };
    // rcgen refuses only what we ask wrongly: our bug, not the operator's input (the names
    // were checked as DNS names by --tls).
    let ca = SelfCa::generate()
        .map_err(|e| StartError::internal("--sidecar-ca-out: cannot make the CA").because(e))?;
    for entry in &tls.entries {
        let (cert, key) = ca.issue(&entry.name).map_err(|e| {
            StartError::internal(format!(
                "--sidecar-ca-out: cannot make a certificate for {}",
                entry.name
            ))
            .because(e)
        })?;
        write(&entry.key, key.as_bytes(), true)?;
        write(&entry.cert, cert.as_bytes(), false)?;
    }
    write(ca_out, ca.cert_pem.as_bytes(), false)?;
    tracing::info!(ca = %ca_out.display(), "sidecar: made its CA and serving certificates");
    Ok(())
}

fn write(path: &Path, bytes: &[u8], private: bool) -> std::result::Result<(), StartError> {
    let written = if private {
        crate::files::write_private(path, bytes)
    } else {
        crate::files::write_public(path, bytes)
    };
    written.map_err(|e| {
        StartError::usage(format!(
            "--sidecar-ca-out: cannot write {} (check the path and its directory's permissions)",
            path.display()
        ))
        .because(e)
    })
}

/// A CA that lives as long as the process: its key is never written anywhere.
struct SelfCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    cert_pem: String,
}

impl SelfCa {
    fn generate() -> std::result::Result<Self, rcgen::Error> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, "identity-binding-proxy sidecar CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            params,
            key,
            cert_pem: cert.pem(),
        })
    }

    /// (certificate PEM, key PEM) for exactly the DNS name `name` (Java matches exactly).
    fn issue(&self, name: &str) -> std::result::Result<(String, String), rcgen::Error> {
        use rcgen::{
            CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose,
        };
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// How long `probe` waits for its whole answer (kubelet's probe timeout is 1 s by default:
/// the probe process must end on its own well within a period).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `probe URL`: GET a loopback `http://` URL; Ok on a 2xx. A sidecar listens on loopback,
/// where kubelet's HTTP probes (sent to the pod IP) cannot reach, so its probes are `exec`
/// probes running this from the same image. A URL that is not one is a usage error; no
/// answer, or an answer other than 2xx, is the probed server unavailable.
pub async fn probe(url: &str) -> std::result::Result<(), StartError> {
    let parsed = url::Url::parse(url)
        .map_err(|e| StartError::usage(format!("probe: '{url}' is not a URL: {e}")))?;
    if parsed.scheme() != "http" || !crate::http::client::is_loopback(&parsed) {
        return Err(StartError::usage(format!(
            "probe: '{url}' must be a plain http:// URL on loopback (the admin port)"
        )));
    }
    let addr = parsed
        .socket_addrs(|| Some(80))
        .map_err(|e| StartError::usage(format!("probe: {url}: {e}")))?;
    let path = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_string(),
    };
    let down = |e: &dyn std::fmt::Display| StartError::unavailable(format!("probe: {url}: {e}"));
    let ask = async {
        let tcp = tokio::net::TcpStream::connect(&addr[..])
            .await
            .map_err(|e| down(&e))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| down(&e))?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, parsed.authority())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| StartError::usage(format!("probe: {url}: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| down(&e))?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            s => Err(down(&format_args!("answered {s}"))),
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, ask)
        .await
        .map_err(|_| down(&format_args!("no answer within {PROBE_TIMEOUT:?}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(ns: &str, name: &str) -> Caller {
        Caller {
            namespace: ns.into(),
            service_account: name.into(),
            sa_uid: String::new(),
            pod_name: None,
            pod_uid: None,
            username: format!("system:serviceaccount:{ns}:{name}"),
            groups: Vec::new(),
        }
    }

    #[test]
    fn only_the_pods_own_account_passes_and_the_refusal_names_both() {
        let own = OwnAccount::from_username("system:serviceaccount:apps:web").unwrap();
        assert_eq!((own.namespace.as_str(), own.name.as_str()), ("apps", "web"));
        assert!(check(Some(&own), &caller("apps", "web")).is_ok());
        for (ns, sa) in [("apps", "worker"), ("other", "web")] {
            let e = check(Some(&own), &caller(ns, sa)).unwrap_err();
            assert_eq!(e.status(), 403);
            let text = e.to_string();
            assert!(text.contains("system:serviceaccount:apps:web"), "{text}");
            assert!(
                text.contains(&format!("system:serviceaccount:{ns}:{sa}")),
                "{text}"
            );
        }
        assert!(
            check(None, &caller("any", "one")).is_ok(),
            "no sidecar mode"
        );
    }

    #[test]
    fn credentials_that_are_not_a_service_account_are_refused() {
        for name in [
            "kubernetes-admin",
            "system:serviceaccount:apps",
            "system:serviceaccount::web",
            "system:serviceaccount:apps:",
            "system:serviceaccount:a:b:c",
        ] {
            assert!(OwnAccount::from_username(name).is_err(), "{name}");
        }
    }

    #[test]
    fn a_sidecar_listens_on_loopback_and_authenticates_locally() {
        let args = SidecarArgs {
            sidecar: true,
            sidecar_ca_out: None,
        };
        let lo: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let lo6: SocketAddr = "[::1]:9090".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8443".parse().unwrap();
        assert!(config(&args, lo, lo6, AuthnMode::Local).unwrap().is_some());
        let refused = |listen, admin, mode| {
            let e = config(&args, listen, admin, mode).unwrap_err();
            assert_eq!(
                e.exit_code(),
                64,
                "a flag a sidecar cannot take is usage: {e}"
            );
            e.to_string()
        };
        let e = refused(any, lo, AuthnMode::Local);
        assert!(e.contains("--listen") && e.contains("loopback"), "{e}");
        let e = refused(lo, any, AuthnMode::Local);
        assert!(e.contains("--admin-listen"), "{e}");
        let e = refused(lo, lo, AuthnMode::Both);
        assert!(e.contains("--authn-mode local"), "{e}");
        let off = SidecarArgs {
            sidecar: false,
            sidecar_ca_out: None,
        };
        assert!(config(&off, any, any, AuthnMode::Both).unwrap().is_none());
    }
}
