//! The `slurm` runner: every instance is a Slurm job, so the cluster's scheduler spreads the
//! sandboxes over its nodes while this server stays on a login node.
//!
//! The job runs this same `arservice` binary on its node (`--runner local`, bound to the node's
//! network with a random per-instance token), and that server brings up the instance's
//! environment there: any `container_type` works inside a job, through the same code as on
//! this machine. The job's server announces its host and port in a file under the instance's
//! state directory; this side then forwards start, execute and close to it. Commands therefore
//! cost one HTTP request instead of an `srun` step and a slurmctld round trip each, timeouts are
//! enforced (and killed) on the node by the same spawn helper, and `scancel` makes the job's
//! server close its instance before the job ends.
//!
//! A fork is a new job whose server takes a copy of the source job's files (`--fork-seed`,
//! `SlurmEnv::fork_into`); on the CLI path, the copy is the new instance's `work/` before its
//! job is submitted. What docker, podman and enroot keep on the source's node, the source job's
//! server exports into the shared state dir first (`/export_instance`: an image saved, a rootfs
//! copied), so the fork's job may land on any node.
//!
//! On the CLI path (`exec_mode: "cli"`) every command is an `srun` step run by `arservice
//! guard` on the node (see `crate::guard`): a child subreaper that kills everything the
//! command started, within the step, before Slurm's own step kill ever has to.
//!
//! Owns the `sbatch`/`squeue`/`scancel`/`scontrol` command lines and the job's lifecycle; it
//! never blocks the instance table (every call here runs with no lock held).

mod files;
mod job;
mod script;
mod settings;
mod step_exec;
mod steps;
mod watch;

pub use job::SlurmEnv;
pub use script::{hold_script, job_environment, job_script, sbatch_arguments};
pub use settings::SlurmSettings;
pub use watch::JobWatch;

use crate::env::{run_tool, EnvError, EnvSpec, Environment, InstanceContext, SANDBOX_PREFIX};
use crate::run_id::RunId;
use crate::runner::Runner;
use serde_json::Value;
use settings::{IMPLICIT_UNITS, SLURM_CALL_TIMEOUT};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// The Slurm runner.
pub struct SlurmRunner {
    settings: SlurmSettings,
    watch: Arc<JobWatch>,
}

impl SlurmRunner {
    /// Checks that the Slurm commands are there.
    pub fn new(settings: SlurmSettings) -> Result<SlurmRunner, String> {
        for tool in ["sbatch", "squeue", "scancel", "scontrol"] {
            if !crate::env::on_path(tool) {
                return Err(format!(
                    "--runner slurm needs '{tool}' on PATH (run on a Slurm login node)"
                ));
            }
        }
        if !settings.node_binary.is_file() {
            return Err(format!(
                "--slurm-node-binary {} is not a file: jobs run this arservice binary on their node",
                settings.node_binary.display()
            ));
        }
        Ok(SlurmRunner {
            settings,
            watch: Arc::default(),
        })
    }
}

impl Runner for SlurmRunner {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn implicit_units(&self) -> &'static [&'static str] {
        IMPLICIT_UNITS
    }

    fn sweep_leftovers(&self, server_id: &str, _state_dir: &Path, adopted: &[RunId]) {
        let prefix = format!("{SANDBOX_PREFIX}{server_id}-");
        let kept: Vec<String> = adopted
            .iter()
            .map(|run_id| format!("{prefix}{run_id}"))
            .collect();
        cancel_jobs_named(
            |name| name.starts_with(&prefix) && !kept.iter().any(|kept| kept == name),
            "left by an earlier run",
            log::Level::Warn,
        );
    }

    /// The jobs of these sandboxes still in the queue (pending, or running while their
    /// server comes up) are cancelled: their starts see them end and fail at once.
    fn cancel_starts(&self, server_id: &str, sandboxes: &[RunId]) {
        let names: Vec<String> = sandboxes
            .iter()
            .map(|sandbox| format!("{SANDBOX_PREFIX}{server_id}-{sandbox}"))
            .collect();
        cancel_jobs_named(
            |name| names.iter().any(|wanted| wanted == name),
            "still starting",
            log::Level::Info,
        );
    }

    fn refresh_health(&self) {
        self.watch.refresh();
    }

    fn start(
        &self,
        spec: &EnvSpec,
        ctx: &InstanceContext,
    ) -> Result<Box<dyn Environment>, EnvError> {
        Ok(Box::new(SlurmEnv::start(
            spec,
            ctx,
            &self.settings,
            &self.watch,
        )?))
    }

    fn adopt(
        &self,
        spec: &EnvSpec,
        ctx: &InstanceContext,
        handle: &Value,
    ) -> Result<Box<dyn Environment>, EnvError> {
        Ok(Box::new(SlurmEnv::adopt(
            spec,
            ctx,
            handle,
            &self.settings,
            &self.watch,
        )?))
    }
}

/// The ids of this user's jobs in the queue whose name `wanted` accepts (one `squeue`).
fn jobs_named(wanted: impl Fn(&str) -> bool) -> Result<Vec<String>, EnvError> {
    let mut squeue = Command::new("squeue");
    squeue.args(["--me", "--noheader", "--format=%i|%j"]);
    let listing = run_tool("squeue", squeue, SLURM_CALL_TIMEOUT)?;
    Ok(listing
        .lines()
        .filter_map(|line| line.split_once('|'))
        .filter(|(_, name)| wanted(name.trim()))
        .map(|(id, _)| id.trim().to_string())
        .collect())
}

/// Cancels this user's jobs in the queue whose name `wanted` accepts (one `squeue`, one
/// `scancel` when there are any), logging those cancelled (at `level`) as `what`, and the
/// failures.
fn cancel_jobs_named(wanted: impl Fn(&str) -> bool, what: &str, level: log::Level) {
    let jobs = match jobs_named(wanted) {
        Ok(jobs) => jobs,
        Err(err) => {
            log::warn!("cannot look for the jobs {what}: {err}");
            return;
        }
    };
    match cancel(&jobs) {
        Ok(()) if jobs.is_empty() => {}
        Ok(()) => log::log!(
            level,
            "cancelled {} job(s) {what}: {}",
            jobs.len(),
            jobs.join(" ")
        ),
        Err(err) => log::warn!("cannot cancel the jobs {what} {}: {err}", jobs.join(" ")),
    }
}

/// `scancel` of `jobs` (one call; none: no call).
fn cancel(jobs: &[String]) -> Result<(), EnvError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let mut scancel = Command::new("scancel");
    scancel.args(jobs);
    run_tool("scancel", scancel, SLURM_CALL_TIMEOUT).map(drop)
}

#[cfg(test)]
mod tests {
    use super::script::*;
    use super::settings::*;
    use super::steps::*;
    use super::watch::*;
    use super::*;
    use crate::env::config::SlurmOptions;
    use crate::env::spawn::ExecResult;
    use crate::env::wire::answer_limit;
    use serde_json::json;
    use std::path::Path;
    use std::time::{Duration, Instant};

    fn spec(config: Value) -> EnvSpec {
        EnvSpec::parse(config.as_object().unwrap().clone(), Some("img:1")).unwrap()
    }

    fn ctx() -> InstanceContext {
        InstanceContext::for_tests("r")
    }

    /// A job adopted from a journal of a build before `stdin` (its handle has no
    /// `reads_stdin`) runs an earlier server: a command with `stdin` is refused (400) before
    /// anything is sent; one without goes on (here to a server that is not there).
    #[test]
    fn a_job_server_of_an_earlier_build_is_not_sent_stdin() {
        let env = |reads_stdin| job::SlurmEnv {
            job_id: "42".into(),
            run_id: ctx().run_id,
            root: std::env::temp_dir(),
            mode: job::Mode::Server {
                url: Some("http://127.0.0.1:9".into()),
                token: "t".into(),
                reads_stdin,
            },
            node: String::new(),
            agent: job::node_client(),
            watch: Arc::new(JobWatch::default()),
            probe: None,
            fork_dirs: None,
            exports: false,
        };
        let mut request = crate::env::ExecRequest {
            cmd: "cat".into(),
            cwd: None,
            env: Default::default(),
            limits: crate::env::Limits {
                timeout: Duration::from_secs(1),
                max_output_bytes: 10,
            },
            stdin: Some("x".into()),
            sink: None,
        };
        let old = env(false);
        match old.exec(&request) {
            Err(EnvError::Invalid(detail)) => assert!(detail.contains("earlier build"), "{detail}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(old.handle().unwrap()["reads_stdin"], false);
        assert_eq!(env(true).handle().unwrap()["reads_stdin"], true);
        request.stdin = None;
        assert!(matches!(old.exec(&request), Err(EnvError::Tool { .. })));
    }

    /// A pooled sandbox's name is none a request can give, so the job's server (which checks
    /// `run_id`s as any server does) knows it without its leading `_`.
    #[test]
    fn a_pooled_job_s_server_knows_its_instance_by_a_valid_run_id() {
        let member = RunId::pool_member(0x1f);
        assert_eq!(job::node_run_id(&member).as_str(), "pool-1f");
        let run = RunId::parse("pool-1f", "run_id").unwrap();
        assert_eq!(job::node_run_id(&run), run, "a run keeps its own");
        assert!(crate::run_id::is_valid(&job::node_run_id(&member)));
    }

    #[test]
    fn a_probe_says_silent_only_after_its_grace() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let probe = NodeProbe::new(&address).unwrap();
        assert_eq!(probe.silent_for(), None, "a listening node answers");
        drop(listener);
        let stopped = Instant::now();
        let silent = loop {
            if let Some(silent) = probe.silent_for() {
                break silent;
            }
            assert!(
                stopped.elapsed() < PROBE_GRACE * 3,
                "a closed port never counted as silent"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(stopped.elapsed() >= PROBE_GRACE, "silent before its grace");
        assert!(silent.0 >= PROBE_GRACE, "{silent:?}");
        assert!(silent.1.starts_with(&address), "{silent:?}");
        assert!(probe.failing.lock().is_some());
    }

    #[test]
    fn a_node_address_that_does_not_resolve_leaves_the_job_to_slurm_alone() {
        // `.invalid` never resolves (RFC 6761); a name with no port is no address at all.
        assert!(NodeProbe::new("n9.invalid:4000").is_none());
        assert!(NodeProbe::new("no-port-here").is_none());
        assert!(adopted_probe(&json!({"probe": "n9.invalid:4000"})).is_none());
        assert!(
            adopted_probe(&json!({})).is_none(),
            "a journal from before the probe"
        );
        let probe = adopted_probe(&json!({"probe": "127.0.0.1:9"})).unwrap();
        assert_eq!(probe.address, "127.0.0.1:9");
        let probe = adopted_probe(&json!({"url": "http://127.0.0.1:8", "probe": "x"})).unwrap();
        assert_eq!(
            probe.address, "127.0.0.1:8",
            "the agent path probes its server"
        );
    }

    #[test]
    fn sbatch_command_line_with_resources_and_options() {
        let spec = spec(json!({
            "container_type": "local",
            "resources": {"instances": 1, "cpus": 1.5, "memory_gb": 2, "gpus": 1},
            "slurm": {"partition": "gpu", "time": "01:00:00", "sbatch_args": ["--exclusive"]}
        }));
        let options = SlurmOptions::parse(spec.raw.get("slurm")).unwrap();
        let settings = SlurmSettings {
            partition: Some("debug".into()),
            account: Some("proj".into()),
            sbatch_args: vec!["--nice=10".into()],
            ..SlurmSettings::default()
        };
        let args = sbatch_arguments(
            &spec,
            &ctx(),
            &settings,
            &options,
            Path::new("/state/instances/r/job.sh"),
        );
        assert_eq!(
            args,
            [
                "--parsable",
                "--job-name=ars-abcd1234-r",
                "--comment=arservice server abcd1234 run r",
                "--output=/state/instances/r/job.out",
                "--chdir=/state/instances/r",
                "--no-requeue",
                "--cpus-per-task=2",
                "--mem=2048M",
                "--gpus=1",
                "--partition=gpu",
                "--account=proj",
                "--time=01:00:00",
                "--nice=10",
                "--exclusive",
                "/state/instances/r/job.sh",
            ]
        );
    }

    #[test]
    fn slurm_options_refuse_unknown_keys_and_types() {
        for bad in [
            json!({"partitoin": "x"}),
            json!({"time": 5}),
            json!({"sbatch_args": "--x"}),
            json!("gpu"),
        ] {
            assert!(SlurmOptions::parse(Some(&bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_answer_limit_holds_the_worst_escaped_output_at_the_cap() {
        let cap = 10_000;
        for byte in [0x01u8, b'"', 0xff, b'a'] {
            for total in [cap, 3 * cap] {
                let mut kept = crate::env::spawn::OutputCap::new(cap);
                kept.push(&vec![byte; total]);
                let (output, truncated) = kept.into_output();
                let result = ExecResult {
                    output,
                    returncode: 124,
                    timed_out: true,
                    truncated,
                    duration_s: 1.0 / 3.0,
                };
                let answer = json!({"status": "success", "result": result}).to_string();
                assert!(
                    answer.len() as u64 <= answer_limit(cap),
                    "{byte:#x} x {total}: {} bytes",
                    answer.len()
                );
            }
        }
    }

    #[test]
    fn srun_s_own_exit_line_is_not_part_of_the_output() {
        let result = |output: &str, returncode: i32| ExecResult {
            output: output.into(),
            returncode,
            timed_out: false,
            truncated: false,
            duration_s: 0.1,
        };
        let line = "srun: error: vm: task 0: Exited with exit code 3\n";
        for (output, returncode, kept) in [
            (format!("out\n{line}"), 3, "out\n"),
            (line.to_string(), 3, ""),
            // srun's words come in no set order: its line goes wherever it stands.
            (
                format!("{line}arservice guard: cannot write\n"),
                3,
                "arservice guard: cannot write\n",
            ),
            (format!("a\n{line}b"), 3, "a\nb"),
            // Another code, or not srun's own line: the command's output, kept as it is.
            (
                format!("out\n{line}"),
                4,
                "out\nsrun: error: vm: task 0: Exited with exit code 3\n",
            ),
            (
                "echo: task 0: Exited with exit code 3\n".into(),
                3,
                "echo: task 0: Exited with exit code 3\n",
            ),
        ] {
            let mut result = result(&output, returncode);
            strip_task_exit_line(&mut result);
            assert_eq!(result.output, kept);
        }
    }

    #[test]
    fn the_cli_path_runs_each_command_under_the_guard_and_the_job_holds_with_it() {
        let spec = spec(json!({"container_type": "local", "exec_mode": "cli"}));
        let temp = std::env::temp_dir().join(format!("ars-steps-{}", std::process::id()));
        let ctx = InstanceContext {
            root: temp.clone(),
            ..InstanceContext::for_tests("r")
        };
        let steps = Steps::new(&spec, &ctx, Path::new("/opt/arservice")).unwrap();
        let mut request = crate::env::ExecRequest {
            cmd: "echo hi".into(),
            cwd: None,
            env: Default::default(),
            limits: crate::env::spawn::Limits {
                timeout: Duration::from_millis(1500),
                max_output_bytes: 4096,
            },
            stdin: None,
            sink: None,
        };
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let args = steps.arguments("42", "ars-step-r-0", Path::new("/w"), &request, at);
        assert_eq!(
            args,
            [
                "--jobid=42",
                "--overlap",
                "--nodes=1",
                "--ntasks=1",
                "--quiet",
                "--job-name=ars-step-r-0",
                "--chdir=/w",
                "/opt/arservice",
                "guard",
                "--instance",
                "ars-abcd1234-r",
                "--exec",
                "ars-step-r-0",
                "--timeout",
                "1.500",
                "--output",
                &format!("{}/steps/ars-step-r-0.out", temp.display()),
                "--max-output-bytes",
                "4096",
                "--started-at",
                "1700000000.250",
                "--cwd",
                "/w",
                "--",
                "sh",
                "-c",
                "echo hi",
            ]
        );
        // A stdin goes through a file the guard reads, never on the command line.
        request.stdin = Some("secret input".into());
        let args = steps.arguments("42", "ars-step-r-0", Path::new("/w"), &request, at);
        let input = format!("{}/steps/ars-step-r-0.in", temp.display());
        let at_input = args.iter().position(|arg| arg == "--input").unwrap();
        assert_eq!(args[at_input + 1], input);
        assert_eq!(args[at_input + 2], "--");
        assert!(args.iter().all(|arg| !arg.contains("secret")));
        let script = hold_script(Path::new("/opt/arservice"), &temp, "ars-abcd1234-r");
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.ends_with(&format!(
            "exec '/opt/arservice' guard --hold --instance 'ars-abcd1234-r' --ready-file '{}/ready.json'\n",
            temp.display()
        )));
        let _ = std::fs::remove_dir_all(&temp);
    }

    #[test]
    fn a_job_gets_only_what_it_needs_of_the_servers_environment() {
        let server = [
            ("PATH", "/usr/bin"),
            ("SLURM_CONF", "/etc/slurm/slurm.conf"),
            ("OPENAI_API_KEY", "sk-1"),
            ("ARS_TOKEN", "t"),
            ("HF_TOKEN", "hf"),
            ("SECRET_OF_THE_OPERATOR", "s"),
        ]
        .map(|(name, value)| (name.to_string(), value.to_string()));
        let job = job_environment(&["HF_TOKEN".to_string()], server.into_iter());
        let names: Vec<&str> = job.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["PATH", "SLURM_CONF", "HF_TOKEN"]);
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
