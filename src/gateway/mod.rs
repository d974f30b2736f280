//! The model gateway: a rollout's LLM calls go through arservice, so that one service accounts
//! for a rollout's sandbox and its model spend together.
//!
//! [`Gateway::forward`] takes one call of `/v1/chat/completions` (OpenAI-compatible) or
//! `/v1/messages` (Anthropic), picks its upstream, counts it against the limits, sends it with
//! retries, and hands back the upstream's answer, a stream metered on its way. The parts:
//!
//! | file | owns |
//! | --- | --- |
//! | `upstream.rs` | `--model-upstream`, routing a call to an upstream, the headers that cross |
//! | `prices.rs` | `--model-prices`, the tokens of an answer, money in picodollars |
//! | `accounts.rs` | usage per `run_id` and in total, the limits, settling a call |
//! | `transport.rs` | the HTTP agent, retries and backoff, what a failure is |
//! | `stream.rs` | server-sent events passed through and metered, cut streams |
//! | `stats.rs` | the gateway's typed part of `/stats`, and its Prometheus counters |
//! | `error.rs` | [`GatewayError`], which the service's error wraps |
//!
//! A lower layer: it uses only `metrics` of this crate, never the API, the service or HTTP;
//! the caller checks `X-Run-Id` and maps [`GatewayError`] to a status. Never logs, echoes or
//! writes anywhere an API key; never rewrites an upstream's answer (status, body and bytes of a
//! stream reach the client as they came, a cut stream gets an error event added); never holds
//! the accounts lock across network I/O or a pause.

mod accounts;
mod error;
mod prices;
mod stats;
mod stream;
mod transport;
mod upstream;

pub use accounts::{LimitHit, Limits, Usage, MAX_TRACKED_RUNS};
pub use error::GatewayError;
pub use prices::Prices;
pub use stats::{GatewayStats, ModelTotals};
pub use transport::Retry;
pub use upstream::Upstream;

use crate::run_id::RunId;
use accounts::{Book, Call};
use prices::Tokens;
use serde_json::{Map, Value};
use std::fmt;
use std::io::Read;
use std::time::Duration;
use stream::Metered;
use transport::Transport;

/// The header that names the rollout a call belongs to (checked by the caller).
pub const RUN_ID_HEADER: &str = "X-Run-Id";

/// The header that picks an upstream by name, whatever the model is called.
pub const UPSTREAM_HEADER: &str = "X-Upstream";

/// Largest answer read from an upstream when it is not streamed (a chat answer is kilobytes).
const MAX_ANSWER_BYTES: u64 = 64 * 1024 * 1024;

/// The gateway's routes, as an unknown path's answer names them.
pub const ROUTES: &str = "the model gateway's routes are POST /v1/chat/completions (OpenAI SDKs: base_url http://HOST:PORT/v1) and POST /v1/messages (Anthropic SDKs: base_url http://HOST:PORT)";

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

/// A path that an OpenAI or Anthropic SDK may call (`/v1/...`, or one of their resources
/// under a base URL that lacks `/v1`): an unknown one answers in the SDKs' error shape.
pub fn is_sdk_path(path: &str) -> bool {
    const RESOURCES: [&str; 6] = [
        "chat",
        "messages",
        "models",
        "completions",
        "embeddings",
        "responses",
    ];
    let rest = path.strip_prefix("/v1").unwrap_or(path);
    path.starts_with("/v1/")
        || RESOURCES.contains(&rest.trim_start_matches('/').split('/').next().unwrap_or(""))
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

/// A call checked and ready to send.
struct Prepared<'a> {
    upstream: &'a Upstream,
    /// The model as the upstream gets it.
    model: String,
    stream: bool,
    payload: String,
}

/// The gateway: upstreams, prices, limits and the accounts.
pub struct Gateway {
    upstreams: Vec<Upstream>,
    limits: Limits,
    transport: Transport,
    book: Book,
}

impl Gateway {
    /// Refuses two upstreams of one name.
    pub fn new(settings: GatewaySettings) -> Result<Gateway, String> {
        upstream::check_names(&settings.upstreams)?;
        Ok(Gateway {
            upstreams: settings.upstreams,
            limits: settings.limits,
            transport: Transport::new(settings.retry, settings.timeout),
            book: Book::new(settings.prices),
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

    /// Forwards one call of `run_id` (from `X-Run-Id`, checked by the caller): checks it,
    /// counts it against the limits, sends it (retrying 429, 5xx and connection failures), and
    /// answers what the upstream answered. A plain answer is priced here; a streamed one when
    /// it ends.
    pub fn forward(
        &self,
        api: Api,
        run_id: Option<RunId>,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Forwarded, GatewayError> {
        let prepared = self.prepare(api, headers, body)?;
        let upstream = prepared.upstream;
        let outgoing = upstream::upstream_headers(api, upstream.key.as_ref(), headers);
        self.book
            .accounts
            .lock()
            .admit(run_id.as_ref(), &self.limits)
            .map_err(GatewayError::LimitReached)?;
        let call = Call {
            api,
            upstream: upstream.name.clone(),
            model: prepared.model,
            run_id,
        };
        let url = format!("{}{}", upstream.base_url, api.path());
        let count_retry = || self.book.accounts.lock().retries += 1;
        let (response, attempts) = self
            .transport
            .send(
                &call.upstream,
                &url,
                &outgoing,
                prepared.payload.as_bytes(),
                count_retry,
            )
            .inspect_err(|_| self.book.settle(&call, None, None, true))?;
        self.answer(call, prepared.stream, response, attempts)
    }

    /// Reads the call's body: its model routed to an upstream, and the payload that goes
    /// there (the model as the upstream knows it; a usage chunk asked for in OpenAI streams).
    fn prepare(
        &self,
        api: Api,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Prepared<'_>, GatewayError> {
        let mut request = json_object(body)?;
        let model = match request.get("model") {
            Some(Value::String(model)) if !model.is_empty() => model.clone(),
            _ => {
                return Err(GatewayError::Invalid(
                    "model is required: a string such as \"gpt-4o\" or \"NAME/gpt-4o\" (NAME an upstream)"
                        .into(),
                ))
            }
        };
        let asked = headers
            .iter()
            .find(|(field, _)| field.eq_ignore_ascii_case(UPSTREAM_HEADER))
            .map(|(_, value)| value.trim());
        let (upstream, model) = upstream::route(&self.upstreams, asked, &model)?;
        let stream = request.get("stream") == Some(&Value::Bool(true));
        request.insert("model".into(), Value::from(model.clone()));
        if stream && api == Api::OpenAi {
            stream::ask_for_usage(&mut request);
        }
        Ok(Prepared {
            upstream,
            model,
            stream,
            payload: Value::Object(request).to_string(),
        })
    }

    /// The upstream's answer for the client: a stream is handed on metered; a plain answer
    /// is read whole and priced.
    fn answer(
        &self,
        call: Call,
        stream: bool,
        response: ureq::http::Response<ureq::Body>,
        attempts: u32,
    ) -> Result<Forwarded, GatewayError> {
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let headers = upstream::client_headers(response.headers());
        let answered = (200..300).contains(&status);
        if answered && stream {
            let ends_by_closing = stream::ends_by_closing(response.headers());
            let reader = response.into_body().into_reader();
            let metered = Metered::new(reader, self.book.clone(), call, ends_by_closing);
            return Ok(Forwarded {
                status,
                content_type,
                headers,
                body: ForwardedBody::Stream(Box::new(metered)),
            });
        }
        let bytes = response
            .into_body()
            .into_with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec()
            .map_err(|source| {
                self.book.settle(&call, None, None, true);
                self.transport.failure(&call.upstream, attempts, source)
            })?;
        if answered {
            let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let tokens = answer
                .get("usage")
                .and_then(|usage| Tokens::of(call.api, usage));
            let answered_model = answer.get("model").and_then(Value::as_str);
            self.book.settle(&call, tokens, answered_model, false);
        } else {
            self.book.settle(&call, None, None, true);
        }
        Ok(Forwarded {
            status,
            content_type,
            headers,
            body: ForwardedBody::Full(bytes),
        })
    }
}

/// The call's body as a JSON object.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => {
            let kind = match other {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Array(_) => "an array",
                Value::Object(_) => "an object",
            };
            Err(GatewayError::Invalid(format!(
                "the body must be a JSON object, got {kind}"
            )))
        }
        Err(err) => Err(GatewayError::Invalid(format!(
            "the body is not valid JSON: {err}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_paths_are_told_apart_from_the_sandbox_api() {
        for path in [
            "/v1/models",
            "/v1/messages/count_tokens",
            "/v1/responses",
            "/models",
            "/chat/completions",
            "/messages",
        ] {
            assert!(is_sdk_path(path), "{path}");
        }
        for path in ["/", "/start_instance", "/stats/x", "/v1", "/modelsx"] {
            assert!(!is_sdk_path(path), "{path}");
        }
    }

    #[test]
    fn bodies_must_be_json_objects() {
        for (body, needle) in [
            (&b"[1]"[..], "got an array"),
            (b"{oops", "not valid JSON"),
            (b"null", "got null"),
        ] {
            let err = json_object(body).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        assert!(json_object(b"{}").is_ok());
    }
}
