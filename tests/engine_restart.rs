//! The Docker engine restarted under load: while it is down, every failure is a clear JSON
//! error that names docker; its containers end with it and are reported dead; afterwards the
//! ledger holds exactly what `/stats` lists, and closing everything leaves nothing behind.
//!
//! Its own test binary: it stops the machine's dockerd, so nothing else may use docker
//! meanwhile (cargo runs test binaries one after another). Restarts dockerd through
//! `.ci/testbed.sh`, as CI brought it up.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{request, wait_for, Server};

const IMAGE: &str = "arservice-test/busybox:latest";

/// Clients starting, using and closing containers at once.
const CLIENTS: usize = 4;

/// How long the engine stays down once it stopped answering.
const OUTAGE: Duration = Duration::from_secs(2);

fn engine_answers() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn test_bed_ready() -> bool {
    let ready = engine_answers()
        && Command::new("docker")
            .args(["image", "inspect", IMAGE])
            .output()
            .is_ok_and(|out| out.status.success())
        && std::path::Path::new("/var/run/docker.pid").is_file();
    support::require(
        ready,
        "the engine restart test needs dockerd started by `sudo bash .ci/testbed.sh`",
    )
}

/// One client's loop: start, run a command, close, until `stop`; every answer is tallied
/// as `(route, status)`, and every error must be JSON with a `detail` that says something.
fn client(url: String, index: usize, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let run_id = format!("c{index}-{round}");
        let post = |path: &str, body: Value| {
            let (status, answer) = request(
                "POST",
                &format!("{url}{path}"),
                Some(body.to_string().as_bytes()),
            );
            tally.lock().unwrap().record(path, status, &answer);
            status
        };
        let started = post(
            "/start_instance",
            json!({"run_id": run_id, "container_name": IMAGE,
                   "environment_config": {"container_type": "docker", "exec_mode": "cli"}}),
        );
        if started != 200 {
            continue;
        }
        post(
            "/execute_command",
            json!({"run_id": run_id, "cmd": "echo hi", "timeout": 10}),
        );
        // A close may fail while the engine is down; the instance then stays listed and
        // is closed at the end of the test.
        post("/close_instance", json!({"run_id": run_id}));
    }
}

/// Starts dockerd again as CI did, through the test bed script.
fn restart_engine() {
    let testbed = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/testbed.sh");
    let restarted = Command::new("bash")
        .arg(testbed)
        .env("TESTBED_SKIP_SLURM", "1")
        .output()
        .unwrap();
    assert!(
        restarted.status.success(),
        "restarting dockerd: {}",
        String::from_utf8_lossy(&restarted.stderr)
    );
}

/// Brings the engine back even when the test fails half-way, for the tests after it.
struct EngineBack;

impl Drop for EngineBack {
    fn drop(&mut self) {
        if !engine_answers() {
            restart_engine();
        }
    }
}

#[derive(Default)]
struct Tally {
    counts: BTreeMap<(String, u16), u64>,
    /// Answers that break the rules: not JSON errors, unexpected statuses, no words.
    violations: Vec<String>,
    errors: Vec<String>,
}

impl Tally {
    fn count(&self, path: &str, status: u16) -> u64 {
        self.counts
            .get(&(path.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    fn record(&mut self, path: &str, status: u16, answer: &Value) {
        *self.counts.entry((path.to_string(), status)).or_default() += 1;
        if status == 200 {
            return;
        }
        let detail = answer["detail"].as_str().unwrap_or_default();
        // 429: instances whose close failed while the engine was down keep their resources
        // until a close succeeds, so the ledger can fill up; it must say so.
        let expected = match status {
            409 | 410 | 500 => {
                detail.contains("docker")
                    || detail.contains("container")
                    || detail.contains("closing")
            }
            429 => detail.contains("not enough 'instances'"),
            _ => false,
        };
        if answer["status"] != "error" || !expected {
            self.violations.push(format!("{path} {status}: {answer}"));
        }
        if self.errors.len() < 20 {
            self.errors.push(format!("{path} {status}: {detail}"));
        }
    }
}

#[test]
fn the_engine_restarted_under_load_gives_clear_errors_and_no_ledger_leak() {
    if !test_bed_ready() {
        return;
    }
    let server = Server::start(&[
        "--max-resources",
        r#"{"instances": 8}"#,
        "--health-interval",
        "0.5",
    ]);
    let (_, stats) = server.get("/stats");
    let server_id = stats["server_id"].as_str().unwrap().to_string();
    // Long-lived instances that the outage ends under them.
    for run_id in ["keep-1", "keep-2"] {
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": IMAGE,
                    "environment_config": {"container_type": "docker"}}),
        );
        assert_eq!(status, 200, "{body}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|index| {
            let (url, stop, tally) = (server.url.clone(), Arc::clone(&stop), Arc::clone(&tally));
            std::thread::spawn(move || client(url, index, stop, tally))
        })
        .collect();
    wait_for(
        Duration::from_secs(60),
        "some load before the outage",
        || (tally.lock().unwrap().count("/close_instance", 200) >= 4).then_some(()),
    );

    let _engine = EngineBack;
    let pid = std::fs::read_to_string("/var/run/docker.pid").unwrap();
    let killed = Command::new("kill")
        .args(["-TERM", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_for(Duration::from_secs(60), "dockerd to stop answering", || {
        (!engine_answers()).then_some(())
    });
    let down = Instant::now();
    while down.elapsed() < OUTAGE {
        std::thread::sleep(Duration::from_millis(100));
    }
    restart_engine();
    // Load goes on against the engine that is back, until starts succeed again.
    let after = tally.lock().unwrap().count("/start_instance", 200);
    wait_for(Duration::from_secs(60), "starts to succeed again", || {
        let now = tally.lock().unwrap().count("/start_instance", 200);
        (now >= after + 4).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client
            .join()
            .expect("a client panicked: see its message above");
    }
    let tally = tally.lock().unwrap();
    eprintln!(
        "answers: {:?}\nerrors (first 20): {:#?}",
        tally.counts, tally.errors
    );
    assert!(
        tally.violations.is_empty(),
        "unclear answers: {:#?}",
        tally.violations
    );
    let failures: u64 = tally
        .counts
        .iter()
        .filter(|((_, status), _)| *status != 200)
        .map(|(_, count)| count)
        .sum();
    assert!(
        failures > 0,
        "the outage was not seen at all: {:?}",
        tally.counts
    );

    // The containers that lived through the outage ended with the engine: reported dead.
    for run_id in ["keep-1", "keep-2"] {
        let reason = wait_for(Duration::from_secs(30), "the outage to be noticed", || {
            let (_, stats) = server.get(&format!("/stats?run_id={run_id}"));
            let row = stats["instances"][0].clone();
            (row["state"] == "dead")
                .then(|| row["dead_reason"].as_str().unwrap_or_default().to_string())
        });
        assert!(reason.contains("container"), "{run_id}: {reason}");
        let (status, body) = server.post(
            "/execute_command",
            &json!({"run_id": run_id, "cmd": "true"}),
        );
        assert_eq!(status, 410, "{body}");
    }
    // The ledger holds exactly the running instances that /stats lists.
    let (_, stats) = server.get("/stats");
    let running = stats["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["state"] == "running")
        .count();
    assert_eq!(
        stats["allocated_resources"]["instances"], running,
        "{stats}"
    );
    // Closing everything leaves nothing: no reservation, no container.
    for row in stats["instances"].as_array().unwrap() {
        let (status, body) = server.post("/close_instance", &json!({"run_id": row["run_id"]}));
        assert_eq!(status, 200, "{body}");
    }
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["total_instances"], 0, "{stats}");
    assert_eq!(stats["available_resources"], json!({"instances": 8}));
    // Starts whose cleanup failed while the engine was down left containers that no instance
    // tracks: the health round removes them once the engine answers.
    wait_for(
        Duration::from_secs(30),
        "no container of the server to be left",
        || {
            let containers = Command::new("docker")
                .args(["ps", "--all", "--quiet", "--filter"])
                .arg(format!("label=arservice.server={server_id}"))
                .output()
                .unwrap();
            containers.stdout.is_empty().then_some(())
        },
    );
}
