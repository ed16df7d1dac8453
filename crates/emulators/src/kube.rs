//! A kube-apiserver emulator: plain HTTP on loopback, real Kubernetes JSON.
//!
//! It stands in for the apiserver in `dev`, tests and benchmarks, serving what the proxy
//! uses: service-account token issuance and `TokenReview`, `SubjectAccessReview` backed by
//! real RBAC semantics (see [`super::rbac`]), RBAC list/watch for informers, and the OIDC
//! discovery documents of the service-account issuer. Clients reach it through a kubeconfig
//! it writes into its state directory, so `kube::Client` works against it unchanged.
//!
//! The signing key and issuer persist in the state directory: tokens minted before a restart,
//! or by [`mint_from_state_dir`] while no emulator runs, still verify afterwards.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use k8s_openapi::api::authorization::v1::{
    SubjectAccessReview, SubjectAccessReviewSpec, SubjectAccessReviewStatus,
};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::rbac::{
    NonResourceRequest, RbacKind, RbacPolicy, ResourceRequest, ReviewAttributes, ReviewRequest,
};
use identity_binding_proxy::exchange::keys::SigningKey;
use identity_binding_proxy::http::response as h;
use identity_binding_proxy::http::{body, conn};
use identity_binding_proxy::serve::limits::{Limits, LimitsConfig};

const KEY_FILE: &str = "sa-signing-key.pem";
const ISSUER_FILE: &str = "kube-issuer";
const KUBECONFIG_FILE: &str = "kubeconfig";
const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
const RBAC_API_VERSION: &str = "rbac.authorization.k8s.io/v1";
/// The apiserver's request body limit.
const BODY_LIMIT: usize = 3 << 20;
/// Watch events kept for resuming watches; older resource versions answer 410 Gone.
const HISTORY_LIMIT: usize = 1000;
const RBAC_POLL: Duration = Duration::from_millis(200);
/// Expiry and not-before checks allow this much clock skew. Smaller than the apiserver's
/// minute so that tests can mint tokens that expired a few seconds ago.
const LEEWAY_SECS: i64 = 5;
/// Lifetime of tokens minted with `expires_in_secs == 0`, the TokenRequest default.
const DEFAULT_TOKEN_LIFETIME: i64 = 3600;
const DEFAULT_WATCH_TIMEOUT_SECS: u64 = 1800;
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(30);

/// How to run a [`KubeEmulator`].
#[derive(Clone, Debug)]
pub struct KubeEmulatorConfig {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Holds the signing key, issuer and kubeconfig. Created if missing.
    pub state_dir: PathBuf,
    /// RBAC YAML, polled every 200 ms and reloaded when its content changes. An invalid or
    /// missing file leaves the current policy in place.
    pub rbac_file: Option<PathBuf>,
    /// The service-account token issuer. Without one, the issuer saved in the state dir is
    /// reused, or a new `https://oidc.kube-emulator.invalid/<uuid>` is generated and saved.
    pub issuer: Option<String>,
}

/// What to put in a minted service-account token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MintRequest {
    pub namespace: String,
    pub service_account: String,
    /// Empty means the API audience (the issuer), as a TokenRequest without audiences gets.
    pub audiences: Vec<String>,
    /// Zero means one hour. Negative gives a token that expired that many seconds ago;
    /// reviews allow 5 s of clock skew, so use -10 or less for a token that must fail.
    pub expires_in_secs: i64,
    /// The pod the token is bound to. Without one the token carries no pod claim, like a
    /// TokenRequest not bound to a pod.
    pub pod_name: Option<String>,
}

/// Requests served per endpoint, for tests and benchmarks that assert on caching.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KubeCounts {
    pub token_reviews: u64,
    pub subject_access_reviews: u64,
    pub jwks_requests: u64,
    pub rbac_lists: u64,
    pub rbac_watches: u64,
    /// SelfSubjectAccessReviews and SelfSubjectReviews, made by service accounts with their
    /// own tokens.
    pub self_reviews: u64,
}

#[derive(Default)]
struct Counters {
    token_reviews: AtomicU64,
    subject_access_reviews: AtomicU64,
    jwks_requests: AtomicU64,
    rbac_lists: AtomicU64,
    rbac_watches: AtomicU64,
    self_reviews: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A running emulator. Clones share it; [`KubeEmulator::shutdown`] stops it for all.
#[derive(Clone)]
pub struct KubeEmulator {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    issuer: String,
    bearer: String,
    kubeconfig_path: PathBuf,
    key: SigningKey,
    decoding: jsonwebtoken::DecodingKey,
    deleted_pods: Mutex<HashSet<(String, String)>>,
    deleted_service_accounts: Mutex<HashSet<(String, String)>>,
    rbac: Mutex<RbacStore>,
    /// The latest resource version, so watches wake on changes.
    rv_tx: watch::Sender<u64>,
    counters: Counters,
    available: AtomicBool,
    shutdown: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Fault injection: how long each SubjectAccessReview takes to answer, in milliseconds.
    review_latency_ms: AtomicU64,
    /// The cluster's other objects (what `dev` says it is made of), read-only.
    objects: super::objects::Objects,
}

/// Poisoning only means another thread panicked mid-update; the data is still usable for an
/// emulator, and refusing to serve would hide the original panic behind new ones.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl KubeEmulator {
    /// Loads or creates the state, binds the listener, writes the kubeconfig and serves.
    pub async fn start(cfg: KubeEmulatorConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cfg.state_dir)
            .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
        let key = load_or_create_key(&cfg.state_dir)?;
        let issuer = resolve_issuer(&cfg.state_dir, cfg.issuer.as_deref())?;

        // Looked at before it is loaded: an edit from here on is applied by the watch.
        let rbac_seen = cfg
            .rbac_file
            .as_ref()
            .map(|p| identity_binding_proxy::files::snapshot(std::slice::from_ref(p)));
        let policy = match &cfg.rbac_file {
            Some(path) => load_rbac_file(path)?,
            None => RbacPolicy::default(),
        };

        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        let bearer = random_token()?;
        let kubeconfig_path = cfg.state_dir.join(KUBECONFIG_FILE);
        // It holds the emulator's bearer token.
        identity_binding_proxy::files::write_private(
            &kubeconfig_path,
            kubeconfig_yaml(&url, &bearer).as_bytes(),
        )?;

        let public = key.public();
        let decoding = jsonwebtoken::DecodingKey::from_rsa_components(&public.n, &public.e)
            .context("building the token verification key")?;

        let mut store = RbacStore::new();
        store.apply(policy);
        let (rv_tx, _) = watch::channel(store.rv);

        let inner = Arc::new(Inner {
            url,
            issuer,
            bearer,
            kubeconfig_path,
            key,
            decoding,
            deleted_pods: Mutex::default(),
            deleted_service_accounts: Mutex::default(),
            rbac: Mutex::new(store),
            rv_tx,
            counters: Counters::default(),
            available: AtomicBool::new(true),
            shutdown: CancellationToken::new(),
            tasks: Mutex::default(),
            review_latency_ms: AtomicU64::new(0),
            objects: Default::default(),
        });

        let server = tokio::spawn(serve(listener, inner.clone()));
        lock(&inner.tasks).push(server);
        if let (Some(path), Some(seen)) = (cfg.rbac_file.clone(), rbac_seen) {
            let watcher = tokio::spawn(watch_rbac_file(inner.clone(), path, seen));
            lock(&inner.tasks).push(watcher);
        }
        tracing::info!(url = %inner.url, issuer = %inner.issuer, "kube-apiserver emulator listening");
        Ok(Self { inner })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.inner.url.clone()
    }

    pub fn issuer(&self) -> String {
        self.inner.issuer.clone()
    }

    /// The kubeconfig written at start: this emulator as server, a bearer token as user.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.inner.kubeconfig_path.clone()
    }

    /// Mints a projected service-account token. Deleted pods and service accounts are not
    /// checked here, so tests can hold tokens of objects that are gone; reviews reject them.
    pub fn mint_token(&self, req: &MintRequest) -> anyhow::Result<String> {
        mint(&self.inner.key, &self.inner.issuer, req)
    }

    /// Deletes a pod: tokens bound to it stop passing review.
    pub fn delete_pod(&self, namespace: &str, pod: &str) {
        lock(&self.inner.deleted_pods).insert((namespace.to_string(), pod.to_string()));
    }

    /// Deletes a service account: its tokens stop passing review.
    pub fn delete_service_account(&self, namespace: &str, name: &str) {
        lock(&self.inner.deleted_service_accounts)
            .insert((namespace.to_string(), name.to_string()));
    }

    /// Replaces the RBAC objects, exactly as a file reload does (watchers see the diff). On
    /// invalid YAML the old policy stays and the error is returned. A watched RBAC file
    /// replaces this policy again the next time its content changes.
    /// Replaces the cluster's other objects (Pods, Nodes, ConfigMaps, ...: see
    /// [`super::objects`]).
    pub fn set_objects(&self, objects: Vec<Value>) {
        self.inner.objects.set(objects);
    }

    pub fn set_rbac_yaml(&self, yaml: &str) -> anyhow::Result<()> {
        let policy = RbacPolicy::parse(yaml)?;
        self.inner.apply_policy(policy);
        Ok(())
    }

    pub fn counts(&self) -> KubeCounts {
        let c = &self.inner.counters;
        KubeCounts {
            token_reviews: c.token_reviews.load(Ordering::Relaxed),
            subject_access_reviews: c.subject_access_reviews.load(Ordering::Relaxed),
            jwks_requests: c.jwks_requests.load(Ordering::Relaxed),
            rbac_lists: c.rbac_lists.load(Ordering::Relaxed),
            rbac_watches: c.rbac_watches.load(Ordering::Relaxed),
            self_reviews: c.self_reviews.load(Ordering::Relaxed),
        }
    }

    /// Fault injection: while down, every API request (`/api`, `/apis`, `/version` and the
    /// health endpoints) answers 503 with a `Status` body. The OIDC discovery documents stay
    /// up, as managed clusters serve them from a separate issuer host.
    pub fn set_available(&self, up: bool) {
        self.inner.available.store(up, Ordering::SeqCst);
    }

    /// Fault injection: every SubjectAccessReview answers after `latency` (a slow apiserver),
    /// so concurrent callers overlap with the review in flight.
    pub fn set_review_latency(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.inner.review_latency_ms.store(ms, Ordering::Relaxed);
    }

    /// Stops accepting connections, ends open watches and waits for the server to finish.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Mints with the key and issuer saved in `state_dir`, with no emulator running (used by
/// `dev token` after `dev` stopped).
pub fn mint_from_state_dir(state_dir: &Path, req: &MintRequest) -> anyhow::Result<String> {
    let key_path = state_dir.join(KEY_FILE);
    let pem = std::fs::read_to_string(&key_path).with_context(|| {
        format!(
            "reading {}: has the kube emulator ever run with this state dir?",
            key_path.display()
        )
    })?;
    let key =
        SigningKey::from_pem(&pem).with_context(|| format!("loading {}", key_path.display()))?;
    let issuer_path = state_dir.join(ISSUER_FILE);
    let issuer = std::fs::read_to_string(&issuer_path)
        .with_context(|| format!("reading {}", issuer_path.display()))?;
    mint(&key, issuer.trim(), req)
}

/// The deterministic UID of a service account, so tokens agree across restarts.
pub fn service_account_uid(namespace: &str, name: &str) -> String {
    stable_uid("serviceaccount", namespace, name)
}

/// The deterministic UID of a pod.
pub fn pod_uid(namespace: &str, name: &str) -> String {
    stable_uid("pod", namespace, name)
}

fn stable_uid(kind: &str, namespace: &str, name: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{kind}\0{namespace}\0{name}").as_bytes(),
    );
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

// ---------------------------------------------------------------------------------------
// State directory

fn load_or_create_key(dir: &Path) -> anyhow::Result<SigningKey> {
    let path = dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(pem) => {
            SigningKey::from_pem(&pem).with_context(|| format!("loading {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate(2048).context("generating the SA signing key")?;
            identity_binding_proxy::files::write_private(&path, key.private_pem().as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn resolve_issuer(dir: &Path, configured: Option<&str>) -> anyhow::Result<String> {
    let path = dir.join(ISSUER_FILE);
    let issuer = match configured {
        Some(issuer) => issuer.to_string(),
        None => match std::fs::read_to_string(&path) {
            Ok(saved) if !saved.trim().is_empty() => saved.trim().to_string(),
            Ok(_) => default_issuer(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => default_issuer(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        },
    };
    // Saved even when configured, so offline minting uses what the emulator last served.
    identity_binding_proxy::files::write_public(&path, format!("{issuer}\n").as_bytes())?;
    Ok(issuer)
}

fn default_issuer() -> String {
    format!(
        "https://oidc.kube-emulator.invalid/{}",
        uuid::Uuid::new_v4()
    )
}

fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| anyhow::anyhow!("no randomness available"))?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

fn kubeconfig_yaml(url: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kube-emulator
  cluster:
    server: {url}
users:
- name: kube-emulator
  user:
    token: {token}
contexts:
- name: kube-emulator
  context:
    cluster: kube-emulator
    user: kube-emulator
current-context: kube-emulator
preferences: {{}}
"
    )
}

// ---------------------------------------------------------------------------------------
// Tokens

#[derive(Serialize)]
struct SaClaims<'a> {
    aud: &'a [String],
    exp: i64,
    iat: i64,
    iss: &'a str,
    jti: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubernetesClaims,
    nbf: i64,
    sub: String,
}

#[derive(Serialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: ObjectRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<ObjectRef>,
}

#[derive(Serialize)]
struct ObjectRef {
    name: String,
    uid: String,
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn mint(key: &SigningKey, issuer: &str, req: &MintRequest) -> anyhow::Result<String> {
    anyhow::ensure!(!req.namespace.is_empty(), "a token needs a namespace");
    anyhow::ensure!(
        !req.service_account.is_empty(),
        "a token needs a service account"
    );
    let now = now_secs();
    let (iat, exp) = match req.expires_in_secs {
        0 => (now, now + DEFAULT_TOKEN_LIFETIME),
        s if s > 0 => (now, now + s),
        s => (now + s - DEFAULT_TOKEN_LIFETIME, now + s),
    };
    let default_aud = [issuer.to_string()];
    let aud: &[String] = if req.audiences.is_empty() {
        &default_aud
    } else {
        &req.audiences
    };
    let claims = SaClaims {
        aud,
        exp,
        iat,
        iss: issuer,
        jti: uuid::Uuid::new_v4().to_string(),
        kubernetes: KubernetesClaims {
            namespace: req.namespace.clone(),
            serviceaccount: ObjectRef {
                name: req.service_account.clone(),
                uid: service_account_uid(&req.namespace, &req.service_account),
            },
            pod: req.pod_name.as_ref().map(|pod| ObjectRef {
                name: pod.clone(),
                uid: pod_uid(&req.namespace, pod),
            }),
        },
        nbf: iat,
        sub: format!(
            "system:serviceaccount:{}:{}",
            req.namespace, req.service_account
        ),
    };
    Ok(key.sign(&claims)?)
}

/// The errors are worded like the apiserver's union authenticator reports them.
fn invalid(detail: &str) -> String {
    format!("[invalid bearer token, {detail}]")
}

/// Go's `%q` of a string slice, which upstream uses in the audience error.
fn go_quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(" "))
}

fn string_array(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// The token's validity window, with [`LEEWAY_SECS`] of clock skew either way.
fn check_validity(claims: &Value, now: i64) -> Result<(), String> {
    let time = |name: &str| claims.get(name).and_then(Value::as_i64);
    if time("exp").is_none_or(|exp| now > exp + LEEWAY_SECS) {
        return Err(invalid("service account token has expired"));
    }
    if time("nbf").is_some_and(|nbf| now + LEEWAY_SECS < nbf) {
        return Err(invalid("service account token is not valid yet"));
    }
    if time("iat").is_some_and(|iat| now + LEEWAY_SECS < iat) {
        return Err(invalid("service account token is issued in the future"));
    }
    Ok(())
}

/// Who an authenticated token speaks for.
struct BoundIdentity {
    namespace: String,
    sa_name: String,
    sa_uid: String,
    /// Name and UID of the pod the token is bound to.
    pod: Option<(String, String)>,
}

impl BoundIdentity {
    /// The authenticated review status, with the extras the apiserver adds.
    fn status(self, audiences: Vec<String>, jti: Option<&str>) -> TokenReviewStatus {
        let mut extra = BTreeMap::new();
        if let Some((pod_name, uid)) = self.pod {
            extra.insert(
                "authentication.kubernetes.io/pod-name".to_string(),
                vec![pod_name],
            );
            extra.insert(
                "authentication.kubernetes.io/pod-uid".to_string(),
                vec![uid],
            );
        }
        if let Some(jti) = jti {
            extra.insert(
                "authentication.kubernetes.io/credential-id".to_string(),
                vec![format!("JTI={jti}")],
            );
        }
        let namespace = self.namespace;
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences),
            error: None,
            user: Some(UserInfo {
                username: Some(format!(
                    "system:serviceaccount:{namespace}:{}",
                    self.sa_name
                )),
                uid: Some(self.sa_uid),
                groups: Some(vec![
                    "system:serviceaccounts".to_string(),
                    format!("system:serviceaccounts:{namespace}"),
                    "system:authenticated".to_string(),
                ]),
                extra: Some(extra),
            }),
        }
    }
}

impl Inner {
    /// Authenticates a token like the apiserver's service-account authenticator: issuer,
    /// signature, audiences, validity window, then the bound objects still exist.
    fn review_token(&self, token: &str, requested_audiences: &[String]) -> TokenReviewStatus {
        let authenticated = || -> Result<TokenReviewStatus, String> {
            let claims = self.verified_claims(token)?;
            let audiences = self.matching_audiences(&claims, requested_audiences)?;
            check_validity(&claims, now_secs())?;
            let identity = self.bound_identity(&claims)?;
            let jti = claims.get("jti").and_then(Value::as_str);
            Ok(identity.status(audiences, jti))
        };
        authenticated().unwrap_or_else(|error| TokenReviewStatus {
            authenticated: Some(false),
            error: Some(error),
            ..Default::default()
        })
    }

    /// The claims of a token this emulator signed.
    fn verified_claims(&self, token: &str) -> Result<Value, String> {
        let unverified = jsonwebtoken::dangerous::insecure_decode::<Value>(token)
            .map_err(|_| "invalid bearer token".to_string())?;
        // Not this authenticator's token: the apiserver then only says no authenticator took it.
        if unverified.claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err("invalid bearer token".into());
        }
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        jsonwebtoken::decode::<Value>(token, &self.decoding, &validation)
            .map(|data| data.claims)
            .map_err(|_| invalid("square/go-jose: error in cryptographic primitive"))
    }

    /// The token's audiences among the requested ones (the issuer when none are requested).
    fn matching_audiences(
        &self,
        claims: &Value,
        requested: &[String],
    ) -> Result<Vec<String>, String> {
        let target: Vec<String> = if requested.is_empty() {
            vec![self.issuer.clone()]
        } else {
            requested.to_vec()
        };
        let token_auds = string_array(claims.get("aud").unwrap_or(&Value::Null));
        let audiences: Vec<String> = token_auds
            .iter()
            .filter(|a| target.contains(a))
            .cloned()
            .collect();
        if audiences.is_empty() {
            return Err(invalid(&format!(
                "token audiences {} is invalid for the target audiences {}",
                go_quoted_list(&token_auds),
                go_quoted_list(&target)
            )));
        }
        Ok(audiences)
    }

    /// The service account (and pod) the token is bound to, which must still exist with the
    /// UIDs the token names.
    fn bound_identity(&self, claims: &Value) -> Result<BoundIdentity, String> {
        let kube = claims.get("kubernetes.io").unwrap_or(&Value::Null);
        let text = |pointer: &str| {
            kube.pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let (namespace, sa_name, sa_uid) = (
            text("/namespace"),
            text("/serviceaccount/name"),
            text("/serviceaccount/uid"),
        );
        if namespace.is_empty() || sa_name.is_empty() {
            return Err(invalid("service account token claims are missing"));
        }
        let invalidated = || invalid("service account token has been invalidated");
        if lock(&self.deleted_service_accounts).contains(&(namespace.clone(), sa_name.clone()))
            || sa_uid != service_account_uid(&namespace, &sa_name)
        {
            return Err(invalidated());
        }
        let pod = kube.get("pod").and_then(|p| {
            Some((
                p.get("name")?.as_str()?.to_string(),
                p.get("uid")?.as_str()?.to_string(),
            ))
        });
        if let Some((pod_name, uid)) = &pod {
            if lock(&self.deleted_pods).contains(&(namespace.clone(), pod_name.clone())) {
                return Err(invalidated());
            }
            let expected = pod_uid(&namespace, pod_name);
            if *uid != expected {
                return Err(invalid(&format!(
                    "pod UID ({expected}) does not match claim ({uid})"
                )));
            }
        }
        Ok(BoundIdentity {
            namespace,
            sa_name,
            sa_uid,
            pod,
        })
    }

    fn apply_policy(&self, policy: RbacPolicy) {
        let rv = {
            let mut store = lock(&self.rbac);
            store.apply(policy);
            store.rv
        };
        self.rv_tx.send_replace(rv);
    }
}

// ---------------------------------------------------------------------------------------
// RBAC object store with watch history

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

type ObjectKey = (RbacKind, String, String);

struct StoredObject {
    /// The object as loaded, to tell real changes from reloads of the same content.
    source: Value,
    /// The object as served, with server-set metadata.
    served: Value,
}

struct WatchEvent {
    rv: u64,
    kind: RbacKind,
    event: EventType,
    /// The object after the change (for deletions, its last state).
    object: Value,
    /// The object before a modification, for selector transitions.
    previous: Option<Value>,
}

struct RbacStore {
    policy: Arc<RbacPolicy>,
    objects: BTreeMap<ObjectKey, StoredObject>,
    rv: u64,
    history: VecDeque<WatchEvent>,
    /// Watches may resume from this resource version or later; older ones get 410.
    floor: u64,
}

impl RbacStore {
    fn new() -> Self {
        Self {
            policy: Arc::new(RbacPolicy::default()),
            objects: BTreeMap::new(),
            rv: 1,
            history: VecDeque::new(),
            floor: 1,
        }
    }

    /// Diffs the new policy against the stored objects and records one event per change,
    /// each with its own resource version, as etcd revisions would.
    fn apply(&mut self, policy: RbacPolicy) {
        let mut incoming: BTreeMap<ObjectKey, Value> = BTreeMap::new();
        for obj in policy.objects() {
            let key = (
                obj.kind(),
                obj.namespace().unwrap_or_default().to_string(),
                obj.name().to_string(),
            );
            incoming.insert(key, obj.to_json());
        }
        let gone: Vec<ObjectKey> = self
            .objects
            .keys()
            .filter(|k| !incoming.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(old) = self.objects.remove(&key) {
                self.rv += 1;
                let mut object = old.served;
                set_resource_version(&mut object, self.rv);
                self.record(key.0, EventType::Deleted, object, None);
            }
        }
        for (key, source) in incoming {
            match self.objects.get(&key) {
                Some(existing) if existing.source == source => {}
                Some(existing) => {
                    self.rv += 1;
                    let previous = existing.served.clone();
                    let served = serve_form(&source, previous.get("metadata"), self.rv);
                    self.objects.insert(
                        key.clone(),
                        StoredObject {
                            source,
                            served: served.clone(),
                        },
                    );
                    self.record(key.0, EventType::Modified, served, Some(previous));
                }
                None => {
                    self.rv += 1;
                    let served = serve_form(&source, None, self.rv);
                    self.objects.insert(
                        key.clone(),
                        StoredObject {
                            source,
                            served: served.clone(),
                        },
                    );
                    self.record(key.0, EventType::Added, served, None);
                }
            }
        }
        self.policy = Arc::new(policy);
    }

    fn record(&mut self, kind: RbacKind, event: EventType, object: Value, previous: Option<Value>) {
        self.history.push_back(WatchEvent {
            rv: self.rv,
            kind,
            event,
            object,
            previous,
        });
        while self.history.len() > HISTORY_LIMIT {
            if let Some(dropped) = self.history.pop_front() {
                self.floor = dropped.rv;
            }
        }
    }
}

/// The object with server-set metadata: a fresh uid and creation time for new objects,
/// the previous ones for updates.
fn serve_form(source: &Value, previous_meta: Option<&Value>, rv: u64) -> Value {
    let mut served = source.clone();
    if let Some(meta) = served.get_mut("metadata").and_then(Value::as_object_mut) {
        let uid = previous_meta
            .and_then(|m| m.get("uid"))
            .cloned()
            .unwrap_or_else(|| Value::String(uuid::Uuid::new_v4().to_string()));
        let created = previous_meta
            .and_then(|m| m.get("creationTimestamp"))
            .cloned()
            .unwrap_or_else(|| Value::String(rfc3339_now()));
        meta.insert("uid".into(), uid);
        meta.insert("creationTimestamp".into(), created);
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
    served
}

fn set_resource_version(object: &mut Value, rv: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

fn rfc3339_now() -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Selectors

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    fn key(&self) -> &str {
        match self {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k,
        }
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// Parses a label selector string (`a=b,c!=d,e in (f,g),!h`) as the apiserver accepts it.
fn parse_label_selector(s: &str) -> Result<Vec<Requirement>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for ch in s.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(ch);
    }
    parts.push(current);
    let mut reqs = Vec::new();
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        reqs.push(parse_requirement(part).ok_or_else(|| {
            format!("unable to parse requirement: invalid label selector {part:?}")
        })?);
    }
    Ok(reqs)
}

fn parse_requirement(part: &str) -> Option<Requirement> {
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        return valid_key(key).then(|| Requirement::DoesNotExist(key.to_string()));
    }
    for (op, ctor) in [
        (
            " notin ",
            Requirement::NotIn as fn(String, Vec<String>) -> Requirement,
        ),
        (
            " in ",
            Requirement::In as fn(String, Vec<String>) -> Requirement,
        ),
    ] {
        if let Some((key, values)) = part.split_once(op) {
            let key = key.trim();
            let values = values.trim().strip_prefix('(')?.strip_suffix(')')?;
            let values = values
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            return valid_key(key).then(|| ctor(key.to_string(), values));
        }
    }
    let (key, value, ctor): (&str, &str, fn(String, String) -> Requirement) =
        if let Some((k, v)) = part.split_once("!=") {
            (k, v, Requirement::NotEquals)
        } else if let Some((k, v)) = part.split_once("==") {
            (k, v, Requirement::Equals)
        } else if let Some((k, v)) = part.split_once('=') {
            (k, v, Requirement::Equals)
        } else {
            let key = part.trim();
            return valid_key(key).then(|| Requirement::Exists(key.to_string()));
        };
    let key = key.trim();
    valid_key(key).then(|| ctor(key.to_string(), value.trim().to_string()))
}

/// Field selectors: RBAC objects support `metadata.name` and `metadata.namespace`.
fn parse_field_selector(s: &str) -> Result<Vec<Requirement>, String> {
    let reqs = parse_label_selector(s)?;
    for r in &reqs {
        let supported = matches!(r, Requirement::Equals(..) | Requirement::NotEquals(..))
            && matches!(r.key(), "metadata.name" | "metadata.namespace");
        if !supported {
            return Err(format!("field label not supported: {}", r.key()));
        }
    }
    Ok(reqs)
}

#[derive(Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let meta = object.get("metadata").unwrap_or(&Value::Null);
        let namespace = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
        if self.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            return false;
        }
        let labels: BTreeMap<String, String> = meta
            .get("labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let fields: BTreeMap<String, String> = [
            (
                "metadata.name".to_string(),
                meta.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            ),
            ("metadata.namespace".to_string(), namespace.to_string()),
        ]
        .into();
        self.labels.iter().all(|r| r.matches(&labels))
            && self.fields.iter().all(|r| r.matches(&fields))
    }
}

// ---------------------------------------------------------------------------------------
// HTTP

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn boxed(resp: Response<h::Body>) -> Response<Body> {
    resp.map(|b| b.boxed_unsync())
}

fn status_value(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut v = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    if let (Some(details), Some(obj)) = (details, v.as_object_mut()) {
        obj.insert("details".into(), details);
    }
    v
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    boxed(h::json_value(
        code,
        &status_value(code, reason, message, None),
    ))
}

fn not_found_path() -> Response<Body> {
    boxed(h::json_value(
        StatusCode::NOT_FOUND,
        &status_value(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        ),
    ))
}

fn bad_request(message: &str) -> Response<Body> {
    status(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn method_not_allowed() -> Response<Body> {
    status(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
    )
}

/// Serves HTTP/1.1 and h2c until shutdown; open watches end with it (they watch the same
/// token), so connections drain at once.
async fn serve(listener: TcpListener, inner: Arc<Inner>) {
    let shutdown = inner.shutdown.clone();
    conn::serve_plain(
        listener,
        shutdown,
        Limits::new(LimitsConfig::unbounded()),
        // No connection deadline, as the apiserver has none for watches: a watch response
        // streams until its own `timeoutSeconds` (tests/rbac_churn.rs, a quiet cluster).
        conn::ConnTimeouts::NONE,
        move |req, _peer| handle(inner.clone(), req),
    )
    .await
}

/// The RBAC file at start: a missing one starts with no objects (it may appear later); an
/// unreadable or invalid one stops the start.
fn load_rbac_file(path: &Path) -> anyhow::Result<RbacPolicy> {
    if let Ok(false) = path.try_exists() {
        tracing::warn!(file = %path.display(), "RBAC file missing; starting with no RBAC objects");
        return Ok(RbacPolicy::default());
    }
    read_rbac_file(path)
}

/// Reads and parses an RBAC file; the error names the file and the step that failed.
fn read_rbac_file(path: &Path) -> anyhow::Result<RbacPolicy> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text =
        String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))?;
    RbacPolicy::parse(&text).with_context(|| format!("loading {}", path.display()))
}

/// Applies the RBAC file whenever its content changes, until shutdown. A file that becomes
/// unreadable or invalid leaves the current policy in place.
async fn watch_rbac_file(inner: Arc<Inner>, path: PathBuf, seen: Vec<Option<Vec<u8>>>) {
    let stop = inner.shutdown.clone();
    identity_binding_proxy::files::watch_contents_since(
        vec![path.clone()],
        seen,
        RBAC_POLL,
        stop,
        || match read_rbac_file(&path) {
            Ok(policy) => {
                inner.apply_policy(policy);
                tracing::info!(file = %path.display(), "RBAC reloaded");
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "RBAC file not reloaded; keeping the current policy"
                )
            }
        },
    )
    .await
}

fn bearer_ok(inner: &Inner, req: &Request<Incoming>) -> bool {
    let Some(value) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(token) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
    else {
        return false;
    };
    aws_lc_rs::constant_time::verify_slices_are_equal(
        token.trim().as_bytes(),
        inner.bearer.as_bytes(),
    )
    .is_ok()
}

/// One apiserver request: the issuer's documents, then (while the API is up) health and
/// version, then the authenticated API.
async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if let Some(resp) = issuer_document(&inner, &path, req.method()) {
        return resp;
    }
    if !inner.available.load(Ordering::SeqCst) {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the kube-apiserver emulator is unavailable",
        );
    }
    if let Some(resp) = health_or_version(&path) {
        return resp;
    }
    let is_api = path == "/api"
        || path.starts_with("/api/")
        || path == "/apis"
        || path.starts_with("/apis/");
    if !is_api {
        return not_found_path();
    }
    if let Some(kind) = SelfReview::of(&path, req.method()) {
        return self_review(&inner, kind, req).await;
    }
    if !bearer_ok(&inner, &req) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    api(&inner, &segs, req).await
}

/// The service-account issuer's discovery document and JWKS: served even while the API is
/// down, as managed clusters serve them from a separate issuer host.
fn issuer_document(inner: &Inner, path: &str, method: &Method) -> Option<Response<Body>> {
    const DISCOVERY: &str = "/.well-known/openid-configuration";
    const JWKS: &str = "/openid/v1/jwks";
    if path != DISCOVERY && path != JWKS {
        return None;
    }
    if method != Method::GET {
        return Some(method_not_allowed());
    }
    let doc = if path == JWKS {
        bump(&inner.counters.jwks_requests);
        json!({ "keys": [inner.key.public().jwk()] })
    } else {
        json!({
            "issuer": inner.issuer,
            "jwks_uri": format!("{}{JWKS}", inner.url),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
    };
    Some(boxed(h::json_value(StatusCode::OK, &doc)))
}

/// The unauthenticated health endpoints and `/version`, for any method.
fn health_or_version(path: &str) -> Option<Response<Body>> {
    match path {
        "/healthz" | "/livez" | "/readyz" => Some(boxed(h::text(StatusCode::OK, "ok"))),
        "/version" => Some(boxed(h::json_value(
            StatusCode::OK,
            &json!({
                "major": "1",
                "minor": "33",
                "gitVersion": "v1.33.0-kube-emulator",
                "gitCommit": "",
                "gitTreeState": "clean",
                "buildDate": "",
                "goVersion": "",
                "compiler": "rustc",
                "platform": "linux/amd64",
            }),
        ))),
        _ => None,
    }
}

/// An authenticated request under `/api` or `/apis`, by its path segments.
async fn api(inner: &Arc<Inner>, segs: &[&str], req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    if let Some(doc) = discovery(inner, segs) {
        return if method == Method::GET {
            boxed(h::json_value(StatusCode::OK, &doc))
        } else {
            method_not_allowed()
        };
    }
    match segs {
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => {
            if method != Method::POST {
                return method_not_allowed();
            }
            bump(&inner.counters.token_reviews);
            token_review(inner, req).await
        }
        ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"] => {
            if method != Method::POST {
                return method_not_allowed();
            }
            bump(&inner.counters.subject_access_reviews);
            subject_access_review(inner, req).await
        }
        ["apis", "rbac.authorization.k8s.io", "v1", rest @ ..] => {
            let query = query_map(req.uri().query());
            rbac(inner, rest, &method, &query)
        }
        _ if method == Method::GET => {
            match super::objects::serve(&inner.objects, segs, req.uri().query()).await {
                Some(resp) => boxed(resp),
                None => not_found_path(),
            }
        }
        _ => not_found_path(),
    }
}

/// `GET` of one RBAC object, a list, or a watch (`?watch=true`), by the path after
/// `/apis/rbac.authorization.k8s.io/v1/`.
fn rbac(
    inner: &Arc<Inner>,
    rest: &[&str],
    method: &Method,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return not_found_path(),
    };
    let Some(kind) = RbacKind::from_plural(plural) else {
        return not_found_path();
    };
    // Namespaced kinds are only addressable by name inside a namespace, and cluster-scoped
    // kinds never live in one.
    if (namespace.is_some() && !kind.namespaced())
        || (name.is_some() && namespace.is_none() && kind.namespaced())
    {
        return not_found_path();
    }
    if method != Method::GET {
        return method_not_allowed();
    }
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    match name {
        Some(name) => get_rbac_object(inner, kind, namespace, name),
        None if watching => watch_rbac(inner, kind, namespace, query),
        None => list_rbac(inner, kind, namespace, query),
    }
}

/// A served resource: plural, kind, namespaced, verbs.
type ResourceSpec = (&'static str, &'static str, bool, &'static [&'static str]);

/// The API groups served, with their resources.
const SERVED_GROUPS: [(&str, &[ResourceSpec]); 3] = [
    (
        "authentication.k8s.io",
        &[("tokenreviews", "TokenReview", false, &["create"])],
    ),
    (
        "authorization.k8s.io",
        &[(
            "subjectaccessreviews",
            "SubjectAccessReview",
            false,
            &["create"],
        )],
    ),
    (
        RBAC_GROUP,
        &[
            (
                "clusterroles",
                "ClusterRole",
                false,
                &["get", "list", "watch"],
            ),
            (
                "clusterrolebindings",
                "ClusterRoleBinding",
                false,
                &["get", "list", "watch"],
            ),
            ("roles", "Role", true, &["get", "list", "watch"]),
            (
                "rolebindings",
                "RoleBinding",
                true,
                &["get", "list", "watch"],
            ),
        ],
    ),
];

fn api_group(name: &str) -> Value {
    let version = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": [version],
        "preferredVersion": version,
    })
}

/// Legacy (unaggregated) discovery documents, so clients such as kubectl can find the
/// served resources. The core group serves no resources.
fn discovery(inner: &Inner, segs: &[&str]) -> Option<Value> {
    let server_address = inner.url.trim_start_matches("http://");
    match segs {
        ["api"] => Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
            ],
        })),
        ["api", "v1"] => Some(json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [],
        })),
        ["apis"] => Some(json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": SERVED_GROUPS.iter().map(|(g, _)| {
                let mut group = api_group(g);
                if let Some(obj) = group.as_object_mut() {
                    obj.remove("kind");
                    obj.remove("apiVersion");
                }
                group
            }).collect::<Vec<_>>(),
        })),
        ["apis", group] => SERVED_GROUPS
            .iter()
            .find(|(g, _)| g == group)
            .map(|(g, _)| api_group(g)),
        ["apis", group, "v1"] => SERVED_GROUPS.iter().find(|(g, _)| g == group).map(
            |(g, resources)| {
                json!({
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": format!("{g}/v1"),
                    "resources": resources.iter().map(|(plural, kind, namespaced, verbs)| json!({
                        "name": plural,
                        "singularName": kind.to_lowercase(),
                        "namespaced": namespaced,
                        "kind": kind,
                        "verbs": verbs,
                    })).collect::<Vec<_>>(),
                })
            },
        ),
        _ => None,
    }
}

fn query_map(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// Reads a JSON body into a Kubernetes object, filling `apiVersion`/`kind` when absent and
/// refusing mismatched ones, as the apiserver decodes request bodies.
async fn read_object<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    api_version: &str,
    kind: &str,
) -> Result<T, Response<Body>> {
    let body = match body::read_body(req.into_body(), BODY_LIMIT).await {
        Ok(body) => body,
        Err(body::BodyError::TooLarge(_)) => {
            return Err(status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                "request entity too large",
            ))
        }
        Err(e) => return Err(bad_request(&e.to_string())),
    };
    let mut value: Value = serde_json::from_slice(&body)
        .map_err(|e| bad_request(&format!("couldn't get version/kind; json parse error: {e}")))?;
    let Some(obj) = value.as_object_mut() else {
        return Err(bad_request(
            "couldn't get version/kind; json parse error: not an object",
        ));
    };
    for (field, want) in [("apiVersion", api_version), ("kind", kind)] {
        match obj.get(field).and_then(Value::as_str) {
            None | Some("") => {
                obj.insert(field.into(), Value::String(want.into()));
            }
            Some(got) if got == want => {}
            Some(got) => {
                return Err(bad_request(&format!(
                    "the {field} in the data ({got}) does not match the expected {field} ({want})"
                )))
            }
        }
    }
    serde_json::from_value(value).map_err(|e| bad_request(&format!("unable to decode {kind}: {e}")))
}

async fn token_review(inner: &Inner, req: Request<Incoming>) -> Response<Body> {
    let mut review: TokenReview =
        match read_object(req, "authentication.k8s.io/v1", "TokenReview").await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
    let token = review.spec.token.clone().unwrap_or_default();
    if token.is_empty() {
        return bad_request("token is required for TokenReview in authentication");
    }
    let audiences = review.spec.audiences.clone().unwrap_or_default();
    review.status = Some(inner.review_token(&token, &audiences));
    boxed(h::json_value(StatusCode::CREATED, &review))
}

async fn subject_access_review(inner: &Inner, req: Request<Incoming>) -> Response<Body> {
    let latency = inner.review_latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let mut review: SubjectAccessReview =
        match read_object(req, "authorization.k8s.io/v1", "SubjectAccessReview").await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
    if let Some(refusal) = invalid_review(&review.spec) {
        return refusal;
    }
    let spec = &review.spec;
    let request = match (&spec.resource_attributes, &spec.non_resource_attributes) {
        (Some(r), _) => ReviewRequest::Resource(ResourceRequest {
            namespace: r.namespace.clone().filter(|n| !n.is_empty()),
            verb: r.verb.clone().unwrap_or_default(),
            api_group: r.group.clone().unwrap_or_default(),
            resource: r.resource.clone().unwrap_or_default(),
            subresource: r.subresource.clone().unwrap_or_default(),
            name: r.name.clone().unwrap_or_default(),
        }),
        (None, Some(n)) => ReviewRequest::NonResource(NonResourceRequest {
            path: n.path.clone().unwrap_or_default(),
            verb: n.verb.clone().unwrap_or_default(),
        }),
        (None, None) => return bad_request("no attributes"),
    };
    let attrs = ReviewAttributes {
        user: spec.user.clone().unwrap_or_default(),
        groups: spec.groups.clone().unwrap_or_default(),
        uid: spec.uid.clone().unwrap_or_default(),
        request,
    };
    let policy = lock(&inner.rbac).policy.clone();
    let decision = policy.authorize(&attrs);
    review.status = Some(SubjectAccessReviewStatus {
        allowed: decision.allowed,
        reason: Some(decision.reason).filter(|r| !r.is_empty()),
        ..Default::default()
    });
    boxed(h::json_value(StatusCode::CREATED, &review))
}

/// The apiserver's validation of a review: exactly one kind of attributes, and a user or a
/// group. A failure is a 422 `Invalid` naming every cause.
fn invalid_review(spec: &SubjectAccessReviewSpec) -> Option<Response<Body>> {
    let mut causes = Vec::new();
    if spec.resource_attributes.is_some() && spec.non_resource_attributes.is_some() {
        causes.push((
            "spec.nonResourceAttributes",
            "cannot be specified in combination with resourceAttributes",
        ));
    }
    if spec.resource_attributes.is_none() && spec.non_resource_attributes.is_none() {
        causes.push((
            "spec.resourceAttributes",
            "exactly one of nonResourceAttributes or resourceAttributes must be specified",
        ));
    }
    let no_user = spec.user.as_deref().unwrap_or_default().is_empty();
    if no_user && spec.groups.as_ref().is_none_or(Vec::is_empty) {
        causes.push((
            "spec.user",
            "at least one of user or group must be specified",
        ));
    }
    if causes.is_empty() {
        return None;
    }
    let messages: Vec<String> = causes
        .iter()
        .map(|(field, msg)| format!("{field}: Invalid value: {msg}"))
        .collect();
    let joined = if messages.len() == 1 {
        messages.join("")
    } else {
        format!("[{}]", messages.join(", "))
    };
    let details = json!({
        "group": "authorization.k8s.io",
        "kind": "SubjectAccessReview",
        "causes": causes.iter().map(|(field, msg)| json!({
            "reason": "FieldValueInvalid",
            "message": format!("Invalid value: {msg}"),
            "field": field,
        })).collect::<Vec<_>>(),
    });
    Some(boxed(h::json_value(
        StatusCode::UNPROCESSABLE_ENTITY,
        &status_value(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            &format!("SubjectAccessReview.authorization.k8s.io \"\" is invalid: {joined}"),
            Some(details),
        ),
    )))
}

fn get_rbac_object(
    inner: &Inner,
    kind: RbacKind,
    namespace: Option<&str>,
    name: &str,
) -> Response<Body> {
    let key = (
        kind,
        namespace.unwrap_or_default().to_string(),
        name.to_string(),
    );
    let store = lock(&inner.rbac);
    match store.objects.get(&key) {
        Some(obj) => boxed(h::json_value(StatusCode::OK, &obj.served)),
        None => boxed(h::json_value(
            StatusCode::NOT_FOUND,
            &status_value(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{}.{RBAC_GROUP} {name:?} not found", kind.plural()),
                Some(json!({"name": name, "group": RBAC_GROUP, "kind": kind.plural()})),
            ),
        )),
    }
}

fn build_filter(
    namespace: Option<&str>,
    query: &HashMap<String, String>,
) -> Result<Filter, Box<Response<Body>>> {
    let labels = parse_label_selector(query.get("labelSelector").map_or("", String::as_str))
        .map_err(|e| Box::new(bad_request(&e)))?;
    let fields = parse_field_selector(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(|e| Box::new(bad_request(&e)))?;
    Ok(Filter {
        namespace: namespace.map(str::to_string),
        labels,
        fields,
    })
}

#[derive(Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    start: usize,
}

fn list_rbac(
    inner: &Inner,
    kind: RbacKind,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    bump(&inner.counters.rbac_lists);
    let filter = match build_filter(namespace, query) {
        Ok(f) => f,
        Err(resp) => return *resp,
    };
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let store = lock(&inner.rbac);
    let start = match query.get("continue").filter(|c| !c.is_empty()) {
        None => 0,
        Some(token) => {
            let decoded = URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|b| serde_json::from_slice::<ContinueToken>(&b).ok());
            match decoded {
                None => return bad_request("continue key is not valid: incorrect encoded start resourceVersion"),
                // Pages are cut from the current state, which is only consistent with the
                // first page while nothing changed in between.
                Some(t) if t.rv != store.rv => {
                    return status(
                        StatusCode::GONE,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    )
                }
                Some(t) => t.start,
            }
        }
    };
    let matching: Vec<&Value> = store
        .objects
        .iter()
        .filter(|((k, _, _), _)| *k == kind)
        .map(|(_, o)| &o.served)
        .filter(|o| filter.matches(o))
        .collect();
    let end = limit.map_or(matching.len(), |l| (start + l).min(matching.len()));
    let items: Vec<&Value> = matching.get(start..end).unwrap_or_default().to_vec();
    let mut metadata = json!({ "resourceVersion": store.rv.to_string() });
    if end < matching.len() {
        let token = ContinueToken {
            rv: store.rv,
            start: end,
        };
        let token = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap_or_default());
        metadata["continue"] = Value::String(token);
        metadata["remainingItemCount"] = json!(matching.len() - end);
    }
    boxed(h::json_value(
        StatusCode::OK,
        &json!({
            "apiVersion": RBAC_API_VERSION,
            "kind": format!("{}List", kind.kind()),
            "metadata": metadata,
            "items": items,
        }),
    ))
}

/// A response body fed by a channel, so a watch can stream events as they happen.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": event_type, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(kind: RbacKind, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"apiVersion": RBAC_API_VERSION, "kind": kind.kind(), "metadata": metadata}),
    )
}

fn too_old(requested: u64, floor: u64) -> Bytes {
    event_line(
        "ERROR",
        &status_value(
            StatusCode::GONE,
            "Expired",
            &format!("too old resource version: {requested} ({floor})"),
            None,
        ),
    )
}

/// How one history event looks through a watch's filter: a modification that moves an
/// object into or out of the selection is an addition or deletion for that watcher.
fn filtered_event(filter: &Filter, ev: &WatchEvent) -> Option<(EventType, Value)> {
    let now = filter.matches(&ev.object);
    match ev.event {
        EventType::Added | EventType::Deleted => now.then(|| (ev.event, ev.object.clone())),
        EventType::Modified => {
            let before = ev.previous.as_ref().is_some_and(|p| filter.matches(p));
            match (before, now) {
                (true, true) => Some((EventType::Modified, ev.object.clone())),
                (false, true) => Some((EventType::Added, ev.object.clone())),
                (true, false) => {
                    let mut last = ev.previous.clone().unwrap_or(Value::Null);
                    set_resource_version(&mut last, ev.rv);
                    Some((EventType::Deleted, last))
                }
                (false, false) => None,
            }
        }
    }
}

/// What a watch asked for in its query.
struct WatchParams {
    /// The resource version to resume after; none starts with the current state.
    resource_version: Option<u64>,
    timeout: Duration,
    bookmarks: bool,
    send_initial_events: bool,
}

impl WatchParams {
    /// The error is the apiserver's message for a bad resource version.
    fn from_query(query: &HashMap<String, String>) -> Result<Self, String> {
        let resource_version = match query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(rv) => Some(
                rv.parse::<u64>()
                    .map_err(|_| format!("invalid resource version: {rv}"))?,
            ),
        };
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_WATCH_TIMEOUT_SECS);
        Ok(Self {
            resource_version,
            timeout: Duration::from_secs(timeout),
            bookmarks: query
                .get("allowWatchBookmarks")
                .is_some_and(|b| b == "true"),
            send_initial_events: query.get("sendInitialEvents").is_some_and(|b| b == "true"),
        })
    }
}

/// Starts a watch: the response body streams its events as newline-separated JSON until
/// the timeout, the client leaves, or the emulator shuts down.
fn watch_rbac(
    inner: &Arc<Inner>,
    kind: RbacKind,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let filter = match build_filter(namespace, query) {
        Ok(f) => f,
        Err(resp) => return *resp,
    };
    let params = match WatchParams::from_query(query) {
        Ok(p) => p,
        Err(message) => return bad_request(&message),
    };
    bump(&inner.counters.rbac_watches);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(stream_watch(inner.clone(), kind, filter, params, tx));
    let mut resp = Response::new(ChannelBody(rx).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Feeds one watch: its start, then every change after it, with bookmarks when asked.
async fn stream_watch(
    inner: Arc<Inner>,
    kind: RbacKind,
    filter: Filter,
    params: WatchParams,
    tx: mpsc::Sender<Bytes>,
) {
    let deadline = tokio::time::Instant::now() + params.timeout;
    let mut rv_rx = inner.rv_tx.subscribe();
    let mut pending: Vec<Bytes> = Vec::new();
    let start = watch_start(&lock(&inner.rbac), kind, &filter, &params, &mut pending);
    let Some(mut last) = start else {
        for line in pending {
            let _ = tx.send(line).await;
        }
        return;
    };
    let mut bookmark_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + BOOKMARK_INTERVAL,
        BOOKMARK_INTERVAL,
    );
    loop {
        let next = {
            let store = lock(&inner.rbac);
            // Seen under the lock: a change applied after it wakes the wait below.
            rv_rx.borrow_and_update();
            events_since(&store, kind, &filter, last, &mut pending)
        };
        for line in pending.drain(..) {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let Some(next) = next else { return };
        last = next;
        tokio::select! {
            changed = rv_rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep_until(deadline) => {
                if params.bookmarks {
                    let _ = tx.send(bookmark(kind, last, false)).await;
                }
                return;
            }
            _ = bookmark_tick.tick(), if params.bookmarks => {
                pending.push(bookmark(kind, last, false));
            }
            _ = inner.shutdown.cancelled() => return,
            _ = tx.closed() => return,
        }
    }
}

/// Where a watch starts: queues its first events and returns the resource version it
/// follows from, or `None` when it ends after them (a version older than the history).
fn watch_start(
    store: &RbacStore,
    kind: RbacKind,
    filter: &Filter,
    params: &WatchParams,
    pending: &mut Vec<Bytes>,
) -> Option<u64> {
    // No resource version (or an explicit request for initial events) starts with synthetic
    // additions of the current state, as the apiserver does.
    match params
        .resource_version
        .filter(|_| !params.send_initial_events)
    {
        None => {
            for ((k, _, _), obj) in &store.objects {
                if *k == kind && filter.matches(&obj.served) {
                    pending.push(event_line(EventType::Added.as_str(), &obj.served));
                }
            }
            if params.send_initial_events && params.bookmarks {
                pending.push(bookmark(kind, store.rv, true));
            }
            Some(store.rv)
        }
        Some(rv) if rv < store.floor => {
            pending.push(too_old(rv, store.floor));
            None
        }
        Some(rv) => Some(rv),
    }
}

/// Queues the events after `last` that the watch sees and returns the latest version, or
/// queues a 410 and returns `None` when the history no longer reaches back to `last`.
fn events_since(
    store: &RbacStore,
    kind: RbacKind,
    filter: &Filter,
    last: u64,
    pending: &mut Vec<Bytes>,
) -> Option<u64> {
    if last < store.floor {
        pending.push(too_old(last, store.floor));
        return None;
    }
    let events = store
        .history
        .iter()
        .filter(|e| e.rv > last && e.kind == kind);
    for ev in events {
        if let Some((t, obj)) = filtered_event(filter, ev) {
            pending.push(event_line(t.as_str(), &obj));
        }
    }
    Some(last.max(store.rv))
}

// ---------------------------------------------------------------------------------------
// Reviews a caller makes about itself, with its own service-account token

/// `SelfSubjectAccessReview` (may I?) and `SelfSubjectReview` (who am I?): what every
/// authenticated user may create, a pod with its own API token included.
#[derive(Clone, Copy)]
enum SelfReview {
    Access,
    Identity,
}

impl SelfReview {
    fn of(path: &str, method: &Method) -> Option<Self> {
        let kind = match path {
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" => Self::Access,
            "/apis/authentication.k8s.io/v1/selfsubjectreviews" => Self::Identity,
            _ => return None,
        };
        (method == Method::POST).then_some(kind)
    }
}

/// The caller behind a request's bearer token: a service account whose token (with the API
/// audience, the issuer) verifies, or the emulator's admin.
fn bearer_user(inner: &Inner, req: &Request<Incoming>) -> Option<UserInfo> {
    if bearer_ok(inner, req) {
        return Some(UserInfo {
            username: Some("kube-emulator-admin".into()),
            groups: Some(vec!["system:masters".into(), "system:authenticated".into()]),
            ..Default::default()
        });
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?
        .trim()
        .to_string();
    let review = inner.review_token(&token, &[]);
    review
        .authenticated
        .unwrap_or(false)
        .then_some(review.user?)
}

async fn self_review(inner: &Inner, kind: SelfReview, req: Request<Incoming>) -> Response<Body> {
    use k8s_openapi::api::authentication::v1::{SelfSubjectReview, SelfSubjectReviewStatus};
    use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
    let Some(user) = bearer_user(inner, &req) else {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    };
    bump(&inner.counters.self_reviews);
    match kind {
        SelfReview::Identity => {
            let mut review: SelfSubjectReview =
                match read_object(req, "authentication.k8s.io/v1", "SelfSubjectReview").await {
                    Ok(r) => r,
                    Err(resp) => return resp,
                };
            review.status = Some(SelfSubjectReviewStatus {
                user_info: Some(user),
            });
            boxed(h::json_value(StatusCode::CREATED, &review))
        }
        SelfReview::Access => {
            let mut review: SelfSubjectAccessReview = match read_object(
                req,
                "authorization.k8s.io/v1",
                "SelfSubjectAccessReview",
            )
            .await
            {
                Ok(r) => r,
                Err(resp) => return resp,
            };
            let spec = &review.spec;
            let request = match (&spec.resource_attributes, &spec.non_resource_attributes) {
                (Some(r), None) => ReviewRequest::Resource(ResourceRequest {
                    namespace: r.namespace.clone().filter(|n| !n.is_empty()),
                    verb: r.verb.clone().unwrap_or_default(),
                    api_group: r.group.clone().unwrap_or_default(),
                    resource: r.resource.clone().unwrap_or_default(),
                    subresource: r.subresource.clone().unwrap_or_default(),
                    name: r.name.clone().unwrap_or_default(),
                }),
                (None, Some(n)) => ReviewRequest::NonResource(NonResourceRequest {
                    path: n.path.clone().unwrap_or_default(),
                    verb: n.verb.clone().unwrap_or_default(),
                }),
                _ => return bad_request(
                    "exactly one of nonResourceAttributes or resourceAttributes must be specified",
                ),
            };
            let attrs = ReviewAttributes {
                user: user.username.unwrap_or_default(),
                groups: user.groups.unwrap_or_default(),
                uid: user.uid.unwrap_or_default(),
                request,
            };
            let decision = lock(&inner.rbac).policy.authorize(&attrs);
            review.status = Some(SubjectAccessReviewStatus {
                allowed: decision.allowed,
                reason: Some(decision.reason).filter(|r| !r.is_empty()),
                ..Default::default()
            });
            boxed(h::json_value(StatusCode::CREATED, &review))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{StreamExt, TryStreamExt};
    use k8s_openapi::api::authentication::v1::TokenReviewSpec;
    use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReviewSpec};
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    use kube::api::{ListParams, PostParams};
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use kube::runtime::watcher;
    use kube::Api;

    const CLIENT_ID: &str = "7f3c2d1e-0a9b-4c8d-9e6f-5a4b3c2d1e0f";
    const ENTRA_AUDIENCE: &str = "api://AzureADTokenExchange";

    fn policy_yaml(binding: &str, sa_ns: &str, sa: &str) -> String {
        format!(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: use-demo}}
rules:
- {{verbs: [use-managed-identity], apiGroups: [cid.wi.aks.azure.com], resources: ["{CLIENT_ID}"]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {binding}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: use-demo}}
subjects:
- {{kind: ServiceAccount, name: {sa}, namespace: {sa_ns}}}
"#
        )
    }

    const ROLE_ONLY: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: use-demo}
rules:
- {verbs: [use-managed-identity], apiGroups: [cid.wi.aks.azure.com], resources: ["7f3c2d1e-0a9b-4c8d-9e6f-5a4b3c2d1e0f"]}
"#;

    async fn start_in(dir: &Path, rbac_file: Option<PathBuf>) -> KubeEmulator {
        KubeEmulator::start(KubeEmulatorConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: dir.to_path_buf(),
            rbac_file,
            issuer: None,
        })
        .await
        .unwrap()
    }

    async fn client(emu: &KubeEmulator) -> kube::Client {
        identity_binding_proxy::crypto::install_provider();
        let kubeconfig = Kubeconfig::read_from(emu.kubeconfig_path()).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        kube::Client::try_from(config).unwrap()
    }

    fn demo_token(emu: &KubeEmulator, audiences: &[&str], expires_in_secs: i64) -> String {
        emu.mint_token(&MintRequest {
            namespace: "demo".into(),
            service_account: "demo".into(),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expires_in_secs,
            pod_name: Some("demo-pod".into()),
        })
        .unwrap()
    }

    async fn review(client: &kube::Client, token: &str, audiences: &[&str]) -> TokenReviewStatus {
        let api: Api<TokenReview> = Api::all(client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: (!audiences.is_empty())
                    .then(|| audiences.iter().map(|a| a.to_string()).collect()),
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &review)
            .await
            .unwrap()
            .status
            .unwrap()
    }

    async fn sar(client: &kube::Client, user: &str) -> SubjectAccessReviewStatus {
        let api: Api<SubjectAccessReview> = Api::all(client.clone());
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.into()),
                groups: Some(vec!["system:serviceaccounts".into()]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some("use-managed-identity".into()),
                    group: Some("cid.wi.aks.azure.com".into()),
                    resource: Some(CLIENT_ID.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &review)
            .await
            .unwrap()
            .status
            .unwrap()
    }

    async fn raw(
        emu: &KubeEmulator,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: &str,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", emu.url()))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(b) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {b}"));
        }
        let req = req
            .body(http_body_util::Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let fetched = identity_binding_proxy::http::client::fetch(
            &identity_binding_proxy::http::client::client(),
            req,
            Duration::from_secs(5),
            1 << 20,
        )
        .await
        .unwrap();
        (
            fetched.status,
            serde_json::from_slice(&fetched.body).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn token_review_of_valid_token_returns_service_account_user() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let client = client(&emu).await;
        let token = demo_token(&emu, &[ENTRA_AUDIENCE], 600);
        let status = review(&client, &token, &[ENTRA_AUDIENCE, "other"]).await;
        assert_eq!(status.authenticated, Some(true), "{status:?}");
        assert_eq!(status.audiences, Some(vec![ENTRA_AUDIENCE.to_string()]));
        let user = status.user.unwrap();
        assert_eq!(
            user.username.as_deref(),
            Some("system:serviceaccount:demo:demo")
        );
        assert_eq!(user.uid, Some(service_account_uid("demo", "demo")));
        assert_eq!(
            user.groups.unwrap(),
            vec![
                "system:serviceaccounts",
                "system:serviceaccounts:demo",
                "system:authenticated"
            ]
        );
        let extra = user.extra.unwrap();
        assert_eq!(
            extra["authentication.kubernetes.io/pod-name"],
            vec!["demo-pod"]
        );
        assert_eq!(
            extra["authentication.kubernetes.io/pod-uid"],
            vec![pod_uid("demo", "demo-pod")]
        );
        let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
            .unwrap()
            .claims;
        assert_eq!(
            extra["authentication.kubernetes.io/credential-id"],
            vec![format!("JTI={}", claims["jti"].as_str().unwrap())]
        );
        assert_eq!(claims["sub"], "system:serviceaccount:demo:demo");
        assert_eq!(claims["iss"], emu.issuer());
        assert_eq!(claims["aud"], json!([ENTRA_AUDIENCE]));
        assert_eq!(claims["kubernetes.io"]["pod"]["name"], "demo-pod");
        assert_eq!(emu.counts().token_reviews, 1);
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn token_review_without_audiences_requires_the_api_audience() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let client = client(&emu).await;
        let api_token = demo_token(&emu, &[], 600);
        let status = review(&client, &api_token, &[]).await;
        assert_eq!(status.authenticated, Some(true), "{status:?}");
        assert_eq!(status.audiences, Some(vec![emu.issuer()]));
        let entra_token = demo_token(&emu, &[ENTRA_AUDIENCE], 600);
        assert_eq!(
            review(&client, &entra_token, &[]).await.authenticated,
            Some(false)
        );
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn token_review_with_wrong_audience_is_unauthenticated() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let client = client(&emu).await;
        let token = demo_token(&emu, &["somebody-else"], 600);
        let status = review(&client, &token, &[ENTRA_AUDIENCE]).await;
        assert_eq!(status.authenticated, Some(false));
        assert!(status.user.is_none());
        assert_eq!(
            status.error.as_deref(),
            Some(
                "[invalid bearer token, token audiences [\"somebody-else\"] is invalid for the target audiences [\"api://AzureADTokenExchange\"]]"
            )
        );
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn token_review_of_expired_token_is_unauthenticated() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let client = client(&emu).await;
        let token = demo_token(&emu, &[ENTRA_AUDIENCE], -60);
        let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
            .unwrap()
            .claims;
        assert!(claims["exp"].as_i64().unwrap() < now_secs());
        assert!(claims["iat"].as_i64().unwrap() < claims["exp"].as_i64().unwrap());
        let status = review(&client, &token, &[ENTRA_AUDIENCE]).await;
        assert_eq!(status.authenticated, Some(false));
        assert_eq!(
            status.error.as_deref(),
            Some("[invalid bearer token, service account token has expired]")
        );
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn token_review_of_another_emulators_token_is_unauthenticated() {
        let dir = tempfile::tempdir().unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let other = start_in(other_dir.path(), None).await;
        let client = client(&emu).await;
        let foreign = demo_token(&other, &[ENTRA_AUDIENCE], 600);
        assert_eq!(
            review(&client, &foreign, &[ENTRA_AUDIENCE])
                .await
                .authenticated,
            Some(false)
        );
        // Same issuer, other key: the signature gives it away.
        let forged = mint(
            &other.inner.key,
            &emu.issuer(),
            &MintRequest {
                namespace: "demo".into(),
                service_account: "demo".into(),
                audiences: vec![ENTRA_AUDIENCE.into()],
                expires_in_secs: 600,
                pod_name: None,
            },
        )
        .unwrap();
        let status = review(&client, &forged, &[ENTRA_AUDIENCE]).await;
        assert_eq!(status.authenticated, Some(false));
        assert!(status.error.unwrap().contains("cryptographic"));
        assert_eq!(
            review(&client, "not-a-jwt", &[]).await.authenticated,
            Some(false)
        );
        emu.shutdown().await;
        other.shutdown().await;
    }

    #[tokio::test]
    async fn token_review_of_deleted_pod_is_unauthenticated() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let client = client(&emu).await;
        let token = demo_token(&emu, &[ENTRA_AUDIENCE], 600);
        emu.delete_pod("demo", "demo-pod");
        let status = review(&client, &token, &[ENTRA_AUDIENCE]).await;
        assert_eq!(status.authenticated, Some(false));
        assert_eq!(
            status.error.as_deref(),
            Some("[invalid bearer token, service account token has been invalidated]")
        );
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn token_review_of_deleted_service_account_is_unauthenticated() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let client = client(&emu).await;
        let token = emu
            .mint_token(&MintRequest {
                namespace: "demo".into(),
                service_account: "demo".into(),
                audiences: vec![ENTRA_AUDIENCE.into()],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            review(&client, &token, &[ENTRA_AUDIENCE])
                .await
                .authenticated,
            Some(true)
        );
        emu.delete_service_account("demo", "demo");
        assert_eq!(
            review(&client, &token, &[ENTRA_AUDIENCE])
                .await
                .authenticated,
            Some(false)
        );
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn subject_access_review_is_allowed_with_reason_or_denied() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        emu.set_rbac_yaml(&policy_yaml("demo-binding", "demo", "demo"))
            .unwrap();
        let client = client(&emu).await;
        let allowed = sar(&client, "system:serviceaccount:demo:demo").await;
        assert!(allowed.allowed);
        assert_eq!(
            allowed.reason.as_deref(),
            Some("RBAC: allowed by ClusterRoleBinding \"demo-binding\" of ClusterRole \"use-demo\" to ServiceAccount \"demo/demo\"")
        );
        let denied = sar(&client, "system:serviceaccount:demo:other").await;
        assert!(!denied.allowed);
        assert_eq!(denied.reason, None);
        assert_eq!(emu.counts().subject_access_reviews, 2);
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn subject_access_review_without_subject_or_attributes_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let bearer = bearer_of(&emu);
        let path = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
        let (code, body) = raw(&emu, Method::POST, path, Some(&bearer), r#"{"apiVersion":"authorization.k8s.io/v1","kind":"SubjectAccessReview","spec":{"resourceAttributes":{"verb":"get"}}}"#).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["reason"], "Invalid");
        assert_eq!(body["code"], 422);
        let (code, _) = raw(
            &emu,
            Method::POST,
            path,
            Some(&bearer),
            r#"{"spec":{"user":"u"}}"#,
        )
        .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
        let (code, body) = raw(&emu, Method::POST, path, Some(&bearer), "{not json").await;
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert_eq!(body["reason"], "BadRequest");
        emu.shutdown().await;
    }

    fn bearer_of(emu: &KubeEmulator) -> String {
        emu.inner.bearer.clone()
    }

    #[tokio::test]
    async fn set_rbac_yaml_changes_answers_and_keeps_policy_on_invalid_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let client = client(&emu).await;
        assert!(
            !sar(&client, "system:serviceaccount:demo:demo")
                .await
                .allowed
        );
        emu.set_rbac_yaml(&policy_yaml("b", "demo", "demo"))
            .unwrap();
        assert!(
            sar(&client, "system:serviceaccount:demo:demo")
                .await
                .allowed
        );
        assert!(emu.set_rbac_yaml("kind: [").is_err());
        assert!(
            sar(&client, "system:serviceaccount:demo:demo")
                .await
                .allowed
        );
        emu.set_rbac_yaml(ROLE_ONLY).unwrap();
        assert!(
            !sar(&client, "system:serviceaccount:demo:demo")
                .await
                .allowed
        );
        emu.shutdown().await;
    }

    async fn eventually<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        for _ in 0..50 {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn editing_the_rbac_file_changes_answers() {
        let dir = tempfile::tempdir().unwrap();
        let rbac = dir.path().join("rbac.yaml");
        std::fs::write(&rbac, ROLE_ONLY).unwrap();
        let emu = start_in(&dir.path().join("state"), Some(rbac.clone())).await;
        let client = client(&emu).await;
        assert!(
            !sar(&client, "system:serviceaccount:demo:demo")
                .await
                .allowed
        );
        std::fs::write(&rbac, policy_yaml("b", "demo", "demo")).unwrap();
        eventually("the grant", || async {
            sar(&client, "system:serviceaccount:demo:demo")
                .await
                .allowed
        })
        .await;
        // A broken edit keeps the last good policy.
        std::fs::write(&rbac, "kind: [").unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            sar(&client, "system:serviceaccount:demo:demo")
                .await
                .allowed
        );
        std::fs::write(&rbac, ROLE_ONLY).unwrap();
        eventually("the revocation", || async {
            !sar(&client, "system:serviceaccount:demo:demo")
                .await
                .allowed
        })
        .await;
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn watcher_sees_binding_added_then_deleted_after_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let rbac = dir.path().join("rbac.yaml");
        std::fs::write(&rbac, ROLE_ONLY).unwrap();
        let emu = start_in(&dir.path().join("state"), Some(rbac.clone())).await;
        let client = client(&emu).await;
        let api: Api<ClusterRoleBinding> = Api::all(client.clone());
        let mut events = watcher(api, watcher::Config::default()).boxed();

        async fn next<S>(events: &mut S) -> watcher::Event<ClusterRoleBinding>
        where
            S: futures::Stream<Item = watcher::Result<watcher::Event<ClusterRoleBinding>>> + Unpin,
        {
            tokio::time::timeout(Duration::from_secs(10), events.try_next())
                .await
                .expect("watch event in time")
                .expect("watch ok")
                .expect("stream open")
        }
        assert!(matches!(next(&mut events).await, watcher::Event::Init));
        assert!(matches!(next(&mut events).await, watcher::Event::InitDone));

        std::fs::write(&rbac, policy_yaml("demo-binding", "demo", "demo")).unwrap();
        match next(&mut events).await {
            watcher::Event::Apply(crb) => {
                assert_eq!(crb.metadata.name.as_deref(), Some("demo-binding"));
                assert!(crb.metadata.uid.is_some());
                assert!(crb.metadata.resource_version.is_some());
            }
            other => panic!("expected the binding to be applied, got {other:?}"),
        }
        std::fs::write(&rbac, ROLE_ONLY).unwrap();
        match next(&mut events).await {
            watcher::Event::Delete(crb) => {
                assert_eq!(crb.metadata.name.as_deref(), Some("demo-binding"))
            }
            other => panic!("expected the binding to be deleted, got {other:?}"),
        }
        let counts = emu.counts();
        assert!(
            counts.rbac_lists >= 1 && counts.rbac_watches >= 1,
            "{counts:?}"
        );
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn streaming_list_watcher_gets_initial_objects_and_end_bookmark() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        emu.set_rbac_yaml(&policy_yaml("demo-binding", "demo", "demo"))
            .unwrap();
        let client = client(&emu).await;
        let api: Api<ClusterRoleBinding> = Api::all(client);
        let mut events = watcher(api, watcher::Config::default().streaming_lists()).boxed();
        let mut seen = Vec::new();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), events.try_next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            match ev {
                watcher::Event::InitApply(crb) => seen.push(crb.metadata.name.unwrap()),
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
        assert_eq!(seen, vec!["demo-binding"]);
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn list_pages_and_selectors_follow_kubernetes_semantics() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        emu.set_rbac_yaml(
            r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: a, namespace: one, labels: {team: x}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: b, namespace: one}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: c, namespace: two, labels: {team: x}}
"#,
        )
        .unwrap();
        let client = client(&emu).await;
        let all: Api<k8s_openapi::api::rbac::v1::Role> = Api::all(client.clone());
        let names = |list: kube::core::ObjectList<k8s_openapi::api::rbac::v1::Role>| {
            list.items
                .into_iter()
                .map(|r| r.metadata.name.unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(all.list(&ListParams::default()).await.unwrap()),
            ["a", "b", "c"]
        );
        assert_eq!(
            names(
                all.list(&ListParams::default().labels("team=x"))
                    .await
                    .unwrap()
            ),
            ["a", "c"]
        );
        assert_eq!(
            names(
                all.list(&ListParams::default().labels("team notin (x)"))
                    .await
                    .unwrap()
            ),
            ["b"]
        );
        let one: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(client.clone(), "one");
        assert_eq!(
            names(one.list(&ListParams::default()).await.unwrap()),
            ["a", "b"]
        );
        assert_eq!(
            one.get("b").await.unwrap().metadata.namespace.as_deref(),
            Some("one")
        );
        assert!(one.get("c").await.is_err());

        let page = all.list(&ListParams::default().limit(2)).await.unwrap();
        let token = page.metadata.continue_.clone().unwrap();
        assert_eq!(names(page), ["a", "b"]);
        let rest = all
            .list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap();
        assert!(rest.metadata.continue_.as_deref().is_none_or(str::is_empty));
        assert_eq!(names(rest), ["c"]);
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn watch_from_compacted_resource_version_gets_410_error_event() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        // Push the history window past resource version 2.
        for i in 0..(HISTORY_LIMIT / 2 + 1) {
            emu.set_rbac_yaml(&policy_yaml(&format!("b{i}"), "demo", "demo"))
                .unwrap();
        }
        let path = "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings?watch=true&resourceVersion=2&timeoutSeconds=1";
        let (code, body) = raw(&emu, Method::GET, path, Some(&bearer_of(&emu)), "").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["type"], "ERROR");
        assert_eq!(body["object"]["code"], 410);
        assert_eq!(body["object"]["reason"], "Expired");
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn api_requests_without_the_kubeconfig_bearer_get_401() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let path = "/apis/rbac.authorization.k8s.io/v1/clusterroles";
        for bearer in [None, Some("wrong")] {
            let (code, body) = raw(&emu, Method::GET, path, bearer, "").await;
            assert_eq!(code, StatusCode::UNAUTHORIZED);
            assert_eq!(body["kind"], "Status");
            assert_eq!(body["reason"], "Unauthorized");
            assert_eq!(body["code"], 401);
        }
        let (code, body) = raw(
            &emu,
            Method::GET,
            "/apis/nothing/v1/here",
            Some(&bearer_of(&emu)),
            "",
        )
        .await;
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert_eq!(body["reason"], "NotFound");
        // The issuer's discovery documents are public, like a cluster's OIDC issuer.
        let (code, body) = raw(
            &emu,
            Method::GET,
            "/.well-known/openid-configuration",
            None,
            "",
        )
        .await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["issuer"], emu.issuer());
        assert_eq!(body["jwks_uri"], format!("{}/openid/v1/jwks", emu.url()));
        let (code, body) = raw(&emu, Method::GET, "/openid/v1/jwks", None, "").await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["keys"][0]["kid"], emu.inner.key.kid());
        assert_eq!(emu.counts().jwks_requests, 1);
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn unavailable_emulator_answers_503_until_back_up() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let client = client(&emu).await;
        // kube-rs retries 503 with backoff for minutes by default; see the failure directly.
        let no_retry = {
            let kubeconfig = Kubeconfig::read_from(emu.kubeconfig_path()).unwrap();
            let mut config =
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .unwrap();
            config.default_retry = false;
            kube::Client::try_from(config).unwrap()
        };
        emu.set_available(false);
        let (code, body) = raw(
            &emu,
            Method::GET,
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            Some(&bearer_of(&emu)),
            "",
        )
        .await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["code"], 503);
        let api: Api<TokenReview> = Api::all(no_retry);
        let err = api
            .create(
                &PostParams::default(),
                &TokenReview {
                    spec: TokenReviewSpec {
                        token: Some("x".into()),
                        audiences: None,
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        match err {
            kube::Error::Api(status) => assert_eq!(status.code, 503),
            other => panic!("expected a 503 Status, got {other:?}"),
        }
        // The default client keeps retrying and gets through once the emulator is back.
        let token = demo_token(&emu, &[], 600);
        let pending = tokio::spawn({
            let client = client.clone();
            async move { review(&client, &token, &[]).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        emu.set_available(true);
        let status = tokio::time::timeout(Duration::from_secs(20), pending)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.authenticated, Some(true));
        emu.shutdown().await;
    }

    #[tokio::test]
    async fn token_minted_from_state_dir_verifies_against_restarted_emulator() {
        let dir = tempfile::tempdir().unwrap();
        let first = start_in(dir.path(), None).await;
        let issuer = first.issuer();
        let kid = first.inner.key.kid().to_string();
        first.shutdown().await;
        let token = mint_from_state_dir(
            dir.path(),
            &MintRequest {
                namespace: "demo".into(),
                service_account: "demo".into(),
                audiences: vec![ENTRA_AUDIENCE.into()],
                expires_in_secs: 600,
                pod_name: Some("demo-pod".into()),
            },
        )
        .unwrap();
        let second = start_in(dir.path(), None).await;
        assert_eq!(second.issuer(), issuer);
        assert_eq!(second.inner.key.kid(), kid);
        let client = client(&second).await;
        assert_eq!(
            review(&client, &token, &[ENTRA_AUDIENCE])
                .await
                .authenticated,
            Some(true)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        second.shutdown().await;
        assert!(mint_from_state_dir(&dir.path().join("absent"), &MintRequest::default()).is_err());
    }

    #[tokio::test]
    async fn shutdown_ends_open_watches() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let client = client(&emu).await;
        let api: Api<ClusterRoleBinding> = Api::all(client);
        let mut stream = api
            .watch(&kube::api::WatchParams::default().timeout(290), "0")
            .await
            .unwrap()
            .boxed();
        emu.shutdown().await;
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        assert!(matches!(end, Ok(None) | Ok(Some(Err(_)))), "{end:?}");
    }

    #[tokio::test]
    async fn discovery_lists_the_served_groups_and_resources() {
        let dir = tempfile::tempdir().unwrap();
        let emu = start_in(dir.path(), None).await;
        let client = client(&emu).await;
        let groups = client.list_api_groups().await.unwrap();
        let names: Vec<_> = groups.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(
            names,
            ["authentication.k8s.io", "authorization.k8s.io", RBAC_GROUP]
        );
        let rbac = client
            .list_api_group_resources("rbac.authorization.k8s.io/v1")
            .await
            .unwrap();
        let roles = rbac.resources.iter().find(|r| r.name == "roles").unwrap();
        assert!(roles.namespaced);
        assert_eq!(roles.verbs, ["get", "list", "watch"]);
        assert_eq!(
            client.list_core_api_versions().await.unwrap().versions,
            ["v1"]
        );
        assert_eq!(client.apiserver_version().await.unwrap().minor, "33");
        emu.shutdown().await;
    }

    #[test]
    fn label_selectors_parse_like_the_apiserver() {
        let labels: BTreeMap<String, String> = [
            ("app".to_string(), "web".to_string()),
            ("tier".to_string(), "fe".to_string()),
        ]
        .into();
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web,tier=fe", true),
            ("app!=web", false),
            ("app in (web, api)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("missing", false),
        ] {
            let reqs = parse_label_selector(sel).unwrap();
            assert_eq!(reqs.iter().all(|r| r.matches(&labels)), want, "{sel}");
        }
        assert!(parse_label_selector("app in web").is_err());
        assert!(parse_field_selector("metadata.name=x").is_ok());
        assert!(parse_field_selector("spec.x=y").is_err());
    }
}
