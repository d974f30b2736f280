//! The `bubblewrap` environment: every command is one `bwrap` sandbox over a view of the host
//! (like the original) or over an unpacked root filesystem shared by many instances.
//!
//! A fork copies the upper directory (or the host view's work directory) before the new
//! instance mounts its own overlay over it.
//!
//! Owns the `bwrap` command line and, for a root filesystem, the per-instance overlay mount
//! (lower: the shared rootfs, read-only; upper: the instance's own directory), so that many
//! instances share one rootfs while each instance's writes stay its own. Every command runs with
//! `--die-with-parent`, `--new-session`, a pid namespace of its own (`--unshare-pid`, with its
//! own `/proc`) and `--` before the program; its processes carry the instance and command
//! markers, which is how a timeout or a close finds them even though `--new-session` puts them
//! outside our process group.

use super::agent::{AgentMount, Exec, AGENT_DIR_IN_SANDBOX, AGENT_IN_SANDBOX, SOCKET_IN_SANDBOX};
use super::exec::command_cwd;
use super::spawn::{self, Marker, ProcessGroups, EXEC_MARKER, INSTANCE_MARKER};
use super::wire::ExecWire;
use super::{
    refused_cwd, run_tool, shell_words, EnvError, EnvSpec, Environment, ExecRequest, ExecResult,
    InstanceContext,
};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::process::Child;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Host directories shown read-only in host mode (the original's choice), when they exist.
const HOST_DIRS: [&str; 8] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc",
];

/// `PATH` inside the sandbox.
const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Bound on `mount` and `umount`.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a sandbox finds its environment file (bound read-only from the instance directory).
const ENV_IN_SANDBOX: &str = "/.arservice/env";

/// The words before the program when there is an environment file: export its variables,
/// then run the program with them.
const SOURCE_ENV: [&str; 4] = ["sh", "-c", ". /.arservice/env && exec \"$@\"", "sh"];

/// What the sandbox's `/` is.
#[derive(Debug, Clone, PartialEq)]
enum Root {
    /// The host's system directories, read-only; the instance's work directory writable at
    /// the same path.
    Host { dirs: Vec<String>, workdir: PathBuf },
    /// An overlay of a shared rootfs (`image`) and the instance's own upper directory,
    /// mounted at `merged`.
    Rootfs { merged: PathBuf },
}

/// One bubblewrap instance.
pub struct BwrapEnv {
    bwrap: String,
    root_dir: PathBuf,
    root: Root,
    /// Where commands run unless they say otherwise (a path inside the sandbox).
    cwd: String,
    /// Binds of the config's `cwd` in host mode (the original bound it writable).
    extra_binds: Vec<String>,
    /// What the server sets (`PATH`, `HOME`, the instance marker), on the command line:
    /// nothing of it is a secret.
    env: BTreeMap<String, String>,
    /// What the config sets (`forward_env`, then `env`): in a private file the sandbox
    /// sources before the program runs, never on a command line, where `ps` shows it to
    /// every user of the machine.
    user_env: BTreeMap<String, String>,
    shell: Option<Vec<String>>,
    /// `bwrap_args` from the config, placed before `--`.
    user_args: Vec<String>,
    sandbox_name: String,
    groups: ProcessGroups,
    next_exec: AtomicU64,
    /// With an agent, one long-lived sandbox runs it and every command goes through it;
    /// else one sandbox per command.
    commands: Exec,
    /// The agent's sandbox: its `bwrap` process.
    keeper: Mutex<Option<Child>>,
}

/// True when the path can go into an overlay mount option unquoted.
fn overlay_safe(path: &Path) -> bool {
    let text = path.to_string_lossy();
    !text.contains([',', ':', '\\', '\n'])
}

impl BwrapEnv {
    pub fn start(spec: &EnvSpec, ctx: &InstanceContext) -> Result<BwrapEnv, EnvError> {
        let bwrap = spec.executable.clone().unwrap_or_else(|| "bwrap".into());
        let user_args = spec.bwrap().bwrap_args;
        let rootfs = spec
            .image
            .starts_with('/')
            .then(|| PathBuf::from(&spec.image));
        if let Some(rootfs) = &rootfs {
            if !rootfs.is_dir() {
                return Err(EnvError::Invalid(format!(
                    "image '{}' is not a directory: for bubblewrap, image is an unpacked root filesystem (an absolute path), or anything else for the host's own",
                    rootfs.display()
                )));
            }
            if !overlay_safe(rootfs) || !overlay_safe(&ctx.root) {
                return Err(EnvError::Invalid(
                    "the rootfs and state dir paths must not contain ',', ':' or '\\\\'".into(),
                ));
            }
        }
        let io = |context: String| move |source| EnvError::Io { context, source };
        super::instance_dir(&ctx.root)?;
        let tmp = ctx.root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io(format!("cannot create {}", tmp.display())))?;
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), SANDBOX_PATH.to_string());
        env.insert(INSTANCE_MARKER.to_string(), ctx.sandbox_name());
        let mut user_env = BTreeMap::new();
        for name in &spec.forward_env {
            if let Ok(value) = std::env::var(name) {
                user_env.insert(name.clone(), value);
            }
        }
        user_env.extend(spec.env.clone());
        let mut this = BwrapEnv {
            bwrap,
            root_dir: ctx.root.clone(),
            root: Root::Host {
                dirs: Vec::new(),
                workdir: PathBuf::new(),
            },
            cwd: String::new(),
            extra_binds: Vec::new(),
            env,
            user_env,
            shell: spec.shell.clone(),
            user_args,
            sandbox_name: ctx.sandbox_name(),
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            commands: Exec::cli(&ctx.sandbox_name(), None),
            keeper: Mutex::new(None),
        };
        let made = match rootfs {
            None => this.prepare_host(spec, ctx),
            Some(rootfs) => this.prepare_rootfs(spec, ctx, &rootfs),
        };
        if let Err(err) = made {
            let _ = this.close();
            return Err(err);
        }
        let mount = AgentMount::for_instance(ctx, spec.forces_cli(), "bwrap", |_| true);
        if let Err(err) = mount.and_then(|mount| match mount {
            Some(mount) => this.start_agent(mount),
            None => Ok(()),
        }) {
            let _ = this.close();
            return Err(err);
        }
        Ok(this)
    }

    /// Starts the long-lived sandbox that runs the agent; without it (it cannot run here),
    /// commands keep one sandbox each.
    fn start_agent(&mut self, mount: AgentMount) -> Result<(), EnvError> {
        let mut args = self.sandbox_arguments(&self.cwd, &self.env);
        args.extend([
            "--ro-bind".into(),
            mount.binary.display().to_string(),
            AGENT_IN_SANDBOX.into(),
            "--bind".into(),
            mount.dir.display().to_string(),
            AGENT_DIR_IN_SANDBOX.into(),
        ]);
        let env_file = self.write_env_file("instance", &self.user_env)?;
        args.extend(env_binding(env_file.as_deref()));
        args.extend(self.user_args.iter().cloned());
        args.push("--".into());
        if env_file.is_some() {
            args.extend(SOURCE_ENV.map(String::from));
        }
        args.extend([
            AGENT_IN_SANDBOX.into(),
            "agent".into(),
            "--socket".into(),
            SOCKET_IN_SANDBOX.into(),
        ]);
        let mut command = Command::new(&self.bwrap);
        command.args(args);
        let child =
            spawn::spawn_daemon(command, &self.root_dir.join("agent.log")).map_err(|source| {
                EnvError::Io {
                    context: format!("cannot run '{}'", self.bwrap),
                    source,
                }
            })?;
        *self.keeper.lock() = Some(child);
        let client = mount.connect(&|| spawn::has_exited(&self.keeper));
        if client.is_none() {
            log::warn!(
                "the agent did not come up in {}: one sandbox per command",
                self.sandbox_name
            );
            self.stop_keeper();
        }
        self.commands = Exec::agent(&self.sandbox_name, client, mount.dir);
        Ok(())
    }

    fn stop_keeper(&self) {
        if let Some(mut keeper) = self.keeper.lock().take() {
            spawn::signal_group(keeper.id() as i32, libc::SIGKILL);
            let _ = keeper.wait();
        }
    }

    fn prepare_host(&mut self, spec: &EnvSpec, ctx: &InstanceContext) -> Result<(), EnvError> {
        let workdir = ctx.root.join("work");
        std::fs::create_dir_all(&workdir).map_err(|source| EnvError::Io {
            context: format!("cannot create {}", workdir.display()),
            source,
        })?;
        self.env
            .insert("HOME".into(), workdir.display().to_string());
        self.cwd = match &spec.cwd {
            Some(cwd) => {
                let cwd = workdir.join(cwd);
                if !cwd.is_dir() {
                    return Err(EnvError::Invalid(format!(
                        "cwd '{}' is not a directory on this machine (bubblewrap without a rootfs binds the host's)",
                        cwd.display()
                    )));
                }
                if !cwd.starts_with(&workdir) {
                    let cwd = cwd.display().to_string();
                    self.extra_binds = vec!["--bind".into(), cwd.clone(), cwd];
                }
                cwd.display().to_string()
            }
            None => workdir.display().to_string(),
        };
        let dirs = HOST_DIRS
            .iter()
            .filter(|dir| Path::new(dir).exists())
            .map(|dir| dir.to_string())
            .collect();
        self.root = Root::Host { dirs, workdir };
        Ok(())
    }

    fn prepare_rootfs(
        &mut self,
        spec: &EnvSpec,
        ctx: &InstanceContext,
        rootfs: &Path,
    ) -> Result<(), EnvError> {
        let upper = ctx.root.join("upper");
        let work = ctx.root.join("overlay-work");
        let merged = ctx.root.join("rootfs");
        for dir in [&upper, &work, &merged] {
            std::fs::create_dir_all(dir).map_err(|source| EnvError::Io {
                context: format!("cannot create {}", dir.display()),
                source,
            })?;
        }
        mount_overlay(rootfs, &upper, &work, &merged)?;
        self.root = Root::Rootfs {
            merged: merged.clone(),
        };
        self.cwd = spec.cwd.clone().unwrap_or_else(|| "/".into());
        if !self.cwd.starts_with('/') {
            self.cwd = format!("/{}", self.cwd);
        }
        // Like docker's --workdir: the working directory exists from the start.
        create_inside(&merged, &self.cwd)?;
        self.env.insert("HOME".into(), "/root".into());
        Ok(())
    }

    /// The whole `bwrap` argument list for one command (after the program name);
    /// `env_file` holds the config's and the command's environment (see
    /// [`BwrapEnv::write_env_file`]).
    fn arguments(
        &self,
        request: &ExecRequest,
        exec_id: &str,
        env_file: Option<&Path>,
    ) -> Vec<String> {
        let mut env = self.env.clone();
        env.insert(EXEC_MARKER.into(), exec_id.into());
        // The command's own `cwd` is entered by its shell (`--chdir` would answer a missing
        // one with bwrap's words): the sandbox starts in the instance's.
        let mut args = self.sandbox_arguments(&self.cwd, &env);
        args.extend(env_binding(env_file));
        args.extend(self.user_args.iter().cloned());
        args.push("--".into());
        if env_file.is_some() {
            args.extend(SOURCE_ENV.map(String::from));
        }
        let cwd = command_cwd(&self.cwd, request);
        args.extend(shell_words(
            self.shell.as_deref(),
            cwd.as_deref(),
            &request.cmd,
        ));
        args
    }

    /// Writes `env` as `<instance>/env/<name>.sh`, a private (0600) file of `export` lines
    /// that the sandbox sources (see [`SOURCE_ENV`]); `None` when there is nothing to write.
    fn write_env_file(
        &self,
        name: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<Option<PathBuf>, EnvError> {
        if env.is_empty() {
            return Ok(None);
        }
        let dir = self.root_dir.join("env");
        let path = dir.join(format!("{name}.sh"));
        let io = |source| EnvError::Io {
            context: format!("cannot write {}", path.display()),
            source,
        };
        crate::state_dir::private_dir(&dir).map_err(io)?;
        let mut file = crate::state_dir::create_private_file(&path).map_err(io)?;
        std::io::Write::write_all(&mut file, export_lines(env).as_bytes()).map_err(io)?;
        Ok(Some(path))
    }

    /// The sandbox itself: namespaces, root, `/proc`, `/dev`, directory and environment (the
    /// instance marker always in it), without the user's `bwrap_args` and the program. A pid
    /// namespace of its own, with its own `/proc`: no instance sees another's processes, their
    /// `/proc/<pid>/root`, or the server's.
    fn sandbox_arguments(&self, cwd: &str, env: &BTreeMap<String, String>) -> Vec<String> {
        let mut args: Vec<String> = [
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
        ]
        .map(String::from)
        .to_vec();
        match &self.root {
            Root::Host { dirs, workdir } => {
                for dir in dirs {
                    args.extend(["--ro-bind".into(), dir.clone(), dir.clone()]);
                }
                // /tmp first: the work directory may itself be under the host's /tmp.
                let tmp = self.root_dir.join("tmp").display().to_string();
                args.extend(["--bind".into(), tmp, "/tmp".into()]);
                let workdir = workdir.display().to_string();
                args.extend(["--bind".into(), workdir.clone(), workdir]);
                args.extend(self.extra_binds.iter().cloned());
            }
            Root::Rootfs { merged } => {
                args.extend(["--bind".into(), merged.display().to_string(), "/".into()]);
            }
        }
        args.extend(["--proc", "/proc", "--dev", "/dev"].map(String::from));
        args.extend(["--chdir".into(), cwd.to_string(), "--clearenv".into()]);
        let mut env = env.clone();
        env.insert(INSTANCE_MARKER.into(), self.sandbox_name.clone());
        for (name, value) in env {
            args.extend(["--setenv".into(), name, value]);
        }
        args
    }

    fn markers(&self) -> Marker<'_> {
        Marker::Is(INSTANCE_MARKER, &self.sandbox_name)
    }
}

impl Environment for BwrapEnv {
    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        self.commands.run(
            request.sink.as_ref(),
            || ExecWire::for_agent(request, &self.cwd, self.shell.clone()),
            || self.cli_exec(request),
        )
    }

    fn agent_files(&self) -> Option<(&Exec, &str)> {
        Some((&self.commands, &self.cwd))
    }

    /// A copy of what the sandbox wrote: the overlay's upper directory over a rootfs (its
    /// whiteouts, 0/0 character devices, and opaque-directory attributes kept by `cp -a`), or
    /// the work directory in the host view; and its `/tmp`. The new instance's start mounts
    /// its overlay over the copy.
    fn fork_into(&self, dst: &InstanceContext) -> Result<super::fork::ForkSeed, EnvError> {
        let dirs = match &self.root {
            Root::Rootfs { .. } => super::fork::BWRAP_ROOTFS_DIRS,
            Root::Host { .. } => super::fork::BWRAP_HOST_DIRS,
        };
        super::fork::copy_dirs(&self.root_dir, &dst.root, &dirs, dst.fork_timeout)?;
        Ok(super::fork::ForkSeed::default())
    }

    fn close(&self) -> Result<(), EnvError> {
        self.groups.kill_all();
        self.stop_keeper();
        // All of them gone before the overlay is unmounted.
        spawn::kill_marked(self.markers());
        self.commands.close();
        if let Root::Rootfs { merged } = &self.root {
            unmount(merged)?;
        }
        super::local::remove_tree(&self.root_dir)
    }

    fn describe(&self) -> Map<String, Value> {
        let mut map = Map::new();
        let root = match &self.root {
            Root::Host { .. } => "host".to_string(),
            Root::Rootfs { merged } => merged.display().to_string(),
        };
        map.insert("sandbox_root".into(), Value::from(root));
        self.commands.describe_into(&mut map);
        map
    }
}

impl BwrapEnv {
    /// Runs one command in a sandbox of its own.
    fn cli_exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        let exec_id = self.next_exec.fetch_add(1, Ordering::Relaxed).to_string();
        let mut env = self.user_env.clone();
        env.extend(request.env.clone());
        let env_file = self.write_env_file(&format!("exec-{exec_id}"), &env)?;
        let mut command = Command::new(&self.bwrap);
        command.args(self.arguments(request, &exec_id, env_file.as_deref()));
        let ran = super::stdin_file(request).and_then(|stdin| {
            spawn::run_marked(
                command,
                stdin.as_ref(),
                request.limits,
                &self.groups,
                request.sink.as_ref(),
                &self.sandbox_name,
                &exec_id,
            )
            .map_err(|source| EnvError::Io {
                context: format!("cannot run '{}'", self.bwrap),
                source,
            })
        });
        if let Some(file) = env_file {
            let _ = std::fs::remove_file(file);
        }
        let result = ran?;
        refused_cwd(result, command_cwd(&self.cwd, request).as_deref())
    }
}

/// Creates `path` (a path inside the sandbox) below `root` on the host, as `mkdir -p` would
/// inside the sandbox. A `..` or a link on the way is refused (400): either would lead this
/// server's own `mkdir` out of the root filesystem, onto the host.
fn create_inside(root: &Path, path: &str) -> Result<(), EnvError> {
    let mut at = root.to_path_buf();
    for part in Path::new(path).components() {
        match part {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(name) => at.push(name),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(EnvError::Invalid(format!(
                    "cwd '{path}' must not contain '..'"
                )))
            }
        }
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.is_symlink() => {
                return Err(EnvError::Invalid(format!(
                    "cwd '{path}' passes through a symbolic link of the root filesystem ({}): give the path it points to",
                    at.strip_prefix(root).unwrap_or(&at).display()
                )))
            }
            Ok(_) => {
                return Err(EnvError::Invalid(format!(
                    "cwd '{path}' is not a directory in the root filesystem"
                )))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at).map_err(|source| EnvError::Io {
                    context: format!("cannot create cwd {path} in the rootfs"),
                    source,
                })?
            }
            Err(source) => {
                return Err(EnvError::Io {
                    context: format!("cannot create cwd {path} in the rootfs"),
                    source,
                })
            }
        }
    }
    Ok(())
}

/// The bind of an environment file, if there is one, at [`ENV_IN_SANDBOX`].
fn env_binding(env_file: Option<&Path>) -> Vec<String> {
    env_file
        .map(|file| {
            vec![
                "--ro-bind".into(),
                file.display().to_string(),
                ENV_IN_SANDBOX.into(),
            ]
        })
        .unwrap_or_default()
}

/// `export NAME='value'` lines for a POSIX shell (names are valid variable names; a `'` in a
/// value is closed, escaped and reopened).
fn export_lines(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(name, value)| format!("export {name}='{}'\n", value.replace('\'', "'\\''")))
        .collect()
}

/// Mounts `lower` (read-only) under `upper` at `merged`: the kernel's overlay as root,
/// `fuse-overlayfs` otherwise.
fn mount_overlay(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> Result<(), EnvError> {
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut mount = if root {
        let mut mount = Command::new("mount");
        mount.args(["-t", "overlay", "overlay", "-o"]);
        mount
    } else {
        let mut mount = Command::new("fuse-overlayfs");
        mount.arg("-o");
        mount
    };
    mount.arg(options).arg(merged);
    run_tool("mounting the rootfs overlay", mount, MOUNT_TIMEOUT).map(drop)
}

/// Unmounts an overlay made by [`mount_overlay`]; a path that is not mounted is fine.
pub fn unmount(merged: &Path) -> Result<(), EnvError> {
    if !is_mounted(merged) {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut umount = if root {
        Command::new("umount")
    } else {
        let mut umount = Command::new("fusermount");
        umount.arg("-u");
        umount
    };
    umount.arg(merged);
    match run_tool("unmounting the rootfs overlay", umount, MOUNT_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(err) if root => {
            // Something still holds it: detach it now, the kernel finishes when it can.
            let mut lazy = Command::new("umount");
            lazy.arg("-l").arg(merged);
            run_tool("unmounting the rootfs overlay", lazy, MOUNT_TIMEOUT)
                .map(drop)
                .map_err(|_| err)
        }
        Err(err) => Err(err),
    }
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(|path| PathBuf::from(path.replace("\\040", " ")))
        .filter(|path| path.starts_with(dir))
        .collect();
    found.sort_by_key(|path| std::cmp::Reverse(path.components().count()));
    found
}

fn is_mounted(path: &Path) -> bool {
    mounts_under(path).iter().any(|mount| mount == path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::exec::ENTER_CWD;
    use crate::env::Limits;
    use crate::env::BASH_OR_SH;

    fn env(root: Root) -> BwrapEnv {
        BwrapEnv {
            bwrap: "bwrap".into(),
            root_dir: "/state/instances/r".into(),
            root,
            cwd: "/work".into(),
            extra_binds: Vec::new(),
            env: [("PATH".to_string(), SANDBOX_PATH.to_string())].into(),
            user_env: BTreeMap::new(),
            shell: None,
            user_args: vec!["--unshare-net".into()],
            sandbox_name: "ars-abcd1234-r".into(),
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
            commands: Exec::cli("ars-abcd1234-r", None),
            keeper: Mutex::new(None),
        }
    }

    fn request() -> ExecRequest {
        ExecRequest {
            cmd: "echo hi".into(),
            cwd: Some("sub".into()),
            env: [("K".to_string(), "V".to_string())].into(),
            limits: Limits {
                timeout: Duration::from_secs(1),
                max_output_bytes: 10,
            },
            stdin: None,
            sink: None,
        }
    }

    #[test]
    fn host_mode_command_line() {
        let env = env(Root::Host {
            dirs: vec!["/usr".into(), "/etc".into()],
            workdir: "/state/instances/r/work".into(),
        });
        let args = env.arguments(
            &request(),
            "3",
            Some(Path::new("/state/instances/r/env/exec-3.sh")),
        );
        let expected: Vec<String> = [
            "--die-with-parent",
            "--new-session",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--ro-bind",
            "/usr",
            "/usr",
            "--ro-bind",
            "/etc",
            "/etc",
            "--bind",
            "/state/instances/r/tmp",
            "/tmp",
            "--bind",
            "/state/instances/r/work",
            "/state/instances/r/work",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--chdir",
            "/work",
            "--clearenv",
            "--setenv",
            "ARSERVICE_EXEC",
            "3",
            "--setenv",
            "ARSERVICE_INSTANCE",
            "ars-abcd1234-r",
            "--setenv",
            "PATH",
            SANDBOX_PATH,
            "--ro-bind",
            "/state/instances/r/env/exec-3.sh",
            "/.arservice/env",
            "--unshare-net",
            "--",
            "sh",
            "-c",
            ". /.arservice/env && exec \"$@\"",
            "sh",
            "sh",
            "-c",
            &format!("{ENTER_CWD}{BASH_OR_SH}"),
            "sh",
            "/work/sub",
            "echo hi",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(args, expected);
    }

    #[test]
    fn rootfs_mode_binds_the_overlay_as_root() {
        let env = env(Root::Rootfs {
            merged: "/state/instances/r/rootfs".into(),
        });
        let args = env.arguments(&request(), "0", None);
        let bind = args.iter().position(|arg| arg == "--bind").unwrap();
        assert_eq!(
            args[bind..bind + 3],
            ["--bind", "/state/instances/r/rootfs", "/"]
        );
        assert!(!args.iter().any(|arg| arg == "--ro-bind"));
        let dashes = args.iter().position(|arg| arg == "--").unwrap();
        assert_eq!(args[dashes + 1], "sh");
    }

    #[test]
    fn a_rootfs_cwd_never_leads_out_of_the_rootfs() {
        let base = std::env::temp_dir().join(format!("ars-bwrap-cwd-{}", std::process::id()));
        let root = base.join("rootfs");
        let outside = base.join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("run")).unwrap();
        create_inside(&root, "/testbed/sub").unwrap();
        assert!(root.join("testbed/sub").is_dir());
        for bad in ["/run/x", "/../outside/y", "testbed/../../z"] {
            assert!(
                matches!(create_inside(&root, bad), Err(EnvError::Invalid(_))),
                "{bad}"
            );
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!base.join("z").exists());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn export_lines_quote_every_value() {
        let env: BTreeMap<String, String> = [
            ("A".to_string(), "it's $HOME `x` \"q\"\nline".to_string()),
            ("B".to_string(), String::new()),
        ]
        .into();
        let lines = export_lines(&env);
        assert_eq!(
            lines,
            "export A='it'\\''s $HOME `x` \"q\"\nline'\nexport B=''\n"
        );
        let output = Command::new("sh")
            .arg("-c")
            .arg(format!("{lines}printf '%s|%s' \"$A\" \"$B\""))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "it's $HOME `x` \"q\"\nline|"
        );
    }

    #[test]
    fn overlay_options_refuse_separators() {
        assert!(overlay_safe(Path::new("/var/lib/rootfs")));
        assert!(!overlay_safe(Path::new("/var/lib/a,b")));
        assert!(!overlay_safe(Path::new("/var/lib/a:b")));
    }
}
