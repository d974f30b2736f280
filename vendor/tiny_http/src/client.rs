//! One connection, served by one thread from its first byte to its close.
//!
//! arservice patch (PATCHED.md): this file was rewritten. The thread reads a request's head
//! within bounds (line and head sizes, header count, a deadline), checks the headers that
//! delimit the body, hands the request out, then writes its answer itself as the answer's
//! bytes arrive (see `request::Handoff`), and only then reads the next request. So a client
//! holds one thread (its own), never a worker: not by sending slowly, not by not reading, not
//! by pipelining. Whatever the connection refuses is answered with a JSON error and closed.

use ascii::AsciiString;

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

use crate::common::{HTTPVersion, Header, HeaderField, Method};
use crate::request::{Framing, Handoff, Out};
use crate::response::refusal;
use crate::util::{MessagesQueue, RefinedTcpStream, SequentialReader, SequentialReaderBuilder};
use crate::util::{Phase, Place, Policy, ReadPolicy, TimedReader};
use crate::{Handler, Limits, Message};

/// Where the server's handler is, once it is set (`Server::set_handler`).
pub(crate) type HandlerSlot = std::sync::Arc<std::sync::OnceLock<Handler>>;

/// Writes of one answer that may wait for the connection's thread: enough that a whole answer
/// (and a `100 Continue`) never waits, few enough that a streamed answer the client does not
/// take holds little memory.
const HANDOFF_DEPTH: usize = 16;

/// What is written to a client at a time, each piece a sign of progress.
const WRITE_PIECE_BYTES: usize = 64 * 1024;

/// A connection to a client and the thread's state for it.
pub struct ClientConnection {
    // address of the client
    remote_addr: Option<SocketAddr>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<TimedReader>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<TimedReader>>,

    // the write half; dropping it sends the end of the stream
    writer: Option<RefinedTcpStream>,

    // what the reads of this connection may take
    policy: ReadPolicy,

    // this connection's place among those served
    place: Place,

    limits: Limits,

    // true if the connection goes through SSL
    secure: bool,
}

/// A request's head, read and checked.
struct Head {
    method: Method,
    path: String,
    version: HTTPVersion,
    headers: Vec<Header>,
    framing: Framing,
    /// No request follows on this connection.
    last: bool,
}

/// Why no request came.
enum HeadError {
    /// The client closed, went quiet before sending anything, or its socket failed: nothing
    /// to answer.
    Gone,
    /// Answer this status with this detail, then close.
    Refuse(u16, String),
}

fn bad(detail: impl Into<String>) -> HeadError {
    HeadError::Refuse(400, detail.into())
}

/// `tchar` of RFC 9110: what a method or a header name is made of.
fn is_token(text: &[u8]) -> bool {
    !text.is_empty()
        && text
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub(crate) fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
        place: Place,
        limits: Limits,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr().ok().flatten();
        let secure = read_socket.secure();
        let policy = ReadPolicy::new(Policy::Until(Instant::now() + limits.keep_alive));
        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(
            1024,
            TimedReader::new(read_socket, policy.clone()),
        ));
        let first_header = source.next().unwrap();

        ClientConnection {
            source,
            writer: Some(write_socket),
            remote_addr,
            next_header_source: first_header,
            policy,
            place,
            limits,
            secure,
        }
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Serves requests one after the other until the client leaves or one is refused. Each
    /// goes to the server's handler on this thread when one is set (arservice patch), else to
    /// `messages` (`Server::recv`).
    pub(crate) fn serve(mut self, messages: &MessagesQueue<Message>, handler: &HandlerSlot) {
        loop {
            let head = match self.read_head() {
                Ok(head) => head,
                Err(HeadError::Gone) => return,
                Err(HeadError::Refuse(status, detail)) => {
                    self.write(&refusal(status, &detail, None));
                    self.linger();
                    return;
                }
            };
            self.place.entry.set(Phase::Busy);
            self.policy.set(Policy::Each(self.limits.io_timeout));

            // The body reader of this request; the next head is read after it is dropped.
            let mut data_source = self.source.next().unwrap();
            std::mem::swap(&mut self.next_header_source, &mut data_source);
            let (to_connection, from_request) = sync_channel(HANDOFF_DEPTH);
            let request = crate::request::new_request(
                self.secure,
                head.method,
                head.path,
                head.version,
                head.headers,
                self.remote_addr,
                data_source,
                head.framing,
                Handoff::new(to_connection.clone()),
            )
            .on_connection(to_connection, head.last);
            let body_done = request.body_done();
            match handler.get() {
                Some(handler) => {
                    // A panic ends this connection, not the server.
                    let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        handler(request)
                    }));
                    if handled.is_err() {
                        return;
                    }
                }
                None => messages.push(request.into()),
            }

            if !self.relay(from_request) {
                return;
            }
            if head.last || !body_done.load(Ordering::SeqCst) {
                self.linger();
                return;
            }
        }
    }

    /// Writes the answer's bytes and runs the work sent to this thread, until the request is
    /// answered and gone (every sender dropped). False when the client cannot be written to.
    fn relay(&mut self, from_request: Receiver<Out>) -> bool {
        for out in from_request.iter() {
            match out {
                // The answer was cut: close (the caller drops the connection).
                Out::Cut => return false,
                Out::Bytes(bytes) => {
                    if !self.write(&bytes) {
                        return false;
                    }
                }
                Out::Run(mut request, task) => {
                    if request.must_send_continue {
                        request.must_send_continue = false;
                        let version = request.http_version().clone();
                        let line = format!("HTTP/{}.{} 100 Continue\r\n\r\n", version.0, version.1);
                        if !self.write(line.as_bytes()) {
                            return false;
                        }
                    }
                    task(request);
                }
            }
        }
        true
    }

    /// Writes to the client; false when it failed (the write timeout included). Each piece
    /// written is progress: only a client that takes nothing for `stall` looks stalled.
    fn write(&mut self, bytes: &[u8]) -> bool {
        let Some(writer) = self.writer.as_mut() else {
            return false;
        };
        for piece in bytes.chunks(WRITE_PIECE_BYTES) {
            self.place.entry.set(Phase::Writing);
            if writer.write_all(piece).is_err() {
                return false;
            }
        }
        self.place.entry.set(Phase::Busy);
        writer.flush().is_ok()
    }

    /// Closes the sending side, then reads and drops what the client still sends for a
    /// moment, so that it reads the last answer rather than a reset, and closes.
    fn linger(mut self) {
        self.place.entry.set(Phase::Closing);
        drop(self.writer.take());
        self.policy
            .set(Policy::Until(Instant::now() + self.limits.linger));
        let mut sink = [0u8; 16 * 1024];
        while let Ok(read) = self.next_header_source.read(&mut sink) {
            if read == 0 {
                break;
            }
        }
    }

    /// The next byte of the head; `started` turns true at the first one, which moves the
    /// deadline from the keep-alive wait to the head's own.
    fn next_byte(&mut self, started: &mut bool) -> Result<u8, HeadError> {
        let mut byte = [0u8];
        loop {
            match self.next_header_source.read(&mut byte) {
                Ok(0) => return Err(HeadError::Gone),
                Ok(_) => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == ErrorKind::TimedOut && *started => {
                    return Err(HeadError::Refuse(
                        408,
                        format!(
                            "the request head did not arrive within {} s",
                            self.limits.head_timeout.as_secs_f64()
                        ),
                    ))
                }
                Err(_) => return Err(HeadError::Gone),
            }
        }
        if !*started {
            *started = true;
            self.place.entry.set(Phase::Head);
            self.policy
                .set(Policy::Until(Instant::now() + self.limits.head_timeout));
        }
        Ok(byte[0])
    }

    /// One line of the head without its line end (CRLF, or a bare LF), within `max_line`
    /// bytes and what is left of the head's `budget`.
    fn read_line(
        &mut self,
        started: &mut bool,
        budget: &mut usize,
        too_long: (u16, &str),
    ) -> Result<Vec<u8>, HeadError> {
        let mut line = Vec::new();
        loop {
            let byte = self.next_byte(started)?;
            if *budget == 0 {
                return Err(HeadError::Refuse(
                    431,
                    format!(
                        "the request head is longer than {} bytes",
                        self.limits.max_head_bytes
                    ),
                ));
            }
            *budget -= 1;
            if byte == b'\n' {
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.contains(&b'\r') {
                    return Err(bad("a line of the request head holds a bare CR"));
                }
                return Ok(line);
            }
            if line.len() >= self.limits.max_line_bytes {
                let (status, what) = too_long;
                return Err(HeadError::Refuse(
                    status,
                    format!(
                        "the {what} is longer than {} bytes",
                        self.limits.max_line_bytes
                    ),
                ));
            }
            line.push(byte);
        }
    }

    /// Reads and checks a request's head: a request line of HTTP/1.0 or 1.1, header lines
    /// within the limits, and one unambiguous way to tell where the body ends.
    fn read_head(&mut self) -> Result<Head, HeadError> {
        self.place.entry.set(Phase::Idle);
        self.policy
            .set(Policy::Until(Instant::now() + self.limits.keep_alive));
        let mut started = false;
        let mut budget = self.limits.max_head_bytes;
        // Empty lines before a request line are ignored (RFC 9112 §2.2).
        let line = loop {
            let line = self.read_line(&mut started, &mut budget, (414, "request line"))?;
            if !line.is_empty() {
                break line;
            }
        };
        let (method, path, version) = parse_request_line(&line)?;

        let mut headers = Vec::new();
        loop {
            let line = self.read_line(&mut started, &mut budget, (431, "header line"))?;
            if line.is_empty() {
                break;
            }
            if headers.len() >= self.limits.max_headers {
                return Err(HeadError::Refuse(
                    431,
                    format!(
                        "the request has more than {} headers",
                        self.limits.max_headers
                    ),
                ));
            }
            headers.push(parse_header(&line)?);
        }

        let all = |name: &'static str| -> Vec<&str> {
            headers
                .iter()
                .filter(|header| header.field.equiv(name))
                .map(|header| header.value.as_str())
                .collect()
        };
        let transfer_encodings = all("Transfer-Encoding");
        let content_lengths = all("Content-Length");
        let framing = if !transfer_encodings.is_empty() {
            if version == HTTPVersion(1, 0) {
                return Err(bad(
                    "Transfer-Encoding is not allowed in an HTTP/1.0 request",
                ));
            }
            if transfer_encodings.len() > 1
                || !transfer_encodings[0].trim().eq_ignore_ascii_case("chunked")
            {
                return Err(bad(
                    "only 'Transfer-Encoding: chunked' is accepted, and only once",
                ));
            }
            if !content_lengths.is_empty() {
                return Err(bad(
                    "a request with both Transfer-Encoding and Content-Length is ambiguous: send one",
                ));
            }
            Framing::Chunked
        } else {
            match content_lengths.as_slice() {
                [] => Framing::None,
                [length] => {
                    let digits = length.trim();
                    let valid = !digits.is_empty()
                        && digits.len() <= 18
                        && digits.bytes().all(|b| b.is_ascii_digit());
                    match digits.parse::<usize>() {
                        Ok(length) if valid => Framing::Length(length),
                        _ => {
                            return Err(bad(format!(
                                "invalid Content-Length '{}': expected a number of bytes",
                                &digits[..digits.len().min(40)]
                            )))
                        }
                    }
                }
                _ => return Err(bad("more than one Content-Length header")),
            }
        };
        for expect in all("Expect") {
            if !expect.trim().eq_ignore_ascii_case("100-continue") {
                return Err(HeadError::Refuse(
                    417,
                    "the only expectation served is 'Expect: 100-continue'".into(),
                ));
            }
        }

        let connection = all("Connection").join(",").to_ascii_lowercase();
        let tokens: Vec<&str> = connection.split(',').map(str::trim).collect();
        // An upgrade is never made: the request is answered in HTTP/1.1, and the connection
        // closed after it (the client may have sent what it meant to speak after the upgrade).
        let last = tokens.contains(&"close")
            || tokens.contains(&"upgrade")
            || (version == HTTPVersion(1, 0) && !tokens.contains(&"keep-alive"));
        Ok(Head {
            method,
            path,
            version,
            headers,
            framing,
            last,
        })
    }
}

/// `METHOD SP target SP HTTP/1.x`, nothing else.
fn parse_request_line(line: &[u8]) -> Result<(Method, String, HTTPVersion), HeadError> {
    let malformed = || {
        bad(format!(
            "malformed request line {:?}: expected METHOD /path HTTP/1.1",
            String::from_utf8_lossy(&line[..line.len().min(80)])
        ))
    };
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return Err(malformed());
    };
    let version = match *version {
        b"HTTP/1.1" => HTTPVersion(1, 1),
        b"HTTP/1.0" => HTTPVersion(1, 0),
        other if other.starts_with(b"HTTP/") => {
            return Err(bad(format!(
                "{} is not served here: speak HTTP/1.1 (or HTTP/1.0)",
                String::from_utf8_lossy(&other[..other.len().min(16)])
            )))
        }
        _ => return Err(malformed()),
    };
    if !is_token(method) || target.is_empty() || !target.iter().all(|&b| b.is_ascii_graphic()) {
        return Err(malformed());
    }
    let method = std::str::from_utf8(method)
        .ok()
        .and_then(|method| method.parse().ok())
        .ok_or_else(malformed)?;
    let path = String::from_utf8(target.to_vec()).map_err(|_| malformed())?;
    Ok((method, path, version))
}

/// `name: value`, with a token for a name and no control character in the value.
fn parse_header(line: &[u8]) -> Result<Header, HeadError> {
    let shown = || String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
    if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Err(bad(format!(
            "a folded header line (one that starts with a space) is not accepted: {:?}",
            shown()
        )));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| bad(format!("a header line without ':': {:?}", shown())))?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if !is_token(name) {
        return Err(bad(format!("malformed header name in {:?}", shown())));
    }
    let value = value
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == b'\t')
        .collect::<Vec<u8>>();
    let end = value
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |at| at + 1);
    let value = &value[..end];
    if !value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(bad(format!(
            "the header value in {:?} holds a control or non-ASCII byte",
            shown()
        )));
    }
    Ok(Header {
        field: HeaderField::from_bytes(name.to_vec()).map_err(|_| bad("malformed header name"))?,
        value: AsciiString::from_ascii(value.to_vec())
            .map_err(|_| bad("a header value is not ASCII"))?,
    })
}

#[cfg(test)]
mod test {
    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line(b"GET /hello HTTP/1.1")
            .ok()
            .unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        for bad in [
            &b"GET /hello"[..],
            b"qsd qsd qsd",
            b"GET  /hello HTTP/1.1",
            b"GET /hello HTTP/1.1 x",
            b"GET /a\x01 HTTP/1.1",
            b"G(T / HTTP/1.1",
            b"PRI * HTTP/2.0",
        ] {
            assert!(super::parse_request_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn headers() {
        let header = super::parse_header(b"X-A: \t va lue \t").ok().unwrap();
        assert_eq!(header.value.as_str(), "va lue");
        for bad in [
            &b" X: y"[..],
            b": y",
            b"X Y: z",
            b"X: \x01",
            b"X: \xc3\xa4",
            b"nocolon",
        ] {
            assert!(super::parse_header(bad).is_err(), "{bad:?}");
        }
    }
}
