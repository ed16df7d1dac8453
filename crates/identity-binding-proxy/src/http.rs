//! Small HTTP plumbing shared by the proxy, its admin server and the emulators: response
//! builders, a plain-HTTP accept loop, and the outbound client.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::error::ProxyError;
use crate::limits::{Activity, ConnectionPermit, Limits, Refusal, RequestPermit};

pub type Body = Full<Bytes>;

/// A JSON response with the given status.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A JSON response serialized from a value.
pub fn json_value<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    json(status, serde_json::to_vec(value).unwrap_or_default())
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Reads a whole request body, refusing more than `limit` bytes (the emulators' reader).
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(limit)),
        Err(e) => Err(BodyError::Read(e.to_string())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request body could not be read: {0}")]
    Read(String),
}

/// The body's bytes, at most `limit` of them, each charged to `permit` as it arrives.
async fn read_limited<B>(
    body: B,
    limit: usize,
    permit: &mut RequestPermit,
) -> Result<Bytes, ProxyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e: Box<dyn std::error::Error + Send + Sync> = e.into();
            ProxyError::invalid_request(format!("The request body could not be read: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing we read
        };
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(ProxyError::invalid_request(format!(
                "The request body is larger than {limit} bytes. A token request is a small \
                 form: its largest part is the service-account token."
            )));
        }
        permit.buffer(data.len())?;
        chunks.push(data);
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => Bytes::from(chunks.concat()),
    })
}

/// Reads a token request's body: at most `limit` bytes, each one accounted in `permit` (the
/// process's and the peer's budget of buffered bytes) as it arrives, all within `deadline`.
pub async fn read_request_body<B>(
    body: B,
    limit: usize,
    deadline: Duration,
    permit: &mut RequestPermit,
) -> Result<Bytes, ProxyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let read = read_limited(body, limit, permit);
    match tokio::time::timeout(deadline, read).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::RequestTimeout(format!(
            "The request body did not arrive within {} s. Send the whole form at once.",
            deadline.as_secs()
        ))),
    }
}

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
    let refusals = crate::refusals::Refusals::start(None, crate::refusals::SUMMARY_INTERVAL);
    let refused = |peer, refusal| refusals.connection(peer, refusal);
    accept_loop(listener, &shutdown, &limits, None, refused, serve).await;
    // Connections past the drain may hold the table on: what is pending is written now.
    refusals.summarize();
}

/// The outbound HTTP client: https through rustls (aws-lc-rs, webpki roots) and plain http
/// (callers decide whether plain http is allowed for a given URL).
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https)
}

/// True for URLs whose host is a loopback address or `localhost`: the only places where
/// plain http is allowed (emulators and tests).
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// A fetched response: status, headers and the whole body.
pub struct Fetched {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// Sends `req` and reads the whole response body (up to `limit` bytes) within `timeout`.
pub async fn fetch(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    limit: usize,
) -> Result<Fetched, String> {
    let work = async {
        let resp = client.request(req).await.map_err(|e| {
            // hyper-util's error hides the cause one level down; show it.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            msg
        })?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| format!("reading the response body: {e}"))?
            .to_bytes();
        Ok(Fetched {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// GET `url` and parse the body as JSON, requiring a 2xx status.
pub async fn get_json(
    client: &HttpClient,
    url: &str,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let req = Request::get(url)
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let fetched = fetch(client, req, timeout, 1 << 20).await?;
    if !fetched.status.is_success() {
        return Err(format!("{url} answered {}", fetched.status));
    }
    serde_json::from_slice(&fetched.body).map_err(|e| format!("{url} did not answer JSON: {e}"))
}

/// Encodes `pairs` as `application/x-www-form-urlencoded`.
pub fn form_encode<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        ser.append_pair(k, v);
    }
    ser.finish()
}

/// Installs aws-lc-rs as the process-wide rustls provider. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        for (u, want) in [
            ("http://127.0.0.1:8080/x", true),
            ("http://localhost/x", true),
            ("http://[::1]:1/", true),
            ("https://login.microsoftonline.com/", false),
            ("http://10.0.0.1/", false),
        ] {
            assert_eq!(is_loopback(&url::Url::parse(u).unwrap()), want, "{u}");
        }
    }
}
