//! Benchmark: files in and out of an instance through arservice (`PUT` and `GET
//! /files/{run_id}/{path}`) beside what they replace: `docker cp` into and out of a container
//! of the same image for a docker instance (through its agent); and, as a floor, a plain `cp`
//! on the host for a `local` instance and a bubblewrap one (through its agent). 1 MB and
//! 100 MB, from a host file and into one on both sides; rounds interleaved so that the noise
//! of a shared machine hits both sides alike; medians, p90 and their ratios.
//!
//! `cargo bench --bench files [-- docker local bwrap]` (needs the test bed: `.ci/testbed.sh`).
//! Parts whose tool is missing are skipped with a line saying so.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "arservice-test/busybox:latest";
/// The bubblewrap rootfs that `.ci/testbed.sh` unpacks.
const ROOTFS: &str = "/var/lib/arservice-testbed/rootfs-busybox";
/// The sizes moved, and the rounds of each (interleaved sides).
const SIZES: [(usize, &str, usize); 2] = [(1 << 20, "1 MB", 15), (100 << 20, "100 MB", 5)];

struct Server {
    child: Child,
    url: String,
    agent: ureq::Agent,
    state: PathBuf,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let state = scratch("state");
        let mut child = Command::new(env!("CARGO_BIN_EXE_arservice"))
            .args(["--port", "0", "--log-level", "info", "--state-dir"])
            .arg(&state)
            .args(["--max-body-bytes", "200000000"])
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
                .timeout_global(Some(Duration::from_secs(600)))
                .build()
                .new_agent(),
            state,
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
        let text = response.body_mut().read_to_string().unwrap();
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    fn start_instance(&self, run_id: &str, image: &str, config: Value) {
        self.post(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": image, "environment_config": config}),
        );
    }

    /// `PUT /files/{run_id}/{path}` with the bytes of the host file `from`.
    fn upload(&self, run_id: &str, path: &str, from: &Path) {
        let file = std::fs::File::open(from).unwrap();
        let length = file.metadata().unwrap().len();
        // With its length, as curl -T sends a file (ureq would send a reader chunked).
        let mut response = self
            .agent
            .put(format!("{}/files/{run_id}/{path}", self.url))
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", length.to_string())
            .send(ureq::SendBody::from_reader(&mut BufReader::with_capacity(
                256 * 1024,
                file,
            )))
            .unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        assert_eq!(status, 200, "PUT {path}: {text}");
    }

    /// `GET /files/{run_id}/{path}` into the host file `to`.
    fn download(&self, run_id: &str, path: &str, to: &Path) -> u64 {
        let mut response = self
            .agent
            .get(format!("{}/files/{run_id}/{path}", self.url))
            .call()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "GET {path}");
        let mut out = std::fs::File::create(to).unwrap();
        let mut body = response.body_mut().with_config().limit(u64::MAX).reader();
        std::io::copy(&mut body, &mut out).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill only sends SIGTERM to our own child, which then closes its instances.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A fresh path under the temporary directory, unique to this run.
fn scratch(tag: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "arservice-bench-files-{}-{tag}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&path);
    path
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

fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn timed(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

/// The `q` quantile of the samples, in ms.
fn quantile(samples: &[Duration], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[at].as_secs_f64() * 1000.0
}

/// The host files the benchmark moves: one per size, bytes of every value.
fn payloads(dir: &Path) -> Vec<(PathBuf, usize, &'static str, usize)> {
    std::fs::create_dir_all(dir).unwrap();
    SIZES
        .iter()
        .map(|&(size, name, rounds)| {
            let path = dir.join(format!("payload-{size}"));
            let bytes: Vec<u8> = (0..size).map(|at| (at * 7 + at / 251) as u8).collect();
            std::fs::write(&path, bytes).unwrap();
            (path, size, name, rounds)
        })
        .collect()
}

/// One side's samples: upload and download times.
#[derive(Default)]
struct Samples {
    up: Vec<Duration>,
    down: Vec<Duration>,
}

fn header(title: &str, raw: &str) {
    println!("\n{title}");
    println!(
        "{:<16} {:>11} {:>11} {:>13} {:>13} {:>7} {:>9}",
        "",
        &format!("{raw} p50"),
        &format!("{raw} p90"),
        "arservice p50",
        "arservice p90",
        "ratio",
        "MB/s"
    );
}

/// A row: the raw side's and arservice's p50 and p90 (ms), the p50 ratio and arservice's
/// throughput at its p50.
fn row(what: &str, size: usize, raw: &[Duration], ours: &[Duration]) {
    let (raw50, raw90, our50, our90) = (
        quantile(raw, 0.5),
        quantile(raw, 0.9),
        quantile(ours, 0.5),
        quantile(ours, 0.9),
    );
    println!(
        "{what:<16} {raw50:>11.1} {raw90:>11.1} {our50:>13.1} {our90:>13.1} {:>6.2}x {:>9.0}",
        our50 / raw50,
        size as f64 / (1 << 20) as f64 / (our50 / 1000.0)
    );
}

/// The same file moves through arservice (`run_id`) and through `raw_up` / `raw_down` (which
/// take the host file and the size), interleaved; the table's rows.
fn compare(
    server: &Server,
    run_id: &str,
    raw_name: &str,
    dir: &Path,
    raw_up: &dyn Fn(&Path, usize),
    raw_down: &dyn Fn(&Path, usize),
) {
    for (payload, size, name, rounds) in payloads(dir) {
        let (mut raw, mut ours) = (Samples::default(), Samples::default());
        let back = dir.join(format!("back-{size}"));
        let path = format!("bench-{size}.bin");
        for _ in 0..rounds {
            raw.up.push(timed(|| raw_up(&payload, size)));
            ours.up
                .push(timed(|| server.upload(run_id, &path, &payload)));
            raw.down.push(timed(|| raw_down(&back, size)));
            assert_eq!(std::fs::metadata(&back).unwrap().len(), size as u64);
            let _ = std::fs::remove_file(&back);
            ours.down.push(timed(|| {
                assert_eq!(server.download(run_id, &path, &back), size as u64)
            }));
            let _ = std::fs::remove_file(&back);
        }
        row(&format!("upload {name}"), size, &raw.up, &ours.up);
        row(&format!("download {name}"), size, &raw.down, &ours.down);
    }
    println!("({raw_name}; rounds: 15 of 1 MB, 5 of 100 MB, sides interleaved)");
}

/// The agent: the (static) binary under benchmark, or `ARSERVICE_TEST_AGENT`.
fn agent_binary() -> String {
    std::env::var("ARSERVICE_TEST_AGENT")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_arservice").to_string())
}

/// A docker instance through its agent beside `docker cp` into and out of a container of the
/// same image.
fn docker() {
    let agent = agent_binary();
    if !works("docker", &["image", "inspect", IMAGE]) || !Path::new(&agent).is_file() {
        println!("docker: skipped (no engine, image or static agent build; see .ci/run)");
        return;
    }
    let server = Server::start(&["--runner", "local", "--agent", &agent]);
    server.start_instance("files-docker", IMAGE, json!({"container_type": "docker"}));
    let raw_name = format!("bench-files-raw-{}", std::process::id());
    let keep_alive = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";
    run(
        "docker",
        &[
            "run",
            "--detach",
            "--init",
            "--name",
            &raw_name,
            "--workdir",
            "/tmp",
            "--entrypoint",
            "sh",
            IMAGE,
            "-c",
            keep_alive,
        ],
    );
    let dir = scratch("docker");
    let target = |size: usize| format!("{raw_name}:/tmp/raw-{size}.bin");
    header(
        "docker: files through arservice (agent) beside docker cp (busybox, ms, this machine)",
        "docker cp",
    );
    compare(
        &server,
        "files-docker",
        "docker cp HOST_FILE CONTAINER:PATH and back",
        &dir,
        &|from, size| {
            run("docker", &["cp", from.to_str().unwrap(), &target(size)]);
        },
        &|to, size| {
            run("docker", &["cp", &target(size), to.to_str().unwrap()]);
        },
    );
    run("docker", &["rm", "--force", &raw_name]);
    server.post("/close_instance", &json!({"run_id": "files-docker"}));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plain `cp` on the host: the floor for the paths whose files are on the host's disk.
fn host_cp(dir: &Path) -> (impl Fn(&Path, usize) + '_, impl Fn(&Path, usize) + '_) {
    std::fs::create_dir_all(dir.join("cp")).unwrap();
    let target = move |size: usize| dir.join(format!("cp/raw-{size}.bin"));
    (
        move |from: &Path, size: usize| {
            run(
                "cp",
                &[from.to_str().unwrap(), target(size).to_str().unwrap()],
            );
        },
        move |to: &Path, size: usize| {
            run(
                "cp",
                &[target(size).to_str().unwrap(), to.to_str().unwrap()],
            );
        },
    )
}

/// A `local` instance (the server writes the files itself) beside `cp` on the host.
fn local() {
    let server = Server::start(&["--runner", "local"]);
    server.start_instance("files-local", "local", json!({"container_type": "local"}));
    let dir = scratch("local");
    let (up, down) = host_cp(&dir);
    header(
        "local: files through arservice beside cp on the host (ms, this machine)",
        "cp",
    );
    compare(
        &server,
        "files-local",
        "cp HOST_FILE DIR and back",
        &dir,
        &up,
        &down,
    );
    server.post("/close_instance", &json!({"run_id": "files-local"}));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bubblewrap instance over the test bed's rootfs, through its agent, beside `cp` on the
/// host.
fn bwrap() {
    let agent = agent_binary();
    if !works("bwrap", &["--version"])
        || !Path::new(ROOTFS).is_dir()
        || !Path::new(&agent).is_file()
    {
        println!("bwrap: skipped (no bwrap, rootfs or static agent build; see .ci/run)");
        return;
    }
    // A host directory as the root is the operator's to allow (docs/security.md): the
    // benchmark is its own operator.
    let server = Server::start(&[
        "--runner",
        "local",
        "--agent",
        &agent,
        "--allow-client-host-access",
    ]);
    server.start_instance("files-bwrap", ROOTFS, json!({"container_type": "bwrap"}));
    let dir = scratch("bwrap");
    let (up, down) = host_cp(&dir);
    header(
        "bubblewrap: files through arservice (agent, rootfs overlay) beside cp on the host (ms, this machine)",
        "cp",
    );
    compare(
        &server,
        "files-bwrap",
        "cp HOST_FILE DIR and back",
        &dir,
        &up,
        &down,
    );
    server.post("/close_instance", &json!({"run_id": "files-bwrap"}));
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    // `cargo bench --bench files [-- PART...]`: the parts named (docker, local, bwrap), or
    // all of them; cargo's own `--bench` is ignored.
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let parts: [(&str, fn()); 3] = [("docker", docker), ("local", local), ("bwrap", bwrap)];
    for (name, part) in parts {
        if wanted.is_empty() || wanted.iter().any(|want| want == name) {
            part();
        }
    }
}
