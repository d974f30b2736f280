//! `POST /fork_instance`: a new instance with a running one's config and resources, whose
//! filesystem is a copy of the source's at that moment (its processes are not copied; the
//! source keeps running).
//!
//! The same steps as a start, not a copy of them: take the new `run_id` (a `Starting` slot)
//! → reserve its resources in the ledger (`wait` as a start's) → the source's environment
//! copies its state (`Environment::fork_into`, no lock held) → the runner starts the new
//! instance from that seed → keep (journal, table). A fork that fails on the way drops its
//! slot and reservation as a start does, and removes what the copy made
//! (`ForkSeed::discard`): no directory, image or journal record is left. Pools are not used.
//!
//! Under the Slurm runner the copy goes into the new job's directory (`seed/`), and the job's
//! own server, started with `--fork-seed`, takes it for its instance ([`Service::seeded`]).
//! What docker, podman and enroot keep on the source job's node, that job's server exports
//! first (`POST /export_instance`, [`Service::export`]) into its state dir on the shared file
//! system, whence the login server renames it into the new job's `seed/`.

use super::instance::{Instance, Refused, State};
use super::{epoch_now, Service, StartingSlot};
use crate::api::ForkRequest;
use crate::env::fork::ForkSeed;
use crate::env::{InstanceContext, Kind};
use crate::error::Error;
use crate::ledger::Reservation;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

impl Service {
    /// Take → reserve → copy → start (no lock held) → keep; counted in `forks`, or in
    /// `forks_failed` when a step after the reservation failed for the infrastructure.
    pub fn fork(&self, request: ForkRequest) -> Result<(), Error> {
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let source = self.live(&request.run_id)?;
        Self::forkable(&source)?;
        let run_id = &request.new_run_id;
        let mut slot = self.take(run_id)?;
        let cost = self
            .ledger
            .cost(&source.spec.resources, self.runner.implicit_units());
        let reservation = self.reserve(cost, request.wait)?;
        let forked = self.copy_and_start(&request, &source, reservation, &mut slot);
        let counter = match &forked {
            Ok(()) => &self.metrics.forks,
            Err(error) if error.infra() => &self.metrics.forks_failed,
            Err(_) => return forked,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        forked
    }

    /// The steps of a fork once its `run_id` is taken and its resources reserved.
    fn copy_and_start(
        &self,
        request: &ForkRequest,
        source: &Instance,
        reservation: Reservation,
        slot: &mut StartingSlot,
    ) -> Result<(), Error> {
        let run_id = &request.new_run_id;
        // What the copy takes is the source's activity: its idle timeout waits.
        source.touch();
        let mut context = self.context(run_id);
        let seed = source.env.fork_into(&context).map_err(|source_error| {
            ForkSeed::default().discard(&context);
            let error = Error::Env {
                action: "fork",
                run_id: request.run_id.to_string(),
                source: source_error,
            };
            self.count_infra(run_id, &error);
            error
        })?;
        context.fork = Some(seed.clone());
        let env = self
            .start_env(run_id, &source.spec, &context)
            .inspect_err(|_| seed.discard(&context))?;
        let instance = Instance::running(
            run_id.clone(),
            source.container_name.clone(),
            source.spec.clone(),
            (epoch_now(), Instant::now()),
            env,
            reservation,
            false,
        )
        .forked_from(request.run_id.clone());
        self.keep(Arc::new(instance), slot)
    }

    /// `POST /export_instance`, on a Slurm job's server only (`--fork-seed`): the seed of a
    /// fork of `run_id` (`Environment::fork_into`, no lock held, nothing started here), as
    /// files in `<state-dir>/exports/<new_run_id>/` (`env::fork::export_seed`: the committed
    /// image saved and removed from this node, or enroot's copied rootfs), which the login
    /// server takes for the fork's job. On failure nothing is left.
    pub fn export(&self, request: ForkRequest) -> Result<(), Error> {
        if self.settings.fork_seed.is_none() {
            return Err(Error::BadRequest(
                "/export_instance is answered by the server of a Slurm job only (--fork-seed): \
                 use /fork_instance"
                    .into(),
            ));
        }
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let source = self.live(&request.run_id)?;
        Self::forkable(&source)?;
        source.touch();
        // The copy is named apart from this server's own fork images and containers
        // (`ars-fork-<server_id>-export`), which its sweeps would take for leftovers.
        let mut context = self.context(&request.new_run_id);
        context.server_id = format!("{}-export", self.settings.server_id);
        context.root = self
            .settings
            .state_dir
            .join("exports")
            .join(format!("{}.made", request.new_run_id));
        let into = self
            .settings
            .state_dir
            .join("exports")
            .join(&request.new_run_id);
        let error = |source| Error::Env {
            action: "export",
            run_id: request.run_id.to_string(),
            source,
        };
        let seed = source.env.fork_into(&context).map_err(|err| {
            ForkSeed::default().discard(&context);
            error(err)
        })?;
        crate::env::fork::export_seed(&seed, &context.root, &into, self.settings.fork_timeout)
            .map_err(error)
    }

    /// Inside a Slurm job started for a fork (`--fork-seed`): the first start takes the copy
    /// of the source's files, renaming the seed directory into the instance's, and starts from
    /// it; an exported seed is imported (`env::fork::import_seed`: its image loaded, or its
    /// rootfs moved where enroot keeps this instance's container). Once taken, later starts
    /// get the context as it is (as everywhere without a seed). No directory there means no
    /// fork (every job's server is given `--fork-seed`; only a fork's job has one). A seed
    /// that cannot be taken (on another file system than the state dir, the instance's
    /// directory already there) fails the start and stays untaken: a start without the fork's
    /// files would look like a fork and hold none of them.
    pub(super) fn seeded(
        &self,
        mut context: InstanceContext,
        spec: &crate::env::EnvSpec,
    ) -> Result<InstanceContext, Error> {
        let mut untaken = self.fork_seed.lock();
        let Some(seed) = untaken.clone().filter(|seed| seed.is_dir()) else {
            return Ok(context);
        };
        let io = |source| Error::Env {
            action: "start",
            run_id: context.run_id.to_string(),
            source: crate::env::EnvError::Io {
                context: format!("cannot take the fork's files from {}", seed.display()),
                source,
            },
        };
        if let Some(parent) = context.root.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        // A rename, never a copy: one that would cross file systems (EXDEV) fails, and an
        // instance directory already there is not replaced.
        if context.root.symlink_metadata().is_ok() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} already exists", context.root.display()),
            )));
        }
        std::fs::rename(&seed, &context.root).map_err(io)?;
        *untaken = None;
        drop(untaken);
        let state_dir = context.state_dir.clone();
        let container = context.sandbox_name();
        let rootfs_to = || {
            crate::env::enroot::enroot_paths(&state_dir)
                .into_iter()
                .find(|(name, _)| name == "ENROOT_DATA_PATH")
                .map(|(_, path)| std::path::PathBuf::from(path).join(&container))
                .unwrap_or_default()
        };
        let engine = matches!(spec.kind, Kind::Docker | Kind::Podman)
            .then(|| crate::env::docker::cli_of(spec));
        let timeout = self.settings.fork_timeout;
        match crate::env::fork::import_seed(&context, engine.as_deref(), timeout, &rootfs_to) {
            Ok(seed) => context.fork = Some(seed),
            Err(source) => {
                let _ = crate::env::local::remove_tree(&context.root);
                return Err(Error::Env {
                    action: "start",
                    run_id: context.run_id.to_string(),
                    source,
                });
            }
        }
        Ok(context)
    }

    /// A source must run: a dead or reaped one answers 410 and a closing one 409, as a
    /// command to it would.
    fn forkable(source: &Instance) -> Result<(), Error> {
        let run_id = source.run_id.to_string();
        match source.runnable() {
            Ok(()) => Ok(()),
            Err(Refused::Closing) => Err(Error::RunIdInUse {
                run_id,
                state: State::Closing.name(),
            }),
            Err(Refused::Dead(reason)) => Err(Error::Gone { run_id, reason }),
            Err(Refused::Reaped(reason)) => Err(Error::Reaped { run_id, reason }),
        }
    }
}
