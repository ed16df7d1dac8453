//! Step 4: the access-token cache, keyed by (authority, tenant, client-id, normalized scopes).
//!
//! - Concurrent misses for one key share ONE upstream call (single flight); an error is shared
//!   by that flight only and never cached.
//! - A token with less than `min_remaining` left is not served; the caller waits for a fresh one.
//! - `claims` (CAE challenges) bypass the cache, and the fresh token replaces the entry.
//! - Bounded by entry count (TinyLFU admission, LRU eviction: moka).
//!
//! Authorization happens BEFORE this cache is consulted, on every request.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};

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

type Flight = Shared<BoxFuture<'static, Result<Arc<IssuedToken>, ProxyError>>>;

pub struct CacheConfig {
    /// Maximum number of cached tokens.
    pub capacity: u64,
    /// Tokens with less than this left are not served (5 minutes: enough for the caller to
    /// use the token for a typical operation after receiving it).
    pub min_remaining: Duration,
}

pub struct TokenCache {
    entries: moka::sync::Cache<CacheKey, Arc<IssuedToken>>,
    flights: Arc<Mutex<HashMap<CacheKey, Flight>>>,
    min_remaining: Duration,
    metrics: Arc<Metrics>,
}

impl TokenCache {
    pub fn new(config: CacheConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(config.capacity)
                .build(),
            flights: Arc::new(Mutex::new(HashMap::new())),
            min_remaining: config.min_remaining,
            metrics,
        }
    }

    fn fresh(&self, key: &CacheKey) -> Option<Arc<IssuedToken>> {
        self.entries
            .get(key)
            .filter(|t| t.remaining() >= self.min_remaining)
    }

    /// Serves the cached token for `key`, or runs `fetch` (once, for every concurrent caller).
    /// With `bypass`, always fetches and replaces the entry.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        key: CacheKey,
        bypass: bool,
        fetch: F,
    ) -> Result<(Arc<IssuedToken>, Lookup), ProxyError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<IssuedToken, ProxyError>> + Send + 'static,
    {
        if bypass {
            self.metrics.cache_lookups.with_label_values(&["bypass"]).inc();
            let token = Arc::new(fetch().await?);
            self.entries.insert(key, token.clone());
            self.metrics.cache_entries.set(self.entries.entry_count() as i64);
            return Ok((token, Lookup::Bypass));
        }
        if let Some(t) = self.fresh(&key) {
            self.metrics.cache_lookups.with_label_values(&["hit"]).inc();
            return Ok((t, Lookup::Hit));
        }
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            // Checked again under the lock: a flight stores its token before it leaves the
            // map, so we either see the token or join the flight — never start a second one.
            if let Some(t) = self.fresh(&key) {
                drop(flights);
                self.metrics.cache_lookups.with_label_values(&["hit"]).inc();
                return Ok((t, Lookup::Hit));
            }
            match flights.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let f = self.start_flight(key.clone(), fetch());
                    flights.insert(key, f.clone());
                    f
                }
            }
        };
        self.metrics.cache_lookups.with_label_values(&["miss"]).inc();
        flight.await.map(|t| (t, Lookup::Miss))
    }

    /// Runs the fetch on its own task, so it completes (and is cached) even if every caller
    /// that waited for it has gone away.
    fn start_flight(
        &self,
        key: CacheKey,
        fetch: impl Future<Output = Result<IssuedToken, ProxyError>> + Send + 'static,
    ) -> Flight {
        let entries = self.entries.clone();
        let flights = self.flights.clone();
        let metrics = self.metrics.clone();
        let task = tokio::spawn(async move {
            let result = fetch.await.map(Arc::new);
            if let Ok(token) = &result {
                entries.insert(key.clone(), token.clone());
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
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant;

    fn key() -> CacheKey {
        CacheKey {
            authority: "https://login.example".into(),
            tenant: "t".into(),
            client_id: "c".into(),
            scopes: "s/.default".into(),
        }
    }

    fn token(expires_in: u64) -> IssuedToken {
        IssuedToken {
            access_token: "tok".into(),
            expires_in,
            ext_expires_in: expires_in,
            refresh_in: None,
            received: Instant::now(),
        }
    }

    fn cache(min_remaining: u64) -> Arc<TokenCache> {
        Arc::new(TokenCache::new(
            CacheConfig { capacity: 100, min_remaining: Duration::from_secs(min_remaining) },
            Arc::new(Metrics::new()),
        ))
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch() {
        let cache = cache(300);
        let calls = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch(key(), false, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(token(3600))
                    })
                    .await
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap().is_ok());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let (_, how) = cache.get_or_fetch(key(), false, || async { Ok(token(1)) }).await.unwrap();
        assert_eq!(how, Lookup::Hit);
    }

    #[tokio::test]
    async fn errors_are_not_cached_beyond_their_flight() {
        let cache = cache(300);
        let r = cache
            .get_or_fetch(key(), false, || async { Err(ProxyError::BadUpstream("x".into())) })
            .await;
        assert!(r.is_err());
        let (_, how) = cache.get_or_fetch(key(), false, || async { Ok(token(3600)) }).await.unwrap();
        assert_eq!(how, Lookup::Miss);
    }

    #[tokio::test]
    async fn nearly_expired_tokens_are_not_served() {
        let cache = cache(300);
        cache.get_or_fetch(key(), false, || async { Ok(token(200)) }).await.unwrap();
        let (t, how) = cache.get_or_fetch(key(), false, || async { Ok(token(3600)) }).await.unwrap();
        assert_eq!((how, t.expires_in), (Lookup::Miss, 3600));
    }

    #[tokio::test]
    async fn bypass_always_fetches_and_replaces() {
        let cache = cache(300);
        cache.get_or_fetch(key(), false, || async { Ok(token(3600)) }).await.unwrap();
        let (_, how) = cache.get_or_fetch(key(), true, || async { Ok(token(1800)) }).await.unwrap();
        assert_eq!(how, Lookup::Bypass);
        let (t, how) = cache.get_or_fetch(key(), false, || async { Ok(token(1)) }).await.unwrap();
        assert_eq!((how, t.expires_in), (Lookup::Hit, 1800));
    }
}
