//! What the service shows of itself: one [`Snapshot`] of the table, the counters and the
//! ledger, rendered as the `/stats` JSON and as the Prometheus text of `/metrics`; and the
//! rollout ledger of `GET /runs/{run_id}`: the [`RunSums`] of a run, open or among the last
//! [`CLOSED_RUNS_KEPT`] closed ([`ClosedRuns`], owned by the service).
//!
//! The snapshot takes the table lock once (the rows and the starting count come from the
//! same moment), then reads each instance under its own locks; rendering holds no lock and
//! reads only what never changes (an instance's config, its sandbox's description).

use super::instance::{epoch_now, Activity, Instance, Lifecycle, Slot, State, Timeouts};
use super::Service;
use crate::env::Kind;
use crate::error::Error;
use crate::gateway::GatewayStats;
use crate::ledger::{resources_json, Ledger, Resources};
use crate::metrics::{family, plain, Metrics, Sample};
use crate::run_id::RunId;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

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

/// What `/stats` shows in place of an `env` value.
const REDACTED: &str = "<redacted>";

/// Closed runs whose sums `GET /runs/{run_id}` still answers; past this, the oldest is
/// forgotten (about 300 bytes each: at most about 1.2 MB).
pub const CLOSED_RUNS_KEPT: usize = 4096;

/// What one run came to: its sandbox's wall and CPU time, its commands, timeouts and infra
/// failures. The model gateway's part is added by the caller.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunSums {
    pub run_id: String,
    /// `starting`, `running`, `closing`, `dead` (ended on its own or reaped, not closed yet;
    /// or forgotten dead), `closed`, or `failed` (its start failed for the infrastructure).
    pub state: &'static str,
    pub container_type: Option<&'static str>,
    /// When it started (seconds since the epoch).
    pub created_at: f64,
    /// When its sandbox ended: closed, died or reaped; `None` while it runs.
    pub ended_at: Option<f64>,
    /// From `created_at` to `ended_at`, or to now while it runs.
    pub wall_s: f64,
    /// CPU time of its sandbox's processes (docker, podman: their cgroup); `None` where the
    /// environment cannot tell.
    pub cpu_s: Option<f64>,
    pub commands: u64,
    /// Commands killed at their timeout (their own doing: not infra failures).
    pub timeouts: u64,
    /// Error answers about it with `infra: true`, and its sandbox's death when the health
    /// watch found it.
    pub infra_failures: u64,
    /// Why it died, was reaped, or failed to start.
    pub dead_reason: Option<String>,
    /// The `run_id` it was forked from (`/fork_instance`); `None` for a start.
    pub forked_from: Option<String>,
}

/// The sums of `instance`'s run now; `closing`: it is being closed, its state is `closed`
/// and its CPU time the last one read (the caller reads it before the sandbox goes).
pub(super) fn run_sums(instance: &Instance, closing: bool) -> RunSums {
    let now = epoch_now();
    let (state, dead_reason, dead_at) = match &*instance.lifecycle.lock() {
        Lifecycle::Dead { reason, since, .. } => (
            State::Dead,
            Some(reason.clone()),
            Some(now - since.elapsed().as_secs_f64()),
        ),
        lifecycle => (lifecycle.state(), None, None),
    };
    let counters = &instance.counters;
    let cpu_s = if state == State::Running && !closing {
        counters.note_cpu(instance.env.cpu_seconds())
    } else {
        counters.cpu_seconds()
    };
    let ended_at = dead_at.or(closing.then_some(now));
    RunSums {
        run_id: instance.run_id.to_string(),
        state: if closing { "closed" } else { state.name() },
        container_type: Some(instance.spec.kind.name()),
        created_at: instance.created_at,
        ended_at,
        wall_s: (ended_at.unwrap_or(now) - instance.created_at).max(0.0),
        cpu_s,
        commands: instance.activity.lock().num_cmd,
        timeouts: counters.timeouts(),
        infra_failures: counters.infra_failures(),
        dead_reason,
        forked_from: instance.forked_from.as_ref().map(ToString::to_string),
    }
}

/// The sums of the last [`CLOSED_RUNS_KEPT`] runs that ended: closed, forgotten dead, or
/// whose start failed for the infrastructure.
#[derive(Default)]
pub(super) struct ClosedRuns {
    runs: VecDeque<RunSums>,
    /// Runs forgotten past the bound.
    forgotten: u64,
}

impl ClosedRuns {
    pub(super) fn push(&mut self, sums: RunSums) {
        if self.runs.len() >= CLOSED_RUNS_KEPT {
            self.runs.pop_front();
            self.forgotten += 1;
        }
        self.runs.push_back(sums);
    }

    /// The latest sums of `run_id` (a `run_id` may be used again after a close).
    fn find(&self, run_id: &str) -> Option<&RunSums> {
        self.runs.iter().rev().find(|sums| sums.run_id == run_id)
    }

    /// `/stats`' `closed_runs`: how many are kept, and their sums, over those whose `run_id`
    /// contains `run_id_filter`.
    fn summary(&self, run_id_filter: Option<&str>) -> Value {
        let shown = self
            .runs
            .iter()
            .filter(|sums| run_id_filter.is_none_or(|needle| sums.run_id.contains(needle)));
        let (mut runs, mut wall_s, mut cpu_s, mut commands, mut timeouts, mut infra) =
            (0u64, 0.0, 0.0, 0u64, 0u64, 0u64);
        for sums in shown {
            runs += 1;
            wall_s += sums.wall_s;
            cpu_s += sums.cpu_s.unwrap_or(0.0);
            commands += sums.commands;
            timeouts += sums.timeouts;
            infra += sums.infra_failures;
        }
        json!({
            "runs": runs,
            "kept_at_most": CLOSED_RUNS_KEPT,
            "forgotten": self.forgotten,
            "wall_s": wall_s,
            "cpu_s": cpu_s,
            "commands": commands,
            "timeouts": timeouts,
            "infra_failures": infra,
        })
    }
}

impl Service {
    /// Counts an error answer about `run_id` when it is the infrastructure's fault: in the
    /// service's counter, and in its run's when it has an instance.
    pub(super) fn count_infra(&self, run_id: &RunId, error: &Error) {
        if !error.infra() {
            return;
        }
        self.metrics.infra_failures.fetch_add(1, Ordering::Relaxed);
        if let Some(Slot::Live(instance)) = self.table.lock().get(run_id) {
            instance
                .counters
                .infra_failures
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Keeps the sums of a run whose start failed for the infrastructure (its `run_id` then
    /// answers `GET /runs` with state `failed`).
    pub(super) fn record_failed_start(&self, run_id: &RunId, kind: Kind, error: &Error) {
        if !error.infra() {
            return;
        }
        let now = epoch_now();
        self.closed.lock().push(RunSums {
            run_id: run_id.to_string(),
            state: "failed",
            container_type: Some(kind.name()),
            created_at: now,
            ended_at: Some(now),
            wall_s: 0.0,
            cpu_s: None,
            commands: 0,
            timeouts: 0,
            infra_failures: 1,
            dead_reason: Some(error.to_string()),
            forked_from: None,
        });
    }

    /// The sums of `run_id`: its instance's (starting, running, closing or dead), else the
    /// latest among the closed runs kept.
    pub fn run_sums(&self, run_id: &RunId) -> Option<RunSums> {
        let slot = match self.table.lock().get(run_id) {
            Some(Slot::Live(instance)) => Some(Arc::clone(instance)),
            Some(Slot::Starting) => None,
            None => return self.closed.lock().find(run_id).cloned(),
        };
        Some(match slot {
            Some(instance) => run_sums(&instance, false),
            None => RunSums {
                run_id: run_id.to_string(),
                state: State::Starting.name(),
                container_type: None,
                created_at: epoch_now(),
                ended_at: None,
                wall_s: 0.0,
                cpu_s: None,
                commands: 0,
                timeouts: 0,
                infra_failures: 0,
                dead_reason: None,
                forked_from: None,
            },
        })
    }

    /// `GET /runs/{run_id}`: its sums with `model`, the gateway's part (`None`: the gateway is
    /// off). 404 when neither the service nor the gateway knows the run.
    pub fn run(&self, run_id: &RunId, model: Option<Value>) -> Result<Value, Error> {
        let known_to_gateway = model
            .as_ref()
            .is_some_and(|model| model["calls"].as_u64().unwrap_or(0) > 0);
        let sums = match self.run_sums(run_id) {
            Some(sums) => json!(sums),
            None if known_to_gateway => json!({"run_id": run_id.as_str(), "state": null}),
            None => return Err(Error::UnknownInstance(run_id.to_string())),
        };
        let mut answer = sums;
        answer["model"] = model.unwrap_or(Value::Null);
        Ok(answer)
    }
}

/// The service at one moment.
pub(super) struct Snapshot {
    server_time: f64,
    uptime_s: f64,
    started_at: f64,
    runner: &'static str,
    server_id: String,
    /// Every started instance (dead ones included), the oldest first.
    rows: Vec<Row>,
    /// `run_id`s taken by starts still under way.
    starting: usize,
    instances_started: u64,
    instances_reaped: u64,
    instances_adopted: u64,
    waiting_starts: usize,
    infra_failures: u64,
    forks: u64,
    forks_failed: u64,
    streamed_commands: u64,
    /// `closed_runs`, summed under the run_id filter of `/stats` when one is given.
    closed: Value,
    max: Resources,
    allocated: Resources,
    available: Resources,
}

/// One started instance at the snapshot's moment.
struct Row {
    instance: Arc<Instance>,
    state: State,
    dead_reason: Option<String>,
    activity: Activity,
    sums: RunSums,
    /// When it will be reaped, in seconds since the epoch; only while it runs.
    expires_at: Option<f64>,
}

impl Row {
    fn read(instance: Arc<Instance>, defaults: Timeouts) -> Row {
        let (state, dead_reason) = match &*instance.lifecycle.lock() {
            Lifecycle::Dead { reason, .. } => (State::Dead, Some(reason.clone())),
            lifecycle => (lifecycle.state(), None),
        };
        // Before `activity` is locked below: `expiry` locks it too.
        let expires_at = instance
            .expiry(defaults)
            .filter(|_| state == State::Running)
            .map(|(at, _)| {
                epoch_now() + at.saturating_duration_since(Instant::now()).as_secs_f64()
            });
        let activity = instance.activity.lock().clone();
        let sums = run_sums(&instance, false);
        Row {
            instance,
            state,
            dead_reason,
            activity,
            sums,
            expires_at,
        }
    }

    fn kind(&self) -> Kind {
        self.instance.spec.kind
    }

    /// The row of `/stats`, with the model gateway's usage of its `run_id` when there is one.
    fn json(&self, model: Option<&GatewayStats>) -> Value {
        let instance = &self.instance;
        let image = instance.container_image();
        let mut row = json!({
            "run_id": instance.run_id,
            "container_image": image,
            "container_name": instance.container_name.as_deref().unwrap_or(image),
            "container_type": self.kind().name(),
            "created_at": instance.created_at,
            "updated_at": self.activity.updated_at,
            "num_cmd": self.activity.num_cmd,
            "running_cmds": self.activity.running,
            "running_streams": self.activity.streaming,
            "forked_from": instance.forked_from,
            "state": self.state.name(),
            "expires_at": self.expires_at,
            "dead_reason": self.dead_reason,
            "environment_config": redacted(&instance.spec.raw),
            "adopted": instance.adopted,
            "wall_s": self.sums.wall_s,
            "cpu_s": self.sums.cpu_s,
            "commands_timed_out": self.sums.timeouts,
            "infra_failures": self.sums.infra_failures,
        });
        if let Value::Object(row) = &mut row {
            row.extend(instance.env.describe());
            if let Some(usage) = model.and_then(|model| model.of_run(&instance.run_id)) {
                row.insert("model".into(), json!(usage));
            }
        }
        row
    }
}

/// Which rows `/stats` lists: those whose `run_id` and image contain these.
#[derive(Clone, Copy, Default)]
pub(super) struct Filter<'a> {
    pub(super) run_id: Option<&'a str>,
    pub(super) container: Option<&'a str>,
}

impl Filter<'_> {
    fn admits(&self, row: &Row) -> bool {
        let instance = &row.instance;
        self.run_id
            .is_none_or(|needle| instance.run_id.contains(needle))
            && self
                .container
                .is_none_or(|needle| instance.container_image().contains(needle))
    }
}

impl Snapshot {
    /// `/stats`: the original's keys, plus `state`, `running_cmds`, `running_streams` and
    /// `forked_from` per instance; the filter narrows `instances`, `active_instances`,
    /// `container_counts` and the sums over them (`running_cmds`, `running_streams`). The model
    /// gateway's part, when it is on, adds `model`, `model_runs`, and `model` in each row
    /// whose `run_id` made calls.
    pub(super) fn json(&self, filter: Filter, model: Option<&GatewayStats>) -> Value {
        let shown: Vec<&Row> = self.rows.iter().filter(|row| filter.admits(row)).collect();
        let (running_cmds, running_streams) = running(shown.iter().copied());
        let mut container_counts: BTreeMap<&str, u64> = BTreeMap::new();
        for row in &shown {
            *container_counts
                .entry(row.instance.container_image())
                .or_default() += 1;
        }
        let mut stats = json!({
            "server_time": self.server_time,
            "uptime_s": self.uptime_s,
            "started_at": self.started_at,
            "runner": self.runner,
            "server_id": self.server_id,
            "active_instances": shown.len(),
            "total_instances": self.rows.len(),
            "starting_instances": self.starting,
            "instances_started": self.instances_started,
            "instances_reaped": self.instances_reaped,
            "instances_adopted": self.instances_adopted,
            "waiting_starts": self.waiting_starts,
            "infra_failures": self.infra_failures,
            "instances_forked": self.forks,
            "forks_failed": self.forks_failed,
            "streamed_commands": self.streamed_commands,
            "running_cmds": running_cmds,
            "running_streams": running_streams,
            "closed_runs": self.closed,
            "max_resources": resources_json(&self.max),
            "allocated_resources": resources_json(&self.allocated),
            "available_resources": resources_json(&self.available),
            "container_counts": container_counts,
            "instances": shown.iter().map(|row| row.json(model)).collect::<Vec<_>>(),
        });
        if let (Some(model), Value::Object(stats)) = (model, &mut stats) {
            if let Value::Object(part) = json!(model) {
                stats.extend(part);
            }
        }
        stats
    }

    /// `/metrics`: Prometheus text with the counters and histograms of `metrics`, and the
    /// gauges of this snapshot.
    pub(super) fn prometheus(&self, metrics: &Metrics) -> String {
        let mut out = String::new();
        metrics.render(&mut out);
        let mut by_type_state: BTreeMap<(&'static str, &'static str), u64> = BTreeMap::new();
        for row in &self.rows {
            *by_type_state
                .entry((row.kind().name(), row.state.name()))
                .or_default() += 1;
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
                ("state", State::Starting.name().into()),
            ],
            value: self.starting as f64,
        });
        let (running_cmds, running_streams) = running(self.rows.iter());
        let gauges: [(&str, &str, Vec<Sample>); 6] = [
            (
                "arservice_instances",
                "Instances by container type and state.",
                samples,
            ),
            (
                "arservice_resource_allocated",
                "Reserved amount of each enforced resource.",
                per_resource(&self.allocated),
            ),
            (
                "arservice_resource_max",
                "Maximum of each enforced resource (--max-resources).",
                per_resource(&self.max),
            ),
            (
                "arservice_waiting_starts",
                "Starts waiting for resources.",
                plain(self.waiting_starts as f64),
            ),
            (
                "arservice_commands_running",
                "Commands running now.",
                plain(running_cmds as f64),
            ),
            (
                "arservice_streams_running",
                "Commands running now whose output is streamed.",
                plain(running_streams as f64),
            ),
        ];
        for (name, help, samples) in gauges {
            family(&mut out, name, "gauge", help, &samples);
        }
        out
    }
}

/// Commands running, and of them those streamed, summed over `rows`.
fn running<'a>(rows: impl Iterator<Item = &'a Row>) -> (u64, u64) {
    rows.fold((0, 0), |(commands, streams), row| {
        (
            commands + u64::from(row.activity.running),
            streams + u64::from(row.activity.streaming),
        )
    })
}

/// One sample per resource, labelled with its key.
fn per_resource(resources: &Resources) -> Vec<Sample> {
    resources
        .iter()
        .map(|(key, amount)| Sample {
            labels: vec![("resource", key.clone())],
            value: amount.as_f64(),
        })
        .collect()
}

/// What `/stats` shows of an instance's config: everything but the values of `env`, which may
/// be secrets (tokens, passwords); their names stay.
fn redacted(raw: &Map<String, Value>) -> Value {
    let mut shown = raw.clone();
    if let Some(Value::Object(env)) = shown.get_mut("env") {
        for value in env.values_mut() {
            *value = Value::from(REDACTED);
        }
    }
    Value::Object(shown)
}

/// What a [`Snapshot`] reads: the service's table, counters and ledger, and what it was
/// configured with.
pub(super) struct Sources<'a> {
    pub(super) table: &'a Mutex<HashMap<RunId, Slot>>,
    pub(super) metrics: &'a Metrics,
    pub(super) ledger: &'a Ledger,
    pub(super) closed: &'a Mutex<ClosedRuns>,
    /// The `run_id` filter of `/stats`, for `closed_runs`.
    pub(super) run_id_filter: Option<&'a str>,
    pub(super) runner: &'static str,
    pub(super) server_id: &'a str,
    pub(super) started_at: f64,
    pub(super) started: Instant,
    pub(super) defaults: Timeouts,
}

impl Snapshot {
    /// The table (under one lock), the counters and the ledger, now.
    pub(super) fn take(sources: Sources) -> Snapshot {
        let (instances, starting) = {
            let table = sources.table.lock();
            let mut instances = Vec::with_capacity(table.len());
            let mut starting = 0;
            for slot in table.values() {
                match slot {
                    Slot::Live(instance) => instances.push(Arc::clone(instance)),
                    Slot::Starting => starting += 1,
                }
            }
            (instances, starting)
        };
        let mut rows: Vec<Row> = instances
            .into_iter()
            .map(|instance| Row::read(instance, sources.defaults))
            .collect();
        rows.sort_by(|a, b| a.instance.created_at.total_cmp(&b.instance.created_at));
        let counter = |value: &AtomicU64| value.load(Ordering::Relaxed);
        let (metrics, ledger) = (sources.metrics, sources.ledger);
        Snapshot {
            server_time: epoch_now(),
            uptime_s: sources.started.elapsed().as_secs_f64(),
            started_at: sources.started_at,
            runner: sources.runner,
            server_id: sources.server_id.to_string(),
            rows,
            starting,
            instances_started: counter(&metrics.instances_started),
            instances_reaped: counter(&metrics.instances_reaped),
            instances_adopted: counter(&metrics.instances_adopted),
            waiting_starts: ledger.waiting(),
            infra_failures: counter(&metrics.infra_failures),
            forks: counter(&metrics.forks),
            forks_failed: counter(&metrics.forks_failed),
            streamed_commands: counter(&metrics.streamed_commands),
            closed: sources.closed.lock().summary(sources.run_id_filter),
            max: ledger.max().clone(),
            allocated: ledger.allocated(),
            available: ledger.available(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(run_id: &str, commands: u64) -> RunSums {
        RunSums {
            run_id: run_id.into(),
            state: "closed",
            container_type: Some("local"),
            created_at: 1.0,
            ended_at: Some(3.0),
            wall_s: 2.0,
            cpu_s: None,
            commands,
            timeouts: 0,
            infra_failures: 0,
            dead_reason: None,
            forked_from: None,
        }
    }

    #[test]
    fn closed_runs_are_bounded_and_the_latest_of_a_run_id_answers() {
        let mut runs = ClosedRuns::default();
        runs.push(closed("r0", 1));
        runs.push(closed("r0", 2));
        assert_eq!(
            runs.find("r0").unwrap().commands,
            2,
            "the latest run of a run_id"
        );
        for index in 1..CLOSED_RUNS_KEPT {
            runs.push(closed(&format!("r{index}"), 0));
        }
        assert_eq!(runs.runs.len(), CLOSED_RUNS_KEPT);
        assert_eq!(runs.forgotten, 1, "the oldest went");
        assert_eq!(runs.find("r0").unwrap().commands, 2);
        runs.push(closed("new", 0));
        assert!(
            runs.find("r0").is_none(),
            "both runs of r0 are forgotten now"
        );
        assert_eq!(runs.runs.len(), CLOSED_RUNS_KEPT);
        let summary = runs.summary(Some("new"));
        assert_eq!(summary["runs"], 1);
        assert_eq!(summary["forgotten"], 2);
        assert_eq!(summary["wall_s"], 2.0);
    }

    #[test]
    fn env_values_are_redacted_their_names_kept() {
        let raw = json!({"image": "x", "env": {"TOKEN": "secret", "N": "1"}});
        let shown = redacted(raw.as_object().unwrap());
        assert_eq!(shown["env"], json!({"TOKEN": REDACTED, "N": REDACTED}));
        assert_eq!(shown["image"], "x");
    }
}
