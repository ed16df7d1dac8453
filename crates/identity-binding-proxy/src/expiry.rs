//! Per-entry expiry for the caches whose entries each know how long they may be trusted
//! (TokenReview answers, verified tokens, authorization decisions): the cache library drops
//! each at its own deadline, so no entry is compared with a clock by hand.

use std::time::Duration;

/// A cache entry that knows how long it may be trusted.
pub trait Lifetime {
    fn lifetime(&self) -> Duration;
}

/// Drops each cache entry at its own deadline: its [`Lifetime`] from when it was stored.
pub struct OwnLifetime;

impl<K, V: Lifetime> moka::Expiry<K, V> for OwnLifetime {
    fn expire_after_create(
        &self,
        _key: &K,
        value: &V,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.lifetime())
    }

    /// A value stored over another gets its own lifetime, not what was left of the old one.
    fn expire_after_update(
        &self,
        _key: &K,
        value: &V,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.lifetime())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Entry(Duration);

    impl Lifetime for Entry {
        fn lifetime(&self) -> Duration {
            self.0
        }
    }

    // Real time: moka keeps its own clock, which a paused tokio clock does not move.
    #[tokio::test]
    async fn each_entry_disappears_at_its_own_deadline() {
        let cache: moka::future::Cache<u8, Entry> = moka::future::Cache::builder()
            .expire_after(OwnLifetime)
            .build();
        cache.insert(1, Entry(Duration::from_millis(150))).await;
        cache.insert(2, Entry(Duration::from_secs(60))).await;
        cache.insert(3, Entry(Duration::ZERO)).await;
        assert!(
            cache.get(&3).await.is_none(),
            "a zero lifetime is never served"
        );
        assert!(cache.get(&1).await.is_some());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(cache.get(&1).await.is_none(), "gone at its deadline");
        assert!(cache.get(&2).await.is_some(), "a longer lifetime stays");
        // Stored again, an entry gets its new lifetime, not the rest of the old one.
        cache.insert(2, Entry(Duration::from_millis(150))).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(cache.get(&2).await.is_none());
    }
}
