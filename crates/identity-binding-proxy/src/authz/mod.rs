//! May this service account use this managed identity? Asked of
//! the apiserver as a SubjectAccessReview (verb `use-managed-identity`, group
//! `cid.wi.aks.azure.com`, resource `<client-id>`) so that ordinary RBAC — ClusterRoleBindings
//! and namespaced RoleBindings — governs access. Decisions are cached per (namespace, SA,
//! client-id): allowed for 5 minutes, denied for 30 seconds by default. The RBAC watch drops
//! them sooner, but only those a change can affect ([`index`]): RBAC that grants no managed
//! identity costs no review, however much of it the cluster churns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::authn::Caller;
use crate::cluster::{Cluster, Subject, GRANT_GROUP, GRANT_VERB};
use crate::expiry::{Lifetime, OwnLifetime};
use crate::metrics::Metrics;
use crate::request::error::{ProxyError, Result};
use crate::serve::limits::{CallerBudgets, Spend};

pub(crate) mod index;
pub mod selector;

use index::{Binding, Kind, RbacIndex, Stale};

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
    /// Bumped whenever cached decisions are dropped: a review that started before a change must not store its
    /// (possibly stale) answer after the change dropped the cache.
    generation: AtomicU64,
    /// Decisions per (namespace, SA, client-id); concurrent first requests share one review.
    decisions: moka::future::Cache<Key, Decision>,
    /// Which RBAC objects can grant managed identities, to drop only what a change affects.
    index: std::sync::Mutex<RbacIndex>,
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
                .support_invalidation_closures()
                .build(),
            index: std::sync::Mutex::new(RbacIndex::new()),
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

    /// Drops every cached decision. The generation moves before the drop (a review in flight
    /// must not store its answer) and again after it (whatever was derived from a decision read
    /// in between is stale too).
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.decisions.invalidate_all();
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops the cached decisions an RBAC change made stale (none, some subjects' or all).
    fn invalidate(&self, stale: &Stale) {
        match stale {
            Stale::Nobody => {}
            Stale::Everyone => self.invalidate_all(),
            Stale::Some(_) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                let stale = stale.clone();
                let dropped = self
                    .decisions
                    .invalidate_entries_if(move |(ns, sa, _), _| stale.covers(ns, sa));
                if dropped.is_err() {
                    // Only if the cache was built without predicates: drop them all instead.
                    self.decisions.invalidate_all();
                }
                // As in `invalidate_all`: again after the drop.
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Watches ClusterRoles, ClusterRoleBindings, Roles and RoleBindings and drops the cached
    /// decisions a change can affect (see [`index`]), so a revoked grant is denied within the
    /// watch latency instead of the allow TTL, and RBAC unrelated to managed identities costs
    /// no reviews. Roles are listed before bindings, so each binding is judged against every
    /// role. Each watch lasts as long as the apiserver keeps it (`--watch-timeout-secs`), then
    /// the next starts from where it ended. A broken watch resumes from its last resource
    /// version (kube-rs's watcher, with backoff); only when the apiserver no longer has that version does it re-list, and the
    /// re-list drops every decision. Meanwhile the TTLs bound staleness.
    pub async fn watch_rbac(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
        let client = self.cluster.watch_client().clone();
        // Bindings wait until both role kinds are listed, or until a watch fails: then they
        // start anyway, so every kind's error is logged, and list again once the roles are
        // listed, so that every binding is judged against them.
        let (progress, mut listed) = tokio::sync::watch::channel(Progress::default());
        let roles = futures::future::join(
            self.watch_kind(kube::Api::<ClusterRole>::all(client.clone()), &progress),
            self.watch_kind(kube::Api::<Role>::all(client.clone()), &progress),
        );
        let bindings = async {
            loop {
                let complete = match listed.wait_for(|p| p.roles >= 2 || p.failed).await {
                    Ok(p) => p.roles >= 2,
                    Err(_) => return,
                };
                lock(&self.index).bindings_watch_started();
                let watches = futures::future::join(
                    self.watch_kind(
                        kube::Api::<ClusterRoleBinding>::all(client.clone()),
                        &progress,
                    ),
                    self.watch_kind(kube::Api::<RoleBinding>::all(client.clone()), &progress),
                );
                if complete {
                    watches.await;
                    return;
                }
                tokio::select! {
                    _ = watches => return,
                    roles_listed = listed.wait_for(|p| p.roles >= 2) => {
                        if roles_listed.map(drop).is_err() {
                            return;
                        }
                        lock(&self.index).bindings_relist();
                    }
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = futures::future::join(roles, bindings) => {}
        }
    }

    async fn watch_kind<K>(&self, api: kube::Api<K>, listed: &tokio::sync::watch::Sender<Progress>)
    where
        K: Indexed
            + kube::Resource
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + 'static,
    {
        use futures::StreamExt;
        use kube::runtime::{watcher, WatchStreamExt};
        let kind = K::KIND;
        let mut first_list = true;
        // The apiserver ends each watch after `timeoutSeconds`; the watcher then opens the next
        // from the version it reached (no list, no error) and bookmarks keep that version
        // recent on a quiet cluster.
        let config = watcher::Config::default().timeout(self.cluster.watch_timeout_secs());
        let mut events = std::pin::pin!(watcher(api, config).default_backoff());
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    listed.send_if_modified(|p| !std::mem::replace(&mut p.failed, true));
                    let interruptions = &self.metrics.rbac.interruptions;
                    interruptions.with_label_values(&[kind.plural()]).inc();
                    tracing::warn!(kind = kind.plural(), error = %e, "RBAC watch interrupted; cached decisions fall back to their TTLs");
                    continue;
                }
            };
            let stale = self.index_event(kind, &event);
            match &event {
                watcher::Event::Apply(_) | watcher::Event::Delete(_) => self.changed(kind, &stale),
                watcher::Event::InitDone => self.listed(kind, &mut first_list, listed),
                _ => {}
            }
            self.invalidate(&stale);
        }
    }

    /// Applies one watch event to the index: whose decisions it made stale.
    fn index_event<K: Indexed>(
        &self,
        kind: Kind,
        event: &kube::runtime::watcher::Event<K>,
    ) -> Stale {
        use kube::runtime::watcher::Event;
        let mut index = lock(&self.index);
        let stale = match event {
            Event::Init => {
                index.init(kind);
                Stale::Nobody
            }
            Event::InitApply(o) => {
                o.init(&mut index);
                Stale::Nobody
            }
            Event::InitDone => index.init_done(kind),
            Event::Apply(o) => o.apply(&mut index),
            Event::Delete(o) => o.delete(&mut index),
        };
        let (roles, bindings) = index.sizes();
        let entries = &self.metrics.rbac.index_entries;
        entries.with_label_values(&["roles"]).set(roles as i64);
        entries
            .with_label_values(&["bindings"])
            .set(bindings as i64);
        stale
    }

    /// Counts (and logs) a change by its effect.
    fn changed(&self, kind: Kind, stale: &Stale) {
        let events = &self.metrics.rbac.events;
        events
            .with_label_values(&[kind.plural(), stale.label()])
            .inc();
        if *stale != Stale::Nobody {
            tracing::debug!(
                kind = kind.plural(),
                effect = stale.label(),
                "RBAC changed: dropping the cached authorization decisions it affects"
            );
        }
    }

    /// Counts a complete list of `kind`; the first of each kind counts towards being synced.
    fn listed(
        &self,
        kind: Kind,
        first_list: &mut bool,
        listed: &tokio::sync::watch::Sender<Progress>,
    ) {
        let lists = &self.metrics.rbac.lists;
        lists.with_label_values(&[kind.plural()]).inc();
        tracing::debug!(
            kind = kind.plural(),
            "RBAC listed: dropping cached authorization decisions"
        );
        if !std::mem::replace(first_list, false) {
            return;
        }
        listed.send_modify(|p| match kind {
            Kind::ClusterRole | Kind::Role => p.roles += 1,
            Kind::ClusterRoleBinding | Kind::RoleBinding => p.bindings += 1,
        });
        let p = *listed.borrow();
        if p.roles >= 2 && p.bindings >= 2 {
            self.metrics.rbac.watch_synced.set(1);
            tracing::info!("RBAC listed: following changes to managed-identity grants");
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

/// How far the RBAC watches are: kinds listed once, and whether any watch failed.
#[derive(Clone, Copy, Default)]
struct Progress {
    roles: u8,
    bindings: u8,
    failed: bool,
}

/// The index is a plain map: a panic elsewhere while holding it leaves it usable.
fn lock(m: &std::sync::Mutex<RbacIndex>) -> std::sync::MutexGuard<'_, RbacIndex> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How each watched kind feeds the index.
trait Indexed {
    const KIND: Kind;
    fn init(&self, index: &mut RbacIndex);
    fn apply(&self, index: &mut RbacIndex) -> Stale;
    fn delete(&self, index: &mut RbacIndex) -> Stale;
}

impl Indexed for k8s_openapi::api::rbac::v1::ClusterRole {
    const KIND: Kind = Kind::ClusterRole;
    fn init(&self, index: &mut RbacIndex) {
        index.init_cluster_role(self)
    }
    fn apply(&self, index: &mut RbacIndex) -> Stale {
        index.apply_cluster_role(self)
    }
    fn delete(&self, index: &mut RbacIndex) -> Stale {
        index.delete_cluster_role(self)
    }
}

impl Indexed for k8s_openapi::api::rbac::v1::Role {
    const KIND: Kind = Kind::Role;
    fn init(&self, index: &mut RbacIndex) {
        index.init_role(self)
    }
    fn apply(&self, index: &mut RbacIndex) -> Stale {
        index.apply_role(self)
    }
    fn delete(&self, index: &mut RbacIndex) -> Stale {
        index.delete_role(self)
    }
}

impl Indexed for k8s_openapi::api::rbac::v1::ClusterRoleBinding {
    const KIND: Kind = Kind::ClusterRoleBinding;
    fn init(&self, index: &mut RbacIndex) {
        index.init_binding(Binding::Cluster(self))
    }
    fn apply(&self, index: &mut RbacIndex) -> Stale {
        index.apply_binding(Binding::Cluster(self))
    }
    fn delete(&self, index: &mut RbacIndex) -> Stale {
        index.delete_binding(Binding::Cluster(self))
    }
}

impl Indexed for k8s_openapi::api::rbac::v1::RoleBinding {
    const KIND: Kind = Kind::RoleBinding;
    fn init(&self, index: &mut RbacIndex) {
        index.init_binding(Binding::Namespaced(self))
    }
    fn apply(&self, index: &mut RbacIndex) -> Stale {
        index.apply_binding(Binding::Namespaced(self))
    }
    fn delete(&self, index: &mut RbacIndex) -> Stale {
        index.delete_binding(Binding::Namespaced(self))
    }
}

/// Names the grant that covers every identity, and the two ways out.
pub fn wildcard_denial(caller: &Caller, client_id: &str, reason: &str) -> String {
    let by = if reason.is_empty() {
        String::new()
    } else {
        format!(
            " (the apiserver says: {})",
            crate::request::token::printable(reason, 300)
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
