//! Benchmark: docker start, exec and close through arservice beside the raw `docker run -d`,
//! `docker exec` and `docker rm -f` they wrap; and a command through the Slurm runner beside a
//! raw `srun --overlap` step in the same job. One process, one machine, rounds interleaved so
//! that the noise of a shared machine hits both sides alike; medians and their ratios.
//!
//! `cargo bench --bench sandboxes` (needs the test bed: `.ci/testbed.sh`). Parts whose tool is
//! missing are skipped with a line saying so.

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
    // `cargo bench` passes --bench; no other argument is taken.
    docker();
    slurm();
}
