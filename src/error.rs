//! What can go wrong with a request, as data. `http.rs` is the only place that turns a
//! variant into a status code; everything else returns these with their context filled in.

use crate::env::EnvError;
use crate::gateway::{self, GatewayError};
use crate::ledger::Shortage;
use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// The body or a field of it is malformed (400).
    BadRequest(String),
    /// A token is configured and the request lacks it or has a wrong one (401).
    Unauthorized,
    /// The client stopped sending its request before the end (408).
    RequestTimeout(String),
    /// No instance with this `run_id` (404).
    UnknownInstance(String),
    /// No such route (404).
    UnknownRoute(String),
    /// Known route, wrong method (405).
    MethodNotAllowed { path: String, allowed: &'static str },
    /// The `run_id` is taken by an instance that is starting, running or closing (409).
    RunIdInUse { run_id: String, state: &'static str },
    /// The instance ended on its own (its job or container died, or it was reaped) (410).
    Gone { run_id: String, reason: String },
    /// The body is larger than the server accepts (413).
    BodyTooLarge { limit: usize },
    /// Not enough of an enforced resource (429).
    Insufficient(Shortage),
    /// A model call failed in the gateway (400, 429, 502 or 504: see [`GatewayError`]).
    Gateway(GatewayError),
    /// The environment failed to start, run or close (500; 400 for `EnvError::Invalid`).
    Env {
        action: &'static str,
        run_id: String,
        source: EnvError,
    },
    /// A handler panicked (500).
    Internal(String),
    /// The server is shutting down (503).
    ShuttingDown,
    /// The server holds as much as it will of something many clients share (503).
    Overloaded(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadRequest(why) | Error::RequestTimeout(why) | Error::Overloaded(why) => {
                f.write_str(why)
            }
            Error::Unauthorized => f.write_str(
                "this server requires a token: send the header 'Authorization: Bearer <token>'",
            ),
            Error::UnknownInstance(run_id) => write!(
                f,
                "no instance with run_id '{run_id}': it was never started, or it was closed"
            ),
            Error::UnknownRoute(path) => write!(
                f,
                "no route {path}; the routes are /start_instance, /execute_command, /close_instance, /get_available_resources, /stats, /healthz, /metrics, /openapi.json; {}",
                gateway::ROUTES
            ),
            Error::MethodNotAllowed { path, allowed } => {
                write!(f, "{path} answers {allowed} only")
            }
            Error::RunIdInUse { run_id, state } => write!(
                f,
                "run_id '{run_id}' is already in use (instance {state}); close it first or pick another run_id"
            ),
            Error::Gone { run_id, reason } => write!(
                f,
                "instance '{run_id}' is gone: {reason}; its resources are free, close it to reuse its run_id"
            ),
            Error::BodyTooLarge { limit } => {
                write!(f, "request body larger than the limit of {limit} bytes")
            }
            Error::Insufficient(shortage) => shortage.fmt(f),
            Error::Gateway(error) => error.fmt(f),
            Error::Env {
                action,
                run_id,
                source,
            } => write!(f, "{action} '{run_id}' failed: {source}"),
            Error::Internal(why) => write!(f, "internal error: {why}"),
            Error::ShuttingDown => f.write_str("the server is shutting down; retry on another server"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Insufficient(shortage) => Some(shortage),
            Error::Gateway(error) => Some(error),
            Error::Env { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<GatewayError> for Error {
    fn from(error: GatewayError) -> Error {
        Error::Gateway(error)
    }
}
