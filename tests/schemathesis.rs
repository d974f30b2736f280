//! schemathesis (from PyPI, installed by `.ci/testbed.sh`) against the live server: every
//! operation of `/openapi.json`, with generated and mangled bodies and the stateful links
//! (start → execute → close). Checks: no 5xx, and no answer whose status, content type,
//! headers or body break the document; then the server must still be alive, with no panic in
//! its log.
//!
//! The server enables only `local` (`--container-types local`): the test bed has no registry,
//! so a generated image name would fail to pull, which is a 500 by the contract (the
//! environment failed), not a bug.

mod support;

use std::process::Command;
use support::Server;

/// The checks that say "no 5xx, and nothing that breaks the document".
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
response_schema_conformance,response_headers_conformance";

/// Generated cases per operation and phase.
const MAX_EXAMPLES: &str = "100";

fn schemathesis() -> Option<String> {
    let found = Command::new("st")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    support::require(
        found,
        "schemathesis is not installed: run `sudo bash .ci/testbed.sh` (pip install schemathesis)",
    )
    .then(|| "st".to_string())
}

#[test]
fn schemathesis_finds_no_server_error_and_no_answer_off_the_document() {
    let Some(st) = schemathesis() else {
        return;
    };
    let server = Server::start(&[
        "--container-types",
        "local",
        "--max-resources",
        r#"{"instances": 200}"#,
    ]);
    let output = Command::new(st)
        .args(["run", &format!("{}/openapi.json", server.url)])
        .args(["--checks", CHECKS, "--max-examples", MAX_EXAMPLES])
        .args(["--request-timeout", "60"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run schemathesis");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("passed"), "{report}");
    let (status, _) = server.get("/healthz");
    assert_eq!(status, 200, "the server did not survive schemathesis");
    assert!(!server.log().contains("panicked"), "{}", server.log());
    eprintln!(
        "{}",
        report.lines().rev().take(12).collect::<Vec<_>>().join("\n")
    );
}
