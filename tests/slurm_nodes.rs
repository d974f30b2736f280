//! The Slurm runner on a cluster of several nodes: the test bed's second cluster
//! (`SLURM_CONF=/etc/slurm-multi/slurm.conf`), whose nodes `n1` and `n2` are each a `slurmd` of
//! its own on this host (see `.ci/testbed.sh`). The server runs outside the jobs, as on a login
//! node; every instance is a job on some node.
//!
//! What it shows: instances spread over the nodes (`/stats` names each one's node) and their
//! commands run there; a timeout and a close kill on the node; `--max-resources` counts jobs
//! across nodes; a node that dies under its jobs (its `slurmd`, its `slurmstepd`s and all they
//! run killed) makes exactly its instances dead with 410 and Slurm's reason; a restart after
//! `kill -9` adopts the jobs of every node; a job's server refuses requests (commands, `/stats`,
//! `/files` up and down) without its token.
//!
//! What it cannot show: the nodes share this host's kernel, processes, network and file
//! systems, so `hostname` is the same on every node, the shared state dir is shared for free,
//! and a node's death is its daemons' death, not a machine's.
//!
//! The tests of this binary take turns ([`serial`]): one of them kills a node, which would
//! take any other test's jobs on it along.

mod support;

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use support::{wait_for, Options, Server, TempDir};

/// The second cluster of the test bed.
const MULTI_CONF: &str = "/etc/slurm-multi/slurm.conf";
const PARTITION: &str = "multi";
const NODES: [&str; 2] = ["n1", "n2"];

/// How long a node may take to be usable again (after the node test brought it back).
const NODE_READY_WAIT: Duration = Duration::from_secs(90);

/// The Slurm command `program` on the second cluster.
fn slurm(program: &str) -> Command {
    let mut command = Command::new(program);
    command.env("SLURM_CONF", MULTI_CONF);
    command
}

fn output(command: &mut Command) -> String {
    let out = command.output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `sinfo`'s state of `node`, without its flags (`idle*` is `idle`, not responding).
fn node_state(node: &str) -> String {
    output(slurm("sinfo").args(["--noheader", "--Node", "--format=%t", "--nodes", node]))
}

fn node_usable(node: &str) -> bool {
    matches!(
        node_state(node).as_str(),
        "idle" | "mix" | "alloc" | "comp" | "mix-"
    )
}

/// True when both nodes of the second cluster are usable (waiting a while for one that is
/// coming back); in CI a missing cluster fails the test.
fn cluster_ready() -> bool {
    let answers = slurm("sinfo")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
        && std::path::Path::new(MULTI_CONF).is_file();
    let ready = answers && {
        let deadline = Instant::now() + NODE_READY_WAIT;
        loop {
            if NODES.iter().all(|node| node_usable(node)) {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    support::require(
        ready,
        &format!(
            "these tests need the test bed's second Slurm cluster ({MULTI_CONF}, nodes n1 n2 usable, now {:?}): run `sudo bash .ci/testbed.sh`",
            NODES.map(node_state)
        ),
    )
}

/// One test at a time in this binary.
fn serial() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A login server of the second cluster, admitting `jobs` jobs, with the operator's presets
/// `on-n1` and `on-n2` that pin an instance to a node (`sbatch_args` are the operator's). The
/// presets' directory goes with the returned guard.
fn login_server(jobs: u32, extra: &[&str]) -> (Server, TempDir) {
    let presets = TempDir::new("slurm-nodes-presets");
    let file = presets.path().join("environments.json");
    let pinned: serde_json::Map<String, Value> = NODES
        .iter()
        .map(|node| {
            (
                format!("on-{node}"),
                json!({"container_type": "local",
                       "slurm": {"sbatch_args": [format!("--nodelist={node}")]}}),
            )
        })
        .collect();
    std::fs::write(&file, Value::Object(pinned).to_string()).unwrap();
    let limit = format!(r#"{{"jobs": {jobs}}}"#);
    let mut args: Vec<&str> = vec![
        "--runner",
        "slurm",
        "--slurm-partition",
        PARTITION,
        "--max-resources",
        &limit,
        "--health-interval",
        "0.5",
    ];
    args.extend(["--environments", file.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let server = Server::start_with(Options {
        args,
        env: vec![("SLURM_CONF", MULTI_CONF)],
    });
    (server, presets)
}

/// A `local` instance in `mode`, on `node` when one is named (the operator's preset), else
/// where Slurm puts it: its `container_name` and `environment_config`.
fn config(mode: &str, node: Option<&str>) -> (String, Value) {
    let name = node.map_or("local".to_string(), |node| format!("on-{node}"));
    (name, json!({"container_type": "local", "exec_mode": mode}))
}

fn start(server: &Server, run_id: &str, (name, config): (String, Value)) {
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": run_id, "container_name": name, "environment_config": config}),
    );
    assert_eq!(status, 200, "start {run_id}: {body}");
}

fn row(server: &Server, run_id: &str) -> Value {
    let (_, stats) = server.get(&format!("/stats?run_id={run_id}"));
    stats["instances"][0].clone()
}

fn node_of(server: &Server, run_id: &str) -> String {
    row(server, run_id)["node"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn close(server: &Server, run_id: &str) {
    let (status, body) = server.post("/close_instance", &json!({"run_id": run_id}));
    assert_eq!(status, 200, "close {run_id}: {body}");
}

/// This server's jobs still in the second cluster's queue: (job, node).
fn our_jobs(server: &Server) -> Vec<(String, String)> {
    let (_, stats) = server.get("/stats");
    let prefix = format!("ars-{}-", stats["server_id"].as_str().unwrap());
    output(slurm("squeue").args(["--noheader", "--format=%i %j %N"]))
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 2 && fields[1].starts_with(&prefix)).then(|| {
                (
                    fields[0].to_string(),
                    fields.get(2).unwrap_or(&"").to_string(),
                )
            })
        })
        .collect()
}

/// Pids on this host whose command line contains `needle`.
fn processes_running(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(needle)
                .then_some(pid)
        })
        .collect()
}

/// The value of `name` in the environment of process `pid`.
fn environ_of(pid: i32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    environ
        .split(|&byte| byte == 0)
        .find_map(|var| var.strip_prefix(prefix.as_bytes()))
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

#[test]
fn instances_spread_over_the_nodes_run_there_and_count_across_them() {
    let _turn = serial();
    if !cluster_ready() {
        return;
    }
    for mode in ["agent", "cli"] {
        let (server, _presets) = login_server(2, &[]);
        let _close = support::CloseAll(&server);
        // Slurm puts each job on the least loaded node (the partition's LLN): one per node.
        for run_id in ["a", "b"] {
            start(&server, run_id, config(mode, None));
            assert_eq!(row(&server, run_id)["exec_mode"], mode);
        }
        let nodes: BTreeSet<String> = ["a", "b"]
            .iter()
            .map(|run_id| node_of(&server, run_id))
            .collect();
        assert_eq!(
            nodes,
            NODES.iter().map(|node| node.to_string()).collect(),
            "{mode}: one instance on each node"
        );
        for run_id in ["a", "b"] {
            let node = node_of(&server, run_id);
            let seen = server.exec(run_id, "echo $SLURM_JOB_NODELIST");
            assert_eq!(seen["output"], format!("{node}\n"), "{mode} {run_id}");
        }
        // The limit counts jobs, wherever they run: a third is refused, nothing is queued.
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": "c", "container_name": "local",
                    "environment_config": config(mode, None).1}),
        );
        assert_eq!(status, 429, "{mode}: {body}");
        assert_eq!(
            our_jobs(&server).len(),
            2,
            "{mode}: {:?}",
            our_jobs(&server)
        );
        let mut on_nodes: Vec<String> = our_jobs(&server).into_iter().map(|(_, n)| n).collect();
        on_nodes.sort();
        assert_eq!(on_nodes, NODES, "{mode}: squeue agrees");
        // A slot freed on one node is a slot anywhere.
        close(&server, "a");
        start(&server, "c", config(mode, None));
        assert_eq!(server.exec("c", "echo ok")["output"], "ok\n");
        close(&server, "b");
        close(&server, "c");
        assert!(
            our_jobs(&server).is_empty(),
            "{mode}: {:?}",
            our_jobs(&server)
        );
    }
}

#[test]
fn a_timeout_and_a_close_kill_on_the_node_that_runs_the_command() {
    let _turn = serial();
    if !cluster_ready() {
        return;
    }
    let (server, _presets) = login_server(4, &[]);
    let _close = support::CloseAll(&server);
    let tag = 40_000 + std::process::id() % 1000 * 10;
    for (index, mode) in ["agent", "cli"].into_iter().enumerate() {
        let victim = format!("{mode}-n2");
        let bystander = format!("{mode}-n1");
        start(&server, &bystander, config(mode, Some("n1")));
        start(&server, &victim, config(mode, Some("n2")));
        assert_eq!(node_of(&server, &victim), "n2");
        let unique = tag + index as u32;
        let (bg, fg) = (format!("sleep {unique}1"), format!("sleep {unique}2"));
        let started = Instant::now();
        let (status, body) = std::thread::scope(|scope| {
            let answer = scope.spawn(|| {
                server.post(
                    "/execute_command",
                    &json!({"run_id": victim, "timeout": 3,
                            "cmd": format!("{bg} & echo started; {fg}")}),
                )
            });
            // While it runs: its `sleep` is n2's, Slurm gave it that node's variables (the
            // command line of `srun` on this side has the command's text too).
            let pids = wait_for(Duration::from_secs(10), "the command to run", || {
                let pids: Vec<i32> = processes_running(&fg)
                    .into_iter()
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                            String::from_utf8_lossy(&cmdline)
                                .replace('\0', " ")
                                .starts_with(&fg)
                        })
                    })
                    .collect();
                (!pids.is_empty()).then_some(pids)
            });
            for pid in pids {
                let node = environ_of(pid, "SLURM_JOB_NODELIST");
                assert_eq!(node.as_deref(), Some("n2"), "{mode}: pid {pid}");
            }
            answer.join().unwrap()
        });
        assert_eq!(status, 200, "{body}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "{mode}: took {took:?}");
        assert_eq!(body["result"]["timed_out"], true, "{body}");
        assert_eq!(body["result"]["output"], "started\n", "{body}");
        wait_for(
            Duration::from_secs(10),
            "the timed-out command to be gone",
            || {
                processes_running(&format!("sleep {unique}"))
                    .is_empty()
                    .then_some(())
            },
        );
        if mode == "agent" {
            // A close kills what the instance left running on its node (on the CLI path a
            // background job ends with its command's step).
            let left = format!("sleep {unique}3");
            server.exec(&victim, &format!("{left} >/dev/null 2>&1 &"));
            assert!(
                !processes_running(&left).is_empty(),
                "the background job runs"
            );
            close(&server, &victim);
            assert!(
                processes_running(&left).is_empty(),
                "{mode}: the close left {left}"
            );
        } else {
            close(&server, &victim);
        }
        // The other node's instance saw nothing of it.
        assert_eq!(
            server.exec(&bystander, "echo $SLURM_JOB_NODELIST")["output"],
            "n1\n"
        );
        close(&server, &bystander);
    }
    assert!(our_jobs(&server).is_empty());
}

/// Kills node `node` as a failure would: its `slurmd`, the `slurmstepd` of every job on it
/// and everything those run, all with SIGKILL at once. Brings it back on drop.
struct DeadNode {
    node: &'static str,
}

impl DeadNode {
    fn kill(node: &'static str) -> DeadNode {
        let jobs = output(slurm("squeue").args(["--noheader", "--format=%i", "--nodelist", node]));
        let mut doomed: Vec<i32> = Vec::new();
        let slurmd = std::fs::read_to_string(format!("/run/slurmd-multi-{node}.pid"))
            .expect("the node's slurmd pid file");
        doomed.push(slurmd.trim().parse().unwrap());
        for job in jobs.lines() {
            for stepd in processes_running(&format!("slurmstepd: [{}.", job.trim())) {
                doomed.extend(descendants(stepd));
                doomed.push(stepd);
            }
        }
        for pid in &doomed {
            // SAFETY: kill sends a signal; these are the test bed's node daemons and the
            // processes of this test's own jobs, found a moment ago.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        DeadNode { node }
    }
}

impl Drop for DeadNode {
    fn drop(&mut self) {
        let started = slurm("slurmd")
            .args(["-f", MULTI_CONF, "-N", self.node])
            .status();
        if !matches!(started, Ok(status) if status.success()) {
            eprintln!("cannot start slurmd -N {} again: {started:?}", self.node);
            return;
        }
        // ReturnToService=2: the node is back once its slurmd registered.
        let deadline = Instant::now() + NODE_READY_WAIT;
        while !node_usable(self.node) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
        }
        if !node_usable(self.node) {
            let _ = slurm("scontrol")
                .args(["update", &format!("nodename={}", self.node), "state=resume"])
                .status();
        }
    }
}

/// Every process below `pid` (children first found, all levels).
fn descendants(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|pid| pid.parse().ok())
            {
                found.push(child);
                queue.push(child);
            }
        }
    }
    found
}

#[test]
fn a_node_that_dies_under_its_jobs_takes_only_its_instances() {
    let _turn = serial();
    if !cluster_ready() {
        return;
    }
    let (server, _presets) = login_server(4, &[]);
    let _close = support::CloseAll(&server);
    for mode in ["agent", "cli"] {
        start(&server, &format!("{mode}-n1"), config(mode, Some("n1")));
        start(&server, &format!("{mode}-n2"), config(mode, Some("n2")));
    }
    let jobs: Vec<String> = ["agent-n2", "cli-n2"]
        .iter()
        .map(|run_id| row(&server, run_id)["job_id"].as_str().unwrap().to_string())
        .collect();
    let killed_at = Instant::now();
    let dead = DeadNode::kill("n2");
    let mut took = Vec::new();
    for (run_id, job) in ["agent-n2", "cli-n2"].iter().zip(&jobs) {
        let row = wait_for(
            Duration::from_secs(60),
            &format!("{run_id} to be reported dead"),
            || {
                let row = row(&server, run_id);
                (row["state"] == "dead").then_some(row)
            },
        );
        took.push(killed_at.elapsed());
        let reason = row["dead_reason"].as_str().unwrap();
        // Mostly the probe's word; Slurm's when it saw the job end first (a launch failure
        // it noticed once the node's slurmstepd was gone). Never its NODE_FAIL: that comes
        // after SlurmdTimeout, too late for the bound below.
        assert!(
            reason.contains(&format!("job {job} on node n2: the node stopped answering"))
                || reason.contains(&format!("job {job} ended")),
            "{run_id}: {reason}"
        );
        let (status, body) = server.post(
            "/execute_command",
            &json!({"run_id": run_id, "cmd": "true"}),
        );
        assert_eq!(status, 410, "{run_id}: {body}");
        assert!(body["detail"].as_str().unwrap().contains(reason), "{body}");
    }
    eprintln!("n2's instances reported dead {took:?} after the kill");
    // Seconds, not Slurm's SlurmdTimeout: probes every 0.5 s, dead after 2 s of silence.
    assert!(
        took.iter().all(|took| *took < Duration::from_secs(15)),
        "the dead node was noticed late: {took:?}"
    );
    // Nothing else disturbed: n1's instances work, and the dead ones' jobs came back.
    for run_id in ["agent-n1", "cli-n1"] {
        assert_eq!(row(&server, run_id)["state"], "running");
        assert_eq!(
            server.exec(run_id, "echo $SLURM_JOB_NODELIST")["output"],
            "n1\n"
        );
    }
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(
        available,
        json!({"jobs": 2}),
        "the dead instances' jobs are back"
    );
    for run_id in ["agent-n2", "cli-n2"] {
        close(&server, run_id);
    }
    drop(dead);
    assert!(cluster_ready(), "n2 came back");
    // And a new instance may land on the node again.
    start(&server, "again", config("agent", Some("n2")));
    assert_eq!(
        server.exec("again", "echo $SLURM_JOB_NODELIST")["output"],
        "n2\n"
    );
    for run_id in ["again", "agent-n1", "cli-n1"] {
        close(&server, run_id);
    }
    assert!(our_jobs(&server).is_empty(), "{:?}", our_jobs(&server));
}

#[test]
fn a_restart_after_kill_9_adopts_the_jobs_of_every_node() {
    let _turn = serial();
    if !cluster_ready() {
        return;
    }
    let (mut first, _first_presets) = login_server(4, &[]);
    let state_dir = first.state_dir.to_str().unwrap().to_string();
    let mut placed = Vec::new();
    for mode in ["agent", "cli"] {
        for node in NODES {
            let run_id = format!("{mode}-{node}");
            start(&first, &run_id, config(mode, Some(node)));
            first.exec(&run_id, "echo kept > kept-file");
            placed.push((run_id, node));
        }
    }
    let mut jobs_before = our_jobs(&first);
    jobs_before.sort();
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).expect("killed");

    let (second, _second_presets) = login_server(4, &["--state-dir", &state_dir]);
    let _close = support::CloseAll(&second);
    let (_, stats) = second.get("/stats");
    assert_eq!(stats["instances_adopted"], 4, "{stats}");
    assert_eq!(stats["allocated_resources"]["jobs"], 4, "{stats}");
    for (run_id, node) in &placed {
        let row = row(&second, run_id);
        assert_eq!(row["adopted"], true, "{row}");
        assert_eq!(row["node"], *node, "{row}");
        let seen = second.exec(run_id, "cat kept-file; echo $SLURM_JOB_NODELIST");
        assert_eq!(seen["output"], format!("kept\n{node}\n"), "{run_id}");
    }
    let mut jobs_after = our_jobs(&second);
    jobs_after.sort();
    assert_eq!(jobs_after, jobs_before, "the same jobs, none added");
    for (run_id, _) in &placed {
        close(&second, run_id);
    }
    assert!(our_jobs(&second).is_empty());
}

#[test]
fn a_jobs_server_refuses_requests_without_its_token() {
    let _turn = serial();
    if !cluster_ready() {
        return;
    }
    let (server, _presets) = login_server(2, &[]);
    let _close = support::CloseAll(&server);
    start(&server, "guarded", config("agent", Some("n2")));
    let url = row(&server, "guarded")["node_url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(url.starts_with("http://"), "{url}");
    assert_eq!(
        server.exec("guarded", "echo secret > kept.txt; echo ok")["output"],
        "ok\n"
    );
    let body = json!({"run_id": "guarded", "cmd": "echo leaked"});
    for token in [None, Some("0123456789abcdef0123456789abcdef")] {
        let mut request = ureq::post(format!("{url}/execute_command"))
            .config()
            .http_status_as_error(false)
            .build();
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let answer = request.send(body.to_string()).unwrap();
        assert_eq!(answer.status().as_u16(), 401, "token {token:?}");
    }
    let answer = ureq::get(format!("{url}/stats"))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    assert_eq!(answer.status().as_u16(), 401, "/stats of the job's server");
    // `/files` too: an upload without the token (or with another) writes nothing, a
    // download reads nothing.
    for token in [None, Some("0123456789abcdef0123456789abcdef")] {
        let mut upload = ureq::put(format!("{url}/files/guarded/unauthorized.txt"))
            .config()
            .http_status_as_error(false)
            .build();
        let mut download = ureq::get(format!("{url}/files/guarded/kept.txt"))
            .config()
            .http_status_as_error(false)
            .build();
        if let Some(token) = token {
            upload = upload.header("Authorization", format!("Bearer {token}"));
            download = download.header("Authorization", format!("Bearer {token}"));
        }
        let answer = upload.send("written without the token").unwrap();
        assert_eq!(answer.status().as_u16(), 401, "PUT /files, token {token:?}");
        let mut answer = download.call().unwrap();
        assert_eq!(answer.status().as_u16(), 401, "GET /files, token {token:?}");
        let text = answer.body_mut().read_to_string().unwrap();
        assert!(!text.contains("secret"), "{text}");
    }
    assert_eq!(
        server.exec(
            "guarded",
            "test -e unauthorized.txt && echo written || echo absent"
        )["output"],
        "absent\n"
    );
    assert_eq!(
        server.exec("guarded", "echo through the login server")["output"],
        "through the login server\n"
    );
    close(&server, "guarded");
}
