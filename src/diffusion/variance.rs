//! The variance of each reverse step p(x_{t−1} | x_t) = N(μ, σ²).
//!
//! DDPM §3.2: σ² = β̃_t ("fixed_small", the posterior variance) or β_t
//! ("fixed_large"); ADM ("Improved DDPM" §3.1, "Diffusion Models Beat GANs"):
//! learned interpolation in the log domain, log σ² = v·log β_t + (1 − v)·log β̃_t,
//! with v ∈ [−1, 1] from the model's extra output channels mapped to [0, 1].
//! β and β̃ here are those of the (possibly respaced) step t → prev, as ADM's
//! `space_timesteps` recomputes them.

use serde::{Deserialize, Serialize};
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    FixedSmall,
    /// β̃ computed in the log domain; the same σ as `fixed_small`.
    FixedSmallLog,
    FixedLarge,
    /// β computed in the log domain; the same σ as `fixed_large`. (diffusers takes
    /// the square root of log β here and produces NaN; we do not follow it.)
    FixedLargeLog,
    /// ADM's learned range; the model outputs 2·C channels.
    LearnedRange,
}

impl VarianceType {
    /// Whether the model's second half of channels carries v.
    pub fn is_learned(self) -> bool {
        self == Self::LearnedRange
    }
}

/// ᾱ-derived quantities of one step t → prev, float32 like diffusers.
#[derive(Debug, Clone, Copy)]
pub struct StepCoefficients {
    pub alpha_bar: f32,
    pub alpha_bar_prev: f32,
    /// β of the respaced step: 1 − ᾱ_t / ᾱ_prev.
    pub beta: f32,
}

impl StepCoefficients {
    pub fn new(alpha_bar: f32, alpha_bar_prev: f32) -> Self {
        Self { alpha_bar, alpha_bar_prev, beta: 1.0 - alpha_bar / alpha_bar_prev }
    }

    /// β̃ = (1 − ᾱ_prev)/(1 − ᾱ_t) · β, floored at 1e-20 so its log is finite.
    pub fn posterior_variance(&self) -> f32 {
        ((1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar) * self.beta).max(1e-20)
    }

    /// σ·noise for one step: the term DDPM adds to the posterior mean.
    pub fn noise_term(&self, kind: VarianceType, v: Option<&Tensor>, noise: &Tensor) -> Tensor {
        match kind {
            VarianceType::FixedSmall => noise * self.posterior_variance().sqrt() as f64,
            VarianceType::FixedSmallLog => noise * (0.5 * self.posterior_variance().ln()).exp() as f64,
            VarianceType::FixedLarge => noise * self.beta.sqrt() as f64,
            VarianceType::FixedLargeLog => noise * (0.5 * self.beta.ln()).exp() as f64,
            VarianceType::LearnedRange => {
                let v = v.expect("learned_range steps are given the variance channels");
                let (min_log, max_log) = (self.posterior_variance().ln() as f64, self.beta.ln() as f64);
                let frac = (v + 1.0) / 2.0;
                // 1 − frac written as (−frac) + 1: the same IEEE result.
                let log_var: Tensor = &frac * max_log + (-&frac + 1.0) * min_log;
                (log_var * 0.5).exp() * noise
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn log_forms_equal_their_plain_forms_and_learned_range_spans_them() {
        let c = StepCoefficients::new(0.5, 0.6);
        let noise = Tensor::ones([1, 1, 2, 2], (Kind::Float, Device::Cpu));
        let val = |k, v: Option<&Tensor>| c.noise_term(k, v, &noise).double_value(&[0, 0, 0, 0]);
        let small = val(VarianceType::FixedSmall, None);
        let large = val(VarianceType::FixedLarge, None);
        assert!((val(VarianceType::FixedSmallLog, None) - small).abs() < 1e-6);
        assert!((val(VarianceType::FixedLargeLog, None) - large).abs() < 1e-6);
        assert!(small < large);
        let lo = noise.full_like(-1.0);
        let hi = noise.full_like(1.0);
        assert!((val(VarianceType::LearnedRange, Some(&lo)) - small).abs() < 1e-6);
        assert!((val(VarianceType::LearnedRange, Some(&hi)) - large).abs() < 1e-6);
    }
}
