//! Prometheus metrics. The names are part of the contract (operators' dashboards and alerts
//! depend on them). Labels are bounded: never a raw value from an unauthenticated request.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

const PREFIX: &str = "identity_binding_proxy";

/// Buckets from 50 µs to 5 s: a cache hit takes tens of microseconds, an Entra call hundreds
/// of milliseconds, a stalled dependency seconds.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 5.0,
    ]
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub cache_lookups: IntCounterVec,
    pub cache_entries: IntGauge,
    pub cache_refreshes: IntCounterVec,
    pub entra_requests: IntCounterVec,
    pub entra_duration: Histogram,
    pub kube_reviews: IntCounterVec,
    pub tls_handshake_failures: IntCounterVec,
    pub caller_budget_exceeded: IntCounterVec,
    pub certificate_reloads: IntCounterVec,
    pub certificate_expiry: IntGaugeVec,
    pub build_info: IntGaugeVec,
    /// The series a cache hit touches, resolved once: a label lookup hashes its values.
    pub served: IntCounter,
    pub served_duration: Histogram,
    pub cache_hits: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let name = |n: &str| format!("{PREFIX}_{n}");
        let counter = |n: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name(n), help), labels)
                .unwrap_or_else(|e| panic!("metric {n}: {e}"));
            registry
                .register(Box::new(c.clone()))
                .unwrap_or_else(|e| panic!("metric {n}: {e}"));
            c
        };
        let requests = counter(
            "requests_total",
            "Token endpoint requests by outcome and HTTP status.",
            &["outcome", "status"],
        );
        let cache_lookups = counter("cache_lookups_total", "Token cache lookups.", &["result"]);
        let cache_refreshes = counter(
            "cache_refreshes_total",
            "Refresh-ahead attempts of cached tokens.",
            &["result"],
        );
        let entra_requests = counter(
            "entra_requests_total",
            "Token exchanges sent to Entra, by HTTP status (or 'error').",
            &["status"],
        );
        let kube_reviews = counter(
            "kube_reviews_total",
            "TokenReviews and SubjectAccessReviews sent to the apiserver.",
            &["kind", "result"],
        );
        let certificate_reloads = counter(
            "certificate_reloads_total",
            "Reloads of serving certificates after their files changed, by result (a failed reload keeps the previous certificate).",
            &["result"],
        );
        let tls_handshake_failures = counter(
            "tls_handshake_failures_total",
            "Failed TLS handshakes by reason.",
            &["reason"],
        );
        let caller_budget_exceeded = counter(
            "caller_budget_exceeded_total",
            "Requests refused with 429 because their caller (namespace/service account) spent its per-minute budget, by budget ('miss', 'claims' or 'review').",
            &["kind"],
        );

        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                name("request_duration_seconds"),
                "Token endpoint latency by outcome.",
            )
            .buckets(latency_buckets()),
            &["outcome"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        let entra_duration = Histogram::with_opts(
            HistogramOpts::new(
                name("entra_request_duration_seconds"),
                "Latency of token exchanges with Entra.",
            )
            .buckets(latency_buckets()),
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        let cache_entries = IntGauge::new(name("cache_entries"), "Tokens in the cache.")
            .unwrap_or_else(|e| panic!("metric: {e}"));
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                name("certificate_expiry_timestamp_seconds"),
                "Expiry (Unix time) of the serving certificate per SNI name.",
            ),
            &["sni"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        let build_info = IntGaugeVec::new(
            Opts::new(name("build_info"), "Build information; always 1."),
            &["version"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        for c in [
            Box::new(request_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(entra_duration.clone()),
            Box::new(cache_entries.clone()),
            Box::new(certificate_expiry.clone()),
            Box::new(build_info.clone()),
        ] {
            registry
                .register(c)
                .unwrap_or_else(|e| panic!("metric: {e}"));
        }
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Every series a dashboard or alert expects exists from the start, at zero, so a
        // scrape right after start carries every name and rates have a baseline.
        for outcome in [
            "success",
            "invalid_request",
            "unauthenticated",
            "forbidden",
            "unbound",
            "upstream_error",
            "throttled",
            "over_budget",
            "request_timeout",
            "unavailable",
            "bad_upstream",
        ] {
            request_duration.with_label_values(&[outcome]);
        }
        requests.with_label_values(&["success", "200"]);
        // Alerts on callers over their budget need the series before the first refusal.
        requests.with_label_values(&["over_budget", "429"]);
        for result in ["hit", "miss", "bypass"] {
            cache_lookups.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            cache_refreshes.with_label_values(&[result]);
            certificate_reloads.with_label_values(&[result]);
        }
        entra_requests.with_label_values(&["200"]);
        for kind in ["tokenreview", "subjectaccessreview"] {
            for result in ["ok", "error"] {
                kube_reviews.with_label_values(&[kind, result]);
            }
        }
        for reason in [
            "unknown_sni",
            "no_sni",
            "tls_error",
            "timeout",
            "closed",
            "connection_limit",
            "peer_connection_limit",
        ] {
            tls_handshake_failures.with_label_values(&[reason]);
        }
        for kind in ["miss", "claims", "review"] {
            caller_budget_exceeded.with_label_values(&[kind]);
        }
        Self {
            registry,
            served: requests.with_label_values(&["success", "200"]),
            served_duration: request_duration.with_label_values(&["success"]),
            cache_hits: cache_lookups.with_label_values(&["hit"]),
            requests,
            request_duration,
            cache_lookups,
            cache_entries,
            cache_refreshes,
            entra_requests,
            entra_duration,
            kube_reviews,
            tls_handshake_failures,
            caller_budget_exceeded,
            certificate_reloads,
            certificate_expiry,
            build_info,
        }
    }

    pub fn kube_review(&self, kind: &'static str, result: &'static str) {
        self.kube_reviews.with_label_values(&[kind, result]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
