//! Every way a token request can fail, mapped once to the HTTP status, the Entra-shaped error
//! body, and the metric label.
//!
//! Descriptions are written for the person reading the SDK exception: they say what was wrong
//! and what to do. They never contain a token or an assertion.

use http::{header, HeaderValue, Response, StatusCode};

use crate::http::response::{json, Body};

use crate::request::oauth::ErrorBody;

/// AADSTS codes our own refusals carry, chosen to match what Entra says for the same mistake so
/// that operators can search for them.
pub mod codes {
    /// Entra: "The request body must contain the following parameter".
    pub const MISSING_PARAMETER: u64 = 900144;
    /// Entra: malformed request / invalid parameter value.
    pub const INVALID_REQUEST: u64 = 90014;
    /// Entra: unsupported grant type.
    pub const UNSUPPORTED_GRANT: u64 = 70003;
    /// Entra: client assertion failed validation.
    pub const INVALID_ASSERTION: u64 = 700027;
    /// Entra: client assertion outside its valid time range.
    pub const ASSERTION_EXPIRED: u64 = 700024;
    /// Entra: application not found in the directory (used for unbound identities).
    pub const UNKNOWN_CLIENT: u64 = 700016;
    /// Entra: invalid scope.
    pub const INVALID_SCOPE: u64 = 70011;
    /// Entra: tenant not found / wrong tenant.
    pub const TENANT_MISMATCH: u64 = 90002;
    /// Entra: the client is not authorized for this request.
    pub const UNAUTHORIZED: u64 = 700_030;
    /// Entra: service temporarily unavailable.
    pub const UNAVAILABLE: u64 = 50_196;
}

/// Every [`ProxyError::outcome`], and `success`: the `outcome` label's values.
pub const OUTCOMES: [&str; 13] = [
    "success",
    "invalid_request",
    "unauthenticated",
    "forbidden",
    "unbound",
    "upstream_error",
    "throttled",
    "over_budget",
    "request_timeout",
    "unavailable",
    "bad_upstream",
    "internal",
    "not_found",
];

/// A refusal or failure while serving a token request.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request itself is malformed (400 invalid_request).
    #[error("{description}")]
    InvalidRequest { code: u64, description: String },
    /// Not a client-credentials request (400 unsupported_grant_type).
    #[error("{0}")]
    UnsupportedGrant(String),
    /// The scope is not usable (400 invalid_scope).
    #[error("{0}")]
    InvalidScope(String),
    /// The service-account token is not valid (401 invalid_client).
    #[error("{description}")]
    InvalidAssertion { code: u64, description: String },
    /// Authenticated, but not allowed this identity (403 unauthorized_client).
    #[error("{0}")]
    Forbidden(String),
    /// The client-id is not bound to this cluster (403 unauthorized_client).
    #[error("{0}")]
    Unbound(String),
    /// Entra answered with an error: passed through with its own status and body.
    #[error("Entra refused the exchange: {}", .body.error_description)]
    Upstream {
        status: StatusCode,
        body: Box<ErrorBody>,
    },
    /// The caller (namespace/service account) spent its budget of cache misses or `claims`
    /// requests (429 with Retry-After).
    #[error("{description}")]
    OverBudget {
        retry_after: u64,
        description: String,
    },
    /// The request did not arrive in time (408).
    #[error("{0}")]
    RequestTimeout(String),
    /// Entra throttled us (429 with Retry-After).
    #[error("{description}")]
    Throttled {
        retry_after: u64,
        description: String,
    },
    /// A dependency (Entra or the apiserver) is unreachable or failing (503 with Retry-After).
    #[error("{description}")]
    Unavailable {
        retry_after: u64,
        description: String,
    },
    /// Entra answered something that is not a token response (502).
    #[error("{0}")]
    BadUpstream(String),
    /// Our own fault (500). Should not happen; logged loudly.
    #[error("{0}")]
    Internal(String),
    /// A path not served here (404).
    #[error("{0}")]
    NotFound(String),
    /// A served path with the wrong method (405); `allow` is the method it takes.
    #[error("{description}")]
    MethodNotAllowed {
        allow: http::Method,
        description: String,
    },
}

impl ProxyError {
    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::InvalidRequest {
            code: codes::INVALID_REQUEST,
            description: description.into(),
        }
    }

    pub fn missing(field: &str) -> Self {
        Self::InvalidRequest {
            code: codes::MISSING_PARAMETER,
            description: format!(
                "The request body must contain the following parameter: '{field}'. Send the \
                 standard Entra client-credentials form (grant_type, client_id, scope, \
                 client_assertion_type, client_assertion)."
            ),
        }
    }

    pub fn invalid_assertion(description: impl Into<String>) -> Self {
        Self::InvalidAssertion {
            code: codes::INVALID_ASSERTION,
            description: description.into(),
        }
    }

    /// A request that outlived the proxy's request timeout.
    pub fn timed_out() -> Self {
        Self::Unavailable {
            retry_after: 1,
            description: "The request took longer than the proxy's request timeout. Retry.".into(),
        }
    }

    /// The response for this error: its status, its Entra-shaped body with the request's
    /// correlation id, and the `Retry-After` or `Allow` (RFC 9110 §15.5.6) it calls for.
    pub fn response(&self, correlation_id: &str) -> Response<Body> {
        let mut response = json(self.status(), self.body(correlation_id).to_json());
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Self::MethodNotAllowed { allow, .. } = self {
            if let Ok(allow) = HeaderValue::from_str(allow.as_str()) {
                headers.insert(header::ALLOW, allow);
            }
        }
        response
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } | Self::UnsupportedGrant(_) | Self::InvalidScope(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::InvalidAssertion { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::Unbound(_) => StatusCode::FORBIDDEN,
            Self::Upstream { status, .. } => *status,
            Self::Throttled { .. } | Self::OverBudget { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadUpstream(_) => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// Seconds for a `Retry-After` header, where the client should retry.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Throttled { retry_after, .. }
            | Self::Unavailable { retry_after, .. }
            | Self::OverBudget { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The bounded `outcome` label of the request metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } | Self::UnsupportedGrant(_) | Self::InvalidScope(_) => {
                "invalid_request"
            }
            Self::InvalidAssertion { .. } => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::Unbound(_) => "unbound",
            Self::Upstream { .. } => "upstream_error",
            Self::Throttled { .. } => "throttled",
            Self::OverBudget { .. } => "over_budget",
            Self::RequestTimeout(_) => "request_timeout",
            Self::Unavailable { .. } => "unavailable",
            Self::BadUpstream(_) => "bad_upstream",
            Self::Internal(_) => "internal",
            Self::NotFound(_) | Self::MethodNotAllowed { .. } => "not_found",
        }
    }

    /// The Entra-shaped body for this error.
    pub fn body(&self, correlation_id: &str) -> ErrorBody {
        let (error, code) = match self {
            Self::InvalidRequest { code, .. } => ("invalid_request", *code),
            Self::UnsupportedGrant(_) => ("unsupported_grant_type", codes::UNSUPPORTED_GRANT),
            Self::InvalidScope(_) => ("invalid_scope", codes::INVALID_SCOPE),
            Self::InvalidAssertion { code, .. } => ("invalid_client", *code),
            Self::Forbidden(_) => ("unauthorized_client", codes::UNAUTHORIZED),
            Self::Unbound(_) => ("unauthorized_client", codes::UNKNOWN_CLIENT),
            Self::Upstream { body, .. } => {
                let mut body = (**body).clone();
                body.correlation_id = correlation_id.to_string();
                return body;
            }
            Self::Throttled { .. } | Self::OverBudget { .. } => {
                ("temporarily_unavailable", codes::UNAVAILABLE)
            }
            Self::RequestTimeout(_) => ("invalid_request", codes::INVALID_REQUEST),
            Self::Unavailable { .. } => ("temporarily_unavailable", codes::UNAVAILABLE),
            Self::BadUpstream(_) | Self::Internal(_) => ("server_error", codes::UNAVAILABLE),
            Self::NotFound(_) | Self::MethodNotAllowed { .. } => {
                ("invalid_request", codes::INVALID_REQUEST)
            }
        };
        ErrorBody::new(
            error,
            &[code],
            format!("identity-binding-proxy: {self}"),
            correlation_id,
        )
    }
}

pub type Result<T, E = ProxyError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_entra_contract() {
        assert_eq!(ProxyError::missing("scope").status(), 400);
        assert_eq!(ProxyError::invalid_assertion("x").status(), 401);
        assert_eq!(ProxyError::Forbidden("x".into()).status(), 403);
        assert_eq!(ProxyError::Unbound("x".into()).status(), 403);
        let t = ProxyError::Throttled {
            retry_after: 3,
            description: "slow down".into(),
        };
        assert_eq!(
            (t.status(), t.retry_after()),
            (StatusCode::TOO_MANY_REQUESTS, Some(3))
        );
        assert_eq!(ProxyError::BadUpstream("x".into()).status(), 502);
    }

    #[test]
    fn every_outcome_has_its_series() {
        let every = [
            ProxyError::missing("x"),
            ProxyError::UnsupportedGrant("x".into()),
            ProxyError::invalid_assertion("x"),
            ProxyError::Forbidden("x".into()),
            ProxyError::Unbound("x".into()),
            ProxyError::Upstream {
                status: StatusCode::BAD_REQUEST,
                body: Box::new(ErrorBody::new("invalid_request", &[1], "x", "x")),
            },
            ProxyError::Throttled {
                retry_after: 1,
                description: "x".into(),
            },
            ProxyError::OverBudget {
                retry_after: 1,
                description: "x".into(),
            },
            ProxyError::RequestTimeout("x".into()),
            ProxyError::timed_out(),
            ProxyError::BadUpstream("x".into()),
            ProxyError::Internal("x".into()),
            ProxyError::NotFound("x".into()),
        ];
        for e in every {
            assert!(OUTCOMES.contains(&e.outcome()), "{}", e.outcome());
        }
    }

    #[test]
    fn responses_carry_their_headers_and_correlation_id() {
        let throttled = ProxyError::Throttled {
            retry_after: 7,
            description: "slow down".into(),
        }
        .response("corr-1");
        assert_eq!(throttled.status(), 429);
        assert_eq!(throttled.headers()[header::RETRY_AFTER], "7");
        assert!(throttled.headers().get(header::ALLOW).is_none());
        let wrong_method = ProxyError::MethodNotAllowed {
            allow: http::Method::GET,
            description: "use GET".into(),
        }
        .response("corr-2");
        assert_eq!(wrong_method.status(), 405);
        assert_eq!(wrong_method.headers()[header::ALLOW], "GET");
        let timed_out = ProxyError::timed_out().response("corr-3");
        assert_eq!(
            (
                timed_out.status(),
                &timed_out.headers()[header::RETRY_AFTER]
            ),
            (StatusCode::SERVICE_UNAVAILABLE, &HeaderValue::from(1))
        );
    }

    #[test]
    fn upstream_errors_keep_entra_codes_and_description() {
        let upstream = ErrorBody::new("invalid_request", &[70021], "AADSTS70021: no match", "x");
        let e = ProxyError::Upstream {
            status: StatusCode::BAD_REQUEST,
            body: Box::new(upstream),
        };
        let body = e.body("corr");
        assert_eq!(body.error_codes, vec![70021]);
        assert!(body.error_description.starts_with("AADSTS70021"));
        assert_eq!(body.correlation_id, "corr");
    }

    #[test]
    fn own_errors_name_the_proxy() {
        let body = ProxyError::missing("scope").body("c");
        assert_eq!(body.error, "invalid_request");
        assert!(body.error_description.contains("'scope'"));
        assert!(body
            .error_description
            .starts_with("identity-binding-proxy: "));
    }
}
