//! Streamed output (`/execute_command` with `"stream": true`): the [`OutputSink`] a command's
//! output goes to as it is read (beside its cap), the [`TextChunker`] that turns those bytes
//! into text without ever splitting a UTF-8 sequence, and the NDJSON lines that carry a
//! stream on every wire: `{"output": "<chunk>"}` lines, then one last line (the answer). The
//! same lines come from an instance's agent, from a Slurm job's server and go to the client;
//! [`read_line`] reads one of them from a sandbox- or job-controlled connection within bounds.

use std::io::BufRead;
use std::sync::Arc;

/// The content type of a streamed answer.
pub const NDJSON: &str = "application/x-ndjson";

/// Where a command's output goes as it is read, raw bytes in the order they came (what the
/// cap keeps is unchanged). Called from the thread that reads the output; it may block (a
/// slow client holds the command's output back, as a full pipe would).
#[derive(Clone)]
pub struct OutputSink(Arc<SendBytes>);

/// What an [`OutputSink`] calls.
type SendBytes = dyn Fn(&[u8]) + Send + Sync;

impl OutputSink {
    pub fn new(send: impl Fn(&[u8]) + Send + Sync + 'static) -> OutputSink {
        OutputSink(Arc::new(send))
    }

    /// Passes `bytes` on (nothing for none).
    pub fn send(&self, bytes: &[u8]) {
        if !bytes.is_empty() {
            (self.0)(bytes)
        }
    }
}

impl std::fmt::Debug for OutputSink {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("OutputSink")
    }
}

/// Turns a byte stream into text chunks as `String::from_utf8_lossy` of the whole would read
/// it: an incomplete sequence at the end of a push is held back (at most 3 bytes) until the
/// next push completes it or [`TextChunker::finish`] replaces it; invalid bytes become
/// U+FFFD. The chunks joined are the lossy text of all the bytes.
#[derive(Debug, Default)]
pub struct TextChunker {
    held: Vec<u8>,
}

impl TextChunker {
    /// The text of what was held and `bytes`, but for an incomplete sequence at its end.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let joined;
        let mut rest: &[u8] = if self.held.is_empty() {
            bytes
        } else {
            joined = [std::mem::take(&mut self.held).as_slice(), bytes].concat();
            &joined
        };
        let mut text = String::with_capacity(rest.len());
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    return text;
                }
                Err(err) => {
                    let (valid, after) = rest.split_at(err.valid_up_to());
                    text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match err.error_len() {
                        Some(invalid) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[invalid..];
                        }
                        None => {
                            self.held = after.to_vec();
                            return text;
                        }
                    }
                }
            }
        }
    }

    /// What is still held (an incomplete sequence the stream ended in), as lossy text.
    pub fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.held)).into_owned()
    }
}

/// One `{"output": "<chunk>"}` line, with its newline.
pub fn chunk_line(text: &str) -> Vec<u8> {
    let mut line =
        serde_json::to_vec(&serde_json::json!({ "output": text })).expect("a string serializes");
    line.push(b'\n');
    line
}

/// One line of a stream, as read.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// `{"output": "<chunk>"}`: more output.
    Chunk(String),
    /// Any other object: the last line (the answer, or an error).
    Last(serde_json::Value),
}

impl Line {
    /// A line's JSON: an object with exactly one key `output` (a string) is a chunk, any
    /// other object is the last line.
    pub fn parse(line: &[u8]) -> Result<Line, String> {
        let value: serde_json::Value = serde_json::from_slice(line)
            .map_err(|err| format!("a stream line that is not JSON: {err}"))?;
        let serde_json::Value::Object(mut object) = value else {
            return Err("a stream line that is not a JSON object".into());
        };
        if object.len() == 1 {
            if let Some(serde_json::Value::String(text)) = object.remove("output") {
                return Ok(Line::Chunk(text));
            }
        }
        Ok(Line::Last(serde_json::Value::Object(object)))
    }
}

/// The longest chunk line read from an agent or a job's server: a chunk is one read of the
/// output pipe (64 KiB), each byte escaped at worst 6 times, with room to spare.
pub const MAX_CHUNK_LINE_BYTES: u64 = 1024 * 1024;

/// Reads one line (without its newline) of at most `limit` bytes; `Ok(None)` at the end of
/// the stream. A longer line, or one cut by the end, is an error: nothing is kept past
/// `limit`.
pub fn read_line(reader: &mut dyn BufRead, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut line = Vec::new();
    reader.take(limit + 1).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        let why = if line.len() as u64 >= limit {
            format!("a stream line longer than {limit} bytes")
        } else {
            "a stream cut in the middle of a line".into()
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    }
    Ok(Some(line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_never_split_a_sequence_and_join_to_the_lossy_text() {
        let bytes = "aé€😀z".as_bytes().to_vec();
        let mut with_invalid = bytes.clone();
        with_invalid.extend_from_slice(b"\xff\xe2\x82x\xf0\x9f");
        for whole in [bytes, with_invalid] {
            let expected = String::from_utf8_lossy(&whole).into_owned();
            // Every split into pieces of one size.
            for size in 1..=whole.len() {
                let mut chunker = TextChunker::default();
                let mut joined = String::new();
                for piece in whole.chunks(size) {
                    joined.push_str(&chunker.push(piece));
                }
                joined.push_str(&chunker.finish());
                assert_eq!(joined, expected, "pieces of {size}");
            }
        }
        let mut chunker = TextChunker::default();
        assert_eq!(chunker.push(&"€".as_bytes()[..2]), "");
        assert_eq!(chunker.push(&"€".as_bytes()[2..]), "€");
    }

    #[test]
    fn lines_are_bounded_and_parsed() {
        let mut input: &[u8] = b"{\"output\": \"a\\n\"}\n{\"status\": \"success\"}\nxyz";
        let first = read_line(&mut input, 100).unwrap().unwrap();
        assert_eq!(Line::parse(&first).unwrap(), Line::Chunk("a\n".into()));
        let last = read_line(&mut input, 100).unwrap().unwrap();
        assert!(matches!(Line::parse(&last).unwrap(), Line::Last(_)));
        assert!(read_line(&mut input, 100).is_err(), "a cut line");
        let mut long: &[u8] = &[b'x'; 1000];
        assert!(read_line(&mut long, 10).is_err());
        let mut empty: &[u8] = b"";
        assert!(read_line(&mut empty, 10).unwrap().is_none());
        assert!(Line::parse(b"[1]").is_err());
        assert_eq!(chunk_line("é\u{1}"), b"{\"output\":\"\xc3\xa9\\u0001\"}\n");
    }
}
