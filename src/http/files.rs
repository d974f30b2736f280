//! `GET` and `PUT /files/{run_id}/{path}`: a file (or a directory's tar) into or out of an
//! instance, body and answer streamed, on a thread of their own (not the connection's: a
//! download's many writes are handed to the connection's thread, which must be free to send
//! them).

use super::route::{path_of, Query, Route};
use super::{answer, finish, HttpSettings, Places, Reply};
use crate::api;
use crate::env::files;
use crate::error::Error;
use crate::service::Service;
use crate::url::percent_decode;
use serde_json::json;
use std::io::Read;
use std::sync::Arc;
use std::thread;
use std::time::Instant;
use tiny_http::{Method, Request};

/// `PUT /files/{run_id}/{path}` (the body, at most `--max-body-bytes`, streamed to the
/// instance; a tar with `Content-Type: application/x-tar`) and `GET` (the file, or the
/// directory's tar, streamed back), on a thread of its own holding one of the work places.
pub(super) fn serve_files(
    service: &Arc<Service>,
    mut request: Request,
    max_body_bytes: usize,
    received: Instant,
) {
    let url = request.url().to_string();
    let (status, reply) = answer(|| {
        // The method first: a POST is 405 whatever its path (as the OpenAPI document says).
        if !matches!(request.method(), Method::Put | Method::Get | Method::Head) {
            return Err(Error::MethodNotAllowed {
                path: "/files/{run_id}/{path}".into(),
                allowed: Route::Files.method_name(),
            });
        }
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
pub(super) fn files_target(url: &str) -> Result<(crate::run_id::RunId, String), Error> {
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
pub(super) struct Capped<'a> {
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

/// Serves a `/files` request on a thread of its own once it holds one of the work places.
pub(super) fn spawn(
    service: &Arc<Service>,
    places: &Arc<Places>,
    request: Request,
    settings: HttpSettings,
    received: Instant,
) {
    let (service, places) = (Arc::clone(service), Arc::clone(places));
    let max_body_bytes = settings.max_body_bytes;
    let spawned = thread::Builder::new().name("files".into()).spawn(move || {
        let _place = places.take();
        serve_files(&service, request, max_body_bytes, received);
    });
    if let Err(err) = spawned {
        log::error!("cannot start a thread for /files: {err}");
    }
}
