//! The resource ledger: what `--max-resources` allows, what is reserved, what is left.
//!
//! Owns the arithmetic of admission control and nothing else: no I/O, no logging, no HTTP.
//! Amounts are fixed-point integers ([`Amount`], nano-units), so that ten reservations of 0.1
//! fill 1.0 exactly and a million reserve/release cycles return exactly to the start.
//!
//! Invariant: for every enforced key, `0 <= allocated <= max` at every moment the lock is
//! released. A [`Reservation`] is the only way to hold resources; it gives them back when it
//! is dropped, so a failed start, a closed instance and a dead one all release the same way.

use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

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
        } else {
            write!(
                f,
                "not enough '{}': asked {}, {} of {} left; close an instance or retry later",
                self.resource, self.asked, self.left, self.max
            )
        }
    }
}

impl std::error::Error for Shortage {}

/// The enforced limits and the running total reserved against them.
pub struct Ledger {
    max: Resources,
    allocated: Mutex<Resources>,
}

impl Ledger {
    /// A ledger enforcing exactly the keys of `max`.
    pub fn new(max: Resources) -> Arc<Ledger> {
        let allocated = max.keys().map(|key| (key.clone(), Amount::ZERO)).collect();
        Arc::new(Ledger {
            max,
            allocated: Mutex::new(allocated),
        })
    }

    /// What an instance asking for `requested` costs here: enforced keys only, each key in
    /// `implicit_one` counting one unit unless the request names it.
    pub fn cost(&self, requested: &Resources, implicit_one: &[&str]) -> Resources {
        self.max
            .keys()
            .map(|key| {
                let amount = requested.get(key).copied().unwrap_or_else(|| {
                    if implicit_one.contains(&key.as_str()) {
                        Amount::ONE
                    } else {
                        Amount::ZERO
                    }
                });
                (key.clone(), amount)
            })
            .collect()
    }

    /// Takes `cost` atomically, or nothing at all when any key falls short.
    pub fn reserve(self: &Arc<Self>, cost: Resources) -> Result<Reservation, Shortage> {
        let mut allocated = self.allocated.lock();
        for (key, &asked) in &cost {
            let max = self.max.get(key).copied().unwrap_or(Amount::ZERO);
            let used = allocated.get(key).copied().unwrap_or(Amount::ZERO);
            let left = Amount(max.0 - used.0);
            if asked > left {
                return Err(Shortage {
                    resource: key.clone(),
                    asked,
                    left,
                    max,
                });
            }
        }
        for (key, asked) in &cost {
            if let Some(used) = allocated.get_mut(key) {
                used.0 += asked.0;
            }
        }
        Ok(Reservation {
            ledger: Arc::clone(self),
            cost,
        })
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
                });
            }
        }
        Ok(())
    }

    fn release(&self, cost: &Resources) {
        let mut allocated = self.allocated.lock();
        for (key, amount) in cost {
            if let Some(used) = allocated.get_mut(key) {
                debug_assert!(used.0 >= amount.0, "ledger released more '{key}' than held");
                used.0 = (used.0 - amount.0).max(0);
            }
        }
    }

    pub fn max(&self) -> &Resources {
        &self.max
    }

    pub fn allocated(&self) -> Resources {
        self.allocated.lock().clone()
    }

    /// What is left of every enforced key.
    pub fn available(&self) -> Resources {
        let allocated = self.allocated.lock();
        self.max
            .iter()
            .map(|(key, max)| {
                let used = allocated.get(key).copied().unwrap_or(Amount::ZERO);
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
    use serde_json::json;

    fn ledger(max: Value) -> Arc<Ledger> {
        Ledger::new(parse_resources(&max).unwrap())
    }

    fn amounts(value: Value) -> Resources {
        parse_resources(&value).unwrap()
    }

    #[test]
    fn instances_count_one_unless_given_and_untracked_keys_cost_nothing() {
        let ledger = ledger(json!({"instances": 2}));
        let cost = ledger.cost(&amounts(json!({"cpus": 8})), &["instances"]);
        assert_eq!(cost, amounts(json!({"instances": 1})));
        let cost = ledger.cost(&amounts(json!({"instances": 0})), &["instances"]);
        assert_eq!(cost, amounts(json!({"instances": 0})));
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

    /// A small deterministic generator so the random test needs no crate.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_sequences_never_exceed_the_maximum_and_return_exactly() {
        let fractions = [0.0, 0.1, 0.25, 0.3, 1.0, 1.5, 2.0];
        for seed in 1..=20u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
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
