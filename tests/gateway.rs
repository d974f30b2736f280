//! The model gateway end to end: the real `arservice` binary forwarding `/v1/chat/completions`
//! and `/v1/messages` to a fake upstream started here on loopback, scripted per test (answers,
//! errors, streams that wait for the test, streams that break off).

mod support;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use support::{binary, wait_for, Options, Server, TempDir};

/// The key the tests give the server: it must reach the upstream and never the log.
const KEY: &str = "sk-test-9f8e7d6c5b4a-SECRET";

/// How long a gated stream waits for the test before it goes on alone (and the test fails).
const GATE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the fake upstream saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
    body: Value,
    at: Instant,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A scripted answer of the fake upstream.
enum Answer {
    Json {
        status: u16,
        body: String,
        headers: Vec<(&'static str, String)>,
    },
    /// Server-sent events, each piece flushed on its own. With a gate, the pieces from
    /// `gate.0` on are sent only once the test says so.
    Events {
        pieces: Vec<String>,
        gate: Option<(usize, Receiver<()>)>,
        end: End,
    },
}

/// How a stream of [`Answer::Events`] is framed and ends.
#[derive(Clone, Copy, PartialEq)]
enum End {
    /// Chunked, each piece one chunk, ended by the last chunk.
    Chunked,
    /// Chunked, and the connection closed instead of the last chunk.
    Cut,
    /// Neither chunked nor of a length: closing the connection ends the body.
    Close,
}

fn json_answer(status: u16, body: &Value) -> Answer {
    Answer::Json {
        status,
        body: body.to_string(),
        headers: Vec::new(),
    }
}

type Script = Box<dyn FnMut(usize, &Seen) -> Answer + Send>;

/// A fake LLM upstream on 127.0.0.1: one request per connection, answered by the script.
struct Upstream {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// A gated stream went on without the test's word.
    gate_timed_out: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start(script: impl FnMut(usize, &Seen) -> Answer + Send + 'static) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gate_timed_out = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen_by_server, timed_out, stopped) = (
            Arc::clone(&seen),
            Arc::clone(&gate_timed_out),
            Arc::clone(&stop),
        );
        let mut script: Script = Box::new(script);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let _ = serve_one(stream, &mut script, &seen_by_server, &timed_out);
            }
        });
        Upstream {
            url,
            seen,
            gate_timed_out,
            stop,
        }
    }

    /// A fake that always answers the same.
    fn answering(status: u16, body: Value) -> Upstream {
        Upstream::start(move |_, _| json_answer(status, &body))
    }

    fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

fn serve_one(
    stream: TcpStream,
    script: &mut Script,
    seen: &Mutex<Vec<Seen>>,
    gate_timed_out: &AtomicBool,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split(' ').nth(1).unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let request = Seen {
        path,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    };
    let hit = {
        let mut seen = seen.lock().unwrap();
        seen.push(request.clone());
        seen.len() - 1
    };
    let mut out = stream;
    match script(hit, &request) {
        Answer::Json {
            status,
            body,
            headers,
        } => {
            let mut head = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            out.write_all(format!("{head}\r\n{body}").as_bytes())?;
        }
        Answer::Events { pieces, gate, end } => {
            let framing = if end == End::Close {
                ""
            } else {
                "Transfer-Encoding: chunked\r\n"
            };
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{framing}Connection: close\r\n\r\n");
            out.write_all(head.as_bytes())?;
            out.flush()?;
            for (index, piece) in pieces.iter().enumerate() {
                if let Some((at, gate)) = &gate {
                    if index == *at && gate.recv_timeout(GATE_TIMEOUT).is_err() {
                        gate_timed_out.store(true, Ordering::SeqCst);
                    }
                }
                if end == End::Close {
                    out.write_all(piece.as_bytes())?;
                } else {
                    out.write_all(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes())?;
                }
                out.flush()?;
            }
            if end == End::Chunked {
                out.write_all(b"0\r\n\r\n")?;
            }
        }
    }
    out.flush()?;
    out.shutdown(std::net::Shutdown::Both)
}

/// A litellm-shaped price table.
fn prices_file(temp: &TempDir) -> String {
    let path = temp.path().join("prices.json");
    std::fs::write(
        &path,
        json!({
            "sample_spec": {"max_tokens": "set to max_output_tokens", "input_cost_per_token": 0.0,
                            "output_cost_per_token": 0.0},
            "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
                       "litellm_provider": "openai", "mode": "chat"},
            "claude-sonnet-4": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05,
                                "cache_read_input_token_cost": 3e-07,
                                "litellm_provider": "anthropic", "mode": "chat"},
            "dall-e-3": {"output_cost_per_image": 0.04},
        })
        .to_string(),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// A server whose gateway has the upstreams `NAME=URL` (each with `KEY` in its own variable),
/// the price table, and `extra` options.
fn gateway_server(temp: &TempDir, upstreams: &[(&str, &str)], extra: &[&str]) -> Server {
    let specs: Vec<String> = upstreams
        .iter()
        .map(|(name, url)| format!("{name}={url},key_env=ARS_TEST_KEY_{name}"))
        .collect();
    let vars: Vec<String> = upstreams
        .iter()
        .map(|(name, _)| format!("ARS_TEST_KEY_{name}"))
        .collect();
    let prices = prices_file(temp);
    let mut args = vec!["--model-prices", prices.as_str(), "--model-backoff", "0.01"];
    for spec in &specs {
        args.extend(["--model-upstream", spec.as_str()]);
    }
    args.extend(extra);
    Server::start_with(Options {
        args,
        env: vars.iter().map(|var| (var.as_str(), KEY)).collect(),
    })
}

/// A model call; any status is returned with the content type and the body as text.
fn call(
    server: &Server,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, String, String) {
    let mut response = send(server, path, headers, body);
    let status = response.status().as_u16();
    let content_type = header(&response, "content-type");
    let text = response.body_mut().read_to_string().unwrap();
    (status, content_type, text)
}

fn send(
    server: &Server,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> ureq::http::Response<ureq::Body> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .new_agent();
    let mut request = agent
        .post(format!("{}{path}", server.url))
        .header("Content-Type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .send(body.to_string())
        .unwrap_or_else(|err| panic!("POST {path}: {err}"))
}

fn header<B>(response: &ureq::http::Response<B>, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap().to_string())
        .unwrap_or_default()
}

fn detail(text: &str) -> String {
    let body: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    assert_eq!(body["status"], "error", "{body}");
    body["detail"].as_str().unwrap().to_string()
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hi"}], "temperature": 0})
}

fn chat_answer(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                        "finish_reason": "stop"}],
           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}})
}

fn message(model: &str) -> Value {
    json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "Say hi"}]})
}

fn message_answer() -> Value {
    json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4",
           "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
           "usage": {"input_tokens": 50, "output_tokens": 10, "cache_read_input_tokens": 100}})
}

fn close_to(actual: &Value, expected: f64) -> bool {
    actual
        .as_f64()
        .is_some_and(|actual| (actual - expected).abs() < 1e-12)
}

/// Waits until `/stats` shows `calls` settled model calls (answered or failed).
fn settled_stats(server: &Server, calls: u64) -> Value {
    wait_for(Duration::from_secs(10), "the calls to be settled", || {
        let (_, stats) = server.get("/stats");
        let model = &stats["model"];
        let settled = model["failed_calls"].as_u64()? + model["unpriced_calls"].as_u64()?;
        let priced = model["input_tokens"].as_u64()? > 0;
        (model["calls"] == calls && (settled > 0 || priced)).then_some(stats)
    })
}

#[test]
fn openai_calls_are_forwarded_with_the_key_and_accounted_per_run() {
    let temp = TempDir::new("gateway-openai");
    let answer = chat_answer(1000, 200).to_string();
    let sent = answer.clone();
    let upstream = Upstream::start(move |_, _| Answer::Json {
        status: 200,
        body: sent.clone(),
        headers: vec![("x-request-id", "req-42".into())],
    });
    let server = gateway_server(&temp, &[("oa", &upstream.url)], &[]);
    server.start_local("r1");
    let _close = support::CloseAll(&server);

    let mut response = send(
        &server,
        "/v1/chat/completions",
        &[("X-Run-Id", "r1"), ("Authorization", "Bearer client-side")],
        &chat("oa/gpt-4o"),
    );
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(header(&response, "content-type"), "application/json");
    assert_eq!(header(&response, "x-request-id"), "req-42");
    assert_eq!(response.body_mut().read_to_string().unwrap(), answer);

    // The only upstream is the default: a model without a prefix goes there too.
    let (status, _, text) = call(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
    assert_eq!((status, text.as_str()), (200, answer.as_str()));

    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {KEY}"))
    );
    assert_eq!(seen[0].header("x-api-key"), None);
    assert_eq!(
        seen[0].header("x-run-id"),
        None,
        "arservice's own headers stay"
    );
    assert_eq!(
        seen[0].body["model"], "gpt-4o",
        "the upstream prefix is stripped"
    );
    assert_eq!(seen[0].body["messages"], chat("x")["messages"]);
    assert_eq!(seen[0].body["temperature"], 0);
    assert_eq!(seen[1].body["model"], "gpt-4o");

    // 1000 × 2.5e-6 + 200 × 1e-5 USD: 0.0045000000000000005 when summed in f64.
    let one_call = 0.0045;
    let (status, stats) = server.get("/stats");
    assert_eq!(status, 200);
    let model = &stats["model"];
    assert_eq!(model["calls"], 2, "{model}");
    assert_eq!(model["input_tokens"], 2000);
    assert_eq!(model["output_tokens"], 400);
    assert_eq!(model["cost_usd"].to_string(), "0.009", "{model}");
    assert_eq!(model["unpriced_calls"], 0);
    assert_eq!(model["failed_calls"], 0);
    assert_eq!(model["upstreams"], json!(["oa"]));
    assert_eq!(model["limits"], json!({"cost_usd": null, "calls": null}));
    let run = &stats["model_runs"]["r1"];
    assert_eq!(run["calls"], 1, "{stats}");
    assert_eq!(run["cost_usd"], one_call, "{run}");
    assert_eq!(run["cost_usd"].to_string(), "0.0045", "{run}");
    assert_eq!(stats["model_runs"].as_object().unwrap().len(), 1);
    let row = &stats["instances"][0];
    assert_eq!(row["run_id"], "r1");
    assert_eq!(&row["model"], run);
    let (_, filtered) = server.get("/stats?run_id=zzz");
    assert_eq!(filtered["model_runs"], json!({}));
    assert_eq!(filtered["model"]["calls"], 2, "totals are not filtered");

    let mut response = ureq::get(format!("{}/metrics", server.url)).call().unwrap();
    let metrics = response.body_mut().read_to_string().unwrap();
    assert!(
        metrics.contains("\narservice_model_calls_total 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\narservice_model_input_tokens_total 2000\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\narservice_model_cost_usd_total 0.009\n"),
        "{metrics}"
    );

    assert!(!server.log().contains(KEY), "the key is in the log");
    assert!(
        server.log().contains("key from $ARS_TEST_KEY_oa"),
        "{}",
        server.log()
    );
}

#[test]
fn anthropic_calls_get_x_api_key_and_a_default_version() {
    let temp = TempDir::new("gateway-anthropic");
    let upstream = Upstream::answering(200, message_answer());
    let server = gateway_server(&temp, &[("an", &upstream.url)], &[]);

    let (status, content_type, text) = call(
        &server,
        "/v1/messages",
        &[
            ("X-Run-Id", "rollout-7"),
            ("Authorization", "Bearer client-side"),
        ],
        &message("claude-sonnet-4"),
    );
    assert_eq!((status, content_type.as_str()), (200, "application/json"));
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        message_answer()
    );
    let (status, _, _) = call(
        &server,
        "/v1/messages",
        &[
            ("anthropic-version", "2024-10-22"),
            ("anthropic-beta", "prompt-caching-2024-07-31"),
        ],
        &message("an/claude-sonnet-4"),
    );
    assert_eq!(status, 200);

    let seen = upstream.seen();
    assert_eq!(seen[0].path, "/v1/messages");
    assert_eq!(seen[0].header("x-api-key"), Some(KEY));
    assert_eq!(seen[0].header("authorization"), None, "never the client's");
    assert_eq!(seen[0].header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(seen[1].header("anthropic-version"), Some("2024-10-22"));
    assert_eq!(
        seen[1].header("anthropic-beta"),
        Some("prompt-caching-2024-07-31")
    );
    assert_eq!(seen[1].body["model"], "claude-sonnet-4");

    // input_tokens counts the cache reads, priced at their own rate.
    let one_call = 50.0 * 3e-6 + 100.0 * 3e-7 + 10.0 * 1.5e-5;
    let (_, stats) = server.get("/stats");
    let run = &stats["model_runs"]["rollout-7"];
    assert_eq!(run["input_tokens"], 150, "{stats}");
    assert_eq!(run["output_tokens"], 10);
    assert!(close_to(&run["cost_usd"], one_call), "{run}");
    assert!(close_to(&stats["model"]["cost_usd"], 2.0 * one_call));
    assert!(!server.log().contains(KEY));
}

/// Reads a streamed answer until it holds `needle`, then returns what came so far.
fn read_until(reader: &mut impl Read, text: &mut String, needle: &str) {
    let mut buffer = [0; 4096];
    while !text.contains(needle) {
        let read = reader.read(&mut buffer).unwrap();
        assert!(read > 0, "the stream ended before {needle:?}: {text}");
        text.push_str(std::str::from_utf8(&buffer[..read]).unwrap());
    }
}

#[test]
fn openai_streams_pass_through_as_they_arrive_and_count_usage_at_the_end() {
    let temp = TempDir::new("gateway-stream");
    let pieces: Vec<String> = vec![
        "data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n".into(),
        "data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n".into(),
        "data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":300,\"completion_tokens\":40}}\n\n".into(),
        "data: [DONE]\n\n".into(),
    ];
    let (go, gate) = channel::<()>();
    let mut gate = Some(gate);
    let sent = pieces.clone();
    let upstream = Upstream::start(move |_, _| Answer::Events {
        pieces: sent.clone(),
        gate: gate.take().map(|gate| (1, gate)),
        end: End::Chunked,
    });
    let server = gateway_server(&temp, &[("oa", &upstream.url)], &[]);

    let mut body = chat("gpt-4o");
    body["stream"] = json!(true);
    let response = send(
        &server,
        "/v1/chat/completions",
        &[("X-Run-Id", "s1")],
        &body,
    );
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(header(&response, "content-type"), "text/event-stream");
    let mut reader = response.into_body().into_reader();
    let mut text = String::new();
    // The upstream holds the rest back until the first event reached the client.
    read_until(&mut reader, &mut text, "Hel\"");
    assert!(!text.contains("lo\""), "{text}");
    go.send(()).unwrap();
    reader.read_to_string(&mut text).unwrap();
    assert!(
        !upstream.gate_timed_out.load(Ordering::SeqCst),
        "the first event was held back until the upstream sent the rest"
    );
    assert_eq!(text, pieces.concat(), "passed through byte for byte");
    assert_eq!(
        upstream.seen()[0].body["stream_options"],
        json!({"include_usage": true})
    );

    let stats = settled_stats(&server, 1);
    let run = &stats["model_runs"]["s1"];
    assert_eq!(
        (&run["input_tokens"], &run["output_tokens"]),
        (&json!(300), &json!(40)),
        "{run}"
    );
    assert!(
        close_to(&run["cost_usd"], 300.0 * 2.5e-6 + 40.0 * 1e-5),
        "{run}"
    );
    assert_eq!(run["failed_calls"], 0);
}

#[test]
fn anthropic_streams_count_message_start_and_message_delta() {
    let temp = TempDir::new("gateway-anthropic-stream");
    let pieces: Vec<String> = vec![
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-sonnet-4\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n".into(),
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n".into(),
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n".into(),
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".into(),
    ];
    let (go, gate) = channel::<()>();
    let mut gate = Some(gate);
    let sent = pieces.clone();
    let upstream = Upstream::start(move |_, _| Answer::Events {
        pieces: sent.clone(),
        gate: gate.take().map(|gate| (2, gate)),
        end: End::Chunked,
    });
    let server = gateway_server(&temp, &[("an", &upstream.url)], &[]);

    let mut body = message("claude-sonnet-4");
    body["stream"] = json!(true);
    let response = send(&server, "/v1/messages", &[("X-Run-Id", "s2")], &body);
    assert_eq!(response.status().as_u16(), 200);
    let mut reader = response.into_body().into_reader();
    let mut text = String::new();
    read_until(&mut reader, &mut text, "\"text\":\"Hi\"");
    go.send(()).unwrap();
    reader.read_to_string(&mut text).unwrap();
    assert!(!upstream.gate_timed_out.load(Ordering::SeqCst));
    assert_eq!(text, pieces.concat());
    assert_eq!(upstream.seen()[0].body.get("stream_options"), None);

    let stats = settled_stats(&server, 1);
    let run = &stats["model_runs"]["s2"];
    assert_eq!(
        (&run["input_tokens"], &run["output_tokens"]),
        (&json!(25), &json!(15)),
        "{run}"
    );
    assert!(
        close_to(&run["cost_usd"], 25.0 * 3e-6 + 15.0 * 1.5e-5),
        "{run}"
    );
}

#[test]
fn a_stream_the_upstream_breaks_off_ends_with_an_error_event() {
    let temp = TempDir::new("gateway-broken");
    let first = "data: {\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n";
    let sent = first.to_string();
    let upstream = Upstream::start(move |_, _| Answer::Events {
        pieces: vec![sent.clone(), "data: {\"cho".into()],
        gate: None,
        end: End::Cut,
    });
    let server = gateway_server(&temp, &[("oa", &upstream.url)], &[]);
    let mut body = chat("gpt-4o");
    body["stream"] = json!(true);
    let (status, _, text) = call(&server, "/v1/chat/completions", &[], &body);
    assert_eq!(status, 200);
    assert!(text.starts_with(first), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    let message = event["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("model upstream 'oa' broke off its stream"),
        "{text}"
    );
    let stats = settled_stats(&server, 1);
    assert_eq!(stats["model"]["failed_calls"], 1, "{stats}");
}

/// The events of a streamed OpenAI answer, `[DONE]` last.
fn openai_events() -> Vec<String> {
    vec![
        "data: {\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n".into(),
        "data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":75,\"completion_tokens\":8}}\n\n".into(),
        "data: [DONE]\n\n".into(),
    ]
}

/// The events of a streamed Anthropic answer, `message_stop` last.
fn anthropic_events() -> Vec<String> {
    vec![
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n".into(),
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n".into(),
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".into(),
    ]
}

/// An upstream whose body ends when it closes the connection (no chunks, no length): a stream
/// closed before `data: [DONE]` / `message_stop` is cut, not complete.
#[test]
fn a_stream_closed_before_its_last_event_ends_with_an_error_event_and_counts_as_failed() {
    let temp = TempDir::new("gateway-closed");
    // Hit 0: cut before [DONE]; hit 1: whole.
    let openai = Upstream::start(|hit, _| {
        let mut pieces = openai_events();
        if hit == 0 {
            pieces.pop();
        }
        Answer::Events {
            pieces,
            gate: None,
            end: End::Close,
        }
    });
    let anthropic = Upstream::start(|_, _| {
        let mut pieces = anthropic_events();
        pieces.pop();
        Answer::Events {
            pieces,
            gate: None,
            end: End::Close,
        }
    });
    let server = gateway_server(&temp, &[("oa", &openai.url), ("an", &anthropic.url)], &[]);
    let mut body = chat("oa/gpt-4o");
    body["stream"] = json!(true);

    let (status, _, text) = call(
        &server,
        "/v1/chat/completions",
        &[("X-Run-Id", "cut")],
        &body,
    );
    assert_eq!(status, 200);
    let events = openai_events();
    let (before, error) = text.split_at(events[..2].concat().len());
    assert_eq!(before, events[..2].concat());
    let error: Value = serde_json::from_str(error.trim().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(
        error["error"]["message"],
        "model upstream 'oa' closed its stream before `data: [DONE]`: the answer is cut short"
    );

    let (status, _, text) = call(
        &server,
        "/v1/chat/completions",
        &[("X-Run-Id", "whole")],
        &body,
    );
    assert_eq!(
        (status, text),
        (200, events.concat()),
        "passed through as it came"
    );

    let mut body = message("an/claude-sonnet-4");
    body["stream"] = json!(true);
    let (status, _, text) = call(&server, "/v1/messages", &[("X-Run-Id", "cut")], &body);
    assert_eq!(status, 200);
    assert!(
        text.starts_with(&anthropic_events()[..2].concat()),
        "{text}"
    );
    let error = text.trim_end().rsplit("\n\n").next().unwrap();
    let data = error.strip_prefix("event: error\ndata: ").unwrap();
    let error: Value = serde_json::from_str(data).unwrap();
    assert_eq!(error["type"], "error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("closed its stream before `message_stop`"),
        "{error}"
    );

    let stats = wait_for(
        Duration::from_secs(10),
        "the three calls to be settled",
        || {
            let (_, stats) = server.get("/stats");
            let model = &stats["model"];
            let settled = model["failed_calls"].as_u64()? + model["unpriced_calls"].as_u64()?;
            (model["calls"] == 3 && settled == 2 && model["output_tokens"] == 31).then_some(stats)
        },
    );
    let runs = &stats["model_runs"];
    assert_eq!(runs["cut"]["failed_calls"], 2, "{runs}");
    assert_eq!(runs["cut"]["unpriced_calls"], 0, "{runs}");
    assert_eq!(runs["whole"]["failed_calls"], 0, "{runs}");
    // 75 × 2.5e-6 + 8 × 1e-5 USD, without float noise.
    assert_eq!(runs["whole"]["cost_usd"].to_string(), "0.0002675", "{runs}");
}

/// An SDK pointed at a path the gateway does not serve (`models.list()`, a base URL without
/// `/v1`) gets a 404 whose `error.message` names the routes.
#[test]
fn unknown_sdk_paths_answer_404_in_the_sdks_error_shape() {
    let server = Server::start(&[]);
    for path in ["/v1/models", "/chat/completions"] {
        let (status, body) = server.get(path);
        assert_eq!(status, 404, "{path}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(body["error"]["type"], "not_found_error", "{body}");
        assert_eq!(body["detail"], message, "{body}");
        for route in [
            path,
            "POST /v1/chat/completions (OpenAI SDKs: base_url http://HOST:PORT/v1)",
            "POST /v1/messages (Anthropic SDKs: base_url http://HOST:PORT)",
            "/start_instance",
        ] {
            assert!(message.contains(route), "{path}: {message}");
        }
    }
    // The sandbox API keeps its own error shape.
    let (status, body) = server.get("/nope");
    assert_eq!(status, 404);
    assert!(body.get("error").is_none(), "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("/v1/messages"),
        "{body}"
    );
}

#[test]
fn upstream_429_and_5xx_are_retried_until_an_answer() {
    let temp = TempDir::new("gateway-retry");
    let upstream = Upstream::start(|hit, _| match hit {
        0 => Answer::Json {
            status: 429,
            body: json!({"error": {"message": "slow down"}}).to_string(),
            headers: vec![("retry-after", "0".into())],
        },
        1 => json_answer(503, &json!({"error": {"message": "overloaded"}})),
        _ => json_answer(200, &chat_answer(10, 5)),
    });
    let server = gateway_server(&temp, &[("oa", &upstream.url)], &[]);
    let (status, _, text) = call(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
    assert_eq!(status, 200, "{text}");
    assert_eq!(upstream.hits(), 3);
    let (_, stats) = server.get("/stats");
    let model = &stats["model"];
    assert_eq!(
        (&model["calls"], &model["retries"]),
        (&json!(1), &json!(2)),
        "{model}"
    );
    assert_eq!(model["failed_calls"], 0);
    assert_eq!(model["input_tokens"], 10);
    assert!(server
        .log()
        .contains("model upstream 'oa' answered 429 (attempt 1 of 4)"));
}

#[test]
fn retry_after_is_honoured() {
    let temp = TempDir::new("gateway-retry-after");
    let upstream = Upstream::start(|hit, _| match hit {
        0 => Answer::Json {
            status: 429,
            body: "{}".into(),
            headers: vec![("retry-after", "1".into())],
        },
        _ => json_answer(200, &chat_answer(1, 1)),
    });
    let server = gateway_server(&temp, &[("oa", &upstream.url)], &[]);
    let (status, _, _) = call(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
    assert_eq!(status, 200);
    let seen = upstream.seen();
    let pause = seen[1].at - seen[0].at;
    assert!(
        pause >= Duration::from_millis(950),
        "retried after {pause:?}, not the 1 s asked"
    );
}

#[test]
fn an_upstream_that_keeps_failing_is_passed_through_after_the_retries() {
    let temp = TempDir::new("gateway-500");
    let failure = json!({"error": {"message": "internal boom", "type": "server_error"}});
    let upstream = Upstream::answering(500, failure.clone());
    let server = gateway_server(&temp, &[("oa", &upstream.url)], &["--model-retries", "2"]);
    let (status, _, text) = call(
        &server,
        "/v1/chat/completions",
        &[("X-Run-Id", "f1")],
        &chat("gpt-4o"),
    );
    assert_eq!((status, text.as_str()), (500, failure.to_string().as_str()));
    assert_eq!(upstream.hits(), 3, "1 attempt + 2 retries");
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["model_runs"]["f1"]["failed_calls"], 1, "{stats}");
    assert_eq!(stats["model"]["retries"], 2);
}

#[test]
fn a_4xx_is_never_retried_and_passed_through_as_it_is() {
    let temp = TempDir::new("gateway-400");
    let refusal = r#"{"error": {"message": "Unsupported parameter: 'temperature'", "type": "invalid_request_error", "param": "temperature"}}"#;
    let upstream = Upstream::start(move |_, _| Answer::Json {
        status: 400,
        body: refusal.into(),
        headers: Vec::new(),
    });
    let server = gateway_server(&temp, &[("oa", &upstream.url)], &[]);
    let (status, content_type, text) = call(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
    assert_eq!((status, text.as_str()), (400, refusal), "byte for byte");
    assert_eq!(content_type, "application/json");
    assert_eq!(upstream.hits(), 1);

    let unauthorized = Upstream::answering(401, json!({"error": {"message": "bad key"}}));
    let server = gateway_server(&temp, &[("an", &unauthorized.url)], &[]);
    let (status, _, _) = call(&server, "/v1/messages", &[], &message("claude-sonnet-4"));
    assert_eq!(status, 401);
    assert_eq!(unauthorized.hits(), 1);
}

/// `GET /runs/{run_id}` sums the model calls of a run beside its sandbox's, with what is left
/// of the (global) limits; a run the gateway alone knows answers too; a spent limit is no
/// infra failure.
#[test]
fn runs_sum_their_model_calls_and_the_budget_left() {
    let temp = TempDir::new("gateway-runs");
    let answer = chat_answer(1000, 200).to_string();
    let upstream = Upstream::start(move |_, _| Answer::Json {
        status: 200,
        body: answer.clone(),
        headers: Vec::new(),
    });
    let server = gateway_server(
        &temp,
        &[("oa", &upstream.url)],
        &["--cost-limit", "1", "--call-limit", "4"],
    );
    server.start_local("r1");
    let _close = support::CloseAll(&server);
    for run_id in ["r1", "r1", "model-only"] {
        let (status, _, text) = call(
            &server,
            "/v1/chat/completions",
            &[("X-Run-Id", run_id)],
            &chat("oa/gpt-4o"),
        );
        assert_eq!(status, 200, "{text}");
    }
    server.exec("r1", "true");
    settled_stats(&server, 3);

    // 1000 × 2.5e-6 + 200 × 1e-5 USD a call.
    let (status, run) = server.get("/runs/r1");
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["state"], "running", "{run}");
    assert_eq!(run["commands"], 1, "{run}");
    let model = &run["model"];
    assert_eq!(model["calls"], 2, "{run}");
    assert_eq!(model["input_tokens"], 2000, "{run}");
    assert_eq!(model["output_tokens"], 400, "{run}");
    assert!(close_to(&model["cost_usd"], 0.009), "{run}");
    assert_eq!(
        model["limits"],
        json!({"cost_usd": 1.0, "calls": 4}),
        "{run}"
    );
    assert!(
        close_to(&model["cost_left_usd"], 1.0 - 3.0 * 0.0045),
        "the budget left is every run's: {run}"
    );
    assert_eq!(model["calls_left"], 1, "{run}");

    let (status, only) = server.get("/runs/model-only");
    assert_eq!(status, 200, "{only}");
    assert_eq!(only["state"], Value::Null, "no sandbox had it: {only}");
    assert_eq!(only["model"]["calls"], 1, "{only}");
    let (status, unknown) = server.get("/runs/never");
    assert_eq!(
        (status, &unknown["infra"]),
        (404, &json!(false)),
        "{unknown}"
    );

    let (status, closed) = server.post("/close_instance", &json!({"run_id": "r1"}));
    assert_eq!(status, 200, "{closed}");
    let (_, run) = server.get("/runs/r1");
    assert_eq!(run["state"], "closed", "{run}");
    assert_eq!(run["model"]["calls"], 2, "{run}");

    let (status, _, _) = call(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
    assert_eq!(status, 200);
    let (status, _, text) = call(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
    assert_eq!(status, 429, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        body["infra"], false,
        "a spent limit is the runs' own: {body}"
    );
}

#[test]
fn an_unreachable_upstream_is_502_after_the_retries() {
    let temp = TempDir::new("gateway-unreachable");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let server = gateway_server(&temp, &[("dead", &url)], &["--model-retries", "2"]);
    let (status, _, text) = call(
        &server,
        "/v1/chat/completions",
        &[("X-Run-Id", "u1")],
        &chat("gpt-4o"),
    );
    assert_eq!(status, 502, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["infra"], true, "an upstream's failure: {body}");
    let detail = detail(&text);
    assert!(
        detail.contains("model upstream 'dead' failed after 3 attempt(s)"),
        "{detail}"
    );
    let (_, stats) = server.get("/stats");
    assert_eq!(stats["model_runs"]["u1"]["failed_calls"], 1, "{stats}");
    assert_eq!(stats["model"]["retries"], 2);
    assert!(!server.log().contains(KEY), "the key is in the log");
}

#[test]
fn a_call_past_the_timeout_is_504_and_retried_neither_here_nor_by_the_sdk() {
    let temp = TempDir::new("gateway-timeout");
    let upstream = Upstream::start(|_, _| {
        thread::sleep(Duration::from_millis(1500));
        json_answer(200, &chat_answer(1, 1))
    });
    let server = gateway_server(
        &temp,
        &[("slow", &upstream.url)],
        &["--model-timeout", "0.3", "--model-retries", "2"],
    );
    let began = Instant::now();
    let mut response = send(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
    assert_eq!(response.status().as_u16(), 504);
    // An SDK with its default retries would wait the timeout out three times.
    assert_eq!(header(&response, "x-should-retry"), "false");
    let text = response.body_mut().read_to_string().unwrap();
    let detail = detail(&text);
    assert!(
        detail.contains(
            "model upstream 'slow' did not answer within --model-timeout 0.3 s (attempt 1)"
        ),
        "{detail}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["message"], detail.as_str(), "{body}");
    assert_eq!(body["infra"], true, "{body}");
    assert_eq!(upstream.hits(), 1);
    assert!(
        began.elapsed() < Duration::from_millis(1400),
        "{:?}",
        began.elapsed()
    );
}

#[test]
fn the_cost_limit_answers_429_once_reached() {
    let temp = TempDir::new("gateway-cost-limit");
    let upstream = Upstream::answering(200, chat_answer(1000, 200));
    // Each call costs 0.0045 USD: the second starts below the limit and ends above it.
    let server = gateway_server(&temp, &[("oa", &upstream.url)], &["--cost-limit", "0.005"]);
    for _ in 0..2 {
        let (status, _, text) = call(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
        assert_eq!(status, 200, "{text}");
    }
    let mut response = send(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
    assert_eq!(response.status().as_u16(), 429);
    // The SDKs would retry a 429, and show `error.message`.
    assert_eq!(header(&response, "x-should-retry"), "false");
    let text = response.body_mut().read_to_string().unwrap();
    let detail = detail(&text);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["message"], detail.as_str(), "{body}");
    assert!(detail.contains("cost limit is reached"), "{detail}");
    assert!(
        detail.contains("0.009000 USD spent of --cost-limit 0.005 USD"),
        "{detail}"
    );
    assert_eq!(upstream.hits(), 2, "a refused call is not forwarded");
    let (_, stats) = server.get("/stats");
    assert_eq!(
        stats["model"]["limits"],
        json!({"cost_usd": 0.005, "calls": null})
    );
    assert_eq!(stats["model"]["calls"], 2);
}

#[test]
fn the_call_limit_answers_429_once_reached() {
    let temp = TempDir::new("gateway-call-limit");
    let upstream = Upstream::answering(200, message_answer());
    let server = gateway_server(&temp, &[("an", &upstream.url)], &["--call-limit", "2"]);
    let statuses: Vec<u16> = (0..3)
        .map(|_| call(&server, "/v1/messages", &[], &message("claude-sonnet-4")).0)
        .collect();
    assert_eq!(statuses, [200, 200, 429]);
    let (_, _, text) = call(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
    let detail = detail(&text);
    assert!(
        detail.contains("call limit is reached: 2 calls made of --call-limit 2"),
        "{detail}"
    );
    assert_eq!(upstream.hits(), 2);
}

#[test]
fn routing_and_run_id_errors_are_400_and_reach_no_upstream() {
    let temp = TempDir::new("gateway-routing");
    let a = Upstream::answering(200, chat_answer(1, 1));
    let b = Upstream::answering(200, chat_answer(1, 1));
    let server = gateway_server(&temp, &[("a", &a.url), ("b", &b.url)], &[]);

    let (status, _, text) = call(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
    assert_eq!(status, 400);
    let detail_text = detail(&text);
    assert!(
        detail_text.contains("model 'gpt-4o' names no upstream"),
        "{detail_text}"
    );
    assert!(
        detail_text.contains("a, b") && detail_text.contains("X-Upstream"),
        "{detail_text}"
    );
    let (status, _, text) = call(
        &server,
        "/v1/chat/completions",
        &[("X-Upstream", "zz")],
        &chat("gpt-4o"),
    );
    assert_eq!(status, 400);
    assert!(detail(&text)
        .contains("X-Upstream 'zz' is not an upstream of this server; the upstreams are: a, b"));
    let (status, _, text) = call(
        &server,
        "/v1/chat/completions",
        &[("X-Run-Id", "no/slashes")],
        &chat("a/gpt-4o"),
    );
    assert_eq!(status, 400);
    assert!(
        detail(&text).contains("X-Run-Id 'no/slashes' is not allowed"),
        "{text}"
    );
    let (status, _, text) = call(&server, "/v1/messages", &[], &json!({"messages": []}));
    assert_eq!(status, 400);
    assert!(detail(&text).contains("model is required"), "{text}");
    let (status, _, text) = call(&server, "/v1/messages", &[], &json!([1]));
    assert_eq!(status, 400, "{text}");
    assert_eq!(a.hits() + b.hits(), 0);

    let (status, _, _) = call(&server, "/v1/chat/completions", &[], &chat("b/gpt-4o"));
    assert_eq!(status, 200);
    let (status, _, _) = call(
        &server,
        "/v1/chat/completions",
        &[("X-Upstream", "a")],
        &chat("gpt-4o"),
    );
    assert_eq!(status, 200);
    assert_eq!((a.hits(), b.hits()), (1, 1));
    assert_eq!(b.seen()[0].body["model"], "gpt-4o");
    assert_eq!(a.seen()[0].body["model"], "gpt-4o");
}

#[test]
fn without_an_upstream_the_routes_say_how_to_turn_the_gateway_on() {
    let server = Server::start(&[]);
    let (status, _, text) = call(&server, "/v1/chat/completions", &[], &chat("gpt-4o"));
    assert_eq!(status, 400);
    assert!(
        detail(&text).contains("--model-upstream NAME=URL"),
        "{text}"
    );
    let (_, stats) = server.get("/stats");
    assert!(
        stats.get("model").is_none() && stats.get("model_runs").is_none(),
        "{stats}"
    );
}

#[test]
fn unpriced_models_count_tokens_and_say_so() {
    let temp = TempDir::new("gateway-unpriced");
    let mut answer = chat_answer(7, 3);
    answer["model"] = json!("my-finetune");
    let upstream = Upstream::answering(200, answer);
    let server = gateway_server(&temp, &[("oa", &upstream.url)], &[]);
    let (status, _, _) = call(&server, "/v1/chat/completions", &[], &chat("my-finetune"));
    assert_eq!(status, 200);
    let (_, stats) = server.get("/stats");
    let model = &stats["model"];
    assert_eq!(
        (&model["input_tokens"], &model["unpriced_calls"]),
        (&json!(7), &json!(1)),
        "{model}"
    );
    assert_eq!(model["cost_usd"], 0.0);
}

/// Runs the binary with a gateway configuration and returns (exit code, stderr).
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(binary())
        .args(["--runner", "local", "--port", "0"])
        .args(args)
        .env_remove("ARS_TEST_UNSET_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_missing_key_or_a_bad_gateway_option_refuses_to_start() {
    let temp = TempDir::new("gateway-config");
    let bad_prices = temp.path().join("bad.json");
    std::fs::write(&bad_prices, "{\"gpt-4o\": ").unwrap();
    let no_prices = temp.path().join("none.json");
    std::fs::write(&no_prices, r#"{"sample_spec": {"mode": "chat"}}"#).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model-upstream", "oa=http://127.0.0.1:9,key_env=ARS_TEST_UNSET_KEY"],
            "--model-upstream oa: the environment variable ARS_TEST_UNSET_KEY (its API key) is not set or empty",
        ),
        (vec!["--model-upstream", "oa"], "NAME=URL"),
        (vec!["--model-upstream", "oa=localhost:9"], "not an http:// or https:// URL"),
        (
            vec!["--model-upstream", "a=http://x", "--model-upstream", "a=http://y"],
            "given twice",
        ),
        (
            vec!["--model-prices", bad_prices.to_str().unwrap()],
            "not valid JSON",
        ),
        (
            vec!["--model-prices", no_prices.to_str().unwrap()],
            "no entry has both input_cost_per_token and output_cost_per_token",
        ),
        (vec!["--model-prices", "/nonexistent/prices.json"], "/nonexistent/prices.json"),
        (vec!["--cost-limit", "0"], "--cost-limit must be"),
        (vec!["--call-limit", "0"], "--call-limit must be"),
        (vec!["--model-timeout", "0"], "--model-timeout must be"),
        (vec!["--model-retries", "99"], "--model-retries must be at most 10"),
    ];
    for (args, needle) in cases {
        let (code, stderr) = refused(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// Many calls at once against a call limit: exactly the limit gets through.
#[test]
fn concurrent_calls_never_pass_the_call_limit() {
    let temp = TempDir::new("gateway-race");
    let upstream = Upstream::answering(200, chat_answer(1, 1));
    let server = gateway_server(&temp, &[("oa", &upstream.url)], &["--call-limit", "5"]);
    let (results, collected): (Sender<u16>, Receiver<u16>) = channel();
    thread::scope(|scope| {
        for _ in 0..16 {
            let results = results.clone();
            let server = &server;
            scope.spawn(move || {
                let (status, _, _) = call(server, "/v1/chat/completions", &[], &chat("gpt-4o"));
                results.send(status).unwrap();
            });
        }
    });
    drop(results);
    let mut statuses: Vec<u16> = collected.iter().collect();
    statuses.sort();
    assert_eq!(
        statuses.iter().filter(|&&status| status == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&status| status == 429).count(),
        11,
        "{statuses:?}"
    );
    assert_eq!(upstream.hits(), 5);
}

/// The test bed's venv (`.ci/testbed.sh`, comp_python), unless `ARSERVICE_TEST_PYTHON` names one.
const VENV_PYTHON: &str = "/var/lib/arservice-testbed/venv/bin/python";
const SDK_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/gateway_sdk/sdk_clients.py"
);

/// The venv python with the official `openai` and `anthropic` SDKs, or `None` (see
/// [`support::require`]).
fn sdk_python() -> Option<String> {
    let python = std::env::var("ARSERVICE_TEST_PYTHON").unwrap_or_else(|_| VENV_PYTHON.into());
    let ready = Command::new(&python)
        // Found, not imported: importing them takes seconds, and the script does.
        .args([
            "-c",
            "import importlib.util as u, sys; sys.exit(not (u.find_spec('openai') and u.find_spec('anthropic')))",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    support::require(
        ready,
        &format!("{python} cannot import openai and anthropic: run `sudo bash .ci/testbed.sh`"),
    )
    .then_some(python)
}

/// The official SDKs, with their default retries, against fakes that answer by model: a cut
/// stream raises, `models.list()` raises a 404 whose message names the routes, and a call past
/// `--model-timeout` raises after one attempt (tests/gateway_sdk/sdk_clients.py).
#[test]
fn official_sdks_see_cut_streams_unknown_paths_and_timeouts_as_errors() {
    use wait_timeout::ChildExt;
    let Some(python) = sdk_python() else { return };
    let temp = TempDir::new("gateway-sdk");
    let by_model = |events: fn() -> Vec<String>, whole: Value| {
        move |_: usize, seen: &Seen| match seen.body["model"].as_str() {
            Some("cut") => {
                let mut pieces = events();
                pieces.pop();
                Answer::Events {
                    pieces,
                    gate: None,
                    end: End::Close,
                }
            }
            Some("slow") => {
                thread::sleep(Duration::from_millis(1000));
                json_answer(200, &whole)
            }
            _ => json_answer(200, &whole),
        }
    };
    let openai = Upstream::start(by_model(openai_events, chat_answer(75, 8)));
    let anthropic = Upstream::start(by_model(anthropic_events, message_answer()));
    let server = gateway_server(
        &temp,
        &[("oa", &openai.url), ("an", &anthropic.url)],
        &["--model-timeout", "0.3"],
    );
    let output = temp.path().join("sdk-output");
    let mut child = Command::new(&python)
        .arg(SDK_SCRIPT)
        .args(["--url", &server.url])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&output).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = match child.wait_timeout(Duration::from_secs(120)).unwrap() {
        Some(status) => status,
        None => {
            let _ = child.kill();
            child.wait().unwrap()
        }
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let stdout = std::fs::read_to_string(&output).unwrap();
    assert!(
        status.success() && stdout.trim_end().ends_with("PASS"),
        "{status}\n{stdout}\n{stderr}"
    );
    let slow_calls = |upstream: &Upstream| {
        upstream
            .seen()
            .iter()
            .filter(|seen| seen.body["model"] == "slow")
            .count()
    };
    assert_eq!(
        (slow_calls(&openai), slow_calls(&anthropic)),
        (1, 1),
        "each SDK sent its timed-out call once"
    );
    let stats = settled_stats(&server, 6);
    assert_eq!(stats["model"]["failed_calls"], 4, "{stats}");
}
