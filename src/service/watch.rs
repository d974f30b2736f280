//! The watch: one background loop, until shutdown, that reaps instances past their `ttl` or
//! `idle_timeout`, runs a health round every health interval (asking every running sandbox
//! whether it still lives, and sweeping away sandboxes no instance tracks), and forgets dead
//! rows after [`DEAD_RETENTION`].

use super::instance::{Instance, Lifecycle, Slot, State};
use super::Service;
use crate::run_id::RunId;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a dead instance stays listed (answering 410) when nobody closes it.
const DEAD_RETENTION: Duration = Duration::from_secs(3600);

/// The longest pause between two expiry checks.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

impl Service {
    /// Until shutdown: reaps expired instances (checked every second), runs a health round
    /// every `interval` (a sandbox that died on its own is noticed even when nobody sends it
    /// a command), and forgets dead rows after [`DEAD_RETENTION`].
    pub fn watch(&self, interval: Duration) {
        let mut last_round = Instant::now();
        while !self.is_shutting_down() {
            std::thread::sleep(interval.min(EXPIRY_TICK));
            let instances = self.live_instances();
            let health_round = last_round.elapsed() >= interval;
            if health_round {
                last_round = Instant::now();
                self.sweep_untracked();
            }
            for instance in instances {
                self.watch_one(&instance, health_round);
            }
        }
    }

    /// Asks the runner to sweep away sandboxes of this server that no row tracks; dead rows
    /// are not tracked, so what is left of their sandbox may go.
    fn sweep_untracked(&self) {
        self.runner
            .sweep_untracked(&self.settings.server_id, &|| self.tracked());
    }

    /// The `run_id`s whose sandbox may exist: starting and live rows, not dead ones.
    pub(super) fn tracked(&self) -> Vec<RunId> {
        self.table
            .lock()
            .iter()
            .filter(|(_, slot)| slot.state() != State::Dead)
            .map(|(run_id, _)| run_id.clone())
            .collect()
    }

    /// Reaps `instance` when it expired, else marks it dead when a health round finds its
    /// sandbox gone; forgets it when it has been dead long enough.
    pub(super) fn watch_one(&self, instance: &Arc<Instance>, health_round: bool) {
        let lifecycle = instance.lifecycle.lock().clone();
        match lifecycle {
            Lifecycle::Running => {
                let expired = instance
                    .expiry(self.default_timeouts())
                    .filter(|(at, _)| *at <= Instant::now());
                if let Some((_, why)) = expired {
                    self.metrics
                        .instances_reaped
                        .fetch_add(1, Ordering::Relaxed);
                    self.mark_dead(instance, format!("reaped: {why}"));
                } else if health_round {
                    if let Some(reason) = instance.env.health() {
                        self.metrics.instances_died.fetch_add(1, Ordering::Relaxed);
                        self.mark_dead(instance, reason);
                    }
                }
            }
            Lifecycle::Dead { since, .. } if since.elapsed() > DEAD_RETENTION => {
                self.forget(instance)
            }
            Lifecycle::Dead { .. } | Lifecycle::Closing => {}
        }
    }

    /// Removes the row of `instance` (dead for long enough), unless its `run_id` was reused.
    fn forget(&self, instance: &Arc<Instance>) {
        let mut table = self.table.lock();
        let same = matches!(table.get(&instance.run_id), Some(Slot::Live(live)) if Arc::ptr_eq(live, instance));
        if same {
            table.remove(&instance.run_id);
        }
    }
}
