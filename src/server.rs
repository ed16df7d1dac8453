//! Builds the proxy from its configuration and runs it: the TLS listener, the admin server, and
//! the background tasks (JWKS refresh, bindings and certificate reload). `serve` and `dev` both
//! come through [`start`], so dev runs exactly the production code path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::authn::{Authenticator, AuthnConfig};
use crate::authz::{Authorizer, AuthzConfig};
use crate::bindings::Bindings;
use crate::cache::{CacheConfig, TokenCache};
use crate::cluster::Cluster;
use crate::config::ProxyConfig;
use crate::entra::{EntraClient, Exchanger};
use crate::http::{accept_loop, json, serve_connection, text, Body, ConnTimeouts};
use crate::issuer::Issuer;
use crate::limits::{CallerBudgets, ConnectionPermit, Limits, LimitsConfig};
use crate::metrics::Metrics;
use crate::proxy::{App, ConnInfo, Profile};
use crate::tls::SniRouter;

/// How often the cluster JWKS is refreshed (rotation on the apiserver shows up within this).
const JWKS_REFRESH: Duration = Duration::from_secs(300);

/// Readiness: certificates, JWKS and bindings loaded, and not shutting down.
pub struct Readiness {
    authn: Arc<Authenticator>,
    draining: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.authn.ready() && !self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// A started proxy.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub readiness: Arc<Readiness>,
    pub app: Arc<App>,
    done: tokio::task::JoinHandle<()>,
}

impl RunningProxy {
    /// Waits until the proxy has stopped (after `shutdown` was cancelled and requests drained).
    pub async fn wait(self) {
        let _ = self.done.await;
    }

    /// The graceful stop: `/readyz` turns not-ready at once, the proxy keeps serving for
    /// `delay` (so endpoints and load balancers stop sending new callers), then stops
    /// accepting and drains in-flight requests within the drain deadline.
    pub async fn stop_gracefully(self, stop: &CancellationToken, delay: Duration) {
        self.readiness.set_draining();
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "not ready; serving on until the shutdown delay passes"
        );
        tokio::time::sleep(delay).await;
        tracing::info!("draining in-flight requests");
        stop.cancel();
        self.wait().await;
        tracing::info!("stopped");
    }
}

/// The proxy's two listening sockets, bound before anything else starts.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `--listen` and `--admin-listen`; the error names the address and the flag.
    pub async fn bind(config: &ProxyConfig) -> anyhow::Result<Self> {
        let bind = |addr, flag: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} ({flag})"))
        };
        Ok(Self {
            proxy: bind(config.listen, "--listen").await?,
            admin: bind(config.admin_listen, "--admin-listen").await?,
        })
    }
}

/// Loads everything, binds both listeners, and starts serving. Returns once listening;
/// readiness follows when the first JWKS arrives.
pub async fn start(
    config: ProxyConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningProxy> {
    let listeners = Listeners::bind(&config).await?;
    start_on(config, listeners, shutdown).await
}

/// [`start`] on listeners bound already (so `dev` can refuse a busy port before it writes
/// anything, and never give the port up in between).
pub async fn start_on(
    config: ProxyConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningProxy> {
    crate::http::install_crypto_provider();
    let metrics = Arc::new(Metrics::new());
    let router = Arc::new(
        SniRouter::load(
            config.tls.clone(),
            config.default_sni.clone(),
            config.handshake_timeout,
            metrics.clone(),
        )
        .map_err(anyhow::Error::msg)?,
    );
    let app = build_app(&config, &metrics).await?;
    let readiness = Arc::new(Readiness {
        authn: app.authn.clone(),
        draining: AtomicBool::new(false),
    });
    let Listeners {
        proxy: listener,
        admin: admin_listener,
    } = listeners;
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let background = CancellationToken::new();
    spawn_background(&app, &router, &config, &background);
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(serve_admin(
        admin_listener,
        config.admin_limits.clone(),
        ConnTimeouts {
            first_request: Some(config.header_read_timeout),
            idle: Some(config.idle_timeout),
        },
        (readiness.clone(), metrics),
        admin_stop.clone(),
    ));
    let done = tokio::spawn({
        let app = app.clone();
        let readiness = readiness.clone();
        async move {
            serve_tls(listener, router, app, &config, shutdown).await;
            readiness.set_draining();
            background.cancel();
            admin_stop.cancel();
            let _ = admin.await;
        }
    });
    tracing::info!(%addr, %admin_addr, "identity-binding-proxy listening");
    Ok(RunningProxy {
        addr,
        admin_addr,
        readiness,
        app,
        done,
    })
}

/// Every step of the request path, built from the configuration.
async fn build_app(config: &ProxyConfig, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<App>> {
    let issuer = Arc::new(
        Issuer::from_files(&config.issuer_keys, config.issuer_url.clone())
            .map_err(anyhow::Error::msg)?,
    );
    let bindings = Arc::new(Bindings::open(&config.bindings).map_err(anyhow::Error::msg)?);
    let cluster = Arc::new(Cluster::connect(config.kubeconfig.as_deref()).await?);
    let authn = Arc::new(Authenticator::new(
        cluster.clone(),
        AuthnConfig {
            audience: config.token_audience.clone(),
            mode: config.authn_mode,
            review_ttl: config.tokenreview_ttl,
            persist_dir: config.state_dir.clone(),
        },
        metrics.clone(),
    ));
    authn.load_persisted();
    let budgets = Arc::new(CallerBudgets::new(
        config.caller_miss_budget,
        config.caller_claims_budget,
    ));
    let authz = Arc::new(Authorizer::new(
        cluster,
        AuthzConfig {
            allowed_ttl: config.authz_allowed_ttl,
            denied_ttl: config.authz_denied_ttl,
            allow_wildcard_grants: config.allow_wildcard_grants,
        },
        budgets.clone(),
        metrics.clone(),
    ));
    let entra = Arc::new(EntraClient::new(
        crate::http::client(),
        config.entra_timeout,
        metrics.clone(),
    ));
    let exchanger = Arc::new(Exchanger {
        bindings: bindings.clone(),
        issuer: issuer.clone(),
        entra,
    });
    let cache = Arc::new(TokenCache::new(
        CacheConfig {
            capacity: config.cache_capacity,
            min_remaining: config.cache_min_remaining,
            max_keys_per_identity: config.cache_max_keys_per_identity,
        },
        budgets,
        exchanger,
        metrics.clone(),
    ));
    Ok(Arc::new(App {
        authn,
        authz,
        bindings,
        cache,
        issuer,
        metrics: metrics.clone(),
        profiles: config
            .sni_profiles
            .iter()
            .map(|p| (p.name.clone(), Profile::new(&p.authority, p.tenant.clone())))
            .collect(),
        default_profile: Profile::new(&config.authority_host, None),
        max_body_bytes: config.max_body_bytes,
        body_timeout: config.body_timeout,
        request_timeout: config.request_timeout,
    }))
}

/// The JWKS refresh, the RBAC watch, refresh-ahead, and the reloads of keys, bindings and
/// certificates, until `stop`.
fn spawn_background(
    app: &App,
    router: &Arc<SniRouter>,
    config: &ProxyConfig,
    stop: &CancellationToken,
) {
    tokio::spawn(app.authn.clone().run_refresh(JWKS_REFRESH, stop.clone()));
    tokio::spawn(app.authz.clone().watch_rbac(stop.clone()));
    tokio::spawn(
        app.cache
            .clone()
            .run_refresh(config.refresh_tick, stop.clone()),
    );
    tokio::spawn(app.issuer.clone().watch(config.reload_period, stop.clone()));
    tokio::spawn(
        app.bindings
            .clone()
            .watch(config.reload_period, stop.clone()),
    );
    tokio::spawn(router.clone().watch(config.reload_period, stop.clone()));
}

/// The admin server: `/livez`, `/readyz`, `/metrics`, with its own connection cap and the
/// proxy's header and idle timeouts.
async fn serve_admin(
    listener: TcpListener,
    limits: LimitsConfig,
    timeouts: ConnTimeouts,
    (readiness, metrics): (Arc<Readiness>, Arc<Metrics>),
    stop: CancellationToken,
) {
    let limits = Limits::new(limits);
    crate::http::serve_plain(listener, stop, limits, timeouts, move |req, _peer| {
        let readiness = readiness.clone();
        let metrics = metrics.clone();
        async move { admin_response(req.uri().path(), &readiness, &metrics) }
    })
    .await
}

fn admin_response(path: &str, readiness: &Readiness, metrics: &Metrics) -> Response<Body> {
    match path {
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" if readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let mut resp = text(StatusCode::OK, metrics.render());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => json(StatusCode::NOT_FOUND, &b"{\"error\":\"not found\"}"[..]),
    }
}

/// How often an idle h2 connection is pinged, and how long the answer may take: a peer that
/// vanished without closing is found within a minute.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's HTTP/1 read buffer: a request head plus a body chunk; its default (~400 KiB) is
/// room an unauthenticated peer could fill on every connection.
const H1_MAX_BUF: usize = 32 * 1024;
/// The largest flow-control window HTTP/2 allows.
const H2_MAX_WINDOW: u32 = (1 << 31) - 1;
/// The largest h2 header block accepted (hyper's default; stated so it is visibly bounded).
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;

/// One accepted connection of the token port, before its TLS handshake.
struct TlsConnection {
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    permit: ConnectionPermit,
    router: Arc<SniRouter>,
    app: Arc<App>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    timeouts: ConnTimeouts,
}

impl TlsConnection {
    /// The handshake (SNI decides the certificate and the profile), then its requests until
    /// the peer leaves, a deadline passes, or `shutdown` fires.
    async fn serve(self, shutdown: CancellationToken) {
        let tls = match self.router.accept(self.tcp).await {
            Ok(tls) => tls,
            Err(e) => {
                tracing::debug!(peer = %self.peer, reason = e.reason(), "TLS handshake refused");
                return;
            }
        };
        let conn_info = Arc::new(ConnInfo {
            peer: self.peer,
            sni: self.router.served_name(tls.get_ref().1.server_name()),
            permit: self.permit,
        });
        let app = self.app;
        let handler = move |req| {
            let (app, conn_info) = (app.clone(), conn_info.clone());
            async move { app.handle(req, &conn_info).await }
        };
        serve_connection(&self.builder, tls, self.timeouts, &shutdown, handler).await;
    }
}

/// The HTTP settings of the token port, sized to a token request (SPEC §11): an h2 stream's
/// window holds one body, a connection's window a few.
fn token_port_builder(config: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    // HTTP/2 windows are at most 2^31 - 1 (RFC 9113 §6.9.1); a token body is far smaller.
    let body_window = u32::try_from(config.max_body_bytes)
        .unwrap_or(u32::MAX)
        .min(H2_MAX_WINDOW / 4);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(H1_MAX_BUF)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.h2_max_streams)
        .initial_stream_window_size(body_window)
        .initial_connection_window_size(body_window.saturating_mul(4).max(65_535))
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT);
    builder
}

/// The token port: TLS connections within the limits until `shutdown`, then in-flight
/// requests drain within the drain deadline.
async fn serve_tls(
    listener: TcpListener,
    router: Arc<SniRouter>,
    app: Arc<App>,
    config: &ProxyConfig,
    shutdown: CancellationToken,
) {
    let limits = Limits::new(config.limits.clone());
    let builder = Arc::new(token_port_builder(config));
    let timeouts = ConnTimeouts {
        first_request: Some(config.header_read_timeout),
        idle: Some(config.idle_timeout),
    };
    let metrics = app.metrics.clone();
    let refused = |_peer, refusal: crate::limits::Refusal| {
        metrics
            .tls_handshake_failures
            .with_label_values(&[refusal.label()])
            .inc();
    };
    let serve = |tcp, peer, permit| {
        let conn = TlsConnection {
            tcp,
            peer,
            permit,
            router: router.clone(),
            app: app.clone(),
            builder: builder.clone(),
            timeouts,
        };
        conn.serve(shutdown.clone())
    };
    let drain = Some(config.drain_timeout);
    accept_loop(listener, &shutdown, &limits, drain, refused, serve).await;
}
