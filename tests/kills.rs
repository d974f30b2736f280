//! Processes that try to escape a timeout: in the background, after `setsid`, double-forked
//! and ignoring SIGTERM, in a loop. On each path here, a timed-out command answers within its
//! timeout + 1 s, nothing it started is left (`ps` on the host, and inside the container), and
//! an unrelated process started by the test beside it is untouched.
//!
//! Paths: docker's CLI path (`docker exec`), on both test images. The Slurm paths have their
//! own in `tests/slurm.rs`.

mod support;

use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{wait_for, CloseAll, Server};

const IMAGE_BUSYBOX: &str = "arservice-test/busybox:latest";
const IMAGE_BASH: &str = "arservice-test/bash:latest";

/// The timeout of every escaping command (long enough for a busy machine to get to its
/// `echo started`: starting `docker exec` counts against it).
const TIMEOUT: Duration = Duration::from_secs(2);

/// How late past its timeout a command may answer.
const ON_TIME: Duration = Duration::from_secs(1);

/// How long killed processes get to disappear from `ps` once the answer is there.
const GONE_WITHIN: Duration = Duration::from_secs(2);

/// A number no other test on the machine uses, to name this test's `sleep`s.
fn unique_tag() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    50_000 + (std::process::id() % 1000) * 40 + unique
}

/// The commands that try to outlive their timeout; `{t}` becomes a unique tag, and every
/// process they start has `{t}` in its command line.
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

/// Pids and command lines of this machine's processes whose command line contains `needle`
/// (a container's processes included: they are in the host's process table too).
fn host_processes(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains(needle) && !cmdline.contains("pgrep"))
                .then(|| format!("{:?}: {cmdline}", entry.file_name()))
        })
        .collect()
}

/// An unrelated `setsid sleep` on the host: no kill of ours may touch it.
struct Bystander(Child);

impl Bystander {
    fn start(tag: u32) -> Bystander {
        Bystander(
            Command::new("setsid")
                .args(["sleep", &format!("{tag}9")])
                .stdin(Stdio::null())
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

fn docker_ready(image: &str) -> bool {
    let works = |args: &[&str]| {
        Command::new("docker")
            .args(args)
            .output()
            .is_ok_and(|output| output.status.success())
    };
    support::require(
        works(&["info"]) && works(&["image", "inspect", image]),
        &format!(
            "the docker kill tests need the engine and {image}: run `sudo bash .ci/testbed.sh`"
        ),
    )
}

/// `ps` inside a container.
fn ps_inside(container: &str) -> String {
    let ps = Command::new("docker")
        .args(["exec", container, "ps"])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout).into_owned();
    assert!(ps.contains("PID"), "ps did not run in {container}: {ps}");
    ps
}

/// Runs `cmd` with [`TIMEOUT`] and checks the answer: timed out, on time, output so far.
fn run_escape(server: &Server, run_id: &str, what: &str, cmd: &str) -> Value {
    let started = Instant::now();
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": run_id, "cmd": cmd, "timeout": TIMEOUT.as_secs_f64()}),
    );
    let took = started.elapsed();
    assert_eq!(status, 200, "{what}: {body}");
    assert_eq!(body["result"]["timed_out"], true, "{what}: {body}");
    assert_eq!(body["result"]["returncode"], 124, "{what}: {body}");
    assert_eq!(body["result"]["output"], "started\n", "{what}: {body}");
    assert!(
        took <= TIMEOUT + ON_TIME,
        "{what}: a {TIMEOUT:?} timeout answered after {took:?}"
    );
    body["result"].clone()
}

fn docker_cli_escapes(image: &str) {
    if !docker_ready(image) {
        return;
    }
    let server = Server::start(&[]);
    let _close = CloseAll(&server);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "k", "container_name": image,
                "environment_config": {"container_type": "docker", "exec_mode": "cli"}}),
    );
    assert_eq!(status, 200, "{body}");
    let (_, stats) = server.get("/stats?run_id=k");
    assert_eq!(stats["instances"][0]["exec_mode"], "cli", "{stats}");
    let container = stats["instances"][0]["container"]
        .as_str()
        .unwrap()
        .to_string();
    for (what, escape) in ESCAPES {
        let tag = unique_tag();
        let mut host_bystander = Bystander::start(tag);
        // And one inside the same container, started without any marker of ours.
        let inside = Command::new("docker")
            .args(["exec", "--detach", &container, "setsid", "sleep"])
            .arg(format!("{tag}8"))
            .status()
            .unwrap();
        assert!(inside.success());
        wait_for(Duration::from_secs(5), "the bystanders to run", || {
            ps_inside(&container)
                .contains(&format!("sleep {tag}8"))
                .then_some(())
        });

        run_escape(&server, "k", what, &escape.replace("{t}", &tag.to_string()));
        wait_for(GONE_WITHIN, &format!("{what}: nothing left"), || {
            let ours: Vec<String> = host_processes(&tag.to_string())
                .into_iter()
                .filter(|process| !process.contains(&format!("{tag}9")))
                .filter(|process| !process.contains(&format!("{tag}8")))
                .collect();
            ours.is_empty().then_some(())
        });
        let ps = ps_inside(&container);
        let left: Vec<&str> = ps
            .lines()
            .filter(|line| line.contains(&tag.to_string()) && !line.contains(&format!("{tag}8")))
            .collect();
        assert!(
            left.is_empty(),
            "{what}: left inside the container: {left:?}"
        );
        let bystander_inside = ps
            .lines()
            .find(|line| line.contains(&format!("sleep {tag}8")))
            .unwrap_or_else(|| {
                panic!("{what}: the unrelated process in the container was killed:\n{ps}")
            });
        host_bystander.assert_alive(what);
        if what == "setsid loop" {
            let loop_file = format!("/tmp/loop-{tag}");
            let size = |container: &str| {
                Command::new("docker")
                    .args(["exec", container, "wc", "-c", &loop_file])
                    .output()
                    .unwrap()
                    .stdout
            };
            let before = size(&container);
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(before, size(&container), "the loop still writes");
        }
        let pid = bystander_inside.split_whitespace().next().unwrap();
        let killed = Command::new("docker")
            .args(["exec", &container, "kill", pid])
            .status()
            .unwrap();
        assert!(killed.success());
    }
    assert_eq!(server.exec("k", "echo alive")["output"], "alive\n");
    let (status, body) = server.post("/close_instance", &json!({"run_id": "k"}));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn docker_cli_busybox_escaping_processes_time_out_on_time_and_leave_nothing() {
    docker_cli_escapes(IMAGE_BUSYBOX);
}

#[test]
fn docker_cli_bash_escaping_processes_time_out_on_time_and_leave_nothing() {
    docker_cli_escapes(IMAGE_BASH);
}

/// `arservice guard` (what runs each Slurm CLI-path step on the node), driven directly.
fn guard(timeout: f64, cmd: &str, env: &[(&str, &str)]) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let output = Command::new(support::binary())
        .args(["guard", "--instance", "ars-test-guard", "--exec", "step-7"])
        .arg("--timeout")
        .arg(timeout.to_string())
        .args(["--", "sh", "-c", cmd])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (output, started.elapsed())
}

#[test]
fn the_step_guard_kills_every_escape_on_time_and_nothing_else() {
    for (what, escape) in ESCAPES {
        let tag = unique_tag();
        let mut bystander = Bystander::start(tag);
        let cmd = escape.replace("{t}", &tag.to_string());
        let (output, took) = guard(TIMEOUT.as_secs_f64(), &cmd, &[]);
        assert_eq!(output.status.code(), Some(124), "{what}: {output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "started\n",
            "{what}"
        );
        assert!(took <= TIMEOUT + ON_TIME, "{what}: took {took:?}");
        // The guard exits only once everything below it is gone.
        let left: Vec<String> = host_processes(&tag.to_string())
            .into_iter()
            .filter(|process| !process.contains(&format!("{tag}9")))
            .collect();
        assert!(left.is_empty(), "{what}: left {left:?}");
        bystander.assert_alive(what);
        let _ = std::fs::remove_file(format!("/tmp/loop-{tag}"));
    }
}

#[test]
fn the_step_guard_ends_background_jobs_with_their_command_and_keeps_its_code() {
    let tag = unique_tag();
    let (output, took) = guard(
        30.0,
        &format!("sleep {tag}1 >/dev/null 2>&1 & (sleep 0.03; echo late) & echo early; exit 3"),
        &[],
    );
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "early\nlate\n");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(host_processes(&format!("sleep {tag}1")).is_empty());
}

#[test]
fn the_step_guards_markers_cannot_be_overridden_and_its_signals_are_not_inherited() {
    let (output, _) = guard(
        30.0,
        "echo $ARSERVICE_INSTANCE $ARSERVICE_EXEC; grep SigBlk /proc/self/status",
        &[
            ("ARSERVICE_INSTANCE", "forged"),
            ("ARSERVICE_EXEC", "forged"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "ars-test-guard step-7\nSigBlk:\t0000000000000000\n"
    );
}

#[test]
fn the_step_guard_ends_everything_when_its_step_is_cancelled() {
    let tag = unique_tag();
    let mut bystander = Bystander::start(tag);
    let mut guard = Command::new(support::binary())
        .args(["guard", "--instance", "ars-test-guard", "--exec", "step-8"])
        .args(["--timeout", "300", "--", "sh", "-c"])
        .arg(format!(
            "(trap '' TERM; setsid sh -c 'trap \"\" TERM; sleep {tag}1' &); echo started; sleep {tag}2"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    std::io::Read::read_exact(guard.stdout.as_mut().unwrap(), &mut first).unwrap();
    assert_eq!(&first, b"started\n");
    wait_for(Duration::from_secs(5), "the double fork to run", || {
        (!host_processes(&format!("sleep {tag}1")).is_empty()).then_some(())
    });
    let cancelled = Instant::now();
    // What Slurm's step cancel sends first (KillWait before its SIGKILL).
    // SAFETY: kill only sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(guard.id() as i32, libc::SIGTERM) }, 0);
    let status = guard.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    assert!(
        cancelled.elapsed() < Duration::from_secs(2),
        "{:?}",
        cancelled.elapsed()
    );
    assert!(host_processes(&tag.to_string())
        .iter()
        .all(|process| process.contains(&format!("{tag}9"))));
    bystander.assert_alive("the cancel");
}
