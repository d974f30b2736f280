//! The command lines of the binary: the server's flags (`Args`, checked by `main.rs`), and the
//! in-sandbox, in-step and in-job subcommands, `arservice agent`, `arservice guard` and
//! `arservice sweep`: their argument parsing, checks and exit codes (the work itself is
//! `agent.rs`'s, `guard.rs`'s and the local runner's start-up sweep).

use argh::FromArgs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code for a command line the subcommand refuses (as the server's own, `main.rs`).
const EXIT_CONFIG: u8 = 2;

/// Connections served at once when `--max-connections` is not given (a thread each).
const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Processes (threads included) a container may have when `--pids-limit` is not given: enough
/// for builds and test runs, too few for one command to exhaust the machine's.
const DEFAULT_PIDS_LIMIT: u64 = 512;

#[derive(FromArgs)]
/// arservice: start sandboxes for agent rollouts and run commands in them over a REST API.
///
/// Linux only. --runner is required; every other option has the default it names.
#[argh(
    example = "{command_name} --runner local\n{command_name} --runner local --port 0 --container-types docker,bwrap\n{command_name} --runner slurm --max-resources '{{\"jobs\": 200}}' --slurm-partition debug",
    note = "The state dir is checked and locked before the port is bound (with --port 0 and no\n--state-dir, just after: the default state dir is named after the port the kernel picks).\nThe binary also runs as `{command_name} agent --socket PATH` in sandboxes and as\n`{command_name} guard ...` in Slurm steps; the server starts both itself.\nThe API: docs/api.md, or GET /openapi.json of a running server.",
    error_code(0, "stopped by SIGINT or SIGTERM after closing every instance; --help, --version"),
    error_code(1, "a second SIGINT or SIGTERM during the shutdown: exited at once"),
    error_code(2, "a bad command line or configuration, a state dir in use or not arservice's,\n    a port that cannot be bound: one line on stderr, nothing started")
)]
pub struct Args {
    /// required: where instances run, local (this machine) or slurm (one Slurm job per instance)
    #[argh(option)]
    pub runner: String,
    /// TCP port to listen on; 0 picks a free one (default 8008)
    #[argh(option, default = "8008")]
    pub port: u16,
    /// address to listen on (default 127.0.0.1: this machine only)
    #[argh(option, default = "String::from(\"127.0.0.1\")")]
    pub host: String,
    /// JSON object of enforced resource limits (default {"instances": 10})
    #[argh(option)]
    pub max_resources: Option<String>,
    /// JSON file of presets: {"name": {environment_config...}} (default: none)
    #[argh(option)]
    pub environments: Option<PathBuf>,
    /// container types requests may use, comma-separated, like docker,bwrap (default: all;
    /// leave out local on a shared machine: it runs commands on the host itself)
    #[argh(option)]
    pub container_types: Option<String>,
    /// scratch directory of this server, made private (0700) and marked as arservice's; an
    /// existing one must be empty or arservice's (default: <tmp>/arservice-<uid>/<port>)
    #[argh(option)]
    pub state_dir: Option<PathBuf>,
    /// requests that may run at once, commands included (default 64)
    #[argh(option)]
    pub workers: Option<usize>,
    /// per-command output cap in bytes; head and tail are kept (default 1048576)
    #[argh(option, default = "1024 * 1024")]
    pub max_output_bytes: usize,
    /// largest request body accepted, in bytes (default 8388608; /start_instance,
    /// /execute_command and /close_instance take at most 1048576)
    #[argh(option, default = "8 * 1024 * 1024")]
    pub max_body_bytes: usize,
    /// connections served at once; beyond, the longest-idle one is closed, or 503 when all
    /// have a request in flight (default 1024)
    #[argh(option, default = "DEFAULT_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// seconds a client may take to send a request's head, or go without sending its body or
    /// taking its answer (default 30)
    #[argh(option, default = "30.0")]
    pub client_timeout: f64,
    /// seconds a connection may wait for its next request (default 60)
    #[argh(option, default = "60.0")]
    pub keep_alive_timeout: f64,
    /// error, warn, info, debug or trace (default info)
    #[argh(option, default = "String::from(\"info\")")]
    pub log_level: String,
    /// require "Authorization: Bearer <token>" on every route but /healthz (default: $ARS_TOKEN,
    /// else none: no token)
    #[argh(option)]
    pub token: Option<String>,
    /// allow listening on a non-loopback address without a token (default off)
    #[argh(switch)]
    pub insecure: bool,
    /// seconds an instance may live when its config has no ttl (default: no limit)
    #[argh(option)]
    pub default_ttl: Option<f64>,
    /// seconds without a command before an instance is closed, when its config has no
    /// idle_timeout (default: no limit)
    #[argh(option)]
    pub default_idle_timeout: Option<f64>,
    /// seconds between checks that every sandbox is still alive (default 5)
    #[argh(option, default = "5.0")]
    pub health_interval: f64,
    /// write {"host", "port", "pid"} to this file once listening (used inside Slurm jobs;
    /// default: none)
    #[argh(option)]
    pub ready_file: Option<PathBuf>,
    /// a fork's copied files for the first instance started here, taken (renamed) into its
    /// directory (used inside Slurm jobs; default: none)
    #[argh(option)]
    pub fork_seed: Option<PathBuf>,
    /// seconds one fork's copy of an instance's files (or its `docker commit`) may take before
    /// the fork fails (500, infra) and what it copied is removed (default 600)
    #[argh(option, default = "600.0")]
    pub fork_timeout: f64,
    /// slurm: default partition of every job (default: none, Slurm's own)
    #[argh(option)]
    pub slurm_partition: Option<String>,
    /// slurm: default account (default: none)
    #[argh(option)]
    pub slurm_account: Option<String>,
    /// slurm: default QOS (default: none)
    #[argh(option)]
    pub slurm_qos: Option<String>,
    /// slurm: default time limit, as sbatch --time (default: none)
    #[argh(option)]
    pub slurm_time: Option<String>,
    /// slurm: default constraint (default: none)
    #[argh(option)]
    pub slurm_constraint: Option<String>,
    /// slurm: an extra sbatch argument for every job; repeat it (default: none)
    #[argh(option)]
    pub slurm_sbatch_arg: Vec<String>,
    /// slurm: the arservice binary as compute nodes reach it (default: this one)
    #[argh(option)]
    pub slurm_node_binary: Option<PathBuf>,
    /// slurm: seconds a job may stay pending before its start fails (default 600)
    #[argh(option, default = "600.0")]
    pub queue_timeout: f64,
    /// a static arservice binary to run inside containers as their agent, so a command costs
    /// a socket request instead of a docker exec (default: this binary, if it is static)
    #[argh(option)]
    pub agent: Option<PathBuf>,
    /// model gateway: an LLM upstream for /v1/chat/completions and /v1/messages, as
    /// NAME=URL[,key_env=VAR] (the API key is read from $VAR); repeat it (default: none, the
    /// gateway is off)
    #[argh(option)]
    pub model_upstream: Vec<String>,
    /// model gateway: litellm's model_prices_and_context_window.json, to price calls
    /// (default: none, calls are unpriced)
    #[argh(option)]
    pub model_prices: Option<PathBuf>,
    /// model gateway: refuse model calls (429) once this many USD are spent in total
    /// (default: no limit)
    #[argh(option)]
    pub cost_limit: Option<f64>,
    /// model gateway: refuse model calls (429) once this many were made in total (default:
    /// no limit)
    #[argh(option)]
    pub call_limit: Option<u64>,
    /// model gateway: retries of a call answered 429 or 5xx or not connected (default 3)
    #[argh(option, default = "3")]
    pub model_retries: u32,
    /// model gateway: seconds before the first retry, doubling after each (default 0.5)
    #[argh(option, default = "0.5")]
    pub model_backoff: f64,
    /// model gateway: seconds one attempt may take, a streamed answer included (default 600)
    #[argh(option, default = "600.0")]
    pub model_timeout: f64,
    /// let clients set the config fields that reach this machine beyond the sandbox
    /// (run_args, bwrap_args, executable, a bubblewrap rootfs or host cwd,
    /// slurm.sbatch_args); by default (off) only --environments presets may
    #[argh(switch)]
    pub allow_client_host_access: bool,
    /// the most processes (threads included) one docker or podman container may have; 0: no
    /// limit (default 512)
    #[argh(option, default = "DEFAULT_PIDS_LIMIT")]
    pub pids_limit: u64,
    /// print the version and exit (answered before the rest is parsed)
    #[argh(switch)]
    #[allow(dead_code)]
    pub version: bool,
}

#[derive(FromArgs)]
/// arservice agent: runs the commands of one sandbox, inside it (started by the server).
struct AgentArgs {
    /// the unix socket to listen on
    #[argh(option)]
    socket: PathBuf,
}

/// The arguments of subcommand `name`; `--help` (printed, exit 0) or a bad command line
/// (its error printed, exit 2) as the exit to return.
fn parse_subcommand<T: FromArgs>(program: &str, name: &str, rest: &[&str]) -> Result<T, ExitCode> {
    T::from_args(&[program, name], rest).map_err(|early| {
        eprintln!("{}", early.output.trim_end());
        if early.status.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_CONFIG)
        }
    })
}

/// `arservice agent --socket PATH`: the long-lived process inside a sandbox.
pub fn agent_main(program: &str, rest: &[&str]) -> ExitCode {
    let args: AgentArgs = match parse_subcommand(program, "agent", rest) {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    if std::process::id() == 1 {
        // The sandbox's first process (a container's entrypoint): be its init too.
        return match crate::agent::init(&args.socket) {
            Ok(code) => ExitCode::from(code),
            Err(why) => {
                eprintln!("arservice agent: {why}");
                ExitCode::FAILURE
            }
        };
    }
    // What a command detaches (`setsid`, a double fork) comes back to the serving agent, not
    // to PID 1, so that its timeout finds it.
    if let Err(err) = crate::env::process::become_subreaper() {
        eprintln!("arservice agent: cannot become the commands' subreaper: {err}");
        return ExitCode::FAILURE;
    }
    match crate::agent::serve(&args.socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("arservice agent: {why}");
            ExitCode::FAILURE
        }
    }
}

#[derive(FromArgs)]
/// arservice guard: runs one command of a Slurm CLI-path step on its node and leaves nothing of
/// it behind (started by the server through srun); with --hold, holds the job's allocation.
struct GuardArgs {
    /// the instance's marker (ARSERVICE_INSTANCE), set after the step's own environment
    #[argh(option)]
    instance: String,
    /// the command's marker (ARSERVICE_EXEC)
    #[argh(option)]
    exec: Option<String>,
    /// seconds the command may run before everything it started is killed
    #[argh(option)]
    timeout: Option<f64>,
    /// when the server started the step (seconds since the epoch): the timeout counts from
    /// there, up to a second earlier than the guard's own start
    #[argh(option)]
    started_at: Option<f64>,
    /// hold the allocation until SIGTERM, then kill what still carries the instance's marker
    #[argh(switch)]
    hold: bool,
    /// with --hold: the file that says the job holds its allocation
    #[argh(option)]
    ready_file: Option<PathBuf>,
    /// the directory the command must run in: when the step is not in it (srun --chdir falls
    /// back to /tmp when it cannot enter it), the command does not run and the guard exits 121
    /// with the line the server maps to its 400
    #[argh(option)]
    cwd: Option<PathBuf>,
    /// write the command's output (at most --max-output-bytes of it: the first and last
    /// halves), its total size and its return code to this file, not to the step's output
    #[argh(option)]
    output: Option<PathBuf>,
    /// with --output: how much of the output to keep
    #[argh(option)]
    max_output_bytes: Option<usize>,
    /// the command's stdin, from this file (else /dev/null)
    #[argh(option)]
    input: Option<PathBuf>,
    /// with --output: also append every byte of the output to this file as it comes (a
    /// streamed command, which the server tails)
    #[argh(option)]
    stream: Option<PathBuf>,
    /// the command and its arguments, after --
    #[argh(positional, greedy)]
    command: Vec<String>,
}

/// `arservice guard ...`: see `crate::guard`.
pub fn guard_main(program: &str, rest: &[&str]) -> ExitCode {
    let args: GuardArgs = match parse_subcommand(program, "guard", rest) {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    if let Some(cwd) = &args.cwd {
        let here = std::env::current_dir().ok();
        let there = std::fs::canonicalize(cwd).ok().filter(|dir| dir.is_dir());
        if there.is_none() || here != there {
            // On the step's output (the command's own goes to --output): the server answers
            // 400 with the words of every other path (`SlurmEnv::exec_step`).
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "{}", crate::env::CWD_REFUSED);
            return ExitCode::from(crate::env::CWD_REFUSED_CODE as u8);
        }
    }
    let outcome = match (args.hold, args.ready_file, args.timeout, args.exec) {
        (true, Some(ready_file), None, None) if args.command.is_empty() => {
            crate::guard::hold(&args.instance, &ready_file)
        }
        (false, None, Some(timeout), Some(exec)) if timeout.is_finite() && timeout >= 0.0 => {
            let started_at = args
                .started_at
                .filter(|at| at.is_finite() && *at >= 0.0)
                .map(|at| std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(at));
            match (args.output, args.max_output_bytes) {
                (Some(path), Some(cap)) => Ok(Some(crate::guard::StepOutput {
                    path,
                    cap,
                    stream: args.stream,
                })),
                (None, None) if args.stream.is_none() => Ok(None),
                _ => Err(
                    "--output and --max-output-bytes go together (and --stream needs them)"
                        .to_string(),
                ),
            }
            .and_then(|output| {
                crate::guard::step(
                    std::time::Duration::from_secs_f64(timeout),
                    started_at,
                    &args.instance,
                    &exec,
                    &args.command,
                    output,
                    args.input.as_deref(),
                )
            })
        }
        _ => Err("use --hold --ready-file F, or --timeout S --exec E -- COMMAND...".into()),
    };
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(why) => {
            eprintln!("arservice guard: {why}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

#[derive(FromArgs)]
/// arservice sweep: removes what the server of a state dir left on this machine (its
/// containers, fork images, apptainer instances, enroot containers, mounts), as that server's
/// own start-up sweep would with nothing to adopt, but no process (the job's end takes those);
/// run by a Slurm job's script after its server died.
struct SweepArgs {
    /// the state dir of the server that ended (refused while a server holds it)
    #[argh(option)]
    state_dir: PathBuf,
}

/// `arservice sweep --state-dir DIR`: the start-up sweep of the server whose id `server_id`
/// gives for `DIR`, adopting nothing and killing no process (a process outside the job that
/// carries the instance's markers is someone else's). A missing `DIR` has nothing to sweep (exit 0); one a
/// server still holds, or that is not arservice's, is refused (exit 2).
pub fn sweep_main(program: &str, rest: &[&str], server_id: fn(&Path) -> String) -> ExitCode {
    let args: SweepArgs = match parse_subcommand(program, "sweep", rest) {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    let _ = simple_logger::SimpleLogger::new()
        .with_level(log::LevelFilter::Info)
        .init();
    if args.state_dir.symlink_metadata().is_err() {
        log::info!(
            "sweep: no state dir {}: nothing to sweep",
            args.state_dir.display()
        );
        return ExitCode::SUCCESS;
    }
    let claimed = match crate::state_dir::StateDir::claim(&args.state_dir) {
        Ok(claimed) => claimed,
        Err(why) => {
            eprintln!("arservice sweep: {why}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let id = server_id(claimed.path());
    log::info!(
        "sweep: what server {id} left (state dir {})",
        claimed.path().display()
    );
    crate::runner_local::sweep_all_but_processes(&id, claimed.path(), &[]);
    ExitCode::SUCCESS
}
