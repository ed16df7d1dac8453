//! The node's pods are untrusted: any of them can connect before it is authenticated. Each
//! test plays one attacker against a whole dev system over real TLS on loopback and proves the
//! bound it hits — memory, connections, deadlines, the admin port, Entra calls, the cache,
//! the order of checks — while another peer (127.0.0.2) or caller keeps being served.

mod common;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use ibp_emulators::entra::Fault;
use identity_binding_proxy_dev::dev::DevSystem;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OTHER_PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const ATTACKER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));

/// A token request over HTTP/1.1 on a fresh connection from `src`.
async fn post_from(client: &Client, src: IpAddr, pairs: &[(&str, &str)]) -> Reply {
    let resp = try_post_from(client, src, pairs).await;
    reply_of(resp.expect("the token request was answered")).await
}

/// The same, as a new pod's first request: the answer's head (whatever its status), or why
/// there was none.
async fn try_post_from(
    client: &Client,
    src: IpAddr,
    pairs: &[(&str, &str)],
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let tls = tls_from(client, src)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let body = identity_binding_proxy::http::form::form_encode(pairs.iter().copied());
    let req = http::Request::post("/")
        .header("host", &client.sni)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))
}

/// Whether the server closes `stream` (EOF or reset) within `limit`, sending nothing first.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. an h2 SETTINGS or GOAWAY frame
        }
    }
}

async fn dev_with(dir: &std::path::Path, flags: &[&str]) -> DevSystem {
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    start_dev_with(dir, |a| a.proxy_flags = flags).await
}

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// A request body that sends `bytes` and then never finishes.
struct Stalled(Option<Bytes>);

impl hyper::body::Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}

// ---- Memory: stalled bodies from one peer, before any authentication.

#[test]
fn stalled_bodies_from_one_peer_keep_memory_bounded_and_it_returns_after() {
    let dir = tempfile::tempdir().unwrap();
    let dev = DevProcess::start(dir.path());
    let pid = dev.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ca = std::fs::read(dev.get("ca_file")).unwrap();
        let port: u16 = dev.get("proxy_url").rsplit(':').next().unwrap().parse().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let h2 = Client::new(addr, &dev.get("sni_name"), &ca, &[b"h2"]);
        let h1 = Client::new(addr, &dev.get("sni_name"), &ca, &[b"http/1.1"]);
        let token = std::fs::read_to_string(dev.get("allowed_token_file")).unwrap();
        let cid = dev.get("client_id");
        assert_eq!(post_from(&h1, OTHER_PEER, &token_form(&cid, &token)).await.status, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = resident_kib(pid);

        // 30 h2 connections x 120 streams, each sending 60 KB of a body it never finishes.
        let mut tasks = Vec::new();
        for _ in 0..30 {
            let Ok(tls) = tls_from(&h2, ATTACKER).await else { continue };
            let Ok((sender, conn)) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(tls),
            )
            .await
            else {
                continue;
            };
            tasks.push(tokio::spawn(async move {
                let _ = conn.await;
            }));
            for _ in 0..120 {
                let mut sender: hyper::client::conn::http2::SendRequest<Stalled> = sender.clone();
                tasks.push(tokio::spawn(async move {
                    let req = http::Request::post("https://x/")
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(Stalled(Some(Bytes::from(vec![b'a'; 60_000]))))
                        .unwrap();
                    let _ = sender.send_request(req).await;
                }));
            }
        }
        // And 200 HTTP/1.1 connections, each sending a head and 19 KiB of a 60 KB body.
        let head = "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 60000\r\n\r\n";
        let mut h1_conns = Vec::new();
        for _ in 0..200 {
            if let Ok(mut tls) = tls_from(&h1, ATTACKER).await {
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(&[b'a'; 19 * 1024]).await;
                let _ = tls.flush().await;
                h1_conns.push(tls);
            }
        }
        let mut peak = idle;
        for _ in 0..20 {
            peak = peak.max(resident_kib(pid));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Meanwhile another pod is served.
        let other = post_from(&h1, OTHER_PEER, &token_form(&cid, &token)).await;
        assert_eq!(other.status, 200, "{}", other.error_description());
        peak = peak.max(resident_kib(pid));

        for t in &tasks {
            t.abort();
        }
        drop(h1_conns);
        drop(tasks);
        // jemalloc's background thread hands freed pages back after its decay time (10 s).
        let closed = Instant::now();
        let mut after = resident_kib(pid);
        while after > idle + idle / 10 && closed.elapsed() < Duration::from_secs(40) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            after = resident_kib(pid);
        }
        eprintln!("RSS back near idle {:?} after the connections closed", closed.elapsed());
        eprintln!(
            "RSS idle {} KiB, peak {} KiB (+{} KiB), after close {} KiB",
            idle,
            peak,
            peak - idle,
            after
        );
        assert!(
            peak - idle <= 64 * 1024,
            "RSS rose {} KiB above idle ({idle} KiB)",
            peak - idle
        );
        assert!(
            after <= idle + idle / 10,
            "RSS {after} KiB after the connections closed, idle was {idle} KiB"
        );
    });
}

// ---- Connections: deadlines and per-peer fairness.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_or_go_idle_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let sys = dev_with(
        dir.path(),
        &["--header-read-timeout-secs=1", "--idle-timeout-secs=2"],
    )
    .await;
    let ca = std::fs::read(&sys.info.ca_file).unwrap();
    let h1 = Client::for_dev(&sys);
    let h2 = Client::new(sys.proxy.addr, &sys.info.sni_name, &ca, &[b"h2"]);
    let limit = Duration::from_secs(4);

    // A TLS connection that never sends a request head (HTTP/1.1 and h2 by ALPN).
    let mut silent_h1 = h1.connect().await.unwrap();
    let mut silent_h2 = h2.connect().await.unwrap();
    assert!(
        closed_within(&mut silent_h1, limit).await,
        "h1 without a request"
    );
    assert!(
        closed_within(&mut silent_h2, limit).await,
        "h2 without a request"
    );

    // An h2 connection that sends the preface and SETTINGS, then no request.
    let started = Instant::now();
    let tls = h2.connect().await.unwrap();
    let (_sender, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    let ended = tokio::time::timeout(limit, conn).await;
    assert!(
        ended.is_ok(),
        "h2 connection with only a preface stays open"
    );
    eprintln!(
        "preface-only h2 connection closed after {:?}",
        started.elapsed()
    );

    // An h2 connection goes after its idle timeout once its last request is done (HTTP/1.1
    // keep-alive connections too: the unit tests of `server` reuse both up to the boundary).
    let token = read(&sys.info.allowed_token_file);
    let tls = h2.connect().await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let r = send_h2(
        &mut sender,
        form_request(&token_form(&sys.info.client_id, &token)),
    )
    .await;
    assert_eq!(r.status, 200);
    let idle_since = Instant::now();
    let ended = tokio::time::timeout(limit, conn).await;
    assert!(ended.is_ok(), "an idle h2 connection stays open");
    let idle_for = idle_since.elapsed();
    assert!(
        idle_for >= Duration::from_millis(1500),
        "closed after {idle_for:?}, before the idle timeout"
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_filling_its_connections_cannot_fail_another_peers_request() {
    let dir = tempfile::tempdir().unwrap();
    let sys = dev_with(
        dir.path(),
        &["--max-connections=40", "--max-connections-per-peer=20"],
    )
    .await;
    let client = Client::for_dev(&sys);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        match tls_from(&client, ATTACKER).await {
            Ok(tls) => held.push(tls),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(
        (held.len(), refused),
        (20, 40),
        "one peer holds at most its share"
    );
    let token = read(&sys.info.allowed_token_file);
    for _ in 0..5 {
        let r = post_from(
            &client,
            OTHER_PEER,
            &token_form(&sys.info.client_id, &token),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.error_description());
    }
    let scrape = scrape_metrics(&sys).await;
    assert!(
        scrape.contains("identity_binding_proxy_tls_handshake_failures_total{reason=\"peer_connection_limit\"} 40"),
        "{scrape}"
    );
    drop(held);
    sys.shutdown().await;
}

/// A pod that authenticated once on each of its connections and then keeps a request whose
/// body never ends in flight on each does not hold them against a new pod: only an
/// authenticated request still in flight protects its connection from eviction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticating_once_does_not_keep_a_connection_from_eviction() {
    use http_body_util::{combinators::BoxBody, BodyExt};
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--max-connections=8", "--max-connections-per-peer=8"];
    let sys = dev_with(dir.path(), &flags).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);
    let form = token_form(&sys.info.client_id, &token);
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let tls = tls_from(&client, ATTACKER).await.expect("TLS handshake");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let (parts, body) = form_request(&form).into_parts();
        let req = http::Request::from_parts(parts, body.boxed());
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "authenticated on this connection");
        resp.into_body().collect().await.unwrap();
        let slow = http::Request::post("/")
            .header("host", &client.sni)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("content-length", "1000")
            .body(BoxBody::new(Stalled(Some(Bytes::from_static(
                b"client_id=",
            )))))
            .unwrap();
        sender.ready().await.expect("kept alive");
        stalled.push(tokio::spawn(sender.send_request(slow)));
    }
    // The proxy holds its 8 connections, each with a request in flight that is not
    // authenticated.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        stalled.iter().all(|s| !s.is_finished()),
        "a slow request ended"
    );
    let sent = Instant::now();
    let r = try_post_from(&client, OTHER_PEER, &form).await;
    let took = sent.elapsed();
    let status = r.map(|resp| resp.status().as_u16());
    assert_eq!(status, Ok(200), "a new pod's request");
    assert!(took < Duration::from_secs(1), "answered after {took:?}");
    let scrape = scrape_metrics(&sys).await;
    let evicted = r#"identity_binding_proxy_connection_evictions_total{port="token",reason="unauthenticated_in_flight"}"#;
    let counted: Vec<&str> = scrape.lines().filter(|l| l.contains("evictions")).collect();
    assert!(series(&scrape, evicted) >= 1.0, "{counted:#?}");
    stalled.iter().for_each(|s| s.abort());
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_server_times_out_unfinished_heads_and_serves_other_peers() {
    let dir = tempfile::tempdir().unwrap();
    let sys = dev_with(
        dir.path(),
        &["--header-read-timeout-secs=1", "--admin-max-connections=8"],
    )
    .await;
    let admin = sys.proxy.admin_addr;
    let mut heads = Vec::new();
    for _ in 0..100 {
        if let Ok(mut tcp) = tcp_from(ATTACKER, admin).await {
            let _ = tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: a").await;
            heads.push(tcp);
        }
    }
    // Another peer (the kubelet's probe, Prometheus) is still answered.
    let mut probe = tcp_from(OTHER_PEER, admin).await.unwrap();
    probe
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), probe.read_to_string(&mut answer))
        .await
        .expect("the probe is answered")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Every unfinished head is closed: the ones over the cap at once, the rest on the timeout.
    for (i, tcp) in heads.iter_mut().enumerate() {
        assert!(
            closed_within(tcp, Duration::from_secs(4)).await,
            "admin connection {i} is still open"
        );
    }
    sys.shutdown().await;
}

// ---- Scopes: one canonical form, the cache key and what Entra gets.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scope_spelled_many_ways_is_one_entry_and_one_entra_call() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);
    let before = sys.entra.stats().tokens_issued;
    let spellings = [
        "HTTPS://VAULT.AZURE.NET/.DEFAULT",
        "https://vault.azure.net/.default",
        "https://Vault.Azure.Net/.Default",
        "  https://vault.azure.net/.default  ",
        "\thttps://vault.azure.net/.default\r\n",
        "https://vault.azure.net/.default https://VAULT.azure.net/.default",
        "https://vault.azure.net/.default  https://vault.azure.net/.default https://vault.azure.net/.default",
    ];
    let mut tokens = std::collections::HashSet::new();
    for scope in spellings {
        let mut form = token_form(&sys.info.client_id, &token);
        form.retain(|(k, _)| *k != "scope");
        form.push(("scope", scope));
        let r = client.post_form("/", &form).await;
        assert_eq!(r.status, 200, "{scope:?}: {}", r.error_description());
        tokens.insert(r.json["access_token"].as_str().unwrap().to_string());
    }
    assert_eq!(tokens.len(), 1, "one cache entry");
    assert_eq!(
        sys.entra.stats().tokens_issued - before,
        1,
        "one Entra call"
    );
    // The first caller's spelling did not decide what everyone gets: Entra was sent the
    // canonical scope, and copies it into `aud`.
    let token = tokens.into_iter().next().unwrap();
    assert_eq!(jwt_claims(&token)["aud"], "https://vault.azure.net");
    sys.shutdown().await;
}

// ---- Per-caller budgets and claims.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_miss_budget_gets_429_and_cached_tokens_stay_free() {
    let dir = tempfile::tempdir().unwrap();
    let sys = dev_with(dir.path(), &["--caller-miss-budget=3"]).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);
    let ask = |scope: String| {
        let mut form: Vec<(&str, String)> = token_form(&sys.info.client_id, &token)
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        form.retain(|(k, _)| *k != "scope");
        form.push(("scope", scope));
        form
    };
    for i in 0..3 {
        let form = ask(format!("https://r{i}.example/.default"));
        let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(client.post_form("/", &pairs).await.status, 200);
    }
    let calls = sys.entra.stats().tokens_issued;
    let form = ask("https://r3.example/.default".into());
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let over = client.post_form("/", &pairs).await;
    assert_eq!(over.status, 429, "{}", over.error_description());
    let retry: u64 = over.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert!(over.error_description().contains("--caller-miss-budget"));
    assert!(over
        .error_description()
        .contains("system:serviceaccount:demo:demo"));
    assert_eq!(
        sys.entra.stats().tokens_issued,
        calls,
        "no Entra call over budget"
    );
    // Cached keys are still served: hits cost nothing.
    let form = ask("https://r0.example/.default".into());
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(client.post_form("/", &pairs).await.status, 200);
    let scrape = scrape_metrics(&sys).await;
    assert!(scrape.contains("identity_binding_proxy_caller_budget_exceeded_total{kind=\"miss\"} 1"));
    assert!(scrape.contains(
        "identity_binding_proxy_requests_total{outcome=\"over_budget\",status=\"429\"} 1"
    ));
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_share_one_call_and_never_replace_the_shared_entry() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| a.entra_latency_ms = 200).await;
    let ca = std::fs::read(&sys.info.ca_file).unwrap();
    let client = Client::new(sys.proxy.addr, &sys.info.sni_name, &ca, &[b"h2"]);
    let token = read(&sys.info.allowed_token_file);
    let cid = sys.info.client_id.clone();
    let plain = token_form(&cid, &token);
    let mut sender = client.h2_sender().await;
    let shared = send_h2(&mut sender, form_request(&plain)).await;
    assert_eq!(shared.status, 200);
    let shared_token = shared.json["access_token"].as_str().unwrap().to_string();
    let before = sys.entra.stats().tokens_issued;

    let claims = r#"{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}"#;
    let mut with_claims = plain.clone();
    with_claims.push(("claims", claims));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut sender = sender.clone();
        let req = form_request(&with_claims);
        tasks.push(tokio::spawn(async move { send_h2(&mut sender, req).await }));
    }
    let mut claim_tokens = std::collections::HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.error_description());
        claim_tokens.insert(r.json["access_token"].as_str().unwrap().to_string());
    }
    assert_eq!(
        sys.entra.stats().tokens_issued - before,
        1,
        "20 claims requests, one call"
    );
    assert_eq!(claim_tokens.len(), 1);
    assert!(!claim_tokens.contains(&shared_token));
    // Everyone else is still served the shared entry, not the claims token.
    let after = send_h2(&mut sender, form_request(&plain)).await;
    assert_eq!(after.json["access_token"].as_str().unwrap(), shared_token);
    sys.shutdown().await;
}

// ---- Upstream values.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_lifetime_from_entra_is_clamped_and_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);
    sys.entra.push_faults([Fault::Answer {
        status: 200,
        body: format!(
            r#"{{"token_type":"Bearer","expires_in":{m},"ext_expires_in":{m},"refresh_in":{m},"access_token":"eyJ0eXAiOiJKV1QifQ.e30.c2ln"}}"#,
            m = u64::MAX
        ),
    }]);
    for i in 0..3 {
        let r = client.post_token(&sys.info.client_id, &token).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.error_description());
        let expires_in = r.json["expires_in"].as_u64().unwrap();
        assert!(
            (86_000..=86_400).contains(&expires_in),
            "expires_in {expires_in}"
        );
    }
    sys.shutdown().await;
}

// ---- Order of checks: nothing is revealed before authorization.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_caller_learns_nothing_about_bindings_or_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let info = sys.info.clone();
    let denied = read(&info.denied_token_file);
    let unbound = "99999999-8888-7777-6666-555555555555";
    let bound_reply = client.post_token(&info.client_id, &denied).await;
    let unbound_reply = client.post_token(unbound, &denied).await;
    let other_tenant = client
        .post_form(
            "/00000000-0000-0000-0000-000000000001/oauth2/v2.0/token",
            &token_form(&info.client_id, &denied),
        )
        .await;
    for (what, r) in [
        ("bound", &bound_reply),
        ("unbound", &unbound_reply),
        ("wrong tenant", &other_tenant),
    ] {
        assert_eq!(r.status, 403, "{what}: {}", r.error_description());
        assert!(
            !String::from_utf8_lossy(&r.raw).contains(&info.tenant_id),
            "{what}: the bound tenant is revealed"
        );
    }
    assert_eq!(bound_reply.json["error"], unbound_reply.json["error"]);
    assert_eq!(
        bound_reply.json["error_codes"],
        unbound_reply.json["error_codes"]
    );
    assert_eq!(
        bound_reply.error_description(),
        unbound_reply
            .error_description()
            .replace(unbound, &info.client_id),
        "the refusal must not depend on whether the identity is bound"
    );
    sys.shutdown().await;
}

/// A client that sends no SNI at all (an IP address as the server name) and trusts any
/// certificate: only the proxy's choice of profile is under test.
fn no_sni_client(addr: SocketAddr) -> Client {
    #[derive(Debug)]
    struct AnyCert;
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Client {
        addr,
        sni: "127.0.0.1".into(), // an IP address: rustls sends no SNI for it
        config: Arc::new(config),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_tenant_holds_for_every_request_under_its_name_and_without_sni() {
    let dir = tempfile::tempdir().unwrap();
    let other_tenant = "00000000-0000-0000-0000-00000000000a";
    let profile = format!(
        "--sni-profile=identity-binding-proxy.dev.local=cloud=public,tenant={other_tenant}"
    );
    let sys = dev_with(dir.path(), &[&profile]).await;
    let info = sys.info.clone();
    let token = read(&info.allowed_token_file);
    let form = token_form(&info.client_id, &token);
    let bound_tenant_path = format!("/{}/oauth2/v2.0/token", info.tenant_id);
    for (what, client) in [
        ("with SNI", Client::for_dev(&sys)),
        ("without SNI", no_sni_client(sys.proxy.addr)),
    ] {
        for path in ["/", bound_tenant_path.as_str()] {
            let r = client.post_form(path, &form).await;
            assert_eq!(r.status, 400, "{what} {path}: {}", r.error_description());
            assert!(
                r.error_description().contains("this SNI name's profile"),
                "{what} {path}: {}",
                r.error_description()
            );
        }
    }
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_is_built_from_the_sni_name_never_from_host() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let tenant = &sys.info.tenant_id;
    let req = http::Request::get(format!("/{tenant}/v2.0/.well-known/openid-configuration"))
        .header("host", "evil.example:443")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = client.send(req).await;
    assert_eq!(r.status, 200);
    let endpoint = r.json["token_endpoint"].as_str().unwrap();
    assert_eq!(
        endpoint,
        format!("https://{}/{tenant}/oauth2/v2.0/token", sys.info.sni_name)
    );
    assert!(!String::from_utf8_lossy(&r.raw).contains("evil"));
    sys.shutdown().await;
}

// ---- Wildcard grants.

const WILDCARD_RBAC: &str = "
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: everything
rules:
  - apiGroups: [\"*\"]
    resources: [\"*\"]
    verbs: [\"*\"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: cd-system-is-admin
  namespace: demo
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: everything
subjects:
  - kind: ServiceAccount
    name: deployer
    namespace: demo
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_grant_is_refused_by_name_unless_the_flag_allows_it() {
    for allow in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let flags: &[&str] = if allow {
            &["--allow-wildcard-grants"]
        } else {
            &[]
        };
        let sys = dev_with(dir.path(), flags).await;
        let client = Client::for_dev(&sys);
        let rbac = read(&sys.info.rbac_file);
        std::fs::write(&sys.info.rbac_file, format!("{rbac}{WILDCARD_RBAC}")).unwrap();
        let deployer = mint_sa(
            &sys,
            "demo",
            "deployer",
            &[&serve_default("token-audience")],
            3600,
        );
        // Until the RBAC change is picked up the deployer is simply not granted (also 403).
        let settled = eventually(Duration::from_secs(5), || async {
            let r = client.post_token(&sys.info.client_id, &deployer).await;
            if allow {
                r.status == 200
            } else {
                r.error_description().contains("EVERY")
            }
        })
        .await;
        let r = client.post_token(&sys.info.client_id, &deployer).await;
        assert!(
            settled,
            "allow={allow}: {} {}",
            r.status,
            r.error_description()
        );
        if !allow {
            let d = r.error_description();
            assert!(d.contains("EVERY managed identity"), "{d}");
            assert!(d.contains("--allow-wildcard-grants"), "{d}");
            assert!(d.contains("everything"), "the rule is named: {d}");
            assert!(r.json.get("access_token").is_none());
        }
        // A grant by name is unaffected either way.
        let demo = read(&sys.info.allowed_token_file);
        assert_eq!(
            client.post_token(&sys.info.client_id, &demo).await.status,
            200
        );
        sys.shutdown().await;
    }
}

// ---- The cluster JWKS.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_refresh_keeps_tokens_whose_key_is_still_published() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);
    assert_eq!(
        client.post_token(&sys.info.client_id, &token).await.status,
        200
    );
    let authn = &sys.proxy.app.authn;
    assert_eq!(authn.verified_tokens(), 1);
    authn.refresh_keys().await.unwrap();
    assert_eq!(
        authn.verified_tokens(),
        1,
        "an unchanged JWKS keeps verified tokens"
    );
    assert_eq!(
        client.post_token(&sys.info.client_id, &token).await.status,
        200
    );
    sys.shutdown().await;
}

// ---- Many pods together: fair shares under the process-wide cap.

/// `n` pods of the node: 127.0.1.1, 127.0.1.2, ... (loopback addresses need no setup on Linux).
fn colluders(n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            IpAddr::V4(std::net::Ipv4Addr::new(
                127,
                0,
                1 + (i / 250) as u8,
                1 + (i % 250) as u8,
            ))
        })
        .collect()
}

/// Attackers on their own threads: from every address, `per_peer` connections opened by `open`
/// and held until the server closes them, each opened again 5 ms after it closed or was
/// refused (at once, it would only spin the test's own threads against the proxy's).
/// Stops when dropped.
struct Flood {
    rt: Option<tokio::runtime::Runtime>,
    held: Arc<std::sync::atomic::AtomicUsize>,
}

impl Flood {
    fn start<F, Fut, S>(peers: &[IpAddr], per_peer: usize, open: F) -> Self
    where
        F: Fn(IpAddr) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = std::io::Result<S>> + Send,
        S: tokio::io::AsyncRead + Unpin + Send,
    {
        use std::sync::atomic::Ordering::Relaxed;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for &ip in peers {
            for _ in 0..per_peer {
                let (open, held) = (open.clone(), held.clone());
                rt.spawn(async move {
                    loop {
                        if let Ok(mut conn) = open(ip).await {
                            held.fetch_add(1, Relaxed);
                            closed_within(&mut conn, Duration::from_secs(3600)).await;
                            held.fetch_sub(1, Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                });
            }
        }
        Self { rt: Some(rt), held }
    }

    fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Asks `ask` every 200 ms for `duration`; each answer's latency, or why it failed (an
/// answer taking over 5 s is a failure).
async fn probe<F, Fut>(duration: Duration, mut ask: F) -> Vec<Result<Duration, String>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let (start, mut results) = (Instant::now(), Vec::new());
    while start.elapsed() < duration {
        let sent = Instant::now();
        results.push(
            match tokio::time::timeout(Duration::from_secs(5), ask()).await {
                Ok(Ok(())) => Ok(sent.elapsed()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err("no answer within 5 s".into()),
            },
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    results
}

/// Every answer came, each within `limit`; prints the figures either way.
fn assert_all_within(what: &str, results: &[Result<Duration, String>], limit: Duration) {
    let mut ok: Vec<Duration> = results.iter().filter_map(|r| r.clone().ok()).collect();
    ok.sort();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let (median, max) = (ok.get(ok.len() / 2), ok.last());
    eprintln!(
        "{what}: {} of {} answered, median {median:?}, slowest {max:?}; failures: {:?}",
        ok.len(),
        results.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    assert!(failed.is_empty(), "{what}: {} failed", failed.len());
    assert!(max.is_some_and(|m| *m < limit), "{what}: slowest {max:?}");
}

/// An admin request from `src` on a fresh connection: the whole answer, or why not.
async fn try_admin_get(admin: SocketAddr, src: IpAddr, path: &str) -> Result<String, String> {
    let mut tcp = tcp_from(src, admin)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    tcp.write_all(head.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer)
        .await
        .map_err(|e| format!("read: {e}"))?;
    match answer.starts_with("HTTP/1.1 200") {
        true => Ok(answer),
        false => Err(format!("answer {:?}", answer.lines().next())),
    }
}

/// The value of one metrics series in a scrape (0 when absent).
fn series(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The floods below each start a dev process and 600 attacking connections; on a small CI
/// machine two at once would measure each other, so they take turns.
static ONE_FLOOD_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_flood_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    // A flood test that failed still leaves the machine to the next one.
    ONE_FLOOD_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How long the new pod asks while the attack goes on: past the first-request deadline (10 s)
/// at which the attackers' connections are all closed and opened again.
const ATTACK: Duration = Duration::from_secs(12);

#[test]
fn two_hundred_pods_under_their_shares_cannot_lock_a_new_pod_out_of_the_token_port() {
    lock_out_of_the_token_port(None, "no_request");
}

#[test]
fn two_hundred_pods_with_slow_requests_cannot_lock_a_new_pod_out_of_the_token_port() {
    // A request head, then a body that never ends: in flight, never authenticated.
    let head = "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nclient_id=";
    lock_out_of_the_token_port(Some(head), "unauthenticated_in_flight");
}

/// 200 pods, each holding 3 TLS connections (under its 4), idle or sending `slow` and then
/// nothing, and opening each again 5 ms after it closes: 600 wanted, 400 allowed. A new pod's
/// requests are all answered, each within 1 s, and connections `evicted` (a reason) made room.
fn lock_out_of_the_token_port(slow: Option<&'static str>, evicted: &str) {
    let _turn = one_flood_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--",
        "--max-connections=400",
        "--max-connections-per-peer=4",
    ];
    let dev = DevProcess::start_with(dir.path(), &flags);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = std::fs::read(dev.get("ca_file")).unwrap();
    let port: u16 = dev
        .get("proxy_url")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let admin: SocketAddr = dev
        .get("admin_url")
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let client = Arc::new(Client::new(addr, &dev.get("sni_name"), &ca, &[b"http/1.1"]));
    let (token, cid) = (
        std::fs::read_to_string(dev.get("allowed_token_file")).unwrap(),
        dev.get("client_id"),
    );
    let form = token_form(&cid, &token);

    let flood = {
        let client = client.clone();
        Flood::start(&colluders(200), 3, move |ip| {
            let client = client.clone();
            async move {
                let mut tls = tls_from(&client, ip).await?;
                if let Some(slow) = slow {
                    tls.write_all(slow.as_bytes()).await?;
                    tls.flush().await?;
                }
                Ok(tls)
            }
        })
    };
    let limit_refusals =
        r#"identity_binding_proxy_tls_handshake_failures_total{reason="connection_limit"}"#;
    rt.block_on(async {
        let full = eventually(Duration::from_secs(30), || async {
            let scrape = try_admin_get(admin, OTHER_PEER, "/metrics").await.unwrap_or_default();
            series(&scrape, limit_refusals) > 0.0
        })
        .await;
        assert!(full, "the attackers never filled --max-connections");
        eprintln!("attackers hold {} connections", flood.held());
        let results = probe(ATTACK, || async {
            match try_post_from(&client, OTHER_PEER, &form).await?.status().as_u16() {
                200 => Ok(()),
                status => Err(format!("status {status}")),
            }
        })
        .await;
        eprintln!("attackers hold {} connections", flood.held());
        assert_all_within("a new pod's token requests", &results, Duration::from_secs(1));
        let scrape = try_admin_get(admin, OTHER_PEER, "/metrics").await.unwrap();
        let series_name = format!(
            r#"identity_binding_proxy_connection_evictions_total{{port="token",reason="{evicted}"}}"#
        );
        let counted: Vec<&str> = scrape.lines().filter(|l| l.contains("evictions")).collect();
        assert!(series(&scrape, &series_name) >= 1.0, "{counted:#?}");
    });
    drop(flood);
}

#[test]
fn two_hundred_pods_under_their_shares_cannot_lock_a_new_pod_out_of_the_admin_port() {
    let _turn = one_flood_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    // A quarter of the cap per peer: 100.
    let dev = DevProcess::start_with(dir.path(), &["--", "--admin-max-connections=400"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let admin: SocketAddr = dev
        .get("admin_url")
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    // 200 pods, each holding 3 connections that send nothing, reopened 5 ms after closed.
    let flood = Flood::start(&colluders(200), 3, move |ip| tcp_from(ip, admin));
    rt.block_on(async {
        let full = eventually(Duration::from_secs(30), || async { flood.held() >= 390 }).await;
        assert!(full, "the attackers hold only {} connections", flood.held());
        let results = probe(ATTACK, || async {
            try_admin_get(admin, OTHER_PEER, "/readyz").await.map(drop)
        })
        .await;
        assert_all_within("a new pod's admin requests", &results, Duration::from_secs(1));
        let scrape = try_admin_get(admin, OTHER_PEER, "/metrics").await.unwrap();
        let evicted = r#"identity_binding_proxy_connection_evictions_total{port="admin",reason="no_request"}"#;
        assert!(series(&scrape, evicted) >= 1.0, "no eviction counted");
    });
    drop(flood);
}
