//! What every handler shares: the job store, the queue, the event stream, the
//! readiness signal, the settings and the metrics handle — a cheap `Clone`
//! facade around `Arc`s, as in axum's `State<AppState>` examples and TGI's
//! `Infer` handle.
//!
//! Handlers never touch the compute side directly: they go through the
//! `JobQueue` trait and follow jobs through `JobEvent`s, so tests use fakes.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use metrics_exporter_prometheus::PrometheusHandle;

use super::auth::ApiKeys;
use super::errors::ApiError;
use super::schemas::JobDocument;
use crate::jobs::{EventSender, JobId, JobQueue, JobRecord, JobStatus, JobStore, StoreError};
use crate::pipeline::CascadeInfo;
use crate::worker::{Readiness, ReadinessReceiver};

/// The HTTP front end's settings (the server's config struct fills them).
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Accepted bearer tokens; empty turns authentication off.
    pub api_keys: Vec<String>,
    /// Larger request bodies get 413 before they are parsed.
    pub max_body_bytes: usize,
    /// How long a sync request waits for its job before giving up (504, job canceled).
    pub sync_timeout: Duration,
    /// The most images one request may ask for.
    pub max_images: usize,
    /// What `Retry-After` tells clients while models load or the server drains.
    pub retry_after_secs: u64,
    /// Whether `/` serves the web playground.
    pub ui: bool,
    /// Origins whose pages may call the API from a browser (`*`: any); empty: none.
    pub cors_origins: Vec<HeaderValue>,
}

impl ApiConfig {
    pub const DEFAULT_MAX_BODY_BYTES: usize = 8192 * 1024;
    pub const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(300);
    pub const DEFAULT_MAX_IMAGES: usize = 8;
    pub const DEFAULT_RETRY_AFTER_SECS: u64 = 5;

    /// The defaults, with these API keys (empty: no authentication).
    pub fn new(api_keys: Vec<String>) -> Self {
        Self {
            api_keys,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            sync_timeout: Self::DEFAULT_SYNC_TIMEOUT,
            max_images: Self::DEFAULT_MAX_IMAGES,
            retry_after_secs: Self::DEFAULT_RETRY_AFTER_SECS,
            ui: true,
            cors_origins: Vec::new(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn JobStore>,
    pub queue: Arc<dyn JobQueue>,
    /// Every job's events; handlers subscribe before they submit.
    pub events: EventSender,
    pub readiness: ReadinessReceiver,
    pub config: Arc<ApiConfig>,
    /// The configured keys, hashed once (requests compare digests in constant time).
    pub keys: Arc<ApiKeys>,
    pub metrics: PrometheusHandle,
}

impl AppState {
    /// Builds the state and installs (once per process) the metrics recorder.
    pub fn new(store: Arc<dyn JobStore>, queue: Arc<dyn JobQueue>, events: EventSender, readiness: ReadinessReceiver, config: ApiConfig) -> Self {
        let keys = Arc::new(ApiKeys::new(&config.api_keys));
        Self { store, queue, events, readiness, config: Arc::new(config), keys, metrics: crate::metrics::install() }
    }

    /// Runs a store call on the blocking pool: store methods do disk or network
    /// I/O and must not stall the runtime's workers.
    pub async fn with_store<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn JobStore) -> Result<T, StoreError> + Send + 'static,
    {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(store.as_ref())).await.map_err(ApiError::internal)?.map_err(ApiError::from)
    }

    /// Job `id`'s record; 404 when there is none.
    pub async fn job(&self, id: JobId) -> Result<JobRecord, ApiError> {
        self.with_store(move |s| s.get(id)).await?.ok_or(ApiError::NotFound("job"))
    }

    /// The document for `job`, with its place in the queue.
    pub fn document(&self, job: &JobRecord) -> JobDocument {
        let position = if job.status == JobStatus::Queued { self.queue.position(job.id) } else { None };
        JobDocument::new(job, position)
    }

    /// The loaded cascade when new work is accepted; 503 otherwise.
    pub fn cascade(&self) -> Result<Arc<CascadeInfo>, ApiError> {
        let retry_after_secs = self.config.retry_after_secs;
        match &*self.readiness.borrow() {
            Readiness::Ready(info) => Ok(Arc::clone(info)),
            Readiness::Loading => Err(ApiError::NotReady { reason: "models are loading", retry_after_secs }),
            Readiness::Draining(_) => Err(ApiError::ShuttingDown { retry_after_secs }),
            // The operator's message names files; clients only learn that loading failed.
            Readiness::Failed(_) => Err(ApiError::NotReady { reason: "the models failed to load", retry_after_secs }),
        }
    }

    /// The loaded cascade for describing it (`/info`): available while draining too.
    pub fn loaded_cascade(&self) -> Result<Arc<CascadeInfo>, ApiError> {
        match self.readiness.borrow().cascade() {
            Some(info) => Ok(Arc::clone(info)),
            None => self.cascade(),
        }
    }
}
