//! The workload identity webhook: its settings agree with the proxy's (the annotation pods opt
//! in with, the token audience, the proxy URL, the SNI name, where the CA comes from); the CA
//! ConfigMap it projects exists in every namespace with an opted-in pod; and every opted-in pod
//! was actually mutated (a pod created before the webhook was configured is not).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;

use crate::cli::DoctorArgs;
use crate::doctor::install::{Proxy, Webhook, Workload, INJECTED, USE_LABEL};
use crate::doctor::report::Check;
use crate::doctor::report::Unchecked;

const SUFFIX_FLAG: &str = "--custom-token-endpoint-annotation-suffix";
const AUDIENCE_FLAG: &str = "--custom-token-endpoint-audience";

pub async fn checks(
    client: &kube::Client,
    proxy: &Proxy,
    webhook: &Result<Webhook, Unchecked>,
    workloads: &Result<Vec<Workload>, Unchecked>,
    args: &DoctorArgs,
) -> Vec<Check> {
    let settings = match webhook {
        Ok(w) => settings_check(proxy, w, args),
        Err(e) => Check::unknown("webhook.settings", e.clone()),
    };
    let ca_name = ca_configmap_name(proxy, webhook);
    let (configmaps, pods) = match (workloads, ca_name) {
        (Ok(_), None) => (
            Check::pass(
                "webhook.ca-configmaps",
                "the webhook injects the CA itself (inline or from a ClusterTrustBundle): no ConfigMap is needed",
            ),
            pods_check(workloads.as_deref().unwrap_or_default(), args),
        ),
        (Ok(w), Some(ca_name)) => (
            configmaps_check(client, proxy, &ca_name, w).await,
            pods_check(w, args),
        ),
        (Err(e), _) => (
            Check::unknown("webhook.ca-configmaps", e.clone()),
            Check::unknown("webhook.pods", e.clone()),
        ),
    };
    vec![settings, configmaps, pods]
}

/// The ConfigMap the webhook projects the CA bundle from (its
/// `AZURE_KUBERNETES_CA_CONFIGMAP_NAME`, else the chart's `<name>-ca`); `None` when it injects
/// the CA itself (inline or from a ClusterTrustBundle).
pub fn ca_configmap_name(proxy: &Proxy, webhook: &Result<Webhook, Unchecked>) -> Option<String> {
    let config = |key: &str| {
        let webhook = webhook.as_ref().ok()?;
        webhook.config.get(key).filter(|v| !v.is_empty()).cloned()
    };
    let ca_name = config("AZURE_KUBERNETES_CA_CONFIGMAP_NAME");
    let inline = ca_name.is_none()
        && (config("AZURE_KUBERNETES_CA_DATA").is_some()
            || config("AZURE_KUBERNETES_CA_CTB_SIGNER_NAME").is_some());
    if inline {
        return None;
    }
    Some(ca_name.unwrap_or_else(|| proxy.ca_configmap()))
}

/// One setting of the webhook that disagrees with the proxy: what, and the Helm value that
/// sets it.
struct Mismatch {
    what: String,
    value: &'static str,
    want: String,
}

/// The webhook's settings that disagree with the proxy's.
fn mismatches(proxy: &Proxy, webhook: &Webhook, args: &DoctorArgs) -> Vec<Mismatch> {
    let mut wrong = Vec::new();
    let mut compare = |have: Option<&str>, want: &str, what: &str, value: &'static str| {
        if have != Some(want) {
            wrong.push(Mismatch {
                what: format!(
                    "{what} is {}, the proxy needs {want}",
                    have.map_or("unset".into(), |h| format!("'{h}'"))
                ),
                value,
                want: want.to_string(),
            });
        }
    };
    compare(
        webhook.arg(SUFFIX_FLAG),
        &args.annotation_suffix,
        &format!("{SUFFIX_FLAG} (pods opt in with {USE_LABEL}-<suffix>)"),
        "annotationSuffix",
    );
    compare(
        webhook.arg(AUDIENCE_FLAG),
        proxy.audience(),
        &format!("{AUDIENCE_FLAG} (the proxy's IBP_TOKEN_AUDIENCE)"),
        "audience",
    );
    let sni = webhook
        .config
        .get("AZURE_KUBERNETES_SNI_NAME")
        .map(String::as_str);
    if !proxy.tls.iter().any(|t| Some(t.name.as_str()) == sni) {
        let want = proxy
            .tls
            .first()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        compare(
            sni,
            &want,
            "AZURE_KUBERNETES_SNI_NAME (a name the proxy serves, IBP_TLS)",
            "azureKubernetesSniName",
        );
    }
    let url = webhook
        .config
        .get("AZURE_KUBERNETES_TOKEN_PROXY")
        .map(String::as_str);
    let service = format!("https://{}.{}.svc", proxy.name, proxy.namespace);
    if !url.is_some_and(|u| {
        u == service
            || u.starts_with(&format!("{service}."))
            || u.starts_with(&format!("{service}:"))
            || u.starts_with(&format!("{service}/"))
    }) {
        compare(
            url,
            &service,
            "AZURE_KUBERNETES_TOKEN_PROXY (the proxy's node-local Service)",
            "azureKubernetesTokenProxy",
        );
    }
    let has_ca = [
        "AZURE_KUBERNETES_CA_CONFIGMAP_NAME",
        "AZURE_KUBERNETES_CA_DATA",
        "AZURE_KUBERNETES_CA_CTB_SIGNER_NAME",
    ]
    .iter()
    .any(|k| webhook.config.get(*k).is_some_and(|v| !v.is_empty()));
    if !has_ca {
        compare(
            None,
            &proxy.ca_configmap(),
            "AZURE_KUBERNETES_CA_CONFIGMAP_NAME (where pods get the CA)",
            "azureKubernetesCAConfigMapName",
        );
    }
    wrong
}

fn settings_check(proxy: &Proxy, webhook: &Webhook, args: &DoctorArgs) -> Check {
    const ID: &str = "webhook.settings";
    let wrong = mismatches(proxy, webhook, args);
    if wrong.is_empty() {
        return Check::pass(
            ID,
            format!(
                "webhook {}/{} agrees with the proxy",
                webhook.namespace, webhook.deployment
            ),
        );
    }
    let sets: Vec<String> = wrong
        .iter()
        .map(|m| format!("--set customTokenEndpoint.{}={}", m.value, m.want))
        .collect();
    Check::fail(
        ID,
        format!("webhook {}/{}: {} setting(s) disagree with the proxy", webhook.namespace, webhook.deployment, wrong.len()),
        format!(
            "helm upgrade workload-identity-webhook azure-workload-identity/workload-identity-webhook \
             --namespace {} --reuse-values {}",
            webhook.namespace,
            sets.join(" ")
        ),
    )
    .with_details(wrong.into_iter().map(|m| m.what).collect())
}

/// The webhook projects the CA ConfigMap from the POD's namespace: without it there, the pod
/// does not start (or trusts nothing).
async fn configmaps_check(
    client: &kube::Client,
    proxy: &Proxy,
    ca_name: &str,
    workloads: &[Workload],
) -> Check {
    const ID: &str = "webhook.ca-configmaps";
    let namespaces: BTreeSet<&str> = workloads.iter().map(|w| w.namespace.as_str()).collect();
    if namespaces.is_empty() {
        return Check::pass(
            ID,
            "no opted-in pods, so no namespace needs the CA ConfigMap",
        );
    }
    let mut missing = Vec::new();
    for ns in &namespaces {
        match Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get_opt(ca_name)
            .await
        {
            Ok(Some(cm))
                if cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get("ca.crt"))
                    .is_some_and(|v| !v.trim().is_empty()) => {}
            Ok(_) => missing.push(*ns),
            Err(e) => return Check::unknown(ID, format!("reading ConfigMap {ns}/{ca_name}: {e}")),
        }
    }
    if missing.is_empty() {
        return Check::pass(
            ID,
            format!(
                "ConfigMap {ca_name} with ca.crt in all {} namespace(s) with opted-in pods",
                namespaces.len()
            ),
        );
    }
    let fix = proxy.copy_ca_bundle(ca_name, &missing);
    Check::fail(
        ID,
        format!(
            "{} namespace(s) with opted-in pods lack ConfigMap {ca_name} (key ca.crt)",
            missing.len()
        ),
        fix,
    )
    .with_details(missing.iter().map(|ns| format!("namespace {ns}")).collect())
}

/// Every opted-in pod carries what the webhook injects; one that does not was created before
/// the webhook (or its settings) and must be recreated.
fn pods_check(workloads: &[Workload], args: &DoctorArgs) -> Check {
    const ID: &str = "webhook.pods";
    let unmutated: Vec<&Workload> = workloads
        .iter()
        .filter(|w| INJECTED.iter().any(|v| !w.env.contains(*v)))
        .collect();
    if unmutated.is_empty() {
        return Check::pass(
            ID,
            format!(
                "all {} opted-in pod(s) ({USE_LABEL}-{}) carry the injected variables",
                workloads.len(),
                args.annotation_suffix
            ),
        );
    }
    let fix = unmutated
        .iter()
        .map(|w| restart_command(w))
        .collect::<Vec<_>>()
        .join("\n");
    Check::fail(
        ID,
        format!("{} opted-in pod(s) lack the webhook's variables (created before the webhook was configured): restart them", unmutated.len()),
        fix,
    )
    .with_details(unmutated.iter().map(|w| {
        let lacking: Vec<&str> = INJECTED.iter().copied().filter(|v| !w.env.contains(*v)).collect();
        format!("pod {}/{}: no {}", w.namespace, w.name, lacking.join(", "))
    }).collect())
}

fn restart_command(w: &Workload) -> String {
    match &w.owner {
        Some((kind, name)) if kind == "ReplicaSet" => {
            // A ReplicaSet's name is its Deployment's plus a hash.
            let deployment = name.rsplit_once('-').map_or(name.as_str(), |(d, _)| d);
            format!(
                "kubectl rollout restart deployment/{deployment} -n {}",
                w.namespace
            )
        }
        Some((kind, name)) if kind == "StatefulSet" || kind == "DaemonSet" => {
            format!(
                "kubectl rollout restart {}/{name} -n {}",
                kind.to_lowercase(),
                w.namespace
            )
        }
        _ => format!(
            "kubectl delete pod {} -n {}   # then create it again",
            w.name, w.namespace
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(owner: Option<(&str, &str)>) -> Workload {
        Workload {
            namespace: "apps".into(),
            name: "web-5d9c-x7k2p".into(),
            service_account: "web".into(),
            client_id: None,
            env: BTreeSet::new(),
            owner: owner.map(|(k, n)| (k.to_string(), n.to_string())),
            sidecar: false,
        }
    }

    #[test]
    fn an_unmutated_pod_is_restarted_through_its_owner() {
        assert_eq!(
            restart_command(&workload(Some(("ReplicaSet", "web-5d9c")))),
            "kubectl rollout restart deployment/web -n apps"
        );
        assert_eq!(
            restart_command(&workload(Some(("StatefulSet", "db")))),
            "kubectl rollout restart statefulset/db -n apps"
        );
        assert!(restart_command(&workload(None))
            .starts_with("kubectl delete pod web-5d9c-x7k2p -n apps"));
    }

    #[test]
    fn webhook_args_are_read_with_and_without_an_equals_sign() {
        let webhook = Webhook {
            namespace: "wh".into(),
            deployment: "d".into(),
            args: vec![
                "--log-level=info".into(),
                format!("{SUFFIX_FLAG}=identity-binding"),
                AUDIENCE_FLAG.into(),
                "api://AKSIdentityBinding".into(),
            ],
            config: Default::default(),
        };
        assert_eq!(webhook.arg(SUFFIX_FLAG), Some("identity-binding"));
        assert_eq!(webhook.arg(AUDIENCE_FLAG), Some("api://AKSIdentityBinding"));
        assert_eq!(webhook.arg("--metrics-addr"), None);
    }
}
