//! The instance table and the lifecycle of every instance: start, execute, close, shutdown,
//! and the numbers `/stats` shows.
//!
//! Owns `run_id` → [`Slot`]; counts are derived from it, never kept beside it. The order of a
//! start is reserve (ledger) → start the environment with no lock held → keep; anything that
//! fails on the way drops its [`Reservation`] and its `Starting` slot, so a refused or failed
//! start leaves nothing behind. The table lock is only held for lookups and inserts: never
//! across an environment call, so `/stats` never waits behind a command.

use crate::api::{ExecCommand, Presets, StartRequest};
use crate::env::{
    EnvError, EnvSpec, Environment, ExecRequest, ExecResult, InstanceContext, Kind, Limits,
};
use crate::error::Error;
use crate::gateway::GatewayStats;
use crate::journal::{Journal, Record};
use crate::ledger::{resources_json, Ledger, Refusal, Reservation};
use crate::metrics::{family, plain, Metrics, Sample};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a dead instance stays listed (answering 410) when nobody closes it.
const DEAD_RETENTION: Duration = Duration::from_secs(3600);

/// The longest pause between two expiry checks.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// How many instances shutdown closes at once.
const SHUTDOWN_PARALLELISM: usize = 16;

/// Where instances live: on this machine, or inside Slurm jobs.
pub trait Runner: Send + Sync {
    /// `local` or `slurm`.
    fn name(&self) -> &'static str;

    /// Resource keys that cost one unit unless the request names them.
    fn implicit_units(&self) -> &'static [&'static str];

    /// Removes what an earlier life of this server (same `server_id`) left outside the state
    /// dir, but the instances just adopted (by `run_id`): nothing else is tracked at
    /// start-up, so the rest is stale.
    fn reap_leftovers(&self, server_id: &str, state_dir: &std::path::Path, adopted: &[String]);

    /// Removes sandboxes of this server that no instance in the table tracks (`tracked`
    /// lists their `run_id`s, asked after the sandboxes are listed): a start or close whose
    /// cleanup failed while the engine was down leaves one. Called every health interval;
    /// it must cost nothing where no such sandbox can be.
    fn tidy(&self, _server_id: &str, _tracked: &dyn Fn() -> Vec<String>) {}

    /// Takes over a sandbox an earlier life started, from its journal `handle`; called with
    /// no lock held. `Err`: it is gone or cannot be adopted, and the sweep removes it.
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

/// What the server was configured with.
pub struct Settings {
    pub state_dir: PathBuf,
    /// A static `arservice` to run inside sandboxes as their agent.
    pub agent: Option<PathBuf>,
    /// `ttl` of instances whose config has none.
    pub default_ttl: Option<Duration>,
    /// `idle_timeout` of instances whose config has none.
    pub default_idle_timeout: Option<Duration>,
    /// This server's identity (see `InstanceContext::server_id`).
    pub server_id: String,
    pub max_output_bytes: usize,
    pub presets: Presets,
    /// Where kept instances are recorded for a later life to adopt.
    pub journal: Journal,
    /// The `container_type`s requests may use (`--container-types`); `None`: all.
    pub container_types: Option<Vec<Kind>>,
    /// Clients may set the fields that reach the host (`--allow-client-host-access`);
    /// otherwise only presets may (see `api::host_fields`).
    pub allow_client_host_access: bool,
    /// Variables that are secrets of the server (its token, the model gateway's upstream
    /// keys): no `forward_env` may name them.
    pub secret_env: Vec<String>,
    /// The most processes a docker or podman container may have (`--pids-limit`).
    pub pids_limit: Option<u64>,
}

/// One row of the table.
enum Slot {
    /// `/start_instance` is bringing it up; the `run_id` is taken.
    Starting,
    Live(Arc<Instance>),
}

/// A started instance.
pub struct Instance {
    run_id: String,
    container_name: Option<String>,
    spec: EnvSpec,
    created_at: f64,
    started: Instant,
    activity: Mutex<Activity>,
    lifecycle: Mutex<Lifecycle>,
    env: Box<dyn Environment>,
    /// Held until the instance is closed.
    reservation: Mutex<Option<Reservation>>,
    /// Taken over from an earlier life of the server after a crash.
    adopted: bool,
}

/// Where a started instance is in its life.
#[derive(Clone, Debug, PartialEq)]
enum Lifecycle {
    Running,
    /// A close began; commands are refused from then on.
    Closing,
    /// It ended on its own or was reaped; its resources are free, commands answer 410 with
    /// the reason. The row goes after [`DEAD_RETENTION`] unless closed before.
    Dead {
        reason: String,
        since: Instant,
    },
}

struct Activity {
    updated_at: Option<f64>,
    /// When the last command started or ended (for `idle_timeout`).
    last_active: Instant,
    num_cmd: u64,
    running: u32,
}

impl Instance {
    /// A running instance that has run no command yet; `started` is when its life began, in
    /// seconds since the epoch (for the API) and as an `Instant` (for its `ttl`).
    fn running(
        run_id: String,
        container_name: Option<String>,
        spec: EnvSpec,
        started: (f64, Instant),
        env: Box<dyn Environment>,
        reservation: Reservation,
        adopted: bool,
    ) -> Instance {
        Instance {
            run_id,
            container_name,
            spec,
            created_at: started.0,
            started: started.1,
            activity: Mutex::new(Activity {
                updated_at: None,
                last_active: Instant::now(),
                num_cmd: 0,
                running: 0,
            }),
            lifecycle: Mutex::new(Lifecycle::Running),
            env,
            reservation: Mutex::new(Some(reservation)),
            adopted,
        }
    }

    fn container_image(&self) -> &str {
        if self.spec.image.is_empty() {
            self.container_name
                .as_deref()
                .unwrap_or(self.spec.kind.name())
        } else {
            &self.spec.image
        }
    }

    fn state(&self) -> &'static str {
        match *self.lifecycle.lock() {
            Lifecycle::Running => "running",
            Lifecycle::Closing => "closing",
            Lifecycle::Dead { .. } => "dead",
        }
    }
}

/// Counts a command as running for as long as it lives.
struct Running<'a>(&'a Instance);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut activity = self.0.activity.lock();
        activity.running -= 1;
        activity.last_active = Instant::now();
        // Like the original, `updated_at` is the last activity: the end of the command too.
        activity.updated_at = Some(epoch_now());
    }
}

/// The service: runner, ledger and instance table.
pub struct Service {
    runner: Box<dyn Runner>,
    ledger: Arc<Ledger>,
    settings: Settings,
    started_at: f64,
    started: Instant,
    table: Mutex<HashMap<String, Slot>>,
    total_started: AtomicU64,
    /// Instances closed by the server for their `ttl` or `idle_timeout`.
    reaped: AtomicU64,
    /// Instances taken over from the journal of an earlier life.
    adopted: AtomicU64,
    metrics: Metrics,
    shutting_down: AtomicBool,
}

/// Seconds since the epoch, as the API reports times.
pub fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or(0.0)
}

/// A sandbox of an earlier life, taken over, with its parsed config; or why not.
type Reached = Result<(EnvSpec, Box<dyn Environment>), String>;

/// Closes a sandbox that is not kept, logging a failure.
fn close_quietly(run_id: &str, env: &dyn Environment) {
    if let Err(err) = env.close() {
        log::warn!("closing {run_id} of an earlier life: {err}");
    }
}

/// Removes a `Starting` slot unless the start got through.
struct StartingSlot<'a> {
    service: &'a Service,
    run_id: &'a str,
    armed: bool,
}

impl Drop for StartingSlot<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.service.table.lock().remove(self.run_id);
        }
    }
}

impl Service {
    pub fn new(runner: Box<dyn Runner>, ledger: Arc<Ledger>, settings: Settings) -> Service {
        Service {
            runner,
            ledger,
            settings,
            started_at: epoch_now(),
            started: Instant::now(),
            table: Mutex::new(HashMap::new()),
            total_started: AtomicU64::new(0),
            reaped: AtomicU64::new(0),
            adopted: AtomicU64::new(0),
            metrics: Metrics::default(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The `container_type` of a config that names none: docker, or the first of
    /// `--container-types` when docker is not among them.
    pub fn default_kind(&self) -> Kind {
        match &self.settings.container_types {
            Some(enabled) if !enabled.contains(&Kind::Docker) => enabled[0],
            _ => Kind::Docker,
        }
    }

    pub fn presets(&self) -> &Presets {
        &self.settings.presets
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Reserve → start (no lock held) → keep.
    pub fn start(&self, request: StartRequest) -> Result<(), Error> {
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let run_id = request.run_id.as_str();
        if let Some(enabled) = &self.settings.container_types {
            if !enabled.contains(&request.spec.kind) {
                let names: Vec<&str> = enabled.iter().map(|kind| kind.name()).collect();
                return Err(Error::BadRequest(format!(
                    "container_type '{}' is not enabled on this server (--container-types {})",
                    request.spec.kind.name(),
                    names.join(",")
                )));
            }
        }
        if !request.host_fields.is_empty() && !self.settings.allow_client_host_access {
            return Err(Error::BadRequest(format!(
                "environment_config.{} reaches this machine beyond the sandbox, so only the operator sets it: \
                 in an --environments preset, or for every client with --allow-client-host-access",
                request.host_fields.join(", environment_config.")
            )));
        }
        if let Some(secret) = request
            .spec
            .forward_env
            .iter()
            .find(|name| self.settings.secret_env.contains(name))
        {
            return Err(Error::BadRequest(format!(
                "forward_env: {secret} is a secret of this server (its token or a model key of the gateway) \
                 and never reaches a sandbox; call models through the gateway's routes instead"
            )));
        }
        let cost = self
            .ledger
            .cost(&request.spec.resources, self.runner.implicit_units());
        {
            let mut table = self.table.lock();
            if let Some(slot) = table.get(run_id) {
                let state = match slot {
                    Slot::Starting => "starting",
                    Slot::Live(instance) => instance.state(),
                };
                return Err(Error::RunIdInUse {
                    run_id: run_id.to_string(),
                    state,
                });
            }
            table.insert(run_id.to_string(), Slot::Starting);
        }
        let mut slot = StartingSlot {
            service: self,
            run_id,
            armed: true,
        };
        let reservation = if request.wait.is_zero() {
            self.ledger.reserve(cost).map_err(Error::Insufficient)?
        } else {
            match self.ledger.reserve_waiting(cost, request.wait) {
                Ok(reservation) => reservation,
                Err(Refusal::Short(shortage)) => return Err(Error::Insufficient(shortage)),
                Err(Refusal::Closed) => return Err(Error::ShuttingDown),
            }
        };
        let context = self.context(run_id);
        let starting = Instant::now();
        let env = self
            .runner
            .start(&request.spec, &context)
            .map_err(|source| {
                if !matches!(source, EnvError::Invalid(_)) {
                    self.metrics.starts_failed.fetch_add(1, Ordering::Relaxed);
                }
                Error::Env {
                    action: "start",
                    run_id: run_id.to_string(),
                    source,
                }
            })?;
        self.metrics.start_seconds.observe(starting.elapsed());
        let instance = Arc::new(Instance::running(
            run_id.to_string(),
            request.container_name,
            request.spec,
            (epoch_now(), Instant::now()),
            env,
            reservation,
            false,
        ));
        if let Err(err) = self.record(&instance) {
            // Untracked by the journal, it would not be adopted after a crash: refuse it now.
            if let Err(close) = instance.env.close() {
                log::warn!("closing {run_id}, which the journal could not record: {close}");
            }
            return Err(Error::Internal(format!(
                "cannot write the journal record of {run_id} under {}: {err}",
                self.settings.state_dir.display()
            )));
        }
        {
            let mut table = self.table.lock();
            if !self.is_shutting_down() {
                table.insert(run_id.to_string(), Slot::Live(instance));
                slot.armed = false;
                self.total_started.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        // Shutdown began while this instance was starting: it must not outlive the server.
        if let Err(err) = instance.env.close() {
            log::warn!("closing {run_id}, started during shutdown: {err}");
        }
        self.settings.journal.remove(run_id);
        Err(Error::ShuttingDown)
    }

    /// Writes the journal record of a kept instance whose sandbox can outlive the server;
    /// one that cannot has no record, and a restart removes whatever is left of it.
    fn record(&self, instance: &Instance) -> std::io::Result<()> {
        let Some(handle) = instance.env.handle() else {
            return Ok(());
        };
        let mut record = Record::new(
            &instance.run_id,
            instance.container_name.as_deref(),
            &instance.spec.raw,
            instance.created_at,
            self.runner.name(),
            handle,
        );
        record.client_executable = instance.spec.client_executable;
        self.settings.journal.write(&record)
    }

    /// At start-up, before the leftover sweep: takes over every instance the journal of an
    /// earlier life recorded whose sandbox still runs and whose resources still fit (the
    /// oldest first), and forgets the rest (the sweep then removes them). Returns the adopted
    /// `run_id`s.
    pub fn adopt_journal(&self) -> Vec<String> {
        let records = self.settings.journal.load();
        // Reaching a sandbox costs a CLI call or a request: reach them all in parallel...
        let queue = Mutex::new((0..records.len()).collect::<Vec<_>>());
        let reached: Vec<Mutex<Option<Reached>>> =
            records.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|scope| {
            for _ in 0..SHUTDOWN_PARALLELISM.min(records.len()) {
                scope.spawn(|| loop {
                    let Some(index) = queue.lock().pop() else {
                        break;
                    };
                    *reached[index].lock() = Some(self.reach(&records[index]));
                });
            }
        });
        // ...then admit them in the order they were started, so that when fewer fit now
        // (a smaller --max-resources), the oldest are kept.
        let mut adopted = Vec::new();
        for (record, reached) in records.into_iter().zip(reached) {
            let run_id = record.run_id.clone();
            let outcome = reached
                .into_inner()
                .unwrap_or_else(|| Err("it was never reached".into()))
                .and_then(|(spec, env)| self.keep_adopted(record, spec, env));
            match outcome {
                Ok(()) => adopted.push(run_id),
                Err(why) => {
                    log::warn!("not adopting {run_id} of an earlier life: {why}");
                    self.settings.journal.remove(&run_id);
                }
            }
        }
        if !adopted.is_empty() {
            log::warn!(
                "adopted {} instance(s) of an earlier life: {}",
                adopted.len(),
                adopted.join(" ")
            );
        }
        adopted
    }

    /// Takes over the sandbox of one record: it must be of this runner, answer, and be
    /// healthy.
    fn reach(&self, record: &Record) -> Reached {
        if record.runner != self.runner.name() {
            return Err(format!(
                "it ran under the {} runner, this server is {}",
                record.runner,
                self.runner.name()
            ));
        }
        if !crate::api::valid_run_id(&record.run_id) {
            return Err("its run_id is not valid".into());
        }
        let mut spec = EnvSpec::parse(record.config.clone(), record.container_name.as_deref())?;
        spec.client_executable = record.client_executable;
        let env = self
            .runner
            .adopt(&spec, &self.context(&record.run_id), &record.handle)
            .map_err(|err| err.to_string())?;
        if let Some(reason) = env.health() {
            close_quietly(&record.run_id, &*env);
            return Err(reason);
        }
        Ok((spec, env))
    }

    /// Lists a reached sandbox with its resources reserved, or closes it when they no
    /// longer fit.
    fn keep_adopted(
        &self,
        record: Record,
        spec: EnvSpec,
        env: Box<dyn Environment>,
    ) -> Result<(), String> {
        let cost = self
            .ledger
            .cost(&spec.resources, self.runner.implicit_units());
        let reservation = match self.ledger.reserve(cost) {
            Ok(reservation) => reservation,
            Err(short) => {
                close_quietly(&record.run_id, &*env);
                return Err(format!("it no longer fits: {short}"));
            }
        };
        let age = Duration::from_secs_f64((epoch_now() - record.created_at).max(0.0));
        let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let instance = Arc::new(Instance::running(
            record.run_id.clone(),
            record.container_name,
            spec,
            (record.created_at, started),
            env,
            reservation,
            true,
        ));
        self.table
            .lock()
            .insert(record.run_id, Slot::Live(instance));
        self.adopted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// At start-up, after [`Service::adopt_journal`]: removes everything an earlier life left
    /// but the `adopted` instances: sandboxes outside the state dir (through the runner),
    /// then instance and agent directories.
    pub fn sweep_leftovers(&self, adopted: &[String]) {
        self.runner
            .reap_leftovers(&self.settings.server_id, &self.settings.state_dir, adopted);
        let mut kept: Vec<PathBuf> = Vec::new();
        for run_id in adopted {
            let context = self.context(run_id);
            kept.push(crate::agent::AgentMount::dir_of(&context));
            kept.push(context.root);
        }
        let mut stale = 0;
        for dir in ["instances", "agents"] {
            let Ok(entries) = std::fs::read_dir(self.settings.state_dir.join(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                if !kept.contains(&entry.path())
                    && crate::env::local::remove_tree(&entry.path()).is_ok()
                {
                    stale += 1;
                }
            }
        }
        if stale > 0 {
            log::warn!("removed {stale} instance directories left by an earlier run");
        }
    }

    fn context(&self, run_id: &str) -> InstanceContext {
        InstanceContext {
            run_id: run_id.to_string(),
            root: self.settings.state_dir.join("instances").join(run_id),
            server_id: self.settings.server_id.clone(),
            state_dir: self.settings.state_dir.clone(),
            agent: self.settings.agent.clone(),
            pids_limit: self.settings.pids_limit,
        }
    }

    fn live(&self, run_id: &str) -> Result<Arc<Instance>, Error> {
        match self.table.lock().get(run_id) {
            Some(Slot::Live(instance)) => Ok(Arc::clone(instance)),
            Some(Slot::Starting) => Err(Error::RunIdInUse {
                run_id: run_id.to_string(),
                state: "starting",
            }),
            None => Err(Error::UnknownInstance(run_id.to_string())),
        }
    }

    /// Runs one command; the table lock is released before the command starts.
    pub fn execute(&self, command: ExecCommand) -> Result<ExecResult, Error> {
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let instance = self.live(&command.run_id)?;
        match &*instance.lifecycle.lock() {
            Lifecycle::Running => {}
            Lifecycle::Closing => {
                return Err(Error::RunIdInUse {
                    run_id: command.run_id,
                    state: "closing",
                })
            }
            Lifecycle::Dead { reason, .. } => {
                return Err(Error::Gone {
                    run_id: command.run_id,
                    reason: reason.clone(),
                })
            }
        }
        let server_cap = self.settings.max_output_bytes;
        let max_output_bytes = match command.max_output_bytes {
            Some(asked) if asked > server_cap => {
                return Err(Error::BadRequest(format!(
                    "max_output_bytes {asked} is above the server's cap of {server_cap} (--max-output-bytes)"
                )))
            }
            Some(asked) => asked,
            None => server_cap,
        };
        let request = ExecRequest {
            cmd: command.cmd,
            cwd: command.cwd,
            env: command.env,
            limits: Limits {
                timeout: command.timeout.unwrap_or(instance.spec.timeout),
                max_output_bytes,
            },
        };
        {
            let mut activity = instance.activity.lock();
            activity.num_cmd += 1;
            activity.updated_at = Some(epoch_now());
            activity.last_active = Instant::now();
            activity.running += 1;
        }
        let _running = Running(&instance);
        let began = Instant::now();
        let outcome = instance.env.exec(&request);
        self.metrics.commands.fetch_add(1, Ordering::Relaxed);
        self.metrics.exec_seconds.observe(began.elapsed());
        match outcome {
            Ok(result) => {
                if result.timed_out {
                    self.metrics
                        .commands_timed_out
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(result)
            }
            Err(EnvError::Gone(reason)) => {
                self.mark_dead(&instance, reason.clone());
                Err(Error::Gone {
                    run_id: command.run_id,
                    reason,
                })
            }
            // The request's own mistake (a 400): nothing ran, nothing to look into.
            Err(source @ EnvError::Invalid(_)) => Err(Error::Env {
                action: "execute in",
                run_id: command.run_id,
                source,
            }),
            Err(source) => {
                self.metrics.commands_failed.fetch_add(1, Ordering::Relaxed);
                // A failure may be the sandbox dying under the command: say so when it is.
                if let Some(reason) = instance.env.health() {
                    self.mark_dead(&instance, reason.clone());
                    return Err(Error::Gone {
                        run_id: command.run_id,
                        reason,
                    });
                }
                Err(Error::Env {
                    action: "execute in",
                    run_id: command.run_id,
                    source,
                })
            }
        }
    }

    /// Records that `instance` ended on its own: frees its resources and cleans up what is
    /// left of it, but keeps it listed (and its `run_id` taken) until it is closed.
    fn mark_dead(&self, instance: &Instance, reason: String) {
        {
            let mut lifecycle = instance.lifecycle.lock();
            if *lifecycle != Lifecycle::Running {
                return;
            }
            *lifecycle = Lifecycle::Dead {
                reason: reason.clone(),
                since: Instant::now(),
            };
        }
        log::warn!("instance {} is gone: {reason}", instance.run_id);
        instance.reservation.lock().take();
        if let Err(err) = instance.env.close() {
            log::warn!("cleaning up after {}: {err}", instance.run_id);
        }
        self.settings.journal.remove(&instance.run_id);
    }

    /// Until shutdown: reaps instances past their `ttl` or `idle_timeout` (checked every
    /// second), checks every running sandbox's health every `interval` (a sandbox that died
    /// on its own is noticed even when nobody sends it a command), and forgets dead rows
    /// after [`DEAD_RETENTION`].
    pub fn watch(&self, interval: Duration) {
        let mut last_health = Instant::now();
        while !self.is_shutting_down() {
            std::thread::sleep(interval.min(EXPIRY_TICK));
            let instances: Vec<Arc<Instance>> = self
                .table
                .lock()
                .values()
                .filter_map(|slot| match slot {
                    Slot::Live(instance) => Some(Arc::clone(instance)),
                    Slot::Starting => None,
                })
                .collect();
            let check_health = last_health.elapsed() >= interval;
            if check_health {
                last_health = Instant::now();
                // Dead rows are not tracked: what is left of their sandbox may go.
                self.runner.tidy(&self.settings.server_id, &|| {
                    self.table
                        .lock()
                        .iter()
                        .filter(|(_, slot)| match slot {
                            Slot::Live(instance) => instance.state() != "dead",
                            Slot::Starting => true,
                        })
                        .map(|(run_id, _)| run_id.clone())
                        .collect()
                });
            }
            for instance in instances {
                let lifecycle = instance.lifecycle.lock().clone();
                match lifecycle {
                    Lifecycle::Running => {
                        let expired = self
                            .expiry(&instance)
                            .filter(|(at, _)| *at <= Instant::now());
                        if let Some((_, why)) = expired {
                            self.reaped.fetch_add(1, Ordering::Relaxed);
                            self.mark_dead(&instance, format!("reaped: {why}"));
                        } else if check_health {
                            if let Some(reason) = instance.env.health() {
                                self.metrics.instances_died.fetch_add(1, Ordering::Relaxed);
                                self.mark_dead(&instance, reason);
                            }
                        }
                    }
                    Lifecycle::Dead { since, .. } if since.elapsed() > DEAD_RETENTION => {
                        let mut table = self.table.lock();
                        let same = matches!(table.get(&instance.run_id), Some(Slot::Live(live)) if Arc::ptr_eq(live, &instance));
                        if same {
                            table.remove(&instance.run_id);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// When `instance` expires and why: the earlier of its `ttl` from start and its
    /// `idle_timeout` from the last command (never while a command runs).
    fn expiry(&self, instance: &Instance) -> Option<(Instant, String)> {
        let ttl = instance.spec.ttl.or(self.settings.default_ttl);
        let idle = instance
            .spec
            .idle_timeout
            .or(self.settings.default_idle_timeout);
        let by_ttl = ttl.map(|ttl| {
            (
                instance.started + ttl,
                format!("its ttl of {} s ran out", ttl.as_secs_f64()),
            )
        });
        let activity = instance.activity.lock();
        let by_idle = idle.filter(|_| activity.running == 0).map(|idle| {
            (
                activity.last_active + idle,
                format!("no command for {} s (idle_timeout)", idle.as_secs_f64()),
            )
        });
        [by_ttl, by_idle]
            .into_iter()
            .flatten()
            .min_by_key(|(at, _)| *at)
    }

    /// Ends the instance's processes and files, then frees its resources.
    pub fn close(&self, run_id: &str) -> Result<(), Error> {
        let instance = self.live(run_id)?;
        let before = {
            let mut lifecycle = instance.lifecycle.lock();
            if *lifecycle == Lifecycle::Closing {
                return Err(Error::RunIdInUse {
                    run_id: run_id.to_string(),
                    state: "closing",
                });
            }
            std::mem::replace(&mut *lifecycle, Lifecycle::Closing)
        };
        if let Err(source) = instance.env.close() {
            // Keep it listed (and its resources held) so that a retried close can finish it.
            *instance.lifecycle.lock() = before;
            return Err(Error::Env {
                action: "close",
                run_id: run_id.to_string(),
                source,
            });
        }
        self.settings.journal.remove(run_id);
        self.table.lock().remove(run_id);
        instance.reservation.lock().take();
        Ok(())
    }

    /// Refuses new work, kills running commands and closes every instance.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.ledger.stop_waiting();
        let run_ids: Vec<String> = self
            .table
            .lock()
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Live(_)))
            .map(|(run_id, _)| run_id.clone())
            .collect();
        log::info!("shutting down: closing {} instance(s)", run_ids.len());
        let queue = Mutex::new(run_ids);
        std::thread::scope(|scope| {
            for _ in 0..SHUTDOWN_PARALLELISM {
                scope.spawn(|| loop {
                    let Some(run_id) = queue.lock().pop() else {
                        break;
                    };
                    if let Err(err) = self.close(&run_id) {
                        log::warn!("shutdown: {err}");
                    }
                });
            }
        });
    }

    /// `/openapi.json`: the document, with `container_type` narrowed to what
    /// `--container-types` enables, so that generated clients and tests offer only those.
    pub fn openapi(&self) -> String {
        let Some(enabled) = &self.settings.container_types else {
            return crate::http::OPENAPI.to_string();
        };
        let Ok(mut doc) = serde_json::from_str::<Value>(crate::http::OPENAPI) else {
            return crate::http::OPENAPI.to_string();
        };
        let names: Vec<Value> = enabled
            .iter()
            .map(|kind| Value::from(kind.name()))
            .collect();
        let default = Value::from(self.default_kind().name());
        for schema in ["EnvironmentConfig", "StartRequest"] {
            if let Some(field) = doc
                .pointer_mut(&format!(
                    "/components/schemas/{schema}/properties/container_type"
                ))
                .and_then(Value::as_object_mut)
            {
                field.insert("enum".into(), Value::Array(names.clone()));
                field.insert("default".into(), default.clone());
            }
        }
        doc.to_string()
    }

    /// What is left of every enforced resource.
    pub fn available_resources(&self) -> Value {
        resources_json(&self.ledger.available())
    }

    /// `/stats`: the original's keys, plus `state` and `running_cmds` per instance, and the
    /// model gateway's part when it is on (`model`, `model_runs`, `model` in each row whose
    /// `run_id` made calls).
    pub fn stats(
        &self,
        run_id_filter: Option<&str>,
        container_filter: Option<&str>,
        model: Option<&GatewayStats>,
    ) -> Value {
        let live: Vec<Arc<Instance>> = {
            let table = self.table.lock();
            table
                .values()
                .filter_map(|slot| match slot {
                    Slot::Live(instance) => Some(Arc::clone(instance)),
                    Slot::Starting => None,
                })
                .collect()
        };
        let total = live.len();
        let mut container_counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut rows: Vec<(f64, Value)> = Vec::new();
        for instance in &live {
            if run_id_filter.is_some_and(|needle| !instance.run_id.contains(needle)) {
                continue;
            }
            let image = instance.container_image();
            if container_filter.is_some_and(|needle| !image.contains(needle)) {
                continue;
            }
            *container_counts.entry(image.to_string()).or_default() += 1;
            // Before `activity` is locked below: `expiry` locks it too.
            let expires_at = self
                .expiry(instance)
                .filter(|_| instance.state() == "running")
                .map(|(at, _)| {
                    epoch_now() + at.saturating_duration_since(Instant::now()).as_secs_f64()
                });
            let activity = instance.activity.lock();
            let mut row = json!({
                    "run_id": instance.run_id,
                    "container_image": image,
                    "container_name": instance.container_name.as_deref().unwrap_or(image),
                    "container_type": instance.spec.kind.name(),
                    "created_at": instance.created_at,
                    "updated_at": activity.updated_at,
                    "num_cmd": activity.num_cmd,
                    "running_cmds": activity.running,
                    "state": instance.state(),
                    "expires_at": expires_at,
                    "dead_reason": match &*instance.lifecycle.lock() {
                        Lifecycle::Dead { reason, .. } => Some(reason.clone()),
                        _ => None,
                    },
                    "environment_config": redacted(&instance.spec.raw),
                    "adopted": instance.adopted,
            });
            if let Value::Object(row) = &mut row {
                row.extend(instance.env.describe());
                if let Some(usage) = model.and_then(|model| model.of_run(&instance.run_id)) {
                    row.insert("model".into(), json!(usage));
                }
            }
            rows.push((instance.created_at, row));
        }
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        let starting = self
            .table
            .lock()
            .values()
            .filter(|slot| matches!(slot, Slot::Starting))
            .count();
        let mut stats = json!({
            "server_time": epoch_now(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "started_at": self.started_at,
            "runner": self.runner.name(),
            "server_id": self.settings.server_id,
            "active_instances": rows.len(),
            "total_instances": total,
            "starting_instances": starting,
            "instances_started": self.total_started.load(Ordering::Relaxed),
            "instances_reaped": self.reaped.load(Ordering::Relaxed),
            "instances_adopted": self.adopted.load(Ordering::Relaxed),
            "waiting_starts": self.ledger.waiting(),
            "max_resources": resources_json(self.ledger.max()),
            "allocated_resources": resources_json(&self.ledger.allocated()),
            "available_resources": resources_json(&self.ledger.available()),
            "container_counts": container_counts,
            "instances": rows.into_iter().map(|(_, row)| row).collect::<Vec<_>>(),
        });
        if let (Some(model), Value::Object(stats)) = (model, &mut stats) {
            if let Value::Object(part) = json!(model) {
                stats.extend(part);
            }
        }
        stats
    }

    /// `/metrics`: Prometheus text with the counters, the histograms, and gauges derived
    /// from the table and the ledger now.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        self.metrics.render(&mut out);
        let counter = |value: &AtomicU64| plain(value.load(Ordering::Relaxed) as f64);
        family(
            &mut out,
            "arservice_instances_started_total",
            "counter",
            "Instances started.",
            &counter(&self.total_started),
        );
        family(
            &mut out,
            "arservice_instances_reaped_total",
            "counter",
            "Instances closed for their ttl or idle_timeout.",
            &counter(&self.reaped),
        );
        family(
            &mut out,
            "arservice_instances_adopted_total",
            "counter",
            "Instances taken over from the journal of an earlier life after a crash.",
            &counter(&self.adopted),
        );
        let mut by_type_state: BTreeMap<(&'static str, &'static str), u64> = BTreeMap::new();
        let mut starting = 0;
        for slot in self.table.lock().values() {
            match slot {
                Slot::Live(instance) => {
                    *by_type_state
                        .entry((instance.spec.kind.name(), instance.state()))
                        .or_default() += 1
                }
                Slot::Starting => starting += 1,
            }
        }
        let mut samples: Vec<Sample> = by_type_state
            .into_iter()
            .map(|((kind, state), count)| Sample {
                labels: vec![
                    ("container_type", kind.to_string()),
                    ("state", state.to_string()),
                ],
                value: count as f64,
            })
            .collect();
        samples.push(Sample {
            labels: vec![
                ("container_type", "any".into()),
                ("state", "starting".into()),
            ],
            value: starting as f64,
        });
        family(
            &mut out,
            "arservice_instances",
            "gauge",
            "Instances by container type and state.",
            &samples,
        );
        let per_resource = |resources: &crate::ledger::Resources| -> Vec<Sample> {
            resources
                .iter()
                .map(|(key, amount)| Sample {
                    labels: vec![("resource", key.clone())],
                    value: amount.as_f64(),
                })
                .collect()
        };
        family(
            &mut out,
            "arservice_resource_allocated",
            "gauge",
            "Reserved amount of each enforced resource.",
            &per_resource(&self.ledger.allocated()),
        );
        family(
            &mut out,
            "arservice_resource_max",
            "gauge",
            "Maximum of each enforced resource (--max-resources).",
            &per_resource(self.ledger.max()),
        );
        family(
            &mut out,
            "arservice_waiting_starts",
            "gauge",
            "Starts waiting for resources.",
            &plain(self.ledger.waiting() as f64),
        );
        out
    }

    /// Number of instances in the table (starting ones included).
    pub fn len(&self) -> usize {
        self.table.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What `/stats` shows of an instance's config: everything but the values of `env`, which may
/// be secrets (tokens, passwords); their names stay.
fn redacted(raw: &serde_json::Map<String, Value>) -> Value {
    let mut shown = raw.clone();
    if let Some(Value::Object(env)) = shown.get_mut("env") {
        for value in env.values_mut() {
            *value = Value::from(REDACTED);
        }
    }
    Value::Object(shown)
}

/// What `/stats` shows in place of an `env` value.
const REDACTED: &str = "<redacted>";

/// Keys of `/stats` that the original's `poll.py` and clients read; never remove one.
pub const ORIGINAL_STATS_KEYS: [&str; 9] = [
    "server_time",
    "uptime_s",
    "active_instances",
    "total_instances",
    "max_resources",
    "allocated_resources",
    "available_resources",
    "container_counts",
    "instances",
];
