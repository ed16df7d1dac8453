//! No credential ever reaches the logs: success and failure flows run with every log target at
//! TRACE (ours, the emulators', hyper's, h2's, rustls', kube's), and the captured output must
//! not contain any SA token, our assertion or an access token — nor any 16-character slice
//! of one.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_absent(logs: &str, secret: &str, what: &str) {
    let secret = secret.trim();
    assert!(secret.len() >= 16, "{what} is too short to scan for");
    let chars: Vec<char> = secret.chars().collect();
    for window in chars.windows(16) {
        let slice: String = window.iter().collect();
        // The JWT header of every RS256 token looks alike; a header is not a secret.
        if slice.starts_with("eyJ") && secret.starts_with(&slice) {
            continue;
        }
        assert!(
            !logs.contains(&slice),
            "a 16-character slice of {what} appears in the logs: {slice}"
        );
    }
}

/// What `serve` installs (its JSON line, through its batching writer), every target at
/// TRACE, into a buffer.
fn capture_every_target_at_trace() -> Capture {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(identity_binding_proxy::serve::logpipe::install(
            capture.clone(),
        ))
        .event_format(identity_binding_proxy::serve::logline::JsonLine)
        .init();
    capture
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_assertion_appears_in_any_log_line() {
    let capture = capture_every_target_at_trace();

    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let ca = std::fs::read(&sys.info.ca_file).unwrap();
    let h2 = Client::new(sys.proxy.addr, &sys.info.sni_name, &ca, &[b"h2"]);
    let info = sys.info.clone();
    let allowed = read(&info.allowed_token_file);
    let denied = read(&info.denied_token_file);
    let mut secrets = vec![
        (allowed.clone(), "the allowed SA token"),
        (denied.clone(), "the denied SA token"),
    ];

    // Success (miss and hit, HTTP/1.1 and h2), a CAE bypass, and refusals of every kind.
    for c in [&client, &h2, &client] {
        let r = c
            .post_form(
                &format!("/{}/oauth2/v2.0/token", info.tenant_id),
                &token_form(&info.client_id, &allowed),
            )
            .await;
        assert_eq!(r.status, 200);
        secrets.push((
            r.json["access_token"].as_str().unwrap().to_string(),
            "an access token",
        ));
    }
    let mut claims = token_form(&info.client_id, &allowed);
    claims.push(("claims", "{}"));
    let r = client.post_form("/", &claims).await;
    secrets.push((
        r.json["access_token"].as_str().unwrap().to_string(),
        "a CAE access token",
    ));
    assert_eq!(
        client.post_token(&info.client_id, &denied).await.status,
        403
    );
    let unbound = uuid::Uuid::new_v4().to_string();
    assert_eq!(client.post_token(&unbound, &allowed).await.status, 403);
    let tampered = format!("{}x", allowed.trim());
    assert_eq!(
        client.post_token(&info.client_id, &tampered).await.status,
        401
    );
    // Entra refuses: its error passes through.
    assert!(sys
        .entra
        .remove_fic(&info.client_id, "identity-binding-proxy"));
    let mut fresh = token_form(&info.client_id, &allowed);
    fresh[2] = ("scope", "https://storage.azure.com/.default");
    assert_ne!(client.post_form("/", &fresh).await.status, 200);

    // The form in the query (the body empty), as some clients send it: the line says so and
    // never logs the query.
    let query =
        identity_binding_proxy::http::form::form_encode(token_form(&info.client_id, &allowed));
    let in_query = http::Request::post(format!("/{}/oauth2/v2.0/token?{query}", info.tenant_id))
        .header("host", &info.sni_name)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(client.send(in_query).await.status, 200);
    send_the_token_in_the_path_and_the_host(&client, &h2, &info, &allowed).await;

    // Our own assertion, as the Entra emulator received it.
    let binding = sys
        .proxy
        .app
        .bindings
        .current()
        .get(&info.client_id)
        .unwrap()
        .clone();
    let assertion = sys.proxy.app.issuer.assertion(&binding).unwrap();
    secrets.push((assertion.to_string(), "our assertion"));
    sys.shutdown().await;
    identity_binding_proxy::serve::logpipe::flush(Duration::from_secs(2));

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("token request"),
        "the request log lines were captured"
    );
    assert!(
        logs.lines().count() > 100,
        "TRACE output of every target was captured"
    );
    for (secret, what) in &secrets {
        assert_absent(&logs, secret, what);
    }

    // One line per request: the first success went to Entra and says how long it waited for
    // it; the next ones were served from the cache and waited for nobody.
    let requests: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "token request")
        .collect();
    let successes: Vec<&serde_json::Value> = requests
        .iter()
        .filter(|f| f["outcome"] == "success")
        .collect();
    assert_eq!(successes[0]["cache"], "miss", "{:?}", successes[0]);
    let waited = successes[0]["upstream_us"].as_u64().unwrap();
    let total = successes[0]["latency_us"].as_u64().unwrap();
    assert!(waited > 0 && waited <= total, "{:?}", successes[0]);
    for hit in &successes[1..3] {
        assert_eq!(hit["cache"], "hit", "{hit:?}");
        assert_eq!(hit["upstream_us"], 0, "{hit:?}");
    }
    assert_says_what_the_client_sent(&successes, &info);
    assert_no_free_text_of_the_path_or_host(&successes, &info);
}

/// Token requests (each a success, so each logged in full) with the SA token where a
/// client's free text goes: in the path, as the Host header, and as the userinfo of the
/// authority (h2's `:authority`, an HTTP/1.1 absolute-form URI, a Host header).
async fn send_the_token_in_the_path_and_the_host(
    client: &Client,
    h2: &Client,
    info: &identity_binding_proxy_dev::dev::DevInfo,
    token: &str,
) {
    let token = token.trim();
    let form = identity_binding_proxy::http::form::form_encode(token_form(&info.client_id, token));
    let sni = &info.sni_name;
    let h1 = |path: String, host: String| {
        http::Request::post(path)
            .header("host", host)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form.clone())))
            .unwrap()
    };
    let tenant_path = format!("/{}/oauth2/v2.0/token", info.tenant_id);
    for req in [
        h1(format!("/token/{token}"), sni.clone()),
        h1(
            format!("{tenant_path}%3Fclient_assertion={token}"),
            sni.clone(),
        ),
        h1(format!("/x/oauth2&client_assertion={token}"), sni.clone()),
        h1(tenant_path.clone(), token.to_string()),
        h1(tenant_path.clone(), format!("user:{token}@{sni}")),
    ] {
        assert_eq!(client.send(req).await.status, 200);
    }
    let absolute = format!("https://user:{token}@{sni}{tenant_path}");
    let raw = raw_post("HTTP/1.1", &absolute, sni, &form);
    assert_eq!(raw_exchange(client, raw, 1).await[0].status, 200);
    let mut in_authority = form_request(&token_form(&info.client_id, token));
    *in_authority.uri_mut() = absolute.parse().unwrap();
    let mut sender = h2.h2_sender().await;
    assert_eq!(send_h2(&mut sender, in_authority).await.status, 200);
}

/// The lines of [`send_the_token_in_the_path_and_the_host`]: an unrouted path is logged by
/// its length, a host with userinfo as its host, a host that is no host name by its length.
fn assert_no_free_text_of_the_path_or_host(
    successes: &[&serde_json::Value],
    info: &identity_binding_proxy_dev::dev::DevInfo,
) {
    let count = |f: &dyn Fn(&serde_json::Value) -> bool| successes.iter().filter(|l| f(l)).count();
    let unrecognised = |l: &serde_json::Value| {
        l["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("(unrecognised, "))
    };
    assert_eq!(count(&unrecognised), 3, "{successes:?}");
    let invalid_host = |l: &serde_json::Value| {
        l["host"]
            .as_str()
            .is_some_and(|h| h.starts_with("(invalid, "))
    };
    assert_eq!(count(&invalid_host), 1, "{successes:?}");
    let just_the_host = |l: &serde_json::Value| l["host"] == info.sni_name.as_str();
    assert!(count(&just_the_host) >= 5, "{successes:?}");
}

/// Each line says what its client sent: method, path (never the query), HTTP version and
/// ALPN, where the form came from, Host/`:authority` and SNI.
fn assert_says_what_the_client_sent(
    successes: &[&serde_json::Value],
    info: &identity_binding_proxy_dev::dev::DevInfo,
) {
    let token_path = format!("/{}/oauth2/v2.0/token", info.tenant_id);
    let (h1, h2) = (successes[0], successes[1]);
    for (line, version, alpn) in [(h1, "HTTP/1.1", "http/1.1"), (h2, "HTTP/2", "h2")] {
        assert_eq!(line["method"], "POST", "{line}");
        assert_eq!(line["path"], token_path.as_str(), "{line}");
        assert_eq!(line["version"], version, "{line}");
        assert_eq!(line["alpn"], alpn, "{line}");
        assert_eq!(line["form"], "body", "{line}");
        assert_eq!(line["sni"], info.sni_name.as_str(), "{line}");
    }
    assert_eq!(h1["host"], info.sni_name.as_str(), "the Host header: {h1}");
    // The h2 client's `:authority` is the address it connected to.
    assert!(h2["host"].as_str().is_some_and(|h| !h.is_empty()), "{h2}");
    let in_query = successes
        .iter()
        .find(|l| l["form"] == "query")
        .expect("the request with its form in the query is logged");
    assert_eq!(in_query["path"], token_path.as_str(), "{in_query}");
}

// ---- Bounded logging under attack: refusals before authentication are summarized per peer.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// SPEC §9: a pod cannot grow the log by more than this a minute.
const LOG_BYTES_PER_PEER_MINUTE: f64 = 64.0 * 1024.0;
/// How long each attack runs: long enough for thousands of refusals.
const ATTACK: Duration = Duration::from_secs(8);

fn peer(last: u8) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last))
}

/// `dev` as its own process, logging JSON at its default level to `log`, with `flags` for
/// `serve`.
fn dev_logging_to(state: &Path, log: &Path, flags: &[&str]) -> DevProcess {
    let more = [&["--log-format", "json", "--"], flags].concat();
    DevProcess::start_logging(state, &more, std::fs::File::create(log).unwrap())
}

fn client_of(dev: &DevProcess, alpn: &[&[u8]]) -> Client {
    let addr = dev.get("proxy_url")["https://".len()..].parse().unwrap();
    let ca = std::fs::read(dev.get("ca_file")).unwrap();
    Client::new(addr, &dev.get("sni_name"), &ca, alpn)
}

/// Reads until the server closes (or `limit` passes).
async fn until_closed(stream: &mut TcpStream, limit: Duration) {
    let mut buf = [0u8; 512];
    let _ = tokio::time::timeout(limit, async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Holds the peer's share of connections (idle, within their first-request deadline), then
/// connects again and again: each one over the per-peer cap, closed at once. Returns the
/// attempts.
async fn flood_connections(client: &Client, src: IpAddr, share: usize) -> u64 {
    let addr = client.addr;
    let mut held = Vec::new();
    for _ in 0..share {
        held.push(tls_from(client, src).await.unwrap());
    }
    let (started, mut n) = (Instant::now(), 0);
    while started.elapsed() < ATTACK {
        if let Ok(mut tcp) = tcp_from(src, addr).await {
            until_closed(&mut tcp, Duration::from_secs(1)).await;
        }
        n += 1;
    }
    n
}

/// Plain text where a TLS ClientHello belongs: each a TLS error.
async fn send_garbage(addr: SocketAddr, src: IpAddr) -> u64 {
    let (started, mut n) = (Instant::now(), 0);
    while started.elapsed() < ATTACK {
        if let Ok(mut tcp) = tcp_from(src, addr).await {
            let _ = tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
            until_closed(&mut tcp, Duration::from_secs(1)).await;
        }
        n += 1;
    }
    n
}

/// Connections that never start their handshake, three at a time, each until its deadline.
async fn stall_handshakes(addr: SocketAddr, src: IpAddr) -> u64 {
    let (started, mut n) = (Instant::now(), 0);
    while started.elapsed() < ATTACK {
        let stalled = (0..3).map(|_| async {
            if let Ok(mut tcp) = tcp_from(src, addr).await {
                until_closed(&mut tcp, Duration::from_secs(3)).await;
            }
        });
        futures::future::join_all(stalled).await;
        n += 3;
    }
    n
}

/// Empty token requests on one keep-alive connection: each a 400.
async fn malformed_requests(client: &Client, src: IpAddr) -> u64 {
    let tls = tls_from(client, src).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (started, mut n) = (Instant::now(), 0);
    while started.elapsed() < ATTACK {
        let req = http::Request::post("/")
            .header("host", &client.sni)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 400);
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        n += 1;
    }
    n
}

/// A request body that sends a few bytes and then fails: the client resets the stream.
struct Resetting(Option<Bytes>);

impl hyper::body::Body for Resetting {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.0.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Ready(Some(Err(std::io::Error::other("reset")))),
        }
    }
}

/// h2 streams opened and reset mid-body, 16 at a time, on as many connections as it takes.
async fn reset_streams(client: &Client, src: IpAddr) -> u64 {
    let (started, mut n) = (Instant::now(), 0);
    while started.elapsed() < ATTACK {
        let Ok(tls) = tls_from(client, src).await else {
            continue;
        };
        let exec = hyper_util::rt::TokioExecutor::new();
        let Ok((sender, conn)) =
            hyper::client::conn::http2::handshake(exec, TokioIo::new(tls)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        while started.elapsed() < ATTACK && !sender.is_closed() {
            let streams = (0..16).map(|_| {
                let mut sender = sender.clone();
                let req = http::Request::post("https://identity-binding-proxy.dev.local/")
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Resetting(Some(Bytes::from_static(b"grant_type="))))
                    .unwrap();
                async move { sender.send_request(req).await.map(|r| r.status()) }
            });
            // A connection the server stopped answering on: on to a new one.
            let round =
                tokio::time::timeout(Duration::from_secs(2), futures::future::join_all(streams));
            match round.await {
                Ok(done) => n += done.len() as u64,
                Err(_) => break,
            }
        }
    }
    n
}

/// The JSON lines of `log` from byte `from` on.
fn lines_from(log: &Path, from: u64) -> Vec<(usize, serde_json::Value)> {
    let bytes = std::fs::read(log).unwrap();
    let text = String::from_utf8_lossy(&bytes[from as usize..]).into_owned();
    text.lines()
        .filter_map(|l| Some((l.len() + 1, serde_json::from_str(l).ok()?)))
        .collect()
}

/// Whether a line names `ip` as its peer (an address with its port, or the address alone).
fn is_from(line: &serde_json::Value, ip: IpAddr) -> bool {
    let Some(peer) = line["peer"].as_str() else {
        return false;
    };
    let ip = ip.to_string();
    peer == ip || peer.strip_prefix(&ip).is_some_and(|r| r.starts_with(':'))
}

/// The refusals a peer's lines report: the summaries' counts, one for each line in full.
fn refusals_reported(lines: &[&serde_json::Value]) -> u64 {
    let summarized: u64 = lines.iter().filter_map(|l| l["refused"].as_u64()).sum();
    let counted_in_summaries = lines.iter().any(|l| l["refused"].is_u64());
    if counted_in_summaries {
        summarized
    } else {
        lines.len() as u64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_attacking_peer_grows_the_log_by_less_than_64_kib_a_minute_and_is_named() {
    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("dev.log");
    let dev = dev_logging_to(
        state.path(),
        &log,
        &["--max-connections-per-peer=4", "--handshake-timeout-secs=1"],
    );
    let (h1, h2) = (client_of(&dev, &[b"http/1.1"]), client_of(&dev, &[b"h2"]));
    let flooder = client_of(&dev, &[b"http/1.1"]);
    let addr = h1.addr;
    let before = std::fs::metadata(&log).unwrap().len();
    let started = Instant::now();
    let attacks: [(IpAddr, &str, _); 5] = [
        (
            peer(3),
            "peer_connection_limit",
            tokio::spawn(async move { flood_connections(&flooder, peer(3), 4).await }),
        ),
        (
            peer(4),
            "tls_error",
            tokio::spawn(send_garbage(addr, peer(4))),
        ),
        (
            peer(5),
            "timeout",
            tokio::spawn(stall_handshakes(addr, peer(5))),
        ),
        (
            peer(6),
            "invalid_request",
            tokio::spawn(async move { malformed_requests(&h1, peer(6)).await }),
        ),
        (
            peer(7),
            "",
            tokio::spawn(async move { reset_streams(&h2, peer(7)).await }),
        ),
    ];
    let mut attempts = Vec::new();
    for (ip, reason, task) in attacks {
        let tried = tokio::time::timeout(ATTACK * 2, task).await;
        let tried = tried
            .unwrap_or_else(|_| panic!("{ip}: the attack ends"))
            .unwrap();
        attempts.push((ip, reason, tried));
    }
    // Every summary of the attack is written within one interval of its end.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let lines = lines_from(&log, before);
    for (ip, reason, tried) in attempts {
        let mine: Vec<&(usize, serde_json::Value)> =
            lines.iter().filter(|(_, l)| is_from(l, ip)).collect();
        let bytes: usize = mine.iter().map(|(n, _)| n).sum();
        let per_minute = bytes as f64 / minutes;
        eprintln!(
            "{ip}: {tried} attempts, {} lines, {bytes} bytes, {per_minute:.0} bytes/min",
            mine.len()
        );
        assert!(tried >= 20, "{ip}: the attack ran ({tried} attempts)");
        assert!(
            per_minute < LOG_BYTES_PER_PEER_MINUTE,
            "{ip} grew the log by {per_minute:.0} bytes a minute ({} lines)",
            mine.len()
        );
        // What an operator needs: which peer, how many, why.
        let values: Vec<&serde_json::Value> = mine.iter().map(|(_, l)| l).collect();
        let reported = refusals_reported(&values);
        eprintln!("{ip}: {reported} refusals reported");
        // A stream reset before its handler answers may never reach it (hyper drops it):
        // nothing to log then. Every other refusal is counted in its peer's lines.
        if !reason.is_empty() {
            assert!(
                reported * 2 >= tried,
                "{ip}: {reported} of {tried} refusals reported"
            );
            let why = format!("{values:?}");
            assert!(
                why.contains(reason),
                "{ip}: the reason {reason} is given: {why}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_fails_its_handshake_is_named_in_the_log_with_the_reason() {
    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("dev.log");
    let dev = dev_logging_to(state.path(), &log, &[]);
    let good = client_of(&dev, &[b"http/1.1"]);
    // A client that trusts another CA, and one that asks for a name not served.
    let other_ca = rcgen::generate_simple_self_signed(vec!["elsewhere.example".to_string()])
        .unwrap()
        .cert
        .pem();
    let wrong_ca = Client::new(good.addr, &good.sni, other_ca.as_bytes(), &[b"http/1.1"]);
    let wrong_sni = Client {
        sni: "not-served.example".to_string(),
        ..client_of(&dev, &[b"http/1.1"])
    };
    for _ in 0..3 {
        assert!(tls_from(&wrong_ca, peer(8)).await.is_err());
        assert!(tls_from(&wrong_sni, peer(9)).await.is_err());
    }
    let named = |ip: IpAddr, reason: &'static str| {
        let log = log.clone();
        async move {
            lines_from(&log, 0)
                .iter()
                .any(|(_, l)| is_from(l, ip) && l["reason"] == reason)
        }
    };
    // At once: the first failure of a peer is logged in full, with what failed.
    assert!(eventually(Duration::from_secs(5), || named(peer(8), "tls_error")).await);
    assert!(eventually(Duration::from_secs(5), || named(peer(9), "unknown_sni")).await);
    let lines = lines_from(&log, 0);
    let wrong_ca_line = &lines.iter().find(|(_, l)| is_from(l, peer(8))).unwrap().1;
    let error = wrong_ca_line["error"].as_str().unwrap_or("");
    assert!(
        error.contains("alert"),
        "the client's alert is named: {wrong_ca_line}"
    );
    // The repeats come in the peer's summary within an interval.
    let summarized = |ip: IpAddr| {
        let log = log.clone();
        async move {
            lines_from(&log, 0)
                .iter()
                .any(|(_, l)| is_from(l, ip) && l["refused"] == 3)
        }
    };
    assert!(eventually(Duration::from_secs(12), || summarized(peer(8))).await);
    assert!(eventually(Duration::from_secs(2), || summarized(peer(9))).await);
    drop(dev);
}

// ---- A log reader that stops reading never stalls requests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_served_while_nobody_reads_the_log_and_dropped_lines_are_counted() {
    let state = tempfile::tempdir().unwrap();
    // stderr is a pipe that is never read: it fills after its 64 KiB.
    let json = ["--log-format", "json"];
    let dev = DevProcess::start_logging(state.path(), &json, std::process::Stdio::piped());
    let admin: SocketAddr = dev.get("admin_url")["http://".len()..]
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let series = "identity_binding_proxy_log_lines_dropped_total";
    let client = client_of(&dev, &[b"h2"]);
    let token = std::fs::read_to_string(dev.get("allowed_token_file")).unwrap();
    let client_id = dev.get("client_id");
    let sender = client.h2_sender().await;
    let mut rounds = Vec::new();
    // A few MiB of request lines: more than the pipe and the log's buffer hold.
    for _ in 0..30 {
        let requests = (0..250).map(|_| {
            let mut sender = sender.clone();
            let req = form_request(&token_form(&client_id, &token));
            async move { send_h2(&mut sender, req).await.status }
        });
        let round =
            tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(requests));
        let statuses = round.await.expect("no request waits for the log");
        assert!(statuses.iter().all(|s| *s == 200), "every request served");
        rounds.push(metric(admin, series).await);
    }
    let (first, last) = (rounds[0], *rounds.last().unwrap());
    assert!(
        last > first && last > 0.0,
        "dropped lines counted: {rounds:?}"
    );
    drop(dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_line_is_lost_at_a_sigterm_stop() {
    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("dev.log");
    let mut dev = dev_logging_to(state.path(), &log, &["--shutdown-delay-secs=0"]);
    let client = client_of(&dev, &[b"http/1.1"]);
    let token = std::fs::read_to_string(dev.get("allowed_token_file")).unwrap();
    let client_id = dev.get("client_id");
    for _ in 0..20 {
        assert_eq!(client.post_token(&client_id, &token).await.status, 200);
    }
    dev.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = dev.wait_exit(Duration::from_secs(30));
        (status, dev)
    });
    let (status, _dev) = status.await.unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "dev exits 0: {status:?}"
    );
    // The last lines, written within the writer's 200 ms before the exit, are there.
    let lines = lines_from(&log, 0);
    let requests = lines
        .iter()
        .filter(|(_, l)| l["message"] == "token request")
        .count();
    assert_eq!(requests, 20, "one line per request");
    let last = &lines.last().unwrap().1;
    assert_eq!(last["message"], "stopped", "the drain's last line: {last}");
}

/// The refusal summaries a SIGTERM stop writes while something (a connection past the
/// drain deadline, say) still holds the proxy's state: no drop of that state can write them
/// in time for the log's last flush.
#[tokio::test]
async fn a_peers_pending_refusals_are_summarized_at_a_sigterm_stop() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .event_format(identity_binding_proxy::serve::logline::JsonLine)
        .with_writer(move || writer.clone())
        .finish();
    // The test's one thread runs every task: all their lines reach this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| {
        a.proxy_flags.push("--shutdown-delay-secs=0".into())
    })
    .await;
    let ca = std::fs::read(&sys.info.ca_file).unwrap();
    let wrong_sni = Client::new(sys.proxy.addr, "not-served.example", &ca, &[b"http/1.1"]);
    for _ in 0..3 {
        assert!(tls_from(&wrong_sni, peer(10)).await.is_err());
    }
    let held = sys.proxy.app.clone();
    sys.stop_gracefully(identity_binding_proxy::serve::signal::Stop::Terminate)
        .await;
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let summary = lines
        .iter()
        .position(|l| is_from(l, peer(10)) && l["refused"].is_u64())
        .expect("the peer's pending refusals are summarized at the stop");
    assert_eq!(lines[summary]["refused"], 3, "{}", lines[summary]);
    assert_eq!(lines[summary]["first_reason"], "unknown_sni");
    let stopped = lines.iter().position(|l| l["message"] == "stopped");
    assert!(
        stopped > Some(summary),
        "summarized before the stopped line"
    );
    drop(held);
}
