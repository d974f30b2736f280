//! HTTP: the worker pools, admission, routing, and the one mapping from [`Error`] to a status
//! code. Routes and URLs are in `route`, request bodies in `body`, writing answers in `answer`,
//! `/files` (served on threads of their own) in `files`, each pool in `lane`, `/execute_command` with `"stream": true`
//! (also on threads of their own) in `stream`.
//!
//! tiny_http (patched, `vendor/tiny_http/PATCHED.md`) serves each connection on a thread of
//! its own, within [`tiny_http::Limits`]: heads bounded in size and time, one request in
//! flight per connection, answers written by that thread. Each request is taken on that
//! thread as soon as its head is read ([`Front::take`], tiny_http's handler): no thread waits
//! on another client, and no request is handed to a receiving thread and back. Its head is
//! checked (the token, the declared body size) before any of its body is read, and a refusal
//! is answered at once. Requests then go to one of three pools: control (`/stats`,
//! `/healthz`, `/get_available_resources`, unknown routes), which never waits behind a
//! command; start (`/start_instance` and `/fork_instance`, whose `wait` may hold its thread); and work (model
//! calls, which wait on the network, and bodiless requests), so that starts waiting for room
//! never delay a command. An execute or close with its body runs on its connection's own
//! thread once it holds one of the work lane's `--workers` places ([`Places`]): at most that
//! many run at once, the others wait for a place; no handoff to a worker and back. A panic in
//! a handler answers 500 and the thread lives on. A streamed model answer is written chunk by
//! chunk as it arrives.

use crate::api::{self, ExecCommand, StartRequest};
use crate::env::files::Download;
use crate::error::Error;
use crate::gateway::{self, Api, Forwarded, Gateway, GatewayError};
use crate::openapi;
use crate::service::Service;
use crossbeam_channel::{unbounded, Receiver};
use lane::Lane;
use parking_lot::RwLock;
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use tiny_http::{Header, Method, Request, Server};

mod answer;
mod body;
mod files;
mod lane;
mod route;
mod stream;

use crate::url::percent_decode;
use answer::{finish, json_response};
pub(crate) use answer::{respond_streaming, FILE_PIECE_BYTES};
use body::{body_limit, has_body, read_body, Body, BodyBudget};
use route::{path_of, Query, Route};

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

/// How long to let workers finish answering once serving stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

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

/// The pools' queues, one per lane.
struct Lanes {
    work: Lane<Job>,
    start: Lane<Job>,
    control: Lane<Job>,
}

/// What takes each request as its head arrives, on its connection's thread (tiny_http's
/// handler): checks it, answers a refusal, runs a command there or hands the request to a
/// pool.
struct Front {
    service: Arc<Service>,
    gateway: Arc<Gateway>,
    settings: HttpSettings,
    token: Token,
    budget: Arc<BodyBudget>,
    /// Shared by the work pool's threads (model calls, bodiless requests) and the commands
    /// run on their connections' threads: at most `--workers` of them run at once.
    places: Arc<Places>,
    /// `None` once serving stopped: what comes after is answered 503.
    lanes: RwLock<Option<Lanes>>,
}

/// Serves until `server.unblock()` is called, then lets workers finish for a moment.
pub fn serve(
    server: Arc<Server>,
    service: Arc<Service>,
    gateway: Arc<Gateway>,
    settings: HttpSettings,
    token: Token,
) {
    let places = Places::new(settings.workers);
    let (lanes, done) = start_pools(&service, &gateway, &places, settings.workers);
    let front = Arc::new(Front {
        service,
        gateway,
        settings,
        token,
        budget: BodyBudget::new(settings.max_body_bytes.saturating_mul(BODIES_IN_MEMORY)),
        places,
        lanes: RwLock::new(Some(lanes)),
    });
    let on_connections = Arc::clone(&front);
    server.set_handler(Box::new(move |request| on_connections.take(request)));
    // What came before the handler was set; then this waits for `server.unblock()`.
    while let Ok(request) = server.recv() {
        front.take(request);
    }
    // Dropping the queues' senders lets every worker end once its queue is empty.
    drop(front.lanes.write().take());
    // tiny_http answers a dropped request with a bare 500: answer the stragglers properly.
    while let Ok(Some(request)) = server.try_recv() {
        let error = Error::ShuttingDown;
        let _ = request.respond(json_response(status_of(&error), &error_body(&error)));
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let workers_done = !matches!(
        done.recv_deadline(deadline),
        Err(crossbeam_channel::RecvTimeoutError::Timeout)
    );
    if !(workers_done && front.places.wait_all_free(deadline)) {
        log::warn!("some requests were still running at exit");
    }
}

/// The three pools: control, start and work (whose threads each hold one of `places` while
/// they run a request), each of a fixed size, their threads started as requests come
/// ([`Lane`]). The receiver disconnects once every worker has ended.
fn start_pools(
    service: &Arc<Service>,
    gateway: &Arc<Gateway>,
    places: &Arc<Places>,
    workers: usize,
) -> (Lanes, Receiver<()>) {
    let (done, done_rx) = unbounded::<()>();
    let lane = |name, size, places: Option<&Arc<Places>>| {
        let (service, gateway) = (Arc::clone(service), Arc::clone(gateway));
        let places = places.map(Arc::clone);
        Lane::new(name, size, done.clone(), move |job| {
            let _place = places.as_ref().map(|places| places.take());
            handle(&service, &gateway, job);
        })
    };
    let lanes = Lanes {
        work: lane("work", workers, Some(places)),
        start: lane("start", workers, None),
        control: lane("control", CONTROL_WORKERS, None),
    };
    (lanes, done_rx)
}

impl Front {
    /// Checks the head before any of the body is read; answers a refusal at once; an execute
    /// or close with a body runs on this (the connection's) thread once it holds a place; the
    /// rest has its body read here and goes to its pool.
    fn take(&self, request: Request) {
        let received = Instant::now();
        let route = path_of(request.url()).and_then(Route::of);
        // Only a POST to a route that takes one has its body read; any other body is left
        // unread, and the connection closes after the answer.
        let body_limit = route
            .filter(|route| !route.is_control() && *request.method() == Method::Post)
            .map(|route| body_limit(route, self.settings.max_body_bytes));
        if let Err(error) = check_head(&request, route, self.token.as_deref(), body_limit) {
            return refuse(request, route, error, received);
        }
        let lanes = self.lanes.read();
        let Some(lanes) = lanes.as_ref() else {
            return refuse(request, route, Error::ShuttingDown, received);
        };
        let lane = match route {
            Some(Route::StartInstance | Route::ForkInstance | Route::ExportInstance) => {
                &lanes.start
            }
            Some(route) if !route.is_control() => &lanes.work,
            _ => &lanes.control,
        };
        if route == Some(Route::Files) {
            return files::spawn(
                &self.service,
                &self.places,
                request,
                self.settings,
                received,
            );
        }
        let inline = matches!(route, Some(Route::ExecuteCommand | Route::CloseInstance));
        let (limit, timeout) = match body_limit {
            Some(limit) if has_body(&request) => (limit, self.settings.client_timeout),
            _ => {
                let body = Ok(Body {
                    bytes: Vec::new(),
                    _held: self.budget.empty(),
                });
                lane.send(Job {
                    request,
                    body,
                    received,
                });
                return;
            }
        };
        let held = self.budget.empty();
        // Run after this returns (and after a `100 Continue`), still on this thread.
        if inline {
            let (service, gateway) = (Arc::clone(&self.service), Arc::clone(&self.gateway));
            let places = Arc::clone(&self.places);
            request.on_connection_thread(move |mut request| {
                let body = read_body(&mut request, limit, timeout, held);
                if let Some(command) = streamed(route, &body) {
                    return stream::spawn(&service, &places, request, command, received);
                }
                let _place = places.take();
                let job = Job {
                    request,
                    body,
                    received,
                };
                handle(&service, &gateway, job);
            });
        } else {
            let lane = lane.clone();
            request.on_connection_thread(move |mut request| {
                let body = read_body(&mut request, limit, timeout, held);
                lane.send(Job {
                    request,
                    body,
                    received,
                });
            });
        }
    }
}

/// The command of an `/execute_command` with `"stream": true` (run on a thread of its own:
/// [`stream`]); `None` for anything else, a body that does not parse included (answered as
/// usual).
fn streamed(route: Option<Route>, body: &Result<Body, Error>) -> Option<ExecCommand> {
    let body = body.as_ref().ok()?;
    if route != Some(Route::ExecuteCommand) || !may_stream(&body.bytes) {
        return None;
    }
    ExecCommand::parse(&body.bytes)
        .ok()
        .filter(|command| command.stream)
}

/// Whether a body may ask for a stream: it names `"stream"`, or spells something with a
/// `\u` escape (which could be that key). Any other body is not parsed twice (`handle`
/// parses it).
fn may_stream(bytes: &[u8]) -> bool {
    bytes.windows(8).any(|window| window == b"\"stream\"")
        || bytes.windows(2).any(|window| window == b"\\u")
}

/// Answers `error` at once, with its log line.
fn refuse(request: Request, route: Option<Route>, error: Error, received: Instant) {
    let status = status_of(&error);
    finish(
        request,
        route,
        status,
        Reply::Json(error_body(&error)),
        received,
    );
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
    let path = path_of(parts.url).unwrap_or("/");
    let Some(route) = route else {
        return Err(Error::UnknownRoute(path.to_string()));
    };
    let method = parts.method;
    if *method != route.method() && !(route.method() == Method::Get && *method == Method::Head) {
        return Err(Error::MethodNotAllowed {
            path: path.to_string(),
            allowed: route.method_name(),
        });
    }
    let body = parts.body;
    let reply = match route {
        // Served on a thread of its own, never dispatched.
        Route::Files => return Err(Error::Internal("/files is served by serve_files".into())),
        Route::StartInstance => {
            let request = StartRequest::parse(body, service.presets(), service.default_kind())?;
            let run_id = request.run_id.clone();
            service.start(request)?;
            json!({"status": "success", "instance_id": run_id})
        }
        Route::ForkInstance => {
            let request = api::ForkRequest::parse(body)?;
            let run_id = request.new_run_id.clone();
            service.fork(request)?;
            json!({"status": "success", "instance_id": run_id})
        }
        Route::ExportInstance => {
            service.export(api::ForkRequest::parse(body)?)?;
            json!({"status": "success"})
        }
        Route::ExecuteCommand => {
            let result = service.execute(ExecCommand::parse(body)?)?;
            json!({"status": "success", "result": result})
        }
        Route::CloseInstance => {
            service.close(&api::run_id(&api::json_object(body)?)?)?;
            json!({"status": "success"})
        }
        Route::AvailableResources => service.available_resources(),
        Route::Stats => {
            let query = Query::parse(parts.url);
            let model = gateway.stats(query.get("run_id"));
            let (run_id, container) = (query.get("run_id"), query.get("container_name"));
            service.stats(run_id, container, model.as_ref())
        }
        Route::Runs => {
            let run_id = percent_decode(path.strip_prefix("/runs/").unwrap_or_default());
            let run_id = api::parse_run_id(&run_id, "run_id")?;
            let model = gateway.run_model(run_id.as_str()).map(|model| json!(model));
            service.run(&run_id, model)?
        }
        Route::Healthz if service.is_shutting_down() => return Err(Error::ShuttingDown),
        Route::Healthz => json!({"status": "ok"}),
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
            return model_call(service, gateway, route, parts.headers, body)
        }
    };
    Ok(Reply::Json(reply))
}

/// A model route: forwarded through the gateway, for the run named by its header, if any.
fn model_call(
    service: &Service,
    gateway: &Gateway,
    route: Route,
    headers: &[Header],
    body: &[u8],
) -> Result<Reply, Error> {
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
    Ok(Reply::Model(gateway.forward(api, run_id, &headers, body)?))
}

#[cfg(test)]
mod tests;
