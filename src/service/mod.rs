//! The instance table and the lifecycle of every instance: start, execute, close, mark dead,
//! shut down.
//!
//! Owns `run_id` → [`Slot`]; counts are derived from it, never kept beside it. The order of a
//! start is reserve (ledger) → start the environment with no lock held → keep; anything that
//! fails on the way drops its [`Reservation`] and its `Starting` slot, so a refused or failed
//! start leaves nothing behind. The table lock is only held for lookups and inserts: never
//! across an environment call, so `/stats` never waits behind a command.
//!
//! The rest of the service is in its own files: `instance.rs` (one row and its lifecycle),
//! `files.rs` (files in and out of an instance), `fork.rs` (a new instance from a copy of a
//! running one, through the same reserve → start → keep),
//! `recovery.rs` (adoption after a crash and the start-up sweep), `watch.rs` (the background
//! loop: reaping, health rounds, forgetting dead rows) and `stats.rs` (one snapshot, rendered
//! as `/stats` JSON and as Prometheus text).

mod files;
mod fork;
mod instance;
mod pool;
mod recovery;
mod stats;
mod watch;

pub use instance::{epoch_now, State};
pub use stats::{RunSums, CLOSED_RUNS_KEPT, ORIGINAL_STATS_KEYS};

use crate::api::{ExecCommand, Presets, StartRequest};
use crate::env::{EnvError, EnvSpec, Environment, ExecResult, InstanceContext, Kind, Limits};
use crate::error::Error;
use crate::gateway::GatewayStats;
use crate::journal::{Journal, Record};
use crate::ledger::{resources_json, Ledger, Refusal, Reservation, Resources};
use crate::metrics::Metrics;
use crate::run_id::RunId;
use crate::runner::Runner;
use instance::{Death, Instance, Refused, Slot, Timeouts};
use parking_lot::Mutex;
use serde_json::Value;
use stats::{ClosedRuns, Filter, Snapshot, Sources};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many instances shutdown closes, and recovery reaches, at once.
const PARALLELISM: usize = 16;

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
    /// `--fork-seed`: inside a Slurm job started for a fork, the copy of its source's files
    /// that the job's instance starts from (see `fork.rs`).
    pub fork_seed: Option<PathBuf>,
    /// The longest one fork's copy may take (`--fork-timeout`).
    pub fork_timeout: Duration,
}

/// The service: runner, ledger, instance table and what it counts.
pub struct Service {
    runner: Box<dyn Runner>,
    ledger: Arc<Ledger>,
    settings: Settings,
    started_at: f64,
    started: Instant,
    table: Mutex<HashMap<RunId, Slot>>,
    /// Every counter and histogram of the service.
    metrics: Metrics,
    /// The sums of the last runs that ended, for `GET /runs/{run_id}` (bounded).
    closed: Mutex<ClosedRuns>,
    shutting_down: AtomicBool,
    /// The warm pools of presets (see `pool.rs`).
    pools: pool::Pools,
    /// `--fork-seed` until the first start takes it (see `fork.rs`).
    fork_seed: Mutex<Option<PathBuf>>,
}

/// Removes a `Starting` slot unless the start got through.
struct StartingSlot<'a> {
    service: &'a Service,
    run_id: &'a RunId,
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
            fork_seed: Mutex::new(settings.fork_seed.clone()),
            settings,
            started_at: epoch_now(),
            started: Instant::now(),
            table: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            closed: Mutex::new(ClosedRuns::default()),
            shutting_down: AtomicBool::new(false),
            pools: pool::Pools::default(),
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

    /// The `container_type`s requests may use; `None`: all.
    pub fn container_types(&self) -> Option<&[Kind]> {
        self.settings.container_types.as_deref()
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
        self.check_allowed(&request)?;
        let run_id = &request.run_id.clone();
        let cost = self
            .ledger
            .cost(&request.spec.resources, self.runner.implicit_units());
        let mut slot = self.take(run_id)?;
        if let Some((pool, member)) = self.take_pooled(&request) {
            return self.keep_pooled(request, &pool, member, &mut slot);
        }
        let reservation = self.reserve(cost, request.wait)?;
        let context = self
            .seeded(self.context(run_id), &request.spec)
            .map_err(|error| self.start_failed(run_id, request.spec.kind, error))?;
        let env = self
            .start_env(run_id, &request.spec, &context)
            .inspect_err(|_| {
                // A fork's seed that did not start: its imported image or rootfs goes too.
                if let Some(seed) = &context.fork {
                    seed.discard(&context);
                }
            })?;
        let instance = Arc::new(Instance::running(
            run_id.clone(),
            request.container_name,
            request.spec,
            (epoch_now(), Instant::now()),
            env,
            reservation,
            false,
        ));
        self.keep(instance, &mut slot)
    }

    /// Refuses what this server does not allow: a kind it does not enable, fields that reach
    /// the host from a client, a secret of the server forwarded into a sandbox.
    fn check_allowed(&self, request: &StartRequest) -> Result<(), Error> {
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
        Ok(())
    }

    /// Takes `run_id` with a `Starting` slot, which goes again when the guard drops armed.
    fn take<'a>(&'a self, run_id: &'a RunId) -> Result<StartingSlot<'a>, Error> {
        let mut table = self.table.lock();
        if let Some(slot) = table.get(run_id) {
            return Err(Error::RunIdInUse {
                run_id: run_id.to_string(),
                state: slot.state().name(),
            });
        }
        table.insert(run_id.clone(), Slot::Starting);
        Ok(StartingSlot {
            service: self,
            run_id,
            armed: true,
        })
    }

    /// Reserves `cost`, waiting up to `wait` for it to fit. Room that pooled sandboxes hold
    /// is the request's: idle ones are closed to make it, and while the request waits, ones
    /// still starting are closed once up; refills wait meanwhile.
    fn reserve(&self, cost: Resources, wait: Duration) -> Result<Reservation, Error> {
        let _pressure = self.pools.press();
        let shortage = loop {
            match self.ledger.reserve(cost.clone()) {
                Ok(reservation) => return Ok(reservation),
                // Short of a resource (not behind a queue) that evicting can give.
                Err(short)
                    if short.asked > short.left
                        && !short.never_fits()
                        && self.evict_idle(&short.resource) => {}
                Err(short) => break short,
            }
        };
        if wait.is_zero() {
            return Err(Error::Insufficient(shortage));
        }
        if shortage.asked > shortage.left && !shortage.never_fits() {
            self.doom_starting(&shortage.resource);
        }
        match self.ledger.reserve_waiting(cost, wait) {
            Ok(reservation) => Ok(reservation),
            Err(Refusal::Short(shortage)) => Err(Error::Insufficient(shortage)),
            Err(Refusal::Closed) => Err(Error::ShuttingDown),
        }
    }

    /// Starts the sandbox through the runner (no lock held), counting and timing it.
    fn start_env(
        &self,
        run_id: &RunId,
        spec: &EnvSpec,
        context: &InstanceContext,
    ) -> Result<Box<dyn Environment>, Error> {
        let starting = Instant::now();
        let env = self.runner.start(spec, context).map_err(|source| {
            let error = Error::Env {
                action: "start",
                run_id: run_id.to_string(),
                source,
            };
            self.start_failed(run_id, spec.kind, error)
        })?;
        self.metrics.start_seconds.observe(starting.elapsed());
        Ok(env)
    }

    /// Counts a start that failed (its metric, and for the infrastructure's failures the
    /// run's ledger and `/runs`) and hands its error back.
    fn start_failed(&self, run_id: &RunId, kind: Kind, error: Error) -> Error {
        if !matches!(
            error,
            Error::Env {
                source: EnvError::Invalid(_),
                ..
            }
        ) {
            self.metrics.starts_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.count_infra(run_id, &error);
        self.record_failed_start(run_id, kind, &error);
        error
    }

    /// Records a started instance in the journal and lists it in place of its `Starting`
    /// slot; closes it instead when it cannot be recorded or shutdown began meanwhile.
    fn keep(&self, instance: Arc<Instance>, slot: &mut StartingSlot) -> Result<(), Error> {
        let run_id = &instance.run_id;
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
                table.insert(run_id.clone(), Slot::Live(Arc::clone(&instance)));
                slot.armed = false;
                self.metrics
                    .instances_started
                    .fetch_add(1, Ordering::Relaxed);
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
        record.forked_from = instance.forked_from.clone();
        if instance.pooled() {
            record.sandbox = Some(instance.sandbox.clone());
        }
        self.settings.journal.write(&record)
    }

    fn context(&self, run_id: &RunId) -> InstanceContext {
        InstanceContext {
            run_id: run_id.clone(),
            root: self.settings.state_dir.join("instances").join(run_id),
            server_id: self.settings.server_id.clone(),
            state_dir: self.settings.state_dir.clone(),
            agent: self.settings.agent.clone(),
            pids_limit: self.settings.pids_limit,
            fork_timeout: self.settings.fork_timeout,
            fork: None,
        }
    }

    /// The `ttl` and `idle_timeout` of instances whose config names none.
    fn default_timeouts(&self) -> Timeouts {
        Timeouts {
            ttl: self.settings.default_ttl,
            idle_timeout: self.settings.default_idle_timeout,
        }
    }

    fn live(&self, run_id: &RunId) -> Result<Arc<Instance>, Error> {
        match self.table.lock().get(run_id) {
            Some(Slot::Live(instance)) => Ok(Arc::clone(instance)),
            Some(Slot::Starting) => Err(Error::RunIdInUse {
                run_id: run_id.to_string(),
                state: State::Starting.name(),
            }),
            None => Err(Error::UnknownInstance(run_id.to_string())),
        }
    }

    /// Every started instance of the table (dead ones included), at one moment.
    fn live_instances(&self) -> Vec<Arc<Instance>> {
        self.table
            .lock()
            .values()
            .filter_map(|slot| match slot {
                Slot::Live(instance) => Some(Arc::clone(instance)),
                Slot::Starting => None,
            })
            .collect()
    }

    /// Runs one command; the table lock is released before the command starts. An error
    /// that is the infrastructure's fault counts in the run's sums.
    pub fn execute(&self, command: ExecCommand) -> Result<ExecResult, Error> {
        self.execute_to(command, None)
    }

    /// [`Service::execute`], the output also going to `sink` as it is read (a streamed
    /// answer, `"stream": true`).
    pub fn execute_to(
        &self,
        command: ExecCommand,
        sink: Option<crate::env::stream::OutputSink>,
    ) -> Result<ExecResult, Error> {
        let run_id = command.run_id.clone();
        self.execute_counted(command, sink)
            .inspect_err(|error| self.count_infra(&run_id, error))
    }

    /// When `command`, sent now, runs out of time (its own `timeout`, or its instance's);
    /// `None` for an instance that is not running. For a caller that must not hold the
    /// command's output past it (a streamed answer whose client stopped reading).
    pub fn command_deadline(&self, command: &ExecCommand) -> Option<Instant> {
        let instance = self.live(&command.run_id).ok()?;
        Some(Instant::now() + command_timeout(command, &instance))
    }

    fn execute_counted(
        &self,
        command: ExecCommand,
        sink: Option<crate::env::stream::OutputSink>,
    ) -> Result<ExecResult, Error> {
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let instance = self.live(&command.run_id)?;
        let run_id = command.run_id.to_string();
        match instance.runnable() {
            Ok(()) => {}
            Err(Refused::Closing) => {
                return Err(Error::RunIdInUse {
                    run_id,
                    state: State::Closing.name(),
                })
            }
            Err(Refused::Dead(reason)) => return Err(Error::Gone { run_id, reason }),
            Err(Refused::Reaped(reason)) => return Err(Error::Reaped { run_id, reason }),
        }
        let request = crate::env::ExecRequest {
            limits: self.limits(&command, &instance)?,
            cmd: command.cmd,
            cwd: command.cwd,
            env: command.env,
            stdin: command.stdin,
            sink,
        };
        let streamed = request.sink.is_some();
        let _running = instance.begin_command(streamed);
        if streamed {
            self.metrics
                .streamed_commands
                .fetch_add(1, Ordering::Relaxed);
        }
        let began = Instant::now();
        let outcome = instance.env.exec(&request);
        self.metrics.commands.fetch_add(1, Ordering::Relaxed);
        self.metrics.exec_seconds.observe(began.elapsed());
        self.exec_outcome(&instance, run_id, outcome)
    }

    /// The command's timeout (the instance's unless it names one) and output cap (the
    /// server's unless it names a smaller one).
    fn limits(&self, command: &ExecCommand, instance: &Instance) -> Result<Limits, Error> {
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
        Ok(Limits {
            timeout: command_timeout(command, instance),
            max_output_bytes,
        })
    }

    /// What a command's outcome answers, counting it; a sandbox found gone is marked dead.
    fn exec_outcome(
        &self,
        instance: &Instance,
        run_id: String,
        outcome: Result<ExecResult, EnvError>,
    ) -> Result<ExecResult, Error> {
        match outcome {
            Ok(result) => {
                if result.timed_out {
                    self.metrics
                        .commands_timed_out
                        .fetch_add(1, Ordering::Relaxed);
                    instance.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                Ok(result)
            }
            Err(EnvError::Gone(reason)) => {
                self.mark_dead(instance, reason.clone(), Death::FoundByCommand);
                Err(Error::Gone { run_id, reason })
            }
            // The request's own mistake (a 400): nothing ran, nothing to look into.
            Err(source @ EnvError::Invalid(_)) => Err(Error::Env {
                action: "execute in",
                run_id,
                source,
            }),
            Err(source) => {
                self.metrics.commands_failed.fetch_add(1, Ordering::Relaxed);
                // A failure may be the sandbox dying under the command: say so when it is.
                if let Some(reason) = instance.env.health() {
                    self.mark_dead(instance, reason.clone(), Death::FoundByCommand);
                    return Err(Error::Gone { run_id, reason });
                }
                Err(Error::Env {
                    action: "execute in",
                    run_id,
                    source,
                })
            }
        }
    }

    /// Records that `instance` ended on its own (or was reaped): frees its resources and closes
    /// what is left of its sandbox, but keeps it listed (and its `run_id` taken) until it is
    /// closed. Nothing when it was not running (a death noticed twice counts once).
    fn mark_dead(&self, instance: &Instance, reason: String, death: Death) {
        if !instance
            .lifecycle
            .lock()
            .die(reason.clone(), death == Death::Reaped)
        {
            return;
        }
        if death == Death::FoundByWatch {
            self.metrics.infra_failures.fetch_add(1, Ordering::Relaxed);
            instance
                .counters
                .infra_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        log::warn!("instance {} is gone: {reason}", instance.run_id);
        instance.reservation.lock().take();
        instance.counters.note_cpu(instance.env.cpu_seconds());
        if let Err(err) = instance.env.close() {
            log::warn!("closing what is left of {}: {err}", instance.run_id);
        }
        self.settings.journal.remove(&instance.run_id);
    }

    /// Ends the instance's processes and files, then frees its resources; its run's sums
    /// go to the closed runs kept. An error that is the infrastructure's fault counts in them.
    pub fn close(&self, run_id: &RunId) -> Result<(), Error> {
        self.close_counted(run_id)
            .inspect_err(|error| self.count_infra(run_id, error))
    }

    fn close_counted(&self, run_id: &RunId) -> Result<(), Error> {
        let instance = self.live(run_id)?;
        let before =
            instance
                .lifecycle
                .lock()
                .begin_close()
                .map_err(|state| Error::RunIdInUse {
                    run_id: run_id.to_string(),
                    state: state.name(),
                })?;
        instance.counters.note_cpu(instance.env.cpu_seconds());
        if instance.pooled() && !self.is_shutting_down() {
            // A pooled sandbox is removed in the background, its room held until it is gone.
            self.settings.journal.remove(run_id);
            self.closed.lock().push(stats::run_sums(&instance, true));
            self.close_in_background(&instance);
            self.table.lock().remove(run_id);
            return Ok(());
        }
        if let Err(source) = instance.env.close() {
            // Keep it listed (and its resources held) so that a retried close can finish it.
            instance.lifecycle.lock().restore(before);
            return Err(Error::Env {
                action: "close",
                run_id: run_id.to_string(),
                source,
            });
        }
        self.settings.journal.remove(run_id);
        self.closed.lock().push(stats::run_sums(&instance, true));
        self.table.lock().remove(run_id);
        instance.reservation.lock().take();
        Ok(())
    }

    /// Refuses new work, kills running commands and closes every instance.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.ledger.stop_waiting();
        let run_ids: Vec<RunId> = self
            .live_instances()
            .iter()
            .map(|instance| instance.run_id.clone())
            .collect();
        log::info!("shutting down: closing {} instance(s)", run_ids.len());
        let queue = Mutex::new(run_ids);
        std::thread::scope(|scope| {
            for _ in 0..PARALLELISM {
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
        self.close_pools();
    }

    /// The table (under one lock), the counters and the ledger, now.
    fn snapshot(&self, run_id_filter: Option<&str>) -> Snapshot {
        Snapshot::take(Sources {
            table: &self.table,
            metrics: &self.metrics,
            ledger: &self.ledger,
            closed: &self.closed,
            run_id_filter,
            runner: self.runner.name(),
            server_id: &self.settings.server_id,
            started_at: self.started_at,
            started: self.started,
            defaults: self.default_timeouts(),
        })
    }

    /// `/stats`, narrowed to the rows whose `run_id` and image contain the filters, with the
    /// model gateway's part when it is on.
    pub fn stats(
        &self,
        run_id_filter: Option<&str>,
        container_filter: Option<&str>,
        model: Option<&GatewayStats>,
    ) -> Value {
        let filter = Filter {
            run_id: run_id_filter,
            container: container_filter,
        };
        let mut stats = self.snapshot(run_id_filter).json(filter, model);
        if !self.pools.is_empty() {
            stats["pools"] = self.pools.json();
        }
        stats
    }

    /// `/metrics`: the counters, the histograms, and gauges of the table and the ledger now.
    pub fn metrics(&self) -> String {
        let mut out = self.snapshot(None).prometheus(&self.metrics);
        self.pools.prometheus(&mut out);
        out
    }

    /// What is left of every enforced resource.
    pub fn available_resources(&self) -> Value {
        resources_json(&self.ledger.available())
    }

    /// Number of instances in the table (starting ones included).
    pub fn len(&self) -> usize {
        self.table.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;

/// How long `command` may run on `instance`: its own `timeout`, or the instance's.
fn command_timeout(command: &ExecCommand, instance: &Instance) -> Duration {
    command.timeout.unwrap_or(instance.spec.timeout)
}
