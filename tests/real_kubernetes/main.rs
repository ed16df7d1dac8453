//! The proxy against a REAL control plane: etcd, kube-apiserver and kube-controller-manager
//! (ClusterRole aggregation only), and the Azure workload identity webhook, all built from the
//! Go module proxy at the versions pinned in scripts/real-cluster/*/go.mod by
//! `scripts/real-cluster.sh` (the first run builds for ~15-30 min; later runs start in seconds).
//! Entra stays our emulator (`emulate entra`, with `emulate static` hosting the issuer).
//!
//! These tests FAIL when a component cannot be built: the harness's one-line error names the
//! step and its log, whose tail is printed here.

#[path = "../common/mod.rs"]
mod common;
mod doctor;
mod fleet;
mod harness;
mod helm;
mod selectors;
mod sidecar;
mod watches;

use harness::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::python_with_sdk;
use serde_json::{json, Value};
// -------------------------------------------------------------------------------- the tests

#[test]
fn deploy_base_and_example_app_are_accepted_by_the_real_apiserver() {
    let c = shared();
    // deploy/base was applied for real by shared(); a server-side dry run of it again must
    // find nothing to refuse, and the example app (Namespace with restricted Pod Security,
    // ServiceAccount, RBAC, Pod) passes validation and admission (PodSecurity included).
    // A dry run creates nothing, so the example app's namespace must exist for its other
    // objects to be checked: it is applied for real first.
    apply_example_app_namespace(c);
    for dir in ["deploy/base", "deploy/overlays/example-app"] {
        let path = repo().join(dir);
        let out = c.kubectl(&["apply", "--dry-run=server", "-k", &path.to_string_lossy()]);
        assert!(out.contains("(server dry run)"), "{dir}: {out}");
    }
    let ds = c.kubectl(&[
        "get",
        "daemonset",
        "-n",
        "identity-binding-proxy",
        "identity-binding-proxy",
        "-o",
        "jsonpath={.spec.template.spec.serviceAccountName}",
    ]);
    assert_eq!(ds, "identity-binding-proxy");

    // The cert-manager overlay needs cert-manager's CRDs, which this cluster does not have:
    // the apiserver refuses exactly its Issuer and Certificate kinds, and accepts the rest.
    let overlay = repo().join("deploy/overlays/cert-manager");
    let out = c.kubectl_out(
        &[
            "apply",
            "--dry-run=server",
            "-k",
            &overlay.to_string_lossy(),
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "cert-manager kinds without CRDs must fail"
    );
    for line in stderr.lines().filter(|l| l.starts_with("error")) {
        assert!(
            line.contains("\"cert-manager.io/v1\"")
                && (line.contains("kind \"Issuer\"")
                    || line.contains("kind \"Certificate\"")
                    || line.contains("kind \"ClusterIssuer\"")),
            "only cert-manager kinds are refused: {line}"
        );
    }
    assert!(
        stderr.contains("ensure CRDs are installed first"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("daemonset.apps/identity-binding-proxy"),
        "the overlay's other objects are accepted: {stdout}"
    );
}

/// The proxy's ServiceAccount from deploy/base: the ClusterRole there is enough, and each of
/// its rules is needed — without it the proxy fails in a way that names what is missing.
#[test]
fn serve_as_deploy_base_service_account_is_ready_and_each_rule_is_needed() {
    // Its own cluster: one case removes the default OIDC discovery bindings.
    let c = Cluster::with_deploy_base();
    let cid = "7d1f9c4e-0b3a-4c55-9e2d-3f6a8b1c2d4e";
    let token = c.granted_workload(("apps", "worker", "worker-0"), "use-mi-lp", cid);
    let rules = deploy_base_cluster_role_rules();
    assert_eq!(
        rules.len(),
        4,
        "the cases below cover every rule: {rules:?}"
    );

    // 1. As deploy/base has it: ready, and a granted pod gets its token.
    {
        let p = c.base_proxy(&[(cid, TENANT)], &[]);
        let (status, why) = p.request(cid, &token);
        assert_eq!(status, 200, "{why}\n{}", p.logs());
    }

    // 2. Each rule removed in turn, from a copy of the role bound to its own service account.
    // Without the default `system:service-account-issuer-discovery` bindings, the JWKS rule is
    // the only way to the keys (with them, every service account may read the JWKS anyway).
    c.kubectl(&[
        "delete",
        "clusterrolebinding",
        "system:service-account-issuer-discovery",
    ]);
    c.kubectl(&[
        "delete",
        "clusterrolebinding",
        "service-account-issuer-discovery-unauthenticated",
    ]);
    for (i, rule) in rules.iter().enumerate() {
        let p = proxy_without_rule(&c, &rules, i, cid);
        assert_the_missing_rule_is_named(&p, rule, cid, &token);
    }
}

/// The rules of the proxy's ClusterRole in deploy/base.
fn deploy_base_cluster_role_rules() -> Vec<Value> {
    let base_rbac =
        yaml_docs(&std::fs::read_to_string(repo().join("deploy/base/rbac.yaml")).unwrap());
    let role = base_rbac
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("deploy/base has the proxy's ClusterRole");
    role["rules"].as_array().unwrap().clone()
}

/// `serve` (not waited for) as a service account of its own bound to a copy of the proxy's
/// role without its `i`th rule.
fn proxy_without_rule(c: &Cluster, rules: &[Value], i: usize, cid: &str) -> Proxy {
    let name = format!("ibp-least-{i}");
    let kept: Vec<&Value> = rules.iter().filter(|r| **r != rules[i]).collect();
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": name}, "rules": kept,
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": BASE_NS}],
    });
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": BASE_NS}});
    c.apply(&format!("{role}\n---\n{binding}\n---\n{sa}\n"));
    let kubeconfig = c.sa_kubeconfig(BASE_NS, &name);
    Proxy::start(&kubeconfig, &[(cid, TENANT)], &[])
}

/// A proxy without `rule` fails as that rule's absence makes it: never ready without the
/// discovery paths, no RBAC watch without the RBAC kinds, 503 without a review resource — and
/// says what it may not do.
fn assert_the_missing_rule_is_named(p: &Proxy, rule: &Value, cid: &str, token: &str) {
    let what = rule.to_string();
    if rule["nonResourceURLs"].is_array() {
        // Never ready: it cannot load the keys; its log says which URL was forbidden.
        std::thread::sleep(Duration::from_secs(5));
        assert!(!p.ready(), "ready without {what}");
        let logs = p.logs();
        // It reads the discovery document first, then the JWKS: both are this rule's.
        assert!(
            logs.contains("forbidden")
                && (logs.contains("cannot get path \"/.well-known/openid-configuration\"")
                    || logs.contains("cannot get path \"/openid/v1/jwks\"")),
            "without {what} the log names the forbidden path:\n{logs}"
        );
        return;
    }
    p.wait_ready();
    let resource = rule["resources"][0].as_str().unwrap();
    if resource == "clusterroles" {
        // Tokens are still served (decisions fall back to their TTLs), but the log names
        // every RBAC kind it may not watch.
        let (status, why) = p.request(cid, token);
        assert_eq!(status, 200, "{why}");
        let named = within(Duration::from_secs(20), || {
            let logs = p.logs();
            [
                "clusterroles",
                "clusterrolebindings",
                "roles",
                "rolebindings",
            ]
            .iter()
            .all(|r| {
                logs.contains(&format!("cannot list resource \\\"{r}\\\""))
                    || logs.contains(&format!("cannot list resource \"{r}\""))
            })
        });
        assert!(
            named.is_some(),
            "without {what} the log names the RBAC kinds:\n{}",
            p.logs()
        );
        return;
    }
    // TokenReview or SubjectAccessReview: the caller is refused with 503, and the answer
    // names the resource the proxy may not create.
    let (status, why) = p.request(cid, token);
    assert_eq!(status, 503, "without {what}: {why}");
    assert!(
        why.contains(&format!("cannot create resource \"{resource}\""))
            || p.logs()
                .contains(&format!("cannot create resource \\\"{resource}\\\"")),
        "without {what} the refusal names {resource}: {why}\n{}",
        p.logs()
    );
}

/// The proxy in the shared cluster, running as deploy/base's ServiceAccount.
fn shared_proxy(identities: &[(&str, &str)], flags: &[&str]) -> Proxy {
    shared().base_proxy(identities, flags)
}

#[test]
fn pod_tokens_are_served_through_each_grant_shape_and_refused_without_one() {
    let c = shared();
    let ns = "grants";
    c.workload(ns, "app", "app-0");
    let by_cluster_role = "0a1b2c3d-0000-4000-8000-000000000001";
    let by_role_binding = "0a1b2c3d-0000-4000-8000-000000000002";
    let by_group = "0a1b2c3d-0000-4000-8000-000000000003";
    let not_granted = "0a1b2c3d-0000-4000-8000-000000000004";
    // The how-to's shape: ClusterRole use-mi-<client-id> + ClusterRoleBinding.
    c.apply(&rbac_grant_cluster(
        &format!("use-mi-{by_cluster_role}"),
        by_cluster_role,
        &sa_subject(ns, "app"),
    ));
    // A RoleBinding in the namespace, to a Role there.
    c.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: use-mi, namespace: {ns}}}\n\
         rules: [{{apiGroups: [\"{GRANT_GROUP}\"], resources: [\"{by_role_binding}\"], verbs: [\"{VERB}\"]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: use-mi, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: use-mi}}\n\
         subjects: [{{kind: ServiceAccount, name: app}}]\n"
    ));
    // Every service account of the namespace, through its group.
    c.apply(&rbac_grant_cluster(
        &format!("use-mi-{by_group}"),
        by_group,
        &format!("{{kind: Group, name: \"system:serviceaccounts:{ns}\", apiGroup: rbac.authorization.k8s.io}}"),
    ));
    let ids: Vec<(&str, &str)> = [by_cluster_role, by_role_binding, by_group, not_granted]
        .iter()
        .map(|c| (*c, TENANT))
        .collect();
    let p = shared_proxy(&ids, &[]);
    let token = c.token(ns, "app", &audience(), Some("app-0"));
    for cid in [by_cluster_role, by_role_binding, by_group] {
        let (status, why) = p.request(cid, &token);
        assert_eq!(status, 200, "{cid}: {why}\n{}", p.logs());
    }
    let (status, why) = p.request(not_granted, &token);
    assert_eq!(status, 403, "{why}");
    for part in [
        format!("'{ns}/app'"),
        format!("verb '{VERB}'"),
        format!("resource '{not_granted}'"),
        format!("API group '{GRANT_GROUP}'"),
    ] {
        assert!(why.contains(&part), "the refusal names {part}: {why}");
    }
    // A token for another audience is refused outright.
    let wrong = c.token(ns, "app", "api://something-else", Some("app-0"));
    let (status, _) = p.request(by_cluster_role, &wrong);
    assert_eq!(status, 401);
}

/// kube-apiserver caches a successful token authentication for 10 s (its token cache's
/// success TTL), TokenReviews included: a deleted pod's token still reviews as valid that long.
const APISERVER_TOKEN_CACHE: u64 = 10;

#[test]
fn deleted_pods_and_service_accounts_lose_their_tokens_within_the_review_ttl() {
    let c = shared();
    let ns = "lifecycle";
    let cid = "0a1b2c3d-0000-4000-8000-000000000011";
    c.workload(ns, "app", "app-0");
    c.workload(ns, "other", "other-0");
    c.apply(&rbac_grant_cluster(
        "use-mi-lifecycle",
        cid,
        &format!("{{kind: Group, name: \"system:serviceaccounts:{ns}\", apiGroup: rbac.authorization.k8s.io}}"),
    ));
    let ttl = 2;
    let p = shared_proxy(
        &[(cid, TENANT)],
        &["--tokenreview-ttl-secs", &ttl.to_string()],
    );
    let pod_token = c.token(ns, "app", &audience(), Some("app-0"));
    let sa_token = c.token(ns, "other", &audience(), Some("other-0"));
    assert_eq!(p.request(cid, &pod_token).0, 200);
    assert_eq!(p.request(cid, &sa_token).0, 200);

    c.kubectl(&[
        "delete",
        "pod",
        "-n",
        ns,
        "app-0",
        "--grace-period=0",
        "--force",
    ]);
    let mut last = (0, String::new());
    let refused = within(Duration::from_secs(ttl + APISERVER_TOKEN_CACHE + 3), || {
        last = p.request(cid, &pod_token);
        last.0 == 401
    });
    assert!(
        refused.is_some(),
        "a deleted pod's token is refused within the TTL: {last:?}\n{}",
        p.logs()
    );
    eprintln!(
        "a deleted pod's token was refused {:.1} s after the deletion",
        refused.unwrap().as_secs_f64()
    );
    // The other pod's token is unaffected.
    assert_eq!(p.request(cid, &sa_token).0, 200);

    c.kubectl(&["delete", "serviceaccount", "-n", ns, "other"]);
    let refused = within(Duration::from_secs(ttl + APISERVER_TOKEN_CACHE + 3), || {
        p.request(cid, &sa_token).0 == 401
    });
    assert!(
        refused.is_some(),
        "a deleted service account's token is refused within the TTL"
    );
    let (_, why) = p.request(cid, &sa_token);
    assert!(!why.is_empty(), "the refusal says why");
}

/// Revocation through the real RBAC watch, also after the apiserver restarted under the proxy.
#[test]
fn revocation_through_the_real_watch_survives_an_apiserver_restart() {
    let c = Cluster::with_deploy_base();
    let ns = "revoke";
    let cid = "0a1b2c3d-0000-4000-8000-000000000021";
    let canary = "0a1b2c3d-0000-4000-8000-000000000022";
    let token = c.granted_workload((ns, "app", "app-0"), "use-mi-revoke", cid);
    let grant = rbac_grant_cluster("use-mi-revoke", cid, &sa_subject(ns, "app"));
    c.apply(&rbac_grant_cluster(
        "use-mi-canary",
        canary,
        &sa_subject(ns, "app"),
    ));
    let p = c.base_proxy(&[(cid, TENANT), (canary, TENANT)], &[]);
    assert_eq!(p.request(cid, &token).0, 200, "{}", p.logs());
    assert_eq!(p.request(canary, &token).0, 200);

    c.kubectl(&["delete", "clusterrolebinding", "use-mi-revoke"]);
    let took = within(Duration::from_secs(2), || p.request(cid, &token).0 == 403);
    assert!(took.is_some(), "a deleted binding is refused within 2 s");
    c.apply(&grant);
    assert!(within(Duration::from_secs(5), || p.request(cid, &token).0 == 200).is_some());
    // Re-granting the binding dropped this subject's decisions: both callers are cached again here.
    assert_eq!(p.request(canary, &token).0, 200);

    // The apiserver goes away (etcd stays): cached callers keep being served.
    harness_ok(&["stop-apiserver"], c.path());
    for cid in [cid, canary] {
        let (status, why) = p.request(cid, &token);
        assert_eq!(
            status, 200,
            "served from cache while the apiserver is down: {why}"
        );
    }
    harness_ok(&["start-apiserver"], c.path());
    let back = Instant::now();
    // The watch resumes: the canary's binding, deleted now, is refused long before the 5 min
    // an allowed decision is kept without a watch.
    c.kubectl(&["delete", "clusterrolebinding", "use-mi-canary"]);
    let resumed = within(Duration::from_secs(60), || {
        p.request(canary, &token).0 == 403
    });
    assert!(
        resumed.is_some(),
        "the RBAC watch resumed after the restart:\n{}",
        p.logs()
    );
    eprintln!(
        "RBAC watch resumed {:.1} s after the apiserver was back",
        back.elapsed().as_secs_f64()
    );
    // And from then on revocation is as fast as before.
    c.kubectl(&["delete", "clusterrolebinding", "use-mi-revoke"]);
    let took = within(Duration::from_secs(2), || p.request(cid, &token).0 == 403);
    assert!(
        took.is_some(),
        "a binding deleted after the restart is refused within 2 s"
    );
}

/// Service-account signing-key rotation, as an operator does it: the new key signs and the
/// old public key is still accepted; later the old key is dropped.
#[test]
fn signing_key_rotation_new_tokens_verify_and_dropped_keys_are_refused() {
    let c = Cluster::with_deploy_base();
    let ns = "rotate";
    let cid = "0a1b2c3d-0000-4000-8000-000000000031";
    let old = c.granted_workload((ns, "app", "app-0"), "use-mi-rotate", cid);
    // The proxy authenticates with the admin's client certificate here, so that dropping the
    // old key does not also revoke the proxy's own credentials (in a cluster the kubelet
    // re-issues its projected token).
    let kubeconfig = PathBuf::from(c.get("KUBECONFIG"));
    let ttl = "2";
    let p = Proxy::start(
        &kubeconfig,
        &[(cid, TENANT)],
        &["--tokenreview-ttl-secs", ttl],
    );
    p.wait_ready();
    assert_eq!(p.request(cid, &old).0, 200, "{}", p.logs());

    harness_ok(&["rotate-sa-key"], c.path());
    harness_ok(&["restart-apiserver"], c.path());
    let new = c.token(ns, "app", &audience(), Some("app-0"));
    let kid = |t: &str| {
        use base64::Engine;
        let header = t.split('.').next().unwrap();
        let h: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .unwrap(),
        )
        .unwrap();
        h["kid"].as_str().unwrap().to_string()
    };
    assert_ne!(
        kid(&old),
        kid(&new),
        "the new token is signed by the new key"
    );
    let (status, why) = p.request(cid, &new);
    assert_eq!(
        status, 200,
        "a token of the new key verifies after a JWKS refresh: {why}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(p.request(cid, &old).0, 200, "the old key is still accepted");

    harness_ok(&["drop-old-sa-keys"], c.path());
    harness_ok(&["restart-apiserver"], c.path());
    let refused = within(Duration::from_secs(10), || p.request(cid, &old).0 == 401);
    assert!(
        refused.is_some(),
        "a token of the dropped key is refused:\n{}",
        p.logs()
    );
    assert_eq!(
        p.request(cid, &new).0,
        200,
        "the current key's tokens still verify"
    );
}

// ---------------------------------------------------------------------- emulator fidelity

/// The RBAC objects of the fidelity table: every shape of grant the proxy may meet.
const FIDELITY_RBAC: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: fid-a}
---
apiVersion: v1
kind: Namespace
metadata: {name: fid-b}
---
# ClusterRole + ClusterRoleBinding to a ServiceAccount
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: fid-cr}
rules: [{apiGroups: ["cid.wi.aks.azure.com"], resources: ["aaaaaaaa-0000-4000-8000-000000000001"], verbs: ["use-managed-identity"]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: fid-crb}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: fid-cr}
subjects: [{kind: ServiceAccount, name: sa1, namespace: fid-a}]
---
# Role + RoleBinding; the subject leaves its namespace out (= the binding's)
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: fid-role, namespace: fid-a}
rules: [{apiGroups: ["cid.wi.aks.azure.com"], resources: ["aaaaaaaa-0000-4000-8000-000000000002"], verbs: ["use-managed-identity"]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: fid-rb, namespace: fid-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: fid-role}
subjects: [{kind: ServiceAccount, name: sa2}]
---
# RoleBinding to a ClusterRole, for a User
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: fid-cr-ns}
rules: [{apiGroups: ["cid.wi.aks.azure.com"], resources: ["aaaaaaaa-0000-4000-8000-000000000003"], verbs: ["use-managed-identity"]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: fid-rb-cr, namespace: fid-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: fid-cr-ns}
subjects: [{kind: User, name: alice, apiGroup: rbac.authorization.k8s.io}]
---
# A Group subject: every service account of fid-b
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: fid-cr-group}
rules: [{apiGroups: ["cid.wi.aks.azure.com"], resources: ["aaaaaaaa-0000-4000-8000-000000000004"], verbs: ["use-managed-identity"]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: fid-crb-group}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: fid-cr-group}
subjects: [{kind: Group, name: "system:serviceaccounts:fid-b", apiGroup: rbac.authorization.k8s.io}]
---
# resourceNames
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: fid-cr-names}
rules: [{apiGroups: ["cid.wi.aks.azure.com"], resources: ["aaaaaaaa-0000-4000-8000-000000000005"], resourceNames: ["x"], verbs: ["use-managed-identity"]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: fid-crb-names}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: fid-cr-names}
subjects: [{kind: User, name: bob, apiGroup: rbac.authorization.k8s.io}]
---
# '*' in verbs, in resources, in apiGroups
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: fid-cr-stars}
rules:
- {apiGroups: ["cid.wi.aks.azure.com"], resources: ["aaaaaaaa-0000-4000-8000-000000000006"], verbs: ["*"]}
- {apiGroups: ["cid.wi.aks.azure.com"], resources: ["*"], verbs: ["use-managed-identity"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: fid-crb-stars}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: fid-cr-stars}
subjects: [{kind: User, name: carol, apiGroup: rbac.authorization.k8s.io}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: fid-cr-anygroup}
rules: [{apiGroups: ["*"], resources: ["aaaaaaaa-0000-4000-8000-000000000007"], verbs: ["use-managed-identity"]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: fid-crb-anygroup}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: fid-cr-anygroup}
subjects: [{kind: User, name: dave, apiGroup: rbac.authorization.k8s.io}]
---
# An aggregated ClusterRole collecting labelled ones
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: fid-agg}
aggregationRule:
  clusterRoleSelectors: [{matchLabels: {fid/aggregate: "true"}}]
rules: []
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: fid-agg-part, labels: {fid/aggregate: "true"}}
rules: [{apiGroups: ["cid.wi.aks.azure.com"], resources: ["aaaaaaaa-0000-4000-8000-000000000008"], verbs: ["use-managed-identity"]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: fid-crb-agg}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: fid-agg}
subjects: [{kind: ServiceAccount, name: sa3, namespace: fid-a}]
---
# A binding in ANOTHER namespace than the service account's
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: fid-rb-other, namespace: fid-b}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: fid-cr-ns}
subjects: [{kind: ServiceAccount, name: sa4, namespace: fid-a}]
"#;

/// (name, user, extra groups, namespace, verb, apiGroup, resource, resource name)
type Scenario = (
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

const CID1: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const CID2: &str = "aaaaaaaa-0000-4000-8000-000000000002";
const CID3: &str = "aaaaaaaa-0000-4000-8000-000000000003";
const CID4: &str = "aaaaaaaa-0000-4000-8000-000000000004";
const CID5: &str = "aaaaaaaa-0000-4000-8000-000000000005";
const CID6: &str = "aaaaaaaa-0000-4000-8000-000000000006";
const CID7: &str = "aaaaaaaa-0000-4000-8000-000000000007";
const CID8: &str = "aaaaaaaa-0000-4000-8000-000000000008";
const SA1: &str = "system:serviceaccount:fid-a:sa1";
const G: &str = "cid.wi.aks.azure.com";
const U: &str = "use-managed-identity";

const SCENARIOS: &[Scenario] = &[
    (
        "ClusterRole+ClusterRoleBinding, SA",
        SA1,
        &[],
        "fid-a",
        U,
        G,
        CID1,
        "",
    ),
    (
        "... same SA, other namespace",
        SA1,
        &[],
        "fid-b",
        U,
        G,
        CID1,
        "",
    ),
    ("... same SA, cluster-wide", SA1, &[], "", U, G, CID1, ""),
    ("... other verb", SA1, &[], "fid-a", "get", G, CID1, ""),
    ("... other identity", SA1, &[], "fid-a", U, G, CID2, ""),
    ("... other API group", SA1, &[], "fid-a", U, "", CID1, ""),
    (
        "... other SA",
        "system:serviceaccount:fid-a:sa9",
        &[],
        "fid-a",
        U,
        G,
        CID1,
        "",
    ),
    (
        "Role+RoleBinding, subject ns omitted",
        "system:serviceaccount:fid-a:sa2",
        &[],
        "fid-a",
        U,
        G,
        CID2,
        "",
    ),
    (
        "... other namespace",
        "system:serviceaccount:fid-a:sa2",
        &[],
        "fid-b",
        U,
        G,
        CID2,
        "",
    ),
    (
        "... SA of the same name elsewhere",
        "system:serviceaccount:fid-b:sa2",
        &[],
        "fid-a",
        U,
        G,
        CID2,
        "",
    ),
    (
        "RoleBinding to ClusterRole, User",
        "alice",
        &[],
        "fid-a",
        U,
        G,
        CID3,
        "",
    ),
    ("... other namespace", "alice", &[], "fid-b", U, G, CID3, ""),
    ("... cluster-wide", "alice", &[], "", U, G, CID3, ""),
    (
        "Group system:serviceaccounts:fid-b",
        "system:serviceaccount:fid-b:any",
        &[
            "system:serviceaccounts",
            "system:serviceaccounts:fid-b",
            "system:authenticated",
        ],
        "fid-b",
        U,
        G,
        CID4,
        "",
    ),
    (
        "... group not sent",
        "system:serviceaccount:fid-b:any",
        &[],
        "fid-b",
        U,
        G,
        CID4,
        "",
    ),
    (
        "... SA of another namespace",
        "system:serviceaccount:fid-a:any",
        &[
            "system:serviceaccounts",
            "system:serviceaccounts:fid-a",
            "system:authenticated",
        ],
        "fid-a",
        U,
        G,
        CID4,
        "",
    ),
    (
        "Group only, no user",
        "",
        &["system:serviceaccounts:fid-b"],
        "fid-b",
        U,
        G,
        CID4,
        "",
    ),
    (
        "resourceNames: listed name",
        "bob",
        &[],
        "fid-a",
        U,
        G,
        CID5,
        "x",
    ),
    (
        "resourceNames: other name",
        "bob",
        &[],
        "fid-a",
        U,
        G,
        CID5,
        "y",
    ),
    (
        "resourceNames: no name",
        "bob",
        &[],
        "fid-a",
        U,
        G,
        CID5,
        "",
    ),
    ("'*' verbs", "carol", &[], "fid-a", "delete", G, CID6, ""),
    (
        "'*' resources",
        "carol",
        &[],
        "fid-a",
        U,
        G,
        "ffffffff-0000-4000-8000-00000000ffff",
        "",
    ),
    (
        "'*' resources, other group",
        "carol",
        &[],
        "fid-a",
        U,
        "apps",
        "deployments",
        "",
    ),
    (
        "'*' apiGroups",
        "dave",
        &[],
        "fid-a",
        U,
        "any.example.com",
        CID7,
        "",
    ),
    (
        "'*' apiGroups, core group",
        "dave",
        &[],
        "fid-a",
        U,
        "",
        CID7,
        "",
    ),
    (
        "aggregated ClusterRole",
        "system:serviceaccount:fid-a:sa3",
        &[],
        "fid-a",
        U,
        G,
        CID8,
        "",
    ),
    (
        "binding in another namespace: that ns",
        "system:serviceaccount:fid-a:sa4",
        &[],
        "fid-b",
        U,
        G,
        CID3,
        "",
    ),
    (
        "binding in another namespace: SA's ns",
        "system:serviceaccount:fid-a:sa4",
        &[],
        "fid-a",
        U,
        G,
        CID3,
        "",
    ),
    (
        "system:masters (bootstrap cluster-admin)",
        "root",
        &["system:masters"],
        "fid-a",
        U,
        G,
        CID1,
        "",
    ),
    (
        "system:authenticated only",
        "eve",
        &["system:authenticated"],
        "fid-a",
        U,
        G,
        CID1,
        "",
    ),
];

fn sar_body(s: &Scenario) -> Value {
    let (_, user, groups, ns, verb, group, resource, name) = *s;
    let mut attrs = json!({"verb": verb, "group": group, "resource": resource});
    if !ns.is_empty() {
        attrs["namespace"] = json!(ns);
    }
    if !name.is_empty() {
        attrs["name"] = json!(name);
    }
    let mut spec = json!({"resourceAttributes": attrs});
    if !user.is_empty() {
        spec["user"] = json!(user);
    }
    if !groups.is_empty() {
        spec["groups"] = json!(groups);
    }
    json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec})
}

/// POSTs a SubjectAccessReview with curl; returns (allowed, reason).
fn post_sar(base: &str, auth: &[String], body: &Value) -> (bool, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
        ])
        .args(auth)
        .arg("--data-binary")
        .arg(body.to_string())
        .arg(format!(
            "{base}/apis/authorization.k8s.io/v1/subjectaccessreviews"
        ))
        .output()
        .expect("curl runs");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON from {base}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(v["kind"], "SubjectAccessReview", "{base}: {v}");
    (
        v["status"]["allowed"].as_bool().unwrap_or(false),
        v["status"]["reason"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn emulator_answers_subject_access_reviews_like_the_real_apiserver() {
    let c = shared();
    c.apply(FIDELITY_RBAC);
    // The aggregation controller fills the aggregated role's rules.
    let filled = within(Duration::from_secs(30), || {
        c.kubectl(&[
            "get",
            "clusterrole",
            "fid-agg",
            "-o",
            "jsonpath={.rules[*].resources}",
        ])
        .contains(CID8)
    });
    assert!(
        filled.is_some(),
        "kube-controller-manager aggregated fid-agg"
    );

    // The emulator, given the same objects (without the namespaces) as its RBAC file.
    let state = tempfile::tempdir().unwrap();
    let rbac: String = FIDELITY_RBAC
        .split("\n---\n")
        .filter(|d| !d.contains("kind: Namespace"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    std::fs::write(state.path().join("rbac.yaml"), rbac).unwrap();
    let emu_port = port();
    let mut emu = Command::new(BIN)
        .args([
            "emulate",
            "kube",
            "--listen",
            &format!("127.0.0.1:{emu_port}"),
            "--state-dir",
        ])
        .arg(state.path().join("kube"))
        .arg("--rbac")
        .arg(state.path().join("rbac.yaml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let emu_url = format!("http://127.0.0.1:{emu_port}");
    let up = within(Duration::from_secs(20), || {
        http_ok(&format!("{emu_url}/readyz"))
    });
    assert!(up.is_some(), "the kube emulator started");
    let kubeconfig = std::fs::read_to_string(state.path().join("kube/kubeconfig")).unwrap();
    let bearer = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("token:"))
        .expect("the emulator's kubeconfig has a token")
        .trim()
        .trim_matches('"')
        .to_string();
    let real_auth = vec![
        "--cacert".to_string(),
        c.get("CA_FILE").to_string(),
        "--cert".to_string(),
        format!("{}/admin.crt", c.get("PKI_DIR")),
        "--key".to_string(),
        format!("{}/admin.key", c.get("PKI_DIR")),
    ];
    let emu_auth = vec!["-H".to_string(), format!("Authorization: Bearer {bearer}")];

    let mut table = String::from("| scenario | real apiserver | emulator |\n|---|---|---|\n");
    let mut differences = Vec::new();
    for s in SCENARIOS {
        let body = sar_body(s);
        let real = post_sar(c.get("APISERVER"), &real_auth, &body);
        let emulated = post_sar(&emu_url, &emu_auth, &body);
        let show = |(allowed, reason): &(bool, String)| {
            if *allowed {
                format!("allowed: {reason}")
            } else {
                format!("denied {reason}").trim().to_string()
            }
        };
        table.push_str(&format!(
            "| {} | {} | {} |\n",
            s.0,
            show(&real),
            show(&emulated)
        ));
        if real != emulated {
            differences.push(format!("{}: real {:?}, emulator {:?}", s.0, real, emulated));
        }
    }
    let _ = (emu.kill(), emu.wait());
    eprintln!("{table}");
    assert!(
        differences.is_empty(),
        "the emulator differs from the real apiserver:\n{}\n\n{table}",
        differences.join("\n")
    );
}

// ---------------------------------------------------------------------------- the webhook

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .filter_map(|d| {
            let v: serde_norway::Value = serde::Deserialize::deserialize(d).ok()?;
            serde_json::to_value(v)
                .ok()
                .filter(|v: &Value| !v.is_null())
        })
        .collect()
}

/// The example app's namespace (restricted Pod Security), applied for real.
fn apply_example_app_namespace(c: &Cluster) {
    c.apply(
        &std::fs::read_to_string(repo().join("deploy/overlays/example-app/namespace.yaml"))
            .unwrap(),
    );
}

/// `customTokenEndpoint` of deploy/webhook/values.yaml.
fn webhook_custom_token_endpoint() -> Value {
    yaml_docs(&std::fs::read_to_string(repo().join("deploy/webhook/values.yaml")).unwrap())[0]
        ["customTokenEndpoint"]
        .clone()
}

const WEBHOOK_NS: &str = "azure-workload-identity-system";
/// The tenant the webhook is installed with (the pod's identity says its own).
const WEBHOOK_TENANT: &str = "00000000-0000-0000-0000-0000000000bb";

/// The webhook's chart as the helm command of docs/installation.md renders it.
struct WebhookChart {
    docs: Vec<Value>,
    /// The Deployment's container args.
    args: Vec<String>,
    /// The ConfigMap its container takes its environment from.
    config: Value,
}

impl WebhookChart {
    fn find(&self, kind: &str) -> Value {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("the chart renders a {kind}"))
            .clone()
    }
}

/// The webhook started from its rendered Deployment, killed on drop.
struct Webhook {
    _process: KillOnDrop,
    err_log: PathBuf,
}

impl Webhook {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.err_log).unwrap_or_default()
    }
}

/// The real webhook, rendered by helm from its chart with deploy/webhook/values.yaml, mutates
/// the example app's pod; that pod, run without a kubelet, gets a token with the Python SDK.
#[test]
fn real_webhook_mutates_the_example_pod_which_gets_a_token_with_the_python_sdk() {
    let c = shared();
    let cid = "11111111-2222-3333-4444-555555555555";
    let tenant = "00000000-0000-0000-0000-0000000000aa";

    // 1. Render the chart exactly as the helm command of docs/installation.md does.
    let chart = render_webhook_chart(c);
    // 2. Its namespace, ConfigMap, ServiceAccount and RBAC as rendered; the Deployment runs
    // here as a process with the rendered args and the ConfigMap as its environment.
    let webhook = run_webhook(c, &chart);
    // 3. The rendered MutatingWebhookConfiguration, pointed at that process.
    let mwc = register_webhook(c, &chart);
    // 4. The example app, created through the webhook.
    let proxy = shared_proxy(&[(cid, tenant)], &[]);
    apply_example_app(c, &proxy, &webhook);
    // 5. The stored pod carries what the webhook injects.
    let (env, audience) = assert_injected_pod(c, &webhook, cid, tenant);
    // 6. The pod, run without a kubelet, gets its token.
    let answer = python_sdk_as_the_pod(c, &proxy, &env, &audience);
    assert_eq!(answer["ok"], true, "{answer}\n{}", proxy.logs());
    let claims = common::jwt_claims(answer["token"].as_str().unwrap());
    assert_eq!(claims["appid"], cid, "{claims}");
    // Unregister before the webhook stops: its failurePolicy is Fail.
    c.kubectl(&["delete", "mutatingwebhookconfiguration", &mwc]);
    drop(webhook);
}

/// The chart rendered with deploy/webhook/values.yaml: its Deployment is given the custom
/// token endpoint's annotation suffix and audience, and its settings are the ConfigMap.
fn render_webhook_chart(c: &Cluster) -> WebhookChart {
    let rendered = run_ok(
        Command::new(c.bin("helm"))
            .args([
                "template",
                "workload-identity-webhook",
                c.get("WEBHOOK_CHART"),
            ])
            .args(["--namespace", WEBHOOK_NS, "--values"])
            .arg(repo().join("deploy/webhook/values.yaml"))
            .args(["--set", &format!("azureTenantID={WEBHOOK_TENANT}")]),
    );
    let mut chart = WebhookChart {
        docs: yaml_docs(&rendered),
        args: Vec::new(),
        config: Value::Null,
    };
    chart.config = chart.find("ConfigMap");
    let deployment = chart.find("Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    chart.args = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    eprintln!(
        "rendered webhook args: {:?}\nrendered ConfigMap data: {}",
        chart.args, chart.config["data"]
    );
    // The suffix is whatever values.yaml says: whether the pod's annotation matches it is for
    // the real webhook to decide below (a wrong suffix leaves the pod unmutated).
    let suffix = webhook_custom_token_endpoint()["annotationSuffix"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(chart.args.contains(&format!(
        "--custom-token-endpoint-annotation-suffix={suffix}"
    )));
    assert!(chart
        .args
        .contains(&format!("--custom-token-endpoint-audience={}", audience())));
    assert_eq!(
        container["envFrom"][0]["configMapRef"]["name"], chart.config["metadata"]["name"],
        "the webhook's settings are the rendered ConfigMap"
    );
    chart
}

/// The chart's namespaced objects and RBAC applied, and its Deployment's container run as a
/// process (rendered args, the ConfigMap as its environment) until ready.
fn run_webhook(c: &Cluster, chart: &WebhookChart) -> Webhook {
    c.kubectl(&["create", "namespace", WEBHOOK_NS]);
    let objects: Vec<String> = chart
        .docs
        .iter()
        .filter(|d| {
            [
                "ConfigMap",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .contains(&d["kind"].as_str().unwrap_or(""))
        })
        .map(|d| d.to_string())
        .collect();
    c.apply(&objects.join("\n---\n"));
    let webhook_kubeconfig = c.sa_kubeconfig(WEBHOOK_NS, "azure-wi-webhook-admin");
    let mut env: Vec<(String, String)> = chart.config["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    env.push(("POD_NAMESPACE".into(), WEBHOOK_NS.into()));
    let health = c.get("WEBHOOK_HEALTH_PORT").to_string();
    let metrics = c.get("WEBHOOK_METRICS_PORT").to_string();
    let err_log = c.path().join("logs/webhook.err");
    let process = Command::new(c.bin("webhook"))
        .env_clear()
        .envs(env)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(&chart.args)
        // Only what a pod gives it differently: the API server, certificates, addresses.
        .arg("--kubeconfig")
        .arg(&webhook_kubeconfig)
        .arg("--disable-cert-rotation")
        .arg("--webhook-cert-dir")
        .arg(c.path().join("webhook-certs"))
        .args(["--health-addr", &format!("127.0.0.1:{health}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .stdout(std::fs::File::create(c.path().join("logs/webhook.log")).unwrap())
        .stderr(std::fs::File::create(&err_log).unwrap())
        .spawn()
        .expect("the webhook starts");
    let webhook = Webhook {
        _process: KillOnDrop(process),
        err_log,
    };
    let ready = within(Duration::from_secs(60), || {
        http_ok(&format!("http://127.0.0.1:{health}/readyz"))
    });
    assert!(
        ready.is_some(),
        "the webhook became ready:\n{}",
        webhook.logs()
    );
    webhook
}

/// Applies the rendered MutatingWebhookConfiguration, pointed at the webhook's process;
/// returns its name.
fn register_webhook(c: &Cluster, chart: &WebhookChart) -> String {
    use base64::Engine;
    let mut mwc = chart.find("MutatingWebhookConfiguration");
    let ca = std::fs::read(c.get("CA_FILE")).unwrap();
    mwc["webhooks"][0]["clientConfig"] = json!({
        "url": "https://127.0.0.1:9443/mutate-v1-pod",
        "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca),
    });
    c.apply(&mwc.to_string());
    mwc["metadata"]["name"].as_str().unwrap().to_string()
}

/// The example app: its namespace, the proxy's CA there, then the overlay (its pod is
/// created through the webhook; failurePolicy Fail makes a broken webhook fail the apply).
fn apply_example_app(c: &Cluster, proxy: &Proxy, webhook: &Webhook) {
    apply_example_app_namespace(c);
    let ca_configmap = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "identity-binding-proxy-ca", "namespace": "demo"},
        "data": {"ca.crt": String::from_utf8(proxy.ca()).unwrap()},
    });
    c.apply(&ca_configmap.to_string());
    let applied = within(Duration::from_secs(20), || {
        c.kubectl_out(
            &[
                "apply",
                "-k",
                &repo().join("deploy/overlays/example-app").to_string_lossy(),
            ],
            None,
        )
        .status
        .success()
    });
    assert!(
        applied.is_some(),
        "the example app applies:\n{}",
        webhook.logs()
    );
}

/// The example pod as stored: the webhook injected the proxy's settings (values.yaml's
/// endpoint, the SNI name, the CA file, never the CA data), the identity, and the projected
/// token and CA. Returns its env and its token's audience.
fn assert_injected_pod(
    c: &Cluster,
    webhook: &Webhook,
    cid: &str,
    tenant: &str,
) -> (BTreeMap<String, String>, String) {
    let pod: Value =
        serde_json::from_str(&c.kubectl(&["get", "pod", "-n", "demo", "demo", "-o", "json"]))
            .unwrap();
    let container = &pod["spec"]["containers"][0];
    let env: BTreeMap<String, String> = container["env"]
        .as_array()
        .unwrap_or_else(|| panic!("the webhook injected no env: {pod}\n{}", webhook.logs()))
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    let values = webhook_custom_token_endpoint();
    let var = |name: &str| env.get(name).map(String::as_str);
    assert_eq!(
        var("AZURE_KUBERNETES_TOKEN_PROXY"),
        values["azureKubernetesTokenProxy"].as_str(),
        "{env:?}"
    );
    assert_eq!(var("AZURE_KUBERNETES_SNI_NAME"), Some(SNI), "{env:?}");
    assert_eq!(
        var("AZURE_KUBERNETES_CA_FILE"),
        Some("/var/run/secrets/azure/wi/ca-cert/ca.crt"),
        "{env:?}"
    );
    assert_eq!(
        var("AZURE_FEDERATED_TOKEN_FILE"),
        Some("/var/run/secrets/azure/wi/token/azure-identity-token"),
        "{env:?}"
    );
    assert_eq!(var("AZURE_CLIENT_ID"), Some(cid));
    assert_eq!(var("AZURE_TENANT_ID"), Some(tenant));
    assert!(
        !env.contains_key("AZURE_KUBERNETES_CA_DATA"),
        "never FILE and DATA both: {env:?}"
    );
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    let sources: Vec<&Value> = volumes
        .iter()
        .filter_map(|v| v["projected"]["sources"].as_array())
        .flatten()
        .collect();
    let token_source = sources
        .iter()
        .find(|s| s["serviceAccountToken"].is_object())
        .unwrap_or_else(|| panic!("a projected token: {volumes:?}"));
    assert_eq!(token_source["serviceAccountToken"]["audience"], audience());
    let ca_source = sources
        .iter()
        .find(|s| s["configMap"].is_object())
        .unwrap_or_else(|| panic!("the CA ConfigMap is projected: {volumes:?}"));
    assert_eq!(ca_source["configMap"]["name"], "identity-binding-proxy-ca");
    let audience = token_source["serviceAccountToken"]["audience"]
        .as_str()
        .unwrap()
        .to_string();
    (env, audience)
}

/// Runs the Python SDK's token script as the pod without a kubelet: its env, with the
/// projected files under a temp dir and the Service name resolved to the proxy's loopback
/// address. Returns the script's answer.
fn python_sdk_as_the_pod(
    c: &Cluster,
    proxy: &Proxy,
    env: &BTreeMap<String, String>,
    audience: &str,
) -> Value {
    let root = tempfile::tempdir().unwrap();
    let mapped = |p: &str| root.path().join(p.trim_start_matches('/'));
    let token_file = mapped(&env["AZURE_FEDERATED_TOKEN_FILE"]);
    let ca_file = mapped(&env["AZURE_KUBERNETES_CA_FILE"]);
    std::fs::create_dir_all(token_file.parent().unwrap()).unwrap();
    std::fs::create_dir_all(ca_file.parent().unwrap()).unwrap();
    std::fs::write(&token_file, c.token("demo", "demo", audience, Some("demo"))).unwrap();
    let ca_data = c.kubectl(&[
        "get",
        "configmap",
        "-n",
        "demo",
        "identity-binding-proxy-ca",
        "-o",
        "jsonpath={.data.ca\\.crt}",
    ]);
    std::fs::write(&ca_file, ca_data).unwrap();
    let service_url = &env["AZURE_KUBERNETES_TOKEN_PROXY"];
    let host = service_url
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap();
    let mut sdk_env: Vec<(&str, String)> =
        env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    for (k, v) in &mut sdk_env {
        match *k {
            "AZURE_FEDERATED_TOKEN_FILE" => *v = token_file.display().to_string(),
            "AZURE_KUBERNETES_CA_FILE" => *v = ca_file.display().to_string(),
            "AZURE_KUBERNETES_TOKEN_PROXY" => *v = v.replace(host, &proxy.listen.to_string()),
            _ => {}
        }
    }
    let python = python_with_sdk();
    let script = repo().join("tests/sdk/python_get_token.py");
    common::run_sdk_script(&python, &[&script], &sdk_env)
}
