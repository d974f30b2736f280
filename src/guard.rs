//! `arservice guard`: what runs a Slurm CLI-path step on its node, and what holds that job.
//!
//! Slurm's `proctrack/linuxproc` finds a step's processes by their parent links. A process
//! whose parent exited (a background job, a double fork, `setsid`) is handed to init and lost
//! to Slurm: it outlives its step and job, keeps the step's output open, and slurmd drains the
//! node when the step cannot end ("Kill task failed"). The **step guard** closes that hole from
//! inside the allocation: it makes itself a child subreaper, so that everything its command
//! starts stays below it (and in Slurm's view); it runs the command with the instance's markers
//! set after the user's environment (they cannot be overridden), its stdin `/dev/null` or the
//! file `--input` names (a request's `stdin`, written by the server); it passes the command's
//! output on through a pipe of its own, so that a process which outlives a guard killed by
//! force cannot hold the step open (with `--output`, it keeps at most the cap of that output
//! and writes it to a file on the shared file system instead: see [`StepOutput`]; with
//! `--stream` it also appends every byte to a stream file the server tails); it enforces the
//! command's timeout itself; and it never
//! exits while anything of the command is left. When the command
//! exits (after [`LINGER`] for what it left in the background), times out, or the step is
//! cancelled (SIGTERM), every process below the guard gets SIGTERM, then SIGKILL after
//! [`TERM_GRACE`], well within Slurm's `KillWait`; the guard reaps them all, then exits with
//! the command's code (124 after its timeout). Nothing outlives the step.
//!
//! The **hold guard** is the job's batch step on the CLI path: it holds the allocation, says
//! that it runs in a ready file, and when the job ends (SIGTERM) kills whatever still carries
//! the instance's marker under this user id on the node: what escaped a step guard that was
//! killed by force.
//!
//! Owns the guard's loop and its signals. Processes are started, found and signalled through
//! `crate::env::process` (`clone(CLONE_VM|CLONE_VFORK)`; the guard's own tree; a pidfd bound and the start time
//! checked before each signal), never through a bare number remembered from an earlier scan.
//! Its signals are blocked and read from a signalfd, no handler runs, and it reaps every child
//! itself (no reaper thread). The hold guard has one thread besides, which only accepts and
//! closes the login server's probe connections ([`probe_listener`]).

use crate::env::process::{self, Found, Process};
use crate::env::spawn::{OutputCap, EXEC_MARKER, INSTANCE_MARKER, PIPE_GRACE, TERM_GRACE};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long what a command left in the background may still run after the command exited
/// (what it prints then is still part of the answer, as on every other path).
pub const LINGER: Duration = PIPE_GRACE;

/// The return code of a command that ran past its timeout.
pub const TIMEOUT_RETURNCODE: u8 = 124;

/// The return code when the command cannot be started (as a shell says it).
const NOT_STARTED_RETURNCODE: u8 = 127;

/// The most of its timeout a step guard counts as already spent before it started (the time
/// `srun` took to launch the step, by the wall clocks of the server and the node, which Slurm
/// requires to be synchronized). A clock that is off by more cannot shorten a command's time
/// by more than this.
pub const MAX_LAUNCH_CREDIT: Duration = Duration::from_secs(1);

/// How often the guard looks again while killed processes are going away.
const KILL_POLL: Duration = Duration::from_millis(10);

/// How long the hold guard keeps killing marked processes at the job's end.
const SWEEP_LIMIT: Duration = Duration::from_secs(2);

/// The signals that end a step or a job: Slurm's cancel sends SIGTERM (after SIGCONT).
const STOP_SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Why the command is being ended.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ending {
    /// It exited; what it left behind is ended.
    Finished,
    TimedOut,
    /// The step (or job) was cancelled.
    Stopped,
}

/// Where the step guard is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Running,
    /// The command exited at this moment; its background jobs get [`LINGER`].
    Lingering(Instant),
    /// SIGTERM went to everything below the guard at this moment.
    Terminating(Instant),
    /// SIGKILL went out; it goes out again until nothing is left.
    Killing,
}

/// Runs `command` as the step guard (see the module doc) and returns the exit code to leave
/// with: the command's, 124 after `timeout`, 128 + the signal that killed it. `timeout` counts
/// from `started_at` (when the server started `srun`), when that is given and at most
/// [`MAX_LAUNCH_CREDIT`] ago; else from now.
pub fn step(
    timeout: Duration,
    started_at: Option<std::time::SystemTime>,
    instance: &str,
    exec: &str,
    command: &[String],
    output: Option<StepOutput>,
    input: Option<&Path>,
) -> Result<u8, String> {
    let Some((program, args)) = command.split_first() else {
        return Err("no command to run".into());
    };
    let stdin = input
        .map(std::fs::File::open)
        .transpose()
        .map_err(|err| format!("cannot open the command's stdin: {err}"))?;
    become_subreaper()?;
    let signals = SignalSet::block(&[
        libc::SIGCHLD,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
    ])?;
    let started = Instant::now();
    // The command writes into a pipe that only the guard passes on to the step's output: a
    // process that outlives the guard (one that killed it) cannot keep the step open.
    let (reader, writer) = io::pipe().map_err(|err| format!("cannot make a pipe: {err}"))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env(INSTANCE_MARKER, instance)
        .env(EXEC_MARKER, exec);
    // clone(CLONE_VM|CLONE_VFORK), in a process group of its own, every signal at its default and none blocked
    // (ours are blocked), stdin from `input` or /dev/null.
    let child = Process::spawn(
        &command,
        &process::Stdio {
            stdin: stdin.as_ref().map(|file| file.as_raw_fd()),
            stdout: writer.as_raw_fd(),
            stderr: writer.as_raw_fd(),
        },
    );
    // Our write end goes now, or the pipe's end would never be seen.
    drop(writer);
    let stream = output
        .as_ref()
        .and_then(|output| output.stream.as_deref())
        .map(open_stream)
        .transpose()?;
    let mut relay = Relay::new(reader, output.as_ref().map(|output| output.cap), stream);
    // The guard reaps every child itself (`reap`): the handle only names the command.
    let main = match child {
        Ok(child) => child.id(),
        Err(err) => {
            relay.say(format!("arservice guard: cannot run {program}: {err}\n").as_bytes());
            return Ok(relay.finish(output.as_ref(), NOT_STARTED_RETURNCODE));
        }
    };
    let launch = started_at
        .and_then(|at| at.elapsed().ok())
        .unwrap_or_default()
        .min(MAX_LAUNCH_CREDIT);
    let deadline = started + timeout.saturating_sub(launch);
    let (ending, main_status) = supervise(main, &mut relay, &signals, deadline);
    let code = match ending {
        Ending::TimedOut => TIMEOUT_RETURNCODE,
        Ending::Finished | Ending::Stopped => main_status.unwrap_or(u8::MAX),
    };
    Ok(relay.finish(output.as_ref(), code))
}

/// Runs the guard's loop until the command and everything it started are gone: passes the
/// output on, ends it all at `deadline`, after the command's [`LINGER`], or when the step is
/// cancelled (SIGTERM, then SIGKILL after [`TERM_GRACE`]). Why it ended, and the command's own
/// exit code once it exited.
fn supervise(
    main: i32,
    relay: &mut Relay,
    signals: &SignalSet,
    deadline: Instant,
) -> (Ending, Option<u8>) {
    let root = std::process::id() as i32;
    let mut main_status: Option<u8> = None;
    let mut phase = Phase::Running;
    let mut ending = Ending::Finished;
    loop {
        if reap(main, &mut main_status) {
            // Nothing is left that could write: what is still in the pipe is the end.
            while !relay.eof && relay.readable(Duration::ZERO) {
                relay.pump();
            }
            break;
        }
        let now = Instant::now();
        let why = match phase {
            Phase::Running if main_status.is_some() => {
                phase = Phase::Lingering(now);
                None
            }
            Phase::Running if now >= deadline => Some(Ending::TimedOut),
            Phase::Lingering(at) if now >= at + LINGER => Some(Ending::Finished),
            Phase::Terminating(at) if now >= at + TERM_GRACE => {
                phase = Phase::Killing;
                signal_below(root, libc::SIGKILL);
                None
            }
            Phase::Killing => {
                signal_below(root, libc::SIGKILL);
                None
            }
            _ => None,
        };
        if let Some(why) = why {
            ending = why;
            phase = terminate(root);
        }
        let wake = match phase {
            Phase::Running => deadline,
            Phase::Lingering(at) => at + LINGER,
            Phase::Terminating(at) => at + TERM_GRACE,
            Phase::Killing => now + KILL_POLL,
        };
        let (output, arrived) =
            signals.wait_with(relay, wake.saturating_duration_since(Instant::now()));
        if output {
            relay.pump();
        }
        if arrived.iter().any(|signal| STOP_SIGNALS.contains(signal))
            && matches!(phase, Phase::Running | Phase::Lingering(_))
        {
            ending = Ending::Stopped;
            phase = terminate(root);
        }
    }
    (ending, main_status)
}

/// Where a step guard leaves its command's output, instead of on the step's own output.
///
/// Slurm's step I/O loses output under load: `srun` reports `_server_read: fd N got error or
/// unexpected eof reading message body` and aborts the step part way through a large output
/// (seen at 126 KB to 1 MB of 1 MiB outputs, about 1 step in 30 on a loaded node, without
/// arservice in the way). With an output file, nothing but the guard's own early refusals goes
/// through `srun`: the guard keeps the first and last halves of `cap` bytes (as the server's
/// own cap does on every other path) and writes them, with the total and the return code, to
/// `path` (through a temporary name and a rename: the file is whole or absent).
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    pub path: PathBuf,
    pub cap: usize,
    /// A streamed command: every byte of the output is also appended to this file as it is
    /// read (the server tails it, frees what it read and removes it at the end).
    pub stream: Option<PathBuf>,
}

/// The first line of a step's output file: what follows is `head` bytes, then the tail.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepOutputHeader {
    pub total: u64,
    pub head: usize,
    pub returncode: u8,
}

impl StepOutput {
    /// Writes `kept` (the command's capped output) and `returncode` to the file.
    fn write(&self, kept: OutputCap, returncode: u8) -> io::Result<()> {
        use std::io::Write;
        let (head, tail, total) = kept.into_parts();
        let header = StepOutputHeader {
            total,
            head: head.len(),
            returncode,
        };
        let mut name = self.path.clone().into_os_string();
        name.push(".part");
        let partial = PathBuf::from(name);
        let mut file = std::fs::File::create(&partial)?;
        let mut line = serde_json::to_vec(&header).map_err(io::Error::other)?;
        line.push(b'\n');
        file.write_all(&line)?;
        file.write_all(&head)?;
        file.write_all(&tail)?;
        file.sync_all()?;
        std::fs::rename(&partial, &self.path)
    }

    /// Reads a file a guard wrote: the output as every path answers it (lossy UTF-8, the
    /// omitted middle marked), whether it was truncated, and the return code. Reads at most
    /// `cap` bytes past the header, whatever the file holds.
    pub fn read(path: &Path, cap: usize) -> io::Result<(String, bool, u8)> {
        use std::io::{BufRead, Read};
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
        let mut file = io::BufReader::new(std::fs::File::open(path)?);
        let mut line = Vec::new();
        (&mut file).take(4096).read_until(b'\n', &mut line)?;
        let header: StepOutputHeader =
            serde_json::from_slice(&line).map_err(|_| bad("a bad header"))?;
        let mut kept = Vec::new();
        file.take(cap as u64 + 1).read_to_end(&mut kept)?;
        if header.head > kept.len() || kept.len() > cap || header.total < kept.len() as u64 {
            return Err(bad("sizes that do not match its header"));
        }
        let tail = kept.split_off(header.head);
        let (output, truncated) =
            OutputCap::from_parts(cap, kept, tail, header.total).into_output();
        Ok((output, truncated, header.returncode))
    }
}

/// SIGTERM (and SIGCONT, for a stopped one) to everything below `root`: the start of the end.
fn terminate(root: i32) -> Phase {
    let phase = Phase::Terminating(Instant::now());
    signal_below(root, libc::SIGTERM);
    signal_below(root, libc::SIGCONT);
    phase
}

/// Holds the job until it ends (see the module doc): writes `{"pid": N, "hold": true, "host":
/// H, "port": P}` to `ready_file` (P: [`probe_listener`]), waits for SIGTERM, then kills what still carries `instance`'s marker.
pub fn hold(instance: &str, ready_file: &Path) -> Result<u8, String> {
    let signals = SignalSet::block(&[
        libc::SIGCHLD,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
    ])?;
    let port = probe_listener()?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let ready = serde_json::json!({"pid": std::process::id(), "hold": true,
                                   "host": host.trim(), "port": port})
    .to_string();
    let partial = ready_file.with_extension("partial");
    std::fs::write(&partial, ready)
        .and_then(|()| std::fs::rename(&partial, ready_file))
        .map_err(|err| format!("cannot write {}: {err}", ready_file.display()))?;
    loop {
        let (_, arrived) = signals.wait_with(&Relay::none(), Duration::from_secs(3600));
        if arrived.iter().any(|signal| STOP_SIGNALS.contains(signal)) {
            break;
        }
        reap(0, &mut None);
    }
    let until = Instant::now() + SWEEP_LIMIT;
    while sweep(instance) > 0 && Instant::now() < until {
        std::thread::sleep(KILL_POLL);
    }
    Ok(0)
}

/// The hold guard's probe: a TCP port on every address of the node that accepts and closes
/// each connection, so that the login node's server can tell a node that stopped answering
/// long before Slurm declares it down (the job's server plays this part on the agent path).
/// Its thread reads nothing and sends nothing; it was started with the stop signals already
/// blocked, so they still reach the guard's own loop.
fn probe_listener() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", 0))
        .map_err(|err| format!("cannot listen for the login server's probes: {err}"))?;
    let port = listener
        .local_addr()
        .map_err(|err| format!("cannot read the probe's port: {err}"))?
        .port();
    std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || {
            for connection in listener.incoming() {
                drop(connection);
            }
        })
        .map_err(|err| format!("cannot start the probe thread: {err}"))?;
    Ok(port)
}

/// SIGKILL to every process of this user id (but this one) whose environment carries
/// `ARSERVICE_INSTANCE=<instance>`; how many it found.
pub fn sweep(instance: &str) -> usize {
    use std::os::unix::fs::MetadataExt;
    let own = std::process::id() as i32;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let marker = format!("{INSTANCE_MARKER}={instance}");
    let mut found = 0;
    for pid in all_pids().into_iter().filter(|&pid| pid > 1 && pid != own) {
        // The start time first: if the process that had this pid ends before its owner and
        // environment are read, those are another's, and the start time no longer matches.
        let Some(start_time) = process::start_time(pid) else {
            continue;
        };
        let ours = std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|meta| meta.uid() == uid);
        let carries = |pid: i32| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|&byte| byte == 0)
                    .any(|variable| variable == marker.as_bytes())
            })
        };
        // Only what the job can have left: a process that init or Slurm adopted, or one whose
        // parent is marked too. A marked process that someone else started and still parents
        // is not the job's.
        let adoptable = |pid: i32| match process::parent_of(pid) {
            Some(1) => true,
            Some(parent) => {
                carries(parent)
                    || std::fs::read_to_string(format!("/proc/{parent}/comm"))
                        .is_ok_and(|comm| comm.trim() == "slurmstepd")
            }
            None => false,
        };
        let marked = ours && carries(pid) && adoptable(pid);
        if marked {
            found += 1;
            (Found { pid, start_time }).signal(libc::SIGKILL);
        }
    }
    found
}

/// Makes this process the one that orphans below it are handed to (instead of init).
fn become_subreaper() -> Result<(), String> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag of this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "cannot become a child subreaper: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Reaps every child that has exited (orphans handed to us included), noting the command's
/// code; true once no child at all is left.
fn reap(main: i32, main_status: &mut Option<u8>) -> bool {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer to a local; -1 reaps any child, WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            0 => return false,
            pid if pid > 0 => {
                if pid == main {
                    *main_status = Some(returncode(status));
                }
            }
            _ if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {}
            _ => return true,
        }
    }
}

/// The shell's view of a wait status: the code, or 128 + the signal that ended it.
fn returncode(status: i32) -> u8 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status) as u8
    } else {
        (128 + libc::WTERMSIG(status)).min(255) as u8
    }
}

/// Every pid in `/proc`.
fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `signal` to every process below `root` (parents before their children, so that a shell
/// killed with its job is gone before it could report the job's death into the output), each
/// through a pidfd once it is checked to be still the process that was found.
fn signal_below(root: i32, signal: i32) -> usize {
    process::descendants_of(root)
        .into_iter()
        .filter(|(found, _)| found.signal(signal))
        .count()
}

/// The command's output on its way to the step's: read from the pipe, written to stdout, or
/// kept (capped) for the output file.
struct Relay {
    reader: Option<io::PipeReader>,
    eof: bool,
    chunk: Vec<u8>,
    kept: Option<OutputCap>,
    /// A streamed command's stream file ([`StepOutput::stream`]); `None` once a write failed.
    stream: Option<std::fs::File>,
}

/// Opens a stream file for appending (created, private to the user).
fn open_stream(path: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| format!("cannot open the stream file {}: {err}", path.display()))
}

/// Size of one read from the command's output.
const RELAY_CHUNK_BYTES: usize = 64 * 1024;

impl Relay {
    /// With `cap`, the output is kept for the output file; without, it goes on to stdout.
    /// With `stream`, every byte is also appended to that file.
    fn new(reader: io::PipeReader, cap: Option<usize>, stream: Option<std::fs::File>) -> Relay {
        Relay {
            reader: Some(reader),
            eof: false,
            chunk: vec![0; RELAY_CHUNK_BYTES],
            kept: cap.map(OutputCap::new),
            stream,
        }
    }

    /// No output to pass on (the hold guard).
    fn none() -> Relay {
        Relay {
            reader: None,
            eof: true,
            chunk: Vec::new(),
            kept: None,
            stream: None,
        }
    }

    /// Passes `bytes` on: kept, or written to stdout (a step whose output is gone only loses
    /// it).
    fn say(&mut self, bytes: &[u8]) {
        use std::io::Write;
        if let Some(stream) = &mut self.stream {
            if let Err(err) = stream.write_all(bytes) {
                eprintln!("arservice guard: the stream file: {err}");
                self.stream = None;
            }
        }
        match &mut self.kept {
            Some(kept) => kept.push(bytes),
            None => {
                let mut out = io::stdout().lock();
                let _ = out.write_all(bytes).and_then(|()| out.flush());
            }
        }
    }

    /// The end: writes what was kept to `output` (a guard that cannot say so on stderr, where
    /// `srun` carries it), and returns `returncode`.
    fn finish(&mut self, output: Option<&StepOutput>, returncode: u8) -> u8 {
        if let (Some(output), Some(kept)) = (output, self.kept.take()) {
            if let Err(err) = output.write(kept, returncode) {
                eprintln!(
                    "arservice guard: cannot write the output to {}: {err}",
                    output.path.display()
                );
            }
        }
        returncode
    }

    /// The pipe to poll, while it is open.
    fn fd(&self) -> Option<i32> {
        use std::os::fd::AsRawFd;
        self.reader
            .as_ref()
            .filter(|_| !self.eof)
            .map(|reader| reader.as_raw_fd())
    }

    /// True when one read would not block (data, or the end) within `wait`.
    fn readable(&self, wait: Duration) -> bool {
        let Some(fd) = self.fd() else { return false };
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for an fd we own, for the duration of the call.
        unsafe { libc::poll(&mut pollfd, 1, millis(wait)) > 0 }
    }

    /// One read, passed on.
    fn pump(&mut self) {
        use std::io::Read;
        let Some(reader) = self.reader.as_mut() else {
            return;
        };
        match reader.read(&mut self.chunk) {
            Ok(0) => self.eof = true,
            Ok(n) => {
                let chunk = std::mem::take(&mut self.chunk);
                self.say(&chunk[..n]);
                self.chunk = chunk;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.eof = true,
        }
    }
}

/// `wait` in whole milliseconds for poll, rounded up (a wait never ends early).
fn millis(wait: Duration) -> i32 {
    wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
}

/// Signals blocked for this (single-threaded) process and read from a signalfd, so that one
/// `poll` waits for them and for the command's output together.
struct SignalSet {
    fd: std::os::fd::OwnedFd,
}

impl SignalSet {
    fn block(signals: &[i32]) -> Result<SignalSet, String> {
        use std::os::fd::FromRawFd;
        // SAFETY: sigemptyset/sigaddset fill a local set; sigprocmask only changes our mask;
        // signalfd returns a new descriptor (owned below) or -1.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &signal in signals {
                libc::sigaddset(&mut set, signal);
            }
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(format!(
                    "cannot block signals: {}",
                    io::Error::last_os_error()
                ));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(format!(
                    "cannot read signals: {}",
                    io::Error::last_os_error()
                ));
            }
            Ok(SignalSet {
                fd: std::os::fd::OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// Waits up to `wait` for output on `relay` or for signals: whether output is there, and
    /// the signals that arrived.
    fn wait_with(&self, relay: &Relay, wait: Duration) -> (bool, Vec<i32>) {
        use std::os::fd::AsRawFd;
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: relay.fd().unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds (a negative fd is ignored by poll) for the call's duration.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, millis(wait)) };
        if ready <= 0 {
            return (false, Vec::new());
        }
        (fds[1].revents != 0, self.take())
    }

    /// The signals pending on the signalfd (it is non-blocking: none left ends the loop).
    fn take(&self) -> Vec<i32> {
        use std::os::fd::AsRawFd;
        let mut arrived = Vec::new();
        loop {
            // SAFETY: signalfd_siginfo is plain data; zeroed is a valid value.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reads at most `size` bytes into `info`, which is `size` bytes long.
            let read = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if read != size as isize {
                return arrived;
            }
            arrived.push(info.ssi_signo as i32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_as_the_shell_reads_them() {
        assert_eq!(returncode(3 << 8), 3);
        assert_eq!(returncode(libc::SIGKILL), 137);
    }

    #[test]
    fn an_output_file_carries_what_the_servers_own_cap_would_have_answered() {
        let dir = std::env::temp_dir().join(format!("ars-guard-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("step.out");
        let output = StepOutput {
            path: path.clone(),
            cap: 8,
            stream: None,
        };
        for (bytes, code) in [
            (&b""[..], 0u8),
            (&b"abc\xff"[..], 3),
            (&b"12345678"[..], 0),
            (&b"0123456789abcdef"[..], 124),
        ] {
            let mut kept = OutputCap::new(8);
            kept.push(bytes);
            output.write(kept, code).unwrap();
            let mut expected = OutputCap::new(8);
            expected.push(bytes);
            let (text, truncated) = expected.into_output();
            assert_eq!(StepOutput::read(&path, 8).unwrap(), (text, truncated, code));
        }
        assert!(!dir.join("step.out.part").exists());
        // A file that claims more than the cap, or has no header, is refused.
        std::fs::write(
            &path,
            b"{\"total\":20,\"head\":4,\"returncode\":0}\n0123456789ab",
        )
        .unwrap();
        assert!(StepOutput::read(&path, 8).is_err());
        std::fs::write(&path, b"hello").unwrap();
        assert!(StepOutput::read(&path, 8).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
