//! What the gateway adds to `/stats` and `/metrics`: [`GatewayStats`], a typed part that the
//! service embeds in its snapshot (`model`, `model_runs`, and `model` in the instance rows), and
//! the gateway's Prometheus counters. Read under the accounts lock, rendered after it.

use super::accounts::{Limits, Usage};
use super::Gateway;
use crate::metrics::{family, plain};
use crate::run_id::RunId;
use serde::Serialize;
use std::collections::BTreeMap;

/// The gateway's part of `/stats`, present when it has upstreams.
#[derive(Clone, Debug, Serialize)]
pub struct GatewayStats {
    /// The totals over every call (never filtered).
    pub model: ModelTotals,
    /// Usage per `run_id`, filtered like the instances.
    pub model_runs: BTreeMap<RunId, Usage>,
}

/// `/stats`' `model`: the totals, with retries, forgotten runs, limits and upstreams.
#[derive(Clone, Debug, Serialize)]
pub struct ModelTotals {
    #[serde(flatten)]
    pub usage: Usage,
    pub retries: u64,
    pub runs_forgotten: u64,
    pub limits: Limits,
    pub upstreams: Vec<String>,
}

/// `GET /runs/{run_id}`'s `model`: the run's usage (zeros when it made no call, or was
/// forgotten past `MAX_TRACKED_RUNS`), the limits, and what is left of them. The limits are
/// global: what is left is the budget of every run, this one included.
#[derive(Clone, Debug, Serialize)]
pub struct RunModel {
    #[serde(flatten)]
    pub usage: Usage,
    pub limits: Limits,
    /// `--cost-limit` less the cost of every call so far (never below 0); `None`: no limit.
    pub cost_left_usd: Option<f64>,
    /// `--call-limit` less every call so far; `None`: no limit.
    pub calls_left: Option<u64>,
}

impl GatewayStats {
    /// The usage of one run, for its instance row.
    pub fn of_run(&self, run_id: &RunId) -> Option<&Usage> {
        self.model_runs.get(run_id)
    }
}

impl Gateway {
    /// The gateway's part of `/stats` (none without upstreams), with the runs whose `run_id`
    /// contains `run_id_filter`.
    pub fn stats(&self, run_id_filter: Option<&str>) -> Option<GatewayStats> {
        if !self.is_on() {
            return None;
        }
        let upstreams = self
            .upstreams
            .iter()
            .map(|upstream| upstream.name.clone())
            .collect();
        let accounts = self.book.accounts.lock();
        let model_runs = accounts
            .runs
            .iter()
            .filter(|(run_id, _)| run_id_filter.is_none_or(|needle| run_id.contains(needle)))
            .map(|(run_id, run)| (run_id.clone(), run.usage))
            .collect();
        Some(GatewayStats {
            model: ModelTotals {
                usage: accounts.total,
                retries: accounts.retries,
                runs_forgotten: accounts.runs_forgotten,
                limits: self.limits,
                upstreams,
            },
            model_runs,
        })
    }

    /// The model part of `GET /runs/{run_id}` (none without upstreams).
    pub fn run_model(&self, run_id: &str) -> Option<RunModel> {
        if !self.is_on() {
            return None;
        }
        let accounts = self.book.accounts.lock();
        let usage = accounts
            .runs
            .get(run_id)
            .map(|run| run.usage)
            .unwrap_or_default();
        Some(RunModel {
            usage,
            limits: self.limits,
            cost_left_usd: self
                .limits
                .cost_usd
                .map(|limit| (limit - accounts.total.cost_usd()).max(0.0)),
            calls_left: self
                .limits
                .calls
                .map(|limit| limit.saturating_sub(accounts.total.calls)),
        })
    }

    /// The gateway's counters in Prometheus text (when it has upstreams).
    pub fn render_metrics(&self, out: &mut String) {
        if !self.is_on() {
            return;
        }
        let (total, retries) = {
            let accounts = self.book.accounts.lock();
            (accounts.total, accounts.retries)
        };
        for (name, help, value) in [
            (
                "arservice_model_calls_total",
                "Model calls forwarded.",
                total.calls as f64,
            ),
            (
                "arservice_model_failed_calls_total",
                "Model calls without a complete answer (error status, unreachable, stream cut).",
                total.failed_calls as f64,
            ),
            (
                "arservice_model_unpriced_calls_total",
                "Answered model calls whose cost is unknown.",
                total.unpriced_calls as f64,
            ),
            (
                "arservice_model_retries_total",
                "Attempts repeated after a 429, a 5xx or a connection failure.",
                retries as f64,
            ),
            (
                "arservice_model_input_tokens_total",
                "Input tokens of model calls.",
                total.input_tokens as f64,
            ),
            (
                "arservice_model_output_tokens_total",
                "Output tokens of model calls.",
                total.output_tokens as f64,
            ),
            (
                "arservice_model_cost_usd_total",
                "Cost of model calls in USD, from --model-prices.",
                total.cost_usd(),
            ),
        ] {
            family(out, name, "counter", help, &plain(value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{GatewaySettings, Prices, Retry, Upstream};
    use super::*;
    use serde_json::{json, Value};
    use std::time::Duration;

    fn gateway(upstreams: &[&str]) -> Gateway {
        Gateway::new(GatewaySettings {
            upstreams: upstreams
                .iter()
                .map(|name| Upstream::parse(&format!("{name}=http://127.0.0.1:9"), |_| None))
                .collect::<Result<_, _>>()
                .unwrap(),
            prices: Prices::default(),
            limits: Limits {
                cost_usd: Some(2.5),
                calls: None,
            },
            retry: Retry {
                retries: 0,
                backoff: Duration::ZERO,
            },
            timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    #[test]
    fn the_stats_part_is_typed_filtered_and_absent_when_off() {
        assert!(gateway(&[]).stats(None).is_none());
        let gateway = gateway(&["oa", "an"]);
        {
            let mut accounts = gateway.book.accounts.lock();
            for run_id in ["alpha", "beta"] {
                accounts
                    .admit(
                        Some(&RunId::parse(run_id, "run_id").unwrap()),
                        &Limits::default(),
                    )
                    .unwrap();
            }
            accounts.retries = 3;
        }
        let run = serde_json::to_value(gateway.run_model("alpha").unwrap()).unwrap();
        assert_eq!(run["calls"], 1);
        assert_eq!(run["cost_left_usd"], 2.5);
        assert_eq!(run["calls_left"], Value::Null);
        assert_eq!(run["limits"]["cost_usd"], 2.5);
        let unknown = gateway.run_model("gamma").unwrap();
        assert_eq!(unknown.usage, Usage::default());
        let stats = gateway.stats(Some("alp")).unwrap();
        let run = |id| RunId::parse(id, "run_id").unwrap();
        assert!(stats.of_run(&run("alpha")).is_some() && stats.of_run(&run("beta")).is_none());
        let value = serde_json::to_value(&stats).unwrap();
        assert_eq!(
            value["model"],
            json!({"calls": 2, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0,
                   "unpriced_calls": 0, "failed_calls": 0, "retries": 3, "runs_forgotten": 0,
                   "limits": {"cost_usd": 2.5, "calls": null}, "upstreams": ["oa", "an"]})
        );
        assert_eq!(value["model_runs"]["alpha"]["calls"], 1);
        let mut metrics = String::new();
        gateway.render_metrics(&mut metrics);
        assert!(
            metrics.contains("\narservice_model_calls_total 2\n"),
            "{metrics}"
        );
    }
}
