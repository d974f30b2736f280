//! Tests of the `poll` binary against the real `arservice` binary (and, for documents in the
//! original Python service's shape, a stand-in HTTP server that answers with a fixture).
//!
//! `poll` is always run as a separate process, as a user runs it: through a pipe (where it
//! prints once) or on a pseudo-terminal (where it redraws live). Waits poll with a deadline.

mod support;

use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use support::{wait_for, Server};

/// How long one `poll --once` may take before the test fails.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the live view gets to show what a test waits for.
const SCREEN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the stand-in server waits for a test to open its gate.
const GATE_TIMEOUT: Duration = Duration::from_secs(30);

/// The original's `/stats` shape: both revisions of the original at once (the first named the
/// image `container_name`, the later one `container_image` with `updated_at` and `num_cmd`).
const FIXTURE: &str = include_str!("fixtures/original_stats.json");

const CURSOR_HOME: &str = "\x1b[H";
const CLEAR_LINE_END: &str = "\x1b[K";
const CLEAR_BELOW: &str = "\x1b[J";
const CLEAR_SCREEN: &str = "\x1b[2J";
const HIDE_CURSOR: &str = "\x1b[?25l";
const SHOW_CURSOR: &str = "\x1b[?25h";

fn poll_binary() -> &'static str {
    env!("CARGO_BIN_EXE_poll")
}

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).expect("the fixture is JSON")
}

/// What one run of `poll` left behind.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The table rows: lines that start with one of `prefixes`, in order.
    fn rows(&self, prefixes: &[&str]) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|line| prefixes.iter().any(|prefix| line.starts_with(prefix)))
            .collect()
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "poll exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// `poll` with stdout and stderr on pipes and a known environment: no token, no terminal size
/// unless `env` gives one.
fn poll_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(poll_binary());
    command
        .args(args)
        .env_remove("ARS_TOKEN")
        .env_remove("COLUMNS")
        .env_remove("LINES")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `poll` to its end (at most [`POLL_TIMEOUT`]).
fn poll(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut child = poll_command(args, env).spawn().expect("cannot start poll");
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let status = wait_exit(&mut child, POLL_TIMEOUT)
        .unwrap_or_else(|| panic!("poll {args:?} did not exit within {POLL_TIMEOUT:?}"));
    Outcome {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Waits for `child`; kills it and returns `None` after `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Starts a `local` instance whose image is `image`.
fn start_local_image(server: &Server, run_id: &str, image: &str) {
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": run_id, "container_name": image,
                "environment_config": {"container_type": "local"}}),
    );
    assert_eq!(status, 200, "start {run_id}: {body}");
}

/// A stand-in HTTP server on 127.0.0.1 that answers every request with `body` and records
/// each request's head. Dropping it closes its port.
struct StandIn {
    port: u16,
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl StandIn {
    fn start(body: &str) -> StandIn {
        StandIn::start_on(0, body, None)
    }

    /// On `port` (0: any); with a `gate`, every answer waits for a message on it first.
    fn start_on(port: u16, body: &str, gate: Option<mpsc::Receiver<()>>) -> StandIn {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("cannot bind the stand-in");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_requests, thread_stop, body) =
            (Arc::clone(&requests), Arc::clone(&stop), body.to_string());
        let thread = thread::spawn(move || {
            while !thread_stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if let Some(gate) = &gate {
                            let _ = gate.recv_timeout(GATE_TIMEOUT);
                        }
                        answer(stream, &body, &thread_requests);
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(err) => panic!("stand-in accept: {err}"),
                }
            }
        });
        StandIn {
            port,
            url: format!("http://127.0.0.1:{port}"),
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request head, records it, answers `200` with `body` and closes.
fn answer(stream: TcpStream, body: &str, requests: &Mutex<Vec<String>>) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(POLL_TIMEOUT)).unwrap();
    let mut reader = BufReader::new(&stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => head.push_str(&line),
        }
    }
    requests.lock().unwrap().push(head);
    let mut stream = &stream;
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

/// A port nothing listens on: bound, then let go.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn once_prints_a_summary_and_so_does_a_pipe_without_once() {
    let server = Server::start(&["--max-resources", r#"{"instances": 20}"#]);
    server.start_local("run-a");
    server.start_local("run-b");
    for args in [
        vec!["--url", server.url.as_str(), "--once"],
        vec!["--url", server.url.as_str()],
    ] {
        let outcome = poll(&args, &[]);
        assert_eq!(outcome.code(), Some(0), "{outcome:?}");
        assert!(outcome.stderr.is_empty(), "{outcome:?}");
        let out = &outcome.stdout;
        assert!(
            out.starts_with(&format!("arservice  {}", server.url)),
            "{outcome:?}"
        );
        assert!(out.contains("local runner"), "{outcome:?}");
        assert!(out.contains(" UTC"), "server time: {outcome:?}");
        assert!(out.contains("2 running"), "{outcome:?}");
        let instances = out
            .lines()
            .find(|line| line.starts_with("resources  instances"))
            .unwrap();
        assert!(
            instances.contains("2 / 20") && instances.contains("10%"),
            "{outcome:?}"
        );
        assert!(
            instances.contains('█') && instances.contains('░'),
            "a bar: {outcome:?}"
        );
        let images = out.lines().find(|line| line.starts_with("images")).unwrap();
        assert!(images.contains("2  local"), "{outcome:?}");
        assert!(
            !out.contains("RUN ID"),
            "no table without --list: {outcome:?}"
        );
        assert!(
            !out.contains('\x1b'),
            "no escape codes through a pipe: {outcome:?}"
        );
    }
}

/// A warm pool shows as a line of its own: its sandboxes, what they hold, the starts it served.
#[test]
fn once_shows_a_warm_pool_and_what_it_holds() {
    let dir = std::env::temp_dir().join(format!("ars-poll-pool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let presets = dir.join("environments.json");
    std::fs::write(
        &presets,
        json!({"lp": {"container_type": "local", "pool": {"size": 2}}}).to_string(),
    )
    .unwrap();
    let server = Server::start(&[
        "--environments",
        presets.to_str().unwrap(),
        "--max-resources",
        r#"{"instances": 4}"#,
    ]);
    let pool = || server.get("/stats").1["pools"]["lp"].clone();
    let idle = |taken: u64| {
        wait_for(Duration::from_secs(30), "the pool to be full", || {
            let pool = pool();
            (pool["idle"] == 2 && pool["taken"] == taken).then_some(())
        })
    };
    idle(0);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "from-pool", "container_name": "lp"}),
    );
    assert_eq!(status, 200, "{body}");
    idle(1);
    let outcome = poll(&["--url", &server.url, "--once"], &[]);
    assert_eq!(outcome.code(), Some(0), "{outcome:?}");
    let line = outcome
        .stdout
        .lines()
        .find(|line| line.starts_with("pools "))
        .unwrap_or_else(|| panic!("no pools line: {outcome:?}"));
    assert_eq!(
        line, "pools      lp  2 idle, 0 starting of 2 · pooled 2 instances · 1 taken, 0 missed",
        "{outcome:?}"
    );
    let instances = outcome
        .stdout
        .lines()
        .find(|line| line.starts_with("resources  instances"))
        .unwrap();
    assert!(
        instances.contains("3 / 4"),
        "the run and the pool: {outcome:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn raw_prints_the_stats_json_pretty() {
    let server = Server::start(&[]);
    server.start_local("run-a");
    let outcome = poll(&["--url", &server.url, "--raw", "--once"], &[]);
    assert_eq!(outcome.code(), Some(0), "{outcome:?}");
    let stats: Value = serde_json::from_str(&outcome.stdout)
        .unwrap_or_else(|err| panic!("not JSON ({err}): {outcome:?}"));
    assert_eq!(stats["active_instances"], 1, "{stats}");
    assert_eq!(stats["instances"][0]["run_id"], "run-a", "{stats}");
    assert!(
        outcome.stdout.lines().count() > 10,
        "pretty, one key a line: {outcome:?}"
    );
}

/// Runs `cmd` on `run_id` with `"stream": true` and reads the answer to its end: its lines.
fn streamed(url: &str, run_id: &str, cmd: &str) -> Vec<Value> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(POLL_TIMEOUT * 4))
        .build()
        .new_agent();
    let mut response = agent
        .post(&format!("{url}/execute_command"))
        .send(json!({"run_id": run_id, "cmd": cmd, "stream": true}).to_string())
        .expect("the streamed command's request");
    assert_eq!(response.status().as_u16(), 200);
    BufReader::new(response.body_mut().as_reader())
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).expect("an NDJSON line"))
        .collect()
}

#[test]
fn list_shows_a_fork_s_source_and_its_running_stream() {
    let server = Server::start(&[]);
    let _close = support::CloseAll(&server);
    server.start_local("poll-src");
    let (status, body) = server.post(
        "/fork_instance",
        &json!({"run_id": "poll-src", "new_run_id": "poll-fork"}),
    );
    assert_eq!(status, 200, "{body}");
    // The streamed command runs until the test lets it end (a file appears).
    let gate = support::TempDir::new("poll-stream");
    let marker = gate.path().join("done");
    let cmd = format!(
        "echo started; while [ ! -e '{}' ]; do sleep 0.05; done; echo ended",
        marker.display()
    );
    let url = server.url.clone();
    let stream = thread::spawn(move || streamed(&url, "poll-fork", &cmd));
    let env = [("COLUMNS", "160")];
    let list = || poll(&["--url", &server.url, "--list", "--once"], &env);
    let row = |outcome: &Outcome, run_id: &str| -> Vec<String> {
        outcome.rows(&[run_id])[0]
            .split("  ")
            .map(str::trim)
            .filter(|cell| !cell.is_empty())
            .map(String::from)
            .collect()
    };

    let running = support::wait_for(POLL_TIMEOUT, "poll showing the stream", || {
        let outcome = list();
        assert_eq!(outcome.code(), Some(0), "{outcome:?}");
        outcome
            .stdout
            .contains("commands   1 running · 1 streaming · 1 streamed since launch")
            .then_some(outcome)
    });
    assert!(
        running
            .stdout
            .contains("2 running · 2 started since launch · 1 forked\n"),
        "{running:?}"
    );
    assert!(running.stdout.contains("FORK OF"), "{running:?}");
    let fork = row(&running, "poll-fork");
    assert_eq!(fork[1], "poll-src", "the fork's source: {running:?}");
    assert_eq!(fork.last().unwrap(), "streaming", "{running:?}");
    let source = row(&running, "poll-src");
    assert_eq!(source[1], "-", "{running:?}");
    assert_eq!(source.last().unwrap(), "idle", "{running:?}");

    std::fs::write(&marker, "").unwrap();
    let lines = stream.join().unwrap();
    let last = lines.last().unwrap();
    assert_eq!(last["result"]["returncode"], 0, "{lines:?}");
    assert_eq!(last["result"]["output"], "started\nended\n", "{lines:?}");

    let ended = support::wait_for(POLL_TIMEOUT, "poll showing the stream ended", || {
        let outcome = list();
        outcome
            .stdout
            .contains("commands   0 running · 0 streaming · 1 streamed since launch")
            .then_some(outcome)
    });
    let fork = row(&ended, "poll-fork");
    assert_eq!(
        (fork[1].as_str(), fork.last().unwrap().as_str()),
        ("poll-src", "idle"),
        "{ended:?}"
    );
}

#[test]
fn list_shows_every_instance_longest_idle_first() {
    let server = Server::start(&[]);
    server.start_local("run-a");
    server.start_local("run-b");
    server.start_local("run-c");
    server.exec("run-a", "true");
    let outcome = poll(&["--url", &server.url, "--list", "--once"], &[]);
    assert_eq!(outcome.code(), Some(0), "{outcome:?}");
    let header = outcome.rows(&["RUN ID"]);
    assert_eq!(header.len(), 1, "{outcome:?}");
    for title in ["IMAGE", "TYPE", "AGE", "IDLE", "CMDS", "STATE"] {
        assert!(header[0].contains(title), "{title}: {outcome:?}");
    }
    let rows = outcome.rows(&["run-"]);
    let order: Vec<&str> = rows
        .iter()
        .map(|row| row.split_whitespace().next().unwrap())
        .collect();
    // Never used, the older first; then the one that just ran a command.
    assert_eq!(order, ["run-b", "run-c", "run-a"], "{outcome:?}");
    let words = |row: &str| {
        row.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let used = words(rows[2]);
    assert_eq!(
        used[1..3],
        ["local", "local"],
        "image and type: {outcome:?}"
    );
    assert_eq!(used[used.len() - 2..], ["1", "idle"], "{outcome:?}");
    let unused = words(rows[0]);
    assert_eq!(
        unused[unused.len() - 3..],
        ["never", "0", "unused"],
        "{outcome:?}"
    );
    assert!(!outcome.stdout.contains("more instances"), "{outcome:?}");
}

#[test]
fn list_fits_the_terminal_and_counts_the_rest() {
    const INSTANCES: usize = 12;
    const COLUMNS: usize = 60;
    const LINES: usize = 16;
    let server = Server::start(&["--max-resources", r#"{"instances": 20}"#]);
    for n in 0..INSTANCES {
        start_local_image(
            &server,
            &format!("run-{n:02}"),
            "xingyaoww/sweb.eval.x86_64.python_s_mypy-5617:latest",
        );
    }
    let (columns, lines) = (COLUMNS.to_string(), LINES.to_string());
    let outcome = poll(
        &["--url", &server.url, "--list"],
        &[("COLUMNS", &columns), ("LINES", &lines)],
    );
    assert_eq!(outcome.code(), Some(0), "{outcome:?}");
    assert!(outcome.stdout.lines().count() <= LINES, "{outcome:?}");
    for line in outcome.stdout.lines() {
        assert!(
            line.chars().count() <= COLUMNS,
            "too wide: {line:?}\n{outcome:?}"
        );
    }
    let shown = outcome.rows(&["run-"]).len();
    let more = outcome
        .stdout
        .lines()
        .find_map(|line| {
            line.strip_prefix("… ")?
                .strip_suffix(" more instances (narrow with --run-id / --container)")
        })
        .unwrap_or_else(|| panic!("no 'more instances' line: {outcome:?}"));
    assert!(shown > 0, "{outcome:?}");
    assert_eq!(
        shown + more.parse::<usize>().unwrap(),
        INSTANCES,
        "{outcome:?}"
    );
    // The image is cut in the middle: its start and its tag stay readable.
    assert!(
        outcome.stdout.contains("…") && outcome.stdout.contains(":latest"),
        "{outcome:?}"
    );
}

#[test]
fn run_id_and_container_filters_narrow_the_view() {
    let server = Server::start(&[]);
    start_local_image(&server, "eval-1", "alpha/img:1");
    start_local_image(&server, "eval-2", "beta/img:2");
    start_local_image(&server, "other-1", "alpha/img:1");
    let listed = |filters: &[&str]| {
        let mut args = vec!["--url", server.url.as_str(), "--list", "--once"];
        args.extend_from_slice(filters);
        let outcome = poll(&args, &[]);
        assert_eq!(outcome.code(), Some(0), "{outcome:?}");
        let mut run_ids: Vec<String> = outcome
            .rows(&["eval-", "other-"])
            .iter()
            .map(|row| row.split_whitespace().next().unwrap().to_string())
            .collect();
        run_ids.sort();
        (run_ids, outcome)
    };
    let (run_ids, outcome) = listed(&["--run-id", "eval"]);
    assert_eq!(run_ids, ["eval-1", "eval-2"], "{outcome:?}");
    assert!(
        outcome
            .stdout
            .contains(r#"2 of 3 running match run_id ~ "eval""#),
        "{outcome:?}"
    );
    // `/` and `:` travel percent-encoded and the server decodes them.
    let (run_ids, outcome) = listed(&["--container", "alpha/img:1"]);
    assert_eq!(run_ids, ["eval-1", "other-1"], "{outcome:?}");
    let (run_ids, outcome) = listed(&["--run-id", "eval", "--container", "alpha"]);
    assert_eq!(run_ids, ["eval-1"], "{outcome:?}");
    let (run_ids, outcome) = listed(&["--run-id", "nothing-matches"]);
    assert!(run_ids.is_empty(), "{outcome:?}");
    assert!(
        outcome.stdout.contains("no instance matches the filters"),
        "{outcome:?}"
    );

    let outcome = poll(
        &["--url", &server.url, "--raw", "--once", "--run-id", "eval"],
        &[],
    );
    let stats: Value = serde_json::from_str(&outcome.stdout).expect("--raw is JSON");
    assert_eq!(stats["active_instances"], 2, "{stats}");
    assert_eq!(stats["total_instances"], 3, "{stats}");
}

#[test]
fn filters_and_token_are_sent_encoded() {
    let stand_in = StandIn::start(FIXTURE);
    let outcome = poll(
        &[
            "--url",
            &format!("{}/", stand_in.url),
            "--once",
            "--run-id",
            "a b&c/d",
            "--container",
            "img:1+x",
            "--token",
            "t0ken",
        ],
        &[],
    );
    assert_eq!(outcome.code(), Some(0), "{outcome:?}");
    let requests = stand_in.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let request_line = requests[0].lines().next().unwrap();
    assert_eq!(
        request_line,
        "GET /stats?run_id=a%20b%26c%2Fd&container_name=img%3A1%2Bx HTTP/1.1"
    );
    assert!(
        requests[0]
            .lines()
            .any(|line| line.eq_ignore_ascii_case("authorization: bearer t0ken")),
        "{requests:?}"
    );
}

#[test]
fn an_unreachable_server_is_one_line_naming_the_url_and_exit_1() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    for extra in [&["--once"][..], &["--once", "--list"], &["--raw"]] {
        let mut args = vec!["--url", url.as_str()];
        args.extend_from_slice(extra);
        let outcome = poll(&args, &[]);
        assert_eq!(outcome.code(), Some(1), "{outcome:?}");
        assert!(outcome.stdout.is_empty(), "{outcome:?}");
        assert_eq!(outcome.stderr.lines().count(), 1, "{outcome:?}");
        assert!(
            outcome.stderr.starts_with(&format!(
                "poll: cannot reach arservice at {url}: connection refused"
            )),
            "{outcome:?}"
        );
    }
}

#[test]
fn a_token_server_needs_the_token_and_its_detail_is_shown() {
    let server = Server::start(&["--token", "s3cret"]);
    let (status, refusal) = server.get("/stats");
    assert_eq!(status, 401, "{refusal}");
    let detail = refusal["detail"].as_str().unwrap();

    let outcome = poll(&["--url", &server.url, "--once"], &[]);
    assert_eq!(outcome.code(), Some(1), "{outcome:?}");
    assert!(
        outcome.stderr.contains(detail),
        "the server's detail: {outcome:?}"
    );
    assert!(outcome.stderr.contains("401"), "{outcome:?}");
    assert!(
        outcome.stderr.contains("pass --token or set ARS_TOKEN"),
        "{outcome:?}"
    );

    let outcome = poll(&["--url", &server.url, "--once", "--token", "wrong"], &[]);
    assert_eq!(outcome.code(), Some(1), "{outcome:?}");
    assert!(outcome.stderr.contains("was refused"), "{outcome:?}");

    let outcome = poll(&["--url", &server.url, "--once", "--token", "s3cret"], &[]);
    assert_eq!(outcome.code(), Some(0), "{outcome:?}");
    assert!(outcome.stdout.contains("0 running"), "{outcome:?}");

    let outcome = poll(
        &["--url", &server.url, "--once"],
        &[("ARS_TOKEN", "s3cret")],
    );
    assert_eq!(outcome.code(), Some(0), "{outcome:?}");
}

#[test]
fn a_closed_pipe_ends_quietly_with_0() {
    let (gate, gate_rx) = mpsc::channel();
    let big = json!({"instances": (0..2000)
        .map(|n| json!({"run_id": format!("run-{n}"), "environment_config": {}}))
        .collect::<Vec<_>>()})
    .to_string();
    let stand_in = StandIn::start_on(0, &big, Some(gate_rx));
    let mut child = poll_command(&["--url", &stand_in.url, "--raw", "--once"], &[])
        .spawn()
        .expect("cannot start poll");
    // The reader goes away before poll has anything to write, as `head` does when done.
    drop(child.stdout.take());
    let stderr = drain(child.stderr.take().unwrap());
    gate.send(()).unwrap();
    let status = wait_exit(&mut child, POLL_TIMEOUT).expect("poll did not exit");
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(stderr.is_empty(), "quietly: {stderr}");
}

#[test]
fn the_original_stats_document_renders() {
    let stand_in = StandIn::start(FIXTURE);
    let env = [("COLUMNS", "120")];
    let outcome = poll(&["--url", &stand_in.url, "--list", "--once"], &env);
    assert_eq!(outcome.code(), Some(0), "{outcome:?}");
    let out = &outcome.stdout;
    assert!(
        out.contains("up 1d02h · 2024-06-01 12:00:00 UTC"),
        "{outcome:?}"
    );
    assert!(out.contains("3 running"), "{outcome:?}");
    let resource = |key: &str| {
        out.lines()
            .find(|line| line.contains(&format!(" {key} ")))
            .unwrap_or_else(|| panic!("no {key} line: {outcome:?}"))
    };
    assert!(resource("instances").contains(" 3 / 10") && resource("instances").contains("30%"));
    assert!(resource("cpus").contains(" 6 / 32") && resource("cpus").contains("19%"));
    assert!(
        out.contains("2  xingyaoww/sweb.eval.x86_64.python_s_mypy-5617:latest"),
        "{outcome:?}"
    );
    assert!(out.contains("1  python:3.11-slim"), "{outcome:?}");
    let rows: Vec<Vec<&str>> = outcome
        .rows(&["eval-run-", "scratch-"])
        .iter()
        .map(|row| row.split_whitespace().collect())
        .collect();
    // Quiet for 1h (never used), then 15m, then 10s; times count from the server's clock.
    let expected = [
        ["eval-run-002", "docker", "1h00m", "never", "0", "unused"],
        [
            "scratch-003",
            "singularity",
            "20m00s",
            "15m00s",
            "3",
            "idle",
        ],
        ["eval-run-001", "docker", "2h00m", "10s", "42", "idle"],
    ];
    assert_eq!(rows.len(), expected.len(), "{outcome:?}");
    for (row, expected) in rows.iter().zip(expected) {
        assert_eq!(row[0], expected[0], "{outcome:?}");
        assert_eq!(row[2..], expected[1..], "{outcome:?}");
    }

    // Each revision of the original alone, and documents with keys missing or mistyped.
    let mut first_revision = fixture();
    let mut later_revision = fixture();
    for instance in first_revision["instances"].as_array_mut().unwrap() {
        let instance = instance.as_object_mut().unwrap();
        for key in ["container_image", "updated_at", "num_cmd"] {
            instance.remove(key);
        }
    }
    for instance in later_revision["instances"].as_array_mut().unwrap() {
        instance.as_object_mut().unwrap().remove("container_name");
    }
    for (document, must_show) in [
        (first_revision, "python:3.11-slim"),
        (later_revision, "python:3.11-slim"),
        (json!({}), "running: unknown"),
        (
            json!({"instances": [{}], "max_resources": {"instances": "ten"}}),
            "?",
        ),
        (
            json!({"instances": null, "server_time": "noon"}),
            "no instances",
        ),
    ] {
        let stand_in = StandIn::start(&document.to_string());
        let outcome = poll(&["--url", &stand_in.url, "--list", "--once"], &env);
        assert_eq!(outcome.code(), Some(0), "{document}: {outcome:?}");
        assert!(
            outcome.stdout.contains(must_show),
            "{document}: {outcome:?}"
        );
    }
}

/// The JSON type of a value, by name.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[test]
fn stats_keeps_every_key_and_type_of_the_original() {
    let original = fixture();
    let mut top_keys: Vec<&str> = original
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut declared = arservice::service::ORIGINAL_STATS_KEYS.to_vec();
    top_keys.sort();
    declared.sort();
    assert_eq!(
        top_keys, declared,
        "the fixture and ORIGINAL_STATS_KEYS disagree"
    );

    let server = Server::start(&["--max-resources", r#"{"instances": 10, "cpus": 32}"#]);
    for run_id in ["eval-run-001", "eval-run-002"] {
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": "local",
                    "environment_config": {"container_type": "local", "resources": {"cpus": 2}}}),
        );
        assert_eq!(status, 200, "{body}");
    }
    server.exec("eval-run-001", "true");
    let (status, stats) = server.get("/stats");
    assert_eq!(status, 200, "{stats}");

    for (key, value) in original.as_object().unwrap() {
        let ours = stats
            .get(key)
            .unwrap_or_else(|| panic!("/stats lacks {key}: {stats}"));
        assert_eq!(kind(ours), kind(value), "{key}: {stats}");
    }
    // The maps of resources and of images hold numbers, as the original's do.
    for key in [
        "max_resources",
        "allocated_resources",
        "available_resources",
        "container_counts",
    ] {
        for (name, amount) in stats[key].as_object().unwrap() {
            assert_eq!(kind(amount), "number", "{key}.{name}: {stats}");
        }
    }
    // Each instance of the fixture against the server's instance in the same situation:
    // one that ran a command (`updated_at` a number), one that never did (`null`).
    let ours = stats["instances"].as_array().unwrap();
    for instance in original["instances"].as_array().unwrap() {
        let used = !instance["updated_at"].is_null();
        let twin = ours
            .iter()
            .find(|candidate| candidate["updated_at"].is_null() != used)
            .unwrap_or_else(|| panic!("no instance with used={used}: {stats}"));
        for (key, value) in instance.as_object().unwrap() {
            let mine = twin
                .get(key)
                .unwrap_or_else(|| panic!("instances[] lacks {key}: {twin}"));
            assert_eq!(kind(mine), kind(value), "instances[].{key}: {twin}");
        }
    }
}

/// A pseudo-terminal: `poll` writes to its slave side as to a terminal; the test reads the
/// master side.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

impl Pty {
    fn open(rows: u16, columns: u16) -> Pty {
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize {
            ws_row: rows,
            ws_col: columns,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors into our integers; a null name and termios
        // are allowed, and `size` outlives the call.
        let opened = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty succeeded: both are open descriptors that nothing else owns.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        for fd in [&master, &slave] {
            // SAFETY: F_SETFD on a descriptor we own; other tests' children must not inherit it.
            let set = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            assert_eq!(set, 0, "fcntl: {}", std::io::Error::last_os_error());
        }
        Pty { master, slave }
    }

    fn stdio(&self) -> Stdio {
        Stdio::from(self.slave.try_clone().unwrap())
    }

    /// Everything written to the terminal, collected on a thread.
    fn screen(self) -> Arc<Mutex<Vec<u8>>> {
        let screen = Arc::new(Mutex::new(Vec::new()));
        let collected = Arc::clone(&screen);
        drop(self.slave);
        let mut master = File::from(self.master);
        thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            // Ends with EIO once no process holds the slave side any more.
            while let Ok(read) = master.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                collected.lock().unwrap().extend_from_slice(&buffer[..read]);
            }
        });
        screen
    }
}

/// Waits until `check` holds for the terminal's output from byte `from` on.
fn wait_screen(screen: &Mutex<Vec<u8>>, from: usize, what: &str, check: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + SCREEN_TIMEOUT;
    loop {
        let text = String::from_utf8_lossy(&screen.lock().unwrap()[from..]).into_owned();
        if check(&text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; the terminal shows:\n{text:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn live_mode_redraws_in_place_survives_a_restart_and_restores_the_cursor() {
    let first = StandIn::start(FIXTURE);
    let port = first.port;
    let pty = Pty::open(30, 100);
    let mut child = Command::new(poll_binary())
        .args(["--url", &first.url, "--list", "--interval", "0.1"])
        .env_remove("ARS_TOKEN")
        .stdin(Stdio::null())
        .stdout(pty.stdio())
        .stderr(pty.stdio())
        .spawn()
        .expect("cannot start poll");
    let screen = pty.screen();

    wait_screen(&screen, 0, "two frames", |text| {
        text.matches("eval-run-002").count() >= 2
    });
    {
        let text = String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
        assert!(text.starts_with(HIDE_CURSOR), "{text:?}");
        for sequence in [CURSOR_HOME, CLEAR_LINE_END, CLEAR_BELOW] {
            assert!(text.contains(sequence), "{sequence:?} in {text:?}");
        }
        assert!(!text.contains(CLEAR_SCREEN), "never a full clear: {text:?}");
        // Every line of a frame fits in 99 columns: it never wraps.
        for frame in text.split(CURSOR_HOME).skip(1) {
            for line in frame.split(CLEAR_LINE_END) {
                let visible = line.trim_start_matches(['\r', '\n']);
                assert!(visible.chars().count() < 100, "{visible:?}");
            }
        }
    }

    drop(first);
    let gone = screen.lock().unwrap().len();
    let unreachable = format!("cannot reach arservice at http://127.0.0.1:{port}");
    wait_screen(&screen, gone, "the unreachable line", |text| {
        text.contains(&unreachable)
    });

    let back = screen.lock().unwrap().len();
    let _second = StandIn::start_on(port, FIXTURE, None);
    wait_screen(&screen, back, "a frame once the server is back", |text| {
        text.contains("eval-run-002")
    });

    // SAFETY: kill only sends SIGINT to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = wait_exit(&mut child, POLL_TIMEOUT).expect("poll did not exit on SIGINT");
    assert_eq!(status.code(), Some(0));
    wait_screen(&screen, 0, "the cursor shown again", |text| {
        text.rfind(SHOW_CURSOR) > text.rfind(HIDE_CURSOR)
    });
}
