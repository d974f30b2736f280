//! Crash recovery at start-up: adopting the instances the journal of an earlier life
//! recorded, then sweeping away everything else that life left.
//!
//! Runs once, before the server answers: [`Service::adopt_journal`] first, then
//! [`Service::sweep_leftovers`] with the `run_id`s it adopted.

use super::instance::{epoch_now, Instance, Slot};
use super::{Service, PARALLELISM};
use crate::env::{EnvSpec, Environment};
use crate::journal::Record;
use crate::run_id::RunId;
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A sandbox of an earlier life, taken over, with its parsed config; or why not.
type Reached = Result<(EnvSpec, Box<dyn Environment>), String>;

/// Closes a sandbox that is not kept, logging a failure.
fn close_quietly(run_id: &RunId, env: &dyn Environment) {
    if let Err(err) = env.close() {
        log::warn!("closing {run_id} of an earlier life: {err}");
    }
}

impl Service {
    /// At start-up, before the leftover sweep: takes over every instance the journal of an
    /// earlier life recorded whose sandbox still runs and whose resources still fit (the
    /// oldest first), and idle pooled sandboxes back into their pools while they fit; forgets
    /// the rest (the sweep then removes them). Returns the names of the adopted sandboxes.
    pub fn adopt_journal(&self) -> Vec<RunId> {
        let mut records = self.settings.journal.load();
        // A crash between a take's two journal writes leaves the run's record and its
        // sandbox's pool record: the sandbox is the run's.
        let taken: Vec<RunId> = records
            .iter()
            .filter_map(|record| record.sandbox.clone())
            .collect();
        records.retain(|record| {
            let stale = record.pool.is_some() && taken.contains(&record.run_id);
            if stale {
                self.settings.journal.remove(&record.run_id);
            }
            !stale
        });
        // Reaching a sandbox costs a CLI call or a request: reach them all in parallel...
        let queue = Mutex::new((0..records.len()).collect::<Vec<_>>());
        let reached: Vec<Mutex<Option<Reached>>> =
            records.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|scope| {
            for _ in 0..PARALLELISM.min(records.len()) {
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
        let mut members = 0;
        for (record, reached) in records.into_iter().zip(reached) {
            let run_id = record.run_id.clone();
            let sandbox = record.sandbox().clone();
            let reached = reached
                .into_inner()
                .unwrap_or_else(|| Err("it was never reached".into()));
            let outcome = if record.pool.is_some() {
                reached.and_then(|(_, env)| {
                    self.adopt_member(&record, env).map_err(|(env, why)| {
                        close_quietly(&run_id, &*env);
                        why
                    })
                })
            } else {
                reached.and_then(|(spec, env)| self.keep_adopted(record, spec, env))
            };
            match outcome {
                Ok(()) if run_id.is_pool_member() => {
                    members += 1;
                    adopted.push(sandbox);
                }
                Ok(()) => adopted.push(sandbox),
                Err(why) => {
                    log::warn!("not adopting {run_id} of an earlier life: {why}");
                    self.settings.journal.remove(&run_id);
                }
            }
        }
        if !adopted.is_empty() {
            let names: Vec<&str> = adopted.iter().map(RunId::as_str).collect();
            log::warn!(
                "adopted {} instance(s) and {members} pooled sandbox(es) of an earlier life: {}",
                adopted.len() - members,
                names.join(" ")
            );
        }
        adopted
    }

    /// Takes over the sandbox of one record: it must be of this runner, answer, and be
    /// healthy. (Its `run_id` was validated when the journal read it.)
    fn reach(&self, record: &Record) -> Reached {
        if record.runner != self.runner.name() {
            return Err(format!(
                "it ran under the {} runner, this server is {}",
                record.runner,
                self.runner.name()
            ));
        }
        let mut spec = EnvSpec::parse(record.config.clone(), record.container_name.as_deref())?;
        spec.client_executable = record.client_executable;
        let env = self
            .runner
            .adopt(&spec, &self.context(record.sandbox()), &record.handle.0)
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
        let sandbox = record.sandbox().clone();
        let age = Duration::from_secs_f64((epoch_now() - record.created_at).max(0.0));
        let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let mut instance = Instance::running(
            record.run_id.clone(),
            record.container_name,
            spec,
            (record.created_at, started),
            env,
            reservation,
            true,
        )
        .on_sandbox(sandbox);
        instance.forked_from = record.forked_from;
        let instance = Arc::new(instance);
        self.table
            .lock()
            .insert(record.run_id, Slot::Live(instance));
        self.metrics
            .instances_adopted
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// At start-up, after [`Service::adopt_journal`]: sweeps away everything an earlier life
    /// left but the `adopted` sandboxes (by name): sandboxes outside the state dir (through
    /// the runner), then instance and agent directories.
    pub fn sweep_leftovers(&self, adopted: &[RunId]) {
        self.runner
            .sweep_leftovers(&self.settings.server_id, &self.settings.state_dir, adopted);
        let mut kept: Vec<PathBuf> = Vec::new();
        for run_id in adopted {
            let context = self.context(run_id);
            kept.push(crate::env::agent::AgentMount::dir_of(&context));
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
}
