//! Ancestral sampling: "Denoising Diffusion Probabilistic Models" (Ho et al. 2020),
//! Algorithm 2, with ADM's learned-range variance ("Improved DDPM" eq. 15) and
//! strided sub-sequences of timesteps (respacing, "Improved DDPM" §4).
//!
//! x_{t−1} = μ̃(x_t, x̂_0) + σ_t z, where μ̃ is the posterior mean (eq. 7) and x̂_0
//! comes from the model output (optionally clipped or thresholded). Follows
//! diffusers' `DDPMScheduler.step` operation by operation; the one deliberate
//! difference is `fixed_large_log` (see [`VarianceType::FixedLargeLog`]).
//! Karlo's `UnCLIPScheduler` (DALL-E 2, Ramesh et al. 2022) is this sampler
//! too, with that class's float32 arithmetic kept so trajectories match it.

use std::sync::Arc;

use tch::Tensor;

use super::config::ResolvedConfig;
use super::error::{DiffusionError, Result};
use super::forward::{to_x0_and_eps, NoiseLevel, PredictionType};
use super::noise::BatchNoise;
use super::sampler::{split_output, Cursor, Sampler, SamplerKind, StepOutput};
use super::schedule::NoiseSchedule;
use super::threshold::X0Treatment;
use super::variance::{StepCoefficients, VarianceType};

pub struct Ddpm {
    schedule: Arc<NoiseSchedule>,
    cursor: Cursor,
    variance: VarianceType,
    prediction: PredictionType,
    x0: X0Treatment,
    /// `UnCLIPScheduler`'s arithmetic (see [`ResolvedConfig::unclip_arithmetic`]).
    unclip: bool,
}

impl Ddpm {
    pub fn new(schedule: Arc<NoiseSchedule>, config: &ResolvedConfig, timesteps: Vec<i64>) -> Self {
        Self {
            schedule,
            cursor: Cursor::new(timesteps),
            variance: config.variance_type.unwrap_or(VarianceType::FixedSmall),
            prediction: config.prediction_type,
            x0: config.x0,
            unclip: config.unclip_arithmetic,
        }
    }
}

impl Sampler for Ddpm {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Ddpm
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
        let (output, v) = split_output(model_output, sample.size()[1])?;
        if self.variance.is_learned() && v.is_none() {
            return Err(DiffusionError::invalid("model_output", "learned_range needs the model's variance channels"));
        }
        let mut c = StepCoefficients::new(self.schedule.alpha_bar(t), self.schedule.alpha_bar(prev));
        let (beta_prod, beta_prod_prev) = (1.0 - c.alpha_bar, 1.0 - c.alpha_bar_prev);
        let current_alpha = if self.unclip {
            if prev == t - 1 {
                c.beta = self.schedule.betas()[t as usize];
            }
            1.0 - c.beta
        } else {
            c.alpha_bar / c.alpha_bar_prev
        };

        // 1. x̂_0 from the model output, then clip or threshold it.
        let (x0, _) = to_x0_and_eps(self.prediction, &output, sample, NoiseLevel::new(c.alpha_bar));
        let x0 = self.x0.apply(&x0);

        // 2. Posterior mean μ̃_t(x_t, x̂_0) (DDPM eq. 7).
        let coef_x0 = (c.alpha_bar_prev.sqrt() * c.beta) / beta_prod;
        let coef_xt = current_alpha.sqrt() * beta_prod_prev / beta_prod;
        let mean = &x0 * coef_x0 as f64 + sample * coef_xt as f64;

        // 3. Add σ_t z, except on the last step to t = 0.
        let prev_sample = if t > 0 {
            let z = noise.draw(&sample.size(), sample.kind(), sample.device())?;
            mean + c.noise_term(self.variance, v.as_ref(), &z)
        } else {
            mean
        };
        self.cursor.index += 1;
        Ok(StepOutput { prev_sample, pred_original: x0 })
    }
}
