//! What can go wrong with a request, as data. `http.rs` is the only place that turns a
//! variant into a status code; everything else returns these with their context filled in.
//! Whose fault an error is (the sandbox's or the request's, or the infrastructure's: the
//! `infra` of every error answer) is decided here, once per variant: [`Error::infra`].

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
    /// The instance ended on its own: its job, container or agent died (410).
    Gone { run_id: String, reason: String },
    /// The server closed the instance for its `ttl` or `idle_timeout` (410).
    Reaped { run_id: String, reason: String },
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
                "no route {path}; the routes are /start_instance, /fork_instance, /execute_command, /close_instance, /get_available_resources, /stats, /runs/{{run_id}}, /healthz, /metrics, /openapi.json; {}",
                gateway::ROUTES
            ),
            Error::MethodNotAllowed { path, allowed } => {
                write!(f, "{path} answers {allowed} only")
            }
            Error::RunIdInUse { run_id, state } => write!(
                f,
                "run_id '{run_id}' is already in use (instance {state}); close it first or pick another run_id"
            ),
            Error::Gone { run_id, reason } | Error::Reaped { run_id, reason } => write!(
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

impl Error {
    /// True when the infrastructure failed rather than the request or the sandbox's own
    /// work: the container, job, agent or engine died or did not answer, a tool failed or
    /// timed out, a model upstream failed, the server broke or is going away. False for a
    /// malformed or unauthorized request, an unknown `run_id`, an admission refusal, a spent
    /// limit, an instance reaped for its own `ttl`/`idle_timeout`. A command's own non-zero
    /// exit or timeout is no error at all (a 200 answer).
    pub fn infra(&self) -> bool {
        match self {
            Error::BadRequest(_)
            | Error::Unauthorized
            | Error::RequestTimeout(_)
            | Error::UnknownInstance(_)
            | Error::UnknownRoute(_)
            | Error::MethodNotAllowed { .. }
            | Error::RunIdInUse { .. }
            | Error::Reaped { .. }
            | Error::BodyTooLarge { .. }
            | Error::Insufficient(_)
            | Error::Overloaded(_) => false,
            Error::Gone { .. } | Error::Internal(_) | Error::ShuttingDown => true,
            Error::Env { source, .. } => source.infra(),
            Error::Gateway(error) => match error {
                GatewayError::Invalid(_) | GatewayError::LimitReached(_) => false,
                GatewayError::Upstream { .. } | GatewayError::Timeout { .. } => true,
            },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::LimitHit;
    use crate::ledger::{Amount, Shortage};
    use std::time::Duration;

    fn io() -> std::io::Error {
        std::io::Error::other("x")
    }

    fn env(source: EnvError) -> Error {
        Error::Env {
            action: "execute in",
            run_id: "r".into(),
            source,
        }
    }

    /// Every variant (and every `EnvError` and `GatewayError` inside one) with its `infra`,
    /// each once: the match naming them stops compiling when a variant is added (add its
    /// case then).
    #[test]
    fn every_error_says_whose_fault_it_is() {
        let shortage = Shortage {
            resource: "instances".into(),
            asked: Amount::ONE,
            left: Amount::ZERO,
            max: Amount::ONE,
            waiting: 0,
        };
        let cases = [
            (Error::BadRequest("x".into()), false),
            (Error::Unauthorized, false),
            (Error::RequestTimeout("x".into()), false),
            (Error::UnknownInstance("x".into()), false),
            (Error::UnknownRoute("/x".into()), false),
            (
                Error::MethodNotAllowed {
                    path: "/stats".into(),
                    allowed: "GET",
                },
                false,
            ),
            (
                Error::RunIdInUse {
                    run_id: "x".into(),
                    state: "running",
                },
                false,
            ),
            (
                Error::Gone {
                    run_id: "x".into(),
                    reason: "container x is gone".into(),
                },
                true,
            ),
            (
                Error::Reaped {
                    run_id: "x".into(),
                    reason: "reaped: its ttl of 1 s ran out".into(),
                },
                false,
            ),
            (Error::BodyTooLarge { limit: 1 }, false),
            (Error::Insufficient(shortage), false),
            (Error::Gateway(GatewayError::Invalid("x".into())), false),
            (
                Error::Gateway(GatewayError::LimitReached(LimitHit::Calls {
                    calls: 1,
                    limit: 1,
                })),
                false,
            ),
            (
                Error::Gateway(GatewayError::Upstream {
                    upstream: "a".into(),
                    attempts: 1,
                    source: ureq::Error::ConnectionFailed,
                }),
                true,
            ),
            (
                Error::Gateway(GatewayError::Timeout {
                    upstream: "a".into(),
                    attempts: 1,
                    timeout: Duration::from_secs(1),
                }),
                true,
            ),
            (env(EnvError::Invalid("x".into())), false),
            (env(EnvError::NotFound("x".into())), false),
            (
                env(EnvError::Tool {
                    what: "docker exec".into(),
                    detail: "Cannot connect to the Docker daemon".into(),
                }),
                true,
            ),
            (env(EnvError::Gone("job 1 ended: NODE_FAIL".into())), true),
            (
                env(EnvError::Io {
                    context: "cannot run docker".into(),
                    source: io(),
                }),
                true,
            ),
            (Error::Internal("x".into()), true),
            (Error::ShuttingDown, true),
            (Error::Overloaded("x".into()), false),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for (error, infra) in &cases {
            assert_eq!(error.infra(), *infra, "{error:?}");
            // Names the variant, so that the set below proves every one has a case.
            let name = match error {
                Error::BadRequest(_) => "BadRequest",
                Error::Unauthorized => "Unauthorized",
                Error::RequestTimeout(_) => "RequestTimeout",
                Error::UnknownInstance(_) => "UnknownInstance",
                Error::UnknownRoute(_) => "UnknownRoute",
                Error::MethodNotAllowed { .. } => "MethodNotAllowed",
                Error::RunIdInUse { .. } => "RunIdInUse",
                Error::Gone { .. } => "Gone",
                Error::Reaped { .. } => "Reaped",
                Error::BodyTooLarge { .. } => "BodyTooLarge",
                Error::Insufficient(_) => "Insufficient",
                Error::Gateway(GatewayError::Invalid(_)) => "Gateway::Invalid",
                Error::Gateway(GatewayError::LimitReached(_)) => "Gateway::LimitReached",
                Error::Gateway(GatewayError::Upstream { .. }) => "Gateway::Upstream",
                Error::Gateway(GatewayError::Timeout { .. }) => "Gateway::Timeout",
                Error::Env { source, .. } => match source {
                    EnvError::Invalid(_) => "Env::Invalid",
                    EnvError::NotFound(_) => "Env::NotFound",
                    EnvError::Tool { .. } => "Env::Tool",
                    EnvError::Gone(_) => "Env::Gone",
                    EnvError::Io { .. } => "Env::Io",
                },
                Error::Internal(_) => "Internal",
                Error::ShuttingDown => "ShuttingDown",
                Error::Overloaded(_) => "Overloaded",
            };
            assert!(seen.insert(name), "{name} twice");
        }
        assert_eq!(seen.len(), cases.len());
    }
}
