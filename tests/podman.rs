//! What podman does differently from docker, on the real podman of the test bed: the
//! conformance suite (`tests/conformance.rs`) and the crash-recovery cases
//! (`tests/recovery.rs`) run on podman too; these are the differences themselves.
//!
//! - a host without podman's init binary: the container runs without `--init`, its
//!   keep-alive shell reaping orphans, and the server says so once;
//! - a stop signal the container ignores: `close` still ends it at once (podman's
//!   `rm --force` would wait 10 s for a stop first);
//! - `container_type: "docker"` driving podman's docker emulation (a `docker` that is
//!   podman): told apart by `--version`, so its listing is read the podman way;
//! - the images podman loaded: `localhost/NAME`, asked for by `NAME` or in full;
//! - rootless: a server run by an unprivileged user restarts after `kill -9`, adopts its
//!   containers and removes the one it never recorded (the conformance suite covers the rest).

mod support;

use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{wait_for, CloseAll, Options, Server, TempDir, TestUser, ROOTLESS_USER};

const IMAGE: &str = "arservice-test/busybox:latest";

fn podman_ready() -> bool {
    let ready = Command::new("podman")
        .args(["image", "exists", IMAGE])
        .status()
        .is_ok_and(|status| status.success());
    support::require(
        ready,
        &format!("podman with {IMAGE} in its store is needed: run `sudo bash .ci/testbed.sh`"),
    )
}

fn start(server: &Server, run_id: &str, image: &str, config: Value) {
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": run_id, "container_name": image, "environment_config": config}),
    );
    assert_eq!(status, 200, "start {run_id}: {body}");
}

fn row(server: &Server, run_id: &str) -> Value {
    let (_, stats) = server.get(&format!("/stats?run_id={run_id}"));
    stats["instances"][0].clone()
}

/// Processes in state `S` named `sleep` inside the instance (zombies are `Z`).
const SLEEPS: &str = "grep -l '^[0-9]* (sleep) [^Z]' /proc/[0-9]*/stat 2>/dev/null | wc -l";
const ZOMBIES: &str = "grep -l '^[0-9]* ([^)]*) Z' /proc/[0-9]*/stat 2>/dev/null | wc -l";

#[test]
fn without_an_init_binary_the_keep_alive_shell_is_pid_1_and_reaps() {
    if !podman_ready() {
        return;
    }
    // A containers.conf of the server's own (CONTAINERS_CONF replaces the machine's) whose
    // init_path names nothing, as on a host where catatonit is not installed.
    let temp = TempDir::new("podman-noinit");
    let conf = temp.path().join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = []\ninit_path = \"/nonexistent/catatonit\"\n",
    )
    .unwrap();
    let server = Server::start_with(Options {
        args: vec![],
        env: vec![("CONTAINERS_CONF", conf.to_str().unwrap())],
    });
    let _close = CloseAll(&server);
    let config = json!({"container_type": "podman", "exec_mode": "cli"});
    start(&server, "first", IMAGE, config.clone());
    let pid1 = server.exec("first", "tr '\\0' ' ' < /proc/1/cmdline");
    assert!(
        pid1["output"].as_str().unwrap().starts_with("sh -c trap"),
        "PID 1 is the keep-alive shell: {pid1}"
    );
    // Its `sleep` orphaned (the subshell exits at once), handed to PID 1, which must reap it.
    let orphan = server.exec("first", "(sleep 3 >/dev/null 2>&1 &) ; echo left");
    assert_eq!(orphan["output"], "left\n", "{orphan}");
    assert_eq!(
        server.exec("first", SLEEPS)["output"],
        "2\n",
        "its own and the orphan"
    );
    wait_for(Duration::from_secs(10), "the orphan to be reaped", || {
        let gone = server.exec("first", SLEEPS)["output"] == "1\n";
        let zombies = server.exec("first", ZOMBIES)["output"] == "0\n";
        (gone && zombies).then_some(())
    });
    // The second start knows: one warning, and no failed `run` first.
    start(&server, "second", IMAGE, config);
    assert_eq!(server.exec("second", "echo ok")["output"], "ok\n");
    let log = server.log();
    assert_eq!(
        log.matches("has no init binary").count(),
        1,
        "warned once: {log}"
    );
    assert!(log.contains("install catatonit"), "{log}");
    for run_id in ["first", "second"] {
        let (status, body) = server.post("/close_instance", &json!({"run_id": run_id}));
        assert_eq!(status, 200, "{body}");
    }
}

#[test]
fn close_ends_a_container_that_ignores_its_stop_signal_at_once() {
    if !podman_ready() {
        return;
    }
    // `run_args` reach this machine beyond the sandbox: the operator allows them here.
    let server = Server::start(&["--allow-client-host-access"]);
    let _close = CloseAll(&server);
    // `--init`'s catatonit passes SIGWINCH on to the keep-alive shell, which ignores it: a
    // stop would wait its 10 s before it kills (as for an image whose STOPSIGNAL the
    // entrypoint does not handle).
    for (run_id, mode) in [("cli", "cli"), ("agent", "agent")] {
        start(
            &server,
            run_id,
            IMAGE,
            json!({"container_type": "podman", "exec_mode": mode,
                   "run_args": ["--stop-signal", "SIGWINCH"]}),
        );
        let container = row(&server, run_id)["container"]
            .as_str()
            .unwrap()
            .to_string();
        // Podman has no daemon: the container's conmon daemonizes, and the server, a child
        // subreaper, is handed it.
        assert!(
            children(server.pid())
                .iter()
                .any(|(_, comm, _)| comm == "conmon"),
            "conmon is the server's: {:?}",
            children(server.pid())
        );
        let started = Instant::now();
        let (status, body) = server.post("/close_instance", &json!({"run_id": run_id}));
        let took = started.elapsed();
        assert_eq!(status, 200, "{body}");
        assert!(
            took < Duration::from_secs(5),
            "close of {run_id} took {took:?}"
        );
        let listed = Command::new("podman")
            .args(["ps", "--all", "--quiet", "--filter"])
            .arg(format!("name=^{container}$"))
            .output()
            .unwrap();
        assert!(listed.status.success());
        assert!(listed.stdout.is_empty(), "{container} is still there");
    }
    // ... and reaps it when it exits.
    wait_for(
        Duration::from_secs(10),
        "no zombie child of the server",
        || {
            let zombies: Vec<_> = children(server.pid())
                .into_iter()
                .filter(|(_, _, state)| *state == 'Z')
                .collect();
            zombies.is_empty().then_some(())
        },
    );
}

/// The children of `pid`: (pid, name, state).
fn children(pid: i32) -> Vec<(i32, String, char)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in list
            .split_whitespace()
            .filter_map(|pid| pid.parse::<i32>().ok())
        {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let state = stat[close + 1..].trim_start().chars().next().unwrap_or('?');
            found.push((child, stat[open + 1..close].to_string(), state));
        }
    }
    found
}

#[test]
fn a_docker_that_is_podman_is_driven_as_podman() {
    if !podman_ready() {
        return;
    }
    // podman-docker's `docker`, less its notice on stderr (which `nodocker` turns off).
    let temp = TempDir::new("podman-docker");
    let docker = temp.path().join("docker");
    std::fs::write(&docker, "#!/bin/sh\nexec podman \"$@\"\n").unwrap();
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The operator's preset names the CLI (the health round never runs a client's).
    let presets = temp.path().join("environments.json");
    std::fs::write(
        &presets,
        json!({"emulated": {"container_type": "docker", "image": IMAGE,
                            "executable": docker.to_str().unwrap(),
                            "exec_mode": "cli", "cwd": "/made/here"}})
        .to_string(),
    )
    .unwrap();
    let server = Server::start(&[
        "--health-interval",
        "0.5",
        "--environments",
        presets.to_str().unwrap(),
    ]);
    let _close = CloseAll(&server);
    start(&server, "emulated", "emulated", json!({}));
    // Podman's run refuses a missing --workdir: the directory was made after the run.
    assert_eq!(server.exec("emulated", "pwd")["output"], "/made/here\n");
    let container = row(&server, "emulated")["container"]
        .as_str()
        .unwrap()
        .to_string();
    let removed = Command::new("podman")
        .args(["rm", "--force", "--time", "0", &container])
        .output()
        .unwrap();
    assert!(removed.status.success(), "{removed:?}");
    // Read the docker way, podman's listing would have said "no longer running (Up ...)"
    // from the first health round on.
    let dead = wait_for(
        Duration::from_secs(20),
        "the instance to be reported dead",
        || {
            let row = row(&server, "emulated");
            (row["state"] == "dead").then_some(row)
        },
    );
    // `rm --force` kills, then removes: a health round in between sees it exited, or being
    // removed. Never running ("Up ..."), which is how a listing read wrong would say it.
    let reason = dead["dead_reason"].as_str().unwrap();
    assert!(
        reason.contains("removed from outside")
            || (reason.contains("is no longer running (") && !reason.contains("(Up")),
        "{dead}"
    );
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "emulated", "cmd": "true"}),
    );
    assert_eq!(status, 410, "{body}");
    let (status, body) = server.post("/close_instance", &json!({"run_id": "emulated"}));
    assert_eq!(status, 200, "close after the container is gone: {body}");
}

#[test]
fn a_loaded_image_answers_to_its_short_and_its_full_name() {
    if !podman_ready() {
        return;
    }
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    for (run_id, image) in [
        ("short", IMAGE.to_string()),
        ("full", format!("localhost/{IMAGE}")),
    ] {
        start(
            &server,
            run_id,
            &image,
            json!({"container_type": "podman", "exec_mode": "cli"}),
        );
        assert_eq!(server.exec(run_id, "echo ran")["output"], "ran\n");
        let (status, body) = server.post("/close_instance", &json!({"run_id": run_id}));
        assert_eq!(status, 200, "{body}");
    }
}

/// `podman ARGS` as `user`; its output, which must be a success.
fn podman_as(user: &TestUser, args: &[&str]) -> String {
    let output = user
        .command("podman")
        .args(args)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(output.status.success(), "podman {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn rootless_the_server_of_a_user_restarts_after_kill_9_and_adopts_its_containers() {
    let user = TestUser::lookup(ROOTLESS_USER);
    if !support::require(
        user.is_some(),
        &format!("rootless podman needs the user {ROOTLESS_USER}: run `sudo bash .ci/testbed.sh`"),
    ) {
        return;
    }
    let user = user.unwrap();
    let Some(agent) = support::static_agent() else {
        return;
    };
    let mut first = Server::start_as(
        &user,
        Options {
            args: vec!["--agent", &agent],
            env: vec![],
        },
    );
    let uid = std::fs::read_to_string(format!("/proc/{}/status", first.pid())).unwrap();
    assert!(
        uid.lines()
            .any(|line| line.starts_with("Uid:") && line.contains(&format!("\t{}\t", user.uid))),
        "the server runs as {}: {uid}",
        user.name
    );
    let (_, stats) = first.get("/stats");
    let server_id = stats["server_id"].as_str().unwrap().to_string();
    for (run_id, mode) in [("cli", "cli"), ("agent", "agent"), ("unrecorded", "cli")] {
        start(
            &first,
            run_id,
            IMAGE,
            json!({"container_type": "podman", "exec_mode": mode}),
        );
        assert_eq!(row(&first, run_id)["exec_mode"], mode);
        // Root inside, the user outside.
        assert_eq!(first.exec(run_id, "id -u")["output"], "0\n");
        let pid = podman_as(
            &user,
            &[
                "inspect",
                "--format",
                "{{.State.Pid}}",
                &format!("ars-{server_id}-{run_id}"),
            ],
        );
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
        assert!(
            status
                .lines()
                .any(|line| line.starts_with("Uid:") && line.contains(&format!("\t{}\t", user.uid))),
            "{run_id}'s PID 1 runs as {}: {status}",
            user.name
        );
        first.exec(run_id, "echo kept > /kept");
    }
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).expect("killed");
    // As if the crash came between `podman run` and the journal write.
    std::fs::remove_file(first.state_dir.join("journal/unrecorded.json")).unwrap();

    let state_dir = first.state_dir.to_str().unwrap().to_string();
    let second = Server::start_as(
        &user,
        Options {
            args: vec!["--state-dir", &state_dir, "--agent", &agent],
            env: vec![],
        },
    );
    let _close = CloseAll(&second);
    let (_, stats) = second.get("/stats");
    let mut adopted: Vec<&str> = stats["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            assert_eq!(row["adopted"], true, "{row}");
            row["run_id"].as_str().unwrap()
        })
        .collect();
    adopted.sort();
    assert_eq!(adopted, ["agent", "cli"], "{stats}");
    assert_eq!(row(&second, "agent")["exec_mode"], "agent");
    let mut left: Vec<String> = podman_as(
        &user,
        &[
            "ps",
            "--all",
            "--format",
            "{{.Names}}",
            "--filter",
            &format!("label=arservice.server={server_id}"),
        ],
    )
    .lines()
    .map(String::from)
    .collect();
    left.sort();
    assert_eq!(
        left,
        [
            format!("ars-{server_id}-agent"),
            format!("ars-{server_id}-cli")
        ],
        "the unrecorded container is removed at start"
    );
    for run_id in ["cli", "agent"] {
        assert_eq!(second.exec(run_id, "cat /kept")["output"], "kept\n");
        let (status, body) = second.post("/close_instance", &json!({"run_id": run_id}));
        assert_eq!(status, 200, "{body}");
    }
    let left = podman_as(
        &user,
        &[
            "ps",
            "--all",
            "--quiet",
            "--filter",
            &format!("label=arservice.server={server_id}"),
        ],
    );
    assert!(left.is_empty(), "left: {left}");
}
