//! The documentation against the binary: every marked example of README.md and docs/*.md runs
//! against a fresh server and must print what the page shows; docs/api.md and the server's
//! `/openapi.json` list the same operations and request fields; every link between the pages
//! resolves, and none leaves the repository.
//!
//! How examples are marked (docs/testing.md says the same for writers):
//!
//! - A fenced block whose info string is `sh example` or `python example` runs; more words
//!   name what it needs: `docker`, `bwrap`, `slurm` (a server with `--runner slurm`) or
//!   `gateway` (a server whose upstreams `openai` and `anthropic` are a stand-in on loopback
//!   that answers what docs/gateway.md shows).
//! - In a `sh` block, each command (its lines up to a blank line or a `#` line) runs on its own
//!   with `bash`; `#` lines right after it are what it prints. Lines `#  ` (two spaces) continue
//!   the line before (a wrapped JSON answer).
//! - A block right after an example whose info string is `text output` is what the whole
//!   example prints.
//! - Before running, `:8008` becomes the test server's port (in what is shown too), the commands `arservice` and `poll`
//!   are the binaries under test, and in `docker` examples the image `busybox:latest` is the
//!   test bed's `arservice-test/busybox:latest`. Python runs with `clients/python` on its path.
//! - Matching: JSON output against the shown JSON, where `...` stands for keys or items left
//!   out (without it, an object has exactly the keys shown and an array the items shown), a
//!   string containing `...` matches any text in its place, a number with a fraction (a
//!   duration) matches any number, and a whole number only its value (`0` matches `0.0`);
//!   other output line by line, `...` matching any text in a line, and a line `...` any number
//!   of lines.
//!
//! Examples in one file share one server, in order: what one starts, a later one may use, and
//! each file closes what it starts.

mod support;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use support::Server;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The test bed's venv (`.ci/testbed.sh`), which has `requests`; else the system's python3.
const VENV_PYTHON: &str = "/var/lib/arservice-testbed/venv/bin/python";

/// The image docker examples name, and the test bed's image that stands for it.
const DOC_IMAGE: &str = "busybox:latest";
const TESTBED_IMAGE: &str = "arservice-test/busybox:latest";

/// The pages, README first, then docs/ by name.
fn pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    pages.sort();
    pages.insert(0, Path::new(ROOT).join("README.md"));
    pages
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// One fenced block: its info string, its text, and the line it starts on.
struct Block {
    info: Vec<String>,
    text: String,
    line: usize,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (number, line) in markdown.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    info: info.split_whitespace().map(String::from).collect(),
                    text: String::new(),
                    line: number + 1,
                })
            }
            (Some(_), Some(rest)) if rest.trim().is_empty() => blocks.push(open.take().unwrap()),
            (Some(block), _) => {
                block.text.push_str(line);
                block.text.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks
}

/// A runnable example: language, needs, its steps (command and expected output).
struct Example {
    place: String,
    python: bool,
    needs: Vec<String>,
    steps: Vec<(String, Option<String>)>,
}

fn examples(path: &Path) -> Vec<Example> {
    let name = path.strip_prefix(ROOT).unwrap().display().to_string();
    let markdown = read(path);
    let all = blocks(&markdown);
    let mut examples = Vec::new();
    for (index, block) in all.iter().enumerate() {
        let (language, marker) = match block.info.as_slice() {
            [language, marker, ..] => (language.as_str(), marker.as_str()),
            _ => continue,
        };
        if marker != "example" {
            continue;
        }
        let python = match language {
            "sh" => false,
            "python" => true,
            other => panic!("{name}:{}: an example in {other}", block.line),
        };
        let output = all
            .get(index + 1)
            .filter(|next| {
                next.info.first().is_some_and(|info| info == "text")
                    && next.info.get(1).is_some_and(|word| word == "output")
            })
            .map(|next| next.text.clone());
        let steps = if python {
            vec![(block.text.clone(), output)]
        } else {
            let mut steps = sh_steps(&block.text);
            if let Some(output) = output {
                steps = vec![(
                    steps
                        .iter()
                        .map(|(cmd, _)| cmd.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                    Some(output),
                )];
            }
            steps
        };
        examples.push(Example {
            place: format!("{name}:{}", block.line),
            python,
            needs: block.info[2..].to_vec(),
            steps,
        });
    }
    examples
}

/// A shell block's commands, each with the `#` lines right after it.
fn sh_steps(text: &str) -> Vec<(String, Option<String>)> {
    let mut steps: Vec<(String, Option<String>)> = Vec::new();
    let mut command = String::new();
    let mut expected: Option<String> = None;
    let mut flush = |command: &mut String, expected: &mut Option<String>| {
        if !command.trim().is_empty() {
            steps.push((std::mem::take(command), expected.take()));
        }
        command.clear();
        *expected = None;
    };
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix('#') {
            if command.trim().is_empty() {
                continue; // a comment of its own, not an output
            }
            let shown = expected.get_or_insert_with(String::new);
            match comment.strip_prefix("  ") {
                Some(more) if !shown.is_empty() => {
                    shown.push(' ');
                    shown.push_str(more);
                }
                _ => {
                    if !shown.is_empty() {
                        shown.push('\n');
                    }
                    shown.push_str(comment.strip_prefix(' ').unwrap_or(comment));
                }
            }
        } else if line.trim().is_empty() {
            flush(&mut command, &mut expected);
        } else {
            if expected.is_some() {
                flush(&mut command, &mut expected);
            }
            command.push_str(line);
            command.push('\n');
        }
    }
    flush(&mut command, &mut expected);
    steps
}

/// `...` outside strings becomes a marker key (in an object) or item (in an array), so that
/// the shown JSON parses.
const ELLIPSIS: &str = "\u{1}...";

fn pattern(shown: &str) -> Option<Value> {
    let mut out = String::new();
    let mut stack: Vec<char> = Vec::new();
    let (mut in_string, mut escaped) = (false, false);
    let chars: Vec<char> = shown.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if chars[i..].starts_with(&['.', '.', '.']) {
            match stack.last() {
                Some('{') => out.push_str("\"\\u0001...\": 0"),
                Some('[') => out.push_str("\"\\u0001...\""),
                _ => return None,
            }
            i += 3;
            continue;
        } else {
            match c {
                '"' => in_string = true,
                '{' | '[' => stack.push(c),
                '}' | ']' => {
                    stack.pop();
                }
                _ => {}
            }
            out.push(c);
        }
        i += 1;
    }
    serde_json::from_str(&out).ok()
}

/// Whether `actual` is what `shown` shows; `Err` says where it differs.
fn matches(shown: &Value, actual: &Value, at: &str) -> Result<(), String> {
    let differ = || Err(format!("at {at}: shown {shown}, got {actual}"));
    match (shown, actual) {
        (Value::Object(shown), Value::Object(actual)) => {
            let open = shown.contains_key(ELLIPSIS);
            for (key, value) in shown.iter().filter(|(key, _)| *key != ELLIPSIS) {
                match actual.get(key) {
                    Some(got) => matches(value, got, &format!("{at}.{key}"))?,
                    None => return Err(format!("at {at}: no key {key} in {actual:?}")),
                }
            }
            let extra: Vec<&String> = actual
                .keys()
                .filter(|key| !shown.contains_key(*key))
                .collect();
            if !open && !extra.is_empty() {
                return Err(format!("at {at}: keys not shown (add `...`): {extra:?}"));
            }
            Ok(())
        }
        (Value::Array(shown), Value::Array(actual)) => {
            let items: Vec<&Value> = shown
                .iter()
                .filter(|item| item.as_str() != Some(ELLIPSIS))
                .collect();
            let open = items.len() < shown.len();
            if actual.len() < items.len() || (!open && actual.len() != items.len()) {
                return Err(format!(
                    "at {at}: {} items shown, got {}",
                    items.len(),
                    actual.len()
                ));
            }
            for (index, item) in items.iter().enumerate() {
                matches(item, &actual[index], &format!("{at}[{index}]"))?;
            }
            Ok(())
        }
        (Value::String(shown), Value::String(actual)) if shown.contains("...") => {
            if text_line_matches(shown, actual) {
                Ok(())
            } else {
                differ()
            }
        }
        (Value::Number(shown), Value::Number(actual)) => {
            let volatile = !shown.is_i64() && !shown.is_u64();
            if volatile || shown.as_f64() == actual.as_f64() {
                Ok(())
            } else {
                differ()
            }
        }
        (shown, actual) if shown == actual => Ok(()),
        _ => differ(),
    }
}

/// One line against a shown line where `...` stands for any text.
fn text_line_matches(shown: &str, actual: &str) -> bool {
    let parts: Vec<&str> = shown.split("...").collect();
    if parts.len() == 1 {
        return shown == actual;
    }
    let mut rest = match actual.strip_prefix(parts[0]) {
        Some(rest) => rest,
        None => return false,
    };
    for (index, part) in parts[1..].iter().enumerate() {
        let last = index == parts.len() - 2;
        if last {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// One line of output against a shown line: as JSON when both are, else as text.
fn line_matches(shown: &str, actual: &str) -> bool {
    if let (Some(shown), Ok(actual)) = (pattern(shown), serde_json::from_str::<Value>(actual)) {
        if actual.is_object() || actual.is_array() {
            return matches(&shown, &actual, "$").is_ok();
        }
    }
    text_line_matches(shown, actual)
}

/// Lines against shown lines; a shown line `...` matches any number of lines.
fn text_matches(shown: &[&str], actual: &[&str]) -> bool {
    match shown.split_first() {
        None => actual.is_empty(),
        Some((&"...", rest)) => (0..=actual.len()).any(|skip| text_matches(rest, &actual[skip..])),
        Some((line, rest)) => {
            actual.first().is_some_and(|got| line_matches(line, got))
                && text_matches(rest, &actual[1..])
        }
    }
}

/// Checks `output` against `shown`.
fn check_output(shown: &str, output: &str) -> Result<(), String> {
    if let Ok(actual) = serde_json::from_str::<Value>(output) {
        if let Some(shown) = pattern(shown) {
            return matches(&shown, &actual, "$");
        }
    }
    let shown: Vec<&str> = shown.trim_end_matches('\n').lines().collect();
    let actual: Vec<&str> = output.trim_end_matches('\n').lines().collect();
    if text_matches(&shown, &actual) {
        Ok(())
    } else {
        Err(format!(
            "shown:\n{}\ngot:\n{}",
            shown.join("\n"),
            actual.join("\n")
        ))
    }
}

/// Whether this machine has what an example needs (in CI it must: `support::require`).
fn available(need: &str) -> bool {
    let ok = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    let ready = match need {
        "docker" => ok("docker", &["image", "inspect", TESTBED_IMAGE]),
        "bwrap" => ok("bwrap", &["--version"]),
        "slurm" => support::flavor::slurm_usable(),
        "gateway" => true,
        other => panic!("unknown need '{other}' in an example's info string"),
    };
    support::require(
        ready,
        &format!("a docs example needs {need}: run `sudo bash .ci/testbed.sh`"),
    )
}

fn python() -> String {
    let python = if Path::new(VENV_PYTHON).exists() {
        VENV_PYTHON
    } else {
        "python3"
    };
    let has_requests = Command::new(python)
        .args(["-c", "import requests"])
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        has_requests || std::env::var("CI").map_or(true, |ci| ci != "true"),
        "{python} has no requests module: run `sudo bash .ci/testbed.sh`"
    );
    python.to_string()
}

/// A directory with `arservice` and `poll` as the binaries under test, for `PATH`.
fn bin_dir() -> String {
    let arservice = Path::new(support::binary());
    arservice.parent().unwrap().display().to_string()
}

/// A stand-in for OpenAI's and Anthropic's APIs on 127.0.0.1, for the gateway's examples: the
/// answers docs/gateway.md shows, one request per connection. Its URL.
fn fake_upstream() -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split(' ').nth(1).unwrap_or("").to_string();
            let mut length = 0;
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let (kind, answer) = match (path.as_str(), body["stream"] == true) {
                ("/v1/chat/completions", _) => ("application/json", serde_json::json!({
                    "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}})
                .to_string()),
                ("/v1/messages", false) => ("application/json", serde_json::json!({
                    "id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                    "content": [{"type": "text", "text": "Hi!"}], "stop_reason": "end_turn",
                    "usage": {"input_tokens": 12, "output_tokens": 4}})
                .to_string()),
                ("/v1/messages", true) => ("text/event-stream", [
                    r#"event: message_start
data: {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-20250514", "usage": {"input_tokens": 12, "output_tokens": 1}}}"#,
                    r#"event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi!"}}"#,
                    r#"event: message_delta
data: {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}}"#,
                    "event: message_stop\ndata: {\"type\": \"message_stop\"}",
                ]
                .map(|event| format!("{event}\n\n"))
                .concat()),
                _ => ("application/json", "{}".to_string()),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    url
}

/// Runs every example of `page` against fresh servers; returns how many ran.
fn run_page(page: &str) -> usize {
    let examples = examples(&Path::new(ROOT).join(page));
    let mut servers: BTreeMap<&str, Server> = BTreeMap::new();
    let mut ran = 0;
    let path = format!(
        "{}:{}",
        bin_dir(),
        std::env::var("PATH").unwrap_or_default()
    );
    let has_curl = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    let needs_curl = examples.iter().any(|example| !example.python);
    if needs_curl
        && !support::require(
            has_curl,
            "the docs' examples need curl: run `sudo bash .ci/testbed.sh`",
        )
    {
        return 0;
    }
    for example in &examples {
        if !example.needs.iter().all(|need| available(need)) {
            continue;
        }
        let gateway = example.needs.iter().any(|need| need == "gateway");
        let runner = if gateway {
            "gateway"
        } else if example.needs.iter().any(|need| need == "slurm") {
            "slurm"
        } else {
            "local"
        };
        let server = servers.entry(runner).or_insert_with(|| match runner {
            "gateway" => {
                let upstream = fake_upstream();
                let openai = format!("openai={upstream}");
                let anthropic = format!("anthropic={upstream}");
                Server::start(&["--model-upstream", &openai, "--model-upstream", &anthropic])
            }
            runner => Server::start(&[
                "--runner",
                runner,
                "--max-resources",
                r#"{"instances": 10}"#,
            ]),
        });
        for (code, shown) in &example.steps {
            let mut code = code.replace(":8008", &format!(":{}", server.port));
            if example.needs.iter().any(|need| need == "docker") {
                code = code.replace(DOC_IMAGE, TESTBED_IMAGE);
            }
            let mut command = if example.python {
                let mut command = Command::new(python());
                command.args(["-c", &code]);
                command
            } else {
                let mut command = Command::new("bash");
                command.args(["-o", "pipefail", "-c", &code]);
                command
            };
            let output = command
                .current_dir(ROOT)
                .env("PATH", &path)
                .env("PYTHONPATH", Path::new(ROOT).join("clients/python"))
                .env_remove("ARS_TOKEN")
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|err| panic!("{}: cannot run: {err}", example.place));
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success(),
                "{}: `{}` failed ({}):\n{stdout}{stderr}\nserver log:\n{}",
                example.place,
                code.trim(),
                output.status,
                server.log()
            );
            if let Some(shown) = shown {
                let shown = shown.replace(":8008", &format!(":{}", server.port));
                if let Err(why) = check_output(&shown, &stdout) {
                    panic!(
                        "{}: `{}` printed what the page does not show: {why}",
                        example.place,
                        code.trim()
                    );
                }
            }
        }
        ran += 1;
    }
    // Each page closes what it starts: nothing is left on its servers.
    for (runner, server) in &servers {
        let (_, stats) = server.get("/stats");
        assert_eq!(
            stats["total_instances"], 0,
            "{page}: its examples left instances ({runner}): {stats}"
        );
    }
    ran
}

macro_rules! pages {
    ($($test:ident => $page:literal),* $(,)?) => {
        $(#[test] fn $test() { run_page($page); })*

        /// Every page with examples has its test above.
        #[test]
        fn every_page_with_examples_is_run() {
            let tested: BTreeSet<&str> = [$($page),*].into_iter().collect();
            for page in pages() {
                let name = page.strip_prefix(ROOT).unwrap().to_str().unwrap().to_string();
                if !examples(&page).is_empty() {
                    assert!(tested.contains(name.as_str()), "{name} has examples but no test in tests/docs.rs");
                }
            }
        }
    };
}

pages!(
    readme_examples => "README.md",
    api_examples => "docs/api.md",
    environments_examples => "docs/environments.md",
    operations_examples => "docs/operations.md",
    python_examples => "docs/python.md",
    slurm_examples => "docs/slurm.md",
    gateway_examples => "docs/gateway.md",
    cli_examples => "docs/cli.md",
);

/// The operations `(METHOD, /path)` named in the headings of docs/api.md.
fn documented_operations(api: &str) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    let mut fence = false;
    for line in api.lines() {
        if line.starts_with("```") {
            fence = !fence;
        }
        if fence || !line.starts_with('#') {
            continue;
        }
        for code in line.split('`').skip(1).step_by(2) {
            if let Some((method, path)) = code.split_once(' ') {
                if matches!(method, "GET" | "POST" | "PUT" | "DELETE" | "PATCH")
                    && path.starts_with('/')
                {
                    operations.insert((method.to_string(), path.to_string()));
                }
            }
        }
    }
    operations
}

/// The section of docs/api.md whose heading names `operation`: up to the next heading of the
/// same or a higher level.
fn section<'a>(api: &'a str, method: &str, path: &str) -> &'a str {
    let needle = format!("`{method} {path}`");
    let start = api
        .lines()
        .scan(0, |offset, line| {
            let at = *offset;
            *offset += line.len() + 1;
            Some((at, line))
        })
        .find(|(_, line)| line.starts_with('#') && line.contains(&needle))
        .map(|(at, _)| at)
        .unwrap();
    let level = api[start..].chars().take_while(|c| *c == '#').count();
    let rest = &api[start..];
    let body_start = rest.find('\n').map_or(rest.len(), |at| at + 1);
    let mut end = rest.len();
    let mut offset = body_start;
    let mut fence = false;
    for line in rest[body_start..].lines() {
        if line.starts_with("```") {
            fence = !fence;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !fence && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            end = offset;
            break;
        }
        offset += line.len() + 1;
    }
    &rest[..end]
}

/// The request fields of an operation: its parameters, and its body's properties with those of
/// objects they refer to (`environment_config`).
fn request_fields(doc: &Value, operation: &Value) -> BTreeSet<String> {
    let mut fields = BTreeSet::new();
    for parameter in operation["parameters"].as_array().into_iter().flatten() {
        fields.insert(parameter["name"].as_str().unwrap().to_string());
    }
    let resolve = |schema: &Value| -> Value {
        match schema["$ref"].as_str() {
            Some(reference) => {
                let name = reference.rsplit('/').next().unwrap();
                doc["components"]["schemas"][name].clone()
            }
            None => schema.clone(),
        }
    };
    let mut todo = vec![resolve(
        &operation["requestBody"]["content"]["application/json"]["schema"],
    )];
    let mut seen = 0;
    while let Some(schema) = todo.pop() {
        seen += 1;
        assert!(seen < 20, "schemas refer to each other too deep");
        for (name, property) in schema["properties"].as_object().into_iter().flatten() {
            fields.insert(name.clone());
            if property.get("$ref").is_some() {
                todo.push(resolve(property));
            }
        }
    }
    fields
}

#[test]
fn docs_api_and_openapi_json_agree() {
    let server = Server::start(&[]);
    let (status, doc) = server.get("/openapi.json");
    assert_eq!(status, 200);
    let api = read(&Path::new(ROOT).join("docs/api.md"));
    let documented = documented_operations(&api);
    let mut served = BTreeSet::new();
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for (method, operation) in methods.as_object().unwrap() {
            let method = method.to_uppercase();
            served.insert((method.clone(), path.clone()));
            assert!(
                documented.contains(&(method.clone(), path.clone())),
                "/openapi.json has {method} {path}; docs/api.md has no heading naming `{method} {path}`"
            );
            let text = section(&api, &method, path);
            for field in request_fields(&doc, operation) {
                assert!(
                    text.contains(&format!("`{field}`")) || text.contains(&format!("\"{field}\"")),
                    "docs/api.md, section `{method} {path}`, never names the request field `{field}`"
                );
            }
        }
    }
    for (method, path) in &documented {
        assert!(
            served.contains(&(method.clone(), path.clone())),
            "docs/api.md documents {method} {path}, which /openapi.json does not have"
        );
    }
}

/// GitHub's anchor of a heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut fence = false;
    let mut found = BTreeSet::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            fence = !fence;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !fence && hashes > 0 && line[hashes..].starts_with(' ') {
            found.insert(anchor(&line[hashes..]));
        }
    }
    found
}

#[test]
fn every_link_between_pages_resolves_inside_the_repository() {
    let root = std::fs::canonicalize(ROOT).unwrap();
    for page in pages() {
        let text = read(&page);
        let name = page.strip_prefix(ROOT).unwrap().display().to_string();
        for link in text.split("](").skip(1) {
            let target = link.split(')').next().unwrap();
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
            let resolved = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            let resolved = std::fs::canonicalize(&resolved)
                .unwrap_or_else(|_| panic!("{name}: link ({target}) names no file"));
            assert!(
                resolved.starts_with(&root),
                "{name}: link ({target}) leaves the repository"
            );
            if !fragment.is_empty() && resolved.extension().is_some_and(|ext| ext == "md") {
                assert!(
                    anchors(&read(&resolved)).contains(fragment),
                    "{name}: link ({target}): no such heading"
                );
            }
        }
    }
}

/// The matcher itself: what the pages rely on.
#[test]
fn shown_output_matching() {
    let ok = |shown: &str, actual: &str| check_output(shown, actual).is_ok();
    assert!(ok(r#"{"status":"success"}"#, r#"{"status":"success"}"#));
    assert!(!ok(
        r#"{"status":"success"}"#,
        r#"{"status":"success","extra":1}"#
    ));
    assert!(ok(
        r#"{"status":"success",...}"#,
        r#"{"status":"success","extra":1}"#
    ));
    assert!(!ok(
        r#"{"status":"success",...}"#,
        r#"{"status":"error","extra":1}"#
    ));
    assert!(ok(r#"{"d":1.003,"n":2}"#, r#"{"d":0.5,"n":2}"#));
    assert!(!ok(r#"{"d":1.003,"n":2}"#, r#"{"d":0.5,"n":3}"#));
    assert!(ok(r#"{"n":0}"#, r#"{"n":0.0}"#));
    assert!(ok(
        r#"{"a":[{"run_id":"x",...}]}"#,
        r#"{"a":[{"run_id":"x","b":1}]}"#
    ));
    assert!(!ok(
        r#"{"a":[{"run_id":"x",...}]}"#,
        r#"{"a":[{"run_id":"x"},{"run_id":"y"}]}"#
    ));
    assert!(ok(
        r#"{"a":[{"run_id":"x",...},...]}"#,
        r#"{"a":[{"run_id":"x"},{"run_id":"y"}]}"#
    ));
    assert!(ok(r#"{"o":"Python 3..."}"#, r#"{"o":"Python 3.11.2\n"}"#));
    assert!(ok(r#"{"o":"a ... c"}"#, r#"{"o":"a b c"}"#));
    assert!(ok("hello\n...\nend", "hello\n1\n2\nend\n"));
    assert!(ok("x = ...", "x = 42"));
    assert!(ok(
        "{\"a\": 1, \"b\": [2]}\n404",
        "{\"b\":[2],\"a\":1}\n404"
    ));
    assert!(!ok("{\"a\": 1}\n404", "{\"a\":2}\n404"));
    assert!(!ok("x = ...", "y = 42"));
    let steps = sh_steps("# intro\ncurl a \\\n  b\n# {\"k\":\n#  1}\n\ncurl c\n");
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].1.as_deref(), Some("{\"k\": 1}"));
    assert_eq!(steps[1].1, None);
}
