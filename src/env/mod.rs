//! Environments: how to start one sandbox, run a command in it, and close it.
//!
//! This module owns the [`Environment`] trait that each `container_type` implements in its own
//! file, what an environment knows of its instance ([`InstanceContext`]), and the factories
//! [`start`] and [`adopt`]; what a fork hands its start is `fork`. The parsed
//! `environment_config` is `config`, the exec contract `exec` (and `wire`, its form on the
//! agent's socket; `stream`, its streamed output), the CLI helper `tool`, images and their
//! cache `image`, the host side of the agent `agent`. It never decides HTTP statuses: failures
//! are [`EnvError`]s, which `error.rs` maps.

pub mod agent;
pub mod apptainer;
pub mod bwrap;
pub mod cgroup;
pub mod config;
pub mod docker;
pub mod enroot;
pub mod error;
pub mod exec;
pub mod files;
pub mod fork;
pub mod image;
pub mod local;
pub mod process;
pub mod spawn;
pub mod stream;
pub mod tool;
pub mod wire;

use crate::run_id::RunId;
use serde_json::{Map, Value};
use std::path::PathBuf;

pub use config::{
    check_cwd, env_map, is_reserved_env_name, parse_timeout, string_map, valid_env_name,
    ConfigError, EnvSpec, Kind, DEFAULT_TIMEOUT, MAX_ENV_BYTES, MAX_ENV_VARS, RESERVED_ENV_PREFIX,
};
pub use error::EnvError;
pub use exec::{
    not_a_directory, refused_cwd, shell_words, shell_words_after, stdin_file, ExecRequest,
    BASH_OR_SH, CWD_REFUSED, CWD_REFUSED_CODE, MERGE_OUTPUT,
};
pub use image::{cached_image, fnv1a};
pub use spawn::{ExecResult, Limits};
pub use tool::{first_on_path, on_path, run_tool};

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
    /// The longest a fork's copy into this instance may take (`--fork-timeout`).
    pub fork_timeout: std::time::Duration,
    /// For a fork: what `Environment::fork_into` of its source made, which its start
    /// begins from (the copied state is already in place); `None` for a start.
    pub fork: Option<fork::ForkSeed>,
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
            fork_timeout: fork::FORK_TIMEOUT,
            fork: None,
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

/// The prefix of every container, instance or job name arservice creates.
pub const SANDBOX_PREFIX: &str = "ars-";

/// Creates an instance's own directory (`InstanceContext::root`), private to the server's
/// user (0700), so that no other user of the machine reads what its commands leave there.
pub fn instance_dir(root: &std::path::Path) -> Result<(), EnvError> {
    crate::state_dir::private_dir(root).map_err(|source| EnvError::Io {
        context: format!("cannot create {}", root.display()),
        source,
    })
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

    /// The CPU time the sandbox's processes used so far, in seconds, when the environment
    /// can tell (docker and podman: their container's cgroup); `None` otherwise, or once the
    /// sandbox is gone. A file read at most: `/stats` asks it of every instance.
    fn cpu_seconds(&self) -> Option<f64> {
        None
    }

    /// For an environment with an agent: its agent-or-CLI choice and the directory relative
    /// paths start from. `/files` then goes through the agent (the default `put_file` and
    /// `get_file`); `None` (the default) has no file access unless those are implemented.
    fn agent_files(&self) -> Option<(&agent::Exec, &str)> {
        None
    }

    /// Writes the body to the file `upload.path` names in the sandbox, or unpacks it (a tar)
    /// into that directory (`PUT /files`); a relative path is taken from the instance's
    /// working directory. The bytes the body had.
    fn put_file(
        &self,
        upload: &files::Upload,
        body: &mut dyn std::io::Read,
    ) -> Result<u64, EnvError> {
        match self.agent_files() {
            Some((exec, base)) => exec.put_file(base, upload, body),
            None => Err(EnvError::Invalid(NO_FILES.into())),
        }
    }

    /// Opens the file or directory at `path` in the sandbox for a download (`GET /files`).
    fn get_file(&self, path: &str) -> Result<files::Download, EnvError> {
        match self.agent_files() {
            Some((exec, base)) => exec.get_file(base, path),
            None => Err(EnvError::Invalid(NO_FILES.into())),
        }
    }

    /// What to show in `/stats` about the sandbox (its container name, say).
    fn describe(&self) -> Map<String, Value> {
        Map::new()
    }

    /// Prepares a fork of this sandbox into the new instance `dst` (`POST /fork_instance`):
    /// copies its writable state (files, never processes) where `dst`'s start will find it,
    /// or commits its container to an image, and says so in the seed that start reads from
    /// `dst.fork`. Leaves nothing behind when it fails. The default: this environment cannot
    /// fork (a 400).
    fn fork_into(&self, _dst: &InstanceContext) -> Result<fork::ForkSeed, EnvError> {
        Err(fork::cannot_fork("this instance's environment"))
    }

    /// What a later life of the server needs to take this sandbox over after a crash (it
    /// goes into the journal); `None` when the sandbox cannot outlive the server (its
    /// keep-alive process dies with it), so that a restart removes it instead.
    fn handle(&self) -> Option<Value> {
        None
    }
}

/// Why an environment without file access refuses `/files`.
pub const NO_FILES: &str = "this instance's environment has no file access: /files needs the agent path (exec_mode \"agent\") or container_type local";

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
