//! Streamed answers (server-sent events): asking an OpenAI-style upstream for the usage chunk,
//! and [`Metered`], which passes a stream through byte for byte while it reads the usage on
//! the way, settles the call once, and ends a stream the upstream broke off with an error
//! event that the client's SDK raises.

use super::accounts::{Book, Call};
use super::prices::Tokens;
use super::Api;
use serde_json::{json, Map, Value};
use std::io::{self, Read};

/// Longest line of a stream that is scanned for usage; longer ones pass through unscanned.
pub const MAX_EVENT_LINE_BYTES: usize = 1024 * 1024;

/// Asks an OpenAI-compatible upstream for the usage chunk at the end of a stream
/// (`stream_options.include_usage`), unless the client already said either way.
pub fn ask_for_usage(request: &mut Map<String, Value>) {
    let options = request.entry("stream_options").or_insert_with(|| json!({}));
    if options.is_null() {
        *options = json!({});
    }
    if let Value::Object(options) = options {
        options.entry("include_usage").or_insert(Value::Bool(true));
    }
}

/// An answer whose body ends when the upstream closes the connection (neither chunked nor
/// of a declared length): only its last event tells a complete stream from a cut one.
pub fn ends_by_closing(headers: &ureq::http::HeaderMap) -> bool {
    let chunked = headers
        .get_all("transfer-encoding")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.to_ascii_lowercase().contains("chunked"));
    !chunked && !headers.contains_key("content-length")
}

/// What a stream told about its usage so far.
#[derive(Default)]
struct StreamUsage {
    /// The usage fields seen, the later ones over the earlier (Anthropic's `message_delta`
    /// carries cumulative counts).
    usage: Map<String, Value>,
    model: Option<String>,
}

impl StreamUsage {
    /// Takes what one `data:` event says: OpenAI's chunks carry `usage` in the last one (with
    /// `include_usage`); Anthropic's `message_start` the input and `message_delta` the output.
    fn take(&mut self, api: Api, event: &Value) {
        let (usage, model) = match api {
            Api::OpenAi => (event.get("usage"), event.get("model")),
            Api::Anthropic => match event.get("type").and_then(Value::as_str) {
                Some("message_start") => (
                    event.pointer("/message/usage"),
                    event.pointer("/message/model"),
                ),
                Some("message_delta") => (event.get("usage"), None),
                _ => (None, None),
            },
        };
        if let Some(Value::Object(usage)) = usage {
            for (key, value) in usage {
                if !value.is_null() {
                    self.usage.insert(key.clone(), value.clone());
                }
            }
        }
        if self.model.is_none() {
            self.model = model.and_then(Value::as_str).map(String::from);
        }
    }

    fn tokens(&self, api: Api) -> Option<Tokens> {
        if self.usage.is_empty() {
            None
        } else {
            Tokens::of(api, &Value::Object(self.usage.clone()))
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The event that ends a complete stream, as the API's SDKs wait for it.
fn last_event(api: Api) -> &'static str {
    match api {
        Api::OpenAi => "data: [DONE]",
        Api::Anthropic => "message_stop",
    }
}

/// The event that ends a stream the upstream broke off, in the API's own error shape.
fn error_event(api: Api, message: &str) -> Vec<u8> {
    let event = match api {
        Api::OpenAi => format!(
            "\n\ndata: {}\n\n",
            json!({"error": {"message": message, "type": "upstream_error"}})
        ),
        Api::Anthropic => format!(
            "\n\nevent: error\ndata: {}\n\n",
            json!({"type": "error", "error": {"type": "api_error", "message": message}})
        ),
    };
    event.into_bytes()
}

/// A streamed answer, passed through byte for byte while its `data:` lines are read for
/// usage; the call is settled once, at the end of the stream or when it is dropped (the client
/// went away). An upstream that breaks off mid-stream (a read error, or a close before the last
/// event when the close is what ends the body) ends the stream with an error event the client's
/// SDK raises, instead of leaving the client waiting for more or taking a cut answer as whole.
pub struct Metered<R: Read> {
    inner: R,
    book: Book,
    call: Call,
    /// The body ends when the upstream closes: the end is complete only after the last event.
    ends_by_closing: bool,
    /// The stream's last event ([`last_event`]) went by.
    complete: bool,
    /// The line being received, when it is short enough to be scanned.
    line: Vec<u8>,
    /// The current line ran past [`MAX_EVENT_LINE_BYTES`]: skip it.
    skipping: bool,
    seen: StreamUsage,
    settled: bool,
    /// The error event still to be sent after the upstream broke off.
    tail: Option<io::Cursor<Vec<u8>>>,
}

impl<R: Read> Metered<R> {
    pub fn new(inner: R, book: Book, call: Call, ends_by_closing: bool) -> Metered<R> {
        Metered {
            inner,
            book,
            call,
            ends_by_closing,
            complete: false,
            line: Vec::new(),
            skipping: false,
            seen: StreamUsage::default(),
            settled: false,
            tail: None,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for piece in bytes.split_inclusive(|&byte| byte == b'\n') {
            if !self.skipping {
                if self.line.len() + piece.len() <= MAX_EVENT_LINE_BYTES {
                    self.line.extend_from_slice(piece);
                } else {
                    self.skipping = true;
                    self.line.clear();
                }
            }
            if piece.ends_with(b"\n") {
                if !self.skipping {
                    let line = std::mem::take(&mut self.line);
                    self.event_line(&line);
                }
                self.skipping = false;
                self.line.clear();
            }
        }
    }

    fn event_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.is_last_event(line) {
            self.complete = true;
        }
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        // Most chunks carry text only: parse those that can tell something.
        let telling = self.seen.model.is_none() || contains(data, b"usage");
        if telling {
            if let Ok(event) = serde_json::from_slice::<Value>(data) {
                self.seen.take(self.call.api, &event);
            }
        }
    }

    /// OpenAI's `data: [DONE]`; Anthropic's `event: message_stop` (or its data line).
    fn is_last_event(&self, line: &[u8]) -> bool {
        let trimmed = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_string();
        match self.call.api {
            Api::OpenAi => line
                .strip_prefix(b"data:")
                .is_some_and(|data| trimmed(data) == "[DONE]"),
            Api::Anthropic => {
                line.strip_prefix(b"event:")
                    .is_some_and(|name| trimmed(name) == "message_stop")
                    || line.strip_prefix(b"data:").is_some_and(|data| {
                        // Parsed only when it may be the one: most events carry text.
                        contains(data, b"message_stop")
                            && serde_json::from_slice::<Value>(data).is_ok_and(|event| {
                                event.get("type").and_then(Value::as_str) == Some("message_stop")
                            })
                    })
            }
        }
    }

    fn settle(&mut self, failed: bool) {
        if !std::mem::replace(&mut self.settled, true) {
            let tokens = self.seen.tokens(self.call.api);
            self.book
                .settle(&self.call, tokens, self.seen.model.as_deref(), failed);
        }
    }

    /// Settles the call as failed and queues the error event that ends the stream.
    fn break_off(&mut self, why: &str, buf: &mut [u8]) -> io::Result<usize> {
        let message = format!("model upstream '{}' {why}", self.call.upstream);
        log::warn!("{message}");
        self.settle(true);
        let mut tail = io::Cursor::new(error_event(self.call.api, &message));
        let read = tail.read(buf)?;
        self.tail = Some(tail);
        Ok(read)
    }
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(tail) = &mut self.tail {
            return tail.read(buf);
        }
        match self.inner.read(buf) {
            Ok(0) if self.ends_by_closing && !self.complete => {
                let why = format!(
                    "closed its stream before `{}`: the answer is cut short",
                    last_event(self.call.api)
                );
                self.break_off(&why, buf)
            }
            Ok(0) => {
                self.settle(false);
                Ok(0)
            }
            Ok(read) => {
                self.scan(&buf[..read]);
                Ok(read)
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Err(err),
            Err(err) => self.break_off(&format!("broke off its stream: {err}"), buf),
        }
    }
}

impl<R: Read> Drop for Metered<R> {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (or the answer could not be sent).
        self.settle(true);
    }
}

#[cfg(test)]
mod tests {
    use super::super::accounts::{Limits, Usage};
    use super::super::prices::tests::prices;
    use super::*;

    #[test]
    fn streams_ask_for_usage_unless_told_otherwise() {
        let mut request = json!({"model": "m", "stream": true})
            .as_object()
            .unwrap()
            .clone();
        ask_for_usage(&mut request);
        assert_eq!(request["stream_options"], json!({"include_usage": true}));
        let mut request = json!({"stream_options": {"include_usage": false}})
            .as_object()
            .unwrap()
            .clone();
        ask_for_usage(&mut request);
        assert_eq!(request["stream_options"], json!({"include_usage": false}));
        let mut request = json!({"stream_options": null}).as_object().unwrap().clone();
        ask_for_usage(&mut request);
        assert_eq!(request["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn only_a_body_without_chunks_or_length_ends_by_closing() {
        let mut headers = ureq::http::HeaderMap::new();
        assert!(ends_by_closing(&headers));
        headers.insert("transfer-encoding", "Chunked".parse().unwrap());
        assert!(!ends_by_closing(&headers));
        let mut headers = ureq::http::HeaderMap::new();
        headers.insert("content-length", "10".parse().unwrap());
        assert!(!ends_by_closing(&headers));
    }

    /// A reader that hands out its pieces one per read, then fails or ends.
    struct Pieces(Vec<Vec<u8>>, bool);

    impl Read for Pieces {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return if self.1 {
                    Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
                } else {
                    Ok(0)
                };
            }
            let mut piece = self.0.remove(0);
            let read = piece.len().min(buf.len());
            buf[..read].copy_from_slice(&piece[..read]);
            if read < piece.len() {
                self.0.insert(0, piece.split_off(read));
            }
            Ok(read)
        }
    }

    /// How the fake stream ends.
    #[derive(Clone, Copy)]
    enum End {
        /// A clean end of a framed body (chunked, or of a length).
        Framed,
        /// A clean end of a body that ends by closing.
        Closed,
        /// A read error.
        Broken,
    }

    fn metered(api: Api, pieces: Vec<&str>, end: End) -> (String, Usage) {
        let book = Book::new(prices());
        book.accounts
            .lock()
            .admit(
                Some(&crate::run_id::RunId::parse("r", "run_id").unwrap()),
                &Limits::default(),
            )
            .unwrap();
        let call = Call {
            api,
            upstream: "up".into(),
            model: "requested".into(),
            run_id: Some(crate::run_id::RunId::parse("r", "run_id").unwrap()),
        };
        let source = Pieces(
            pieces
                .iter()
                .map(|piece| piece.as_bytes().to_vec())
                .collect(),
            matches!(end, End::Broken),
        );
        let mut out = Vec::new();
        Metered::new(source, book.clone(), call, matches!(end, End::Closed))
            .read_to_end(&mut out)
            .unwrap();
        let usage = book.accounts.lock().runs["r"].usage;
        (String::from_utf8(out).unwrap(), usage)
    }

    const OPENAI: [&str; 4] = [
        "data: {\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"model\":\"gpt-4o\",\"choices\":[],\"usa",
        "ge\":{\"prompt_tokens\":100,\"completion_tokens\":20}}\r\n\r\n",
        "data: [DONE]\n\n",
    ];

    const ANTHROPIC: [&str; 4] = [
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4\",\"usage\":{\"input_tokens\":30,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":42}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ];

    #[test]
    fn openai_streams_pass_through_and_count_the_last_chunk() {
        for end in [End::Framed, End::Closed] {
            let (out, usage) = metered(Api::OpenAi, OPENAI.to_vec(), end);
            assert_eq!(out, OPENAI.concat());
            assert_eq!((usage.input_tokens, usage.output_tokens), (100, 20));
            // 100 × 2.5e-6 + 20 × 1e-5 USD.
            assert_eq!(usage.cost_pico, 450_000_000);
            assert_eq!((usage.failed_calls, usage.unpriced_calls), (0, 0));
        }
    }

    #[test]
    fn anthropic_streams_count_message_start_and_delta() {
        for end in [End::Framed, End::Closed] {
            let (out, usage) = metered(Api::Anthropic, ANTHROPIC.to_vec(), end);
            assert_eq!(out, ANTHROPIC.concat());
            assert_eq!((usage.input_tokens, usage.output_tokens), (30, 42));
            // 30 × 3e-6 + 42 × 1.5e-5 USD.
            assert_eq!(usage.cost_pico, 720_000_000);
            assert_eq!(usage.failed_calls, 0);
        }
    }

    #[test]
    fn a_broken_stream_ends_with_an_error_event_and_counts_as_failed() {
        let first = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7}}}\n\n";
        let (text, usage) = metered(Api::Anthropic, vec![first, "data: {\"ty"], End::Broken);
        assert!(text.starts_with(first), "{text}");
        assert!(
            text.ends_with("\n\nevent: error\ndata: {\"error\":{\"message\":\"model upstream 'up' broke off its stream: reset\",\"type\":\"api_error\"},\"type\":\"error\"}\n\n"),
            "{text}"
        );
        assert_eq!((usage.input_tokens, usage.failed_calls), (7, 1));
        let chunk = "data: {\"choices\":[]}\n\n";
        let (_, usage) = metered(Api::OpenAi, vec![chunk], End::Framed);
        assert_eq!((usage.unpriced_calls, usage.failed_calls), (1, 0));
    }

    #[test]
    fn a_stream_closed_before_its_last_event_is_cut_not_complete() {
        let (text, usage) = metered(Api::OpenAi, OPENAI[..3].to_vec(), End::Closed);
        assert!(text.starts_with(&OPENAI[..3].concat()), "{text}");
        assert!(
            text.ends_with("\n\ndata: {\"error\":{\"message\":\"model upstream 'up' closed its stream before `data: [DONE]`: the answer is cut short\",\"type\":\"upstream_error\"}}\n\n"),
            "{text}"
        );
        assert_eq!((usage.input_tokens, usage.failed_calls), (100, 1));
        assert_eq!(usage.unpriced_calls, 0);
        let (text, usage) = metered(Api::Anthropic, ANTHROPIC[..3].to_vec(), End::Closed);
        assert!(
            text.contains("event: error\n") && text.contains("before `message_stop`"),
            "{text}"
        );
        assert_eq!(usage.failed_calls, 1);
    }

    #[test]
    fn overlong_lines_are_skipped_not_buffered() {
        let long = format!("data: {}\n", "x".repeat(MAX_EVENT_LINE_BYTES + 10));
        let usage_line = "data: {\"model\":\"gpt-4o\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n";
        let (out, usage) = metered(Api::OpenAi, vec![&long, usage_line], End::Framed);
        assert_eq!(out.len(), long.len() + usage_line.len());
        assert_eq!((usage.input_tokens, usage.output_tokens), (1, 2));
    }
}
