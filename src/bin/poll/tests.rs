//! The unit tests of `poll`: rendering, cutting, fitting, reading odd `/stats`.

use super::*;
use serde_json::json;

fn view(list: bool) -> View {
    View {
        url: "http://127.0.0.1:8008".into(),
        list,
        raw: false,
        filters: Filters {
            run_id: None,
            container: None,
        },
    }
}

#[test]
fn durations_are_short() {
    assert_eq!(duration_text(0.0), "0s");
    assert_eq!(duration_text(0.25), "0s");
    assert_eq!(duration_text(42.9), "42s");
    assert_eq!(duration_text(725.0), "12m05s");
    assert_eq!(duration_text(3.0 * 3600.0 + 7.0 * 60.0), "3h07m");
    assert_eq!(duration_text(2.0 * 86400.0 + 4.0 * 3600.0 + 5.0), "2d04h");
    assert_eq!(duration_text(-1.0), "-");
    assert_eq!(duration_text(f64::NAN), "-");
}

#[test]
fn utc_dates_are_right() {
    assert_eq!(utc_text(0.0), "1970-01-01 00:00:00 UTC");
    assert_eq!(utc_text(1_717_243_200.5), "2024-06-01 12:00:00 UTC");
    assert_eq!(utc_text(951_782_400.0), "2000-02-29 00:00:00 UTC");
    assert_eq!(utc_text(-1.0), "1969-12-31 23:59:59 UTC");
}

#[test]
fn amounts_drop_needless_digits() {
    assert_eq!(amount_text(4.0), "4");
    assert_eq!(amount_text(0.5), "0.5");
    assert_eq!(amount_text(0.1 + 0.2), "0.3");
    assert_eq!(amount_text(2.25), "2.25");
    assert_eq!(amount_text(-0.0), "0");
}

#[test]
fn filters_are_percent_encoded() {
    let filters = Filters {
        run_id: Some("a b&c/d".into()),
        container: Some("img:1+é".into()),
    };
    assert_eq!(
        filters.query(),
        "?run_id=a%20b%26c%2Fd&container_name=img%3A1%2B%C3%A9"
    );
    let none = Filters {
        run_id: Some(String::new()),
        container: None,
    };
    assert_eq!(none.query(), "");
}

#[test]
fn names_are_cut_in_the_middle() {
    assert_eq!(cut_middle("eval-run-000123", 9), "eval…0123");
    assert_eq!(cut_middle("short", 9), "short");
    assert_eq!(cut_middle("abc", 1), "…");
    assert_eq!(cut_middle("abc", 0), "");
    assert_eq!(cut_end("héllo", 2), "hé");
}

#[test]
fn io_errors_read_as_words() {
    let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
    assert_eq!(io_cause(&refused), "connection refused");
    let custom = io::Error::other("Peer went away (os error 3)");
    assert_eq!(io_cause(&custom), "peer went away (os error 3)");
}

#[test]
fn dead_and_adopted_instances_are_counted() {
    let stats = json!({"active_instances": 3, "total_instances": 3, "instances_started": 1,
        "instances_adopted": 2, "instances": [{"state": "dead"}, {"state": "running"}, {}]});
    let lines = summary(&stats, &view(false), DEFAULT_WIDTH);
    assert_eq!(
        lines[1],
        "instances  3 running · 1 dead · 1 started since launch · 2 adopted after a restart"
    );
}

#[test]
fn the_model_line_shows_the_gateway_totals_and_limits() {
    assert_eq!(model_line(&json!({"instances": []})), None);
    let stats = json!({"model": {"calls": 12, "input_tokens": 3400, "output_tokens": 1200,
        "cost_usd": 0.4213, "failed_calls": 1, "limits": {"cost_usd": 10.0, "calls": null}}});
    assert_eq!(
        model_line(&stats).unwrap(),
        "model      12 calls · 3400 in / 1200 out tokens · $0.4213 · cost limit $10 · 1 failed"
    );
}

#[test]
fn the_runs_line_sums_open_and_closed_runs() {
    assert_eq!(
        runs_line(&json!({"instances": []})),
        None,
        "an older server"
    );
    let quiet = json!({"infra_failures": 0, "closed_runs": {"runs": 0}, "instances": []});
    assert_eq!(runs_line(&quiet), None, "nothing to say yet");
    let stats = json!({"infra_failures": 2,
        "closed_runs": {"runs": 3, "timeouts": 1, "cpu_s": 60.0},
        "instances": [{"commands_timed_out": 2, "cpu_s": 5.0}, {"cpu_s": null}]});
    assert_eq!(
        runs_line(&stats).unwrap(),
        "runs       3 closed · 3 timeouts · 2 infra failures · 1m05s CPU"
    );
}

#[test]
fn each_pool_has_a_line_with_what_it_holds() {
    assert!(pool_lines(&json!({"instances": []})).is_empty(), "no pools");
    let stats = json!({"pools": {
        "py311": {"size": 8, "idle": 7, "starting": 1, "taken": 120, "missed": 3,
                  "evicted": 2, "died": 0, "failed": 1,
                  "resources": {"cpus": 8, "instances": 8}},
        "sl": {"size": 2, "idle": 0, "starting": 2, "taken": 0, "missed": 0,
               "evicted": 0, "died": 0, "failed": 0, "resources": {"jobs": 2}}}});
    assert_eq!(
        pool_lines(&stats),
        vec![
            "pools      py311  7 idle, 1 starting of 8 · pooled 8 cpus, 8 instances · 120 taken, 3 missed · 2 evicted · 1 failed",
            "           sl     0 idle, 2 starting of 2 · pooled 2 jobs · 0 taken, 0 missed",
        ]
    );
}

#[test]
fn instances_lead_the_resources() {
    let stats = json!({"max_resources": {"cpus": 8, "instances": 4, "gpus": 0.5},
                       "allocated_resources": {"cpus": 2, "instances": 1},
                       "available_resources": {"gpus": 0.25}});
    let lines = resource_lines(&stats, DEFAULT_WIDTH);
    assert!(lines
        .iter()
        .all(|line| line.contains(&"░".repeat(BAR_WIDTH / 2))));
    let narrow = resource_lines(&stats, 50);
    assert!(
        narrow.iter().all(|line| line.chars().count() <= 50),
        "{narrow:#?}"
    );
    assert!(lines[0].starts_with("resources  instances"), "{lines:#?}");
    assert!(lines[1].contains("cpus") && lines[1].contains("2 / 8") && lines[1].contains("25%"));
    assert!(
        lines[2].contains("gpus") && lines[2].contains("0.25 / 0.5"),
        "{lines:#?}"
    );
}

#[test]
fn many_images_end_in_a_count() {
    let counts: serde_json::Map<String, Value> = (0..12)
        .map(|n| {
            (
                format!("image-{n:02}"),
                Value::from(if n == 7 { 5 } else { 1 }),
            )
        })
        .collect();
    let stats = json!({"container_counts": counts});
    let lines = image_lines(&stats, DEFAULT_WIDTH, IMAGE_ROWS_WITH_LIST);
    assert_eq!(lines.len(), IMAGE_ROWS_WITH_LIST + 1, "{lines:#?}");
    assert!(
        lines[0].starts_with("images") && lines[0].ends_with("5  image-07"),
        "{lines:#?}"
    );
    assert!(lines[3].ends_with("9  in 9 more images"), "{lines:#?}");
}

#[test]
fn bars_fill_by_share() {
    assert_eq!(bar_text(0.0, BAR_WIDTH), "░".repeat(BAR_WIDTH));
    assert_eq!(bar_text(1.0, BAR_WIDTH), "█".repeat(BAR_WIDTH));
    assert_eq!(
        bar_text(0.5, BAR_WIDTH)
            .chars()
            .filter(|&cell| cell == '█')
            .count(),
        BAR_WIDTH / 2
    );
}

#[test]
fn the_longest_quiet_comes_first() {
    let now = 1000.0;
    let mut rows: Vec<Row> = [
        json!({"run_id": "busy", "created_at": 100.0, "updated_at": 990.0, "num_cmd": 5}),
        json!({"run_id": "unused", "created_at": 500.0, "updated_at": null, "num_cmd": 0}),
        json!({"run_id": "idle", "created_at": 200.0, "updated_at": 300.0, "num_cmd": 1}),
    ]
    .iter()
    .map(|item| Row::of(item, now))
    .collect();
    sort_rows(&mut rows);
    let order: Vec<&str> = rows.iter().map(|row| row.run_id.as_str()).collect();
    assert_eq!(order, ["idle", "unused", "busy"]);
    assert_eq!(rows[1].state, "unused");
    assert_eq!(rows[0].state, "idle");
}

#[test]
fn missing_keys_render_as_absent() {
    for stats in [
        json!({}),
        json!({"instances": [{}], "max_resources": {"instances": "ten"}}),
        json!({"instances": null, "container_counts": [], "uptime_s": "x"}),
        json!({"instances": [{"run_id": 7, "created_at": "yesterday", "environment_config": 3}]}),
    ] {
        let lines = render(
            &stats,
            &view(true),
            Screen {
                width: 80,
                height: 20,
            },
        );
        assert!(lines.len() >= 2, "{stats}: {lines:?}");
        assert!(lines.iter().all(|line| line.chars().count() <= 80));
    }
}

#[test]
fn frames_fit_the_screen() {
    let instances: Vec<Value> = (0..50)
        .map(|n| {
            json!({"run_id": format!("run-{n:03}"), "container_image": "x".repeat(80),
                        "created_at": 0.0, "updated_at": null, "num_cmd": 0})
        })
        .collect();
    let stats = json!({"server_time": 100.0, "active_instances": 50, "instances": instances});
    for (width, height) in [(100, 40), (40, 12), (20, 5), (1, 1)] {
        let lines = render(&stats, &view(true), Screen { width, height });
        assert!(lines.len() <= height, "{width}x{height}: {lines:#?}");
        assert!(
            lines.iter().all(|line| line.chars().count() <= width),
            "{lines:#?}"
        );
    }
    let lines = render(
        &stats,
        &view(true),
        Screen {
            width: 100,
            height: 40,
        },
    );
    let last = lines.last().unwrap();
    assert!(last.contains("more instances"), "{lines:#?}");
}

#[test]
fn narrow_terminals_drop_the_least_useful_columns() {
    let rows = vec![[
        "eval-run-0001".to_string(),
        "-".to_string(),
        "xingyaoww/sweb.eval.x86_64.python_s_mypy-5617:latest".to_string(),
        "docker".to_string(),
        "3h07m".to_string(),
        "12m05s".to_string(),
        "42".to_string(),
        "idle".to_string(),
    ]];
    let all = [true; COLUMNS.len()];
    let wide = column_widths(&rows, 200, all);
    assert!(wide.iter().all(Option::is_some));
    let mut no_fork = all;
    no_fork[FORK_OF] = false;
    let without = column_widths(&rows, 200, no_fork);
    assert_eq!(without[FORK_OF], None, "a column not asked for");
    assert_eq!(without.iter().flatten().count(), COLUMNS.len() - 1);
    let narrow = column_widths(&rows, 50, all);
    assert_eq!(narrow[TYPE], None, "TYPE goes first: {narrow:?}");
    assert!(narrow[RUN_ID].is_some() && narrow[IDLE].is_some() && narrow[STATE].is_some());
    assert_eq!(
        narrow[RUN_ID],
        Some("eval-run-0001".len()),
        "the run id stays whole"
    );
    let tiny = column_widths(&rows, 10, all);
    assert_eq!(tiny.iter().flatten().count(), 1, "{tiny:?}");
}

/// A `/stats` sample of a server with a fork running a streamed command and its source a plain
/// one, as the server answers it.
fn fork_and_stream_sample() -> Value {
    json!({"server_time": 1000.0, "active_instances": 3, "total_instances": 3,
        "instances_started": 3, "instances_forked": 1, "forks_failed": 2,
        "streamed_commands": 7, "running_cmds": 3, "running_streams": 1,
        "instances": [
            {"run_id": "train-src", "container_image": "python:3.11-slim", "container_type": "local",
             "created_at": 100.0, "updated_at": 990.0, "num_cmd": 4, "running_cmds": 1,
             "running_streams": 0, "forked_from": null, "state": "running"},
            {"run_id": "train-fork", "container_image": "python:3.11-slim", "container_type": "local",
             "created_at": 200.0, "updated_at": 980.0, "num_cmd": 2, "running_cmds": 1,
             "running_streams": 1, "forked_from": "train-src", "state": "running"},
            {"run_id": "train-both", "container_image": "python:3.11-slim", "container_type": "local",
             "created_at": 300.0, "updated_at": 970.0, "num_cmd": 9, "running_cmds": 3,
             "running_streams": 1, "forked_from": "train-src", "state": "running"}]})
}

#[test]
fn forks_and_streams_show_in_the_summary_and_the_table() {
    let stats = fork_and_stream_sample();
    let lines = render(
        &stats,
        &view(true),
        Screen {
            width: 120,
            height: 40,
        },
    );
    assert_eq!(
        lines[1],
        "instances  3 running · 3 started since launch · 1 forked · 2 forks failed"
    );
    assert_eq!(
        lines[2],
        "commands   3 running · 1 streaming · 7 streamed since launch"
    );
    let header = lines
        .iter()
        .position(|line| line.starts_with("RUN ID"))
        .unwrap();
    assert!(lines[header].contains("FORK OF"), "{lines:#?}");
    let rows: Vec<Vec<&str>> = lines[header + 1..]
        .iter()
        .map(|line| {
            line.split("  ")
                .map(str::trim)
                .filter(|cell| !cell.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        rows,
        [
            [
                "train-both",
                "train-src",
                "python:3.11-slim",
                "local",
                "11m40s",
                "30s",
                "9",
                "busy 3, 1 streaming"
            ],
            [
                "train-fork",
                "train-src",
                "python:3.11-slim",
                "local",
                "13m20s",
                "20s",
                "2",
                "streaming"
            ],
            [
                "train-src",
                "-",
                "python:3.11-slim",
                "local",
                "15m00s",
                "10s",
                "4",
                "busy"
            ],
        ],
        "{lines:#?}"
    );
    let mut two = fork_and_stream_sample();
    two["instances"][1]["running_cmds"] = json!(2);
    two["instances"][1]["running_streams"] = json!(2);
    assert_eq!(Row::of(&two["instances"][1], 1000.0).state, "streaming 2");

    // The fork's source is dropped before the image on a narrow terminal, after the type.
    let narrow = instance_table(&stats, &view(true), 60, 10);
    assert!(
        !narrow[0].contains("TYPE") && !narrow[0].contains("FORK OF"),
        "{narrow:#?}"
    );
    assert!(
        narrow.iter().all(|line| line.chars().count() <= 60),
        "{narrow:#?}"
    );
}

#[test]
fn without_forks_or_streams_nothing_changes() {
    let mut stats = fork_and_stream_sample();
    for row in stats["instances"].as_array_mut().unwrap() {
        row["forked_from"] = Value::Null;
        row["running_cmds"] = json!(0);
        row["running_streams"] = json!(0);
    }
    stats["instances_forked"] = json!(0);
    stats["forks_failed"] = json!(0);
    stats["streamed_commands"] = json!(0);
    stats["running_cmds"] = json!(0);
    stats["running_streams"] = json!(0);
    assert_eq!(commands_line(&stats), None, "nothing to say");
    let lines = render(
        &stats,
        &view(true),
        Screen {
            width: 120,
            height: 40,
        },
    );
    assert_eq!(lines[1], "instances  3 running · 3 started since launch");
    assert!(
        !lines.iter().any(|line| line.contains("FORK OF")),
        "{lines:#?}"
    );
    // An older server: no sums at the top, the rows' own counts.
    let older = json!({"instances": [{"running_cmds": 2}, {"running_cmds": 1}]});
    assert_eq!(commands_line(&older).unwrap(), "commands   3 running");
}
