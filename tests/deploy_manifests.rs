//! The deployment in `deploy/`, rendered with `kubectl kustomize` exactly as `kubectl apply -k`
//! would, and held to the properties an operator relies on: Pod Security "restricted", a
//! node-local Service, a rollout that never leaves a node without a proxy, RBAC limited to
//! what the proxy calls, a certificate that names the SNI and the Service, and webhook
//! settings that point at all of it. Schema validity is `deploy/check.sh`'s job.
//!
//! The Helm chart (charts/identity-binding-proxy) is held to the same properties with each of
//! its ci/ value sets, and to its own: a values.schema.json that names a wrong value, the
//! kustomize manifests as its exact rendering, the alert rules as its PrometheusRule.
//!
//! Needs `kubectl` on the PATH, and helm (the pinned build of `scripts/real-cluster.sh build
//! helm`, or $HELM); without them these tests fail, they do not skip.

#![forbid(unsafe_code)]

#[path = "common/cli_defaults.rs"]
mod cli_defaults;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use cli_defaults::serve_default;
use serde::Deserialize;
use serde_json::Value;

const NAMESPACE: &str = "identity-binding-proxy";
const PROXY: &str = "identity-binding-proxy";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize DIR`, parsed into one JSON value per object.
fn render(dir: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running `kubectl kustomize {}`: {e} (kubectl must be installed)",
                dir.display()
            )
        });
    assert!(
        out.status.success(),
        "`kubectl kustomize {}` failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kustomize prints UTF-8");
    parse_docs(&text)
}

/// A multi-document YAML stream, one JSON value per object.
fn parse_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| {
            let yaml = serde_norway::Value::deserialize(doc).expect("valid YAML");
            serde_json::to_value(yaml).expect("Kubernetes objects are JSON-compatible")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn overlay_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/overlays"))
        .expect("deploy/overlays exists")
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no overlays under deploy/overlays");
    dirs
}

/// Every rendering: the base and each overlay, named for messages.
fn renderings() -> Vec<(String, Vec<Value>)> {
    let mut all = vec![(
        "deploy/base".to_string(),
        render(&repo().join("deploy/base")),
    )];
    for dir in overlay_dirs() {
        let name = dir
            .strip_prefix(repo())
            .unwrap_or(&dir)
            .display()
            .to_string();
        all.push((name, render(&dir)));
    }
    // The Helm chart, with each value set deploy/check.sh validates: held to the same
    // properties as the kustomize manifests.
    for values in chart_value_sets() {
        let name = format!("{CHART} with {}", values.display());
        all.push((
            name,
            parse_docs(&helm_template(&["-f", &values.to_string_lossy()])),
        ));
    }
    // The chart as a workload chart's dependency, its sidecar in the workload's pods.
    all.push((WORKLOAD_CHART.to_string(), workload_template(&[])));
    all
}

/// The rendering that installs the proxy with its certificate.
fn cert_manager() -> Vec<Value> {
    render(&repo().join("deploy/overlays/cert-manager"))
}

fn example_app() -> Vec<Value> {
    render(&repo().join("deploy/overlays/example-app"))
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn named<'a>(docs: &'a [Value], k: &str, name: &str) -> &'a Value {
    kind(docs, k)
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {k} named {name}"))
}

fn name(doc: &Value) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// Every pod spec in a rendering (bare Pods and workload templates), with its owner's name.
fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter_map(|d| match str_of(&d["kind"]) {
            "Pod" => Some((name(d), &d["spec"])),
            "DaemonSet" | "Deployment" | "StatefulSet" | "ReplicaSet" | "Job" => {
                Some((name(d), &d["spec"]["template"]["spec"]))
            }
            "CronJob" => Some((
                name(d),
                &d["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            )),
            _ => None,
        })
        .collect()
}

fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    array(&spec["initContainers"])
        .iter()
        .chain(array(&spec["containers"]))
}

fn daemonset(docs: &[Value]) -> &Value {
    named(docs, "DaemonSet", PROXY)
}

fn proxy_container(docs: &[Value]) -> &Value {
    let spec = &daemonset(docs)["spec"]["template"]["spec"];
    array(&spec["containers"])
        .iter()
        .find(|c| c["name"] == "proxy")
        .expect("the DaemonSet has a container named proxy")
}

/// The proxy's effective `IBP_*` environment: envFrom ConfigMaps, then explicit `env`.
fn proxy_env(docs: &[Value]) -> HashMap<String, String> {
    container_env(docs, proxy_container(docs))
}

/// A container's environment: its envFrom ConfigMaps (from the rendering), then its `env`.
fn container_env(docs: &[Value], container: &Value) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for from in array(&container["envFrom"]) {
        let cm = named(docs, "ConfigMap", str_of(&from["configMapRef"]["name"]));
        for (k, v) in cm["data"].as_object().into_iter().flatten() {
            env.insert(k.clone(), str_of(v).to_string());
        }
    }
    for e in array(&container["env"]) {
        env.insert(str_of(&e["name"]).into(), str_of(&e["value"]).into());
    }
    env
}

/// The SNI names the proxy serves, from `IBP_TLS` (`NAME=CERT,KEY;...`) and `IBP_DEFAULT_SNI`.
fn sni_names(docs: &[Value]) -> BTreeSet<String> {
    let env = proxy_env(docs);
    let tls = env.get("IBP_TLS").expect("IBP_TLS is set");
    let mut names: BTreeSet<String> = tls
        .split(';')
        .map(|e| e.split_once('=').expect("NAME=CERT,KEY").0.to_string())
        .collect();
    names.extend(env.get("IBP_DEFAULT_SNI").cloned());
    names
}

fn port_of(listen: &str) -> u64 {
    listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("ADDR:PORT")
}

/// A probe's or Service's port, resolved through the container's named ports.
fn container_port(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    array(&container["ports"])
        .iter()
        .find(|p| p["name"] == *port)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container has no port named {port}"))
}

#[test]
fn every_pod_and_container_meets_pod_security_restricted() {
    for (rendering, docs) in renderings() {
        for (owner, spec) in pod_specs(&docs) {
            let pod = &spec["securityContext"];
            for c in containers(spec) {
                let sc = &c["securityContext"];
                let at = format!("{rendering}: {owner} container {}", c["name"]);
                let either = |field: &str| {
                    if sc[field].is_null() {
                        &pod[field]
                    } else {
                        &sc[field]
                    }
                };
                assert_eq!(either("runAsNonRoot"), true, "{at}: runAsNonRoot");
                assert_ne!(either("runAsUser"), 0, "{at}: runs as root");
                assert_eq!(
                    either("seccompProfile")["type"],
                    "RuntimeDefault",
                    "{at}: seccompProfile"
                );
                assert_eq!(
                    sc["allowPrivilegeEscalation"], false,
                    "{at}: allowPrivilegeEscalation"
                );
                assert_ne!(sc["privileged"], true, "{at}: privileged");
                assert_eq!(
                    sc["readOnlyRootFilesystem"], true,
                    "{at}: readOnlyRootFilesystem"
                );
                assert!(
                    array(&sc["capabilities"]["drop"]).contains(&Value::from("ALL")),
                    "{at}: must drop ALL"
                );
                assert!(
                    array(&sc["capabilities"]["add"]).is_empty(),
                    "{at}: adds capabilities"
                );
            }
        }
    }
}

#[test]
fn proxy_runs_as_the_distroless_nonroot_user() {
    let docs = cert_manager();
    let spec = &daemonset(&docs)["spec"]["template"]["spec"];
    assert_eq!(spec["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        proxy_container(&docs)["securityContext"]["runAsUser"],
        65532
    );
}

#[test]
fn no_pod_uses_host_namespaces_host_paths_or_host_ports() {
    for (rendering, docs) in renderings() {
        for (owner, spec) in pod_specs(&docs) {
            for field in ["hostNetwork", "hostPID", "hostIPC"] {
                assert_ne!(spec[field], true, "{rendering}: {owner} sets {field}");
            }
            for v in array(&spec["volumes"]) {
                assert!(
                    v["hostPath"].is_null(),
                    "{rendering}: {owner} mounts a hostPath"
                );
            }
            for c in containers(spec) {
                for p in array(&c["ports"]) {
                    assert!(
                        p["hostPort"].is_null(),
                        "{rendering}: {owner} uses hostPort"
                    );
                }
            }
        }
    }
}

#[test]
fn proxy_service_keeps_token_traffic_on_the_callers_node() {
    let docs = cert_manager();
    let svc = named(&docs, "Service", PROXY);
    assert_eq!(svc["metadata"]["namespace"], NAMESPACE);
    assert_eq!(svc["spec"]["internalTrafficPolicy"], "Local");
    let ports = array(&svc["spec"]["ports"]);
    assert_eq!(ports.len(), 1, "only the token endpoint is exposed");
    assert_eq!(ports[0]["port"], 443);
    let target = container_port(proxy_container(&docs), &ports[0]["targetPort"]);
    assert_eq!(
        target,
        port_of(&proxy_env(&docs)["IBP_LISTEN"]),
        "Service targets the proxy's --listen port"
    );
    let labels = &daemonset(&docs)["spec"]["template"]["metadata"]["labels"];
    for (k, v) in svc["spec"]["selector"]
        .as_object()
        .expect("Service has a selector")
    {
        assert_eq!(
            &labels[k], v,
            "Service selector {k} matches the DaemonSet's pods"
        );
    }
}

#[test]
fn network_policy_admits_pods_to_the_token_port_and_only_monitoring_to_admin() {
    let docs = cert_manager();
    let policy = named(&docs, "NetworkPolicy", PROXY);
    assert_eq!(policy["metadata"]["namespace"], NAMESPACE);
    let labels = &daemonset(&docs)["spec"]["template"]["metadata"]["labels"];
    for (k, v) in policy["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .expect("the policy selects pods by label")
    {
        assert_eq!(
            &labels[k], v,
            "policy selector {k} matches the proxy's pods"
        );
    }
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
    let container = proxy_container(&docs);
    let env = proxy_env(&docs);
    let rules = array(&policy["spec"]["ingress"]);
    let rule_for = |listen: &str| {
        let port = port_of(&env[listen]);
        let matching: Vec<&Value> = rules
            .iter()
            .filter(|r| {
                array(&r["ports"])
                    .iter()
                    .any(|p| container_port(container, &p["port"]) == port)
            })
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "exactly one rule admits {listen}'s port {port}"
        );
        matching[0]
    };
    let token = rule_for("IBP_LISTEN");
    assert_eq!(
        token["from"],
        serde_json::json!([{"namespaceSelector": {}}]),
        "every namespace's pods reach the token port"
    );
    let admin = rule_for("IBP_ADMIN_LISTEN");
    assert_eq!(
        admin["from"],
        serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]),
        "only the monitoring namespace reaches the admin port"
    );
    assert_eq!(rules.len(), 2, "no other port is admitted");
}

#[test]
fn proxy_rollout_starts_the_new_pod_before_stopping_the_old() {
    let docs = cert_manager();
    let strategy = &daemonset(&docs)["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(strategy["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 0);
}

#[test]
fn proxy_is_node_critical_and_tolerates_every_taint() {
    let docs = cert_manager();
    let spec = &daemonset(&docs)["spec"]["template"]["spec"];
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert!(
        array(&spec["tolerations"])
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null()),
        "a toleration with operator Exists and no key or effect lets the proxy on every node"
    );
}

#[test]
fn proxy_probes_livez_and_readyz_on_the_admin_port() {
    let docs = cert_manager();
    let c = proxy_container(&docs);
    let admin = port_of(&proxy_env(&docs)["IBP_ADMIN_LISTEN"]);
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe} path");
        assert_eq!(
            container_port(c, &get["port"]),
            admin,
            "{probe} targets the admin port"
        );
        assert!(
            get["scheme"].is_null() || get["scheme"] == "HTTP",
            "the admin port is plain HTTP"
        );
    }
}

#[test]
fn proxy_declares_resource_requests_and_limits() {
    let docs = cert_manager();
    let r = &proxy_container(&docs)["resources"];
    for field in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(r[field][res].is_string(), "resources.{field}.{res} is set");
        }
    }
}

#[test]
fn mounted_secrets_and_configmaps_are_whole_volumes_never_subpath() {
    for (rendering, docs) in renderings() {
        for (owner, spec) in pod_specs(&docs) {
            for c in containers(spec) {
                for m in array(&c["volumeMounts"]) {
                    assert!(
                        m["subPath"].is_null() && m["subPathExpr"].is_null(),
                        "{rendering}: {owner} mounts {} with subPath: updates would never reach the pod",
                        m["name"]
                    );
                }
            }
        }
    }
}

#[test]
fn proxy_files_named_in_its_flags_are_on_mounted_volumes() {
    let docs = cert_manager();
    let env = proxy_env(&docs);
    let c = proxy_container(&docs);
    let mounts: Vec<&str> = array(&c["volumeMounts"])
        .iter()
        .map(|m| str_of(&m["mountPath"]))
        .collect();
    let mut files: Vec<String> = env["IBP_TLS"]
        .split(';')
        .flat_map(|e| e.split_once('=').expect("NAME=CERT,KEY").1.split(','))
        .map(str::to_string)
        .collect();
    files.extend(env["IBP_ISSUER_KEY"].split(',').map(str::to_string));
    files.push(env["IBP_BINDINGS"].clone());
    for file in files {
        assert!(
            mounts
                .iter()
                .any(|m| Path::new(&file).parent() == Some(Path::new(m))),
            "{file} is not directly inside a mounted volume"
        );
    }
}

#[test]
fn state_dir_is_a_writable_empty_dir() {
    let docs = cert_manager();
    let dir = proxy_env(&docs)["IBP_STATE_DIR"].clone();
    let c = proxy_container(&docs);
    let mount = array(&c["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == dir.as_str())
        .expect("state dir is mounted");
    assert_ne!(mount["readOnly"], true, "state dir must be writable");
    let spec = &daemonset(&docs)["spec"]["template"]["spec"];
    let volume = array(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("state volume");
    assert!(volume["emptyDir"].is_object(), "state dir is an emptyDir");
}

#[test]
fn proxy_uses_its_service_account_token_for_the_apiserver() {
    let docs = cert_manager();
    let spec = &daemonset(&docs)["spec"]["template"]["spec"];
    assert_eq!(spec["serviceAccountName"], PROXY);
    assert_eq!(spec["automountServiceAccountToken"], true);
}

#[test]
fn termination_grace_outlasts_shutdown_delay_plus_drain() {
    let docs = cert_manager();
    let env = proxy_env(&docs);
    // The proxy's own default when the manifest does not set the variable.
    let default = |flag: &str| -> u64 {
        serve_default(flag)
            .parse()
            .expect("a default number of seconds")
    };
    let secs = |k: &str, flag: &str| {
        env.get(k).map_or_else(
            || default(flag),
            |v| v.parse().expect("a number of seconds"),
        )
    };
    let needed = secs("IBP_SHUTDOWN_DELAY_SECS", "shutdown-delay-secs")
        + secs("IBP_DRAIN_TIMEOUT_SECS", "drain-timeout-secs");
    let defaults = default("shutdown-delay-secs") + default("drain-timeout-secs");
    let grace = daemonset(&docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds is set");
    assert!(
        grace > defaults && grace > needed,
        "grace {grace}s must exceed shutdown delay + drain ({needed}s, {defaults}s by default)"
    );
}

/// A ClusterRole's rules as flat (apiGroup, resource, verb) and (nonResourceURL, verb) grants.
fn grants(role: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for rule in array(&role["rules"]) {
        for verb in array(&rule["verbs"]) {
            for group in array(&rule["apiGroups"]) {
                for resource in array(&rule["resources"]) {
                    out.insert(format!(
                        "{}/{} {}",
                        str_of(group),
                        str_of(resource),
                        str_of(verb)
                    ));
                }
            }
            for url in array(&rule["nonResourceURLs"]) {
                out.insert(format!("{} {}", str_of(url), str_of(verb)));
            }
        }
    }
    out
}

#[test]
fn proxy_cluster_role_grants_exactly_reviews_rbac_watch_and_jwks() {
    let docs = cert_manager();
    let role = named(&docs, "ClusterRole", PROXY);
    let mut expected: BTreeSet<String> = [
        "authentication.k8s.io/tokenreviews create",
        "authorization.k8s.io/subjectaccessreviews create",
        "/openid/v1/jwks get",
        "/.well-known/openid-configuration get",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    for resource in [
        "clusterroles",
        "clusterrolebindings",
        "roles",
        "rolebindings",
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert(format!("rbac.authorization.k8s.io/{resource} {verb}"));
        }
    }
    assert_eq!(grants(role), expected);
    for rule in array(&role["rules"]) {
        assert!(rule["resourceNames"].is_null(), "no resourceNames needed");
    }
    let binding = named(&docs, "ClusterRoleBinding", PROXY);
    assert_eq!(binding["roleRef"]["name"], PROXY);
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": PROXY, "namespace": NAMESPACE}])
    );
}

#[test]
fn no_role_grants_wildcards_or_secrets() {
    for (rendering, docs) in renderings() {
        for role in kind(&docs, "ClusterRole")
            .into_iter()
            .chain(kind(&docs, "Role"))
        {
            for g in grants(role) {
                assert!(
                    !g.contains('*'),
                    "{rendering}: {} grants a wildcard: {g}",
                    name(role)
                );
                assert!(
                    !g.starts_with("/secrets "),
                    "{rendering}: {} grants Secrets: {g}",
                    name(role)
                );
                for verb in ["escalate", "bind", "impersonate"] {
                    assert!(
                        !g.ends_with(&format!(" {verb}")),
                        "{rendering}: {} grants {verb}",
                        name(role)
                    );
                }
            }
        }
    }
}

#[test]
fn serving_certificate_names_the_sni_and_the_service_and_is_what_the_proxy_mounts() {
    let docs = cert_manager();
    let spec = &daemonset(&docs)["spec"]["template"]["spec"];
    let tls_dir = Path::new(
        proxy_env(&docs)["IBP_TLS"]
            .split_once('=')
            .expect("NAME=CERT,KEY")
            .1
            .split(',')
            .next()
            .unwrap_or(""),
    )
    .parent()
    .expect("certificate path has a directory")
    .to_path_buf();
    let mount = array(&proxy_container(&docs)["volumeMounts"])
        .iter()
        .find(|m| Path::new(str_of(&m["mountPath"])) == tls_dir)
        .expect("the certificate directory is mounted");
    let volume = array(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("tls volume");
    let secret = str_of(&volume["secret"]["secretName"]);
    let cert = kind(&docs, "Certificate")
        .into_iter()
        .find(|c| c["spec"]["secretName"] == secret)
        .unwrap_or_else(|| {
            panic!("no cert-manager Certificate writes the mounted Secret {secret}")
        });
    let dns: BTreeSet<String> = array(&cert["spec"]["dnsNames"])
        .iter()
        .map(|n| str_of(n).to_string())
        .collect();
    let mut required = sni_names(&docs);
    required.insert(format!("{PROXY}.{NAMESPACE}.svc"));
    required.insert(format!("{PROXY}.{NAMESPACE}.svc.cluster.local"));
    let missing: Vec<_> = required.difference(&dns).collect();
    assert!(missing.is_empty(), "Certificate dnsNames lack {missing:?}");
    assert!(
        dns.iter().all(|n| !n.contains('*')),
        "exact names only: Java does not match wildcards"
    );
    assert_eq!(cert["metadata"]["namespace"], NAMESPACE);
}

fn webhook_values() -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/webhook/values.yaml"))
        .expect("deploy/webhook/values.yaml");
    let yaml: serde_norway::Value = serde_norway::from_str(&text).expect("values.yaml is YAML");
    serde_json::to_value(yaml).expect("JSON-compatible")
}

#[test]
fn webhook_values_point_pods_at_the_service_sni_audience_and_ca() {
    let docs = cert_manager();
    let v = &webhook_values()["customTokenEndpoint"];
    assert_eq!(
        v["azureKubernetesTokenProxy"],
        format!("https://{PROXY}.{NAMESPACE}.svc").as_str()
    );
    assert!(
        sni_names(&docs).contains(str_of(&v["azureKubernetesSniName"])),
        "SNI name is one the proxy serves"
    );
    let audience = proxy_env(&docs)
        .get("IBP_TOKEN_AUDIENCE")
        .cloned()
        .unwrap_or_else(|| serve_default("token-audience"));
    assert_eq!(
        str_of(&v["audience"]),
        audience,
        "SA tokens carry the audience the proxy requires"
    );
    let ca = named(
        &docs,
        "ConfigMap",
        str_of(&v["azureKubernetesCAConfigMapName"]),
    );
    assert!(
        ca["data"]["ca.crt"].is_string(),
        "the CA ConfigMap holds key ca.crt, which the webhook projects"
    );
    assert!(
        !str_of(&v["annotationSuffix"]).is_empty(),
        "an empty suffix turns the feature off"
    );
}

#[test]
fn example_app_pod_opts_into_identity_binding_and_is_granted_its_identity() {
    let docs = example_app();
    let suffix = str_of(&webhook_values()["customTokenEndpoint"]["annotationSuffix"]).to_string();
    let pod = kind(&docs, "Pod")
        .into_iter()
        .next()
        .expect("example app has a pod");
    assert_eq!(
        pod["metadata"]["labels"]["azure.workload.identity/use"],
        "true"
    );
    assert_eq!(
        // The webhook (v1.6.0, pkg/webhook/webhook.go) waits for `azure.workload.identity/use-`
        // + its suffix; tests/real_kubernetes/ checks the same against the real webhook.
        pod["metadata"]["annotations"][format!("azure.workload.identity/use-{suffix}")],
        "true"
    );

    let ns = str_of(&pod["metadata"]["namespace"]);
    let sa_name = str_of(&pod["spec"]["serviceAccountName"]);
    let sa = named(&docs, "ServiceAccount", sa_name);
    let client_id = str_of(&sa["metadata"]["annotations"]["azure.workload.identity/client-id"]);
    assert_eq!(client_id.len(), 36, "client-id annotation is a GUID");

    let wanted = format!("cid.wi.aks.azure.com/{client_id} use-managed-identity");
    let granted = kind(&docs, "ClusterRoleBinding").into_iter().any(|b| {
        let role = named(&docs, "ClusterRole", str_of(&b["roleRef"]["name"]));
        grants(role) == BTreeSet::from([wanted.clone()])
            && array(&b["subjects"]).iter().any(|s| {
                s["kind"] == "ServiceAccount" && s["name"] == sa_name && s["namespace"] == ns
            })
    });
    assert!(
        granted,
        "a ClusterRoleBinding grants {sa_name} in {ns} exactly `{wanted}`"
    );
}

/// The Grafana dashboard parses and every query uses only metrics the proxy exports.
#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/identity-binding-proxy.json"
    );
    let dash: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let metrics = identity_binding_proxy::metrics::Metrics::new();
    // The one series that exists only once a certificate is loaded.
    metrics
        .certificate_expiry
        .with_label_values(&["proxy.example"])
        .set(1);
    let exported = metrics.render();
    let exported = String::from_utf8(exported).unwrap();
    let mut queries = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            queries += 1;
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(rest) = word.strip_prefix("identity_binding_proxy_") {
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .fold(rest, |n, s| n.strip_suffix(s).unwrap_or(n));
                    assert!(
                        exported.contains(&format!("# TYPE identity_binding_proxy_{base} ")),
                        "panel '{}' queries identity_binding_proxy_{rest}, which is not exported",
                        panel["title"]
                    );
                }
            }
        }
    }
    assert!(queries >= 10, "{queries} queries");
}

// ------------------------------------------------------------------------------ the Helm chart

const CHART: &str = "charts/identity-binding-proxy";

/// helm: $HELM, else the real-cluster harness's pinned build (built on first use).
fn helm() -> PathBuf {
    static HELM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    HELM.get_or_init(find_helm).clone()
}

fn find_helm() -> PathBuf {
    if let Some(h) = std::env::var_os("HELM") {
        return PathBuf::from(h);
    }
    let out = Command::new("bash")
        .arg(repo().join("scripts/real-cluster.sh"))
        .args(["build", "helm"])
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "scripts/real-cluster.sh build helm failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next_back()
        .expect("the build prints its directory")
        .to_string();
    Path::new(&dir).join("helm")
}

/// `helm template` of the chart as release identity-binding-proxy in its namespace.
fn helm_template_out(args: &[&str]) -> std::process::Output {
    Command::new(helm())
        .current_dir(repo())
        .args(["template", PROXY, CHART, "--namespace", NAMESPACE])
        .args(["--kube-version", "1.33.0"])
        .args(args)
        .output()
        .expect("helm runs")
}

fn helm_template(args: &[&str]) -> String {
    let out = helm_template_out(args);
    assert!(
        out.status.success(),
        "helm template {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

/// The chart's ci/ value sets, relative to the repository.
fn chart_value_sets() -> Vec<PathBuf> {
    let mut sets: Vec<PathBuf> = std::fs::read_dir(repo().join(CHART).join("ci"))
        .expect("the chart has ci/ value sets")
        .map(|e| {
            let p = e.expect("readable directory entry").path();
            p.strip_prefix(repo()).unwrap().to_path_buf()
        })
        .collect();
    sets.sort();
    assert!(sets.len() >= 3, "{sets:?}");
    sets
}

/// A wrong value fails the install (helm validates values.schema.json on install, upgrade
/// and template alike) with a message naming the value; the required ones are required.
#[test]
fn chart_schema_refuses_wrong_values_naming_them() {
    let good = [
        "--set",
        "issuer.url=https://issuer.example.com/{tenant}/{client_id}",
        "--set",
        "issuer.keySecretName=issuer-key",
    ];
    helm_template(&good);
    let cases: [(&[&str], &str); 8] = [
        (
            &["--set", "issuer.url=http://issuer.example.com/x"],
            "/issuer/url",
        ),
        (
            &[
                "--set",
                "issuer.url=https://issuer.example.com/{tenant}?a=b",
            ],
            "/issuer/url",
        ),
        (
            &["--set", "issuer.url=https://issuer.example.com/{cluster}"],
            "/issuer/url",
        ),
        (&["--set", "issuer.keySecretName="], "/issuer/keySecretName"),
        (&["--set", "tls.source=vault"], "/tls/source"),
        (&["--set", "authnMode=review"], "/authnMode"),
        (
            &[
                "--set",
                "bindings[0].clientId=not-a-uuid,bindings[0].tenantId=x",
            ],
            "/bindings/0/clientId",
        ),
        (&["--set", "imageTag=1.0"], "imageTag"),
    ];
    for (more, named) in cases {
        let args: Vec<&str> = good.iter().chain(more).copied().collect();
        let out = helm_template_out(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{more:?} must be refused");
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                && stderr.contains(named),
            "{more:?}: the error names {named}:\n{stderr}"
        );
    }
    // Neither the issuer URL nor the key Secret has a default.
    let out = helm_template_out(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for named in ["/issuer/url", "/issuer/keySecretName"] {
        assert!(stderr.contains(named), "{named}:\n{stderr}");
    }
}

/// deploy/base, its settings and the cert-manager overlay's objects are the chart's rendering
/// (scripts/render-deploy.sh --check), and the check catches a hand edit.
#[test]
fn kustomize_manifests_are_the_charts_rendering_and_drift_fails() {
    let out = render_check(&repo());
    assert!(
        out.status.success(),
        "deploy/ differs from the chart:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A copy with one hand-edited manifest fails, naming the file.
    let stderr = drift_after_edit("deploy/base/service.yaml", |text| {
        text.replace("port: 443", "port: 8443")
    });
    assert!(
        stderr.contains("DRIFT: deploy/base/service.yaml"),
        "{stderr}"
    );
}

/// `scripts/render-deploy.sh --check` in the tree at `root`.
fn render_check(root: &Path) -> std::process::Output {
    Command::new("bash")
        .arg(root.join("scripts/render-deploy.sh"))
        .arg("--check")
        .env("HELM", helm())
        .output()
        .expect("bash runs")
}

/// `render_check` of a copy of the chart, deploy/ and scripts/ in which `edit` changed the
/// file `path`: asserts that it fails, and returns what it said.
fn drift_after_edit(path: &str, edit: impl Fn(&str) -> String) -> String {
    let copy = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .args(["-r", "charts", "deploy", "scripts"])
        .arg(copy.path())
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(status.success());
    let file = copy.path().join(path);
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = edit(&text);
    assert_ne!(edited, text, "the edit changes {path}");
    std::fs::write(&file, edited).unwrap();
    let out = render_check(copy.path());
    assert!(!out.status.success(), "a hand edit must fail the check");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The chart's PrometheusRule carries exactly deploy/monitoring/alerts.yaml, and its PodMonitor
/// scrapes the admin port the proxy serves /metrics on.
#[test]
fn chart_monitoring_objects_carry_the_alert_rules_and_scrape_the_admin_port() {
    let docs = parse_docs(&helm_template(&[
        "-f",
        &format!("{CHART}/ci/monitoring-values.yaml"),
    ]));
    let rule = named(&docs, "PrometheusRule", PROXY);
    let file: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("deploy/monitoring/alerts.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"], file, "the PrometheusRule is alerts.yaml");

    let monitor = named(&docs, "PodMonitor", PROXY);
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let container = proxy_container(&docs);
    assert_eq!(
        container_port(container, &endpoint["port"]),
        port_of(&proxy_env(&docs)["IBP_ADMIN_LISTEN"])
    );
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    let pod_labels = &daemonset(&docs)["spec"]["template"]["metadata"]["labels"];
    for (k, v) in selector {
        assert_eq!(&pod_labels[k], v, "the PodMonitor selects the proxy's pods");
    }

    // Off by default: no Prometheus operator kinds unless asked for.
    let defaults = parse_docs(&helm_template(&[
        "-f",
        &format!("{CHART}/ci/cert-manager-values.yaml"),
    ]));
    assert!(kind(&defaults, "PrometheusRule").is_empty());
    assert!(kind(&defaults, "PodMonitor").is_empty());
}

/// Changing a setting read once at start rolls the DaemonSet (the pods carry its checksum),
/// and the settings reach the proxy's environment.
#[test]
fn chart_settings_reach_the_proxy_and_changing_them_rolls_the_pods() {
    let render = |url: &str| {
        parse_docs(&helm_template(&[
            "-f",
            &format!("{CHART}/ci/cert-manager-values.yaml"),
            "--set",
            &format!("issuer.url={url}"),
        ]))
    };
    let a = render("https://a.example/{tenant}/{client_id}");
    let b = render("https://b.example/{tenant}/{client_id}");
    assert_eq!(
        proxy_env(&a)["IBP_ISSUER_URL"],
        "https://a.example/{tenant}/{client_id}"
    );
    let checksum = |docs: &[Value]| {
        daemonset(docs)["spec"]["template"]["metadata"]["annotations"]["checksum/settings"].clone()
    };
    assert!(checksum(&a).is_string());
    assert_ne!(checksum(&a), checksum(&b));
}

/// The sidecar component, as the example workload (deploy/overlays/sidecar-example) renders
/// it: a native sidecar on loopback that the app's AZURE_KUBERNETES_* point at, with its own
/// API token, probes that reach it, and a workload that needs no RBAC beyond its grant.
#[test]
fn sidecar_component_adds_a_loopback_native_sidecar_the_app_is_pointed_at() {
    let docs = render(&repo().join("deploy/overlays/sidecar-example"));
    let spec = &named(&docs, "Deployment", "web")["spec"]["template"]["spec"];
    let sidecar = array(&spec["initContainers"])
        .iter()
        .find(|c| c["name"] == PROXY)
        .expect("the sidecar is an init container");
    // Native: started before the app, running beside it.
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["args"], serde_json::json!(["--sidecar"]));
    let mut env: HashMap<String, String> = HashMap::new();
    for from in array(&sidecar["envFrom"]) {
        let cm = named(&docs, "ConfigMap", str_of(&from["configMapRef"]["name"]));
        for (k, v) in cm["data"].as_object().into_iter().flatten() {
            env.insert(k.clone(), str_of(v).to_string());
        }
    }
    for e in array(&sidecar["env"]) {
        env.insert(str_of(&e["name"]).into(), str_of(&e["value"]).into());
    }
    for var in ["IBP_LISTEN", "IBP_ADMIN_LISTEN"] {
        let addr: std::net::SocketAddr = env[var].parse().expect("ADDR:PORT");
        assert!(addr.ip().is_loopback(), "{var} = {addr}");
    }
    assert_eq!(
        env["IBP_AUTHN_MODE"], "local",
        "a pod may not create TokenReviews"
    );
    assert!(
        env.contains_key("IBP_ISSUER_URL"),
        "the settings ConfigMap is read"
    );
    let admin = port_of(&env["IBP_ADMIN_LISTEN"]);
    for probe in ["startupProbe", "livenessProbe"] {
        let cmd = array(&sidecar[probe]["exec"]["command"]);
        assert_eq!(cmd.get(1), Some(&Value::from("probe")), "{probe}: {cmd:?}");
        let url = str_of(&cmd[2]);
        assert!(
            url.starts_with(&format!("http://127.0.0.1:{admin}/")),
            "{probe} asks the admin port: {url}"
        );
    }

    // The app: pointed at the sidecar, trusting the CA the sidecar writes.
    let app = array(&spec["containers"])
        .iter()
        .find(|c| c["name"] == "app")
        .expect("the app container");
    let app_env: HashMap<&str, &str> = array(&app["env"])
        .iter()
        .map(|e| (str_of(&e["name"]), str_of(&e["value"])))
        .collect();
    assert_eq!(
        app_env["AZURE_KUBERNETES_TOKEN_PROXY"],
        format!("https://127.0.0.1:{}", port_of(&env["IBP_LISTEN"]))
    );
    let tls_name = env["IBP_TLS"].split_once('=').expect("NAME=CERT,KEY").0;
    assert_eq!(app_env["AZURE_KUBERNETES_SNI_NAME"], tls_name);
    assert_eq!(env["IBP_DEFAULT_SNI"], tls_name);
    let ca = Path::new(app_env["AZURE_KUBERNETES_CA_FILE"]);
    assert_eq!(ca, Path::new(&env["IBP_SIDECAR_CA_OUT"]));
    let volume_at = |c: &Value, dir: &Path| {
        array(&c["volumeMounts"])
            .iter()
            .find(|m| Path::new(str_of(&m["mountPath"])) == dir)
            .map(|m| (str_of(&m["name"]).to_string(), m["readOnly"] == true))
    };
    let ca_dir = ca.parent().unwrap();
    let (shared, read_only) = volume_at(sidecar, ca_dir).expect("the sidecar mounts the CA dir");
    assert!(!read_only, "the sidecar writes the CA");
    assert_eq!(
        volume_at(app, ca_dir),
        Some((shared, true)),
        "the app reads the same volume"
    );
    // The serving key, the issuer key and the API token are the sidecar's alone.
    let tls_key = env["IBP_TLS"].rsplit(',').next().unwrap();
    let private = [
        Path::new(tls_key).parent().unwrap(),
        Path::new(&env["IBP_ISSUER_KEY"]).parent().unwrap(),
        Path::new("/var/run/secrets/kubernetes.io/serviceaccount"),
    ];
    for dir in private {
        let (volume, _) = volume_at(sidecar, dir).unwrap_or_else(|| panic!("{dir:?} mounted"));
        assert!(
            array(&app["volumeMounts"])
                .iter()
                .all(|m| m["name"] != volume.as_str()),
            "the app mounts {volume}"
        );
    }
    let token_volume = array(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == "identity-binding-proxy-api-token")
        .expect("the API token volume");
    assert!(
        array(&token_volume["projected"]["sources"])
            .iter()
            .any(|s| s["serviceAccountToken"].is_object()),
        "{token_volume}"
    );
    assert_eq!(spec["automountServiceAccountToken"], false);

    // The workload's RBAC: its grant, nothing more (no reviews, no RBAC reads).
    for role in kind(&docs, "Role")
        .into_iter()
        .chain(kind(&docs, "ClusterRole"))
    {
        for rule in array(&role["rules"]) {
            assert_eq!(
                rule["apiGroups"],
                serde_json::json!(["cid.wi.aks.azure.com"])
            );
            assert_eq!(rule["verbs"], serde_json::json!(["use-managed-identity"]));
        }
    }
}

// -------------------------------------------------------- the chart's sidecar mode, as a dependency

/// A workload chart that depends on the chart (mode: sidecar) and includes its sidecar
/// templates in its Deployment.
const WORKLOAD_CHART: &str = "tests/fixtures/sidecar-workload-chart";

/// `helm dependency build` of the workload chart, once per run (offline: a local path).
fn workload_chart() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = repo().join(WORKLOAD_CHART);
            let out = Command::new(helm())
                .args(["dependency", "build"])
                .arg(&dir)
                .output()
                .expect("helm runs");
            assert!(
                out.status.success(),
                "helm dependency build {WORKLOAD_CHART}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            dir
        })
        .clone()
}

fn workload_template_out(args: &[&str]) -> std::process::Output {
    Command::new(helm())
        .arg("template")
        .arg("web")
        .arg(workload_chart())
        .args(["--namespace", "web", "--kube-version", "1.33.0"])
        .args(args)
        .output()
        .expect("helm runs")
}

fn workload_template(args: &[&str]) -> Vec<Value> {
    let out = workload_template_out(args);
    assert!(
        out.status.success(),
        "helm template {WORKLOAD_CHART} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_docs(&String::from_utf8(out.stdout).expect("helm prints UTF-8"))
}

/// A pod spec's sidecar (the init container named identity-binding-proxy) and app container.
fn sidecar_and_app(spec: &Value) -> (&Value, &Value) {
    let sidecar = array(&spec["initContainers"])
        .iter()
        .find(|c| c["name"] == PROXY)
        .expect("the sidecar is an init container");
    let app = array(&spec["containers"])
        .iter()
        .find(|c| c["name"] == "app")
        .expect("the app container");
    (sidecar, app)
}

/// The workload chart's pod: the native sidecar from the chart's templates, the app pointed at
/// it through the three AZURE_KUBERNETES_* variables, the CA volume shared, the webhook told to
/// skip the sidecar, and every ConfigMap and Secret the sidecar reads named as the chart (and
/// the values) name them.
#[test]
fn chart_sidecar_templates_put_a_native_sidecar_into_the_workload_chart_pod() {
    let docs = workload_template(&[]);
    let pod = &named(&docs, "Deployment", "web")["spec"]["template"];
    let spec = &pod["spec"];
    let (sidecar, app) = sidecar_and_app(spec);
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(sidecar["args"], serde_json::json!(["--sidecar"]));
    assert_eq!(
        sidecar["image"], "registry.example.com/identity-binding-proxy:0.1.0",
        "the dependency's image and appVersion"
    );
    let env = container_env(&docs, sidecar);
    assert_eq!(
        env["IBP_ISSUER_URL"],
        "https://issuer.example.com/{tenant}/{client_id}"
    );
    assert_eq!(
        env["IBP_AUTHORITY_HOST"],
        "https://login.microsoftonline.com"
    );
    assert_eq!(env["IBP_TOKEN_AUDIENCE"], "api://AKSIdentityBinding");
    assert_eq!(env["IBP_AUTHN_MODE"], "local");
    for var in ["IBP_LISTEN", "IBP_ADMIN_LISTEN"] {
        let addr: std::net::SocketAddr = env[var].parse().expect("ADDR:PORT");
        assert!(addr.ip().is_loopback(), "{var} = {addr}");
    }

    // The app: the three variables, pointing at the sidecar's listener, SNI name and CA.
    let app_env: HashMap<&str, &str> = array(&app["env"])
        .iter()
        .map(|e| (str_of(&e["name"]), str_of(&e["value"])))
        .collect();
    let tls_name = env["IBP_TLS"].split_once('=').expect("NAME=CERT,KEY").0;
    assert_eq!(
        app_env.get("AZURE_KUBERNETES_TOKEN_PROXY").copied(),
        Some(format!("https://127.0.0.1:{}", port_of(&env["IBP_LISTEN"])).as_str())
    );
    assert_eq!(
        app_env.get("AZURE_KUBERNETES_SNI_NAME").copied(),
        Some(tls_name)
    );
    assert_eq!(
        app_env.get("AZURE_KUBERNETES_CA_FILE").copied(),
        Some(env["IBP_SIDECAR_CA_OUT"].as_str())
    );

    // The CA directory: one volume, written by the sidecar, read by the app, in memory.
    let ca_dir = Path::new(&env["IBP_SIDECAR_CA_OUT"]).parent().unwrap();
    let mount_at = |c: &Value| {
        array(&c["volumeMounts"])
            .iter()
            .find(|m| Path::new(str_of(&m["mountPath"])) == ca_dir)
            .map(|m| (str_of(&m["name"]).to_string(), m["readOnly"] == true))
    };
    let (ca_volume, sidecar_ro) = mount_at(sidecar).expect("the sidecar mounts the CA dir");
    assert!(!sidecar_ro, "the sidecar writes the CA");
    assert_eq!(
        mount_at(app),
        Some((ca_volume.clone(), true)),
        "the app reads it"
    );
    let volume = |name: &str| {
        array(&spec["volumes"])
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    assert_eq!(volume(&ca_volume)["emptyDir"]["medium"], "Memory");

    // Every volume the sidecar mounts exists in the pod; the ones naming objects name what
    // the chart renders (bindings) or what the values say (the issuer key Secret).
    for m in array(&sidecar["volumeMounts"]) {
        volume(str_of(&m["name"]));
    }
    let bindings = volume("identity-binding-proxy-bindings");
    let cm = named(&docs, "ConfigMap", str_of(&bindings["configMap"]["name"]));
    assert!(
        str_of(&cm["data"]["bindings.yaml"]).contains("11111111-2222-3333-4444-555555555555"),
        "{cm}"
    );
    assert_eq!(
        volume("identity-binding-proxy-issuer-key")["secret"]["secretName"],
        "web-issuer-key"
    );
    assert!(
        kind(&docs, "Secret").is_empty(),
        "the issuer key is the user's Secret, never rendered"
    );
    assert!(env["IBP_ISSUER_KEY"].starts_with("/etc/identity-binding-proxy/issuer/"));

    // The webhook leaves the sidecar alone; a settings change rolls the pods.
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(
        annotations["azure.workload.identity/skip-containers"],
        PROXY
    );
    let other = workload_template(&[
        "--set",
        "identity-binding-proxy.issuer.url=https://other.example/{tenant}/{client_id}",
    ]);
    let checksum = |docs: &[Value]| {
        named(docs, "Deployment", "web")["spec"]["template"]["metadata"]["annotations"]
            ["checksum/identity-binding-proxy-settings"]
            .clone()
    };
    assert!(checksum(&docs).is_string());
    assert_ne!(checksum(&docs), checksum(&other));
}

/// The chart's sidecar and the kustomize component's are the same container, volumes and app
/// settings, but for the names of the objects each is given (the component's patch is rendered
/// from the chart's templates by scripts/render-deploy.sh; this holds the result).
#[test]
fn chart_sidecar_is_the_kustomize_components_sidecar() {
    let chart = workload_template(&[
        "--set",
        "identity-binding-proxy.image.repository=registry.example.com/identity-binding-proxy",
    ]);
    let component = render(&repo().join("deploy/overlays/sidecar-example"));
    let part = |docs: &[Value]| {
        let spec = named(docs, "Deployment", "web")["spec"]["template"]["spec"].clone();
        let (sidecar, app) = sidecar_and_app(&spec);
        let mut sidecar = sidecar.clone();
        // The objects' names differ (a release's, a kustomization's generated ones).
        sidecar["image"] = Value::Null;
        sidecar["envFrom"][0]["configMapRef"]["name"] = Value::Null;
        let mut volumes = spec["volumes"].clone();
        for v in volumes.as_array_mut().unwrap() {
            if v["configMap"].is_object() {
                v["configMap"]["name"] = Value::Null;
            }
            if v["secret"].is_object() {
                v["secret"]["secretName"] = Value::Null;
            }
        }
        let app_env: Vec<Value> = array(&app["env"])
            .iter()
            .filter(|e| str_of(&e["name"]).starts_with("AZURE_KUBERNETES_"))
            .cloned()
            .collect();
        let app_mounts: Vec<Value> = array(&app["volumeMounts"])
            .iter()
            .filter(|m| str_of(&m["name"]).starts_with(PROXY))
            .cloned()
            .collect();
        (sidecar, volumes, app_env, app_mounts)
    };
    let (c_sidecar, c_volumes, c_env, c_mounts) = part(&chart);
    let (k_sidecar, k_volumes, k_env, k_mounts) = part(&component);
    assert_eq!(c_sidecar, k_sidecar, "the sidecar container");
    assert_eq!(c_volumes, k_volumes, "the pod's volumes");
    assert_eq!(c_env, k_env, "the app's AZURE_KUBERNETES_*");
    assert_eq!(c_mounts, k_mounts, "the app's mounts");
    assert_eq!(c_env.len(), 3, "{c_env:?}");
}

/// Sidecar mode renders only what a workload's namespace needs: the settings and bindings
/// ConfigMaps. No DaemonSet, Service, RBAC, cert-manager or monitoring object, and nothing
/// cluster-scoped, whatever the daemonset-mode values say.
#[test]
fn chart_sidecar_mode_renders_only_the_namespaces_configmaps() {
    let values = format!("{CHART}/ci/sidecar-values.yaml");
    for extra in [
        &[][..],
        &[
            "--set",
            "namespace.create=true,networkPolicy.enabled=true,criticalPodsQuota.enabled=true",
            "--set",
            "monitoring.podMonitor.enabled=true,monitoring.prometheusRule.enabled=true",
            "--set",
            "tls.source=cert-manager",
        ][..],
    ] {
        let args: Vec<&str> = ["-f", values.as_str()]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        let docs = parse_docs(&helm_template(&args));
        let names: BTreeSet<String> = docs.iter().map(name).collect();
        assert_eq!(
            names,
            BTreeSet::from([
                format!("ConfigMap/{PROXY}-sidecar-settings"),
                format!("ConfigMap/{PROXY}-sidecar-bindings"),
            ]),
            "{extra:?}"
        );
        for d in &docs {
            assert_eq!(d["metadata"]["namespace"], NAMESPACE, "{}", name(d));
        }
    }
    // The daemonset mode (the default) renders its DaemonSet and no sidecar ConfigMaps.
    let docs = parse_docs(&helm_template(&[
        "-f",
        &format!("{CHART}/ci/cert-manager-values.yaml"),
    ]));
    daemonset(&docs);
    assert!(docs.iter().all(|d| !name(d).contains("sidecar")));
}

/// What sidecar mode requires is refused by `helm template`, naming the value; so is a
/// workload chart that includes the sidecar templates with the dependency in daemonset mode,
/// or for a Kubernetes without native sidecars.
#[test]
fn chart_sidecar_mode_refuses_missing_values_naming_them() {
    let values = format!("{CHART}/ci/sidecar-values.yaml");
    let cases: [(&[&str], &str); 5] = [
        (&["--set", "bindings=null"], "bindings"),
        (&["--set-json", "bindings=[]"], "/bindings"),
        (&["--set", "issuer.keySecretName="], "/issuer/keySecretName"),
        (&["--set", "issuer.url="], "/issuer/url"),
        (&["--set", "mode=sidecars"], "/mode"),
    ];
    for (more, named) in cases {
        let args: Vec<&str> = ["-f", values.as_str()]
            .into_iter()
            .chain(more.iter().copied())
            .collect();
        let out = helm_template_out(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{more:?} must be refused");
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                && stderr.contains(named),
            "{more:?}: the error names {named}:\n{stderr}"
        );
    }
    helm_template(&["-f", &values]);

    let out = workload_template_out(&["--set", "identity-binding-proxy.mode=daemonset"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("set mode: sidecar"), "{stderr}");
    let out = workload_template_out(&["--set", "identity-binding-proxy.bindings=null"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("'bindings'"), "{stderr}");
    // Native sidecars are Kubernetes 1.29's; the chart's own templates say so too.
    let out = Command::new(helm())
        .current_dir(repo())
        .args(["template", "web", CHART, "--kube-version", "1.28.0", "-f"])
        .arg(&values)
        .args(["--set", "kustomize=true"])
        .output()
        .expect("helm runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("needs Kubernetes 1.29"), "{stderr}");
}

/// The kustomize component's patch is the chart's sidecar templates' rendering: a hand edit of
/// it fails scripts/render-deploy.sh --check, naming the file.
#[test]
fn sidecar_component_is_the_charts_rendering_and_drift_fails() {
    let stderr = drift_after_edit("deploy/components/sidecar/sidecar.yaml", |text| {
        assert!(text.starts_with("# Rendered from charts/identity-binding-proxy/templates/"));
        text.replace("127.0.0.1:18443", "0.0.0.0:18443")
    });
    assert!(
        stderr.contains("DRIFT: deploy/components/sidecar/sidecar.yaml"),
        "{stderr}"
    );
}
