//! After `kill -9`, a server restarted on the same state dir leaves nothing of its earlier
//! life untracked: what its journal recorded and still runs is adopted (listed, counted in the
//! ledger, commands work), and the start-up sweep removes the rest: containers, marked
//! processes, overlay mounts and instance directories. (Slurm jobs: `tests/slurm.rs`.)
//!
//! The container cases run on docker and on podman (`mod docker`, `mod podman` at the end):
//! the same code drives both engines, and podman answers a few calls differently.

mod support;

use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;
use support::{pid_alive, static_agent, wait_for, Options, Server};

const IMAGE: &str = "arservice-test/busybox:latest";
const ROOTFS: &str = "/var/lib/arservice-testbed/rootfs-bash";

/// A container engine: its CLI, which is also its `container_type`.
#[derive(Clone, Copy)]
struct Engine {
    cli: &'static str,
}

const DOCKER: Engine = Engine { cli: "docker" };
const PODMAN: Engine = Engine { cli: "podman" };

impl Engine {
    /// `{"container_type": <engine>}` with `extra` merged in.
    fn config(self, extra: serde_json::Value) -> serde_json::Value {
        let mut config = json!({"container_type": self.cli});
        for (key, value) in extra.as_object().unwrap() {
            config[key] = value.clone();
        }
        config
    }

    /// Removes a container at once, as someone outside the server would.
    fn remove(self, container: &str) {
        let mut remove = Command::new(self.cli);
        remove.args(["rm", "--force"]);
        if self.cli == "podman" {
            remove.args(["--time", "0"]);
        }
        let removed = remove.arg(container).output().unwrap();
        assert!(removed.status.success(), "{removed:?}");
    }
}

fn test_bed_ready(engine: Engine) -> bool {
    let image = Command::new(engine.cli)
        .args(["image", "inspect", IMAGE])
        .output()
        .is_ok_and(|out| out.status.success());
    let bwrap = Command::new("bwrap")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    let ready = image && bwrap && std::path::Path::new(ROOTFS).is_dir();
    support::require(
        ready,
        &format!(
            "recovery needs {} with the test image, bwrap and the test rootfs: run `sudo bash .ci/testbed.sh`",
            engine.cli
        ),
    )
}

fn a_restart_after_kill_9_adopts_what_runs_and_removes_the_rest(engine: Engine) {
    if !test_bed_ready(engine) {
        return;
    }
    // Without the static build (outside CI) the container that asks for the agent runs
    // without one, and the test still covers adoption on the CLI path.
    let agent = static_agent();
    let with_agent = agent.is_some();
    // The bubblewrap rootfs below is a client's choice of host directory: allowed here.
    let mut agent_args: Vec<&str> = agent
        .iter()
        .flat_map(|path| ["--agent", path.as_str()])
        .collect();
    agent_args.push("--allow-client-host-access");
    let mut first = Server::start(&agent_args);
    let state_dir = first.state_dir.to_str().unwrap().to_string();
    let (_, stats) = first.get("/stats");
    let server_id = stats["server_id"].as_str().unwrap().to_string();
    let docker = |run_id: &str, mode: &str| {
        json!({"run_id": run_id, "container_name": IMAGE,
               "environment_config": engine.config(json!({"exec_mode": mode}))})
    };
    let starts = [
        docker("dock", "cli"),
        docker("agented", "agent"),
        docker("unrecorded", "cli"),
        docker("vanished", "cli"),
        json!({"run_id": "wrap", "container_name": ROOTFS, "environment_config": {"container_type": "bwrap"}}),
        json!({"run_id": "host", "environment_config": {"container_type": "local"}}),
    ];
    let mut host_pids = Vec::new();
    let mut sandboxed_pids = Vec::new();
    for start in &starts {
        let (status, body) = first.post("/start_instance", start);
        assert_eq!(status, 200, "{body}");
        let run_id = start["run_id"].as_str().unwrap();
        assert_eq!(
            first.exec(run_id, "echo kept > kept-file; echo $?")["output"],
            "0\n"
        );
        let output = first.exec(run_id, "sleep 900 >/dev/null 2>&1 & echo $!")["output"].clone();
        match run_id {
            "host" => host_pids.push(output.as_str().unwrap().trim().parse::<i32>().unwrap()),
            // Its `$!` is a pid of the sandbox's own namespace: find the sleep on the host by
            // the instance's marker.
            "wrap" => sandboxed_pids.extend(marked_sleeps(&format!("ars-{server_id}-wrap"))),
            _ => {}
        }
    }
    assert_eq!(
        exec_mode(&first, "agented"),
        if with_agent { "agent" } else { "cli" }
    );
    let mounts_before = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(mounts_before.contains(&format!("{state_dir}/instances/wrap")));
    let journal = first.state_dir.join("journal");
    let mut recorded: Vec<String> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    recorded.sort();
    assert_eq!(
        recorded,
        [
            "agented.json",
            "dock.json",
            "host.json",
            "unrecorded.json",
            "vanished.json"
        ],
        "bwrap sandboxes die with their server: they are not recorded"
    );

    // Through the agent it lives in the instance's sandbox; on the CLI path it ended with its
    // command (bubblewrap's pid namespace went with it).
    assert_eq!(
        sandboxed_pids.len(),
        usize::from(with_agent),
        "wrap's background sleep on the host"
    );
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).expect("killed");
    assert!(
        host_pids.iter().all(|&pid| pid_alive(pid)),
        "the earlier life's processes outlive a kill -9"
    );
    // A bubblewrap sandbox dies with its server (--die-with-parent), and its pid namespace
    // with everything in it.
    wait_for(Duration::from_secs(10), "wrap's sandbox to end", || {
        sandboxed_pids
            .iter()
            .all(|&pid| !pid_alive(pid))
            .then_some(())
    });
    // As if the crash came between `docker run` and the journal write.
    std::fs::remove_file(journal.join("unrecorded.json")).unwrap();
    // And a recorded container that someone removed while no server ran.
    engine.remove(&format!("ars-{server_id}-vanished"));

    let second = Server::start_with(Options {
        args: [vec!["--state-dir", state_dir.as_str()], agent_args.clone()].concat(),
        env: vec![],
    });
    let (_, stats) = second.get("/stats");
    assert_eq!(
        stats["server_id"],
        server_id.as_str(),
        "same state dir, same identity"
    );
    let mut listed: Vec<&str> = stats["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            assert_eq!(row["adopted"], true, "{row}");
            assert_eq!(row["state"], "running", "{row}");
            row["run_id"].as_str().unwrap()
        })
        .collect();
    listed.sort();
    assert_eq!(listed, ["agented", "dock", "host"], "{stats}");
    assert_eq!(stats["instances_adopted"], 3);
    assert_eq!(stats["allocated_resources"], json!({"instances": 3}));
    assert_eq!(stats["available_resources"], json!({"instances": 7}));
    assert_eq!(
        exec_mode(&second, "agented"),
        if with_agent { "agent" } else { "cli" }
    );
    assert_eq!(exec_mode(&second, "dock"), "cli");

    let containers = Command::new(engine.cli)
        .args(["ps", "--all", "--format", "{{.Names}}", "--filter"])
        .arg(format!("label=arservice.server={server_id}"))
        .output()
        .unwrap();
    let mut names: Vec<String> = String::from_utf8_lossy(&containers.stdout)
        .lines()
        .map(String::from)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            format!("ars-{server_id}-agented"),
            format!("ars-{server_id}-dock")
        ],
        "only the adopted containers are left"
    );
    // Commands that were running lost their clients and their timeouts: they are gone, on
    // the host and inside the adopted container without an agent.
    for pid in host_pids {
        wait_for(
            Duration::from_secs(10),
            "the earlier life's processes to die",
            || (!pid_alive(pid)).then_some(()),
        );
    }
    let ps = second.exec("dock", "ps -o args | grep -c '^sleep 900' || true");
    assert_eq!(ps["output"], "0\n", "{ps}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&format!("{state_dir}/instances")),
        "mounts survived:\n{mounts}"
    );
    let mut left: Vec<String> = std::fs::read_dir(second.state_dir.join("instances"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    // Only the adopted keep their directories: docker instances have none but their agent's.
    assert_eq!(
        left,
        ["host"],
        "instance directories of the earlier life survived"
    );
    let agent_dirs = std::fs::read_dir(second.state_dir.join("agents"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(agent_dirs, usize::from(with_agent), "agent directories");
    let mut recorded: Vec<String> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    recorded.sort();
    assert_eq!(recorded, ["agented.json", "dock.json", "host.json"]);
    let log = second.log();
    assert!(
        log.contains("not adopting vanished of an earlier life: container ars-"),
        "the vanished container's record is dropped, saying why: {log}"
    );

    // Adopted instances keep their files and work; a close ends them for good.
    for run_id in ["dock", "agented", "host"] {
        assert_eq!(
            second.exec(run_id, "cat kept-file")["output"],
            "kept\n",
            "{run_id}"
        );
        assert_eq!(
            second.post("/close_instance", &json!({"run_id": run_id})).0,
            200
        );
    }
    assert!(std::fs::read_dir(&journal).unwrap().next().is_none());
    second.start_local("after");
    assert_eq!(second.exec("after", "echo ok")["output"], "ok\n");
    drop(second);
    drop(first);
}

fn a_container_removed_from_outside_is_noticed(engine: Engine) {
    if !test_bed_ready(engine) {
        return;
    }
    let server = Server::start(&["--health-interval", "0.5"]);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "victim", "container_name": IMAGE, "environment_config": engine.config(json!({}))}),
    );
    assert_eq!(status, 200, "{body}");
    let (_, stats) = server.get("/stats");
    let container = stats["instances"][0]["container"]
        .as_str()
        .unwrap()
        .to_string();
    engine.remove(&container);
    let row = wait_for(
        Duration::from_secs(20),
        "the instance to be reported dead",
        || {
            let (_, stats) = server.get("/stats");
            (stats["instances"][0]["state"] == "dead").then(|| stats["instances"][0].clone())
        },
    );
    // `rm --force` kills, then removes: a health round in between sees it exited, or being
    // removed. Never running ("Up ..."), which is how a listing read wrong would say it.
    let reason = row["dead_reason"].as_str().unwrap();
    assert!(
        reason.contains("removed from outside")
            || (reason.contains("is no longer running (") && !reason.contains("(Up")),
        "{row}"
    );
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "victim", "cmd": "true"}),
    );
    assert_eq!(status, 410, "{body}");
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(available, json!({"instances": 10}));
    assert_eq!(
        server
            .post("/close_instance", &json!({"run_id": "victim"}))
            .0,
        200
    );
}

fn exec_mode(server: &Server, run_id: &str) -> String {
    let (_, stats) = server.get(&format!("/stats?run_id={run_id}"));
    stats["instances"][0]["exec_mode"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn a_sandbox_whose_agent_cannot_run_falls_back_to_the_cli(engine: Engine) {
    // busybox-static is a static executable, so the server takes it as an agent, but it has
    // no `agent` applet: inside the sandbox it exits at once, as an agent on a noexec mount
    // or of a foreign architecture would.
    if !test_bed_ready(engine) || !std::path::Path::new("/bin/busybox").is_file() {
        return;
    }
    let server = Server::start(&["--agent", "/bin/busybox"]);
    for (run_id, config) in [
        ("dock", engine.config(json!({}))),
        ("wrap", json!({"container_type": "bwrap"})),
    ] {
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": IMAGE, "environment_config": config}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(exec_mode(&server, run_id), "cli");
        assert_eq!(
            server.exec(run_id, "echo still works")["output"],
            "still works\n"
        );
        assert_eq!(
            server.post("/close_instance", &json!({"run_id": run_id})).0,
            200
        );
    }
    assert!(
        !server.state_dir.join("agents").exists()
            || std::fs::read_dir(server.state_dir.join("agents"))
                .unwrap()
                .count()
                == 0,
        "agent directories left behind"
    );
    // An agent the runtime cannot even execute (as on a `noexec` mount): `docker run` refuses
    // the entrypoint, and the container is started again without it.
    let unexecutable = server.state_dir.join("agent-without-x");
    std::fs::copy("/bin/busybox", &unexecutable).unwrap();
    std::fs::set_permissions(&unexecutable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let other = Server::start(&["--agent", unexecutable.to_str().unwrap()]);
    let (status, body) = other.post(
        "/start_instance",
        &json!({"run_id": "noexec", "container_name": IMAGE, "environment_config": engine.config(json!({}))}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(exec_mode(&other, "noexec"), "cli");
    assert_eq!(other.exec("noexec", "echo ok")["output"], "ok\n");
    assert!(
        other.log().contains("the agent did not come up"),
        "{}",
        other.log()
    );
    assert_eq!(
        other
            .post("/close_instance", &json!({"run_id": "noexec"}))
            .0,
        200
    );
}

fn exec_mode_cli_forces_the_cli_path_even_with_an_agent(engine: Engine) {
    if !test_bed_ready(engine) {
        return;
    }
    let Some(agent) = static_agent() else {
        return;
    };
    let server = Server::start(&["--agent", &agent]);
    for (run_id, mode) in [("forced", "cli"), ("default", "agent")] {
        let mut config = engine.config(json!({}));
        if mode == "cli" {
            config["exec_mode"] = json!("cli");
        }
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": IMAGE, "environment_config": config}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(exec_mode(&server, run_id), mode);
        assert_eq!(server.exec(run_id, "echo ok")["output"], "ok\n");
        assert_eq!(
            server.post("/close_instance", &json!({"run_id": run_id})).0,
            200
        );
    }
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "bad", "container_name": IMAGE,
                "environment_config": engine.config(json!({"exec_mode": "fast"}))}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("exec_mode"),
        "{body}"
    );
}

#[test]
fn a_restart_with_less_room_adopts_the_oldest_that_fit_and_removes_the_rest() {
    let mut first = Server::start(&["--max-resources", r#"{"instances": 3}"#]);
    for run_id in ["one", "two", "three"] {
        first.start_local(run_id);
        assert_eq!(
            first.exec(run_id, "echo $ARSERVICE_RUN_ID > mine")["returncode"],
            0
        );
    }
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).expect("killed");
    let journal = first.state_dir.join("journal");
    std::fs::write(journal.join("damaged.json"), b"{\"version\": 1, \"run_").unwrap();

    let state_dir = first.state_dir.to_str().unwrap().to_string();
    let second = Server::start_with(Options {
        args: vec![
            "--state-dir",
            &state_dir,
            "--max-resources",
            r#"{"instances": 2}"#,
        ],
        env: vec![],
    });
    let (_, stats) = second.get("/stats");
    let listed: Vec<&str> = stats["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["one", "two"], "{stats}");
    assert_eq!(stats["available_resources"], json!({"instances": 0}));
    assert_eq!(second.exec("two", "cat mine")["output"], "two\n");
    assert!(!second.state_dir.join("instances/three").exists());
    let mut recorded: Vec<String> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    recorded.sort();
    assert_eq!(recorded, ["one.json", "two.json"]);
    let log = second.log();
    assert!(
        log.contains("not adopting three") && log.contains("no longer fits"),
        "{log}"
    );
    assert!(log.contains("ignoring unreadable journal file"), "{log}");
    drop(second);
    drop(first);
}

fn the_agent_is_pid_1_of_its_container_and_reaps_orphans(engine: Engine) {
    if !test_bed_ready(engine) {
        return;
    }
    let Some(agent) = static_agent() else {
        return;
    };
    let server = Server::start(&["--agent", &agent]);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "init", "container_name": IMAGE, "environment_config": engine.config(json!({}))}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(exec_mode(&server, "init"), "agent");
    let pid1 = server.exec("init", "tr '\\0' ' ' < /proc/1/cmdline");
    assert_eq!(
        pid1["output"], "/.arservice/agent agent --socket /.arservice/run/agent.sock ",
        "{pid1}"
    );
    // The subshell exits at once: its `sleep` is an orphan, handed to the serving agent (a
    // subreaper; PID 1 for anything that escapes it), which must reap it when it ends (a zombie
    // keeps its /proc entry until reaped). It runs 2 s, so that the count below still sees it on
    // a loaded machine (0.3 s was once over before the next command ran).
    let orphan = server.exec("init", "(sleep 2 >/dev/null 2>&1 &) ; echo left");
    assert_eq!(orphan["output"], "left\n", "{orphan}");
    let sleeps = "grep -l '^[0-9]* (sleep)' /proc/[0-9]*/stat 2>/dev/null | wc -l";
    assert_eq!(
        server.exec("init", sleeps)["output"],
        "1\n",
        "the orphan runs"
    );
    wait_for(Duration::from_secs(10), "the orphan to be reaped", || {
        (server.exec("init", sleeps)["output"] == "0\n").then_some(())
    });
    assert_eq!(
        server.post("/close_instance", &json!({"run_id": "init"})).0,
        200
    );
}

fn a_command_in_one_instance_cannot_reach_another_instances_agent(engine: Engine) {
    if !test_bed_ready(engine) {
        return;
    }
    let Some(agent) = static_agent() else {
        return;
    };
    // The bubblewrap rootfs is a client's choice of host directory: allowed here.
    let server = Server::start(&["--agent", &agent, "--allow-client-host-access"]);
    let agents = server.state_dir.join("agents");
    for (run_id, config) in [
        ("dock-a", engine.config(json!({}))),
        ("dock-b", engine.config(json!({}))),
        ("wrap-a", json!({"container_type": "bwrap"})),
        ("wrap-b", json!({"container_type": "bwrap"})),
    ] {
        let image = if run_id.starts_with("dock") {
            IMAGE
        } else {
            ROOTFS
        };
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": image, "environment_config": config}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(exec_mode(&server, run_id), "agent");
    }
    let dirs: Vec<String> = std::fs::read_dir(&agents)
        .unwrap()
        .map(|entry| entry.unwrap().path().display().to_string())
        .collect();
    assert_eq!(dirs.len(), 4, "one agent directory per instance: {dirs:?}");
    for dir in &dirs {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{dir}");
    }
    for run_id in ["dock-a", "wrap-a"] {
        // Its own directory holds its socket only; the others' are not in its file system.
        let own = server.exec(run_id, "ls -A /.arservice/run");
        assert_eq!(own["output"], "agent.sock\n", "{run_id}: {own}");
        for dir in &dirs {
            let probe = server.exec(run_id, &format!("ls {dir} 2>&1 || echo unreachable"));
            assert!(
                probe["output"].as_str().unwrap().ends_with("unreachable\n"),
                "{run_id} sees {dir}: {probe}"
            );
        }
    }
    for run_id in ["dock-a", "dock-b", "wrap-a", "wrap-b"] {
        assert_eq!(
            server.post("/close_instance", &json!({"run_id": run_id})).0,
            200
        );
    }
}

/// Host pids of the `sleep 900` processes that carry the instance marker `sandbox`.
fn marked_sleeps(sandbox: &str) -> Vec<i32> {
    let marker = format!("ARSERVICE_INSTANCE={sandbox}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let marked = environ
                .split(|&b| b == 0)
                .any(|var| var == marker.as_bytes());
            (marked && cmdline.starts_with(b"sleep\0900")).then_some(pid)
        })
        .collect()
}

/// The container cases, for each engine.
macro_rules! engines {
    ($($engine:ident: $value:expr),* $(,)?) => {
        $(
            mod $engine {
                use super::*;
                #[test] fn a_restart_after_kill_9_adopts_what_runs_and_removes_the_rest() { super::a_restart_after_kill_9_adopts_what_runs_and_removes_the_rest($value) }
                #[test] fn a_container_removed_from_outside_is_noticed() { super::a_container_removed_from_outside_is_noticed($value) }
                #[test] fn a_sandbox_whose_agent_cannot_run_falls_back_to_the_cli() { super::a_sandbox_whose_agent_cannot_run_falls_back_to_the_cli($value) }
                #[test] fn exec_mode_cli_forces_the_cli_path_even_with_an_agent() { super::exec_mode_cli_forces_the_cli_path_even_with_an_agent($value) }
                #[test] fn the_agent_is_pid_1_of_its_container_and_reaps_orphans() { super::the_agent_is_pid_1_of_its_container_and_reaps_orphans($value) }
                #[test] fn a_command_in_one_instance_cannot_reach_another_instances_agent() { super::a_command_in_one_instance_cannot_reach_another_instances_agent($value) }
            }
        )*
    };
}

engines!(docker: DOCKER, podman: PODMAN);
