//! The cache-hit path through the per-token memo: each request of a token the proxy has seen
//! is answered from one lookup, and every way an answer can stop holding still takes effect
//! through it as fast as it does without it — an RBAC binding deleted, an identity removed
//! from the bindings file, the signing key leaving the cluster's JWKS, a TokenReview answer
//! expiring, a pod deleted. Each test first proves the memo holds the request, then changes
//! the world and watches the next requests — on one kept-alive connection, as an SDK sends
//! them, so the connection's own memory of its last token is under test too.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ibp_emulators::kube::MintRequest;
use identity_binding_proxy::authn::token_digest;
use identity_binding_proxy::request::memo::{Ask, Generations};
use identity_binding_proxy_dev::dev::DevSystem;

/// Whether the memo holds `token`'s SDK request (`token_form` to `/`): its caller under the
/// current key generation, and a grant under the current decisions and bindings.
fn memo_holds(sys: &DevSystem, token: &str) -> bool {
    let app = &sys.proxy.app;
    let Some(known) = app
        .memo
        .recall(&token_digest(token.trim()), app.authn.generation())
    else {
        return false;
    };
    let ask = Ask {
        client_id: &sys.info.client_id,
        scope: VAULT_SCOPE,
        sni: Some(&sys.info.sni_name),
        path_tenant: None,
    };
    let now = Generations {
        authz: app.authz.generation(),
        bindings: app.bindings.generation(),
    };
    known.grant(&ask, now).is_some()
}

/// Sends `token`'s request until the memo holds it (the first request authenticates,
/// authorizes and fills the token cache; the next one, a hit, is remembered).
async fn warm(sys: &DevSystem, client: &KeptAlive, token: &str) {
    for _ in 0..3 {
        let r = client.post_token(&sys.info.client_id, token).await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    assert!(memo_holds(sys, token), "the memo holds the warmed request");
}

/// Every request of the test went on one connection; then the system stops.
async fn done_on_one_connection(sys: DevSystem, client: &KeptAlive) {
    assert_eq!(client.connections(), 1, "every request on one connection");
    sys.shutdown().await;
}

fn mint_for_pod(sys: &DevSystem, pod: &str) -> String {
    sys.kube
        .mint_token(&MintRequest {
            namespace: "demo".into(),
            service_account: "demo".into(),
            audiences: vec![sys.info.token_audience.clone()],
            expires_in_secs: 3600,
            pod_name: Some(pod.into()),
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_answered_from_the_memo_without_asking_anyone() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys).keeping_alive();
    let token = read(&sys.info.allowed_token_file);
    warm(&sys, &client, &token).await;
    let (kube, entra) = (sys.kube.counts(), sys.entra.stats().tokens_issued);
    let first = client.post_token(&sys.info.client_id, &token).await;
    for _ in 0..20 {
        let r = client.post_token(&sys.info.client_id, &token).await;
        assert_eq!(r.status, 200, "{}", r.json);
        assert_eq!(r.json["access_token"], first.json["access_token"]);
        let left = r.json["expires_in"].as_u64().unwrap();
        assert!(
            left > 3000 && left <= 3599,
            "expires_in is what is left: {left}"
        );
        assert_eq!(r.json["token_type"], "Bearer");
    }
    let after = sys.kube.counts();
    assert_eq!(after.token_reviews, kube.token_reviews);
    assert_eq!(after.subject_access_reviews, kube.subject_access_reviews);
    assert_eq!(sys.entra.stats().tokens_issued, entra);
    assert!(memo_holds(&sys, &token));
    // A different scope is a different grant: not answered from the vault grant.
    let mut form = token_form(&sys.info.client_id, &token);
    form[2] = ("scope", "https://storage.azure.com/.default");
    let r = client.post_form("/", &form).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_ne!(r.json["access_token"], first.json["access_token"]);
    done_on_one_connection(sys, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_rbac_binding_is_refused_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    // Production TTLs (allowed 5 min): only the RBAC watch can make this fast.
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys).keeping_alive();
    let token = read(&sys.info.allowed_token_file);
    warm(&sys, &client, &token).await;

    let original = read(&sys.info.rbac_file);
    let without_binding = original.split("\n---\n").next().unwrap().to_string();
    std::fs::write(&sys.info.rbac_file, &without_binding).unwrap();
    let removed_at = Instant::now();
    let denied = eventually(Duration::from_secs(2), || async {
        client.post_token(&sys.info.client_id, &token).await.status == 403
    })
    .await;
    assert!(denied, "revocation must deny within 2 s through the memo");
    eprintln!("revocation took effect after {:?}", removed_at.elapsed());
    for _ in 0..5 {
        let r = client.post_token(&sys.info.client_id, &token).await;
        assert_eq!(r.status, 403, "stays refused: {}", r.json);
        assert!(r.json.get("access_token").is_none());
    }

    std::fs::write(&sys.info.rbac_file, &original).unwrap();
    let allowed = eventually(Duration::from_secs(2), || async {
        client.post_token(&sys.info.client_id, &token).await.status == 200
    })
    .await;
    assert!(allowed, "a re-added binding allows within 2 s");
    done_on_one_connection(sys, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_removed_from_the_bindings_file_is_refused_at_the_next_reload() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys).keeping_alive();
    let token = read(&sys.info.allowed_token_file);
    warm(&sys, &client, &token).await;

    let bindings_file = dir.path().join("bindings.yaml");
    let original = std::fs::read_to_string(&bindings_file).unwrap();
    assert!(original.contains(&sys.info.client_id), "{original}");
    std::fs::write(&bindings_file, "bindings: []\n").unwrap();
    let removed_at = Instant::now();
    // dev reloads the bindings every 500 ms.
    let refused = eventually(Duration::from_secs(2), || async {
        client.post_token(&sys.info.client_id, &token).await.status == 403
    })
    .await;
    assert!(refused, "an unbound identity is refused after the reload");
    eprintln!("unbinding took effect after {:?}", removed_at.elapsed());
    let r = client.post_token(&sys.info.client_id, &token).await;
    assert_eq!(r.status, 403, "{}", r.json);
    assert!(
        r.error_description().contains("not bound to this cluster"),
        "{}",
        r.error_description()
    );

    std::fs::write(&bindings_file, &original).unwrap();
    let allowed = eventually(Duration::from_secs(2), || async {
        client.post_token(&sys.info.client_id, &token).await.status == 200
    })
    .await;
    assert!(allowed, "bound again, the identity is served again");
    done_on_one_connection(sys, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_whose_key_left_the_jwks_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys).keeping_alive();
    let token = read(&sys.info.allowed_token_file);
    warm(&sys, &client, &token).await;

    // The cluster's keys change to a set without the key that signed `token` (here through
    // the persisted keys the proxy loads back, which go through the same key-change path as
    // a refresh from the apiserver).
    let persisted = dir.path().join("proxy/cluster-jwks.json");
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&persisted).unwrap()).unwrap();
    let other = identity_binding_proxy::exchange::keys::SigningKey::generate(2048).unwrap();
    let rotated = serde_json::json!({
        "issuer": kept["issuer"],
        "jwks": serde_json::json!({ "keys": [other.public().jwk()] }).to_string(),
    });
    std::fs::write(&persisted, rotated.to_string()).unwrap();
    let generation = sys.proxy.app.authn.generation();
    assert!(
        sys.proxy.app.authn.load_persisted(),
        "the rotated keys load"
    );
    assert_ne!(sys.proxy.app.authn.generation(), generation);
    assert!(!memo_holds(&sys, &token), "the memo no longer vouches");

    // The very next request is refused: its key is gone (and a refresh for an unknown key id
    // is not due within 10 s of the last one).
    let r = client.post_token(&sys.info.client_id, &token).await;
    assert_eq!(r.status, 401, "{}", r.json);
    assert!(
        r.error_description().contains("does not publish"),
        "{}",
        r.error_description()
    );

    // The apiserver's real keys back: the token is good again.
    sys.proxy.app.authn.refresh_keys().await.unwrap();
    let r = client.post_token(&sys.info.client_id, &token).await;
    assert_eq!(r.status, 200, "{}", r.json);
    done_on_one_connection(sys, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_tokenreview_is_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| a.tokenreview_ttl_secs = 2).await;
    let client = Client::for_dev(&sys).keeping_alive();
    let token = mint_for_pod(&sys, "web-1");
    warm(&sys, &client, &token).await;
    let reviews = sys.kube.counts().token_reviews;
    // Within the review TTL, hits ask the apiserver nothing.
    for _ in 0..5 {
        assert_eq!(
            client.post_token(&sys.info.client_id, &token).await.status,
            200
        );
    }
    assert_eq!(sys.kube.counts().token_reviews, reviews);
    // Once the answer expired, the next request reviews the token again.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert!(
        !memo_holds(&sys, &token),
        "the memo expired with the review"
    );
    assert_eq!(
        client.post_token(&sys.info.client_id, &token).await.status,
        200
    );
    assert_eq!(
        sys.kube.counts().token_reviews,
        reviews + 1,
        "one new review"
    );
    done_on_one_connection(sys, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pods_token_is_refused_within_the_review_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev_with(dir.path(), |a| a.tokenreview_ttl_secs = 2).await;
    let client = Client::for_dev(&sys).keeping_alive();
    let token = mint_for_pod(&sys, "web-1");
    warm(&sys, &client, &token).await;

    sys.kube.delete_pod("demo", "web-1");
    let deleted_at = Instant::now();
    let refused = eventually(Duration::from_secs(3), || async {
        client.post_token(&sys.info.client_id, &token).await.status == 401
    })
    .await;
    assert!(
        refused,
        "the deleted pod's token is refused within the review TTL"
    );
    let took = deleted_at.elapsed();
    eprintln!("pod deletion took effect after {took:?}");
    assert!(took <= Duration::from_millis(2500), "{took:?}");
    let r = client.post_token(&sys.info.client_id, &token).await;
    assert_eq!(r.status, 401, "{}", r.json);
    assert!(
        r.error_description().contains("deleted"),
        "{}",
        r.error_description()
    );
    done_on_one_connection(sys, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_changes_its_token_is_answered_as_the_new_tokens_caller() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys).keeping_alive();
    let allowed = read(&sys.info.allowed_token_file);
    let denied = read(&sys.info.denied_token_file);
    warm(&sys, &client, &allowed).await;

    // The connection's last token was the allowed one: the denied token right after it, on
    // the same connection, is its own caller's and is refused; and back and forth.
    for _ in 0..3 {
        let r = client.post_token(&sys.info.client_id, &denied).await;
        assert_eq!(r.status, 403, "{}", r.json);
        assert!(r.json.get("access_token").is_none());
        let r = client.post_token(&sys.info.client_id, &allowed).await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    // A token that differs from the kept one in its last byte only is not taken for it.
    let mut forged = allowed.trim().to_string();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let r = client.post_token(&sys.info.client_id, &forged).await;
    assert_eq!(r.status, 401, "{}", r.json);
    done_on_one_connection(sys, &client).await;
}
