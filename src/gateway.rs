//! The model gateway: a rollout's LLM calls go through arservice, so that one service accounts
//! for a rollout's sandbox and its model spend together.
//!
//! Owns the upstream table (`--model-upstream`), the price table (`--model-prices`), the
//! forwarding of `/v1/chat/completions` (OpenAI-compatible) and `/v1/messages` (Anthropic)
//! with retries and backoff, the pass-through of streamed answers (server-sent events) with
//! their usage read on the way, and the accounting table `run_id` → [`Usage`] with its totals
//! and the global limits.
//!
//! Never logs, echoes or writes anywhere an API key (it lives in memory, redacted in `Debug`);
//! never rewrites an upstream's answer (status, body and bytes of a stream reach the client as
//! they came); never holds the accounts lock across network I/O or a pause. It picks no status
//! code: failures are [`Error`]s, mapped in `http.rs`.

use crate::api;
use crate::error::Error;
use crate::metrics::{family, plain};
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

/// The header that names the rollout a call belongs to.
pub const RUN_ID_HEADER: &str = "X-Run-Id";

/// The header that picks an upstream by name, whatever the model is called.
pub const UPSTREAM_HEADER: &str = "X-Upstream";

/// `anthropic-version` sent to the upstream when the client sends none.
const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Longest wait for a connection (TCP and TLS) to an upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest pause the exponential backoff makes between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Longest `Retry-After` honoured: an upstream asking for more is retried after this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Largest answer read from an upstream when it is not streamed (a chat answer is kilobytes).
const MAX_ANSWER_BYTES: u64 = 64 * 1024 * 1024;

/// Longest line of a stream that is scanned for usage; longer ones pass through unscanned.
const MAX_EVENT_LINE_BYTES: usize = 1024 * 1024;

/// `run_id`s whose usage is kept apart; past this, the one with the oldest call is forgotten
/// (the totals stay exact).
pub const MAX_TRACKED_RUNS: usize = 4096;

/// Longest upstream name (it prefixes model names: `NAME/model`).
const MAX_UPSTREAM_NAME_LEN: usize = 64;

/// Request headers passed on to the upstream, by lower-case prefix. Never `authorization` or
/// `x-api-key`: the upstream's key is the server's, and the client's is arservice's token.
const FORWARDED_REQUEST_HEADERS: [&str; 3] = ["anthropic-", "openai-", "x-portkey-"];

/// Answer headers passed back to the client, by lower-case prefix: SDKs read them to pace
/// their own retries and to report request ids.
const FORWARDED_ANSWER_HEADERS: [&str; 6] = [
    "retry-after",
    "x-request-id",
    "request-id",
    "x-ratelimit-",
    "anthropic-ratelimit-",
    "openai-",
];

/// The two wire APIs the gateway speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/chat/completions`: OpenAI, litellm proxies, OpenRouter, Portkey, Requesty.
    OpenAi,
    /// `POST /v1/messages`: Anthropic.
    Anthropic,
}

impl Api {
    /// The path appended to an upstream's base URL (the same as the route's).
    pub fn path(self) -> &'static str {
        match self {
            Api::OpenAi => "/v1/chat/completions",
            Api::Anthropic => "/v1/messages",
        }
    }
}

/// An API key: kept in memory only; its `Debug` never shows it.
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One `--model-upstream`.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    /// The base URL without a trailing slash; the route's path is appended to it.
    pub base_url: String,
    /// The environment variable the key was read from (named in logs instead of the key).
    pub key_env: Option<String>,
    key: Option<Secret>,
}

impl Upstream {
    /// Parses `NAME=URL[,key_env=VAR]`, reading the key from `VAR` through `env` now: a named
    /// variable that is unset or empty is a configuration error, not a failure at the first call.
    pub fn parse(spec: &str, env: impl Fn(&str) -> Option<String>) -> Result<Upstream, String> {
        let syntax = "write it as NAME=URL or NAME=URL,key_env=VAR";
        let Some((name, rest)) = spec.split_once('=') else {
            return Err(format!("--model-upstream '{spec}': {syntax}"));
        };
        let name_ok = !name.is_empty()
            && name.len() <= MAX_UPSTREAM_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !name_ok {
            return Err(format!(
                "--model-upstream '{spec}': the name '{name}' must be 1 to {MAX_UPSTREAM_NAME_LEN} of A-Z a-z 0-9 _ . - (it prefixes model names: NAME/model)"
            ));
        }
        let mut parts = rest.split(',');
        let url = parts.next().unwrap_or_default().trim_end_matches('/');
        let host = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        if host.is_none_or(|host| host.is_empty() || host.starts_with('/')) {
            return Err(format!(
                "--model-upstream {name}: '{url}' is not an http:// or https:// URL ({syntax})"
            ));
        }
        let mut key_env = None;
        for option in parts {
            match option.split_once('=') {
                Some(("key_env", var)) if !var.is_empty() => key_env = Some(var.to_string()),
                _ => {
                    return Err(format!(
                        "--model-upstream {name}: unknown option '{option}'; {syntax}"
                    ))
                }
            }
        }
        let key = match &key_env {
            None => None,
            Some(var) => {
                let key = env(var).unwrap_or_default();
                let key = key.trim();
                if key.is_empty() {
                    return Err(format!(
                        "--model-upstream {name}: the environment variable {var} (its API key) is not set or empty"
                    ));
                }
                if !key.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!(
                        "--model-upstream {name}: the API key in {var} has characters an HTTP header cannot carry"
                    ));
                }
                Some(Secret(key.to_string()))
            }
        };
        Ok(Upstream {
            name: name.to_string(),
            base_url: url.to_string(),
            key_env,
            key,
        })
    }
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
    fn cost_usd(&self, tokens: &Tokens) -> f64 {
        let uncached = tokens
            .input
            .saturating_sub(tokens.cache_read)
            .saturating_sub(tokens.cache_write);
        uncached as f64 * self.input
            + tokens.cache_read as f64 * self.cache_read.unwrap_or(self.input)
            + tokens.cache_write as f64 * self.cache_write.unwrap_or(self.input)
            + tokens.output as f64 * self.output
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
    fn find<'a>(&self, upstream: &str, models: impl IntoIterator<Item = &'a str>) -> Option<Price> {
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
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
}

impl Tokens {
    /// Reads an answer's `usage`: OpenAI's `prompt_tokens`/`completion_tokens` (cached tokens
    /// are part of `prompt_tokens`), or Anthropic's `input_tokens`/`output_tokens` (cache
    /// reads and writes come on top of `input_tokens`).
    fn of(api: Api, usage: &Value) -> Option<Tokens> {
        let count = |value: &Value, key: &str| value.get(key).and_then(Value::as_u64);
        match api {
            Api::OpenAi => {
                let input = count(usage, "prompt_tokens");
                let output = count(usage, "completion_tokens");
                if input.is_none() && output.is_none() {
                    return None;
                }
                let cache_read = usage
                    .get("prompt_tokens_details")
                    .and_then(|details| count(details, "cached_tokens"));
                Some(Tokens {
                    input: input.unwrap_or(0),
                    output: output.unwrap_or(0),
                    cache_read: cache_read.unwrap_or(0),
                    cache_write: 0,
                })
            }
            Api::Anthropic => {
                let input = count(usage, "input_tokens");
                let output = count(usage, "output_tokens");
                if input.is_none() && output.is_none() {
                    return None;
                }
                let cache_read = count(usage, "cache_read_input_tokens").unwrap_or(0);
                let cache_write = count(usage, "cache_creation_input_tokens").unwrap_or(0);
                Some(Tokens {
                    input: input.unwrap_or(0) + cache_read + cache_write,
                    output: output.unwrap_or(0),
                    cache_read,
                    cache_write,
                })
            }
        }
    }
}

/// Model usage of one `run_id`, or of all calls.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Calls forwarded (counted when forwarded, whatever came of them; retries are not calls).
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    /// Answered calls whose cost is unknown: the model is not in `--model-prices`, or the
    /// answer carried no usage.
    pub unpriced_calls: u64,
    /// Calls without a complete answer: an error status, no upstream reachable, or a stream
    /// cut short.
    pub failed_calls: u64,
}

impl Usage {
    fn add(&mut self, outcome: &Outcome) {
        if let Some(tokens) = outcome.tokens {
            self.input_tokens += tokens.input;
            self.output_tokens += tokens.output;
        }
        self.cost_usd += outcome.cost_usd.unwrap_or(0.0);
        if outcome.failed {
            self.failed_calls += 1;
        } else if outcome.cost_usd.is_none() {
            self.unpriced_calls += 1;
        }
    }

    fn json(&self) -> Value {
        json!({
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
            "unpriced_calls": self.unpriced_calls,
            "failed_calls": self.failed_calls,
        })
    }
}

/// What one call came to, once its answer is read.
#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    tokens: Option<Tokens>,
    cost_usd: Option<f64>,
    failed: bool,
}

/// `--cost-limit` and `--call-limit`: global, over every run.
#[derive(Clone, Copy, Debug, Default)]
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
struct Run {
    usage: Usage,
    /// When its last call was admitted (a sequence number), for forgetting the oldest.
    last_call: u64,
}

/// The accounting table: plain arithmetic behind one lock, no I/O.
#[derive(Default)]
struct Accounts {
    total: Usage,
    runs: HashMap<String, Run>,
    next_call: u64,
    runs_forgotten: u64,
    retries: u64,
}

impl Accounts {
    /// Counts a call about to be forwarded, or refuses it when a limit is reached. A call in
    /// flight is not priced yet, so calls already admitted may take the cost past its limit.
    fn admit(&mut self, run_id: Option<&str>, limits: &Limits) -> Result<(), LimitHit> {
        if let Some(limit) = limits.calls {
            if self.total.calls >= limit {
                return Err(LimitHit::Calls {
                    calls: self.total.calls,
                    limit,
                });
            }
        }
        if let Some(limit_usd) = limits.cost_usd {
            if self.total.cost_usd >= limit_usd {
                return Err(LimitHit::Cost {
                    spent_usd: self.total.cost_usd,
                    limit_usd,
                });
            }
        }
        self.total.calls += 1;
        self.next_call += 1;
        if let Some(run_id) = run_id {
            if !self.runs.contains_key(run_id) && self.runs.len() >= MAX_TRACKED_RUNS {
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
            let run = self.runs.entry(run_id.to_string()).or_insert(Run {
                usage: Usage::default(),
                last_call: 0,
            });
            run.usage.calls += 1;
            run.last_call = self.next_call;
        }
        Ok(())
    }

    fn record(&mut self, run_id: Option<&str>, outcome: &Outcome) {
        self.total.add(outcome);
        // A run forgotten while its call ran counts in the totals only.
        if let Some(run) = run_id.and_then(|run_id| self.runs.get_mut(run_id)) {
            run.usage.add(outcome);
        }
    }
}

/// How failed attempts are retried.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Attempts after the first.
    pub retries: u32,
    /// The pause before the first retry; it doubles after each.
    pub backoff: Duration,
}

impl Retry {
    /// The pause before retry number `retry` (from 1): the upstream's `Retry-After` when it
    /// sent one, else the exponential backoff; each capped.
    fn pause(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(asked) => asked.min(MAX_RETRY_AFTER),
            None => self
                .backoff
                .saturating_mul(1 << (retry - 1).min(16))
                .min(MAX_BACKOFF),
        }
    }
}

/// 429 and 5xx are worth another attempt; other statuses are the answer.
fn is_retryable(status: u16) -> bool {
    status == 429 || status >= 500
}

/// Failures of the connection, not of the call: worth another attempt. A call that ran into
/// `--model-timeout` is not retried (it would take as long again).
fn is_transient(error: &ureq::Error) -> bool {
    use ureq::Timeout;
    if let ureq::Error::Io(err) = error {
        return err.kind() != io::ErrorKind::TimedOut;
    }
    matches!(
        error,
        ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Timeout(Timeout::Connect | Timeout::Resolve)
    )
}

/// `retry-after-ms` (OpenAI) or `retry-after` in seconds; an HTTP date is ignored.
fn retry_after(headers: &ureq::http::HeaderMap) -> Option<Duration> {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<f64>().ok())
            .filter(|value| value.is_finite() && *value >= 0.0)
    };
    number("retry-after-ms")
        .map(|millis| millis / 1000.0)
        .or_else(|| number("retry-after"))
        .map(|seconds| Duration::from_secs_f64(seconds.min(MAX_RETRY_AFTER.as_secs_f64())))
}

/// How the gateway was configured.
pub struct GatewaySettings {
    pub upstreams: Vec<Upstream>,
    pub prices: Prices,
    pub limits: Limits,
    pub retry: Retry,
    /// How long one attempt may take, a streamed answer included.
    pub timeout: Duration,
}

/// The accounts with what prices them; shared with streams still being read.
#[derive(Clone)]
struct Book {
    accounts: Arc<Mutex<Accounts>>,
    prices: Arc<Prices>,
}

/// The call an answer belongs to.
struct Call {
    api: Api,
    upstream: String,
    /// The model as sent to the upstream.
    model: String,
    run_id: Option<String>,
}

impl Book {
    /// Prices a call's answer and adds it to the accounts.
    fn settle(
        &self,
        call: &Call,
        tokens: Option<Tokens>,
        answered_model: Option<&str>,
        failed: bool,
    ) {
        let models = std::iter::once(call.model.as_str()).chain(answered_model);
        let cost_usd = tokens.and_then(|tokens| {
            self.prices
                .find(&call.upstream, models)
                .map(|price| price.cost_usd(&tokens))
        });
        let outcome = Outcome {
            tokens,
            cost_usd,
            failed,
        };
        log::debug!(
            "model call of run {} to {} ({}): {:?}",
            call.run_id.as_deref().unwrap_or("-"),
            call.upstream,
            call.model,
            outcome
        );
        self.accounts
            .lock()
            .record(call.run_id.as_deref(), &outcome);
    }
}

/// An upstream's answer on its way to the client.
pub struct Forwarded {
    pub status: u16,
    pub content_type: String,
    /// The upstream's headers the client may need (`retry-after`, request ids, rate limits).
    pub headers: Vec<(String, String)>,
    pub body: ForwardedBody,
}

/// The body of a [`Forwarded`] answer.
pub enum ForwardedBody {
    /// Read whole: a plain answer, or an error.
    Full(Vec<u8>),
    /// Server-sent events, to be passed on as they arrive; usage is counted when it ends.
    Stream(Box<dyn Read>),
}

impl fmt::Debug for ForwardedBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardedBody::Full(bytes) => write!(f, "Full({} bytes)", bytes.len()),
            ForwardedBody::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// The gateway: upstreams, prices, limits and the accounts.
pub struct Gateway {
    upstreams: Vec<Upstream>,
    limits: Limits,
    retry: Retry,
    agent: ureq::Agent,
    book: Book,
}

impl Gateway {
    /// Refuses two upstreams of one name.
    pub fn new(settings: GatewaySettings) -> Result<Gateway, String> {
        for (index, upstream) in settings.upstreams.iter().enumerate() {
            if settings.upstreams[..index]
                .iter()
                .any(|earlier| earlier.name == upstream.name)
            {
                return Err(format!(
                    "--model-upstream {} is given twice; give each upstream its own name",
                    upstream.name
                ));
            }
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(settings.timeout))
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(format!("arservice/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Gateway {
            upstreams: settings.upstreams,
            limits: settings.limits,
            retry: settings.retry,
            agent,
            book: Book {
                accounts: Arc::new(Mutex::new(Accounts::default())),
                prices: Arc::new(settings.prices),
            },
        })
    }

    /// True when at least one upstream is configured.
    pub fn is_on(&self) -> bool {
        !self.upstreams.is_empty()
    }

    /// One line for the start-up log: upstreams, where their keys come from, prices, limits.
    pub fn describe(&self) -> String {
        let upstreams: Vec<String> = self
            .upstreams
            .iter()
            .map(|upstream| match &upstream.key_env {
                Some(var) => format!(
                    "{} = {} (key from ${var})",
                    upstream.name, upstream.base_url
                ),
                None => format!("{} = {} (no key)", upstream.name, upstream.base_url),
            })
            .collect();
        format!(
            "model gateway: {}; {} priced models; cost limit {}, call limit {}",
            upstreams.join(", "),
            self.book.prices.len(),
            self.limits
                .cost_usd
                .map_or("none".to_string(), |usd| format!("{usd} USD")),
            self.limits
                .calls
                .map_or("none".to_string(), |calls| calls.to_string()),
        )
    }

    /// Picks the upstream of a call and the model name it gets: `X-Upstream: NAME`, else a
    /// `NAME/` prefix of the model naming an upstream (stripped), else the only upstream.
    fn route(&self, asked: Option<&str>, model: &str) -> Result<(&Upstream, String), Error> {
        let names = || {
            self.upstreams
                .iter()
                .map(|upstream| upstream.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let by_name = |name: &str| self.upstreams.iter().find(|upstream| upstream.name == name);
        if self.upstreams.is_empty() {
            return Err(Error::BadRequest(
                "the model gateway has no upstream: start the server with --model-upstream NAME=URL"
                    .into(),
            ));
        }
        let prefixed = model
            .split_once('/')
            .and_then(|(name, rest)| Some((by_name(name)?, rest)));
        if let Some(asked) = asked {
            let upstream = by_name(asked).ok_or_else(|| {
                Error::BadRequest(format!(
                    "{UPSTREAM_HEADER} '{asked}' is not an upstream of this server; the upstreams are: {}",
                    names()
                ))
            })?;
            let model = match prefixed {
                Some((named, rest)) if named.name == upstream.name => rest,
                _ => model,
            };
            return Ok((upstream, model.to_string()));
        }
        if let Some((upstream, rest)) = prefixed {
            return Ok((upstream, rest.to_string()));
        }
        if let [only] = self.upstreams.as_slice() {
            return Ok((only, model.to_string()));
        }
        Err(Error::BadRequest(format!(
            "model '{model}' names no upstream: write it as NAME/{model} with NAME one of {}, or send the header {UPSTREAM_HEADER}: NAME",
            names()
        )))
    }

    /// Forwards one call: checks it, counts it against the limits, sends it (retrying 429,
    /// 5xx and connection failures), and answers what the upstream answered. A plain answer is
    /// priced here; a streamed one when it ends.
    pub fn forward(
        &self,
        api: Api,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Forwarded, Error> {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(field, _)| field.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.trim())
        };
        let mut request = api::json_object(body)?;
        let model = match request.get("model") {
            Some(Value::String(model)) if !model.is_empty() => model.clone(),
            _ => {
                return Err(Error::BadRequest(
                    "model is required: a string such as \"gpt-4o\" or \"NAME/gpt-4o\" (NAME an upstream)"
                        .into(),
                ))
            }
        };
        let (upstream, model) = self.route(header(UPSTREAM_HEADER), &model)?;
        let run_id = header(RUN_ID_HEADER)
            .filter(|run_id| !run_id.is_empty())
            .map(|run_id| api::checked_run_id(run_id, RUN_ID_HEADER))
            .transpose()?;
        let stream = request.get("stream") == Some(&Value::Bool(true));
        request.insert("model".into(), Value::from(model.clone()));
        if stream && api == Api::OpenAi {
            ask_for_usage(&mut request);
        }
        let payload = Value::Object(request).to_string();

        let outgoing = upstream_headers(api, upstream.key.as_ref(), headers);
        self.book
            .accounts
            .lock()
            .admit(run_id.as_deref(), &self.limits)
            .map_err(Error::LimitReached)?;
        let call = Call {
            api,
            upstream: upstream.name.clone(),
            model,
            run_id,
        };
        let url = format!("{}{}", upstream.base_url, api.path());
        let (response, attempts) = self
            .send(&upstream.name, &url, &outgoing, payload.as_bytes())
            .inspect_err(|_| self.book.settle(&call, None, None, true))?;

        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let answer_headers = client_headers(response.headers());
        let body = response.into_body();
        let answered = (200..300).contains(&status);
        if answered && stream {
            return Ok(Forwarded {
                status,
                content_type,
                headers: answer_headers,
                body: ForwardedBody::Stream(Box::new(Metered::new(
                    body.into_reader(),
                    self.book.clone(),
                    call,
                ))),
            });
        }
        let bytes = body
            .into_with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec()
            .map_err(|source| {
                self.book.settle(&call, None, None, true);
                Error::Upstream {
                    upstream: call.upstream.clone(),
                    attempts,
                    source,
                }
            })?;
        if answered {
            let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let tokens = answer.get("usage").and_then(|usage| Tokens::of(api, usage));
            let answered_model = answer.get("model").and_then(Value::as_str);
            self.book.settle(&call, tokens, answered_model, false);
        } else {
            self.book.settle(&call, None, None, true);
        }
        Ok(Forwarded {
            status,
            content_type,
            headers: answer_headers,
            body: ForwardedBody::Full(bytes),
        })
    }

    /// Sends until an answer that is not worth retrying, or the retries run out; returns the
    /// last answer (an error status included) and the number of attempts.
    fn send(
        &self,
        upstream: &str,
        url: &str,
        headers: &[(String, String)],
        payload: &[u8],
    ) -> Result<(ureq::http::Response<ureq::Body>, u32), Error> {
        let mut attempt = 1;
        loop {
            let mut request = self.agent.post(url);
            for (name, value) in headers {
                request = request.header(name.as_str(), value.as_str());
            }
            let outcome = request.send(payload);
            let worth_retrying = match &outcome {
                Ok(response) if is_retryable(response.status().as_u16()) => Some((
                    format!("answered {}", response.status().as_u16()),
                    retry_after(response.headers()),
                )),
                Err(error) if is_transient(error) => Some((error.to_string(), None)),
                _ => None,
            };
            let Some((why, asked_pause)) = worth_retrying.filter(|_| attempt <= self.retry.retries)
            else {
                return outcome
                    .map(|response| (response, attempt))
                    .map_err(|source| Error::Upstream {
                        upstream: upstream.to_string(),
                        attempts: attempt,
                        source,
                    });
            };
            drop(outcome);
            let pause = self.retry.pause(attempt, asked_pause);
            log::warn!(
                "model upstream '{upstream}' {why} (attempt {attempt} of {}); retrying in {:.2} s",
                self.retry.retries + 1,
                pause.as_secs_f64()
            );
            self.book.accounts.lock().retries += 1;
            std::thread::sleep(pause);
            attempt += 1;
        }
    }

    /// Adds the gateway's numbers to `/stats` (when it has upstreams): `model` (totals,
    /// retries, limits, upstreams), `model_runs` (usage per `run_id`, filtered like the
    /// instances), and `model` in each instance row whose `run_id` made calls.
    pub fn add_to_stats(&self, stats: &mut Value, run_id_filter: Option<&str>) {
        if !self.is_on() {
            return;
        }
        let (total, retries, runs_forgotten, runs) = {
            let accounts = self.book.accounts.lock();
            let runs: BTreeMap<String, Usage> = accounts
                .runs
                .iter()
                .filter(|(run_id, _)| run_id_filter.is_none_or(|needle| run_id.contains(needle)))
                .map(|(run_id, run)| (run_id.clone(), run.usage))
                .collect();
            (
                accounts.total,
                accounts.retries,
                accounts.runs_forgotten,
                runs,
            )
        };
        if let Some(rows) = stats["instances"].as_array_mut() {
            for row in rows {
                let usage = row["run_id"].as_str().and_then(|run_id| runs.get(run_id));
                if let Some(usage) = usage {
                    row["model"] = usage.json();
                }
            }
        }
        let mut model = total.json();
        model["retries"] = json!(retries);
        model["runs_forgotten"] = json!(runs_forgotten);
        model["limits"] = json!({"cost_usd": self.limits.cost_usd, "calls": self.limits.calls});
        model["upstreams"] = self
            .upstreams
            .iter()
            .map(|upstream| Value::from(upstream.name.as_str()))
            .collect();
        stats["model"] = model;
        stats["model_runs"] = runs
            .into_iter()
            .map(|(run_id, usage)| (run_id, usage.json()))
            .collect::<Map<String, Value>>()
            .into();
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
                total.cost_usd,
            ),
        ] {
            family(out, name, "counter", help, &plain(value));
        }
    }
}

/// The headers of a call to an upstream: the client's that the upstream may need, the
/// content type, Anthropic's version, and the upstream's key in the API's own header.
fn upstream_headers(
    api: Api,
    key: Option<&Secret>,
    client: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = client
        .iter()
        .map(|(field, value)| (field.to_ascii_lowercase(), value.to_string()))
        .filter(|(field, _)| {
            FORWARDED_REQUEST_HEADERS
                .iter()
                .any(|prefix| field.starts_with(prefix))
        })
        .collect();
    headers.push(("content-type".into(), "application/json".into()));
    if api == Api::Anthropic
        && !headers
            .iter()
            .any(|(field, _)| field == "anthropic-version")
    {
        headers.push(("anthropic-version".into(), DEFAULT_ANTHROPIC_VERSION.into()));
    }
    if let Some(Secret(key)) = key {
        headers.push(match api {
            Api::OpenAi => ("authorization".into(), format!("Bearer {key}")),
            Api::Anthropic => ("x-api-key".into(), key.clone()),
        });
    }
    headers
}

/// The upstream's answer headers the client may need (`retry-after`, request ids, rate limits).
fn client_headers(upstream: &ureq::http::HeaderMap) -> Vec<(String, String)> {
    upstream
        .iter()
        .filter(|(name, _)| {
            FORWARDED_ANSWER_HEADERS
                .iter()
                .any(|prefix| name.as_str().starts_with(prefix))
        })
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

/// Asks an OpenAI-compatible upstream for the usage chunk at the end of a stream
/// (`stream_options.include_usage`), unless the client already said either way.
fn ask_for_usage(request: &mut Map<String, Value>) {
    let options = request.entry("stream_options").or_insert_with(|| json!({}));
    if options.is_null() {
        *options = json!({});
    }
    if let Value::Object(options) = options {
        options.entry("include_usage").or_insert(Value::Bool(true));
    }
}

/// What a stream told about its usage so far.
#[derive(Default)]
struct StreamUsage {
    /// The usage fields seen, the later ones over the earlier (Anthropic's `message_delta`
    /// carries cumulative counts).
    usage: Map<String, Value>,
    model: Option<String>,
}

impl StreamUsage {
    /// Takes what one `data:` event says: OpenAI's chunks carry `usage` in the last one (with
    /// `include_usage`); Anthropic's `message_start` the input and `message_delta` the output.
    fn take(&mut self, api: Api, event: &Value) {
        let (usage, model) = match api {
            Api::OpenAi => (event.get("usage"), event.get("model")),
            Api::Anthropic => match event.get("type").and_then(Value::as_str) {
                Some("message_start") => (
                    event.pointer("/message/usage"),
                    event.pointer("/message/model"),
                ),
                Some("message_delta") => (event.get("usage"), None),
                _ => (None, None),
            },
        };
        if let Some(Value::Object(usage)) = usage {
            for (key, value) in usage {
                if !value.is_null() {
                    self.usage.insert(key.clone(), value.clone());
                }
            }
        }
        if self.model.is_none() {
            self.model = model.and_then(Value::as_str).map(String::from);
        }
    }

    fn tokens(&self, api: Api) -> Option<Tokens> {
        if self.usage.is_empty() {
            None
        } else {
            Tokens::of(api, &Value::Object(self.usage.clone()))
        }
    }
}

/// A streamed answer, passed through byte for byte while its `data:` lines are read for
/// usage; the call is settled once, at the end of the stream or when it is dropped (the client
/// went away). An upstream that breaks off mid-stream ends the stream with an error event the
/// client's SDK raises, instead of leaving the client waiting for more.
struct Metered<R: Read> {
    inner: R,
    book: Book,
    call: Call,
    /// The line being received, when it is short enough to be scanned.
    line: Vec<u8>,
    /// The current line ran past [`MAX_EVENT_LINE_BYTES`]: skip it.
    skipping: bool,
    seen: StreamUsage,
    settled: bool,
    /// The error event still to be sent after the upstream broke off.
    tail: Option<io::Cursor<Vec<u8>>>,
}

impl<R: Read> Metered<R> {
    fn new(inner: R, book: Book, call: Call) -> Metered<R> {
        Metered {
            inner,
            book,
            call,
            line: Vec::new(),
            skipping: false,
            seen: StreamUsage::default(),
            settled: false,
            tail: None,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for piece in bytes.split_inclusive(|&byte| byte == b'\n') {
            if !self.skipping {
                if self.line.len() + piece.len() <= MAX_EVENT_LINE_BYTES {
                    self.line.extend_from_slice(piece);
                } else {
                    self.skipping = true;
                    self.line.clear();
                }
            }
            if piece.ends_with(b"\n") {
                if !self.skipping {
                    let line = std::mem::take(&mut self.line);
                    self.event_line(&line);
                }
                self.skipping = false;
                self.line.clear();
            }
        }
    }

    fn event_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        // Most chunks carry text only: parse those that can tell something.
        let telling = self.seen.model.is_none()
            || data
                .windows(b"usage".len())
                .any(|window| window == b"usage");
        if telling {
            if let Ok(event) = serde_json::from_slice::<Value>(data) {
                self.seen.take(self.call.api, &event);
            }
        }
    }

    fn settle(&mut self, failed: bool) {
        if !std::mem::replace(&mut self.settled, true) {
            let tokens = self.seen.tokens(self.call.api);
            self.book
                .settle(&self.call, tokens, self.seen.model.as_deref(), failed);
        }
    }
}

/// The event that ends a stream the upstream broke off, in the API's own error shape.
fn error_event(api: Api, message: &str) -> Vec<u8> {
    let event = match api {
        Api::OpenAi => format!(
            "\n\ndata: {}\n\n",
            json!({"error": {"message": message, "type": "upstream_error"}})
        ),
        Api::Anthropic => format!(
            "\n\nevent: error\ndata: {}\n\n",
            json!({"type": "error", "error": {"type": "api_error", "message": message}})
        ),
    };
    event.into_bytes()
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(tail) = &mut self.tail {
            return tail.read(buf);
        }
        match self.inner.read(buf) {
            Ok(0) => {
                self.settle(false);
                Ok(0)
            }
            Ok(read) => {
                self.scan(&buf[..read]);
                Ok(read)
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Err(err),
            Err(err) => {
                let message = format!(
                    "model upstream '{}' broke off its stream: {err}",
                    self.call.upstream
                );
                log::warn!("{message}");
                self.settle(true);
                let mut tail = io::Cursor::new(error_event(self.call.api, &message));
                let read = tail.read(buf)?;
                self.tail = Some(tail);
                Ok(read)
            }
        }
    }
}

impl<R: Read> Drop for Metered<R> {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (or the answer could not be sent).
        self.settle(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn upstream(name: &str) -> Upstream {
        Upstream::parse(&format!("{name}=http://127.0.0.1:9"), no_env).unwrap()
    }

    fn gateway(upstreams: Vec<Upstream>, prices: Prices, limits: Limits) -> Gateway {
        Gateway::new(GatewaySettings {
            upstreams,
            prices,
            limits,
            retry: Retry {
                retries: 0,
                backoff: Duration::ZERO,
            },
            timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    fn prices() -> Prices {
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
    fn upstream_specs() {
        let env = |var: &str| (var == "KEY").then(|| "sk-1".to_string());
        let parsed = Upstream::parse("oa=https://api.openai.com/,key_env=KEY", env).unwrap();
        assert_eq!(parsed.name, "oa");
        assert_eq!(parsed.base_url, "https://api.openai.com");
        assert_eq!(parsed.key_env.as_deref(), Some("KEY"));
        assert!(!format!("{parsed:?}").contains("sk-1"), "{parsed:?}");
        let keyless = Upstream::parse("local=http://127.0.0.1:4000", env).unwrap();
        assert!(keyless.key.is_none());
        for (spec, needle) in [
            ("nourl", "NAME=URL"),
            ("a/b=http://x", "the name 'a/b'"),
            ("=http://x", "the name ''"),
            ("a=ftp://x", "not an http:// or https:// URL"),
            ("a=http://", "not an http:// or https:// URL"),
            ("a=http://x,key=K", "unknown option 'key=K'"),
            (
                "a=http://x,key_env=MISSING",
                "MISSING (its API key) is not set",
            ),
        ] {
            let err = Upstream::parse(spec, env).unwrap_err();
            assert!(err.contains(needle), "{spec}: {err}");
        }
        let bad_key = Upstream::parse("a=http://x,key_env=K", |_| Some("sk 1\n".into()));
        assert!(bad_key.unwrap_err().contains("cannot carry"));
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
        let cost = prices.find("oa", ["gpt-4o"]).unwrap().cost_usd(&openai);
        let expected = 600.0 * 2.5e-6 + 400.0 * 1.25e-6 + 100.0 * 1e-5;
        assert!((cost - expected).abs() < 1e-12, "{cost} != {expected}");

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
            .cost_usd(&anthropic);
        let expected = 10.0 * 3e-6 + 100.0 * 3e-7 + 50.0 * 3.75e-6 + 20.0 * 1.5e-5;
        assert!((cost - expected).abs() < 1e-12, "{cost} != {expected}");
        assert_eq!(Tokens::of(Api::OpenAi, &json!({})), None);
        assert_eq!(Tokens::of(Api::Anthropic, &Value::Null), None);
    }

    #[test]
    fn routing_by_prefix_header_or_the_only_upstream() {
        let one = gateway(vec![upstream("or")], Prices::default(), Limits::default());
        let (chosen, model) = one.route(None, "meta/llama").unwrap();
        assert_eq!((chosen.name.as_str(), model.as_str()), ("or", "meta/llama"));
        let (_, model) = one.route(None, "or/meta/llama").unwrap();
        assert_eq!(model, "meta/llama");

        let two = gateway(
            vec![upstream("oa"), upstream("an")],
            Prices::default(),
            Limits::default(),
        );
        let (chosen, model) = two.route(None, "an/claude").unwrap();
        assert_eq!((chosen.name.as_str(), model.as_str()), ("an", "claude"));
        let (chosen, model) = two.route(Some("oa"), "gpt-4o").unwrap();
        assert_eq!((chosen.name.as_str(), model.as_str()), ("oa", "gpt-4o"));
        let (chosen, model) = two.route(Some("oa"), "an/claude").unwrap();
        assert_eq!((chosen.name.as_str(), model.as_str()), ("oa", "an/claude"));
        let err = two.route(None, "gpt-4o").unwrap_err().to_string();
        assert!(
            err.contains("oa, an") && err.contains("X-Upstream"),
            "{err}"
        );
        let err = two.route(Some("zz"), "gpt-4o").unwrap_err().to_string();
        assert!(err.contains("'zz'") && err.contains("oa, an"), "{err}");

        let none = gateway(Vec::new(), Prices::default(), Limits::default());
        let err = none.route(None, "gpt-4o").unwrap_err().to_string();
        assert!(err.contains("--model-upstream"), "{err}");
        assert!(Gateway::new(GatewaySettings {
            upstreams: vec![upstream("a"), upstream("a")],
            prices: Prices::default(),
            limits: Limits::default(),
            retry: Retry {
                retries: 0,
                backoff: Duration::ZERO
            },
            timeout: Duration::from_secs(1),
        })
        .is_err());
    }

    #[test]
    fn limits_count_calls_when_admitted() {
        let mut accounts = Accounts::default();
        let limits = Limits {
            cost_usd: Some(1.0),
            calls: Some(3),
        };
        accounts.admit(Some("r1"), &limits).unwrap();
        accounts.record(
            Some("r1"),
            &Outcome {
                tokens: Some(Tokens::default()),
                cost_usd: Some(0.4),
                failed: false,
            },
        );
        accounts.admit(None, &limits).unwrap();
        accounts.record(
            None,
            &Outcome {
                tokens: None,
                cost_usd: Some(0.7),
                failed: false,
            },
        );
        let hit = accounts.admit(Some("r1"), &limits).unwrap_err();
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
                cost_usd: Some(0.5),
                failed: false,
            },
            Outcome {
                tokens: Some(Tokens::default()),
                cost_usd: None,
                failed: false,
            },
            Outcome {
                failed: true,
                ..Outcome::default()
            },
        ] {
            accounts.admit(Some("r"), &limits).unwrap();
            accounts.record(Some("r"), &outcome);
        }
        let expected = Usage {
            calls: 3,
            input_tokens: 10,
            output_tokens: 5,
            cost_usd: 0.5,
            unpriced_calls: 1,
            failed_calls: 1,
        };
        assert_eq!(accounts.total, expected);
        assert_eq!(accounts.runs["r"].usage, expected);
    }

    #[test]
    fn the_oldest_run_is_forgotten_past_the_cap() {
        let mut accounts = Accounts::default();
        let limits = Limits::default();
        for index in 0..MAX_TRACKED_RUNS {
            accounts.admit(Some(&format!("r{index}")), &limits).unwrap();
        }
        accounts.admit(Some("r0"), &limits).unwrap();
        accounts.admit(Some("new"), &limits).unwrap();
        assert_eq!(accounts.runs.len(), MAX_TRACKED_RUNS);
        assert!(accounts.runs.contains_key("r0") && !accounts.runs.contains_key("r1"));
        assert_eq!(accounts.runs_forgotten, 1);
        assert_eq!(accounts.total.calls, MAX_TRACKED_RUNS as u64 + 2);
    }

    #[test]
    fn backoff_doubles_and_retry_after_wins_both_capped() {
        let retry = Retry {
            retries: 5,
            backoff: Duration::from_millis(500),
        };
        assert_eq!(retry.pause(1, None), Duration::from_millis(500));
        assert_eq!(retry.pause(3, None), Duration::from_secs(2));
        assert_eq!(retry.pause(40, None), MAX_BACKOFF);
        let asked = Some(Duration::from_secs(2));
        assert_eq!(retry.pause(1, asked), Duration::from_secs(2));
        assert_eq!(
            retry.pause(1, Some(Duration::from_secs(3600))),
            MAX_RETRY_AFTER
        );
        let mut headers = ureq::http::HeaderMap::new();
        headers.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(250)));
        let mut dated = ureq::http::HeaderMap::new();
        dated.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&dated), None);
        assert!(is_retryable(429) && is_retryable(500) && is_retryable(503));
        assert!(!is_retryable(400) && !is_retryable(401) && !is_retryable(404));
    }

    #[test]
    fn upstreams_get_their_key_in_the_api_header_and_never_the_clients() {
        let key = Secret("sk-1".into());
        let client = [
            ("Authorization", "Bearer arservice-token"),
            ("X-Api-Key", "client-key"),
            ("X-Run-Id", "r1"),
            ("Anthropic-Beta", "b1"),
            ("x-portkey-virtual-key", "vk"),
        ];
        let openai = upstream_headers(Api::OpenAi, Some(&key), &client);
        let pairs = |headers: &[(String, String)]| -> Vec<String> {
            headers
                .iter()
                .map(|(field, value)| format!("{field}: {value}"))
                .collect()
        };
        assert_eq!(
            pairs(&openai),
            [
                "anthropic-beta: b1",
                "x-portkey-virtual-key: vk",
                "content-type: application/json",
                "authorization: Bearer sk-1"
            ]
        );
        let anthropic = upstream_headers(Api::Anthropic, Some(&key), &client);
        assert_eq!(
            pairs(&anthropic)[2..],
            [
                "content-type: application/json",
                "anthropic-version: 2023-06-01",
                "x-api-key: sk-1"
            ]
        );
        let keyless = upstream_headers(Api::Anthropic, None, &[("anthropic-version", "v")]);
        assert_eq!(
            pairs(&keyless),
            ["anthropic-version: v", "content-type: application/json"]
        );
    }

    #[test]
    fn streams_ask_for_usage_unless_told_otherwise() {
        let mut request = json!({"model": "m", "stream": true})
            .as_object()
            .unwrap()
            .clone();
        ask_for_usage(&mut request);
        assert_eq!(request["stream_options"], json!({"include_usage": true}));
        let mut request = json!({"stream_options": {"include_usage": false}})
            .as_object()
            .unwrap()
            .clone();
        ask_for_usage(&mut request);
        assert_eq!(request["stream_options"], json!({"include_usage": false}));
        let mut request = json!({"stream_options": null}).as_object().unwrap().clone();
        ask_for_usage(&mut request);
        assert_eq!(request["stream_options"], json!({"include_usage": true}));
    }

    /// A reader that hands out its pieces one per read, then fails or ends.
    struct Pieces(Vec<Vec<u8>>, bool);

    impl Read for Pieces {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return if self.1 {
                    Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
                } else {
                    Ok(0)
                };
            }
            let mut piece = self.0.remove(0);
            let read = piece.len().min(buf.len());
            buf[..read].copy_from_slice(&piece[..read]);
            if read < piece.len() {
                self.0.insert(0, piece.split_off(read));
            }
            Ok(read)
        }
    }

    fn metered(api: Api, pieces: Vec<&str>, fails: bool) -> (Vec<u8>, Usage, Book) {
        let book = Book {
            accounts: Arc::new(Mutex::new(Accounts::default())),
            prices: Arc::new(prices()),
        };
        book.accounts
            .lock()
            .admit(Some("r"), &Limits::default())
            .unwrap();
        let call = Call {
            api,
            upstream: "up".into(),
            model: "requested".into(),
            run_id: Some("r".into()),
        };
        let source = Pieces(
            pieces
                .iter()
                .map(|piece| piece.as_bytes().to_vec())
                .collect(),
            fails,
        );
        let mut out = Vec::new();
        Metered::new(source, book.clone(), call)
            .read_to_end(&mut out)
            .unwrap();
        let usage = book.accounts.lock().runs["r"].usage;
        (out, usage, book)
    }

    #[test]
    fn openai_streams_pass_through_and_count_the_last_chunk() {
        let pieces = vec![
            "data: {\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            "data: {\"model\":\"gpt-4o\",\"choices\":[],\"usa",
            "ge\":{\"prompt_tokens\":100,\"completion_tokens\":20}}\r\n\r\n",
            "data: [DONE]\n\n",
        ];
        let (out, usage, _) = metered(Api::OpenAi, pieces.clone(), false);
        assert_eq!(String::from_utf8(out).unwrap(), pieces.concat());
        assert_eq!((usage.input_tokens, usage.output_tokens), (100, 20));
        let expected = 100.0 * 2.5e-6 + 20.0 * 1e-5;
        assert!((usage.cost_usd - expected).abs() < 1e-12, "{usage:?}");
        assert_eq!((usage.failed_calls, usage.unpriced_calls), (0, 0));
    }

    #[test]
    fn anthropic_streams_count_message_start_and_delta() {
        let pieces = vec![
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4\",\"usage\":{\"input_tokens\":30,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":42}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ];
        let (_, usage, _) = metered(Api::Anthropic, pieces, false);
        assert_eq!((usage.input_tokens, usage.output_tokens), (30, 42));
        let expected = 30.0 * 3e-6 + 42.0 * 1.5e-5;
        assert!((usage.cost_usd - expected).abs() < 1e-12, "{usage:?}");
    }

    #[test]
    fn a_broken_stream_ends_with_an_error_event_and_counts_as_failed() {
        let first = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7}}}\n\n";
        let (out, usage, _) = metered(Api::Anthropic, vec![first, "data: {\"ty"], true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(first), "{text}");
        assert!(
            text.ends_with("\n\nevent: error\ndata: {\"error\":{\"message\":\"model upstream 'up' broke off its stream: reset\",\"type\":\"api_error\"},\"type\":\"error\"}\n\n"),
            "{text}"
        );
        assert_eq!((usage.input_tokens, usage.failed_calls), (7, 1));
        let (_, usage, _) = metered(Api::OpenAi, vec!["data: {\"choices\":[]}\n\n"], false);
        assert_eq!((usage.unpriced_calls, usage.failed_calls), (1, 0));
    }

    #[test]
    fn overlong_lines_are_skipped_not_buffered() {
        let long = format!("data: {}\n", "x".repeat(MAX_EVENT_LINE_BYTES + 10));
        let usage_line = "data: {\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
        let (out, usage, _) = metered(Api::OpenAi, vec![&long, usage_line], false);
        assert_eq!(out.len(), long.len() + usage_line.len());
        assert_eq!((usage.input_tokens, usage.output_tokens), (1, 2));
    }
}
