use std::io::Error as IoError;
use std::io::{self, ErrorKind, Read, Write};

use std::fmt;
use std::net::SocketAddr;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, SyncSender, TrySendError};
use std::sync::Arc;

use crate::util::{ChunkedReader, EqualReader};
use crate::{HTTPVersion, Header, Method, Response, StatusCode};

/// Represents an HTTP request made by a client.
///
/// A `Request` object is what is produced by the server, and is your what
/// your code must analyse and answer.
///
/// This object implements the `Send` trait, therefore you can dispatch your requests to
/// worker threads.
///
/// # One request at a time (arservice patch, PATCHED.md)
///
/// A connection reads its next request only once the previous one is answered, and the answer
/// is written by the connection's own thread: `respond` hands the bytes over and returns, so
/// a client that does not read its answers holds its own thread, never the caller's. The body
/// is not read before the `Request` is handed out: the caller decides whether to read it
/// (after checking the head), and when it leaves it unread, the answer closes the connection.
///
/// # Automatic cleanup
///
/// If a `Request` object is destroyed without `into_writer` or `respond` being called,
/// an empty response with a 500 status code (internal server error) will automatically be
/// sent back to the client.
/// This means that if your code fails during the handling of a request, this "internal server
/// error" response will automatically be sent during the stack unwinding.
///
/// # Testing
///
/// If you want to build fake requests to test your server, use [`TestRequest`](crate::test::TestRequest).
pub struct Request {
    // where to read the body from
    data_reader: Option<Box<dyn Read + Send + 'static>>,

    // if this writer is empty, then the request has been answered
    response_writer: Option<Box<dyn Write + Send + 'static>>,

    remote_addr: Option<SocketAddr>,

    // true if HTTPS, false if HTTP
    secure: bool,

    method: Method,

    path: String,

    http_version: HTTPVersion,

    headers: Vec<Header>,

    body_length: Option<usize>,

    // true if a `100 Continue` response must be sent when `as_reader()` is called
    pub(crate) must_send_continue: bool,

    // If Some, a message must be sent after responding
    notify_when_responded: Option<Sender<()>>,

    // arservice patch: the thread of the connection, for `on_connection_thread`.
    connection: Option<SyncSender<Out>>,

    // arservice patch: set once the body has been read to its end (or there is none).
    body_done: Arc<AtomicBool>,

    // arservice patch: no request follows this one on its connection.
    last: bool,
}

/// How the body of a request is delimited (checked by the connection before the request is
/// built: arservice patch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    None,
    /// `Content-Length`.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// What a request sends to the thread of its connection (arservice patch).
pub(crate) enum Out {
    /// Bytes of the answer, to write to the client.
    Bytes(Vec<u8>),
    /// Work to do on that thread with the request (see `Request::on_connection_thread`).
    Run(Request, Box<dyn FnOnce(Request) + Send + 'static>),
    /// The answer cannot be finished (its source failed part way): close the connection after
    /// what was written, so that the client sees a cut answer at once (see [`Cutter`]).
    Cut,
}

/// arservice patch: cuts a streamed answer (see `Request::cutter`). An answer written through
/// `into_writer` whose body fails part way (a known length not reached, a chunked stream not
/// ended) must not leave its connection open for the next request: the client would wait for
/// the rest until the keep-alive timeout.
pub struct Cutter(SyncSender<Out>);

impl Cutter {
    /// Closes the connection once what was written before went out.
    pub fn cut(self) {
        let _ = self.0.send(Out::Cut);
    }
}

/// The answer's writer: gathers what is written and hands it to the connection's thread on
/// each flush (arservice patch). Writing never waits for the client; a flush waits only when
/// many are queued (a streamed answer the client does not take), until the connection's
/// write times out and the connection is closed.
pub(crate) struct Handoff {
    to: SyncSender<Out>,
    pending: Vec<u8>,
}

impl Handoff {
    pub(crate) fn new(to: SyncSender<Out>) -> Handoff {
        Handoff {
            to,
            pending: Vec::new(),
        }
    }
}

impl Write for Handoff {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.pending);
        self.to
            .send(Out::Bytes(bytes))
            .map_err(|_| IoError::new(ErrorKind::BrokenPipe, "the connection is closed"))
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// A body reader that notes when its end was reached (arservice patch).
struct Tracked<R> {
    inner: R,
    done: Arc<AtomicBool>,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        if read == 0 && !buf.is_empty() {
            self.done.store(true, Ordering::SeqCst);
        }
        Ok(read)
    }
}

struct NotifyOnDrop<R> {
    sender: Sender<()>,
    inner: R,
}

impl<R: Read> Read for NotifyOnDrop<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}
impl<R: Write> Write for NotifyOnDrop<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
impl<R> Drop for NotifyOnDrop<R> {
    fn drop(&mut self) {
        self.sender.send(()).unwrap();
    }
}

/// Error that can happen when building a `Request` object.
#[derive(Debug)]
pub enum RequestCreationError {
    /// The client sent an `Expect` header that was not recognized by tiny-http.
    ExpectationFailed,

    /// Error while reading data from the socket during the creation of the `Request`.
    CreationIoError(IoError),
}

impl From<IoError> for RequestCreationError {
    fn from(err: IoError) -> RequestCreationError {
        RequestCreationError::CreationIoError(err)
    }
}

/// Builds a new request.
///
/// After the request line and headers have been read from the socket, a new `Request` object
/// is built. arservice patch: the connection has checked the headers that delimit the body
/// (`framing`) and the `Expect` header; nothing of the body is read here, and a `Connection:
/// upgrade` request gets its body like any other (tiny_http handed it the raw stream, which a
/// body reader then read to its end).
///
/// You must pass a `Read` that will allow the `Request` object to read from the incoming data.
/// It is the responsibility of the `Request` to read only the data of the request and not further.
///
/// The `Write` object will be used by the `Request` to write the response.
#[allow(clippy::too_many_arguments)]
pub(crate) fn new_request<R, W>(
    secure: bool,
    method: Method,
    path: String,
    version: HTTPVersion,
    headers: Vec<Header>,
    remote_addr: Option<SocketAddr>,
    source_data: R,
    framing: Framing,
    writer: W,
) -> Request
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let expects_continue = headers
        .iter()
        .filter(|h| h.field.equiv("Expect"))
        .any(|h| h.value.as_str().trim().eq_ignore_ascii_case("100-continue"));
    let body_done = Arc::new(AtomicBool::new(false));
    let tracked = |reader: Box<dyn Read + Send + 'static>| {
        Box::new(Tracked {
            inner: reader,
            done: Arc::clone(&body_done),
        }) as Box<dyn Read + Send + 'static>
    };
    let (reader, body_length) = match framing {
        Framing::None | Framing::Length(0) => {
            body_done.store(true, Ordering::SeqCst);
            (
                Box::new(io::empty()) as Box<dyn Read + Send + 'static>,
                match framing {
                    Framing::Length(0) => Some(0),
                    _ => None,
                },
            )
        }
        Framing::Length(length) => (
            tracked(Box::new(EqualReader::new(source_data, length).0)),
            Some(length),
        ),
        Framing::Chunked => (tracked(Box::new(ChunkedReader::new(source_data))), None),
    };

    Request {
        data_reader: Some(reader),
        response_writer: Some(Box::new(writer) as Box<dyn Write + Send + 'static>),
        remote_addr,
        secure,
        method,
        path,
        http_version: version,
        headers,
        body_length,
        must_send_continue: expects_continue && body_length != Some(0) && framing != Framing::None,
        notify_when_responded: None,
        connection: None,
        body_done,
        last: false,
    }
}

impl Request {
    /// Returns true if the request was made through HTTPS.
    #[inline]
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Returns the method requested by the client (eg. `GET`, `POST`, etc.).
    #[inline]
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Returns the resource requested by the client.
    #[inline]
    pub fn url(&self) -> &str {
        &self.path
    }

    /// Returns a list of all headers sent by the client.
    #[inline]
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// Returns the HTTP version of the request.
    #[inline]
    pub fn http_version(&self) -> &HTTPVersion {
        &self.http_version
    }

    /// Returns the length of the body in bytes.
    ///
    /// Returns `None` if the length is unknown.
    #[inline]
    pub fn body_length(&self) -> Option<usize> {
        self.body_length
    }

    /// Returns the address of the client that sent this request.
    ///
    /// The address is always `Some` for TCP listeners, but always `None` for UNIX listeners
    /// (as the remote address of a UNIX client is almost always unnamed).
    ///
    /// Note that this is gathered from the socket. If you receive the request from a proxy,
    /// this function will return the address of the proxy and not the address of the actual
    /// user.
    #[inline]
    pub fn remote_addr(&self) -> Option<&SocketAddr> {
        self.remote_addr.as_ref()
    }

    /// Sends a response with a `Connection: upgrade` header, then turns the `Request` into a `Stream`.
    ///
    /// The main purpose of this function is to support websockets.
    /// If you detect that the request wants to use some kind of protocol upgrade, you can
    ///  call this function to obtain full control of the socket stream.
    ///
    /// If you call this on a non-websocket request, tiny-http will wait until this `Stream` object
    ///  is destroyed before continuing to read or write on the socket. Therefore you should always
    ///  destroy it as soon as possible.
    pub fn upgrade<R: Read>(
        mut self,
        protocol: &str,
        response: Response<R>,
    ) -> Box<dyn ReadWrite + Send> {
        use crate::util::CustomStream;

        response
            .raw_print(
                self.response_writer.as_mut().unwrap().by_ref(),
                self.http_version.clone(),
                &self.headers,
                false,
                Some(protocol),
            )
            .ok(); // TODO: unused result

        self.response_writer.as_mut().unwrap().flush().ok(); // TODO: unused result

        let stream = CustomStream::new(self.extract_reader_impl(), self.extract_writer_impl());
        if let Some(sender) = self.notify_when_responded.take() {
            let stream = NotifyOnDrop {
                sender,
                inner: stream,
            };
            Box::new(stream) as Box<dyn ReadWrite + Send>
        } else {
            Box::new(stream) as Box<dyn ReadWrite + Send>
        }
    }

    /// Allows to read the body of the request.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # extern crate rustc_serialize;
    /// # extern crate tiny_http;
    /// # use rustc_serialize::json::Json;
    /// # use std::io::Read;
    /// # fn get_content_type(_: &tiny_http::Request) -> &'static str { "" }
    /// # fn main() {
    /// # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
    /// let mut request = server.recv().unwrap();
    ///
    /// if get_content_type(&request) == "application/json" {
    ///     let mut content = String::new();
    ///     request.as_reader().read_to_string(&mut content).unwrap();
    ///     let json: Json = content.parse().unwrap();
    /// }
    /// # }
    /// ```
    ///
    /// If the client sent a `Expect: 100-continue` header with the request, calling this
    ///  function will send back a `100 Continue` response.
    #[inline]
    pub fn as_reader(&mut self) -> &mut dyn Read {
        if self.must_send_continue {
            let msg = Response::new_empty(StatusCode(100));
            msg.raw_print(
                self.response_writer.as_mut().unwrap().by_ref(),
                self.http_version.clone(),
                &self.headers,
                true,
                None,
            )
            .ok();
            self.response_writer.as_mut().unwrap().flush().ok();
            self.must_send_continue = false;
        }

        self.data_reader.as_mut().unwrap()
    }

    /// Turns the `Request` into a writer.
    ///
    /// The writer has a raw access to the stream to the user.
    /// This function is useful for things like CGI.
    ///
    /// Note that the destruction of the `Writer` object may trigger
    /// some events. For exemple if a client has sent multiple requests and the requests
    /// have been processed in parallel, the destruction of a writer will trigger
    /// the writing of the next response.
    /// Therefore you should always destroy the `Writer` as soon as possible.
    #[inline]
    pub fn into_writer(mut self) -> Box<dyn Write + Send + 'static> {
        let writer = self.extract_writer_impl();
        if let Some(sender) = self.notify_when_responded.take() {
            let writer = NotifyOnDrop {
                sender,
                inner: writer,
            };
            Box::new(writer) as Box<dyn Write + Send + 'static>
        } else {
            writer
        }
    }

    /// Extract the response `Writer` object from the Request, dropping this `Writer` has the same side effects
    /// as the object returned by `into_writer` above.
    ///
    /// This may only be called once on a single request.
    fn extract_writer_impl(&mut self) -> Box<dyn Write + Send + 'static> {
        use std::mem;

        assert!(self.response_writer.is_some());

        let mut writer = None;
        mem::swap(&mut self.response_writer, &mut writer);
        writer.unwrap()
    }

    /// Extract the body `Reader` object from the Request.
    ///
    /// This may only be called once on a single request.
    fn extract_reader_impl(&mut self) -> Box<dyn Read + Send + 'static> {
        use std::mem;

        assert!(self.data_reader.is_some());

        let mut reader = None;
        mem::swap(&mut self.data_reader, &mut reader);
        reader.unwrap()
    }

    /// Sends a response to this request.
    #[inline]
    pub fn respond<R>(mut self, response: Response<R>) -> Result<(), IoError>
    where
        R: Read,
    {
        let res = self.respond_impl(response);
        if let Some(sender) = self.notify_when_responded.take() {
            sender.send(()).unwrap();
        }
        res
    }

    fn respond_impl<R>(&mut self, response: Response<R>) -> Result<(), IoError>
    where
        R: Read,
    {
        let mut writer = self.extract_writer_impl();

        let do_not_send_body = self.method == Method::Head;

        // arservice patch: say so when no request will follow on this connection.
        let response = if self.closes_connection() {
            response.with_connection_close()
        } else {
            response
        };

        Self::ignore_client_closing_errors(response.raw_print(
            writer.by_ref(),
            self.http_version.clone(),
            &self.headers,
            do_not_send_body,
            None,
        ))?;

        Self::ignore_client_closing_errors(writer.flush())
    }

    fn ignore_client_closing_errors(result: io::Result<()>) -> io::Result<()> {
        result.or_else(|err| match err.kind() {
            ErrorKind::BrokenPipe => Ok(()),
            ErrorKind::ConnectionAborted => Ok(()),
            ErrorKind::ConnectionRefused => Ok(()),
            ErrorKind::ConnectionReset => Ok(()),
            _ => Err(err),
        })
    }

    pub(crate) fn with_notify_sender(mut self, sender: Sender<()>) -> Self {
        self.notify_when_responded = Some(sender);
        self
    }

    /// arservice patch: ties the request to the thread of its connection.
    pub(crate) fn on_connection(mut self, connection: SyncSender<Out>, last: bool) -> Self {
        self.connection = Some(connection);
        self.last = last;
        self
    }

    /// arservice patch: true once the body was read to its end, or when there is none.
    pub(crate) fn body_done(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.body_done)
    }

    /// arservice patch: a [`Cutter`] for this request's answer, taken before `into_writer`
    /// (`None` for a request that came from no connection, a `TestRequest`).
    pub fn cutter(&self) -> Option<Cutter> {
        self.connection.clone().map(Cutter)
    }

    /// arservice patch: true when the connection closes after the answer: the client said so,
    /// or the body was not read to its end (where the next request would begin is unknown).
    pub fn closes_connection(&self) -> bool {
        self.last || !self.body_done.load(Ordering::SeqCst)
    }

    /// arservice patch: runs `task` with this request on the thread that serves its connection,
    /// which is idle until the request is answered: a body read there holds no thread of its
    /// own, and a slow client only its own connection. A `100 Continue` the client waits for
    /// is sent first. `task` may hand the request to another thread or answer it itself. When
    /// the request came from no connection (a `TestRequest`), `task` runs here; when its
    /// connection is gone, the request is dropped.
    pub fn on_connection_thread<F>(self, task: F)
    where
        F: FnOnce(Request) + Send + 'static,
    {
        let Some(connection) = self.connection.clone() else {
            task(self);
            return;
        };
        match connection.try_send(Out::Run(self, Box::new(task))) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            // Not expected (a connection has one request in flight, and its queue has room
            // for several writes), but never block the caller.
            Err(TrySendError::Full(Out::Run(request, task))) => {
                std::thread::spawn(move || task(request));
            }
            Err(TrySendError::Full(Out::Bytes(_) | Out::Cut)) => {}
        }
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> Result<(), fmt::Error> {
        write!(
            formatter,
            "Request({} {} from {:?})",
            self.method, self.path, self.remote_addr
        )
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if self.response_writer.is_some() {
            let response = Response::empty(500);
            let _ = self.respond_impl(response); // ignoring any potential error
            if let Some(sender) = self.notify_when_responded.take() {
                sender.send(()).unwrap();
            }
        }
    }
}

/// Dummy trait that regroups the `Read` and `Write` traits.
///
/// Automatically implemented on all types that implement both `Read` and `Write`.
pub trait ReadWrite: Read + Write {}
impl<T> ReadWrite for T where T: Read + Write {}

#[cfg(test)]
mod tests {
    use super::Request;

    #[test]
    fn must_be_send() {
        #![allow(dead_code)]
        fn f<T: Send>(_: &T) {}
        fn bar(rq: &Request) {
            f(rq);
        }
    }
}
