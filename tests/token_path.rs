//! The token path end to end over real sockets: TLS by SNI, every request shape the SDKs
//! send, authentication, authorization, bindings, the exchange through one FIC, the cache —
//! and every refusal with its status, error and a description that names the cause.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use ibp_emulators::entra::Fic;
use ibp_emulators::kube::{KubeEmulator, KubeEmulatorConfig, MintRequest};

fn mint(
    sys: &identity_binding_proxy_dev::dev::DevSystem,
    ns: &str,
    sa: &str,
    aud: &str,
    expires_in: i64,
) -> String {
    sys.kube
        .mint_token(&MintRequest {
            namespace: ns.into(),
            service_account: sa.into(),
            audiences: vec![aud.into()],
            expires_in_secs: expires_in,
            pod_name: Some(format!("{sa}-pod")),
        })
        .unwrap()
}

fn assert_refused(reply: &Reply, status: u16, error: &str, needle: &str) {
    assert_eq!(
        reply.status,
        status,
        "body: {}",
        String::from_utf8_lossy(&reply.raw)
    );
    assert_eq!(reply.json["error"], error, "body: {}", reply.json);
    let d = reply.error_description();
    assert!(
        d.contains(needle),
        "description {d:?} should mention {needle:?}"
    );
    assert!(reply.json.get("access_token").is_none());
    assert!(reply.json["error_codes"]
        .as_array()
        .is_some_and(|c| !c.is_empty()));
    assert!(reply.json["correlation_id"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_shape_gets_a_token_and_repeats_come_from_cache() {
    let w = DevWorld::start().await;
    let (sys, client, info) = (&w.sys, &w.client, &w.sys.info);
    let assertion = read(&info.allowed_token_file);

    // The SDKs' shape: tenant path, form body, assertion with its trailing newline.
    let first = client
        .post_form(
            &format!("/{}/oauth2/v2.0/token", info.tenant_id),
            &token_form(&info.client_id, &assertion),
        )
        .await;
    assert_eq!(first.status, 200, "{}", first.json);
    assert_eq!(first.json["token_type"], "Bearer");
    assert!(
        first.json["expires_in"].is_u64(),
        "expires_in must be an integer"
    );
    assert!(first.json["ext_expires_in"].is_u64());
    let token = first.json["access_token"].as_str().unwrap().to_string();
    assert!(token.split('.').count() == 3);
    assert_eq!(sys.entra.stats().tokens_issued, 1);

    // The same identity and scope again, a little later: served from cache, counting down.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = client
        .post_form(
            &format!("/{}/oauth2/v2.0/token", info.tenant_id),
            &token_form(&info.client_id, assertion.trim()),
        )
        .await;
    assert_eq!(second.status, 200);
    assert_eq!(second.json["access_token"], token.as_str());
    assert!(second.json["expires_in"].as_u64() < first.json["expires_in"].as_u64());
    assert_eq!(
        sys.entra.stats().tokens_issued,
        1,
        "second request must not reach Entra"
    );

    // Root path (curl how-to, kubelet credential provider), with a proxy path prefix, and
    // Node's query string beside a body.
    for path in [
        "/",
        "/some/proxy/path",
        &format!(
            "/{}/oauth2/v2.0/token?client-request-id=3f0c5d8e-1111-2222-3333-444455556666",
            info.tenant_id
        ),
    ] {
        let r = client
            .post_form(path, &token_form(&info.client_id, &assertion))
            .await;
        assert_eq!(r.status, 200, "{path}: {}", r.json);
        assert_eq!(r.json["access_token"], token.as_str(), "{path}");
    }

    // Parameters in the query string with an empty body (sample Go programs).
    let query = identity_binding_proxy::http::form::form_encode(token_form(
        &info.client_id,
        assertion.trim(),
    ));
    let req = http::Request::post(format!("/?{query}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = client.send(req).await;
    assert_eq!(r.status, 200, "{}", r.json);

    // h2 works too.
    let ca = std::fs::read(&info.ca_file).unwrap();
    let h2 = Client::new(sys.proxy.addr, &info.sni_name, &ca, &[b"h2"]);
    let r = h2.post_token(&info.client_id, &assertion).await;
    assert_eq!(r.status, 200, "{}", r.json);

    discovery_points_back_at_the_proxy(&w).await;

    assert_eq!(
        sys.entra.stats().tokens_issued,
        1,
        "every shape was served from one exchange"
    );
    w.shutdown().await;
}

/// MSAL for Go's discovery, pointing back at the proxy (whatever Host says); instance
/// discovery is 404.
async fn discovery_points_back_at_the_proxy(w: &DevWorld) {
    let (client, info) = (&w.client, &w.sys.info);
    let req = http::Request::get(format!(
        "/{}/v2.0/.well-known/openid-configuration",
        info.tenant_id
    ))
    .header("host", "127.0.0.1:8443")
    .body(Full::new(Bytes::new()))
    .unwrap();
    let r = client.send(req).await;
    assert_eq!(r.status, 200);
    // Built from the SNI name the connection is served under, never from Host.
    assert_eq!(
        r.json["token_endpoint"],
        format!(
            "https://{}/{}/oauth2/v2.0/token",
            info.sni_name, info.tenant_id
        )
    );
    let req = http::Request::get("/common/discovery/instance?api-version=1.1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(client.send(req).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_their_cause() {
    let w = DevWorld::start().await;
    refuses_requests_it_cannot_read(&w).await;
    refuses_assertions_it_cannot_trust(&w).await;
    refuses_callers_without_a_grant(&w).await;
    refuses_a_tenant_that_is_not_the_identitys(&w).await;
    passes_entras_refusal_through(&w).await;
    assert_eq!(
        w.sys.entra.stats().tokens_issued,
        0,
        "no refusal may reach a token"
    );
    w.shutdown().await;
}

/// JSON instead of a form, a missing field, a client_id that is not a GUID: 400.
async fn refuses_requests_it_cannot_read(w: &DevWorld) {
    let client = &w.client;
    let good = read(&w.sys.info.allowed_token_file);
    let cid = w.sys.info.client_id.as_str();

    let req = http::Request::post("/")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            b"{\"grant_type\":\"client_credentials\"}",
        )))
        .unwrap();
    assert_refused(
        &client.send(req).await,
        400,
        "invalid_request",
        "application/x-www-form-urlencoded",
    );

    let mut form = token_form(cid, &good);
    form.retain(|(k, _)| *k != "scope");
    assert_refused(
        &client.post_form("/", &form).await,
        400,
        "invalid_request",
        "'scope'",
    );

    assert_refused(
        &client.post_token("../../etc", &good).await,
        400,
        "invalid_request",
        "not a GUID",
    );
}

/// Garbage, an expired token, the wrong audience, another cluster's token, `alg: none`: 401.
async fn refuses_assertions_it_cannot_trust(w: &DevWorld) {
    let client = &w.client;
    let good = read(&w.sys.info.allowed_token_file);
    let cid = w.sys.info.client_id.as_str();

    assert_refused(
        &client.post_token(cid, "garbage").await,
        401,
        "invalid_client",
        "not a JWT",
    );

    let aud = serve_default("token-audience");
    let expired = mint(&w.sys, "demo", "demo", &aud, -3600);
    assert_refused(
        &client.post_token(cid, &expired).await,
        401,
        "invalid_client",
        "expired",
    );

    let wrong_aud = mint(
        &w.sys,
        "demo",
        "demo",
        "https://kubernetes.default.svc",
        3600,
    );
    assert_refused(
        &client.post_token(cid, &wrong_aud).await,
        401,
        "invalid_client",
        &aud,
    );

    let foreign = another_clusters_token(&aud).await;
    assert_refused(
        &client.post_token(cid, &foreign).await,
        401,
        "invalid_client",
        "does not publish",
    );

    // alg: none, with the claims of a valid token.
    let claims = good.trim().split('.').nth(1).unwrap();
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
    assert_refused(
        &client.post_token(cid, &none).await,
        401,
        "invalid_client",
        "'none' is refused",
    );
}

/// A valid token for `demo/demo` from another cluster (another issuer and key).
async fn another_clusters_token(aud: &str) -> String {
    let other_dir = tempfile::tempdir().unwrap();
    let other = KubeEmulator::start(KubeEmulatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: other_dir.path().to_path_buf(),
        rbac_file: None,
        issuer: Some("https://other-cluster.example/issuer".into()),
    })
    .await
    .unwrap();
    let foreign = other
        .mint_token(&MintRequest {
            namespace: "demo".into(),
            service_account: "demo".into(),
            audiences: vec![aud.into()],
            expires_in_secs: 3600,
            pod_name: None,
        })
        .unwrap();
    other.shutdown().await;
    foreign
}

/// A service account without a grant, and a client-id not bound to this cluster: 403.
async fn refuses_callers_without_a_grant(w: &DevWorld) {
    let (client, info) = (&w.client, &w.sys.info);
    let good = read(&info.allowed_token_file);
    let cid = info.client_id.as_str();

    // 403 naming verb, group and resource.
    let denied = read(&info.denied_token_file);
    let r = client.post_token(cid, &denied).await;
    assert_refused(&r, 403, "unauthorized_client", "use-managed-identity");
    let d = r.error_description();
    assert!(
        d.contains("cid.wi.aks.azure.com") && d.contains(cid) && d.contains("demo/intruder"),
        "{d}"
    );

    // A client-id not bound to this cluster: refused like any identity without a grant, so
    // the caller learns nothing about the bindings...
    let unbound = "99999999-8888-7777-6666-555555555555";
    assert_refused(
        &client.post_token(unbound, &good).await,
        403,
        "unauthorized_client",
        "is not allowed to use managed identity",
    );
    // ...and once the caller is granted it, the refusal says the identity is not bound.
    let rbac = read(&info.rbac_file);
    let granted = rbac.replace(
        &format!("resources: [\"{cid}\"]"),
        &format!("resources: [\"{cid}\", \"{unbound}\"]"),
    );
    assert_ne!(rbac, granted, "the demo RBAC names the identity");
    std::fs::write(&info.rbac_file, granted).unwrap();
    let not_bound = eventually(Duration::from_secs(3), || async {
        client
            .post_token(unbound, &good)
            .await
            .error_description()
            .contains("not bound")
    })
    .await;
    assert!(
        not_bound,
        "a granted but unbound identity is named as not bound"
    );
    std::fs::write(&info.rbac_file, rbac).unwrap();
}

/// A tenant in the path that is not the identity's: 400 naming the identity's tenant.
async fn refuses_a_tenant_that_is_not_the_identitys(w: &DevWorld) {
    let good = read(&w.sys.info.allowed_token_file);
    let r = w
        .client
        .post_form(
            "/00000000-0000-0000-0000-000000000001/oauth2/v2.0/token",
            &token_form(&w.sys.info.client_id, &good),
        )
        .await;
    assert_refused(&r, 400, "invalid_request", &w.sys.info.tenant_id);
}

/// Entra's FIC does not match our assertion: its AADSTS error is passed through.
async fn passes_entras_refusal_through(w: &DevWorld) {
    let (sys, info) = (&w.sys, &w.sys.info);
    let good = read(&info.allowed_token_file);
    let cid = info.client_id.as_str();
    assert!(sys.entra.remove_fic(cid, "identity-binding-proxy"));
    let issuer = info
        .issuer_url
        .replace("{tenant}", &info.tenant_id)
        .replace("{client_id}", cid);
    sys.entra
        .add_fic(Fic {
            client_id: cid.into(),
            issuer,
            subject: "someone-else".into(),
            audience: "api://AzureADTokenExchange".into(),
            name: "wrong-subject".into(),
        })
        .unwrap();
    let r = w.client.post_token(cid, &good).await;
    assert_eq!(
        r.status, 401,
        "Entra's status is passed through: {}",
        r.json
    );
    assert_eq!(r.json["error"], "invalid_client");
    assert!(
        r.json["error_codes"][0]
            .as_u64()
            .is_some_and(|c| c == 700213 || c == 70021),
        "{}",
        r.json
    );
    assert!(r.error_description().starts_with("AADSTS"), "{}", r.json);
    assert!(r.json.get("access_token").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_is_refused_at_the_handshake() {
    let w = DevWorld::start().await;
    let ca = std::fs::read(&w.sys.info.ca_file).unwrap();
    let stranger = Client::new(w.sys.proxy.addr, "not-served.example", &ca, &[b"http/1.1"]);
    let Err(err) = stranger.connect().await else {
        panic!("the handshake must fail for a name we do not serve");
    };
    assert!(
        err.to_string().to_lowercase().contains("unrecogni"),
        "{err}"
    );
    // The served name still works.
    assert!(w.client.connect().await.is_ok());
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_added_to_the_rbac_file_takes_effect() {
    let w = DevWorld::start().await;
    let (client, info) = (&w.client, &w.sys.info);
    let denied = read(&info.denied_token_file);
    let r = client.post_token(&info.client_id, &denied).await;
    assert_eq!(r.status, 403);

    let mut rbac = read(&info.rbac_file);
    rbac.push_str(
        "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: intruder-too\n  namespace: demo\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: use-demo-identity\nsubjects:\n  - kind: ServiceAccount\n    name: intruder\n    namespace: demo\n",
    );
    std::fs::write(&info.rbac_file, rbac).unwrap();
    let granted = eventually(Duration::from_secs(10), || async {
        client.post_token(&info.client_id, &denied).await.status == 200
    })
    .await;
    assert!(
        granted,
        "the new RoleBinding must grant within the denied-decision TTL"
    );
    w.shutdown().await;
}
