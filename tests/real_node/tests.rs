//! The tests through the node, in the order `main` runs them: each builds on what the one
//! before installed (the chart, the webhook, the example app).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::node::*;

/// The nodes the suite brings up: node-1 runs the tests a-f, node-2 joins for (g).
pub const NODES: usize = 2;
/// How the proxy's process is started (the Dockerfile's ENTRYPOINT).
const PROXY_CMD: &str = "/usr/local/bin/identity-binding-proxy serve";

/// The machine's state (`real-cluster.sh host-state`: sysctls, iptables, IPv4 routes, links,
/// network namespaces, mounts, the nodes' cgroups), compared with what `up` recorded before the
/// node started. While the node runs, its own objects are left out (named for the run: its
/// ibp-<id> namespaces and cgroups, ibp<id> veths, 10.200/10.244 routes, mounts under its
/// directory); after `down` nothing is, and no process of the run may be left.
pub fn host_state_is_untouched(node: &Node, when: &str, node_running: bool) {
    let before = std::fs::read_to_string(node.path().join("nodes/host-state.before"))
        .expect("up recorded the machine's state");
    let now = run_ok(
        Command::new("bash")
            .arg(repo().join("scripts/real-cluster.sh"))
            .arg("host-state"),
    );
    assert!(before.contains("vm/overcommit_memory="), "{before}");
    assert!(before.contains("mount /proc proc"), "{before}");
    let ns = std::fs::read_to_string(node.path().join("nodes/node-1/netns")).unwrap();
    let id = ns
        .trim()
        .trim_start_matches("ibp-")
        .trim_end_matches("-node-1");
    let dir = std::fs::canonicalize(node.path()).unwrap();
    let dir = dir.to_string_lossy();
    let marks = [
        format!("ibp-{id}"),
        format!("ibp{id}"),
        dir.to_string(),
        "10.200.".into(),
        "10.244.".into(),
    ];
    let machine = |state: &str| -> Vec<String> {
        state
            .lines()
            .filter(|l| !node_running || !marks.iter().any(|m| l.contains(m.as_str())))
            .map(str::to_string)
            .collect()
    };
    let (was, is) = (machine(&before), machine(&now));
    let added: Vec<_> = is.iter().filter(|l| !was.contains(l)).collect();
    let gone: Vec<_> = was.iter().filter(|l| !is.contains(l)).collect();
    assert_eq!(
        was, is,
        "the machine's state changed ({when}): added {added:#?}, gone {gone:#?}"
    );
    if !node_running {
        let left = processes_naming(&dir);
        assert!(
            left.is_empty(),
            "processes of the run left after down: {left:#?}"
        );
    }
    eprintln!(
        "host state ({when}) unchanged ({} lines; node objects left out: {node_running}):\n{}",
        was.len(),
        was.iter().take(7).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Processes (but this one) whose command line names `dir`, or that are a node's apiserver
/// forwarder (its command line names the node link's address, not the directory).
fn processes_naming(dir: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(dir) || cmdline.starts_with("socat TCP-LISTEN:6443,bind=10.200.") {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// What the tests share: the emulators, the serving CA, the chart's values.
pub struct Context<'a> {
    pub node: &'a Node,
    pub emulators: Emulators,
    pub ca: String,
    pub dir: tempfile::TempDir,
}

impl<'a> Context<'a> {
    pub fn new(node: &'a Node) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let emulators = Emulators::start(dir.path(), &[DEMO_CID, SIDECAR_CID]);
        let (ca, _, _) = serving_pki(dir.path());
        let ca = std::fs::read_to_string(ca).unwrap();
        Self {
            node,
            emulators,
            ca,
            dir,
        }
    }

    /// The chart's values: DaemonSet mode, the certificate from a Secret, the image built from
    /// the Dockerfile. The schema asks for https issuer and authority URLs (public hosts); the
    /// proxy here is pointed at our emulators instead, through the chart's extraEnv.
    pub fn values(&self, extra: &str) -> std::path::PathBuf {
        let image = self.node.get("PROXY_IMAGE");
        let (repository, tag) = image.rsplit_once(':').unwrap();
        let path = self.dir.path().join("values.yaml");
        std::fs::write(
            &path,
            format!(
                "image: {{repository: {repository}, tag: \"{tag}\", pullPolicy: Never}}\n\
                 issuer: {{url: \"https://issuer.example.com/{{tenant}}/{{client_id}}\", keySecretName: issuer-key}}\n\
                 bindings: [{{clientId: {DEMO_CID}, tenantId: {TENANT}}}]\n\
                 tls: {{source: secret, secretName: serving-cert}}\n\
                 logFormat: text\n\
                 extraEnv: {}\n{extra}",
                self.emulators.extra_env()
            ),
        )
        .unwrap();
        path
    }

    /// `helm install` or `helm upgrade` of the chart with [`Context::values`] and `extra`.
    pub fn helm_chart(&self, verb: &str, extra: &str) -> String {
        let chart = repo().join("charts/identity-binding-proxy");
        let values = self.values(extra);
        self.node.helm_ok(&[
            verb,
            RELEASE,
            chart.to_str().unwrap(),
            "-n",
            NS,
            "-f",
            values.to_str().unwrap(),
        ])
    }
}

/// (a) helm install of the chart (DaemonSet mode) and of the real webhook chart: the proxy's pod
/// is Ready through its own probes, runs as 65532 on a read-only root filesystem, and has read
/// its mounted key, certificate and ConfigMaps.
pub fn chart_daemonset_is_ready_as_65532_on_a_read_only_root(ctx: &Context) {
    let n = ctx.node;
    let d = ctx.dir.path();
    n.kubectl(&["create", "namespace", NS]);
    n.kubectl(&[
        "label",
        "namespace",
        NS,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    let (crt, key) = (d.join("tls.crt"), d.join("tls.key"));
    n.kubectl(&[
        "create",
        "secret",
        "tls",
        "serving-cert",
        "-n",
        NS,
        &format!("--cert={}", crt.display()),
        &format!("--key={}", key.display()),
    ]);
    n.kubectl(&[
        "create",
        "secret",
        "generic",
        "issuer-key",
        "-n",
        NS,
        &format!(
            "--from-file=issuer.key={}",
            ctx.emulators.issuer_key.display()
        ),
    ]);
    let out = ctx.helm_chart("install", "");
    assert!(out.contains("STATUS: deployed"), "{out}");

    let webhook_values = repo().join("deploy/webhook/values.yaml");
    n.helm_ok(&[
        "install",
        "workload-identity-webhook",
        n.get("WEBHOOK_CHART"),
        "-n",
        WEBHOOK_NS,
        "--create-namespace",
        "--values",
        webhook_values.to_str().unwrap(),
        "--set",
        &format!("azureTenantID={TENANT}"),
    ]);

    let ready = Instant::now();
    n.wait(
        NS,
        "daemonset/identity-binding-proxy",
        &format!("jsonpath={{.status.numberReady}}={NODES}"),
        180,
    );
    eprintln!(
        "the proxy's pod Ready {:.1?} after helm install",
        ready.elapsed()
    );
    assert_eq!(n.proxy_pods().len(), NODES, "one proxy per node");
    let (pod, _, is_ready) = n.proxy_pods_on("node-1").remove(0);
    assert!(is_ready);
    let p = n.json(&["get", "pod", "-n", NS, &pod]);
    let status = &p["status"]["containerStatuses"][0];
    assert_eq!(
        status["image"]
            .as_str()
            .unwrap()
            .trim_start_matches("docker.io/"),
        n.get("PROXY_IMAGE")
    );
    assert_eq!(status["restartCount"], 0);

    assert_runs_as_65532_on_a_read_only_root(host_pids("node-1", PROXY_CMD));
    // What it read from them.
    let logs = n.logs(NS, &pod);
    eprintln!(
        "proxy log (kubectl logs):\n{}",
        logs.lines().take(12).collect::<Vec<_>>().join("\n")
    );
    // The issuer key from its Secret mount signs (the certificate and the bindings ConfigMap
    // are what /readyz waited for; (b) uses both).
    assert!(logs.contains("issuer key: signing"), "{logs}");

    n.wait(
        WEBHOOK_NS,
        "deployment/azure-wi-webhook-controller-manager",
        "condition=Available",
        180,
    );
}

/// The example app's namespace, service account and grant (deploy/overlays/example-app), the
/// proxy's CA in it, and its pod with `image` and `command`, named `name`.
fn example_pod(ctx: &Context, name: &str, image: &str, command: &[&str]) -> Value {
    example_pod_on(ctx, "node-1", name, image, command)
}

/// The same, on node `node` (the overlay's pod, pinned: the test reads that node's proxy's log).
fn example_pod_on(ctx: &Context, node: &str, name: &str, image: &str, command: &[&str]) -> Value {
    let n = ctx.node;
    let overlay = repo().join("deploy/overlays/example-app");
    let rendered = n.kubectl(&["kustomize", overlay.to_str().unwrap()]);
    let docs: Vec<Value> = rendered
        .split("\n---\n")
        .map(|d| {
            serde_json::to_value(serde_norway::from_str::<serde_norway::Value>(d).unwrap()).unwrap()
        })
        .collect();
    for d in docs.iter().filter(|d| d["kind"] != "Pod") {
        n.apply(&d.to_string());
    }
    ca_configmap(ctx, "demo");
    let mut pod = docs.iter().find(|d| d["kind"] == "Pod").unwrap().clone();
    pod["metadata"]["name"] = json!(name);
    pod["spec"]["nodeSelector"] = json!({"real-cluster/node": node});
    let c = &mut pod["spec"]["containers"][0];
    c["image"] = json!(image);
    c["imagePullPolicy"] = json!("Never");
    c["command"] = json!(command);
    c["stdin"] = json!(true);
    // failurePolicy Fail: while the webhook starts, creation is refused; retry until it serves.
    let created = within(Duration::from_secs(60), || {
        n.kubectl_out(&["create", "-f", "-"], Some(&pod.to_string()))
            .status
            .success()
    });
    assert!(
        created.is_some(),
        "the pod was never admitted: {}",
        text(&n.kubectl_out(&["create", "-f", "-"], Some(&pod.to_string())))
    );
    n.wait("demo", &format!("pod/{name}"), "condition=Ready", 120);
    n.json(&["get", "pod", "-n", "demo", name])
}

fn env_of(pod: &Value, name: &str) -> String {
    pod["spec"]["containers"][0]["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == name))
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("the webhook injected no {name}: {pod}"))
        .to_string()
}

/// (b) The example app as real pods mutated by the real webhook: the Go client, then the Python
/// SDK, get a token through the injected URL (CoreDNS, kube-proxy, the node's proxy) with the
/// token the kubelet projected; the proxy's request log shows each.
pub fn example_app_gets_tokens_through_the_injected_url(ctx: &Context) {
    let n = ctx.node;
    let go = example_pod(ctx, "demo", n.get("GO_CLIENT_IMAGE"), &["/client"]);
    assert_eq!(
        env_of(&go, "AZURE_KUBERNETES_TOKEN_PROXY"),
        "https://identity-binding-proxy.identity-binding-proxy.svc"
    );
    assert_eq!(env_of(&go, "AZURE_KUBERNETES_SNI_NAME"), SNI);
    let token_file = env_of(&go, "AZURE_FEDERATED_TOKEN_FILE");
    let (reply, took) = PodClient::start(n, "demo", "demo", &["/client"]).ask("get");
    assert_eq!(reply["ok"], true, "Go client in the pod: {reply}");
    eprintln!("Go client in pod demo/demo: token in {took:.1?}");

    let (proxy_pod, _, _) = n.proxy_pods_on("node-1").remove(0);
    let logs = logs_until(n, &proxy_pod, |l| l.contains(DEMO_CID)).unwrap_or_else(|l| l);
    let line = logs
        .lines()
        .rev()
        .find(|l| l.contains("demo") && l.contains(DEMO_CID));
    assert!(
        line.is_some(),
        "the proxy logged the pod's request:\n{logs}"
    );
    eprintln!("proxy request log: {}", line.unwrap());
    // The token is the kubelet's projection (the webhook's volume), not one this test made.
    assert!(
        token_file.starts_with("/var/run/secrets/azure/"),
        "{token_file}"
    );

    let py_image = n.get("PYTHON_CLIENT_IMAGE");
    example_pod(ctx, "demo-python", py_image, &["sleep", "infinity"]);
    let mut py = python_client(n);
    let (reply, took) = py.ask("get");
    assert_eq!(reply["ok"], true, "Python SDK in the pod: {reply}");
    eprintln!("Python SDK in pod demo/demo-python: token in {took:.1?}");
    let logged = logs_until(n, &proxy_pod, |l| l.matches(DEMO_CID).count() >= 2);
    assert!(logged.is_ok(), "{}", logged.unwrap_err());
}

/// A session of the Python SDK client in pod demo/demo-python (test b creates the pod).
fn python_client(n: &Node) -> PodClient {
    PodClient::start(
        n,
        "demo",
        "demo-python",
        &["python3", "/client/get_token.py"],
    )
}

/// (c) The grant deleted: the pod's next request is refused within 2 s, and the SDK's exception
/// carries our explanation.
pub fn revoked_grant_is_refused_within_2s_in_the_sdk(ctx: &Context) {
    let n = ctx.node;
    let mut py = python_client(n);
    let (reply, _) = py.ask("fresh");
    assert_eq!(reply["ok"], true, "{reply}");
    let binding = format!("use-managed-identity-{DEMO_CID}-demo");
    n.kubectl(&["delete", "clusterrolebinding", &binding]);
    let deleted = Instant::now();
    let mut last = Value::Null;
    while deleted.elapsed() < Duration::from_secs(10) {
        let (reply, _) = py.ask("fresh");
        if reply["ok"] == false {
            last = reply;
            break;
        }
    }
    let took = deleted.elapsed();
    let error = last["error"].as_str().unwrap_or_default().to_string();
    eprintln!("refused {took:.2?} after the delete: {error}");
    assert!(
        took <= Duration::from_secs(2),
        "refused only after {took:?}"
    );
    assert!(
        error.contains("use-managed-identity") && error.contains(DEMO_CID),
        "{error}"
    );
    // The grant back, for the tests after this one.
    let rbac = repo().join("deploy/overlays/example-app/rbac.yaml");
    n.kubectl(&["apply", "-f", rbac.to_str().unwrap()]);
    let back = within(Duration::from_secs(10), || py.ask("fresh").0["ok"] == true);
    assert!(back.is_some(), "the restored grant is honoured");
}

/// (e) kill -9 of the proxy's process: the kubelet restarts the container; the requests made
/// during the gap are counted, and every request succeeds once it is Ready again.
pub fn killed_proxy_is_restarted_by_the_kubelet(ctx: &Context) {
    let n = ctx.node;
    let mut go = PodClient::start(n, "demo", "demo", &["/client"]);
    assert_eq!(go.ask("fresh").0["ok"], true);
    let pids = host_pids("node-1", PROXY_CMD);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let (pod, _, _) = n.proxy_pods_on("node-1").remove(0);
    run_ok(Command::new("kill").args(["-9", &pids[0].to_string()]));
    let killed = Instant::now();
    let (mut failed, mut asked) = (0, 0);
    let mut first_error = String::new();
    loop {
        let (reply, _) = go.ask("fresh");
        asked += 1;
        if reply["ok"] == true && killed.elapsed() > Duration::from_millis(500) {
            break;
        }
        if reply["ok"] != true {
            failed += 1;
            if first_error.is_empty() {
                first_error = reply["error"].to_string();
            }
        }
        assert!(
            killed.elapsed() < Duration::from_secs(90),
            "no token 90 s after the kill"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let gap = killed.elapsed();
    let p = n.json(&["get", "pod", "-n", NS, &pod]);
    let status = &p["status"]["containerStatuses"][0];
    assert_eq!(status["restartCount"], 1, "{status}");
    assert_eq!(
        status["lastState"]["terminated"]["exitCode"], 137,
        "{status}"
    );
    let new_pids = host_pids("node-1", PROXY_CMD);
    assert!(
        new_pids.len() == 1 && new_pids[0] != pids[0],
        "{new_pids:?}"
    );
    for _ in 0..20 {
        let (reply, _) = go.ask("fresh");
        assert_eq!(reply["ok"], true, "after the restart: {reply}");
    }
    eprintln!(
        "kill -9 at t=0: {failed} of {asked} requests failed until a token came back at {gap:.1?} \
         (first error: {first_error}); restartCount 1, exit 137; 20 of 20 after"
    );
    let previous = n.kubectl_out(&["logs", "-n", NS, &pod, "--previous"], None);
    eprintln!(
        "previous container's log tail:\n{}",
        text(&previous)
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The sidecar's identity (its own, so the DaemonSet's grant plays no part).
pub const SIDECAR_CID: &str = "9c4e1f27-5b3a-4d8e-b6f0-2a7c9e1d4b53";
const SIDECAR_NS: &str = "ibp-sidecar";

/// The fixture workload chart with its native sidecar (the image from the Dockerfile), its
/// namespace, issuer key and grants (to `web` and to `other`): the Available pod's name.
fn install_sidecar_workload(ctx: &Context) -> String {
    let n = ctx.node;
    let chart = repo().join("tests/fixtures/sidecar-workload-chart");
    let chart = chart.to_str().unwrap();
    n.helm_ok(&["dependency", "build", chart]);
    n.kubectl(&["create", "namespace", SIDECAR_NS]);
    n.kubectl(&[
        "label",
        "namespace",
        SIDECAR_NS,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    n.kubectl(&[
        "create",
        "secret",
        "generic",
        "web-issuer-key",
        "-n",
        SIDECAR_NS,
        &format!(
            "--from-file=issuer.key={}",
            ctx.emulators.issuer_key.display()
        ),
    ]);
    n.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: other, namespace: {SIDECAR_NS}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: use-{SIDECAR_CID}, namespace: {SIDECAR_NS}}}\n\
         rules: [{{apiGroups: [cid.wi.aks.azure.com], resources: [\"{SIDECAR_CID}\"], verbs: [use-managed-identity]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: uses-{SIDECAR_CID}, namespace: {SIDECAR_NS}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: use-{SIDECAR_CID}}}\n\
         subjects: [{{kind: ServiceAccount, name: web}}, {{kind: ServiceAccount, name: other}}]\n"
    ));
    // The webhook (deploy/webhook/values.yaml) projects this ConfigMap into every pod that opts
    // in, the sidecar's included (whose app then reads the sidecar's CA instead): without it the
    // pod never starts (FailedMount).
    ca_configmap(ctx, SIDECAR_NS);
    let image = n.get("PROXY_IMAGE");
    let (repository, tag) = image.rsplit_once(':').unwrap();
    let values = ctx.dir.path().join("sidecar-values.yaml");
    std::fs::write(
        &values,
        format!(
            "image: {}\nserviceAccount: {{name: web, clientId: {SIDECAR_CID}, tenantId: {TENANT}}}\n\
             identity-binding-proxy:\n  mode: sidecar\n\
             \x20 image: {{repository: {repository}, tag: \"{tag}\", pullPolicy: Never}}\n\
             \x20 issuer: {{url: \"https://issuer.example.com/{{tenant}}/{{client_id}}\", keySecretName: web-issuer-key}}\n\
             \x20 bindings: [{{clientId: {SIDECAR_CID}, tenantId: {TENANT}}}]\n\
             \x20 extraEnv: {}\n",
            n.get("PYTHON_CLIENT_IMAGE"),
            ctx.emulators.extra_env()
        ),
    )
    .unwrap();
    n.helm_ok(&[
        "install",
        "web",
        chart,
        "-n",
        SIDECAR_NS,
        "-f",
        values.to_str().unwrap(),
    ]);
    n.wait(SIDECAR_NS, "deployment/web", "condition=Available", 120);
    n.kubectl(&[
        "get",
        "pods",
        "-n",
        SIDECAR_NS,
        "-l",
        "app.kubernetes.io/name=web",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])
}

/// (f) The fixture workload chart (native sidecar) on the node: its app gets a token from its
/// own sidecar over loopback; another pod's account, presented to the same sidecar, is refused.
pub fn sidecar_serves_its_pod_and_refuses_another_pods_account(ctx: &Context) {
    let n = ctx.node;
    let pod = install_sidecar_workload(ctx);
    // The app's own token, through its sidecar on loopback.
    let client = ["python3", "/client/get_token.py"];
    let mut own = PodClient::start_in(n, SIDECAR_NS, &pod, "app", &client, &[]);
    let (reply, took) = own.ask("get");
    assert_eq!(reply["ok"], true, "the app through its sidecar: {reply}");
    let proxy_url = n.kubectl(&[
        "exec",
        "-n",
        SIDECAR_NS,
        &pod,
        "-c",
        "app",
        "--",
        "printenv",
        "AZURE_KUBERNETES_TOKEN_PROXY",
    ]);
    eprintln!("app via its sidecar at {proxy_url}: token in {took:.1?}");
    assert!(
        proxy_url.contains("127.0.0.1") || proxy_url.contains("localhost"),
        "{proxy_url}"
    );

    // Another pod, of the other account (granted the same identity): its projected token,
    // presented to this pod's sidecar, is refused — the sidecar serves only its own pod.
    let other = example_like_pod(ctx, SIDECAR_NS, "other-0", "other");
    let token_file = env_of(&other, "AZURE_FEDERATED_TOKEN_FILE");
    let other_token = n.kubectl(&[
        "exec",
        "-n",
        SIDECAR_NS,
        "other-0",
        "--",
        "cat",
        &token_file,
    ]);
    let out = n.kubectl_out(
        &[
            "exec",
            "-i",
            "-n",
            SIDECAR_NS,
            &pod,
            "-c",
            "app",
            "--",
            "sh",
            "-c",
            "cat > /dev/shm/other.token",
        ],
        Some(&other_token),
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut foreign = PodClient::start_in(
        n,
        SIDECAR_NS,
        &pod,
        "app",
        &client,
        &[("AZURE_FEDERATED_TOKEN_FILE", "/dev/shm/other.token")],
    );
    let (reply, _) = foreign.ask("fresh");
    assert_eq!(
        reply["ok"], false,
        "another pod's account must be refused: {reply}"
    );
    let error = reply["error"].as_str().unwrap_or_default();
    eprintln!("another pod's account at the sidecar: {error}");
    assert!(error.contains("other"), "{error}");
    let sidecar_log = text(&n.kubectl_out(
        &[
            "logs",
            "-n",
            SIDECAR_NS,
            &pod,
            "-c",
            "identity-binding-proxy",
        ],
        None,
    ));
    eprintln!(
        "sidecar log tail:\n{}",
        sidecar_log
            .lines()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A pod of account `sa` in `ns`, mutated by the webhook like the example app (Python image).
fn example_like_pod(ctx: &Context, ns: &str, name: &str, sa: &str) -> Value {
    let n = ctx.node;
    n.apply(
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "identity-binding-proxy-ca", "namespace": ns},
        "data": {"ca.crt": ctx.ca}})
        .to_string(),
    );
    n.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}, annotations: {{azure.workload.identity/client-id: {SIDECAR_CID}}}}}\n"
    ));
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns,
            "labels": {"azure.workload.identity/use": "true"},
            "annotations": {"azure.workload.identity/use-identity-binding": "true"}},
        "spec": {"serviceAccountName": sa, "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "app", "image": n.get("PYTHON_CLIENT_IMAGE"), "imagePullPolicy": "Never",
                "command": ["sleep", "infinity"],
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]}});
    n.apply(&pod.to_string());
    n.wait(ns, &format!("pod/{name}"), "condition=Ready", 120);
    n.json(&["get", "pod", "-n", ns, name])
}

/// (d) A rolling update under load: the example pod asks for a token every 100 ms while
/// `helm upgrade` changes the DaemonSet's pod template; not one request fails. Reports how long
/// the node had two proxies and the latencies through the roll.
pub fn rolling_update_under_load_fails_no_request(ctx: &Context) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let n = ctx.node;
    let stop = AtomicBool::new(false);
    let before: Vec<String> = n.proxy_pods_on("node-1").into_iter().map(|p| p.0).collect();
    let (results, overlap) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let mut go = PodClient::start(n, "demo", "demo", &["/client"]);
            let mut results = vec![];
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let (reply, took) = go.ask("fresh");
                results.push((
                    start.elapsed(),
                    took,
                    reply["ok"] == true,
                    reply["error"].to_string(),
                ));
                std::thread::sleep(Duration::from_millis(100));
            }
            results
        });
        std::thread::sleep(Duration::from_secs(2));
        let rolled = Instant::now();
        ctx.helm_chart("upgrade", "podAnnotations: {rolled: \"1\"}\n");
        // Two proxies on the node from the new pod's creation to the old one's removal.
        let (mut two_since, mut overlap) = (None, Duration::ZERO);
        while rolled.elapsed() < Duration::from_secs(150) {
            let pods = n.proxy_pods_on("node-1");
            let fresh_ready = pods.iter().any(|p| !before.contains(&p.0) && p.2);
            if pods.len() > 1 && two_since.is_none() {
                two_since = Some(Instant::now());
            }
            if pods.len() == 1 && fresh_ready {
                overlap = two_since.map(|t| t.elapsed()).unwrap_or_default();
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // The old pod's own drain (5 s shutdown delay) and a few requests on the new one.
        std::thread::sleep(Duration::from_secs(8));
        stop.store(true, Ordering::Relaxed);
        (load.join().unwrap(), overlap)
    });
    n.wait(
        NS,
        "daemonset/identity-binding-proxy",
        &format!("jsonpath={{.status.updatedNumberScheduled}}={NODES}"),
        120,
    );
    let after = n.proxy_pods_on("node-1");
    assert!(
        after.len() == 1 && !before.contains(&after[0].0) && after[0].2,
        "rolled: {before:?} -> {after:?}"
    );
    let failed: Vec<_> = results.iter().filter(|r| !r.2).collect();
    let max = results.iter().map(|r| r.1).max().unwrap_or_default();
    let mut latencies: Vec<Duration> = results.iter().map(|r| r.1).collect();
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    eprintln!(
        "rolling update: {} requests, {} failed; two proxies on the node for {overlap:.1?}; \
         latency median {median:.0?}, max {max:.0?}",
        results.len(),
        failed.len()
    );
    for (at, took, ok, _) in &results {
        eprint!(
            "{:.1}s:{}{:.0}ms ",
            at.as_secs_f64(),
            if *ok { "" } else { "FAIL " },
            took.as_secs_f64() * 1000.0
        );
    }
    eprintln!();
    assert!(
        failed.is_empty(),
        "failed requests during the roll: {failed:?}"
    );
    assert!(
        overlap > Duration::ZERO,
        "the node had two proxies during the roll"
    );
}

/// (g) Beyond one node: a pod on node-2 is answered by node-2's proxy, never node-1's; while
/// node-1's proxy is down (stopped, not Ready), node-2's pods keep getting tokens and node-1's
/// pods get none (internalTrafficPolicy: Local sends nothing to another node).
pub fn second_node_is_served_by_its_own_proxy(ctx: &Context) {
    let n = ctx.node;
    let (a_pod, _, _) = n.proxy_pods_on("node-1").remove(0);
    let (b_pod, _, _) = n.proxy_pods_on("node-2").remove(0);
    let demo_b = example_pod_on(
        ctx,
        "node-2",
        "demo-b",
        n.get("GO_CLIENT_IMAGE"),
        &["/client"],
    );
    // The proxy's request log names the caller's address: demo-b's own (no masquerade).
    // The text log quotes the peer as a string: peer="10.244.2.7:56736".
    let peer = format!("peer=\"{}:", demo_b["status"]["podIP"].as_str().unwrap());
    let mut b = PodClient::start(n, "demo", "demo-b", &["/client"]);
    for _ in 0..5 {
        let (reply, _) = b.ask("fresh");
        assert_eq!(reply["ok"], true, "demo-b on node-2: {reply}");
    }
    let b_log =
        logs_until(n, &b_pod, |l| l.matches(peer.as_str()).count() >= 5).unwrap_or_else(|l| l);
    let served = b_log
        .lines()
        .filter(|l| l.contains("token request") && l.contains(&peer));
    let lines: Vec<&str> = served.collect();
    assert!(
        lines.len() >= 5,
        "node-2's proxy logged demo-b's requests ({peer}):\n{b_log}"
    );
    eprintln!(
        "node-2's proxy ({b_pod}), {} lines from demo-b: {}",
        lines.len(),
        lines[lines.len() - 1]
    );
    let a_log = n.logs(NS, &a_pod);
    assert!(
        !a_log.contains(&peer),
        "node-1's proxy never saw demo-b:\n{a_log}"
    );

    // Node-1's proxy stopped (SIGSTOP): not Ready after its probe fails twice.
    let pid = host_pids("node-1", PROXY_CMD)[0];
    run_ok(Command::new("kill").args(["-STOP", &pid.to_string()]));
    let unready = within(Duration::from_secs(20), || !n.proxy_pods_on("node-1")[0].2);
    let mut a = PodClient::start(n, "demo", "demo", &["/client"]);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(unready.is_some(), "node-1's proxy became unready");
        let mut served = 0;
        for _ in 0..10 {
            served += usize::from(b.ask("fresh").0["ok"] == true);
        }
        // Node-1's pod: no token within 5 s (kube-proxy drops what has no local endpoint; the
        // SDK retries until its own 60 s deadline, so the answer is not awaited).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Unanswered until the pod goes at `down`: an error then, not a panic.
            if let Ok(reply) = a.try_ask("fresh") {
                let _ = tx.send(reply);
            }
        });
        let on_a = rx.recv_timeout(Duration::from_secs(5)).ok();
        (served, on_a)
    }));
    run_ok(Command::new("kill").args(["-CONT", &pid.to_string()]));
    let (served, on_a) = outcome.unwrap_or_else(|e| std::panic::resume_unwind(e));
    eprintln!(
        "node-1's proxy stopped (unready after {:.1?}): node-2's pod got {served} of 10 tokens; \
         node-1's pod in 5 s: {}",
        unready.unwrap(),
        on_a.as_ref()
            .map_or("no answer".to_string(), |r| r.to_string())
    );
    assert_eq!(served, 10, "node-2's pods keep getting tokens");
    assert!(
        on_a.is_none_or(|r| r["ok"] == false),
        "node-1's pod is not sent to node-2's proxy"
    );
    // No answer could also mean the request was lost anywhere: node-2's proxy never saw
    // node-1's pod either (the mirror of the check on node-1's log above).
    let a_ip = n.kubectl(&[
        "get",
        "pod",
        "-n",
        "demo",
        "demo",
        "-o",
        "jsonpath={.status.podIP}",
    ]);
    let a_peer = format!("peer=\"{a_ip}:");
    let b_log = n.logs(NS, &b_pod);
    assert!(
        !a_ip.is_empty() && !b_log.contains(&a_peer),
        "node-2's proxy never saw node-1's pod ({a_peer}):\n{b_log}"
    );
    let back = within(Duration::from_secs(30), || n.proxy_pods_on("node-1")[0].2);
    assert!(back.is_some(), "node-1's proxy Ready again after SIGCONT");
}

/// The proxy's CA as the ConfigMap the webhook projects (deploy/webhook/values.yaml).
fn ca_configmap(ctx: &Context, ns: &str) {
    ctx.node.apply(
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "identity-binding-proxy-ca", "namespace": ns},
            "data": {"ca.crt": ctx.ca}})
        .to_string(),
    );
}

/// The proxy container's process, as the machine sees it: uid 65532, a read-only root, and the
/// Secret and ConfigMap volumes mounted where the chart says.
fn assert_runs_as_65532_on_a_read_only_root(pids: Vec<u32>) {
    assert_eq!(pids.len(), 1, "one proxy process on the node: {pids:?}");
    let pid = pids[0];
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65532"; 4],
        "{uid_line}"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    let options = root.split_whitespace().nth(5).unwrap();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "root mounted read-only: {root}"
    );
    for dir in ["tls", "issuer", "bindings"] {
        let mounted = mountinfo.lines().any(|l| {
            l.split_whitespace().nth(4) == Some(&format!("/etc/identity-binding-proxy/{dir}"))
        });
        assert!(
            mounted,
            "/etc/identity-binding-proxy/{dir} is a mount:\n{mountinfo}"
        );
    }
}

/// The proxy's log once `check` holds of it (its writer batches lines: a request's line may
/// come a moment after the answer), or the last log read after 10 s as the error.
fn logs_until(n: &Node, pod: &str, check: impl Fn(&str) -> bool) -> Result<String, String> {
    let mut last = String::new();
    let held = within(Duration::from_secs(10), || {
        last = n.logs(NS, pod);
        check(&last)
    });
    held.map(|_| last.clone()).ok_or(last)
}

/// `doctor --output json` on the suite's installation (the chart's names, the webhook's
/// namespace): (exit status, report); the text report too, for the record.
fn doctor(n: &Node) -> (i32, Value) {
    let run = |output: &str| {
        Command::new(BIN)
            .args([
                "doctor",
                "--kubeconfig",
                n.get("KUBECONFIG"),
                "--output",
                output,
            ])
            .output()
            .expect("doctor runs")
    };
    eprintln!("doctor:\n{}", String::from_utf8_lossy(&run("text").stdout));
    let out = run("json");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {}", text(&out)));
    (out.status.code().unwrap_or(-1), report)
}

/// Each check's id and status.
fn statuses(report: &Value) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].to_string(), c["status"].to_string()))
        .collect()
}

/// (h) doctor on the real nodes: with node-1's proxy hung (SIGSTOP: its probes fail and its pod
/// turns not Ready) it says ✘ for `proxy.nodes` alone, naming node-1 and the command that
/// replaces the pod; that command run, the DaemonSet's new pod Ready there, ✔ again.
pub fn doctor_finds_a_node_whose_proxy_is_not_ready(ctx: &Context) {
    let n = ctx.node;
    let (_, before) = doctor(n);
    let nodes = before["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "proxy.nodes")
        .unwrap()
        .clone();
    assert_eq!(nodes["status"], "pass", "{before:#}");
    let (pod, _, _) = n.proxy_pods_on("node-1").remove(0);
    let pid = host_pids("node-1", PROXY_CMD)[0];
    run_ok(Command::new("kill").args(["-STOP", &pid.to_string()]));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let unready = within(Duration::from_secs(20), || !n.proxy_pods_on("node-1")[0].2);
        assert!(unready.is_some(), "node-1's proxy became unready");
        doctor(n)
    }));
    if outcome.is_err() {
        run_ok(Command::new("kill").args(["-CONT", &pid.to_string()]));
    }
    let (code, broken) = outcome.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert_eq!(code, 3, "{broken:#}");
    let changed: Vec<_> = statuses(&broken)
        .into_iter()
        .filter(|s| !statuses(&before).contains(s))
        .collect();
    assert_eq!(
        changed,
        vec![("\"proxy.nodes\"".to_string(), "\"fail\"".to_string())],
        "{broken:#}"
    );
    let failed = broken["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "proxy.nodes")
        .unwrap();
    assert!(
        failed["details"].to_string().contains("node-1"),
        "{failed:#}"
    );
    let fix = failed["fix"].as_str().unwrap();
    assert!(
        fix.starts_with(&format!("kubectl delete pod -n {NS} {pod}")),
        "{fix}"
    );
    let started = Instant::now();
    let path = format!(
        "{}:{}",
        n.get("BIN_DIR"),
        std::env::var("PATH").unwrap_or_default()
    );
    run_ok(
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", fix])
            .env("PATH", path)
            .env("KUBECONFIG", n.get("KUBECONFIG")),
    );
    // The stopped process ignores SIGTERM: the kubelet kills it after the grace period (45 s).
    let back = within(Duration::from_secs(150), || {
        n.proxy_pods_on("node-1")
            .first()
            .is_some_and(|p| p.0 != pod && p.2)
    });
    assert!(back.is_some(), "a new Ready proxy on node-1");
    eprintln!(
        "doctor's fix: node-1's proxy replaced and Ready in {:.1?}",
        started.elapsed()
    );
    let (code, after) = doctor(n);
    assert_eq!(statuses(&after), statuses(&before), "{after:#}");
    assert_eq!(
        code,
        i32::from(statuses(&before).iter().any(|s| s.1 == "\"fail\"")) * 3
    );
}
