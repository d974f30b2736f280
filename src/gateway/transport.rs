//! Sending a call to an upstream: the HTTP agent, and the retries with their backoff (429,
//! 5xx and failed connections are tried again; a call past `--model-timeout` is not). Turns
//! what failed into a [`GatewayError`]. Holds no lock while it sends or pauses.

use super::error::GatewayError;
use std::io;
use std::time::Duration;

/// Longest wait for a connection (TCP and TLS) to an upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest pause the exponential backoff makes between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Longest `Retry-After` honoured: an upstream asking for more is retried after this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

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

/// The attempt ran out of `--model-timeout` (not out of the connect timeout).
fn is_timeout(error: &ureq::Error) -> bool {
    use ureq::Timeout;
    match error {
        ureq::Error::Io(err) => err.kind() == io::ErrorKind::TimedOut,
        ureq::Error::Timeout(Timeout::Connect | Timeout::Resolve) => false,
        ureq::Error::Timeout(_) => true,
        _ => false,
    }
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

/// The HTTP agent and how it retries.
pub struct Transport {
    agent: ureq::Agent,
    retry: Retry,
    /// How long one attempt may take, a streamed answer included (`--model-timeout`).
    timeout: Duration,
}

impl Transport {
    pub fn new(retry: Retry, timeout: Duration) -> Transport {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(format!("arservice/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Transport {
            agent,
            retry,
            timeout,
        }
    }

    /// Sends until an answer that is not worth retrying, or the retries run out; returns the
    /// last answer (an error status included) and the number of attempts. `on_retry` is
    /// called before each pause.
    pub fn send(
        &self,
        upstream: &str,
        url: &str,
        headers: &[(String, String)],
        payload: &[u8],
        on_retry: impl Fn(),
    ) -> Result<(ureq::http::Response<ureq::Body>, u32), GatewayError> {
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
                    .map_err(|source| self.failure(upstream, attempt, source));
            };
            drop(outcome);
            let pause = self.retry.pause(attempt, asked_pause);
            log::warn!(
                "model upstream '{upstream}' {why} (attempt {attempt} of {}); retrying in {:.2} s",
                self.retry.retries + 1,
                pause.as_secs_f64()
            );
            on_retry();
            std::thread::sleep(pause);
            attempt += 1;
        }
    }

    /// What a failed send or read of an answer is: a timeout, or an upstream failure.
    pub fn failure(&self, upstream: &str, attempts: u32, source: ureq::Error) -> GatewayError {
        if is_timeout(&source) {
            GatewayError::Timeout {
                upstream: upstream.to_string(),
                attempts,
                timeout: self.timeout,
            }
        } else {
            GatewayError::Upstream {
                upstream: upstream.to_string(),
                attempts,
                source,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_model_timeout_is_a_timeout_and_the_connect_timeout_is_not() {
        use ureq::Timeout;
        let transport = Transport::new(
            Retry {
                retries: 0,
                backoff: Duration::ZERO,
            },
            Duration::from_millis(300),
        );
        let timed_out = io::Error::new(io::ErrorKind::TimedOut, "slow");
        for error in [
            ureq::Error::Timeout(Timeout::Global),
            ureq::Error::Timeout(Timeout::RecvResponse),
            ureq::Error::Io(timed_out),
        ] {
            let failure = transport.failure("up", 1, error);
            assert!(
                matches!(failure, GatewayError::Timeout { .. }),
                "{failure:?}"
            );
            assert!(
                failure.to_string().contains("--model-timeout 0.3 s"),
                "{failure}"
            );
        }
        for error in [
            ureq::Error::Timeout(Timeout::Connect),
            ureq::Error::ConnectionFailed,
        ] {
            let failure = transport.failure("up", 4, error);
            assert!(
                matches!(failure, GatewayError::Upstream { attempts: 4, .. }),
                "{failure:?}"
            );
        }
    }
}
