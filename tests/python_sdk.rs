//! The official Python SDK (`azure-identity==1.27.0`, installed from PyPI at test time into a
//! venv under target/) against `identity-binding-proxy dev` run as its own process, exactly
//! as an app developer would. This test fails, never skips, when the SDK cannot be installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SDK: &str = "azure-identity==1.27.0";

struct Dev {
    child: Child,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python_with_sdk() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv-python");
    let python = venv.join("bin/python");
    let marker = venv.join(".installed-azure-identity-1.27.0");
    if marker.exists() {
        return python;
    }
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 must be installed");
    assert!(status.success(), "creating the venv failed");
    let out = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", SDK])
        .output()
        .expect("pip runs");
    assert!(
        out.status.success(),
        "installing {SDK} from PyPI failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&marker, b"").unwrap();
    python
}

fn start_dev(state: &Path) -> (Dev, serde_json::Value) {
    let child = Command::new(env!("CARGO_BIN_EXE_identity-binding-proxy"))
        .args(["dev", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dev starts");
    let dev = Dev { child };
    let deadline = Instant::now() + Duration::from_secs(60);
    let file = state.join("dev.json");
    while !file.exists() {
        assert!(Instant::now() < deadline, "dev.json did not appear within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    (dev, info)
}

fn run_sdk(python: &Path, info: &serde_json::Value, token_file: &str) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/python_get_token.py");
    let s = |k: &str| info[k].as_str().unwrap().to_string();
    let out = Command::new(python)
        .arg(script)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AZURE_KUBERNETES_TOKEN_PROXY", s("proxy_url"))
        .env("AZURE_KUBERNETES_SNI_NAME", s("sni_name"))
        .env("AZURE_KUBERNETES_CA_FILE", s("ca_file"))
        .env("AZURE_CLIENT_ID", s("client_id"))
        .env("AZURE_TENANT_ID", s("tenant_id"))
        .env("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/")
        .env("AZURE_FEDERATED_TOKEN_FILE", s(token_file))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!("SDK script printed no JSON. stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    })
}

#[test]
fn python_sdk_gets_a_token_and_sees_our_refusal() {
    let python = python_with_sdk();
    let state = tempfile::tempdir().unwrap();
    let (_dev, info) = start_dev(state.path());

    let ok = run_sdk(&python, &info, "allowed_token_file");
    assert_eq!(ok["ok"], true, "{ok}");
    let token = ok["token"].as_str().unwrap();
    // The token is the Entra emulator's, issued for our identity.
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["appid"], info["client_id"], "{claims}");
    assert!(ok["expires_on"].as_u64().unwrap() > 0);

    let denied = run_sdk(&python, &info, "denied_token_file");
    assert_eq!(denied["ok"], false, "{denied}");
    let msg = denied["error"].as_str().unwrap();
    assert!(msg.contains("not allowed to use managed identity"), "{msg}");
    assert!(msg.contains("use-managed-identity"), "{msg}");
}
