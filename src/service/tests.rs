//! The service's lifecycle, recovery and snapshot, driven through its public methods with a
//! stub runner whose sandboxes live in memory.

use super::*;
use crate::api::ForkRequest;
use crate::env::{EnvSpec, ExecRequest};
use crate::journal::Journal;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64};

/// What a test does to the sandboxes of a [`StubRunner`].
#[derive(Default)]
struct Knobs {
    /// Every sandbox has ended on its own.
    dead: AtomicBool,
    /// `close` fails (the engine does not answer).
    close_fails: AtomicBool,
    /// Sandboxes can outlive the server (they have a journal handle).
    outlive: AtomicBool,
    /// `fork_into` fails (the copy ran out of room).
    fork_fails: AtomicBool,
    /// A streamed command waits until this opens (`true`).
    stream_gate: (parking_lot::Mutex<bool>, parking_lot::Condvar),
    /// `health` waits until this opens (`true`), once `health_blocks` is set; counted in
    /// `health_asked` (a Slurm node probe that waits for a node that stopped answering).
    health_blocks: AtomicBool,
    health_gate: (parking_lot::Mutex<bool>, parking_lot::Condvar),
    health_asked: AtomicU64,
    closes: AtomicU64,
}

struct StubRunner(Arc<Knobs>);

struct StubEnv(Arc<Knobs>);

impl Environment for StubEnv {
    fn exec(&self, request: &ExecRequest) -> Result<ExecResult, EnvError> {
        if self.0.dead.load(Ordering::SeqCst) {
            return Err(EnvError::Gone("its container was removed".into()));
        }
        if let Some(sink) = &request.sink {
            sink.send(b"streamed\n");
            let (open, opened) = &self.0.stream_gate;
            let mut open = open.lock();
            while !*open {
                opened.wait(&mut open);
            }
        }
        Ok(ExecResult {
            output: request.cmd.clone(),
            returncode: 0,
            timed_out: false,
            truncated: false,
            duration_s: 0.0,
        })
    }

    fn close(&self) -> Result<(), EnvError> {
        self.0.closes.fetch_add(1, Ordering::SeqCst);
        if self.0.close_fails.load(Ordering::SeqCst) {
            return Err(EnvError::Gone("the engine does not answer".into()));
        }
        Ok(())
    }

    fn health(&self) -> Option<String> {
        if self.0.health_blocks.load(Ordering::SeqCst) {
            self.0.health_asked.fetch_add(1, Ordering::SeqCst);
            let (open, opened) = &self.0.health_gate;
            let mut open = open.lock();
            while !*open {
                opened.wait(&mut open);
            }
        }
        self.0
            .dead
            .load(Ordering::SeqCst)
            .then(|| "its container was removed".to_string())
    }

    fn handle(&self) -> Option<Value> {
        self.0
            .outlive
            .load(Ordering::SeqCst)
            .then(|| json!({"container": "stub"}))
    }

    fn fork_into(&self, _: &InstanceContext) -> Result<crate::env::fork::ForkSeed, EnvError> {
        if self.0.fork_fails.load(Ordering::SeqCst) {
            return Err(EnvError::Io {
                context: "cannot copy the sandbox".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        Ok(crate::env::fork::ForkSeed::default())
    }
}

impl Runner for StubRunner {
    fn name(&self) -> &'static str {
        "local"
    }

    fn implicit_units(&self) -> &'static [&'static str] {
        &["instances"]
    }

    fn sweep_leftovers(&self, _: &str, _: &std::path::Path, _: &[RunId]) {}

    fn adopt(
        &self,
        _: &EnvSpec,
        _: &InstanceContext,
        handle: &Value,
    ) -> Result<Box<dyn Environment>, EnvError> {
        assert_eq!(
            handle,
            &json!({"container": "stub"}),
            "the handle comes back"
        );
        Ok(Box::new(StubEnv(Arc::clone(&self.0))))
    }

    fn start(&self, _: &EnvSpec, _: &InstanceContext) -> Result<Box<dyn Environment>, EnvError> {
        Ok(Box::new(StubEnv(Arc::clone(&self.0))))
    }
}

fn state_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ars-service-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A service with room for two instances and a stub runner, with its knobs.
fn service(state_dir: &std::path::Path) -> (Service, Arc<Knobs>) {
    let knobs = Arc::new(Knobs::default());
    let settings = Settings {
        state_dir: state_dir.to_path_buf(),
        agent: None,
        default_ttl: None,
        default_idle_timeout: None,
        server_id: "abcd1234".into(),
        max_output_bytes: 1000,
        presets: Presets::new(),
        journal: Journal::open(state_dir).unwrap(),
        container_types: None,
        allow_client_host_access: false,
        secret_env: vec!["TOKEN".into()],
        pids_limit: None,
        fork_seed: None,
        fork_timeout: crate::env::fork::FORK_TIMEOUT,
    };
    let max = crate::ledger::parse_resources(&json!({"instances": 2})).unwrap();
    let service = Service::new(
        Box::new(StubRunner(Arc::clone(&knobs))),
        Ledger::new(max),
        settings,
    );
    (service, knobs)
}

fn start(service: &Service, body: Value) -> Result<(), Error> {
    let request = StartRequest::parse(body.to_string().as_bytes(), &Presets::new(), Kind::Docker)?;
    service.start(request)
}

fn exec(service: &Service, run_id: &str) -> Result<ExecResult, Error> {
    let body = json!({"run_id": run_id, "cmd": "echo hi"});
    service.execute(ExecCommand::parse(body.to_string().as_bytes())?)
}

fn id(text: &str) -> RunId {
    RunId::parse(text, "run_id").unwrap()
}

fn local(run_id: &str) -> Value {
    json!({"run_id": run_id, "container_type": "local", "env": {"TOKEN_LIKE": "s3cret"}})
}

#[test]
fn start_execute_close() {
    let dir = state_dir("lifecycle");
    let (service, _) = service(&dir);
    start(&service, local("r1")).unwrap();
    let err = start(&service, local("r1")).unwrap_err();
    assert!(
        matches!(
            err,
            Error::RunIdInUse {
                state: "running",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(exec(&service, "r1").unwrap().output, "echo hi");
    let stats = service.stats(None, None, None);
    let row = &stats["instances"][0];
    assert_eq!(
        (row["state"].clone(), row["num_cmd"].clone()),
        (json!("running"), json!(1))
    );
    assert_eq!(row["running_cmds"], 0);
    assert_eq!(
        row["environment_config"]["env"]["TOKEN_LIKE"],
        REDACTED_IN_STATS
    );
    assert_eq!(stats["instances_started"], 1);
    assert_eq!(stats["available_resources"]["instances"], 1);
    service.close(&id("r1")).unwrap();
    assert!(service.is_empty());
    assert_eq!(service.available_resources()["instances"], 2);
    assert!(matches!(
        exec(&service, "r1"),
        Err(Error::UnknownInstance(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

const REDACTED_IN_STATS: &str = "<redacted>";

#[test]
fn refusals_take_nothing() {
    let dir = state_dir("refusals");
    let (service, _) = service(&dir);
    let secret = json!({"run_id": "r", "container_type": "local", "forward_env": ["TOKEN"]});
    assert!(matches!(start(&service, secret), Err(Error::BadRequest(_))));
    start(&service, local("a")).unwrap();
    start(&service, local("b")).unwrap();
    assert!(matches!(
        start(&service, local("c")),
        Err(Error::Insufficient(_))
    ));
    assert_eq!(service.len(), 2, "a refused start leaves no slot");
    let big = json!({"run_id": "a", "cmd": "true", "max_output_bytes": 1001});
    let err = service
        .execute(ExecCommand::parse(big.to_string().as_bytes()).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("above the server's cap"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_sandbox_that_dies_frees_its_resources_and_answers_410_until_closed() {
    let dir = state_dir("dead");
    let (service, knobs) = service(&dir);
    start(&service, local("r1")).unwrap();
    knobs.dead.store(true, Ordering::SeqCst);
    let err = exec(&service, "r1").unwrap_err();
    assert!(
        matches!(&err, Error::Gone { reason, .. } if reason.contains("removed")),
        "{err}"
    );
    assert_eq!(service.available_resources()["instances"], 2);
    assert!(matches!(exec(&service, "r1"), Err(Error::Gone { .. })));
    let stats = service.stats(None, None, None);
    assert_eq!(stats["instances"][0]["state"], "dead");
    assert_eq!(
        stats["instances"][0]["dead_reason"],
        "its container was removed"
    );
    assert_eq!(stats["instances"][0]["expires_at"], Value::Null);
    let metrics = service.metrics();
    assert!(
        metrics.contains("arservice_instances{container_type=\"local\",state=\"dead\"} 1\n"),
        "{metrics}"
    );
    let err = start(&service, local("r1")).unwrap_err();
    assert!(
        matches!(err, Error::RunIdInUse { state: "dead", .. }),
        "{err}"
    );
    service.close(&id("r1")).unwrap();
    assert!(service.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_close_that_fails_keeps_the_instance_for_a_retry() {
    let dir = state_dir("close-fails");
    let (service, knobs) = service(&dir);
    start(&service, local("r1")).unwrap();
    knobs.close_fails.store(true, Ordering::SeqCst);
    assert!(matches!(
        service.close(&id("r1")),
        Err(Error::Env {
            action: "close",
            ..
        })
    ));
    assert_eq!(
        service.stats(None, None, None)["instances"][0]["state"],
        "running"
    );
    assert_eq!(service.available_resources()["instances"], 1, "still held");
    assert_eq!(exec(&service, "r1").unwrap().returncode, 0);
    knobs.close_fails.store(false, Ordering::SeqCst);
    service.close(&id("r1")).unwrap();
    assert_eq!(knobs.closes.load(Ordering::SeqCst), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_watch_reaps_expired_instances_and_notices_dead_ones() {
    let dir = state_dir("watch");
    let (service, knobs) = service(&dir);
    start(
        &service,
        json!({"run_id": "short", "container_type": "local", "ttl": 0.001}),
    )
    .unwrap();
    start(&service, local("long")).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    for instance in service.live_instances() {
        service.watch_one(&instance, false);
    }
    let stats = service.stats(Some("short"), None, None);
    let reason = stats["instances"][0]["dead_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("reaped: its ttl of 0.001 s ran out"),
        "{reason}"
    );
    assert_eq!(
        (
            stats["active_instances"].clone(),
            stats["total_instances"].clone()
        ),
        (json!(1), json!(2))
    );
    assert_eq!(stats["instances_reaped"], 1);
    knobs.dead.store(true, Ordering::SeqCst);
    let long = service.live(&id("long")).unwrap();
    service.watch_one(&long, false);
    assert_eq!(long.state(), State::Running, "health waits for its round");
    service.watch_one(&long, true);
    assert_eq!(long.state(), State::Dead);
    assert!(service.tracked().is_empty(), "dead rows are not tracked");
    let metrics = service.metrics();
    for line in [
        "arservice_instances_reaped_total 1\n",
        "arservice_instances_died_total 1\n",
        "arservice_instances_started_total 2\n",
        "arservice_instances{container_type=\"any\",state=\"starting\"} 0\n",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_instance_that_can_outlive_the_server_is_adopted_by_the_next_life() {
    let dir = state_dir("adopt");
    let (first, knobs) = service(&dir);
    knobs.outlive.store(true, Ordering::SeqCst);
    start(&first, local("kept")).unwrap();
    start(&first, local("other-runner")).unwrap();
    let journal = Journal::open(&dir).unwrap();
    let mut records = journal.load();
    assert_eq!(records.len(), 2);
    records[1].runner = "slurm".into();
    journal.write(&records[1]).unwrap();
    // A crash: the first life is gone without closing anything.
    std::mem::forget(first);
    let (second, _) = service(&dir);
    let adopted = second.adopt_journal();
    assert_eq!(adopted, [id("kept")]);
    let stats = second.stats(None, None, None);
    assert_eq!(stats["instances"][0]["adopted"], true);
    assert_eq!(stats["instances_adopted"], 1);
    assert_eq!(
        journal.load().len(),
        1,
        "the record not adopted is forgotten"
    );
    second.sweep_leftovers(&adopted);
    second.close(&id("kept")).unwrap();
    assert!(journal.load().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stats_filters_narrow_the_rows_not_the_totals() {
    let dir = state_dir("filters");
    let (service, _) = service(&dir);
    start(
        &service,
        json!({"run_id": "a-1", "container_type": "local", "image": "py:3"}),
    )
    .unwrap();
    start(
        &service,
        json!({"run_id": "b-1", "container_type": "local", "image": "node"}),
    )
    .unwrap();
    let stats = service.stats(None, Some("py"), None);
    assert_eq!(stats["active_instances"], 1);
    assert_eq!(stats["total_instances"], 2);
    assert_eq!(stats["container_counts"], json!({"py:3": 1}));
    for key in ORIGINAL_STATS_KEYS {
        assert!(stats.get(key).is_some(), "{key}");
    }
    let ids: Vec<Value> = service.stats(Some("-1"), None, None)["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["run_id"].clone())
        .collect();
    assert_eq!(ids, [json!("a-1"), json!("b-1")], "oldest first");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A runner whose starts wait until the gate opens, as a slow `docker run` does.
struct GatedRunner(Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>);

impl Runner for GatedRunner {
    fn name(&self) -> &'static str {
        "local"
    }

    fn implicit_units(&self) -> &'static [&'static str] {
        &["instances"]
    }

    fn sweep_leftovers(&self, _: &str, _: &std::path::Path, _: &[RunId]) {}

    fn adopt(
        &self,
        _: &EnvSpec,
        _: &InstanceContext,
        _: &Value,
    ) -> Result<Box<dyn Environment>, EnvError> {
        Err(EnvError::Gone("not in this test".into()))
    }

    fn start(&self, _: &EnvSpec, _: &InstanceContext) -> Result<Box<dyn Environment>, EnvError> {
        let (open, opened) = &*self.0;
        let mut open = open.lock();
        while !*open {
            opened.wait(&mut open);
        }
        Ok(Box::new(StubEnv(Arc::new(Knobs::default()))))
    }
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_waiting_request_takes_the_room_of_pooled_sandboxes_still_starting() {
    let dir = state_dir("pool-doom");
    let gate = Arc::new((parking_lot::Mutex::new(false), parking_lot::Condvar::new()));
    let presets = json!({"p": {"container_type": "local"}});
    let settings = Settings {
        state_dir: dir.clone(),
        agent: None,
        default_ttl: None,
        default_idle_timeout: None,
        server_id: "abcd1234".into(),
        max_output_bytes: 1000,
        presets: presets.as_object().unwrap().clone(),
        journal: Journal::open(&dir).unwrap(),
        container_types: None,
        allow_client_host_access: false,
        secret_env: Vec::new(),
        pids_limit: None,
        fork_seed: None,
        fork_timeout: crate::env::fork::FORK_TIMEOUT,
    };
    let max = crate::ledger::parse_resources(&json!({"instances": 2})).unwrap();
    let mut service = Service::new(
        Box::new(GatedRunner(Arc::clone(&gate))),
        Ledger::new(max),
        settings,
    );
    let sizes = crate::api::PoolSizes::from([("p".to_string(), 2)]);
    service.configure_pools(&sizes).unwrap();
    let service = Arc::new(service);
    service.start_pools().unwrap();
    let instances = |resources: crate::ledger::Resources| resources["instances"];
    // Both pooled sandboxes reserved and starting (held at the gate): the server is full.
    wait_until("two pooled sandboxes starting", || {
        instances(service.ledger.allocated()) == crate::ledger::Amount::from_f64(2.0).unwrap()
    });
    // Without waiting, the room of sandboxes still starting cannot be given at once.
    let refused = start(
        &service,
        json!({"run_id": "now", "container_type": "local", "env": {"A": "b"}}),
    );
    assert!(
        matches!(refused, Err(Error::Insufficient(_))),
        "{refused:?}"
    );
    // A request that waits marks one to be closed when it is up, and gets its room then.
    let waiter = {
        let service = Arc::clone(&service);
        std::thread::spawn(move || {
            start(
                &service,
                json!({"run_id": "cold", "container_type": "local", "env": {"A": "b"}, "wait": 20}),
            )
        })
    };
    wait_until("a pooled sandbox marked for the waiting request", || {
        service.ledger.waiting() == 1
    });
    *gate.0.lock() = true;
    gate.1.notify_all();
    waiter
        .join()
        .unwrap()
        .expect("the waiting request got the room");
    let stats = service.stats(None, None, None);
    wait_until("one pooled sandbox idle", || {
        let pool = &service.stats(None, None, None)["pools"]["p"];
        pool["idle"] == 1 && pool["starting"] == 0
    });
    assert_eq!(
        stats["pools"]["p"]["evicted"], 1,
        "only the request that waits marks one"
    );
    assert_eq!(
        instances(service.ledger.allocated()),
        crate::ledger::Amount::from_f64(2.0).unwrap(),
        "the run and one pooled sandbox, exactly"
    );
    // A pooled start takes the idle one, and the pool cannot refill: the server is full.
    let body = json!({"run_id": "warm", "container_name": "p"});
    let request =
        StartRequest::parse(body.to_string().as_bytes(), service.presets(), Kind::Docker).unwrap();
    service.start(request).unwrap();
    assert_eq!(service.stats(None, None, None)["pools"]["p"]["taken"], 1);
    service.shutdown();
    assert_eq!(
        instances(service.ledger.allocated()),
        crate::ledger::Amount::ZERO
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn forks_and_streams_are_shown_and_counted() {
    let dir = state_dir("fork-stream");
    let (service, knobs) = service(&dir);
    let metrics_line = |name: &str| {
        let text = service.metrics();
        text.lines()
            .find(|line| line.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_string()
    };
    start(&service, local("src")).unwrap();
    let fork = |new: &str| {
        let body = json!({"run_id": "src", "new_run_id": new});
        service.fork(ForkRequest::parse(body.to_string().as_bytes()).unwrap())
    };
    knobs.fork_fails.store(true, Ordering::SeqCst);
    let err = fork("broken").unwrap_err();
    assert!(err.infra(), "{err}");
    knobs.fork_fails.store(false, Ordering::SeqCst);
    fork("copy").unwrap();
    let err = fork("copy").unwrap_err();
    assert!(!err.infra(), "a refusal is no fork failure: {err}");
    let stats = service.stats(None, None, None);
    assert_eq!(
        (&stats["instances_forked"], &stats["forks_failed"]),
        (&json!(1), &json!(1)),
        "{stats}"
    );
    let row = |stats: &Value, run_id: &str| {
        stats["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["run_id"] == run_id)
            .unwrap()
            .clone()
    };
    assert_eq!(row(&stats, "copy")["forked_from"], "src");
    assert_eq!(row(&stats, "src")["forked_from"], Value::Null);
    let sums = service.run_sums(&id("copy")).unwrap();
    assert_eq!(sums.forked_from.as_deref(), Some("src"));
    assert_eq!(
        metrics_line("arservice_forks_total"),
        "arservice_forks_total 1"
    );
    assert_eq!(
        metrics_line("arservice_fork_failures_total"),
        "arservice_fork_failures_total 1"
    );

    // A streamed command is running and streaming until it ends; a plain one only running.
    std::thread::scope(|scope| {
        let streamed = scope.spawn(|| {
            let body = json!({"run_id": "copy", "cmd": "sleep 5", "stream": true});
            let sink = crate::env::stream::OutputSink::new(|_| {});
            service.execute_to(
                ExecCommand::parse(body.to_string().as_bytes()).unwrap(),
                Some(sink),
            )
        });
        wait_until("the streamed command runs", || {
            service.stats(None, None, None)["running_streams"] == 1
        });
        let stats = service.stats(None, None, None);
        assert_eq!(row(&stats, "copy")["running_streams"], 1, "{stats}");
        assert_eq!(row(&stats, "copy")["running_cmds"], 1, "{stats}");
        assert_eq!(row(&stats, "src")["running_streams"], 0, "{stats}");
        assert_eq!(
            (&stats["running_cmds"], &stats["streamed_commands"]),
            (&json!(1), &json!(1)),
            "{stats}"
        );
        let filtered = service.stats(Some("src"), None, None);
        assert_eq!(
            filtered["running_streams"], 0,
            "the filter narrows the sums"
        );
        assert_eq!(
            metrics_line("arservice_streams_running"),
            "arservice_streams_running 1"
        );
        assert_eq!(
            metrics_line("arservice_commands_running"),
            "arservice_commands_running 1"
        );
        exec(&service, "src").unwrap();
        {
            let (open, opened) = &knobs.stream_gate;
            *open.lock() = true;
            opened.notify_all();
        }
        assert_eq!(streamed.join().unwrap().unwrap().output, "sleep 5");
    });
    let stats = service.stats(None, None, None);
    assert_eq!(
        (
            &stats["running_cmds"],
            &stats["running_streams"],
            &stats["streamed_commands"]
        ),
        (&json!(0), &json!(0), &json!(1)),
        "{stats}"
    );
    assert_eq!(
        metrics_line("arservice_streamed_commands_total"),
        "arservice_streamed_commands_total 1"
    );
    for run_id in ["copy", "src"] {
        service.close(&id(run_id)).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A service with one pool, `p` of `size` `local` stub sandboxes, started and idle.
fn pooled_service(dir: &std::path::Path, size: usize) -> (Arc<Service>, Arc<Knobs>) {
    pooled_service_with(dir, size, 3, None)
}

/// [`pooled_service`] with room for `max` instances, and takes and shutdown waiting
/// `check_wait` (when given) for a health check under way.
fn pooled_service_with(
    dir: &std::path::Path,
    size: usize,
    max: u32,
    check_wait: Option<Duration>,
) -> (Arc<Service>, Arc<Knobs>) {
    let knobs = Arc::new(Knobs::default());
    let presets = json!({"p": {"container_type": "local"}});
    let settings = Settings {
        state_dir: dir.to_path_buf(),
        agent: None,
        default_ttl: None,
        default_idle_timeout: None,
        server_id: "abcd1234".into(),
        max_output_bytes: 1000,
        presets: presets.as_object().unwrap().clone(),
        journal: Journal::open(dir).unwrap(),
        container_types: None,
        allow_client_host_access: false,
        secret_env: Vec::new(),
        pids_limit: None,
        fork_seed: None,
        fork_timeout: crate::env::fork::FORK_TIMEOUT,
    };
    let max = crate::ledger::parse_resources(&json!({"instances": max})).unwrap();
    let mut service = Service::new(
        Box::new(StubRunner(Arc::clone(&knobs))),
        Ledger::new(max),
        settings,
    );
    let sizes = crate::api::PoolSizes::from([("p".to_string(), size)]);
    service.configure_pools(&sizes).unwrap();
    if let Some(wait) = check_wait {
        service.set_check_wait(wait);
    }
    let service = Arc::new(service);
    service.start_pools().unwrap();
    wait_until("the pooled sandboxes idle", || {
        service.stats(None, None, None)["pools"]["p"]["idle"] == size
    });
    (service, knobs)
}

/// Takes from pool `p` as run `run_id`, on a thread of its own: the outcome comes on the
/// channel.
fn take_in_background(
    service: &Arc<Service>,
    run_id: &str,
) -> crossbeam_channel::Receiver<Result<(), Error>> {
    let (sent, taken) = crossbeam_channel::bounded(1);
    let service = Arc::clone(service);
    let body = json!({"run_id": run_id, "container_name": "p"});
    std::thread::spawn(move || {
        let request =
            StartRequest::parse(body.to_string().as_bytes(), service.presets(), Kind::Docker)
                .unwrap();
        let _ = sent.send(service.start(request));
    });
    taken
}

/// Starts a health round of `service` whose first check hangs until [`end_checks`] (a node
/// probe that waits); returns once that check is under way.
fn held_health_round(service: &Arc<Service>, knobs: &Knobs) -> std::thread::JoinHandle<()> {
    knobs.health_blocks.store(true, Ordering::SeqCst);
    let round = {
        let service = Arc::clone(service);
        std::thread::spawn(move || service.check_pools())
    };
    wait_until("a member being checked", || {
        knobs.health_asked.load(Ordering::SeqCst) == 1
    });
    round
}

/// Lets the checks that [`held_health_round`] holds end.
fn end_checks(knobs: &Knobs) {
    *knobs.health_gate.0.lock() = true;
    knobs.health_gate.1.notify_all();
}

#[test]
fn a_take_does_not_wait_for_a_health_check_of_another_member() {
    let dir = state_dir("pool-check");
    let (service, knobs) = pooled_service(&dir, 2);
    let pool = |key: &str| pool_stat(&service, key);
    let round = held_health_round(&service, &knobs);
    // A take meanwhile gets the other member at once, without waiting for the check.
    let taken = take_in_background(&service, "warm");
    let started = taken.recv_timeout(Duration::from_secs(10));
    if started.is_err() {
        // Let the round end, so that the failure below is reported rather than hung.
        end_checks(&knobs);
    }
    started
        .expect("the take waited for the health check of another member")
        .unwrap();
    assert_eq!(pool("taken"), 1);
    // `/stats` does not wait for the check either; the member being checked is still the
    // pool's (idle, its room held) and still tracked.
    wait_until("the refill idle", || pool("idle") == 2);
    assert!(
        service.pools.tracked().len() >= 2,
        "{:?}",
        service.pools.tracked()
    );
    assert_eq!(
        knobs.health_asked.load(Ordering::SeqCst),
        1,
        "still in the first check"
    );
    // The check ends: its member is back, idle.
    end_checks(&knobs);
    round.join().unwrap();
    wait_until("the checked member idle again", || pool("idle") == 2);
    service.shutdown();
    assert_eq!(
        service.ledger.allocated()["instances"],
        crate::ledger::Amount::ZERO,
        "everything closed at shutdown"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_take_from_a_pool_whose_only_member_is_being_checked_waits_for_the_check() {
    let dir = state_dir("pool-check-one");
    let (service, knobs) = pooled_service(&dir, 1);
    let pool = |key: &str| pool_stat(&service, key);
    let round = held_health_round(&service, &knobs);
    let taken = take_in_background(&service, "warm");
    assert!(
        taken.recv_timeout(Duration::from_millis(300)).is_err(),
        "the take waits for the check rather than start cold"
    );
    end_checks(&knobs);
    round.join().unwrap();
    taken
        .recv_timeout(Duration::from_secs(10))
        .expect("the take ends with the check")
        .unwrap();
    assert_eq!((pool("taken"), pool("missed")), (json!(1), json!(0)));
    service.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_shutdown_during_a_health_check_closes_the_member_being_checked() {
    let dir = state_dir("pool-check-shutdown");
    let (service, knobs) = pooled_service(&dir, 1);
    let round = held_health_round(&service, &knobs);
    let closes_before = knobs.closes.load(Ordering::SeqCst);
    let (sent, shut) = crossbeam_channel::bounded(1);
    {
        let service = Arc::clone(&service);
        std::thread::spawn(move || {
            service.shutdown();
            let _ = sent.send(());
        });
    }
    assert!(
        shut.recv_timeout(Duration::from_millis(300)).is_err(),
        "the shutdown waits for the check of the member it must close"
    );
    end_checks(&knobs);
    round.join().unwrap();
    shut.recv_timeout(Duration::from_secs(10))
        .expect("the shutdown ends with the check");
    assert_eq!(
        knobs.closes.load(Ordering::SeqCst),
        closes_before + 1,
        "the member that was being checked is closed, not left"
    );
    assert_eq!(
        service.ledger.allocated()["instances"],
        crate::ledger::Amount::ZERO
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// How long the tests below let a take or shutdown wait for a health check (in production
/// `CHECK_WAIT`, 10 s), and how much later than that wait they may end.
const SHORT_CHECK_WAIT: Duration = Duration::from_millis(200);
const SLACK: Duration = Duration::from_secs(5);

/// The `instances` the ledger holds now.
fn held(service: &Service) -> f64 {
    service.ledger.allocated()["instances"].as_f64()
}

/// Takes from pool `p` as `run_id` while the only member is in a health check that outlasts
/// the wait: the take waits that long, then answers (the outcome, and how long it took).
/// `key` of pool `p` in `/stats`.
fn pool_stat(service: &Service, key: &str) -> Value {
    service.stats(None, None, None)["pools"]["p"][key].clone()
}

/// A take that must get a pooled member at once (within [`SLACK`]): `why` names the member.
fn take_warm(service: &Arc<Service>, why: &str) {
    take_in_background(service, "warm")
        .recv_timeout(SLACK)
        .expect("the take answers")
        .expect(why);
}

fn take_past_the_check(service: &Arc<Service>, run_id: &str) -> (Result<(), Error>, Duration) {
    let asked = Instant::now();
    let taken = take_in_background(service, run_id);
    let outcome = taken
        .recv_timeout(SHORT_CHECK_WAIT + SLACK)
        .expect("the take gives up waiting for a check that outlasts the wait");
    let took = asked.elapsed();
    assert!(
        took >= SHORT_CHECK_WAIT,
        "the take waited for the check before starting cold ({took:?})"
    );
    (outcome, took)
}

#[test]
fn a_take_behind_a_pool_check_that_outlasts_the_wait_starts_cold_and_the_member_comes_back() {
    let dir = state_dir("pool-check-slow");
    let (service, knobs) = pooled_service_with(&dir, 1, 3, Some(SHORT_CHECK_WAIT));
    let pool = |key: &str| pool_stat(&service, key);
    let round = held_health_round(&service, &knobs);
    let (outcome, _) = take_past_the_check(&service, "cold");
    outcome.expect("the take started cold");
    assert_eq!((pool("taken"), pool("missed")), (json!(0), json!(1)));
    // The member being checked is still the pool's and holds its room; the pool is not
    // refilled for it: the run and the member, exactly.
    assert_eq!((pool("idle"), pool("starting")), (json!(1), json!(0)));
    assert_eq!(
        held(&service),
        2.0,
        "the cold run and the member being checked"
    );
    assert!(service.tracked().contains(&id("cold")));
    assert_eq!(service.pools.tracked().len(), 1, "the member being checked");
    // The check ends, the member alive: idle again, nothing started for it, nothing closed.
    let closes = knobs.closes.load(Ordering::SeqCst);
    end_checks(&knobs);
    round.join().unwrap();
    assert_eq!((pool("idle"), pool("starting")), (json!(1), json!(0)));
    assert_eq!(
        held(&service),
        2.0,
        "no double accounting when it comes back"
    );
    assert_eq!(knobs.closes.load(Ordering::SeqCst), closes);
    // The next take gets it at once.
    take_warm(&service, "the take got the member back from its check");
    assert_eq!((pool("taken"), pool("missed")), (json!(1), json!(1)));
    wait_until("the pool refilled", || pool("idle") == 1);
    assert_eq!(held(&service), 3.0, "two runs and the refill");
    service.shutdown();
    assert_eq!(held(&service), 0.0, "everything closed at shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_take_behind_a_slow_pool_check_without_room_to_start_cold_is_refused() {
    let dir = state_dir("pool-check-slow-full");
    // Room for one instance, held by the pool's only member.
    let (service, knobs) = pooled_service_with(&dir, 1, 1, Some(SHORT_CHECK_WAIT));
    let pool = |key: &str| pool_stat(&service, key);
    let round = held_health_round(&service, &knobs);
    let (outcome, _) = take_past_the_check(&service, "cold");
    // The member being checked cannot be evicted (the round holds it): no room, refused.
    assert!(
        matches!(outcome, Err(Error::Insufficient(_))),
        "{outcome:?}"
    );
    assert_eq!(
        (pool("taken"), pool("missed"), pool("evicted")),
        (json!(0), json!(1), json!(0))
    );
    assert_eq!(held(&service), 1.0, "the member being checked, only");
    assert!(service.is_empty(), "the refused run is not listed");
    end_checks(&knobs);
    round.join().unwrap();
    assert_eq!(pool("idle"), 1);
    assert_eq!(held(&service), 1.0);
    // With the check over, the next take gets the member.
    take_warm(&service, "the take got the member");
    assert_eq!(pool("taken"), 1);
    assert_eq!(held(&service), 1.0, "its room moved to the run");
    service.shutdown();
    assert_eq!(held(&service), 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_slow_pool_check_that_finds_its_member_dead_closes_and_replaces_it() {
    let dir = state_dir("pool-check-slow-dead");
    let (service, knobs) = pooled_service_with(&dir, 1, 3, Some(SHORT_CHECK_WAIT));
    let pool = |key: &str| pool_stat(&service, key);
    let round = held_health_round(&service, &knobs);
    let (outcome, _) = take_past_the_check(&service, "cold");
    outcome.expect("the take started cold");
    assert_eq!(pool("missed"), 1);
    assert_eq!(
        held(&service),
        2.0,
        "the cold run and the member being checked"
    );
    // The check ends: the member died meanwhile.
    let closes = knobs.closes.load(Ordering::SeqCst);
    knobs.dead.store(true, Ordering::SeqCst);
    end_checks(&knobs);
    round.join().unwrap();
    assert_eq!(pool("died"), 1);
    assert_eq!(
        knobs.closes.load(Ordering::SeqCst),
        closes + 1,
        "the dead member is closed"
    );
    wait_until("the replacement idle", || pool("idle") == 1);
    assert_eq!(
        held(&service),
        2.0,
        "the cold run and the replacement: the dead member's room released once"
    );
    assert_eq!((pool("taken"), pool("missed")), (json!(0), json!(1)));
    service.shutdown();
    assert_eq!(held(&service), 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_shutdown_during_a_pool_check_that_outlasts_the_wait_closes_everything() {
    let dir = state_dir("pool-check-slow-shutdown");
    let (service, knobs) = pooled_service_with(&dir, 2, 3, Some(SHORT_CHECK_WAIT));
    let round = held_health_round(&service, &knobs);
    // A run too, on the other member.
    take_warm(&service, "the take got the other member");
    wait_until("the pool refilled", || {
        service.stats(None, None, None)["pools"]["p"]["idle"] == 2
    });
    assert_eq!(held(&service), 3.0);
    let closes = knobs.closes.load(Ordering::SeqCst);
    let (sent, shut) = crossbeam_channel::bounded(1);
    let asked = Instant::now();
    {
        let service = Arc::clone(&service);
        std::thread::spawn(move || {
            service.shutdown();
            let _ = sent.send(());
        });
    }
    shut.recv_timeout(SHORT_CHECK_WAIT + SLACK)
        .expect("the shutdown gives up waiting for a check that outlasts the wait");
    assert!(
        asked.elapsed() >= SHORT_CHECK_WAIT,
        "the shutdown waited for the check"
    );
    assert_eq!(
        knobs.closes.load(Ordering::SeqCst),
        closes + 2,
        "the run and the idle member closed"
    );
    assert_eq!(held(&service), 1.0, "the member still being checked");
    // The check ends: its member is closed by the round, not made idle again.
    end_checks(&knobs);
    round.join().unwrap();
    assert_eq!(
        knobs.closes.load(Ordering::SeqCst),
        closes + 3,
        "the member whose check outlasted the shutdown's wait is closed"
    );
    assert_eq!(held(&service), 0.0, "nothing left");
    assert!(
        service.pools.tracked().is_empty(),
        "{:?}",
        service.pools.tracked()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_waiting_take_behind_a_slow_pool_check_gets_the_room_of_the_member_being_checked() {
    let dir = state_dir("pool-check-slow-wait");
    // Room for one instance, held by the pool's only member.
    let (service, knobs) = pooled_service_with(&dir, 1, 1, Some(SHORT_CHECK_WAIT));
    let pool = |key: &str| pool_stat(&service, key);
    let round = held_health_round(&service, &knobs);
    let (sent, started) = crossbeam_channel::bounded(1);
    {
        let service = Arc::clone(&service);
        let body = json!({"run_id": "cold", "container_name": "p", "wait": 20});
        std::thread::spawn(move || {
            let request =
                StartRequest::parse(body.to_string().as_bytes(), service.presets(), Kind::Docker)
                    .unwrap();
            let _ = sent.send(service.start(request));
        });
    }
    // Past the take's wait for the check, the request waits for room in the ledger.
    wait_until("the request waiting for room", || {
        service.ledger.waiting() == 1
    });
    assert_eq!((pool("missed"), pool("evicted")), (json!(1), json!(1)));
    let closes = knobs.closes.load(Ordering::SeqCst);
    end_checks(&knobs);
    round.join().unwrap();
    started
        .recv_timeout(SLACK)
        .expect("the request got the room of the member once its check ended")
        .expect("the request started cold");
    assert_eq!(
        knobs.closes.load(Ordering::SeqCst),
        closes + 1,
        "the member is closed for the request, not made idle again"
    );
    assert_eq!(held(&service), 1.0, "the run only: the pool cannot refill");
    assert_eq!((pool("idle"), pool("starting")), (json!(0), json!(0)));
    service.shutdown();
    assert_eq!(held(&service), 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}
