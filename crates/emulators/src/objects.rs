//! The kube-apiserver emulator's other objects: a read-only set of ordinary Kubernetes objects
//! (Pods, Nodes, Services, ConfigMaps, Secrets, ServiceAccounts, DaemonSets, Deployments,
//! EndpointSlices) that `dev` describes itself with, so `doctor` sees it as a cluster. GET of
//! one object or a list (equality label selectors), and the pod proxy to a pod's loopback port.

use std::sync::RwLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Response as HttpResponse, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use identity_binding_proxy::http::client::{client, fetch};
use identity_binding_proxy::http::response as h;

type Response = HttpResponse<h::Body>;

/// The objects, replaced whole by [`Objects::set`].
#[derive(Default)]
pub struct Objects(RwLock<Vec<Value>>);

impl Objects {
    pub fn set(&self, objects: Vec<Value>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = objects;
    }

    fn all(&self) -> Vec<Value> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// (group/version as in `apiVersion`, plural, kind, namespaced)
const KINDS: [(&str, &str, &str, bool); 9] = [
    ("v1", "pods", "Pod", true),
    ("v1", "nodes", "Node", false),
    ("v1", "services", "Service", true),
    ("v1", "configmaps", "ConfigMap", true),
    ("v1", "secrets", "Secret", true),
    ("v1", "serviceaccounts", "ServiceAccount", true),
    ("apps/v1", "daemonsets", "DaemonSet", true),
    ("apps/v1", "deployments", "Deployment", true),
    (
        "discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        true,
    ),
];

/// Answers `segs` (the path's segments) when it names one of these kinds, else `None`.
pub async fn serve(objects: &Objects, segs: &[&str], query: Option<&str>) -> Option<Response> {
    let (api_version, rest) = match segs {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    if let ["namespaces", ns, "pods", name_port, "proxy", path @ ..] = rest {
        return Some(pod_proxy(objects, ns, name_port, path).await);
    }
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    let (_, _, kind, namespaced) = KINDS
        .iter()
        .find(|(v, p, _, _)| *v == api_version && *p == plural)?;
    if namespace.is_some() && !namespaced {
        return None;
    }
    let selector = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "labelSelector")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let matching: Vec<Value> = objects
        .all()
        .into_iter()
        .filter(|o| o["kind"] == *kind && o["apiVersion"] == api_version.as_str())
        .filter(|o| namespace.is_none_or(|ns| o["metadata"]["namespace"] == ns))
        .filter(|o| name.is_none_or(|n| o["metadata"]["name"] == n))
        .filter(|o| labels_match(o, &selector))
        .collect();
    Some(match name {
        Some(n) => match matching.into_iter().next() {
            Some(o) => h::json_value(StatusCode::OK, &o),
            None => not_found(&format!("{plural} \"{n}\" not found"), plural, n),
        },
        None => h::json_value(
            StatusCode::OK,
            &json!({"kind": format!("{kind}List"), "apiVersion": api_version,
                "metadata": {"resourceVersion": "1"}, "items": matching}),
        ),
    })
}

/// Equality selectors (`a=b,c==d`), the only kind doctor sends.
fn labels_match(object: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|r| !r.trim().is_empty())
        .all(|r| {
            let (k, v) = r
                .split_once("==")
                .or_else(|| r.split_once('='))
                .unwrap_or((r, ""));
            object["metadata"]["labels"][k.trim()] == v.trim()
        })
}

fn not_found(message: &str, plural: &str, name: &str) -> Response {
    h::json_value(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "NotFound",
            "details": {"name": name, "kind": plural}, "code": 404}),
    )
}

/// `GET .../pods/NAME:PORT/proxy/PATH`: the pod's answer on its own port. Unlike a real
/// apiserver, a pod on a loopback address is proxied to: dev's proxy runs on this machine.
async fn pod_proxy(objects: &Objects, ns: &str, name_port: &str, path: &[&str]) -> Response {
    let (name, port) = name_port.split_once(':').unwrap_or((name_port, "80"));
    let pod = objects.all().into_iter().find(|o| {
        o["kind"] == "Pod" && o["metadata"]["namespace"] == ns && o["metadata"]["name"] == name
    });
    let Some(ip) = pod
        .as_ref()
        .and_then(|p| p["status"]["podIP"].as_str().map(str::to_string))
    else {
        return not_found(&format!("pods \"{name}\" not found"), "pods", name);
    };
    let url = format!("http://{ip}:{port}/{}", path.join("/"));
    let req = http::Request::get(&url).body(Full::new(Bytes::new()));
    let fetched = match req {
        Ok(req) => fetch(&client(), req, Duration::from_secs(5), 4 << 20)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match fetched {
        Ok(f) => h::text(f.status, f.body),
        Err(e) => h::json_value(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("error trying to reach service: {e}"),
                "reason": "ServiceUnavailable", "code": 503}),
        ),
    }
}
