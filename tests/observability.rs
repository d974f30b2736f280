//! `/metrics` and `/openapi.json` on the real server: the numbers move with what happens, and
//! every documented operation answers with a status the document lists.

mod support;

use serde_json::{json, Value};
use std::io::Read;
use support::Server;

/// A GET whose body is text.
fn get_text(server: &Server, path: &str) -> (u16, String, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut response = agent.get(format!("{}{path}", server.url)).call().unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_string())
        .unwrap_or_default();
    let mut body = String::new();
    response
        .body_mut()
        .as_reader()
        .read_to_string(&mut body)
        .unwrap();
    (status, content_type, body)
}

/// The value of one sample line (`name{labels} value`).
fn sample(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(line_start))
        .unwrap_or_else(|| panic!("no {line_start} in:\n{metrics}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn metrics_follow_what_happens() {
    let server = Server::start(&["--max-resources", r#"{"instances": 4, "cpus": 2}"#]);
    server.start_local("m1");
    server.exec("m1", "true");
    server.exec("m1", "exit 3");
    let (status, _) = server.post(
        "/execute_command",
        &json!({"run_id": "m1", "cmd": "sleep 5", "timeout": 0.2}),
    );
    assert_eq!(status, 200);
    let (status, content_type, metrics) = get_text(&server, "/metrics");
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert_eq!(sample(&metrics, "arservice_commands_total "), 3.0);
    assert_eq!(sample(&metrics, "arservice_commands_timed_out_total "), 1.0);
    assert_eq!(sample(&metrics, "arservice_instances_started_total "), 1.0);
    assert_eq!(sample(&metrics, "arservice_exec_seconds_count "), 3.0);
    assert_eq!(sample(&metrics, "arservice_start_seconds_count "), 1.0);
    assert_eq!(
        sample(&metrics, "arservice_exec_seconds_bucket{le=\"+Inf\"} "),
        3.0
    );
    assert_eq!(
        sample(
            &metrics,
            "arservice_instances{container_type=\"local\",state=\"running\"} "
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "arservice_resource_allocated{resource=\"instances\"} "
        ),
        1.0
    );
    assert_eq!(
        sample(&metrics, "arservice_resource_max{resource=\"cpus\"} "),
        2.0
    );
    for line in metrics.lines().filter(|line| !line.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample line: {line}");
    }
    server.post("/close_instance", &json!({"run_id": "m1"}));
    let (_, _, metrics) = get_text(&server, "/metrics");
    assert_eq!(
        sample(
            &metrics,
            "arservice_resource_allocated{resource=\"instances\"} "
        ),
        0.0
    );
}

#[test]
fn every_documented_operation_answers_a_documented_status() {
    let server = Server::start(&[]);
    let (status, _, text) = get_text(&server, "/openapi.json");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let documented: Vec<&String> =
                operation["responses"].as_object().unwrap().keys().collect();
            let status = match method.as_str() {
                "get" => get_text(&server, path).0,
                // An empty object: a malformed request, which the document must cover.
                "post" => server.post(path, &json!({})).0,
                // An empty body to a path as documented ({run_id} is no run id).
                "put" => put_empty(&server, path),
                other => panic!("unexpected method {other}"),
            };
            assert!(
                documented.contains(&&status.to_string()),
                "{method} {path} answered {status}, documented {documented:?}"
            );
            // A method the document does not list is 405.
            let other = if operations.get("post").is_none() {
                server.post(path, &json!({})).0
            } else {
                get_text(&server, path).0
            };
            assert_eq!(other, 405, "{path}");
        }
    }
}

/// A `PUT` of an empty body to `path`: its status.
fn put_empty(server: &Server, path: &str) -> u16 {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    agent
        .put(&format!("{}{path}", server.url))
        .send(&[][..])
        .map(|response| response.status().as_u16())
        .unwrap_or_else(|err| panic!("PUT {path}: {err}"))
}
