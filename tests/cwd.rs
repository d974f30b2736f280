//! A bad `cwd` on every environment and exec path. A malformed one (that a CLI could read as
//! an option, `--privileged`; empty; control characters) is 400 everywhere, at start and per
//! command, before anything runs. One that does not exist or is a file is 400 on `local` and
//! on every agent path (the agent checks it); on the CLI paths the tool refuses to enter it
//! and its words come back as the command's output with a non-zero return code: the command
//! never runs (on the Slurm CLI path, where `srun --chdir` falls back to `/tmp`, the step's
//! guard refuses to run it there). The instance keeps working.

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
    let checked = (flavor.agent || flavor.config["container_type"] == "local")
        && flavor.name != "slurm (cli)";
    for cwd in ["/nonexistent/dir", "no-such-subdir", "/etc/passwd"] {
        let (status, body) = server.post(
            "/execute_command",
            &json!({"run_id": "ok", "cmd": "echo ran; pwd", "cwd": cwd}),
        );
        if checked {
            assert_eq!(status, 400, "{}: cwd {cwd}: {body}", flavor.name);
            assert!(
                body["detail"]
                    .as_str()
                    .unwrap()
                    .contains("is not a directory"),
                "{}: cwd {cwd}: {body}",
                flavor.name
            );
        } else {
            assert_eq!(status, 200, "{}: cwd {cwd}: {body}", flavor.name);
            assert_ne!(body["result"]["returncode"], 0, "{}: {body}", flavor.name);
            assert!(
                !body["result"]["output"].as_str().unwrap().contains("ran\n"),
                "{}: the command ran: {body}",
                flavor.name
            );
        }
    }
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
