//! The Helm chart installed for real: `helm install` into the real apiserver, the objects
//! accepted (schema, admission, Pod Security), the proxy's `serve` ready as the chart's
//! ServiceAccount with the chart's RBAC, and `helm uninstall` removing the cluster-scoped
//! objects. A wrong value is refused by `helm install` with a message naming it, before
//! anything reaches the cluster.

use crate::harness::*;
use std::process::{Command, Output};

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
    c.workload("helm-apps", "worker", "worker-0");
    c.apply(&rbac_grant_cluster(
        "use-mi-helm",
        cid,
        &sa_subject("helm-apps", "worker"),
    ));
    let token = c.token("helm-apps", "worker", &audience(), Some("worker-0"));
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
