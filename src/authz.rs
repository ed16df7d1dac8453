//! May this service account use this managed identity? Asked of
//! the apiserver as a SubjectAccessReview (verb `use-managed-identity`, group
//! `cid.wi.aks.azure.com`, resource `<client-id>`) so that ordinary RBAC — ClusterRoleBindings
//! and namespaced RoleBindings — governs access. Decisions are cached per (namespace, SA,
//! client-id): allowed for 5 minutes, denied for 30 seconds by default.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::authn::Caller;
use crate::cluster::{Cluster, Subject, GRANT_GROUP, GRANT_VERB};
use crate::error::{ProxyError, Result};
use crate::expiry::{Lifetime, OwnLifetime};
use crate::limits::{CallerBudgets, Spend};
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct AuthzConfig {
    /// How long an allow is trusted. A revoked grant takes effect within this time unless
    /// the RBAC watch drops it sooner.
    pub allowed_ttl: Duration,
    /// How long a deny is trusted: short, so a newly added grant works quickly.
    pub denied_ttl: Duration,
    /// Whether a grant that covers every identity (a `*` rule, e.g. `cluster-admin`) is
    /// honoured. Off by default: such grants are rarely meant to hand out managed identities.
    pub allow_wildcard_grants: bool,
}

/// A resource name no managed identity can have (client ids are GUIDs): a caller allowed
/// this is allowed every identity, through a `*` rule.
pub const WILDCARD_PROBE: &str = "wildcard-probe.invalid";

type Key = (String, String, String);

/// A cached answer: allowed or not, the apiserver's reason, and how long it is trusted.
#[derive(Clone)]
struct Decision {
    allowed: bool,
    reason: Arc<str>,
    ttl: Duration,
}

impl Lifetime for Decision {
    fn lifetime(&self) -> Duration {
        self.ttl
    }
}

pub struct Authorizer {
    cluster: Arc<Cluster>,
    config: AuthzConfig,
    /// Bumped on every RBAC change: a review that started before a change must not store its
    /// (possibly stale) answer after the change dropped the cache.
    generation: AtomicU64,
    /// Decisions per (namespace, SA, client-id); concurrent first requests share one review.
    decisions: moka::future::Cache<Key, Decision>,
    /// Each caller's budget of decisions not in the cache.
    budgets: Arc<CallerBudgets>,
    metrics: Arc<Metrics>,
}

impl Authorizer {
    pub fn new(
        cluster: Arc<Cluster>,
        config: AuthzConfig,
        budgets: Arc<CallerBudgets>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            cluster,
            generation: AtomicU64::new(0),
            decisions: moka::future::Cache::builder()
                .max_capacity(100_000)
                .expire_after(OwnLifetime)
                .build(),
            config,
            budgets,
            metrics,
        }
    }

    /// Changes whenever cached decisions may have been dropped: whatever was derived from a
    /// decision read under an older generation must be read again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Drops every cached decision (RBAC changed).
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.decisions.invalidate_all();
    }

    /// Watches ClusterRoles, ClusterRoleBindings, Roles and RoleBindings and drops every cached
    /// decision on any change, so a revoked grant is denied within the watch latency instead of
    /// the allow TTL. If a watch breaks, the TTLs still bound staleness, and kube-rs's watcher
    /// re-lists and resumes (with backoff); the re-list also drops the cache.
    pub async fn watch_rbac(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
        let client = self.cluster.client().clone();
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = futures::future::join4(
                self.watch_kind(kube::Api::<ClusterRole>::all(client.clone()), "clusterroles"),
                self.watch_kind(kube::Api::<ClusterRoleBinding>::all(client.clone()), "clusterrolebindings"),
                self.watch_kind(kube::Api::<Role>::all(client.clone()), "roles"),
                self.watch_kind(kube::Api::<RoleBinding>::all(client), "rolebindings"),
            ) => {}
        }
    }

    async fn watch_kind<K>(&self, api: kube::Api<K>, kind: &'static str)
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    {
        use futures::StreamExt;
        use kube::runtime::{watcher, WatchStreamExt};
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
        while let Some(event) = events.next().await {
            match event {
                Ok(
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
                ) => {
                    tracing::debug!(
                        kind,
                        "RBAC changed: dropping cached authorization decisions"
                    );
                    self.invalidate_all();
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(kind, error = %e, "RBAC watch interrupted; cached decisions fall back to their TTLs")
                }
            }
        }
    }

    /// Allows or refuses `caller` the identity `client_id` (already validated as a GUID).
    /// Unless wildcard grants are allowed, an allowed caller is also asked about
    /// [`WILDCARD_PROBE`]: allowed that too, it holds a grant for every identity and is refused.
    pub async fn authorize(&self, caller: &Caller, client_id: &str) -> Result<()> {
        let decision = self.decide(caller, client_id).await?;
        if !decision.allowed {
            return Err(ProxyError::Forbidden(denial(caller, client_id)));
        }
        if self.config.allow_wildcard_grants {
            return Ok(());
        }
        let probe = self.decide(caller, WILDCARD_PROBE).await?;
        if probe.allowed {
            return Err(ProxyError::Forbidden(wildcard_denial(
                caller,
                client_id,
                &probe.reason,
            )));
        }
        Ok(())
    }

    /// The cached decision for (caller, resource), or a fresh review shared by every
    /// concurrent request that needs it.
    async fn decide(&self, caller: &Caller, resource: &str) -> Result<Decision> {
        let key = (
            caller.namespace.clone(),
            caller.service_account.clone(),
            resource.to_string(),
        );
        match self.decisions.get(&key).await {
            // The hot path: one lookup, no second pass through the coalescing entry.
            Some(d) => Ok(d),
            None => {
                let generation = self.generation.load(Ordering::Acquire);
                let decision = self
                    .decisions
                    .try_get_with(key.clone(), self.review(caller, resource))
                    .await
                    .map_err(|e: Arc<ProxyError>| (*e).clone())?;
                if self.generation.load(Ordering::Acquire) != generation {
                    // RBAC changed while we asked: this answer may predate the change, so
                    // keep it for this request only.
                    self.decisions.invalidate(&key).await;
                }
                Ok(decision)
            }
        }
    }
}

impl Authorizer {
    /// Asks the apiserver, paid from the caller's budget (once per review: concurrent requests
    /// that need the same decision share it, and its answer); failures are not cached.
    async fn review(&self, caller: &Caller, resource: &str) -> Result<Decision> {
        self.budgets
            .spend(&caller.username, Spend::Review)
            .inspect_err(|_| {
                let exceeded = &self.metrics.caller_budget_exceeded;
                exceeded.with_label_values(&[Spend::Review.label()]).inc();
            })?;
        let subject = Subject {
            user: &caller.username,
            groups: &caller.groups,
            uid: &caller.sa_uid,
            namespace: &caller.namespace,
        };
        match self.cluster.access_review(&subject, resource).await {
            Ok((allowed, reason)) => {
                self.metrics.kube_review("subjectaccessreview", "ok");
                let ttl = match allowed {
                    true => self.config.allowed_ttl,
                    false => self.config.denied_ttl,
                };
                let reason = reason.into();
                Ok(Decision {
                    allowed,
                    reason,
                    ttl,
                })
            }
            Err(e) => {
                self.metrics.kube_review("subjectaccessreview", "error");
                Err(ProxyError::Unavailable {
                    retry_after: 2,
                    description: format!(
                        "Could not check whether service account {}/{} may use managed \
                         identity {resource}: {e}. Retry shortly.",
                        caller.namespace, caller.service_account
                    ),
                })
            }
        }
    }
}

/// Names the grant that covers every identity, and the two ways out.
pub fn wildcard_denial(caller: &Caller, client_id: &str, reason: &str) -> String {
    let by = if reason.is_empty() {
        String::new()
    } else {
        format!(
            " (the apiserver says: {})",
            crate::token::printable(reason, 300)
        )
    };
    format!(
        "Service account '{ns}/{sa}' is allowed to use EVERY managed identity, not only \
         '{client_id}': a rule with '*' (resources, verbs or API groups) grants it \
         '{GRANT_VERB}' on '{GRANT_GROUP}'{by}. Such grants are refused by default. Grant \
         resource '{client_id}' by name instead of the wildcard, or start the proxy with \
         --allow-wildcard-grants to accept them.",
        ns = caller.namespace,
        sa = caller.service_account,
    )
}

/// Names exactly what grant is missing and how to add it.
pub fn denial(caller: &Caller, client_id: &str) -> String {
    format!(
        "Service account '{ns}/{sa}' is not allowed to use managed identity '{client_id}': no \
         ClusterRoleBinding or RoleBinding in namespace '{ns}' grants verb '{GRANT_VERB}' on \
         resource '{client_id}' in API group '{GRANT_GROUP}'. Create a ClusterRole with rule \
         {{apiGroups: [\"{GRANT_GROUP}\"], resources: [\"{client_id}\"], verbs: \
         [\"{GRANT_VERB}\"]}} and bind it to ServiceAccount {ns}/{sa}.",
        ns = caller.namespace,
        sa = caller.service_account,
    )
}
