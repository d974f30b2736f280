//! Every counter and latency histogram of the service, and the Prometheus text format.
//!
//! Owns only numbers: the service bumps them, `/stats` shows some, `/metrics` renders them
//! all with the gauges of the service's snapshot (`service/stats.rs`). Lock-free (atomics) so
//! that counting never waits behind anything.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the start latency buckets: a local start takes milliseconds, an
/// image pull or a queued Slurm job minutes.
const START_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0,
];

/// Upper bounds (seconds) of the command latency buckets.
const EXEC_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0,
];

/// A cumulative histogram with fixed buckets.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(index) = self.bounds.iter().position(|&bound| seconds <= bound) {
            self.counts[index].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
        );
    }
}

/// Everything the service counts.
pub struct Metrics {
    /// Instances started by `/start_instance`.
    pub instances_started: AtomicU64,
    /// Instances closed by the server for their `ttl` or `idle_timeout`.
    pub instances_reaped: AtomicU64,
    /// Instances taken over from the journal of an earlier life.
    pub instances_adopted: AtomicU64,
    pub commands: AtomicU64,
    pub commands_timed_out: AtomicU64,
    pub commands_failed: AtomicU64,
    pub starts_failed: AtomicU64,
    pub instances_died: AtomicU64,
    /// Error answers whose fault is the infrastructure's (`infra: true`) about an instance,
    /// and sandbox deaths the health watch found.
    pub infra_failures: AtomicU64,
    /// Instances made by `/fork_instance` (they count among `instances_started` too).
    pub forks: AtomicU64,
    /// Forks whose copy, start or record failed for the infrastructure (`infra: true`).
    pub forks_failed: AtomicU64,
    /// Commands run with `"stream": true`, counted when they start.
    pub streamed_commands: AtomicU64,
    pub start_seconds: Histogram,
    pub exec_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            instances_started: AtomicU64::new(0),
            instances_reaped: AtomicU64::new(0),
            instances_adopted: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            commands_timed_out: AtomicU64::new(0),
            commands_failed: AtomicU64::new(0),
            starts_failed: AtomicU64::new(0),
            instances_died: AtomicU64::new(0),
            infra_failures: AtomicU64::new(0),
            forks: AtomicU64::new(0),
            forks_failed: AtomicU64::new(0),
            streamed_commands: AtomicU64::new(0),
            start_seconds: Histogram::new(&START_BUCKETS),
            exec_seconds: Histogram::new(&EXEC_BUCKETS),
        }
    }
}

/// What one run met, counted as it happens (its commands are its instance's `num_cmd`):
/// `GET /runs/{run_id}` and its row of `/stats` show them.
#[derive(Debug, Default)]
pub struct RunCounters {
    /// Commands killed at their timeout (answered 200: the command's own doing).
    pub timeouts: AtomicU64,
    /// Error answers with `infra: true` about the run, and its sandbox's death when the
    /// health watch found it.
    pub infra_failures: AtomicU64,
    /// The last CPU time read of its sandbox in microseconds, plus one (0: never read).
    cpu_micros_plus_one: AtomicU64,
}

impl RunCounters {
    /// Keeps a reading of the sandbox's CPU time (none: the last one stays), and answers
    /// the latest known.
    pub fn note_cpu(&self, seconds: Option<f64>) -> Option<f64> {
        if let Some(seconds) = seconds {
            let micros = (seconds.max(0.0) * 1e6) as u64;
            self.cpu_micros_plus_one
                .fetch_max(micros.saturating_add(1), Ordering::Relaxed);
        }
        self.cpu_seconds()
    }

    /// The last CPU time read, in seconds; `None` when it was never read.
    pub fn cpu_seconds(&self) -> Option<f64> {
        match self.cpu_micros_plus_one.load(Ordering::Relaxed) {
            0 => None,
            plus_one => Some((plus_one - 1) as f64 / 1e6),
        }
    }

    pub fn timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }

    pub fn infra_failures(&self) -> u64 {
        self.infra_failures.load(Ordering::Relaxed)
    }
}

/// One labelled sample of a gauge or counter.
pub struct Sample {
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// Writes one metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[Sample]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for sample in samples {
        let labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(key, value)| format!("{key}=\"{}\"", escape(value)))
            .collect();
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {}", sample.value);
        } else {
            let _ = writeln!(out, "{name}{{{}}} {}", labels.join(","), sample.value);
        }
    }
}

/// A sample without labels.
pub fn plain(value: f64) -> Vec<Sample> {
    vec![Sample {
        labels: Vec::new(),
        value,
    }]
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// The counters and histograms (the service's snapshot adds its gauges).
    pub fn render(&self, out: &mut String) {
        let counter = |out: &mut String, name: &str, help: &str, value: &AtomicU64| {
            family(
                out,
                name,
                "counter",
                help,
                &plain(value.load(Ordering::Relaxed) as f64),
            );
        };
        counter(
            out,
            "arservice_commands_total",
            "Commands run.",
            &self.commands,
        );
        counter(
            out,
            "arservice_commands_timed_out_total",
            "Commands killed at their timeout.",
            &self.commands_timed_out,
        );
        counter(
            out,
            "arservice_commands_failed_total",
            "Commands the environment failed to run (500).",
            &self.commands_failed,
        );
        counter(
            out,
            "arservice_start_failures_total",
            "Starts the environment failed (500).",
            &self.starts_failed,
        );
        counter(
            out,
            "arservice_instances_died_total",
            "Instances whose sandbox ended on its own.",
            &self.instances_died,
        );
        counter(
            out,
            "arservice_infra_failures_total",
            "Failures of the infrastructure (container, job, agent, engine) met by a run.",
            &self.infra_failures,
        );
        self.start_seconds
            .render(out, "arservice_start_seconds", "Time to start an instance.");
        self.exec_seconds.render(
            out,
            "arservice_exec_seconds",
            "Time to run a command, as the server saw it.",
        );
        counter(
            out,
            "arservice_instances_started_total",
            "Instances started.",
            &self.instances_started,
        );
        counter(
            out,
            "arservice_instances_reaped_total",
            "Instances closed for their ttl or idle_timeout.",
            &self.instances_reaped,
        );
        counter(
            out,
            "arservice_instances_adopted_total",
            "Instances taken over from the journal of an earlier life after a crash.",
            &self.instances_adopted,
        );
        counter(
            out,
            "arservice_forks_total",
            "Instances made by forking a running one.",
            &self.forks,
        );
        counter(
            out,
            "arservice_fork_failures_total",
            "Forks whose copy, start or record failed for the infrastructure.",
            &self.forks_failed,
        );
        counter(
            out,
            "arservice_streamed_commands_total",
            "Commands run with their output streamed, counted when they start.",
            &self.streamed_commands,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let histogram = Histogram::new(&[0.1, 1.0]);
        for millis in [50, 500, 500, 5000] {
            histogram.observe(Duration::from_millis(millis));
        }
        let mut out = String::new();
        histogram.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 6.05\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }

    #[test]
    fn cpu_time_keeps_the_latest_reading() {
        let counters = RunCounters::default();
        assert_eq!(counters.note_cpu(None), None, "never read");
        assert_eq!(counters.note_cpu(Some(0.0)), Some(0.0), "zero is a reading");
        assert_eq!(counters.note_cpu(Some(1.5)), Some(1.5));
        assert_eq!(
            counters.note_cpu(None),
            Some(1.5),
            "a failed read keeps the last"
        );
        assert_eq!(
            counters.note_cpu(Some(1.0)),
            Some(1.5),
            "CPU time never goes back"
        );
    }

    #[test]
    fn labels_are_escaped() {
        let mut out = String::new();
        family(
            &mut out,
            "m",
            "gauge",
            "h",
            &[Sample {
                labels: vec![("image", "a\"b\\c".into())],
                value: 2.0,
            }],
        );
        assert!(out.ends_with("m{image=\"a\\\"b\\\\c\"} 2\n"), "{out}");
    }
}
