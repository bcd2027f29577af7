//! Noise schedules: β_t for t = 0..T and every quantity derived from it.
//!
//! Sources: DDPM (Ho et al. 2020, `linear`, and the reference code's `quad`),
//! Improved DDPM (Nichol & Dhariwal 2021, the cosine ᾱ, diffusers'
//! `squaredcos_cap_v2`), latent diffusion's `scaled_linear`, GeoDiff's `sigmoid`,
//! and "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al.
//! 2023) for zero-terminal-SNR rescaling.
//!
//! β and ᾱ are float32 and computed with the same libtorch ops, in the same order,
//! as diffusers, so that schedules match the reference bit for bit; `quadratic`
//! follows the DDPM reference code, which works in float64 throughout. Derived
//! quantities (posterior variance, posterior-mean coefficients, SNR) are float64
//! from ᾱ, as ADM's `GaussianDiffusion` computes them.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::config::ResolvedConfig;
use super::error::{DiffusionError, Result};

/// How β_t is laid out over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// β linear in t from `beta_start` to `beta_end` (DDPM).
    Linear,
    /// √β linear in t, squared, in float32 (latent diffusion; diffusers' name).
    ScaledLinear,
    /// √β linear in t, squared, in float64 (the DDPM reference code's `quad`).
    Quadratic,
    /// ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, β capped at 0.999 (Improved DDPM).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
    /// β = sigmoid(linspace(−6, 6)) rescaled to [beta_start, beta_end] (GeoDiff).
    Sigmoid,
}

/// β_t and ᾱ_t for t = 0..T, plus their derived quantities.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// The schedule a resolved scheduler config describes.
    pub fn from_config(config: &ResolvedConfig) -> Result<Self> {
        let mut schedule = match &config.trained_betas {
            Some(betas) => {
                if betas.len() != config.num_train_timesteps {
                    return Err(DiffusionError::invalid(
                        "trained_betas",
                        format!("{} values for {} timesteps", betas.len(), config.num_train_timesteps),
                    ));
                }
                Self::from_betas(betas.iter().map(|&b| b as f32).collect())?
            }
            None => Self::new(config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end)?,
        };
        if config.rescale_betas_zero_snr {
            schedule = schedule.rescaled_zero_terminal_snr()?;
        }
        Ok(schedule)
    }

    /// Builds a named schedule of `n` timesteps.
    pub fn new(kind: BetaSchedule, n: usize, beta_start: f64, beta_end: f64) -> Result<Self> {
        if n < 2 {
            return Err(DiffusionError::invalid("num_train_timesteps", format!("must be at least 2, got {n}")));
        }
        if !(0.0..1.0).contains(&beta_start) || !(0.0..1.0).contains(&beta_end) {
            return Err(DiffusionError::invalid("beta_start", "beta_start and beta_end must lie in [0, 1)"));
        }
        let cpu = (Kind::Float, Device::Cpu);
        let steps = n as i64;
        let betas = match kind {
            BetaSchedule::Linear => Tensor::linspace(beta_start, beta_end, steps, cpu),
            BetaSchedule::ScaledLinear => Tensor::linspace(beta_start.sqrt(), beta_end.sqrt(), steps, cpu).square(),
            BetaSchedule::Sigmoid => Tensor::linspace(-6.0, 6.0, steps, cpu).sigmoid() * (beta_end - beta_start) + beta_start,
            BetaSchedule::SquaredCosCapV2 => Tensor::from_slice(&cosine_betas(n)),
            BetaSchedule::Quadratic => return Ok(Self::quadratic(n, beta_start, beta_end)),
        };
        Self::from_betas(to_vec(&betas)?)
    }

    /// A schedule from explicit β values; ᾱ is their cumulative product computed
    /// by libtorch, as diffusers does.
    pub fn from_betas(betas: Vec<f32>) -> Result<Self> {
        if let Some((t, b)) = betas.iter().enumerate().find(|(_, b)| !(**b >= 0.0 && **b <= 1.0)) {
            return Err(DiffusionError::invalid("trained_betas", format!("beta[{t}] = {b} is outside [0, 1]")));
        }
        let betas_t = Tensor::from_slice(&betas);
        let alphas = betas_t.ones_like() - &betas_t;
        let alphas_cumprod = to_vec(&alphas.cumprod(0, Kind::Float))?;
        Ok(Self { betas, alphas_cumprod })
    }

    /// The DDPM reference code's `quad` schedule: float64 throughout, stored as float32.
    fn quadratic(n: usize, beta_start: f64, beta_end: f64) -> Self {
        let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
        let step = (b - a) / (n - 1) as f64;
        let betas64: Vec<f64> = (0..n).map(|i| if i == n - 1 { b } else { a + i as f64 * step }.powi(2)).collect();
        let mut cumprod = 1.0f64;
        let alphas_cumprod = betas64
            .iter()
            .map(|b| {
                cumprod *= 1.0 - b;
                cumprod as f32
            })
            .collect();
        Self { betas: betas64.iter().map(|&b| b as f32).collect(), alphas_cumprod }
    }

    /// Lin et al. 2023, Algorithm 1: shift and scale √ᾱ so that ᾱ_T = 0 while ᾱ_0 is kept.
    pub fn rescaled_zero_terminal_snr(&self) -> Result<Self> {
        let sqrt_ab = Tensor::from_slice(&self.alphas_cumprod).sqrt();
        let first = sqrt_ab.get(0).copy();
        let last = sqrt_ab.get(-1).copy();
        let shifted = (&sqrt_ab - &last) * (&first / (&first - &last));
        let ab = shifted.square();
        let n = ab.size()[0];
        let alphas = Tensor::cat(&[ab.narrow(0, 0, 1), ab.narrow(0, 1, n - 1) / ab.narrow(0, 0, n - 1)], 0);
        Self::from_betas(to_vec(&(alphas.ones_like() - &alphas))?)
    }

    /// T, the number of training timesteps.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// ᾱ_t, with ᾱ_{-1} = 1 (no noise before the first step).
    pub fn alpha_bar(&self, t: i64) -> f32 {
        if t < 0 {
            1.0
        } else {
            self.alphas_cumprod[t as usize]
        }
    }

    /// β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t), the variance of q(x_{t−1} | x_t, x_0).
    pub fn posterior_variance(&self) -> Vec<f64> {
        self.derived(|beta, ab, ab_prev| beta * (1.0 - ab_prev) / (1.0 - ab))
    }

    /// log β̃_t with β̃_0 (which is 0) replaced by β̃_1, as ADM clips it.
    pub fn posterior_log_variance_clipped(&self) -> Vec<f64> {
        let var = self.posterior_variance();
        var.iter().enumerate().map(|(t, v)| if t == 0 { var[1].ln() } else { v.ln() }).collect()
    }

    /// Coefficient of x_0 in the posterior mean μ̃_t(x_t, x_0).
    pub fn posterior_mean_coef1(&self) -> Vec<f64> {
        self.derived(|beta, ab, ab_prev| beta * ab_prev.sqrt() / (1.0 - ab))
    }

    /// Coefficient of x_t in the posterior mean μ̃_t(x_t, x_0).
    pub fn posterior_mean_coef2(&self) -> Vec<f64> {
        self.derived(|beta, ab, ab_prev| (1.0 - ab_prev) * (1.0 - beta).sqrt() / (1.0 - ab))
    }

    /// Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t).
    pub fn snr(&self) -> Vec<f64> {
        self.alphas_cumprod.iter().map(|&ab| ab as f64 / (1.0 - ab as f64)).collect()
    }

    /// Applies `f(β_t, ᾱ_t, ᾱ_{t−1})` in float64, with β_t recomputed from ᾱ so the
    /// same code serves respaced schedules (ADM's `space_timesteps`).
    fn derived(&self, f: impl Fn(f64, f64, f64) -> f64) -> Vec<f64> {
        (0..self.len())
            .map(|t| {
                let ab = self.alphas_cumprod[t] as f64;
                let ab_prev = if t == 0 { 1.0 } else { self.alphas_cumprod[t - 1] as f64 };
                f(1.0 - ab / ab_prev, ab, ab_prev)
            })
            .collect()
    }
}

/// Improved DDPM's cosine schedule: β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999), in float64.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view(-1))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_bar_decreases_and_stays_in_unit_interval() {
        for kind in [BetaSchedule::Linear, BetaSchedule::ScaledLinear, BetaSchedule::Quadratic, BetaSchedule::SquaredCosCapV2, BetaSchedule::Sigmoid] {
            let s = NoiseSchedule::new(kind, 1000, 1e-4, 0.02).unwrap();
            assert_eq!(s.len(), 1000);
            let ab = s.alphas_cumprod();
            assert!(ab.windows(2).all(|w| w[1] < w[0]), "{kind:?} is not decreasing");
            assert!(ab[0] < 1.0 && *ab.last().unwrap() > 0.0, "{kind:?}");
        }
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero_and_keeps_the_start() {
        let s = NoiseSchedule::new(BetaSchedule::Linear, 1000, 1e-4, 0.02).unwrap();
        let z = s.rescaled_zero_terminal_snr().unwrap();
        assert_eq!(*z.alphas_cumprod().last().unwrap(), 0.0);
        assert!((z.alphas_cumprod()[0] - s.alphas_cumprod()[0]).abs() < 1e-6);
        assert_eq!(*z.snr().last().unwrap(), 0.0);
    }

    #[test]
    fn posterior_variance_is_below_beta() {
        let s = NoiseSchedule::new(BetaSchedule::SquaredCosCapV2, 1000, 1e-4, 0.02).unwrap();
        let var = s.posterior_variance();
        assert_eq!(var[0], 0.0);
        for (i, pair) in s.alphas_cumprod().windows(2).enumerate() {
            let t = i + 1;
            let beta = 1.0 - pair[1] as f64 / pair[0] as f64;
            assert!(var[t] > 0.0 && var[t] <= beta + 1e-12, "t={t}");
        }
    }

    #[test]
    fn bad_betas_are_rejected() {
        assert!(NoiseSchedule::from_betas(vec![0.1, 1.5]).is_err());
        assert!(NoiseSchedule::new(BetaSchedule::Linear, 1, 1e-4, 0.02).is_err());
    }
}
