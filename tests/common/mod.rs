//! Shared helpers of the integration tests: an in-process dev system and a TLS client that
//! connects to an address while sending a chosen SNI name, as the SDKs in proxy mode do.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use identity_binding_proxy::cli::LogFormat;
use identity_binding_proxy_dev::cli::DevArgs;
use identity_binding_proxy_dev::dev::{self, DevSystem};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};

pub const VAULT_SCOPE: &str = "https://vault.azure.net/.default";
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Starts a whole dev system on ephemeral loopback ports in `dir`.
pub async fn start_dev(dir: &Path) -> DevSystem {
    start_dev_with(dir, |_| {}).await
}

pub async fn start_dev_with(dir: &Path, tweak: impl FnOnce(&mut DevArgs)) -> DevSystem {
    identity_binding_proxy::crypto::install_provider();
    let mut args = DevArgs {
        command: None,
        state_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        rbac: None,
        entra_latency_ms: dev_number("entra-latency-ms"),
        entra_token_lifetime_secs: dev_number("entra-token-lifetime-secs"),
        cache_min_remaining_secs: dev_number("cache-min-remaining-secs"),
        authz_denied_ttl_secs: dev_number("authz-denied-ttl-secs"),
        authz_allowed_ttl_secs: dev_number("authz-allowed-ttl-secs"),
        tokenreview_ttl_secs: dev_number("tokenreview-ttl-secs"),
        cache_capacity: dev_number("cache-capacity"),
        log_format: <LogFormat as clap::ValueEnum>::from_str(&dev_default("log-format"), false)
            .expect("dev's --log-format default is a LogFormat"),
        proxy_flags: Vec::new(),
    };
    tweak(&mut args);
    dev::start(&args).await.expect("dev system starts")
}

/// The world most token-path tests start from: a dev system in a state dir of its own and an
/// HTTP/1.1 client of its proxy.
pub struct DevWorld {
    pub sys: DevSystem,
    pub client: Client,
    /// Removed after the system has stopped.
    dir: tempfile::TempDir,
}

impl DevWorld {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sys = start_dev(dir.path()).await;
        let client = Client::for_dev(&sys);
        Self { sys, client, dir }
    }

    pub async fn shutdown(self) {
        let Self { sys, dir, .. } = self;
        sys.shutdown().await;
        drop(dir);
    }
}

/// A reply: status, headers and the body parsed as JSON (Null when it is not JSON).
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub json: serde_json::Value,
    pub raw: Bytes,
}

impl Reply {
    pub fn error_description(&self) -> String {
        self.json["error_description"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

pub struct Client {
    pub addr: SocketAddr,
    pub sni: String,
    pub config: Arc<rustls::ClientConfig>,
}

impl Client {
    pub fn for_dev(sys: &DevSystem) -> Self {
        let ca = std::fs::read(&sys.info.ca_file).unwrap();
        Self::new(sys.proxy.addr, &sys.info.sni_name, &ca, &[b"http/1.1"])
    }

    pub fn new(addr: SocketAddr, sni: &str, ca_pem: &[u8], alpn: &[&[u8]]) -> Self {
        Self {
            addr,
            sni: sni.to_string(),
            config: tls_config(ca_pem, alpn),
        }
    }

    pub async fn connect(&self) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        connector
            .connect(ServerName::try_from(self.sni.clone()).unwrap(), tcp)
            .await
    }

    /// Sends one request on a fresh connection (HTTP/1.1 or h2 by ALPN).
    pub async fn send(&self, req: http::Request<Full<Bytes>>) -> Reply {
        let tls = self.connect().await.expect("TLS handshake");
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let resp = if h2 {
            let (mut sender, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(tls),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        };
        reply_of(resp).await
    }

    /// An h2 connection whose sender can be cloned for many concurrent streams.
    pub async fn h2_sender(&self) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let tls = self.connect().await.expect("TLS handshake");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "h2 negotiated"
        );
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// The SDK's token request (`token_form`) to the root path.
    pub async fn post_token(&self, client_id: &str, assertion: &str) -> Reply {
        self.post_form("/", &token_form(client_id, assertion)).await
    }

    pub async fn post_form(&self, path: &str, pairs: &[(&str, &str)]) -> Reply {
        self.send(self.form_request(path, pairs)).await
    }

    /// A form POST to `path`, as the SDKs send it.
    pub fn form_request(&self, path: &str, pairs: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
        let body = identity_binding_proxy::http::form::form_encode(pairs.iter().copied());
        http::Request::post(path)
            .header("host", &self.sni)
            .header(
                "content-type",
                "application/x-www-form-urlencoded;charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    }

    /// A client that sends every request on one kept-alive HTTP/1.1 connection, as an
    /// SDK's connection pool does.
    pub fn keeping_alive(self) -> KeptAlive {
        KeptAlive {
            client: self,
            sender: tokio::sync::Mutex::new(None),
            connections: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// One kept-alive HTTP/1.1 connection for every request (a new one only when the server
/// closed it: [`KeptAlive::connections`] counts them).
pub struct KeptAlive {
    client: Client,
    sender: tokio::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>,
    connections: std::sync::atomic::AtomicUsize,
}

impl KeptAlive {
    /// The SDK's token request (`token_form`) to the root path.
    pub async fn post_token(&self, client_id: &str, assertion: &str) -> Reply {
        self.post_form("/", &token_form(client_id, assertion)).await
    }

    pub async fn post_form(&self, path: &str, pairs: &[(&str, &str)]) -> Reply {
        let req = self.client.form_request(path, pairs);
        let mut sender = self.sender.lock().await;
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tls = self.client.connect().await.expect("TLS handshake");
            let (new, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            self.connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            *sender = Some(new);
        }
        let sender = sender.as_mut().expect("connected above");
        sender.ready().await.unwrap();
        reply_of(sender.send_request(req).await.unwrap()).await
    }

    /// Connections opened so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A TLS client configuration trusting every certificate of `ca_pem`, offering `alpn`.
pub fn tls_config(ca_pem: &[u8], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// The form every SDK sends.
pub fn token_form<'a>(client_id: &'a str, assertion: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("scope", VAULT_SCOPE),
        ("client_assertion_type", ASSERTION_TYPE),
        ("client_assertion", assertion),
    ]
}

pub fn read(path: &PathBuf) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// Polls `cond` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `identity-binding-proxy dev` as its own process, killed on drop.
pub struct DevProcess {
    child: std::process::Child,
    pub info: serde_json::Value,
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DevProcess {
    /// Runs `dev` on ephemeral ports with `state` as its state dir and waits for `dev.json`.
    pub fn start(state: &Path) -> Self {
        Self::start_with(state, &[])
    }

    /// The same with more arguments after the state dir (`dev` flags, then `--` and `serve`
    /// flags).
    pub fn start_with(state: &Path, more: &[&str]) -> Self {
        Self::start_logging(state, more, std::process::Stdio::null())
    }

    /// The same with its log (stderr) sent to `log`, at its default level (whatever
    /// `RUST_LOG` says in the test's environment).
    pub fn start_logging(state: &Path, more: &[&str], log: impl Into<std::process::Stdio>) -> Self {
        let child = std::process::Command::new(dev_binary())
            .args([
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--state-dir",
            ])
            .arg(state)
            .args(more)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("dev starts");
        Self::adopt(child, state)
    }

    /// Waits for `dev.json` of an already spawned `dev` process.
    pub fn adopt(child: std::process::Child, state: &Path) -> Self {
        let mut dev = Self {
            child,
            info: serde_json::Value::Null,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let file = state.join("dev.json");
        while !file.exists() {
            if let Ok(Some(status)) = dev.child.try_wait() {
                panic!("dev exited with {status} before writing dev.json");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "dev.json did not appear within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        dev.info = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        dev
    }

    /// Sends a signal (e.g. "TERM") to the process.
    pub fn signal(&self, name: &str) {
        // The shell's builtin `kill`: no procps needed on a minimal machine.
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{name} {}", self.child.id()))
            .status()
            .expect("sh runs");
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn get(&self, key: &str) -> String {
        self.info[key]
            .as_str()
            .unwrap_or_else(|| panic!("dev.json has no {key}"))
            .to_string()
    }

    /// The environment the workload identity webhook would inject, with `token_file`
    /// (a dev.json key) as the projected token.
    pub fn sdk_env(&self, token_file: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_KUBERNETES_TOKEN_PROXY", self.get("proxy_url")),
            ("AZURE_KUBERNETES_SNI_NAME", self.get("sni_name")),
            ("AZURE_KUBERNETES_CA_FILE", self.get("ca_file")),
            ("AZURE_CLIENT_ID", self.get("client_id")),
            ("AZURE_TENANT_ID", self.get("tenant_id")),
            (
                "AZURE_AUTHORITY_HOST",
                "https://login.microsoftonline.com/".into(),
            ),
            ("AZURE_FEDERATED_TOKEN_FILE", self.get(token_file)),
        ]
    }
}

/// The claims of a JWT, unverified (tests check what they were issued).
pub fn jwt_claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .unwrap(),
    )
    .unwrap()
}

/// Runs an SDK script that prints one JSON line, with `env` as its whole environment (plus
/// PATH and HOME).
pub fn run_sdk_script(program: &Path, args: &[&Path], env: &[(&str, String)]) -> serde_json::Value {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env_clear();
    for var in ["PATH", "HOME"] {
        if let Ok(v) = std::env::var(var) {
            cmd.env(var, v);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the SDK script runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim().lines().last().unwrap_or("")).unwrap_or_else(|_| {
        panic!(
            "the SDK script printed no JSON. stdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A form POST to `/` for an h2 sender.
pub fn form_request(pairs: &[(&str, &str)]) -> http::Request<Full<Bytes>> {
    let body = identity_binding_proxy::http::form::form_encode(pairs.iter().copied());
    http::Request::post("https://identity-binding-proxy.dev.local/")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// Sends on an h2 sender and reads the whole reply.
pub async fn send_h2(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> Reply {
    reply_of(sender.send_request(req).await.unwrap()).await
}

/// A response read whole: status, headers, body (as JSON where it is JSON).
pub async fn reply_of(resp: http::Response<hyper::body::Incoming>) -> Reply {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let raw = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
    Reply {
        status,
        headers,
        json,
        raw,
    }
}

/// The value of one sample in a Prometheus text scrape (0 when absent).
pub async fn metric(admin: std::net::SocketAddr, series: &str) -> f64 {
    let text = scrape(admin).await;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The admin server's `/metrics` text.
pub async fn scrape(admin: std::net::SocketAddr) -> String {
    let tcp = TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

/// Mints a projected SA token from the dev system's kube emulator.
pub fn mint_sa(sys: &DevSystem, ns: &str, sa: &str, aud: &[&str], expires_in: i64) -> String {
    sys.kube
        .mint_token(&ibp_emulators::kube::MintRequest {
            namespace: ns.into(),
            service_account: sa.into(),
            audiences: aud.iter().map(|a| a.to_string()).collect(),
            expires_in_secs: expires_in,
            pod_name: Some(format!("{sa}-pod")),
        })
        .unwrap()
}

/// An HTTP/1.x response read off a raw connection.
pub struct RawReply {
    pub status: u16,
    pub version: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub json: serde_json::Value,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Writes `bytes` on a fresh TLS connection (ALPN http/1.1) and reads up to `responses`
/// HTTP/1.x responses, or fewer if the server closes first. Writing happens concurrently
/// with reading, so a server that answers before reading a whole body is not deadlocked.
pub async fn raw_exchange(client: &Client, bytes: Vec<u8>, responses: usize) -> Vec<RawReply> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = client.connect().await.expect("TLS handshake");
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        let _ = wr.flush().await;
        wr
    });
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while out.len() < responses {
        if let Some((reply, used)) = parse_response(&buf) {
            buf.drain(..used);
            out.push(reply);
            continue;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    writer.abort();
    out
}

/// One complete response at the start of `buf` (Content-Length or chunked bodies), with the
/// number of bytes it took.
fn parse_response(buf: &[u8]) -> Option<(RawReply, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?.to_string();
    let status: u16 = parts.next()?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let (body, used) = if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut body = Vec::new();
        let mut at = head_end;
        loop {
            let line_end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let size =
                usize::from_str_radix(std::str::from_utf8(&buf[at..line_end]).ok()?.trim(), 16)
                    .ok()?;
            at = line_end + 2;
            if size == 0 {
                at += 2;
                break;
            }
            if buf.len() < at + size + 2 {
                return None;
            }
            body.extend_from_slice(&buf[at..at + size]);
            at += size + 2;
        }
        (body, at)
    } else {
        let len: usize = get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if buf.len() < head_end + len {
            return None;
        }
        (buf[head_end..head_end + len].to_vec(), head_end + len)
    };
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    Some((
        RawReply {
            status,
            version,
            headers,
            body,
            json,
        },
        used,
    ))
}

/// A raw HTTP/1.1 POST of a form body with Content-Length.
pub fn raw_post(version: &str, path: &str, host: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} {version}\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Scrapes the admin port's `/metrics` text.
pub async fn scrape_metrics(sys: &DevSystem) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(sys.proxy.admin_addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: admin\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

impl DevProcess {
    /// The process id of `dev` (what a second `dev` names; /proc readings such as its RSS).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The binary `DevProcess` runs: this build's, or `IBP_DEV_BINARY` to measure another build
/// (e.g. an earlier release) with the same test.
pub fn dev_binary() -> std::path::PathBuf {
    std::env::var_os("IBP_DEV_BINARY")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_identity-binding-proxy-dev").into())
}

/// The Python SDK every Python test uses.
pub const PYTHON_SDK: &str = "azure-identity==1.27.0";

/// A venv under target/ with [`PYTHON_SDK`] from PyPI, installed once for every suite; its
/// python. Fails loudly with pip's error when PyPI cannot serve it.
pub fn python_with_sdk() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv-python");
    let python = venv.join("bin/python");
    let marker = venv.join(".installed-azure-identity-1.27.0");
    if marker.exists() {
        return python;
    }
    let status = std::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 must be installed");
    assert!(status.success(), "creating the venv failed");
    let out = std::process::Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            PYTHON_SDK,
        ])
        .output()
        .expect("pip runs");
    assert!(
        out.status.success(),
        "installing {PYTHON_SDK} from PyPI failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&marker, b"").unwrap();
    python
}

mod cli_defaults;
#[allow(unused_imports)] // not every suite reads a default
pub use cli_defaults::{dev_default, serve_default};

/// A numeric default of `dev` (what `start_dev` gives every field the test does not tweak).
fn dev_number<T: std::str::FromStr>(flag: &str) -> T {
    let v = dev_default(flag);
    v.parse()
        .unwrap_or_else(|_| panic!("dev's --{flag} default {v:?} is not a number"))
}

/// A TCP connection from the loopback address `src` (127.0.0.0/8 needs no set-up on Linux): one
/// address per simulated pod.
pub async fn tcp_from(src: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src, 0))?;
    socket.connect(to).await
}

/// A TLS connection from `src` to the proxy with the client's SNI and ALPN.
pub async fn tls_from(
    client: &Client,
    src: std::net::IpAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tcp_from(src, client.addr).await?;
    tokio_rustls::TlsConnector::from(client.config.clone())
        .connect(ServerName::try_from(client.sni.clone()).unwrap(), tcp)
        .await
}
