//! How a TLS handshake can fail, and the bounded labels the handshake-failure metric and the
//! refusal summaries count them by. The TLS listener (`serve::tls`) owns them; they
//! sit apart so the metrics registry can create every series at start without depending on
//! the listener.

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("client sent SNI name that is not served")]
    UnknownName,
    #[error("client sent no SNI name and no default is configured")]
    NoName,
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("TLS handshake timed out")]
    Timeout,
    #[error("connection closed during the handshake")]
    Closed,
}

/// Every [`HandshakeError::reason`], for the metric's series created at start.
pub const HANDSHAKE_FAILURES: [&str; 5] =
    ["unknown_sni", "no_sni", "tls_error", "timeout", "closed"];

impl HandshakeError {
    /// Bounded label for the handshake-failure metric (one of [`HANDSHAKE_FAILURES`]).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownName => "unknown_sni",
            Self::NoName => "no_sni",
            Self::Tls(_) => "tls_error",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
        }
    }
}
