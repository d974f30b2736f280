//! The exec paths the suites run through: one [`Flavor`] per environment kind and exec mode,
//! with what it needs from the machine, how its server is started, how an instance is
//! started (checking the exec path `/stats` reports), and what an instance may leave behind.
//!
//! Shared by `tests/conformance.rs` (the environment cases) and `tests/exec_cases.rs` (the
//! table of exec cases): a flavor added here is one line in each suite's list.
//!
//! Podman runs for real: rootful, the test bed's images loaded into its own store (podman names
//! them `localhost/NAME`; `NAME` finds them), on its CLI path and through the agent; and
//! rootless, the server run as the test bed's unprivileged user, whose podman has the busybox
//! image in its own store.
//!
//! Apptainer and enroot cannot be installed on the test machine: their flavors run the real
//! server against the stand-ins in `tests/standin/` (bash scripts that accept exactly the
//! command lines arservice uses and run the commands through bubblewrap), so they check
//! arservice's side of those tools, not the tools.

use super::{agent_binary, Server, TestUser, ROOTLESS_USER};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The test bed's root filesystem with bash (see `.ci/testbed.sh`).
pub const ROOTFS: &str = "/var/lib/arservice-testbed/rootfs-bash";
pub const IMAGE_BUSYBOX: &str = "arservice-test/busybox:latest";
pub const IMAGE_BASH: &str = "arservice-test/bash:latest";
/// The stand-ins for the CLIs that cannot be installed here.
pub const STANDIN_APPTAINER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/standin/apptainer");
pub const STANDIN_ENROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/standin/enroot");
/// An image the Docker engine does not have: converting it fails.
pub const IMAGE_MISSING: &str = "arservice-test/no-such-image:1";

/// What a flavor needs from the machine.
#[derive(Clone, Copy)]
pub enum Need {
    Docker(&'static str),
    /// Podman with the test image in its own store.
    Podman(&'static str),
    /// Rootless podman: the test bed's unprivileged user, with the image in its store.
    RootlessPodman(&'static str),
    /// The static agent build (`.ci/run` makes it).
    Agent,
    Bwrap,
    Dir(&'static str),
    /// A Slurm controller that answers, with a usable node.
    Slurm,
}

impl Need {
    /// What is missing, in words; `None` when the machine has it.
    pub fn missing(self) -> Option<String> {
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
            Need::Podman(image) => {
                if !works("podman", &["--version"]) {
                    Some("podman".into())
                } else if !works("podman", &["image", "exists", image]) {
                    Some(format!("the test image {image} in podman's store"))
                } else {
                    None
                }
            }
            Need::RootlessPodman(image) => match TestUser::lookup(ROOTLESS_USER) {
                None => Some(format!("the user {ROOTLESS_USER}")),
                Some(user) => {
                    let mut exists = user.command("podman");
                    exists.args(["image", "exists", image]).current_dir("/");
                    (!exists.output().is_ok_and(|out| out.status.success())).then(|| {
                        format!("rootless podman of {ROOTLESS_USER} with the test image {image}")
                    })
                }
            },
            Need::Bwrap => (!works("bwrap", &["--version"])).then(|| "bwrap".into()),
            Need::Dir(dir) => (!Path::new(dir).is_dir()).then(|| format!("the directory {dir}")),
            Need::Agent => {
                (!arservice::env::agent::elf::is_static_executable(Path::new(&agent_binary())))
                    .then(|| format!("the static agent build {}", agent_binary()))
            }
            Need::Slurm => (!slurm_usable()).then(|| "a running Slurm with a usable node".into()),
        }
    }
}

/// True when a Slurm controller answers and has a usable node. A node that is busy finishing
/// other tests' jobs (`comp`, `mix-`, ...) is usable; one that is down or drained is not. A
/// node in between states gets a few seconds to settle.
pub fn slurm_usable() -> bool {
    let usable = || {
        Command::new("sinfo")
            .args(["--noheader", "--format=%t"])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .any(|state| {
                        let state = state
                            .trim_end_matches(['*', '~', '#', '-', '+', '$', '@', '^', '!', '%']);
                        matches!(
                            state,
                            "idle"
                                | "mix"
                                | "alloc"
                                | "comp"
                                | "completing"
                                | "mixed"
                                | "allocated"
                        )
                    })
            })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match usable() {
            None => return false,
            Some(true) => return true,
            Some(false) if Instant::now() > deadline => return false,
            Some(false) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Which runner the flavor's server uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Runner {
    Local,
    /// Every instance a job of the test bed's Slurm.
    Slurm,
}

/// One exec path: an environment kind with its configuration and exec mode.
pub struct Flavor {
    pub name: &'static str,
    pub container_name: &'static str,
    pub config: Value,
    pub needs: Vec<Need>,
    pub runner: Runner,
    /// True when commands go through an agent (the static build in the sandbox, or the Slurm
    /// job's own server): the server gets `--agent`, and every instance must say `agent`.
    pub agent: bool,
    /// A working directory that exists (or is created) for the cwd case; `None`: a fresh
    /// directory on the host.
    pub cwd: Option<&'static str>,
    /// True when the sandbox shows its processes in `ps` of its own (a container).
    pub has_ps_inside: bool,
    /// A start request that fails in this environment, and the status it must get.
    pub failing_start: fn(&Server) -> (Value, u16),
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
    pub fn local() -> Flavor {
        Flavor {
            name: "local",
            container_name: "local",
            config: json!({"container_type": "local"}),
            needs: vec![],
            runner: Runner::Local,
            cwd: None,
            has_ps_inside: false,
            agent: false,
            failing_start: |server| blocked_dir_start(server, json!({"container_type": "local"})),
        }
    }

    /// Docker on its CLI path (`docker exec`), forced with `exec_mode: "cli"`.
    pub fn docker(image: &'static str) -> Flavor {
        Flavor {
            name: "docker",
            container_name: image,
            config: json!({"container_type": "docker", "exec_mode": "cli"}),
            needs: vec![Need::Docker(image)],
            runner: Runner::Local,
            cwd: Some("/testbed"),
            has_ps_inside: true,
            agent: false,
            failing_start: |_| {
                (
                    json!({"run_id": "doomed", "container_name": IMAGE_MISSING,
                           "environment_config": {"container_type": "docker", "pull_timeout": 20}}),
                    500,
                )
            },
        }
    }

    /// `flavor` through the agent: the server runs with `--agent`, the config asks for it.
    pub fn with_agent(mut flavor: Flavor, name: &'static str) -> Flavor {
        flavor.name = name;
        flavor.needs.push(Need::Agent);
        flavor.agent = true;
        flavor.config["exec_mode"] = json!("agent");
        flavor
    }

    pub fn docker_agent(image: &'static str) -> Flavor {
        Flavor::with_agent(Flavor::docker(image), "docker (agent)")
    }

    pub fn docker_busybox() -> Flavor {
        Flavor::docker(IMAGE_BUSYBOX)
    }

    /// Podman on its CLI path: the docker code with podman's CLI, the test bed's images asked
    /// for by the names docker knows them by.
    pub fn podman(image: &'static str) -> Flavor {
        Flavor {
            name: "podman",
            container_name: image,
            config: json!({"container_type": "podman", "exec_mode": "cli"}),
            needs: vec![Need::Podman(image)],
            runner: Runner::Local,
            cwd: Some("/testbed"),
            has_ps_inside: true,
            agent: false,
            failing_start: |_| {
                (
                    json!({"run_id": "doomed", "container_name": IMAGE_MISSING,
                           "environment_config": {"container_type": "podman", "pull_timeout": 20}}),
                    500,
                )
            },
        }
    }

    pub fn podman_busybox() -> Flavor {
        Flavor::podman(IMAGE_BUSYBOX)
    }

    pub fn podman_bash() -> Flavor {
        Flavor::podman(IMAGE_BASH)
    }

    pub fn podman_agent_busybox() -> Flavor {
        Flavor::with_agent(Flavor::podman(IMAGE_BUSYBOX), "podman (agent)")
    }

    pub fn podman_agent_bash() -> Flavor {
        Flavor::with_agent(Flavor::podman(IMAGE_BASH), "podman (agent)")
    }

    /// Rootless podman: its server runs as the test bed's unprivileged user (on the CLI path
    /// and with the agent), and so does every podman call of the test.
    pub fn podman_rootless() -> Flavor {
        let mut flavor = Flavor::podman(IMAGE_BUSYBOX);
        flavor.name = "podman (rootless)";
        flavor.needs = vec![Need::RootlessPodman(IMAGE_BUSYBOX)];
        flavor
    }

    pub fn podman_rootless_agent() -> Flavor {
        Flavor::with_agent(Flavor::podman_rootless(), "podman (rootless, agent)")
    }

    /// The user this flavor's server runs as, when it is not root.
    pub fn user(&self) -> Option<TestUser> {
        self.needs
            .iter()
            .any(|need| matches!(need, Need::RootlessPodman(_)))
            .then(|| TestUser::lookup(ROOTLESS_USER).expect("the rootless user"))
    }

    /// The CLI that lists and enters this flavor's containers, as the flavor's user.
    pub fn container_cli(&self) -> Command {
        let cli = if self.config["container_type"] == "podman" {
            "podman"
        } else {
            "docker"
        };
        match self.user() {
            Some(user) => {
                let mut command = user.command(cli);
                command.current_dir("/");
                command
            }
            None => Command::new(cli),
        }
    }

    /// Everything an instance of this flavor may leave outside the server (see
    /// [`leftovers`]), its containers looked for through its own CLI.
    pub fn leftovers(&self, server: &Server, run_id: &str) -> Vec<String> {
        leftovers_with(self.container_cli(), server, run_id)
    }

    pub fn docker_bash() -> Flavor {
        Flavor::docker(IMAGE_BASH)
    }

    pub fn docker_agent_busybox() -> Flavor {
        Flavor::docker_agent(IMAGE_BUSYBOX)
    }

    pub fn docker_agent_bash() -> Flavor {
        Flavor::docker_agent(IMAGE_BASH)
    }

    /// Bubblewrap over the host's own root, one sandbox per command.
    pub fn bwrap_host() -> Flavor {
        Flavor {
            name: "bwrap",
            container_name: "host",
            config: json!({"container_type": "bubblewrap", "exec_mode": "cli"}),
            needs: vec![Need::Bwrap],
            runner: Runner::Local,
            cwd: None,
            has_ps_inside: false,
            agent: false,
            failing_start: |server| blocked_dir_start(server, json!({"container_type": "bwrap"})),
        }
    }

    /// Bubblewrap over the test bed's root filesystem, one sandbox per command.
    pub fn bwrap_rootfs() -> Flavor {
        Flavor {
            name: "bwrap rootfs",
            container_name: ROOTFS,
            config: json!({"container_type": "bubblewrap", "exec_mode": "cli"}),
            needs: vec![Need::Bwrap, Need::Dir(ROOTFS)],
            runner: Runner::Local,
            cwd: Some("/testbed"),
            has_ps_inside: false,
            agent: false,
            failing_start: |server| {
                blocked_dir_start(server, json!({"container_type": "bwrap", "image": ROOTFS}))
            },
        }
    }

    pub fn bwrap_agent_host() -> Flavor {
        Flavor::with_agent(Flavor::bwrap_host(), "bwrap (agent)")
    }

    pub fn bwrap_agent_rootfs() -> Flavor {
        Flavor::with_agent(Flavor::bwrap_rootfs(), "bwrap rootfs (agent)")
    }

    /// Apptainer (through its stand-in) with the instance's writes in memory; the image is
    /// converted from a docker reference (`docker://`), the type named by its first name.
    pub fn apptainer_tmpfs() -> Flavor {
        Flavor {
            name: "apptainer (stand-in, tmpfs)",
            container_name: IMAGE_BASH,
            config: json!({"container_type": "singularity", "executable": STANDIN_APPTAINER,
                           "exec_mode": "cli"}),
            needs: vec![Need::Bwrap, Need::Docker(IMAGE_BASH)],
            runner: Runner::Local,
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
    pub fn apptainer_overlay() -> Flavor {
        Flavor {
            name: "apptainer (stand-in, overlay)",
            container_name: "docker-daemon://arservice-test/bash:latest",
            config: json!({"container_type": "apptainer", "executable": STANDIN_APPTAINER,
                           "writable": "overlay", "exec_mode": "cli"}),
            needs: vec![Need::Bwrap, Need::Docker(IMAGE_BASH)],
            runner: Runner::Local,
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

    /// Apptainer (through its stand-in) with the agent: bound in at `instance start`, run by
    /// one long-lived `exec instance://`.
    pub fn apptainer_agent() -> Flavor {
        Flavor::with_agent(Flavor::apptainer_tmpfs(), "apptainer (stand-in, agent)")
    }

    /// Enroot (through its stand-in): one container and its process per instance.
    pub fn enroot() -> Flavor {
        Flavor {
            name: "enroot (stand-in)",
            container_name: IMAGE_BASH,
            config: json!({"container_type": "enroot", "executable": STANDIN_ENROOT,
                           "exec_mode": "cli"}),
            needs: vec![Need::Bwrap, Need::Docker(IMAGE_BASH)],
            runner: Runner::Local,
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

    /// Enroot (through its stand-in) with the agent as the container process.
    pub fn enroot_agent() -> Flavor {
        Flavor::with_agent(Flavor::enroot(), "enroot (stand-in, agent)")
    }

    /// `local` inside a job of the test bed's Slurm, in exec mode `mode`: `agent` (commands
    /// go to the job's own server on the node) or `cli` (each command an `srun` step).
    fn slurm(mode: &'static str) -> Flavor {
        Flavor {
            name: if mode == "agent" {
                "slurm (agent)"
            } else {
                "slurm (cli)"
            },
            container_name: "local",
            config: json!({"container_type": "local", "exec_mode": mode}),
            needs: vec![Need::Slurm],
            runner: Runner::Slurm,
            cwd: None,
            has_ps_inside: false,
            agent: mode == "agent",
            failing_start: |_| {
                (
                    json!({"run_id": "doomed", "container_name": "local",
                           "environment_config": {"container_type": "local",
                                                  "slurm": {"partition": "no-such-partition"}}}),
                    500,
                )
            },
        }
    }

    pub fn slurm_agent() -> Flavor {
        Flavor::slurm("agent")
    }

    pub fn slurm_cli() -> Flavor {
        Flavor::slurm("cli")
    }

    /// What the machine lacks for this flavor, in words; `None` when it has everything.
    pub fn missing(&self) -> Option<String> {
        self.needs.iter().find_map(|need| need.missing())
    }

    /// Skips (or, in CI, fails) when the machine lacks what this flavor needs.
    pub fn available(&self) -> bool {
        match self.missing() {
            Some(missing) => super::require(
                false,
                &format!(
                    "{} needs {missing}: run `sudo bash .ci/testbed.sh`",
                    self.name
                ),
            ),
            None => true,
        }
    }

    /// The server arguments this flavor needs (runner, agent), besides a suite's own. The
    /// flavors set what only the operator may by default (a bubblewrap rootfs or host `cwd`,
    /// the stand-ins as `executable`), hence `--allow-client-host-access`: the suites test the
    /// environments, tests/security.rs the policy.
    pub fn server_args(&self) -> Vec<String> {
        let mut args: Vec<String> = match (self.runner, self.agent) {
            (Runner::Local, false) => vec![],
            (Runner::Local, true) => vec!["--agent".into(), agent_binary()],
            (Runner::Slurm, _) => vec![
                "--runner".into(),
                "slurm".into(),
                "--max-resources".into(),
                r#"{"jobs": 2}"#.into(),
            ],
        };
        args.push("--allow-client-host-access".into());
        args
    }

    /// Starts this flavor's server with `args` (a suite's own) and `env`.
    pub fn server(&self, args: &[&str], env: Vec<(&str, &str)>) -> Server {
        let own = self.server_args();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(own.iter().map(String::as_str));
        let options = super::Options { args: all, env };
        match self.user() {
            Some(user) => Server::start_as(&user, options),
            None => Server::start_with(options),
        }
    }

    /// Starts an instance with `extra` merged into the flavor's config, and checks that it
    /// runs its commands on this flavor's exec path.
    pub fn start(&self, server: &Server, run_id: &str, extra: Value) {
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
        if config["container_type"] != "local" || self.runner == Runner::Slurm {
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

/// The sandbox name of an instance (`ars-<server id>-<run_id>`): its container, its Slurm
/// job and the value of its processes' `ARSERVICE_INSTANCE` marker.
pub fn sandbox_name(server: &Server, run_id: &str) -> String {
    let (_, stats) = server.get("/stats");
    format!("ars-{}-{run_id}", stats["server_id"].as_str().unwrap())
}

/// Everything an instance may leave outside the server: containers, Slurm jobs, marked
/// processes, mounts and its directory.
pub fn leftovers(server: &Server, run_id: &str) -> Vec<String> {
    leftovers_with(Command::new("docker"), server, run_id)
}

/// [`leftovers`], with containers listed by `container_cli` (docker or podman).
fn leftovers_with(mut container_cli: Command, server: &Server, run_id: &str) -> Vec<String> {
    let sandbox = sandbox_name(server, run_id);
    let mut found = Vec::new();
    // Docker's names start with a slash, podman's do not.
    if let Ok(output) = container_cli
        .args(["ps", "--all", "--quiet", "--filter"])
        .arg(format!("name=^/?{sandbox}$"))
        .output()
    {
        if !output.stdout.is_empty() {
            found.push(format!("container {sandbox}"));
        }
    }
    if let Ok(output) = Command::new("squeue")
        .args(["--noheader", "--format=%i %j", "--name", &sandbox])
        .output()
    {
        let jobs = String::from_utf8_lossy(&output.stdout);
        found.extend(jobs.lines().map(|job| format!("job {job}")));
    }
    let marker = format!("ARSERVICE_INSTANCE={sandbox}");
    let dir = server.state_dir.join("instances").join(run_id);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(environ) = std::fs::read(entry.path().join("environ")) {
            if environ
                .split(|&b| b == 0)
                .any(|var| var == marker.as_bytes())
            {
                found.push(format!("process {:?}", entry.file_name()));
            }
        }
        // A Slurm job's server on the node runs from the instance's directory.
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&format!("{}/", dir.display())) {
                found.push(format!("process {:?}: {cmdline}", entry.file_name()));
            }
        }
    }
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

/// Pids on this machine whose command line contains `needle`, with their command lines.
pub fn processes_running(needle: &str) -> Vec<String> {
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
