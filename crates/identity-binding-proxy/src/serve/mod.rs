//! Builds the proxy from its configuration and runs it: the TLS listener, the admin server, and
//! the background tasks (JWKS refresh, bindings and certificate reload). `serve` and `dev` both
//! come through [`start`], so dev runs exactly the production code path.

pub(crate) mod admin;
pub(crate) mod handshake;
pub mod limits;
pub mod logline;
pub mod logpipe;
pub(crate) mod refusals;
pub(crate) mod sidecar;
pub mod signal;
pub(crate) mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::authn::Authenticator;
use crate::authz::Authorizer;
use crate::cluster::Cluster;
use crate::config::{ProxyConfig, ServerConfig};
use crate::exchange::bindings::Bindings;
use crate::exchange::cache::TokenCache;
use crate::exchange::entra::{EntraClient, Exchanger};
use crate::exchange::issuer::Issuer;
use crate::http::conn::{accept_loop, serve_connection, ConnTimeouts};
use crate::metrics::Metrics;
use crate::request::{App, ConnInfo, Profile};
use crate::serve::admin::Readiness;
use crate::serve::limits::{CallerBudgets, ConnectionPermit, Limits};
use crate::serve::tls::SniRouter;
use crate::startup::StartError;

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
        let how = crate::serve::signal::shutdown_requested().await;
        self.stop_after(how).await;
    }

    /// The graceful stop: `/readyz` turns not-ready at once; on SIGTERM the proxy keeps
    /// serving for the shutdown delay (so endpoints and load balancers stop sending new
    /// callers; SIGINT, a person at a terminal, skips it); then it stops accepting and drains
    /// in-flight requests within the drain deadline.
    pub async fn stop_after(self, how: crate::serve::signal::Stop) {
        let delay = match how {
            crate::serve::signal::Stop::Terminate => self.shutdown_delay,
            crate::serve::signal::Stop::Interrupt => Duration::ZERO,
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
    /// drain deadline) and every background task has stopped, with the refusals still
    /// pending summarized (tasks past the deadline may hold the table on: its drop is too
    /// late for the log's last flush).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.done.await;
        self.app.refusals.summarize();
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
            request: Some(self.request_timeout),
        }
    }
}

impl Listeners {
    /// Binds `--listen` and `--admin-listen`; the error names the address and the flag.
    pub async fn bind(config: &ProxyConfig) -> Result<Self, StartError> {
        let bind = |addr, flag: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| cannot_listen(addr, flag, e))
        };
        Ok(Self {
            proxy: bind(config.server.listen, "--listen").await?,
            admin: bind(config.admin.listen, "--admin-listen").await?,
        })
    }
}

/// Connections the kernel queues for `accept` on each listener (Linux clamps it to
/// `net.core.somaxconn`, 4096 by default). tokio binds with 128: pods connecting faster than
/// the accept loop refuses them overflow it, and a new pod's SYN is then dropped and sent
/// again only a second later. As deep as the connection cap, a burst of every pod of the node
/// waits in the queue instead.
const LISTEN_BACKLOG: i32 = 4096;

/// Deepens `listener`'s accept backlog to [`LISTEN_BACKLOG`] (`listen` again on a listening
/// socket only changes its backlog), whoever bound it.
fn deepen_backlog(listener: &TcpListener) -> Result<(), StartError> {
    socket2::SockRef::from(listener)
        .listen(LISTEN_BACKLOG)
        .map_err(|e| StartError::internal("cannot set the listen backlog").because(e))
}

/// Why `addr` cannot be listened on: a port another process holds is unavailable (it may be
/// free at the next start); an address this host does not have, or a port it may not bind,
/// is the flag's to fix.
pub fn cannot_listen(addr: SocketAddr, flag: &str, e: std::io::Error) -> StartError {
    let message = format!("cannot listen on {addr} ({flag})");
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            StartError::unavailable(format!("{message}: another process holds the port")).because(e)
        }
        _ => StartError::usage(message).because(e),
    }
}

/// Loads everything, binds both listeners, and starts serving. Returns once listening;
/// readiness follows when the first JWKS arrives.
pub async fn start(config: ProxyConfig) -> Result<RunningProxy, StartError> {
    let listeners = Listeners::bind(&config).await?;
    start_on(config, listeners).await
}

/// [`start`] on listeners bound already (so `dev` can refuse a busy port before it writes
/// anything, and never give the port up in between).
pub async fn start_on(
    config: ProxyConfig,
    listeners: Listeners,
) -> Result<RunningProxy, StartError> {
    crate::crypto::install_provider();
    deepen_backlog(&listeners.proxy)?;
    deepen_backlog(&listeners.admin)?;
    let metrics = Arc::new(Metrics::new());
    if let Some(sidecar) = &config.sidecar {
        crate::serve::sidecar::make_certificates(sidecar, &config.tls)?;
    }
    let router = Arc::new(SniRouter::load(config.tls.clone(), metrics.clone())?);
    let app = build_app(&config, &metrics).await?;
    let readiness = Arc::new(Readiness::new(app.authn.clone()));
    let local = |l: &TcpListener| {
        l.local_addr()
            .map_err(|e| StartError::internal("a bound listener has no address").because(e))
    };
    let (addr, admin_addr) = (local(&listeners.proxy)?, local(&listeners.admin)?);
    let (stop, background) = (CancellationToken::new(), CancellationToken::new());
    spawn_background(&app, &router, &config, &background);
    let admin = tokio::spawn(crate::serve::admin::serve(
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
async fn build_app(config: &ProxyConfig, metrics: &Arc<Metrics>) -> Result<Arc<App>, StartError> {
    let mut issuer = Issuer::from_files(&config.issuer.keys, config.issuer.url.clone())?;
    if !config.key_activation.delay.is_zero() {
        issuer = issuer.with_activation();
    }
    let issuer = Arc::new(issuer);
    let bindings = Arc::new(Bindings::open(&config.bindings)?);
    let cluster = Cluster::connect(config.kubeconfig.as_deref(), config.watch_timeout).await?;
    let (cluster, own_account) =
        crate::serve::sidecar::as_configured(cluster, config.sidecar.as_ref()).await?;
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
        EntraClient::new(
            crate::http::client::client(),
            config.entra.timeout,
            metrics.clone(),
        )
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
        memo: Arc::new(crate::request::memo::Memo::new(MEMO_CAPACITY)),
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
        refusals: crate::serve::refusals::Refusals::start(
            Some(metrics.log.refusals.clone()),
            crate::serve::refusals::SUMMARY_INTERVAL,
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
        tokio::spawn(crate::exchange::activation::run(
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
        let activity = self.permit.activity();
        let tls = tokio::select! {
            accepted = self.router.accept(self.tcp) => match accepted {
                Ok(tls) => tls,
                Err(e) => return self.app.refusals.handshake(self.peer, &e),
            },
            // Made room for a peer under its fair share before it sent anything.
            _ = activity.evicted() => return,
        };
        let session = tls.get_ref().1;
        let conn_info = Arc::new(ConnInfo {
            peer: self.peer,
            sni: self.router.served_name(session.server_name()),
            alpn: crate::request::alpn_label(session.alpn_protocol()),
            permit: self.permit,
            last_token: Default::default(),
        });
        let app = self.app;
        let handler = move |req| {
            let (app, conn_info) = (app.clone(), conn_info.clone());
            async move { app.handle(req, &conn_info).await }
        };
        let conn = (activity, self.timeouts);
        serve_connection(&self.builder, tls, conn, &shutdown, handler).await;
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
    // hyper's HTTP/1 header timer runs from the moment a keep-alive connection goes idle until
    // the next head is complete: it is the HTTP/1.1 idle timeout, so it gets the idle timeout
    // (not the header timeout, which would close every idle keep-alive connection after 10 s).
    // The first head's deadline is the connection's own (`ConnTimeouts::first_request`).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.idle_timeout)
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
    let evictions = app.metrics.connection_evictions.clone();
    let limits = Limits::counted(config.limits.clone(), evictions, "token");
    let builder = Arc::new(token_port_builder(config));
    let timeouts = config.timeouts();
    let metrics = app.metrics.clone();
    let refused = |peer, refusal: crate::serve::limits::Refusal| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{Request, StatusCode};
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The token port's settings, every default as `serve` has it.
    fn defaults() -> ServerConfig {
        let flags = [
            "--tls=n=c.pem,k.pem",
            "--issuer-key=k.pem",
            "--issuer-url=https://issuer.example/{tenant}/{client_id}",
            "--bindings=b.yaml",
        ];
        ProxyConfig::from_flags(flags).unwrap().server
    }

    /// One in-memory connection served with the token port's settings and deadlines; every
    /// request is answered 200 after `work`.
    fn serve(config: &ServerConfig, work: Duration) -> TokioIo<tokio::io::DuplexStream> {
        serve_counted(config, work).0
    }

    /// The same, with the count of requests that reached the handler.
    fn serve_counted(
        config: &ServerConfig,
        work: Duration,
    ) -> (TokioIo<tokio::io::DuplexStream>, Arc<AtomicUsize>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let builder = token_port_builder(config);
        let timeouts = config.timeouts();
        let permit = ConnectionPermit::detached(std::net::IpAddr::from([127, 0, 0, 1]));
        let handled = Arc::new(AtomicUsize::new(0));
        let counted = handled.clone();
        tokio::spawn(async move {
            let handler = move |_req| {
                counted.fetch_add(1, Ordering::AcqRel);
                async move {
                    tokio::time::sleep(work).await;
                    crate::http::response::text(StatusCode::OK, "ok")
                }
            };
            let conn = (permit.activity(), timeouts);
            serve_connection(&builder, server, conn, &CancellationToken::new(), handler).await;
        });
        (TokioIo::new(client), handled)
    }

    fn get() -> Request<Empty<Bytes>> {
        Request::get("https://proxy/").body(Empty::new()).unwrap()
    }

    /// When a client reuses an idle connection: at once, well within the idle timeout, and
    /// just before it passes (the moment a client polling at the idle timeout's period sends).
    fn reuse_after(idle: Duration) -> [Duration; 3] {
        let ms = Duration::from_millis;
        [ms(0), idle / 2, idle - ms(1)]
    }

    #[test]
    fn the_idle_timeout_outlasts_the_clients_pools_and_a_minutes_poll() {
        let idle = defaults().idle_timeout;
        // Go's transport and azcore, reqwest: 90 s; .NET: 60 s (120 s before .NET 6).
        assert!(idle > Duration::from_secs(120), "{idle:?}");
        assert_ne!(
            idle.as_secs() % 60,
            0,
            "{idle:?} is a whole number of minutes"
        );
    }

    /// HTTP/1.1, then h2.
    #[tokio::test(start_paused = true)]
    async fn a_connection_is_reused_up_to_the_idle_timeout_and_a_request_crossing_it_is_answered() {
        let config = defaults();
        let idle = config.idle_timeout;
        for h2 in [false, true] {
            // Each request takes 5 s: the last one is still in flight when the idle timeout of
            // the request before it passes.
            let io = serve(&config, Duration::from_secs(5));
            let (mut sender, conn) = Sender::handshake(io, h2).await;
            for wait in reuse_after(idle) {
                tokio::time::sleep(wait).await;
                let status = sender.get().await.expect("answered on the same connection");
                assert_eq!(status, StatusCode::OK, "h2 {h2}, after {wait:?} idle");
            }
            tokio::time::sleep(idle - Duration::from_secs(1)).await;
            assert!(
                !conn.is_finished(),
                "h2 {h2}: closed before the idle timeout"
            );
            // Closed gracefully (h2: a GOAWAY): the client's connection ends without an error.
            let closed = tokio::time::timeout(Duration::from_secs(2), conn).await;
            let ended = closed.expect("still open after the idle timeout").unwrap();
            assert!(ended.is_ok(), "h2 {h2}: {ended:?}");
        }
    }

    /// A request sent just as the idle timeout passes, HTTP/1.1 then h2: answered, or refused
    /// before it reached the handler (the client may send it again: hyper's "canceled", an h2
    /// stream above the GOAWAY's last stream id, which Go's transport retries); never cut off
    /// once the proxy took it. One sent 1 ms before is answered. (Tokio's timer counts whole
    /// milliseconds: finer offsets would all land on the same tick.)
    #[tokio::test(start_paused = true)]
    async fn a_request_sent_as_the_idle_timeout_passes_is_answered_or_never_taken() {
        let config = defaults();
        let idle = config.idle_timeout;
        let ms = Duration::from_millis(1);
        for (wait, before) in [(idle - ms, true), (idle, false), (idle + ms, false)] {
            for h2 in [false, true] {
                let (io, handled) = serve_counted(&config, Duration::from_millis(10));
                let (mut sender, _conn) = Sender::handshake(io, h2).await;
                assert_eq!(sender.get().await.unwrap(), StatusCode::OK);
                tokio::time::sleep(wait).await;
                let outcome = sender.get().await;
                let taken = handled.load(Ordering::Acquire) == 2;
                match outcome {
                    Ok(status) => assert!(taken && status == StatusCode::OK, "{status}"),
                    Err(e) => {
                        assert!(!before, "h2 {h2}, sent 1 ms before the idle timeout: {e:?}");
                        assert!(!taken, "h2 {h2}, {wait:?} idle: taken, then {e:?}");
                        assert!(unsent(&e), "h2 {h2}, {wait:?} idle: {e:?}");
                    }
                }
            }
        }
    }

    /// A connection evicted while its request is still being authenticated: the request is
    /// authenticated just after, then waits 30 s on Entra (far past the close grace) and is
    /// still answered, within the request deadline; then the connection closes.
    #[tokio::test(start_paused = true)]
    async fn an_evicted_connection_finishes_a_request_authenticated_after_it_was_chosen() {
        let config = defaults();
        let limits = Limits::new(crate::serve::limits::LimitsConfig {
            max_connections: 2,
            max_connections_per_peer: 2,
            ..crate::serve::limits::LimitsConfig::unbounded()
        });
        let peer = |last| std::net::IpAddr::from([10, 0, 0, last]);
        // A's other connection serves an authenticated caller: never the one chosen.
        let other = limits.connect(peer(1)).unwrap();
        let busy = other.activity().begin();
        busy.authenticated();
        let permit = limits.connect(peer(1)).unwrap();
        let (client, server) = tokio::io::duplex(64 * 1024);
        let authenticate = Arc::new(tokio::sync::Notify::new());
        let (handled, go) = (Arc::new(AtomicUsize::new(0)), authenticate.clone());
        let (count, activity) = (handled.clone(), permit.activity());
        let handler = move |req: Request<_>| {
            count.fetch_add(1, Ordering::AcqRel);
            let go = go.clone();
            async move {
                go.notified().await;
                let request = req
                    .extensions()
                    .get::<crate::serve::limits::ActivityGuard>();
                request.expect("the request's mark").authenticated();
                tokio::time::sleep(Duration::from_secs(30)).await;
                crate::http::response::text(StatusCode::OK, "ok")
            }
        };
        let builder = token_port_builder(&config);
        tokio::spawn(async move {
            let _permit = permit;
            let conn = (activity, config.timeouts());
            serve_connection(&builder, server, conn, &CancellationToken::new(), handler).await;
        });
        let (mut sender, _conn) = Sender::handshake(TokioIo::new(client), false).await;
        let answer = tokio::spawn(async move { sender.get().await });
        while handled.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // At the cap, B gets in by evicting the connection whose request is not yet
        // authenticated.
        let _b = limits.connect(peer(2)).unwrap();
        authenticate.notify_one();
        let answered = tokio::time::timeout(Duration::from_secs(40), answer).await;
        let status = answered
            .expect("answered within the request deadline")
            .unwrap();
        assert_eq!(status.unwrap(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            limits.connections(),
            2,
            "the evicted one closes once answered"
        );
    }

    /// Whether `e` tells the client its request was not processed, so it may send it again:
    /// never written (the connection was already closed), or an h2 stream the server's
    /// graceful GOAWAY (NO_ERROR) refused.
    fn unsent(e: &hyper::Error) -> bool {
        let go_away = format!("{e:?}");
        e.is_canceled() || e.is_closed() || go_away.contains("GoAway(b\"\", NO_ERROR, Remote)")
    }

    /// An HTTP/1.1 or h2 client connection.
    enum Sender {
        H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
        H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
    }

    impl Sender {
        /// The client side of a connection, and its driver's task.
        async fn handshake(
            io: TokioIo<tokio::io::DuplexStream>,
            h2: bool,
        ) -> (Self, tokio::task::JoinHandle<Result<(), hyper::Error>>) {
            if h2 {
                let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .unwrap();
                (Self::H2(sender), tokio::spawn(conn))
            } else {
                let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                (Self::H1(sender), tokio::spawn(conn))
            }
        }

        /// A GET and its whole answer, or what failed.
        async fn get(&mut self) -> Result<StatusCode, hyper::Error> {
            let resp = match self {
                Self::H1(s) => {
                    s.ready().await?;
                    s.send_request(get()).await?
                }
                Self::H2(s) => {
                    s.ready().await?;
                    s.send_request(get()).await?
                }
            };
            let status = resp.status();
            resp.into_body().collect().await?;
            Ok(status)
        }
    }
}
