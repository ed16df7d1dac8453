//! Bytes of heap per cached token beyond the token's own bytes, counted exactly with a
//! counting allocator (no RSS noise): fill a `TokenCache` with 100 000 distinct
//! (client-id, scope) entries holding realistic tokens and divide the heap growth.
//!
//! `cargo bench --bench cache_memory`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use identity_binding_proxy::exchange::cache::IssuedToken;
use identity_binding_proxy::exchange::cache::{CacheConfig, CacheKey, Fetch, TokenCache};
use identity_binding_proxy::metrics::Metrics;
use identity_binding_proxy::request::error::ProxyError;
use identity_binding_proxy::serve::limits::CallerBudgets;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The size of an Entra access token for an app (a signed JWT): ~1.4 KiB is typical.
const TOKEN_BYTES: usize = 1400;
const ENTRIES: usize = 100_000;

struct FixedToken;

impl Fetch for FixedToken {
    fn fetch(
        &self,
        _: &CacheKey,
        _: Option<&str>,
    ) -> BoxFuture<'static, Result<IssuedToken, ProxyError>> {
        async {
            Ok(IssuedToken {
                access_token: "x".repeat(TOKEN_BYTES).into(),
                expires_in: 3600,
                ext_expires_in: 3600,
                refresh_in: Some(1800),
                received: Instant::now(),
            })
        }
        .boxed()
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cache = Arc::new(TokenCache::new(
            CacheConfig {
                capacity: 1_000_000,
                min_remaining: Duration::from_secs(300),
                max_keys_per_identity: usize::MAX,
            },
            Arc::new(CallerBudgets::new(u32::MAX, u32::MAX)),
            Arc::new(FixedToken),
            Arc::new(Metrics::new()),
        ));
        let authority: Arc<str> = "https://login.microsoftonline.com".into();
        // Keys and scopes are built before counting starts: they are the caller's request, not
        // the cache's; what the cache keeps of them is counted when it clones them.
        let requests: Vec<(CacheKey, String)> = (0..ENTRIES)
            .map(|i| {
                let scope = format!("https://resource-{i}.example.com/.default");
                let key = CacheKey {
                    authority: authority.clone(),
                    tenant: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
                    client_id: format!("{:08x}-2222-3333-4444-555555555555", i),
                    scopes: scope.clone(),
                };
                (key, scope)
            })
            .collect();
        let before = LIVE.load(Ordering::Relaxed);
        for (key, _) in requests.iter() {
            cache.get(key.clone(), None, "bench").await.unwrap();
        }
        let entries = cache.entry_count() as isize;
        // The keys cloned into the cache are its memory; the originals are still held by
        // `requests` and were allocated before `before`.
        let grown = LIVE.load(Ordering::Relaxed) - before;
        let per_entry = grown / entries;
        let overhead = per_entry - TOKEN_BYTES as isize;
        println!("entries                {entries}");
        println!("heap growth            {} KiB", grown / 1024);
        println!("bytes per entry        {per_entry}");
        println!("token bytes            {TOKEN_BYTES}");
        println!("overhead per entry     {overhead} bytes (key strings, bookkeeping, moka)");
        drop(requests);
    });
}
