//! Step 5b: the token exchange with Entra. `POST {authority}/{tenant}/oauth2/v2.0/token` with our
//! own assertion. Transient failures (network errors, 5xx) are retried a bounded number of
//! times with jittered backoff; 429 is answered to the caller with Entra's `Retry-After`; an
//! error Entra returned is passed through with its status, codes and description. An identity
//! this proxy has not yet got a token for may have a FIC Entra has not applied yet: its
//! AADSTS70021 is retried a bounded number of times, and then says so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use http::{header, Request, StatusCode};
use http_body_util::Full;
use serde::Deserialize;

use crate::exchange::bindings::Bindings;
use crate::exchange::cache::{CacheKey, Fetch, IssuedToken, MAX_LIFETIME_SECS};
use crate::exchange::issuer::Issuer;
use crate::http::client::{fetch, HttpClient};
use crate::http::form::form_encode;
use crate::request::error::{ProxyError, Result};
use crate::request::oauth::ErrorBody;
use crate::request::token::{ASSERTION_TYPE_JWT, GRANT_CLIENT_CREDENTIALS};

/// Attempts for one exchange (1 + 2 retries): enough to ride over a blip, few enough that a
/// real outage answers the caller within seconds.
const MAX_ATTEMPTS: u32 = 3;
/// First backoff; doubled per retry, with ±50 % jitter so a fleet does not retry in step.
const BACKOFF: Duration = Duration::from_millis(200);
/// Largest token response accepted from Entra.
const MAX_RESPONSE: usize = 256 * 1024;
/// Entra's answer when no FIC matches the assertion, also while a new FIC propagates.
const NO_MATCHING_FIC: u64 = 70021;
/// How long after this proxy first asked for an identity its 70021 may still be propagation:
/// Entra applies a new FIC within minutes. Later, a 70021 is a misconfiguration, answered at
/// once instead of costing every request the retries.
const PROPAGATION_WINDOW: Duration = Duration::from_secs(600);

/// How an AADSTS70021 is retried for an identity without a token from this proxy yet. Entra
/// applies a new FIC after a delay (seconds to minutes) and answers 70021 meanwhile; Microsoft
/// tells callers to retry. Zero retries answers at once (with the hint).
#[derive(Clone, Debug)]
pub struct FicPropagation {
    pub retries: u32,
    /// First wait; doubled per retry, with ±50 % jitter.
    pub backoff: Duration,
}

impl Default for FicPropagation {
    fn default() -> Self {
        Self {
            retries: 0,
            backoff: Duration::from_secs(1),
        }
    }
}

/// Entra sends these as integers, but older endpoints sent strings: accept both.
#[derive(Deserialize)]
struct RawToken {
    access_token: String,
    #[serde(deserialize_with = "int_or_string")]
    expires_in: u64,
    #[serde(default, deserialize_with = "opt_int_or_string")]
    ext_expires_in: Option<u64>,
    #[serde(default, deserialize_with = "opt_int_or_string")]
    refresh_in: Option<u64>,
}

fn int_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        I(u64),
        S(String),
    }
    match V::deserialize(d)? {
        V::I(i) => Ok(i),
        V::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

fn opt_int_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    int_or_string(d).map(Some)
}

pub struct Exchange<'a> {
    /// The authority host, e.g. `https://login.microsoftonline.com`.
    pub authority: &'a str,
    pub tenant: &'a str,
    pub client_id: &'a str,
    pub scope: &'a str,
    pub assertion: &'a str,
    pub claims: Option<&'a str>,
}

pub struct EntraClient {
    http: HttpClient,
    timeout: Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    fic_propagation: FicPropagation,
    /// Per client-id: when this proxy first asked Entra for it, and whether Entra issued a
    /// token since (then its FIC has propagated, and a 70021 is a real mismatch). Bounded by
    /// the bound identities.
    seen: std::sync::Mutex<std::collections::HashMap<String, (Instant, bool)>>,
}

impl EntraClient {
    pub fn new(
        http: HttpClient,
        timeout: Duration,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            http,
            timeout,
            metrics,
            fic_propagation: FicPropagation::default(),
            seen: Default::default(),
        }
    }

    /// Retries AADSTS70021 for identities without a token yet, as `config` says.
    pub fn with_fic_propagation(mut self, config: FicPropagation) -> Self {
        self.fic_propagation = config;
        self
    }

    /// Whether a 70021 for `client_id` may be a FIC still propagating: no token yet, and
    /// first asked for within [`PROPAGATION_WINDOW`].
    fn may_be_propagating(&self, client_id: &str, now: Instant) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (first, served) = *seen.entry(client_id.to_string()).or_insert((now, false));
        !served && now.saturating_duration_since(first) < PROPAGATION_WINDOW
    }

    fn record_token(&self, client_id: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.entry(client_id.to_string())
            .or_insert((Instant::now(), true))
            .1 = true;
    }

    /// One exchange; while the identity has had no token from this proxy and was first asked
    /// for less than 10 minutes ago, a 70021 (the FIC may still be propagating) is retried with
    /// backoff, and the final one says so.
    pub async fn exchange(&self, ex: &Exchange<'_>) -> Result<IssuedToken, ProxyError> {
        self.exchange_retrying(ex)
            .await
            .map_err(|e| with_presented(e, ex))
    }

    async fn exchange_retrying(&self, ex: &Exchange<'_>) -> Result<IssuedToken, ProxyError> {
        let mut retries = 0;
        loop {
            let outcome = self.exchange_once(ex).await;
            match outcome {
                Ok(token) => {
                    self.record_token(ex.client_id);
                    return Ok(token);
                }
                Err(e)
                    if is_no_matching_fic(&e)
                        && self.may_be_propagating(ex.client_id, Instant::now()) =>
                {
                    if retries >= self.fic_propagation.retries {
                        return Err(with_propagation_hint(e));
                    }
                    retries += 1;
                    let wait = self.fic_propagation.backoff * 2u32.saturating_pow(retries - 1);
                    tracing::info!(
                        client_id = ex.client_id,
                        retry = retries,
                        "Entra found no matching FIC for an identity without a token yet; the FIC may still be propagating, retrying"
                    );
                    tokio::time::sleep(wait.mul_f64(rand::random_range(0.5..1.5))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn exchange_once(&self, ex: &Exchange<'_>) -> Result<IssuedToken, ProxyError> {
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            ex.authority.trim_end_matches('/'),
            ex.tenant
        );
        let mut form = vec![
            ("grant_type", GRANT_CLIENT_CREDENTIALS),
            ("client_id", ex.client_id),
            ("scope", ex.scope),
            ("client_assertion_type", ASSERTION_TYPE_JWT),
            ("client_assertion", ex.assertion),
        ];
        if let Some(claims) = ex.claims {
            form.push(("claims", claims));
        }
        let body = Bytes::from(form_encode(form));
        let mut attempt = 0;
        let started = Instant::now();
        loop {
            attempt += 1;
            let outcome = self.attempt(&url, body.clone()).await;
            let retryable = matches!(&outcome, Err(ProxyError::Unavailable { .. }));
            let base = BACKOFF * 2u32.pow(attempt - 1);
            // The whole exchange stays within two timeouts: a caller (and the SDK's own retry)
            // is better served by a prompt 503 than by a third stalled attempt.
            let over_budget = started.elapsed() + base >= self.timeout * 2;
            if !retryable || attempt >= MAX_ATTEMPTS || over_budget {
                return outcome;
            }
            let jitter = rand::random_range(0.5..1.5);
            tokio::time::sleep(base.mul_f64(jitter)).await;
        }
    }

    async fn attempt(&self, url: &str, body: Bytes) -> Result<IssuedToken, ProxyError> {
        let req = Request::post(url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(body))
            .map_err(|e| ProxyError::Internal(format!("building the Entra request: {e}")))?;
        let started = Instant::now();
        let result = fetch(&self.http, req, self.timeout, MAX_RESPONSE).await;
        self.metrics
            .entra_duration
            .observe(started.elapsed().as_secs_f64());
        let status = result.as_ref().map_or("error", |f| status_label(f.status));
        self.metrics
            .entra_requests
            .with_label_values(&[status])
            .inc();
        let fetched = result.map_err(|e| ProxyError::Unavailable {
            retry_after: 5,
            description: format!("Entra could not be reached at {url}: {e}. Retry shortly."),
        })?;
        if fetched.status == StatusCode::OK {
            return parse_token(&fetched.body, Instant::now());
        }
        let refused = refusal(fetched.status, &fetched.headers, &fetched.body);
        if let ProxyError::Upstream { body, .. } = &refused {
            self.metrics
                .entra_refusals
                .with_label_values(&[refusal_label(&body.error_codes)])
                .inc();
        }
        Err(refused)
    }
}

/// What an answer other than 200 means for the caller: throttling and outages with the
/// `Retry-After` to honour, Entra's own refusals passed through, anything else a bad gateway.
fn refusal(status: StatusCode, headers: &http::HeaderMap, body: &[u8]) -> ProxyError {
    // Entra's own, else ours: a caller always learns when to come back.
    let retry_after = retry_after_secs(headers).unwrap_or(5);
    let entra_error = serde_json::from_slice::<ErrorBody>(body).ok();
    // Entra's own words, first line only, between `open` and `close`.
    let says = |open: &str, close: &str| {
        let first = entra_error
            .as_ref()
            .map(|e| first_line(&e.error_description));
        first
            .map(|d| format!("{open}{d}{close}"))
            .unwrap_or_default()
    };
    if status == StatusCode::TOO_MANY_REQUESTS {
        return ProxyError::Throttled {
            retry_after,
            description: format!(
                "Entra is throttling token requests for this identity{}. Retry after the \
                 Retry-After interval.",
                says(" (", ")")
            ),
        };
    }
    if status.is_server_error() {
        return ProxyError::Unavailable {
            retry_after,
            description: format!("Entra answered {status}{}. Retry shortly.", says(": ", "")),
        };
    }
    match entra_error {
        Some(body) if status.is_client_error() => ProxyError::Upstream {
            status,
            body: Box::new(body),
        },
        _ => ProxyError::BadUpstream(format!(
            "Entra answered {status} with a body that is not an Entra error."
        )),
    }
}

/// Reads Entra's 200 answer. Lifetimes must be positive; above [`MAX_LIFETIME_SECS`] they are
/// clamped (and `refresh_in` to the lifetime), so a wrong value upstream cannot panic the
/// proxy or keep a token past its real expiry by more than that bound.
pub fn parse_token(body: &[u8], received: Instant) -> Result<IssuedToken, ProxyError> {
    let raw: RawToken = serde_json::from_slice(body).map_err(|e| {
        ProxyError::BadUpstream(format!(
            "Entra answered 200 but not with a token response ({e}). Retry later; if it \
             persists, check --authority-host."
        ))
    })?;
    if raw.access_token.is_empty() || raw.expires_in == 0 {
        return Err(ProxyError::BadUpstream(
            "Entra answered a token response without a usable access token or lifetime.".into(),
        ));
    }
    let expires_in = raw.expires_in.min(MAX_LIFETIME_SECS);
    if expires_in != raw.expires_in {
        tracing::warn!(
            expires_in = raw.expires_in,
            clamped = expires_in,
            "Entra answered a lifetime over 24 h; clamped"
        );
    }
    Ok(IssuedToken {
        access_token: raw.access_token.into(),
        expires_in,
        ext_expires_in: raw
            .ext_expires_in
            .unwrap_or(expires_in)
            .min(MAX_LIFETIME_SECS),
        refresh_in: raw.refresh_in.map(|r| r.min(expires_in)),
        received,
    })
}

/// `Retry-After` in whole seconds (the form Entra sends).
fn retry_after_secs(headers: &http::HeaderMap) -> Option<u64> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse().ok()
}

fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s if (400..500).contains(&s) => "4xx",
        s if (500..600).contains(&s) => "5xx",
        // Not an answer Entra gives: bounded all the same.
        _ => "other",
    }
}

fn is_no_matching_fic(e: &ProxyError) -> bool {
    matches!(e, ProxyError::Upstream { body, .. } if body.error_codes.contains(&NO_MATCHING_FIC))
}

/// Entra's 70021 for an identity without a token yet, with what it may mean added to its
/// description (its codes, status and the rest of its words untouched).
fn with_propagation_hint(e: ProxyError) -> ProxyError {
    match e {
        ProxyError::Upstream { status, mut body } => {
            body.error_description = format!(
                "{} (identity-binding-proxy: this identity has had no token through this proxy \
                 yet, and Entra applies a newly created federated identity credential only \
                 after a delay of up to a few minutes: if the FIC was just created, it may \
                 still be propagating; retry in a minute.)",
                body.error_description
            );
            ProxyError::Upstream { status, body }
        }
        other => other,
    }
}

/// The AADSTS codes the refusal metric names (a bounded set: Entra's codes come from
/// upstream), the last one for every other code.
pub const REFUSAL_LABELS: [&str; 8] = [
    "70021", "700211", "700212", "700213", "7002138", "7000272", "700024", "other",
];

fn refusal_label(codes: &[u64]) -> &'static str {
    let named = codes.iter().find_map(|c| {
        let c = c.to_string();
        REFUSAL_LABELS.iter().find(|l| **l == c).copied()
    });
    named.unwrap_or("other")
}

/// Entra's answers that mean what the proxy presented does not match what Entra holds: no
/// matching FIC (70021), its issuer (700211), audience (700212) or subject (700213, 7002138:
/// differing only in case), or a key Entra cannot find in the issuer's JWKS (7000272).
const PRESENTED_MISMATCH: [u64; 6] = [70021, 700211, 700212, 700213, 7002138, 7000272];

/// Entra's refusal of our assertion, with what the proxy presented added to its description
/// and logged: the assertion's issuer, subject, audience and key id (read back from its header
/// and claims; the assertion itself is never shown) — the facts to compare with the FIC and
/// the published issuer, which `doctor` does.
fn with_presented(e: ProxyError, ex: &Exchange<'_>) -> ProxyError {
    let ProxyError::Upstream { status, mut body } = e else {
        return e;
    };
    let Some(code) = body
        .error_codes
        .iter()
        .copied()
        .find(|c| PRESENTED_MISMATCH.contains(c))
    else {
        return ProxyError::Upstream { status, body };
    };
    let Some(p) = presented(ex.assertion) else {
        return ProxyError::Upstream { status, body };
    };
    tracing::warn!(
        client_id = ex.client_id,
        aadsts = code,
        issuer = %p.issuer,
        subject = %p.subject,
        audience = %p.audience,
        kid = %p.kid,
        "Entra refused the proxy's assertion (AADSTS{code}): it holds no FIC or key matching what \
         was presented; run `identity-binding-proxy doctor` to compare them"
    );
    body.error_description = format!(
        "{} (identity-binding-proxy presented: issuer '{}', subject '{}', audience '{}', key id \
         '{}'. The managed identity's federated credential must hold exactly this issuer, \
         subject and audience, and the issuer's published JWKS this key: run \
         `identity-binding-proxy doctor` to compare them.)",
        body.error_description, p.issuer, p.subject, p.audience, p.kid
    );
    ProxyError::Upstream { status, body }
}

/// The facts of one of our assertions that Entra matches.
struct Presented {
    issuer: String,
    subject: String,
    audience: String,
    kid: String,
}

/// Reads our own assertion's header and claims back (base64url JSON; no signature check: it is
/// ours, and only its facts are shown).
fn presented(assertion: &str) -> Option<Presented> {
    use base64::Engine;
    let mut parts = assertion.split('.');
    let mut part = || -> Option<serde_json::Value> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts.next()?)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let (header, claims) = (part()?, part()?);
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let audience = match &claims["aud"] {
        serde_json::Value::Array(a) => a.iter().filter_map(text).collect::<Vec<_>>().join(", "),
        other => text(other)?,
    };
    Some(Presented {
        issuer: text(&claims["iss"])?,
        subject: text(&claims["sub"])?,
        audience,
        kid: text(&header["kid"]).unwrap_or_default(),
    })
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal_with(code: u64) -> ProxyError {
        ProxyError::Upstream {
            status: StatusCode::UNAUTHORIZED,
            body: Box::new(crate::request::oauth::ErrorBody {
                error: "invalid_client".into(),
                error_description: format!("AADSTS{code}: Entra's own words."),
                error_codes: vec![code],
                timestamp: String::new(),
                trace_id: String::new(),
                correlation_id: String::new(),
                error_uri: None,
            }),
        }
    }

    #[test]
    fn a_fic_or_key_refusal_names_what_was_presented_and_doctor_but_never_the_assertion() {
        let key = crate::exchange::keys::SigningKey::generate(2048).unwrap();
        let assertion = key
            .sign(
                &serde_json::json!({"iss": "https://issuer.example/t/c", "sub": "My-Identity",
                "aud": "api://AzureADTokenExchange", "exp": 1, "iat": 0}),
            )
            .unwrap();
        let ex = Exchange {
            authority: "https://login.microsoftonline.com",
            tenant: "t",
            client_id: "c",
            scope: "s/.default",
            assertion: &assertion,
            claims: None,
        };
        for code in PRESENTED_MISMATCH {
            let ProxyError::Upstream { body, status } = with_presented(refusal_with(code), &ex)
            else {
                panic!("still Entra's refusal");
            };
            assert_eq!(
                (status, &body.error_codes[..]),
                (StatusCode::UNAUTHORIZED, &[code][..])
            );
            let d = &body.error_description;
            assert!(
                d.starts_with(&format!("AADSTS{code}: Entra's own words. (")),
                "{d}"
            );
            for fact in [
                "issuer 'https://issuer.example/t/c'",
                "subject 'My-Identity'",
                "audience 'api://AzureADTokenExchange'",
                &format!("key id '{}'", key.kid()),
                "`identity-binding-proxy doctor`",
            ] {
                assert!(d.contains(fact), "{code}: {fact} missing from {d}");
            }
            assert!(!d.contains(&assertion), "never the assertion");
        }
        // Other refusals are passed through untouched.
        let ProxyError::Upstream { body, .. } = with_presented(refusal_with(50034), &ex) else {
            panic!("still Entra's refusal");
        };
        assert_eq!(body.error_description, "AADSTS50034: Entra's own words.");
    }

    #[test]
    fn a_70021_may_be_propagation_only_before_a_token_and_within_ten_minutes() {
        let client = EntraClient::new(
            crate::http::client::client(),
            Duration::from_secs(1),
            Arc::new(crate::metrics::Metrics::new()),
        );
        let t0 = Instant::now();
        assert!(client.may_be_propagating("new", t0));
        assert!(client.may_be_propagating("new", t0 + Duration::from_secs(599)));
        assert!(
            !client.may_be_propagating("new", t0 + Duration::from_secs(600)),
            "ten minutes after the first request it is a misconfiguration"
        );
        assert!(client.may_be_propagating("served", t0));
        client.record_token("served");
        assert!(!client.may_be_propagating("served", t0));
        let hinted = with_propagation_hint(ProxyError::Upstream {
            status: StatusCode::UNAUTHORIZED,
            body: Box::new(ErrorBody::new(
                "unauthorized_client",
                &[70021],
                "AADSTS70021: No matching federated identity record found.",
                "c",
            )),
        });
        assert!(is_no_matching_fic(&hinted));
        let ProxyError::Upstream { body, .. } = hinted else {
            panic!("still Entra's refusal")
        };
        assert!(body
            .error_description
            .starts_with("AADSTS70021: No matching federated identity record found. ("));
        assert!(body.error_description.contains("may still be propagating"));
    }

    #[test]
    fn status_labels_are_bounded_and_name_their_class() {
        let label = |s| status_label(StatusCode::from_u16(s).unwrap());
        assert_eq!(label(429), "429");
        assert_eq!(label(418), "4xx");
        assert_eq!(label(599), "5xx");
        assert_eq!(label(302), "other");
        assert_eq!(label(101), "other");
    }

    #[test]
    fn absurd_lifetimes_are_clamped_and_zero_is_refused() {
        let now = Instant::now();
        let t = parse_token(
            br#"{"access_token":"x","expires_in":18446744073709551615,"ext_expires_in":18446744073709551615,"refresh_in":18446744073709551615}"#,
            now,
        )
        .unwrap();
        assert_eq!(
            (t.expires_in, t.ext_expires_in, t.refresh_in),
            (
                MAX_LIFETIME_SECS,
                MAX_LIFETIME_SECS,
                Some(MAX_LIFETIME_SECS)
            )
        );
        assert!(t.remaining() <= Duration::from_secs(MAX_LIFETIME_SECS));
        let zero = parse_token(br#"{"access_token":"x","expires_in":0}"#, now).unwrap_err();
        assert_eq!(zero.status(), 502);
        let negative = parse_token(br#"{"access_token":"x","expires_in":-5}"#, now).unwrap_err();
        assert_eq!(negative.status(), 502);
    }

    #[test]
    fn token_fields_accept_integers_and_strings() {
        let t: RawToken = serde_json::from_str(
            r#"{"access_token":"x","expires_in":"3599","ext_expires_in":3599}"#,
        )
        .unwrap();
        assert_eq!(
            (t.expires_in, t.ext_expires_in, t.refresh_in),
            (3599, Some(3599), None)
        );
    }
}
