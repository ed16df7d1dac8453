//! Step 2 of a token request: who is calling? The service-account token is verified locally
//! against the cluster's JWKS (fast path), then, in `both`/`tokenreview` mode, confirmed by a
//! TokenReview that catches tokens of deleted pods and service accounts.
//!
//! This file is the facade the request path and the server use ([`Authenticator`]); the work
//! is in `jwks` (the cluster's keys: fetch, refresh, persist, load back), `verify` (the local
//! JWT checks and the memory of tokens that passed) and `review` (TokenReview and its cache).
//! Both memories are keyed by SHA-256 of the token and drop each entry at its own deadline.

mod jwks;
mod review;
mod verify;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, ClusterError};
use crate::metrics::Metrics;
use crate::request::error::{ProxyError, Result};

pub use verify::{pre_parse_header, PreHeader};

/// The audience a service-account token must carry unless `--token-audience` says otherwise.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "api://AKSIdentityBinding";

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

#[derive(Clone, Debug)]
pub struct AuthnConfig {
    pub audience: String,
    pub mode: AuthnMode,
    pub review_ttl: Duration,
    /// Where the last good issuer + JWKS are kept, so a restart while the apiserver is
    /// unreachable still verifies tokens.
    pub persist_dir: Option<std::path::PathBuf>,
}

pub struct Authenticator {
    mode: AuthnMode,
    audience: String,
    keys: jwks::ClusterKeys,
    verified: verify::VerifiedTokens,
    reviews: review::Reviews,
    /// Bumped after every key change has dropped the tokens it no longer vouches for.
    generation: AtomicU64,
}

impl Authenticator {
    pub fn new(cluster: Arc<Cluster>, config: AuthnConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            mode: config.mode,
            keys: jwks::ClusterKeys::new(cluster.clone(), config.persist_dir),
            verified: verify::VerifiedTokens::new(),
            reviews: review::Reviews::new(
                cluster,
                config.audience.clone(),
                config.review_ttl,
                metrics,
            ),
            audience: config.audience,
            generation: AtomicU64::new(0),
        }
    }

    /// Changes whenever a JWKS change made remembered verifications go: whatever was derived
    /// from an authentication under an older generation must authenticate again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Forgets what `change` no longer vouches for, then says so through the generation (in
    /// this order: an answer read under the new generation cannot predate the forgetting).
    fn forget(&self, change: jwks::KeyChange) {
        self.verified.forget(change);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Tokens whose local verification is remembered now.
    pub fn verified_tokens(&self) -> u64 {
        self.verified.count()
    }

    /// True once the issuer and a JWKS have been loaded (readiness).
    pub fn ready(&self) -> bool {
        self.keys.loaded()
    }

    /// Fetches the issuer and the JWKS from the apiserver (and persists them).
    pub async fn refresh_keys(&self) -> std::result::Result<(), ClusterError> {
        self.keys.refresh(|change| self.forget(change)).await
    }

    /// Loads the keys persisted by an earlier run, if any. Returns whether keys were loaded.
    pub fn load_persisted(&self) -> bool {
        self.keys.load_persisted(|change| self.forget(change))
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
        self.authenticate_digested(token, &digest)
            .await
            .map(|(caller, _)| caller)
    }

    /// Authenticates `token`, whose SHA-256 is `digest`; also says until when the answer
    /// holds (the token's expiry, or the TokenReview answer's, whichever comes first) unless
    /// the generation changes.
    pub async fn authenticate_digested(
        &self,
        token: &str,
        digest: &[u8; 32],
    ) -> Result<(Arc<Caller>, Instant)> {
        let local = match self.mode {
            AuthnMode::Tokenreview => None,
            AuthnMode::Local | AuthnMode::Both => Some(self.verify_cached(token, digest).await?),
        };
        match self.mode {
            AuthnMode::Local => local.ok_or_else(|| ProxyError::Internal("no caller".into())),
            AuthnMode::Tokenreview | AuthnMode::Both => {
                let (reviewed, reviewed_until) = self.reviews.review(token, *digest).await?;
                // In `both` mode the local claims are the source of pod information; the
                // review must agree on who the caller is.
                match local {
                    Some((local, _)) if local.username != reviewed.username => {
                        Err(ProxyError::invalid_assertion(
                            "The TokenReview names a different user than the token's claims; \
                             the token is refused.",
                        ))
                    }
                    Some((local, until)) => Ok((local, until.min(reviewed_until))),
                    None => Ok((reviewed, reviewed_until)),
                }
            }
        }
    }

    /// Local verification, remembered until the token expires; the memory of a key's tokens
    /// is dropped when the key leaves the cluster's JWKS.
    async fn verify_cached(
        &self,
        token: &str,
        digest: &[u8; 32],
    ) -> Result<(Arc<Caller>, Instant)> {
        if let Some(known) = self.verified.get_until(digest) {
            return Ok(known);
        }
        let caller = Arc::new(self.verify_locally(token).await?);
        let until = self.verified.remember(*digest, token, caller.clone());
        Ok((caller, until))
    }

    /// The local fast path alone: signature, issuer, audience and times against the JWKS.
    pub async fn verify_locally(&self, token: &str) -> Result<Caller> {
        let header = pre_parse_header(token)?;
        let kid = header.kid.as_deref();
        let key = match self.keys.find(kid, header.alg) {
            Some(k) => k,
            None => {
                self.refresh_for_unknown_kid().await;
                self.keys.find(kid, header.alg).ok_or_else(|| {
                    verify::missing_key(
                        &header,
                        self.keys.fresh(),
                        kid.and_then(|k| self.keys.algorithm_of(k)),
                    )
                })?
            }
        };
        verify::verify(token, &header, &key, &self.keys.issuer(), &self.audience)
    }

    /// The key may be new (rotation): refresh, but not more often than a flood of forged
    /// `kid`s would like.
    async fn refresh_for_unknown_kid(&self) {
        if !self.keys.refresh_allowed_for_unknown_kid().await {
            return;
        }
        if let Err(e) = self.refresh_keys().await {
            tracing::warn!(error = %e, "JWKS refresh for an unknown key id failed");
        }
    }
}

/// SHA-256 of a token: the key of everything remembered about it.
pub fn token_digest(token: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}
