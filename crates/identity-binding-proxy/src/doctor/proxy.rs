//! The proxy on the cluster: a Ready pod on every node its DaemonSet should run on, a local
//! endpoint of its Service on each (the Service is node-local), the RBAC `serve` needs, and
//! what its own `/readyz` and `/metrics` say (read through the apiserver's pod proxy).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, PostParams};
use kube::Api;

use crate::cluster::Cluster;
use crate::doctor::install::Proxy;
use crate::doctor::report::Check;
use crate::doctor::report::{why, Unchecked};

pub async fn checks(cluster: &Cluster, proxy: &Proxy) -> Vec<Check> {
    let client = cluster.client();
    let pods = proxy_pods(client, proxy).await;
    let (nodes, ready_nodes) = match &pods {
        Ok(pods) => (
            expected_nodes(client, proxy).await,
            pods.iter()
                .filter(|p| is_ready(p))
                .filter_map(|p| p.spec.as_ref()?.node_name.clone())
                .collect::<BTreeSet<_>>(),
        ),
        Err(e) => (Err(e.clone()), BTreeSet::new()),
    };
    let all = pods.as_deref().unwrap_or_default();
    let mut out = vec![nodes_check(proxy, &nodes, &ready_nodes, all)];
    out.push(endpoints_check(client, proxy, &ready_nodes).await);
    out.push(rbac_check(client, proxy).await);
    out.push(health_check(client, proxy, pods.as_deref().unwrap_or_default()).await);
    out
}

async fn proxy_pods(client: &kube::Client, proxy: &Proxy) -> Result<Vec<Pod>, Unchecked> {
    let selector = proxy
        .daemonset
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default();
    let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Api::<Pod>::namespaced(client.clone(), &proxy.namespace)
        .list(&ListParams::default().labels(&selector.join(",")))
        .await
        .map(|l| l.items)
        .map_err(|e| why!("listing the proxy's pods: {e}"))
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The schedulable nodes the DaemonSet's nodeSelector picks.
async fn expected_nodes(client: &kube::Client, proxy: &Proxy) -> Result<Vec<String>, Unchecked> {
    let selector = proxy
        .pod_spec()
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&selector.join(",")))
        .await
        .map_err(|e| why!("listing nodes: {e}"))?;
    Ok(nodes
        .items
        .into_iter()
        .filter(|n| {
            !n.spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false)
        })
        .filter_map(|n| n.metadata.name)
        .collect())
}

fn nodes_check(
    proxy: &Proxy,
    nodes: &Result<Vec<String>, Unchecked>,
    ready: &BTreeSet<String>,
    pods: &[Pod],
) -> Check {
    const ID: &str = "proxy.nodes";
    let (ns, name) = (&proxy.namespace, &proxy.name);
    let nodes = match nodes {
        Ok(n) if n.is_empty() => {
            return Check::unknown(
                ID,
                "no schedulable node matches the DaemonSet's nodeSelector",
            )
        }
        Ok(n) => n,
        Err(e) => return Check::unknown(ID, e.clone()),
    };
    let missing: Vec<&String> = nodes.iter().filter(|n| !ready.contains(*n)).collect();
    if missing.is_empty() {
        return Check::pass(
            ID,
            format!(
                "DaemonSet {ns}/{name}: a Ready pod on each of {} node(s)",
                nodes.len()
            ),
        );
    }
    let fix = missing
        .iter()
        .map(|node| node_fix(proxy, node, pods))
        .collect::<Vec<_>>()
        .join("\n");
    Check::fail(
        ID,
        format!(
            "{} of {} node(s) have no Ready proxy pod: pods there cannot get tokens",
            missing.len(),
            nodes.len()
        ),
        fix,
    )
    .with_details(missing.iter().map(|n| format!("node {n}")).collect())
}

/// For a node without a Ready proxy: its pod that is not Ready is replaced (read why first),
/// or, without a pod there, what keeps the DaemonSet off the node.
fn node_fix(proxy: &Proxy, node: &str, pods: &[Pod]) -> String {
    let (ns, name) = (&proxy.namespace, &proxy.name);
    let on_node = pods.iter().find(|p| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && p.metadata.deletion_timestamp.is_none()
    });
    match on_node.and_then(|p| p.metadata.name.as_deref()) {
        Some(pod) => format!(
            "kubectl delete pod -n {ns} {pod}   # the DaemonSet starts a new one; read why it \
             is not Ready first: kubectl describe pod -n {ns} {pod}; kubectl logs -n {ns} {pod}"
        ),
        None => format!(
            "kubectl describe daemonset -n {ns} {name}   # no proxy pod on node {node}: its \
             events name what keeps it off (taints, labels, free resources)"
        ),
    }
}

/// Each node with a Ready proxy has an endpoint of the Service on that node: with
/// `internalTrafficPolicy: Local`, a node without one drops its pods' connections.
async fn endpoints_check(client: &kube::Client, proxy: &Proxy, ready: &BTreeSet<String>) -> Check {
    const ID: &str = "proxy.endpoints";
    let (ns, name) = (&proxy.namespace, &proxy.name);
    let service = match Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Check::fail(
                ID,
                format!("no Service {ns}/{name}: pods cannot reach the proxy"),
                "helm upgrade the chart (it renders the Service)",
            )
        }
        Err(e) => return Check::unknown(ID, format!("reading Service {ns}/{name}: {e}")),
    };
    let policy = service
        .spec
        .and_then(|s| s.internal_traffic_policy)
        .unwrap_or_else(|| "Cluster".into());
    if policy != "Local" {
        return Check::fail(
            ID,
            format!("Service {ns}/{name} has internalTrafficPolicy {policy}: tokens would cross nodes"),
            format!("kubectl patch service -n {ns} {name} -p '{{\"spec\":{{\"internalTrafficPolicy\":\"Local\"}}}}'"),
        );
    }
    if ready.is_empty() {
        return Check::unknown(ID, "no node has a Ready proxy pod to have an endpoint");
    }
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
        .await;
    let slices = match slices {
        Ok(s) => s.items,
        Err(e) => return Check::unknown(ID, format!("listing EndpointSlices: {e}")),
    };
    let with_endpoint: BTreeSet<String> = slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.node_name.clone())
        .collect();
    let missing: Vec<&String> = ready
        .iter()
        .filter(|n| !with_endpoint.contains(*n))
        .collect();
    if missing.is_empty() {
        return Check::pass(
            ID,
            format!(
                "Service {ns}/{name}: a local endpoint on each of {} node(s)",
                ready.len()
            ),
        );
    }
    Check::fail(
        ID,
        format!("{} node(s) with a Ready proxy have no endpoint of Service {ns}/{name}", missing.len()),
        format!("kubectl get endpointslices -n {ns} -l kubernetes.io/service-name={name} -o wide   # the Service's selector must match the DaemonSet's pod labels"),
    )
    .with_details(missing.iter().map(|n| format!("node {n}")).collect())
}

/// What `serve` asks of the apiserver (the chart's ClusterRole): (group, resource, verb), and
/// the non-resource paths it reads.
const NEEDED: [(&str, &str, &str); 14] = [
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
    ("rbac.authorization.k8s.io", "clusterroles", "get"),
    ("rbac.authorization.k8s.io", "clusterroles", "list"),
    ("rbac.authorization.k8s.io", "clusterroles", "watch"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "get"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "list"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "watch"),
    ("rbac.authorization.k8s.io", "roles", "get"),
    ("rbac.authorization.k8s.io", "roles", "list"),
    ("rbac.authorization.k8s.io", "roles", "watch"),
    ("rbac.authorization.k8s.io", "rolebindings", "get"),
    ("rbac.authorization.k8s.io", "rolebindings", "list"),
    ("rbac.authorization.k8s.io", "rolebindings", "watch"),
];
const NEEDED_PATHS: [&str; 2] = ["/openid/v1/jwks", "/.well-known/openid-configuration"];

/// The proxy's service account may do what `serve` needs: one SubjectAccessReview per verb
/// (doctor asks about the proxy's account, not its own).
async fn rbac_check(client: &kube::Client, proxy: &Proxy) -> Check {
    const ID: &str = "proxy.rbac";
    let ns = &proxy.namespace;
    let sa = proxy.service_account();
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let groups = vec![
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".to_string(),
    ];
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    let resources = NEEDED.iter().map(|(g, r, v)| {
        (
            format!("{v} {r}.{g}"),
            Some(ResourceAttributes {
                group: Some(g.to_string()),
                resource: Some(r.to_string()),
                verb: Some(v.to_string()),
                ..Default::default()
            }),
            None,
        )
    });
    let paths = NEEDED_PATHS.iter().map(|p| {
        (
            format!("get {p}"),
            None,
            Some(NonResourceAttributes {
                path: Some(p.to_string()),
                verb: Some("get".into()),
            }),
        )
    });
    for (what, resource_attributes, non_resource_attributes) in resources.chain(paths) {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: Some(groups.clone()),
                resource_attributes,
                non_resource_attributes,
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => missing.push(what),
            Err(e) => return Check::unknown(ID, format!("SubjectAccessReview: {e}")),
        }
    }
    if missing.is_empty() {
        return Check::pass(
            ID,
            format!(
                "{user} may do all {} things serve needs",
                NEEDED.len() + NEEDED_PATHS.len()
            ),
        );
    }
    Check::fail(
        ID,
        format!("{user} lacks {} permission(s) serve needs", missing.len()),
        rbac_fix(client, proxy).await,
    )
    .with_details(missing)
}

/// Binds the chart's ClusterRole when only its binding is gone; otherwise (the ClusterRole
/// gone or short of rules, the binding naming another account) upgrading the release
/// restores both as the chart has them.
async fn rbac_fix(client: &kube::Client, proxy: &Proxy) -> String {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let name = &proxy.name;
    let role = Api::<ClusterRole>::all(client.clone()).get_opt(name).await;
    let binding = Api::<ClusterRoleBinding>::all(client.clone())
        .get_opt(name)
        .await;
    if let (Ok(Some(_)), Ok(None)) = (&role, &binding) {
        return format!(
            "kubectl create clusterrolebinding {name} --clusterrole={name} \
             --serviceaccount={}:{}   # the chart's ClusterRole {name} holds exactly these rules",
            proxy.namespace,
            proxy.service_account()
        );
    }
    let release = proxy
        .daemonset
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("meta.helm.sh/release-name"))
        .map_or("<release>", String::as_str);
    format!(
        "helm upgrade {release} charts/identity-binding-proxy --namespace {} --reuse-values   \
         # restores the chart's ClusterRole {name} and its ClusterRoleBinding",
        proxy.namespace
    )
}

/// `/readyz` and `/metrics` of each proxy pod, through the apiserver's pod proxy.
async fn health_check(client: &kube::Client, proxy: &Proxy, pods: &[Pod]) -> Check {
    const ID: &str = "proxy.health";
    let port = proxy
        .setting("IBP_ADMIN_LISTEN")
        .and_then(|a| a.rsplit(':').next())
        .unwrap_or("9090")
        .to_string();
    let ns = &proxy.namespace;
    let mut not_ready = Vec::new();
    let mut details = Vec::new();
    let mut reached = 0;
    let mut unreachable = Vec::new();
    let mut totals = BTreeMap::<String, f64>::new();
    for pod in pods.iter().filter(|p| is_ready(p)) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let base = format!("/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy");
        match get(client, &format!("{base}/readyz")).await {
            Ok(_) => reached += 1,
            Err(Reach::Status(s)) => {
                reached += 1;
                not_ready.push(format!("pod {name}: /readyz answered {s}"));
                continue;
            }
            Err(Reach::Failed(e)) => {
                unreachable.push(format!("pod {name}: {e}"));
                continue;
            }
        }
        if let Ok(text) = get(client, &format!("{base}/metrics")).await {
            for (k, v) in summarise_metrics(&text) {
                // Counts add up over the pods; days left: the fewest.
                let days = k.starts_with("days left");
                let entry = totals.entry(k).or_insert(if days { f64::MAX } else { 0.0 });
                *entry = if days { entry.min(v) } else { *entry + v };
            }
        }
    }
    for (k, v) in &totals {
        details.push(format!("{k}: {v}"));
    }
    if !not_ready.is_empty() {
        not_ready.extend(details);
        return Check::fail(
            ID,
            format!("{} proxy pod(s) are not ready", not_ready.len()),
            format!("kubectl logs -n {ns} <pod>   # /readyz waits for certificates, the cluster JWKS and the bindings"),
        )
        .with_details(not_ready);
    }
    if reached == 0 {
        let why = unreachable
            .first()
            .cloned()
            .unwrap_or_else(|| "no Ready proxy pod".into());
        return Check::unknown(
            ID,
            format!("/readyz not reachable through the apiserver's pod proxy: {why}"),
        );
    }
    Check::pass(
        ID,
        format!("{reached} proxy pod(s) ready through the apiserver's pod proxy"),
    )
    .with_details(details)
}

enum Reach {
    Status(u16),
    Failed(String),
}

/// Largest `/readyz` or `/metrics` body doctor reads.
const BODY_LIMIT: usize = 8 << 20;

/// GETs `path` through the apiserver. A failure answered with a Kubernetes `Status` is the
/// apiserver's (the pod could not be reached); any other is the pod's own answer.
async fn get(client: &kube::Client, path: &str) -> Result<String, Reach> {
    use http_body_util::BodyExt;
    let req = http::Request::get(path)
        .body(kube::client::Body::from(Vec::new()))
        .map_err(|e| Reach::Failed(e.to_string()))?;
    let resp = client
        .send(req)
        .await
        .map_err(|e| Reach::Failed(e.to_string()))?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| Reach::Failed(format!("reading the answer: {e}")))?
        .to_bytes();
    if status.is_success() {
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    Err(reach_error(status.as_u16(), &body))
}

fn reach_error(code: u16, body: &[u8]) -> Reach {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) if v["kind"] == "Status" && v["apiVersion"] == "v1" => Reach::Failed(format!(
            "{} ({code})",
            v["message"].as_str().unwrap_or("no message")
        )),
        _ => Reach::Status(code),
    }
}

/// The errors the metrics count: Entra's answers other than 200 by status, failed reviews,
/// handshake failures, and the serving certificates' expiry.
pub fn summarise_metrics(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        let label = |key: &str| {
            series
                .split(&format!("{key}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        match name {
            "identity_binding_proxy_entra_requests_total"
                if label("status") != "200" && value > 0.0 =>
            {
                out.push((format!("Entra answers {}", label("status")), value))
            }
            "identity_binding_proxy_entra_refusals_total" if value > 0.0 => {
                out.push((format!("Entra refusals AADSTS{}", label("aadsts")), value))
            }
            "identity_binding_proxy_kube_reviews_total"
                if label("result") == "error" && value > 0.0 =>
            {
                out.push((format!("{} failures", label("kind")), value))
            }
            "identity_binding_proxy_tls_handshake_failures_total" if value > 0.0 => out.push((
                format!("TLS handshake failures ({})", label("reason")),
                value,
            )),
            "identity_binding_proxy_certificate_expiry_timestamp_seconds" => out.push((
                format!("days left on the certificate for {}", label("sni")),
                ((value - now) / 86_400.0).floor(),
            )),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubernetes_status_is_the_apiservers_failure_any_other_body_the_pods_answer() {
        let status = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"no endpoints available for service","code":503}"#;
        assert!(
            matches!(reach_error(503, status), Reach::Failed(m) if m == "no endpoints available for service (503)")
        );
        assert!(matches!(
            reach_error(503, b"not ready: issuer key"),
            Reach::Status(503)
        ));
        assert!(matches!(
            reach_error(500, br#"{"error":"x"}"#),
            Reach::Status(500)
        ));
    }

    #[test]
    fn metrics_are_summarised_as_errors_by_kind_and_days_left() {
        let in_ten_days = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 10 * 86_400
            + 3_600;
        let text = format!(
            "# HELP x\n\
             identity_binding_proxy_entra_requests_total{{status=\"200\"}} 40\n\
             identity_binding_proxy_entra_requests_total{{status=\"400\"}} 3\n\
             identity_binding_proxy_entra_requests_total{{status=\"429\"}} 0\n\
             identity_binding_proxy_entra_refusals_total{{aadsts=\"7002138\"}} 3\n\
             identity_binding_proxy_entra_refusals_total{{aadsts=\"70021\"}} 0\n\
             identity_binding_proxy_kube_reviews_total{{kind=\"subjectaccessreview\",result=\"error\"}} 2\n\
             identity_binding_proxy_kube_reviews_total{{kind=\"tokenreview\",result=\"allowed\"}} 9\n\
             identity_binding_proxy_certificate_expiry_timestamp_seconds{{sni=\"a.internal\"}} {in_ten_days}\n"
        );
        let summary = summarise_metrics(&text);
        assert_eq!(
            summary,
            vec![
                ("Entra answers 400".to_string(), 3.0),
                ("Entra refusals AADSTS7002138".to_string(), 3.0),
                ("subjectaccessreview failures".to_string(), 2.0),
                (
                    "days left on the certificate for a.internal".to_string(),
                    10.0
                ),
            ]
        );
    }
}
