//! Local JWT checks of a service-account token: the JOSE header read before anything else
//! (refusing `none` and HMAC), then signature, `iss`, `aud`, `exp`/`nbf` and the
//! `kubernetes.io` claims against the cluster's keys; each failure named for the caller.
//! Also here: the memory of tokens that passed, each kept until its own expiry.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::jwks::KeyChange;
use super::Caller;
use crate::expiry::OwnLifetime;
use crate::request::error::{codes, ProxyError, Result};

/// Clock skew tolerated on `exp`/`nbf`, as the apiserver does for projected tokens.
const LEEWAY_SECS: u64 = 30;

#[derive(Deserialize)]
struct SaClaims {
    sub: String,
    /// Checked by the JWT library; typed here so that an expiry that is not a number is
    /// refused as unreadable rather than reported missing.
    #[serde(rename = "exp")]
    _exp: u64,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubeClaims>,
}

#[derive(Deserialize)]
struct KubeClaims {
    namespace: String,
    serviceaccount: NamedRef,
    pod: Option<NamedRef>,
}

#[derive(Deserialize)]
struct NamedRef {
    name: String,
    #[serde(default)]
    uid: String,
}

/// The JOSE header fields read before verification.
#[derive(Debug)]
pub struct PreHeader {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// Reads the JOSE header before any verification, to refuse `none` and HMAC outright with a
/// clear message (jsonwebtoken would only say "invalid algorithm"). Public for the fuzzers.
pub fn pre_parse_header(token: &str) -> Result<PreHeader> {
    let not_jwt = || {
        ProxyError::invalid_assertion(
            "client_assertion is not a JWT. Send the projected service-account token from \
             AZURE_FEDERATED_TOKEN_FILE.",
        )
    };
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_jwt());
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(h.trim_end_matches('='))
        .map_err(|_| not_jwt())?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| not_jwt())?;
    let alg = header["alg"].as_str().unwrap_or("");
    let alg = match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        other => {
            return Err(ProxyError::invalid_assertion(format!(
                "The token's signing algorithm '{}' is refused: only asymmetric algorithms \
                 (RS256, ES256, ...) are accepted for service-account tokens.",
                crate::request::token::printable(other, 20)
            )))
        }
    };
    let kid = header["kid"].as_str().map(str::to_string);
    Ok(PreHeader { alg, kid })
}

/// Signature, issuer, audience and times of `token` checked with `key`; the caller its
/// `kubernetes.io` claims name.
pub(super) fn verify(
    token: &str,
    header: &PreHeader,
    key: &DecodingKey,
    issuer: &str,
    audience: &str,
) -> Result<Caller> {
    let mut validation = Validation::new(header.alg);
    validation.leeway = LEEWAY_SECS;
    validation.validate_nbf = true;
    validation.set_audience(&[audience]);
    validation.set_issuer(&[issuer]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<SaClaims>(token, key, &validation)
        .map_err(|e| describe_jwt_error(e, token, issuer, audience))?;
    caller_from_claims(&data.claims)
}

/// Why no key verifies this header: no `kid`, a `kid` we do not know, or a known key of
/// another algorithm family (an RSA key cannot check an ES256 signature). `keys_fresh`: the
/// latest JWKS fetch succeeded; `published_alg`: the algorithm of the key named by the `kid`.
pub(super) fn missing_key(
    header: &PreHeader,
    keys_fresh: bool,
    published_alg: Option<Algorithm>,
) -> ProxyError {
    if !keys_fresh {
        // The key may simply be new (rotation): refusing would make the SDK give up on
        // a token that is probably fine, so ask it to retry instead.
        return ProxyError::Unavailable {
            retry_after: 2,
            description: "The service-account token cannot be verified now: its signing key \
                          is not among the cluster keys this proxy holds, and the \
                          Kubernetes API server's JWKS (/openid/v1/jwks) cannot be fetched. \
                          Retry shortly."
                .into(),
        };
    }
    let Some(raw_kid) = header.kid.as_deref() else {
        return ProxyError::invalid_assertion(
            "The service-account token names no signing key (its header has no 'kid'), \
             and this cluster's service-account issuer has no key without one. Use the \
             token projected by this cluster (AZURE_FEDERATED_TOKEN_FILE).",
        );
    };
    let kid = crate::request::token::printable(raw_kid, 64);
    if let Some(key_alg) = published_alg {
        return ProxyError::invalid_assertion(format!(
            "The service-account token's algorithm '{:?}' does not match key '{kid}' of this \
             cluster's service-account issuer, which signs with {key_alg:?}. The token was \
             altered; use the unmodified token from AZURE_FEDERATED_TOKEN_FILE.",
            header.alg
        ));
    }
    ProxyError::invalid_assertion(format!(
        "The service-account token is signed with key '{kid}', which this cluster's \
         service-account issuer does not publish. Use a token projected by this cluster \
         (AZURE_FEDERATED_TOKEN_FILE), not one from another cluster."
    ))
}

fn expired(unverified: &serde_json::Value) -> ProxyError {
    let at = unverified["exp"].as_u64().map(|t| {
        let exp = UNIX_EPOCH + Duration::from_secs(t);
        format!(" at {}", crate::request::oauth::entra_timestamp(exp))
    });
    ProxyError::InvalidAssertion {
        code: codes::ASSERTION_EXPIRED,
        description: format!(
            "The service-account token expired{}. Kubelet rotates projected tokens: read \
             AZURE_FEDERATED_TOKEN_FILE again before each token request.",
            at.unwrap_or_default()
        ),
    }
}

fn missing_claim(claim: &str) -> ProxyError {
    ProxyError::invalid_assertion(format!(
        "The service-account token has no '{claim}' claim; it is not a projected \
         service-account token."
    ))
}

/// The claims are deserialized before jsonwebtoken checks required claims, so a missing claim
/// surfaces as a JSON error: name the claim instead, else say the token cannot be read.
fn unreadable(unverified: &serde_json::Value) -> ProxyError {
    let missing = ["exp", "iss", "aud", "sub"]
        .into_iter()
        .find(|c| unverified.is_object() && unverified.get(c).is_none());
    match missing {
        Some(claim) => missing_claim(claim),
        None => ProxyError::invalid_assertion(
            "The service-account token could not be read as a signed JWT. Send the \
             projected token from AZURE_FEDERATED_TOKEN_FILE as client_assertion.",
        ),
    }
}

fn describe_jwt_error(
    e: jsonwebtoken::errors::Error,
    token: &str,
    issuer: &str,
    audience: &str,
) -> ProxyError {
    use jsonwebtoken::errors::ErrorKind;
    let unverified = unverified_claims(token);
    match e.kind() {
        ErrorKind::ExpiredSignature => expired(&unverified),
        ErrorKind::ImmatureSignature => ProxyError::InvalidAssertion {
            code: codes::ASSERTION_EXPIRED,
            description: "The service-account token is not valid yet (nbf is in the future). Check the node's clock.".into(),
        },
        ErrorKind::InvalidAudience => ProxyError::invalid_assertion(format!(
            "The service-account token's audience {} does not include '{audience}'. Project \
             the token with audience '{audience}' (the workload identity webhook does this \
             for pods annotated for identity binding).",
            crate::request::token::printable(&unverified["aud"].to_string(), 200),
        )),
        ErrorKind::InvalidIssuer => ProxyError::invalid_assertion(format!(
            "The service-account token was issued by '{}', but this cluster's issuer is \
             '{}'. Use a token projected by this cluster.",
            crate::request::token::printable(unverified["iss"].as_str().unwrap_or("<none>"), 200),
            issuer
        )),
        ErrorKind::MissingRequiredClaim(claim) => missing_claim(claim),
        ErrorKind::InvalidSignature => ProxyError::invalid_assertion(
            "The service-account token's signature is not valid for this cluster's \
             service-account issuer key. Use the unmodified token from \
             AZURE_FEDERATED_TOKEN_FILE.",
        ),
        _ => unreadable(&unverified),
    }
}

fn caller_from_claims(claims: &SaClaims) -> Result<Caller> {
    let Some(k) = &claims.kubernetes else {
        return Err(ProxyError::invalid_assertion(
            "The token has no 'kubernetes.io' claim: it is not a service-account token.",
        ));
    };
    let expected_sub = format!(
        "system:serviceaccount:{}:{}",
        k.namespace, k.serviceaccount.name
    );
    if claims.sub != expected_sub {
        return Err(ProxyError::invalid_assertion(
            "The token's subject does not match its service account claims.",
        ));
    }
    let mut caller = Caller::new(&k.namespace, &k.serviceaccount.name, &k.serviceaccount.uid);
    if let Some(pod) = &k.pod {
        caller.pod_name = Some(pod.name.clone());
        caller.pod_uid = Some(pod.uid.clone());
    }
    Ok(caller)
}

/// The claims of a token without any verification: for error messages and TTLs only.
fn unverified_claims(token: &str) -> serde_json::Value {
    token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Remaining lifetime of a token by its unverified `exp` (it was verified or reviewed
/// already); zero without one.
pub(super) fn token_ttl(token: &str) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    unverified_claims(token)["exp"]
        .as_u64()
        .map(|exp| Duration::from_secs(exp.saturating_sub(now)))
        .unwrap_or_default()
}

/// A locally verified token: who, for how long, and the `kid` of the key that vouched for it.
#[derive(Clone)]
struct Verified {
    caller: Arc<Caller>,
    lifetime: Duration,
    /// When the token expires (the entry's deadline), for whatever is derived from it.
    until: Instant,
    kid: Option<Arc<str>>,
}

impl crate::expiry::Lifetime for Verified {
    fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

/// Callers whose tokens passed local verification, by SHA-256 of the token, each until the
/// token expires, with the `kid` of the key that verified them: a signature check costs
/// ~30 µs, more than the rest of a cache hit together.
pub(super) struct VerifiedTokens(moka::sync::Cache<[u8; 32], Verified>);

impl VerifiedTokens {
    pub(super) fn new() -> Self {
        Self(
            // Bounded: one entry per distinct live token on this node, for an hour at most.
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3600))
                .expire_after(OwnLifetime)
                .support_invalidation_closures()
                .build(),
        )
    }

    #[cfg(test)]
    fn get(&self, digest: &[u8; 32]) -> Option<Arc<Caller>> {
        self.0.get(digest).map(|v| v.caller)
    }

    /// The remembered caller and when its token expires.
    pub(super) fn get_until(&self, digest: &[u8; 32]) -> Option<(Arc<Caller>, Instant)> {
        self.0.get(digest).map(|v| (v.caller, v.until))
    }

    /// Remembers `caller` for `token` until the token's `exp`; returns that deadline.
    pub(super) fn remember(&self, digest: [u8; 32], token: &str, caller: Arc<Caller>) -> Instant {
        let kid = pre_parse_header(token)
            .ok()
            .and_then(|h| h.kid)
            .map(Arc::from);
        let lifetime = token_ttl(token);
        let until = Instant::now() + lifetime;
        self.0.insert(
            digest,
            Verified {
                caller,
                lifetime,
                until,
                kid,
            },
        );
        until
    }

    /// A key that left the JWKS (or changed under its kid) must not keep vouching for tokens
    /// it signed; tokens of the keys still published stay verified, so a refresh — which a
    /// forged kid can trigger — costs no signature checks.
    pub(super) fn forget(&self, change: KeyChange) {
        let (gone, unnamed): (HashSet<String>, bool) = match change {
            KeyChange::Issuer => return self.0.invalidate_all(),
            KeyChange::Keys { gone, unnamed } => (gone, unnamed),
        };
        let dropped = self.0.invalidate_entries_if(move |_, v| match &v.kid {
            Some(kid) => gone.contains(kid.as_ref()),
            None => unnamed,
        });
        if let Err(e) = dropped {
            tracing::warn!(error = %e, "dropping every verified token instead");
            self.0.invalidate_all();
        }
    }

    pub(super) fn count(&self) -> u64 {
        self.0.run_pending_tasks();
        self.0.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn none_and_hmac_are_refused_before_verification() {
        for alg in ["none", "HS256", "HS512", ""] {
            let token = format!(
                "{}.{}.",
                b64(&serde_json::json!({"alg": alg})),
                b64(&serde_json::json!({}))
            );
            let token = format!("{token}sig");
            let err = pre_parse_header(&token).err().unwrap();
            assert!(err.to_string().contains("refused"), "{alg}: {err}");
            assert_eq!(err.status(), 401);
        }
    }

    #[test]
    fn garbage_is_not_a_jwt() {
        for t in ["", "abc", "a.b", "a.b.c.d", "!!!.b.c", "e30.e30.x"] {
            let err = pre_parse_header(t).err().unwrap();
            assert_eq!(err.status(), 401, "{t}");
        }
    }

    #[test]
    fn caller_comes_from_kubernetes_claims() {
        let claims: SaClaims = serde_json::from_value(serde_json::json!({
            "sub": "system:serviceaccount:demo:app", "exp": 1,
            "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "app", "uid": "u1"},
                              "pod": {"name": "p", "uid": "u2"}}
        }))
        .unwrap();
        let c = caller_from_claims(&claims).unwrap();
        assert_eq!(c.username, "system:serviceaccount:demo:app");
        assert_eq!(
            c.groups,
            vec![
                "system:serviceaccounts",
                "system:serviceaccounts:demo",
                "system:authenticated"
            ]
        );
        assert_eq!(c.pod_name.as_deref(), Some("p"));
    }

    fn token(kid: Option<&str>, exp_in_secs: Option<u64>) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = match kid {
            Some(kid) => serde_json::json!({"alg": "RS256", "kid": kid}),
            None => serde_json::json!({"alg": "RS256"}),
        };
        let claims = match exp_in_secs {
            Some(s) => serde_json::json!({"exp": now + s}),
            None => serde_json::json!({}),
        };
        format!("{}.{}.sig", b64(&header), b64(&claims))
    }

    #[test]
    fn verified_tokens_are_forgotten_with_the_key_that_verified_them() {
        let memory = VerifiedTokens::new();
        let caller = Arc::new(Caller::new("demo", "app", "u1"));
        let (a, b, unnamed) = ([1; 32], [2; 32], [3; 32]);
        memory.remember(a, &token(Some("a"), Some(3600)), caller.clone());
        memory.remember(b, &token(Some("b"), Some(3600)), caller.clone());
        memory.remember(unnamed, &token(None, Some(3600)), caller.clone());
        assert_eq!(memory.get(&a), Some(caller.clone()));
        assert_eq!(memory.count(), 3);

        memory.forget(KeyChange::Keys {
            gone: HashSet::from(["a".to_string()]),
            unnamed: false,
        });
        assert!(
            memory.get(&a).is_none(),
            "key 'a' left: its token is checked again"
        );
        assert!(memory.get(&b).is_some());
        assert!(memory.get(&unnamed).is_some());

        memory.forget(KeyChange::Keys {
            gone: HashSet::new(),
            unnamed: true,
        });
        assert!(memory.get(&unnamed).is_none());
        assert!(memory.get(&b).is_some());

        memory.forget(KeyChange::Issuer);
        assert!(memory.get(&b).is_none());
        assert_eq!(memory.count(), 0);
    }

    #[test]
    fn a_token_without_time_left_is_not_remembered() {
        let memory = VerifiedTokens::new();
        let caller = Arc::new(Caller::new("demo", "app", "u1"));
        memory.remember([1; 32], &token(Some("a"), None), caller.clone());
        memory.remember([2; 32], &token(Some("a"), Some(0)), caller);
        assert!(memory.get(&[1; 32]).is_none());
        assert!(memory.get(&[2; 32]).is_none());
    }

    #[test]
    fn subject_must_agree_with_kubernetes_claims() {
        let claims: SaClaims = serde_json::from_value(serde_json::json!({
            "sub": "system:serviceaccount:kube-system:admin", "exp": 1,
            "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "app", "uid": "u1"}}
        }))
        .unwrap();
        assert!(caller_from_claims(&claims).is_err());
    }
}
