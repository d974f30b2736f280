//! Whether a job still runs: one shared `squeue` view of this server's jobs ([`JobWatch`]), a
//! TCP probe of the job's node ([`NodeProbe`]), why a job ended, and whose a job is.

use super::settings::*;
use crate::env::{run_tool, EnvError};
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};

/// The queue as this server sees it: one `squeue` call answers the health of every job.
#[derive(Default)]
pub struct JobWatch {
    pub(super) inner: Mutex<WatchState>,
}

#[derive(Default)]
pub(super) struct WatchState {
    pub(super) tracked: BTreeSet<String>,
    pub(super) states: HashMap<String, String>,
    pub(super) refreshed: Option<Instant>,
}

impl JobWatch {
    pub(super) fn track(&self, job_id: &str) {
        let mut inner = self.inner.lock();
        inner.tracked.insert(job_id.to_string());
        inner.refreshed = None;
    }

    pub(super) fn untrack(&self, job_id: &str) {
        self.inner.lock().tracked.remove(job_id);
    }

    /// Asks `squeue` again when the view is older than [`WATCH_MAX_AGE`]; `None` when that
    /// call failed.
    pub(super) fn refresh(&self) -> Option<()> {
        let stale = self
            .inner
            .lock()
            .refreshed
            .is_none_or(|at| at.elapsed() > WATCH_MAX_AGE);
        if stale {
            // The lock is not held across the call; a concurrent refresh is harmless.
            let mut squeue = Command::new("squeue");
            squeue.args(["--me", "--noheader", "--format=%i|%T"]);
            let listing = run_tool("squeue", squeue, SLURM_CALL_TIMEOUT).ok()?;
            let states: HashMap<String, String> = listing
                .lines()
                .filter_map(|line| line.split_once('|'))
                .map(|(id, state)| (id.trim().to_string(), state.trim().to_string()))
                .collect();
            let mut inner = self.inner.lock();
            inner.states = states;
            inner.refreshed = Some(Instant::now());
        }
        Some(())
    }

    /// `Some(reason)` once `job_id` is no longer running.
    pub(super) fn ended(&self, job_id: &str) -> Option<String> {
        self.refresh()?;
        let running = {
            let inner = self.inner.lock();
            if !inner.tracked.contains(job_id) {
                return None;
            }
            inner
                .states
                .get(job_id)
                .is_some_and(|state| state == "RUNNING")
        };
        (!running).then(|| end_reason(job_id))
    }
}

/// How long one probe connection may take before it counts as unanswered.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a node must stay silent before its instances are dead: one unanswered probe is
/// not enough (a busy node, a lost packet); probes unanswered for this long are.
pub(super) const PROBE_GRACE: Duration = Duration::from_secs(2);

/// A TCP connection to the job's listener on its node (the job's server on the agent path, the
/// hold guard's probe port on the CLI path), made at each health round. Slurm declares a node
/// down only after `SlurmdTimeout` (300 s by default, 26 s with 10 s here); a node whose
/// processes are gone, or that no longer answers on the network, fails this at once.
pub(super) struct NodeProbe {
    /// `host:port`, as the job announced it.
    pub(super) address: String,
    pub(super) target: std::net::SocketAddr,
    /// Since when the probes have gone unanswered.
    pub(super) failing: Mutex<Option<Instant>>,
}

impl NodeProbe {
    /// `None` when the address cannot be resolved (the node is then watched through Slurm
    /// alone, as before).
    pub(super) fn new(address: &str) -> Option<NodeProbe> {
        use std::net::ToSocketAddrs;
        let target = match address.to_socket_addrs() {
            Ok(mut targets) => targets.next(),
            Err(err) => {
                log::warn!("cannot resolve {address}, the job's node is watched through Slurm alone: {err}");
                None
            }
        }?;
        Some(NodeProbe {
            address: address.to_string(),
            target,
            failing: Mutex::new(None),
        })
    }

    /// How long the node has not answered, and the last error, once that is at least
    /// [`PROBE_GRACE`]; `None` while it answers (or has only just stopped).
    pub(super) fn silent_for(&self) -> Option<(Duration, String)> {
        match std::net::TcpStream::connect_timeout(&self.target, PROBE_TIMEOUT) {
            Ok(_) => {
                *self.failing.lock() = None;
                None
            }
            Err(err) => {
                let silent = self
                    .failing
                    .lock()
                    .get_or_insert_with(Instant::now)
                    .elapsed();
                (silent >= PROBE_GRACE).then(|| (silent, format!("{}: {err}", self.address)))
            }
        }
    }
}

/// The probe of an adopted job: its server's URL on the agent path, the address the journal
/// kept on the CLI path (none in a journal from before hold guards listened).
pub(super) fn adopted_probe(handle: &Value) -> Option<NodeProbe> {
    if let Some(url) = handle["url"].as_str() {
        return NodeProbe::new(url.trim_start_matches("http://"));
    }
    NodeProbe::new(handle["probe"].as_str()?)
}

/// How long the end of a job may stay `COMPLETING` before that is the state its end reports.
pub(super) const END_STATE_WAIT: Duration = Duration::from_secs(5);

/// `job 1234 ended: TIMEOUT` (with Slurm's reason when it gives one). A job still
/// `COMPLETING` (its processes being cleaned up) gets [`END_STATE_WAIT`] to say how it ended.
pub(super) fn end_reason(job_id: &str) -> String {
    let deadline = Instant::now() + END_STATE_WAIT;
    loop {
        let mut show = Command::new("scontrol");
        show.args(["show", "job", "--oneliner", job_id]);
        let Ok(shown) = run_tool("scontrol show job", show, SLURM_CALL_TIMEOUT) else {
            return format!("job {job_id} ended (Slurm no longer knows it)");
        };
        let field = |name: &str| {
            shown
                .split_whitespace()
                .find_map(|pair| pair.strip_prefix(name))
                .map(String::from)
        };
        let state = field("JobState=").unwrap_or_else(|| "UNKNOWN".into());
        if state == "COMPLETING" && Instant::now() < deadline {
            std::thread::sleep(QUEUE_POLL);
            continue;
        }
        return match field("Reason=").filter(|reason| reason != "None") {
            Some(reason) => format!("job {job_id} ended: {state} ({reason})"),
            None => format!("job {job_id} ended: {state}"),
        };
    }
}

/// The state of job `job_id` (empty once it left the queue) and its node list if it is a job
/// of this user named `name`; an error (nothing to adopt, nothing to cancel) when it is another user's job, has
/// another name, or the id is not a job id.
pub(super) fn owned_job_state(job_id: &str, name: &str) -> Result<(String, String), EnvError> {
    if job_id.is_empty() || !job_id.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(EnvError::Invalid(format!(
            "the journal's job id '{}' is not a job id",
            job_id.escape_debug()
        )));
    }
    let mut squeue = Command::new("squeue");
    squeue.args(["--me", "--noheader", "--format=%T|%j|%N", "--jobs", job_id]);
    let listing = match run_tool("squeue", squeue, SLURM_CALL_TIMEOUT) {
        Ok(listing) => listing,
        // squeue refuses a job id it has forgotten: the job is gone.
        Err(EnvError::Tool { detail, .. }) if detail.contains("Invalid job id") => {
            return Ok((String::new(), String::new()))
        }
        Err(err) => return Err(err),
    };
    let Some((state, rest)) = listing.trim().split_once('|') else {
        return Err(EnvError::Invalid(format!(
            "job {job_id} is not a job of this server's user: the journal's record is not trusted"
        )));
    };
    // The node list last: a job name cannot hold this one's `|` (ours are checked names).
    let (job_name, node) = rest.rsplit_once('|').unwrap_or((rest, ""));
    if job_name.trim() != name {
        return Err(EnvError::Invalid(format!(
            "job {job_id} is named '{}', not {name}: it is not this instance's job",
            job_name.trim()
        )));
    }
    Ok((state.trim().to_string(), node.trim().to_string()))
}
