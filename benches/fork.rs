//! Benchmark: forks (`POST /fork_instance`) side by side with what they replace, in one run,
//! medians over alternating rounds:
//!
//! - docker (agent on): a fork of an instance with 100 MB written, against the raw
//!   `docker commit` + `docker run --detach` of the same container (what a client would do
//!   by hand, without the agent or any bookkeeping);
//! - bubblewrap over the test bed's rootfs (agent on): a fork of an instance with a small
//!   upper layer (target: 50 ms or less), against a plain start of the same config.
//!
//! Each fork is closed after it is timed (not timed). `cargo bench --bench fork` (needs docker,
//! bwrap and the test bed's image and rootfs: `.ci/testbed.sh`).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "arservice-test/busybox:latest";
const ROOTFS: &str = "/var/lib/arservice-testbed/rootfs-bash";
/// Rounds per side of the docker part (each commits 100 MB).
const DOCKER_ROUNDS: usize = 7;
/// Rounds per side of the bubblewrap part.
const BWRAP_ROUNDS: usize = 25;

struct Server {
    child: Child,
    url: String,
    agent: ureq::Agent,
}

impl Server {
    fn start(args: &[&str], state: &std::path::Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_arservice"))
            .args(["--runner", "local", "--port", "0", "--log-level", "info"])
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

fn timed(f: impl FnOnce()) -> Duration {
    let began = Instant::now();
    f();
    began.elapsed()
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn median(samples: &[Duration]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    ms(sorted[sorted.len() / 2])
}

fn line(what: &str, ours: &[Duration], theirs_name: &str, theirs: &[Duration]) {
    let (a, b) = (median(ours), median(theirs));
    println!(
        "{what:<44} fork p50 {a:>8.1} ms | {theirs_name} p50 {b:>8.1} ms | ratio {:>5.2}  (n={}/{})",
        a / b,
        ours.len(),
        theirs.len()
    );
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn main() {
    let ready = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .is_ok_and(|out| out.status.success())
        && std::path::Path::new(ROOTFS).is_dir();
    if !ready {
        println!(
            "skipped: docker with {IMAGE} and the rootfs {ROOTFS} are needed (.ci/testbed.sh)"
        );
        return;
    }
    let state = std::env::temp_dir().join(format!("arservice-bench-fork-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let binary = env!("CARGO_BIN_EXE_arservice");
    let server = Server::start(
        &[
            "--agent",
            binary,
            "--allow-client-host-access",
            "--max-resources",
            r#"{"instances": 16}"#,
        ],
        &state,
    );
    let close = |run_id: &str| {
        server.post("/close_instance", &json!({"run_id": run_id}));
    };
    let fork = |src: &str, dst: &str| {
        let answer = server.post("/fork_instance", &json!({"run_id": src, "new_run_id": dst}));
        assert_eq!(answer["instance_id"], dst, "{answer}");
    };
    let server_id = server.call("GET", "/stats", None)["server_id"]
        .as_str()
        .unwrap()
        .to_string();

    // docker: 100 MB written in the source.
    server.post(
        "/start_instance",
        &json!({"run_id": "dsrc", "container_name": IMAGE,
                "environment_config": {"container_type": "docker"}}),
    );
    let wrote = server.post(
        "/execute_command",
        &json!({"run_id": "dsrc", "cmd": "dd if=/dev/urandom of=/data.bin bs=1M count=100 2>&1 | tail -1",
                "timeout": 120}),
    );
    println!(
        "docker ({IMAGE}, agent on), 100 MB written in the source: {}",
        wrote["result"]["output"].as_str().unwrap_or("").trim()
    );
    let container = format!("ars-{server_id}-dsrc");
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for round in 0..DOCKER_ROUNDS {
        let id = format!("dfork-{round}");
        ours.push(timed(|| fork("dsrc", &id)));
        let check = server.post(
            "/execute_command",
            &json!({"run_id": id, "cmd": "wc -c < /data.bin"}),
        );
        assert_eq!(check["result"]["output"], "104857600\n", "{check}");
        close(&id);
        let (image, name) = (
            format!("arservice-bench-raw:{round}"),
            format!("arservice-bench-raw-{round}"),
        );
        raw.push(timed(|| {
            docker(&["commit", &container, &image]);
            docker(&[
                "run",
                "--detach",
                "--name",
                &name,
                // Not the server's: its health round would remove a container that carries
                // its label (inherited from the committed image) but no instance tracks.
                "--label",
                "arservice.server=bench",
                "--entrypoint",
                "sh",
                &image,
                "-c",
                "sleep 3600",
            ]);
        }));
        docker(&["rm", "--force", &name]);
        docker(&["rmi", &image]);
    }
    line("docker, 100 MB written", &ours, "commit+run", &raw);
    close("dsrc");

    // bubblewrap over a rootfs: a small upper layer.
    let bwrap = json!({"container_type": "bubblewrap", "image": ROOTFS});
    server.post(
        "/start_instance",
        &json!({"run_id": "bsrc", "container_name": "bwrap", "environment_config": bwrap}),
    );
    server.post(
        "/execute_command",
        &json!({"run_id": "bsrc", "cmd": "mkdir -p /repo && for i in $(seq 1 20); do head -c 4096 /dev/urandom > /repo/f$i; done; rm -f /etc/shells; du -sk /repo"}),
    );
    let upper = std::process::Command::new("du")
        .args(["-sk"])
        .arg(state.join("instances/bsrc/upper"))
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_string()
        })
        .unwrap_or_default();
    println!(
        "bubblewrap ({ROOTFS}, agent on), upper layer of {upper} KiB (20 files and a whiteout)"
    );
    let (mut ours, mut starts) = (Vec::new(), Vec::new());
    for round in 0..BWRAP_ROUNDS {
        let id = format!("bfork-{round}");
        ours.push(timed(|| fork("bsrc", &id)));
        close(&id);
        let id = format!("bstart-{round}");
        starts.push(timed(|| {
            server.post(
                "/start_instance",
                &json!({"run_id": id, "container_name": "bwrap", "environment_config": bwrap}),
            );
        }));
        close(&id);
    }
    line(
        "bubblewrap rootfs, small upper layer",
        &ours,
        "plain start",
        &starts,
    );
    close("bsrc");
    drop(server);
    let _ = std::fs::remove_dir_all(&state);
}
