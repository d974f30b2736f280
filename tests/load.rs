//! Load, bounded and on loopback: 1000 `local` instances × 10 commands at concurrency 32,
//! with no error and an exact ledger afterwards.

mod support;

use serde_json::{json, Value};
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::Server;

const INSTANCES: usize = 1000;
const COMMANDS_PER_INSTANCE: usize = 10;
const CONCURRENCY: usize = 32;

fn post(agent: &ureq::Agent, url: &str, body: &Value) -> (u16, Value) {
    let mut response = agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap_or_else(|err| panic!("{url}: {err}"));
    let status = response.status().as_u16();
    let mut text = String::new();
    response
        .body_mut()
        .as_reader()
        .read_to_string(&mut text)
        .unwrap();
    (status, serde_json::from_str(&text).unwrap())
}

#[test]
fn a_thousand_instances_times_ten_commands_at_concurrency_32() {
    let server = Server::start(&["--max-resources", r#"{"instances": 1000, "cpus": 250}"#]);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..CONCURRENCY {
            scope.spawn(|| {
                let agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(120)))
                    .build()
                    .new_agent();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= INSTANCES {
                        break;
                    }
                    let run_id = format!("load-{index}");
                    let (status, body) = post(
                        &agent,
                        &format!("{}/start_instance", server.url),
                        &json!({"run_id": run_id, "environment_config":
                                {"container_type": "local", "resources": {"cpus": 0.25}}}),
                    );
                    assert_eq!(status, 200, "{body}");
                    for command in 0..COMMANDS_PER_INSTANCE {
                        let (status, body) = post(
                            &agent,
                            &format!("{}/execute_command", server.url),
                            &json!({"run_id": run_id, "cmd": format!("echo {index}-{command}")}),
                        );
                        assert_eq!(status, 200, "{body}");
                        assert_eq!(body["result"]["output"], format!("{index}-{command}\n"));
                    }
                    let (status, body) = post(
                        &agent,
                        &format!("{}/close_instance", server.url),
                        &json!({"run_id": run_id}),
                    );
                    assert_eq!(status, 200, "{body}");
                }
            });
        }
    });
    let elapsed = started.elapsed();
    eprintln!(
        "{INSTANCES} instances x {COMMANDS_PER_INSTANCE} commands at concurrency {CONCURRENCY}: {elapsed:?}"
    );
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["instances_started"], INSTANCES);
    assert_eq!(stats["total_instances"], 0);
    assert_eq!(
        stats["allocated_resources"],
        json!({"instances": 0, "cpus": 0})
    );
    assert_eq!(
        stats["available_resources"],
        json!({"instances": 1000, "cpus": 250})
    );
    let left = std::fs::read_dir(server.state_dir.join("instances"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "instance directories left behind");
}
