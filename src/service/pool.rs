//! Warm pools: per preset with `"pool": {"size": N}`, N sandboxes started ahead and idle, so
//! that a `/start_instance` naming the preset (and nothing that changes the sandbox) takes one
//! at once.
//!
//! Owns the members of every pool and their life: refill (one background thread reserves
//! and starts members, each start on a thread of its own), take (pop under the pool's lock:
//! one member goes to one run, never back), eviction (a request short of resources closes
//! idle members to take their room), health, shutdown and journal records.
//!
//! Identity: a member is started under a name no request can give, `RunId::pool_member`
//! (`_pool-<hex>`), which names its container, directories, agent and processes. A run that
//! takes it keeps that name as its instance's `sandbox`: nothing is renamed, so a take costs
//! one journal write. The journal records an idle member under its own name with its preset
//! (`Record::pool`), and a taken one under the run's `run_id` with `Record::sandbox`.
//!
//! Accounting: a member holds its [`Reservation`] from before its start until it is closed
//! or taken (the run's instance then holds that same reservation), so the ledger is exact at
//! every moment. Refills reserve without waiting, and never while a request is making room
//! (`pressure`) or waits in the ledger's queue, so refills never starve requests.

use super::instance::{epoch_now, Instance};
use super::Service;
use crate::api::{PoolSizes, StartRequest};
use crate::env::{EnvSpec, Environment};
use crate::error::Error;
use crate::journal::Record;
use crate::ledger::{resources_json, Amount, Reservation, Resources};
use crate::metrics::{family, Sample};
use crate::run_id::RunId;
use parking_lot::{Condvar, Mutex};
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest pause of the refill loop between two looks at the pools.
const REFILL_TICK: Duration = Duration::from_millis(500);

/// The first pause after a member failed to start; it doubles with each failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The longest pause after failed starts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How long shutdown waits for members still starting (to close them when they are up).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(120);

/// How long a take, or closing the pools at shutdown, waits for the health checks under way
/// (a Slurm node probe gives up after 2 s): [`Pools::check_wait`], which tests shorten.
const CHECK_WAIT: Duration = Duration::from_secs(10);

/// At shutdown, how often the starts still under way are asked again to end
/// (`Runner::cancel_starts`).
const CANCEL_AGAIN: Duration = Duration::from_secs(1);

/// Every pool of the server, and what their refills look at.
#[derive(Default)]
pub(super) struct Pools {
    pools: Vec<Arc<Pool>>,
    /// The next member name; starts from the clock, so that no two lives of the server on
    /// one state dir name two members alike.
    seq: AtomicU64,
    /// Requests making room right now: refills wait while any does.
    pressure: AtomicUsize,
    /// Bumped to wake the refill loop early (a take, a member gone).
    wake: Mutex<u64>,
    woken: Condvar,
    /// Member starts, run by [`START_THREADS`] threads that live as long as the server: a
    /// sandbox whose keep-alive dies with the thread that started it (bubblewrap's
    /// `--die-with-parent`) must not be started by a thread that ends.
    starts: std::sync::OnceLock<crossbeam_channel::Sender<StartJob>>,
    /// Sandboxes of runs that took them from a pool, closed and being removed in the
    /// background: still tracked, their room still held; shutdown waits for them.
    closing: Arc<Closing>,
    /// How long a take, or shutdown, waits for the health checks under way: [`CHECK_WAIT`]
    /// (set with the pools; tests shorten it).
    check_wait: Duration,
}

/// The sandboxes being removed in the background, and a signal when one is gone.
#[derive(Default)]
struct Closing {
    names: Mutex<BTreeSet<RunId>>,
    gone: Condvar,
}

impl Closing {
    /// Closes `instance`'s sandbox, then releases its room and stops tracking it.
    fn close(&self, instance: &Instance) {
        if let Err(err) = instance.env.close() {
            log::warn!(
                "closing {} (sandbox {}): {err}; the health round removes what is left",
                instance.run_id,
                instance.sandbox
            );
        }
        instance.reservation.lock().take();
        self.names.lock().remove(&instance.sandbox);
        self.gone.notify_all();
    }
}

/// One member start, queued for the start threads.
type StartJob = Box<dyn FnOnce() + Send>;

/// How many members start at once, at most.
const START_THREADS: usize = 16;

/// One preset's pool.
pub(super) struct Pool {
    preset: String,
    size: usize,
    /// What a start naming the preset and nothing else asks for.
    spec: EnvSpec,
    container_name: Option<String>,
    /// What one member holds in the ledger.
    cost: Resources,
    members: Mutex<Members>,
    /// Signalled when a member leaves `starting` (shutdown waits on it).
    changed: Condvar,
    taken: AtomicU64,
    missed: AtomicU64,
    evicted: AtomicU64,
    died: AtomicU64,
    failed: AtomicU64,
}

#[derive(Default)]
struct Members {
    /// Started, healthy when last looked at, journaled; the oldest first.
    idle: VecDeque<Member>,
    /// Idle members out of `idle` while a health round asks them (without the pool's lock):
    /// still the pool's, still holding their room.
    checking: BTreeSet<RunId>,
    /// Reserved and being started (or closed, when they came up unwanted).
    starting: BTreeSet<RunId>,
    /// Taken by a run, until its instance is listed (so the sweep still sees them tracked).
    taking: BTreeSet<RunId>,
    /// Members still starting that a request made room with: closed when they come up.
    doomed: usize,
    /// Members being checked that a request made room with: closed when their check ends.
    doomed_checks: usize,
    /// Shutdown took the idle members to close them: a member whose health check outlasted
    /// shutdown's wait is closed when its check ends, not made idle again.
    shut: bool,
    /// Failed starts in a row, and when the next refill may try.
    failures: u32,
    retry_after: Option<Instant>,
}

impl Members {
    /// Idle members, those a health round is asking included.
    fn idle_count(&self) -> usize {
        self.idle.len() + self.checking.len()
    }

    /// Counts one more failed start in a row and sets when the next refill may try; returns
    /// that pause.
    fn back_off(&mut self) -> Duration {
        self.failures += 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (self.failures - 1).min(6))
            .min(MAX_BACKOFF);
        self.retry_after = Some(Instant::now() + backoff);
        backoff
    }
}

/// One idle pooled sandbox.
pub(super) struct Member {
    sandbox: RunId,
    env: Box<dyn Environment>,
    reservation: Reservation,
}

/// Counts a request making room for as long as it lives.
pub(super) struct Pressure<'a>(&'a Pools);

impl Drop for Pressure<'_> {
    fn drop(&mut self) {
        self.0.pressure.fetch_sub(1, Ordering::SeqCst);
        self.0.wake();
    }
}

/// The keys of a config that do not change the sandbox: a request may differ from the
/// preset in them and still take a pooled one.
const LIFETIME_KEYS: [&str; 3] = ["timeout", "ttl", "idle_timeout"];

/// `raw` without [`LIFETIME_KEYS`].
fn sandbox_keys(raw: &Map<String, Value>) -> Map<String, Value> {
    raw.iter()
        .filter(|(key, _)| !LIFETIME_KEYS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

impl Pool {
    /// Whether `request` asks for exactly this pool's sandbox: it names the preset, and its
    /// merged config equals the preset's but for [`LIFETIME_KEYS`].
    fn matches(&self, request: &StartRequest) -> bool {
        request.container_name.as_deref() == Some(self.preset.as_str())
            && request.host_fields.is_empty()
            && !request.spec.client_executable
            && sandbox_keys(&request.spec.raw) == sandbox_keys(&self.spec.raw)
    }

    /// Members wanted beyond those idle and starting.
    fn missing(&self) -> usize {
        let members = self.members.lock();
        self.size
            .saturating_sub(members.idle_count() + members.starting.len())
    }

    fn holds(&self, resource: &str) -> bool {
        self.cost
            .get(resource)
            .is_some_and(|amount| *amount > Amount::ZERO)
    }
}

/// The pools' counters in `/metrics`: name, help, and which counter of a pool.
const COUNTERS: [(&str, &str, Counter); 5] = [
    (
        "arservice_pool_takes_total",
        "Starts served at once by a pooled sandbox.",
        |pool| &pool.taken,
    ),
    (
        "arservice_pool_misses_total",
        "Starts that matched a pool with no idle sandbox (started cold).",
        |pool| &pool.missed,
    ),
    (
        "arservice_pool_evictions_total",
        "Pooled sandboxes closed to make room for a request.",
        |pool| &pool.evicted,
    ),
    (
        "arservice_pool_died_total",
        "Idle pooled sandboxes found dead (and replaced).",
        |pool| &pool.died,
    ),
    (
        "arservice_pool_start_failures_total",
        "Pooled sandboxes that failed to start.",
        |pool| &pool.failed,
    ),
];

impl Pools {
    fn wake(&self) {
        *self.wake.lock() += 1;
        self.woken.notify_all();
    }

    /// Sleeps up to `tick`, or until woken.
    fn sleep(&self, tick: Duration) {
        let mut wake = self.wake.lock();
        let seen = *wake;
        let deadline = Instant::now() + tick;
        while *wake == seen {
            if self.woken.wait_until(&mut wake, deadline).timed_out() {
                break;
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// The names of every pooled sandbox that exists or may (idle, starting, being taken).
    pub(super) fn tracked(&self) -> Vec<RunId> {
        let mut names = Vec::new();
        for pool in &self.pools {
            let members = pool.members.lock();
            names.extend(members.idle.iter().map(|member| member.sandbox.clone()));
            names.extend(members.checking.iter().cloned());
            names.extend(members.starting.iter().cloned());
            names.extend(members.taking.iter().cloned());
        }
        names.extend(self.closing.names.lock().iter().cloned());
        names
    }

    /// Marks a request making room until the guard drops; `None` without pools.
    pub(super) fn press(&self) -> Option<Pressure<'_>> {
        if self.pools.is_empty() {
            return None;
        }
        self.pressure.fetch_add(1, Ordering::SeqCst);
        Some(Pressure(self))
    }

    /// `/stats` `pools`: per pool its size, members by state, counters and what they hold.
    pub(super) fn json(&self) -> Value {
        let mut out = Map::new();
        for pool in &self.pools {
            let (idle, starting) = {
                let members = pool.members.lock();
                (members.idle_count(), members.starting.len())
            };
            let held = scaled(&pool.cost, idle + starting);
            out.insert(
                pool.preset.clone(),
                json!({
                    "size": pool.size,
                    "idle": idle,
                    "starting": starting,
                    "taken": pool.taken.load(Ordering::Relaxed),
                    "missed": pool.missed.load(Ordering::Relaxed),
                    "evicted": pool.evicted.load(Ordering::Relaxed),
                    "died": pool.died.load(Ordering::Relaxed),
                    "failed": pool.failed.load(Ordering::Relaxed),
                    "resources": resources_json(&held),
                }),
            );
        }
        Value::Object(out)
    }

    /// `/metrics`: members by pool and state, the counters, and what pools hold.
    pub(super) fn prometheus(&self, out: &mut String) {
        if self.pools.is_empty() {
            return;
        }
        let mut sandboxes = Vec::new();
        let mut held = Resources::new();
        for pool in &self.pools {
            let members = pool.members.lock();
            for (state, count) in [
                ("idle", members.idle_count()),
                ("starting", members.starting.len()),
            ] {
                sandboxes.push(Sample {
                    labels: vec![("pool", pool.preset.clone()), ("state", state.into())],
                    value: count as f64,
                });
            }
            for (key, amount) in scaled(&pool.cost, members.idle_count() + members.starting.len()) {
                let total = held.entry(key).or_default();
                *total = Amount::from_f64(total.as_f64() + amount.as_f64()).unwrap_or(*total);
            }
        }
        family(
            out,
            "arservice_pool_sandboxes",
            "gauge",
            "Pooled sandboxes by pool and state (idle, starting).",
            &sandboxes,
        );
        for (name, help, counter) in COUNTERS {
            let samples: Vec<Sample> = self
                .pools
                .iter()
                .map(|pool| Sample {
                    labels: vec![("pool", pool.preset.clone())],
                    value: counter(pool).load(Ordering::Relaxed) as f64,
                })
                .collect();
            family(out, name, "counter", help, &samples);
        }
        let held: Vec<Sample> = held
            .into_iter()
            .map(|(key, amount)| Sample {
                labels: vec![("resource", key)],
                value: amount.as_f64(),
            })
            .collect();
        family(
            out,
            "arservice_resource_pooled",
            "gauge",
            "Reserved amount of each enforced resource held by pooled sandboxes (included in arservice_resource_allocated).",
            &held,
        );
    }
}

/// One counter of a pool, as `/metrics` reads it.
type Counter = fn(&Pool) -> &AtomicU64;

/// `cost` times `count`.
fn scaled(cost: &Resources, count: usize) -> Resources {
    cost.iter()
        .map(|(key, amount)| {
            let total = Amount::from_f64(amount.as_f64() * count as f64).unwrap_or(*amount);
            (key.clone(), total)
        })
        .collect()
}

impl Service {
    /// Sets up the pools of `--environments` (before the server starts or adopts anything):
    /// each pool's sandbox is what a start naming its preset and nothing else asks for, and
    /// must be allowed on this server and fit `--max-resources`.
    pub fn configure_pools(&mut self, sizes: &PoolSizes) -> Result<(), String> {
        let mut pools = Vec::new();
        for (preset, &size) in sizes {
            let body = json!({"run_id": "pool", "container_name": preset}).to_string();
            let request =
                StartRequest::parse(body.as_bytes(), &self.settings.presets, self.default_kind())
                    .and_then(|request| self.check_allowed(&request).map(|()| request))
                    .map_err(|err| format!("the pool of preset '{preset}': {err}"))?;
            let cost = self
                .ledger
                .cost(&request.spec.resources, self.runner.implicit_units());
            self.ledger
                .could_ever_fit(&cost)
                .map_err(|short| format!("the pool of preset '{preset}': {short}"))?;
            pools.push(Arc::new(Pool {
                preset: preset.clone(),
                size,
                spec: request.spec,
                container_name: request.container_name,
                cost,
                members: Mutex::new(Members::default()),
                changed: Condvar::new(),
                taken: AtomicU64::new(0),
                missed: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
                died: AtomicU64::new(0),
                failed: AtomicU64::new(0),
            }));
        }
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| since.as_nanos() as u64);
        self.pools = Pools {
            pools,
            seq: AtomicU64::new(clock),
            check_wait: CHECK_WAIT,
            ..Pools::default()
        };
        Ok(())
    }

    /// Makes takes and shutdown wait `wait` for a health check under way, not [`CHECK_WAIT`]
    /// (after `configure_pools`), so that a test sees a check outlast it.
    #[cfg(test)]
    pub(super) fn set_check_wait(&mut self, wait: Duration) {
        self.pools.check_wait = wait;
    }

    /// Starts the refill loop (after adoption and the start-up sweep), when there are pools.
    pub fn start_pools(self: &Arc<Self>) -> std::io::Result<()> {
        if self.pools.is_empty() {
            return Ok(());
        }
        let (sender, receiver) = crossbeam_channel::unbounded::<StartJob>();
        let wanted: usize = self.pools.pools.iter().map(|pool| pool.size).sum();
        for _ in 0..wanted.min(START_THREADS) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name("pool-start".into())
                .spawn(move || {
                    while let Ok(job) = receiver.recv() {
                        job();
                    }
                })?;
        }
        let _ = self.pools.starts.set(sender);
        let service = Arc::clone(self);
        std::thread::Builder::new()
            .name("pools".into())
            .spawn(move || service.refill_loop())?;
        Ok(())
    }

    /// Until shutdown: tops every pool up to its size, then sleeps until a take, a member
    /// gone, or [`REFILL_TICK`].
    fn refill_loop(self: Arc<Self>) {
        while !self.is_shutting_down() {
            for pool in &self.pools.pools {
                self.refill(pool);
            }
            self.pools.sleep(REFILL_TICK);
        }
    }

    /// Reserves and starts the members `pool` misses, while nothing has a better claim on
    /// the resources (a request making room or waiting in the ledger's queue).
    fn refill(self: &Arc<Self>, pool: &Arc<Pool>) {
        if pool
            .members
            .lock()
            .retry_after
            .is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        for _ in 0..pool.missing() {
            if self.is_shutting_down() || self.pools.pressure.load(Ordering::SeqCst) > 0 {
                return;
            }
            // Never waits, and refuses while any request waits: a refill never goes first.
            let Ok(reservation) = self.ledger.reserve(pool.cost.clone()) else {
                return;
            };
            let sandbox = RunId::pool_member(self.pools.seq.fetch_add(1, Ordering::Relaxed));
            {
                // Checked again under the lock shutdown waits with: either shutdown sees
                // this member starting, or this refill sees shutdown.
                let mut members = pool.members.lock();
                if self.is_shutting_down() {
                    return;
                }
                members.starting.insert(sandbox.clone());
            }
            let (service, member_pool, name) =
                (Arc::clone(self), Arc::clone(pool), sandbox.clone());
            let job: StartJob =
                Box::new(move || service.start_member(&member_pool, name, reservation));
            let queued = self.pools.starts.get().map(|starts| starts.send(job));
            if !matches!(queued, Some(Ok(()))) {
                pool.members.lock().starting.remove(&sandbox);
                return;
            }
        }
    }

    /// Starts one member (its reservation taken) and makes it idle, or closes it when it is
    /// not wanted any more (shutdown, a request made room with it) or cannot be journaled.
    fn start_member(&self, pool: &Pool, sandbox: RunId, reservation: Reservation) {
        let env = match self.runner.start(&pool.spec, &self.context(&sandbox)) {
            Ok(env) => env,
            Err(err) => {
                pool.failed.fetch_add(1, Ordering::Relaxed);
                let mut members = pool.members.lock();
                members.starting.remove(&sandbox);
                members.doomed = members.doomed.saturating_sub(1);
                let backoff = members.back_off();
                drop(members);
                if self.is_shutting_down() {
                    log::info!(
                        "pool '{}': a sandbox start ended by the shutdown: {err}",
                        pool.preset
                    );
                } else {
                    log::warn!(
                        "pool '{}': a sandbox failed to start (next try in {} s): {err}",
                        pool.preset,
                        backoff.as_secs()
                    );
                }
                drop(reservation);
                pool.changed.notify_all();
                return;
            }
        };
        let recorded = self.record_member(pool, &sandbox, &*env);
        let wanted = {
            let mut members = pool.members.lock();
            let wanted = if self.is_shutting_down() {
                false
            } else if members.doomed > 0 {
                members.doomed -= 1;
                false
            } else if recorded.is_err() {
                // A journal that cannot be written fails every start alike: back off as
                // after a failed start, not a start and a close in a tight loop.
                pool.failed.fetch_add(1, Ordering::Relaxed);
                members.back_off();
                false
            } else {
                true
            };
            if wanted {
                members.starting.remove(&sandbox);
                members.failures = 0;
                members.retry_after = None;
                members.idle.push_back(Member {
                    sandbox: sandbox.clone(),
                    env,
                    reservation,
                });
                None
            } else {
                Some((env, reservation))
            }
        };
        if let Some((env, reservation)) = wanted {
            if let Err(err) = recorded {
                log::warn!(
                    "pool '{}': cannot journal {sandbox}, closing it (next try in {} s): {err}",
                    pool.preset,
                    pool.members.lock().retry_after.map_or(0, |at| at
                        .saturating_duration_since(Instant::now())
                        .as_secs())
                );
            }
            // Still listed as starting while it closes: shutdown waits for it.
            self.close_member(&sandbox, &*env);
            drop(reservation);
            pool.members.lock().starting.remove(&sandbox);
        }
        pool.changed.notify_all();
        self.pools.wake();
    }

    /// Journals an idle member (when its sandbox can outlive the server).
    fn record_member(
        &self,
        pool: &Pool,
        sandbox: &RunId,
        env: &dyn Environment,
    ) -> std::io::Result<()> {
        let Some(handle) = env.handle() else {
            return Ok(());
        };
        let mut record = Record::new(
            sandbox,
            pool.container_name.as_deref(),
            &pool.spec.raw,
            epoch_now(),
            self.runner.name(),
            handle,
        );
        record.pool = Some(pool.preset.clone());
        self.settings.journal.write(&record)
    }

    /// Closes a member's sandbox and forgets its record.
    fn close_member(&self, sandbox: &RunId, env: &dyn Environment) {
        if let Err(err) = env.close() {
            log::warn!("closing pooled sandbox {sandbox}: {err}");
        }
        self.settings.journal.remove(sandbox);
    }

    /// Takes the oldest idle member of the pool `request` matches, if any: popped under the
    /// pool's lock, so one member goes to one run. Its health is not asked here (docker's
    /// costs a `docker ps` when the listing is old, and a listing made while the member was
    /// being created calls it not running): health rounds replace dead members, and a run
    /// whose sandbox died finds it out at its first command (410), as any instance.
    pub(super) fn take_pooled(&self, request: &StartRequest) -> Option<(Arc<Pool>, Member)> {
        let pool = self.pools.pools.iter().find(|pool| pool.matches(request))?;
        let member = {
            let mut members = pool.members.lock();
            // With no idle member but some being checked by a health round, the take waits
            // for a check to end (at most [`CHECK_WAIT`]) rather than start cold: a check
            // costs microseconds, or one node probe. A check that takes longer is left to end
            // on its own (its member stays the pool's, its room held): the take misses.
            let deadline = Instant::now() + self.pools.check_wait;
            while members.idle.is_empty()
                && !members.checking.is_empty()
                && !pool.changed.wait_until(&mut members, deadline).timed_out()
            {}
            let member = members.idle.pop_front();
            if let Some(member) = &member {
                members.taking.insert(member.sandbox.clone());
            }
            member
        };
        self.pools.wake();
        match member {
            Some(member) => {
                pool.taken.fetch_add(1, Ordering::Relaxed);
                Some((Arc::clone(pool), member))
            }
            None => {
                pool.missed.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Lists a taken member as `request`'s instance (its sandbox keeps its pool name, its
    /// reservation moves over), then forgets the member's own record.
    pub(super) fn keep_pooled(
        &self,
        request: StartRequest,
        pool: &Pool,
        member: Member,
        slot: &mut super::StartingSlot,
    ) -> Result<(), Error> {
        let sandbox = member.sandbox.clone();
        let instance = Arc::new(
            Instance::running(
                request.run_id.clone(),
                request.container_name,
                request.spec,
                (epoch_now(), Instant::now()),
                member.env,
                member.reservation,
                false,
            )
            .on_sandbox(sandbox.clone()),
        );
        let kept = self.keep(instance, slot);
        // The run's record names the sandbox now (or it was closed): the member's goes.
        self.settings.journal.remove(&sandbox);
        pool.members.lock().taking.remove(&sandbox);
        kept
    }

    /// The end of a close of a run on a pooled sandbox (listed no more, its record gone):
    /// the sandbox is removed on a thread of its own, and its reservation released once it is
    /// gone, so a start + command + close cycle on a pool never waits for `docker rm`. A
    /// removal that fails is logged, and the health round's sweep removes what is left.
    pub(super) fn close_in_background(&self, instance: &Arc<Instance>) {
        let closing = Arc::clone(&self.pools.closing);
        closing.names.lock().insert(instance.sandbox.clone());
        let (thread_closing, thread_instance) = (Arc::clone(&closing), Arc::clone(instance));
        let spawned = std::thread::Builder::new()
            .name("pool-close".into())
            .spawn(move || thread_closing.close(&thread_instance));
        if spawned.is_err() {
            closing.close(instance);
        }
    }

    /// Closes one idle member holding `resource` to make room for a request; `false` when
    /// there is none.
    pub(super) fn evict_idle(&self, resource: &str) -> bool {
        for pool in self.pools.pools.iter().filter(|pool| pool.holds(resource)) {
            let member = pool.members.lock().idle.pop_back();
            if let Some(member) = member {
                pool.evicted.fetch_add(1, Ordering::Relaxed);
                log::info!(
                    "closing pooled sandbox {} of '{}' to make room for a request",
                    member.sandbox,
                    pool.preset
                );
                self.close_member(&member.sandbox, &*member.env);
                drop(member.reservation);
                return true;
            }
        }
        false
    }

    /// Marks one member still starting that holds `resource` to be closed when it is up, or
    /// else one being checked by a health round (which `evict_idle` cannot take) to be closed
    /// when its check ends, for a request that waits for its room; `false` when there is none
    /// to mark.
    pub(super) fn doom_starting(&self, resource: &str) -> bool {
        for pool in self.pools.pools.iter().filter(|pool| pool.holds(resource)) {
            let mut members = pool.members.lock();
            if members.doomed < members.starting.len() {
                members.doomed += 1;
            } else if members.doomed_checks < members.checking.len() {
                members.doomed_checks += 1;
            } else {
                continue;
            }
            pool.evicted.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// A health round over idle members: those whose sandbox ended are closed and forgotten
    /// (the refill loop replaces them). Each member is taken out of `idle` while it is asked,
    /// without the pool's lock (a Slurm node that stopped answering makes a check wait for its
    /// probe), so that a take meanwhile gets another member at once; it is listed in
    /// `checking` meanwhile (tracked, its room held). What the checks share is made fresh
    /// first (Slurm's `squeue`), so that a check costs no call to the scheduler.
    pub(super) fn check_pools(&self) {
        if self.pools.is_empty() {
            return;
        }
        self.runner.refresh_health();
        for pool in &self.pools.pools {
            let mut dead: Vec<(Member, String)> = Vec::new();
            let count = pool.members.lock().idle.len();
            for _ in 0..count {
                let member = {
                    let mut members = pool.members.lock();
                    let Some(member) = members.idle.pop_front() else {
                        break;
                    };
                    members.checking.insert(member.sandbox.clone());
                    member
                };
                let health = member.env.health();
                let mut members = pool.members.lock();
                members.checking.remove(&member.sandbox);
                let doomed = members.doomed_checks > 0;
                members.doomed_checks = members.doomed_checks.saturating_sub(1);
                let unwanted = match health {
                    Some(reason) => {
                        dead.push((member, reason));
                        None
                    }
                    // Shutdown gave up waiting for this check and closed the other members.
                    None if members.shut => {
                        Some((member, "whose health check outlasted the shutdown's wait"))
                    }
                    // A request waits for its room (`doom_starting`).
                    None if doomed => Some((member, "to make room for a request")),
                    None => {
                        members.idle.push_back(member);
                        None
                    }
                };
                drop(members);
                if let Some((member, why)) = unwanted {
                    log::info!(
                        "closing pooled sandbox {} of '{}' {why}",
                        member.sandbox,
                        pool.preset
                    );
                    self.close_member(&member.sandbox, &*member.env);
                }
                pool.changed.notify_all();
            }
            for (member, reason) in dead {
                pool.died.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "pooled sandbox {} of '{}' is gone, replacing it: {reason}",
                    member.sandbox,
                    pool.preset
                );
                self.close_member(&member.sandbox, &*member.env);
            }
        }
        self.pools.wake();
    }

    /// At shutdown (refills stopped): closes every idle member, then waits for those still
    /// starting, which close themselves when they are up.
    pub(super) fn close_pools(&self) {
        self.pools.wake();
        let idle: Vec<Member> = self
            .pools
            .pools
            .iter()
            .flat_map(|pool| {
                // A member a health round is asking comes back to `idle` (or is found dead)
                // within its check: waited for, so that none is left out of the closes. One
                // whose check takes longer is closed by the round when its check ends (`shut`).
                let mut members = pool.members.lock();
                let deadline = Instant::now() + self.pools.check_wait;
                while !members.checking.is_empty()
                    && !pool.changed.wait_until(&mut members, deadline).timed_out()
                {
                }
                if !members.checking.is_empty() {
                    log::warn!(
                        "shutdown: {} pooled sandbox(es) of '{}' still in a health check after {} ms, \
                         closed when it ends",
                        members.checking.len(),
                        pool.preset,
                        self.pools.check_wait.as_millis()
                    );
                }
                members.shut = true;
                std::mem::take(&mut members.idle)
            })
            .collect();
        if !idle.is_empty() {
            log::info!("shutting down: closing {} pooled sandbox(es)", idle.len());
        }
        let queue = Mutex::new(idle);
        std::thread::scope(|scope| {
            for _ in 0..super::PARALLELISM {
                scope.spawn(|| loop {
                    let Some(member) = queue.lock().pop() else {
                        break;
                    };
                    self.close_member(&member.sandbox, &*member.env);
                });
            }
        });
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        let mut closing = self.pools.closing.names.lock();
        while !closing.is_empty() {
            if self
                .pools
                .closing
                .gone
                .wait_until(&mut closing, deadline)
                .timed_out()
            {
                log::warn!(
                    "shutdown: {} closed sandbox(es) still being removed",
                    closing.len()
                );
                break;
            }
        }
        drop(closing);
        // Those still starting: a start that can wait long (a Slurm job pending in a full
        // partition) is ended now, not waited for; asked again each round, for a start that
        // had not reached its runner yet.
        loop {
            let starting: Vec<RunId> = self
                .pools
                .pools
                .iter()
                .flat_map(|pool| pool.members.lock().starting.clone())
                .collect();
            if starting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "shutdown: {} pooled sandbox(es) still starting after {} s",
                    starting.len(),
                    SHUTDOWN_WAIT.as_secs()
                );
                break;
            }
            self.runner
                .cancel_starts(&self.settings.server_id, &starting);
            let until = (Instant::now() + CANCEL_AGAIN).min(deadline);
            for pool in &self.pools.pools {
                let mut members = pool.members.lock();
                while !members.starting.is_empty() {
                    if pool.changed.wait_until(&mut members, until).timed_out() {
                        break;
                    }
                }
            }
        }
    }

    /// After a crash: takes an idle member of an earlier life back into its pool, when the
    /// pool still exists with the same sandbox, has room, and its resources fit.
    pub(super) fn adopt_member(
        &self,
        record: &Record,
        env: Box<dyn Environment>,
    ) -> Result<(), (Box<dyn Environment>, String)> {
        let preset = record.pool.as_deref().unwrap_or_default();
        let Some(pool) = self.pools.pools.iter().find(|pool| pool.preset == preset) else {
            return Err((env, format!("preset '{preset}' has no pool now")));
        };
        if record.config != pool.spec.raw {
            return Err((env, format!("the preset '{preset}' changed")));
        }
        if pool.missing() == 0 {
            return Err((env, format!("the pool of '{preset}' is full")));
        }
        let reservation = match self.ledger.reserve(pool.cost.clone()) {
            Ok(reservation) => reservation,
            Err(short) => return Err((env, format!("it no longer fits: {short}"))),
        };
        pool.members.lock().idle.push_back(Member {
            sandbox: record.run_id.clone(),
            env,
            reservation,
        });
        Ok(())
    }
}
