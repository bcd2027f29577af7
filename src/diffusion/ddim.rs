//! "Denoising Diffusion Implicit Models" (Song, Meng & Ermon 2021), eq. 12:
//!
//! x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z,
//! σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev).
//!
//! η = 0 is the deterministic implicit model; η = 1 gives DDPM's posterior
//! variance (eq. 16). Steps run over any strided sub-sequence (§4.2).
//! Follows diffusers' `DDIMScheduler.step`, with one deliberate difference: the
//! previous timestep is the next element of the list, where diffusers always
//! uses t − T/S. The two agree for leading and trailing spacing when S divides
//! T; ours is also right for linspace spacing and for explicit timestep lists,
//! which diffusers' DDIM ignores.

use std::sync::Arc;

use tch::Tensor;

use super::config::ResolvedConfig;
use super::error::Result;
use super::forward::{eps_from_x0, to_x0_and_eps, NoiseLevel, PredictionType};
use super::noise::BatchNoise;
use super::sampler::{split_output, Cursor, Sampler, SamplerKind, StepOutput};
use super::schedule::NoiseSchedule;
use super::threshold::X0Treatment;

pub struct Ddim {
    schedule: Arc<NoiseSchedule>,
    cursor: Cursor,
    eta: f32,
    prediction: PredictionType,
    x0: X0Treatment,
    /// ᾱ after the last step: 1 (a clean image) or ᾱ_0 (`set_alpha_to_one = false`).
    final_alpha_bar: f32,
    /// Recompute ε̂ from the clipped x̂_0 (diffusers' `use_clipped_model_output`).
    pub use_clipped_model_output: bool,
}

impl Ddim {
    pub fn new(schedule: Arc<NoiseSchedule>, config: &ResolvedConfig, timesteps: Vec<i64>, eta: f64) -> Self {
        let final_alpha_bar = if config.set_alpha_to_one { 1.0 } else { schedule.alpha_bar(0) };
        Self {
            schedule,
            cursor: Cursor::new(timesteps),
            eta: eta as f32,
            prediction: config.prediction_type,
            x0: config.x0,
            final_alpha_bar,
            use_clipped_model_output: false,
        }
    }

    /// σ_t of eq. 16 for this η.
    pub fn sigma(&self, alpha_bar: f32, alpha_bar_prev: f32) -> f32 {
        let variance = ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)) * (1.0 - alpha_bar / alpha_bar_prev);
        self.eta * variance.sqrt()
    }
}

impl Sampler for Ddim {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Ddim
    }

    fn timesteps(&self) -> &[i64] {
        &self.cursor.timesteps
    }

    fn step_index(&self) -> usize {
        self.cursor.index
    }

    fn begin_at(&mut self, index: usize) {
        self.cursor.begin_at(index);
    }

    fn advance(&mut self, model_output: &Tensor, sample: &Tensor, noise: &mut BatchNoise) -> Result<StepOutput> {
        let (t, prev) = self.cursor.current()?;
        // A learned variance is meaningless to DDIM: drop those channels.
        let (output, _) = split_output(model_output, sample.size()[1])?;
        let alpha_bar = self.schedule.alpha_bar(t);
        let alpha_bar_prev = if prev >= 0 { self.schedule.alpha_bar(prev) } else { self.final_alpha_bar };
        let level = NoiseLevel::new(alpha_bar);

        // 1. x̂_0 and ε̂, then clip or threshold x̂_0.
        let (x0, mut eps) = to_x0_and_eps(self.prediction, &output, sample, level);
        let x0 = self.x0.apply(&x0);
        if self.use_clipped_model_output {
            eps = eps_from_x0(&x0, sample, level);
        }

        // 2. Eq. 12: the "direction pointing to x_t" plus the predicted x_0.
        let sigma = self.sigma(alpha_bar, alpha_bar_prev);
        let direction = &eps * (1.0 - alpha_bar_prev - sigma * sigma).max(0.0).sqrt() as f64;
        let mut prev_sample = &x0 * alpha_bar_prev.sqrt() as f64 + direction;

        // 3. Random noise only when η > 0.
        if self.eta > 0.0 {
            let z = noise.draw(&sample.size(), sample.kind(), sample.device())?;
            prev_sample += z * sigma as f64;
        }
        self.cursor.index += 1;
        Ok(StepOutput { prev_sample, pred_original: x0 })
    }
}
