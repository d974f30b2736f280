//! Environments: how to start one sandbox, run a command in it, and close it.
//!
//! This module owns the parsed `environment_config` ([`EnvSpec`]), the exec contract
//! ([`ExecRequest`] in, [`spawn::ExecResult`] out) and the [`Environment`] trait that each
//! `container_type` implements in its own file. It never decides HTTP statuses: failures are
//! [`EnvError`]s, which `http.rs` maps.

pub mod apptainer;
pub mod bwrap;
pub mod docker;
pub mod enroot;
pub mod local;
pub mod process;
pub mod spawn;

use crate::ledger::{parse_resources, Resources};
use crate::run_id::RunId;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub use spawn::{ExecResult, Limits};

/// The per-command timeout when neither the instance nor the command names one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest timeout a command or an instance may ask for (one week).
const MAX_TIMEOUT_S: f64 = 7.0 * 24.0 * 3600.0;

/// The most variables an `env` may set (or `forward_env` name).
pub const MAX_ENV_VARS: usize = 256;

/// The most bytes an `env` may hold, names and values together: every instance keeps its
/// config in memory, in the journal and in `/stats`, and a command's variables go through
/// `exec` (whose whole environment is bounded too).
pub const MAX_ENV_BYTES: usize = 64 * 1024;

/// Every `container_type` the API knows, with its aliases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Docker,
    Podman,
    Apptainer,
    Enroot,
    Bubblewrap,
    Local,
}

impl Kind {
    pub const NAMES: &'static str =
        "docker, podman, singularity (alias apptainer), enroot, bubblewrap (alias bwrap), local";

    pub fn parse(name: &str) -> Option<Kind> {
        Some(match name {
            "docker" => Kind::Docker,
            "podman" => Kind::Podman,
            "singularity" | "apptainer" => Kind::Apptainer,
            "enroot" => Kind::Enroot,
            "bubblewrap" | "bwrap" => Kind::Bubblewrap,
            "local" => Kind::Local,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Docker => "docker",
            Kind::Podman => "podman",
            Kind::Apptainer => "singularity",
            Kind::Enroot => "enroot",
            Kind::Bubblewrap => "bubblewrap",
            Kind::Local => "local",
        }
    }
}

/// A validated `environment_config`.
#[derive(Clone, Debug)]
pub struct EnvSpec {
    pub kind: Kind,
    /// The image (or rootfs, or nothing for `local`); defaults to `container_name`.
    pub image: String,
    /// Every resource the request named, enforced or not.
    pub resources: Resources,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub forward_env: Vec<String>,
    /// Default per-command timeout.
    pub timeout: Duration,
    /// Longest life from start (`ttl`); the server's default when `None`.
    pub ttl: Option<Duration>,
    /// Longest time without a command (`idle_timeout`); the server's default when `None`.
    pub idle_timeout: Option<Duration>,
    /// Which CLI to call instead of the kind's default.
    pub executable: Option<String>,
    /// The request chose `executable` (not a preset): the server never runs it on its own,
    /// in health rounds or cleanups.
    pub client_executable: bool,
    /// The program and leading arguments that run a command string (`["sh", "-c"]`).
    pub shell: Option<Vec<String>>,
    /// The whole config as merged, shown back in `/stats`.
    pub raw: Map<String, Value>,
}

impl EnvSpec {
    /// Validates a merged `environment_config`; `Err` is a message for a 400.
    pub fn parse(raw: Map<String, Value>, container_name: Option<&str>) -> Result<EnvSpec, String> {
        let kind = match raw.get("container_type") {
            None | Some(Value::Null) => Kind::Docker,
            Some(Value::String(name)) => Kind::parse(name).ok_or_else(|| {
                format!(
                    "unknown container_type '{name}': expected one of {}",
                    Kind::NAMES
                )
            })?,
            Some(other) => return Err(format!("container_type must be a string, got {other}")),
        };
        let image = match raw.get("image").or_else(|| raw.get("container_image")) {
            Some(Value::String(image)) => image.clone(),
            None | Some(Value::Null) => container_name.unwrap_or_default().to_string(),
            Some(other) => return Err(format!("image must be a string, got {other}")),
        };
        if image.is_empty() && kind != Kind::Local {
            return Err(format!(
                "container_type '{}' needs an image: give container_name or environment_config.image",
                kind.name()
            ));
        }
        if !image.is_empty() {
            check_image(kind, &image)?;
        }
        let resources = match raw.get("resources") {
            None | Some(Value::Null) => Resources::new(),
            Some(value) => parse_resources(value).map_err(|why| format!("resources: {why}"))?,
        };
        let cwd = optional_string(&raw, "cwd")?;
        if let Some(cwd) = &cwd {
            check_cwd(cwd)?;
        }
        let env = env_map(raw.get("env"), "env")?;
        let forward_env = match raw.get("forward_env") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(names)) if names.len() > MAX_ENV_VARS => {
                return Err(format!(
                    "forward_env names {} variables; at most {MAX_ENV_VARS}",
                    names.len()
                ))
            }
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
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(format!("forward_env must be a list of names, got {other}")),
        };
        let timeout = match raw.get("timeout") {
            None | Some(Value::Null) => DEFAULT_TIMEOUT,
            Some(value) => parse_timeout(value, "timeout")?,
        };
        let lifetime = |key: &str| match raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => parse_timeout(value, key).map(Some),
        };
        let ttl = lifetime("ttl")?;
        let idle_timeout = lifetime("idle_timeout")?;
        let executable = optional_string(&raw, "executable")?;
        let shell = match raw.get("shell") {
            None | Some(Value::Null) => None,
            Some(Value::String(line)) => Some(line.split_whitespace().map(String::from).collect()),
            Some(Value::Array(parts)) => Some(
                parts
                    .iter()
                    .map(|part| part.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("shell must be a list of strings, like [\"bash\", \"-lc\"]")?,
            ),
            Some(other) => return Err(format!("shell must be a list of strings, got {other}")),
        };
        if shell
            .as_ref()
            .is_some_and(|parts: &Vec<String>| parts.is_empty())
        {
            return Err("shell must name a program, like [\"bash\", \"-lc\"]".into());
        }
        Ok(EnvSpec {
            kind,
            image,
            resources,
            cwd,
            env,
            forward_env,
            timeout,
            ttl,
            idle_timeout,
            executable,
            client_executable: false,
            shell,
            raw,
        })
    }
}

/// The image reaches a CLI as an argument: one that starts with `-` would be read as an
/// option, so it is refused for every kind, as are control characters (a path with spaces is
/// fine: it is one argument). Docker and podman images must also be references
/// (`[host[:port]/]name[:tag][@digest]`), so that a typo answers 400 here rather than 500
/// from `docker run`.
fn check_image(kind: Kind, image: &str) -> Result<(), String> {
    if image.starts_with('-') || image.chars().any(char::is_control) {
        return Err(format!(
            "image '{}' must not start with '-' or contain control characters",
            image.escape_debug()
        ));
    }
    if matches!(kind, Kind::Docker | Kind::Podman) && !is_image_reference(image) {
        return Err(format!(
            "image '{image}' is not a valid image reference: expected [host[:port]/]name[:tag][@sha256:digest], \
             name in lowercase letters, digits and . _ - separators (like python:3.12-slim)"
        ));
    }
    Ok(())
}

/// Docker's reference grammar, slightly simplified: `[host[:port]/]path[:tag][@algo:hex]`.
fn is_image_reference(image: &str) -> bool {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    let digest_ok = digest.is_none_or(|digest| {
        digest.split_once(':').is_some_and(|(algo, hex)| {
            !algo.is_empty()
                && algo
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && hex.len() >= 32
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        })
    });
    let last_slash = name.rfind('/').map_or(0, |at| at + 1);
    let (path, tag) = match name[last_slash..].rfind(':') {
        Some(at) => (&name[..last_slash + at], Some(&name[last_slash + at + 1..])),
        None => (name, None),
    };
    let tag_ok = tag.is_none_or(|tag| {
        tag.len() <= 128
            && tag
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    });
    let mut components: Vec<&str> = path.split('/').collect();
    let first = components[0];
    let has_host = components.len() > 1
        && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_host {
        let (host, port) = first.split_once(':').unwrap_or((first, ""));
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
        if !host_ok || !port.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        components.remove(0);
    }
    let component_ok = |component: &str| {
        let bytes = component.as_bytes();
        !bytes.is_empty()
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes.iter().all(|&b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
    };
    digest_ok && tag_ok && path.len() <= 255 && components.into_iter().all(component_ok)
}

fn optional_string(raw: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
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

/// One command, with every default already resolved except the environment's own.
#[derive(Clone, Debug)]
pub struct ExecRequest {
    pub cmd: String,
    /// Overrides the instance's working directory for this command.
    pub cwd: Option<String>,
    /// Added on top of the instance's environment for this command.
    pub env: BTreeMap<String, String>,
    pub limits: Limits,
}

/// What an environment knows about the instance it starts.
#[derive(Clone, Debug)]
pub struct InstanceContext {
    pub run_id: RunId,
    /// `<state-dir>/instances/<run_id>`, created by the environment, removed on close.
    pub root: PathBuf,
    /// This server's identity: stable across restarts on the same state dir, different
    /// between servers. Everything created outside the state dir carries it.
    pub server_id: String,
    /// The server's state dir: image caches live in `cache/` below it.
    pub state_dir: PathBuf,
    /// A static `arservice` to run inside sandboxes as their agent (`--agent`), if any.
    pub agent: Option<PathBuf>,
    /// The most processes a container may have (`--pids-limit`); `None`: no limit.
    pub pids_limit: Option<u64>,
}

impl InstanceContext {
    /// An instance `run_id` of server `abcd1234` with state dir `/state`, for unit tests of
    /// command lines.
    #[cfg(test)]
    pub fn for_tests(run_id: &str) -> InstanceContext {
        InstanceContext {
            run_id: RunId::parse(run_id, "run_id").expect("a valid run_id"),
            root: PathBuf::from("/state/instances").join(run_id),
            server_id: "abcd1234".into(),
            state_dir: "/state".into(),
            agent: None,
            pids_limit: None,
        }
    }

    /// Where converted images are kept, shared by all instances of this server.
    pub fn cache_dir(&self) -> PathBuf {
        self.state_dir.join("cache")
    }
    /// The name of everything created outside the state dir for this instance
    /// (`ars-<server_id>-<run_id>`): a valid container, instance and job name.
    pub fn sandbox_name(&self) -> String {
        format!("{SANDBOX_PREFIX}{}-{}", self.server_id, self.run_id)
    }
}

/// Runs `$1` with `bash -lc` where the sandbox has bash (like the original), else `sh -c`,
/// stderr joined to stdout (their order is kept even where a tool carries them as two
/// streams, as `docker exec` does). `command -v` is a shell builtin: the choice costs
/// microseconds, so it is made inside every command rather than by an extra call at start.
pub const BASH_OR_SH: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash -lc \"$1\" 2>&1; fi; exec sh -c \"$1\" 2>&1";

/// Runs `"$@"` (a configured shell and the command) with stderr joined to stdout.
pub const MERGE_OUTPUT: &str = "exec \"$@\" 2>&1";

/// The words that run `cmd` inside a sandbox through its `sh`: the configured `shell`
/// (`sh -c MERGE_OUTPUT sh <shell...> <cmd>`), or bash where there is bash, else sh
/// (`sh -c BASH_OR_SH sh <cmd>`); stderr joined to stdout either way.
pub fn shell_words(shell: Option<&[String]>, cmd: &str) -> Vec<String> {
    let mut words: Vec<String> = vec!["sh".into(), "-c".into()];
    match shell {
        Some(shell) => {
            words.extend([MERGE_OUTPUT.into(), "sh".into()]);
            words.extend(shell.iter().cloned());
        }
        None => words.extend([BASH_OR_SH.into(), "sh".into()]),
    }
    words.push(cmd.to_string());
    words
}

/// The prefix of every container, instance or job name arservice creates.
pub const SANDBOX_PREFIX: &str = "ars-";

/// Output kept from a CLI call (its error message is the tail of it).
const TOOL_OUTPUT_BYTES: usize = 16 * 1024;

/// How much of a tool's output an error message quotes.
const TOOL_ERROR_CHARS: usize = 600;

/// Runs a CLI (`docker run ...`) to completion within `timeout`; its output on success.
///
/// `what` names the call in errors (`docker run`); a non-zero exit is an [`EnvError::Tool`]
/// carrying the tail of what the tool said.
pub fn run_tool(what: &str, command: Command, timeout: Duration) -> Result<String, EnvError> {
    let groups = spawn::ProcessGroups::default();
    let limits = Limits {
        timeout,
        max_output_bytes: TOOL_OUTPUT_BYTES,
    };
    let program = command.get_program().to_string_lossy().into_owned();
    let result = spawn::run(command, limits, &groups).map_err(|source| EnvError::Io {
        context: format!("cannot run {what} ('{program}' is not installed or not on PATH)"),
        source,
    })?;
    // What the tool left running on purpose (`apptainer instance start` detaches the
    // instance) stays: only a timeout kills what a tool started.
    if result.timed_out {
        return Err(EnvError::Tool {
            what: what.to_string(),
            detail: format!("timed out after {:.0} s", timeout.as_secs_f64()),
        });
    }
    if result.returncode != 0 {
        return Err(EnvError::Tool {
            what: what.to_string(),
            detail: tail(result.output.trim(), TOOL_ERROR_CHARS),
        });
    }
    Ok(result.output)
}

/// True when `program` is a file in one of `PATH`'s directories.
pub fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

/// `exec_mode: "cli"` forces an environment's CLI path even when an agent is available;
/// `"agent"` (or nothing) uses the agent where there is one.
pub fn forces_cli(raw: &Map<String, Value>) -> Result<bool, EnvError> {
    match raw.get("exec_mode").and_then(Value::as_str) {
        None | Some("agent") => Ok(false),
        Some("cli") => Ok(true),
        Some(other) => Err(EnvError::Invalid(format!(
            "exec_mode must be \"agent\" or \"cli\", got \"{other}\""
        ))),
    }
}

/// The first of `names` found on `PATH`, or the first name.
pub fn first_on_path<'a>(names: &[&'a str]) -> &'a str {
    names
        .iter()
        .copied()
        .find(|name| on_path(name))
        .unwrap_or(names[0])
}

/// Locks per cached image, so one image is converted once even when many instances of it
/// start together (different images convert in parallel).
static CACHE_LOCKS: std::sync::LazyLock<
    parking_lot::Mutex<BTreeMap<PathBuf, std::sync::Arc<parking_lot::Mutex<()>>>>,
> = std::sync::LazyLock::new(Default::default);

/// The cached conversion of `source` at `<cache_dir>/<kind>/<hash>.<extension>`, made by
/// `convert(temporary_path)` the first time (then renamed into place, so a crash never leaves a
/// half-written image that looks complete).
pub fn cached_image(
    cache_dir: &std::path::Path,
    kind: &str,
    extension: &str,
    source: &str,
    convert: impl FnOnce(&std::path::Path) -> Result<(), EnvError>,
) -> Result<PathBuf, EnvError> {
    let dir = cache_dir.join(kind);
    std::fs::create_dir_all(&dir).map_err(|source| EnvError::Io {
        context: format!("cannot create the image cache {}", dir.display()),
        source,
    })?;
    let path = dir.join(format!("{:016x}.{extension}", fnv1a(source.as_bytes())));
    let lock = std::sync::Arc::clone(CACHE_LOCKS.lock().entry(path.clone()).or_default());
    let _converting = lock.lock();
    if path.exists() {
        return Ok(path);
    }
    let partial = path.with_extension(format!("{extension}.partial"));
    let _ = std::fs::remove_file(&partial);
    convert(&partial)?;
    std::fs::rename(&partial, &path).map_err(|source| EnvError::Io {
        context: format!("cannot move the converted image to {}", path.display()),
        source,
    })?;
    Ok(path)
}

/// Creates an instance's own directory (`InstanceContext::root`), private to the server's
/// user (0700), so that no other user of the machine reads what its commands leave there.
pub fn instance_dir(root: &std::path::Path) -> Result<(), EnvError> {
    crate::state_dir::private_dir(root).map_err(|source| EnvError::Io {
        context: format!("cannot create {}", root.display()),
        source,
    })
}

/// FNV-1a: a stable, dependency-free hash for cache file names and server ids.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// The last `chars` characters of `text`.
fn tail(text: &str, chars: usize) -> String {
    let count = text.chars().count();
    if count <= chars {
        text.to_string()
    } else {
        let cut: String = text.chars().skip(count - chars).collect();
        format!("...{cut}")
    }
}

/// Why an environment could not start, run or close.
#[derive(Debug)]
pub enum EnvError {
    /// The request asked for something this environment cannot do (answers 400).
    Invalid(String),
    /// A CLI call failed; `detail` is the tail of what it said.
    Tool { what: String, detail: String },
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
            EnvError::Invalid(why) | EnvError::Gone(why) => f.write_str(why),
            EnvError::Tool { what, detail } => write!(f, "{what} failed: {detail}"),
            EnvError::Io { context, source } => write!(f, "{context}: {source}"),
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

/// One running sandbox. Implementations are shared between threads: several commands may
/// run at once, and `close` may come while they do.
pub trait Environment: Send + Sync {
    /// Runs one command to completion (or timeout) and reports what happened.
    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError>;

    /// Ends every process the instance started and removes everything it created.
    /// Running commands answer (killed); calling it twice is harmless.
    fn close(&self) -> Result<(), EnvError>;

    /// `Some(reason)` once the sandbox has ended on its own (its job ended, its container was
    /// removed); checked periodically and after a failed command. Must be cheap.
    fn health(&self) -> Option<String> {
        None
    }

    /// What to show in `/stats` about the sandbox (its container name, say).
    fn describe(&self) -> Map<String, Value> {
        Map::new()
    }

    /// What a later life of the server needs to take this sandbox over after a crash (it
    /// goes into the journal); `None` when the sandbox cannot outlive the server (its
    /// keep-alive process dies with it), so that a restart removes it instead.
    fn handle(&self) -> Option<Value> {
        None
    }
}

/// Starts the sandbox that `spec` describes on this machine.
pub fn start(spec: &EnvSpec, ctx: &InstanceContext) -> Result<Box<dyn Environment>, EnvError> {
    match spec.kind {
        Kind::Local => Ok(Box::new(local::LocalEnv::start(spec, ctx)?)),
        Kind::Docker | Kind::Podman => Ok(Box::new(docker::DockerEnv::start(spec, ctx)?)),
        Kind::Bubblewrap => Ok(Box::new(bwrap::BwrapEnv::start(spec, ctx)?)),
        Kind::Apptainer => Ok(Box::new(apptainer::ApptainerEnv::start(spec, ctx)?)),
        Kind::Enroot => Ok(Box::new(enroot::EnrootEnv::start(spec, ctx)?)),
    }
}

/// Takes over the sandbox an earlier life of this server started, from the `handle` its
/// journal kept; `Err` when it is gone or its kind cannot be adopted (the caller removes it).
pub fn adopt(
    spec: &EnvSpec,
    ctx: &InstanceContext,
    handle: &Value,
) -> Result<Box<dyn Environment>, EnvError> {
    match spec.kind {
        Kind::Local => Ok(Box::new(local::LocalEnv::adopt(spec, ctx)?)),
        Kind::Docker | Kind::Podman => Ok(Box::new(docker::DockerEnv::adopt(spec, ctx, handle)?)),
        Kind::Apptainer => Ok(Box::new(apptainer::ApptainerEnv::adopt(spec, ctx, handle)?)),
        Kind::Bubblewrap | Kind::Enroot => Err(EnvError::Gone(format!(
            "{} sandboxes end with the server that started them",
            spec.kind.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        for good in [
            "busybox",
            "arservice-test/busybox:latest",
            "python:3.12-slim",
            "ghcr.io/org/repo/image:v1.0_rc-2",
            "localhost:5000/x",
            "sweb.eval.x86_64.django__django-11099:latest",
            "docker.io/library/ubuntu@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(is_image_reference(good), "{good}");
            assert!(check_image(Kind::Docker, good).is_ok(), "{good}");
        }
        for bad in [
            ".",
            "",
            "-x",
            "--privileged",
            "Upper/case",
            "a//b",
            "a:",
            "a:-tag",
            "a b",
            "/abs",
            "a/",
            "a@sha256:zz",
            "host:port/x:1",
            "_a",
        ] {
            assert!(
                !is_image_reference(bad) || check_image(Kind::Docker, bad).is_err(),
                "{bad}"
            );
        }
        // Other kinds take paths and URIs, but never an option or a space.
        assert!(check_image(Kind::Apptainer, "docker://python:3.12").is_ok());
        assert!(check_image(Kind::Bubblewrap, "/var/lib/rootfs").is_ok());
        assert!(check_image(Kind::Apptainer, "--bind=/:/host").is_err());
        assert!(check_image(Kind::Enroot, "a\nb").is_err());
        assert!(check_image(Kind::Bubblewrap, "/srv/root fs").is_ok());
        assert!(check_image(Kind::Docker, "a b").is_err());
    }
    use serde_json::json;

    fn parse(value: Value) -> Result<EnvSpec, String> {
        EnvSpec::parse(value.as_object().unwrap().clone(), Some("img:1"))
    }

    #[test]
    fn defaults() {
        let spec = parse(json!({})).unwrap();
        assert_eq!(spec.kind, Kind::Docker);
        assert_eq!(spec.image, "img:1");
        assert_eq!(spec.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn aliases_and_unknown_types() {
        assert_eq!(
            parse(json!({"container_type": "bwrap"})).unwrap().kind,
            Kind::Bubblewrap
        );
        assert_eq!(
            parse(json!({"container_type": "apptainer"})).unwrap().kind,
            Kind::Apptainer
        );
        let why = parse(json!({"container_type": "vm"})).unwrap_err();
        assert!(why.contains("unknown container_type 'vm'"), "{why}");
    }

    #[test]
    fn bad_fields_are_named() {
        for (config, needle) in [
            (json!({"timeout": -1}), "timeout"),
            (json!({"timeout": "5"}), "timeout"),
            (json!({"env": {"A-B": "x"}}), "'A-B'"),
            (json!({"env": ["x"]}), "env"),
            (json!({"cwd": "--privileged"}), "starts with '-'"),
            (json!({"cwd": "a\nb"}), "control character"),
            (
                json!({"env": {"ARSERVICE_INSTANCE": "ars-other-r"}}),
                "'ARSERVICE_INSTANCE' is reserved",
            ),
            (json!({"forward_env": ["ARSERVICE_EXEC"]}), "forward_env"),
            (json!({"forward_env": "HOME"}), "forward_env"),
            (json!({"resources": {"cpus": -2}}), "'cpus'"),
            (json!({"cwd": 5}), "cwd"),
            (json!({"shell": []}), "shell"),
        ] {
            let why = parse(config.clone()).unwrap_err();
            assert!(why.contains(needle), "{config} gave {why}");
        }
    }

    #[test]
    fn env_names() {
        assert!(valid_env_name("PIP_NO_INPUT"));
        assert!(valid_env_name("_x1"));
        assert!(!valid_env_name("1X"));
        assert!(!valid_env_name("A=B"));
        assert!(!valid_env_name(""));
    }
}
