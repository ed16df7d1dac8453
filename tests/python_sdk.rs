//! The official Python SDK (`azure-identity==1.27.0`, installed from PyPI at test time into a
//! venv under target/) against `identity-binding-proxy dev` run as its own process, exactly
//! as an app developer would. This test fails, never skips, when the SDK cannot be installed.

mod common;

use std::path::Path;

use common::{jwt_claims, python_with_sdk, run_sdk_script, DevProcess};

#[test]
fn python_sdk_gets_a_token_and_sees_our_refusal() {
    let python = python_with_sdk();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/python_get_token.py");
    let state = tempfile::tempdir().unwrap();
    let dev = DevProcess::start(state.path());

    let ok = run_sdk_script(&python, &[&script], &dev.sdk_env("allowed_token_file"));
    assert_eq!(ok["ok"], true, "{ok}");
    // The token is the Entra emulator's, issued for our identity.
    let claims = jwt_claims(ok["token"].as_str().unwrap());
    assert_eq!(claims["appid"], dev.info["client_id"], "{claims}");
    assert!(ok["expires_on"].as_u64().unwrap() > 0);

    let denied = run_sdk_script(&python, &[&script], &dev.sdk_env("denied_token_file"));
    assert_eq!(denied["ok"], false, "{denied}");
    let msg = denied["error"].as_str().unwrap();
    assert!(msg.contains("not allowed to use managed identity"), "{msg}");
    assert!(msg.contains("use-managed-identity"), "{msg}");
}
