//! A real agent client in CI: mini-swe-agent (from PyPI, pinned by `.ci/testbed.sh`) runs its own
//! `DefaultAgent` loop, with its deterministic model replaying a scripted SWE-style task, through
//! the checkout's Python package (`clients/python`, put first on `PYTHONPATH`) against the real
//! server with a token: on `local`, and on docker through the agent (the static binary
//! under test, with no `--agent` flag, as a user runs it).
//!
//! The Python side, `tests/real_client/mini_swe_agent_task.py`, checks every observation the
//! agent gets (heredocs, a failing and a passing test, `git diff` or `diff -u`, 200 KB and
//! over-cap outputs, binary bytes, a timeout, the submission) and the client's errors; this side
//! starts the server, runs the script with the test bed's venv python, and checks its verdict.
//! The script closes its instances; should it fail halfway, the server's shutdown on drop
//! (SIGTERM) closes the rest (`CloseAll` cannot: it has no token).

mod support;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::{Server, TempDir};
use wait_timeout::ChildExt;

/// The test bed's venv (`.ci/testbed.sh`, comp_python), unless `ARSERVICE_TEST_PYTHON` names one.
const VENV_PYTHON: &str = "/var/lib/arservice-testbed/venv/bin/python";
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/real_client/mini_swe_agent_task.py"
);
const CLIENT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python");
/// The server's output cap; the script expects an output above it cut to exactly this.
const CAP: &str = "1048576";
const TOKEN: &str = "real-client-test-token";
const IMAGE_BASH: &str = "arservice-test/bash:latest";
/// Bound on one run of the script (it takes about 10 s; the timeout steps take 7 of them).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// The venv python with mini-swe-agent, or `None` (see [`support::require`]).
fn python() -> Option<String> {
    let python = std::env::var("ARSERVICE_TEST_PYTHON").unwrap_or_else(|_| VENV_PYTHON.into());
    let ready = Command::new(&python)
        .args(["-c", "import minisweagent, requests, yaml"])
        .env("MSWEA_SILENT_STARTUP", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    support::require(
        ready,
        &format!(
            "{python} cannot import minisweagent: run `sudo bash .ci/testbed.sh` (pip install mini-swe-agent)"
        ),
    )
    .then_some(python)
}

fn docker_image_ready(image: &str) -> bool {
    let works = |args: &[&str]| {
        Command::new("docker")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    support::require(
        works(&["info"]) && works(&["image", "inspect", image]),
        &format!("a running Docker engine with {image}: run `sudo bash .ci/testbed.sh`"),
    )
}

/// Runs the task script against `server` and checks that it says it passed, with the client
/// from this checkout.
fn run_task(python: &str, server: &Server, args: &[&str]) {
    let temp = TempDir::new("real-client");
    let stdout_path = temp.path().join("stdout");
    let stderr_path = temp.path().join("stderr");
    let mut child = Command::new(python)
        .arg(SCRIPT)
        .args(["--url", &server.url, "--cap", CAP])
        .args(args)
        .env("PYTHONPATH", CLIENT_DIR)
        .env("ARS_TOKEN", TOKEN)
        .env("MSWEA_SILENT_STARTUP", "1")
        .env("MSWEA_GLOBAL_CONFIG_DIR", temp.path().join("mswea"))
        .current_dir(temp.path())
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).unwrap())
        .stderr(File::create(&stderr_path).unwrap())
        .spawn()
        .expect("run the task script");
    let status = match child.wait_timeout(SCRIPT_TIMEOUT).unwrap() {
        Some(status) => status,
        None => {
            let _ = child.kill();
            child.wait().unwrap()
        }
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        status.success(),
        "the mini-swe-agent task failed ({status}):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ok: mini-swe-agent"), "{stdout}\n{stderr}");
    let client_dir = Path::new(CLIENT_DIR).join("arservice");
    assert!(
        stdout.contains(&format!("client from {}", client_dir.display())),
        "the script did not use this checkout's client: {stdout}"
    );
    eprintln!("{stdout}");
}

#[test]
fn mini_swe_agent_runs_a_task_on_local() {
    let Some(python) = python() else { return };
    let server = Server::start(&["--token", TOKEN, "--max-output-bytes", CAP]);
    run_task(&python, &server, &["--container-type", "local"]);
}

#[test]
fn mini_swe_agent_runs_a_task_on_docker_through_the_agent() {
    let Some(python) = python() else { return };
    // No `--agent`: the static binary is its own agent by default; the script checks that
    // `/stats` says `exec_mode: agent`.
    if support::static_agent().is_none() || !docker_image_ready(IMAGE_BASH) {
        return;
    }
    let server = Server::start(&["--token", TOKEN, "--max-output-bytes", CAP]);
    run_task(
        &python,
        &server,
        &[
            "--container-type",
            "docker",
            "--image",
            IMAGE_BASH,
            "--cwd",
            "/testbed",
            "--exec-mode",
            "agent",
        ],
    );
}
