//! CLIP guidance of the base stage, as GLIDE does it (Nichol et al. 2022,
//! "GLIDE: Towards Photorealistic Image Generation and Editing with
//! Text-Guided Diffusion Models", §2.4 and §3.3).
//!
//! A noised CLIP scores how well a noisy image x_t at timestep t matches a
//! caption c: f(x_t, t)·g(c), the dot product of its unit-norm image and text
//! embeddings. Guidance moves every sampling step along the gradient of that
//! score, in ADM's classifier-guidance form for ε-samplers ("Diffusion Models
//! Beat GANs", Algorithm 2): ε̂' = ε̂ − √(1 − ᾱ_t)·s·∇_{x_t}(f(x_t, t)·g(c)).
//! The CLIP must have been trained on noised images (GLIDE's point: a CLIP of
//! clean images is off-distribution at every x_t but the last).
//!
//! The correction is made in ε and handed back in the model's own
//! parameterisation (ε, x_0 or v), so every sampler steps unchanged; learned
//! variance channels pass through untouched.
//!
//! Batching: each image's gradient is taken alone (a batch of one, always the
//! same computation), so an image gets the same bits whichever jobs share its
//! UNet call and wherever it sits in its own request.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::error::{PipelineError, Result};
use super::manifest::ClipEntry;
use super::stage::{Stage, IMAGE_CHANNELS};
use crate::diffusion::forward::NoiseLevel;
use crate::diffusion::guidance::classifier_guided_output;
use crate::diffusion::{NoiseSchedule, PredictionType, Scheduler, SchedulerConfig};
use crate::nn::noised_clip::{LoadedNoisedClip, ModelInputs, NoisedClip};
use crate::nn::text::{mean_pool, TextEncoder};

/// CLIP guidance scales beyond this only push images off the data.
pub const MAX_CLIP_GUIDANCE: f32 = 100.0;

/// The request field every CLIP-guidance error names.
pub const FIELD: &str = "clip_guidance_scale";

/// A loaded noised CLIP, ready to guide.
pub struct ClipGuide {
    pub dir: PathBuf,
    clip: LoadedNoisedClip,
}

impl std::fmt::Debug for ClipGuide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipGuide").field("dir", &self.dir).field("image_size", &self.image_size()).finish()
    }
}

/// One job's CLIP guidance at the base stage.
pub struct ClipJob {
    /// `[n, D]`: the unit-norm text embedding each image is guided towards.
    text: Tensor,
    scale: f32,
    /// What the stage's UNet predicts, to convert its output to ε and back.
    prediction: PredictionType,
    schedule: Arc<NoiseSchedule>,
}

impl ClipJob {
    /// Guidance towards `text` (`[n, D]`, on the CLIP's device) at `scale`, for
    /// a model predicting `prediction` on `schedule`.
    pub fn new(text: Tensor, scale: f32, prediction: PredictionType, schedule: Arc<NoiseSchedule>) -> Self {
        Self { text, scale, prediction, schedule }
    }
}

impl ClipGuide {
    /// Wraps a loaded model (tests build one without a folder).
    pub fn new(clip: LoadedNoisedClip, dir: PathBuf) -> Self {
        Self { dir, clip }
    }

    /// Loads the manifest's `clip` entry (relative to `root`) onto `device`,
    /// checking that it reads `encoder`'s states and that its `t` counts on
    /// the same noise schedule as the base stage.
    pub fn load(root: &Path, entry: &ClipEntry, encoder: &TextEncoder, base: &Stage, device: Device) -> Result<Self> {
        let dir = root.join(&entry.path);
        let clip = LoadedNoisedClip::load(&dir, device).map_err(|e| PipelineError::model(&dir, e.to_string()))?;
        let inputs = ModelInputs::read(&dir).map_err(|e| PipelineError::model(&dir, e.to_string()))?;
        let config = clip.model.config();
        // The text tower projects one encoder's pooled states; another
        // encoder's states mean nothing to it, even at the same width.
        if config.text_hidden_size != encoder.hidden_size() {
            return Err(PipelineError::model(
                dir.join("config.json"),
                format!(
                    "text_hidden_size {}: the CLIP reads another text encoder's states than the cascade's ({}-wide, {})",
                    config.text_hidden_size,
                    encoder.hidden_size(),
                    encoder.dir().display()
                ),
            ));
        }
        if !same_dir(&inputs.text_encoder, encoder.dir()) {
            tracing::warn!(clip = %inputs.text_encoder.display(), cascade = %encoder.dir().display(), "the CLIP names another text encoder folder (of the same width); it must be a copy of the same model");
        }
        if inputs.max_length != encoder.max_length() {
            tracing::warn!(clip = inputs.max_length, cascade = encoder.max_length(), "the CLIP was trained with another prompt length; long prompts pool differently");
        }
        let inputs_file = dir.join(ModelInputs::FILE);
        let scheduler = SchedulerConfig::from_json_str(&inputs.scheduler.to_string())
            .and_then(Scheduler::new)
            .map_err(|e| PipelineError::model(&inputs_file, format!("scheduler: {e}")))?;
        if !same_schedule(scheduler.schedule(), base.scheduler.schedule()) || config.num_train_timesteps != base.scheduler.schedule().len() as i64 {
            return Err(PipelineError::model(&inputs_file, format!("the CLIP's timesteps count on another noise schedule than stage `{}`'s", base.name)));
        }
        let guide = Self::new(clip, dir);
        let s = guide.image_size();
        if (s, s) != base.size {
            let (h, w) = base.size;
            tracing::warn!(clip = %guide.dir.display(), "the CLIP reads {s}x{s} images, the base stage makes {w}x{h}: requests cannot use CLIP guidance");
        }
        Ok(guide)
    }

    pub fn model(&self) -> &NoisedClip {
        &self.clip.model
    }

    /// The side of the square images the CLIP reads.
    pub fn image_size(&self) -> i64 {
        self.clip.model.config().image_size
    }

    pub fn device(&self) -> Device {
        self.clip.vs.device()
    }

    /// The CLIP's embeddings of `prompts` (`[B, D]`, unit norm): `encoder`'s
    /// last hidden state, mean-pooled over the prompt's tokens, through the
    /// text tower.
    pub fn text_embeds(&self, encoder: &TextEncoder, prompts: &[&str]) -> Result<Tensor> {
        let out = tch::no_grad(|| encoder.encode(prompts))?;
        let pooled = mean_pool(&out.hidden, &out.mask)?.to_device(self.device());
        Ok(tch::no_grad(|| self.clip.model.text_embeds(&pooled))?)
    }

    /// What unCLIP's prior and decoder read of `prompts`: their CLIP
    /// embeddings `[B, D]` (unit norm) and the text tower applied to each of
    /// their token states `[B, L, D]` (padding included, as the decoder was
    /// trained), from one pass of `encoder`.
    pub fn text_conditioning(&self, encoder: &TextEncoder, prompts: &[&str]) -> Result<(Tensor, Tensor)> {
        let out = tch::no_grad(|| encoder.encode(prompts))?;
        let device = self.device();
        let pooled = mean_pool(&out.hidden, &out.mask)?.to_device(device);
        let hidden = out.hidden.to_device(device).to_kind(Kind::Float);
        let model = &self.clip.model;
        Ok(tch::no_grad(|| -> Result<(Tensor, Tensor)> { Ok((model.text_embeds(&pooled)?, model.text_token_states(&hidden)?)) })?)
    }

    /// The CLIP's embeddings `[B, D]` (unit norm) of clean images
    /// `[B, 3, S, S]` in [-1, 1] (at t = 0, as unCLIP's decoder was trained).
    pub fn image_embeds(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.clip.model.clean_image_embeds(&images.to_device(self.device()))?)
    }

    /// The width of the CLIP's embeddings.
    pub fn width(&self) -> i64 {
        self.clip.model.config().embed_dim
    }

    /// ∇_{x_t} (f(x_t, t)·g) for each row of `x_t` (`[n, 3, S, S]`) against
    /// its row of `text` (`[n, D]`), one image at a time: `[n, 3, S, S]` f32.
    pub fn gradient(&self, x_t: &Tensor, t: i64, text: &Tensor) -> Result<Tensor> {
        let n = x_t.size()[0];
        if text.size() != [n, self.clip.model.config().embed_dim] {
            return Err(PipelineError::invalid(FIELD, format!("text embeddings {:?} for {n} images", text.size())));
        }
        self.row_gradients(x_t, t, &|image, i| Ok((image * text.narrow(0, i, 1)).sum(Kind::Float)))
    }

    /// ∇_{x_t} of `objective(f(x_i, t), i)` (a scalar of image i's `[1, D]`
    /// embedding) for each row i of `x_t` (`[n, 3, S, S]`): `[n, 3, S, S]` f32.
    ///
    /// Each row alone: a batch of one takes the same route through the
    /// CLIP's layers on every call, the first included (`BatchOfOne`), so its
    /// gradient does not depend on the batch or on earlier calls.
    pub fn row_gradients(&self, x_t: &Tensor, t: i64, objective: &dyn Fn(&Tensor, i64) -> Result<Tensor>) -> Result<Tensor> {
        let device = self.device();
        let x_t = x_t.to_device(device).to_kind(Kind::Float);
        let timestep = Tensor::from_slice(&[t]).to_device(device);
        let rows = (0..x_t.size()[0])
            .map(|i| {
                tch::with_grad(|| -> Result<Tensor> {
                    let x = x_t.narrow(0, i, 1).detach().set_requires_grad(true);
                    let score = objective(&self.clip.model.image_embeds(&x, &timestep)?, i)?;
                    let mut grads = Tensor::f_run_backward(&[score], &[&x], false, false)?;
                    Ok(grads.remove(0))
                })
            })
            .collect::<Result<Vec<Tensor>>>()?;
        Ok(Tensor::cat(&rows, 0))
    }

    /// The model `output` for `sample` at timestep `t` (after classifier-free
    /// guidance; `[n, 3 or 6, H, W]`) shifted by `job`'s CLIP guidance, in the
    /// same parameterisation and on `sample`'s device, f32.
    pub fn guide(&self, job: &ClipJob, output: &Tensor, sample: &Tensor, t: i64) -> Result<Tensor> {
        let n = sample.size()[0];
        let grad = self.gradient(sample, t, &job.text)?.to_device(sample.device());
        let level = NoiseLevel::new(job.schedule.alpha_bar(t));
        Ok(classifier_guided_output(output, sample, job.prediction, level, IMAGE_CHANNELS, &grad, &vec![job.scale; n as usize])?)
    }
}

/// Whether two folders are the same one (or, where either is missing, the same path).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn same_schedule(a: &NoiseSchedule, b: &NoiseSchedule) -> bool {
    a.len() == b.len() && a.alphas_cumprod().iter().zip(b.alphas_cumprod()).all(|(x, y)| (x - y).abs() <= 1e-6)
}
