//! The in-process queue between the HTTP handlers and the compute thread: the
//! jobs waiting to start, in order, the cancellations not yet seen by the
//! worker, and the capacity limit that turns into 429s.
//!
//! A std `Mutex` + `Condvar`, not an async channel: the consumer is a plain
//! thread that must sleep when idle, and producers only hold the lock for a
//! push (never across an `.await`).

use std::collections::{HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::jobs::{JobId, JobQueue, QueueError};

#[derive(Debug, Default)]
struct State {
    /// Jobs waiting to start, oldest first.
    waiting: VecDeque<JobId>,
    /// Cancellations for the worker to apply to running jobs.
    canceled: HashSet<JobId>,
    closed: bool,
}

/// Capacity settings.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Jobs that may wait to start before submissions get 429. (Counted in
    /// jobs, not images: a request's n is at most a handful and the worker
    /// batches images of different jobs alike.)
    pub max_waiting_jobs: usize,
    /// Seconds a refused client is told to wait.
    pub retry_after_secs: u64,
}

#[derive(Debug)]
pub struct LocalQueue {
    state: Mutex<State>,
    wake: Condvar,
    limits: QueueLimits,
}

impl LocalQueue {
    pub fn new(limits: QueueLimits) -> Self {
        Self { state: Mutex::new(State::default()), wake: Condvar::new(), limits }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a job resumed from the store at the back, bypassing the capacity
    /// limit: it was accepted before the restart. Duplicates are ignored.
    pub fn resume(&self, id: JobId) {
        let mut s = self.lock();
        if !s.waiting.contains(&id) {
            s.waiting.push_back(id);
        }
        self.wake.notify_all();
    }

    /// Takes the next waiting job, if any.
    pub fn pop(&self) -> Option<JobId> {
        self.lock().waiting.pop_front()
    }

    /// Drains the cancellations requested since the last call.
    pub fn take_canceled(&self) -> HashSet<JobId> {
        std::mem::take(&mut self.lock().canceled)
    }

    /// Sleeps until something is submitted or canceled, or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let s = self.lock();
        if s.waiting.is_empty() && s.canceled.is_empty() {
            let _ = self.wake.wait_timeout(s, timeout);
        }
    }

    /// Refuses new submissions from now on (draining); waiting jobs stay stored.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Forgets the waiting list (the jobs stay queued in the store for the next start).
    pub fn clear_waiting(&self) {
        self.lock().waiting.clear();
    }

    /// Takes every waiting job out of the list, oldest first (a draining
    /// replica hands them back to the shared queue).
    pub fn take_waiting(&self) -> Vec<JobId> {
        self.lock().waiting.drain(..).collect()
    }
}

impl JobQueue for LocalQueue {
    fn check_capacity(&self, _images: usize) -> Result<(), QueueError> {
        let s = self.lock();
        if s.closed {
            return Err(QueueError::Closed);
        }
        if s.waiting.len() >= self.limits.max_waiting_jobs {
            return Err(QueueError::Full { depth: s.waiting.len(), retry_after_secs: self.limits.retry_after_secs });
        }
        Ok(())
    }

    fn submit(&self, id: JobId) -> Result<(), QueueError> {
        let mut s = self.lock();
        if s.closed {
            return Err(QueueError::Closed);
        }
        if !s.waiting.contains(&id) {
            s.waiting.push_back(id);
        }
        self.wake.notify_all();
        Ok(())
    }

    fn cancel(&self, id: JobId) {
        let mut s = self.lock();
        s.waiting.retain(|w| *w != id);
        s.canceled.insert(id);
        self.wake.notify_all();
    }

    fn position(&self, id: JobId) -> Option<usize> {
        self.lock().waiting.iter().position(|w| *w == id)
    }

    fn depth(&self) -> usize {
        self.lock().waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> JobId {
        JobId::from_u128(n)
    }

    #[test]
    fn keeps_order_capacity_and_cancellations() {
        let q = LocalQueue::new(QueueLimits { max_waiting_jobs: 2, retry_after_secs: 3 });
        q.submit(id(1)).unwrap();
        q.submit(id(2)).unwrap();
        q.submit(id(2)).unwrap(); // a duplicate submission is ignored
        assert_eq!(q.depth(), 2);
        assert_eq!(q.position(id(2)), Some(1));
        assert_eq!(q.check_capacity(1), Err(QueueError::Full { depth: 2, retry_after_secs: 3 }));
        q.cancel(id(1));
        assert_eq!(q.position(id(2)), Some(0));
        assert!(q.take_canceled().contains(&id(1)));
        assert!(q.take_canceled().is_empty());
        assert_eq!(q.pop(), Some(id(2)));
        assert_eq!(q.pop(), None);
        q.resume(id(4));
        q.resume(id(5));
        assert_eq!(q.take_waiting(), vec![id(4), id(5)]);
        assert_eq!(q.depth(), 0);
        q.close();
        assert_eq!(q.submit(id(3)), Err(QueueError::Closed));
    }
}
