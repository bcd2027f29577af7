//! The worker's intake when replicas share a Redis queue (`jobs::stream`): a
//! thread that reads entries into this process's `LocalQueue`, only as many
//! as the engine can run at once, and acknowledges each once the job's outcome
//! is in the store. It also keeps this replica's entries from being taken over
//! (heartbeat), takes over the entries of replicas that stopped (reclaim),
//! gives up on jobs that keep failing to finish (dead letters), and on drain
//! hands back what it has not started.
//!
//! One loop, in order: acknowledge finished jobs; every `heartbeat`, re-claim
//! owned entries, check the store for entries whose end was missed, and
//! reclaim idle entries of stopped replicas; then read new entries, blocking
//! for at most `block` (or, when full, wait for a job to finish).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::redis::Connection;

use super::queue::LocalQueue;
use super::readiness::{Readiness, ReadinessReceiver};
use crate::jobs::stream::is_missing_group;
use crate::jobs::{now_ms, Delivery, EventSender, JobError, JobEvent, JobId, JobQueue, JobStatus, JobStore, WorkStream};

/// Consumers that hold nothing and were idle this long are removed from the group.
const FORGET_CONSUMERS_AFTER: Duration = Duration::from_secs(3600);
/// How often acknowledged entries are trimmed and stopped consumers forgotten.
const TIDY_EVERY: Duration = Duration::from_secs(30);

/// The intake's timing and limits.
#[derive(Debug, Clone)]
pub struct IntakeSettings {
    /// This process's consumer name in the group, unique per process ([`consumer_name`]).
    pub consumer: String,
    /// Entries held at once: the engine's `max_active_jobs`, so that work this
    /// replica cannot start now stays undelivered for another.
    pub max_in_flight: usize,
    /// How long one read waits for new entries; also bounds how late a
    /// finished job is acknowledged and a drain noticed.
    pub block: Duration,
    /// How often owned entries are re-claimed (their idle time reset) and
    /// idle entries of other replicas looked for. Well under `reclaim_after`.
    pub heartbeat: Duration,
    /// An entry idle this long belongs to a replica that stopped: take it over.
    pub reclaim_after: Duration,
    /// A job delivered more often than this is failed and dead-lettered.
    pub max_deliveries: u64,
}

/// A consumer name unique to this process: host, pid and a random suffix (a
/// restarted container may reuse both the host name and the pid).
pub fn consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "diffusiond".into());
    let suffix = JobId::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..8])
}

/// What the intake works with.
pub struct IntakeParts {
    pub stream: Arc<WorkStream>,
    pub store: Arc<dyn JobStore>,
    pub local: Arc<LocalQueue>,
    /// Jobs the local engine finished (their outcome is stored).
    pub finished: Receiver<JobId>,
    /// The engine's event channel: dead letters are announced on it.
    pub events: EventSender,
    pub readiness: ReadinessReceiver,
}

/// The running intake.
pub struct IntakeHandle {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl IntakeHandle {
    /// Stops reading and waits for the thread (it acknowledges what has
    /// finished first). Entries of jobs still running stay pending: another
    /// replica takes them over after `reclaim_after`.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

pub fn spawn(parts: IntakeParts, settings: IntakeSettings) -> std::io::Result<IntakeHandle> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new().name("diffusiond-intake".into()).spawn(move || {
        let mut intake = Intake::new(parts, settings);
        if intake.wait_until_ready(&flag) {
            tracing::info!(consumer = %intake.settings.consumer, stream = %intake.parts.stream.keys().stream, "reading the shared queue");
            intake.run(&flag);
        }
    })?;
    Ok(IntakeHandle { stop, thread })
}

/// One entry this replica holds.
#[derive(Debug)]
struct Held {
    entry: String,
    /// False once another replica took the entry over: no more heartbeats.
    owned: bool,
    /// Heartbeats in a row that found the job queued in the store but not
    /// waiting here: the engine dropped it (a store error while starting it).
    strikes: u32,
}

struct Intake {
    parts: IntakeParts,
    settings: IntakeSettings,
    /// The connection blocking reads use (reads wait longer than pooled calls may).
    reader: Option<Connection>,
    held: HashMap<JobId, Held>,
    next_heartbeat: Instant,
    next_tidy: Instant,
    /// The finished channel closed (the engine is gone).
    finished_closed: bool,
    released: bool,
    /// A run of Redis failures is logged once.
    failing: bool,
}

impl Intake {
    fn new(parts: IntakeParts, settings: IntakeSettings) -> Self {
        let now = Instant::now();
        Self {
            parts,
            settings,
            reader: None,
            held: HashMap::new(),
            next_heartbeat: now,
            next_tidy: now,
            finished_closed: false,
            released: false,
            failing: false,
        }
    }

    /// Waits for the models: a replica that is still loading must not take work.
    fn wait_until_ready(&self, stop: &AtomicBool) -> bool {
        loop {
            if stop.load(Ordering::Relaxed) || self.parts.local.is_closed() {
                return false;
            }
            match &*self.parts.readiness.borrow() {
                Readiness::Ready(_) => return true,
                Readiness::Failed(_) | Readiness::Draining(_) => return false,
                Readiness::Loading => {}
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn run(&mut self, stop: &AtomicBool) {
        loop {
            self.take_finished(Duration::ZERO);
            let draining = self.parts.local.is_closed();
            if stop.load(Ordering::Relaxed) {
                // Whatever finished meanwhile is acknowledged before leaving.
                self.take_finished(self.settings.block);
                break;
            }
            if draining && !self.released {
                self.release_waiting();
                self.released = true;
            }
            if Instant::now() >= self.next_heartbeat {
                self.next_heartbeat = Instant::now() + self.settings.heartbeat;
                self.heartbeat();
                if !draining {
                    self.reclaim();
                }
            }
            if Instant::now() >= self.next_tidy {
                self.next_tidy = Instant::now() + TIDY_EVERY;
                self.tidy();
            }
            if draining {
                if self.held.is_empty() {
                    break;
                }
                self.take_finished(self.settings.block);
                continue;
            }
            match self.room() {
                0 => self.take_finished(self.settings.block),
                room => self.read(room),
            }
        }
        tracing::info!(consumer = %self.settings.consumer, left_pending = self.held.len(), "stopped reading the shared queue");
    }

    fn room(&self) -> usize {
        self.settings.max_in_flight.saturating_sub(self.held.len())
    }

    fn trouble(&mut self, what: &str, e: &dyn std::fmt::Display) {
        if std::mem::replace(&mut self.failing, true) {
            tracing::debug!(error = %e, "{what}");
        } else {
            tracing::warn!(error = %e, "{what}");
        }
    }

    fn fine(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!("the shared queue works again");
        }
    }

    /// Acknowledges the jobs the engine finished, waiting up to `wait` for the first.
    fn take_finished(&mut self, wait: Duration) {
        let mut done = Vec::new();
        if !wait.is_zero() {
            if self.finished_closed {
                std::thread::sleep(wait);
            } else {
                match self.parts.finished.recv_timeout(wait) {
                    Ok(id) => done.push(id),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => self.finished_closed = true,
                }
            }
        }
        loop {
            match self.parts.finished.try_recv() {
                Ok(id) => done.push(id),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.finished_closed = true;
                    break;
                }
            }
        }
        self.ack(done);
    }

    /// Forgets and acknowledges the entries of `jobs` (those held here).
    fn ack(&mut self, jobs: Vec<JobId>) {
        let entries: Vec<String> = jobs.iter().filter_map(|id| self.held.remove(id)).map(|h| h.entry).collect();
        if entries.is_empty() {
            return;
        }
        // A failed ack leaves the entry pending, unheld: another replica (or
        // this one) reclaims it later, finds the job finished and acks it then.
        match self.parts.stream.ack(&entries) {
            Ok(_) => self.fine(),
            Err(e) => self.trouble("acknowledging finished jobs failed; they will be reclaimed and acknowledged later", &e),
        }
    }

    fn read(&mut self, room: usize) {
        let conn = match self.reader.take() {
            Some(c) => Ok(c),
            // Reads wait `block`; the connection's own timeout must be longer.
            None => self.parts.stream.dedicated(self.settings.block + Duration::from_secs(5)),
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                self.trouble("connecting to the shared queue failed; retrying", &e);
                self.take_finished(self.settings.block);
                return;
            }
        };
        match self.parts.stream.read(&mut conn, &self.settings.consumer, room, self.settings.block) {
            Ok(deliveries) => {
                self.reader = Some(conn);
                self.fine();
                for d in deliveries {
                    self.accept(d);
                }
            }
            Err(e) => {
                if is_missing_group(&e) {
                    // Redis was flushed or restarted empty: start a new group.
                    let _ = self.parts.stream.ensure_group();
                }
                self.trouble("reading the shared queue failed; retrying", &e);
                self.take_finished(self.settings.block);
            }
        }
    }

    /// Hands a delivered job to the engine, unless it needs no running: a job
    /// canceled while it waited, or one a replica finished but died before
    /// acknowledging, is acknowledged at once (and never dead-lettered).
    fn accept(&mut self, d: Delivery) {
        if self.held.contains_key(&d.job) {
            // A second entry for a job held already: the first one covers it.
            self.ack_entry(&d.entry);
            return;
        }
        match self.parts.store.get(d.job) {
            Ok(Some(job)) if !job.status.is_terminal() => {}
            Ok(_) => {
                tracing::debug!(job = %d.job, "a queue entry for a finished or purged job; acknowledging it");
                self.ack_entry(&d.entry);
                return;
            }
            // The engine reads the record again; a store that is down fails it there.
            Err(e) => tracing::debug!(job = %d.job, error = %e, "checking a delivered job failed"),
        }
        if d.deliveries > self.settings.max_deliveries {
            return self.dead_letter(d);
        }
        if d.deliveries > 1 {
            tracing::info!(job = %d.job, deliveries = d.deliveries, "took over a job from a replica that stopped");
        }
        tracing::debug!(job = %d.job, entry = %d.entry, deliveries = d.deliveries, "took a job from the shared queue");
        self.held.insert(d.job, Held { entry: d.entry, owned: true, strikes: 0 });
        self.parts.local.resume(d.job);
    }

    fn ack_entry(&mut self, entry: &str) {
        if let Err(e) = self.parts.stream.ack(&[entry.to_owned()]) {
            self.trouble("acknowledging a queue entry failed; it will be reclaimed and acknowledged later", &e);
        }
    }

    /// Re-claims the entries held here and checks the store for jobs whose end
    /// was not reported.
    fn heartbeat(&mut self) {
        let owned: Vec<String> = self.held.values().filter(|h| h.owned).map(|h| h.entry.clone()).collect();
        match self.parts.stream.keep(&self.settings.consumer, &owned) {
            Ok(kept) => {
                for (id, h) in self.held.iter_mut().filter(|(_, h)| h.owned && !kept.contains(&h.entry)) {
                    // Taken over while this replica was unresponsive: both may
                    // run it now; the store keeps the first result.
                    tracing::warn!(job = %id, entry = %h.entry, "another replica took over a job held here");
                    h.owned = false;
                }
            }
            Err(e) => self.trouble("the queue heartbeat failed; held jobs may be taken over", &e),
        }
        self.sweep();
    }

    /// Acknowledges held jobs that are finished in the store (their event was
    /// missed, or they were canceled while waiting here) and lets go of jobs
    /// the engine dropped.
    fn sweep(&mut self) {
        let mut done = Vec::new();
        let mut dropped = Vec::new();
        for (id, h) in self.held.iter_mut() {
            if self.parts.local.position(*id).is_some() {
                h.strikes = 0;
                continue;
            }
            match self.parts.store.get(*id) {
                Ok(Some(job)) if job.status.is_terminal() => done.push(*id),
                Ok(None) => done.push(*id),
                Ok(Some(job)) if job.status == JobStatus::Queued => {
                    h.strikes += 1;
                    if h.strikes >= 2 {
                        dropped.push(*id);
                    }
                }
                Ok(Some(_)) => h.strikes = 0,
                Err(e) => {
                    tracing::debug!(error = %e, "checking held jobs in the store failed");
                    break;
                }
            }
        }
        for id in dropped {
            // Unheld, the entry idles until a replica reclaims it (a delivery counted).
            tracing::warn!(job = %id, "the worker did not start a job it was given; leaving it to be reclaimed");
            self.held.remove(&id);
        }
        self.ack(done);
    }

    /// Takes over entries of replicas that stopped, as many as there is room for.
    fn reclaim(&mut self) {
        let room = self.room();
        if room == 0 {
            return;
        }
        let deliveries = match self.parts.stream.reclaim(&self.settings.consumer, self.settings.reclaim_after, room) {
            Ok(d) => d,
            Err(e) => return self.trouble("reclaiming idle queue entries failed", &e),
        };
        for d in deliveries {
            self.accept(d);
        }
    }

    /// Fails a job that was delivered too often, records it in the dead-letter
    /// stream and acknowledges it.
    fn dead_letter(&mut self, d: Delivery) {
        let attempts = d.deliveries - 1;
        let error = JobError {
            kind: "internal_error".into(),
            message: format!("gave up after {attempts} attempts: each replica that took this job stopped before finishing it"),
        };
        match self.parts.store.fail(d.job, &error, now_ms()) {
            Ok(failed) => {
                if failed {
                    tracing::error!(job = %d.job, attempts, "dead letter: gave up on a job");
                    metrics::counter!(crate::metrics::JOBS, crate::metrics::LABEL_STATUS => "failed").increment(1);
                    let _ = self.parts.events.send(JobEvent::Finished { id: d.job, status: JobStatus::Failed });
                }
                if let Err(e) = self.parts.stream.dead_letter(&d, &self.settings.consumer) {
                    self.trouble("recording a dead letter failed; it will be retried", &e);
                }
            }
            // Not acknowledged: the next reclaim tries again.
            Err(e) => self.trouble("failing a dead-lettered job failed; it will be retried", &e),
        }
    }

    /// On drain: hands the entries of jobs that have not started back to the
    /// shared queue, as new entries (no delivery counted against them).
    fn release_waiting(&mut self) {
        for id in self.parts.local.take_waiting() {
            let Some(h) = self.held.remove(&id) else { continue };
            match self.parts.stream.requeue(&h.entry, id) {
                Ok(_) => tracing::info!(job = %id, "draining: handed a job back to the shared queue"),
                Err(e) => tracing::warn!(job = %id, error = %e, "draining: could not hand a job back; another replica reclaims it later"),
            }
        }
    }

    /// Trims acknowledged entries and forgets consumers that stopped.
    fn tidy(&mut self) {
        if let Err(e) = self.parts.stream.trim() {
            tracing::debug!(error = %e, "trimming the shared queue failed");
        }
        if let Err(e) = self.parts.stream.forget_consumers(&self.settings.consumer, FORGET_CONSUMERS_AFTER.max(self.settings.reclaim_after * 10)) {
            tracing::debug!(error = %e, "forgetting stopped queue consumers failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::consumer_name;

    #[test]
    fn consumer_names_are_unique_per_process_start() {
        let (a, b) = (consumer_name(), consumer_name());
        assert_ne!(a, b);
        assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
    }
}
