//! The token request's journey, top to bottom: parse → authenticate → bind → authorize →
//! cache/exchange → respond. Each step lives in its own module; this file only calls them in
//! order and turns the outcome into a response, a metric and one log line.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::authn::{Authenticator, Caller};
use crate::authz::Authorizer;
use crate::bindings::Bindings;
use crate::cache::{CacheKey, Fetch, Lookup, TokenCache};
use crate::entra::{EntraClient, Exchange, IssuedToken};
use crate::error::{ProxyError, Result};
use crate::http::{json, json_value, read_request_body, Body};
use crate::issuer::Issuer;
use crate::limits::{ConnectionPermit, RequestPermit};
use crate::metrics::Metrics;
use crate::token::{self, Route, TokenResponse};

/// Everything a request needs, built once and shared.
pub struct App {
    pub authn: Arc<Authenticator>,
    pub authz: Arc<Authorizer>,
    pub bindings: Arc<Bindings>,
    pub cache: Arc<TokenCache>,
    /// Our issuer (the key that signs assertions); used by the cache's exchanger.
    pub issuer: Arc<Issuer>,
    pub metrics: Arc<Metrics>,
    /// Entra settings per SNI name, and for every other name.
    pub profiles: HashMap<String, Profile>,
    pub default_profile: Profile,
    pub max_body_bytes: usize,
    /// Deadline for a request's whole body, from its head.
    pub body_timeout: Duration,
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

    /// Serves one request. Generic over the body so benchmarks and tests can drive the
    /// handler in-process; the server passes hyper's `Incoming`.
    pub async fn handle<B>(&self, req: Request<B>, conn: &ConnInfo) -> Response<Body>
    where
        B: hyper::body::Body<Data = bytes::Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let correlation_id = correlation_id(&req);
        let method = req.method().clone();
        let mut trace = Trace::default();
        let result = match conn.permit.request() {
            Ok(mut permit) => self.serve(req, conn, &mut permit, &mut trace).await,
            Err(e) => Err(e),
        };
        let elapsed = started.elapsed();
        let (response, outcome) = match result {
            Ok(resp) => (resp, "success"),
            Err(e) => {
                if let ProxyError::Upstream { status, .. } = &e {
                    trace.upstream = Some(status.as_u16());
                }
                let outcome = e.outcome();
                let mut resp = json(e.status(), e.body(&correlation_id).to_json());
                if e.status() == StatusCode::METHOD_NOT_ALLOWED {
                    // RFC 9110 §15.5.6: a 405 names the allowed method. Only two routes answer
                    // 405: POST on the discovery path, anything but POST on the token path.
                    let allow = if method == Method::POST {
                        "GET"
                    } else {
                        "POST"
                    };
                    resp.headers_mut()
                        .insert(header::ALLOW, HeaderValue::from_static(allow));
                }
                if let Some(secs) = e.retry_after() {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                if e.status().is_server_error() {
                    tracing::warn!(error = %e, "token request failed");
                }
                (resp, outcome)
            }
        };
        let status = response.status();
        if outcome == "success" && status == StatusCode::OK {
            self.metrics.served.inc();
            self.metrics.served_duration.observe(elapsed.as_secs_f64());
        } else {
            self.metrics
                .requests
                .with_label_values(&[outcome, status.as_str()])
                .inc();
            self.metrics
                .request_duration
                .with_label_values(&[outcome])
                .observe(elapsed.as_secs_f64());
        }
        let (ns, sa) = trace
            .caller
            .as_ref()
            .map(|c| (c.namespace.as_str(), c.service_account.as_str()))
            .unwrap_or(("", ""));
        tracing::info!(
            method = %method,
            outcome,
            status = status.as_u16(),
            namespace = ns,
            service_account = sa,
            client_id = trace.client_id.as_deref().unwrap_or(""),
            scope = trace.scope.as_deref().unwrap_or(""),
            cache = trace.cache.map(Lookup::as_str).unwrap_or(""),
            upstream_status = trace.upstream.unwrap_or(0),
            upstream_us = trace.upstream_wait.map_or(0, |d| d.as_micros() as u64),
            latency_us = elapsed.as_micros() as u64,
            correlation_id = %correlation_id,
            peer = %conn.peer,
            "token request"
        );
        let mut response = response;
        if let Ok(v) = HeaderValue::from_str(&correlation_id) {
            response.headers_mut().insert("client-request-id", v);
        }
        response
    }

    async fn serve<B>(
        &self,
        req: Request<B>,
        conn: &ConnInfo,
        permit: &mut RequestPermit,
        trace: &mut Trace,
    ) -> Result<Response<Body>>
    where
        B: hyper::body::Body<Data = bytes::Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let path_tenant = match token::route(&parts.method, parts.uri.path()) {
            Route::Token { tenant } => tenant,
            Route::Discovery { tenant, prefix } => {
                // Built from the name the connection is served under, never from Host.
                let host = conn.sni.as_deref().unwrap_or("localhost");
                let tenant = token::printable(&tenant, 100);
                let base = format!("https://{host}{prefix}");
                return Ok(json_value(
                    StatusCode::OK,
                    &token::discovery_document(&base, &tenant),
                ));
            }
            Route::NotFound => return Err(token::not_found(&parts.method, parts.uri.path())),
            Route::MethodNotAllowed => return Err(token::method_not_allowed(&parts.method)),
        };
        debug_assert_eq!(parts.method, Method::POST);

        // 1. Parse.
        let body = read_request_body(body, self.max_body_bytes, self.body_timeout, permit).await?;
        if !body.iter().all(u8::is_ascii_whitespace) {
            token::check_content_type(
                parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok()),
            )?;
        }
        let req = token::parse(path_tenant, parts.uri.query(), &body)?;
        trace.client_id = Some(req.client_id.clone());
        trace.scope = Some(req.scope.clone());

        // 2. Authenticate the service-account token.
        let caller = self.authn.authenticate(&req.assertion).await?;
        trace.caller = Some(caller.clone());

        // 3. Authorize: on EVERY request, before the cache is consulted, and before anything
        //    that could tell an unauthorized caller whether or where this identity is bound.
        self.authz.authorize(&caller, &req.client_id).await?;

        // 4. Is this identity bound to this cluster, in the tenant the caller and the SNI
        //    name's profile ask for?
        let binding = self
            .bindings
            .current()
            .get(&req.client_id)
            .cloned()
            .ok_or_else(|| {
                ProxyError::Unbound(format!(
                "Managed identity '{}' is not bound to this cluster: add {{clientId: {}, tenantId: \
                 <tenant>}} to the proxy's bindings file (and its federated identity credential \
                 to the identity) before workloads can use it.",
                req.client_id, req.client_id
            ))
            })?;
        let profile = self.profile(conn.sni.as_deref());
        let asked = [
            (profile.tenant.as_deref(), "this SNI name's profile"),
            (req.path_tenant.as_deref(), "the request"),
        ];
        for (tenant, whose) in asked {
            let Some(tenant) = tenant else { continue };
            if !tenant.eq_ignore_ascii_case(&binding.tenant_id) {
                return Err(ProxyError::InvalidRequest {
                    code: crate::error::codes::TENANT_MISMATCH,
                    description: format!(
                        "Tenant '{}' (from {whose}) is not this identity's: managed identity \
                         '{}' is bound to tenant '{}'. Set AZURE_TENANT_ID to '{}' (or use the \
                         SNI name of that tenant's profile).",
                        token::printable(tenant, 100),
                        binding.client_id,
                        binding.tenant_id,
                        binding.tenant_id
                    ),
                });
            }
        }

        // 5. Cache, or exchange with Entra through the identity's one FIC.
        let key = CacheKey {
            authority: profile.authority_key.clone(),
            tenant: binding.tenant_id.clone(),
            client_id: binding.client_id.clone(),
            scopes: req.scope,
        };
        let asked = Instant::now();
        let (issued, lookup) = self
            .cache
            .get(key, req.claims.as_deref(), &caller.username)
            .await?;
        trace.cache = Some(lookup);
        if lookup != Lookup::Hit {
            trace.upstream = Some(200);
            trace.upstream_wait = Some(asked.elapsed());
        }
        Ok(token_response(&issued))
    }
}

/// The exchange behind the cache: our assertion for the identity's binding, sent to Entra.
pub struct Exchanger {
    pub bindings: Arc<Bindings>,
    pub issuer: Arc<Issuer>,
    pub entra: Arc<EntraClient>,
}

impl Fetch for Exchanger {
    fn fetch(
        &self,
        key: &CacheKey,
        claims: Option<&str>,
    ) -> BoxFuture<'static, Result<IssuedToken>> {
        let binding = self.bindings.current().get(&key.client_id).cloned();
        let (issuer, entra) = (self.issuer.clone(), self.entra.clone());
        let authority = key.authority.clone();
        let (scope, claims) = (key.scopes.clone(), claims.map(str::to_string));
        let tenant = key.tenant.clone();
        async move {
            // Bindings may have changed since the request (or the last refresh) started.
            let binding = binding.filter(|b| b.tenant_id == tenant).ok_or_else(|| {
                ProxyError::Unbound(
                    "The managed identity is no longer bound to this cluster.".into(),
                )
            })?;
            let assertion = issuer.assertion(&binding)?;
            entra
                .exchange(&Exchange {
                    authority: &authority,
                    tenant: &binding.tenant_id,
                    client_id: &binding.client_id,
                    scope: &scope,
                    assertion: &assertion,
                    claims: claims.as_deref(),
                })
                .await
        }
        .boxed()
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
