//! The sampler trait every reverse process implements, and the per-stage
//! [`Scheduler`] that builds samplers from a diffusers config.
//!
//! A sampler holds one job's state (its timestep list, position and, for
//! multistep solvers, history), so jobs at different steps can share one batched
//! model call while each advances its own sampler (step-level batching).

use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::config::{ResolvedConfig, SchedulerConfig};
use super::ddim::Ddim;
use super::ddpm::Ddpm;
use super::dpm_solver::DpmSolverPlusPlus;
use super::error::{DiffusionError, Result};
use super::inversion::Inverter;
use super::noise::BatchNoise;
use super::schedule::NoiseSchedule;
use super::spacing::{check_custom, ddpm_timesteps, dpm_timesteps};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SamplerKind {
    /// Ancestral sampling (DDPM), any variance type.
    #[serde(rename = "ddpm")]
    Ddpm,
    /// DDIM with η ∈ [0, 1].
    #[serde(rename = "ddim")]
    Ddim,
    /// DPM-Solver++ (2M), multistep, data prediction.
    #[serde(rename = "dpmsolver++", alias = "dpm++2m", alias = "dpm_solver_pp")]
    DpmSolverPlusPlus,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 3] = [Self::Ddpm, Self::Ddim, Self::DpmSolverPlusPlus];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::DpmSolverPlusPlus => "dpmsolver++",
        }
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = DiffusionError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ddpm" => Ok(Self::Ddpm),
            "ddim" => Ok(Self::Ddim),
            "dpmsolver++" | "dpm++2m" | "dpm_solver_pp" => Ok(Self::DpmSolverPlusPlus),
            _ => Err(DiffusionError::invalid("sampler", format!("`{s}` is not one of ddpm, ddim, dpmsolver++"))),
        }
    }
}

/// What a request chooses about sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplerOptions {
    pub kind: SamplerKind,
    /// S, the number of steps; ignored when `timesteps` is given.
    pub steps: usize,
    /// An explicit, strictly descending list of training timesteps.
    pub timesteps: Option<Vec<i64>>,
    /// DDIM's η: 0 is deterministic, 1 has DDPM's posterior variance.
    pub eta: f64,
    /// DDIM: derive ε̂ from the clipped or thresholded x̂_0 (GLIDE's choice,
    /// diffusers' `use_clipped_model_output`), see [`super::ddim`].
    #[serde(default)]
    pub clipped_model_output: bool,
}

impl SamplerOptions {
    pub fn new(kind: SamplerKind, steps: usize) -> Self {
        Self { kind, steps, timesteps: None, eta: 0.0, clipped_model_output: false }
    }
}

/// One reverse step's result.
pub struct StepOutput {
    pub prev_sample: Tensor,
    /// x̂_0 after clipping or thresholding: what a preview would show.
    pub pred_original: Tensor,
}

/// A reverse process in progress for one batch of images.
pub trait Sampler: Send {
    fn kind(&self) -> SamplerKind;
    /// The training timesteps visited, descending.
    fn timesteps(&self) -> &[i64];
    /// How many steps have been taken (counting any skipped by [`Sampler::begin_at`]).
    fn step_index(&self) -> usize;
    /// Starts at step `index` of the full list, as diffusers' `set_begin_index`
    /// does for image-to-image: the earlier steps are skipped, the rest keep the
    /// spacing and neighbours they have in the full list. Only before the first step.
    fn begin_at(&mut self, index: usize);
    /// One step in working precision (see [`working_precision`]); callers use
    /// [`Sampler::step`], which converts in and out.
    fn advance(&mut self, model_output: &Tensor, sample: &Tensor, noise: &mut BatchNoise) -> Result<StepOutput>;

    /// Takes one step from `sample` at [`Sampler::current_timestep`]. `model_output`
    /// is the (guided) output for `sample`, with C or 2·C channels, in any
    /// precision; the result has the sample's dtype.
    fn step(&mut self, model_output: &Tensor, sample: &Tensor, noise: &mut BatchNoise) -> Result<StepOutput> {
        let out = self.advance(&working_precision(model_output), &working_precision(sample), noise)?;
        let kind = sample.kind();
        Ok(StepOutput { prev_sample: out.prev_sample.to_kind(kind), pred_original: out.pred_original.to_kind(kind) })
    }

    /// The timestep the model must be evaluated at next, or None when done.
    fn current_timestep(&self) -> Option<i64> {
        self.timesteps().get(self.step_index()).copied()
    }

    fn is_done(&self) -> bool {
        self.step_index() >= self.timesteps().len()
    }
}

/// A stage's scheduler config and its noise schedule, shared by all its jobs.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    schedule: Arc<NoiseSchedule>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let native = config.native_kind().unwrap_or(SamplerKind::Ddpm);
        let schedule = Arc::new(NoiseSchedule::from_config(&config.resolve(native)?)?);
        Ok(Self { config, schedule })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn schedule(&self) -> &Arc<NoiseSchedule> {
        &self.schedule
    }

    /// The timesteps `options` would visit, without building a sampler.
    pub fn timesteps(&self, options: &SamplerOptions) -> Result<Vec<i64>> {
        let resolved = self.config.resolve(options.kind)?;
        self.timesteps_for(&resolved, options)
    }

    fn timesteps_for(&self, resolved: &ResolvedConfig, options: &SamplerOptions) -> Result<Vec<i64>> {
        let n = self.schedule.len();
        if let Some(custom) = &options.timesteps {
            check_custom(custom, n)?;
            return Ok(custom.clone());
        }
        let (spacing, offset) = (resolved.timestep_spacing, resolved.steps_offset);
        let ts = match options.kind {
            SamplerKind::DpmSolverPlusPlus => dpm_timesteps(spacing, n, options.steps, offset)?,
            _ => ddpm_timesteps(spacing, n, options.steps, offset)?,
        };
        check_custom(&ts, n).map_err(|_| {
            DiffusionError::invalid("steps_offset", format!("{offset} moves timesteps outside 0..{n} or merges them"))
        })?;
        Ok(ts)
    }

    /// DDIM inversion over the timesteps DDIM sampling with `options` visits,
    /// ending where that sampler starts (see [`Inverter`]).
    pub fn inverter(&self, options: &SamplerOptions) -> Result<Inverter> {
        let resolved = self.config.resolve(SamplerKind::Ddim)?;
        let timesteps = self.timesteps_for(&resolved, &SamplerOptions { kind: SamplerKind::Ddim, ..options.clone() })?;
        let final_alpha_bar = if resolved.set_alpha_to_one { 1.0 } else { self.schedule.alpha_bar(0) };
        Ok(Inverter::new(Arc::clone(&self.schedule), &timesteps, resolved.prediction_type, final_alpha_bar))
    }

    /// A fresh sampler for one job.
    pub fn sampler(&self, options: &SamplerOptions) -> Result<Box<dyn Sampler>> {
        self.build(options, false)
    }

    /// A sampler that uses x̂_0 as the model gives it (no clipping or
    /// thresholding), so that it retraces a DDIM inversion: clipping is not
    /// invertible, and the inversion ([`Scheduler::inverter`]) never clips.
    pub fn exact_sampler(&self, options: &SamplerOptions) -> Result<Box<dyn Sampler>> {
        self.build(options, true)
    }

    fn build(&self, options: &SamplerOptions, exact: bool) -> Result<Box<dyn Sampler>> {
        if !(0.0..=1.0).contains(&options.eta) {
            return Err(DiffusionError::invalid("eta", format!("must be in [0, 1], got {}", options.eta)));
        }
        let mut resolved = self.config.resolve(options.kind)?;
        if exact {
            resolved.x0 = super::threshold::X0Treatment::None;
        }
        let timesteps = self.timesteps_for(&resolved, options)?;
        let schedule = Arc::clone(&self.schedule);
        Ok(match options.kind {
            SamplerKind::Ddpm => Box::new(Ddpm::new(schedule, &resolved, timesteps)),
            SamplerKind::Ddim => {
                let mut ddim = Ddim::new(schedule, &resolved, timesteps, options.eta);
                ddim.use_clipped_model_output = options.clipped_model_output;
                Box::new(ddim)
            }
            SamplerKind::DpmSolverPlusPlus => Box::new(DpmSolverPlusPlus::new(schedule, &resolved, timesteps)),
        })
    }
}

/// The precision a step computes in: float32, or float64 if given float64.
///
/// Models may run in float16/bfloat16 on a GPU, but the sampler's arithmetic
/// divides by √ᾱ_t (tiny at the start of a cosine schedule) and accumulates over
/// many steps: half precision overflows or drifts there, so steps upcast (as
/// diffusers' DPM-Solver does) and return the sample's own dtype.
fn working_precision(t: &Tensor) -> Tensor {
    match t.kind() {
        tch::Kind::Double => t.shallow_clone(),
        _ => t.to_kind(tch::Kind::Float),
    }
}

/// Splits a model output into (prediction, variance channels) for a `channels`-channel sample.
pub(crate) fn split_output(output: &Tensor, channels: i64) -> Result<(Tensor, Option<Tensor>)> {
    let c = output.size()[1];
    if c == channels {
        Ok((output.shallow_clone(), None))
    } else if c == 2 * channels {
        Ok((output.narrow(1, 0, channels), Some(output.narrow(1, channels, channels))))
    } else {
        Err(DiffusionError::invalid("model_output", format!("{c} channels for a {channels}-channel sample")))
    }
}

/// A timestep list and the position in it, shared by every sampler.
#[derive(Debug, Clone)]
pub(crate) struct Cursor {
    pub timesteps: Vec<i64>,
    pub index: usize,
}

impl Cursor {
    pub fn new(timesteps: Vec<i64>) -> Self {
        Self { timesteps, index: 0 }
    }

    pub fn begin_at(&mut self, index: usize) {
        debug_assert_eq!(self.index, 0, "begin_at after the first step");
        self.index = index.min(self.timesteps.len());
    }

    /// (t, the next timestep or −1 after the last), or an error when finished.
    pub fn current(&self) -> Result<(i64, i64)> {
        let t = *self.timesteps.get(self.index).ok_or(DiffusionError::Finished(self.timesteps.len()))?;
        Ok((t, self.timesteps.get(self.index + 1).copied().unwrap_or(-1)))
    }
}
