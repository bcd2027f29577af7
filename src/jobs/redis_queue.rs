//! The HTTP side's [`JobQueue`] when replicas share Redis: submissions go to
//! the shared stream (any replica's worker may run them), the capacity limit
//! counts the cluster-wide backlog, and a cancellation reaches whichever
//! replica runs the job.
//!
//! The trait is synchronous and handlers call it on the async runtime, so each
//! Redis round trip runs under `block_in_place` (a loopback round trip is well
//! under a millisecond). Queue positions come from a snapshot of the waiting
//! entries that is at most [`SNAPSHOT_TTL`] old (refreshed after each local
//! submit), so polling clients cost Redis a few reads a second, not one per
//! request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::model::JobId;
use super::queue::{JobQueue, QueueError};
use super::redis_events::RelayHandle;
use super::stream::WorkStream;

/// How stale queue positions and depth may be.
pub const SNAPSHOT_TTL: Duration = Duration::from_millis(250);

/// Capacity settings of the shared queue.
#[derive(Debug, Clone, Copy)]
pub struct SharedLimits {
    /// Jobs that may wait to start, cluster-wide, before submissions get 429.
    pub max_waiting_jobs: usize,
    /// Seconds a refused client is told to wait.
    pub retry_after_secs: u64,
}

/// The waiting jobs, as last read.
#[derive(Debug, Default)]
struct Snapshot {
    taken: Option<Instant>,
    /// Waiting entries in total (may exceed `jobs`, which is capped).
    waiting: usize,
    /// The first waiting jobs, next to start first.
    jobs: Vec<JobId>,
}

pub struct RedisQueue {
    stream: Arc<WorkStream>,
    /// This process's worker queue: a cancellation stops the job here at once
    /// if it runs here.
    local: Arc<dyn JobQueue>,
    relay: RelayHandle,
    limits: SharedLimits,
    closed: AtomicBool,
    snapshot: Mutex<Snapshot>,
}

/// Runs Redis I/O from a synchronous trait method that may be on the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl RedisQueue {
    pub fn new(stream: Arc<WorkStream>, local: Arc<dyn JobQueue>, relay: RelayHandle, limits: SharedLimits) -> Self {
        Self { stream, local, relay, limits, closed: AtomicBool::new(false), snapshot: Mutex::new(Snapshot::default()) }
    }

    /// Refuses new submissions from now on (draining). Queued jobs stay in the
    /// stream for the other replicas.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    fn unavailable(&self, what: &str, e: impl std::fmt::Display) -> QueueError {
        tracing::error!(error = %e, "the shared queue failed to {what}");
        QueueError::Unavailable { retry_after_secs: self.limits.retry_after_secs }
    }

    /// Reads `f` off a snapshot no older than [`SNAPSHOT_TTL`] (a stale one
    /// when Redis cannot be read).
    fn with_snapshot<T>(&self, f: impl FnOnce(&Snapshot) -> T) -> T {
        blocking(|| {
            let mut snap = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
            if snap.taken.is_none_or(|t| t.elapsed() >= SNAPSHOT_TTL) {
                match self.stream.waiting(self.limits.max_waiting_jobs) {
                    Ok((backlog, jobs)) => *snap = Snapshot { taken: Some(Instant::now()), waiting: backlog.waiting, jobs },
                    Err(e) => tracing::debug!(error = %e, "reading the shared queue's backlog failed"),
                }
            }
            f(&snap)
        })
    }
}

impl JobQueue for RedisQueue {
    fn check_capacity(&self, _images: usize) -> Result<(), QueueError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(QueueError::Closed);
        }
        let backlog = blocking(|| self.stream.backlog()).map_err(|e| self.unavailable("read its backlog", e))?;
        if backlog.waiting >= self.limits.max_waiting_jobs {
            return Err(QueueError::Full { depth: backlog.waiting, retry_after_secs: self.limits.retry_after_secs });
        }
        Ok(())
    }

    fn submit(&self, id: JobId) -> Result<(), QueueError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(QueueError::Closed);
        }
        // Watched before it can finish: a sync client here waits on it.
        self.relay.watch(id);
        if let Err(e) = blocking(|| self.stream.add(id)) {
            self.relay.unwatch(id);
            return Err(self.unavailable("queue a job", e));
        }
        // The next position asked for is this job's: read it fresh.
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner()).taken = None;
        Ok(())
    }

    fn cancel(&self, id: JobId) {
        self.local.cancel(id);
        self.relay.cancel(id);
    }

    fn position(&self, id: JobId) -> Option<usize> {
        self.with_snapshot(|s| s.jobs.iter().position(|j| *j == id))
    }

    /// Read afresh (a metrics scrape asks seldom, and wants it exact).
    fn depth(&self) -> usize {
        match blocking(|| self.stream.backlog()) {
            Ok(backlog) => backlog.waiting,
            Err(e) => {
                tracing::debug!(error = %e, "reading the shared queue's backlog failed");
                self.with_snapshot(|s| s.waiting)
            }
        }
    }
}
