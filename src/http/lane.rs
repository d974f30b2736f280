//! One worker pool of a fixed size whose threads start as work arrives: a [`Lane`].
//!
//! A lane never has more than its size of threads, and never keeps a job waiting while it has
//! fewer: a thread more starts whenever more jobs wait than threads are idle. A thread that
//! started lives until the lane is dropped. An idle server (or a Slurm job's server that only
//! runs commands) so holds the threads it used, not `--workers` of each pool (128 idle
//! threads were ~1 MiB of the server's idle memory).
//!
//! Shutdown: dropping every clone of the lane ends its threads once the queue is empty; the
//! `done` sender handed to [`Lane::new`] is dropped after the last of them.

use crossbeam_channel::{unbounded, Receiver, Sender};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

/// A queue of jobs and the threads that run them (see the module's doc).
pub(super) struct Lane<T: Send + 'static> {
    queue: Sender<T>,
    threads: Arc<Threads<T>>,
}

impl<T: Send + 'static> Clone for Lane<T> {
    fn clone(&self) -> Lane<T> {
        Lane {
            queue: self.queue.clone(),
            threads: Arc::clone(&self.threads),
        }
    }
}

/// What a lane's threads share. It holds no sender of the queue, so the queue disconnects
/// (and the threads end) once every [`Lane`] is gone.
struct Threads<T> {
    name: &'static str,
    size: usize,
    jobs: Receiver<T>,
    /// Threads started (never more than `size`).
    started: AtomicUsize,
    /// Threads waiting for a job, counted from before their start.
    idle: AtomicUsize,
    work: Box<dyn Fn(T) + Send + Sync>,
    /// Dropped with the last thread (or the lane, when none started).
    _done: Sender<()>,
}

impl<T: Send + 'static> Lane<T> {
    /// A lane of at most `size` threads named `<name>-<n>`, each running `work` on one job at
    /// a time. None starts before the first job.
    pub(super) fn new(
        name: &'static str,
        size: usize,
        done: Sender<()>,
        work: impl Fn(T) + Send + Sync + 'static,
    ) -> Lane<T> {
        let (queue, jobs) = unbounded();
        Lane {
            queue,
            threads: Arc::new(Threads {
                name,
                size: size.max(1),
                jobs,
                started: AtomicUsize::new(0),
                idle: AtomicUsize::new(0),
                work: Box::new(work),
                _done: done,
            }),
        }
    }

    /// Queues `job`, starting a thread for it when none is idle and the lane is not full.
    pub(super) fn send(&self, job: T) {
        // Cannot fail: the lane holds the receiving end.
        let _ = self.queue.send(job);
        grow(&self.threads);
    }

    /// Threads started so far.
    #[cfg(test)]
    fn started(&self) -> usize {
        self.threads.started.load(Ordering::SeqCst)
    }
}

/// Starts threads while more jobs wait than threads are idle, up to the lane's size. Called
/// after each job queued and by each thread as it takes a job (which closes the race of a job
/// queued while the only idle thread was taking the one before: that thread starts the next).
fn grow<T: Send + 'static>(threads: &Arc<Threads<T>>) {
    while threads.jobs.len() > threads.idle.load(Ordering::SeqCst) {
        let started = threads.started.load(Ordering::SeqCst);
        if started >= threads.size {
            return;
        }
        if threads
            .started
            .compare_exchange(started, started + 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            continue;
        }
        // Idle from now: the next check sees the thread coming.
        threads.idle.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(threads);
        let spawned = thread::Builder::new()
            .name(format!("{}-{started}", threads.name))
            .spawn(move || run(&shared));
        if let Err(err) = spawned {
            threads.idle.fetch_sub(1, Ordering::SeqCst);
            threads.started.fetch_sub(1, Ordering::SeqCst);
            log::error!(
                "cannot start a {} thread ({err}); its jobs wait for the {started} running",
                threads.name
            );
            return;
        }
    }
}

/// One thread of a lane: takes jobs until the lane is gone.
fn run<T: Send + 'static>(threads: &Arc<Threads<T>>) {
    while let Ok(job) = threads.jobs.recv() {
        threads.idle.fetch_sub(1, Ordering::SeqCst);
        grow(threads);
        (threads.work)(job);
        threads.idle.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::time::Duration;

    #[test]
    fn no_thread_starts_before_the_first_job() {
        let (done, _) = unbounded();
        let lane = Lane::new("t", 8, done, |_: ()| {});
        assert_eq!(lane.started(), 0);
    }

    #[test]
    fn jobs_that_wait_on_each_other_each_get_a_thread_up_to_the_size() {
        // Four jobs that can only finish together: each must run on a thread of its own.
        let (done, _) = unbounded();
        let barrier = Arc::new(Barrier::new(5));
        let (finished, finishes) = unbounded();
        let lane = {
            let barrier = Arc::clone(&barrier);
            Lane::new("t", 4, done, move |_: ()| {
                barrier.wait();
                finished.send(()).unwrap();
            })
        };
        for _ in 0..4 {
            lane.send(());
        }
        barrier.wait();
        for _ in 0..4 {
            finishes.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        assert_eq!(lane.started(), 4);
    }

    #[test]
    fn the_size_bounds_the_threads_and_every_job_runs() {
        let (done, _) = unbounded();
        let (finished, finishes) = unbounded();
        let lane = Lane::new("t", 3, done, move |n: usize| {
            thread::sleep(Duration::from_millis(5));
            finished.send(n).unwrap();
        });
        for n in 0..30 {
            lane.send(n);
        }
        let mut seen: Vec<usize> = (0..30)
            .map(|_| finishes.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..30).collect::<Vec<_>>());
        assert!(lane.started() <= 3, "{} threads", lane.started());
        assert!(lane.started() >= 2, "jobs that waited got no second thread");
    }

    #[test]
    fn an_idle_thread_takes_the_next_job_without_a_new_one() {
        let (done, _) = unbounded();
        let (finished, finishes) = unbounded();
        let lane = Lane::new("t", 8, done, move |_: ()| finished.send(()).unwrap());
        for _ in 0..20 {
            lane.send(());
            finishes.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        assert_eq!(lane.started(), 1);
    }

    #[test]
    fn dropping_the_lane_ends_its_threads_and_then_done() {
        let (done, ended) = unbounded::<()>();
        let (finished, finishes) = unbounded();
        let lane = Lane::new("t", 4, done, move |_: ()| {
            thread::sleep(Duration::from_millis(20));
            finished.send(()).unwrap();
        });
        for _ in 0..6 {
            lane.send(());
        }
        let copy = lane.clone();
        drop(lane);
        drop(copy);
        // Every queued job still runs, then `done` disconnects.
        for _ in 0..6 {
            finishes.recv_timeout(Duration::from_secs(10)).unwrap();
        }
        assert_eq!(
            ended.recv_timeout(Duration::from_secs(10)),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
    }
}
