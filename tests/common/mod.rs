//! Shared by the integration tests: the dummy denoiser mirrored from
//! `scripts/gen_fixtures.py`, a guided sampling loop, and fixture loading.
#![allow(dead_code)]

pub mod cascade;
pub mod clip;
pub mod server;
pub mod text;
pub mod unclip;
pub mod worker;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use diffusiond::diffusion::guidance::classifier_free;
use diffusiond::diffusion::{
    BatchNoise, NoiseSource, ReplayNoise, Result, Sampler, SamplerKind, SamplerOptions, Scheduler, SchedulerConfig,
};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

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
    /// Run the model in this precision (the sampler state keeps its own).
    pub model_kind: Option<Kind>,
}

/// Runs `sampler` from `x_t` with classifier-free guidance on the dummy model, the
/// model called once per step on [uncond; cond]. Returns the recorded samples,
/// starting with `x_t`.
pub fn run_guided(sampler: &mut dyn Sampler, x_t: &Tensor, run: &GuidedRun, noise: &mut BatchNoise) -> Result<Vec<Tensor>> {
    let b = x_t.size()[0];
    let zeros = vec![0.0f32; b as usize];
    let model_kind = run.model_kind.unwrap_or(x_t.kind());
    let cond = Tensor::from_slice(&[zeros.as_slice(), run.conds].concat()).to_device(x_t.device()).to_kind(model_kind);
    let channels = x_t.size()[1];
    let mut x = x_t.shallow_clone();
    let mut trajectory = vec![x.copy()];
    let total = sampler.timesteps().len();
    while let Some(t) = sampler.current_timestep() {
        let input = Tensor::cat(&[&x, &x], 0).to_kind(model_kind);
        let out = dummy_model(&input, t, &cond, run.var_channels);
        let guided = classifier_free(&out, run.scales, channels)?;
        x = sampler.step(&guided, &x, noise)?.prev_sample;
        let k = sampler.step_index();
        if k.is_multiple_of(run.save_every) || k == total {
            trajectory.push(x.copy());
        }
    }
    Ok(trajectory)
}

/// `tests/fixtures` under the working directory when present (a test binary run
/// from a copy of the repository), else under the crate that built the test.
pub fn fixture_dir() -> PathBuf {
    let local = PathBuf::from("tests/fixtures");
    if local.is_dir() {
        return local;
    }
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

pub const DIFFUSERS_FIXTURE: &str = "diffusion/diffusers";

/// A scheduler config given as JSON in a fixture.
pub fn config_from(value: &Value) -> SchedulerConfig {
    SchedulerConfig::from_json_str(&value.to_string()).expect("fixture config parses")
}

/// DeepFloyd IF's stage settings: cosine schedule, learned-range variance,
/// dynamic thresholding.
pub fn if_like_scheduler() -> Scheduler {
    let config = r#"{"beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range",
        "thresholding": true, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5}"#;
    Scheduler::new(SchedulerConfig::from_json_str(config).unwrap()).unwrap()
}

/// The final samples of a guided run of the dummy model (with variance channels)
/// from `x` on `device`, one seed, condition and scale per image; returned on the CPU.
pub fn final_samples(
    s: &Scheduler,
    options: &SamplerOptions,
    x: &Tensor,
    per_image: (&[u64], &[f32], &[f32]),
    device: Device,
) -> Tensor {
    let (seeds, conds, scales) = per_image;
    let mut sampler = s.sampler(options).unwrap();
    let run = GuidedRun { conds, scales, var_channels: true, save_every: usize::MAX, model_kind: None };
    let mut trajectory = run_guided(sampler.as_mut(), &x.to_device(device), &run, &mut BatchNoise::seeded(seeds)).unwrap();
    trajectory.pop().unwrap().to_device(Device::Cpu)
}

/// One recorded diffusers run of two images, ready to replay through our sampler.
pub struct FixtureCase {
    pub name: String,
    pub scheduler: Scheduler,
    pub options: SamplerOptions,
    /// The timesteps diffusers visited.
    pub timesteps: Vec<i64>,
    /// How many noise draws diffusers made per image.
    pub noise_drawn: u64,
    pub var_channels: bool,
    pub save_every: usize,
    /// The two images' x_T, stacked.
    pub x_t: Tensor,
    /// Per image, its recorded noise draws [steps, C, H, W].
    pub noise: [Tensor; 2],
    /// Per image, diffusers' recorded trajectory [saved, C, H, W].
    pub expected: [Tensor; 2],
}

impl FixtureCase {
    /// The recorded noise streams, one per image.
    pub fn replay_noise(&self) -> BatchNoise {
        BatchNoise::new(
            self.noise
                .iter()
                .map(|n| Box::new(ReplayNoise::new((0..n.size()[0]).map(|k| n.get(k)))) as Box<dyn NoiseSource>)
                .collect(),
        )
    }

    /// Replays the case on `device`, the sampler in float32 and the model in
    /// `model_kind`; returns per image the trajectory.
    pub fn run(&self, conds: &[f32], scales: &[f32], device: Device, model_kind: Kind) -> Result<[Tensor; 2]> {
        let mut sampler = self.scheduler.sampler(&self.options)?;
        let run = GuidedRun {
            conds,
            scales,
            var_channels: self.var_channels,
            save_every: self.save_every,
            model_kind: Some(model_kind),
        };
        let x_t = self.x_t.to_device(device);
        let traj = run_guided(sampler.as_mut(), &x_t, &run, &mut self.replay_noise())?;
        let image = |i: i64| Tensor::stack(&traj.iter().map(|x| x.get(i)).collect::<Vec<_>>(), 0).to_device(Device::Cpu);
        Ok([image(0), image(1)])
    }
}

/// The guidance conditions and scales of the two fixture images, and every case.
pub fn diffusers_cases() -> (Vec<f32>, Vec<f32>, Vec<FixtureCase>) {
    let meta = load_json(&format!("{DIFFUSERS_FIXTURE}.json"));
    let tensors = load_tensors(&format!("{DIFFUSERS_FIXTURE}.safetensors"));
    let conds: Vec<f32> = serde_json::from_value(meta["conds"].clone()).unwrap();
    let scales: Vec<f32> = serde_json::from_value(meta["scales"].clone()).unwrap();
    let cases = meta["cases"].as_array().unwrap().iter().map(|case| fixture_case(case, &tensors)).collect();
    (conds, scales, cases)
}

fn fixture_case(case: &Value, tensors: &HashMap<String, Tensor>) -> FixtureCase {
    let name = case["name"].as_str().unwrap().to_owned();
    let kind: SamplerKind = case["sampler"].as_str().unwrap().parse().unwrap();
    let config = config_from(&case["config"]);
    let mut options = SamplerOptions::new(kind, case["steps"].as_u64().unwrap_or(1000) as usize);
    options.eta = case["eta"].as_f64().unwrap_or(0.0);
    options.clipped_model_output = case["clipped"].as_bool().unwrap_or(false);
    options.timesteps = serde_json::from_value(case["timesteps"].clone()).unwrap();
    let t = |key: String| tensors.get(&key).unwrap_or_else(|| panic!("fixture lacks {key}")).shallow_clone();
    FixtureCase {
        scheduler: Scheduler::new(config).unwrap(),
        options,
        timesteps: serde_json::from_value(case["timesteps_used"].clone()).unwrap(),
        noise_drawn: case["noise_drawn"].as_u64().unwrap(),
        var_channels: case["var_channels"].as_bool().unwrap_or(false),
        save_every: case["save_every"].as_u64().unwrap_or(1) as usize,
        x_t: Tensor::stack(&[t(format!("{name}/x_T/0")), t(format!("{name}/x_T/1"))], 0),
        noise: [t(format!("{name}/noise/0")), t(format!("{name}/noise/1"))],
        expected: [t(format!("{name}/trajectory/0")), t(format!("{name}/trajectory/1"))],
        name,
    }
}

/// max |a − b| / max |b|: the error relative to the reference output's scale,
/// the measure the network parity tests bound (elementwise relative error is
/// meaningless where outputs cross zero).
pub fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(tch::Device::Cpu).to_kind(tch::Kind::Double);
    let b = b.to_device(tch::Device::Cpu).to_kind(tch::Kind::Double);
    (a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(f64::MIN_POSITIVE)
}

/// A tiny IF-style UNet config (diffusers' IF test shape, 32/32 channels, 32-wide
/// text tokens like the tiny BERT fixture); `sr` makes it a super-resolution
/// stage (6 input channels, noise level as class label).
pub fn tiny_unet_config(size: i64, sr: bool) -> diffusiond::nn::unet::UNetConfig {
    let mut v = serde_json::json!({
        "sample_size": size, "in_channels": if sr { 6 } else { 3 }, "out_channels": 6, "layers_per_block": 1,
        "block_out_channels": [32, 32],
        "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        "cross_attention_dim": 32, "encoder_hid_dim": 32, "attention_head_dim": 8,
        "addition_embed_type": "text", "addition_embed_type_num_heads": 2, "cross_attention_norm": "group_norm",
        "resnet_time_scale_shift": "scale_shift", "act_fn": "gelu"
    });
    if sr {
        v["class_embed_type"] = "timestep".into();
    }
    diffusiond::nn::unet::UNetConfig::from_json(&v.to_string()).unwrap()
}

/// Copies the folder `from` to `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
