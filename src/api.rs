//! The request bodies of the API, parsed and validated before anything is looked up.
//!
//! Owns the wire shapes of `/start_instance` (seed form, flattened form, presets),
//! `/execute_command`, `/fork_instance` and `/close_instance`. Every failure here is a 400 with a message
//! naming the field; nothing here touches the instance table or the ledger.

use crate::env::wire::ExecWire;
use crate::env::{env_map, parse_timeout, EnvSpec, Kind};
use crate::error::Error;
use crate::run_id::RunId;
use serde_json::{Map, Value};
use std::time::Duration;

/// The longest `cmd`: the longest single argument Linux passes to a program (`MAX_ARG_STRLEN`,
/// 32 pages, with its NUL), which is how a command reaches its shell (`sh -c CMD`).
pub const MAX_CMD_BYTES: usize = 128 * 1024 - 1;

/// The largest `environment_config`, as JSON, once merged (preset included): every instance
/// keeps it in memory, in its journal record and in `/stats`.
pub const MAX_CONFIG_BYTES: usize = 128 * 1024;

/// Top-level keys of `/start_instance` that are not part of the flattened environment config.
const START_KEYS: [&str; 4] = ["run_id", "container_name", "environment_config", "wait"];

/// Keys of `environment_config` that reach the host itself (an argument to the CLI, the CLI
/// itself): only the operator sets them, in a preset, unless the server runs with
/// `--allow-client-host-access`. Kind-specific host paths are in [`host_fields`].
const OPERATOR_KEYS: [&str; 3] = ["run_args", "bwrap_args", "executable"];

/// `--environments`: preset name → base `environment_config`.
pub type Presets = Map<String, Value>;

/// The largest `"pool": {"size": N}` of one preset.
pub const MAX_POOL_SIZE: u64 = 1024;

/// `--environments` pools: preset name → how many sandboxes of it to keep started and idle.
pub type PoolSizes = std::collections::BTreeMap<String, usize>;

/// Checks a presets file's content: an object of objects (or of image names, meaning docker).
/// A preset's `"pool": {"size": N}` is taken out of it (it is no `environment_config` key)
/// and returned beside the presets.
pub fn parse_presets(value: Value) -> Result<(Presets, PoolSizes), String> {
    let Value::Object(mut presets) = value else {
        return Err("must be a JSON object of {\"preset-name\": {environment_config...}}".into());
    };
    let mut pools = PoolSizes::new();
    for (name, preset) in presets.iter_mut() {
        let bytes = preset.to_string().len();
        if bytes > MAX_CONFIG_BYTES {
            return Err(format!(
                "preset '{name}' is {bytes} bytes of JSON; an environment_config may be at most {MAX_CONFIG_BYTES}"
            ));
        }
        match preset {
            Value::Object(config) => {
                if let Some(pool) = config.remove("pool") {
                    let size =
                        parse_pool(&pool).map_err(|why| format!("preset '{name}': {why}"))?;
                    if size > 0 {
                        pools.insert(name.clone(), size);
                    }
                }
                EnvSpec::parse(config.clone(), Some(name))
                    .map_err(|why| format!("preset '{name}': {why}"))?;
            }
            Value::String(_) => {}
            other => {
                return Err(format!(
                    "preset '{name}' must be an object or an image name, got {other}"
                ))
            }
        }
    }
    Ok((presets, pools))
}

/// `{"size": N}`, N from 0 (no pool) to [`MAX_POOL_SIZE`]; any other key is refused.
fn parse_pool(pool: &Value) -> Result<usize, String> {
    let Value::Object(pool) = pool else {
        return Err(format!(
            "pool must be an object like {{\"size\": 4}}, got {pool}"
        ));
    };
    if let Some(key) = pool.keys().find(|key| *key != "size") {
        return Err(format!("unknown key '{key}' in pool: its only key is size"));
    }
    match pool.get("size").and_then(Value::as_u64) {
        Some(size) if size <= MAX_POOL_SIZE => Ok(size as usize),
        _ => Err(format!(
            "pool.size must be a whole number from 0 to {MAX_POOL_SIZE}, got {}",
            pool.get("size").unwrap_or(&Value::Null)
        )),
    }
}

/// A validated `/start_instance`.
#[derive(Debug)]
pub struct StartRequest {
    pub run_id: RunId,
    pub container_name: Option<String>,
    pub spec: EnvSpec,
    /// How long to wait for resources (the `wait` extension); zero refuses at once.
    pub wait: Duration,
    /// The fields that reach the host which the request set (not the preset): refused unless
    /// the operator allows clients to (see [`host_fields`]).
    pub host_fields: Vec<String>,
}

/// A validated `/fork_instance`: the running instance to copy, the new one's `run_id`, and
/// how long to wait for resources (as a start's `wait`).
#[derive(Debug)]
pub struct ForkRequest {
    pub run_id: RunId,
    pub new_run_id: RunId,
    pub wait: Duration,
}

/// A validated `/execute_command`.
#[derive(Debug)]
pub struct ExecCommand {
    pub run_id: RunId,
    pub cmd: String,
    pub timeout: Option<Duration>,
    pub cwd: Option<String>,
    pub env: std::collections::BTreeMap<String, String>,
    pub max_output_bytes: Option<usize>,
    /// The command's stdin; `None`: `/dev/null`.
    pub stdin: Option<String>,
    /// Answer NDJSON lines as the output comes (`http/stream.rs`).
    pub stream: bool,
}

/// Parses a body as a JSON object.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, Error> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(Error::BadRequest(format!(
            "the body must be a JSON object, got {}",
            kind_of(&other)
        ))),
        Err(err) => Err(Error::BadRequest(format!(
            "the body is not valid JSON: {err}"
        ))),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks a `run_id` given in `field` (a body key, or a header such as `X-Run-Id`): a 400
/// naming the field when it is not one.
pub fn parse_run_id(text: &str, field: &str) -> Result<RunId, Error> {
    RunId::parse(text, field).map_err(|invalid| Error::BadRequest(invalid.to_string()))
}

/// [`parse_run_id`] under the name the model routes call it by (`X-Run-Id`).
pub use self::parse_run_id as checked_run_id;

/// Reads the required, valid `run_id`.
pub fn run_id(body: &Map<String, Value>) -> Result<RunId, Error> {
    match body.get("run_id") {
        Some(Value::String(run_id)) => parse_run_id(run_id, "run_id"),
        None | Some(Value::Null) => Err(Error::BadRequest("run_id is required".into())),
        Some(other) => Err(Error::BadRequest(format!(
            "run_id must be a string, got {}",
            kind_of(other)
        ))),
    }
}

fn optional_str<'a>(body: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, Error> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(Error::BadRequest(format!(
            "{key} must be a string, got {}",
            kind_of(other)
        ))),
    }
}

impl StartRequest {
    /// Merges preset ⊕ flattened top-level keys ⊕ `environment_config`, key by key; a
    /// config that names no `container_type` gets `default_kind`.
    pub fn parse(
        body: &[u8],
        presets: &Presets,
        default_kind: Kind,
    ) -> Result<StartRequest, Error> {
        let body = json_object(body)?;
        let run_id = run_id(&body)?;
        let container_name = optional_str(&body, "container_name")?.map(String::from);
        let mut config = Map::new();
        let preset = container_name.as_deref().and_then(|name| presets.get(name));
        // What the request itself says, apart from the preset.
        let mut own = Map::new();
        match preset {
            Some(Value::Object(preset)) => config.extend(preset.clone()),
            Some(Value::String(image)) => {
                config.insert("container_type".into(), Value::from("docker"));
                config.insert("image".into(), Value::from(image.clone()));
            }
            _ => {}
        }
        for (key, value) in &body {
            if START_KEYS.contains(&key.as_str()) {
                continue;
            }
            let key = if key == "container_image" {
                "image"
            } else {
                key
            };
            own.insert(key.to_string(), value.clone());
        }
        match body.get("environment_config") {
            None | Some(Value::Null) => {}
            Some(Value::Object(overrides)) => own.extend(overrides.clone()),
            Some(other) => {
                return Err(Error::BadRequest(format!(
                    "environment_config must be an object, got {}",
                    kind_of(other)
                )))
            }
        }
        config.extend(own.clone());
        if !config.contains_key("container_type") && default_kind != Kind::Docker {
            config.insert("container_type".into(), Value::from(default_kind.name()));
        }
        let bytes = serde_json::to_vec(&config).map_or(0, |json| json.len());
        if bytes > MAX_CONFIG_BYTES {
            return Err(Error::BadRequest(format!(
                "environment_config is {bytes} bytes of JSON; at most {MAX_CONFIG_BYTES}: pass large data in a file instead"
            )));
        }
        let image_default = if preset.is_some() {
            None
        } else {
            container_name.as_deref()
        };
        let mut spec = EnvSpec::parse(config, image_default)
            .map_err(|why| Error::BadRequest(why.to_string()))?;
        let preset = preset.and_then(Value::as_object);
        let host_fields = host_fields(&spec, &own, preset);
        spec.client_executable = host_fields.iter().any(|field| field == "executable");
        let wait = wait_of(&body)?;
        Ok(StartRequest {
            run_id,
            container_name,
            spec,
            wait,
            host_fields,
        })
    }
}

/// Keys of `/fork_instance`.
const FORK_KEYS: [&str; 3] = ["run_id", "new_run_id", "wait"];

impl ForkRequest {
    /// `run_id` and `new_run_id` checked as every `run_id` is, `wait` as a start's; any other
    /// key is refused (a fork takes its source's config as it is).
    pub fn parse(body: &[u8]) -> Result<ForkRequest, Error> {
        let body = json_object(body)?;
        if let Some(key) = body.keys().find(|key| !FORK_KEYS.contains(&key.as_str())) {
            return Err(Error::BadRequest(format!(
                "/fork_instance takes run_id, new_run_id and wait only, not {key}: the fork has its source's config"
            )));
        }
        let run_id = run_id(&body)?;
        let new_run_id = match body.get("new_run_id") {
            Some(Value::String(text)) => parse_run_id(text, "new_run_id")?,
            None | Some(Value::Null) => {
                return Err(Error::BadRequest("new_run_id is required".into()))
            }
            Some(other) => {
                return Err(Error::BadRequest(format!(
                    "new_run_id must be a string, got {}",
                    kind_of(other)
                )))
            }
        };
        Ok(ForkRequest {
            run_id,
            new_run_id,
            wait: wait_of(&body)?,
        })
    }
}

/// A request's `wait` (how long to wait for resources): zero when absent.
fn wait_of(body: &Map<String, Value>) -> Result<Duration, Error> {
    match body.get("wait") {
        None | Some(Value::Null) => Ok(Duration::ZERO),
        Some(Value::Number(n)) if n.as_f64() == Some(0.0) => Ok(Duration::ZERO),
        Some(value) => parse_timeout(value, "wait").map_err(Error::BadRequest),
    }
}

/// The fields of a start that reach the host and that the request set itself (`own`: its
/// flattened keys and `environment_config`), not its preset: a value equal to the preset's is
/// the preset's. They are [`OPERATOR_KEYS`], `slurm.sbatch_args`, and for bubblewrap an
/// `image` that is a host directory (the sandbox's root) and, in the host view, a `cwd` outside
/// the instance's own directory (bound writable).
pub fn host_fields(
    spec: &EnvSpec,
    own: &Map<String, Value>,
    preset: Option<&Map<String, Value>>,
) -> Vec<String> {
    let preset_value = |key: &str| preset.and_then(|preset| preset.get(key));
    let from_request = |key: &str| {
        own.get(key)
            .is_some_and(|value| !value.is_null() && preset_value(key) != Some(value))
    };
    let mut fields: Vec<String> = OPERATOR_KEYS
        .into_iter()
        .filter(|key| from_request(key))
        .map(String::from)
        .collect();
    let sbatch_args = |config: Option<&Map<String, Value>>| {
        config
            .and_then(|config| config.get("slurm"))
            .and_then(|slurm| slurm.get("sbatch_args"))
            .filter(|args| !args.is_null())
            .cloned()
    };
    if sbatch_args(Some(own)).is_some_and(|args| sbatch_args(preset) != Some(args)) {
        fields.push("slurm.sbatch_args".into());
    }
    if spec.kind == Kind::Bubblewrap {
        let rootfs = spec.image.starts_with('/');
        let preset_image = preset_value("image")
            .or_else(|| preset_value("container_image"))
            .and_then(Value::as_str);
        if rootfs && preset_image != Some(spec.image.as_str()) {
            fields.push("image (a host directory as the sandbox's root)".into());
        }
        let outside = |cwd: &str| {
            let cwd = std::path::Path::new(cwd);
            cwd.is_absolute()
                || cwd
                    .components()
                    .any(|part| part == std::path::Component::ParentDir)
        };
        if !rootfs && from_request("cwd") && spec.cwd.as_deref().is_some_and(outside) {
            fields.push("cwd (a host directory, bound writable)".into());
        }
    }
    fields
}

impl ExecCommand {
    /// The body as the one exec request of every wire (`env::wire::ExecWire`), each field
    /// checked: its kind first, so that a 400 names the field (serde's message would not).
    pub fn parse(body: &[u8]) -> Result<ExecCommand, Error> {
        let body = json_object(body)?;
        let run_id = run_id(&body)?;
        match body.get("cmd") {
            Some(Value::String(_)) => {}
            None | Some(Value::Null) => return Err(Error::BadRequest("cmd is required".into())),
            Some(other) => {
                return Err(Error::BadRequest(format!(
                    "cmd must be a string (it runs through the shell), got {}",
                    kind_of(other)
                )))
            }
        }
        optional_str(&body, "cwd")?;
        optional_str(&body, "stdin")?;
        // An agent's name for the timeout (see `ExecWire`), checked as `timeout` is.
        for key in ["timeout", "timeout_s"] {
            if let Some(value) = body.get(key).filter(|value| !value.is_null()) {
                parse_timeout(value, key).map_err(Error::BadRequest)?;
            }
        }
        if let Some(value) = body
            .get("max_output_bytes")
            .filter(|value| !value.is_null())
        {
            if value.as_u64().is_none() {
                return Err(Error::BadRequest(format!(
                    "max_output_bytes must be a non-negative integer, got {value}"
                )));
            }
        }
        if let Some(stream) = body.get("stream").filter(|stream| !stream.is_null()) {
            if !stream.is_boolean() {
                return Err(Error::BadRequest(format!(
                    "stream must be true or false, got {stream}"
                )));
            }
        }
        if body.get("shell").is_some_and(|shell| !shell.is_null()) {
            return Err(Error::BadRequest(
                "shell is set per instance (environment_config.shell), not per command".into(),
            ));
        }
        let env = env_map(body.get("env"), "env").map_err(Error::BadRequest)?;
        let wire: ExecWire = serde_json::from_value(Value::Object(body))
            .map_err(|err| Error::BadRequest(err.to_string()))?;
        if wire.cmd.contains('\0') {
            return Err(Error::BadRequest("cmd contains a NUL byte".into()));
        }
        if wire.cmd.len() > MAX_CMD_BYTES {
            return Err(Error::BadRequest(format!(
                "cmd is {} bytes; at most {MAX_CMD_BYTES} (the longest argument a program can get): write a longer script to a file and run that",
                wire.cmd.len()
            )));
        }
        if let Some(cwd) = &wire.cwd {
            crate::env::check_cwd(cwd).map_err(Error::BadRequest)?;
            if cwd.contains('\0') {
                return Err(Error::BadRequest("cwd contains a NUL byte".into()));
            }
        }
        Ok(ExecCommand {
            run_id,
            cmd: wire.cmd,
            timeout: wire.timeout.map(Duration::from_secs_f64),
            cwd: wire.cwd,
            env,
            max_output_bytes: wire.max_output_bytes,
            stdin: wire.stdin,
            stream: wire.stream,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Kind;
    use crate::property::XorShift;
    use serde_json::json;

    fn start(body: Value, presets: Value) -> Result<StartRequest, Error> {
        StartRequest::parse(
            body.to_string().as_bytes(),
            presets.as_object().unwrap(),
            Kind::Docker,
        )
    }

    #[test]
    fn run_ids_are_400s_naming_the_field() {
        assert_eq!(
            parse_run_id("eval-run-001", "run_id").unwrap(),
            "eval-run-001"
        );
        let err = parse_run_id("a/b", "X-Run-Id").unwrap_err();
        assert!(
            matches!(&err, Error::BadRequest(detail) if detail.starts_with("X-Run-Id 'a/b' is not allowed")),
            "{err}"
        );
    }

    #[test]
    fn seed_form() {
        let request = start(
            json!({"run_id": "r1", "container_name": "img:1",
                   "environment_config": {"container_type": "local", "timeout": 5}}),
            json!({}),
        )
        .unwrap();
        assert_eq!(request.spec.kind, Kind::Local);
        assert_eq!(request.spec.image, "img:1");
        assert_eq!(request.spec.timeout, Duration::from_secs(5));
    }

    #[test]
    fn flattened_form() {
        let request = start(
            json!({"run_id": "r1", "container_image": "img:2", "container_type": "local",
                   "timeout": 7, "resources": {"cpus": 1}}),
            json!({}),
        )
        .unwrap();
        assert_eq!(request.spec.image, "img:2");
        assert_eq!(request.spec.timeout, Duration::from_secs(7));
        assert!(request.spec.resources.contains_key("cpus"));
    }

    #[test]
    fn presets_are_the_base_and_the_request_overrides_key_by_key() {
        let presets = json!({"py": {"container_type": "local", "timeout": 9, "cwd": "/tmp"},
                             "dk": "python:3.11"});
        let request = start(
            json!({"run_id": "r1", "container_name": "py", "environment_config": {"timeout": 3}}),
            presets.clone(),
        )
        .unwrap();
        assert_eq!(request.spec.timeout, Duration::from_secs(3));
        assert_eq!(request.spec.cwd.as_deref(), Some("/tmp"));
        let request = start(json!({"run_id": "r2", "container_name": "dk"}), presets).unwrap();
        assert_eq!(request.spec.kind, Kind::Docker);
        assert_eq!(request.spec.image, "python:3.11");
    }

    #[test]
    fn malformed_requests_name_the_field() {
        for (body, needle) in [
            (json!([1]), "JSON object"),
            (json!({}), "run_id is required"),
            (json!({"run_id": 5}), "run_id must be a string"),
            (json!({"run_id": "a/b"}), "not allowed"),
            (
                json!({"run_id": "a", "environment_config": 3}),
                "environment_config",
            ),
            (
                json!({"run_id": "a", "container_type": "vm"}),
                "unknown container_type",
            ),
            (
                json!({"run_id": "a", "container_type": "local", "wait": -1}),
                "wait",
            ),
        ] {
            let err = start(body.clone(), json!({})).unwrap_err();
            assert!(matches!(err, Error::BadRequest(_)));
            assert!(err.to_string().contains(needle), "{body} gave {err}");
        }
        let err = StartRequest::parse(b"{not json", &Presets::new(), Kind::Docker).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    /// What a server forwards to the server in a Slurm job is a `/execute_command` that
    /// this parser (and those of earlier builds, which read `timeout`) reads back whole.
    #[test]
    fn the_slurm_forward_is_an_execute_command() {
        let request = crate::env::ExecRequest {
            cmd: "cat".into(),
            cwd: Some("sub".into()),
            env: [("K".to_string(), "V".to_string())].into(),
            limits: crate::env::Limits {
                timeout: Duration::from_millis(2500),
                max_output_bytes: 77,
            },
            stdin: Some("in".into()),
            sink: None,
        };
        let sent = serde_json::to_vec(&ExecWire::for_job(
            &request,
            &parse_run_id("r-1", "run_id").unwrap(),
        ))
        .unwrap();
        let parsed = ExecCommand::parse(&sent).unwrap();
        assert_eq!(parsed.run_id, "r-1");
        assert_eq!(parsed.cmd, "cat");
        assert_eq!(parsed.cwd.as_deref(), Some("sub"));
        assert_eq!(parsed.env["K"], "V");
        assert_eq!(parsed.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(parsed.max_output_bytes, Some(77));
        assert_eq!(parsed.stdin.as_deref(), Some("in"));
    }

    #[test]
    fn exec_fields() {
        let ok = ExecCommand::parse(
            br#"{"run_id": "a", "cmd": "ls", "timeout": 1.5, "cwd": "/", "env": {"K": "V"}, "max_output_bytes": 10}"#,
        )
        .unwrap();
        assert_eq!(ok.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(ok.env["K"], "V");
        assert_eq!(ok.max_output_bytes, Some(10));
        assert_eq!(ok.stdin, None);
        let fed = ExecCommand::parse(
            br#"{"run_id": "a", "cmd": "cat", "env": null, "stdin": "x\n\u0000y"}"#,
        )
        .unwrap();
        assert_eq!(fed.stdin.as_deref(), Some("x\n\0y"));
        assert!(fed.env.is_empty() && fed.timeout.is_none());
        for (body, needle) in [
            (json!({"run_id": "a"}), "cmd is required"),
            (
                json!({"run_id": "a", "cmd": ["ls"]}),
                "cmd must be a string",
            ),
            (json!({"run_id": "a", "cmd": "ls", "timeout": 0}), "timeout"),
            (
                json!({"run_id": "a", "cmd": "ls", "env": {"1": "x"}}),
                "env",
            ),
            (
                json!({"run_id": "a", "cmd": "ls", "max_output_bytes": -1}),
                "max_output_bytes",
            ),
            (
                json!({"run_id": "a", "cmd": "ls", "cwd": "--privileged"}),
                "starts with '-'",
            ),
            (
                json!({"run_id": "a", "cmd": "ls", "env": {"ARSERVICE_SPAWN": "x"}}),
                "reserved",
            ),
            (
                json!({"run_id": "a", "cmd": "ls", "stdin": ["x"]}),
                "stdin must be a string",
            ),
            (
                json!({"run_id": "a", "cmd": "ls", "shell": ["bash", "-c"]}),
                "per instance",
            ),
            (
                json!({"run_id": "a", "cmd": "ls", "timeout_s": -1}),
                "timeout_s",
            ),
            (json!({"run_id": "a", "cmd": "l\u{0}s"}), "NUL"),
        ] {
            let err = ExecCommand::parse(body.to_string().as_bytes()).unwrap_err();
            assert!(err.to_string().contains(needle), "{body} gave {err}");
        }
    }

    #[test]
    fn sizes_are_bounded_with_messages_that_say_the_limit() {
        let many: Map<String, Value> = (0..=crate::env::MAX_ENV_VARS)
            .map(|index| (format!("V{index}"), json!("x")))
            .collect();
        let big = json!({"K": "x".repeat(crate::env::MAX_ENV_BYTES)});
        for (config, needle) in [
            (json!({"env": many.clone()}), "at most 256"),
            (json!({"env": big.clone()}), "at most 65536"),
            (
                json!({"forward_env": vec!["A"; crate::env::MAX_ENV_VARS + 1]}),
                "at most 256",
            ),
            (json!({"x": "y".repeat(MAX_CONFIG_BYTES)}), "at most 131072"),
        ] {
            let mut config = config;
            config["container_type"] = json!("local");
            let err = start(
                json!({"run_id": "r", "environment_config": config}),
                json!({}),
            )
            .unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        let fits: Map<String, Value> = (0..crate::env::MAX_ENV_VARS)
            .map(|index| (format!("V{index}"), json!("x")))
            .collect();
        start(
            json!({"run_id": "r", "environment_config": {"container_type": "local", "env": fits}}),
            json!({}),
        )
        .unwrap();
        for (command, needle) in [
            (
                json!({"run_id": "r", "cmd": "x".repeat(MAX_CMD_BYTES + 1)}),
                "at most 131071",
            ),
            (
                json!({"run_id": "r", "cmd": "true", "env": many}),
                "at most 256",
            ),
            (
                json!({"run_id": "r", "cmd": "true", "env": big}),
                "at most 65536",
            ),
        ] {
            let err = ExecCommand::parse(command.to_string().as_bytes()).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        ExecCommand::parse(
            json!({"run_id": "r", "cmd": "x".repeat(MAX_CMD_BYTES)})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let huge_preset =
            json!({"p": {"container_type": "local", "x": "y".repeat(MAX_CONFIG_BYTES)}});
        assert!(parse_presets(huge_preset)
            .unwrap_err()
            .contains("at most 131072"));
    }

    #[test]
    fn a_preset_s_pool_is_taken_out_and_checked() {
        let (presets, pools) = parse_presets(json!({
            "py": {"container_type": "local", "pool": {"size": 3}},
            "off": {"container_type": "local", "pool": {"size": 0}},
            "plain": {"container_type": "local"},
        }))
        .unwrap();
        assert_eq!(
            pools.into_iter().collect::<Vec<_>>(),
            [("py".to_string(), 3)]
        );
        assert!(
            presets["py"].get("pool").is_none(),
            "not an environment_config key"
        );
        for (pool, needle) in [
            (json!({"size": 2, "sise": 1}), "unknown key 'sise' in pool"),
            (json!({"size": -1}), "pool.size"),
            (json!({"size": 1.5}), "pool.size"),
            (json!({"size": MAX_POOL_SIZE + 1}), "pool.size"),
            (json!({}), "pool.size"),
            (json!(4), "pool must be an object"),
        ] {
            let why =
                parse_presets(json!({"p": {"container_type": "local", "pool": pool}})).unwrap_err();
            assert!(why.contains("preset 'p'") && why.contains(needle), "{why}");
        }
        // A request cannot name a pool: it is no environment_config key.
        let presets = json!({"p": {"container_type": "local"}});
        let err = start(
            json!({"run_id": "r", "container_name": "p", "pool": {"size": 1}}),
            presets,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown key 'pool'"), "{err}");
    }

    /// Property: no body, however mangled, makes parsing panic; every refusal is a 400 with a
    /// detail; and whatever is accepted is valid (a run_id that fits the rules).
    #[test]
    fn property_mangled_bodies_never_panic_and_are_400_or_valid() {
        let seeds: Vec<Vec<u8>> = [
            json!({"run_id": "r-1", "container_name": "img", "environment_config": {"container_type": "local",
                   "resources": {"instances": 1, "cpus": 0.5}, "env": {"A": "b"}, "forward_env": ["X"],
                   "timeout": 3, "ttl": 9, "shell": ["sh", "-c"]}, "wait": 1}),
            json!({"run_id": "r-2", "container_image": "i", "container_type": "docker", "timeout": 5}),
            json!({"run_id": "r-3", "cmd": "echo hi", "timeout": 1.5, "cwd": "/", "env": {"K": "V"},
                   "max_output_bytes": 10}),
        ]
        .iter()
        .map(|value| value.to_string().into_bytes())
        .collect();
        let tokens: [&[u8]; 14] = [
            b"{",
            b"}",
            b"[",
            b"]",
            b"\"",
            b":",
            b",",
            b"-1",
            b"1e999",
            b"null",
            b"\"\\u0000\"",
            b"\"../x\"",
            b"\xff\xfe",
            b"\"run_id\"",
        ];
        let (scale, seed) = crate::property::scale();
        let mut rng = XorShift(0x5eed_1234_abcd_ef01 ^ seed);
        let presets = Presets::new();
        for round in 0..40_000 * scale {
            let mut body = seeds[rng.below(seeds.len())].clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(body.len() + 1);
                match rng.below(3) {
                    0 if !body.is_empty() => {
                        let end = (at + rng.below(8)).min(body.len());
                        body.drain(at.min(end)..end);
                    }
                    1 => {
                        let token = tokens[rng.below(tokens.len())];
                        body.splice(at..at, token.iter().copied());
                    }
                    _ => {
                        if at < body.len() {
                            body[at] = rng.next() as u8;
                        }
                    }
                }
            }
            match StartRequest::parse(&body, &presets, Kind::Docker) {
                Ok(request) => assert!(crate::run_id::is_valid(&request.run_id), "round {round}"),
                Err(Error::BadRequest(detail)) => assert!(!detail.is_empty()),
                Err(other) => panic!("round {round}: not a 400: {other:?}"),
            }
            match ExecCommand::parse(&body) {
                Ok(command) => {
                    assert!(crate::run_id::is_valid(&command.run_id) && !command.cmd.contains('\0'))
                }
                Err(Error::BadRequest(detail)) => assert!(!detail.is_empty()),
                Err(other) => panic!("round {round}: not a 400: {other:?}"),
            }
        }
    }
}
