//! Step 4: the access-token cache, keyed by (authority, tenant, client-id, canonical scopes).
//!
//! - Concurrent misses for one key share ONE upstream call (single flight); an error is shared
//!   by that flight only and never cached.
//! - A token with less than `min_remaining` left is not served; the caller waits for a fresh one.
//! - `claims` (CAE challenges) bypass the cache: concurrent requests of one caller with the same
//!   key and claims share one call, and the token goes to that caller only — it never replaces
//!   the entry everyone else is served from.
//! - Fairness: a caller that starts a flight (a miss nobody else is already fetching) or sends
//!   `claims` spends its per-minute budget ([`CallerBudgets`]); one identity holds at most
//!   `max_keys_per_identity` entries (a token beyond that is served but not cached), so one
//!   caller's new keys cannot evict other identities' tokens.
//! - Refresh ahead: at Entra's `refresh_in` (else half the lifetime), minus up to 10 % jitter,
//!   and only for keys used since their last refresh, so identities nobody uses are not
//!   renewed. While a refresh fails the still-valid token keeps being served.
//! - Bounded by entry count (moka: TinyLFU admission, LRU eviction).
//!
//! Authorization happens BEFORE this cache is consulted, on every request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use futures::future::{BoxFuture, FutureExt, Shared};

use crate::metrics::Metrics;
use crate::request::error::ProxyError;
use crate::serve::limits::{CallerBudgets, Spend};

/// How often the cache looks for refreshes that are due.
pub const REFRESH_TICK: Duration = Duration::from_secs(1);

/// An access token from Entra.
#[derive(Clone)]
pub struct IssuedToken {
    pub access_token: Box<str>,
    pub expires_in: u64,
    pub ext_expires_in: u64,
    pub refresh_in: Option<u64>,
    /// When we received it: the served `expires_in` counts down from here.
    pub received: Instant,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// The longest lifetime accepted from Entra: its access tokens live 1 to 24 hours. Anything
/// longer is clamped, so no answer can push an `Instant` out of range.
pub const MAX_LIFETIME_SECS: u64 = 24 * 3600;

impl IssuedToken {
    pub fn expires_at(&self) -> Instant {
        self.received
            .checked_add(Duration::from_secs(self.expires_in))
            .unwrap_or(self.received)
    }

    pub fn remaining(&self) -> Duration {
        self.expires_at().saturating_duration_since(Instant::now())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct CacheKey {
    pub authority: Arc<str>,
    pub tenant: String,
    pub client_id: String,
    /// The canonical scope set: also what is sent to Entra.
    pub scopes: String,
}

impl CacheKey {
    /// The identity this key belongs to.
    fn identity(&self) -> Identity {
        (
            self.authority.clone(),
            self.tenant.clone(),
            self.client_id.clone(),
        )
    }
}

type Identity = (Arc<str>, String, String);

/// How a request was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
    Bypass,
}

impl Lookup {
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Bypass => "bypass",
        }
    }
}

/// Gets a token from upstream for a key (the exchange with Entra, in production).
pub trait Fetch: Send + Sync + 'static {
    /// `key.scopes` is sent upstream as it is; `claims` is a CAE challenge.
    fn fetch(
        &self,
        key: &CacheKey,
        claims: Option<&str>,
    ) -> BoxFuture<'static, Result<IssuedToken, ProxyError>>;
}

type Flight = Shared<BoxFuture<'static, Result<Arc<IssuedToken>, ProxyError>>>;

/// A `claims` flight: one caller, one key, one challenge.
type ClaimsKey = (CacheKey, Arc<str>, Box<str>);

/// A cached token, its answer's bytes and its refresh bookkeeping.
pub struct Entry {
    token: Arc<IssuedToken>,
    /// Whether the token goes into the answer as it is (checked once; always, from Entra): a
    /// hit then writes the lifetimes and copies the token, nothing else.
    plain: bool,
    refresh_at: Mutex<Instant>,
    /// Served since the last refresh started.
    used: AtomicBool,
    /// Still the entry of its key: cleared when it is replaced, invalidated or evicted, so
    /// whoever holds it (the per-token memo) looks the key up again.
    current: AtomicBool,
}

impl Entry {
    fn new(token: Arc<IssuedToken>) -> Self {
        let base = token
            .refresh_in
            .filter(|r| *r < token.expires_in)
            .unwrap_or(token.expires_in / 2);
        let jitter = rand::random_range(0.9..=1.0);
        let refresh_at = token
            .received
            .checked_add(Duration::from_secs(base).mul_f64(jitter))
            .unwrap_or(token.received);
        Self {
            plain: crate::request::token::plain(&token.access_token),
            token,
            refresh_at: Mutex::new(refresh_at),
            used: AtomicBool::new(false),
            current: AtomicBool::new(true),
        }
    }

    /// The token this entry holds.
    pub fn token(&self) -> &Arc<IssuedToken> {
        &self.token
    }

    /// The success body, with this moment's remaining lifetimes.
    pub fn answer(&self) -> Vec<u8> {
        let t = &self.token;
        let lifetimes = crate::request::token::Lifetimes::remaining(t);
        match self.plain {
            true => lifetimes.json_with(&t.access_token),
            false => lifetimes.response(&t.access_token).to_json(),
        }
    }

    fn retire(&self) {
        self.current.store(false, Ordering::Release);
    }
}

/// How the cache served a request: its entry (a hit, which the memo may hold on to), or a
/// token fetched for this request (a miss, or a `claims` bypass).
pub enum Served {
    Hit(Arc<Entry>),
    Fetched(Arc<IssuedToken>, Lookup),
}

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Token cache and caller budgets")]
pub struct CacheArgs {
    /// Most tokens kept in the cache.
    #[arg(long, env = "IBP_CACHE_CAPACITY", default_value_t = 10_000)]
    pub cache_capacity: u64,
    /// Cached tokens with less than this left are not served.
    #[arg(long, env = "IBP_CACHE_MIN_REMAINING_SECS", default_value_t = 300)]
    pub cache_min_remaining_secs: u64,
    /// Most cached tokens (distinct scope sets) one identity may hold; beyond it a token is
    /// served but not cached, so one identity cannot evict the others.
    #[arg(long, env = "IBP_CACHE_MAX_KEYS_PER_IDENTITY", default_value_t = 64)]
    pub cache_max_keys_per_identity: usize,
    /// Token requests per minute that one caller (namespace/service account) may send to
    /// Entra through cache misses; over it, 429 with Retry-After.
    #[arg(long, env = "IBP_CALLER_MISS_BUDGET", default_value_t = 120)]
    pub caller_miss_budget: u32,
    /// Token requests with `claims` per minute that one caller may send; over it, 429.
    #[arg(long, env = "IBP_CALLER_CLAIMS_BUDGET", default_value_t = 30)]
    pub caller_claims_budget: u32,
}

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Maximum number of cached tokens.
    pub capacity: u64,
    /// Tokens with less than this left are not served (5 minutes: enough for the caller to
    /// use the token for a typical operation after receiving it).
    pub min_remaining: Duration,
    /// Most entries (distinct scope sets) one identity may hold.
    pub max_keys_per_identity: usize,
}

impl CacheConfig {
    /// The cache's flags, checked: a capacity and a per-identity bound of at least one.
    pub fn from_args(a: &CacheArgs) -> Result<Self, crate::startup::StartError> {
        for (flag, value) in [
            ("--cache-capacity", a.cache_capacity),
            (
                "--cache-max-keys-per-identity",
                u64::try_from(a.cache_max_keys_per_identity).unwrap_or(u64::MAX),
            ),
        ] {
            if value == 0 {
                return Err(crate::startup::StartError::usage(format!(
                    "{flag} must be positive"
                )));
            }
        }
        Ok(CacheConfig {
            capacity: a.cache_capacity,
            min_remaining: Duration::from_secs(a.cache_min_remaining_secs),
            max_keys_per_identity: a.cache_max_keys_per_identity,
        })
    }
}

/// What one caller (namespace/service account) may cost per minute.
#[derive(Clone, Copy, Debug)]
pub struct BudgetConfig {
    pub misses_per_minute: u32,
    pub claims_per_minute: u32,
}

impl BudgetConfig {
    /// The caller budgets' flags.
    pub fn from_args(a: &CacheArgs) -> Self {
        BudgetConfig {
            misses_per_minute: a.caller_miss_budget,
            claims_per_minute: a.caller_claims_budget,
        }
    }
}

/// After a failed refresh, wait this long before trying again (the token is still served).
const REFRESH_RETRY: Duration = Duration::from_secs(10);

pub struct TokenCache {
    entries: moka::sync::Cache<CacheKey, Arc<Entry>>,
    flights: Arc<Mutex<HashMap<CacheKey, Flight>>>,
    claims_flights: Arc<Mutex<HashMap<ClaimsKey, Flight>>>,
    /// Entries per identity; kept by `insert` and moka's eviction listener.
    per_identity: Arc<Mutex<HashMap<Identity, usize>>>,
    max_keys_per_identity: usize,
    budgets: Arc<CallerBudgets>,
    fetcher: Arc<dyn Fetch>,
    min_remaining: Duration,
    metrics: Arc<Metrics>,
}

impl TokenCache {
    pub fn new(
        config: CacheConfig,
        budgets: Arc<CallerBudgets>,
        fetcher: Arc<dyn Fetch>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let per_identity: Arc<Mutex<HashMap<Identity, usize>>> = Default::default();
        let counts = per_identity.clone();
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(config.capacity)
                .eviction_listener(move |key: Arc<CacheKey>, entry: Arc<Entry>, cause| {
                    entry.retire();
                    if cause == moka::notification::RemovalCause::Replaced {
                        return;
                    }
                    let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
                    let identity = key.identity();
                    if let Some(n) = counts.get_mut(&identity) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            counts.remove(&identity);
                        }
                    }
                })
                .build(),
            flights: Arc::new(Mutex::new(HashMap::new())),
            claims_flights: Arc::new(Mutex::new(HashMap::new())),
            per_identity,
            max_keys_per_identity: config.max_keys_per_identity.max(1),
            budgets,
            fetcher,
            min_remaining: config.min_remaining,
            metrics,
        }
    }

    fn fresh(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key)?;
        if entry.token.remaining() < self.min_remaining {
            return None;
        }
        entry.used.store(true, Ordering::Relaxed);
        Some(entry)
    }

    /// Serves `entry`, held since an earlier lookup of its key, as a hit: only while it is
    /// still its key's entry and has `min_remaining` left (else the caller looks the key up).
    pub fn serve_held(&self, entry: &Entry) -> bool {
        let ok =
            entry.current.load(Ordering::Acquire) && entry.token.remaining() >= self.min_remaining;
        if ok {
            entry.used.store(true, Ordering::Relaxed);
            self.metrics.cache_hits.inc();
        }
        ok
    }

    /// Serves the cached token for `key`, or fetches it once for every concurrent caller.
    /// With `claims`, fetches for `caller` alone. `caller` (`system:serviceaccount:ns:sa`)
    /// pays from its budget for every flight it starts and every `claims` request.
    pub async fn get(
        &self,
        key: CacheKey,
        claims: Option<&str>,
        caller: &str,
    ) -> Result<(Arc<IssuedToken>, Lookup), ProxyError> {
        Ok(match self.serve(key, claims, caller).await? {
            Served::Hit(entry) => (entry.token.clone(), Lookup::Hit),
            Served::Fetched(token, lookup) => (token, lookup),
        })
    }

    /// [`TokenCache::get`], with a hit served as its entry.
    pub async fn serve(
        &self,
        key: CacheKey,
        claims: Option<&str>,
        caller: &str,
    ) -> Result<Served, ProxyError> {
        if let Some(claims) = claims {
            self.metrics
                .cache_lookups
                .with_label_values(&["bypass"])
                .inc();
            let token = self.claims_flight(key, claims, caller)?.await?;
            return Ok(Served::Fetched(token, Lookup::Bypass));
        }
        if let Some(entry) = self.fresh(&key) {
            self.metrics.cache_hits.inc();
            return Ok(Served::Hit(entry));
        }
        let flight = match self.join_or_start(key, caller)? {
            Ok(entry) => {
                self.metrics.cache_hits.inc();
                return Ok(Served::Hit(entry));
            }
            Err(flight) => flight,
        };
        self.metrics
            .cache_lookups
            .with_label_values(&["miss"])
            .inc();
        flight.await.map(|t| Served::Fetched(t, Lookup::Miss))
    }

    fn spend(&self, caller: &str, what: Spend) -> Result<(), ProxyError> {
        self.budgets.spend(caller, what).inspect_err(|_| {
            self.metrics
                .caller_budget_exceeded
                .with_label_values(&[what.label()])
                .inc();
        })
    }

    /// The flight of this caller's `claims` request: joined if the same caller is already
    /// asking with the same key and claims, else started. Its token is never cached.
    fn claims_flight(
        &self,
        key: CacheKey,
        claims: &str,
        caller: &str,
    ) -> Result<Flight, ProxyError> {
        self.spend(caller, Spend::Claims)?;
        let flight_key: ClaimsKey = (key, caller.into(), claims.into());
        let mut flights = self
            .claims_flights
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(f) = flights.get(&flight_key) {
            return Ok(f.clone());
        }
        let fetch = self.fetcher.fetch(&flight_key.0, Some(claims));
        let map = self.claims_flights.clone();
        let done_key = flight_key.clone();
        let task = tokio::spawn(async move {
            let result = fetch.await.map(Arc::new);
            map.lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&done_key);
            result
        });
        let f = joined(task);
        flights.insert(flight_key, f.clone());
        Ok(f)
    }

    /// Under the flights lock: the token, if a flight stored it since the caller looked (a
    /// flight stores its token before it leaves the map, so a caller either sees the token or
    /// joins the flight — never starts a second one); else the flight in the air, or a new
    /// one paid from the caller's miss budget.
    fn join_or_start(
        &self,
        key: CacheKey,
        caller: &str,
    ) -> Result<Result<Arc<Entry>, Flight>, ProxyError> {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = self.fresh(&key) {
            return Ok(Ok(t));
        }
        if let Some(f) = flights.get(&key) {
            return Ok(Err(f.clone()));
        }
        self.spend(caller, Spend::Miss)?;
        let f = self.start_flight(key.clone());
        flights.insert(key, f.clone());
        Ok(Err(f))
    }

    /// Runs the fetch on its own task, so it completes (and is cached) even if every caller
    /// that waited for it has gone away.
    /// The new entry counts as unused: a token fetched once and never served again is not
    /// renewed.
    fn start_flight(&self, key: CacheKey) -> Flight {
        let entries = self.entries.clone();
        let flights = self.flights.clone();
        let per_identity = self.per_identity.clone();
        let max_keys = self.max_keys_per_identity;
        let metrics = self.metrics.clone();
        let fetch = self.fetcher.fetch(&key, None);
        let task = tokio::spawn(async move {
            let result = fetch.await.map(Arc::new);
            if let Ok(token) = &result {
                // A key the cache does not hold yet takes one of its identity's places; with
                // none left the token is served to this flight's callers but not cached.
                let admitted = entries.contains_key(&key) || {
                    let mut counts = per_identity.lock().unwrap_or_else(|p| p.into_inner());
                    let n = counts.entry(key.identity()).or_insert(0);
                    (*n < max_keys).then(|| *n += 1).is_some()
                };
                if admitted {
                    // Whoever holds the entry being replaced looks the key up again.
                    if let Some(old) = entries.get(&key) {
                        old.retire();
                    }
                    entries.insert(key.clone(), Arc::new(Entry::new(token.clone())));
                    // moka counts lazily; settle it so the gauge is exact (misses are rare).
                    entries.run_pending_tasks();
                    metrics.cache_entries.set(entries.entry_count() as i64);
                } else {
                    tracing::debug!(client_id = %key.client_id, max_keys, "identity holds its most cache entries; token served uncached");
                }
            }
            flights
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            result
        });
        joined(task)
    }

    /// Starts the refreshes that are due; returns how many were started.
    pub fn refresh_due(self: &Arc<Self>) -> usize {
        let now = Instant::now();
        let mut started = 0;
        for (key, entry) in self.entries.iter() {
            let due = {
                let at = entry.refresh_at.lock().unwrap_or_else(|p| p.into_inner());
                now >= *at
            };
            if !due || entry.token.remaining().is_zero() || !entry.used.load(Ordering::Relaxed) {
                continue;
            }
            let flight = {
                let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
                if flights.contains_key(key.as_ref()) {
                    continue;
                }
                entry.used.store(false, Ordering::Relaxed);
                let f = self.start_flight((*key).clone());
                flights.insert((*key).clone(), f.clone());
                f
            };
            started += 1;
            let this = self.clone();
            tokio::spawn(async move {
                match flight.await {
                    Ok(_) => this
                        .metrics
                        .cache_refreshes
                        .with_label_values(&["ok"])
                        .inc(),
                    Err(e) => {
                        this.metrics
                            .cache_refreshes
                            .with_label_values(&["error"])
                            .inc();
                        if matches!(e, ProxyError::Unbound(_)) {
                            // The identity is no longer bound: stop serving its token.
                            entry.retire();
                            this.entries.invalidate(key.as_ref());
                            this.update_gauge();
                            return;
                        }
                        tracing::warn!(client_id = %key.client_id, error = %e, "token refresh failed; the cached token is served until it nears expiry");
                        *entry.refresh_at.lock().unwrap_or_else(|p| p.into_inner()) =
                            Instant::now() + REFRESH_RETRY;
                        entry.used.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
        started
    }

    /// Checks for due refreshes every `tick` until `stop`.
    pub async fn run_refresh(
        self: Arc<Self>,
        tick: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            self.refresh_due();
        }
    }

    fn update_gauge(&self) {
        self.entries.run_pending_tasks();
        self.metrics
            .cache_entries
            .set(self.entries.entry_count() as i64);
    }

    /// Tokens held now (pending evictions applied first).
    pub fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

/// A fetch task as a future every waiter can share.
fn joined(task: tokio::task::JoinHandle<Result<Arc<IssuedToken>, ProxyError>>) -> Flight {
    async move {
        task.await
            .unwrap_or_else(|e| Err(ProxyError::Internal(format!("token fetch failed: {e}"))))
    }
    .boxed()
    .shared()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn key(n: u32) -> CacheKey {
        CacheKey {
            authority: "https://login.example".into(),
            tenant: "t".into(),
            client_id: format!("c{n}"),
            scopes: "s/.default".into(),
        }
    }

    fn token(expires_in: u64, refresh_in: Option<u64>) -> IssuedToken {
        IssuedToken {
            access_token: format!("tok-{}", uuid::Uuid::new_v4()).into(),
            expires_in,
            ext_expires_in: expires_in,
            refresh_in,
            received: Instant::now(),
        }
    }

    /// A scripted upstream: answers with the next result, counting calls.
    struct Script {
        calls: AtomicU32,
        delay: Duration,
        results: Mutex<Vec<Result<IssuedToken, ProxyError>>>,
        fallback: (u64, Option<u64>),
    }

    impl Script {
        fn new(fallback: (u64, Option<u64>)) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicU32::new(0),
                delay: Duration::from_millis(30),
                results: Mutex::new(Vec::new()),
                fallback,
            })
        }
        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Fetch for Script {
        fn fetch(
            &self,
            _: &CacheKey,
            _: Option<&str>,
        ) -> BoxFuture<'static, Result<IssuedToken, ProxyError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let next = self.results.lock().unwrap().pop();
            let result = next.unwrap_or_else(|| Ok(token(self.fallback.0, self.fallback.1)));
            let delay = self.delay;
            async move {
                tokio::time::sleep(delay).await;
                result
            }
            .boxed()
        }
    }

    fn cache(script: &Arc<Script>, min_remaining: u64, capacity: u64) -> Arc<TokenCache> {
        cache_with(script, min_remaining, capacity, 1000, 1000)
    }

    fn cache_with(
        script: &Arc<Script>,
        min_remaining: u64,
        capacity: u64,
        max_keys_per_identity: usize,
        budget: u32,
    ) -> Arc<TokenCache> {
        Arc::new(TokenCache::new(
            CacheConfig {
                capacity,
                min_remaining: Duration::from_secs(min_remaining),
                max_keys_per_identity,
            },
            Arc::new(CallerBudgets::new(budget, budget)),
            script.clone(),
            Arc::new(Metrics::new()),
        ))
    }

    const ME: &str = "system:serviceaccount:ns:me";
    const OTHER: &str = "system:serviceaccount:ns:other";

    fn scoped(n: u32, scope: u32) -> CacheKey {
        CacheKey {
            scopes: format!("https://r{scope}/.default"),
            ..key(n)
        }
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch() {
        let script = Script::new((3600, None));
        let cache = cache(&script, 300, 100);
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let cache = cache.clone();
            tasks.push(tokio::spawn(
                async move { cache.get(key(1), None, ME).await },
            ));
        }
        let mut tokens = std::collections::HashSet::new();
        for t in tasks {
            tokens.insert(t.await.unwrap().unwrap().0.access_token.clone());
        }
        assert_eq!((script.calls(), tokens.len()), (1, 1));
        let (_, how) = cache.get(key(1), None, ME).await.unwrap();
        assert_eq!(how, Lookup::Hit);
    }

    #[tokio::test]
    async fn errors_are_not_cached_beyond_their_flight() {
        let script = Script::new((3600, None));
        script
            .results
            .lock()
            .unwrap()
            .push(Err(ProxyError::BadUpstream("x".into())));
        let cache = cache(&script, 300, 100);
        assert!(cache.get(key(1), None, ME).await.is_err());
        let (_, how) = cache.get(key(1), None, ME).await.unwrap();
        assert_eq!((how, script.calls()), (Lookup::Miss, 2));
    }

    #[tokio::test]
    async fn nearly_expired_tokens_are_not_served() {
        let script = Script::new((3600, None));
        script.results.lock().unwrap().push(Ok(token(200, None)));
        let cache = cache(&script, 300, 100);
        cache.get(key(1), None, ME).await.unwrap();
        let (t, how) = cache.get(key(1), None, ME).await.unwrap();
        assert_eq!((how, t.expires_in), (Lookup::Miss, 3600));
    }

    #[tokio::test]
    async fn claims_fetch_for_their_caller_and_never_replace_the_shared_entry() {
        let script = Script::new((3600, None));
        let cache = cache(&script, 300, 100);
        let (first, _) = cache.get(key(1), None, ME).await.unwrap();
        let (bypassed, how) = cache.get(key(1), Some("{}"), ME).await.unwrap();
        assert_eq!(how, Lookup::Bypass);
        assert_ne!(first.access_token, bypassed.access_token);
        let (hit, how) = cache.get(key(1), None, OTHER).await.unwrap();
        assert_eq!((how, &hit.access_token), (Lookup::Hit, &first.access_token));
        assert_eq!(script.calls(), 2);
    }

    #[tokio::test]
    async fn concurrent_claims_of_one_caller_share_one_call_but_not_with_others() {
        let script = Script::new((3600, None));
        let cache = cache(&script, 300, 100);
        let mut tasks = Vec::new();
        for who in [ME, ME, ME, OTHER, OTHER] {
            let cache = cache.clone();
            tasks.push(tokio::spawn(async move {
                let (t, _) = cache.get(key(1), Some("{\"c\":1}"), who).await.unwrap();
                (who, t.access_token.clone())
            }));
        }
        let mut by_caller: HashMap<&str, std::collections::HashSet<Box<str>>> = HashMap::new();
        for t in tasks {
            let (who, token) = t.await.unwrap();
            by_caller.entry(who).or_default().insert(token);
        }
        assert_eq!(script.calls(), 2, "one call per caller");
        assert_eq!((by_caller[ME].len(), by_caller[OTHER].len()), (1, 1));
        assert!(by_caller[ME].is_disjoint(&by_caller[OTHER]));
    }

    #[tokio::test]
    async fn a_caller_over_its_budget_gets_429_and_others_do_not() {
        let script = Script::new((3600, None));
        let cache = cache_with(&script, 300, 100, 1000, 3);
        for scope in 0..3 {
            cache.get(scoped(1, scope), None, ME).await.unwrap();
        }
        let err = cache.get(scoped(1, 3), None, ME).await.unwrap_err();
        assert_eq!(err.status(), 429);
        assert!(err.retry_after().is_some_and(|s| (1..=60).contains(&s)));
        assert!(err.to_string().contains(ME), "{err}");
        // Hits cost nothing; another caller has its own budget.
        assert_eq!(
            cache.get(scoped(1, 0), None, ME).await.unwrap().1,
            Lookup::Hit
        );
        cache.get(scoped(1, 3), None, OTHER).await.unwrap();
        for _ in 0..3 {
            cache.get(key(1), Some("{}"), OTHER).await.unwrap();
        }
        assert_eq!(
            cache
                .get(key(1), Some("{}"), OTHER)
                .await
                .unwrap_err()
                .status(),
            429
        );
    }

    #[tokio::test]
    async fn one_identity_cannot_evict_the_tokens_of_others() {
        let script = Arc::new(Script {
            delay: Duration::ZERO,
            ..Arc::into_inner(Script::new((3600, None))).unwrap()
        });
        let cache = cache_with(&script, 300, 50, 10, 10_000);
        for n in 100..120 {
            cache.get(key(n), None, OTHER).await.unwrap();
        }
        for scope in 0..200 {
            let (_, how) = cache.get(scoped(1, scope), None, ME).await.unwrap();
            assert_eq!(how, Lookup::Miss);
        }
        let calls = script.calls();
        for n in 100..120 {
            let (_, how) = cache.get(key(n), None, OTHER).await.unwrap();
            assert_eq!(how, Lookup::Hit, "identity c{n} was evicted");
        }
        assert_eq!(script.calls(), calls);
        assert_eq!(cache.entry_count(), 30);
    }

    // Paused time: the refresh's own delay passes as soon as every task waits.
    #[tokio::test(start_paused = true)]
    async fn only_used_keys_are_refreshed_ahead() {
        // refresh_in 0 s: due at once.
        let script = Script::new((3600, Some(0)));
        let cache = cache(&script, 300, 100);
        cache.get(key(1), None, ME).await.unwrap();
        cache.get(key(2), None, ME).await.unwrap();
        // Key 1 is used after its fetch; key 2 is not.
        cache.get(key(1), None, ME).await.unwrap();
        assert_eq!(cache.refresh_due(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(script.calls(), 3);
        // Nobody used key 1 since its refresh: nothing more is due.
        assert_eq!(cache.refresh_due(), 0);
    }

    // Paused time: the refresh's own delay passes as soon as every task waits.
    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_serving_the_valid_token() {
        let script = Script::new((3600, Some(0)));
        let cache = cache(&script, 300, 100);
        let (t, _) = cache.get(key(1), None, ME).await.unwrap();
        cache.get(key(1), None, ME).await.unwrap();
        script
            .results
            .lock()
            .unwrap()
            .push(Err(ProxyError::Unavailable {
                retry_after: 1,
                description: "down".into(),
            }));
        assert_eq!(cache.refresh_due(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (served, how) = cache.get(key(1), None, ME).await.unwrap();
        assert_eq!((how, &served.access_token), (Lookup::Hit, &t.access_token));
    }

    #[test]
    fn without_refresh_in_a_token_is_refreshed_at_half_its_lifetime_less_jitter() {
        // Entra sends no refresh_in for client credentials, for 1 h and 24 h tokens alike.
        for lifetime in [3599, 86_400] {
            let mut due = Vec::new();
            for _ in 0..50 {
                let entry = Entry::new(Arc::new(token(lifetime, None)));
                let at = *entry.refresh_at.lock().unwrap();
                due.push(at.duration_since(entry.token.received).as_secs_f64());
            }
            // Half in whole seconds, as the entry computes it.
            let half = (lifetime / 2) as f64;
            for d in &due {
                assert!(
                    *d <= half && *d >= half * 0.9,
                    "{d} s for a {lifetime} s token"
                );
            }
            let spread = due.iter().cloned().fold(f64::MIN, f64::max)
                - due.iter().cloned().fold(f64::MAX, f64::min);
            assert!(spread > 1.0, "no jitter across 50 entries: {due:?}");
        }
    }

    #[tokio::test]
    async fn eviction_keeps_the_cache_at_its_bound() {
        let script = Arc::new(Script {
            delay: Duration::ZERO,
            ..Arc::into_inner(Script::new((3600, None))).unwrap()
        });
        let cache = cache(&script, 300, 50);
        for n in 0..500 {
            cache.get(key(n), None, ME).await.unwrap();
        }
        assert!(cache.entry_count() <= 50, "{} entries", cache.entry_count());
    }
}
