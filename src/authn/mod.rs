//! Step 2 of a token request: who is calling? The service-account token is verified locally
//! against the cluster's JWKS (fast path), then, in `both`/`tokenreview` mode, confirmed by a
//! TokenReview that catches tokens of deleted pods and service accounts. TokenReview answers
//! are cached by SHA-256 of the token until min(token expiry, TTL).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::cluster::{Cluster, ClusterError};
use crate::error::{codes, ProxyError, Result};
use crate::metrics::Metrics;

/// Between two JWKS refreshes caused by unknown `kid`s: a flood of forged kids must not turn
/// into a flood of apiserver requests.
const UNKNOWN_KID_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Clock skew tolerated on `exp`/`nbf`, as the apiserver does for projected tokens.
const LEEWAY_SECS: u64 = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthnMode {
    /// Local JWKS verification only.
    Local,
    /// TokenReview only.
    Tokenreview,
    /// Local verification, then a cached TokenReview (catches deleted pods).
    Both,
}

/// The authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    pub sa_uid: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    /// `system:serviceaccount:<ns>:<name>`.
    pub username: String,
    pub groups: Vec<String>,
}

impl Caller {
    fn new(namespace: &str, name: &str, sa_uid: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            service_account: name.to_string(),
            sa_uid: sa_uid.to_string(),
            pod_name: None,
            pod_uid: None,
            username: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_string(),
            ],
        }
    }
}

#[derive(Deserialize)]
struct SaClaims {
    sub: String,
    exp: u64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubeClaims>,
}

#[derive(Deserialize)]
struct KubeClaims {
    namespace: String,
    serviceaccount: NamedRef,
    pod: Option<NamedRef>,
}

#[derive(Deserialize)]
struct NamedRef {
    name: String,
    #[serde(default)]
    uid: String,
}

/// The cluster's signing keys, by `kid`.
#[derive(Default)]
struct Jwks {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    unnamed: Vec<(DecodingKey, Algorithm)>,
    /// Each key's JWK as published, by `kid` (and the unnamed ones in order): what tells a
    /// refresh which keys left or changed.
    published: HashMap<String, String>,
    unnamed_published: Vec<String>,
}

impl Jwks {
    /// The `kid`s of `self` that `next` no longer publishes as they were.
    fn gone_in(&self, next: &Jwks) -> std::collections::HashSet<String> {
        self.published
            .iter()
            .filter(|(kid, jwk)| next.published.get(*kid) != Some(*jwk))
            .map(|(kid, _)| kid.clone())
            .collect()
    }
}

impl Jwks {
    fn parse(text: &str) -> std::result::Result<Self, String> {
        let set: JwkSet =
            serde_json::from_str(text).map_err(|e| format!("JWKS is not valid: {e}"))?;
        let mut jwks = Jwks::default();
        for jwk in &set.keys {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    jsonwebtoken::jwk::EllipticCurve::P384 => Algorithm::ES384,
                    _ => Algorithm::ES256,
                },
                _ => continue, // symmetric or unknown key types are never trusted
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| Algorithm::from_str_opt(&a.to_string()))
                .unwrap_or(alg);
            let published = serde_json::to_string(jwk).unwrap_or_default();
            match &jwk.common.key_id {
                Some(kid) => {
                    jwks.keys.insert(kid.clone(), (key, alg));
                    jwks.published.insert(kid.clone(), published);
                }
                None => {
                    jwks.unnamed.push((key, alg));
                    jwks.unnamed_published.push(published);
                }
            }
        }
        if jwks.keys.is_empty() && jwks.unnamed.is_empty() {
            return Err("JWKS holds no usable asymmetric key".into());
        }
        Ok(jwks)
    }
}

trait AlgorithmExt: Sized {
    fn from_str_opt(s: &str) -> Option<Self>;
}

impl AlgorithmExt for Algorithm {
    fn from_str_opt(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

/// A locally verified token: who, until when, and the `kid` of the key that vouched for it.
#[derive(Clone)]
struct Verified {
    caller: Arc<Caller>,
    until: Instant,
    kid: Option<Arc<str>>,
}

/// A cached TokenReview answer.
#[derive(Clone)]
enum Reviewed {
    Authenticated(Arc<Caller>),
    Refused(String),
}

pub struct AuthnConfig {
    pub audience: String,
    pub mode: AuthnMode,
    pub review_ttl: Duration,
    /// Where the last good issuer + JWKS are kept, so a restart while the apiserver is
    /// unreachable still verifies tokens.
    pub persist_dir: Option<std::path::PathBuf>,
}

/// The persisted form of the cluster's keys.
#[derive(serde::Serialize, serde::Deserialize)]
struct PersistedKeys {
    issuer: String,
    jwks: String,
}

const PERSIST_FILE: &str = "cluster-jwks.json";

pub struct Authenticator {
    cluster: Arc<Cluster>,
    config: AuthnConfig,
    issuer: ArcSwap<String>,
    jwks: ArcSwap<Jwks>,
    jwks_loaded: std::sync::atomic::AtomicBool,
    /// Whether the latest JWKS fetch succeeded: an unknown `kid` proves a forged or foreign
    /// token only while we can see the apiserver's current keys.
    jwks_fresh: std::sync::atomic::AtomicBool,
    last_refresh: Mutex<Option<Instant>>,
    /// TokenReview answers by SHA-256 of the token. Concurrent first requests with one token
    /// share one review (moka coalesces `try_get_with`).
    reviews: moka::future::Cache<[u8; 32], (Reviewed, Instant)>,
    /// Callers whose tokens passed local verification, by SHA-256 of the token, with the
    /// `kid` of the key that verified them.
    verified: moka::sync::Cache<[u8; 32], Verified>,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    pub fn new(cluster: Arc<Cluster>, config: AuthnConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            cluster,
            config,
            issuer: ArcSwap::from_pointee(String::new()),
            jwks: ArcSwap::from_pointee(Jwks::default()),
            jwks_loaded: Default::default(),
            jwks_fresh: Default::default(),
            last_refresh: Mutex::new(None),
            // Bounded: one entry per distinct live token on this node.
            verified: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3600))
                .support_invalidation_closures()
                .build(),
            reviews: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            metrics,
        }
    }

    /// Tokens whose local verification is remembered now.
    pub fn verified_tokens(&self) -> u64 {
        self.verified.run_pending_tasks();
        self.verified.entry_count()
    }

    /// True once the issuer and a JWKS have been loaded (readiness).
    pub fn ready(&self) -> bool {
        self.jwks_loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Fetches the issuer and the JWKS from the apiserver (and persists them).
    pub async fn refresh_keys(&self) -> std::result::Result<(), ClusterError> {
        *self.last_refresh.lock().await = Some(Instant::now());
        let fetched = async {
            let issuer = self.cluster.issuer().await?;
            let text = self.cluster.jwks().await?;
            self.install_keys(&issuer, &text)
                .map_err(ClusterError::Unexpected)?;
            Ok::<_, ClusterError>((issuer, text))
        }
        .await;
        self.jwks_fresh
            .store(fetched.is_ok(), std::sync::atomic::Ordering::Release);
        let (issuer, text) = fetched?;
        if let Some(dir) = &self.config.persist_dir {
            let persisted = PersistedKeys { issuer, jwks: text };
            if let Err(e) = persist(dir, &persisted) {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot persist the cluster JWKS");
            }
        }
        Ok(())
    }

    fn install_keys(&self, issuer: &str, jwks_text: &str) -> std::result::Result<(), String> {
        let jwks = Jwks::parse(jwks_text)?;
        let old = self.jwks.load_full();
        let issuer_changed = **self.issuer.load() != issuer;
        let gone = old.gone_in(&jwks);
        let unnamed_changed = old.unnamed_published != jwks.unnamed_published;
        self.issuer.store(Arc::new(issuer.to_string()));
        self.jwks.store(Arc::new(jwks));
        // A key that left the JWKS (or changed under its kid) must not keep vouching for
        // tokens it signed; tokens of the keys still published stay verified, so a refresh —
        // which a forged kid can trigger — costs no signature checks.
        if issuer_changed {
            self.verified.invalidate_all();
        } else if !gone.is_empty() || unnamed_changed {
            let dropped = self
                .verified
                .invalidate_entries_if(move |_, v| match &v.kid {
                    Some(kid) => gone.contains(kid.as_ref()),
                    None => unnamed_changed,
                });
            if let Err(e) = dropped {
                tracing::warn!(error = %e, "dropping every verified token instead");
                self.verified.invalidate_all();
            }
        }
        self.jwks_loaded
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Loads the keys persisted by an earlier run, if any. Returns whether keys were loaded.
    pub fn load_persisted(&self) -> bool {
        let Some(dir) = &self.config.persist_dir else {
            return false;
        };
        let Ok(bytes) = std::fs::read(dir.join(PERSIST_FILE)) else {
            return false;
        };
        match serde_json::from_slice::<PersistedKeys>(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|p| self.install_keys(&p.issuer, &p.jwks))
        {
            Ok(()) => {
                tracing::info!("loaded the persisted cluster JWKS");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the persisted cluster JWKS");
                false
            }
        }
    }

    /// Keeps the JWKS fresh: retries quickly until the first load, then refreshes every
    /// `period` (key rotation on the apiserver is announced by new keys appearing here).
    pub async fn run_refresh(
        self: Arc<Self>,
        period: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let wait = match self.refresh_keys().await {
                Ok(()) => period,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot load the cluster's service-account JWKS");
                    if self.ready() {
                        period.min(Duration::from_secs(10))
                    } else {
                        Duration::from_millis(500)
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Authenticates a service-account token.
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Caller>> {
        let digest = token_digest(token);
        let local = match self.config.mode {
            AuthnMode::Tokenreview => None,
            AuthnMode::Local | AuthnMode::Both => Some(self.verify_cached(token, &digest).await?),
        };
        match self.config.mode {
            AuthnMode::Local => local.ok_or_else(|| ProxyError::Internal("no caller".into())),
            AuthnMode::Tokenreview | AuthnMode::Both => {
                let reviewed = self.review(token, digest).await?;
                // In `both` mode the local claims are the source of pod information; the
                // review must agree on who the caller is.
                match local {
                    Some(local) if local.username != reviewed.username => {
                        Err(ProxyError::invalid_assertion(
                            "The TokenReview names a different user than the token's claims; \
                             the token is refused.",
                        ))
                    }
                    Some(local) => Ok(local),
                    None => Ok(reviewed),
                }
            }
        }
    }

    /// Local verification, remembered by SHA-256 of the token until the token expires: a
    /// signature check costs ~30 µs, more than the rest of a cache hit together. The memory is
    /// dropped whenever the cluster's keys change.
    async fn verify_cached(&self, token: &str, digest: &[u8; 32]) -> Result<Arc<Caller>> {
        if let Some(v) = self.verified.get(digest) {
            if Instant::now() < v.until {
                return Ok(v.caller);
            }
        }
        let caller = Arc::new(self.verify_locally(token).await?);
        let kid = pre_parse_header(token)
            .ok()
            .and_then(|h| h.kid)
            .map(Arc::from);
        self.verified.insert(
            *digest,
            Verified {
                caller: caller.clone(),
                until: Instant::now() + token_ttl(token),
                kid,
            },
        );
        Ok(caller)
    }

    /// The local fast path alone: signature, issuer, audience and times against the JWKS.
    pub async fn verify_locally(&self, token: &str) -> Result<Caller> {
        let header = pre_parse_header(token)?;
        let key = match self.find_key(header.kid.as_deref(), header.alg) {
            Some(k) => k,
            None => {
                self.refresh_for_unknown_kid().await;
                self.find_key(header.kid.as_deref(), header.alg)
                    .ok_or_else(|| self.describe_missing_key(&header))?
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.config.audience]);
        let issuer = self.issuer.load_full();
        validation.set_issuer(&[issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<SaClaims>(token, &key, &validation)
            .map_err(|e| self.describe_jwt_error(e, token, &issuer))?;
        caller_from_claims(&data.claims)
    }

    fn find_key(&self, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let jwks = self.jwks.load();
        let family_ok = |key_alg: Algorithm| family(key_alg) == family(alg);
        match kid {
            Some(kid) => jwks
                .keys
                .get(kid)
                .filter(|(_, a)| family_ok(*a))
                .map(|(k, _)| k.clone()),
            None => jwks
                .unnamed
                .iter()
                .find(|(_, a)| family_ok(*a))
                .map(|(k, _)| k.clone()),
        }
    }

    /// Why no key verifies this header: no `kid`, a `kid` we do not know, or a known key of
    /// another algorithm family (an RSA key cannot check an ES256 signature).
    fn describe_missing_key(&self, header: &PreHeader) -> ProxyError {
        if !self.jwks_fresh.load(std::sync::atomic::Ordering::Acquire) {
            // The key may simply be new (rotation): refusing would make the SDK give up on
            // a token that is probably fine, so ask it to retry instead.
            return ProxyError::Unavailable {
                retry_after: 2,
                description: "The service-account token cannot be verified now: its signing key \
                              is not among the cluster keys this proxy holds, and the \
                              Kubernetes API server's JWKS (/openid/v1/jwks) cannot be fetched. \
                              Retry shortly."
                    .into(),
            };
        }
        let Some(raw_kid) = header.kid.as_deref() else {
            return ProxyError::invalid_assertion(
                "The service-account token names no signing key (its header has no 'kid'), \
                 and this cluster's service-account issuer has no key without one. Use the \
                 token projected by this cluster (AZURE_FEDERATED_TOKEN_FILE).",
            );
        };
        let kid = crate::token::printable(raw_kid, 64);
        if let Some((_, key_alg)) = self.jwks.load().keys.get(raw_kid) {
            return ProxyError::invalid_assertion(format!(
                "The service-account token's algorithm '{:?}' does not match key '{kid}' of this \
                 cluster's service-account issuer, which signs with {key_alg:?}. The token was \
                 altered; use the unmodified token from AZURE_FEDERATED_TOKEN_FILE.",
                header.alg
            ));
        }
        ProxyError::invalid_assertion(format!(
            "The service-account token is signed with key '{kid}', which this cluster's \
             service-account issuer does not publish. Use a token projected by this cluster \
             (AZURE_FEDERATED_TOKEN_FILE), not one from another cluster."
        ))
    }

    async fn refresh_for_unknown_kid(&self) {
        {
            let last = self.last_refresh.lock().await;
            if last.is_some_and(|t| t.elapsed() < UNKNOWN_KID_REFRESH_INTERVAL) {
                return;
            }
        }
        if let Err(e) = self.refresh_keys().await {
            tracing::warn!(error = %e, "JWKS refresh for an unknown key id failed");
        }
    }

    fn describe_jwt_error(
        &self,
        e: jsonwebtoken::errors::Error,
        token: &str,
        issuer: &str,
    ) -> ProxyError {
        use jsonwebtoken::errors::ErrorKind;
        let unverified = unverified_claims(token);
        match e.kind() {
            ErrorKind::ExpiredSignature => ProxyError::InvalidAssertion {
                code: codes::ASSERTION_EXPIRED,
                description: format!(
                    "The service-account token expired{}. Kubelet rotates projected tokens: \
                     read AZURE_FEDERATED_TOKEN_FILE again before each token request.",
                    unverified["exp"].as_u64().map(|t| format!(" at {}", crate::oauth::entra_timestamp(UNIX_EPOCH + Duration::from_secs(t)))).unwrap_or_default()
                ),
            },
            ErrorKind::ImmatureSignature => ProxyError::InvalidAssertion {
                code: codes::ASSERTION_EXPIRED,
                description: "The service-account token is not valid yet (nbf is in the future). Check the node's clock.".into(),
            },
            ErrorKind::InvalidAudience => ProxyError::invalid_assertion(format!(
                "The service-account token's audience {} does not include '{}'. Project the \
                 token with audience '{}' (the workload identity webhook does this for pods \
                 annotated for identity binding).",
                crate::token::printable(&unverified["aud"].to_string(), 200),
                self.config.audience,
                self.config.audience
            )),
            ErrorKind::InvalidIssuer => ProxyError::invalid_assertion(format!(
                "The service-account token was issued by '{}', but this cluster's issuer is \
                 '{}'. Use a token projected by this cluster.",
                crate::token::printable(unverified["iss"].as_str().unwrap_or("<none>"), 200),
                issuer
            )),
            ErrorKind::MissingRequiredClaim(claim) => ProxyError::invalid_assertion(format!(
                "The service-account token has no '{claim}' claim; it is not a projected \
                 service-account token."
            )),
            ErrorKind::InvalidSignature => ProxyError::invalid_assertion(
                "The service-account token's signature is not valid for this cluster's \
                 service-account issuer key. Use the unmodified token from \
                 AZURE_FEDERATED_TOKEN_FILE.",
            ),
            // The claims are deserialized before jsonwebtoken checks required claims, so a
            // missing `exp` surfaces as a JSON error: name the claim instead.
            _ => match ["exp", "iss", "aud", "sub"]
                .into_iter()
                .find(|c| unverified.is_object() && unverified.get(c).is_none())
            {
                Some(claim) => ProxyError::invalid_assertion(format!(
                    "The service-account token has no '{claim}' claim; it is not a projected \
                     service-account token."
                )),
                None => ProxyError::invalid_assertion(
                    "The service-account token could not be read as a signed JWT. Send the \
                     projected token from AZURE_FEDERATED_TOKEN_FILE as client_assertion.",
                ),
            },
        }
    }

    async fn review(&self, token: &str, digest: [u8; 32]) -> Result<Arc<Caller>> {
        if let Some((reviewed, until)) = self.reviews.get(&digest).await {
            if Instant::now() < until {
                return reviewed_result(reviewed);
            }
            self.reviews.invalidate(&digest).await;
        }
        let (reviewed, _) = self
            .reviews
            .try_get_with(digest, self.fresh_review(token))
            .await
            .map_err(|e: Arc<ProxyError>| (*e).clone())?;
        reviewed_result(reviewed)
    }

    /// Asks the apiserver; failures are not cached.
    async fn fresh_review(&self, token: &str) -> Result<(Reviewed, Instant)> {
        let status = match self
            .cluster
            .token_review(token, &self.config.audience)
            .await
        {
            Ok(s) => {
                self.metrics.kube_review("tokenreview", "ok");
                s
            }
            Err(e) => {
                self.metrics.kube_review("tokenreview", "error");
                return Err(ProxyError::Unavailable {
                    retry_after: 2,
                    description: format!(
                        "The service-account token could not be checked with a TokenReview: {e}. \
                         Retry shortly."
                    ),
                });
            }
        };
        let reviewed = if status.authenticated.unwrap_or(false) {
            let user = status.user.unwrap_or_default();
            let username = user.username.unwrap_or_default();
            match username
                .strip_prefix("system:serviceaccount:")
                .and_then(|r| r.split_once(':'))
            {
                Some((ns, name)) => {
                    let mut caller = Caller::new(ns, name, user.uid.as_deref().unwrap_or(""));
                    if let Some(extra) = user.extra {
                        caller.pod_name = extra
                            .get("authentication.kubernetes.io/pod-name")
                            .and_then(|v| v.first().cloned());
                        caller.pod_uid = extra
                            .get("authentication.kubernetes.io/pod-uid")
                            .and_then(|v| v.first().cloned());
                    }
                    Reviewed::Authenticated(Arc::new(caller))
                }
                None => Reviewed::Refused(format!(
                    "the token belongs to '{}', not to a service account",
                    crate::token::printable(&username, 120)
                )),
            }
        } else {
            Reviewed::Refused(
                status
                    .error
                    .unwrap_or_else(|| "the token is not authenticated".into()),
            )
        };
        let ttl = token_ttl(token).min(self.config.review_ttl);
        Ok((reviewed, Instant::now() + ttl))
    }
}

fn token_digest(token: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn persist(dir: &std::path::Path, keys: &PersistedKeys) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{PERSIST_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(keys).unwrap_or_default())?;
    std::fs::rename(tmp, dir.join(PERSIST_FILE))
}

fn reviewed_result(reviewed: Reviewed) -> Result<Arc<Caller>> {
    match reviewed {
        Reviewed::Authenticated(c) => Ok(c),
        Reviewed::Refused(why) => Err(ProxyError::invalid_assertion(format!(
            "The Kubernetes API server did not accept the service-account token ({}). The pod \
             or service account may have been deleted; restart the pod to get a fresh token.",
            crate::token::printable(&why, 300)
        ))),
    }
}

/// Remaining lifetime of a token by its unverified `exp` (it was verified or reviewed already).
fn token_ttl(token: &str) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    unverified_claims(token)["exp"]
        .as_u64()
        .map(|exp| Duration::from_secs(exp.saturating_sub(now)))
        .unwrap_or_default()
}

fn caller_from_claims(claims: &SaClaims) -> Result<Caller> {
    let Some(k) = &claims.kubernetes else {
        return Err(ProxyError::invalid_assertion(
            "The token has no 'kubernetes.io' claim: it is not a service-account token.",
        ));
    };
    let expected_sub = format!(
        "system:serviceaccount:{}:{}",
        k.namespace, k.serviceaccount.name
    );
    if claims.sub != expected_sub {
        return Err(ProxyError::invalid_assertion(
            "The token's subject does not match its service account claims.",
        ));
    }
    let _ = claims.exp;
    let mut caller = Caller::new(&k.namespace, &k.serviceaccount.name, &k.serviceaccount.uid);
    if let Some(pod) = &k.pod {
        caller.pod_name = Some(pod.name.clone());
        caller.pod_uid = Some(pod.uid.clone());
    }
    Ok(caller)
}

/// The JOSE header fields read before verification.
#[derive(Debug)]
pub struct PreHeader {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// Reads the JOSE header before any verification, to refuse `none` and HMAC outright with a
/// clear message (jsonwebtoken would only say "invalid algorithm"). Public for the fuzzers.
pub fn pre_parse_header(token: &str) -> Result<PreHeader> {
    let not_jwt = || {
        ProxyError::invalid_assertion(
            "client_assertion is not a JWT. Send the projected service-account token from \
             AZURE_FEDERATED_TOKEN_FILE.",
        )
    };
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_jwt());
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(h.trim_end_matches('='))
        .map_err(|_| not_jwt())?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| not_jwt())?;
    let alg = header["alg"].as_str().unwrap_or("");
    let alg = match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        other => {
            return Err(ProxyError::invalid_assertion(format!(
                "The token's signing algorithm '{}' is refused: only asymmetric algorithms \
                 (RS256, ES256, ...) are accepted for service-account tokens.",
                crate::token::printable(other, 20)
            )))
        }
    };
    let kid = header["kid"].as_str().map(str::to_string);
    Ok(PreHeader { alg, kid })
}

fn family(alg: Algorithm) -> u8 {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => 1,
        Algorithm::ES256 | Algorithm::ES384 => 2,
        _ => 0,
    }
}

/// The claims of a token without any verification: for error messages and TTLs only.
fn unverified_claims(token: &str) -> serde_json::Value {
    token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_names_only_the_keys_that_left_or_changed() {
        let a = crate::keys::SigningKey::generate(2048).unwrap();
        let b = crate::keys::SigningKey::generate(2048).unwrap();
        let c = crate::keys::SigningKey::generate(2048).unwrap();
        let set = |keys: &[(&str, &crate::keys::SigningKey)]| {
            let keys: Vec<serde_json::Value> = keys
                .iter()
                .map(|(kid, k)| {
                    let mut jwk = k.public().jwk();
                    jwk["kid"] = serde_json::json!(kid);
                    jwk
                })
                .collect();
            Jwks::parse(&serde_json::json!({ "keys": keys }).to_string()).unwrap()
        };
        let before = set(&[("a", &a), ("b", &b)]);
        assert!(before.gone_in(&set(&[("a", &a), ("b", &b)])).is_empty());
        assert!(before
            .gone_in(&set(&[("a", &a), ("b", &b), ("c", &c)]))
            .is_empty());
        let gone = before.gone_in(&set(&[("b", &b), ("c", &c)]));
        assert_eq!(gone.into_iter().collect::<Vec<_>>(), vec!["a".to_string()]);
        // The same kid with other key material is a key that left.
        let gone = before.gone_in(&set(&[("a", &c), ("b", &b)]));
        assert_eq!(gone.into_iter().collect::<Vec<_>>(), vec!["a".to_string()]);
    }

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn none_and_hmac_are_refused_before_verification() {
        for alg in ["none", "HS256", "HS512", ""] {
            let token = format!(
                "{}.{}.",
                b64(&serde_json::json!({"alg": alg})),
                b64(&serde_json::json!({}))
            );
            let token = format!("{token}sig");
            let err = pre_parse_header(&token).err().unwrap();
            assert!(err.to_string().contains("refused"), "{alg}: {err}");
            assert_eq!(err.status(), 401);
        }
    }

    #[test]
    fn garbage_is_not_a_jwt() {
        for t in ["", "abc", "a.b", "a.b.c.d", "!!!.b.c", "e30.e30.x"] {
            let err = pre_parse_header(t).err().unwrap();
            assert_eq!(err.status(), 401, "{t}");
        }
    }

    #[test]
    fn caller_comes_from_kubernetes_claims() {
        let claims: SaClaims = serde_json::from_value(serde_json::json!({
            "sub": "system:serviceaccount:demo:app", "exp": 1,
            "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "app", "uid": "u1"},
                              "pod": {"name": "p", "uid": "u2"}}
        }))
        .unwrap();
        let c = caller_from_claims(&claims).unwrap();
        assert_eq!(c.username, "system:serviceaccount:demo:app");
        assert_eq!(
            c.groups,
            vec![
                "system:serviceaccounts",
                "system:serviceaccounts:demo",
                "system:authenticated"
            ]
        );
        assert_eq!(c.pod_name.as_deref(), Some("p"));
    }

    #[test]
    fn subject_must_agree_with_kubernetes_claims() {
        let claims: SaClaims = serde_json::from_value(serde_json::json!({
            "sub": "system:serviceaccount:kube-system:admin", "exp": 1,
            "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "app", "uid": "u1"}}
        }))
        .unwrap();
        assert!(caller_from_claims(&claims).is_err());
    }

    #[test]
    fn jwks_ignores_symmetric_keys() {
        let text = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert!(Jwks::parse(text).is_err());
    }
}
