//! The `enroot` environment: the image imported once into a cached `.sqsh`, one container
//! (`enroot create`) and one long-lived container process (`enroot start`) per instance,
//! commands through `enroot exec <pid>`, `enroot remove` on close.
//!
//! Owns those command lines and the `ENROOT_*` paths: they are pinned under the state dir
//! unless the server's environment sets them, so instances never touch the user's own enroot
//! data. Container processes live in the host's process table and carry the instance and
//! command markers, which is how a timeout or a close finds them.
//!
//! With an agent, `enroot start` mounts the agent binary (read-only) and the instance's agent
//! directory (mode 0700, this instance's only), and the container process is a shell that runs
//! the agent: it has the container's environment, which is what `enroot exec` gives a command
//! of the CLI path, and commands go over its socket. If the agent cannot run, the same shell
//! says so in the agent directory and waits forever, and commands go through `enroot exec`.

use super::spawn::{self, Marker, ProcessGroups, EXEC_MARKER, INSTANCE_MARKER};
use super::{
    cached_image, parse_timeout, run_tool, EnvError, EnvSpec, Environment, ExecRequest, ExecResult,
    InstanceContext,
};
use crate::agent::{AgentClient, AgentExec, AgentMount, AGENT_DIR_IN_SANDBOX, AGENT_IN_SANDBOX};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Default bound on `import` (`import_timeout`).
const DEFAULT_IMPORT_TIMEOUT: Duration = Duration::from_secs(1800);

/// Default bound on `create`, `remove` and on the container process coming up
/// (`container_timeout`).
const DEFAULT_CONTAINER_TIMEOUT: Duration = Duration::from_secs(120);

/// How often start looks for the container process.
const START_POLL: Duration = Duration::from_millis(50);

/// The `ENROOT_*` variables pinned under `<state-dir>/enroot/` unless already set.
const PINNED_PATHS: [(&str, &str); 4] = [
    ("ENROOT_RUNTIME_PATH", "runtime"),
    ("ENROOT_CACHE_PATH", "cache"),
    ("ENROOT_DATA_PATH", "data"),
    ("ENROOT_TEMP_PATH", "tmp"),
];

/// The container process: waits forever, reaping nothing (enroot's own init does not run).
const KEEP_ALIVE: &str = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

/// The container process with an agent: the agent; if it cannot run (a `noexec` mount, a
/// foreign architecture) its exit status goes to `failed` in the agent directory and the
/// process keeps the container alive as [`KEEP_ALIVE`] does. (The same as docker's.)
const AGENT_OR_KEEP_ALIVE: &str = "/.arservice/agent agent --socket /.arservice/run/agent.sock; \
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

/// Runs `$2` in directory `$1` with `bash -lc` where the image has bash, else `sh -c`
/// (`enroot exec` has no option for the working directory).
const CD_BASH_OR_SH: &str = "cd -- \"$1\" || exit 126; shift; \
     if command -v bash >/dev/null 2>&1; then exec bash -lc \"$1\" 2>&1; fi; exec sh -c \"$1\" 2>&1";

/// Runs `"$@"` (a configured shell and the command) in directory `$1`.
const CD_MERGE_OUTPUT: &str = "cd -- \"$1\" || exit 126; shift; exec \"$@\" 2>&1";

/// The `ENROOT_*` settings for every call, for a server whose state dir is `state_dir`.
pub fn enroot_paths(state_dir: &Path) -> Vec<(String, String)> {
    PINNED_PATHS
        .iter()
        .map(|(name, sub)| {
            let value = std::env::var(name)
                .unwrap_or_else(|_| state_dir.join("enroot").join(sub).display().to_string());
            (name.to_string(), value)
        })
        .collect()
}

/// Where `import` reads the image: the image as given when it names a scheme, else docker.
pub fn import_source(image: &str) -> String {
    if image.contains("://") {
        image.to_string()
    } else {
        format!("docker://{image}")
    }
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
    /// The container process; `enroot exec` joins it.
    keeper: Mutex<Option<Child>>,
    pid: i32,
    groups: ProcessGroups,
    next_exec: AtomicU64,
    /// The agent binary and directory mounted into the container, if any.
    mount: Option<AgentMount>,
    /// The agent in the container process, when it answers; `None`: commands go through
    /// `enroot exec`.
    agent: Option<AgentClient>,
}

impl EnrootEnv {
    pub fn start(spec: &EnvSpec, ctx: &InstanceContext) -> Result<EnrootEnv, EnvError> {
        let timeout = |key: &str, default: Duration| match spec.raw.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => parse_timeout(value, key).map_err(EnvError::Invalid),
        };
        let import_timeout = timeout("import_timeout", DEFAULT_IMPORT_TIMEOUT)?;
        let container_timeout = timeout("container_timeout", DEFAULT_CONTAINER_TIMEOUT)?;
        let force_cli = super::forces_cli(&spec.raw)?;
        let cli = spec.executable.clone().unwrap_or_else(|| "enroot".into());
        let paths = enroot_paths(&ctx.state_dir);
        for (_, dir) in &paths {
            std::fs::create_dir_all(dir).map_err(|source| EnvError::Io {
                context: format!("cannot create {dir}"),
                source,
            })?;
        }
        let tool = |args: &[&str]| {
            let mut command = Command::new(&cli);
            command.args(args).envs(paths.iter().map(|(k, v)| (k, v)));
            command
        };
        let sqsh = if spec.image.ends_with(".sqsh") {
            let sqsh = PathBuf::from(&spec.image);
            if !sqsh.is_file() {
                return Err(EnvError::Invalid(format!(
                    "image '{}' is not a squashfs file here",
                    spec.image
                )));
            }
            sqsh
        } else {
            let source = import_source(&spec.image);
            cached_image(&ctx.cache_dir(), "sqsh", "sqsh", &source, |partial| {
                let partial = partial.display().to_string();
                run_tool(
                    &format!("{cli} import"),
                    tool(&["import", "-o", &partial, &source]),
                    import_timeout,
                )
                .map(drop)
            })?
        };
        super::instance_dir(&ctx.root)?;
        let name = ctx.sandbox_name();
        let mut env = BTreeMap::new();
        for variable in &spec.forward_env {
            if let Ok(value) = std::env::var(variable) {
                env.insert(variable.clone(), value);
            }
        }
        env.extend(spec.env.clone());
        env.insert(INSTANCE_MARKER.to_string(), name.clone());
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
            pid: 0,
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            mount,
            agent: None,
        };
        let sqsh = sqsh.display().to_string();
        if let Err(err) = run_tool(
            &format!("{cli} create"),
            tool(&["create", "--name", &name, &sqsh]),
            container_timeout,
        ) {
            let _ = this.close();
            return Err(err);
        }
        match this.start_keeper() {
            Ok(pid) => this.pid = pid,
            Err(err) => {
                let _ = this.close();
                return Err(err);
            }
        }
        if let Some(mount) = &this.mount {
            let agent = mount
                .connect(&|| mount.dir.join("failed").exists() || spawn::has_exited(&this.keeper));
            if agent.is_none() {
                log::warn!(
                    "the agent did not come up in {name}: its commands go through {cli} exec"
                );
            }
            this.agent = agent;
        }
        Ok(this)
    }

    /// Starts the container process and waits until `enroot list` shows its pid.
    fn start_keeper(&self) -> Result<i32, EnvError> {
        let log = self.root_dir.join("enroot-start.log");
        let child =
            spawn::spawn_daemon(self.command(&self.start_arguments()), &log).map_err(|source| {
                EnvError::Io {
                    context: format!("cannot run {} start", self.cli),
                    source,
                }
            })?;
        *self.keeper.lock() = Some(child);
        let deadline = Instant::now() + self.container_timeout;
        loop {
            if let Some(pid) = self.container_pid()? {
                if self.cwd != "/" {
                    // Like docker's --workdir: the working directory exists from the start.
                    let mkdir = self.command(&[
                        "exec".into(),
                        pid.to_string(),
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
                return Ok(pid);
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
                        "no container process after {:.0} s",
                        self.container_timeout.as_secs_f64()
                    ),
                });
            }
            std::thread::sleep(START_POLL);
        }
    }

    fn command(&self, args: &[String]) -> Command {
        let mut command = Command::new(&self.cli);
        command
            .args(args)
            .envs(self.paths.iter().map(|(k, v)| (k, v)));
        command
    }

    /// The arguments of `enroot start` (after the program name): the container process, with
    /// the agent's mounts when it has an agent.
    fn start_arguments(&self) -> Vec<String> {
        let mut args: Vec<String> = vec!["start".into(), "--rw".into()];
        for (name, value) in &self.env {
            args.extend(["--env".into(), format!("{name}={value}")]);
        }
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
    fn agent_exec(&self, request: &ExecRequest) -> AgentExec {
        let mut exec = AgentExec::from_request(request, &self.cwd, self.shell.clone());
        exec.cwd.get_or_insert_with(|| self.cwd.clone());
        exec
    }

    /// The pid of this instance's container process, from `enroot list --fancy`.
    fn container_pid(&self) -> Result<Option<i32>, EnvError> {
        let listing = run_tool(
            &format!("{} list", self.cli),
            self.command(&["list".into(), "--fancy".into()]),
            self.container_timeout,
        )?;
        Ok(listed_pid(&listing, &self.name))
    }

    /// The arguments of `enroot exec` for one command (after the program name).
    fn exec_arguments(&self, request: &ExecRequest, exec_id: &str) -> Vec<String> {
        let mut args: Vec<String> = vec!["exec".into()];
        let mut env = self.env.clone();
        env.extend(request.env.clone());
        env.insert(EXEC_MARKER.into(), exec_id.into());
        for (name, value) in env {
            args.extend(["--env".into(), format!("{name}={value}")]);
        }
        let cwd = match &request.cwd {
            Some(cwd) => Path::new(&self.cwd).join(cwd).display().to_string(),
            None => self.cwd.clone(),
        };
        args.extend([self.pid.to_string(), "sh".into(), "-c".into()]);
        match &self.shell {
            Some(shell) => {
                args.extend([CD_MERGE_OUTPUT.into(), "sh".into(), cwd]);
                args.extend(shell.iter().cloned());
            }
            None => args.extend([CD_BASH_OR_SH.into(), "sh".into(), cwd]),
        }
        args.push(request.cmd.clone());
        args
    }

    fn marker(&self) -> Marker<'_> {
        Marker::Is(INSTANCE_MARKER, &self.name)
    }
}

impl Environment for EnrootEnv {
    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        if let Some(agent) = &self.agent {
            return agent
                .exec(&self.agent_exec(request))
                .map_err(|err| err.into_env_error(&self.name));
        }
        let exec_id = self.next_exec.fetch_add(1, Ordering::Relaxed).to_string();
        let command = self.command(&self.exec_arguments(request, &exec_id));
        spawn::run_marked(command, request.limits, &self.groups, &self.name, &exec_id).map_err(
            |source| EnvError::Io {
                context: format!("cannot run {} exec", self.cli),
                source,
            },
        )
    }

    fn close(&self) -> Result<(), EnvError> {
        self.groups.kill_all();
        if let Some(mut keeper) = self.keeper.lock().take() {
            spawn::signal_group(keeper.id() as i32, libc::SIGKILL);
            let _ = keeper.wait();
        }
        spawn::kill_marked(self.marker());
        if let Some(mount) = &self.mount {
            let _ = std::fs::remove_dir_all(&mount.dir);
        }
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

    fn describe(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("container".into(), Value::from(self.name.clone()));
        map.insert("container_pid".into(), Value::from(self.pid));
        let mode = if self.agent.is_some() { "agent" } else { "cli" };
        map.insert("exec_mode".into(), Value::from(mode));
        map
    }
}

/// The first pid of container `name` in `enroot list --fancy`'s table, read from the column
/// its header calls PID (`NAME SIZE PID STATE ...`); `None` while the container has no process.
fn listed_pid(listing: &str, name: &str) -> Option<i32> {
    let mut lines = listing.lines();
    let column = lines
        .next()?
        .split_whitespace()
        .position(|title| title == "PID")?;
    lines.find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.first() == Some(&name))
            .then(|| fields.get(column).and_then(|pid| pid.parse().ok()))
            .flatten()
    })
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
    use crate::env::Limits;

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
            pid: 4242,
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            mount: None,
            agent: None,
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
                "--env",
                "A=1",
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
        };
        assert_eq!(
            env.exec_arguments(&request, "2"),
            [
                "exec",
                "--env",
                "A=1",
                "--env",
                "ARSERVICE_EXEC=2",
                "--env",
                "K=V",
                "4242",
                "sh",
                "-c",
                CD_BASH_OR_SH,
                "sh",
                "/testbed/sub",
                "ls",
            ]
        );
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
                "--env",
                "A=1",
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
            "{AGENT_IN_SANDBOX} agent --socket {}; echo $? > {AGENT_DIR_IN_SANDBOX}/failed;",
            crate::agent::SOCKET_IN_SANDBOX
        )));
        assert!(AGENT_OR_KEEP_ALIVE.ends_with(KEEP_ALIVE));
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
    fn the_pid_is_read_from_the_pid_column() {
        // enroot's own example (doc/cmd/list.md), plus the "<unknown>" row it always prints.
        let listing =
            "NAME       SIZE  PID    STATE  STARTED   TIME   MNTNS       USERNS      COMMAND
<unknown>  0
alpine     5.9M
centos     235M  24353  S+     05:39:23  06:54  4026533442  4026533441  -sh
                 24522  S+     05:39:31  06:46  4026533439  4026533438  -sh
ubuntu     70M   24733  S+     05:39:48  06:29  4026533445  4026533444  sleep infinity
";
        assert_eq!(listed_pid(listing, "centos"), Some(24353));
        assert_eq!(listed_pid(listing, "ubuntu"), Some(24733));
        assert_eq!(listed_pid(listing, "alpine"), None);
        assert_eq!(listed_pid(listing, "missing"), None);
    }

    #[test]
    fn import_sources() {
        assert_eq!(import_source("ubuntu:22.04"), "docker://ubuntu:22.04");
        assert_eq!(import_source("dockerd://img:1"), "dockerd://img:1");
    }
}
