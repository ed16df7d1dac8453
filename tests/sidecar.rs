//! Sidecar mode against the emulators: a second proxy, started with `--sidecar` beside a dev
//! system, runs with a kubeconfig holding the POD's own API token (service account demo/demo,
//! audience the apiserver's), as a native sidecar would in-cluster. It must serve that account
//! alone, authorize with SelfSubjectAccessReviews only (no SubjectAccessReview, no
//! TokenReview, no RBAC watch), make its own CA, and bound a revoked grant by its allow TTL.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ibp_emulators::kube::MintRequest;
use identity_binding_proxy::config::ProxyConfig;
use identity_binding_proxy::serve::RunningProxy;
use identity_binding_proxy_dev::dev::DevSystem;

/// The pod the sidecar runs in: dev's demo workload.
const NS: &str = "demo";
const SA: &str = "demo";

/// A kubeconfig holding a pod's API token: the service account's token with the API audience
/// (the issuer), as the kubelet projects it into every pod.
fn pod_kubeconfig(sys: &DevSystem, dir: &Path, ns: &str, sa: &str) -> std::path::PathBuf {
    let token = sys
        .kube
        .mint_token(&MintRequest {
            namespace: ns.into(),
            service_account: sa.into(),
            audiences: Vec::new(),
            expires_in_secs: 0,
            pod_name: Some(format!("{sa}-pod")),
        })
        .unwrap();
    let path = dir.join(format!("kubeconfig-{ns}-{sa}"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: k\n  cluster: {{server: \"{}\"}}\n\
             users:\n- name: pod\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: pod\n  \
             context: {{cluster: k, user: pod}}\ncurrent-context: pod\n",
            sys.kube.url()
        ),
    )
    .unwrap();
    path
}

/// `serve --sidecar` flags for a sidecar in `pod` (a dir of its own), running with
/// `kubeconfig`, signing with dev's issuer key (start_sidecar drops it for an `--issuer-key`
/// of the test's own).
fn sidecar_flags(sys: &DevSystem, dev: &Path, pod: &Path, kubeconfig: &Path) -> Vec<String> {
    vec![
        "--sidecar".into(),
        format!("--sidecar-ca-out={}", pod.join("shared/ca.crt").display()),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!(
            "--tls={}={},{}",
            sys.info.sni_name,
            pod.join("tls.crt").display(),
            pod.join("tls.key").display()
        ),
        format!("--issuer-key={}", dev.join("issuer.key").display()),
        format!("--issuer-url={}", sys.info.issuer_url),
        format!("--bindings={}", dev.join("bindings.yaml").display()),
        format!("--authority-host={}", sys.entra.url()),
        "--authn-mode=local".into(),
        "--listen=127.0.0.1:0".into(),
        "--admin-listen=127.0.0.1:0".into(),
    ]
}

struct Pod {
    _dir: tempfile::TempDir,
    sidecar: RunningProxy,
    client: Client,
    ca_file: std::path::PathBuf,
}

async fn start_sidecar(sys: &DevSystem, dev: &Path, more: &[&str]) -> Pod {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("shared")).unwrap();
    let kubeconfig = pod_kubeconfig(sys, dir.path(), NS, SA);
    let mut flags = sidecar_flags(sys, dev, dir.path(), &kubeconfig);
    if more.iter().any(|f| f.starts_with("--issuer-key")) {
        flags.retain(|f| !f.starts_with("--issuer-key"));
    }
    flags.extend(more.iter().map(|s| s.to_string()));
    let config = ProxyConfig::from_flags(flags).unwrap();
    let sidecar = identity_binding_proxy::serve::start(config).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            sidecar.readiness.is_ready()
        })
        .await,
        "the sidecar became ready"
    );
    let ca_file = dir.path().join("shared/ca.crt");
    let ca = std::fs::read(&ca_file).expect("the sidecar wrote its CA to --sidecar-ca-out");
    let client = Client::new(sidecar.addr, &sys.info.sni_name, &ca, &[b"http/1.1"]);
    Pod {
        _dir: dir,
        sidecar,
        client,
        ca_file,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_serves_its_pods_own_account_with_self_reviews_only_and_refuses_others_by_name() {
    let dev = tempfile::tempdir().unwrap();
    let sys = start_dev(dev.path()).await;
    let before = sys.kube.counts();
    let pod = start_sidecar(&sys, dev.path(), &[]).await;
    let aud = serve_default("token-audience");

    // The pod's own account, granted the identity: served, over the sidecar's own CA.
    let own = mint_sa(&sys, NS, SA, &[&aud], 0);
    let r = pod.client.post_token(&sys.info.client_id, &own).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(r.json["access_token"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));

    // Another account, in the same namespace or another, valid and even granted: refused
    // before any review, naming both accounts.
    for (ns, sa) in [(NS, "intruder"), ("other", SA)] {
        let token = mint_sa(&sys, ns, sa, &[&aud], 0);
        let r = pod.client.post_token(&sys.info.client_id, &token).await;
        assert_eq!(r.status, 403, "{}", r.json);
        assert_eq!(r.json["error"], "unauthorized_client");
        let msg = r.error_description();
        assert!(msg.contains("system:serviceaccount:demo:demo"), "{msg}");
        assert!(
            msg.contains(&format!("system:serviceaccount:{ns}:{sa}")),
            "{msg}"
        );
    }
    // A token that is not valid at all stays a 401, as on the node's proxy.
    let expired = mint_sa(&sys, NS, SA, &[&aud], -3600);
    let r = pod.client.post_token(&sys.info.client_id, &expired).await;
    assert_eq!(r.status, 401, "{}", r.json);

    // What it asked the apiserver: who am I, and may I (self reviews with the pod's token);
    // never a SubjectAccessReview or a TokenReview, never an RBAC list or watch.
    let after = sys.kube.counts();
    assert!(
        after.self_reviews >= before.self_reviews + 2,
        "{before:?} → {after:?}"
    );
    // dev's own proxy made none of the requests above, so every review counted is the
    // sidecar's.
    assert_eq!(
        after.subject_access_reviews, before.subject_access_reviews,
        "{after:?}"
    );
    assert_eq!(after.token_reviews, before.token_reviews, "{after:?}");
    assert_eq!(after.rbac_lists, before.rbac_lists, "{after:?}");
    assert_eq!(after.rbac_watches, before.rbac_watches, "{after:?}");

    // Same metrics as the node's proxy, on its loopback admin port.
    assert!(pod.sidecar.admin_addr.ip().is_loopback());
    let m = |series: &'static str| metric(pod.sidecar.admin_addr, series);
    assert_eq!(
        m("identity_binding_proxy_requests_total{outcome=\"success\",status=\"200\"}").await,
        1.0
    );
    assert_eq!(
        m("identity_binding_proxy_requests_total{outcome=\"forbidden\",status=\"403\"}").await,
        2.0
    );

    // Its exec probe: `probe URL` exits 0 on the admin port's 2xx, and fails otherwise.
    let probe = |url: String| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_identity-binding-proxy-dev"))
            .args(["probe", &url])
            .output()
            .await
            .unwrap()
    };
    let admin = pod.sidecar.admin_addr;
    let out = probe(format!("http://{admin}/readyz")).await;
    assert!(out.status.success(), "{out:?}");
    let out = probe(format!("http://{admin}/no-such-path")).await;
    assert!(!out.status.success(), "a 404 fails the probe");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
    let out = probe("http://192.0.2.1:9090/readyz".into()).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopback"),
        "{out:?}"
    );
    pod.sidecar.stop().await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_is_refused_by_the_sidecar_within_its_allow_ttl() {
    let dev = tempfile::tempdir().unwrap();
    let sys = start_dev(dev.path()).await;
    let ttl = Duration::from_secs(2);
    let pod = start_sidecar(&sys, dev.path(), &["--authz-allowed-ttl-secs=2"]).await;
    let own = mint_sa(&sys, NS, SA, &[&serve_default("token-audience")], 0);
    let r = pod.client.post_token(&sys.info.client_id, &own).await;
    assert_eq!(r.status, 200, "{}", r.json);

    // The grant goes (no RoleBinding left). The sidecar cannot watch RBAC: the cached allow
    // holds until its TTL, and the next review refuses.
    let revoked = Instant::now();
    let rbac = std::fs::read_to_string(&sys.info.rbac_file).unwrap();
    let without_binding = rbac.split("\n---\n").next().unwrap().to_string();
    sys.kube.set_rbac_yaml(&without_binding).unwrap();
    let refused = loop {
        let r = pod.client.post_token(&sys.info.client_id, &own).await;
        if r.status == 403 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.json);
        assert!(
            revoked.elapsed() < ttl + Duration::from_secs(2),
            "still served {:?} after the grant went",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = revoked.elapsed();
    assert!(
        took <= ttl + Duration::from_secs(1),
        "refused after {took:?}"
    );
    assert!(
        refused.error_description().contains("use-managed-identity"),
        "{}",
        refused.json
    );
    pod.sidecar.stop().await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_in_the_pod_gets_its_token_through_the_sidecar_ca() {
    let python = python_with_sdk();
    let dev = tempfile::tempdir().unwrap();
    let sys = start_dev(dev.path()).await;
    let pod = start_sidecar(&sys, dev.path(), &[]).await;
    let aud = serve_default("token-audience");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/python_get_token.py");
    let env = |token: String| {
        let file = pod.ca_file.with_file_name(format!("{}.jwt", token.len()));
        std::fs::write(&file, token).unwrap();
        vec![
            (
                "AZURE_KUBERNETES_TOKEN_PROXY",
                format!("https://{}", pod.sidecar.addr),
            ),
            ("AZURE_KUBERNETES_SNI_NAME", sys.info.sni_name.clone()),
            (
                "AZURE_KUBERNETES_CA_FILE",
                pod.ca_file.display().to_string(),
            ),
            ("AZURE_CLIENT_ID", sys.info.client_id.clone()),
            ("AZURE_TENANT_ID", sys.info.tenant_id.clone()),
            (
                "AZURE_AUTHORITY_HOST",
                "https://login.microsoftonline.com/".into(),
            ),
            ("AZURE_FEDERATED_TOKEN_FILE", file.display().to_string()),
        ]
    };
    let run = |env: Vec<(&'static str, String)>| {
        let (python, script) = (python.clone(), script.clone());
        tokio::task::spawn_blocking(move || run_sdk_script(&python, &[&script], &env))
    };
    let ok = run(env(mint_sa(&sys, NS, SA, &[&aud], 0))).await.unwrap();
    assert_eq!(ok["ok"], true, "{ok}");
    let claims = jwt_claims(ok["token"].as_str().unwrap());
    assert_eq!(claims["appid"], sys.info.client_id.as_str(), "{claims}");

    let other = run(env(mint_sa(&sys, NS, "intruder", &[&aud], 0)))
        .await
        .unwrap();
    assert_eq!(other["ok"], false, "{other}");
    let msg = other["error"].as_str().unwrap();
    assert!(
        msg.contains("serves only that pod's service account"),
        "{msg}"
    );
    pod.sidecar.stop().await;
    sys.shutdown().await;
}

#[test]
fn a_sidecar_refuses_to_listen_beyond_loopback_or_to_need_tokenreviews() {
    let base = |listen: &str, admin: &str, authn: &str| {
        ProxyConfig::from_flags([
            "--sidecar".to_string(),
            "--tls=n=c.pem,k.pem".into(),
            "--issuer-key=k.pem".into(),
            "--issuer-url=https://issuer.example/{tenant}/{client_id}".into(),
            "--bindings=b.yaml".into(),
            format!("--listen={listen}"),
            format!("--admin-listen={admin}"),
            format!("--authn-mode={authn}"),
        ])
        .map_err(|e| {
            assert_eq!(e.exit_code(), 64, "a sidecar's flag is usage: {e}");
            e.to_string()
        })
    };
    assert!(base("127.0.0.1:8443", "127.0.0.1:9090", "local").is_ok());
    let e = base("0.0.0.0:8443", "127.0.0.1:9090", "local").unwrap_err();
    assert!(e.contains("--listen must be a loopback address"), "{e}");
    let e = base("127.0.0.1:8443", "10.0.0.5:9090", "local").unwrap_err();
    assert!(
        e.contains("--admin-listen must be a loopback address"),
        "{e}"
    );
    let e = base("127.0.0.1:8443", "127.0.0.1:9090", "both").unwrap_err();
    assert!(e.contains("--authn-mode local"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_signs_with_its_own_key_which_entra_trusts_once_the_fleet_publishes_it() {
    let dev = tempfile::tempdir().unwrap();
    let sys = start_dev(dev.path()).await;
    let bin = env!("CARGO_BIN_EXE_identity-binding-proxy-dev");
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("web.key");
    let out = std::process::Command::new(bin)
        .args(["issuer", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pod = start_sidecar(
        &sys,
        dev.path(),
        &[&format!("--issuer-key={}", key.display())],
    )
    .await;
    let own = mint_sa(&sys, NS, SA, &[&serve_default("token-audience")], 0);

    // Its key is in no published JWKS yet: Entra refuses the assertion (AADSTS7000272: the key
    // is not in the issuer's metadata), its code passed on.
    let r = pod.client.post_token(&sys.info.client_id, &own).await;
    assert_eq!(r.status, 401, "{}", r.json);
    assert!(
        r.json["error_codes"]
            .as_array()
            .is_some_and(|c| c.contains(&7000272.into())),
        "{}",
        r.json
    );

    // The fleet: the cluster's key for what the cluster binds, the workload's key for what
    // the workload binds (here the same identity).
    let fleet = keys.path().join("fleet.yaml");
    std::fs::write(
        &fleet,
        format!(
            "clusters:\n  - name: dev\n    publicKeys: [{}]\n    bindings: {}\n\
             \x20 - name: web-sidecar\n    publicKeys: [{}]\n    bindings: {}\n",
            dev.path().join("issuer.key").display(),
            dev.path().join("bindings.yaml").display(),
            keys.path().join("web.pub").display(),
            dev.path().join("bindings.yaml").display(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["issuer", "publish", "--out"])
        .arg(dev.path().join("issuer-docs"))
        .arg("--fleet")
        .arg(&fleet)
        .args(["--issuer-url", &sys.info.issuer_url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let jwks = std::fs::read_to_string(dev.path().join(format!(
        "issuer-docs/{}/{}/openid/v1/jwks",
        sys.info.tenant_id, sys.info.client_id
    )))
    .unwrap();
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    assert_eq!(jwks["keys"].as_array().map(Vec::len), Some(2), "{jwks}");

    let r = pod.client.post_token(&sys.info.client_id, &own).await;
    assert_eq!(r.status, 200, "{}", r.json);
    // The cluster's own proxy is served as before.
    let r = Client::for_dev(&sys)
        .post_token(&sys.info.client_id, &read(&sys.info.allowed_token_file))
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    pod.sidecar.stop().await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_started_while_the_apiserver_is_down_waits_for_it_then_serves() {
    let dev = tempfile::tempdir().unwrap();
    let sys = start_dev(dev.path()).await;
    sys.kube.set_available(false);
    let started = Instant::now();
    let comes_back = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        sys.kube.set_available(true);
    };
    let (pod, ()) = tokio::join!(start_sidecar(&sys, dev.path(), &[]), comes_back);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "it waited for the apiserver to learn who it is"
    );
    let own = mint_sa(&sys, NS, SA, &[&serve_default("token-audience")], 0);
    let r = pod.client.post_token(&sys.info.client_id, &own).await;
    assert_eq!(r.status, 200, "{}", r.json);
    pod.sidecar.stop().await;
    sys.shutdown().await;
}
