//! A loaded cascade — text encoder and stages on one device — and the whole
//! generation: prompt → text embeddings → guided base stage → super-resolution
//! stages → RGB images with their records.
//!
//! The structure is that of GLIDE (Nichol et al. 2021), Imagen (Saharia et al.
//! 2022) and DeepFloyd IF: a frozen text encoder conditions every stage; each
//! later stage upsamples the previous one's output. The empty prompt's
//! embedding, the unconditional half of classifier-free guidance, is computed
//! once at load time.
//!
//! A cascade may also hold a noised CLIP (the manifest's `clip`), with which
//! requests add GLIDE's CLIP guidance (Nichol et al. 2022, §2.4) to the base
//! stage (see `pipeline::clip_guidance`) or ADM's classifier guidance, the
//! CLIP's softmax over caption classes as the noisy classifier (see
//! `pipeline::classifier_guidance`).
//!
//! A cascade may be DALL-E 2's unCLIP (Ramesh et al. 2022) instead: a prior
//! stage samples a CLIP image embedding from the caption's CLIP text
//! embedding, a decoder stage draws the image from it, and super-resolution
//! stages follow as usual. Both read the caption through the cascade's CLIP
//! (its text tower over the encoder's states), so an unCLIP cascade needs one.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use image::RgbImage;
use tch::{Device, Kind, Tensor};

use super::classifier_guidance::ClassifierJob;
use super::classifier_labels;
use super::clip_guidance::{ClipGuide, ClipJob};
use super::prompt_layout;
use super::layout_guidance::LayoutJob;
use super::denoise::{JobInputs, ModelRows, NoiseTarget, StageInit, StageInversion, StageJob};
use super::error::{PipelineError, Result};
use super::format::{self, Output};
use super::manifest::Manifest;
use super::png::{self, ImageRecord, StageRecord};
use super::request::{plan, stage_stream, GenerationRequest, RequestSpec};
use super::source::{slerp_rows, NoiseMix, Source};
use super::stage::{Network, Stage, StageKind, StageLimits};
use crate::diffusion::{BatchNoise, SamplerOptions};
use crate::nn::device::{DeviceSetting, Precision};
use crate::nn::text::{TextEncoder, TextEncoderOptions};
use crate::nn::unclip::PriorInput;
use crate::nn::unet::UNetInput;

/// Where and in which precision a cascade runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub device: DeviceSetting,
    pub precision: Precision,
}

/// Progress of a generation, reported after every denoising step.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Index among the stages this request runs.
    pub stage: usize,
    pub stages: usize,
    pub stage_name: &'a str,
    /// Steps finished in this stage.
    pub step: usize,
    pub total_steps: usize,
}

/// One finished image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub index: usize,
    pub seed: u64,
    pub image: RgbImage,
    pub record: ImageRecord,
}

impl GeneratedImage {
    /// The PNG file, with the generation parameters in its text chunks.
    pub fn png(&self) -> Result<Vec<u8>> {
        png::encode(&self.image, &self.record)
    }

    /// The file in `output`'s format.
    pub fn encode(&self, output: &Output) -> Result<Vec<u8>> {
        format::encode(&self.image, &self.record, output)
    }
}

/// What the rest of the server needs to know about a loaded cascade, without
/// holding it (the models stay on the compute thread).
#[derive(Debug, Clone)]
pub struct CascadeInfo {
    pub name: String,
    pub description: Option<String>,
    pub device: String,
    pub precision: String,
    /// `bert` or `t5`.
    pub encoder_kind: String,
    pub encoder_hidden_size: i64,
    pub encoder_max_length: usize,
    /// Stage limits and defaults (for validating requests), with parameter counts.
    pub stages: Vec<(StageLimits, i64)>,
}

impl CascadeInfo {
    pub fn limits(&self) -> Vec<StageLimits> {
        self.stages.iter().map(|(l, _)| l.clone()).collect()
    }
}

/// A job's text conditioning, `[1 or n, L, D]` each: the prompt's tokens (one
/// row per frame when interpolating between two prompts), the negative (or
/// empty) prompt's, and the tokens of the prompt an image is inverted under.
/// On an unCLIP cascade, `clip` holds what its prior and decoder read.
#[derive(Debug)]
pub struct JobText {
    pub cond: Tensor,
    pub uncond: Tensor,
    pub source: Option<Tensor>,
    pub clip: Option<ClipText>,
}

/// The captions of an unCLIP job through the cascade's CLIP: the prompt's
/// and the negative (or empty) prompt's CLIP embeddings `[1, D]` and token
/// states `[1, L, D]`, as (embeddings, tokens); and, for image variations,
/// the source image's CLIP image embedding `[1, D]`.
#[derive(Debug)]
pub struct ClipText {
    pub cond: (Tensor, Tensor),
    pub uncond: (Tensor, Tensor),
    pub image: Option<Tensor>,
}

impl ClipText {
    fn shallow_clone(&self) -> Self {
        let pair = |(a, b): &(Tensor, Tensor)| (a.shallow_clone(), b.shallow_clone());
        Self { cond: pair(&self.cond), uncond: pair(&self.uncond), image: self.image.as_ref().map(Tensor::shallow_clone) }
    }
}

impl JobText {
    pub fn shallow_clone(&self) -> Self {
        Self {
            cond: self.cond.shallow_clone(),
            uncond: self.uncond.shallow_clone(),
            source: self.source.as_ref().map(Tensor::shallow_clone),
            clip: self.clip.as_ref().map(ClipText::shallow_clone),
        }
    }
}

pub struct Cascade {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub encoder: TextEncoder,
    pub stages: Vec<Stage>,
    /// The noised CLIP that can guide the base stage (the manifest's `clip`).
    clip: Option<ClipGuide>,
    /// The empty prompt's tokens, `[1, L, D]`, in the UNets' kind.
    null_text: Tensor,
    device: Device,
    kind: Kind,
}

impl std::fmt::Debug for Cascade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cascade").field("dir", &self.dir).field("stages", &self.stages.len()).finish()
    }
}

impl Cascade {
    /// Loads `dir` (its `cascade.json` and everything it names). Every problem —
    /// a missing file, a bad config, a stage whose text width does not match the
    /// encoder — is an error naming the file.
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let manifest = Manifest::from_dir(dir)?;
        let device = options.device.resolve();
        let kind = options.precision.kind_for(device);
        let enc = &manifest.text_encoder;
        let encoder_options = TextEncoderOptions {
            max_length: enc.max_length,
            pad_token: None,
            tokenizer_dir: enc.tokenizer.as_ref().map(|t| dir.join(t)),
        };
        let mut encoder = TextEncoder::load(&dir.join(&enc.path), &encoder_options)?;
        encoder.to(device, kind)?;
        let mut stages = Vec::with_capacity(manifest.stages.len());
        for (i, entry) in manifest.stages.iter().enumerate() {
            let stage = Stage::load(dir, entry, i, device, kind)?;
            let unclip = matches!(stage.kind, StageKind::Prior | StageKind::Decoder);
            if !unclip && stage.text_width() != encoder.hidden_size() {
                return Err(PipelineError::model(
                    stage.dir.join("unet/config.json"),
                    format!("reads {}-wide text tokens, the encoder gives {}", stage.text_width(), encoder.hidden_size()),
                ));
            }
            if let Some(prev) = stages.last().filter(|p: &&Stage| p.kind != StageKind::Prior) {
                let prev: &Stage = prev;
                if stage.size.0 < prev.size.0 || stage.size.1 < prev.size.1 {
                    return Err(PipelineError::model(&stage.dir, format!("output {:?} is smaller than the previous stage's {:?}", stage.size, prev.size)));
                }
            }
            stages.push(stage);
        }
        let first_image = stages.iter().find(|s| s.kind.draws_from_noise()).unwrap_or(&stages[0]);
        let clip = match &manifest.clip {
            Some(entry) => Some(ClipGuide::load(dir, entry, &encoder, first_image, device)?),
            None => None,
        };
        if stages[0].kind == StageKind::Prior {
            check_unclip(dir, &stages, clip.as_ref())?;
        }
        let null_text = tch::no_grad(|| encoder.encode(&[""]))?.hidden.to_kind(kind);
        Ok(Self { dir: dir.to_owned(), manifest, encoder, stages, clip, null_text, device, kind })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The noised CLIP for CLIP guidance, when the manifest names one.
    pub fn clip(&self) -> Option<&ClipGuide> {
        self.clip.as_ref()
    }

    /// Validates `spec` against this cascade.
    pub fn plan(&self, spec: &RequestSpec) -> Result<GenerationRequest> {
        plan(spec, &self.limits())
    }

    pub fn info(&self) -> CascadeInfo {
        CascadeInfo {
            name: self.manifest.name.clone(),
            description: self.manifest.description.clone(),
            device: match self.device {
                Device::Cpu => "cpu".into(),
                Device::Cuda(i) => format!("cuda:{i}"),
                other => format!("{other:?}"),
            },
            precision: match self.kind {
                Kind::Half => "f16".into(),
                Kind::BFloat16 => "bf16".into(),
                _ => "f32".into(),
            },
            encoder_kind: match self.encoder.config() {
                crate::nn::text::EncoderConfig::Bert(_) => "bert".into(),
                crate::nn::text::EncoderConfig::T5(_) => "t5".into(),
                crate::nn::text::EncoderConfig::Clip(_) => "clip".into(),
            },
            encoder_hidden_size: self.encoder.hidden_size(),
            encoder_max_length: self.encoder.max_length(),
            stages: self.limits().into_iter().zip(&self.stages).map(|(l, s)| (l, s.parameter_count())).collect(),
        }
    }

    /// Every stage's limits and defaults, for validating requests elsewhere.
    pub fn limits(&self) -> Vec<StageLimits> {
        let mut limits: Vec<StageLimits> = self.stages.iter().map(Stage::limits).collect();
        // Only a base stage is CLIP-guided (an unCLIP cascade reads its CLIP otherwise).
        if let (Some(clip), Some(base)) = (&self.clip, limits.first_mut().filter(|l| l.kind == StageKind::Base)) {
            base.clip_image_size = Some(clip.image_size());
        }
        limits
    }

    /// Runs the UNet of `stage` on `rows` (possibly several jobs' rows concatenated).
    ///
    /// A single row gets the bits it would have in a larger batch: alone where
    /// the stage has been found to give them, else evaluated twice over (see
    /// [`crate::nn::layers::BatchOfOne`]). The linear, convolution and
    /// GroupNorm layers and the text pooling settle their own shapes; this
    /// check covers the rest. On an AVX-512 CPU `models/default`'s stages pass
    /// it once the attention hands a batch of one on with a batch's strides
    /// (see [`crate::nn::layers::batch_strided`]), so a single image costs
    /// one row, not two.
    pub fn forward(&self, stage: &Stage, rows: &ModelRows) -> Result<Tensor> {
        let unet = match &stage.network {
            Network::UNet(unet) => unet,
            Network::Prior(prior) => {
                let input = PriorInput { hidden_states: &rows.sample, timesteps: &rows.timesteps, proj_embedding: &rows.text, encoder_hidden_states: None, attention_mask: None };
                return Ok(tch::no_grad(|| prior.model.forward(&input))?);
            }
        };
        let run = |twice: bool| -> Result<Tensor> {
            let expand = |t: &Tensor| if twice { Tensor::cat(&[t, t], 0) } else { t.shallow_clone() };
            let (sample, timesteps, text) = (expand(&rows.sample), expand(&rows.timesteps), expand(&rows.text));
            let class_labels = rows.class_labels.as_ref().map(expand);
            let input = UNetInput { sample: &sample, timesteps: &timesteps, encoder_hidden_states: &text, class_labels: class_labels.as_ref(), text_mask: None };
            let out = tch::no_grad(|| unet.model.forward(&input))?;
            Ok(if twice { out.narrow(0, 0, 1) } else { out })
        };
        if rows.sample.size()[0] != 1 {
            return run(false);
        }
        stage.single_row.try_run(&rows.sample, || run(false), || run(true))
    }

    /// The denoising steps `request` runs over all its stages (for progress).
    pub fn total_steps(&self, request: &GenerationRequest) -> usize {
        request
            .stages
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let timesteps = self.stages[p.index].scheduler.timesteps(&p.sampler).map_or(p.sampler.steps, |t| t.len());
                request.stage_steps(k, timesteps)
            })
            .sum()
    }

    /// Encodes prompts in one batch: `[1, L, D]` per prompt, in the UNets' kind.
    /// (A prompt's embedding does not depend on the others in the batch.)
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Vec<Tensor>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let hidden = tch::no_grad(|| self.encoder.encode(prompts))?.hidden.to_kind(self.kind);
        Ok((0..prompts.len() as i64).map(|i| hidden.narrow(0, i, 1)).collect())
    }

    /// The cached empty prompt's tokens, `[1, L, D]`.
    pub fn null_text(&self) -> &Tensor {
        &self.null_text
    }

    /// The text conditioning of `request`, with `lookup` giving a prompt's
    /// `[1, L, D]` tokens (the empty prompt's are the cached null text).
    pub fn job_text(&self, request: &GenerationRequest, lookup: &mut dyn FnMut(&str) -> Option<Tensor>) -> Result<JobText> {
        let mut tokens = |prompt: &str| -> Result<Tensor> {
            if prompt.is_empty() {
                return Ok(self.null_text.shallow_clone());
            }
            lookup(prompt).ok_or_else(|| PipelineError::invalid("prompt", "its embedding is missing"))
        };
        let mut cond = tokens(&request.prompt)?;
        if let NoiseMix::Interpolation { prompt: Some(to), .. } = &request.noise {
            let to = tokens(to)?;
            let frames: Vec<Tensor> = request.mix_weights().into_iter().map(|w| &cond * (1.0 - w) + &to * w).collect();
            cond = Tensor::cat(&frames, 0);
        }
        let uncond = match &request.negative_prompt {
            Some(neg) => tokens(neg)?,
            None => self.null_text.shallow_clone(),
        };
        let source = match &request.source {
            Some(Source::Invert { prompt, .. }) => Some(tokens(prompt)?),
            _ => None,
        };
        let clip = match (&self.clip, self.stages[0].kind) {
            (Some(clip), StageKind::Prior) => {
                let negative = request.negative_prompt.as_deref().unwrap_or("");
                let mut prompts = vec![request.prompt.as_str(), negative];
                if let NoiseMix::Interpolation { prompt: Some(to), .. } = &request.noise {
                    prompts.push(to);
                }
                let (embeds, tokens) = clip.text_conditioning(&self.encoder, &prompts)?;
                let row = |i: i64| (embeds.narrow(0, i, 1), tokens.narrow(0, i, 1));
                let mut cond = row(0);
                if prompts.len() == 3 {
                    // Frame i's caption between the two: the embeddings on
                    // their sphere (DALL-E 2 §3 interpolates CLIP embeddings
                    // by slerp), the token states linearly as the UNet's.
                    let weights = request.mix_weights();
                    let n = request.n as i64;
                    let ((from_e, from_t), (to_e, to_t)) = (row(0), row(2));
                    let embeds = slerp_rows(&from_e.expand([n, -1], false), &to_e.expand([n, -1], false), &weights)?;
                    let frames: Vec<Tensor> = weights.iter().map(|&w| &from_t * (1.0 - w) + &to_t * w).collect();
                    cond = (embeds, Tensor::cat(&frames, 0));
                }
                let image = match &request.source {
                    Some(Source::ImageEmbedding { image }) => {
                        let s = clip.image_size();
                        Some(clip.image_embeds(&image.tensor((s, s), clip.device())?)?)
                    }
                    _ => None,
                };
                Some(ClipText { cond, uncond: row(1), image })
            }
            _ => None,
        };
        Ok(JobText { cond, uncond, source, clip })
    }

    /// Starts stage `k` of `request` (an index into `request.stages`) for its n
    /// images (`text`'s single rows are expanded here), `low_res` the previous
    /// stage's images. Image i's noise comes from its own stream.
    pub fn start_stage(&self, request: &GenerationRequest, k: usize, text: &JobText, low_res: Option<&Tensor>) -> Result<StageJob> {
        let index = request.stages[k].index;
        let seeds: Vec<u64> = (0..request.n).map(|i| request.stream_seed(i, index)).collect();
        self.start_stage_with(request, k, text, low_res, BatchNoise::seeded(&seeds))
    }

    /// [`Cascade::start_stage`] with the noise given (tests replay a reference's draws).
    pub fn start_stage_with(&self, request: &GenerationRequest, k: usize, text: &JobText, low_res: Option<&Tensor>, noise: BatchNoise) -> Result<StageJob> {
        let plan = &request.stages[k];
        let stage = &self.stages[plan.index];
        match stage.kind {
            StageKind::Prior => return self.start_prior(request, k, text, noise),
            StageKind::Decoder => return self.start_decoder(request, k, text, low_res, noise),
            StageKind::Base | StageKind::SuperResolution => {}
        }
        let n = request.n as i64;
        let rows = |t: &Tensor| if t.size()[0] == n { t.shallow_clone() } else { t.expand([n, -1, -1], false).contiguous() };
        let (cond, uncond) = (rows(&text.cond), rows(&text.uncond));
        let source_text = text.source.as_ref().map(rows);
        let device = self.device;
        let first = k == 0;
        // The pictures at this stage's size (or, upscaling, the previous stage's).
        let (mut image, mut mask, mut strength, mut low) = (None, None, 1.0, None);
        match &request.source {
            Some(Source::Image { image: picture, strength: s }) if first => {
                image = Some(picture.tensor(stage.size, device)?);
                strength = *s;
            }
            Some(Source::Inpaint { image: picture, mask: m, strength: s }) => {
                image = Some(picture.tensor(stage.size, device)?);
                mask = Some(m.tensor(stage.size, device)?);
                if first {
                    strength = *s;
                }
            }
            Some(Source::Upscale { image: picture }) if first => {
                let (w, h) = picture.dimensions();
                low = Some(picture.tensor((i64::from(h), i64::from(w)), device)?);
            }
            Some(Source::Invert { image: picture, .. }) if first => image = Some(picture.tensor(stage.size, device)?),
            _ => {}
        }
        // A super-resolution stage below full strength starts from the
        // previous stage's output, upsampled bicubically (sharper than the
        // bilinear conditioning copy) and noised to its strength.
        let previous = low.as_ref().or(low_res);
        if let (StageKind::SuperResolution, None, Some(previous), true) = (stage.kind, &image, previous, plan.strength < 1.0) {
            let (h, w) = stage.size;
            image = Some(previous.to_device(device).to_kind(Kind::Float).upsample_bicubic2d([h, w], false, None, None).clamp(-1.0, 1.0));
            strength = plan.strength;
        }
        let inverting = first && matches!(request.source, Some(Source::Invert { .. }));
        let init = match (&image, inverting) {
            (Some(image), false) => Some(StageInit { image, mask: mask.as_ref(), strength }),
            _ => None,
        };
        let invert = match (&image, &source_text) {
            (Some(image), Some(text)) if inverting => Some(StageInversion { image, text }),
            _ => None,
        };
        let mix = if first { Self::noise_target(request, plan.index) } else { None };
        let inputs = JobInputs {
            cond: &cond,
            uncond: &uncond,
            guidance_scale: plan.guidance_scale,
            sampler: &plan.sampler,
            low_res: low.as_ref().or(low_res),
            noise_level: plan.noise_level,
            init,
            mix,
            invert,
            clip: match plan.clip_guidance_scale {
                s if first && s > 0.0 => Some(self.clip_job(request, stage, &plan.sampler, s)?),
                _ => None,
            },
            classifier: match plan.classifier_guidance_scale {
                s if first && s > 0.0 => Some(self.classifier_job(request, stage, &plan.sampler, s)?),
                _ => None,
            },
            layout: match plan.layout_guidance_scale {
                s if first && s > 0.0 => self.layout_job(request, stage, &plan.sampler, &cond, s)?,
                _ => None,
            },
            class_rows: None,
        };
        StageJob::new(stage, inputs, noise)
    }

    /// `text`'s unCLIP conditioning for `n` images, as (cond, uncond) pairs
    /// of (embeddings `[n, D]`, tokens `[n, L, D]`).
    fn unclip_text(text: &JobText, n: usize) -> Result<((Tensor, Tensor), (Tensor, Tensor))> {
        let clip = text.clip.as_ref().ok_or_else(|| PipelineError::invalid("stages", "an unCLIP cascade needs its CLIP"))?;
        let rows = |t: &Tensor| {
            let mut shape = t.size();
            shape[0] = n as i64;
            t.expand(shape.as_slice(), false).contiguous()
        };
        let pair = |(e, t): &(Tensor, Tensor)| (rows(e), rows(t));
        Ok((pair(&clip.cond), pair(&clip.uncond)))
    }

    /// The second latent of `request`'s images at the cascade's stage
    /// `index`, when their noise is mixed: what the target seed draws at that
    /// stage, so that a weight of 1 is that seed's image.
    fn noise_target(request: &GenerationRequest, index: usize) -> Option<NoiseTarget> {
        let seeds = (0..request.n).map(|i| request.target_seed(i).map(|s| stage_stream(s, index))).collect::<Option<Vec<u64>>>()?;
        Some(NoiseTarget { noise: BatchNoise::seeded(&seeds), weights: request.mix_weights() })
    }

    /// Starts `request`'s prior stage (its stage `k`).
    fn start_prior(&self, request: &GenerationRequest, k: usize, text: &JobText, noise: BatchNoise) -> Result<StageJob> {
        let plan = &request.stages[k];
        let ((cond, _), (uncond, _)) = Self::unclip_text(text, request.n)?;
        let mix = Self::noise_target(request, plan.index);
        StageJob::prior(&self.stages[plan.index], &cond, &uncond, plan.guidance_scale, &plan.sampler, noise, mix)
    }

    /// Starts `request`'s decoder stage (its stage `k`) from the prior's
    /// latents `latents`, or else from the source image's CLIP embedding
    /// (image variations): the embeddings and the captions are projected by
    /// the stage's `text_proj` once, for every step (the unconditional rows
    /// get its learned null embedding, as diffusers' `UnCLIPPipeline`).
    fn start_decoder(&self, request: &GenerationRequest, k: usize, text: &JobText, latents: Option<&Tensor>, noise: BatchNoise) -> Result<StageJob> {
        let plan = &request.stages[k];
        let stage = &self.stages[plan.index];
        let missing = || PipelineError::invalid("stages", format!("stage `{}` needs the prior's embeddings", stage.name));
        let proj = stage.text_proj.as_ref().ok_or_else(missing)?;
        let image = match (latents, self.stages.first().map(|s| &s.network), text.clip.as_ref().and_then(|c| c.image.as_ref())) {
            (Some(latents), Some(Network::Prior(prior)), _) => tch::no_grad(|| prior.model.post_process_latents(&latents.to_device(prior.vs.device()))),
            (None, _, Some(image)) => image.expand([request.n as i64, -1], false),
            _ => return Err(missing()),
        };
        let ((cond, cond_tokens), (uncond, uncond_tokens)) = Self::unclip_text(text, request.n)?;
        let device = stage.device();
        let kind = stage.weight_kind();
        let on = |t: &Tensor| t.to_device(device).to_kind(kind);
        let projected = tch::no_grad(|| {
            proj.model.forward(&on(&image), &on(&Tensor::cat(&[&uncond, &cond], 0)), &on(&Tensor::cat(&[&uncond_tokens, &cond_tokens], 0)), true)
        })?;
        let n = request.n as i64;
        let (hidden, time) = (&projected.hidden_states, &projected.time_embeddings);
        let guided = plan.guidance_scale > 1.0;
        let class_rows = if guided { time.shallow_clone() } else { time.narrow(0, n, n) };
        let cond = hidden.narrow(0, n, n);
        // The prompt's tokens follow the embedding's in the decoder's context.
        let image_tokens = hidden.size()[1] - cond_tokens.size()[1];
        let layout = match plan.layout_guidance_scale {
            s if s > 0.0 => self.layout_job(request, stage, &plan.sampler, &cond, s)?.map(|job| job.after_image_tokens(image_tokens, time.narrow(0, n, n))),
            _ => None,
        };
        let inputs = JobInputs {
            cond: &cond,
            uncond: &hidden.narrow(0, 0, n),
            guidance_scale: plan.guidance_scale,
            sampler: &plan.sampler,
            low_res: None,
            noise_level: None,
            init: None,
            mix: Self::noise_target(request, plan.index),
            invert: None,
            clip: None,
            classifier: None,
            layout,
            class_rows: Some(&class_rows),
        };
        StageJob::new(stage, inputs, noise)
    }

    /// The CLIP guidance of `request`'s images at the base `stage`, towards
    /// [`Cascade::guide_text`].
    fn clip_job(&self, request: &GenerationRequest, stage: &Stage, sampler: &SamplerOptions, scale: f32) -> Result<ClipJob> {
        let clip = self.clip.as_ref().ok_or_else(|| PipelineError::invalid(super::clip_guidance::FIELD, "this cascade has no noised CLIP"))?;
        let text = self.guide_text(clip, request)?;
        let prediction = stage.scheduler.config().resolve(sampler.kind)?.prediction_type;
        Ok(ClipJob::new(text, scale, prediction, std::sync::Arc::clone(stage.scheduler.schedule())))
    }

    /// The classifier guidance of `request`'s images at the base `stage`:
    /// each image's label is its [`Cascade::guide_text`], the other classes
    /// the prompts' contrasts (`pipeline::classifier_labels`).
    fn classifier_job(&self, request: &GenerationRequest, stage: &Stage, sampler: &SamplerOptions, scale: f32) -> Result<ClassifierJob> {
        let field = super::classifier_guidance::FIELD;
        let clip = self.clip.as_ref().ok_or_else(|| PipelineError::invalid(field, "this cascade has no noised CLIP"))?;
        let own = self.guide_text(clip, request)?;
        let mut prompts = vec![request.prompt.as_str()];
        if let NoiseMix::Interpolation { prompt: Some(to), .. } = &request.noise {
            prompts.push(to);
        }
        let labels = classifier_labels::labels(&prompts);
        let others = clip.text_embeds(&self.encoder, &labels.iter().map(String::as_str).collect::<Vec<_>>())?;
        let prediction = stage.scheduler.config().resolve(sampler.kind)?.prediction_type;
        ClassifierJob::new(own, others, scale, prediction, std::sync::Arc::clone(stage.scheduler.schedule()))
    }

    /// The CLIP text embedding each of `request`'s images is guided towards
    /// (`[n, D]`): the prompt's, computed once for the job; an interpolation
    /// between prompts guides frame i towards the normalised mix of the two
    /// embeddings at its weight, as its tokens are mixed.
    fn guide_text(&self, clip: &ClipGuide, request: &GenerationRequest) -> Result<Tensor> {
        let n = request.n as i64;
        Ok(match &request.noise {
            NoiseMix::Interpolation { prompt: Some(to), .. } => {
                let both = clip.text_embeds(&self.encoder, &[&request.prompt, to])?;
                let (a, b) = (both.narrow(0, 0, 1), both.narrow(0, 1, 1));
                let frames: Vec<Tensor> = request
                    .mix_weights()
                    .into_iter()
                    .map(|w| {
                        let mixed = &a * (1.0 - w) + &b * w;
                        &mixed / mixed.square().sum(Kind::Float).sqrt().clamp_min(1e-12)
                    })
                    .collect();
                Tensor::cat(&frames, 0)
            }
            _ => clip.text_embeds(&self.encoder, &[&request.prompt])?.expand([n, -1], false).contiguous(),
        })
    }

    /// The layout guidance of `request`'s images at the base `stage`, when
    /// its prompt has a layout to guide (`pipeline::prompt_layout`); `cond`
    /// holds the images' prompt tokens.
    fn layout_job(&self, request: &GenerationRequest, stage: &Stage, sampler: &SamplerOptions, cond: &Tensor, scale: f32) -> Result<Option<LayoutJob>> {
        let Some(layout) = prompt_layout::read(&request.prompt) else { return Ok(None) };
        let prediction = stage.scheduler.config().resolve(sampler.kind)?.prediction_type;
        let text = cond.to_device(stage.device()).to_kind(stage.weight_kind());
        let schedule = std::sync::Arc::clone(stage.scheduler.schedule());
        LayoutJob::new(&request.prompt, &layout, self.encoder.tokenizer(), text, scale, prediction, schedule)
    }

    /// Turns the last stage's output into images with their records.
    pub fn finish(&self, request: &GenerationRequest, images: &Tensor) -> Result<Vec<GeneratedImage>> {
        let record = |seed: u64| ImageRecord {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            seed,
            model: self.manifest.name.clone(),
            stages: request
                .stages
                .iter()
                .map(|p| {
                    StageRecord {
                        name: p.name.clone(),
                        sampler: p.sampler.kind.name().to_owned(),
                        steps: p.sampler.steps,
                        guidance_scale: p.guidance_scale,
                        eta: p.sampler.eta,
                        noise_level: p.noise_level,
                        size: self.stages[p.index].size_label(),
                        clip_guidance_scale: p.clip_guidance_scale,
                        classifier_guidance_scale: p.classifier_guidance_scale,
                        layout_guidance_scale: p.layout_guidance_scale,
                        strength: p.strength,
                    }
                })
                .collect(),
        };
        Ok(png::to_rgb(images)?
            .into_iter()
            .enumerate()
            .map(|(i, image)| GeneratedImage { index: i, seed: request.image_seed(i), image, record: record(request.image_seed(i)) })
            .collect())
    }

    /// The request's text conditioning, its prompts encoded now.
    pub fn request_text(&self, request: &GenerationRequest) -> Result<JobText> {
        let prompts = request.prompts();
        let encoded = self.encode_prompts(&prompts)?;
        let mut lookup = |p: &str| prompts.iter().position(|q| *q == p).map(|i| encoded[i].shallow_clone());
        self.job_text(request, &mut lookup)
    }

    /// Runs `job` at `stage` to its end, one request alone; `observer` sees
    /// (steps done, total) after each step and may stop it.
    pub fn run_job(&self, stage: &Stage, job: &mut StageJob, observer: &mut dyn FnMut(usize, usize) -> ControlFlow<()>) -> Result<()> {
        while !job.is_done() {
            let out = self.forward(stage, &job.model_input()?)?;
            job.advance(&out, stage, self.clip())?;
            if observer(job.step_index(), job.total_steps()).is_break() {
                return Err(PipelineError::Cancelled);
            }
        }
        Ok(())
    }

    /// Runs every stage of `request`; `observer` sees each step and may stop the
    /// run (the result is then [`PipelineError::Cancelled`]).
    pub fn generate(&self, request: &GenerationRequest, observer: &mut dyn FnMut(&Progress<'_>) -> ControlFlow<()>) -> Result<Vec<GeneratedImage>> {
        let text = self.request_text(request)?;
        let mut images: Option<Tensor> = None;
        for k in 0..request.stages.len() {
            let stage = &self.stages[request.stages[k].index];
            let mut job = self.start_stage(request, k, &text, images.as_ref())?;
            self.run_job(stage, &mut job, &mut |step, total_steps| {
                observer(&Progress { stage: k, stages: request.stages.len(), stage_name: &stage.name, step, total_steps })
            })?;
            images = Some(job.sample().shallow_clone());
        }
        self.finish(request, &images.expect("a request runs at least one stage"))
    }
}

/// Checks an unCLIP cascade's stages against each other and its CLIP: a
/// prior, then a decoder, both in the CLIP's embedding space.
fn check_unclip(dir: &Path, stages: &[Stage], clip: Option<&ClipGuide>) -> Result<()> {
    let manifest = dir.join(super::manifest::MANIFEST_FILE);
    let Some(clip) = clip else {
        return Err(PipelineError::model(&manifest, "an unCLIP cascade (a `prior` stage) reads its captions through a noised CLIP: name one as `clip`"));
    };
    let Some(decoder) = stages.get(1).filter(|s| s.kind == StageKind::Decoder) else {
        return Err(PipelineError::model(&manifest, "the stage after a `prior` must be its `decoder`"));
    };
    for stage in [&stages[0], decoder] {
        if stage.text_width() != clip.width() {
            return Err(PipelineError::model(&stage.dir, format!("stage `{}` reads {}-wide CLIP embeddings; the cascade's CLIP embeds in {}", stage.name, stage.text_width(), clip.width())));
        }
    }
    Ok(())
}
