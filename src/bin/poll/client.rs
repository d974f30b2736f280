//! Reading `/stats`: the filters as a query, the HTTP client with its token and bounds, and
//! why a read failed ([`FetchError`], each message naming the URL).

use super::*;

/// Why one read of `/stats` failed; each message names the URL.
#[derive(Debug)]
pub(crate) enum FetchError {
    /// No HTTP answer at all: refused, timed out, unknown host, connection cut.
    Unreachable { url: String, cause: String },
    /// An answer that is not a success; `detail` is the server's own words.
    Status {
        url: String,
        status: u16,
        detail: String,
        hint: &'static str,
    },
    /// A success whose body is not a `/stats` document.
    NotStats { url: String, cause: String },
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Unreachable { url, cause } => {
                write!(f, "cannot reach arservice at {url}: {cause}")
            }
            FetchError::Status {
                url,
                status,
                detail,
                hint,
            } => write!(f, "{url}/stats answered {status}: {detail}{hint}"),
            FetchError::NotStats { url, cause } => {
                write!(f, "{url}/stats is not an arservice /stats answer: {cause}")
            }
        }
    }
}

impl std::error::Error for FetchError {}

/// The `/stats` filters, sent as the query parameters `run_id` and `container_name`.
pub(crate) struct Filters {
    pub(crate) run_id: Option<String>,
    pub(crate) container: Option<String>,
}

impl Filters {
    pub(crate) fn query(&self) -> String {
        let pairs: Vec<String> = [
            ("run_id", &self.run_id),
            ("container_name", &self.container),
        ]
        .into_iter()
        .filter_map(|(key, value)| {
            value
                .as_deref()
                .filter(|value| !value.is_empty())
                .map(|value| format!("{key}={}", percent_encode(value)))
        })
        .collect();
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    }

    /// `run_id ~ "eval", image ~ "sweb"`, or `None` without filters.
    pub(crate) fn describe(&self) -> Option<String> {
        let parts: Vec<String> = [("run_id", &self.run_id), ("image", &self.container)]
            .into_iter()
            .filter_map(|(name, value)| {
                value
                    .as_deref()
                    .filter(|value| !value.is_empty())
                    .map(|value| format!("{name} ~ {value:?}"))
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// Encodes everything but RFC 3986's unreserved characters as `%XX` of its UTF-8 bytes.
pub(crate) fn percent_encode(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Reads `/stats`, with the filters and the token.
pub(crate) struct Client {
    pub(crate) agent: ureq::Agent,
    /// Without a trailing slash, as shown to the user.
    pub(crate) base_url: String,
    pub(crate) stats_url: String,
    pub(crate) token: Option<String>,
}

impl Client {
    pub(crate) fn new(url: &str, filters: &Filters, token: Option<String>) -> Client {
        let trimmed = url.trim().trim_end_matches('/');
        let base_url = if trimmed.contains("://") {
            trimmed.to_string()
        } else {
            format!("http://{trimmed}")
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(FETCH_TIMEOUT))
            .build()
            .new_agent();
        Client {
            agent,
            stats_url: format!("{base_url}/stats{}", filters.query()),
            base_url,
            token,
        }
    }

    pub(crate) fn fetch(&self) -> Result<Value, FetchError> {
        let mut request = self.agent.get(&self.stats_url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let unreachable = |err: ureq::Error| FetchError::Unreachable {
            url: self.base_url.clone(),
            cause: match err {
                ureq::Error::Io(err) => io_cause(&err),
                ureq::Error::Timeout(_) => format!(
                    "no answer within {}",
                    duration_text(FETCH_TIMEOUT.as_secs_f64())
                ),
                ureq::Error::HostNotFound => "host not found".to_string(),
                other => other.to_string(),
            },
        };
        let mut response = request.call().map_err(unreachable)?;
        let status = response.status();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_STATS_BYTES)
            .lossy_utf8(true)
            .read_to_string()
            .map_err(unreachable)?;
        if !status.is_success() {
            let detail = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|error| {
                    error
                        .get("detail")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_else(|| {
                    let text = body.lines().next().unwrap_or("").trim();
                    if text.is_empty() {
                        status.canonical_reason().unwrap_or("no detail").to_string()
                    } else {
                        cut_middle(text, DEFAULT_WIDTH)
                    }
                });
            let hint = match (status.as_u16(), &self.token) {
                (401, None) => "; pass --token or set ARS_TOKEN",
                (401, Some(_)) => "; the token given with --token or ARS_TOKEN was refused",
                _ => "",
            };
            return Err(FetchError::Status {
                url: self.base_url.clone(),
                status: status.as_u16(),
                detail,
                hint,
            });
        }
        match serde_json::from_str::<Value>(&body) {
            Ok(stats @ Value::Object(_)) => Ok(stats),
            Ok(_) => Err(FetchError::NotStats {
                url: self.base_url.clone(),
                cause: "the answer is JSON but not an object".into(),
            }),
            Err(err) => Err(FetchError::NotStats {
                url: self.base_url.clone(),
                cause: format!("the answer is not JSON ({err})"),
            }),
        }
    }
}

/// `connection refused`: an I/O error in words, without the `(os error 111)` tail.
pub(crate) fn io_cause(err: &io::Error) -> String {
    let text = err.to_string();
    let words = match text.rfind(" (os error ") {
        Some(end) if err.raw_os_error().is_some() => &text[..end],
        _ => text.as_str(),
    };
    let mut chars = words.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "connection failed".to_string(),
    }
}
