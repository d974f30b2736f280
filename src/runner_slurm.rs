//! The `slurm` runner: every instance is a Slurm job, so the cluster's scheduler spreads the
//! sandboxes over its nodes while this server stays on a login node.
//!
//! The job runs this same `arservice` binary on its node (`--runner local`, bound to the node's
//! network with a random per-instance token), and that server brings up the instance's
//! environment there: any `container_type` works inside a job, through the same code as on
//! this machine. The job's server announces its host and port in a file under the instance's
//! state directory; this side then forwards start, execute and close to it. Commands therefore
//! cost one HTTP request instead of an `srun` step and a slurmctld round trip each, timeouts are
//! enforced (and killed) on the node by the same spawn helper, and `scancel` makes the job's
//! server close its instance before the job ends.
//!
//! On the CLI path (`exec_mode: "cli"`) every command is an `srun` step run by `arservice
//! guard` on the node (see `crate::guard`): a child subreaper that kills everything the
//! command started, within the step, before Slurm's own step kill ever has to.
//!
//! Owns the `sbatch`/`squeue`/`scancel`/`scontrol` command lines and the job's lifecycle; it
//! never blocks the instance table (every call here runs with no lock held).

use crate::env::config::SlurmOptions;
use crate::env::spawn::{self, ExecResult, Limits, ProcessGroups};
use crate::env::wire::answer_limit;
use crate::env::{
    run_tool, EnvError, EnvSpec, Environment, ExecRequest, InstanceContext, SANDBOX_PREFIX,
};
use crate::run_id::RunId;
use crate::runner::Runner;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Resource keys that cost one unit per instance unless the request names them.
const IMPLICIT_UNITS: &[&str] = &["instances", "jobs"];

/// Bound on one `sbatch`, `squeue`, `scancel` or `scontrol` call.
const SLURM_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a running job's server gets to announce itself.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a cancelled job gets to leave the queue.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(60);

/// How often start and close look at the queue.
const QUEUE_POLL: Duration = Duration::from_millis(200);

/// How old the shared view of the queue may get before a health check refreshes it.
const WATCH_MAX_AGE: Duration = Duration::from_secs(2);

/// Bound on starting the environment on the node (an image pull may be in it).
const NODE_START_TIMEOUT: Duration = Duration::from_secs(3600);

/// Bound on the node's close of the instance.
const NODE_CLOSE_TIMEOUT: Duration = Duration::from_secs(300);

/// Added to a command's timeout for the request that carries it.
const EXEC_MARGIN: Duration = Duration::from_secs(60);

/// Request threads of a job's server.
const NODE_WORKERS: usize = 16;

/// The largest answer read from the job's server for anything but a command's result.
const NODE_ANSWER_BYTES: u64 = 1024 * 1024;

/// Variables of the job that commands see (through `forward_env` on the node).
const JOB_VARIABLES: [&str; 4] = [
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

/// The arguments of `sbatch` for one instance (after the program name).
pub fn sbatch_arguments(
    spec: &EnvSpec,
    ctx: &InstanceContext,
    settings: &SlurmSettings,
    options: &SlurmOptions,
    script: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--parsable".into(),
        format!("--job-name={}", ctx.sandbox_name()),
        format!(
            "--comment=arservice server {} run {}",
            ctx.server_id, ctx.run_id
        ),
        format!("--output={}", ctx.root.join("job.out").display()),
        format!("--chdir={}", ctx.root.display()),
        // A sandbox dies with its node: a job requeued after a node failure would start an
        // empty one elsewhere, under the dead instance's name and files.
        "--no-requeue".into(),
    ];
    if let Some(cpus) = spec.resources.get("cpus") {
        args.push(format!(
            "--cpus-per-task={}",
            cpus.as_f64().ceil().max(1.0) as u64
        ));
    }
    if let Some(memory_gb) = spec.resources.get("memory_gb") {
        args.push(format!(
            "--mem={}M",
            (memory_gb.as_f64() * 1024.0).ceil() as u64
        ));
    }
    if let Some(gpus) = spec.resources.get("gpus") {
        let whole = gpus.as_f64().ceil() as u64;
        if whole > 0 {
            args.push(format!("--gpus={whole}"));
        }
    }
    let pick =
        |own: &Option<String>, server: &Option<String>| own.clone().or_else(|| server.clone());
    for (flag, value) in [
        ("partition", pick(&options.partition, &settings.partition)),
        ("account", pick(&options.account, &settings.account)),
        ("qos", pick(&options.qos, &settings.qos)),
        ("time", pick(&options.time, &settings.time)),
        (
            "constraint",
            pick(&options.constraint, &settings.constraint),
        ),
    ] {
        if let Some(value) = value {
            args.push(format!("--{flag}={value}"));
        }
    }
    args.extend(settings.sbatch_args.iter().cloned());
    args.extend(options.sbatch_args.iter().cloned());
    args.push(script.display().to_string());
    args
}

/// The job script: runs this binary's own server on the node until the job ends (scancel
/// sends it SIGTERM, and it closes its instance before it exits). Its only client is this
/// server, which already applied the operator's policy to the config it forwards (presets
/// included), hence `--allow-client-host-access`.
pub fn job_script(
    binary: &Path,
    root: &Path,
    token: &str,
    max_output_bytes: usize,
    pids_limit: u64,
) -> String {
    let quote = |path: &Path| format!("'{}'", path.display());
    format!(
        "#!/bin/sh\n\
         # arservice: the server of one instance, on the node the job landed on.\n\
         ARS_TOKEN={token}\n\
         export ARS_TOKEN\n\
         exec {binary} --runner local --host 0.0.0.0 --port 0 --state-dir {state} \\\n\
         \x20   --ready-file {ready} --max-resources '{{\"instances\": 1}}' \\\n\
         \x20   --workers {NODE_WORKERS} --max-output-bytes {max_output_bytes} \\\n\
         \x20   --pids-limit {pids_limit} --allow-client-host-access\n",
        binary = quote(binary),
        state = quote(&root.join("node")),
        ready = quote(&root.join("ready.json")),
    )
}

/// Variables of the login server's environment that a job gets (sbatch exports what it has),
/// besides the names in [`JOB_PREFIXES`] and the config's `forward_env`: never its token or
/// model keys, nor anything else it happens to hold.
const JOB_ENV_FROM_SERVER: [&str; 8] = [
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR",
];

/// Prefixes of the variables that configure Slurm itself and the container tools on the node.
const JOB_PREFIXES: [&str; 7] = [
    "SLURM_",
    "SBATCH_",
    "APPTAINER_",
    "SINGULARITY_",
    "ENROOT_",
    "DOCKER_",
    "CONTAINERS_",
];

/// The environment `sbatch` runs with, and so the job's: the server's own variables that the
/// job needs ([`JOB_ENV_FROM_SERVER`], [`JOB_PREFIXES`]) and those `forward_env` names.
pub fn job_environment(
    forward_env: &[String],
    server: impl Iterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    server
        .filter(|(name, _)| {
            JOB_ENV_FROM_SERVER.contains(&name.as_str())
                || JOB_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
                || forward_env.contains(name)
        })
        .collect()
}

/// A fresh random token for one job's server.
fn random_token() -> Result<String, EnvError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .map_err(|source| EnvError::Io {
            context: "cannot read /dev/urandom".into(),
            source,
        })?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// The queue as this server sees it: one `squeue` call answers the health of every job.
#[derive(Default)]
pub struct JobWatch {
    inner: Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    tracked: BTreeSet<String>,
    states: HashMap<String, String>,
    refreshed: Option<Instant>,
}

impl JobWatch {
    fn track(&self, job_id: &str) {
        let mut inner = self.inner.lock();
        inner.tracked.insert(job_id.to_string());
        inner.refreshed = None;
    }

    fn untrack(&self, job_id: &str) {
        self.inner.lock().tracked.remove(job_id);
    }

    /// `Some(reason)` once `job_id` is no longer running.
    fn ended(&self, job_id: &str) -> Option<String> {
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
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a node must stay silent before its instances are dead: one unanswered probe is
/// not enough (a busy node, a lost packet); probes unanswered for this long are.
const PROBE_GRACE: Duration = Duration::from_secs(2);

/// A TCP connection to the job's listener on its node (the job's server on the agent path, the
/// hold guard's probe port on the CLI path), made at each health round. Slurm declares a node
/// down only after `SlurmdTimeout` (300 s by default, 26 s with 10 s here); a node whose
/// processes are gone, or that no longer answers on the network, fails this at once.
struct NodeProbe {
    /// `host:port`, as the job announced it.
    address: String,
    target: std::net::SocketAddr,
    /// Since when the probes have gone unanswered.
    failing: Mutex<Option<Instant>>,
}

impl NodeProbe {
    /// `None` when the address cannot be resolved (the node is then watched through Slurm
    /// alone, as before).
    fn new(address: &str) -> Option<NodeProbe> {
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
    fn silent_for(&self) -> Option<(Duration, String)> {
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
fn adopted_probe(handle: &Value) -> Option<NodeProbe> {
    if let Some(url) = handle["url"].as_str() {
        return NodeProbe::new(url.trim_start_matches("http://"));
    }
    NodeProbe::new(handle["probe"].as_str()?)
}

/// How long the end of a job may stay `COMPLETING` before that is the state its end reports.
const END_STATE_WAIT: Duration = Duration::from_secs(5);

/// `job 1234 ended: TIMEOUT` (with Slurm's reason when it gives one). A job still
/// `COMPLETING` (its processes being cleaned up) gets [`END_STATE_WAIT`] to say how it ended.
fn end_reason(job_id: &str) -> String {
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

/// The Slurm runner.
pub struct SlurmRunner {
    settings: SlurmSettings,
    watch: Arc<JobWatch>,
}

impl SlurmRunner {
    /// Checks that the Slurm commands are there.
    pub fn new(settings: SlurmSettings) -> Result<SlurmRunner, String> {
        for tool in ["sbatch", "squeue", "scancel", "scontrol"] {
            if !crate::env::on_path(tool) {
                return Err(format!(
                    "--runner slurm needs '{tool}' on PATH (run on a Slurm login node)"
                ));
            }
        }
        if !settings.node_binary.is_file() {
            return Err(format!(
                "--slurm-node-binary {} is not a file: jobs run this arservice binary on their node",
                settings.node_binary.display()
            ));
        }
        Ok(SlurmRunner {
            settings,
            watch: Arc::default(),
        })
    }
}

impl Runner for SlurmRunner {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn implicit_units(&self) -> &'static [&'static str] {
        IMPLICIT_UNITS
    }

    fn sweep_leftovers(&self, server_id: &str, _state_dir: &Path, adopted: &[RunId]) {
        let prefix = format!("{SANDBOX_PREFIX}{server_id}-");
        let kept: Vec<String> = adopted
            .iter()
            .map(|run_id| format!("{prefix}{run_id}"))
            .collect();
        let mut squeue = Command::new("squeue");
        squeue.args(["--me", "--noheader", "--format=%i|%j"]);
        let listing = match run_tool("squeue", squeue, SLURM_CALL_TIMEOUT) {
            Ok(listing) => listing,
            Err(err) => {
                log::warn!("cannot look for leftover jobs: {err}");
                return;
            }
        };
        let jobs: Vec<&str> = listing
            .lines()
            .filter_map(|line| line.split_once('|'))
            .filter(|(_, name)| {
                name.trim().starts_with(&prefix) && !kept.iter().any(|kept| kept == name.trim())
            })
            .map(|(id, _)| id.trim())
            .collect();
        if jobs.is_empty() {
            return;
        }
        let mut scancel = Command::new("scancel");
        scancel.args(&jobs);
        match run_tool("scancel", scancel, SLURM_CALL_TIMEOUT) {
            Ok(_) => log::warn!(
                "cancelled {} job(s) left by an earlier run: {}",
                jobs.len(),
                jobs.join(" ")
            ),
            Err(err) => log::warn!("cannot cancel leftover jobs {}: {err}", jobs.join(" ")),
        }
    }

    fn start(
        &self,
        spec: &EnvSpec,
        ctx: &InstanceContext,
    ) -> Result<Box<dyn Environment>, EnvError> {
        Ok(Box::new(SlurmEnv::start(
            spec,
            ctx,
            &self.settings,
            &self.watch,
        )?))
    }

    fn adopt(
        &self,
        spec: &EnvSpec,
        ctx: &InstanceContext,
        handle: &Value,
    ) -> Result<Box<dyn Environment>, EnvError> {
        Ok(Box::new(SlurmEnv::adopt(
            spec,
            ctx,
            handle,
            &self.settings,
            &self.watch,
        )?))
    }
}

/// One instance: a job, and the server inside it that runs the environment; or, with
/// `exec_mode: "cli"`, a job that only keeps the allocation, each command one `srun` step.
pub struct SlurmEnv {
    job_id: String,
    run_id: RunId,
    root: PathBuf,
    /// Through the job's server, or as `srun` steps.
    mode: Mode,
    /// The node the job runs on, as Slurm names it (`%N`), once it runs.
    node: String,
    agent: ureq::Agent,
    watch: Arc<JobWatch>,
    /// The job's listener the health round connects to; `None` until the job runs (and for
    /// a CLI-path job adopted from a journal written before hold guards listened).
    probe: Option<NodeProbe>,
}

/// How an instance's commands reach its node.
enum Mode {
    /// The job's server runs the environment: its `http://host:port` once it announced itself,
    /// and the token it checks.
    Server { url: Option<String>, token: String },
    /// `exec_mode: "cli"`: every command is an `srun` step.
    Steps(Steps),
}

/// The CLI path: every command is `srun --jobid J --overlap <arservice> guard ... -- <shell>
/// <cmd>` on the job's node, through the spawn helper. The guard enforces the timeout inside
/// the step and leaves nothing of the command behind (see `crate::guard`); the spawn helper's
/// own deadline comes [`STEP_GUARD_MARGIN`] later, as the fallback, and then ends the step with
/// `scancel --signal` (killing `srun` does not reliably stop the step). Commands run on the
/// node itself, as `container_type: local` would; the agent path is the one for every other
/// type.
struct Steps {
    /// The working directory of commands, on the shared file system.
    workdir: PathBuf,
    /// The arservice binary as the node reaches it: the guard of every step.
    guard: PathBuf,
    /// The instance's marker (its sandbox name), which the guard sets on every command.
    instance: String,
    shell: Vec<String>,
    /// The config's `env` and `forward_env` (the step inherits the rest from `srun`).
    env: BTreeMap<String, String>,
    groups: ProcessGroups,
    next_step: AtomicU64,
}

/// What a CLI-path step takes from the server's environment (besides `SLURM_*`, which `srun`
/// itself reads).
const STEP_ENV_FROM_SERVER: [&str; 4] = ["PATH", "USER", "LANG", "TZ"];

/// The shell of a CLI-path command when the config names none (as `local`).
const STEP_SHELL: [&str; 2] = ["sh", "-c"];

/// How much later than a command's timeout the spawn helper ends a CLI-path step itself, when
/// its guard has not: the guard takes [`spawn::TERM_GRACE`] between its SIGTERM and its
/// SIGKILL, then `srun` has to notice the step's end.
const STEP_GUARD_MARGIN: Duration = Duration::from_millis(750);

/// How much earlier than its timeout a step may end with the guard's 124 and still count as
/// timed out: the guard's deadline is read from the node's clock.
const STEP_CLOCK_TOLERANCE: Duration = Duration::from_millis(100);

/// How long the fallback kill of a step waits for its `squeue` and `scancel` before it goes on.
const STEP_SIGNAL_WAIT: Duration = Duration::from_millis(100);

/// The job script of the CLI path: the hold guard keeps the allocation until `scancel`, says
/// so in `ready.json`, and at the job's end kills what still carries the instance's marker.
pub fn hold_script(binary: &Path, root: &Path, instance: &str) -> String {
    let quote = |path: &Path| format!("'{}'", path.display());
    format!(
        "#!/bin/sh\n\
         # arservice: holds the allocation; commands run as srun steps under arservice guard.\n\
         exec {binary} guard --hold --instance '{instance}' --ready-file {ready}\n",
        binary = quote(binary),
        ready = quote(&root.join("ready.json")),
    )
}

impl Steps {
    fn new(spec: &EnvSpec, ctx: &InstanceContext, guard: &Path) -> Result<Steps, EnvError> {
        if spec.kind != crate::env::Kind::Local {
            return Err(EnvError::Invalid(format!(
                "exec_mode \"cli\" under the Slurm runner runs each command as an srun step on the node: \
                 it takes container_type local only, not {} (the agent path runs every type)",
                spec.kind.name()
            )));
        }
        let workdir = ctx.root.join("work");
        std::fs::create_dir_all(&workdir).map_err(|source| EnvError::Io {
            context: format!("cannot create {}", workdir.display()),
            source,
        })?;
        // srun passes its whole environment on to the step: it gets only these, never the
        // server's own (its token, model API keys), as `local` commands do.
        let mut env: BTreeMap<String, String> = std::env::vars()
            .filter(|(name, _)| {
                STEP_ENV_FROM_SERVER.contains(&name.as_str()) || name.starts_with("SLURM_")
            })
            .collect();
        env.insert("HOME".into(), workdir.display().to_string());
        env.extend(
            spec.forward_env
                .iter()
                .filter_map(|name| std::env::var(name).ok().map(|value| (name.clone(), value))),
        );
        env.extend(spec.env.clone());
        env.insert("ARSERVICE_RUN_ID".into(), ctx.run_id.to_string());
        Ok(Steps {
            guard: guard.to_path_buf(),
            instance: ctx.sandbox_name(),
            workdir: match &spec.cwd {
                Some(cwd) => workdir.join(cwd),
                None => workdir,
            },
            shell: spec
                .shell
                .clone()
                .unwrap_or_else(|| STEP_SHELL.map(String::from).to_vec()),
            env,
            groups: ProcessGroups::default(),
            next_step: AtomicU64::new(0),
        })
    }

    /// The arguments of `srun` for one command (after the program name): the guard, then
    /// the command.
    fn arguments(
        &self,
        job_id: &str,
        step_name: &str,
        cwd: &Path,
        cmd: &str,
        timeout: Duration,
        started_at: std::time::SystemTime,
    ) -> Vec<String> {
        let since_epoch = started_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut args: Vec<String> = vec![
            format!("--jobid={job_id}"),
            "--overlap".into(),
            "--nodes=1".into(),
            "--ntasks=1".into(),
            "--quiet".into(),
            format!("--job-name={step_name}"),
            format!("--chdir={}", cwd.display()),
            self.guard.display().to_string(),
            "guard".into(),
            "--instance".into(),
            self.instance.clone(),
            "--exec".into(),
            step_name.to_string(),
            "--timeout".into(),
            format!("{:.3}", timeout.as_secs_f64()),
            "--started-at".into(),
            format!("{:.3}", since_epoch.as_secs_f64()),
            "--cwd".into(),
            cwd.display().to_string(),
            "--".into(),
        ];
        args.extend(self.shell.iter().cloned());
        args.push(cmd.to_string());
        args
    }
}

impl SlurmEnv {
    /// How commands run as `srun` steps, on the CLI path.
    fn steps(&self) -> Option<&Steps> {
        match &self.mode {
            Mode::Steps(steps) => Some(steps),
            Mode::Server { .. } => None,
        }
    }

    /// The job's server (its URL and token), once it announced itself.
    fn server(&self) -> Option<(&str, &str)> {
        match &self.mode {
            Mode::Server {
                url: Some(url),
                token,
            } => Some((url, token)),
            _ => None,
        }
    }

    /// The job's server's URL for messages and `/stats` (empty when there is none).
    fn node_url(&self) -> &str {
        self.server().map_or("", |(url, _)| url)
    }

    fn start(
        spec: &EnvSpec,
        ctx: &InstanceContext,
        settings: &SlurmSettings,
        watch: &Arc<JobWatch>,
    ) -> Result<SlurmEnv, EnvError> {
        let (mode, script) = write_job(spec, ctx, settings)?;
        let mut sbatch = Command::new("sbatch");
        // sbatch exports its whole environment into the job: give it only what the job needs.
        sbatch
            .args(sbatch_arguments(spec, ctx, settings, &spec.slurm, &script))
            .env_clear()
            .envs(job_environment(&spec.forward_env, std::env::vars()));
        let job_id = match run_tool("sbatch", sbatch, SLURM_CALL_TIMEOUT) {
            Ok(output) => output
                .trim()
                .split(';')
                .next()
                .unwrap_or_default()
                .to_string(),
            Err(err) => {
                let _ = std::fs::remove_dir_all(&ctx.root);
                return Err(err);
            }
        };
        let mut env = SlurmEnv {
            job_id,
            run_id: ctx.run_id.clone(),
            root: ctx.root.clone(),
            mode,
            node: String::new(),
            agent: node_client(),
            watch: Arc::clone(watch),
            probe: None,
        };
        if let Err(err) = env.bring_up(spec, settings.queue_timeout) {
            if let Err(cleanup) = env.cancel_and_wait() {
                log::warn!(
                    "cleaning up job {} after a failed start: {cleanup}",
                    env.job_id
                );
            }
            let _ = std::fs::remove_dir_all(&ctx.root);
            return Err(err);
        }
        watch.track(&env.job_id);
        Ok(env)
    }

    /// Takes over the job of an earlier life (`handle` from [`Environment::handle`]): it must
    /// be a job of this user named as this server names the instance's job (as docker's label
    /// is checked), still run, and its server must answer with the token the journal kept. A
    /// job that fails the first check is someone else's: it is never adopted, so never
    /// cancelled either.
    fn adopt(
        spec: &EnvSpec,
        ctx: &InstanceContext,
        handle: &Value,
        settings: &SlurmSettings,
        watch: &Arc<JobWatch>,
    ) -> Result<SlurmEnv, EnvError> {
        let field = |key: &str| {
            handle[key]
                .as_str()
                .map(String::from)
                .ok_or_else(|| EnvError::Invalid(format!("the journal record has no {key}")))
        };
        // Before anything is made for it: is it this instance's job at all?
        let (state, node) = owned_job_state(&field("job_id")?, &ctx.sandbox_name())?;
        let mode = match handle["exec_mode"].as_str() {
            Some("cli") => Mode::Steps(Steps::new(spec, ctx, &settings.node_binary)?),
            _ => Mode::Server {
                url: Some(field("url")?),
                token: field("token")?,
            },
        };
        let env = SlurmEnv {
            job_id: field("job_id")?,
            run_id: ctx.run_id.clone(),
            root: ctx.root.clone(),
            probe: adopted_probe(handle),
            node,
            mode,
            agent: node_client(),
            watch: Arc::clone(watch),
        };
        if state != "RUNNING" {
            return Err(EnvError::Gone(format!(
                "job {} is {}",
                env.job_id,
                if state.is_empty() { "gone" } else { &state }
            )));
        }
        if env.steps().is_some() {
            // Commands that were running lost their client: end them (their guards kill what
            // they started), so that none of them outlives this adoption.
            env.cancel_steps();
            watch.track(&env.job_id);
            return Ok(env);
        }
        let (url, token) = env.server().unwrap_or_default();
        let answer = env
            .agent
            .get(format!("{url}/get_available_resources"))
            .config()
            .timeout_global(Some(SLURM_CALL_TIMEOUT))
            .build()
            .header("Authorization", format!("Bearer {token}"))
            .call()
            .map_err(|err| EnvError::Tool {
                what: format!("reaching the server of job {} at {url}", env.job_id),
                detail: err.to_string(),
            })?;
        if answer.status() != 200 {
            return Err(EnvError::Tool {
                what: format!("the server of job {}", env.job_id),
                detail: format!("answered {} to the journal's token", answer.status()),
            });
        }
        watch.track(&env.job_id);
        Ok(env)
    }

    /// Waits for RUNNING, then for the job's server, then starts the environment there.
    fn bring_up(&mut self, spec: &EnvSpec, queue_timeout: Duration) -> Result<(), EnvError> {
        self.wait_running(queue_timeout)?;
        let ready = self.wait_announced()?;
        let host = ready["host"].as_str().unwrap_or("localhost");
        let port = ready["port"].as_u64().unwrap_or(0);
        self.probe = NodeProbe::new(&format!("{host}:{port}"));
        match &mut self.mode {
            // The hold guard runs: the node runs our binary, and commands can go.
            Mode::Steps(_) => return Ok(()),
            Mode::Server { url, .. } => *url = Some(format!("http://{host}:{port}")),
        }
        self.start_on_node(spec)
    }

    /// Waits until the job runs (its node known), at most `queue_timeout` in the queue.
    fn wait_running(&mut self, queue_timeout: Duration) -> Result<(), EnvError> {
        let submitted = Instant::now();
        loop {
            let (state, reason, node) = self.queue_state()?;
            match state.as_str() {
                "RUNNING" => {
                    self.node = node;
                    return Ok(());
                }
                "PENDING" | "CONFIGURING" | "REQUEUED" | "RESIZING" => {
                    if submitted.elapsed() > queue_timeout {
                        return Err(EnvError::Tool {
                            what: format!("slurm job {}", self.job_id),
                            detail: format!(
                                "still pending after {:.0} s (reason: {reason}); cancelled",
                                queue_timeout.as_secs_f64()
                            ),
                        });
                    }
                }
                "" => return Err(self.ended_early()),
                _ => return Err(self.ended_early()),
            }
            std::thread::sleep(QUEUE_POLL);
        }
    }

    /// Waits until the job's server (or hold guard) announces its host and port.
    fn wait_announced(&self) -> Result<Value, EnvError> {
        let ready_file = self.root.join("ready.json");
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        loop {
            if let Some(ready) = std::fs::read(&ready_file)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            {
                return Ok(ready);
            }
            if self.queue_state()?.0 != "RUNNING" {
                return Err(self.ended_early());
            }
            if Instant::now() > deadline {
                return Err(EnvError::Tool {
                    what: format!("slurm job {}", self.job_id),
                    detail: format!(
                        "its {} did not come up within {} s: {}",
                        if self.steps().is_some() {
                            "arservice guard"
                        } else {
                            "server"
                        },
                        NODE_READY_TIMEOUT.as_secs(),
                        self.job_output()
                    ),
                });
            }
            std::thread::sleep(QUEUE_POLL / 2);
        }
    }

    /// Starts the instance's environment in the job's server, from the spec as the node
    /// should see it (one instance's resources, the job's variables forwarded).
    fn start_on_node(&self, spec: &EnvSpec) -> Result<(), EnvError> {
        let config = node_config(spec);
        let body = json!({"run_id": self.run_id, "environment_config": config});
        match self.call(
            "/start_instance",
            &body,
            NODE_START_TIMEOUT,
            NODE_ANSWER_BYTES,
        ) {
            Ok((200, _)) => Ok(()),
            Ok((400, answer)) => Err(EnvError::Invalid(detail_of(&answer))),
            Ok((status, answer)) => Err(EnvError::Tool {
                what: format!("starting the environment in job {}", self.job_id),
                detail: format!("{status}: {}", detail_of(&answer)),
            }),
            Err(err) => Err(EnvError::Tool {
                what: format!(
                    "reaching the server of job {} at {}",
                    self.job_id,
                    self.node_url()
                ),
                detail: err,
            }),
        }
    }

    /// `(state, reason, nodes)` of the job (its nodes once it runs), all empty once it left
    /// the queue.
    fn queue_state(&self) -> Result<(String, String, String), EnvError> {
        let mut squeue = Command::new("squeue");
        squeue.args(["--noheader", "--format=%T|%r|%N", "--jobs", &self.job_id]);
        match run_tool("squeue", squeue, SLURM_CALL_TIMEOUT) {
            Ok(line) => {
                let mut fields = line.trim().splitn(3, '|').map(str::trim);
                let mut next = || fields.next().unwrap_or_default().to_string();
                Ok((next(), next(), next()))
            }
            // squeue refuses a job id it has forgotten: the job is gone.
            Err(EnvError::Tool { detail, .. }) if detail.contains("Invalid job id") => {
                Ok((String::new(), String::new(), String::new()))
            }
            Err(err) => Err(err),
        }
    }

    fn job_output(&self) -> String {
        let output = std::fs::read_to_string(self.root.join("job.out")).unwrap_or_default();
        let output = output.trim();
        if output.is_empty() {
            "the job printed nothing".into()
        } else {
            format!(
                "the job said: {}",
                &output[output.len().saturating_sub(600)..]
            )
        }
    }

    fn ended_early(&self) -> EnvError {
        EnvError::Tool {
            what: format!("slurm job {}", self.job_id),
            detail: format!(
                "{} before its environment was up; {}",
                end_reason(&self.job_id),
                self.job_output()
            ),
        }
    }

    /// `scancel`, then waits until the job has left the queue.
    /// True when the probes of the job's node have gone unanswered for [`PROBE_GRACE`].
    fn node_silent(&self) -> bool {
        self.probe.as_ref().is_some_and(|probe| {
            probe
                .failing
                .lock()
                .is_some_and(|since| since.elapsed() >= PROBE_GRACE)
        })
    }

    fn cancel_and_wait(&self) -> Result<(), EnvError> {
        let mut scancel = Command::new("scancel");
        scancel.arg(&self.job_id);
        run_tool("scancel", scancel, SLURM_CALL_TIMEOUT)?;
        let deadline = Instant::now() + CANCEL_TIMEOUT;
        loop {
            let (state, _, _) = self.queue_state()?;
            if state.is_empty()
                || !matches!(
                    state.as_str(),
                    "RUNNING" | "PENDING" | "COMPLETING" | "CONFIGURING" | "SUSPENDED"
                )
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EnvError::Tool {
                    what: format!("scancel {}", self.job_id),
                    detail: format!(
                        "the job is still {state} after {} s",
                        CANCEL_TIMEOUT.as_secs()
                    ),
                });
            }
            std::thread::sleep(QUEUE_POLL);
        }
    }

    /// One request to the job's server; its answer may be up to `limit` bytes long.
    fn call(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
        limit: u64,
    ) -> Result<(u16, Value), String> {
        let (url, token) = self
            .server()
            .ok_or("the job's server has not announced itself")?;
        let mut response = self
            .agent
            .post(format!("{url}{path}"))
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|err| err.to_string())?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_string()
            .map_err(|err| err.to_string())?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }
}

/// Makes the instance's directory (0700) and its job script: the server's, with a fresh
/// token, or on the CLI path the hold guard's; how commands will run, and the script.
fn write_job(
    spec: &EnvSpec,
    ctx: &InstanceContext,
    settings: &SlurmSettings,
) -> Result<(Mode, PathBuf), EnvError> {
    let io = |context: String| move |source| EnvError::Io { context, source };
    if ctx.root.to_string_lossy().contains('\'')
        || settings.node_binary.to_string_lossy().contains('\'')
    {
        return Err(EnvError::Invalid(
            "the state dir and node binary paths must not contain a quote".into(),
        ));
    }
    std::fs::create_dir_all(&ctx.root)
        .map_err(io(format!("cannot create {}", ctx.root.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ctx.root, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("cannot restrict {}", ctx.root.display())))?;
    let token = random_token()?;
    let steps = if spec.forces_cli() {
        Some(
            Steps::new(spec, ctx, &settings.node_binary).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&ctx.root);
            })?,
        )
    } else {
        None
    };
    let script = ctx.root.join("job.sh");
    let body = match &steps {
        Some(_) => hold_script(&settings.node_binary, &ctx.root, &ctx.sandbox_name()),
        None => job_script(
            &settings.node_binary,
            &ctx.root,
            &token,
            settings.max_output_bytes,
            settings.pids_limit,
        ),
    };
    std::fs::write(&script, body)
        .and_then(|()| std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)))
        .map_err(io(format!("cannot write {}", script.display())))?;
    let mode = match steps {
        Some(steps) => Mode::Steps(steps),
        None => Mode::Server { url: None, token },
    };
    Ok((mode, script))
}

/// The `environment_config` the job's server gets: the spec's, without `slurm`, with its
/// image resolved, one instance's resources, and the job's variables forwarded.
fn node_config(spec: &EnvSpec) -> Map<String, Value> {
    let mut config = spec.raw.clone();
    config.remove("slurm");
    config.insert("image".into(), Value::from(spec.image.clone()));
    let mut resources: Map<String, Value> = spec
        .resources
        .iter()
        .filter(|(key, _)| !IMPLICIT_UNITS.contains(&key.as_str()))
        .map(|(key, amount)| (key.clone(), amount.to_json()))
        .collect();
    resources.insert("instances".into(), Value::from(1));
    config.insert("resources".into(), Value::Object(resources));
    let mut forward: Vec<Value> = spec
        .forward_env
        .iter()
        .map(|name| Value::from(name.clone()))
        .collect();
    forward.extend(JOB_VARIABLES.iter().map(|name| Value::from(*name)));
    config.insert("forward_env".into(), Value::Array(forward));
    config
}

/// The state of job `job_id` (empty once it left the queue) and its node list if it is a job
/// of this user named `name`; an error (nothing to adopt, nothing to cancel) when it is another user's job, has
/// another name, or the id is not a job id.
fn owned_job_state(job_id: &str, name: &str) -> Result<(String, String), EnvError> {
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

/// The HTTP client of one job's server: every status is an answer to read, not an error.
fn node_client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
}

/// Removes the line `srun` adds to the output of every command that exits non-zero (`srun:
/// error: node1: task 0: Exited with exit code 3`; `--quiet` keeps it, and `-Q -Q` would hide
/// srun's real errors too): the output is the command's own, as on every other path. Only a
/// last line naming exactly the command's return code goes.
fn strip_task_exit_line(result: &mut ExecResult) {
    let suffix = format!(": task 0: Exited with exit code {}\n", result.returncode);
    let Some(body) = result.output.strip_suffix(&suffix) else {
        return;
    };
    let start = body.rfind('\n').map_or(0, |at| at + 1);
    // What is left of the line is `srun: error: <node>`.
    let is_srun_s = body[start..]
        .strip_prefix("srun: error: ")
        .is_some_and(|node| !node.is_empty() && !node.contains(':'));
    if is_srun_s {
        result.output.truncate(start);
    }
}

fn detail_of(answer: &Value) -> String {
    answer["detail"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| answer.to_string())
}

impl SlurmEnv {
    /// One command as an `srun` step of the job (the CLI path).
    fn exec_step(&self, steps: &Steps, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        let cwd = match &request.cwd {
            Some(cwd) => steps.workdir.join(cwd),
            None => steps.workdir.clone(),
        };
        let step_name = format!(
            "{SANDBOX_PREFIX}step-{}-{}",
            self.run_id,
            steps.next_step.fetch_add(1, Ordering::Relaxed)
        );
        let timeout = request.limits.timeout;
        let mut srun = Command::new("srun");
        srun.args(steps.arguments(
            &self.job_id,
            &step_name,
            &cwd,
            &request.cmd,
            timeout,
            std::time::SystemTime::now(),
        ))
        .env_clear()
        .envs(&steps.env)
        .envs(&request.env);
        // The guard enforces `timeout` inside the step; this deadline is the fallback.
        let limits = Limits {
            timeout: timeout + STEP_GUARD_MARGIN,
            ..request.limits
        };
        let mut result = spawn::run_sandboxed(srun, limits, &steps.groups, &|signal| {
            self.signal_step_soon(&step_name, signal)
        })
        .map_err(|source| EnvError::Io {
            context: "cannot run srun".into(),
            source,
        })?;
        // The guard's 124 at the timeout (counted from when `srun` started here, by clocks
        // that Slurm keeps in step): the command timed out.
        if result.returncode == spawn::TIMEOUT_RETURNCODE
            && result.duration_s >= timeout.saturating_sub(STEP_CLOCK_TOLERANCE).as_secs_f64()
        {
            result.timed_out = true;
        }
        strip_task_exit_line(&mut result);
        Ok(result)
    }

    /// Cancels the steps of this instance's commands still in the job (their guards end what
    /// they started); the batch step, which holds the job, stays.
    fn cancel_steps(&self) {
        let prefix = format!("{SANDBOX_PREFIX}step-{}-", self.run_id);
        let steps = steps_named(&self.job_id, |name| name.starts_with(&prefix));
        if steps.is_empty() {
            return;
        }
        let mut scancel = Command::new("scancel");
        scancel.args(&steps);
        match run_tool("scancel", scancel, SLURM_CALL_TIMEOUT) {
            Ok(_) => log::warn!(
                "cancelled {} command(s) left running in job {}: {}",
                steps.len(),
                self.job_id,
                steps.join(" ")
            ),
            Err(err) => log::warn!("cannot cancel steps {}: {err}", steps.join(" ")),
        }
    }

    /// Sends `signal` to the step named `step_name` (the spawn helper's fallback, when the
    /// step's guard has not ended it): waits for that at most [`STEP_SIGNAL_WAIT`], so that
    /// the helper's own signal to `srun` (which makes Slurm kill the step, the guard and
    /// everything below it) follows at once.
    fn signal_step_soon(&self, step_name: &str, signal: i32) {
        let (job_id, step_name) = (self.job_id.clone(), step_name.to_string());
        let (done, finished) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            signal_step(&job_id, &step_name, signal);
            let _ = done.send(());
        });
        let _ = finished.recv_timeout(STEP_SIGNAL_WAIT);
    }
}

/// The ids (`J.S`) of job `job_id`'s steps whose name `wanted` accepts.
fn steps_named(job_id: &str, wanted: impl Fn(&str) -> bool) -> Vec<String> {
    let mut squeue = Command::new("squeue");
    squeue.args(["--steps", "--noheader", "--format=%i|%j", "--jobs", job_id]);
    let Ok(listing) = run_tool("squeue --steps", squeue, SLURM_CALL_TIMEOUT) else {
        return Vec::new();
    };
    listing
        .lines()
        .filter_map(|line| line.trim().split_once('|'))
        .filter(|(_, name)| wanted(name.trim()))
        .map(|(step, _)| step.trim().to_string())
        .collect()
}

/// Sends `signal` to the step named `step_name` with `scancel --signal`: SIGTERM makes its
/// guard end the command and everything it started; SIGKILL is the last resort.
fn signal_step(job_id: &str, step_name: &str, signal: i32) {
    let name = if signal == libc::SIGKILL {
        "KILL"
    } else {
        "TERM"
    };
    for step in steps_named(job_id, |name| name == step_name) {
        let mut scancel = Command::new("scancel");
        scancel.arg(format!("--signal={name}")).arg(&step);
        if let Err(err) = run_tool("scancel", scancel, SLURM_CALL_TIMEOUT) {
            log::warn!("ending timed-out step {step}: {err}");
        }
    }
}

impl Environment for SlurmEnv {
    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        if let Some(steps) = self.steps() {
            return self.exec_step(steps, request);
        }
        let body = json!({
            "run_id": self.run_id,
            "cmd": request.cmd,
            "timeout": request.limits.timeout.as_secs_f64(),
            "cwd": request.cwd,
            "env": request.env,
            "max_output_bytes": request.limits.max_output_bytes,
        });
        match self.call(
            "/execute_command",
            &body,
            request.limits.timeout + EXEC_MARGIN,
            answer_limit(request.limits.max_output_bytes),
        ) {
            Ok((200, answer)) => {
                serde_json::from_value(answer["result"].clone()).map_err(|err| EnvError::Tool {
                    what: format!("the server of job {}", self.job_id),
                    detail: format!("unexpected answer: {err}"),
                })
            }
            Ok((400, answer)) => Err(EnvError::Invalid(detail_of(&answer))),
            Ok((status, answer)) => Err(EnvError::Tool {
                what: format!("the server of job {}", self.job_id),
                detail: format!("{status}: {}", detail_of(&answer)),
            }),
            Err(err) => Err(EnvError::Tool {
                what: format!("reaching the server of job {}", self.job_id),
                detail: err,
            }),
        }
    }

    fn close(&self) -> Result<(), EnvError> {
        self.watch.untrack(&self.job_id);
        // The job's server closes the instance first, so nothing of it outlives the reply;
        // if it is already gone, scancel still ends the job and its server cleans up on SIGTERM.
        // On the CLI path, scancel's SIGTERM reaches every step's guard, which ends its command
        // and everything it started, and the hold guard, which kills what still carries the
        // instance's marker; their `srun`s end with them.
        if self.node_silent() {
            // A node that stopped answering: neither its server nor its end can be waited
            // for (Slurm ends the job when it declares the node down, or when it comes back).
            let mut scancel = Command::new("scancel");
            scancel.arg(&self.job_id);
            run_tool("scancel", scancel, SLURM_CALL_TIMEOUT)?;
            return crate::env::local::remove_tree(&self.root);
        }
        if self.server().is_some() {
            if let Err(err) = self.call(
                "/close_instance",
                &json!({"run_id": self.run_id}),
                NODE_CLOSE_TIMEOUT,
                NODE_ANSWER_BYTES,
            ) {
                log::debug!("closing {} inside job {}: {err}", self.run_id, self.job_id);
            }
        }
        let cancelled = self.cancel_and_wait();
        if let Some(steps) = self.steps() {
            // An `srun` that is somehow still there (its step is gone with the job).
            steps.groups.kill_all();
        }
        cancelled?;
        crate::env::local::remove_tree(&self.root)
    }

    /// Slurm's word first (the job ended, and how); then whether the node still answers
    /// ([`NodeProbe`]), which tells a dead node long before Slurm does.
    fn health(&self) -> Option<String> {
        if let Some(reason) = self.watch.ended(&self.job_id) {
            return Some(reason);
        }
        let probe = self.probe.as_ref()?;
        let silent = probe.silent_for()?;
        Some(format!(
            "job {} on node {}: the node stopped answering ({}) for {:.1} s; Slurm has not \
             declared it down yet",
            self.job_id,
            if self.node.is_empty() {
                "?"
            } else {
                &self.node
            },
            silent.1,
            silent.0.as_secs_f64()
        ))
    }

    fn describe(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("job_id".into(), Value::from(self.job_id.clone()));
        map.insert("node_url".into(), Value::from(self.node_url()));
        map.insert("node".into(), Value::from(self.node.clone()));
        let mode = if self.steps().is_some() {
            "cli"
        } else {
            "agent"
        };
        map.insert("exec_mode".into(), Value::from(mode));
        map
    }

    fn handle(&self) -> Option<Value> {
        match &self.mode {
            Mode::Steps(_) => Some(json!({"job_id": self.job_id, "exec_mode": "cli",
                                   "probe": self.probe.as_ref().map(|probe| probe.address.clone())})),
            Mode::Server { url, token } => Some(
                json!({"job_id": self.job_id, "url": url.as_deref().unwrap_or_default(), "token": token}),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(config: Value) -> EnvSpec {
        EnvSpec::parse(config.as_object().unwrap().clone(), Some("img:1")).unwrap()
    }

    fn ctx() -> InstanceContext {
        InstanceContext::for_tests("r")
    }

    #[test]
    fn a_probe_says_silent_only_after_its_grace() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let probe = NodeProbe::new(&address).unwrap();
        assert_eq!(probe.silent_for(), None, "a listening node answers");
        drop(listener);
        let stopped = Instant::now();
        let silent = loop {
            if let Some(silent) = probe.silent_for() {
                break silent;
            }
            assert!(
                stopped.elapsed() < PROBE_GRACE * 3,
                "a closed port never counted as silent"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(stopped.elapsed() >= PROBE_GRACE, "silent before its grace");
        assert!(silent.0 >= PROBE_GRACE, "{silent:?}");
        assert!(silent.1.starts_with(&address), "{silent:?}");
        assert!(probe.failing.lock().is_some());
    }

    #[test]
    fn sbatch_command_line_with_resources_and_options() {
        let spec = spec(json!({
            "container_type": "local",
            "resources": {"instances": 1, "cpus": 1.5, "memory_gb": 2, "gpus": 1},
            "slurm": {"partition": "gpu", "time": "01:00:00", "sbatch_args": ["--exclusive"]}
        }));
        let options = SlurmOptions::parse(spec.raw.get("slurm")).unwrap();
        let settings = SlurmSettings {
            partition: Some("debug".into()),
            account: Some("proj".into()),
            sbatch_args: vec!["--nice=10".into()],
            ..SlurmSettings::default()
        };
        let args = sbatch_arguments(
            &spec,
            &ctx(),
            &settings,
            &options,
            Path::new("/state/instances/r/job.sh"),
        );
        assert_eq!(
            args,
            [
                "--parsable",
                "--job-name=ars-abcd1234-r",
                "--comment=arservice server abcd1234 run r",
                "--output=/state/instances/r/job.out",
                "--chdir=/state/instances/r",
                "--no-requeue",
                "--cpus-per-task=2",
                "--mem=2048M",
                "--gpus=1",
                "--partition=gpu",
                "--account=proj",
                "--time=01:00:00",
                "--nice=10",
                "--exclusive",
                "/state/instances/r/job.sh",
            ]
        );
    }

    #[test]
    fn slurm_options_refuse_unknown_keys_and_types() {
        for bad in [
            json!({"partitoin": "x"}),
            json!({"time": 5}),
            json!({"sbatch_args": "--x"}),
            json!("gpu"),
        ] {
            assert!(SlurmOptions::parse(Some(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_job_script_runs_our_server_with_the_token_off_the_command_line() {
        let script = job_script(
            Path::new("/opt/arservice"),
            Path::new("/state/instances/r"),
            "00ff",
            1024,
            512,
        );
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains("ARS_TOKEN=00ff\nexport ARS_TOKEN\n"));
        assert!(script.contains("exec '/opt/arservice' --runner local --host 0.0.0.0 --port 0"));
        assert!(script.contains("--state-dir '/state/instances/r/node'"));
        assert!(script.contains("--ready-file '/state/instances/r/ready.json'"));
        assert!(script.contains("--max-output-bytes 1024"));
        assert!(script.contains("--pids-limit 512 --allow-client-host-access"));
        assert!(!script.contains("--token"), "the token must not show in ps");
    }

    #[test]
    fn the_answer_limit_holds_the_worst_escaped_output_at_the_cap() {
        let cap = 10_000;
        for byte in [0x01u8, b'"', 0xff, b'a'] {
            for total in [cap, 3 * cap] {
                let mut kept = crate::env::spawn::OutputCap::new(cap);
                kept.push(&vec![byte; total]);
                let (output, truncated) = kept.into_output();
                let result = ExecResult {
                    output,
                    returncode: 124,
                    timed_out: true,
                    truncated,
                    duration_s: 1.0 / 3.0,
                };
                let answer = json!({"status": "success", "result": result}).to_string();
                assert!(
                    answer.len() as u64 <= answer_limit(cap),
                    "{byte:#x} x {total}: {} bytes",
                    answer.len()
                );
            }
        }
    }

    #[test]
    fn srun_s_own_exit_line_is_not_part_of_the_output() {
        let result = |output: &str, returncode: i32| ExecResult {
            output: output.into(),
            returncode,
            timed_out: false,
            truncated: false,
            duration_s: 0.1,
        };
        let line = "srun: error: vm: task 0: Exited with exit code 3\n";
        for (output, returncode, kept) in [
            (format!("out\n{line}"), 3, "out\n"),
            (line.to_string(), 3, ""),
            // Another code, or not srun's own line: the command's output, kept as it is.
            (
                format!("out\n{line}"),
                4,
                "out\nsrun: error: vm: task 0: Exited with exit code 3\n",
            ),
            (
                "echo: task 0: Exited with exit code 3\n".into(),
                3,
                "echo: task 0: Exited with exit code 3\n",
            ),
        ] {
            let mut result = result(&output, returncode);
            strip_task_exit_line(&mut result);
            assert_eq!(result.output, kept);
        }
    }

    #[test]
    fn the_cli_path_runs_each_command_under_the_guard_and_the_job_holds_with_it() {
        let spec = spec(json!({"container_type": "local", "exec_mode": "cli"}));
        let temp = std::env::temp_dir().join(format!("ars-steps-{}", std::process::id()));
        let ctx = InstanceContext {
            root: temp.clone(),
            ..InstanceContext::for_tests("r")
        };
        let steps = Steps::new(&spec, &ctx, Path::new("/opt/arservice")).unwrap();
        let args = steps.arguments(
            "42",
            "ars-step-r-0",
            Path::new("/w"),
            "echo hi",
            Duration::from_millis(1500),
            std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
        );
        assert_eq!(
            args,
            [
                "--jobid=42",
                "--overlap",
                "--nodes=1",
                "--ntasks=1",
                "--quiet",
                "--job-name=ars-step-r-0",
                "--chdir=/w",
                "/opt/arservice",
                "guard",
                "--instance",
                "ars-abcd1234-r",
                "--exec",
                "ars-step-r-0",
                "--timeout",
                "1.500",
                "--started-at",
                "1700000000.250",
                "--cwd",
                "/w",
                "--",
                "sh",
                "-c",
                "echo hi",
            ]
        );
        let script = hold_script(Path::new("/opt/arservice"), &temp, "ars-abcd1234-r");
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.ends_with(&format!(
            "exec '/opt/arservice' guard --hold --instance 'ars-abcd1234-r' --ready-file '{}/ready.json'\n",
            temp.display()
        )));
        let _ = std::fs::remove_dir_all(&temp);
    }

    #[test]
    fn a_job_gets_only_what_it_needs_of_the_servers_environment() {
        let server = [
            ("PATH", "/usr/bin"),
            ("SLURM_CONF", "/etc/slurm/slurm.conf"),
            ("OPENAI_API_KEY", "sk-1"),
            ("ARS_TOKEN", "t"),
            ("HF_TOKEN", "hf"),
            ("SECRET_OF_THE_OPERATOR", "s"),
        ]
        .map(|(name, value)| (name.to_string(), value.to_string()));
        let job = job_environment(&["HF_TOKEN".to_string()], server.into_iter());
        let names: Vec<&str> = job.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["PATH", "SLURM_CONF", "HF_TOKEN"]);
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
