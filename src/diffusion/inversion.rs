//! Properties of the deterministic (η = 0) DDIM process that callers build on.
//!
//! DDIM (Song et al. 2021) §4.3 and §5.3: because the sampler is the Euler
//! discretisation of an ODE, running it forwards encodes an image into its latent
//! x_T ("DDIM inversion", as in null-text inversion and diffusers'
//! `DDIMInverseScheduler`), and latents interpolate meaningfully — spherically,
//! since Gaussian noise concentrates near a sphere (§5.3 uses slerp).

use std::sync::Arc;

use tch::{Kind, Tensor};

use super::error::{DiffusionError, Result};
use super::forward::{to_x0_and_eps, NoiseLevel, PredictionType};
use super::sampler::split_output;
use super::schedule::NoiseSchedule;

/// DDIM inversion one step at a time, for a batching worker that evaluates the
/// model for several jobs in one call: [`Inverter::current_timestep`] says where
/// the model must be evaluated on the current latent, [`Inverter::step`] takes
/// its output and moves the latent one timestep noisier.
///
/// Each step evaluates the model at the *next* (noisier) timestep on the current
/// latent — the standard first-order approximation, exact in the limit of small
/// steps. The walk starts at `final_alpha_bar`, the ᾱ the sampler ends at (1 with
/// `set_alpha_to_one`), so that sampling the result retraces the same path.
pub struct Inverter {
    schedule: Arc<NoiseSchedule>,
    prediction: PredictionType,
    /// The sampling timesteps, ascending: the order inversion visits them.
    ascending: Vec<i64>,
    index: usize,
    alpha_bar: f32,
}

impl Inverter {
    /// `timesteps` descending, the same list sampling uses.
    pub fn new(schedule: Arc<NoiseSchedule>, timesteps: &[i64], prediction: PredictionType, final_alpha_bar: f32) -> Self {
        Self { schedule, prediction, ascending: timesteps.iter().rev().copied().collect(), index: 0, alpha_bar: final_alpha_bar }
    }

    pub fn current_timestep(&self) -> Option<i64> {
        self.ascending.get(self.index).copied()
    }

    pub fn step_index(&self) -> usize {
        self.index
    }

    pub fn steps(&self) -> usize {
        self.ascending.len()
    }

    pub fn is_done(&self) -> bool {
        self.index >= self.ascending.len()
    }

    /// One step from `x` with the model's output for it (C or 2·C channels: a
    /// learned variance is ignored, DDIM has none).
    pub fn step(&mut self, output: &Tensor, x: &Tensor) -> Result<Tensor> {
        let t = self.current_timestep().ok_or(DiffusionError::Finished(self.ascending.len()))?;
        let (output, _) = split_output(output, x.size()[1])?;
        let (output, x) = (output.to_kind(Kind::Float), x.to_kind(Kind::Float));
        let (x0_hat, eps) = to_x0_and_eps(self.prediction, &output, &x, NoiseLevel::new(self.alpha_bar));
        let next = NoiseLevel::new(self.schedule.alpha_bar(t));
        self.alpha_bar = self.schedule.alpha_bar(t);
        self.index += 1;
        Ok(x0_hat * next.sqrt_alpha_bar as f64 + eps * next.sqrt_one_minus_alpha_bar as f64)
    }
}

/// Encodes `x0` into x_T by running DDIM (η = 0) forwards over `timesteps`
/// (descending, the same list sampling uses; they are visited in reverse); see
/// [`Inverter`].
pub fn ddim_invert(
    schedule: &NoiseSchedule,
    timesteps: &[i64],
    prediction: PredictionType,
    final_alpha_bar: f32,
    x0: &Tensor,
    model: &mut dyn FnMut(&Tensor, i64) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut inverter = Inverter::new(Arc::new(schedule.clone()), timesteps, prediction, final_alpha_bar);
    let mut x = x0.shallow_clone();
    while let Some(t) = inverter.current_timestep() {
        let output = model(&x, t)?;
        x = inverter.step(&output, &x)?.to_kind(x0.kind());
    }
    Ok(x)
}

/// Spherical interpolation between two noise tensors, per sample along dim 0:
/// slerp(a, b; w) = sin((1−w)θ)/sin θ · a + sin(wθ)/sin θ · b, θ the angle between
/// a and b. Falls back to linear interpolation when they are nearly parallel.
pub fn slerp(a: &Tensor, b: &Tensor, w: f64) -> Result<Tensor> {
    if a.size() != b.size() {
        return Err(DiffusionError::invalid("noise", format!("cannot interpolate {:?} and {:?}", a.size(), b.size())));
    }
    if !(0.0..=1.0).contains(&w) {
        return Err(DiffusionError::invalid("weight", format!("must be in [0, 1], got {w}")));
    }
    let shape = a.size();
    let (fa, fb) = (a.to_kind(Kind::Double).reshape([shape[0], -1]), b.to_kind(Kind::Double).reshape([shape[0], -1]));
    let cos = (&fa * &fb).sum_dim_intlist(1, true, Kind::Double)
        / (fa.norm_scalaropt_dim(2, [1], true) * fb.norm_scalaropt_dim(2, [1], true));
    let theta = cos.clamp(-1.0, 1.0).acos();
    let sin = theta.sin();
    let parallel = sin.abs().lt(1e-6);
    let safe_sin = sin.where_self(&parallel.logical_not(), &sin.ones_like());
    let wa = (&theta * (1.0 - w)).sin() / &safe_sin;
    let wb = (&theta * w).sin() / &safe_sin;
    let wa = wa.where_self(&parallel.logical_not(), &sin.full_like(1.0 - w));
    let wb = wb.where_self(&parallel.logical_not(), &sin.full_like(w));
    let out = fa * wa + fb * wb;
    Ok(out.reshape(shape.as_slice()).to_kind(a.kind()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn slerp_endpoints_and_norm() {
        tch::manual_seed(3);
        let a = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        assert!(slerp(&a, &b, 0.0).unwrap().allclose(&a, 1e-5, 1e-5, false));
        assert!(slerp(&a, &b, 1.0).unwrap().allclose(&b, 1e-5, 1e-5, false));
        // Halfway between two independent Gaussians keeps their (common) norm,
        // where linear interpolation would shrink it by about 1/√2.
        let mid = slerp(&a, &b, 0.5).unwrap();
        let norm = |t: &Tensor| t.get(0).norm().double_value(&[]);
        let (na, nm, nl) = (norm(&a), norm(&mid), norm(&((&a + &b) * 0.5)));
        assert!((nm / na - 1.0).abs() < 0.05, "slerp norm {nm} vs {na}");
        assert!(nl / na < 0.8, "lerp norm {nl} vs {na}");
    }

    #[test]
    fn slerp_of_parallel_vectors_is_linear() {
        let a = Tensor::ones([1, 4], (Kind::Float, Device::Cpu));
        let mid = slerp(&a, &(&a * 3.0), 0.5).unwrap();
        assert!(mid.allclose(&(&a * 2.0), 1e-6, 1e-6, false));
    }
}
