//! Kill exactly what we started, everything we started, and nothing else (the `local` path,
//! through the real server): processes that leave their group (`setsid`, a double fork, a
//! process that ignores SIGTERM) die at the timeout; a process of someone else that got the
//! number of a group we once started is never touched; a marker cannot be forged.

mod support;

use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{pid_alive, wait_for, CloseAll, Server, TempDir};

/// A command's timeout in these tests, and how late its answer may come.
const TIMEOUT_S: f64 = 1.0;
const LATE: Duration = Duration::from_millis(1000);

fn exec_timed(server: &Server, run_id: &str, cmd: &str) -> (serde_json::Value, Duration) {
    let started = Instant::now();
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": run_id, "cmd": cmd, "timeout": TIMEOUT_S}),
    );
    assert_eq!(status, 200, "{cmd}: {body}");
    (body["result"].clone(), started.elapsed())
}

/// Waits for a pid written by a command into `file`.
fn pid_in(file: &std::path::Path) -> i32 {
    wait_for(Duration::from_secs(5), "the pid file", || {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|text| text.trim().parse().ok())
    })
}

fn assert_gone(pid: i32, what: &str) {
    wait_for(Duration::from_secs(3), what, || {
        (!pid_alive(pid)).then_some(())
    });
}

#[test]
fn processes_that_leave_the_group_die_at_the_timeout() {
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    server.start_local("esc");
    let dir = TempDir::new("escape");
    let file = |name: &str| dir.path().join(name).display().to_string();
    let cases = [
        (
            "setsid",
            format!("setsid sh -c 'echo $$ > {}; exec sleep 300' </dev/null >/dev/null 2>&1 & sleep 100", file("setsid")),
        ),
        (
            "double fork ignoring TERM",
            format!("(trap '' TERM; setsid sh -c 'trap \"\" TERM; echo $$ > {}; while :; do sleep 1; done' &); sleep 100", file("double")),
        ),
        (
            "background holding the pipe",
            format!("sh -c 'echo $$ > {}; exec sleep 300' & sleep 100", file("background")),
        ),
    ];
    for (what, cmd) in &cases {
        let (result, took) = exec_timed(&server, "esc", cmd);
        assert_eq!(result["returncode"], 124, "{what}: {result}");
        assert_eq!(result["timed_out"], true, "{what}");
        assert!(
            took < Duration::from_secs_f64(TIMEOUT_S) + LATE,
            "{what}: answered after {took:?}"
        );
    }
    for name in ["setsid", "double", "background"] {
        let pid = pid_in(&dir.path().join(name));
        assert_gone(
            pid,
            &format!("the {name} process to be killed at the timeout"),
        );
    }

    // A setsid loop that appends every 20 ms: the file stops growing with the answer.
    let ticks = dir.path().join("ticks");
    let (result, _) = exec_timed(
        &server,
        "esc",
        &format!(
            "setsid sh -c 'while :; do echo t >> {}; sleep 0.02; done' </dev/null >/dev/null 2>&1 & sleep 100",
            ticks.display()
        ),
    );
    assert_eq!(result["timed_out"], true);
    let size = || {
        std::fs::metadata(&ticks)
            .map(|meta| meta.len())
            .unwrap_or(0)
    };
    let at_answer = size();
    assert!(at_answer > 0, "the loop never ran");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        size(),
        at_answer,
        "the setsid loop kept writing after the timeout"
    );
}

#[test]
fn close_ends_what_commands_left_and_nothing_of_another_instance() {
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    server.start_local("left");
    server.start_local("other");
    let result = server.exec(
        "left",
        "setsid sleep 301 </dev/null >/dev/null 2>&1 & echo $!",
    );
    assert_eq!(result["returncode"], 0, "{result}");
    let left: i32 = result["output"].as_str().unwrap().trim().parse().unwrap();
    let result = server.exec(
        "other",
        "setsid sleep 302 </dev/null >/dev/null 2>&1 & echo $!",
    );
    let other: i32 = result["output"].as_str().unwrap().trim().parse().unwrap();
    assert!(pid_alive(left) && pid_alive(other));
    let (status, body) = server.post("/close_instance", &json!({"run_id": "left"}));
    assert_eq!(status, 200, "{body}");
    assert_gone(left, "the setsid process of the closed instance");
    assert!(
        pid_alive(other),
        "closing one instance killed another's process"
    );
}

/// Writes `last` to `/proc/sys/kernel/ns_last_pid`, so the next process gets `last + 1`.
fn next_pid_is(pid: i32) -> bool {
    std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_ok()
}

#[test]
fn a_stranger_on_a_stale_group_id_is_never_killed() {
    // SAFETY: geteuid only reads the caller's effective user id.
    let root = unsafe { libc::geteuid() } == 0;
    if !support::require(root, "root (to set ns_last_pid)") {
        return;
    }
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    server.start_local("stale");
    let dir = TempDir::new("stale");
    let done = dir.path().join("done");
    // The shell leads a group; its background job keeps that group alive after the answer.
    let result = server.exec(
        "stale",
        &format!(
            "(sleep 0.3; touch {}) >/dev/null 2>&1 & echo $$",
            done.display()
        ),
    );
    let pgid: i32 = result["output"].as_str().unwrap().trim().parse().unwrap();
    wait_for(Duration::from_secs(5), "the background job to end", || {
        // SAFETY: signal 0 only checks whether the group has a process left.
        (done.exists() && unsafe { libc::killpg(pgid, 0) } != 0).then_some(())
    });
    // Someone else's process now gets that number as its pid and group id.
    let mut stranger = None;
    for _ in 0..50 {
        assert!(next_pid_is(pgid), "cannot write ns_last_pid");
        let child = Command::new("setsid")
            .args(["sleep", "300"])
            .spawn()
            .unwrap();
        if child.id() as i32 == pgid {
            stranger = Some(child);
            break;
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut stranger = stranger.expect("no process got the stale group id in 50 tries");
    // Closing the instance (and the server's shutdown) must leave it alone.
    let (status, body) = server.post("/close_instance", &json!({"run_id": "stale"}));
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "closing the instance killed an unrelated process that reused its group id"
    );
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

#[test]
fn markers_cannot_be_forged() {
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "forge", "container_name": "local",
                "environment_config": {"container_type": "local",
                                       "env": {"ARSERVICE_INSTANCE": "ars-other-r"}}}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("reserved"),
        "{body}"
    );
    server.start_local("forge");
    for name in ["ARSERVICE_SPAWN", "ARSERVICE_INSTANCE", "ARSERVICE_EXEC"] {
        let (status, body) = server.post(
            "/execute_command",
            &json!({"run_id": "forge", "cmd": "true", "env": {name: "x"}}),
        );
        assert_eq!(status, 400, "{name}: {body}");
    }
    // The command carries the marker the server set.
    let result = server.exec("forge", "echo \"$ARSERVICE_SPAWN\"");
    assert!(
        !result["output"].as_str().unwrap().trim().is_empty(),
        "the command carries its spawn marker"
    );
}

#[test]
fn a_process_that_hides_its_marker_still_goes_with_the_server() {
    let mut server = Server::start(&[]);
    server.start_local("hide");
    let result = server.exec(
        "hide",
        "ARSERVICE_SPAWN=elsewhere setsid sleep 303 </dev/null >/dev/null 2>&1 & echo $!",
    );
    let hidden: i32 = result["output"].as_str().unwrap().trim().parse().unwrap();
    let (status, body) = server.post("/close_instance", &json!({"run_id": "hide"}));
    assert_eq!(status, 200, "{body}");
    assert!(
        pid_alive(hidden),
        "a rewritten marker is not found by close (documented)"
    );
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_exit(Duration::from_secs(20)).is_some(),
        "no exit"
    );
    assert_gone(hidden, "the hidden process to end with the server");
}

#[test]
fn what_handles_sigterm_gets_the_grace_to_clean_up() {
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    server.start_local("grace");
    let dir = TempDir::new("grace");
    let cleaned = dir.path().join("cleaned");
    // The shell dies at SIGTERM; its child takes 0.2 s to clean up, within the 0.5 s grace.
    let cmd = format!(
        "sh -c 'trap \"sleep 0.2; echo done > {}; exit 0\" TERM; while :; do sleep 0.05; done' & wait",
        cleaned.display()
    );
    let (result, took) = exec_timed(&server, "grace", &cmd);
    assert_eq!(result["timed_out"], true, "{result}");
    assert!(took < Duration::from_secs_f64(TIMEOUT_S) + LATE, "{took:?}");
    assert_eq!(
        std::fs::read_to_string(&cleaned).unwrap_or_default(),
        "done\n",
        "the child's SIGTERM handler was cut short by an early SIGKILL"
    );
}
