//! `identity-binding-proxy doctor`: checks a live installation end to end and prints each
//! check as ✔ / ✘ / ? with the exact fix for each ✘. It reads what the cluster holds (the
//! proxy's DaemonSet and what it mounts, the webhook's settings, the opted-in pods and their
//! grants), what Entra will read (the published issuer documents, over HTTPS from where doctor
//! runs), and optionally what Entra holds (the FICs, as `az` lists them).
//!
//! # Layout
//! - `report`: the checks' shape and how they print;
//! - `install`: reading the installation from the cluster;
//! - `proxy`, `webhook`, `grants`, `tls`, `issuer`, `fleet`: one file per group of checks.

mod fleet;
mod grants;
mod install;
mod issuer;
mod proxy;
mod report;
mod tls;
mod webhook;

use std::io::Write;
use std::time::Duration;

use crate::cli::{DoctorArgs, DoctorOutput};
use crate::cluster::{Cluster, DEFAULT_WATCH_TIMEOUT};
use crate::startup::StartError;

pub use report::{Check, Report, Status, EXIT_FAILED};

/// Runs every check, prints the report, and returns the exit status: 0 when nothing failed,
/// [`EXIT_FAILED`] when a check failed. Arguments it cannot read are a usage error (64), an
/// apiserver out of reach an unavailable dependency (69).
pub async fn run(args: &DoctorArgs) -> Result<u8, StartError> {
    let fics = issuer::read_fic_lists(&args.federated_credentials).map_err(StartError::usage)?;
    let outbound = issuer::outbound_client(args.issuer_ca_file.as_deref())
        .map_err(|e| StartError::usage(format!("--issuer-ca-file: {e}")))?;
    let fleet = args
        .fleet
        .as_deref()
        .map(crate::cli::fleet::load)
        .transpose()?;
    let cluster = Cluster::connect(args.kubeconfig.as_deref(), DEFAULT_WATCH_TIMEOUT).await?;
    if let Err(e) = cluster.client().apiserver_version().await {
        return Err(apiserver_refusal(&e));
    }
    let fleet = args.fleet.as_deref().zip(fleet.as_ref());
    let report = checks(&cluster, args, &fics, fleet, &outbound).await?;
    let text = match args.output {
        DoctorOutput::Text => report.text(),
        DoctorOutput::Json => format!("{}\n", report.json()),
    };
    print_report(&text)?;
    Ok(if report.failed() { EXIT_FAILED } else { 0 })
}

/// Why the apiserver's version could not be read: credentials it refuses (401, 403) are the
/// operator's to fix (64); an apiserver out of reach, failing or slow is unavailable (69).
fn apiserver_refusal(e: &kube::Error) -> StartError {
    match e {
        kube::Error::Api(status) if status.code == 401 || status.code == 403 => {
            StartError::usage(format!(
                "the Kubernetes API server refused doctor's credentials ({}): use a kubeconfig \
                 (--kubeconfig) or service account that may read the installation: {e}",
                status.code
            ))
        }
        _ => StartError::unavailable(format!(
            "the Kubernetes API server could not be reached: {e}"
        )),
    }
}

/// Writes the report to standard output; a reader that stopped reading (`doctor | head`)
/// ends it normally.
fn print_report(text: &str) -> Result<(), StartError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(StartError::internal(format!(
            "writing the report to standard output: {e}"
        ))),
        _ => Ok(()),
    }
}

/// Every check, in the order a request meets the pieces: the proxy, the webhook and the pods,
/// the grants, TLS, the issuer, the FICs, the clocks.
async fn checks(
    cluster: &Cluster,
    args: &DoctorArgs,
    fics: &issuer::FicLists,
    fleet: Option<(&std::path::Path, &crate::cli::fleet::Fleet)>,
    outbound: &crate::http::client::HttpClient,
) -> Result<Report, StartError> {
    let client = cluster.client();
    let timeout = Duration::from_secs(args.http_timeout_secs.max(1));
    let mut report = Report::default();
    let proxy = install::read_proxy(client, args).await;
    let webhook = install::read_webhook(client, args).await;
    // Pods served by a sidecar of their own are not the DaemonSet's to serve.
    let (workloads, sidecar_served) = match install::read_workloads(client, args).await {
        Ok(all) => {
            let (own, served): (Vec<_>, Vec<_>) = all.into_iter().partition(|w| w.sidecar);
            let own = own.iter().map(|w| {
                format!(
                    "pod {}/{}: served by its own sidecar, not checked against the DaemonSet",
                    w.namespace, w.name
                )
            });
            (Ok(served), own.collect())
        }
        Err(e) => (Err(e), Vec::new()),
    };
    let proxy = match proxy {
        Ok(p) => p,
        Err(missing) => {
            report.checks.push(not_installed(missing, args));
            return Ok(report);
        }
    };
    if let Some(why) = proxy
        .bindings
        .as_ref()
        .ok()
        .and_then(|b| issuer::unbound_fic_lists(fics, b))
    {
        return Err(StartError::usage(why));
    }
    report.checks.extend(proxy::checks(cluster, &proxy).await);
    let ca_name = webhook::ca_configmap_name(&proxy, &webhook);
    let mut webhook_checks = webhook::checks(client, &proxy, &webhook, &workloads, args).await;
    if let Some(pods) = webhook_checks.iter_mut().find(|c| c.id == "webhook.pods") {
        pods.details.extend(sidecar_served);
    }
    report.checks.extend(webhook_checks);
    report
        .checks
        .extend(grants::checks(cluster, &proxy, &workloads).await);
    report
        .checks
        .extend(tls::checks(client, &proxy, &workloads, ca_name.as_deref()).await);
    let published = issuer::fetch_all(&proxy, outbound, timeout).await;
    report
        .checks
        .extend(issuer::checks(&proxy, &published, fleet));
    report
        .checks
        .extend(fleet::check(&proxy, fleet, &published));
    report.checks.push(issuer::fic_check(&proxy, fics));
    report
        .checks
        .push(issuer::clock_check(client, &published).await);
    Ok(report)
}

/// `proxy.installed`: ✘ with the install command when the DaemonSet is absent, ? when it
/// could not be read.
fn not_installed(missing: install::NoProxy, args: &DoctorArgs) -> Check {
    const ID: &str = "proxy.installed";
    match missing {
        install::NoProxy::Unreadable(why) => Check::unknown(ID, why),
        install::NoProxy::Absent(why) => Check::fail(
            ID,
            why,
            format!(
                "helm install {} charts/identity-binding-proxy --namespace {}   \
                 # docs/installation.md",
                args.release, args.namespace
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::startup::Kind;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status {
                code,
                message: "refused".into(),
                ..Default::default()
            }
            .boxed(),
        )
    }

    #[test]
    fn refused_credentials_are_a_usage_error_and_a_failing_apiserver_unavailable() {
        for code in [401, 403] {
            let e = apiserver_refusal(&api_error(code));
            assert_eq!(e.kind(), Kind::Usage, "{code}");
            assert_eq!(e.exit_code(), 64);
            assert!(e.message().contains("credentials"), "{}", e.message());
        }
        for code in [500, 503, 504] {
            let e = apiserver_refusal(&api_error(code));
            assert_eq!(e.kind(), Kind::Unavailable, "{code}");
            assert_eq!(e.exit_code(), 69);
        }
    }
}
