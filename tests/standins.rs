//! What the conformance suite cannot show about apptainer and enroot, driven through the
//! stand-ins in `tests/standin/` (neither tool can be installed here): an image is converted
//! once however many instances use it; after a crash the next server on the same state dir
//! adopts the recorded apptainer instance and removes the rest (enroot's always); an agent
//! that cannot run falls back to the CLI at once; `exec_mode: "cli"` keeps the agent out; the
//! stand-ins refuse command lines they do not know, so that a change in arservice's command
//! lines cannot pass unnoticed; and what the real tools do to a command (as their source says,
//! imitated by the stand-ins) does not reach it: apptainer's shell evaluation of the
//! environment, its 64 MiB session area, `HOME` and INFO lines; enroot's ENTRYPOINT, login
//! shell, pid listing, stale pids, environment formatting and image reference syntax.
//!
//! Each test gives its server a stand-in state dir of its own (`STANDIN_STATE`), so that the
//! stand-ins' call logs and instance lists are this test's only.

mod support;

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use support::{static_agent, wait_for, CloseAll, Server, TempDir};

const IMAGE: &str = "arservice-test/bash:latest";
const STANDINS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/standin");
const APPTAINER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/standin/apptainer");
const ENROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/standin/enroot");

/// The `ENROOT_*` paths arservice pins under `<state-dir>/enroot/`.
const ENROOT_PATHS: [(&str, &str); 4] = [
    ("ENROOT_RUNTIME_PATH", "runtime"),
    ("ENROOT_CACHE_PATH", "cache"),
    ("ENROOT_DATA_PATH", "data"),
    ("ENROOT_TEMP_PATH", "tmp"),
];

/// True when bwrap and the test image are here; else skips loudly (fails in CI).
fn available() -> bool {
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|output| output.status.success())
    };
    let missing = if !works("bwrap", &["--version"]) {
        Some("bwrap".to_string())
    } else if !works("docker", &["image", "inspect", IMAGE]) {
        Some(format!("a running Docker engine with {IMAGE}"))
    } else {
        None
    };
    match missing {
        None => true,
        Some(missing) => support::require(
            false,
            &format!("the stand-in tests need {missing}: run `sudo bash .ci/testbed.sh`"),
        ),
    }
}

/// A server whose tools log to (and keep their state in) `standin_state`, with the stand-ins
/// on its `PATH`, so that its start-up sweep finds `apptainer` and `enroot`.
fn server(standin_state: &Path, args: &[&str]) -> Server {
    server_with_env(standin_state, args, &[])
}

/// [`server`] with more variables for the stand-ins (`STANDIN_ENROOT_VERSION`, ...).
fn server_with_env(standin_state: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
    let path = format!("{STANDINS}:{}", std::env::var("PATH").unwrap_or_default());
    // The configs name the stand-ins as their `executable`: the operator allows it here.
    let mut args = args.to_vec();
    args.push("--allow-client-host-access");
    let mut all = vec![
        ("STANDIN_STATE", standin_state.to_str().unwrap()),
        ("PATH", &path),
    ];
    all.extend(env.iter().copied());
    Server::start_with(support::Options { args, env: all })
}

/// An image made from the test image once (by `docker commit` with `changes`, or a tag when
/// there are none), for what the test image lacks; the local engine keeps it for later runs.
fn derived_image(name: &str, changes: &[&str]) -> String {
    let docker = |args: &[&str]| {
        let output = Command::new("docker").args(args).output().unwrap();
        assert!(output.status.success(), "docker {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    let exists = Command::new("docker")
        .args(["image", "inspect", name])
        .output()
        .is_ok_and(|output| output.status.success());
    if !exists {
        if changes.is_empty() {
            docker(&["tag", IMAGE, name]);
        } else {
            let container = docker(&["create", IMAGE, "/bin/sh"]);
            let mut commit = vec!["commit"];
            for change in changes {
                commit.extend(["--change", change]);
            }
            commit.extend([container.as_str(), name]);
            docker(&commit);
            docker(&["rm", "-f", &container]);
        }
    }
    name.to_string()
}

fn apptainer_config() -> Value {
    json!({"container_type": "apptainer", "executable": APPTAINER})
}

fn enroot_config() -> Value {
    json!({"container_type": "enroot", "executable": ENROOT})
}

fn start(server: &Server, run_id: &str, config: &Value) {
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": run_id, "container_name": IMAGE, "environment_config": config}),
    );
    assert_eq!(status, 200, "start {run_id}: {body}");
}

fn close(server: &Server, run_id: &str) {
    let (status, body) = server.post("/close_instance", &json!({"run_id": run_id}));
    assert_eq!(status, 200, "close {run_id}: {body}");
}

fn server_id(server: &Server) -> String {
    let (_, stats) = server.get("/stats");
    stats["server_id"].as_str().unwrap().to_string()
}

/// The stand-ins' calls so far, one argv a line.
fn calls(standin_state: &Path) -> Vec<String> {
    std::fs::read_to_string(standin_state.join("calls.log"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn count_calls(standin_state: &Path, prefix: &str) -> usize {
    calls(standin_state)
        .iter()
        .filter(|call| call.starts_with(prefix))
        .count()
}

/// Runs a stand-in the way a server with these states would.
fn standin(program: &str, args: &[&str], standin_state: &Path, server_state: &Path) -> Output {
    let mut command = Command::new(program);
    command.args(args).env("STANDIN_STATE", standin_state);
    for (name, sub) in ENROOT_PATHS {
        command.env(name, server_state.join("enroot").join(sub));
    }
    command.output().unwrap()
}

/// The instance (or container) names a listing shows, its header left out.
fn listed(output: &Output) -> Vec<String> {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with("ars-"))
        .map(String::from)
        .collect()
}

fn apptainer_instances(standin_state: &Path) -> Vec<String> {
    listed(&standin(
        APPTAINER,
        &["instance", "list"],
        standin_state,
        Path::new("/nonexistent"),
    ))
}

fn enroot_containers(standin_state: &Path, server_state: &Path) -> Vec<String> {
    listed(&standin(ENROOT, &["list"], standin_state, server_state))
}

/// Processes whose environment or command line names something of server `prefix`
/// (`ars-<server_id>-`), and mounts under `dir`.
fn traces(prefix: &str, dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let read = |file: &str| std::fs::read(entry.path().join(file)).unwrap_or_default();
        let (environ, cmdline) = (read("environ"), read("cmdline"));
        let marker = format!("ARSERVICE_INSTANCE={prefix}");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if environ
            .split(|&byte| byte == 0)
            .any(|variable| variable.starts_with(marker.as_bytes()))
            || cmdline.contains(prefix)
        {
            found.push(format!("process {:?}: {cmdline}", entry.file_name()));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for line in mounts.lines() {
        if line.contains(dir.to_str().unwrap()) {
            found.push(format!("mount {line}"));
        }
    }
    found
}

/// Two instances of one image started together: one conversion (`first_call`), two
/// instances with writes of their own, nothing left after closing them.
fn converted_once(
    config: Value,
    first_call: &str,
    instances_left: fn(&Path, &Path) -> Vec<String>,
) {
    let state = TempDir::new("standin");
    let server = server(state.path(), &[]);
    let _close = CloseAll(&server);
    std::thread::scope(|scope| {
        for run_id in ["one", "two"] {
            let (server, config) = (&server, &config);
            scope.spawn(move || start(server, run_id, config));
        }
    });
    assert_eq!(
        count_calls(state.path(), first_call),
        1,
        "converted more than once: {:#?}",
        calls(state.path())
    );
    server.exec("one", "echo mine > /tmp/note");
    assert_eq!(server.exec("one", "cat /tmp/note")["output"], "mine\n");
    assert_eq!(
        server.exec("two", "test -e /tmp/note && echo shared || echo own")["output"],
        "own\n",
        "the instances share their writes"
    );
    // A third instance, later, uses the cached image too.
    start(&server, "three", &config);
    assert_eq!(count_calls(state.path(), first_call), 1);
    for run_id in ["one", "two", "three"] {
        close(&server, run_id);
    }
    assert_eq!(
        instances_left(state.path(), &server.state_dir),
        Vec::<String>::new()
    );
    let left = traces(&format!("ars-{}-", server_id(&server)), state.path());
    assert!(left.is_empty(), "left after close: {left:#?}");
}

#[test]
fn apptainer_converts_an_image_once() {
    if available() {
        converted_once(
            apptainer_config(),
            "apptainer -q build ",
            |standin_state, _| apptainer_instances(standin_state),
        );
    }
}

#[test]
fn enroot_imports_an_image_once() {
    if available() {
        converted_once(enroot_config(), "enroot import ", enroot_containers);
    }
}

/// A server killed with an instance (and a background process in it) running; the next
/// server on the same state dir removes both before it serves. With `agent`, both servers run
/// it, and the agent is among what the crash leaves and the sweep removes.
fn reaped_after_a_crash(
    mut config: Value,
    instances_left: fn(&Path, &Path) -> Vec<String>,
    agent: Option<&str>,
) {
    let state = TempDir::new("standin");
    let agent_args: Vec<&str> = agent.map_or(vec![], |agent| vec!["--agent", agent]);
    let mut first = server(state.path(), &agent_args);
    // Without `agent`: the CLI path, asked for (the static binary is an agent by default).
    if agent.is_none() {
        config["exec_mode"] = "cli".into();
    }
    start(&first, "crashed", &config);
    let mode = if agent.is_some() { "agent" } else { "cli" };
    assert_eq!(exec_mode(&first, "crashed"), mode);
    first.exec("crashed", "sleep 600 >/dev/null 2>&1 &");
    let prefix = format!("ars-{}-", server_id(&first));
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(
        instances_left(state.path(), &first.state_dir),
        [format!("{prefix}crashed")],
        "the crash left no instance to reap"
    );
    assert!(!traces(&prefix, state.path()).is_empty());

    // `first` (and its state dir) lives until the end: the restart reuses that state dir.
    let state_dir = first.state_dir.to_str().unwrap().to_string();
    let mut second_args = vec!["--state-dir", state_dir.as_str()];
    second_args.extend(&agent_args);
    let second = server(state.path(), &second_args);
    let _close = CloseAll(&second);
    assert_eq!(format!("ars-{}-", server_id(&second)), prefix);
    wait_for(
        Duration::from_secs(30),
        "the leftovers to be reaped",
        || {
            (instances_left(state.path(), &first.state_dir).is_empty()
                && traces(&prefix, state.path()).is_empty())
            .then_some(())
        },
    );
    assert!(
        no_agent_dirs(&second),
        "the crashed agent's directory is left"
    );
    // The reaped instance's name is free again.
    start(&second, "crashed", &config);
    assert_eq!(exec_mode(&second, "crashed"), mode);
    assert_eq!(second.exec("crashed", "echo again")["output"], "again\n");
    close(&second, "crashed");
}

/// apptainer instances outlive a crashed server: the next server on the same state dir adopts
/// the one its journal recorded (listed, counted, its files kept, commands working; what
/// commands started through `exec` left running, killed) and removes the one it did not
/// record. `agent`: both servers run with it, and the adopted instance goes on with the same
/// agent, whose `apptainer exec` outlived the crash.
fn apptainer_adopted_after_a_crash(agent: Option<&str>) {
    let state = TempDir::new("standin");
    let agent_args: Vec<&str> = agent.map_or(vec![], |agent| vec!["--agent", agent]);
    let mut first = server(state.path(), &agent_args);
    let mut config = apptainer_config();
    if agent.is_none() {
        config["exec_mode"] = "cli".into();
    }
    start(&first, "kept", &config);
    start(&first, "unrecorded", &config);
    let mode = if agent.is_some() { "agent" } else { "cli" };
    assert_eq!(exec_mode(&first, "kept"), mode);
    first.exec("kept", "echo kept > note.txt");
    // Distinct per test: the two variants run at once in this process.
    let tag = 50_000 + 2 * (std::process::id() % 10_000) + u32::from(agent.is_some());
    first.exec("kept", &format!("sleep {tag} >/dev/null 2>&1 &"));
    let prefix = format!("ars-{}-", server_id(&first));
    first.signal(libc::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).unwrap();
    // As if the crash came between `instance start` and the journal write.
    std::fs::remove_file(first.state_dir.join("journal/unrecorded.json")).unwrap();

    let state_dir = first.state_dir.to_str().unwrap().to_string();
    let mut second_args = vec!["--state-dir", state_dir.as_str()];
    second_args.extend(&agent_args);
    let second = server(state.path(), &second_args);
    let _close = CloseAll(&second);
    let (_, stats) = second.get("/stats");
    assert_eq!(stats["total_instances"], 1, "{stats}");
    assert_eq!(stats["instances"][0]["run_id"], "kept", "{stats}");
    assert_eq!(stats["instances"][0]["adopted"], true, "{stats}");
    assert_eq!(stats["allocated_resources"]["instances"], 1, "{stats}");
    // The agent's `apptainer exec` outlives the crashed server, as the real one does (only
    // the container process dies with its starter, not the starter with its caller): the
    // adopted instance goes on through the same agent.
    assert_eq!(exec_mode(&second, "kept"), mode);
    assert_eq!(apptainer_instances(state.path()), [format!("{prefix}kept")]);
    assert_eq!(second.exec("kept", "cat note.txt")["output"], "kept\n");
    let sleeping = || {
        let out = std::process::Command::new("pgrep")
            .args(["-f", &format!("sleep {tag}")])
            .output()
            .unwrap();
        !out.stdout.is_empty()
    };
    // The agent enforces its own commands' timeouts, so their background jobs live on, as
    // after a close-free day; on the CLI path they lost their enforcer and are killed.
    if agent.is_none() {
        // Started through `exec`, it lost the timeout the earlier life enforced: killed.
        wait_for(
            Duration::from_secs(10),
            "the orphaned command to be killed",
            || (!sleeping()).then_some(()),
        );
    }
    close(&second, "kept");
    wait_for(
        Duration::from_secs(10),
        "nothing of the instance to be left",
        || {
            (apptainer_instances(state.path()).is_empty()
                && traces(&prefix, state.path()).is_empty())
            .then_some(())
        },
    );
    assert!(!sleeping());
    assert!(no_agent_dirs(&second), "agent directories are left");
}

#[test]
fn apptainer_instances_are_adopted_after_a_crash() {
    if available() {
        apptainer_adopted_after_a_crash(None);
    }
}

#[test]
fn enroot_leftovers_are_reaped_after_a_crash() {
    if available() {
        reaped_after_a_crash(enroot_config(), enroot_containers, None);
    }
}

#[test]
fn apptainer_instances_with_their_agent_are_adopted_after_a_crash() {
    if !available() {
        return;
    }
    if let Some(agent) = static_agent() {
        apptainer_adopted_after_a_crash(Some(&agent));
    }
}

#[test]
fn enroot_leftovers_with_their_agent_are_reaped_after_a_crash() {
    if !available() {
        return;
    }
    if let Some(agent) = static_agent() {
        reaped_after_a_crash(enroot_config(), enroot_containers, Some(&agent));
    }
}

#[test]
fn the_standins_refuse_command_lines_they_do_not_know() {
    let state = TempDir::new("standin");
    let server_state = state.path().join("server");
    let refused: [(&str, &[&str]); 10] = [
        // No --contain: the stand-in only implements what arservice asks for.
        (
            APPTAINER,
            &[
                "instance",
                "start",
                "--cleanenv",
                "--writable-tmpfs",
                "x.sif",
                "n",
            ],
        ),
        (APPTAINER, &["exec", "--nv", "instance://n", "true"]),
        (APPTAINER, &["run", "x.sif"]),
        // Binds: one per flag, and only at instance start (exec shares the instance's).
        (
            APPTAINER,
            &[
                "instance",
                "start",
                "--contain",
                "--cleanenv",
                "--writable-tmpfs",
                "--bind",
                "/tmp:/a,/tmp:/b",
                "x.sif",
                "n",
            ],
        ),
        (
            APPTAINER,
            &["exec", "--bind", "/tmp:/a", "instance://n", "true"],
        ),
        (ENROOT, &["start", "--root", "n", "true"]),
        // A file system type field, and a mount that is not a bind.
        (
            ENROOT,
            &["start", "--mount", "/tmp:/a:none:bind", "n", "true"],
        ),
        (ENROOT, &["start", "--mount", "/tmp:/a:ro", "n", "true"]),
        (ENROOT, &["remove", "n"]),
        (ENROOT, &["list", "-f"]),
    ];
    for (program, args) in refused {
        let output = standin(program, args, state.path(), &server_state);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("unsupported command line"),
            "{args:?}: {output:?}"
        );
    }
    assert_eq!(calls(state.path()).len(), 10, "every call is logged");
}

/// Values that apptainer would change on their way in: `--env` reads a value with another `=`
/// like a CSV list (and trims double quotes around one that has none); its environment script
/// evaluates `$VAR`, `$(cmd)` and backticks, and a trailing backslash leaves its quote open,
/// unless `--no-eval` (the stand-in evaluates as apptainer does: `tests/standin/apptainer`,
/// `user_env_script`). The instance's `env` and a command's own, on the CLI path and through
/// the agent (which `apptainer exec` starts with the instance's environment).
#[test]
fn apptainer_env_values_arrive_unchanged() {
    if !available() {
        return;
    }
    let state = TempDir::new("standin");
    let server = server(state.path(), &[]);
    let _close = CloseAll(&server);
    let values = json!({
        "OPTS": "a=1,b=2",
        "QUOTED": "say \"hi\"",
        "DOLLAR": "$PATH and $$",
        "SUBST": "$(echo ran)",
        "TICKS": "`echo ran`",
        "BACKSLASH": "ends\\",
    });
    let show =
        "printf '%s|' \"$OPTS\" \"$QUOTED\" \"$DOLLAR\" \"$SUBST\" \"$TICKS\" \"$BACKSLASH\"";
    let expected = "a=1,b=2|say \"hi\"|$PATH and $$|$(echo ran)|`echo ran`|ends\\|";
    let modes: &[Option<&str>] = if static_agent().is_some() {
        &[Some("cli"), None]
    } else {
        &[Some("cli")]
    };
    for (n, mode) in modes.iter().enumerate() {
        let run_id = format!("env{n}");
        let mut config = apptainer_config();
        config["env"] = values.clone();
        start_in_mode(&server, &run_id, &config, *mode);
        assert_eq!(server.exec(&run_id, show)["output"], expected, "{mode:?}");
        let (status, body) = server.post(
            "/execute_command",
            &json!({"run_id": run_id, "cmd": show, "env": values}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["result"]["output"], expected, "{mode:?}: {body}");
        close(&server, &run_id);
    }
}

/// Under `--contain`, apptainer keeps `/tmp`, `/var/tmp` and the home directory in the
/// instance's session area, 64 MiB by default, whatever the writable layer (the stand-in's
/// session area is that size): `--workdir` moves them to disk. And `HOME` from `env` is set
/// through `APPTAINER_HOME`, the variable of `--home` (apptainer refuses `APPTAINERENV_HOME`),
/// a writable directory of its own.
#[test]
fn apptainer_tmp_and_home_hold_more_than_the_session_area() {
    if !available() {
        return;
    }
    let state = TempDir::new("standin");
    let server = server(state.path(), &[]);
    let _close = CloseAll(&server);
    for (run_id, writable, home) in [
        ("tmpfs", "tmpfs", None),
        ("overlay", "overlay", Some("/home/agent")),
    ] {
        let mut config = apptainer_config();
        config["writable"] = json!(writable);
        config["exec_mode"] = json!("cli");
        if let Some(home) = home {
            config["env"] = json!({"HOME": home});
        }
        start(&server, run_id, &config);
        if let Some(home) = home {
            assert_eq!(
                server.exec(run_id, "echo $HOME")["output"],
                format!("{home}\n")
            );
        }
        // 80 MiB in each: more than the whole session area.
        let result = server.exec(
            run_id,
            "for dir in /tmp /var/tmp \"$HOME\"; do \
               dd if=/dev/zero of=\"$dir/big\" bs=1M count=80 2>/dev/null || echo \"full: $dir\"; \
             done; ls -s /tmp/big /var/tmp/big \"$HOME/big\" | wc -l",
        );
        assert_eq!(result["output"], "3\n", "{run_id}: {result}");
        close(&server, run_id);
    }
}

/// A `singularity` that is really apptainer prints an INFO line per `SINGULARITYENV_*`
/// variable, on stderr, which a command's output shares: `-s` keeps them out. (The stand-in,
/// run as `singularity`, reads that prefix and says so.)
#[test]
fn apptainer_as_singularity_says_nothing_in_command_output() {
    if !available() {
        return;
    }
    let state = TempDir::new("standin");
    let bin = state.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let singularity = bin.join("singularity");
    std::os::unix::fs::symlink(APPTAINER, &singularity).unwrap();
    let server = server(state.path(), &[]);
    let _close = CloseAll(&server);
    let config = json!({"container_type": "singularity",
                        "executable": singularity.to_str().unwrap(),
                        "exec_mode": "cli", "env": {"A": "1", "B": "2"}});
    start(&server, "quiet", &config);
    assert_eq!(
        server.exec("quiet", "echo $A$B")["output"],
        "12\n",
        "{:#?}",
        calls(state.path())
    );
    assert!(
        calls(state.path())
            .iter()
            .any(|call| call.starts_with("singularity -s exec ")),
        "{:#?}",
        calls(state.path())
    );
    close(&server, "quiet");
}

/// Enroot says "No such file or directory: <path>" when removing a container that is not
/// there, which is what closing after a failed `create` does.
#[test]
fn enroot_a_failed_create_leaves_nothing() {
    if !available() {
        return;
    }
    let state = TempDir::new("standin");
    let server = server(state.path(), &[]);
    let not_squashfs = state.path().join("broken.sqsh");
    std::fs::write(&not_squashfs, b"not a squashfs image").unwrap();
    let mut config = enroot_config();
    config["image"] = json!(not_squashfs.to_str().unwrap());
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "broken", "environment_config": config}),
    );
    assert_eq!(status, 500, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Invalid image format"),
        "{body}"
    );
    assert!(
        !server.state_dir.join("instances/broken").exists(),
        "the failed start left its directory"
    );
}

/// enroot runs the image's `/etc/rc`, which execs the image's ENTRYPOINT with the command as
/// its arguments (the stand-in writes it as enroot's docker::configure does): with
/// `ENTRYPOINT ["/bin/echo", ...]` the container process would be `echo sh -c ...` and the
/// start would fail. And enroot's login shell sources `/etc/profile`, which in the test image
/// resets `PATH`. Both ways, on the CLI path and through the agent.
#[test]
fn enroot_the_images_entrypoint_and_profile_stay_out_of_the_container_process() {
    if !available() {
        return;
    }
    let image = derived_image(
        "arservice-test/bash-entrypoint:latest",
        &[r#"ENTRYPOINT ["/bin/echo", "the entrypoint ran instead:"]"#],
    );
    let state = TempDir::new("standin");
    let server = server(state.path(), &[]);
    let _close = CloseAll(&server);
    let path = "/opt/tools/bin:/usr/bin:/bin";
    let modes: &[Option<&str>] = if static_agent().is_some() {
        &[Some("cli"), None]
    } else {
        &[Some("cli")]
    };
    for (n, mode) in modes.iter().enumerate() {
        let run_id = format!("entrypoint{n}");
        let mut config = enroot_config();
        config["image"] = json!(image);
        // `sh -c`: bash -lc would read /etc/profile itself, as it does in every environment.
        config["shell"] = json!(["sh", "-c"]);
        config["env"] = json!({"PATH": path});
        start_in_mode(&server, &run_id, &config, *mode);
        assert_eq!(
            server.exec(&run_id, "echo $PATH")["output"],
            format!("{path}\n"),
            "{mode:?}"
        );
        close(&server, &run_id);
    }
}

/// The container pid is the `enroot start` process itself (it execs down), not what
/// `enroot list --fancy` finds: the stand-in's discovery fails here as enroot's does with its
/// data path on NFS (enroot#242), every pid "<unknown>", and the instance works all the same.
#[test]
fn enroot_the_container_pid_is_the_start_process_not_a_listing() {
    if !available() {
        return;
    }
    let state = TempDir::new("standin");
    let server = server_with_env(state.path(), &[], &[("STANDIN_ENROOT_FANCY_UNKNOWN", "1")]);
    let _close = CloseAll(&server);
    let mut config = enroot_config();
    config["exec_mode"] = json!("cli");
    start(&server, "nfs", &config);
    assert_eq!(server.exec("nfs", "echo works")["output"], "works\n");
    let (_, stats) = server.get("/stats?run_id=nfs");
    let pid = stats["instances"][0]["container_pid"].as_i64().unwrap();
    assert!(
        !calls(state.path())
            .iter()
            .any(|call| call.starts_with("enroot list --fancy")),
        "{:#?}",
        calls(state.path())
    );
    let mut list = Command::new(ENROOT);
    list.args(["list", "--fancy"])
        .env("STANDIN_STATE", state.path())
        .env("STANDIN_ENROOT_FANCY_UNKNOWN", "1");
    for (name, sub) in ENROOT_PATHS {
        list.env(name, server.state_dir.join("enroot").join(sub));
    }
    let listing = String::from_utf8_lossy(&list.output().unwrap().stdout).to_string();
    let unknown: Vec<&str> = listing
        .lines()
        .skip_while(|line| !line.starts_with("<unknown>"))
        .take_while(|line| line.starts_with("<unknown>") || line.starts_with(' '))
        .collect();
    assert!(
        unknown.iter().any(|line| line
            .split_whitespace()
            .any(|field| field == pid.to_string())),
        "the listing found pid {pid}: {listing}"
    );
    close(&server, "nfs");
}

/// `enroot exec` only checks that a pid is alive and joins it: once the container process is
/// gone, its pid must never reach `enroot exec` again (another process may have it). The
/// instance answers 410 instead, without a single `enroot exec` more.
#[test]
fn enroot_commands_never_follow_a_dead_container_process() {
    if !available() {
        return;
    }
    let state = TempDir::new("standin");
    let server = server(state.path(), &[]);
    let _close = CloseAll(&server);
    let mut config = enroot_config();
    config["exec_mode"] = json!("cli");
    start(&server, "stale", &config);
    assert_eq!(server.exec("stale", "echo alive")["output"], "alive\n");
    let (_, stats) = server.get("/stats?run_id=stale");
    let pid = stats["instances"][0]["container_pid"].as_i64().unwrap() as i32;
    let execs = || count_calls(state.path(), "enroot exec ");
    let before = execs();
    // SAFETY: kill only sends a signal, to the container process this test just started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_for(
        Duration::from_secs(10),
        "the container process to end",
        || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            (stat.is_empty() || stat.contains(") Z ")).then_some(())
        },
    );
    for _ in 0..2 {
        let (status, body) = server.post(
            "/execute_command",
            &json!({"run_id": "stale", "cmd": "echo on the host"}),
        );
        assert_eq!(status, 410, "{body}");
    }
    assert_eq!(execs(), before, "{:#?}", calls(state.path()));
    close(&server, "stale");
}

/// What enroot's `common::envfmt` would change (surrounding quotes stripped, `ENROOT_*` names
/// dropped) and what `--env` splits (newlines) is refused with a 400, at start and, on the
/// CLI path, per command; quotes inside a value pass unchanged.
#[test]
fn enroot_refuses_variables_it_would_change() {
    if !available() {
        return;
    }
    let state = TempDir::new("standin");
    let server = server(state.path(), &[]);
    let _close = CloseAll(&server);
    for (env, why) in [
        (json!({"Q": "\"quoted\""}), "quotes"),
        (json!({"Q": "'single' "}), "quotes"),
        (json!({"ENROOT_MOUNT_HOME": "y"}), "ENROOT_"),
        (json!({"Q": "two\nlines"}), "newlines"),
    ] {
        let mut config = enroot_config();
        config["env"] = env.clone();
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": "refused", "container_name": IMAGE, "environment_config": config}),
        );
        assert_eq!(status, 400, "{env}: {body}");
        assert!(body["detail"].as_str().unwrap().contains(why), "{body}");
    }
    let mut config = enroot_config();
    config["exec_mode"] = json!("cli");
    config["env"] = json!({"INSIDE": "say \"hi\"", "OPEN": "'open"});
    start(&server, "quotes", &config);
    assert_eq!(
        server.exec("quotes", "echo \"$INSIDE|$OPEN\"")["output"],
        "say \"hi\"|'open\n"
    );
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "quotes", "cmd": "true", "env": {"A": "'x'"}}),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "quotes", "cmd": "echo \"$A\"", "env": {"A": "a \"b\" c"}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["output"], "a \"b\" c\n");
    close(&server, "quotes");
}

/// An image with a registry: enroot 4 reads `docker://registry/repo`, enroot 3.x only
/// `docker://registry#repo` (it takes `registry/repo` for a Docker Hub repository, and the
/// stand-in, as enroot 3.4.1, refuses a port there): `registry_separator: "#"`.
#[test]
fn enroot_3_reads_a_registry_after_a_hash() {
    if !available() {
        return;
    }
    let image = derived_image("registry.test:5000/arservice-test/bash:latest", &[]);
    let state = TempDir::new("standin");
    let enroot3 = server_with_env(state.path(), &[], &[("STANDIN_ENROOT_VERSION", "3.4.1")]);
    let _close3 = CloseAll(&enroot3);
    let mut config = enroot_config();
    config["image"] = json!(image);
    config["exec_mode"] = json!("cli");
    let (status, body) = enroot3.post(
        "/start_instance",
        &json!({"run_id": "slash", "environment_config": config}),
    );
    assert_eq!(status, 500, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Invalid image reference"),
        "{body}"
    );
    config["registry_separator"] = json!("#");
    let (status, body) = enroot3.post(
        "/start_instance",
        &json!({"run_id": "hash", "environment_config": config}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        enroot3.exec("hash", "echo imported")["output"],
        "imported\n"
    );
    close(&enroot3, "hash");
    assert!(calls(state.path())
        .iter()
        .any(|call| call.starts_with("enroot import ")
            && call.ends_with("docker://registry.test:5000#arservice-test/bash:latest")));

    let state = TempDir::new("standin");
    let enroot4 = server_with_env(state.path(), &[], &[("STANDIN_ENROOT_VERSION", "4.1.2")]);
    let _close4 = CloseAll(&enroot4);
    config["registry_separator"] = Value::Null;
    let (status, body) = enroot4.post(
        "/start_instance",
        &json!({"run_id": "slash", "environment_config": config}),
    );
    assert_eq!(status, 200, "{body}");
    close(&enroot4, "slash");
}

/// At start-up the server checks the apptainer and enroot it finds and says what will not
/// work: an apptainer before 1.1.0 has no `--no-eval` (the stand-in, as 1.0.3, refuses it as
/// that apptainer would), enroot 3.x needs `registry_separator: "#"` for an image with a
/// registry. A supported apptainer is said to be.
#[test]
fn the_startup_check_names_what_will_not_work() {
    if !available() {
        return;
    }
    let state = TempDir::new("standin");
    let old = server_with_env(
        state.path(),
        &[],
        &[
            ("STANDIN_APPTAINER_VERSION", "1.0.3"),
            ("STANDIN_ENROOT_VERSION", "3.4.1"),
        ],
    );
    let _close = CloseAll(&old);
    let log = wait_for(Duration::from_secs(10), "the version checks", || {
        let log = old.log();
        (log.contains("enroot: enroot 3.4.1") && log.contains("apptainer: apptainer 1.0.3"))
            .then_some(log)
    });
    assert!(
        log.contains("has no --no-eval: every instance start fails"),
        "{log}"
    );
    assert!(log.contains("\"registry_separator\": \"#\""), "{log}");
    let (status, body) = old.post(
        "/start_instance",
        &json!({"run_id": "old", "container_name": IMAGE,
                "environment_config": apptainer_config()}),
    );
    assert_eq!(status, 500, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("--no-eval"),
        "{body}"
    );

    let state = TempDir::new("standin");
    let current = server_with_env(state.path(), &[], &[("STANDIN_ENROOT_VERSION", "4.1.2")]);
    let _close = CloseAll(&current);
    let log = wait_for(Duration::from_secs(10), "the version checks", || {
        let log = current.log();
        (log.contains("apptainer is apptainer 1.3.4: supported")
            && log.contains("enroot is enroot 4.1.2: supported"))
        .then_some(log)
    });
    // No warning about the tools (the access summary is a warning of its own, logged by
    // another thread, before or after the checks).
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.starts_with("WARN") && !line.contains("access: "))
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}\n{log}");
}

fn exec_mode(server: &Server, run_id: &str) -> String {
    let (_, stats) = server.get(&format!("/stats?run_id={run_id}"));
    stats["instances"][0]["exec_mode"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Starts `run_id` with `config` plus `exec_mode` (when given); how long the start took.
fn start_in_mode(server: &Server, run_id: &str, config: &Value, mode: Option<&str>) -> Duration {
    let mut config = config.clone();
    if let Some(mode) = mode {
        config["exec_mode"] = json!(mode);
    }
    let started = Instant::now();
    start(server, run_id, &config);
    started.elapsed()
}

/// True when no agent directory is left under the server's state dir.
fn no_agent_dirs(server: &Server) -> bool {
    std::fs::read_dir(server.state_dir.join("agents")).map_or(true, |dir| dir.count() == 0)
}

/// A start whose agent exits at once must not wait for the agent's own start timeout (10 s).
const FAST_FALLBACK: Duration = Duration::from_secs(6);

/// busybox-static is a static executable, so the server takes it as an agent, but it has no
/// `agent` applet: inside the sandbox it exits at once, as an agent on a `noexec` mount or of a
/// foreign architecture would. The instance falls back to the CLI without waiting, and its
/// commands (and, for enroot, the container process that outlives the failed agent) work.
#[test]
fn apptainer_and_enroot_fall_back_to_the_cli_when_the_agent_cannot_run() {
    if !available() || !Path::new("/bin/busybox").is_file() {
        return;
    }
    let state = TempDir::new("standin");
    let server = server(state.path(), &["--agent", "/bin/busybox"]);
    let _close = CloseAll(&server);
    for (kind, config) in [
        ("apptainer", apptainer_config()),
        ("enroot", enroot_config()),
    ] {
        let mut config = config;
        config["env"] = json!({"A": "instance"});
        // The first start converts the image; the timed one then measures the fallback only.
        let warm = format!("{kind}-warm");
        start_in_mode(&server, &warm, &config, Some("cli"));
        let run_id = format!("{kind}-fallback");
        let took = start_in_mode(&server, &run_id, &config, None);
        assert!(took < FAST_FALLBACK, "{kind}: the fallback took {took:?}");
        assert_eq!(exec_mode(&server, &run_id), "cli", "{kind}");
        assert_eq!(
            server.exec(&run_id, "echo still works $A; pwd")["output"],
            "still works instance\n/\n",
            "{kind}"
        );
        for run_id in [warm, run_id] {
            close(&server, &run_id);
        }
    }
    let log = server.log();
    assert_eq!(
        log.matches("the agent did not come up in").count(),
        2,
        "one warning per fallback: {log}"
    );
    assert!(no_agent_dirs(&server), "agent directories left behind");
}

/// With a working agent, `exec_mode: "cli"` keeps it out of the instance entirely (no agent
/// mount in the tool's command line) and the default uses it; a mode of neither kind is a 400.
#[test]
fn apptainer_and_enroot_exec_mode_cli_forces_the_cli_path_even_with_an_agent() {
    if !available() {
        return;
    }
    let Some(agent) = static_agent() else {
        return;
    };
    let state = TempDir::new("standin");
    let server = server(state.path(), &["--agent", &agent]);
    let _close = CloseAll(&server);
    let prefix = format!("ars-{}-", server_id(&server));
    for (kind, config, starts, agent_flag) in [
        (
            "apptainer",
            apptainer_config(),
            "apptainer -q instance start ",
            "--bind",
        ),
        ("enroot", enroot_config(), "enroot start ", "--mount"),
    ] {
        for (mode, expected) in [(Some("cli"), "cli"), (None, "agent")] {
            let run_id = format!("{kind}-{expected}");
            start_in_mode(&server, &run_id, &config, mode);
            assert_eq!(exec_mode(&server, &run_id), expected, "{kind} {mode:?}");
            assert_eq!(server.exec(&run_id, "echo ok")["output"], "ok\n");
            let start_line = calls(state.path())
                .into_iter()
                .find(|call| {
                    call.starts_with(starts) && call.contains(&format!("{prefix}{run_id}"))
                })
                .unwrap_or_else(|| panic!("no {starts}for {run_id}: {:#?}", calls(state.path())));
            assert_eq!(
                start_line.contains(agent_flag),
                expected == "agent",
                "{start_line}"
            );
            close(&server, &run_id);
        }
        let mut config = config;
        config["exec_mode"] = json!("fast");
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": "bad", "container_name": IMAGE, "environment_config": config}),
        );
        assert_eq!(status, 400, "{kind}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains("exec_mode"),
            "{body}"
        );
    }
    assert!(no_agent_dirs(&server), "agent directories left behind");
}

/// An agent path that a tool's mount syntax cannot carry (here a binary under a directory
/// with a `:`) leaves the instance on its CLI path, with a warning that says why, and no agent
/// directory behind.
#[test]
fn apptainer_and_enroot_run_without_the_agent_when_its_path_cannot_be_mounted() {
    if !available() {
        return;
    }
    let Some(agent) = static_agent() else {
        return;
    };
    let state = TempDir::new("standin");
    let colon_dir = state.path().join("agent:copy");
    std::fs::create_dir(&colon_dir).unwrap();
    let unmountable = colon_dir.join("arservice");
    std::fs::copy(&agent, &unmountable).unwrap();
    let server = server(state.path(), &["--agent", unmountable.to_str().unwrap()]);
    let _close = CloseAll(&server);
    for (kind, config, tool) in [
        ("apptainer", apptainer_config(), "apptainer's --bind"),
        ("enroot", enroot_config(), "enroot's --mount"),
    ] {
        start(&server, kind, &config);
        assert_eq!(exec_mode(&server, kind), "cli", "{kind}");
        assert_eq!(
            server.exec(kind, "echo works")["output"],
            "works\n",
            "{kind}"
        );
        let log = server.log();
        assert!(
            log.contains(&format!("the agent's paths cannot go into {tool}")),
            "{kind}: {log}"
        );
        close(&server, kind);
    }
    assert!(no_agent_dirs(&server), "agent directories left behind");
}
