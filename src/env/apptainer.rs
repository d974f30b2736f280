//! The `singularity`/`apptainer` environment, the way HPC sites run many short sandboxes:
//! the image is converted to a SIF once and cached, each instance is an `instance start` with a
//! writable layer of its own, commands go through `exec instance://<name>`, close is
//! `instance stop`.
//!
//! Owns those command lines and nothing else. Processes of an apptainer instance live in the
//! host's process table, so a timeout kills them by their markers (`ARSERVICE_INSTANCE`,
//! `ARSERVICE_EXEC`), not only the local `apptainer exec` client.
//!
//! With an agent, `instance start` binds the agent binary and the instance's agent directory
//! (mode 0700, this instance's only) into the instance, and one long-lived
//! `apptainer exec instance://<name> /.arservice/agent agent ...` runs the agent with exactly the
//! environment and working directory a command of the CLI path gets; commands then go over its
//! socket. When it does not come up, commands go through `apptainer exec` as without one.

use super::spawn::{self, Marker, ProcessGroups, EXEC_MARKER, INSTANCE_MARKER};
use super::{
    cached_image, first_on_path, parse_timeout, run_tool, shell_words, EnvError, EnvSpec,
    Environment, ExecRequest, ExecResult, InstanceContext,
};
use crate::agent::{
    AgentClient, AgentExec, AgentMount, AGENT_DIR_IN_SANDBOX, AGENT_IN_SANDBOX, SOCKET_IN_SANDBOX,
};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The CLIs that run this environment, in order of preference.
const CLIS: [&str; 2] = ["apptainer", "singularity"];

/// Default bound on converting an image (`build_timeout`).
const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(1800);

/// Default bound on `instance start` and `instance stop` (`container_timeout`).
const DEFAULT_CONTAINER_TIMEOUT: Duration = Duration::from_secs(120);

/// How much of the agent's log a warning quotes when the agent did not come up.
const AGENT_LOG_CHARS: usize = 300;

/// Where an instance's writes go.
#[derive(Debug, Clone, PartialEq)]
pub enum Writable {
    /// `--writable-tmpfs`: in memory, small, gone on close (the default).
    Tmpfs,
    /// `--overlay <dir>`: a directory under the instance's state dir, for big writes.
    Overlay(PathBuf),
}

/// Apptainer's type-specific keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ApptainerOptions {
    pub writable: Writable,
    pub build_timeout: Duration,
    pub container_timeout: Duration,
}

impl ApptainerOptions {
    pub fn parse(
        raw: &Map<String, Value>,
        ctx: &InstanceContext,
    ) -> Result<ApptainerOptions, EnvError> {
        let writable = match raw.get("writable").and_then(Value::as_str) {
            None | Some("tmpfs") => Writable::Tmpfs,
            Some("overlay") => Writable::Overlay(ctx.root.join("overlay")),
            Some(other) => {
                return Err(EnvError::Invalid(format!(
                    "writable must be \"tmpfs\" or \"overlay\", got \"{other}\""
                )))
            }
        };
        let timeout = |key: &str, default: Duration| match raw.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => parse_timeout(value, key).map_err(EnvError::Invalid),
        };
        Ok(ApptainerOptions {
            writable,
            build_timeout: timeout("build_timeout", DEFAULT_BUILD_TIMEOUT)?,
            container_timeout: timeout("container_timeout", DEFAULT_CONTAINER_TIMEOUT)?,
        })
    }
}

/// Where a build reads the image from: the image as given when it names a scheme, else a
/// docker reference.
pub fn build_source(image: &str) -> String {
    if image.contains("://") {
        image.to_string()
    } else {
        format!("docker://{image}")
    }
}

/// The environment as the CLI's own `<PREFIX>ENV_NAME=value` variables: passed on unchanged
/// even with `--cleanenv`, never split (`--env` reads a value with a second `=` as a list
/// and strips quotes), and never visible in `ps`.
fn tool_env(cli: &str, env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let singularity = Path::new(cli)
        .file_name()
        .is_some_and(|name| name == "singularity");
    let prefix = if singularity {
        "SINGULARITYENV_"
    } else {
        "APPTAINERENV_"
    };
    env.iter()
        .map(|(name, value)| (format!("{prefix}{name}"), value.clone()))
        .collect()
}

/// The arguments of `instance start` (after the program name); with an agent, its binary
/// (read-only) and its directory are bound in, and every `exec instance://` sees them.
pub fn start_arguments(
    sif: &Path,
    name: &str,
    options: &ApptainerOptions,
    agent: Option<&AgentMount>,
) -> Vec<String> {
    let mut args: Vec<String> = ["instance", "start", "--contain", "--cleanenv"]
        .map(String::from)
        .to_vec();
    match &options.writable {
        Writable::Tmpfs => args.push("--writable-tmpfs".into()),
        Writable::Overlay(dir) => args.extend(["--overlay".into(), dir.display().to_string()]),
    }
    if let Some(agent) = agent {
        args.extend([
            "--bind".into(),
            format!("{}:{AGENT_IN_SANDBOX}:ro", agent.binary.display()),
            "--bind".into(),
            format!("{}:{AGENT_DIR_IN_SANDBOX}", agent.dir.display()),
        ]);
    }
    args.extend([sif.display().to_string(), name.to_string()]);
    args
}

/// True when `path` can be one field of a `--bind SRC:DST[:OPTS]` value: apptainer splits the
/// value at commas (several binds) and at colons (its fields), with no quoting.
fn bind_safe(path: &Path) -> bool {
    !path.to_string_lossy().contains([',', ':'])
}

/// One apptainer instance.
pub struct ApptainerEnv {
    cli: String,
    name: String,
    root_dir: PathBuf,
    cwd: Option<String>,
    env: BTreeMap<String, String>,
    shell: Option<Vec<String>>,
    container_timeout: Duration,
    groups: ProcessGroups,
    next_exec: AtomicU64,
    /// The agent inside the instance, when it answers; `None`: commands go through `exec`.
    agent: Option<AgentClient>,
    /// The local `apptainer exec` that runs the agent (its process group is killed on close).
    agent_process: Mutex<Option<Child>>,
    /// The host directory of the agent's socket, removed on close.
    agent_dir: Option<PathBuf>,
}

impl ApptainerEnv {
    pub fn start(spec: &EnvSpec, ctx: &InstanceContext) -> Result<ApptainerEnv, EnvError> {
        let options = ApptainerOptions::parse(&spec.raw, ctx)?;
        let force_cli = super::forces_cli(&spec.raw)?;
        let cli = cli_of(spec);
        let sif = if spec.image.ends_with(".sif") {
            let sif = PathBuf::from(&spec.image);
            if !sif.is_file() {
                return Err(EnvError::Invalid(format!(
                    "image '{}' is not a SIF file here",
                    spec.image
                )));
            }
            sif
        } else {
            let source = build_source(&spec.image);
            cached_image(&ctx.cache_dir(), "sif", "sif", &source, |partial| {
                let mut build = Command::new(&cli);
                build.arg("build").arg(partial).arg(&source);
                run_tool(&format!("{cli} build"), build, options.build_timeout).map(drop)
            })?
        };
        let env = instance_env(spec, ctx);
        let mount =
            AgentMount::for_instance(ctx, force_cli, "apptainer's --bind (',' or ':')", bind_safe)?;
        let mut this = ApptainerEnv {
            cli,
            name: ctx.sandbox_name(),
            root_dir: ctx.root.clone(),
            cwd: spec.cwd.clone(),
            env,
            shell: spec.shell.clone(),
            container_timeout: options.container_timeout,
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            agent: None,
            agent_process: Mutex::new(None),
            agent_dir: mount.as_ref().map(|mount| mount.dir.clone()),
        };
        let started = (|| {
            let dir = match &options.writable {
                Writable::Overlay(dir) => dir,
                Writable::Tmpfs => &this.root_dir,
            };
            super::instance_dir(&this.root_dir)?;
            std::fs::create_dir_all(dir).map_err(|source| EnvError::Io {
                context: format!("cannot create {}", dir.display()),
                source,
            })?;
            let mut start = Command::new(&this.cli);
            start
                .args(start_arguments(&sif, &this.name, &options, mount.as_ref()))
                .envs(tool_env(&this.cli, &this.env));
            run_tool(
                &format!("{} instance start", this.cli),
                start,
                this.container_timeout,
            )?;
            if let Some(cwd) = &this.cwd {
                // Like docker's --workdir: the working directory exists from the start.
                let mut mkdir = Command::new(&this.cli);
                mkdir.args([
                    "exec",
                    &format!("instance://{}", this.name),
                    "mkdir",
                    "-p",
                    cwd,
                ]);
                run_tool(
                    &format!("{} exec mkdir", this.cli),
                    mkdir,
                    this.container_timeout,
                )?;
            }
            Ok(())
        })();
        let started = started.and_then(|()| match &mount {
            Some(mount) => this.start_agent(mount),
            None => Ok(()),
        });
        if let Err(err) = started {
            let _ = this.close();
            return Err(err);
        }
        Ok(this)
    }

    /// Takes over an instance of an earlier life of this server (`handle` from
    /// [`Environment::handle`]): it must still be listed. Its agent, if it had one, is used
    /// again when it answers. Commands that were running through `exec` lost their clients and
    /// the timeout the earlier life enforced: they are killed (by their markers).
    pub fn adopt(
        spec: &EnvSpec,
        ctx: &InstanceContext,
        handle: &Value,
    ) -> Result<ApptainerEnv, EnvError> {
        let options = ApptainerOptions::parse(&spec.raw, ctx)?;
        let cli = cli_of(spec);
        let name = ctx.sandbox_name();
        if handle["instance"].as_str() != Some(name.as_str()) {
            return Err(EnvError::Invalid(format!(
                "the journal names another instance than {name}"
            )));
        }
        if !instance_names(&cli)?.contains(&name) {
            return Err(EnvError::Gone(format!(
                "instance {name} is no longer running"
            )));
        }
        let agent_dir = AgentMount::dir_of(ctx);
        let agent = Some(AgentClient::new(agent_dir.join("agent.sock")))
            .filter(|client| handle["agent"].as_bool() == Some(true) && client.ready());
        spawn::signal_marked(
            &[
                Marker::Is(INSTANCE_MARKER, &name),
                Marker::StartsWith(EXEC_MARKER, ""),
            ],
            libc::SIGKILL,
        );
        Ok(ApptainerEnv {
            cli,
            name,
            root_dir: ctx.root.clone(),
            cwd: spec.cwd.clone(),
            env: instance_env(spec, ctx),
            shell: spec.shell.clone(),
            container_timeout: options.container_timeout,
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            agent,
            // The earlier life's `exec` of the agent is not our child: close ends the agent
            // by its marker, and that `exec` with it.
            agent_process: Mutex::new(None),
            agent_dir: Some(agent_dir),
        })
    }

    /// Runs the agent inside the instance and waits until it answers; if it exits first (it
    /// cannot run there) or never answers, commands go through `apptainer exec`.
    fn start_agent(&mut self, mount: &AgentMount) -> Result<(), EnvError> {
        let mut command = Command::new(&self.cli);
        command
            .args(self.agent_arguments())
            .envs(tool_env(&self.cli, &self.env));
        let log = self.root_dir.join("agent.log");
        let child = spawn::spawn_daemon(command, &log).map_err(|source| EnvError::Io {
            context: format!("cannot run {} exec (the agent)", self.cli),
            source,
        })?;
        *self.agent_process.lock() = Some(child);
        self.agent = mount.connect(&|| spawn::has_exited(&self.agent_process));
        if self.agent.is_none() {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            log::warn!(
                "the agent did not come up in {} ({}): its commands go through {} exec",
                self.name,
                super::tail(said.trim(), AGENT_LOG_CHARS),
                self.cli
            );
            self.stop_agent();
        }
        Ok(())
    }

    /// The arguments of the `exec` that runs the agent (after the program name): the
    /// environment (see [`tool_env`]) and working directory of a command of the CLI path.
    fn agent_arguments(&self) -> Vec<String> {
        let mut args: Vec<String> = ["exec", "--cleanenv", "--pwd"].map(String::from).to_vec();
        args.extend([
            self.base_cwd().to_string(),
            format!("instance://{}", self.name),
            AGENT_IN_SANDBOX.into(),
            "agent".into(),
            "--socket".into(),
            SOCKET_IN_SANDBOX.into(),
        ]);
        args
    }

    /// Kills the agent's `exec` and everything in its process group, and waits for it.
    fn stop_agent(&self) {
        if let Some(mut process) = self.agent_process.lock().take() {
            spawn::signal_group(process.id() as i32, libc::SIGKILL);
            let _ = process.wait();
        }
    }

    /// Where commands run unless they say otherwise.
    fn base_cwd(&self) -> &str {
        self.cwd.as_deref().unwrap_or("/")
    }

    /// One command for the agent: like the CLI path, in the instance's directory unless it
    /// names its own, its `env` on top of the instance's (which the agent runs with).
    fn agent_exec(&self, request: &ExecRequest) -> AgentExec {
        let mut exec = AgentExec::from_request(request, self.base_cwd(), self.shell.clone());
        exec.cwd.get_or_insert_with(|| self.base_cwd().to_string());
        exec
    }

    /// The arguments of `exec` for one command (after the program name).
    fn exec_arguments(&self, request: &ExecRequest) -> Vec<String> {
        let mut args: Vec<String> = ["exec", "--cleanenv"].map(String::from).to_vec();
        // Always an absolute --pwd: without one, apptainer picks the server's own directory.
        let base = self.base_cwd();
        let cwd = match &request.cwd {
            Some(cwd) => Path::new(base).join(cwd),
            None => Path::new(base).to_path_buf(),
        };
        args.extend(["--pwd".into(), cwd.display().to_string()]);
        args.extend([format!("instance://{}", self.name)]);
        args.extend(shell_words(self.shell.as_deref(), &request.cmd));
        args
    }

    /// The environment of one command: the instance's, the command's, and the markers.
    fn exec_env(&self, request: &ExecRequest, exec_id: &str) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.extend(request.env.clone());
        env.insert(EXEC_MARKER.into(), exec_id.into());
        tool_env(&self.cli, &env)
    }

    fn marker(&self) -> Marker<'_> {
        Marker::Is(INSTANCE_MARKER, &self.name)
    }
}

impl Environment for ApptainerEnv {
    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        if let Some(agent) = &self.agent {
            return agent
                .exec(&self.agent_exec(request))
                .map_err(|err| err.into_env_error(&self.name));
        }
        let exec_id = self.next_exec.fetch_add(1, Ordering::Relaxed).to_string();
        let mut command = Command::new(&self.cli);
        command
            .args(self.exec_arguments(request))
            .envs(self.exec_env(request, &exec_id));
        spawn::run_marked(command, request.limits, &self.groups, &self.name, &exec_id).map_err(
            |source| EnvError::Io {
                context: format!("cannot run {} exec", self.cli),
                source,
            },
        )
    }

    fn close(&self) -> Result<(), EnvError> {
        self.groups.kill_all();
        self.stop_agent();
        spawn::kill_marked(self.marker());
        if let Some(dir) = &self.agent_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        let mut stop = Command::new(&self.cli);
        stop.args(["instance", "stop", &self.name]);
        match run_tool(
            &format!("{} instance stop", self.cli),
            stop,
            self.container_timeout,
        ) {
            Err(EnvError::Tool { detail, .. }) if no_such_instance(&detail) => {}
            other => {
                other?;
            }
        }
        super::local::remove_tree(&self.root_dir)
    }

    fn describe(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert(
            "instance".into(),
            Value::from(format!("instance://{}", self.name)),
        );
        let mode = if self.agent.is_some() { "agent" } else { "cli" };
        map.insert("exec_mode".into(), Value::from(mode));
        map
    }

    fn handle(&self) -> Option<Value> {
        Some(serde_json::json!({"instance": self.name, "agent": self.agent.is_some()}))
    }
}

/// The CLI for a spec: `executable`, else `apptainer` or `singularity`, whichever is on `PATH`.
fn cli_of(spec: &EnvSpec) -> String {
    spec.executable
        .clone()
        .unwrap_or_else(|| first_on_path(&CLIS).to_string())
}

/// The instance's environment: `forward_env` from the server's, then `env`, then the marker.
fn instance_env(spec: &EnvSpec, ctx: &InstanceContext) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for name in &spec.forward_env {
        if let Ok(value) = std::env::var(name) {
            env.insert(name.clone(), value);
        }
    }
    env.extend(spec.env.clone());
    env.insert(INSTANCE_MARKER.into(), ctx.sandbox_name());
    env
}

/// The names of the running instances, as `instance list` shows them.
fn instance_names(cli: &str) -> Result<Vec<String>, EnvError> {
    let mut list = Command::new(cli);
    list.args(["instance", "list"]);
    let listing = run_tool(
        &format!("{cli} instance list"),
        list,
        DEFAULT_CONTAINER_TIMEOUT,
    )?;
    Ok(listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(String::from)
        .collect())
}

/// What apptainer says when stopping an instance that is not running.
fn no_such_instance(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    detail.contains("no instance found") || detail.contains("does not exist")
}

/// Stops every instance whose name starts with `prefix` (`ars-<server_id>-`) but the
/// `adopted` ones (by name): leftovers of an earlier life. Returns how many.
pub fn reap_leftovers(cli: &str, prefix: &str, adopted: &[String]) -> Result<usize, EnvError> {
    let names: Vec<String> = instance_names(cli)?
        .into_iter()
        .filter(|name| name.starts_with(prefix) && !adopted.contains(name))
        .collect();
    let mut stopped = 0;
    for name in &names {
        let mut stop = Command::new(cli);
        stop.args(["instance", "stop", name]);
        // One that fails must not keep the others alive; one already gone is fine.
        match run_tool(
            &format!("{cli} instance stop"),
            stop,
            DEFAULT_CONTAINER_TIMEOUT,
        ) {
            Ok(_) => stopped += 1,
            Err(EnvError::Tool { detail, .. }) if no_such_instance(&detail) => {}
            Err(err) => log::warn!("cannot stop leftover instance {name}: {err}"),
        }
    }
    Ok(stopped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Limits;
    use crate::env::BASH_OR_SH;
    use serde_json::json;

    fn ctx() -> InstanceContext {
        InstanceContext::for_tests("r")
    }

    #[test]
    fn start_command_line_with_each_writable_layer() {
        let tmpfs = ApptainerOptions::parse(json!({}).as_object().unwrap(), &ctx()).unwrap();
        assert_eq!(
            start_arguments(Path::new("/c/x.sif"), "ars-abcd1234-r", &tmpfs, None),
            [
                "instance",
                "start",
                "--contain",
                "--cleanenv",
                "--writable-tmpfs",
                "/c/x.sif",
                "ars-abcd1234-r"
            ]
        );
        let overlay =
            ApptainerOptions::parse(json!({"writable": "overlay"}).as_object().unwrap(), &ctx())
                .unwrap();
        assert_eq!(
            start_arguments(Path::new("/c/x.sif"), "n", &overlay, None),
            [
                "instance",
                "start",
                "--contain",
                "--cleanenv",
                "--overlay",
                "/state/instances/r/overlay",
                "/c/x.sif",
                "n"
            ]
        );
        assert!(
            ApptainerOptions::parse(json!({"writable": "disk"}).as_object().unwrap(), &ctx())
                .is_err()
        );
    }

    #[test]
    fn build_sources() {
        assert_eq!(build_source("python:3.11"), "docker://python:3.11");
        assert_eq!(
            build_source("docker-daemon://img:1"),
            "docker-daemon://img:1"
        );
        assert_eq!(build_source("library://alpine"), "library://alpine");
    }

    fn instance() -> ApptainerEnv {
        ApptainerEnv {
            cli: "apptainer".into(),
            name: "ars-abcd1234-r".into(),
            root_dir: "/state/instances/r".into(),
            cwd: Some("/testbed".into()),
            env: [(INSTANCE_MARKER.to_string(), "ars-abcd1234-r".to_string())].into(),
            shell: None,
            container_timeout: DEFAULT_CONTAINER_TIMEOUT,
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            agent: None,
            agent_process: Mutex::new(None),
            agent_dir: None,
        }
    }

    fn request() -> ExecRequest {
        ExecRequest {
            cmd: "ls".into(),
            cwd: Some("sub".into()),
            env: [("K".to_string(), "V".to_string())].into(),
            limits: Limits {
                timeout: Duration::from_secs(1),
                max_output_bytes: 1,
            },
        }
    }

    #[test]
    fn start_command_line_with_the_agent_bound_in() {
        let tmpfs = ApptainerOptions::parse(json!({}).as_object().unwrap(), &ctx()).unwrap();
        let mount = AgentMount {
            binary: "/opt/ars/arservice".into(),
            dir: "/state/agents/00ff".into(),
        };
        assert_eq!(
            start_arguments(Path::new("/c/x.sif"), "n", &tmpfs, Some(&mount)),
            [
                "instance",
                "start",
                "--contain",
                "--cleanenv",
                "--writable-tmpfs",
                "--bind",
                "/opt/ars/arservice:/.arservice/agent:ro",
                "--bind",
                "/state/agents/00ff:/.arservice/run",
                "/c/x.sif",
                "n"
            ]
        );
        assert!(bind_safe(Path::new("/state/agents/00ff")));
        assert!(!bind_safe(Path::new("/state,x/agents")));
        assert!(!bind_safe(Path::new("/state:x/agents")));
    }

    #[test]
    fn the_agent_runs_with_a_commands_environment_and_directory() {
        let env = instance();
        assert_eq!(
            env.agent_arguments(),
            [
                "exec",
                "--cleanenv",
                "--pwd",
                "/testbed",
                "instance://ars-abcd1234-r",
                "/.arservice/agent",
                "agent",
                "--socket",
                "/.arservice/run/agent.sock",
            ]
        );
        // The agent gets the instance's environment as a command does (the same
        // APPTAINERENV_* variables, less the command's own marker), then each command adds
        // its env and, without a cwd of its own, runs in the instance's.
        assert_eq!(
            tool_env(&env.cli, &env.env),
            [(
                "APPTAINERENV_ARSERVICE_INSTANCE".to_string(),
                "ars-abcd1234-r".to_string()
            )]
        );
        let exec = env.agent_exec(&request());
        assert_eq!(exec.cwd.as_deref(), Some("/testbed/sub"));
        assert_eq!(exec.env, request().env);
        let here = env.agent_exec(&ExecRequest {
            cwd: None,
            ..request()
        });
        assert_eq!(here.cwd.as_deref(), Some("/testbed"));
        let plain = ApptainerEnv { cwd: None, ..env };
        assert_eq!(plain.agent_arguments()[3], "/");
        let here = plain.agent_exec(&ExecRequest {
            cwd: None,
            ..request()
        });
        assert_eq!(here.cwd.as_deref(), Some("/"));
    }

    #[test]
    fn exec_command_line() {
        let env = instance();
        let request = request();
        assert_eq!(
            env.exec_arguments(&request),
            [
                "exec",
                "--cleanenv",
                "--pwd",
                "/testbed/sub",
                "instance://ars-abcd1234-r",
                "sh",
                "-c",
                BASH_OR_SH,
                "sh",
                "ls",
            ]
        );
        assert_eq!(
            env.exec_env(&request, "4"),
            [
                ("APPTAINERENV_ARSERVICE_EXEC".to_string(), "4".to_string()),
                (
                    "APPTAINERENV_ARSERVICE_INSTANCE".to_string(),
                    "ars-abcd1234-r".to_string()
                ),
                ("APPTAINERENV_K".to_string(), "V".to_string()),
            ]
        );
        let plain = ApptainerEnv { cwd: None, ..env };
        let args = plain.exec_arguments(&request);
        assert_eq!(args[2..4], ["--pwd", "/sub"]);
        assert_eq!(
            tool_env(
                "/usr/bin/singularity",
                &[("A".to_string(), "b=c,d".to_string())].into()
            ),
            [("SINGULARITYENV_A".to_string(), "b=c,d".to_string())]
        );
    }
}
