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
    let fleet = args
        .fleet
        .as_deref()
        .map(crate::cli::fleet::load)
        .transpose()?;
    let cluster = Cluster::connect(args.kubeconfig.as_deref(), DEFAULT_WATCH_TIMEOUT).await?;
    if let Err(e) = cluster.client().apiserver_version().await {
        return Err(StartError::unavailable(format!(
            "the Kubernetes API server could not be reached: {e}"
        )));
    }
    let fleet = args.fleet.as_deref().zip(fleet.as_ref());
    let report = checks(&cluster, args, &fics, fleet).await;
    match args.output {
        DoctorOutput::Text => print!("{}", report.text()),
        DoctorOutput::Json => println!("{}", report.json()),
    }
    Ok(if report.failed() { EXIT_FAILED } else { 0 })
}

/// Every check, in the order a request meets the pieces: the proxy, the webhook and the pods,
/// the grants, TLS, the issuer, the FICs, the clocks.
async fn checks(
    cluster: &Cluster,
    args: &DoctorArgs,
    fics: &issuer::FicLists,
    fleet: Option<(&std::path::Path, &crate::cli::fleet::Fleet)>,
) -> Report {
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
        Err(why) => {
            report.checks.push(Check::fail(
                "proxy.installed",
                why,
                format!(
                    "helm install {} charts/identity-binding-proxy --namespace {}   \
                     # docs/installation.md",
                    args.release, args.namespace
                ),
            ));
            return report;
        }
    };
    report.checks.extend(proxy::checks(cluster, &proxy).await);
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
        .extend(tls::checks(client, &proxy, &workloads).await);
    let published = issuer::fetch_all(&proxy, args.issuer_ca_file.as_deref(), timeout).await;
    report.checks.extend(issuer::checks(&proxy, &published));
    report
        .checks
        .extend(fleet::check(&proxy, fleet, &published));
    report.checks.push(issuer::fic_check(&proxy, fics));
    report
        .checks
        .push(issuer::clock_check(client, &published).await);
    report
}
