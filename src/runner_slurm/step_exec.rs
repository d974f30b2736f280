//! One command on the CLI path: an `srun` step under the guard, its output read from the file
//! the guard leaves (see `crate::guard::StepOutput`), and the calls that cancel and signal the
//! steps of an instance.

use super::job::{write_private, SlurmEnv};
use super::settings::*;
use super::steps::*;
use crate::env::spawn::{self, ExecResult, Limits};
use crate::env::{
    not_a_directory, run_tool, EnvError, ExecRequest, CWD_REFUSED, CWD_REFUSED_CODE, SANDBOX_PREFIX,
};
use crate::guard::StepOutput;
use std::process::Command;
use std::sync::atomic::Ordering;

impl SlurmEnv {
    /// One command as an `srun` step of the job (the CLI path).
    pub(super) fn exec_step(
        &self,
        steps: &Steps,
        request: &ExecRequest,
    ) -> Result<ExecResult, EnvError> {
        let cwd = match &request.cwd {
            Some(cwd) => steps.workdir.join(cwd),
            None => steps.workdir.clone(),
        };
        let step_name = format!(
            "{SANDBOX_PREFIX}step-{}-{}",
            self.run_id,
            steps.next_step.fetch_add(1, Ordering::Relaxed)
        );
        let timeout = request.limits.timeout;
        let output = steps.output_of(&step_name);
        let _ = std::fs::remove_file(&output);
        let input = steps.input_of(&step_name);
        if let Some(stdin) = &request.stdin {
            write_private(&input, stdin.as_bytes()).map_err(|source| EnvError::Io {
                context: format!("cannot write the command's stdin to {}", input.display()),
                source,
            })?;
        }
        let mut srun = Command::new("srun");
        srun.args(steps.arguments(
            &self.job_id,
            &step_name,
            &cwd,
            request,
            std::time::SystemTime::now(),
        ))
        .env_clear()
        .envs(&steps.env)
        .envs(&request.env);
        // The guard enforces `timeout` inside the step; this deadline is the fallback.
        let limits = Limits {
            timeout: timeout + STEP_GUARD_MARGIN,
            ..request.limits
        };
        let result = spawn::run_sandboxed(srun, None, limits, &steps.groups, &|signal| {
            self.signal_step_soon(&step_name, signal)
        })
        .map_err(|source| EnvError::Io {
            context: "cannot run srun".into(),
            source,
        });
        if request.stdin.is_some() {
            let _ = std::fs::remove_file(&input);
        }
        let mut result = answer_of_step(
            result?,
            &output,
            &cwd,
            &step_name,
            request.limits.max_output_bytes,
        )?;
        // The guard's 124 at the timeout (counted from when `srun` started here, by clocks
        // that Slurm keeps in step): the command timed out.
        if result.returncode == spawn::TIMEOUT_RETURNCODE
            && result.duration_s >= timeout.saturating_sub(STEP_CLOCK_TOLERANCE).as_secs_f64()
        {
            result.timed_out = true;
        }
        Ok(result)
    }

    /// Cancels the steps of this instance's commands still in the job (their guards end what
    /// they started); the batch step, which holds the job, stays.
    pub(super) fn cancel_steps(&self) {
        let prefix = format!("{SANDBOX_PREFIX}step-{}-", self.run_id);
        let steps = steps_named(&self.job_id, |name| name.starts_with(&prefix));
        if steps.is_empty() {
            return;
        }
        let mut scancel = Command::new("scancel");
        scancel.args(&steps);
        match run_tool("scancel", scancel, SLURM_CALL_TIMEOUT) {
            Ok(_) => log::warn!(
                "cancelled {} command(s) left running in job {}: {}",
                steps.len(),
                self.job_id,
                steps.join(" ")
            ),
            Err(err) => log::warn!("cannot cancel steps {}: {err}", steps.join(" ")),
        }
    }

    /// Sends `signal` to the step named `step_name` (the spawn helper's fallback, when the
    /// step's guard has not ended it): waits for that at most [`STEP_SIGNAL_WAIT`], so that
    /// the helper's own signal to `srun` (which makes Slurm kill the step, the guard and
    /// everything below it) follows at once.
    pub(super) fn signal_step_soon(&self, step_name: &str, signal: i32) {
        let (job_id, step_name) = (self.job_id.clone(), step_name.to_string());
        let (done, finished) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            signal_step(&job_id, &step_name, signal);
            let _ = done.send(());
        });
        let _ = finished.recv_timeout(STEP_SIGNAL_WAIT);
    }
}

/// What a step answers: the command's output, from the file its guard left (what `srun`
/// printed is then its own words, logged); without the file (the guard refused to run the
/// command, or was killed by the fallback), `srun`'s output is all there is. The file is
/// removed.
fn answer_of_step(
    mut result: ExecResult,
    output: &std::path::Path,
    cwd: &std::path::Path,
    step_name: &str,
    cap: usize,
) -> Result<ExecResult, EnvError> {
    strip_task_exit_line(&mut result);
    // The guard's file holds the command's output; what `srun` printed is then its own
    // words. Without the file (the guard refused to run the command, or was killed by
    // the fallback), `srun`'s output is all there is.
    match StepOutput::read(output, cap) {
        Ok((text, truncated, returncode)) => {
            if !result.output.trim().is_empty() {
                log::warn!("srun, step {step_name}: {}", result.output.trim_end());
            }
            result.output = text;
            result.truncated = truncated;
            result.returncode = returncode.into();
        }
        // No file: the command never ran, and the output is srun's, slurmstepd's and the
        // guard's words (in no set order). The guard's refusal of the `cwd` among them is
        // the 400 of every other path.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if result.returncode == CWD_REFUSED_CODE
                && result.output.lines().any(|line| line == CWD_REFUSED)
            {
                return Err(EnvError::Invalid(not_a_directory(
                    &cwd.display().to_string(),
                )));
            }
        }
        Err(err) => log::warn!("step {step_name}: its output file: {err}"),
    }
    let _ = std::fs::remove_file(output);
    Ok(result)
}
