//! One conformance suite, run against every environment kind through the real server.
//!
//! Each flavor (an environment with its config) runs the same cases: echo, returncode, cwd,
//! env, forward_env, stderr order, per-command overrides, timeout kill (nothing left running),
//! output cap, files persisting, concurrent commands, close leaving nothing behind, failed
//! start leaving nothing behind. A flavor whose tool is missing is skipped with a loud line,
//! except in CI (`CI=true`), where it fails.
//!
//! Apptainer and enroot cannot be installed on the test machine: their flavors run the real
//! server against the stand-ins in `tests/standin/` (bash scripts that accept exactly the
//! command lines arservice uses and run the commands through bubblewrap), so they check
//! arservice's side of those tools, not the tools.

mod support;

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{agent_binary, wait_for, CloseAll, Server, TempDir};

/// The test bed's root filesystem with bash (see `.ci/testbed.sh`).
const ROOTFS: &str = "/var/lib/arservice-testbed/rootfs-bash";
const IMAGE_BUSYBOX: &str = "arservice-test/busybox:latest";
const IMAGE_BASH: &str = "arservice-test/bash:latest";
/// The stand-ins for the CLIs that cannot be installed here.
const STANDIN_APPTAINER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/standin/apptainer");
const STANDIN_ENROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/standin/enroot");
/// An image the Docker engine does not have: converting it fails.
const IMAGE_MISSING: &str = "arservice-test/no-such-image:1";

/// The output cap the suite's servers run with.
const CAP: usize = 10_000;

/// What a flavor needs from the machine.
#[derive(Clone, Copy)]
enum Need {
    Docker(&'static str),
    /// The static agent build (`.ci/run` makes it).
    Agent,
    Bwrap,
    Dir(&'static str),
}

impl Need {
    fn missing(self) -> Option<String> {
        let works = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .output()
                .is_ok_and(|output| output.status.success())
        };
        match self {
            Need::Docker(image) => {
                if !works("docker", &["info"]) {
                    Some("a running Docker engine".into())
                } else if !works("docker", &["image", "inspect", image]) {
                    Some(format!("the test image {image}"))
                } else {
                    None
                }
            }
            Need::Bwrap => (!works("bwrap", &["--version"])).then(|| "bwrap".into()),
            Need::Dir(dir) => (!Path::new(dir).is_dir()).then(|| format!("the directory {dir}")),
            Need::Agent => (!arservice::agent::is_static_executable(Path::new(&agent_binary())))
                .then(|| format!("the static agent build {}", agent_binary())),
        }
    }
}

/// One environment kind with its configuration.
struct Flavor {
    name: &'static str,
    container_name: &'static str,
    config: Value,
    needs: Vec<Need>,
    /// A working directory that exists (or is created) for the cwd case; `None`: a fresh
    /// directory on the host.
    cwd: Option<&'static str>,
    /// True when the sandbox shows its processes in `ps` of its own (a container).
    has_ps_inside: bool,
    /// A start request that fails in this environment, and whether it is caught as a 400.
    failing_start: fn(&Server) -> (Value, u16),
    /// Run the server with the static agent, and check every instance uses it.
    agent: bool,
}

/// Makes `instances/<run_id>` a file, so an environment cannot create its directory.
fn blocked_dir_start(server: &Server, config: Value) -> (Value, u16) {
    std::fs::write(server.state_dir.join("instances/doomed"), b"").unwrap();
    (
        json!({"run_id": "doomed", "container_name": "x", "environment_config": config}),
        500,
    )
}

impl Flavor {
    fn local() -> Flavor {
        Flavor {
            name: "local",
            container_name: "local",
            config: json!({"container_type": "local"}),
            needs: vec![],
            cwd: None,
            has_ps_inside: false,
            agent: false,
            failing_start: |server| blocked_dir_start(server, json!({"container_type": "local"})),
        }
    }

    fn docker(image: &'static str) -> Flavor {
        Flavor {
            name: "docker",
            container_name: image,
            config: json!({"container_type": "docker", "exec_mode": "cli"}),
            needs: vec![Need::Docker(image)],
            cwd: Some("/testbed"),
            has_ps_inside: true,
            agent: false,
            failing_start: |_| {
                (
                    json!({"run_id": "doomed", "container_name": "arservice-test/no-such-image:1",
                           "environment_config": {"container_type": "docker", "pull_timeout": 20}}),
                    500,
                )
            },
        }
    }

    fn docker_agent(image: &'static str) -> Flavor {
        Flavor::with_agent(Flavor::docker(image), "docker (agent)")
    }

    fn docker_agent_busybox() -> Flavor {
        Flavor::docker_agent(IMAGE_BUSYBOX)
    }

    fn docker_agent_bash() -> Flavor {
        Flavor::docker_agent(IMAGE_BASH)
    }

    /// The flavor through the agent: the static binary, which the CLI flavors turn off with
    /// `exec_mode: "cli"` (an agent is the default wherever the binary is static).
    fn with_agent(mut flavor: Flavor, name: &'static str) -> Flavor {
        flavor.name = name;
        flavor.config.as_object_mut().unwrap().remove("exec_mode");
        flavor.needs.push(Need::Agent);
        flavor.agent = true;
        flavor
    }

    fn bwrap_agent_host() -> Flavor {
        Flavor::with_agent(Flavor::bwrap_host(), "bwrap (agent)")
    }

    fn bwrap_agent_rootfs() -> Flavor {
        Flavor::with_agent(Flavor::bwrap_rootfs(), "bwrap rootfs (agent)")
    }

    fn docker_busybox() -> Flavor {
        Flavor::docker(IMAGE_BUSYBOX)
    }

    fn docker_bash() -> Flavor {
        Flavor::docker(IMAGE_BASH)
    }

    fn bwrap_host() -> Flavor {
        Flavor {
            name: "bwrap",
            container_name: "host",
            config: json!({"container_type": "bubblewrap", "exec_mode": "cli"}),
            needs: vec![Need::Bwrap],
            cwd: None,
            has_ps_inside: false,
            agent: false,
            failing_start: |server| blocked_dir_start(server, json!({"container_type": "bwrap"})),
        }
    }

    fn bwrap_rootfs() -> Flavor {
        Flavor {
            name: "bwrap",
            container_name: ROOTFS,
            config: json!({"container_type": "bubblewrap", "exec_mode": "cli"}),
            needs: vec![Need::Bwrap, Need::Dir(ROOTFS)],
            cwd: Some("/testbed"),
            has_ps_inside: false,
            agent: false,
            failing_start: |server| {
                blocked_dir_start(server, json!({"container_type": "bwrap", "image": ROOTFS}))
            },
        }
    }

    /// Apptainer (through its stand-in) with the instance's writes in memory; the image is
    /// converted from a docker reference (`docker://`), the type named by its first name.
    fn apptainer_tmpfs() -> Flavor {
        Flavor {
            name: "apptainer (stand-in, tmpfs)",
            container_name: IMAGE_BASH,
            config: json!({"container_type": "singularity", "executable": STANDIN_APPTAINER, "exec_mode": "cli"}),
            needs: vec![Need::Bwrap, Need::Docker(IMAGE_BASH)],
            cwd: Some("/testbed"),
            has_ps_inside: false,
            agent: false,
            failing_start: |_| {
                (
                    json!({"run_id": "doomed", "container_name": IMAGE_MISSING,
                           "environment_config": {"container_type": "singularity",
                                                  "executable": STANDIN_APPTAINER}}),
                    500,
                )
            },
        }
    }

    /// Apptainer (through its stand-in) with the instance's writes in an overlay directory
    /// under its state dir; the image read from the Docker daemon, the type by its alias.
    fn apptainer_overlay() -> Flavor {
        Flavor {
            name: "apptainer (stand-in, overlay)",
            container_name: "docker-daemon://arservice-test/bash:latest",
            config: json!({"container_type": "apptainer", "executable": STANDIN_APPTAINER,
                           "writable": "overlay", "exec_mode": "cli"}),
            needs: vec![Need::Bwrap, Need::Docker(IMAGE_BASH)],
            cwd: Some("/testbed"),
            has_ps_inside: false,
            agent: false,
            failing_start: |_| {
                (
                    json!({"run_id": "doomed", "container_name": "/nonexistent/image.sif",
                           "environment_config": {"container_type": "apptainer",
                                                  "executable": STANDIN_APPTAINER,
                                                  "writable": "overlay"}}),
                    400,
                )
            },
        }
    }

    /// Enroot (through its stand-in): one container and its process per instance.
    fn enroot() -> Flavor {
        Flavor {
            name: "enroot (stand-in)",
            container_name: IMAGE_BASH,
            config: json!({"container_type": "enroot", "executable": STANDIN_ENROOT, "exec_mode": "cli"}),
            needs: vec![Need::Bwrap, Need::Docker(IMAGE_BASH)],
            cwd: Some("/testbed"),
            has_ps_inside: false,
            agent: false,
            failing_start: |_| {
                (
                    json!({"run_id": "doomed", "container_name": IMAGE_MISSING,
                           "environment_config": {"container_type": "enroot",
                                                  "executable": STANDIN_ENROOT}}),
                    500,
                )
            },
        }
    }

    /// Apptainer (through its stand-in) with the agent: bound in at `instance start`, run by
    /// one long-lived `exec instance://`.
    fn apptainer_agent() -> Flavor {
        Flavor::with_agent(Flavor::apptainer_tmpfs(), "apptainer (stand-in, agent)")
    }

    /// Enroot (through its stand-in) with the agent as the container process.
    fn enroot_agent() -> Flavor {
        Flavor::with_agent(Flavor::enroot(), "enroot (stand-in, agent)")
    }

    /// Skips (or, in CI, fails) when the machine lacks what this flavor needs.
    fn available(&self) -> bool {
        for need in &self.needs {
            if let Some(missing) = need.missing() {
                return support::require(
                    false,
                    &format!(
                        "{} conformance needs {missing}: run `sudo bash .ci/testbed.sh`",
                        self.name
                    ),
                );
            }
        }
        true
    }

    fn server(&self) -> Server {
        let agent = agent_binary();
        let mut args = vec![
            "--max-output-bytes",
            "10000",
            "--max-resources",
            r#"{"instances": 20}"#,
        ];
        if self.agent {
            args.extend(["--agent", agent.as_str()]);
        }
        Server::start_with(support::Options {
            args,
            env: vec![("ARS_FORWARDED", "from-server"), ("ARS_HIDDEN", "secret")],
        })
    }

    /// Starts an instance with `extra` merged into the flavor's config.
    fn start(&self, server: &Server, run_id: &str, extra: Value) {
        let mut config = self.config.clone();
        for (key, value) in extra.as_object().unwrap() {
            config[key] = value.clone();
        }
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": self.container_name,
                    "environment_config": config}),
        );
        assert_eq!(status, 200, "{} start: {body}", self.name);
        // Every sandbox but `local` says how its commands run: through the agent in the
        // agent flavors, through the CLI (or one sandbox per command) in the others.
        if config["container_type"] != "local" {
            let (_, stats) = server.get(&format!("/stats?run_id={run_id}"));
            let expected = if self.agent { "agent" } else { "cli" };
            assert_eq!(
                stats["instances"][0]["exec_mode"], expected,
                "{}: {stats}",
                self.name
            );
        }
    }
}

/// Runs `case` against `flavor` when the machine has what it needs.
fn check(flavor: Flavor, case: fn(&Flavor, &Server)) {
    if flavor.available() {
        let server = flavor.server();
        let _close = CloseAll(&server);
        case(&flavor, &server);
    }
}

/// Everything an instance may leave outside the server: containers, marked processes,
/// mounts and its directory.
fn leftovers(server: &Server, run_id: &str) -> Vec<String> {
    let (_, stats) = server.get("/stats");
    let server_id = stats["server_id"].as_str().unwrap().to_string();
    let sandbox = format!("ars-{server_id}-{run_id}");
    let mut found = Vec::new();
    if let Ok(output) = Command::new("docker")
        .args(["ps", "--all", "--quiet", "--filter"])
        .arg(format!("name=^/{sandbox}$"))
        .output()
    {
        if !output.stdout.is_empty() {
            found.push(format!("container {sandbox}"));
        }
    }
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(environ) = std::fs::read(entry.path().join("environ")) {
            let marker = format!("ARSERVICE_INSTANCE={sandbox}");
            if environ
                .split(|&b| b == 0)
                .any(|var| var == marker.as_bytes())
            {
                found.push(format!("process {:?}", entry.file_name()));
            }
        }
    }
    let dir = server.state_dir.join("instances").join(run_id);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for line in mounts.lines() {
        if line.contains(dir.to_str().unwrap()) {
            found.push(format!("mount {line}"));
        }
    }
    if dir.exists() {
        found.push(format!("directory {}", dir.display()));
    }
    found
}

/// Pids on this machine whose command line contains `needle`.
fn processes_running(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(needle)
                .then(|| format!("{:?}: {cmdline}", entry.file_name()))
        })
        .collect()
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
        let ps = Command::new("docker")
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
        !leftovers(server, "c1").is_empty(),
        "the check sees nothing of a live instance"
    );
    let (status, body) = server.post("/close_instance", &json!({"run_id": "c1"}));
    assert_eq!(status, 200, "{body}");
    let left = leftovers(server, "c1");
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
    let left = leftovers(server, "doomed");
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
