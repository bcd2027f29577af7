//! What `/health`, `/ready` and `/info` return: liveness, readiness, and the
//! loaded cascade with everything a client needs to build a valid request —
//! stage sizes (the allowed `size` values), defaults and limits.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::pipeline::stage::{size_label, StageKind};
use crate::api::state::ApiConfig;
use crate::diffusion::SamplerKind;
use crate::pipeline::request::{MAX_GUIDANCE, MAX_PROMPT_CHARS};
use crate::pipeline::{CascadeInfo, MAX_CLASSIFIER_GUIDANCE, MAX_CLIP_GUIDANCE, MAX_LAYOUT_GUIDANCE};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StatusDoc {
    /// `ok` (health) or `ready`.
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EncoderDoc {
    /// `bert` or `t5`.
    pub kind: String,
    pub hidden_size: i64,
    /// Longer prompts are truncated to this many tokens.
    pub max_length: usize,
}

/// A stage's settings when a request leaves them unset.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StageDefaultsDoc {
    pub sampler: String,
    pub steps: usize,
    pub guidance_scale: f32,
    pub eta: f64,
    /// DDIM derives ε̂ from the clipped or thresholded x̂_0 on this stage.
    pub use_clipped_model_output: bool,
    pub noise_level: Option<i64>,
    /// Layout guidance of prompts that name things or a spatial relation
    /// (base stage; 0: none).
    pub layout_guidance_scale: f32,
    /// Super-resolution stages: the share of the schedule run from the
    /// previous stage's upsampled output (1: from pure noise).
    pub strength: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StageDoc {
    pub index: usize,
    pub name: String,
    /// `base` or `super_resolution`.
    pub kind: String,
    /// Output size, `WxH`: a request with this `size` stops after this
    /// stage. An unCLIP prior's is its embedding's width (`256-d CLIP
    /// embedding`); no request stops there.
    pub size: String,
    pub parameters: i64,
    /// The most steps a request may ask of this stage.
    pub max_steps: usize,
    /// The largest `noise_level` (super-resolution stages; 0 otherwise).
    pub max_noise_level: i64,
    pub defaults: StageDefaultsDoc,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LimitsDoc {
    pub max_images: usize,
    pub max_guidance_scale: f32,
    pub max_clip_guidance_scale: f32,
    pub max_classifier_guidance_scale: f32,
    pub max_layout_guidance_scale: f32,
    pub max_prompt_chars: usize,
    pub max_body_bytes: usize,
    /// The sizes requests may ask for, `WxH`, smallest first.
    pub sizes: Vec<String>,
    pub samplers: Vec<String>,
}

/// Whether requests may ask for `clip_guidance_scale` (GLIDE's CLIP guidance
/// of the base stage) and `classifier_guidance_scale` (ADM's classifier
/// guidance, the same CLIP as the classifier).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClipGuidanceDoc {
    /// The cascade has a noised CLIP that reads the base stage's images.
    pub available: bool,
    /// The side of the images the CLIP reads (absent without a CLIP).
    pub image_size: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InfoDocument {
    /// The cascade's name.
    pub name: String,
    pub description: Option<String>,
    /// Where the models run, e.g. `cpu` or `cuda:0`.
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub precision: String,
    pub encoder: EncoderDoc,
    pub stages: Vec<StageDoc>,
    pub limits: LimitsDoc,
    pub clip_guidance: ClipGuidanceDoc,
    /// The server's version.
    pub version: String,
}

impl InfoDocument {
    pub fn new(info: &CascadeInfo, config: &ApiConfig) -> Self {
        let stages: Vec<StageDoc> = info
            .stages
            .iter()
            .enumerate()
            .map(|(index, (l, parameters))| StageDoc {
                index,
                name: l.name.clone(),
                kind: l.kind.name().into(),
                size: size_label(l.kind, l.size),
                parameters: *parameters,
                max_steps: l.train_steps,
                max_noise_level: l.max_noise_level,
                defaults: StageDefaultsDoc {
                    sampler: l.defaults.sampler.name().to_owned(),
                    steps: l.defaults.steps,
                    guidance_scale: l.defaults.guidance_scale,
                    eta: l.defaults.eta,
                    use_clipped_model_output: l.defaults.clipped_model_output,
                    noise_level: l.defaults.noise_level,
                    layout_guidance_scale: l.defaults.layout_guidance_scale,
                    strength: l.defaults.strength,
                },
            })
            .collect();
        Self {
            name: info.name.clone(),
            description: info.description.clone(),
            device: info.device.clone(),
            precision: info.precision.clone(),
            encoder: EncoderDoc { kind: info.encoder_kind.clone(), hidden_size: info.encoder_hidden_size, max_length: info.encoder_max_length },
            limits: LimitsDoc {
                max_images: config.max_images,
                max_guidance_scale: MAX_GUIDANCE,
                max_clip_guidance_scale: MAX_CLIP_GUIDANCE,
                max_classifier_guidance_scale: MAX_CLASSIFIER_GUIDANCE,
                max_layout_guidance_scale: MAX_LAYOUT_GUIDANCE,
                max_prompt_chars: MAX_PROMPT_CHARS,
                max_body_bytes: config.max_body_bytes,
                sizes: stages.iter().filter(|s| s.kind != StageKind::Prior.name()).map(|s| s.size.clone()).collect(),
                samplers: SamplerKind::ALL.iter().map(|k| k.name().to_owned()).collect(),
            },
            clip_guidance: clip_guidance(info),
            stages,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// CLIP guidance guides the base stage, and only a CLIP of its size can.
fn clip_guidance(info: &CascadeInfo) -> ClipGuidanceDoc {
    let base = info.stages.first().map(|(l, _)| l);
    let image_size = base.and_then(|l| l.clip_image_size);
    let available = base.is_some_and(|l| l.clip_image_size.is_some_and(|s| (s, s) == l.size));
    ClipGuidanceDoc { available, image_size }
}
