//! TokenReview: the apiserver's own word on a token, which catches tokens of deleted pods and
//! service accounts that a valid signature cannot. Answers are cached by SHA-256 of the token,
//! each until min(review TTL, token expiry); failures are not cached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::TokenReviewStatus;

use super::verify::token_ttl;
use super::Caller;
use crate::cluster::Cluster;
use crate::expiry::{Lifetime, OwnLifetime};
use crate::metrics::Metrics;
use crate::request::error::{ProxyError, Result};

/// The apiserver's answer on one token.
#[derive(Clone)]
enum Outcome {
    Authenticated(Arc<Caller>),
    Refused(String),
}

/// A cached answer and how long it may be trusted.
#[derive(Clone)]
struct Reviewed {
    outcome: Outcome,
    lifetime: Duration,
    /// The answer's deadline (no later than the cache's), for whatever is derived from it.
    until: Instant,
}

impl Lifetime for Reviewed {
    fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

pub(super) struct Reviews {
    cluster: Arc<Cluster>,
    audience: String,
    /// The longest an answer is trusted: a deleted pod's token is refused within this time.
    ttl: Duration,
    /// By SHA-256 of the token. Concurrent first requests with one token share one review
    /// (moka coalesces `try_get_with`).
    answers: moka::future::Cache<[u8; 32], Reviewed>,
    metrics: Arc<Metrics>,
}

impl Reviews {
    pub(super) fn new(
        cluster: Arc<Cluster>,
        audience: String,
        ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            cluster,
            audience,
            ttl,
            // Bounded: one entry per distinct live token on this node, for an hour at most.
            answers: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3600))
                .expire_after(OwnLifetime)
                .build(),
            metrics,
        }
    }

    /// The caller the apiserver says `token` (whose SHA-256 is `digest`) belongs to, and
    /// until when that answer is trusted.
    pub(super) async fn review(
        &self,
        token: &str,
        digest: [u8; 32],
    ) -> Result<(Arc<Caller>, Instant)> {
        let reviewed = self
            .answers
            .try_get_with(digest, self.fresh_review(token))
            .await
            .map_err(|e: Arc<ProxyError>| (*e).clone())?;
        match reviewed.outcome {
            Outcome::Authenticated(c) => Ok((c, reviewed.until)),
            Outcome::Refused(why) => Err(ProxyError::invalid_assertion(format!(
                "The Kubernetes API server did not accept the service-account token ({}). The \
                 pod or service account may have been deleted; restart the pod to get a fresh \
                 token.",
                crate::request::token::printable(&why, 300)
            ))),
        }
    }

    /// Asks the apiserver.
    async fn fresh_review(&self, token: &str) -> Result<Reviewed> {
        let status = match self.cluster.token_review(token, &self.audience).await {
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
        let outcome = outcome_of(status);
        let lifetime = answer_lifetime(token, self.ttl);
        Ok(Reviewed {
            outcome,
            lifetime,
            until: Instant::now() + lifetime,
        })
    }
}

/// How long an answer on `token` is trusted: the review TTL, cut short by the token's `exp`.
fn answer_lifetime(token: &str, review_ttl: Duration) -> Duration {
    token_ttl(token).min(review_ttl)
}

/// What the apiserver's answer says about the caller: a service account (with its pod, when
/// the token is bound to one), or a refusal in its words.
fn outcome_of(status: TokenReviewStatus) -> Outcome {
    if !status.authenticated.unwrap_or(false) {
        let why = status.error;
        return Outcome::Refused(why.unwrap_or_else(|| "the token is not authenticated".into()));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((ns, name)) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
    else {
        return Outcome::Refused(format!(
            "the token belongs to '{}', not to a service account",
            crate::request::token::printable(&username, 120)
        ));
    };
    let mut caller = Caller::new(ns, name, user.uid.as_deref().unwrap_or(""));
    if let Some(extra) = user.extra {
        let first = |key: &str| extra.get(key).and_then(|v| v.first().cloned());
        caller.pod_name = first("authentication.kubernetes.io/pod-name");
        caller.pod_uid = first("authentication.kubernetes.io/pod-uid");
    }
    Outcome::Authenticated(Arc::new(caller))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use std::time::{SystemTime, UNIX_EPOCH};

    fn token_with(claims: serde_json::Value) -> String {
        let part = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.sig",
            part(serde_json::json!({"alg": "RS256"})),
            part(claims)
        )
    }

    #[test]
    fn an_answer_is_trusted_for_the_review_ttl_or_until_the_token_expires() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let ttl = Duration::from_secs(60);
        let long = token_with(serde_json::json!({ "exp": now + 3600 }));
        assert_eq!(answer_lifetime(&long, ttl), ttl);
        // `exp` is read in whole seconds while the clock moves on: allow one.
        let short = answer_lifetime(&token_with(serde_json::json!({ "exp": now + 20 })), ttl);
        assert!(
            short <= Duration::from_secs(20) && short >= Duration::from_secs(19),
            "{short:?}"
        );
        for expired in [
            serde_json::json!({ "exp": now - 5 }),
            serde_json::json!({}),
            serde_json::json!({ "exp": "soon" }),
        ] {
            assert_eq!(
                answer_lifetime(&token_with(expired.clone()), ttl),
                Duration::ZERO,
                "{expired}"
            );
        }
    }
}
