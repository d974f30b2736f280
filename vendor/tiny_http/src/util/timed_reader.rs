//! arservice patch: reads of a connection bounded in time (PATCHED.md).
//!
//! The connection's thread says what the next reads may take: until a deadline (the keep-alive
//! wait, a whole head), or so long without progress (a body). Each read of the socket then has
//! what is left as its timeout, and a read that times out fails with `TimedOut`, whichever
//! thread reads.

use std::io::{Error as IoError, ErrorKind, Read, Result as IoResult};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::RefinedTcpStream;

/// What the next reads may take.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Policy {
    /// All of them together, until this moment.
    Until(Instant),
    /// Each, this long.
    Each(Duration),
}

/// The policy of one connection, shared by its thread and whoever reads its bodies.
#[derive(Clone)]
pub(crate) struct ReadPolicy(Arc<Mutex<Policy>>);

impl ReadPolicy {
    pub(crate) fn new(policy: Policy) -> ReadPolicy {
        ReadPolicy(Arc::new(Mutex::new(policy)))
    }

    pub(crate) fn set(&self, policy: Policy) {
        *self.0.lock().unwrap() = policy;
    }

    /// The timeout of the next read, or `TimedOut` when the deadline has passed.
    fn timeout(&self) -> IoResult<Duration> {
        let timeout = match *self.0.lock().unwrap() {
            Policy::Until(deadline) => deadline.saturating_duration_since(Instant::now()),
            Policy::Each(timeout) => timeout,
        };
        // A socket timeout of zero means none at all: under a millisecond is over.
        if timeout < Duration::from_millis(1) {
            return Err(timed_out());
        }
        Ok(timeout)
    }
}

fn timed_out() -> IoError {
    IoError::new(ErrorKind::TimedOut, "the client sent nothing in time")
}

/// The read half of a connection, each read bounded by the connection's [`ReadPolicy`].
pub(crate) struct TimedReader {
    inner: RefinedTcpStream,
    policy: ReadPolicy,
    /// The timeout the socket has now, to set it only when it changes.
    applied: Option<Duration>,
}

impl TimedReader {
    pub(crate) fn new(inner: RefinedTcpStream, policy: ReadPolicy) -> TimedReader {
        TimedReader {
            inner,
            policy,
            applied: None,
        }
    }
}

impl Read for TimedReader {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        let timeout = self.policy.timeout()?;
        if self.applied != Some(timeout) {
            self.inner.set_read_timeout(Some(timeout))?;
            self.applied = Some(timeout);
        }
        match self.inner.read(buf) {
            // What a socket timeout looks like on Unix.
            Err(err) if err.kind() == ErrorKind::WouldBlock => Err(timed_out()),
            other => other,
        }
    }
}
