//! Benchmark: starts from a warm pool beside cold starts of the same docker sandbox (agent
//! on), side by side in one server and one run: start latency at concurrency 1 and 8, a
//! start + one command + close cycle, and sustained cycles per second while the pool refills.
//! A cold start is the pooled preset with one `env` variable added, which the pool cannot
//! serve; rounds alternate sides, and a warm round first waits for the pool to be full.
//!
//! Then, when a Slurm answers (the test bed's one-node cluster), the same for Slurm jobs: a pool of
//! running jobs against a cold `sbatch` of the same preset, at concurrency 1 and for the cycle.
//!
//! `cargo bench --bench pools` (needs docker and the test image: `.ci/testbed.sh`).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

const IMAGE: &str = "arservice-test/busybox:latest";
const POOL: usize = 8;
/// Rounds of one start per side (concurrency 1), and of one cycle per side.
const ROUNDS: usize = 20;
/// Rounds of 8 concurrent starts per side.
const BURSTS: usize = 5;
/// How long each side of the sustained part runs.
const SUSTAINED: Duration = Duration::from_secs(10);

/// Slurm's pool, and its rounds per side (a cold Slurm start costs an `sbatch` and a job).
const SLURM_POOL: usize = 2;
const SLURM_ROUNDS: usize = 10;

struct Server {
    child: Child,
    url: String,
    agent: ureq::Agent,
    /// The pooled preset, and its pool's size.
    preset: &'static str,
    size: usize,
}

impl Server {
    fn start(
        runner: &str,
        (preset, size): (&'static str, usize),
        args: &[&str],
        state: &std::path::Path,
    ) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_arservice"))
            .args(["--runner", runner, "--port", "0", "--log-level", "info"])
            .arg("--state-dir")
            .arg(state)
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
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.starts_with("WARN") || line.starts_with("ERROR") {
                    eprintln!("server: {line}");
                }
            }
        });
        Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .new_agent(),
            preset,
            size,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let url = format!("{}{path}", self.url);
        let mut response = match body {
            Some(body) => self
                .agent
                .post(url)
                .header("Content-Type", "application/json")
                .send(body.to_string())
                .unwrap(),
            None => {
                assert_eq!(method, "GET");
                self.agent.get(url).call().unwrap()
            }
        };
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

    fn post(&self, path: &str, body: &Value) -> Value {
        self.call("POST", path, Some(body))
    }

    fn pool(&self) -> Value {
        self.call("GET", "/stats", None)["pools"][self.preset].clone()
    }

    /// Waits until the pool is full and nothing of it starts.
    fn wait_full(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let pool = self.pool();
            if pool["idle"] == self.size && pool["starting"] == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "the pool never filled: {pool}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn taken(&self) -> u64 {
        self.pool()["taken"].as_u64().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn start_body(preset: &str, run_id: &str, warm: bool) -> Value {
    if warm {
        json!({"run_id": run_id, "container_name": preset})
    } else {
        json!({"run_id": run_id, "container_name": preset, "environment_config": {"env": {"COLD": "1"}}})
    }
}

impl Server {
    fn close(&self, run_id: &str) {
        self.post("/close_instance", &json!({"run_id": run_id}));
    }

    fn exec(&self, run_id: &str) {
        let answer = self.post(
            "/execute_command",
            &json!({"run_id": run_id, "cmd": "echo hi"}),
        );
        assert_eq!(answer["result"]["output"], "hi\n", "{answer}");
    }

    fn start_run(&self, run_id: &str, warm: bool) {
        self.post("/start_instance", &start_body(self.preset, run_id, warm));
    }

    /// `rounds` starts per side at concurrency 1, alternating, each closed after.
    fn starts_one_at_a_time(&self, rounds: usize) {
        let (mut warm, mut cold) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            self.wait_full();
            let taken = self.taken();
            let id = format!("w1-{round}");
            warm.push(timed(|| self.start_run(&id, true)));
            assert_eq!(self.taken(), taken + 1, "a warm start missed the pool");
            self.close(&id);
            let id = format!("c1-{round}");
            cold.push(timed(|| self.start_run(&id, false)));
            self.close(&id);
        }
        line("start, concurrency 1", &warm, &cold);
    }

    /// `rounds` start + one command + close cycles per side, alternating.
    fn cycles(&self, rounds: usize) {
        let (mut warm, mut cold) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            self.wait_full();
            let id = format!("wc-{round}");
            warm.push(timed(|| {
                self.start_run(&id, true);
                self.exec(&id);
                self.close(&id);
            }));
            let id = format!("cc-{round}");
            cold.push(timed(|| {
                self.start_run(&id, false);
                self.exec(&id);
                self.close(&id);
            }));
        }
        line("start + 1 command + close", &warm, &cold);
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let began = Instant::now();
    f();
    began.elapsed()
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The `q` quantile (nearest rank) of `samples`, in ms.
fn quantile(samples: &[Duration], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    ms(sorted[rank - 1])
}

fn line(what: &str, warm: &[Duration], cold: &[Duration]) {
    let (w50, c50) = (quantile(warm, 0.5), quantile(cold, 0.5));
    println!(
        "{what:<34} pool p50 {w50:>8.2} ms  p99 {:>8.2} ms | cold p50 {c50:>8.2} ms  p99 {:>8.2} ms | cold/pool {:>6.1}x  (n={}/{})",
        quantile(warm, 0.99),
        quantile(cold, 0.99),
        c50 / w50,
        warm.len(),
        cold.len()
    );
}

fn main() {
    let ready = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .is_ok_and(|out| out.status.success());
    if !ready {
        println!("skipped: docker with {IMAGE} is needed (.ci/testbed.sh)");
        return;
    }
    let state = std::env::temp_dir().join(format!("arservice-bench-pools-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let envs = state.with_extension("json");
    std::fs::write(
        &envs,
        json!({"dk": {"container_type": "docker", "image": IMAGE, "pool": {"size": POOL}}})
            .to_string(),
    )
    .unwrap();
    let binary = env!("CARGO_BIN_EXE_arservice");
    let server = Server::start(
        "local",
        ("dk", POOL),
        &[
            "--agent",
            binary,
            "--environments",
            envs.to_str().unwrap(),
            "--max-resources",
            r#"{"instances": 64}"#,
            "--workers",
            "32",
        ],
        &state,
    );
    println!(
        "docker ({IMAGE}, agent on), pool of {POOL}; cold = the same preset plus one env variable"
    );
    server.starts_one_at_a_time(ROUNDS);

    // Concurrency 8: bursts of 8 starts at once.
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    for round in 0..BURSTS {
        for is_warm in [true, false] {
            if is_warm {
                server.wait_full();
            }
            let barrier = Barrier::new(POOL);
            let samples: Vec<Duration> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..POOL)
                    .map(|index| {
                        let (server, barrier) = (&server, &barrier);
                        scope.spawn(move || {
                            let id =
                                format!("{}8-{round}-{index}", if is_warm { "w" } else { "c" });
                            barrier.wait();
                            let took = timed(|| server.start_run(&id, is_warm));
                            (id, took)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|handle| {
                        let (id, took) = handle.join().unwrap();
                        server.close(&id);
                        took
                    })
                    .collect()
            });
            if is_warm {
                warm.extend(samples);
            } else {
                cold.extend(samples);
            }
        }
    }
    line("start, concurrency 8 (bursts of 8)", &warm, &cold);

    // Start + one command + close.
    server.cycles(ROUNDS);

    // Sustained: 8 clients cycling for SUSTAINED; the pool side takes what the pool has
    // and starts cold when it is empty.
    for is_warm in [true, false] {
        server.wait_full();
        let taken = server.taken();
        let done = AtomicUsize::new(0);
        let began = Instant::now();
        std::thread::scope(|scope| {
            for client in 0..POOL {
                let (server, done) = (&server, &done);
                scope.spawn(move || {
                    let mut cycle = 0;
                    while began.elapsed() < SUSTAINED {
                        let id = format!("s{}-{client}-{cycle}", u8::from(is_warm));
                        server.start_run(&id, is_warm);
                        let answer = server
                            .post("/execute_command", &json!({"run_id": id, "cmd": "echo hi"}));
                        assert_eq!(answer["result"]["output"], "hi\n");
                        server.post("/close_instance", &json!({"run_id": id}));
                        done.fetch_add(1, Ordering::Relaxed);
                        cycle += 1;
                    }
                });
            }
        });
        let elapsed = began.elapsed().as_secs_f64();
        let cycles = done.load(Ordering::Relaxed);
        let hits = server.taken() - taken;
        println!(
            "sustained cycles, 8 clients, {} s: {:<5} {:>7.1} cycles/s ({cycles} cycles, {hits} from the pool)",
            SUSTAINED.as_secs(),
            if is_warm { "pool" } else { "cold" },
            cycles as f64 / elapsed,
        );
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(&envs);
    slurm();
}

/// The same at concurrency 1 and for the cycle with Slurm jobs (`container_type` `local` in
/// the job, through the job's server), when a Slurm answers.
fn slurm() {
    let answers = Command::new("sinfo")
        .args(["--noheader", "--format=%t"])
        .output()
        .is_ok_and(|out| out.status.success() && !out.stdout.is_empty());
    if !answers {
        println!("slurm: skipped (no Slurm answers; .ci/testbed.sh)");
        return;
    }
    let state = std::env::temp_dir().join(format!(
        "arservice-bench-pools-slurm-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&state);
    let envs = state.with_extension("json");
    std::fs::write(
        &envs,
        json!({"sl": {"container_type": "local", "pool": {"size": SLURM_POOL}}}).to_string(),
    )
    .unwrap();
    let server = Server::start(
        "slurm",
        ("sl", SLURM_POOL),
        &[
            "--environments",
            envs.to_str().unwrap(),
            "--max-resources",
            r#"{"jobs": 8}"#,
        ],
        &state,
    );
    println!(
        "slurm (one-node test bed, agent path, local in the job), pool of {SLURM_POOL} jobs; cold = the same preset plus one env variable (an sbatch)"
    );
    server.starts_one_at_a_time(SLURM_ROUNDS);
    server.cycles(SLURM_ROUNDS);
    drop(server);
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(&envs);
}
