//! The command line: configuration errors are one line on stderr and exit code 2, before any
//! port is bound (the state dir is locked before the bind); `--help` says what is required,
//! every option's default and the exit codes; `--help` and `--version` answer and exit 0.

mod support;

use std::process::{Command, Output, Stdio};
use support::{binary, Server, TempDir};

fn arservice(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run arservice")
}

/// Asserts exit code 2 and a single stderr line containing `needle`.
fn refused(args: &[&str], needle: &str) {
    let output = arservice(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {stderr}"
    );
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
}

#[test]
fn bad_configuration_is_one_line_and_exit_2() {
    let temp = TempDir::new("cli");
    let bad_json = temp.path().join("bad.json");
    std::fs::write(&bad_json, "{oops").unwrap();
    let bad_preset = temp.path().join("preset.json");
    std::fs::write(&bad_preset, r#"{"p": {"container_type": "vm"}}"#).unwrap();
    let base = ["--runner", "local", "--port", "0"];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        base.iter().chain(extra).copied().collect()
    }
    refused(
        &with(&base, &["--max-resources", "{instances: 3"]),
        "--max-resources is not valid JSON",
    );
    refused(
        &with(&base, &["--max-resources", r#"{"instances": -1}"#]),
        "'instances'",
    );
    refused(
        &with(&base, &["--max-resources", r#"{"cpus": "4"}"#]),
        "'cpus'",
    );
    refused(
        &with(&base, &["--environments", "/nonexistent/envs.json"]),
        "/nonexistent/envs.json",
    );
    refused(
        &with(&base, &["--environments", bad_json.to_str().unwrap()]),
        "not valid JSON",
    );
    refused(
        &with(&base, &["--environments", bad_preset.to_str().unwrap()]),
        "preset 'p'",
    );
    refused(
        &with(&base, &["--container-types", "docker,vm"]),
        "--container-types: unknown 'vm'",
    );
    refused(&with(&base, &["--workers", "0"]), "--workers");
    refused(
        &with(&base, &["--max-connections", "0"]),
        "--max-connections",
    );
    refused(&with(&base, &["--client-timeout", "0"]), "--client-timeout");
    refused(
        &with(&base, &["--keep-alive-timeout", "-1"]),
        "--keep-alive-timeout",
    );
    let huge_preset = temp.path().join("huge.json");
    let preset =
        serde_json::json!({"big": {"container_type": "local", "notes": "x".repeat(200_000)}});
    std::fs::write(&huge_preset, preset.to_string()).unwrap();
    refused(
        &with(&base, &["--environments", huge_preset.to_str().unwrap()]),
        "preset 'big' is",
    );
    // A typo in a preset, or kind options of the wrong type, fail the start, not every
    // instance started from the preset later.
    let typo = temp.path().join("typo.json");
    std::fs::write(
        &typo,
        r#"{"p": {"container_type": "local", "cwdd": "/tmp"}}"#,
    )
    .unwrap();
    refused(
        &with(&base, &["--environments", typo.to_str().unwrap()]),
        "preset 'p': unknown key 'cwdd' in environment_config: did you mean 'cwd'?",
    );
    // So does a pool with a key it does not take, or a preset whose pool could never fit.
    let bad_pool = temp.path().join("bad_pool.json");
    std::fs::write(
        &bad_pool,
        r#"{"p": {"container_type": "local", "pool": {"size": 2, "sise": 1}}}"#,
    )
    .unwrap();
    refused(
        &with(&base, &["--environments", bad_pool.to_str().unwrap()]),
        "preset 'p': unknown key 'sise' in pool: its only key is size",
    );
    let huge_pool = temp.path().join("huge_pool.json");
    std::fs::write(
        &huge_pool,
        r#"{"p": {"container_type": "local", "resources": {"instances": 99}, "pool": {"size": 1}}}"#,
    )
    .unwrap();
    refused(
        &with(&base, &["--environments", huge_pool.to_str().unwrap()]),
        "the pool of preset 'p': not enough 'instances'",
    );
    let bad_args = temp.path().join("bad_args.json");
    std::fs::write(
        &bad_args,
        r#"{"d": {"container_type": "docker", "image": "busybox", "run_args": "--privileged"}}"#,
    )
    .unwrap();
    refused(
        &with(&base, &["--environments", bad_args.to_str().unwrap()]),
        "preset 'd': run_args must be a list of strings",
    );
    refused(&with(&base, &["--log-level", "loud"]), "--log-level");
    refused(
        &with(&base, &["--health-interval", "0"]),
        "--health-interval",
    );
    refused(&with(&base, &["--host", "0.0.0.0"]), "--token");
    refused(&["--port", "0"], "--runner is required");
    refused(&["--runner", "cloud", "--port", "0"], "local or slurm");
    refused(
        &["--runner", "slurm", "--port", "0", "--queue-timeout", "-1"],
        "--queue-timeout",
    );
    refused(
        &[
            "--runner",
            "slurm",
            "--port",
            "0",
            "--slurm-node-binary",
            "/nonexistent/arservice",
        ],
        "--slurm-node-binary",
    );
    refused(&["--runner", "local", "--bogus"], "--bogus");
}

#[test]
fn a_state_dir_in_use_or_unusable_is_refused() {
    let server = Server::start(&[]);
    let state_dir = server.state_dir.to_str().unwrap();
    refused(
        &["--runner", "local", "--port", "0", "--state-dir", state_dir],
        "in use by another arservice",
    );
    let temp = TempDir::new("cli-file");
    let file = temp.path().join("file");
    std::fs::write(&file, "").unwrap();
    let under_file = file.join("state");
    refused(
        &[
            "--runner",
            "local",
            "--port",
            "0",
            "--state-dir",
            under_file.to_str().unwrap(),
        ],
        "cannot create state dir",
    );
}

#[test]
fn help_and_version() {
    let output = arservice(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for option in [
        "--runner",
        "--port",
        "--host",
        "--max-resources",
        "--environments",
        "--state-dir",
        "--workers",
        "--max-output-bytes",
        "--log-level",
        "--token",
    ] {
        assert!(help.contains(option), "--help lacks {option}:\n{help}");
    }
    for arguments in [&["--version"][..], &["--runner", "local", "--version"]] {
        let output = arservice(arguments);
        assert!(output.status.success(), "{arguments:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            format!("arservice {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

/// The options of `--help`, each with its description (wrapped lines joined).
fn help_options(help: &str) -> Vec<(String, String)> {
    let block = help
        .split("Options:\n")
        .nth(1)
        .expect("--help has an Options section");
    let block = block.split("\n\n").next().unwrap();
    let mut options: Vec<(String, String)> = Vec::new();
    for line in block.lines() {
        let trimmed = line.trim_start();
        if line.starts_with("  --") {
            let (name, text) = trimmed.split_once(' ').unwrap_or((trimmed, ""));
            options.push((
                name.trim_end_matches(',').to_string(),
                text.trim().to_string(),
            ));
        } else if let Some((_, text)) = options.last_mut() {
            text.push(' ');
            text.push_str(trimmed);
        }
    }
    options
}

#[test]
fn help_says_what_is_required_every_default_and_the_exit_codes() {
    let output = arservice(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    let usage = help.lines().next().unwrap();
    assert!(
        usage.starts_with("Usage: arservice --runner <runner> [--port <port>]"),
        "--runner must show as required: {usage}"
    );
    let options = help_options(&help);
    assert!(options.len() > 30, "{options:?}");
    for (name, text) in &options {
        if matches!(name.as_str(), "--help" | "--version") {
            continue;
        }
        if name == "--runner" {
            assert!(text.starts_with("required"), "--runner: {text}");
            continue;
        }
        assert!(
            text.contains("default"),
            "--help names no default for {name}: {text}"
        );
    }
    let codes = help
        .split("Error codes:\n")
        .nth(1)
        .expect("--help lists the exit codes");
    for code in ["  0 ", "  1 ", "  2 "] {
        assert!(codes.contains(code), "exit code{code}missing:\n{codes}");
    }
    assert!(codes.contains("state dir in use"), "{codes}");
}

#[test]
fn the_state_dir_is_locked_before_the_port_is_bound() {
    // The port and the state dir of a running server: a second server given both must be
    // refused for the state dir, which it checks first, not for the port.
    let server = Server::start(&[]);
    let port = server.port.to_string();
    let state_dir = server.state_dir.to_str().unwrap();
    refused(
        &[
            "--runner",
            "local",
            "--port",
            &port,
            "--state-dir",
            state_dir,
        ],
        "in use by another arservice",
    );
    // A directory holding someone's data is refused before the bind too.
    let temp = TempDir::new("cli-data");
    std::fs::write(temp.path().join("thesis.tex"), "data").unwrap();
    refused(
        &[
            "--runner",
            "local",
            "--port",
            &port,
            "--state-dir",
            temp.path().to_str().unwrap(),
        ],
        "holds files arservice did not make",
    );
    assert!(temp.path().join("thesis.tex").exists());
    // With a free state dir, the busy port is what stops it (exit 2, one line).
    let fresh = TempDir::new("cli-fresh");
    refused(
        &[
            "--runner",
            "local",
            "--port",
            &port,
            "--state-dir",
            fresh.path().join("state").to_str().unwrap(),
        ],
        "cannot listen",
    );
}

#[test]
fn the_default_state_dir_differs_per_port_and_leftovers_are_cleared() {
    let temp = TempDir::new("leftover");
    let state = temp.path().join("state");
    let mut first = Server::start(&["--state-dir", state.to_str().unwrap()]);
    first.signal(libc::SIGTERM);
    first.wait_exit(std::time::Duration::from_secs(10)).unwrap();
    // What a crash leaves: an instance directory the next life must clear.
    std::fs::create_dir_all(state.join("instances/stale-run/work")).unwrap();
    // A server started on a state dir with an earlier life's instance directories clears them.
    let mut child = Command::new(binary())
        .args(["--runner", "local", "--port", "0", "--state-dir"])
        .arg(&state)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    support::wait_for(
        std::time::Duration::from_secs(10),
        "stale dir removal",
        || (!state.join("instances/stale-run").exists()).then_some(()),
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let one = Command::new(binary())
        .args(["--runner", "local", "--port", "0", "--log-level", "info"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let two = Command::new(binary())
        .args(["--runner", "local", "--port", "0", "--log-level", "info"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first_line = |mut child: std::process::Child| {
        use std::io::BufRead;
        let stderr = child.stderr.take().unwrap();
        let line = std::io::BufReader::new(stderr)
            .lines()
            .next()
            .unwrap()
            .unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        line.split("state dir ")
            .nth(1)
            .unwrap()
            .trim_end_matches(')')
            .to_string()
    };
    let (dir_one, dir_two) = (first_line(one), first_line(two));
    assert_ne!(dir_one, dir_two);
    for dir in [dir_one, dir_two] {
        assert!(
            dir.starts_with(std::env::temp_dir().to_str().unwrap()),
            "{dir}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn help_into_a_pipe_closed_early_exits_0() {
    // `--help | head -1`: the reader goes after one line; the rest of the help must not make
    // the binary panic (exit 101) on the closed pipe.
    for _ in 0..20 {
        let status = Command::new("bash")
            .args(["-o", "pipefail", "-c", "\"$0\" --help | head -1 >/dev/null"])
            .arg(binary())
            .status()
            .unwrap();
        assert!(status.success(), "{status}");
    }
}

/// A server whose stderr reader went away (a closed terminal, `2>&1 | head`, a dead
/// supervisor) keeps serving, and still stops on SIGTERM: a log line it can no longer write
/// used to panic the thread that handles signals, and the server ignored SIGTERM.
#[test]
fn a_server_whose_stderr_is_gone_serves_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let temp = TempDir::new("stderr-gone");
    let mut child = Command::new(binary())
        .args(["--runner", "local", "--port", "0", "--log-level", "debug"])
        .arg("--state-dir")
        .arg(temp.path().join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start arservice");
    // A failing assertion must not leave the server running (it ignored SIGTERM before the fix).
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut child = KillOnDrop(child);
    // The start-up log until the line with the port (a warning may come first, e.g. when
    // docker is not running).
    let mut head = String::new();
    let port: u16 = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("no port in {head:?}");
        }
        head.push_str(&line);
        if let Some(port) = line
            .split("listening on http://127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|port| port.parse().ok())
        {
            break port;
        }
    };
    drop(stderr);
    let url = format!("http://127.0.0.1:{port}");
    // Every request logs a line at debug level: the first of them meets the closed pipe.
    for _ in 0..3 {
        let answer = ureq::get(format!("{url}/healthz")).call().expect("healthz");
        assert_eq!(answer.status(), 200);
    }
    // SAFETY: a signal to the child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let status = support::wait_for(
        std::time::Duration::from_secs(15),
        "the server to stop on SIGTERM",
        || child.0.try_wait().unwrap(),
    );
    assert!(status.success(), "{status:?}");
}
