//! The `singularity`/`apptainer` environment, the way HPC sites run many short sandboxes:
//! the image is converted to a SIF once and cached, each instance is an `instance start` with a
//! writable layer of its own, commands go through `exec instance://<name>`, close is
//! `instance stop`.
//!
//! Owns those command lines and nothing else. Processes of an apptainer instance live in the
//! host's process table, so a timeout kills them by their markers (`ARSERVICE_INSTANCE`,
//! `ARSERVICE_EXEC`), not only the local `apptainer exec` client.

use super::spawn::{self, Marker, ProcessGroups, EXEC_MARKER, INSTANCE_MARKER};
use super::{
    cached_image, first_on_path, parse_timeout, run_tool, EnvError, EnvSpec, Environment,
    ExecRequest, ExecResult, InstanceContext, BASH_OR_SH, MERGE_OUTPUT,
};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The CLIs that run this environment, in order of preference.
const CLIS: [&str; 2] = ["apptainer", "singularity"];

/// Default bound on converting an image (`build_timeout`).
const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(1800);

/// Default bound on `instance start` and `instance stop` (`container_timeout`).
const DEFAULT_CONTAINER_TIMEOUT: Duration = Duration::from_secs(120);

/// Where an instance's writes go.
#[derive(Debug, Clone, PartialEq)]
pub enum Writable {
    /// `--writable-tmpfs`: in memory, small, gone on close (the default).
    Tmpfs,
    /// `--overlay <dir>`: a directory under the instance's state dir, for big writes.
    Overlay(PathBuf),
}

/// Apptainer's type-specific keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ApptainerOptions {
    pub writable: Writable,
    pub build_timeout: Duration,
    pub container_timeout: Duration,
}

impl ApptainerOptions {
    pub fn parse(
        raw: &Map<String, Value>,
        ctx: &InstanceContext,
    ) -> Result<ApptainerOptions, EnvError> {
        let writable = match raw.get("writable").and_then(Value::as_str) {
            None | Some("tmpfs") => Writable::Tmpfs,
            Some("overlay") => Writable::Overlay(ctx.root.join("overlay")),
            Some(other) => {
                return Err(EnvError::Invalid(format!(
                    "writable must be \"tmpfs\" or \"overlay\", got \"{other}\""
                )))
            }
        };
        let timeout = |key: &str, default: Duration| match raw.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => parse_timeout(value, key).map_err(EnvError::Invalid),
        };
        Ok(ApptainerOptions {
            writable,
            build_timeout: timeout("build_timeout", DEFAULT_BUILD_TIMEOUT)?,
            container_timeout: timeout("container_timeout", DEFAULT_CONTAINER_TIMEOUT)?,
        })
    }
}

/// Where a build reads the image from: the image as given when it names a scheme, else a
/// docker reference.
pub fn build_source(image: &str) -> String {
    if image.contains("://") {
        image.to_string()
    } else {
        format!("docker://{image}")
    }
}

/// The environment as the CLI's own `<PREFIX>ENV_NAME=value` variables: passed on unchanged
/// even with `--cleanenv`, never split (`--env` reads a value with a second `=` as a list
/// and strips quotes), and never visible in `ps`.
fn tool_env(cli: &str, env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let singularity = Path::new(cli)
        .file_name()
        .is_some_and(|name| name == "singularity");
    let prefix = if singularity {
        "SINGULARITYENV_"
    } else {
        "APPTAINERENV_"
    };
    env.iter()
        .map(|(name, value)| (format!("{prefix}{name}"), value.clone()))
        .collect()
}

/// The arguments of `instance start` (after the program name).
pub fn start_arguments(sif: &Path, name: &str, options: &ApptainerOptions) -> Vec<String> {
    let mut args: Vec<String> = ["instance", "start", "--contain", "--cleanenv"]
        .map(String::from)
        .to_vec();
    match &options.writable {
        Writable::Tmpfs => args.push("--writable-tmpfs".into()),
        Writable::Overlay(dir) => args.extend(["--overlay".into(), dir.display().to_string()]),
    }
    args.extend([sif.display().to_string(), name.to_string()]);
    args
}

/// One apptainer instance.
pub struct ApptainerEnv {
    cli: String,
    name: String,
    root_dir: PathBuf,
    cwd: Option<String>,
    env: BTreeMap<String, String>,
    shell: Option<Vec<String>>,
    container_timeout: Duration,
    groups: ProcessGroups,
    next_exec: AtomicU64,
}

impl ApptainerEnv {
    pub fn start(spec: &EnvSpec, ctx: &InstanceContext) -> Result<ApptainerEnv, EnvError> {
        let options = ApptainerOptions::parse(&spec.raw, ctx)?;
        let cli = spec
            .executable
            .clone()
            .unwrap_or_else(|| first_on_path(&CLIS).to_string());
        let sif = if spec.image.ends_with(".sif") {
            let sif = PathBuf::from(&spec.image);
            if !sif.is_file() {
                return Err(EnvError::Invalid(format!(
                    "image '{}' is not a SIF file here",
                    spec.image
                )));
            }
            sif
        } else {
            let source = build_source(&spec.image);
            cached_image(&ctx.cache_dir(), "sif", "sif", &source, |partial| {
                let mut build = Command::new(&cli);
                build.arg("build").arg(partial).arg(&source);
                run_tool(&format!("{cli} build"), build, options.build_timeout).map(drop)
            })?
        };
        let mut env = BTreeMap::new();
        for name in &spec.forward_env {
            if let Ok(value) = std::env::var(name) {
                env.insert(name.clone(), value);
            }
        }
        env.extend(spec.env.clone());
        env.insert(INSTANCE_MARKER.into(), ctx.sandbox_name());
        let this = ApptainerEnv {
            cli,
            name: ctx.sandbox_name(),
            root_dir: ctx.root.clone(),
            cwd: spec.cwd.clone(),
            env,
            shell: spec.shell.clone(),
            container_timeout: options.container_timeout,
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
        };
        let started = (|| {
            if let Writable::Overlay(dir) = &options.writable {
                std::fs::create_dir_all(dir).map_err(|source| EnvError::Io {
                    context: format!("cannot create the overlay {}", dir.display()),
                    source,
                })?;
            }
            let mut start = Command::new(&this.cli);
            start
                .args(start_arguments(&sif, &this.name, &options))
                .envs(tool_env(&this.cli, &this.env));
            run_tool(
                &format!("{} instance start", this.cli),
                start,
                this.container_timeout,
            )?;
            if let Some(cwd) = &this.cwd {
                // Like docker's --workdir: the working directory exists from the start.
                let mut mkdir = Command::new(&this.cli);
                mkdir.args([
                    "exec",
                    &format!("instance://{}", this.name),
                    "mkdir",
                    "-p",
                    cwd,
                ]);
                run_tool(
                    &format!("{} exec mkdir", this.cli),
                    mkdir,
                    this.container_timeout,
                )?;
            }
            Ok(())
        })();
        if let Err(err) = started {
            let _ = this.close();
            return Err(err);
        }
        Ok(this)
    }

    /// The arguments of `exec` for one command (after the program name).
    fn exec_arguments(&self, request: &ExecRequest) -> Vec<String> {
        let mut args: Vec<String> = ["exec", "--cleanenv"].map(String::from).to_vec();
        // Always an absolute --pwd: without one, apptainer picks the server's own directory.
        let base = self.cwd.as_deref().unwrap_or("/");
        let cwd = match &request.cwd {
            Some(cwd) => Path::new(base).join(cwd),
            None => Path::new(base).to_path_buf(),
        };
        args.extend(["--pwd".into(), cwd.display().to_string()]);
        args.extend([
            format!("instance://{}", self.name),
            "sh".into(),
            "-c".into(),
        ]);
        match &self.shell {
            Some(shell) => {
                args.extend([MERGE_OUTPUT.into(), "sh".into()]);
                args.extend(shell.iter().cloned());
            }
            None => args.extend([BASH_OR_SH.into(), "sh".into()]),
        }
        args.push(request.cmd.clone());
        args
    }

    /// The environment of one command: the instance's, the command's, and the markers.
    fn exec_env(&self, request: &ExecRequest, exec_id: &str) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.extend(request.env.clone());
        env.insert(EXEC_MARKER.into(), exec_id.into());
        tool_env(&self.cli, &env)
    }

    fn marker(&self) -> Marker<'_> {
        Marker::Is(INSTANCE_MARKER, &self.name)
    }
}

impl Environment for ApptainerEnv {
    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        let exec_id = self.next_exec.fetch_add(1, Ordering::Relaxed).to_string();
        let mut command = Command::new(&self.cli);
        command
            .args(self.exec_arguments(request))
            .envs(self.exec_env(request, &exec_id));
        spawn::run_marked(command, request.limits, &self.groups, &self.name, &exec_id).map_err(
            |source| EnvError::Io {
                context: format!("cannot run {} exec", self.cli),
                source,
            },
        )
    }

    fn close(&self) -> Result<(), EnvError> {
        self.groups.kill_all();
        spawn::kill_marked(self.marker());
        let mut stop = Command::new(&self.cli);
        stop.args(["instance", "stop", &self.name]);
        match run_tool(
            &format!("{} instance stop", self.cli),
            stop,
            self.container_timeout,
        ) {
            Err(EnvError::Tool { detail, .. }) if no_such_instance(&detail) => {}
            other => {
                other?;
            }
        }
        super::local::remove_tree(&self.root_dir)
    }

    fn describe(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert(
            "instance".into(),
            Value::from(format!("instance://{}", self.name)),
        );
        map
    }
}

/// What apptainer says when stopping an instance that is not running.
fn no_such_instance(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    detail.contains("no instance found") || detail.contains("does not exist")
}

/// Stops every instance whose name starts with `prefix` (`ars-<server_id>-`): leftovers of an
/// earlier life. Returns how many.
pub fn reap_leftovers(cli: &str, prefix: &str) -> Result<usize, EnvError> {
    let mut list = Command::new(cli);
    list.args(["instance", "list"]);
    let listing = run_tool(
        &format!("{cli} instance list"),
        list,
        DEFAULT_CONTAINER_TIMEOUT,
    )?;
    let names: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .collect();
    let mut stopped = 0;
    for name in &names {
        let mut stop = Command::new(cli);
        stop.args(["instance", "stop", name]);
        // One that fails must not keep the others alive; one already gone is fine.
        match run_tool(
            &format!("{cli} instance stop"),
            stop,
            DEFAULT_CONTAINER_TIMEOUT,
        ) {
            Ok(_) => stopped += 1,
            Err(EnvError::Tool { detail, .. }) if no_such_instance(&detail) => {}
            Err(err) => log::warn!("cannot stop leftover instance {name}: {err}"),
        }
    }
    Ok(stopped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Limits;
    use serde_json::json;

    fn ctx() -> InstanceContext {
        InstanceContext::for_tests("r")
    }

    #[test]
    fn start_command_line_with_each_writable_layer() {
        let tmpfs = ApptainerOptions::parse(json!({}).as_object().unwrap(), &ctx()).unwrap();
        assert_eq!(
            start_arguments(Path::new("/c/x.sif"), "ars-abcd1234-r", &tmpfs),
            [
                "instance",
                "start",
                "--contain",
                "--cleanenv",
                "--writable-tmpfs",
                "/c/x.sif",
                "ars-abcd1234-r"
            ]
        );
        let overlay =
            ApptainerOptions::parse(json!({"writable": "overlay"}).as_object().unwrap(), &ctx())
                .unwrap();
        assert_eq!(
            start_arguments(Path::new("/c/x.sif"), "n", &overlay),
            [
                "instance",
                "start",
                "--contain",
                "--cleanenv",
                "--overlay",
                "/state/instances/r/overlay",
                "/c/x.sif",
                "n"
            ]
        );
        assert!(
            ApptainerOptions::parse(json!({"writable": "disk"}).as_object().unwrap(), &ctx())
                .is_err()
        );
    }

    #[test]
    fn build_sources() {
        assert_eq!(build_source("python:3.11"), "docker://python:3.11");
        assert_eq!(
            build_source("docker-daemon://img:1"),
            "docker-daemon://img:1"
        );
        assert_eq!(build_source("library://alpine"), "library://alpine");
    }

    #[test]
    fn exec_command_line() {
        let env = ApptainerEnv {
            cli: "apptainer".into(),
            name: "ars-abcd1234-r".into(),
            root_dir: "/state/instances/r".into(),
            cwd: Some("/testbed".into()),
            env: [(INSTANCE_MARKER.to_string(), "ars-abcd1234-r".to_string())].into(),
            shell: None,
            container_timeout: DEFAULT_CONTAINER_TIMEOUT,
            groups: ProcessGroups::default(),
            next_exec: AtomicU64::new(0),
        };
        let request = ExecRequest {
            cmd: "ls".into(),
            cwd: Some("sub".into()),
            env: [("K".to_string(), "V".to_string())].into(),
            limits: Limits {
                timeout: Duration::from_secs(1),
                max_output_bytes: 1,
            },
        };
        assert_eq!(
            env.exec_arguments(&request),
            [
                "exec",
                "--cleanenv",
                "--pwd",
                "/testbed/sub",
                "instance://ars-abcd1234-r",
                "sh",
                "-c",
                BASH_OR_SH,
                "sh",
                "ls",
            ]
        );
        assert_eq!(
            env.exec_env(&request, "4"),
            [
                ("APPTAINERENV_ARSERVICE_EXEC".to_string(), "4".to_string()),
                (
                    "APPTAINERENV_ARSERVICE_INSTANCE".to_string(),
                    "ars-abcd1234-r".to_string()
                ),
                ("APPTAINERENV_K".to_string(), "V".to_string()),
            ]
        );
        let plain = ApptainerEnv { cwd: None, ..env };
        let args = plain.exec_arguments(&request);
        assert_eq!(args[2..4], ["--pwd", "/sub"]);
        assert_eq!(
            tool_env(
                "/usr/bin/singularity",
                &[("A".to_string(), "b=c,d".to_string())].into()
            ),
            [("SINGULARITYENV_A".to_string(), "b=c,d".to_string())]
        );
    }
}
