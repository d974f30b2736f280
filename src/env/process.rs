//! Processes as the kernel names them: the primitives under the spawn helper ([`super::spawn`]).
//!
//! Owns four things, and nothing above them:
//! - **Starting** a [`Command`] with `clone(CLONE_VM|CLONE_VFORK)` on a stack of its thread,
//!   whatever std decides: std cannot detect glibc in a static binary and falls back to `fork`,
//!   which copies the page tables of a large server on every command; glibc's `posix_spawn`
//!   maps and unmaps a stack and makes 64 `sigaction` calls per child.
//! - **Handles that stay bound**: every process we start is held by a pidfd and reaped by us
//!   exactly once ([`Process`]); a signal goes through the pidfd, so it can never reach another
//!   process that later got the same number.
//! - **Orphans**: [`become_subreaper`] makes this process the one the kernel hands orphaned
//!   descendants to (a command's `setsid` or double-forked children), and a reaper thread reaps
//!   those (never one of ours that its owner waits for).
//! - **Finding what a command started**: [`descendants`] walks this process's own tree (never
//!   the whole machine), and [`Found::signal`] signals one of them only after binding a pidfd to
//!   it and checking that it is still the process that was read (same start time).
//!
//! Invariant: no pid number is ever signalled after it may have been reused.

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

/// The children this process started and reaps itself, by pid: the reaper leaves them alone.
/// The value is the child's start time for those that someone else (a std `Child`) reaps,
/// 0 for a [`Process`] (removed from here when it is reaped).
static OURS: Mutex<Option<HashMap<i32, u64>>> = Mutex::new(None);

/// Held shared from just before a child of ours is started until it is in [`OURS`], and
/// exclusively by the reaper while it decides on (and reaps) a zombie that [`OURS`] does not
/// know: the reaper never takes a child of ours that is not registered yet, and spawns run
/// side by side (a lock held across every spawn, which waits for the child's `exec`,
/// made them one at a time).
static SPAWNING: RwLock<()> = RwLock::new(());

fn unregister(pid: i32) {
    if let Some(ours) = OURS.lock().as_mut() {
        ours.remove(&pid);
    }
}

/// A started child: its pid, a pidfd bound to it (where the kernel has them), and its exit
/// status once reaped.
#[derive(Debug)]
pub struct Process {
    pid: i32,
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
}

/// The standard streams of a process to start.
pub struct Stdio {
    /// `None`: `/dev/null`.
    pub stdin: Option<RawFd>,
    pub stdout: RawFd,
    pub stderr: RawFd,
}

impl Process {
    /// Starts `command` with `clone(CLONE_VM|CLONE_VFORK)` ([`Plan::spawn`]), in a process group of its own, with `stdio`,
    /// every signal at its default and none blocked. Takes the program, arguments,
    /// environment (`env_clear` included) and working directory from `command`.
    ///
    /// Fails like `Command::spawn`: `NotFound` for a missing program.
    pub fn spawn(command: &Command, stdio: &Stdio) -> io::Result<Process> {
        let plan = Plan::of(command)?;
        let gate = SPAWNING.read();
        // SAFETY: every pointer the child reads lives in `plan`, in `stdio`'s descriptors or
        // on the spawning stack frame until the child has exec'd or exited (CLONE_VFORK).
        let (pid, pidfd) = unsafe { plan.spawn(stdio)? };
        OURS.lock().get_or_insert_with(HashMap::new).insert(pid, 0);
        drop(gate);
        Ok(Process {
            pid,
            pidfd: pidfd.or_else(|| pidfd_open(pid)),
            status: None,
        })
    }

    pub fn id(&self) -> i32 {
        self.pid
    }

    /// The pidfd, readable once the process has exited (`None` on kernels without pidfds).
    pub fn pidfd(&self) -> Option<RawFd> {
        self.pidfd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// True once the process has exited, without reaping it: while it is not reaped its pid
    /// and its process group id cannot be reused.
    pub fn has_exited(&mut self) -> bool {
        if self.status.is_some() {
            return true;
        }
        // SAFETY: waitid with a zeroed siginfo_t we own; WNOWAIT leaves the child unreaped.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            ) == 0
                && info.si_pid() != 0
        }
    }

    /// Reaps the process if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.wait_with(libc::WNOHANG)
    }

    /// Waits for the exit and reaps.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.wait_with(0)? {
                return Ok(status);
            }
        }
    }

    fn wait_with(&mut self, flags: i32) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        // SAFETY: waitpid on our own unreaped child, with a pointer to a local.
        let reaped = unsafe { libc::waitpid(self.pid, &mut raw, flags) };
        match reaped {
            0 => Ok(None),
            pid if pid == self.pid => {
                let status = ExitStatus::from_raw(raw);
                self.status = Some(status);
                unregister(self.pid);
                Ok(Some(status))
            }
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// Sends `signal` to the process itself (through its pidfd); a no-op once reaped.
    pub fn signal(&self, signal: i32) {
        if self.status.is_some() {
            return;
        }
        match &self.pidfd {
            Some(fd) => {
                pidfd_send_signal(fd.as_raw_fd(), signal);
            }
            // SAFETY: an unreaped child of ours: its pid cannot name another process.
            None => unsafe {
                libc::kill(self.pid, signal);
            },
        }
    }

    /// Sends `signal` to the process group the process leads; only while it is unreaped
    /// (its pid, the group's id, cannot have been reused then). True when sent.
    pub fn signal_group(&self, signal: i32) -> bool {
        if self.status.is_some() || self.pid <= 1 {
            return false;
        }
        // SAFETY: killpg only sends a signal; the group's leader is our unreaped child.
        unsafe { libc::killpg(self.pid, signal) == 0 }
    }
}

impl Drop for Process {
    /// A process dropped unreaped is left to the reaper (it is no longer ours to wait for).
    fn drop(&mut self) {
        if self.status.is_none() {
            unregister(self.pid);
        }
    }
}

/// Held across a std spawn + [`register_held`], so that the reaper cannot take the new
/// child in between.
pub struct Registering {
    _gate: RwLockReadGuard<'static, ()>,
}

pub fn hold_registry() -> Registering {
    Registering {
        _gate: SPAWNING.read(),
    }
}

/// Registers a child that a std `Child` reaps, while [`hold_registry`]'s hold is kept.
pub fn register_held(_held: &mut Registering, pid: i32) {
    let started = start_time(pid).unwrap_or(0);
    OURS.lock()
        .get_or_insert_with(HashMap::new)
        .insert(pid, started);
}

/// What the child needs for its `execve`, as C strings.
struct Plan {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: Option<CString>,
}

impl Plan {
    fn of(command: &Command) -> io::Result<Plan> {
        let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a command");
        let env = environment(command);
        let program = command.get_program();
        let path = resolve(
            program,
            env.get(OsStr::new("PATH")).map(OsString::as_os_str),
        )?;
        let mut argv = vec![CString::new(program.as_bytes()).map_err(nul)?];
        for arg in command.get_args() {
            argv.push(CString::new(arg.as_bytes()).map_err(nul)?);
        }
        let mut envp = Vec::with_capacity(env.len());
        for (name, value) in env {
            let mut pair = name.into_vec();
            pair.push(b'=');
            pair.extend(value.into_vec());
            envp.push(CString::new(pair).map_err(nul)?);
        }
        let cwd = command
            .get_current_dir()
            .map(|dir| CString::new(dir.as_os_str().as_bytes()).map_err(nul))
            .transpose()?;
        Ok(Plan {
            path: CString::new(path.into_os_string().into_vec()).map_err(nul)?,
            argv,
            envp,
            cwd,
        })
    }

    /// Starts the child with `clone(CLONE_VM | CLONE_VFORK)`: this thread waits, on no copy of
    /// the page tables, until the child has called `execve` (or failed before it); the child
    /// runs [`child_main`] on this thread's [`ChildStack`]. Cheaper than glibc's `posix_spawn`,
    /// which maps a fresh stack for each child (and unmaps it, a TLB shootdown on a
    /// multi-threaded server) and makes 64 `sigaction` calls in it: a static C harness timed
    /// `sh -c true` at 0.92x of `posix_spawn`'s p50 this way (docs/performance.md).
    ///
    /// Returns the pid, and the pidfd that `CLONE_PIDFD` made (`None` on a kernel without it,
    /// before Linux 5.2).
    ///
    /// # Safety
    /// See [`Process::spawn`].
    unsafe fn spawn(&self, stdio: &Stdio) -> io::Result<(i32, Option<OwnedFd>)> {
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|arg| arg.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = self.envp.iter().map(|var| var.as_ptr()).collect();
        envp.push(std::ptr::null());
        let mut child = Child {
            path: self.path.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            cwd: self
                .cwd
                .as_ref()
                .map_or(std::ptr::null(), |cwd| cwd.as_ptr()),
            stdin: stdio.stdin.unwrap_or(-1),
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            reset: reset_signals(),
            error: 0,
        };
        CHILD_STACK.with(|stack| {
            let top = stack.top()?;
            // Every signal stays blocked in the child until its handlers are reset: a handler
            // of ours must never run in it (it shares our memory until its `execve`).
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
            let mut pidfd: libc::c_int = -1;
            let mut pid = libc::clone(
                child_main,
                top,
                flags | libc::CLONE_PIDFD,
                (&mut child as *mut Child).cast(),
                &mut pidfd as *mut libc::c_int,
            );
            if pid < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                // A kernel before 5.2: no pidfd from clone (the caller asks for one after).
                pid = libc::clone(child_main, top, flags, (&mut child as *mut Child).cast());
            }
            let clone_error = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                return Err(clone_error);
            }
            // A fresh descriptor from the kernel (close-on-exec), owned by nothing else.
            let pidfd = (pidfd >= 0).then(|| OwnedFd::from_raw_fd(pidfd));
            // The child has exec'd or exited by now (CLONE_VFORK); what it wrote is ours to read.
            let error = std::ptr::read_volatile(&child.error);
            if error != 0 {
                let mut status = 0;
                libc::waitpid(pid, &mut status, 0);
                return Err(io::Error::from_raw_os_error(error));
            }
            Ok((pid, pidfd))
        })
    }
}

/// What the child of [`Plan::spawn`] reads, and writes back (`error`), in our memory.
struct Child {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// Null: stay in our directory.
    cwd: *const libc::c_char,
    /// -1: `/dev/null`.
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    reset: &'static [libc::c_int],
    /// The `errno` of the step that failed; 0 when `execve` succeeded.
    error: libc::c_int,
}

/// The child between `clone` and `execve`. It shares our memory, our thread's TLS included,
/// while our thread waits: it makes only raw system calls through libc's thin wrappers, never
/// allocates, locks or unwinds, and reports a failure in `error` before `_exit(127)`.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Child` on the stack of the thread that waits for us; every pointer
    // in it lives until that thread resumes, which is after our `execve` or `_exit`. Only
    // async-signal-safe calls follow, on file descriptors and strings that `Plan` owns.
    unsafe {
        let child = &mut *arg.cast::<Child>();
        let fail = |child: &mut Child| -> ! {
            std::ptr::write_volatile(&mut child.error, *libc::__errno_location());
            libc::_exit(127)
        };
        let default = KernelSigaction::default();
        for &signal in child.reset {
            // Fails only for a number the kernel does not have: nothing to reset then.
            kernel_sigaction(signal, &default, std::ptr::null_mut());
        }
        if libc::setpgid(0, 0) != 0 {
            fail(child);
        }
        let stdin = if child.stdin >= 0 {
            child.stdin
        } else {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if null < 0 {
                fail(child);
            }
            null
        };
        for (from, to) in [(stdin, 0), (child.stdout, 1), (child.stderr, 2)] {
            // dup2 onto itself would keep the descriptor's close-on-exec flag.
            let done = if from == to {
                libc::fcntl(to, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            };
            if done < 0 {
                fail(child);
            }
        }
        if !child.cwd.is_null() && libc::chdir(child.cwd) != 0 {
            fail(child);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(child.path, child.argv, child.envp);
        fail(child)
    }
}

/// The signals a child resets to their default action before its `execve` (which keeps an
/// ignored signal ignored and the mask as it was): every signal that had a handler or was
/// ignored when the first child was started, and those this program may catch or ignore later
/// (signal-hook's SIGINT and SIGTERM, std's SIGPIPE, SIGSEGV and SIGBUS, and more to be sure).
/// glibc's own signals (32 and 33) are asked of the kernel directly, as glibc's `sigaction`
/// hides them: glibc's `posix_spawn` left them ignored in every child, and a parent started
/// that way passes them on.
/// Invariant: nothing in arservice ignores a signal outside this set after its first spawn.
fn reset_signals() -> &'static [libc::c_int] {
    static RESET: std::sync::OnceLock<Vec<libc::c_int>> = std::sync::OnceLock::new();
    RESET.get_or_init(|| {
        const ALWAYS: [libc::c_int; 13] = [
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGSEGV,
            libc::SIGUSR2,
            libc::SIGPIPE,
            libc::SIGALRM,
            libc::SIGTERM,
            libc::SIGCHLD,
            libc::SIGBUS,
            libc::SIGWINCH,
            libc::SIGTTOU,
        ];
        (1..=libc::SIGRTMAX())
            .filter(|&signal| signal != libc::SIGKILL && signal != libc::SIGSTOP)
            .filter(|&signal| {
                let mut current = KernelSigaction::default();
                // SAFETY: a query only (no new action), into a struct we own.
                let asked = unsafe { kernel_sigaction(signal, std::ptr::null(), &mut current) };
                ALWAYS.contains(&signal) || (asked == 0 && current.handler != libc::SIG_DFL)
            })
            .collect()
    })
}

/// The kernel's `struct sigaction` (x86_64 and aarch64 alike), not glibc's.
#[derive(Default)]
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// `rt_sigaction` itself: glibc's wrapper refuses its own signals (32 and 33).
///
/// # Safety
/// `new` and `old` are null or point to a `KernelSigaction`; setting a handler other than
/// `SIG_DFL` or `SIG_IGN` this way is not supported (there is no restorer).
unsafe fn kernel_sigaction(
    signal: libc::c_int,
    new: *const KernelSigaction,
    old: *mut KernelSigaction,
) -> libc::c_long {
    libc::syscall(
        libc::SYS_rt_sigaction,
        signal,
        new,
        old,
        std::mem::size_of::<u64>(),
    )
}

/// This thread's stack for the children it starts: mapped once, with a guard page below it,
/// and used by one child at a time (its thread waits while the child runs on it); unmapped
/// when the thread ends.
struct ChildStack {
    base: std::cell::Cell<*mut libc::c_void>,
}

/// Bytes of [`ChildStack`], the guard page included: [`child_main`] needs well under a page.
const CHILD_STACK_BYTES: usize = 64 * 1024;
const GUARD_BYTES: usize = 4096;

thread_local! {
    static CHILD_STACK: ChildStack = const {
        ChildStack { base: std::cell::Cell::new(std::ptr::null_mut()) }
    };
}

impl ChildStack {
    /// The top of the stack (it grows down), mapped on first use.
    fn top(&self) -> io::Result<*mut libc::c_void> {
        if self.base.get().is_null() {
            // SAFETY: a new private anonymous mapping; its lowest page is made inaccessible.
            unsafe {
                let base = libc::mmap(
                    std::ptr::null_mut(),
                    CHILD_STACK_BYTES,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                    -1,
                    0,
                );
                if base == libc::MAP_FAILED {
                    return Err(io::Error::last_os_error());
                }
                if libc::mprotect(base, GUARD_BYTES, libc::PROT_NONE) != 0 {
                    let error = io::Error::last_os_error();
                    libc::munmap(base, CHILD_STACK_BYTES);
                    return Err(error);
                }
                self.base.set(base);
            }
        }
        // SAFETY: one past the end of the mapping, 16-byte aligned (a page boundary).
        Ok(unsafe { self.base.get().cast::<u8>().add(CHILD_STACK_BYTES).cast() })
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        if !self.base.get().is_null() {
            // SAFETY: our own mapping, which no child uses any more (its thread is ending).
            unsafe { libc::munmap(self.base.get(), CHILD_STACK_BYTES) };
        }
    }
}

/// The environment the child gets: ours (unless the command clears it) with the command's
/// changes applied.
fn environment(command: &Command) -> std::collections::BTreeMap<OsString, OsString> {
    let mut env: std::collections::BTreeMap<OsString, OsString> = if clears_env(command) {
        Default::default()
    } else {
        std::env::vars_os().collect()
    };
    for (name, value) in command.get_envs() {
        match value {
            Some(value) => env.insert(name.to_owned(), value.to_owned()),
            None => env.remove(name),
        };
    }
    env
}

/// True when `env_clear` was called on `command`. std has no stable getter for it; its
/// `{:?}` starts with `cd "<dir>" && ` (when a directory is set) and then `env -i ` exactly when
/// the environment is cleared (no argument comes before: the program and its arguments are
/// printed last). Only that start is formatted: the writer stops the formatting after it, so
/// a long command costs nothing here (the whole `{:#?}` took ~5% of the server's CPU per
/// command). A variable of the command named like `env -i ...` could only make this answer
/// "cleared" wrongly, which leaks nothing. A unit test pins the format down, so a toolchain
/// that prints it differently fails the build's tests instead of leaking the server's
/// environment.
fn clears_env(command: &Command) -> bool {
    use std::fmt::Write;
    /// Keeps the first bytes written, then fails (which ends the formatting).
    struct Start {
        bytes: Vec<u8>,
        limit: usize,
    }
    impl Write for Start {
        fn write_str(&mut self, text: &str) -> std::fmt::Result {
            let room = self.limit - self.bytes.len();
            let take = text.len().min(room);
            self.bytes.extend_from_slice(&text.as_bytes()[..take]);
            if self.bytes.len() >= self.limit {
                Err(std::fmt::Error)
            } else {
                Ok(())
            }
        }
    }
    const CLEARED: &[u8] = b"env -i ";
    // `cd "<dir>" && `: the directory Debug-escaped, each byte at most 4 (`\xNN`).
    let cd_prefix = command
        .get_current_dir()
        .map_or(0, |dir| dir.as_os_str().len() * 4 + 16);
    let mut start = Start {
        bytes: Vec::with_capacity(cd_prefix + CLEARED.len()),
        limit: cd_prefix + CLEARED.len(),
    };
    let _ = write!(start, "{command:?}");
    let mut rest = &start.bytes[..];
    if command.get_current_dir().is_some() {
        // Past `cd "`, the escaped directory and its closing `" && `.
        let Some(quoted) = rest.strip_prefix(b"cd \"") else {
            return false;
        };
        let mut index = 0;
        while index < quoted.len() && quoted[index] != b'"' {
            index += if quoted[index] == b'\\' { 2 } else { 1 };
        }
        let Some(after) = quoted
            .get(index..)
            .and_then(|after| after.strip_prefix(b"\" && "))
        else {
            return false;
        };
        rest = after;
    }
    rest.starts_with(CLEARED)
}

/// The program's path: as given when it holds a `/`, else the first executable file of that
/// name on `path` (the child's `PATH`, else ours), like `execvp`.
fn resolve(program: &OsStr, path: Option<&OsStr>) -> io::Result<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let ours = std::env::var_os("PATH");
    let path = path
        .or(ours.as_deref())
        .unwrap_or(OsStr::new("/usr/bin:/bin"));
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found on PATH", program.to_string_lossy()),
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// A pidfd for `pid`, or `None` where the kernel has none (before 5.3).
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; the fd it returns is ours to own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a fresh fd from the kernel, owned by nothing else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_send_signal(fd: RawFd, signal: i32) -> bool {
    // SAFETY: pidfd_send_signal with a pidfd we hold, no siginfo, no flags.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        ) == 0
    }
}

/// A process's start time (clock ticks since boot, field 22 of `/proc/<pid>/stat`): with its
/// pid, a name that is never reused.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything: split after it.
    let after = &stat[stat.iter().rposition(|&byte| byte == b')')? + 2..];
    let field = after.split(|&byte| byte == b' ').nth(19)?;
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// A process's parent (field 4 of `/proc/<pid>/stat`).
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.iter().rposition(|&byte| byte == b')')? + 2..];
    let field = after.split(|&byte| byte == b' ').nth(1)?;
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// One process found in our tree: its pid and its start time when it was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub pid: i32,
    pub start_time: u64,
}

impl Found {
    /// Sends `signal` if the process is still the one that was found: a pidfd is bound to the
    /// pid first, then the start time is read again; a process that ended in between (its
    /// pid perhaps reused) is left alone. True when sent.
    pub fn signal(&self, signal: i32) -> bool {
        if self.pid <= 1 {
            return false;
        }
        match pidfd_open(self.pid) {
            Some(fd) => {
                start_time(self.pid) == Some(self.start_time)
                    && pidfd_send_signal(fd.as_raw_fd(), signal)
            }
            None => false,
        }
    }
}

/// Every process below `root` in the process tree (children, their children, ...), each with
/// its environment block, read from `/proc`. A process that ends during the walk is skipped.
pub fn descendants_of(root: i32) -> Vec<(Found, Vec<u8>)> {
    let mut walk = Walk::default();
    walk.below(children_of(root));
    walk.found
}

/// Every process below this one, reading every thread's list of children (one file per
/// thread: ~140 in a server). For the rare walk that must miss nothing whatever the kernel
/// does (the last one, at shutdown); the frequent ones use [`descendants`].
pub fn all_descendants() -> Vec<(Found, Vec<u8>)> {
    descendants_of(std::process::id() as i32)
}

/// Every process below this one, found where it can be: below a child this process started
/// and holds ([`OURS`]: its commands, its daemons), or below the main thread, to which the
/// kernel hands the orphans of a subreaper (its first live thread; the reaper still reads
/// every thread's list now and then, see [`become_subreaper`]). One `children` file per
/// process found, not one per thread of ours: a close of a `local` instance that ran a
/// command walked ~140 threads' files (several ms) with [`all_descendants`].
///
/// A process only ever moves from below one of ours to the main thread (when its parent
/// ends), so the main thread's list is read after the children's subtrees, and once more at
/// the end: a process that moved during the walk is seen at one place or the other.
pub fn descendants() -> Vec<(Found, Vec<u8>)> {
    let me = std::process::id() as i32;
    let roots: Vec<i32> = OURS
        .lock()
        .as_ref()
        .map(|ours| ours.keys().copied().collect())
        .unwrap_or_default();
    let main_children = || children_listed(Path::new(&format!("/proc/{me}/task/{me}/children")));
    let mut walk = Walk::default();
    walk.below(roots);
    walk.below(main_children());
    walk.below(main_children());
    walk.found
}

/// A walk down the process tree that visits each process once.
#[derive(Default)]
struct Walk {
    found: Vec<(Found, Vec<u8>)>,
    seen: std::collections::HashSet<i32>,
}

impl Walk {
    /// Visits `pids` and everything below them.
    fn below(&mut self, mut queue: Vec<i32>) {
        while let Some(pid) = queue.pop() {
            if !self.seen.insert(pid) {
                continue;
            }
            let Some(start_time) = start_time(pid) else {
                continue;
            };
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            self.found.push((Found { pid, start_time }, environ));
            queue.extend(children_of(pid));
        }
    }
}

/// SIGKILL to every process still in our tree: after a shutdown closed every instance, what
/// is left (a process that rewrote its own markers) is still ours, and goes with us.
pub fn kill_descendants() -> usize {
    all_descendants()
        .into_iter()
        .filter(|(found, _)| found.signal(libc::SIGKILL))
        .count()
}

/// The direct children of `pid`, from `/proc/<pid>/task/*/children`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        children.extend(children_listed(&task.path().join("children")));
    }
    children
}

/// The pids in one `/proc/<pid>/task/<tid>/children` file (none when it cannot be read).
fn children_listed(file: &Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .map(|list| {
            list.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the process is a zombie (state `Z` in `/proc/<pid>/stat`).
fn is_zombie(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.iter()
            .rposition(|&byte| byte == b')')
            .and_then(|at| stat.get(at + 2))
            == Some(&b'Z')
    })
}

/// The shortest time between two rounds of the reaper.
const REAP_INTERVAL: Duration = Duration::from_millis(20);

/// Every this many rounds the reaper reads every thread's children, not only the main one's.
const FULL_SCAN_EVERY: u64 = 50;

/// Makes this process the child subreaper of everything it starts (orphans come back to us
/// instead of going to init, so a command's `setsid` and double-forked children stay in our
/// tree where [`descendants`] finds them), and starts the thread that reaps those orphans.
/// Call once, early (before the threads that serve), from the main thread of the server or the
/// agent, and only in a process whose every child
/// is started by this module or by `spawn::spawn_daemon`: the reaper reaps any other child
/// (a std `Child` would then find its status gone).
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER and an integer flag.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SIGCHLD is blocked in this thread, and so in every thread started from it from now on,
    // the reaper included (a new thread inherits the mask): no thread is ever interrupted by
    // it. It stays pending until the reaper takes it with `sigwaitinfo`: while the reaper
    // sleeps between rounds, the exits of any number of commands cost it nothing (a handler
    // woke it once per command, to write to a pipe, on a loaded 2-core machine a thread
    // switch each). Children start with no signal blocked (the spawn helper and std both
    // reset the mask), and SIGCHLD keeps its default action, so children are not reaped by
    // the kernel.
    // SAFETY: a sigset_t we own, initialised by sigemptyset before use; pthread_sigmask only
    // changes this thread's mask.
    let chld = unsafe {
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &chld, std::ptr::null_mut());
        chld
    };
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || {
            for round in 0u64.. {
                // The kernel hands orphans to a live thread of the subreaper, the main one
                // while it lives: its list alone is read on most rounds (one file, not one
                // per thread); every thread's now and then, in case it did not.
                reap_orphans(round % FULL_SCAN_EVERY != 0);
                std::thread::sleep(REAP_INTERVAL);
                // Returns at the next SIGCHLD, at once when one came meanwhile; an error
                // (EINTR from another signal's handler) only means one round more.
                // SAFETY: a valid, initialised signal set; no siginfo is asked for.
                unsafe { libc::sigwaitinfo(&chld, std::ptr::null_mut()) };
            }
        })?;
    Ok(())
}

/// What [`OURS`] says of `pid`: `None` when not registered.
fn known(pid: i32) -> Option<u64> {
    OURS.lock()
        .as_ref()
        .and_then(|ours| ours.get(&pid).copied())
}

/// Reaps every exited child that is not one of ours (an orphan handed to us as subreaper).
/// Returns how many it reaped.
pub fn reap_orphans(main_thread_only: bool) -> usize {
    let me = std::process::id() as i32;
    let children = if main_thread_only {
        children_listed(Path::new(&format!("/proc/{me}/task/{me}/children")))
    } else {
        children_of(me)
    };
    let mut reaped = 0;
    for pid in children {
        if !is_zombie(pid) {
            continue;
        }
        // A zombie no one registered may be a child of ours between its spawn and its
        // registration: decided on only once no spawn is in between.
        let mut gate = None;
        if known(pid).is_none() {
            gate = Some(SPAWNING.write());
        }
        let theirs = match known(pid) {
            None => true,
            // A std child of ours: only if this zombie is another process of that number.
            Some(0) => false,
            Some(started) => start_time(pid).is_some_and(|now| now != started),
        };
        if theirs {
            let mut status = 0;
            // SAFETY: waitpid on a zombie child that no one of ours waits for (none can
            // register it meanwhile: the write gate is held, or it is registered as another).
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                reaped += 1;
            }
        }
        drop(gate);
    }
    reaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stdio_null() -> (Stdio, std::fs::File) {
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let fd = null.as_raw_fd();
        (
            Stdio {
                stdin: None,
                stdout: fd,
                stderr: fd,
            },
            null,
        )
    }

    #[test]
    fn env_clear_is_seen() {
        let mut command = Command::new("sh");
        command
            .arg("CommandEnv {\n        clear: true,")
            .arg("env -i ");
        assert!(!clears_env(&command), "an argument cannot fake it");
        command.env("A", "a").env_remove("B");
        assert!(!clears_env(&command));
        command.current_dir("/tmp/a\" && env -i \\\"x\n\u{e9}");
        assert!(!clears_env(&command), "nor a directory");
        command.env_clear();
        assert!(clears_env(&command));
        command.env("PATH", "/bin").current_dir("/tmp");
        assert!(clears_env(&command));
        let mut plain = Command::new("true");
        assert!(!clears_env(&plain));
        plain.env_clear();
        assert!(clears_env(&plain));
    }

    /// Runs `command` with `stdin` (or `/dev/null`), stdout and stderr into one pipe, to its
    /// end: its status and what it wrote, and the handle it had.
    fn run_to_end(command: &Command, stdin: Option<RawFd>) -> (ExitStatus, String, Process) {
        let (reader, writer) = io::pipe().unwrap();
        let stdio = Stdio {
            stdin,
            stdout: writer.as_raw_fd(),
            stderr: writer.as_raw_fd(),
        };
        let mut process = Process::spawn(command, &stdio).unwrap();
        drop(writer);
        let mut output = String::new();
        io::Read::read_to_string(&mut &reader, &mut output).unwrap();
        (process.wait().unwrap(), output, process)
    }

    #[test]
    fn spawned_with_args_env_cwd_and_status() {
        let mut command = Command::new("sh");
        command
            .args(["-c", "echo \"$0 $A $B $HOME\"; pwd; exit 7", "zero"])
            .env_clear()
            .env("A", "a")
            .env("B", "b")
            .env("PATH", "/usr/bin:/bin")
            .current_dir("/tmp");
        let (status, output, process) = run_to_end(&command, None);
        // HOME is not set: the environment was cleared.
        assert_eq!(output, "zero a b \n/tmp\n");
        assert_eq!(status.code(), Some(7));
        // Reaped: the handle no longer signals anything.
        assert!(!process.signal_group(0));
    }

    #[test]
    fn a_missing_program_is_not_found() {
        let (stdio, _null) = stdio_null();
        let err = Process::spawn(&Command::new("no-such-program-here"), &stdio).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let err = Process::spawn(&Command::new("/nonexistent/x"), &stdio).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// The mask and ignored signals of a process, from `/proc/<pid>/status` text.
    fn signal_masks(status: &str) -> (String, String) {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in {status}"))
        };
        (field("SigBlk:"), field("SigIgn:"))
    }

    #[test]
    fn children_start_with_every_signal_default_and_none_blocked() {
        // Run in a thread of its own, with signals blocked there, as the server's threads
        // block SIGCHLD; the test harness (like the server) ignores SIGPIPE.
        std::thread::spawn(|| {
            // SAFETY: a sigset_t we own; changes only this thread's mask.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for signal in [libc::SIGCHLD, libc::SIGTERM, libc::SIGUSR2, libc::SIGXCPU] {
                    libc::sigaddset(&mut set, signal);
                }
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            let ours = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let (blocked, ignored) = signal_masks(&ours);
            assert_ne!(blocked, "0000000000000000", "the test blocks signals");
            assert_ne!(ignored, "0000000000000000", "SIGPIPE is ignored here");
            let mut command = Command::new("cat");
            command.arg("/proc/self/status");
            let (exit, status, _) = run_to_end(&command, None);
            assert!(exit.success(), "{status}");
            let (blocked, ignored) = signal_masks(&status);
            assert_eq!(blocked, "0000000000000000", "{status}");
            assert_eq!(ignored, "0000000000000000", "{status}");
            // In a process group of its own.
            let group = status.lines().find(|line| line.starts_with("NSpgid:"));
            let pid = status.lines().find(|line| line.starts_with("Pid:"));
            assert_eq!(
                group.map(|line| line.split_whitespace().nth(1)),
                pid.map(|line| line.split_whitespace().nth(1)),
                "{status}"
            );
        })
        .join()
        .unwrap();
    }

    /// A kernel without `CLONE_PIDFD` (before 5.2) answers EINVAL: a seccomp filter on this
    /// test's thread answers that for every `clone` asking for a pidfd, and the spawn still
    /// works, its pidfd from `pidfd_open`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_kernel_refusing_clone_pidfd_still_spawns() {
        std::thread::spawn(|| {
            let errno_einval = libc::SECCOMP_RET_ERRNO | libc::EINVAL as u32;
            let statement = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
                code: code as u16,
                jt,
                jf,
                k,
            };
            let filter = [
                // The syscall number (`seccomp_data.nr`); clone, or allowed.
                statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
                statement(
                    libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                    libc::SYS_clone as u32,
                    0,
                    3,
                ),
                // Its flags (the low half of `args[0]`): with CLONE_PIDFD, EINVAL.
                statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 16, 0, 0),
                statement(
                    libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
                    libc::CLONE_PIDFD as u32,
                    0,
                    1,
                ),
                statement(libc::BPF_RET | libc::BPF_K, errno_einval, 0, 0),
                statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW, 0, 0),
            ];
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut _,
            };
            // SAFETY: prctl with a filter program that lives on this frame; both apply to this
            // thread only (no TSYNC), which ends with the test.
            unsafe {
                assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
                assert_eq!(
                    libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program),
                    0,
                    "{}",
                    io::Error::last_os_error()
                );
            }
            let mut command = Command::new("sh");
            command.args(["-c", "echo fallback; exit 3"]);
            let (status, output, process) = run_to_end(&command, None);
            assert_eq!((status.code(), output.as_str()), (Some(3), "fallback\n"));
            assert!(process.pidfd().is_some(), "a pidfd from pidfd_open");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_child_failing_before_its_exec_is_reported_and_reaped() {
        let (stdio, _null) = stdio_null();
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg("true")
            .current_dir("/nonexistent-dir");
        let err = Process::spawn(&command, &stdio).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        let err = Process::spawn(&Command::new("/etc/passwd"), &stdio).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    }

    #[test]
    fn stdin_from_a_descriptor_reaches_the_child() {
        let (stdin_reader, stdin_writer) = io::pipe().unwrap();
        io::Write::write_all(&mut &stdin_writer, b"fed in\n").unwrap();
        drop(stdin_writer);
        let (status, output, _) = run_to_end(&Command::new("cat"), Some(stdin_reader.as_raw_fd()));
        assert!(status.success());
        assert_eq!(output, "fed in\n");
    }

    #[test]
    fn exit_is_seen_without_reaping_and_the_pid_stays_ours() {
        let (stdio, _null) = stdio_null();
        let mut command = Command::new("true");
        command.env_clear().env("PATH", "/usr/bin:/bin");
        let mut process = Process::spawn(&command, &stdio).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !process.has_exited() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(2));
        }
        // Still a zombie of ours: its group id is still its own.
        assert!(is_zombie(process.id()));
        assert!(process.try_wait().unwrap().unwrap().success());
    }

    #[test]
    fn descendants_are_found_and_signalled_by_handle() {
        let (stdio, _null) = stdio_null();
        let mut command = Command::new("sh");
        command
            .args(["-c", "sleep 30 & exec sleep 31"])
            .env("ARS_TEST_MARK", "walk");
        let mut process = Process::spawn(&command, &stdio).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mine = loop {
            let mine: Vec<Found> = descendants()
                .into_iter()
                .filter(|(_, environ)| {
                    environ
                        .split(|&byte| byte == 0)
                        .any(|var| var == b"ARS_TEST_MARK=walk")
                })
                .map(|(found, _)| found)
                .collect();
            if mine.len() == 2 || std::time::Instant::now() > deadline {
                break mine;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(mine.len(), 2, "{mine:?}");
        // A stale start time is refused: the process is not signalled.
        let stale = Found {
            start_time: mine[0].start_time + 1,
            ..mine[0]
        };
        assert!(!stale.signal(libc::SIGKILL));
        for found in &mine {
            assert!(found.signal(libc::SIGKILL));
        }
        assert_eq!(process.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
