//! The job document: how `GET /jobs/{id}`, `PUT /jobs/{id}`, cancel, async
//! `POST /generate` and the job's event stream show a stored `JobRecord`.
//!
//! Times are RFC 3339 strings, images are links to `/jobs/{id}/images/{index}`,
//! and the resolved settings (what actually runs, defaults filled in) come
//! along so a client can reproduce the job. The owner fingerprint stays out.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::time::rfc3339;
use crate::jobs::{JobProgress, JobRecord, JobStatus};

/// A job's state: queued → running → succeeded | failed | canceled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl From<JobStatus> for Status {
    fn from(s: JobStatus) -> Self {
        match s {
            JobStatus::Queued => Self::Queued,
            JobStatus::Running => Self::Running,
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Failed => Self::Failed,
            JobStatus::Canceled => Self::Canceled,
        }
    }
}

/// Where a running job is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProgressDoc {
    /// Index among the stages this job runs.
    pub stage: usize,
    pub stages: usize,
    pub stage_name: String,
    /// Steps done in this stage.
    pub step: usize,
    pub total_steps: usize,
    /// Of the whole job, in [0, 1].
    pub fraction: f64,
}

impl From<&JobProgress> for ProgressDoc {
    fn from(p: &JobProgress) -> Self {
        Self { stage: p.stage, stages: p.stages, stage_name: p.stage_name.clone(), step: p.step, total_steps: p.total_steps, fraction: p.fraction }
    }
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobErrorDoc {
    /// Stable machine tag.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageDoc {
    pub index: usize,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// The PNG (`GET`, same credentials as the job).
    #[schema(example = "/jobs/0b0d6a3e-8f5c-4a4e-9d51-3f7d2b1c9a10/images/0")]
    pub url: String,
}

/// One stage as it runs, every default resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StageSettings {
    pub index: usize,
    pub name: String,
    pub sampler: String,
    pub steps: usize,
    pub guidance_scale: f32,
    pub eta: f64,
    pub noise_level: Option<i64>,
}

/// The validated request the job runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RequestSettings {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub n: usize,
    /// Image i's seed is seed + i.
    pub seed: u64,
    pub stages: Vec<StageSettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobDocument {
    pub id: Uuid,
    pub status: Status,
    /// Jobs ahead of this one (0 = next); null unless queued.
    pub queue_position: Option<usize>,
    pub progress: Option<ProgressDoc>,
    /// RFC 3339, UTC.
    #[schema(example = "2026-01-02T03:04:05.678Z")]
    pub created_at: String,
    pub started_at: Option<String>,
    pub completed_at: Option<String>,
    pub error: Option<JobErrorDoc>,
    /// Finished images (empty until the job succeeds).
    pub images: Vec<ImageDoc>,
    pub request: RequestSettings,
}

/// Where image `index` of job `id` is served.
pub fn image_url(id: Uuid, index: usize) -> String {
    format!("/jobs/{id}/images/{index}")
}

impl JobDocument {
    /// The document for `job`, `queue_position` as the queue reports it.
    pub fn new(job: &JobRecord, queue_position: Option<usize>) -> Self {
        let r = &job.request;
        Self {
            id: job.id,
            status: job.status.into(),
            queue_position: queue_position.filter(|_| job.status == JobStatus::Queued),
            progress: job.progress.as_ref().map(Into::into),
            created_at: rfc3339(job.created_at),
            started_at: job.started_at.map(rfc3339),
            completed_at: job.completed_at.map(rfc3339),
            error: job.error.as_ref().map(|e| JobErrorDoc { kind: e.kind.clone(), message: e.message.clone() }),
            images: job
                .images
                .iter()
                .map(|i| ImageDoc { index: i.index, seed: i.seed, width: i.width, height: i.height, url: image_url(job.id, i.index) })
                .collect(),
            request: RequestSettings {
                prompt: r.prompt.clone(),
                negative_prompt: r.negative_prompt.clone(),
                n: r.n,
                seed: r.seed,
                stages: r
                    .stages
                    .iter()
                    .map(|s| StageSettings {
                        index: s.index,
                        name: s.name.clone(),
                        sampler: s.sampler.kind.name().to_owned(),
                        steps: s.sampler.steps,
                        guidance_scale: s.guidance_scale,
                        eta: s.sampler.eta,
                        noise_level: s.noise_level,
                    })
                    .collect(),
            },
        }
    }
}
