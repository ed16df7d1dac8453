//! The command line as operators and tools use it: exit codes, the issuer commands, and
//! `dev token` against a dev state dir (also after `dev` stopped).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_identity-binding-proxy"))
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
            "--bindings",
        ])
        .arg(dir.path().join("b.yaml"))
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent.pem"), "{err}");
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
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // The error is about the files, not about missing flags: the variables were read.
    assert!(String::from_utf8_lossy(&out.stderr).contains("/x.pem"));
}

#[test]
fn issuer_keygen_publish_and_fic() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster1.key");
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
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public = key.with_extension("pub");
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
