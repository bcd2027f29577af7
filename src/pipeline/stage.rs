//! One stage of the cascade: its UNet, its scheduler and, for super-resolution
//! stages, the scheduler that noises the conditioning image; loaded from a folder
//! in diffusers' IF layout and checked against the manifest's defaults.
//!
//! A cascade may instead begin as DALL-E 2's unCLIP does (Ramesh et al. 2022):
//! a `prior` stage, whose network is a `PriorTransformer` sampling a CLIP
//! image embedding from the caption's CLIP text embedding, then a `decoder`
//! stage, a UNet that reads that embedding through an `UnCLIPTextProjModel`.
//! Their folders are laid out as diffusers' `UnCLIPPipeline` saves them:
//! `prior/` with `prior_scheduler/`, and `decoder/` with `text_proj/` and
//! `decoder_scheduler/`, so both stages can name the same folder.

use std::path::{Path, PathBuf};

use tch::{Device, Kind};

use super::error::{PipelineError, Result};
use super::manifest::{StageEntry, StageEntryKind};
use crate::diffusion::{SamplerKind, Scheduler, SchedulerConfig};
use crate::nn::unclip::{LoadedPrior, LoadedTextProj};
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
    /// unCLIP's prior: samples a CLIP image embedding `[n, D]` from the
    /// caption's CLIP text embedding.
    Prior,
    /// unCLIP's decoder: samples from noise conditioned on the prior's
    /// embedding (through `text_proj`) and the caption's CLIP token states.
    Decoder,
}

impl StageKind {
    /// The name `/info` and `diffusiond info` show.
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Base => "base",
            StageKind::SuperResolution => "super_resolution",
            StageKind::Prior => "prior",
            StageKind::Decoder => "decoder",
        }
    }

    /// Whether the stage makes images from noise (the base stage, or unCLIP's decoder).
    pub fn draws_from_noise(self) -> bool {
        matches!(self, StageKind::Base | StageKind::Decoder)
    }
}

/// How a stage's output size reads: `WxH`, or a prior's `D-d CLIP embedding`.
pub fn size_label(kind: StageKind, (h, w): (i64, i64)) -> String {
    match kind {
        StageKind::Prior => format!("{w}-d CLIP embedding"),
        _ => format!("{w}x{h}"),
    }
}

/// The network a stage runs at each step.
#[derive(Debug)]
pub enum Network {
    UNet(LoadedUNet),
    Prior(LoadedPrior),
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
    /// Output (height, width); a prior's is (1, D): one embedding per image.
    pub size: (i64, i64),
    pub network: Network,
    /// A decoder's text projection (what it reads the prior's embedding through).
    pub text_proj: Option<LoadedTextProj>,
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
        if entry.kind == Some(StageEntryKind::Prior) {
            return Self::load_prior(root, entry, index, device, kind);
        }
        let decoder = entry.kind == Some(StageEntryKind::Decoder);
        let unet_dir = dir.join(if decoder { "decoder" } else { "unet" });
        let unet = LoadedUNet::load(&unet_dir, device, kind)?;
        let config = unet.model.config();
        let config_file = unet_dir.join("config.json");
        let stage_kind = match config.in_channels {
            IMAGE_CHANNELS if decoder => StageKind::Decoder,
            IMAGE_CHANNELS => StageKind::Base,
            c if c == 2 * IMAGE_CHANNELS && !decoder => StageKind::SuperResolution,
            c => return Err(PipelineError::model(&config_file, format!("in_channels {c}: a stage takes 3 (base, decoder) or 6 (super-resolution)"))),
        };
        if config.out_channels != IMAGE_CHANNELS && config.out_channels != 2 * IMAGE_CHANNELS {
            return Err(PipelineError::model(&config_file, format!("out_channels {}: expected 3, or 6 with learned variance", config.out_channels)));
        }
        let class_embed = config.class_embed_type.as_deref();
        if decoder && class_embed != Some("identity") {
            return Err(PipelineError::model(&config_file, "class_embed_type: an unCLIP decoder takes `identity` (the projected CLIP embedding)"));
        }
        if !decoder && class_embed.is_some_and(|c| c != "timestep") {
            // An unCLIP decoder (`identity`) is conditioned on a CLIP image
            // embedding, which only a prior stage can give it.
            return Err(PipelineError::model(&config_file, "class_embed_type: a cascade stage takes none or `timestep` (the noise level); an unCLIP decoder is a stage of kind `decoder`"));
        }
        let placed = match (index, stage_kind) {
            (0, StageKind::Base) | (1, StageKind::Decoder) => true,
            (i, StageKind::SuperResolution) => i > 0,
            _ => false,
        };
        if !placed {
            return Err(PipelineError::model(&config_file, "the first stage must be a base model (or a prior, then a decoder) and every later one super-resolution"));
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
        let text_proj = if decoder {
            let proj = LoadedTextProj::load(&dir.join("text_proj"), device, kind)?;
            let (time, cross) = (proj.model.config().time_embed_dim, proj.model.config().cross_attention_dim);
            let spec = config.spec()?;
            let width = spec.down.first().map_or(0, |b| b.cross_attention_dim);
            if time != spec.time_embed_dim || cross != width || config.encoder_hid_dim.is_some() {
                return Err(PipelineError::model(
                    dir.join("text_proj/config.json"),
                    format!("projects to time_embed_dim {time} and cross_attention_dim {cross}; the decoder reads {} and {width} (and no encoder_hid_proj)", spec.time_embed_dim),
                ));
            }
            Some(proj)
        } else {
            None
        };
        let scheduler = load_scheduler(&dir, if decoder { "decoder_scheduler" } else { "scheduler" })?;
        let noising = match stage_kind {
            StageKind::Base | StageKind::Decoder | StageKind::Prior => None,
            // IF's super-resolution folders call it `image_noising_scheduler`.
            StageKind::SuperResolution => Some(load_scheduler(&dir, "image_noising_scheduler")?),
        };
        let defaults = entry_defaults(root, entry, stage_kind, &scheduler, noising.as_ref())?;
        Ok(Self {
            name: entry.name.clone(),
            dir,
            kind: stage_kind,
            size,
            network: Network::UNet(unet),
            text_proj,
            scheduler,
            noising,
            defaults,
            single_row: BatchOfOne::default(),
        })
    }

    /// A `prior` stage: `prior/` and `prior_scheduler/` under the entry's path.
    fn load_prior(root: &Path, entry: &StageEntry, index: usize, device: Device, kind: Kind) -> Result<Self> {
        let dir = root.join(&entry.path);
        let prior_dir = dir.join("prior");
        if index != 0 {
            return Err(PipelineError::model(root.join(super::manifest::MANIFEST_FILE), format!("stage `{}`: a prior is the first stage (its decoder follows it)", entry.name)));
        }
        let prior = LoadedPrior::load(&prior_dir, device, kind)?;
        let config = prior.model.config();
        if config.encoder_hid_proj_type.is_some() || config.num_embeddings != 0 {
            return Err(PipelineError::model(prior_dir.join("config.json"), "a cascade's prior reads the caption's CLIP text embedding only (encoder_hid_proj_type null, num_embeddings 0)"));
        }
        let width = config.embedding_dim;
        let scheduler = load_scheduler(&dir, "prior_scheduler")?;
        let defaults = entry_defaults(root, entry, StageKind::Prior, &scheduler, None)?;
        Ok(Self {
            name: entry.name.clone(),
            dir,
            kind: StageKind::Prior,
            size: (1, width),
            network: Network::Prior(prior),
            text_proj: None,
            scheduler,
            noising: None,
            defaults,
            single_row: BatchOfOne::default(),
        })
    }

    /// The UNet of a base, decoder or super-resolution stage.
    pub fn unet(&self) -> Result<&LoadedUNet> {
        match &self.network {
            Network::UNet(unet) => Ok(unet),
            Network::Prior(_) => Err(PipelineError::invalid("stages", format!("stage `{}` is a prior, not a UNet", self.name))),
        }
    }

    pub fn device(&self) -> Device {
        match &self.network {
            Network::UNet(unet) => unet.vs.device(),
            Network::Prior(prior) => prior.vs.device(),
        }
    }

    /// The kind the network's weights are in.
    pub fn weight_kind(&self) -> Kind {
        match &self.network {
            Network::UNet(unet) => unet.kind(),
            Network::Prior(prior) => prior.vs.variables().values().next().map_or(Kind::Float, tch::Tensor::kind),
        }
    }

    pub fn parameter_count(&self) -> i64 {
        let own = match &self.network {
            Network::UNet(unet) => unet.parameter_count(),
            Network::Prior(prior) => prior.parameter_count(),
        };
        own + self.text_proj.as_ref().map_or(0, |p| p.vs.variables().values().map(tch::Tensor::numel).sum::<usize>() as i64)
    }

    /// The output size as [`size_label`] writes it.
    pub fn size_label(&self) -> String {
        size_label(self.kind, self.size)
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

    /// The width of the text tokens this stage reads: a UNet's token width
    /// (a decoder's before its text projection: the CLIP's width), a prior's
    /// CLIP text embedding width.
    pub fn text_width(&self) -> i64 {
        if let Some(proj) = &self.text_proj {
            return proj.model.config().clip_embeddings_dim;
        }
        match &self.network {
            Network::Prior(prior) => prior.model.config().embedding_dim,
            Network::UNet(unet) => {
                let config = unet.model.config();
                config.encoder_hid_dim.unwrap_or_else(|| match &config.cross_attention_dim {
                    crate::nn::unet::config::PerBlock::One(d) => *d,
                    crate::nn::unet::config::PerBlock::Each(v) => v[0],
                })
            }
        }
    }

    /// Whether the UNet takes the noise-augmentation level as its class label.
    pub fn takes_noise_level(&self) -> bool {
        self.kind == StageKind::SuperResolution && self.unet().is_ok_and(|u| u.model.config().class_embed_type.is_some())
    }
}

/// A stage's defaults from its manifest entry, checked against its kind and
/// schedules; errors name the manifest and the field.
fn entry_defaults(root: &Path, entry: &StageEntry, stage_kind: StageKind, scheduler: &Scheduler, noising: Option<&Scheduler>) -> Result<StageDefaults> {
    let manifest_field = |field: &str, reason: String| PipelineError::model(root.join(super::manifest::MANIFEST_FILE), format!("stage `{}`: `{field}` {reason}", entry.name));
    let sampler: SamplerKind = entry.sampler.parse().map_err(|e: crate::diffusion::DiffusionError| manifest_field("sampler", e.to_string()))?;
    if (stage_kind == StageKind::Prior) != (entry.kind == Some(super::manifest::StageEntryKind::Prior)) {
        return Err(manifest_field("kind", "must be `prior` exactly for a prior's folder".into()));
    }
    // The stage that draws the image from noise is the one guided.
    if entry.layout_guidance_scale != 0.0 && !stage_kind.draws_from_noise() {
        return Err(manifest_field("layout_guidance_scale", "is only for a base stage (or an unCLIP decoder)".into()));
    }
    let train_steps = scheduler.schedule().len();
    if entry.steps == 0 || entry.steps > train_steps {
        return Err(manifest_field("steps", format!("{} is outside 1..={train_steps}", entry.steps)));
    }
    let noise_level = match (stage_kind, entry.noise_level) {
        (StageKind::Base | StageKind::Prior | StageKind::Decoder, None) => None,
        (StageKind::Base | StageKind::Prior | StageKind::Decoder, Some(_)) => return Err(manifest_field("noise_level", "is only for super-resolution stages".into())),
        (StageKind::SuperResolution, level) => {
            let level = level.unwrap_or(0);
            let max = noising.map_or(0, |s| s.schedule().len() as i64 - 1);
            if !(0..=max).contains(&level) {
                return Err(manifest_field("noise_level", format!("{level} is outside 0..={max}")));
            }
            Some(level)
        }
    };
    let strength = match (stage_kind, entry.strength) {
        (_, None) => 1.0,
        (StageKind::Base | StageKind::Prior | StageKind::Decoder, Some(_)) => {
            return Err(manifest_field("strength", "is only for super-resolution stages (a base stage starts from noise or the request's image)".into()))
        }
        (StageKind::SuperResolution, Some(s)) if s.is_finite() && s > 0.0 && s <= 1.0 => s,
        (StageKind::SuperResolution, Some(s)) => return Err(manifest_field("strength", format!("{s} is outside (0, 1]"))),
    };
    Ok(StageDefaults {
    sampler,
    steps: entry.steps,
    guidance_scale: entry.guidance_scale,
    eta: entry.eta,
    clipped_model_output: entry.use_clipped_model_output,
    noise_level,
    layout_guidance_scale: entry.layout_guidance_scale,
    strength,
    })
}
