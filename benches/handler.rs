//! The whole request handler in-process, on a cache hit: `App::handle` of a `dev` system
//! (kube and Entra emulators, proxy) with a form body, no sockets and no TLS. This is the
//! proxy's own cost per request: parse, local verification + cached TokenReview, bindings,
//! cached SubjectAccessReview, token-cache hit, JSON response, metrics, log line (no
//! subscriber installed, as with `RUST_LOG=warn`). Run with `cargo bench --bench handler`.
//! The allocator is the binary's (jemalloc), so allocations cost what they cost in `serve`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::Full;
use identity_binding_proxy::cli::LogFormat;
use identity_binding_proxy::request::ConnInfo;
use identity_binding_proxy_dev::cli::DevArgs;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const SCOPE: &str = "https://vault.azure.net/.default";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn handle_cache_hit(c: &mut Criterion) {
    identity_binding_proxy::crypto::install_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args = dev_args(dir.path());
    let system = rt
        .block_on(identity_binding_proxy_dev::dev::start(&args))
        .unwrap();
    let app = system.proxy.app.clone();
    let token = std::fs::read_to_string(&system.info.allowed_token_file).unwrap();
    let body = Bytes::from(identity_binding_proxy::http::form::form_encode([
        ("grant_type", "client_credentials"),
        ("client_id", system.info.client_id.as_str()),
        ("scope", SCOPE),
        ("client_assertion_type", ASSERTION_TYPE),
        ("client_assertion", token.as_str()),
        ("client_info", "1"),
    ]));
    let path = format!("/{}/oauth2/v2.0/token", system.info.tenant_id);
    let conn = ConnInfo::detached(
        SocketAddr::from(([127, 0, 0, 1], 40000)),
        Some(system.info.sni_name.clone()),
    );
    let request = || {
        http::Request::post(path.as_str())
            .header("host", system.info.sni_name.as_str())
            .header(
                "content-type",
                "application/x-www-form-urlencoded;charset=utf-8",
            )
            .body(Full::new(body.clone()))
            .unwrap()
    };
    // The first request fills every cache (TokenReview, SubjectAccessReview, token).
    let first = rt.block_on(app.handle(request(), &conn));
    assert_eq!(first.status(), 200);
    let issued_before = system.entra.stats().tokens_issued;

    let mut g = c.benchmark_group("handler");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(50);
    g.bench_function("handle_cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = app.handle(request(), &conn).await;
            debug_assert_eq!(resp.status(), 200);
            resp
        })
    });
    // The same with `serve`'s logging: JSON at `info` (one line per request) or `warn` (none),
    // its own line through its batching writer; and, as before them, tracing_subscriber's
    // JSON straight to unbuffered stderr. Run with
    // stderr on a pipe someone reads, as a container runtime does:
    // `cargo bench --bench handler 2>&1 >/dev/stderr | cat >/dev/null` (or `2> >(cat >/dev/null)`).
    let pipe = identity_binding_proxy::serve::logpipe::install(std::io::stderr());
    // (name, level, the log's own line and writer, or tracing_subscriber's JSON to stderr)
    let logged: [(&str, &str, bool); 3] = [
        ("warn", "warn", true),
        ("info", "info", true),
        ("info_before", "info", false),
    ];
    for (name, level, ours) in logged {
        let _scope = tracing::subscriber::set_default(subscriber(level, ours, pipe));
        g.bench_function(format!("handle_cache_hit_{name}"), |b| {
            b.to_async(&rt).iter(|| async {
                let resp = app.handle(request(), &conn).await;
                debug_assert_eq!(resp.status(), 200);
                resp
            })
        });
        // The process's CPU, the log's writer thread included (criterion times the calling
        // thread's wall clock only).
        let cpu = process_cpu();
        rt.block_on(async {
            for _ in 0..CPU_REQUESTS {
                app.handle(request(), &conn).await;
            }
        });
        let per_request = (process_cpu() - cpu).as_secs_f64() * 1e6 / CPU_REQUESTS as f64;
        println!("handler/{name}: {per_request:.2} us of process CPU per request");
    }
    identity_binding_proxy::serve::logpipe::flush(Duration::from_secs(2));
    g.finish();
    assert_eq!(
        system.entra.stats().tokens_issued,
        issued_before,
        "every timed request was a cache hit"
    );
    rt.block_on(system.shutdown());
}

/// The `dev` system of the bench.
fn dev_args(dir: &std::path::Path) -> DevArgs {
    DevArgs {
        command: None,
        state_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        rbac: None,
        entra_latency_ms: 0,
        entra_token_lifetime_secs: 3599,
        cache_min_remaining_secs: 300,
        authz_denied_ttl_secs: 30,
        // Longer than the bench, so every timed request is an authorization-cache hit.
        authz_allowed_ttl_secs: 300,
        tokenreview_ttl_secs: 120,
        cache_capacity: 10_000,
        log_format: LogFormat::Json,
        proxy_flags: Vec::new(),
    }
}

/// `serve`'s logging at `level`: its own JSON line through the batching writer (`ours`), or
/// tracing_subscriber's JSON straight to unbuffered stderr, as before them.
fn subscriber(
    level: &str,
    ours: bool,
    pipe: identity_binding_proxy::serve::logpipe::LogWriter,
) -> Box<dyn tracing::Subscriber + Send + Sync> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_ansi(false);
    if ours {
        Box::new(
            builder
                .with_writer(pipe)
                .event_format(identity_binding_proxy::serve::logline::JsonLine)
                .finish(),
        )
    } else {
        Box::new(
            builder
                .with_writer(std::io::stderr)
                .json()
                .flatten_event(true)
                .finish(),
        )
    }
}

/// Requests timed for the process-CPU figure: a few seconds at a few microseconds each.
const CPU_REQUESTS: u32 = 300_000;

/// User + system CPU of this process so far (`/proc/self/stat`, in clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    // After the command name: state is field 3, utime 14 and stime 15 (proc(5)).
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Duration::from_millis(ticks * 10)
}

criterion_group!(benches, handle_cache_hit);
criterion_main!(benches);
