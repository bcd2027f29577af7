//! What a caller asks for (`RequestSpec`, every setting optional) and what the
//! pipeline runs (`GenerationRequest`, every setting resolved against the
//! cascade's defaults and checked against its limits).
//!
//! The command line and the HTTP API both fill a `RequestSpec`; only a
//! `GenerationRequest` reaches the models. Each validation error names the
//! field and the allowed range.

use serde::{Deserialize, Serialize};

use super::error::{PipelineError, Result};
use super::stage::StageLimits;
use crate::diffusion::{SamplerKind, SamplerOptions};

/// The most images one request may ask for.
pub const MAX_IMAGES: usize = 16;
/// Classifier-free guidance scales beyond this only saturate images.
pub const MAX_GUIDANCE: f32 = 50.0;
/// Longer prompts are truncated by the tokenizer anyway; this bounds memory.
pub const MAX_PROMPT_CHARS: usize = 4000;

/// Per-stage overrides, by stage index.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageOverride {
    pub sampler: Option<SamplerKind>,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f32>,
    pub eta: Option<f64>,
    pub noise_level: Option<i64>,
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
    /// Overrides for stage i (index into the cascade's stages).
    pub stage_overrides: Vec<(usize, StageOverride)>,
    /// Run only the first k stages (1 = a fast base-resolution preview).
    pub stages: Option<usize>,
}

/// One stage as it will run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    pub index: usize,
    pub name: String,
    pub sampler: SamplerOptions,
    pub guidance_scale: f32,
    pub noise_level: Option<i64>,
}

/// A validated request (persisted with its job, so it can be run again after a restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub n: usize,
    pub seed: u64,
    pub stages: Vec<StagePlan>,
}

impl GenerationRequest {
    /// Image i's seed.
    pub fn image_seed(&self, i: usize) -> u64 {
        self.seed.wrapping_add(i as u64)
    }

    /// Image i's noise stream at stage `stage`: the image seed itself at the
    /// base stage, and a SplitMix64-mixed derivative at later stages so that no
    /// two stages replay the same stream.
    pub fn stream_seed(&self, i: usize, stage: usize) -> u64 {
        let seed = self.image_seed(i);
        if stage == 0 {
            return seed;
        }
        let mut z = seed ^ (stage as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn check_range<T: PartialOrd + std::fmt::Display + Copy>(field: &str, v: T, lo: T, hi: T) -> Result<T> {
    if v >= lo && v <= hi {
        Ok(v)
    } else {
        Err(PipelineError::invalid(field, format!("{v} is outside {lo}..={hi}")))
    }
}

/// Resolves `spec` against the cascade's stages (their limits and defaults).
pub fn plan(spec: &RequestSpec, stages: &[StageLimits]) -> Result<GenerationRequest> {
    if spec.prompt.trim().is_empty() {
        return Err(PipelineError::invalid("prompt", "must not be empty"));
    }
    for (field, text) in [("prompt", Some(&spec.prompt)), ("negative_prompt", spec.negative_prompt.as_ref())] {
        if text.is_some_and(|t| t.chars().count() > MAX_PROMPT_CHARS) {
            return Err(PipelineError::invalid(field, format!("longer than {MAX_PROMPT_CHARS} characters")));
        }
    }
    let n = check_range("n", spec.n, 1, MAX_IMAGES)?;
    let count = check_range("stages", spec.stages.unwrap_or(stages.len()), 1, stages.len())?;
    if let Some((i, _)) = spec.stage_overrides.iter().find(|(i, _)| *i >= stages.len()) {
        return Err(PipelineError::invalid("stage_overrides", format!("stage {i} does not exist (the cascade has {})", stages.len())));
    }
    let seed = spec.seed.unwrap_or_else(rand::random);
    let mut plans = Vec::with_capacity(count);
    for (index, stage) in stages.iter().take(count).enumerate() {
        let over = spec.stage_overrides.iter().rev().find(|(i, _)| *i == index).map(|(_, o)| o.clone()).unwrap_or_default();
        let is_base = index == 0;
        let d = &stage.defaults;
        let field = |name: &str| if is_base { name.to_owned() } else { format!("stages[{index}].{name}") };
        let train_steps = stage.train_steps;
        let steps = check_range(&field("steps"), over.steps.or(spec.steps.filter(|_| is_base)).unwrap_or(d.steps), 1, train_steps)?;
        let guidance = over.guidance_scale.or(spec.guidance_scale.filter(|_| is_base)).unwrap_or(d.guidance_scale);
        if !guidance.is_finite() {
            return Err(PipelineError::invalid(&field("guidance_scale"), "must be a finite number"));
        }
        let guidance_scale = check_range(&field("guidance_scale"), guidance, 0.0, MAX_GUIDANCE)?;
        let eta = over.eta.or(spec.eta).unwrap_or(d.eta);
        if !eta.is_finite() {
            return Err(PipelineError::invalid(&field("eta"), "must be a finite number"));
        }
        let eta = check_range(&field("eta"), eta, 0.0, 1.0)?;
        let kind = over.sampler.or(spec.sampler).unwrap_or(d.sampler);
        let noise_level = match (d.noise_level, over.noise_level) {
            (None, Some(_)) => return Err(PipelineError::invalid(&field("noise_level"), "only super-resolution stages take a noise level")),
            (None, None) => None,
            (Some(default), level) => {
                Some(check_range(&field("noise_level"), level.unwrap_or(default), 0, stage.max_noise_level)?)
            }
        };
        let sampler = SamplerOptions { kind, steps, timesteps: None, eta };
        // Some spacings cannot produce every step count; find out now, not mid-run.
        stage.scheduler.timesteps(&sampler).map_err(|e| PipelineError::invalid(&field("steps"), e.to_string()))?;
        plans.push(StagePlan { index, name: stage.name.clone(), sampler, guidance_scale, noise_level });
    }
    Ok(GenerationRequest { prompt: spec.prompt.clone(), negative_prompt: spec.negative_prompt.clone(), n, seed, stages: plans })
}
