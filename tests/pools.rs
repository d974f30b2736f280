//! Warm pools through the real binary: a start naming a pooled preset takes a ready sandbox
//! and the pool refills; concurrent starts never share one; a request short of room closes
//! pooled sandboxes; nothing is left after SIGTERM; after SIGKILL a restart adopts the pool
//! and the runs that took from it, or removes what no longer has a pool; a pooled sandbox
//! that died is replaced; a take the journal cannot record is refused and its sandbox closed;
//! a pooled Slurm job still pending at SIGTERM is cancelled, not waited for.
//! Docker through the agent, podman, bubblewrap with a rootfs, local, the apptainer and enroot
//! stand-ins, and Slurm (pooled jobs, against the test bed's real Slurm).

mod support;

use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{queue_state, static_agent, wait_for, CloseAll, Server, TempDir};

const IMAGE: &str = "arservice-test/busybox:latest";
const ROOTFS: &str = "/var/lib/arservice-testbed/rootfs-bash";
const WAIT: Duration = Duration::from_secs(60);

fn docker_ready() -> bool {
    let image = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .is_ok_and(|out| out.status.success());
    support::require(
        image,
        "pools need docker with the test image: run `sudo bash .ci/testbed.sh`",
    )
}

/// Writes an `--environments` file into `dir`.
fn environments(dir: &TempDir, presets: Value) -> String {
    let path = dir.path().join(format!("envs-{}.json", fastrand_name()));
    std::fs::write(&path, presets.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

fn fastrand_name() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The docker preset `dk` with a pool of `size`.
fn docker_preset(size: usize) -> Value {
    json!({"dk": {"container_type": "docker", "image": IMAGE, "pool": {"size": size}}})
}

/// `--agent` (when the static build is there), the presets, and the given flags.
fn args<'a>(agent: &'a Option<String>, envs: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args: Vec<&str> = agent
        .iter()
        .flat_map(|path| ["--agent", path.as_str()])
        .collect();
    args.extend(["--environments", envs, "--health-interval", "0.5"]);
    args.extend(extra);
    args
}

fn stats(server: &Server) -> Value {
    let (status, stats) = server.get("/stats");
    assert_eq!(status, 200, "{stats}");
    stats
}

fn pool(server: &Server, preset: &str) -> Value {
    stats(server)["pools"][preset].clone()
}

/// Waits until the pool of `preset` has `idle` sandboxes idle and none starting.
fn wait_idle(server: &Server, preset: &str, idle: u64) -> Value {
    wait_for(WAIT, &format!("{idle} idle in pool {preset}"), || {
        let pool = pool(server, preset);
        (pool["idle"] == idle && pool["starting"] == 0).then_some(pool)
    })
}

fn allocated(server: &Server) -> Value {
    stats(server)["allocated_resources"]["instances"].clone()
}

/// The container (sandbox name) `/stats` shows for `run_id`.
fn container_of(server: &Server, run_id: &str) -> String {
    let stats = stats(server);
    let row = stats["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["run_id"] == run_id)
        .unwrap_or_else(|| panic!("{run_id} is not listed: {stats}"))
        .clone();
    row["container"].as_str().unwrap().to_string()
}

/// Every docker container (running or not) of server `server_id`.
fn containers(server_id: &str) -> Vec<String> {
    containers_of("docker", server_id)
}

/// Every container (running or not) of server `server_id` that `cli` (docker, podman) lists.
fn containers_of(cli: &str, server_id: &str) -> Vec<String> {
    let prefix = format!("ars-{server_id}-");
    let mut names: Vec<String> =
        support::stdout_lines(Command::new(cli).args(["ps", "-a", "--format", "{{.Names}}"]))
            .into_iter()
            .filter(|name| name.starts_with(&prefix))
            .collect();
    names.sort();
    names
}

fn journal(server: &Server) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(server.state_dir.join("journal"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn start(server: &Server, body: Value) {
    let (status, answer) = server.post("/start_instance", &body);
    assert_eq!(status, 200, "{body} gave {answer}");
}

#[test]
fn docker_a_pooled_start_takes_a_ready_sandbox_and_the_pool_refills() {
    if !docker_ready() {
        return;
    }
    let agent = static_agent();
    let dir = TempDir::new("pools");
    let envs = environments(&dir, docker_preset(2));
    let mut server = Server::start(&args(
        &agent,
        &envs,
        &["--max-resources", r#"{"instances": 8}"#],
    ));
    let server_id = stats(&server)["server_id"].as_str().unwrap().to_string();
    let close_all = CloseAll(&server);
    let pooled = wait_idle(&server, "dk", 2);
    assert_eq!(pooled["resources"]["instances"], 2, "{pooled}");
    assert_eq!(allocated(&server), 2, "pooled sandboxes hold their room");
    let before = containers(&server_id);
    assert_eq!(before.len(), 2, "{before:?}");

    // A lifetime key does not change the sandbox: still the pool's.
    let began = Instant::now();
    start(
        &server,
        json!({"run_id": "r1", "container_name": "dk", "ttl": 600}),
    );
    let took = began.elapsed();
    let sandbox = container_of(&server, "r1");
    assert!(
        before.contains(&sandbox),
        "{sandbox} is not one of {before:?}"
    );
    assert!(sandbox.starts_with(&format!("ars-{server_id}-_pool-")));
    assert_eq!(server.exec("r1", "echo hi")["output"], "hi\n");
    assert_eq!(pool(&server, "dk")["taken"], 1);
    assert!(took < Duration::from_secs(2), "a take took {took:?}");

    // Anything that changes the sandbox starts cold, under the run's own name.
    start(
        &server,
        json!({"run_id": "r2", "container_name": "dk", "environment_config": {"env": {"A": "b"}}}),
    );
    assert_eq!(container_of(&server, "r2"), format!("ars-{server_id}-r2"));
    assert_eq!(server.exec("r2", "echo $A")["output"], "b\n");
    let refilled = wait_idle(&server, "dk", 2);
    assert_eq!(refilled["taken"], 1, "{refilled}");
    assert_eq!(allocated(&server), 4, "two runs and two pooled");
    let journaled = journal(&server);
    assert!(journaled.contains(&"r1.json".to_string()), "{journaled:?}");
    assert_eq!(
        journaled
            .iter()
            .filter(|name| name.starts_with("_pool-"))
            .count(),
        2,
        "{journaled:?}"
    );

    // Closed after use, the sandbox is gone for good (removed in the background, its room
    // held until then), never back in the pool.
    let (status, body) = server.post("/close_instance", &json!({"run_id": "r1"}));
    assert_eq!(status, 200, "{body}");
    wait_for(WAIT, "r1's pooled sandbox removed", || {
        (!containers(&server_id).contains(&sandbox) && allocated(&server) == 3).then_some(())
    });
    let idle_now = wait_idle(&server, "dk", 2);
    assert_eq!(idle_now["taken"], 1);
    assert!(!journal(&server).contains(&"r1.json".to_string()));

    // /metrics tells the same.
    let text = ureq::get(format!("{}/metrics", server.url))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        text.contains("arservice_pool_takes_total{pool=\"dk\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("arservice_resource_pooled{resource=\"instances\"} 2"),
        "{text}"
    );

    // SIGTERM: every run and every pooled sandbox closed, no record left.
    drop(close_all);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(WAIT).expect("the server exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_eq!(containers(&server_id), Vec::<String>::new());
    assert_eq!(journal(&server), Vec::<String>::new());
}

#[test]
fn docker_concurrent_starts_never_share_a_pooled_sandbox() {
    if !docker_ready() {
        return;
    }
    let agent = static_agent();
    let dir = TempDir::new("pools-race");
    let envs = environments(&dir, docker_preset(3));
    let mut server = Server::start(&args(
        &agent,
        &envs,
        &["--max-resources", r#"{"instances": 16}"#],
    ));
    let server_id = stats(&server)["server_id"].as_str().unwrap().to_string();
    let close_all = CloseAll(&server);
    wait_idle(&server, "dk", 3);
    let runs = 8;
    let barrier = std::sync::Barrier::new(runs);
    std::thread::scope(|scope| {
        for index in 0..runs {
            let (server, barrier) = (&server, &barrier);
            scope.spawn(move || {
                barrier.wait();
                start(
                    server,
                    json!({"run_id": format!("race-{index}"), "container_name": "dk"}),
                );
            });
        }
    });
    let sandboxes: Vec<String> = (0..runs)
        .map(|index| container_of(&server, &format!("race-{index}")))
        .collect();
    let mut distinct = sandboxes.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        runs,
        "a sandbox went to two runs: {sandboxes:?}"
    );
    let from_pool = sandboxes
        .iter()
        .filter(|name| name.contains("-_pool-"))
        .count() as u64;
    let counted = pool(&server, "dk");
    assert_eq!(counted["taken"], from_pool, "{counted}");
    assert!(
        from_pool >= 3,
        "the 3 ready sandboxes were taken: {sandboxes:?}"
    );
    assert_eq!(
        counted["taken"].as_u64().unwrap() + counted["missed"].as_u64().unwrap(),
        runs as u64
    );
    for index in 0..runs {
        let run_id = format!("race-{index}");
        assert_eq!(
            server.exec(&run_id, "echo $PPID >/dev/null; echo ok")["output"],
            "ok\n"
        );
    }
    let settled = wait_idle(&server, "dk", 3);
    assert_eq!(settled["resources"]["instances"], 3);
    assert_eq!(allocated(&server), runs as u64 + 3, "the ledger is exact");
    let live = containers(&server_id);
    assert_eq!(live.len(), runs + 3, "{live:?}");
    drop(close_all);
    server.signal(libc::SIGTERM);
    server.wait_exit(WAIT).expect("the server exits on SIGTERM");
    assert_eq!(containers(&server_id), Vec::<String>::new());
}

#[test]
fn local_requests_take_the_room_pooled_sandboxes_hold() {
    let dir = TempDir::new("pools-room");
    let envs = environments(
        &dir,
        json!({"py": {"container_type": "local", "pool": {"size": 2}}}),
    );
    let server = Server::start(&[
        "--environments",
        &envs,
        "--max-resources",
        r#"{"instances": 2}"#,
    ]);
    let _close_all = CloseAll(&server);
    wait_idle(&server, "py", 2);
    assert_eq!(allocated(&server), 2);
    // Pooled, taken at once: a local pooled sandbox is a directory of its own.
    start(&server, json!({"run_id": "warm", "container_name": "py"}));
    let cwd = server.exec("warm", "pwd")["output"].clone();
    assert!(cwd.as_str().unwrap().contains("/_pool-"), "{cwd}");
    // The pool cannot refill (the server is full) but a cold request takes the room of the
    // idle pooled sandbox.
    wait_for(WAIT, "the refill to give up", || {
        (pool(&server, "py")["starting"] == 0).then_some(())
    });
    let idle = pool(&server, "py")["idle"].as_u64().unwrap();
    assert_eq!(idle, 1);
    start(
        &server,
        json!({"run_id": "cold", "environment_config": {"container_type": "local"}}),
    );
    let after = pool(&server, "py");
    assert_eq!(after["evicted"], 1, "{after}");
    assert_eq!(after["idle"], 0, "{after}");
    assert_eq!(allocated(&server), 2, "exact: two runs, nothing pooled");
    // Full of runs now: the next is refused as without pools.
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "third", "environment_config": {"container_type": "local"}}),
    );
    assert_eq!(status, 429, "{body}");
    // Room again: the pool refills.
    let (status, _) = server.post("/close_instance", &json!({"run_id": "cold"}));
    assert_eq!(status, 200);
    wait_idle(&server, "py", 1);
    assert_eq!(allocated(&server), 2);
}

#[test]
fn docker_after_sigkill_the_pool_and_its_runs_are_adopted_or_removed() {
    if !docker_ready() {
        return;
    }
    let agent = static_agent();
    let dir = TempDir::new("pools-crash");
    let envs = environments(&dir, docker_preset(2));
    let mut first = Server::start(&args(&agent, &envs, &[]));
    let state_dir = first.state_dir.to_str().unwrap().to_string();
    let server_id = stats(&first)["server_id"].as_str().unwrap().to_string();
    wait_idle(&first, "dk", 2);
    start(&first, json!({"run_id": "r1", "container_name": "dk"}));
    assert_eq!(
        first.exec("r1", "echo kept > /tmp/f; echo ok")["output"],
        "ok\n"
    );
    let sandbox = container_of(&first, "r1");
    wait_idle(&first, "dk", 2);
    let before = containers(&server_id);
    assert_eq!(before.len(), 3, "{before:?}");
    first.signal(libc::SIGKILL);
    first.wait_exit(WAIT).expect("killed");

    // Same presets: the run and both idle pooled sandboxes are taken back as they were.
    let mut second = Server::start(&args(&agent, &envs, &["--state-dir", &state_dir]));
    assert_eq!(stats(&second)["instances_adopted"], 1);
    assert_eq!(container_of(&second, "r1"), sandbox);
    assert_eq!(second.exec("r1", "cat /tmp/f")["output"], "kept\n");
    let adopted = wait_idle(&second, "dk", 2);
    assert_eq!(adopted["taken"], 0, "{adopted}");
    assert_eq!(
        containers(&server_id),
        before,
        "nothing started, nothing removed"
    );
    assert_eq!(allocated(&second), 3);
    // A pooled sandbox taken after adoption works.
    start(&second, json!({"run_id": "r2", "container_name": "dk"}));
    assert!(before.contains(&container_of(&second, "r2")));
    assert_eq!(second.exec("r2", "echo two")["output"], "two\n");
    second.signal(libc::SIGKILL);
    second.wait_exit(WAIT).expect("killed");

    // The preset lost its pool: its idle sandboxes go, the runs stay.
    let plain = environments(
        &dir,
        json!({"dk": {"container_type": "docker", "image": IMAGE}}),
    );
    let mut third = Server::start(&args(&agent, &plain, &["--state-dir", &state_dir]));
    assert_eq!(stats(&third)["instances_adopted"], 2);
    let mut runs = vec![container_of(&third, "r1"), container_of(&third, "r2")];
    runs.sort();
    assert_eq!(containers(&server_id), runs);
    assert_eq!(journal(&third), ["r1.json", "r2.json"]);
    assert_eq!(allocated(&third), 2);
    third.signal(libc::SIGTERM);
    third.wait_exit(WAIT).expect("the server exits on SIGTERM");
    assert_eq!(containers(&server_id), Vec::<String>::new());
}

#[test]
fn docker_a_pooled_sandbox_that_died_is_replaced() {
    if !docker_ready() {
        return;
    }
    let agent = static_agent();
    let dir = TempDir::new("pools-died");
    let envs = environments(&dir, docker_preset(1));
    let mut server = Server::start(&args(&agent, &envs, &[]));
    let server_id = stats(&server)["server_id"].as_str().unwrap().to_string();
    wait_idle(&server, "dk", 1);
    let victim = containers(&server_id).pop().unwrap();
    let removed = Command::new("docker")
        .args(["rm", "--force", &victim])
        .output()
        .unwrap();
    assert!(removed.status.success(), "{removed:?}");
    let replaced = wait_for(WAIT, "the dead pooled sandbox replaced", || {
        let pool = pool(&server, "dk");
        let live = containers(&server_id);
        (pool["died"] == 1 && pool["idle"] == 1 && live.len() == 1 && live[0] != victim)
            .then_some(live)
    });
    start(&server, json!({"run_id": "r", "container_name": "dk"}));
    assert_eq!(container_of(&server, "r"), replaced[0]);
    assert_eq!(server.exec("r", "echo alive")["output"], "alive\n");
    server.signal(libc::SIGTERM);
    server.wait_exit(WAIT).expect("the server exits on SIGTERM");
    assert_eq!(containers(&server_id), Vec::<String>::new());
}

#[test]
fn bwrap_a_rootfs_preset_is_pooled() {
    let ready = std::path::Path::new(ROOTFS).is_dir()
        && Command::new("bwrap")
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success());
    if !support::require(
        ready,
        "bwrap and the test rootfs: run `sudo bash .ci/testbed.sh`",
    ) {
        return;
    }
    let agent = static_agent();
    let dir = TempDir::new("pools-bwrap");
    let envs = environments(
        &dir,
        json!({"wrap": {"container_type": "bwrap", "image": ROOTFS, "pool": {"size": 1}}}),
    );
    let mut server = Server::start(&args(&agent, &envs, &[]));
    wait_idle(&server, "wrap", 1);
    start(&server, json!({"run_id": "b1", "container_name": "wrap"}));
    assert_eq!(pool(&server, "wrap")["taken"], 1);
    assert_eq!(server.exec("b1", "echo in-bwrap")["output"], "in-bwrap\n");
    wait_idle(&server, "wrap", 1);
    server.signal(libc::SIGTERM);
    server.wait_exit(WAIT).expect("the server exits on SIGTERM");
    let left = std::fs::read_dir(server.state_dir.join("instances"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "instance directories left after shutdown");
}

/// Apptainer and enroot pools, through the stand-ins of `tests/standin/` (neither tool can be
/// installed here; see `tests/standins.rs`).
#[test]
fn apptainer_and_enroot_stand_ins_are_pooled() {
    const BASH_IMAGE: &str = "arservice-test/bash:latest";
    const STANDINS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/standin");
    let ready = Command::new("bwrap")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
        && Command::new("docker")
            .args(["image", "inspect", BASH_IMAGE])
            .output()
            .is_ok_and(|out| out.status.success());
    if !support::require(
        ready,
        "the stand-ins need bwrap and docker with the test image: run `sudo bash .ci/testbed.sh`",
    ) {
        return;
    }
    let agent = static_agent();
    let dir = TempDir::new("pools-standins");
    let standin_state = TempDir::new("pools-standin-state");
    let envs = environments(
        &dir,
        json!({
            "app": {"container_type": "apptainer", "image": BASH_IMAGE,
                    "executable": format!("{STANDINS}/apptainer"), "pool": {"size": 1}},
            "enr": {"container_type": "enroot", "image": BASH_IMAGE,
                    "executable": format!("{STANDINS}/enroot"), "pool": {"size": 1}},
        }),
    );
    let path = format!("{STANDINS}:{}", std::env::var("PATH").unwrap_or_default());
    let mut server = Server::start_with(support::Options {
        args: args(&agent, &envs, &[]),
        env: vec![
            ("STANDIN_STATE", standin_state.path().to_str().unwrap()),
            ("PATH", &path),
        ],
    });
    for preset in ["app", "enr"] {
        wait_idle(&server, preset, 1);
        let run_id = format!("{preset}-run");
        start(&server, json!({"run_id": run_id, "container_name": preset}));
        assert_eq!(pool(&server, preset)["taken"], 1);
        assert_eq!(server.exec(&run_id, "echo pooled")["output"], "pooled\n");
        let (status, body) = server.post("/close_instance", &json!({"run_id": run_id}));
        assert_eq!(status, 200, "{body}");
        wait_idle(&server, preset, 1);
    }
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(WAIT).expect("the server exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_eq!(journal(&server), Vec::<String>::new());
}

/// Slurm: the test bed's one-node Slurm, with its scheduler for real.
fn slurm_ready() -> bool {
    support::require(
        support::flavor::slurm_usable(),
        "Slurm pools need a running Slurm with a usable node: run `sudo bash .ci/testbed.sh`",
    )
}

/// A `--runner slurm` server with the presets `envs` and room for `jobs` jobs.
fn slurm_pool_server(envs: &str, jobs: u64, state_dir: Option<&str>) -> Server {
    let max = format!(r#"{{"jobs": {jobs}}}"#);
    let mut args = vec![
        "--runner",
        "slurm",
        "--environments",
        envs,
        "--max-resources",
        &max,
        "--health-interval",
        "0.5",
    ];
    if let Some(state_dir) = state_dir {
        args.extend(["--state-dir", state_dir]);
    }
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    Server::start_with(support::Options {
        args: args.iter().map(String::as_str).collect(),
        env: vec![],
    })
}

/// `job id -> job name` of every job of `server_id` in the queue.
fn slurm_jobs(server_id: &str) -> std::collections::BTreeMap<String, String> {
    let out = Command::new("squeue")
        .args(["--me", "--noheader", "--format=%i|%j"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let prefix = format!("ars-{server_id}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_once('|'))
        .filter(|(_, name)| name.trim().starts_with(&prefix))
        .map(|(id, name)| (id.trim().to_string(), name.trim().to_string()))
        .collect()
}

/// The ids of `server_id`'s pooled jobs (named `ars-<server_id>-_pool-<hex>`) not taken by
/// one of `runs`, whose job ids `/stats` shows.
fn pooled_jobs(server: &Server, server_id: &str) -> Vec<String> {
    let stats = stats(server);
    let taken: Vec<&str> = stats["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|row| row["job_id"].as_str())
        .collect();
    slurm_jobs(server_id)
        .into_iter()
        .filter(|(id, name)| name.contains("-_pool-") && !taken.contains(&id.as_str()))
        .map(|(id, _)| id)
        .collect()
}

/// Waits until the pool of `preset` holds `idle` idle jobs, none starting, and returns
/// their ids (as squeue shows them).
fn wait_pooled_jobs(server: &Server, server_id: &str, preset: &str, idle: u64) -> Vec<String> {
    wait_idle(server, preset, idle);
    wait_for(WAIT, &format!("{idle} pooled job(s) in the queue"), || {
        let jobs = pooled_jobs(server, server_id);
        (jobs.len() as u64 == idle).then_some(jobs)
    })
}

#[test]
fn slurm_a_pooled_start_takes_a_running_job_and_the_pool_refills() {
    if !slurm_ready() {
        return;
    }
    let dir = TempDir::new("pools-slurm");
    let envs = environments(
        &dir,
        json!({"sl": {"container_type": "local", "pool": {"size": 1}}}),
    );
    let mut server = slurm_pool_server(&envs, 2, None);
    let server_id = stats(&server)["server_id"].as_str().unwrap().to_string();
    let close_all = CloseAll(&server);
    let pooled = wait_pooled_jobs(&server, &server_id, "sl", 1);
    let in_pool = pool(&server, "sl");
    assert_eq!(in_pool["resources"]["jobs"], 1, "{in_pool}");
    assert_eq!(stats(&server)["allocated_resources"]["jobs"], 1);

    // The take: the job already runs the job's server with its environment up; nothing is
    // submitted, the run gets that very job.
    let began = Instant::now();
    start(
        &server,
        json!({"run_id": "r1", "container_name": "sl", "ttl": 600}),
    );
    let took = began.elapsed();
    assert_eq!(server.job_of("r1"), pooled[0], "the run got the pooled job");
    assert_eq!(pool(&server, "sl")["taken"], 1);
    let result = server.exec("r1", "echo $SLURM_JOB_ID");
    assert_eq!(result["output"], format!("{}\n", pooled[0]), "{result}");
    eprintln!("slurm pool: a take answered in {took:?}");
    assert!(took < Duration::from_millis(500), "a take took {took:?}");

    // Refilled with a new job; the ledger holds both.
    let refill = wait_pooled_jobs(&server, &server_id, "sl", 1);
    assert_ne!(refill, pooled);
    assert_eq!(stats(&server)["allocated_resources"]["jobs"], 2);

    // A cold request needs the room the pooled job holds: it gets it, the job is cancelled.
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "cold", "container_name": "local",
                "environment_config": {"container_type": "local", "env": {"A": "cold"}}}),
    );
    assert_eq!(status, 200, "{body}");
    let after = pool(&server, "sl");
    assert_eq!(after["evicted"], 1, "{after}");
    assert!(
        !slurm_jobs(&server_id).contains_key(&refill[0]),
        "the evicted pooled job is still queued"
    );
    assert_eq!(server.exec("cold", "echo $A")["output"], "cold\n");
    assert_eq!(stats(&server)["allocated_resources"]["jobs"], 2);
    let (status, body) = server.post("/close_instance", &json!({"run_id": "cold"}));
    assert_eq!(status, 200, "{body}");

    // A pooled job cancelled behind the server's back is found dead and replaced.
    let victim = wait_pooled_jobs(&server, &server_id, "sl", 1);
    let cancelled = Command::new("scancel").arg(&victim[0]).output().unwrap();
    assert!(cancelled.status.success(), "{cancelled:?}");
    let replaced = wait_for(WAIT, "the cancelled pooled job replaced", || {
        let jobs = pooled_jobs(&server, &server_id);
        let pool = pool(&server, "sl");
        (pool["died"] == 1 && pool["idle"] == 1 && jobs.len() == 1 && jobs[0] != victim[0])
            .then_some(jobs)
    });
    start(&server, json!({"run_id": "r2", "container_name": "sl"}));
    assert_eq!(server.job_of("r2"), replaced[0]);
    assert_eq!(server.exec("r2", "echo alive")["output"], "alive\n");

    // A run on a pooled job is closed for good: its job leaves the queue, never back in the
    // pool.
    let (status, body) = server.post("/close_instance", &json!({"run_id": "r1"}));
    assert_eq!(status, 200, "{body}");
    wait_for(WAIT, "r1's job to leave the queue", || {
        (!slurm_jobs(&server_id).contains_key(&pooled[0])).then_some(())
    });

    // SIGTERM: every run and every pooled job cancelled, no record left.
    wait_pooled_jobs(&server, &server_id, "sl", 1);
    drop(close_all);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(WAIT).expect("the server exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_eq!(slurm_jobs(&server_id), Default::default());
    assert_eq!(journal(&server), Vec::<String>::new());
}

#[test]
fn slurm_after_sigkill_pooled_jobs_are_adopted_or_cancelled() {
    if !slurm_ready() {
        return;
    }
    let dir = TempDir::new("pools-slurm-crash");
    let envs = environments(
        &dir,
        json!({"sl": {"container_type": "local", "pool": {"size": 1}}}),
    );
    let mut first = slurm_pool_server(&envs, 3, None);
    let state_dir = first.state_dir.to_str().unwrap().to_string();
    let server_id = stats(&first)["server_id"].as_str().unwrap().to_string();
    let taken = wait_pooled_jobs(&first, &server_id, "sl", 1);
    start(&first, json!({"run_id": "r1", "container_name": "sl"}));
    assert_eq!(first.exec("r1", "echo kept > f; echo ok")["output"], "ok\n");
    let idle = wait_pooled_jobs(&first, &server_id, "sl", 1);
    let before = slurm_jobs(&server_id);
    assert_eq!(before.len(), 2, "{before:?}");
    first.signal(libc::SIGKILL);
    first.wait_exit(WAIT).expect("killed");
    assert_eq!(slurm_jobs(&server_id), before, "the jobs outlive a crash");

    // Same presets: the run and the idle pooled job are taken back, nothing submitted.
    let mut second = slurm_pool_server(&envs, 3, Some(&state_dir));
    assert_eq!(stats(&second)["instances_adopted"], 1);
    assert_eq!(second.job_of("r1"), taken[0]);
    assert_eq!(second.exec("r1", "cat f")["output"], "kept\n");
    let adopted = wait_pooled_jobs(&second, &server_id, "sl", 1);
    assert_eq!(adopted, idle, "the idle pooled job is back in its pool");
    assert_eq!(slurm_jobs(&server_id), before, "nothing submitted");
    assert_eq!(stats(&second)["allocated_resources"]["jobs"], 2);
    // The adopted pooled job serves a take.
    start(&second, json!({"run_id": "r2", "container_name": "sl"}));
    assert_eq!(second.job_of("r2"), idle[0]);
    assert_eq!(second.exec("r2", "echo two")["output"], "two\n");
    wait_pooled_jobs(&second, &server_id, "sl", 1);
    second.signal(libc::SIGKILL);
    second.wait_exit(WAIT).expect("killed");

    // The preset lost its pool: its idle job is cancelled, the runs stay.
    let plain = environments(&dir, json!({"sl": {"container_type": "local"}}));
    let mut third = slurm_pool_server(&plain, 3, Some(&state_dir));
    assert_eq!(stats(&third)["instances_adopted"], 2);
    let mut runs = vec![third.job_of("r1"), third.job_of("r2")];
    runs.sort();
    let left: Vec<String> = wait_for(WAIT, "the unpooled job to leave the queue", || {
        let jobs: Vec<String> = slurm_jobs(&server_id).into_keys().collect();
        (jobs.len() == 2).then_some(jobs)
    });
    assert_eq!(left, runs);
    assert_eq!(journal(&third), ["r1.json", "r2.json"]);
    third.signal(libc::SIGTERM);
    third.wait_exit(WAIT).expect("the server exits on SIGTERM");
    assert_eq!(slurm_jobs(&server_id), Default::default());
}

/// The CLI path (`exec_mode: "cli"`): a pooled job holds its allocation with its hold guard
/// up; the run that takes it runs its commands as `srun` steps in that job.
#[test]
fn slurm_cli_path_jobs_are_pooled() {
    if !slurm_ready() {
        return;
    }
    let dir = TempDir::new("pools-slurm-cli");
    let envs = environments(
        &dir,
        json!({"st": {"container_type": "local", "exec_mode": "cli", "pool": {"size": 1}}}),
    );
    let mut server = slurm_pool_server(&envs, 2, None);
    let server_id = stats(&server)["server_id"].as_str().unwrap().to_string();
    let pooled = wait_pooled_jobs(&server, &server_id, "st", 1);
    start(&server, json!({"run_id": "c1", "container_name": "st"}));
    assert_eq!(server.job_of("c1"), pooled[0]);
    let (_, row) = server.get("/stats?run_id=c1");
    assert_eq!(row["instances"][0]["exec_mode"], "cli", "{row}");
    let result = server.exec("c1", "echo $SLURM_JOB_ID; echo $SLURM_STEP_ID");
    let output = result["output"].as_str().unwrap().to_string();
    assert!(
        output.starts_with(&format!("{}\n", pooled[0])) && output.lines().count() == 2,
        "a step of the pooled job: {result}"
    );
    wait_pooled_jobs(&server, &server_id, "st", 1);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(WAIT).expect("the server exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_eq!(slurm_jobs(&server_id), Default::default());
}

/// The `_pool-*` instance directories of `server` (a local pooled sandbox is one).
fn pool_dirs(server: &Server) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(server.state_dir.join("instances"))
        .map(|entries| {
            entries
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("_pool-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A take whose journal write fails: the start answers 500 naming the journal and the state
/// dir, the taken sandbox is closed (not leaked, its room released) and never given again,
/// refills back off while the journal stays broken, and the pool serves again once it heals;
/// the closed sandbox's record, which the broken journal could not remove, is removed then,
/// and a restart after a crash brings back the runs and idle sandboxes, never the refused run
/// nor the closed sandbox.
#[test]
fn local_a_take_the_journal_cannot_record_is_refused_and_its_sandbox_closed() {
    let dir = TempDir::new("pools-journal");
    let envs = environments(
        &dir,
        json!({"py": {"container_type": "local", "pool": {"size": 2}}}),
    );
    let server = Server::start(&[
        "--environments",
        &envs,
        "--max-resources",
        r#"{"instances": 4}"#,
        "--health-interval",
        "0.5",
    ]);
    let _close_all = CloseAll(&server);
    wait_idle(&server, "py", 2);
    let members = pool_dirs(&server);
    assert_eq!(members.len(), 2, "{members:?}");

    // The journal directory replaced by a file: every write fails (root ignores modes).
    let journal_dir = server.state_dir.join("journal");
    let parked = server.state_dir.join("journal.parked");
    std::fs::rename(&journal_dir, &parked).unwrap();
    std::fs::write(&journal_dir, b"not a directory").unwrap();

    let (status, answer) = server.post(
        "/start_instance",
        &json!({"run_id": "r1", "container_name": "py"}),
    );
    assert_eq!(status, 500, "{answer}");
    let detail = answer["detail"].as_str().unwrap();
    assert!(
        detail.contains("cannot write the journal record of r1")
            && detail.contains(server.state_dir.to_str().unwrap()),
        "the answer says what failed and where: {detail}"
    );
    let (_, listed) = server.get("/stats?run_id=r1");
    assert_eq!(listed["instances"], json!([]), "{listed}");
    assert_eq!(pool(&server, "py")["taken"], 1);
    // The taken sandbox is closed; refills cannot be journaled either, so they close what
    // they start and back off: one idle member is left, and the ledger holds just it.
    let left = wait_for(WAIT, "the taken sandbox closed", || {
        let dirs = pool_dirs(&server);
        let pool = pool(&server, "py");
        (dirs.len() == 1 && pool["idle"] == 1 && pool["starting"] == 0 && allocated(&server) == 1)
            .then_some(dirs)
    });
    assert!(members.contains(&left[0]), "{left:?} of {members:?}");
    let closed = members.iter().find(|name| **name != left[0]).unwrap();
    wait_for(WAIT, "a refill that could not be journaled", || {
        (pool(&server, "py")["failed"].as_u64().unwrap() >= 1).then_some(())
    });
    let failed = pool(&server, "py")["failed"].as_u64().unwrap();
    assert!(failed <= 3, "refills back off, not a tight loop: {failed}");

    // Healed: the pool refills, and the sandbox closed for r1 is never given out.
    std::fs::remove_file(&journal_dir).unwrap();
    std::fs::rename(&parked, &journal_dir).unwrap();
    wait_idle(&server, "py", 2);
    for run_id in ["r2", "r3"] {
        start(&server, json!({"run_id": run_id, "container_name": "py"}));
        let cwd = server.exec(run_id, "pwd")["output"].clone();
        assert!(
            !cwd.as_str().unwrap().contains(closed.as_str()),
            "{closed} was given again: {cwd}"
        );
    }
    assert!(journal(&server).contains(&"r2.json".to_string()));
    // The closed sandbox's record, which the broken journal kept, is forgotten once it heals
    // (a restart would otherwise try to adopt it).
    let closed_record = format!("{closed}.json");
    wait_for(WAIT, "the closed sandbox's record forgotten", || {
        (!journal(&server).contains(&closed_record)).then_some(())
    });
    assert!(!journal(&server).contains(&"r1.json".to_string()));

    // A restart after all that: r2 and r3 and the idle members come back as they were; r1
    // and the sandbox closed for it do not, and nothing else is left.
    wait_idle(&server, "py", 2);
    let dirs = pool_dirs(&server);
    assert_eq!(dirs.len(), 4, "{dirs:?}");
    let state_dir = server.state_dir.to_str().unwrap().to_string();
    // Killed as a crash would end it, with its instances in place (not closed on drop).
    std::mem::forget(_close_all);
    let mut server = server;
    server.signal(libc::SIGKILL);
    server.wait_exit(WAIT).expect("killed");
    let second = Server::start(&[
        "--environments",
        &envs,
        "--max-resources",
        r#"{"instances": 4}"#,
        "--health-interval",
        "0.5",
        "--state-dir",
        &state_dir,
    ]);
    let _close_all = CloseAll(&second);
    let stats = stats(&second);
    assert_eq!(stats["instances_adopted"], 2, "{stats}");
    let mut runs: Vec<&str> = stats["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["run_id"].as_str().unwrap())
        .collect();
    runs.sort();
    assert_eq!(runs, ["r2", "r3"], "{stats}");
    let (status, answer) = second.post("/execute_command", &json!({"run_id": "r1", "cmd": "true"}));
    assert_eq!(status, 404, "r1 is no instance: {answer}");
    assert_eq!(wait_idle(&second, "py", 2)["taken"], 0);
    assert_eq!(pool_dirs(&second), dirs, "nothing started, nothing left");
    assert!(!dirs.contains(closed), "{closed} is gone: {dirs:?}");
    assert!(
        !second.log().contains(&format!("not adopting {closed}")),
        "no record of {closed} was left to adopt:\n{}",
        second.log()
    );
    assert_eq!(allocated(&second), 4);
}

#[test]
fn podman_a_pooled_start_takes_a_ready_container_and_a_removed_one_is_replaced() {
    let ready = Command::new("podman")
        .args(["image", "exists", IMAGE])
        .status()
        .is_ok_and(|status| status.success());
    if !support::require(
        ready,
        "podman with the test image in its store: run `sudo bash .ci/testbed.sh`",
    ) {
        return;
    }
    let agent = static_agent();
    let dir = TempDir::new("pools-podman");
    let envs = environments(
        &dir,
        json!({"pd": {"container_type": "podman", "image": IMAGE, "pool": {"size": 1}}}),
    );
    let mut server = Server::start(&args(&agent, &envs, &[]));
    let server_id = stats(&server)["server_id"].as_str().unwrap().to_string();
    let close_all = CloseAll(&server);
    wait_idle(&server, "pd", 1);
    let pooled = containers_of("podman", &server_id);
    assert_eq!(pooled.len(), 1, "{pooled:?}");
    assert!(pooled[0].starts_with(&format!("ars-{server_id}-_pool-")));

    let began = Instant::now();
    start(&server, json!({"run_id": "p1", "container_name": "pd"}));
    let took = began.elapsed();
    assert_eq!(container_of(&server, "p1"), pooled[0]);
    assert!(took < Duration::from_secs(2), "a take took {took:?}");
    assert_eq!(server.exec("p1", "echo in-podman")["output"], "in-podman\n");
    assert_eq!(pool(&server, "pd")["taken"], 1);

    // Refilled; the refill removed behind the server's back is found dead and replaced.
    wait_idle(&server, "pd", 1);
    let victim: Vec<String> = containers_of("podman", &server_id)
        .into_iter()
        .filter(|name| *name != pooled[0])
        .collect();
    assert_eq!(victim.len(), 1, "{victim:?}");
    let removed = Command::new("podman")
        .args(["rm", "--force", "--time", "0", &victim[0]])
        .output()
        .unwrap();
    assert!(removed.status.success(), "{removed:?}");
    wait_for(WAIT, "the removed pooled container replaced", || {
        let pool = pool(&server, "pd");
        let live = containers_of("podman", &server_id);
        (pool["died"] == 1 && pool["idle"] == 1 && live.len() == 2 && !live.contains(&victim[0]))
            .then_some(())
    });

    // Closed after use, the container is gone; SIGTERM leaves nothing.
    let (status, body) = server.post("/close_instance", &json!({"run_id": "p1"}));
    assert_eq!(status, 200, "{body}");
    wait_for(WAIT, "p1's container removed", || {
        (!containers_of("podman", &server_id).contains(&pooled[0])).then_some(())
    });
    drop(close_all);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(WAIT).expect("the server exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert_eq!(containers_of("podman", &server_id), Vec::<String>::new());
    assert_eq!(journal(&server), Vec::<String>::new());
}

/// A pooled Slurm job still pending at SIGTERM (held back by `--begin`, as a full partition
/// would keep it) is cancelled at once rather than waited for (up to 120 s): the server exits
/// within seconds, cleanly, and the queue holds none of its jobs.
#[test]
fn slurm_a_pooled_job_still_pending_at_shutdown_is_cancelled_at_once() {
    if !slurm_ready() {
        return;
    }
    let dir = TempDir::new("pools-pending");
    let envs = environments(
        &dir,
        json!({"later": {"container_type": "local", "pool": {"size": 1},
                          "slurm": {"sbatch_args": ["--begin=now+3600"]}}}),
    );
    let mut server = slurm_pool_server(&envs, 2, None);
    let server_id = stats(&server)["server_id"].as_str().unwrap().to_string();
    let job = wait_for(WAIT, "the pooled job in the queue", || {
        let jobs = slurm_jobs(&server_id);
        (jobs.len() == 1).then(|| jobs.into_keys().next().unwrap())
    });
    assert_eq!(queue_state(&job), "PENDING");
    assert_eq!(pool(&server, "later")["starting"], 1);

    let began = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(Duration::from_secs(60))
        .expect("the server exits on SIGTERM");
    let took = began.elapsed();
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(
        took < Duration::from_secs(10),
        "the server took {took:?} to exit\n{}",
        server.log()
    );
    assert_eq!(
        slurm_jobs(&server_id),
        Default::default(),
        "{}",
        server.log()
    );
    assert!(
        server
            .log()
            .contains(&format!("cancelled 1 job(s) still starting: {job}")),
        "{}",
        server.log()
    );
}
