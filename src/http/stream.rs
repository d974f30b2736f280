//! `/execute_command` with `"stream": true`: the command's output as NDJSON lines as it is
//! read (`{"output": "<chunk>"}`, one per read of the output, never splitting a UTF-8
//! sequence), then one last line that is the object a non-streamed call answers.
//!
//! Runs on a thread of its own holding one of the work places, never on the connection's
//! thread: the patched tiny_http hands every write to that thread (`http/files.rs` streams
//! the same way). A second thread writes the answer (`answer::respond_streaming`), fed one
//! line at a time through a channel of one: the server holds at most a line or two of the
//! stream besides the capped answer, and a client that reads slowly slows the command's
//! output down as a full pipe would. Never past the command's deadline: a line that the
//! client has not taken by then (or within [`STALL_GRACE`], when the deadline is past) drops
//! the stream, so that the spawn helper, which calls the sink from its read loop, times the
//! command out on time whatever the client does.
//!
//! The head goes out with the first output: an error before that (an unknown instance, a
//! `cwd` that is not a directory, a dead sandbox) is the usual JSON error with its status.
//! For that, text that could be the start of the `cwd` refusal line ([`CWD_REFUSED`], what
//! the CLI paths print instead of running the command) is held back until more output or
//! the end comes. An error after the stream began (the agent or the job died) ends it with
//! the error object as its last line, its would-be status in `http_status`: the HTTP status
//! is already 200. A client that hangs up does not stop the command: it runs to its end,
//! its lines dropped, and is counted as any other.

use super::answer::{access_log, header, respond_streaming, STREAM_CHUNK_BYTES};
use super::route::Route;
use super::{answer, finish, Places, Reply};
use crate::api::ExecCommand;
use crate::env::stream::{chunk_line, OutputSink, TextChunker, NDJSON};
use crate::env::CWD_REFUSED;
use crate::service::Service;
use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;
use serde_json::json;
use std::io::Read;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use tiny_http::Request;

/// How long a line of output may wait for a client that is not taking it once the command's
/// deadline has passed (a command killed at its timeout prints to the end of its grace).
const STALL_GRACE: Duration = Duration::from_secs(1);

/// Runs a streamed command on a thread of its own once it holds one of the work places.
pub(super) fn spawn(
    service: &Arc<Service>,
    places: &Arc<Places>,
    request: Request,
    command: ExecCommand,
    received: Instant,
) {
    let (service, places) = (Arc::clone(service), Arc::clone(places));
    let spawned = thread::Builder::new().name("stream".into()).spawn(move || {
        let _place = places.take();
        serve(&service, request, command, received);
    });
    if let Err(err) = spawned {
        log::error!("cannot start a thread for a streamed command: {err}");
    }
}

/// Where the answer is.
enum Phase {
    /// Nothing sent yet: an error can still be answered with its own status.
    Waiting(Request),
    /// The head went out; lines go to the writer.
    Streaming {
        lines: Sender<Vec<u8>>,
        writer: thread::JoinHandle<()>,
    },
    /// The client went away (or the writer could not start): what is left is dropped.
    Gone,
}

/// One streamed answer's state, shared by the sink (called from the thread that reads the
/// command's output) and the end.
struct Stream {
    phase: Phase,
    chunker: TextChunker,
    /// Text held back: it could be the start of the `cwd` refusal line.
    held: String,
    /// What was sent ends a line (or nothing was sent).
    at_line_start: bool,
    /// When the command runs out of time (`None`: unknown, its answer is an error).
    deadline: Option<Instant>,
}

impl Stream {
    /// More of the command's output.
    fn output(&mut self, bytes: &[u8]) {
        let text = self.chunker.push(bytes);
        if text.is_empty() {
            return;
        }
        self.held.push_str(&text);
        let keep = refusal_start(&self.held, self.at_line_start);
        if keep > 0 {
            let rest = self.held.split_off(keep);
            let ready = std::mem::replace(&mut self.held, rest);
            self.text(&ready);
        }
    }

    /// Sends `text` as one chunk line.
    fn text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        self.at_line_start = text.ends_with('\n');
        let by = self
            .deadline
            .map(|deadline| deadline.max(Instant::now() + STALL_GRACE));
        self.line(chunk_line(text), by);
    }

    /// Sends one line, starting the answer if it has not started; waits for the writer until
    /// `by` at the most (`None`: as long as the writer lives), and drops the stream when it
    /// could not send.
    fn line(&mut self, line: Vec<u8>, by: Option<Instant>) {
        if let Phase::Waiting(_) = self.phase {
            let Phase::Waiting(request) = std::mem::replace(&mut self.phase, Phase::Gone) else {
                return;
            };
            self.phase = start(request);
        }
        if let Phase::Streaming { lines, .. } = &self.phase {
            let sent = match by {
                Some(by) => lines.send_deadline(line, by).map_err(|err| {
                    if err.is_timeout() {
                        log::info!("a streamed answer's client took no output until the command's deadline: the stream is dropped, the command times out as any");
                    }
                }),
                None => lines.send(line).map_err(drop),
            };
            if sent.is_err() {
                self.phase = Phase::Gone;
            }
        }
    }
}

/// Starts the answer's writer: `200`, NDJSON, chunked; its lines come through a channel of
/// one.
fn start(request: Request) -> Phase {
    let (lines, from) = bounded::<Vec<u8>>(1);
    let headers = vec![header("Content-Type", NDJSON)];
    let spawned = thread::Builder::new()
        .name("stream-writer".into())
        .spawn(move || {
            let body = Lines {
                from,
                line: Vec::new(),
                at: 0,
            };
            let body: Box<dyn Read> = Box::new(body);
            let sent = respond_streaming(request, 200, headers, (body, None), STREAM_CHUNK_BYTES);
            if let Err(err) = sent {
                log::info!("streaming a command's output: {err}");
            }
        });
    match spawned {
        Ok(writer) => Phase::Streaming { lines, writer },
        Err(err) => {
            log::error!("cannot start a thread to write a stream: {err}");
            Phase::Gone
        }
    }
}

/// Runs the command and answers: the stream, or the JSON error when nothing was sent.
fn serve(service: &Service, request: Request, command: ExecCommand, received: Instant) {
    let url = request.url().to_string();
    let stream = Arc::new(Mutex::new(Stream {
        phase: Phase::Waiting(request),
        chunker: TextChunker::default(),
        held: String::new(),
        at_line_start: true,
        deadline: service.command_deadline(&command),
    }));
    let to_stream = Arc::clone(&stream);
    let sink = OutputSink::new(move |bytes| to_stream.lock().output(bytes));
    let (status, reply) = answer(|| {
        let result = service.execute_to(command, Some(sink))?;
        Ok(Reply::Json(json!({"status": "success", "result": result})))
    });
    let Reply::Json(mut last) = reply else {
        return;
    };
    let mut stream = stream.lock();
    if status == 200 {
        let rest = stream.chunker.finish();
        stream.held.push_str(&rest);
        let held = std::mem::take(&mut stream.held);
        stream.text(&held);
    }
    match std::mem::replace(&mut stream.phase, Phase::Gone) {
        Phase::Waiting(request) if status != 200 => {
            return finish(
                request,
                Some(Route::ExecuteCommand),
                status,
                Reply::Json(last),
                received,
            );
        }
        phase => stream.phase = phase,
    }
    if status != 200 {
        last["http_status"] = json!(status);
    }
    let mut line = last.to_string().into_bytes();
    line.push(b'\n');
    // The command has ended: its last line waits for the writer as long as the writer lives
    // (tiny_http's write timeout ends it for a client that takes nothing).
    stream.line(line, None);
    let path = super::route::path_of(&url).unwrap_or("/");
    if let Phase::Streaming { lines, writer } = std::mem::replace(&mut stream.phase, Phase::Gone) {
        drop(lines);
        let _ = writer.join();
    }
    access_log("POST", path, Some(Route::ExecuteCommand), 200, received);
}

/// Where the text starts that must be held back: the first line start (after a newline, or
/// at 0 when what was sent ended a line) from which the rest could still become the `cwd`
/// refusal line; the text's length when there is none.
fn refusal_start(text: &str, at_line_start: bool) -> usize {
    let refusal = format!("{CWD_REFUSED}\n");
    let from = text.len().saturating_sub(refusal.len());
    (from..text.len())
        .filter(|&at| text.is_char_boundary(at))
        .filter(|&at| {
            if at == 0 {
                at_line_start
            } else {
                text.as_bytes()[at - 1] == b'\n'
            }
        })
        .find(|&at| refusal.starts_with(&text[at..]))
        .unwrap_or(text.len())
}

/// The answer's body: the lines as they come, until the channel closes.
struct Lines {
    from: Receiver<Vec<u8>>,
    line: Vec<u8>,
    at: usize,
}

impl Read for Lines {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.line.len() {
            match self.from.recv() {
                Ok(line) => {
                    self.line = line;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let read = buf.len().min(self.line.len() - self.at);
        buf[..read].copy_from_slice(&self.line[self.at..self.at + read]);
        self.at += read;
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_line_is_held_back_and_nothing_else() {
        let refusal = format!("{CWD_REFUSED}\n");
        assert_eq!(refusal_start(&refusal, true), 0);
        assert_eq!(refusal_start(&refusal[..10], true), 0);
        // Not at a line start: nothing held.
        assert_eq!(refusal_start(&refusal, false), refusal.len());
        let warned = format!("warning\n{refusal}");
        assert_eq!(refusal_start(&warned, true), "warning\n".len());
        assert_eq!(refusal_start("hello\n", true), 6);
        assert_eq!(refusal_start("hello\nar", true), 6);
        assert_eq!(refusal_start("", true), 0);
        // Past the line's end: nothing could be it any more.
        let more = format!("{refusal}x");
        assert_eq!(refusal_start(&more, true), more.len());
    }
}
