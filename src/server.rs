//! Builds the proxy from its configuration and runs it: the TLS listener, the admin server, and
//! the background tasks (JWKS refresh, bindings and certificate reload). `serve` and `dev` both
//! come through [`start`], so dev runs exactly the production code path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::Readiness;
use crate::authn::Authenticator;
use crate::authz::Authorizer;
use crate::bindings::Bindings;
use crate::cache::TokenCache;
use crate::cluster::Cluster;
use crate::config::{ProxyConfig, ServerConfig};
use crate::entra::{EntraClient, Exchanger};
use crate::http::{accept_loop, serve_connection, ConnTimeouts};
use crate::issuer::Issuer;
use crate::limits::{CallerBudgets, ConnectionPermit, Limits};
use crate::metrics::Metrics;
use crate::proxy::{App, ConnInfo, Profile};
use crate::tls::SniRouter;

/// How often the cluster JWKS is refreshed (rotation on the apiserver shows up within this).
const JWKS_REFRESH: Duration = Duration::from_secs(300);
/// Tokens the per-token memo holds (as many as the verification and TokenReview caches).
const MEMO_CAPACITY: u64 = 100_000;

/// A started proxy. It owns its stop: [`RunningProxy::stop`] at once, or
/// [`RunningProxy::stop_after`] a signal with the shutdown delay it calls for.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub readiness: Arc<Readiness>,
    pub app: Arc<App>,
    stop: CancellationToken,
    shutdown_delay: Duration,
    done: tokio::task::JoinHandle<()>,
}

impl RunningProxy {
    /// Serves until SIGTERM or SIGINT, then stops as [`RunningProxy::stop_after`] says.
    pub async fn serve_until_signal(self) {
        let how = crate::signal::shutdown_requested().await;
        self.stop_after(how).await;
    }

    /// The graceful stop: `/readyz` turns not-ready at once; on SIGTERM the proxy keeps
    /// serving for the shutdown delay (so endpoints and load balancers stop sending new
    /// callers; SIGINT, a person at a terminal, skips it); then it stops accepting and drains
    /// in-flight requests within the drain deadline.
    pub async fn stop_after(self, how: crate::signal::Stop) {
        let delay = match how {
            crate::signal::Stop::Terminate => self.shutdown_delay,
            crate::signal::Stop::Interrupt => Duration::ZERO,
        };
        self.readiness.set_draining();
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "not ready; serving on until the shutdown delay passes"
        );
        tokio::time::sleep(delay).await;
        tracing::info!("draining in-flight requests");
        self.stop().await;
        tracing::info!("stopped");
    }

    /// Stops accepting now, and returns once in-flight requests have drained (within the
    /// drain deadline) and every background task has stopped.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }
}

/// The proxy's two listening sockets, bound before anything else starts.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl ServerConfig {
    /// The token port's connection deadlines (the admin server keeps the same).
    pub fn timeouts(&self) -> ConnTimeouts {
        ConnTimeouts {
            first_request: Some(self.header_read_timeout),
            idle: Some(self.idle_timeout),
            drain: Some(self.drain_timeout),
        }
    }
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
            proxy: bind(config.server.listen, "--listen").await?,
            admin: bind(config.admin.listen, "--admin-listen").await?,
        })
    }
}

/// Loads everything, binds both listeners, and starts serving. Returns once listening;
/// readiness follows when the first JWKS arrives.
pub async fn start(config: ProxyConfig) -> anyhow::Result<RunningProxy> {
    let listeners = Listeners::bind(&config).await?;
    start_on(config, listeners).await
}

/// [`start`] on listeners bound already (so `dev` can refuse a busy port before it writes
/// anything, and never give the port up in between).
pub async fn start_on(config: ProxyConfig, listeners: Listeners) -> anyhow::Result<RunningProxy> {
    crate::http::install_crypto_provider();
    let metrics = Arc::new(Metrics::new());
    if let Some(sidecar) = &config.sidecar {
        crate::sidecar::make_certificates(sidecar, &config.tls)?;
    }
    let router =
        SniRouter::load(config.tls.clone(), metrics.clone()).map_err(anyhow::Error::msg)?;
    let router = Arc::new(router);
    let app = build_app(&config, &metrics).await?;
    let readiness = Arc::new(Readiness::new(app.authn.clone()));
    let (addr, admin_addr) = (listeners.proxy.local_addr()?, listeners.admin.local_addr()?);
    let (stop, background) = (CancellationToken::new(), CancellationToken::new());
    spawn_background(&app, &router, &config, &background);
    let admin = tokio::spawn(crate::admin::serve(
        listeners.admin,
        (config.admin.clone(), config.server.timeouts()),
        readiness.clone(),
        metrics,
        background.clone(),
    ));
    let done = tokio::spawn({
        let (app, readiness, stop) = (app.clone(), readiness.clone(), stop.clone());
        async move {
            serve_tls(listeners.proxy, router, app, &config.server, stop).await;
            readiness.set_draining();
            background.cancel();
            let _ = admin.await;
        }
    });
    tracing::info!(%addr, %admin_addr, "identity-binding-proxy listening");
    Ok(RunningProxy {
        addr,
        admin_addr,
        readiness,
        app,
        stop,
        shutdown_delay: config.shutdown_delay,
        done,
    })
}

/// Every step of the request path, built from the configuration.
async fn build_app(config: &ProxyConfig, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<App>> {
    let mut issuer = Issuer::from_files(&config.issuer.keys, config.issuer.url.clone())
        .map_err(anyhow::Error::msg)?;
    if !config.key_activation.delay.is_zero() {
        issuer = issuer.with_activation();
    }
    let issuer = Arc::new(issuer);
    let bindings = Arc::new(Bindings::open(&config.bindings).map_err(anyhow::Error::msg)?);
    let cluster = Cluster::connect(config.kubeconfig.as_deref()).await?;
    let (cluster, own_account) = crate::sidecar::as_configured(cluster, config).await?;
    let authn = Arc::new(Authenticator::new(
        cluster.clone(),
        config.authn.clone(),
        metrics.clone(),
    ));
    authn.load_persisted();
    let budgets = Arc::new(CallerBudgets::new(
        config.budgets.misses_per_minute,
        config.budgets.claims_per_minute,
    ));
    let authz = Arc::new(Authorizer::new(
        cluster,
        config.authz.clone(),
        budgets.clone(),
        metrics.clone(),
    ));
    let entra = Arc::new(
        EntraClient::new(crate::http::client(), config.entra.timeout, metrics.clone())
            .with_fic_propagation(config.fic_propagation.clone()),
    );
    let exchanger = Arc::new(Exchanger {
        bindings: bindings.clone(),
        issuer: issuer.clone(),
        entra,
    });
    let cache = Arc::new(TokenCache::new(
        config.cache.clone(),
        budgets,
        exchanger,
        metrics.clone(),
    ));
    Ok(Arc::new(App {
        authn,
        authz,
        bindings,
        cache,
        memo: Arc::new(crate::memo::Memo::new(MEMO_CAPACITY)),
        issuer,
        metrics: metrics.clone(),
        profiles: config
            .entra
            .sni_profiles
            .iter()
            .map(|p| (p.name.clone(), Profile::new(&p.authority, p.tenant.clone())))
            .collect(),
        default_profile: Profile::new(&config.entra.authority_host, None),
        max_body_bytes: config.server.max_body_bytes,
        body_timeout: config.server.body_timeout,
        request_timeout: config.server.request_timeout,
        own_account,
        refusals: crate::refusals::Refusals::start(
            Some(metrics.clone()),
            crate::refusals::SUMMARY_INTERVAL,
        ),
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
    // A sidecar's pod may not list RBAC: its allow TTL bounds a revoked grant instead.
    if app.own_account.is_none() {
        tokio::spawn(app.authz.clone().watch_rbac(stop.clone()));
    }
    tokio::spawn(
        app.cache
            .clone()
            .run_refresh(config.refresh_tick, stop.clone()),
    );
    tokio::spawn(app.issuer.clone().watch(config.reload_period, stop.clone()));
    if !config.key_activation.delay.is_zero() {
        tokio::spawn(crate::activation::run(
            app.issuer.clone(),
            app.bindings.clone(),
            app.metrics.clone(),
            config.key_activation.clone(),
            stop.clone(),
        ));
    }
    tokio::spawn(
        app.bindings
            .clone()
            .watch(config.reload_period, stop.clone()),
    );
    tokio::spawn(router.clone().watch(config.reload_period, stop.clone()));
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
            Err(e) => return self.app.refusals.handshake(self.peer, &e),
        };
        let session = tls.get_ref().1;
        let conn_info = Arc::new(ConnInfo {
            peer: self.peer,
            sni: self.router.served_name(session.server_name()),
            alpn: crate::proxy::alpn_label(session.alpn_protocol()),
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
fn token_port_builder(config: &ServerConfig) -> auto::Builder<TokioExecutor> {
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
    config: &ServerConfig,
    shutdown: CancellationToken,
) {
    let limits = Limits::new(config.limits.clone());
    let builder = Arc::new(token_port_builder(config));
    let timeouts = config.timeouts();
    let metrics = app.metrics.clone();
    let refused = |peer, refusal: crate::limits::Refusal| {
        metrics
            .tls_handshake_failures
            .with_label_values(&[refusal.label()])
            .inc();
        app.refusals.connection(peer, refusal);
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
