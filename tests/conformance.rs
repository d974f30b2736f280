//! One conformance suite, run against every environment kind through the real server.
//!
//! Each flavor (an environment with its config) runs the same cases: echo, returncode, cwd,
//! env, forward_env, stderr order, per-command overrides, timeout kill (nothing left running),
//! output cap, files persisting, concurrent commands, close leaving nothing behind, failed
//! start leaving nothing behind. A flavor whose tool is missing is skipped with a loud line,
//! except in CI (`CI=true`), where it fails.
//!
//! The flavors live in `tests/support/flavor.rs` (shared with `tests/exec_cases.rs`);
//! podman runs for real, rootful and rootless, with the same cases as docker; apptainer and
//! enroot run against the stand-ins in `tests/standin/`.

mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::flavor::{processes_running, Flavor};
use support::{wait_for, CloseAll, Server, TempDir};

/// The output cap the suite's servers run with.
const CAP: usize = 10_000;

fn server(flavor: &Flavor) -> Server {
    flavor.server(
        &[
            "--max-output-bytes",
            "10000",
            "--max-resources",
            r#"{"instances": 20}"#,
        ],
        vec![("ARS_FORWARDED", "from-server"), ("ARS_HIDDEN", "secret")],
    )
}

/// Runs `case` against `flavor` when the machine has what it needs.
fn check(flavor: Flavor, case: fn(&Flavor, &Server)) {
    if flavor.available() {
        let server = server(&flavor);
        let _close = CloseAll(&server);
        case(&flavor, &server);
    }
}

fn echo_and_returncode(flavor: &Flavor, server: &Server) {
    flavor.start(server, "c1", json!({}));
    let result = server.exec("c1", "echo hello; exit 3");
    assert_eq!(result["output"], "hello\n");
    assert_eq!(result["returncode"], 3);
    assert_eq!(result["timed_out"], false);
}

fn cwd_and_per_command_cwd(flavor: &Flavor, server: &Server) {
    let temp = TempDir::new("cwd");
    let host_dir = temp.path().to_str().unwrap().to_string();
    let cwd = flavor.cwd.map(String::from).unwrap_or(host_dir);
    flavor.start(server, "c1", json!({"cwd": cwd}));
    assert_eq!(server.exec("c1", "pwd")["output"], format!("{cwd}\n"));
    server.exec("c1", "mkdir -p sub/deeper");
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "c1", "cmd": "pwd", "cwd": "sub/deeper"}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["output"], format!("{cwd}/sub/deeper\n"));
    assert_eq!(
        server.exec("c1", "pwd")["output"],
        format!("{cwd}\n"),
        "the override was for one command"
    );
}

fn env_forward_env_and_overrides(flavor: &Flavor, server: &Server) {
    flavor.start(
        server,
        "c1",
        json!({"env": {"A": "instance", "B": "b"}, "forward_env": ["ARS_FORWARDED"]}),
    );
    let result = server.exec("c1", "echo $A $B $ARS_FORWARDED ${ARS_HIDDEN:-unset}");
    assert_eq!(result["output"], "instance b from-server unset\n");
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "c1", "cmd": "echo $A $B", "env": {"A": "command"}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["output"], "command b\n");
    assert_eq!(server.exec("c1", "echo $A")["output"], "instance\n");
}

fn stderr_merged_in_order(flavor: &Flavor, server: &Server) {
    flavor.start(server, "c1", json!({}));
    let result = server.exec("c1", "for i in 1 2 3; do echo out$i; echo err$i >&2; done");
    assert_eq!(result["output"], "out1\nerr1\nout2\nerr2\nout3\nerr3\n");
}

fn timeout_kills_everything(flavor: &Flavor, server: &Server) {
    flavor.start(server, "c1", json!({"timeout": 30}));
    // Unique durations name the processes of this test among all others on the machine.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tag = 30_000 + (std::process::id() % 1000) * 20 + unique;
    let (bg, fg) = (format!("sleep {tag}1"), format!("sleep {tag}2"));
    let started = Instant::now();
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "c1", "cmd": format!("{bg} & echo started; {fg}"), "timeout": 1}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(body["result"]["timed_out"], true);
    assert_eq!(body["result"]["returncode"], 124);
    assert_eq!(body["result"]["output"], "started\n");
    wait_for(
        Duration::from_secs(10),
        "the timed-out command's processes to die",
        || {
            processes_running(&format!("sleep {tag}"))
                .is_empty()
                .then_some(())
        },
    );
    if flavor.has_ps_inside {
        let (_, stats) = server.get("/stats");
        let container = stats["instances"][0]["container"]
            .as_str()
            .unwrap()
            .to_string();
        let ps = flavor
            .container_cli()
            .args(["exec", &container, "ps"])
            .output()
            .unwrap();
        let ps = String::from_utf8_lossy(&ps.stdout);
        assert!(
            !ps.contains(&format!("{tag}")),
            "left inside the container:\n{ps}"
        );
        assert!(ps.contains("PID"), "ps did not run: {ps}");
    }
    // The instance still works after a timeout.
    assert_eq!(server.exec("c1", "echo alive")["output"], "alive\n");
}

fn output_is_capped(flavor: &Flavor, server: &Server) {
    flavor.start(server, "c1", json!({}));
    let result = server.exec("c1", "head -c 200000 /dev/zero | tr '\\0' a; echo END");
    assert_eq!(result["truncated"], true);
    let output = result["output"].as_str().unwrap();
    assert!(output.len() <= CAP + 100, "{} bytes", output.len());
    assert!(output.starts_with("aaa") && output.ends_with("aEND\n"));
}

fn files_persist_between_commands(flavor: &Flavor, server: &Server) {
    flavor.start(server, "c1", json!({}));
    server.exec("c1", "echo kept > note.txt");
    assert_eq!(server.exec("c1", "cat note.txt")["output"], "kept\n");
}

fn two_concurrent_commands(flavor: &Flavor, server: &Server) {
    flavor.start(server, "c1", json!({}));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for index in 0..2 {
            scope.spawn(move || {
                let result = server.exec("c1", &format!("sleep 3; echo {index}"));
                assert_eq!(result["output"], format!("{index}\n"));
            });
        }
    });
    assert!(
        started.elapsed() < Duration::from_millis(5500),
        "{:?}: not concurrent",
        started.elapsed()
    );
}

fn close_leaves_nothing(flavor: &Flavor, server: &Server) {
    flavor.start(server, "c1", json!({}));
    server.exec("c1", "echo x > file; sleep 600 >/dev/null 2>&1 &");
    assert!(
        !flavor.leftovers(server, "c1").is_empty(),
        "the check sees nothing of a live instance"
    );
    let (status, body) = server.post("/close_instance", &json!({"run_id": "c1"}));
    assert_eq!(status, 200, "{body}");
    let left = flavor.leftovers(server, "c1");
    assert!(left.is_empty(), "{} close left: {left:?}", flavor.name);
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(available, json!({"instances": 20}));
}

fn failed_start_leaves_nothing(flavor: &Flavor, server: &Server) {
    let (body, expected) = (flavor.failing_start)(server);
    let (status, answer) = server.post("/start_instance", &body);
    assert_eq!(status, expected, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("failed"),
        "{answer}"
    );
    let _ = std::fs::remove_file(server.state_dir.join("instances/doomed"));
    let left = flavor.leftovers(server, "doomed");
    assert!(
        left.is_empty(),
        "{} failed start left: {left:?}",
        flavor.name
    );
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["allocated_resources"], json!({"instances": 0}));
    assert_eq!(stats["total_instances"], 0);
}

/// `suite!(flavor, ...)`: the cases for each flavor; attributes before a flavor (such as
/// `#[ignore = "why"]`) go on each of its cases.
macro_rules! suite {
    ($($(#[$attribute:meta])* $flavor:ident),* $(,)?) => {
        $(
            mod $flavor {
                use super::*;
                $(#[$attribute])* #[test] fn echo_and_returncode() { check(Flavor::$flavor(), super::echo_and_returncode) }
                $(#[$attribute])* #[test] fn cwd_and_per_command_cwd() { check(Flavor::$flavor(), super::cwd_and_per_command_cwd) }
                $(#[$attribute])* #[test] fn env_forward_env_and_overrides() { check(Flavor::$flavor(), super::env_forward_env_and_overrides) }
                $(#[$attribute])* #[test] fn stderr_merged_in_order() { check(Flavor::$flavor(), super::stderr_merged_in_order) }
                $(#[$attribute])* #[test] fn timeout_kills_everything() { check(Flavor::$flavor(), super::timeout_kills_everything) }
                $(#[$attribute])* #[test] fn output_is_capped() { check(Flavor::$flavor(), super::output_is_capped) }
                $(#[$attribute])* #[test] fn files_persist_between_commands() { check(Flavor::$flavor(), super::files_persist_between_commands) }
                $(#[$attribute])* #[test] fn two_concurrent_commands() { check(Flavor::$flavor(), super::two_concurrent_commands) }
                $(#[$attribute])* #[test] fn close_leaves_nothing() { check(Flavor::$flavor(), super::close_leaves_nothing) }
                $(#[$attribute])* #[test] fn failed_start_leaves_nothing() { check(Flavor::$flavor(), super::failed_start_leaves_nothing) }
            }
        )*
    };
}

suite!(
    local,
    docker_busybox,
    docker_bash,
    docker_agent_busybox,
    docker_agent_bash,
    podman_busybox,
    podman_bash,
    podman_agent_busybox,
    podman_agent_bash,
    podman_rootless,
    podman_rootless_agent,
    bwrap_host,
    bwrap_rootfs,
    bwrap_agent_host,
    bwrap_agent_rootfs,
    apptainer_tmpfs,
    apptainer_overlay,
    apptainer_agent,
    enroot,
    enroot_agent,
);
