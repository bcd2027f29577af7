//! Training DALL-E 2's decoder (Ramesh et al. 2022, "Hierarchical
//! Text-Conditional Image Generation with CLIP Latents", §2.1) on our
//! captioned renders: a `UNet2DConditionModel` with `class_embed_type:
//! "identity"` behind an `UnCLIPTextProjModel`, as diffusers' `UnCLIPPipeline`
//! runs them. The CLIP image embedding of the render is projected and added
//! to the timestep embedding (with the caption's CLIP text embedding) and
//! projected into four extra context tokens placed before the caption's
//! tokens. The caption's tokens are the noised CLIP's text tower applied to
//! each token state of the frozen encoder (see
//! [`crate::nn::noised_clip::NoisedClip::text_token_states`]).
//!
//! The decoder starts from the cascade's trained base stage: every UNet
//! weight but the text-input ones (`encoder_hid_proj`, the pooled-text
//! `add_embedding`) is copied, and the new text path is fitted by least
//! squares to reproduce what the base stage computed from the same caption
//! (its projected tokens, and its pooled-text time embedding from the CLIP
//! text embedding). The image paths start at zero, so step 0 is the base
//! stage reading the caption through CLIP, and training teaches it to read
//! the image embedding. As in the paper, the CLIP embedding is replaced by a
//! learned null embedding for a share of the images and the caption is
//! dropped for a larger share, so the decoder also works from the embedding
//! alone (variations) and learns the unconditional row guidance needs. The
//! loss is the base stage's (ADM's hybrid loss with its prediction type and
//! Min-SNR weighting).
//!
//! Batches come from [`super::trainer::BatchSource`] (a pure function of
//! (seed, step)), and the optimiser's state is checkpointed whole, so a run
//! stopped and resumed computes what an uninterrupted one would.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::clip::FrozenClip;
use super::dataset::{Dataset, Sample};
use super::loss::HybridLoss;
use super::optim::{OptimConfig, Optimizer};
use super::steps::{StepLoop, Stepped};
use super::trainer::{step_rng, BatchSource, StageData, StepConfig};
use crate::diffusion::forward::q_sample;
use crate::diffusion::{NoiseSchedule, PredictionType, SamplerKind, SchedulerConfig};
use crate::nn::unclip::{TextProjConfig, UnCLIPTextProjModel};
use crate::nn::unet::config::{SampleSize, UNetConfig};
use crate::nn::unet::{UNet2DConditionModel, UNetInput};
use crate::nn::weights;

/// Captions the least-squares fit of the text path is measured on.
const FIT_CAPTIONS: u64 = 512;

/// The random stream of the image-embedding dropout (apart from the batch's own).
const IMAGE_DROP_STREAM: u64 = 0xdec0_de00;

/// The checkpoint's weights file (the UNet's and `text_proj.`'s variables together).
const CHECKPOINT_WEIGHTS: &str = "decoder.safetensors";

/// `decoder.json`: everything that determines a training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderTrainConfig {
    pub seed: u64,
    /// The noised CLIP folder whose embeddings condition the decoder (relative to the config file).
    pub clip: PathBuf,
    /// The base stage folder (`unet/`, `scheduler/`) the decoder starts from
    /// and whose schedule and loss it keeps (relative to the config file).
    pub init: PathBuf,
    /// Extra context tokens the image embedding is projected into (DALL-E 2: 4).
    pub clip_extra_context_tokens: i64,
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    #[serde(default)]
    pub cooldown_steps: u64,
    pub ema_decay: f64,
    /// The share of images whose CLIP embedding is replaced by the learned null one.
    pub image_drop: f64,
    /// The share of captions replaced by the empty caption.
    pub text_drop: f64,
    /// λ of the hybrid loss's variational term.
    pub vlb_lambda: f64,
    /// Min-SNR-γ weighting of the simple loss (absent: none).
    #[serde(default)]
    pub min_snr_gamma: Option<f64>,
    pub checkpoint_every: u64,
}

impl DecoderTrainConfig {
    /// Reads, resolves (the CLIP and init paths) and validates a config file.
    pub fn from_file(file: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let mut config: Self = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        let dir = file.parent().unwrap_or(Path::new("."));
        for path in [&mut config.clip, &mut config.init] {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
        config.validate().with_context(|| file.display().to_string())?;
        Ok(config)
    }

    /// Checks every field against what a run can do; errors name the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.clip_extra_context_tokens < 1 {
            bail!("clip_extra_context_tokens must be at least 1");
        }
        if self.batch < 1 {
            bail!("batch must be at least 1");
        }
        for (field, share) in [("image_drop", self.image_drop), ("text_drop", self.text_drop)] {
            if !(0.0..1.0).contains(&share) {
                bail!("{field} ({share}) must be in [0, 1)");
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr ({}) must be a positive number", self.lr);
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!("ema_decay ({}) must be in [0, 1)", self.ema_decay);
        }
        if !(self.vlb_lambda.is_finite() && self.vlb_lambda >= 0.0) {
            bail!("vlb_lambda ({}) must be a finite number ≥ 0", self.vlb_lambda);
        }
        if self.min_snr_gamma.is_some_and(|g| !(g.is_finite() && g > 0.0)) {
            bail!("min_snr_gamma must be a positive number");
        }
        if self.checkpoint_every == 0 {
            bail!("checkpoint_every must be at least 1");
        }
        if self.cooldown_steps > self.steps {
            bail!("cooldown_steps ({}) exceeds steps ({})", self.cooldown_steps, self.steps);
        }
        Ok(())
    }
}

/// The decoder's config: the base stage's UNet reading its text through
/// `text_proj` (no text projection or pooled-text embedding of its own) and
/// the image embedding through its identity class embedding.
pub fn decoder_unet_config(base: &UNetConfig) -> anyhow::Result<UNetConfig> {
    let mut value: serde_json::Value = serde_json::from_str(&base.to_json())?;
    let map = value.as_object_mut().context("a UNet config is an object")?;
    if map.get("class_embed_type").is_some_and(|v| !v.is_null()) {
        bail!("the init stage has a class embedding already (a super-resolution stage?): the decoder starts from a base stage");
    }
    map.insert("class_embed_type".into(), "identity".into());
    for field in ["encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type"] {
        map.insert(field.into(), serde_json::Value::Null);
    }
    Ok(UNetConfig::from_json(&value.to_string())?)
}

/// The decoder UNet and its text projection in one store (the text
/// projection's variables under `text_proj.`), so one optimiser trains both.
pub struct DecoderModel {
    pub vs: nn::VarStore,
    pub unet: UNet2DConditionModel,
    pub text_proj: UnCLIPTextProjModel,
}

impl DecoderModel {
    /// Randomly initialised on the CPU.
    pub fn random(unet: &UNetConfig, text_proj: &TextProjConfig) -> anyhow::Result<Self> {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = UNet2DConditionModel::new(&vs.root(), unet)?;
        let proj = UnCLIPTextProjModel::new(&(vs.root() / "text_proj"), text_proj);
        Ok(Self { vs, unet: model, text_proj: proj })
    }

    pub fn parameter_count(&self) -> i64 {
        self.vs.variables().values().map(Tensor::numel).sum::<usize>() as i64
    }

    /// The UNet output for noised images `x_t` at `timesteps`, conditioned on
    /// CLIP image embeddings (rows of `dropped` replaced by the null one), the
    /// captions' CLIP text embeddings and their token states.
    pub fn forward(&self, x_t: &Tensor, timesteps: &Tensor, image: &Tensor, dropped: &Tensor, text: &Tensor, tokens: &Tensor, train: bool) -> anyhow::Result<Tensor> {
        let image = self.text_proj.drop_image_embeddings(image, dropped);
        let projected = self.text_proj.forward(&image, text, tokens, false)?;
        let input = UNetInput {
            sample: x_t,
            timesteps,
            encoder_hidden_states: &projected.hidden_states,
            class_labels: Some(&projected.time_embeddings),
            text_mask: None,
        };
        Ok(self.unet.forward_t(&input, train)?)
    }

    /// Writes `decoder/` (a diffusers `UNet2DConditionModel` folder) and
    /// `text_proj/` (an `UnCLIPTextProjModel` folder) under `dir`, with the
    /// weights `values` gives each variable (the model's own, or the EMA's),
    /// stored in `kind`.
    pub fn export(&self, dir: &Path, values: &std::collections::BTreeMap<String, Tensor>, kind: Kind) -> anyhow::Result<()> {
        let mut unet = std::collections::BTreeMap::new();
        let mut proj = std::collections::BTreeMap::new();
        for name in self.vs.variables().keys() {
            let value = values.get(name).with_context(|| format!("no value for {name}"))?.to_device(Device::Cpu).to_kind(kind);
            match name.strip_prefix("text_proj.") {
                Some(rest) => proj.insert(rest.to_string(), value),
                None => unet.insert(name.clone(), value),
            };
        }
        let stem = crate::nn::unet::model::WEIGHTS_STEM;
        for (folder, config, tensors) in [("decoder", self.unet.config().to_json(), unet), ("text_proj", self.text_proj.config().to_json(), proj)] {
            let out = dir.join(folder);
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("config.json"), config)?;
            weights::save_tensors(&tensors, &out.join(format!("{stem}.safetensors")))?;
        }
        Ok(())
    }
}

/// Copies the base stage's weights into every decoder variable of the same
/// name and shape, then fits the new text path to the base stage's by least
/// squares over `FIT_CAPTIONS` captions; the image paths stay at zero.
pub fn init_from_base(model: &DecoderModel, base_dir: &Path, teacher: &FrozenClip, dataset: &Dataset) -> anyhow::Result<()> {
    // In f32 whatever the shipped precision: the fit and training are in f32.
    let base_unet = crate::nn::unet::LoadedUNet::load(base_dir, Device::Cpu, Kind::Float)?;
    let base = base_unet.vs.variables();
    let variables = model.vs.variables();
    tch::no_grad(|| -> anyhow::Result<()> {
        for (name, var) in &variables {
            match base.get(name) {
                Some(value) if value.size() == var.size() => {
                    var.shallow_clone().copy_(value);
                }
                _ if name.starts_with("text_proj.") => {
                    let _ = var.shallow_clone().zero_();
                }
                _ => bail!("the base stage in {} has no weight {name} of shape {:?}", base_dir.display(), var.size()),
            }
        }
        Ok(())
    })?;
    // What the base stage computed from the fit captions.
    let samples: Vec<Sample> = (0..FIT_CAPTIONS).map(|i| dataset.sample(i)).collect();
    let prompts: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).chain(std::iter::once("")).collect();
    let hidden = tch::no_grad(|| teacher.encoder.encode(&prompts))?.hidden.to_kind(Kind::Float).to_device(Device::Cpu);
    let (text, tokens) = teacher.text_conditioning(&prompts)?;
    let (text, tokens) = (text.to_device(Device::Cpu), tokens.to_device(Device::Cpu));
    let projected_base = tch::no_grad(|| {
        let w = &base["encoder_hid_proj.weight"];
        let b = &base["encoder_hid_proj.bias"];
        hidden.matmul(&w.tr()) + b
    });
    let pooled_base = tch::no_grad(|| base_unet.model.text_time_embedding(&hidden)).context("the base stage has no pooled-text embedding (addition_embed_type \"text\")")?;
    let d = tokens.size()[2];
    let fit = |inputs: &Tensor, targets: &Tensor, prefix: &str| -> anyhow::Result<()> {
        // [x, 1] · [Wᵀ; b] ≈ y
        let x = Tensor::cat(&[inputs.view([-1, d]), Tensor::ones([inputs.numel() as i64 / d, 1], (Kind::Float, Device::Cpu))], 1);
        let y = targets.view([x.size()[0], -1]);
        let (solution, _, _, _) = Tensor::linalg_lstsq(&x.to_kind(Kind::Double), &y.to_kind(Kind::Double), None, "gelsd");
        let solution = solution.to_kind(Kind::Float);
        tch::no_grad(|| {
            variables[&format!("text_proj.{prefix}.weight")].shallow_clone().copy_(&solution.narrow(0, 0, d).tr());
            variables[&format!("text_proj.{prefix}.bias")].shallow_clone().copy_(&solution.get(d));
        });
        Ok(())
    };
    fit(&tokens, &projected_base, "encoder_hidden_states_proj")?;
    fit(&text, &pooled_base, "embedding_proj")?;
    // The projected tokens are layer-normalised before the UNet reads them; a
    // unit gain and zero shift keep the fitted directions.
    tch::no_grad(|| {
        let _ = variables["text_proj.text_encoder_hidden_states_norm.weight"].shallow_clone().fill_(1.0);
    });
    Ok(())
}

/// One step's numbers, for the log.
pub struct DecoderStepResult {
    pub loss: f64,
    pub mse: f64,
    pub vlb: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

/// The decoder, its teacher, schedule, loss and data.
pub struct DecoderTrainer<'a> {
    pub model: &'a DecoderModel,
    pub teacher: &'a FrozenClip,
    pub schedule: &'a NoiseSchedule,
    pub loss: HybridLoss,
    pub source: BatchSource,
    pub image_drop: f64,
}

impl DecoderTrainer<'_> {
    /// The loss terms of the batch for `step` (no update): the same inputs every time.
    pub fn loss(&self, step: u64) -> anyhow::Result<super::loss::LossTerms> {
        let host = self.source.draw(step)?;
        let device = self.model.vs.device();
        let mut rng = step_rng(self.source.config.seed ^ IMAGE_DROP_STREAM, step);
        let dropped: Vec<bool> = (0..host.prompts.len()).map(|_| rng.random::<f64>() < self.image_drop).collect();
        let dropped = Tensor::from_slice(&dropped).to_device(device);
        let image = self.teacher.image_embeds(&host.images)?.to_device(device);
        let prompts: Vec<&str> = host.prompts.iter().map(String::as_str).collect();
        let (text, tokens) = self.teacher.text_conditioning(&prompts)?;
        let images = host.images.to_device(device);
        let noise = host.noise.to_device(device);
        let x_t = q_sample(self.schedule, &images, &host.timesteps, &noise)?;
        let t = Tensor::from_slice(&host.timesteps).to_device(device);
        let output = self.model.forward(&x_t, &t, &image, &dropped, &text.to_device(device), &tokens.to_device(device), true)?;
        Ok(self.loss.compute(&output, &images, &x_t, &noise, &host.timesteps))
    }

    /// One optimisation step on the batch for the optimiser's next step.
    pub fn step(&self, optimizer: &mut Optimizer) -> anyhow::Result<DecoderStepResult> {
        let terms = self.loss(optimizer.step_count())?;
        optimizer.zero_grad();
        terms.total.backward();
        let optim = optimizer.step();
        Ok(DecoderStepResult {
            loss: terms.total.double_value(&[]),
            mse: terms.mse.double_value(&[]),
            vlb: terms.vlb.double_value(&[]),
            lr: optim.lr,
            grad_norm: optim.grad_norm,
        })
    }
}

/// The init stage's schedule and prediction type.
fn base_schedule(init: &Path) -> anyhow::Result<(serde_json::Value, NoiseSchedule, PredictionType)> {
    let file = init.join("scheduler").join("scheduler_config.json");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)?;
    let config = SchedulerConfig::from_json_str(&text)?;
    let resolved = config.resolve(config.native_kind().unwrap_or(SamplerKind::Ddpm))?;
    let prediction = resolved.prediction_type;
    if prediction == PredictionType::Sample {
        bail!("{}: prediction_type \"sample\": the decoder trains with epsilon or v_prediction", file.display());
    }
    Ok((value, NoiseSchedule::from_config(&resolved)?, prediction))
}

/// A training run: `out/checkpoint/` (resumable), `out/train.log`.
pub struct DecoderRun {
    pub config: DecoderTrainConfig,
    pub out: PathBuf,
    pub device: Device,
    /// Stop (with a checkpoint) once this much wall time has passed.
    pub max_seconds: Option<f64>,
}

impl DecoderRun {
    fn checkpoint_dir(&self) -> PathBuf {
        self.out.join("checkpoint")
    }

    fn optim_config(&self) -> OptimConfig {
        let c = &self.config;
        OptimConfig { lr: c.lr, warmup_steps: c.warmup_steps, total_steps: c.steps, cooldown_steps: c.cooldown_steps, ema_decay: c.ema_decay, ..Default::default() }
    }

    /// The decoder's architecture: the init stage's UNet turned decoder, and
    /// a text projection from the CLIP's width to the UNet's.
    fn architecture(&self, teacher: &FrozenClip) -> anyhow::Result<(UNetConfig, TextProjConfig)> {
        let base = UNetConfig::from_dir(&self.config.init.join("unet"))?;
        let unet = decoder_unet_config(&base)?;
        let spec = unet.spec()?;
        let proj = TextProjConfig {
            clip_extra_context_tokens: self.config.clip_extra_context_tokens,
            clip_embeddings_dim: teacher.width(),
            time_embed_dim: spec.time_embed_dim,
            cross_attention_dim: spec.down.first().context("the init stage's UNet has no down blocks")?.cross_attention_dim,
        };
        Ok((unet, proj))
    }

    /// Trains until `config.steps`, resuming from the last checkpoint if any;
    /// `until` stops earlier. `progress` gets (step, loss, samples/s). Returns
    /// the final step.
    pub fn train(&self, until: Option<u64>, progress: &mut dyn FnMut(u64, f64, f64)) -> anyhow::Result<u64> {
        let c = &self.config;
        c.validate()?;
        std::fs::create_dir_all(&self.out)?;
        let teacher = FrozenClip::load(&c.clip, self.device)?;
        let (_, schedule, prediction) = base_schedule(&c.init)?;
        let (unet_config, proj_config) = self.architecture(&teacher)?;
        let size = match unet_config.sample_size {
            Some(SampleSize::Square(s)) => s as u32,
            _ => bail!("the init stage's UNet has no square sample_size"),
        };
        if size as i64 != teacher.clip.model.config().image_size {
            bail!("the init stage makes {size} px images but the CLIP reads {} px", teacher.clip.model.config().image_size);
        }
        let dataset = Dataset::new(c.seed);
        let ckpt = self.checkpoint_dir();
        let resuming = ckpt.join("optimizer.safetensors").is_file();
        tch::manual_seed(c.seed as i64);
        let mut model = DecoderModel::random(&unet_config, &proj_config)?;
        if resuming {
            weights::load_into(&model.vs, &[ckpt.join(CHECKPOINT_WEIGHTS)], &|_| false)?;
        } else {
            // Fitted on captions the run never trains on.
            init_from_base(&model, &c.init.join("unet"), &teacher, &Dataset::new(c.seed ^ 0x5eed_0f_57a7))?;
        }
        model.vs.set_device(self.device);
        let mut opt = Optimizer::new(&model.vs, self.optim_config());
        if resuming {
            opt.load(&ckpt.join("optimizer.safetensors"))?;
        }
        let source = BatchSource {
            data: StageData { size, low_res: None, max_noise_level: 0, crop: None },
            config: StepConfig { batch: c.batch, uncond_prob: c.text_drop, seed: c.seed },
            dataset,
            train_steps: schedule.len() as i64,
        };
        let loss = HybridLoss::new(&schedule, c.vlb_lambda).with_prediction(prediction).with_min_snr(c.min_snr_gamma);
        let trainer = DecoderTrainer { model: &model, teacher: &teacher, schedule: &schedule, loss, source, image_drop: c.image_drop };
        let run = StepLoop {
            out: &self.out,
            resuming,
            device: self.device,
            parameters: model.parameter_count(),
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
                let fields = format!("loss {:.5} mse {:.5} vlb {:.5} lr {:.2e} grad_norm {:.3}", r.loss, r.mse, r.vlb, r.lr, r.grad_norm);
                Ok(Stepped { done: opt.step_count(), loss: r.loss, fields })
            },
            &mut || self.checkpoint(&model, &opt.borrow()),
            progress,
        )
    }

    /// Writes the checkpoint to a fresh folder, then renames it into place.
    fn checkpoint(&self, model: &DecoderModel, opt: &Optimizer) -> anyhow::Result<()> {
        super::checkpoint::replace(&self.checkpoint_dir(), |tmp| {
            std::fs::create_dir_all(tmp)?;
            weights::save(&model.vs, &tmp.join(CHECKPOINT_WEIGHTS), Kind::Float)?;
            Ok(opt.save(&tmp.join("optimizer.safetensors"))?)
        })
    }

    /// Writes the EMA weights of the last checkpoint as `dir/decoder/` and
    /// `dir/text_proj/` (in half precision, as the cascade's stages ship: the
    /// server computes in its own precision), and the init stage's scheduler
    /// as `dir/decoder_scheduler/`.
    pub fn export(&self, dir: &Path) -> anyhow::Result<()> {
        let ckpt = self.checkpoint_dir();
        let teacher = FrozenClip::load(&self.config.clip, Device::Cpu)?;
        let (unet_config, proj_config) = self.architecture(&teacher)?;
        let model = DecoderModel::random(&unet_config, &proj_config)?;
        weights::load_into(&model.vs, &[ckpt.join(CHECKPOINT_WEIGHTS)], &|_| false).context("the run has no checkpoint to export")?;
        let mut opt = Optimizer::new(&model.vs, self.optim_config());
        opt.load(&ckpt.join("optimizer.safetensors"))?;
        model.export(dir, &opt.ema(), Kind::Half)?;
        let (scheduler, _, _) = base_schedule(&self.config.init)?;
        let out = dir.join("decoder_scheduler");
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("scheduler_config.json"), serde_json::to_string_pretty(&scheduler)? + "\n")?;
        Ok(())
    }
}
