//! The harness: a real control plane, and our processes (Entra emulator, issuer host, proxy)
//! against it.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::Client;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_identity-binding-proxy-dev");

/// The binary `Proxy` runs `serve` with: this build, or `IBP_TEST_SERVE_BIN` to measure
/// another one (e.g. an earlier build) against the same harness.
fn serve_bin() -> std::ffi::OsString {
    std::env::var_os("IBP_TEST_SERVE_BIN").unwrap_or_else(|| BIN.into())
}
/// The audience the proxy requires of service-account tokens (`serve`'s default, which the
/// proxy here keeps).
pub(crate) fn audience() -> String {
    crate::common::serve_default("token-audience")
}

pub(crate) const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
pub(crate) const SNI: &str = "identity-binding-proxy.internal";
pub(crate) const GRANT_GROUP: &str = "cid.wi.aks.azure.com";
pub(crate) const VERB: &str = "use-managed-identity";

pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------------------------ ports

/// Ports for our own processes, below Linux's default ephemeral range (32768-60999) and above
/// the harness's (10000-29999): 30000-32759, a block of 30 per test process.
pub(crate) fn port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 30_000 + (std::process::id() % 92) as u16 * 30;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < 30 * 8, "ran out of test ports");
        let p = base + n % 30 + (n / 30) * 30 % 2_760;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

// ---------------------------------------------------------------------------------- cluster

/// One real control plane, started by `scripts/real-cluster.sh up` and stopped on drop (and
/// by the harness itself when this test process exits).
pub(crate) struct Cluster {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) env: BTreeMap<String, String>,
}

pub(crate) fn harness(args: &[&str], dir: &Path) -> Output {
    Command::new("bash")
        .arg(repo().join("scripts/real-cluster.sh"))
        .args(args)
        .arg(dir)
        // Everything stops, and the directory goes, when this test process exits (the shared
        // cluster is never dropped).
        .env("OWNER_PID", std::process::id().to_string())
        .env("OWNER_CLEANUP", "1")
        .stdin(Stdio::null())
        .output()
        .expect("bash runs")
}

/// Panics with the harness's message and the tail of the log file it names.
pub(crate) fn harness_ok(args: &[&str], dir: &Path) {
    let out = harness(args, dir);
    if out.status.success() {
        return;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut tail = String::new();
    if let Some(log) = stderr
        .lines()
        .filter_map(|l| l.split("; see ").nth(1))
        .next_back()
    {
        if let Ok(text) = std::fs::read_to_string(log.trim()) {
            let lines: Vec<&str> = text.lines().collect();
            tail = lines[lines.len().saturating_sub(40)..].join("\n");
        }
    }
    panic!(
        "scripts/real-cluster.sh {} failed:\n{stderr}\n--- log tail:\n{tail}",
        args.join(" ")
    );
}

impl Cluster {
    pub(crate) fn up() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("real-k8s-")
            .tempdir()
            .unwrap();
        harness_ok(&["up"], dir.path());
        let env = std::fs::read_to_string(dir.path().join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { dir, env }
    }

    pub(crate) fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("env has no {key}"))
    }

    pub(crate) fn bin(&self, name: &str) -> PathBuf {
        Path::new(self.get("BIN_DIR")).join(name)
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn kubectl_with(
        &self,
        kubeconfig: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Output {
        let mut cmd = Command::new(self.bin("kubectl"));
        cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl runs");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    pub(crate) fn kubectl_out(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.kubectl_with(self.get("KUBECONFIG"), args, stdin)
    }

    /// Runs kubectl as admin; panics with its stderr on failure; returns stdout.
    pub(crate) fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_out(args, None);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub(crate) fn apply(&self, yaml: &str) {
        let out = self.kubectl_out(&["apply", "-f", "-"], Some(yaml));
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A TokenRequest token, bound to `pod` when given.
    pub(crate) fn token(&self, ns: &str, sa: &str, audience: &str, pod: Option<&str>) -> String {
        let mut args = vec![
            "create",
            "token",
            sa,
            "-n",
            ns,
            "--audience",
            audience,
            "--duration",
            "1h",
        ];
        if let Some(p) = pod {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", p]);
        }
        self.kubectl(&args).trim().to_string()
    }

    /// A kubeconfig that authenticates as service account `ns/sa` with a TokenRequest token.
    pub(crate) fn sa_kubeconfig(&self, ns: &str, sa: &str) -> PathBuf {
        let token = self.token(ns, sa, self.get("ISSUER"), None);
        self.token_kubeconfig(&token, &self.path().join(format!("kubeconfig-{ns}-{sa}")))
    }

    /// Writes a kubeconfig for this cluster that authenticates with `token`, at `path`.
    pub(crate) fn token_kubeconfig(&self, token: &str, path: &Path) -> PathBuf {
        self.token_kubeconfig_with_ca(token, Path::new(self.get("CA_FILE")), path)
    }

    /// The same, trusting the apiserver through `ca` (a copy of its CA, e.g. as a pod mounts it).
    pub(crate) fn token_kubeconfig_with_ca(&self, token: &str, ca: &Path, path: &Path) -> PathBuf {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: real\n  cluster: {{server: \"{}\", \
                 certificate-authority: \"{}\"}}\nusers:\n- name: sa\n  user: {{token: \"{token}\"}}\n\
                 contexts:\n- name: sa\n  context: {{cluster: real, user: sa}}\ncurrent-context: sa\n",
                self.get("APISERVER"),
                ca.display()
            ),
        )
        .unwrap();
        path.to_path_buf()
    }

    /// Namespace, service account and a Pod object using it (stored; no kubelet runs it).
    pub(crate) fn workload(&self, ns: &str, sa: &str, pod: &str) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n\
             apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}}}\n\
             spec:\n  serviceAccountName: {sa}\n  containers: [{{name: app, image: app:1}}]\n"
        ));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = harness(&["down"], self.dir.path());
    }
}

/// The cluster shared by the tests that do not restart it: started once, with deploy/base
/// applied for real. Stopped by the harness when this test process exits.
pub(crate) fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    SHARED.get_or_init(Cluster::with_deploy_base)
}

// ------------------------------------------------------------------------------- scenarios

/// The proxy's ServiceAccount in deploy/base.
pub(crate) const BASE_NS: &str = "identity-binding-proxy";
pub(crate) const BASE_SA: &str = "identity-binding-proxy";

impl Cluster {
    /// A control plane of its own with deploy/base applied for real: the proxy's namespace,
    /// ServiceAccount and RBAC.
    pub(crate) fn with_deploy_base() -> Self {
        let c = Self::up();
        c.kubectl(&["apply", "-k", &repo().join("deploy/base").to_string_lossy()]);
        c
    }

    /// A workload (`ns`, service account `sa`, its stored Pod `pod`) granted `client_id`
    /// the how-to's way, a ClusterRole and ClusterRoleBinding named `grant`; returns a token
    /// of the proxy's audience bound to the pod.
    pub(crate) fn granted_workload(
        &self,
        (ns, sa, pod): (&str, &str, &str),
        grant: &str,
        client_id: &str,
    ) -> String {
        self.workload(ns, sa, pod);
        self.apply(&rbac_grant_cluster(grant, client_id, &sa_subject(ns, sa)));
        self.token(ns, sa, &audience(), Some(pod))
    }

    /// A kubeconfig of deploy/base's ServiceAccount.
    pub(crate) fn base_kubeconfig(&self) -> PathBuf {
        self.sa_kubeconfig(BASE_NS, BASE_SA)
    }

    /// `serve` running as deploy/base's ServiceAccount, ready.
    pub(crate) fn base_proxy(&self, identities: &[(&str, &str)], flags: &[&str]) -> Proxy {
        let p = Proxy::start(&self.base_kubeconfig(), identities, flags);
        p.wait_ready();
        p
    }
}

/// Polls until `check` holds; returns the time it took, or None after `limit`.
pub(crate) fn within(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if check() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------------ Entra and the proxy

/// `emulate static` hosting our issuer documents, `emulate entra` with ONE FIC per identity,
/// and `serve` against the real apiserver.
pub(crate) struct Proxy {
    pub(crate) dir: tempfile::TempDir,
    /// Killed before the emulators (fields drop after `Drop::drop`).
    pub(crate) process: Child,
    _emulators: Emulators,
    pub(crate) listen: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) log: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

pub(crate) fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub(crate) fn http_ok(url: &str) -> bool {
    Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "--max-time", "2", url])
        .status()
        .is_ok_and(|s| s.success())
}

impl Proxy {
    /// Identities `(client_id, tenant)` are bound and have a FIC; `kubeconfig` is who the
    /// proxy runs as; `flags` are more `serve` flags.
    pub(crate) fn start(kubeconfig: &Path, identities: &[(&str, &str)], flags: &[&str]) -> Self {
        let dir = tempfile::Builder::new().prefix("ibp-").tempdir().unwrap();
        let d = dir.path();
        run_ok(
            Command::new(BIN)
                .args(["issuer", "keygen", "--out"])
                .arg(d.join("issuer.key")),
        );
        let emulators = Emulators::start(d, &d.join("issuer.pub"), identities);
        // A CA and a leaf for the SNI name (rustls refuses a CA certificate as the leaf).
        let f = |n: &str| d.join(n).to_string_lossy().to_string();
        run_ok(Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=proxy test CA",
            "-keyout",
            &f("ca.key"),
            "-out",
            &f("ca.crt"),
        ]));
        run_ok(Command::new("openssl").args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={SNI}"),
            "-keyout",
            &f("tls.key"),
            "-out",
            &f("tls.csr"),
        ]));
        std::fs::write(d.join("tls.ext"), format!("subjectAltName=DNS:{SNI}\n")).unwrap();
        run_ok(Command::new("openssl").args([
            "x509",
            "-req",
            "-in",
            &f("tls.csr"),
            "-CA",
            &f("ca.crt"),
            "-CAkey",
            &f("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &f("tls.crt"),
            "-extfile",
            &f("tls.ext"),
        ]));
        let (listen, admin) = (port(), port());
        let proxy_log = d.join("proxy.log");
        let process = Command::new(serve_bin())
            .arg("serve")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--tls")
            .arg(format!(
                "{SNI}={},{}",
                d.join("tls.crt").display(),
                d.join("tls.key").display()
            ))
            .arg("--issuer-key")
            .arg(d.join("issuer.key"))
            .args(["--issuer-url", &emulators.issuer_url, "--bindings"])
            .arg(d.join(Emulators::BINDINGS))
            .args([
                "--authority-host",
                &emulators.authority_host,
                "--listen",
                &format!("127.0.0.1:{listen}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
                "--log-format",
                "text",
                "--shutdown-delay-secs",
                "0",
            ])
            .args(flags)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&proxy_log).unwrap())
            .stderr(std::fs::File::create(d.join("proxy.err")).unwrap())
            .spawn()
            .unwrap();
        Self {
            dir,
            process,
            _emulators: emulators,
            listen: ([127, 0, 0, 1], listen).into(),
            admin: ([127, 0, 0, 1], admin).into(),
            log: proxy_log,
        }
    }

    pub(crate) fn ready(&self) -> bool {
        http_ok(&format!("http://{}/readyz", self.admin))
    }

    pub(crate) fn wait_ready(&self) {
        let ok = within(Duration::from_secs(30), || self.ready());
        assert!(
            ok.is_some(),
            "the proxy did not become ready:\n{}",
            self.logs()
        );
    }

    /// The proxy's logs once they hold `needle`: its log writer batches lines (at least every
    /// 200 ms), so a line logged just now may not be in the file yet. The logs as they are
    /// after 5 s otherwise, for the caller's assertion to show.
    pub(crate) fn logs_with(&self, needle: &str) -> String {
        within(Duration::from_secs(5), || self.logs().contains(needle));
        self.logs()
    }

    /// Everything the proxy wrote (text logs go to stdout or stderr).
    pub(crate) fn logs(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.dir.path().join("proxy.err")).unwrap_or_default());
        s
    }

    pub(crate) fn ca(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("ca.crt")).unwrap()
    }

    pub(crate) fn client(&self) -> Client {
        Client::new(self.listen, SNI, &self.ca(), &[b"http/1.1"])
    }

    /// One token request; (status, error_description).
    pub(crate) fn request(&self, client_id: &str, assertion: &str) -> (u16, String) {
        ask_token(&self.client(), client_id, assertion)
    }
}

/// One token request through `client`, from synchronous test code; (status, error_description).
pub(crate) fn ask_token(client: &Client, client_id: &str, assertion: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reply = rt.block_on(client.post_token(client_id, assertion));
    (reply.status, reply.error_description())
}

/// A child process killed (and reaped) when this goes out of scope, also when a test fails.
pub(crate) struct KillOnDrop(pub(crate) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn rbac_grant_cluster(name: &str, client_id: &str, subject: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: {name}}}\n\
         rules: [{{apiGroups: [\"{GRANT_GROUP}\"], resources: [\"{client_id}\"], verbs: [\"{VERB}\"]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {name}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {name}}}\n\
         subjects: [{subject}]\n"
    )
}

pub(crate) fn sa_subject(ns: &str, sa: &str) -> String {
    format!("{{kind: ServiceAccount, name: {sa}, namespace: {ns}}}")
}

/// Our issuer's documents (`emulate static`, the JWKS of `public_key` under each identity's
/// issuer path) and Entra (`emulate entra`, ONE FIC per identity, subject the client id), on
/// loopback: what [`Proxy::start`] runs its proxy against, and a proxy started another way
/// can be.
pub(crate) struct Emulators {
    pub(crate) children: Vec<Child>,
    /// The issuer URL template (`{tenant}`, `{client_id}`) the FICs trust.
    pub(crate) issuer_url: String,
    pub(crate) authority_host: String,
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
    /// The bindings file (in the directory given to [`Emulators::start`]) of the identities
    /// published and given a FIC.
    pub(crate) const BINDINGS: &'static str = "bindings.yaml";

    pub(crate) fn start(dir: &Path, public_key: &Path, identities: &[(&str, &str)]) -> Self {
        let mut bindings = String::from("bindings:\n");
        for (cid, tenant) in identities {
            bindings.push_str(&format!("  - clientId: {cid}\n    tenantId: {tenant}\n"));
        }
        std::fs::write(dir.join(Self::BINDINGS), bindings).unwrap();
        let (static_port, entra_port) = (port(), port());
        let issuer_url = format!("http://127.0.0.1:{static_port}/{{tenant}}/{{client_id}}");
        run_ok(
            Command::new(BIN)
                .args(["issuer", "publish", "--out"])
                .arg(dir.join("site"))
                .arg("--bindings")
                .arg(dir.join(Self::BINDINGS))
                .args(["--issuer-url", &issuer_url, "--public-key"])
                .arg(public_key),
        );
        let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
        let mut children = vec![Command::new(BIN)
            .args([
                "emulate",
                "static",
                "--listen",
                &format!("127.0.0.1:{static_port}"),
                "--dir",
            ])
            .arg(dir.join("site"))
            .stdout(log("static.log"))
            .stderr(log("static.err"))
            .spawn()
            .unwrap()];
        let mut entra = Command::new(BIN);
        entra.args([
            "emulate",
            "entra",
            "--listen",
            &format!("127.0.0.1:{entra_port}"),
        ]);
        for (cid, tenant) in identities {
            entra.arg("--fic").arg(format!(
                "client_id={cid},issuer=http://127.0.0.1:{static_port}/{tenant}/{cid},subject={cid},audience=api://AzureADTokenExchange"
            ));
        }
        children.push(
            entra
                .stdout(log("entra.log"))
                .stderr(log("entra.err"))
                .spawn()
                .unwrap(),
        );
        let emulators = Self {
            children,
            issuer_url,
            authority_host: format!("http://127.0.0.1:{entra_port}"),
        };
        for url in [
            format!("http://127.0.0.1:{entra_port}/_emulator/stats"),
            format!("http://127.0.0.1:{static_port}/"),
        ] {
            assert!(
                within(Duration::from_secs(20), || Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "--max-time", "2", &url])
                    .status()
                    .is_ok_and(|s| s.success()))
                .is_some(),
                "{url} did not answer"
            );
        }
        emulators
    }
}
