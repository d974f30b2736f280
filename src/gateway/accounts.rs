//! The accounting table: `run_id` → [`Usage`], the totals, the global limits, and the
//! [`Book`] that prices an answer and adds it. Plain arithmetic behind one lock, no I/O; the
//! lock is never held across network I/O or a pause.

use super::prices::{pico_to_usd, Prices, Tokens};
use super::Api;
use crate::run_id::RunId;
use parking_lot::Mutex;
use serde::{Serialize, Serializer};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// `run_id`s whose usage is kept apart; past this, the one with the oldest call is forgotten
/// (the totals stay exact).
pub const MAX_TRACKED_RUNS: usize = 4096;

/// Model usage of one `run_id`, or of all calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Usage {
    /// Calls forwarded (counted when forwarded, whatever came of them; retries are not calls).
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The cost in picodollars; shown in USD.
    #[serde(rename = "cost_usd", serialize_with = "as_usd")]
    pub cost_pico: u64,
    /// Answered calls whose cost is unknown: the model is not in `--model-prices`, or the
    /// answer carried no usage.
    pub unpriced_calls: u64,
    /// Calls without a complete answer: an error status, no upstream reachable, or a stream
    /// cut short.
    pub failed_calls: u64,
}

fn as_usd<S: Serializer>(pico: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(pico_to_usd(*pico))
}

impl Usage {
    pub fn cost_usd(&self) -> f64 {
        pico_to_usd(self.cost_pico)
    }

    fn add(&mut self, outcome: &Outcome) {
        if let Some(tokens) = outcome.tokens {
            self.input_tokens += tokens.input;
            self.output_tokens += tokens.output;
        }
        self.cost_pico = self
            .cost_pico
            .saturating_add(outcome.cost_pico.unwrap_or(0));
        if outcome.failed {
            self.failed_calls += 1;
        } else if outcome.cost_pico.is_none() {
            self.unpriced_calls += 1;
        }
    }
}

/// What one call came to, once its answer is read.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    pub tokens: Option<Tokens>,
    pub cost_pico: Option<u64>,
    pub failed: bool,
}

/// `--cost-limit` and `--call-limit`: global, over every run.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Limits {
    pub cost_usd: Option<f64>,
    pub calls: Option<u64>,
}

/// Which limit refused a call, and where the count stands.
#[derive(Clone, Debug, PartialEq)]
pub enum LimitHit {
    Cost { spent_usd: f64, limit_usd: f64 },
    Calls { calls: u64, limit: u64 },
}

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitHit::Cost {
                spent_usd,
                limit_usd,
            } => write!(
                f,
                "the model cost limit is reached: {spent_usd:.6} USD spent of --cost-limit {limit_usd} USD; no more model calls are forwarded"
            ),
            LimitHit::Calls { calls, limit } => write!(
                f,
                "the model call limit is reached: {calls} calls made of --call-limit {limit}; no more model calls are forwarded"
            ),
        }
    }
}

impl std::error::Error for LimitHit {}

/// One `run_id`'s row in the accounts.
pub struct Run {
    pub usage: Usage,
    /// When its last call was admitted (a sequence number), for forgetting the oldest.
    last_call: u64,
}

/// The accounting table.
#[derive(Default)]
pub struct Accounts {
    pub total: Usage,
    pub runs: HashMap<RunId, Run>,
    next_call: u64,
    pub runs_forgotten: u64,
    pub retries: u64,
}

impl Accounts {
    /// Counts a call about to be forwarded, or refuses it when a limit is reached. A call in
    /// flight is not priced yet, so calls already admitted may take the cost past its limit.
    pub fn admit(&mut self, run_id: Option<&RunId>, limits: &Limits) -> Result<(), LimitHit> {
        if let Some(limit) = limits.calls {
            if self.total.calls >= limit {
                return Err(LimitHit::Calls {
                    calls: self.total.calls,
                    limit,
                });
            }
        }
        if let Some(limit_usd) = limits.cost_usd {
            let spent_usd = self.total.cost_usd();
            if spent_usd >= limit_usd {
                return Err(LimitHit::Cost {
                    spent_usd,
                    limit_usd,
                });
            }
        }
        self.total.calls += 1;
        self.next_call += 1;
        if let Some(run_id) = run_id {
            if !self.runs.contains_key(run_id) && self.runs.len() >= MAX_TRACKED_RUNS {
                self.forget_oldest();
            }
            let run = self.runs.entry(run_id.clone()).or_insert(Run {
                usage: Usage::default(),
                last_call: 0,
            });
            run.usage.calls += 1;
            run.last_call = self.next_call;
        }
        Ok(())
    }

    fn forget_oldest(&mut self) {
        let oldest = self
            .runs
            .iter()
            .min_by_key(|(_, run)| run.last_call)
            .map(|(run_id, _)| run_id.clone());
        if let Some(oldest) = oldest {
            self.runs.remove(&oldest);
            self.runs_forgotten += 1;
        }
    }

    pub fn record(&mut self, run_id: Option<&RunId>, outcome: &Outcome) {
        self.total.add(outcome);
        // A run forgotten while its call ran counts in the totals only.
        if let Some(run) = run_id.and_then(|run_id| self.runs.get_mut(run_id)) {
            run.usage.add(outcome);
        }
    }
}

/// The call an answer belongs to.
pub struct Call {
    pub api: Api,
    pub upstream: String,
    /// The model as sent to the upstream.
    pub model: String,
    pub run_id: Option<RunId>,
}

/// The accounts with what prices them; shared with streams still being read.
#[derive(Clone)]
pub struct Book {
    pub accounts: Arc<Mutex<Accounts>>,
    pub prices: Arc<Prices>,
}

impl Book {
    pub fn new(prices: Prices) -> Book {
        Book {
            accounts: Arc::new(Mutex::new(Accounts::default())),
            prices: Arc::new(prices),
        }
    }

    /// Prices a call's answer and adds it to the accounts.
    pub fn settle(
        &self,
        call: &Call,
        tokens: Option<Tokens>,
        answered_model: Option<&str>,
        failed: bool,
    ) {
        let models = std::iter::once(call.model.as_str()).chain(answered_model);
        let cost_pico = tokens.and_then(|tokens| {
            self.prices
                .find(&call.upstream, models)
                .map(|price| price.cost_pico(&tokens))
        });
        let outcome = Outcome {
            tokens,
            cost_pico,
            failed,
        };
        log::debug!(
            "model call of run {} to {} ({}): {:?}",
            call.run_id.as_deref().unwrap_or("-"),
            call.upstream,
            call.model,
            outcome
        );
        self.accounts.lock().record(call.run_id.as_ref(), &outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str) -> RunId {
        RunId::parse(id, "run_id").unwrap()
    }

    #[test]
    fn limits_count_calls_when_admitted() {
        let mut accounts = Accounts::default();
        let limits = Limits {
            cost_usd: Some(1.0),
            calls: Some(3),
        };
        accounts.admit(Some(&run("r1")), &limits).unwrap();
        let priced = |usd: f64| Outcome {
            tokens: Some(Tokens::default()),
            cost_pico: Some((usd * 1e12) as u64),
            failed: false,
        };
        accounts.record(Some(&run("r1")), &priced(0.4));
        accounts.admit(None, &limits).unwrap();
        accounts.record(None, &priced(0.7));
        let hit = accounts.admit(Some(&run("r1")), &limits).unwrap_err();
        assert!(
            matches!(hit, LimitHit::Cost { limit_usd, .. } if limit_usd == 1.0),
            "{hit:?}"
        );
        assert!(hit.to_string().contains("1.100000 USD spent"), "{hit}");
        assert_eq!(accounts.total.calls, 2);
        assert_eq!(accounts.runs["r1"].usage.calls, 1);

        let mut accounts = Accounts::default();
        let limits = Limits {
            cost_usd: None,
            calls: Some(2),
        };
        accounts.admit(None, &limits).unwrap();
        accounts.admit(None, &limits).unwrap();
        let hit = accounts.admit(None, &limits).unwrap_err();
        assert_eq!(hit, LimitHit::Calls { calls: 2, limit: 2 });
    }

    #[test]
    fn outcomes_fill_usage() {
        let mut accounts = Accounts::default();
        let limits = Limits::default();
        for outcome in [
            Outcome {
                tokens: Some(Tokens {
                    input: 10,
                    output: 5,
                    ..Tokens::default()
                }),
                cost_pico: Some(500_000_000_000),
                failed: false,
            },
            Outcome {
                tokens: Some(Tokens::default()),
                cost_pico: None,
                failed: false,
            },
            Outcome {
                failed: true,
                ..Outcome::default()
            },
        ] {
            accounts.admit(Some(&run("r")), &limits).unwrap();
            accounts.record(Some(&run("r")), &outcome);
        }
        let expected = Usage {
            calls: 3,
            input_tokens: 10,
            output_tokens: 5,
            cost_pico: 500_000_000_000,
            unpriced_calls: 1,
            failed_calls: 1,
        };
        assert_eq!(accounts.total, expected);
        assert_eq!(accounts.runs["r"].usage, expected);
        assert_eq!(
            serde_json::to_value(expected).unwrap(),
            serde_json::json!({"calls": 3, "input_tokens": 10, "output_tokens": 5,
                               "cost_usd": 0.5, "unpriced_calls": 1, "failed_calls": 1})
        );
    }

    #[test]
    fn the_oldest_run_is_forgotten_past_the_cap() {
        let mut accounts = Accounts::default();
        let limits = Limits::default();
        for index in 0..MAX_TRACKED_RUNS {
            accounts
                .admit(Some(&run(&format!("r{index}"))), &limits)
                .unwrap();
        }
        accounts.admit(Some(&run("r0")), &limits).unwrap();
        accounts.admit(Some(&run("new")), &limits).unwrap();
        assert_eq!(accounts.runs.len(), MAX_TRACKED_RUNS);
        assert!(accounts.runs.contains_key("r0") && !accounts.runs.contains_key("r1"));
        assert_eq!(accounts.runs_forgotten, 1);
        assert_eq!(accounts.total.calls, MAX_TRACKED_RUNS as u64 + 2);
    }
}
