//! The `local` runner: every instance's sandbox lives on this machine.
//!
//! It only picks the environment for a spec; the environments own how a sandbox starts (or
//! starts as a fork). Its sweeps remove what an earlier life or a failed cleanup left: processes,
//! mounts, containers, and the images of forks that no instance runs.

use crate::env::spawn::{self, Marker, INSTANCE_MARKER};
use crate::env::Kind;
use crate::env::{self, EnvError, EnvSpec, Environment, InstanceContext, SANDBOX_PREFIX};
use crate::run_id::RunId;
use crate::runner::Runner;
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Resource keys that cost one unit per instance unless the request names them.
const IMPLICIT_UNITS: &[&str] = &["instances"];

/// Container CLIs whose leftovers are removed at start-up.
const CONTAINER_CLIS: [&str; 2] = ["docker", "podman"];

#[derive(Default)]
pub struct LocalRunner {
    /// The container CLIs this server has started or adopted containers with (`docker`,
    /// `podman`, or a config's `executable`): the health round looks for untracked
    /// containers through these only, so a server that never ran a container calls none.
    container_clis: Mutex<BTreeSet<String>>,
    /// Set once a fork committed a container to an image: from then on the health round
    /// also removes fork images that no instance runs any more.
    forked: AtomicBool,
}

impl LocalRunner {
    /// Remembers the CLI of a container instance, before it is started; never one a client
    /// chose (`EnvSpec::client_executable`): the server runs no client's program on its own.
    fn note_cli(&self, spec: &EnvSpec) {
        if matches!(spec.kind, Kind::Docker | Kind::Podman) && !spec.client_executable {
            self.container_clis.lock().insert(env::docker::cli_of(spec));
        }
    }
}

impl Runner for LocalRunner {
    fn name(&self) -> &'static str {
        "local"
    }

    fn implicit_units(&self) -> &'static [&'static str] {
        IMPLICIT_UNITS
    }

    /// Also checks the versions of the apptainer and enroot found on `PATH` (and logs what
    /// will not work with them), since it looks for them here anyway.
    fn sweep_leftovers(&self, server_id: &str, state_dir: &Path, adopted: &[RunId]) {
        let (prefix, kept) = sandbox_names(server_id, adopted);
        let killed = spawn::signal_marked(
            &[
                Marker::StartsWith(INSTANCE_MARKER, &prefix),
                Marker::NoneOf(INSTANCE_MARKER, &kept),
            ],
            libc::SIGKILL,
        );
        if killed > 0 {
            log::warn!("killed {killed} process(es) left by an earlier run");
        }
        sweep_all_but_processes(server_id, state_dir, adopted);
    }

    fn sweep_untracked(&self, server_id: &str, tracked: &dyn Fn() -> Vec<RunId>) {
        let prefix = format!("{SANDBOX_PREFIX}{server_id}-");
        let names = || {
            tracked()
                .into_iter()
                .map(|run_id| format!("{prefix}{run_id}"))
                .collect()
        };
        let clis: Vec<String> = self.container_clis.lock().iter().cloned().collect();
        for cli in &clis {
            match env::docker::remove_untracked(cli, server_id, &names) {
                Ok(0) => {}
                Ok(count) => {
                    log::warn!("removed {count} {cli} container(s) that no instance tracks")
                }
                // The engine does not answer: the next round tries again.
                Err(err) => log::debug!("cannot look for untracked {cli} containers: {err}"),
            }
            if self.forked.load(Ordering::Relaxed) {
                let run_ids = || tracked().into_iter().map(|id| id.to_string()).collect();
                match env::docker::remove_fork_images(cli, server_id, &run_ids) {
                    Ok(0) => {}
                    Ok(count) => log::info!("removed {count} {cli} fork image(s) no instance runs"),
                    Err(err) => log::debug!("cannot look for unused {cli} fork images: {err}"),
                }
            }
        }
    }

    fn start(
        &self,
        spec: &EnvSpec,
        ctx: &InstanceContext,
    ) -> Result<Box<dyn Environment>, EnvError> {
        self.note_cli(spec);
        if ctx.fork.as_ref().is_some_and(|seed| seed.image.is_some()) {
            self.forked.store(true, Ordering::Relaxed);
        }
        env::start(spec, ctx)
    }

    fn adopt(
        &self,
        spec: &EnvSpec,
        ctx: &InstanceContext,
        handle: &serde_json::Value,
    ) -> Result<Box<dyn Environment>, EnvError> {
        self.note_cli(spec);
        if handle.get("fork_image").is_some() {
            self.forked.store(true, Ordering::Relaxed);
        }
        env::adopt(spec, ctx, handle)
    }
}

/// The prefix of every sandbox name of `server_id`, and the names of `adopted`'s sandboxes.
fn sandbox_names(server_id: &str, adopted: &[RunId]) -> (String, Vec<String>) {
    let prefix = format!("{SANDBOX_PREFIX}{server_id}-");
    let kept = adopted
        .iter()
        .map(|run_id| format!("{prefix}{run_id}"))
        .collect();
    (prefix, kept)
}

/// What [`LocalRunner`]'s start-up sweep removes beside processes: apptainer instances, enroot
/// containers, the trash, bubblewrap mounts, docker and podman containers and fork images of
/// `server_id` (none of `adopted`'s). Alone, it is the sweep after a Slurm job's server died
/// (`arservice sweep`): the job's end takes the processes of the job, and a process outside
/// it that carries the instance's markers is not this server's to kill.
pub fn sweep_all_but_processes(server_id: &str, state_dir: &Path, adopted: &[RunId]) {
    let (prefix, kept) = sandbox_names(server_id, adopted);
    for cli in ["apptainer", "singularity"]
        .into_iter()
        .filter(|cli| env::on_path(cli))
    {
        env::apptainer::check_installed(cli);
        report(
            cli,
            "instance(s)",
            env::apptainer::reap_leftovers(cli, &prefix, &kept),
        );
    }
    if env::on_path("enroot") {
        env::enroot::check_installed("enroot", state_dir);
        report(
            "enroot",
            "container(s)",
            env::enroot::reap_leftovers("enroot", &prefix, state_dir),
        );
    }
    let emptied = env::local::empty_trash(&env::local::trash_dir(state_dir));
    if emptied > 0 {
        log::info!(
            "deleted {emptied} closed instance directories an earlier run left in the trash"
        );
    }
    let instances = state_dir.join("instances");
    let adopted_dirs: Vec<_> = adopted
        .iter()
        .map(|run_id| instances.join(run_id))
        .collect();
    for mount in env::bwrap::mounts_under(&instances)
        .into_iter()
        .filter(|mount| !adopted_dirs.iter().any(|dir| mount.starts_with(dir)))
    {
        match env::bwrap::unmount(&mount) {
            Ok(()) => log::warn!("unmounted {} left by an earlier run", mount.display()),
            Err(err) => log::warn!("cannot unmount {}: {err}", mount.display()),
        }
    }
    let adopted_ids: Vec<String> = adopted.iter().map(|run_id| run_id.to_string()).collect();
    for cli in CONTAINER_CLIS {
        match env::docker::remove_untracked(cli, server_id, &|| kept.clone()) {
            Ok(0) => {}
            Ok(count) => {
                log::warn!("removed {count} {cli} container(s) left by an earlier run")
            }
            Err(EnvError::Io { .. }) => {
                log::debug!("{cli} is not installed: nothing to sweep");
                continue;
            }
            Err(err) => log::warn!("cannot look for leftover {cli} containers: {err}"),
        }
        report(
            cli,
            "fork image(s)",
            env::docker::remove_fork_images(cli, server_id, &|| adopted_ids.clone()),
        );
    }
}

/// Logs the outcome of one start-up sweep.
fn report(cli: &str, what: &str, outcome: Result<usize, EnvError>) {
    match outcome {
        Ok(0) => {}
        Ok(count) => log::warn!("removed {count} {cli} {what} left by an earlier run"),
        Err(EnvError::Io { .. }) => log::debug!("{cli} is not installed: nothing to sweep"),
        Err(err) => log::warn!("cannot look for leftover {cli} {what}: {err}"),
    }
}
