//! The watch: one background loop, until shutdown, that reaps instances past their `ttl` or
//! `idle_timeout`, runs a health round every health interval (asking every running sandbox
//! whether it still lives, sweeping away sandboxes no instance tracks, and removing journal
//! records whose removal failed), and forgets dead rows after [`DEAD_RETENTION`].

use super::instance::{Death, Instance, Lifecycle, Slot, State};
use super::Service;
use crate::run_id::RunId;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a dead instance stays listed (answering 410) when nobody closes it.
const DEAD_RETENTION: Duration = Duration::from_secs(3600);

/// The longest pause between two expiry checks.
const EXPIRY_TICK: Duration = Duration::from_secs(1);

/// How many sandboxes a health round asks at once. A health check can take seconds (a Slurm
/// node that drops packets answers a probe only with its 2 s timeout; an engine that hangs,
/// its tool timeout): asked one after another, 100 instances on one dead node held a round
/// for 200 s, and every other instance's death went unnoticed that long.
const HEALTH_THREADS: usize = 16;

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
                self.check_pools();
                self.sweep_untracked();
                self.settings.journal.retry_removals();
            }
            if health_round {
                in_parallel(&instances, HEALTH_THREADS, |instance| {
                    self.watch_one(instance, true)
                });
            } else {
                for instance in &instances {
                    self.watch_one(instance, false);
                }
            }
        }
    }

    /// Asks the runner to sweep away sandboxes of this server that no row tracks; dead rows
    /// are not tracked, so what is left of their sandbox may go.
    fn sweep_untracked(&self) {
        self.runner
            .sweep_untracked(&self.settings.server_id, &|| self.tracked());
    }

    /// The sandbox names that may exist: pooled sandboxes, starting and live rows (a live
    /// row's sandbox may have its pool name), not dead ones. The pools are read first: a
    /// sandbox taken from a pool is listed in the table before it leaves the pool's list.
    pub(super) fn tracked(&self) -> Vec<RunId> {
        let mut names = self.pools.tracked();
        names.extend(
            self.table
                .lock()
                .iter()
                .filter(|(_, slot)| slot.state() != State::Dead)
                .map(|(run_id, slot)| match slot {
                    Slot::Live(instance) => instance.sandbox.clone(),
                    Slot::Starting => run_id.clone(),
                }),
        );
        names
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
                    self.mark_dead(instance, format!("reaped: {why}"), Death::Reaped);
                } else if health_round {
                    if let Some(reason) = instance.env.health() {
                        self.metrics.instances_died.fetch_add(1, Ordering::Relaxed);
                        self.mark_dead(instance, reason, Death::FoundByWatch);
                    }
                }
            }
            Lifecycle::Dead { since, .. } if since.elapsed() > DEAD_RETENTION => {
                self.forget(instance)
            }
            Lifecycle::Dead { .. } | Lifecycle::Closing => {}
        }
    }

    /// Removes the row of `instance` (dead for long enough), unless its `run_id` was reused;
    /// its run's sums go to the closed runs kept.
    fn forget(&self, instance: &Arc<Instance>) {
        let mut table = self.table.lock();
        let same = matches!(table.get(&instance.run_id), Some(Slot::Live(live)) if Arc::ptr_eq(live, instance));
        if same {
            table.remove(&instance.run_id);
            drop(table);
            self.closed
                .lock()
                .push(super::stats::run_sums(instance, false));
        }
    }
}

/// Calls `work` on every item, on at most `threads` threads at once, each taking the next item
/// as it becomes free (one slow item holds up only its own thread); returns when all are done.
fn in_parallel<T: Sync>(items: &[T], threads: usize, work: impl Fn(&T) + Sync) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let worker = || {
        while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
            work(item);
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads.min(items.len()) {
            scope.spawn(worker);
        }
        worker();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_health_round_asks_slow_sandboxes_at_once_and_every_one_exactly_once() {
        let asked: Vec<std::sync::atomic::AtomicU32> = (0..40)
            .map(|_| std::sync::atomic::AtomicU32::new(0))
            .collect();
        let started = Instant::now();
        // 40 checks of 200 ms each: 8 s one after another, 0.6 s on 16 threads.
        in_parallel(&asked, HEALTH_THREADS, |count| {
            std::thread::sleep(Duration::from_millis(200));
            count.fetch_add(1, Ordering::SeqCst);
        });
        let took = started.elapsed();
        assert!(asked.iter().all(|count| count.load(Ordering::SeqCst) == 1));
        assert!(took < Duration::from_secs(4), "the round took {took:?}");
        // No item, and one item, take no extra thread and still run.
        in_parallel(&[] as &[u8], HEALTH_THREADS, |_| panic!("nothing to ask"));
        let one = std::sync::atomic::AtomicU32::new(0);
        in_parallel(std::slice::from_ref(&one), HEALTH_THREADS, |count| {
            count.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(one.load(Ordering::SeqCst), 1);
    }
}
