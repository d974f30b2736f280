//! Writing answers: a handler's [`Reply`] as a response (JSON, text, a model upstream's
//! answer, streamed or whole), the access-log line, and the touches the SDKs read.

use super::route::{path_of, Route};
use super::Reply;
use crate::env::files;
use crate::gateway::{self, Forwarded, ForwardedBody};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;
use tiny_http::{HTTPVersion, Header, Method, Request, Response, StatusCode};

/// The most a streamed answer passes on in one chunk.
pub(super) const STREAM_CHUNK_BYTES: usize = 16 * 1024;

/// The most a download (`GET /files`, here and in the agent) passes on in one piece: each
/// piece is one hand-off to the connection's thread, so large pieces move large files with
/// few of them (a read never waits to fill one: it passes on what arrived).
pub(crate) const FILE_PIECE_BYTES: usize = 256 * 1024;

/// The access-log line of a request (at debug for the polled routes that went well).
pub(super) fn access_log(
    method: &str,
    path: &str,
    route: Option<Route>,
    status: u16,
    received: Instant,
) {
    let elapsed_ms = received.elapsed().as_secs_f64() * 1000.0;
    let level = if route.is_some_and(Route::is_noisy) && status < 500 {
        log::Level::Debug
    } else {
        log::Level::Info
    };
    log::log!(level, "{} {} {} {:.1}ms", method, path, status, elapsed_ms);
}

/// Answers, and writes the access-log line. The answer is handed to the connection's thread,
/// so this never waits for the client, but for a streamed answer it does not take.
pub(super) fn finish(
    request: Request,
    route: Option<Route>,
    status: u16,
    mut body: Reply,
    received: Instant,
) {
    let url = request.url().to_string();
    let path = path_of(&url).unwrap_or("/");
    let model_route = route.is_some_and(Route::is_model);
    // arservice's own error (an upstream's answer is a `Reply::Model`).
    let own_error = matches!(body, Reply::Json(_)) && status >= 400;
    let sdk_path = model_route || (route.is_none() && gateway::is_sdk_path(path));
    if let (true, Reply::Json(error)) = (sdk_path, &mut body) {
        readable_by_sdks(error, status);
    }
    access_log(request.method().as_str(), path, route, status, received);
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
            let sent = respond_streaming(
                request,
                status,
                headers,
                (download.body, download.length),
                FILE_PIECE_BYTES,
            );
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
                        respond_streaming(
                            request,
                            status,
                            headers,
                            (body, None),
                            STREAM_CHUNK_BYTES,
                        )
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

/// OpenAI and Anthropic SDKs put `error.message` in their exceptions: arservice's own errors
/// on the model routes, and on unknown paths an SDK may call, carry it beside `detail`.
pub(super) fn readable_by_sdks(error: &mut Value, status: u16) {
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
pub(super) fn forwarded_headers(forwarded: &Forwarded) -> Vec<Header> {
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
/// client, which knows no chunks, gets a body of unknown length at the end. A read passes on
/// at most `piece` bytes. The agent sends its downloads with it too (tiny_http's `respond`
/// would gather a whole file before the first byte went).
pub(crate) fn respond_streaming(
    request: Request,
    status: u16,
    headers: Vec<Header>,
    (mut body, length): (Box<dyn Read>, Option<u64>),
    piece: usize,
) -> std::io::Result<()> {
    if *request.http_version() < HTTPVersion(1, 1) && length.is_none() {
        let response = Response::new(StatusCode(status), headers, body, None, None);
        return request.respond(response);
    }
    let head_only = *request.method() == Method::Head;
    // A body that fails part way cuts the answer: the connection closes at once, rather than
    // stay open for a next request while the client waits for the rest.
    let mut cutter = request.cutter();
    let mut cut = |err: std::io::Error| {
        if let Some(cutter) = cutter.take() {
            cutter.cut();
        }
        err
    };
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
    let mut buffer = vec![0; piece];
    let mut sent = 0u64;
    loop {
        let read = match body.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(cut(err)),
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
        Some(length) if sent != length => Err(cut(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the body ended after {sent} of {length} bytes"),
        ))),
        Some(_) => Ok(()),
        None => {
            out.write_all(b"0\r\n\r\n")?;
            out.flush()
        }
    }
}

pub(super) fn json_response(status: u16, body: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_data(body.to_string().into_bytes())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
}

pub(super) fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}
