//! One training step of one cascade stage, and the checkpoint that lets a run
//! stop and resume with the same numbers.
//!
//! A step draws a batch from the synthetic dataset at the stage's resolution,
//! replaces 10% of the captions by the empty prompt (classifier-free guidance
//! needs the unconditional model too: Ho & Salimans 2022), encodes them with the
//! frozen text encoder, noises the images at uniformly drawn timesteps, and
//! minimises ADM's hybrid loss. A super-resolution stage is conditioned on the
//! same scene rendered at the previous stage's size, upsampled bilinearly and
//! noised to a random augmentation level that the UNet receives as its class
//! label (Imagen §2.5, DeepFloyd IF). Like Imagen's and IF's super-resolution
//! models it can train on random crops: the UNet is convolutional with
//! attention only at its coarse levels, so a model trained on 64×64 windows of
//! 128×128 renders runs on whole 128×128 images, at a quarter of the cost per
//! training sample. Every random choice comes from a stream
//! seeded by (run seed, step), so a resumed run draws exactly what an
//! uninterrupted one would.

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Kind, Tensor};

use super::dataset::Dataset;
use super::loss::{HybridLoss, LossTerms};
use super::optim::{Optimizer, StepReport};
use crate::diffusion::forward::q_sample;
use crate::diffusion::NoiseSchedule;
use crate::nn::text::TextEncoder;
use crate::nn::unet::{LoadedUNet, UNetInput};

/// What a stage is trained on.
#[derive(Debug, Clone)]
pub struct StageData {
    /// Output size (square).
    pub size: u32,
    /// Super-resolution: the size of the conditioning image; `None` for a base stage.
    pub low_res: Option<u32>,
    /// Super-resolution: augmentation levels are drawn uniformly below this.
    pub max_noise_level: i64,
    /// Train on random `crop`×`crop` windows of the `size` render (and of the
    /// conditioning image upsampled to `size`, at the same place).
    pub crop: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct StepConfig {
    pub batch: usize,
    /// Fraction of captions replaced by the empty prompt.
    pub uncond_prob: f64,
    pub seed: u64,
}

/// The results of one step, for logging.
pub struct StepResult {
    pub loss: f64,
    pub mse: f64,
    pub vlb: f64,
    pub optim: StepReport,
}

/// One step's data: clean targets, the noise and noised images, and what the
/// UNet sees (`sample` carries the conditioning image's channels for SR).
pub struct TrainBatch {
    pub images: Tensor,
    pub noise: Tensor,
    pub x_t: Tensor,
    pub sample: Tensor,
    pub class_labels: Option<Tensor>,
    pub text: Tensor,
    pub timesteps: Vec<i64>,
}

/// The per-step random stream: a function of (seed, step) only.
fn step_rng(seed: u64, step: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A `[B, C, H, W]` standard-normal tensor from `rng` (libtorch's generator is
/// global; ours is part of the checkpointed state).
fn randn(rng: &mut Xoshiro256PlusPlus, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.sample(rand_distr::StandardNormal)).collect();
    Tensor::from_slice(&values).view(shape)
}

pub struct StageTrainer<'a> {
    pub unet: &'a LoadedUNet,
    pub encoder: &'a TextEncoder,
    pub schedule: &'a NoiseSchedule,
    /// The schedule that noises the conditioning image (SR stages).
    pub noising: &'a NoiseSchedule,
    pub loss: HybridLoss,
    pub data: StageData,
    pub config: StepConfig,
    pub dataset: Dataset,
}

impl StageTrainer<'_> {
    /// The loss of the batch for `step` (no optimiser update): the same inputs
    /// every time it is called with the same step.
    pub fn loss(&self, step: u64) -> anyhow::Result<LossTerms> {
        let b = self.batch(step)?;
        let t = Tensor::from_slice(&b.timesteps).to_device(b.sample.device());
        let input = UNetInput { sample: &b.sample, timesteps: &t, encoder_hidden_states: &b.text, class_labels: b.class_labels.as_ref() };
        let output = self.unet.model.forward_t(&input, true)?;
        Ok(self.loss.compute(&output, &b.images, &b.x_t, &b.noise, &b.timesteps))
    }

    /// The UNet inputs and loss targets for `step`.
    pub fn batch(&self, step: u64) -> anyhow::Result<TrainBatch> {
        let mut rng = step_rng(self.config.seed, step);
        let b = self.config.batch;
        let indices: Vec<u64> = (0..b as u64).map(|i| step * b as u64 + i).collect();
        let device = self.unet.vs.device();
        let (full, captions) = self.dataset.batch(&indices, self.data.size)?;
        let prompts: Vec<&str> =
            captions.iter().map(|c| if rng.random::<f64>() < self.config.uncond_prob { "" } else { c.as_str() }).collect();
        let text = tch::no_grad(|| self.encoder.encode(&prompts))?.hidden.to_kind(Kind::Float);
        let train_steps = self.schedule.len() as i64;
        let timesteps: Vec<i64> = (0..b).map(|_| rng.random_range(0..train_steps)).collect();
        let full_side = self.data.size as i64;
        let s = self.data.crop.map_or(full_side, |c| (c as i64).min(full_side));
        // Drawn only when cropping, so whole-image runs keep their random stream.
        let windows: Vec<(i64, i64)> = if s == full_side {
            Vec::new()
        } else {
            (0..b).map(|_| (rng.random_range(0..=full_side - s), rng.random_range(0..=full_side - s))).collect()
        };
        let crop = |x: &Tensor| -> Tensor {
            if s == full_side {
                return x.shallow_clone();
            }
            let parts: Vec<Tensor> = windows.iter().enumerate().map(|(i, &(top, left))| x.get(i as i64).narrow(1, top, s).narrow(2, left, s)).collect();
            Tensor::stack(&parts, 0)
        };
        let images = crop(&full).to_device(device);
        let b64 = b as i64;
        let noise = randn(&mut rng, &[b64, 3, s, s]).to_device(device);
        let x_t = q_sample(self.schedule, &images, &timesteps, &noise)?;
        let (sample, class_labels) = match self.data.low_res {
            None => (x_t.shallow_clone(), None),
            Some(low) => {
                let (small, _) = self.dataset.batch(&indices, low)?;
                // Upsampled whole, then cropped: exactly what inference feeds a window of the image.
                let up = crop(&small.upsample_bilinear2d([full_side, full_side], true, None, None)).to_device(device);
                let levels: Vec<i64> = (0..b).map(|_| rng.random_range(0..self.data.max_noise_level.max(1))).collect();
                let aug = randn(&mut rng, &[b64, 3, s, s]).to_device(device);
                let noised = q_sample(self.noising, &up, &levels, &aug)?;
                (Tensor::cat(&[&x_t, &noised], 1), Some(Tensor::from_slice(&levels).to_device(device)))
            }
        };
        Ok(TrainBatch { images, noise, x_t, sample, class_labels, text, timesteps })
    }

    /// One optimisation step on the batch for the optimiser's next step.
    pub fn step(&self, optimizer: &mut Optimizer) -> anyhow::Result<StepResult> {
        let terms = self.loss(optimizer.step_count())?;
        optimizer.zero_grad();
        terms.total.backward();
        let optim = optimizer.step();
        Ok(StepResult {
            loss: terms.total.double_value(&[]),
            mse: terms.mse.double_value(&[]),
            vlb: terms.vlb.double_value(&[]),
            optim,
        })
    }
}
