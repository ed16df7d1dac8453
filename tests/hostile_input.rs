//! A corpus of hostile and malformed token requests against a whole dev system over real TLS.
//! Every case states the exact status, the OAuth `error`, and a fragment of the description
//! that names the cause; refusals never carry an `access_token`. A few positive controls
//! (HTTP/1.0, chunked bodies, an audience list with ours not first) must be served. After the
//! corpus the proxy must still serve a good request and answer its health checks.

mod common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use identity_binding_proxy::dev::DevSystem;
use identity_binding_proxy::emulators::kube::{KubeEmulator, KubeEmulatorConfig};
use identity_binding_proxy::keys::SigningKey;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};

const AUD: &str = "api://AKSIdentityBinding";

/// How a case reaches the proxy.
#[allow(clippy::large_enum_variant)] // a test table: a few hundred values at most
enum Send {
    /// A form POST to `path` (HTTP/1.1 through hyper's client).
    Form(String, Vec<(String, String)>),
    /// Any request, through hyper's client.
    Request(http::Request<Full<Bytes>>),
    /// Raw bytes on a TLS connection; the replies to read.
    Raw(Vec<u8>, usize),
}

/// What the proxy must answer.
enum Expect {
    /// An Entra-shaped refusal.
    Refused {
        status: u16,
        error: &'static str,
        needle: String,
    },
    /// Refused by the HTTP layer before the handler (no JSON body possible).
    Transport(u16),
    /// A positive control: served with a token.
    Served,
}

struct Case {
    name: String,
    send: Send,
    expect: Vec<Expect>,
}

fn refused(status: u16, error: &'static str, needle: impl Into<String>) -> Expect {
    Expect::Refused {
        status,
        error,
        needle: needle.into(),
    }
}

/// The pieces needed to forge tokens: the cluster's own signing key and issuer.
struct Forge {
    key: SigningKey,
    pem: String,
    issuer: String,
}

impl Forge {
    fn new(sys: &DevSystem, dir: &std::path::Path) -> Self {
        let pem = std::fs::read_to_string(dir.join("kube/sa-signing-key.pem")).unwrap();
        Self {
            key: SigningKey::from_pem(&pem).unwrap(),
            pem,
            issuer: sys.kube.issuer(),
        }
    }

    fn claims(&self, sa: &str) -> Value {
        let now = now();
        json!({
            "aud": [AUD], "exp": now + 3600, "iat": now, "nbf": now, "iss": self.issuer,
            "jti": uuid::Uuid::new_v4().to_string(),
            "sub": format!("system:serviceaccount:demo:{sa}"),
            "kubernetes.io": {
                "namespace": "demo",
                "serviceaccount": {"name": sa, "uid": identity_binding_proxy::emulators::kube::service_account_uid("demo", sa)},
                "pod": {"name": format!("{sa}-pod"), "uid": identity_binding_proxy::emulators::kube::pod_uid("demo", &format!("{sa}-pod"))}
            }
        })
    }

    /// Signs `claims` with the cluster key under an arbitrary header (RS256 signature).
    fn sign_rs256(&self, header: Value, claims: &Value) -> String {
        let key = EncodingKey::from_rsa_pem(self.pem.as_bytes()).unwrap();
        sign_with(header, claims, &key, Algorithm::RS256)
    }

    /// The usual header: RS256 with the cluster key's kid.
    fn header(&self) -> Value {
        json!({"alg": "RS256", "typ": "JWT", "kid": self.key.kid()})
    }
}

fn sign_with(header: Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let signing_input = format!("{}.{}", b64(&header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(signing_input.as_bytes(), key, alg).unwrap();
    format!("{signing_input}.{sig}")
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn form_body(p: &[(String, String)]) -> String {
    identity_binding_proxy::http::form_encode(p.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// The good form with one field replaced (or removed when `value` is None).
fn with(base: &[(String, String)], field: &str, value: Option<&str>) -> Vec<(String, String)> {
    let mut out: Vec<_> = base.iter().filter(|(k, _)| k != field).cloned().collect();
    if let Some(v) = value {
        out.push((field.to_string(), v.to_string()));
    }
    out
}

fn check(case: &str, status: u16, json: &Value, raw: &[u8], expect: &Expect) {
    let body = String::from_utf8_lossy(raw);
    match expect {
        Expect::Refused {
            status: want,
            error,
            needle,
        } => {
            assert_eq!(status, *want, "{case}: body {body}");
            assert_eq!(json["error"], *error, "{case}: body {body}");
            let d = json["error_description"].as_str().unwrap_or("");
            assert!(
                d.contains(needle.as_str()),
                "{case}: description {d:?} should name the cause ({needle:?})"
            );
            assert!(
                !d.contains('\r') && !d.contains('\n'),
                "{case}: the description must be one line: {d:?}"
            );
            assert!(
                json["error_codes"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty()),
                "{case}: {body}"
            );
            assert!(json.get("access_token").is_none(), "{case}: {body}");
        }
        Expect::Transport(want) => {
            assert_eq!(status, *want, "{case}: body {body}");
            assert!(!body.contains("access_token"), "{case}: {body}");
        }
        Expect::Served => {
            assert_eq!(status, 200, "{case}: body {body}");
            assert!(json["access_token"].is_string(), "{case}: {body}");
            assert!(json["expires_in"].is_u64(), "{case}: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_precisely_and_the_proxy_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let sys = start_dev(dir.path()).await;
    let client = Client::for_dev(&sys);
    let info = sys.info.clone();
    let cid = info.client_id.clone();
    let tenant = info.tenant_id.clone();
    let token_path = format!("/{tenant}/oauth2/v2.0/token");
    let good_token = read(&info.allowed_token_file).trim().to_string();
    let denied_token = read(&info.denied_token_file).trim().to_string();
    let good = pairs(&token_form(&cid, &good_token));
    let forge = Forge::new(&sys, dir.path());
    let host = info.sni_name.clone();

    let mut cases: Vec<Case> = Vec::new();
    let mut add = |name: &str, send: Send, expect: Expect| {
        cases.push(Case {
            name: name.to_string(),
            send,
            expect: vec![expect],
        })
    };
    let assertion = |t: &str| with(&good, "client_assertion", Some(t));
    let form = |p: Vec<(String, String)>| Send::Form("/".into(), p);

    // ---- The JOSE header: algorithms and key ids.
    let claims = forge.claims("demo");
    let payload = b64(&claims);
    for alg in ["none", "None", "NONE", ""] {
        let t = format!("{}.{payload}.", b64(&json!({"alg": alg, "typ": "JWT"})));
        add(
            &format!("alg {alg:?}"),
            form(assertion(&t)),
            refused(401, "invalid_client", format!("'{alg}' is refused")),
        );
    }
    let public_pem = forge.key.public().to_pem();
    let public_jwk = serde_json::to_vec(&forge.key.public().jwk()).unwrap();
    for (alg, secret, what) in [
        (
            Algorithm::HS256,
            public_pem.as_bytes().to_vec(),
            "HS256 keyed with the public PEM",
        ),
        (
            Algorithm::HS256,
            public_jwk,
            "HS256 keyed with the public JWK",
        ),
        (
            Algorithm::HS512,
            public_pem.as_bytes().to_vec(),
            "HS512 keyed with the public PEM",
        ),
    ] {
        let name = format!("{alg:?}");
        let t = sign_with(
            json!({"alg": name, "typ": "JWT", "kid": forge.key.kid()}),
            &claims,
            &EncodingKey::from_secret(&secret),
            alg,
        );
        add(
            what,
            form(assertion(&t)),
            refused(401, "invalid_client", format!("'{name}' is refused")),
        );
    }
    // An HMAC signature under a header that claims RS256: the signature check catches it.
    let hmac_as_rs = {
        let input = format!("{}.{payload}", b64(&forge.header()));
        let sig = jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &EncodingKey::from_secret(public_pem.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{input}.{sig}")
    };
    add(
        "RS256 header over an HMAC signature",
        form(assertion(&hmac_as_rs)),
        refused(401, "invalid_client", "signature is not valid"),
    );
    let unknown_kid =
        forge.sign_rs256(json!({"alg": "RS256", "kid": "not-a-key-we-know"}), &claims);
    add(
        "unknown kid",
        form(assertion(&unknown_kid)),
        refused(401, "invalid_client", "'not-a-key-we-know'"),
    );
    for kid in [
        "../../../etc/passwd",
        "/openid/v1/jwks?x=",
        "a\r\nX-Injected: 1",
        "%2e%2e%2f",
    ] {
        let t = forge.sign_rs256(json!({"alg": "RS256", "kid": kid}), &claims);
        add(
            &format!("kid {kid:?}"),
            form(assertion(&t)),
            refused(401, "invalid_client", "does not publish"),
        );
    }
    let no_kid = forge.sign_rs256(json!({"alg": "RS256", "typ": "JWT"}), &claims);
    add(
        "no kid",
        form(assertion(&no_kid)),
        refused(401, "invalid_client", "names no signing key"),
    );
    let es_header = forge.sign_rs256(json!({"alg": "ES256", "kid": forge.key.kid()}), &claims);
    add(
        "ES256 header with the cluster's RSA kid",
        form(assertion(&es_header)),
        refused(401, "invalid_client", "'ES256'"),
    );
    let attacker = SigningKey::generate(2048).unwrap();
    let attacker_enc = EncodingKey::from_rsa_pem(attacker.private_pem().as_bytes()).unwrap();
    let t = sign_with(forge.header(), &claims, &attacker_enc, Algorithm::RS256);
    add(
        "the cluster's kid over another key's signature",
        form(assertion(&t)),
        refused(401, "invalid_client", "signature is not valid"),
    );
    let t = sign_with(
        json!({"alg": "RS256", "kid": attacker.kid(), "jku": "http://127.0.0.1:1/jwks", "jwk": attacker.public().jwk()}),
        &claims,
        &attacker_enc,
        Algorithm::RS256,
    );
    add(
        "embedded jwk and jku are never trusted",
        form(assertion(&t)),
        refused(401, "invalid_client", "does not publish"),
    );

    // ---- Signature and structure.
    let mut tampered = claims.clone();
    tampered["kubernetes.io"]["serviceaccount"]["name"] = json!("admin");
    tampered["sub"] = json!("system:serviceaccount:demo:admin");
    let parts: Vec<&str> = good_token.split('.').collect();
    add(
        "payload swapped under a valid signature",
        form(assertion(&format!(
            "{}.{}.{}",
            parts[0],
            b64(&tampered),
            parts[2]
        ))),
        refused(401, "invalid_client", "signature is not valid"),
    );
    add(
        "signature stripped",
        form(assertion(&format!("{}.{}.", parts[0], parts[1]))),
        refused(401, "invalid_client", "signature is not valid"),
    );
    for (what, t) in [
        (
            "broken base64 in the header",
            format!("!!!.{}.{}", parts[1], parts[2]),
        ),
        (
            "header is not JSON",
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode("{alg:"),
                parts[1],
                parts[2]
            ),
        ),
        (
            "header is not UTF-8",
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode([0xff, 0xfe, 0x7b]),
                parts[1],
                parts[2]
            ),
        ),
        ("two segments", format!("{}.{}", parts[0], parts[1])),
        ("four segments", format!("{good_token}.x")),
        ("a JWE (five segments)", format!("{}.a.b.c.d", parts[0])),
        ("not a token at all", "hello".into()),
    ] {
        add(
            what,
            form(assertion(&t)),
            refused(401, "invalid_client", "not a JWT"),
        );
    }
    // Payloads that are validly signed by the cluster key but cannot be read.
    let signed_raw = |payload: &str| {
        let input = format!("{}.{payload}", b64(&forge.header()));
        let key = EncodingKey::from_rsa_pem(forge.pem.as_bytes()).unwrap();
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::RS256).unwrap();
        format!("{input}.{sig}")
    };
    for (what, t) in [
        ("broken base64 in the payload", signed_raw("!!!")),
        (
            "payload is not JSON",
            forge.sign_rs256(forge.header(), &json!("just a string")),
        ),
        (
            "payload is not UTF-8",
            signed_raw(&URL_SAFE_NO_PAD.encode([0xc3, 0x28])),
        ),
    ] {
        add(
            what,
            form(assertion(&t)),
            refused(401, "invalid_client", "could not be read"),
        );
    }

    // ---- Times.
    add(
        "expired",
        form(assertion(&mint_sa(&sys, "demo", "demo", &[AUD], -3600))),
        refused(401, "invalid_client", "expired"),
    );
    let mut future = claims.clone();
    future["nbf"] = json!(now() + 3600);
    future["iat"] = json!(now() + 3600);
    future["exp"] = json!(now() + 7200);
    add(
        "not yet valid",
        form(assertion(&forge.sign_rs256(forge.header(), &future))),
        refused(401, "invalid_client", "not valid yet"),
    );
    let mut no_exp = claims.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    add(
        "missing exp",
        form(assertion(&forge.sign_rs256(forge.header(), &no_exp))),
        refused(401, "invalid_client", "'exp'"),
    );
    let mut string_exp = claims.clone();
    string_exp["exp"] = json!("tomorrow");
    add(
        "exp is a string",
        form(assertion(&forge.sign_rs256(forge.header(), &string_exp))),
        refused(401, "invalid_client", "could not be read"),
    );

    // ---- Audience, issuer, cluster, claims.
    add(
        "wrong audience",
        form(assertion(&mint_sa(
            &sys,
            "demo",
            "demo",
            &["https://kubernetes.default.svc"],
            3600,
        ))),
        refused(401, "invalid_client", AUD),
    );
    add(
        "audience in a different case",
        form(assertion(&mint_sa(
            &sys,
            "demo",
            "demo",
            &["API://aksidentitybinding"],
            3600,
        ))),
        refused(401, "invalid_client", AUD),
    );
    let mut wrong_iss = claims.clone();
    wrong_iss["iss"] = json!("https://evil.example/issuer");
    add(
        "wrong issuer under the cluster key",
        form(assertion(&forge.sign_rs256(forge.header(), &wrong_iss))),
        refused(401, "invalid_client", "https://evil.example/issuer"),
    );
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
        .mint_token(&identity_binding_proxy::emulators::kube::MintRequest {
            namespace: "demo".into(),
            service_account: "demo".into(),
            audiences: vec![AUD.into()],
            expires_in_secs: 3600,
            pod_name: None,
        })
        .unwrap();
    other.shutdown().await;
    add(
        "token of another cluster",
        form(assertion(&foreign)),
        refused(401, "invalid_client", "another cluster"),
    );
    let mut no_kube = claims.clone();
    no_kube.as_object_mut().unwrap().remove("kubernetes.io");
    add(
        "no kubernetes.io claim",
        form(assertion(&forge.sign_rs256(forge.header(), &no_kube))),
        refused(401, "invalid_client", "'kubernetes.io'"),
    );
    let mut sub_mismatch = claims.clone();
    sub_mismatch["sub"] = json!("system:serviceaccount:kube-system:admin");
    add(
        "sub disagrees with the kubernetes.io claim",
        form(assertion(&forge.sign_rs256(forge.header(), &sub_mismatch))),
        refused(401, "invalid_client", "subject does not match"),
    );
    let deleted = mint_sa(&sys, "demo", "ghost", &[AUD], 3600);
    sys.kube.delete_service_account("demo", "ghost");
    add(
        "token of a deleted service account",
        form(assertion(&deleted)),
        refused(401, "invalid_client", "did not accept"),
    );
    add(
        "positive control: audience list with ours not first",
        form(assertion(&mint_sa(
            &sys,
            "demo",
            "demo",
            &["https://kubernetes.default.svc", AUD],
            3600,
        ))),
        Expect::Served,
    );

    // ---- Sizes.
    let big = format!("{}.{}.{}", parts[0], "A".repeat(17 * 1024), parts[2]);
    add(
        "17 KiB token (over the assertion limit, under the body limit)",
        form(assertion(&big)),
        refused(401, "invalid_client", "more than the 16384 accepted"),
    );
    let mib = "A".repeat(1024 * 1024);
    add(
        "1 MiB token in the body",
        Send::Raw(
            raw_post("HTTP/1.1", "/", &host, &form_body(&assertion(&mib))),
            1,
        ),
        refused(400, "invalid_request", "larger than 20480 bytes"),
    );
    add(
        "1 MiB token in the query string",
        Send::Raw(
            format!(
                "POST /?client_assertion={mib} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"
            )
            .into_bytes(),
            1,
        ),
        Expect::Transport(431),
    );
    add(
        "body over the limit with Content-Length",
        Send::Raw(
            raw_post(
                "HTTP/1.1",
                "/",
                &host,
                &form_body(&with(&good, "padding", Some(&"x".repeat(70 * 1024)))),
            ),
            1,
        ),
        refused(400, "invalid_request", "larger than 20480 bytes"),
    );
    {
        let body = form_body(&with(&good, "padding", Some(&"x".repeat(70 * 1024))));
        let mut raw = format!(
            "POST {token_path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for chunk in body.as_bytes().chunks(4096) {
            raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            raw.extend_from_slice(chunk);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        add(
            "chunked body over the limit",
            Send::Raw(raw, 1),
            refused(400, "invalid_request", "larger than 20480 bytes"),
        );
    }
    {
        let body = form_body(&good);
        let mut raw = format!(
            "POST {token_path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for chunk in body.as_bytes().chunks(100) {
            raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            raw.extend_from_slice(chunk);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        add(
            "positive control: chunked body",
            Send::Raw(raw, 1),
            Expect::Served,
        );
    }

    // ---- client_id.
    for (what, v) in [
        ("client_id *", "*".to_string()),
        ("client_id ../", "../".into()),
        ("client_id ../../etc/passwd", "../../etc/passwd".into()),
        ("client_id empty", String::new()),
        ("client_id 10 KB", "a".repeat(10 * 1024)),
        ("client_id GUID in braces", format!("{{{cid}}}")),
        ("client_id GUID with a NUL", format!("{}\0", &cid[..35])),
        (
            "client_id fullwidth digits",
            "１１１１１１１１-2222-3333-4444-555555555555".into(),
        ),
        ("client_id with CR/LF", format!("{}\r\n", &cid[..34])),
    ] {
        add(
            what,
            form(with(&good, "client_id", Some(&v))),
            refused(400, "invalid_request", "is not a GUID"),
        );
    }
    add(
        "client_id missing",
        form(with(&good, "client_id", None)),
        refused(400, "invalid_request", "'client_id'"),
    );
    add(
        "client_id neither granted nor bound (refused before the bindings are read)",
        form(with(
            &good,
            "client_id",
            Some("99999999-8888-7777-6666-555555555555"),
        )),
        refused(
            403,
            "unauthorized_client",
            "is not allowed to use managed identity '99999999-8888-7777-6666-555555555555'",
        ),
    );
    add(
        "service account without a grant",
        form(assertion(&denied_token)),
        refused(403, "unauthorized_client", "use-managed-identity"),
    );

    // ---- Parameter pollution.
    for field in [
        "client_id",
        "client_assertion",
        "scope",
        "grant_type",
        "client_assertion_type",
    ] {
        let mut p = good.clone();
        let value = p.iter().find(|(k, _)| k == field).unwrap().1.clone();
        p.push((field.to_string(), value));
        add(
            &format!("{field} twice"),
            form(p),
            refused(
                400,
                "invalid_request",
                format!("'{field}' was given more than once"),
            ),
        );
    }
    {
        let body = format!(
            "{}&client%5Fid=99999999-8888-7777-6666-555555555555",
            form_body(&good)
        );
        add(
            "client_id twice, once percent-encoded",
            Send::Raw(raw_post("HTTP/1.1", "/", &host, &body), 1),
            refused(
                400,
                "invalid_request",
                "'client_id' was given more than once",
            ),
        );
    }
    {
        // Body and query are never merged: the body's missing scope is not taken from the query.
        let q = form_body(&good);
        let body = form_body(&with(&good, "scope", None));
        add(
            "scope only in the query beside a body",
            Send::Raw(raw_post("HTTP/1.1", &format!("/?{q}"), &host, &body), 1),
            refused(400, "invalid_request", "'scope'"),
        );
    }

    // ---- grant and assertion type.
    for (what, field, value, status, error, needle) in [
        (
            "grant_type password",
            "grant_type",
            Some("password"),
            400,
            "unsupported_grant_type",
            "'password' is not supported",
        ),
        (
            "grant_type with a trailing space",
            "grant_type",
            Some("client_credentials "),
            400,
            "unsupported_grant_type",
            "is not supported",
        ),
        (
            "grant_type missing",
            "grant_type",
            None,
            400,
            "invalid_request",
            "'grant_type'",
        ),
        (
            "assertion type saml",
            "client_assertion_type",
            Some("urn:ietf:params:oauth:client-assertion-type:saml2-bearer"),
            400,
            "invalid_request",
            "is not supported",
        ),
        (
            "assertion type missing",
            "client_assertion_type",
            None,
            400,
            "invalid_request",
            "'client_assertion_type'",
        ),
        (
            "assertion missing",
            "client_assertion",
            None,
            400,
            "invalid_request",
            "'client_assertion'",
        ),
        (
            "assertion only white space",
            "client_assertion",
            Some(" \n\t "),
            400,
            "invalid_request",
            "'client_assertion'",
        ),
    ] {
        add(
            what,
            form(with(&good, field, value)),
            refused(status, error, needle),
        );
    }

    // ---- Scopes.
    let hundred = (0..100)
        .map(|i| format!("https://r{i}.example/.default"))
        .collect::<Vec<_>>()
        .join(" ");
    for (what, value, status, error, needle) in [
        (
            "scope missing",
            None,
            400,
            "invalid_request",
            "'scope'".to_string(),
        ),
        (
            "scope empty",
            Some("   "),
            400,
            "invalid_request",
            "'scope'".into(),
        ),
        (
            "100 scopes",
            Some(hundred.as_str()),
            400,
            "invalid_scope",
            "More than 8 scopes were requested".into(),
        ),
        (
            "delegated scope",
            Some("https://graph.microsoft.com/User.Read"),
            400,
            "invalid_scope",
            "is not a '<resource>/.default' scope".into(),
        ),
        (
            "openid scope",
            Some("openid"),
            400,
            "invalid_scope",
            "'openid'".into(),
        ),
        (
            "scope with CR/LF",
            Some("https://vault.azure.net/.default\r\nX: y"),
            400,
            "invalid_scope",
            "'X:'".into(),
        ),
        (
            "scope led by a no-break space",
            Some("\u{a0}https://vault.azure.net/.default"),
            400,
            "invalid_scope",
            "U+00A0".into(),
        ),
        (
            "scope with an em space inside",
            Some("https://vault.azure.net/.default\u{2003}https://vault.azure.net/.default"),
            400,
            "invalid_scope",
            "U+2003".into(),
        ),
        (
            "scope with a Cyrillic letter in the host",
            Some("https://v\u{0430}ult.azure.net/.default"),
            400,
            "invalid_scope",
            "U+0430".into(),
        ),
        (
            "scope with a NUL byte",
            Some("https://vault.azure.net/.default\u{0}"),
            400,
            "invalid_scope",
            "U+0000".into(),
        ),
    ] {
        add(
            what,
            form(with(&good, "scope", value)),
            refused(status, error, needle),
        );
    }

    // ---- Content type and encoding.
    let body = form_body(&good);
    for (what, ct, needle) in [
        (
            "JSON content type",
            Some("application/json"),
            "'application/json' is not supported",
        ),
        (
            "multipart content type",
            Some("multipart/form-data; boundary=x"),
            "'multipart/form-data' is not supported",
        ),
        (
            "text/plain content type",
            Some("text/plain"),
            "'text/plain' is not supported",
        ),
        ("no content type", None, "no Content-Type"),
    ] {
        let mut b = http::Request::post("/");
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        add(
            what,
            Send::Request(b.body(Full::new(Bytes::from(body.clone()))).unwrap()),
            refused(400, "invalid_request", needle),
        );
    }
    {
        let mut raw_body = body.clone().into_bytes();
        raw_body.extend_from_slice(b"&x=\xff\xfe");
        let mut req = format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
            raw_body.len()
        )
        .into_bytes();
        req.extend_from_slice(&raw_body);
        add(
            "body is not UTF-8",
            Send::Raw(req, 1),
            refused(400, "invalid_request", "not valid UTF-8"),
        );
    }
    add(
        "empty body and no query",
        Send::Request(
            http::Request::post("/")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
        refused(400, "invalid_request", "'grant_type'"),
    );

    // ---- Tenant in the path.
    for (what, t) in [
        (
            "another tenant in the path",
            "00000000-0000-0000-0000-000000000001",
        ),
        ("organizations in the path", "organizations"),
        ("encoded traversal as the tenant", "..%2F..%2Fetc"),
        ("a domain-shaped tenant in the path", "evil.example.com"),
        (
            "a look-alike onmicrosoft domain in the path",
            "contoso.onmicrosoft.com",
        ),
    ] {
        add(
            what,
            Send::Form(format!("/{t}/oauth2/v2.0/token"), good.clone()),
            refused(
                400,
                "invalid_request",
                format!("bound to tenant '{tenant}'"),
            ),
        );
    }

    // ---- Methods and paths.
    for m in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        add(
            &format!("{m} on the token path"),
            Send::Request(
                http::Request::builder()
                    .method(m)
                    .uri(&token_path)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            ),
            refused(405, "invalid_request", format!("{m} is not allowed")),
        );
    }
    add(
        "PUT on the root path",
        Send::Request(
            http::Request::put("/")
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap(),
        ),
        refused(404, "invalid_request", "is not served here"),
    );
    add(
        "POST on the discovery path",
        Send::Request(
            http::Request::post(format!("/{tenant}/v2.0/.well-known/openid-configuration"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
        refused(405, "invalid_request", "POST is not allowed"),
    );

    // ---- HTTP/1.0, pipelining, framing.
    add(
        "positive control: HTTP/1.0",
        Send::Raw(raw_post("HTTP/1.0", &token_path, &host, &body), 1),
        Expect::Served,
    );
    add(
        "HTTP/1.0 with a denied token",
        Send::Raw(
            raw_post(
                "HTTP/1.0",
                &token_path,
                &host,
                &form_body(&assertion(&denied_token)),
            ),
            1,
        ),
        refused(403, "unauthorized_client", "demo/intruder"),
    );
    {
        let mut raw = raw_post(
            "HTTP/1.1",
            &token_path,
            &host,
            &form_body(&with(&good, "scope", None)),
        );
        raw.extend(raw_post(
            "HTTP/1.1",
            &token_path,
            &host,
            &form_body(&assertion(&denied_token)),
        ));
        raw.extend(raw_post("HTTP/1.1", &token_path, &host, &body));
        cases.push(Case {
            name: "three pipelined requests answered in order".into(),
            send: Send::Raw(raw, 3),
            expect: vec![
                refused(400, "invalid_request", "'scope'"),
                refused(403, "unauthorized_client", "demo/intruder"),
                Expect::Served,
            ],
        });
    }
    let mut add = |name: &str, send: Send, expect: Expect| {
        cases.push(Case {
            name: name.to_string(),
            send,
            expect: vec![expect],
        })
    };
    add(
        "Content-Length and Transfer-Encoding together (smuggling)",
        Send::Raw(
            format!(
                "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            1,
        ),
        Expect::Transport(400),
    );
    add(
        "two different Content-Length headers",
        Send::Raw(
            format!(
                "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
            )
            .into_bytes(),
            1,
        ),
        Expect::Transport(400),
    );
    add(
        "bare LF in the request head",
        Send::Raw(
            format!("POST / HTTP/1.1\r\nHost: {host}\r\nX-A: b\nc\r\nContent-Length: 0\r\n\r\n")
                .into_bytes(),
            1,
        ),
        Expect::Transport(400),
    );
    add(
        "200 headers",
        Send::Raw(
            format!(
                "POST / HTTP/1.1\r\nHost: {host}\r\n{}Content-Length: 0\r\n\r\n",
                (0..200)
                    .map(|i| format!("X-H{i}: v\r\n"))
                    .collect::<String>()
            )
            .into_bytes(),
            1,
        ),
        Expect::Transport(431),
    );

    // ---- Run the corpus.
    let total: usize = cases.iter().map(|c| c.expect.len()).sum();
    assert!(total >= 60, "the corpus has only {total} cases");
    for case in cases {
        match case.send {
            Send::Form(path, p) => {
                let p: Vec<(&str, &str)> =
                    p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let r = client.post_form(&path, &p).await;
                check(&case.name, r.status, &r.json, &r.raw, &case.expect[0]);
            }
            Send::Request(req) => {
                let r = client.send(req).await;
                check(&case.name, r.status, &r.json, &r.raw, &case.expect[0]);
            }
            Send::Raw(bytes, n) => {
                let replies = raw_exchange(&client, bytes, n).await;
                assert_eq!(replies.len(), n, "{}: replies", case.name);
                for (reply, expect) in replies.iter().zip(&case.expect) {
                    check(&case.name, reply.status, &reply.json, &reply.body, expect);
                }
            }
        }
    }

    // ---- h2: many concurrent streams on one connection, good and denied interleaved.
    let ca = std::fs::read(&info.ca_file).unwrap();
    let h2 = Client::new(sys.proxy.addr, &info.sni_name, &ca, &[b"h2"]);
    // Asserts that ALPN chose h2.
    let sender = h2.h2_sender().await;
    let streams = 400;
    let mut tasks = Vec::new();
    for i in 0..streams {
        let mut sender = sender.clone();
        let token = if i % 2 == 0 {
            good_token.clone()
        } else {
            denied_token.clone()
        };
        let body = identity_binding_proxy::http::form_encode(token_form(&cid, &token));
        let path = token_path.clone();
        tasks.push(tokio::spawn(async move {
            use http_body_util::BodyExt;
            let req = http::Request::post(path)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let status = resp.status().as_u16();
            let raw = resp.into_body().collect().await.unwrap().to_bytes();
            (
                i,
                status,
                serde_json::from_slice::<Value>(&raw).unwrap_or(Value::Null),
                raw,
            )
        }));
    }
    for t in tasks {
        let (i, status, json, raw) = t.await.unwrap();
        if i % 2 == 0 {
            check("h2 stream (allowed)", status, &json, &raw, &Expect::Served);
        } else {
            check(
                "h2 stream (denied)",
                status,
                &json,
                &raw,
                &refused(403, "unauthorized_client", "demo/intruder"),
            );
        }
    }

    // ---- A 405 names the method that is allowed (RFC 9110).
    let r = client
        .send(
            http::Request::get(&token_path)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(
        r.headers.get("allow").map(|v| v.to_str().unwrap()),
        Some("POST")
    );

    // ---- Still healthy: a good request is served, health checks answer.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = client
        .post_form(&token_path, &token_form(&cid, &good_token))
        .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(r.json["access_token"].is_string());
    let metrics = scrape_metrics(&sys).await;
    assert!(metrics.contains("identity_binding_proxy_requests_total"));
    assert!(sys.proxy.readiness.is_ready());
    println!("hostile corpus: {total} cases + {streams} h2 streams");
    sys.shutdown().await;
}
