//! Test support: the real `arservice` binary on port 0, killed on drop, its log printed when
//! a test fails; a small HTTP client; deadline polling instead of fixed sleeps.
#![allow(dead_code)]

pub mod flavor;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server gets to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_arservice")
}

/// A running server. Its stderr is collected; on drop it is killed, and when the test is
/// failing (panicking) its log is printed.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub port: u16,
    pub state_dir: PathBuf,
    _temp: TempDir,
    log: Arc<Mutex<String>>,
}

/// Options for [`Server::start_with`].
#[derive(Default)]
pub struct Options<'a> {
    pub args: Vec<&'a str>,
    pub env: Vec<(&'a str, &'a str)>,
}

impl Server {
    /// `arservice --runner local --port 0` plus `args`, with a fresh state dir.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with(Options {
            args: args.to_vec(),
            env: Vec::new(),
        })
    }

    /// [`Server::start`] under an open-files limit (soft and hard, the shell's `ulimit -n`).
    pub fn start_with_open_files(args: &[&str], files: u32) -> Server {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {files} && exec \"$0\" \"$@\""))
            .arg(binary());
        Server::launch(
            command,
            TempDir::new("server"),
            Options {
                args: args.to_vec(),
                env: Vec::new(),
            },
        )
    }

    pub fn start_with(options: Options) -> Server {
        Server::launch(Command::new(binary()), TempDir::new("server"), options)
    }

    /// [`Server::start_with`] as `user`, as rootless podman runs: the server's temporary
    /// directory (its state dir's parent) is the user's.
    /// The binary runs from a copy `user` can read ([`TestUser::binary`]), in the temporary
    /// directory; an `--agent` that names the binary under test names that copy too.
    pub fn start_as(user: &TestUser, options: Options) -> Server {
        let temp = TempDir::new("server");
        user.chown(temp.path());
        let copy = user.binary();
        let args = options
            .args
            .iter()
            .map(|arg| if *arg == binary() { copy } else { arg })
            .collect();
        let options = Options {
            args,
            env: options.env,
        };
        let mut command = user.command(copy);
        // Not the checkout, which the user may not enter (podman changes to its caller's
        // directory first).
        command.current_dir(temp.path());
        Server::launch(command, temp, options)
    }

    /// Runs `command` (the server binary, maybe behind a wrapper) with `options`.
    fn launch(mut command: Command, temp: TempDir, options: Options) -> Server {
        let given = |flag: &str| {
            options
                .args
                .iter()
                .position(|arg| *arg == flag)
                .and_then(|index| options.args.get(index + 1))
        };
        let state_dir = given("--state-dir")
            .map(PathBuf::from)
            .unwrap_or_else(|| temp.path().join("state"));
        command.args(["--port", "0", "--log-level", "debug"]);
        if given("--runner").is_none() {
            command.args(["--runner", "local"]);
        }
        if given("--state-dir").is_none() {
            command.arg("--state-dir").arg(&state_dir);
        }
        command
            .args(&options.args)
            .envs(options.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("cannot start arservice");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let thread_log = Arc::clone(&log);
        thread::spawn(move || {
            let mut port_tx = Some(port_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line
                    .split("listening on http://")
                    .nth(1)
                    .and_then(|rest| rest.split(':').nth(1))
                    .and_then(|rest| rest.split(' ').next())
                    .and_then(|port| port.parse::<u16>().ok())
                {
                    if let Some(tx) = port_tx.take() {
                        let _ = tx.send(port);
                    }
                }
                let mut log = thread_log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let port = match port_rx.recv_timeout(START_TIMEOUT) {
            Ok(port) => port,
            Err(_) => {
                let _ = child.kill();
                panic!("arservice did not start; its log:\n{}", log.lock().unwrap());
            }
        };
        Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
            state_dir,
            _temp: temp,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        request("GET", &format!("{}{path}", self.url), None)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        request(
            "POST",
            &format!("{}{path}", self.url),
            Some(body.to_string().as_bytes()),
        )
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        request("POST", &format!("{}{path}", self.url), Some(body))
    }

    /// Starts a `local` instance and asserts it worked.
    pub fn start_local(&self, run_id: &str) {
        let (status, body) = self.post(
            "/start_instance",
            &serde_json::json!({"run_id": run_id, "container_name": "local",
                                 "environment_config": {"container_type": "local"}}),
        );
        assert_eq!(status, 200, "start {run_id}: {body}");
    }

    /// The Slurm job id of instance `run_id`, from `/stats`.
    pub fn job_of(&self, run_id: &str) -> String {
        let (_, stats) = self.get(&format!("/stats?run_id={run_id}"));
        stats["instances"][0]["job_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no job_id for {run_id}: {stats}"))
            .to_string()
    }

    /// The pid of the server in the Slurm job of `run_id`, from the `ready.json` it wrote.
    pub fn job_server_pid(&self, run_id: &str) -> i32 {
        let ready = self
            .state_dir
            .join("instances")
            .join(run_id)
            .join("ready.json");
        let text = std::fs::read_to_string(&ready)
            .unwrap_or_else(|err| panic!("{}: {err}", ready.display()));
        let ready: Value = serde_json::from_str(&text).unwrap();
        ready["pid"].as_i64().expect("pid in ready.json") as i32
    }

    /// Runs a command and returns the `result` object, asserting a 200.
    pub fn exec(&self, run_id: &str, cmd: &str) -> Value {
        let (status, body) = self.post(
            "/execute_command",
            &serde_json::json!({"run_id": run_id, "cmd": cmd}),
        );
        assert_eq!(status, 200, "exec {cmd:?}: {body}");
        body["result"].clone()
    }

    /// Sends a signal to the server.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill only sends a signal to our own child.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// Waits for the server to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Resident memory of the server in KiB (current, peak).
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|line| line.starts_with(name))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
                .unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// How long a dropped server gets to close what is left (a failing test leaves instances
/// open) before it is killed: containers, jobs and mounts must not outlive the test.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill only sends a signal to our own child.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
            if self.wait_exit(SHUTDOWN_GRACE).is_none() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- arservice log ----\n{}", self.log());
        }
    }
}

/// One HTTP request with a fresh connection; any status is returned, not an error.
pub fn request(method: &str, url: &str, body: Option<&[u8]>) -> (u16, Value) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent();
    let response = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        (_, Some(body)) => agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(body),
        (_, None) => agent.post(url).send_empty(),
    };
    let mut response = response.unwrap_or_else(|err| panic!("{method} {url}: {err}"));
    let status = response.status().as_u16();
    let mut text = String::new();
    response
        .body_mut()
        .as_reader()
        .read_to_string(&mut text)
        .unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|err| {
        panic!("{method} {url} answered {status} with non-JSON {text:?}: {err}")
    });
    (status, value)
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The Slurm job's state as `squeue` shows it; empty once it left the queue.
pub fn queue_state(job: &str) -> String {
    let out = Command::new("squeue")
        .args(["--noheader", "--format=%T", "--jobs", job])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// True while a process with this pid exists.
/// The lines `command` printed on stdout.
pub fn stdout_lines(command: &mut Command) -> Vec<String> {
    let out = command
        .output()
        .unwrap_or_else(|err| panic!("{command:?}: {err}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("arservice-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Closes every instance of a server when dropped, whether the test passed or not: a server
/// is killed at the end of a test, not shut down, and would leave its containers, processes
/// and mounts on the machine. Never panics (it also runs while a test fails).
pub struct CloseAll<'a>(pub &'a Server);

impl Drop for CloseAll<'_> {
    fn drop(&mut self) {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .new_agent();
        let Some(stats) = agent
            .get(format!("{}/stats", self.0.url))
            .call()
            .ok()
            .and_then(|mut response| response.body_mut().read_to_string().ok())
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        else {
            return;
        };
        for instance in stats["instances"].as_array().into_iter().flatten() {
            if let Some(run_id) = instance["run_id"].as_str() {
                let _ = agent
                    .post(format!("{}/close_instance", self.0.url))
                    .header("Content-Type", "application/json")
                    .send(serde_json::json!({"run_id": run_id}).to_string());
            }
        }
    }
}

/// The rule for a test whose tool is missing: in CI (`CI=true`) it fails with `message`;
/// elsewhere it says `SKIPPED` and the test returns. `ready` when the tool is there.
pub fn require(ready: bool, message: &str) -> bool {
    if !ready {
        assert!(
            std::env::var("CI").map_or(true, |ci| ci != "true"),
            "{message}"
        );
        eprintln!("SKIPPED (not in CI): {message}");
    }
    ready
}

/// The agent the tests give sandboxes: `ARSERVICE_TEST_AGENT`, else the binary under test
/// (static by default: `.cargo/config.toml`).
pub fn agent_binary() -> String {
    std::env::var("ARSERVICE_TEST_AGENT").unwrap_or_else(|_| binary().to_string())
}

/// The static agent build, or `None` (see [`require`]) when it was not built.
pub fn static_agent() -> Option<String> {
    let agent = agent_binary();
    let built = arservice::env::agent::elf::is_static_executable(Path::new(&agent));
    require(
        built,
        &format!("{agent} is not static: build with the flags of .cargo/config.toml"),
    )
    .then_some(agent)
}

/// The test bed's unprivileged user for rootless podman (`.ci/testbed.sh`).
pub const ROOTLESS_USER: &str = "arservice-rootless";

/// An unprivileged user of this machine, and what its rootless podman needs.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    /// `XDG_RUNTIME_DIR`: no login session makes it here, the test bed does.
    pub runtime_dir: String,
}

impl TestUser {
    /// The user from `/etc/passwd`, or `None` when there is no such user.
    pub fn lookup(name: &str) -> Option<TestUser> {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        let fields: Vec<&str> = passwd
            .lines()
            .map(|line| line.split(':').collect::<Vec<_>>())
            .find(|fields| fields.len() >= 7 && fields[0] == name)?;
        let uid: u32 = fields[2].parse().ok()?;
        Some(TestUser {
            name: name.to_string(),
            uid,
            gid: fields[3].parse().ok()?,
            home: fields[5].to_string(),
            runtime_dir: format!("/run/user/{uid}"),
        })
    }

    /// `program` run as this user (`setpriv` execs it: the child is the program itself),
    /// with the environment of a login of its own.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .args(["--init-groups", "--"])
            .arg(program)
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("XDG_RUNTIME_DIR", &self.runtime_dir);
        command
    }

    /// A copy of the binary under test that this user can read and run: the checkout may sit
    /// in a directory only root can enter (a fresh clone in `mktemp -d`), and the server reads
    /// its `--agent` to check that it is static. One copy per checkout, made again (under a
    /// temporary name, then renamed) by each test process; copies of other checkouts go once a day
    /// old ([`remove_stale_copies`]).
    pub fn binary(&self) -> &'static str {
        static COPY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        COPY.get_or_init(|| {
            use std::hash::{Hash, Hasher};
            use std::os::unix::fs::PermissionsExt;
            let mut checkout = std::collections::hash_map::DefaultHasher::new();
            binary().hash(&mut checkout);
            let dir = std::env::temp_dir().join(format!("arservice-bin-{:x}", checkout.finish()));
            remove_stale_copies(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let partial = dir.join(format!("arservice.{}", std::process::id()));
            std::fs::copy(binary(), &partial).unwrap();
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)).unwrap();
            let copy = dir.join("arservice");
            std::fs::rename(&partial, &copy).unwrap();
            copy.to_string_lossy().into_owned()
        })
    }

    /// Gives `path` (not what is in it) to this user.
    pub fn chown(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).unwrap();
    }
}

/// Removes the binary copies of other checkouts (each CI run's fresh clone makes its own, about
/// 30-70 MB) once nothing has used them for a day: every test process that uses one renames a
/// new copy into its directory, so a directory a day old belongs to no run in progress.
fn remove_stale_copies(ours: &Path) {
    const STALE: Duration = Duration::from_secs(24 * 3600);
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_copy = entry
            .file_name()
            .to_string_lossy()
            .starts_with("arservice-bin-");
        let stale = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > STALE);
        if is_copy && stale && path != ours {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}
