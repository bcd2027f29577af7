//! The seam between the HTTP front end and the compute side: handlers submit,
//! cancel and locate jobs through `JobQueue` and follow them through `JobEvent`s,
//! without knowing whether a worker thread in this process (or a shared queue
//! serving many replicas) runs them. Handler tests use a fake.

use tokio::sync::broadcast;

use super::model::{JobId, JobPreview, JobProgress, JobStatus};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueueError {
    /// At capacity: the client should retry after about this many seconds.
    #[error("the queue is full ({depth} jobs waiting)")]
    Full { depth: usize, retry_after_secs: u64 },
    /// Shutting down (draining): no new work is accepted.
    #[error("the server is shutting down")]
    Closed,
    /// The shared queue (Redis) cannot be reached; details are in the log.
    #[error("the job queue is unavailable")]
    Unavailable { retry_after_secs: u64 },
}

pub trait JobQueue: Send + Sync + 'static {
    /// Checks that one more job of `images` images would be admitted now; call it
    /// before storing the job so that a full queue costs the client nothing.
    fn check_capacity(&self, images: usize) -> Result<(), QueueError>;

    /// Hands a stored, queued job to the workers.
    fn submit(&self, id: JobId) -> Result<(), QueueError>;

    /// Asks the workers to stop a queued or running job (idempotent). The store
    /// records the cancellation; this only makes a running job stop early.
    fn cancel(&self, id: JobId);

    /// Position among the jobs waiting to start (0 = next), `None` when the job is
    /// not waiting.
    fn position(&self, id: JobId) -> Option<usize>;

    /// Jobs waiting to start.
    fn depth(&self) -> usize;
}

/// What happened to a job, for Server-Sent Events and for sync requests waiting
/// on their result. Every state change is also in the store: a listener that
/// lags behind re-reads the record instead of relying on the stream.
/// Serialised (tagged by `event`) when replicas relay events over Redis.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    Queued { id: JobId },
    Started { id: JobId },
    Progress { id: JobId, progress: JobProgress },
    StageDone { id: JobId, stage: usize, stage_name: String },
    /// x̂_0 partway through a stage (requests with `preview_every`).
    Preview { id: JobId, preview: JobPreview },
    /// Succeeded, failed or canceled.
    Finished { id: JobId, status: JobStatus },
}

impl JobEvent {
    pub fn id(&self) -> JobId {
        match self {
            Self::Queued { id }
            | Self::Started { id }
            | Self::Progress { id, .. }
            | Self::StageDone { id, .. }
            | Self::Preview { id, .. }
            | Self::Finished { id, .. } => *id,
        }
    }
}

/// The broadcast channel events travel on (one per server).
pub type EventSender = broadcast::Sender<JobEvent>;

pub fn event_channel() -> EventSender {
    broadcast::channel(4096).0
}
