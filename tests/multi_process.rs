//! The walk-through of docs/multi-cluster.md, run for real: `scripts/multi-cluster.sh` starts
//! `emulate static`, `emulate entra` (one FIC), three `emulate kube` and three `serve`
//! processes and gets a token in each cluster.

use std::process::Command;

#[test]
fn three_clusters_from_the_command_line_get_tokens_through_one_fic() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/multi-cluster.sh");
    // A port range of our own, so parallel test binaries do not collide; below Linux's default
    // ephemeral range (32768-60999), where an outgoing connection could hold one of the ports.
    let base = 10_000 + (std::process::id() % 2_000) * 10;
    let out = Command::new("bash")
        .arg(script)
        .env("BIN", env!("CARGO_BIN_EXE_identity-binding-proxy-dev"))
        .env("BASE_PORT", base.to_string())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the walk-through failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in 1..=3 {
        assert!(
            stdout.contains(&format!("cluster {n}: token issued")),
            "{stdout}"
        );
    }
    assert!(stdout.contains("FICs on the identity: 1"), "{stdout}");
}
