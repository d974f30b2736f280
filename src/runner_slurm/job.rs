//! One instance as a Slurm job ([`SlurmEnv`]): submitting it, bringing up its server (or its
//! hold guard), forwarding commands (a streamed one read as the job's server streams it) and the
//! close to it, its health, adoption after a crash.

use super::script::*;
use super::settings::*;
use super::steps::*;
use super::watch::*;
use crate::env::spawn::ExecResult;
use crate::env::wire::{answer_limit, ExecWire};
use crate::env::{run_tool, EnvError, EnvSpec, Environment, ExecRequest, InstanceContext};
use crate::run_id::RunId;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One instance: a job, and the server inside it that runs the environment; or, with
/// `exec_mode: "cli"`, a job that only keeps the allocation, each command one `srun` step.
pub struct SlurmEnv {
    pub(super) job_id: String,
    /// The instance's `run_id` as the job's server knows it ([`node_run_id`]).
    pub(super) run_id: RunId,
    pub(super) root: PathBuf,
    /// Through the job's server, or as `srun` steps.
    pub(super) mode: Mode,
    /// The node the job runs on, as Slurm names it (`%N`), once it runs.
    pub(super) node: String,
    pub(super) agent: ureq::Agent,
    pub(super) watch: Arc<JobWatch>,
    /// The job's listener the health round connects to; `None` until the job runs (and for
    /// a CLI-path job adopted from a journal written before hold guards listened).
    pub(super) probe: Option<NodeProbe>,
    /// Where the job's environment keeps what it writes, below its instance's directory on
    /// the shared state dir (`env::fork::writable_dirs`): what a fork copies; `None` when it
    /// cannot fork.
    pub(super) fork_dirs: Option<&'static [&'static str]>,
    /// Whether the job's server exports a fork's seed (`/export_instance`): docker, podman and
    /// enroot, whose writable state is on the node.
    pub(super) exports: bool,
}

/// How an instance's commands reach its node.
pub(super) enum Mode {
    /// The job's server runs the environment: its `http://host:port` once it announced itself,
    /// and the token it checks; whether it reads `stdin` (false for a job adopted from a
    /// journal written before it did: its server, an earlier build, would run the command
    /// without it).
    Server {
        url: Option<String>,
        token: String,
        reads_stdin: bool,
    },
    /// `exec_mode: "cli"`: every command is an `srun` step.
    Steps(Steps),
}

impl SlurmEnv {
    /// How commands run as `srun` steps, on the CLI path.
    pub(super) fn steps(&self) -> Option<&Steps> {
        match &self.mode {
            Mode::Steps(steps) => Some(steps),
            Mode::Server { .. } => None,
        }
    }

    /// The job's server (its URL and token), once it announced itself.
    pub(super) fn server(&self) -> Option<(&str, &str)> {
        match &self.mode {
            Mode::Server {
                url: Some(url),
                token,
                ..
            } => Some((url, token)),
            _ => None,
        }
    }

    /// The job's server's URL for messages and `/stats` (empty when there is none).
    pub(super) fn node_url(&self) -> &str {
        self.server().map_or("", |(url, _)| url)
    }

    pub(super) fn start(
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
            run_id: node_run_id(&ctx.run_id),
            root: ctx.root.clone(),
            mode,
            node: String::new(),
            agent: node_client(),
            watch: Arc::clone(watch),
            probe: None,
            fork_dirs: crate::env::fork::writable_dirs(spec),
            exports: exports(spec),
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
    pub(super) fn adopt(
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
                reads_stdin: handle["reads_stdin"].as_bool() == Some(true),
            },
        };
        let env = SlurmEnv {
            job_id: field("job_id")?,
            run_id: node_run_id(&ctx.run_id),
            root: ctx.root.clone(),
            probe: adopted_probe(handle),
            node,
            mode,
            agent: node_client(),
            watch: Arc::clone(watch),
            fork_dirs: crate::env::fork::writable_dirs(spec),
            exports: exports(spec),
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
    pub(super) fn bring_up(
        &mut self,
        spec: &EnvSpec,
        queue_timeout: Duration,
    ) -> Result<(), EnvError> {
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
    pub(super) fn wait_running(&mut self, queue_timeout: Duration) -> Result<(), EnvError> {
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
    pub(super) fn wait_announced(&self) -> Result<Value, EnvError> {
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
    pub(super) fn start_on_node(&self, spec: &EnvSpec) -> Result<(), EnvError> {
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
    pub(super) fn queue_state(&self) -> Result<(String, String, String), EnvError> {
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

    pub(super) fn job_output(&self) -> String {
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

    pub(super) fn ended_early(&self) -> EnvError {
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
    pub(super) fn node_silent(&self) -> bool {
        self.probe.as_ref().is_some_and(|probe| {
            probe
                .failing
                .lock()
                .is_some_and(|since| since.elapsed() >= PROBE_GRACE)
        })
    }

    pub(super) fn cancel_and_wait(&self) -> Result<(), EnvError> {
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

    /// [`SlurmEnv::call`] of a streamed command (`"stream": true` in `body`): the job's
    /// server answers NDJSON lines (`env::stream`), each chunk's text goes to `sink`, and the
    /// last line is the answer, with the status it would have had (`http_status` on an error
    /// after the stream began). Each line at most `limit` bytes, the whole within `timeout`.
    /// A job's server of an earlier build answers once: its output goes to `sink` whole.
    fn call_streamed(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
        limit: u64,
        sink: &crate::env::stream::OutputSink,
    ) -> Result<(u16, Value), String> {
        use crate::env::stream::{read_line, Line, MAX_CHUNK_LINE_BYTES, NDJSON};
        let mut response = self.post(path, body, timeout)?;
        let status = response.status().as_u16();
        let streamed = status == 200
            && response
                .headers()
                .get("content-type")
                .and_then(|kind| kind.to_str().ok())
                .is_some_and(|kind| kind.starts_with(NDJSON));
        if !streamed {
            let text = response
                .body_mut()
                .with_config()
                .limit(limit)
                .read_to_string()
                .map_err(|err| err.to_string())?;
            let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            if let Some(output) = value["result"]["output"].as_str().filter(|_| status == 200) {
                sink.send(output.as_bytes());
            }
            return Ok((status, value));
        }
        let mut lines =
            std::io::BufReader::with_capacity(64 * 1024, response.into_body().into_reader());
        loop {
            let line = read_line(&mut lines, limit.max(MAX_CHUNK_LINE_BYTES))
                .map_err(|err| format!("a broken stream: {err}"))?
                .ok_or("the stream ended without its answer")?;
            match Line::parse(&line)? {
                Line::Chunk(text) => sink.send(text.as_bytes()),
                Line::Last(value) => {
                    let status = value["http_status"]
                        .as_u64()
                        .and_then(|status| u16::try_from(status).ok())
                        .unwrap_or(200);
                    return Ok((status, value));
                }
            }
        }
    }

    /// The seed of the fork `dst` from what is on this job's node: the job's server exports it
    /// into its state dir (`/export_instance`: the container committed and saved, or enroot's
    /// rootfs copied), on the shared file system, which is renamed into the new job's `seed/`
    /// for its server to import, wherever that job runs. On failure nothing of it is left.
    fn export_into(&self, dst: &InstanceContext) -> Result<(), EnvError> {
        let new_run_id = node_run_id(&dst.run_id);
        let exported = self.root.join("node/exports").join(&new_run_id);
        let body = json!({"run_id": self.run_id, "new_run_id": new_run_id});
        let failed = |detail: String| EnvError::Tool {
            what: format!("exporting the fork's files from job {}", self.job_id),
            detail,
        };
        // A commit and a save (or a copy), each within the fork's timeout (the job's server
        // runs with this server's `--fork-timeout`).
        let timeout = dst.fork_timeout * 2 + EXEC_MARGIN;
        let answer = self.call("/export_instance", &body, timeout, NODE_ANSWER_BYTES);
        let moved = match answer {
            Ok((200, _)) => crate::env::instance_dir(&dst.root).and_then(|()| {
                std::fs::rename(&exported, dst.root.join(FORK_SEED_DIR)).map_err(|source| {
                    EnvError::Io {
                        context: format!("cannot move {}", exported.display()),
                        source,
                    }
                })
            }),
            Ok((400, answer)) => Err(EnvError::Invalid(detail_of(&answer))),
            Ok((status, answer)) => Err(failed(format!("{status}: {}", detail_of(&answer)))),
            Err(err) => Err(failed(format!("reaching its server: {err}"))),
        };
        if moved.is_err() {
            let _ = crate::env::local::remove_tree(&exported);
        }
        moved
    }

    /// Sends `body` to `path` of the job's server, with its token, within `timeout`.
    fn post(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<ureq::http::Response<ureq::Body>, String> {
        let (url, token) = self
            .server()
            .ok_or("the job's server has not announced itself")?;
        self.agent
            .post(format!("{url}{path}"))
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|err| err.to_string())
    }

    /// One request to the job's server; its answer may be up to `limit` bytes long.
    pub(super) fn call(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
        limit: u64,
    ) -> Result<(u16, Value), String> {
        let mut response = self.post(path, body, timeout)?;
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

/// Whether a job of `spec` forks through its server's export (see [`SlurmEnv::fork_into`]).
fn exports(spec: &EnvSpec) -> bool {
    use crate::env::Kind;
    matches!(spec.kind, Kind::Docker | Kind::Podman | Kind::Enroot)
}

/// The `run_id` the job's server runs the instance under: the instance's own, but for a
/// pooled sandbox (`_pool-<hex>`, a name no request can give, so the job's server would
/// refuse it), which is `pool-<hex>` there. The job's server holds this one instance only,
/// so the name cannot meet another there.
pub(super) fn node_run_id(run_id: &RunId) -> RunId {
    match run_id.strip_prefix('_') {
        Some(rest) if run_id.is_pool_member() => {
            RunId::parse(rest, "run_id").unwrap_or_else(|_| run_id.clone())
        }
        _ => run_id.clone(),
    }
}

/// Makes the instance's directory (0700) and its job script: the server's, with a fresh
/// token, or on the CLI path the hold guard's; how commands will run, and the script.
pub(super) fn write_job(
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
            ctx.fork_timeout,
        ),
    };
    std::fs::write(&script, body)
        .and_then(|()| std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)))
        .map_err(io(format!("cannot write {}", script.display())))?;
    let mode = match steps {
        Some(steps) => Mode::Steps(steps),
        None => Mode::Server {
            url: None,
            token,
            reads_stdin: true,
        },
    };
    Ok((mode, script))
}

/// The `environment_config` the job's server gets: the spec's, without `slurm`, with its
/// image resolved, one instance's resources, and the job's variables forwarded.
pub(super) fn node_config(spec: &EnvSpec) -> Map<String, Value> {
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

/// The HTTP client of one job's server: every status is an answer to read, not an error.
pub(super) fn node_client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
}

/// Writes `bytes` to a new file at `path` that only this user can read.
pub(super) fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

pub(super) fn detail_of(answer: &Value) -> String {
    answer["detail"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| answer.to_string())
}

impl Environment for SlurmEnv {
    /// A copy of what the job's environment wrote, on the shared state dir (`fork_dirs`):
    /// through a job's server, its instance's directories go into the new job's `seed/`, which
    /// that job's server takes for its instance (`--fork-seed`); on the CLI path, the
    /// instance's `work/` (its steps' working directory and `HOME`) goes straight into the new
    /// instance's, where its steps will run. What is on the node (docker's and podman's
    /// container, enroot's rootfs), the job's server exports first ([`SlurmEnv::export_into`]).
    /// Apptainer's tmpfs answers 400.
    fn fork_into(&self, dst: &InstanceContext) -> Result<crate::env::fork::ForkSeed, EnvError> {
        let dirs = match (&self.mode, self.fork_dirs) {
            (Mode::Steps(_), Some(dirs)) => {
                crate::env::fork::copy_dirs(&self.root, &dst.root, dirs, dst.fork_timeout)?;
                return Ok(crate::env::fork::ForkSeed::default());
            }
            (Mode::Server { .. }, Some(dirs)) => dirs,
            (Mode::Server { .. }, None) if self.exports => {
                self.export_into(dst)?;
                return Ok(crate::env::fork::ForkSeed::default());
            }
            _ => {
                return Err(crate::env::fork::cannot_fork(
                    "under the Slurm runner, apptainer with writable \"tmpfs\"",
                ))
            }
        };
        let source = self.root.join("node/instances").join(&self.run_id);
        crate::env::fork::copy_dirs(
            &source,
            &dst.root.join(FORK_SEED_DIR),
            dirs,
            dst.fork_timeout,
        )?;
        Ok(crate::env::fork::ForkSeed::default())
    }

    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        if let Some(steps) = self.steps() {
            return self.exec_step(steps, request);
        }
        if let Mode::Server {
            reads_stdin: false, ..
        } = self.mode
        {
            if request.stdin.is_some() {
                return Err(EnvError::Invalid(format!(
                    "the server of job {} is of an earlier build (adopted after a restart) that \
                     does not read stdin: send the command without it, or start a new instance",
                    self.job_id
                )));
            }
        }
        let body = json!(ExecWire::for_job(request, &self.run_id));
        let timeout = request.limits.timeout + EXEC_MARGIN;
        let limit = answer_limit(request.limits.max_output_bytes);
        let answer = match &request.sink {
            Some(sink) => self.call_streamed("/execute_command", &body, timeout, limit, sink),
            None => self.call("/execute_command", &body, timeout, limit),
        };
        match answer {
            Ok((200, answer)) => {
                serde_json::from_value(answer["result"].clone()).map_err(|err| EnvError::Tool {
                    what: format!("the server of job {}", self.job_id),
                    detail: format!("unexpected answer: {err}"),
                })
            }
            // The job's server's words without its own "execute in '<run_id>' failed: ",
            // which ours adds again: the same 400 as on every other path.
            Ok((400, answer)) => {
                let detail = detail_of(&answer);
                let own = format!("execute in '{}' failed: ", self.run_id);
                Err(EnvError::Invalid(
                    detail.strip_prefix(&own).unwrap_or(&detail).to_string(),
                ))
            }
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

    /// Through the job's server (which does it through its environment); the CLI path has
    /// none (see `files.rs`).
    fn put_file(
        &self,
        upload: &crate::env::files::Upload,
        body: &mut dyn std::io::Read,
    ) -> Result<u64, EnvError> {
        self.put_file_through_server(upload, body)
    }

    fn get_file(&self, path: &str) -> Result<crate::env::files::Download, EnvError> {
        self.get_file_through_server(path)
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
            Mode::Server {
                url,
                token,
                reads_stdin,
            } => Some(
                json!({"job_id": self.job_id, "url": url.as_deref().unwrap_or_default(),
                             "token": token, "reads_stdin": reads_stdin}),
            ),
        }
    }
}
