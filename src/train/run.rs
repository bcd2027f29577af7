//! A training run of one stage: its config file, the loop, checkpoints every N
//! steps (weights, optimiser moments, EMA, step) written atomically, automatic
//! resumption from the last checkpoint, a log of losses and throughput, held-out
//! validation of the EMA every N steps (see [`super::validate`]), and the
//! export of the EMA weights as a stage folder the pipeline and diffusers load.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::dataset::Dataset;
use super::layout::Mix;
use super::loss::HybridLoss;
use super::optim::{LossScale, OptimConfig, Optimizer};
use super::trainer::{BatchSource, Precision, Prefetcher, StageData, StageTrainer, StepConfig};
use super::validate::Validation;
use crate::diffusion::forward::PredictionType;
use crate::diffusion::{NoiseSchedule, SamplerKind, SchedulerConfig};
use crate::nn::weights;
use crate::nn::text::{TextEncoder, TextEncoderOptions};
use crate::nn::unet::{LoadedUNet, UNetConfig};
use crate::pipeline::stage::StageKind;
use crate::pipeline::writer::{write_stage, StageFiles};

/// `train.json`: everything that determines a stage's training run. Committed
/// next to the shipped weights so that anyone can reproduce them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub seed: u64,
    /// The frozen text encoder (a transformers folder), relative to the config file.
    pub encoder: PathBuf,
    pub max_length: usize,
    /// Output size; `low_res` set makes it a super-resolution stage.
    pub size: u32,
    #[serde(default)]
    pub low_res: Option<u32>,
    #[serde(default)]
    pub max_noise_level: i64,
    /// Train on random windows of this side instead of whole images.
    #[serde(default)]
    pub crop: Option<u32>,
    /// The UNet's diffusers `config.json` contents.
    pub unet: serde_json::Value,
    /// The stage's diffusers scheduler config (training uses its noise schedule).
    pub scheduler: serde_json::Value,
    /// SR: the conditioning image's noising scheduler.
    #[serde(default)]
    pub noising: Option<serde_json::Value>,
    /// A stage folder (or its `unet/`) whose weights start the run instead of
    /// a random initialisation, relative to the config file: fine-tuning, for
    /// instance to another prediction type. Its architecture must be `unet`'s.
    #[serde(default)]
    pub init: Option<PathBuf>,
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    pub ema_decay: f64,
    #[serde(default = "default_lambda")]
    pub vlb_lambda: f64,
    #[serde(default = "default_uncond")]
    pub uncond_prob: f64,
    /// How often each kind of description is drawn; absent: the default mix.
    /// Validation always uses the default, so runs with other mixes stay
    /// comparable on it.
    #[serde(default)]
    pub mix: Option<Mix>,
    /// Weight of the grounding loss (TokenCompose's token loss on the caption
    /// words' attention maps, see [`super::grounding`]); 0 or absent: none.
    #[serde(default)]
    pub grounding_weight: f64,
    /// γ of Min-SNR-γ loss weighting (Hang et al. 2023); absent: unweighted.
    #[serde(default)]
    pub min_snr_gamma: Option<f64>,
    /// With Min-SNR-γ: the lowest x_0 weight of a step (truncated SNR,
    /// see [`super::loss`]); absent or 0: plain Min-SNR.
    #[serde(default)]
    pub snr_floor: f64,
    /// The last this many of `steps` decay the learning rate to zero (the
    /// 1 − sqrt cool-down, see [`super::optim`]); 0 keeps it constant.
    #[serde(default)]
    pub cooldown_steps: u64,
    pub checkpoint_every: u64,
    /// Score the EMA on held-out samples every this many steps (and when a
    /// fresh run starts, and at its last step); 0 never does.
    #[serde(default = "default_validate_every")]
    pub validate_every: u64,
    /// Held-out samples per validation (rounded up to whole batches).
    #[serde(default = "default_validate_samples")]
    pub validate_samples: usize,
}

fn default_validate_every() -> u64 {
    1000
}

fn default_validate_samples() -> usize {
    64
}

fn default_lambda() -> f64 {
    0.001
}

fn default_uncond() -> f64 {
    0.1
}

impl TrainConfig {
    pub fn from_file(file: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let mut config: TrainConfig = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
        let dir = file.parent().unwrap_or(Path::new("."));
        if config.encoder.is_relative() {
            config.encoder = dir.join(&config.encoder);
        }
        if let Some(init) = config.init.as_mut().filter(|p| p.is_relative()) {
            *init = dir.join(&*init);
        }
        if !(config.grounding_weight >= 0.0 && config.grounding_weight.is_finite()) {
            anyhow::bail!("{}: grounding_weight ({}) must be a finite number ≥ 0", file.display(), config.grounding_weight);
        }
        if !(config.snr_floor >= 0.0 && config.snr_floor.is_finite()) {
            anyhow::bail!("{}: snr_floor ({}) must be a finite number ≥ 0", file.display(), config.snr_floor);
        }
        if config.snr_floor > 0.0 && config.min_snr_gamma.is_none() {
            anyhow::bail!("{}: snr_floor raises Min-SNR-γ's weights: it needs min_snr_gamma", file.display());
        }
        if config.grounding_weight > 0.0 && (config.low_res.is_some() || config.crop.is_some()) {
            anyhow::bail!("{}: grounding_weight is for base stages trained on whole images (no low_res, no crop)", file.display());
        }
        if let Some(mix) = &config.mix {
            mix.validate().with_context(|| format!("{}: mix", file.display()))?;
        }
        if config.cooldown_steps > config.steps {
            anyhow::bail!("{}: cooldown_steps ({}) exceeds steps ({})", file.display(), config.cooldown_steps, config.steps);
        }
        Ok(config)
    }
}

/// A stage's scheduler config, its noise schedule and what its model predicts.
fn scheduler(value: &serde_json::Value) -> anyhow::Result<(SchedulerConfig, NoiseSchedule, PredictionType)> {
    let config = SchedulerConfig::from_json_str(&value.to_string())?;
    let resolved = config.resolve(config.native_kind().unwrap_or(SamplerKind::Ddpm))?;
    let schedule = NoiseSchedule::from_config(&resolved)?;
    Ok((config, schedule, resolved.prediction_type))
}

/// Where a run keeps its state: `out/checkpoint/` (resumable) and `out/stage/` (exported).
pub struct Run {
    pub config: TrainConfig,
    pub out: PathBuf,
    pub device: Device,
    pub options: RunOptions,
}

/// How a run uses the machine: none of it changes what a step computes in
/// f32, so a run may resume with other options (mixed precision changes the
/// arithmetic, not the data).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub precision: Precision,
    /// Stop (with a checkpoint) once this much wall time has passed.
    pub max_seconds: Option<f64>,
    /// Threads drawing batches ahead; 0 draws them inline.
    pub data_threads: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { precision: Precision::F32, max_seconds: None, data_threads: 0 }
    }
}

/// A run whose loss scale fell this low has non-finite gradients at any scale.
const MIN_LOSS_SCALE: f64 = 1.0 / 1024.0;

impl Run {
    fn checkpoint_dir(&self) -> PathBuf {
        self.out.join("checkpoint")
    }

    /// Trains until `config.steps` (resuming from the last checkpoint if any);
    /// `until` stops earlier (for bounded bursts). Returns the final step.
    pub fn train(&self, until: Option<u64>, progress: &mut dyn FnMut(u64, f64, f64)) -> anyhow::Result<u64> {
        let c = &self.config;
        std::fs::create_dir_all(&self.out)?;
        let unet_config = UNetConfig::from_json(&c.unet.to_string())?;
        let (_, schedule, prediction) = scheduler(&c.scheduler)?;
        if prediction == PredictionType::Sample {
            anyhow::bail!("prediction_type \"sample\": training supports epsilon and v_prediction");
        }
        let noising = match &c.noising {
            Some(v) => scheduler(v)?.1,
            None => schedule.clone(),
        };
        let mut encoder = TextEncoder::load(&c.encoder, &TextEncoderOptions { max_length: Some(c.max_length), ..Default::default() })?;
        encoder.to(self.device, Kind::Float)?;
        let ckpt = self.checkpoint_dir();
        let resuming = ckpt.join("optimizer.safetensors").is_file();
        let mut unet = if resuming {
            LoadedUNet::load(&ckpt, self.device, Kind::Float)?
        } else {
            let unet = LoadedUNet::random(&unet_config)?;
            if let Some(init) = &c.init {
                let dir = if init.join("unet").is_dir() { init.join("unet") } else { init.clone() };
                let files = weights::checkpoint_files(&dir, "diffusion_pytorch_model")
                    .with_context(|| format!("the init weights in {}", dir.display()))?;
                // Strict: every variable, by name and shape.
                weights::load_into(&unet.vs, &files, &|_| false).with_context(|| format!("the init weights in {}", dir.display()))?;
            }
            unet
        };
        unet.unfreeze();
        unet.vs.set_device(self.device);
        let optim = OptimConfig {
            lr: c.lr,
            warmup_steps: c.warmup_steps,
            ema_decay: c.ema_decay,
            total_steps: c.steps,
            cooldown_steps: c.cooldown_steps,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&unet.vs, optim);
        let precision = self.options.precision;
        if precision == Precision::Fp16 {
            if !self.device.is_cuda() {
                anyhow::bail!("fp16 mixed precision needs a CUDA device (training on {:?})", self.device);
            }
            opt = opt.with_loss_scaling(LossScale::default());
        }
        if resuming {
            opt.load(&ckpt.join("optimizer.safetensors"))?;
        }
        let source = BatchSource {
            data: StageData { size: c.size, low_res: c.low_res, max_noise_level: c.max_noise_level, crop: c.crop },
            config: StepConfig { batch: c.batch, uncond_prob: c.uncond_prob, seed: c.seed },
            dataset: Dataset::with_mix(c.seed, c.mix.unwrap_or_default())?,
            train_steps: schedule.len() as i64,
        };
        let first = opt.step_count();
        let prefetch = (self.options.data_threads > 0).then(|| Prefetcher::spawn(source.clone(), first, self.options.data_threads));
        let trainer = StageTrainer {
            unet: &unet,
            encoder: &encoder,
            schedule: &schedule,
            noising: &noising,
            loss: HybridLoss::new(&schedule, c.vlb_lambda).with_prediction(prediction).with_min_snr(c.min_snr_gamma).with_snr_floor(c.snr_floor),
            source,
            precision,
            prefetch,
            grounding: c.grounding_weight,
        };
        let end = until.unwrap_or(c.steps).min(c.steps);
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(self.out.join("train.log"))?;
        // Unix time on every line: a resumed run's log still adds up to its wall time.
        let unix = || SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        writeln!(
            log,
            "# {} at step {first} on {:?}, precision {}, {} data threads, unix {}",
            if resuming { "resumed" } else { "started" },
            self.device,
            precision.name(),
            self.options.data_threads,
            unix()
        )?;
        if self.device.is_cuda() {
            // Every step has the same shapes: let cuDNN pick the fastest convolutions once.
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let validation = (c.validate_every > 0).then(|| Validation::new(&trainer.source, c.validate_samples));
        let validate = |opt: &mut Optimizer, log: &mut std::fs::File| -> anyhow::Result<()> {
            let Some(v) = &validation else { return Ok(()) };
            opt.swap_ema();
            let report = v.run(&trainer);
            opt.swap_ema();
            writeln!(log, "{} unix {}", report?.log_line(opt.step_count()), unix())?;
            Ok(())
        };
        if first == 0 {
            // The starting point: random, or the init weights being fine-tuned.
            validate(&mut opt, &mut log)?;
        }
        let started = Instant::now();
        let out_of_time = || self.options.max_seconds.is_some_and(|s| started.elapsed().as_secs_f64() >= s);
        while opt.step_count() < end && !out_of_time() {
            let r = trainer.step(&mut opt)?;
            let done = opt.step_count();
            if !r.optim.applied {
                let scale = opt.loss_scale();
                writeln!(log, "# step {} skipped: gradients overflowed, loss scale now {scale}", done + 1)?;
                if scale < MIN_LOSS_SCALE {
                    self.checkpoint(&unet, &opt)?;
                    anyhow::bail!("training diverged: the gradients overflow even at loss scale {scale}");
                }
                continue;
            }
            let rate = (done - first) as f64 * c.batch as f64 / started.elapsed().as_secs_f64();
            progress(done, r.loss, rate);
            let scale = r.optim.loss_scale.map(|s| format!(" loss_scale {s}")).unwrap_or_default();
            let ground = r.grounding.map(|g| format!(" ground {g:.5}")).unwrap_or_default();
            writeln!(
                log,
                "step {done} loss {:.5} mse {:.5} vlb {:.5}{ground} lr {:.2e} grad_norm {:.3} images/s {rate:.1} wait_ms {:.1}{scale} unix {}",
                r.loss,
                r.mse,
                r.vlb,
                r.optim.lr,
                r.optim.grad_norm,
                r.data_wait_ms,
                unix()
            )?;
            if done.is_multiple_of(c.checkpoint_every) || done == end {
                self.checkpoint(&unet, &opt)?;
            }
            if c.validate_every > 0 && (done.is_multiple_of(c.validate_every) || done == end) {
                validate(&mut opt, &mut log)?;
            }
        }
        let done = opt.step_count();
        if done > first && !done.is_multiple_of(c.checkpoint_every) && done != end {
            // Stopped by the time limit between checkpoints.
            self.checkpoint(&unet, &opt)?;
        }
        if c.validate_every > 0 && done > first && !done.is_multiple_of(c.validate_every) && done != end {
            // Likewise between validations: the log ends with the scores of the weights it stopped with.
            validate(&mut opt, &mut log)?;
        }
        Ok(done)
    }

    /// Writes the checkpoint to a fresh folder, then renames it into place: a
    /// crash mid-write leaves the previous checkpoint intact.
    fn checkpoint(&self, unet: &LoadedUNet, opt: &Optimizer) -> anyhow::Result<()> {
        super::checkpoint::replace(&self.checkpoint_dir(), |tmp| {
            unet.save(tmp, Kind::Float)?;
            Ok(opt.save(&tmp.join("optimizer.safetensors"))?)
        })
    }

    /// Writes the EMA weights of the last checkpoint as a stage folder (f16
    /// weights, scheduler configs, `model_index.json`).
    pub fn export(&self, dir: &Path) -> anyhow::Result<()> {
        let c = &self.config;
        let ckpt = self.checkpoint_dir();
        let mut unet = LoadedUNet::load(&ckpt, Device::Cpu, Kind::Float)?;
        unet.unfreeze();
        let mut opt = Optimizer::new(&unet.vs, OptimConfig::default());
        opt.load(&ckpt.join("optimizer.safetensors"))?;
        let ema = opt.ema();
        tch::no_grad(|| {
            for (name, var) in unet.vs.variables() {
                let value: &Tensor = &ema[&name];
                var.shallow_clone().copy_(value);
            }
        });
        let (sched, _, _) = scheduler(&c.scheduler)?;
        let noising = c.noising.as_ref().map(scheduler).transpose()?.map(|(cfg, _, _)| cfg);
        let kind = if c.low_res.is_some() { StageKind::SuperResolution } else { StageKind::Base };
        let files = StageFiles { kind, unet: &unet, scheduler: &sched, noising: noising.as_ref(), weights: Kind::Half };
        write_stage(dir, &files)?;
        Ok(())
    }
}
