//! The HTTP API end to end: the real `arservice` binary on port 0 with the `local` runner and
//! environment, driven the way clients drive it.

mod support;

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::{pid_alive, wait_for, Server, TempDir};

fn local(run_id: &str) -> Value {
    json!({"run_id": run_id, "container_name": "local",
           "environment_config": {"container_type": "local"}})
}

fn detail(body: &Value) -> &str {
    assert_eq!(body["status"], "error", "not an error body: {body}");
    body["detail"].as_str().expect("detail is a string")
}

#[test]
fn every_endpoint_in_the_seed_shapes() {
    let server = Server::start(&[]);
    let (status, body) = server.get("/healthz");
    assert_eq!((status, &body), (200, &json!({"status": "ok"})));

    // The contract's sample request, with container_type local and a cwd that exists here.
    let (status, body) = server.post(
        "/start_instance",
        &json!({
            "run_id": "eval-run-001",
            "container_name": "xingyaoww/sweb.eval.x86_64.python_s_mypy-5617:latest",
            "environment_config": {
                "container_type": "local",
                "image": "xingyaoww/sweb.eval.x86_64.python_s_mypy-5617:latest",
                "resources": {"instances": 1, "cpus": 2, "memory_gb": 4},
                "cwd": "/tmp",
                "env": {"PIP_NO_INPUT": "1"},
                "forward_env": ["HF_TOKEN"],
                "timeout": 30
            }
        }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"status": "success", "instance_id": "eval-run-001"})
    );

    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "eval-run-001", "cmd": "pwd; echo $PIP_NO_INPUT"}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "success");
    let result = &body["result"];
    assert_eq!(result["output"], "/tmp\n1\n");
    assert_eq!(result["returncode"], 0);
    assert_eq!(result["timed_out"], false);
    assert_eq!(result["truncated"], false);
    assert!(result["duration_s"].as_f64().unwrap() >= 0.0);

    let (status, available) = server.get("/get_available_resources");
    assert_eq!((status, available), (200, json!({"instances": 9})));

    let (status, stats) = server.get("/stats");
    assert_eq!(status, 200);
    assert_eq!(stats["active_instances"], 1);
    assert_eq!(stats["total_instances"], 1);
    assert_eq!(stats["max_resources"], json!({"instances": 10}));
    assert_eq!(stats["allocated_resources"], json!({"instances": 1}));
    assert_eq!(stats["available_resources"], json!({"instances": 9}));
    let image = "xingyaoww/sweb.eval.x86_64.python_s_mypy-5617:latest";
    assert_eq!(stats["container_counts"], json!({image: 1}));
    let row = &stats["instances"][0];
    assert_eq!(row["run_id"], "eval-run-001");
    assert_eq!(row["container_image"], image);
    assert_eq!(row["num_cmd"], 1);
    assert!(row["updated_at"].as_f64().unwrap() >= row["created_at"].as_f64().unwrap());
    // The names of `env`, not its values, which may be secrets (tests/security.rs).
    assert_eq!(
        row["environment_config"]["env"],
        json!({"PIP_NO_INPUT": "<redacted>"})
    );

    let (status, body) = server.post("/close_instance", &json!({"run_id": "eval-run-001"}));
    assert_eq!((status, body), (200, json!({"status": "success"})));
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(available, json!({"instances": 10}));
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["instances"], json!([]));
}

#[test]
fn flattened_form_and_presets() {
    let temp = TempDir::new("presets");
    let presets = temp.path().join("environments.json");
    std::fs::write(
        &presets,
        json!({"py-local": {"container_type": "local", "timeout": 1, "env": {"P": "preset"}}})
            .to_string(),
    )
    .unwrap();
    let server = Server::start(&["--environments", presets.to_str().unwrap()]);

    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "flat", "container_image": "img:flat", "container_type": "local",
                "timeout": 5, "resources": {"instances": 2}}),
    );
    assert_eq!(status, 200, "{body}");
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(
        available,
        json!({"instances": 8}),
        "flattened resources apply"
    );

    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "pre", "container_name": "py-local",
                "environment_config": {"env": {"P": "override"}}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.exec("pre", "echo $P")["output"], "override\n");
    // The preset's timeout (1 s) still applies: only env was overridden.
    let result = server.exec("pre", "sleep 5");
    assert_eq!(result["timed_out"], true, "{result}");

    let (_, stats) = server.get("/stats?container_name=img%3Aflat");
    assert_eq!(stats["active_instances"], 1);
    assert_eq!(stats["instances"][0]["run_id"], "flat");
    let (_, stats) = server.get("/stats?run_id=pr");
    assert_eq!(stats["active_instances"], 1);
    assert_eq!(stats["total_instances"], 2);
    assert_eq!(stats["instances"][0]["run_id"], "pre");
}

/// A typo in `environment_config` (or in a flattened key) is a 400 that names the key and the
/// closest known one, and starts nothing; a key of another `container_type` says which takes it.
#[test]
fn unknown_config_keys_are_400_with_the_closest_known_key() {
    let server = Server::start(&[]);
    for (body, needles) in [
        (
            json!({"run_id": "t1", "container_name": "local",
                   "environment_config": {"container_type": "local", "imgae": "x"}}),
            vec!["'imgae'", "did you mean 'image'"],
        ),
        (
            json!({"run_id": "t2", "container_type": "local", "timout": 5}),
            vec!["'timout'", "did you mean 'timeout'"],
        ),
        (
            json!({"run_id": "t3", "container_name": "local",
                   "environment_config": {"container_type": "local", "run_args": ["--x"]}}),
            vec!["'run_args'", "docker/podman"],
        ),
        (
            json!({"run_id": "t4", "container_name": "local",
                   "environment_config": {"container_type": "local", "qqqqqqqq": 1}}),
            vec!["'qqqqqqqq'", "known keys are"],
        ),
    ] {
        let (status, answer) = server.post("/start_instance", &body);
        assert_eq!(status, 400, "{body}: {answer}");
        for needle in needles {
            assert!(detail(&answer).contains(needle), "{body}: {answer}");
        }
    }
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["total_instances"], 0, "{stats}");
    // The original's keys are still accepted, flattened or not.
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "ok", "container_image": "img:1", "container_type": "local",
                "environment_config": {"timeout": 5, "cwd": "/tmp", "env": {"K": "V"},
                                       "forward_env": ["HOME"], "resources": {"instances": 1}}}),
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn per_command_overrides_env_and_forward_env() {
    let server = Server::start_with(support::Options {
        args: vec![],
        env: vec![
            ("ARS_TEST_FORWARDED", "from-server"),
            ("ARS_TEST_HIDDEN", "secret"),
        ],
    });
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "e", "container_name": "local",
                "environment_config": {"container_type": "local", "env": {"A": "instance"},
                                        "forward_env": ["ARS_TEST_FORWARDED"]}}),
    );
    assert_eq!(status, 200, "{body}");
    let result = server.exec(
        "e",
        "echo $A; echo $ARS_TEST_FORWARDED; echo ${ARS_TEST_HIDDEN:-unset}; basename $PWD",
    );
    assert_eq!(result["output"], "instance\nfrom-server\nunset\nwork\n");

    std::fs::create_dir_all(server.state_dir.join("instances/e/work/sub")).unwrap();
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "e", "cmd": "echo $A; pwd", "cwd": "sub", "env": {"A": "command"},
                "timeout": 0.3}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body["result"]["output"]
            .as_str()
            .unwrap()
            .starts_with("command\n/"),
        "{body}"
    );
    assert!(body["result"]["output"]
        .as_str()
        .unwrap()
        .ends_with("/sub\n"));
    // The override was for that command only.
    assert_eq!(server.exec("e", "echo $A")["output"], "instance\n");

    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "e", "cmd": "true", "cwd": "/nonexistent/dir"}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("/nonexistent/dir"));
}

#[test]
fn files_persist_and_the_directory_goes_on_close() {
    let server = Server::start(&[]);
    server.start_local("files");
    server.exec("files", "echo hello > note.txt");
    assert_eq!(server.exec("files", "cat note.txt")["output"], "hello\n");
    let root = server.state_dir.join("instances/files");
    assert!(root.join("work/note.txt").is_file());
    // A read-only directory left behind must not stop the close.
    server.exec(
        "files",
        "mkdir -p ro/deep && touch ro/deep/f && chmod 500 ro ro/deep",
    );
    let (status, body) = server.post("/close_instance", &json!({"run_id": "files"}));
    assert_eq!(status, 200, "{body}");
    assert!(!root.exists(), "{} survived the close", root.display());
}

#[test]
fn stdout_and_stderr_keep_their_order_and_bad_utf8_is_replaced() {
    let server = Server::start(&[]);
    server.start_local("order");
    let result = server.exec(
        "order",
        "for i in 1 2 3; do echo out$i; echo err$i >&2; done; printf 'bad:\\377\\376:end'",
    );
    assert_eq!(
        result["output"],
        "out1\nerr1\nout2\nerr2\nout3\nerr3\nbad:\u{FFFD}\u{FFFD}:end"
    );
}

#[test]
fn timeout_kills_every_process_of_the_command() {
    let server = Server::start(&[]);
    server.start_local("slow");
    let started = Instant::now();
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "slow",
                "cmd": "sleep 300 & echo bg=$!; (trap '' TERM; sleep 300) & echo sub=$!; echo partial; sleep 300",
                "timeout": 1}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let result = &body["result"];
    assert_eq!(result["timed_out"], true);
    assert_eq!(result["returncode"], 124);
    let output = result["output"].as_str().unwrap();
    assert!(output.contains("partial"), "{output}");
    for line in output.lines().filter(|line| line.contains('=')) {
        let pid: i32 = line.split('=').nth(1).unwrap().parse().unwrap();
        wait_for(Duration::from_secs(5), &format!("pid {pid} to die"), || {
            (!pid_alive(pid)).then_some(())
        });
    }
}

#[test]
fn a_redirected_background_job_answers_at_once_and_dies_on_close() {
    let server = Server::start(&[]);
    server.start_local("bg");
    let started = Instant::now();
    let result = server.exec("bg", "sleep 100 >/dev/null 2>&1 & echo $!");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let pid: i32 = result["output"].as_str().unwrap().trim().parse().unwrap();
    assert!(
        pid_alive(pid),
        "the background job keeps running after the answer"
    );
    let (status, _) = server.post("/close_instance", &json!({"run_id": "bg"}));
    assert_eq!(status, 200);
    wait_for(Duration::from_secs(5), "the background job to die", || {
        (!pid_alive(pid)).then_some(())
    });
}

#[test]
fn output_is_capped_and_server_memory_stays_small() {
    let server = Server::start(&["--max-output-bytes", "65536"]);
    server.start_local("big");
    let result = server.exec("big", "head -c 50000000 /dev/zero | tr '\\0' a; echo END");
    assert_eq!(result["truncated"], true);
    let output = result["output"].as_str().unwrap();
    assert!(
        output.len() < 65536 + 200,
        "{} bytes came back",
        output.len()
    );
    assert!(output.starts_with("aaaa"));
    assert!(output.ends_with("aEND\n"));
    assert!(output.contains("bytes of output omitted"));
    let (_, peak_kib) = server.rss_kib();
    assert!(
        peak_kib < 40 * 1024,
        "server peaked at {peak_kib} KiB for 50 MB of output"
    );

    // A command may lower the cap, never raise it above the server's.
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "big", "cmd": "echo 0123456789", "max_output_bytes": 4}),
    );
    assert_eq!(status, 200);
    assert_eq!(body["result"]["truncated"], true);
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "big", "cmd": "true", "max_output_bytes": 1_000_000}),
    );
    assert_eq!(status, 400);
    assert!(detail(&body).contains("--max-output-bytes"));
}

#[test]
fn sixty_four_racing_starts_admit_exactly_ten() {
    let server = Server::start(&[]);
    let url = server.url.clone();
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..64)
            .map(|index| {
                let url = url.clone();
                scope.spawn(move || {
                    support::request(
                        "POST",
                        &format!("{url}/start_instance"),
                        Some(local(&format!("race-{index}")).to_string().as_bytes()),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                let (status, body) = handle.join().unwrap();
                if status == 429 {
                    assert!(detail(&body).contains("'instances'"), "{body}");
                }
                status
            })
            .collect()
    });
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        54,
        "{statuses:?}"
    );
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["allocated_resources"], json!({"instances": 10}));
    assert_eq!(stats["active_instances"], 10);
    for row in stats["instances"].as_array().unwrap() {
        let run_id = row["run_id"].as_str().unwrap();
        assert_eq!(
            server.post("/close_instance", &json!({"run_id": run_id})).0,
            200
        );
    }
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(available, json!({"instances": 10}));
    let leftovers = std::fs::read_dir(server.state_dir.join("instances"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0, "instance directories left behind");
}

#[test]
fn the_same_run_id_started_64_times_at_once_wins_once() {
    let server = Server::start(&[]);
    let url = server.url.clone();
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..64)
            .map(|_| {
                let url = url.clone();
                scope.spawn(move || {
                    support::request(
                        "POST",
                        &format!("{url}/start_instance"),
                        Some(local("same").to_string().as_bytes()),
                    )
                    .0
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap())
            .collect()
    });
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 409).count(),
        63,
        "{statuses:?}"
    );
    let (status, body) = server.post("/start_instance", &local("same"));
    assert_eq!(status, 409);
    assert!(detail(&body).contains("already in use"));
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(available, json!({"instances": 9}));
}

#[test]
fn commands_run_in_parallel_on_one_and_on_many_instances() {
    let server = Server::start(&[]);
    server.start_local("p1");
    server.start_local("p2");
    let started = Instant::now();
    std::thread::scope(|scope| {
        for run_id in ["p1", "p1", "p2", "p2"] {
            let server = &server;
            scope.spawn(move || {
                assert_eq!(
                    server.exec(run_id, "sleep 1; echo done")["output"],
                    "done\n"
                );
            });
        }
    });
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(3000),
        "four 1 s commands took {elapsed:?}"
    );
}

#[test]
fn closing_an_instance_kills_its_running_command_which_still_answers() {
    let server = Server::start(&[]);
    server.start_local("victim");
    // The command says when it has printed: `running_cmds` counts it from before its spawn,
    // and a close that came first found nothing printed yet (seen in CI).
    let marker = std::env::temp_dir().join(format!("ars-api-begun-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let cmd = format!("echo begun; touch '{}'; sleep 60", marker.display());
    std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            server.post(
                "/execute_command",
                &json!({"run_id": "victim", "cmd": cmd, "timeout": 120}),
            )
        });
        wait_for(
            Duration::from_secs(10),
            "the command to have printed",
            || marker.exists().then_some(()),
        );
        let started = Instant::now();
        let (status, body) = server.post("/close_instance", &json!({"run_id": "victim"}));
        assert_eq!(status, 200, "{body}");
        let (status, body) = running.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["result"]["returncode"], 137, "{body}");
        assert_eq!(body["result"]["output"], "begun\n");
    });
    let _ = std::fs::remove_file(&marker);
    let (status, _) = server.post(
        "/execute_command",
        &json!({"run_id": "victim", "cmd": "true"}),
    );
    assert_eq!(status, 404);
}

#[test]
fn control_routes_answer_while_every_instance_runs_a_command() {
    let server = Server::start(&[]);
    for index in 0..10 {
        server.start_local(&format!("busy-{index}"));
    }
    std::thread::scope(|scope| {
        for index in 0..10 {
            let server = &server;
            // Long enough that all ten overlap even on a loaded machine; the closes below end them.
            scope.spawn(move || {
                let (status, _) = server.post(
                    "/execute_command",
                    &json!({"run_id": format!("busy-{index}"), "cmd": "sleep 120", "timeout": 300}),
                );
                assert_eq!(status, 200);
            });
        }
        wait_for(Duration::from_secs(60), "ten running commands", || {
            let (_, stats) = server.get("/stats");
            let running: u64 = stats["instances"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| row["running_cmds"].as_u64().unwrap())
                .sum();
            (running == 10).then_some(())
        });
        let mut timings = Vec::new();
        for path in ["/stats", "/get_available_resources", "/healthz"].repeat(5) {
            let started = Instant::now();
            let (status, _) = server.get(path);
            timings.push(started.elapsed());
            assert_eq!(status, 200);
        }
        timings.sort();
        let median = timings[timings.len() / 2];
        assert!(
            median < Duration::from_millis(100),
            "median {median:?}: {timings:?}"
        );
        assert!(
            timings.iter().all(|t| *t < Duration::from_millis(500)),
            "{timings:?}"
        );
        for index in 0..10 {
            let (status, _) = server.post(
                "/close_instance",
                &json!({"run_id": format!("busy-{index}")}),
            );
            assert_eq!(status, 200);
        }
    });
}

#[test]
fn half_sent_requests_do_not_block_other_clients() {
    let server = Server::start(&[]);
    server.start_local("ok");
    let address = format!("127.0.0.1:{}", server.port);
    let mut held = Vec::new();
    for index in 0..64 {
        let mut stream = TcpStream::connect(&address).unwrap();
        let request = if index % 2 == 0 {
            // Headers complete, a large body promised and only begun.
            "POST /execute_command HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"run_id\": \"ok\", \"cmd\": \""
                .to_string()
        } else {
            // Headers cut off in the middle.
            "POST /execute_command HTTP/1.1\r\nHost: x\r\nContent-Le".to_string()
        };
        stream.write_all(request.as_bytes()).unwrap();
        held.push(stream);
    }
    let started = Instant::now();
    assert_eq!(server.exec("ok", "echo through")["output"], "through\n");
    let (status, _) = server.get("/stats");
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    drop(held);
}

#[test]
fn malformed_requests_are_400_and_change_nothing() {
    let server = Server::start(&[]);
    server.start_local("keep");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("/start_instance", b"{not json".to_vec(), "not valid JSON"),
        ("/start_instance", b"[1, 2]".to_vec(), "JSON object"),
        (
            "/start_instance",
            json!({}).to_string().into_bytes(),
            "run_id is required",
        ),
        (
            "/start_instance",
            local("../etc").to_string().into_bytes(),
            "not allowed",
        ),
        (
            "/start_instance",
            local("a b").to_string().into_bytes(),
            "not allowed",
        ),
        (
            "/start_instance",
            json!({"run_id": "x", "environment_config": {"container_type": "vm"}})
                .to_string()
                .into_bytes(),
            "unknown container_type 'vm'",
        ),
        (
            "/start_instance",
            json!({"run_id": "x", "environment_config": {"container_type": "local",
                   "resources": {"instances": -1}}})
            .to_string()
            .into_bytes(),
            "'instances'",
        ),
        (
            "/start_instance",
            json!({"run_id": "x", "environment_config": {"container_type": "local",
                   "resources": {"cpus": "two"}}})
            .to_string()
            .into_bytes(),
            "'cpus'",
        ),
        (
            "/start_instance",
            json!({"run_id": "x", "environment_config": {"container_type": "local",
                   "cwd": "/no/such/dir"}})
            .to_string()
            .into_bytes(),
            "/no/such/dir",
        ),
        (
            "/execute_command",
            json!({"run_id": "keep"}).to_string().into_bytes(),
            "cmd is required",
        ),
        (
            "/execute_command",
            json!({"run_id": "keep", "cmd": 5}).to_string().into_bytes(),
            "cmd must be a string",
        ),
        (
            "/execute_command",
            json!({"run_id": "keep", "cmd": "true", "timeout": -1})
                .to_string()
                .into_bytes(),
            "timeout",
        ),
        // Malformed beats unknown: the body is checked before any lookup.
        (
            "/execute_command",
            json!({"run_id": "nobody", "cmd": 5})
                .to_string()
                .into_bytes(),
            "cmd must be a string",
        ),
        (
            "/close_instance",
            json!({"run_id": 7}).to_string().into_bytes(),
            "run_id must be a string",
        ),
    ];
    for (path, body, needle) in cases {
        let (status, answer) = server.post_raw(path, &body);
        assert_eq!(
            status,
            400,
            "{path} {}: {answer}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            detail(&answer).contains(needle),
            "{path} {}: {answer}",
            String::from_utf8_lossy(&body)
        );
    }
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["active_instances"], 1);
    assert_eq!(stats["allocated_resources"], json!({"instances": 1}));
    assert_eq!(stats["instances"][0]["num_cmd"], 0);
    let dirs: Vec<_> = std::fs::read_dir(server.state_dir.join("instances"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(dirs, vec!["keep"]);
}

#[test]
fn status_table_404_405_409_413_429_500() {
    // A client's `executable` (the 500 for a missing CLI below) needs the operator's consent.
    let server = Server::start(&[
        "--max-resources",
        r#"{"instances": 1, "gpus": 0.5}"#,
        "--max-body-bytes",
        "4096",
        "--allow-client-host-access",
    ]);
    // 404: unknown run_id, unknown route.
    let (status, body) = server.post(
        "/execute_command",
        &json!({"run_id": "ghost", "cmd": "true"}),
    );
    assert_eq!(status, 404);
    assert!(detail(&body).contains("ghost"));
    let (status, body) = server.get("/nope");
    assert_eq!(status, 404);
    assert!(detail(&body).contains("/start_instance"));
    // 405: known route, wrong method.
    let (status, body) = server.get("/start_instance");
    assert_eq!(status, 405);
    assert!(detail(&body).contains("POST"));
    let (status, _) = server.post("/stats", &json!({}));
    assert_eq!(status, 405);
    // 413: a body over the limit.
    let big = json!({"run_id": "x", "cmd": "x".repeat(10_000)}).to_string();
    let (status, body) = server.post_raw("/execute_command", big.as_bytes());
    assert_eq!(status, 413);
    assert!(detail(&body).contains("4096"));
    // `stdin` is part of the body: bounded by the same limit.
    let fed = json!({"run_id": "x", "cmd": "cat", "stdin": "x".repeat(10_000)}).to_string();
    let (status, body) = server.post_raw("/execute_command", fed.as_bytes());
    assert_eq!(status, 413);
    assert!(detail(&body).contains("4096"));
    // 429: names the resource, what was asked and what is left.
    server.start_local("one");
    let (status, body) = server.post("/start_instance", &local("two"));
    assert_eq!(status, 429);
    assert!(
        detail(&body).contains("'instances': asked 1, 0 of 1 left"),
        "{body}"
    );
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "gpu", "environment_config": {"container_type": "local",
                "resources": {"instances": 0, "gpus": 0.75}}}),
    );
    assert_eq!(status, 429);
    assert!(detail(&body).contains("can never fit"), "{body}");
    // 409: taken run_id.
    let (status, _) = server.post("/start_instance", &local("one"));
    assert_eq!(status, 409);
    // Every instance counts one `instances` (asking for 0 does not slip past the limit): the
    // starts below need the room back.
    let (status, _) = server.post("/close_instance", &json!({"run_id": "one"}));
    assert_eq!(status, 200);
    // 400: a shell that does not exist is the request's mistake, found at start.
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "noshell", "environment_config": {"container_type": "local",
                "shell": ["/nonexistent/shell", "-c"]}}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("/nonexistent/shell"), "{body}");
    assert!(!server.state_dir.join("instances/noshell").exists());
    // 400: an image that the CLI would read as an option, or that is no image reference.
    for image in ["--privileged", "Bad Image", "."] {
        let (status, body) = server.post(
            "/start_instance",
            &json!({"run_id": "img", "container_name": image}),
        );
        assert_eq!(status, 400, "{image}: {body}");
        assert!(detail(&body).contains("image"), "{body}");
    }
    // 500 when the environment's CLI is not there at all, naming it.
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "d", "container_name": "img", "environment_config": {"container_type": "docker",
                "executable": "/nonexistent/docker"}}),
    );
    assert_eq!(status, 500, "{body}");
    assert!(detail(&body).contains("/nonexistent/docker"), "{body}");
    let (_, stats) = server.get("/stats");
    assert_eq!(
        stats["allocated_resources"],
        json!({"instances": 0, "gpus": 0})
    );
}

#[test]
fn a_start_the_journal_cannot_record_answers_500_and_leaves_nothing() {
    let server = Server::start(&[]);
    // A file where the journal directory must be: every record write fails.
    let journal = server.state_dir.join("journal");
    std::fs::remove_dir_all(&journal).unwrap();
    std::fs::write(&journal, b"").unwrap();
    let (status, body) = server.post("/start_instance", &local("unrecorded"));
    assert_eq!(status, 500, "{body}");
    assert!(
        detail(&body).contains("cannot write the journal record of unrecorded"),
        "{body}"
    );
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["total_instances"], 0, "{stats}");
    assert_eq!(stats["available_resources"], json!({"instances": 10}));
    assert!(!server.state_dir.join("instances/unrecorded").exists());
    // Once the journal can be written again, the same run_id starts.
    std::fs::remove_file(&journal).unwrap();
    std::fs::create_dir(&journal).unwrap();
    server.start_local("unrecorded");
    assert!(journal.join("unrecorded.json").is_file());
}

#[test]
fn container_types_limit_what_requests_may_start() {
    let server = Server::start(&["--container-types", "local,bwrap"]);
    let (status, body) = server.post(
        "/start_instance",
        &json!({"run_id": "d", "container_name": "busybox", "environment_config": {"container_type": "docker"}}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        detail(&body).contains("'docker' is not enabled")
            && detail(&body).contains("--container-types local,bubblewrap"),
        "{body}"
    );
    // Without docker enabled, a config without a type gets the first enabled one.
    let (status, body) = server.post("/start_instance", &json!({"run_id": "plain"}));
    assert_eq!(status, 200, "{body}");
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["instances"][0]["container_type"], "local", "{stats}");
    assert_eq!(stats["total_instances"], 1);
    // The served document offers only what is enabled.
    let (_, doc) = server.get("/openapi.json");
    let field = &doc["components"]["schemas"]["EnvironmentConfig"]["properties"]["container_type"];
    assert_eq!(field["enum"], json!(["local", "bubblewrap"]), "{field}");
    assert_eq!(field["default"], "local");
}

#[test]
fn a_failed_start_answers_500_and_leaves_nothing() {
    let server = Server::start(&[]);
    // A file where the instance's directory must go makes the environment fail to start.
    std::fs::write(server.state_dir.join("instances/blocked"), b"").unwrap();
    let (status, body) = server.post("/start_instance", &local("blocked"));
    assert_eq!(status, 500, "{body}");
    assert!(detail(&body).contains("start 'blocked' failed"), "{body}");
    let (_, available) = server.get("/get_available_resources");
    assert_eq!(available, json!({"instances": 10}));
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["total_instances"], 0);
    // The run_id is free again once the obstacle is gone.
    std::fs::remove_file(server.state_dir.join("instances/blocked")).unwrap();
    server.start_local("blocked");
}

#[test]
fn shutdown_refuses_work_kills_commands_and_closes_everything() {
    let mut server = Server::start(&["--max-resources", r#"{"instances": 200}"#]);
    let mut pids = Vec::new();
    for index in 0..40 {
        let run_id = format!("s{index}");
        server.start_local(&run_id);
        // Enough files that closing takes a moment, so the 503 can be seen.
        let result = server.exec(
            &run_id,
            "mkdir d && cd d && seq 3000 | xargs touch && sleep 100 >/dev/null 2>&1 & echo $!",
        );
        pids.push(
            result["output"]
                .as_str()
                .unwrap()
                .trim()
                .parse::<i32>()
                .unwrap(),
        );
    }
    server.start_local("running");
    let url = server.url.clone();
    let running = std::thread::spawn(move || {
        support::request(
            "POST",
            &format!("{url}/execute_command"),
            Some(
                json!({"run_id": "running", "cmd": "sleep 60", "timeout": 120})
                    .to_string()
                    .as_bytes(),
            ),
        )
    });
    wait_for(Duration::from_secs(10), "the long command to run", || {
        let (_, stats) = server.get("/stats?run_id=running");
        (stats["instances"][0]["running_cmds"] == 1).then_some(())
    });
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    let mut saw_503 = false;
    let mut saw_refused_start = false;
    let address = format!("127.0.0.1:{}", server.port);
    while server.child.try_wait().unwrap().is_none()
        && signalled.elapsed() < Duration::from_secs(10)
    {
        // The signal takes a moment to arrive; once refusing, the server never accepts again.
        if let Some(status) = raw_status(&address, "GET /healthz", "") {
            assert!(
                !(saw_503 && status == 200),
                "healthz answered 200 after a 503"
            );
            saw_503 |= status == 503;
        }
        if saw_503 {
            let start = local("late").to_string();
            if let Some(status) = raw_status(&address, "POST /start_instance", &start) {
                assert_eq!(
                    status,
                    503,
                    "a start during shutdown answered {status}\n{}",
                    server.log()
                );
                saw_refused_start = true;
            }
        }
    }
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("no exit within 10 s");
    assert!(status.success(), "exit status {status:?}\n{}", server.log());
    assert!(saw_503, "no 503 seen during shutdown\n{}", server.log());
    assert!(
        saw_refused_start,
        "no start attempted during shutdown\n{}",
        server.log()
    );
    let (status, body) = running.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["returncode"], 137);
    for pid in pids {
        wait_for(Duration::from_secs(5), "background jobs to die", || {
            (!pid_alive(pid)).then_some(())
        });
    }
    let leftovers = std::fs::read_dir(server.state_dir.join("instances"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 0);
}

/// The status of one request on a fresh connection, or `None` when the server does not answer.
fn raw_status(address: &str, request_line: &str, body: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "{request_line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

#[test]
fn a_token_guards_every_route_but_healthz() {
    let server = Server::start(&["--token", "s3cret"]);
    let (status, body) = server.get("/stats");
    assert_eq!(status, 401);
    assert!(detail(&body).contains("Authorization: Bearer"));
    let (status, _) = server.post("/start_instance", &local("t"));
    assert_eq!(status, 401);
    assert_eq!(server.get("/healthz").0, 200);
    let address = format!("127.0.0.1:{}", server.port);
    let mut stream = TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "GET /get_available_resources HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(r#"{"instances":10}"#), "{answer}");
}

#[test]
fn waiting_admission_is_first_come_first_served() {
    let server = Server::start(&["--max-resources", r#"{"instances": 1}"#]);
    server.start_local("holder");
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            let mut body = local("waiter");
            body["wait"] = json!(20);
            server.post("/start_instance", &body)
        });
        wait_for(Duration::from_secs(10), "the start to queue", || {
            let (_, stats) = server.get("/stats");
            (stats["waiting_starts"] == 1).then_some(())
        });
        // A start that does not wait cannot jump the queue.
        let (status, body) = server.post("/start_instance", &local("jumper"));
        assert_eq!(status, 429, "{body}");
        // One that waits too little gives up with a 429 naming the resource.
        let started = Instant::now();
        let mut short = local("short");
        short["wait"] = json!(0.5);
        let (status, body) = server.post("/start_instance", &short);
        assert_eq!(status, 429, "{body}");
        assert!(started.elapsed() >= Duration::from_millis(500));
        // One that could never fit is refused at once, however long it would wait.
        let started = Instant::now();
        let mut huge = local("huge");
        huge["wait"] = json!(60);
        huge["environment_config"]["resources"] = json!({"instances": 2});
        let (status, body) = server.post("/start_instance", &huge);
        assert_eq!(status, 429, "{body}");
        assert!(detail(&body).contains("can never fit"), "{body}");
        assert!(started.elapsed() < Duration::from_secs(2));

        assert_eq!(
            server
                .post("/close_instance", &json!({"run_id": "holder"}))
                .0,
            200
        );
        let (status, body) = waiter.join().unwrap();
        assert_eq!(status, 200, "{body}");
    });
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["waiting_starts"], 0);
    assert_eq!(stats["instances"][0]["run_id"], "waiter");
    assert_eq!(stats["allocated_resources"], json!({"instances": 1}));
}

#[test]
fn simultaneous_keep_alive_connections_are_all_served() {
    // Clients such as one requests.Session per training worker open their connections at
    // once and keep them open; every one must be served (tiny_http 0.12 left some queued
    // forever: vendor/tiny_http/PATCHED.md).
    let server = Server::start(&[]);
    let address = format!("127.0.0.1:{}", server.port);
    for round in 0..3 {
        let mut streams: Vec<TcpStream> = (0..16)
            .map(|_| TcpStream::connect(&address).unwrap())
            .collect();
        for (index, stream) in streams.iter_mut().enumerate() {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            for _ in 0..2 {
                write!(stream, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                let status = read_answer(stream).unwrap_or_else(|err| {
                    panic!("round {round}: connection {index} got no answer: {err}")
                });
                assert_eq!(status, 200);
            }
        }
    }
}

/// Reads one HTTP answer (status line, headers, Content-Length body) off a kept-alive stream.
fn read_answer(stream: &TcpStream) -> std::io::Result<u16> {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        if line.trim_end().is_empty() {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(status)
}
