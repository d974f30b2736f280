//! `cargo bench --bench exec`: what running a command through arservice costs next to spawning
//! it directly, and how much memory the server holds.
//!
//! Owns the whole measurement in one process: a raw `sh -c true` spawn baseline (spawned the way
//! the server spawns: own process group, stdin null, stdout and stderr merged into one pipe), the
//! real server binary on port 0 with a `local` instance, a minimal keep-alive HTTP/1.1 client
//! (so client overhead is small and the same in every run), latency at concurrency 1 and 8,
//! throughput at concurrency 8, the server's RSS idle, with 1000 instances and after closing
//! them, and how fast instances start and close at concurrency 8: 1000 with the RSS reading,
//! [`MANY_INSTANCES`] more, and [`RAN_INSTANCES`] that ran one command each before their close
//! (whose close then looks for what the command left behind). The concurrency-1 time is split into what the server reports inside its spawn helper
//! (`duration_s`) and a round trip that spawns nothing (a 404), to show where time goes; the
//! interleaved rounds also run the spawn helper itself in this process ([`helper_spawn`]), so
//! the spawn's share and the server's share of the difference to raw are both printed.
//!
//! The machine is shared and noisy: medians are quoted, raw and server are compared as ratios,
//! and both comparisons are repeated in rounds that alternate raw and server (command by command
//! at concurrency 1, round by round at concurrency 8), so that a slow phase hits both sides.
//!
//! Invariants: connections to the server are opened one at a time, each answered before the
//! next (see [`Connection::open`]); nothing is left behind: the server is killed on drop (also on
//! a panic) and its state dir removed. Extra server flags for experiments come from `ARSERVICE_BENCH_ARGS`
//! (for example `--workers 8`); the server inherits the environment (`MALLOC_ARENA_MAX=2`).
//! `ARSERVICE_BENCH_BIN` runs another server binary (say, a copy of the build before a change)
//! under the same harness.

use arservice::env::spawn::{self, Limits, ProcessGroups};
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Timed iterations of each concurrency-1 measurement.
const ITERATIONS: usize = 2000;

/// Untimed iterations before each measurement (page cache, allocator, thread pools).
const WARMUP: usize = 200;

/// Threads (and connections, and instances) of the concurrency-8 measurements.
const THREADS: usize = 8;

/// Timed commands per thread at concurrency 8.
const PER_THREAD: usize = 1000;

/// Untimed commands per thread before the concurrency-8 measurements.
const PER_THREAD_WARMUP: usize = 50;

/// Interleaved rounds of raw versus server at concurrency 1.
const ROUNDS: usize = 5;

/// Timed iterations per side per interleaved round (raw and server alternate one by one).
const ROUND_ITERATIONS: usize = 400;

/// Rounds of the concurrency-8 measurements, raw and server alternating; each thread runs
/// `PER_THREAD / C8_ROUNDS` operations per round.
const C8_ROUNDS: usize = 8;

/// Instances held open for the memory measurement.
const RSS_INSTANCES: usize = 1000;

/// Instances started and then closed to compare the two rates.
const MANY_INSTANCES: usize = 10_000;

/// Instances that run one command each before they are closed.
const RAN_INSTANCES: usize = 1000;

/// How long the server gets to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between the server's first answer and the idle memory reading.
const SETTLE: Duration = Duration::from_millis(200);

/// How long the client waits for an answer before it calls the server stuck.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Server log lines kept to show when something goes wrong.
const LOG_TAIL_LINES: usize = 40;

/// Targets of the project, quoted in the table.
const TARGET_C1_RATIO: f64 = 1.2;
/// Throughput at concurrency 8 as a share of raw spawns in the same rounds (issue 12).
const TARGET_C8_SHARE: f64 = 0.9;
const TARGET_RSS_IDLE_MIB: f64 = 5.0;
const TARGET_RSS_INSTANCES_MIB: f64 = 15.0;

/// Throughput of the original Python service at concurrency 8, for reference.
const PYTHON_C8_CMDS_PER_S: f64 = 850.0;

fn main() {
    let bench_started = Instant::now();
    // Cargo passes `--bench`; this harness takes no arguments.
    let extra_args: Vec<String> = std::env::var("ARSERVICE_BENCH_ARGS")
        .map(|args| args.split_whitespace().map(String::from).collect())
        .unwrap_or_default();

    let server = Server::start(&extra_args);
    // The first answer means the worker pools exist; give their threads a moment to start.
    let mut conn = Connection::open(server.port);
    thread::sleep(SETTLE);
    let rss_idle = server.memory();
    eprintln!(
        "server pid {} on port {}: {rss_idle}",
        server.pid(),
        server.port
    );

    // Concurrency 1: raw, then server, each as one block of ITERATIONS.
    conn.start_local("bench-0");
    for _ in 0..WARMUP {
        raw_spawn();
        conn.exec_true("bench-0");
        conn.exec_unknown();
    }
    let raw_c1 = Latencies::new((0..ITERATIONS).map(|_| raw_spawn()).collect());
    let mut in_spawn = Vec::with_capacity(ITERATIONS);
    let server_c1 = Latencies::new(
        (0..ITERATIONS)
            .map(|_| {
                let round_trip = conn.exec_true("bench-0");
                in_spawn.push(conn.last_duration);
                round_trip
            })
            .collect(),
    );
    let in_spawn = Latencies::new(in_spawn);
    let http_only = Latencies::new((0..ITERATIONS).map(|_| conn.exec_unknown()).collect());
    eprintln!("c=1 blocks done");

    // The same comparison in rounds, raw and server alternating command by command, so that a
    // slow phase of the machine hits both sides alike.
    // The server's spawn helper called in this process joins them: what a command costs
    // without HTTP and the request's work.
    let groups = ProcessGroups::default();
    let mut helper_rounds = Vec::new();
    let rounds: Vec<Pair<Latencies>> = (0..ROUNDS)
        .map(|_| {
            let (mut raw, mut served, mut helper) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..ROUND_ITERATIONS {
                raw.push(raw_spawn());
                served.push(conn.exec_true("bench-0"));
                helper.push(helper_spawn(&groups));
            }
            helper_rounds.push(Latencies::new(helper));
            Pair {
                raw: Latencies::new(raw),
                server: Latencies::new(served),
            }
        })
        .collect();
    eprintln!("interleaved rounds done");

    // Concurrency 8, raw and server alternating round by round.
    let mut raw_ops: Vec<Operation> = (0..THREADS).map(|_| Box::new(raw_spawn) as _).collect();
    let mut server_ops: Vec<Operation> = (1..=THREADS)
        .map(|index| {
            let run_id = format!("bench-{index}");
            // One after the other: see `Connection::open`.
            let mut conn = Connection::open(server.port);
            conn.start_local(&run_id);
            Box::new(move || conn.exec_true(&run_id)) as _
        })
        .collect();
    (raw_ops, _) = together(raw_ops, PER_THREAD_WARMUP);
    (server_ops, _) = together(server_ops, PER_THREAD_WARMUP);
    let mut c8_rounds = Vec::new();
    for _ in 0..C8_ROUNDS {
        let (ops, raw) = together(raw_ops, PER_THREAD / C8_ROUNDS);
        raw_ops = ops;
        let (ops, served) = together(server_ops, PER_THREAD / C8_ROUNDS);
        server_ops = ops;
        c8_rounds.push(Pair {
            raw,
            server: served,
        });
    }
    drop((raw_ops, server_ops));
    eprintln!("c=8 done");
    let rss_after_exec = server.memory();

    // Memory with many instances, on the same (warmed-up) server.
    for index in 0..=THREADS {
        conn.close(&format!("bench-{index}"));
    }
    let start_timing = many(
        server.port,
        "rss",
        RSS_INSTANCES,
        "start",
        |conn, run_id| conn.start_local(run_id),
    );
    let rss_instances = server.memory();
    let close_timing = many(
        server.port,
        "rss",
        RSS_INSTANCES,
        "close",
        |conn, run_id| conn.close(run_id),
    );
    let rss_closed = server.memory();
    let many_start = many(
        server.port,
        "many",
        MANY_INSTANCES,
        "start",
        |conn, run_id| conn.start_local(run_id),
    );
    let many_close = many(
        server.port,
        "many",
        MANY_INSTANCES,
        "close",
        |conn, run_id| conn.close(run_id),
    );
    many(
        server.port,
        "ran",
        RAN_INSTANCES,
        "start",
        |conn, run_id| {
            conn.start_local(run_id);
            conn.exec_true(run_id);
        },
    );
    let ran_close = many(
        server.port,
        "ran",
        RAN_INSTANCES,
        "close",
        |conn, run_id| conn.close(run_id),
    );
    eprintln!("start/close done");
    let reconnects = conn.reconnects;
    drop(conn);
    drop(server);

    // The table.
    let server_args = if extra_args.is_empty() {
        String::from("default flags")
    } else {
        extra_args.join(" ")
    };
    println!();
    println!(
        "exec benchmark (N={ITERATIONS}, {} cores, server {server_args}{}, medians)",
        thread::available_parallelism().map_or(0, |n| n.get()),
        std::env::var("MALLOC_ARENA_MAX")
            .map(|max| format!(", MALLOC_ARENA_MAX={max}"))
            .unwrap_or_default()
    );
    println!("                             p50 ms   p99 ms     cmds/s");
    row("raw spawn sh -c true", &raw_c1, None);
    row("arservice c=1", &server_c1, None);
    row("  of which in spawn::run", &in_spawn, None);
    row("  HTTP only (404 exec)", &http_only, None);
    let c1_ratio = server_c1.p50 / raw_c1.p50;
    note(format!(
        "ratio p50 {c1_ratio:.2}x (target <= {TARGET_C1_RATIO}x) {}",
        verdict(c1_ratio <= TARGET_C1_RATIO)
    ));
    let round_ratio = median(rounds.iter().map(|r| r.server.p50 / r.raw.p50).collect());
    println!(
        "interleaved raw ({ROUNDS}x{ROUND_ITERATIONS}) {:>8.3}           round p50s {}",
        median(rounds.iter().map(|r| r.raw.p50).collect()),
        list(rounds.iter().map(|r| r.raw.p50))
    );
    println!(
        "interleaved arservice       {:>8.3}           round p50s {}",
        median(rounds.iter().map(|r| r.server.p50).collect()),
        list(rounds.iter().map(|r| r.server.p50))
    );
    note(format!(
        "median of round ratios {round_ratio:.2}x (target <= {TARGET_C1_RATIO}x) {}",
        verdict(round_ratio <= TARGET_C1_RATIO)
    ));
    println!(
        "interleaved spawn helper    {:>8.3}           round p50s {} (in this process, no server)",
        median(helper_rounds.iter().map(|r| r.p50).collect()),
        list(helper_rounds.iter().map(|r| r.p50))
    );
    note(format!(
        "spawn helper alone: median of round ratios {:.2}x raw; the server over the helper {:.2}x",
        median(
            helper_rounds
                .iter()
                .zip(&rounds)
                .map(|(helper, round)| helper.p50 / round.raw.p50)
                .collect()
        ),
        median(
            helper_rounds
                .iter()
                .zip(&rounds)
                .map(|(helper, round)| round.server.p50 / helper.p50)
                .collect()
        ),
    ));
    let raw_c8 = Concurrent::merge(c8_rounds.iter().map(|r| &r.raw));
    let server_c8 = Concurrent::merge(c8_rounds.iter().map(|r| &r.server));
    row("raw spawn c=8", &raw_c8.latencies, Some(raw_c8.per_second));
    row(
        "arservice c=8",
        &server_c8.latencies,
        Some(server_c8.per_second),
    );
    let c8_share = median(
        c8_rounds
            .iter()
            .map(|r| r.server.per_second / r.raw.per_second)
            .collect(),
    );
    note(format!(
        "round rates raw {} / arservice {}",
        list(c8_rounds.iter().map(|r| r.raw.per_second)),
        list(c8_rounds.iter().map(|r| r.server.per_second)),
    ));
    note(format!(
        "median share {:.0}% of raw (target >= {:.0}%) {}; original Python ~{PYTHON_C8_CMDS_PER_S}/s",
        100.0 * c8_share,
        100.0 * TARGET_C8_SHARE,
        verdict(c8_share >= TARGET_C8_SHARE),
    ));
    println!(
        "RSS idle                     {rss_idle} (target <= {TARGET_RSS_IDLE_MIB}) {}",
        verdict(rss_idle.rss_mib <= TARGET_RSS_IDLE_MIB)
    );
    println!("RSS after the exec runs      {rss_after_exec}");
    println!(
        "RSS {RSS_INSTANCES} instances           {rss_instances} (target <= {TARGET_RSS_INSTANCES_MIB}) {}",
        verdict(rss_instances.rss_mib <= TARGET_RSS_INSTANCES_MIB)
    );
    println!("RSS after closing them       {rss_closed}");
    let rate = |count: usize, took: Duration| count as f64 / took.as_secs_f64();
    println!(
        "start {RSS_INSTANCES} instances at c={THREADS}: {:.0}/s; close them: {:.0}/s",
        rate(RSS_INSTANCES, start_timing),
        rate(RSS_INSTANCES, close_timing),
    );
    let (start_rate, close_rate) = (
        rate(MANY_INSTANCES, many_start),
        rate(MANY_INSTANCES, many_close),
    );
    println!(
        "start {MANY_INSTANCES} instances at c={THREADS}: {start_rate:.0}/s; close them: {close_rate:.0}/s \
         (target: close >= start) {}",
        verdict(close_rate >= start_rate)
    );
    println!(
        "close {RAN_INSTANCES} instances that ran one command each, at c={THREADS}: {:.0}/s",
        rate(RAN_INSTANCES, ran_close)
    );
    println!(
        "client reconnects on the c=1 connection: {reconnects}; whole bench {:.1} s",
        bench_started.elapsed().as_secs_f64()
    );
}

/// The same measurement of the raw baseline and of the server, taken side by side.
struct Pair<T> {
    raw: T,
    server: T,
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "MISSED"
    }
}

fn row(name: &str, latencies: &Latencies, per_second: Option<f64>) {
    let per_second = per_second.map_or_else(|| "-".to_string(), |rate| format!("{rate:.0}"));
    println!(
        "{name:<27}{:>8.3} {:>8.3} {per_second:>10}",
        latencies.p50, latencies.p99
    );
}

/// A remark under the row above it.
fn note(text: String) {
    println!("{:>29}{text}", "");
}

fn list(values: impl Iterator<Item = f64>) -> String {
    values
        .map(|value| {
            if value >= 100.0 {
                format!("{value:.0}")
            } else {
                format!("{value:.3}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One `sh -c true`, spawned the fastest way a process can: `posix_spawn` (vfork-like) called
/// directly, as std does in a dynamically linked binary, with the server's stdio (stdin null,
/// stdout and stderr into one pipe) and its own process group. Not through std: in this static
/// benchmark binary std would `fork`, and the baseline would flatter the server. Returns how
/// long it took.
fn raw_spawn() -> Duration {
    use std::os::fd::AsRawFd;
    let started = Instant::now();
    let (mut reader, writer) = io::pipe().expect("cannot create a pipe");
    let fd = writer.as_raw_fd();
    let mut pid: libc::pid_t = 0;
    // SAFETY: the file actions and attributes are initialised before use and destroyed after;
    // every pointer refers to a local that outlives the call.
    let code = unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        libc::posix_spawn_file_actions_init(&mut actions);
        libc::posix_spawnattr_init(&mut attr);
        libc::posix_spawn_file_actions_addopen(
            &mut actions,
            0,
            c"/dev/null".as_ptr(),
            libc::O_RDONLY,
            0,
        );
        libc::posix_spawn_file_actions_adddup2(&mut actions, fd, 1);
        libc::posix_spawn_file_actions_adddup2(&mut actions, fd, 2);
        libc::posix_spawnattr_setpgroup(&mut attr, 0);
        libc::posix_spawnattr_setflags(&mut attr, libc::POSIX_SPAWN_SETPGROUP as _);
        let argv = [
            c"sh".as_ptr(),
            c"-c".as_ptr(),
            c"true".as_ptr(),
            std::ptr::null(),
        ];
        let envp = [c"PATH=/usr/bin:/bin".as_ptr(), std::ptr::null()];
        let code = libc::posix_spawn(
            &mut pid,
            c"/bin/sh".as_ptr(),
            &actions,
            &attr,
            argv.as_ptr() as *const *mut libc::c_char,
            envp.as_ptr() as *const *mut libc::c_char,
        );
        libc::posix_spawnattr_destroy(&mut attr);
        libc::posix_spawn_file_actions_destroy(&mut actions);
        code
    };
    assert_eq!(
        code,
        0,
        "posix_spawn sh: {}",
        io::Error::from_raw_os_error(code)
    );
    // Our write end must go, or the read below never sees end-of-file.
    drop(writer);
    let mut output = Vec::new();
    reader
        .read_to_end(&mut output)
        .expect("cannot read the pipe");
    let mut status = 0;
    // SAFETY: waitpid on the child just spawned, with a pointer to a local.
    let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        reaped == pid && status == 0 && output.is_empty(),
        "sh -c true: status {status}"
    );
    started.elapsed()
}

/// The same `sh -c true` through the server's spawn helper ([`spawn::run`]), called in this
/// process as the `local` environment calls it (environment cleared but for `PATH`, output
/// capped, a timeout). Returns how long it took.
fn helper_spawn(groups: &ProcessGroups) -> Duration {
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", "true"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    let limits = Limits {
        timeout: Duration::from_secs(30),
        max_output_bytes: 1 << 20,
    };
    let started = Instant::now();
    let result = spawn::run(command, None, limits, groups, None).expect("spawn helper: sh");
    let elapsed = started.elapsed();
    assert!(
        result.returncode == 0 && result.output.is_empty(),
        "sh -c true through the spawn helper: {result:?}"
    );
    elapsed
}

/// Percentiles of one measurement, in milliseconds.
struct Latencies {
    p50: f64,
    p99: f64,
}

impl Latencies {
    fn new(mut samples: Vec<Duration>) -> Latencies {
        assert!(!samples.is_empty());
        samples.sort_unstable();
        let at = |quantile: f64| {
            let index = ((samples.len() as f64 * quantile).ceil() as usize).max(1) - 1;
            samples[index].as_secs_f64() * 1000.0
        };
        Latencies {
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The outcome of a concurrent run.
struct Concurrent {
    samples: Vec<Duration>,
    elapsed: Duration,
    per_second: f64,
}

/// Several concurrent runs taken as one.
struct Merged {
    latencies: Latencies,
    per_second: f64,
}

impl Concurrent {
    fn merge<'a>(runs: impl Iterator<Item = &'a Concurrent>) -> Merged {
        let (mut samples, mut elapsed) = (Vec::new(), Duration::ZERO);
        for run in runs {
            samples.extend_from_slice(&run.samples);
            elapsed += run.elapsed;
        }
        Merged {
            per_second: samples.len() as f64 / elapsed.as_secs_f64(),
            latencies: Latencies::new(samples),
        }
    }
}

/// One timed operation of a worker thread.
type Operation = Box<dyn FnMut() -> Duration + Send>;

/// Runs each operation `count` times on a thread of its own, all starting together, and gives
/// the operations back; throughput is counted from the common start to the last thread's end.
fn together(operations: Vec<Operation>, count: usize) -> (Vec<Operation>, Concurrent) {
    let go = Arc::new(Barrier::new(operations.len() + 1));
    let workers: Vec<_> = operations
        .into_iter()
        .map(|mut operation| {
            let go = Arc::clone(&go);
            thread::spawn(move || {
                go.wait();
                let samples: Vec<_> = (0..count).map(|_| operation()).collect();
                (operation, samples)
            })
        })
        .collect();
    go.wait();
    let started = Instant::now();
    let mut operations = Vec::with_capacity(workers.len());
    let mut samples = Vec::with_capacity(workers.len() * count);
    for worker in workers {
        let (operation, done) = worker.join().expect("a benchmark thread panicked");
        operations.push(operation);
        samples.extend(done);
    }
    let elapsed = started.elapsed();
    let run = Concurrent {
        per_second: samples.len() as f64 / elapsed.as_secs_f64(),
        samples,
        elapsed,
    };
    (operations, run)
}

/// Runs `operation` on `count` run ids (`<prefix>-0`, ...) from `THREADS` connections
/// (opened one after the other); returns the wall time.
fn many(
    port: u16,
    prefix: &'static str,
    count: usize,
    what: &str,
    operation: fn(&mut Connection, &str),
) -> Duration {
    let connections: Vec<_> = (0..THREADS).map(|_| Connection::open(port)).collect();
    let started = Instant::now();
    let workers: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(index, mut conn)| {
            thread::spawn(move || {
                for n in (index..count).step_by(THREADS) {
                    operation(&mut conn, &format!("{prefix}-{n}"));
                }
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .unwrap_or_else(|_| panic!("a thread of {what} panicked"));
    }
    started.elapsed()
}

/// What `/proc/PID/status` says about the server.
#[derive(Clone, Copy)]
struct Memory {
    rss_mib: f64,
    peak_mib: f64,
    threads: u64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MiB (peak {:.1} MiB, {} threads)",
            self.rss_mib, self.peak_mib, self.threads
        )
    }
}

/// The real server binary on port 0 with a fresh state dir; killed on drop.
struct Server {
    child: Child,
    port: u16,
    state_dir: PathBuf,
    /// The server's log: a file, as for a user who sends it to one. A pipe would put a
    /// reader thread of this process (a wake-up per access-log line) on the machine's two
    /// cores beside the server it measures.
    log: PathBuf,
}

impl Server {
    fn start(extra_args: &[String]) -> Server {
        let state_dir =
            std::env::temp_dir().join(format!("arservice-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let log = std::env::temp_dir().join(format!("arservice-bench-{}.log", std::process::id()));
        let log_file = std::fs::File::create(&log)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", log.display()));
        let max_resources = json!({ "instances": MANY_INSTANCES }).to_string();
        // `ARSERVICE_BENCH_BIN` runs another build (a "before" binary) under the same harness.
        let binary = std::env::var_os("ARSERVICE_BENCH_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_arservice")),
            PathBuf::from,
        );
        let child = Command::new(binary)
            .args(["--runner", "local", "--port", "0", "--log-level", "info"])
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--max-resources", &max_resources])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("cannot start arservice");
        let mut server = Server {
            child,
            port: 0,
            state_dir,
            log,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        server.port = loop {
            let text = std::fs::read_to_string(&server.log).unwrap_or_default();
            if let Some(port) = text.lines().find_map(listening_port) {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "arservice printed no listening line in {START_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(10));
        };
        server
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn memory(&self) -> Memory {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{path}: {err}"));
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("{path} has no {name}"))
        };
        Memory {
            rss_mib: field("VmRSS:") as f64 / 1024.0,
            peak_mib: field("VmHWM:") as f64 / 1024.0,
            threads: field("Threads:"),
        }
    }
}

/// The port of a line like `arservice 0.1.0 listening on http://127.0.0.1:PORT (...)`.
fn listening_port(line: &str) -> Option<u16> {
    let address = line.split("listening on http://").nth(1)?;
    let port = address.split(':').nth(1)?;
    port.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state_dir);
        if thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("---- last lines of the arservice log ----");
            for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                eprintln!("{line}");
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A keep-alive HTTP/1.1 connection: one request at a time, bodies with `Content-Length`.
struct Connection {
    port: u16,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    request: Vec<u8>,
    line: String,
    /// Times the server closed the connection and a new one had to be opened.
    reconnects: usize,
    must_reconnect: bool,
    /// `duration_s` of the last command, as the server measured it inside its spawn helper.
    last_duration: Duration,
}

impl Connection {
    /// Connects and waits for one answer (`GET /healthz`) before returning.
    ///
    /// Never open several connections at once: tiny_http 0.12's connection pool
    /// (`util/task_pool.rs`) can queue a new connection's task behind an idle thread that a
    /// second connection then takes, and with keep-alive connections that never end the queued
    /// one is not served until another connection closes. The first version of this bench hung
    /// there with 9 connections opened from 8 threads at once.
    fn open(port: u16) -> Connection {
        let (reader, writer) = Connection::connect(port);
        let mut conn = Connection {
            port,
            reader,
            writer,
            request: Vec::new(),
            line: String::new(),
            reconnects: 0,
            must_reconnect: false,
            last_duration: Duration::ZERO,
        };
        let (status, answer) = conn.send("GET", "/healthz", "");
        assert_eq!(
            status,
            200,
            "GET /healthz: {}",
            String::from_utf8_lossy(&answer)
        );
        conn
    }

    fn connect(port: u16) -> (BufReader<TcpStream>, TcpStream) {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("cannot connect to arservice");
        stream.set_nodelay(true).expect("cannot set TCP_NODELAY");
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .expect("cannot set a read timeout");
        let reader = BufReader::new(stream.try_clone().expect("cannot clone the socket"));
        (reader, stream)
    }

    /// Sends one request and returns the status and body.
    fn send(&mut self, method: &str, path: &str, body: &str) -> (u16, Vec<u8>) {
        if self.must_reconnect {
            (self.reader, self.writer) = Connection::connect(self.port);
            self.reconnects += 1;
            self.must_reconnect = false;
        }
        self.request.clear();
        write!(
            self.request,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("writing to a Vec cannot fail");
        self.writer
            .write_all(&self.request)
            .unwrap_or_else(|err| panic!("{method} {path}: cannot send: {err}"));
        self.read_response(path)
            .unwrap_or_else(|err| panic!("{method} {path}: cannot read the answer: {err}"))
    }

    fn read_response(&mut self, path: &str) -> io::Result<(u16, Vec<u8>)> {
        self.line.clear();
        self.reader.read_line(&mut self.line)?;
        let status = self
            .line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("{path}: bad status line {:?}", self.line));
        let mut length = None;
        loop {
            self.line.clear();
            if self.reader.read_line(&mut self.line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let header = self.line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close")
            {
                self.must_reconnect = true;
            }
        }
        let length = length.unwrap_or_else(|| panic!("{path}: answer without Content-Length"));
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok((status, body))
    }

    /// Posts JSON and returns the answer, asserting a 200.
    fn post_ok(&mut self, path: &str, body: &Value) -> Value {
        let (status, answer) = self.send("POST", path, &body.to_string());
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(status, 200, "POST {path} {body}: {answer}");
        serde_json::from_str(&answer)
            .unwrap_or_else(|err| panic!("POST {path}: answer is not JSON ({err}): {answer}"))
    }

    fn start_local(&mut self, run_id: &str) {
        self.post_ok(
            "/start_instance",
            &json!({"run_id": run_id, "container_name": "local",
                    "environment_config": {"container_type": "local"}}),
        );
    }

    fn close(&mut self, run_id: &str) {
        self.post_ok("/close_instance", &json!({ "run_id": run_id }));
    }

    /// Runs `true` in `run_id`; times only the request and its answer, then checks the answer.
    fn exec_true(&mut self, run_id: &str) -> Duration {
        let body = json!({"run_id": run_id, "cmd": "true"}).to_string();
        let started = Instant::now();
        let (status, answer) = self.send("POST", "/execute_command", &body);
        let elapsed = started.elapsed();
        let answer: Value = serde_json::from_slice(&answer).unwrap_or_else(|err| {
            panic!(
                "execute answered {status} with non-JSON ({err}): {}",
                String::from_utf8_lossy(&answer)
            )
        });
        assert!(
            status == 200 && answer["result"]["returncode"] == 0,
            "execute `true` in {run_id} answered {status}: {answer}"
        );
        self.last_duration = answer["result"]["duration_s"]
            .as_f64()
            .map_or(Duration::ZERO, Duration::from_secs_f64);
        elapsed
    }

    /// Runs a command in an instance that does not exist: the HTTP path, routing, the work
    /// pool and the table lookup, without a spawn. Times the request and its 404.
    fn exec_unknown(&mut self) -> Duration {
        let body = json!({"run_id": "no-such-instance", "cmd": "true"}).to_string();
        let started = Instant::now();
        let (status, answer) = self.send("POST", "/execute_command", &body);
        let elapsed = started.elapsed();
        assert_eq!(
            status,
            404,
            "execute in an unknown instance: {}",
            String::from_utf8_lossy(&answer)
        );
        elapsed
    }
}
