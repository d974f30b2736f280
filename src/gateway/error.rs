//! What can go wrong with a model call, as data. The service wraps these in its own error
//! (`crate::error::Error::Gateway`); `http.rs` maps each to its status, in one place.

use super::accounts::LimitHit;
use std::fmt;
use std::time::Duration;

#[derive(Debug)]
pub enum GatewayError {
    /// The call is malformed, or names no upstream of this server (400).
    Invalid(String),
    /// `--cost-limit` or `--call-limit` is reached (429, not to be retried).
    LimitReached(LimitHit),
    /// The upstream could not be reached, or its answer not read, after every retry (502).
    Upstream {
        upstream: String,
        attempts: u32,
        source: ureq::Error,
    },
    /// The attempt ran past `--model-timeout` (504, not retried: it would take as long again).
    Timeout {
        upstream: String,
        attempts: u32,
        timeout: Duration,
    },
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GatewayError::Invalid(why) => f.write_str(why),
            GatewayError::LimitReached(hit) => hit.fmt(f),
            GatewayError::Upstream {
                upstream,
                attempts,
                source,
            } => write!(
                f,
                "model upstream '{upstream}' failed after {attempts} attempt(s): {source}"
            ),
            GatewayError::Timeout {
                upstream,
                attempts,
                timeout,
            } => write!(
                f,
                "model upstream '{upstream}' did not answer within --model-timeout {} s (attempt {attempts}); a call past the timeout is not retried: ask for a shorter answer, or start the server with a longer --model-timeout",
                timeout.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for GatewayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GatewayError::LimitReached(hit) => Some(hit),
            GatewayError::Upstream { source, .. } => Some(source),
            GatewayError::Invalid(_) | GatewayError::Timeout { .. } => None,
        }
    }
}
