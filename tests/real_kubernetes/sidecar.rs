//! Sidecar mode against the real apiserver: `serve --sidecar` running with a real POD's API
//! token (a TokenRequest bound to the pod, with the apiserver's audience, as the kubelet
//! projects it), in a namespace whose service account holds nothing but its grant. The real
//! RBAC must let it read the cluster JWKS, learn who it is (SelfSubjectReview) and authorize
//! (SelfSubjectAccessReview); a removed grant must be refused within the allow TTL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common;
use crate::harness::*;

const NS: &str = "sidecar-app";
const SA: &str = "web";
const POD: &str = "web-0";
const CID: &str = "5eadca12-0000-4000-8000-000000000001";
/// The allow TTL the sidecar runs with here (the component sets 60 s).
const ALLOWED_TTL: Duration = Duration::from_secs(3);

/// A kubeconfig holding the pod's API token: bound to the pod, audience the apiserver's.
fn pod_kubeconfig(c: &Cluster, dir: &Path) -> PathBuf {
    let token = c.token(NS, SA, c.get("ISSUER"), Some(POD));
    c.token_kubeconfig(&token, &dir.join("pod-kubeconfig"))
}

fn grant(c: &Cluster, sa: &str) {
    c.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: use-{CID}, namespace: {NS}}}\n\
         rules: [{{apiGroups: [\"{GRANT_GROUP}\"], resources: [\"{CID}\"], verbs: [\"{VERB}\"]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {sa}-uses-{CID}, namespace: {NS}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: use-{CID}}}\n\
         subjects: [{{kind: ServiceAccount, name: {sa}}}]\n"
    ));
}

#[test]
fn sidecar_with_a_real_pod_token_serves_its_pod_refuses_others_and_loses_a_removed_grant() {
    let c = shared();
    c.workload(NS, SA, POD);
    c.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: other, namespace: {NS}}}\n"
    ));
    grant(c, SA);
    grant(c, "other");
    // The workload holds no right to review others or to read RBAC: only its grant.
    let who = format!("system:serviceaccount:{NS}:{SA}");
    for (verb, resource) in [
        ("create", "tokenreviews.authentication.k8s.io"),
        ("create", "subjectaccessreviews.authorization.k8s.io"),
        ("list", "rolebindings.rbac.authorization.k8s.io"),
        ("watch", "clusterroles.rbac.authorization.k8s.io"),
    ] {
        let out = c.kubectl_out(&["auth", "can-i", verb, resource, "--as", &who], None);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "no",
            "{who} may {verb} {resource}"
        );
    }

    let pod_dir = tempfile::tempdir().unwrap();
    let kubeconfig = pod_kubeconfig(c, pod_dir.path());
    let ca_out = pod_dir.path().join("ca.crt");
    let ttl = ALLOWED_TTL.as_secs().to_string();
    let p = Proxy::start(
        &kubeconfig,
        &[(CID, TENANT)],
        &[
            "--sidecar",
            "--sidecar-ca-out",
            ca_out.to_str().unwrap(),
            "--authn-mode",
            "local",
            "--authz-allowed-ttl-secs",
            &ttl,
        ],
    );
    // Ready = the cluster JWKS read with the pod's own token (service-account issuer
    // discovery) and its own account learned (SelfSubjectReview).
    p.wait_ready();
    let logs = p.logs_with(&who);
    assert!(
        logs.contains(&who),
        "the sidecar names the account it serves:\n{logs}"
    );
    let ca = std::fs::read(&ca_out).expect("the sidecar wrote its CA");
    let client = common::Client::new(p.listen, SNI, &ca, &[b"http/1.1"]);
    let ask = |token: &str| ask_token(&client, CID, token);

    // Its own pod's token: authorized by a SelfSubjectAccessReview on the real RBAC.
    let own = c.token(NS, SA, &audience(), Some(POD));
    let (status, why) = ask(&own);
    assert_eq!(status, 200, "{why}\n{}", p.logs());

    // Another account of the same namespace, granted the same identity: refused, named.
    let other = c.token(NS, "other", &audience(), None);
    let (status, why) = ask(&other);
    assert_eq!(status, 403, "{why}");
    assert!(why.contains(&who), "{why}");
    assert!(
        why.contains(&format!("system:serviceaccount:{NS}:other")),
        "{why}"
    );

    // The Python SDK in "the pod": the webhook's variables, pointed at the sidecar.
    let token_file = pod_dir.path().join("token");
    std::fs::write(&token_file, &own).unwrap();
    let env: Vec<(&str, String)> = vec![
        (
            "AZURE_KUBERNETES_TOKEN_PROXY",
            format!("https://{}", p.listen),
        ),
        ("AZURE_KUBERNETES_SNI_NAME", SNI.into()),
        ("AZURE_KUBERNETES_CA_FILE", ca_out.display().to_string()),
        ("AZURE_CLIENT_ID", CID.into()),
        ("AZURE_TENANT_ID", TENANT.into()),
        (
            "AZURE_AUTHORITY_HOST",
            "https://login.microsoftonline.com/".into(),
        ),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            token_file.display().to_string(),
        ),
    ];
    let python = common::python_with_sdk();
    let script = repo().join("tests/sdk/python_get_token.py");
    let answer = common::run_sdk_script(&python, &[&script], &env);
    assert_eq!(answer["ok"], true, "{answer}\n{}", p.logs());
    let claims = common::jwt_claims(answer["token"].as_str().unwrap());
    assert_eq!(claims["appid"], CID, "{claims}");

    // The grant goes. No watch tells the sidecar: the cached allow lasts its TTL, then the
    // next SelfSubjectAccessReview refuses.
    c.kubectl(&[
        "delete",
        "rolebinding",
        "-n",
        NS,
        &format!("{SA}-uses-{CID}"),
    ]);
    let mut last = (0, String::new());
    let took = within(ALLOWED_TTL + Duration::from_secs(3), || {
        last = ask(&own);
        last.0 == 403
    });
    let took = took.unwrap_or_else(|| panic!("still served: {last:?}\n{}", p.logs()));
    assert!(took <= ALLOWED_TTL + Duration::from_secs(1), "{took:?}");
    assert!(last.1.contains(VERB), "{}", last.1);
    eprintln!("sidecar: removed grant refused after {took:?} (allow TTL {ALLOWED_TTL:?})");
}
