//! The official Node SDK (`@azure/identity@4.14.1`, installed from npm at test time under
//! target/) against `identity-binding-proxy dev` run as its own process. Fails, never skips,
//! when the SDK cannot be installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{jwt_claims, run_sdk_script, DevProcess};

const SDK: &str = "@azure/identity@4.14.1";

/// A directory with the SDK in node_modules and the test script beside it.
fn node_project() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-node");
    std::fs::create_dir_all(&dir).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/node_get_token.js");
    std::fs::copy(&script, dir.join("get_token.js")).unwrap();
    let marker = dir.join(".installed-azure-identity-4.14.1");
    if !marker.exists() {
        std::fs::write(
            dir.join("package.json"),
            br#"{"name":"ibp-sdk-test","private":true}"#,
        )
        .unwrap();
        let out = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", SDK])
            .current_dir(&dir)
            .output()
            .expect("npm must be installed");
        assert!(
            out.status.success(),
            "installing {SDK} from npm failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&marker, b"").unwrap();
    }
    dir
}

#[test]
fn node_sdk_gets_a_token_and_sees_our_refusal() {
    let project = node_project();
    let script = project.join("get_token.js");
    let state = tempfile::tempdir().unwrap();
    let dev = DevProcess::start(state.path());
    let node = Path::new("node");

    let ok = run_sdk_script(node, &[&script], &dev.sdk_env("allowed_token_file"));
    assert_eq!(ok["ok"], true, "{ok}");
    let claims = jwt_claims(ok["token"].as_str().unwrap());
    assert_eq!(claims["appid"], dev.info["client_id"], "{claims}");

    let denied = run_sdk_script(node, &[&script], &dev.sdk_env("denied_token_file"));
    assert_eq!(denied["ok"], false, "{denied}");
    let msg = denied["error"].as_str().unwrap();
    assert!(msg.contains("not allowed to use managed identity"), "{msg}");
}
