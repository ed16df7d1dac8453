//! What callers see when Entra or the Kubernetes API server misbehaves: throttling passed
//! through with its Retry-After and no retry storm, bounded jittered retries of 5xx, timeouts
//! on stalls, 503 when Entra is gone while cached tokens keep flowing, 502 on garbage; and on
//! the Kubernetes side, cached reviews keep serving during an apiserver outage, new callers get
//! a clear 503, unknown key ids cost one rate-limited JWKS refresh, and a proxy restarted while
//! the apiserver is gone starts from its persisted JWKS.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ibp_emulators::entra::Fault;
use identity_binding_proxy::config::ProxyConfig;
use identity_binding_proxy_dev::dev::DevSystem;

const MGMT_SCOPE: &str = "https://management.azure.com/.default";

fn status_fault(status: u16, retry_after: Option<u64>) -> Fault {
    Fault::Status {
        status,
        retry_after,
    }
}

/// A token request for `scope` (another scope is another cache key).
async fn ask(client: &Client, sys: &DevSystem, token: &str, scope: &str) -> Reply {
    let mut form = token_form(&sys.info.client_id, token);
    form.retain(|(k, _)| *k != "scope");
    form.push(("scope", scope));
    client
        .post_form(&format!("/{}/oauth2/v2.0/token", sys.info.tenant_id), &form)
        .await
}

fn calls(sys: &DevSystem) -> u64 {
    sys.entra.stats().token_requests
}

fn assert_error(r: &Reply, status: u16, error: &str, needle: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.raw));
    assert_eq!(r.json["error"], error, "{}", r.json);
    let d = r.error_description();
    assert!(d.contains(needle), "{d:?} should mention {needle:?}");
    assert!(r.json.get("access_token").is_none());
}

fn retry_after(r: &Reply) -> Option<u64> {
    r.headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_passed_through_with_retry_after_and_never_retried() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);

    sys.entra.push_faults([status_fault(429, Some(7))]);
    let r = ask(&client, &sys, &token, VAULT_SCOPE).await;
    assert_error(&r, 429, "temporarily_unavailable", "throttling");
    assert_eq!(
        retry_after(&r),
        Some(7),
        "Entra's Retry-After reaches the caller"
    );
    assert_eq!(calls(&sys), 1, "a 429 is never retried by the proxy");

    // A burst of callers during throttling: one flight, one upstream call, all told to wait.
    sys.entra.set_latency(Duration::from_millis(300));
    sys.entra.push_faults([status_fault(429, Some(3))]);
    let burst =
        futures::future::join_all((0..20).map(|_| ask(&client, &sys, &token, VAULT_SCOPE))).await;
    for r in &burst {
        assert_error(r, 429, "temporarily_unavailable", "throttling");
        assert_eq!(retry_after(r), Some(3));
    }
    assert_eq!(calls(&sys), 2, "20 throttled callers cost one Entra call");

    // Throttling over: the next caller gets a token with one more call.
    sys.entra.set_latency(Duration::ZERO);
    let r = ask(&client, &sys, &token, VAULT_SCOPE).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(calls(&sys), 3);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_throttling_and_a_bare_503_get_entra_shaped_answers_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);

    // Throttling in plain text (no Entra JSON): still an Entra-shaped 429 that says Entra
    // throttled, with Entra's Retry-After passed through; never retried.
    sys.entra
        .push_faults([Fault::PlainThrottle { retry_after: 60 }]);
    let r = ask(&client, &sys, &token, VAULT_SCOPE).await;
    assert_error(&r, 429, "temporarily_unavailable", "Entra is throttling");
    assert_eq!(retry_after(&r), Some(60));
    assert_eq!(calls(&sys), 1);

    // A 503 without Retry-After, every attempt: the proxy's own default tells when to retry.
    sys.entra
        .push_faults((0..3).map(|_| status_fault(503, None)));
    let r = ask(&client, &sys, &token, MGMT_SCOPE).await;
    assert_error(&r, 503, "temporarily_unavailable", "Retry");
    assert_eq!(retry_after(&r), Some(5), "the proxy's default Retry-After");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_a_bounded_number_of_times_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);

    // Two 5xx then success: the caller never sees the blips.
    sys.entra
        .push_faults([status_fault(500, None), status_fault(503, Some(1))]);
    let started = Instant::now();
    let r = ask(&client, &sys, &token, VAULT_SCOPE).await;
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(calls(&sys), 3, "two retries after two server errors");
    // Backoff 200 ms then 400 ms, each ±50 %: at least 300 ms in all.
    assert!(
        took >= Duration::from_millis(300),
        "retries waited {took:?}"
    );

    // A persistent outage: exactly 3 attempts, then 503 with Retry-After.
    let before = calls(&sys);
    sys.entra.push_faults([
        status_fault(503, Some(4)),
        status_fault(503, Some(4)),
        status_fault(503, Some(4)),
        status_fault(503, Some(4)),
    ]);
    let r = ask(&client, &sys, &token, MGMT_SCOPE).await;
    assert_error(&r, 503, "temporarily_unavailable", "503");
    assert_eq!(retry_after(&r), Some(4));
    assert_eq!(calls(&sys) - before, 3, "bounded: 3 attempts, not more");

    // The jitter: repeated retry sequences do not all take the same time.
    let mut waits = Vec::new();
    for i in 0..4 {
        sys.entra.push_faults([status_fault(500, None)]);
        let started = Instant::now();
        let r = ask(
            &client,
            &sys,
            &token,
            &format!("https://r{i}.example/.default"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.json);
        waits.push(started.elapsed().as_millis());
    }
    let spread = waits.iter().max().unwrap() - waits.iter().min().unwrap();
    assert!(spread >= 5, "retry waits show no jitter: {waits:?}");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_entra_hits_the_timeout_and_the_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);

    // The dev proxy's Entra timeout is 10 s; a 30 s stall must not hold the caller 30 s.
    sys.entra
        .push_faults([Fault::Stall(Duration::from_secs(30))]);
    let started = Instant::now();
    let r = ask(&client, &sys, &token, VAULT_SCOPE).await;
    let took = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(16),
        "took {took:?}"
    );
    assert_eq!(calls(&sys), 2, "the stalled call, then one retry");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_entra_is_a_502_and_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);
    sys.entra.push_faults([Fault::Garbage]);
    let r = ask(&client, &sys, &token, VAULT_SCOPE).await;
    assert_error(&r, 502, "server_error", "not with a token response");
    assert_eq!(calls(&sys), 1);
    // Nothing was cached: the next request gets a real token.
    let r = ask(&client, &sys, &token, VAULT_SCOPE).await;
    assert_eq!(r.status, 200, "{}", r.json);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_down_gives_503_with_retry_after_while_cached_tokens_keep_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);
    let cached = ask(&client, &sys, &token, VAULT_SCOPE).await;
    assert_eq!(cached.status, 200);

    // Entra goes away: connection refused.
    sys.entra.shutdown().await;
    let started = Instant::now();
    let r = ask(&client, &sys, &token, MGMT_SCOPE).await;
    assert_error(&r, 503, "temporarily_unavailable", "could not be reached");
    assert!(retry_after(&r).is_some_and(|s| s > 0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused connections fail fast"
    );

    // The token cached before the outage is still served, to many callers.
    let replies =
        futures::future::join_all((0..20).map(|_| ask(&client, &sys, &token, VAULT_SCOPE))).await;
    for r in replies {
        assert_eq!(r.status, 200, "{}", r.json);
        assert_eq!(r.json["access_token"], cached.json["access_token"]);
    }
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_down_serves_cached_callers_and_tells_new_ones_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| a.authz_allowed_ttl_secs = 300).await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);
    let first = ask(&client, &sys, &token, VAULT_SCOPE).await;
    assert_eq!(first.status, 200);

    sys.kube.set_available(false);
    // Known caller: TokenReview and SubjectAccessReview answers are cached, and so is the token.
    for _ in 0..5 {
        let r = ask(&client, &sys, &token, VAULT_SCOPE).await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    // A known caller asking for a new scope: reviews cached, Entra reachable: served.
    let r = ask(&client, &sys, &token, MGMT_SCOPE).await;
    assert_eq!(r.status, 200, "{}", r.json);

    // A new caller (a fresh token needs a TokenReview): 503, with the cause and Retry-After.
    let fresh = mint_sa(
        &sys,
        "demo",
        "demo",
        &[&serve_default("token-audience")],
        3600,
    );
    let r = ask(&client, &sys, &fresh, VAULT_SCOPE).await;
    assert_error(&r, 503, "temporarily_unavailable", "TokenReview");
    assert!(retry_after(&r).is_some());

    // Forged tokens are still refused locally (401), not blamed on the outage.
    let expired = mint_sa(
        &sys,
        "demo",
        "demo",
        &[&serve_default("token-audience")],
        -3600,
    );
    let r = ask(&client, &sys, &expired, VAULT_SCOPE).await;
    assert_error(&r, 401, "invalid_client", "expired");

    // Back up: the new caller is served.
    sys.kube.set_available(true);
    let r = ask(&client, &sys, &fresh, VAULT_SCOPE).await;
    assert_eq!(r.status, 200, "{}", r.json);
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_key_ids_costs_one_jwks_refresh() {
    // The kube emulator signs with one fixed key and cannot rotate it, so key rotation is
    // exercised through its observable half: an unknown kid triggers a JWKS refresh, which is
    // rate limited so forged kids cannot turn into apiserver load.
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let pem = std::fs::read_to_string(dir.path().join("kube/sa-signing-key.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    let good = read(&sys.info.allowed_token_file);
    let claims = jwt_claims(good.trim());
    let before = sys.kube.counts().jwks_requests;
    let forged = futures::future::join_all((0..50).map(|i| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(format!("rotated-key-{i}"));
        let t = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        let client = &client;
        let sys = &sys;
        async move { ask(client, sys, &t, VAULT_SCOPE).await }
    }))
    .await;
    for r in &forged {
        assert_error(r, 401, "invalid_client", "does not publish");
    }
    let refreshes = sys.kube.counts().jwks_requests - before;
    assert!(
        refreshes <= 1,
        "{refreshes} JWKS fetches for 50 unknown kids"
    );
    // Traffic with the real key flows throughout.
    let r = ask(&client, &sys, &good, VAULT_SCOPE).await;
    assert_eq!(r.status, 200, "{}", r.json);
    sys.shutdown().await;
}

/// The dev proxy's configuration, to start a second proxy process-alike on the same state.
fn dev_proxy_config(
    sys: &DevSystem,
    dir: &std::path::Path,
    state: &std::path::Path,
) -> ProxyConfig {
    let mut config = ProxyConfig::from_flags([
        format!("--kubeconfig={}", sys.kube.kubeconfig_path().display()),
        format!(
            "--tls={}={},{}",
            sys.info.sni_name,
            dir.join("tls/tls.crt").display(),
            dir.join("tls/tls.key").display()
        ),
        format!("--default-sni={}", sys.info.sni_name),
        format!("--issuer-key={}", dir.join("issuer.key").display()),
        format!("--issuer-url={}", sys.info.issuer_url),
        format!("--bindings={}", dir.join("bindings.yaml").display()),
        format!("--authority-host={}", sys.entra.url()),
        "--listen=127.0.0.1:0".into(),
        "--admin-listen=127.0.0.1:0".into(),
        "--authz-allowed-ttl-secs=60".into(),
        "--authz-denied-ttl-secs=1".into(),
        "--drain-timeout-secs=2".into(),
        format!("--state-dir={}", state.display()),
    ])
    .unwrap();
    config.reload_period = Duration::from_millis(500);
    config.refresh_tick = Duration::from_millis(250);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_while_the_apiserver_is_gone_starts_from_its_persisted_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    assert!(
        dir.path().join("proxy/cluster-jwks.json").exists(),
        "the dev proxy persists the JWKS in <state>/proxy"
    );
    let good = read(&sys.info.allowed_token_file);
    let expired = mint_sa(
        &sys,
        "demo",
        "demo",
        &[&serve_default("token-audience")],
        -3600,
    );
    let config = dev_proxy_config(&sys, dir.path(), &dir.path().join("proxy"));
    let mut empty_state = config.clone();
    let blank = tempfile::tempdir().unwrap();
    empty_state.authn.persist_dir = Some(blank.path().to_path_buf());

    // The apiserver disappears entirely (connection refused: JWKS, reviews, everything).
    sys.kube.shutdown().await;

    // Restarted with the persisted JWKS: ready at once, local verification works.
    let proxy = identity_binding_proxy::serve::start(config).await.unwrap();
    assert!(
        proxy.readiness.is_ready(),
        "ready from the persisted JWKS, without the apiserver"
    );
    let ca = std::fs::read(&sys.info.ca_file).unwrap();
    let client = Client::new(proxy.addr, &sys.info.sni_name, &ca, &[b"http/1.1"]);
    let r = ask(&client, &sys, &expired, VAULT_SCOPE).await;
    assert_error(&r, 401, "invalid_client", "expired");
    // A valid token still needs its TokenReview: a clear 503, not a refusal.
    let r = ask(&client, &sys, &good, VAULT_SCOPE).await;
    assert_error(&r, 503, "temporarily_unavailable", "TokenReview");
    assert!(retry_after(&r).is_some());
    proxy.stop().await;

    // Without persisted keys the same restart is not ready, and a valid token is told to
    // retry (503), never refused as if it came from another cluster.
    let proxy = identity_binding_proxy::serve::start(empty_state)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!proxy.readiness.is_ready());
    let client = Client::new(proxy.addr, &sys.info.sni_name, &ca, &[b"http/1.1"]);
    let r = ask(&client, &sys, &good, VAULT_SCOPE).await;
    assert_error(&r, 503, "temporarily_unavailable", "JWKS");
    assert!(retry_after(&r).is_some());
    proxy.stop().await;
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_request_timeout_is_answered_counted_and_correlated() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let mut config = dev_proxy_config(&sys, dir.path(), &dir.path().join("proxy-timeout"));
    config.server.request_timeout = Duration::from_secs(1);
    let proxy = identity_binding_proxy::serve::start(config).await.unwrap();
    let ca = std::fs::read(&sys.info.ca_file).unwrap();
    let client = Client::new(proxy.addr, &sys.info.sni_name, &ca, &[b"http/1.1"]);
    let token = read(&sys.info.allowed_token_file);
    let ready = eventually(Duration::from_secs(10), || async {
        proxy.readiness.is_ready()
    });
    assert!(ready.await, "the second proxy never became ready");
    let series = r#"identity_binding_proxy_requests_total{outcome="unavailable",status="503"}"#;
    let before = metric(proxy.admin_addr, series).await;

    // Entra stalls past the request timeout (1 s), well within the Entra timeout (10 s).
    sys.entra
        .push_faults([Fault::Stall(Duration::from_secs(5))]);
    let form = token_form(&sys.info.client_id, &token);
    let correlation = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let req = http::Request::post(format!("/{}/oauth2/v2.0/token", sys.info.tenant_id))
        .header("host", &sys.info.sni_name)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("client-request-id", correlation)
        .body(http_body_util::Full::new(bytes::Bytes::from(
            identity_binding_proxy::http::form::form_encode(form.iter().copied()),
        )))
        .unwrap();
    let started = Instant::now();
    let r = client.send(req).await;
    let took = started.elapsed();

    assert_error(&r, 503, "temporarily_unavailable", "request timeout");
    assert!(took < Duration::from_secs(4), "answered after {took:?}");
    assert_eq!(retry_after(&r), Some(1));
    // The timeout is an outcome like any other: correlated, counted.
    let echoed = r
        .headers
        .get("client-request-id")
        .map(|v| v.to_str().unwrap());
    assert_eq!(echoed, Some(correlation));
    assert_eq!(r.json["correlation_id"], correlation, "{}", r.json);
    assert_eq!(metric(proxy.admin_addr, series).await, before + 1.0);
    proxy.stop().await;
    sys.shutdown().await;
}

/// Makes the dev identity's FIC look freshly created: removed (dev applies that at once) and
/// added again with Entra's propagation delay, shortened to `delay`.
fn recreate_fic(sys: &DevSystem, delay: Duration) {
    let fic = sys.entra.fics(&sys.info.client_id)[0].clone();
    assert!(sys.entra.remove_fic(&sys.info.client_id, &fic.name));
    sys.entra.set_fic_propagation(delay);
    sys.entra.add_fic(fic).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fic_still_propagating_is_retried_until_entra_applies_it() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| {
        a.proxy_flags = vec![
            "--fic-propagation-retries=8".into(),
            "--fic-propagation-backoff-ms=200".into(),
        ]
    })
    .await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);
    let delay = Duration::from_millis(1500);
    recreate_fic(&sys, delay);
    let (before, started) = (calls(&sys), Instant::now());
    let r = ask(&client, &sys, &token, VAULT_SCOPE).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let waited = started.elapsed();
    let attempts = calls(&sys) - before;
    eprintln!("FIC propagation: token after {waited:?} and {attempts} calls to Entra");
    assert!(
        waited >= delay,
        "answered before the FIC applied: {waited:?}"
    );
    assert!(attempts >= 2, "{attempts} calls");
    assert!(attempts <= 9, "bounded: {attempts} calls");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fic_still_propagating_is_named_in_the_answer_when_retries_run_out() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| {
        a.proxy_flags = vec!["--fic-propagation-retries=0".into()]
    })
    .await;
    let client = Client::for_dev(&sys);
    let token = read(&sys.info.allowed_token_file);
    recreate_fic(&sys, Duration::from_millis(1500));
    let before = calls(&sys);
    let r = ask(&client, &sys, &token, VAULT_SCOPE).await;
    assert_error(&r, 401, "unauthorized_client", "may still be propagating");
    assert_eq!(r.json["error_codes"][0], 70021, "{}", r.json);
    assert!(
        r.error_description().starts_with("AADSTS70021: "),
        "Entra's own words first: {}",
        r.json
    );
    assert_eq!(calls(&sys) - before, 1, "no retry when none is configured");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let r = ask(&client, &sys, &token, VAULT_SCOPE).await;
    assert_eq!(r.status, 200, "{}", r.json);

    // Once the identity has had a token, a 70021 is a real mismatch: passed through as Entra
    // said it, without the hint. (Subject and audience each match a FIC, none matches both.)
    sys.entra.set_fic_propagation(Duration::ZERO);
    let fic = sys.entra.fics(&sys.info.client_id)[0].clone();
    assert!(sys.entra.remove_fic(&sys.info.client_id, &fic.name));
    for (name, subject, audience) in [
        (
            "other-audience",
            fic.subject.clone(),
            "api://elsewhere".to_string(),
        ),
        (
            "other-subject",
            "someone-else".to_string(),
            fic.audience.clone(),
        ),
    ] {
        sys.entra
            .add_fic(ibp_emulators::entra::Fic {
                name: name.into(),
                subject,
                audience,
                ..fic.clone()
            })
            .unwrap();
    }
    let before = calls(&sys);
    let r = ask(&client, &sys, &token, MGMT_SCOPE).await;
    assert_error(
        &r,
        401,
        "unauthorized_client",
        "No matching federated identity record",
    );
    assert_eq!(r.json["error_codes"][0], 70021, "{}", r.json);
    assert!(!r.error_description().contains("propagating"), "{}", r.json);
    assert_eq!(calls(&sys) - before, 1);
    sys.shutdown().await;
}
