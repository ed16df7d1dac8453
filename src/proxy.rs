//! The token request's journey, top to bottom: route → body → parse → authenticate →
//! authorize → resolve the binding → cache/exchange → respond. Each step lives in its own
//! module; this file only calls them in order and turns the outcome into a response, a metric
//! and one log line.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Response, StatusCode};

use crate::authn::{Authenticator, Caller};
use crate::authz::Authorizer;
use crate::bindings::Bindings;
use crate::cache::{CacheKey, Lookup, TokenCache};
use crate::entra::IssuedToken;
use crate::error::{ProxyError, Result};
use crate::http::{json, read_request_body, Body};
use crate::issuer::Issuer;
use crate::limits::ConnectionPermit;
use crate::metrics::Metrics;
use crate::token::{self, Route, TokenResponse};

/// Everything a request needs, built once and shared.
pub struct App {
    pub authn: Arc<Authenticator>,
    pub authz: Arc<Authorizer>,
    pub bindings: Arc<Bindings>,
    pub cache: Arc<TokenCache>,
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
    pub own_account: Option<crate::sidecar::OwnAccount>,
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
}

/// Where a connection came from, the name it is served under, and its share of the limits.
pub struct ConnInfo {
    pub peer: std::net::SocketAddr,
    /// The SNI name the connection is served under: the client's, or the default name for a
    /// client that sent none (so it gets that name's profile, never a looser one).
    pub sni: Option<String>,
    pub permit: ConnectionPermit,
}

impl ConnInfo {
    /// A connection for an in-process caller (benchmarks, tests), outside any accept loop.
    pub fn detached(peer: std::net::SocketAddr, sni: Option<String>) -> Self {
        Self {
            peer,
            sni,
            permit: ConnectionPermit::detached(peer.ip()),
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
        let method = req.method().clone();
        let mut trace = Trace::default();
        let served = tokio::time::timeout(self.request_timeout, self.serve(req, conn, &mut trace));
        let result = served
            .await
            .unwrap_or_else(|_| Err(ProxyError::timed_out()));
        let request = Finished {
            method,
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
        let mut req = token::parse_request(path_tenant, &parts, &body.await?)?;
        trace.client_id = Some(req.client_id.clone());
        trace.scope = Some(req.scope.clone());
        let caller = self.authn.authenticate(&req.assertion).await?;
        trace.caller = Some(caller.clone());
        crate::sidecar::check(self.own_account.as_ref(), &caller)?;
        // On EVERY request, before the cache, and before anything that could tell an
        // unauthorized caller whether or where this identity is bound.
        self.authz.authorize(&caller, &req.client_id).await?;
        let claims = req.claims.take();
        let key = self.cache_key(req, conn)?;
        let issued = self.token(key, claims.as_deref(), &caller, trace).await?;
        Ok(token_response(&issued))
    }

    /// The identity's binding, in the tenant the request and its SNI name's profile ask for,
    /// as the cache key of the token asked for.
    fn cache_key(&self, req: token::TokenRequest, conn: &ConnInfo) -> Result<CacheKey> {
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
            scopes: req.scope,
        })
    }

    /// The cached token, or the one Entra issues for it (joined with any exchange in flight).
    async fn token(
        &self,
        key: CacheKey,
        claims: Option<&str>,
        caller: &Caller,
        trace: &mut Trace,
    ) -> Result<Arc<IssuedToken>> {
        let asked = Instant::now();
        let (issued, lookup) = self.cache.get(key, claims, &caller.username).await?;
        trace.cache = Some(lookup);
        if lookup != Lookup::Hit {
            trace.upstream = Some(200);
            trace.upstream_wait = Some(asked.elapsed());
        }
        Ok(issued)
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
        trace.log(&request, outcome, response.status(), elapsed, conn);
        if let Ok(v) = HeaderValue::from_str(&request.correlation_id) {
            response.headers_mut().insert("client-request-id", v);
        }
        response
    }
}

/// A request as it arrived, for its log line.
struct Finished {
    method: Method,
    correlation_id: String,
    started: Instant,
}

impl Trace {
    fn log(
        &self,
        request: &Finished,
        outcome: &str,
        status: StatusCode,
        elapsed: Duration,
        conn: &ConnInfo,
    ) {
        let (ns, sa) = self
            .caller
            .as_ref()
            .map(|c| (c.namespace.as_str(), c.service_account.as_str()))
            .unwrap_or(("", ""));
        tracing::info!(
            method = %request.method,
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
            correlation_id = %request.correlation_id,
            peer = %conn.peer,
            "token request"
        );
    }
}

/// The success body: `expires_in` is the REMAINING lifetime (an integer).
fn token_response(t: &IssuedToken) -> Response<Body> {
    let elapsed = t.received.elapsed().as_secs();
    let body = TokenResponse {
        token_type: "Bearer",
        expires_in: t.expires_in.saturating_sub(elapsed),
        ext_expires_in: t.ext_expires_in.saturating_sub(elapsed),
        refresh_in: t.refresh_in.map(|r| r.saturating_sub(elapsed).max(1)),
        access_token: &t.access_token,
    };
    json(StatusCode::OK, body.to_json())
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
