//! The [`Runner`] trait: where instances live (on this machine, or inside Slurm jobs).
//!
//! The service asks a runner to start and adopt sandboxes and to sweep away those no instance
//! tracks; `runner_local.rs` and `runner_slurm.rs` implement it. Below the service, above the
//! environments.

use crate::env::{EnvError, EnvSpec, Environment, InstanceContext};
use crate::run_id::RunId;
use std::path::Path;

/// Where instances live: on this machine, or inside Slurm jobs.
pub trait Runner: Send + Sync {
    /// `local` or `slurm`.
    fn name(&self) -> &'static str;

    /// Resource keys that cost one unit unless the request names them.
    fn implicit_units(&self) -> &'static [&'static str];

    /// At start-up, sweeps away what an earlier life of this server (same `server_id`) left
    /// outside the state dir, but the instances just adopted (by `run_id`): nothing else is
    /// tracked at start-up, so the rest is stale.
    fn sweep_leftovers(&self, server_id: &str, state_dir: &Path, adopted: &[RunId]);

    /// Sweeps away sandboxes of this server that no instance in the table tracks (`tracked`
    /// lists their `run_id`s, asked after the sandboxes are listed): a start or close whose
    /// cleanup failed while the engine was down leaves one. Called every health round; it
    /// must cost nothing where no such sandbox can be.
    fn sweep_untracked(&self, _server_id: &str, _tracked: &dyn Fn() -> Vec<RunId>) {}

    /// At shutdown: ends at once the starts still under way of these sandboxes (by name, of
    /// server `server_id`) where a start can wait long, so that each fails now instead of
    /// being waited for (a Slurm job still in the queue is cancelled). Called with no lock
    /// held, again while starts remain (one may not have reached its runner yet). A sandbox
    /// not started yet, or already gone, is not an error.
    fn cancel_starts(&self, _server_id: &str, _sandboxes: &[RunId]) {}

    /// Before a health round asks sandboxes one by one (some under a lock a start waits for:
    /// a pool's): makes what they share fresh, so that their checks are cheap (Slurm's one
    /// `squeue` view of every job).
    fn refresh_health(&self) {}

    /// Takes over a sandbox an earlier life started, from its journal `handle` (the
    /// environment's own, opaque to the service); called with no lock held. `Err`: it is
    /// gone or cannot be adopted, and the start-up sweep removes it.
    fn adopt(
        &self,
        spec: &EnvSpec,
        ctx: &InstanceContext,
        handle: &serde_json::Value,
    ) -> Result<Box<dyn Environment>, EnvError>;

    /// Brings up the sandbox `spec` describes; called with no lock held.
    fn start(
        &self,
        spec: &EnvSpec,
        ctx: &InstanceContext,
    ) -> Result<Box<dyn Environment>, EnvError>;
}
