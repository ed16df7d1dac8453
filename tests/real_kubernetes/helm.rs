//! The Helm chart installed for real: `helm install` into the real apiserver, the objects
//! accepted (schema, admission, Pod Security), the proxy's `serve` ready as the chart's
//! ServiceAccount with the chart's RBAC, and `helm uninstall` removing the cluster-scoped
//! objects. A wrong value is refused by `helm install` with a message naming it, before
//! anything reaches the cluster.
//!
//! The chart's sidecar mode, as a workload chart takes it (tests/fixtures/sidecar-workload-chart):
//! installed for real, the Deployment with its native sidecar and the chart's ConfigMaps are
//! accepted, and the sidecar container READ BACK from the apiserver (its args, its env with its
//! envFrom ConfigMap, its volumes filled from the apiserver's Secret, ConfigMaps and a token
//! bound to the pod) starts our binary into a sidecar that serves its pod's account.

use crate::common;
use crate::harness::*;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const RELEASE: &str = "ibp-chart";
const NS: &str = "ibp-helm";
/// The chart's object names for a release whose name does not contain the chart's.
const NAME: &str = "ibp-chart-identity-binding-proxy";

fn helm(c: &Cluster, args: &[&str]) -> Output {
    Command::new(c.bin("helm"))
        .args(args)
        .args(["--kubeconfig", c.get("KUBECONFIG")])
        .current_dir(repo())
        .output()
        .expect("helm runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn helm_install_is_accepted_and_serve_is_ready_as_the_charts_service_account() {
    let c = shared();
    let cid = "3b0c7a52-9d14-4e3f-8a61-0f2e5d9c7b18";
    let chart = repo().join("charts/identity-binding-proxy");
    let chart = chart.to_string_lossy();
    let values = c.path().join("helm-values.yaml");
    std::fs::write(
        &values,
        format!(
            "issuer:\n  url: https://issuer.example.com/{{tenant}}/{{client_id}}\n  keySecretName: issuer-key\n\
             bindings:\n  - clientId: {cid}\n    tenantId: {TENANT}\n\
             tls: {{source: secret, secretName: serving-cert}}\n"
        ),
    )
    .unwrap();
    let values = values.to_string_lossy();

    // 1. Wrong values: refused by the schema, naming the value; nothing is installed.
    for (set, named) in [
        ("issuer.url=http://issuer.example.com/x", "/issuer/url"),
        ("issuer.keySecretName=", "/issuer/keySecretName"),
        ("tls.source=vault", "/tls/source"),
    ] {
        let out = helm(
            c,
            &[
                "install", RELEASE, &chart, "-n", NS, "-f", &values, "--set", set,
            ],
        );
        assert!(!out.status.success(), "{set} must be refused");
        assert!(text(&out).contains(named), "{set}: {}", text(&out));
    }
    let out = c.kubectl_out(&["get", "namespace", NS], None);
    assert!(!out.status.success(), "a refused install creates nothing");

    // 2. The install into a namespace created first (Helm keeps the release in it), labelled
    //    for Pod Security "restricted" as docs/installation.md says: every object accepted by
    //    the real apiserver, admission included.
    c.kubectl(&["create", "namespace", NS]);
    c.kubectl(&[
        "label",
        "namespace",
        NS,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    let out = helm(c, &["install", RELEASE, &chart, "-n", NS, "-f", &values]);
    assert!(out.status.success(), "helm install: {}", text(&out));
    assert!(text(&out).contains("STATUS: deployed"), "{}", text(&out));
    let status = helm(c, &["status", RELEASE, "-n", NS, "-o", "json"]);
    assert!(status.status.success(), "{}", text(&status));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["info"]["status"], "deployed");
    let sa = c.kubectl(&[
        "get",
        "daemonset",
        "-n",
        NS,
        NAME,
        "-o",
        "jsonpath={.spec.template.spec.serviceAccountName}",
    ]);
    assert_eq!(sa, NAME);
    let bindings = c.kubectl(&[
        "get",
        "configmap",
        "-n",
        NS,
        &format!("{NAME}-bindings"),
        "-o",
        "jsonpath={.data.bindings\\.yaml}",
    ]);
    assert!(bindings.contains(cid), "{bindings}");

    // 3. serve as the chart's ServiceAccount (the chart's ClusterRole and binding are all it
    //    has): ready, and a granted pod gets its token.
    let token = c.granted_workload(("helm-apps", "worker", "worker-0"), "use-mi-helm", cid);
    let kubeconfig = c.sa_kubeconfig(NS, NAME);
    {
        let p = Proxy::start(&kubeconfig, &[(cid, TENANT)], &[]);
        p.wait_ready();
        let (status, why) = p.request(cid, &token);
        assert_eq!(status, 200, "{why}\n{}", p.logs());
    }

    // 4. Uninstall removes the cluster-scoped objects too.
    let out = helm(c, &["uninstall", RELEASE, "-n", NS, "--wait"]);
    assert!(out.status.success(), "helm uninstall: {}", text(&out));
    for kind in ["clusterrole", "clusterrolebinding"] {
        let out = c.kubectl_out(&["get", kind, NAME], None);
        assert!(!out.status.success(), "{kind} {NAME} is gone");
    }
}

const SIDECAR_NS: &str = "ibp-helm-sidecar";
const SIDECAR_CID: &str = "9c4e1f27-5b3a-4d8e-b6f0-2a7c9e1d4b53";
/// The workload chart's release: its Deployment is named after it.
const WORKLOAD: &str = "web";
/// The Pod object stored from the Deployment's template (no controller or kubelet runs here).
const WORKLOAD_POD: &str = "web-0";

fn kubectl_json(c: &Cluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&c.kubectl(&all)).expect("kubectl prints JSON")
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Fills the directory a pod volume would be mounted from, reading the objects it names from
/// the apiserver as the kubelet would: Secret and ConfigMap keys as files, a projected
/// service-account token (audience the apiserver's, bound to the pod), the namespace.
fn fill_volume(c: &Cluster, volume: &Value, dir: &Path, sa: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let write_items = |data: &serde_json::Map<String, Value>, items: &[Value], decode: bool| {
        let mut files: Vec<(String, String)> = if items.is_empty() {
            data.keys().map(|k| (k.clone(), k.clone())).collect()
        } else {
            items
                .iter()
                .map(|i| {
                    (
                        str_of(&i["key"]).to_string(),
                        str_of(&i["path"]).to_string(),
                    )
                })
                .collect()
        };
        files.sort();
        for (key, path) in files {
            let value = str_of(&data[&key]);
            let bytes = if decode {
                base64::engine::general_purpose::STANDARD
                    .decode(value)
                    .expect("Secret data is base64")
            } else {
                value.as_bytes().to_vec()
            };
            std::fs::write(dir.join(path), bytes).unwrap();
        }
    };
    if volume["emptyDir"].is_object() {
    } else if let Some(name) = volume["secret"]["secretName"].as_str() {
        let secret = kubectl_json(c, &["get", "secret", "-n", SIDECAR_NS, name]);
        let data = secret["data"].as_object().expect("the Secret has data");
        write_items(data, array(&volume["secret"]["items"]), true);
    } else if let Some(name) = volume["configMap"]["name"].as_str() {
        let cm = kubectl_json(c, &["get", "configmap", "-n", SIDECAR_NS, name]);
        let data = cm["data"].as_object().expect("the ConfigMap has data");
        write_items(data, array(&volume["configMap"]["items"]), false);
    } else if volume["projected"].is_object() {
        for source in array(&volume["projected"]["sources"]) {
            if source["serviceAccountToken"].is_object() {
                let token = c.token(SIDECAR_NS, sa, c.get("ISSUER"), Some(WORKLOAD_POD));
                let path = str_of(&source["serviceAccountToken"]["path"]);
                std::fs::write(dir.join(path), token).unwrap();
            } else if let Some(name) = source["configMap"]["name"].as_str() {
                let cm = kubectl_json(c, &["get", "configmap", "-n", SIDECAR_NS, name]);
                let data = cm["data"].as_object().expect("the ConfigMap has data");
                write_items(data, array(&source["configMap"]["items"]), false);
            } else if source["downwardAPI"].is_object() {
                for item in array(&source["downwardAPI"]["items"]) {
                    assert_eq!(item["fieldRef"]["fieldPath"], "metadata.namespace");
                    std::fs::write(dir.join(str_of(&item["path"])), SIDECAR_NS).unwrap();
                }
            } else {
                panic!("a projected source the test cannot fill: {source}");
            }
        }
    } else {
        panic!("a volume the test cannot fill: {volume}");
    }
}

#[test]
fn helm_sidecar_workload_chart_is_accepted_and_its_rendered_sidecar_serves_its_pod() {
    let c = shared();
    // From here: this test's own time (the shared cluster is up).
    let started = std::time::Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("ibp-helm-sidecar-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    // 1. The workload's namespace, issuer key and grant.
    prepare_workload_namespace(c, d);
    // 2. The workload chart installed.
    install_workload_chart(c, d);
    // 3. The Deployment as the apiserver stores it.
    let workload = StoredWorkload::read(c);
    // 4. The Pod the Deployment's ReplicaSet would create, stored as such.
    store_workload_pod(c, &workload);

    // 5. The sidecar's process, exactly as rendered: the image's entrypoint (`serve`), the
    //    container's args, its envFrom ConfigMap then its env (read back from the apiserver),
    //    each mount path mapped to a directory filled from the volume's source. Two settings
    //    name services outside the cluster and are pointed at their emulators on loopback:
    //    IBP_ISSUER_URL and IBP_AUTHORITY_HOST. The in-cluster API configuration's fixed
    //    path becomes IBP_KUBECONFIG, built from the mapped token volume.
    let mounts = mount_sidecar_volumes(c, &workload, &d.join("volumes"));
    let mut env = sidecar_env(c, &workload, &mounts);
    // The Secret's key, as mounted, is the one published for the workload's identity.
    let key_dir = mounts.local_of("/etc/identity-binding-proxy/issuer");
    assert_eq!(
        std::fs::read(key_dir.join("issuer.key")).unwrap(),
        std::fs::read(d.join("web.key")).unwrap()
    );
    let emulators = Emulators::start(d, &d.join("web.pub"), &[(SIDECAR_CID, TENANT)]);
    env.insert("IBP_ISSUER_URL".into(), emulators.issuer_url.clone());
    env.insert(
        "IBP_AUTHORITY_HOST".into(),
        emulators.authority_host.clone(),
    );
    let api = mounts.local_of("/var/run/secrets/kubernetes.io/serviceaccount");
    let token = std::fs::read_to_string(api.join("token")).unwrap();
    let kubeconfig = c.token_kubeconfig_with_ca(
        &token,
        &api.join("ca.crt"),
        &d.join("in-cluster-kubeconfig"),
    );
    env.insert("IBP_KUBECONFIG".into(), kubeconfig.display().to_string());
    let sidecar = Sidecar::start(d, &workload.sidecar, &env);
    // Ready on the admin address the probes use (JWKS read, its account learned with the
    // pod's token, the CA written where the app reads it).
    let admin = &env["IBP_ADMIN_LISTEN"];
    let ready = within(Duration::from_secs(30), || {
        http_ok(&format!("http://{admin}/readyz"))
    });
    assert!(
        ready.is_some(),
        "the sidecar did not become ready:\n{}",
        sidecar.logs()
    );
    let ready_after = started.elapsed();

    // 6. The app's view.
    app_gets_its_token_and_another_account_is_refused(c, &workload, &mounts, &sidecar);
    drop(sidecar);
    drop(emulators);

    let out = helm(c, &["uninstall", WORKLOAD, "-n", SIDECAR_NS, "--wait"]);
    assert!(out.status.success(), "helm uninstall: {}", text(&out));
    eprintln!(
        "helm sidecar: installed and the sidecar ready after {ready_after:?}, all done in {:?}",
        started.elapsed()
    );
}

/// The workload's namespace ("restricted"), its issuer key Secret (created by the user, never
/// a chart value; the key pair in `d`), and its grant: a namespaced Role, nothing else.
/// Another account of the namespace is granted the same identity.
fn prepare_workload_namespace(c: &Cluster, d: &Path) {
    c.kubectl(&["create", "namespace", SIDECAR_NS]);
    c.kubectl(&[
        "label",
        "namespace",
        SIDECAR_NS,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    run_ok(
        Command::new(BIN)
            .args(["issuer", "keygen", "--out"])
            .arg(d.join("web.key")),
    );
    c.kubectl(&[
        "create",
        "secret",
        "generic",
        "web-issuer-key",
        "-n",
        SIDECAR_NS,
        &format!("--from-file=issuer.key={}", d.join("web.key").display()),
    ]);
    c.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: other, namespace: {SIDECAR_NS}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: use-{SIDECAR_CID}, namespace: {SIDECAR_NS}}}\n\
         rules: [{{apiGroups: [\"{GRANT_GROUP}\"], resources: [\"{SIDECAR_CID}\"], verbs: [\"{VERB}\"]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: uses-{SIDECAR_CID}, namespace: {SIDECAR_NS}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: use-{SIDECAR_CID}}}\n\
         subjects: [{{kind: ServiceAccount, name: web}}, {{kind: ServiceAccount, name: other}}]\n"
    ));
}

/// The workload chart (tests/fixtures/sidecar-workload-chart, with our chart as its
/// dependency in sidecar mode) installed: its Deployment and the dependency's ConfigMaps
/// accepted by the real apiserver.
fn install_workload_chart(c: &Cluster, d: &Path) {
    let chart = repo().join("tests/fixtures/sidecar-workload-chart");
    let chart = chart.to_string_lossy();
    let out = helm(c, &["dependency", "build", &chart]);
    assert!(
        out.status.success(),
        "helm dependency build: {}",
        text(&out)
    );
    let values = d.join("values.yaml");
    std::fs::write(
        &values,
        format!(
            "serviceAccount: {{name: web, clientId: {SIDECAR_CID}, tenantId: {TENANT}}}\n\
             identity-binding-proxy:\n  mode: sidecar\n\
             \x20 issuer: {{url: \"https://issuer.example.com/{{tenant}}/{{client_id}}\", keySecretName: web-issuer-key}}\n\
             \x20 bindings: [{{clientId: {SIDECAR_CID}, tenantId: {TENANT}}}]\n"
        ),
    )
    .unwrap();
    let out = helm(
        c,
        &[
            "install",
            WORKLOAD,
            &chart,
            "-n",
            SIDECAR_NS,
            "-f",
            &values.to_string_lossy(),
        ],
    );
    assert!(out.status.success(), "helm install: {}", text(&out));
    assert!(text(&out).contains("STATUS: deployed"), "{}", text(&out));
}

/// The workload's Deployment as the apiserver stores it.
struct StoredWorkload {
    /// Its pod template.
    template: Value,
    /// The sidecar: an init container.
    sidecar: Value,
    /// The app container's env.
    app_env: BTreeMap<String, String>,
}

impl StoredWorkload {
    /// Reads the Deployment back: the native sidecar's restartPolicy kept (an apiserver
    /// without native sidecars would refuse or drop it), the webhook told to skip it.
    fn read(c: &Cluster) -> Self {
        let deployment = kubectl_json(c, &["get", "deployment", "-n", SIDECAR_NS, WORKLOAD]);
        let template = deployment["spec"]["template"].clone();
        let spec = &template["spec"];
        let sidecar = array(&spec["initContainers"])
            .iter()
            .find(|x| x["name"] == "identity-binding-proxy")
            .expect("the sidecar is stored as an init container")
            .clone();
        assert_eq!(sidecar["restartPolicy"], "Always", "{sidecar}");
        assert_eq!(
            template["metadata"]["annotations"]["azure.workload.identity/skip-containers"],
            "identity-binding-proxy"
        );
        let app = array(&spec["containers"])
            .iter()
            .find(|x| x["name"] == "app")
            .expect("the app container");
        let app_env = array(&app["env"])
            .iter()
            .map(|e| (str_of(&e["name"]).into(), str_of(&e["value"]).into()))
            .collect();
        Self {
            template,
            sidecar,
            app_env,
        }
    }

    fn spec(&self) -> &Value {
        &self.template["spec"]
    }
}

/// The Pod the Deployment's ReplicaSet would create, stored as such: admitted under Pod
/// Security "restricted". No kubelet runs it; the tokens below are bound to it.
fn store_workload_pod(c: &Cluster, workload: &StoredWorkload) {
    let template = &workload.template;
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": WORKLOAD_POD,
            "namespace": SIDECAR_NS,
            "labels": template["metadata"]["labels"],
            "annotations": template["metadata"]["annotations"],
        },
        "spec": workload.spec(),
    });
    let out = c.kubectl_out(&["create", "-f", "-"], Some(&pod.to_string()));
    assert!(
        out.status.success(),
        "the pod template is admitted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The root CA ConfigMap the projected API token volume reads: published in every
    // namespace by kube-controller-manager's root-ca-cert-publisher, which this control plane
    // does not run; published here with the apiserver's CA, as it would be.
    if !c
        .kubectl_out(
            &["get", "configmap", "-n", SIDECAR_NS, "kube-root-ca.crt"],
            None,
        )
        .status
        .success()
    {
        c.kubectl(&[
            "create",
            "configmap",
            "kube-root-ca.crt",
            "-n",
            SIDECAR_NS,
            &format!("--from-file=ca.crt={}", c.get("CA_FILE")),
        ]);
    }
}

/// The sidecar's mount paths, each mapped to the local directory filled from its volume;
/// longest path first.
struct Mounts(Vec<(String, PathBuf)>);

impl Mounts {
    /// `value` with every mount path in it replaced by its local directory.
    fn map(&self, value: &str) -> String {
        let mut v = value.to_string();
        for (path, local) in &self.0 {
            v = v.replace(&format!("{path}/"), &format!("{}/", local.display()));
        }
        v
    }

    fn local_of(&self, path: &str) -> PathBuf {
        self.0
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, l)| l.clone())
            .unwrap_or_else(|| panic!("{path} is not mounted"))
    }
}

/// Fills a directory under `root` for each of the sidecar's volume mounts, from its volume.
fn mount_sidecar_volumes(c: &Cluster, workload: &StoredWorkload, root: &Path) -> Mounts {
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in array(&workload.sidecar["volumeMounts"]) {
        let name = str_of(&m["name"]);
        let volume = array(&workload.spec()["volumes"])
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"));
        let local = root.join(name);
        fill_volume(c, volume, &local, "web");
        mounts.push((str_of(&m["mountPath"]).to_string(), local));
    }
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    Mounts(mounts)
}

/// The sidecar's environment as rendered: its envFrom ConfigMap (the chart's settings, read
/// back from the apiserver), then its env with the mount paths mapped.
fn sidecar_env(
    c: &Cluster,
    workload: &StoredWorkload,
    mounts: &Mounts,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for from in array(&workload.sidecar["envFrom"]) {
        let name = str_of(&from["configMapRef"]["name"]);
        let cm = kubectl_json(c, &["get", "configmap", "-n", SIDECAR_NS, name]);
        for (k, v) in cm["data"].as_object().expect("settings").iter() {
            env.insert(k.clone(), str_of(v).to_string());
        }
    }
    assert_eq!(
        env.get("IBP_ISSUER_URL").map(String::as_str),
        Some("https://issuer.example.com/{tenant}/{client_id}"),
        "the chart's settings ConfigMap: {env:?}"
    );
    for e in array(&workload.sidecar["env"]) {
        assert!(
            e["valueFrom"].is_null(),
            "a value the test cannot resolve: {e}"
        );
        env.insert(
            str_of(&e["name"]).to_string(),
            mounts.map(str_of(&e["value"])),
        );
    }
    env
}

/// The sidecar's process (`serve` with the container's args, `env` only), killed on drop.
struct Sidecar {
    _process: KillOnDrop,
    log: PathBuf,
    err: PathBuf,
}

impl Sidecar {
    fn start(d: &Path, container: &Value, env: &BTreeMap<String, String>) -> Self {
        let (log, err) = (d.join("sidecar.log"), d.join("sidecar.err"));
        let process = Command::new(BIN)
            .arg("serve")
            .args(array(&container["args"]).iter().map(str_of))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("the sidecar starts");
        Self {
            _process: KillOnDrop(process),
            log,
            err,
        }
    }

    fn logs(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default()
        )
    }
}

/// The app's view: AZURE_KUBERNETES_TOKEN_PROXY, _SNI_NAME and _CA_FILE (its CA path mapped
/// like the sidecar's). Its own pod's token gets a token; another account's token is
/// refused, named.
fn app_gets_its_token_and_another_account_is_refused(
    c: &Cluster,
    workload: &StoredWorkload,
    mounts: &Mounts,
    sidecar: &Sidecar,
) {
    let app_env = &workload.app_env;
    let ca_file = mounts.map(&app_env["AZURE_KUBERNETES_CA_FILE"]);
    let ca = std::fs::read(&ca_file).expect("the sidecar wrote the CA the app reads");
    let endpoint: std::net::SocketAddr = app_env["AZURE_KUBERNETES_TOKEN_PROXY"]
        .strip_prefix("https://")
        .expect("https")
        .parse()
        .expect("ADDR:PORT");
    let client = common::Client::new(
        endpoint,
        &app_env["AZURE_KUBERNETES_SNI_NAME"],
        &ca,
        &[b"http/1.1"],
    );
    let ask = |token: &str| ask_token(&client, SIDECAR_CID, token);
    let own = c.token(SIDECAR_NS, "web", &audience(), Some(WORKLOAD_POD));
    let (status, why) = ask(&own);
    assert_eq!(status, 200, "{why}\n{}", sidecar.logs());
    let other = c.token(SIDECAR_NS, "other", &audience(), None);
    let (status, why) = ask(&other);
    assert_eq!(status, 403, "{why}");
    assert!(
        why.contains(&format!("system:serviceaccount:{SIDECAR_NS}:other")),
        "{why}"
    );
}
