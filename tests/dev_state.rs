//! `dev` and its state dir, through the real binary: one `dev` per state dir (a second one is
//! refused and changes nothing), bad input refused before anything is written, credentials
//! written owner-only, plain logs when redirected, and `dev token` beside a running `dev`.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Client, DevProcess};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_identity-binding-proxy-dev"))
}

/// A finished run of the binary.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `dev` with `args` and an empty environment; a run still going after 30 s is killed
/// and fails the test (a `dev` that should have been refused is serving instead).
fn run_dev(args: &[&str]) -> Run {
    let out = tempfile::tempdir().unwrap();
    let (stdout, stderr) = (out.path().join("stdout"), out.path().join("stderr"));
    let mut child = bin()
        .arg("dev")
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "dev {args:?} was still running after 30 s; stderr: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: std::fs::read_to_string(&stdout).unwrap(),
        stderr: std::fs::read_to_string(&stderr).unwrap(),
    }
}

/// Asserts a refusal of the configuration: exit 64 and exactly one line on stderr, which is
/// returned.
fn refused(run: &Run) -> String {
    refused_with(run, 64)
}

/// Asserts a refusal with exit `code` and exactly one line on stderr, which is returned.
fn refused_with(run: &Run, code: i32) -> String {
    assert_eq!(run.status.code(), Some(code), "stderr: {}", run.stderr);
    let line = run.stderr.trim();
    assert_eq!(line.lines().count(), 1, "one line expected: {line}");
    assert!(line.starts_with("error: "), "{line}");
    line.to_string()
}

/// What a file is, to tell any change: content digest, mode, inode (a replacement with equal
/// bytes is a new inode) and modification time.
#[derive(Debug, PartialEq)]
struct Seen {
    sha256: Vec<u8>,
    mode: u32,
    ino: u64,
    mtime_ns: i128,
}

/// Every file and directory under `dir`, recursively.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Seen> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let sha256 = if meta.is_dir() {
                todo.push(path.clone());
                Vec::new()
            } else {
                let bytes = std::fs::read(&path).unwrap();
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes)
                    .as_ref()
                    .to_vec()
            };
            out.insert(
                path.strip_prefix(dir).unwrap().to_path_buf(),
                Seen {
                    sha256,
                    mode: meta.mode(),
                    ino: meta.ino(),
                    mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
                },
            );
        }
    }
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Waits for the file the running proxy writes last on its own (the cluster JWKS it keeps
/// for restarts), so what follows sees a state dir at rest.
fn wait_for_rest(state: &Path) {
    let jwks = state.join("proxy/cluster-jwks.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !jwks.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            jwks.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A token request with the allowed SA token, to the `dev` described by `dev.json`.
async fn token_request(dev: &DevProcess, assertion: &str) -> common::Reply {
    let addr = dev
        .get("proxy_url")
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let ca = std::fs::read(dev.get("ca_file")).unwrap();
    let client = Client::new(addr, &dev.get("sni_name"), &ca, &[b"http/1.1"]);
    client.post_token(&dev.get("client_id"), assertion).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_dev_on_a_running_state_dir_exits_64_naming_the_first_and_changes_nothing() {
    let state = tempfile::tempdir().unwrap();
    let first = DevProcess::start(state.path());
    wait_for_rest(state.path());
    let before = snapshot(state.path());
    let dir = state.path().to_str().unwrap();

    // With free ports, only the lock can stop it; with the default ones, as typed in a second
    // terminal, the running instance is named all the same.
    for args in [
        &[
            "--state-dir",
            dir,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ][..],
        &["--state-dir", dir][..],
    ] {
        let run = run_dev(args);
        let line = refused(&run);
        assert!(line.contains(&format!("pid {}", first.pid())), "{line}");
        assert!(line.contains(&first.get("proxy_url")), "{line}");
        assert!(line.contains("in use"), "{line}");
        assert!(
            line.contains(
                "identity-binding-proxy-dev dev --state-dir OTHER_DIR --listen 127.0.0.1:0 \
                 --admin-listen 127.0.0.1:0"
            ),
            "the line says how to start a second one: {line}"
        );
        assert_eq!(run.stdout, "", "no banner from a refused dev");
    }

    let after = snapshot(state.path());
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .collect();
    assert!(
        changed.is_empty(),
        "the second dev changed the first one's files: {changed:?}"
    );
    assert!(after.contains_key(Path::new("dev.json")));

    // The first one keeps serving.
    let allowed = std::fs::read_to_string(first.get("allowed_token_file")).unwrap();
    let reply = token_request(&first, allowed.trim()).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert!(reply.json["access_token"].is_string(), "{}", reply.json);
}

#[test]
fn a_busy_port_exits_69_as_serve_does_naming_its_flag_and_writes_nothing() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap().to_string();
    let root = tempfile::tempdir().unwrap();
    for (flag, other) in [
        ("--listen", "--admin-listen"),
        ("--admin-listen", "--listen"),
    ] {
        let empty = root.path().join(format!("empty{flag}"));
        std::fs::create_dir(&empty).unwrap();
        let missing = root.path().join(format!("missing{flag}"));
        for state in [&empty, &missing] {
            let run = run_dev(&[
                "--state-dir",
                state.to_str().unwrap(),
                flag,
                &taken,
                other,
                "127.0.0.1:0",
            ]);
            // Another process holds the port: unavailable (69), as for `serve`, not a usage error.
            let line = refused_with(&run, 69);
            assert!(
                line.contains(&format!("cannot listen on {taken}")),
                "{line}"
            );
            assert!(line.contains(&format!("({flag})")), "names {flag}: {line}");
            assert!(!line.contains(&format!("({other})")), "{line}");
            assert!(line.contains(&format!("{flag} 127.0.0.1:0")), "{line}");
        }
        assert_eq!(
            std::fs::read_dir(&empty).unwrap().count(),
            0,
            "an empty state dir stays empty"
        );
        assert!(!missing.exists(), "a missing state dir is not created");
    }
}

#[test]
fn bad_flags_are_refused_before_anything_is_written() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let bad_rbac = root.path().join("rbac.yaml");
    std::fs::write(&bad_rbac, "kind: [").unwrap();
    let free = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
    let dir = state.to_str().unwrap();

    let mut args = vec!["--state-dir", dir];
    args.extend(free);
    args.extend(["--", "--no-such-flag"]);
    let line = refused(&run_dev(&args));
    assert!(line.contains("--no-such-flag"), "{line}");

    let mut args = vec!["--state-dir", dir, "--rbac", bad_rbac.to_str().unwrap()];
    args.extend(free);
    let line = refused(&run_dev(&args));
    assert!(line.contains("--rbac"), "{line}");

    assert!(!state.exists(), "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_dev_log_has_no_escape_codes() {
    let state = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let (out_file, err_file) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let child = bin()
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(state.path())
        // Only the destination decides: no NO_COLOR to hide behind.
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    let dev = DevProcess::adopt(child, state.path());
    let allowed = std::fs::read_to_string(dev.get("allowed_token_file")).unwrap();
    assert_eq!(token_request(&dev, allowed.trim()).await.status, 200);
    // The request's log line, then the logs are complete enough to judge.
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = std::fs::read(&err_file).unwrap();
        if String::from_utf8_lossy(&log).contains("status=200") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(dev);
    let text = String::from_utf8_lossy(&log);
    assert!(text.contains("identity-binding-proxy listening"), "{text}");
    assert!(
        text.contains("status=200"),
        "the request was logged: {text}"
    );
    assert!(
        !log.contains(&0x1b),
        "escape codes in a redirected log: {text:?}"
    );
    let banner = std::fs::read(&out_file).unwrap();
    assert!(String::from_utf8_lossy(&banner).contains("dev is ready"));
    assert!(!banner.contains(&0x1b), "escape codes in the banner");
}

#[test]
fn credential_files_are_owner_only_and_the_state_dir_too() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let dev = DevProcess::start(&state);
    wait_for_rest(&state);

    for dir in ["", "tokens", "tls", "kube", "proxy"] {
        assert_eq!(mode(&state.join(dir)), 0o700, "{dir:?}");
    }
    let private = [
        "tokens/allowed.jwt",
        "tokens/denied.jwt",
        "tls/tls.key",
        "tls/ca.key",
        "issuer.key",
        "kube/sa-signing-key.pem",
        "kube/kubeconfig",
        "dev.lock",
    ];
    for file in private {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }
    // Whatever else others could read is public by nature: certificates, the published
    // issuer documents, names and addresses. New files must join one list or the other.
    let public = [
        "ca.crt",
        "tls/tls.crt",
        "tls/ca.crt",
        "env",
        "dev.json",
        "identity.json",
        "rbac.yaml",
        "bindings.yaml",
        "fics.json",
        "kube/kube-issuer",
        "proxy/cluster-jwks.json",
    ];
    let allowed = std::fs::read_to_string(dev.get("allowed_token_file")).unwrap();
    for (path, seen) in snapshot(&state) {
        if seen.sha256.is_empty() || seen.mode & 0o077 == 0 {
            continue;
        }
        let name = path.to_str().unwrap();
        assert!(
            public.contains(&name) || name.starts_with("issuer-docs/"),
            "{name} is readable by others (mode {:o})",
            seen.mode & 0o777
        );
        let text = std::fs::read_to_string(state.join(&path)).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{name} holds a private key");
        assert!(!text.contains(allowed.trim()), "{name} holds an SA token");
    }
}

#[test]
fn a_dev_killed_with_sigkill_leaves_no_lock_behind() {
    let state = tempfile::tempdir().unwrap();
    let mut first = DevProcess::start(state.path());
    let first_pid = first.pid();
    first.signal("KILL");
    assert!(first.wait_exit(Duration::from_secs(10)).is_some());
    // The killed one's dev.json is stale; the next dev must write its own.
    std::fs::remove_file(state.path().join("dev.json")).unwrap();

    let second = DevProcess::start(state.path());
    assert_ne!(second.pid(), first_pid);
    let lock = std::fs::read_to_string(state.path().join("dev.lock")).unwrap();
    let holder: serde_json::Value = serde_json::from_str(&lock).unwrap();
    assert_eq!(holder["pid"], second.pid());
    assert_eq!(holder["proxy_url"], second.get("proxy_url"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_token_works_while_dev_runs() {
    let state = tempfile::tempdir().unwrap();
    let dev = DevProcess::start(state.path());
    let out = bin()
        .args(["dev", "token", "--state-dir"])
        .arg(state.path())
        .args(["--namespace", "demo", "--service-account", "demo"])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let reply = token_request(&dev, token.trim()).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    // It only read: the running dev still holds its state dir.
    let line = refused(&run_dev(&[
        "--state-dir",
        state.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]));
    assert!(line.contains(&format!("pid {}", dev.pid())), "{line}");
}
