//! DPM-Solver++(2M): "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
//! Probabilistic Models" (Lu et al. 2022), Algorithm 2 — the multistep
//! second-order solver of the diffusion ODE in data-prediction (x̂_0) form,
//! which stays stable with large guidance scales and thresholding.
//!
//! With λ = log(α/σ) and h = λ_t − λ_s:
//!   first order  x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) x̂_0
//!   second order adds −½ α_t (e^{−h} − 1) D1 (midpoint) or
//!                α_t ((e^{−h} − 1)/h + 1) D1 (Heun), D1 = (m0 − m1)/r0.
//! The final step goes to σ = 0 with first order; short runs (< 15 steps) use
//! first order at the end too ("lower_order_final"). Follows diffusers'
//! `DPMSolverMultistepScheduler` (algorithm "dpmsolver++", discrete timesteps).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::config::ResolvedConfig;
use super::error::Result;
use super::forward::PredictionType;
use super::noise::BatchNoise;
use super::sampler::{split_output, Cursor, Sampler, SamplerKind, StepOutput};
use super::schedule::NoiseSchedule;
use super::threshold::X0Treatment;

/// The second-order correction's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// α_t, σ_t and λ_t = log α_t − log σ_t of one point of the σ grid.
#[derive(Debug, Clone, Copy)]
struct Point {
    sigma: f32,
    alpha: f32,
    lambda: f32,
}

impl Point {
    /// From the ODE's σ = √((1 − ᾱ)/ᾱ): α = 1/√(σ² + 1), σ_t = σ α.
    fn new(sigma: f32) -> Self {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let sigma_t = sigma * alpha;
        Self { sigma: sigma_t, alpha, lambda: alpha.ln() - sigma_t.ln() }
    }
}

pub struct DpmSolverPlusPlus {
    cursor: Cursor,
    /// σ at each timestep, then 0 for the final clean sample.
    points: Vec<Point>,
    prediction: PredictionType,
    x0: X0Treatment,
    order: usize,
    solver_type: SolverType,
    /// The last two x̂_0, newest last.
    history: Vec<Tensor>,
}

impl DpmSolverPlusPlus {
    pub fn new(schedule: Arc<NoiseSchedule>, config: &ResolvedConfig, timesteps: Vec<i64>) -> Self {
        let mut points: Vec<Point> = timesteps
            .iter()
            .map(|&t| {
                let ab = schedule.alpha_bar(t);
                Point::new(((1.0 - ab) / ab).sqrt())
            })
            .collect();
        points.push(Point::new(0.0));
        Self {
            cursor: Cursor::new(timesteps),
            points,
            prediction: config.prediction_type,
            x0: config.x0,
            order: config.solver_order,
            solver_type: config.solver_type,
            history: Vec::with_capacity(2),
        }
    }

    /// The data prediction x̂_0 at the current point (thresholded).
    fn data_prediction(&self, output: &Tensor, sample: &Tensor) -> Tensor {
        let p = self.points[self.cursor.index];
        let (alpha, sigma) = (p.alpha as f64, p.sigma as f64);
        let x0 = match self.prediction {
            PredictionType::Epsilon => (sample - output * sigma) / alpha,
            PredictionType::Sample => output.shallow_clone(),
            PredictionType::VPrediction => sample * alpha - output * sigma,
        };
        self.x0.apply(&x0)
    }

    fn first_order(&self, sample: &Tensor) -> Tensor {
        let i = self.cursor.index;
        let (s, t) = (self.points[i], self.points[i + 1]);
        let h = t.lambda - s.lambda;
        let coef = t.alpha * ((-h).exp() - 1.0);
        sample * (t.sigma / s.sigma) as f64 - &self.history[self.history.len() - 1] * coef as f64
    }

    fn second_order(&self, sample: &Tensor) -> Tensor {
        let i = self.cursor.index;
        let (s1, s0, t) = (self.points[i - 1], self.points[i], self.points[i + 1]);
        let (h, h0) = (t.lambda - s0.lambda, s0.lambda - s1.lambda);
        let r0 = h0 / h;
        let (m0, m1) = (&self.history[1], &self.history[0]);
        let d1 = (m0 - m1) * (1.0 / r0) as f64;
        let coef = t.alpha * ((-h).exp() - 1.0);
        let base = sample * (t.sigma / s0.sigma) as f64 - m0 * coef as f64;
        match self.solver_type {
            SolverType::Midpoint => base - d1 * (0.5 * coef) as f64,
            SolverType::Heun => base + d1 * (t.alpha * (((-h).exp() - 1.0) / h + 1.0)) as f64,
        }
    }
}

impl Sampler for DpmSolverPlusPlus {
    fn kind(&self) -> SamplerKind {
        SamplerKind::DpmSolverPlusPlus
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

    fn advance(&mut self, model_output: &Tensor, sample: &Tensor, _noise: &mut BatchNoise) -> Result<StepOutput> {
        self.cursor.current()?;
        let (output, _) = split_output(model_output, sample.size()[1])?;
        let x0 = self.data_prediction(&output, sample);
        if self.history.len() == 2 {
            drop(self.history.remove(0));
        }
        self.history.push(x0.shallow_clone());

        // The first step has no history; the final step lands on σ = 0 and is always
        // first order (diffusers' `lower_order_final` only matters beyond order 2).
        let last = self.cursor.index + 1 == self.cursor.timesteps.len();
        let first_order = self.order == 1 || self.history.len() < 2 || last;
        let prev_sample = if first_order { self.first_order(sample) } else { self.second_order(sample) };
        self.cursor.index += 1;
        Ok(StepOutput { prev_sample, pred_original: x0 })
    }
}
