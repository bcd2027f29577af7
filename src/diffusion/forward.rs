//! The forward (noising) process and the three parameterisations of the model output.
//!
//! DDPM (Ho et al. 2020) eq. 4: q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), sampled in
//! closed form — no chain of T steps. "Progressive Distillation" (Salimans & Ho
//! 2022) for v = √ᾱ ε − √(1−ᾱ) x_0. Conversions follow diffusers' schedulers
//! term by term (float32 scalars, same operation order) for parity.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::error::{DiffusionError, Result};
use super::schedule::NoiseSchedule;

/// What the network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise ε (DDPM's L_simple).
    Epsilon,
    /// The clean sample x_0.
    Sample,
    /// The velocity v = √ᾱ ε − √(1−ᾱ) x_0.
    VPrediction,
}

/// √ᾱ_t and √(1 − ᾱ_t) for one timestep, in float32 as diffusers computes them.
#[derive(Debug, Clone, Copy)]
pub struct NoiseLevel {
    pub sqrt_alpha_bar: f32,
    pub sqrt_one_minus_alpha_bar: f32,
}

impl NoiseLevel {
    pub fn new(alpha_bar: f32) -> Self {
        Self { sqrt_alpha_bar: alpha_bar.sqrt(), sqrt_one_minus_alpha_bar: (1.0 - alpha_bar).sqrt() }
    }
}

/// (x̂_0, ε̂) from a model output at noise level `level`.
pub fn to_x0_and_eps(kind: PredictionType, output: &Tensor, sample: &Tensor, level: NoiseLevel) -> (Tensor, Tensor) {
    let (a, b) = (level.sqrt_alpha_bar as f64, level.sqrt_one_minus_alpha_bar as f64);
    match kind {
        PredictionType::Epsilon => ((sample - output * b) / a, output.shallow_clone()),
        PredictionType::Sample => (output.shallow_clone(), (sample - output * a) / b),
        PredictionType::VPrediction => (sample * a - output * b, output * a + sample * b),
    }
}

/// ε̂ implied by x_t and a (possibly clipped) x̂_0: ε = (x_t − √ᾱ x_0) / √(1−ᾱ).
pub fn eps_from_x0(x0: &Tensor, sample: &Tensor, level: NoiseLevel) -> Tensor {
    (sample - x0 * level.sqrt_alpha_bar as f64) / level.sqrt_one_minus_alpha_bar as f64
}

/// x̂_0 implied by x_t and ε̂: x_0 = (x_t − √(1−ᾱ) ε) / √ᾱ.
pub fn x0_from_eps(eps: &Tensor, sample: &Tensor, level: NoiseLevel) -> Tensor {
    (sample - eps * level.sqrt_one_minus_alpha_bar as f64) / level.sqrt_alpha_bar as f64
}

/// The model output of `kind` whose ε̂ at x_t is `eps` (the inverse of
/// [`to_x0_and_eps`]): lets a correction made in ε (classifier or CLIP
/// guidance) reach a sampler in the parameterisation it expects.
pub fn output_from_eps(kind: PredictionType, eps: &Tensor, sample: &Tensor, level: NoiseLevel) -> Tensor {
    match kind {
        PredictionType::Epsilon => eps.shallow_clone(),
        PredictionType::Sample => x0_from_eps(eps, sample, level),
        PredictionType::VPrediction => {
            let x0 = x0_from_eps(eps, sample, level);
            eps * level.sqrt_alpha_bar as f64 - x0 * level.sqrt_one_minus_alpha_bar as f64
        }
    }
}

/// Per-sample coefficients as a [B, 1, …, 1] tensor broadcasting against `like`.
pub fn per_sample(values: &[f32], like: &Tensor) -> Tensor {
    let mut shape = vec![values.len() as i64];
    shape.extend(std::iter::repeat_n(1, like.dim().saturating_sub(1)));
    Tensor::from_slice(values).to_device(like.device()).to_kind(like.kind()).view(shape.as_slice())
}

fn levels(schedule: &NoiseSchedule, timesteps: &[i64], batch: i64) -> Result<(Vec<f32>, Vec<f32>)> {
    if timesteps.len() as i64 != batch {
        return Err(DiffusionError::invalid("timesteps", format!("{} timesteps for a batch of {batch}", timesteps.len())));
    }
    if let Some(t) = timesteps.iter().find(|&&t| t < 0 || t as usize >= schedule.len()) {
        return Err(DiffusionError::invalid("timesteps", format!("{t} is outside 0..{}", schedule.len())));
    }
    Ok(timesteps
        .iter()
        .map(|&t| {
            let l = NoiseLevel::new(schedule.alpha_bar(t));
            (l.sqrt_alpha_bar, l.sqrt_one_minus_alpha_bar)
        })
        .unzip())
}

/// x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, one timestep per sample (diffusers' `add_noise`).
pub fn q_sample(schedule: &NoiseSchedule, x0: &Tensor, timesteps: &[i64], noise: &Tensor) -> Result<Tensor> {
    let (a, b) = levels(schedule, timesteps, x0.size()[0])?;
    Ok(x0 * per_sample(&a, x0) + noise * per_sample(&b, x0))
}

/// The v-prediction target √ᾱ_t ε − √(1 − ᾱ_t) x_0, one timestep per sample.
pub fn velocity(schedule: &NoiseSchedule, x0: &Tensor, timesteps: &[i64], noise: &Tensor) -> Result<Tensor> {
    let (a, b) = levels(schedule, timesteps, x0.size()[0])?;
    Ok(noise * per_sample(&a, x0) - x0 * per_sample(&b, x0))
}

/// The training target for `kind` (ε, x_0 or v).
pub fn target(kind: PredictionType, schedule: &NoiseSchedule, x0: &Tensor, timesteps: &[i64], noise: &Tensor) -> Result<Tensor> {
    match kind {
        PredictionType::Epsilon => Ok(noise.shallow_clone()),
        PredictionType::Sample => Ok(x0.shallow_clone()),
        PredictionType::VPrediction => velocity(schedule, x0, timesteps, noise),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedule::BetaSchedule;
    use tch::{Device, Kind};

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn conversions_recover_x0_and_eps_for_every_parameterisation() {
        let s = NoiseSchedule::new(BetaSchedule::SquaredCosCapV2, 1000, 1e-4, 0.02).unwrap();
        tch::manual_seed(0);
        let x0 = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu)).clamp(-1.0, 1.0);
        let eps = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        for t in [0i64, 10, 500, 900] {
            let ts = [t, t];
            let xt = q_sample(&s, &x0, &ts, &eps).unwrap();
            let level = NoiseLevel::new(s.alpha_bar(t));
            for kind in [PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction] {
                let out = target(kind, &s, &x0, &ts, &eps).unwrap();
                let (x0_hat, eps_hat) = to_x0_and_eps(kind, &out, &xt, level);
                // Dividing by √ᾱ (ε) or √(1−ᾱ) (x_0) amplifies rounding at the schedule's ends.
                let tol = 1e-5 / level.sqrt_alpha_bar.min(level.sqrt_one_minus_alpha_bar) as f64;
                assert!(max_abs(&x0_hat, &x0) < tol, "{kind:?} x0 at t={t}");
                assert!(max_abs(&eps_hat, &eps) < tol, "{kind:?} eps at t={t}");
            }
        }
    }

    #[test]
    fn an_output_rebuilt_from_its_eps_is_the_output() {
        let s = NoiseSchedule::new(BetaSchedule::SquaredCosCapV2, 1000, 1e-4, 0.02).unwrap();
        tch::manual_seed(1);
        let x = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        let out = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu));
        for t in [10i64, 500, 900] {
            let level = NoiseLevel::new(s.alpha_bar(t));
            for kind in [PredictionType::Epsilon, PredictionType::Sample, PredictionType::VPrediction] {
                let (_, eps) = to_x0_and_eps(kind, &out, &x, level);
                let back = output_from_eps(kind, &eps, &x, level);
                let tol = 1e-5 / level.sqrt_alpha_bar.min(level.sqrt_one_minus_alpha_bar) as f64;
                assert!(max_abs(&back, &out) < tol, "{kind:?} at t={t}");
            }
        }
    }

    #[test]
    fn q_sample_rejects_bad_timesteps() {
        let s = NoiseSchedule::new(BetaSchedule::Linear, 10, 1e-4, 0.02).unwrap();
        let x = Tensor::zeros([2, 1], (Kind::Float, Device::Cpu));
        assert!(q_sample(&s, &x, &[0], &x).is_err());
        assert!(q_sample(&s, &x, &[0, 10], &x).is_err());
    }
}
