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

use tch::{Kind, Tensor};

use super::error::{PipelineError, Result};
use super::stage::{Stage, StageKind, IMAGE_CHANNELS};
use crate::diffusion::forward::q_sample;
use crate::diffusion::guidance::classifier_free;
use crate::diffusion::{BatchNoise, Sampler, SamplerOptions};

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
}

impl StageJob {
    /// Draws the initial noise (and, for SR, the augmentation noise, in that
    /// order, as diffusers does) from `noise`, one stream per image.
    pub fn new(stage: &Stage, inputs: &JobInputs<'_>, mut noise: BatchNoise) -> Result<Self> {
        let n = inputs.cond.size()[0];
        if inputs.uncond.size() != inputs.cond.size() || noise.len() as i64 != n {
            return Err(PipelineError::invalid("prompt", "prompt, negative prompt and seeds disagree on the batch size"));
        }
        let device = stage.unet.vs.device();
        let kind = stage.unet.kind();
        let sampler = stage.scheduler.sampler(inputs.sampler)?;
        let (h, w) = stage.size;
        // Every sampler we run has init_noise_sigma = 1 (variance-preserving).
        let sample = noise.draw(&[n, IMAGE_CHANNELS, h, w], Kind::Float, device)?;
        let low_res = match (stage.kind, inputs.low_res) {
            (StageKind::Base, _) => None,
            (StageKind::SuperResolution, None) => {
                return Err(PipelineError::invalid("stages", format!("stage `{}` needs the previous stage's images", stage.name)))
            }
            (StageKind::SuperResolution, Some(image)) => {
                let up = image.to_device(device).to_kind(Kind::Float).upsample_bilinear2d([h, w], true, None, None);
                let level = inputs.noise_level.unwrap_or(0);
                let schedule = stage.noising.as_ref().expect("SR stages have a noising scheduler").schedule();
                let aug = noise.draw(&[n, IMAGE_CHANNELS, h, w], Kind::Float, device)?;
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
        })
    }

    /// Images in this job.
    pub fn images(&self) -> i64 {
        self.scales.len() as i64
    }

    /// UNet rows per step: twice the images when guided.
    pub fn rows(&self) -> i64 {
        if self.guided {
            2 * self.images()
        } else {
            self.images()
        }
    }

    pub fn is_done(&self) -> bool {
        self.sampler.is_done()
    }

    pub fn step_index(&self) -> usize {
        self.sampler.step_index()
    }

    pub fn total_steps(&self) -> usize {
        self.sampler.timesteps().len()
    }

    /// The current sample (the finished images once done), float32 in [-1, 1]-ish.
    pub fn sample(&self) -> &Tensor {
        &self.sample
    }

    /// The UNet inputs for the next step.
    pub fn model_input(&self) -> Result<ModelRows> {
        let t = self.sampler.current_timestep().ok_or_else(|| PipelineError::invalid("steps", "the job is already finished"))?;
        let kind = self.text.kind();
        let device = self.sample.device();
        let x = self.sample.to_kind(kind);
        let x = match &self.low_res {
            Some(low) => Tensor::cat(&[&x, low], 1),
            None => x,
        };
        let rows = self.rows();
        let sample = if self.guided { Tensor::cat(&[&x, &x], 0) } else { x };
        let timesteps = Tensor::full([rows], t, (Kind::Int64, device));
        let class_labels = self.noise_level.map(|l| Tensor::full([rows], l, (Kind::Int64, device)));
        Ok(ModelRows { sample, timesteps, text: self.text.shallow_clone(), class_labels })
    }

    /// Takes one step with the UNet's output for [`StageJob::model_input`]'s rows.
    pub fn advance(&mut self, output: &Tensor) -> Result<()> {
        let output = if self.guided { classifier_free(output, &self.scales, IMAGE_CHANNELS)? } else { output.shallow_clone() };
        self.sample = self.sampler.step(&output, &self.sample, &mut self.noise)?.prev_sample;
        Ok(())
    }
}
