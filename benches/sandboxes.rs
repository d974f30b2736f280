//! Benchmark: docker start, exec and close through arservice beside the raw `docker run -d`,
//! `docker exec` and `docker rm -f` they wrap; commands through the agent in docker and
//! bubblewrap beside their CLI paths; and a command through the Slurm runner beside a
//! raw `srun --overlap` step in the same job. One process, one machine, rounds interleaved so
//! that the noise of a shared machine hits both sides alike; medians and their ratios.
//!
//! `cargo bench --bench sandboxes [-- docker docker_agent bwrap_agent slurm]` (needs the test
//! bed: `.ci/testbed.sh`). Parts whose tool is missing are skipped with a line saying so.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "arservice-test/busybox:latest";
/// Start/close pairs per side.
const CONTAINERS: usize = 15;
/// Commands per side.
const COMMANDS: usize = 200;
/// Rounds the commands are split into, alternating sides.
const ROUNDS: usize = 5;

struct Server {
    child: Child,
    url: String,
    agent: ureq::Agent,
    _state: std::path::PathBuf,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let state = std::env::temp_dir().join(format!(
            "arservice-bench-{}-{}",
            std::process::id(),
            args.len()
        ));
        let _ = std::fs::remove_dir_all(&state);
        let mut child = Command::new(env!("CARGO_BIN_EXE_arservice"))
            .args(["--port", "0", "--log-level", "info", "--state-dir"])
            .arg(&state)
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start arservice");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let port = loop {
            let line = lines.next().expect("arservice exited").unwrap();
            if let Some(rest) = line.split("listening on http://127.0.0.1:").nth(1) {
                break rest.split(' ').next().unwrap().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .new_agent(),
            _state: state,
        }
    }

    fn post(&self, path: &str, body: &Value) -> Value {
        let mut response = self
            .agent
            .post(format!("{}{path}", self.url))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .unwrap();
        let status = response.status().as_u16();
        let mut text = String::new();
        response
            .body_mut()
            .as_reader()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill only sends SIGTERM to our own child, which then closes its instances.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let start = Instant::now();
    let value = f();
    (start.elapsed(), value)
}

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

fn row(what: &str, raw: f64, ours: f64, target: &str) {
    println!(
        "{what:<22} {raw:>10.2} {ours:>12.2} {:>8.2}x   {target}",
        ours / raw
    );
}

fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|out| out.status.success())
}

fn docker() {
    if !works("docker", &["image", "inspect", IMAGE]) {
        println!("docker: skipped (no engine or no {IMAGE}; run .ci/testbed.sh)");
        return;
    }
    let server = Server::start(&[
        "--runner",
        "local",
        "--max-resources",
        r#"{"instances": 100}"#,
    ]);
    let keep_alive = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";
    let (mut raw_start, mut raw_exec, mut raw_close) = (Vec::new(), Vec::new(), Vec::new());
    let (mut our_start, mut our_exec, mut our_close) = (Vec::new(), Vec::new(), Vec::new());
    for index in 0..CONTAINERS {
        let name = format!("bench-raw-{}-{index}", std::process::id());
        let (took, _) = timed(|| {
            run(
                "docker",
                &[
                    "run",
                    "--detach",
                    "--init",
                    "--name",
                    &name,
                    "--entrypoint",
                    "sh",
                    IMAGE,
                    "-c",
                    keep_alive,
                ],
            )
        });
        raw_start.push(took);
        let run_id = format!("bench-{index}");
        let (took, _) = timed(|| {
            server.post("/start_instance", &json!({"run_id": run_id, "container_name": IMAGE, "environment_config": {"container_type": "docker"}}))
        });
        our_start.push(took);
        for _ in 0..COMMANDS / CONTAINERS / 2 {
            raw_exec.push(timed(|| run("docker", &["exec", &name, "true"])).0);
            our_exec.push(
                timed(|| {
                    server.post(
                        "/execute_command",
                        &json!({"run_id": run_id, "cmd": "true"}),
                    )
                })
                .0,
            );
        }
        raw_close.push(timed(|| run("docker", &["rm", "--force", &name])).0);
        our_close.push(timed(|| server.post("/close_instance", &json!({"run_id": run_id}))).0);
    }
    println!(
        "\ndocker through arservice beside the raw CLI (busybox image, medians, this machine)"
    );
    println!(
        "{:<22} {:>10} {:>12} {:>9}   target",
        "", "raw ms", "arservice ms", "ratio"
    );
    row(
        "start (run -d)",
        median_ms(&mut raw_start),
        median_ms(&mut our_start),
        "<= 1.1x",
    );
    row(
        "exec true",
        median_ms(&mut raw_exec),
        median_ms(&mut our_exec),
        "<= 1.1x",
    );
    row(
        "close (rm -f)",
        median_ms(&mut raw_close),
        median_ms(&mut our_close),
        "<= 1.1x",
    );
    println!(
        "({} starts/closes and {} commands per side, interleaved)",
        CONTAINERS,
        raw_exec.len()
    );
}

/// A `local` server with the static agent and room for the benchmark's instances, and
/// `extra` flags.
fn agent_server(agent: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--runner",
        "local",
        "--agent",
        agent,
        "--max-resources",
        r#"{"instances": 100}"#,
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The agent: the (static) binary under benchmark, or `ARSERVICE_TEST_AGENT`.
fn agent_binary() -> String {
    std::env::var("ARSERVICE_TEST_AGENT")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_arservice").to_string())
}

/// Commands through the agent beside raw `docker exec`, at concurrency 1 and 8.
fn docker_agent() {
    let agent = agent_binary();
    if !works("docker", &["image", "inspect", IMAGE]) || !std::path::Path::new(&agent).is_file() {
        println!("docker agent: skipped (no engine, image or static agent build; see .ci/run)");
        return;
    }
    let server = agent_server(&agent, &[]);
    let keep_alive = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";
    let raw_name = format!("bench-raw-agent-{}", std::process::id());
    run(
        "docker",
        &[
            "run",
            "--detach",
            "--init",
            "--name",
            &raw_name,
            "--entrypoint",
            "sh",
            IMAGE,
            "-c",
            keep_alive,
        ],
    );
    for index in 0..8 {
        server.post("/start_instance", &json!({"run_id": format!("agent-{index}"), "container_name": IMAGE, "environment_config": {"container_type": "docker"}}));
    }
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for _ in 0..COMMANDS / ROUNDS / 4 {
            raw.push(timed(|| run("docker", &["exec", &raw_name, "true"])).0);
        }
        for _ in 0..COMMANDS / ROUNDS {
            ours.push(
                timed(|| {
                    server.post(
                        "/execute_command",
                        &json!({"run_id": "agent-0", "cmd": "true"}),
                    )
                })
                .0,
            );
        }
    }
    let throughput = concurrent_commands(&server, "agent");
    run("docker", &["rm", "--force", &raw_name]);
    for index in 0..8 {
        server.post(
            "/close_instance",
            &json!({"run_id": format!("agent-{index}")}),
        );
    }
    println!("\ndocker: a command through the agent beside raw docker exec (busybox, medians, this machine)");
    println!(
        "{:<22} {:>10} {:>12} {:>9}   target",
        "", "raw ms", "arservice ms", "ratio"
    );
    let (raw_p50, our_p50) = (median_ms(&mut raw), median_ms(&mut ours));
    let verdict = |met: bool| if met { "MET" } else { "MISSED" };
    row(
        "exec true, c=1",
        raw_p50,
        our_p50,
        &format!("p50 <= 1.5 ms (issue 12): {}", verdict(our_p50 <= 1.5)),
    );
    println!(
        "{:<22} {:>10} {:>12.0}   target >= 1000/s (the original: ~30/s): {}",
        "exec true, c=8",
        "",
        throughput,
        verdict(throughput >= 1000.0)
    );
    println!("({} raw and {} agent commands at c=1 in {ROUNDS} interleaved rounds; 2000 at c=8 over 8 instances)", raw.len(), ours.len());
}

/// The bubblewrap rootfs that `.ci/testbed.sh` unpacks.
const ROOTFS: &str = "/var/lib/arservice-testbed/rootfs-busybox";

/// bubblewrap commands through the agent (one long-lived sandbox per instance) beside the
/// same instance on its CLI path (one `bwrap` per command, `exec_mode: "cli"`) and a raw
/// `bwrap ... sh -c true`, at concurrency 1; and the agent at concurrency 8.
fn bwrap_agent() {
    let agent = agent_binary();
    if !works("bwrap", &["--version"])
        || !std::path::Path::new(ROOTFS).is_dir()
        || !std::path::Path::new(&agent).is_file()
    {
        println!("bwrap agent: skipped (no bwrap, rootfs or static agent build; see .ci/run)");
        return;
    }
    // A host directory as the root is the operator's to allow (docs/security.md): the
    // benchmark is its own operator.
    let server = agent_server(&agent, &["--allow-client-host-access"]);
    for index in 0..8 {
        server.post("/start_instance", &json!({"run_id": format!("wrap-{index}"), "container_name": ROOTFS, "environment_config": {"container_type": "bwrap"}}));
    }
    server.post("/start_instance", &json!({"run_id": "wrap-cli", "container_name": ROOTFS, "environment_config": {"container_type": "bwrap", "exec_mode": "cli"}}));
    let raw_args = [
        "--ro-bind",
        ROOTFS,
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--unshare-pid",
        "--die-with-parent",
        "sh",
        "-c",
        "true",
    ];
    let (mut raw, mut cli, mut ours) = (Vec::new(), Vec::new(), Vec::new());
    let exec = |run_id: &str| {
        timed(|| {
            server.post(
                "/execute_command",
                &json!({"run_id": run_id, "cmd": "true"}),
            )
        })
        .0
    };
    for _ in 0..ROUNDS {
        for _ in 0..COMMANDS / ROUNDS {
            raw.push(timed(|| run("bwrap", &raw_args)).0);
            cli.push(exec("wrap-cli"));
            ours.push(exec("wrap-0"));
        }
    }
    let throughput = concurrent_commands(&server, "wrap");
    for index in 0..8 {
        server.post(
            "/close_instance",
            &json!({"run_id": format!("wrap-{index}")}),
        );
    }
    server.post("/close_instance", &json!({"run_id": "wrap-cli"}));
    println!("\nbubblewrap: a command through the agent beside the CLI path and raw bwrap (busybox rootfs, medians, this machine)");
    println!(
        "{:<22} {:>10} {:>12} {:>9}   target",
        "", "raw ms", "arservice ms", "ratio"
    );
    let (raw_p50, cli_p50, our_p50) = (
        median_ms(&mut raw),
        median_ms(&mut cli),
        median_ms(&mut ours),
    );
    row("exec true, raw vs cli", raw_p50, cli_p50, "(the CLI path)");
    row(
        "exec true, raw vs agent",
        raw_p50,
        our_p50,
        "unchanged or faster",
    );
    println!(
        "{:<22} {:>10} {:>12.0}   (8 instances, one connection each)",
        "exec true, agent c=8", "", throughput
    );
    println!(
        "({} commands per side at c=1, in {ROUNDS} interleaved rounds)",
        raw.len()
    );
}

/// Commands per second at concurrency 8: one thread per instance `<prefix>-<index>`, each on
/// its own keep-alive connection.
fn concurrent_commands(server: &Server, prefix: &str) -> f64 {
    let per_thread = 250;
    let (elapsed, _) = timed(|| {
        std::thread::scope(|scope| {
            for index in 0..8 {
                scope.spawn(move || {
                    let agent = ureq::Agent::config_builder().build().new_agent();
                    for _ in 0..per_thread {
                        let mut response = agent
                            .post(format!("{}/execute_command", server.url))
                            .send(
                                json!({"run_id": format!("{prefix}-{index}"), "cmd": "true"})
                                    .to_string(),
                            )
                            .unwrap();
                        assert_eq!(response.status().as_u16(), 200);
                        let _ = response.body_mut().read_to_string();
                    }
                });
            }
        })
    });
    (8 * per_thread) as f64 / elapsed.as_secs_f64()
}

fn slurm() {
    if !works("sinfo", &[]) {
        println!("slurm: skipped (no Slurm answers; run .ci/testbed.sh)");
        return;
    }
    let server = Server::start(&["--runner", "slurm", "--max-resources", r#"{"jobs": 4}"#]);
    server.post(
        "/start_instance",
        &json!({"run_id": "bench-slurm", "environment_config": {"container_type": "local"}}),
    );
    let stats: Value = {
        let mut response = server
            .agent
            .get(format!("{}/stats", server.url))
            .call()
            .unwrap();
        let mut text = String::new();
        response
            .body_mut()
            .as_reader()
            .read_to_string(&mut text)
            .unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let job = stats["instances"][0]["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for _ in 0..COMMANDS / ROUNDS / 4 {
            raw.push(
                timed(|| {
                    run(
                        "srun",
                        &["--jobid", &job, "--overlap", "-n1", "--mem=0", "true"],
                    )
                })
                .0,
            );
        }
        for _ in 0..COMMANDS / ROUNDS / 4 {
            ours.push(
                timed(|| {
                    server.post(
                        "/execute_command",
                        &json!({"run_id": "bench-slurm", "cmd": "true"}),
                    )
                })
                .0,
            );
        }
    }
    server.post("/close_instance", &json!({"run_id": "bench-slurm"}));
    println!("\nSlurm: a command in a job, medians, this machine");
    println!(
        "{:<22} {:>10} {:>12} {:>9}",
        "", "srun ms", "arservice ms", "ratio"
    );
    row(
        "exec true",
        median_ms(&mut raw),
        median_ms(&mut ours),
        "(issue 4: beside srun --overlap)",
    );
    println!("({} commands per side in {ROUNDS} interleaved rounds; arservice sends no srun and no slurmctld RPC per command)", raw.len());
}

fn main() {
    // `cargo bench --bench sandboxes [-- PART...]`: the parts named (docker, docker_agent,
    // bwrap_agent, slurm), or all of them; cargo's own `--bench` is ignored.
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let parts: [(&str, fn()); 4] = [
        ("docker", docker),
        ("docker_agent", docker_agent),
        ("bwrap_agent", bwrap_agent),
        ("slurm", slurm),
    ];
    for (name, part) in parts {
        if wanted.is_empty() || wanted.iter().any(|want| want == name) {
            part();
        }
    }
}
