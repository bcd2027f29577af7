//! Contrastive training of the noised CLIP ([`crate::nn::noised_clip`]) on
//! our captioned renders: its config file, the batches, one step, and the run
//! with checkpoints, resumption, a time limit, a log and the export of a
//! model folder.
//!
//! A step draws a batch of renders and their captions, noises each render to
//! its own timestep t ~ U[0, T) with the noise schedule the cascade's base
//! stage trains on (x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, DDPM eq. 4), except a
//! configured share that stays clean (t = 0, x_0 itself: CLIP guidance also
//! scores finished images), and minimises CLIP's symmetric InfoNCE with the
//! samples of equal descriptions as each other's positives (see
//! [`super::contrastive`]). This is GLIDE's noised CLIP (Nichol et al. 2022,
//! §2.4) at our scale.
//!
//! As in [`super::trainer`], every random choice of step k comes from a stream
//! seeded by (seed, k), and the optimiser's state is checkpointed whole, so a
//! run stopped and resumed computes what an uninterrupted one would.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::contrastive::{contrastive_loss, multi_positive_targets, ContrastiveLoss};
use super::dataset::{Dataset, Sample};
use super::optim::{OptimConfig, Optimizer, StepReport};
use super::steps::{StepLoop, Stepped};
use super::trainer::{randn, step_rng};
use crate::diffusion::forward::q_sample;
use crate::diffusion::{NoiseSchedule, SamplerKind, SchedulerConfig};
use crate::nn::noised_clip::{LoadedNoisedClip, ModelInputs, NoisedClip, NoisedClipConfig};
use crate::nn::text::{mean_pool, TextEncoder, TextEncoderOptions};

/// `noised-clip.json`: everything that determines a training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipTrainConfig {
    pub seed: u64,
    /// The frozen text encoder (a transformers folder), relative to the config file.
    pub encoder: PathBuf,
    pub max_length: usize,
    /// The render size; must be the model's `image_size`.
    pub size: u32,
    /// The model's `config.json` contents.
    pub model: NoisedClipConfig,
    /// The diffusers scheduler config whose noise schedule x_t is drawn with.
    pub scheduler: serde_json::Value,
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    /// The share of samples left clean (t = 0), in [0, 1].
    pub clean_fraction: f64,
    pub checkpoint_every: u64,
}

impl ClipTrainConfig {
    /// Reads, resolves (the encoder path) and validates a config file.
    pub fn from_file(file: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let mut config: Self = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        if config.encoder.is_relative() {
            config.encoder = file.parent().unwrap_or(Path::new(".")).join(&config.encoder);
        }
        config.validate().with_context(|| file.display().to_string())?;
        Ok(config)
    }

    /// Checks every field against what a run can do; errors name the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.model.validate()?;
        if i64::from(self.size) != self.model.image_size {
            bail!("size ({}) must equal model.image_size ({})", self.size, self.model.image_size);
        }
        if self.batch < 2 {
            bail!("batch ({}) must be at least 2: a contrastive batch needs negatives", self.batch);
        }
        if !(0.0..=1.0).contains(&self.clean_fraction) {
            bail!("clean_fraction ({}) must be in [0, 1]", self.clean_fraction);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr ({}) must be a positive number", self.lr);
        }
        if self.checkpoint_every == 0 || self.max_length == 0 {
            bail!("checkpoint_every and max_length must be at least 1");
        }
        let schedule = noise_schedule(&self.scheduler).context("scheduler")?;
        if schedule.len() as i64 != self.model.num_train_timesteps {
            bail!("the scheduler has {} timesteps but model.num_train_timesteps is {}", schedule.len(), self.model.num_train_timesteps);
        }
        Ok(())
    }
}

/// The noise schedule of a diffusers scheduler config.
pub fn noise_schedule(value: &serde_json::Value) -> anyhow::Result<NoiseSchedule> {
    let config = SchedulerConfig::from_json_str(&value.to_string())?;
    let resolved = config.resolve(config.native_kind().unwrap_or(SamplerKind::Ddpm))?;
    Ok(NoiseSchedule::from_config(&resolved)?)
}

/// The host-side half of a step: renders, captions, timesteps and noise.
pub struct ClipBatch {
    /// Clean renders `[B, 3, S, S]` in [-1, 1].
    pub images: Tensor,
    pub noise: Tensor,
    pub timesteps: Vec<i64>,
    /// Which samples stay clean (t = 0 and x_0 itself).
    pub clean: Vec<bool>,
    pub samples: Vec<Sample>,
}

/// What a run's batches are drawn from.
#[derive(Debug, Clone)]
pub struct ClipBatchSource {
    pub dataset: Dataset,
    pub size: u32,
    pub batch: usize,
    /// Seeds the per-step streams of timesteps and noise.
    pub seed: u64,
    pub clean_fraction: f64,
    pub train_steps: i64,
}

impl ClipBatchSource {
    /// The batch of `step`: the same every time.
    pub fn draw(&self, step: u64) -> anyhow::Result<ClipBatch> {
        let mut rng = step_rng(self.seed, step);
        let b = self.batch as u64;
        let indices: Vec<u64> = (0..b).map(|i| step * b + i).collect();
        let (images, samples) = self.dataset.batch_samples(&indices, self.size)?;
        let clean: Vec<bool> = (0..b).map(|_| rng.random::<f64>() < self.clean_fraction).collect();
        let timesteps = clean.iter().map(|&c| if c { 0 } else { rng.random_range(0..self.train_steps) }).collect();
        let s = i64::from(self.size);
        let noise = randn(&mut rng, &[b as i64, 3, s, s]);
        Ok(ClipBatch { images, noise, timesteps, clean, samples })
    }
}

/// x_t for a batch on `device`: the clean samples keep x_0.
pub fn noised_images(schedule: &NoiseSchedule, batch: &ClipBatch, device: Device) -> anyhow::Result<(Tensor, Tensor)> {
    let images = batch.images.to_device(device);
    let noised = q_sample(schedule, &images, &batch.timesteps, &batch.noise.to_device(device))?;
    let clean: Vec<i64> = batch.clean.iter().map(|&c| i64::from(c)).collect();
    let keep = Tensor::from_slice(&clean).to_device(device).to_kind(Kind::Bool).view([-1, 1, 1, 1]);
    let x_t = images.where_self(&keep, &noised);
    Ok((x_t, Tensor::from_slice(&batch.timesteps).to_device(device)))
}

/// The frozen encoder's sentence embeddings of `prompts`, `[B, hidden]` in f32.
pub fn pooled_text(encoder: &TextEncoder, prompts: &[&str]) -> anyhow::Result<Tensor> {
    let out = tch::no_grad(|| encoder.encode(prompts))?;
    Ok(mean_pool(&out.hidden, &out.mask)?)
}

/// A trained noised CLIP folder with the text encoder it names, frozen: what
/// retrieval scores and what the unCLIP prior learns the embeddings of.
pub struct FrozenClip {
    pub clip: LoadedNoisedClip,
    pub encoder: TextEncoder,
    pub inputs: ModelInputs,
}

impl FrozenClip {
    /// Loads a noised CLIP folder and the text encoder it names, onto `device`.
    pub fn load(dir: &Path, device: Device) -> anyhow::Result<Self> {
        let clip = LoadedNoisedClip::load(dir, device).with_context(|| format!("loading the CLIP in {}", dir.display()))?;
        let inputs = ModelInputs::read(dir)?;
        let options = TextEncoderOptions { max_length: Some(inputs.max_length), ..Default::default() };
        let mut encoder = TextEncoder::load(&inputs.text_encoder, &options)
            .with_context(|| format!("the text encoder named by {}", dir.join(ModelInputs::FILE).display()))?;
        encoder.to(device, Kind::Float)?;
        Ok(Self { clip, encoder, inputs })
    }

    pub fn width(&self) -> i64 {
        self.clip.model.config().embed_dim
    }

    /// Unit-norm CLIP image embeddings of clean renders `[B, 3, S, S]`.
    pub fn image_embeds(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        Ok(self.clip.model.clean_image_embeds(&images.to_device(self.clip.vs.device()))?)
    }

    /// Unit-norm CLIP text embeddings of `prompts`.
    pub fn text_embeds(&self, prompts: &[&str]) -> anyhow::Result<Tensor> {
        let pooled = pooled_text(&self.encoder, prompts)?;
        Ok(tch::no_grad(|| self.clip.model.text_embeds(&pooled))?)
    }

    /// What unCLIP's decoder reads of `prompts`: their unit-norm CLIP text
    /// embeddings `[B, D]` and the text tower applied to each of their token
    /// states `[B, L, D]` (padding included, as the cascade's UNets see it),
    /// from one pass of the encoder.
    pub fn text_conditioning(&self, prompts: &[&str]) -> anyhow::Result<(Tensor, Tensor)> {
        let out = tch::no_grad(|| self.encoder.encode(prompts))?;
        let pooled = mean_pool(&out.hidden, &out.mask)?;
        let model = &self.clip.model;
        Ok(tch::no_grad(|| -> anyhow::Result<(Tensor, Tensor)> { Ok((model.text_embeds(&pooled)?, model.text_token_states(&out.hidden.to_kind(Kind::Float))?)) })?)
    }
}

/// One step's numbers, for the log.
pub struct ClipStepResult {
    pub loss: f64,
    pub image_to_text: f64,
    pub text_to_image: f64,
    pub accuracy: f64,
    pub logit_scale: f64,
    pub optim: StepReport,
}

/// The model, encoder, schedule and data of a run.
pub struct ClipTrainer<'a> {
    pub model: &'a NoisedClip,
    pub encoder: &'a TextEncoder,
    pub schedule: &'a NoiseSchedule,
    pub source: ClipBatchSource,
}

impl ClipTrainer<'_> {
    /// The loss of the batch for `step` (no update): the same inputs every time.
    pub fn loss(&self, step: u64) -> anyhow::Result<ContrastiveLoss> {
        let batch = self.source.draw(step)?;
        let device = self.encoder.device();
        let (x_t, t) = noised_images(self.schedule, &batch, device)?;
        let prompts: Vec<&str> = batch.samples.iter().map(|s| s.caption.as_str()).collect();
        let text = self.model.text_embeds(&pooled_text(self.encoder, &prompts)?)?;
        let image = self.model.image_embeds(&x_t, &t)?;
        let targets = multi_positive_targets(&batch.samples, |a, b| a.description == b.description);
        Ok(contrastive_loss(&self.model.logits(&image, &text), &targets))
    }

    /// One optimisation step on the batch for the optimiser's next step.
    pub fn step(&self, optimizer: &mut Optimizer) -> anyhow::Result<ClipStepResult> {
        let loss = self.loss(optimizer.step_count())?;
        optimizer.zero_grad();
        loss.total.backward();
        let optim = optimizer.step();
        Ok(ClipStepResult {
            loss: loss.total.double_value(&[]),
            image_to_text: loss.image_to_text,
            text_to_image: loss.text_to_image,
            accuracy: loss.accuracy,
            logit_scale: tch::no_grad(|| self.model.logit_scale().double_value(&[])),
            optim,
        })
    }
}

/// A training run: `out/checkpoint/` (resumable), `out/train.log`.
pub struct ClipRun {
    pub config: ClipTrainConfig,
    pub out: PathBuf,
    pub device: Device,
    /// Stop (with a checkpoint) once this much wall time has passed.
    pub max_seconds: Option<f64>,
}

impl ClipRun {
    fn checkpoint_dir(&self) -> PathBuf {
        self.out.join("checkpoint")
    }

    /// Trains until `config.steps`, resuming from the last checkpoint if any;
    /// `until` stops earlier. `progress` gets (step, loss, images/s). Returns
    /// the final step.
    pub fn train(&self, until: Option<u64>, progress: &mut dyn FnMut(u64, f64, f64)) -> anyhow::Result<u64> {
        let c = &self.config;
        c.validate()?;
        std::fs::create_dir_all(&self.out)?;
        let schedule = noise_schedule(&c.scheduler)?;
        let mut encoder = TextEncoder::load(&c.encoder, &TextEncoderOptions { max_length: Some(c.max_length), ..Default::default() })?;
        encoder.to(self.device, Kind::Float)?;
        if encoder.hidden_size() != c.model.text_hidden_size {
            bail!("model.text_hidden_size is {} but the encoder {} has hidden size {}", c.model.text_hidden_size, c.encoder.display(), encoder.hidden_size());
        }
        let ckpt = self.checkpoint_dir();
        let resuming = ckpt.join("optimizer.safetensors").is_file();
        let mut clip = if resuming {
            let clip = LoadedNoisedClip::load(&ckpt, self.device)?;
            if clip.model.config() != &c.model {
                bail!("the checkpoint in {} has another model config than the run's", ckpt.display());
            }
            clip
        } else {
            // A reproducible initialisation: libtorch's generator draws the weights.
            tch::manual_seed(c.seed as i64);
            LoadedNoisedClip::random(&c.model)?
        };
        clip.unfreeze();
        clip.vs.set_device(self.device);
        let optim = OptimConfig { lr: c.lr, warmup_steps: c.warmup_steps, total_steps: c.steps, ..Default::default() };
        let mut opt = Optimizer::new(&clip.vs, optim);
        if resuming {
            opt.load(&ckpt.join("optimizer.safetensors"))?;
        }
        let source = ClipBatchSource {
            dataset: Dataset::new(c.seed),
            size: c.size,
            batch: c.batch,
            seed: c.seed,
            clean_fraction: c.clean_fraction,
            train_steps: schedule.len() as i64,
        };
        let trainer = ClipTrainer { model: &clip.model, encoder: &encoder, schedule: &schedule, source };
        let run = StepLoop {
            out: &self.out,
            resuming,
            device: self.device,
            parameters: clip.parameter_count(),
            first: opt.step_count(),
            end: until.unwrap_or(c.steps).min(c.steps),
            checkpoint_every: c.checkpoint_every,
            batch: c.batch,
            unit: "images",
            max_seconds: self.max_seconds,
        };
        let opt = std::cell::RefCell::new(opt);
        run.run(
            &mut || {
                let mut opt = opt.borrow_mut();
                let r = trainer.step(&mut opt)?;
                let fields = format!(
                    "loss {:.5} i2t {:.5} t2i {:.5} acc {:.3} logit_scale {:.2} lr {:.2e} grad_norm {:.3}",
                    r.loss, r.image_to_text, r.text_to_image, r.accuracy, r.logit_scale, r.optim.lr, r.optim.grad_norm
                );
                Ok(Stepped { done: opt.step_count(), loss: r.loss, fields })
            },
            &mut || self.checkpoint(&clip, &opt.borrow()),
            progress,
        )
    }

    /// Writes the checkpoint to a fresh folder, then renames it into place: a
    /// crash mid-write leaves the previous checkpoint intact.
    fn checkpoint(&self, clip: &LoadedNoisedClip, opt: &Optimizer) -> anyhow::Result<()> {
        super::checkpoint::replace(&self.checkpoint_dir(), |tmp| {
            clip.save(tmp)?;
            Ok(opt.save(&tmp.join("optimizer.safetensors"))?)
        })
    }

    /// Writes the last checkpoint's weights as a model folder: `config.json`,
    /// `model.safetensors` and `inputs.json` (encoder, schedule, seed).
    ///
    /// The live weights, not the optimiser's EMA: CLIP is trained without one,
    /// and its contrastive logits are calibrated by a temperature learned
    /// together with the live weights.
    pub fn export(&self, dir: &Path) -> anyhow::Result<()> {
        let c = &self.config;
        let clip = LoadedNoisedClip::load(&self.checkpoint_dir(), Device::Cpu).context("the run has no checkpoint to export")?;
        clip.save(dir)?;
        let inputs = ModelInputs { text_encoder: c.encoder.clone(), max_length: c.max_length, scheduler: c.scheduler.clone(), train_seed: c.seed };
        inputs.write(dir)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClipTrainConfig {
        serde_json::from_value(serde_json::json!({
            "seed": 1, "encoder": "enc", "max_length": 16, "size": 16,
            "model": {"image_size": 16, "block_out_channels": [8, 16], "layers_per_block": 1, "embed_dim": 8,
                      "text_hidden_size": 32, "num_train_timesteps": 1000, "norm_num_groups": 4},
            "scheduler": {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000},
            "steps": 10, "batch": 4, "lr": 1e-3, "warmup_steps": 2, "clean_fraction": 0.25, "checkpoint_every": 5
        }))
        .unwrap()
    }

    #[test]
    fn the_config_is_checked_field_by_field() {
        config().validate().unwrap();
        let err = |c: ClipTrainConfig| c.validate().unwrap_err().to_string();
        assert!(err(ClipTrainConfig { size: 32, ..config() }).contains("image_size"));
        assert!(err(ClipTrainConfig { batch: 1, ..config() }).contains("batch"));
        assert!(err(ClipTrainConfig { clean_fraction: 1.5, ..config() }).contains("clean_fraction"));
        let mut short = config();
        short.scheduler["num_train_timesteps"] = 500.into();
        assert!(err(short).contains("num_train_timesteps"));
        let unknown = serde_json::json!({"seed": 1, "ema_decay": 0.9});
        assert!(serde_json::from_value::<ClipTrainConfig>(unknown).unwrap_err().to_string().contains("ema_decay"));
    }

    #[test]
    fn batches_are_a_function_of_the_step_with_clean_samples_kept_clean() {
        let c = config();
        let source = ClipBatchSource { dataset: Dataset::new(1), size: 16, batch: 16, seed: 3, clean_fraction: 0.5, train_steps: 1000 };
        let (a, b) = (source.draw(2).unwrap(), source.draw(2).unwrap());
        assert!(a.noise.equal(&b.noise) && a.timesteps == b.timesteps && a.clean == b.clean);
        assert_ne!(source.draw(3).unwrap().timesteps, a.timesteps);
        let clean = a.clean.iter().filter(|&&c| c).count();
        assert!((2..=14).contains(&clean), "{clean} of 16 clean at 0.5");
        let schedule = noise_schedule(&c.scheduler).unwrap();
        let (x_t, t) = noised_images(&schedule, &a, Device::Cpu).unwrap();
        for (i, &is_clean) in a.clean.iter().enumerate() {
            let same = x_t.get(i as i64).equal(&a.images.get(i as i64));
            assert_eq!(same, is_clean, "sample {i}");
            assert_eq!(t.int64_value(&[i as i64]) == 0, is_clean || a.timesteps[i] == 0);
        }
    }
}
