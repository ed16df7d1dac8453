//! Every way a token request can fail, mapped once to the HTTP status, the Entra-shaped error
//! body, and the metric label.
//!
//! Descriptions are written for the person reading the SDK exception: they say what was wrong
//! and what to do. They never contain a token or an assertion.

use http::StatusCode;

use crate::oauth::ErrorBody;

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
    /// Unknown path or method (404/405).
    #[error("{description}")]
    NotFound {
        status: StatusCode,
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
            Self::NotFound { status, .. } => *status,
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
            Self::NotFound { .. } => "not_found",
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
            Self::NotFound { .. } => ("invalid_request", codes::INVALID_REQUEST),
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
