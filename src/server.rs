//! The server as a library: wires the job store, the compute thread and the
//! HTTP front end together, serves until told to stop, then drains.
//!
//! Shutdown follows the habit of load-balanced deployments (and mini-redis'
//! example): on the signal `/ready` turns 503 and new work is refused, in-flight
//! HTTP requests and running jobs get `drain_timeout` to finish, and whatever is
//! still queued stays in the store for the next start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, ApiConfig, AppState};
use crate::jobs::{event_channel, now_ms, EmbeddedStore, JobStore};
use crate::pipeline::LoadOptions;
use crate::worker::{self, EngineConfig, EngineStats, QueueLimits, Readiness, WorkerSettings};

/// Everything `serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub model_dir: PathBuf,
    /// Where jobs and images persist.
    pub data_dir: PathBuf,
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

/// Binds, starts the worker and serves in a background task.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    let store: Arc<dyn JobStore> = Arc::new(
        EmbeddedStore::open(&config.data_dir).with_context(|| format!("opening the job store in {}", config.data_dir.display()))?,
    );
    let events = event_channel();
    let (readiness_tx, readiness_rx) = worker::readiness_channel();
    let readiness_tx = Arc::new(readiness_tx);
    let settings = WorkerSettings {
        model_dir: config.model_dir.clone(),
        load: config.load,
        engine: config.engine.clone(),
        limits: config.limits,
        warmup: config.warmup,
    };
    let handle = worker::spawn(settings, store.clone(), events.clone(), readiness_tx.clone()).context("starting the worker thread")?;
    let queue = handle.queue.clone();
    let state = AppState::new(store.clone(), queue.clone(), events, readiness_rx.clone(), config.api.clone());
    let listener = TcpListener::bind(config.bind).await.with_context(|| format!("binding {}", config.bind))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, model = %config.model_dir.display(), data = %config.data_dir.display(), "listening");
    let (stop, mut stopped) = watch::channel(false);
    let retention = tokio::spawn(purge_expired(store.clone(), config.retention));
    let stats = handle.stats.clone();
    let drain_timeout = config.drain_timeout;
    let graceful = {
        let mut stopped = stopped.clone();
        let readiness_tx = readiness_tx.clone();
        let queue = queue.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
            tracing::info!("draining: refusing new work");
            queue.close();
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
        queue.close();
        retention.abort();
        // Jobs still running after the timeout stay `running` in the store and
        // start again on the next run; queued ones were never taken.
        let worker = tokio::task::spawn_blocking(move || handle.thread.join());
        if tokio::time::timeout(drain_timeout, worker).await.is_err() {
            tracing::warn!("drain timeout: leaving unfinished jobs for the next start");
        }
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
