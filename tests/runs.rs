//! The rollout ledger and the infra signal through the real binary: `GET /runs/{run_id}` sums a
//! run (wall and CPU time, commands, timeouts, infra failures) while it runs and after it is
//! closed; every error answer says `infra`, false for the request's own faults (a timed-out
//! command is no error at all), true when the engine or the container failed (a container
//! removed behind the server's back, an engine that does not answer).
//!
//! The model part of `/runs` is checked in `tests/gateway.rs`, beside its fake upstream.

mod support;

use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use support::flavor::{Need, IMAGE_BUSYBOX};
use support::{agent_binary, wait_for, CloseAll, Options, Server};

/// Asserts an error answer: its status, `status: error`, a `detail`, and its `infra`.
fn assert_error(answer: &(u16, Value), status: u16, infra: bool) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["status"], "error", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|detail| !detail.is_empty()),
        "{body}"
    );
    assert_eq!(body["infra"], infra, "{body}");
}

fn run(server: &Server, run_id: &str) -> Value {
    let (status, body) = server.get(&format!("/runs/{run_id}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["run_id"], run_id, "{body}");
    body
}

fn docker_ready() -> bool {
    let missing = Need::Docker(IMAGE_BUSYBOX).missing();
    support::require(
        missing.is_none(),
        &format!("the docker ledger tests need {missing:?}: run `sudo bash .ci/testbed.sh`"),
    )
}

#[test]
fn a_local_run_is_summed_while_it_runs_and_after_its_close() {
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    server.start_local("r1");

    // A command's own timeout and exit code are 200 answers, never infra failures.
    let (status, timed_out) = server.post(
        "/execute_command",
        &json!({"run_id": "r1", "cmd": "sleep 5", "timeout": 0.3}),
    );
    assert_eq!(status, 200, "{timed_out}");
    assert_eq!(timed_out["result"]["timed_out"], true, "{timed_out}");
    assert_eq!(server.exec("r1", "exit 3")["returncode"], 3);
    server.exec("r1", "echo hi");

    let open = run(&server, "r1");
    assert_eq!(open["state"], "running", "{open}");
    assert_eq!(open["container_type"], "local");
    assert_eq!(open["commands"], 3, "{open}");
    assert_eq!(open["timeouts"], 1, "{open}");
    assert_eq!(open["infra_failures"], 0, "{open}");
    assert_eq!(open["cpu_s"], Value::Null, "local cannot tell: {open}");
    assert_eq!(open["ended_at"], Value::Null);
    assert_eq!(open["model"], Value::Null, "no gateway: {open}");
    assert!(open["wall_s"].as_f64().unwrap() >= 0.3, "{open}");

    // The request's own faults: infra false.
    assert_error(&server.get("/runs/nope"), 404, false);
    assert_error(&server.get("/runs/..x"), 400, false);
    assert_error(&server.get("/runs/"), 400, false);
    assert_error(
        &server.post(
            "/execute_command",
            &json!({"run_id": "nope", "cmd": "true"}),
        ),
        404,
        false,
    );
    assert_error(
        &server.post_raw("/execute_command", b"{not json"),
        400,
        false,
    );
    assert_error(&server.get("/no/such/route"), 404, false);
    assert_error(
        &server.post(
            "/start_instance",
            &json!({"run_id": "r1", "container_name": "local",
                    "environment_config": {"container_type": "local"}}),
        ),
        409,
        false,
    );
    assert_eq!(run(&server, "r1")["infra_failures"], 0);

    let (_, stats) = server.get("/stats");
    let row = &stats["instances"][0];
    assert_eq!(row["run_id"], "r1");
    assert_eq!(row["commands_timed_out"], 1, "{row}");
    assert_eq!(row["infra_failures"], 0, "{row}");
    assert_eq!(row["cpu_s"], Value::Null, "{row}");
    assert!(row["wall_s"].as_f64().is_some(), "{row}");
    assert_eq!(stats["infra_failures"], 0, "{stats}");
    assert_eq!(stats["closed_runs"]["runs"], 0, "{stats}");

    let (status, body) = server.post("/close_instance", &json!({"run_id": "r1"}));
    assert_eq!(status, 200, "{body}");
    let closed = run(&server, "r1");
    assert_eq!(closed["state"], "closed", "{closed}");
    assert_eq!(closed["commands"], 3);
    assert_eq!(closed["timeouts"], 1);
    assert!(closed["ended_at"].as_f64().is_some(), "{closed}");
    let wall = closed["wall_s"].as_f64().unwrap();
    assert!(wall >= open["wall_s"].as_f64().unwrap(), "{closed}");
    assert_eq!(
        run(&server, "r1")["wall_s"].as_f64(),
        Some(wall),
        "a closed run's clock stopped"
    );
    // Closed, it is no instance any more: commands answer 404 as before.
    assert_error(
        &server.post("/execute_command", &json!({"run_id": "r1", "cmd": "true"})),
        404,
        false,
    );

    let (_, stats) = server.get("/stats");
    let summary = &stats["closed_runs"];
    assert_eq!(summary["runs"], 1, "{stats}");
    assert_eq!(summary["commands"], 3, "{stats}");
    assert_eq!(summary["timeouts"], 1, "{stats}");
    assert_eq!(summary["kept_at_most"], 4096, "{stats}");
    let (_, filtered) = server.get("/stats?run_id=zzz");
    assert_eq!(filtered["closed_runs"]["runs"], 0, "{filtered}");

    // Used again, the run_id sums its new instance.
    server.start_local("r1");
    let again = run(&server, "r1");
    assert_eq!(
        (again["state"].as_str(), again["commands"].as_u64()),
        (Some("running"), Some(0))
    );
}

#[test]
fn a_reaped_instance_answers_410_that_is_not_infra() {
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "short", "container_name": "local",
                "environment_config": {"container_type": "local", "ttl": 0.5}}),
    );
    assert_eq!(status, 200, "{body}");
    let answer = wait_for(Duration::from_secs(20), "the reaping", || {
        let answer = server.post(
            "/execute_command",
            &json!({"run_id": "short", "cmd": "true"}),
        );
        (answer.0 == 410).then_some(answer)
    });
    assert_error(&answer, 410, false);
    assert!(
        answer.1["detail"].as_str().unwrap().contains("ttl"),
        "{}",
        answer.1
    );
    let dead = run(&server, "short");
    assert_eq!(dead["state"], "dead", "{dead}");
    assert_eq!(dead["infra_failures"], 0, "{dead}");
    assert!(
        dead["dead_reason"].as_str().unwrap().contains("reaped"),
        "{dead}"
    );
    assert!(dead["ended_at"].as_f64().is_some(), "{dead}");
}

/// The engine's failures: a container removed behind the server's back makes the next command
/// an infra failure, on the agent path and on `docker exec`'s; the CPU time read from the
/// container's cgroup stays in the run's sums after the container is gone.
#[test]
fn a_container_removed_behind_the_servers_back_is_an_infra_failure() {
    if !docker_ready() {
        return;
    }
    let agent = agent_binary();
    let server = Server::start(&["--agent", &agent]);
    let _close = CloseAll(&server);
    for mode in ["agent", "cli"] {
        let run_id = format!("gone-{mode}");
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": IMAGE_BUSYBOX,
                    "environment_config": {"container_type": "docker", "exec_mode": mode}}),
        );
        assert_eq!(status, 200, "{body}");
        // Half a second of CPU or so, in the container.
        let spin = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo done";
        assert_eq!(server.exec(&run_id, spin)["output"], "done\n");
        let busy = run(&server, &run_id);
        assert_eq!(busy["container_type"], "docker", "{busy}");
        let cpu = busy["cpu_s"]
            .as_f64()
            .unwrap_or_else(|| panic!("no CPU time from the container's cgroup: {busy}"));
        assert!(cpu > 0.05, "{busy}");

        let (_, stats) = server.get("/stats");
        let row = stats["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["run_id"] == run_id.as_str())
            .unwrap()
            .clone();
        let container = row["container"].as_str().unwrap().to_string();
        let removed = Command::new("docker")
            .args(["rm", "-f", &container])
            .output()
            .unwrap();
        assert!(removed.status.success(), "{removed:?}");

        let answer = server.post(
            "/execute_command",
            &json!({"run_id": run_id, "cmd": "echo hi"}),
        );
        assert!(
            answer.0 == 500 || answer.0 == 410,
            "{mode}: the engine's failure is a 500 or a 410: {answer:?}"
        );
        assert_error(&answer, answer.0, true);
        let after = run(&server, &run_id);
        assert!(after["infra_failures"].as_u64().unwrap() >= 1, "{after}");
        let last = after["cpu_s"]
            .as_f64()
            .unwrap_or_else(|| panic!("the last reading stays: {after}"));
        assert!(last >= cpu, "{after}");

        let (status, body) = server.post("/close_instance", &json!({"run_id": run_id}));
        assert_eq!(status, 200, "{body}");
        let closed = run(&server, &run_id);
        assert_eq!(closed["state"], "closed", "{closed}");
        assert_eq!(closed["cpu_s"].as_f64(), Some(last), "{closed}");
        assert!(closed["infra_failures"].as_u64().unwrap() >= 1, "{closed}");
    }
    let (_, stats) = server.get("/stats");
    assert!(stats["infra_failures"].as_u64().unwrap() >= 2, "{stats}");
    let (status, metrics) = {
        let mut response = ureq::get(format!("{}/metrics", server.url)).call().unwrap();
        (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap(),
        )
    };
    assert_eq!(status, 200);
    assert!(
        metrics.lines().any(
            |line| line.starts_with("arservice_infra_failures_total ") && !line.ends_with(" 0")
        ),
        "{metrics}"
    );
}

/// An engine that does not answer fails the start with infra true; the run_id then answers
/// `/runs` as `failed`, with the engine's words.
#[test]
fn a_start_the_engine_cannot_serve_is_an_infra_failure_kept_in_the_ledger() {
    if !docker_ready() {
        return;
    }
    let server = Server::start_with(Options {
        args: Vec::new(),
        env: vec![("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    });
    let _close = CloseAll(&server);
    let answer = server.post(
        "/start_instance",
        &json!({"run_id": "no-engine", "container_name": IMAGE_BUSYBOX,
                "environment_config": {"container_type": "docker"}}),
    );
    assert_error(&answer, 500, true);
    let failed = run(&server, "no-engine");
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["infra_failures"], 1, "{failed}");
    assert_eq!(failed["commands"], 0);
    assert!(
        failed["dead_reason"].as_str().unwrap().contains("docker"),
        "{failed}"
    );
    // A refusal for room is the request's: infra false, nothing kept.
    let full = Server::start(&["--max-resources", r#"{"instances": 0}"#]);
    let answer = full.post(
        "/start_instance",
        &json!({"run_id": "no-room", "container_name": "local",
                "environment_config": {"container_type": "local"}}),
    );
    assert_error(&answer, 429, false);
    assert_error(&full.get("/runs/no-room"), 404, false);
}

/// Slurm: a command's own timeout is no infra failure; a job cancelled behind the server's back
/// is, whether the health watch or a command finds it first.
#[test]
fn a_slurm_job_that_dies_is_an_infra_failure_and_a_timeout_is_not() {
    if !support::require(
        support::flavor::slurm_usable(),
        "Slurm tests need a running Slurm with a usable node: run `sudo bash .ci/testbed.sh`",
    ) {
        return;
    }
    let server = Server::start(&["--runner", "slurm", "--health-interval", "0.5"]);
    let _close = CloseAll(&server);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "job", "container_name": "local",
                "environment_config": {"container_type": "local"}}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, timed_out) = server.post(
        "/execute_command",
        &json!({"run_id": "job", "cmd": "sleep 5", "timeout": 0.5}),
    );
    assert_eq!(status, 200, "{timed_out}");
    assert_eq!(timed_out["result"]["timed_out"], true, "{timed_out}");
    let before = run(&server, "job");
    assert_eq!(
        (
            before["timeouts"].as_u64(),
            before["infra_failures"].as_u64()
        ),
        (Some(1), Some(0)),
        "{before}"
    );

    let job = server.job_of("job");
    let cancelled = Command::new("scancel").arg(&job).output().unwrap();
    assert!(cancelled.status.success(), "{cancelled:?}");
    let dead = wait_for(Duration::from_secs(60), "the job's death", || {
        let sums = run(&server, "job");
        (sums["state"] == "dead").then_some(sums)
    });
    assert!(dead["infra_failures"].as_u64().unwrap() >= 1, "{dead}");
    let answer = server.post("/execute_command", &json!({"run_id": "job", "cmd": "true"}));
    assert_error(&answer, 410, true);
    assert_eq!(run(&server, "job")["timeouts"], 1);
}
