//! One row of the instance table: a [`Slot`] that is starting or holds a started
//! [`Instance`], whose life is a [`Lifecycle`] matched as an enum, and its command activity.
//!
//! Owns the transitions (running → closing → gone, running → dead) and the expiry rule
//! (`ttl`, `idle_timeout`); the service decides when to make them and what follows (closing
//! the sandbox, freeing the reservation, removing the journal record).

use crate::env::{EnvSpec, Environment};
use crate::ledger::Reservation;
use crate::metrics::RunCounters;
use crate::run_id::RunId;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds since the epoch, as the API reports times.
pub fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or(0.0)
}

/// Where a `run_id` of the table is, as `/stats`, `/metrics` and a 409 name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    Starting,
    Running,
    Closing,
    Dead,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Closing => "closing",
            State::Dead => "dead",
        }
    }
}

/// One row of the table.
pub(super) enum Slot {
    /// `/start_instance` is bringing it up; the `run_id` is taken.
    Starting,
    Live(Arc<Instance>),
}

impl Slot {
    pub(super) fn state(&self) -> State {
        match self {
            Slot::Starting => State::Starting,
            Slot::Live(instance) => instance.state(),
        }
    }
}

/// Where a started instance is in its life.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Lifecycle {
    Running,
    /// A close began; commands are refused from then on.
    Closing,
    /// It ended on its own or was reaped; its resources are free, commands answer 410 with
    /// the reason. The watch forgets the row after a while unless it is closed before.
    Dead {
        reason: String,
        since: Instant,
        /// Closed by the server for its `ttl` or `idle_timeout` (not the infrastructure's
        /// fault), rather than ended on its own.
        reaped: bool,
    },
}

impl Lifecycle {
    pub(super) fn state(&self) -> State {
        match self {
            Lifecycle::Running => State::Running,
            Lifecycle::Closing => State::Closing,
            Lifecycle::Dead { .. } => State::Dead,
        }
    }

    /// Running or dead → closing; returns what it was, for [`Lifecycle::restore`] when the
    /// close fails. `Err`: a close is already under way.
    pub(super) fn begin_close(&mut self) -> Result<Lifecycle, State> {
        if *self == Lifecycle::Closing {
            return Err(State::Closing);
        }
        Ok(std::mem::replace(self, Lifecycle::Closing))
    }

    /// Closing → what it was before a close that failed (so that a retried close can finish).
    pub(super) fn restore(&mut self, before: Lifecycle) {
        *self = before;
    }

    /// Running → dead (`reaped`: for its `ttl` or `idle_timeout`); `false` (and no change)
    /// from any other state.
    pub(super) fn die(&mut self, reason: String, reaped: bool) -> bool {
        if *self != Lifecycle::Running {
            return false;
        }
        *self = Lifecycle::Dead {
            reason,
            since: Instant::now(),
            reaped,
        };
        true
    }
}

/// How an instance's end without a close came to be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Death {
    /// The server closed it for its `ttl` or `idle_timeout`.
    Reaped,
    /// A command found its sandbox gone (the command's error answer counts as the run's infra
    /// failure).
    FoundByCommand,
    /// The health watch found its sandbox gone: the run's infra failure, though nobody was
    /// answered an error.
    FoundByWatch,
}

/// A command refused by the instance's state.
#[derive(Debug, PartialEq)]
pub(super) enum Refused {
    /// A close is under way (409).
    Closing,
    /// It ended on its own, for this reason (410).
    Dead(String),
    /// It was reaped for its `ttl` or `idle_timeout`, for this reason (410).
    Reaped(String),
}

/// A started instance.
pub(super) struct Instance {
    pub(super) run_id: RunId,
    /// The name of its sandbox (container, directories, processes): the `run_id`, or the
    /// pool name of a sandbox taken from a pool.
    pub(super) sandbox: RunId,
    pub(super) container_name: Option<String>,
    pub(super) spec: EnvSpec,
    pub(super) created_at: f64,
    pub(super) started: Instant,
    pub(super) activity: Mutex<Activity>,
    pub(super) lifecycle: Mutex<Lifecycle>,
    pub(super) env: Box<dyn Environment>,
    /// Held until the instance is closed or dies.
    pub(super) reservation: Mutex<Option<Reservation>>,
    /// Taken over from an earlier life of the server after a crash.
    pub(super) adopted: bool,
    /// Its timeouts, infra failures and CPU time, for its run's sums.
    pub(super) counters: RunCounters,
    /// The `run_id` it was forked from (`/fork_instance`); `None` for a start.
    pub(super) forked_from: Option<RunId>,
}

/// What an instance has run.
#[derive(Clone, Debug)]
pub(super) struct Activity {
    pub(super) updated_at: Option<f64>,
    /// When the last command started or ended (for `idle_timeout`).
    pub(super) last_active: Instant,
    pub(super) num_cmd: u64,
    pub(super) running: u32,
    /// Of the `running`, those whose output is streamed (`"stream": true`).
    pub(super) streaming: u32,
}

/// The `ttl` and `idle_timeout` an instance gets when its config names none.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Timeouts {
    pub(super) ttl: Option<Duration>,
    pub(super) idle_timeout: Option<Duration>,
}

impl Instance {
    /// A running instance that has run no command yet; `started` is when its life began, in
    /// seconds since the epoch (for the API) and as an `Instant` (for its `ttl`).
    pub(super) fn running(
        run_id: RunId,
        container_name: Option<String>,
        spec: EnvSpec,
        started: (f64, Instant),
        env: Box<dyn Environment>,
        reservation: Reservation,
        adopted: bool,
    ) -> Instance {
        Instance {
            sandbox: run_id.clone(),
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
                streaming: 0,
            }),
            lifecycle: Mutex::new(Lifecycle::Running),
            env,
            reservation: Mutex::new(Some(reservation)),
            adopted,
            counters: RunCounters::default(),
            forked_from: None,
        }
    }

    /// The same instance on a sandbox taken from a pool, which keeps its pool name.
    pub(super) fn on_sandbox(mut self, sandbox: RunId) -> Instance {
        self.sandbox = sandbox;
        self
    }

    /// The same instance, made by forking `source`.
    pub(super) fn forked_from(mut self, source: RunId) -> Instance {
        self.forked_from = Some(source);
        self
    }

    /// Whether its sandbox came from a pool.
    pub(super) fn pooled(&self) -> bool {
        self.sandbox != self.run_id
    }

    /// The image `/stats` shows: the config's, else the container name, else the kind.
    pub(super) fn container_image(&self) -> &str {
        if self.spec.image.is_empty() {
            self.container_name
                .as_deref()
                .unwrap_or(self.spec.kind.name())
        } else {
            &self.spec.image
        }
    }

    pub(super) fn state(&self) -> State {
        self.lifecycle.lock().state()
    }

    /// `Ok` when a command may run now.
    pub(super) fn runnable(&self) -> Result<(), Refused> {
        match &*self.lifecycle.lock() {
            Lifecycle::Running => Ok(()),
            Lifecycle::Closing => Err(Refused::Closing),
            Lifecycle::Dead {
                reason,
                reaped: true,
                ..
            } => Err(Refused::Reaped(reason.clone())),
            Lifecycle::Dead { reason, .. } => Err(Refused::Dead(reason.clone())),
        }
    }

    /// Marks the instance active now (a file transfer: not a command, but not idle either).
    pub(super) fn touch(&self) {
        let mut activity = self.activity.lock();
        activity.updated_at = Some(epoch_now());
        activity.last_active = Instant::now();
    }

    /// Counts a command as running (`streamed`: and as streaming) until the returned guard
    /// drops; under the one lock of its activity, nothing more.
    pub(super) fn begin_command(&self, streamed: bool) -> RunningCommand<'_> {
        let mut activity = self.activity.lock();
        activity.num_cmd += 1;
        activity.updated_at = Some(epoch_now());
        activity.last_active = Instant::now();
        activity.running += 1;
        activity.streaming += u32::from(streamed);
        RunningCommand {
            instance: self,
            streamed,
        }
    }

    /// When the instance expires and why: the earlier of its `ttl` from start and its
    /// `idle_timeout` from the last command (never while a command runs).
    pub(super) fn expiry(&self, defaults: Timeouts) -> Option<(Instant, String)> {
        let ttl = self.spec.ttl.or(defaults.ttl);
        let idle = self.spec.idle_timeout.or(defaults.idle_timeout);
        let by_ttl = ttl.map(|ttl| {
            (
                self.started + ttl,
                format!("its ttl of {} s ran out", ttl.as_secs_f64()),
            )
        });
        let activity = self.activity.lock();
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
}

/// Counts a command as running (and a streamed one as streaming) for as long as it lives.
pub(super) struct RunningCommand<'a> {
    instance: &'a Instance,
    streamed: bool,
}

impl Drop for RunningCommand<'_> {
    fn drop(&mut self) {
        let mut activity = self.instance.activity.lock();
        activity.running -= 1;
        activity.streaming -= u32::from(self.streamed);
        activity.last_active = Instant::now();
        // Like the original, `updated_at` is the last activity: the end of the command too.
        activity.updated_at = Some(epoch_now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_that_fails_restores_what_was() {
        let mut lifecycle = Lifecycle::Running;
        let before = lifecycle.begin_close().unwrap();
        assert_eq!(lifecycle.state(), State::Closing);
        assert_eq!(
            lifecycle.begin_close(),
            Err(State::Closing),
            "one close at a time"
        );
        lifecycle.restore(before);
        assert_eq!(lifecycle.state(), State::Running);
    }

    #[test]
    fn only_a_running_instance_dies() {
        let mut lifecycle = Lifecycle::Running;
        assert!(lifecycle.die("its container was removed".into(), false));
        assert_eq!(lifecycle.state(), State::Dead);
        assert!(
            !lifecycle.die("again".into(), true),
            "the first reason stays"
        );
        assert!(
            matches!(&lifecycle, Lifecycle::Dead { reason, .. } if reason == "its container was removed")
        );
        // A dead instance can still be closed (and a failed close leaves it dead).
        let before = lifecycle.begin_close().unwrap();
        assert_eq!(before.state(), State::Dead);
        let mut closing = Lifecycle::Closing;
        assert!(!closing.die("during close".into(), false));
        assert_eq!(closing.state(), State::Closing);
    }

    #[test]
    fn state_names_are_the_api_s() {
        let names: Vec<&str> = [State::Starting, State::Running, State::Closing, State::Dead]
            .into_iter()
            .map(State::name)
            .collect();
        assert_eq!(names, ["starting", "running", "closing", "dead"]);
    }
}
