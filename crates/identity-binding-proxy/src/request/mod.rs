//! The token request's journey, top to bottom: route → body → parse → authenticate →
//! authorize → resolve the binding → cache/exchange → respond. Each step lives in its own
//! module; this file only calls them in order and turns the outcome into a response, a metric
//! and one log line.

pub mod error;
pub mod memo;
pub mod oauth;
pub mod token;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Response, StatusCode};

use crate::authn::{token_digest, Authenticator, Caller};
use crate::authz::Authorizer;
use crate::exchange::bindings::Bindings;
use crate::exchange::cache::IssuedToken;
use crate::exchange::cache::{CacheKey, Entry, Lookup, Served, TokenCache};
use crate::exchange::issuer::Issuer;
use crate::http::body::read_request_body;
use crate::http::response::{json, Body};
use crate::metrics::Metrics;
use crate::request::error::{ProxyError, Result};
use crate::request::memo::{Ask, Generations, Grant, Known, Memo};
use crate::serve::limits::ConnectionPermit;
use token::{Lifetimes, Route};

/// Everything a request needs, built once and shared.
pub struct App {
    pub authn: Arc<Authenticator>,
    pub authz: Arc<Authorizer>,
    pub bindings: Arc<Bindings>,
    pub cache: Arc<TokenCache>,
    /// What each token's earlier requests established, found with one lookup.
    pub memo: Arc<Memo>,
    /// Our issuer keys; the server reloads them, tests read the signing key.
    pub issuer: Arc<Issuer>,
    pub metrics: Arc<Metrics>,
    /// Entra settings per SNI name, and for every other name.
    pub profiles: HashMap<String, Profile>,
    pub default_profile: Profile,
    pub max_body_bytes: usize,
    /// Deadline for a request's whole body, from its head.
    pub body_timeout: Duration,
    /// Deadline for a whole request, from its head to its response.
    pub request_timeout: Duration,
    /// Sidecar mode: the one service account served (None: the node's proxy serves all).
    pub own_account: Option<crate::serve::sidecar::OwnAccount>,
    /// Refusals before authentication, counted and summarized per peer.
    pub refusals: Arc<crate::serve::refusals::Refusals>,
}

/// The Entra settings a connection's SNI name selects.
#[derive(Clone, Debug)]
pub struct Profile {
    /// The authority host, as the cache key and the exchange use it.
    pub authority_key: Arc<str>,
    /// The tenant assumed when the path names none.
    pub tenant: Option<String>,
}

impl Profile {
    pub fn new(authority: &url::Url, tenant: Option<String>) -> Self {
        Self {
            authority_key: authority.as_str().trim_end_matches('/').into(),
            tenant,
        }
    }
}

/// What one request did, for its log line. Never holds a credential.
#[derive(Default)]
struct Trace {
    caller: Option<Arc<Caller>>,
    client_id: Option<String>,
    scope: Option<String>,
    cache: Option<Lookup>,
    /// Entra's HTTP status when this request went to Entra.
    upstream: Option<u16>,
    /// How long this request waited for Entra (its own call, or the one it joined).
    upstream_wait: Option<Duration>,
    /// Where the form came from: "body", "query" or "none" (unset before the body is read).
    form: Option<&'static str>,
}

/// Where a connection came from, the name it is served under, and its share of the limits.
pub struct ConnInfo {
    pub peer: std::net::SocketAddr,
    /// The SNI name the connection is served under: the client's, or the default name for a
    /// client that sent none (so it gets that name's profile, never a looser one).
    pub sni: Option<String>,
    /// The protocol the handshake agreed on (ALPN): "h2", "http/1.1", or none.
    pub alpn: Option<&'static str>,
    pub permit: ConnectionPermit,
    /// The token its peer presented last (hashed once per connection, not per request).
    pub last_token: memo::LastToken,
}

/// The ALPN protocol as a bounded label: only what the token port offers.
pub fn alpn_label(protocol: Option<&[u8]>) -> Option<&'static str> {
    match protocol? {
        b"h2" => Some("h2"),
        b"http/1.1" => Some("http/1.1"),
        _ => Some("other"),
    }
}

impl ConnInfo {
    /// A connection for an in-process caller (benchmarks, tests), outside any accept loop.
    pub fn detached(peer: std::net::SocketAddr, sni: Option<String>) -> Self {
        Self {
            peer,
            sni,
            alpn: None,
            permit: ConnectionPermit::detached(peer.ip()),
            last_token: memo::LastToken::default(),
        }
    }
}

impl App {
    fn profile(&self, sni: Option<&str>) -> &Profile {
        sni.and_then(|n| self.profiles.get(n))
            .unwrap_or(&self.default_profile)
    }

    /// Serves one request within the request timeout. Every outcome, the timeout included,
    /// leaves through [`App::finish`]. Generic over the body so benchmarks and tests can drive
    /// the handler in-process; the server passes hyper's `Incoming`.
    pub async fn handle<B>(&self, req: Request<B>, conn: &ConnInfo) -> Response<Body>
    where
        B: hyper::body::Body<Data = bytes::Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let correlation_id = correlation_id(&req);
        let sent = Sent::of(&req);
        let mut trace = Trace::default();
        let served = tokio::time::timeout(self.request_timeout, self.serve(req, conn, &mut trace));
        let result = served
            .await
            .unwrap_or_else(|_| Err(ProxyError::timed_out()));
        let request = Finished {
            sent,
            correlation_id,
            started,
        };
        self.finish(request, result, trace, conn)
    }

    /// Route → body → parse → authenticate → authorize → resolve binding → cache/exchange.
    async fn serve<B>(
        &self,
        req: Request<B>,
        conn: &ConnInfo,
        trace: &mut Trace,
    ) -> Result<Response<Body>>
    where
        B: hyper::body::Body<Data = bytes::Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut permit = conn.permit.request()?;
        let (parts, body) = req.into_parts();
        let path_tenant = match token::route(&parts.method, parts.uri.path()) {
            Route::Token { tenant } => tenant,
            other => return token::answer_other(other, &parts, conn.sni.as_deref()),
        };
        let body = read_request_body(body, self.max_body_bytes, self.body_timeout, &mut permit);
        let body = body.await?;
        trace.form = Some(token::form_source(parts.uri.query(), &body));
        let req = token::parse_request(path_tenant, &parts, &body)?;
        trace.client_id = Some(req.client_id.clone());
        trace.scope = Some(req.scope.clone());
        let known = self.authenticate(&req.assertion, conn).await?;
        // While this request is in flight, its connection is not evicted at the cap.
        if let Some(request) = parts
            .extensions
            .get::<crate::serve::limits::ActivityGuard>()
        {
            request.authenticated();
        }
        let caller = &known.caller;
        trace.caller = Some(caller.clone());
        crate::serve::sidecar::check(self.own_account.as_ref(), caller)?;
        // On EVERY request (from the memo while the decisions and bindings it came from are
        // unchanged), before the cache, and before anything that could tell an unauthorized
        // caller whether or where this identity is bound.
        let ask = ask_of(&req, conn);
        let allowed = self.authorize(&known, &ask, &req, conn).await?;
        self.token(allowed, &known, &ask, req.claims.as_deref(), trace)
            .await
    }

    /// The caller of `assertion`: remembered (by the connection that sent it last, else by
    /// its SHA-256) while nothing it depends on changed, else authenticated (and remembered).
    async fn authenticate(&self, assertion: &str, conn: &ConnInfo) -> Result<Arc<Known>> {
        let generation = self.authn.generation();
        if let Some(known) = conn.last_token.recall(assertion, generation) {
            return Ok(known);
        }
        let digest = token_digest(assertion);
        let known = match self.memo.recall(&digest, generation) {
            Some(known) => known,
            None => {
                let (caller, until) = self.authn.authenticate_digested(assertion, &digest).await?;
                self.memo.learn(digest, caller, generation, until)
            }
        };
        conn.last_token.keep(assertion, &known);
        Ok(known)
    }

    /// Whether the caller may have what it asks for, and where its token is cached: the
    /// memo's grant while the decisions and bindings it came from are unchanged, else the
    /// authorizer's decision and the binding's key.
    async fn authorize(
        &self,
        known: &Known,
        ask: &Ask<'_>,
        req: &token::TokenRequest,
        conn: &ConnInfo,
    ) -> Result<Allowed> {
        // Read before deciding: a change during the decision leaves it stale, never current.
        let generations = Generations {
            authz: self.authz.generation(),
            bindings: self.bindings.generation(),
        };
        if let Some(grant) = known.grant(ask, generations) {
            return Ok(Allowed::Held(grant));
        }
        self.authz.authorize(&known.caller, &req.client_id).await?;
        let key = self.cache_key(req, conn)?;
        Ok(Allowed::Decided { key, generations })
    }

    /// The identity's binding, in the tenant the request and its SNI name's profile ask for,
    /// as the cache key of the token asked for.
    fn cache_key(&self, req: &token::TokenRequest, conn: &ConnInfo) -> Result<CacheKey> {
        let profile = self.profile(conn.sni.as_deref());
        let tenants = [
            (profile.tenant.as_deref(), "this SNI name's profile"),
            (req.path_tenant.as_deref(), "the request"),
        ];
        let binding = self.bindings.resolve(&req.client_id, &tenants)?;
        Ok(CacheKey {
            authority: profile.authority_key.clone(),
            tenant: binding.tenant_id,
            client_id: binding.client_id,
            scopes: req.scope.clone(),
        })
    }

    /// The answer: the held entry's token while it is current, else the cached token, or
    /// the one Entra issues for it (joined with any exchange in flight).
    async fn token(
        &self,
        allowed: Allowed,
        known: &Known,
        ask: &Ask<'_>,
        claims: Option<&str>,
        trace: &mut Trace,
    ) -> Result<Response<Body>> {
        let (key, generations) = match allowed {
            Allowed::Held(grant) if claims.is_none() && self.cache.serve_held(&grant.entry) => {
                trace.cache = Some(Lookup::Hit);
                return Ok(entry_response(&grant.entry));
            }
            Allowed::Held(grant) => (grant.key.clone(), grant.generations),
            Allowed::Decided { key, generations } => (key, generations),
        };
        let asked = Instant::now();
        let served = self
            .cache
            .serve(key.clone(), claims, &known.caller.username)
            .await?;
        match served {
            Served::Hit(entry) => {
                trace.cache = Some(Lookup::Hit);
                let response = entry_response(&entry);
                known.learn_grant(ask, generations, key, entry);
                Ok(response)
            }
            Served::Fetched(issued, lookup) => {
                trace.cache = Some(lookup);
                trace.upstream = Some(200);
                trace.upstream_wait = Some(asked.elapsed());
                Ok(token_response(&issued))
            }
        }
    }

    /// The response of a finished request, its metric and its one log line.
    fn finish(
        &self,
        request: Finished,
        result: Result<Response<Body>>,
        mut trace: Trace,
        conn: &ConnInfo,
    ) -> Response<Body> {
        let (mut response, outcome) = match result {
            Ok(response) => (response, "success"),
            Err(e) => {
                if let ProxyError::Upstream { status, .. } = &e {
                    trace.upstream = Some(status.as_u16());
                }
                if e.status().is_server_error() {
                    tracing::warn!(error = %e, "token request failed");
                }
                (e.response(&request.correlation_id), e.outcome())
            }
        };
        let elapsed = request.started.elapsed();
        self.metrics
            .record_request(outcome, response.status(), elapsed);
        let line = RequestLine {
            request: &request,
            outcome,
            status: response.status(),
            elapsed,
            conn,
        };
        self.log(&trace, &line);
        if let Ok(v) = HeaderValue::from_str(&request.correlation_id) {
            response.headers_mut().insert("client-request-id", v);
        }
        response
    }
}

/// The outcome of authorization: the memo's grant, or a fresh decision and the key it
/// resolved to (with the generations read before deciding).
enum Allowed {
    Held(Arc<Grant>),
    Decided {
        key: CacheKey,
        generations: Generations,
    },
}

/// The shape of a request, as the memo's grants are matched.
fn ask_of<'a>(req: &'a token::TokenRequest, conn: &'a ConnInfo) -> Ask<'a> {
    Ask {
        client_id: &req.client_id,
        scope: &req.scope,
        sni: conn.sni.as_deref(),
        path_tenant: req.path_tenant.as_deref(),
    }
}

/// A request as it arrived, for its log line.
struct Finished {
    sent: Sent,
    correlation_id: String,
    started: Instant,
}

/// What the client sent, as its log line says it: never the query (a client may put its
/// token there) nor the body.
struct Sent {
    method: Method,
    version: http::Version,
    /// Path and query (cheap to keep: shared bytes); only the path is logged.
    uri: http::Uri,
    /// The Host header (HTTP/1.1), when the URI has no authority (h2's `:authority`).
    host: Option<HeaderValue>,
}

/// Longest host logged: a DNS name's 253 bytes and a port.
const LOGGED_HOST_LEN: usize = 260;

impl Sent {
    fn of<B>(req: &Request<B>) -> Self {
        let host = match req.uri().authority() {
            Some(_) => None,
            None => req.headers().get(http::header::HOST).cloned(),
        };
        Self {
            method: req.method().clone(),
            version: req.version(),
            uri: req.uri().clone(),
            host,
        }
    }

    /// The path as the router reads it, only when it names a route served with a valid
    /// tenant; else only its length: any other path is the client's free text, where a token
    /// may be (SPEC §9).
    fn path(&self) -> Cow<'_, str> {
        let path = self.uri.path();
        // Routed at most once: by the check, when this thread has not just seen the path.
        let mut routed = None;
        let as_sent = |_: &str| {
            let r = token::routed_path(path);
            let same = matches!(&r, Some(Cow::Borrowed(r)) if *r == path);
            routed = Some(r);
            same
        };
        if loggable_as_sent(&LOGGABLE_PATH, path, as_sent) {
            return Cow::Borrowed(path);
        }
        routed
            .unwrap_or_else(|| token::routed_path(path))
            .unwrap_or_else(|| Cow::Owned(format!("(unrecognised, {} bytes)", path.len())))
    }

    /// Host[:port] of the `:authority` (or absolute-form URI), else of the Host header: never
    /// its userinfo, and only when it is a host name or address (else only its length).
    fn host(&self) -> Cow<'_, str> {
        let sent = match (self.uri.authority(), &self.host) {
            (Some(authority), _) => authority.as_str().as_bytes(),
            (None, Some(v)) => v.as_bytes(),
            (None, None) => return Cow::Borrowed(""),
        };
        // Userinfo ends at the last '@' (a password may hold one).
        let start = sent.iter().rposition(|b| *b == b'@').map_or(0, |i| i + 1);
        let is_host = |h: &str| h.len() <= LOGGED_HOST_LEN && is_host_port(h);
        match std::str::from_utf8(&sent[start..]) {
            Ok(host) if loggable_as_sent(&LOGGABLE_HOST, host, is_host) => Cow::Borrowed(host),
            _ => Cow::Owned(format!("(invalid, {} bytes)", sent.len())),
        }
    }

    fn version(&self) -> &'static str {
        match self.version {
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_11 => "HTTP/1.1",
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_3 => "HTTP/3",
            _ => "other",
        }
    }
}

thread_local! {
    /// The last path, and the last host, this thread found loggable as sent: a client sends
    /// the same ones with each request, so each is checked once, then known by its bytes.
    static LOGGABLE_PATH: RefCell<String> = const { RefCell::new(String::new()) };
    static LOGGABLE_HOST: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Longest text remembered as loggable (longer ones are checked every time).
const LOGGABLE_MAX: usize = 512;

/// Whether `check` holds for `text`, asked only when `text` is not the last one it held for
/// in `slot` (the answer depends on the text alone).
fn loggable_as_sent(
    slot: &'static std::thread::LocalKey<RefCell<String>>,
    text: &str,
    check: impl FnOnce(&str) -> bool,
) -> bool {
    slot.with(|last| {
        if last
            .try_borrow()
            .is_ok_and(|last| !text.is_empty() && *last == text)
        {
            return true;
        }
        let loggable = check(text);
        if loggable && text.len() <= LOGGABLE_MAX {
            if let Ok(mut last) = last.try_borrow_mut() {
                last.clear();
                last.push_str(text);
            }
        }
        loggable
    })
}

/// `host[:port]`: a DNS name (labels of at most 63 letters, digits and dashes, as no token
/// segment is), an IPv4 address, or an IPv6 one in brackets; the port digits.
fn is_host_port(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, Some(p)),
        _ => (s, None),
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty() && crate::request::token::is_host_name(host),
    };
    port_ok && host_ok
}

/// A finished request and its answer, for its log line.
struct RequestLine<'a> {
    request: &'a Finished,
    outcome: &'static str,
    status: StatusCode,
    elapsed: Duration,
    conn: &'a ConnInfo,
}

impl App {
    /// The request's log line. An authenticated caller's request is logged, one line each;
    /// one refused before its caller was known is counted and summarized per peer (logged in
    /// full when first of its peer in an interval: SPEC §9); an answer to no one in
    /// particular (discovery) is logged at debug.
    fn log(&self, trace: &Trace, line: &RequestLine) {
        if trace.caller.is_some() {
            return trace.log(line, tracing::Level::INFO);
        }
        if line.outcome == "success" {
            return trace.log(line, tracing::Level::DEBUG);
        }
        if self.refusals.record(line.conn.peer.ip(), line.outcome) {
            trace.log(line, tracing::Level::WARN);
        }
    }
}

/// One event at a level chosen at run time (tracing's macros take a constant level).
macro_rules! event_at {
    ($level:expr, $($rest:tt)*) => {
        match $level {
            tracing::Level::WARN => tracing::warn!($($rest)*),
            tracing::Level::DEBUG => tracing::debug!($($rest)*),
            _ => tracing::info!($($rest)*),
        }
    };
}

impl Trace {
    fn log(&self, line: &RequestLine, level: tracing::Level) {
        let RequestLine {
            request,
            outcome,
            status,
            elapsed,
            conn,
        } = *line;
        let (ns, sa) = self
            .caller
            .as_ref()
            .map(|c| (c.namespace.as_str(), c.service_account.as_str()))
            .unwrap_or(("", ""));
        let sent = &request.sent;
        event_at!(
            level,
            method = sent.method.as_str(),
            path = &*sent.path(),
            version = sent.version(),
            alpn = conn.alpn.unwrap_or(""),
            form = self.form.unwrap_or(""),
            host = &*sent.host(),
            sni = conn.sni.as_deref().unwrap_or(""),
            outcome,
            status = status.as_u16(),
            namespace = ns,
            service_account = sa,
            client_id = self.client_id.as_deref().unwrap_or(""),
            scope = self.scope.as_deref().unwrap_or(""),
            cache = self.cache.map(Lookup::as_str).unwrap_or(""),
            upstream_status = self.upstream.unwrap_or(0),
            upstream_us = self.upstream_wait.map_or(0, |d| d.as_micros() as u64),
            latency_us = elapsed.as_micros() as u64,
            correlation_id = request.correlation_id.as_str(),
            peer = crate::serve::logline::Addr::of(&conn.peer).as_str(),
            "token request"
        );
    }
}

/// The success body: `expires_in` is the REMAINING lifetime (an integer).
fn token_response(t: &IssuedToken) -> Response<Body> {
    let body = Lifetimes::remaining(t).response(&t.access_token);
    json(StatusCode::OK, body.to_json())
}

/// The success body of a cached token, from the bytes the entry keeps ready.
fn entry_response(entry: &Entry) -> Response<Body> {
    json(StatusCode::OK, entry.answer())
}

/// The client's `client-request-id` when it is a sane GUID-like value, else a fresh one.
fn correlation_id<B>(req: &Request<B>) -> String {
    req.headers()
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(req: http::request::Builder) -> Sent {
        Sent::of(&req.body(()).unwrap())
    }

    #[test]
    fn the_logged_host_never_holds_userinfo_or_free_text() {
        let cases = [
            (
                sent(Request::get("https://user:s3cret@proxy.local:8443/")),
                "proxy.local:8443",
            ),
            (
                sent(Request::get("/").header("host", "a:b@c@proxy.local")),
                "proxy.local",
            ),
            (
                sent(Request::get("/").header("host", "[::1]:443")),
                "[::1]:443",
            ),
            (
                sent(Request::get("/").header("host", "127.0.0.1")),
                "127.0.0.1",
            ),
            (
                sent(Request::get("/").header(
                    "host",
                    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQeyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ",
                )),
                "(invalid, 73 bytes)",
            ),
            (
                sent(Request::get("/").header("host", "proxy local")),
                "(invalid, 11 bytes)",
            ),
            (sent(Request::get("/")), ""),
        ];
        // Twice over, in turn: each answer is the same whether the thread's last loggable
        // host was this one or another.
        for _ in 0..2 {
            for (sent, host) in &cases {
                assert_eq!(sent.host(), *host);
                assert_eq!(sent.host(), *host);
            }
        }
    }

    #[test]
    fn the_logged_path_is_the_routed_one_or_an_unrecognised_ones_length() {
        let path = "/token/eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
        let routed = "/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token";
        let prefixed = "/x/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token";
        let unrecognised = format!("(unrecognised, {} bytes)", path.len());
        let cases = [
            (routed, routed.to_string()),
            (path, unrecognised.clone()),
            (routed, routed.to_string()),
            (routed, routed.to_string()),
            (path, unrecognised),
            (
                prefixed,
                "(prefix, 2 bytes)/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token".into(),
            ),
            ("//", "/".into()),
        ];
        for (path, logged) in cases {
            assert_eq!(sent(Request::post(path)).path(), logged, "{path}");
        }
    }
}
