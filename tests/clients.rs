//! Every official client that installs here, in proxy mode, against `identity-binding-proxy
//! dev` run as its own process — each one as a long-running program (tests/clients/<lang>/)
//! that reads the webhook's AZURE_* environment and answers one token request per stdin line.
//!
//! For each client: (a) the allowed service account gets a token; (b) the denied one sees our
//! explanation in the client's own error text; (c) a second request for the same scope, from a
//! fresh credential (so the SDK's own cache is out of the way), is served from the proxy's
//! cache: the Entra emulator issues nothing; (d) the CA is rotated while the client keeps
//! running — the CA file becomes [new CA, old CA], the serving certificate one issued by the new
//! CA, and every connection is cut — and the client's next request succeeds over a new handshake.
//!
//! The clients reach the proxy through a loopback relay that only forwards bytes: it counts
//! connections, can cut them all, and reads the SNI name and ALPN protocols of each ClientHello.
//! .NET cannot be installed here (no NuGet): `dotnet_emulation_*` is our own client that
//! behaves as Azure.Identity for .NET does in proxy mode. (The AKS how-to's sample cannot be
//! fetched here: the Go module proxy does not serve that nested module; see docs/testing.md.)
//!
//! A client that cannot be installed or built fails its test with the package manager's error.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{jwt_claims, python_with_sdk, tls_config, DevProcess};
use ibp_emulators::pki::DevCa;
use serde_json::Value;

const VAULT: &str = "https://vault.azure.net/.default";
const MANAGEMENT: &str = "https://management.azure.com/.default";
const STORAGE: &str = "https://storage.azure.com/.default";

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tmp_dir() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// Where built tools are cached, outside the clone.
fn cache_dir(tool: &str) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| tmp_dir().to_path_buf());
    base.join("identity-binding-proxy").join(tool)
}

/// Runs a build or install command; a failure panics with the tool's own output.
fn run_tool(what: &str, cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// The relay between the clients and the proxy.

/// What one ClientHello offered.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Hello {
    sni: Option<String>,
    alpn: Vec<String>,
}

#[derive(Default)]
struct RelayState {
    hellos: Vec<Hello>,
    live: Vec<TcpStream>,
}

/// A loopback TCP relay to `target`.
struct Relay {
    addr: SocketAddr,
    state: Arc<Mutex<RelayState>>,
}

impl Relay {
    fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(RelayState::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let state = shared.clone();
                std::thread::spawn(move || relay_one(client, target, &state));
            }
        });
        Self { addr, state }
    }

    fn connections(&self) -> usize {
        self.state.lock().unwrap().hellos.len()
    }

    fn hellos(&self) -> Vec<Hello> {
        self.state.lock().unwrap().hellos.clone()
    }

    /// Closes every open connection, as a restarted node-local proxy would.
    fn cut(&self) {
        for s in self.state.lock().unwrap().live.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn relay_one(mut client: TcpStream, target: SocketAddr, state: &Mutex<RelayState>) {
    // The first TLS record, whole: the ClientHello.
    let mut first = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let need = if first.len() >= 5 {
            5 + u16::from_be_bytes([first[3], first[4]]) as usize
        } else {
            5
        };
        if first.len() >= need {
            break;
        }
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => first.extend_from_slice(&buf[..n]),
        }
    }
    let Ok(mut upstream) = TcpStream::connect(target) else {
        return;
    };
    {
        let mut s = state.lock().unwrap();
        s.hellos
            .push(parse_client_hello(&first).unwrap_or_default());
        if let Ok(c) = client.try_clone() {
            s.live.push(c);
        }
        if let Ok(u) = upstream.try_clone() {
            s.live.push(u);
        }
    }
    if upstream.write_all(&first).is_err() {
        return;
    }
    let (Ok(mut client_rd), Ok(mut upstream_wr)) = (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_rd, &mut upstream_wr);
        let _ = upstream_wr.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
}

/// SNI host name and ALPN protocols of a TLS record holding a ClientHello.
fn parse_client_hello(rec: &[u8]) -> Option<Hello> {
    struct R<'a>(&'a [u8]);
    impl<'a> R<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            (self.0.len() >= n).then(|| {
                let (a, b) = self.0.split_at(n);
                self.0 = b;
                a
            })
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| b[0] as usize)
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        }
    }
    let mut r = R(rec);
    (r.u8()? == 22).then_some(())?; // handshake record
    r.take(4)?; // version, length
    (r.u8()? == 1).then_some(())?; // ClientHello
    r.take(3 + 2 + 32)?; // length, client_version, random
    let n = r.u8()?;
    r.take(n)?; // session id
    let n = r.u16()?;
    r.take(n)?; // cipher suites
    let n = r.u8()?;
    r.take(n)?; // compression methods
    let n = r.u16()?;
    let mut ext = R(r.take(n)?);
    let mut hello = Hello::default();
    while !ext.0.is_empty() {
        let kind = ext.u16()?;
        let n = ext.u16()?;
        let mut data = R(ext.take(n)?);
        match kind {
            0 => {
                data.u16()?;
                (data.u8()? == 0).then_some(())?;
                let n = data.u16()?;
                hello.sni = Some(String::from_utf8_lossy(data.take(n)?).into_owned());
            }
            16 => {
                data.u16()?;
                while !data.0.is_empty() {
                    let n = data.u8()?;
                    hello
                        .alpn
                        .push(String::from_utf8_lossy(data.take(n)?).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

// ---------------------------------------------------------------------------------------------
// The dev system, its request log and its CA.

struct Dev {
    process: DevProcess,
    state: tempfile::TempDir,
    log: PathBuf,
    relay: Relay,
}

impl Dev {
    fn start() -> Self {
        let state = tempfile::tempdir().unwrap();
        let log = state.path().join("dev.log");
        let child = Command::new(env!("CARGO_BIN_EXE_identity-binding-proxy-dev"))
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--state-dir",
            ])
            .arg(state.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("dev starts");
        let process = DevProcess::adopt(child, state.path());
        let relay = Relay::start(
            process.get("proxy_url")["https://".len()..]
                .parse()
                .unwrap(),
        );
        Self {
            process,
            state,
            log,
            relay,
        }
    }

    fn proxy_addr(&self) -> SocketAddr {
        self.process.get("proxy_url")["https://".len()..]
            .parse()
            .unwrap()
    }

    /// The webhook's environment, with the relay as the proxy and `token_file` (a dev.json
    /// key) as the projected token.
    fn env(&self, token_file: &str) -> Vec<(&'static str, String)> {
        let mut env = self.process.sdk_env(token_file);
        for (k, v) in env.iter_mut() {
            if *k == "AZURE_KUBERNETES_TOKEN_PROXY" {
                *v = format!("https://{}", self.relay.addr);
            }
        }
        env
    }

    fn client_id(&self) -> String {
        self.process.get("client_id")
    }

    /// Access tokens the Entra emulator has issued so far.
    fn entra_issued(&self) -> u64 {
        let url = self.process.get("entra_url");
        let addr = url.trim_start_matches("http://").trim_end_matches('/');
        let mut tcp = TcpStream::connect(addr).unwrap();
        write!(
            tcp,
            "GET /_emulator/stats HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).unwrap();
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let stats: Value =
            serde_json::from_str(body).unwrap_or_else(|_| panic!("Entra emulator stats: {out}"));
        stats["tokens_issued"].as_u64().unwrap()
    }

    /// The proxy's request log lines so far.
    fn request_log(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "token request")
            .collect()
    }

    fn ca_file(&self) -> PathBuf {
        self.process.get("ca_file").into()
    }

    fn sni(&self) -> String {
        self.process.get("sni_name")
    }

    /// Replaces the CA file by [new CA, old CA]; returns the new CA.
    fn publish_new_ca_first(&self) -> DevCa {
        let new = DevCa::generate("rotated CA").unwrap();
        let old = std::fs::read_to_string(self.ca_file()).unwrap();
        write_atomic(&self.ca_file(), &format!("{}{}", new.cert_pem, old));
        new
    }

    /// Serves a certificate issued by `ca` and waits until new handshakes get it.
    fn serve_certificate_of(&self, ca: &DevCa) {
        let leaf = ca.issue(&[&self.sni()]).unwrap();
        let tls = self.state.path().join("tls");
        write_atomic(&tls.join("tls.key"), &leaf.key_pem);
        write_atomic(&tls.join("tls.crt"), &leaf.cert_pem);
        let deadline = Instant::now() + Duration::from_secs(10);
        while handshake(self.proxy_addr(), &self.sni(), &ca.cert_pem, &["http/1.1"]).is_err() {
            assert!(
                Instant::now() < deadline,
                "the proxy did not serve the new certificate within 10 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The whole rotation the clients live through: CA bundle [new, old], a leaf of the new
    /// CA, every open connection cut (so the next request needs a new handshake).
    fn rotate_ca(&self) {
        let new = self.publish_new_ca_first();
        self.serve_certificate_of(&new);
        self.relay.cut();
    }
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-rotate");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn client_config(roots_pem: &str, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let alpn: Vec<&[u8]> = alpn.iter().map(|p| p.as_bytes()).collect();
    tls_config(roots_pem.as_bytes(), &alpn)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A completed TLS handshake to `addr` with SNI `sni`, trusting only `roots_pem`.
fn handshake(addr: SocketAddr, sni: &str, roots_pem: &str, alpn: &[&str]) -> Result<Tls, String> {
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(client_config(roots_pem, alpn), name)
        .map_err(|e| e.to_string())?;
    let mut tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

// ---------------------------------------------------------------------------------------------
// The clients.

/// Something that answers `get <scope>` / `fresh <scope>` with one JSON reply.
trait TokenClient {
    fn request(&mut self, line: &str) -> Value;
    /// Its process, when it runs in one of its own.
    fn pid(&self) -> Option<u32> {
        None
    }
}

/// A client program, kept running; stderr goes to a file shown on failure.
struct ClientProcess {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl ClientProcess {
    fn spawn(mut cmd: Command, env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr");
        cmd.env_clear();
        for var in ["PATH", "HOME", "JAVA_HOME"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
            stderr,
            _dir: dir,
        }
    }
}

impl TokenClient for ClientProcess {
    fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    fn request(&mut self, line: &str) -> Value {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        // Generous: a cold JVM, MSAL discovery, a first exchange on a busy 2-core machine.
        let reply = self.lines.recv_timeout(Duration::from_secs(120));
        let stderr = || std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let line =
            reply.unwrap_or_else(|e| panic!("no reply to {line:?} ({e}); stderr:\n{}", stderr()));
        serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("not a JSON reply: {line}\nstderr:\n{}", stderr()))
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to start a client program once it is built.
type Launcher = Box<dyn Fn(&[(&str, String)]) -> Box<dyn TokenClient>>;

fn launcher(program: PathBuf, args: Vec<String>, dir: Option<PathBuf>) -> Launcher {
    Box::new(move |env| {
        let mut cmd = Command::new(&program);
        cmd.args(&args);
        if let Some(d) = &dir {
            cmd.current_dir(d);
        }
        Box::new(ClientProcess::spawn(cmd, env)) as Box<dyn TokenClient>
    })
}

/// Go: azidentity (tests/clients/go, versions pinned by go.mod/go.sum).
fn go_client() -> Launcher {
    let out = tmp_dir().join("clients/go-client");
    run_tool(
        "building the Go client (go build, modules from the Go module proxy)",
        Command::new("go")
            .args(["build", "-mod=readonly", "-buildvcs=false", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(manifest_dir().join("tests/clients/go")),
    );
    launcher(out, vec![], None)
}

/// Java: azure-identity from Maven Central (tests/clients/java/pom.xml), Maven's local
/// repository outside the clone.
fn java_client() -> Launcher {
    let out = tmp_dir().join("clients/java");
    let classpath = out.join("classpath.txt");
    run_tool(
        "building the Java client (mvn, artifacts from Maven Central)",
        Command::new("mvn")
            .args(["-B", "-q"])
            .arg(format!("-Dmaven.repo.local={}", cache_dir("m2").display()))
            .arg(format!("-Dibp.out={}", out.display()))
            .arg(format!("-Dmdep.outputFile={}", classpath.display()))
            .args(["compile", "dependency:build-classpath"])
            .current_dir(manifest_dir().join("tests/clients/java")),
    );
    let cp = format!(
        "{}:{}",
        out.join("classes").display(),
        std::fs::read_to_string(&classpath).unwrap().trim()
    );
    launcher(
        "java".into(),
        vec!["-cp".into(), cp, "GetToken".into()],
        None,
    )
}

/// Python: azure-identity from PyPI in the venv every Python test shares.
fn python_client() -> Launcher {
    let python = python_with_sdk();
    let script = manifest_dir().join("tests/clients/python/get_token.py");
    launcher(python, vec![script.display().to_string()], None)
}

const NODE_SDK: &str = "@azure/identity@4.14.1";

/// Node: @azure/identity from npm under target/ (the directory tests/node_sdk.rs uses).
fn node_client() -> Launcher {
    let dir = tmp_dir().join("sdk-node");
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join(".installed-azure-identity-4.14.1");
    if !marker.exists() {
        std::fs::write(
            dir.join("package.json"),
            br#"{"name":"ibp-sdk-test","private":true}"#,
        )
        .unwrap();
        run_tool(
            &format!("installing {NODE_SDK} from npm"),
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", NODE_SDK])
                .current_dir(&dir),
        );
        std::fs::write(&marker, b"").unwrap();
    }
    std::fs::copy(
        manifest_dir().join("tests/clients/node/get_token.js"),
        dir.join("client_loop.js"),
    )
    .unwrap();
    launcher("node".into(), vec!["client_loop.js".into()], Some(dir))
}

/// Rust: azure_identity from crates.io (tests/clients/rust, its own lock file and target dir).
fn rust_client() -> Launcher {
    let target = tmp_dir().join("clients/rust-target");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--locked", "--manifest-path"])
        .arg(manifest_dir().join("tests/clients/rust/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target);
    // Settings of the outer build (e.g. its target dir, RUSTFLAGS) are not this build's.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_") && k != "CARGO_HOME" || k == "RUSTFLAGS" {
            cmd.env_remove(k);
        }
    }
    run_tool(
        "building the Rust client (cargo, crates from crates.io)",
        &mut cmd,
    );
    launcher(target.join("debug/ibp-rust-client"), vec![], None)
}

// ---------------------------------------------------------------------------------------------
// The scenario every client goes through.

fn ok_token(reply: &Value, what: &str) -> String {
    assert_eq!(reply["ok"], true, "{what}: {reply}");
    reply["token"].as_str().unwrap().to_string()
}

fn prove(name: &str, launch: Launcher) {
    let dev = Dev::start();
    let client_id = dev.client_id();

    // (a) The allowed service account gets a token for our identity and the scope it asked.
    let mut client = launch(&dev.env("allowed_token_file"));
    let first = ok_token(&client.request(&format!("get {VAULT}")), "allowed");
    let claims = jwt_claims(&first);
    assert_eq!(claims["appid"], client_id.as_str(), "{claims}");
    assert_eq!(claims["aud"], "https://vault.azure.net", "{claims}");

    // (b) The denied service account reads our explanation in the client's own error.
    let mut denied = launch(&dev.env("denied_token_file"));
    let refusal = denied.request(&format!("get {VAULT}"));
    assert_eq!(refusal["ok"], false, "denied: {refusal}");
    let text = refusal["error"].as_str().unwrap();
    assert!(
        text.contains("not allowed to use managed identity")
            && text.contains("use-managed-identity"),
        "{name}: the client's error does not carry the missing grant: {text}"
    );
    drop(denied);

    // (c) Same scope, fresh credential: the proxy's cache answers, Entra issues nothing.
    let issued = dev.entra_issued();
    let again = ok_token(&client.request(&format!("fresh {VAULT}")), "fresh");
    assert_eq!(again, first, "the cached token is served");
    assert_eq!(dev.entra_issued(), issued, "Entra was not asked again");

    // (d) CA rotation while the process runs: its next request (a scope the SDK has not
    // cached) needs a new handshake against the new CA.
    let before = dev.relay.connections();
    dev.rotate_ca();
    let after = ok_token(
        &client.request(&format!("get {MANAGEMENT}")),
        "after rotation",
    );
    assert_eq!(jwt_claims(&after)["aud"], "https://management.azure.com");
    assert!(
        dev.relay.connections() > before,
        "the request after the rotation used a new connection"
    );

    report(name, &dev);
}

/// What the client sent, as far as the proxy's log and the relay see it (`--nocapture`).
fn report(name: &str, dev: &Dev) {
    let sni = dev.sni();
    let hellos: BTreeSet<Hello> = dev.relay.hellos().into_iter().collect();
    for h in &hellos {
        assert_eq!(
            h.sni.as_deref(),
            Some(sni.as_str()),
            "{name} sends the SNI name"
        );
    }
    eprintln!("== {name}: ClientHellos (SNI, ALPN): {hellos:?}");
    for l in dev.request_log() {
        eprintln!(
            "== {name}: {} status={} outcome={} cache={} scope={} sa={}/{}",
            l["method"],
            l["status"],
            l["outcome"],
            l["cache"],
            l["scope"],
            l["namespace"],
            l["service_account"]
        );
    }
}

#[test]
fn go_azidentity_in_proxy_mode() {
    prove("Go azidentity", go_client());
}

#[test]
fn java_azure_identity_in_proxy_mode() {
    prove("Java azure-identity", java_client());
}

#[test]
fn python_azure_identity_in_proxy_mode() {
    prove("Python azure-identity", python_client());
}

#[test]
fn node_azure_identity_in_proxy_mode() {
    prove("Node @azure/identity", node_client());
}

#[test]
fn rust_azure_identity_in_proxy_mode() {
    prove("Rust azure_identity", rust_client());
}

// ---------------------------------------------------------------------------------------------
// .NET: our own client that behaves as Azure.Identity for .NET does in proxy mode.

/// Azure.Identity for .NET in proxy mode, as its source reads: every request goes to the
/// proxy's scheme/host/port + the proxy's path + MSAL's own path and query (for a token:
/// `/{tenant}/oauth2/v2.0/token`, the form in the body), over HTTP/1.1, with `Host:` set to
/// the SNI name; the CA file is re-read for every request and only its FIRST certificate is
/// trusted (the chain must end there).
struct DotnetEmulation {
    env: Vec<(String, String)>,
}

impl DotnetEmulation {
    fn var(&self, name: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{name} is not set"))
    }

    fn token(&self, scope: &str) -> Result<String, String> {
        let proxy = url::Url::parse(self.var("AZURE_KUBERNETES_TOKEN_PROXY")).unwrap();
        let addr: SocketAddr = format!(
            "{}:{}",
            proxy.host_str().unwrap(),
            proxy.port_or_known_default().unwrap()
        )
        .parse()
        .unwrap();
        let sni = self.var("AZURE_KUBERNETES_SNI_NAME");
        let ca = std::fs::read_to_string(self.var("AZURE_KUBERNETES_CA_FILE"))
            .map_err(|e| format!("reading the CA file: {e}"))?;
        let first = first_pem_certificate(&ca).ok_or("no certificate in the CA file")?;
        let mut tls = handshake(addr, sni, &first, &["http/1.1"])
            .map_err(|e| format!("The SSL connection could not be established: {e}"))?;
        let assertion = std::fs::read_to_string(self.var("AZURE_FEDERATED_TOKEN_FILE"))
            .map_err(|e| e.to_string())?;
        let body = identity_binding_proxy::http::form::form_encode([
            ("client_id", self.var("AZURE_CLIENT_ID")),
            ("client_assertion", assertion.trim()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("scope", scope),
            ("grant_type", "client_credentials"),
        ]);
        let path = format!(
            "{}/{}/oauth2/v2.0/token",
            proxy.path().trim_end_matches('/'),
            self.var("AZURE_TENANT_ID")
        );
        write!(
            tls,
            "POST {path} HTTP/1.1\r\nHost: {sni}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        // The proxy closes after answering (Connection: close); a TLS close without
        // close_notify would still leave the whole answer read.
        let _ = tls.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP response")?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or("no status")?;
        let json: Value = serde_json::from_str(body.trim()).unwrap_or(Value::Null);
        if status == 200 {
            json["access_token"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("no access_token in {body}"))
        } else {
            // The shape of MSAL.NET's MsalServiceException text.
            Err(format!(
                "WorkloadIdentityCredential authentication failed: {}: {}",
                json["error"], json["error_description"]
            ))
        }
    }
}

fn first_pem_certificate(pem: &str) -> Option<String> {
    let end = "-----END CERTIFICATE-----";
    let start = pem.find("-----BEGIN CERTIFICATE-----")?;
    let stop = pem[start..].find(end)? + start + end.len();
    Some(format!("{}\n", &pem[start..stop]))
}

impl TokenClient for DotnetEmulation {
    fn request(&mut self, line: &str) -> Value {
        let (_, scope) = line.split_once(' ').unwrap();
        match self.token(scope) {
            Ok(t) => serde_json::json!({"ok": true, "token": t}),
            Err(e) => serde_json::json!({"ok": false, "error": e}),
        }
    }
}

fn dotnet_emulation() -> Launcher {
    Box::new(|env| {
        Box::new(DotnetEmulation {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }) as Box<dyn TokenClient>
    })
}

#[test]
fn dotnet_emulation_in_proxy_mode() {
    prove(".NET emulation", dotnet_emulation());
}

/// Because .NET trusts only the FIRST certificate of the CA file, the CA file and the serving
/// certificate must change together: [new, old] with a leaf of the old CA fails .NET (every
/// other client trusts the whole bundle), and so does [old, new] with a leaf of the new CA.
#[test]
fn dotnet_trusts_only_the_first_ca_of_the_bundle() {
    let dev = Dev::start();
    let mut dotnet = dotnet_emulation()(&dev.env("allowed_token_file"));
    ok_token(&dotnet.request(&format!("get {VAULT}")), "before");

    let new = dev.publish_new_ca_first();
    let refused = dotnet.request(&format!("get {MANAGEMENT}"));
    assert_eq!(
        refused["ok"], false,
        "old leaf, CA file [new, old]: {refused}"
    );

    dev.serve_certificate_of(&new);
    ok_token(
        &dotnet.request(&format!("get {MANAGEMENT}")),
        "new leaf, [new, old]",
    );

    // Back to the old order: [old, new] while the leaf is the new CA's.
    let bundle = std::fs::read_to_string(dev.ca_file()).unwrap();
    let first = first_pem_certificate(&bundle).unwrap();
    let rest = bundle.replacen(first.trim_end(), "", 1);
    write_atomic(&dev.ca_file(), &format!("{}\n{}", rest.trim(), first));
    let refused = dotnet.request(&format!("get {STORAGE}"));
    assert_eq!(
        refused["ok"], false,
        "new leaf, CA file [old, new]: {refused}"
    );
}

// ---------------------------------------------------------------------------------------------
// `dev rotate-ca`: the CA rotation of the guide, step by step, under running clients.

/// Runs `dev rotate-ca --step STEP` on `dev`; returns (exit code, stdout + stderr).
fn rotate_ca(dev: &Dev, step: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_identity-binding-proxy-dev"))
        .args(["dev", "rotate-ca", "--step", step, "--state-dir"])
        .arg(dev.state.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// The CA file and the served certificate, to show that a refused step changed neither.
fn ca_and_leaf(dev: &Dev) -> (String, String) {
    let leaf = std::fs::read_to_string(dev.state.path().join("tls/tls.crt")).unwrap();
    (std::fs::read_to_string(dev.ca_file()).unwrap(), leaf)
}

/// `dev rotate-ca` refuses `step` and changes nothing; returns its message.
fn refused(dev: &Dev, step: &str) -> String {
    let before = ca_and_leaf(dev);
    let (code, text) = rotate_ca(dev, step);
    assert_eq!(code, 64, "--step {step} is refused: {text}");
    assert!(text.starts_with("error: "), "one clear line: {text}");
    assert_eq!(
        ca_and_leaf(dev),
        before,
        "a refused --step {step} changed nothing"
    );
    text
}

/// The rotation of the guide, done by `dev rotate-ca`, under the Python SDK (holding its
/// connection), the .NET emulation (which trusts only the first CA of the file) and a client
/// that reads the CA file once: no request fails at any step; a step out of order is refused
/// and changes nothing; and `leaf` waits until the processes that read the CA file before the
/// bundle are restarted — the client that read it once and was not restarted is exactly the
/// one the switch would break.
#[test]
fn dev_rotate_ca_fails_no_request_and_refuses_steps_out_of_order() {
    let dev = Dev::start();
    let (sni, addr) = (dev.sni(), dev.proxy_addr());
    let python = python_client();
    let mut client = python(&dev.env("allowed_token_file"));
    let mut dotnet = dotnet_emulation()(&dev.env("allowed_token_file"));
    let mut n = 0;
    // A scope nobody asked for yet: every request goes through the proxy.
    let mut each_client_gets_a_token = |clients: [&mut Box<dyn TokenClient>; 2], when: &str| {
        for c in clients {
            n += 1;
            let scope = format!("api://rotation-{n}/.default");
            ok_token(&c.request(&format!("get {scope}")), when);
        }
    };
    each_client_gets_a_token([&mut client, &mut dotnet], "before the rotation");
    let read_once_at_start = std::fs::read_to_string(dev.ca_file()).unwrap();

    let text = refused(&dev, "leaf");
    assert!(
        text.contains("--step bundle"),
        "names the first step: {text}"
    );
    let text = refused(&dev, "drop-old");
    assert!(text.contains("would fail every client"), "{text}");

    let (code, text) = rotate_ca(&dev, "bundle");
    assert_eq!(code, 0, "{text}");
    let pid = client.pid().unwrap().to_string();
    assert!(
        text.contains(&pid),
        "the bundle step names the client to restart: {text}"
    );
    assert_eq!(
        std::fs::read_to_string(dev.ca_file())
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
    each_client_gets_a_token([&mut client, &mut dotnet], "bundle [old, new]");
    assert!(refused(&dev, "bundle").contains("already under way"));
    assert!(refused(&dev, "drop-old").contains("would fail every client"));

    // The Python client read the CA file before the bundle: the switch waits for its restart.
    let text = refused(&dev, "leaf");
    assert!(text.contains(&pid) && text.contains("restart"), "{text}");
    // Named by its program alone: a command line may carry secrets.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert!(
        text.contains(&format!("pid {pid}  {}", comm.trim())),
        "{text}"
    );
    assert!(!text.contains("get_token.py"), "no command line: {text}");
    client = python(&dev.env("allowed_token_file"));
    let read_once_after_restart = std::fs::read_to_string(dev.ca_file()).unwrap();
    each_client_gets_a_token([&mut client, &mut dotnet], "after the restart");

    let (code, text) = rotate_ca(&dev, "leaf");
    assert_eq!(code, 0, "{text}");
    dev.relay.cut();
    each_client_gets_a_token([&mut client, &mut dotnet], "new leaf, bundle [new, old]");
    assert!(
        handshake(addr, &sni, &read_once_at_start, &["http/1.1"]).is_err(),
        "a client that read the CA once before the bundle, not restarted, fails now"
    );
    handshake(addr, &sni, &read_once_after_restart, &["http/1.1"]).expect("restarted: trusted");
    assert!(refused(&dev, "leaf").contains("--step drop-old"));
    assert!(refused(&dev, "bundle").contains("already under way"));

    let (code, text) = rotate_ca(&dev, "drop-old");
    assert_eq!(code, 0, "{text}");
    dev.relay.cut();
    let published = std::fs::read_to_string(dev.ca_file()).unwrap();
    assert_eq!(published.matches("BEGIN CERTIFICATE").count(), 1);
    handshake(addr, &sni, &published, &["http/1.1"]).expect("the new CA alone is trusted");
    each_client_gets_a_token([&mut client, &mut dotnet], "bundle [new]");
    handshake(addr, &sni, &read_once_after_restart, &["http/1.1"]).expect("still trusted");
    let (code, text) = rotate_ca(&dev, "status");
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("no CA rotation under way"), "{text}");
    // No handshake failed but the one made to fail (an SDK retrying one would hide it).
    assert_eq!(
        handshake_failures(&dev),
        1.0,
        "handshakes failed during the rotation"
    );
}

/// `leaf` when the proxy does not take the new certificate (here dev is stopped: it neither
/// reloads nor answers): the step fails, the previous key and certificate are put back, the CA
/// file stays [old, new] and the rotation at the bundle, so `drop-old` is still refused; once
/// the proxy runs again, `leaf` is simply run again and the rotation completes.
#[test]
fn dev_rotate_ca_leaf_not_served_is_undone_and_can_be_run_again() {
    let dev = Dev::start();
    let (sni, addr) = (dev.sni(), dev.proxy_addr());
    let (code, text) = rotate_ca(&dev, "bundle");
    assert_eq!(code, 0, "{text}");
    let key = || std::fs::read_to_string(dev.state.path().join("tls/tls.key")).unwrap();
    let before = (ca_and_leaf(&dev), key());

    dev.process.signal("STOP");
    let (code, text) = rotate_ca(&dev, "leaf");
    dev.process.signal("CONT");
    // The running dev did not take the certificate: an unavailable dependency.
    assert_eq!(code, 69, "{text}");
    assert!(
        text.contains("did not serve") && text.contains("--step leaf"),
        "says what failed and what to run: {text}"
    );
    assert_eq!(
        (ca_and_leaf(&dev), key()),
        before,
        "the previous key and certificate are back; the CA file is still [old, new]"
    );
    let (code, text) = rotate_ca(&dev, "status");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("the bundle [old, new] is published"),
        "{text}"
    );
    assert!(refused(&dev, "drop-old").contains("would fail every client"));
    let old_ca = first_pem_certificate(&before.0 .0).unwrap();
    handshake(addr, &sni, &old_ca, &["http/1.1"]).expect("the old CA's certificate is served");

    let (code, text) = rotate_ca(&dev, "leaf");
    assert_eq!(code, 0, "run again: {text}");
    let (code, text) = rotate_ca(&dev, "drop-old");
    assert_eq!(code, 0, "{text}");
    let published = std::fs::read_to_string(dev.ca_file()).unwrap();
    assert_eq!(published.matches("BEGIN CERTIFICATE").count(), 1);
    handshake(addr, &sni, &published, &["http/1.1"]).expect("the new CA alone is trusted");
}

/// TLS handshakes the proxy saw fail, all reasons.
fn handshake_failures(dev: &Dev) -> f64 {
    let admin = dev.process.get("admin_url");
    let addr = admin.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(addr).unwrap();
    write!(tcp, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with("identity_binding_proxy_tls_handshake_failures_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}
