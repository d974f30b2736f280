//! The in-sandbox and in-step subcommands, `arservice agent` and `arservice guard`: their
//! argument parsing, checks and exit codes; the work itself is `agent.rs`'s and `guard.rs`'s.

use argh::FromArgs;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for a command line the subcommand refuses (as the server's own, `main.rs`).
const EXIT_CONFIG: u8 = 2;

#[derive(FromArgs)]
/// arservice agent: runs the commands of one sandbox, inside it (started by the server).
struct AgentArgs {
    /// the unix socket to listen on
    #[argh(option)]
    socket: PathBuf,
}

/// `arservice agent --socket PATH`: the long-lived process inside a sandbox.
pub fn agent_main(program: &str, rest: &[&str]) -> ExitCode {
    let args = match AgentArgs::from_args(&[program, "agent"], rest) {
        Ok(args) => args,
        Err(early) => {
            eprintln!("{}", early.output.trim_end());
            return if early.status.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_CONFIG)
            };
        }
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
    /// the command and its arguments, after --
    #[argh(positional, greedy)]
    command: Vec<String>,
}

/// `arservice guard ...`: see `crate::guard`.
pub fn guard_main(program: &str, rest: &[&str]) -> ExitCode {
    let args = match GuardArgs::from_args(&[program, "guard"], rest) {
        Ok(args) => args,
        Err(early) => {
            eprintln!("{}", early.output.trim_end());
            return if early.status.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_CONFIG)
            };
        }
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
                (Some(path), Some(cap)) => Ok(Some(crate::guard::StepOutput { path, cap })),
                (None, None) => Ok(None),
                _ => Err("--output and --max-output-bytes go together".to_string()),
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
