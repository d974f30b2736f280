//! The `singularity`/`apptainer` environment, the way HPC sites run many short sandboxes:
//! the image is converted to a SIF once and cached, each instance is an `instance start` with a
//! writable layer of its own, commands go through `exec instance://<name>`, close is
//! `instance stop`. A fork copies the overlay directory (`writable: "overlay"`); with the
//! tmpfs layer it is refused.
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
//!
//! What apptainer itself does to a command line (its source, as issue 20 cites it): the
//! environment's values are shell-evaluated unless `--no-eval`; `/tmp`, `/var/tmp` and the home
//! directory live in a 64 MiB session area under `--contain` unless `--workdir`; `HOME` cannot
//! come through `APPTAINERENV_HOME` (only `--home`, whose value apptainer also reads from
//! `APPTAINER_HOME`: `cmd/internal/cli/action_flags.go`, `EnvKeys: ["HOME"]`); INFO and WARNING
//! lines go to stderr, which commands share (`-s`).
//!
//! No value of the environment is ever an argument (`ps` shows arguments to every user of the
//! machine): the variables are `APPTAINERENV_*` variables of the CLI's own environment, and
//! `HOME` is `APPTAINER_HOME` (`SINGULARITY_*` for `singularity`), never `--home`.

use super::agent::{AgentMount, Exec, AGENT_DIR_IN_SANDBOX, AGENT_IN_SANDBOX, SOCKET_IN_SANDBOX};
use super::config::options::DEFAULT_CONTAINER_TIMEOUT;
use super::config::{ApptainerOptions, WritableLayer};
use super::exec::command_cwd;
use super::spawn::{self, Marker, ProcessGroups, EXEC_MARKER, INSTANCE_MARKER};
use super::wire::ExecWire;
use super::{
    cached_image, first_on_path, refused_cwd, run_tool, shell_words, EnvError, EnvSpec,
    Environment, ExecRequest, ExecResult, InstanceContext,
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

/// The instance's writable overlay (`writable: "overlay"`), under its directory.
const OVERLAY_DIR: &str = super::fork::APPTAINER_OVERLAY_DIRS[0];

/// How much of the agent's log a warning quotes when the agent did not come up.
const AGENT_LOG_CHARS: usize = 300;

/// The global option of every `exec`: only errors on stderr, which a command's output shares
/// (an INFO line per `SINGULARITYENV_*` variable, or a WARNING, would land in it).
const SILENT: &str = "-s";

/// The global option of the other calls: no INFO lines (warnings and errors stay, for the
/// detail of a failure).
const QUIET: &str = "-q";

/// Turns off apptainer's shell evaluation of the environment (since apptainer 1.1.0 and
/// SingularityCE 3.10). Without it each value is written into a script as `export K="value"`,
/// escaping only `"` (`internal/pkg/runtime/engine/apptainer/process_linux.go`,
/// `injectEnvHandler`): `$VAR`, `$(cmd)` and backticks are expanded or run, and a value
/// ending in `\` breaks every exec.
const NO_EVAL: &str = "--no-eval";

/// Under the instance's directory: what `--workdir` gives `/tmp`, `/var/tmp` and the home
/// directory. Under `--contain` they are otherwise in the session area (64 MiB by default,
/// `sessiondir max size`), whatever `writable` says.
const WORKDIR: &str = super::fork::APPTAINER_OVERLAY_DIRS[1];

/// Under the instance's directory: the home directory bound at `HOME` when `env` sets one.
const HOME_DIR: &str = super::fork::APPTAINER_OVERLAY_DIRS[2];

/// How long the close of an adopted instance waits for what the earlier life left to die,
/// and how often it looks.
const EARLIER_LIFE_WAIT: Duration = Duration::from_secs(5);
const EARLIER_LIFE_POLL: Duration = Duration::from_millis(10);

/// Where a build reads the image from: the image as given when it names a scheme, else a
/// docker reference.
pub fn build_source(image: &str) -> String {
    if image.contains("://") {
        image.to_string()
    } else {
        format!("docker://{image}")
    }
}

/// The environment as the CLI's own `<PREFIX>ENV_NAME=value` variables: passed on even with
/// `--cleanenv`, never split (`--env` reads a value with a second `=` as a list and strips
/// quotes), never visible in `ps`, and unchanged with [`NO_EVAL`]. `HOME` is left out:
/// apptainer refuses it there ("Overriding HOME ... is not permitted"); it goes through
/// [`home_setting`].
fn tool_env(cli: &str, env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let prefix = format!("{}ENV_", tool_prefix(cli));
    env.iter()
        .filter(|(name, _)| name.as_str() != "HOME")
        .map(|(name, value)| (format!("{prefix}{name}"), value.clone()))
        .collect()
}

/// The prefix of the CLI's own variables (`<PREFIX>ENV_NAME`, `<PREFIX>_HOME`): `SINGULARITY`
/// for `singularity`, else `APPTAINER`.
fn tool_prefix(cli: &str) -> &'static str {
    let singularity = Path::new(cli)
        .file_name()
        .is_some_and(|name| name == "singularity");
    if singularity {
        "SINGULARITY"
    } else {
        "APPTAINER"
    }
}

/// `APPTAINER_HOME=<home_dir>:<HOME>` (the variable of `--home`) when `env` sets `HOME`:
/// apptainer's supported way to set it (`instance start` binds the directory there; an `exec`
/// into the instance only takes the variable), in the CLI's environment rather than as
/// `--home`, where `ps` would show the value. A value that `--home` cannot carry is refused
/// (400).
fn home_setting(
    cli: &str,
    env: &BTreeMap<String, String>,
    home_dir: &Path,
) -> Result<Option<(String, String)>, EnvError> {
    let Some(home) = env.get("HOME") else {
        return Ok(None);
    };
    if !home.starts_with('/') || home.contains([',', ':', '\n']) {
        return Err(EnvError::Invalid(format!(
            "env HOME {home:?} cannot go through apptainer's --home: it must be an absolute \
             path without ',', ':' or a newline"
        )));
    }
    if !bind_safe(home_dir) {
        return Err(EnvError::Invalid(format!(
            "env HOME cannot go through apptainer's --home here: the state dir's path {} has \
             ',' or ':'",
            home_dir.display()
        )));
    }
    Ok(Some((
        format!("{}_HOME", tool_prefix(cli)),
        format!("{}:{home}", home_dir.display()),
    )))
}

/// The arguments of `instance start` (after the program name) for the instance whose
/// directory is `root`: `/tmp`, `/var/tmp` and the home directory in `<root>/workdir` (a `HOME`
/// of `env` comes from [`home_setting`]); with an agent, its binary (read-only) and its
/// directory are bound in,
/// and every `exec instance://` sees them.
pub fn start_arguments(
    sif: &Path,
    name: &str,
    root: &Path,
    options: &ApptainerOptions,
    agent: Option<&AgentMount>,
) -> Vec<String> {
    let mut args: Vec<String> = [
        QUIET,
        "instance",
        "start",
        "--contain",
        "--cleanenv",
        NO_EVAL,
    ]
    .map(String::from)
    .to_vec();
    args.extend(["--workdir".into(), root.join(WORKDIR).display().to_string()]);
    match options.writable {
        WritableLayer::Tmpfs => args.push("--writable-tmpfs".into()),
        WritableLayer::Overlay => args.extend([
            "--overlay".into(),
            root.join(OVERLAY_DIR).display().to_string(),
        ]),
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
    /// Through the agent inside the instance, when it answers, or `exec`.
    commands: Exec,
    /// The local `apptainer exec` that runs the agent (its process group is killed on close).
    agent_process: Mutex<Option<Child>>,
    /// Taken over from an earlier life of the server ([`ApptainerEnv::adopt`]).
    adopted: bool,
}

impl ApptainerEnv {
    pub fn start(spec: &EnvSpec, ctx: &InstanceContext) -> Result<ApptainerEnv, EnvError> {
        let options = spec.apptainer();
        let force_cli = spec.forces_cli();
        let cli = cli_of(spec);
        let sif = sif_of(spec, ctx, &cli, options.build_timeout)?;
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
            commands: Exec::cli(
                &ctx.sandbox_name(),
                mount.as_ref().map(|mount| mount.dir.clone()),
            ),
            agent_process: Mutex::new(None),
            adopted: false,
        };
        let started = this.start_instance(&sif, &options, mount.as_ref());
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

    /// Makes the instance's directories and runs `instance start` (and the `cwd`'s `mkdir`).
    fn start_instance(
        &self,
        sif: &Path,
        options: &ApptainerOptions,
        mount: Option<&AgentMount>,
    ) -> Result<(), EnvError> {
        super::instance_dir(&self.root_dir)?;
        let mut dirs = vec![self.root_dir.join(WORKDIR), self.root_dir.join(HOME_DIR)];
        if options.writable == WritableLayer::Overlay {
            dirs.push(self.root_dir.join(OVERLAY_DIR));
        }
        for dir in &dirs {
            std::fs::create_dir_all(dir).map_err(|source| EnvError::Io {
                context: format!("cannot create {}", dir.display()),
                source,
            })?;
        }
        let home = self.home_setting(&self.env)?;
        let mut start = Command::new(&self.cli);
        start
            .args(start_arguments(
                sif,
                &self.name,
                &self.root_dir,
                options,
                mount,
            ))
            .envs(tool_env(&self.cli, &self.env))
            .envs(home);
        run_tool(
            &format!("{} instance start", self.cli),
            start,
            self.container_timeout,
        )?;
        if let Some(cwd) = &self.cwd {
            // Like docker's --workdir: the working directory exists from the start.
            let mut mkdir = Command::new(&self.cli);
            mkdir.args([
                SILENT,
                "exec",
                NO_EVAL,
                &format!("instance://{}", self.name),
                "mkdir",
                "-p",
                cwd,
            ]);
            run_tool(
                &format!("{} exec mkdir", self.cli),
                mkdir,
                self.container_timeout,
            )?;
        }
        Ok(())
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
        let options = spec.apptainer();
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
        let commands = Exec::adopt(ctx, handle, &format!("{cli} exec"));
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
            commands,
            // The earlier life's `exec` of the agent is not our child: close ends the agent
            // by its marker, and that `exec` with it (see `close`).
            agent_process: Mutex::new(None),
            adopted: true,
        })
    }

    /// Runs the agent inside the instance and waits until it answers; if it exits first (it
    /// cannot run there) or never answers, commands go through `apptainer exec`.
    fn start_agent(&mut self, mount: &AgentMount) -> Result<(), EnvError> {
        let mut command = Command::new(&self.cli);
        command
            .args(self.agent_arguments())
            .envs(tool_env(&self.cli, &self.env))
            .envs(self.home_setting(&self.env)?);
        let log = self.root_dir.join("agent.log");
        let child = spawn::spawn_daemon(command, &log).map_err(|source| EnvError::Io {
            context: format!("cannot run {} exec (the agent)", self.cli),
            source,
        })?;
        *self.agent_process.lock() = Some(child);
        let client = mount.connect(&|| spawn::has_exited(&self.agent_process));
        if client.is_none() {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            log::warn!(
                "the agent did not come up in {} ({}): its commands go through {} exec",
                self.name,
                super::tool::tail(said.trim(), AGENT_LOG_CHARS),
                self.cli
            );
            self.stop_agent();
        }
        self.commands = Exec::agent(&self.name, client, mount.dir.clone());
        Ok(())
    }

    /// The arguments of the `exec` that runs the agent (after the program name): the
    /// environment (see [`tool_env`] and [`home_setting`]) and working directory of a command
    /// of the CLI path.
    fn agent_arguments(&self) -> Vec<String> {
        let mut args: Vec<String> = [SILENT, "exec", "--cleanenv", NO_EVAL]
            .map(String::from)
            .to_vec();
        args.push("--pwd".into());
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

    /// [`home_setting`] for this instance's CLI and home directory.
    fn home_setting(
        &self,
        env: &BTreeMap<String, String>,
    ) -> Result<Option<(String, String)>, EnvError> {
        home_setting(&self.cli, env, &self.root_dir.join(HOME_DIR))
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
    fn agent_exec(&self, request: &ExecRequest) -> ExecWire {
        let mut exec = ExecWire::for_agent(request, self.base_cwd(), self.shell.clone());
        exec.cwd.get_or_insert_with(|| self.base_cwd().to_string());
        exec
    }

    /// The arguments of `exec` for one command (after the program name).
    fn exec_arguments(&self, request: &ExecRequest) -> Vec<String> {
        let mut args: Vec<String> = [SILENT, "exec", "--cleanenv", NO_EVAL]
            .map(String::from)
            .to_vec();
        // Always an absolute --pwd: without one, apptainer picks the server's own directory.
        // The command's own `cwd` is entered by its shell (apptainer would answer a missing
        // one with its own words): the exec starts in the instance's.
        args.extend(["--pwd".into(), self.base_cwd().to_string()]);
        args.extend([format!("instance://{}", self.name)]);
        let cwd = command_cwd(self.base_cwd(), request);
        args.extend(shell_words(
            self.shell.as_deref(),
            cwd.as_deref(),
            &request.cmd,
        ));
        args
    }

    /// The environment of one command: the instance's, the command's, and the markers; `HOME`,
    /// if the instance's or the command's `env` sets it, as [`home_setting`].
    fn exec_env(
        &self,
        request: &ExecRequest,
        exec_id: &str,
    ) -> Result<Vec<(String, String)>, EnvError> {
        let mut env = self.env.clone();
        env.extend(request.env.clone());
        env.insert(EXEC_MARKER.into(), exec_id.into());
        let mut vars = tool_env(&self.cli, &env);
        vars.extend(self.home_setting(&env)?);
        Ok(vars)
    }

    /// Runs one command through `apptainer exec instance://`.
    fn cli_exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        let exec_id = self.next_exec.fetch_add(1, Ordering::Relaxed).to_string();
        let mut command = Command::new(&self.cli);
        command
            .args(self.exec_arguments(request))
            .envs(self.exec_env(request, &exec_id)?);
        let stdin = super::stdin_file(request)?;
        let result = spawn::run_marked(
            command,
            stdin.as_ref(),
            request.limits,
            &self.groups,
            request.sink.as_ref(),
            &self.name,
            &exec_id,
        )
        .map_err(|source| EnvError::Io {
            context: format!("cannot run {} exec", self.cli),
            source,
        })?;
        refused_cwd(result, command_cwd(self.base_cwd(), request).as_deref())
    }

    fn marker(&self) -> Marker<'_> {
        Marker::Is(INSTANCE_MARKER, &self.name)
    }

    /// Kills what an earlier life of the server left in this adopted instance, wherever it is
    /// in the process tree, and waits (bounded) until it is gone. Its agent runs under the
    /// `apptainer exec` that started it, which the crash orphaned: the agent is neither in our
    /// tree nor init's own child, which is all [`spawn::kill_marked`] reaches. The instance
    /// name is this server's (`ars-<server_id>-...`), taken from its own journal.
    fn kill_earlier_life(&self) {
        let marker = [self.marker()];
        spawn::signal_marked(&marker, libc::SIGKILL);
        let deadline = std::time::Instant::now() + EARLIER_LIFE_WAIT;
        while spawn::signal_marked(&marker, 0) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(EARLIER_LIFE_POLL);
        }
    }
}

impl Environment for ApptainerEnv {
    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        self.commands.run(
            request.sink.as_ref(),
            || self.agent_exec(request),
            || self.cli_exec(request),
        )
    }

    /// With `writable: "overlay"`, a copy of the overlay directory, the work directory and
    /// the home; with `--writable-tmpfs` (the default) what the sandbox wrote is in the running
    /// instance's memory, out of reach: a 400 that says so.
    fn fork_into(&self, dst: &InstanceContext) -> Result<super::fork::ForkSeed, EnvError> {
        if !self.root_dir.join(OVERLAY_DIR).is_dir() {
            return Err(EnvError::Invalid(
                "an apptainer instance with writable \"tmpfs\" (the default) keeps what it \
                 wrote in memory, where no copy reaches it: it cannot be forked; start it with \
                 environment_config.writable \"overlay\" to fork it"
                    .into(),
            ));
        }
        super::fork::copy_dirs(
            &self.root_dir,
            &dst.root,
            &super::fork::APPTAINER_OVERLAY_DIRS,
            dst.fork_timeout,
        )?;
        Ok(super::fork::ForkSeed::default())
    }

    fn agent_files(&self) -> Option<(&Exec, &str)> {
        Some((&self.commands, self.base_cwd()))
    }

    fn close(&self) -> Result<(), EnvError> {
        self.groups.kill_all();
        self.stop_agent();
        if self.adopted {
            self.kill_earlier_life();
        }
        spawn::kill_marked(self.marker());
        self.commands.close();
        let mut stop = Command::new(&self.cli);
        stop.args([QUIET, "instance", "stop", &self.name]);
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
        self.commands.describe_into(&mut map);
        map
    }

    fn handle(&self) -> Option<Value> {
        Some(
            self.commands
                .handle_into(serde_json::json!({"instance": self.name})),
        )
    }
}

/// The SIF file of the spec's image: the image itself when it is one, else its cached build.
fn sif_of(
    spec: &EnvSpec,
    ctx: &InstanceContext,
    cli: &str,
    build_timeout: Duration,
) -> Result<PathBuf, EnvError> {
    if let Some(file) = crate::env::image::image_file(&spec.image, "sif", "SIF") {
        return file;
    }
    let source = build_source(&spec.image);
    cached_image(&ctx.cache_dir(), "sif", "sif", &source, |partial| {
        let mut build = Command::new(cli);
        build.args([QUIET, "build"]).arg(partial).arg(&source);
        run_tool(&format!("{cli} build"), build, build_timeout).map(drop)
    })
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

/// How long the start-up check waits for `<cli> --version`.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The oldest versions arservice's command lines work with (`--no-eval`, apptainer 1.1.0,
/// SingularityCE 3.10.0), as (major, minor).
const OLDEST_APPTAINER: (u32, u32) = (1, 1);
const OLDEST_SINGULARITY_CE: (u32, u32) = (3, 10);

/// The tool and version `<cli> --version` names (`apptainer version 1.3.4`, `singularity-ce
/// version 4.1.0`, `singularity version 3.8.7`), and what will not work with it: one sentence
/// each, none when everything does.
pub fn version_problems(said: &str) -> (String, Vec<String>) {
    let line = said
        .lines()
        .find(|line| line.contains(" version "))
        .unwrap_or("");
    let Some((product, version)) = line.trim().split_once(" version ") else {
        return (
            said.trim().to_string(),
            vec![format!(
                "cannot tell which tool or version this is (--version said {:?})",
                said.trim()
            )],
        );
    };
    let numbers: Vec<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|part| part.parse().ok())
        .collect();
    let found = format!("{product} {}", version.trim());
    let (major, minor) = match numbers[..] {
        [major, minor] => (major, minor),
        _ => {
            return (
                found.clone(),
                vec![format!("cannot read the version of {found}")],
            )
        }
    };
    let no_eval = |oldest: &str| {
        format!(
            "{found} is older than {oldest} and has no --no-eval: every instance start fails \
             (arservice supports apptainer >= 1.1.0 and SingularityCE >= 3.10.0)"
        )
    };
    let problems = match product.trim() {
        "apptainer" if (major, minor) < OLDEST_APPTAINER => vec![no_eval("apptainer 1.1.0")],
        "singularity-ce" if (major, minor) < OLDEST_SINGULARITY_CE => {
            vec![no_eval("SingularityCE 3.10.0")]
        }
        "apptainer" | "singularity-ce" => vec![],
        "singularity" => vec![no_eval("the apptainer/SingularityCE split")],
        other => vec![format!(
            "{other} is neither apptainer nor SingularityCE: its command lines were not reviewed"
        )],
    };
    (found, problems)
}

/// The start-up check of an installed `cli`: logs its version and what will not work with it.
pub fn check_installed(cli: &str) {
    let mut version = Command::new(cli);
    version.arg("--version");
    match run_tool(&format!("{cli} --version"), version, VERSION_TIMEOUT) {
        Ok(said) => {
            let (found, problems) = version_problems(&said);
            if problems.is_empty() {
                log::info!("{cli} is {found}: supported");
            }
            for problem in problems {
                log::warn!("{cli}: {problem}");
            }
        }
        Err(err) => log::warn!("{cli}: cannot tell its version: {err}"),
    }
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
        stop.args([QUIET, "instance", "stop", name]);
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
    use crate::env::exec::ENTER_CWD;
    use crate::env::Limits;
    use crate::env::BASH_OR_SH;

    #[test]
    fn start_command_line_with_each_writable_layer() {
        let tmpfs = ApptainerOptions::default();
        let root = Path::new("/state/instances/r");
        assert_eq!(
            start_arguments(Path::new("/c/x.sif"), "ars-abcd1234-r", root, &tmpfs, None),
            [
                "-q",
                "instance",
                "start",
                "--contain",
                "--cleanenv",
                "--no-eval",
                "--workdir",
                "/state/instances/r/workdir",
                "--writable-tmpfs",
                "/c/x.sif",
                "ars-abcd1234-r"
            ]
        );
        let overlay = ApptainerOptions {
            writable: WritableLayer::Overlay,
            ..ApptainerOptions::default()
        };
        assert_eq!(
            start_arguments(Path::new("/c/x.sif"), "n", root, &overlay, None),
            [
                "-q",
                "instance",
                "start",
                "--contain",
                "--cleanenv",
                "--no-eval",
                "--workdir",
                "/state/instances/r/workdir",
                "--overlay",
                "/state/instances/r/overlay",
                "/c/x.sif",
                "n"
            ]
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
            commands: Exec::cli("ars-abcd1234-r", None),
            agent_process: Mutex::new(None),
            adopted: false,
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
            stdin: None,
            sink: None,
        }
    }

    #[test]
    fn start_command_line_with_the_agent_bound_in() {
        let tmpfs = ApptainerOptions::default();
        let mount = AgentMount {
            binary: "/opt/ars/arservice".into(),
            dir: "/state/agents/00ff".into(),
        };
        assert_eq!(
            start_arguments(
                Path::new("/c/x.sif"),
                "n",
                Path::new("/state/instances/r"),
                &tmpfs,
                Some(&mount)
            ),
            [
                "-q",
                "instance",
                "start",
                "--contain",
                "--cleanenv",
                "--no-eval",
                "--workdir",
                "/state/instances/r/workdir",
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
                "-s",
                "exec",
                "--cleanenv",
                "--no-eval",
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
        assert_eq!(plain.agent_arguments()[5], "/");
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
                "-s",
                "exec",
                "--cleanenv",
                "--no-eval",
                "--pwd",
                "/testbed",
                "instance://ars-abcd1234-r",
                "sh",
                "-c",
                &format!("{ENTER_CWD}{BASH_OR_SH}"),
                "sh",
                "/testbed/sub",
                "ls",
            ]
        );
        assert_eq!(
            env.exec_env(&request, "4").unwrap(),
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
        assert_eq!(args[4..6], ["--pwd", "/"]);
        assert_eq!(args[11], "/sub");
        assert_eq!(
            tool_env(
                "/usr/bin/singularity",
                &[("A".to_string(), "b=c,d".to_string())].into()
            ),
            [("SINGULARITYENV_A".to_string(), "b=c,d".to_string())]
        );
    }

    #[test]
    fn home_goes_through_the_home_variable_never_an_argument() {
        let env = ApptainerEnv {
            env: [
                ("HOME".to_string(), "/home/agent".to_string()),
                (INSTANCE_MARKER.to_string(), "ars-abcd1234-r".to_string()),
            ]
            .into(),
            ..instance()
        };
        assert!(!tool_env(&env.cli, &env.env)
            .iter()
            .any(|(name, _)| name.ends_with("_HOME")));
        assert_eq!(
            env.home_setting(&env.env).unwrap(),
            Some((
                "APPTAINER_HOME".to_string(),
                "/state/instances/r/home:/home/agent".to_string()
            ))
        );
        assert!(!env
            .agent_arguments()
            .iter()
            .any(|arg| arg.contains("/home/agent")));
        // A command's own HOME wins, as every other variable of its env does.
        let own = ExecRequest {
            env: [("HOME".to_string(), "/tmp/h".to_string())].into(),
            ..request()
        };
        assert!(!env
            .exec_arguments(&own)
            .iter()
            .any(|arg| arg.contains("/tmp/h")));
        let vars = env.exec_env(&own, "1").unwrap();
        assert!(vars.contains(&(
            "APPTAINER_HOME".to_string(),
            "/state/instances/r/home:/tmp/h".to_string()
        )));
        assert!(!vars.iter().any(|(name, _)| name.ends_with("ENV_HOME")));
        let singularity = ApptainerEnv {
            cli: "/usr/bin/singularity".into(),
            ..env
        };
        assert_eq!(
            singularity.home_setting(&own.env).unwrap().unwrap().0,
            "SINGULARITY_HOME"
        );
        for bad in ["relative", "/a:b", "/a,b", "/a\nb"] {
            let bad = ExecRequest {
                env: [("HOME".to_string(), bad.to_string())].into(),
                ..request()
            };
            assert!(matches!(
                singularity.exec_env(&bad, "1"),
                Err(EnvError::Invalid(_))
            ));
        }
    }

    #[test]
    fn versions_that_cannot_run_these_command_lines_are_named() {
        for supported in [
            "apptainer version 1.1.0",
            "apptainer version 1.3.4-1.el8",
            "singularity-ce version 3.10.5",
            "singularity-ce version 4.1.0-jammy",
        ] {
            let (found, problems) = version_problems(supported);
            assert!(problems.is_empty(), "{supported}: {problems:?}");
            assert_eq!(found, supported.replace(" version", ""));
        }
        for unsupported in [
            "apptainer version 1.0.3",
            "singularity-ce version 3.9.9",
            "singularity version 3.8.7",
        ] {
            let (_, problems) = version_problems(unsupported);
            assert_eq!(problems.len(), 1, "{unsupported}");
            assert!(problems[0].contains("--no-eval"), "{problems:?}");
        }
        for odd in ["", "what is this", "apptainer version x"] {
            assert_eq!(version_problems(odd).1.len(), 1, "{odd:?}");
        }
    }
}
