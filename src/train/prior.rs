//! Training DALL-E 2's diffusion prior (Ramesh et al. 2022, "Hierarchical
//! Text-Conditional Image Generation with CLIP Latents", §2.2) on our
//! captioned renders, in the embedding space of our noised CLIP
//! (`nn::noised_clip`): its config file, the batches, one step, and the run
//! with checkpoints, resumption, a time limit, a log and the export of a
//! diffusers `PriorTransformer` folder with its scheduler.
//!
//! A step draws renders and captions, embeds the clean renders with the
//! CLIP's image tower (t = 0) and the captions with its text tower, noises
//! each image embedding to its own t ~ U[0, T) and trains the prior to
//! predict the clean embedding (DALL-E 2 predicts x₀ directly, and so do
//! Karlo's `UnCLIPScheduler` files: `prediction_type = "sample"`) with a mean
//! squared error, conditioned on the caption's CLIP text embedding; a
//! configured share of captions is replaced by the empty caption's, so the
//! prior also learns the unconditional prediction classifier-free guidance
//! needs. The latents are the embeddings standardised per dimension with
//! statistics measured once on renders the run never trains on, stored as
//! the model's `clip_mean` and `clip_std` (what diffusers'
//! `post_process_latents` undoes).
//!
//! As in [`super::trainer`], every random choice of step k comes from a
//! stream seeded by (seed, k) and the optimiser's state is checkpointed
//! whole, so a run stopped and resumed computes what an uninterrupted one would.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::clip::{noise_schedule, FrozenClip};
use super::dataset::{Dataset, Sample};
use super::optim::{OptimConfig, Optimizer, StepReport};
use super::steps::{StepLoop, Stepped};
use super::trainer::{randn, step_rng};
use crate::diffusion::forward::q_sample;
use crate::diffusion::NoiseSchedule;
use crate::nn::unclip::{LoadedPrior, PriorConfig, PriorInput};

/// Renders the standardising statistics are measured on.
const STATISTICS_SAMPLES: u64 = 1024;

/// `prior.json`: everything that determines a training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorTrainConfig {
    pub seed: u64,
    /// The noised CLIP folder whose embeddings the prior learns (relative to the config file).
    pub clip: PathBuf,
    /// The prior's `config.json` contents: no text tokens
    /// (`encoder_hid_proj_type` null), the CLIP text embedding as its
    /// projected embedding, the CLIP width throughout.
    pub model: PriorConfig,
    /// The diffusers scheduler config of the prior (written as `prior_scheduler/`).
    pub scheduler: serde_json::Value,
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    /// Steps of learning-rate cool-down at the end of the run (0: none).
    #[serde(default)]
    pub cooldown_steps: u64,
    pub ema_decay: f64,
    /// The share of captions replaced by the empty caption, in [0, 1).
    pub uncond_fraction: f64,
    pub checkpoint_every: u64,
}

impl PriorTrainConfig {
    /// Reads, resolves (the CLIP path) and validates a config file.
    pub fn from_file(file: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let mut config: Self = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        if config.clip.is_relative() {
            config.clip = file.parent().unwrap_or(Path::new(".")).join(&config.clip);
        }
        config.validate().with_context(|| file.display().to_string())?;
        Ok(config)
    }

    /// Checks every field against what a run can do; errors name the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        let spec = self.model.spec().context("model")?;
        if spec.encoder_hid_proj || self.model.num_embeddings != 0 {
            bail!("model: the prior reads the CLIP text embedding only (encoder_hid_proj_type null, num_embeddings 0)");
        }
        if spec.embedding_proj_dim != self.model.embedding_dim || spec.clip_embed_dim != self.model.embedding_dim {
            bail!("model: embedding_proj_dim and clip_embed_dim must equal embedding_dim (the CLIP's width)");
        }
        if self.batch < 1 {
            bail!("batch must be at least 1");
        }
        if !(0.0..1.0).contains(&self.uncond_fraction) {
            bail!("uncond_fraction ({}) must be in [0, 1)", self.uncond_fraction);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr ({}) must be a positive number", self.lr);
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!("ema_decay ({}) must be in [0, 1)", self.ema_decay);
        }
        if self.checkpoint_every == 0 {
            bail!("checkpoint_every must be at least 1");
        }
        if self.cooldown_steps > self.steps {
            bail!("cooldown_steps ({}) exceeds steps ({})", self.cooldown_steps, self.steps);
        }
        noise_schedule(&self.scheduler).context("scheduler")?;
        Ok(())
    }
}

/// The host-side half of a step: renders, captions, timesteps and noise.
pub struct PriorBatch {
    /// Clean renders `[B, 3, S, S]` in [-1, 1].
    pub images: Tensor,
    pub samples: Vec<Sample>,
    /// Which captions are replaced by the empty one.
    pub uncond: Vec<bool>,
    pub timesteps: Vec<i64>,
    /// `[B, D]`.
    pub noise: Tensor,
}

/// What a run's batches are drawn from.
#[derive(Debug, Clone)]
pub struct PriorBatchSource {
    pub dataset: Dataset,
    pub size: u32,
    pub batch: usize,
    pub seed: u64,
    pub uncond_fraction: f64,
    pub train_steps: i64,
    pub width: i64,
}

impl PriorBatchSource {
    /// The batch of `step`: the same every time.
    pub fn draw(&self, step: u64) -> anyhow::Result<PriorBatch> {
        let mut rng = step_rng(self.seed, step);
        let b = self.batch as u64;
        let indices: Vec<u64> = (0..b).map(|i| step * b + i).collect();
        let (images, samples) = self.dataset.batch_samples(&indices, self.size)?;
        let uncond = (0..b).map(|_| rng.random::<f64>() < self.uncond_fraction).collect();
        let timesteps = (0..b).map(|_| rng.random_range(0..self.train_steps)).collect();
        let noise = randn(&mut rng, &[b as i64, self.width]);
        Ok(PriorBatch { images, samples, uncond, timesteps, noise })
    }
}

/// Per-dimension mean and standard deviation of the CLIP image embeddings of
/// `samples` renders of `dataset` (in chunks, no gradient).
pub fn embedding_statistics(teacher: &FrozenClip, dataset: &Dataset, size: u32, samples: u64) -> anyhow::Result<(Tensor, Tensor)> {
    let mut all = Vec::new();
    for start in (0..samples).step_by(128) {
        let indices: Vec<u64> = (start..(start + 128).min(samples)).collect();
        let (images, _) = dataset.batch_samples(&indices, size)?;
        all.push(teacher.image_embeds(&images)?.to_device(Device::Cpu));
    }
    let e = Tensor::cat(&all, 0);
    Ok((e.mean_dim(0, false, Kind::Float), e.std_dim(0, true, false).clamp_min(1e-4)))
}

/// One step's numbers, for the log.
pub struct PriorStepResult {
    pub loss: f64,
    /// Mean cosine between the predicted and the true image embedding.
    pub cosine: f64,
    pub optim: StepReport,
}

/// The prior's loss on a batch, and the cosine of its predictions.
pub struct PriorLoss {
    pub total: Tensor,
    pub cosine: f64,
}

/// The prior, its teacher, schedule and data.
pub struct PriorTrainer<'a> {
    pub prior: &'a LoadedPrior,
    pub teacher: &'a FrozenClip,
    pub schedule: &'a NoiseSchedule,
    pub source: PriorBatchSource,
    /// The empty caption's CLIP text embedding `[1, D]`.
    pub empty: Tensor,
}

impl PriorTrainer<'_> {
    /// The loss of the batch for `step` (no update): the same inputs every time.
    pub fn loss(&self, step: u64) -> anyhow::Result<PriorLoss> {
        let batch = self.source.draw(step)?;
        let device = self.prior.vs.device();
        let target = self.teacher.image_embeds(&batch.images)?.to_device(device);
        let prompts: Vec<&str> = batch.samples.iter().map(|s| s.caption.as_str()).collect();
        let text = self.teacher.text_embeds(&prompts)?.to_device(device);
        let drop: Vec<i64> = batch.uncond.iter().map(|&d| i64::from(d)).collect();
        let drop = Tensor::from_slice(&drop).to_device(device).to_kind(Kind::Bool).view([-1, 1]);
        let text = self.empty.to_device(device).expand_as(&text).where_self(&drop, &text);
        let x0 = self.prior.to_latents(&target);
        let x_t = q_sample(self.schedule, &x0, &batch.timesteps, &batch.noise.to_device(device))?;
        let t = Tensor::from_slice(&batch.timesteps).to_device(device);
        let pred = self.prior.model.forward(&PriorInput { hidden_states: &x_t, timesteps: &t, proj_embedding: &text, encoder_hidden_states: None, attention_mask: None })?;
        let total = (&pred - &x0).square().mean(Kind::Float);
        let cosine = tch::no_grad(|| {
            let e = self.prior.model.post_process_latents(&pred);
            (&e * &target).sum_dim_intlist(1, false, Kind::Float) / (e.square().sum_dim_intlist(1, false, Kind::Float).sqrt().clamp_min(1e-12))
        })
        .mean(Kind::Float)
        .double_value(&[]);
        Ok(PriorLoss { total, cosine })
    }

    /// One optimisation step on the batch for the optimiser's next step.
    pub fn step(&self, optimizer: &mut Optimizer) -> anyhow::Result<PriorStepResult> {
        let loss = self.loss(optimizer.step_count())?;
        optimizer.zero_grad();
        loss.total.backward();
        let optim = optimizer.step();
        Ok(PriorStepResult { loss: loss.total.double_value(&[]), cosine: loss.cosine, optim })
    }
}

/// A training run: `out/checkpoint/` (resumable), `out/train.log`.
pub struct PriorRun {
    pub config: PriorTrainConfig,
    pub out: PathBuf,
    pub device: Device,
    /// Stop (with a checkpoint) once this much wall time has passed.
    pub max_seconds: Option<f64>,
}

impl PriorRun {
    fn checkpoint_dir(&self) -> PathBuf {
        self.out.join("checkpoint")
    }

    fn optim_config(&self) -> OptimConfig {
        let c = &self.config;
        OptimConfig { lr: c.lr, warmup_steps: c.warmup_steps, total_steps: c.steps, cooldown_steps: c.cooldown_steps, ema_decay: c.ema_decay, ..Default::default() }
    }

    /// Trains until `config.steps`, resuming from the last checkpoint if any;
    /// `until` stops earlier. `progress` gets (step, loss, samples/s). Returns
    /// the final step.
    pub fn train(&self, until: Option<u64>, progress: &mut dyn FnMut(u64, f64, f64)) -> anyhow::Result<u64> {
        let c = &self.config;
        c.validate()?;
        std::fs::create_dir_all(&self.out)?;
        let teacher = FrozenClip::load(&c.clip, self.device)?;
        if teacher.width() != c.model.embedding_dim {
            bail!("model.embedding_dim is {} but the CLIP in {} embeds in {} dimensions", c.model.embedding_dim, c.clip.display(), teacher.width());
        }
        let schedule = noise_schedule(&c.scheduler)?;
        let size = teacher.clip.model.config().image_size as u32;
        // The CLIP trained on the dataset of its own seed; the prior draws from it too.
        let dataset = Dataset::new(teacher.inputs.train_seed);
        let ckpt = self.checkpoint_dir();
        let resuming = ckpt.join("optimizer.safetensors").is_file();
        let mut prior = if resuming {
            let mut prior = LoadedPrior::load(&ckpt, Device::Cpu, Kind::Float)?;
            if prior.model.config() != &c.model {
                bail!("the checkpoint in {} has another model config than the run's", ckpt.display());
            }
            prior.unfreeze();
            prior
        } else {
            // A reproducible initialisation: libtorch's generator draws the weights.
            tch::manual_seed(c.seed as i64);
            let prior = LoadedPrior::random(&c.model)?;
            // Statistics from renders past every index the run will draw.
            let held_out = Dataset::new(teacher.inputs.train_seed ^ 0x5eed_0f_57a7);
            let (mean, std) = embedding_statistics(&teacher, &held_out, size, STATISTICS_SAMPLES)?;
            prior.set_statistics(&mean, &std)?;
            prior
        };
        prior.vs.set_device(self.device);
        let mut opt = Optimizer::new(&prior.vs, self.optim_config());
        if resuming {
            opt.load(&ckpt.join("optimizer.safetensors"))?;
        }
        let source = PriorBatchSource {
            dataset,
            size,
            batch: c.batch,
            seed: c.seed,
            uncond_fraction: c.uncond_fraction,
            train_steps: schedule.len() as i64,
            width: c.model.embedding_dim,
        };
        let empty = teacher.text_embeds(&[""])?;
        let trainer = PriorTrainer { prior: &prior, teacher: &teacher, schedule: &schedule, source, empty };
        let run = StepLoop {
            out: &self.out,
            resuming,
            device: self.device,
            parameters: prior.parameter_count(),
            first: opt.step_count(),
            end: until.unwrap_or(c.steps).min(c.steps),
            checkpoint_every: c.checkpoint_every,
            batch: c.batch,
            unit: "samples",
            max_seconds: self.max_seconds,
        };
        let opt = std::cell::RefCell::new(opt);
        run.run(
            &mut || {
                let mut opt = opt.borrow_mut();
                let r = trainer.step(&mut opt)?;
                let fields = format!("loss {:.5} cosine {:.4} lr {:.2e} grad_norm {:.3}", r.loss, r.cosine, r.optim.lr, r.optim.grad_norm);
                Ok(Stepped { done: opt.step_count(), loss: r.loss, fields })
            },
            &mut || self.checkpoint(&prior, &opt.borrow()),
            progress,
        )
    }

    /// Writes the checkpoint to a fresh folder, then renames it into place.
    fn checkpoint(&self, prior: &LoadedPrior, opt: &Optimizer) -> anyhow::Result<()> {
        super::checkpoint::replace(&self.checkpoint_dir(), |tmp| {
            prior.save(tmp, Kind::Float)?;
            Ok(opt.save(&tmp.join("optimizer.safetensors"))?)
        })
    }

    /// Writes the EMA weights of the last checkpoint as `dir/prior/` (a
    /// diffusers `PriorTransformer` folder, f32) and `dir/prior_scheduler/`.
    pub fn export(&self, dir: &Path) -> anyhow::Result<()> {
        let ckpt = self.checkpoint_dir();
        let mut prior = LoadedPrior::load(&ckpt, Device::Cpu, Kind::Float).context("the run has no checkpoint to export")?;
        prior.unfreeze();
        let mut opt = Optimizer::new(&prior.vs, self.optim_config());
        opt.load(&ckpt.join("optimizer.safetensors"))?;
        let ema = opt.ema();
        tch::no_grad(|| {
            for (name, var) in prior.vs.variables() {
                if let Some(value) = ema.get(&name) {
                    var.shallow_clone().copy_(value);
                }
            }
        });
        prior.save(&dir.join("prior"), Kind::Float)?;
        let scheduler = dir.join("prior_scheduler");
        std::fs::create_dir_all(&scheduler)?;
        std::fs::write(scheduler.join("scheduler_config.json"), serde_json::to_string_pretty(&self.config.scheduler)? + "\n")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PriorTrainConfig {
        serde_json::from_value(serde_json::json!({
            "seed": 1, "clip": "clip",
            "model": {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1, "embedding_dim": 16,
                "num_embeddings": 0, "additional_embeddings": 4, "encoder_hid_proj_type": null},
            "scheduler": {"_class_name": "UnCLIPScheduler", "num_train_timesteps": 1000, "prediction_type": "sample"},
            "steps": 10, "batch": 4, "lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.99, "uncond_fraction": 0.1, "checkpoint_every": 5
        }))
        .unwrap()
    }

    #[test]
    fn the_config_is_checked_field_by_field() {
        assert!(config().validate().is_ok());
        let bad = |f: &dyn Fn(&mut PriorTrainConfig), word: &str| {
            let mut c = config();
            f(&mut c);
            let err = format!("{:#}", c.validate().unwrap_err());
            assert!(err.contains(word), "{err}");
        };
        bad(&|c| c.model.encoder_hid_proj_type = Some("linear".into()), "text embedding only");
        bad(&|c| c.model.embedding_proj_dim = Some(8), "embedding_proj_dim");
        bad(&|c| c.uncond_fraction = 1.0, "uncond_fraction");
        bad(&|c| c.lr = f64::NAN, "lr");
        bad(&|c| c.ema_decay = 1.0, "ema_decay");
        bad(&|c| c.cooldown_steps = 11, "cooldown_steps");
        bad(&|c| c.scheduler = serde_json::json!({"beta_schedule": "nonsense"}), "scheduler");
        let unknown = serde_json::json!({"seed": 1, "encoder": "x"});
        assert!(serde_json::from_value::<PriorTrainConfig>(unknown).is_err());
    }

    #[test]
    fn batches_are_a_function_of_the_step() {
        let source = PriorBatchSource { dataset: Dataset::new(2), size: 16, batch: 8, seed: 3, uncond_fraction: 0.5, train_steps: 1000, width: 16 };
        let (a, b) = (source.draw(4).unwrap(), source.draw(4).unwrap());
        assert!(a.images.equal(&b.images) && a.noise.equal(&b.noise));
        assert_eq!((a.timesteps.clone(), a.uncond.clone()), (b.timesteps, b.uncond));
        let c = source.draw(5).unwrap();
        assert!(!a.noise.equal(&c.noise) && a.samples[0].caption != c.samples[0].caption);
        assert!(a.uncond.iter().any(|&u| u) || c.uncond.iter().any(|&u| u), "half the captions are dropped");
        assert_eq!(a.noise.size(), [8, 16]);
    }
}
