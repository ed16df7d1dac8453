//! Serving connections: the one accept loop of the token port, the admin server and the
//! emulators, each connection within its limits and deadlines.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::serve::limits::{Activity, ConnectionPermit, Limits, Refusal};

/// The deadlines of one connection (SPEC §11): a peer that connects and then sends nothing,
/// or keeps a connection open without using it, gives its place back.
#[derive(Clone, Copy, Debug)]
pub struct ConnTimeouts {
    /// A complete first request head must arrive within this after the connection is set up
    /// (the TLS handshake done): covers hyper's protocol detection, which waits for the first
    /// bytes without a deadline of its own.
    pub first_request: Option<Duration>,
    /// A connection with no request in flight for this long is closed (gracefully: h2 gets a
    /// GOAWAY).
    pub idle: Option<Duration>,
    /// At shutdown, how long requests in flight may take to finish (else a short grace).
    pub drain: Option<Duration>,
    /// How long one request may take (the handler's own deadline): a request in flight on an
    /// evicted connection gets this, plus a short grace, to finish.
    pub request: Option<Duration>,
}

impl ConnTimeouts {
    pub const NONE: Self = Self {
        first_request: None,
        idle: None,
        drain: None,
        request: None,
    };
}

/// Why a connection's deadline closed it.
enum Expiry {
    NoRequest,
    Idle,
}

/// Completes when the connection has passed one of its deadlines. A busy connection is looked
/// at again every idle period, so an idle one closes on time without any wake-up per request.
async fn expired(activity: &Activity, timeouts: ConnTimeouts) -> Expiry {
    loop {
        let now = tokio::time::Instant::now();
        let next = match (activity.started(), timeouts.first_request, timeouts.idle) {
            (false, Some(first), _) => {
                let deadline = activity.opened() + first;
                if now >= deadline {
                    return Expiry::NoRequest;
                }
                deadline
            }
            _ if activity.in_flight() > 0 => now + timeouts.idle.unwrap_or(IDLE_RECHECK),
            (_, _, Some(idle)) => {
                let deadline = activity.idle_since() + idle;
                if now >= deadline {
                    return Expiry::Idle;
                }
                deadline
            }
            (_, _, None) => now + IDLE_RECHECK,
        };
        tokio::time::sleep_until(next).await;
    }
}

/// How often a connection without deadlines, or a busy one, looks at its state again.
const IDLE_RECHECK: Duration = Duration::from_secs(3600);
/// How long a connection closed by a deadline (or by shutdown, without a drain deadline) may
/// take to finish cleanly.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves one accepted connection (plain or TLS) with `builder` until the peer closes it, a
/// deadline of `timeouts` passes, or `shutdown` fires (then in-flight requests finish within a
/// grace period), or the connection is evicted to make room for another peer (`activity`, from
/// its permit). The one connection driver of the proxy, its admin server and the emulators.
pub async fn serve_connection<I, F, Fut, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    (activity, timeouts): (Arc<Activity>, ConnTimeouts),
    shutdown: &CancellationToken,
    handler: F,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let guard = activity.begin();
            req.extensions_mut().insert(guard.clone());
            let response = handler(req);
            async move {
                let response = response.await;
                drop(guard);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let grace = tokio::select! {
        _ = conn.as_mut() => return,
        expiry = expired(&activity, timeouts) => match expiry {
            // Nothing was asked: nothing to finish.
            Expiry::NoRequest => return,
            Expiry::Idle => CLOSE_GRACE,
        },
        // Requests in flight finish within their own deadline: none was an authenticated
        // caller's when the connection was chosen, but one may have been authenticated since.
        _ = activity.evicted() => match (activity.started(), activity.in_flight()) {
            (false, _) => return,
            (true, 0) => CLOSE_GRACE,
            (true, _) => timeouts.request.map_or(CLOSE_GRACE, |r| r + CLOSE_GRACE),
        },
        // Requests in flight finish within the drain deadline, as promised at shutdown.
        _ = shutdown.cancelled() => timeouts.drain.unwrap_or(CLOSE_GRACE),
    };
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(grace, conn).await;
}

/// Accepts connections on `listener` until `shutdown` fires, and hands each one within
/// `limits` to `serve` with its permit; a connection over a limit is closed at once and
/// reported to `refused` (which counts and logs it: see `refusals`). Then waits for the connections to finish, at most `drain` when given.
/// The one accept loop of the token port, the admin server and the emulators.
pub async fn accept_loop<S, Fut>(
    listener: TcpListener,
    shutdown: &CancellationToken,
    limits: &Arc<Limits>,
    drain: Option<Duration>,
    mut refused: impl FnMut(SocketAddr, Refusal),
    mut serve: S,
) where
    S: FnMut(TcpStream, SocketAddr, ConnectionPermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors, typically: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over a limit: a clean close at once, rather than a queue that hides overload from
        // the client and from the metrics.
        match limits.connect(peer.ip()) {
            Ok(permit) => {
                let _ = stream.set_nodelay(true);
                tracker.spawn(serve(stream, peer, permit));
            }
            Err(refusal) => refused(peer, refusal),
        }
    }
    drop(listener);
    tracker.close();
    match drain {
        Some(deadline) => {
            if tokio::time::timeout(deadline, tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!("drain deadline passed with requests still in flight");
            }
        }
        None => tracker.wait().await,
    }
}

/// Serves plain HTTP/1.1 (and h2c by prior knowledge) on `listener` until `shutdown` fires,
/// within `limits` and `timeouts`: the admin server and the emulators.
pub async fn serve_plain<F, Fut, B>(
    listener: TcpListener,
    shutdown: CancellationToken,
    limits: Arc<Limits>,
    timeouts: ConnTimeouts,
    handler: F,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's HTTP/1 header timer also times the wait for the next head on a keep-alive
    // connection: it is the idle timeout (the first head has the connection's own deadline).
    // No deadline means none at all (hyper's own default would be 30 s).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.idle.or(timeouts.first_request));
    let builder = Arc::new(builder);
    let serve = |stream, peer, permit| {
        let (handler, shutdown, builder) = (handler.clone(), shutdown.clone(), builder.clone());
        async move {
            let permit: ConnectionPermit = permit;
            let handler = move |req| handler(req, peer);
            let conn = (permit.activity(), timeouts);
            serve_connection(&builder, stream, conn, &shutdown, handler).await;
        }
    };
    let refusals =
        crate::serve::refusals::Refusals::start(None, crate::serve::refusals::SUMMARY_INTERVAL);
    let refused = |peer, refusal| refusals.connection(peer, refusal);
    accept_loop(listener, &shutdown, &limits, None, refused, serve).await;
    // Connections past the drain may hold the table on: what is pending is written now.
    refusals.summarize();
}
