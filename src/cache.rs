//! Step 4: the access-token cache, keyed by (authority, tenant, client-id, normalized scopes).
//!
//! - Concurrent misses for one key share ONE upstream call (single flight); an error is shared
//!   by that flight only and never cached.
//! - A token with less than `min_remaining` left is not served; the caller waits for a fresh one.
//! - `claims` (CAE challenges) bypass the cache, and the fresh token replaces the entry.
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

use futures::future::{BoxFuture, FutureExt, Shared};
use rand::Rng;

use crate::entra::IssuedToken;
use crate::error::ProxyError;
use crate::metrics::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct CacheKey {
    pub authority: Arc<str>,
    pub tenant: String,
    pub client_id: String,
    /// Lower-cased, de-duplicated, sorted scopes.
    pub scopes: String,
}

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
    /// `scope` is the scope string as a caller sent it; `claims` a CAE challenge.
    fn fetch(
        &self,
        key: &CacheKey,
        scope: &str,
        claims: Option<&str>,
    ) -> BoxFuture<'static, Result<IssuedToken, ProxyError>>;
}

type Flight = Shared<BoxFuture<'static, Result<Arc<IssuedToken>, ProxyError>>>;

/// A cached token and its refresh bookkeeping.
struct Entry {
    token: Arc<IssuedToken>,
    /// The scope string to send upstream on refresh.
    scope: Arc<str>,
    refresh_at: Mutex<Instant>,
    /// Served since the last refresh started.
    used: AtomicBool,
}

impl Entry {
    fn new(token: Arc<IssuedToken>, scope: Arc<str>) -> Self {
        let base = token
            .refresh_in
            .filter(|r| *r < token.expires_in)
            .unwrap_or(token.expires_in / 2);
        let jitter = rand::rng().random_range(0.9..=1.0);
        let refresh_at = token.received + Duration::from_secs(base).mul_f64(jitter);
        Self {
            token,
            scope,
            refresh_at: Mutex::new(refresh_at),
            used: AtomicBool::new(false),
        }
    }
}

pub struct CacheConfig {
    /// Maximum number of cached tokens.
    pub capacity: u64,
    /// Tokens with less than this left are not served (5 minutes: enough for the caller to
    /// use the token for a typical operation after receiving it).
    pub min_remaining: Duration,
}

/// After a failed refresh, wait this long before trying again (the token is still served).
const REFRESH_RETRY: Duration = Duration::from_secs(10);

pub struct TokenCache {
    entries: moka::sync::Cache<CacheKey, Arc<Entry>>,
    flights: Arc<Mutex<HashMap<CacheKey, Flight>>>,
    fetcher: Arc<dyn Fetch>,
    min_remaining: Duration,
    metrics: Arc<Metrics>,
}

impl TokenCache {
    pub fn new(config: CacheConfig, fetcher: Arc<dyn Fetch>, metrics: Arc<Metrics>) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(config.capacity)
                .build(),
            flights: Arc::new(Mutex::new(HashMap::new())),
            fetcher,
            min_remaining: config.min_remaining,
            metrics,
        }
    }

    fn fresh(&self, key: &CacheKey) -> Option<Arc<IssuedToken>> {
        let entry = self.entries.get(key)?;
        if entry.token.remaining() < self.min_remaining {
            return None;
        }
        entry.used.store(true, Ordering::Relaxed);
        Some(entry.token.clone())
    }

    /// Serves the cached token for `key`, or fetches it once for every concurrent caller.
    /// With `claims`, always fetches and replaces the entry.
    pub async fn get(
        &self,
        key: CacheKey,
        scope: &str,
        claims: Option<&str>,
    ) -> Result<(Arc<IssuedToken>, Lookup), ProxyError> {
        if claims.is_some() {
            self.metrics
                .cache_lookups
                .with_label_values(&["bypass"])
                .inc();
            let token = Arc::new(self.fetcher.fetch(&key, scope, claims).await?);
            self.entries
                .insert(key, Arc::new(Entry::new(token.clone(), scope.into())));
            self.update_gauge();
            return Ok((token, Lookup::Bypass));
        }
        if let Some(t) = self.fresh(&key) {
            self.metrics.cache_hits.inc();
            return Ok((t, Lookup::Hit));
        }
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            // Checked again under the lock: a flight stores its token before it leaves the
            // map, so we either see the token or join the flight — never start a second one.
            if let Some(t) = self.fresh(&key) {
                drop(flights);
                self.metrics.cache_hits.inc();
                return Ok((t, Lookup::Hit));
            }
            match flights.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let f = self.start_flight(key.clone(), scope.into());
                    flights.insert(key, f.clone());
                    f
                }
            }
        };
        self.metrics
            .cache_lookups
            .with_label_values(&["miss"])
            .inc();
        flight.await.map(|t| (t, Lookup::Miss))
    }

    /// Runs the fetch on its own task, so it completes (and is cached) even if every caller
    /// that waited for it has gone away.
    /// The new entry counts as unused: a token fetched once and never served again is not
    /// renewed.
    fn start_flight(&self, key: CacheKey, scope: Arc<str>) -> Flight {
        let entries = self.entries.clone();
        let flights = self.flights.clone();
        let metrics = self.metrics.clone();
        let fetch = self.fetcher.fetch(&key, &scope, None);
        let task = tokio::spawn(async move {
            let result = fetch.await.map(Arc::new);
            if let Ok(token) = &result {
                entries.insert(key.clone(), Arc::new(Entry::new(token.clone(), scope)));
                // moka counts lazily; settle it so the gauge is exact (misses are rare).
                entries.run_pending_tasks();
                metrics.cache_entries.set(entries.entry_count() as i64);
            }
            flights
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            result
        });
        async move {
            task.await
                .unwrap_or_else(|e| Err(ProxyError::Internal(format!("token fetch failed: {e}"))))
        }
        .boxed()
        .shared()
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
                let f = self.start_flight((*key).clone(), entry.scope.clone());
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

    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
            _: &str,
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
        Arc::new(TokenCache::new(
            CacheConfig {
                capacity,
                min_remaining: Duration::from_secs(min_remaining),
            },
            script.clone(),
            Arc::new(Metrics::new()),
        ))
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch() {
        let script = Script::new((3600, None));
        let cache = cache(&script, 300, 100);
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let cache = cache.clone();
            tasks.push(tokio::spawn(async move {
                cache.get(key(1), "s/.default", None).await
            }));
        }
        let mut tokens = std::collections::HashSet::new();
        for t in tasks {
            tokens.insert(t.await.unwrap().unwrap().0.access_token.clone());
        }
        assert_eq!((script.calls(), tokens.len()), (1, 1));
        let (_, how) = cache.get(key(1), "s/.default", None).await.unwrap();
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
        assert!(cache.get(key(1), "s/.default", None).await.is_err());
        let (_, how) = cache.get(key(1), "s/.default", None).await.unwrap();
        assert_eq!((how, script.calls()), (Lookup::Miss, 2));
    }

    #[tokio::test]
    async fn nearly_expired_tokens_are_not_served() {
        let script = Script::new((3600, None));
        script.results.lock().unwrap().push(Ok(token(200, None)));
        let cache = cache(&script, 300, 100);
        cache.get(key(1), "s/.default", None).await.unwrap();
        let (t, how) = cache.get(key(1), "s/.default", None).await.unwrap();
        assert_eq!((how, t.expires_in), (Lookup::Miss, 3600));
    }

    #[tokio::test]
    async fn claims_always_fetch_and_replace_the_entry() {
        let script = Script::new((3600, None));
        let cache = cache(&script, 300, 100);
        let (first, _) = cache.get(key(1), "s/.default", None).await.unwrap();
        let (bypassed, how) = cache.get(key(1), "s/.default", Some("{}")).await.unwrap();
        assert_eq!(how, Lookup::Bypass);
        assert_ne!(first.access_token, bypassed.access_token);
        let (again, how) = cache.get(key(1), "s/.default", Some("{}")).await.unwrap();
        assert_eq!((how, script.calls()), (Lookup::Bypass, 3));
        let (hit, how) = cache.get(key(1), "s/.default", None).await.unwrap();
        assert_eq!((how, &hit.access_token), (Lookup::Hit, &again.access_token));
    }

    #[tokio::test]
    async fn only_used_keys_are_refreshed_ahead() {
        // refresh_in 0 s: due at once.
        let script = Script::new((3600, Some(0)));
        let cache = cache(&script, 300, 100);
        cache.get(key(1), "s/.default", None).await.unwrap();
        cache.get(key(2), "s/.default", None).await.unwrap();
        // Key 1 is used after its fetch; key 2 is not.
        cache.get(key(1), "s/.default", None).await.unwrap();
        assert_eq!(cache.refresh_due(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(script.calls(), 3);
        // Nobody used key 1 since its refresh: nothing more is due.
        assert_eq!(cache.refresh_due(), 0);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_serving_the_valid_token() {
        let script = Script::new((3600, Some(0)));
        let cache = cache(&script, 300, 100);
        let (t, _) = cache.get(key(1), "s/.default", None).await.unwrap();
        cache.get(key(1), "s/.default", None).await.unwrap();
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
        let (served, how) = cache.get(key(1), "s/.default", None).await.unwrap();
        assert_eq!((how, &served.access_token), (Lookup::Hit, &t.access_token));
    }

    #[tokio::test]
    async fn eviction_keeps_the_cache_at_its_bound() {
        let script = Arc::new(Script {
            delay: Duration::ZERO,
            ..Arc::into_inner(Script::new((3600, None))).unwrap()
        });
        let cache = cache(&script, 300, 50);
        for n in 0..500 {
            cache.get(key(n), "s/.default", None).await.unwrap();
        }
        assert!(cache.len() <= 50, "{} entries", cache.len());
    }
}
