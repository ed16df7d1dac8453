//! The Entra (AAD v2) error body, shared by the proxy's refusals and the Entra emulator.
//!
//! Every SDK we serve parses exactly this shape, and prints `error_description` in the
//! exception it raises. Keep field names and types as Entra sends them.

use serde::{Deserialize, Serialize};

/// `{"error","error_description","error_codes","timestamp","trace_id","correlation_id"}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    pub error_description: String,
    #[serde(default)]
    pub error_codes: Vec<u64>,
    #[serde(default)]
    pub timestamp: String,
    #[serde(default)]
    pub trace_id: String,
    #[serde(default)]
    pub correlation_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_uri: Option<String>,
}

impl ErrorBody {
    /// An error with a fresh trace id, the given correlation id and the current time.
    pub fn new(
        error: &str,
        codes: &[u64],
        description: impl Into<String>,
        correlation_id: &str,
    ) -> Self {
        Self {
            error: error.to_string(),
            error_description: description.into(),
            error_codes: codes.to_vec(),
            timestamp: entra_timestamp(std::time::SystemTime::now()),
            trace_id: uuid::Uuid::new_v4().to_string(),
            correlation_id: correlation_id.to_string(),
            error_uri: None,
        }
    }

    pub fn to_json(&self) -> bytes::Bytes {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default().into()
    }
}

/// Entra's timestamp format: `2026-11-22 01:51:38Z`.
pub fn entra_timestamp(at: std::time::SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    at.format(time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second]Z"
    ))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_serializes_with_entra_field_names() {
        let body = ErrorBody::new("invalid_request", &[900144], "missing grant_type", "c-1");
        let v: serde_json::Value = serde_json::from_slice(&body.to_json()).unwrap();
        assert_eq!(v["error"], "invalid_request");
        assert_eq!(v["error_codes"][0], 900144);
        assert_eq!(v["correlation_id"], "c-1");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(v.get("error_uri").is_none());
    }
}
