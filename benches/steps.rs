//! Micro-benchmarks of the steps of a token request, each alone: parse, local SA-token
//! verification (RS256 and ES256), the token-cache hit, the authorization-cache hit, and the
//! signing of our assertion. Run with `cargo bench --bench steps`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures::future::{BoxFuture, FutureExt};
use identity_binding_proxy::authz::{Authorizer, AuthzConfig};
use identity_binding_proxy::exchange::bindings::Binding;
use identity_binding_proxy::exchange::cache::IssuedToken;
use identity_binding_proxy::exchange::cache::{CacheConfig, CacheKey, Fetch, Lookup, TokenCache};
use identity_binding_proxy::exchange::issuer::{Issuer, IssuerUrl};
use identity_binding_proxy::exchange::keys::SigningKey;
use identity_binding_proxy::metrics::Metrics;
use identity_binding_proxy::request::error::ProxyError;
use identity_binding_proxy::request::token;
use identity_binding_proxy::serve::limits::CallerBudgets;

/// The caller the cache charges (budgets are unbounded here).
const CALLER: &str = "system:serviceaccount:bench:bench";

use common::{Es256Cluster, Kube, CLIENT_ID, SCOPE, TENANT_ID};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn quick(c: &mut Criterion) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group("steps");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    g
}

fn parse(c: &mut Criterion) {
    let rt = runtime();
    let kube = rt.block_on(Kube::start());
    let body = common::token_form(&kube.sa_token(), SCOPE);
    let mut g = quick(c);
    g.bench_function("parse_form", |b| {
        b.iter(|| {
            token::parse(
                Some(TENANT_ID.to_string()),
                None,
                std::hint::black_box(body.as_bytes()),
            )
            .unwrap()
        })
    });
    g.finish();
    rt.block_on(kube.emulator.shutdown());
}

fn verify(c: &mut Criterion) {
    let rt = runtime();
    let kube = rt.block_on(Kube::start());
    let rs = rt.block_on(kube.authenticator());
    let rs_token = kube.sa_token();
    let es = Es256Cluster::new(kube.cluster.clone());
    // Both must succeed before they are timed.
    rt.block_on(rs.verify_locally(&rs_token)).unwrap();
    rt.block_on(es.authn.verify_locally(&es.token)).unwrap();
    let mut g = quick(c);
    g.bench_function("verify_locally_rs256", |b| {
        b.to_async(&rt)
            .iter(|| async { rs.verify_locally(&rs_token).await.unwrap() })
    });
    g.bench_function("verify_locally_es256", |b| {
        b.to_async(&rt)
            .iter(|| async { es.authn.verify_locally(&es.token).await.unwrap() })
    });
    g.finish();
    rt.block_on(kube.emulator.shutdown());
}

/// Upstream stand-in for the token cache: a token of the size the Entra emulator issues.
struct StaticFetch;

impl Fetch for StaticFetch {
    fn fetch(
        &self,
        _key: &CacheKey,
        _claims: Option<&str>,
    ) -> BoxFuture<'static, Result<IssuedToken, ProxyError>> {
        async {
            Ok(IssuedToken {
                access_token: "a".repeat(1400).into(),
                expires_in: 3599,
                ext_expires_in: 3599,
                refresh_in: Some(1799),
                received: Instant::now(),
            })
        }
        .boxed()
    }
}

fn caches(c: &mut Criterion) {
    let rt = runtime();
    let kube = rt.block_on(Kube::start());
    let cache = TokenCache::new(
        CacheConfig {
            capacity: 10_000,
            min_remaining: Duration::from_secs(300),
            max_keys_per_identity: usize::MAX,
        },
        Arc::new(CallerBudgets::new(u32::MAX, u32::MAX)),
        Arc::new(StaticFetch),
        Arc::new(Metrics::new()),
    );
    let key = CacheKey {
        authority: "https://login.microsoftonline.com/".into(),
        tenant: TENANT_ID.into(),
        client_id: CLIENT_ID.into(),
        scopes: SCOPE.into(),
    };
    let (_, first) = rt.block_on(cache.get(key.clone(), None, CALLER)).unwrap();
    assert_eq!(first, Lookup::Miss);

    let authn = rt.block_on(kube.authenticator());
    let caller = rt.block_on(authn.verify_locally(&kube.sa_token())).unwrap();
    let authz = Authorizer::new(
        kube.cluster.clone(),
        AuthzConfig {
            allowed_ttl: Duration::from_secs(300),
            denied_ttl: Duration::from_secs(30),
            allow_wildcard_grants: false,
        },
        Arc::new(CallerBudgets::new(u32::MAX, u32::MAX)),
        Arc::new(Metrics::new()),
    );
    rt.block_on(authz.authorize(&caller, CLIENT_ID)).unwrap();

    let mut g = quick(c);
    g.bench_function("token_cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let (t, lookup) = cache.get(key.clone(), None, CALLER).await.unwrap();
            debug_assert_eq!(lookup, Lookup::Hit);
            t
        })
    });
    g.bench_function("authz_cache_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { authz.authorize(&caller, CLIENT_ID).await.unwrap() })
    });
    g.finish();
    let reviews = kube.emulator.counts().subject_access_reviews;
    assert_eq!(reviews, 1, "every timed authorize was a cache hit");
    rt.block_on(kube.emulator.shutdown());
}

fn signing(c: &mut Criterion) {
    let key = SigningKey::generate(2048).unwrap();
    let pem = key.private_pem();
    let url = IssuerUrl::parse("https://issuer.example/{tenant}/{client_id}").unwrap();
    let binding = Binding {
        client_id: CLIENT_ID.into(),
        tenant_id: TENANT_ID.into(),
        subject: CLIENT_ID.into(),
    };
    let warm = Issuer::new(vec![SigningKey::from_pem(&pem).unwrap()], url.clone()).unwrap();
    warm.assertion(&binding).unwrap();
    let mut g = quick(c);
    g.bench_function("assertion_cold_rs256", |b| {
        // A fresh issuer per iteration, so every assertion is signed (setup is not timed).
        b.iter_batched(
            || Issuer::new(vec![SigningKey::from_pem(&pem).unwrap()], url.clone()).unwrap(),
            |issuer| issuer.assertion(&binding).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("assertion_warm", |b| {
        b.iter(|| warm.assertion(&binding).unwrap())
    });
    g.finish();
}

criterion_group!(benches, parse, verify, caches, signing);
criterion_main!(benches);
