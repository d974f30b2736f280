//! The CLI path (`exec_mode: "cli"`): every command one `srun` step under `arservice guard`,
//! and the calls that find, signal and cancel a job's steps.

use super::settings::*;
use crate::env::spawn::{ExecResult, ProcessGroups};
use crate::env::{run_tool, EnvError, EnvSpec, ExecRequest, InstanceContext};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// The CLI path: every command is `srun --jobid J --overlap <arservice> guard ... -- <shell>
/// <cmd>` on the job's node, through the spawn helper. The guard enforces the timeout inside
/// the step and leaves nothing of the command behind (see `crate::guard`); the spawn helper's
/// own deadline comes [`STEP_GUARD_MARGIN`] later, as the fallback, and then ends the step with
/// `scancel --signal` (killing `srun` does not reliably stop the step). Commands run on the
/// node itself, as `container_type: local` would; the agent path is the one for every other
/// type.
pub(super) struct Steps {
    /// The working directory of commands, on the shared file system.
    pub(super) workdir: PathBuf,
    /// Where each step's guard leaves the command's output (`<step name>.out`), on the shared
    /// file system: see [`crate::guard::StepOutput`].
    pub(super) outputs: PathBuf,
    /// The arservice binary as the node reaches it: the guard of every step.
    pub(super) guard: PathBuf,
    /// The instance's marker (its sandbox name), which the guard sets on every command.
    pub(super) instance: String,
    pub(super) shell: Vec<String>,
    /// The config's `env` and `forward_env` (the step inherits the rest from `srun`).
    pub(super) env: BTreeMap<String, String>,
    pub(super) groups: ProcessGroups,
    pub(super) next_step: AtomicU64,
}

/// What a CLI-path step takes from the server's environment (besides `SLURM_*`, which `srun`
/// itself reads).
pub(super) const STEP_ENV_FROM_SERVER: [&str; 4] = ["PATH", "USER", "LANG", "TZ"];

/// The shell of a CLI-path command when the config names none (as `local`).
pub(super) const STEP_SHELL: [&str; 2] = ["sh", "-c"];

/// How much later than a command's timeout the spawn helper ends a CLI-path step itself, when
/// its guard has not: the guard takes [`spawn::TERM_GRACE`] between its SIGTERM and its
/// SIGKILL, then `srun` has to notice the step's end.
pub(super) const STEP_GUARD_MARGIN: Duration = Duration::from_millis(750);

/// How much earlier than its timeout a step may end with the guard's 124 and still count as
/// timed out: the guard's deadline is read from the node's clock.
pub(super) const STEP_CLOCK_TOLERANCE: Duration = Duration::from_millis(100);

/// How long the fallback kill of a step waits for its `squeue` and `scancel` before it goes on.
pub(super) const STEP_SIGNAL_WAIT: Duration = Duration::from_millis(100);

impl Steps {
    pub(super) fn new(
        spec: &EnvSpec,
        ctx: &InstanceContext,
        guard: &Path,
    ) -> Result<Steps, EnvError> {
        if spec.kind != crate::env::Kind::Local {
            return Err(EnvError::Invalid(format!(
                "exec_mode \"cli\" under the Slurm runner runs each command as an srun step on the node: \
                 it takes container_type local only, not {} (the agent path runs every type)",
                spec.kind.name()
            )));
        }
        let workdir = ctx.root.join("work");
        let outputs = ctx.root.join("steps");
        for dir in [&workdir, &outputs] {
            std::fs::create_dir_all(dir).map_err(|source| EnvError::Io {
                context: format!("cannot create {}", dir.display()),
                source,
            })?;
        }
        // srun passes its whole environment on to the step: it gets only these, never the
        // server's own (its token, model API keys), as `local` commands do.
        let mut env: BTreeMap<String, String> = std::env::vars()
            .filter(|(name, _)| {
                STEP_ENV_FROM_SERVER.contains(&name.as_str()) || name.starts_with("SLURM_")
            })
            .collect();
        env.insert("HOME".into(), workdir.display().to_string());
        env.extend(
            spec.forward_env
                .iter()
                .filter_map(|name| std::env::var(name).ok().map(|value| (name.clone(), value))),
        );
        env.extend(spec.env.clone());
        env.insert("ARSERVICE_RUN_ID".into(), ctx.run_id.to_string());
        Ok(Steps {
            outputs,
            guard: guard.to_path_buf(),
            instance: ctx.sandbox_name(),
            workdir: match &spec.cwd {
                Some(cwd) => workdir.join(cwd),
                None => workdir,
            },
            shell: spec
                .shell
                .clone()
                .unwrap_or_else(|| STEP_SHELL.map(String::from).to_vec()),
            env,
            groups: ProcessGroups::default(),
            next_step: AtomicU64::new(0),
        })
    }

    /// The arguments of `srun` for one command (after the program name): the guard, then
    /// the command. A request with `stdin` has it in [`Steps::input_of`], which the guard
    /// gives the command (`--input`; srun's own stdin forwarding is not used).
    pub(super) fn arguments(
        &self,
        job_id: &str,
        step_name: &str,
        cwd: &Path,
        request: &ExecRequest,
        started_at: std::time::SystemTime,
    ) -> Vec<String> {
        let limits = request.limits;
        let since_epoch = started_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut args: Vec<String> = vec![
            format!("--jobid={job_id}"),
            "--overlap".into(),
            "--nodes=1".into(),
            "--ntasks=1".into(),
            "--quiet".into(),
            format!("--job-name={step_name}"),
            format!("--chdir={}", cwd.display()),
            self.guard.display().to_string(),
            "guard".into(),
            "--instance".into(),
            self.instance.clone(),
            "--exec".into(),
            step_name.to_string(),
            "--timeout".into(),
            format!("{:.3}", limits.timeout.as_secs_f64()),
            "--output".into(),
            self.output_of(step_name).display().to_string(),
            "--max-output-bytes".into(),
            limits.max_output_bytes.to_string(),
            "--started-at".into(),
            format!("{:.3}", since_epoch.as_secs_f64()),
            "--cwd".into(),
            cwd.display().to_string(),
        ];
        if request.sink.is_some() {
            args.extend([
                "--stream".into(),
                self.stream_of(step_name).display().to_string(),
            ]);
        }
        if request.stdin.is_some() {
            args.extend([
                "--input".into(),
                self.input_of(step_name).display().to_string(),
            ]);
        }
        args.push("--".into());
        args.extend(self.shell.iter().cloned());
        args.push(request.cmd.clone());
        args
    }

    /// The file the guard of step `step_name` writes the command's output to.
    pub(super) fn output_of(&self, step_name: &str) -> PathBuf {
        self.outputs.join(format!("{step_name}.out"))
    }

    /// The file the guard of a streamed step `step_name` appends the output to as it comes,
    /// which the server tails (`step_exec::Tail`).
    pub(super) fn stream_of(&self, step_name: &str) -> PathBuf {
        self.outputs.join(format!("{step_name}.stream"))
    }

    /// The file the server writes the `stdin` of step `step_name`'s command to, which its
    /// guard reads (on the shared file system, in the instance's 0700 directory).
    pub(super) fn input_of(&self, step_name: &str) -> PathBuf {
        self.outputs.join(format!("{step_name}.in"))
    }
}

/// Removes the line `srun` adds to its output when a command exits non-zero (`srun: error:
/// node1: task 0: Exited with exit code 3`; `--quiet` keeps it, and `-Q -Q` would hide srun's
/// real errors too). What `srun` printed is only ever srun's, slurmstepd's and the guard's own
/// words (the command's output is in the guard's file), in no set order, so the line goes
/// wherever it stands; only a line naming exactly the step's return code goes.
pub(super) fn strip_task_exit_line(result: &mut ExecResult) {
    let suffix = format!(": task 0: Exited with exit code {}", result.returncode);
    let is_srun_s = |line: &str| {
        line.strip_suffix(&suffix)
            .and_then(|head| head.strip_prefix("srun: error: "))
            .is_some_and(|node| !node.is_empty() && !node.contains(':'))
    };
    if !result.output.lines().any(is_srun_s) {
        return;
    }
    result.output = result
        .output
        .split_inclusive('\n')
        .filter(|line| !is_srun_s(line.strip_suffix('\n').unwrap_or(line)))
        .collect();
}

/// The ids (`J.S`) of job `job_id`'s steps whose name `wanted` accepts.
pub(super) fn steps_named(job_id: &str, wanted: impl Fn(&str) -> bool) -> Vec<String> {
    let mut squeue = Command::new("squeue");
    squeue.args(["--steps", "--noheader", "--format=%i|%j", "--jobs", job_id]);
    let Ok(listing) = run_tool("squeue --steps", squeue, SLURM_CALL_TIMEOUT) else {
        return Vec::new();
    };
    listing
        .lines()
        .filter_map(|line| line.trim().split_once('|'))
        .filter(|(_, name)| wanted(name.trim()))
        .map(|(step, _)| step.trim().to_string())
        .collect()
}

/// Sends `signal` to the step named `step_name` with `scancel --signal`: SIGTERM makes its
/// guard end the command and everything it started; SIGKILL is the last resort.
pub(super) fn signal_step(job_id: &str, step_name: &str, signal: i32) {
    let name = if signal == libc::SIGKILL {
        "KILL"
    } else {
        "TERM"
    };
    for step in steps_named(job_id, |name| name == step_name) {
        let mut scancel = Command::new("scancel");
        scancel.arg(format!("--signal={name}")).arg(&step);
        if let Err(err) = run_tool("scancel", scancel, SLURM_CALL_TIMEOUT) {
            log::warn!("ending timed-out step {step}: {err}");
        }
    }
}
