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
//! uninterrupted one would. That makes the host-side half of a batch (render,
//! captions, draws) a pure function of the step, which [`Prefetcher`] threads
//! compute ahead while the device trains on the current one.
//!
//! With a grounding weight, the UNet's attention maps of the caption's colour,
//! shape and count words are also tied to the objects they name (see
//! [`super::grounding`]); the diffusion loss and its batches are unchanged.
//!
//! With [`Precision::Fp16`] the UNet's forward pass runs under CUDA autocast
//! and the loss, computed in f32, is scaled for the backward pass by the
//! optimiser's dynamic loss scale (see [`super::optim`]). With
//! [`Precision::Bf16`] its linear and convolution layers multiply in bfloat16
//! on the CPU (`nn::precision`); validation always runs in f32.

use std::str::FromStr;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, bail};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Kind, Tensor};

use super::dataset::{Dataset, Sample};
use super::grounding::GroundingTargets;
use super::loss::{HybridLoss, LossTerms};
use super::optim::{Optimizer, StepReport};
use crate::diffusion::forward::q_sample;
use crate::diffusion::NoiseSchedule;
use crate::nn::precision::with_product_kind;
use crate::nn::text::TextEncoder;
use crate::nn::unet::{AttentionMaps, LoadedUNet, UNetInput};

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

/// The arithmetic of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// fp16 autocast with f32 master weights and dynamic loss scaling (CUDA only).
    Fp16,
    /// bfloat16 products in the linear and convolution layers, everything else
    /// and the weights in f32 (see `nn::precision`): for CPUs with bfloat16
    /// dot products.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "fp16" | "f16" => Ok(Precision::Fp16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision {s:?}: expected f32, fp16 or bf16")),
        }
    }
}

/// The results of one step, for logging.
pub struct StepResult {
    pub loss: f64,
    pub mse: f64,
    pub vlb: f64,
    /// The grounding loss (unweighted), when the run has one.
    pub grounding: Option<f64>,
    pub optim: StepReport,
    /// Time spent waiting for the step's host-side batch, in milliseconds.
    pub data_wait_ms: f64,
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
    /// What the caption words should attend to, when the trainer grounds them.
    pub grounding: Option<GroundingTargets>,
}

/// Squared x̂_0 errors of a batch: over all its pixels, and over the pixels
/// that differ from the background (the objects).
#[derive(Debug, Clone, Copy, Default)]
pub struct X0Error {
    pub sum: f64,
    pub count: f64,
    pub object_sum: f64,
    pub object_count: f64,
}

impl std::ops::AddAssign for X0Error {
    fn add_assign(&mut self, o: Self) {
        self.sum += o.sum;
        self.count += o.count;
        self.object_sum += o.object_sum;
        self.object_count += o.object_count;
    }
}

/// The host-side half of a step's batch, on the CPU: everything drawn from
/// (seed, step), before text encoding and the move to the device.
pub struct HostBatch {
    pub step: u64,
    /// Targets, already cropped.
    pub(super) images: Tensor,
    /// SR: the conditioning image upsampled to the output size, cropped alike.
    upsampled: Option<Tensor>,
    pub(super) prompts: Vec<String>,
    /// The samples the images show (their scenes and captions' mentions).
    samples: Vec<Sample>,
    pub(super) timesteps: Vec<i64>,
    pub(super) noise: Tensor,
    levels: Vec<i64>,
    aug: Option<Tensor>,
}

impl HostBatch {
    /// The same batch noised at `t` for every sample (validation's fixed grid).
    pub(super) fn at_timestep(&self, t: i64) -> Self {
        Self { timesteps: vec![t; self.timesteps.len()], ..self.shallow_clone() }
    }

    /// The samples the batch shows, in row order.
    pub(super) fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The sub-batch of rows `rows` (in that order), with `prompts` for them.
    pub(super) fn select(&self, rows: &[usize], prompts: Vec<String>) -> Self {
        let index = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>());
        let pick = |x: &Tensor| x.index_select(0, &index);
        let pick_levels = |v: &[i64]| if v.is_empty() { Vec::new() } else { rows.iter().map(|&r| v[r]).collect() };
        Self {
            step: self.step,
            images: pick(&self.images),
            upsampled: self.upsampled.as_ref().map(pick),
            prompts,
            samples: rows.iter().map(|&r| self.samples[r].clone()).collect(),
            timesteps: rows.iter().map(|&r| self.timesteps[r]).collect(),
            noise: pick(&self.noise),
            levels: pick_levels(&self.levels),
            aug: self.aug.as_ref().map(pick),
        }
    }

    pub(super) fn shallow_clone(&self) -> Self {
        Self {
            step: self.step,
            images: self.images.shallow_clone(),
            upsampled: self.upsampled.as_ref().map(Tensor::shallow_clone),
            prompts: self.prompts.clone(),
            samples: self.samples.clone(),
            timesteps: self.timesteps.clone(),
            noise: self.noise.shallow_clone(),
            levels: self.levels.clone(),
            aug: self.aug.as_ref().map(Tensor::shallow_clone),
        }
    }
}

/// Everything the host-side half of a batch depends on: plain data that
/// prefetch threads can own.
#[derive(Debug, Clone)]
pub struct BatchSource {
    pub data: StageData,
    pub config: StepConfig,
    pub dataset: Dataset,
    /// The number of diffusion timesteps drawn from.
    pub train_steps: i64,
}

/// The per-step random stream: a function of (seed, step) only.
pub(super) fn step_rng(seed: u64, step: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A `[B, C, H, W]` standard-normal tensor from `rng` (libtorch's generator is
/// global; ours is part of the checkpointed state).
pub(crate) fn randn(rng: &mut Xoshiro256PlusPlus, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.sample(rand_distr::StandardNormal)).collect();
    Tensor::from_slice(&values).view(shape)
}

impl BatchSource {
    /// The host-side batch of `step`: the same every time.
    pub fn draw(&self, step: u64) -> anyhow::Result<HostBatch> {
        let mut rng = step_rng(self.config.seed, step);
        let b = self.config.batch;
        let indices: Vec<u64> = (0..b as u64).map(|i| step * b as u64 + i).collect();
        let (full, samples) = self.dataset.batch_samples(&indices, self.data.size)?;
        let prompts: Vec<String> = samples
            .iter()
            .map(|s| if rng.random::<f64>() < self.config.uncond_prob { String::new() } else { s.caption.clone() })
            .collect();
        let timesteps: Vec<i64> = (0..b).map(|_| rng.random_range(0..self.train_steps)).collect();
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
        let images = crop(&full);
        let b64 = b as i64;
        let noise = randn(&mut rng, &[b64, 3, s, s]);
        let (upsampled, levels, aug) = match self.data.low_res {
            None => (None, Vec::new(), None),
            Some(low) => {
                let (small, _) = self.dataset.batch(&indices, low)?;
                // Upsampled whole, then cropped: exactly what inference feeds a window of the image.
                let up = crop(&small.upsample_bilinear2d([full_side, full_side], true, None, None));
                let levels: Vec<i64> = (0..b).map(|_| rng.random_range(0..self.data.max_noise_level.max(1))).collect();
                let aug = randn(&mut rng, &[b64, 3, s, s]);
                (Some(up), levels, Some(aug))
            }
        };
        Ok(HostBatch { step, images, upsampled, prompts, samples, timesteps, noise, levels, aug })
    }
}

/// Threads that draw host-side batches ahead of the training loop, in step
/// order: thread k of n draws steps first + k, first + k + n, … into a
/// channel of depth 2. The same step may be taken again (a step skipped for a
/// gradient overflow is retried on the same batch).
pub struct Prefetcher {
    first: u64,
    receivers: Vec<Receiver<anyhow::Result<HostBatch>>>,
    /// The next step expected, and the last batch handed out.
    state: Mutex<(u64, Option<HostBatch>)>,
}

impl Prefetcher {
    pub fn spawn(source: BatchSource, first: u64, threads: usize) -> Self {
        let n = threads.max(1) as u64;
        let receivers = (0..n)
            .map(|k| {
                let (tx, rx) = sync_channel(2);
                let source = source.clone();
                std::thread::spawn(move || {
                    let mut step = first + k;
                    // Ends when the prefetcher (the receiving side) is dropped.
                    while tx.send(source.draw(step)).is_ok() {
                        step += n;
                    }
                });
                rx
            })
            .collect();
        Self { first, receivers, state: Mutex::new((first, None)) }
    }

    /// The host-side batch of `step`, which must be the next step or the last one taken.
    pub fn take(&self, step: u64) -> anyhow::Result<HostBatch> {
        let mut state = self.state.lock().map_err(|_| anyhow!("a data thread panicked"))?;
        if let Some(last) = state.1.as_ref().filter(|b| b.step == step) {
            return Ok(last.shallow_clone());
        }
        if step != state.0 {
            bail!("batches are prefetched in order: asked for step {step}, next is {}", state.0);
        }
        let k = ((step - self.first) % self.receivers.len() as u64) as usize;
        let batch = self.receivers[k].recv().map_err(|_| anyhow!("the data thread for step {step} stopped"))??;
        state.0 = step + 1;
        state.1 = Some(batch.shallow_clone());
        Ok(batch)
    }
}

pub struct StageTrainer<'a> {
    pub unet: &'a LoadedUNet,
    pub encoder: &'a TextEncoder,
    pub schedule: &'a NoiseSchedule,
    /// The schedule that noises the conditioning image (SR stages).
    pub noising: &'a NoiseSchedule,
    pub loss: HybridLoss,
    pub source: BatchSource,
    pub precision: Precision,
    /// Draws batches ahead on other threads; without it they are drawn inline.
    pub prefetch: Option<Prefetcher>,
    /// Weight of the grounding loss in the total; 0 leaves it out (and the
    /// attention in its fused kernel).
    pub grounding: f64,
}

/// A step's losses: the diffusion terms, and the grounding loss if any.
pub struct StepLosses {
    pub terms: LossTerms,
    pub grounding: Option<Tensor>,
}

impl StepLosses {
    /// What the step minimises.
    fn total(&self, weight: f64) -> Tensor {
        match &self.grounding {
            Some(g) => &self.terms.total + g * weight,
            None => self.terms.total.shallow_clone(),
        }
    }
}

impl StageTrainer<'_> {
    /// The loss of the batch for `step` (no optimiser update): the same inputs
    /// every time it is called with the same step.
    pub fn loss(&self, step: u64) -> anyhow::Result<StepLosses> {
        self.loss_of(&self.batch(step)?)
    }

    fn loss_of(&self, b: &TrainBatch) -> anyhow::Result<StepLosses> {
        let t = Tensor::from_slice(&b.timesteps).to_device(b.sample.device());
        let input = UNetInput { sample: &b.sample, timesteps: &t, encoder_hidden_states: &b.text, class_labels: b.class_labels.as_ref(), text_mask: None };
        let maps = b.grounding.as_ref().map(|_| AttentionMaps::default());
        let products = (self.precision == Precision::Bf16).then_some(Kind::BFloat16);
        let output = with_product_kind(products, || {
            tch::autocast(self.precision == Precision::Fp16, || self.unet.model.forward_probed(&input, true, maps.as_ref()))
        })?;
        // The loss (a log-likelihood with small differences of logs) in f32.
        let terms = self.loss.compute(&output.to_kind(Kind::Float), &b.images, &b.x_t, &b.noise, &b.timesteps);
        let grounding = b.grounding.as_ref().zip(maps).map(|(targets, maps)| targets.loss(&maps.take()));
        Ok(StepLosses { terms, grounding })
    }

    /// The squared error of x̂_0 summed over `host`'s pixels, and over its
    /// objects' pixels, without gradients and in eval mode: what validation
    /// measures. `text` is the encoding of the prompts to condition on (from
    /// [`Self::encode`]): validation scores one batch at several noise levels
    /// and with two prompts, and encodes each prompt set once.
    pub(super) fn x0_error(&self, host: HostBatch, text: &Tensor) -> anyhow::Result<X0Error> {
        let b = self.assemble_encoded(host, text.shallow_clone(), false)?;
        let t = Tensor::from_slice(&b.timesteps).to_device(b.sample.device());
        let input = UNetInput { sample: &b.sample, timesteps: &t, encoder_hidden_states: &b.text, class_labels: b.class_labels.as_ref(), text_mask: None };
        let output = tch::no_grad(|| tch::autocast(self.precision == Precision::Fp16, || self.unet.model.forward_t(&input, false)))?;
        let c = b.images.size()[1];
        let pred = output.to_kind(Kind::Float).narrow(1, 0, c);
        let x0 = self.loss.predicted_x0(&pred, &b.x_t, &b.timesteps);
        let squared = (x0 - &b.images).square();
        // A render's background is its most common colour, which the per-channel
        // median finds whenever the objects cover under half of the picture.
        let (n, c, h, w) = b.images.size4()?;
        let background = b.images.view([n, c, h * w]).median_dim(2, true).0.view([n, c, 1, 1]);
        let object = (&b.images - background).abs().amax([1i64].as_slice(), true).gt(0.1).to_kind(Kind::Float);
        Ok(X0Error {
            sum: squared.sum(Kind::Double).double_value(&[]),
            count: b.images.numel() as f64,
            object_sum: (&squared * &object).sum(Kind::Double).double_value(&[]),
            object_count: object.sum(Kind::Double).double_value(&[]) * c as f64,
        })
    }

    /// The UNet inputs and loss targets for `step`.
    pub fn batch(&self, step: u64) -> anyhow::Result<TrainBatch> {
        self.assemble(self.source.draw(step)?)
    }

    /// The frozen encoder's hidden states for `prompts`, in f32.
    pub(super) fn encode(&self, prompts: &[String]) -> anyhow::Result<Tensor> {
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        Ok(tch::no_grad(|| self.encoder.encode(&prompts))?.hidden.to_kind(Kind::Float))
    }

    /// Text encoding, the move to the device and the noising of a host batch.
    fn assemble(&self, host: HostBatch) -> anyhow::Result<TrainBatch> {
        let text = self.encode(&host.prompts)?;
        self.assemble_encoded(host, text, self.grounding > 0.0)
    }

    /// [`Self::assemble`] with the prompts already encoded; `ground` adds the
    /// grounding targets.
    fn assemble_encoded(&self, host: HostBatch, text: Tensor, ground: bool) -> anyhow::Result<TrainBatch> {
        let device = self.unet.vs.device();
        let grounding = if ground {
            if self.source.data.low_res.is_some() || self.source.data.crop.is_some() {
                bail!("the grounding loss is for base stages trained on whole images");
            }
            let targets = GroundingTargets::new(&host.samples, &host.prompts, self.encoder.tokenizer(), self.source.data.size)?;
            Some(targets.to_device(device))
        } else {
            None
        };
        let images = host.images.to_device(device);
        let noise = host.noise.to_device(device);
        let x_t = q_sample(self.schedule, &images, &host.timesteps, &noise)?;
        let (sample, class_labels) = match (host.upsampled, host.aug) {
            (Some(up), Some(aug)) => {
                let noised = q_sample(self.noising, &up.to_device(device), &host.levels, &aug.to_device(device))?;
                (Tensor::cat(&[&x_t, &noised], 1), Some(Tensor::from_slice(&host.levels).to_device(device)))
            }
            _ => (x_t.shallow_clone(), None),
        };
        Ok(TrainBatch { images, noise, x_t, sample, class_labels, text, timesteps: host.timesteps, grounding })
    }

    /// One optimisation step on the batch for the optimiser's next step.
    pub fn step(&self, optimizer: &mut Optimizer) -> anyhow::Result<StepResult> {
        let step = optimizer.step_count();
        let waiting = Instant::now();
        let host = match &self.prefetch {
            Some(p) => p.take(step)?,
            None => self.source.draw(step)?,
        };
        let data_wait_ms = waiting.elapsed().as_secs_f64() * 1e3;
        let losses = self.loss_of(&self.assemble(host)?)?;
        let total = losses.total(self.grounding);
        optimizer.zero_grad();
        let scale = optimizer.loss_scale();
        if scale == 1.0 {
            total.backward();
        } else {
            (&total * scale).backward();
        }
        let optim = optimizer.step();
        Ok(StepResult {
            loss: total.double_value(&[]),
            mse: losses.terms.mse.double_value(&[]),
            vlb: losses.terms.vlb.double_value(&[]),
            grounding: losses.grounding.map(|g| g.double_value(&[])),
            optim,
            data_wait_ms,
        })
    }
}
