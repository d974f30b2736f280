//! Tests that attack the server the way issue 13 found it could be attacked, against the real
//! binary: a planted or foreign state dir, symlinks inside it, instance files other users can
//! read, bubblewrap instances that see each other and the server, clients that reach the host
//! through config fields, a health round that runs a client's program, model keys and tokens
//! that reach sandboxes and Slurm jobs, secrets on command lines and in `/stats`, adoption of
//! another user's Slurm job, containers without a pids limit, and a start-up log that does not
//! say who may run what.
//!
//! Each of these failed on the code before the fix. Tools that are missing (docker, bwrap,
//! Slurm, the static agent) skip their part with a loud line, except in CI, where they fail.

mod support;

use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{binary, queue_state, wait_for, CloseAll, Server, TempDir};

/// The user that plays "another user of this machine".
const NOBODY: u32 = 65534;

/// The test bed's root filesystem with bash (see `.ci/testbed.sh`).
const ROOTFS: &str = "/var/lib/arservice-testbed/rootfs-bash";
const IMAGE_BUSYBOX: &str = "arservice-test/busybox:latest";

/// How long a server that must refuse to start gets to exit.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);

fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn docker_ready() -> bool {
    support::require(
        works("docker", &["image", "inspect", IMAGE_BUSYBOX]),
        "needs docker and the test image: run `sudo bash .ci/testbed.sh`",
    )
}

fn bwrap_ready() -> bool {
    support::require(
        works("bwrap", &["--ro-bind", "/", "/", "true"]),
        "needs bubblewrap: run `sudo bash .ci/testbed.sh`",
    )
}

fn slurm_ready() -> bool {
    support::require(
        works("sinfo", &["--noheader"]) && works("squeue", &["--noheader"]),
        "needs a running Slurm: run `sudo bash .ci/testbed.sh`",
    )
}

fn root_ready() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    support::require(
        root,
        "plays another user of the machine (nobody): run as root",
    )
}

/// A TCP port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Makes `path` (not what it points to) belong to `nobody`, as if that user had made it.
fn give_to_nobody(path: &Path) {
    std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY)).unwrap();
}

/// A directory with a subdirectory, files and a mode, that nothing may touch; `check` says
/// whether it is still exactly so.
struct Victim {
    _temp: TempDir,
    dir: PathBuf,
    file: PathBuf,
}

impl Victim {
    fn new(tag: &str) -> Victim {
        let temp = TempDir::new(tag);
        let dir = temp.path().join("precious");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/keep.txt"), "kept").unwrap();
        std::fs::write(dir.join("file.txt"), "kept").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = temp.path().join("precious.txt");
        std::fs::write(&file, "precious").unwrap();
        Victim {
            _temp: temp,
            dir,
            file,
        }
    }

    fn assert_untouched(&self) {
        let mode = std::fs::metadata(&self.dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "{} was chmodded", self.dir.display());
        for file in ["sub/keep.txt", "file.txt"] {
            assert_eq!(
                std::fs::read_to_string(self.dir.join(file)).ok().as_deref(),
                Some("kept"),
                "{}/{file} was touched",
                self.dir.display()
            );
        }
        assert_eq!(
            std::fs::read_to_string(&self.file).unwrap(),
            "precious",
            "{} was touched",
            self.file.display()
        );
    }
}

/// Runs the server to its refusal: it must exit 2 (before serving) and say `needle` on
/// stderr. A server that starts instead is killed after [`REFUSAL_TIMEOUT`] and the test fails.
fn assert_refused(args: &[&str], env: &[(&str, &Path)], needle: &str) -> String {
    let mut child = Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + REFUSAL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        status.and_then(|status| status.code()),
        Some(2),
        "the server started instead of refusing; it said:\n{stderr}"
    );
    assert!(stderr.contains(needle), "no {needle:?} in:\n{stderr}");
    stderr
}

/// A GET (no body) or a POST with a bearer token; any status is returned.
fn call(server: &Server, path: &str, body: Option<&Value>, token: &str) -> (u16, Value) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent();
    let url = format!("{}{path}", server.url);
    let auth = format!("Bearer {token}");
    let mut response = match body {
        None => agent.get(&url).header("Authorization", &auth).call(),
        Some(body) => agent
            .post(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(body.to_string()),
    }
    .unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn detail(body: &Value) -> String {
    body["detail"].as_str().unwrap_or_default().to_string()
}

// ------------------------------------------------------------------------------ state dir

#[test]
fn a_planted_default_state_dir_is_refused_and_nothing_it_points_to_is_touched() {
    if !root_ready() {
        return;
    }
    // A temporary directory like /tmp: anyone may create in it, only owners may delete.
    let tmp = TempDir::new("planted-tmp");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let port = free_port();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let victims: Vec<Victim> = (0..2).map(|n| Victim::new(&format!("victim{n}"))).collect();
    // What `nobody` plants where the server (as root) looks for its state dir by default: the
    // earlier default `<tmp>/arservice-<uid>-<port>`, and the per-user directory.
    for (planted, victim) in [
        format!("arservice-{uid}-{port}"),
        format!("arservice-{uid}"),
    ]
    .iter()
    .zip(&victims)
    {
        let planted = tmp.path().join(planted);
        std::fs::create_dir(&planted).unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(&victim.dir, planted.join("instances")).unwrap();
        std::os::unix::fs::symlink(&victim.dir, planted.join("journal")).unwrap();
        std::os::unix::fs::symlink(&victim.file, planted.join("lock")).unwrap();
        for path in ["instances", "journal", "lock", ""] {
            give_to_nobody(&planted.join(path));
        }
    }
    let port_text = port.to_string();
    let stderr = assert_refused(
        &["--runner", "local", "--port", &port_text],
        &[("TMPDIR", tmp.path())],
        &format!("arservice-{uid}"),
    );
    assert!(
        stderr.contains("--state-dir"),
        "it says what to do: {stderr}"
    );
    for victim in &victims {
        victim.assert_untouched();
    }
}

#[test]
fn a_state_dir_with_files_arservice_did_not_make_is_refused_and_left_as_it_was() {
    let temp = TempDir::new("foreign");
    let project = temp.path().join("project");
    std::fs::create_dir_all(project.join("instances/dataset")).unwrap();
    std::fs::create_dir_all(project.join("journal")).unwrap();
    std::fs::write(project.join("instances/dataset/train.jsonl"), "{}\n").unwrap();
    std::fs::write(project.join("journal/notes.txt"), "notes").unwrap();
    std::fs::write(project.join("lock"), "mine").unwrap();
    std::fs::set_permissions(
        project.join("journal"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let state_dir = project.to_str().unwrap();
    let stderr = assert_refused(
        &["--runner", "local", "--port", "0", "--state-dir", state_dir],
        &[],
        state_dir,
    );
    assert!(stderr.contains("did not make"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(project.join("instances/dataset/train.jsonl")).unwrap(),
        "{}\n"
    );
    assert_eq!(
        std::fs::read_to_string(project.join("journal/notes.txt")).unwrap(),
        "notes"
    );
    assert_eq!(
        std::fs::read_to_string(project.join("lock")).unwrap(),
        "mine"
    );
    let mode = std::fs::metadata(project.join("journal")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o755, "journal/ was chmodded");
    assert!(!project.join(".arservice-state").exists());
}

#[test]
fn a_state_dir_another_user_could_swap_or_made_is_refused() {
    if !root_ready() {
        return;
    }
    let temp = TempDir::new("swappable");
    // Under a directory anyone may write (and not sticky): anyone could rename the state dir.
    let open = temp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let below = open.join("state");
    assert_refused(
        &[
            "--runner",
            "local",
            "--port",
            "0",
            "--state-dir",
            below.to_str().unwrap(),
        ],
        &[],
        "can be changed by other users",
    );
    assert!(!below.exists());
    // Made by another user, even empty and private.
    let theirs = temp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    give_to_nobody(&theirs);
    assert_refused(
        &[
            "--runner",
            "local",
            "--port",
            "0",
            "--state-dir",
            theirs.to_str().unwrap(),
        ],
        &[],
        "belongs to uid 65534",
    );
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
}

#[test]
fn symlinks_inside_a_state_dir_are_never_followed() {
    let temp = TempDir::new("links");
    let state = temp.path().join("state");
    let state_text = state.to_str().unwrap().to_string();
    // A state dir this server made: it has its marker.
    let mut first = Server::start(&["--state-dir", &state_text]);
    first.signal(libc::SIGTERM);
    first.wait_exit(Duration::from_secs(10)).unwrap();
    let args = [
        "--runner",
        "local",
        "--port",
        "0",
        "--state-dir",
        &state_text,
    ];
    for (entry, to_file) in [("instances", false), ("journal", false), ("lock", true)] {
        let victim = Victim::new(entry);
        let moved = temp.path().join(format!("{entry}.real"));
        std::fs::rename(state.join(entry), &moved).unwrap();
        let target = if to_file { &victim.file } else { &victim.dir };
        std::os::unix::fs::symlink(target, state.join(entry)).unwrap();
        assert_refused(&args, &[], entry);
        victim.assert_untouched();
        std::fs::remove_file(state.join(entry)).unwrap();
        std::fs::rename(&moved, state.join(entry)).unwrap();
    }
    // A record that is a link to another file is not read, and a half-written record that is a
    // link is not written through.
    let victim = Victim::new("in-record");
    std::os::unix::fs::symlink(&victim.file, state.join("journal/linked.json")).unwrap();
    std::os::unix::fs::symlink(&victim.file, state.join("journal/.through.partial")).unwrap();
    let server = Server::start(&["--state-dir", &state_text]);
    server.start_local("through");
    victim.assert_untouched();
    assert!(state.join("journal/through.json").is_file());
    assert!(
        !state.join("journal/linked.json").exists(),
        "a linked record is dropped"
    );
}

#[test]
fn instance_files_are_private_to_the_servers_user() {
    if !root_ready() {
        return;
    }
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    server.start_local("private");
    server.exec(
        "private",
        "echo 'machine x login me password hunter2' > ~/.netrc",
    );
    let netrc = server.state_dir.join("instances/private/work/.netrc");
    assert!(netrc.is_file());
    let read = Command::new("runuser")
        .args(["-u", "nobody", "--", "cat"])
        .arg(&netrc)
        .output()
        .unwrap();
    assert!(
        !read.status.success(),
        "another user read {}: {}",
        netrc.display(),
        String::from_utf8_lossy(&read.stdout)
    );
    for dir in [
        server.state_dir.clone(),
        server.state_dir.join("instances"),
        server.state_dir.join("instances/private"),
    ] {
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", dir.display());
    }
}

// ------------------------------------------------------------------------------ isolation

/// From bubblewrap instance `b`, nothing of instance `a` (running a command) or of the server
/// may be seen through `/proc`.
/// `agent`: through the agent (one long-lived sandbox per instance), else on the CLI path (one
/// sandbox per command).
fn bwrap_instances_are_isolated(agent: Option<&str>) {
    let mut args = vec!["--max-resources", r#"{"instances": 4}"#];
    if let Some(agent) = agent {
        args.extend(["--agent", agent]);
    }
    let exec_mode = if agent.is_some() { "agent" } else { "cli" };
    let server = Server::start(&args);
    let _close = CloseAll(&server);
    for run_id in ["a", "b"] {
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": "host",
                    "environment_config": {"container_type": "bubblewrap",
                                           "exec_mode": exec_mode}}),
        );
        assert_eq!(status, 200, "{body}");
        let (_, stats) = server.get(&format!("/stats?run_id={run_id}"));
        assert_eq!(stats["instances"][0]["exec_mode"], exec_mode, "{stats}");
    }
    let secret = server.state_dir.join("instances/a/tmp/a-secret");
    std::thread::scope(|scope| {
        scope.spawn(|| server.exec("a", "echo topsecret > /tmp/a-secret; sleep 4"));
        wait_for(Duration::from_secs(10), "a's secret", || {
            secret.is_file().then_some(())
        });
        let pid = server.pid();
        let seen = server.exec(
            "b",
            &format!(
                "cat /proc/[0-9]*/root/tmp/a-secret 2>/dev/null; \
                 head -c 200 /proc/{pid}/root/etc/shadow 2>/dev/null; \
                 tr '\\0' ' ' </proc/{pid}/cmdline 2>/dev/null; echo; \
                 echo sockets $(stat -L -c %i /proc/[0-9]*/root/.arservice/run/agent.sock \
                   2>/dev/null | sort -u | wc -l); \
                 echo pids $(ls -d /proc/[0-9]* | wc -l)"
            ),
        );
        let output = seen["output"].as_str().unwrap();
        assert!(!output.contains("topsecret"), "b read a's /tmp: {output}");
        assert!(
            !output.contains("root:"),
            "b read the host's shadow: {output}"
        );
        assert!(!output.contains("--runner"), "b sees the server: {output}");
        // Its own agent's socket at most (through the agent), never another instance's.
        let sockets: usize = output
            .split("sockets ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|count| count.parse().ok())
            .unwrap_or_else(|| panic!("no socket count in {output}"));
        assert!(sockets <= 1, "b sees {sockets} agent sockets: {output}");
        let pids: usize = output
            .rsplit("pids ")
            .next()
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid count in {output}"));
        assert!(pids < 10, "b sees {pids} processes: {output}");
    });
}

#[test]
fn bwrap_instances_see_neither_each_other_nor_the_server() {
    if bwrap_ready() {
        bwrap_instances_are_isolated(None);
    }
}

#[test]
fn bwrap_instances_through_the_agent_see_neither_each_other_nor_the_server() {
    if !bwrap_ready() {
        return;
    }
    if let Some(agent) = support::static_agent() {
        bwrap_instances_are_isolated(Some(&agent));
    }
}

#[test]
fn docker_containers_get_a_pids_limit() {
    if !docker_ready() {
        return;
    }
    let by_default = Server::start(&[]);
    let _close = CloseAll(&by_default);
    let (status, body) = by_default.post(
        "/start_instance",
        &json!({"run_id": "pids", "container_name": IMAGE_BUSYBOX}),
    );
    assert_eq!(status, 200, "{body}");
    let (_, stats) = by_default.get("/stats");
    let container = stats["instances"][0]["container"]
        .as_str()
        .unwrap()
        .to_string();
    let limit = Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.HostConfig.PidsLimit}}",
            &container,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&limit.stdout).trim(), "512");

    let tuned = Server::start(&["--pids-limit", "40"]);
    let _close_tuned = CloseAll(&tuned);
    let (status, body) = tuned.post(
        "/start_instance",
        &json!({"run_id": "bomb", "container_name": IMAGE_BUSYBOX,
                "environment_config": {"exec_mode": "cli"}}),
    );
    assert_eq!(status, 200, "{body}");
    tuned.exec(
        "bomb",
        "i=0; while [ $i -lt 100 ]; do sleep 60 >/dev/null 2>&1 & i=$((i+1)); done 2>/dev/null",
    );
    let (_, stats) = tuned.get("/stats");
    let container = stats["instances"][0]["container"]
        .as_str()
        .unwrap()
        .to_string();
    let top = Command::new("docker")
        .args(["top", &container])
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&top.stdout);
    let sleeping = top.lines().filter(|line| line.contains("sleep 60")).count();
    assert!(sleeping > 0, "nothing ran: {top}");
    assert!(sleeping <= 40, "one command made {sleeping} processes");
}

// ------------------------------------------------------------------------------ operator policy

#[test]
fn host_reaching_fields_from_clients_are_refused_naming_the_field() {
    let server = Server::start(&["--max-resources", r#"{"instances": 5}"#]);
    let _close = CloseAll(&server);
    for (config, field) in [
        (
            json!({"container_type": "docker", "image": IMAGE_BUSYBOX, "run_args": ["-v", "/:/host"]}),
            "run_args",
        ),
        (
            json!({"container_type": "docker", "image": IMAGE_BUSYBOX, "executable": "/bin/echo"}),
            "executable",
        ),
        (
            json!({"container_type": "bubblewrap", "image": "host", "cwd": "/"}),
            "cwd",
        ),
        (
            json!({"container_type": "bubblewrap", "image": "host", "bwrap_args": ["--bind", "/", "/host"]}),
            "bwrap_args",
        ),
        (
            json!({"container_type": "bubblewrap", "image": "/"}),
            "image",
        ),
    ] {
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": "reach", "container_name": "x", "environment_config": config}),
        );
        assert_eq!(status, 400, "{config}: {body}");
        assert!(detail(&body).contains(field), "{config}: {body}");
        assert!(
            detail(&body).contains("--allow-client-host-access"),
            "it says how to allow it: {body}"
        );
        let (_, stats) = server.get("/stats");
        assert_eq!(stats["total_instances"], 0, "{stats}");
        assert_eq!(stats["allocated_resources"], json!({"instances": 0}));
    }
    let (_, stats) = server.get("/stats");
    assert!(
        !stats.to_string().contains("ars-"),
        "nothing was started: {stats}"
    );
}

#[test]
fn presets_may_use_host_reaching_fields_and_opted_in_servers_take_them_from_clients() {
    if !docker_ready() || !bwrap_ready() {
        return;
    }
    let temp = TempDir::new("presets");
    let presets = temp.path().join("presets.json");
    std::fs::write(
        &presets,
        json!({"offline": {"container_type": "docker", "image": IMAGE_BUSYBOX,
                           "run_args": ["--network", "none"]},
               "rootfs": {"container_type": "bubblewrap", "image": ROOTFS}})
        .to_string(),
    )
    .unwrap();
    let server = Server::start(&["--environments", presets.to_str().unwrap()]);
    let _close = CloseAll(&server);
    for (run_id, preset) in [("offline", "offline"), ("rootfs", "rootfs")] {
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": preset}),
        );
        assert_eq!(status, 200, "{preset}: {body}");
    }
    assert_eq!(server.exec("rootfs", "echo in")["output"], "in\n");
    // The same value as the preset's is no override.
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "same", "container_name": "offline",
                "environment_config": {"run_args": ["--network", "none"]}}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "other", "container_name": "offline",
                "environment_config": {"run_args": ["--privileged"]}}),
    );
    assert_eq!(status, 400, "{body}");

    let opted_in = Server::start(&["--allow-client-host-access"]);
    let _close_opted = CloseAll(&opted_in);
    let (status, body) = opted_in.post(
        "/start_instance",
        &json!({"run_id": "rootfs", "container_name": ROOTFS,
                "environment_config": {"container_type": "bubblewrap"}}),
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_rootfs_cwd_never_creates_directories_on_the_host() {
    if !bwrap_ready() {
        return;
    }
    // A root filesystem with an absolute link in it, as Debian's /var/run -> /run.
    let temp = TempDir::new("rootfs-preset");
    let rootfs = temp.path().join("rootfs");
    let outside = temp.path().join("outside");
    std::fs::create_dir_all(rootfs.join("var")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, rootfs.join("var/run")).unwrap();
    let presets = temp.path().join("presets.json");
    std::fs::write(
        &presets,
        json!({"rootfs": {"container_type": "bubblewrap", "image": rootfs}}).to_string(),
    )
    .unwrap();
    let server = Server::start(&["--environments", presets.to_str().unwrap()]);
    let _close = CloseAll(&server);
    let escape = temp.path().join("escaped");
    for cwd in [
        format!("/../../../../../../../../..{}", escape.display()),
        "/var/run/escaped-through-a-link".to_string(),
    ] {
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": "escape", "container_name": "rootfs",
                    "environment_config": {"cwd": cwd}}),
        );
        assert_eq!(status, 400, "{cwd}: {body}");
        assert!(detail(&body).contains("cwd"), "{body}");
    }
    assert!(!escape.exists(), "a client's cwd made {}", escape.display());
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "a client's cwd made a directory through the link"
    );
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["total_instances"], 0, "{stats}");
}

/// A stand-in container CLI that logs every call (and the env files it is given) and succeeds.
fn logging_cli(dir: &Path) -> (PathBuf, PathBuf) {
    let log = dir.join("calls.log");
    let cli = dir.join("fake-docker");
    std::fs::write(
        &cli,
        format!(
            "#!/bin/sh\n\
             echo \"ARGV $*\" >> '{log}'\n\
             previous=\n\
             for arg in \"$@\"; do\n\
               if [ \"$previous\" = --env-file ]; then sed 's/^/ENVFILE /' \"$arg\" >> '{log}'; fi\n\
               previous=$arg\n\
             done\n\
             exit 0\n",
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    (cli, log)
}

#[test]
fn the_health_round_never_runs_a_program_a_client_chose() {
    let temp = TempDir::new("client-cli");
    let (cli, log) = logging_cli(temp.path());
    let server = Server::start(&["--allow-client-host-access", "--health-interval", "0.2"]);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "echoed", "container_name": IMAGE_BUSYBOX,
                "environment_config": {"container_type": "docker", "executable": cli,
                                       "exec_mode": "cli"}}),
    );
    assert_eq!(status, 200, "{body}");
    let rounds = Instant::now();
    // Five health rounds at least.
    wait_for(Duration::from_secs(5), "health rounds", || {
        (rounds.elapsed() > Duration::from_millis(1500)).then_some(())
    });
    let calls = std::fs::read_to_string(&log).unwrap();
    let health_calls: Vec<&str> = calls
        .lines()
        .filter(|line| line.starts_with("ARGV") && !line.starts_with("ARGV run"))
        .collect();
    assert!(
        health_calls.is_empty(),
        "the server ran the client's program on its own: {health_calls:?}"
    );
    let (status, body) = server.post("/close_instance", &json!({"run_id": "echoed"}));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn the_startup_log_says_who_can_run_what_as_whom() {
    if !root_ready() {
        return;
    }
    let access_line = |server: &Server, who: &str| {
        wait_for(Duration::from_secs(10), "the access line", || {
            server
                .log()
                .lines()
                .find(|line| line.contains("access: ") && line.contains(who))
                .map(String::from)
        })
    };
    let server = Server::start(&["--container-types", "local"]);
    let line = access_line(&server, "any user of this machine");
    assert!(line.contains("as root"), "{line}");
    assert!(line.contains("local"), "{line}");
    assert!(line.starts_with("WARN"), "{line}");
    drop(server);
    let server = Server::start_with(support::Options {
        args: vec!["--container-types", "docker"],
        env: vec![("ARS_TOKEN", "t0ken")],
    });
    let line = access_line(&server, "clients with the token");
    assert!(line.contains("docker") && !line.contains("local"), "{line}");
    assert!(!server.log().contains("t0ken"), "the token is logged");
}

// ------------------------------------------------------------------------------ secrets

const MODEL_KEY: &str = "sk-test-model-key-0123456789";
const LOGIN_TOKEN: &str = "login-token-0123456789";

fn server_with_secrets(args: &[&str]) -> Server {
    let mut all = vec![
        "--model-upstream",
        "openai=http://127.0.0.1:9,key_env=OPENAI_API_KEY",
    ];
    all.extend_from_slice(args);
    Server::start_with(support::Options {
        args: all,
        env: vec![
            ("OPENAI_API_KEY", MODEL_KEY),
            ("ARS_TOKEN", LOGIN_TOKEN),
            ("ARS_FORWARDED", "fine"),
        ],
    })
}

#[test]
fn model_keys_and_the_token_cannot_be_forwarded_into_a_sandbox() {
    let server = server_with_secrets(&[]);
    let _close = CloseAll(&server);
    for name in ["OPENAI_API_KEY", "ARS_TOKEN"] {
        let (status, body) = call(
            &server,
            "/start_instance",
            Some(&json!({"run_id": "leak", "container_name": "local",
                         "environment_config": {"container_type": "local",
                                                "forward_env": ["ARS_FORWARDED", name]}})),
            LOGIN_TOKEN,
        );
        assert_eq!(status, 400, "{name}: {body}");
        assert!(detail(&body).contains(name), "{body}");
    }
    let (_, stats) = call(&server, "/stats", None, LOGIN_TOKEN);
    assert_eq!(stats["total_instances"], 0, "{stats}");
    // A preset that forwards the key stops the start.
    let temp = TempDir::new("key-preset");
    let presets = temp.path().join("presets.json");
    std::fs::write(
        &presets,
        json!({"leaky": {"container_type": "local", "forward_env": ["OPENAI_API_KEY"]}})
            .to_string(),
    )
    .unwrap();
    assert_refused(
        &[
            "--runner",
            "local",
            "--port",
            "0",
            "--model-upstream",
            "openai=http://127.0.0.1:9,key_env=OPENAI_API_KEY",
            "--environments",
            presets.to_str().unwrap(),
        ],
        &[("OPENAI_API_KEY", Path::new(MODEL_KEY))],
        "OPENAI_API_KEY",
    );
}

#[test]
fn stats_shows_env_names_but_never_their_values() {
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "envy", "container_name": "local",
                "environment_config": {"container_type": "local",
                                       "env": {"HF_TOKEN": "hf-very-secret-value"}}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        server.exec("envy", "echo $HF_TOKEN")["output"],
        "hf-very-secret-value\n"
    );
    let (_, stats) = server.get("/stats");
    let text = stats.to_string();
    assert!(!text.contains("hf-very-secret-value"), "{text}");
    assert!(
        stats["instances"][0]["environment_config"]["env"]
            .get("HF_TOKEN")
            .is_some(),
        "{stats}"
    );
}

#[test]
fn docker_env_values_never_reach_a_command_line() {
    let temp = TempDir::new("fake-docker");
    let (cli, log) = logging_cli(temp.path());
    let presets = temp.path().join("presets.json");
    std::fs::write(
        &presets,
        json!({"fake": {"container_type": "docker", "image": IMAGE_BUSYBOX,
                        "executable": cli, "exec_mode": "cli"}})
        .to_string(),
    )
    .unwrap();
    let server = Server::start_with(support::Options {
        args: vec![
            "--environments",
            presets.to_str().unwrap(),
            "--health-interval",
            "3600",
        ],
        env: vec![("ARS_FORWARDED", "forwarded-secret-value")],
    });
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "argv", "container_name": "fake",
                "environment_config": {"env": {"HF_TOKEN": "instance-secret-value"},
                                       "forward_env": ["ARS_FORWARDED"]}}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "argv", "cmd": "true", "env": {"PER_COMMAND": "command-secret-value"}}),
    );
    assert_eq!(status, 200, "{body}");
    // An env file cannot carry a line break: refused, before anything runs.
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "argv", "cmd": "true", "env": {"PEM": "line one\nline two"}}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("PEM"), "{body}");
    let (status, body) = server.post("/close_instance", &json!({"run_id": "argv"}));
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "multiline", "container_name": "fake",
                "environment_config": {"env": {"PEM": "line one\nline two"}}}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("line break"), "{body}");
    assert!(!server.state_dir.join("instances/multiline").exists());
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(
        !calls.contains("multiline") && !calls.contains("line two"),
        "a refused start ran the CLI:\n{calls}"
    );
    for secret in [
        "instance-secret-value",
        "forwarded-secret-value",
        "command-secret-value",
    ] {
        assert!(
            !calls
                .lines()
                .any(|line| line.starts_with("ARGV") && line.contains(secret)),
            "{secret} on a command line:\n{calls}"
        );
        assert!(
            calls
                .lines()
                .any(|line| line.starts_with("ENVFILE") && line.contains(secret)),
            "{secret} not passed in an env file:\n{calls}"
        );
    }
    // The env files are gone with the instance.
    assert!(!server.state_dir.join("instances/argv").exists());
}

#[test]
fn bwrap_env_values_never_reach_a_command_line() {
    if !bwrap_ready() {
        return;
    }
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    // One sandbox per command (the CLI path), and one for the instance's life (the agent's,
    // when the server's binary is static, as it is by default).
    for (run_id, exec_mode) in [("bw", "cli"), ("bw-agent", "agent")] {
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": "host",
                    "environment_config": {"container_type": "bubblewrap", "exec_mode": exec_mode,
                                           "env": {"BW_SECRET": "bwrap-secret-value"}}}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            server.exec(run_id, "echo $BW_SECRET")["output"],
            "bwrap-secret-value\n"
        );
    }
    let command_lines = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
            .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
            .collect()
    };
    std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            server.post(
                "/execute_command",
                &json!({"run_id": "bw", "cmd": "sleep 3.217; echo $BW_SECRET $CMD_SECRET",
                        "env": {"CMD_SECRET": "bwrap-command-secret"}}),
            )
        });
        let lines = wait_for(Duration::from_secs(10), "the command to run", || {
            let lines = command_lines();
            lines
                .iter()
                .any(|line| line.contains("sleep 3.217") && line.contains("bwrap"))
                .then_some(lines)
        });
        for secret in ["bwrap-secret-value", "bwrap-command-secret"] {
            assert!(
                !lines.iter().any(|line| line.contains(secret)),
                "{secret} on a command line: {lines:?}"
            );
        }
        let (status, body) = running.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["result"]["output"],
            "bwrap-secret-value bwrap-command-secret\n"
        );
    });
}

/// Polls until the server's log says `needle`.
fn wait_for_log(server: &Server, needle: &str) {
    wait_for(Duration::from_secs(60), needle, || {
        server.log().contains(needle).then_some(())
    });
}

/// The environment of the process whose command line contains `needle`.
fn environ_of_process_running(needle: &str) -> Option<String> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if !cmdline.contains(needle) {
                return None;
            }
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            Some(String::from_utf8_lossy(&environ).replace('\0', "\n"))
        })
}

#[test]
fn slurm_jobs_get_no_secret_of_the_login_server() {
    if !slurm_ready() {
        return;
    }
    let server = server_with_secrets(&["--runner", "slurm", "--max-resources", r#"{"jobs": 2}"#]);
    let _closer = TokenCloser(&server);
    for mode in ["agent", "cli"] {
        let run_id = format!("job-{mode}");
        let (status, body) = call(
            &server,
            "/start_instance",
            Some(&json!({"run_id": run_id, "container_name": "local",
                         "environment_config": {"container_type": "local", "exec_mode": mode,
                                                "forward_env": ["ARS_FORWARDED"]}})),
            LOGIN_TOKEN,
        );
        assert_eq!(status, 200, "{body}");
        let (status, body) = call(
            &server,
            "/execute_command",
            Some(&json!({"run_id": run_id,
                         "cmd": "env; tr '\\0' '\\n' </proc/$PPID/environ; echo fwd=$ARS_FORWARDED"})),
            LOGIN_TOKEN,
        );
        assert_eq!(status, 200, "{body}");
        let inside = body["result"]["output"].as_str().unwrap().to_string();
        assert!(inside.contains("fwd=fine"), "{inside}");
        // What the job itself was given: the job script's (or its server's) environment.
        // The agent path's job script execs its server; the CLI path's holds the allocation,
        // run by slurmd from its own copy of the script.
        let (_, stats) = call(
            &server,
            &format!("/stats?run_id={run_id}"),
            None,
            LOGIN_TOKEN,
        );
        let job: u64 = stats["instances"][0]["job_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let ready = server
            .state_dir
            .join(format!("instances/{run_id}/ready.json"));
        let job_env = environ_of_process_running(ready.to_str().unwrap())
            .or_else(|| environ_of_process_running(&format!("/job{job:05}/slurm_script")))
            .unwrap_or_else(|| panic!("no process of job {job} ({run_id})"));
        for secret in [MODEL_KEY, LOGIN_TOKEN] {
            assert!(
                !inside.contains(secret),
                "{mode}: a command saw {secret}:\n{inside}"
            );
            assert!(
                !job_env.contains(secret),
                "{mode}: the job got {secret}:\n{job_env}"
            );
        }
        assert!(!job_env.contains("OPENAI_API_KEY"), "{job_env}");
    }
}

/// Closes every instance of a server that runs with [`LOGIN_TOKEN`], whatever the test did.
struct TokenCloser<'a>(&'a Server);

impl Drop for TokenCloser<'_> {
    fn drop(&mut self) {
        let Ok((_, stats)) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            call(self.0, "/stats", None, LOGIN_TOKEN)
        })) else {
            return;
        };
        for row in stats["instances"].as_array().into_iter().flatten() {
            let run_id = row["run_id"].clone();
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                call(
                    self.0,
                    "/close_instance",
                    Some(&json!({"run_id": run_id})),
                    LOGIN_TOKEN,
                )
            }));
        }
    }
}

/// Cancels the listed jobs whatever the test did.
struct Jobs(Vec<String>);

impl Drop for Jobs {
    fn drop(&mut self) {
        for job in &self.0 {
            let _ = Command::new("scancel").arg(job).status();
        }
    }
}

/// Submits a job that sleeps, as `user` (through runuser when not ourselves), named `name`.
fn sleeper_job(user: Option<&str>, name: &str) -> String {
    let mut sbatch = match user {
        Some(user) => {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", user, "--", "sbatch"]);
            runuser
        }
        None => Command::new("sbatch"),
    };
    let out = sbatch
        .args(["--parsable", "--output=/dev/null", "--chdir=/tmp"])
        .arg(format!("--job-name={name}"))
        .args(["--wrap", "sleep 300"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sbatch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn slurm_adoption_checks_the_jobs_owner_and_name() {
    if !slurm_ready() || !root_ready() {
        return;
    }
    let theirs = sleeper_job(Some("nobody"), "someone-elses-work");
    let ours_unnamed = sleeper_job(None, "not-arservice");
    let _jobs = Jobs(vec![theirs.clone(), ours_unnamed.clone()]);
    for job in [&theirs, &ours_unnamed] {
        wait_for(Duration::from_secs(30), "the job to run", || {
            (queue_state(job) == "RUNNING").then_some(())
        });
    }
    let mut first = Server::start(&["--runner", "slurm"]);
    let state_dir = first.state_dir.to_str().unwrap().to_string();
    first.signal(libc::SIGTERM);
    first.wait_exit(Duration::from_secs(20)).unwrap();
    // Forged records: the journal names jobs this server never started.
    let not_a_job = "--me".to_string();
    for (run_id, job) in [
        ("forged", &theirs),
        ("misnamed", &ours_unnamed),
        ("optioned", &not_a_job),
    ] {
        let record = json!({"version": 1, "run_id": run_id, "container_name": "local",
                            "config": {"container_type": "local", "exec_mode": "cli"},
                            "created_at": 1.0, "runner": "slurm",
                            "handle": {"job_id": job, "exec_mode": "cli"}});
        let path = first.state_dir.join(format!("journal/{run_id}.json"));
        std::fs::write(path, record.to_string()).unwrap();
    }
    let second = Server::start(&[
        "--runner",
        "slurm",
        "--state-dir",
        &state_dir,
        "--health-interval",
        "0.2",
    ]);
    wait_for_log(&second, "not adopting forged");
    wait_for_log(&second, "not adopting misnamed");
    wait_for_log(&second, "not adopting optioned");
    // Several health rounds later, neither job was touched.
    let after = Instant::now();
    wait_for(Duration::from_secs(5), "health rounds", || {
        (after.elapsed() > Duration::from_secs(1)).then_some(())
    });
    let (_, stats) = second.get("/stats");
    assert_eq!(stats["total_instances"], 0, "{stats}");
    assert_eq!(
        queue_state(&theirs),
        "RUNNING",
        "another user's job was cancelled"
    );
    assert_eq!(
        queue_state(&ours_unnamed),
        "RUNNING",
        "a job arservice did not start was cancelled"
    );
}
