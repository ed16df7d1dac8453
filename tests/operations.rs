//! Operating the proxy: the metrics contract, bounded label sets, serving-certificate
//! rotation under load, limits (slow clients, silent handshakes, connection cap), and the
//! graceful stop on SIGTERM with requests in flight.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use ibp_emulators::pki::DevCa;
use tokio::io::AsyncWriteExt;

const SPEC_METRICS: [&str; 11] = [
    "identity_binding_proxy_requests_total",
    "identity_binding_proxy_request_duration_seconds",
    "identity_binding_proxy_cache_lookups_total",
    "identity_binding_proxy_cache_entries",
    "identity_binding_proxy_cache_refreshes_total",
    "identity_binding_proxy_entra_requests_total",
    "identity_binding_proxy_entra_request_duration_seconds",
    "identity_binding_proxy_kube_reviews_total",
    "identity_binding_proxy_tls_handshake_failures_total",
    "identity_binding_proxy_certificate_expiry_timestamp_seconds",
    "identity_binding_proxy_build_info",
];

/// Parses Prometheus text exposition strictly enough to catch a broken scrape: every sample
/// line is `name{labels} value` with a float value, and every name has a TYPE. Returns the
/// set of series (name plus labels).
fn parse_prometheus(text: &str) -> BTreeSet<String> {
    let mut typed = BTreeSet::new();
    let mut series = BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = key.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if key.contains('{') {
            assert!(key.ends_with('}'), "{line}");
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(
            typed.contains(name) || typed.contains(base),
            "sample before its TYPE: {line}"
        );
        series.insert(key.to_string());
    }
    series
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_every_contract_name_move_with_traffic_and_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // 1000 made-up client ids from one caller: its review budget is raised so every one of
    // them reaches authorization (the budget itself is tested in node_surface).
    let sys = start_dev_with(dir.path(), |a| {
        a.proxy_flags = vec!["--caller-miss-budget=5000".into()]
    })
    .await;
    let admin = sys.proxy.admin_addr;
    let client = Client::for_dev(&sys);
    let info = sys.info.clone();
    let token = read(&info.allowed_token_file);

    let first = scrape(admin).await;
    parse_prometheus(&first);
    for name in SPEC_METRICS {
        assert!(
            first.contains(&format!("# TYPE {name} ")),
            "{name} missing from /metrics"
        );
    }
    assert!(first.contains("identity_binding_proxy_build_info{version=\""));
    assert!(first.contains(&format!(
        "identity_binding_proxy_certificate_expiry_timestamp_seconds{{sni=\"{}\"}}",
        info.sni_name
    )));

    let m = |s: &'static str| async move { metric(admin, s).await };
    assert_eq!(client.post_token(&info.client_id, &token).await.status, 200);
    assert_eq!(client.post_token(&info.client_id, &token).await.status, 200);
    let denied = read(&info.denied_token_file);
    assert_eq!(
        client.post_token(&info.client_id, &denied).await.status,
        403
    );
    assert_eq!(
        m("identity_binding_proxy_requests_total{outcome=\"success\",status=\"200\"}").await,
        2.0
    );
    assert_eq!(
        m("identity_binding_proxy_requests_total{outcome=\"forbidden\",status=\"403\"}").await,
        1.0
    );
    assert_eq!(
        m("identity_binding_proxy_cache_lookups_total{result=\"miss\"}").await,
        1.0
    );
    assert_eq!(
        m("identity_binding_proxy_cache_lookups_total{result=\"hit\"}").await,
        1.0
    );
    assert_eq!(
        m("identity_binding_proxy_entra_requests_total{status=\"200\"}").await,
        1.0
    );
    assert_eq!(m("identity_binding_proxy_cache_entries").await, 1.0);
    assert!(
        m("identity_binding_proxy_kube_reviews_total{kind=\"subjectaccessreview\",result=\"ok\"}")
            .await
            >= 2.0
    );

    // A flood of random client-ids (unbound) and of unknown SNI names adds no series.
    let mut random = token_form(&info.client_id, &token);
    let id = uuid::Uuid::new_v4().to_string();
    random[1] = ("client_id", &id);
    assert_eq!(client.post_form("/", &random).await.status, 403);
    let ca = std::fs::read(&info.ca_file).unwrap();
    let _ = Client::new(sys.proxy.addr, "warm-up.example", &ca, &[b"http/1.1"])
        .connect()
        .await;
    let before = parse_prometheus(&scrape(admin).await);
    let h2 = Client::new(sys.proxy.addr, &info.sni_name, &ca, &[b"h2"]);
    let mut sender = h2.h2_sender().await;
    for _ in 0..1000 {
        let id = uuid::Uuid::new_v4().to_string();
        let mut form = token_form(&id, &token);
        form[1] = ("client_id", &id);
        assert_eq!(send_h2(&mut sender, form_request(&form)).await.status, 403);
    }
    for i in 0..50 {
        let _ = Client::new(
            sys.proxy.addr,
            &format!("random-{i}.example"),
            &ca,
            &[b"http/1.1"],
        )
        .connect()
        .await;
    }
    let after_text = scrape(admin).await;
    let after = parse_prometheus(&after_text);
    let new: Vec<_> = after.difference(&before).collect();
    assert!(new.is_empty(), "new series appeared: {new:?}");
    assert!(!after_text.contains(&id), "no client-id appears in metrics");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_new_handshakes_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let info = sys.info.clone();
    let token = read(&info.allowed_token_file);
    let (cert_file, key_file) = (
        dir.path().join("tls/tls.crt"),
        dir.path().join("tls/tls.key"),
    );
    // Clients trust a bundle of the current CA and the one that will sign the renewal, as
    // they would during a CA rotation.
    let renewal_ca = DevCa::generate("renewal CA").unwrap();
    let mut bundle = std::fs::read(&info.ca_file).unwrap();
    bundle.extend_from_slice(renewal_ca.cert_pem.as_bytes());
    let client = || Client::new(sys.proxy.addr, &info.sni_name, &bundle, &[b"http/1.1"]);
    let served = || async {
        let tls = client().connect().await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0]
            .as_ref()
            .to_vec()
    };
    let original = served().await;

    // Continuous load, a new TLS connection per request, for the whole rotation.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (client, token, cid, stop) = (
            client(),
            token.clone(),
            info.client_id.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            while !stop.is_cancelled() {
                match client.post_token(&cid, &token).await.status {
                    200 => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        })
    };

    // A corrupt replacement: the old certificate keeps serving, the failure is counted.
    let errors = "identity_binding_proxy_certificate_reloads_total{result=\"error\"}";
    let errors_before = metric(sys.proxy.admin_addr, errors).await;
    std::fs::write(
        &cert_file,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let counted = eventually(Duration::from_secs(5), || async {
        metric(sys.proxy.admin_addr, errors).await > errors_before
    })
    .await;
    assert!(counted, "the failed reload is counted");
    assert_eq!(
        served().await,
        original,
        "the old certificate keeps serving"
    );

    // A real renewal (as cert-manager writes it): new handshakes get the new certificate.
    let renewed = renewal_ca.issue(&[&info.sni_name]).unwrap();
    std::fs::write(&key_file, &renewed.key_pem).unwrap();
    std::fs::write(&cert_file, &renewed.cert_pem).unwrap();
    let rotated = eventually(Duration::from_secs(5), || async {
        served().await != original
    })
    .await;
    assert!(rotated, "new handshakes see the new certificate");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let (ok, failed) = load.await.unwrap();
    assert_eq!(
        failed, 0,
        "no request failed during the rotation ({ok} succeeded)"
    );
    assert!(ok > 5);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut_off_and_the_connection_cap_closes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| {
        a.proxy_flags = vec![
            "--header-read-timeout-secs=1".into(),
            "--handshake-timeout-secs=1".into(),
            "--max-connections=4".into(),
        ]
    })
    .await;
    let client = Client::for_dev(&sys);

    // Slowloris: headers that never finish.
    let mut tls = client.connect().await.unwrap();
    tls.write_all(b"POST / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut tls, Duration::from_secs(5)).await,
        "a slow header read is cut off"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A TCP connection that never starts TLS.
    let mut tcp = tokio::net::TcpStream::connect(sys.proxy.addr)
        .await
        .unwrap();
    assert!(
        closed_within(&mut tcp, Duration::from_secs(5)).await,
        "a silent handshake is cut off"
    );

    // The connection cap: the fifth concurrent connection is closed at once.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(client.connect().await.unwrap());
    }
    assert!(
        client.connect().await.is_err(),
        "over the cap the connection is closed"
    );
    drop(held);
    let recovered = eventually(Duration::from_secs(3), || async {
        client.connect().await.is_ok()
    })
    .await;
    assert!(recovered, "connections are accepted again below the cap");
    assert!(
        metric(
            sys.proxy.admin_addr,
            "identity_binding_proxy_tls_handshake_failures_total{reason=\"connection_limit\"}"
        )
        .await
            >= 1.0
    );
    sys.shutdown().await;
}

/// True when the peer closes (EOF or reset) within `limit`.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. a 408 or an alert before the close
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_not_ready_first_and_drains_every_request_in_flight() {
    let state = tempfile::tempdir().unwrap();
    let mut dev = common::DevProcess::start_with(
        state.path(),
        &[
            // Longer than the shutdown delay plus any short grace a connection could be given
            // at shutdown: the drain deadline is what lets these finish.
            "--entra-latency-ms",
            "8000",
            "--",
            "--shutdown-delay-secs=1",
            "--drain-timeout-secs=15",
            // No attempt times out and is retried on a slow machine: each finishes in 8 s.
            "--entra-timeout-secs=30",
            // 200 misses from one caller at once, above its per-minute budget.
            "--caller-miss-budget=1000",
        ],
    );
    let proxy: std::net::SocketAddr = dev
        .get("proxy_url")
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let admin: std::net::SocketAddr = dev
        .get("admin_url")
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let ca = std::fs::read(dev.get("ca_file")).unwrap();
    let token = std::fs::read_to_string(dev.get("allowed_token_file")).unwrap();
    let cid = dev.get("client_id");

    // 200 requests in flight, each a cache miss waiting 8 s on Entra.
    let client = Client::new(proxy, &dev.get("sni_name"), &ca, &[b"h2"]);
    let mut senders = Vec::new();
    for _ in 0..4 {
        senders.push(client.h2_sender().await);
    }
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut sender = senders[i % 4].clone();
        let (token, cid) = (token.clone(), cid.clone());
        tasks.push(tokio::spawn(async move {
            let scope = format!("https://r{i}.example/.default");
            let mut form = token_form(&cid, &token);
            form[2] = ("scope", &scope);
            send_h2(&mut sender, form_request(&form)).await.status
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let signalled = Instant::now();
    dev.signal("TERM");
    let not_ready = eventually(Duration::from_millis(500), || async {
        admin_status(admin, "/readyz").await == Some(503)
    })
    .await;
    assert!(not_ready, "readiness flips at once");
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "every in-flight request completes");
    }
    let status = dev.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit 0 within the deadline"
    );
    eprintln!("stopped {:?} after SIGTERM", signalled.elapsed());
}

async fn admin_status(admin: std::net::SocketAddr, path: &str) -> Option<u16> {
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    let tcp = tokio::net::TcpStream::connect(admin).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "admin")
        .body(Full::new(bytes::Bytes::new()))
        .ok()?;
    Some(sender.send_request(req).await.ok()?.status().as_u16())
}
