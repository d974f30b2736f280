//! The one place that runs a command, times it out and kills it.
//!
//! Every environment runs its commands through [`run`]: the child is started with
//! `clone(CLONE_VM|CLONE_VFORK)` ([`super::process`]) in a process group of its own, stdin from `/dev/null`
//! (or a request's stdin, an in-memory file: [`input_file`]),
//! stdout and stderr merged into one pipe (so their order is kept). The calling thread itself
//! empties the pipe into an [`OutputCap`] that never holds more than the cap (and, for a
//! streamed command, passes each read on to its [`OutputSink`] as it comes), and watches the
//! exit (its pidfd) and the deadline in the same `poll`: output that the command wrote before
//! it exited is always read, and no thread is spawned per command. On timeout the command's
//! group and everything else it started get SIGTERM, then SIGKILL after [`TERM_GRACE`]; the
//! answer is returncode 124 with the output so far. A background job that keeps the pipe open
//! does not hold the answer longer than [`PIPE_GRACE`] after the command itself exits.
//!
//! **What a command started** is found by a marker that this helper sets last, after every
//! variable of the user's (`ARSERVICE_SPAWN=<instance tag>.<command number>`), and only among
//! this process's own descendants: the server and the agent are child subreapers, so a
//! `setsid` or double-forked process stays in our tree. Each is signalled through a pidfd
//! after checking it is still the process that was found. No process group or pid number is
//! remembered past the moment its owner was reaped, so a number the kernel gave to someone
//! else since is never signalled.
//!
//! [`ProcessGroups`] is one instance's scope: closing it kills everything any of its commands
//! left behind. Its lock is never held while waiting on a process.

use super::process::{self, Found, Process};
pub use super::stream::OutputSink;
use std::collections::VecDeque;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a timed-out command gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_millis(500);

/// How long to keep reading after the command exited while something it started in the
/// background still holds the output pipe open.
pub const PIPE_GRACE: Duration = Duration::from_millis(100);

/// The return code of a command that ran past its timeout (as coreutils `timeout` says).
pub const TIMEOUT_RETURNCODE: i32 = 124;

/// Size of one read from the output pipe.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// What one command may use.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub timeout: Duration,
    pub max_output_bytes: usize,
}

/// The answer to one command: the fields of `/execute_command`'s `result`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExecResult {
    pub output: String,
    pub returncode: i32,
    pub timed_out: bool,
    pub truncated: bool,
    pub duration_s: f64,
}

/// Runs `command` to completion under `limits`, registering its process group in `groups`.
///
/// Fails only when the program cannot be started at all; a command that fails, is killed or
/// times out is a normal [`ExecResult`].
pub fn run(
    command: Command,
    stdin: Option<&std::fs::File>,
    limits: Limits,
    groups: &ProcessGroups,
    sink: Option<&OutputSink>,
) -> io::Result<ExecResult> {
    run_watched(command, stdin, limits, groups, sink, None)
}

/// A command's stdin holding `bytes`: an anonymous file in memory (`memfd`), never on disk,
/// readable only through the descriptor, read from its start. A file, not a pipe: nothing has
/// to write it while the command runs (so no size deadlocks), and a command that never reads
/// it does not hold anything up.
pub fn input_file(bytes: &[u8]) -> io::Result<std::fs::File> {
    use std::io::{Seek, Write};
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name and flags; the descriptor returned is ours alone.
    let fd = unsafe { libc::memfd_create(c"arservice-stdin".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(file)
}

/// [`input_file`] of a request's `stdin`, when it has one (`None`: `/dev/null`).
pub fn stdin_of(stdin: Option<&str>) -> io::Result<Option<std::fs::File>> {
    stdin.map(|text| input_file(text.as_bytes())).transpose()
}

/// Like [`run`], for a command whose real work runs where our signals do not reach (inside a
/// container, behind `docker exec`): on timeout `kill_inside(signal)` is called with SIGTERM,
/// then SIGKILL, alongside the signals to the local process group.
pub fn run_sandboxed(
    command: Command,
    stdin: Option<&std::fs::File>,
    limits: Limits,
    groups: &ProcessGroups,
    sink: Option<&OutputSink>,
    kill_inside: &dyn Fn(i32),
) -> io::Result<ExecResult> {
    run_watched(command, stdin, limits, groups, sink, Some(kill_inside))
}

/// [`run`] and [`run_sandboxed`]: `kill_inside` reaches what runs where our signals do not;
/// `stdin` replaces `/dev/null`; `sink` gets every read of the output as it comes (a
/// streamed answer), beside the cap.
fn run_watched(
    mut command: Command,
    stdin: Option<&std::fs::File>,
    limits: Limits,
    groups: &ProcessGroups,
    sink: Option<&OutputSink>,
    kill_inside: Option<&dyn Fn(i32)>,
) -> io::Result<ExecResult> {
    use std::os::fd::AsRawFd;
    let started = Instant::now();
    let token = groups.next_token();
    // Last, so that nothing of the user's can replace it.
    command.env(SPAWN_MARKER, &token);
    let (reader, writer) = io::pipe()?;
    let stdio = process::Stdio {
        stdin: stdin.map(|file| file.as_raw_fd()),
        stdout: writer.as_raw_fd(),
        stderr: writer.as_raw_fd(),
    };
    let spawned = Process::spawn(&command, &stdio);
    // Drop our copy of the pipe's write end now, or the reader never sees end-of-file.
    drop(writer);
    drop(command);
    let process = spawned?;
    if groups.is_closed() {
        // Closed while this command started: it goes at once, with what it started.
        process.signal_group(libc::SIGKILL);
    }

    let outcome = Watch {
        process,
        token: &token,
        kill_inside,
        sink,
        deadline: started + limits.timeout,
        phase: Phase::Running,
    }
    .drain(reader, limits.max_output_bytes);
    let (cap, status, timed_out) = outcome?;
    let (output, truncated) = cap.into_output();
    Ok(ExecResult {
        output,
        returncode: if timed_out {
            TIMEOUT_RETURNCODE
        } else {
            returncode(status)
        },
        timed_out,
        truncated,
        duration_s: started.elapsed().as_secs_f64(),
    })
}

/// Like [`run_sandboxed`] for a command whose processes carry the markers
/// `ARSERVICE_INSTANCE=<instance>` and `ARSERVICE_EXEC=<exec_id>` in this machine's process
/// table (bubblewrap, apptainer, enroot): on timeout those are killed by their markers.
/// `stdin` replaces `/dev/null` (enroot's CLI path gives the command its environment there).
pub fn run_marked(
    command: Command,
    stdin: Option<&std::fs::File>,
    limits: Limits,
    groups: &ProcessGroups,
    sink: Option<&OutputSink>,
    instance: &str,
    exec_id: &str,
) -> io::Result<ExecResult> {
    let kill_inside = |signal| {
        signal_marked(
            &[
                Marker::Is(INSTANCE_MARKER, instance),
                Marker::Is(EXEC_MARKER, exec_id),
            ],
            signal,
        );
    };
    run_watched(command, stdin, limits, groups, sink, Some(&kill_inside))
}

/// Starts a long-lived process (a sandbox's keep-alive) in a process group of its own, stdin
/// from `/dev/null`, stdout and stderr appended to `log`. The caller owns the child: it must
/// kill its group (see [`signal_group`]) and wait for it.
pub fn spawn_daemon(
    mut command: Command,
    log: &std::path::Path,
) -> io::Result<std::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    // Registered before the reaper can look: the caller's `Child` reaps it, not the reaper.
    let mut ours = process::hold_registry();
    let child = command.spawn()?;
    process::register_held(&mut ours, child.id() as i32);
    Ok(child)
}

/// True once the daemon in `slot` (from [`spawn_daemon`]) has exited; `false` while it
/// runs or when there is none.
pub fn has_exited(slot: &parking_lot::Mutex<Option<std::process::Child>>) -> bool {
    slot.lock()
        .as_mut()
        .is_some_and(|child| child.try_wait().ok().flatten().is_some())
}

/// The shell's view of an exit status: the code, or 128 + the signal that ended it.
pub fn returncode(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => -1,
    }
}

/// Sends `signal` to every process of group `pgid`; a group that is gone already is fine.
pub fn signal_group(pgid: i32, signal: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: killpg only sends a signal; pgid > 1 never names init or our caller's group 0.
    unsafe { libc::killpg(pgid, signal) == 0 }
}

/// The variable that names the instance a process belongs to (value: the sandbox name).
pub const INSTANCE_MARKER: &str = "ARSERVICE_INSTANCE";

/// The variable that names the command a process belongs to, within its instance.
pub const EXEC_MARKER: &str = "ARSERVICE_EXEC";

/// How a marker variable must match.
#[derive(Clone, Copy, Debug)]
pub enum Marker<'a> {
    /// `NAME=value` exactly.
    Is(&'static str, &'a str),
    /// `NAME=` followed by a value that starts with this prefix.
    StartsWith(&'static str, &'a str),
    /// `NAME` unset, or set to none of these values.
    NoneOf(&'static str, &'a [String]),
}

impl Marker<'_> {
    /// True when `environ` (NUL-separated `NAME=value`s) satisfies this marker.
    fn holds(&self, environ: &[u8]) -> bool {
        let mut variables = environ.split(|&byte| byte == 0);
        match *self {
            Marker::NoneOf(name, values) => !variables.any(|variable| {
                values
                    .iter()
                    .any(|value| Marker::Is(name, value).matches(variable))
            }),
            _ => variables.any(|variable| self.matches(variable)),
        }
    }

    fn matches(&self, variable: &[u8]) -> bool {
        let (name, value, exact) = match *self {
            Marker::Is(name, value) => (name, value, true),
            Marker::StartsWith(name, value) => (name, value, false),
            Marker::NoneOf(..) => return self.holds(variable),
        };
        let Some(rest) = variable
            .strip_prefix(name.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"="))
        else {
            return false;
        };
        if exact {
            rest == value.as_bytes()
        } else {
            rest.starts_with(value.as_bytes())
        }
    }
}

/// Sends `signal` to every process of this machine whose environment matches all `markers`:
/// the way to reach what a command started when it is not in our process group (inside a
/// sandbox that made a session of its own, or after `setsid`). Returns how many it signalled.
pub fn signal_marked(markers: &[Marker], signal: i32) -> usize {
    signal_marked_where(markers, signal, |_| true)
}

/// [`signal_marked`] limited to what can be ours: a process in this server's own tree, or
/// one that init adopted (what an earlier life of the server left when it crashed). A marked
/// process that someone else started and still parents is never touched.
fn signal_marked_ours(markers: &[Marker], signal: i32) -> usize {
    let ours: std::collections::HashSet<i32> = process::descendants()
        .into_iter()
        .map(|(found, _)| found.pid)
        .collect();
    signal_marked_where(markers, signal, |pid| {
        ours.contains(&pid) || process::parent_of(pid) == Some(1)
    })
}

fn signal_marked_where(markers: &[Marker], signal: i32, allowed: impl Fn(i32) -> bool) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut signalled = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        // The start time first: if the process that had this pid ends before its environment
        // is read, the environment read is another's, and the start time no longer matches.
        let Some(start_time) = process::start_time(pid) else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if markers.iter().all(|marker| marker.holds(&environ))
            && allowed(pid)
            && (Found { pid, start_time }).signal(signal)
        {
            signalled += 1;
        }
    }
    signalled
}

/// How long [`kill_marked`] waits for killed processes to be gone.
const MARKED_REAP_WAIT: Duration = Duration::from_secs(5);

/// SIGKILL to every process carrying `marker` that can be ours (see [`signal_marked_ours`]),
/// then waits (bounded) until none is left, so that what they held (mounts, files) can be
/// removed after.
pub fn kill_marked(marker: Marker) {
    // A process whose parent was just killed is moving to its new parent and can be missed by
    // one walk: done only after two walks in a row, 10 ms apart, found nothing.
    let deadline = Instant::now() + MARKED_REAP_WAIT;
    let mut quiet = 0;
    while quiet < 2 && Instant::now() < deadline {
        if signal_marked_ours(&[marker], libc::SIGKILL) == 0 {
            quiet += 1;
        } else {
            quiet = 0;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The variable that ties a process on this machine to the command that started it:
/// `<instance tag>.<command number>`, set by [`run_sandboxed`] after the user's variables.
pub const SPAWN_MARKER: &str = "ARSERVICE_SPAWN";

/// Tells this server's instance tags apart from another server's on the same machine.
static NEXT_SCOPE: AtomicU64 = AtomicU64::new(1);

/// One instance's scope: every command it runs is tagged with its tag, so that closing it
/// finds and kills everything they left behind (in this process's own tree).
pub struct ProcessGroups {
    tag: String,
    next: AtomicU64,
    closed: AtomicBool,
}

impl Default for ProcessGroups {
    fn default() -> ProcessGroups {
        ProcessGroups {
            tag: format!(
                "{}-{}",
                std::process::id(),
                NEXT_SCOPE.fetch_add(1, Ordering::Relaxed)
            ),
            next: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        }
    }
}

impl ProcessGroups {
    /// The marker value of the next command.
    fn next_token(&self) -> String {
        format!("{}.{}", self.tag, self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The live processes any command of this scope started (zombies have no environment, so
    /// they are not counted).
    fn members(&self) -> Vec<Found> {
        let prefix = format!("{SPAWN_MARKER}={}.", self.tag);
        tagged(|value| value.starts_with(prefix.as_bytes()))
    }

    /// Number of live processes that commands of this instance left behind or still run.
    pub fn len(&self) -> usize {
        self.members().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Kills everything this scope's commands started, and every command started from now
    /// on; waits (bounded) until none is left. Idempotent.
    pub fn kill_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if self.next.load(Ordering::SeqCst) == 1 {
            // No command ever started here: nothing to look for (a close then costs no walk
            // of the process tree). One starting now sees `closed` and kills itself.
            return;
        }
        let deadline = Instant::now() + MARKED_REAP_WAIT;
        loop {
            let members = self.members();
            if members.is_empty() || Instant::now() >= deadline {
                return;
            }
            for member in members {
                member.signal(libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Our descendants whose `ARSERVICE_SPAWN=...` variable (the whole `NAME=value`) satisfies
/// `matches`.
fn tagged(matches: impl Fn(&[u8]) -> bool) -> Vec<Found> {
    let name = format!("{SPAWN_MARKER}=");
    process::descendants()
        .into_iter()
        .filter(|(_, environ)| {
            environ
                .split(|&byte| byte == 0)
                .any(|variable| variable.starts_with(name.as_bytes()) && matches(variable))
        })
        .map(|(found, _)| found)
        .collect()
}

/// Sends `signal` to every live process that the command `token` started, wherever it went
/// in our tree. Returns how many.
fn signal_command(token: &str, signal: i32) -> usize {
    let exact = format!("{SPAWN_MARKER}={token}");
    tagged(|variable| variable == exact.as_bytes())
        .into_iter()
        .filter(|found| found.signal(signal))
        .count()
}

/// At most `cap` bytes of a stream: the first half and the last half, and the total seen.
#[derive(Debug)]
pub struct OutputCap {
    cap: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
}

impl OutputCap {
    pub fn new(cap: usize) -> OutputCap {
        OutputCap {
            cap,
            head: Vec::new(),
            tail: VecDeque::new(),
            total: 0,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let head_cap = self.cap / 2;
        let tail_cap = self.cap - head_cap;
        if self.head.len() < head_cap {
            let take = bytes.len().min(head_cap - self.head.len());
            self.head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
        if bytes.len() >= tail_cap {
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - tail_cap..]);
        } else {
            let overflow = (self.tail.len() + bytes.len()).saturating_sub(tail_cap);
            self.tail.drain(..overflow);
            self.tail.extend(bytes);
        }
    }

    /// What was kept, as raw bytes: the head, the tail, and the total seen.
    pub fn into_parts(self) -> (Vec<u8>, Vec<u8>, u64) {
        (self.head, self.tail.into(), self.total)
    }

    /// The cap that kept `head` and `tail` of `total` bytes (as [`OutputCap::into_parts`]
    /// gave them, possibly in another process).
    pub fn from_parts(cap: usize, head: Vec<u8>, tail: Vec<u8>, total: u64) -> OutputCap {
        OutputCap {
            cap,
            head,
            tail: tail.into(),
            total,
        }
    }

    /// The kept text (lossy UTF-8) and whether anything was cut out of the middle.
    pub fn into_output(self) -> (String, bool) {
        let kept = (self.head.len() + self.tail.len()) as u64;
        let truncated = self.total > kept;
        if !truncated {
            // All of it: decoded as one, so that a character across the head's end is whole
            // (as the chunks of a streamed answer carry it).
            let mut all = self.head;
            all.extend(self.tail);
            let output = match String::from_utf8(all) {
                Ok(text) => text,
                Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
            };
            return (output, false);
        }
        let mut output = String::from_utf8_lossy(&self.head).into_owned();
        let omitted = self.total - kept;
        output.push_str(&format!("\n[... {omitted} bytes of output omitted ...]\n"));
        let (front, back) = self.tail.as_slices();
        if back.is_empty() {
            output.push_str(&String::from_utf8_lossy(front));
        } else {
            output.push_str(&String::from_utf8_lossy(&[front, back].concat()));
        }
        (output, true)
    }
}

/// How often, within a timeout's grace, whether what the command started is gone is looked at.
const GRACE_LOOK: Duration = Duration::from_millis(20);

/// How long one wait for a killed command's exit lasts.
const KILLED_WAIT_SLICE: Duration = Duration::from_secs(1);

/// One running command: the loop that empties its output pipe, watches its exit and enforces
/// its timeout, all on the caller's thread. Reading and waiting in one place means that output
/// the command wrote before it exited is always read, however loaded the machine is.
struct Watch<'a> {
    process: Process,
    /// The command's marker value (see [`SPAWN_MARKER`]).
    token: &'a str,
    /// Signals what runs inside a sandbox, where our own signals do not reach.
    kill_inside: Option<&'a dyn Fn(i32)>,
    /// Gets each read of the output as it comes (a streamed answer).
    sink: Option<&'a OutputSink>,
    deadline: Instant,
    phase: Phase,
}

/// Where a command is with respect to its timeout.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Running,
    /// Past the timeout: SIGTERM went out at this moment.
    Terminating(Instant),
    /// SIGKILL went out; only its exit is awaited.
    Killed,
}

impl Watch<'_> {
    /// Reads until end-of-file (or [`PIPE_GRACE`] after the exit, when a background job
    /// keeps the pipe open) and until the command has exited; kills it at its deadline.
    /// The command is reaped last, so its group id stays its own while it is signalled.
    fn drain(
        mut self,
        reader: io::PipeReader,
        max_output_bytes: usize,
    ) -> io::Result<(OutputCap, ExitStatus, bool)> {
        use std::os::fd::AsRawFd;
        let mut cap = OutputCap::new(max_output_bytes);
        let mut reads = Reads::default();
        let mut eof = false;
        let mut exited: Option<Instant> = None;
        // With a pidfd, the wait says when the command exited (no `waitid` per round: two
        // syscalls less per command). Without one (an old kernel), the exit is looked at
        // after each wait (a command just started has not exited).
        let mut look_at_exit = false;
        loop {
            let now = Instant::now();
            if look_at_exit && exited.is_none() && self.process.has_exited() {
                exited = Some(now);
            }
            // After a timeout's SIGTERM the command may have exited while what it started
            // still cleans up: that gets the rest of the grace before the SIGKILL. Not behind
            // a CLI into a sandbox (`docker exec`): what is left there cannot be seen from here,
            // and waiting out the grace blind, between two slow in-sandbox kills, would miss
            // the timeout + 1 s answer.
            let mut in_grace = false;
            if let Some(at) = exited {
                if self.phase != Phase::Running {
                    self.enforce_deadline();
                }
                in_grace = matches!(self.phase, Phase::Terminating(_))
                    && self.kill_inside.is_none()
                    && signal_command(self.token, 0) > 0;
                if !in_grace && (eof || at.elapsed() >= PIPE_GRACE) {
                    let timed_out = self.phase != Phase::Running;
                    if timed_out {
                        // Whatever ignored SIGTERM goes now, before the group's leader is
                        // reaped (its id cannot be another's until then).
                        self.kill(libc::SIGKILL);
                    }
                    let status = self.process.wait()?;
                    return Ok((cap, status, timed_out));
                }
            } else {
                self.enforce_deadline();
            }
            let left = |until: Instant| until.saturating_duration_since(Instant::now());
            let wait = match exited {
                Some(_) if in_grace => left(self.next_deadline()).min(GRACE_LOOK),
                Some(at) => left(at + PIPE_GRACE),
                None => left(self.next_deadline()),
            };
            let pipe = (!eof).then(|| reader.as_raw_fd());
            let exit = exited.is_none().then(|| self.process.pidfd()).flatten();
            let ready = wait_for(pipe, exit, wait);
            if ready.exit && exited.is_none() {
                exited = Some(Instant::now());
            }
            look_at_exit = exit.is_none();
            if ready.pipe {
                match reads.next(&reader) {
                    Ok([]) => eof = true,
                    Ok(chunk) => {
                        cap.push(chunk);
                        if let Some(sink) = self.sink {
                            sink.send(chunk);
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => eof = true,
                }
            }
            if exited.is_none() && exit.is_none() && eof {
                // No pidfd (an old kernel): nothing left to read, look at the exit often.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// The next moment something must happen: the timeout, then the end of the grace
    /// between SIGTERM and SIGKILL, then nothing (a killed command is only waited for).
    fn next_deadline(&self) -> Instant {
        match self.phase {
            Phase::Running => self.deadline,
            Phase::Terminating(at) => at + TERM_GRACE,
            Phase::Killed => Instant::now() + KILLED_WAIT_SLICE,
        }
    }

    /// `signal` to the command's group, to everything else it started, and inside the sandbox.
    fn kill(&self, signal: i32) {
        if let Some(kill_inside) = self.kill_inside {
            kill_inside(signal);
        }
        self.process.signal_group(signal);
        signal_command(self.token, signal);
    }

    /// SIGTERM at the timeout, SIGKILL after the grace.
    fn enforce_deadline(&mut self) {
        let now = Instant::now();
        match self.phase {
            Phase::Running if now >= self.deadline => {
                self.phase = Phase::Terminating(now);
                self.kill(libc::SIGTERM);
            }
            Phase::Terminating(at) if now >= at + TERM_GRACE => {
                self.phase = Phase::Killed;
                self.kill(libc::SIGKILL);
            }
            _ => {}
        }
    }
}

/// Where a command's output is read: a small buffer on the stack until one read fills it,
/// then [`READ_CHUNK_BYTES`] on the heap. Most commands print little, and take no 64 KiB
/// allocation (its `malloc` consolidated the allocator's free lists each time, in profiles of
/// `true`); a large output is read in pipe-sized pieces.
struct Reads {
    small: [u8; SMALL_READ_BYTES],
    /// Empty (no allocation) until a read filled `small`.
    large: Vec<u8>,
}

/// The stack buffer of [`Reads`].
const SMALL_READ_BYTES: usize = 4096;

impl Default for Reads {
    fn default() -> Reads {
        Reads {
            small: [0; SMALL_READ_BYTES],
            large: Vec::new(),
        }
    }
}

impl Reads {
    /// One `read` from `reader`: what it gave (empty at end-of-file).
    fn next(&mut self, reader: &io::PipeReader) -> io::Result<&[u8]> {
        if self.large.capacity() > 0 {
            let read = read_into_spare(reader, &mut self.large)?;
            return Ok(&self.large[..read]);
        }
        let read = io::Read::read(&mut &*reader, &mut self.small)?;
        if read == self.small.len() {
            // Not zeroed: the kernel writes what is read.
            self.large = Vec::with_capacity(READ_CHUNK_BYTES);
        }
        Ok(&self.small[..read])
    }
}

/// One `read` from `reader` into `buffer`'s capacity; the buffer's length becomes what was
/// read.
fn read_into_spare(reader: &io::PipeReader, buffer: &mut Vec<u8>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    buffer.clear();
    // SAFETY: read writes at most `capacity` bytes into the buffer's own allocation; the
    // length is set to what the kernel reported written, never more than the capacity.
    unsafe {
        let read = libc::read(
            reader.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.capacity(),
        );
        if read < 0 {
            return Err(io::Error::last_os_error());
        }
        buffer.set_len(read as usize);
        Ok(read as usize)
    }
}

/// Which of the two descriptors became ready.
struct Ready {
    pipe: bool,
    /// The pidfd: the process has exited.
    exit: bool,
}

/// Waits up to `wait` until the output `pipe` has data (or end-of-file) or the process behind
/// `exit` (a pidfd) has exited.
fn wait_for(pipe: Option<i32>, exit: Option<i32>, wait: Duration) -> Ready {
    let mut fds: Vec<libc::pollfd> = [pipe, exit]
        .into_iter()
        .flatten()
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let millis = wait.as_millis().min(i32::MAX as u128) as i32;
    if fds.is_empty() {
        std::thread::sleep(Duration::from_millis(millis as u64));
        return Ready {
            pipe: false,
            exit: false,
        };
    }
    // SAFETY: a valid array of pollfds for fds we own, for the duration of the call.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
    let readable = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
    let exit_at = usize::from(pipe.is_some());
    Ready {
        pipe: ready > 0 && pipe.is_some() && fds[0].revents & readable != 0,
        exit: ready > 0 && exit.is_some() && fds[exit_at].revents & readable != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        command
    }

    fn limits(timeout_s: f64, cap: usize) -> Limits {
        Limits {
            timeout: Duration::from_secs_f64(timeout_s),
            max_output_bytes: cap,
        }
    }

    fn pid_alive(pid: i32) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    #[test]
    fn output_and_returncode() {
        let groups = ProcessGroups::default();
        let result = run(
            sh("echo out; echo err >&2; exit 3"),
            None,
            limits(5.0, 1024),
            &groups,
            None,
        )
        .unwrap();
        assert_eq!(result.output, "out\nerr\n");
        assert_eq!(result.returncode, 3);
        assert!(!result.timed_out && !result.truncated);
    }

    #[test]
    fn signal_deaths_read_as_128_plus_the_signal() {
        let groups = ProcessGroups::default();
        let result = run(sh("kill -9 $$"), None, limits(5.0, 1024), &groups, None).unwrap();
        assert_eq!(result.returncode, 137);
    }

    #[test]
    fn timeout_kills_the_whole_group_and_keeps_partial_output() {
        let groups = ProcessGroups::default();
        let started = Instant::now();
        let result = run(
            sh("sleep 300 & echo child=$!; trap '' TERM; echo before; sleep 300"),
            None,
            limits(0.5, 1024),
            &groups,
            None,
        )
        .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(result.timed_out);
        assert_eq!(result.returncode, TIMEOUT_RETURNCODE);
        assert!(result.output.contains("before"), "{}", result.output);
        let child: i32 = result.output.lines().next().unwrap()["child=".len()..]
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(child) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !pid_alive(child),
            "background child {child} survived the timeout"
        );
    }

    #[test]
    fn a_redirected_background_job_does_not_hold_the_answer() {
        // As in the server: orphans come back to this process (never reaped here: no reaper
        // thread in tests, whose std children it would take).
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER and an integer flag.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let groups = ProcessGroups::default();
        let started = Instant::now();
        let result = run(
            sh("sleep 100 >/dev/null 2>&1 & echo started"),
            None,
            limits(30.0, 1024),
            &groups,
            None,
        )
        .unwrap();
        assert_eq!(result.output, "started\n");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(groups.len(), 1, "the background job is found in our tree");
        groups.kill_all();
        assert!(groups.is_empty());
    }

    #[test]
    fn a_background_job_holding_the_pipe_is_cut_off_after_the_grace() {
        let groups = ProcessGroups::default();
        let started = Instant::now();
        let result = run(
            sh("sleep 100 & echo started"),
            None,
            limits(30.0, 1024),
            &groups,
            None,
        )
        .unwrap();
        assert_eq!(result.output, "started\n");
        assert!(started.elapsed() < Duration::from_secs(2));
        groups.kill_all();
    }

    #[test]
    fn cap_keeps_head_and_tail() {
        let mut cap = OutputCap::new(10);
        for chunk in [&b"0123"[..], b"456789abc", b"defghij"] {
            cap.push(chunk);
        }
        let (output, truncated) = cap.into_output();
        assert!(truncated);
        assert!(output.starts_with("01234"), "{output}");
        assert!(output.ends_with("fghij"), "{output}");
        assert!(output.contains("10 bytes of output omitted"), "{output}");
    }

    #[test]
    fn cap_exactly_full_is_not_truncated() {
        let mut cap = OutputCap::new(6);
        cap.push(b"abc");
        cap.push(b"def");
        assert_eq!(cap.into_output(), ("abcdef".to_string(), false));
    }

    #[test]
    fn big_output_is_capped_and_invalid_utf8_replaced() {
        let groups = ProcessGroups::default();
        let result = run(
            sh("printf '\\377start'; head -c 5000000 /dev/zero | tr '\\0' x; echo end"),
            None,
            limits(30.0, 1000),
            &groups,
            None,
        )
        .unwrap();
        assert!(result.truncated);
        assert!(
            result.output.starts_with("\u{FFFD}start"),
            "{}",
            &result.output[..20]
        );
        assert!(result.output.ends_with("xend\n"));
        assert!(result.output.len() < 1100);
    }

    #[test]
    fn stdin_is_the_input_file_or_dev_null() {
        let groups = ProcessGroups::default();
        // Larger than a pipe's buffer, with every byte value a JSON string can carry.
        let text: String = (0..200_000u32)
            .map(|i| char::from_u32(i % 0x80).unwrap())
            .collect();
        let input = input_file(text.as_bytes()).unwrap();
        let result = run(sh("cat"), Some(&input), limits(5.0, 1 << 20), &groups, None).unwrap();
        assert_eq!(result.output, text);
        // A command that ignores its stdin ends as it would without one.
        let input = input_file(text.as_bytes()).unwrap();
        let result = run(
            sh("echo done"),
            Some(&input),
            limits(5.0, 1024),
            &groups,
            None,
        )
        .unwrap();
        assert_eq!(result.output, "done\n");
        let result = run(sh("wc -c"), None, limits(5.0, 1024), &groups, None).unwrap();
        assert_eq!(result.output.trim(), "0");
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let groups = ProcessGroups::default();
        let err = run(
            Command::new("/nonexistent/program"),
            None,
            limits(1.0, 10),
            &groups,
            None,
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(groups.is_empty());
    }

    #[test]
    fn marked_processes_are_found_by_their_environment() {
        let marker = format!("test-{}", std::process::id());
        let mut child = Command::new("sh")
            .args(["-c", "setsid sleep 60 & wait"])
            .env(INSTANCE_MARKER, &marker)
            .env(EXEC_MARKER, "7")
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut found = 0;
        while found < 2 && Instant::now() < deadline {
            found = signal_marked(
                &[
                    Marker::Is(INSTANCE_MARKER, &marker),
                    Marker::Is(EXEC_MARKER, "7"),
                ],
                0,
            );
        }
        assert_eq!(found, 2, "the shell and its setsid child");
        assert_eq!(
            signal_marked(
                &[
                    Marker::Is(INSTANCE_MARKER, &marker),
                    Marker::Is(EXEC_MARKER, "8")
                ],
                0
            ),
            0
        );
        assert!(signal_marked(&[Marker::StartsWith(INSTANCE_MARKER, "test-")], 0) >= 2);
        signal_marked(&[Marker::Is(INSTANCE_MARKER, &marker)], libc::SIGKILL);
        child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while signal_marked(&[Marker::Is(INSTANCE_MARKER, &marker)], 0) > 0 {
            assert!(
                Instant::now() < deadline,
                "marked processes survived SIGKILL"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn registering_after_kill_all_kills_at_once() {
        let groups = ProcessGroups::default();
        groups.kill_all();
        let started = Instant::now();
        let result = run(sh("sleep 30"), None, limits(30.0, 10), &groups, None).unwrap();
        assert_eq!(result.returncode, 137);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
