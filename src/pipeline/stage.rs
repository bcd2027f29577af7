//! One stage of the cascade: its UNet, its scheduler and, for super-resolution
//! stages, the scheduler that noises the conditioning image; loaded from a folder
//! in diffusers' IF layout and checked against the manifest's defaults.

use std::path::{Path, PathBuf};

use tch::{Device, Kind};

use super::error::{PipelineError, Result};
use super::manifest::StageEntry;
use crate::diffusion::{SamplerKind, Scheduler, SchedulerConfig};
use crate::nn::unet::config::SampleSize;
use crate::nn::unet::LoadedUNet;
use crate::nn::layers::BatchOfOne;

/// Images are RGB.
pub const IMAGE_CHANNELS: i64 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    /// Samples from noise (UNet input: the noisy image).
    Base,
    /// Samples conditioned on the previous stage's upsampled output (UNet input:
    /// the noisy image concatenated with it, as ADM/SR3/IF do).
    SuperResolution,
}

/// A stage's settings when a request does not override them.
#[derive(Debug, Clone, PartialEq)]
pub struct StageDefaults {
    pub sampler: SamplerKind,
    pub steps: usize,
    pub guidance_scale: f32,
    pub eta: f64,
    /// DDIM derives ε̂ from the clipped x̂_0 (the manifest's `use_clipped_model_output`).
    pub clipped_model_output: bool,
    pub noise_level: Option<i64>,
    /// Layout guidance of the base stage (0: none).
    pub layout_guidance_scale: f32,
    /// Super-resolution stages: the share of the schedule run from the
    /// previous stage's upsampled output (1: from pure noise; the base
    /// stage's is 1, its image-to-image strength is the request's).
    pub strength: f64,
}

/// What validating a request needs to know about a stage: cheap to clone, so the
/// HTTP front end can check requests without holding the models.
#[derive(Debug, Clone)]
pub struct StageLimits {
    pub name: String,
    pub kind: StageKind,
    /// Output (height, width).
    pub size: (i64, i64),
    pub defaults: StageDefaults,
    pub train_steps: usize,
    /// The largest noise-augmentation level (SR stages).
    pub max_noise_level: i64,
    /// Lets validation check that a step count is reachable with the spacing.
    pub scheduler: Scheduler,
    /// The side of the images the cascade's noised CLIP reads, on the stage it
    /// can guide (the base stage, when the manifest names a `clip`).
    pub clip_image_size: Option<i64>,
}

#[derive(Debug)]
pub struct Stage {
    pub name: String,
    pub dir: PathBuf,
    pub kind: StageKind,
    /// Output (height, width).
    pub size: (i64, i64),
    pub unet: LoadedUNet,
    pub scheduler: Scheduler,
    /// SR only: the schedule used to noise the conditioning image.
    pub noising: Option<Scheduler>,
    pub defaults: StageDefaults,
    /// Where this stage's UNet gives a single row the bits of a batch.
    pub single_row: BatchOfOne,
}

/// The scheduler in `dir/folder/scheduler_config.json`, its errors naming that file.
pub(crate) fn load_scheduler(dir: &Path, folder: &str) -> Result<Scheduler> {
    let file = dir.join(folder).join("scheduler_config.json");
    let config = SchedulerConfig::from_file(&file)
        .map_err(|e| PipelineError::model(&file, e.to_string()))?
        .map_err(|e| PipelineError::model(&file, e.to_string()))?;
    Scheduler::new(config).map_err(|e| PipelineError::model(&file, e.to_string()))
}

impl Stage {
    /// Loads the stage `entry` of the manifest in `root` onto `device` in `kind`.
    pub fn load(root: &Path, entry: &StageEntry, index: usize, device: Device, kind: Kind) -> Result<Self> {
        let dir = root.join(&entry.path);
        let unet_dir = dir.join("unet");
        let unet = LoadedUNet::load(&unet_dir, device, kind)?;
        let config = unet.model.config();
        let config_file = unet_dir.join("config.json");
        let stage_kind = match config.in_channels {
            IMAGE_CHANNELS => StageKind::Base,
            c if c == 2 * IMAGE_CHANNELS => StageKind::SuperResolution,
            c => return Err(PipelineError::model(&config_file, format!("in_channels {c}: a stage takes 3 (base) or 6 (super-resolution)"))),
        };
        if config.out_channels != IMAGE_CHANNELS && config.out_channels != 2 * IMAGE_CHANNELS {
            return Err(PipelineError::model(&config_file, format!("out_channels {}: expected 3, or 6 with learned variance", config.out_channels)));
        }
        if config.class_embed_type.as_deref().is_some_and(|c| c != "timestep") {
            // An unCLIP decoder (`identity`) is conditioned on a CLIP image
            // embedding, which only a prior can give it.
            return Err(PipelineError::model(&config_file, "class_embed_type: a cascade stage takes none or `timestep` (the noise level)"));
        }
        if (index == 0) != (stage_kind == StageKind::Base) {
            return Err(PipelineError::model(&config_file, "the first stage must be a base model and every later one super-resolution"));
        }
        let size = match config.sample_size {
            Some(SampleSize::Square(s)) => (s, s),
            Some(SampleSize::HeightWidth([h, w])) => (h, w),
            None => return Err(PipelineError::model(&config_file, "`sample_size` is needed: it is the stage's output size")),
        };
        let m = unet.model.size_multiple();
        if size.0 % m != 0 || size.1 % m != 0 {
            return Err(PipelineError::model(&config_file, format!("sample_size {size:?} is not a multiple of {m}")));
        }
        let scheduler = load_scheduler(&dir, "scheduler")?;
        let noising = match stage_kind {
            StageKind::Base => None,
            // IF's super-resolution folders call it `image_noising_scheduler`.
            StageKind::SuperResolution => Some(load_scheduler(&dir, "image_noising_scheduler")?),
        };
        let manifest_field = |field: &str, reason: String| PipelineError::model(root.join(super::manifest::MANIFEST_FILE), format!("stage `{}`: `{field}` {reason}", entry.name));
        let sampler: SamplerKind = entry.sampler.parse().map_err(|e: crate::diffusion::DiffusionError| manifest_field("sampler", e.to_string()))?;
        let train_steps = scheduler.schedule().len();
        if entry.steps == 0 || entry.steps > train_steps {
            return Err(manifest_field("steps", format!("{} is outside 1..={train_steps}", entry.steps)));
        }
        let noise_level = match (stage_kind, entry.noise_level) {
            (StageKind::Base, None) => None,
            (StageKind::Base, Some(_)) => return Err(manifest_field("noise_level", "is only for super-resolution stages".into())),
            (StageKind::SuperResolution, level) => {
                let level = level.unwrap_or(0);
                let max = noising.as_ref().map_or(0, |s| s.schedule().len() as i64 - 1);
                if !(0..=max).contains(&level) {
                    return Err(manifest_field("noise_level", format!("{level} is outside 0..={max}")));
                }
                Some(level)
            }
        };
        let strength = match (stage_kind, entry.strength) {
            (_, None) => 1.0,
            (StageKind::Base, Some(_)) => {
                return Err(manifest_field("strength", "is only for super-resolution stages (a base stage starts from noise or the request's image)".into()))
            }
            (StageKind::SuperResolution, Some(s)) if s.is_finite() && s > 0.0 && s <= 1.0 => s,
            (StageKind::SuperResolution, Some(s)) => return Err(manifest_field("strength", format!("{s} is outside (0, 1]"))),
        };
        Ok(Self {
            name: entry.name.clone(),
            dir,
            kind: stage_kind,
            size,
            unet,
            scheduler,
            noising,
            defaults: StageDefaults { sampler, steps: entry.steps, guidance_scale: entry.guidance_scale, eta: entry.eta, clipped_model_output: entry.use_clipped_model_output, noise_level, layout_guidance_scale: entry.layout_guidance_scale, strength },
            single_row: BatchOfOne::default(),
        })
    }

    pub fn limits(&self) -> StageLimits {
        StageLimits {
            name: self.name.clone(),
            kind: self.kind,
            size: self.size,
            defaults: self.defaults.clone(),
            train_steps: self.scheduler.schedule().len(),
            max_noise_level: self.noising.as_ref().map_or(0, |s| s.schedule().len() as i64 - 1),
            scheduler: self.scheduler.clone(),
            clip_image_size: None,
        }
    }

    /// The width of the text tokens this stage's UNet reads.
    pub fn text_width(&self) -> i64 {
        let config = self.unet.model.config();
        config.encoder_hid_dim.unwrap_or_else(|| match &config.cross_attention_dim {
            crate::nn::unet::config::PerBlock::One(d) => *d,
            crate::nn::unet::config::PerBlock::Each(v) => v[0],
        })
    }

    /// Whether the UNet takes the noise-augmentation level as its class label.
    pub fn takes_noise_level(&self) -> bool {
        self.unet.model.config().class_embed_type.is_some()
    }
}
