//! HTTP: the accept loop, the worker pools, routing, and the one mapping from [`Error`] to a
//! status code.
//!
//! tiny_http (patched, `vendor/tiny_http/PATCHED.md`) serves each connection on a thread of
//! its own, within [`tiny_http::Limits`]: heads bounded in size and time, one request in
//! flight per connection, answers written by that thread. The accept loop here never waits on
//! a client: it checks a request's head (the token, the declared body size) before any of its
//! body is read, answers a refusal at once, and has the body read on the connection's own
//! thread. Requests then go to one of three pools: control (`/stats`, `/healthz`,
//! `/get_available_resources`, unknown routes), which never waits behind a command; start
//! (`/start_instance`, whose `wait` may hold its thread); and work (execute, close, and model
//! calls, which wait on the network), so that starts waiting for room never delay a command.
//! An execute or close with its body runs on its connection's own thread once it holds one of
//! the work lane's `--workers` places ([`Places`]): no handoff to a worker and back, two
//! thread switches less per command (on a loaded machine each costs a wait for a core).
//! A panic in a handler answers 500 and the worker lives on. A streamed model answer is
//! written here, chunk by chunk, as it arrives.

use crate::api::{self, ExecCommand, StartRequest};
use crate::env::files::{self, Download};
use crate::error::Error;
use crate::gateway::{self, Api, Forwarded, ForwardedBody, Gateway, GatewayError};
use crate::openapi;
use crate::service::Service;
use crossbeam_channel::unbounded;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use tiny_http::{HTTPVersion, Header, Method, Request, Response, Server, StatusCode};

/// Threads that answer control routes.
const CONTROL_WORKERS: usize = 2;

/// The largest body of `/start_instance`, `/execute_command` and `/close_instance` (413
/// beyond; `--max-body-bytes` when that is lower): the longest `cmd` and `env`, escaped, fit
/// with room to spare. The model routes take up to `--max-body-bytes`.
pub const MAX_API_BODY_BYTES: usize = 1024 * 1024;

/// Request bodies held in memory at once, over every connection, in bodies of the largest
/// size (`--max-body-bytes`): one client may open `--max-connections` connections and send a
/// body on each; past this, 503.
const BODIES_IN_MEMORY: usize = 32;

/// How much of a body is read (and counted) at a time.
const BODY_READ_BYTES: usize = 64 * 1024;

/// How long to let workers finish answering once the accept loop stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// The most a streamed answer passes on in one chunk.
const STREAM_CHUNK_BYTES: usize = 16 * 1024;

/// How the HTTP side is sized.
#[derive(Clone, Copy, Debug)]
pub struct HttpSettings {
    /// Threads of the work pool, and of the start pool.
    pub workers: usize,
    pub max_body_bytes: usize,
    /// How long a body may stop arriving (`--client-timeout`), for the 408's words.
    pub client_timeout: Duration,
}

/// The bearer token every route but `/healthz` requires, when one is configured.
pub type Token = Option<Arc<str>>;

/// The routes of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    StartInstance,
    ExecuteCommand,
    CloseInstance,
    AvailableResources,
    Stats,
    /// `GET /runs/{run_id}`: one run's sums.
    Runs,
    Healthz,
    Metrics,
    OpenApi,
    ChatCompletions,
    Messages,
    /// `GET` and `PUT /files/{run_id}/{path}`: served on a thread of their own, body and
    /// answer streamed ([`serve_files`]).
    Files,
}

impl Route {
    /// Every route, for the check against the OpenAPI document.
    #[cfg(test)]
    const ALL: [Route; 12] = [
        Route::StartInstance,
        Route::ExecuteCommand,
        Route::CloseInstance,
        Route::AvailableResources,
        Route::Stats,
        Route::Runs,
        Route::Healthz,
        Route::Metrics,
        Route::OpenApi,
        Route::ChatCompletions,
        Route::Messages,
        Route::Files,
    ];

    fn of(path: &str) -> Option<Route> {
        Some(match path {
            "/start_instance" => Route::StartInstance,
            "/execute_command" => Route::ExecuteCommand,
            "/close_instance" => Route::CloseInstance,
            "/get_available_resources" => Route::AvailableResources,
            "/stats" => Route::Stats,
            "/healthz" => Route::Healthz,
            "/metrics" => Route::Metrics,
            "/openapi.json" => Route::OpenApi,
            "/v1/chat/completions" => Route::ChatCompletions,
            "/v1/messages" => Route::Messages,
            _ if path.starts_with("/runs/") => Route::Runs,
            files if files.starts_with("/files/") => Route::Files,
            _ => return None,
        })
    }

    fn method(self) -> Method {
        if self.is_control() {
            Method::Get
        } else {
            Method::Post
        }
    }

    fn method_name(self) -> &'static str {
        if self == Route::Files {
            "GET, PUT"
        } else if self.is_control() {
            "GET"
        } else {
            "POST"
        }
    }

    /// Control routes are cheap, frequent, and must answer while every worker runs a command.
    fn is_control(self) -> bool {
        matches!(
            self,
            Route::AvailableResources
                | Route::Stats
                | Route::Runs
                | Route::Healthz
                | Route::Metrics
                | Route::OpenApi
        )
    }

    /// The model gateway's routes, spoken to by OpenAI and Anthropic SDKs.
    fn is_model(self) -> bool {
        matches!(self, Route::ChatCompletions | Route::Messages)
    }

    /// Polled every second by `poll` and health checks: logged at debug only.
    fn is_noisy(self) -> bool {
        matches!(self, Route::Stats | Route::Healthz | Route::Metrics)
    }
}

/// What a handler answers: JSON, another kind of text (`/metrics`), or a model upstream's
/// answer with its own status.
enum Reply {
    Json(Value),
    Text {
        content_type: &'static str,
        body: String,
    },
    Model(Forwarded),
    /// A download from an instance: a file's bytes or a directory's tar.
    File(Download),
}

/// The work lane's places: a command that holds one runs on its connection's thread, a model
/// call on a work thread; at most `--workers` of them run at once, the others wait for a place.
struct Places {
    free: crossbeam_channel::Receiver<()>,
    back: crossbeam_channel::Sender<()>,
    count: usize,
}

/// One of the [`Places`], given back when dropped.
struct Place<'a>(&'a Places);

impl Places {
    fn new(count: usize) -> Arc<Places> {
        let (back, free) = crossbeam_channel::bounded(count);
        for _ in 0..count {
            let _ = back.send(());
        }
        Arc::new(Places { free, back, count })
    }

    /// Waits for a place.
    fn take(&self) -> Place<'_> {
        // The sender lives in `self`: the channel never disconnects.
        let _ = self.free.recv();
        Place(self)
    }

    /// Waits (up to `deadline`) until no place is taken.
    fn wait_all_free(&self, deadline: Instant) -> bool {
        while self.free.len() < self.count {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let _ = self.0.back.send(());
    }
}

/// A request with its body read, on its way to a worker.
struct Job {
    request: Request,
    body: Result<Body, Error>,
    received: Instant,
}

/// A request body, counted against the [`BodyBudget`] until it is dropped.
struct Body {
    bytes: Vec<u8>,
    _held: Held,
}

/// What is left of the bytes bodies may hold in memory at once.
struct BodyBudget {
    left: AtomicUsize,
    total: usize,
}

/// Bytes taken from a [`BodyBudget`], given back when dropped.
struct Held {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyBudget {
    fn new(total: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            left: AtomicUsize::new(total),
            total,
        })
    }

    fn empty(self: &Arc<Self>) -> Held {
        Held {
            budget: Arc::clone(self),
            bytes: 0,
        }
    }
}

impl Held {
    /// Takes `bytes` more, or fails when the budget has not that much left.
    fn grow(&mut self, bytes: usize) -> Result<(), Error> {
        let taken = self
            .budget
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(bytes)
            });
        match taken {
            Ok(_) => {
                self.bytes += bytes;
                Ok(())
            }
            Err(_) => Err(Error::Overloaded(format!(
                "the server holds {} bytes of request bodies already, its most: retry shortly",
                self.budget.total
            ))),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.left.fetch_add(self.bytes, Ordering::SeqCst);
    }
}

/// The only place that picks a status code.
pub fn status_of(error: &Error) -> u16 {
    use crate::env::EnvError;
    match error {
        Error::BadRequest(_) => 400,
        Error::Env {
            source: EnvError::Invalid(_),
            ..
        } => 400,
        Error::Env {
            source: EnvError::NotFound(_),
            ..
        } => 404,
        Error::Unauthorized => 401,
        Error::RequestTimeout(_) => 408,
        Error::UnknownInstance(_) | Error::UnknownRoute(_) => 404,
        Error::MethodNotAllowed { .. } => 405,
        Error::RunIdInUse { .. } => 409,
        Error::Gone { .. } | Error::Reaped { .. } => 410,
        Error::BodyTooLarge { .. } => 413,
        Error::Insufficient(_) => 429,
        Error::Env { .. } | Error::Internal(_) => 500,
        Error::Gateway(error) => match error {
            GatewayError::Invalid(_) => 400,
            GatewayError::LimitReached(_) => 429,
            GatewayError::Upstream { .. } => 502,
            GatewayError::Timeout { .. } => 504,
        },
        Error::ShuttingDown | Error::Overloaded(_) => 503,
    }
}

/// The error body every client reads: `{"status": "error", "detail": "...", "infra": bool}`.
fn error_body(error: &Error) -> Value {
    json!({"status": "error", "detail": error.to_string(), "infra": error.infra()})
}

/// Serves until `server.unblock()` is called, then lets workers finish for a moment.
pub fn serve(
    server: Arc<Server>,
    service: Arc<Service>,
    gateway: Arc<Gateway>,
    settings: HttpSettings,
    token: Token,
) {
    let (work_tx, work_rx) = unbounded::<Job>();
    let (start_tx, start_rx) = unbounded::<Job>();
    let (control_tx, control_rx) = unbounded::<Job>();
    let (done_tx, done_rx) = unbounded::<()>();
    // Shared by the work pool's threads (model calls, bodiless requests) and the commands run
    // on their connections' threads: at most `--workers` of them run at once.
    let places = Places::new(settings.workers);
    let mut pool = Vec::new();
    for (count, rx, name) in [
        (settings.workers, &work_rx, "work"),
        (settings.workers, &start_rx, "start"),
        (CONTROL_WORKERS, &control_rx, "control"),
    ] {
        for index in 0..count {
            let (rx, service, done) = (rx.clone(), Arc::clone(&service), done_tx.clone());
            let gateway = Arc::clone(&gateway);
            let places = (name == "work").then(|| Arc::clone(&places));
            pool.push(
                thread::Builder::new()
                    .name(format!("{name}-{index}"))
                    .spawn(move || {
                        for job in rx.iter() {
                            let _place = places.as_ref().map(|places| places.take());
                            handle(&service, &gateway, job);
                        }
                        drop(done);
                    })
                    .expect("cannot spawn a worker thread"),
            );
        }
    }
    drop((work_rx, start_rx, control_rx, done_tx));
    let budget = BodyBudget::new(settings.max_body_bytes.saturating_mul(BODIES_IN_MEMORY));

    while let Ok(request) = server.recv() {
        let received = Instant::now();
        let route = path_of(request.url()).and_then(Route::of);
        // Only a POST to a route that takes one has its body read; any other body is left
        // unread, and the connection closes after the answer.
        let body_limit = route
            .filter(|route| !route.is_control() && *request.method() == Method::Post)
            .map(|route| body_limit(route, settings.max_body_bytes));
        if let Err(error) = check_head(&request, route, token.as_deref(), body_limit) {
            let status = status_of(&error);
            finish(
                request,
                route,
                status,
                Reply::Json(error_body(&error)),
                received,
            );
            continue;
        }
        let lane = match route {
            Some(Route::StartInstance) => &start_tx,
            Some(route) if !route.is_control() => &work_tx,
            _ => &control_tx,
        };
        if route == Some(Route::Files) {
            // A thread of its own, not the connection's: a download's many writes are handed
            // to the connection's thread, which must be free to send them.
            let (service, places) = (Arc::clone(&service), Arc::clone(&places));
            let max_body_bytes = settings.max_body_bytes;
            let spawned = thread::Builder::new().name("files".into()).spawn(move || {
                let _place = places.take();
                serve_files(&service, request, max_body_bytes, received);
            });
            if let Err(err) = spawned {
                log::error!("cannot start a thread for /files: {err}");
            }
            continue;
        }
        let inline = matches!(route, Some(Route::ExecuteCommand | Route::CloseInstance));
        match body_limit {
            Some(limit) if inline && has_body(&request) => {
                let client_timeout = settings.client_timeout;
                let held = budget.empty();
                let (service, gateway, places) = (
                    Arc::clone(&service),
                    Arc::clone(&gateway),
                    Arc::clone(&places),
                );
                request.on_connection_thread(move |mut request| {
                    let body = read_body(&mut request, limit, client_timeout, held);
                    let _place = places.take();
                    let job = Job {
                        request,
                        body,
                        received,
                    };
                    handle(&service, &gateway, job);
                });
            }
            Some(limit) if has_body(&request) => {
                let lane = lane.clone();
                let client_timeout = settings.client_timeout;
                let held = budget.empty();
                request.on_connection_thread(move |mut request| {
                    let body = read_body(&mut request, limit, client_timeout, held);
                    let _ = lane.send(Job {
                        request,
                        body,
                        received,
                    });
                });
            }
            _ => {
                let _ = lane.send(Job {
                    request,
                    body: Ok(Body {
                        bytes: Vec::new(),
                        _held: budget.empty(),
                    }),
                    received,
                });
            }
        }
    }

    // tiny_http answers a dropped request with a bare 500: answer the stragglers properly.
    while let Ok(Some(request)) = server.try_recv() {
        let error = Error::ShuttingDown;
        let _ = request.respond(json_response(status_of(&error), &error_body(&error)));
    }
    drop((work_tx, start_tx, control_tx));
    // Every worker drops its sender when its queue is empty: disconnected means all are done.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let workers_done = !matches!(
        done_rx.recv_deadline(deadline),
        Err(crossbeam_channel::RecvTimeoutError::Timeout)
    );
    if !(workers_done && places.wait_all_free(deadline)) {
        log::warn!("some requests were still running at exit");
    }
    drop(pool);
}

/// The largest body `route` takes.
fn body_limit(route: Route, max_body_bytes: usize) -> usize {
    if route.is_model() {
        max_body_bytes
    } else {
        max_body_bytes.min(MAX_API_BODY_BYTES)
    }
}

/// What is checked before any of the body is read: the token (every route but `/healthz`),
/// then a declared body size over the route's limit.
fn check_head(
    request: &Request,
    route: Option<Route>,
    token: Option<&str>,
    body_limit: Option<usize>,
) -> Result<(), Error> {
    if route != Some(Route::Healthz) {
        authorize(request, token)?;
    }
    if let (Some(limit), Some(length)) = (body_limit, request.body_length()) {
        if length > limit {
            return Err(Error::BodyTooLarge { limit });
        }
    }
    Ok(())
}

/// True when the request has a body to read (a length above 0, or chunks).
fn has_body(request: &Request) -> bool {
    match request.body_length() {
        Some(length) => length > 0,
        None => request
            .headers()
            .iter()
            .any(|header| header.field.equiv("Transfer-Encoding")),
    }
}

/// Reads at most `limit` bytes of body, each piece counted in `held` as it arrives.
fn read_body(
    request: &mut Request,
    limit: usize,
    timeout: Duration,
    mut held: Held,
) -> Result<Body, Error> {
    let failed = |err: std::io::Error| match err.kind() {
        std::io::ErrorKind::TimedOut => Error::RequestTimeout(format!(
            "the request body stopped arriving: nothing came for {} s",
            timeout.as_secs_f64()
        )),
        _ => Error::BadRequest(format!("cannot read the request body: {err}")),
    };
    // Grown by doubling (at most to `limit`), and what is allocated is what is counted: a
    // client holds at most twice what it sent.
    let mut bytes: Vec<u8> = Vec::new();
    // A declared length sizes the piece (one more byte to see the end): a small body does
    // not zero 64 KiB.
    let piece_bytes = request
        .body_length()
        .map_or(BODY_READ_BYTES, |length| (length + 1).min(BODY_READ_BYTES));
    let reader = request.as_reader();
    let mut piece = vec![0; piece_bytes];
    loop {
        let read = match reader.read(&mut piece) {
            Ok(0) => break,
            Ok(read) => read,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(failed(err)),
        };
        let needed = bytes.len() + read;
        if needed > limit {
            return Err(Error::BodyTooLarge { limit });
        }
        if needed > bytes.capacity() {
            let capacity = needed.max(bytes.capacity() * 2).min(limit);
            held.grow(capacity - bytes.capacity())?;
            bytes.reserve_exact(capacity - bytes.len());
        }
        bytes.extend_from_slice(&piece[..read]);
    }
    Ok(Body { bytes, _held: held })
}

fn path_of(url: &str) -> Option<&str> {
    url.split('?').next()
}

/// Runs the handler, catching panics, and answers.
fn handle(service: &Service, gateway: &Gateway, job: Job) {
    let Job {
        request,
        body,
        received,
    } = job;
    let url = request.url().to_string();
    let route = path_of(&url).and_then(Route::of);
    let (status, reply) = answer(|| {
        let body = body?;
        let parts = RequestParts {
            method: request.method(),
            url: &url,
            headers: request.headers(),
            body: &body.bytes,
        };
        dispatch(service, gateway, route, parts)
    });
    finish(request, route, status, reply, received);
}

/// Answers, and writes the access-log line. The answer is handed to the connection's thread,
/// so this never waits for the client, but for a streamed answer it does not take.
fn finish(request: Request, route: Option<Route>, status: u16, mut body: Reply, received: Instant) {
    let url = request.url().to_string();
    let path = path_of(&url).unwrap_or("/");
    let model_route = route.is_some_and(Route::is_model);
    // arservice's own error (an upstream's answer is a `Reply::Model`).
    let own_error = matches!(body, Reply::Json(_)) && status >= 400;
    let sdk_path = model_route || (route.is_none() && gateway::is_sdk_path(path));
    if let (true, Reply::Json(error)) = (sdk_path, &mut body) {
        readable_by_sdks(error, status);
    }
    let elapsed_ms = received.elapsed().as_secs_f64() * 1000.0;
    let level = if route.is_some_and(Route::is_noisy) && status < 500 {
        log::Level::Debug
    } else {
        log::Level::Info
    };
    log::log!(
        level,
        "{} {} {} {:.1}ms",
        request.method(),
        path,
        status,
        elapsed_ms
    );
    let mut response = match body {
        Reply::Json(body) => json_response(status, &body),
        Reply::Text { content_type, body } => Response::from_data(body.into_bytes())
            .with_status_code(status)
            .with_header(header("Content-Type", content_type)),
        Reply::File(download) => {
            let headers = vec![
                header("Content-Type", download.kind.content_type()),
                header(files::KIND_HEADER, download.kind.name()),
            ];
            let sent = respond_streaming(request, status, headers, download.body, download.length);
            if let Err(err) = sent {
                log::info!("sending {path}: {err}");
            }
            return;
        }
        Reply::Model(forwarded) => {
            let headers = forwarded_headers(&forwarded);
            match forwarded.body {
                ForwardedBody::Full(bytes) => {
                    let mut response = Response::from_data(bytes).with_status_code(status);
                    for header in headers {
                        response.add_header(header);
                    }
                    response
                }
                ForwardedBody::Stream(body) => {
                    // The stream is read here, outside `answer`: catch its panics too.
                    let sent = catch_unwind(AssertUnwindSafe(|| {
                        respond_streaming(request, status, headers, body, None)
                    }));
                    match sent {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => log::info!("streaming the answer to {path}: {err}"),
                        Err(_) => log::error!("streaming the answer to {path} panicked"),
                    }
                    return;
                }
            }
        }
    };
    if status == 405 {
        if let Some(route) = route {
            response.add_header(header("Allow", route.method_name()));
        }
    }
    if model_route && (status == 429 || (own_error && status == 504)) {
        // arservice's own 429 on a model route is a spent limit, its 504 a call past
        // --model-timeout: the SDKs would retry them in vain (an upstream's 429 comes after
        // the gateway's own retries).
        response.add_header(header("x-should-retry", "false"));
    }
    if let Err(err) = request.respond(response) {
        log::debug!("client went away before the answer to {path}: {err}");
    }
}

/// `PUT /files/{run_id}/{path}` (the body, at most `--max-body-bytes`, streamed to the
/// instance; a tar with `Content-Type: application/x-tar`) and `GET` (the file, or the
/// directory's tar, streamed back), on a thread of its own holding one of the work places.
fn serve_files(service: &Service, mut request: Request, max_body_bytes: usize, received: Instant) {
    let url = request.url().to_string();
    let (status, reply) = answer(|| {
        let (run_id, path) = files_target(&url)?;
        match request.method() {
            Method::Put => {
                if request
                    .body_length()
                    .is_some_and(|length| length > max_body_bytes)
                {
                    return Err(Error::BodyTooLarge {
                        limit: max_body_bytes,
                    });
                }
                let tar = request.headers().iter().any(|header| {
                    header.field.equiv("Content-Type")
                        && header.value.as_str().starts_with(files::TAR_CONTENT_TYPE)
                });
                let mode = Query::parse(&url)
                    .get("mode")
                    .map(files::parse_mode)
                    .transpose()
                    .map_err(|err| Error::BadRequest(err.to_string()))?;
                let upload = files::Upload { path, mode, tar };
                let mut body = Capped {
                    inner: request.as_reader(),
                    left: max_body_bytes,
                    over: false,
                };
                let written = service.put_file(&run_id, &upload, &mut body);
                if body.over {
                    return Err(Error::BodyTooLarge {
                        limit: max_body_bytes,
                    });
                }
                Ok(Reply::Json(json!({"status": "success", "bytes": written?})))
            }
            Method::Get | Method::Head => Ok(Reply::File(service.get_file(&run_id, &path)?)),
            _ => Err(Error::MethodNotAllowed {
                path: "/files/{run_id}/{path}".into(),
                allowed: Route::Files.method_name(),
            }),
        }
    });
    finish(request, Some(Route::Files), status, reply, received);
}

/// The run id and the path in `/files/{run_id}/{path}` (percent-decoded; an absolute path
/// as `/files/r//etc/hosts` or `/files/r/%2Fetc%2Fhosts`).
fn files_target(url: &str) -> Result<(crate::run_id::RunId, String), Error> {
    let rest = path_of(url)
        .and_then(|path| path.strip_prefix("/files/"))
        .unwrap_or("");
    let (run_id, path) = rest.split_once('/').unwrap_or((rest, ""));
    let run_id = api::parse_run_id(&percent_decode(run_id), "run_id")?;
    let path = percent_decode(path);
    if path.is_empty() {
        return Err(Error::BadRequest(
            "name a path after the run_id: /files/{run_id}/{path}".into(),
        ));
    }
    Ok((run_id, path))
}

/// A request body cut at `left` bytes: past it, an error (and `over`), so that the upload
/// fails and leaves nothing.
struct Capped<'a> {
    inner: &'a mut dyn Read,
    left: usize,
    over: bool,
}

impl Read for Capped<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min(self.left + 1);
        let read = self.inner.read(&mut buf[..want])?;
        if read > self.left {
            self.over = true;
            return Err(std::io::Error::other(
                "the body is larger than --max-body-bytes",
            ));
        }
        self.left -= read;
        Ok(read)
    }
}

/// Checks `Authorization: Bearer <token>` in constant time when a token is configured; the
/// scheme's name is case-insensitive (RFC 9110 §11.1), the token is not.
fn authorize(request: &Request, token: Option<&str>) -> Result<(), Error> {
    let Some(token) = token else { return Ok(()) };
    let presented = request
        .headers()
        .iter()
        .find(|header| header.field.equiv("Authorization"))
        .and_then(|header| header.value.as_str().trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
        .map(|(_, token)| token)
        .unwrap_or("");
    if constant_time_eq(presented.trim().as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(Error::Unauthorized)
    }
}

/// Compares without an early exit, so the time taken does not tell how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for index in 0..a.len().max(b.len()) {
        let x = a.get(index).copied().unwrap_or(0);
        let y = b.get(index).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// OpenAI and Anthropic SDKs put `error.message` in their exceptions: arservice's own errors
/// on the model routes, and on unknown paths an SDK may call, carry it beside `detail`.
fn readable_by_sdks(error: &mut Value, status: u16) {
    let kind = if status == 404 {
        "not_found_error"
    } else {
        "arservice_error"
    };
    if let Some(detail) = error.get("detail").cloned() {
        error["error"] = json!({"type": kind, "message": detail});
    }
}

/// The headers of a forwarded answer: its content type and the upstream's headers worth
/// passing on (invalid ones are dropped).
fn forwarded_headers(forwarded: &Forwarded) -> Vec<Header> {
    std::iter::once(("Content-Type", forwarded.content_type.as_str()))
        .chain(
            forwarded
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str())),
        )
        .filter_map(|(name, value)| Header::from_bytes(name.as_bytes(), value.as_bytes()).ok())
        .collect()
}

/// Sends a body as it arrives: each read is one chunk (or, with a known `length`, a run of
/// raw bytes), flushed at once, so that nothing holds more than one read of it. tiny_http's
/// own writers would hold up to 8 KiB back (server-sent events must not wait), and on the
/// connection's thread gather a whole body of known length before sending it. An HTTP/1.0
/// client, which knows no chunks, gets a body of unknown length at the end.
fn respond_streaming(
    request: Request,
    status: u16,
    headers: Vec<Header>,
    mut body: Box<dyn Read>,
    length: Option<u64>,
) -> std::io::Result<()> {
    if *request.http_version() < HTTPVersion(1, 1) && length.is_none() {
        let response = Response::new(StatusCode(status), headers, body, None, None);
        return request.respond(response);
    }
    let head_only = *request.method() == Method::Head;
    let mut out = request.into_writer();
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\n",
        StatusCode(status).default_reason_phrase()
    );
    for header in &headers {
        head.push_str(&format!("{}: {}\r\n", header.field, header.value));
    }
    match length {
        Some(length) => head.push_str(&format!("Content-Length: {length}\r\n\r\n")),
        None => head.push_str("Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"),
    }
    out.write_all(head.as_bytes())?;
    out.flush()?;
    if head_only {
        return Ok(());
    }
    let mut buffer = vec![0; STREAM_CHUNK_BYTES];
    let mut sent = 0u64;
    loop {
        let read = match body.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        if length.is_some() {
            out.write_all(&buffer[..read])?;
        } else {
            write!(out, "{read:x}\r\n")?;
            out.write_all(&buffer[..read])?;
            out.write_all(b"\r\n")?;
        }
        out.flush()?;
        sent += read as u64;
    }
    match length {
        // A body that ended early cannot be finished: the connection must close.
        Some(length) if sent != length => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the body ended after {sent} of {length} bytes"),
        )),
        Some(_) => Ok(()),
        None => {
            out.write_all(b"0\r\n\r\n")?;
            out.flush()
        }
    }
}

fn json_response(status: u16, body: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_data(body.to_string().into_bytes())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

/// Turns a handler's outcome, or its panic, into a status and a JSON body.
fn answer(handler: impl FnOnce() -> Result<Reply, Error>) -> (u16, Reply) {
    let (status, body) = match catch_unwind(AssertUnwindSafe(handler)) {
        Ok(Ok(Reply::Model(forwarded))) => return (forwarded.status, Reply::Model(forwarded)),
        Ok(Ok(reply)) => return (200, reply),
        Ok(Err(error)) => {
            let status = status_of(&error);
            if status >= 500 {
                log::warn!("{error}");
            }
            (status, error_body(&error))
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|text| text.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a handler panicked".to_string());
            let error = Error::Internal(what);
            log::error!("{error}");
            (500, error_body(&error))
        }
    };
    (status, Reply::Json(body))
}

/// What a handler reads of a request.
struct RequestParts<'a> {
    method: &'a Method,
    url: &'a str,
    headers: &'a [Header],
    body: &'a [u8],
}

fn dispatch(
    service: &Service,
    gateway: &Gateway,
    route: Option<Route>,
    parts: RequestParts,
) -> Result<Reply, Error> {
    let RequestParts {
        method,
        url,
        headers,
        body,
    } = parts;
    let path = path_of(url).unwrap_or("/");
    let Some(route) = route else {
        return Err(Error::UnknownRoute(path.to_string()));
    };
    if *method != route.method() && !(route.method() == Method::Get && *method == Method::Head) {
        return Err(Error::MethodNotAllowed {
            path: path.to_string(),
            allowed: route.method_name(),
        });
    }
    let reply = match route {
        // Served on its connection's thread, never dispatched.
        Route::Files => return Err(Error::Internal("/files is served by serve_files".into())),
        Route::StartInstance => {
            let request = StartRequest::parse(body, service.presets(), service.default_kind())?;
            let run_id = request.run_id.clone();
            service.start(request)?;
            Ok(json!({"status": "success", "instance_id": run_id}))
        }
        Route::ExecuteCommand => {
            let result = service.execute(ExecCommand::parse(body)?)?;
            Ok(json!({"status": "success", "result": result}))
        }
        Route::CloseInstance => {
            let run_id = api::run_id(&api::json_object(body)?)?;
            service.close(&run_id)?;
            Ok(json!({"status": "success"}))
        }
        Route::AvailableResources => Ok(service.available_resources()),
        Route::Stats => {
            let query = Query::parse(url);
            let model = gateway.stats(query.get("run_id"));
            Ok(service.stats(
                query.get("run_id"),
                query.get("container_name"),
                model.as_ref(),
            ))
        }
        Route::Runs => {
            let run_id = percent_decode(path.strip_prefix("/runs/").unwrap_or_default());
            let run_id = api::parse_run_id(&run_id, "run_id")?;
            let model = gateway.run_model(run_id.as_str()).map(|model| json!(model));
            service.run(&run_id, model)
        }
        Route::Healthz => {
            if service.is_shutting_down() {
                Err(Error::ShuttingDown)
            } else {
                Ok(json!({"status": "ok"}))
            }
        }
        Route::Metrics => {
            let mut body = service.metrics();
            gateway.render_metrics(&mut body);
            return Ok(Reply::Text {
                content_type: "text/plain; version=0.0.4",
                body,
            });
        }
        Route::OpenApi => {
            return Ok(Reply::Text {
                content_type: "application/json",
                body: openapi::narrowed(service.container_types(), service.default_kind()),
            })
        }
        Route::ChatCompletions | Route::Messages => {
            if service.is_shutting_down() {
                return Err(Error::ShuttingDown);
            }
            let api = if route == Route::ChatCompletions {
                Api::OpenAi
            } else {
                Api::Anthropic
            };
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|header| (header.field.as_str().as_str(), header.value.as_str()))
                .collect();
            let run_id = headers
                .iter()
                .find(|(field, _)| field.eq_ignore_ascii_case(gateway::RUN_ID_HEADER))
                .map(|(_, value)| value.trim())
                .filter(|run_id| !run_id.is_empty())
                .map(|run_id| api::checked_run_id(run_id, gateway::RUN_ID_HEADER))
                .transpose()?;
            return Ok(Reply::Model(gateway.forward(api, run_id, &headers, body)?));
        }
    };
    reply.map(Reply::Json)
}

/// The decoded `key=value` pairs of a URL's query string.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(url: &str) -> Query {
        let query = url.split_once('?').map(|(_, query)| query).unwrap_or("");
        Query(
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (percent_decode(key), percent_decode(value))
                })
                .collect(),
        )
    }

    /// The first non-empty value of `key`.
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, value)| name == key && !value.is_empty())
            .map(|(_, value)| value.as_str())
    }
}

/// Decodes `%XX` and `+` (form encoding, as `requests` sends `params=`).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).ok();
                match hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        index += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_handler_answers_500_with_its_message() {
        let (status, Reply::Json(body)) = answer(|| panic!("boom")) else {
            panic!("not JSON")
        };
        assert_eq!(status, 500);
        assert_eq!(body["status"], "error");
        assert!(body["detail"].as_str().unwrap().contains("boom"));
        // The same thread goes on answering.
        let (status, _) = answer(|| Ok(Reply::Json(json!({}))));
        assert_eq!(status, 200);
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let doc: Value = serde_json::from_str(openapi::OPENAPI).expect("openapi.json is JSON");
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), Route::ALL.len(), "{:?}", paths.keys());
        for (path, operations) in paths {
            let route =
                Route::of(path).unwrap_or_else(|| panic!("{path} is documented but not served"));
            let methods: Vec<&str> = operations
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(
                methods.join(", "),
                route.method_name().to_lowercase(),
                "{path}"
            );
        }
        for route in Route::ALL {
            let served = paths.keys().any(|path| Route::of(path) == Some(route));
            assert!(served, "{route:?} is served but not documented");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
    }

    #[test]
    fn query_strings_are_decoded() {
        let query = Query::parse("/stats?run_id=a%2Fb+c&container_name=&x");
        assert_eq!(query.get("run_id"), Some("a/b c"));
        assert_eq!(query.get("container_name"), None);
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn every_error_has_its_status() {
        use crate::ledger::{Amount, Shortage};
        let shortage = Shortage {
            resource: "instances".into(),
            asked: Amount::ONE,
            left: Amount::ZERO,
            max: Amount::ONE,
            waiting: 0,
        };
        for (error, status) in [
            (Error::BadRequest("x".into()), 400),
            (Error::Unauthorized, 401),
            (Error::RequestTimeout("x".into()), 408),
            (Error::UnknownInstance("x".into()), 404),
            (Error::UnknownRoute("/x".into()), 404),
            (
                Error::MethodNotAllowed {
                    path: "/stats".into(),
                    allowed: "GET",
                },
                405,
            ),
            (
                Error::RunIdInUse {
                    run_id: "x".into(),
                    state: "running",
                },
                409,
            ),
            (
                Error::Gone {
                    run_id: "x".into(),
                    reason: "job 1 ended: TIMEOUT".into(),
                },
                410,
            ),
            (Error::BodyTooLarge { limit: 1 }, 413),
            (Error::Insufficient(shortage), 429),
            (Error::Gateway(GatewayError::Invalid("x".into())), 400),
            (
                Error::Gateway(GatewayError::LimitReached(
                    crate::gateway::LimitHit::Calls { calls: 1, limit: 1 },
                )),
                429,
            ),
            (Error::Internal("x".into()), 500),
            (
                Error::Gateway(GatewayError::Upstream {
                    upstream: "a".into(),
                    attempts: 1,
                    source: ureq::Error::ConnectionFailed,
                }),
                502,
            ),
            (
                Error::Gateway(GatewayError::Timeout {
                    upstream: "a".into(),
                    attempts: 1,
                    timeout: Duration::from_secs(1),
                }),
                504,
            ),
            (Error::ShuttingDown, 503),
            (Error::Overloaded("x".into()), 503),
        ] {
            assert_eq!(status_of(&error), status, "{error:?}");
        }
    }
}
