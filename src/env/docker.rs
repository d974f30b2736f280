//! The `docker` (and `podman`) environment: one keep-alive container per instance, commands
//! through `<cli> exec`.
//!
//! Owns the command lines of `run`, `exec`, `rm` and the in-container kill, and nothing else:
//! every call goes through the spawn helper with a timeout. The container is named
//! `ars-<server_id>-<run_id>` and labelled with the server's identity, so a restarted server
//! can remove what an earlier life left (see [`reap_leftovers`]).
//!
//! Killing `docker exec` does not stop the command inside the container (moby#9098), so every
//! command carries a marker variable `ARSERVICE_EXEC=<id>` and a timeout kills, inside the
//! container, every process whose environment has that marker.

use super::spawn::{self, ProcessGroups, EXEC_MARKER};
use super::{
    parse_timeout, run_tool, shell_words, EnvError, EnvSpec, Environment, ExecRequest, ExecResult,
    InstanceContext, Kind,
};
use crate::agent::{
    AgentClient, AgentExec, AgentMount, AGENT_DIR_IN_SANDBOX, AGENT_IN_SANDBOX, SOCKET_IN_SANDBOX,
};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// Default bound on `run`, `rm` and other container calls (`container_timeout`).
const DEFAULT_CONTAINER_TIMEOUT: Duration = Duration::from_secs(120);

/// Default bound on `pull` (`pull_timeout`).
const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// Bound on the small calls made while a command times out (the in-container kill).
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a timeout waits for the in-container kill before it goes on. The kill itself is
/// done within milliseconds, but the engine (containerd 1.6 here) can hold back the end of
/// an `exec` for about 4 s while the process of an earlier exec has exited and something it
/// started still holds that exec's output: exactly what a timed-out command whose background
/// job ignores SIGTERM leaves. The kill call then finishes on its own thread.
const KILL_WAIT: Duration = Duration::from_millis(250);

/// Bound on the start-up sweep of leftover containers.
const REAP_TIMEOUT: Duration = Duration::from_secs(60);

/// Label keys on every container arservice creates.
pub const LABEL_SERVER: &str = "arservice.server";
pub const LABEL_RUN_ID: &str = "arservice.run_id";

/// Keeps the container alive until it is removed; `--init` reaps zombies as PID 1.
const KEEP_ALIVE: &str = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

/// Finds every process carrying marker `$2` and sends it signal `$1`.
const KILL_MARKED: &str = "for d in /proc/[0-9]*; do \
     if tr '\\0' '\\n' < \"$d/environ\" 2>/dev/null | grep -qx \"ARSERVICE_EXEC=$2\"; then \
     kill -\"$1\" \"${d#/proc/}\" 2>/dev/null; fi; done; exit 0";

/// What docker and podman say when `--pull never` meets a missing image.
fn image_missing(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    detail.contains("no such image")
        || detail.contains("unable to find image")
        || detail.contains("image not known")
}

/// Docker's type-specific keys.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerOptions {
    /// Extra `run` arguments, placed before the image.
    pub run_args: Vec<String>,
    /// `exec_mode: "cli"` forces `docker exec` even when an agent is available.
    pub force_cli: bool,
    pub container_timeout: Duration,
    pub pull_timeout: Duration,
}

impl DockerOptions {
    pub fn parse(raw: &Map<String, Value>) -> Result<DockerOptions, EnvError> {
        let run_args = match raw.get("run_args") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    EnvError::Invalid(
                        "run_args must be a list of strings, like [\"--network\", \"none\"]".into(),
                    )
                })?,
            Some(other) => {
                return Err(EnvError::Invalid(format!(
                    "run_args must be a list of strings, got {other}"
                )))
            }
        };
        let timeout = |key: &str, default: Duration| match raw.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => parse_timeout(value, key).map_err(EnvError::Invalid),
        };
        let force_cli = super::forces_cli(raw)?;
        Ok(DockerOptions {
            run_args,
            force_cli,
            container_timeout: timeout("container_timeout", DEFAULT_CONTAINER_TIMEOUT)?,
            pull_timeout: timeout("pull_timeout", DEFAULT_PULL_TIMEOUT)?,
        })
    }
}

/// The CLI for a spec: `executable`, else `docker` or `podman` by `container_type`.
pub fn cli_of(spec: &EnvSpec) -> String {
    spec.executable.clone().unwrap_or_else(|| {
        if spec.kind == Kind::Podman {
            "podman".into()
        } else {
            "docker".into()
        }
    })
}

/// The arguments of `<cli> run` for this instance (after the program name); `env_file` holds
/// the instance's environment (see [`write_env_file`]).
pub fn run_arguments(
    spec: &EnvSpec,
    ctx: &InstanceContext,
    options: &DockerOptions,
    agent: Option<&AgentMount>,
    env_file: Option<&Path>,
) -> Vec<String> {
    let mut args: Vec<String> = vec!["run".into(), "--detach".into()];
    if agent.is_none() {
        // `sleep` as PID 1 would never reap zombies; the agent is an init of its own.
        args.push("--init".into());
    }
    args.extend([
        "--pull=never".into(),
        "--name".into(),
        ctx.sandbox_name(),
        "--label".into(),
        format!("{LABEL_SERVER}={}", ctx.server_id),
        "--label".into(),
        format!("{LABEL_RUN_ID}={}", ctx.run_id),
    ]);
    if let Some(cwd) = &spec.cwd {
        args.extend(["--workdir".into(), cwd.clone()]);
    }
    if let Some(env_file) = env_file {
        // Values go in a private file, never on the command line, where `ps` shows them.
        args.extend(["--env-file".into(), env_file.display().to_string()]);
    }
    if let Some(limit) = ctx.pids_limit {
        args.push(format!("--pids-limit={limit}"));
    }
    if let Some(cpus) = spec.resources.get("cpus") {
        args.push(format!("--cpus={}", cpus.as_f64()));
    }
    if let Some(memory_gb) = spec.resources.get("memory_gb") {
        let bytes = (memory_gb.as_f64() * (1u64 << 30) as f64).round() as u64;
        args.push(format!("--memory={bytes}"));
    }
    if let Some(gpus) = spec.resources.get("gpus") {
        let whole = gpus.as_f64().ceil() as u64;
        if whole > 0 {
            args.push(format!("--gpus={whole}"));
        }
    }
    if let Some(agent) = agent {
        args.extend([
            "--volume".into(),
            format!("{}:{AGENT_IN_SANDBOX}:ro", agent.binary.display()),
            "--volume".into(),
            format!("{}:{AGENT_DIR_IN_SANDBOX}", agent.dir.display()),
        ]);
    }
    args.extend(options.run_args.iter().cloned());
    if agent.is_some() {
        // The agent is the container's PID 1: its init and its command runner.
        args.extend([
            "--entrypoint".into(),
            AGENT_IN_SANDBOX.into(),
            spec.image.clone(),
            "agent".into(),
            "--socket".into(),
            SOCKET_IN_SANDBOX.into(),
        ]);
    } else {
        args.extend([
            "--entrypoint".into(),
            "sh".into(),
            spec.image.clone(),
            "-c".into(),
            KEEP_ALIVE.into(),
        ]);
    }
    args
}

/// Writes `env` as a private (0600) env file `<dir>/<name>` for `--env-file`, so that no value
/// shows on a command line; `None` when there is nothing to write. A value with a line break,
/// which an env file cannot carry, is refused (400).
pub fn write_env_file(
    dir: &Path,
    name: &str,
    env: &[(String, String)],
) -> Result<Option<PathBuf>, EnvError> {
    if env.is_empty() {
        return Ok(None);
    }
    if let Some((key, _)) = env.iter().find(|(_, value)| value.contains(['\n', '\r'])) {
        return Err(EnvError::Invalid(format!(
            "the value of {key} has a line break, which docker's --env-file cannot carry \
             (and the command line would show it to every user of the machine): \
             put it in a file in the sandbox instead"
        )));
    }
    let io = |source| EnvError::Io {
        context: format!("cannot write an env file in {}", dir.display()),
        source,
    };
    super::instance_dir(dir)?;
    let path = dir.join(name);
    let mut file = crate::state_dir::create_private_file(&path).map_err(io)?;
    let text: String = env
        .iter()
        .map(|(key, value)| format!("{key}={value}\n"))
        .collect();
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(io)?;
    Ok(Some(path))
}

/// `forward_env` (from the server's environment) and then `env`.
fn instance_env(spec: &EnvSpec) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = spec
        .forward_env
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|value| (name.clone(), value)))
        .collect();
    env.retain(|(name, _)| !spec.env.contains_key(name));
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// One container.
pub struct DockerEnv {
    cli: String,
    name: String,
    /// How a command string runs; `None`: `bash -lc` when the image has bash, else `sh -c`.
    shell: Option<Vec<String>>,
    /// The working directory relative `cwd`s are taken from.
    cwd: String,
    container_timeout: Duration,
    groups: ProcessGroups,
    next_exec: AtomicU64,
    /// The shared view of this server's containers, for health checks.
    watch: Arc<ContainerWatch>,
    /// The agent inside the container, when it runs; `None`: commands go through `exec`.
    agent: Option<AgentClient>,
    /// The host directory of the agent's socket, removed on close.
    agent_dir: Option<PathBuf>,
    /// When `run` (or the adoption) returned: health listings older than this cannot see it.
    running_since: Instant,
    /// The instance's directory, for the env files of `run` and `exec` (private, removed on
    /// close).
    root: PathBuf,
    /// False when a client chose the CLI (`EnvSpec::client_executable`): the health round
    /// never runs it.
    health_checked: bool,
}

/// The env file of `run`, removed once the container runs.
const RUN_ENV_FILE: &str = "run.env";

/// How often a close looks again when another removal of its container is in progress.
const REMOVAL_POLL: Duration = Duration::from_millis(100);

/// How old the shared view of the containers may get before a health check refreshes it.
const WATCH_MAX_AGE: Duration = Duration::from_secs(2);

/// This server's containers as one `ps` call shows them: the health of every instance costs
/// one CLI call per [`WATCH_MAX_AGE`], not one per instance.
pub struct ContainerWatch {
    cli: String,
    server_id: String,
    state: Mutex<(Option<Instant>, HashMap<String, String>)>,
}

/// One watch per (CLI, server).
type Watches = HashMap<(String, String), Arc<ContainerWatch>>;
static WATCHES: LazyLock<Mutex<Watches>> = LazyLock::new(Default::default);

impl ContainerWatch {
    fn of(cli: &str, server_id: &str) -> Arc<ContainerWatch> {
        let key = (cli.to_string(), server_id.to_string());
        Arc::clone(WATCHES.lock().entry(key).or_insert_with(|| {
            Arc::new(ContainerWatch {
                cli: cli.to_string(),
                server_id: server_id.to_string(),
                state: Mutex::new((None, HashMap::new())),
            })
        }))
    }

    /// `Some(reason)` when container `name`, started at `started`, is gone or no longer
    /// running. A listing older than the container cannot tell, so it is refreshed.
    fn ended(&self, name: &str, started: Instant) -> Option<String> {
        let stale = self
            .state
            .lock()
            .0
            .is_none_or(|at| at.elapsed() > WATCH_MAX_AGE || at < started);
        if stale {
            let mut ps = Command::new(&self.cli);
            ps.args(["ps", "--all", "--filter"])
                .arg(format!("label={LABEL_SERVER}={}", self.server_id))
                .args(["--format", "{{.Names}}|{{.State}}|{{.Status}}"]);
            // An engine that does not answer is not a dead container: say nothing.
            let listing = run_tool(&format!("{} ps", self.cli), ps, KILL_TIMEOUT).ok()?;
            let states = listing
                .lines()
                .filter_map(|line| line.split_once('|'))
                .map(|(name, rest)| (name.to_string(), rest.to_string()))
                .collect();
            *self.state.lock() = (Some(Instant::now()), states);
        }
        let state = self.state.lock();
        match state.1.get(name) {
            None => Some(format!("container {name} was removed from outside")),
            Some(rest) if rest.starts_with("running|") => None,
            Some(rest) => {
                let status = rest
                    .split_once('|')
                    .map_or(rest.as_str(), |(_, status)| status);
                Some(format!("container {name} is no longer running ({status})"))
            }
        }
    }
}

impl DockerEnv {
    /// Runs the container, pulling the image first only when it is missing.
    /// A failure leaves no container behind (a clashing container of someone else is kept),
    /// and no file.
    pub fn start(spec: &EnvSpec, ctx: &InstanceContext) -> Result<DockerEnv, EnvError> {
        let started =
            write_env_file(&ctx.root, RUN_ENV_FILE, &instance_env(spec)).and_then(|env_file| {
                let started = DockerEnv::run(spec, ctx, env_file.as_deref());
                if let Some(file) = env_file {
                    let _ = std::fs::remove_file(file);
                }
                started
            });
        if started.is_err() {
            let _ = super::local::remove_tree(&ctx.root);
        }
        started
    }

    /// [`DockerEnv::start`] with the instance's env file written.
    fn run(
        spec: &EnvSpec,
        ctx: &InstanceContext,
        env_file: Option<&Path>,
    ) -> Result<DockerEnv, EnvError> {
        let options = DockerOptions::parse(&spec.raw)?;
        let cli = cli_of(spec);
        let name = ctx.sandbox_name();
        let mount = AgentMount::for_instance(ctx, options.force_cli, "docker", |_| true)?;
        let mut agent = None;
        if let Some(mount) = &mount {
            match run_container(spec, ctx, &options, Some(mount), env_file) {
                Ok(()) => {
                    let exited = ContainerExited::new(&cli, &name);
                    agent = mount.connect(&|| exited.check());
                }
                // The agent could not even be executed (a `noexec` mount, a foreign
                // architecture): the runtime refuses the entrypoint.
                Err(EnvError::Tool { detail, .. }) if entrypoint_refused(&detail) => {
                    log::debug!("{cli} run with the agent of {name}: {detail}");
                }
                Err(err) => {
                    let _ = std::fs::remove_dir_all(&mount.dir);
                    return Err(err);
                }
            }
            if agent.is_none() {
                log::warn!(
                    "the agent did not come up in {name}: starting it again without, its commands go through {cli} exec"
                );
                remove_ours(&cli, &name, &ctx.server_id, options.container_timeout);
                let _ = std::fs::remove_dir_all(&mount.dir);
            }
        }
        if agent.is_none() {
            run_container(spec, ctx, &options, None, env_file)?;
        }
        let agent_dir = agent.as_ref().and(mount.map(|mount| mount.dir));
        Ok(DockerEnv::new(spec, ctx, &options, agent, agent_dir))
    }

    fn new(
        spec: &EnvSpec,
        ctx: &InstanceContext,
        options: &DockerOptions,
        agent: Option<AgentClient>,
        agent_dir: Option<PathBuf>,
    ) -> DockerEnv {
        let cli = cli_of(spec);
        DockerEnv {
            agent,
            agent_dir,
            watch: ContainerWatch::of(&cli, &ctx.server_id),
            cli,
            name: ctx.sandbox_name(),
            shell: spec.shell.clone(),
            cwd: spec.cwd.clone().unwrap_or_else(|| "/".into()),
            container_timeout: options.container_timeout,
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            running_since: Instant::now(),
            root: ctx.root.clone(),
            health_checked: !spec.client_executable,
        }
    }

    /// Takes over a container of an earlier life of this server (`handle` from
    /// [`Environment::handle`]): it must still run and carry this server's label. Its agent,
    /// if it had one, is used again when it answers; otherwise commands go through `exec`.
    pub fn adopt(
        spec: &EnvSpec,
        ctx: &InstanceContext,
        handle: &Value,
    ) -> Result<DockerEnv, EnvError> {
        let options = DockerOptions::parse(&spec.raw)?;
        let cli = cli_of(spec);
        let name = ctx.sandbox_name();
        if handle["container"].as_str() != Some(name.as_str()) {
            return Err(EnvError::Invalid(format!(
                "the journal names another container than {name}"
            )));
        }
        let mut inspect = Command::new(&cli);
        inspect.args(["inspect", "--format"]).arg(format!(
            "{{{{.State.Running}}}}|{{{{index .Config.Labels \"{LABEL_SERVER}\"}}}}"
        ));
        inspect.arg(&name);
        let state = match run_tool(
            &format!("{cli} inspect"),
            inspect,
            options.container_timeout,
        ) {
            Err(EnvError::Tool { detail, .. }) if detail.contains("No such") => {
                return Err(EnvError::Gone(format!("container {name} is gone")))
            }
            state => state?,
        };
        if state.trim() != format!("true|{}", ctx.server_id) {
            return Err(EnvError::Gone(format!(
                "container {name} is not running (state|label: {})",
                state.trim()
            )));
        }
        let agent_dir = AgentMount::dir_of(ctx);
        let agent = if handle["agent"].as_bool() == Some(true) {
            let client = AgentClient::new(agent_dir.join("agent.sock"));
            if client.ready() {
                Some(client)
            } else {
                log::warn!(
                    "the agent of {name} does not answer: its commands go through {cli} exec"
                );
                None
            }
        } else {
            None
        };
        let adopted = DockerEnv::new(spec, ctx, &options, agent, Some(agent_dir));
        if adopted.agent.is_none() {
            // Commands that were running through `exec` lost their clients and the timeout
            // that the earlier life enforced: end them (`grep -x` takes the marker as a regex).
            adopted.kill_marked(&format!("{}-.*", adopted.name), libc::SIGKILL);
        }
        Ok(adopted)
    }

    /// The arguments of `<cli> exec` for one command (after the program name); `env_file`
    /// holds the command's `env` (see [`write_env_file`]).
    fn exec_arguments(
        &self,
        request: &ExecRequest,
        marker: &str,
        env_file: Option<&Path>,
    ) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "exec".into(),
            "--env".into(),
            format!("{EXEC_MARKER}={marker}"),
        ];
        if let Some(cwd) = &request.cwd {
            args.extend([
                "--workdir".into(),
                Path::new(&self.cwd).join(cwd).display().to_string(),
            ]);
        }
        if let Some(env_file) = env_file {
            args.extend(["--env-file".into(), env_file.display().to_string()]);
        }
        args.push(self.name.clone());
        args.extend(shell_words(self.shell.as_deref(), &request.cmd));
        args
    }

    /// Runs one command through the agent in the container.
    fn exec_through(
        &self,
        agent: &AgentClient,
        request: &ExecRequest,
    ) -> Result<ExecResult, EnvError> {
        let exec = AgentExec::from_request(request, &self.cwd, self.shell.clone());
        agent
            .exec(&exec)
            .map_err(|err| err.into_env_error(&self.name))
    }

    /// Sends `signal` to every process inside the container that carries `marker`.
    fn kill_marked(&self, marker: &str, signal: i32) {
        kill_marked_in(&self.cli, &self.name, marker, signal);
    }

    /// [`Self::kill_marked`] for a timeout: waits for it at most [`KILL_WAIT`], so that the
    /// answer comes on time however long the engine takes to end the kill's own `exec`.
    fn kill_marked_soon(&self, marker: &str, signal: i32) {
        let (cli, name, owned) = (self.cli.clone(), self.name.clone(), marker.to_string());
        let (done, finished) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            kill_marked_in(&cli, &name, &owned, signal);
            let _ = done.send(());
        });
        if finished.recv_timeout(KILL_WAIT).is_err() {
            log::debug!("the kill of {marker} (signal {signal}) is still running: not waited for");
        }
    }
}

/// `<cli> exec <container> sh -c KILL_MARKED`: `signal` to every process carrying `marker`.
fn kill_marked_in(cli: &str, container: &str, marker: &str, signal: i32) {
    let mut kill = Command::new(cli);
    kill.args(["exec", container, "sh", "-c", KILL_MARKED, "sh"])
        .arg(signal.to_string())
        .arg(marker);
    if let Err(err) = run_tool(&format!("{cli} exec (kill)"), kill, KILL_TIMEOUT) {
        log::warn!("killing a timed-out command in {container}: {err}");
    }
}

impl Environment for DockerEnv {
    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        if let Some(agent) = &self.agent {
            return self.exec_through(agent, request);
        }
        let marker = format!(
            "{}-{}",
            self.name,
            self.next_exec.fetch_add(1, Ordering::Relaxed)
        );
        let env: Vec<(String, String)> = request.env.clone().into_iter().collect();
        let env_file = write_env_file(&self.root, &format!("exec-{marker}.env"), &env)?;
        let mut command = Command::new(&self.cli);
        command.args(self.exec_arguments(request, &marker, env_file.as_deref()));
        let ran = spawn::run_sandboxed(command, request.limits, &self.groups, &|signal| {
            self.kill_marked_soon(&marker, signal)
        });
        if let Some(file) = env_file {
            let _ = std::fs::remove_file(file);
        }
        let result = ran.map_err(|source| EnvError::Io {
            context: format!("cannot run {} exec", self.cli),
            source,
        })?;
        match cli_failure(&result) {
            // The engine refused before the command ran: an error, not the command's output.
            Some(detail) => Err(EnvError::Tool {
                what: format!("{} exec", self.cli),
                detail: detail.to_string(),
            }),
            None => Ok(result),
        }
    }

    fn close(&self) -> Result<(), EnvError> {
        self.groups.kill_all();
        if let Some(dir) = &self.agent_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = super::local::remove_tree(&self.root);
        let deadline = Instant::now() + self.container_timeout;
        loop {
            let mut remove = Command::new(&self.cli);
            remove.args(["rm", "--force", &self.name]);
            match run_tool(&format!("{} rm", self.cli), remove, self.container_timeout) {
                Err(EnvError::Tool { detail, .. }) if detail.contains("No such container") => {
                    return Ok(())
                }
                // A close racing the health check's cleanup (or the engine's own): wait for
                // that removal rather than fail.
                Err(EnvError::Tool { detail, .. })
                    if detail.contains("already in progress") && Instant::now() < deadline =>
                {
                    std::thread::sleep(REMOVAL_POLL)
                }
                other => return other.map(drop),
            }
        }
    }

    fn health(&self) -> Option<String> {
        if !self.health_checked {
            return None;
        }
        self.watch.ended(&self.name, self.running_since)
    }

    fn describe(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("container".into(), Value::from(self.name.clone()));
        let mode = if self.agent.is_some() { "agent" } else { "cli" };
        map.insert("exec_mode".into(), Value::from(mode));
        let shell = self
            .shell
            .as_ref()
            .map_or("bash -lc, or sh -c without bash".to_string(), |shell| {
                shell.join(" ")
            });
        map.insert("shell".into(), Value::from(shell));
        map
    }

    fn handle(&self) -> Option<Value> {
        Some(serde_json::json!({"container": self.name, "agent": self.agent.is_some()}))
    }
}

/// What the CLI itself says when `exec` never reached the command (the engine is down, the
/// container stopped): its message, alone, with a non-zero exit. A command's own output
/// starting with these words would be taken for it; that is the price of `exec`'s one
/// stream, and the agent path has no such ambiguity.
const CLI_FAILURES: [&str; 5] = [
    "Cannot connect to the Docker daemon",
    "Error response from daemon:",
    "Cannot connect to Podman",
    "Error: no container with name or ID",
    "Error: can only create exec sessions on running containers",
];

/// `Some(message)` when `result` is the CLI's own failure rather than the command's.
fn cli_failure(result: &ExecResult) -> Option<&str> {
    let output = result.output.trim();
    (result.returncode != 0
        && !result.timed_out
        && output.lines().count() == 1
        && CLI_FAILURES.iter().any(|prefix| output.starts_with(prefix)))
    .then_some(output)
}

/// Runs the instance's container (with the agent as its entrypoint when `agent` is given),
/// pulling the image first only when it is missing. A failure leaves no container behind (a
/// clashing container of someone else is kept).
fn run_container(
    spec: &EnvSpec,
    ctx: &InstanceContext,
    options: &DockerOptions,
    agent: Option<&AgentMount>,
    env_file: Option<&Path>,
) -> Result<(), EnvError> {
    let cli = cli_of(spec);
    let name = ctx.sandbox_name();
    let run = || {
        let mut run = Command::new(&cli);
        run.args(run_arguments(spec, ctx, options, agent, env_file));
        let ran = run_tool(&format!("{cli} run"), run, options.container_timeout);
        if ran.is_err() {
            remove_ours(&cli, &name, &ctx.server_id, options.container_timeout);
        }
        ran
    };
    match run() {
        Err(EnvError::Tool { detail, .. }) if image_missing(&detail) => {
            let mut pull = Command::new(&cli);
            pull.args(["pull", &spec.image]);
            run_tool(
                &format!("{cli} pull {}", spec.image),
                pull,
                options.pull_timeout,
            )
            .and_then(|_| run())
        }
        ran => ran,
    }
    .map(drop)
}

/// True when the runtime refused to execute the container's entrypoint.
fn entrypoint_refused(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    detail.contains("exec format error")
        || detail.contains("permission denied")
        || (detail.contains("exec") && detail.contains("no such file or directory"))
}

/// Whether a container has stopped, asked of the CLI at most every [`EXITED_POLL`] however
/// often it is called (the agent's start polls every few milliseconds).
struct ContainerExited<'a> {
    cli: &'a str,
    name: &'a str,
    last: std::cell::Cell<Option<Instant>>,
}

/// How often a start asks whether the container of an agent that does not answer has exited.
const EXITED_POLL: Duration = Duration::from_millis(250);

impl<'a> ContainerExited<'a> {
    fn new(cli: &'a str, name: &'a str) -> ContainerExited<'a> {
        ContainerExited {
            cli,
            name,
            last: std::cell::Cell::new(None),
        }
    }

    fn check(&self) -> bool {
        if self.last.get().is_some_and(|at| at.elapsed() < EXITED_POLL) {
            return false;
        }
        self.last.set(Some(Instant::now()));
        let mut inspect = Command::new(self.cli);
        inspect.args(["inspect", "--format", "{{.State.Running}}", self.name]);
        run_tool(&format!("{} inspect", self.cli), inspect, KILL_TIMEOUT)
            .is_ok_and(|running| running.trim() == "false")
    }
}

/// Removes container `name` only if it carries this server's label (a failed `run` may have
/// created it; a container of someone else with the same name is left alone).
fn remove_ours(cli: &str, name: &str, server_id: &str, timeout: Duration) {
    let mut list = Command::new(cli);
    list.args(["ps", "--all", "--quiet", "--filter"])
        .arg(format!("name=^/?{name}$"))
        .arg("--filter")
        .arg(format!("label={LABEL_SERVER}={server_id}"));
    let Ok(ids) = run_tool(&format!("{cli} ps"), list, timeout) else {
        return;
    };
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if !ids.is_empty() {
        let mut remove = Command::new(cli);
        remove.args(["rm", "--force"]).args(&ids);
        if let Err(err) = run_tool(&format!("{cli} rm"), remove, timeout) {
            log::warn!("cleaning up after a failed start of {name}: {err}");
        }
    }
}

/// Removes every container labelled with `server_id` whose name `keep` does not list;
/// `keep` is asked after the listing, so that a container started meanwhile is never taken
/// for a leftover. At start-up it lists the adopted instances; later, every instance in the
/// table (see `Runner::tidy`). Returns how many were removed.
pub fn remove_untracked(
    cli: &str,
    server_id: &str,
    keep: &dyn Fn() -> Vec<String>,
) -> Result<usize, EnvError> {
    let mut list = Command::new(cli);
    list.args(["ps", "--all", "--filter"])
        .arg(format!("label={LABEL_SERVER}={server_id}"))
        .args(["--format", "{{.ID}} {{.Names}}"]);
    let listing = run_tool(&format!("{cli} ps"), list, REAP_TIMEOUT)?;
    let kept = keep();
    let ids: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, name)| !kept.iter().any(|kept| kept == name.trim()))
        .map(|(id, _)| id)
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    let mut remove = Command::new(cli);
    remove.args(["rm", "--force"]).args(&ids);
    run_tool(&format!("{cli} rm"), remove, REAP_TIMEOUT)?;
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{BASH_OR_SH, MERGE_OUTPUT};
    use serde_json::json;

    fn spec(config: Value) -> EnvSpec {
        EnvSpec::parse(config.as_object().unwrap().clone(), Some("img:1")).unwrap()
    }

    fn ctx() -> InstanceContext {
        InstanceContext::for_tests("r-1")
    }

    #[test]
    fn the_clis_own_failures_are_told_from_a_commands_output() {
        let result = |output: &str, returncode: i32| ExecResult {
            output: output.into(),
            returncode,
            timed_out: false,
            truncated: false,
            duration_s: 0.1,
        };
        let down = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?\n";
        assert_eq!(cli_failure(&result(down, 1)), Some(down.trim()));
        let stopped = "Error response from daemon: Container abc is not running";
        assert!(cli_failure(&result(stopped, 1)).is_some());
        // The command's own output, or a success, is never taken for the CLI's.
        assert!(cli_failure(&result(stopped, 0)).is_none());
        assert!(cli_failure(&result("Error: file not found", 1)).is_none());
        assert!(cli_failure(&result(&format!("{stopped}\nmore"), 1)).is_none());
    }

    #[test]
    fn run_command_line() {
        let spec = spec(json!({
            "container_type": "docker", "cwd": "/testbed", "env": {"A": "1"},
            "resources": {"instances": 1, "cpus": 2, "memory_gb": 0.5, "gpus": 1},
            "run_args": ["--network", "none"]
        }));
        let options = DockerOptions::parse(&spec.raw).unwrap();
        let env_file = Path::new("/state/instances/r-1/run.env");
        let mut ctx = ctx();
        ctx.pids_limit = Some(512);
        let args = run_arguments(&spec, &ctx, &options, None, Some(env_file));
        assert_eq!(
            args,
            [
                "run",
                "--detach",
                "--init",
                "--pull=never",
                "--name",
                "ars-abcd1234-r-1",
                "--label",
                "arservice.server=abcd1234",
                "--label",
                "arservice.run_id=r-1",
                "--workdir",
                "/testbed",
                "--env-file",
                "/state/instances/r-1/run.env",
                "--pids-limit=512",
                "--cpus=2",
                "--memory=536870912",
                "--gpus=1",
                "--network",
                "none",
                "--entrypoint",
                "sh",
                "img:1",
                "-c",
                KEEP_ALIVE,
            ]
        );
    }

    #[test]
    fn with_an_agent_it_is_the_entrypoint_and_init() {
        let spec = spec(json!({}));
        let options = DockerOptions::parse(&spec.raw).unwrap();
        let mount = AgentMount {
            binary: "/opt/arservice".into(),
            dir: "/state/agents/0123".into(),
        };
        let args = run_arguments(&spec, &ctx(), &options, Some(&mount), None);
        assert!(!args.contains(&"--init".to_string()), "{args:?}");
        let tail: Vec<&str> = args[args.len() - 10..].iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "--volume",
                "/opt/arservice:/.arservice/agent:ro",
                "--volume",
                "/state/agents/0123:/.arservice/run",
                "--entrypoint",
                "/.arservice/agent",
                "img:1",
                "agent",
                "--socket",
                "/.arservice/run/agent.sock",
            ]
        );
        assert!(entrypoint_refused(
            "docker run failed: OCI runtime create failed: exec: \"/.arservice/agent\": permission denied"
        ));
        assert!(!entrypoint_refused("Unable to find image 'x:1' locally"));
    }

    #[test]
    fn options_and_their_errors() {
        let options = DockerOptions::parse(
            json!({"container_timeout": 5, "pull_timeout": 7})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(options.container_timeout, Duration::from_secs(5));
        assert_eq!(options.pull_timeout, Duration::from_secs(7));
        for bad in [
            json!({"run_args": "--rm"}),
            json!({"run_args": [1]}),
            json!({"pull_timeout": -1}),
        ] {
            assert!(matches!(
                DockerOptions::parse(bad.as_object().unwrap()),
                Err(EnvError::Invalid(_))
            ));
        }
    }

    #[test]
    fn env_files_are_private_and_refuse_line_breaks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ars-envfile-{}", std::process::id()));
        let env = vec![
            ("A".to_string(), " spaced = \"quoted\" #x ".to_string()),
            ("B".to_string(), String::new()),
        ];
        let path = write_env_file(&dir, "run.env", &env).unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "A= spaced = \"quoted\" #x \nB=\n"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(write_env_file(&dir, "none.env", &[]).unwrap().is_none());
        let broken = vec![("K".to_string(), "two\nlines".to_string())];
        assert!(matches!(
            write_env_file(&dir, "broken.env", &broken),
            Err(EnvError::Invalid(_))
        ));
        assert!(!dir.join("broken.env").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn podman_and_executable() {
        assert_eq!(cli_of(&spec(json!({"container_type": "podman"}))), "podman");
        assert_eq!(
            cli_of(&spec(
                json!({"container_type": "docker", "executable": "/opt/docker"})
            )),
            "/opt/docker"
        );
    }

    #[test]
    fn exec_command_line() {
        let env = DockerEnv {
            cli: "docker".into(),
            name: "ars-abcd1234-r-1".into(),
            shell: None,
            cwd: "/testbed".into(),
            container_timeout: DEFAULT_CONTAINER_TIMEOUT,
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            watch: ContainerWatch::of("docker", "test"),
            agent: None,
            agent_dir: None,
            running_since: Instant::now(),
            root: "/state/instances/r-1".into(),
            health_checked: true,
        };
        let request = ExecRequest {
            cmd: "echo $K".into(),
            cwd: Some("sub".into()),
            env: [("K".to_string(), "V".to_string())].into(),
            limits: super::super::Limits {
                timeout: Duration::from_secs(1),
                max_output_bytes: 10,
            },
        };
        assert_eq!(
            env.exec_arguments(&request, "m-0", Some(Path::new("/e/exec-m-0.env"))),
            [
                "exec",
                "--env",
                "ARSERVICE_EXEC=m-0",
                "--workdir",
                "/testbed/sub",
                "--env-file",
                "/e/exec-m-0.env",
                "ars-abcd1234-r-1",
                "sh",
                "-c",
                BASH_OR_SH,
                "sh",
                "echo $K",
            ]
        );
        let configured = DockerEnv {
            shell: Some(vec!["zsh".into(), "-c".into()]),
            ..env
        };
        let args = configured.exec_arguments(&request, "m-1", Some(Path::new("/e/x.env")));
        assert_eq!(
            args[8..],
            ["sh", "-c", MERGE_OUTPUT, "sh", "zsh", "-c", "echo $K"]
        );
    }
}
