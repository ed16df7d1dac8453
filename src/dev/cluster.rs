//! `dev` described as a cluster, for `doctor`: the objects an installation from the chart
//! would have (the proxy's DaemonSet with the Secrets and ConfigMaps it mounts, its Service,
//! endpoint, node and Ready pod, the webhook's Deployment and settings, the demo workload as
//! the webhook mutates it), holding dev's real files, served by the kube emulator; and the
//! identity's FIC as `az identity federated-credential list` prints it (`fics.json`).

use std::net::SocketAddr;
use std::path::Path;

use base64::Engine;
use serde_json::{json, Value};

use crate::dev::{DevInfo, DEV_SNI_NAME};
use ibp_emulators::entra::Fic;
use identity_binding_proxy::authn::DEFAULT_TOKEN_AUDIENCE;

/// The chart's default names.
const NS: &str = "identity-binding-proxy";
const NAME: &str = "identity-binding-proxy";
const NODE: &str = "dev";
const WEBHOOK_NS: &str = "azure-workload-identity-system";
/// Where the chart mounts the proxy's files.
const ETC: &str = "/etc/identity-binding-proxy";

fn labels() -> Value {
    json!({"app.kubernetes.io/name": NAME})
}

fn read(dir: &Path, file: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(dir.join(file))
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(file).display()))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Every object, from dev's state dir and what it started.
pub fn objects(dir: &Path, info: &DevInfo, admin: SocketAddr) -> anyhow::Result<Vec<Value>> {
    let ca = read(dir, "tls/ca.crt")?;
    let mut objects = proxy_objects(dir, info, admin)?;
    objects.extend(webhook_objects(info));
    objects.extend(workload_objects(info));
    for ns in [NS, "demo"] {
        objects.push(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("{NAME}-ca"), "namespace": ns}, "data": {"ca.crt": ca}}));
    }
    Ok(objects)
}

/// The DaemonSet as the chart renders it (its settings as env), what it mounts, and its pod
/// Ready on the one node, reachable on dev's admin port.
fn proxy_objects(dir: &Path, info: &DevInfo, admin: SocketAddr) -> anyhow::Result<Vec<Value>> {
    let env = json!([
        {"name": "IBP_TLS", "value": format!("{DEV_SNI_NAME}={ETC}/tls/tls.crt,{ETC}/tls/tls.key")},
        {"name": "IBP_ISSUER_KEY", "value": format!("{ETC}/issuer/issuer.key")},
        {"name": "IBP_BINDINGS", "value": format!("{ETC}/bindings/bindings.yaml")},
        {"name": "IBP_ISSUER_URL", "value": info.issuer_url},
        {"name": "IBP_TOKEN_AUDIENCE", "value": info.token_audience},
        {"name": "IBP_ADMIN_LISTEN", "value": admin.to_string()},
    ]);
    let mounts = json!([
        {"name": "tls", "mountPath": format!("{ETC}/tls"), "readOnly": true},
        {"name": "issuer-key", "mountPath": format!("{ETC}/issuer"), "readOnly": true},
        {"name": "bindings", "mountPath": format!("{ETC}/bindings"), "readOnly": true},
    ]);
    let spec = json!({
        "serviceAccountName": NAME, "nodeSelector": {"kubernetes.io/os": "linux"},
        "containers": [{"name": "proxy", "image": "identity-binding-proxy", "env": env, "volumeMounts": mounts}],
        "volumes": [
            {"name": "tls", "secret": {"secretName": format!("{NAME}-tls")}},
            {"name": "issuer-key", "secret": {"secretName": format!("{NAME}-issuer-key")}},
            {"name": "bindings", "configMap": {"name": format!("{NAME}-bindings")}},
        ],
    });
    let mut pod_spec = spec.clone();
    pod_spec["nodeName"] = json!(NODE);
    let meta = |name: String| json!({"name": name, "namespace": NS, "labels": labels()});
    Ok(vec![
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta(NAME.into()),
            "spec": {"selector": {"matchLabels": labels()},
                "template": {"metadata": {"labels": labels()}, "spec": spec}}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta(format!("{NAME}-tls")),
            "type": "kubernetes.io/tls", "data": {"tls.crt": b64(&read(dir, "tls/tls.crt")?)}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta(format!("{NAME}-issuer-key")),
            "data": {"issuer.key": b64(&read(dir, "issuer.key")?)}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(format!("{NAME}-bindings")),
            "data": {"bindings.yaml": read(dir, "bindings.yaml")?}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(NAME.into()),
            "spec": {"selector": labels(), "internalTrafficPolicy": "Local",
                "ports": [{"name": "https", "port": 443, "targetPort": "https"}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{NAME}-{NODE}"), "namespace": NS,
                "labels": {"kubernetes.io/service-name": NAME}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"], "nodeName": NODE, "conditions": {"ready": true}}]}),
        json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/os": "linux"}}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta(format!("{NAME}-{NODE}")),
            "spec": pod_spec,
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}),
    ])
}

/// The webhook as deploy/webhook/values.yaml configures it, pointed at the proxy's Service.
fn webhook_objects(info: &DevInfo) -> Vec<Value> {
    let labels = json!({"app": "workload-identity-webhook"});
    vec![
        json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "azure-wi-webhook-config", "namespace": WEBHOOK_NS},
        "data": {
            "AZURE_TENANT_ID": info.tenant_id,
            "AZURE_KUBERNETES_TOKEN_PROXY": format!("https://{NAME}.{NS}.svc"),
            "AZURE_KUBERNETES_SNI_NAME": DEV_SNI_NAME,
            "AZURE_KUBERNETES_CA_CONFIGMAP_NAME": format!("{NAME}-ca"),
        }}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "azure-wi-webhook-controller-manager", "namespace": WEBHOOK_NS},
            "spec": {"selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [{
                    "name": "manager", "image": "azure-workload-identity-webhook",
                    "args": ["--custom-token-endpoint-annotation-suffix=identity-binding",
                        format!("--custom-token-endpoint-audience={DEFAULT_TOKEN_AUDIENCE}")],
                    "envFrom": [{"configMapRef": {"name": "azure-wi-webhook-config"}}]}]}}}}),
    ]
}

/// The demo workload: ServiceAccount demo/demo and its pod, mutated by the webhook (the
/// variables of `env`, with the token of `tokens/allowed.jwt`).
fn workload_objects(info: &DevInfo) -> Vec<Value> {
    let env: Vec<Value> = [
        ("AZURE_CLIENT_ID", info.client_id.clone()),
        ("AZURE_TENANT_ID", info.tenant_id.clone()),
        ("AZURE_AUTHORITY_HOST", info.authority_host.clone()),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            info.allowed_token_file.display().to_string(),
        ),
        ("AZURE_KUBERNETES_TOKEN_PROXY", info.proxy_url.clone()),
        ("AZURE_KUBERNETES_SNI_NAME", info.sni_name.clone()),
        (
            "AZURE_KUBERNETES_CA_FILE",
            info.ca_file.display().to_string(),
        ),
    ]
    .into_iter()
    .map(|(name, value)| json!({"name": name, "value": value}))
    .collect();
    let use_label = json!({"azure.workload.identity/use": "true"});
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "demo", "namespace": "demo", "labels": use_label,
                "annotations": {"azure.workload.identity/client-id": info.client_id}}}),
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "demo-pod", "namespace": "demo", "labels": use_label,
                "annotations": {"azure.workload.identity/use-identity-binding": "true"}},
            "spec": {"serviceAccountName": "demo", "nodeName": NODE,
                "containers": [{"name": "app", "image": "app", "env": env}]}}),
    ]
}

/// The FICs of each identity as `az identity federated-credential list -o json` prints them.
pub fn fic_list(fics: &[Fic]) -> Value {
    fics.iter()
        .map(|f| {
            json!({
                "audiences": [f.audience],
                "id": format!("/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/dev/providers/Microsoft.ManagedIdentity/userAssignedIdentities/dev-identity/federatedIdentityCredentials/{}", f.name),
                "issuer": f.issuer,
                "name": f.name,
                "resourceGroup": "dev",
                "subject": f.subject,
                "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
            })
        })
        .collect()
}
