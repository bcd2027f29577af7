//! One request's denoising run at one stage, as a state machine a step at a time:
//! `model_input` gives the rows the UNet must evaluate next, `advance` takes the
//! UNet's output for them and takes one sampler step.
//!
//! Splitting the loop this way lets a batching worker concatenate the rows of
//! several jobs of the same stage (each at its own timestep, with its own
//! sampler, guidance scale and seeds) into one UNet call.
//!
//! What a step does follows diffusers' `IFPipeline` / `IFSuperResolutionPipeline`:
//! classifier-free guidance (Ho & Salimans 2022) on `[uncond; cond]` rows when
//! the guidance scale is above 1, the variance channels taken from the
//! conditional half (ADM/GLIDE with learned variance); for super-resolution, the
//! previous image upsampled bilinearly (align_corners, as IF) and noised to the
//! augmentation level once (Imagen's noise-conditioning augmentation, Saharia et
//! al. 2022 §2.5), concatenated to the noisy sample at every step, with the level
//! passed as the UNet's class label.
//!
//! A job may also start from an image (`StageInit`: SDEdit as `IFImg2ImgPipeline`,
//! with a mask as `IFInpaintingPipeline`; see `pipeline::source`), mix its initial
//! noise with a second latent (variations, interpolation), or first invert an
//! image with DDIM (`StageInversion`); each of these is a different first state
//! or an extra phase of the same step machine, so such jobs batch with plain ones.
//!
//! At the base stage a job may be CLIP-guided (GLIDE §2.4, see
//! `pipeline::clip_guidance`): after classifier-free guidance its model output
//! is shifted along the noised CLIP's gradient before the sampler steps. The
//! UNet rows are the same, so guided jobs batch with unguided ones. Layout
//! guidance (`pipeline::layout_guidance`) shifts it likewise, along the
//! gradient of the stage's own attention on the prompt's layout. Classifier
//! guidance (`pipeline::classifier_guidance`, ADM) shifts it along the
//! gradient of the noised CLIP's log-probability of the prompt's class.
//!
//! unCLIP's stages (DALL-E 2) are the same machine. A prior's job samples one
//! CLIP image embedding `[n, D]` per image instead of an image, its rows the
//! captions' CLIP text embeddings (`[uncond; cond]` when guided), so prior
//! steps batch across requests as UNet steps do. A decoder's job is a base
//! job whose text rows and class embeddings were projected once, at its
//! start, from the prior's embeddings by the stage's `text_proj`.

use tch::{Kind, Tensor};

use super::classifier_guidance::{ClassifierJob, FIELD as CLASSIFIER_FIELD};
use super::clip_guidance::{ClipGuide, ClipJob, FIELD as CLIP_FIELD};
use super::error::{PipelineError, Result};
use super::layout_guidance::LayoutJob;
use super::stage::{Stage, StageKind, IMAGE_CHANNELS};
use super::source::{first_step, slerp_rows};
use crate::diffusion::forward::q_sample;
use crate::diffusion::guidance::classifier_free;
use crate::diffusion::inversion::Inverter;
use crate::diffusion::{BatchNoise, Sampler, SamplerOptions};

/// An image the stage starts from instead of pure noise.
pub struct StageInit<'a> {
    /// `[n, 3, H, W]` (or `[1, 3, H, W]` for every image) in [-1, 1], at the stage's size.
    pub image: &'a Tensor,
    /// `[n or 1, 1, H, W]` of 0 (keep) and 1 (repaint): inpainting.
    pub mask: Option<&'a Tensor>,
    /// SDEdit's strength in (0, 1]: the fraction of the steps that run.
    pub strength: f64,
}

/// A second latent the initial noise is mixed with (spherically), row i at `weights[i]`.
pub struct NoiseTarget {
    pub noise: BatchNoise,
    pub weights: Vec<f64>,
}

/// The next `shape` draw of `noise`, moved toward `target`'s next draw by
/// its weights (spherically) when there is one.
fn draw_mixed(noise: &mut BatchNoise, target: Option<&mut NoiseTarget>, shape: &[i64], device: tch::Device) -> Result<Tensor> {
    let x = noise.draw(shape, Kind::Float, device)?;
    match target {
        None => Ok(x),
        Some(t) => Ok(slerp_rows(&x, &t.noise.draw(shape, Kind::Float, device)?, &t.weights)?),
    }
}

/// DDIM inversion of an image before sampling.
pub struct StageInversion<'a> {
    /// `[n or 1, 3, H, W]` in [-1, 1], at the stage's size.
    pub image: &'a Tensor,
    /// `[n, L, D]`: the tokens of the prompt the image is inverted under.
    pub text: &'a Tensor,
}

/// What a job needs besides the stage and its noise.
pub struct JobInputs<'a> {
    /// `[n, L, D]`: the prompt's tokens, one row per image.
    pub cond: &'a Tensor,
    /// `[n, L, D]`: the negative (or empty) prompt's tokens.
    pub uncond: &'a Tensor,
    pub guidance_scale: f32,
    pub sampler: &'a SamplerOptions,
    /// Super-resolution: the previous stage's images, `[n, 3, h, w]` in [-1, 1].
    pub low_res: Option<&'a Tensor>,
    /// Super-resolution: the augmentation timestep.
    pub noise_level: Option<i64>,
    pub init: Option<StageInit<'a>>,
    pub mix: Option<NoiseTarget>,
    pub invert: Option<StageInversion<'a>>,
    /// CLIP guidance of this job (base stage only).
    pub clip: Option<ClipJob>,
    /// Classifier guidance of this job (base stage only).
    pub classifier: Option<ClassifierJob>,
    /// Layout guidance of this job (base stage only).
    pub layout: Option<LayoutJob>,
    /// An unCLIP decoder's class embeddings, `[rows, E]` (`[uncond; cond]`
    /// when guided): the projected CLIP embeddings its UNet adds to the time
    /// embedding at every step.
    pub class_rows: Option<&'a Tensor>,
}

/// The UNet rows of one job for one step.
pub struct ModelRows {
    pub sample: Tensor,
    pub timesteps: Tensor,
    pub text: Tensor,
    pub class_labels: Option<Tensor>,
}

pub struct StageJob {
    sampler: Box<dyn Sampler>,
    noise: BatchNoise,
    /// `[n, 3, H, W]` in float32, on the stage's device.
    sample: Tensor,
    /// `[rows, L, D]` in the UNet's kind: `[uncond; cond]` when guided.
    text: Tensor,
    scales: Vec<f32>,
    guided: bool,
    /// The noised, upsampled conditioning image (SR), in the UNet's kind.
    low_res: Option<Tensor>,
    noise_level: Option<i64>,
    /// Inpainting: `[n, 1, H, W]`, 1 where the sampler's step is kept.
    mask: Option<Tensor>,
    /// The sampler's first step (image-to-image skips the earlier ones).
    begin: usize,
    /// A DDIM inversion still to run, with its prompt's `[n, L, D]` tokens.
    inversion: Option<(Inverter, Tensor)>,
    /// x̂_0 of the latest sampling step.
    preview: Option<Tensor>,
    /// CLIP guidance, applied after classifier-free guidance at every sampling step.
    clip: Option<ClipJob>,
    /// Classifier guidance, applied after CLIP guidance at every sampling step.
    classifier: Option<ClassifierJob>,
    /// Layout guidance, applied after that at the noisy steps.
    layout: Option<LayoutJob>,
    /// The channels classifier-free guidance mixes (the rest, learned variance, come from the conditional rows).
    channels: i64,
    /// A decoder's class embeddings, the same at every step.
    class_rows: Option<Tensor>,
}

impl StageJob {
    /// Draws the initial noise (and, for SR, the augmentation noise, in that
    /// order, as diffusers does) from `noise`, one stream per image.
    pub fn new(stage: &Stage, inputs: JobInputs<'_>, mut noise: BatchNoise) -> Result<Self> {
        let n = inputs.cond.size()[0];
        if inputs.uncond.size() != inputs.cond.size() || noise.len() as i64 != n {
            return Err(PipelineError::invalid("prompt", "prompt, negative prompt and seeds disagree on the batch size"));
        }
        let device = stage.device();
        let kind = stage.weight_kind();
        // After an inversion, sampling must retrace it: no clipping of x̂_0.
        let mut sampler = match inputs.invert {
            Some(_) => stage.scheduler.exact_sampler(inputs.sampler)?,
            None => stage.scheduler.sampler(inputs.sampler)?,
        };
        let (h, w) = stage.size;
        let shape = [n, IMAGE_CHANNELS, h, w];
        let per_image = |t: &Tensor| -> Tensor { t.to_device(device).to_kind(Kind::Float).expand(shape, false).contiguous() };
        let mut begin = 0;
        let mut mask = None;
        let mut inversion = None;
        // A mixed stage draws every noise of its start from both streams, so
        // that a weight of 1 starts exactly as the target seed alone would.
        let mut target = inputs.mix;
        let mut draw = |noise: &mut BatchNoise| draw_mixed(noise, target.as_mut(), &shape, device);
        let sample = if let Some(inv) = &inputs.invert {
            let inverter = stage.scheduler.inverter(inputs.sampler)?;
            inversion = Some((inverter, inv.text.to_device(device).to_kind(kind)));
            per_image(inv.image)
        } else {
            // Every sampler we run has init_noise_sigma = 1 (variance-preserving).
            let x = draw(&mut noise)?;
            match &inputs.init {
                None => x,
                Some(init) => {
                    let steps = sampler.timesteps().len();
                    begin = first_step(steps, init.strength);
                    let Some(&t0) = sampler.timesteps().get(begin) else {
                        return Err(PipelineError::invalid("source.strength", format!("{} of {steps} steps is no step at all", init.strength)));
                    };
                    sampler.begin_at(begin);
                    let image = per_image(init.image);
                    let noised = q_sample(stage.scheduler.schedule(), &image, &vec![t0; n as usize], &x)?;
                    match init.mask {
                        None => noised,
                        Some(m) => {
                            let m = m.to_device(device).to_kind(Kind::Float).expand([n, 1, h, w], false).contiguous();
                            let blended = &image * (m.neg() + 1.0) + noised * &m;
                            mask = Some(m);
                            blended
                        }
                    }
                }
            }
        };
        let low_res = match (stage.kind, inputs.low_res) {
            (StageKind::Base | StageKind::Decoder | StageKind::Prior, _) => None,
            (StageKind::SuperResolution, None) => {
                return Err(PipelineError::invalid("stages", format!("stage `{}` needs the previous stage's images", stage.name)))
            }
            (StageKind::SuperResolution, Some(image)) => {
                let up = image.to_device(device).to_kind(Kind::Float).upsample_bilinear2d([h, w], true, None, None);
                let level = inputs.noise_level.unwrap_or(0);
                let schedule = stage.noising.as_ref().expect("SR stages have a noising scheduler").schedule();
                let aug = draw(&mut noise)?;
                Some(q_sample(schedule, &up, &vec![level; n as usize], &aug)?.to_kind(kind))
            }
        };
        // diffusers guides only above 1: at 1 the result equals the conditional output.
        let guided = inputs.guidance_scale > 1.0;
        let text = if guided { Tensor::cat(&[inputs.uncond, inputs.cond], 0) } else { inputs.cond.shallow_clone() };
        Ok(Self {
            sampler,
            noise,
            sample,
            text: text.to_device(device).to_kind(kind),
            scales: vec![inputs.guidance_scale; n as usize],
            guided,
            low_res,
            noise_level: inputs.noise_level.filter(|_| stage.takes_noise_level()),
            mask,
            begin,
            inversion,
            preview: None,
            clip: inputs.clip,
            classifier: inputs.classifier,
            layout: inputs.layout,
            channels: IMAGE_CHANNELS,
            class_rows: inputs.class_rows.map(|c| c.to_device(device).to_kind(kind)),
        })
    }

    /// A prior stage's job: CLIP image embeddings `[n, D]` sampled from the
    /// captions' CLIP text embeddings `cond` (`[n, D]`) and, guided above 1,
    /// `uncond`'s. The result ([`StageJob::sample`] once done) is the prior's
    /// latents; its `post_process_latents` makes them embeddings. `mix`
    /// mixes the initial noise as a UNet stage's.
    pub fn prior(
        stage: &Stage,
        cond: &Tensor,
        uncond: &Tensor,
        guidance_scale: f32,
        sampler: &SamplerOptions,
        mut noise: BatchNoise,
        mut mix: Option<NoiseTarget>,
    ) -> Result<Self> {
        let (n, width) = (cond.size()[0], stage.text_width());
        if uncond.size() != cond.size() || noise.len() as i64 != n || cond.size() != [n, width] {
            return Err(PipelineError::invalid("prompt", "prompt, negative prompt and seeds disagree on the batch size"));
        }
        let (device, kind) = (stage.device(), stage.weight_kind());
        let guided = guidance_scale > 1.0;
        let text = if guided { Tensor::cat(&[uncond, cond], 0) } else { cond.shallow_clone() };
        Ok(Self {
            sampler: stage.scheduler.sampler(sampler)?,
            sample: draw_mixed(&mut noise, mix.as_mut(), &[n, width], device)?,
            noise,
            text: text.to_device(device).to_kind(kind),
            scales: vec![guidance_scale; n as usize],
            guided,
            low_res: None,
            noise_level: None,
            mask: None,
            begin: 0,
            inversion: None,
            preview: None,
            clip: None,
            classifier: None,
            layout: None,
            channels: width,
            class_rows: None,
        })
    }

    /// Whether the next step is an inversion step (unguided, under the source prompt).
    fn inverting(&self) -> bool {
        self.inversion.as_ref().is_some_and(|(inv, _)| !inv.is_done())
    }

    /// Images in this job.
    pub fn images(&self) -> i64 {
        self.scales.len() as i64
    }

    /// UNet rows per step: twice the images when guided.
    pub fn rows(&self) -> i64 {
        if self.guided && !self.inverting() {
            2 * self.images()
        } else {
            self.images()
        }
    }

    pub fn is_done(&self) -> bool {
        !self.inverting() && self.sampler.is_done()
    }

    /// Steps taken, inversion steps included.
    pub fn step_index(&self) -> usize {
        let inverted = self.inversion.as_ref().map_or(0, |(inv, _)| inv.step_index());
        inverted + self.sampler.step_index() - self.begin
    }

    /// Steps this job runs at this stage, inversion steps included.
    pub fn total_steps(&self) -> usize {
        let inversion = self.inversion.as_ref().map_or(0, |(inv, _)| inv.steps());
        inversion + self.sampler.timesteps().len() - self.begin
    }

    /// x̂_0 of the latest sampling step (`[n, 3, H, W]`), what a preview shows.
    pub fn preview(&self) -> Option<&Tensor> {
        self.preview.as_ref()
    }

    /// The current sample (the finished images once done), float32 in [-1, 1]-ish.
    pub fn sample(&self) -> &Tensor {
        &self.sample
    }

    /// The UNet inputs for the next step.
    pub fn model_input(&self) -> Result<ModelRows> {
        let finished = || PipelineError::invalid("steps", "the job is already finished");
        let (t, text, rows) = match &self.inversion {
            Some((inv, text)) if !inv.is_done() => (inv.current_timestep().ok_or_else(finished)?, text, self.images()),
            _ => (self.sampler.current_timestep().ok_or_else(finished)?, &self.text, self.rows()),
        };
        let kind = self.text.kind();
        let device = self.sample.device();
        let x = self.sample.to_kind(kind);
        let x = match &self.low_res {
            Some(low) => Tensor::cat(&[&x, low], 1),
            None => x,
        };
        let sample = if rows > self.images() { Tensor::cat(&[&x, &x], 0) } else { x };
        let timesteps = Tensor::full([rows], t, (Kind::Int64, device));
        let class_labels = match &self.class_rows {
            Some(rows) => Some(rows.shallow_clone()),
            None => self.noise_level.map(|l| Tensor::full([rows], l, (Kind::Int64, device))),
        };
        Ok(ModelRows { sample, timesteps, text: text.shallow_clone(), class_labels })
    }

    /// Takes one step with the UNet's output for [`StageJob::model_input`]'s
    /// rows at `stage` (the stage the job was started at); `clip` is the
    /// cascade's noised CLIP, which a CLIP-guided job needs.
    pub fn advance(&mut self, output: &Tensor, stage: &Stage, clip: Option<&ClipGuide>) -> Result<()> {
        if let Some((inv, _)) = self.inversion.as_mut().filter(|(inv, _)| !inv.is_done()) {
            self.sample = inv.step(output, &self.sample)?;
            return Ok(());
        }
        let output = if self.guided { classifier_free(output, &self.scales, self.channels)? } else { output.shallow_clone() };
        // The guides below shift the output at the step's timestep.
        let t = || self.sampler.current_timestep().ok_or_else(|| PipelineError::invalid("steps", "the job is already finished"));
        let output = match &self.clip {
            None => output,
            Some(job) => {
                let guide = clip.ok_or_else(|| PipelineError::invalid(CLIP_FIELD, "the job is CLIP-guided but the cascade has no CLIP"))?;
                guide.guide(job, &output, &self.sample, t()?)?
            }
        };
        let output = match &self.classifier {
            None => output,
            Some(job) => {
                let guide = clip.ok_or_else(|| PipelineError::invalid(CLASSIFIER_FIELD, "the job is classifier-guided but the cascade has no CLIP"))?;
                job.guide(guide, &output, &self.sample, t()?)?
            }
        };
        let output = match &self.layout {
            None => output,
            Some(job) => job.guide(stage, &output, &self.sample, t()?)?,
        };
        let step = self.sampler.step(&output, &self.sample, &mut self.noise)?;
        self.sample = match &self.mask {
            // IF's inpainting: outside the mask, the sample before the step.
            Some(m) => &self.sample * (m.neg() + 1.0) + step.prev_sample * m,
            None => step.prev_sample,
        };
        // A prior's x̂_0 is an embedding: nothing to preview.
        self.preview = (self.sample.dim() == 4).then_some(step.pred_original);
        Ok(())
    }
}
