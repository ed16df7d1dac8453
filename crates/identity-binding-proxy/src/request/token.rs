//! The HTTP surface of the token endpoint: which requests we accept, how their parameters are
//! read, and the shapes of our answers.
//!
//! Clients append their Entra path to the proxy URL's path and keep their query, so we match
//! on the end of the path and read parameters from the body (or from the query only when the
//! body is empty, never merged). Everything here is pure and unit-tested.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeSet;

use http::{Method, Response, StatusCode};
use serde::Serialize;

use crate::http::response::{json_value, Body};
use crate::request::error::{codes, ProxyError, Result};

pub const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
pub const ASSERTION_TYPE_JWT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Largest accepted assertion (an SA token is ~1 KiB; 16 KiB leaves room for big claims).
pub const MAX_ASSERTION_BYTES: usize = 16 * 1024;
/// Most scopes accepted in one request. Client credentials uses exactly one `.default`.
const MAX_SCOPES: usize = 8;
/// OpenID Connect scopes, which MSAL for Go sends beside the `.default` scope.
const OIDC_SCOPES: [&str; 3] = ["openid", "offline_access", "profile"];

/// What a request asks for, decided from method and path alone.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A POST that may carry a token request; `tenant` if the path names one.
    Token { tenant: Option<String> },
    /// MSAL for Go's `GET /{tenant}/v2.0/.well-known/openid-configuration`.
    Discovery { tenant: String, prefix: String },
    /// Instance discovery and anything else we do not serve.
    NotFound,
    /// A known path with the wrong method; `allow` is the one it takes.
    MethodNotAllowed { allow: Method },
}

/// Classifies a request by method and path.
pub fn route(method: &Method, path: &str) -> Route {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let n = segments.len();
    // "{tenant}/oauth2/v2.0/token" at the end of the path, after any proxy path prefix.
    let token_tenant = (n >= 4 && segments[n - 3..] == ["oauth2", "v2.0", "token"])
        .then(|| segments[n - 4].to_string());
    let is_discovery =
        n >= 4 && segments[n - 3..] == ["v2.0", ".well-known", "openid-configuration"];
    if *method == Method::POST {
        if is_discovery {
            return Route::MethodNotAllowed { allow: Method::GET };
        }
        return Route::Token {
            tenant: token_tenant,
        };
    }
    if *method == Method::GET && is_discovery {
        let prefix = segments[..n - 4]
            .iter()
            .map(|s| format!("/{s}"))
            .collect::<String>();
        return Route::Discovery {
            tenant: segments[n - 4].to_string(),
            prefix,
        };
    }
    if token_tenant.is_some() {
        return Route::MethodNotAllowed {
            allow: Method::POST,
        };
    }
    Route::NotFound
}

/// The path as a request's log line may name it (SPEC §9: never a token, which a client may
/// put anywhere in its path): a route served, with a tenant that is a GUID or a domain, any
/// proxy path prefix before it given only by its length; `/` as itself; else none.
pub fn routed_path(path: &str) -> Option<Cow<'_, str>> {
    // From the end, without collecting: this runs for every request line.
    let mut rev = path.split('/').filter(|s| !s.is_empty()).rev();
    let (Some(last), middle, first, tenant) = (rev.next(), rev.next(), rev.next(), rev.next())
    else {
        return Some(Cow::Borrowed("/"));
    };
    let route = [first.unwrap_or(""), middle.unwrap_or(""), last];
    let routed = route == ["oauth2", "v2.0", "token"]
        || route == ["v2.0", ".well-known", "openid-configuration"];
    let tenant = tenant.unwrap_or("");
    if !routed || !is_tenant(tenant) {
        return None;
    }
    let prefix: usize = rev.map(|s| s.len() + 1).sum();
    if prefix == 0 {
        return Some(Cow::Borrowed(path));
    }
    let [first, middle, last] = route;
    Some(Cow::Owned(format!(
        "(prefix, {prefix} bytes)/{tenant}/{first}/{middle}/{last}"
    )))
}

/// A tenant as a path names it: a GUID, or a domain.
fn is_tenant(s: &str) -> bool {
    parse_guid(s).is_some_and(|g| g == s.to_ascii_lowercase())
        || (s.contains('.') && is_host_name(s))
}

/// A DNS name: at most 253 bytes, labels of 1 to 63 letters, digits and dashes (a JWT's
/// segments are longer, or hold `_`).
pub fn is_host_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A validated client-credentials request.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// Tenant from the path, if the path had one.
    pub path_tenant: Option<String>,
    /// Lower-case GUID.
    pub client_id: String,
    /// The canonical scope set (see [`canonical_scopes`]): the cache key AND what is sent to
    /// Entra, so two spellings of one scope can never become two entries or two calls.
    pub scope: String,
    /// The SA token, trimmed.
    pub assertion: String,
    /// A CAE claims challenge: never served from cache.
    pub claims: Option<String>,
}

impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The assertion is a credential: keep it out of every debug print.
        f.debug_struct("TokenRequest")
            .field("path_tenant", &self.path_tenant)
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .field("claims", &self.claims.is_some())
            .finish_non_exhaustive()
    }
}

/// Fields that must appear at most once (parameter pollution is refused).
const SINGLE_FIELDS: [&str; 6] = [
    "grant_type",
    "client_assertion_type",
    "client_assertion",
    "client_id",
    "scope",
    "claims",
];

/// Checks the content type of a non-empty body: form encoding only.
pub fn check_content_type(content_type: Option<&str>) -> Result<()> {
    let Some(ct) = content_type else {
        return Err(ProxyError::invalid_request(
            "The request has a body but no Content-Type. Send the parameters as \
             application/x-www-form-urlencoded.",
        ));
    };
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(())
    } else {
        Err(ProxyError::invalid_request(format!(
            "Content-Type '{}' is not supported. Send the parameters as \
             application/x-www-form-urlencoded.",
            printable(mime, 64)
        )))
    }
}

/// The token request of a POST: its content type checked, its parameters parsed.
pub fn parse_request(
    path_tenant: Option<String>,
    head: &http::request::Parts,
    body: &[u8],
) -> Result<TokenRequest> {
    if !body.iter().all(u8::is_ascii_whitespace) {
        let content_type = head.headers.get(http::header::CONTENT_TYPE);
        check_content_type(content_type.and_then(|v| v.to_str().ok()))?;
    }
    parse(path_tenant, head.uri.query(), body)
}

/// Where a POST's form is read from: "body" when it has one, else "query" when there is one,
/// else "none" (for the request log: which shape of client sent it).
pub fn form_source(query: Option<&str>, body: &[u8]) -> &'static str {
    if !body.iter().all(u8::is_ascii_whitespace) {
        "body"
    } else if query.is_some_and(|q| !q.is_empty()) {
        "query"
    } else {
        "none"
    }
}

/// Reads and validates the client-credentials parameters of a POST: from the body, or from
/// the query when the body is empty. Every refusal names the parameter and what to send.
pub fn parse(
    path_tenant: Option<String>,
    query: Option<&str>,
    body: &[u8],
) -> Result<TokenRequest> {
    if let Some(req) = LAST_PARSED.with(|last| last.borrow().recall(&path_tenant, query, body)) {
        return Ok(req);
    }
    let req = parse_form(path_tenant, query, body)?;
    LAST_PARSED.with(|last| last.borrow_mut().keep(query, body, &req));
    Ok(req)
}

thread_local! {
    /// The last request this thread parsed, and from what: a client sends the same form with
    /// each request, and what [`parse`] reads depends on the path's tenant, the query and the
    /// body alone.
    static LAST_PARSED: RefCell<LastParsed> = const { RefCell::new(LastParsed(None)) };
}

/// Longest form remembered (an SDK's is about 1.3 KiB; longer ones are parsed each time).
const LAST_PARSED_MAX: usize = 8 * 1024;

/// The query and body of the last request parsed, and the request read from them.
struct LastParsed(Option<Parsed>);

type Parsed = (Option<Box<str>>, Box<[u8]>, TokenRequest);

impl LastParsed {
    fn recall(
        &self,
        path_tenant: &Option<String>,
        query: Option<&str>,
        body: &[u8],
    ) -> Option<TokenRequest> {
        let (kept_query, kept_body, req) = self.0.as_ref()?;
        (**kept_body == *body && kept_query.as_deref() == query && req.path_tenant == *path_tenant)
            .then(|| req.clone())
    }

    fn keep(&mut self, query: Option<&str>, body: &[u8], req: &TokenRequest) {
        if body.len() + query.map_or(0, str::len) <= LAST_PARSED_MAX {
            self.0 = Some((query.map(Into::into), body.into(), req.clone()));
        }
    }
}

fn parse_form(
    path_tenant: Option<String>,
    query: Option<&str>,
    body: &[u8],
) -> Result<TokenRequest> {
    let source: &[u8] = match form_source(query, body) {
        "body" => body,
        _ => query.unwrap_or("").as_bytes(),
    };
    let source = std::str::from_utf8(source)
        .map_err(|_| ProxyError::invalid_request("The request parameters are not valid UTF-8."))?;
    let [grant_type, assertion_type, assertion, client_id, scope, claims] = single_fields(source)?;
    check_grant_type(grant_type)?;
    let client_id = client_id_of(client_id)?;
    let assertion = assertion_of(assertion_type, assertion)?;
    let scope = canonical_scopes(&scope.ok_or_else(|| ProxyError::missing("scope"))?)?;
    let claims = claims.filter(|c| !c.trim().is_empty()).map(Cow::into_owned);
    Ok(TokenRequest {
        path_tenant,
        client_id,
        scope,
        assertion,
        claims,
    })
}

type Fields<'a> = [Option<Cow<'a, str>>; SINGLE_FIELDS.len()];

/// The [`SINGLE_FIELDS`] of a form, percent-decoded; others are ignored, repeats refused.
fn single_fields(source: &str) -> Result<Fields<'_>> {
    let mut fields: Fields<'_> = Default::default();
    for (key, value) in form_pairs(source) {
        let Some(i) = SINGLE_FIELDS.iter().position(|f| *f == key) else {
            continue;
        };
        if fields[i].is_some() {
            return Err(ProxyError::invalid_request(format!(
                "The parameter '{}' was given more than once. Send each parameter once.",
                SINGLE_FIELDS[i]
            )));
        }
        // A credential or identifier whose percent-decoding is not UTF-8 is refused, not
        // guessed at.
        let value = form_decode(value).ok_or_else(|| {
            ProxyError::invalid_request(format!(
                "The parameter '{}' is not valid UTF-8 once percent-decoded.",
                SINGLE_FIELDS[i]
            ))
        })?;
        fields[i] = Some(value);
    }
    Ok(fields)
}

fn check_grant_type(grant_type: Option<Cow<'_, str>>) -> Result<()> {
    let grant_type = grant_type.ok_or_else(|| ProxyError::missing("grant_type"))?;
    if grant_type == GRANT_CLIENT_CREDENTIALS {
        return Ok(());
    }
    Err(ProxyError::UnsupportedGrant(format!(
        "grant_type '{}' is not supported: this proxy serves only \
         grant_type=client_credentials with a service-account token as client_assertion.",
        printable(&grant_type, 64)
    )))
}

fn client_id_of(client_id: Option<Cow<'_, str>>) -> Result<String> {
    let client_id = client_id.ok_or_else(|| ProxyError::missing("client_id"))?;
    parse_guid(&client_id).ok_or_else(|| ProxyError::InvalidRequest {
        code: codes::INVALID_REQUEST,
        description: format!(
            "client_id '{}' is not a GUID. Set AZURE_CLIENT_ID to the client ID of the managed \
             identity (e.g. 00000000-0000-0000-0000-000000000000).",
            printable(&client_id, 64)
        ),
    })
}

/// The service-account token of a JWT-bearer client assertion, within its size limit.
fn assertion_of(
    assertion_type: Option<Cow<'_, str>>,
    assertion: Option<Cow<'_, str>>,
) -> Result<String> {
    let assertion_type =
        assertion_type.ok_or_else(|| ProxyError::missing("client_assertion_type"))?;
    if assertion_type != ASSERTION_TYPE_JWT {
        return Err(ProxyError::invalid_request(format!(
            "client_assertion_type '{}' is not supported: use {ASSERTION_TYPE_JWT}.",
            printable(&assertion_type, 80)
        )));
    }
    let assertion = assertion.ok_or_else(|| ProxyError::missing("client_assertion"))?;
    let assertion = assertion.trim();
    if assertion.is_empty() {
        return Err(ProxyError::missing("client_assertion"));
    }
    if assertion.len() > MAX_ASSERTION_BYTES {
        return Err(ProxyError::invalid_assertion(format!(
            "client_assertion is {} bytes, more than the {MAX_ASSERTION_BYTES} accepted. Send \
             the projected service-account token from AZURE_FEDERATED_TOKEN_FILE.",
            assertion.len()
        )));
    }
    Ok(assertion.to_string())
}

/// The `key=value` pairs of an `application/x-www-form-urlencoded` string, keys decoded, values
/// raw: empty pieces are skipped and a piece without `=` has an empty value (WHATWG URL §5.1).
fn form_pairs(source: &str) -> impl Iterator<Item = (Cow<'_, str>, &str)> {
    source.split('&').filter(|p| !p.is_empty()).map(|piece| {
        let (key, value) = piece.split_once('=').unwrap_or((piece, ""));
        // A key that does not decode is no parameter we know.
        (form_decode(key).unwrap_or(Cow::Borrowed("")), value)
    })
}

/// Decodes one form value: `+` is a space and `%XX` a byte; a `%` not followed by two hex
/// digits stays as it is. Borrowed when there is nothing to decode (an SA token never has
/// anything), `None` when the decoded bytes are not UTF-8.
fn form_decode(raw: &str) -> Option<Cow<'_, str>> {
    let bytes = raw.as_bytes();
    let Some(first) = memchr::memchr2(b'%', b'+', bytes) else {
        return Some(Cow::Borrowed(raw));
    };
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..first]);
    let mut i = first;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// The canonical form of a scope parameter: split on ASCII white space, each scope's scheme and
/// host lower-cased (resource hosts are case-insensitive; the path is kept, since Entra copies
/// the resource's spelling into the token's `aud`), its `/.default` suffix lower-cased,
/// de-duplicated, sorted, joined by one space. Each must be an app-only `.default` scope. Non-ASCII
/// and control characters are refused: no resource identifier contains them, and accepting them
/// would let one scope be spelled many ways.
pub fn canonical_scopes(scope: &str) -> Result<String> {
    check_scope_characters(scope)?;
    // The common case, one scope already in canonical form, without building a set.
    let one = scope.trim_ascii();
    if !one.is_empty() && !one.contains(|c: char| c.is_ascii_whitespace()) {
        return canonical_scope(one).map(Cow::into_owned);
    }
    let mut set = BTreeSet::new();
    let mut oidc_only = None;
    for s in scope.split_ascii_whitespace() {
        // MSAL for Go adds `openid offline_access profile` to every token request, client
        // credentials included; Entra ignores them for an app token, and so do we (they are
        // neither in the cache key nor sent to Entra).
        if OIDC_SCOPES.contains(&s) {
            oidc_only.get_or_insert(s);
            continue;
        }
        if set.len() == MAX_SCOPES {
            return Err(ProxyError::InvalidScope(format!(
                "More than {MAX_SCOPES} scopes were requested. Client credentials use exactly \
                 one '<resource>/.default' scope."
            )));
        }
        set.insert(canonical_scope(s)?);
    }
    if set.is_empty() {
        return Err(match oidc_only {
            Some(oidc) => canonical_scope(oidc)
                .err()
                .unwrap_or(ProxyError::missing("scope")),
            None => ProxyError::missing("scope"),
        });
    }
    Ok(set.into_iter().collect::<Vec<_>>().join(" "))
}

/// Plain printable ASCII (and white space between scopes): what every resource identifier is.
fn check_scope_characters(scope: &str) -> Result<()> {
    let bad =
        |c: &char| !c.is_ascii() || (c.is_ascii_control() && !matches!(c, '\t' | '\n' | '\r'));
    match scope.chars().find(bad) {
        None => Ok(()),
        Some(c) => Err(ProxyError::InvalidScope(format!(
            "The scope contains the character U+{:04X}, which no resource identifier has. Send \
             exactly '<resource>/.default' in plain ASCII, e.g. \
             'https://management.azure.com/.default'.",
            c as u32
        ))),
    }
}

/// One scope in canonical form; borrowed when it already is.
fn canonical_scope(s: &str) -> Result<Cow<'_, str>> {
    const SUFFIX: &str = "/.default";
    let ok_suffix = s.len() > SUFFIX.len()
        && s.is_char_boundary(s.len() - SUFFIX.len())
        && s[s.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX);
    if !ok_suffix {
        return Err(ProxyError::InvalidScope(format!(
            "scope '{}' is not a '<resource>/.default' scope. An application token (client \
             credentials) must request '<resource>/.default', e.g. \
             'https://management.azure.com/.default'.",
            printable(s, 120)
        )));
    }
    // The part to lower-case: "scheme://host" of a URI, or the first segment of a bare
    // resource such as an application id.
    let host_end = match s.find("://") {
        Some(i) => s[i + 3..].find('/').map_or(s.len(), |j| i + 3 + j),
        None => s.find('/').unwrap_or(s.len()),
    };
    let suffix_start = s.len() - SUFFIX.len();
    let canonical = |range: &str| !range.bytes().any(|b| b.is_ascii_uppercase());
    if canonical(&s[..host_end]) && canonical(&s[suffix_start..]) {
        return Ok(Cow::Borrowed(s));
    }
    let mut out = String::with_capacity(s.len());
    out.push_str(&s[..host_end].to_ascii_lowercase());
    if host_end < suffix_start {
        out.push_str(&s[host_end..suffix_start]);
    }
    out.push_str(SUFFIX);
    Ok(Cow::Owned(out))
}

/// A canonical lower-case GUID, or `None`.
pub fn parse_guid(s: &str) -> Option<String> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    for (i, c) in b.iter().enumerate() {
        let ok = match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        };
        if !ok {
            return None;
        }
    }
    Some(s.to_ascii_lowercase())
}

/// A value from the request, shortened and stripped of control characters so it can be
/// quoted safely in an error description.
pub fn printable(s: &str, max: usize) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(max).collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// The success body, exactly the fields Entra sends (integers, not strings).
#[derive(Debug, Serialize)]
pub struct TokenResponse<'a> {
    pub token_type: &'static str,
    pub expires_in: u64,
    pub ext_expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_in: Option<u64>,
    pub access_token: &'a str,
}

impl TokenResponse<'_> {
    /// The body, byte for byte what `serde_json` writes, without its per-character escaping
    /// pass over the token on every cache hit (a JWT has nothing to escape).
    pub fn to_json(&self) -> Vec<u8> {
        if self.token_type != "Bearer" {
            return serde_json::to_vec(self).unwrap_or_default();
        }
        let lifetimes = Lifetimes {
            expires_in: self.expires_in,
            ext_expires_in: self.ext_expires_in,
            refresh_in: self.refresh_in,
        };
        if plain(self.access_token) {
            lifetimes.json_with(self.access_token)
        } else {
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}

/// The part of a success body that changes every second: what is left of the token's
/// lifetimes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub expires_in: u64,
    pub ext_expires_in: u64,
    pub refresh_in: Option<u64>,
}

impl Lifetimes {
    /// What is left now of `t`'s lifetimes (`expires_in` is the REMAINING lifetime).
    pub fn remaining(t: &crate::exchange::cache::IssuedToken) -> Self {
        let elapsed = t.received.elapsed().as_secs();
        Self {
            expires_in: t.expires_in.saturating_sub(elapsed),
            ext_expires_in: t.ext_expires_in.saturating_sub(elapsed),
            refresh_in: t.refresh_in.map(|r| r.saturating_sub(elapsed).max(1)),
        }
    }

    /// The response these lifetimes and `access_token` make.
    pub fn response(self, access_token: &str) -> TokenResponse<'_> {
        TokenResponse {
            token_type: "Bearer",
            expires_in: self.expires_in,
            ext_expires_in: self.ext_expires_in,
            refresh_in: self.refresh_in,
            access_token,
        }
    }

    /// The body of these lifetimes and `access_token`, which must be [`plain`] (nothing to
    /// escape): byte for byte what `serde_json` writes.
    pub fn json_with(self, access_token: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(access_token.len() + 112);
        let mut num = itoa::Buffer::new();
        out.extend_from_slice(b"{\"token_type\":\"Bearer\",\"expires_in\":");
        out.extend_from_slice(num.format(self.expires_in).as_bytes());
        out.extend_from_slice(b",\"ext_expires_in\":");
        out.extend_from_slice(num.format(self.ext_expires_in).as_bytes());
        if let Some(refresh_in) = self.refresh_in {
            out.extend_from_slice(b",\"refresh_in\":");
            out.extend_from_slice(num.format(refresh_in).as_bytes());
        }
        out.extend_from_slice(b",\"access_token\":\"");
        out.extend_from_slice(access_token.as_bytes());
        out.extend_from_slice(b"\"}");
        out
    }
}

/// Whether `s` goes into a JSON string as it is (no quote, backslash or control character):
/// checked once per cached token, so a hit copies the token without looking at it.
pub fn plain(s: &str) -> bool {
    // A fold without early exit, so the compiler vectorizes it.
    s.bytes()
        .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'))
}

/// The static OpenID configuration MSAL for Go reads before its first token request; its
/// endpoints point back at this proxy with the same path layout.
pub fn discovery_document(base: &str, tenant: &str) -> serde_json::Value {
    let base = base.trim_end_matches('/');
    serde_json::json!({
        "token_endpoint": format!("{base}/{tenant}/oauth2/v2.0/token"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": format!("{base}/{tenant}/discovery/v2.0/keys"),
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": format!("https://login.microsoftonline.com/{tenant}/v2.0"),
        "request_uri_parameter_supported": false,
        "authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/authorize"),
        "device_authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/devicecode"),
        "http_logout_supported": true,
        "frontchannel_logout_supported": true,
        "end_session_endpoint": format!("{base}/{tenant}/oauth2/v2.0/logout"),
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid"],
        "tenant_region_scope": serde_json::Value::Null,
        "cloud_instance_name": "microsoftonline.com",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
    })
}

/// MSAL for Go's discovery answer, built from the name the connection is served under (never
/// from `Host`), with the tenant as the path named it (printable, bounded).
pub fn discovery(served_name: Option<&str>, tenant: &str, prefix: &str) -> Response<Body> {
    let host = served_name.unwrap_or("localhost");
    let base = format!("https://{host}{prefix}");
    json_value(
        StatusCode::OK,
        &discovery_document(&base, &printable(tenant, 100)),
    )
}

/// The answer to a request that is not a token request: the discovery document, or the
/// refusal its route calls for.
pub fn answer_other(
    route: Route,
    head: &http::request::Parts,
    served_name: Option<&str>,
) -> Result<Response<Body>> {
    match route {
        Route::Discovery { tenant, prefix } => Ok(discovery(served_name, &tenant, &prefix)),
        Route::MethodNotAllowed { allow } => Err(method_not_allowed(&head.method, allow)),
        Route::NotFound | Route::Token { .. } => Err(not_found(&head.method, head.uri.path())),
    }
}

pub fn not_found(method: &Method, path: &str) -> ProxyError {
    ProxyError::NotFound(format!(
        "{method} {} is not served here. This proxy answers the Entra token request \
         (POST <proxy url>/{{tenant}}/oauth2/v2.0/token) only; disable instance discovery \
         in the client.",
        printable(path, 120)
    ))
}

pub fn method_not_allowed(method: &Method, allow: Method) -> ProxyError {
    let description = if allow == Method::POST {
        format!("{method} is not allowed on the token endpoint: send a POST with a form body.")
    } else {
        format!("{method} is not allowed on the OpenID configuration: send a {allow}.")
    };
    ProxyError::MethodNotAllowed { allow, description }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "11111111-2222-3333-4444-555555555555";

    fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
        crate::http::form::form_encode(pairs.iter().copied()).into_bytes()
    }

    #[test]
    fn form_decode_borrows_plain_values_and_decodes_plus_and_percent() {
        assert!(matches!(
            form_decode("eyJhbGci.eyJ-_x"),
            Some(Cow::Borrowed(_))
        ));
        assert_eq!(form_decode("a+b%2Fc%3a").unwrap(), "a b/c:");
        // A '%' without two hex digits stays literal, as browsers and form_urlencoded do.
        assert_eq!(form_decode("100%").unwrap(), "100%");
        assert_eq!(form_decode("%zz%4").unwrap(), "%zz%4");
        assert_eq!(form_decode("%C3%A9").unwrap(), "é");
        // Decoded bytes that are not UTF-8 are refused rather than replaced.
        assert_eq!(form_decode("%FF"), None);
        assert_eq!(form_decode("%C3"), None);
    }

    proptest::proptest! {
        /// Our decoder agrees with the `form_urlencoded` crate on every input whose decoding is
        /// UTF-8, and refuses exactly the inputs that crate would have to repair.
        #[test]
        fn form_decode_matches_the_reference_decoder(raw in "([a-zA-Z0-9+%=&._~-]|%[0-9a-fA-F]{2}|é)*") {
            let reference: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            let ours: Vec<(String, Option<String>)> = form_pairs(&raw)
                .map(|(k, v)| (k.into_owned(), form_decode(v).map(Cow::into_owned)))
                .collect();
            proptest::prop_assert_eq!(reference.len(), ours.len());
            for ((rk, rv), (ok, ov)) in reference.iter().zip(&ours) {
                if !rk.contains(char::REPLACEMENT_CHARACTER) {
                    proptest::prop_assert_eq!(rk, ok);
                }
                match ov {
                    Some(v) => proptest::prop_assert_eq!(rv, v),
                    None => proptest::prop_assert!(rv.contains(char::REPLACEMENT_CHARACTER)),
                }
            }
        }
    }

    #[test]
    fn token_response_json_is_what_serde_writes() {
        for token in [
            "eyJ0eXAiOiJKV1QifQ.e30.c2ln",
            "needs \"escaping\" \\ \n here",
            "",
        ] {
            for refresh_in in [None, Some(1799)] {
                let body = TokenResponse {
                    token_type: "Bearer",
                    expires_in: 3599,
                    ext_expires_in: 0,
                    refresh_in,
                    access_token: token,
                };
                assert_eq!(
                    String::from_utf8(body.to_json()).unwrap(),
                    serde_json::to_string(&body).unwrap()
                );
            }
        }
    }

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("grant_type", "client_credentials"),
            ("client_id", CID),
            ("scope", "https://vault.azure.net/.default"),
            ("client_assertion_type", ASSERTION_TYPE_JWT),
            ("client_assertion", "a.b.c\n"),
        ]
    }

    #[test]
    fn routes_every_request_shape_seen_in_the_wild() {
        let tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        assert_eq!(
            route(&Method::POST, &format!("/{tenant}/oauth2/v2.0/token")),
            Route::Token {
                tenant: Some(tenant.into())
            }
        );
        assert_eq!(
            route(
                &Method::POST,
                &format!("/prefix/path/{tenant}/oauth2/v2.0/token")
            ),
            Route::Token {
                tenant: Some(tenant.into())
            }
        );
        assert_eq!(route(&Method::POST, "/"), Route::Token { tenant: None });
        assert_eq!(
            route(&Method::POST, "/some/path"),
            Route::Token { tenant: None }
        );
        assert_eq!(
            route(
                &Method::GET,
                &format!("/{tenant}/v2.0/.well-known/openid-configuration")
            ),
            Route::Discovery {
                tenant: tenant.into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            route(&Method::GET, "/common/discovery/instance"),
            Route::NotFound
        );
        assert_eq!(
            route(&Method::GET, &format!("/{tenant}/oauth2/v2.0/token")),
            Route::MethodNotAllowed {
                allow: Method::POST
            }
        );
        assert_eq!(
            route(
                &Method::POST,
                &format!("/{tenant}/v2.0/.well-known/openid-configuration")
            ),
            Route::MethodNotAllowed { allow: Method::GET }
        );
    }

    #[test]
    fn parses_body_and_trims_the_assertion() {
        let req = parse(None, None, &form(&good())).unwrap();
        assert_eq!(req.client_id, CID);
        assert_eq!(req.assertion, "a.b.c");
        assert_eq!(req.scope, "https://vault.azure.net/.default");
        assert!(req.claims.is_none());
    }

    #[test]
    fn a_repeated_form_reads_as_it_did_and_any_change_is_read_afresh() {
        let a = form(&good());
        let mut other_scope = good();
        other_scope[2].1 = "https://storage.azure.com/.default";
        let b = form(&other_scope);
        let mut bad = good();
        bad[0].1 = "password";
        let bad = form(&bad);
        let q = String::from_utf8(a.clone()).unwrap();
        let tenant = || Some("contoso.onmicrosoft.com".to_string());
        let fresh = |t: Option<String>, q: Option<&str>, body: &[u8]| parse_form(t, q, body);
        // Each request twice in a row (the second recalled), and each after another.
        let cases: [(Option<String>, Option<&str>, &[u8]); 7] = [
            (None, None, &a),
            (tenant(), None, &a),
            (None, None, &b),
            (None, Some(&q), b""),
            (None, Some("grant_type=x"), b""),
            (None, None, &bad),
            (None, None, &a),
        ];
        for (t, q, body) in cases.iter().chain(cases.iter().rev()) {
            for _ in 0..2 {
                let got = parse(t.clone(), *q, body).map_err(|e| e.to_string());
                let want = fresh(t.clone(), *q, body).map_err(|e| e.to_string());
                assert_eq!(got, want, "{t:?} {q:?} {:?}", String::from_utf8_lossy(body));
            }
        }
    }

    #[test]
    fn query_is_used_only_when_the_body_is_empty() {
        let q = String::from_utf8(form(&good())).unwrap();
        let req = parse(None, Some(&q), b"").unwrap();
        assert_eq!(req.client_id, CID);
        // A body wins, and the query is not merged into it.
        let mut partial = good();
        partial.retain(|(k, _)| *k != "scope");
        let err = parse(None, Some(&q), &form(&partial)).unwrap_err();
        assert!(err.to_string().contains("'scope'"), "{err}");
    }

    #[test]
    fn duplicated_parameters_are_refused() {
        let mut pairs = good();
        pairs.push(("client_id", "99999999-2222-3333-4444-555555555555"));
        let err = parse(None, None, &form(&pairs)).unwrap_err();
        assert!(err.to_string().contains("more than once"), "{err}");
    }

    #[test]
    fn percent_encoded_invalid_utf8_is_refused() {
        let body = b"grant_type=client_credentials&client_id=%FF%FE&scope=x";
        let err = parse(None, None, body).unwrap_err();
        assert!(
            err.to_string().contains("'client_id' is not valid UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut pairs = good();
        pairs.push(("x-client-SKU", "MSAL.Python"));
        pairs.push(("client-request-id", "abc"));
        assert!(parse(None, None, &form(&pairs)).is_ok());
    }

    #[test]
    fn non_guid_client_ids_are_refused() {
        for bad in ["*", "../etc", "", "not-a-guid", &"a".repeat(10_000)] {
            let mut pairs = good();
            pairs.retain(|(k, _)| *k != "client_id");
            pairs.push(("client_id", bad));
            let err = parse(None, None, &form(&pairs)).unwrap_err();
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn scopes_are_canonical_and_must_be_default_scopes() {
        assert_eq!(
            canonical_scopes(" https://B/.default \t https://a/.default https://b/.DEFAULT\n")
                .unwrap(),
            "https://a/.default https://b/.default"
        );
        // Scheme and host are lower-cased; the path keeps its spelling (it becomes `aud`).
        assert_eq!(
            canonical_scopes("HTTPS://Contoso.COM/MyApi/.Default").unwrap(),
            "https://contoso.com/MyApi/.default"
        );
        assert_eq!(
            canonical_scopes("API://MyApp/.default").unwrap(),
            "api://myapp/.default"
        );
        assert_eq!(
            canonical_scopes("00000003-0000-0000-C000-000000000000/.default").unwrap(),
            "00000003-0000-0000-c000-000000000000/.default"
        );
        assert!(matches!(
            canonical_scopes("https://management.azure.com/.default"),
            Ok(s) if s == "https://management.azure.com/.default"
        ));
        assert!(canonical_scopes("https://graph.microsoft.com/User.Read").is_err());
        assert!(canonical_scopes("/.default").is_err());
        let many = (0..100)
            .map(|i| format!("https://r{i}/.default"))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(canonical_scopes(&many).is_err());
        // MSAL for Go's OpenID Connect scopes are dropped; alone they are no app scope.
        assert_eq!(
            canonical_scopes("https://vault.azure.net/.default openid offline_access profile")
                .unwrap(),
            "https://vault.azure.net/.default"
        );
        for oidc in ["openid", "openid profile", " offline_access "] {
            let err = canonical_scopes(oidc).unwrap_err();
            assert!(
                err.to_string().contains("is not a '<resource>/.default'"),
                "{err}"
            );
        }
        // Repetition is not "many scopes": one scope sent 100 times is one scope.
        let repeated = vec!["https://a/.default"; 100].join(" ");
        assert_eq!(canonical_scopes(&repeated).unwrap(), "https://a/.default");
    }

    #[test]
    fn scopes_with_non_ascii_or_control_characters_are_refused_by_name() {
        for bad in [
            "\u{a0}https://management.azure.com/.default",
            "\u{2003}https://management.azure.com/.default",
            "https://management.azure.com/.default\u{200b}",
            "https://managem\u{0435}nt.azure.com/.default",
            "https://management.azure.com/.default\u{0}",
            "\u{1b}https://management.azure.com/.default",
        ] {
            let err = canonical_scopes(bad).unwrap_err();
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad:?}");
            assert!(err.to_string().contains("U+"), "{err}");
        }
    }

    #[test]
    fn wrong_grant_and_assertion_type_are_refused() {
        let mut pairs = good();
        pairs[0] = ("grant_type", "password");
        assert!(matches!(
            parse(None, None, &form(&pairs)),
            Err(ProxyError::UnsupportedGrant(_))
        ));
        let mut pairs = good();
        pairs[3] = ("client_assertion_type", "urn:other");
        assert_eq!(parse(None, None, &form(&pairs)).unwrap_err().status(), 400);
    }

    #[test]
    fn content_type_must_be_form() {
        assert!(
            check_content_type(Some("application/x-www-form-urlencoded;charset=utf-8")).is_ok()
        );
        assert!(check_content_type(Some("application/json")).is_err());
        assert!(check_content_type(None).is_err());
    }

    #[test]
    fn only_a_served_route_with_a_valid_tenant_is_a_logged_path() {
        let tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        let token = format!("/{tenant}/oauth2/v2.0/token");
        assert_eq!(routed_path(&token).as_deref(), Some(token.as_str()));
        let discovery = "/contoso.onmicrosoft.com/v2.0/.well-known/openid-configuration";
        assert_eq!(routed_path(discovery).as_deref(), Some(discovery));
        assert_eq!(routed_path("/").as_deref(), Some("/"));
        assert_eq!(
            routed_path(&format!("/secret-prefix{token}")).as_deref(),
            Some(format!("(prefix, 14 bytes){token}").as_str())
        );
        let jwt = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDpkZWZhdWx0In0";
        // An RS256 signature: 256 bytes, 342 characters (every segment of a real token is
        // longer than a DNS label, whether or not it holds a `_`).
        let jwt = format!("{jwt}.{}", "c2ln".repeat(85));
        for path in [
            format!("/token/{jwt}"),
            format!("/{jwt}/oauth2/v2.0/token"),
            format!("/{tenant}/oauth2/v2.0/token%3Fclient_assertion={jwt}"),
            format!("/x/oauth2/v2.0/token&client_assertion={jwt}"),
            "/oauth2/v2.0/token".to_string(),
        ] {
            assert_eq!(routed_path(&path), None, "{path}");
        }
    }

    #[test]
    fn printable_strips_control_characters_and_truncates() {
        assert_eq!(printable("a\r\nb", 10), "ab");
        assert_eq!(printable("abcdef", 3), "abc…");
    }
}
