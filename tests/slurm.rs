//! The Slurm runner against the test bed's real one-node Slurm: every instance a job, its
//! environment brought up on the node by the job's own arservice, and what that server left
//! removed by the job's `arservice sweep` when it is killed.
//!
//! Skipped with a loud line when no Slurm answers, except in CI (`CI=true`), where it fails.

mod support;

use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{queue_state, wait_for, Server};

/// True when a Slurm controller answers and has a usable node; panics in CI otherwise.
fn slurm_available() -> bool {
    support::require(
        support::flavor::slurm_usable(),
        "Slurm tests need a running Slurm with a usable node: run `sudo bash .ci/testbed.sh`",
    )
}

fn slurm_server(extra: &[&str]) -> Server {
    let mut args = vec![
        "--runner",
        "slurm",
        "--max-resources",
        r#"{"jobs": 2}"#,
        "--health-interval",
        "0.5",
        // Some tests pass their own `slurm.sbatch_args`, which only the operator may by default.
        "--allow-client-host-access",
    ];
    args.extend_from_slice(extra);
    Server::start_with(support::Options {
        args,
        env: vec![
            ("ARS_FORWARDED", "from-login-node"),
            ("ARS_NOT_FORWARDED", "the server's own"),
        ],
    })
}

fn start(server: &Server, run_id: &str, config: Value) -> (u16, Value) {
    server.post(
        "/start_instance",
        &json!({"run_id": run_id, "container_name": "local", "environment_config": config}),
    )
}

/// Jobs of this server still in the queue.
fn our_jobs(server: &Server) -> Vec<String> {
    let (_, stats) = server.get("/stats");
    let prefix = format!("ars-{}-", stats["server_id"].as_str().unwrap());
    let out = Command::new("squeue")
        .args(["--me", "--noheader", "--format=%i %j"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .nth(1)
                .is_some_and(|name| name.starts_with(&prefix))
        })
        .map(String::from)
        .collect()
}

/// Runs `test` with the instance config of one exec mode: through the job's server (the
/// agent path) or as `srun` steps (the CLI path).
fn in_mode(mode: &str, test: fn(Value)) {
    if slurm_available() {
        test(json!({"container_type": "local", "exec_mode": mode}));
    }
}

/// `base` with `extra`'s keys added.
fn with(base: &Value, extra: Value) -> Value {
    let mut merged = base.clone();
    for (key, value) in extra.as_object().unwrap() {
        merged[key] = value.clone();
    }
    merged
}

#[test]
fn admits_up_to_the_limit_runs_inside_the_job_and_closes_it_agent() {
    in_mode(
        "agent",
        admits_up_to_the_limit_runs_inside_the_job_and_closes_it,
    );
}

#[test]
fn admits_up_to_the_limit_runs_inside_the_job_and_closes_it_cli() {
    in_mode(
        "cli",
        admits_up_to_the_limit_runs_inside_the_job_and_closes_it,
    );
}

fn admits_up_to_the_limit_runs_inside_the_job_and_closes_it(config: Value) {
    let server = slurm_server(&[]);
    for run_id in ["j1", "j2"] {
        let (status, body) = start(&server, run_id, config.clone());
        assert_eq!(status, 200, "{body}");
    }
    let (_, stats) = server.get("/stats?run_id=j1");
    assert_eq!(
        stats["instances"][0]["exec_mode"], config["exec_mode"],
        "{stats}"
    );
    let (status, body) = start(&server, "j3", config.clone());
    assert_eq!(status, 429, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("'jobs'"),
        "{body}"
    );

    let job = server.job_of("j1");
    assert_eq!(queue_state(&job), "RUNNING");
    let result = server.exec("j1", "echo $SLURM_JOB_ID");
    assert_eq!(
        result["output"],
        format!("{job}\n"),
        "the command runs inside job {job}"
    );

    let (status, _) = server.post("/close_instance", &json!({"run_id": "j1"}));
    assert_eq!(status, 200);
    assert_eq!(
        queue_state(&job),
        "",
        "job {job} is still queued after the close answered"
    );
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(available, json!({"jobs": 1}));
    server.post("/close_instance", &json!({"run_id": "j2"}));
    assert!(our_jobs(&server).is_empty());
}

#[test]
fn env_cwd_and_forward_env_inside_the_job_agent() {
    in_mode("agent", env_cwd_and_forward_env_inside_the_job);
}

#[test]
fn env_cwd_and_forward_env_inside_the_job_cli() {
    in_mode("cli", env_cwd_and_forward_env_inside_the_job);
}

fn env_cwd_and_forward_env_inside_the_job(config: Value) {
    let server = slurm_server(&[]);
    let config = with(
        &config,
        json!({"cwd": "/tmp", "env": {"A": "set,with=commas"}, "forward_env": ["ARS_FORWARDED"]}),
    );
    let (status, body) = start(&server, "e1", config);
    assert_eq!(status, 200, "{body}");
    let result = server.exec(
        "e1",
        "pwd; echo $A $ARS_FORWARDED; echo secret=$ARS_NOT_FORWARDED",
    );
    assert_eq!(
        result["output"], "/tmp\nset,with=commas from-login-node\nsecret=\n",
        "the login server's own environment must not reach commands"
    );
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "e1", "cmd": "echo $A; pwd", "env": {"A": "per-command"}, "cwd": "/"}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["output"], "per-command\n/\n");
    server.post("/close_instance", &json!({"run_id": "e1"}));
}

#[test]
fn a_timed_out_command_is_killed_on_the_node_agent() {
    in_mode("agent", a_timed_out_command_is_killed_on_the_node);
}

#[test]
fn a_timed_out_command_is_killed_on_the_node_cli() {
    in_mode("cli", a_timed_out_command_is_killed_on_the_node);
}

fn a_timed_out_command_is_killed_on_the_node(config: Value) {
    let server = slurm_server(&[]);
    let (status, body) = start(&server, "t1", config.clone());
    assert_eq!(status, 200, "{body}");
    // Distinct per mode: both variants run at once in this process.
    let tag = 40_000 + 2 * (std::process::id() % 10_000) + u32::from(config["exec_mode"] == "cli");
    let started = Instant::now();
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "t1", "cmd": format!("sleep {tag}1 & sleep {tag}2"), "timeout": 1}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["timed_out"], true);
    assert_eq!(body["result"]["returncode"], 124);
    assert!(started.elapsed() < Duration::from_secs(8));
    wait_for(
        Duration::from_secs(10),
        "the step's processes to die",
        || {
            let out = Command::new("pgrep")
                .args(["-f", &format!("sleep {tag}")])
                .output()
                .unwrap();
            out.stdout.is_empty().then_some(())
        },
    );
    assert_eq!(server.exec("t1", "echo still")["output"], "still\n");
    server.post("/close_instance", &json!({"run_id": "t1"}));
}

#[test]
fn a_job_cancelled_from_outside_is_noticed() {
    if !slurm_available() {
        return;
    }
    let server = slurm_server(&[]);
    let (status, body) = start(&server, "x1", json!({"container_type": "local"}));
    assert_eq!(status, 200, "{body}");
    let job = server.job_of("x1");
    assert!(Command::new("scancel")
        .arg(&job)
        .status()
        .unwrap()
        .success());
    // The periodic check notices it without any command.
    let stats = wait_for(
        Duration::from_secs(20),
        "the instance to be reported dead",
        || {
            let (_, stats) = server.get("/stats?run_id=x1");
            (stats["instances"][0]["state"] == "dead").then_some(stats)
        },
    );
    let reason = stats["instances"][0]["dead_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains(&format!("job {job} ended: CANCELLED")),
        "{reason}"
    );
    assert_eq!(
        stats["allocated_resources"],
        json!({"jobs": 0}),
        "its resources came back"
    );
    let (status, body) = server.post("/execute_command", &json!({"run_id": "x1", "cmd": "true"}));
    assert_eq!(status, 410, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("CANCELLED"),
        "{body}"
    );
    let (status, _) = server.post("/close_instance", &json!({"run_id": "x1"}));
    assert_eq!(status, 200);
    let (status, _) = start(&server, "x1", json!({"container_type": "local"}));
    assert_eq!(status, 200, "the run_id is free again after the close");
    server.post("/close_instance", &json!({"run_id": "x1"}));
}

#[test]
fn bad_sbatch_arguments_answer_with_slurms_words_and_leave_nothing() {
    if !slurm_available() {
        return;
    }
    let server = slurm_server(&[]);
    for (slurm, needle) in [
        (
            json!({"sbatch_args": ["--bogus-flag"]}),
            "unrecognized option '--bogus-flag'",
        ),
        (
            json!({"partition": "no-such-partition"}),
            "invalid partition",
        ),
    ] {
        let (status, body) = start(
            &server,
            "bad",
            json!({"container_type": "local", "slurm": slurm}),
        );
        assert_eq!(status, 500, "{body}");
        assert!(body["detail"].as_str().unwrap().contains(needle), "{body}");
    }
    let (status, body) = start(
        &server,
        "bad",
        json!({"container_type": "local", "slurm": {"partitoin": "x"}}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(our_jobs(&server).is_empty());
    assert_eq!(
        std::fs::read_dir(server.state_dir.join("instances"))
            .unwrap()
            .count(),
        0
    );
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(available, json!({"jobs": 2}));
}

#[test]
fn a_job_pending_past_the_queue_timeout_is_cancelled_with_its_reason() {
    if !slurm_available() {
        return;
    }
    let server = slurm_server(&["--queue-timeout", "2"]);
    let started = Instant::now();
    let (status, body) = start(
        &server,
        "late",
        json!({"container_type": "local", "slurm": {"sbatch_args": ["--begin=now+3600"]}}),
    );
    assert_eq!(status, 500, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("still pending after 2 s"), "{detail}");
    assert!(detail.contains("BeginTime"), "{detail}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        our_jobs(&server).is_empty(),
        "the pending job was not cancelled"
    );
}

#[test]
fn docker_inside_a_job() {
    if !slurm_available() {
        return;
    }
    let docker_ok = Command::new("docker")
        .args(["image", "inspect", "arservice-test/bash:latest"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !support::require(
        docker_ok,
        "docker inside a job needs the test image: run `sudo bash .ci/testbed.sh`",
    ) {
        return;
    }
    let server = slurm_server(&[]);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "dj", "container_name": "arservice-test/bash:latest",
                "environment_config": {"container_type": "docker", "cwd": "/testbed"}}),
    );
    assert_eq!(status, 200, "{body}");
    let job = server.job_of("dj");
    let result = server.exec("dj", "echo $SLURM_JOB_ID $BASH_VERSION; pwd");
    let output = result["output"].as_str().unwrap();
    assert!(output.starts_with(&format!("{job} 5.")), "{output}");
    assert!(output.ends_with("/testbed\n"), "{output}");
    let (status, _) = server.post("/close_instance", &json!({"run_id": "dj"}));
    assert_eq!(status, 200);
    let containers = Command::new("docker")
        .args([
            "ps",
            "--all",
            "--quiet",
            "--filter",
            "label=arservice.run_id=dj",
        ])
        .output()
        .unwrap();
    assert!(
        containers.stdout.is_empty(),
        "the job's container survived the close"
    );
}

#[test]
fn after_kill_9_a_recorded_job_is_adopted_and_an_unrecorded_one_cancelled() {
    if !slurm_available() {
        return;
    }
    let mut server = slurm_server(&[]);
    for run_id in ["kept", "orphan"] {
        let (status, body) = start(&server, run_id, json!({"container_type": "local"}));
        assert_eq!(status, 200, "{body}");
    }
    let kept = server.job_of("kept");
    let orphan = server.job_of("orphan");
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10)).unwrap();
    for job in [&kept, &orphan] {
        assert_eq!(
            queue_state(job),
            "RUNNING",
            "the job outlives a crashed server"
        );
    }
    // As if the crash came between `sbatch` and the journal write.
    std::fs::remove_file(server.state_dir.join("journal/orphan.json")).unwrap();
    let state_dir = server.state_dir.to_str().unwrap().to_string();
    let restarted = Server::start_with(support::Options {
        args: vec![
            "--runner",
            "slurm",
            "--max-resources",
            r#"{"jobs": 2}"#,
            "--state-dir",
            &state_dir,
        ],
        env: vec![],
    });
    // `server` (and its state dir) lives until the end: the restart reuses that state dir.
    wait_for(
        Duration::from_secs(30),
        "the unrecorded job to leave the queue",
        || queue_state(&orphan).is_empty().then_some(()),
    );
    let prefix = format!("{kept} ars-");
    let jobs = our_jobs(&restarted);
    assert!(
        jobs.len() == 1 && jobs[0].starts_with(&prefix) && jobs[0].ends_with("-kept"),
        "only the adopted job is left: {jobs:?}"
    );
    let (_, stats) = restarted.get("/stats");
    assert_eq!(stats["total_instances"], 1, "{stats}");
    assert_eq!(stats["instances"][0]["adopted"], true);
    assert_eq!(stats["allocated_resources"]["jobs"], 1, "{stats}");
    let result = restarted.exec("kept", "echo $SLURM_JOB_ID");
    assert_eq!(result["output"], format!("{kept}\n"), "{result}");
    let (status, body) = restarted.post("/close_instance", &json!({"run_id": "kept"}));
    assert_eq!(status, 200, "{body}");
    assert!(our_jobs(&restarted).is_empty());
}

#[test]
fn the_cli_path_takes_local_only_and_refuses_the_rest_with_nothing_queued() {
    if !slurm_available() {
        return;
    }
    let server = slurm_server(&[]);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "d", "container_name": "arservice-test/busybox:latest",
                "environment_config": {"container_type": "docker", "exec_mode": "cli"}}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("container_type local only"),
        "{body}"
    );
    assert!(our_jobs(&server).is_empty());
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(available, json!({"jobs": 2}));
}

#[test]
fn after_kill_9_a_cli_mode_job_is_adopted_and_runs_steps_again() {
    if !slurm_available() {
        return;
    }
    let mut server = slurm_server(&[]);
    let config = json!({"container_type": "local", "exec_mode": "cli", "env": {"A": "kept"}});
    let (status, body) = start(&server, "steps", config);
    assert_eq!(status, 200, "{body}");
    let job = server.job_of("steps");
    // A command still running at the crash: its client is gone with the server.
    let tag = unique_tag();
    let url = format!("{}/execute_command", server.url);
    let body = json!({"run_id": "steps", "cmd": format!("sleep {tag}1"), "timeout": 300});
    std::thread::spawn(move || {
        let _ = ureq::post(&url).send(body.to_string());
    });
    wait_for(Duration::from_secs(10), "the command to run", || {
        processes_with(&format!("sleep {tag}1"))
            .iter()
            .any(|process| process.ends_with(&format!(": sleep {tag}1 ")))
            .then_some(())
    });
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(
        queue_state(&job),
        "RUNNING",
        "the job outlives a crashed server"
    );
    let state_dir = server.state_dir.to_str().unwrap().to_string();
    let restarted = Server::start_with(support::Options {
        args: vec!["--runner", "slurm", "--state-dir", &state_dir],
        env: vec![],
    });
    let (_, stats) = restarted.get("/stats");
    let row = &stats["instances"][0];
    assert_eq!(row["adopted"], true, "{stats}");
    assert_eq!(row["exec_mode"], "cli", "{stats}");
    wait_for(
        Duration::from_secs(5),
        "the command of the dead server to be ended",
        || ours_left(tag).is_empty().then_some(()),
    );
    let result = restarted.exec("steps", "echo $SLURM_JOB_ID $A");
    assert_eq!(result["output"], format!("{job} kept\n"), "{result}");
    let (status, body) = restarted.post("/close_instance", &json!({"run_id": "steps"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        queue_state(&job),
        "",
        "the adopted job is still queued after its close"
    );
}

/// The node is usable, never drained or down (our kills must never make slurmd give up on it).
fn assert_node_not_drained() {
    let out = Command::new("scontrol")
        .args(["show", "node", "--oneliner"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    for node in shown.lines() {
        let state = node
            .split_whitespace()
            .find_map(|field| field.strip_prefix("State="))
            .unwrap_or("?");
        assert!(
            !["DRAIN", "DOWN", "FAIL"]
                .iter()
                .any(|bad| state.contains(bad)),
            "the node is {state}: {node}"
        );
    }
}

#[test]
fn binary_output_up_to_a_large_cap_comes_back_whole_through_the_jobs_server() {
    if !slurm_available() {
        return;
    }
    let cap = 4_000_000;
    let server = slurm_server(&["--max-output-bytes", &cap.to_string()]);
    let (status, body) = start(&server, "big", json!({"container_type": "local"}));
    assert_eq!(status, 200, "{body}");
    // Each \x01 is six bytes of JSON (`\u0001`): 3 MB of them are an 18 MB answer.
    let started = Instant::now();
    let result = server.exec("big", "head -c 3000000 /dev/zero | tr '\\0' '\\1'");
    assert_eq!(result["truncated"], false, "{}", result["returncode"]);
    let output = result["output"].as_str().unwrap();
    assert_eq!(output.len(), 3_000_000);
    assert!(output.bytes().all(|byte| byte == 1));
    // Past the cap: head and tail, never an error.
    let result = server.exec(
        "big",
        "head -c 5000000 /dev/zero | tr '\\0' '\\1'; printf '\\377end'",
    );
    assert_eq!(result["truncated"], true);
    let output = result["output"].as_str().unwrap();
    assert!(
        output.ends_with("\u{1}\u{FFFD}end"),
        "{}",
        &output[output.len() - 10..]
    );
    assert!(output.contains("bytes of output omitted"));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let (status, _) = server.post("/close_instance", &json!({"run_id": "big"}));
    assert_eq!(status, 200);
    assert!(our_jobs(&server).is_empty());
    assert_node_not_drained();
}

/// The job's steps still in the queue (`J.batch` included), and its `slurmstepd`s on the node.
fn steps_and_stepds(job: &str) -> (Vec<String>, Vec<String>) {
    let out = Command::new("squeue")
        .args(["--steps", "--noheader", "--format=%i", "--jobs", job])
        .output()
        .unwrap();
    let steps = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    (steps, processes_with(&format!("slurmstepd: [{job}.")))
}

/// Pids and command lines of this machine's processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
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

/// A number no other test on the machine uses, to name one test's `sleep`s.
fn unique_tag() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    60_000 + (std::process::id() % 1000) * 30 + unique
}

/// Processes of the test tagged `tag`, but for the bystander (`<tag>9`).
fn ours_left(tag: u32) -> Vec<String> {
    processes_with(&tag.to_string())
        .into_iter()
        .filter(|process| !process.contains(&format!("{tag}9")))
        .collect()
}

/// An unrelated `setsid sleep <tag>9` on the node: no kill of ours may touch it.
struct Bystander(std::process::Child);

impl Bystander {
    fn start(tag: u32) -> Bystander {
        Bystander(
            Command::new("setsid")
                .args(["sleep", &format!("{tag}9")])
                .stdin(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn assert_alive(&mut self, after: &str) {
        assert!(
            self.0.try_wait().unwrap().is_none(),
            "an unrelated setsid sleep died after {after}"
        );
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Commands that try to outlive their step; `{t}` becomes a tag that every process they start
/// has in its command line.
const ESCAPES: [(&str, &str); 4] = [
    ("background", "sleep {t}1 & echo started; sleep {t}2"),
    ("setsid", "setsid sleep {t}1 & echo started; sleep {t}2"),
    (
        "double fork ignoring SIGTERM",
        "(trap '' TERM; setsid sh -c 'trap \"\" TERM; sleep {t}1' &); echo started; sleep {t}2",
    ),
    (
        "setsid loop",
        "setsid sh -c 'while :; do echo {t} >> /tmp/loop-{t}; sleep 0.02; done' & echo started; sleep {t}2",
    ),
];

#[test]
fn cli_steps_leave_nothing_behind_answer_on_time_and_never_drain_the_node() {
    if !slurm_available() {
        return;
    }
    let server = slurm_server(&[]);
    let _close = support::CloseAll(&server);
    let (status, body) = start(
        &server,
        "esc",
        json!({"container_type": "local", "exec_mode": "cli"}),
    );
    assert_eq!(status, 200, "{body}");
    let job = server.job_of("esc");
    let tag = unique_tag();
    let mut bystander = Bystander::start(tag);
    let only_batch_left = |what: &str| {
        wait_for(
            Duration::from_secs(3),
            &format!("{what}: the step to leave the node"),
            || {
                let (steps, stepds) = steps_and_stepds(&job);
                (steps == [format!("{job}.batch")] && stepds.len() == 1).then_some(())
            },
        );
    };

    // A background job holding the step's output: the answer comes on time, and the orphan
    // does not outlive its step.
    let started = Instant::now();
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "esc", "cmd": format!("sleep {tag}0 & echo started"), "timeout": 3}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() <= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(body["result"]["output"], "started\n", "{body}");
    wait_for(Duration::from_secs(2), "the orphan to die", || {
        ours_left(tag).is_empty().then_some(())
    });
    only_batch_left("background");

    for (what, escape) in ESCAPES {
        let cmd = escape.replace("{t}", &tag.to_string());
        // 2 s: the launch of the step counts against the timeout, and a busy machine must still
        // get to `echo started` before it.
        let started = Instant::now();
        let (status, body) = server.post(
            "/execute_command",
            &json!({"run_id": "esc", "cmd": cmd, "timeout": 2}),
        );
        let took = started.elapsed();
        assert_eq!(status, 200, "{what}: {body}");
        assert_eq!(body["result"]["timed_out"], true, "{what}: {body}");
        assert_eq!(body["result"]["returncode"], 124, "{what}: {body}");
        assert_eq!(body["result"]["output"], "started\n", "{what}: {body}");
        assert!(
            took <= Duration::from_secs(3),
            "{what}: a 2 s timeout took {took:?}"
        );
        wait_for(
            Duration::from_secs(2),
            &format!("{what}: nothing left"),
            || ours_left(tag).is_empty().then_some(()),
        );
        only_batch_left(what);
        bystander.assert_alive(what);
    }
    let _ = std::fs::remove_file(format!("/tmp/loop-{tag}"));
    assert_eq!(server.exec("esc", "echo alive")["output"], "alive\n");
    assert_node_not_drained();

    let started = Instant::now();
    let (status, _) = server.post("/close_instance", &json!({"run_id": "esc"}));
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "close took {:?}",
        started.elapsed()
    );
    assert_eq!(
        queue_state(&job),
        "",
        "the job is still queued after its close"
    );
    bystander.assert_alive("the close");
    assert_node_not_drained();
}

#[test]
fn closing_a_cli_instance_ends_a_running_double_fork_that_ignores_sigterm() {
    if !slurm_available() {
        return;
    }
    let server = slurm_server(&[]);
    let _close = support::CloseAll(&server);
    let (status, body) = start(
        &server,
        "cl",
        json!({"container_type": "local", "exec_mode": "cli"}),
    );
    assert_eq!(status, 200, "{body}");
    let job = server.job_of("cl");
    let tag = unique_tag();
    let mut bystander = Bystander::start(tag);
    std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            server.post(
                "/execute_command",
                &json!({"run_id": "cl", "timeout": 300, "cmd": format!(
                    "(trap '' TERM; setsid sh -c 'trap \"\" TERM; sleep {tag}1' &); sleep {tag}2")}),
            )
        });
        wait_for(Duration::from_secs(10), "the double fork to run", || {
            processes_with(&format!("sleep {tag}1"))
                .iter()
                .any(|process| process.ends_with(&format!(": sleep {tag}1 ")))
                .then_some(())
        });
        let started = Instant::now();
        let (status, _) = server.post("/close_instance", &json!({"run_id": "cl"}));
        assert_eq!(status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "close took {:?}",
            started.elapsed()
        );
        let (status, body) = running.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert_ne!(body["result"]["returncode"], 0, "{body}");
    });
    assert_eq!(queue_state(&job), "");
    assert!(ours_left(tag).is_empty(), "{:?}", ours_left(tag));
    let (_, stepds) = steps_and_stepds(&job);
    assert!(stepds.is_empty(), "{stepds:?}");
    bystander.assert_alive("the close");
    assert_node_not_drained();
}

#[test]
fn a_cli_command_that_kills_its_guard_ends_its_step_and_the_close_ends_what_it_left() {
    if !slurm_available() {
        return;
    }
    let server = slurm_server(&[]);
    let _close = support::CloseAll(&server);
    let (status, body) = start(
        &server,
        "kg",
        json!({"container_type": "local", "exec_mode": "cli"}),
    );
    assert_eq!(status, 200, "{body}");
    let job = server.job_of("kg");
    let tag = unique_tag();
    let mut bystander = Bystander::start(tag);
    // The guard is the shell's parent: killing it leaves the setsid sleep to init, still
    // holding what was the command's output.
    let started = Instant::now();
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "kg", "timeout": 30,
                "cmd": format!("setsid sleep {tag}1 & sleep 0.2; kill -9 $PPID")}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the step waited for its orphan: {:?} {body}",
        started.elapsed()
    );
    wait_for(Duration::from_secs(5), "the step to end", || {
        let (steps, stepds) = steps_and_stepds(&job);
        (steps == [format!("{job}.batch")] && stepds.len() == 1).then_some(())
    });
    let started = Instant::now();
    let (status, _) = server.post("/close_instance", &json!({"run_id": "kg"}));
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "close took {:?}",
        started.elapsed()
    );
    // The job's hold guard killed it by the instance's marker.
    wait_for(Duration::from_secs(2), "the orphan to die", || {
        ours_left(tag).is_empty().then_some(())
    });
    bystander.assert_alive("the close");
    assert_node_not_drained();
}

/// The CLI path when the step's guard cannot write its output file (here its `.part` is a
/// directory the guard cannot replace, which stops root too): the command still ran and its
/// code comes back, and the answer's output is what `srun` printed, the guard's own words
/// naming the file, instead of output that was lost.
#[test]
fn a_cli_step_whose_guard_cannot_write_its_output_answers_with_what_srun_printed() {
    if !slurm_available() {
        return;
    }
    let server = slurm_server(&[]);
    let _close = support::CloseAll(&server);
    let (status, body) = start(
        &server,
        "unwritten",
        json!({"container_type": "local", "exec_mode": "cli"}),
    );
    assert_eq!(status, 200, "{body}");
    let steps = server.state_dir.join("instances/unwritten/steps");
    assert!(steps.is_dir(), "{}", steps.display());
    // The first command is step 0 of the instance.
    std::fs::create_dir(steps.join("ars-step-unwritten-0.out.part")).unwrap();
    let result = server.exec("unwritten", "echo lost; touch ran; exit 3");
    assert_eq!(result["returncode"], 3, "{result}");
    let output = result["output"].as_str().unwrap();
    assert!(
        output.contains("arservice guard: cannot write the output to")
            && output.contains("ars-step-unwritten-0.out"),
        "the guard's words, from srun: {result}"
    );
    assert!(!output.contains("lost"), "{result}");
    assert!(
        !output.contains("Exited with exit code"),
        "srun's own exit line is not output: {result}"
    );
    assert_eq!(
        server.exec("unwritten", "test -e ran && echo ran")["output"],
        "ran\n",
        "the command ran"
    );
    // The next step writes its file as usual.
    assert_eq!(server.exec("unwritten", "echo next")["output"], "next\n");
}

/// A job's server runs with this server's `--fork-timeout`: it bounds the commit, save, load
/// and copies that a fork under Slurm makes on the nodes.
#[test]
fn a_job_s_server_runs_with_the_fork_timeout() {
    if !slurm_available() {
        return;
    }
    let server = slurm_server(&["--fork-timeout", "77"]);
    let _close = support::CloseAll(&server);
    let (status, body) = start(&server, "timed", json!({"container_type": "local"}));
    assert_eq!(status, 200, "{body}");
    let root = server.state_dir.join("instances/timed");
    let script = std::fs::read_to_string(root.join("job.sh")).unwrap();
    assert!(script.contains("--fork-timeout 77\n"), "{script}");
    // The running job's server itself, found by its state dir among this machine's processes.
    let state = root.join("node");
    let running: Vec<Vec<String>> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|raw| {
            raw.split(|&byte| byte == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect::<Vec<_>>()
        })
        .filter(|args| args.iter().any(|arg| arg == state.to_str().unwrap()))
        .collect();
    assert!(
        running
            .iter()
            .any(|args| args.windows(2).any(|pair| pair == ["--fork-timeout", "77"])),
        "{running:?}"
    );
}

/// The docker containers of instance `run_id` (by its label), running or not.
fn containers_of(run_id: &str) -> Vec<String> {
    support::stdout_lines(
        Command::new("docker")
            .args(["ps", "--all", "--format", "{{.Names}}", "--filter"])
            .arg(format!("label=arservice.run_id={run_id}")),
    )
}

/// A job's server killed by SIGKILL (the OOM killer, a crash) does not close its instance:
/// the job script's sweep after it removes the docker container it left (the engine owns
/// it, the job's end would not), the job ends, and the login server answers the instance as
/// dead (410), as for a job cancelled from outside.
#[test]
fn a_job_server_killed_by_sigkill_leaves_no_container_on_the_node() {
    if !slurm_available()
        || !support::require(
            support::flavor::Flavor::docker_agent_bash().available(),
            "docker inside a job needs the test image: run `sudo bash .ci/testbed.sh`",
        )
    {
        return;
    }
    let server = slurm_server(&[]);
    // Unique on this machine: the containers are found by the run_id's label.
    let run_id = format!("k9-{}", std::process::id());
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": run_id, "container_name": "arservice-test/bash:latest",
                "environment_config": {"container_type": "docker"}}),
    );
    assert_eq!(status, 200, "{body}");
    let job = server.job_of(&run_id);
    let (_, stats) = server.get(&format!("/stats?run_id={run_id}"));
    assert_eq!(stats["instances"][0]["exec_mode"], "agent", "{stats}");
    assert_eq!(server.exec(&run_id, "echo up")["output"], "up\n");
    let containers = containers_of(&run_id);
    assert_eq!(containers.len(), 1, "{containers:?}");
    let pid = server.job_server_pid(&run_id);
    assert!(support::pid_alive(pid), "the job's server {pid} runs");
    // SAFETY: kill(2) of the job's server, a process this test's server started through Slurm.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_for(
        Duration::from_secs(30),
        "the container to be removed and the job to end",
        || (containers_of(&run_id).is_empty() && queue_state(&job).is_empty()).then_some(()),
    );
    let job_out = std::fs::read_to_string(
        server
            .state_dir
            .join("instances")
            .join(&run_id)
            .join("job.out"),
    )
    .unwrap();
    assert!(
        job_out.contains("removed 1 docker container(s) left by an earlier run"),
        "the job's sweep removed it: {job_out}"
    );
    let stats = wait_for(
        Duration::from_secs(20),
        "the instance to be reported dead",
        || {
            let (_, stats) = server.get(&format!("/stats?run_id={run_id}"));
            (stats["instances"][0]["state"] == "dead").then_some(stats)
        },
    );
    let reason = stats["instances"][0]["dead_reason"].as_str().unwrap();
    assert!(reason.contains(&format!("job {job}")), "{reason}");
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": run_id, "cmd": "true"}),
    );
    assert_eq!(status, 410, "{body}");
    let (status, _) = server.post("/close_instance", &json!({"run_id": run_id}));
    assert_eq!(status, 200);
    assert_node_not_drained();
}

/// `arservice sweep` (the job script's last step) refuses a state dir that a server holds
/// (exit 2: it would remove that server's live containers), and has nothing to do for one
/// that does not exist (a server that never started: exit 0).
#[test]
fn the_job_sweep_refuses_a_state_dir_in_use_or_not_arservices_and_skips_a_missing_one() {
    let server = Server::start(&["--runner", "local"]);
    let sweep = |dir: &std::path::Path| {
        Command::new(support::binary())
            .args(["sweep", "--state-dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let held = sweep(&server.state_dir);
    assert_eq!(held.status.code(), Some(2), "{held:?}");
    assert!(
        String::from_utf8_lossy(&held.stderr).contains("in use by another arservice"),
        "{held:?}"
    );
    let missing = sweep(&server.state_dir.join("never-started"));
    assert_eq!(missing.status.code(), Some(0), "{missing:?}");
    assert!(!server.state_dir.join("never-started").exists());
    // A directory arservice did not make, shaped like a state dir: refused, nothing touched.
    let foreign = std::env::temp_dir().join(format!("ars-sweep-foreign-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&foreign);
    std::fs::create_dir_all(foreign.join("trash/1-1")).unwrap();
    std::fs::write(foreign.join("trash/1-1/kept"), "kept").unwrap();
    std::fs::write(foreign.join("notes"), "kept").unwrap();
    let refused = sweep(&foreign);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("arservice did not make"),
        "{refused:?}"
    );
    assert!(foreign.join("trash/1-1/kept").exists() && foreign.join("notes").exists());
    let _ = std::fs::remove_dir_all(&foreign);
    let (status, _) = server.get("/healthz");
    assert_eq!(status, 200, "the server is untouched");
}
