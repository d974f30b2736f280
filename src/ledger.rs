//! The resource ledger: what `--max-resources` allows, what is reserved, what is left.
//!
//! Owns the arithmetic of admission control and nothing else: no I/O, no logging, no HTTP.
//! Amounts are fixed-point integers ([`Amount`], nano-units), so that ten reservations of 0.1
//! fill 1.0 exactly and a million reserve/release cycles return exactly to the start.
//!
//! Invariant: for every enforced key, `0 <= allocated <= max` at every moment the lock is
//! released. A [`Reservation`] is the only way to hold resources; it gives them back when it
//! is dropped, so a failed start, a closed instance and a dead one all release the same way.

use parking_lot::{Condvar, Mutex};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Fixed-point units per whole resource unit.
const SCALE: i64 = 1_000_000_000;

/// The largest amount of any one resource that a request or a limit may name.
const MAX_WHOLE_UNITS: f64 = 1e9;

/// A non-negative quantity of one resource, exact to 1e-9.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Amount(i64);

impl Amount {
    /// One whole unit (the implicit cost of `instances`, and of `jobs` under Slurm).
    pub const ONE: Amount = Amount(SCALE);
    pub const ZERO: Amount = Amount(0);

    /// Reads a JSON number; fails on anything negative, non-numeric or absurdly large.
    pub fn from_json(value: &Value) -> Result<Amount, String> {
        let number = value
            .as_f64()
            .ok_or_else(|| format!("must be a non-negative number, got {value}"))?;
        Amount::from_f64(number)
            .ok_or_else(|| format!("must be a number between 0 and {MAX_WHOLE_UNITS}, got {value}"))
    }

    /// Converts a float, rounding to the nearest nano-unit; `None` when out of range.
    pub fn from_f64(number: f64) -> Option<Amount> {
        if !number.is_finite() || !(0.0..=MAX_WHOLE_UNITS).contains(&number) {
            return None;
        }
        Some(Amount((number * SCALE as f64).round() as i64))
    }

    /// The amount as JSON: an integer when whole, a float otherwise.
    pub fn to_json(self) -> Value {
        if self.0 % SCALE == 0 {
            Value::from(self.0 / SCALE)
        } else {
            Value::from(self.0 as f64 / SCALE as f64)
        }
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / SCALE as f64
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

/// A set of named amounts: limits, costs, what is allocated or left.
pub type Resources = BTreeMap<String, Amount>;

/// Parses a JSON object of resource amounts (`{"instances": 1, "cpus": 0.5}`).
pub fn parse_resources(value: &Value) -> Result<Resources, String> {
    let object = value
        .as_object()
        .ok_or_else(|| format!("must be an object of numbers, got {value}"))?;
    object
        .iter()
        .map(|(key, amount)| {
            Amount::from_json(amount)
                .map(|amount| (key.clone(), amount))
                .map_err(|why| format!("resource '{key}' {why}"))
        })
        .collect()
}

/// Renders amounts as a JSON object.
pub fn resources_json(resources: &Resources) -> Value {
    Value::Object(
        resources
            .iter()
            .map(|(key, amount)| (key.clone(), amount.to_json()))
            .collect::<Map<String, Value>>(),
    )
}

/// Not enough of one resource: what was asked, what is left, what the maximum is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortage {
    pub resource: String,
    pub asked: Amount,
    pub left: Amount,
    pub max: Amount,
    /// Earlier requests waiting for resources (they go first).
    pub waiting: usize,
}

impl Shortage {
    /// True when the request could not fit even on an empty server.
    pub fn never_fits(&self) -> bool {
        self.asked > self.max
    }
}

impl fmt::Display for Shortage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.never_fits() {
            write!(
                f,
                "not enough '{}': asked {}, but the server's maximum is {} (--max-resources), so this request can never fit",
                self.resource, self.asked, self.max
            )
        } else if self.waiting > 0 && self.asked <= self.left {
            write!(
                f,
                "{} earlier request(s) wait for resources and go first; retry later or pass \"wait\"",
                self.waiting
            )
        } else {
            write!(
                f,
                "not enough '{}': asked {}, {} of {} left; close an instance, retry later or pass \"wait\"",
                self.resource, self.asked, self.left, self.max
            )
        }
    }
}

impl std::error::Error for Shortage {}

/// Why a waiting reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not enough, and waiting did not help (or could never help).
    Short(Shortage),
    /// The ledger stopped admitting (the server is shutting down).
    Closed,
}

/// The enforced limits and the running total reserved against them.
pub struct Ledger {
    max: Resources,
    state: Mutex<State>,
    /// Signalled whenever resources are released or the queue changes.
    changed: Condvar,
}

struct State {
    allocated: Resources,
    /// Tickets of waiting requests, first come first served.
    queue: VecDeque<u64>,
    next_ticket: u64,
    closed: bool,
}

impl State {
    /// The first key of `cost` that does not fit, as a shortage.
    fn shortfall(&self, max: &Resources, cost: &Resources) -> Option<Shortage> {
        cost.iter().find_map(|(key, &asked)| {
            let max = max.get(key).copied().unwrap_or(Amount::ZERO);
            let used = self.allocated.get(key).copied().unwrap_or(Amount::ZERO);
            let left = Amount(max.0 - used.0);
            (asked > left).then(|| Shortage {
                resource: key.clone(),
                asked,
                left,
                max,
                waiting: self.queue.len(),
            })
        })
    }

    fn take(&mut self, cost: &Resources) {
        for (key, asked) in cost {
            if let Some(used) = self.allocated.get_mut(key) {
                used.0 += asked.0;
            }
        }
    }
}

impl Ledger {
    /// A ledger enforcing exactly the keys of `max`.
    pub fn new(max: Resources) -> Arc<Ledger> {
        let allocated = max.keys().map(|key| (key.clone(), Amount::ZERO)).collect();
        Arc::new(Ledger {
            max,
            state: Mutex::new(State {
                allocated,
                queue: VecDeque::new(),
                next_ticket: 0,
                closed: false,
            }),
            changed: Condvar::new(),
        })
    }

    /// What an instance asking for `requested` costs here: enforced keys only, each key in
    /// `implicit_one` counting at least one unit whatever the request names (an instance is
    /// one instance, a Slurm job one job: `{"instances": 0}` must not slip past the limit).
    pub fn cost(&self, requested: &Resources, implicit_one: &[&str]) -> Resources {
        self.max
            .keys()
            .map(|key| {
                let asked = requested.get(key).copied().unwrap_or(Amount::ZERO);
                let amount = if implicit_one.contains(&key.as_str()) {
                    asked.max(Amount::ONE)
                } else {
                    asked
                };
                (key.clone(), amount)
            })
            .collect()
    }

    /// Takes `cost` atomically, or nothing at all when any key falls short. Requests that
    /// wait (see [`Ledger::reserve_waiting`]) go first: while any waits, this refuses.
    pub fn reserve(self: &Arc<Self>, cost: Resources) -> Result<Reservation, Shortage> {
        let mut state = self.state.lock();
        if let Some(shortage) = state.shortfall(&self.max, &cost) {
            return Err(shortage);
        }
        if !state.queue.is_empty() {
            let (resource, asked) = cost
                .iter()
                .next()
                .map(|(k, v)| (k.clone(), *v))
                .unwrap_or_default();
            let max = self.max.get(&resource).copied().unwrap_or_default();
            return Err(Shortage {
                resource,
                asked,
                left: max,
                max,
                waiting: state.queue.len(),
            });
        }
        state.take(&cost);
        Ok(Reservation {
            ledger: Arc::clone(self),
            cost,
        })
    }

    /// Like [`Ledger::reserve`], but waits up to `wait` for resources, first come first
    /// served. A cost that could never fit is refused at once.
    pub fn reserve_waiting(
        self: &Arc<Self>,
        cost: Resources,
        wait: Duration,
    ) -> Result<Reservation, Refusal> {
        self.could_ever_fit(&cost).map_err(Refusal::Short)?;
        let deadline = Instant::now() + wait;
        let mut state = self.state.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.queue.push_back(ticket);
        let outcome = loop {
            if state.closed {
                break Err(Refusal::Closed);
            }
            let first = state.queue.front() == Some(&ticket);
            let shortage = state.shortfall(&self.max, &cost);
            if first && shortage.is_none() {
                state.take(&cost);
                break Ok(Reservation {
                    ledger: Arc::clone(self),
                    cost,
                });
            }
            if Instant::now() >= deadline {
                let mut shortage = shortage.unwrap_or_else(|| Shortage {
                    resource: cost.keys().next().cloned().unwrap_or_default(),
                    asked: Amount::ZERO,
                    left: Amount::ZERO,
                    max: Amount::ZERO,
                    waiting: 0,
                });
                shortage.waiting = state.queue.iter().take_while(|&&t| t != ticket).count();
                break Err(Refusal::Short(shortage));
            }
            self.changed.wait_until(&mut state, deadline);
        };
        state.queue.retain(|&waiting| waiting != ticket);
        drop(state);
        // The next in line may fit now.
        self.changed.notify_all();
        outcome
    }

    /// Refuses every waiting and future waiting request (shutdown).
    pub fn stop_waiting(&self) {
        self.state.lock().closed = true;
        self.changed.notify_all();
    }

    /// Requests waiting for resources right now.
    pub fn waiting(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// Checks `cost` against the maximum alone (not what is in use).
    pub fn could_ever_fit(&self, cost: &Resources) -> Result<(), Shortage> {
        for (key, &asked) in cost {
            let max = self.max.get(key).copied().unwrap_or(Amount::ZERO);
            if asked > max {
                return Err(Shortage {
                    resource: key.clone(),
                    asked,
                    left: max,
                    max,
                    waiting: 0,
                });
            }
        }
        Ok(())
    }

    fn release(&self, cost: &Resources) {
        let mut state = self.state.lock();
        for (key, amount) in cost {
            if let Some(used) = state.allocated.get_mut(key) {
                debug_assert!(used.0 >= amount.0, "ledger released more '{key}' than held");
                used.0 = (used.0 - amount.0).max(0);
            }
        }
        drop(state);
        self.changed.notify_all();
    }

    pub fn max(&self) -> &Resources {
        &self.max
    }

    pub fn allocated(&self) -> Resources {
        self.state.lock().allocated.clone()
    }

    /// What is left of every enforced key.
    pub fn available(&self) -> Resources {
        let state = self.state.lock();
        self.max
            .iter()
            .map(|(key, max)| {
                let used = state.allocated.get(key).copied().unwrap_or(Amount::ZERO);
                (key.clone(), Amount(max.0 - used.0))
            })
            .collect()
    }
}

/// Resources held against a [`Ledger`]; given back exactly once, when dropped.
///
/// Take it before starting an environment; a start that fails drops it, and a start that
/// succeeds moves it into the instance, which drops it when it is closed or dies.
pub struct Reservation {
    ledger: Arc<Ledger>,
    cost: Resources,
}

impl Reservation {
    pub fn cost(&self) -> &Resources {
        &self.cost
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ledger.release(&self.cost);
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("cost", &self.cost)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::property::XorShift;
    use serde_json::json;

    fn ledger(max: Value) -> Arc<Ledger> {
        Ledger::new(parse_resources(&max).unwrap())
    }

    fn amounts(value: Value) -> Resources {
        parse_resources(&value).unwrap()
    }

    #[test]
    fn instances_count_at_least_one_and_untracked_keys_cost_nothing() {
        let ledger = ledger(json!({"instances": 2}));
        let cost = ledger.cost(&amounts(json!({"cpus": 8})), &["instances"]);
        assert_eq!(cost, amounts(json!({"instances": 1})));
        for less in [json!(0), json!(0.5), json!(1e-9)] {
            let cost = ledger.cost(&amounts(json!({"instances": less})), &["instances"]);
            assert_eq!(cost, amounts(json!({"instances": 1})), "{less}");
        }
        let cost = ledger.cost(&amounts(json!({"instances": 1.5})), &["instances"]);
        assert_eq!(cost, amounts(json!({"instances": 1.5})));
        // A key that is not implicit costs what the request says, 0 included.
        let ledger = self::ledger(json!({"instances": 2, "gpus": 1}));
        let cost = ledger.cost(&amounts(json!({"gpus": 0})), &["instances"]);
        assert_eq!(cost, amounts(json!({"instances": 1, "gpus": 0})));
    }

    #[test]
    fn ten_tenths_fill_one_exactly_and_release_back() {
        let ledger = ledger(json!({"gpus": 1}));
        let held: Vec<_> = (0..10)
            .map(|_| ledger.reserve(amounts(json!({"gpus": 0.1}))).unwrap())
            .collect();
        assert_eq!(ledger.available()["gpus"], Amount::ZERO);
        let refused = ledger.reserve(amounts(json!({"gpus": 0.1}))).unwrap_err();
        assert_eq!(refused.resource, "gpus");
        assert!(!refused.never_fits());
        drop(held);
        assert_eq!(ledger.available()["gpus"], Amount::ONE);
        assert_eq!(ledger.available()["gpus"].to_json(), json!(1));
    }

    #[test]
    fn a_million_fractional_cycles_do_not_drift() {
        let ledger = ledger(json!({"cpus": 1}));
        for _ in 0..1_000_000 {
            let a = ledger.reserve(amounts(json!({"cpus": 0.1}))).unwrap();
            let b = ledger.reserve(amounts(json!({"cpus": 0.7}))).unwrap();
            drop(a);
            drop(b);
        }
        assert_eq!(ledger.allocated()["cpus"], Amount::ZERO);
        assert_eq!(ledger.available()["cpus"], Amount::ONE);
    }

    #[test]
    fn a_refused_reservation_takes_nothing() {
        let ledger = ledger(json!({"instances": 4, "cpus": 2}));
        let _held = ledger
            .reserve(amounts(json!({"instances": 1, "cpus": 2})))
            .unwrap();
        let before = ledger.allocated();
        let refused = ledger
            .reserve(amounts(json!({"instances": 1, "cpus": 1})))
            .unwrap_err();
        assert_eq!(refused.resource, "cpus");
        assert_eq!(ledger.allocated(), before);
        assert!(
            refused.to_string().contains("asked 1, 0 of 2 left"),
            "{refused}"
        );
    }

    #[test]
    fn a_request_bigger_than_the_maximum_never_fits() {
        let ledger = ledger(json!({"instances": 4}));
        let shortage = ledger
            .could_ever_fit(&amounts(json!({"instances": 5})))
            .unwrap_err();
        assert!(shortage.never_fits());
        assert!(shortage.to_string().contains("can never fit"));
    }

    #[test]
    fn bad_amounts_are_refused_with_the_key_named() {
        for bad in [
            json!({"cpus": -1}),
            json!({"cpus": "2"}),
            json!({"cpus": 1e300}),
        ] {
            let why = parse_resources(&bad).unwrap_err();
            assert!(why.contains("'cpus'"), "{why}");
        }
        assert!(parse_resources(&json!([1])).is_err());
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn waiting_requests_are_served_first_come_first_served() {
        let ledger = ledger(json!({"instances": 1}));
        let one = || amounts(json!({"instances": 1}));
        let held = ledger.reserve(one()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let spawn_waiter = |name: &'static str| {
            let (ledger, tx) = (Arc::clone(&ledger), tx.clone());
            std::thread::spawn(move || {
                let reservation = ledger.reserve_waiting(one(), Duration::from_secs(20));
                tx.send((name, reservation.is_ok())).unwrap();
                // Hold it until told otherwise by dropping at the end of a short life.
                std::thread::sleep(Duration::from_millis(200));
            })
        };
        let first = spawn_waiter("first");
        wait_until("the first waiter", || ledger.waiting() == 1);
        let second = spawn_waiter("second");
        wait_until("the second waiter", || ledger.waiting() == 2);
        // Someone who does not wait cannot jump the queue, even once resources free up.
        let refused = ledger.reserve(one()).unwrap_err();
        assert!(
            refused.to_string().contains("not enough") || refused.waiting == 2,
            "{refused}"
        );
        drop(held);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            ("first", true)
        );
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            ("second", true)
        );
        first.join().unwrap();
        second.join().unwrap();
        assert_eq!(ledger.available(), ledger.max().clone());
    }

    #[test]
    fn waiting_gives_up_at_its_deadline_and_never_fits_is_refused_at_once() {
        let ledger = ledger(json!({"instances": 1}));
        let _held = ledger.reserve(amounts(json!({"instances": 1}))).unwrap();
        let started = Instant::now();
        let refused = ledger
            .reserve_waiting(amounts(json!({"instances": 1})), Duration::from_millis(300))
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(
            matches!(refused, Refusal::Short(ref s) if s.resource == "instances" && !s.never_fits())
        );
        assert_eq!(ledger.waiting(), 0);
        let started = Instant::now();
        let refused = ledger
            .reserve_waiting(amounts(json!({"instances": 2})), Duration::from_secs(30))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(matches!(refused, Refusal::Short(ref s) if s.never_fits()));
    }

    #[test]
    fn stop_waiting_wakes_every_waiter() {
        let ledger = ledger(json!({"instances": 1}));
        let _held = ledger.reserve(amounts(json!({"instances": 1}))).unwrap();
        let waiter = {
            let ledger = Arc::clone(&ledger);
            std::thread::spawn(move || {
                ledger
                    .reserve_waiting(amounts(json!({"instances": 1})), Duration::from_secs(60))
                    .unwrap_err()
            })
        };
        wait_until("the waiter", || ledger.waiting() == 1);
        ledger.stop_waiting();
        assert_eq!(waiter.join().unwrap(), Refusal::Closed);
    }

    #[test]
    fn property_random_sequences_never_exceed_the_maximum_and_return_exactly() {
        let fractions = [0.0, 0.1, 0.25, 0.3, 1.0, 1.5, 2.0];
        let (scale, base) = crate::property::scale();
        for seed in 1..=20 * scale as u64 {
            let mut rng = XorShift((seed ^ (base << 20)).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let ledger = ledger(json!({"instances": 7, "cpus": 3.3, "gpus": 1}));
            let max = ledger.max().clone();
            let mut held = Vec::new();
            for _ in 0..5_000 {
                if rng.next().is_multiple_of(3) && !held.is_empty() {
                    let index = (rng.next() % held.len() as u64) as usize;
                    held.swap_remove(index);
                } else {
                    let mut ask = Resources::new();
                    for key in ["cpus", "gpus"] {
                        let pick = fractions[(rng.next() % fractions.len() as u64) as usize];
                        ask.insert(key.to_string(), Amount::from_f64(pick).unwrap());
                    }
                    let cost = ledger.cost(&ask, &["instances"]);
                    if let Ok(reservation) = ledger.reserve(cost) {
                        held.push(reservation);
                    }
                }
                let allocated = ledger.allocated();
                for (key, max) in &max {
                    assert!(allocated[key] <= *max, "{key} over its maximum");
                    assert!(allocated[key] >= Amount::ZERO);
                }
                let sum: i64 = held.iter().map(|r| r.cost()["cpus"].0).sum();
                assert_eq!(allocated["cpus"].0, sum, "allocated drifted from held");
            }
            held.clear();
            assert_eq!(
                ledger.available(),
                max,
                "seed {seed} did not return exactly"
            );
        }
    }
}
