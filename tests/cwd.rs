//! A bad `cwd` on every environment and exec path is 400, and changes nothing. A malformed
//! one (that a CLI could read as an option, `--privileged`; empty; control characters) is
//! refused at start and per command before anything runs. One that does not exist or is a
//! file is refused before the command runs, in the same words everywhere (`cwd '<path>' is
//! not a directory in the sandbox`): the local environment and the agent check it; on the
//! CLI paths the command's shell enters it and exits with the marker the server maps to
//! that error (`env::exec::ENTER_CWD`); on the Slurm CLI path, where `srun --chdir` falls
//! back to `/tmp`, the step's guard does. A good one is entered, with the environment the
//! command sees without one, and the instance keeps working.

mod support;

use serde_json::json;
use support::flavor::Flavor;
use support::Server;

/// What a bad `cwd` gets, at start and per command, on `flavor`.
fn bad_cwd_is_400(flavor: Flavor) {
    if !flavor.available() {
        return;
    }
    let server = flavor.server(&[], Vec::new());
    let _close = support::CloseAll(&server);
    let mut config = flavor.config.clone();
    config["cwd"] = json!("--privileged");
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "bad", "container_name": flavor.container_name,
                "environment_config": config}),
    );
    assert_eq!(
        status, 400,
        "{}: start with cwd --privileged: {body}",
        flavor.name
    );
    assert!(
        body["detail"].as_str().unwrap().contains("--privileged"),
        "{}: {body}",
        flavor.name
    );
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["total_instances"], 0, "{}: {stats}", flavor.name);

    flavor.start(&server, "ok", json!({}));
    for cwd in ["--privileged", "-", "", "a\nb"] {
        let (status, body) = server.post(
            "/execute_command",
            &json!({"run_id": "ok", "cmd": "echo ran; pwd", "cwd": cwd}),
        );
        assert_eq!(status, 400, "{}: cwd {cwd:?}: {body}", flavor.name);
        assert_eq!(body["status"], "error", "{}: {body}", flavor.name);
        assert!(
            body["detail"].as_str().unwrap().contains("cwd"),
            "{}: cwd {cwd:?}: {body}",
            flavor.name
        );
    }
    // One that does not exist, or is a file, is refused before the command runs (the
    // command would leave a file behind), in the same words on every path.
    let scratch = format!(
        "/tmp/ars-cwd-{}-{}",
        std::process::id(),
        flavor
            .name
            .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
    );
    let ran = format!("{scratch}.ran");
    for cwd in ["/nonexistent/dir", "no-such-subdir", "/etc/passwd"] {
        let (status, body) = server.post(
            "/execute_command",
            &json!({"run_id": "ok", "cmd": format!("touch {ran}; echo ran; pwd"), "cwd": cwd}),
        );
        assert_eq!(status, 400, "{}: cwd {cwd}: {body}", flavor.name);
        assert_eq!(body["status"], "error", "{}: {body}", flavor.name);
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.starts_with("execute in 'ok' failed: cwd '")
                && detail.ends_with("' is not a directory in the sandbox")
                && detail.contains(cwd),
            "{}: cwd {cwd}: {body}",
            flavor.name
        );
    }
    let result = server.exec("ok", &format!("test -e {ran} && echo ran || echo absent"));
    assert_eq!(result["output"], "absent\n", "{}: {result}", flavor.name);

    // A good one is entered, and the command sees the environment it sees without one.
    let result = server.exec("ok", &format!("mkdir -p {scratch}/sub && echo made"));
    assert_eq!(result["output"], "made\n", "{}: {result}", flavor.name);
    let without = server.exec("ok", "echo \"${OLDPWD-unset}\"");
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "ok", "cmd": "pwd; echo \"${OLDPWD-unset}\"",
                "cwd": format!("{scratch}/sub")}),
    );
    assert_eq!(status, 200, "{}: {body}", flavor.name);
    assert_eq!(
        body["result"]["output"],
        format!("{scratch}/sub\n{}", without["output"].as_str().unwrap()),
        "{}: {body}",
        flavor.name
    );
    let result = server.exec("ok", &format!("rm -r {scratch} && echo gone"));
    assert_eq!(result["output"], "gone\n", "{}: {result}", flavor.name);
    let result = server.exec("ok", "echo still here");
    assert_eq!(result["output"], "still here\n", "{}", flavor.name);
    let (status, body) = server.post("/close_instance", &json!({"run_id": "ok"}));
    assert_eq!(status, 200, "{}: close: {body}", flavor.name);
}

/// A malformed `cwd` is refused before the `run_id` is looked up: a malformed request is 400
/// whatever it names.
#[test]
fn a_cwd_that_looks_like_an_option_is_400_before_any_lookup() {
    let server = Server::start(&[]);
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "never-started", "cmd": "true", "cwd": "--privileged"}),
    );
    assert_eq!(status, 400, "{body}");
}

macro_rules! flavors {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { bad_cwd_is_400(Flavor::$name()) })*
    };
}

flavors!(
    local,
    docker_busybox,
    docker_agent_busybox,
    podman_busybox,
    podman_agent_busybox,
    bwrap_host,
    bwrap_agent_host,
    bwrap_rootfs,
    bwrap_agent_rootfs,
    apptainer_tmpfs,
    apptainer_agent,
    enroot,
    enroot_agent,
    slurm_agent,
    slurm_cli,
);
