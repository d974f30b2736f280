//! No environment value ever reaches a command line on the host (issue 13): `ps` and
//! `/proc/<pid>/cmdline` show every process's arguments to every user of the machine.
//!
//! The attack, on every exec path the machine has (the flavors of `tests/support/flavor.rs`:
//! local; docker, bubblewrap, apptainer and enroot on the CLI path and through the agent;
//! Slurm's agent and srun steps): an instance starts with distinctive values in its `env`, in
//! `forward_env` (from the server's environment) and in one command's `env`, and a `HOME` of
//! its own, and a scanner reads every `/proc/*/cmdline` on the machine, over and over, from
//! before the start until after the close, while a command that has all of them in scope runs
//! for a while. No scan may find any of them; the command itself must see them all.

mod support;

use serde_json::json;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::flavor::Flavor;
use support::{wait_for, CloseAll};

/// How long the command with the values in scope runs (its `sleep`): the scanner must get
/// many passes over the machine's processes in that time.
const COMMAND_SECONDS: u64 = 2;

/// The pause between two scans of the machine's processes.
const SCAN_PAUSE: Duration = Duration::from_millis(5);

/// At least this many full scans must run while the command runs.
const MIN_SCANS_DURING_COMMAND: usize = 5;

/// The command lines of this machine's processes that contain one of `needles`, with pids.
fn command_lines_with(needles: &[String]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            needles
                .iter()
                .any(|needle| cmdline.contains(needle.as_str()))
                .then(|| format!("pid {:?}: {cmdline}", entry.file_name()))
        })
        .collect()
}

/// The attack on one flavor (see the module's doc).
fn attack(flavor: Flavor, tag: &str) {
    if !flavor.available() {
        return;
    }
    let unique = format!("{}-{tag}", std::process::id());
    let in_env = format!("arsvc-leak-env-{unique}");
    let forwarded = format!("arsvc-leak-fwd-{unique}");
    let in_command = format!("arsvc-leak-cmd-{unique}");
    // HOME too: apptainer sets it apart from the other variables (it was `--home`).
    let home = format!("/arsvc-leak-home-{unique}");
    let needles = vec![
        in_env.clone(),
        forwarded.clone(),
        in_command.clone(),
        home.clone(),
    ];
    let server = flavor.server(&[], vec![("ARS_LEAK_FORWARDED", forwarded.as_str())]);
    let _close = CloseAll(&server);
    // The server's own command line does not hold a value (else every scan would find it).
    assert!(command_lines_with(&needles).is_empty());

    let stop = AtomicBool::new(false);
    let command_running = AtomicBool::new(false);
    let scans = AtomicUsize::new(0);
    let scans_during_command = AtomicUsize::new(0);
    let found: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    std::thread::scope(|scope| {
        // The scanner stops however this closure ends (a failed assertion included), or the
        // scope would wait for it forever.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let during = command_running.load(Ordering::Relaxed);
                let hits = command_lines_with(&needles);
                if !hits.is_empty() {
                    found.lock().unwrap().extend(hits);
                }
                scans.fetch_add(1, Ordering::Relaxed);
                if during && command_running.load(Ordering::Relaxed) {
                    scans_during_command.fetch_add(1, Ordering::Relaxed);
                }
                // A breath between passes: several of these run at once on a small machine.
                std::thread::sleep(SCAN_PAUSE);
            }
        });
        let before = scans.load(Ordering::Relaxed);
        // The scanner is running before the start begins.
        wait_for(Duration::from_secs(10), "the scanner's first pass", || {
            (scans.load(Ordering::Relaxed) > before).then_some(())
        });
        flavor.start(
            &server,
            "leak",
            json!({"env": {"ARS_LEAK_ENV": in_env, "HOME": home},
                   "forward_env": ["ARS_LEAK_FORWARDED"]}),
        );
        command_running.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let (status, body) = server.post(
            "/execute_command",
            &json!({"run_id": "leak",
                    // Not printenv: the test bed's bash image has no coreutils.
                    "cmd": format!("echo \"$ARS_LEAK_ENV\"; echo \"$ARS_LEAK_FORWARDED\"; \
                                    echo \"$ARS_LEAK_COMMAND\"; echo \"$HOME\"; \
                                    sleep {COMMAND_SECONDS}"),
                    "env": {"ARS_LEAK_COMMAND": in_command},
                    "timeout": 60}),
        );
        command_running.store(false, Ordering::Relaxed);
        assert_eq!(status, 200, "{}: {body}", flavor.name);
        assert!(started.elapsed() >= Duration::from_secs(COMMAND_SECONDS));
        // The command saw every value.
        assert_eq!(
            body["result"]["output"],
            format!("{in_env}\n{forwarded}\n{in_command}\n{home}\n"),
            "{}: {body}",
            flavor.name
        );
        assert_eq!(body["result"]["returncode"], 0, "{}: {body}", flavor.name);
        let (status, body) = server.post("/close_instance", &json!({"run_id": "leak"}));
        assert_eq!(status, 200, "{}: {body}", flavor.name);
    });
    let during = scans_during_command.load(Ordering::Relaxed);
    assert!(
        during >= MIN_SCANS_DURING_COMMAND,
        "{}: only {during} scans while the command ran",
        flavor.name
    );
    let found = found.into_inner().unwrap();
    assert!(
        found.is_empty(),
        "{}: environment values on command lines ({} scans):\n{}",
        flavor.name,
        scans.load(Ordering::Relaxed),
        found.into_iter().collect::<Vec<_>>().join("\n")
    );
}

/// One test per flavor.
macro_rules! attacks {
    ($($flavor:ident),* $(,)?) => {
        $(
            #[test]
            fn $flavor() {
                attack(Flavor::$flavor(), stringify!($flavor));
            }
        )*
    };
}

attacks!(
    local,
    docker_bash,
    docker_agent_bash,
    bwrap_host,
    bwrap_rootfs,
    bwrap_agent_host,
    bwrap_agent_rootfs,
    apptainer_tmpfs,
    apptainer_overlay,
    apptainer_agent,
    enroot,
    enroot_agent,
    slurm_agent,
    slurm_cli,
);
