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
    /// Entra's refusals of our exchanges, by AADSTS code (a known set, else "other").
    pub entra_refusals: IntCounterVec,
    pub entra_duration: Histogram,
    pub kube_reviews: IntCounterVec,
    pub tls_handshake_failures: IntCounterVec,
    /// Connections closed at the connection cap to let a peer under its fair share in.
    pub connection_evictions: IntCounterVec,
    pub log: LogMetrics,
    pub caller_budget_exceeded: IntCounterVec,
    pub certificate_reloads: IntCounterVec,
    pub certificate_expiry: IntGaugeVec,
    pub build_info: IntGaugeVec,
    /// 1 for the issuer key that signs our assertions, by `kid` (loaded keys only).
    pub issuer_signing_key: IntGaugeVec,
    /// When the next issuer key starts signing (Unix time), by `kid`; absent when none waits.
    pub issuer_key_activation: IntGaugeVec,
    pub rbac: RbacMetrics,
    /// The series a cache hit touches, resolved once: a label lookup hashes its values.
    pub served: IntCounter,
    pub served_duration: Histogram,
    pub cache_hits: IntCounter,
}

const REFUSALS_HELP: &str = "Entra's refusals of token exchanges, by AADSTS code (FIC and key \
     mismatches, assertion times; 'other' for the rest).";

/// Creates metrics under the crate's prefix and registers them; a name or label set that
/// cannot register is a programming error caught by every test that builds `Metrics`.
struct Registrar(Registry);

impl Registrar {
    fn register<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.0
            .register(Box::new(c.clone()))
            .unwrap_or_else(|e| panic!("metric: {e}"));
        c
    }

    fn counter(&self, n: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let opts = Opts::new(format!("{PREFIX}_{n}"), help);
        self.register(IntCounterVec::new(opts, labels).unwrap_or_else(|e| panic!("{n}: {e}")))
    }

    fn histogram(&self, n: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(format!("{PREFIX}_{n}"), help).buckets(latency_buckets());
        self.register(HistogramVec::new(opts, labels).unwrap_or_else(|e| panic!("{n}: {e}")))
    }

    fn gauge(&self, n: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let opts = Opts::new(format!("{PREFIX}_{n}"), help);
        self.register(IntGaugeVec::new(opts, labels).unwrap_or_else(|e| panic!("{n}: {e}")))
    }

    /// A gauge without labels.
    fn single_gauge(&self, n: &str, help: &str) -> IntGauge {
        let gauge = IntGauge::new(format!("{PREFIX}_{n}"), help);
        self.register(gauge.unwrap_or_else(|e| panic!("{n}: {e}")))
    }

    /// A latency histogram without labels.
    fn single_histogram(&self, n: &str, help: &str) -> Histogram {
        let opts = HistogramOpts::new(format!("{PREFIX}_{n}"), help).buckets(latency_buckets());
        self.register(Histogram::with_opts(opts).unwrap_or_else(|e| panic!("{n}: {e}")))
    }
}

/// Connections closed at a port's connection cap to let a peer under its fair share in.
fn connection_evictions(r: &Registrar) -> IntCounterVec {
    r.counter(
        "connection_evictions_total",
        "Connections told to close because the port ('token' or 'admin') held its connection cap and a peer under its fair share connected, by what the connection was doing: 'no_request' (handshake or first request pending), 'idle', 'unauthenticated_in_flight'.",
        &["port", "reason"],
    )
}

/// What the log leaves out: refusals summarized per peer, lines its reader did not take.
pub struct LogMetrics {
    /// Refusals before authentication (connections, handshakes, requests), by reason: the
    /// counts behind the log's per-peer summaries.
    pub refusals: IntCounterVec,
    /// Log lines dropped because the log reader did not keep up (synced at each scrape).
    pub lines_dropped: IntCounter,
}

impl LogMetrics {
    fn new(r: &Registrar) -> Self {
        let dropped = IntCounter::new(
            format!("{PREFIX}_log_lines_dropped_total"),
            "Log lines dropped because the log's reader did not keep up (its queue was full); requests never wait for the log.",
        );
        Self {
            refusals: r.counter(
                "refusals_total",
                "Connections and requests refused before their caller was authenticated, by reason (a connection limit, a handshake failure, or the outcome of a request); the log summarizes them per peer.",
                &["reason"],
            ),
            lines_dropped: r.register(dropped.unwrap_or_else(|e| panic!("log_lines_dropped_total: {e}"))),
        }
    }
}

/// The RBAC watch: what it saw, what it keeps, whether it is synced.
pub struct RbacMetrics {
    /// RBAC watch events by kind and by whose decisions they dropped.
    pub events: IntCounterVec,
    /// Roles and bindings the RBAC index keeps (only those that can grant managed identities).
    pub index_entries: IntGaugeVec,
    /// 1 once all four RBAC kinds have been listed.
    pub watch_synced: IntGauge,
    /// Complete lists of each RBAC kind: one at start, then only when a watch cannot resume.
    pub lists: IntCounterVec,
    /// RBAC watches that failed (each also logged): not the apiserver ending one on time.
    pub interruptions: IntCounterVec,
}

impl RbacMetrics {
    fn new(r: &Registrar) -> Self {
        Self {
            events: r.counter(
                "rbac_events_total",
                "RBAC watch events by kind and effect: 'unrelated' (no cached decision dropped), 'subjects' (the decisions of the subjects it binds), 'everyone' (every decision).",
                &["kind", "effect"],
            ),
            index_entries: r.gauge(
                "rbac_index_entries",
                "Roles and bindings kept by the RBAC index: only those that can grant managed identities.",
                &["what"],
            ),
            lists: r.counter(
                "rbac_lists_total",
                "Complete lists of an RBAC kind: one at start; more only when a broken watch could not resume from its resource version.",
                &["kind"],
            ),
            interruptions: r.counter(
                "rbac_watch_interruptions_total",
                "RBAC watches or lists that failed, by kind (a watch the apiserver ends after its timeoutSeconds is not counted): meanwhile cached decisions fall back to their TTLs.",
                &["kind"],
            ),
            watch_synced: r.single_gauge(
                "rbac_watch_synced",
                "1 once Roles, ClusterRoles and their bindings have all been listed.",
            ),
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registrar(Registry::new());
        let requests = r.counter(
            "requests_total",
            "Token endpoint requests by outcome and HTTP status.",
            &["outcome", "status"],
        );
        let request_duration = r.histogram(
            "request_duration_seconds",
            "Token endpoint latency by outcome.",
            &["outcome"],
        );
        let cache_lookups = r.counter("cache_lookups_total", "Token cache lookups.", &["result"]);
        let metrics = Self {
            served: requests.with_label_values(&["success", "200"]),
            served_duration: request_duration.with_label_values(&["success"]),
            cache_hits: cache_lookups.with_label_values(&["hit"]),
            requests,
            request_duration,
            cache_lookups,
            cache_entries: r.single_gauge("cache_entries", "Tokens in the cache."),
            cache_refreshes: r.counter(
                "cache_refreshes_total",
                "Refresh-ahead attempts of cached tokens.",
                &["result"],
            ),
            entra_requests: r.counter(
                "entra_requests_total",
                "Token exchanges sent to Entra, by HTTP status (or 'error').",
                &["status"],
            ),
            entra_refusals: r.counter("entra_refusals_total", REFUSALS_HELP, &["aadsts"]),
            entra_duration: r.single_histogram(
                "entra_request_duration_seconds",
                "Latency of token exchanges with Entra.",
            ),
            kube_reviews: r.counter(
                "kube_reviews_total",
                "TokenReviews and SubjectAccessReviews sent to the apiserver.",
                &["kind", "result"],
            ),
            tls_handshake_failures: r.counter(
                "tls_handshake_failures_total",
                "Failed TLS handshakes by reason.",
                &["reason"],
            ),
            connection_evictions: connection_evictions(&r),
            log: LogMetrics::new(&r),
            caller_budget_exceeded: r.counter(
                "caller_budget_exceeded_total",
                "Requests refused with 429 because their caller (namespace/service account) spent its per-minute budget, by budget ('miss', 'claims' or 'review').",
                &["kind"],
            ),
            certificate_reloads: r.counter(
                "certificate_reloads_total",
                "Reloads of serving certificates after their files changed, by result (a failed reload keeps the previous certificate).",
                &["result"],
            ),
            certificate_expiry: r.gauge(
                "certificate_expiry_timestamp_seconds",
                "Expiry (Unix time) of the serving certificate per SNI name.",
                &["sni"],
            ),
            build_info: r.gauge("build_info", "Build information; always 1.", &["version"]),
            issuer_signing_key: r.gauge(
                "issuer_signing_key",
                "1 for the issuer key (by kid) that signs the assertions presented to Entra.",
                &["kid"],
            ),
            issuer_key_activation: r.gauge(
                "issuer_key_activation_timestamp_seconds",
                "When (Unix time) the next issuer key, published but not yet long enough for Entra to know it, starts signing.",
                &["kid"],
            ),
            rbac: RbacMetrics::new(&r),
            registry: r.0,
        };
        metrics.create_expected_series();
        metrics
    }

    /// Every series a dashboard or alert expects exists from the start, at zero, so a scrape
    /// right after start carries every name and rates have a baseline.
    fn create_expected_series(&self) {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for outcome in crate::request::error::OUTCOMES {
            self.request_duration.with_label_values(&[outcome]);
        }
        // Alerts on callers over their budget need the series before the first refusal.
        self.requests.with_label_values(&["over_budget", "429"]);
        for result in ["hit", "miss", "bypass"] {
            self.cache_lookups.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            self.cache_refreshes.with_label_values(&[result]);
            self.certificate_reloads.with_label_values(&[result]);
            for kind in ["tokenreview", "subjectaccessreview"] {
                self.kube_reviews.with_label_values(&[kind, result]);
            }
        }
        self.entra_requests.with_label_values(&["200"]);
        for code in crate::exchange::entra::REFUSAL_LABELS {
            self.entra_refusals.with_label_values(&[code]);
        }
        for kind in [
            "clusterroles",
            "roles",
            "clusterrolebindings",
            "rolebindings",
        ] {
            self.rbac.lists.with_label_values(&[kind]);
            self.rbac.interruptions.with_label_values(&[kind]);
            for effect in ["unrelated", "subjects", "everyone"] {
                self.rbac.events.with_label_values(&[kind, effect]);
            }
        }
        for what in ["roles", "bindings"] {
            self.rbac.index_entries.with_label_values(&[what]);
        }
        let refusals = crate::serve::limits::Refusal::ALL.map(crate::serve::limits::Refusal::label);
        for reason in crate::serve::handshake::HANDSHAKE_FAILURES
            .iter()
            .chain(&refusals)
        {
            self.tls_handshake_failures.with_label_values(&[reason]);
        }
        for port in ["token", "admin"] {
            for why in crate::serve::limits::Eviction::ALL {
                self.connection_evictions
                    .with_label_values(&[port, why.label()]);
            }
        }
        for reason in crate::serve::refusals::reasons() {
            self.log.refusals.with_label_values(&[reason]);
        }
        for kind in crate::serve::limits::Spend::ALL {
            self.caller_budget_exceeded
                .with_label_values(&[kind.label()]);
        }
    }

    /// One finished token request: the fast path (a 200) touches series resolved once.
    pub fn record_request(
        &self,
        outcome: &'static str,
        status: http::StatusCode,
        elapsed: std::time::Duration,
    ) {
        if status == http::StatusCode::OK && outcome == "success" {
            self.served.inc();
            self.served_duration.observe(elapsed.as_secs_f64());
            return;
        }
        self.requests
            .with_label_values(&[outcome, status.as_str()])
            .inc();
        self.request_duration
            .with_label_values(&[outcome])
            .observe(elapsed.as_secs_f64());
    }

    pub fn kube_review(&self, kind: &'static str, result: &'static str) {
        self.kube_reviews.with_label_values(&[kind, result]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        // The log's writer counts its drops process-wide (it is the process's stderr).
        let dropped = crate::serve::logpipe::dropped();
        let counted = self.log.lines_dropped.get();
        if dropped > counted {
            self.log.lines_dropped.inc_by(dropped - counted);
        }
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
