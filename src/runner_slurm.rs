//! The `slurm` runner: every instance a Slurm job that runs its environment on a compute node.
//!
//! Not built yet (issue 4): the command line accepts `--runner slurm`, and the server refuses
//! to start with a clear message instead of pretending.

/// Why `--runner slurm` cannot start in this build.
pub const NOT_BUILT: &str =
    "the slurm runner is not built yet in this arservice; use --runner local";
