//! The `docker` (and `podman`) environment: one keep-alive container per instance, commands
//! through `<cli> exec`.
//!
//! Owns the command lines of `run`, `exec`, `rm` and the in-container kill, and nothing else:
//! every call goes through the spawn helper with a timeout. The container is named
//! `ars-<server_id>-<run_id>` and labelled with the server's identity, so a restarted server
//! can remove what an earlier life left (see [`reap_leftovers`]). A fork commits the
//! container to an image and runs the new instance from it (`fork.rs`).
//!
//! Killing `docker exec` does not stop the command inside the container (moby#9098), so every
//! command carries a marker variable `ARSERVICE_EXEC=<id>` and a timeout kills, inside the
//! container, every process whose environment has that marker.
//!
//! Podman's CLI follows docker's; where it answers differently ([`Engine`]), the difference is
//! handled in `engine.rs` and nowhere else.

use super::agent::{AgentMount, Exec, AGENT_DIR_IN_SANDBOX, AGENT_IN_SANDBOX, SOCKET_IN_SANDBOX};
use super::cgroup::{container_cgroups, CpuFile};
use super::config::DockerOptions;
use super::exec::command_cwd;
use super::fork::{ForkImage, ForkSeed};
use super::spawn::{self, ProcessGroups, EXEC_MARKER};
use super::wire::ExecWire;
use super::{
    refused_cwd, run_tool, shell_words, EnvError, EnvSpec, Environment, ExecRequest, ExecResult,
    InstanceContext, Kind,
};
mod engine;
mod fork;

use engine::{image_missing, no_such};
pub use engine::{ContainerWatch, Engine};
pub use fork::{commit_arguments, fork_image_name, remove_fork_images, LABEL_FORK};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

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

/// What podman 4 says when `--init` finds no init binary at its `init_path` (Debian's podman
/// looks for catatonit, which it only recommends).
const INIT_MISSING: &str = "container-init binary not found";

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
///
/// `init`: `--init` when there is no agent (the agent is an init of its own); off only where
/// the engine has no init binary, and then the keep-alive shell, PID 1, reaps orphans: it
/// waits for any child (`wait` is `waitpid(-1)` in sh, bash and busybox).
pub fn run_arguments(
    spec: &EnvSpec,
    ctx: &InstanceContext,
    options: &DockerOptions,
    agent: Option<&AgentMount>,
    env_file: Option<&Path>,
    engine: Engine,
    init: bool,
) -> Vec<String> {
    let mut args: Vec<String> = vec!["run".into(), "--detach".into()];
    if agent.is_none() && init {
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
    if let Some(cwd) = spec.cwd.as_ref().filter(|cwd| !engine.makes_cwd(Some(cwd))) {
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
    engine: Engine,
    name: String,
    /// How a command string runs; `None`: `bash -lc` when the image has bash, else `sh -c`.
    shell: Option<Vec<String>>,
    /// The working directory relative `cwd`s are taken from.
    cwd: String,
    /// Every command names `cwd`: the container did not start in it ([`Engine::makes_cwd`]).
    names_cwd: bool,
    /// Where a relative `/files` path is taken from: the config's `cwd`, or empty for the
    /// container's own working directory (the image's `WORKDIR`, where the agent runs).
    files_base: String,
    container_timeout: Duration,
    groups: ProcessGroups,
    next_exec: AtomicU64,
    /// The shared view of this server's containers, for health checks.
    watch: Arc<ContainerWatch>,
    /// Through the agent inside the container, or `exec`.
    commands: Exec,
    /// When `run` (or the adoption) returned: health listings older than this cannot see it.
    running_since: Instant,
    /// The instance's directory, for the env files of `run` and `exec` (private, removed on
    /// close).
    root: PathBuf,
    /// False when a client chose the CLI (`EnvSpec::client_executable`): the health round
    /// never runs it.
    health_checked: bool,
    /// The container's full ID, as `run` printed it (`None` for an adopted one).
    id: Option<String>,
    /// Its cgroup's CPU accounting file, looked for once (on the first reading).
    cpu: std::sync::OnceLock<Option<CpuFile>>,
    /// A fork's image, which this container runs: removed when it goes.
    fork_image: Option<ForkImage>,
}

/// The env file of `run`, removed once the container runs.
const RUN_ENV_FILE: &str = "run.env";

/// How often a close looks again when another removal of its container is in progress.
const REMOVAL_POLL: Duration = Duration::from_millis(100);

impl DockerEnv {
    /// Runs the container, pulling the image first only when it is missing.
    /// A failure leaves no container behind (a clashing container of someone else is kept),
    /// and no file.
    pub fn start(spec: &EnvSpec, ctx: &InstanceContext) -> Result<DockerEnv, EnvError> {
        // A fork runs the image its source's container was committed to.
        let fork_image = ctx.fork.as_ref().and_then(|seed| seed.image.clone());
        let forked;
        let spec = match &fork_image {
            Some(image) => {
                forked = EnvSpec {
                    image: image.name.clone(),
                    ..spec.clone()
                };
                &forked
            }
            None => spec,
        };
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
        started.map(|mut started| {
            started.fork_image = fork_image;
            started
        })
    }

    /// [`DockerEnv::start`] with the instance's env file written.
    fn run(
        spec: &EnvSpec,
        ctx: &InstanceContext,
        env_file: Option<&Path>,
    ) -> Result<DockerEnv, EnvError> {
        let options = spec.docker();
        let cli = cli_of(spec);
        let engine = Engine::for_spec(spec, &cli);
        let name = ctx.sandbox_name();
        let mount = AgentMount::for_instance(ctx, spec.forces_cli(), &cli, |_| true)?;
        let mut agent = None;
        let mut id = None;
        if let Some(mount) = &mount {
            match run_container(spec, ctx, &options, engine, Some(mount), env_file) {
                Ok(ran) => {
                    id = ran;
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
                remove_ours(
                    &cli,
                    engine,
                    &name,
                    &ctx.server_id,
                    options.container_timeout,
                );
                let _ = std::fs::remove_dir_all(&mount.dir);
            }
        }
        if agent.is_none() {
            id = run_container(spec, ctx, &options, engine, None, env_file)?;
        }
        let commands = match (agent, mount) {
            (Some(client), Some(mount)) => Exec::agent(&name, Some(client), mount.dir),
            _ => Exec::cli(&name, None),
        };
        let mut started = DockerEnv::new(spec, ctx, &options, engine, commands);
        started.id = id;
        Ok(started)
    }

    fn new(
        spec: &EnvSpec,
        ctx: &InstanceContext,
        options: &DockerOptions,
        engine: Engine,
        commands: Exec,
    ) -> DockerEnv {
        let cli = cli_of(spec);
        DockerEnv {
            commands,
            watch: ContainerWatch::of(&cli, engine, &ctx.server_id),
            cli,
            engine,
            names_cwd: engine.makes_cwd(spec.cwd.as_deref()),
            name: ctx.sandbox_name(),
            shell: spec.shell.clone(),
            cwd: spec.cwd.clone().unwrap_or_else(|| "/".into()),
            files_base: spec.cwd.clone().unwrap_or_default(),
            container_timeout: options.container_timeout,
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            running_since: Instant::now(),
            root: ctx.root.clone(),
            health_checked: !spec.client_executable,
            id: None,
            cpu: std::sync::OnceLock::new(),
            fork_image: None,
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
        let options = spec.docker();
        let cli = cli_of(spec);
        let engine = Engine::for_spec(spec, &cli);
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
            Err(EnvError::Tool { detail, .. }) if no_such(&detail) => {
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
        let commands = Exec::adopt(ctx, handle, &format!("{cli} exec"));
        let mut adopted = DockerEnv::new(spec, ctx, &options, engine, commands);
        adopted.fork_image = handle["fork_image"].as_str().map(|name| ForkImage {
            cli: cli.clone(),
            name: name.into(),
        });
        if !adopted.commands.through_agent() {
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
        if request.stdin.is_some() {
            // Without it, `exec` gives the command no stdin of ours.
            args.push("--interactive".into());
        }
        // The command's own `cwd` is entered by its shell (`exec --workdir` would answer a
        // missing one with the engine's words): the exec starts where one without starts.
        if self.names_cwd {
            args.extend(["--workdir".into(), self.cwd.clone()]);
        }
        if let Some(env_file) = env_file {
            args.extend(["--env-file".into(), env_file.display().to_string()]);
        }
        args.push(self.name.clone());
        let cwd = command_cwd(&self.cwd, request);
        args.extend(shell_words(
            self.shell.as_deref(),
            cwd.as_deref(),
            &request.cmd,
        ));
        args
    }

    /// One command for the agent in the container.
    fn agent_exec(&self, request: &ExecRequest) -> ExecWire {
        let mut exec = ExecWire::for_agent(request, &self.cwd, self.shell.clone());
        if self.names_cwd && exec.cwd.is_none() {
            exec.cwd = Some(self.cwd.clone());
        }
        exec
    }

    /// Runs one command through `<cli> exec`.
    fn cli_exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        let marker = format!(
            "{}-{}",
            self.name,
            self.next_exec.fetch_add(1, Ordering::Relaxed)
        );
        let env: Vec<(String, String)> = request.env.clone().into_iter().collect();
        let env_file = write_env_file(&self.root, &format!("exec-{marker}.env"), &env)?;
        let mut command = Command::new(&self.cli);
        command.args(self.exec_arguments(request, &marker, env_file.as_deref()));
        let ran = super::stdin_file(request).and_then(|stdin| {
            spawn::run_sandboxed(
                command,
                stdin.as_ref(),
                request.limits,
                &self.groups,
                request.sink.as_ref(),
                &|signal| self.kill_marked_soon(&marker, signal),
            )
            .map_err(|source| EnvError::Io {
                context: format!("cannot run {} exec", self.cli),
                source,
            })
        });
        if let Some(file) = env_file {
            let _ = std::fs::remove_file(file);
        }
        let result = ran?;
        match cli_failure(&result) {
            // The engine refused before the command ran: an error, not the command's output.
            Some(detail) => Err(EnvError::Tool {
                what: format!("{} exec", self.cli),
                detail: detail.to_string(),
            }),
            None => refused_cwd(result, command_cwd(&self.cwd, request).as_deref()),
        }
    }

    /// Sends `signal` to every process inside the container that carries `marker`.
    /// Removes the fork image this container ran, once the container is gone. One the
    /// engine keeps (a fork of this fork was committed from it, and podman refuses to untag a
    /// parent) is left to the health round's sweep ([`remove_fork_images`]): the close is done.
    fn remove_fork_image(&self) -> Result<(), EnvError> {
        if let Some(image) = &self.fork_image {
            if let Err(err) = image.remove() {
                log::info!("the fork image {} stays for now: {err}", image.name);
            }
        }
        Ok(())
    }

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
        self.commands.run(
            request.sink.as_ref(),
            || self.agent_exec(request),
            || self.cli_exec(request),
        )
    }

    fn agent_files(&self) -> Option<(&Exec, &str)> {
        Some((&self.commands, &self.files_base))
    }

    fn close(&self) -> Result<(), EnvError> {
        self.groups.kill_all();
        self.commands.close();
        let _ = super::local::remove_tree(&self.root);
        let deadline = Instant::now() + self.container_timeout;
        loop {
            let mut remove = Command::new(&self.cli);
            remove.args(self.engine.rm_force()).arg(&self.name);
            match run_tool(&format!("{} rm", self.cli), remove, self.container_timeout) {
                Err(EnvError::Tool { detail, .. }) if no_such(&detail) => {
                    return self.remove_fork_image()
                }
                // A close racing the health check's cleanup (or the engine's own): wait for
                // that removal rather than fail.
                Err(EnvError::Tool { detail, .. })
                    if detail.contains("already in progress") && Instant::now() < deadline =>
                {
                    std::thread::sleep(REMOVAL_POLL)
                }
                Ok(_) => return self.remove_fork_image(),
                other => return other.map(drop),
            }
        }
    }

    /// Commits the container to an image named after this server and `dst`, which `dst`'s
    /// start runs (see `fork.rs`).
    fn fork_into(&self, dst: &InstanceContext) -> Result<ForkSeed, EnvError> {
        Ok(ForkSeed {
            image: Some(fork::commit(&self.cli, &self.name, dst)?),
            outside: Vec::new(),
        })
    }

    fn health(&self) -> Option<String> {
        if !self.health_checked {
            return None;
        }
        self.watch.ended(&self.name, self.running_since)
    }

    fn cpu_seconds(&self) -> Option<f64> {
        self.cpu
            .get_or_init(|| {
                let id = self.id.as_deref()?;
                CpuFile::find(&container_cgroups(id))
            })
            .as_ref()?
            .seconds()
    }

    fn describe(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("container".into(), Value::from(self.name.clone()));
        self.commands.describe_into(&mut map);
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
        Some(self.commands.handle_into(match &self.fork_image {
            Some(image) => {
                serde_json::json!({"container": self.name, "fork_image": image.name})
            }
            None => serde_json::json!({"container": self.name}),
        }))
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
/// pulling the image first only when it is missing; answers the container's ID when `run`
/// printed one. A failure leaves no container behind (a clashing container of someone else
/// is kept).
fn run_container(
    spec: &EnvSpec,
    ctx: &InstanceContext,
    options: &DockerOptions,
    engine: Engine,
    agent: Option<&AgentMount>,
    env_file: Option<&Path>,
) -> Result<Option<String>, EnvError> {
    let cli = cli_of(spec);
    let name = ctx.sandbox_name();
    let run = |init: bool| {
        let mut run = Command::new(&cli);
        run.args(run_arguments(
            spec, ctx, options, agent, env_file, engine, init,
        ));
        let ran =
            run_tool(&format!("{cli} run"), run, options.container_timeout).and_then(|printed| {
                match spec
                    .cwd
                    .as_deref()
                    .filter(|_| engine.makes_cwd(spec.cwd.as_deref()))
                {
                    Some(cwd) => {
                        let mut mkdir = Command::new(&cli);
                        mkdir.args(["exec", "--workdir", "/", &name, "mkdir", "-p", "--", cwd]);
                        run_tool(
                            &format!("{cli} exec mkdir -p {cwd}"),
                            mkdir,
                            options.container_timeout,
                        )
                        .map(|_| printed)
                    }
                    None => Ok(printed),
                }
            });
        if ran.is_err() {
            remove_ours(
                &cli,
                engine,
                &name,
                &ctx.server_id,
                options.container_timeout,
            );
        }
        ran
    };
    let mut init = !WITHOUT_INIT.lock().contains(&cli);
    let mut pulled = false;
    loop {
        match run(init) {
            Err(EnvError::Tool { detail, .. })
                if init && agent.is_none() && detail.contains(INIT_MISSING) =>
            {
                log::warn!(
                    "{cli} has no init binary ({detail}): its containers run without --init from now on, their keep-alive shell reaping orphans (install catatonit, or set init_path in containers.conf)"
                );
                WITHOUT_INIT.lock().insert(cli.clone());
                init = false;
            }
            Err(EnvError::Tool { detail, .. }) if !pulled && image_missing(&detail) => {
                let mut pull = Command::new(&cli);
                pull.args(["pull", &spec.image]);
                run_tool(
                    &format!("{cli} pull {}", spec.image),
                    pull,
                    options.pull_timeout,
                )?;
                pulled = true;
            }
            ran => return ran.map(|printed| container_id(&printed)),
        }
    }
}

/// The container ID `run --detach` prints on its last line (warnings may come before it).
fn container_id(printed: &str) -> Option<String> {
    let last = printed
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())?;
    (last.len() == 64 && last.bytes().all(|byte| byte.is_ascii_hexdigit()))
        .then(|| last.to_string())
}

/// The CLIs whose `--init` failed for want of an init binary ([`INIT_MISSING`]): their
/// containers are run without it for the rest of this process.
static WITHOUT_INIT: LazyLock<Mutex<std::collections::BTreeSet<String>>> =
    LazyLock::new(Default::default);

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
fn remove_ours(cli: &str, engine: Engine, name: &str, server_id: &str, timeout: Duration) {
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
        remove.args(engine.rm_force()).args(&ids);
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
        // Container ids only: rootless podman may log a warning line first.
        .filter(|(id, _)| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .filter(|(_, name)| !kept.iter().any(|kept| kept == name.trim()))
        .map(|(id, _)| id)
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    let mut remove = Command::new(cli);
    remove.args(Engine::of(cli).rm_force()).args(&ids);
    run_tool(&format!("{cli} rm"), remove, REAP_TIMEOUT)?;
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::exec::ENTER_CWD;
    use crate::env::{BASH_OR_SH, MERGE_OUTPUT};
    use serde_json::json;

    fn spec(config: Value) -> EnvSpec {
        EnvSpec::parse(config.as_object().unwrap().clone(), Some("img:1")).unwrap()
    }

    fn ctx() -> InstanceContext {
        InstanceContext::for_tests("r-1")
    }

    #[test]
    fn the_container_id_is_the_last_line_run_prints() {
        let id = "ac2e578a11efe1b0888a73337bd6eeaf86fb8a4a3dc35fd32a8ba5297e5214ce";
        assert_eq!(container_id(&format!("{id}\n")).as_deref(), Some(id));
        let warned = format!("WARNING: the platform does not match\n{id}\n\n");
        assert_eq!(container_id(&warned).as_deref(), Some(id));
        assert_eq!(container_id("ars-abc-r1\n"), None);
        assert_eq!(container_id(""), None);
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
    fn a_cli_a_client_chose_is_judged_by_name_never_run() {
        let dir = std::env::temp_dir().join(format!("ars-engine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ran = dir.join("ran");
        let cli = dir.join("my-podman");
        std::fs::write(&cli, format!("#!/bin/sh\ntouch '{}'\n", ran.display())).unwrap();
        std::fs::set_permissions(&cli, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let cli = cli.to_str().unwrap();
        let mut chosen = spec(json!({"container_type": "docker", "executable": cli}));
        chosen.client_executable = true;
        assert_eq!(Engine::for_spec(&chosen, cli), Engine::Podman);
        let docker = dir.join("docker");
        let docker = docker.to_str().unwrap();
        assert_eq!(Engine::for_spec(&chosen, docker), Engine::Docker);
        chosen.kind = Kind::Podman;
        assert_eq!(Engine::for_spec(&chosen, docker), Engine::Podman);
        assert!(!ran.exists(), "the client's program was run");
        // A preset's CLI is asked.
        let mut preset = spec(json!({"container_type": "docker", "executable": cli}));
        preset.client_executable = false;
        Engine::for_spec(&preset, cli);
        assert!(ran.exists(), "an operator's CLI is asked for its version");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_command_line() {
        let spec = spec(json!({
            "container_type": "docker", "cwd": "/testbed", "env": {"A": "1"},
            "resources": {"instances": 1, "cpus": 2, "memory_gb": 0.5, "gpus": 1},
            "run_args": ["--network", "none"]
        }));
        let options = spec.docker();
        let env_file = Path::new("/state/instances/r-1/run.env");
        let mut ctx = ctx();
        ctx.pids_limit = Some(512);
        let args = run_arguments(
            &spec,
            &ctx,
            &options,
            None,
            Some(env_file),
            Engine::Docker,
            true,
        );
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
        let options = spec.docker();
        let mount = AgentMount {
            binary: "/opt/arservice".into(),
            dir: "/state/agents/0123".into(),
        };
        let args = run_arguments(
            &spec,
            &ctx(),
            &options,
            Some(&mount),
            None,
            Engine::Docker,
            true,
        );
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
    fn without_init_the_keep_alive_shell_is_pid_1() {
        let spec = spec(json!({}));
        let options = spec.docker();
        let args = run_arguments(&spec, &ctx(), &options, None, None, Engine::Podman, false);
        assert!(!args.contains(&"--init".to_string()), "{args:?}");
        assert_eq!(args[args.len() - 4..], ["sh", "img:1", "-c", KEEP_ALIVE]);
    }

    #[test]
    fn engines_are_told_apart_and_answer_in_their_own_words() {
        assert_eq!(
            Engine::from_version("podman version 4.3.1\n"),
            Engine::Podman
        );
        // podman-docker's `docker` says so first, on stderr (merged here).
        let emulated = "Emulate Docker CLI using podman. Create /etc/containers/nodocker to quiet msg.\npodman version 4.3.1\n";
        assert_eq!(Engine::from_version(emulated), Engine::Podman);
        assert_eq!(
            Engine::from_version("Docker version 20.10.24+dfsg1, build 297e128\n"),
            Engine::Docker
        );
        assert_eq!(
            Engine::from_name("/opt/podman-4/bin/podman"),
            Engine::Podman
        );
        assert_eq!(Engine::from_name("docker"), Engine::Docker);
        assert_eq!(
            Engine::Podman.rm_force(),
            ["rm", "--force", "--time", "0"],
            "podman's rm --force waits 10 s for a stop first"
        );
        assert_eq!(Engine::Docker.rm_force(), ["rm", "--force"]);
        assert!(no_such("Error: No such container: ars-x"));
        assert!(no_such(
            r#"Error: inspecting object: no such object: "ars-x""#
        ));
        assert!(no_such(
            r#"Error: no container with name or ID "ars-x" found: no such container"#
        ));
        assert!(!no_such(
            "Error response from daemon: Container abc is not running"
        ));
    }

    #[test]
    fn listings_of_both_engines() {
        let docker = "ars-a|running|Up 3 seconds\nars-b|exited|Exited (0) 1 second ago\n";
        let states = Engine::Docker.states(docker).unwrap();
        assert_eq!(states["ars-a"], (true, "Up 3 seconds".to_string()));
        assert_eq!(
            states["ars-b"],
            (false, "Exited (0) 1 second ago".to_string())
        );
        // podman 4.3's `ps --format json`, cut down; its `{{.State}}` would say "Up ...".
        let podman = r#"[
          {"Names": ["ars-a"], "State": "running", "Status": "Up 5 seconds ago", "Id": "73"},
          {"Names": ["ars-b"], "State": "exited", "Status": "Exited (137) 1 second ago"}
        ]"#;
        let states = Engine::Podman.states(podman).unwrap();
        assert_eq!(states["ars-a"], (true, "Up 5 seconds ago".to_string()));
        assert_eq!(
            states["ars-b"],
            (false, "Exited (137) 1 second ago".to_string())
        );
        assert_eq!(Engine::Podman.states("[]\n").unwrap().len(), 0);
        let warned = format!(
            "time=\"2026-12-01T15:26:12Z\" level=warning msg=\"\\\"/\\\" is not a shared mount [x]\"\n{podman}"
        );
        assert_eq!(Engine::Podman.states(&warned).unwrap().len(), 2);
        assert!(Engine::Podman.states("Error: something").is_none());
        assert!(Engine::Podman
            .ps_states("s1")
            .ends_with(&["--format".to_string(), "json".to_string()]));
        assert!(Engine::Docker
            .ps_states("s1")
            .contains(&"label=arservice.server=s1".to_string()));
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
            engine: Engine::Docker,
            names_cwd: false,
            name: "ars-abcd1234-r-1".into(),
            shell: None,
            cwd: "/testbed".into(),
            files_base: "/testbed".into(),
            container_timeout: DockerOptions::default().container_timeout,
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            watch: ContainerWatch::of("docker", Engine::Docker, "test"),
            commands: Exec::cli("ars-abcd1234-r", None),
            running_since: Instant::now(),
            root: "/state/instances/r-1".into(),
            health_checked: true,
            id: None,
            cpu: std::sync::OnceLock::new(),
            fork_image: None,
        };
        let request = ExecRequest {
            cmd: "echo $K".into(),
            cwd: Some("sub".into()),
            env: [("K".to_string(), "V".to_string())].into(),
            limits: super::super::Limits {
                timeout: Duration::from_secs(1),
                max_output_bytes: 10,
            },
            stdin: None,
            sink: None,
        };
        assert_eq!(
            env.exec_arguments(&request, "m-0", Some(Path::new("/e/exec-m-0.env"))),
            [
                "exec",
                "--env",
                "ARSERVICE_EXEC=m-0",
                "--env-file",
                "/e/exec-m-0.env",
                "ars-abcd1234-r-1",
                "sh",
                "-c",
                &format!("{ENTER_CWD}{BASH_OR_SH}"),
                "sh",
                "/testbed/sub",
                "echo $K",
            ]
        );
        let configured = DockerEnv {
            shell: Some(vec!["zsh".into(), "-c".into()]),
            ..env
        };
        let args = configured.exec_arguments(&request, "m-1", Some(Path::new("/e/x.env")));
        assert_eq!(
            args[6..],
            [
                "sh",
                "-c",
                &format!("{ENTER_CWD}{MERGE_OUTPUT}"),
                "sh",
                "/testbed/sub",
                "zsh",
                "-c",
                "echo $K"
            ]
        );
        // Podman's container did not start in its cwd: a command without one names it.
        let podman = DockerEnv {
            engine: Engine::Podman,
            names_cwd: true,
            ..configured
        };
        let plain = ExecRequest {
            cwd: None,
            ..request
        };
        let args = podman.exec_arguments(&plain, "m-2", None);
        assert_eq!(args[3..5], ["--workdir", "/testbed"]);
    }

    #[test]
    fn podman_makes_an_absolute_cwd_after_run() {
        let options = DockerOptions::default();
        let absolute = spec(json!({"container_type": "podman", "cwd": "/testbed"}));
        let args = run_arguments(
            &absolute,
            &ctx(),
            &options,
            None,
            None,
            Engine::Podman,
            true,
        );
        assert!(!args.contains(&"--workdir".to_string()), "{args:?}");
        let args = run_arguments(
            &absolute,
            &ctx(),
            &options,
            None,
            None,
            Engine::Docker,
            true,
        );
        assert!(args.contains(&"--workdir".to_string()), "{args:?}");
        // A relative cwd is refused by `run --workdir`, on either engine.
        let relative = spec(json!({"container_type": "podman", "cwd": "testbed"}));
        let args = run_arguments(
            &relative,
            &ctx(),
            &options,
            None,
            None,
            Engine::Podman,
            true,
        );
        assert!(args.contains(&"--workdir".to_string()), "{args:?}");
        assert!(Engine::Podman.makes_cwd(Some("/testbed")));
        assert!(!Engine::Podman.makes_cwd(None));
        assert!(!Engine::Docker.makes_cwd(Some("/testbed")));
    }
}
