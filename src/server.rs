//! The server as a library: wires the job store, the compute thread and the
//! HTTP front end together, serves until told to stop, then drains.
//!
//! Two ways to run: alone, with the embedded store in `data_dir` and the
//! in-process queue; or as one of several replicas (`store` is a Redis URL),
//! sharing the Redis store and work queue (`worker::shared`).
//!
//! Shutdown follows the habit of load-balanced deployments (and mini-redis'
//! example): on the signal `/ready` turns 503 and new work is refused, in-flight
//! HTTP requests and running jobs get `drain_timeout` to finish, and whatever is
//! still queued stays in the store for the next start (alone) or in the shared
//! queue for the other replicas (shared).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, ApiConfig, AppState};
use crate::jobs::{event_channel, now_ms, open_store, EventSender, JobQueue, JobStore, RedisQueue};
use crate::pipeline::LoadOptions;
use crate::worker::shared::SharedParts;
use crate::worker::{
    self, EngineConfig, EngineStats, LocalQueue, QueueLimits, Readiness, ReadinessSender, SharedQueueConfig, SharedWorker,
    WorkerHandle, WorkerSettings,
};

/// Everything `serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub model_dir: PathBuf,
    /// Where jobs and images persist when `store` is `None`.
    pub data_dir: PathBuf,
    /// A Redis URL: the job store and work queue several replicas share.
    /// `None`: the embedded store in `data_dir`, for this process alone.
    pub store: Option<String>,
    /// Timing of the shared queue (with a Redis `store`).
    pub shared_queue: SharedQueueConfig,
    pub load: LoadOptions,
    pub engine: EngineConfig,
    pub limits: QueueLimits,
    pub api: ApiConfig,
    pub warmup: bool,
    pub drain_timeout: Duration,
    /// Finished jobs and their images are deleted this long after completion.
    pub retention: Duration,
}

/// A server that is listening.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub stats: Arc<EngineStats>,
    pub readiness: worker::ReadinessReceiver,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// Starts draining and waits for the server to finish.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await.context("server task panicked")?
    }

    /// Waits until the server stops by itself (after a signal).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task panicked")?
    }

    /// Asks the server to drain and stop (e.g. from a signal handler).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

/// The compute side as the server drives it.
enum Compute {
    /// One process: the embedded store, the in-process queue.
    Alone(WorkerHandle),
    /// One of several replicas sharing Redis.
    Shared(SharedWorker),
}

/// Closes the queues new work goes through (cheap to clone into the drain task).
#[derive(Clone)]
struct Closer {
    local: Arc<LocalQueue>,
    shared: Option<Arc<RedisQueue>>,
}

impl Closer {
    fn close(&self) {
        if let Some(shared) = &self.shared {
            shared.close();
        }
        self.local.close();
    }
}

impl Compute {
    fn start(config: &ServerConfig, store: Arc<dyn JobStore>, events: EventSender, readiness: Arc<ReadinessSender>) -> anyhow::Result<Self> {
        let settings = WorkerSettings {
            model_dir: config.model_dir.clone(),
            load: config.load,
            engine: config.engine.clone(),
            limits: config.limits,
            warmup: config.warmup,
        };
        Ok(match &config.store {
            None => Self::Alone(worker::spawn(settings, store, events, readiness).context("starting the worker thread")?),
            Some(url) => Self::Shared(
                SharedWorker::spawn(url, &config.shared_queue, settings, store, events, readiness).context("joining the shared queue")?,
            ),
        })
    }

    fn queue(&self) -> Arc<dyn JobQueue> {
        match self {
            Self::Alone(w) => w.queue.clone(),
            Self::Shared(s) => s.queue.clone(),
        }
    }

    fn closer(&self) -> Closer {
        match self {
            Self::Alone(w) => Closer { local: w.queue.clone(), shared: None },
            Self::Shared(s) => Closer { local: s.worker.queue.clone(), shared: Some(s.queue.clone()) },
        }
    }

    fn stats(&self) -> Arc<EngineStats> {
        match self {
            Self::Alone(w) => w.stats.clone(),
            Self::Shared(s) => s.worker.stats.clone(),
        }
    }

    /// Waits up to `timeout` for the compute thread to finish its running jobs,
    /// then stops the shared queue's threads.
    async fn finish(self, timeout: Duration) {
        let (handle, rest): (WorkerHandle, Option<SharedParts>) = match self {
            Self::Alone(w) => (w, None),
            Self::Shared(s) => {
                let (w, _, rest) = s.into_parts();
                (w, Some(rest))
            }
        };
        // Jobs still running after the timeout stay `running` in the store and
        // start again on the next run (alone), or are taken over by another
        // replica once their entries go idle (shared); queued ones were never taken.
        let worker = tokio::task::spawn_blocking(move || handle.thread.join());
        if tokio::time::timeout(timeout, worker).await.is_err() {
            tracing::warn!("drain timeout: leaving unfinished jobs for the next start or another replica");
        }
        if let Some(rest) = rest {
            let _ = tokio::task::spawn_blocking(move || rest.stop()).await;
        }
    }
}

/// Opens the job store `config` names; never echoes a Redis URL (it may hold a password).
fn store(config: &ServerConfig) -> anyhow::Result<Arc<dyn JobStore>> {
    let store = open_store(config.store.as_deref(), &config.data_dir, config.retention);
    match &config.store {
        None => store.with_context(|| format!("opening the job store in {}", config.data_dir.display())),
        Some(_) => store.context("opening the shared job store"),
    }
}

/// Binds, starts the worker and serves in a background task.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    let store = store(&config)?;
    let events = event_channel();
    let (readiness_tx, readiness_rx) = worker::readiness_channel();
    let readiness_tx = Arc::new(readiness_tx);
    let compute = Compute::start(&config, store.clone(), events.clone(), readiness_tx.clone())?;
    let closer = compute.closer();
    let state = AppState::new(store.clone(), compute.queue(), events, readiness_rx.clone(), config.api.clone());
    let listener = TcpListener::bind(config.bind).await.with_context(|| format!("binding {}", config.bind))?;
    let addr = listener.local_addr()?;
    let mode = if config.store.is_some() { "shared (redis)" } else { "alone (embedded store)" };
    tracing::info!(%addr, model = %config.model_dir.display(), mode, "listening");
    let (stop, mut stopped) = watch::channel(false);
    let retention = tokio::spawn(purge_expired(store.clone(), config.retention));
    let stats = compute.stats();
    let drain_timeout = config.drain_timeout;
    let graceful = {
        let mut stopped = stopped.clone();
        let readiness_tx = readiness_tx.clone();
        let closer = closer.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
            tracing::info!("draining: refusing new work");
            closer.close();
            let info = readiness_tx.borrow().cascade().cloned();
            readiness_tx.send_replace(match info {
                Some(info) => Readiness::Draining(info),
                None => Readiness::Failed("shutting down".into()),
            });
        }
    };
    let router = api::router(state);
    let mut serving = tokio::spawn(async move { axum::serve(listener, router).with_graceful_shutdown(graceful).await });
    let task = tokio::spawn(async move {
        let served = tokio::select! {
            result = &mut serving => Some(result),
            _ = stopped.wait_for(|s| *s) => None,
        };
        // After the signal, in-flight requests (sync ones wait for their jobs)
        // get the drain timeout; the worker finishes running jobs meanwhile.
        let served = match served {
            Some(result) => result,
            None => match tokio::time::timeout(drain_timeout, &mut serving).await {
                Ok(result) => result,
                Err(_) => {
                    serving.abort();
                    tracing::warn!("drain timeout: closing open connections");
                    Ok(Ok(()))
                }
            },
        };
        closer.close();
        retention.abort();
        compute.finish(drain_timeout).await;
        served.context("server task panicked")?.context("serving HTTP")
    });
    Ok(RunningServer { addr, stats, readiness: readiness_rx, stop, task })
}

/// Deletes finished jobs past the retention period, every minute.
async fn purge_expired(store: Arc<dyn JobStore>, retention: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let cutoff = now_ms() - retention.as_millis() as i64;
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.purge_finished(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(jobs = n, "purged expired jobs"),
            Ok(Err(e)) => tracing::error!(error = %e, "purging expired jobs failed"),
            Err(e) => tracing::error!(error = %e, "purge task failed"),
        }
    }
}
