//! The upstreams (`--model-upstream NAME=URL[,key_env=VAR]`): parsing them, picking the one a
//! call goes to, and the headers that cross between the client, arservice and the upstream.
//!
//! An API key lives in memory only, redacted in `Debug`; the client's own credentials
//! (`authorization`, `x-api-key`: arservice's token) never reach an upstream.

use super::error::GatewayError;
use super::{Api, UPSTREAM_HEADER};
use std::fmt;

/// `anthropic-version` sent to the upstream when the client sends none.
const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

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

/// An API key: kept in memory only; its `Debug` never shows it.
pub struct Secret(String);

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
    pub(super) key: Option<Secret>,
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
            Some(var) => Some(read_key(name, var, &env)?),
        };
        Ok(Upstream {
            name: name.to_string(),
            base_url: url.to_string(),
            key_env,
            key,
        })
    }
}

/// The key of upstream `name` from the environment variable `var`: set, not empty, and fit
/// for an HTTP header.
fn read_key(
    name: &str,
    var: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Secret, String> {
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
    Ok(Secret(key.to_string()))
}

/// Refuses two upstreams of one name.
pub fn check_names(upstreams: &[Upstream]) -> Result<(), String> {
    for (index, upstream) in upstreams.iter().enumerate() {
        if upstreams[..index]
            .iter()
            .any(|earlier| earlier.name == upstream.name)
        {
            return Err(format!(
                "--model-upstream {} is given twice; give each upstream its own name",
                upstream.name
            ));
        }
    }
    Ok(())
}

/// Picks the upstream of a call and the model name it gets: `X-Upstream: NAME`, else a
/// `NAME/` prefix of the model naming an upstream (stripped), else the only upstream.
pub fn route<'a>(
    upstreams: &'a [Upstream],
    asked: Option<&str>,
    model: &str,
) -> Result<(&'a Upstream, String), GatewayError> {
    let names = || {
        upstreams
            .iter()
            .map(|upstream| upstream.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let by_name = |name: &str| upstreams.iter().find(|upstream| upstream.name == name);
    if upstreams.is_empty() {
        return Err(GatewayError::Invalid(
            "the model gateway has no upstream: start the server with --model-upstream NAME=URL"
                .into(),
        ));
    }
    let prefixed = model
        .split_once('/')
        .and_then(|(name, rest)| Some((by_name(name)?, rest)));
    if let Some(asked) = asked {
        let upstream = by_name(asked).ok_or_else(|| {
            GatewayError::Invalid(format!(
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
    if let [only] = upstreams {
        return Ok((only, model.to_string()));
    }
    Err(GatewayError::Invalid(format!(
        "model '{model}' names no upstream: write it as NAME/{model} with NAME one of {}, or send the header {UPSTREAM_HEADER}: NAME",
        names()
    )))
}

/// The headers of a call to an upstream: the client's that the upstream may need, the
/// content type, Anthropic's version, and the upstream's key in the API's own header.
pub fn upstream_headers(
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
pub fn client_headers(upstream: &ureq::http::HeaderMap) -> Vec<(String, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn upstream(name: &str) -> Upstream {
        Upstream::parse(&format!("{name}=http://127.0.0.1:9"), no_env).unwrap()
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
        assert!(check_names(&[upstream("a"), upstream("a")])
            .unwrap_err()
            .contains("given twice"));
    }

    #[test]
    fn routing_by_prefix_header_or_the_only_upstream() {
        let one = [upstream("or")];
        let (chosen, model) = route(&one, None, "meta/llama").unwrap();
        assert_eq!((chosen.name.as_str(), model.as_str()), ("or", "meta/llama"));
        let (_, model) = route(&one, None, "or/meta/llama").unwrap();
        assert_eq!(model, "meta/llama");

        let two = [upstream("oa"), upstream("an")];
        let (chosen, model) = route(&two, None, "an/claude").unwrap();
        assert_eq!((chosen.name.as_str(), model.as_str()), ("an", "claude"));
        let (chosen, model) = route(&two, Some("oa"), "gpt-4o").unwrap();
        assert_eq!((chosen.name.as_str(), model.as_str()), ("oa", "gpt-4o"));
        let (chosen, model) = route(&two, Some("oa"), "an/claude").unwrap();
        assert_eq!((chosen.name.as_str(), model.as_str()), ("oa", "an/claude"));
        let err = route(&two, None, "gpt-4o").unwrap_err().to_string();
        assert!(
            err.contains("oa, an") && err.contains("X-Upstream"),
            "{err}"
        );
        let err = route(&two, Some("zz"), "gpt-4o").unwrap_err().to_string();
        assert!(err.contains("'zz'") && err.contains("oa, an"), "{err}");

        let err = route(&[], None, "gpt-4o").unwrap_err().to_string();
        assert!(err.contains("--model-upstream"), "{err}");
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
}
