//! The job document: how `GET /jobs/{id}`, `PUT /jobs/{id}`, cancel, async
//! `POST /generate` and the job's event stream show a stored `JobRecord`.
//!
//! Times are RFC 3339 strings, images are links to `/jobs/{id}/images/{index}`,
//! and the resolved settings (what actually runs, defaults filled in) come
//! along so a client can reproduce the job. The owner fingerprint stays out.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::source::{InterpolateBody, VariationBody};
use super::time::rfc3339;
use crate::jobs::{JobPreview, JobProgress, JobRecord, JobStatus};
use crate::pipeline::{NoiseMix, Source};

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

/// What the images look like partway through a stage: x̂_0, the model's current
/// estimate of the finished image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PreviewDoc {
    /// Index among the stages this job runs.
    pub stage: usize,
    /// Steps done in that stage.
    pub step: usize,
    /// One PNG per image (base64), at the stage's size.
    pub images: Vec<String>,
}

impl From<&JobPreview> for PreviewDoc {
    fn from(p: &JobPreview) -> Self {
        Self { stage: p.stage, step: p.step, images: p.images.clone() }
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
    /// GLIDE's CLIP guidance scale (the base stage; 0: none).
    pub clip_guidance_scale: f32,
    /// ADM's classifier guidance scale (the base stage; 0: none).
    #[serde(default)]
    pub classifier_guidance_scale: f32,
    /// Layout guidance scale (the base stage, when the prompt has a layout
    /// to guide; 0: none).
    #[serde(default)]
    pub layout_guidance_scale: f32,
    /// Super-resolution from the previous stage's upsampled output at this
    /// strength (1: from pure noise).
    #[serde(default = "full_strength")]
    pub strength: f64,
}

fn full_strength() -> f64 {
    1.0
}

/// The validated request the job runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RequestSettings {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub n: usize,
    /// Image i's seed is seed + i (every frame's, when interpolating).
    pub seed: u64,
    pub stages: Vec<StageSettings>,
    /// The image the job starts from, without its pixels.
    pub source: Option<SourceSettings>,
    pub variation: Option<VariationBody>,
    pub interpolate: Option<InterpolateBody>,
    pub preview_every: Option<usize>,
}

/// A job's image input as it runs: what is done with it, at which size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SourceSettings {
    /// `image`, `inpaint`, `upscale`, `invert` or `image_embedding`.
    pub kind: String,
    /// The size the image was resized to (`WxH`).
    pub size: String,
    pub strength: Option<f64>,
    /// The prompt an inverted image is inverted under.
    pub prompt: Option<String>,
}

impl SourceSettings {
    fn new(source: &Source) -> Self {
        let size = |p: &crate::pipeline::Picture| {
            let (w, h) = p.dimensions();
            format!("{w}x{h}")
        };
        match source {
            Source::Image { image, strength } => Self { kind: "image".into(), size: size(image), strength: Some(*strength), prompt: None },
            Source::Inpaint { image, strength, .. } => Self { kind: "inpaint".into(), size: size(image), strength: Some(*strength), prompt: None },
            Source::Upscale { image } => Self { kind: "upscale".into(), size: size(image), strength: None, prompt: None },
            Source::Invert { image, prompt } => Self { kind: "invert".into(), size: size(image), strength: None, prompt: Some(prompt.clone()) },
            Source::ImageEmbedding { image } => Self { kind: "image_embedding".into(), size: size(image), strength: None, prompt: None },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobDocument {
    pub id: Uuid,
    pub status: Status,
    /// Jobs ahead of this one (0 = next); null unless queued.
    pub queue_position: Option<usize>,
    pub progress: Option<ProgressDoc>,
    /// The latest preview while the job runs (requests with `preview_every`).
    pub preview: Option<PreviewDoc>,
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
            preview: job.progress.as_ref().and_then(|p| p.preview.as_ref()).filter(|_| job.status == JobStatus::Running).map(Into::into),
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
                        clip_guidance_scale: s.clip_guidance_scale,
                        classifier_guidance_scale: s.classifier_guidance_scale,
                        layout_guidance_scale: s.layout_guidance_scale,
                        strength: s.strength,
                    })
                    .collect(),
                source: r.source.as_ref().map(SourceSettings::new),
                variation: match r.noise {
                    NoiseMix::Variation { seed, strength } => Some(VariationBody { seed, strength }),
                    _ => None,
                },
                interpolate: match &r.noise {
                    NoiseMix::Interpolation { seed, prompt } => Some(InterpolateBody { seed: *seed, prompt: prompt.clone() }),
                    _ => None,
                },
                preview_every: r.preview_every,
            },
        }
    }
}
