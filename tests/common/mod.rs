//! Shared by the integration tests: the dummy denoiser mirrored from
//! `scripts/gen_fixtures.py`, a guided sampling loop, and fixture loading.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use diffusiond::diffusion::guidance::classifier_free;
use diffusiond::diffusion::{BatchNoise, Result, Sampler};
use tch::Tensor;

/// eps(x, t, c) = tanh((0.5 + t/1000)·x)·0.8 + cos(3x)·0.1c, and optionally the
/// variance channels v = tanh(0.3x + t/1000 − 0.5). Element-wise only, so an
/// image's output never depends on its batch. Must equal `dummy_model` in
/// scripts/gen_fixtures.py operation for operation.
pub fn dummy_model(x: &Tensor, t: i64, cond: &Tensor, var_channels: bool) -> Tensor {
    let a = 0.5 + t as f64 / 1000.0;
    let eps = (x * a).tanh() * 0.8 + (x * 3.0).cos() * (cond * 0.1).view([-1, 1, 1, 1]);
    if !var_channels {
        return eps;
    }
    let v = (x * 0.3 + (t as f64 / 1000.0 - 0.5)).tanh();
    Tensor::cat(&[eps, v], 1)
}

/// How a guided sampling run is set up.
pub struct GuidedRun<'a> {
    pub conds: &'a [f32],
    pub scales: &'a [f32],
    pub var_channels: bool,
    /// Record every n-th sample (and always the last).
    pub save_every: usize,
}

/// Runs `sampler` from `x_t` with classifier-free guidance on the dummy model, the
/// model called once per step on [uncond; cond]. Returns the recorded samples,
/// starting with `x_t`.
pub fn run_guided(sampler: &mut dyn Sampler, x_t: &Tensor, run: &GuidedRun, noise: &mut BatchNoise) -> Result<Vec<Tensor>> {
    let b = x_t.size()[0];
    let zeros = vec![0.0f32; b as usize];
    let cond = Tensor::from_slice(&[zeros.as_slice(), run.conds].concat());
    let channels = x_t.size()[1];
    let mut x = x_t.shallow_clone();
    let mut trajectory = vec![x.copy()];
    let total = sampler.timesteps().len();
    while let Some(t) = sampler.current_timestep() {
        let out = dummy_model(&Tensor::cat(&[&x, &x], 0), t, &cond, run.var_channels);
        let guided = classifier_free(&out, run.scales, channels)?;
        x = sampler.step(&guided, &x, noise)?.prev_sample;
        let k = sampler.step_index();
        if k % run.save_every == 0 || k == total {
            trajectory.push(x.copy());
        }
    }
    Ok(trajectory)
}

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// All tensors of a safetensors fixture by name.
pub fn load_tensors(rel: &str) -> HashMap<String, Tensor> {
    let path = fixture_dir().join(rel);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub fn load_json(rel: &str) -> serde_json::Value {
    let path = fixture_dir().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// max |a − b| / max(1, |b|): absolute error where values are O(1), relative where
/// an unclipped trajectory has grown large (float32 cannot hold 1e-5 absolute there).
pub fn scaled_error(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(tch::Kind::Double);
    let b = b.to_kind(tch::Kind::Double);
    let denom = b.abs().clamp_min(1.0);
    ((a - &b).abs() / denom).max().double_value(&[])
}
