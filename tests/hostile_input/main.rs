//! A corpus of hostile and malformed token requests against a whole dev system over real TLS,
//! one test per section (one file each), so a failure names its section and its case. Every
//! case states the exact status, the OAuth `error`, and a fragment of the description that
//! names the cause; refusals never carry an `access_token`. A few positive controls (HTTP/1.0,
//! chunked bodies, an audience list with ours not first) must be served.
//!
//! The sections share one dev system, started by whichever runs first; after each section the
//! proxy must still serve a good request and answer its health checks.

#[path = "../common/mod.rs"]
mod common;

mod claims;
mod client_id;
mod content_type;
mod framing;
mod grant_type;
mod h2_streams;
mod jose_header;
mod methods;
mod pollution;
mod scopes;
mod sizes;
mod structure;
mod tenant;
mod times;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use identity_binding_proxy::exchange::keys::SigningKey;
use identity_binding_proxy_dev::dev::DevSystem;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};

/// How a case reaches the proxy.
#[allow(clippy::large_enum_variant)] // a test table: a few hundred values at most
pub enum Send {
    /// A form POST to `path` (HTTP/1.1 through hyper's client).
    Form(String, Vec<(String, String)>),
    /// Any request, through hyper's client.
    Request(http::Request<Full<Bytes>>),
    /// Raw bytes on a TLS connection; the replies to read.
    Raw(Vec<u8>, usize),
}

/// What the proxy must answer.
pub enum Expect {
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

pub fn refused(status: u16, error: &'static str, needle: impl Into<String>) -> Expect {
    Expect::Refused {
        status,
        error,
        needle: needle.into(),
    }
}

/// A form POST of `p` to `/`.
pub fn form(p: Vec<(String, String)>) -> Send {
    Send::Form("/".into(), p)
}

struct Case {
    name: String,
    send: Send,
    expect: Vec<Expect>,
}

/// The cases of one section, in the order they are sent.
#[derive(Default)]
pub struct Cases(Vec<Case>);

impl Cases {
    /// A case answered once.
    pub fn add(&mut self, name: impl Into<String>, send: Send, expect: Expect) {
        self.add_answers(name, send, vec![expect]);
    }

    /// A case answered several times (pipelined requests), the answers in order.
    pub fn add_answers(&mut self, name: impl Into<String>, send: Send, expect: Vec<Expect>) {
        self.0.push(Case {
            name: name.into(),
            send,
            expect,
        });
    }

    /// The answers the section checks.
    fn answers(&self) -> usize {
        self.0.iter().map(|c| c.expect.len()).sum()
    }
}

/// The pieces needed to forge tokens: the cluster's own signing key and issuer, and the
/// audience the proxy requires.
pub struct Forge {
    pub key: SigningKey,
    pub pem: String,
    pub issuer: String,
    pub aud: String,
}

impl Forge {
    fn new(sys: &DevSystem, dir: &Path) -> Self {
        let pem = std::fs::read_to_string(dir.join("kube/sa-signing-key.pem")).unwrap();
        Self {
            key: SigningKey::from_pem(&pem).unwrap(),
            pem,
            issuer: sys.kube.issuer(),
            aud: serve_default("token-audience"),
        }
    }

    pub fn claims(&self, sa: &str) -> Value {
        let now = now();
        json!({
            "aud": [self.aud], "exp": now + 3600, "iat": now, "nbf": now, "iss": self.issuer,
            "jti": uuid::Uuid::new_v4().to_string(),
            "sub": format!("system:serviceaccount:demo:{sa}"),
            "kubernetes.io": {
                "namespace": "demo",
                "serviceaccount": {"name": sa, "uid": ibp_emulators::kube::service_account_uid("demo", sa)},
                "pod": {"name": format!("{sa}-pod"), "uid": ibp_emulators::kube::pod_uid("demo", &format!("{sa}-pod"))}
            }
        })
    }

    /// Signs `claims` with the cluster key under an arbitrary header (RS256 signature).
    pub fn sign_rs256(&self, header: Value, claims: &Value) -> String {
        let key = EncodingKey::from_rsa_pem(self.pem.as_bytes()).unwrap();
        sign_with(header, claims, &key, Algorithm::RS256)
    }

    /// The usual header: RS256 with the cluster key's kid.
    pub fn header(&self) -> Value {
        json!({"alg": "RS256", "typ": "JWT", "kid": self.key.kid()})
    }
}

pub fn sign_with(header: Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let signing_input = format!("{}.{}", b64(&header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(signing_input.as_bytes(), key, alg).unwrap();
    format!("{signing_input}.{sig}")
}

pub fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

pub fn now() -> i64 {
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

pub fn form_body(p: &[(String, String)]) -> String {
    identity_binding_proxy::http::form::form_encode(p.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// The good form with one field replaced (or removed when `value` is None).
pub fn with(base: &[(String, String)], field: &str, value: Option<&str>) -> Vec<(String, String)> {
    let mut out: Vec<_> = base.iter().filter(|(k, _)| k != field).cloned().collect();
    if let Some(v) = value {
        out.push((field.to_string(), v.to_string()));
    }
    out
}

/// Checks one answer; `case` is "section: case", so a failure names both.
pub fn check(case: &str, status: u16, json: &Value, raw: &[u8], expect: &Expect) {
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

/// The dev system every section sends to, on a runtime of its own that outlives each test.
struct Shared {
    rt: tokio::runtime::Runtime,
    sys: DevSystem,
    forge: Forge,
}

/// Started once per test process, in a state dir named after the process (a static is never
/// dropped, so the dirs of earlier processes are removed here instead).
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile_input");
        remove_dirs_of_ended_processes(&parent);
        let dir = parent.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let sys = rt.block_on(start_dev(&dir));
        let forge = Forge::new(&sys, &dir);
        Shared { rt, sys, forge }
    })
}

fn remove_dirs_of_ended_processes(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// What a section builds its cases from.
pub struct Ctx {
    pub section: &'static str,
    pub sys: &'static DevSystem,
    pub forge: &'static Forge,
    pub client: Client,
    /// The audience the proxy requires (`serve`'s default, which dev keeps).
    pub aud: String,
    pub cid: String,
    pub tenant: String,
    pub token_path: String,
    pub host: String,
    pub good_token: String,
    pub denied_token: String,
    /// The form of a good request.
    pub good: Vec<(String, String)>,
}

impl Ctx {
    /// The good form with `t` as the assertion.
    pub fn assertion(&self, t: &str) -> Vec<(String, String)> {
        with(&self.good, "client_assertion", Some(t))
    }

    /// "section: case", how failures name a case.
    pub fn label(&self, case: &str) -> String {
        format!("{}: {case}", self.section)
    }

    /// Sends every case and checks every answer (`expected` of them, so a case cannot drop
    /// out of the section unnoticed), then checks the proxy is still healthy.
    pub async fn run(&self, expected: usize, cases: Cases) {
        let total = cases.answers();
        assert_eq!(
            total, expected,
            "{}: the section checks {total} answers, not the {expected} it states",
            self.section
        );
        for case in cases.0 {
            let label = self.label(&case.name);
            match case.send {
                Send::Form(path, p) => {
                    let p: Vec<(&str, &str)> =
                        p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    let r = self.client.post_form(&path, &p).await;
                    check(&label, r.status, &r.json, &r.raw, &case.expect[0]);
                }
                Send::Request(req) => {
                    let r = self.client.send(req).await;
                    check(&label, r.status, &r.json, &r.raw, &case.expect[0]);
                }
                Send::Raw(bytes, n) => {
                    let replies = raw_exchange(&self.client, bytes, n).await;
                    assert_eq!(replies.len(), n, "{label}: replies");
                    for (reply, expect) in replies.iter().zip(&case.expect) {
                        check(&label, reply.status, &reply.json, &reply.body, expect);
                    }
                }
            }
        }
        self.still_healthy().await;
        println!("{}: {total} answers checked", self.section);
    }

    /// A good request is still served, and the health checks answer.
    pub async fn still_healthy(&self) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = self
            .client
            .post_form(&self.token_path, &token_form(&self.cid, &self.good_token))
            .await;
        assert_eq!(
            r.status, 200,
            "{}: a good request after the section: {}",
            self.section, r.json
        );
        assert!(
            r.json["access_token"].is_string(),
            "{}: {}",
            self.section,
            r.json
        );
        let metrics = scrape_metrics(self.sys).await;
        assert!(
            metrics.contains("identity_binding_proxy_requests_total"),
            "{}: metrics after the section: {metrics}",
            self.section
        );
        assert!(
            self.sys.proxy.readiness.is_ready(),
            "{}: ready after the section",
            self.section
        );
    }
}

/// Runs `body` against the shared dev system, as section `section`.
pub fn on_shared_dev<F, Fut>(section: &'static str, body: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let shared = shared();
    let sys = &shared.sys;
    let info = &sys.info;
    let cid = info.client_id.clone();
    let good_token = read(&info.allowed_token_file).trim().to_string();
    let ctx = Ctx {
        section,
        sys,
        forge: &shared.forge,
        client: Client::for_dev(sys),
        aud: shared.forge.aud.clone(),
        token_path: format!("/{}/oauth2/v2.0/token", info.tenant_id),
        tenant: info.tenant_id.clone(),
        host: info.sni_name.clone(),
        denied_token: read(&info.denied_token_file).trim().to_string(),
        good: pairs(&token_form(&cid, &good_token)),
        good_token,
        cid,
    };
    shared.rt.block_on(body(ctx));
}
