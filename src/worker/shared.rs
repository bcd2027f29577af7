//! The compute side when replicas share Redis (`serve --store redis://…`): the
//! usual compute thread, fed by the intake from the shared stream instead of
//! resuming the store; its events relayed to and from the other replicas; and
//! a `RedisQueue` for the HTTP side, so that any replica accepts work any
//! replica may run.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::queue::LocalQueue;
use super::readiness::ReadinessSender;
use super::redis_intake::{self, consumer_name, IntakeHandle, IntakeParts, IntakeSettings};
use super::service::{self, Resume, WorkerHandle, WorkerSettings};
use crate::jobs::{
    event_channel, EventRelay, EventSender, JobQueue, JobStore, RedisQueue, RelayConfig, RelayTargets, SharedLimits,
    StreamOptions, WorkStream,
};

/// Timing of the shared queue (see `jobs::stream` for what each one does).
#[derive(Debug, Clone)]
pub struct SharedQueueConfig {
    /// An entry whose replica has been silent this long is taken over by another.
    pub reclaim_after: Duration,
    /// How often a replica re-claims its entries and looks for idle ones.
    pub heartbeat: Duration,
    /// Deliveries after which a job is failed and dead-lettered.
    pub max_deliveries: u64,
    /// How long one read of the stream waits for new entries.
    pub read_block: Duration,
    /// How often jobs submitted here are checked in the store for an end whose event was lost.
    pub event_poll: Duration,
}

impl Default for SharedQueueConfig {
    fn default() -> Self {
        Self {
            reclaim_after: Duration::from_secs(60),
            heartbeat: Duration::from_secs(10),
            max_deliveries: 3,
            read_block: Duration::from_millis(500),
            event_poll: Duration::from_secs(2),
        }
    }
}

impl SharedQueueConfig {
    /// Checks that the timeouts make sense together; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat.is_zero() || self.read_block.is_zero() || self.event_poll.is_zero() {
            return Err("the queue heartbeat, read block and event poll must be positive".into());
        }
        if self.heartbeat * 2 > self.reclaim_after {
            return Err(format!(
                "the queue heartbeat ({:?}) must be at most half the reclaim timeout ({:?}), or live replicas lose their jobs",
                self.heartbeat, self.reclaim_after
            ));
        }
        if self.max_deliveries == 0 {
            return Err("the queue's max deliveries must be at least 1".into());
        }
        Ok(())
    }
}

/// The compute side of a replica that shares Redis.
pub struct SharedWorker {
    /// The compute thread and its local queue, as in a single process.
    pub worker: WorkerHandle,
    /// What the HTTP side submits through.
    pub queue: Arc<RedisQueue>,
    rest: SharedParts,
}

/// The threads that outlive the compute thread briefly at shutdown.
pub struct SharedParts {
    intake: IntakeHandle,
    relay: EventRelay,
}

impl SharedParts {
    /// Acknowledges what finished, then stops reading and relaying. Call after
    /// the compute thread ended (or the drain timed out).
    pub fn stop(self) {
        self.intake.stop();
        self.relay.stop();
    }
}

impl SharedWorker {
    /// Connects to the queue at `url` and starts the compute thread, the
    /// intake and the event relay. `events` is where this process's listeners
    /// hear about every job, whichever replica runs it.
    pub fn spawn(
        url: &str,
        config: &SharedQueueConfig,
        settings: WorkerSettings,
        store: Arc<dyn JobStore>,
        events: EventSender,
        readiness: Arc<ReadinessSender>,
    ) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        let stream = Arc::new(WorkStream::open(url, StreamOptions::default())?);
        let consumer = consumer_name();
        // The engine gets a channel of its own: the relay forwards its events to
        // local listeners and to Redis, and other replicas' events only locally.
        let engine_events = event_channel();
        let engine_rx = engine_events.subscribe();
        let limits = SharedLimits { max_waiting_jobs: settings.limits.max_waiting_jobs, retry_after_secs: settings.limits.retry_after_secs };
        let max_in_flight = settings.engine.max_active_jobs.max(1);
        let readiness_rx = readiness.subscribe();
        let worker = service::spawn_with(settings, Resume::Nothing, store.clone(), engine_events.clone(), readiness)?;
        let local: Arc<LocalQueue> = worker.queue.clone();
        let (finished_tx, finished_rx) = mpsc::channel();
        let cancel_target = local.clone();
        let targets = RelayTargets {
            events,
            cancel_local: Box::new(move |id| cancel_target.cancel(id)),
            finished_local: Box::new(move |id| {
                let _ = finished_tx.send(id);
            }),
        };
        let relay_config = RelayConfig { origin: consumer.clone(), poll_interval: config.event_poll };
        let relay = EventRelay::start(stream.clone(), store.clone(), relay_config, engine_rx, targets)?;
        let queue = Arc::new(RedisQueue::new(stream.clone(), local.clone(), relay.handle(), limits));
        let parts = IntakeParts { stream: stream.clone(), store, local, finished: finished_rx, events: engine_events, readiness: readiness_rx };
        let intake_settings = IntakeSettings {
            consumer: consumer.clone(),
            max_in_flight,
            block: config.read_block,
            heartbeat: config.heartbeat,
            reclaim_after: config.reclaim_after,
            max_deliveries: config.max_deliveries,
        };
        let intake = redis_intake::spawn(parts, intake_settings)?;
        tracing::info!(%consumer, server = %stream.server(), stream = %stream.keys().stream, group = crate::jobs::stream::GROUP, "joined the shared queue");
        Ok(Self { worker, queue, rest: SharedParts { intake, relay } })
    }

    /// Refuses new submissions and stops taking entries; running jobs finish.
    pub fn close(&self) {
        self.queue.close();
        self.worker.queue.close();
    }

    pub fn into_parts(self) -> (WorkerHandle, Arc<RedisQueue>, SharedParts) {
        (self.worker, self.queue, self.rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_checked_together() {
        assert_eq!(SharedQueueConfig::default().validate(), Ok(()));
        let slow_heartbeat = SharedQueueConfig { heartbeat: Duration::from_secs(40), ..Default::default() };
        assert!(slow_heartbeat.validate().unwrap_err().contains("at most half"));
        let no_retries = SharedQueueConfig { max_deliveries: 0, ..Default::default() };
        assert!(no_retries.validate().is_err());
    }
}
