//! The harness: a real control plane with a real node (`scripts/real-cluster.sh up --node`),
//! our Entra emulator and issuer host on the machine, and the things the tests do through the
//! node: kubectl, helm, a client session inside a pod, the proxy's own process.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_identity-binding-proxy-dev");
pub const TENANT: &str = "00000000-0000-0000-0000-0000000000aa";
/// The example app's identity (deploy/overlays/example-app).
pub const DEMO_CID: &str = "11111111-2222-3333-4444-555555555555";
pub const SNI: &str = "identity-binding-proxy.internal";
/// Where deploy/webhook/values.yaml points pods: release and namespace `identity-binding-proxy`.
pub const NS: &str = "identity-binding-proxy";
pub const RELEASE: &str = "identity-binding-proxy";
pub const WEBHOOK_NS: &str = "azure-workload-identity-system";
pub const SCOPE: &str = "https://management.azure.com/.default";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Polls `check` every 100 ms until it holds; how long that took, or None after `limit`.
pub fn within(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the command runs");
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The control plane and its node(s), brought up once for the whole suite.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub env: BTreeMap<String, String>,
}

pub fn script(args: &[&str], dir: &Path) -> Output {
    Command::new("bash")
        .arg(repo().join("scripts/real-cluster.sh"))
        .args(args)
        .arg(dir)
        .env("OWNER_PID", std::process::id().to_string())
        .stdin(Stdio::null())
        .output()
        .expect("bash runs")
}

impl Node {
    /// `up --nodes N`: panics with the script's one-line error and the tail of its log.
    pub fn up(nodes: usize) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("real-node-")
            .tempdir()
            .unwrap();
        let n = nodes.to_string();
        let out = script(&["up", "--nodes", &n], dir.path());
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail = stderr
                .lines()
                .filter_map(|l| l.split("; see ").nth(1))
                .next_back()
                .and_then(|log| std::fs::read_to_string(log.trim()).ok())
                .map(|t| t.lines().rev().take(40).collect::<Vec<_>>().join("\n"))
                .unwrap_or_default();
            // No Node exists to drop: stop what `up` left (its own trap should have) while the
            // directory, with its pid files, is still there.
            let down = script(&["down"], dir.path());
            panic!(
                "real-cluster.sh up --nodes {n} failed:\n{stderr}\n--- log tail (last line first):\n{tail}\n\
                 --- down after the failure: {} {}",
                down.status,
                text(&down)
            );
        }
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        let env = std::fs::read_to_string(dir.path().join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        Self { dir, env }
    }

    pub fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("env has no {key}"))
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        Path::new(self.get("BIN_DIR")).join(name)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn kubectl_out(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(self.bin("kubectl"))
            .arg("--kubeconfig")
            .arg(self.get("KUBECONFIG"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_out(args, None);
        assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&a)).unwrap()
    }

    pub fn apply(&self, yaml: &str) {
        let out = self.kubectl_out(&["apply", "-f", "-"], Some(yaml));
        assert!(
            out.status.success(),
            "kubectl apply: {}\n{yaml}",
            text(&out)
        );
    }

    pub fn helm(&self, args: &[&str]) -> Output {
        Command::new(self.bin("helm"))
            .args(args)
            .env("KUBECONFIG", self.get("KUBECONFIG"))
            .env("HELM_CACHE_HOME", self.path().join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.path().join("helm/config"))
            .env("HELM_DATA_HOME", self.path().join("helm/data"))
            .output()
            .expect("helm runs")
    }

    pub fn helm_ok(&self, args: &[&str]) -> String {
        let out = self.helm(args);
        assert!(out.status.success(), "helm {args:?}: {}", text(&out));
        text(&out)
    }

    /// `kubectl wait` until the condition holds, or panics with the objects' description.
    pub fn wait(&self, ns: &str, what: &str, condition: &str, secs: u64) {
        let timeout = format!("--timeout={secs}s");
        let out = self.kubectl_out(
            &[
                "wait",
                "-n",
                ns,
                what,
                &format!("--for={condition}"),
                &timeout,
            ],
            None,
        );
        if !out.status.success() {
            let pods = self.kubectl_out(&["describe", "pods", "-n", ns], None);
            let logs = self.kubectl_out(
                &[
                    "logs",
                    "-n",
                    ns,
                    "--all-containers",
                    "--prefix",
                    "--tail=30",
                    "-l",
                    "!nothing",
                ],
                None,
            );
            panic!(
                "{ns}/{what} not {condition} after {secs} s: {}\n--- pods:\n{}\n--- logs:\n{}",
                text(&out),
                text(&pods),
                text(&logs)
            );
        }
    }

    /// The DaemonSet's pods on `node`: (name, node, Ready), not being deleted.
    pub fn proxy_pods_on(&self, node: &str) -> Vec<(String, String, bool)> {
        let mut pods = self.proxy_pods();
        pods.retain(|p| p.1 == node);
        pods
    }

    /// The proxy pods of the DaemonSet: (name, node, Ready), not being deleted.
    pub fn proxy_pods(&self) -> Vec<(String, String, bool)> {
        let pods = self.json(&[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/name=identity-binding-proxy",
        ]);
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| {
                let ready = p["status"]["conditions"]
                    .as_array()
                    .map(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
                    .unwrap_or(false);
                (
                    p["metadata"]["name"].as_str().unwrap().to_string(),
                    p["spec"]["nodeName"].as_str().unwrap_or("").to_string(),
                    ready,
                )
            })
            .collect()
    }

    pub fn logs(&self, ns: &str, pod: &str) -> String {
        let out = self.kubectl_out(&["logs", "-n", ns, pod, "--all-containers"], None);
        text(&out)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = script(&["down"], self.dir.path());
    }
}

/// The machine's address on the first node's link: what a pod's loopback ports 30000-32767
/// lead to (scripts/real-cluster/cni-loopback-forward).
pub const MACHINE_ON_NODE_LINK: &str = "10.200.1.1";

/// A port free on loopback and on the node link, in 30000-32759 (the pods' forwarded range).
pub fn free_port(after: u16) -> u16 {
    let start = 30_000 + (std::process::id() % 270) as u16 * 10;
    (0..2_760u16)
        .map(|i| 30_000 + (start - 30_000 + i) % 2_760)
        .filter(|p| *p != after)
        .find(|p| {
            TcpListener::bind(("127.0.0.1", *p)).is_ok()
                && TcpListener::bind((MACHINE_ON_NODE_LINK, *p)).is_ok()
        })
        .expect("a free port in 30000-32759")
}

/// Our issuer's documents (`emulate static`) and Entra (`emulate entra`, one FIC per identity)
/// on the machine's loopback, each also forwarded (socat) from the same port on the node link,
/// where a pod's own loopback port leads: pods and the Entra emulator use the same URLs.
pub struct Emulators {
    children: Vec<Child>,
    pub issuer_url: String,
    pub authority_host: String,
    pub issuer_key: PathBuf,
}

impl Drop for Emulators {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Emulators {
    /// The chart's `extraEnv` pointing the proxy at these emulators (http on loopback, which
    /// the chart's schema refuses as `issuer.url` and `authorityHost`, rightly for real ones).
    pub fn extra_env(&self) -> String {
        format!(
            "[{{name: IBP_ISSUER_URL, value: \"{}\"}}, {{name: IBP_AUTHORITY_HOST, value: \"{}\"}}, \
             {{name: RUST_LOG, value: info}}]",
            self.issuer_url, self.authority_host
        )
    }

    pub fn start(dir: &Path, identities: &[&str]) -> Self {
        let key = dir.join("issuer.key");
        let public = dir.join("issuer.pub");
        run_ok(
            Command::new("openssl")
                .args(["genpkey", "-algorithm", "RSA", "-pkeyopt"])
                .args(["rsa_keygen_bits:2048", "-out"])
                .arg(&key),
        );
        run_ok(
            Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&key)
                .arg("-out")
                .arg(&public),
        );
        let mut bindings = String::from("bindings:\n");
        for cid in identities {
            bindings.push_str(&format!("  - clientId: {cid}\n    tenantId: {TENANT}\n"));
        }
        std::fs::write(dir.join("bindings.yaml"), bindings).unwrap();
        let static_port = free_port(0);
        let issuer_url = format!("http://127.0.0.1:{static_port}/{{tenant}}/{{client_id}}");
        run_ok(
            Command::new(BIN)
                .args(["issuer", "publish", "--out"])
                .arg(dir.join("site"))
                .arg("--bindings")
                .arg(dir.join("bindings.yaml"))
                .args(["--issuer-url", &issuer_url, "--public-key"])
                .arg(&public),
        );
        let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
        let listen = format!("127.0.0.1:{static_port}");
        let mut children = vec![Command::new(BIN)
            .args(["emulate", "static", "--listen", &listen, "--dir"])
            .arg(dir.join("site"))
            .stdout(log("static.log"))
            .stderr(log("static.err"))
            .spawn()
            .unwrap()];
        let entra_port = free_port(static_port);
        let mut entra = Command::new(BIN);
        entra.args([
            "emulate",
            "entra",
            "--listen",
            &format!("127.0.0.1:{entra_port}"),
        ]);
        for cid in identities {
            entra.arg("--fic").arg(format!(
                "client_id={cid},issuer=http://127.0.0.1:{static_port}/{TENANT}/{cid},subject={cid},audience=api://AzureADTokenExchange"
            ));
        }
        children.push(
            entra
                .stdout(log("entra.log"))
                .stderr(log("entra.err"))
                .spawn()
                .unwrap(),
        );
        for port in [static_port, entra_port] {
            children.push(
                Command::new("socat")
                    .arg(format!(
                        "TCP-LISTEN:{port},bind={MACHINE_ON_NODE_LINK},fork,reuseaddr"
                    ))
                    .arg(format!("TCP:127.0.0.1:{port}"))
                    .stderr(log(&format!("forward-{port}.err")))
                    .spawn()
                    .unwrap(),
            );
        }
        let e = Self {
            children,
            issuer_url,
            authority_host: format!("http://127.0.0.1:{entra_port}"),
            issuer_key: key,
        };
        for url in [
            format!("http://127.0.0.1:{entra_port}/_emulator/stats"),
            format!("http://127.0.0.1:{static_port}/"),
        ] {
            let up = within(Duration::from_secs(20), || {
                Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "--max-time", "1", &url])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            });
            assert!(up.is_some(), "emulator at {url} did not start");
        }
        e
    }
}

/// A CA and the proxy's serving certificate (SAN: the SNI name clients send), with openssl.
pub fn serving_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let (crt, key, csr) = (
        dir.join("tls.crt"),
        dir.join("tls.key"),
        dir.join("tls.csr"),
    );
    run_ok(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=identity-binding-proxy test CA", "-keyout"])
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca)
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
    );
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=proxy",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&csr),
    );
    let ext = dir.join("tls.ext");
    std::fs::write(
        &ext,
        format!("subjectAltName=DNS:{SNI}\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-CAcreateserial", "-out"])
            .arg(&crt)
            .arg("-extfile")
            .arg(&ext),
    );
    (ca, crt, key)
}

/// A client running inside a pod (`kubectl exec -i`): one request per line, one JSON reply per
/// line (tests/clients/go and tests/clients/python speak the same protocol).
pub struct PodClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl PodClient {
    pub fn start(node: &Node, ns: &str, pod: &str, command: &[&str]) -> Self {
        Self::start_in(node, ns, pod, "", command, &[])
    }

    /// In container `container` (the pod's first when empty), with `env` set for the command.
    pub fn start_in(
        node: &Node,
        ns: &str,
        pod: &str,
        container: &str,
        command: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut args = vec!["exec", "-i", "-n", ns, pod];
        if !container.is_empty() {
            args.extend(["-c", container]);
        }
        args.push("--");
        let assignments: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !env.is_empty() {
            args.push("env");
            args.extend(assignments.iter().map(String::as_str));
        }
        let mut child = Command::new(node.bin("kubectl"))
            .arg("--kubeconfig")
            .arg(node.get("KUBECONFIG"))
            .args(&args)
            .args(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("kubectl exec runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// `get SCOPE` (the SDK's credential built at start) or `fresh SCOPE` (a new one, so the
    /// SDK's own cache is not used): the reply, and how long it took.
    pub fn ask(&mut self, mode: &str) -> (Value, Duration) {
        let start = Instant::now();
        let reply = self
            .try_ask(mode)
            .unwrap_or_else(|e| panic!("the pod's client: {e}"));
        (reply, start.elapsed())
    }

    /// The same, with the failure to get an answer at all (the pod gone) as an error.
    pub fn try_ask(&mut self, mode: &str) -> Result<Value, String> {
        writeln!(self.stdin, "{mode} {SCOPE}").map_err(|e| format!("write: {e}"))?;
        self.stdin.flush().map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        serde_json::from_str(&line).map_err(|e| format!("not a JSON reply ({e}): {line:?}"))
    }
}

impl Drop for PodClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host pids of the processes on node `node` (its kubelet's cgroup root names it) whose
/// command line starts with `prefix`: containers' processes are the machine's processes, in
/// namespaces of their own.
pub fn host_pids(node: &str, prefix: &str) -> Vec<u32> {
    let mut pids = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cmdline.starts_with(prefix) && cgroup.contains(&format!("-{node}/")) {
            pids.push(pid);
        }
    }
    pids
}
