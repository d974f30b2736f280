//! What calls cost: the price table (`--model-prices`, litellm's shape), the tokens of one
//! answer as either API reports them, and money in whole picodollars.
//!
//! Costs are counted in integer picodollars (1e-12 USD), so that sums are exact and a total
//! prints as the decimal it is (`0.0002675`, not `0.00026750000000000005`).

use super::Api;
use serde_json::Value;
use std::collections::HashMap;

/// Picodollars in one dollar.
const PICO_PER_USD: u64 = 1_000_000_000_000;

/// Dollars as the nearest `f64` to the exact decimal of `pico` picodollars.
pub fn pico_to_usd(pico: u64) -> f64 {
    let decimal = format!("{}.{:012}", pico / PICO_PER_USD, pico % PICO_PER_USD);
    decimal.parse().unwrap_or(pico as f64 / PICO_PER_USD as f64)
}

/// What a model costs, in USD per token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    input: f64,
    output: f64,
    /// For input tokens read from the provider's cache (default: `input`).
    cache_read: Option<f64>,
    /// For input tokens written to the provider's cache (default: `input`).
    cache_write: Option<f64>,
}

impl Price {
    /// The cost of one answer, rounded to the picodollar.
    pub fn cost_pico(&self, tokens: &Tokens) -> u64 {
        let uncached = tokens
            .input
            .saturating_sub(tokens.cache_read)
            .saturating_sub(tokens.cache_write);
        let usd = uncached as f64 * self.input
            + tokens.cache_read as f64 * self.cache_read.unwrap_or(self.input)
            + tokens.cache_write as f64 * self.cache_write.unwrap_or(self.input)
            + tokens.output as f64 * self.output;
        // Saturating: a price table cannot make a counter wrap.
        (usd * PICO_PER_USD as f64).round() as u64
    }
}

/// `--model-prices`: model name → [`Price`].
#[derive(Debug, Default)]
pub struct Prices(HashMap<String, Price>);

impl Prices {
    /// Parses litellm's `model_prices_and_context_window.json`:
    /// `{"gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05, ...}}`.
    /// Entries without both costs (`sample_spec`, image and audio models) are skipped; a file
    /// with no priced entry at all is refused, as it is surely not the price table.
    pub fn parse(text: &str) -> Result<Prices, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|err| format!("not valid JSON: {err}"))?;
        let Value::Object(entries) = value else {
            return Err("must be a JSON object of {\"model\": {\"input_cost_per_token\": ..., \"output_cost_per_token\": ...}} (litellm's model_prices_and_context_window.json)".into());
        };
        let rate = |entry: &Value, key: &str| {
            entry
                .get(key)
                .and_then(Value::as_f64)
                .filter(|rate| rate.is_finite() && *rate >= 0.0)
        };
        let prices: HashMap<String, Price> = entries
            .iter()
            .filter_map(|(model, entry)| {
                let price = Price {
                    input: rate(entry, "input_cost_per_token")?,
                    output: rate(entry, "output_cost_per_token")?,
                    cache_read: rate(entry, "cache_read_input_token_cost"),
                    cache_write: rate(entry, "cache_creation_input_token_cost"),
                };
                Some((model.clone(), price))
            })
            .collect();
        if prices.is_empty() {
            return Err("no entry has both input_cost_per_token and output_cost_per_token".into());
        }
        Ok(Prices(prices))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The price of the first of `models` found as named, as `upstream/model` (litellm's
    /// `openrouter/...` keys), or without its `provider/` prefix.
    pub fn find<'a>(
        &self,
        upstream: &str,
        models: impl IntoIterator<Item = &'a str>,
    ) -> Option<Price> {
        models.into_iter().find_map(|model| {
            let unprefixed = model.split_once('/').map(|(_, rest)| rest);
            [
                Some(model.to_string()),
                Some(format!("{upstream}/{model}")),
                unprefixed.map(String::from),
            ]
            .into_iter()
            .flatten()
            .find_map(|name| self.0.get(&name).copied())
        })
    }
}

/// The tokens of one answer. `input` counts every input token, cached ones included.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

impl Tokens {
    /// Reads an answer's `usage`: OpenAI's `prompt_tokens`/`completion_tokens` (cached tokens
    /// are part of `prompt_tokens`), or Anthropic's `input_tokens`/`output_tokens` (cache
    /// reads and writes come on top of `input_tokens`).
    pub fn of(api: Api, usage: &Value) -> Option<Tokens> {
        let count = |value: &Value, key: &str| value.get(key).and_then(Value::as_u64);
        let (input, output) = match api {
            Api::OpenAi => (
                count(usage, "prompt_tokens"),
                count(usage, "completion_tokens"),
            ),
            Api::Anthropic => (count(usage, "input_tokens"), count(usage, "output_tokens")),
        };
        if input.is_none() && output.is_none() {
            return None;
        }
        let (input, output) = (input.unwrap_or(0), output.unwrap_or(0));
        Some(match api {
            Api::OpenAi => Tokens {
                input,
                output,
                cache_read: usage
                    .get("prompt_tokens_details")
                    .and_then(|details| count(details, "cached_tokens"))
                    .unwrap_or(0),
                cache_write: 0,
            },
            Api::Anthropic => {
                let cache_read = count(usage, "cache_read_input_tokens").unwrap_or(0);
                let cache_write = count(usage, "cache_creation_input_tokens").unwrap_or(0);
                Tokens {
                    input: input + cache_read + cache_write,
                    output,
                    cache_read,
                    cache_write,
                }
            }
        })
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use serde_json::json;

    /// The price table of the unit tests.
    pub fn prices() -> Prices {
        Prices::parse(
            &json!({
                "sample_spec": {"max_tokens": "set to max_output_tokens", "mode": "chat"},
                "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
                           "cache_read_input_token_cost": 1.25e-06, "litellm_provider": "openai"},
                "claude-sonnet-4": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                                    "cache_read_input_token_cost": 3e-07,
                                    "cache_creation_input_token_cost": 3.75e-06},
                "openrouter/meta/llama": {"input_cost_per_token": 1e-07, "output_cost_per_token": 2e-07},
                "dall-e-3": {"output_cost_per_image": 0.04},
                "bad": {"input_cost_per_token": "cheap", "output_cost_per_token": 1e-06},
            })
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn price_table_in_litellm_shape() {
        let prices = prices();
        assert_eq!(prices.len(), 3, "{prices:?}");
        for bad in ["{oops", "[1]", r#"{"x": {"mode": "chat"}}"#] {
            assert!(Prices::parse(bad).is_err(), "{bad}");
        }
        let gpt = prices.find("oa", ["gpt-4o"]).unwrap();
        assert_eq!(prices.find("oa", ["openai/gpt-4o"]), Some(gpt));
        assert_eq!(prices.find("oa", ["unknown", "gpt-4o"]), Some(gpt));
        assert!(prices.find("openrouter", ["meta/llama"]).is_some());
        assert_eq!(prices.find("oa", ["gpt-5"]), None);
    }

    #[test]
    fn cost_from_usage_of_either_api() {
        let prices = prices();
        let openai = Tokens::of(
            Api::OpenAi,
            &json!({"prompt_tokens": 1000, "completion_tokens": 100,
                    "prompt_tokens_details": {"cached_tokens": 400}}),
        )
        .unwrap();
        assert_eq!(
            (openai.input, openai.output, openai.cache_read),
            (1000, 100, 400)
        );
        let cost = prices.find("oa", ["gpt-4o"]).unwrap().cost_pico(&openai);
        // 600 × 2.5e-6 + 400 × 1.25e-6 + 100 × 1e-5 USD.
        assert_eq!(cost, 3_000_000_000);

        let anthropic = Tokens::of(
            Api::Anthropic,
            &json!({"input_tokens": 10, "output_tokens": 20,
                    "cache_read_input_tokens": 100, "cache_creation_input_tokens": 50}),
        )
        .unwrap();
        assert_eq!(anthropic.input, 160);
        let cost = prices
            .find("an", ["claude-sonnet-4"])
            .unwrap()
            .cost_pico(&anthropic);
        // 10 × 3e-6 + 100 × 3e-7 + 50 × 3.75e-6 + 20 × 1.5e-5 USD.
        assert_eq!(cost, 547_500_000);
        assert_eq!(Tokens::of(Api::OpenAi, &json!({})), None);
        assert_eq!(Tokens::of(Api::Anthropic, &Value::Null), None);
    }

    #[test]
    fn dollars_print_as_their_decimal() {
        assert_eq!(pico_to_usd(267_500_000).to_string(), "0.0002675");
        assert_eq!(pico_to_usd(0), 0.0);
        assert_eq!(
            pico_to_usd(3 * PICO_PER_USD + 1).to_string(),
            "3.000000000001"
        );
        assert_eq!(
            serde_json::to_string(&pico_to_usd(9_000_000_000)).unwrap(),
            "0.009"
        );
        // In f64 the same sum drifts: 0.1 + 0.2 is 0.30000000000000004.
        let pico = Price {
            input: 0.1,
            output: 0.2,
            cache_read: None,
            cache_write: None,
        }
        .cost_pico(&Tokens {
            input: 1,
            output: 1,
            ..Tokens::default()
        });
        assert_eq!(pico_to_usd(pico).to_string(), "0.3");
    }
}
