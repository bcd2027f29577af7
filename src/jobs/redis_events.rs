//! Job events and cancellations across replicas, over Redis pub/sub, so that
//! an SSE client or a sync request on replica A follows a job that replica B
//! runs, and a cancel sent to A stops the job on B.
//!
//! Three threads, none on the async runtime:
//!
//! - the **tee** takes the local engine's events (its own broadcast channel),
//!   hands each to this process's listeners at once, tells the intake about
//!   finished jobs, and queues it for publishing;
//! - the **publisher** sends queued events and cancellations to
//!   `{p}:events` / `{p}:queue:cancel`, pipelined;
//! - the **subscriber** listens on both channels: other replicas' events go to
//!   this process's listeners, cancellations to the local worker.
//!
//! Pub/sub delivers at most once (a dropped connection loses messages), and
//! the store, not the stream of events, is the truth. So the subscriber also
//! polls the jobs submitted through this replica (the ones its sync clients
//! wait on) every `poll_interval`, and right after (re)subscribing, and
//! announces any that finished unseen. A repeated `Finished` is harmless:
//! listeners re-read the store when they get one.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::{self, error::RecvError};

use super::model::JobId;
use super::queue::{EventSender, JobEvent};
use super::store::JobStore;
use super::stream::WorkStream;

/// Events waiting to be published beyond which progress events are dropped
/// (a slow or absent Redis must not grow memory); other events always go.
const OUTBOX_LIMIT: usize = 4096;
/// Messages sent in one pipeline.
const PUBLISH_BATCH: usize = 256;
/// How often the threads look at their stop flag.
const TICK: Duration = Duration::from_millis(250);

/// How the relay behaves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// This process's name on the wire (its queue consumer name): its own
    /// events coming back from Redis are skipped.
    pub origin: String,
    /// How often jobs submitted here are checked in the store for an end
    /// whose event was lost.
    pub poll_interval: Duration,
}

/// The relay's wire format: one JSON object per message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Envelope {
    origin: String,
    #[serde(flatten)]
    event: JobEvent,
}

/// What the publisher sends.
enum Outgoing {
    Event(JobEvent),
    Cancel(JobId),
}

/// State the threads and the handles share.
struct Shared {
    stream: Arc<WorkStream>,
    origin: String,
    /// Jobs submitted through this replica whose end has not been seen.
    watched: Mutex<HashSet<JobId>>,
    /// Events queued for the publisher.
    outbox_len: AtomicUsize,
    /// Set when events may have been lost: the subscriber polls at once.
    poll_now: AtomicBool,
    stop: AtomicBool,
}

impl Shared {
    fn watched(&self) -> MutexGuard<'_, HashSet<JobId>> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the rest of the process holds: publish a cancellation, watch a job.
#[derive(Clone)]
pub struct RelayHandle {
    outbox: Sender<Outgoing>,
    shared: Arc<Shared>,
}

impl RelayHandle {
    /// Asks every replica to stop job `id` (best effort: the store already
    /// records the cancellation, this only stops the compute early).
    pub fn cancel(&self, id: JobId) {
        let _ = self.outbox.send(Outgoing::Cancel(id));
    }

    /// Marks a job submitted through this replica: its end is announced here
    /// even if its event is lost.
    pub fn watch(&self, id: JobId) {
        self.shared.watched().insert(id);
    }

    pub fn unwatch(&self, id: JobId) {
        self.shared.watched().remove(&id);
    }
}

/// The running relay.
pub struct EventRelay {
    handle: RelayHandle,
    threads: Vec<JoinHandle<()>>,
}

/// Where the relay delivers what it receives.
pub struct RelayTargets {
    /// This process's listeners (SSE streams, sync requests).
    pub events: EventSender,
    /// Stops a job in the local worker, if it runs here.
    pub cancel_local: Box<dyn Fn(JobId) + Send>,
    /// Told about every job the local engine finished (the intake acknowledges it).
    pub finished_local: Box<dyn Fn(JobId) + Send>,
}

impl EventRelay {
    /// Starts the threads. `engine` receives the local engine's events; it must
    /// be subscribed before the engine starts.
    pub fn start(
        stream: Arc<WorkStream>,
        store: Arc<dyn JobStore>,
        config: RelayConfig,
        engine: broadcast::Receiver<JobEvent>,
        targets: RelayTargets,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            stream,
            origin: config.origin,
            watched: Mutex::new(HashSet::new()),
            outbox_len: AtomicUsize::new(0),
            poll_now: AtomicBool::new(true),
            stop: AtomicBool::new(false),
        });
        let (outbox, outgoing) = mpsc::channel();
        let handle = RelayHandle { outbox: outbox.clone(), shared: shared.clone() };
        let RelayTargets { events, cancel_local, finished_local } = targets;
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| std::thread::Builder::new().name(name.into()).spawn(f);
        let tee = {
            let (shared, events) = (shared.clone(), events.clone());
            spawn("diffusiond-events-tee", Box::new(move || tee(&shared, engine, &events, &outbox, finished_local)))?
        };
        let publisher = {
            let shared = shared.clone();
            spawn("diffusiond-events-out", Box::new(move || publish(&shared, &outgoing)))?
        };
        let subscriber = {
            let shared = shared.clone();
            let poll = config.poll_interval;
            spawn("diffusiond-events-in", Box::new(move || subscribe(&shared, store.as_ref(), &events, cancel_local.as_ref(), poll)))?
        };
        Ok(Self { handle, threads: vec![tee, publisher, subscriber] })
    }

    pub fn handle(&self) -> RelayHandle {
        self.handle.clone()
    }

    /// Stops the threads and waits (briefly) for them. The tee ends with the
    /// engine; one still running after a drain timeout is left behind.
    pub fn stop(self) {
        self.handle.shared.stop.store(true, Ordering::Relaxed);
        drop(self.handle);
        let deadline = Instant::now() + TICK * 8;
        while Instant::now() < deadline && !self.threads.iter().all(JoinHandle::is_finished) {
            std::thread::sleep(TICK / 10);
        }
        for t in self.threads.into_iter().filter(JoinHandle::is_finished) {
            let _ = t.join();
        }
    }
}

/// Local engine events → local listeners (at once), the intake, the publisher.
fn tee(shared: &Shared, mut engine: broadcast::Receiver<JobEvent>, events: &EventSender, outbox: &Sender<Outgoing>, finished: Box<dyn Fn(JobId) + Send>) {
    loop {
        match engine.blocking_recv() {
            Ok(event) => {
                let _ = events.send(event.clone());
                let progress = matches!(event, JobEvent::Progress { .. });
                if let JobEvent::Finished { id, .. } = event {
                    finished(id);
                    shared.watched().remove(&id);
                }
                // Progress is the only event worth dropping when Redis falls behind.
                if progress && shared.outbox_len.load(Ordering::Relaxed) >= OUTBOX_LIMIT {
                    continue;
                }
                shared.outbox_len.fetch_add(1, Ordering::Relaxed);
                let _ = outbox.send(Outgoing::Event(event));
            }
            Err(RecvError::Lagged(missed)) => {
                // Local listeners missed these too; the store has the truth.
                tracing::warn!(missed, "the event relay fell behind the engine; re-checking jobs in the store");
                shared.poll_now.store(true, Ordering::Relaxed);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Logs the first of a run of failures as a warning, the rest at debug level.
#[derive(Default)]
struct Trouble(bool);

impl Trouble {
    fn failed(&mut self, what: &str, e: &dyn std::fmt::Display) {
        if std::mem::replace(&mut self.0, true) {
            tracing::debug!(error = %e, "{what}");
        } else {
            tracing::warn!(error = %e, "{what}");
        }
    }

    fn recovered(&mut self, what: &str) {
        if std::mem::take(&mut self.0) {
            tracing::info!("{what}");
        }
    }
}

/// Publishes queued messages, pipelined; drops a batch when Redis fails.
fn publish(shared: &Shared, outgoing: &Receiver<Outgoing>) {
    let keys = shared.stream.keys().clone();
    let mut conn = None;
    let mut trouble = Trouble::default();
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let first = match outgoing.recv_timeout(TICK) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        batch.extend(outgoing.try_iter().take(PUBLISH_BATCH - 1));
        let events = batch.iter().filter(|m| matches!(m, Outgoing::Event(_))).count();
        shared.outbox_len.fetch_sub(events, Ordering::Relaxed);
        let mut pipe = ::redis::pipe();
        for m in &batch {
            match m {
                Outgoing::Event(e) => {
                    let envelope = Envelope { origin: shared.origin.clone(), event: e.clone() };
                    let json = serde_json::to_string(&envelope).expect("events serialise");
                    pipe.cmd("PUBLISH").arg(&keys.events).arg(json).ignore();
                }
                Outgoing::Cancel(id) => {
                    pipe.cmd("PUBLISH").arg(&keys.cancel).arg(id.to_string()).ignore();
                }
            }
        }
        let sent = match conn.as_mut() {
            Some(c) => pipe.query::<()>(c).map_err(|e| e.to_string()),
            None => match shared.stream.dedicated(Duration::from_secs(5)) {
                Ok(mut c) => {
                    let sent = pipe.query::<()>(&mut c).map_err(|e| e.to_string());
                    conn = Some(c);
                    sent
                }
                Err(e) => Err(e.to_string()),
            },
        };
        match sent {
            Ok(()) => trouble.recovered("publishing job events works again"),
            Err(e) => {
                conn = None;
                trouble.failed("publishing job events failed; other replicas fall back to the store", &e);
            }
        }
    }
}

/// Other replicas' events → local listeners; cancellations → the local worker;
/// and the poll of watched jobs.
fn subscribe(shared: &Shared, store: &dyn JobStore, events: &EventSender, cancel: &dyn Fn(JobId), poll_interval: Duration) {
    let keys = shared.stream.keys().clone();
    let mut trouble = Trouble::default();
    let mut next_poll = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        let mut conn = match shared.stream.dedicated(TICK) {
            Ok(c) => c,
            Err(e) => {
                trouble.failed("subscribing to job events failed; retrying", &e);
                poll_if_due(shared, store, events, &mut next_poll, poll_interval);
                std::thread::sleep(TICK * 4);
                continue;
            }
        };
        let mut pubsub = conn.as_pubsub();
        if let Err(e) = pubsub.subscribe(&[&keys.events, &keys.cancel]) {
            trouble.failed("subscribing to job events failed; retrying", &e);
            std::thread::sleep(TICK * 4);
            continue;
        }
        trouble.recovered("subscribed to job events again");
        // Anything may have been missed while not subscribed.
        shared.poll_now.store(true, Ordering::Relaxed);
        while !shared.stop.load(Ordering::Relaxed) {
            poll_if_due(shared, store, events, &mut next_poll, poll_interval);
            let message = match pubsub.get_message() {
                Ok(m) => m,
                Err(e) if e.is_timeout() => continue,
                Err(e) => {
                    trouble.failed("the job event subscription broke; resubscribing", &e);
                    break;
                }
            };
            let channel = message.get_channel_name();
            let payload = message.get_payload_bytes();
            if channel == keys.cancel {
                match std::str::from_utf8(payload).ok().and_then(|s| s.parse::<JobId>().ok()) {
                    Some(id) => cancel(id),
                    None => tracing::warn!("a malformed cancellation on {channel}"),
                }
                continue;
            }
            match serde_json::from_slice::<Envelope>(payload) {
                Ok(envelope) => {
                    let event = envelope.event;
                    if let JobEvent::Finished { id, .. } = &event {
                        shared.watched().remove(id);
                    }
                    if envelope.origin != shared.origin {
                        let _ = events.send(event);
                    }
                }
                // A newer replica's event this one does not know: skip it.
                Err(e) => tracing::debug!(error = %e, "an unreadable job event"),
            }
        }
    }
}

/// Announces watched jobs that finished without their event being seen.
fn poll_if_due(shared: &Shared, store: &dyn JobStore, events: &EventSender, next: &mut Instant, interval: Duration) {
    let now = Instant::now();
    let forced = shared.poll_now.swap(false, Ordering::Relaxed);
    if now < *next && !forced {
        return;
    }
    *next = now + interval;
    let ids: Vec<JobId> = shared.watched().iter().copied().collect();
    for id in ids {
        match store.get(id) {
            Ok(Some(job)) if job.status.is_terminal() => {
                if shared.watched().remove(&id) {
                    tracing::debug!(job = %id, status = job.status.as_str(), "a job's end was found in the store, not on the event channel");
                    let _ = events.send(JobEvent::Finished { id, status: job.status });
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                shared.watched().remove(&id);
            }
            Err(e) => {
                tracing::debug!(error = %e, "polling watched jobs failed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::model::{JobProgress, JobStatus};

    #[test]
    fn events_round_trip_through_the_wire_format() {
        let id = JobId::from_u128(7);
        let progress = JobProgress { stage: 1, stages: 2, stage_name: "sr".into(), step: 3, total_steps: 9, fraction: 0.6, preview: None };
        let all = [
            JobEvent::Queued { id },
            JobEvent::Started { id },
            JobEvent::Progress { id, progress },
            JobEvent::StageDone { id, stage: 0, stage_name: "base".into() },
            JobEvent::Finished { id, status: JobStatus::Canceled },
        ];
        for event in all {
            let json = serde_json::to_string(&Envelope { origin: "a".into(), event: event.clone() }).unwrap();
            let back: Envelope = serde_json::from_str(&json).unwrap();
            assert_eq!((back.origin.as_str(), back.event), ("a", event), "{json}");
        }
        let json = serde_json::to_string(&Envelope { origin: "b".into(), event: JobEvent::Finished { id, status: JobStatus::Succeeded } }).unwrap();
        assert_eq!(json, format!(r#"{{"origin":"b","event":"finished","id":"{id}","status":"succeeded"}}"#));
    }
}
