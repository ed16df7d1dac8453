//! The tests through the node, in the order `main` runs them: each builds on what the one
//! before installed (the chart, the webhook, the example app).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::node::*;

/// The machine's sysctls (those the kubelet and kube-proxy touch) and iptables rules, compared
/// with what `up` recorded before the node started.
pub fn host_state_is_untouched(node: &Node, when: &str) {
    let before = std::fs::read_to_string(node.path().join("nodes/host-state.before"))
        .expect("up recorded the machine's state");
    let now = run_ok(
        Command::new("bash")
            .arg(repo().join("scripts/real-cluster.sh"))
            .arg("host-state"),
    );
    assert!(before.contains("vm/overcommit_memory="), "{before}");
    assert_eq!(
        before, now,
        "the machine's sysctls or iptables rules changed ({when})"
    );
    eprintln!("host state ({when}) unchanged:\n{}", before.lines().take(7).collect::<Vec<_>>().join("\n"));
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
        let emulators = Emulators::start(dir.path(), &[DEMO_CID]);
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
    /// the Dockerfile. The issuer URL the schema asks for is https (a public host); the proxy
    /// here is pointed at our issuer host instead, through the chart's extraEnv.
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
                 authorityHost: {}\n\
                 tls: {{source: secret, secretName: serving-cert}}\n\
                 logFormat: text\n\
                 extraEnv: [{{name: IBP_ISSUER_URL, value: \"{}\"}}, {{name: RUST_LOG, value: info}}]\n{extra}",
                self.emulators.authority_host, self.emulators.issuer_url
            ),
        )
        .unwrap();
        path
    }
}

/// (a) helm install of the chart (DaemonSet mode) and of the real webhook chart: the proxy's pod
/// is Ready through its own probes, runs as 65532 on a read-only root filesystem, and has read
/// its mounted key, certificate and ConfigMaps.
pub fn chart_daemonset_is_ready_as_65532_on_a_read_only_root(ctx: &Context) {
    let n = ctx.node;
    let d = ctx.dir.path();
    n.kubectl(&["create", "namespace", NS]);
    n.kubectl(&["label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted"]);
    let (crt, key) = (d.join("tls.crt"), d.join("tls.key"));
    n.kubectl(&[
        "create", "secret", "tls", "serving-cert", "-n", NS,
        &format!("--cert={}", crt.display()),
        &format!("--key={}", key.display()),
    ]);
    n.kubectl(&[
        "create", "secret", "generic", "issuer-key", "-n", NS,
        &format!("--from-file=issuer.key={}", ctx.emulators.issuer_key.display()),
    ]);
    let chart = repo().join("charts/identity-binding-proxy");
    let values = ctx.values("");
    let out = n.helm_ok(&[
        "install", RELEASE, chart.to_str().unwrap(), "-n", NS, "-f", values.to_str().unwrap(),
    ]);
    assert!(out.contains("STATUS: deployed"), "{out}");

    let webhook_values = repo().join("deploy/webhook/values.yaml");
    n.helm_ok(&[
        "install", "workload-identity-webhook", n.get("WEBHOOK_CHART"), "-n", WEBHOOK_NS,
        "--create-namespace", "--values", webhook_values.to_str().unwrap(),
        "--set", &format!("azureTenantID={TENANT}"),
    ]);

    let ready = Instant::now();
    n.wait(NS, "daemonset/identity-binding-proxy", "jsonpath={.status.numberReady}=1", 180);
    eprintln!("the proxy's pod Ready {:.1?} after helm install", ready.elapsed());
    let (pod, node_name, is_ready) = n.proxy_pods().remove(0);
    assert!(is_ready);
    assert_eq!(node_name, "node-1");
    let p = n.json(&["get", "pod", "-n", NS, &pod]);
    let status = &p["status"]["containerStatuses"][0];
    assert_eq!(status["image"].as_str().unwrap().trim_start_matches("docker.io/"), n.get("PROXY_IMAGE"));
    assert_eq!(status["restartCount"], 0);

    // The container's process, as the machine sees it: its uid and its root mount.
    let pids = host_pids("/usr/local/bin/identity-binding-proxy serve");
    assert_eq!(pids.len(), 1, "one proxy process on the node: {pids:?}");
    let pid = pids[0];
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(uid_line.split_whitespace().skip(1).collect::<Vec<_>>(), ["65532"; 4], "{uid_line}");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    let options = root.split_whitespace().nth(5).unwrap();
    assert!(options.split(',').any(|o| o == "ro"), "root mounted read-only: {root}");
    for dir in ["tls", "issuer", "bindings"] {
        let mounted = mountinfo.lines().any(|l| l.split_whitespace().nth(4) == Some(&format!("/etc/identity-binding-proxy/{dir}")));
        assert!(mounted, "/etc/identity-binding-proxy/{dir} is a mount:\n{mountinfo}");
    }
    // What it read from them: its log names the bindings and certificates it loaded.
    let logs = n.logs(NS, &pod);
    eprintln!("proxy log (kubectl logs):\n{}", logs.lines().take(12).collect::<Vec<_>>().join("\n"));
    assert!(logs.contains(DEMO_CID) || logs.contains("binding"), "{logs}");

    n.wait(WEBHOOK_NS, "deployment/azure-wi-webhook-controller-manager", "condition=Available", 180);
}

/// The example app's namespace, service account and grant (deploy/overlays/example-app), the
/// proxy's CA in it, and its pod with `image` and `command`, named `name`.
fn example_pod(ctx: &Context, name: &str, image: &str, command: &[&str]) -> Value {
    let n = ctx.node;
    let overlay = repo().join("deploy/overlays/example-app");
    let rendered = n.kubectl(&["kustomize", overlay.to_str().unwrap()]);
    let docs: Vec<Value> = rendered
        .split("\n---\n")
        .map(|d| serde_json::to_value(serde_norway::from_str::<serde_norway::Value>(d).unwrap()).unwrap())
        .collect();
    for d in docs.iter().filter(|d| d["kind"] != "Pod") {
        n.apply(&d.to_string());
    }
    n.apply(&json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "identity-binding-proxy-ca", "namespace": "demo"},
        "data": {"ca.crt": ctx.ca}}).to_string());
    let mut pod = docs.iter().find(|d| d["kind"] == "Pod").unwrap().clone();
    pod["metadata"]["name"] = json!(name);
    let c = &mut pod["spec"]["containers"][0];
    c["image"] = json!(image);
    c["imagePullPolicy"] = json!("Never");
    c["command"] = json!(command);
    c["stdin"] = json!(true);
    // failurePolicy Fail: while the webhook starts, creation is refused; retry until it serves.
    let created = within(Duration::from_secs(60), || {
        n.kubectl_out(&["create", "-f", "-"], Some(&pod.to_string())).status.success()
    });
    assert!(created.is_some(), "the pod was never admitted: {}", text(&n.kubectl_out(&["create", "-f", "-"], Some(&pod.to_string()))));
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
    assert_eq!(env_of(&go, "AZURE_KUBERNETES_TOKEN_PROXY"), "https://identity-binding-proxy.identity-binding-proxy.svc");
    assert_eq!(env_of(&go, "AZURE_KUBERNETES_SNI_NAME"), SNI);
    let token_file = env_of(&go, "AZURE_FEDERATED_TOKEN_FILE");
    let (reply, took) = PodClient::start(n, "demo", "demo", &["/client"]).ask("get");
    assert_eq!(reply["ok"], true, "Go client in the pod: {reply}");
    eprintln!("Go client in pod demo/demo: token in {took:.1?}");

    let (proxy_pod, _, _) = n.proxy_pods().remove(0);
    let logs = n.logs(NS, &proxy_pod);
    let line = logs.lines().rev().find(|l| l.contains("demo") && l.contains(DEMO_CID));
    assert!(line.is_some(), "the proxy logged the pod's request:\n{logs}");
    eprintln!("proxy request log: {}", line.unwrap());
    // The token is the kubelet's projection (the webhook's volume), not one this test made.
    assert!(token_file.starts_with("/var/run/secrets/azure/tokens/"), "{token_file}");

    let py_image = n.get("PYTHON_CLIENT_IMAGE");
    example_pod(ctx, "demo-python", py_image, &["sleep", "infinity"]);
    let mut py = PodClient::start(n, "demo", "demo-python", &["python3", "/client/get_token.py"]);
    let (reply, took) = py.ask("get");
    assert_eq!(reply["ok"], true, "Python SDK in the pod: {reply}");
    eprintln!("Python SDK in pod demo/demo-python: token in {took:.1?}");
    let logs = n.logs(NS, &proxy_pod);
    assert!(logs.matches(DEMO_CID).count() >= 2, "{logs}");
}

/// (c) The grant deleted: the pod's next request is refused within 2 s, and the SDK's exception
/// carries our explanation.
pub fn revoked_grant_is_refused_within_2s_in_the_sdk(ctx: &Context) {
    let n = ctx.node;
    let mut py = PodClient::start(n, "demo", "demo-python", &["python3", "/client/get_token.py"]);
    let (reply, _) = py.ask("fresh");
    assert_eq!(reply["ok"], true, "{reply}");
    let binding = format!("use-managed-identity-{DEMO_CID}");
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
    assert!(took <= Duration::from_secs(2), "refused only after {took:?}");
    assert!(error.contains("use-managed-identity") && error.contains(DEMO_CID), "{error}");
    // The grant back, for the tests after this one.
    let overlay = repo().join("deploy/overlays/example-app");
    n.kubectl(&["apply", "-k", overlay.to_str().unwrap()]);
    let back = within(Duration::from_secs(10), || py.ask("fresh").0["ok"] == true);
    assert!(back.is_some(), "the restored grant is honoured");
}

/// (e) kill -9 of the proxy's process: the kubelet restarts the container; the requests made
/// during the gap are counted, and every request succeeds once it is Ready again.
pub fn killed_proxy_is_restarted_by_the_kubelet(ctx: &Context) {
    let n = ctx.node;
    let mut go = PodClient::start(n, "demo", "demo", &["/client"]);
    assert_eq!(go.ask("fresh").0["ok"], true);
    let pids = host_pids("/usr/local/bin/identity-binding-proxy serve");
    assert_eq!(pids.len(), 1, "{pids:?}");
    let (pod, _, _) = n.proxy_pods().remove(0);
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
        assert!(killed.elapsed() < Duration::from_secs(90), "no token 90 s after the kill");
        std::thread::sleep(Duration::from_millis(100));
    }
    let gap = killed.elapsed();
    let p = n.json(&["get", "pod", "-n", NS, &pod]);
    let status = &p["status"]["containerStatuses"][0];
    assert_eq!(status["restartCount"], 1, "{status}");
    assert_eq!(status["lastState"]["terminated"]["exitCode"], 137, "{status}");
    let new_pids = host_pids("/usr/local/bin/identity-binding-proxy serve");
    assert!(new_pids.len() == 1 && new_pids[0] != pids[0], "{new_pids:?}");
    for _ in 0..20 {
        let (reply, _) = go.ask("fresh");
        assert_eq!(reply["ok"], true, "after the restart: {reply}");
    }
    eprintln!(
        "kill -9 at t=0: {failed} of {asked} requests failed until a token came back at {gap:.1?} \
         (first error: {first_error}); restartCount 1, exit 137; 20 of 20 after"
    );
    let previous = n.kubectl_out(&["logs", "-n", NS, &pod, "--previous"], None);
    eprintln!("previous container's log tail:\n{}", text(&previous).lines().rev().take(3).collect::<Vec<_>>().join("\n"));
}
