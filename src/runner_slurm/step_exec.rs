//! One command on the CLI path: an `srun` step under the guard, its output read from the file
//! the guard leaves (see `crate::guard::StepOutput`), and the calls that cancel and signal the
//! steps of an instance. A streamed command's output is tailed from the stream file its guard
//! appends to ([`Tail`]; `srun`'s own output is not reliable under load): read every
//! [`TAIL_POLL`], what was read freed from the disk as it goes (a hole punched, where the file
//! system can), the file removed at the end.

use super::job::{write_private, SlurmEnv};
use super::settings::*;
use super::steps::*;
use crate::env::spawn::{self, ExecResult, Limits, OutputSink};
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
        let tail = request
            .sink
            .as_ref()
            .map(|sink| Tail::start(steps.stream_of(&step_name), sink.clone()));
        // The guard enforces `timeout` inside the step; this deadline is the fallback.
        let limits = Limits {
            timeout: timeout + STEP_GUARD_MARGIN,
            ..request.limits
        };
        let result = spawn::run_sandboxed(srun, None, limits, &steps.groups, None, &|signal| {
            self.signal_step_soon(&step_name, signal)
        })
        .map_err(|source| EnvError::Io {
            context: "cannot run srun".into(),
            source,
        });
        if let Some(tail) = tail {
            tail.finish();
        }
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

/// How often the stream file is looked at for more output.
const TAIL_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// A thread that passes what a step's guard appends to its stream file on to `sink`.
struct Tail {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Tail {
    fn start(path: std::path::PathBuf, sink: OutputSink) -> Tail {
        let _ = std::fs::remove_file(&path);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || tail(&path, &sink, &stopping));
        Tail { stop, thread }
    }

    /// Reads what is left (the step has ended: its guard wrote everything) and removes the
    /// file.
    fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

/// Reads `path` from its start as it grows, until `stop` and nothing more to read; removes it.
fn tail(path: &std::path::Path, sink: &OutputSink, stop: &std::sync::atomic::AtomicBool) {
    use std::io::{Read, Seek};
    let mut chunk = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    loop {
        // Looked at before the read: what the guard wrote before the step ended is read after.
        let last = stop.load(Ordering::SeqCst);
        // Opened again each round: on a shared file system, what another node appended shows
        // at an open.
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            if file.seek(std::io::SeekFrom::Start(offset)).is_ok() {
                loop {
                    match file.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(read) => {
                            sink.send(&chunk[..read]);
                            offset += read as u64;
                        }
                    }
                }
                free_read(&file, offset);
            }
        }
        if last {
            break;
        }
        std::thread::sleep(TAIL_POLL);
    }
    let _ = std::fs::remove_file(path);
}

/// Frees the disk blocks of the first `read` bytes (a hole: the size and the offsets stay);
/// nothing where the file system cannot.
fn free_read(file: &std::fs::File, read: u64) {
    use std::os::fd::AsRawFd;
    let Ok(length) = libc::off_t::try_from(read) else {
        return;
    };
    // SAFETY: fallocate on a descriptor we own; punching a hole changes no size or offset.
    unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            length,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[test]
    fn the_tail_passes_every_byte_on_frees_what_it_read_and_removes_the_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("ars-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("step.stream");
        let got = Arc::new(Mutex::new(Vec::new()));
        let into = Arc::clone(&got);
        let tail = Tail::start(
            path.clone(),
            OutputSink::new(move |bytes| into.lock().unwrap().extend_from_slice(bytes)),
        );
        // As the guard writes: appended in pieces, the file created after the tail started.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let piece = vec![b'x'; 1 << 20];
        for _ in 0..8 {
            file.write_all(&piece).unwrap();
            std::thread::sleep(TAIL_POLL * 2);
        }
        // What was read is freed from the disk while the file keeps its size.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while got.lock().unwrap().len() < 8 << 20 {
            assert!(std::time::Instant::now() < deadline, "the tail fell behind");
            std::thread::sleep(TAIL_POLL);
        }
        std::thread::sleep(TAIL_POLL * 3);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 8 << 20);
        let on_disk = meta.blocks() * 512;
        // (ext4 and tmpfs, where tests run, punch holes.)
        assert!(
            on_disk < 1 << 20,
            "the stream file: {} bytes, {on_disk} on disk",
            meta.len()
        );
        file.write_all(b"end").unwrap();
        drop(file);
        tail.finish();
        let got = got.lock().unwrap();
        assert_eq!(got.len(), (8 << 20) + 3);
        assert!(got.ends_with(b"xend"));
        assert!(!path.exists(), "the stream file is removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
