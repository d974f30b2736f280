//! The Slurm runner's settings from the command line, and the bounds and intervals of its
//! calls to Slurm and to a job's server.

use std::path::PathBuf;
use std::time::Duration;

/// Resource keys that cost one unit per instance unless the request names them.
pub(super) const IMPLICIT_UNITS: &[&str] = &["instances", "jobs"];

/// Bound on one `sbatch`, `squeue`, `scancel` or `scontrol` call.
pub(super) const SLURM_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a running job's server gets to announce itself.
pub(super) const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a cancelled job gets to leave the queue.
pub(super) const CANCEL_TIMEOUT: Duration = Duration::from_secs(60);

/// How often start and close look at the queue.
pub(super) const QUEUE_POLL: Duration = Duration::from_millis(200);

/// How old the shared view of the queue may get before a health check refreshes it.
pub(super) const WATCH_MAX_AGE: Duration = Duration::from_secs(2);

/// Bound on starting the environment on the node (an image pull may be in it).
pub(super) const NODE_START_TIMEOUT: Duration = Duration::from_secs(3600);

/// Bound on the node's close of the instance.
pub(super) const NODE_CLOSE_TIMEOUT: Duration = Duration::from_secs(300);

/// Added to a command's timeout for the request that carries it.
pub(super) const EXEC_MARGIN: Duration = Duration::from_secs(60);

/// Request threads of a job's server.
pub(super) const NODE_WORKERS: usize = 16;

/// The largest answer read from the job's server for anything but a command's result.
pub(super) const NODE_ANSWER_BYTES: u64 = 1024 * 1024;

/// Variables of the job that commands see (through `forward_env` on the node).
pub(super) const JOB_VARIABLES: [&str; 4] = [
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODEID",
    "SLURM_CLUSTER_NAME",
];

/// Server-wide Slurm options from the command line.
#[derive(Clone, Debug, Default)]
pub struct SlurmSettings {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub time: Option<String>,
    pub constraint: Option<String>,
    pub sbatch_args: Vec<String>,
    /// A job still pending after this is cancelled and the start fails.
    pub queue_timeout: Duration,
    /// The `arservice` binary as the compute nodes reach it.
    pub node_binary: PathBuf,
    pub max_output_bytes: usize,
    /// The job's server's `--pids-limit` (0: none).
    pub pids_limit: u64,
}
