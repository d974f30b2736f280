//! Request bodies: which routes take one and how large, and reading one within its limit
//! and the server-wide [`BodyBudget`] of bytes held in memory.

use super::route::Route;
use super::MAX_API_BODY_BYTES;
use crate::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tiny_http::Request;

/// How much of a body is read (and counted) at a time.
pub(super) const BODY_READ_BYTES: usize = 64 * 1024;

/// A request body, counted against the [`BodyBudget`] until it is dropped.
pub(super) struct Body {
    pub(super) bytes: Vec<u8>,
    pub(super) _held: Held,
}

/// What is left of the bytes bodies may hold in memory at once.
pub(super) struct BodyBudget {
    left: AtomicUsize,
    total: usize,
}

/// Bytes taken from a [`BodyBudget`], given back when dropped.
pub(super) struct Held {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyBudget {
    pub(super) fn new(total: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            left: AtomicUsize::new(total),
            total,
        })
    }

    pub(super) fn empty(self: &Arc<Self>) -> Held {
        Held {
            budget: Arc::clone(self),
            bytes: 0,
        }
    }
}

impl Held {
    /// Takes `bytes` more, or fails when the budget has not that much left.
    pub(super) fn grow(&mut self, bytes: usize) -> Result<(), Error> {
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

/// The largest body `route` takes.
pub(super) fn body_limit(route: Route, max_body_bytes: usize) -> usize {
    if route.is_model() {
        max_body_bytes
    } else {
        max_body_bytes.min(MAX_API_BODY_BYTES)
    }
}

/// True when the request has a body to read (a length above 0, or chunks).
pub(super) fn has_body(request: &Request) -> bool {
    match request.body_length() {
        Some(length) => length > 0,
        None => request
            .headers()
            .iter()
            .any(|header| header.field.equiv("Transfer-Encoding")),
    }
}

/// Reads at most `limit` bytes of body, each piece counted in `held` as it arrives.
pub(super) fn read_body(
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
