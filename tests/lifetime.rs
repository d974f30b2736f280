//! Instances that outlive their welcome: `ttl` and `idle_timeout` (per instance, and the
//! server's defaults) are reaped, their resources freed, and later commands answer 410.

mod support;

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::{pid_alive, wait_for, Server};

fn start(server: &Server, run_id: &str, config: Value) {
    let mut environment = json!({"container_type": "local"});
    for (key, value) in config.as_object().unwrap() {
        environment[key] = value.clone();
    }
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": run_id, "environment_config": environment}),
    );
    assert_eq!(status, 200, "{body}");
}

fn row(server: &Server, run_id: &str) -> Value {
    let (_, stats) = server.get(&format!("/stats?run_id={run_id}"));
    stats["instances"][0].clone()
}

fn wait_dead(server: &Server, run_id: &str) -> Value {
    wait_for(
        Duration::from_secs(15),
        &format!("{run_id} to be reaped"),
        || {
            let row = row(server, run_id);
            (row["state"] == "dead").then_some(row)
        },
    )
}

#[test]
fn ttl_reaps_the_instance_and_later_commands_answer_410() {
    let server = Server::start(&[]);
    start(&server, "short", json!({"ttl": 1.5}));
    let started = Instant::now();
    let pid: i32 = server.exec("short", "sleep 300 >/dev/null 2>&1 & echo $!")["output"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let expires_at = row(&server, "short")["expires_at"]
        .as_f64()
        .expect("expires_at in /stats");
    let created_at = row(&server, "short")["created_at"].as_f64().unwrap();
    assert!(
        (expires_at - created_at - 1.5).abs() < 0.5,
        "{expires_at} vs {created_at}"
    );

    let dead = wait_dead(&server, "short");
    assert!(started.elapsed() >= Duration::from_millis(1000));
    assert!(
        dead["dead_reason"]
            .as_str()
            .unwrap()
            .contains("ttl of 1.5 s"),
        "{dead}"
    );
    assert!(dead["expires_at"].is_null());
    wait_for(Duration::from_secs(5), "its background job to die", || {
        (!pid_alive(pid)).then_some(())
    });
    // The reaper removes the directory right after the kill: the job can be gone a moment
    // before the directory is.
    wait_for(Duration::from_secs(5), "its directory to go", || {
        (!server.state_dir.join("instances/short").exists()).then_some(())
    });
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(available, json!({"instances": 10}));

    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "short", "cmd": "true"}),
    );
    assert_eq!(status, 410, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("reaped: its ttl of 1.5 s ran out"),
        "{body}"
    );
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["instances_reaped"], 1);
    // Closing a reaped instance frees its run_id.
    assert_eq!(
        server
            .post("/close_instance", &json!({"run_id": "short"}))
            .0,
        200
    );
    start(&server, "short", json!({}));
}

#[test]
fn idle_timeout_counts_from_the_last_command_and_not_while_one_runs() {
    let server = Server::start(&[]);
    start(&server, "idle", json!({"idle_timeout": 1}));
    // A command longer than the idle timeout keeps the instance alive while it runs.
    assert_eq!(
        server.exec("idle", "sleep 2.5; echo done")["output"],
        "done\n"
    );
    assert_eq!(row(&server, "idle")["state"], "running");
    let finished = Instant::now();
    let dead = wait_dead(&server, "idle");
    assert!(
        finished.elapsed() >= Duration::from_millis(900),
        "reaped {:?} after the command",
        finished.elapsed()
    );
    assert!(
        dead["dead_reason"]
            .as_str()
            .unwrap()
            .contains("idle_timeout"),
        "{dead}"
    );
}

#[test]
fn the_servers_defaults_apply_when_the_config_has_none() {
    let server = Server::start(&["--default-idle-timeout", "1"]);
    start(&server, "forgotten", json!({}));
    start(&server, "patient", json!({"idle_timeout": 600}));
    let dead = wait_dead(&server, "forgotten");
    assert!(
        dead["dead_reason"]
            .as_str()
            .unwrap()
            .contains("no command for 1 s"),
        "{dead}"
    );
    assert_eq!(row(&server, "patient")["state"], "running");
}

#[test]
fn bad_lifetimes_are_400() {
    let server = Server::start(&[]);
    for config in [
        json!({"ttl": 0}),
        json!({"idle_timeout": "soon"}),
        json!({"ttl": -5}),
    ] {
        let mut environment = json!({"container_type": "local"});
        for (key, value) in config.as_object().unwrap() {
            environment[key] = value.clone();
        }
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": "x", "environment_config": environment}),
        );
        assert_eq!(status, 400, "{config}: {body}");
    }
}
