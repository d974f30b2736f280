//! The host end of the agent channel: [`AgentClient`] sends one instance's commands to its
//! agent's socket, one HTTP/1.1 request per exchange over kept-alive `UnixStream`s, and reads
//! the answer within bounds (a sandbox can replace its agent: nothing it sends may make the
//! server allocate without bound, or wait past the command's timeout and a margin). A
//! streamed command ([`AgentClient::exec_streamed`]) reads NDJSON lines, each bounded.

use crate::env::files::{Download, FileError, Kind, Upload, KIND_HEADER};
use crate::env::stream::{read_line, Line, OutputSink, MAX_CHUNK_LINE_BYTES, NDJSON};
use crate::env::wire::{answer_limit, ExecResult, ExecWire};
use crate::env::EnvError;
use crate::url::encode_query;
use parking_lot::Mutex;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Added to a command's timeout for the request that carries it.
const REQUEST_MARGIN: Duration = Duration::from_secs(30);

impl AgentError {
    /// As an environment error: a refused `cwd` is the request's fault (400), the rest the
    /// sandbox's (500).
    pub fn into_env_error(self, sandbox: &str) -> EnvError {
        match self {
            AgentError::Refused(404, detail) => EnvError::NotFound(detail),
            AgentError::Refused(status, detail)
                if status < 500 || detail.contains("not a directory") =>
            {
                EnvError::Invalid(detail)
            }
            AgentError::Refused(status, detail) => EnvError::Tool {
                what: format!("the agent in {sandbox} ({status})"),
                detail,
            },
            AgentError::Unreachable(detail) => EnvError::Tool {
                what: format!("the agent in {sandbox}"),
                detail,
            },
        }
    }
}

/// The host side: sends commands to one agent's socket, over kept-alive connections.
#[derive(Debug)]
pub struct AgentClient {
    socket: PathBuf,
    /// Idle connections; one per concurrent command at most, so never more than the
    /// server's workers.
    idle: Mutex<Vec<BufReader<UnixStream>>>,
    /// How long past the command's timeout a stream may go on ([`REQUEST_MARGIN`]).
    margin: Duration,
}

/// How a request to the agent failed.
#[derive(Debug)]
pub enum AgentError {
    /// The agent could not be reached or broke the connection.
    Unreachable(String),
    /// The agent answered with an error (`status`, its detail).
    Refused(u16, String),
}

impl AgentClient {
    pub fn new(socket: PathBuf) -> AgentClient {
        AgentClient {
            socket,
            idle: Mutex::new(Vec::new()),
            margin: REQUEST_MARGIN,
        }
    }

    /// How many connections are kept open for the next commands.
    pub fn idle_connections(&self) -> usize {
        self.idle.lock().len()
    }

    /// True once the agent answers.
    pub fn ready(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok()
    }

    pub fn exec(&self, exec: &ExecWire) -> Result<ExecResult, AgentError> {
        let limits = exec.limits().map_err(AgentError::Unreachable)?;
        let timeout = limits.timeout + REQUEST_MARGIN;
        let body =
            serde_json::to_vec(exec).map_err(|err| AgentError::Unreachable(err.to_string()))?;
        let limit = answer_limit(limits.max_output_bytes);
        let (status, answer) = self
            .post("/exec", &body, timeout, limit)
            .map_err(AgentError::Unreachable)?;
        if status == 200 {
            serde_json::from_slice(&answer)
                .map_err(|err| AgentError::Unreachable(format!("bad answer: {err}")))
        } else {
            let detail = serde_json::from_slice::<serde_json::Value>(&answer)
                .ok()
                .and_then(|value| value["detail"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&answer).into_owned());
            Err(AgentError::Refused(status, detail))
        }
    }

    /// [`AgentClient::exec`] with the output streamed (`"stream": true`): each
    /// `{"output": ...}` line the agent sends goes to `sink`, the last line is the answer.
    /// On a fresh connection, closed after. Every read is bounded: a line by the answer's
    /// limit, the whole stream by the command's timeout and [`REQUEST_MARGIN`] (an agent
    /// that streams past it, breaks the framing or never ends fails the command). An agent
    /// of an earlier build answers once, as without `stream`: its output goes to `sink` as
    /// one chunk.
    pub fn exec_streamed(
        &self,
        exec: &ExecWire,
        sink: &OutputSink,
    ) -> Result<ExecResult, AgentError> {
        let limits = exec.limits().map_err(AgentError::Unreachable)?;
        let deadline = Instant::now() + limits.timeout + self.margin;
        let exec = ExecWire {
            stream: true,
            ..exec.clone()
        };
        let body =
            serde_json::to_vec(&exec).map_err(|err| AgentError::Unreachable(err.to_string()))?;
        let limit = answer_limit(limits.max_output_bytes).max(MAX_CHUNK_LINE_BYTES);
        let mut connection = self.file_connection()?;
        let stream = connection
            .get_ref()
            .try_clone()
            .map_err(|err| AgentError::Unreachable(err.to_string()))?;
        let unreachable = |why: String| AgentError::Unreachable(why);
        let head = format!(
            "POST /exec HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let sent = connection.get_mut().write_all(head.as_bytes());
        sent.and_then(|()| connection.get_mut().write_all(&body))
            .map_err(|err| unreachable(format!("cannot send to the agent: {err}")))?;
        // The answer's head comes at once, or after the command for an earlier agent.
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|err| unreachable(err.to_string()))?;
        let (status, head) = answer_head(&mut connection)?;
        let streamed = status == 200
            && head
                .content_type
                .as_deref()
                .is_some_and(|kind| kind.starts_with(NDJSON));
        if !streamed {
            let answer = whole_body(&mut connection, &head, limit)?;
            if status != 200 {
                let value = serde_json::from_slice(&answer).unwrap_or_default();
                return Err(refusal(status, &value, &answer));
            }
            let result: ExecResult = serde_json::from_slice(&answer)
                .map_err(|err| unreachable(format!("bad answer: {err}")))?;
            sink.send(result.output.as_bytes());
            return Ok(result);
        }
        let body: Box<dyn Read> = if head.chunked {
            Box::new(ChunkedBody::new(connection))
        } else {
            Box::new(connection)
        };
        let mut lines = BufReader::with_capacity(64 * 1024, body);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(unreachable(
                    "the agent's stream went on past the command's timeout".into(),
                ));
            }
            stream
                .set_read_timeout(Some(left))
                .map_err(|err| unreachable(err.to_string()))?;
            let line = read_line(&mut lines, limit)
                .map_err(|err| unreachable(format!("a broken stream from the agent: {err}")))?
                .ok_or_else(|| unreachable("the agent's stream ended without its answer".into()))?;
            match Line::parse(&line).map_err(unreachable)? {
                Line::Chunk(text) => sink.send(text.as_bytes()),
                Line::Last(value) => {
                    if let Some(detail) = value.get("detail") {
                        let status = value["status"]
                            .as_u64()
                            .and_then(|status| u16::try_from(status).ok())
                            .unwrap_or(500);
                        let detail = detail.as_str().map_or(detail.to_string(), String::from);
                        return Err(AgentError::Refused(status, detail));
                    }
                    return serde_json::from_value(value)
                        .map_err(|err| unreachable(format!("bad answer: {err}")));
                }
            }
        }
    }

    /// One HTTP/1.1 request; the status and the body. An idle connection is reused; if it
    /// turns out closed before any answer came, the request goes once more on a fresh one
    /// (the agent never read it, so it never ran).
    fn post(
        &self,
        path: &str,
        body: &[u8],
        timeout: Duration,
        limit: u64,
    ) -> Result<(u16, Vec<u8>), String> {
        let reused = self.idle.lock().pop();
        if let Some(connection) = reused {
            match self.exchange(connection, path, body, timeout, limit) {
                Ok(answer) => return Ok(answer),
                Err(Exchange::NeverAnswered(_)) => {}
                Err(Exchange::Broken(err)) => return Err(err),
            }
        }
        let stream = UnixStream::connect(&self.socket)
            .map_err(|err| format!("cannot connect to {}: {err}", self.socket.display()))?;
        self.exchange(BufReader::new(stream), path, body, timeout, limit)
            .map_err(|(Exchange::NeverAnswered(err) | Exchange::Broken(err))| err)
    }

    fn exchange(
        &self,
        mut connection: BufReader<UnixStream>,
        path: &str,
        body: &[u8],
        timeout: Duration,
        limit: u64,
    ) -> Result<(u16, Vec<u8>), Exchange> {
        let stream = connection.get_mut();
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|err| Exchange::Broken(err.to_string()))?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body))
            .map_err(|err| Exchange::NeverAnswered(format!("cannot send to the agent: {err}")))?;
        let broken = |err: std::io::Error| Exchange::Broken(err.to_string());
        let line = match read_line_bounded(&mut connection, MAX_LINE_BYTES) {
            Ok(None) => {
                return Err(Exchange::NeverAnswered(
                    "the agent closed the connection".into(),
                ))
            }
            Ok(Some(line)) => line,
            Err(err) => return Err(Exchange::Broken(format!("no answer from the agent: {err}"))),
        };
        let status = status_of(&line)
            .ok_or_else(|| Exchange::Broken(format!("not an HTTP answer: {line:?}")))?;
        let Head {
            length,
            chunked,
            mut keep,
            ..
        } = read_head(&mut connection)?;
        let too_large = |size: u64| {
            Exchange::Broken(format!(
                "answer of {size} bytes or more is larger than {limit} bytes"
            ))
        };
        let answer = if chunked {
            read_chunked(&mut connection, limit).map_err(|err| match err {
                Chunked::TooLarge(size) => too_large(size),
                Chunked::Io(err) => broken(err),
            })?
        } else {
            match length {
                Some(length) if length <= limit => {
                    let mut answer = vec![0; length as usize];
                    connection.read_exact(&mut answer).map_err(broken)?;
                    answer
                }
                Some(length) => return Err(too_large(length)),
                None => {
                    keep = false;
                    let mut answer = Vec::new();
                    (&mut connection)
                        .take(limit + 1)
                        .read_to_end(&mut answer)
                        .map_err(broken)?;
                    if answer.len() as u64 > limit {
                        return Err(too_large(answer.len() as u64));
                    }
                    answer
                }
            }
        };
        if keep {
            self.idle.lock().push(connection);
        }
        Ok((status, answer))
    }
}

/// How long one read or write of a file transfer may wait for the agent.
const FILE_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest error answer read from an agent for a file transfer.
const FILE_ERROR_BYTES: u64 = 64 * 1024;

/// The size of one chunk of an upload.
const UPLOAD_CHUNK_BYTES: usize = 256 * 1024;

impl AgentClient {
    /// Sends `body` as the file (or tar) `upload` names, streamed in chunks: the bytes the
    /// agent wrote.
    pub fn put_file(&self, upload: &Upload, body: &mut dyn Read) -> Result<u64, AgentError> {
        let mut connection = self.file_connection()?;
        let head = format!(
            "PUT /files?{} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
            upload.query()
        );
        let stream = connection.get_mut();
        let mut sent = stream.write_all(head.as_bytes());
        // One chunk per read of the body, in one write with its frame: the agent's reads
        // and this side's writes stay large (a chunk is the most the client's body gives
        // in one read, up to UPLOAD_CHUNK_BYTES).
        let mut chunk = vec![0; UPLOAD_CHUNK_BYTES + 32];
        while sent.is_ok() {
            let frame = 10;
            let read = match body.read(&mut chunk[frame..frame + UPLOAD_CHUNK_BYTES]) {
                Ok(0) => break,
                Ok(read) => read,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                // The client's body failed (it hung up, or it is too large): the agent gets
                // no end of chunks, so it writes nothing.
                Err(err) => {
                    return Err(AgentError::Refused(
                        400,
                        FileError::stopped(&err).to_string(),
                    ))
                }
            };
            let size = format!("{read:x}\r\n");
            let start = frame - size.len();
            chunk[start..frame].copy_from_slice(size.as_bytes());
            chunk[frame + read..frame + read + 2].copy_from_slice(b"\r\n");
            sent = stream.write_all(&chunk[start..frame + read + 2]);
        }
        let sent = sent.and_then(|()| stream.write_all(b"0\r\n\r\n"));
        // An agent that refused early (a path that is a directory, a read-only place) may
        // have answered and closed before the whole body went: its answer says why.
        let answered = answer_head(&mut connection);
        let (status, head) = match (sent, answered) {
            (Ok(()), answered) => answered?,
            (Err(_), Ok((status, head))) if status != 200 => (status, head),
            (Err(err), _) => {
                return Err(AgentError::Unreachable(format!(
                    "cannot send the file to the agent: {err}"
                )))
            }
        };
        let answer = small_body(&mut connection, &head)?;
        let value = serde_json::from_slice::<serde_json::Value>(&answer).unwrap_or_default();
        if status == 200 {
            return value["bytes"]
                .as_u64()
                .ok_or_else(|| AgentError::Unreachable("bad answer to an upload".into()));
        }
        Err(refusal(status, &value, &answer))
    }

    /// Asks for the file or directory at `path`: its kind, length and a reader of its bytes
    /// straight from the agent's connection (bounded memory, whatever the size).
    pub fn get_file(&self, path: &str) -> Result<Download, AgentError> {
        let mut connection = self.file_connection()?;
        let head = format!(
            "GET /files?path={} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n",
            encode_query(path)
        );
        connection
            .get_mut()
            .write_all(head.as_bytes())
            .map_err(|err| AgentError::Unreachable(format!("cannot ask the agent: {err}")))?;
        let (status, head) = answer_head(&mut connection)?;
        if status != 200 {
            let answer = small_body(&mut connection, &head)?;
            let value = serde_json::from_slice::<serde_json::Value>(&answer).unwrap_or_default();
            return Err(refusal(status, &value, &answer));
        }
        let kind = head
            .kind
            .as_deref()
            .and_then(Kind::of_name)
            .ok_or_else(|| {
                AgentError::Unreachable(format!(
                    "the agent's download names no kind ({:?})",
                    head.kind
                ))
            })?;
        let body: Box<dyn Read + Send> = match (head.chunked, head.length) {
            (true, _) => Box::new(ChunkedBody::new(connection)),
            (false, Some(length)) => Box::new(connection.take(length)),
            (false, None) => Box::new(connection),
        };
        Ok(Download {
            kind,
            length: head.length.filter(|_| !head.chunked),
            body,
        })
    }

    /// A fresh connection for one file transfer (closed after it), with its I/O timeouts.
    fn file_connection(&self) -> Result<BufReader<UnixStream>, AgentError> {
        let stream = UnixStream::connect(&self.socket).map_err(|err| {
            AgentError::Unreachable(format!(
                "cannot connect to {}: {err}",
                self.socket.display()
            ))
        })?;
        stream
            .set_read_timeout(Some(FILE_IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(FILE_IO_TIMEOUT)))
            .map_err(|err| AgentError::Unreachable(err.to_string()))?;
        Ok(BufReader::new(stream))
    }
}

/// The status line and headers of an answer, bounded.
fn answer_head(connection: &mut BufReader<UnixStream>) -> Result<(u16, Head), AgentError> {
    let broken = |why: String| AgentError::Unreachable(why);
    let line = read_line_bounded(connection, MAX_LINE_BYTES)
        .map_err(|err| broken(format!("no answer from the agent: {err}")))?
        .ok_or_else(|| broken("the agent closed the connection".into()))?;
    let status = status_of(&line).ok_or_else(|| broken(format!("not an HTTP answer: {line:?}")))?;
    let head = read_head(connection)
        .map_err(|(Exchange::NeverAnswered(why) | Exchange::Broken(why))| broken(why))?;
    Ok((status, head))
}

/// A short answer's body (an error, an upload's count), at most [`FILE_ERROR_BYTES`].
fn small_body(connection: &mut BufReader<UnixStream>, head: &Head) -> Result<Vec<u8>, AgentError> {
    let broken =
        |why: String| AgentError::Unreachable(format!("a bad answer from the agent: {why}"));
    if head.chunked {
        return read_chunked(connection, FILE_ERROR_BYTES).map_err(|err| match err {
            Chunked::TooLarge(size) => broken(format!("{size} bytes or more")),
            Chunked::Io(err) => broken(err.to_string()),
        });
    }
    let mut answer = Vec::new();
    connection
        .take(
            head.length
                .unwrap_or(FILE_ERROR_BYTES)
                .min(FILE_ERROR_BYTES),
        )
        .read_to_end(&mut answer)
        .map_err(|err| broken(err.to_string()))?;
    Ok(answer)
}

/// A whole answer's body (chunked, of a known length, or to the end), at most `limit` bytes.
fn whole_body(
    connection: &mut BufReader<UnixStream>,
    head: &Head,
    limit: u64,
) -> Result<Vec<u8>, AgentError> {
    let broken =
        |why: String| AgentError::Unreachable(format!("a bad answer from the agent: {why}"));
    if head.chunked {
        return read_chunked(connection, limit).map_err(|err| match err {
            Chunked::TooLarge(size) => broken(format!("{size} bytes or more")),
            Chunked::Io(err) => broken(err.to_string()),
        });
    }
    let mut answer = Vec::new();
    connection
        .take(head.length.unwrap_or(limit + 1).min(limit + 1))
        .read_to_end(&mut answer)
        .map_err(|err| broken(err.to_string()))?;
    if answer.len() as u64 > limit {
        return Err(broken(format!("larger than {limit} bytes")));
    }
    Ok(answer)
}

/// An agent's refusal, with its `detail` (or its words).
fn refusal(status: u16, value: &serde_json::Value, answer: &[u8]) -> AgentError {
    let detail = value["detail"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| String::from_utf8_lossy(answer).into_owned());
    AgentError::Refused(status, detail)
}

/// The status code of an HTTP/1.x status line.
fn status_of(line: &str) -> Option<u16> {
    line.strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
}

/// A `Transfer-Encoding: chunked` body, decoded as it is read (a download of any size, a
/// streamed command); a chunk-size line longer than [`MAX_LINE_BYTES`] or a broken frame is
/// an error.
struct ChunkedBody<R> {
    reader: R,
    /// Bytes left in the current chunk.
    left: u64,
    done: bool,
}

impl<R: BufRead> ChunkedBody<R> {
    fn new(reader: R) -> ChunkedBody<R> {
        ChunkedBody {
            reader,
            left: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Read for ChunkedBody<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
        while self.left == 0 {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            let line = read_line_bounded(&mut self.reader, MAX_LINE_BYTES)?
                .ok_or_else(|| bad("the body ended in a chunk size"))?;
            let digits = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(digits, 16).map_err(|_| bad("a bad chunk size"))?;
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let read = self.reader.read(&mut buf[..want])?;
        if read == 0 {
            return Err(bad("the body ended inside a chunk"));
        }
        self.left -= read as u64;
        if self.left == 0 {
            let mut end = [0u8; 2];
            self.reader.read_exact(&mut end)?;
            if &end != b"\r\n" {
                return Err(bad("a chunk not followed by CRLF"));
            }
        }
        Ok(read)
    }
}

/// What the headers of an answer say about its body.
struct Head {
    length: Option<u64>,
    chunked: bool,
    /// What a download is ([`KIND_HEADER`]).
    kind: Option<String>,
    /// Its `Content-Type`.
    content_type: Option<String>,
    /// The connection can carry the next request.
    keep: bool,
}

/// Reads the header lines of an answer (after its status line), bounded in count and length.
fn read_head(connection: &mut BufReader<UnixStream>) -> Result<Head, Exchange> {
    let broken = |err: std::io::Error| Exchange::Broken(err.to_string());
    let mut head = Head {
        length: None,
        chunked: false,
        kind: None,
        content_type: None,
        keep: true,
    };
    for count in 0.. {
        if count > MAX_HEADERS {
            return Err(Exchange::Broken("too many headers in the answer".into()));
        }
        let line = read_line_bounded(connection, MAX_LINE_BYTES)
            .map_err(broken)?
            .ok_or_else(|| Exchange::Broken("the answer ended in its headers".into()))?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(Exchange::Broken(format!("bad header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let parsed = value
                .parse()
                .map_err(|_| Exchange::Broken(format!("bad content-length {value:?}")))?;
            if head.length.is_some_and(|known| known != parsed) {
                return Err(Exchange::Broken("two content-lengths in the answer".into()));
            }
            head.length = Some(parsed);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.eq_ignore_ascii_case("chunked");
            if !head.chunked && !value.eq_ignore_ascii_case("identity") {
                return Err(Exchange::Broken(format!(
                    "transfer-encoding {value:?} is not understood"
                )));
            }
        } else if name.eq_ignore_ascii_case(KIND_HEADER) {
            head.kind = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            head.keep = false;
        }
    }
    Ok(head)
}

/// The longest status or header line the client reads from an agent (a sandbox can replace
/// its agent: nothing it sends may make the server allocate without bound).
const MAX_LINE_BYTES: u64 = 8 * 1024;

/// The most header lines the client reads from one answer.
const MAX_HEADERS: usize = 64;

/// One line (CRLF or LF ended, without it), at most `max` bytes; `None` at end-of-file before
/// any byte.
fn read_line_bounded(reader: &mut impl BufRead, max: u64) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let read = reader.take(max + 1).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        let why = if line.len() as u64 > max {
            format!("a line longer than {max} bytes")
        } else {
            "end of stream inside a line".to_string()
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "a line not in UTF-8"))
}

/// How reading a chunked body failed.
enum Chunked {
    TooLarge(u64),
    Io(std::io::Error),
}

impl From<std::io::Error> for Chunked {
    fn from(err: std::io::Error) -> Chunked {
        Chunked::Io(err)
    }
}

/// A `Transfer-Encoding: chunked` body of at most `limit` bytes (trailers skipped).
fn read_chunked(reader: &mut impl BufRead, limit: u64) -> Result<Vec<u8>, Chunked> {
    let bad = |why: String| Chunked::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    let mut body = Vec::new();
    loop {
        let line = read_line_bounded(reader, MAX_LINE_BYTES)?
            .ok_or_else(|| bad("the answer ended in a chunk size".into()))?;
        let digits = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(digits, 16)
            .map_err(|_| bad(format!("bad chunk size {digits:?}")))?;
        if size == 0 {
            for _ in 0..=MAX_HEADERS {
                match read_line_bounded(reader, MAX_LINE_BYTES)? {
                    Some(trailer) if !trailer.is_empty() => continue,
                    _ => return Ok(body),
                }
            }
            return Err(bad("too many trailers".into()));
        }
        let total = body.len() as u64 + size;
        if total > limit {
            return Err(Chunked::TooLarge(total));
        }
        let at = body.len();
        body.resize(at + size as usize, 0);
        reader.read_exact(&mut body[at..])?;
        let mut end = [0u8; 2];
        reader.read_exact(&mut end)?;
        if &end != b"\r\n" {
            return Err(bad("a chunk not followed by CRLF".into()));
        }
    }
}

/// How one exchange on a connection failed.
enum Exchange {
    /// Before any answer: the request can go again on another connection.
    NeverAnswered(String),
    /// After the agent may have run it: report, do not repeat.
    Broken(String),
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    fn exec_of(cmd: &str, max_output_bytes: usize) -> ExecWire {
        ExecWire {
            run_id: None,
            cmd: cmd.into(),
            cwd: None,
            env: Default::default(),
            timeout: Some(30.0),
            max_output_bytes: Some(max_output_bytes),
            shell: Some(vec!["sh".into(), "-c".into()]),
            stdin: None,
            stream: false,
        }
    }

    /// A fake agent that answers every request on `socket` with `answer` (raw bytes).
    fn fake_agent(tag: &str, answer: Vec<u8>) -> (AgentClient, PathBuf) {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("ars-fake-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("s");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let answer = answer.clone();
                // Every request on the connection gets the answer (kept-alive, as the agent).
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    loop {
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if let Some(value) = line.strip_prefix("Content-Length: ") {
                                length = value.trim().parse().unwrap();
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; length];
                        let _ = reader.read_exact(&mut body);
                        if stream.write_all(&answer).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (AgentClient::new(socket), dir)
    }

    #[test]
    fn chunked_answers_are_read() {
        let json = serde_json::to_vec(&ExecResult {
            output: "y".repeat(70_000),
            returncode: 0,
            timed_out: false,
            truncated: false,
            duration_s: 0.1,
        })
        .unwrap();
        let mut answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for chunk in json.chunks(8192) {
            answer.extend(format!("{:x}\r\n", chunk.len()).bytes());
            answer.extend(chunk);
            answer.extend(b"\r\n");
        }
        answer.extend(b"0\r\n\r\n");
        let (client, dir) = fake_agent("chunked", answer);
        for _ in 0..2 {
            let result = client.exec(&exec_of("x", 100_000)).unwrap();
            assert_eq!(result.output.len(), 70_000);
        }
        assert_eq!(client.idle_connections(), 1, "the connection was kept");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_hostile_agent_cannot_make_the_server_allocate() {
        let long_line = [b"HTTP/1.1 200 ".to_vec(), vec![b'a'; 1 << 20]].concat();
        let huge_length = b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n".to_vec();
        let huge_chunk =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffff\r\n".to_vec();
        let endless_headers = [b"HTTP/1.1 200 OK\r\n".to_vec(), b"X: y\r\n".repeat(1000)].concat();
        let not_http = b"SSH-2.0-OpenSSH\r\n\r\n".to_vec();
        for (tag, answer, words) in [
            ("line", long_line, "longer than"),
            ("length", huge_length, "larger than"),
            ("chunk", huge_chunk, "larger than"),
            ("headers", endless_headers, "too many headers"),
            ("nothttp", not_http, "not an HTTP answer"),
        ] {
            let (client, dir) = fake_agent(tag, answer);
            match client.exec(&exec_of("x", 1000)) {
                Err(AgentError::Unreachable(detail)) => {
                    assert!(detail.contains(words), "{tag}: {detail}")
                }
                other => panic!("{tag}: {other:?}"),
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// An NDJSON answer in chunks of `body`'s pieces, as the agent streams.
    fn ndjson(pieces: &[&[u8]], end: bool) -> Vec<u8> {
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {NDJSON}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for piece in pieces {
            answer.extend(format!("{:x}\r\n", piece.len()).bytes());
            answer.extend(*piece);
            answer.extend(b"\r\n");
        }
        if end {
            answer.extend(b"0\r\n\r\n");
        }
        answer
    }

    /// A sink that keeps what it got, and the sink.
    fn kept() -> (Arc<Mutex<Vec<u8>>>, OutputSink) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let into = Arc::clone(&got);
        (
            got,
            OutputSink::new(move |bytes| into.lock().extend_from_slice(bytes)),
        )
    }

    #[test]
    fn a_streamed_answer_is_passed_on_and_a_hostile_one_fails_within_bounds() {
        let result = ExecResult {
            output: "ab\n".into(),
            returncode: 3,
            timed_out: false,
            truncated: false,
            duration_s: 0.1,
        };
        let last = format!("{}\n", serde_json::to_string(&result).unwrap());
        // A good stream: the chunks to the sink, the last line the answer.
        let (client, dir) = fake_agent(
            "st-ok",
            ndjson(
                &[
                    b"{\"output\":\"a\"}\n{\"out",
                    b"put\":\"b\\n\"}\n",
                    last.as_bytes(),
                ],
                true,
            ),
        );
        let (got, sink) = kept();
        assert_eq!(
            client.exec_streamed(&exec_of("x", 100), &sink).unwrap(),
            result
        );
        assert_eq!(*got.lock(), b"ab\n");
        let _ = std::fs::remove_dir_all(&dir);
        // An agent of an earlier build answers once: its output is one chunk.
        let json = serde_json::to_vec(&result).unwrap();
        let mut once =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", json.len()).into_bytes();
        once.extend(&json);
        let (client, dir) = fake_agent("st-old", once);
        let (got, sink) = kept();
        assert_eq!(
            client.exec_streamed(&exec_of("x", 100), &sink).unwrap(),
            result
        );
        assert_eq!(*got.lock(), b"ab\n");
        let _ = std::fs::remove_dir_all(&dir);
        // An error after the stream began: the agent's refusal, with its status.
        let (client, dir) = fake_agent(
            "st-err",
            ndjson(
                &[b"{\"detail\":\"cannot run the shell\",\"status\":500}\n"],
                true,
            ),
        );
        let (_, sink) = kept();
        assert!(matches!(
            client.exec_streamed(&exec_of("x", 100), &sink),
            Err(AgentError::Refused(500, detail)) if detail.contains("cannot run")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        // Broken or hostile streams fail the command (an infra error), reading a line at most.
        let endless_line = vec![b'x'; 3 << 20];
        for (tag, answer, words) in [
            ("st-line", ndjson(&[&endless_line], false), "longer than"),
            (
                "st-cut",
                ndjson(&[b"{\"output\":\"a\"}\n{\"outp"], true),
                "cut in the middle",
            ),
            (
                "st-nolast",
                ndjson(&[b"{\"output\":\"a\"}\n"], true),
                "without its answer",
            ),
            ("st-json", ndjson(&[b"not json\n"], true), "not JSON"),
            ("st-array", ndjson(&[b"[1]\n"], true), "not a JSON object"),
            (
                "st-frame",
                ndjson(&[b"{\"output\":\"a\"}\n"], false)
                    .into_iter()
                    .chain(*b"zz\r\n")
                    .collect(),
                "chunk size",
            ),
            (
                "st-result",
                ndjson(&[b"{\"returncode\":\"x\"}\n"], true),
                "bad answer",
            ),
            (
                "st-early",
                ndjson(&[b"{\"output\":\"a\"}\n"], false),
                "broken stream",
            ),
        ] {
            let (mut client, dir) = fake_agent(tag, answer);
            // An agent that stops sending is given the command's timeout and this margin.
            client.margin = Duration::from_millis(500);
            let mut exec = exec_of("x", 1000);
            exec.timeout = Some(0.5);
            let (got, sink) = kept();
            let started = Instant::now();
            match client.exec_streamed(&exec, &sink) {
                Err(AgentError::Unreachable(detail)) => {
                    assert!(detail.contains(words), "{tag}: {detail}")
                }
                other => panic!("{tag}: {other:?}"),
            }
            assert!(got.lock().len() <= 1, "{tag}");
            assert!(started.elapsed() < Duration::from_secs(5), "{tag}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn a_download_from_a_broken_or_hostile_agent_fails_within_bounds() {
        let chunked = |body: &[u8]| {
            let mut answer =
                b"HTTP/1.1 200 OK\r\nX-Arservice-Kind: file\r\nTransfer-Encoding: chunked\r\n\r\n"
                    .to_vec();
            answer.extend(body);
            answer
        };
        // A good chunked download, read to its end.
        let (client, dir) = fake_agent("dl-ok", chunked(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"));
        let mut bytes = Vec::new();
        let download = client.get_file("/x").unwrap();
        assert_eq!(download.kind, Kind::File);
        download.body.take(1 << 20).read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes, b"abcde");
        let _ = std::fs::remove_dir_all(&dir);
        // Broken bodies fail the read, never allocate beyond a line.
        for (tag, body) in [
            ("dl-size", chunked(b"zz\r\nabc")),
            ("dl-line", chunked(&vec![b'1'; 1 << 20])),
            ("dl-crlf", chunked(b"3\r\nabcXX")),
        ] {
            let (client, dir) = fake_agent(tag, body);
            let mut sink = Vec::new();
            let read = client.get_file("/x").unwrap().body.read_to_end(&mut sink);
            assert!(read.is_err(), "{tag}: {sink:?}");
            let _ = std::fs::remove_dir_all(&dir);
        }
        // No kind: not a download; a 404: the path is missing.
        let (client, dir) = fake_agent(
            "dl-nokind",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx".to_vec(),
        );
        match client.get_file("/x") {
            Err(AgentError::Unreachable(detail)) => assert!(detail.contains("no kind"), "{detail}"),
            other => panic!("{:?}", other.map(|download| download.kind)),
        }
        let _ = std::fs::remove_dir_all(&dir);
        let missing = br#"{"detail":"/x: no such file or directory"}"#;
        let mut answer = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\n\r\n",
            missing.len()
        )
        .into_bytes();
        answer.extend(missing);
        let (client, dir) = fake_agent("dl-404", answer);
        match client.get_file("/x").map(|download| download.kind) {
            Err(err) => assert!(matches!(err.into_env_error("s"), EnvError::NotFound(_))),
            Ok(kind) => panic!("{kind:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
