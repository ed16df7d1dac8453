//! `doctor` against `dev`: dev describes itself to its kube emulator as the chart would
//! install it (DaemonSet, Secrets, ConfigMaps, Service, endpoint, node, Ready pod, webhook,
//! mutated demo pod) and writes its FIC as `az` lists it, so every check runs for real — its
//! `/readyz` and metrics through the emulator's pod proxy — and passes.

mod common;

use std::process::Command;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_identity-binding-proxy-dev");

fn doctor(state: &std::path::Path, client_id: &str, output: &str) -> std::process::Output {
    Command::new(BIN)
        .arg("doctor")
        .arg("--kubeconfig")
        .arg(state.join("kube/kubeconfig"))
        .arg("--federated-credentials")
        .arg(format!("{client_id}={}", state.join("fics.json").display()))
        .args(["--output", output])
        .output()
        .expect("doctor runs")
}

#[test]
fn every_check_passes_against_dev() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let dev = DevProcess::start(&state);
    let client_id = dev.get("client_id");
    let out = doctor(&state, &client_id, "json");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 17, "{report:#}");
    for check in checks {
        assert_eq!(check["status"], "pass", "{check:#}");
    }
    assert_eq!(out.status.code(), Some(0));
    // The proxy's own /readyz and metrics, read through the pod proxy.
    let health = checks.iter().find(|c| c["id"] == "proxy.health").unwrap();
    assert!(
        health["summary"]
            .as_str()
            .unwrap()
            .starts_with("1 proxy pod(s) ready"),
        "{health:#}"
    );
    let text = doctor(&state, &client_id, "text");
    assert_eq!(text.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&text.stdout)
        .contains("17 passed, 0 failed, 0 could not be checked"));
}

#[test]
fn a_fic_differing_from_devs_is_found_and_the_exit_status_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let dev = DevProcess::start(&state);
    let client_id = dev.get("client_id");
    // The FIC as `az` would list it after a subject was typed in upper case.
    let fics = std::fs::read_to_string(state.join("fics.json")).unwrap();
    let mut list: serde_json::Value = serde_json::from_str(&fics).unwrap();
    let subject = list[0]["subject"].as_str().unwrap().to_string();
    list[0]["subject"] = subject.to_uppercase().into();
    std::fs::write(state.join("fics.json"), list.to_string()).unwrap();
    let out = doctor(&state, &client_id, "json");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed: Vec<&serde_json::Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .collect();
    assert_eq!(failed.len(), 1, "{report:#}");
    assert_eq!(failed[0]["id"], "fic.match");
    assert!(failed[0]["fix"]
        .as_str()
        .unwrap()
        .contains(&format!("--subject '{subject}'")));
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn no_installation_an_unreachable_apiserver_and_bad_arguments_have_their_own_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let dev = DevProcess::start(&state);
    let client_id = dev.get("client_id");
    // Another namespace: nothing installed there, and doctor says how to install it.
    let out = Command::new(BIN)
        .arg("doctor")
        .arg("--kubeconfig")
        .arg(state.join("kube/kubeconfig"))
        .args(["--namespace", "elsewhere", "--output", "json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["checks"][0]["id"], "proxy.installed", "{report:#}");
    assert!(report["checks"][0]["fix"].as_str().unwrap().starts_with(
        "helm install identity-binding-proxy charts/identity-binding-proxy --namespace elsewhere"
    ));
    assert_eq!(out.status.code(), Some(3));
    // A FIC list that is not one: 64, naming it, before anything is asked.
    std::fs::write(dir.path().join("fics.json"), "{}").unwrap();
    let out = Command::new(BIN)
        .arg("doctor")
        .arg("--kubeconfig")
        .arg(state.join("kube/kubeconfig"))
        .arg("--federated-credentials")
        .arg(format!(
            "{client_id}={}",
            dir.path().join("fics.json").display()
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fics.json"));
    // The apiserver gone: 69, in one line.
    drop(dev);
    let out = Command::new(BIN)
        .arg("doctor")
        .arg("--kubeconfig")
        .arg(state.join("kube/kubeconfig"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("could not be reached"), "{stderr}");
}

#[test]
fn a_client_id_is_read_as_the_proxy_reads_it_and_an_unbound_one_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let dev = DevProcess::start(&state);
    let client_id = dev.get("client_id");
    // Upper case, as the portal shows it: the same identity, compared.
    let out = doctor(&state, &client_id.to_uppercase(), "json");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fic = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "fic.match")
        .unwrap();
    assert_eq!(
        fic["summary"],
        "1 identity(ies) hold exactly the FIC the proxy presents"
    );
    // A client id no binding names: nothing would be compared, so 64, naming the bound ones.
    let out = doctor(&state, "11111111-2222-3333-4444-555555555555", "json");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("the bound client ids are: {client_id}")),
        "{stderr}"
    );
    // A CA file for the issuer that cannot be read: 64, before anything is asked.
    let out = Command::new(BIN)
        .arg("doctor")
        .arg("--kubeconfig")
        .arg(state.join("kube/kubeconfig"))
        .arg("--issuer-ca-file")
        .arg(dir.path().join("no-such-ca.pem"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-ca.pem"));
    // A reader that stops reading (`doctor | head -1`) ends doctor normally.
    let mut child = Command::new(BIN)
        .arg("doctor")
        .arg("--kubeconfig")
        .arg(state.join("kube/kubeconfig"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
