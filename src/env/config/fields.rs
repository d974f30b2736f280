//! The field readers of `environment_config` and of a command (`cwd`, `env`, timeouts):
//! each checks one value and says what is wrong with it in words for a 400.

use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// The longest timeout a command or an instance may ask for (one week).
const MAX_TIMEOUT_S: f64 = 7.0 * 24.0 * 3600.0;

/// The most variables an `env` may set (or `forward_env` name).
pub const MAX_ENV_VARS: usize = 256;

/// The most bytes an `env` may hold, names and values together: every instance keeps its
/// config in memory, in the journal and in `/stats`, and a command's variables go through
/// `exec` (whose whole environment is bounded too).
pub const MAX_ENV_BYTES: usize = 64 * 1024;
pub fn optional_string(raw: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.contains('\0') => {
            Err(format!("{key} contains a NUL byte"))
        }
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(other) => Err(format!("{key} must be a string, got {other}")),
    }
}

/// A working directory as a request may give it: a path, never something a CLI could read as
/// one of its options (`--privileged`), nor control characters.
pub fn check_cwd(cwd: &str) -> Result<(), String> {
    if cwd.is_empty() {
        return Err("cwd is empty".into());
    }
    if cwd.starts_with('-') {
        return Err(format!(
            "cwd '{cwd}' starts with '-': give a path (./{cwd} for a relative one)"
        ));
    }
    if cwd.chars().any(char::is_control) {
        return Err("cwd contains a control character".into());
    }
    Ok(())
}

/// Reads `{"NAME": "value"}`; names must be valid variable names, values strings without NUL.
pub fn string_map(value: Option<&Value>, what: &str) -> Result<BTreeMap<String, String>, String> {
    let object = match value {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(object)) => object,
        Some(other) => return Err(format!("{what} must be an object of strings, got {other}")),
    };
    object
        .iter()
        .map(|(name, value)| {
            if !valid_env_name(name) {
                return Err(format!(
                    "{what}: '{name}' is not a valid environment variable name"
                ));
            }
            if is_reserved_env_name(name) {
                return Err(format!(
                    "{what}: '{name}' is reserved: names starting with {RESERVED_ENV_PREFIX} are arservice's own"
                ));
            }
            match value {
                Value::String(text) if !text.contains('\0') => Ok((name.clone(), text.clone())),
                Value::Number(_) | Value::Bool(_) => Ok((name.clone(), value.to_string())),
                other => Err(format!(
                    "{what}: the value of '{name}' must be a string, got {other}"
                )),
            }
        })
        .collect()
}

/// Variables whose names start with this are set by arservice (the markers that tell whose a
/// process is, the run id): a request cannot set them, so it cannot pass for another.
pub const RESERVED_ENV_PREFIX: &str = "ARSERVICE_";

/// True for a name a request may not set (see [`RESERVED_ENV_PREFIX`]).
pub fn is_reserved_env_name(name: &str) -> bool {
    name.starts_with(RESERVED_ENV_PREFIX)
}

/// Reads an `env` object ([`string_map`]) of at most [`MAX_ENV_VARS`] variables and
/// [`MAX_ENV_BYTES`] of names and values.
pub fn env_map(value: Option<&Value>, what: &str) -> Result<BTreeMap<String, String>, String> {
    if let Some(Value::Object(object)) = value {
        if object.len() > MAX_ENV_VARS {
            return Err(format!(
                "{what} sets {} variables; at most {MAX_ENV_VARS}",
                object.len()
            ));
        }
    }
    let env = string_map(value, what)?;
    let bytes: usize = env
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    if bytes > MAX_ENV_BYTES {
        return Err(format!(
            "{what} holds {bytes} bytes of names and values; at most {MAX_ENV_BYTES}: pass large data in a file instead"
        ));
    }
    Ok(env)
}

/// `[A-Za-z_][A-Za-z0-9_]*`: what a shell accepts as a variable name.
pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Reads a positive number of seconds, at most a week.
pub fn parse_timeout(value: &Value, what: &str) -> Result<Duration, String> {
    match value.as_f64() {
        Some(seconds) if seconds > 0.0 && seconds <= MAX_TIMEOUT_S => {
            Ok(Duration::from_secs_f64(seconds))
        }
        _ => Err(format!(
            "{what} must be a number of seconds above 0 and at most {MAX_TIMEOUT_S}, got {value}"
        )),
    }
}

/// Reads `forward_env`: at most [`MAX_ENV_VARS`] variable names, none of them reserved.
pub fn forward_env(value: Option<&Value>) -> Result<Vec<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(names)) if names.len() > MAX_ENV_VARS => Err(format!(
            "forward_env names {} variables; at most {MAX_ENV_VARS}",
            names.len()
        )),
        Some(Value::Array(names)) => names
            .iter()
            .map(|name| match name {
                Value::String(name) if valid_env_name(name) && !is_reserved_env_name(name) => {
                    Ok(name.clone())
                }
                other => Err(format!(
                    "forward_env must list environment variable names, got {other}"
                )),
            })
            .collect(),
        Some(other) => Err(format!("forward_env must be a list of names, got {other}")),
    }
}

/// Reads `shell`: a list of words (or one line split at spaces) naming a program.
pub fn shell(value: Option<&Value>) -> Result<Option<Vec<String>>, String> {
    let shell: Vec<String> = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(line)) => line.split_whitespace().map(String::from).collect(),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|part| part.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or("shell must be a list of strings, like [\"bash\", \"-lc\"]")?,
        Some(other) => return Err(format!("shell must be a list of strings, got {other}")),
    };
    if shell.is_empty() {
        return Err("shell must name a program, like [\"bash\", \"-lc\"]".into());
    }
    Ok(Some(shell))
}

/// Reads a list of strings (`run_args`, `bwrap_args`, `slurm.sbatch_args`); `example` shows one.
pub fn string_list(
    value: Option<&Value>,
    what: &str,
    example: &str,
) -> Result<Vec<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("{what} must be a list of strings{example}")),
        Some(other) => Err(format!("{what} must be a list of strings, got {other}")),
    }
}

/// Reads an optional timeout, `default` when absent.
pub fn timeout_or(
    raw: &Map<String, Value>,
    key: &str,
    default: Duration,
) -> Result<Duration, String> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => parse_timeout(value, key),
    }
}
