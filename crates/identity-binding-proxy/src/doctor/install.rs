//! The installation as the cluster holds it: the proxy's DaemonSet and the settings, bindings,
//! keys and certificates it mounts (read through the DaemonSet's own volumes, so any way of
//! installing it is read the same way), the webhook's settings, and the opted-in pods.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodSpec, Secret, ServiceAccount};
use kube::api::ListParams;
use kube::Api;

use crate::authn::DEFAULT_TOKEN_AUDIENCE;
use crate::cli::DoctorArgs;
use crate::doctor::report::{why, Unchecked};
use crate::exchange::bindings::{Binding, BindingSet};
use crate::serve::tls::TlsEntry;

/// The label every workload identity pod carries, and the annotation prefix of the opt-in.
pub const USE_LABEL: &str = "azure.workload.identity/use";
pub const CLIENT_ID_ANNOTATION: &str = "azure.workload.identity/client-id";
/// The chart's name: objects are named after the release, or `<release>-<chart>`.
const CHART: &str = "identity-binding-proxy";
/// What the webhook injects into a mutated pod for identity binding.
pub const INJECTED: [&str; 3] = [
    "AZURE_KUBERNETES_TOKEN_PROXY",
    "AZURE_KUBERNETES_SNI_NAME",
    "AZURE_FEDERATED_TOKEN_FILE",
];

/// The proxy as installed.
pub struct Proxy {
    pub namespace: String,
    /// The chart's object name (DaemonSet, Service, `<name>-ca`, ...).
    pub name: String,
    pub daemonset: DaemonSet,
    /// `IBP_*` settings of the proxy container: its env over its envFrom ConfigMaps.
    pub env: BTreeMap<String, String>,
    pub tls: Vec<TlsEntry>,
    pub bindings: Result<Vec<Binding>, Unchecked>,
    /// The issuer keys' PEM, in `IBP_ISSUER_KEY` order (the last one signs).
    pub issuer_keys: Result<Vec<String>, Unchecked>,
    /// The serving certificate PEM per SNI name.
    pub certs: Vec<(String, Result<String, Unchecked>)>,
    /// `ca.crt` of `<name>-ca` in the proxy's namespace: what client pods should trust.
    pub ca_bundle: Result<String, Unchecked>,
}

impl Proxy {
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.env
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub fn audience(&self) -> &str {
        self.setting("IBP_TOKEN_AUDIENCE")
            .unwrap_or(DEFAULT_TOKEN_AUDIENCE)
    }

    pub fn ca_configmap(&self) -> String {
        format!("{}-ca", self.name)
    }

    /// The commands that copy the proxy's CA bundle into ConfigMap `name` of each namespace
    /// (created or replaced), one per line.
    pub fn copy_ca_bundle(&self, name: &str, namespaces: &[&str]) -> String {
        namespaces
            .iter()
            .map(|ns| {
                format!(
                    "kubectl create configmap {name} -n {ns} --from-literal=ca.crt=\"$(kubectl get configmap {src} -n {pns} -o jsonpath='{{.data.ca\\.crt}}')\" \
                     --dry-run=client -o yaml | kubectl apply -f -",
                    src = self.ca_configmap(),
                    pns = self.namespace
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn pod_spec(&self) -> Option<&PodSpec> {
        self.daemonset.spec.as_ref()?.template.spec.as_ref()
    }

    pub fn service_account(&self) -> String {
        self.pod_spec()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into())
    }
}

pub fn object_name(release: &str) -> String {
    if release.contains(CHART) {
        release.to_string()
    } else {
        format!("{release}-{CHART}")
    }
}

/// Why there is no proxy to check.
pub enum NoProxy {
    /// The apiserver says there is no such DaemonSet.
    Absent(Unchecked),
    /// The DaemonSet could not be read (forbidden, unreachable, ...).
    Unreadable(Unchecked),
}

/// Reads the proxy's DaemonSet and everything it mounts.
pub async fn read_proxy(client: &kube::Client, args: &DoctorArgs) -> Result<Proxy, NoProxy> {
    let ns = &args.namespace;
    let name = object_name(&args.release);
    let daemonset = Api::<DaemonSet>::namespaced(client.clone(), ns)
        .get_opt(&name)
        .await
        .map_err(|e| NoProxy::Unreadable(why!("reading DaemonSet {ns}/{name}: {e}")))?
        .ok_or_else(|| {
            NoProxy::Absent(why!(
                "no DaemonSet {ns}/{name}: install the chart, or name the installation with \
                 --namespace and --release"
            ))
        })?;
    let spec = daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .unwrap_or_default();
    let container = spec
        .containers
        .iter()
        .find(|c| c.name == "proxy")
        .or(spec.containers.first())
        .cloned()
        .unwrap_or_default();
    let env = container_env(client, ns, &container).await;
    let files = Files {
        client,
        ns,
        spec: &spec,
        container: &container,
    };
    let tls: Vec<TlsEntry> = env
        .get("IBP_TLS")
        .map(|v| v.split(';').filter_map(|e| e.parse().ok()).collect())
        .unwrap_or_default();
    let mut certs = Vec::new();
    for entry in &tls {
        certs.push((
            entry.name.clone(),
            files.read(&entry.cert.to_string_lossy()).await,
        ));
    }
    let bindings = files.bindings(env.get("IBP_BINDINGS")).await;
    let issuer_keys = files.issuer_keys(env.get("IBP_ISSUER_KEY")).await;
    let ca_bundle = configmap_key(client, ns, &format!("{name}-ca"), "ca.crt").await;
    Ok(Proxy {
        namespace: ns.clone(),
        name,
        daemonset,
        env,
        tls,
        bindings,
        issuer_keys,
        certs,
        ca_bundle,
    })
}

/// The container's literal env over the ConfigMaps it takes whole (`envFrom`).
async fn container_env(
    client: &kube::Client,
    ns: &str,
    container: &Container,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for from in container.env_from.iter().flatten() {
        if let Some(cm) = &from.config_map_ref {
            let got = Api::<ConfigMap>::namespaced(client.clone(), ns)
                .get_opt(&cm.name)
                .await;
            if let Ok(Some(cm)) = got {
                let prefix = from.prefix.clone().unwrap_or_default();
                for (k, v) in cm.data.unwrap_or_default() {
                    env.insert(format!("{prefix}{k}"), v);
                }
            }
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(v) = &var.value {
            env.insert(var.name.clone(), v.clone());
        }
    }
    env
}

/// Files the proxy container reads, found through its volume mounts.
struct Files<'a> {
    client: &'a kube::Client,
    ns: &'a str,
    spec: &'a PodSpec,
    container: &'a Container,
}

impl Files<'_> {
    /// The bindings file `IBP_BINDINGS` names, parsed, by client id.
    async fn bindings(&self, path: Option<&String>) -> Result<Vec<Binding>, Unchecked> {
        let path = path.ok_or("the proxy has no IBP_BINDINGS")?;
        let set = BindingSet::parse(&self.read(path).await?)?;
        let mut all: Vec<Binding> = set.iter().cloned().collect();
        all.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        Ok(all)
    }

    /// The PEM of each key file `IBP_ISSUER_KEY` names, in order.
    async fn issuer_keys(&self, paths: Option<&String>) -> Result<Vec<String>, Unchecked> {
        let paths = paths.ok_or("the proxy has no IBP_ISSUER_KEY")?;
        let mut keys = Vec::new();
        for path in paths.split(',') {
            keys.push(self.read(path.trim()).await?);
        }
        Ok(keys)
    }

    /// The content of `path` as the container sees it: the Secret or ConfigMap key mounted
    /// there.
    async fn read(&self, path: &str) -> Result<String, Unchecked> {
        let mount = self
            .container
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| path.starts_with(&format!("{}/", m.mount_path.trim_end_matches('/'))))
            .max_by_key(|m| m.mount_path.len())
            .ok_or_else(|| why!("{path} is on no volume of the proxy container"))?;
        let key = path[mount.mount_path.trim_end_matches('/').len() + 1..].to_string();
        let volume = self
            .spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .ok_or_else(|| why!("volume {} is not defined", mount.name))?;
        if let Some(secret) = volume.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            return secret_key(self.client, self.ns, &secret, &key).await;
        }
        if let Some(cm) = &volume.config_map {
            return configmap_key(self.client, self.ns, &cm.name, &key).await;
        }
        Err(why!(
            "{path} is on volume {}, neither a Secret nor a ConfigMap",
            mount.name
        ))
    }
}

pub async fn configmap_key(
    client: &kube::Client,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<String, Unchecked> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| why!("reading ConfigMap {ns}/{name}: {e}"))?
        .ok_or_else(|| why!("no ConfigMap {ns}/{name}"))?;
    cm.data
        .and_then(|mut d| d.remove(key))
        .ok_or_else(|| why!("ConfigMap {ns}/{name} has no key {key}"))
}

async fn secret_key(
    client: &kube::Client,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<String, Unchecked> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| why!("reading Secret {ns}/{name}: {e}"))?
        .ok_or_else(|| why!("no Secret {ns}/{name}"))?;
    let bytes = secret
        .data
        .and_then(|mut d| d.remove(key))
        .ok_or_else(|| why!("Secret {ns}/{name} has no key {key}"))?;
    String::from_utf8(bytes.0).map_err(|_| why!("Secret {ns}/{name} key {key} is not text"))
}

/// The webhook's settings: its Deployment's args and the ConfigMap it takes its env from.
pub struct Webhook {
    pub namespace: String,
    pub deployment: String,
    pub args: Vec<String>,
    pub config: BTreeMap<String, String>,
}

impl Webhook {
    /// The value of `--flag=value` (or `--flag value`) among the args.
    pub fn arg(&self, flag: &str) -> Option<&str> {
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
                return Some(v);
            }
            if a == flag {
                return it.next().map(String::as_str);
            }
        }
        None
    }
}

pub async fn read_webhook(client: &kube::Client, args: &DoctorArgs) -> Result<Webhook, Unchecked> {
    let (ns, name) = (&args.webhook_namespace, &args.webhook_deployment);
    let deployment = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| why!("reading Deployment {ns}/{name}: {e}"))?
        .ok_or_else(|| {
            format!(
                "no webhook Deployment {ns}/{name} (name it with --webhook-namespace and \
                 --webhook-deployment)"
            )
        })?;
    let container = deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .unwrap_or_default();
    let config = container_env(client, ns, &container).await;
    Ok(Webhook {
        namespace: ns.clone(),
        deployment: name.clone(),
        args: container.args.unwrap_or_default(),
        config,
    })
}

/// An opted-in pod, as far as doctor needs it.
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// From the pod's AZURE_CLIENT_ID, else its service account's annotation.
    pub client_id: Option<String>,
    /// The names of the env variables its containers carry.
    pub env: BTreeSet<String>,
    /// Who owns it (`ReplicaSet/web-5d9c`), for the restart command.
    pub owner: Option<(String, String)>,
    /// Served by a proxy sidecar of its own (sidecar mode), not by the DaemonSet.
    pub sidecar: bool,
}

/// The pods labelled for workload identity AND annotated for identity binding.
pub async fn read_workloads(
    client: &kube::Client,
    args: &DoctorArgs,
) -> Result<Vec<Workload>, Unchecked> {
    let params = ListParams::default().labels(&format!("{USE_LABEL}=true"));
    let mut pods = Vec::new();
    if args.workload_namespaces.is_empty() {
        pods = list_pods(Api::all(client.clone()), &params).await?;
    } else {
        for ns in &args.workload_namespaces {
            pods.extend(list_pods(Api::namespaced(client.clone(), ns), &params).await?);
        }
    }
    let annotation = format!("{USE_LABEL}-{}", args.annotation_suffix);
    let mut workloads = Vec::new();
    for pod in pods {
        let opted_in = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(&annotation))
            .is_some_and(|v| v == "true");
        if opted_in {
            workloads.push(workload(client, pod).await);
        }
    }
    workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(workloads)
}

async fn list_pods(api: Api<Pod>, params: &ListParams) -> Result<Vec<Pod>, Unchecked> {
    api.list(params)
        .await
        .map(|l| l.items)
        .map_err(|e| why!("listing pods: {e}"))
}

async fn workload(client: &kube::Client, pod: Pod) -> Workload {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod.spec.unwrap_or_default();
    let service_account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let mut env = BTreeSet::new();
    let mut client_id = None;
    let mut sidecar = false;
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        sidecar |= c.args.iter().flatten().any(|a| a == "--sidecar");
        for var in c.env.iter().flatten() {
            sidecar |= var.name == "IBP_SIDECAR" || var.name == "IBP_SIDECAR_CA_OUT";
            if var.name == "AZURE_CLIENT_ID" && client_id.is_none() {
                client_id = var.value.clone();
            }
            env.insert(var.name.clone());
        }
    }
    if client_id.is_none() {
        let sa = Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
            .get_opt(&service_account)
            .await;
        client_id = sa
            .ok()
            .flatten()
            .and_then(|sa| sa.metadata.annotations)
            .and_then(|mut a| a.remove(CLIENT_ID_ANNOTATION));
    }
    let owner = pod
        .metadata
        .owner_references
        .and_then(|o| o.into_iter().next())
        .map(|o| (o.kind, o.name));
    Workload {
        namespace,
        name: pod.metadata.name.unwrap_or_default(),
        service_account,
        client_id,
        env,
        owner,
        sidecar,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_named_as_the_chart_names_them() {
        assert_eq!(
            object_name("identity-binding-proxy"),
            "identity-binding-proxy"
        );
        assert_eq!(object_name("ibp"), "ibp-identity-binding-proxy");
        assert_eq!(
            object_name("prod-identity-binding-proxy"),
            "prod-identity-binding-proxy"
        );
    }
}
