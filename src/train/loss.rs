//! The training objective: ADM's hybrid loss, L_simple + λ·L_vlb.
//!
//! Nichol & Dhariwal 2021 ("Improved Denoising Diffusion Probabilistic Models",
//! §3.1) learn the reverse variance as an interpolation in log space between
//! β_t and β̃_t, Σ_θ = exp(v·log β_t + (1 − v)·log β̃_t) with v ∈ [0, 1] mapped
//! from the model's extra channels in [-1, 1] ("learned range", as ADM and IF
//! use). The ε channels are trained by the plain MSE (L_simple); the variance
//! channels by the variational bound term L_t of the sampled timestep, with a
//! stop-gradient on the mean so that L_vlb does not disturb ε. L_vlb = Σ_t L_t ≈
//! T·E_t[L_t], hence the T factor next to λ = 0.001 (which makes the two terms
//! of equal weight for T = 1000, as in the reference implementation).
//! L_t is the KL between the true posterior q(x_{t-1} | x_t, x_0) and
//! p_θ(x_{t-1} | x_t) for t > 0, and the discretized Gaussian decoder's negative
//! log-likelihood of x_0 for t = 0, in bits per dimension.
//!
//! The mean channels may predict ε or v = √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho
//! 2022); L_simple is then the MSE of that target. The v error equals the ε
//! error divided by √ᾱ_t, so the v loss weighs the high-noise steps by 1/ᾱ_t
//! more than the ε loss does. That matters for pictures with large flat
//! areas: near t = T an ε model's x̂_0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ amplifies every
//! error of ε̂ by 1/√ᾱ, so a sampler's first steps commit to a random overall
//! colour (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
//! are Flawed"), while a v model predicts x̂_0 ≈ −v directly there.
//!
//! Min-SNR-γ weighting (Hang et al. 2023, "Efficient Diffusion Training via
//! Min-SNR Weighting Strategy") optionally reweighs L_simple per sample so that
//! its x_0 error is weighted by min(SNR_t, γ): the low-noise steps, where the
//! sample's fine detail is already visible and the loss is easy, stop
//! dominating the gradient, and the capacity goes to the high-noise steps that
//! decide layout and shape. With SNR = ᾱ/(1 − ᾱ), an ε loss is multiplied by
//! min(SNR, γ)/SNR and a v loss by min(SNR, γ)/(SNR + 1).
//!
//! At the noisiest steps min(SNR, γ) is SNR itself, about 0.03 at t = 900 of
//! the cosine schedule: there an x̂_0 error counts 30 to 150 times less than
//! at the middle and low-noise steps. That is where a sampler decides where
//! things go, and the only place a caption's relation ("above", "left of")
//! carries information the noisy image does not (by the middle steps the
//! objects' colours are visible in x_t, and a model can bind them without
//! reading the relation). An optional floor raises the x_0 weight to at
//! least `floor`: Salimans & Ho's truncated-SNR weighting max(SNR, 1)
//! ("Progressive Distillation for Fast Sampling of Diffusion Models", 2022, §4)
//! capped by Min-SNR's γ, so the weight is clamp(SNR, floor, γ).

use tch::{Kind, Tensor};

use crate::diffusion::forward::{per_sample, PredictionType};
use crate::diffusion::NoiseSchedule;

/// The loss of one batch and its parts (for logging).
pub struct LossTerms {
    /// What to minimise: `mse + λ·T·vlb`.
    pub total: Tensor,
    /// L_simple: mean squared error of the prediction, unweighted (what the
    /// log compares across runs, whatever their weighting).
    pub mse: Tensor,
    /// Mean L_t over the batch, bits per dimension (no gradient to ε).
    pub vlb: Tensor,
}

/// ADM's hybrid loss for ε-prediction with learned-range variance.
#[derive(Debug, Clone)]
pub struct HybridLoss {
    /// λ; 0 trains the mean only (the variance channels then get no gradient).
    pub lambda: f64,
    /// What the mean channels predict (ε or v).
    pub prediction: PredictionType,
    /// γ of Min-SNR-γ weighting; `None` weighs every sample alike.
    pub min_snr_gamma: Option<f64>,
    /// Lowest x_0 weight under Min-SNR-γ (0: plain Min-SNR).
    pub snr_floor: f64,
    coef1: Vec<f64>,
    coef2: Vec<f64>,
    /// log β̃_t, clipped at t = 0 to log β̃_1 (β̃_0 = 0), as ADM does.
    log_posterior_var: Vec<f64>,
    log_beta: Vec<f64>,
    alpha_bar: Vec<f64>,
}

/// 0.5·(1 + tanh(√(2/π)·(x + 0.044715·x³))): the approximation of the standard
/// normal CDF the reference decoder likelihood uses.
fn approx_standard_normal_cdf(x: &Tensor) -> Tensor {
    let inner = (x + x.pow_tensor_scalar(3.0) * 0.044715) * (2.0 / std::f64::consts::PI).sqrt();
    (inner.tanh() + 1.0) * 0.5
}

/// KL(N(m1, e^lv1) ‖ N(m2, e^lv2)), elementwise, in nats.
fn normal_kl(m1: &Tensor, lv1: &Tensor, m2: &Tensor, lv2: &Tensor) -> Tensor {
    ((lv2 - lv1) + (lv1 - lv2).exp() + (m1 - m2).square() * (-lv2).exp() - 1.0) * 0.5
}

/// −log p(x) for x on the 8-bit grid in [-1, 1] under N(mean, e^log_var), with
/// the two end bins extended to ±∞ (DDPM's decoder), in nats.
fn discretized_gaussian_nll(x: &Tensor, mean: &Tensor, log_var: &Tensor) -> Tensor {
    let centered = x - mean;
    let inv_std = (-log_var * 0.5).exp();
    let cdf_plus = approx_standard_normal_cdf(&((&centered + 1.0 / 255.0) * &inv_std));
    let cdf_min = approx_standard_normal_cdf(&((&centered - 1.0 / 255.0) * &inv_std));
    let log_cdf_plus = cdf_plus.clamp_min(1e-12).log();
    let log_one_minus_cdf_min = (-&cdf_min + 1.0).clamp_min(1e-12).log();
    let log_delta = (&cdf_plus - &cdf_min).clamp_min(1e-12).log();
    let inner = log_delta.where_self(&x.le(0.999), &log_one_minus_cdf_min);
    -log_cdf_plus.where_self(&x.lt(-0.999), &inner)
}

impl HybridLoss {
    pub fn new(schedule: &NoiseSchedule, lambda: f64) -> Self {
        let log_beta = schedule.betas().iter().map(|&b| (b as f64).ln()).collect();
        Self {
            lambda,
            prediction: PredictionType::Epsilon,
            min_snr_gamma: None,
            snr_floor: 0.0,
            coef1: schedule.posterior_mean_coef1(),
            coef2: schedule.posterior_mean_coef2(),
            log_posterior_var: schedule.posterior_log_variance_clipped(),
            log_beta,
            alpha_bar: schedule.alphas_cumprod().iter().map(|&a| a as f64).collect(),
        }
    }

    /// The same loss for a model whose mean channels predict `prediction`.
    pub fn with_prediction(mut self, prediction: PredictionType) -> Self {
        self.prediction = prediction;
        self
    }

    /// The same loss with Min-SNR-γ weighting of L_simple (`None`: unweighted).
    pub fn with_min_snr(mut self, gamma: Option<f64>) -> Self {
        self.min_snr_gamma = gamma;
        self
    }

    /// The same loss with the x_0 weight of Min-SNR-γ raised to at least
    /// `floor` (truncated-SNR weighting below γ; 0 leaves Min-SNR as it is).
    pub fn with_snr_floor(mut self, floor: f64) -> Self {
        self.snr_floor = floor;
        self
    }

    /// The weight of L_simple at timestep `t`: 1 without Min-SNR-γ.
    pub fn weight(&self, t: i64) -> f64 {
        let Some(gamma) = self.min_snr_gamma else { return 1.0 };
        let ab = self.alpha_bar[t as usize];
        let snr = ab / (1.0 - ab);
        let x0_weight = snr.min(gamma).max(self.snr_floor.min(gamma));
        match self.prediction {
            PredictionType::Epsilon => x0_weight / snr,
            PredictionType::VPrediction => x0_weight / (snr + 1.0),
            PredictionType::Sample => x0_weight,
        }
    }

    /// x̂_0 from the mean channels `pred` of a model output for `x_t`.
    pub fn predicted_x0(&self, pred: &Tensor, x_t: &Tensor, timesteps: &[i64]) -> Tensor {
        let ab = Self::pick(&self.alpha_bar, timesteps, x_t);
        let (a, b) = (ab.sqrt(), (-&ab + 1.0).sqrt());
        match self.prediction {
            PredictionType::Epsilon => (x_t - &b * pred) / &a,
            PredictionType::VPrediction => &a * x_t - &b * pred,
            PredictionType::Sample => pred.shallow_clone(),
        }
    }

    fn pick(values: &[f64], timesteps: &[i64], like: &Tensor) -> Tensor {
        let v: Vec<f32> = timesteps.iter().map(|&t| values[t as usize] as f32).collect();
        per_sample(&v, like)
    }

    /// `output`: the model's `[B, 2C, H, W]` (the prediction, then the
    /// variance interpolation in [-1, 1]) for `x_t`, noised from `x0` with
    /// `noise` at `timesteps`.
    pub fn compute(&self, output: &Tensor, x0: &Tensor, x_t: &Tensor, noise: &Tensor, timesteps: &[i64]) -> LossTerms {
        let c = x0.size()[1];
        let output = output.to_kind(Kind::Float);
        let pred = output.narrow(1, 0, c);
        let v = output.narrow(1, c, c);
        let ab = Self::pick(&self.alpha_bar, timesteps, x0);
        let (a, b) = (ab.sqrt(), (-&ab + 1.0).sqrt());
        let target = match self.prediction {
            PredictionType::Epsilon => noise.shallow_clone(),
            PredictionType::VPrediction => &a * noise - &b * x0,
            PredictionType::Sample => x0.shallow_clone(),
        };
        let squared = (&pred - target).square();
        let mse = squared.mean(Kind::Float);
        let simple = if self.min_snr_gamma.is_some() {
            let w: Vec<f32> = timesteps.iter().map(|&t| self.weight(t) as f32).collect();
            (squared * per_sample(&w, x0)).mean(Kind::Float)
        } else {
            mse.shallow_clone()
        };

        // The variational term sees the prediction without gradient: it trains only the variance.
        let x0_pred = self.predicted_x0(&pred.detach(), x_t, timesteps);
        let (c1, c2) = (Self::pick(&self.coef1, timesteps, x0), Self::pick(&self.coef2, timesteps, x0));
        let model_mean = &c1 * &x0_pred + &c2 * x_t;
        let true_mean = &c1 * x0 + &c2 * x_t;
        let min_log = Self::pick(&self.log_posterior_var, timesteps, x0);
        let max_log = Self::pick(&self.log_beta, timesteps, x0);
        let frac = (v + 1.0) * 0.5;
        let model_log_var = &frac * &max_log + (-&frac + 1.0) * &min_log;
        let kl = normal_kl(&true_mean, &min_log.expand_as(&model_mean), &model_mean, &model_log_var);
        let nll = discretized_gaussian_nll(x0, &model_mean, &model_log_var);
        // Per sample: the decoder term at t = 0, the KL elsewhere; mean over dims, in bits.
        let is_zero: Vec<f32> = timesteps.iter().map(|&t| if t == 0 { 1.0 } else { 0.0 }).collect();
        let is_zero = per_sample(&is_zero, x0);
        let terms = (&is_zero * nll + (-&is_zero + 1.0) * kl) / std::f64::consts::LN_2;
        let vlb = terms.mean(Kind::Float);
        let steps = self.alpha_bar.len() as f64;
        let total = &simple + &vlb * (self.lambda * steps);
        LossTerms { total, mse, vlb }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::forward::q_sample;
    use crate::diffusion::BetaSchedule;
    use tch::Device;

    fn setup() -> (NoiseSchedule, Tensor, Tensor, Vec<i64>) {
        tch::manual_seed(0);
        let schedule = NoiseSchedule::new(BetaSchedule::SquaredCosCapV2, 1000, 1e-4, 0.02).unwrap();
        let x0 = (Tensor::rand([4, 3, 8, 8], (Kind::Float, Device::Cpu)) * 2.0 - 1.0).clamp(-1.0, 1.0);
        let noise = Tensor::randn([4, 3, 8, 8], (Kind::Float, Device::Cpu));
        (schedule, x0, noise, vec![0, 10, 500, 999])
    }

    #[test]
    fn the_exact_eps_and_posterior_variance_give_zero_mse_and_kl() {
        let (schedule, x0, noise, _) = setup();
        // t > 0: the KL terms (t = 0 is the decoder's likelihood, never zero).
        let t = vec![1, 10, 500, 999];
        let x_t = q_sample(&schedule, &x0, &t, &noise).unwrap();
        let loss = HybridLoss::new(&schedule, 0.001);
        // v = -1 selects log β̃_t: exactly the true posterior.
        let output = Tensor::cat(&[&noise, &noise.full_like(-1.0)], 1);
        let terms = loss.compute(&output, &x0, &x_t, &noise, &t);
        assert!(terms.mse.double_value(&[]) < 1e-12);
        assert!(terms.vlb.double_value(&[]).abs() < 1e-4, "kl {}", terms.vlb.double_value(&[]));
        // A wrong variance costs something.
        let wrong = Tensor::cat(&[&noise, &noise.full_like(1.0)], 1);
        assert!(loss.compute(&wrong, &x0, &x_t, &noise, &t).vlb.double_value(&[]) > 1e-3);
    }

    #[test]
    fn the_exact_v_gives_zero_mse_and_kl() {
        let (schedule, x0, noise, _) = setup();
        let t = vec![1, 10, 500, 999];
        let x_t = q_sample(&schedule, &x0, &t, &noise).unwrap();
        let loss = HybridLoss::new(&schedule, 0.001).with_prediction(PredictionType::VPrediction);
        let v = crate::diffusion::forward::velocity(&schedule, &x0, &t, &noise).unwrap();
        let output = Tensor::cat(&[&v, &v.full_like(-1.0)], 1);
        let terms = loss.compute(&output, &x0, &x_t, &noise, &t);
        assert!(terms.mse.double_value(&[]) < 1e-12);
        assert!(terms.vlb.double_value(&[]).abs() < 1e-3, "kl {}", terms.vlb.double_value(&[]));
        // The exact ε is the wrong answer for a v model (except where ᾱ ≈ 1).
        let eps_output = Tensor::cat(&[&noise, &noise.full_like(-1.0)], 1);
        assert!(loss.compute(&eps_output, &x0, &x_t, &noise, &t).mse.double_value(&[]) > 0.1);
    }

    #[test]
    fn min_snr_weights_cap_the_x0_weight_at_gamma() {
        let (schedule, x0, noise, t) = setup();
        let ab = |t: usize| schedule.alphas_cumprod()[t] as f64;
        for prediction in [PredictionType::Epsilon, PredictionType::VPrediction] {
            let loss = HybridLoss::new(&schedule, 0.0).with_prediction(prediction).with_min_snr(Some(5.0));
            for &t in &[1usize, 200, 500, 900, 999] {
                let snr = ab(t) / (1.0 - ab(t));
                // An ε error is an x_0 error times √SNR, a v error one times √(SNR + 1):
                // weighted, every x_0 error counts min(SNR, 5) times.
                let per_x0 = match prediction {
                    PredictionType::Epsilon => loss.weight(t as i64) * snr,
                    _ => loss.weight(t as i64) * (snr + 1.0),
                };
                assert!((per_x0 - snr.min(5.0)).abs() < 1e-9 * snr.max(1.0), "{prediction:?} t {t}: {per_x0} vs SNR {snr}");
            }
            assert_eq!(HybridLoss::new(&schedule, 0.0).with_prediction(prediction).weight(3), 1.0);
        }
        // The weighted total is the per-sample weighted mean; the logged MSE stays unweighted.
        let x_t = q_sample(&schedule, &x0, &t, &noise).unwrap();
        let output = Tensor::cat(&[&noise.zeros_like(), &noise.full_like(-1.0)], 1);
        let plain = HybridLoss::new(&schedule, 0.0).compute(&output, &x0, &x_t, &noise, &t);
        let weighted_loss = HybridLoss::new(&schedule, 0.0).with_min_snr(Some(5.0));
        let weighted = weighted_loss.compute(&output, &x0, &x_t, &noise, &t);
        assert_eq!(weighted.mse.double_value(&[]), plain.mse.double_value(&[]));
        let per_sample_mse = noise.square().mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
        let want: f64 = t.iter().enumerate().map(|(i, &ti)| weighted_loss.weight(ti) * per_sample_mse.double_value(&[i as i64])).sum::<f64>() / 4.0;
        assert!((weighted.total.double_value(&[]) - want).abs() < 1e-5, "{} vs {want}", weighted.total.double_value(&[]));
    }

    #[test]
    fn the_snr_floor_raises_only_the_noisy_steps() {
        let (schedule, ..) = setup();
        let ab = |t: usize| schedule.alphas_cumprod()[t] as f64;
        let plain = HybridLoss::new(&schedule, 0.0).with_prediction(PredictionType::VPrediction).with_min_snr(Some(5.0));
        let floored = plain.clone().with_snr_floor(1.0);
        for t in [1usize, 100, 300, 500, 700, 900, 999] {
            let snr = ab(t) / (1.0 - ab(t));
            let per_x0 = floored.weight(t as i64) * (snr + 1.0);
            assert!((per_x0 - snr.clamp(1.0, 5.0)).abs() < 1e-9 * snr.max(1.0), "t {t}: {per_x0} vs SNR {snr}");
            if snr >= 1.0 {
                assert_eq!(floored.weight(t as i64), plain.weight(t as i64), "t {t}");
            } else {
                assert!(floored.weight(t as i64) > plain.weight(t as i64), "t {t}");
            }
        }
        // At t = 900 of the cosine schedule the floor is worth tens of times the weight.
        assert!(floored.weight(900) / plain.weight(900) > 20.0);
    }

    #[test]
    fn predicted_x0_inverts_the_forward_process() {
        let (schedule, x0, noise, t) = setup();
        let x_t = q_sample(&schedule, &x0, &t, &noise).unwrap();
        let v = crate::diffusion::forward::velocity(&schedule, &x0, &t, &noise).unwrap();
        let eps = HybridLoss::new(&schedule, 0.0).predicted_x0(&noise, &x_t, &t);
        let from_v = HybridLoss::new(&schedule, 0.0).with_prediction(PredictionType::VPrediction).predicted_x0(&v, &x_t, &t);
        // ε at t = 999 divides by √ᾱ ≈ 0.006: allow for the f32 amplification there.
        assert!((eps.narrow(0, 0, 3) - x0.narrow(0, 0, 3)).abs().max().double_value(&[]) < 1e-3);
        assert!((from_v - &x0).abs().max().double_value(&[]) < 1e-5);
    }

    #[test]
    fn the_bound_trains_only_the_variance_channels() {
        let (schedule, x0, noise, t) = setup();
        let x_t = q_sample(&schedule, &x0, &t, &noise).unwrap();
        let output = Tensor::randn([4, 6, 8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let loss = HybridLoss::new(&schedule, 0.001);
        loss.compute(&output, &x0, &x_t, &noise, &t).vlb.backward();
        let grad = output.grad();
        assert_eq!(grad.narrow(1, 0, 3).abs().max().double_value(&[]), 0.0, "no gradient to eps from L_vlb");
        assert!(grad.narrow(1, 3, 3).abs().max().double_value(&[]) > 0.0);
    }

    #[test]
    fn the_decoder_likelihood_is_a_probability_on_the_pixel_grid() {
        // A sharp Gaussian centred on a grid value puts almost all mass in its bin.
        let x = Tensor::from_slice(&[-1.0f32, 0.0, 1.0]);
        let nll = discretized_gaussian_nll(&x, &x, &x.full_like(-20.0));
        assert!(nll.max().double_value(&[]) < 1e-3);
        // A wide one (σ = e) spreads it: an interior bin gets little mass
        // (−log p ≈ 6.8), the two end bins take the tails (Φ(−0.37) ≈ 0.36 each).
        let wide = discretized_gaussian_nll(&x, &x.zeros_like(), &x.full_like(2.0));
        assert!(wide.double_value(&[1]) > 6.0, "{}", wide.double_value(&[1]));
        for end in [0, 2] {
            assert!((wide.double_value(&[end]) - 1.03).abs() < 0.05, "{}", wide.double_value(&[end]));
        }
    }
}
