//! The words every power backend answers in (README "Power backends"): one
//! error type callers branch on, and one power state, whatever the wire
//! format behind them.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a backend could not do what it was asked. Each variant is a different
/// thing for the operator to fix, so callers branch on it; the text is the
/// backend's own message where it gave one.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BackendError {
    /// The backend refused the credentials or the permission (HTTP 401/403).
    #[error("the backend refused our credentials: {0}")]
    Auth(String),
    /// The TLS handshake failed: a certificate that is not the pinned one,
    /// one no trusted CA signed, or plain HTTP to a non-loopback address.
    #[error("TLS: {0}")]
    Tls(String),
    /// No answer: connection refused, reset or timed out.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The backend answered and declined, or its task failed: a locked VM,
    /// a reset type the BMC does not offer, a task's error.
    #[error("the backend refused: {0}")]
    Refused(String),
    /// The backend answered something this client does not understand.
    #[error("unexpected answer from the backend: {0}")]
    Protocol(String),
    /// The local program that reaches the backend (`ssh`) would not start.
    #[error("{0}")]
    CannotStart(String),
}

impl BackendError {
    /// Whether a wait that polls the backend (for a power state, for a
    /// task's end) ends at once on this error (README "Operations"). A
    /// refused login or certificate, or a program that would not start,
    /// answers the same when asked again; anything else may be a BMC or
    /// node that is itself restarting (a 503, a half-started service's
    /// page, no answer), so it is asked again until the wait's limit.
    pub fn ends_a_wait(&self) -> bool {
        match self {
            BackendError::Auth(_) | BackendError::Tls(_) | BackendError::CannotStart(_) => true,
            BackendError::Unreachable(_) | BackendError::Refused(_) | BackendError::Protocol(_) => false,
        }
    }
}

/// A machine's power as every backend reports it, in the same words
/// (README "Power backends").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    Running,
    Stopped,
    /// Running but not executing: a paused or suspended VM.
    Paused,
    /// In transition, or a word this client does not know; the backend's
    /// own word is kept beside it.
    Unknown,
}

impl PowerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Running => "running",
            PowerState::Stopped => "stopped",
            PowerState::Paused => "paused",
            PowerState::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for PowerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_state_serializes_lowercase() {
        let words: Vec<String> = [PowerState::Running, PowerState::Stopped, PowerState::Paused, PowerState::Unknown]
            .iter()
            .map(|s| serde_json::to_string(s).unwrap())
            .collect();
        assert_eq!(words, ["\"running\"", "\"stopped\"", "\"paused\"", "\"unknown\""]);
    }
}
