//! `POST /fork_instance` through the real binary, over every environment that forks (docker
//! and podman, bubblewrap over a rootfs and over the host, `local`, the apptainer and enroot
//! stand-ins, in a job of the test bed's Slurm `local` on both exec paths and docker, podman and
//! the enroot stand-in through the job's server): a file written in the source is in the fork;
//! what either writes afterwards the other does not see; a fork of a fork works; closing the
//! source leaves the fork usable; closing everything leaves nothing (containers, fork images,
//! directories, mounts, processes, jobs). Then the refusals (unknown source, taken or invalid `new_run_id`, no room,
//! an environment that cannot fork), a fork that fails midway or whose copy times out
//! (`--fork-timeout`; nothing left), a `--fork-seed` that cannot be taken, and a docker
//! fork adopted after a crash, its image removed when it goes, stray fork images swept at
//! start-up and by the health round, and a docker fork's job server killed by SIGKILL (its
//! job's sweep removes its container and image).

mod support;

use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use support::flavor::{self, Flavor, Need, Runner};
use support::{queue_state, wait_for, CloseAll, Options, Server, TempDir};

fn fork(server: &Server, src: &str, dst: &str) -> (u16, Value) {
    server.post("/fork_instance", &json!({"run_id": src, "new_run_id": dst}))
}

fn output(server: &Server, run_id: &str, cmd: &str) -> String {
    server.exec(run_id, cmd)["output"]
        .as_str()
        .unwrap()
        .to_string()
}

fn server_id(server: &Server) -> String {
    server.get("/stats").1["server_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The fork images of a server that `cli` lists (`ars-fork-<server_id>:<run_id>`).
fn fork_images(cli: &str, server_id: &str) -> Vec<String> {
    support::stdout_lines(Command::new(cli).args([
        "images",
        "--format",
        "{{.Tag}}",
        &format!("ars-fork-{server_id}"),
    ]))
}

/// The server id of the server in the Slurm job of `run_id`, asked with the job's token (in
/// its script, on the state dir).
fn job_server_id(server: &Server, run_id: &str) -> String {
    let (_, stats) = server.get(&format!("/stats?run_id={run_id}"));
    let url = stats["instances"][0]["node_url"]
        .as_str()
        .unwrap()
        .to_string();
    let script = std::fs::read_to_string(
        server
            .state_dir
            .join("instances")
            .join(run_id)
            .join("job.sh"),
    )
    .unwrap();
    let token = script
        .lines()
        .find_map(|line| line.strip_prefix("ARS_TOKEN="))
        .unwrap();
    let mut answer = ureq::get(format!("{url}/stats"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap();
    let stats: Value = serde_json::from_str(&answer.body_mut().read_to_string().unwrap()).unwrap();
    stats["server_id"].as_str().unwrap().to_string()
}

/// What a job's server `job_sid` left in docker and podman: containers named after it, and
/// images of its exports (`ars-fork-<job_sid>-export`) or of its own forks.
fn node_leftovers(job_sid: &str) -> Vec<String> {
    let mut left = Vec::new();
    for cli in ["docker", "podman"] {
        if let Ok(out) = Command::new(cli)
            .args(["ps", "--all", "--format", "{{.Names}}"])
            .output()
        {
            left.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|name| {
                        name.trim_start_matches('/')
                            .starts_with(&format!("ars-{job_sid}-"))
                    })
                    .map(|name| format!("{cli} container {name}")),
            );
        }
        for repository in [format!("{job_sid}-export"), job_sid.to_string()] {
            left.extend(
                fork_images(cli, &repository)
                    .into_iter()
                    .map(|tag| format!("{cli} image ars-fork-{repository}:{tag}")),
            );
        }
    }
    left
}

/// Whether the flavor's sandbox has a root filesystem of its own (a file of the image can
/// be deleted in it, and the deletion forked).
fn own_root(flavor: &Flavor) -> bool {
    flavor.config["container_type"] != "local"
        && !(flavor.config["container_type"] == "bubblewrap" && flavor.container_name == "host")
}

/// The whole story on one flavor.
fn forks_in(flavor: Flavor) {
    if !flavor.available() {
        return;
    }
    let server = flavor.server(&[], vec![]);
    let _close = CloseAll(&server);
    let sid = server_id(&server);
    flavor.start(&server, "src", json!({}));
    // Inside a Slurm job, the servers of the instances' jobs, whose containers, images and
    // rootfs are on the node.
    let on_node = flavor.runner == Runner::Slurm && flavor.config["container_type"] != "local";
    let mut job_servers = Vec::new();
    if on_node {
        job_servers.push(job_server_id(&server, "src"));
    }
    output(
        &server,
        "src",
        "echo one > forked.txt && mkdir -p d/e && echo deep > d/e/f",
    );
    // A file of the image, deleted: the fork must not see it again (a whiteout over a
    // rootfs, a deletion in a committed layer).
    let deleted = if own_root(&flavor) {
        let gone = output(
            &server,
            "src",
            "for f in /etc/shells /etc/issue /etc/os-release /etc/group; do \
             if [ -f $f ] && rm $f 2>/dev/null; then echo $f; break; fi; done",
        );
        assert!(
            !gone.trim().is_empty(),
            "{}: nothing to delete",
            flavor.name
        );
        Some(gone.trim().to_string())
    } else {
        None
    };

    let (status, body) = fork(&server, "src", "dst");
    assert_eq!(status, 200, "{}: {body}", flavor.name);
    assert_eq!(body, json!({"status": "success", "instance_id": "dst"}));
    if on_node {
        job_servers.push(job_server_id(&server, "dst"));
    }
    assert_eq!(
        output(&server, "dst", "cat forked.txt d/e/f"),
        "one\ndeep\n"
    );
    if let Some(deleted) = &deleted {
        assert_eq!(
            output(
                &server,
                "dst",
                &format!("[ -e {deleted} ] && echo there || echo gone")
            ),
            "gone\n",
            "{}: the deletion of {deleted} is forked",
            flavor.name
        );
    }
    // Each its own from now on.
    output(
        &server,
        "dst",
        "echo two > forked.txt && echo dst-only > mine.txt",
    );
    output(&server, "src", "echo src-only > theirs.txt");
    assert_eq!(output(&server, "src", "cat forked.txt"), "one\n");
    assert_eq!(
        output(
            &server,
            "src",
            "[ -e mine.txt ] && echo seen || echo unseen"
        ),
        "unseen\n"
    );
    assert_eq!(
        output(
            &server,
            "dst",
            "[ -e theirs.txt ] && echo seen || echo unseen"
        ),
        "unseen\n"
    );

    // The source closed: the fork keeps working, and forks again (at most two instances at
    // once, as the Slurm flavors' servers allow two jobs).
    let (status, body) = server.post("/close_instance", &json!({"run_id": "src"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(output(&server, "dst", "cat forked.txt"), "two\n");
    let (status, body) = fork(&server, "dst", "dst2");
    assert_eq!(status, 200, "{}: fork of a fork: {body}", flavor.name);
    if on_node {
        job_servers.push(job_server_id(&server, "dst2"));
    }
    assert_eq!(
        output(&server, "dst2", "cat forked.txt mine.txt"),
        "two\ndst-only\n"
    );
    let (status, body) = server.post("/close_instance", &json!({"run_id": "dst"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        output(&server, "dst2", "cat forked.txt d/e/f"),
        "two\ndeep\n"
    );
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["instances"][0]["run_id"], "dst2", "{stats}");
    let (status, body) = server.post("/close_instance", &json!({"run_id": "dst2"}));
    assert_eq!(status, 200, "{body}");

    for run_id in ["src", "dst", "dst2"] {
        let left = flavor.leftovers(&server, run_id);
        assert!(left.is_empty(), "{}: {run_id} left {left:?}", flavor.name);
        assert!(
            !server.state_dir.join("instances").join(run_id).exists(),
            "{}: the directory (and seed) of {run_id} is left",
            flavor.name
        );
    }
    for job_sid in &job_servers {
        let left = node_leftovers(job_sid);
        assert!(
            left.is_empty(),
            "{}: left on the node: {left:?}",
            flavor.name
        );
    }
    match flavor.config["container_type"].as_str() {
        Some(cli @ ("docker" | "podman")) => {
            let images = fork_images(cli, &sid);
            assert!(
                images.is_empty(),
                "{}: fork images left: {images:?}",
                flavor.name
            );
        }
        Some("enroot") => {
            let data = server.state_dir.join("enroot/data");
            let left: Vec<_> = std::fs::read_dir(&data)
                .map(|dir| dir.flatten().map(|entry| entry.file_name()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "enroot containers left: {left:?}");
        }
        _ => {}
    }
    let journal: Vec<_> = std::fs::read_dir(server.state_dir.join("journal"))
        .map(|dir| dir.flatten().map(|entry| entry.file_name()).collect())
        .unwrap_or_default();
    assert!(journal.is_empty(), "journal records left: {journal:?}");
}

#[test]
fn local_forks() {
    forks_in(Flavor::local());
}

#[test]
fn bwrap_host_forks() {
    forks_in(Flavor::bwrap_host());
}

#[test]
fn bwrap_rootfs_forks() {
    forks_in(Flavor::bwrap_rootfs());
}

#[test]
fn bwrap_rootfs_with_the_agent_forks() {
    forks_in(Flavor::bwrap_agent_rootfs());
}

#[test]
fn docker_forks() {
    forks_in(Flavor::docker_busybox());
}

#[test]
fn docker_with_the_agent_forks() {
    forks_in(Flavor::docker_agent_bash());
}

#[test]
fn podman_forks() {
    forks_in(Flavor::podman_busybox());
}

#[test]
fn apptainer_overlay_forks() {
    forks_in(Flavor::apptainer_overlay());
}

#[test]
fn enroot_forks() {
    forks_in(Flavor::enroot());
}

#[test]
fn slurm_forks() {
    forks_in(Flavor::slurm_agent());
}

/// `container_type` `kind` inside a job of the test bed's Slurm, through the job's server.
fn slurm_on_node(name: &'static str, kind: &str, image: &'static str, needs: Vec<Need>) -> Flavor {
    let mut config = json!({"container_type": kind});
    if kind == "enroot" {
        config["executable"] = json!(flavor::STANDIN_ENROOT);
    }
    let mut all = vec![Need::Slurm];
    all.extend(needs);
    Flavor {
        name,
        container_name: image,
        config,
        needs: all,
        runner: Runner::Slurm,
        cwd: None,
        has_ps_inside: kind != "enroot",
        agent: true,
        failing_start: |_| unreachable!(),
    }
}

/// docker (busybox) inside a job of the test bed's Slurm.
fn slurm_docker() -> Flavor {
    slurm_on_node(
        "slurm docker",
        "docker",
        flavor::IMAGE_BUSYBOX,
        vec![Need::Docker(flavor::IMAGE_BUSYBOX)],
    )
}

/// docker inside a job: the source job's server commits and saves the container into the
/// shared state dir, the fork's job's server loads it.
#[test]
fn slurm_docker_forks() {
    forks_in(slurm_docker());
}

/// podman inside a job: as docker, with podman's CLI.
#[test]
fn slurm_podman_forks() {
    forks_in(slurm_on_node(
        "slurm podman",
        "podman",
        flavor::IMAGE_BUSYBOX,
        vec![Need::Podman(flavor::IMAGE_BUSYBOX)],
    ));
}

/// enroot (its stand-in) inside a job: the source job's server copies the container's rootfs
/// into the shared state dir, the fork's job's server moves it where its enroot keeps it.
#[test]
fn slurm_enroot_forks() {
    forks_in(slurm_on_node(
        "slurm enroot",
        "enroot",
        flavor::IMAGE_BASH,
        vec![Need::Bwrap, Need::Docker(flavor::IMAGE_BASH)],
    ));
}

/// The CLI path: the new instance's `work/` is a copy of the source's before its job starts.
#[test]
fn slurm_cli_path_forks() {
    forks_in(Flavor::slurm_cli());
}

/// With `--writable-tmpfs` what the sandbox wrote is in the instance's memory: a plain 400.
#[test]
fn apptainer_tmpfs_cannot_fork() {
    let flavor = Flavor::apptainer_tmpfs();
    if !flavor.available() {
        return;
    }
    let server = flavor.server(&[], vec![]);
    let _close = CloseAll(&server);
    flavor.start(&server, "src", json!({}));
    let (status, body) = fork(&server, "src", "dst");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("cannot be forked"),
        "{body}"
    );
    assert_eq!(body["infra"], false);
    assert!(flavor.leftovers(&server, "dst").is_empty());
}

/// The refusals, each as a start would answer it, with nothing left behind.
#[test]
fn refusals_answer_as_a_start_does() {
    let server = Server::start(&["--max-resources", r#"{"instances": 2}"#]);
    let _close = CloseAll(&server);
    let (status, body) = fork(&server, "nobody", "dst");
    assert_eq!(
        (status, body["infra"].clone()),
        (404, json!(false)),
        "{body}"
    );
    server.start_local("src");
    server.start_local("other");
    // Only a Slurm job's server exports a fork's seed.
    let (status, body) = server.post(
        "/export_instance",
        &json!({"run_id": "src", "new_run_id": "dst"}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("Slurm job"),
        "{body}"
    );
    assert!(!server.state_dir.join("exports").exists());
    for bad in ["../x", "", "a/b", ".hidden", "x y"] {
        let (status, body) = fork(&server, "src", bad);
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains("new_run_id"),
            "{body}"
        );
    }
    let (status, body) = server.post("/fork_instance", &json!({"run_id": "src"}));
    assert_eq!(status, 400, "{body}");
    let (status, body) = server.post(
        "/fork_instance",
        &json!({"run_id": "src", "new_run_id": "d", "environment_config": {}}),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = fork(&server, "src", "other");
    assert_eq!(
        (status, body["infra"].clone()),
        (409, json!(false)),
        "{body}"
    );
    // No room: refused at once, or after `wait`, as a start is.
    let (status, body) = fork(&server, "src", "dst");
    assert_eq!(
        (status, body["infra"].clone()),
        (429, json!(false)),
        "{body}"
    );
    let (status, body) = server.post(
        "/fork_instance",
        &json!({"run_id": "src", "new_run_id": "dst", "wait": 0.3}),
    );
    assert_eq!(status, 429, "{body}");
    // Room made while the fork waits: it goes through.
    let waiting = {
        let url = server.url.clone();
        std::thread::spawn(move || {
            support::request(
                "POST",
                &format!("{url}/fork_instance"),
                Some(
                    json!({"run_id": "src", "new_run_id": "dst", "wait": 30})
                        .to_string()
                        .as_bytes(),
                ),
            )
        })
    };
    wait_for(Duration::from_secs(10), "the fork to wait", || {
        (server.get("/stats").1["waiting_starts"] == 1).then_some(())
    });
    server.post("/close_instance", &json!({"run_id": "other"}));
    let (status, body) = waiting.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.exec("dst", "echo up")["output"], "up\n");
    assert!(!server.state_dir.join("x").exists());
}

/// A fork whose copy is made but whose start fails (the source's `cwd`, a host directory,
/// is gone): the new directory, its ledger hold and any journal record are gone with it.
#[test]
fn a_fork_that_fails_midway_leaves_nothing() {
    let server = Server::start(&["--max-resources", r#"{"instances": 2}"#]);
    let _close = CloseAll(&server);
    let cwd = TempDir::new("fork-cwd");
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "src", "environment_config":
                {"container_type": "local", "cwd": cwd.path()}}),
    );
    assert_eq!(status, 200, "{body}");
    let (_, stats) = server.get("/get_available_resources");
    assert_eq!(stats, json!({"instances": 1}));
    std::fs::remove_dir_all(cwd.path()).unwrap();
    let (status, body) = fork(&server, "src", "dst");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("not a directory"),
        "{body}"
    );
    assert!(!server.state_dir.join("instances/dst").exists());
    assert!(!server.state_dir.join("journal/dst.json").exists());
    let (_, stats) = server.get("/get_available_resources");
    assert_eq!(
        stats,
        json!({"instances": 1}),
        "the fork's hold is released"
    );
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["instances"].as_array().unwrap().len(), 1, "{stats}");
    assert_eq!(
        stats["forks_failed"], 0,
        "the request's own mistake: {stats}"
    );
    // The run_id is free again.
    std::fs::create_dir_all(cwd.path()).unwrap();
    let (status, body) = fork(&server, "src", "dst");
    assert_eq!(status, 200, "{body}");
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["instances_forked"], 1, "{stats}");
}

/// Docker: a commit that fails (the container went away under the server) leaves no image;
/// a fork survives a crash of the server (adopted from the journal, its image removed when it
/// is closed); a fork image no instance runs is swept at start-up.
#[test]
fn docker_fork_failure_crash_and_sweep() {
    let flavor = Flavor::docker_busybox();
    if !flavor.available() {
        return;
    }
    let first = flavor.server(&[], vec![]);
    let sid = server_id(&first);
    flavor.start(&first, "src", json!({}));
    flavor.start(&first, "lost", json!({}));
    let lost = flavor::sandbox_name(&first, "lost");
    Command::new("docker")
        .args(["rm", "-f", &lost])
        .output()
        .unwrap();
    let (status, body) = fork(&first, "lost", "dst");
    assert_eq!(
        (status, body["infra"].clone()),
        (500, json!(true)),
        "{body}"
    );
    assert!(fork_images("docker", &sid).is_empty());
    assert!(!first.state_dir.join("instances/dst").exists());
    assert_eq!(first.get("/stats").1["forks_failed"], 1);

    output(&first, "src", "echo kept > f");
    let (status, body) = fork(&first, "src", "dst");
    assert_eq!(status, 200, "{body}");
    assert_eq!(fork_images("docker", &sid), ["dst"]);
    // The image does not carry the source container's server and run labels (a container
    // run from it by hand would be taken for this server's and swept); the fork's own
    // container has them.
    let label = |what: &str, format: &str| {
        let out = Command::new("docker")
            .args(["inspect", "--format", format, what])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let labels = r#"{{index .Config.Labels "arservice.server"}}|{{index .Config.Labels "arservice.run_id"}}"#;
    assert_eq!(label(&format!("ars-fork-{sid}:dst"), labels), "|");
    assert_eq!(
        label(&flavor::sandbox_name(&first, "dst"), labels),
        format!("{sid}|dst")
    );
    let journal = std::fs::read_to_string(first.state_dir.join("journal/dst.json")).unwrap();
    assert!(
        journal.contains(&format!("ars-fork-{sid}:dst")),
        "{journal}"
    );
    // A stray fork image, as a crash between commit and start leaves.
    let stray = format!("ars-fork-{sid}:stray");
    let tagged = Command::new("docker")
        .args(["tag", &format!("ars-fork-{sid}:dst"), &stray])
        .status()
        .unwrap();
    assert!(tagged.success());
    let mut first = first;
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).expect("killed");

    let state_dir = first.state_dir.to_str().unwrap().to_string();
    let second = Server::start_with(Options {
        args: vec!["--state-dir", &state_dir, "--health-interval", "0.3"],
        env: vec![],
    });
    let _close = CloseAll(&second);
    assert_eq!(
        fork_images("docker", &sid),
        ["dst"],
        "the stray image is swept"
    );
    assert_eq!(output(&second, "dst", "cat f"), "kept\n");
    let (_, sums) = second.get("/runs/dst");
    assert_eq!(
        sums["forked_from"], "src",
        "kept across the adoption: {sums}"
    );
    // A stray image while it runs (a close that could not remove it): the health round's sweep.
    let stray = format!("ars-fork-{sid}:stray2");
    let tagged = Command::new("docker")
        .args(["tag", &format!("ars-fork-{sid}:dst"), &stray])
        .status()
        .unwrap();
    assert!(tagged.success());
    wait_for(Duration::from_secs(20), "the health round's sweep", || {
        (fork_images("docker", &sid) == ["dst"]).then_some(())
    });
    let (status, body) = second.post("/close_instance", &json!({"run_id": "dst"}));
    assert_eq!(status, 200, "{body}");
    assert!(
        fork_images("docker", &sid).is_empty(),
        "closing the fork removes its image"
    );
    for run_id in ["src", "lost"] {
        second.post("/close_instance", &json!({"run_id": run_id}));
    }
}

/// docker inside a job, forks that fail on the way: the source's container removed under its
/// job's server (the export's commit fails), then the source's job cancelled (its server is
/// gone): each answers a JSON error, and leaves no directory, export, image or job of the
/// fork, and its hold released.
#[test]
fn slurm_docker_fork_failures_leave_nothing() {
    let flavor = slurm_docker();
    if !flavor.available() {
        return;
    }
    let server = flavor.server(&[], vec![]);
    let _close = CloseAll(&server);
    // `free_jobs`: what the ledger has free when nothing of the fork's is held.
    let nothing_of_the_fork = |job_sid: &str, free_jobs: u64| {
        assert!(!server.state_dir.join("instances/fdst").exists());
        assert!(!server.state_dir.join("journal/fdst.json").exists());
        let exports = server.state_dir.join("instances/fsrc/node/exports");
        let exported: Vec<_> = std::fs::read_dir(&exports)
            .map(|dir| dir.flatten().map(|entry| entry.file_name()).collect())
            .unwrap_or_default();
        assert!(exported.is_empty(), "exports left: {exported:?}");
        assert!(flavor.leftovers(&server, "fdst").is_empty());
        let images = fork_images("docker", &format!("{job_sid}-export"));
        assert!(images.is_empty(), "export images left: {images:?}");
        let (_, resources) = server.get("/get_available_resources");
        assert_eq!(
            resources,
            json!({ "jobs": free_jobs }),
            "the fork's hold is released"
        );
    };

    flavor.start(&server, "fsrc", json!({}));
    let job_sid = job_server_id(&server, "fsrc");
    let container = format!("ars-{job_sid}-fsrc");
    let removed = Command::new("docker")
        .args(["rm", "--force", &container])
        .output()
        .unwrap();
    assert!(removed.status.success(), "{removed:?}");
    let (status, body) = fork(&server, "fsrc", "fdst");
    assert!(status >= 400, "{status} {body}");
    assert_eq!(body["status"], "error", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("fsrc"), "{body}");
    nothing_of_the_fork(&job_sid, 1);

    // The source's job gone under it: its server no longer answers.
    let job = server.job_of("fsrc");
    let cancelled = Command::new("scancel").arg(&job).output().unwrap();
    assert!(cancelled.status.success(), "{cancelled:?}");
    wait_for(Duration::from_secs(60), "the source's job to end", || {
        queue_state(&job).is_empty().then_some(())
    });
    let (status, body) = fork(&server, "fsrc", "fdst");
    assert!(status >= 400, "{status} {body}");
    assert_eq!(body["status"], "error", "{body}");
    assert!(
        status == 410
            || body["detail"]
                .as_str()
                .unwrap()
                .contains("reaching its server"),
        "{status} {body}"
    );
    // The dead source releases its hold when a health round finds it dead, or at its close:
    // closed first, so that the ledger has one answer (it raced with the round before).
    let (status, body) = server.post("/close_instance", &json!({"run_id": "fsrc"}));
    assert!(status == 200 || status == 410, "{status} {body}");
    nothing_of_the_fork(&job_sid, 2);
}

/// The fork's job's server loads the source's image under its own fork image name
/// (`ars-fork-<its server id>:<run_id>`, the exporter's name dropped); killed by SIGKILL (the
/// OOM killer, a crash), it closes nothing, and the job script's sweep after it removes its
/// container and that image from the node before the job ends.
#[test]
fn slurm_docker_fork_whose_job_server_is_killed_leaves_no_image() {
    let flavor = slurm_docker();
    if !flavor.available() {
        return;
    }
    let server = flavor.server(&[], vec![]);
    let _close = CloseAll(&server);
    flavor.start(&server, "ksrc", json!({}));
    let src_sid = job_server_id(&server, "ksrc");
    output(&server, "ksrc", "echo one > forked.txt");
    let (status, body) = fork(&server, "ksrc", "kdst");
    assert_eq!(status, 200, "{body}");
    assert_eq!(output(&server, "kdst", "cat forked.txt"), "one\n");
    let dst_sid = job_server_id(&server, "kdst");
    assert_eq!(
        fork_images("docker", &dst_sid),
        ["kdst"],
        "under its own name"
    );
    let exported = fork_images("docker", &format!("{src_sid}-export"));
    assert!(
        exported.is_empty(),
        "the exporter's name stays: {exported:?}"
    );
    let job = server.job_of("kdst");
    let pid = server.job_server_pid("kdst");
    // SAFETY: kill(2) of the fork's job's server, which this test's server started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_for(Duration::from_secs(30), "the fork's job to end", || {
        queue_state(&job).is_empty().then_some(())
    });
    let left = node_leftovers(&dst_sid);
    assert!(left.is_empty(), "left on the node: {left:?}");
    // The login server learns of the job's end at its next health round (a command before
    // that answers 500 infra, the job's server unreachable): waited for, as tests/slurm.rs does.
    wait_for(
        Duration::from_secs(20),
        "the fork to be reported dead",
        || {
            let (_, stats) = server.get("/stats?run_id=kdst");
            (stats["instances"][0]["state"] == "dead").then_some(())
        },
    );
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "kdst", "cmd": "true"}),
    );
    assert_eq!(status, 410, "{body}");
    assert_eq!(output(&server, "ksrc", "cat forked.txt"), "one\n");
    for run_id in ["kdst", "ksrc"] {
        let (status, body) = server.post("/close_instance", &json!({"run_id": run_id}));
        assert_eq!(status, 200, "{run_id}: {body}");
    }
    let left = node_leftovers(&src_sid);
    assert!(left.is_empty(), "the source's job left: {left:?}");
}

/// A fork whose copy cannot finish within `--fork-timeout`: a write lease that the test holds
/// on a file of the source makes `cp`'s open of it block (the kernel waits for the holder,
/// up to `/proc/sys/fs/lease-break-time`, 45 s by default). The fork answers 500 with `infra`
/// once the timeout kills the copy, and leaves no instance, no half copy, no journal record,
/// no `cp`, and its room given back; the source keeps working and the `new_run_id` is free.
#[test]
fn a_fork_whose_copy_times_out_leaves_nothing() {
    use std::os::fd::AsRawFd;
    let server = Server::start(&[
        "--max-resources",
        r#"{"instances": 2}"#,
        "--fork-timeout",
        "1",
    ]);
    let _close = CloseAll(&server);
    server.start_local("src");
    output(&server, "src", "echo held > held.txt");
    let (_, resources) = server.get("/get_available_resources");
    assert_eq!(resources, json!({"instances": 1}));

    let held_path = server.state_dir.join("instances/src/work/held.txt");
    let held = std::fs::File::open(&held_path).unwrap();
    // SAFETY: ignoring SIGIO (the lease holder's break notice, whose default action ends the
    // process) changes no memory; the test binary uses SIGIO for nothing else.
    unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
    // SAFETY: an fcntl on a descriptor this function owns and keeps open past its use.
    let leased = unsafe { libc::fcntl(held.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
    assert_eq!(leased, 0, "{}", std::io::Error::last_os_error());

    let began = std::time::Instant::now();
    let (status, body) = fork(&server, "src", "dst");
    let took = began.elapsed();
    assert_eq!(
        (status, body["infra"].clone()),
        (500, json!(true)),
        "{body}\n{}",
        server.log()
    );
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("fork 'src' failed") && detail.contains("timed out after 1 s"),
        "{body}"
    );
    assert!(
        took < Duration::from_secs(20),
        "the fork answered after {took:?}, not at its timeout"
    );
    assert!(
        !server.state_dir.join("instances/dst").exists(),
        "no half copy is left"
    );
    assert!(!server.state_dir.join("journal/dst.json").exists());
    let copies: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| {
            cmdline.contains(&*server.state_dir.join("instances/dst").to_string_lossy())
        })
        .collect();
    assert!(copies.is_empty(), "a copy still runs: {copies:?}");
    let (_, resources) = server.get("/get_available_resources");
    assert_eq!(
        resources,
        json!({"instances": 1}),
        "the fork's room is back"
    );
    let (_, stats) = server.get("/stats");
    let instances = stats["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 1, "{stats}");
    assert_eq!(instances[0]["run_id"], "src", "{stats}");

    // The lease given up: the source reads its file, and the same fork goes through.
    drop(held);
    assert_eq!(output(&server, "src", "cat held.txt"), "held\n");
    let (status, body) = fork(&server, "src", "dst");
    assert_eq!(status, 200, "{body}");
    assert_eq!(output(&server, "dst", "cat held.txt"), "held\n");
}

/// `--fork-seed` (how a Slurm job's server is handed its fork's files) that cannot be taken:
/// on another file system than the state dir (a rename cannot cross it) or with the
/// instance's directory already there, the start answers 500 `infra` and leaves no instance,
/// directory, journal record or hold, the seed as it was. A start after that takes it, and
/// only the first. (A seed that is not there means no fork: every job's server is given
/// one, and `slurm_forks`' plain starts run with none there.)
#[test]
fn a_fork_seed_that_cannot_be_taken_fails_the_start_and_leaves_nothing() {
    // A seed on /dev/shm (tmpfs) for a state dir under /tmp: the rename fails with EXDEV.
    let shm = std::path::PathBuf::from(format!(
        "/dev/shm/arservice-test-seed-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&shm);
    std::fs::create_dir_all(shm.join("work")).unwrap();
    std::fs::write(shm.join("work/seeded.txt"), "seed\n").unwrap();
    let seed_arg = shm.to_str().unwrap().to_string();
    let server = Server::start(&["--fork-seed", &seed_arg]);
    let _close = CloseAll(&server);
    let (_, before) = server.get("/get_available_resources");
    let start = |server: &Server, run_id: &str| {
        server.post(
            "/start_instance",
            &json!({"run_id": run_id, "environment_config": {"container_type": "local"}}),
        )
    };
    let nothing_of = |server: &Server, run_id: &str| {
        assert!(!server.state_dir.join("instances").join(run_id).exists());
        assert!(!server
            .state_dir
            .join(format!("journal/{run_id}.json"))
            .exists());
        let (_, resources) = server.get("/get_available_resources");
        assert_eq!(resources, before, "the start's hold is released");
        let (_, stats) = server.get("/stats");
        assert_eq!(stats["instances"], json!([]), "{stats}");
        let (status, run) = server.get(&format!("/runs/{run_id}"));
        assert_eq!(
            (status, run["infra_failures"].clone()),
            (200, json!(1)),
            "{run}"
        );
    };
    let (status, body) = start(&server, "r");
    assert_eq!(
        (status, body["infra"].clone()),
        (500, json!(true)),
        "{body}\n{}",
        server.log()
    );
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("cannot take the fork's files from {seed_arg}"))
            && detail.contains("cross-device"),
        "{body}"
    );
    nothing_of(&server, "r");
    assert_eq!(
        std::fs::read_to_string(shm.join("work/seeded.txt")).unwrap(),
        "seed\n",
        "the seed is as it was"
    );
    drop(_close);
    drop(server);
    std::fs::remove_dir_all(&shm).unwrap();

    // A seed on the state dir's file system, an instance directory already there.
    let seed_dir = TempDir::new("seed");
    let seed = seed_dir.path().join("seed");
    std::fs::create_dir_all(seed.join("work")).unwrap();
    std::fs::write(seed.join("work/seeded.txt"), "seed\n").unwrap();
    let seed_arg = seed.to_str().unwrap().to_string();
    let server = Server::start(&["--fork-seed", &seed_arg]);
    let _close = CloseAll(&server);
    let squatter = server.state_dir.join("instances/r");
    std::fs::create_dir_all(&squatter).unwrap();
    std::fs::write(squatter.join("mine"), "x").unwrap();
    let (status, body) = start(&server, "r");
    assert_eq!(
        (status, body["infra"].clone()),
        (500, json!(true)),
        "{body}\n{}",
        server.log()
    );
    assert!(
        body["detail"].as_str().unwrap().contains("already exists"),
        "{body}"
    );
    assert_eq!(std::fs::read_to_string(squatter.join("mine")).unwrap(), "x");
    assert!(!squatter.join("work").exists(), "the seed is not mixed in");
    assert!(seed.join("work/seeded.txt").exists(), "the seed stays");
    std::fs::remove_dir_all(&squatter).unwrap();
    nothing_of(&server, "r");
    // Taken by the next start, and only by it.
    let (status, body) = start(&server, "taker");
    assert_eq!(status, 200, "{body}");
    assert_eq!(output(&server, "taker", "cat seeded.txt"), "seed\n");
    assert!(!seed.exists(), "the seed was renamed into the instance");
    let (status, body) = start(&server, "second");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        output(&server, "second", "ls"),
        "",
        "a second start gets no seed"
    );
}
