//! `doctor` against the real apiserver. Each test installs the proxy from its chart
//! (`helm template`, applied for real) and the webhook from ITS chart with
//! deploy/webhook/values.yaml, publishes the issuer documents on an HTTPS host, and adds an
//! opted-in workload as the webhook mutates it — then breaks ONE thing the way users break it.
//! Doctor must say ✘ for that check alone, and the fix it prints, applied, must turn it ✔.
//!
//! No kubelet runs here: the proxy's pod on its node, its Ready condition and the Service's
//! EndpointSlice are written as the DaemonSet controller, the kubelet and the EndpointSlice
//! controller would write them, and the workload pods carry what the webhook injects (the real
//! webhook's own test proves that injection). `/readyz` through the pod proxy needs a running
//! pod, so `proxy.health` is `?` here, with its reason.
//!
//! The tests share a control plane of their own: the webhook test registers the real webhook
//! for every pod labelled for workload identity while it runs, which would mutate the pods
//! these tests create unmutated on purpose.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::harness::*;
use crate::yaml_docs;

const CID: &str = "5f0e2a7c-1d3b-4c8e-9a6f-2b7d4e1c8a90";
const SUFFIX: &str = "identity-binding";
const WEBHOOK_TENANT: &str = "00000000-0000-0000-0000-0000000000bb";
/// Every check doctor runs: a test's failure must be the only one among them.
const CHECKS: [&str; 17] = [
    "proxy.nodes",
    "proxy.endpoints",
    "proxy.rbac",
    "proxy.health",
    "webhook.settings",
    "webhook.ca-configmaps",
    "webhook.pods",
    "grants.pods",
    "grants.wildcard",
    "tls.sni-san",
    "tls.chain",
    "tls.expiry",
    "tls.ca-bundles",
    "issuer.discovery",
    "issuer.jwks",
    "fic.match",
    "clock.skew",
];

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(Cluster::up)
}

/// A CA, kept to issue the serving certificate again.
struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pem: String,
}

impl Ca {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "doctor test CA");
        let pem = params.self_signed(&key).unwrap().pem();
        Self { params, key, pem }
    }

    /// (certificate PEM, key PEM) for `names` (DNS names or IP addresses), for the 90 days
    /// cert-manager issues by default.
    fn issue(&self, names: &[&str]) -> (String, String) {
        self.issue_for(names, 90)
    }

    /// The same, valid for `days` from now.
    fn issue_for(&self, names: &[&str], days: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days) + time::Duration::hours(1);
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// One installation, named after its test case: the proxy in namespace `case` (release
/// `case`), the webhook in `case-wh`, the workload in `case-apps`, nodes labelled for it.
pub(crate) struct Install {
    c: &'static Cluster,
    case: String,
    dir: tempfile::TempDir,
    ca: Ca,
    issuer_port: u16,
    _issuer_host: KillOnDrop,
}

impl Install {
    fn name(&self) -> String {
        format!("{}-identity-binding-proxy", self.case)
    }
    fn apps(&self) -> String {
        format!("{}-apps", self.case)
    }
    fn webhook_ns(&self) -> String {
        format!("{}-wh", self.case)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
    fn issuer_url(&self) -> String {
        format!(
            "https://127.0.0.1:{}/{{tenant}}/{{client_id}}",
            self.issuer_port
        )
    }

    /// Everything healthy.
    fn healthy(case: &str) -> Self {
        let c = cluster();
        let dir = tempfile::Builder::new()
            .prefix("doctor-")
            .tempdir()
            .unwrap();
        let ca = Ca::new();
        let issuer_port = port();
        let host = issuer_host(dir.path(), &ca, issuer_port);
        let install = Self {
            c,
            case: case.to_string(),
            dir,
            ca,
            issuer_port,
            _issuer_host: host,
        };
        install.publish(&install.path("issuer.pub"));
        install.install_proxy();
        install.install_webhook(&[]);
        install.add_node_with_ready_proxy("node-a");
        install.add_workload("app", "app-0", true);
        install.grant("app");
        install.write_fics(CID);
        install
    }

    /// `issuer keygen` (first time only) and `issuer publish` of `public_key` into the site
    /// the HTTPS host serves.
    fn publish(&self, public_key: &Path) {
        if !self.path("issuer.key").exists() {
            run_ok(
                Command::new(BIN)
                    .args(["issuer", "keygen", "--out"])
                    .arg(self.path("issuer.key")),
            );
        }
        std::fs::write(
            self.path("bindings.yaml"),
            format!("bindings:\n  - clientId: {CID}\n    tenantId: {TENANT}\n"),
        )
        .unwrap();
        run_ok(
            Command::new(BIN)
                .args(["issuer", "publish", "--out"])
                .arg(self.path("site"))
                .arg("--bindings")
                .arg(self.path("bindings.yaml"))
                .args(["--issuer-url", &self.issuer_url(), "--public-key"])
                .arg(public_key),
        );
    }

    /// The chart, rendered and applied, with its Secrets created as docs/installation.md says.
    fn install_proxy(&self) {
        let (c, ns) = (self.c, &self.case);
        c.kubectl(&["create", "namespace", ns]);
        c.kubectl(&["create", "namespace", &self.apps()]);
        let (cert, key) = self.ca.issue(&[SNI, &format!("{}.{ns}.svc", self.name())]);
        std::fs::write(self.path("tls.crt"), cert).unwrap();
        std::fs::write(self.path("tls.key"), key).unwrap();
        let (crt, key, issuer_key) = (
            self.path("tls.crt"),
            self.path("tls.key"),
            self.path("issuer.key"),
        );
        c.kubectl(&[
            "create",
            "secret",
            "tls",
            "serving-cert",
            "-n",
            ns,
            "--cert",
            &crt.to_string_lossy(),
            "--key",
            &key.to_string_lossy(),
        ]);
        c.kubectl(&[
            "create",
            "secret",
            "generic",
            "issuer-key",
            "-n",
            ns,
            &format!("--from-file=issuer.key={}", issuer_key.display()),
        ]);
        let values = json!({
            "issuer": {"url": self.issuer_url(), "keySecretName": "issuer-key"},
            "bindings": [{"clientId": CID, "tenantId": TENANT}],
            "tls": {"source": "secret", "secretName": "serving-cert"},
            "caBundle": self.ca.pem,
            "nodeSelector": {"doctor-case": ns},
        });
        std::fs::write(self.path("values.json"), values.to_string()).unwrap();
        let rendered = run_ok(
            Command::new(c.bin("helm"))
                .args(["template", ns, "--kube-version", &self.kube_version()])
                .arg(repo().join("charts/identity-binding-proxy"))
                .args(["--namespace", ns, "--values"])
                .arg(self.path("values.json")),
        );
        c.apply(&rendered);
    }

    /// The apiserver's version, for `helm template` (which otherwise assumes an old one).
    fn kube_version(&self) -> String {
        let v: Value = serde_json::from_str(&self.c.kubectl(&["version", "-o", "json"])).unwrap();
        v["serverVersion"]["gitVersion"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The webhook's chart with deploy/webhook/values.yaml pointed at this installation, and
    /// `sets` more; its ConfigMap and Deployment applied (the process itself does not run).
    fn install_webhook(&self, sets: &[String]) {
        let ns = self.webhook_ns();
        let _ = self.c.kubectl_out(&["create", "namespace", &ns], None);
        let mut cmd = Command::new(self.c.bin("helm"));
        cmd.args([
            "template",
            "workload-identity-webhook",
            self.c.get("WEBHOOK_CHART"),
        ])
        .args(["--namespace", &ns, "--values"])
        .arg(repo().join("deploy/webhook/values.yaml"))
        .args(["--set", &format!("azureTenantID={WEBHOOK_TENANT}")])
        .args([
            "--set",
            &format!(
                "customTokenEndpoint.azureKubernetesTokenProxy=https://{}.{}.svc",
                self.name(),
                self.case
            ),
        ])
        .args([
            "--set",
            &format!(
                "customTokenEndpoint.azureKubernetesCAConfigMapName={}-ca",
                self.name()
            ),
        ]);
        for set in sets {
            cmd.args(["--set", set]);
        }
        for doc in yaml_docs(&run_ok(&mut cmd)) {
            if doc["kind"] == "ConfigMap" || doc["kind"] == "Deployment" {
                self.c.apply(&doc.to_string());
            }
        }
    }

    /// A node the DaemonSet selects, its proxy pod (the DaemonSet's template) Ready there, and
    /// the Service's endpoint on it.
    fn add_node_with_ready_proxy(&self, node: &str) {
        let (c, ns, name) = (self.c, &self.case, self.name());
        let node = self.add_node(node);
        let ds: Value =
            serde_json::from_str(&c.kubectl(&["get", "daemonset", "-n", ns, &name, "-o", "json"]))
                .unwrap();
        let template = &ds["spec"]["template"];
        let mut spec = template["spec"].clone();
        spec["nodeName"] = json!(node);
        let pod = format!("{name}-{node}");
        c.apply(
            &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": ns, "labels": template["metadata"]["labels"]},
            "spec": spec})
            .to_string(),
        );
        let ready =
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}).to_string();
        c.kubectl(&[
            "patch",
            "pod",
            "-n",
            ns,
            &pod,
            "--subresource=status",
            "--type=merge",
            "-p",
            &ready,
        ]);
        c.apply(&json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": pod, "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.0.10"], "nodeName": node, "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": 8443, "protocol": "TCP"}]}).to_string());
    }

    fn add_node(&self, node: &str) -> String {
        let node = format!("{}-{node}", self.case);
        self.c.apply(
            &json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {"doctor-case": self.case, "kubernetes.io/os": "linux"}}})
            .to_string(),
        );
        node
    }

    /// An opted-in pod of service account `sa` (annotated with the client id), as the webhook
    /// leaves it when `mutated`, or as created before the webhook was configured; and the CA
    /// ConfigMap in its namespace.
    fn add_workload(&self, sa: &str, pod: &str, mutated: bool) {
        let ns = self.apps();
        self.c.apply(
            &json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": sa, "namespace": ns,
                "labels": {"azure.workload.identity/use": "true"},
                "annotations": {"azure.workload.identity/client-id": CID}}})
            .to_string(),
        );
        self.c.apply(
            &json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("{}-ca", self.name()), "namespace": ns},
            "data": {"ca.crt": self.ca.pem}})
            .to_string(),
        );
        let env = if mutated {
            json!([
                {"name": "AZURE_CLIENT_ID", "value": CID},
                {"name": "AZURE_TENANT_ID", "value": WEBHOOK_TENANT},
                {"name": "AZURE_FEDERATED_TOKEN_FILE", "value": "/var/run/secrets/azure/tokens/azure-identity-token"},
                {"name": "AZURE_AUTHORITY_HOST", "value": "https://login.microsoftonline.com/"},
                {"name": "AZURE_KUBERNETES_TOKEN_PROXY", "value": format!("https://{}.{}.svc", self.name(), self.case)},
                {"name": "AZURE_KUBERNETES_SNI_NAME", "value": SNI},
                {"name": "AZURE_KUBERNETES_CA_FILE", "value": "/var/run/secrets/azure/certs/ca.crt"},
            ])
        } else {
            json!([])
        };
        self.c.apply(
            &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": ns,
                "labels": {"azure.workload.identity/use": "true"},
                "annotations": {format!("azure.workload.identity/use-{SUFFIX}"): "true"}},
            "spec": {"serviceAccountName": sa,
                "containers": [{"name": "app", "image": "app:1", "env": env}]}})
            .to_string(),
        );
    }

    /// A pod served by a proxy sidecar of its own (the chart's sidecar mode: a native sidecar
    /// started with `--sidecar`), for an identity this installation neither binds nor grants.
    fn add_sidecar_workload(&self) {
        let ns = self.apps();
        let other = "9c4e1f27-5b3a-4d8e-b6f0-2a7c9e1d4b53";
        self.c.apply(
            &json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "web", "namespace": ns,
                "annotations": {"azure.workload.identity/client-id": other}}})
            .to_string(),
        );
        self.c.apply(&json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": ns,
                "labels": {"azure.workload.identity/use": "true"},
                "annotations": {format!("azure.workload.identity/use-{SUFFIX}"): "true"}},
            "spec": {"serviceAccountName": "web",
                "initContainers": [{"name": "identity-binding-proxy", "image": "ibp:1",
                    "restartPolicy": "Always", "args": ["--sidecar"]}],
                "containers": [{"name": "app", "image": "app:1", "env": [
                    {"name": "AZURE_CLIENT_ID", "value": other},
                    {"name": "AZURE_KUBERNETES_TOKEN_PROXY", "value": "https://localhost:8443"}]}]}}).to_string());
    }

    /// The serving certificate's Secret replaced, as cert-manager or a person would.
    fn replace_serving_cert(&self, (cert, key): (String, String)) {
        std::fs::write(self.path("tls.crt"), cert).unwrap();
        std::fs::write(self.path("tls.key"), key).unwrap();
        let (crt, key) = (self.path("tls.crt"), self.path("tls.key"));
        let secret = self.c.kubectl(&[
            "create",
            "secret",
            "tls",
            "serving-cert",
            "-n",
            &self.case,
            "--cert",
            &crt.to_string_lossy(),
            "--key",
            &key.to_string_lossy(),
            "--dry-run=client",
            "-o",
            "yaml",
        ]);
        self.c.apply(&secret);
    }

    /// `ca.crt` of the CA ConfigMap set to `pem` in each of `namespaces`.
    fn set_ca_bundle(&self, pem: &str, namespaces: &[&str]) {
        for ns in namespaces {
            self.c.apply(
                &json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": format!("{}-ca", self.name()), "namespace": ns},
                "data": {"ca.crt": pem}})
                .to_string(),
            );
        }
    }

    fn grant(&self, sa: &str) {
        self.c.apply(&rbac_grant_cluster(
            &format!("{}-{sa}", self.case),
            CID,
            &sa_subject(&self.apps(), sa),
        ));
    }

    /// What `az identity federated-credential list` prints for the identity: its one FIC.
    fn write_fics(&self, subject: &str) {
        let issuer = format!("https://127.0.0.1:{}/{TENANT}/{CID}", self.issuer_port);
        let fics = json!([{
            "audiences": ["api://AzureADTokenExchange"],
            "id": format!("/subscriptions/0b1f6471-1bf0-4dda-aec3-cb9272f09590/resourcegroups/rg-{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-{}/federatedIdentityCredentials/identity-binding-proxy", self.case, self.case),
            "issuer": issuer,
            "name": "identity-binding-proxy",
            "resourceGroup": format!("rg-{}", self.case),
            "subject": subject,
            "type": "Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials",
        }]);
        std::fs::write(
            self.path("fics.json"),
            serde_json::to_string_pretty(&fics).unwrap(),
        )
        .unwrap();
    }

    /// `doctor --output json` on this installation: (exit status, report).
    fn doctor(&self) -> (i32, Value) {
        let out = self.doctor_run("json");
        let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "doctor printed no JSON ({e}):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), report)
    }

    fn doctor_run(&self, output: &str) -> std::process::Output {
        Command::new(BIN)
            .args(["doctor", "--kubeconfig", self.c.get("KUBECONFIG")])
            .args(["--namespace", &self.case, "--release", &self.case])
            .args([
                "--webhook-namespace",
                &self.webhook_ns(),
                "--workload-namespace",
                &self.apps(),
            ])
            .arg("--federated-credentials")
            .arg(format!("{CID}={}", self.path("fics.json").display()))
            .arg("--issuer-ca-file")
            .arg(self.path("ca.crt"))
            // The fleet file, where the installation has one.
            .args(
                Some(self.path("fleet.yaml"))
                    .filter(|f| f.exists())
                    .map(|f| vec!["--fleet".to_string(), f.display().to_string()])
                    .unwrap_or_default(),
            )
            .args(["--output", output])
            .stdin(Stdio::null())
            .output()
            .expect("doctor runs")
    }

    /// Runs a fix doctor printed, in a shell with kubectl and this build on the PATH, from
    /// this installation's directory (where the issuer's site, keys and bindings are).
    fn apply_fix(&self, fix: &str) {
        // The fixes name the production binary, as a user runs it: this build's binary, which
        // has the production commands, under that name (a fresh `cargo test` builds only it).
        let own = self.dir.path().join("fix-bin");
        let exe = own.join("identity-binding-proxy");
        if !exe.exists() {
            std::fs::create_dir_all(&own).unwrap();
            std::os::unix::fs::symlink(BIN, &exe).unwrap();
        }
        let bins = format!(
            "{}:{}:{}",
            own.display(),
            self.c.get("BIN_DIR"),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", fix])
            .current_dir(self.dir.path())
            .env("PATH", bins)
            .env("KUBECONFIG", self.c.get("KUBECONFIG"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the fix failed:\n{fix}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// An HTTPS host serving `dir/site` (openssl's static file server), its certificate for
/// 127.0.0.1 from the test CA written to `dir/ca.crt`... by the caller's CA.
fn issuer_host(dir: &Path, ca: &Ca, port: u16) -> KillOnDrop {
    let (cert, key) = ca.issue(&["127.0.0.1"]);
    std::fs::write(dir.join("host.crt"), cert).unwrap();
    std::fs::write(dir.join("host.key"), key).unwrap();
    std::fs::write(dir.join("ca.crt"), &ca.pem).unwrap();
    std::fs::create_dir_all(dir.join("site")).unwrap();
    let child = Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-WWW",
            "-accept",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["-cert", "../host.crt", "-key", "../host.key"])
        .current_dir(dir.join("site"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("host.err")).unwrap())
        .spawn()
        .unwrap();
    let up = within(std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up.is_some(), "the issuer host did not listen");
    KillOnDrop(child)
}

fn check<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id} in {report:#}"))
}

fn failing(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

/// Doctor fails `id`, and only `id`, with exit status 3; returns that check.
fn fails_only(install: &Install, id: &str) -> Value {
    let (code, report) = install.doctor();
    assert_eq!(failing(&report), vec![id.to_string()], "{report:#}");
    assert_eq!(code, 3, "{report:#}");
    // The same as a person reads it (shown with --nocapture).
    let text = install.doctor_run("text");
    assert_eq!(text.status.code(), Some(3));
    eprintln!(
        "doctor on {}:\n{}",
        install.case,
        String::from_utf8_lossy(&text.stdout)
    );
    check(&report, id).clone()
}

/// Doctor passes `id`, and fails nothing.
fn passes(install: &Install, id: &str) {
    let (code, report) = install.doctor();
    assert_eq!(check(&report, id)["status"], "pass", "{report:#}");
    assert!(failing(&report).is_empty(), "{report:#}");
    assert_eq!(code, 0, "{report:#}");
}

fn fix_of(check: &Value) -> String {
    check["fix"]
        .as_str()
        .unwrap_or_else(|| panic!("no fix: {check:#}"))
        .to_string()
}

// -------------------------------------------------------------------------------- the tests

#[test]
fn doctor_passes_a_healthy_installation_and_exits_0() {
    let install = Install::healthy("doc-ok");
    install.add_sidecar_workload();
    let (code, report) = install.doctor();
    // The sidecar's pod is its own sidecar's to serve: named, and judged by nothing here.
    assert!(
        check(&report, "webhook.pods")["details"]
            .to_string()
            .contains(&format!(
                "pod {}/web-0: served by its own sidecar",
                install.apps()
            )),
        "{report:#}"
    );
    for id in CHECKS {
        let c = check(&report, id);
        if id == "proxy.health" {
            // No kubelet runs the pod: the apiserver's pod proxy has nowhere to go.
            assert_eq!(c["status"], "unknown", "{c:#}");
            assert!(
                c["summary"].as_str().unwrap().contains("pod proxy"),
                "{c:#}"
            );
        } else {
            assert_eq!(c["status"], "pass", "{id}: {report:#}");
        }
    }
    assert_eq!(code, 0);
    // The text report: one line per check, marked.
    let out = install.doctor_run("text");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for id in CHECKS {
        assert!(
            text.lines()
                .any(|l| l.contains(id) && (l.starts_with('✔') || l.starts_with('?'))),
            "{id}:\n{text}"
        );
    }
    eprintln!("doctor on a healthy installation:\n{text}");
}

#[test]
fn doctor_finds_the_webhook_annotation_suffix_wrong_and_its_helm_fix_works() {
    let install = Install::healthy("doc-suffix");
    // The value mistyped in the webhook's Helm values.
    install.install_webhook(&["customTokenEndpoint.annotationSuffix=identity-bindings".into()]);
    let failed = fails_only(&install, "webhook.settings");
    let details = failed["details"].to_string();
    assert!(details.contains("'identity-bindings'"), "{failed:#}");
    let fix = fix_of(&failed);
    assert!(
        fix.starts_with("helm upgrade workload-identity-webhook"),
        "{fix}"
    );
    // The fix's --set values, rendered into the webhook as helm upgrade would.
    let sets = helm_sets(&fix);
    assert_eq!(
        sets,
        vec![format!("customTokenEndpoint.annotationSuffix={SUFFIX}")]
    );
    install.install_webhook(&sets);
    passes(&install, "webhook.settings");
}

#[test]
fn doctor_finds_the_ca_configmap_missing_in_a_workload_namespace_and_its_fix_copies_it() {
    let install = Install::healthy("doc-cacm");
    install.c.kubectl(&[
        "delete",
        "configmap",
        "-n",
        &install.apps(),
        &format!("{}-ca", install.name()),
    ]);
    let failed = fails_only(&install, "webhook.ca-configmaps");
    assert!(
        failed["details"].to_string().contains(&install.apps()),
        "{failed:#}"
    );
    install.apply_fix(&fix_of(&failed));
    passes(&install, "webhook.ca-configmaps");
    passes(&install, "tls.ca-bundles");
}

#[test]
fn doctor_finds_a_fic_subject_differing_in_case_and_names_the_az_update() {
    let install = Install::healthy("doc-fic");
    install.write_fics(&CID.to_uppercase());
    let failed = fails_only(&install, "fic.match");
    let details = failed["details"].to_string();
    assert!(
        details.contains("subject") && details.contains("only in case"),
        "{failed:#}"
    );
    let fix = fix_of(&failed);
    assert!(fix.starts_with("az identity federated-credential update --name identity-binding-proxy --identity-name id-doc-fic --resource-group rg-doc-fic"), "{fix}");
    // What `az ... update` does to the FIC: its subject becomes the one named.
    let subject = fix
        .split("--subject '")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .unwrap();
    assert_eq!(subject, CID);
    install.write_fics(subject);
    passes(&install, "fic.match");
}

#[test]
fn doctor_finds_the_jwks_without_the_current_key_and_publishing_fixes_it() {
    let install = Install::healthy("doc-jwks");
    // The key Secret rotated to a new key, the issuer documents not published again.
    run_ok(
        Command::new(BIN)
            .args(["issuer", "keygen", "--out"])
            .arg(install.path("new.key")),
    );
    let new_key = install.path("new.key");
    let secret = install.c.kubectl(&[
        "create",
        "secret",
        "generic",
        "issuer-key",
        "-n",
        &install.case,
        &format!("--from-file=issuer.key={}", new_key.display()),
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    install.c.apply(&secret);
    let failed = fails_only(&install, "issuer.jwks");
    assert!(
        failed["summary"]
            .as_str()
            .unwrap()
            .contains("AADSTS7000272"),
        "{failed:#}"
    );
    // The fix publishes the signing key's public half (issuer.pub in the working directory).
    std::fs::copy(install.path("new.pub"), install.path("issuer.pub")).unwrap();
    install.apply_fix(&fix_of(&failed));
    passes(&install, "issuer.jwks");
}

#[test]
fn doctor_finds_the_published_issuer_with_a_trailing_slash_and_publishing_fixes_it() {
    let install = Install::healthy("doc-slash");
    let discovery = install.path(&format!(
        "site/{TENANT}/{CID}/.well-known/openid-configuration"
    ));
    let mut doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&discovery).unwrap()).unwrap();
    let issuer = doc["issuer"].as_str().unwrap().to_string();
    doc["issuer"] = json!(format!("{issuer}/"));
    std::fs::write(&discovery, doc.to_string()).unwrap();
    let failed = fails_only(&install, "issuer.discovery");
    assert!(
        failed["details"]
            .to_string()
            .contains(&format!("'{issuer}/'")),
        "{failed:#}"
    );
    install.apply_fix(&fix_of(&failed));
    passes(&install, "issuer.discovery");
}

#[test]
fn doctor_finds_a_certificate_without_the_sni_san_and_reissuing_fixes_it() {
    let install = Install::healthy("doc-san");
    let service = format!("{}.{}.svc", install.name(), install.case);
    let replace = |names: &[&str]| install.replace_serving_cert(install.ca.issue(names));
    // Issued for the Service's name only.
    replace(&[&service]);
    let failed = fails_only(&install, "tls.sni-san");
    assert!(
        failed["details"].to_string().contains(&service),
        "{failed:#}"
    );
    let fix = fix_of(&failed);
    let named = fix
        .split("DNS name(s) ")
        .nth(1)
        .and_then(|s| s.split(" (").next())
        .unwrap();
    assert_eq!(named, SNI);
    replace(&[named, &service]);
    passes(&install, "tls.sni-san");
}

#[test]
fn doctor_lists_a_pod_created_before_mutation_for_restart() {
    let install = Install::healthy("doc-mut");
    install.add_workload("app", "app-1", false);
    let failed = fails_only(&install, "webhook.pods");
    assert!(
        failed["details"]
            .to_string()
            .contains(&format!("{}/app-1", install.apps())),
        "{failed:#}"
    );
    let fix = fix_of(&failed);
    assert!(
        fix.starts_with(&format!("kubectl delete pod app-1 -n {}", install.apps())),
        "{fix}"
    );
    install.apply_fix(&fix);
    // Created again, through the webhook this time.
    install.add_workload("app", "app-1", true);
    passes(&install, "webhook.pods");
}

#[test]
fn doctor_finds_an_ungranted_service_account_and_its_role_binding_grants_it() {
    let install = Install::healthy("doc-grant");
    install.add_workload("reports", "reports-0", true);
    let failed = fails_only(&install, "grants.pods");
    let details = failed["details"].to_string();
    assert!(
        details.contains(&format!(
            "{}/reports may not use-managed-identity {CID}",
            install.apps()
        )),
        "{failed:#}"
    );
    let fix = fix_of(&failed);
    assert!(fix.contains("kind: RoleBinding"), "{fix}");
    install.apply_fix(&fix);
    passes(&install, "grants.pods");
}

#[test]
fn doctor_finds_a_node_without_a_ready_proxy() {
    let install = Install::healthy("doc-node");
    let node = install.add_node("node-b");
    let failed = fails_only(&install, "proxy.nodes");
    assert!(failed["details"].to_string().contains(&node), "{failed:#}");
    let fix = fix_of(&failed);
    let describe = format!(
        "kubectl describe daemonset -n {} {}",
        install.case,
        install.name()
    );
    assert!(fix.starts_with(&describe), "{fix}");
    assert!(
        fix.contains(&format!("no proxy pod on node {node}")),
        "{fix}"
    );
    install.apply_fix(&fix);
    // What its events lead to: the DaemonSet's pod there, Ready (and so its endpoint).
    install.add_node_with_ready_proxy("node-b");
    passes(&install, "proxy.nodes");
}

#[test]
fn doctor_finds_a_ca_bundle_with_another_ca_first_and_reordering_fixes_it() {
    let install = Install::healthy("doc-chain");
    // A rotation done the wrong way round: the next CA first, where .NET trusts only it.
    let next = Ca::new();
    let (ns, apps) = (install.case.clone(), install.apps());
    let wrong = format!("{}{}", next.pem, install.ca.pem);
    install.set_ca_bundle(&wrong, &[&ns, &apps]);
    let failed = fails_only(&install, "tls.chain");
    assert!(fix_of(&failed).starts_with("put the CA that signs the serving certificate FIRST"));
    let right = format!("{}{}", install.ca.pem, next.pem);
    install.set_ca_bundle(&right, &[&ns, &apps]);
    passes(&install, "tls.chain");
}

#[test]
fn doctor_finds_a_namespace_trusting_an_old_ca_bundle_and_its_fix_copies_the_current_one() {
    let install = Install::healthy("doc-bundle");
    install.set_ca_bundle(&Ca::new().pem, &[&install.apps()]);
    let failed = fails_only(&install, "tls.ca-bundles");
    assert!(
        failed["details"].to_string().contains(&install.apps()),
        "{failed:#}"
    );
    install.apply_fix(&fix_of(&failed));
    passes(&install, "tls.ca-bundles");
}

#[test]
fn doctor_finds_a_serving_certificate_about_to_expire() {
    let install = Install::healthy("doc-expiry");
    let service = format!("{}.{}.svc", install.name(), install.case);
    install.replace_serving_cert(install.ca.issue_for(&[SNI, &service], 3));
    let failed = fails_only(&install, "tls.expiry");
    assert!(
        failed["summary"]
            .as_str()
            .unwrap()
            .contains("3 day(s) left"),
        "{failed:#}"
    );
    // Renewed, as cert-manager does.
    install.replace_serving_cert(install.ca.issue(&[SNI, &service]));
    passes(&install, "tls.expiry");
}

#[test]
fn doctor_flags_a_service_account_bound_to_cluster_admin() {
    let install = Install::healthy("doc-wild");
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "doc-wild-admin"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "app", "namespace": install.apps()}]});
    install.c.apply(&binding.to_string());
    let failed = fails_only(&install, "grants.wildcard");
    assert!(
        failed["details"]
            .to_string()
            .contains(&format!("{}/app", install.apps())),
        "{failed:#}"
    );
    // The fix lists the bindings naming the account: the one to cluster-admin among them.
    let fix = fix_of(&failed);
    let out = Command::new("bash")
        .args(["-c", &fix])
        .env(
            "PATH",
            format!(
                "{}:{}",
                install.c.get("BIN_DIR"),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("KUBECONFIG", install.c.get("KUBECONFIG"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("doc-wild-admin"),
        "{fix}: {out:?}"
    );
    install
        .c
        .kubectl(&["delete", "clusterrolebinding", "doc-wild-admin"]);
    passes(&install, "grants.wildcard");
}

#[test]
fn doctor_finds_another_clusters_key_in_an_identitys_jwks_and_publishing_by_fleet_fixes_it() {
    let install = Install::healthy("doc-fleet");
    // A second cluster, west, with its own key, binding another identity only.
    run_ok(
        Command::new(BIN)
            .args(["issuer", "keygen", "--out"])
            .arg(install.path("west.key")),
    );
    std::fs::write(
        install.path("west-bindings.yaml"),
        format!("bindings:\n  - clientId: 2a7c9e1d-4b53-4d8e-b6f0-9c4e1f275b3a\n    tenantId: {TENANT}\n"),
    )
    .unwrap();
    std::fs::write(
        install.path("fleet.yaml"),
        "clusters:\n  - {name: east, publicKeys: [issuer.pub], bindings: bindings.yaml}\n  \
         - {name: west, publicKeys: [west.pub], bindings: west-bindings.yaml}\n",
    )
    .unwrap();
    // Published the simple way: every cluster's key for every identity.
    run_ok(
        Command::new(BIN)
            .args([
                "issuer",
                "publish",
                "--out",
                "site",
                "--bindings",
                "bindings.yaml",
            ])
            .args(["--issuer-url", &install.issuer_url()])
            .args(["--public-key", "issuer.pub", "--public-key", "west.pub"])
            .current_dir(install.dir.path()),
    );
    let failed = fails_only(&install, "issuer.key-sets");
    let details = failed["details"].to_string();
    assert!(
        details.contains(&format!("{CID}: JWKS holds")) && details.contains("cluster 'west'"),
        "{failed:#}"
    );
    let fix = fix_of(&failed);
    assert!(
        fix.contains(&format!("--fleet {}", install.path("fleet.yaml").display())),
        "{fix}"
    );
    install.apply_fix(&fix);
    passes(&install, "issuer.key-sets");
}

#[test]
fn doctor_finds_the_webhook_sending_another_sni_name_and_its_helm_fix_works() {
    let install = Install::healthy("doc-sni");
    install.install_webhook(&["customTokenEndpoint.azureKubernetesSniName=proxy.internal".into()]);
    let failed = fails_only(&install, "webhook.settings");
    assert!(
        failed["details"]
            .to_string()
            .contains("AZURE_KUBERNETES_SNI_NAME"),
        "{failed:#}"
    );
    let fix = fix_of(&failed);
    let sets = helm_sets(&fix);
    assert_eq!(
        sets,
        vec![format!("customTokenEndpoint.azureKubernetesSniName={SNI}")]
    );
    install.install_webhook(&sets);
    passes(&install, "webhook.settings");
}

#[test]
fn doctor_warns_when_an_identity_nears_entras_twenty_fics() {
    let install = Install::healthy("doc-many");
    install.write_fics(CID);
    let fics = std::fs::read_to_string(install.path("fics.json")).unwrap();
    let mut list: Vec<Value> = serde_json::from_str(&fics).unwrap();
    // Eighteen more, for classic workload identity's one FIC per service account.
    for i in 0..18 {
        let mut other = list[0].clone();
        other["name"] = json!(format!("classic-{i}"));
        other["subject"] = json!(format!("system:serviceaccount:apps:sa-{i}"));
        list.push(other);
    }
    std::fs::write(install.path("fics.json"), Value::from(list).to_string()).unwrap();
    let (code, report) = install.doctor();
    let fic = check(&report, "fic.match");
    assert_eq!(fic["status"], "pass", "{report:#}");
    assert!(
        fic["details"]
            .to_string()
            .contains("19 of Entra's 20 FICs are used"),
        "{fic:#}"
    );
    assert_eq!(code, 0);
}

/// The `--set` values of a printed `helm upgrade` fix.
fn helm_sets(fix: &str) -> Vec<String> {
    fix.split("--set ")
        .skip(1)
        .map(|s| s.trim().to_string())
        .collect()
}
