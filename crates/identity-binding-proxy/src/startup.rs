//! How a command fails before it serves: one error type for every start-up path, and the exit
//! code it gives the process.
//!
//! | exit | [`Kind`] | meaning |
//! |---|---|---|
//! | 64 (`EX_USAGE`) | [`Kind::Usage`] | misconfiguration: a flag, a file that does not exist or does not parse, an address this host does not have; fix the configuration |
//! | 69 (`EX_UNAVAILABLE`) | [`Kind::Unavailable`] | a dependency cannot be reached or is failing: the apiserver, a port held by another process; the same configuration may start later |
//! | 70 (`EX_SOFTWARE`) | [`Kind::Internal`] | our own failure: the async runtime cannot start, a certificate cannot be made; a bug to report |
//!
//! A command returns `Result<_, StartError>`; [`crate::cli::process`] prints it as one
//! `error: ...` line and exits with [`StartError::exit_code`].

use std::fmt;

/// Which of the three ways a start failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The configuration is wrong: exit 64.
    Usage,
    /// A dependency is unreachable or failing: exit 69.
    Unavailable,
    /// Our own failure: exit 70.
    Internal,
}

impl Kind {
    /// The process's exit code for this kind (sysexits.h).
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Usage => 64,
            Kind::Unavailable => 69,
            Kind::Internal => 70,
        }
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A start-up failure: its kind, one line saying what is wrong and what to do, and the error
/// underneath when there is one (shown after the message).
#[derive(Debug, thiserror::Error)]
pub struct StartError {
    kind: Kind,
    message: String,
    #[source]
    source: Option<Source>,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        match &self.source {
            Some(source) => write!(f, ": {source}"),
            None => Ok(()),
        }
    }
}

impl StartError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A misconfiguration (exit 64).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Kind::Usage, message)
    }

    /// An unavailable dependency (exit 69).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, message)
    }

    /// Our own failure (exit 70).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }

    /// The same failure with the error underneath it, printed after the message.
    pub fn because(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The same failure with `context` in front of its message (`context: message`).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The message alone, without the error underneath.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The process's exit code: 64, 69 or 70.
    pub fn exit_code(&self) -> u8 {
        self.kind.exit_code()
    }
}

/// `Result` of a start-up step.
pub type Result<T, E = StartError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_sysexits_code() {
        assert_eq!(StartError::usage("x").exit_code(), 64);
        assert_eq!(StartError::unavailable("x").exit_code(), 69);
        assert_eq!(StartError::internal("x").exit_code(), 70);
    }

    #[test]
    fn the_source_follows_the_message_and_context_goes_first() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = StartError::usage("cannot read tls.crt")
            .because(io)
            .context("--tls");
        assert_eq!(e.to_string(), "--tls: cannot read tls.crt: no such file");
        assert_eq!(e.message(), "--tls: cannot read tls.crt");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(e.kind(), Kind::Usage);
    }
}
