//! What a caller asks for (`RequestSpec`, every setting optional) and what the
//! pipeline runs (`GenerationRequest`, every setting resolved against the
//! cascade's defaults and checked against its limits).
//!
//! The command line and the HTTP API both fill a `RequestSpec`; only a
//! `GenerationRequest` reaches the models. Each validation error names the
//! field and the allowed range.

use serde::{Deserialize, Serialize};

use super::classifier_guidance::{self, MAX_CLASSIFIER_GUIDANCE};
use super::clip_guidance::{self, MAX_CLIP_GUIDANCE};
use super::layout_guidance::{self, MAX_LAYOUT_GUIDANCE};
use super::error::{PipelineError, Result};
use super::format::Output;
use super::source::{check_aspect, first_step, NoiseMix, Source, SourceSpec};
use super::stage::{StageKind, StageLimits};
use crate::diffusion::{SamplerKind, SamplerOptions};

/// The most images one request may ask for.
pub const MAX_IMAGES: usize = 16;
/// Classifier-free guidance scales beyond this only saturate images.
pub const MAX_GUIDANCE: f32 = 50.0;
/// Longer prompts are truncated by the tokenizer anyway; this bounds memory.
pub const MAX_PROMPT_CHARS: usize = 4000;
/// SDEdit's default strength (`IFImg2ImgPipeline`'s).
pub const DEFAULT_IMAGE_STRENGTH: f64 = 0.7;
/// Inpainting's default strength (`IFInpaintingPipeline`'s): the mask starts from noise.
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;

/// Per-stage overrides, by stage index.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageOverride {
    pub sampler: Option<SamplerKind>,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f32>,
    pub eta: Option<f64>,
    pub noise_level: Option<i64>,
    /// Super-resolution stages: the share of the schedule run from the
    /// previous stage's upsampled output (1: from pure noise).
    pub strength: Option<f64>,
}

/// A request as given: anything unset takes the cascade's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestSpec {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub n: usize,
    /// Image i uses seed + i; a random seed when unset.
    pub seed: Option<u64>,
    /// Every stage's sampler and η unless a stage override says otherwise.
    pub sampler: Option<SamplerKind>,
    pub eta: Option<f64>,
    /// The base stage's steps and guidance (the knobs users turn most).
    pub steps: Option<usize>,
    pub guidance_scale: Option<f32>,
    /// GLIDE's CLIP guidance of the base stage (0 or unset: none); needs a
    /// cascade with a noised CLIP.
    pub clip_guidance_scale: Option<f32>,
    /// ADM's classifier guidance of the base stage, the noised CLIP as the
    /// classifier (0 or unset: none); needs a cascade with a noised CLIP.
    pub classifier_guidance_scale: Option<f32>,
    /// Layout guidance of the base stage (unset: the stage's default; 0: none).
    pub layout_guidance_scale: Option<f32>,
    /// Overrides for stage i (index into the cascade's stages).
    pub stage_overrides: Vec<(usize, StageOverride)>,
    /// Run only the first k stages (1 = a fast base-resolution preview).
    pub stages: Option<usize>,
    /// An image to start from (edit, inpaint, upscale, invert).
    pub source: Option<SourceSpec>,
    /// How the initial noise is mixed (variations, interpolation).
    pub noise: NoiseMix,
    /// Report x̂_0 every k steps while the job runs.
    pub preview_every: Option<usize>,
    /// The finished images' file format.
    pub output: Output,
}

/// One stage as it will run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    pub index: usize,
    pub name: String,
    pub sampler: SamplerOptions,
    pub guidance_scale: f32,
    pub noise_level: Option<i64>,
    /// CLIP guidance (base stage only; 0: none). Absent from requests stored
    /// before it existed, which read as 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub clip_guidance_scale: f32,
    /// Classifier guidance (base stage only; 0: none), likewise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub classifier_guidance_scale: f32,
    /// Layout guidance (base stage only; 0: none), likewise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub layout_guidance_scale: f32,
    /// Super-resolution stages: the share of the schedule run from the
    /// previous stage's upsampled output (1, from pure noise, for the base
    /// stage, under inpainting, and for requests stored before it existed).
    #[serde(default = "full_strength", skip_serializing_if = "is_full_strength")]
    pub strength: f64,
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

fn full_strength() -> f64 {
    1.0
}

fn is_full_strength(v: &f64) -> bool {
    *v == 1.0
}

/// A validated request (persisted with its job, so it can be run again after a restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub n: usize,
    pub seed: u64,
    pub stages: Vec<StagePlan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(default, skip_serializing_if = "is_unmixed")]
    pub noise: NoiseMix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_every: Option<usize>,
    #[serde(default, skip_serializing_if = "Output::is_default")]
    pub output: Output,
}

fn is_unmixed(noise: &NoiseMix) -> bool {
    *noise == NoiseMix::Seeds
}

impl GenerationRequest {
    /// Image i's seed: seed + i, except that the frames of an interpolation all
    /// start from the request's seed (their noise differs only by the mix).
    pub fn image_seed(&self, i: usize) -> u64 {
        match self.noise {
            NoiseMix::Interpolation { .. } => self.seed,
            _ => self.seed.wrapping_add(i as u64),
        }
    }

    /// The seed of image i's second latent, when its noise is mixed.
    pub fn target_seed(&self, i: usize) -> Option<u64> {
        match self.noise {
            NoiseMix::Seeds => None,
            NoiseMix::Variation { seed, .. } => Some(seed.wrapping_add(i as u64)),
            NoiseMix::Interpolation { seed, .. } => Some(seed),
        }
    }

    /// Each image's weight toward its second latent (and, interpolating, the
    /// second prompt): 0 for every image when unmixed.
    pub fn mix_weights(&self) -> Vec<f64> {
        (0..self.n).map(|i| self.noise.weight(i, self.n).unwrap_or(0.0)).collect()
    }

    /// Every prompt whose tokens the job needs (the empty prompt's are cached).
    pub fn prompts(&self) -> Vec<&str> {
        let mut out = vec![self.prompt.as_str()];
        out.extend(self.negative_prompt.as_deref());
        if let NoiseMix::Interpolation { prompt: Some(p), .. } = &self.noise {
            out.push(p);
        }
        if let Some(Source::Invert { prompt, .. }) = &self.source {
            out.push(prompt);
        }
        out.retain(|p| !p.is_empty());
        out
    }

    /// The denoising steps stage k of this request runs (SDEdit skips some,
    /// inversion doubles them, a super-resolution stage below full strength
    /// skips the noisiest).
    pub fn stage_steps(&self, k: usize, timesteps: usize) -> usize {
        match (&self.source, k) {
            (Some(Source::Image { strength, .. } | Source::Inpaint { strength, .. }), 0) => timesteps - first_step(timesteps, *strength),
            (Some(Source::Invert { .. }), 0) => 2 * timesteps,
            _ => timesteps - first_step(timesteps, self.stages.get(k).map_or(1.0, |plan| plan.strength)),
        }
    }

    /// Image i's noise stream at stage `stage`: the image seed itself at the
    /// base stage, and a SplitMix64-mixed derivative at later stages so that no
    /// two stages replay the same stream.
    pub fn stream_seed(&self, i: usize, stage: usize) -> u64 {
        stage_stream(self.image_seed(i), stage)
    }
}

/// The noise stream an image seeded `seed` draws from at stage `stage`.
pub fn stage_stream(seed: u64, stage: usize) -> u64 {
    if stage == 0 {
        return seed;
    }
    let mut z = seed ^ (stage as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn check_range<T: PartialOrd + std::fmt::Display + Copy>(field: &str, v: T, lo: T, hi: T) -> Result<T> {
    if v >= lo && v <= hi {
        Ok(v)
    } else {
        Err(PipelineError::invalid(field, format!("{v} is outside {lo}..={hi}")))
    }
}

/// A share of a schedule in (0, 1]: an image-to-image or a super-resolution strength.
fn check_strength(field: &str, strength: f64) -> Result<f64> {
    if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
        return Err(PipelineError::invalid(field, format!("{strength} is outside (0, 1]")));
    }
    Ok(strength)
}

/// `strength` of a stage's `steps` timesteps must leave at least one step to run.
fn check_runs_a_step(field: &str, strength: f64, steps: usize) -> Result<()> {
    if first_step(steps, strength) == steps {
        return Err(PipelineError::invalid(field, format!("{strength} of {steps} steps runs no step: raise the strength or the steps")));
    }
    Ok(())
}

/// A guidance scale by the cascade's noised CLIP (`field`, at most `max`;
/// CLIP or classifier guidance), checked against the CLIP
/// (`stages[0].clip_image_size`) and the stages that run (from `first`).
fn check_clip_guidance(field: &str, scale: Option<f32>, max: f32, spec: &RequestSpec, stages: &[StageLimits], first: usize) -> Result<f32> {
    let scale = scale.unwrap_or(0.0);
    if !scale.is_finite() {
        return Err(PipelineError::invalid(field, "must be a finite number"));
    }
    let scale = check_range(field, scale, 0.0, max)?;
    if scale == 0.0 {
        return Ok(0.0);
    }
    let base = &stages[0];
    let (h, w) = base.size;
    match base.clip_image_size {
        None => return Err(PipelineError::invalid(field, "this cascade has no noised CLIP (its manifest names no `clip`); use 0")),
        Some(s) if (s, s) != base.size => {
            return Err(PipelineError::invalid(field, format!("the cascade's CLIP reads {s}x{s} images but the base stage makes {w}x{h}; use 0")))
        }
        Some(_) => {}
    }
    if first > 0 {
        return Err(PipelineError::invalid(field, "guides the base stage, which an upscale does not run"));
    }
    if spec.prompt.trim().is_empty() {
        return Err(PipelineError::invalid(field, "needs a prompt to guide towards"));
    }
    Ok(scale)
}

/// The request's layout guidance scale (the default of the stage that draws
/// the image, `stages[image_base]`, when unset), 0 when that stage does not
/// run or the prompt has no layout to guide.
fn check_layout_guidance(spec: &RequestSpec, stages: &[StageLimits], first: usize, image_base: usize) -> Result<f32> {
    let field = layout_guidance::FIELD;
    // A prompt without a readable layout is not guided, and its plan says so.
    let guided = first <= image_base && super::prompt_layout::read(&spec.prompt).is_some_and(|l| l.guided());
    let Some(scale) = spec.layout_guidance_scale else {
        return Ok(if guided { stages[image_base].defaults.layout_guidance_scale } else { 0.0 });
    };
    if !scale.is_finite() {
        return Err(PipelineError::invalid(field, "must be a finite number"));
    }
    let scale = check_range(field, scale, 0.0, MAX_LAYOUT_GUIDANCE)?;
    if scale > 0.0 && first > image_base {
        return Err(PipelineError::invalid(field, "guides the base stage, which an upscale does not run"));
    }
    Ok(if guided { scale } else { 0.0 })
}

/// What an unCLIP cascade (a prior, then its decoder) does not take: it
/// draws every image from a CLIP image embedding (the prior's, or a source
/// image's), so no other source image has a stage to start from, and the
/// CLIP and classifier guides, which read the base stage's samples through
/// the CLIP's text, have none to guide (layout guidance guides the decoder;
/// a noise mix mixes the prior's and the decoder's noise). It runs at least
/// the prior and the decoder.
fn check_unclip(spec: &RequestSpec, count: usize) -> Result<()> {
    const WHY: &str = "is not available on an unCLIP cascade (a prior, then a decoder)";
    if count < 2 {
        return Err(PipelineError::invalid("stages", "an unCLIP cascade runs at least its prior and its decoder (2 stages)"));
    }
    match spec.source {
        None | Some(SourceSpec::ImageEmbedding { .. }) => {}
        Some(_) => {
            return Err(PipelineError::invalid(
                "source",
                "an unCLIP cascade draws from a CLIP image embedding: its only source kind is `image_embedding`",
            ))
        }
    }
    for (field, scale) in [(clip_guidance::FIELD, spec.clip_guidance_scale), (classifier_guidance::FIELD, spec.classifier_guidance_scale)] {
        if scale.is_some_and(|s| s != 0.0) {
            return Err(PipelineError::invalid(field, WHY));
        }
    }
    Ok(())
}

/// The stage whose output a picture of `(w, h)` already is, if any.
fn stage_of_size(stages: &[StageLimits], (w, h): (u32, u32)) -> Option<usize> {
    stages.iter().position(|s| s.size == (i64::from(h), i64::from(w)))
}

/// Resolves `spec` against the cascade's stages (their limits and defaults).
pub fn plan(spec: &RequestSpec, stages: &[StageLimits]) -> Result<GenerationRequest> {
    // An image gives the model something to draw without words (unconditional
    // SDEdit, upscaling); from noise alone the prompt is all there is.
    if spec.prompt.trim().is_empty() && spec.source.is_none() {
        return Err(PipelineError::invalid("prompt", "must not be empty"));
    }
    let extra_prompts = [
        ("negative_prompt", spec.negative_prompt.as_ref()),
        ("interpolate.prompt", match &spec.noise {
            NoiseMix::Interpolation { prompt, .. } => prompt.as_ref(),
            _ => None,
        }),
        ("source.prompt", match &spec.source {
            Some(SourceSpec::Invert { prompt, .. }) => prompt.as_ref(),
            _ => None,
        }),
    ];
    for (field, text) in std::iter::once(("prompt", Some(&spec.prompt))).chain(extra_prompts) {
        if text.is_some_and(|t| t.chars().count() > MAX_PROMPT_CHARS) {
            return Err(PipelineError::invalid(field, format!("longer than {MAX_PROMPT_CHARS} characters")));
        }
    }
    let n = check_range("n", spec.n, 1, MAX_IMAGES)?;
    let count = check_range("stages", spec.stages.unwrap_or(stages.len()), 1, stages.len())?;
    if let Some((i, _)) = spec.stage_overrides.iter().find(|(i, _)| *i >= stages.len()) {
        return Err(PipelineError::invalid("stage_overrides", format!("stage {i} does not exist (the cascade has {})", stages.len())));
    }
    // unCLIP: the prior is stage 0 and the decoder, which draws the image
    // from noise, plays the base stage (the request's top-level `steps`,
    // `guidance_scale`, `sampler` and `eta` are its).
    let unclip = stages.first().is_some_and(|s| s.kind == StageKind::Prior);
    if unclip {
        check_unclip(spec, count)?;
    } else if matches!(spec.source, Some(SourceSpec::ImageEmbedding { .. })) {
        return Err(PipelineError::invalid("source", "`image_embedding` needs an unCLIP cascade (a prior, then a decoder)"));
    }
    let image_base = usize::from(unclip);
    let output = stages[count - 1].size;
    // Upscaling starts after the stage whose output the picture is (else after the base stage).
    let first = match &spec.source {
        Some(SourceSpec::Upscale { image }) => {
            check_aspect("source.image", image.dimensions(), output)?;
            let after = stage_of_size(stages, image.dimensions()).unwrap_or(0) + 1;
            if after >= count {
                let (h, w) = output;
                return Err(PipelineError::invalid(
                    "source.image",
                    format!("is {}x{}; upscaling to {w}x{h} leaves no super-resolution stage to run", image.dimensions().0, image.dimensions().1),
                ));
            }
            after
        }
        // The image's embedding takes the place of the prior's sample.
        Some(SourceSpec::ImageEmbedding { .. }) => 1,
        _ => 0,
    };
    let inverting = matches!(spec.source, Some(SourceSpec::Invert { .. }));
    let inpainting = matches!(spec.source, Some(SourceSpec::Inpaint { .. }));
    match &spec.noise {
        NoiseMix::Seeds => {}
        NoiseMix::Variation { strength, .. } => {
            if !strength.is_finite() || !(0.0..=1.0).contains(strength) {
                return Err(PipelineError::invalid("variation.strength", format!("{strength} is outside 0..=1")));
            }
            if inverting {
                return Err(PipelineError::invalid("variation", "an inverted image has no noise to vary"));
            }
        }
        NoiseMix::Interpolation { .. } => {
            if n < 2 {
                return Err(PipelineError::invalid("n", "an interpolation needs at least 2 frames"));
            }
            if inverting {
                return Err(PipelineError::invalid("interpolate", "an inverted image has no noise to interpolate"));
            }
        }
    }
    if spec.output.compression.is_some_and(|c| c > 100) {
        return Err(PipelineError::invalid("output_compression", "is outside 0..=100"));
    }
    if spec.preview_every == Some(0) {
        return Err(PipelineError::invalid("preview_every", "must be at least 1"));
    }
    let strength = match &spec.source {
        Some(SourceSpec::Image { strength, .. }) => Some(check_strength("source.strength", strength.unwrap_or(DEFAULT_IMAGE_STRENGTH))?),
        Some(SourceSpec::Inpaint { strength, .. }) => Some(check_strength("source.strength", strength.unwrap_or(DEFAULT_INPAINT_STRENGTH))?),
        _ => None,
    };
    let clip_guidance_scale = check_clip_guidance(clip_guidance::FIELD, spec.clip_guidance_scale, MAX_CLIP_GUIDANCE, spec, stages, first)?;
    let classifier_guidance_scale =
        check_clip_guidance(classifier_guidance::FIELD, spec.classifier_guidance_scale, MAX_CLASSIFIER_GUIDANCE, spec, stages, first)?;
    let layout_guidance_scale = check_layout_guidance(spec, stages, first, image_base)?;
    let seed = spec.seed.unwrap_or_else(rand::random);
    let mut plans = Vec::with_capacity(count);
    for (index, stage) in stages.iter().enumerate().take(count).skip(first) {
        let over = spec.stage_overrides.iter().rev().find(|(i, _)| *i == index).map(|(_, o)| o.clone()).unwrap_or_default();
        let is_base = index == image_base;
        let prior = stage.kind == StageKind::Prior;
        // The request-wide sampler settings are the image stages'.
        let (spec_sampler, spec_eta) = if prior { (None, None) } else { (spec.sampler, spec.eta) };
        let d = &stage.defaults;
        let field = |name: &str| if is_base { name.to_owned() } else { format!("stages[{index}].{name}") };
        let train_steps = stage.train_steps;
        let steps = check_range(&field("steps"), over.steps.or(spec.steps.filter(|_| is_base)).unwrap_or(d.steps), 1, train_steps)?;
        let guidance = over.guidance_scale.or(spec.guidance_scale.filter(|_| is_base)).unwrap_or(d.guidance_scale);
        if !guidance.is_finite() {
            return Err(PipelineError::invalid(&field("guidance_scale"), "must be a finite number"));
        }
        let guidance_scale = check_range(&field("guidance_scale"), guidance, 0.0, MAX_GUIDANCE)?;
        // Inversion is exact only for deterministic DDIM: it is the default there.
        let invert_here = inverting && is_base;
        let eta = over.eta.or(spec_eta).unwrap_or(if invert_here { 0.0 } else { d.eta });
        if !eta.is_finite() {
            return Err(PipelineError::invalid(&field("eta"), "must be a finite number"));
        }
        let eta = check_range(&field("eta"), eta, 0.0, 1.0)?;
        let kind = over.sampler.or(spec_sampler).unwrap_or(if invert_here { SamplerKind::Ddim } else { d.sampler });
        if invert_here && (kind != SamplerKind::Ddim || eta != 0.0) {
            return Err(PipelineError::invalid(&field("sampler"), "inverting an image needs deterministic DDIM (sampler ddim, eta 0)"));
        }
        let noise_level = match (d.noise_level, over.noise_level) {
            (None, Some(_)) => return Err(PipelineError::invalid(&field("noise_level"), "only super-resolution stages take a noise level")),
            (None, None) => None,
            (Some(default), level) => {
                Some(check_range(&field("noise_level"), level.unwrap_or(default), 0, stage.max_noise_level)?)
            }
        };
        let sampler = SamplerOptions { kind, steps, timesteps: None, eta, clipped_model_output: d.clipped_model_output };
        // Some spacings cannot produce every step count; find out now, not mid-run.
        let timesteps = stage.scheduler.timesteps(&sampler).map_err(|e| PipelineError::invalid(&field("steps"), e.to_string()))?;
        let sr_strength = match (is_base || prior, over.strength) {
            (true, None) => 1.0,
            (true, Some(_)) if prior => return Err(PipelineError::invalid(&format!("stages[{index}].strength"), "a prior samples its embedding from noise")),
            (true, Some(_)) => {
                return Err(PipelineError::invalid(&format!("stages[{index}].strength"), "the base stage starts from noise or from `source` (its strength is `source.strength`)"))
            }
            (false, s) => {
                let s = check_strength(&field("strength"), s.unwrap_or(d.strength))?;
                check_runs_a_step(&field("strength"), s, timesteps.len())?;
                // Inpainting repaints the mask from noise at every
                // super-resolution stage (`IFInpaintingSuperResolutionPipeline`).
                if inpainting {
                    1.0
                } else {
                    s
                }
            }
        };
        if let (true, Some(strength)) = (is_base, strength) {
            check_runs_a_step("source.strength", strength, timesteps.len())?;
        }
        let (clip_guidance_scale, classifier_guidance_scale, layout_guidance_scale) =
            if is_base { (clip_guidance_scale, classifier_guidance_scale, layout_guidance_scale) } else { (0.0, 0.0, 0.0) };
        plans.push(StagePlan {
            index,
            name: stage.name.clone(),
            sampler,
            guidance_scale,
            noise_level,
            clip_guidance_scale,
            classifier_guidance_scale,
            layout_guidance_scale,
            strength: sr_strength,
        });
    }
    let base_size = stages[0].size;
    let source = match &spec.source {
        None => None,
        Some(SourceSpec::Image { image, .. }) => {
            check_aspect("source.image", image.dimensions(), output)?;
            Some(Source::Image { image: image.resized(base_size), strength: strength.unwrap_or(DEFAULT_IMAGE_STRENGTH) })
        }
        Some(SourceSpec::Inpaint { image, mask, .. }) => {
            check_aspect("source.image", image.dimensions(), output)?;
            if mask.dimensions() != image.dimensions() {
                let ((mw, mh), (iw, ih)) = (mask.dimensions(), image.dimensions());
                return Err(PipelineError::invalid("source.mask", format!("is {mw}x{mh}; the image is {iw}x{ih}")));
            }
            if !mask.repaints_anything() {
                return Err(PipelineError::invalid("source.mask", "repaints nothing (white, ≥ 50% grey, marks what to repaint)"));
            }
            Some(Source::Inpaint { image: image.resized(output), mask: mask.resized(output), strength: strength.unwrap_or(DEFAULT_INPAINT_STRENGTH) })
        }
        Some(SourceSpec::Upscale { image }) => Some(Source::Upscale { image: image.resized(stages[first - 1].size) }),
        Some(SourceSpec::Invert { image, prompt }) => {
            check_aspect("source.image", image.dimensions(), output)?;
            Some(Source::Invert { image: image.resized(base_size), prompt: prompt.clone().unwrap_or_default() })
        }
        Some(SourceSpec::ImageEmbedding { image }) => {
            check_aspect("source.image", image.dimensions(), output)?;
            Some(Source::ImageEmbedding { image: image.resized(stages[image_base].size) })
        }
    };
    Ok(GenerationRequest {
        prompt: spec.prompt.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        n,
        seed,
        stages: plans,
        source,
        noise: spec.noise.clone(),
        preview_every: spec.preview_every,
        output: spec.output,
    })
}
