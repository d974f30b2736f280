//! arservice patch: the connections being served, with what each is doing, so that the accept
//! thread can keep their number under a cap without letting idle or slow clients lock others
//! out (see PATCHED.md).
//!
//! At the cap, a new connection takes the place of the one that has waited longest among those
//! that hold nothing of value: one closing, or one that has made no progress for `stall` while
//! waiting for a request (idle keep-alive), receiving a head, or writing an answer. (A
//! connection younger than that is left alone: its request may be on its way.) A connection whose request is being read or
//! run is never closed for another; when all are like that, the new one is refused. A place
//! is free once the thread of the closed connection has left it, so that the number of
//! connection threads never exceeds the cap.

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::connection::Connection;

/// How long a newcomer waits for the thread of the connection closed for it to leave.
const EVICTION_WAIT: Duration = Duration::from_millis(200);

/// How long a newcomer waits for a connection to become closable, when none is: long enough
/// for one to pass from one phase to the next, short enough that a refusal stays quick.
const ROOM_WAIT: Duration = Duration::from_millis(50);

/// How often a waiting newcomer looks again (stalling is a matter of time, not an event).
const ROOM_POLL: Duration = Duration::from_millis(10);

/// What a connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Waiting for the first byte of a request.
    Idle = 0,
    /// Reading a request's head.
    Head = 1,
    /// A request is in flight: its body being read, or the server working on it.
    Busy = 2,
    /// Writing an answer.
    Writing = 3,
    /// Answered for the last time: draining what the client still sends, then closing.
    Closing = 4,
}

impl Phase {
    fn of(value: u8) -> Phase {
        match value {
            0 => Phase::Idle,
            1 => Phase::Head,
            2 => Phase::Busy,
            3 => Phase::Writing,
            _ => Phase::Closing,
        }
    }
}

/// One connection being served.
pub(crate) struct Entry {
    id: u64,
    phase: AtomicU8,
    /// When the phase last changed, in milliseconds since the registry's epoch.
    since_ms: AtomicU64,
    /// A handle on the socket, to close it from the accept thread.
    socket: Connection,
    epoch: Instant,
    /// Closed for a newcomer; its thread is on its way out.
    evicted: AtomicBool,
}

impl Entry {
    pub(crate) fn set(&self, phase: Phase) {
        self.since_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// True when closing this connection for a newcomer takes nothing of value from anyone.
    fn evictable(&self, now_ms: u64, stall: Duration) -> bool {
        if self.evicted.load(Ordering::Relaxed) {
            return false;
        }
        let stalled = now_ms.saturating_sub(self.since_ms.load(Ordering::Relaxed))
            >= stall.as_millis() as u64;
        match Phase::of(self.phase.load(Ordering::Relaxed)) {
            Phase::Closing => true,
            Phase::Idle | Phase::Head | Phase::Writing => stalled,
            Phase::Busy => false,
        }
    }
}

/// Every connection being served, at most `max`.
pub(crate) struct Registry {
    max: usize,
    stall: Duration,
    epoch: Instant,
    live: Mutex<HashMap<u64, Arc<Entry>>>,
    /// Signalled when a place is given back.
    freed: Condvar,
    next_id: AtomicU64,
}

/// A connection's place in the registry, given back when dropped.
pub(crate) struct Place {
    registry: Arc<Registry>,
    pub(crate) entry: Arc<Entry>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.registry.live.lock().unwrap().remove(&self.entry.id);
        self.registry.freed.notify_all();
    }
}

impl Registry {
    pub(crate) fn new(max: usize, stall: Duration) -> Arc<Registry> {
        Arc::new(Registry {
            max: max.max(1),
            stall,
            epoch: Instant::now(),
            live: Mutex::new(HashMap::new()),
            freed: Condvar::new(),
            next_id: AtomicU64::new(0),
        })
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// A place for a new connection, closing an evictable one when the registry is full (and
    /// waiting a moment for its thread to leave). When none is evictable, it waits up to
    /// `ROOM_WAIT` for one to become so (a connection between two phases, one about to stall)
    /// or for a place to be given back; `None` when the registry stays full of busy ones.
    pub(crate) fn admit(self: &Arc<Self>, socket: Connection) -> Option<Place> {
        let mut live = self.live.lock().unwrap();
        let room_deadline = Instant::now() + ROOM_WAIT;
        while live.len() >= self.max {
            let now_ms = self.epoch.elapsed().as_millis() as u64;
            let victim = live
                .values()
                .filter(|entry| entry.evictable(now_ms, self.stall))
                .min_by_key(|entry| entry.since_ms.load(Ordering::Relaxed));
            let Some(victim) = victim else {
                let left = room_deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                live = self
                    .freed
                    .wait_timeout(live, left.min(ROOM_POLL))
                    .unwrap()
                    .0;
                continue;
            };
            victim.evicted.store(true, Ordering::Relaxed);
            // Its thread sees the end of the stream (or a failed write), and leaves.
            let _ = victim.socket.shutdown(Shutdown::Both);
            let deadline = Instant::now() + EVICTION_WAIT;
            while live.len() >= self.max {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                live = self.freed.wait_timeout(live, left).unwrap().0;
            }
        }
        let entry = Arc::new(Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            phase: AtomicU8::new(Phase::Idle as u8),
            since_ms: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            socket,
            epoch: self.epoch,
            evicted: AtomicBool::new(false),
        });
        live.insert(entry.id, Arc::clone(&entry));
        Some(Place {
            registry: Arc::clone(self),
            entry,
        })
    }
}
