//! The `enroot` environment: the image imported once into a cached `.sqsh`, one container
//! (`enroot create`) and one long-lived container process (`enroot start`) per instance,
//! commands through `enroot exec <pid>`, `enroot remove` on close. A fork copies the
//! container's rootfs under the new container's name and skips `enroot create`.
//!
//! Owns those command lines and the `ENROOT_*` settings: the paths are pinned under the state
//! dir unless the server's environment sets them, so instances never touch the user's own
//! enroot data. Container processes live in the host's process table and carry the instance and
//! command markers, which is how a timeout or a close finds them.
//!
//! What enroot itself does to a command line (its source, as issue 20 cites it), and how this
//! file deals with it:
//! - `enroot start` runs the image's `/etc/rc`, which execs the image's ENTRYPOINT with the
//!   command as its arguments (`src/docker.sh`, enroot#38, #266): `--rc` replaces it with a
//!   script of our own, `exec "$@"` (pyxis writes the same into `/etc/rc.local`).
//! - Without `--pid`, `enroot start` execs down without forking: the process we start *is* the
//!   container process, and its pid is what `enroot exec` joins (as pyxis does; `enroot list
//!   --fancy` finds pids through `lsns` and `mountinfo` and answers `<unknown>` on NFS,
//!   enroot#242).
//! - `enroot exec` only checks that the pid is alive, then joins its namespaces: a stale pid
//!   would take commands to whatever process got the number. The container process is our own
//!   unreaped child, checked alive (and its start time unchanged) before every exec.
//! - Its login shell sources `/etc/profile`, which can reset `PATH`: `ENROOT_LOGIN_SHELL=n`.
//! - `common::envfmt` strips a value's surrounding quotes and drops `ENROOT_*` names, and
//!   `--env` splits at newlines: such variables are refused (400), never changed silently.
//! - `--env NAME=VALUE` puts the value on the command lines of `enroot` and of what it runs
//!   (`runtime::start` hands the list to `enroot-unshare ... bash -c` as an argument), where
//!   `ps` shows it to every user of the machine. So no value of the instance's or a command's
//!   environment is ever an argument: `enroot start` gets them from `--conf`, a private (0600)
//!   configuration script whose `environ()` prints a private file (enroot's documented way,
//!   `doc/cmd/start.md`), and `enroot exec` gets them on the command's stdin, read and
//!   exported by the first words of the command inside the container (then stdin is
//!   `/dev/null` again). Not `--env NAME` with the value in enroot's own environment: enroot
//!   is a bash script that runs host tools, and a client's `BASH_ENV`, `LD_PRELOAD`, `PATH`
//!   or `HOME` (enroot's hooks directory) there would run code of the client's choosing on
//!   the host. Only our own markers are `--env` arguments.
//! - `docker://registry/repo` is enroot 4.0's syntax; 3.x reads `docker://registry#repo`
//!   (`registry_separator`).
//!
//! With an agent, `enroot start` mounts the agent binary (read-only) and the instance's agent
//! directory (mode 0700, this instance's only), and the container process is a shell that runs
//! the agent: it has the container's environment, which is what `enroot exec` gives a command
//! of the CLI path, and commands go over its socket. If the agent cannot run, the same shell
//! says so in the agent directory and waits forever, and commands go through `enroot exec`.

use super::agent::{AgentMount, Exec, AGENT_DIR_IN_SANDBOX, AGENT_IN_SANDBOX};
use super::config::options::DEFAULT_CONTAINER_TIMEOUT;
pub use super::config::RegistrySeparator;
use super::process::{self, Found};
use super::spawn::{self, Marker, ProcessGroups, EXEC_MARKER, INSTANCE_MARKER};
use super::wire::ExecWire;
use super::{
    cached_image, refused_cwd, run_tool, shell_words_after, EnvError, EnvSpec, Environment,
    ExecRequest, ExecResult, InstanceContext,
};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often start looks for the container process's ready line.
const START_POLL: Duration = Duration::from_millis(50);

/// What the container process prints first, once it runs inside the container (after enroot's
/// mounts, hooks and our `--rc` script): the start waits for this line in its log.
const READY_LINE: &str = "arservice: container process up";

/// The command script `enroot start --rc` runs instead of the image's `/etc/rc` (which would
/// exec the image's ENTRYPOINT with our command as its arguments): the command as given.
const RC_SCRIPT: &str =
    "# arservice: the command as given, without the image's ENTRYPOINT\nexec \"$@\"\n";

/// Settings for every call: no login shell in the container (its `/etc/profile` can reset the
/// `PATH` that `env` sets; `enroot.in` reads "n" as off).
const SETTINGS: [(&str, &str); 1] = [("ENROOT_LOGIN_SHELL", "n")];

/// The `ENROOT_*` variables pinned under `<state-dir>/enroot/` unless already set.
const PINNED_PATHS: [(&str, &str); 4] = [
    ("ENROOT_RUNTIME_PATH", "runtime"),
    ("ENROOT_CACHE_PATH", "cache"),
    ("ENROOT_DATA_PATH", "data"),
    ("ENROOT_TEMP_PATH", "tmp"),
];

/// The container process: says it is up ([`READY_LINE`]), then waits forever, reaping nothing
/// (enroot's own init does not run).
const KEEP_ALIVE: &str = "echo arservice: container process up; \
     trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

/// The container process with an agent: says it is up, then runs the agent; if the agent
/// cannot run (a `noexec` mount, a foreign architecture) its exit status goes to `failed` in
/// the agent directory and the process keeps the container alive as [`KEEP_ALIVE`] does. (The
/// same as docker's.)
const AGENT_OR_KEEP_ALIVE: &str = "echo arservice: container process up; \
     /.arservice/agent agent --socket /.arservice/run/agent.sock; \
     echo $? > /.arservice/run/failed; \
     trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

/// The options of the agent binary's mount: created as a file, bound read-only. (A mount
/// without options is `rbind,x-create=auto`, read-write.)
const READ_ONLY_FILE_MOUNT: &str = "x-create=file,bind,ro";

/// True when `path` can be one field of `--mount SRC:DST[:OPTIONS]`: enroot turns every colon
/// into a field separator and refuses whitespace.
fn mount_safe(path: &Path) -> bool {
    !path
        .to_string_lossy()
        .contains(|c: char| c == ':' || c.is_whitespace())
}

/// The first words of every command of the CLI path: export the `NAME=value` lines on stdin
/// (the command's environment, see [`env_input`]) up to the empty line that ends them, then
/// give the command `/dev/null` as stdin. The loop's variable is reserved (`ARSERVICE_*`), so
/// no variable of the user's is touched by it.
const READ_ENV: &str =
    "while IFS= read -r ARSERVICE_ENV_LINE && [ -n \"$ARSERVICE_ENV_LINE\" ]; do \
     export \"$ARSERVICE_ENV_LINE\" || exit 126; done; unset ARSERVICE_ENV_LINE; exec </dev/null; ";

/// [`READ_ENV`] for a command given a `stdin`: what follows the empty line is the command's
/// stdin. `read` leaves the file exactly after that line (a shell reads a pipe byte by byte,
/// and a file it reads ahead in is sought back), so the command reads from there.
const READ_ENV_KEEP_STDIN: &str =
    "while IFS= read -r ARSERVICE_ENV_LINE && [ -n \"$ARSERVICE_ENV_LINE\" ]; do \
     export \"$ARSERVICE_ENV_LINE\" || exit 126; done; unset ARSERVICE_ENV_LINE; ";

/// The instance's environment for `enroot start`, `NAME=value` lines, and the configuration
/// script that hands it to enroot (`--conf`), both private (0600) in the instance's
/// directory.
const ENV_FILE: &str = "enroot.env";
const CONF_FILE: &str = "enroot.conf";

/// `--conf`'s script for an environment in `env_file`: enroot calls its `environ()` and reads
/// what it prints as lines of an environment file (`runtime::_do_environ`), as it reads
/// `--env`.
fn conf_script(env_file: &Path) -> String {
    let quoted = env_file.display().to_string().replace('\'', "'\\''");
    format!(
        "# arservice: the container's environment, from a private file (never an argument)\n\
         environ() {{\n    cat -- '{quoted}'\n}}\n"
    )
}

/// `env` as the lines [`READ_ENV`] reads (values with a newline are refused before, see
/// [`check_env`]).
fn env_lines(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(name, value)| format!("{name}={value}\n"))
        .collect()
}

/// A command's stdin holding `env` ([`env_lines`]) and the empty line that ends it, then the
/// request's `stdin`: an anonymous file in memory, never on disk, readable only through the
/// descriptor ([`spawn::input_file`]).
fn env_input(
    env: &BTreeMap<String, String>,
    stdin: Option<&str>,
) -> std::io::Result<std::fs::File> {
    let mut input = env_lines(env);
    input.push('\n');
    input.push_str(stdin.unwrap_or_default());
    spawn::input_file(input.as_bytes())
}

/// The `ENROOT_*` settings for every call, for a server whose state dir is `state_dir`: the
/// paths and [`SETTINGS`].
pub fn enroot_paths(state_dir: &Path) -> Vec<(String, String)> {
    PINNED_PATHS
        .iter()
        .map(|(name, sub)| {
            let value = std::env::var(name)
                .unwrap_or_else(|_| state_dir.join("enroot").join(sub).display().to_string());
            (name.to_string(), value)
        })
        .chain(
            SETTINGS
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string())),
        )
        .collect()
}

/// The squashfs image of the spec: the image itself when it is one, else its cached import
/// (`import(source, partial_path)` makes it).
fn sqsh_of(
    spec: &EnvSpec,
    ctx: &InstanceContext,
    separator: RegistrySeparator,
    import: impl FnOnce(&str, &str) -> Result<(), EnvError>,
) -> Result<PathBuf, EnvError> {
    if let Some(file) = crate::env::image::image_file(&spec.image, "sqsh", "squashfs") {
        return file;
    }
    let source = import_source(&spec.image, separator);
    cached_image(&ctx.cache_dir(), "sqsh", "sqsh", &source, |partial| {
        import(&source, &partial.display().to_string())
    })
}

/// Where `import` reads the image: the image as given when it names a scheme, else docker,
/// its registry (a first component with a `.` or a `:`, or `localhost`, as docker reads it)
/// separated as `separator` says.
pub fn import_source(image: &str, separator: RegistrySeparator) -> String {
    if image.contains("://") {
        return image.to_string();
    }
    match (separator, image.split_once('/')) {
        (RegistrySeparator::Hash, Some((first, rest)))
            if first.contains(['.', ':']) || first == "localhost" =>
        {
            format!("docker://{first}#{rest}")
        }
        _ => format!("docker://{image}"),
    }
}

/// Why enroot would not pass `name=value` on unchanged, if it would not: `--env` splits its
/// value at newlines (`runtime::start`), and `common::envfmt` (`src/common.sh`) drops
/// `ENROOT_*` names and strips a value's surrounding quotes (either kind, then trailing
/// blanks: `s/^NAME=["'](.*)["'][[:space:]]*$/NAME=\1/`).
fn env_refusal(name: &str, value: &str) -> Option<&'static str> {
    let is_quote = |c: char| c == '"' || c == '\'';
    let blank = |c: char| matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r');
    let trimmed = value.trim_end_matches(blank);
    if name.starts_with("ENROOT_") {
        Some("enroot drops ENROOT_* variables")
    } else if value.contains('\n') {
        Some("enroot splits values at newlines")
    } else if trimmed.len() >= 2 && trimmed.starts_with(is_quote) && trimmed.ends_with(is_quote) {
        Some("enroot strips the quotes around a value")
    } else {
        None
    }
}

/// Refuses (400) an environment that enroot would change (see [`env_refusal`]).
fn check_env(env: &BTreeMap<String, String>, what: &str) -> Result<(), EnvError> {
    for (name, value) in env {
        if let Some(why) = env_refusal(name, value) {
            return Err(EnvError::Invalid(format!(
                "{what} {name}={value:?} cannot reach an enroot container unchanged: {why}"
            )));
        }
    }
    Ok(())
}

/// One enroot container and its long-lived process.
pub struct EnrootEnv {
    cli: String,
    name: String,
    root_dir: PathBuf,
    paths: Vec<(String, String)>,
    cwd: String,
    env: BTreeMap<String, String>,
    shell: Option<Vec<String>>,
    container_timeout: Duration,
    /// The container process (`enroot start`, which execs down into the container): our
    /// child, reaped only once it has exited, so that its pid cannot name another process
    /// while we hold it unreaped. `enroot exec` joins it.
    keeper: Mutex<Option<Child>>,
    /// The container process as started: its pid and start time, checked before every
    /// `enroot exec` ([`EnrootEnv::keeper_pid`]).
    keeper_found: Found,
    groups: ProcessGroups,
    next_exec: AtomicU64,
    /// The agent binary and directory mounted into the container, if any.
    mount: Option<AgentMount>,
    /// Through the agent in the container process, when it answers, or `enroot exec`.
    commands: Exec,
}

impl EnrootEnv {
    pub fn start(spec: &EnvSpec, ctx: &InstanceContext) -> Result<EnrootEnv, EnvError> {
        let options = spec.enroot();
        let (import_timeout, container_timeout) =
            (options.import_timeout, options.container_timeout);
        let separator = options.registry_separator;
        let force_cli = spec.forces_cli();
        let cli = spec.executable.clone().unwrap_or_else(|| "enroot".into());
        let name = ctx.sandbox_name();
        let mut env = BTreeMap::new();
        for variable in &spec.forward_env {
            if let Ok(value) = std::env::var(variable) {
                env.insert(variable.clone(), value);
            }
        }
        env.extend(spec.env.clone());
        env.insert(INSTANCE_MARKER.to_string(), name.clone());
        check_env(&env, "the variable")?;
        let paths = enroot_paths(&ctx.state_dir);
        for (variable, dir) in &paths {
            if PINNED_PATHS.iter().any(|(pinned, _)| pinned == variable) {
                std::fs::create_dir_all(dir).map_err(|source| EnvError::Io {
                    context: format!("cannot create {dir}"),
                    source,
                })?;
            }
        }
        let tool = |args: &[&str]| {
            let mut command = Command::new(&cli);
            command.args(args).envs(paths.iter().map(|(k, v)| (k, v)));
            command
        };
        let sqsh = sqsh_of(spec, ctx, separator, |source, partial| {
            run_tool(
                &format!("{cli} import"),
                tool(&["import", "-o", partial, source]),
                import_timeout,
            )
            .map(drop)
        })?;
        super::instance_dir(&ctx.root)?;
        let mount = AgentMount::for_instance(
            ctx,
            force_cli,
            "enroot's --mount (':' or whitespace)",
            mount_safe,
        )?;
        let mut this = EnrootEnv {
            cli: cli.clone(),
            name: name.clone(),
            root_dir: ctx.root.clone(),
            paths: paths.clone(),
            cwd: spec.cwd.clone().unwrap_or_else(|| "/".into()),
            env,
            shell: spec.shell.clone(),
            container_timeout,
            keeper: Mutex::new(None),
            keeper_found: Found {
                pid: 0,
                start_time: 0,
            },
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            commands: Exec::cli(&name, mount.as_ref().map(|mount| mount.dir.clone())),
            mount,
        };
        let sqsh = sqsh.display().to_string();
        // A fork's rootfs is already there: its source's, copied by `fork_into`.
        let created = match &ctx.fork {
            Some(_) => Ok(String::new()),
            None => run_tool(
                &format!("{cli} create"),
                tool(&["create", "--name", &name, &sqsh]),
                container_timeout,
            ),
        };
        if let Err(err) = created {
            let _ = this.close();
            return Err(err);
        }
        if let Err(err) = this.start_keeper() {
            let _ = this.close();
            return Err(err);
        }
        this.connect_agent();
        Ok(this)
    }

    /// `ENROOT_DATA_PATH`: where enroot keeps each container's root filesystem.
    fn data_path(&self) -> PathBuf {
        self.paths
            .iter()
            .find(|(name, _)| name == "ENROOT_DATA_PATH")
            .map(|(_, value)| PathBuf::from(value))
            .unwrap_or_default()
    }

    /// Waits for the agent that the container process runs, if it has one; without it (it
    /// says it failed, the process ended, or it never answers) commands go through the CLI.
    fn connect_agent(&mut self) {
        let Some(mount) = &self.mount else { return };
        let agent =
            mount.connect(&|| mount.dir.join("failed").exists() || spawn::has_exited(&self.keeper));
        if agent.is_none() {
            log::warn!(
                "the agent did not come up in {}: its commands go through {} exec",
                self.name,
                self.cli
            );
        }
        self.commands = Exec::agent(&self.name, agent, mount.dir.clone());
    }

    /// Starts the container process and waits until it says it runs inside the container
    /// ([`READY_LINE`] in its log). `enroot start` execs down without forking, so the process
    /// started is the container's: its pid is what `enroot exec` joins.
    fn start_keeper(&mut self) -> Result<(), EnvError> {
        let rc = self.root_dir.join("rc");
        std::fs::write(&rc, RC_SCRIPT).map_err(|source| EnvError::Io {
            context: format!("cannot write {}", rc.display()),
            source,
        })?;
        let env_file = self.root_dir.join(ENV_FILE);
        for (path, content) in [
            (&env_file, env_lines(&self.env)),
            (&self.root_dir.join(CONF_FILE), conf_script(&env_file)),
        ] {
            crate::state_dir::create_private_file(path)
                .and_then(|mut file| std::io::Write::write_all(&mut file, content.as_bytes()))
                .map_err(|source| EnvError::Io {
                    context: format!("cannot write {}", path.display()),
                    source,
                })?;
        }
        let log = self.root_dir.join("enroot-start.log");
        let child =
            spawn::spawn_daemon(self.command(&self.start_arguments()), &log).map_err(|source| {
                EnvError::Io {
                    context: format!("cannot run {} start", self.cli),
                    source,
                }
            })?;
        let pid = child.id() as i32;
        self.keeper_found = Found {
            pid,
            start_time: process::start_time(pid).unwrap_or(0),
        };
        *self.keeper.lock() = Some(child);
        let deadline = Instant::now() + self.container_timeout;
        loop {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            if said.lines().any(|line| line == READY_LINE) {
                break;
            }
            let exited = self
                .keeper
                .lock()
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(EnvError::Tool {
                    what: format!("{} start", self.cli),
                    detail: format!("exited ({status}): {}", said.trim()),
                });
            }
            if Instant::now() > deadline {
                return Err(EnvError::Tool {
                    what: format!("{} start", self.cli),
                    detail: format!(
                        "the container process did not come up in {:.0} s: {}",
                        self.container_timeout.as_secs_f64(),
                        said.trim()
                    ),
                });
            }
            std::thread::sleep(START_POLL);
        }
        if self.cwd != "/" {
            // Like docker's --workdir: the working directory exists from the start.
            let mkdir = self.command(&[
                "exec".into(),
                self.keeper_pid()?.to_string(),
                "mkdir".into(),
                "-p".into(),
                self.cwd.clone(),
            ]);
            run_tool(
                &format!("{} exec mkdir", self.cli),
                mkdir,
                self.container_timeout,
            )?;
        }
        Ok(())
    }

    /// The container process's pid, once it is checked to still be the process we started:
    /// our unreaped child (so that the number cannot have been reused) with the start time
    /// it had. `enroot exec` joins whatever process a pid names, so a stale pid would take a
    /// command to the host. A container process that has ended is reaped here, and the
    /// instance is gone (410). What remains open is the moment between this check and
    /// `enroot exec` reading the pid: the process would have to end, be reaped by another call
    /// of this method, and its number be reused, all within it.
    fn keeper_pid(&self) -> Result<i32, EnvError> {
        let mut keeper = self.keeper.lock();
        let Some(child) = keeper.as_mut() else {
            return Err(EnvError::Gone(format!(
                "the container process of {} is gone",
                self.name
            )));
        };
        let pid = self.keeper_found.pid;
        match child.try_wait() {
            Ok(None) if process::start_time(pid) == Some(self.keeper_found.start_time) => Ok(pid),
            Ok(None) => Err(EnvError::Gone(format!(
                "the container process of {} (pid {pid}) is not the one started",
                self.name
            ))),
            Ok(Some(status)) => Err(EnvError::Gone(format!(
                "the container process of {} ended ({status})",
                self.name
            ))),
            Err(source) => Err(EnvError::Io {
                context: format!("cannot check the container process of {}", self.name),
                source,
            }),
        }
    }

    fn command(&self, args: &[String]) -> Command {
        let mut command = Command::new(&self.cli);
        command
            .args(args)
            .envs(self.paths.iter().map(|(k, v)| (k, v)));
        command
    }

    /// The arguments of `enroot start` (after the program name): our command script instead
    /// of the image's `/etc/rc`, the environment through our configuration script (never a
    /// value as an argument), the container process, with the agent's mounts when it has an
    /// agent.
    fn start_arguments(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "start".into(),
            "--rw".into(),
            "--rc".into(),
            self.root_dir.join("rc").display().to_string(),
            "--conf".into(),
            self.root_dir.join(CONF_FILE).display().to_string(),
        ];
        if let Some(mount) = &self.mount {
            args.extend([
                "--mount".into(),
                format!(
                    "{}:{AGENT_IN_SANDBOX}:{READ_ONLY_FILE_MOUNT}",
                    mount.binary.display()
                ),
                "--mount".into(),
                format!("{}:{AGENT_DIR_IN_SANDBOX}", mount.dir.display()),
            ]);
        }
        let keep_alive = if self.mount.is_some() {
            AGENT_OR_KEEP_ALIVE
        } else {
            KEEP_ALIVE
        };
        args.extend([
            self.name.clone(),
            "sh".into(),
            "-c".into(),
            keep_alive.into(),
        ]);
        args
    }

    /// One command for the agent: like the CLI path, in the instance's directory unless it
    /// names its own, its `env` on top of the container process's (which the agent has).
    fn agent_exec(&self, request: &ExecRequest) -> ExecWire {
        let mut exec = ExecWire::for_agent(request, &self.cwd, self.shell.clone());
        exec.cwd.get_or_insert_with(|| self.cwd.clone());
        exec
    }

    /// The arguments of `enroot exec` into container process `pid` for one command (after
    /// the program name): the command marker is the only `--env`; the environment comes on
    /// stdin ([`EnrootEnv::exec_env`], read by [`READ_ENV`]).
    fn exec_arguments(&self, request: &ExecRequest, pid: i32, exec_id: &str) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "exec".into(),
            "--env".into(),
            format!("{EXEC_MARKER}={exec_id}"),
            pid.to_string(),
        ];
        let read_env = if request.stdin.is_some() {
            READ_ENV_KEEP_STDIN
        } else {
            READ_ENV
        };
        // `enroot exec` has no option for the working directory: the shell enters it.
        args.extend(shell_words_after(
            read_env,
            self.shell.as_deref(),
            Some(&self.exec_cwd(request)),
            &request.cmd,
        ));
        args
    }

    /// The directory one command runs in: its own `cwd` (a relative one taken from the
    /// instance's), else the instance's.
    fn exec_cwd(&self, request: &ExecRequest) -> String {
        match &request.cwd {
            Some(cwd) => Path::new(&self.cwd).join(cwd).display().to_string(),
            None => self.cwd.clone(),
        }
    }

    /// The environment of one command of the CLI path, as its stdin gives it: the instance's
    /// (the container process has it too), the command's, and the command marker last.
    fn exec_env(&self, request: &ExecRequest, exec_id: &str) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        env.extend(request.env.clone());
        env.insert(EXEC_MARKER.into(), exec_id.into());
        env
    }

    /// Runs one command through `enroot exec` into the container process.
    fn cli_exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        check_env(&request.env, "the command's variable")?;
        let pid = self.keeper_pid()?;
        let exec_id = self.next_exec.fetch_add(1, Ordering::Relaxed).to_string();
        let command = self.command(&self.exec_arguments(request, pid, &exec_id));
        env_input(&self.exec_env(request, &exec_id), request.stdin.as_deref())
            .and_then(|input| {
                spawn::run_marked(
                    command,
                    Some(&input),
                    request.limits,
                    &self.groups,
                    request.sink.as_ref(),
                    &self.name,
                    &exec_id,
                )
            })
            .map_err(|source| EnvError::Io {
                context: format!("cannot run {} exec", self.cli),
                source,
            })
            .and_then(|result| refused_cwd(result, Some(&self.exec_cwd(request))))
    }

    fn marker(&self) -> Marker<'_> {
        Marker::Is(INSTANCE_MARKER, &self.name)
    }
}

impl Environment for EnrootEnv {
    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        self.commands.run(
            request.sink.as_ref(),
            || self.agent_exec(request),
            || self.cli_exec(request),
        )
    }

    /// A copy of the container's root filesystem (`enroot create` made it under
    /// `ENROOT_DATA_PATH`) under the new instance's container name: its start uses it as it
    /// is instead of creating one from the image.
    fn fork_into(&self, dst: &InstanceContext) -> Result<super::fork::ForkSeed, EnvError> {
        let data = self.data_path();
        let target = data.join(dst.sandbox_name());
        if target.symlink_metadata().is_ok() {
            return Err(EnvError::Tool {
                what: format!("{} fork", self.cli),
                detail: format!("{} already exists", target.display()),
            });
        }
        if let Err(err) = super::fork::copy_tree(&data.join(&self.name), &target, dst.fork_timeout)
        {
            let _ = super::local::remove_tree(&target);
            return Err(err);
        }
        Ok(super::fork::ForkSeed {
            image: None,
            outside: vec![target],
        })
    }

    fn agent_files(&self) -> Option<(&Exec, &str)> {
        Some((&self.commands, &self.cwd))
    }

    fn close(&self) -> Result<(), EnvError> {
        self.groups.kill_all();
        if let Some(mut keeper) = self.keeper.lock().take() {
            spawn::signal_group(keeper.id() as i32, libc::SIGKILL);
            let _ = keeper.wait();
        }
        spawn::kill_marked(self.marker());
        self.commands.close();
        let remove = self.command(&["remove".into(), "--force".into(), self.name.clone()]);
        match run_tool(
            &format!("{} remove", self.cli),
            remove,
            self.container_timeout,
        ) {
            Err(EnvError::Tool { detail, .. }) if detail.contains("No such file or directory") => {}
            other => {
                other?;
            }
        }
        super::local::remove_tree(&self.root_dir)
    }

    /// The container process ended (its pid is no longer ours to give `enroot exec`).
    fn health(&self) -> Option<String> {
        match self.keeper_pid() {
            Err(EnvError::Gone(why)) => Some(why),
            _ => None,
        }
    }

    fn describe(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("container".into(), Value::from(self.name.clone()));
        map.insert("container_pid".into(), Value::from(self.keeper_found.pid));
        self.commands.describe_into(&mut map);
        map
    }
}

/// How long the start-up check waits for `enroot version`.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The enroot versions whose source was reviewed against these command lines (issue 20:
/// v3.4.1 to v4.1.2, and master), as (major, minor, patch); a later 4.x is taken as reviewed.
const OLDEST_REVIEWED: (u32, u32, u32) = (3, 4, 1);
const NEWEST_REVIEWED: (u32, u32, u32) = (4, 1, 2);

/// What will not work with the enroot that `enroot version` names (`3.4.1`): one sentence
/// each, none when everything does.
pub fn version_problems(said: &str) -> Vec<String> {
    let said = said.trim();
    let numbers: Vec<u32> = said
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|part| part.parse().unwrap_or(0))
        .collect();
    let version = match numbers[..] {
        [major, minor, patch] if said.starts_with(|c: char| c.is_ascii_digit()) => {
            (major, minor, patch)
        }
        _ => return vec![format!("cannot read the version {said:?}")],
    };
    let mut problems = Vec::new();
    if version < OLDEST_REVIEWED {
        problems.push(format!(
            "enroot {said} is older than 3.4.1, the oldest whose command lines were reviewed: \
             it may not work"
        ));
    }
    if version.0 > NEWEST_REVIEWED.0 {
        problems.push(format!(
            "enroot {said} is newer than 4.x, the newest whose command lines were reviewed: \
             it may not work"
        ));
    }
    if version.0 < 4 {
        problems.push(format!(
            "enroot {said} reads docker://registry/repo as a Docker Hub repository: an image \
             with a registry needs \"registry_separator\": \"#\""
        ));
    }
    problems
}

/// The start-up check of an installed `cli`: logs its version and what will not work with it.
/// Runs with the pinned paths, as every call does (enroot creates them).
pub fn check_installed(cli: &str, state_dir: &Path) {
    let mut version = Command::new(cli);
    version
        .arg("version")
        .envs(enroot_paths(state_dir).iter().map(|(k, v)| (k, v)));
    match run_tool(&format!("{cli} version"), version, VERSION_TIMEOUT) {
        Ok(said) => {
            let problems = version_problems(&said);
            if problems.is_empty() {
                log::info!("{cli} is enroot {}: supported", said.trim());
            }
            for problem in problems {
                log::warn!("{cli}: {problem}");
            }
        }
        Err(err) => log::warn!("{cli}: cannot tell its version: {err}"),
    }
}

/// Removes every enroot container named `prefix*` (`ars-<server_id>-`): leftovers of an
/// earlier life of the server with this state dir. Returns how many.
pub fn reap_leftovers(cli: &str, prefix: &str, state_dir: &Path) -> Result<usize, EnvError> {
    let paths = enroot_paths(state_dir);
    let mut list = Command::new(cli);
    list.arg("list").envs(paths.iter().map(|(k, v)| (k, v)));
    let listing = run_tool(&format!("{cli} list"), list, DEFAULT_CONTAINER_TIMEOUT)?;
    let names: Vec<&str> = listing
        .split_whitespace()
        .filter(|name| name.starts_with(prefix))
        .collect();
    let mut removed = 0;
    for name in &names {
        let mut remove = Command::new(cli);
        remove
            .args(["remove", "--force", name])
            .envs(paths.iter().map(|(k, v)| (k, v)));
        // One that fails must not keep the others; one already gone is fine.
        match run_tool(&format!("{cli} remove"), remove, DEFAULT_CONTAINER_TIMEOUT) {
            Ok(_) => removed += 1,
            Err(EnvError::Tool { detail, .. }) if detail.contains("No such file or directory") => {}
            Err(err) => log::warn!("cannot remove leftover container {name}: {err}"),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::exec::ENTER_CWD;
    use crate::env::{Limits, BASH_OR_SH};
    use serde_json::json;

    fn env() -> EnrootEnv {
        EnrootEnv {
            cli: "enroot".into(),
            name: "ars-abcd1234-r".into(),
            root_dir: "/state/instances/r".into(),
            paths: enroot_paths(Path::new("/state")),
            cwd: "/testbed".into(),
            env: [("A".to_string(), "1".to_string())].into(),
            shell: None,
            container_timeout: DEFAULT_CONTAINER_TIMEOUT,
            keeper: Mutex::new(None),
            keeper_found: Found {
                pid: 4242,
                start_time: 1,
            },
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            mount: None,
            commands: Exec::cli("ars-abcd1234-r", None),
        }
    }

    #[test]
    fn start_and_exec_command_lines() {
        let env = env();
        assert_eq!(
            env.start_arguments(),
            [
                "start",
                "--rw",
                "--rc",
                "/state/instances/r/rc",
                "--conf",
                "/state/instances/r/enroot.conf",
                "ars-abcd1234-r",
                "sh",
                "-c",
                KEEP_ALIVE
            ]
        );
        let request = ExecRequest {
            cmd: "ls".into(),
            cwd: Some("sub".into()),
            env: [("K".to_string(), "V".to_string())].into(),
            limits: Limits {
                timeout: Duration::from_secs(1),
                max_output_bytes: 1,
            },
            stdin: None,
            sink: None,
        };
        assert_eq!(
            env.exec_arguments(&request, 4242, "2"),
            [
                "exec",
                "--env",
                "ARSERVICE_EXEC=2",
                "4242",
                "sh",
                "-c",
                &format!("{READ_ENV}{ENTER_CWD}{BASH_OR_SH}"),
                "sh",
                "/testbed/sub",
                "ls",
            ]
        );
        // The values come on stdin, the marker last so that nothing replaces it.
        assert_eq!(
            env_lines(&env.exec_env(&request, "2")),
            "A=1\nARSERVICE_EXEC=2\nK=V\n"
        );
    }

    #[test]
    fn no_value_is_ever_an_argument() {
        let secret = "s3cr3t-value";
        let env = EnrootEnv {
            env: [
                ("A".to_string(), secret.to_string()),
                (INSTANCE_MARKER.to_string(), "ars-abcd1234-r".to_string()),
            ]
            .into(),
            shell: Some(vec!["bash".into(), "-c".into()]),
            mount: Some(AgentMount {
                binary: "/opt/ars/arservice".into(),
                dir: "/state/agents/00ff".into(),
            }),
            ..env()
        };
        let request = ExecRequest {
            cmd: "printenv A K".into(),
            cwd: None,
            env: [("K".to_string(), format!("{secret}-2"))].into(),
            limits: Limits {
                timeout: Duration::from_secs(1),
                max_output_bytes: 1,
            },
            stdin: None,
            sink: None,
        };
        let mut lines = env.start_arguments();
        lines.extend(env.exec_arguments(&request, 4242, "0"));
        assert!(lines.iter().all(|arg| !arg.contains(secret)), "{lines:?}");
        let mut command = env.command(&env.exec_arguments(&request, 4242, "0"));
        command.env("X", "y");
        assert!(command
            .get_envs()
            .all(|(_, value)| !value.is_some_and(|v| v.to_string_lossy().contains(secret))));
        // They are in the private files of `enroot start` and on the command's stdin.
        let exec_env = env_lines(&env.exec_env(&request, "0"));
        assert!(exec_env.contains(&format!("A={secret}\n")));
        assert!(exec_env.contains(&format!("K={secret}-2\n")));
        let mut input = env_input(&env.exec_env(&request, "0"), None).unwrap();
        let mut read = String::new();
        std::io::Read::read_to_string(&mut input, &mut read).unwrap();
        assert_eq!(read, format!("{exec_env}\n"));
    }

    #[test]
    fn the_configuration_script_prints_the_environment_file() {
        assert_eq!(
            conf_script(Path::new("/state/it's/enroot.env")),
            "# arservice: the container's environment, from a private file (never an argument)\n\
             environ() {\n    cat -- '/state/it'\\''s/enroot.env'\n}\n"
        );
        // The command's first words export what stdin says, then give it /dev/null.
        let env: BTreeMap<String, String> =
            [("A".into(), "x y".into()), ("B".into(), "$HOME 'q'".into())].into();
        let run = |read_env: &str, stdin: Option<&str>, shell: &str| {
            let output = Command::new(shell)
                .args([
                    "-c",
                    &format!("{read_env}printenv A B; cat; echo end"),
                    "sh",
                ])
                .stdin(env_input(&env, stdin).unwrap())
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        assert_eq!(run(READ_ENV, None, "sh"), "x y\n$HOME 'q'\nend\n");
        // With a request's stdin, the command reads it from its first byte on (bash reads
        // a file ahead and seeks back; sh reads byte by byte).
        let stdin = "\nline one\n\nA=not-an-env\nno newline at the end";
        for shell in ["sh", "bash"] {
            assert_eq!(
                run(READ_ENV_KEEP_STDIN, Some(stdin), shell),
                format!("x y\n$HOME 'q'\n{stdin}end\n"),
                "{shell}"
            );
        }
    }

    #[test]
    fn start_command_line_with_the_agent_mounted() {
        let env = EnrootEnv {
            mount: Some(AgentMount {
                binary: "/opt/ars/arservice".into(),
                dir: "/state/agents/00ff".into(),
            }),
            ..env()
        };
        assert_eq!(
            env.start_arguments(),
            [
                "start",
                "--rw",
                "--rc",
                "/state/instances/r/rc",
                "--conf",
                "/state/instances/r/enroot.conf",
                "--mount",
                "/opt/ars/arservice:/.arservice/agent:x-create=file,bind,ro",
                "--mount",
                "/state/agents/00ff:/.arservice/run",
                "ars-abcd1234-r",
                "sh",
                "-c",
                AGENT_OR_KEEP_ALIVE
            ]
        );
        // The shell runs the agent where the mounts put it, and keeps alive after it.
        assert!(AGENT_OR_KEEP_ALIVE.starts_with(&format!(
            "echo {READY_LINE}; {AGENT_IN_SANDBOX} agent --socket {}; \
             echo $? > {AGENT_DIR_IN_SANDBOX}/failed;",
            crate::env::agent::SOCKET_IN_SANDBOX
        )));
        assert!(KEEP_ALIVE.starts_with(&format!("echo {READY_LINE}; ")));
        let waits = KEEP_ALIVE.split_once("; ").unwrap().1;
        assert!(AGENT_OR_KEEP_ALIVE.ends_with(waits));
        assert!(mount_safe(Path::new("/state/agents/00ff")));
        assert!(!mount_safe(Path::new("/state:x/agents")));
        assert!(!mount_safe(Path::new("/state x/agents")));
    }

    #[test]
    fn agent_commands_run_in_the_instances_directory_unless_they_say() {
        let env = env();
        let request = ExecRequest {
            cmd: "ls".into(),
            cwd: Some("sub".into()),
            env: [("K".to_string(), "V".to_string())].into(),
            limits: Limits {
                timeout: Duration::from_secs(1),
                max_output_bytes: 1,
            },
            stdin: None,
            sink: None,
        };
        let exec = env.agent_exec(&request);
        assert_eq!(exec.cwd.as_deref(), Some("/testbed/sub"));
        assert_eq!(exec.env, request.env);
        assert_eq!(exec.cmd, "ls");
        let here = env.agent_exec(&ExecRequest {
            cwd: None,
            ..request
        });
        assert_eq!(here.cwd.as_deref(), Some("/testbed"));
    }

    #[test]
    fn paths_are_pinned_under_the_state_dir_unless_set() {
        let paths: BTreeMap<String, String> =
            enroot_paths(Path::new("/state")).into_iter().collect();
        for (name, sub) in PINNED_PATHS {
            if std::env::var(name).is_err() {
                assert_eq!(paths[name], format!("/state/enroot/{sub}"));
            }
        }
    }

    #[test]
    fn import_sources() {
        use RegistrySeparator::{Hash, Slash};
        for separator in [Slash, Hash] {
            assert_eq!(
                import_source("ubuntu:22.04", separator),
                "docker://ubuntu:22.04"
            );
            assert_eq!(
                import_source("dockerd://img:1", separator),
                "dockerd://img:1"
            );
            assert_eq!(
                import_source("library/ubuntu:22.04", separator),
                "docker://library/ubuntu:22.04"
            );
        }
        assert_eq!(
            import_source("nvcr.io/nvidia/pytorch:24.01", Slash),
            "docker://nvcr.io/nvidia/pytorch:24.01"
        );
        assert_eq!(
            import_source("nvcr.io/nvidia/pytorch:24.01", Hash),
            "docker://nvcr.io#nvidia/pytorch:24.01"
        );
        assert_eq!(
            import_source("localhost:5000/x", Hash),
            "docker://localhost:5000#x"
        );
        assert_eq!(import_source("localhost/x", Hash), "docker://localhost#x");
        let parse = |value: Value| {
            let config =
                json!({"container_type": "enroot", "image": "x", "registry_separator": value});
            EnvSpec::parse(config.as_object().unwrap().clone(), None)
                .map(|spec| spec.enroot().registry_separator)
        };
        assert_eq!(parse(json!("#")).unwrap(), Hash);
        assert_eq!(parse(json!("/")).unwrap(), Slash);
        assert_eq!(parse(Value::Null).unwrap(), Slash);
        assert!(parse(json!(":")).is_err());
    }

    #[test]
    fn values_enroot_would_change_are_refused() {
        for (name, value) in [
            ("ENROOT_DATA_PATH", "/x"),
            ("A", "two\nlines"),
            ("A", "\"quoted\""),
            ("A", "'single'"),
            ("A", "'mixed\""),
            ("A", "\"trailing blanks\" \t"),
            ("A", "''"),
        ] {
            assert!(env_refusal(name, value).is_some(), "{name}={value:?}");
            let env = [(name.to_string(), value.to_string())].into();
            assert!(matches!(
                check_env(&env, "the variable"),
                Err(EnvError::Invalid(_))
            ));
        }
        for value in [
            "",
            "\"",
            "say \"hi\"",
            "\"open",
            "close\"",
            "a'b'c",
            "$PATH",
            "x\\",
        ] {
            assert_eq!(env_refusal("A", value), None, "{value:?}");
        }
        assert_eq!(env_refusal("MY_ENROOT_X", "1"), None);
    }

    #[test]
    fn settings_turn_the_login_shell_off() {
        let settings: BTreeMap<String, String> =
            enroot_paths(Path::new("/state")).into_iter().collect();
        assert_eq!(settings["ENROOT_LOGIN_SHELL"], "n");
        assert!(RC_SCRIPT.lines().any(|line| line == "exec \"$@\""));
    }

    #[test]
    fn versions_are_checked_against_the_reviewed_ones() {
        assert!(version_problems("4.1.2\n").is_empty());
        assert!(version_problems("4.0.0").is_empty());
        let three = version_problems("3.4.1");
        assert_eq!(three.len(), 1);
        assert!(three[0].contains("registry_separator"), "{three:?}");
        assert_eq!(version_problems("3.2.0").len(), 2);
        assert_eq!(version_problems("5.0.0").len(), 1);
        assert_eq!(version_problems("what").len(), 1);
        assert_eq!(version_problems("").len(), 1);
    }
}
