//! The agent: this same binary, run inside a sandbox as its long-lived process
//! (`arservice agent --socket PATH`), that runs each command with the one spawn helper, so a
//! command costs a unix-socket request instead of a `docker exec`.
//!
//! Owns both ends of that channel: [`serve`] (inside the sandbox: a tiny_http server on a unix
//! socket, one thread per request) and [`AgentClient`] (on the host: one HTTP/1.1 request per
//! connection over `UnixStream`). The exec contract is the one of every environment:
//! `{cmd, cwd, env, timeout, max_output_bytes, shell}` in, [`ExecResult`] out. The socket lives
//! in a per-instance host directory (mode 0700) bind-mounted into that sandbox only, so no
//! other instance can reach it.

use crate::env::local::find_program;
use crate::env::spawn::{self, ExecResult, Limits, ProcessGroups};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// The longest a unix socket path may be (`sun_path` holds 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Added to a command's timeout for the request that carries it.
const REQUEST_MARGIN: Duration = Duration::from_secs(30);

/// One command for the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentExec {
    pub cmd: String,
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub timeout_s: f64,
    pub max_output_bytes: usize,
    /// `None`: `bash -lc` where the sandbox has bash, else `sh -c`.
    pub shell: Option<Vec<String>>,
}

impl AgentExec {
    /// One request of the exec contract, a relative `cwd` taken from `base_cwd`.
    pub fn from_request(
        request: &crate::env::ExecRequest,
        base_cwd: &str,
        shell: Option<Vec<String>>,
    ) -> AgentExec {
        AgentExec {
            cmd: request.cmd.clone(),
            cwd: request
                .cwd
                .as_ref()
                .map(|cwd| Path::new(base_cwd).join(cwd).display().to_string()),
            env: request.env.clone(),
            timeout_s: request.limits.timeout.as_secs_f64(),
            max_output_bytes: request.limits.max_output_bytes,
            shell,
        }
    }
}

impl AgentError {
    /// As an environment error: a refused `cwd` is the request's fault (400), the rest the
    /// sandbox's (500).
    pub fn into_env_error(self, sandbox: &str) -> crate::env::EnvError {
        use crate::env::EnvError;
        match self {
            AgentError::Refused(status, detail)
                if status < 500 || detail.contains("not a directory") =>
            {
                EnvError::Invalid(detail)
            }
            AgentError::Refused(status, detail) => EnvError::Tool {
                what: format!("the agent in {sandbox} ({status})"),
                detail,
            },
            AgentError::Unreachable(detail) => EnvError::Tool {
                what: format!("the agent in {sandbox}"),
                detail,
            },
        }
    }
}

/// The agent as PID 1 of its sandbox: starts the serving agent as its only child (this same
/// binary, whose pid is not 1), then reaps every process the kernel hands to PID 1 (orphans
/// of commands that left background jobs behind would otherwise stay zombies), passes SIGTERM
/// and SIGINT on to the child, and exits with the child's status. The serving agent waits for
/// its own commands, so the two never reap each other's children.
pub fn init(socket: &Path) -> Result<u8, String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let child = Command::new("/proc/self/exe")
        .args(["agent", "--socket"])
        .arg(socket)
        .spawn()
        .map_err(|err| format!("cannot start the serving agent: {err}"))?;
    let child_pid = child.id() as libc::pid_t;
    // The child is reaped below with waitpid(-1), not through `Child`.
    drop(child);
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|err| format!("cannot watch signals: {err}"))?;
    std::thread::spawn(move || {
        for signal in signals.forever() {
            // SAFETY: kill only sends a signal to the child we started.
            unsafe { libc::kill(child_pid, signal) };
        }
    });
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer to a local; -1 reaps any child.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == child_pid {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            return Ok(u8::try_from(code).unwrap_or(u8::MAX));
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            return Err("the serving agent is gone".into());
        }
    }
}

/// Serves commands on `socket` until the process is killed (the sandbox's close does that).
/// The process should be the commands' subreaper first (see `main`'s `agent_main`).
pub fn serve(socket: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(socket);
    let server = tiny_http::Server::http_unix(socket)
        .map_err(|err| format!("cannot listen on {}: {err}", socket.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|err| format!("cannot restrict {}: {err}", socket.display()))?;
    let groups = Arc::new(ProcessGroups::default());
    for mut request in server.incoming_requests() {
        let groups = Arc::clone(&groups);
        std::thread::spawn(move || {
            let mut body = Vec::new();
            let (status, answer) = match request.as_reader().read_to_end(&mut body) {
                Err(err) => (400, serde_json::json!({"detail": err.to_string()})),
                Ok(_) => match serde_json::from_slice::<AgentExec>(&body) {
                    Err(err) => (
                        400,
                        serde_json::json!({"detail": format!("bad request: {err}")}),
                    ),
                    Ok(exec) => match run(&exec, &groups) {
                        Ok(result) => (200, serde_json::json!(result)),
                        Err(err) => (500, serde_json::json!({"detail": err})),
                    },
                },
            };
            // Always with a Content-Length: tiny_http would send a body of 32 KiB or more
            // chunked (the client reads both; one framing is simpler to reason about).
            let response = tiny_http::Response::from_data(answer.to_string().into_bytes())
                .with_status_code(status)
                .with_chunked_threshold(usize::MAX);
            let _ = request.respond(response);
        });
    }
    Ok(())
}

/// Runs one command inside the sandbox.
fn run(exec: &AgentExec, groups: &ProcessGroups) -> Result<ExecResult, String> {
    let mut command = match &exec.shell {
        Some(shell) if !shell.is_empty() => {
            let mut command = Command::new(&shell[0]);
            command.args(&shell[1..]).arg(&exec.cmd);
            command
        }
        _ => {
            // What BASH_OR_SH chooses on the CLI paths (`bash -lc` where the sandbox has bash,
            // else `sh -c`), chosen here in-process: one program started instead of two.
            let path = exec
                .env
                .get("PATH")
                .cloned()
                .or_else(|| std::env::var("PATH").ok());
            let bash = find_program("bash", path.as_deref());
            let mut command = if bash.is_absolute() {
                let mut command = Command::new(bash);
                command.arg("-lc");
                command
            } else {
                let mut command = Command::new(find_program("sh", path.as_deref()));
                command.arg("-c");
                command
            };
            command.arg(&exec.cmd);
            command
        }
    };
    if let Some(cwd) = &exec.cwd {
        if !Path::new(cwd).is_dir() {
            return Err(format!("cwd '{cwd}' is not a directory in the sandbox"));
        }
        command.current_dir(cwd);
    }
    command.envs(&exec.env);
    let limits = Limits {
        timeout: Duration::from_secs_f64(exec.timeout_s),
        max_output_bytes: exec.max_output_bytes,
    };
    spawn::run(command, limits, groups).map_err(|err| format!("cannot run the shell: {err}"))
}

/// The host side: sends commands to one agent's socket, over kept-alive connections.
#[derive(Debug)]
pub struct AgentClient {
    socket: PathBuf,
    /// Idle connections; one per concurrent command at most, so never more than the
    /// server's workers.
    idle: Mutex<Vec<BufReader<UnixStream>>>,
}

/// How a request to the agent failed.
#[derive(Debug)]
pub enum AgentError {
    /// The agent could not be reached or broke the connection.
    Unreachable(String),
    /// The agent answered with an error (`status`, its detail).
    Refused(u16, String),
}

impl AgentClient {
    pub fn new(socket: PathBuf) -> AgentClient {
        AgentClient {
            socket,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// True once the agent answers.
    pub fn ready(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok()
    }

    pub fn exec(&self, exec: &AgentExec) -> Result<ExecResult, AgentError> {
        let timeout = Duration::from_secs_f64(exec.timeout_s) + REQUEST_MARGIN;
        let body =
            serde_json::to_vec(exec).map_err(|err| AgentError::Unreachable(err.to_string()))?;
        let limit = answer_limit(exec.max_output_bytes);
        let (status, answer) = self
            .post("/exec", &body, timeout, limit)
            .map_err(AgentError::Unreachable)?;
        if status == 200 {
            serde_json::from_slice(&answer)
                .map_err(|err| AgentError::Unreachable(format!("bad answer: {err}")))
        } else {
            let detail = serde_json::from_slice::<serde_json::Value>(&answer)
                .ok()
                .and_then(|value| value["detail"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
            Err(AgentError::Refused(status, detail))
        }
    }

    /// One HTTP/1.1 request; the status and the body. An idle connection is reused; if it
    /// turns out closed before any answer came, the request goes once more on a fresh one
    /// (the agent never read it, so it never ran).
    fn post(
        &self,
        path: &str,
        body: &[u8],
        timeout: Duration,
        limit: u64,
    ) -> Result<(u16, Vec<u8>), String> {
        let reused = self.idle.lock().pop();
        if let Some(connection) = reused {
            match self.exchange(connection, path, body, timeout, limit) {
                Ok(answer) => return Ok(answer),
                Err(Exchange::NeverAnswered(_)) => {}
                Err(Exchange::Broken(err)) => return Err(err),
            }
        }
        let stream = UnixStream::connect(&self.socket)
            .map_err(|err| format!("cannot connect to {}: {err}", self.socket.display()))?;
        self.exchange(BufReader::new(stream), path, body, timeout, limit)
            .map_err(|(Exchange::NeverAnswered(err) | Exchange::Broken(err))| err)
    }

    fn exchange(
        &self,
        mut connection: BufReader<UnixStream>,
        path: &str,
        body: &[u8],
        timeout: Duration,
        limit: u64,
    ) -> Result<(u16, Vec<u8>), Exchange> {
        let stream = connection.get_mut();
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|err| Exchange::Broken(err.to_string()))?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body))
            .map_err(|err| Exchange::NeverAnswered(format!("cannot send to the agent: {err}")))?;
        let broken = |err: std::io::Error| Exchange::Broken(err.to_string());
        let line = match read_line_bounded(&mut connection, MAX_LINE_BYTES) {
            Ok(None) => {
                return Err(Exchange::NeverAnswered(
                    "the agent closed the connection".into(),
                ))
            }
            Ok(Some(line)) => line,
            Err(err) => return Err(Exchange::Broken(format!("no answer from the agent: {err}"))),
        };
        let status: u16 = line
            .strip_prefix("HTTP/1.")
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| Exchange::Broken(format!("not an HTTP answer: {line:?}")))?;
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut keep = true;
        for count in 0.. {
            if count > MAX_HEADERS {
                return Err(Exchange::Broken("too many headers in the answer".into()));
            }
            let line = read_line_bounded(&mut connection, MAX_LINE_BYTES)
                .map_err(broken)?
                .ok_or_else(|| Exchange::Broken("the answer ended in its headers".into()))?;
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(Exchange::Broken(format!("bad header line {line:?}")));
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let parsed = value
                    .parse()
                    .map_err(|_| Exchange::Broken(format!("bad content-length {value:?}")))?;
                if length.is_some_and(|known| known != parsed) {
                    return Err(Exchange::Broken("two content-lengths in the answer".into()));
                }
                length = Some(parsed);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
                if !chunked && !value.eq_ignore_ascii_case("identity") {
                    return Err(Exchange::Broken(format!(
                        "transfer-encoding {value:?} is not understood"
                    )));
                }
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close")
            {
                keep = false;
            }
        }
        let too_large = |size: u64| {
            Exchange::Broken(format!(
                "answer of {size} bytes or more is larger than {limit} bytes"
            ))
        };
        let answer = if chunked {
            read_chunked(&mut connection, limit).map_err(|err| match err {
                Chunked::TooLarge(size) => too_large(size),
                Chunked::Io(err) => broken(err),
            })?
        } else {
            match length {
                Some(length) if length <= limit => {
                    let mut answer = vec![0; length as usize];
                    connection.read_exact(&mut answer).map_err(broken)?;
                    answer
                }
                Some(length) => return Err(too_large(length)),
                None => {
                    keep = false;
                    let mut answer = Vec::new();
                    (&mut connection)
                        .take(limit + 1)
                        .read_to_end(&mut answer)
                        .map_err(broken)?;
                    if answer.len() as u64 > limit {
                        return Err(too_large(answer.len() as u64));
                    }
                    answer
                }
            }
        };
        if keep {
            self.idle.lock().push(connection);
        }
        Ok((status, answer))
    }
}

/// The longest status or header line the client reads from an agent (a sandbox can replace
/// its agent: nothing it sends may make the server allocate without bound).
const MAX_LINE_BYTES: u64 = 8 * 1024;

/// The most header lines the client reads from one answer.
const MAX_HEADERS: usize = 64;

/// Room for the JSON around the output in an answer, and for the agent's error details.
const ANSWER_SLACK_BYTES: u64 = 64 * 1024;

/// How much larger than the output its JSON can be: a control byte is written `\u0001` (6
/// bytes); an invalid UTF-8 byte becomes U+FFFD (3 bytes).
const JSON_ESCAPE_FACTOR: u64 = 6;

/// The largest answer an exec with this output cap can need.
pub fn answer_limit(max_output_bytes: usize) -> u64 {
    (max_output_bytes as u64)
        .saturating_add(OMITTED_NOTE_BYTES)
        .saturating_mul(JSON_ESCAPE_FACTOR)
        .saturating_add(ANSWER_SLACK_BYTES)
}

/// The note that replaces the middle of a truncated output, at its longest.
const OMITTED_NOTE_BYTES: u64 = 64;

/// One line (CRLF or LF ended, without it), at most `max` bytes; `None` at end-of-file before
/// any byte.
fn read_line_bounded(reader: &mut impl BufRead, max: u64) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let read = reader.take(max + 1).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        let why = if line.len() as u64 > max {
            format!("a line longer than {max} bytes")
        } else {
            "end of stream inside a line".to_string()
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "a line not in UTF-8"))
}

/// How reading a chunked body failed.
enum Chunked {
    TooLarge(u64),
    Io(std::io::Error),
}

impl From<std::io::Error> for Chunked {
    fn from(err: std::io::Error) -> Chunked {
        Chunked::Io(err)
    }
}

/// A `Transfer-Encoding: chunked` body of at most `limit` bytes (trailers skipped).
fn read_chunked(reader: &mut impl BufRead, limit: u64) -> Result<Vec<u8>, Chunked> {
    let bad = |why: String| Chunked::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    let mut body = Vec::new();
    loop {
        let line = read_line_bounded(reader, MAX_LINE_BYTES)?
            .ok_or_else(|| bad("the answer ended in a chunk size".into()))?;
        let digits = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(digits, 16)
            .map_err(|_| bad(format!("bad chunk size {digits:?}")))?;
        if size == 0 {
            for _ in 0..=MAX_HEADERS {
                match read_line_bounded(reader, MAX_LINE_BYTES)? {
                    Some(trailer) if !trailer.is_empty() => continue,
                    _ => return Ok(body),
                }
            }
            return Err(bad("too many trailers".into()));
        }
        let total = body.len() as u64 + size;
        if total > limit {
            return Err(Chunked::TooLarge(total));
        }
        let at = body.len();
        body.resize(at + size as usize, 0);
        reader.read_exact(&mut body[at..])?;
        let mut end = [0u8; 2];
        reader.read_exact(&mut end)?;
        if &end != b"\r\n" {
            return Err(bad("a chunk not followed by CRLF".into()));
        }
    }
}

/// How one exchange on a connection failed.
enum Exchange {
    /// Before any answer: the request can go again on another connection.
    NeverAnswered(String),
    /// After the agent may have run it: report, do not repeat.
    Broken(String),
}

/// How long a start waits for the agent to answer before the sandbox falls back to its CLI.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a start looks for the agent's socket.
const AGENT_POLL: Duration = Duration::from_millis(5);

/// The host side of an instance's agent: the binary and the per-instance directory (mode
/// 0700) that holds its socket, mounted into that sandbox only.
pub struct AgentMount {
    pub binary: PathBuf,
    pub dir: PathBuf,
}

/// Where the agent binary is mounted in a sandbox.
pub const AGENT_IN_SANDBOX: &str = "/.arservice/agent";

/// Where the instance's agent directory (with the socket) is mounted in a sandbox.
pub const AGENT_DIR_IN_SANDBOX: &str = "/.arservice/run";

/// The socket, as the agent inside the sandbox sees it.
pub const SOCKET_IN_SANDBOX: &str = "/.arservice/run/agent.sock";

impl AgentMount {
    /// A short per-instance directory under the state dir (a socket path must stay under 108
    /// bytes), or `None` when even that is too long.
    pub fn prepare(
        binary: &Path,
        ctx: &crate::env::InstanceContext,
    ) -> Result<Option<AgentMount>, crate::env::EnvError> {
        let dir = AgentMount::dir_of(ctx);
        if dir.join("agent.sock").as_os_str().len() > MAX_SOCKET_PATH {
            log::warn!(
                "state dir path too long for a unix socket: {} runs without its agent",
                ctx.run_id
            );
            return Ok(None);
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| crate::env::EnvError::Io {
                context: format!("cannot create {}", dir.display()),
                source,
            })?;
        Ok(Some(AgentMount {
            binary: binary.to_path_buf(),
            dir,
        }))
    }

    /// The instance's agent mount, or `None` when it runs without one: no `--agent` binary,
    /// `force_cli` (`exec_mode: "cli"`), or a path that `fits` refuses (a tool's mount syntax
    /// cannot carry every character; `tool` names it in the warning).
    pub fn for_instance(
        ctx: &crate::env::InstanceContext,
        force_cli: bool,
        tool: &str,
        fits: impl Fn(&Path) -> bool,
    ) -> Result<Option<AgentMount>, crate::env::EnvError> {
        let Some(binary) = ctx.agent.as_deref().filter(|_| !force_cli) else {
            return Ok(None);
        };
        let Some(mount) = AgentMount::prepare(binary, ctx)? else {
            return Ok(None);
        };
        if fits(&mount.binary) && fits(&mount.dir) {
            return Ok(Some(mount));
        }
        log::warn!(
            "the agent's paths cannot go into {tool}: {} runs without its agent",
            ctx.run_id
        );
        let _ = std::fs::remove_dir_all(&mount.dir);
        Ok(None)
    }

    /// The instance's agent directory: `<state>/agents/<hash of its sandbox name>`.
    pub fn dir_of(ctx: &crate::env::InstanceContext) -> PathBuf {
        ctx.state_dir.join("agents").join(format!(
            "{:016x}",
            crate::env::fnv1a(ctx.sandbox_name().as_bytes())
        ))
    }

    /// Waits until the agent answers (`Some`), or `failed()` says it never will (`None`).
    pub fn connect(&self, failed: &dyn Fn() -> bool) -> Option<AgentClient> {
        let client = AgentClient::new(self.dir.join("agent.sock"));
        let deadline = std::time::Instant::now() + AGENT_START_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if client.ready() {
                return Some(client);
            }
            if failed() {
                return None;
            }
            std::thread::sleep(AGENT_POLL);
        }
        None
    }
}

/// True when the binary at `path` is statically linked (an ELF without a program
/// interpreter), so that it runs inside any Linux sandbox of the same architecture.
pub fn is_static_executable(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    /// The ELF header and the program headers sit in the first pages; never read the whole
    /// binary (a debug build is tens of MB).
    const HEAD_BYTES: u64 = 64 * 1024;
    let mut bytes = Vec::new();
    let read =
        std::fs::File::open(path).and_then(|file| file.take(HEAD_BYTES).read_to_end(&mut bytes));
    if read.is_err() || bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
    let u64_at = |at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(word) as usize
    };
    let (table, entry_size, count) = (u64_at(32), u16_at(54), u16_at(56));
    if table + entry_size * count > bytes.len() {
        return false;
    }
    (0..count).all(|index| {
        let at = table + index * entry_size;
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) != PT_INTERP
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_through_a_real_agent_on_a_socket() {
        let dir = std::env::temp_dir().join(format!("ars-agent-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("s");
        let served = socket.clone();
        std::thread::spawn(move || serve(&served));
        let client = AgentClient::new(socket.clone());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !client.ready() {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent never listened"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let exec = AgentExec {
            cmd: "echo $K; pwd; echo err >&2; exit 4".into(),
            cwd: Some("/".into()),
            env: [("K".to_string(), "V".to_string())].into(),
            timeout_s: 5.0,
            max_output_bytes: 1000,
            shell: None,
        };
        let result = client.exec(&exec).unwrap();
        assert_eq!(result.output, "V\n/\nerr\n");
        assert_eq!(result.returncode, 4);
        let slow = AgentExec {
            cmd: "sleep 30".into(),
            timeout_s: 0.3,
            ..exec.clone()
        };
        assert!(client.exec(&slow).unwrap().timed_out);
        // The connection is kept and reused: one idle connection after sequential commands.
        assert_eq!(client.idle.lock().len(), 1);
        let nowhere = AgentExec {
            cwd: Some("/nonexistent".into()),
            ..exec
        };
        assert!(
            matches!(client.exec(&nowhere), Err(AgentError::Refused(500, detail)) if detail.contains("/nonexistent"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A real agent on a socket of its own, and its client.
    fn real_agent(tag: &str) -> (AgentClient, PathBuf) {
        let dir = std::env::temp_dir().join(format!("ars-agent-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("s");
        let served = socket.clone();
        std::thread::spawn(move || serve(&served));
        let client = AgentClient::new(socket);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !client.ready() {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent never listened"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        (client, dir)
    }

    fn exec_of(cmd: &str, max_output_bytes: usize) -> AgentExec {
        AgentExec {
            cmd: cmd.into(),
            cwd: None,
            env: BTreeMap::new(),
            timeout_s: 30.0,
            max_output_bytes,
            shell: Some(vec!["sh".into(), "-c".into()]),
        }
    }

    #[test]
    fn outputs_of_every_size_and_byte_cross_the_channel() {
        let (client, dir) = real_agent("sizes");
        let cap = 1 << 20;
        for size in [
            0usize,
            1,
            4095,
            4096,
            4097,
            32767,
            32768,
            65536,
            cap - 1,
            cap,
        ] {
            let exec = exec_of(&format!("head -c {size} /dev/zero | tr '\\0' x"), cap);
            let result = client.exec(&exec).unwrap();
            assert_eq!(result.output.len(), size, "size {size}");
            assert!(result.output.bytes().all(|byte| byte == b'x'));
            assert!(!result.truncated, "size {size}");
        }
        // Every answer was read whole: the connection is still good for the next one.
        assert_eq!(client.idle.lock().len(), 1);
        // Control bytes (6x in JSON) and invalid UTF-8 (3x) at the full cap.
        for (byte, expected) in [("\\001", "\u{1}"), ("\\377", "\u{FFFD}")] {
            let exec = exec_of(&format!("head -c {cap} /dev/zero | tr '\\0' '{byte}'"), cap);
            let result = client.exec(&exec).unwrap();
            assert_eq!(result.output, expected.repeat(cap), "byte {byte}");
        }
        let over = client
            .exec(&exec_of(
                "head -c 3000000 /dev/zero | tr '\\0' '\\001'",
                cap,
            ))
            .unwrap();
        assert!(over.truncated);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fake agent that answers every request on `socket` with `answer` (raw bytes).
    fn fake_agent(tag: &str, answer: Vec<u8>) -> (AgentClient, PathBuf) {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("ars-fake-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("s");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let answer = answer.clone();
                // Every request on the connection gets the answer (kept-alive, as the agent).
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    loop {
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some(value) = line.strip_prefix("Content-Length: ") {
                                length = value.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; length];
                        let _ = reader.read_exact(&mut body);
                        if stream.write_all(&answer).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (AgentClient::new(socket), dir)
    }

    #[test]
    fn chunked_answers_are_read() {
        let json = serde_json::to_vec(&ExecResult {
            output: "y".repeat(70_000),
            returncode: 0,
            timed_out: false,
            truncated: false,
            duration_s: 0.1,
        })
        .unwrap();
        let mut answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for chunk in json.chunks(8192) {
            answer.extend(format!("{:x}\r\n", chunk.len()).bytes());
            answer.extend(chunk);
            answer.extend(b"\r\n");
        }
        answer.extend(b"0\r\n\r\n");
        let (client, dir) = fake_agent("chunked", answer);
        for _ in 0..2 {
            let result = client.exec(&exec_of("x", 100_000)).unwrap();
            assert_eq!(result.output.len(), 70_000);
        }
        assert_eq!(client.idle.lock().len(), 1, "the connection was kept");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_hostile_agent_cannot_make_the_server_allocate() {
        let long_line = [b"HTTP/1.1 200 ".to_vec(), vec![b'a'; 1 << 20]].concat();
        let huge_length = b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n".to_vec();
        let huge_chunk =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffff\r\n".to_vec();
        let endless_headers = [b"HTTP/1.1 200 OK\r\n".to_vec(), b"X: y\r\n".repeat(1000)].concat();
        let not_http = b"SSH-2.0-OpenSSH\r\n\r\n".to_vec();
        for (tag, answer, words) in [
            ("line", long_line, "longer than"),
            ("length", huge_length, "larger than"),
            ("chunk", huge_chunk, "larger than"),
            ("headers", endless_headers, "too many headers"),
            ("nothttp", not_http, "not an HTTP answer"),
        ] {
            let (client, dir) = fake_agent(tag, answer);
            match client.exec(&exec_of("x", 1000)) {
                Err(AgentError::Unreachable(detail)) => {
                    assert!(detail.contains(words), "{tag}: {detail}")
                }
                other => panic!("{tag}: {other:?}"),
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn static_executables_are_told_apart() {
        // Debian's sh is dynamically linked; busybox-static (in the test bed) is not.
        assert!(!is_static_executable(Path::new("/bin/sh")));
        assert!(!is_static_executable(Path::new("/etc/passwd")));
        if Path::new("/bin/busybox").exists() {
            assert!(is_static_executable(Path::new("/bin/busybox")));
        }
    }
}
