//! The generate request as clients send it (`POST /generate`, `PUT /jobs/{id}`)
//! and its conversion into the pipeline's `RequestSpec`, plus the sync result.
//!
//! Raw vs validated (TGI's `router/src/validation.rs`): this type has optional
//! fields and rejects unknown ones; it never reaches the queue. `to_spec`
//! resolves what only the API knows (`size` → how many stages run, the server's
//! image limit) and `pipeline::plan` checks the rest against the cascade.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::source::{noise_mix, InterpolateBody, SourceBody, VariationBody};
use crate::api::errors::ApiError;
use crate::diffusion::SamplerKind;
use crate::pipeline::stage::{StageKind, StageLimits};
use crate::pipeline::{CascadeInfo, ImageFormat, Output, PictureLimits, RequestSpec, StageOverride};

/// A sampler, by its API name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
pub enum Sampler {
    #[serde(rename = "ddpm")]
    Ddpm,
    #[serde(rename = "ddim")]
    Ddim,
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
}

impl From<Sampler> for SamplerKind {
    fn from(s: Sampler) -> Self {
        match s {
            Sampler::Ddpm => Self::Ddpm,
            Sampler::Ddim => Self::Ddim,
            Sampler::DpmSolverPlusPlus => Self::DpmSolverPlusPlus,
        }
    }
}

/// Settings for one stage, overriding the request-wide ones and the stage's defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StageOverrideBody {
    /// Index of the stage in the cascade (0 = base, or an unCLIP cascade's
    /// prior; see `GET /info`).
    pub stage: usize,
    pub sampler: Option<Sampler>,
    #[schema(minimum = 1)]
    pub steps: Option<usize>,
    #[schema(minimum = 0.0, maximum = 50.0)]
    pub guidance_scale: Option<f32>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub eta: Option<f64>,
    /// Noise augmentation of the conditioning image (super-resolution stages only).
    #[schema(minimum = 0)]
    pub noise_level: Option<i64>,
    /// Super-resolution stages only: start from the previous stage's output,
    /// upsampled and noised to this share of the schedule (1: from pure
    /// noise; the stage runs that share of its steps). It must leave at
    /// least one step to run.
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub strength: Option<f64>,
}

/// A generation request. Unset fields take the cascade's defaults (`GET /info`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    /// What to draw.
    #[schema(example = "a red circle on top of a blue square", max_length = 4000)]
    pub prompt: String,
    /// What to steer away from (replaces the empty prompt in classifier-free guidance).
    #[schema(max_length = 4000)]
    pub negative_prompt: Option<String>,
    /// Images to generate (default 1).
    #[schema(minimum = 1, maximum = 8)]
    pub n: Option<usize>,
    /// Output size `WxH`: one of the sizes the cascade's stages produce. It picks
    /// how many stages run (the base stage's size stops after the base stage).
    #[schema(example = "64x64")]
    pub size: Option<String>,
    /// Image i uses seed + i; random when unset.
    pub seed: Option<u64>,
    /// Every stage's sampler unless overridden.
    pub sampler: Option<Sampler>,
    /// DDIM's η for every stage unless overridden.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub eta: Option<f64>,
    /// The base stage's steps (an unCLIP cascade's decoder's: its prior is
    /// set through `stage_overrides` of stage 0).
    #[schema(minimum = 1)]
    pub steps: Option<usize>,
    /// The base stage's classifier-free guidance scale (an unCLIP cascade's
    /// decoder's).
    #[schema(minimum = 0.0, maximum = 50.0)]
    pub guidance_scale: Option<f32>,
    /// GLIDE's CLIP guidance of the base stage: each step moves along the
    /// gradient of a noised CLIP's image-text similarity, at this scale (0 or
    /// unset: none). Needs a cascade with a CLIP whose image size is the base
    /// stage's (`clip_guidance` in `GET /info`); an unCLIP cascade refuses it.
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub clip_guidance_scale: Option<f32>,
    /// ADM's classifier guidance of the base stage: each step moves along
    /// the gradient of log p(prompt | x_t), the cascade's noised CLIP
    /// classifying the noisy image among the prompt and its contrasts (the
    /// prompt with a colour, shape, count or relation changed, its
    /// attributes swapped, and single shapes), at this scale (0 or unset:
    /// none). Needs the same CLIP as `clip_guidance_scale` (an unCLIP cascade
    /// refuses it); the two may be combined, with each other and with
    /// classifier-free guidance.
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub classifier_guidance_scale: Option<f32>,
    /// Layout guidance of the base stage (an unCLIP cascade's decoder): the
    /// early steps move along the gradient of the UNet's own cross-attention
    /// so that each single thing the prompt names is drawn in one place, a
    /// counted group ("three stars") in as many places as it counts, things
    /// are kept apart, and a stated relation ("a red circle above a blue
    /// square") holds, at this scale (0: none; unset: the cascade's default,
    /// that stage's `layout_guidance_scale` in `GET /info`). Prompts with
    /// nothing to lay out (one group of no stated size, say "stars") are not
    /// guided.
    #[schema(minimum = 0.0, maximum = 1000.0)]
    pub layout_guidance_scale: Option<f32>,
    /// Run only the first k stages (an alternative to `size`; with both, `size`
    /// must be what stage k produces).
    #[schema(minimum = 1)]
    pub stages: Option<usize>,
    /// Per-stage settings, by stage index; a later entry for the same stage wins.
    #[serde(default)]
    pub stage_overrides: Vec<StageOverrideBody>,
    /// Start from an image: edit it, inpaint it, upscale it or invert it; on an
    /// unCLIP cascade, draw variations of it from its CLIP embedding (the only kind there).
    pub source: Option<SourceBody>,
    /// Variations of `seed` (not with `interpolate`, nor with an `invert` source).
    /// On an unCLIP cascade the prior's and the decoder's noise are both mixed.
    pub variation: Option<VariationBody>,
    /// Frames between two seeds and prompts (not with `variation`, nor with an `invert` source).
    /// On an unCLIP cascade the caption's CLIP embedding is slerped between the prompts.
    pub interpolate: Option<InterpolateBody>,
    /// Send x̂₀ as a preview every k steps of each stage (SSE `preview` events,
    /// the job's `preview`).
    #[schema(minimum = 1)]
    pub preview_every: Option<usize>,
    /// The finished images' file format (png when unset).
    pub output_format: Option<OutputFormat>,
    /// JPEG quality, 0–100 (100 when unset); png and (lossless) webp ignore it.
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u8>,
}

/// A finished image's file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl From<OutputFormat> for ImageFormat {
    fn from(f: OutputFormat) -> Self {
        match f {
            OutputFormat::Png => Self::Png,
            OutputFormat::Jpeg => Self::Jpeg,
            OutputFormat::Webp => Self::Webp,
        }
    }
}

/// `(height, width)` as the API writes sizes: `WxH`.
pub fn format_size((h, w): (i64, i64)) -> String {
    format!("{w}x{h}")
}

fn parse_size(s: &str) -> Option<(i64, i64)> {
    let (w, h) = s.trim().split_once(['x', 'X'])?;
    Some((h.trim().parse().ok()?, w.trim().parse().ok()?))
}

impl GenerateBody {
    /// The pipeline's view of this request, with what only the API checks done:
    /// `n` against the server's limit, `size` against the cascade's stage sizes.
    pub fn to_spec(&self, info: &CascadeInfo, max_images: usize) -> Result<RequestSpec, ApiError> {
        let n = self.n.unwrap_or(1);
        if !(1..=max_images).contains(&n) {
            return Err(ApiError::invalid("n", format!("{n} is outside 1..={max_images}")));
        }
        let stages = match (&self.size, self.stages) {
            (None, stages) => stages,
            (Some(size), stages) => {
                let k = stages_for_size(size, info)?;
                if stages.is_some_and(|s| s != k) {
                    return Err(ApiError::invalid("stages", format!("size {size} is produced by stage {k}, not {}", stages.unwrap_or(k))));
                }
                Some(k)
            }
        };
        Ok(RequestSpec {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            n,
            seed: self.seed,
            sampler: self.sampler.map(Into::into),
            eta: self.eta,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            clip_guidance_scale: self.clip_guidance_scale,
            classifier_guidance_scale: self.classifier_guidance_scale,
            layout_guidance_scale: self.layout_guidance_scale,
            stage_overrides: self
                .stage_overrides
                .iter()
                .map(|o| {
                    let over = StageOverride {
                        sampler: o.sampler.map(Into::into),
                        steps: o.steps,
                        guidance_scale: o.guidance_scale,
                        eta: o.eta,
                        noise_level: o.noise_level,
                        strength: o.strength,
                    };
                    (o.stage, over)
                })
                .collect(),
            stages,
            source: self.source.as_ref().map(|s| s.to_spec(&PictureLimits::default())).transpose()?,
            noise: noise_mix(self.variation.as_ref(), self.interpolate.as_ref())?,
            preview_every: self.preview_every,
            output: Output { format: self.output_format.map(Into::into).unwrap_or_default(), compression: self.output_compression },
        })
    }
}

/// How many stages run to produce `size`; a 422 listing the sizes otherwise.
fn stages_for_size(size: &str, info: &CascadeInfo) -> Result<usize, ApiError> {
    let wanted = parse_size(size);
    // A prior's output is an embedding, not an image: no size stops there.
    let images = |l: &StageLimits| l.kind != StageKind::Prior;
    match info.stages.iter().position(|(limits, _)| images(limits) && Some(limits.size) == wanted) {
        Some(i) => Ok(i + 1),
        None => {
            let allowed: Vec<String> = info.stages.iter().filter(|(l, _)| images(l)).map(|(l, _)| format_size(l.size)).collect();
            Err(ApiError::invalid("size", format!("`{size}` is not one of {} (WxH)", allowed.join(", "))))
        }
    }
}

/// One image of a sync result.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResultImage {
    pub index: usize,
    pub seed: u64,
    /// The PNG, base64 (standard alphabet, padded).
    pub b64_json: String,
}

/// Where a sync job's time went, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    /// Creation to start.
    pub queue_ms: i64,
    /// Start to completion.
    pub compute_ms: i64,
}

/// The body of a successful sync `POST /generate`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateResult {
    pub id: uuid::Uuid,
    pub images: Vec<ResultImage>,
    pub timings: Timings,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_width_by_height() {
        assert_eq!(parse_size("64x32"), Some((32, 64)));
        assert_eq!(parse_size(" 8X8 "), Some((8, 8)));
        assert_eq!(parse_size("64"), None);
        assert_eq!(parse_size("ax1"), None);
        assert_eq!(format_size((32, 64)), "64x32");
    }
}
