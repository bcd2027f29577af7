//! What a job is: its validated request, its state machine
//! (queued → running → succeeded | failed | canceled), its progress and its
//! images. These records are what the store persists and what every API view
//! of a job is made from.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::pipeline::GenerationRequest;

pub type JobId = Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    /// Succeeded, failed and canceled jobs never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Queued, Self::Running, Self::Succeeded, Self::Failed, Self::Canceled].into_iter().find(|v| v.as_str() == s)
    }
}

/// Where a running job is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    /// Index among the stages this job runs.
    pub stage: usize,
    pub stages: usize,
    pub stage_name: String,
    /// Steps done in this stage.
    pub step: usize,
    pub total_steps: usize,
    /// Of the whole job, counting every stage's steps, in [0, 1].
    pub fraction: f64,
    /// The latest preview, when the request asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<JobPreview>,
}

/// x̂_0 partway through a stage: what the images look like so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPreview {
    /// Index among the stages this job runs.
    pub stage: usize,
    /// Steps done in that stage.
    pub step: usize,
    /// One PNG per image, base64, at the stage's size.
    pub images: Vec<String>,
}

/// Why a job failed: a stable machine tag and a message safe to show clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

/// One finished image (its PNG bytes are stored beside the record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub index: usize,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    /// The API key that created the job (its fingerprint, not the key); a job is
    /// visible only to its owner. `None` when the server runs without keys.
    pub owner: Option<String>,
    pub status: JobStatus,
    pub request: GenerationRequest,
    /// Unix time in milliseconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub progress: Option<JobProgress>,
    pub error: Option<JobError>,
    pub images: Vec<ImageInfo>,
    /// How many times a worker has started it (a restart mid-run starts it again).
    pub attempts: u32,
    /// The `x-request-id` of the request that created the job: the worker's
    /// log lines for the job carry it, on whichever replica runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl JobRecord {
    /// A new queued job.
    pub fn new(id: JobId, owner: Option<String>, request: GenerationRequest, now: i64) -> Self {
        Self {
            id,
            owner,
            status: JobStatus::Queued,
            request,
            created_at: now,
            started_at: None,
            completed_at: None,
            progress: None,
            error: None,
            images: Vec::new(),
            attempts: 0,
            request_id: None,
        }
    }

    /// The same job, tagged with the id of the request that created it.
    pub fn with_request_id(mut self, request_id: Option<String>) -> Self {
        self.request_id = request_id;
        self
    }

    /// The span the worker logs this job's lines in: the job id and the id of
    /// the request that created it.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!("job", job = %self.id, request_id = self.request_id.as_deref().unwrap_or("-"))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
