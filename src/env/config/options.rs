//! The typed options of each kind (`run_args` for docker and podman, `bwrap_args` for
//! bubblewrap, ...) and of the Slurm runner (`slurm`), read once from `environment_config` with
//! their defaults filled in. Which key belongs to which kind is [`kind_keys`].

use super::fields::{string_list, timeout_or};
use super::{ConfigError, Kind};
use serde_json::{Map, Value};
use std::time::Duration;

/// Bound on one container or instance call (`run`, `rm`, `instance start`) by default.
pub const DEFAULT_CONTAINER_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound on `docker pull` by default.
const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// Bound on `apptainer build` (an image conversion) by default.
const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(1800);

/// Bound on `enroot import` (a download and conversion) by default.
const DEFAULT_IMPORT_TIMEOUT: Duration = Duration::from_secs(1800);

/// The keys only some kinds take, by kind (the common keys are [`super::COMMON_KEYS`]).
pub fn kind_keys(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Docker | Kind::Podman => &["run_args", "container_timeout", "pull_timeout"],
        Kind::Apptainer => &["writable", "build_timeout", "container_timeout"],
        Kind::Enroot => &["import_timeout", "container_timeout", "registry_separator"],
        Kind::Bubblewrap => &["bwrap_args"],
        Kind::Local => &[],
    }
}

/// Every kind, for the message about a key of another kind.
const KINDS: [Kind; 5] = [
    Kind::Docker,
    Kind::Apptainer,
    Kind::Enroot,
    Kind::Bubblewrap,
    Kind::Local,
];

/// The kinds (as named in a config) that take `key`, like `docker/podman`.
pub fn kinds_taking(key: &str) -> Vec<&'static str> {
    KINDS
        .into_iter()
        .filter(|kind| kind_keys(*kind).contains(&key))
        .map(|kind| match kind {
            Kind::Docker => "docker/podman",
            other => other.name(),
        })
        .collect()
}

/// The options of one kind.
#[derive(Clone, Debug, PartialEq)]
pub enum KindOptions {
    /// docker and podman.
    Docker(DockerOptions),
    Apptainer(ApptainerOptions),
    Enroot(EnrootOptions),
    Bubblewrap(BwrapOptions),
    Local,
}

impl KindOptions {
    pub fn parse(kind: Kind, raw: &Map<String, Value>) -> Result<KindOptions, ConfigError> {
        let invalid = ConfigError::Invalid;
        let timeout = |key: &str, default| timeout_or(raw, key, default).map_err(invalid);
        Ok(match kind {
            Kind::Docker | Kind::Podman => KindOptions::Docker(DockerOptions {
                run_args: string_list(
                    raw.get("run_args"),
                    "run_args",
                    ", like [\"--network\", \"none\"]",
                )
                .map_err(invalid)?,
                container_timeout: timeout("container_timeout", DEFAULT_CONTAINER_TIMEOUT)?,
                pull_timeout: timeout("pull_timeout", DEFAULT_PULL_TIMEOUT)?,
            }),
            Kind::Apptainer => KindOptions::Apptainer(ApptainerOptions {
                writable: WritableLayer::parse(raw.get("writable"))?,
                build_timeout: timeout("build_timeout", DEFAULT_BUILD_TIMEOUT)?,
                container_timeout: timeout("container_timeout", DEFAULT_CONTAINER_TIMEOUT)?,
            }),
            Kind::Enroot => KindOptions::Enroot(EnrootOptions {
                import_timeout: timeout("import_timeout", DEFAULT_IMPORT_TIMEOUT)?,
                container_timeout: timeout("container_timeout", DEFAULT_CONTAINER_TIMEOUT)?,
                registry_separator: RegistrySeparator::parse(raw.get("registry_separator"))?,
            }),
            Kind::Bubblewrap => KindOptions::Bubblewrap(BwrapOptions {
                bwrap_args: string_list(raw.get("bwrap_args"), "bwrap_args", "")
                    .map_err(invalid)?,
            }),
            Kind::Local => KindOptions::Local,
        })
    }
}

/// Docker's and podman's keys.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerOptions {
    /// Extra `run` arguments, placed before the image.
    pub run_args: Vec<String>,
    pub container_timeout: Duration,
    pub pull_timeout: Duration,
}

impl Default for DockerOptions {
    fn default() -> DockerOptions {
        DockerOptions {
            run_args: Vec::new(),
            container_timeout: DEFAULT_CONTAINER_TIMEOUT,
            pull_timeout: DEFAULT_PULL_TIMEOUT,
        }
    }
}

/// Apptainer's keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ApptainerOptions {
    pub writable: WritableLayer,
    pub build_timeout: Duration,
    pub container_timeout: Duration,
}

impl Default for ApptainerOptions {
    fn default() -> ApptainerOptions {
        ApptainerOptions {
            writable: WritableLayer::Tmpfs,
            build_timeout: DEFAULT_BUILD_TIMEOUT,
            container_timeout: DEFAULT_CONTAINER_TIMEOUT,
        }
    }
}

/// Where an apptainer instance writes (`writable`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WritableLayer {
    /// `--writable-tmpfs`: in memory, small, gone on close (the default).
    Tmpfs,
    /// `--overlay <dir>`: a directory under the instance's state dir, for big writes.
    Overlay,
}

impl WritableLayer {
    fn parse(value: Option<&Value>) -> Result<WritableLayer, ConfigError> {
        match value {
            None | Some(Value::Null) => Ok(WritableLayer::Tmpfs),
            Some(Value::String(mode)) if mode == "tmpfs" => Ok(WritableLayer::Tmpfs),
            Some(Value::String(mode)) if mode == "overlay" => Ok(WritableLayer::Overlay),
            Some(other) => Err(ConfigError::Invalid(format!(
                "writable must be \"tmpfs\" or \"overlay\", got {other}"
            ))),
        }
    }
}

/// Enroot's keys.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrootOptions {
    pub import_timeout: Duration,
    pub container_timeout: Duration,
    pub registry_separator: RegistrySeparator,
}

impl Default for EnrootOptions {
    fn default() -> EnrootOptions {
        EnrootOptions {
            import_timeout: DEFAULT_IMPORT_TIMEOUT,
            container_timeout: DEFAULT_CONTAINER_TIMEOUT,
            registry_separator: RegistrySeparator::Slash,
        }
    }
}

/// How `enroot import` names a registry in a docker reference (`registry_separator`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RegistrySeparator {
    /// `docker://registry/repo[:tag]`: enroot 4.0 and later (the default).
    Slash,
    /// `docker://registry#repo[:tag]`: enroot 3.x, which reads `registry/repo` as a
    /// repository of Docker Hub.
    Hash,
}

impl RegistrySeparator {
    fn parse(value: Option<&Value>) -> Result<RegistrySeparator, ConfigError> {
        match value {
            None | Some(Value::Null) => Ok(RegistrySeparator::Slash),
            Some(Value::String(separator)) if separator == "/" => Ok(RegistrySeparator::Slash),
            Some(Value::String(separator)) if separator == "#" => Ok(RegistrySeparator::Hash),
            Some(other) => Err(ConfigError::Invalid(format!(
                "registry_separator must be \"/\" (enroot 4) or \"#\" (enroot 3), got {other}"
            ))),
        }
    }
}

/// Bubblewrap's keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BwrapOptions {
    /// Extra `bwrap` arguments, placed before the command.
    pub bwrap_args: Vec<String>,
}

/// The keys of `environment_config.slurm`.
const SLURM_KEYS: [&str; 6] = [
    "partition",
    "account",
    "qos",
    "time",
    "constraint",
    "sbatch_args",
];

/// `environment_config.slurm`: the Slurm runner's options for one instance (they win over the
/// server's). Every kind takes it; only the Slurm runner reads it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub time: Option<String>,
    pub constraint: Option<String>,
    pub sbatch_args: Vec<String>,
}

impl SlurmOptions {
    pub fn parse(value: Option<&Value>) -> Result<SlurmOptions, ConfigError> {
        let object = match value {
            None | Some(Value::Null) => return Ok(SlurmOptions::default()),
            Some(Value::Object(object)) => object,
            Some(other) => {
                return Err(ConfigError::Invalid(format!(
                    "slurm must be an object, got {other}"
                )))
            }
        };
        let mut options = SlurmOptions::default();
        for (key, value) in object {
            let text = || {
                value.as_str().map(String::from).ok_or_else(|| {
                    ConfigError::Invalid(format!("slurm.{key} must be a string, got {value}"))
                })
            };
            match key.as_str() {
                "partition" => options.partition = Some(text()?),
                "account" => options.account = Some(text()?),
                "qos" => options.qos = Some(text()?),
                "time" => options.time = Some(text()?),
                "constraint" => options.constraint = Some(text()?),
                "sbatch_args" => {
                    options.sbatch_args = string_list(Some(value), "slurm.sbatch_args", "")
                        .map_err(ConfigError::Invalid)?
                }
                other => {
                    return Err(ConfigError::UnknownKey {
                        key: format!("slurm.{other}"),
                        closest: super::closest(other, &SLURM_KEYS)
                            .map(|key| format!("slurm.{key}")),
                        known: SLURM_KEYS.join(", "),
                    })
                }
            }
        }
        Ok(options)
    }
}
