//! The command line as operators and tools use it: exit codes, the issuer commands, and
//! `dev token` against a dev state dir (also after `dev` stopped).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_identity-binding-proxy-dev"))
}

#[test]
fn bad_configuration_exits_64_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args([
            "serve",
            "--tls",
            "a=/nonexistent.pem,/nonexistent.key",
            "--issuer-key",
            "/nonexistent",
            "--issuer-url",
            "http://issuer.example/{tenant}",
            "--bindings",
        ])
        .arg(dir.path().join("b.yaml"))
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("https"), "{err}");

    let out = bin()
        .args(["serve", "--no-such-flag"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
}

#[test]
fn missing_files_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args([
            "serve",
            "--tls",
            "a=/nonexistent.pem,/nonexistent.key",
            "--issuer-key",
            "/nonexistent",
            "--issuer-url",
            "https://issuer.example/{tenant}/{client_id}",
            "--kubeconfig",
            "/nonexistent",
            // Ports of their own: a default port held by another process would be exit 69.
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--bindings",
        ])
        .arg(dir.path().join("b.yaml"))
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("/nonexistent.pem"), "{err}");
}

/// The flags `serve` needs to get past its configuration to where it reaches out: loopback
/// ports, an issuer key, an empty bindings file and a kubeconfig whose apiserver is
/// `apiserver`.
fn serve_flags(dir: &std::path::Path, apiserver: std::net::SocketAddr) -> Vec<String> {
    let (public, _) = keygen(dir, "issuer");
    let bindings = dir.join("bindings.yaml");
    std::fs::write(&bindings, "").unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    \
             server: https://{apiserver}\n    insecure-skip-tls-verify: true\nusers:\n\
             - name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    \
             cluster: c\n    user: u\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    let path = |p: std::path::PathBuf| p.display().to_string();
    let tls = format!(
        "proxy.test={},{}",
        path(dir.join("tls.crt")),
        path(dir.join("tls.key"))
    );
    [
        "serve",
        "--tls",
        &tls,
        "--issuer-key",
        &path(public.with_extension("key")),
        "--issuer-url",
        "https://issuer.example/{tenant}/{client_id}",
        "--bindings",
        &path(bindings),
        "--kubeconfig",
        &path(kubeconfig),
        "--admin-listen",
        "127.0.0.1:0",
        "--log-format",
        "text",
    ]
    .map(String::from)
    .to_vec()
}

/// An address nothing listens on: a port the kernel gave, then closed.
fn closed_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[test]
fn a_port_another_process_holds_exits_69() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let out = bin()
        .args(serve_flags(dir.path(), closed_port()))
        .args(["--listen", &addr.to_string()])
        .env_clear()
        .output()
        .unwrap();
    let (err, last) = exited_with(&out, 69);
    let last = last.as_str();
    assert!(last.starts_with("error: "), "{err}");
    assert!(
        last.contains(&format!("cannot listen on {addr} (--listen)"))
            && last.contains("another process holds the port"),
        "{err}"
    );
}

/// A sidecar asks the apiserver who its pod is before it serves; an apiserver that does not
/// answer within the sidecar's patience (30 s) is an unavailable dependency, not a flag.
#[test]
fn a_sidecar_whose_apiserver_is_unreachable_exits_69_naming_the_apiserver() {
    let dir = tempfile::tempdir().unwrap();
    let apiserver = closed_port();
    let out = bin()
        .args(serve_flags(dir.path(), apiserver))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--sidecar",
            "--authn-mode",
            "local",
        ])
        .arg("--sidecar-ca-out")
        .arg(dir.path().join("ca.crt"))
        .env_clear()
        .output()
        .unwrap();
    let (err, last) = exited_with(&out, 69);
    let last = last.as_str();
    assert!(last.starts_with("error: --sidecar: "), "{err}");
    assert!(
        last.contains("no answer from the apiserver within 30 s")
            && last.contains("Kubernetes API server could not be reached"),
        "{err}"
    );
}

#[test]
fn flags_read_their_environment_variables() {
    let out = bin()
        .args(["serve"])
        .env_clear()
        .env("IBP_TLS", "a=/x.pem,/x.key")
        .env("IBP_ISSUER_KEY", "/nonexistent-key")
        .env(
            "IBP_ISSUER_URL",
            "https://issuer.example/{tenant}/{client_id}",
        )
        .env("IBP_BINDINGS", "/nonexistent-bindings")
        .env("IBP_LISTEN", "127.0.0.1:0")
        .env("IBP_ADMIN_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // The error is about the files, not about missing flags: the variables were read.
    assert!(String::from_utf8_lossy(&out.stderr).contains("/x.pem"));
}

#[test]
fn issuer_keygen_publish_and_fic() {
    let dir = tempfile::tempdir().unwrap();
    let (public, _) = keygen(dir.path(), "cluster1");
    let key = public.with_extension("key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(&public)
        .unwrap()
        .contains("BEGIN PUBLIC KEY"));
    // Refuses to overwrite an existing key.
    assert!(!bin()
        .args(["issuer", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap()
        .status
        .success());

    let bindings = dir.path().join("bindings.yaml");
    std::fs::write(&bindings, "bindings:\n  - clientId: 11111111-2222-3333-4444-555555555555\n    tenantId: 72f988bf-86f1-41af-91ab-2d7cd011db47\n").unwrap();
    let out_dir = dir.path().join("site");
    // Even when handed the PRIVATE key, publish writes only public material.
    let out = bin()
        .args([
            "issuer",
            "publish",
            "--issuer-url",
            "https://issuer.example/{tenant}/{client_id}",
            "--out",
        ])
        .arg(&out_dir)
        .arg("--bindings")
        .arg(&bindings)
        .arg("--public-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base =
        out_dir.join("72f988bf-86f1-41af-91ab-2d7cd011db47/11111111-2222-3333-4444-555555555555");
    let jwks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("openid/v1/jwks")).unwrap()).unwrap();
    let k = &jwks["keys"][0];
    assert_eq!(k["kty"], "RSA");
    for private in ["d", "p", "q", "dp", "dq", "qi"] {
        assert!(k.get(private).is_none(), "{private} leaked");
    }
    let disc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(base.join(".well-known/openid-configuration")).unwrap(),
    )
    .unwrap();
    assert_eq!(disc["issuer"], "https://issuer.example/72f988bf-86f1-41af-91ab-2d7cd011db47/11111111-2222-3333-4444-555555555555");

    let out = bin()
        .args([
            "issuer",
            "fic",
            "--issuer-url",
            "https://issuer.example/{tenant}/{client_id}",
            "--bindings",
        ])
        .arg(&bindings)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("az identity federated-credential create"),
        "{text}"
    );
    assert!(
        text.contains("--subject '11111111-2222-3333-4444-555555555555'"),
        "{text}"
    );
    assert!(
        text.contains("--audiences 'api://AzureADTokenExchange'"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_token_mints_tokens_the_proxy_accepts_even_after_dev_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let sys = common::start_dev(dir.path()).await;
    let client = common::Client::for_dev(&sys);
    let info = sys.info.clone();
    let mint = |sa: &str, expires: &str| {
        let out = bin()
            .args(["dev", "token", "--state-dir"])
            .arg(dir.path())
            .args([
                "--namespace",
                "demo",
                "--service-account",
                sa,
                "--expires-in",
                expires,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let token = mint("demo", "600");
    let r = client
        .post_form("/", &common::token_form(&info.client_id, &token))
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let expired = mint("demo", "-60");
    let r = client
        .post_form("/", &common::token_form(&info.client_id, &expired))
        .await;
    assert_eq!(r.status, 401);
    sys.shutdown().await;
    // After dev stopped, the key is still in the state dir.
    assert_eq!(mint("demo", "60").split('.').count(), 3);
}

/// `issuer keygen --out <dir>/<name>.key`, returning the public key's file and its kid.
fn keygen(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let key = dir.join(format!("{name}.key"));
    let out = bin()
        .args(["issuer", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let kid = stdout.lines().next().unwrap().strip_prefix("kid ").unwrap();
    (key.with_extension("pub"), kid.to_string())
}

fn published_kids(site: &std::path::Path, tenant: &str, client: &str) -> Vec<String> {
    let jwks: serde_json::Value = serde_json::from_slice(
        &std::fs::read(site.join(format!("{tenant}/{client}/openid/v1/jwks"))).unwrap(),
    )
    .unwrap();
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

const EAST_ONLY: &str = "11111111-1111-1111-1111-111111111111";
const BOTH: &str = "22222222-2222-2222-2222-222222222222";
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

#[test]
fn issuer_publish_fleet_gives_each_identity_the_keys_of_the_clusters_that_bind_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_, east) = keygen(dir.path(), "east");
    let (_, west) = keygen(dir.path(), "west");
    let (_, west_next) = keygen(dir.path(), "west-next");
    std::fs::write(
        dir.path().join("east-bindings.yaml"),
        format!("bindings:\n  - clientId: {EAST_ONLY}\n    tenantId: {TENANT}\n  - clientId: {BOTH}\n    tenantId: {TENANT}\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("west-bindings.yaml"),
        format!("bindings:\n  - clientId: {BOTH}\n    tenantId: {TENANT}\n"),
    )
    .unwrap();
    let fleet = dir.path().join("fleet.yaml");
    std::fs::write(
        &fleet,
        "clusters:\n  - name: east\n    publicKeys: [east.pub]\n    bindings: east-bindings.yaml\n  - name: west\n    publicKeys: [west.pub, west-next.pub]\n    bindings: west-bindings.yaml\n",
    )
    .unwrap();
    let site = dir.path().join("site");
    let publish = |url: &str, extra: &[&str]| {
        bin()
            .args(["issuer", "publish", "--issuer-url", url, "--out"])
            .arg(&site)
            .arg("--fleet")
            .arg(&fleet)
            .args(extra)
            // Run from elsewhere: the fleet's paths are relative to the fleet file.
            .current_dir("/")
            .env_clear()
            .output()
            .unwrap()
    };
    let out = publish("https://issuer.example/{tenant}/{client_id}", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.is_empty(), "no warning with --fleet: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4);
    assert_eq!(published_kids(&site, TENANT, EAST_ONLY), [east.as_str()]);
    assert_eq!(published_kids(&site, TENANT, BOTH), [east, west, west_next]);
    let disc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(site.join(format!(
            "{TENANT}/{EAST_ONLY}/.well-known/openid-configuration"
        )))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        disc["issuer"],
        format!("https://issuer.example/{TENANT}/{EAST_ONLY}")
    );

    // Refused, in one line and with exit 64: a URL shared by every identity, and --fleet
    // together with the flags it replaces.
    let out = publish("https://issuer.example/{tenant}", &[]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("{client_id}"), "{err}");
    let out = publish(
        "https://issuer.example/{tenant}/{client_id}",
        &["--public-key", "east.pub"],
    );
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--fleet") && err.contains("--public-key"),
        "{err}"
    );

    // A broken fleet file: one line naming the file and the fault.
    std::fs::write(
        &fleet,
        "clusters:\n  - name: east\n    publicKeys: [gone.pub]\n    bindings: east-bindings.yaml\n",
    )
    .unwrap();
    let out = publish("https://issuer.example/{tenant}/{client_id}", &[]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&fleet.display().to_string()), "{err}");
    assert!(err.contains("gone.pub"), "{err}");
}

#[test]
fn issuer_publish_with_shared_keys_warns_in_one_line_and_publishes_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let (east_pub, east) = keygen(dir.path(), "east");
    let (west_pub, west) = keygen(dir.path(), "west");
    let bindings = dir.path().join("bindings.yaml");
    std::fs::write(
        &bindings,
        format!("bindings:\n  - clientId: {EAST_ONLY}\n    tenantId: {TENANT}\n  - clientId: {BOTH}\n    tenantId: {TENANT}\n"),
    )
    .unwrap();
    let site = dir.path().join("site");
    let out = bin()
        .args([
            "issuer",
            "publish",
            "--issuer-url",
            "https://issuer.example/{tenant}/{client_id}",
            "--out",
        ])
        .arg(&site)
        .arg("--bindings")
        .arg(&bindings)
        .arg("--public-key")
        .arg(&east_pub)
        .arg("--public-key")
        .arg(&west_pub)
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("warning: "), "{stderr}");
    assert!(stderr.contains("every identity"), "{stderr}");
    assert!(stderr.contains("--fleet"), "{stderr}");
    for client in [EAST_ONLY, BOTH] {
        assert_eq!(
            published_kids(&site, TENANT, client),
            [east.clone(), west.clone()]
        );
    }
}

#[test]
fn serve_help_lists_the_exit_codes() {
    let out = bin().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for code in [
        "64  misconfiguration",
        "69  a dependency unavailable",
        "70  an internal",
    ] {
        assert!(help.contains(code), "{code} in {help}");
    }
}

/// Asserts the exit code; gives stderr and its last line (the `error: ...` line).
fn exited_with(out: &std::process::Output, code: i32) -> (String, String) {
    assert_eq!(out.status.code(), Some(code), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = err.trim().lines().last().unwrap_or_default().to_string();
    (err, last)
}
