//! Isolation between callers: a token cached for one service account never reaches a caller
//! who is not allowed the identity, even when both arrive at the same moment; and callers
//! cannot grow the proxy's state with client-ids nobody bound (no new metric series, no cache
//! entries, no upstream calls).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use identity_binding_proxy_dev::dev::DevSystem;

/// One h2 connection for many concurrent requests.
async fn h2_sender(sys: &DevSystem) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let ca = std::fs::read(&sys.info.ca_file).unwrap();
    Client::new(sys.proxy.addr, &sys.info.sni_name, &ca, &[b"h2"])
        .h2_sender()
        .await
}

async fn h2_post(
    mut sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    path: String,
    form: Vec<(String, String)>,
) -> (u16, serde_json::Value) {
    sender.ready().await.unwrap();
    let body =
        identity_binding_proxy::http::form::form_encode(form.iter().map(|(k, v)| (&**k, &**v)));
    let req = http::Request::post(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let raw = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&raw).unwrap_or_default())
}

fn owned_form(client_id: &str, token: &str) -> Vec<(String, String)> {
    token_form(client_id, token)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_callers_never_receive_a_token_cached_for_an_allowed_one() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let allowed = read(&sys.info.allowed_token_file);
    let path = format!("/{}/oauth2/v2.0/token", sys.info.tenant_id);
    // Denied callers: the demo intruder, SAs of other namespaces, and a same-named SA in
    // another namespace (demo/demo is allowed; other/demo is not).
    let mut denied = vec![read(&sys.info.denied_token_file)];
    let aud = serve_default("token-audience");
    for (ns, sa) in [
        ("demo", "mallory"),
        ("other", "demo"),
        ("kube-system", "default"),
    ] {
        denied.push(mint_sa(&sys, ns, sa, &[&aud], 3600));
    }
    // A slow Entra keeps the first flight open while denied callers pile in beside it.
    sys.entra.set_latency(Duration::from_millis(300));
    let sender = h2_sender(&sys).await;
    let mut issued = None::<String>;
    for round in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..120 {
            let token = if i % 3 == 0 {
                allowed.clone()
            } else {
                denied[i % denied.len()].clone()
            };
            let form = owned_form(&sys.info.client_id, &token);
            let allowed_caller = i % 3 == 0;
            tasks.push((
                allowed_caller,
                tokio::spawn(h2_post(sender.clone(), path.clone(), form)),
            ));
        }
        for (allowed_caller, task) in tasks {
            let (status, json) = task.await.unwrap();
            if allowed_caller {
                assert_eq!(status, 200, "round {round}: {json}");
                let t = json["access_token"].as_str().unwrap().to_string();
                assert_eq!(issued.get_or_insert(t.clone()), &t);
            } else {
                assert_eq!(status, 403, "round {round}: {json}");
                assert_eq!(json["error"], "unauthorized_client");
                assert!(
                    json.get("access_token").is_none(),
                    "a denied caller got a token: {json}"
                );
                let d = json["error_description"].as_str().unwrap();
                assert!(d.contains("is not allowed to use managed identity"), "{d}");
            }
        }
        // Let the short authz TTLs (1 s in tests) lapse so later rounds ask again.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert_eq!(
        sys.entra.stats().tokens_issued,
        1,
        "one exchange for everyone"
    );
    sys.shutdown().await;
}

/// Metric series: every non-comment sample line of the exposition.
fn series(text: &str) -> Vec<String> {
    let mut s: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.rsplit_once(' ').map(|(k, _)| k).unwrap_or(l).to_string())
        .collect();
    s.sort();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_client_ids_grow_neither_metric_series_nor_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    // Authorization runs before the bindings are consulted (so a refusal reveals nothing), and
    // each caller's budget bounds the reviews that made-up ids can cause.
    const BUDGET: u64 = 50;
    let sys = start_dev_with(dir.path(), |a| {
        a.proxy_flags = vec![format!("--caller-miss-budget={BUDGET}")]
    })
    .await;
    let allowed = read(&sys.info.allowed_token_file);
    let denied = read(&sys.info.denied_token_file);
    let path = format!("/{}/oauth2/v2.0/token", sys.info.tenant_id);
    let sender = h2_sender(&sys).await;

    // Warm up every outcome these requests can have, so their series exist before we count.
    let (s, _) = h2_post(
        sender.clone(),
        path.clone(),
        owned_form(&sys.info.client_id, &allowed),
    )
    .await;
    assert_eq!(s, 200);
    let random = || uuid::Uuid::new_v4().to_string();
    let (s, _) = h2_post(
        sender.clone(),
        path.clone(),
        owned_form(&random(), &allowed),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = h2_post(
        sender.clone(),
        path.clone(),
        owned_form("not-a-guid", &allowed),
    )
    .await;
    assert_eq!(s, 400);

    let before = series(&scrape_metrics(&sys).await);
    let cache_before = sys.proxy.app.cache.entry_count();
    let kube_before = sys.kube.counts();
    let entra_before = sys.entra.stats().token_requests;

    let mut ids = Vec::new();
    for batch in 0..10 {
        let mut tasks = Vec::new();
        for i in 0..100 {
            let id = random();
            ids.push(id.clone());
            // Allowed and denied callers alike; some ids upper-cased (the same GUID space).
            let token = if i % 2 == 0 { &allowed } else { &denied };
            let id = if i % 5 == 0 { id.to_uppercase() } else { id };
            tasks.push(tokio::spawn(h2_post(
                sender.clone(),
                path.clone(),
                owned_form(&id, token),
            )));
        }
        for t in tasks {
            let (status, json) = t.await.unwrap();
            let description = json["error_description"].as_str().unwrap();
            match status {
                403 => assert!(
                    description.contains("is not allowed to use managed identity"),
                    "batch {batch}: {json}"
                ),
                429 => assert!(
                    description.contains("--caller-miss-budget"),
                    "batch {batch}: {json}"
                ),
                _ => panic!("batch {batch}: {status} {json}"),
            }
            assert!(json.get("access_token").is_none());
        }
    }

    let after_text = scrape_metrics(&sys).await;
    let after = series(&after_text);
    assert_eq!(
        before.len(),
        after.len(),
        "1000 unbound client ids added metric series: {:?}",
        after
            .iter()
            .filter(|s| !before.contains(s))
            .collect::<Vec<_>>()
    );
    assert!(
        ids.iter().all(|id| !after_text.contains(id.as_str())),
        "a client id from an unauthenticated request became a label"
    );
    assert_eq!(
        sys.proxy.app.cache.entry_count(),
        cache_before,
        "cache entries grew"
    );
    assert_eq!(
        sys.entra.stats().token_requests,
        entra_before,
        "unbound ids reached Entra"
    );
    let reviews = sys.kube.counts().subject_access_reviews - kube_before.subject_access_reviews;
    assert!(
        reviews <= 2 * BUDGET,
        "{reviews} SubjectAccessReviews for 1000 made-up ids from two callers"
    );
    sys.shutdown().await;
}
