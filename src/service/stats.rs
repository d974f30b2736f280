//! What the service shows of itself: one [`Snapshot`] of the table, the counters and the
//! ledger, rendered as the `/stats` JSON and as the Prometheus text of `/metrics`.
//!
//! The snapshot takes the table lock once (the rows and the starting count come from the
//! same moment), then reads each instance under its own locks; rendering holds no lock and
//! reads only what never changes (an instance's config, its sandbox's description).

use super::instance::{epoch_now, Activity, Instance, Lifecycle, Slot, State, Timeouts};
use crate::env::Kind;
use crate::gateway::GatewayStats;
use crate::ledger::{resources_json, Ledger, Resources};
use crate::metrics::{family, plain, Metrics, Sample};
use crate::run_id::RunId;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
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
        Row {
            instance,
            state,
            dead_reason,
            activity,
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
            "state": self.state.name(),
            "expires_at": self.expires_at,
            "dead_reason": self.dead_reason,
            "environment_config": redacted(&instance.spec.raw),
            "adopted": instance.adopted,
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
    /// `/stats`: the original's keys, plus `state` and `running_cmds` per instance; the
    /// filter narrows `instances`, `active_instances` and `container_counts`. The model
    /// gateway's part, when it is on, adds `model`, `model_runs`, and `model` in each row
    /// whose `run_id` made calls.
    pub(super) fn json(&self, filter: Filter, model: Option<&GatewayStats>) -> Value {
        let shown: Vec<&Row> = self.rows.iter().filter(|row| filter.admits(row)).collect();
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
        let gauges: [(&str, &str, Vec<Sample>); 4] = [
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
        ];
        for (name, help, samples) in gauges {
            family(&mut out, name, "gauge", help, &samples);
        }
        out
    }
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
            max: ledger.max().clone(),
            allocated: ledger.allocated(),
            available: ledger.available(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_are_redacted_their_names_kept() {
        let raw = json!({"image": "x", "env": {"TOKEN": "secret", "N": "1"}});
        let shown = redacted(raw.as_object().unwrap());
        assert_eq!(shown["env"], json!({"TOKEN": REDACTED, "N": REDACTED}));
        assert_eq!(shown["image"], "x");
    }
}
