//! [`EnvError`]: why an environment could not start, run or close. `error.rs` maps it to an
//! HTTP status; nothing here knows HTTP.

use std::fmt;

/// Why an environment could not start, run or close.
#[derive(Debug)]
pub enum EnvError {
    /// The request asked for something this environment cannot do (answers 400).
    Invalid(String),
    /// A CLI call failed; `detail` is the tail of what it said.
    Tool { what: String, detail: String },
    /// Nothing at the path a request named (answers 404).
    NotFound(String),
    /// The sandbox ended on its own (its job or container died): the reason, for a 410.
    Gone(String),
    /// A file-system or process operation failed.
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvError::Invalid(why) | EnvError::NotFound(why) | EnvError::Gone(why) => {
                f.write_str(why)
            }
            EnvError::Tool { what, detail } => write!(f, "{what} failed: {detail}"),
            EnvError::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl EnvError {
    /// True when the sandbox's infrastructure failed (a CLI or engine failed or timed out, a
    /// file or process operation failed, the sandbox died); false for a request this
    /// environment cannot do. `crate::error::Error::infra` asks it.
    pub fn infra(&self) -> bool {
        match self {
            EnvError::Invalid(_) | EnvError::NotFound(_) => false,
            EnvError::Tool { .. } | EnvError::Gone(_) | EnvError::Io { .. } => true,
        }
    }
}

impl std::error::Error for EnvError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EnvError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<super::files::FileError> for EnvError {
    fn from(err: super::files::FileError) -> EnvError {
        use super::files::FileError;
        match err {
            FileError::NotFound(why) => EnvError::NotFound(why),
            FileError::Invalid(why) => EnvError::Invalid(why),
            FileError::Io { context, source } => EnvError::Io { context, source },
        }
    }
}

impl From<super::config::ConfigError> for EnvError {
    fn from(err: super::config::ConfigError) -> EnvError {
        EnvError::Invalid(err.to_string())
    }
}
