//! Caching and revocation at fleet scale, proven against the emulators: single flight for a
//! cold key, no cached errors, refresh ahead only for keys in use, tokens served through an
//! Entra outage, live RBAC revocation, TokenReview catching deleted pods, eviction and CAE
//! claims bypass.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ibp_emulators::entra::Fault;
use ibp_emulators::kube::MintRequest;
use identity_binding_proxy_dev::dev::DevSystem;

fn h2_client(sys: &DevSystem) -> Client {
    let ca = std::fs::read(&sys.info.ca_file).unwrap();
    Client::new(sys.proxy.addr, &sys.info.sni_name, &ca, &[b"h2"])
}

/// Fires `n` concurrent token requests over 10 h2 connections; returns the statuses.
async fn fan_in(sys: &DevSystem, n: usize, scope: &str) -> Vec<u16> {
    let client = h2_client(sys);
    let token = read(&sys.info.allowed_token_file);
    let mut senders = Vec::new();
    for _ in 0..10 {
        senders.push(client.h2_sender().await);
    }
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut sender = senders[i % senders.len()].clone();
        let (cid, token, scope) = (sys.info.client_id.clone(), token.clone(), scope.to_string());
        tasks.push(tokio::spawn(async move {
            let mut form = token_form(&cid, &token);
            form[2] = ("scope", &scope);
            send_h2(&mut sender, form_request(&form)).await.status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_make_one_entra_call() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| a.entra_latency_ms = 300).await;
    let started = Instant::now();
    let statuses = fan_in(&sys, 1000, VAULT_SCOPE).await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "all succeed: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    assert_eq!(sys.entra.stats().tokens_issued, 1);
    assert_eq!(sys.entra.stats().token_requests, 1);
    eprintln!(
        "1000 concurrent cold requests completed in {:?}",
        started.elapsed()
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flight_is_not_cached_and_the_next_request_starts_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| a.entra_latency_ms = 100).await;
    // Every attempt of the first flight (the proxy retries 5xx twice) answers 503.
    sys.entra.push_faults((0..3).map(|_| Fault::Status {
        status: 503,
        retry_after: Some(1),
    }));
    let statuses = fan_in(&sys, 200, VAULT_SCOPE).await;
    assert!(
        statuses.iter().all(|s| *s == 503),
        "the failed flight is shared: {statuses:?}"
    );
    assert_eq!(
        sys.entra.stats().token_requests,
        3,
        "one flight, bounded retries"
    );
    assert_eq!(sys.entra.stats().tokens_issued, 0);

    let statuses = fan_in(&sys, 200, VAULT_SCOPE).await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "no error is cached: {statuses:?}"
    );
    assert_eq!(
        sys.entra.stats().token_requests,
        4,
        "exactly one new flight"
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn used_keys_are_refreshed_ahead_unused_keys_are_not_and_outages_are_ridden_out() {
    let dir = tempfile::tempdir().unwrap();
    // 8 s tokens without refresh_in (as Entra answers client credentials): refreshed at half
    // their lifetime less jitter, ~3.6–4 s; the cache serves them until 1 s before expiry.
    let sys = start_dev_with(dir.path(), |a| {
        a.entra_token_lifetime_secs = 8;
        a.cache_min_remaining_secs = 1;
        a.entra_latency_ms = 200;
    })
    .await;
    let client = Client::for_dev(&sys);
    let info = sys.info.clone();
    let token = read(&info.allowed_token_file);
    let used_form = token_form(&info.client_id, &token);
    let mut unused_form = token_form(&info.client_id, &token);
    unused_form[2] = ("scope", "https://storage.azure.com/.default");

    let first = client.post_form("/", &used_form).await;
    assert_eq!(first.status, 200);
    assert_eq!(client.post_form("/", &unused_form).await.status, 200);
    assert_eq!(sys.entra.stats().tokens_issued, 2);
    let misses = metric(
        sys.proxy.admin_addr,
        "identity_binding_proxy_cache_lookups_total{result=\"miss\"}",
    )
    .await;
    assert_eq!(misses, 2.0);

    // Use the first key; its refresh falls due at ~3.6–4 s and runs in the background.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.post_form("/", &used_form).await.status, 200);
    let refreshed = eventually(Duration::from_secs(6), || async {
        sys.entra.stats().tokens_issued == 3
    })
    .await;
    assert!(
        refreshed,
        "the used key is refreshed ahead: {:?}",
        sys.entra.stats()
    );

    // The refreshed token is served as a hit, without waiting on Entra.
    let started = Instant::now();
    let r = client.post_form("/", &used_form).await;
    assert_eq!(r.status, 200);
    assert_ne!(
        r.json["access_token"], first.json["access_token"],
        "a new token"
    );
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "served without Entra's 200 ms"
    );
    let misses_after = metric(
        sys.proxy.admin_addr,
        "identity_binding_proxy_cache_lookups_total{result=\"miss\"}",
    )
    .await;
    assert_eq!(misses_after, 2.0, "no request missed the cache");

    // Entra goes down: the valid cached token keeps being served.
    sys.entra.push_faults((0..50).map(|_| Fault::Status {
        status: 503,
        retry_after: Some(1),
    }));
    for _ in 0..5 {
        let r = client.post_form("/", &used_form).await;
        assert_eq!(
            r.status, 200,
            "served from cache during the outage: {}",
            r.json
        );
    }

    // The unused key was never refreshed (its token expires unrenewed): 3 tokens in all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = sys.entra.stats();
    assert_eq!(stats.tokens_issued, 3, "{stats:?}");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_binding_denies_within_two_seconds_and_a_readded_one_allows_again() {
    let dir = tempfile::tempdir().unwrap();
    // Production TTLs (allowed 5 min): only the RBAC watch can make this fast.
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let info = sys.info.clone();
    let token = read(&info.allowed_token_file);
    let form = token_form(&info.client_id, &token);
    assert_eq!(client.post_form("/", &form).await.status, 200);

    let original = read(&info.rbac_file);
    let without_binding = original.split("\n---\n").next().unwrap().to_string();
    std::fs::write(&info.rbac_file, &without_binding).unwrap();
    let removed_at = Instant::now();
    let denied = eventually(Duration::from_secs(2), || async {
        client.post_form("/", &form).await.status == 403
    })
    .await;
    assert!(denied, "revocation must deny within 2 s");
    eprintln!("revocation took effect after {:?}", removed_at.elapsed());
    let r = client.post_form("/", &form).await;
    assert!(r.json.get("access_token").is_none());

    std::fs::write(&info.rbac_file, &original).unwrap();
    let allowed = eventually(Duration::from_secs(2), || async {
        client.post_form("/", &form).await.status == 200
    })
    .await;
    assert!(allowed, "a re-added binding must allow within 2 s");
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_deleted_pods_are_refused_within_the_review_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| a.tokenreview_ttl_secs = 2).await;
    let client = Client::for_dev(&sys);
    let cid = sys.info.client_id.clone();
    let mint = |pod: &str| {
        sys.kube
            .mint_token(&MintRequest {
                namespace: "demo".into(),
                service_account: "demo".into(),
                audiences: vec![serve_default("token-audience")],
                expires_in_secs: 3600,
                pod_name: Some(pod.into()),
            })
            .unwrap()
    };
    let live = mint("web-1");
    assert_eq!(client.post_token(&cid, &live).await.status, 200);

    // A pod deleted before its token is first seen: refused at once, though the signature is valid.
    let gone = mint("web-2");
    sys.kube.delete_pod("demo", "web-2");
    let r = client.post_token(&cid, &gone).await;
    assert_eq!(r.status, 401, "{}", r.json);
    assert!(
        r.error_description().contains("deleted"),
        "{}",
        r.error_description()
    );

    // A pod deleted after its token was reviewed: refused once the review expires.
    sys.kube.delete_pod("demo", "web-1");
    let refused = eventually(Duration::from_secs(4), || async {
        client.post_token(&cid, &live).await.status == 401
    })
    .await;
    assert!(
        refused,
        "the deleted pod's token must be refused within the review TTL"
    );
    sys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_bound_and_claims_always_reach_entra() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| a.cache_capacity = 10).await;
    let client = Client::for_dev(&sys);
    let info = sys.info.clone();
    let token = read(&info.allowed_token_file);
    for i in 0..40 {
        let scope = format!("https://r{i}.example/.default");
        let mut form = token_form(&info.client_id, &token);
        form[2] = ("scope", &scope);
        assert_eq!(client.post_form("/", &form).await.status, 200);
    }
    assert!(
        sys.proxy.app.cache.entry_count() <= 10,
        "cache holds {}",
        sys.proxy.app.cache.entry_count()
    );

    let before = sys.entra.stats().tokens_issued;
    let mut form = token_form(&info.client_id, &token);
    form.push((
        "claims",
        r#"{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}"#,
    ));
    for _ in 0..3 {
        let r = client.post_form("/", &form).await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    assert_eq!(
        sys.entra.stats().tokens_issued,
        before + 3,
        "claims bypass the cache"
    );
    sys.shutdown().await;
}

/// Entra answers client credentials without `refresh_in`, 1 h and 24 h tokens alike, so the
/// proxy refreshes at half the lifetime less up to 10 % jitter. Time is compressed: a 1 h
/// token is 8 s here, a 24 h token 16 s (the schedule is a fraction of the lifetime, so the
/// ratio is what is checked). The answer to the SDK carries no `refresh_in` either: the SDKs
/// refresh on their own before `expires_in` runs out (docs/caching.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_refresh_in_one_hour_and_one_day_tokens_are_refreshed_at_half_life() {
    for (name, lifetime) in [("1 h", 8u64), ("24 h", 16)] {
        let dir = tempfile::tempdir().unwrap();
        let sys = start_dev_with(dir.path(), |a| {
            a.entra_token_lifetime_secs = lifetime;
            a.cache_min_remaining_secs = 1;
        })
        .await;
        let client = Client::for_dev(&sys);
        let form_token = read(&sys.info.allowed_token_file);
        let form = token_form(&sys.info.client_id, &form_token);
        let started = Instant::now();
        let first = client.post_form("/", &form).await;
        assert_eq!(first.status, 200, "{}", first.json);
        assert!(first.json.get("refresh_in").is_none(), "{}", first.json);
        assert!(first.json["expires_in"].as_u64().unwrap() <= lifetime);
        assert_eq!(sys.entra.stats().tokens_issued, 1);
        // Used all along, so it is refreshed; note when Entra issues the second token.
        let mut refreshed_at = None;
        // Until past the first refresh's window, before the second's (another half-life).
        let watch = Duration::from_secs(lifetime).mul_f64(0.5) + Duration::from_millis(2200);
        while started.elapsed() < watch {
            assert_eq!(client.post_form("/", &form).await.status, 200);
            if refreshed_at.is_none() && sys.entra.stats().tokens_issued == 2 {
                refreshed_at = Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let at = refreshed_at
            .unwrap_or_else(|| panic!("{name}: no refresh within the lifetime"))
            .as_secs_f64();
        let half = lifetime as f64 / 2.0;
        eprintln!("{name} token ({lifetime} s here): refreshed after {at:.2} s");
        // Due between 45 % and 50 % of the lifetime; found by a refresh tick of 1 s, plus the
        // refresh's own call and some slack for a loaded machine.
        assert!(
            at >= half * 0.9 && at <= half + 2.0,
            "{name}: refreshed after {at} s, due in [{}, {half}] s",
            half * 0.9
        );
        assert_eq!(sys.entra.stats().tokens_issued, 2, "one refresh only");
        sys.shutdown().await;
    }
}
