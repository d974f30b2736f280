//! # Simple usage
//!
//! ## Creating the server
//!
//! The easiest way to create a server is to call `Server::http()`.
//!
//! The `http()` function returns an `IoResult<Server>` which will return an error
//! in the case where the server creation fails (for example if the listening port is already
//! occupied).
//!
//! ```no_run
//! let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! ```
//!
//! A newly-created `Server` will immediately start listening for incoming connections and HTTP
//! requests.
//!
//! ## Receiving requests
//!
//! Calling `server.recv()` will block until the next request is available.
//! This function returns an `IoResult<Request>`, so you need to handle the possible errors.
//!
//! ```no_run
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//!
//! loop {
//!     // blocks until the next request is received
//!     let request = match server.recv() {
//!         Ok(rq) => rq,
//!         Err(e) => { println!("error: {}", e); break }
//!     };
//!
//!     // do something with the request
//!     // ...
//! }
//! ```
//!
//! In a real-case scenario, you will probably want to spawn multiple worker tasks and call
//! `server.recv()` on all of them. Like this:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::thread;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! let server = Arc::new(server);
//! let mut guards = Vec::with_capacity(4);
//!
//! for _ in (0 .. 4) {
//!     let server = server.clone();
//!
//!     let guard = thread::spawn(move || {
//!         loop {
//!             let rq = server.recv().unwrap();
//!
//!             // ...
//!         }
//!     });
//!
//!     guards.push(guard);
//! }
//! ```
//!
//! If you don't want to block, you can call `server.try_recv()` instead.
//!
//! ## Handling requests
//!
//! The `Request` object returned by `server.recv()` contains informations about the client's request.
//! The most useful methods are probably `request.method()` and `request.url()` which return
//! the requested method (`GET`, `POST`, etc.) and url.
//!
//! To handle a request, you need to create a `Response` object. See the docs of this object for
//! more infos. Here is an example of creating a `Response` from a file:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! ```
//!
//! All that remains to do is call `request.respond()`:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! # let request = server.recv().unwrap();
//! # let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! let _ = request.respond(response);
//! ```
#![allow(dead_code, unused_imports)] // arservice: newer rustc warns on 0.12.0 here
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![allow(clippy::match_like_matches_macro)]

#[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
use zeroize::Zeroizing;

use std::error::Error;
use std::io::Error as IoError;
use std::io::ErrorKind as IoErrorKind;
use std::io::Result as IoResult;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use client::ClientConnection;
use connection::Connection;
use util::MessagesQueue;

pub use common::{HTTPVersion, Header, HeaderField, Method, StatusCode};
pub use connection::{ConfigListenAddr, ListenAddr, Listener};
pub use request::{Cutter, ReadWrite, Request};
pub use response::{Response, ResponseBox};
pub use test::TestRequest;

mod client;
mod common;
mod connection;
mod request;
mod response;
mod ssl;
mod test;
mod util;

/// The main class of this library.
///
/// Destroying this object will immediately close the listening socket and the reading
///  part of all the client's connections. Requests that have already been returned by
///  the `recv()` function will not close and the responses will be transferred to the client.
pub struct Server {
    // should be false as long as the server exists
    // when set to true, all the subtasks will close within a few hundreds ms
    close: Arc<AtomicBool>,

    // queue for messages received by child threads
    messages: Arc<MessagesQueue<Message>>,

    // result of TcpListener::local_addr()
    listening_addr: ListenAddr,

    // arservice patch: where requests go instead of `messages`, once set.
    handler: client::HandlerSlot,
}

/// arservice patch: what takes every request on its connection's thread (`Server::set_handler`).
pub type Handler = Box<dyn Fn(Request) + Send + Sync + 'static>;

pub(crate) enum Message {
    Error(IoError),
    NewRequest(Request),
}

impl From<IoError> for Message {
    fn from(e: IoError) -> Message {
        Message::Error(e)
    }
}

impl From<Request> for Message {
    fn from(rq: Request) -> Message {
        Message::NewRequest(rq)
    }
}

// this trait is to make sure that Server implements Share and Send
#[doc(hidden)]
trait MustBeShareDummy: Sync + Send {}
#[doc(hidden)]
impl MustBeShareDummy for Server {}

pub struct IncomingRequests<'a> {
    server: &'a Server,
}

/// Represents the parameters required to create a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The addresses to try to listen to.
    pub addr: ConfigListenAddr,

    /// If `Some`, then the server will use SSL to encode the communications.
    pub ssl: Option<SslConfig>,

    /// What one client may take of the server (arservice patch).
    pub limits: Limits,
}

/// What one client may take of the server (arservice patch, see PATCHED.md): no client, by
/// sending slowly, sending much, not reading, or opening many connections, holds more than
/// its own connection's thread for more than these bounds.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once (one thread each). At the cap, a new connection takes the
    /// place of the one that has made no progress the longest, at least `stall` (waiting for
    /// a request, sending its head, or not taking its answer); when there is none, for every
    /// connection has a request in flight, the new one is answered 503 and closed.
    pub max_connections: usize,
    /// Longest request line (414 beyond) and longest header line (431 beyond).
    pub max_line_bytes: usize,
    /// Longest head, request line and headers together (431 beyond).
    pub max_head_bytes: usize,
    /// Most header lines (431 beyond).
    pub max_headers: usize,
    /// From the first byte of a request to the end of its head (408 beyond).
    pub head_timeout: Duration,
    /// How long reading a body or writing an answer may go without progress; the connection
    /// is closed then (a body read fails with `TimedOut`).
    pub io_timeout: Duration,
    /// How long a connection may wait for its next request before it is closed.
    pub keep_alive: Duration,
    /// After the last answer of a connection, how long what the client still sends is read
    /// and dropped before closing, so that it reads the answer rather than a reset.
    pub linger: Duration,
    /// A connection that has made no progress for this long may be closed for a newcomer.
    pub stall: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_line_bytes: 8 * 1024,
            max_head_bytes: 32 * 1024,
            max_headers: 100,
            head_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(60),
            linger: Duration::from_secs(2),
            stall: Duration::from_millis(250),
        }
    }
}

/// Configuration of the server for SSL.
#[derive(Debug, Clone)]
pub struct SslConfig {
    /// Contains the public certificate to send to clients.
    pub certificate: Vec<u8>,
    /// Contains the ultra-secret private key used to decode communications.
    pub private_key: Vec<u8>,
}

impl Server {
    /// Shortcut for a simple server on a specific address.
    #[inline]
    pub fn http<A>(addr: A) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: None,
            limits: Limits::default(),
        })
    }

    /// arservice patch: a server on a specific address with these limits.
    pub fn http_with_limits<A>(
        addr: A,
        limits: Limits,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: None,
            limits,
        })
    }

    /// Shortcut for an HTTPS server on a specific address.
    #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
    #[inline]
    pub fn https<A>(
        addr: A,
        config: SslConfig,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
            ssl: Some(config),
            limits: Limits::default(),
        })
    }

    #[cfg(unix)]
    #[inline]
    /// Shortcut for a UNIX socket server at a specific path
    pub fn http_unix(
        path: &std::path::Path,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::unix_from_path(path),
            ssl: None,
            limits: Limits::default(),
        })
    }

    /// Builds a new server that listens on the specified address.
    pub fn new(config: ServerConfig) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = config.addr.bind()?;
        Self::from_listener_with_limits(listener, config.ssl, config.limits)
    }

    /// Builds a new server using the specified TCP listener.
    ///
    /// This is useful if you've constructed TcpListener using some less usual method
    /// such as from systemd. For other cases, you probably want the `new()` function.
    pub fn from_listener<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Self::from_listener_with_limits(listener, ssl_config, Limits::default())
    }

    /// arservice patch: `from_listener` with limits.
    pub fn from_listener_with_limits<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
        limits: Limits,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = listener.into();
        // building the "close" variable
        let close_trigger = Arc::new(AtomicBool::new(false));

        // building the TcpListener
        let (server, local_addr) = {
            let local_addr = listener.local_addr()?;
            log::debug!("Server listening on {}", local_addr);
            (listener, local_addr)
        };

        // building the SSL capabilities
        #[cfg(all(feature = "ssl-openssl", feature = "ssl-rustls"))]
        compile_error!(
            "Features 'ssl-openssl' and 'ssl-rustls' must not be enabled at the same time"
        );
        #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
        type SslContext = ();
        #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
        type SslContext = crate::ssl::SslContextImpl;
        let ssl: Option<SslContext> = {
            match ssl_config {
                #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                Some(config) => Some(SslContext::from_pem(
                    config.certificate,
                    Zeroizing::new(config.private_key),
                )?),
                #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                Some(_) => return Err(
                    "Building a server with SSL requires enabling the `ssl` feature in tiny-http"
                        .into(),
                ),
                None => None,
            }
        };

        // creating a task where server.accept() is continuously called
        // and ClientConnection objects are pushed in the messages queue
        let messages = MessagesQueue::with_capacity(8);

        let inside_close_trigger = close_trigger.clone();
        let inside_messages = messages.clone();
        let handler = client::HandlerSlot::default();
        let inside_handler = handler.clone();
        let registry = util::Registry::new(limits.max_connections, limits.stall);
        let closer = start_closer();
        thread::spawn(move || {
            let mut last_accept_warning = None;
            log::debug!("Running accept thread");
            while !inside_close_trigger.load(Relaxed) {
                let (sock, _) = match server.accept() {
                    Ok(accepted) => accepted,
                    Err(_) if inside_close_trigger.load(Relaxed) => break,
                    Err(e) => {
                        // arservice patch: tiny_http stopped accepting for good at the first
                        // error, and the server with it; clients can cause some (EMFILE once
                        // connections use up the open files, ECONNABORTED): wait, go on.
                        if last_accept_warning.map_or(true, |at: std::time::Instant| {
                            at.elapsed() >= ACCEPT_WARNING_EVERY
                        }) {
                            log::warn!("cannot accept a connection: {}", e);
                            last_accept_warning = Some(std::time::Instant::now());
                        }
                        thread::sleep(ACCEPT_RETRY);
                        continue;
                    }
                };
                // arservice patch: every write to the client is bounded in time, and the
                // connections served at once are counted (PATCHED.md).
                let _ = sock.set_write_timeout(Some(limits.io_timeout));
                let place = match sock
                    .try_clone()
                    .ok()
                    .and_then(|handle| registry.admit(handle))
                {
                    Some(place) => place,
                    None => {
                        refuse(sock, registry.max(), &closer);
                        continue;
                    }
                };

                use util::RefinedTcpStream;
                let (read_closable, write_closable) = match ssl {
                    None => match RefinedTcpStream::try_new(sock) {
                        Ok(halves) => halves,
                        Err(err) => {
                            log::warn!("cannot serve a connection: {}", err);
                            continue;
                        }
                    },
                    #[cfg(any(feature = "ssl-openssl", feature = "ssl-rustls"))]
                    Some(ref ssl) => {
                        // trying to apply SSL over the connection
                        // if an error occurs, we just close the socket and resume listening
                        let sock = match ssl.accept(sock) {
                            Ok(s) => s,
                            Err(_) => continue,
                        };

                        RefinedTcpStream::new(sock)
                    }
                    #[cfg(not(any(feature = "ssl-openssl", feature = "ssl-rustls")))]
                    Some(ref _ssl) => unreachable!(),
                };

                // arservice patch: a thread of its own for each connection, which ends with
                // it, so that the threads are exactly the connections (the task pool kept
                // idle threads for seconds, and the cap could not bound them).
                let client =
                    ClientConnection::new(write_closable, read_closable, place, limits.clone());
                let messages = inside_messages.clone();
                let handler = inside_handler.clone();
                let spawned = thread::Builder::new()
                    .name("http-connection".into())
                    .spawn(move || client.serve(&messages, &handler));
                if let Err(err) = spawned {
                    log::error!("cannot start a thread for a connection: {}", err);
                }
            }
            log::debug!("Terminating accept thread");
        });

        // result
        Ok(Server {
            messages,
            close: close_trigger,
            listening_addr: local_addr,
            handler,
        })
    }

    /// Returns an iterator for all the incoming requests.
    ///
    /// The iterator will return `None` if the server socket is shutdown.
    #[inline]
    pub fn incoming_requests(&self) -> IncomingRequests<'_> {
        IncomingRequests { server: self }
    }

    /// Returns the address the server is listening to.
    #[inline]
    pub fn server_addr(&self) -> ListenAddr {
        self.listening_addr.clone()
    }

    /// Returns the number of clients currently connected to the server.
    pub fn num_connections(&self) -> usize {
        unimplemented!()
        //self.requests_receiver.lock().len()
    }

    /// arservice patch: from now on every request is given to `handler` on the thread of its
    /// connection, as soon as its head is read, instead of being queued for `recv` (no thread
    /// switch to a receiving thread and back). The handler answers it, hands it elsewhere, or
    /// asks for work on the same thread (`Request::on_connection_thread`, which then runs once
    /// the handler returned). A panic in the handler closes that connection. Only the first
    /// handler set counts (false for the others); requests queued before stay for `recv`.
    pub fn set_handler(&self, handler: Handler) -> bool {
        self.handler.set(handler).is_ok()
    }

    /// Blocks until an HTTP request has been submitted and returns it.
    pub fn recv(&self) -> IoResult<Request> {
        match self.messages.pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(rq),
            None => Err(IoError::new(IoErrorKind::Other, "thread unblocked")),
        }
    }

    /// Same as `recv()` but doesn't block longer than timeout
    pub fn recv_timeout(&self, timeout: Duration) -> IoResult<Option<Request>> {
        match self.messages.pop_timeout(timeout) {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Same as `recv()` but doesn't block.
    pub fn try_recv(&self) -> IoResult<Option<Request>> {
        match self.messages.try_pop() {
            Some(Message::Error(err)) => Err(err),
            Some(Message::NewRequest(rq)) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Unblock thread stuck in recv() or incoming_requests().
    /// If there are several such threads, only one is unblocked.
    /// This method allows graceful shutdown of server.
    pub fn unblock(&self) {
        self.messages.unblock();
    }
}

/// arservice patch: answers a connection there is no room for, without waiting for it (the
/// socket is fresh, so the short answer fits in its send buffer), and hands it to `closer`.
fn refuse(sock: Connection, max_connections: usize, closer: &mpsc::SyncSender<Connection>) {
    use std::io::Write;
    let mut sock = sock;
    let _ = sock.set_nonblocking(true);
    let _ = sock.write_all(&response::refusal(
        503,
        &format!(
            "the server serves at most {max_connections} connections at once and every one has a request in flight: retry shortly"
        ),
        Some(1),
    ));
    let _ = sock.shutdown(Shutdown::Write);
    // When the closer has too many already, this one is closed now.
    let _ = closer.try_send(sock);
}

/// How long the accept thread waits after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// How often a failing accept is logged.
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Refused connections held at once (an open file each); past this, one is closed at once.
pub const REFUSED_HELD: usize = 64;

/// Refused connections queued for the closer (part of `REFUSED_HELD`).
const REFUSED_QUEUED: usize = 8;

/// How long a refused connection is kept while what its client sends is read and dropped.
const REFUSED_LINGER: Duration = Duration::from_secs(1);

/// How often the closer reads its connections.
const REFUSED_POLL: Duration = Duration::from_millis(10);

/// arservice patch: the thread that closes refused connections a moment after their answer,
/// reading and dropping what their clients send meanwhile: closing with unread input sends a
/// reset, which would make a client that is still writing its request miss the 503.
fn start_closer() -> mpsc::SyncSender<Connection> {
    use std::io::Read;
    // What waits in the channel counts too: held + queued <= REFUSED_HELD.
    let (tx, rx) = mpsc::sync_channel::<Connection>(REFUSED_QUEUED);
    thread::spawn(move || {
        let mut held: Vec<(Connection, std::time::Instant)> = Vec::new();
        let mut sink = [0u8; 4096];
        loop {
            if held.is_empty() {
                match rx.recv() {
                    Ok(sock) => held.push((sock, std::time::Instant::now() + REFUSED_LINGER)),
                    Err(_) => return,
                }
            }
            while held.len() < REFUSED_HELD - REFUSED_QUEUED {
                match rx.try_recv() {
                    Ok(sock) => held.push((sock, std::time::Instant::now() + REFUSED_LINGER)),
                    Err(_) => break,
                }
            }
            let now = std::time::Instant::now();
            held.retain_mut(|(sock, until)| {
                let open = loop {
                    match sock.read(&mut sink) {
                        Ok(0) => break false,
                        Ok(_) => continue,
                        Err(err) if err.kind() == IoErrorKind::WouldBlock => break true,
                        Err(_) => break false,
                    }
                };
                open && now < *until
            });
            if !held.is_empty() {
                thread::sleep(REFUSED_POLL);
            }
        }
    });
    tx
}

impl Iterator for IncomingRequests<'_> {
    type Item = Request;
    fn next(&mut self) -> Option<Request> {
        self.server.recv().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close.store(true, Relaxed);
        // Connect briefly to ourselves to unblock the accept thread
        let maybe_stream = match &self.listening_addr {
            ListenAddr::IP(addr) => TcpStream::connect(addr).map(Connection::from),
            #[cfg(unix)]
            ListenAddr::Unix(addr) => {
                // TODO: use connect_addr when its stabilized.
                let path = addr.as_pathname().unwrap();
                std::os::unix::net::UnixStream::connect(path).map(Connection::from)
            }
        };
        if let Ok(stream) = maybe_stream {
            let _ = stream.shutdown(Shutdown::Both);
        }

        #[cfg(unix)]
        if let ListenAddr::Unix(addr) = &self.listening_addr {
            if let Some(path) = addr.as_pathname() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
