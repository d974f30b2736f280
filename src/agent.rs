//! The agent, in-sandbox side: this same binary, run inside a sandbox as its long-lived
//! process (`arservice agent --socket PATH`), that runs each command with the one spawn
//! helper, so a command costs a unix-socket request instead of a `docker exec`. A command
//! asked with `"stream": true` is answered as NDJSON lines while it runs (`env::stream`).
//!
//! Owns [`serve`] (a tiny_http server on a unix socket, one thread per request) and [`init`]
//! (the agent as PID 1 of its sandbox). What it reads and answers is `env::wire`; the host end
//! (the client, the socket's directory and mounts) is `env::agent`, which never imports this
//! module. The socket lives in a per-instance host directory (mode 0700) bind-mounted into
//! that sandbox only, so no other instance can reach it.

use crate::env::files;
use crate::env::local::find_program;
use crate::env::spawn::{self, ExecResult, Limits, ProcessGroups};
use crate::env::wire::ExecWire;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

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
    for request in server.incoming_requests() {
        let groups = Arc::clone(&groups);
        std::thread::spawn(move || {
            if request.url().starts_with("/files") {
                files(request);
            } else {
                exec(request, &groups);
            }
        });
    }
    Ok(())
}

/// `POST /exec`: one command; with `"stream": true` (and the command startable), a stream
/// of NDJSON lines ([`exec_streamed`]).
fn exec(mut request: tiny_http::Request, groups: &ProcessGroups) {
    let mut body = Vec::new();
    let (status, answer) = match request.as_reader().read_to_end(&mut body) {
        Err(err) => (400, serde_json::json!({"detail": err.to_string()})),
        Ok(_) => match serde_json::from_slice::<ExecWire>(&body) {
            Err(err) => (
                400,
                serde_json::json!({"detail": format!("bad request: {err}")}),
            ),
            Ok(exec) => match exec.limits() {
                Err(err) => (400, serde_json::json!({"detail": err})),
                Ok(limits) => match prepare(&exec) {
                    Err(err) => (500, serde_json::json!({"detail": err})),
                    Ok(prepared) if exec.stream => {
                        return exec_streamed(request, prepared, limits, groups)
                    }
                    Ok(prepared) => match run(prepared, limits, groups, None) {
                        Ok(result) => (200, serde_json::json!(result)),
                        Err(err) => (500, serde_json::json!({"detail": err})),
                    },
                },
            },
        },
    };
    // Always with a Content-Length: tiny_http would send a body of 32 KiB or more
    // chunked (the client reads both; one framing is simpler to reason about).
    let response = tiny_http::Response::from_data(answer.to_string().into_bytes())
        .with_status_code(status)
        .with_chunked_threshold(usize::MAX);
    let _ = request.respond(response);
}

/// `PUT /files?path=P[&mode=M][&tar=1]` writes the body to the file P (or unpacks the tar
/// into the directory P); `GET /files?path=P` answers the file's bytes or the directory's
/// tar, its kind in [`files::KIND_HEADER`]. The paths are absolute (the host resolves them).
fn files(mut request: tiny_http::Request) {
    let query = request
        .url()
        .split_once('?')
        .map_or("", |(_, query)| query)
        .to_string();
    let failed = |err: files::FileError| {
        let body = serde_json::json!({"detail": err.to_string()}).to_string();
        tiny_http::Response::from_data(body.into_bytes())
            .with_status_code(err.status())
            .boxed()
    };
    let answer = match request.method() {
        tiny_http::Method::Put => match files::Upload::from_query(&query)
            .and_then(|upload| files::write(&upload, request.as_reader()))
        {
            Ok(bytes) => {
                let body = serde_json::json!({"bytes": bytes}).to_string();
                tiny_http::Response::from_data(body.into_bytes()).boxed()
            }
            Err(err) => failed(err),
        },
        tiny_http::Method::Get => {
            let path = crate::url::decode_query(&query)
                .into_iter()
                .find(|(key, _)| key == "path")
                .map(|(_, path)| path);
            match path
                .ok_or_else(|| files::FileError::Invalid("no path".into()))
                .and_then(|path| files::resolve(&files::here(), &path))
                .and_then(|path| files::read(&path))
            {
                Ok(download) => {
                    let kind = tiny_http::Header::from_bytes(
                        files::KIND_HEADER.as_bytes(),
                        download.kind.name().as_bytes(),
                    )
                    .expect("a static header");
                    // Streamed piece by piece: tiny_http's `respond` would gather the whole
                    // file (or tar) in memory before its first byte went.
                    let sent = crate::http::respond_streaming(
                        request,
                        200,
                        vec![kind],
                        (download.body, download.length),
                        crate::http::FILE_PIECE_BYTES,
                    );
                    // A host that hung up (its client did) is not worth a word.
                    if let Err(err) = sent {
                        log::debug!("a download stopped: {err}");
                    }
                    return;
                }
                Err(err) => failed(err),
            }
        }
        _ => failed(files::FileError::Invalid("/files takes GET and PUT".into())),
    };
    let _ = request.respond(answer);
}

/// Answers a command as a stream (this thread is not the connection's: its writes are handed
/// to that one): `200`, `application/x-ndjson`, chunked; a `{"output": ...}` line per read
/// of the output (never splitting a UTF-8 sequence), then the answer (`ExecResult`), or
/// `{"detail": ..., "status": 500}` when the command could not run. A host that went away
/// does not stop the command: it runs to its end, its lines dropped.
fn exec_streamed(
    request: tiny_http::Request,
    prepared: Prepared,
    limits: Limits,
    groups: &ProcessGroups,
) {
    use crate::env::stream::{chunk_line, OutputSink, TextChunker, NDJSON};
    use std::io::Write;
    struct Out {
        writer: Box<dyn Write + Send>,
        chunker: TextChunker,
        broken: bool,
    }
    impl Out {
        fn chunk(&mut self, bytes: &[u8]) {
            if self.broken || bytes.is_empty() {
                return;
            }
            let sent = write!(self.writer, "{:x}\r\n", bytes.len())
                .and_then(|()| self.writer.write_all(bytes))
                .and_then(|()| self.writer.write_all(b"\r\n"))
                .and_then(|()| self.writer.flush());
            self.broken = sent.is_err();
        }
        fn text(&mut self, text: &str) {
            if !text.is_empty() {
                self.chunk(&chunk_line(text));
            }
        }
    }
    let mut writer = request.into_writer();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {NDJSON}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    let broken = writer
        .write_all(head.as_bytes())
        .and_then(|()| writer.flush())
        .is_err();
    let out = Arc::new(parking_lot::Mutex::new(Out {
        writer,
        chunker: TextChunker::default(),
        broken,
    }));
    let to_out = Arc::clone(&out);
    let sink = OutputSink::new(move |bytes| {
        let mut out = to_out.lock();
        let text = out.chunker.push(bytes);
        out.text(&text);
    });
    let last = match run(prepared, limits, groups, Some(&sink)) {
        Ok(result) => serde_json::json!(result),
        Err(err) => serde_json::json!({"detail": err, "status": 500}),
    };
    let mut out = out.lock();
    let rest = out.chunker.finish();
    out.text(&rest);
    let mut line = last.to_string().into_bytes();
    line.push(b'\n');
    out.chunk(&line);
    if !out.broken {
        let _ = out
            .writer
            .write_all(b"0\r\n\r\n")
            .and_then(|()| out.writer.flush());
    }
}

/// A command ready to start: its program and its stdin.
struct Prepared {
    command: Command,
    stdin: Option<std::fs::File>,
}

/// Runs one prepared command inside the sandbox, its output also to `sink` as it is read.
fn run(
    prepared: Prepared,
    limits: Limits,
    groups: &ProcessGroups,
    sink: Option<&crate::env::stream::OutputSink>,
) -> Result<ExecResult, String> {
    spawn::run(
        prepared.command,
        prepared.stdin.as_ref(),
        limits,
        groups,
        sink,
    )
    .map_err(|err| format!("cannot run the shell: {err}"))
}

/// The command `exec` names, its `cwd` checked, its stdin held: everything but the start.
fn prepare(exec: &ExecWire) -> Result<Prepared, String> {
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
            return Err(crate::env::not_a_directory(cwd));
        }
        command.current_dir(cwd);
    }
    command.envs(&exec.env);
    let stdin = spawn::stdin_of(exec.stdin.as_deref())
        .map_err(|err| format!("cannot hold the command's stdin: {err}"))?;
    Ok(Prepared { command, stdin })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::agent::{AgentClient, AgentError};
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::time::Duration;

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
        let exec = ExecWire {
            run_id: None,
            cmd: "echo $K; pwd; echo err >&2; exit 4".into(),
            cwd: Some("/".into()),
            // `bash -l` reads $HOME's profile: the test's own, not that of whoever runs it (a
            // machine's root .bashrc ran `pyenv rehash`, whose lock a killed shell left behind,
            // and every login shell then waited 60 s for it).
            env: [
                ("K".to_string(), "V".to_string()),
                ("HOME".to_string(), dir.display().to_string()),
            ]
            .into(),
            timeout: Some(5.0),
            max_output_bytes: Some(1000),
            shell: None,
            stdin: None,
            stream: false,
        };
        let result = client.exec(&exec).unwrap();
        assert_eq!(result.output, "V\n/\nerr\n", "{result:?}");
        assert_eq!(result.returncode, 4);
        let slow = ExecWire {
            cmd: "sleep 30".into(),
            timeout: Some(0.3),
            ..exec.clone()
        };
        let fed = ExecWire {
            cmd: "tr a-z A-Z".into(),
            stdin: Some("one\ntwo\u{0}three".into()),
            ..exec.clone()
        };
        assert_eq!(client.exec(&fed).unwrap().output, "ONE\nTWO\u{0}THREE");
        assert!(client.exec(&slow).unwrap().timed_out);
        // The connection is kept and reused: one idle connection after sequential commands.
        assert_eq!(client.idle_connections(), 1);
        let nowhere = ExecWire {
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

    fn exec_of(cmd: &str, max_output_bytes: usize) -> ExecWire {
        ExecWire {
            run_id: None,
            cmd: cmd.into(),
            cwd: None,
            env: BTreeMap::new(),
            timeout: Some(30.0),
            max_output_bytes: Some(max_output_bytes),
            shell: Some(vec!["sh".into(), "-c".into()]),
            stdin: None,
            stream: false,
        }
    }

    #[test]
    fn a_streamed_command_through_a_real_agent() {
        use crate::env::stream::OutputSink;
        let (client, dir) = real_agent("stream");
        let got = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
        let into = Arc::clone(&got);
        let sink = OutputSink::new(move |bytes| {
            into.lock()
                .push(String::from_utf8(bytes.to_vec()).expect("whole characters"))
        });
        // A character split across two writes arrives whole, in one chunk.
        let exec = exec_of(
            r"printf 'a\n'; sleep 0.3; printf '\342\202'; sleep 0.3; printf '\254\377'",
            100,
        );
        let result = client.exec_streamed(&exec, &sink).unwrap();
        assert_eq!(result.output, "a\n\u{20ac}\u{fffd}");
        let chunks = got.lock().clone();
        assert_eq!(chunks.concat(), result.output, "{chunks:?}");
        assert_eq!(chunks[0], "a\n", "{chunks:?}");
        // The cap is the answer's, not the stream's.
        got.lock().clear();
        let capped = client
            .exec_streamed(&exec_of("head -c 5000 /dev/zero | tr '\\0' x", 100), &sink)
            .unwrap();
        assert!(capped.truncated);
        assert_eq!(got.lock().concat(), "x".repeat(5000));
        // A command that cannot run in its cwd is refused before any stream.
        let nowhere = ExecWire {
            cwd: Some("/nonexistent".into()),
            ..exec
        };
        assert!(matches!(
            client.exec_streamed(&nowhere, &sink),
            Err(AgentError::Refused(500, detail)) if detail.contains("/nonexistent")
        ));
        let _ = std::fs::remove_dir_all(&dir);
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
        assert_eq!(client.idle_connections(), 1);
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
}
