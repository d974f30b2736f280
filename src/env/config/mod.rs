//! `environment_config`, parsed once: [`EnvSpec::parse`] turns the merged JSON object into
//! the common fields and one typed options struct per kind ([`options`]), or a [`ConfigError`]
//! (a 400 at request time, a start-up error for a preset). A key that is neither common nor of
//! the config's kind is refused, naming the closest known key. Nothing after the parse reads
//! the raw JSON again, except to show it back in `/stats` and to forward it to a Slurm job.

pub mod fields;
pub mod options;

use super::image::check_image;
use crate::ledger::{parse_resources, Resources};
use fields::optional_string;
pub use fields::{
    check_cwd, env_map, is_reserved_env_name, parse_timeout, string_map, valid_env_name,
    MAX_ENV_BYTES, MAX_ENV_VARS, RESERVED_ENV_PREFIX,
};
pub use options::{
    ApptainerOptions, BwrapOptions, DockerOptions, EnrootOptions, KindOptions, RegistrySeparator,
    SlurmOptions, WritableLayer,
};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The per-command timeout when neither the instance nor the command names one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The keys every kind takes (`container_image` is the original's name of `image`; `slurm`
/// is read by the Slurm runner whatever the kind).
pub const COMMON_KEYS: [&str; 14] = [
    "container_type",
    "image",
    "container_image",
    "resources",
    "cwd",
    "env",
    "forward_env",
    "timeout",
    "ttl",
    "idle_timeout",
    "executable",
    "shell",
    "exec_mode",
    "slurm",
];

/// Every `container_type` the API knows, with its aliases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Docker,
    Podman,
    Apptainer,
    Enroot,
    Bubblewrap,
    Local,
}

impl Kind {
    pub const NAMES: &'static str =
        "docker, podman, singularity (alias apptainer), enroot, bubblewrap (alias bwrap), local";

    pub fn parse(name: &str) -> Option<Kind> {
        Some(match name {
            "docker" => Kind::Docker,
            "podman" => Kind::Podman,
            "singularity" | "apptainer" => Kind::Apptainer,
            "enroot" => Kind::Enroot,
            "bubblewrap" | "bwrap" => Kind::Bubblewrap,
            "local" => Kind::Local,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Docker => "docker",
            Kind::Podman => "podman",
            Kind::Apptainer => "singularity",
            Kind::Enroot => "enroot",
            Kind::Bubblewrap => "bubblewrap",
            Kind::Local => "local",
        }
    }
}

/// How commands reach the sandbox (`exec_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecMode {
    /// Through the agent where there is one, else the CLI (the default).
    Agent,
    /// Always through the environment's CLI (`docker exec`, an `srun` step).
    Cli,
}

impl ExecMode {
    fn parse(value: Option<&Value>) -> Result<ExecMode, ConfigError> {
        match value {
            None | Some(Value::Null) => Ok(ExecMode::Agent),
            Some(Value::String(mode)) if mode == "agent" => Ok(ExecMode::Agent),
            Some(Value::String(mode)) if mode == "cli" => Ok(ExecMode::Cli),
            Some(other) => Err(ConfigError::Invalid(format!(
                "exec_mode must be \"agent\" or \"cli\", got {other}"
            ))),
        }
    }
}

/// Why an `environment_config` is refused.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigError {
    /// A key no kind takes; the closest known one, if one is close; the keys it could be.
    UnknownKey {
        key: String,
        closest: Option<String>,
        known: String,
    },
    /// A key of other kinds than this config's.
    OtherKind {
        key: String,
        kind: Kind,
        takers: String,
    },
    /// A known key with a value it cannot take (the message names the key).
    Invalid(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::UnknownKey {
                key,
                closest: Some(closest),
                ..
            } => write!(
                f,
                "unknown key '{key}' in environment_config: did you mean '{closest}'?"
            ),
            ConfigError::UnknownKey { key, known, .. } => {
                write!(
                    f,
                    "unknown key '{key}' in environment_config: known keys are {known}"
                )
            }
            ConfigError::OtherKind { key, kind, takers } => write!(
                f,
                "key '{key}' is not one of container_type '{}' (it is for {takers})",
                kind.name()
            ),
            ConfigError::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for String {
    fn from(err: ConfigError) -> String {
        err.to_string()
    }
}

impl From<String> for ConfigError {
    fn from(why: String) -> ConfigError {
        ConfigError::Invalid(why)
    }
}

/// A validated `environment_config`.
#[derive(Clone, Debug)]
pub struct EnvSpec {
    pub kind: Kind,
    /// The image (or rootfs, or nothing for `local`); defaults to `container_name`.
    pub image: String,
    /// Every resource the request named, enforced or not.
    pub resources: Resources,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub forward_env: Vec<String>,
    /// Default per-command timeout.
    pub timeout: Duration,
    /// Longest life from start (`ttl`); the server's default when `None`.
    pub ttl: Option<Duration>,
    /// Longest time without a command (`idle_timeout`); the server's default when `None`.
    pub idle_timeout: Option<Duration>,
    /// Which CLI to call instead of the kind's default.
    pub executable: Option<String>,
    /// The request chose `executable` (not a preset): the server never runs it on its own,
    /// in health rounds or cleanups.
    pub client_executable: bool,
    /// The program and leading arguments that run a command string (`["sh", "-c"]`).
    pub shell: Option<Vec<String>>,
    pub exec_mode: ExecMode,
    /// The kind's own keys.
    pub options: KindOptions,
    /// `slurm`: what the Slurm runner passes to `sbatch`.
    pub slurm: SlurmOptions,
    /// The whole config as merged, shown back in `/stats`.
    pub raw: Map<String, Value>,
}

impl EnvSpec {
    /// Validates a merged `environment_config`: every key known, every value typed.
    pub fn parse(
        raw: Map<String, Value>,
        container_name: Option<&str>,
    ) -> Result<EnvSpec, ConfigError> {
        let kind = parse_kind(raw.get("container_type"))?;
        check_keys(kind, &raw)?;
        let image = parse_image(kind, &raw, container_name)?;
        let resources = match raw.get("resources") {
            None | Some(Value::Null) => Resources::new(),
            Some(value) => parse_resources(value).map_err(|why| format!("resources: {why}"))?,
        };
        let cwd = optional_string(&raw, "cwd")?;
        if let Some(cwd) = &cwd {
            check_cwd(cwd)?;
        }
        let lifetime = |key: &str| match raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => parse_timeout(value, key).map(Some),
        };
        Ok(EnvSpec {
            kind,
            image,
            resources,
            cwd,
            env: env_map(raw.get("env"), "env")?,
            forward_env: fields::forward_env(raw.get("forward_env"))?,
            timeout: fields::timeout_or(&raw, "timeout", DEFAULT_TIMEOUT)?,
            ttl: lifetime("ttl")?,
            idle_timeout: lifetime("idle_timeout")?,
            executable: optional_string(&raw, "executable")?,
            client_executable: false,
            shell: fields::shell(raw.get("shell"))?,
            exec_mode: ExecMode::parse(raw.get("exec_mode"))?,
            options: KindOptions::parse(kind, &raw)?,
            slurm: SlurmOptions::parse(raw.get("slurm"))?,
            raw,
        })
    }

    /// `exec_mode: "cli"`: the environment's CLI path even where an agent could run.
    pub fn forces_cli(&self) -> bool {
        self.exec_mode == ExecMode::Cli
    }

    /// Docker's and podman's options (the defaults for another kind).
    pub fn docker(&self) -> DockerOptions {
        match &self.options {
            KindOptions::Docker(options) => options.clone(),
            _ => DockerOptions::default(),
        }
    }

    /// Apptainer's options (the defaults for another kind).
    pub fn apptainer(&self) -> ApptainerOptions {
        match &self.options {
            KindOptions::Apptainer(options) => options.clone(),
            _ => ApptainerOptions::default(),
        }
    }

    /// Enroot's options (the defaults for another kind).
    pub fn enroot(&self) -> EnrootOptions {
        match &self.options {
            KindOptions::Enroot(options) => options.clone(),
            _ => EnrootOptions::default(),
        }
    }

    /// Bubblewrap's options (the defaults for another kind).
    pub fn bwrap(&self) -> BwrapOptions {
        match &self.options {
            KindOptions::Bubblewrap(options) => options.clone(),
            _ => BwrapOptions::default(),
        }
    }
}

fn parse_kind(value: Option<&Value>) -> Result<Kind, ConfigError> {
    match value {
        None | Some(Value::Null) => Ok(Kind::Docker),
        Some(Value::String(name)) => Kind::parse(name).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "unknown container_type '{name}': expected one of {}",
                Kind::NAMES
            ))
        }),
        Some(other) => Err(ConfigError::Invalid(format!(
            "container_type must be a string, got {other}"
        ))),
    }
}

/// The image, `container_name` when the config names none; checked for the kind.
fn parse_image(
    kind: Kind,
    raw: &Map<String, Value>,
    container_name: Option<&str>,
) -> Result<String, ConfigError> {
    let image = match raw.get("image").or_else(|| raw.get("container_image")) {
        Some(Value::String(image)) => image.clone(),
        None | Some(Value::Null) => container_name.unwrap_or_default().to_string(),
        Some(other) => return Err(format!("image must be a string, got {other}").into()),
    };
    if image.is_empty() && kind != Kind::Local {
        return Err(format!(
            "container_type '{}' needs an image: give container_name or environment_config.image",
            kind.name()
        )
        .into());
    }
    if !image.is_empty() {
        check_image(&image, matches!(kind, Kind::Docker | Kind::Podman))?;
    }
    Ok(image)
}

/// Refuses a key that is neither common nor of `kind`: one of another kind says which kinds
/// take it; an unknown one names the closest known key.
fn check_keys(kind: Kind, raw: &Map<String, Value>) -> Result<(), ConfigError> {
    let own = options::kind_keys(kind);
    for key in raw.keys() {
        if COMMON_KEYS.contains(&key.as_str()) || own.contains(&key.as_str()) {
            continue;
        }
        let takers = options::kinds_taking(key);
        if !takers.is_empty() {
            return Err(ConfigError::OtherKind {
                key: key.clone(),
                kind,
                takers: takers.join(", "),
            });
        }
        let known: Vec<&str> = COMMON_KEYS.iter().chain(own).copied().collect();
        return Err(ConfigError::UnknownKey {
            key: key.clone(),
            closest: closest(key, &known).map(String::from),
            known: known.join(", "),
        });
    }
    Ok(())
}

/// The known key nearest to `key` in edit distance, when it is near enough to be a typo
/// (at most a third of its length, and at least one edit allowed).
pub fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let allowed = (key.chars().count() / 3).max(1);
    known
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance, with a swap of two neighbours counted as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![(0..=b.len()).collect::<Vec<usize>>()];
    for i in 1..=a.len() {
        let mut row = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            row[j] = (rows[i - 1][j] + 1)
                .min(row[j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                row[j] = row[j].min(rows[i - 2][j - 2] + 1);
            }
        }
        rows.push(row);
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<EnvSpec, String> {
        EnvSpec::parse(value.as_object().unwrap().clone(), Some("img:1")).map_err(String::from)
    }

    #[test]
    fn unknown_keys_are_named_with_the_closest_known_one() {
        let why = parse(json!({"imgae": "x"})).unwrap_err();
        assert!(
            why.contains("'imgae'") && why.contains("did you mean 'image'"),
            "{why}"
        );
        let why = parse(json!({"timout": 3})).unwrap_err();
        assert!(why.contains("did you mean 'timeout'"), "{why}");
        let why = parse(json!({"container_type": "docker", "run_arg": []})).unwrap_err();
        assert!(why.contains("did you mean 'run_args'"), "{why}");
        let why = parse(json!({"zzzzzz": 1})).unwrap_err();
        assert!(
            why.contains("'zzzzzz'") && why.contains("known keys are container_type"),
            "{why}"
        );
        // A key of another kind says which kinds take it.
        let why = parse(json!({"container_type": "local", "run_args": []})).unwrap_err();
        assert!(
            why.contains("'run_args'") && why.contains("docker/podman"),
            "{why}"
        );
        let why = parse(json!({"slurm": {"partitoin": "x"}})).unwrap_err();
        assert!(why.contains("did you mean 'slurm.partition'"), "{why}");
        // The original's keys stay accepted.
        assert!(parse(json!({"container_image": "busybox", "timeout": 5})).is_ok());
    }

    #[test]
    fn kind_options_are_typed_at_parse_time() {
        let spec = parse(json!({"run_args": ["--network", "none"], "pull_timeout": 5})).unwrap();
        assert_eq!(spec.docker().run_args, ["--network", "none"]);
        assert_eq!(spec.docker().pull_timeout, Duration::from_secs(5));
        for (config, needle) in [
            (json!({"run_args": "--privileged"}), "run_args"),
            (json!({"run_args": [1]}), "run_args"),
            (
                json!({"container_type": "bwrap", "bwrap_args": [true]}),
                "bwrap_args",
            ),
            (
                json!({"container_type": "apptainer", "writable": "disk"}),
                "writable",
            ),
            (
                json!({"container_type": "enroot", "registry_separator": ":"}),
                "registry_separator",
            ),
            (json!({"exec_mode": "ssh"}), "exec_mode"),
            (json!({"exec_mode": 1}), "exec_mode"),
        ] {
            let why = parse(config.clone()).unwrap_err();
            assert!(why.contains(needle), "{config} gave {why}");
        }
        assert!(parse(json!({"exec_mode": "cli"})).unwrap().forces_cli());
        assert!(!parse(json!({})).unwrap().forces_cli());
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("imgae", "image"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("cwd", "cwd"), 0);
        assert_eq!(closest("cdw", &COMMON_KEYS), Some("cwd"));
        assert_eq!(closest("banana", &COMMON_KEYS), None);
    }

    #[test]
    fn defaults() {
        let spec = parse(json!({})).unwrap();
        assert_eq!(spec.kind, Kind::Docker);
        assert_eq!(spec.image, "img:1");
        assert_eq!(spec.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn aliases_and_unknown_types() {
        assert_eq!(
            parse(json!({"container_type": "bwrap"})).unwrap().kind,
            Kind::Bubblewrap
        );
        assert_eq!(
            parse(json!({"container_type": "apptainer"})).unwrap().kind,
            Kind::Apptainer
        );
        let why = parse(json!({"container_type": "vm"})).unwrap_err();
        assert!(why.contains("unknown container_type 'vm'"), "{why}");
    }

    #[test]
    fn bad_fields_are_named() {
        for (config, needle) in [
            (json!({"timeout": -1}), "timeout"),
            (json!({"timeout": "5"}), "timeout"),
            (json!({"env": {"A-B": "x"}}), "'A-B'"),
            (json!({"env": ["x"]}), "env"),
            (json!({"cwd": "--privileged"}), "starts with '-'"),
            (json!({"cwd": "a\nb"}), "control character"),
            (
                json!({"env": {"ARSERVICE_INSTANCE": "ars-other-r"}}),
                "'ARSERVICE_INSTANCE' is reserved",
            ),
            (json!({"forward_env": ["ARSERVICE_EXEC"]}), "forward_env"),
            (json!({"forward_env": "HOME"}), "forward_env"),
            (json!({"resources": {"cpus": -2}}), "'cpus'"),
            (json!({"cwd": 5}), "cwd"),
            (json!({"shell": []}), "shell"),
        ] {
            let why = parse(config.clone()).unwrap_err();
            assert!(why.contains(needle), "{config} gave {why}");
        }
    }

    #[test]
    fn env_names() {
        assert!(valid_env_name("PIP_NO_INPUT"));
        assert!(valid_env_name("_x1"));
        assert!(!valid_env_name("1X"));
        assert!(!valid_env_name("A=B"));
        assert!(!valid_env_name(""));
    }
}
