//! The `local` environment: commands run on this machine, as the server's user, in a fresh
//! working directory of the instance's own under the state dir.
//!
//! No isolation beyond that directory and a clean environment: it is for trying the API and
//! for trusted workloads. Each command runs `<shell> <cmd>` (default `sh -c`, as the original)
//! through the spawn helper; close kills every process the instance's commands started and
//! removes its directory: moved into the state dir's `trash/` on the request's path (one
//! rename), deleted there by a background thread ([`discard_tree`]), since deleting even two
//! empty directories cost several times starting an instance on this project's machines.
//! A fork copies the working directory into the new instance's before it starts.

use super::files;
use super::spawn::{self, Marker, ProcessGroups, INSTANCE_MARKER};
use super::{EnvError, EnvSpec, Environment, ExecRequest, ExecResult, InstanceContext};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The shell that runs a command string when the config names none.
const DEFAULT_SHELL: [&str; 2] = ["sh", "-c"];

/// `PATH` for commands when the server itself has none.
const FALLBACK_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

/// One `local` instance.
pub struct LocalEnv {
    /// The instance's own directory, removed on close.
    root: PathBuf,
    /// Where commands run unless they say otherwise.
    workdir: PathBuf,
    shell: Vec<String>,
    /// `shell[0]` found on the instance's `PATH` once, at start: an absolute program spares
    /// a `PATH` walk per command (the spawn helper resolves a bare name on each spawn).
    program: PathBuf,
    /// The whole environment of every command (nothing else of the server's leaks in).
    env: BTreeMap<String, String>,
    groups: ProcessGroups,
    /// Where close moves `root` to before it is deleted (see [`discard_tree`]).
    trash: PathBuf,
}

impl LocalEnv {
    /// Creates the instance's directory; the config's `cwd`, if any, must already exist.
    pub fn start(spec: &EnvSpec, ctx: &InstanceContext) -> Result<LocalEnv, EnvError> {
        let workdir = ctx.root.join("work");
        super::instance_dir(&ctx.root)?;
        std::fs::create_dir_all(&workdir).map_err(|source| EnvError::Io {
            context: format!("cannot create {}", workdir.display()),
            source,
        })?;
        let env_workdir = match &spec.cwd {
            Some(cwd) => {
                let cwd = resolve(&workdir, cwd);
                if !cwd.is_dir() {
                    let _ = std::fs::remove_dir_all(&ctx.root);
                    return Err(EnvError::Invalid(format!(
                        "cwd '{}' is not a directory on this machine",
                        cwd.display()
                    )));
                }
                cwd
            }
            None => workdir.clone(),
        };
        let mut env = BTreeMap::new();
        env.insert(
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_else(|_| FALLBACK_PATH.to_string()),
        );
        env.insert("HOME".to_string(), workdir.display().to_string());
        for name in &spec.forward_env {
            if let Ok(value) = std::env::var(name) {
                env.insert(name.clone(), value);
            }
        }
        env.extend(spec.env.clone());
        // After the config's: the marker (and the run id) are ours to set.
        env.insert("ARSERVICE_RUN_ID".to_string(), ctx.run_id.to_string());
        env.insert(INSTANCE_MARKER.to_string(), ctx.sandbox_name());
        let shell = spec
            .shell
            .clone()
            .unwrap_or_else(|| DEFAULT_SHELL.map(String::from).to_vec());
        let program = find_program(&shell[0], env.get("PATH").map(String::as_str));
        if !program.is_file() {
            let _ = std::fs::remove_dir_all(&ctx.root);
            return Err(EnvError::Invalid(format!(
                "shell '{}' is not a program on this machine's PATH",
                shell[0]
            )));
        }
        Ok(LocalEnv {
            program,
            root: ctx.root.clone(),
            workdir: env_workdir,
            shell,
            env,
            groups: ProcessGroups::default(),
            trash: trash_dir(&ctx.state_dir),
        })
    }
}

impl LocalEnv {
    /// Takes over an instance of an earlier life: its directory is all there is of it. The
    /// commands that were running when that life ended lost their clients, so they are
    /// killed (by the instance's marker) rather than left running past their timeouts.
    pub fn adopt(spec: &EnvSpec, ctx: &InstanceContext) -> Result<LocalEnv, EnvError> {
        if !ctx.root.join("work").is_dir() {
            return Err(EnvError::Gone(format!(
                "its directory {} is gone",
                ctx.root.display()
            )));
        }
        spawn::signal_marked(
            &[Marker::Is(INSTANCE_MARKER, &ctx.sandbox_name())],
            libc::SIGKILL,
        );
        LocalEnv::start(spec, ctx)
    }
}

/// `name` as found on `path` (a name with a `/` is used as it is); the bare name when not
/// found, so that the spawn reports the missing program.
pub fn find_program(name: &str, path: Option<&str>) -> PathBuf {
    if name.contains('/') {
        return PathBuf::from(name);
    }
    path.unwrap_or(FALLBACK_PATH)
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A relative `cwd` is taken from the instance's working directory.
fn resolve(base: &Path, cwd: &str) -> PathBuf {
    base.join(cwd)
}

impl Environment for LocalEnv {
    /// A copy of the instance's working directory (its files are all there is of it).
    fn fork_into(&self, dst: &InstanceContext) -> Result<super::fork::ForkSeed, EnvError> {
        super::fork::copy_dirs(
            &self.root,
            &dst.root,
            &super::fork::LOCAL_DIRS,
            dst.fork_timeout,
        )?;
        Ok(super::fork::ForkSeed::default())
    }

    /// On the host, as the server's user, as commands run: a relative path from the
    /// instance's working directory.
    fn put_file(
        &self,
        upload: &files::Upload,
        body: &mut dyn std::io::Read,
    ) -> Result<u64, EnvError> {
        let upload = files::Upload {
            path: files::resolve(&self.workdir.display().to_string(), &upload.path)?,
            ..upload.clone()
        };
        Ok(files::write(&upload, body)?)
    }

    fn get_file(&self, path: &str) -> Result<files::Download, EnvError> {
        let path = files::resolve(&self.workdir.display().to_string(), path)?;
        Ok(files::read(&path)?)
    }

    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        let cwd = match &request.cwd {
            Some(cwd) => resolve(&self.workdir, cwd),
            None => self.workdir.clone(),
        };
        // A command that sets its own PATH finds the shell on it, as a shell would.
        let mut command = if request.env.contains_key("PATH") {
            Command::new(&self.shell[0])
        } else {
            Command::new(&self.program)
        };
        command
            .args(&self.shell[1..])
            .arg(&request.cmd)
            .current_dir(&cwd)
            .env_clear()
            .envs(&self.env)
            .envs(&request.env);
        let stdin = super::stdin_file(request)?;
        spawn::run(
            command,
            stdin.as_ref(),
            request.limits,
            &self.groups,
            request.sink.as_ref(),
        )
        .map_err(|source| {
            // A missing `cwd` fails the spawn (its `chdir`): looked at only then, not before
            // every command.
            if !cwd.is_dir() {
                EnvError::Invalid(super::not_a_directory(&cwd.display().to_string()))
            } else if source.kind() == std::io::ErrorKind::NotFound {
                // Only a command's own PATH can hide the shell that start found.
                EnvError::Invalid(format!(
                    "shell '{}' is not on the PATH this command sets",
                    self.shell[0]
                ))
            } else {
                EnvError::Io {
                    context: format!("cannot run shell '{}'", self.shell[0]),
                    source,
                }
            }
        })
    }

    fn close(&self) -> Result<(), EnvError> {
        // Everything its commands started, `setsid` included: they stay in this server's
        // tree (it is their subreaper) and carry the instance's spawn marker.
        self.groups.kill_all();
        discard_tree(&self.root, &self.trash)
    }

    fn handle(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({}))
    }
}

/// The directory under `state_dir` where closed instances' directories wait to be deleted.
pub fn trash_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("trash")
}

/// Tells apart the names of the trees moved to the trash by this process.
static NEXT_TRASH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The thread that deletes what [`discard_tree`] moved to the trash, started at the first.
static TRASH: std::sync::OnceLock<crossbeam_channel::Sender<PathBuf>> = std::sync::OnceLock::new();

/// Takes `root` away at once and deletes it in the background: `root` is renamed into `trash`
/// (same file system: both are under the state dir) and a background thread removes it as
/// [`remove_tree`] does. When it cannot be moved (no trash directory and none can be made,
/// another file system), it is removed here. What the thread had not deleted when the process
/// ended is deleted at the next start ([`empty_trash`]).
pub fn discard_tree(root: &Path, trash: &Path) -> Result<(), EnvError> {
    let name = format!(
        "{}-{}",
        std::process::id(),
        NEXT_TRASH.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let target = trash.join(name);
    let mut moved = std::fs::rename(root, &target);
    if matches!(&moved, Err(err) if err.kind() == std::io::ErrorKind::NotFound) {
        if !root.exists() {
            return Ok(());
        }
        // The first close since the state dir was made: no trash directory yet.
        moved = crate::state_dir::private_dir(trash).and_then(|()| std::fs::rename(root, &target));
    }
    if moved.is_err() {
        return remove_tree(root);
    }
    let sender = TRASH.get_or_init(|| {
        let (sender, receiver) = crossbeam_channel::unbounded::<PathBuf>();
        let started = std::thread::Builder::new()
            .name("trash".into())
            .spawn(move || {
                for tree in receiver {
                    if let Err(err) = remove_tree(&tree) {
                        log::warn!("{err}");
                    }
                }
            });
        if let Err(err) = started {
            log::warn!("cannot start the thread that empties the trash: {err}");
        }
        sender
    });
    if let Err(crossbeam_channel::SendError(tree)) = sender.send(target) {
        // No thread to take it: delete it here.
        return remove_tree(&tree);
    }
    Ok(())
}

/// Deletes what an earlier life of the server left in `trash` (at start-up, before any close).
pub fn empty_trash(trash: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(trash) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| remove_tree(&entry.path()).is_ok())
        .count()
}

/// Removes a directory tree, also when a command left parts of it read-only; a link in it is
/// removed, never followed.
pub fn remove_tree(root: &Path) -> Result<(), EnvError> {
    match std::fs::remove_dir_all(root) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            // A command may have made directories read-only: give them back, then retry.
            crate::state_dir::make_owner_writable(root);
            std::fs::remove_dir_all(root).map_err(|source| EnvError::Io {
                context: format!("cannot remove {}", root.display()),
                source,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_discarded_tree_is_gone_at_once_and_deleted_in_the_background() {
        let state = std::env::temp_dir().join(format!("ars-trash-{}", std::process::id()));
        let root = state.join("instances").join("one");
        let locked = root.join("work").join("locked");
        std::fs::create_dir_all(&locked).unwrap();
        std::fs::write(locked.join("file"), "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).unwrap();
        let trash = trash_dir(&state);
        discard_tree(&root, &trash).unwrap();
        assert!(
            !root.exists(),
            "the instance directory is gone when close answers"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_dir(&trash).unwrap().next().is_some() {
            assert!(Instant::now() < deadline, "the trash was not emptied");
            std::thread::sleep(Duration::from_millis(10));
        }
        // A tree that is not there is fine; one left by an earlier life goes at start-up.
        discard_tree(&root, &trash).unwrap();
        std::fs::create_dir_all(trash.join("1-1").join("work")).unwrap();
        assert_eq!(empty_trash(&trash), 1);
        assert!(std::fs::read_dir(&trash).unwrap().next().is_none());
        std::fs::remove_dir_all(&state).unwrap();
    }
}
