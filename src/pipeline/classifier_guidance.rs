//! Classifier guidance of the base stage with a noisy classifier, as ADM
//! does it (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
//! Synthesis", §4, Algorithm 2): ε̂' = ε̂ − √(1 − ᾱ_t)·s·∇_{x_t} log p_φ(y | x_t).
//!
//! The classifier is the cascade's noised CLIP (`pipeline::clip_guidance`,
//! trained on x_t at every t, as ADM trains its classifiers on noisy images):
//! over a set of caption classes, p_φ(y | x_t) = softmax_k(τ·f(x_t, t)·g_k),
//! with τ the CLIP's learned logit scale. The label y is the request's prompt
//! and the other classes are its contrasts (`pipeline::classifier_labels`).
//! Unlike CLIP guidance, which raises the similarity to the prompt whatever
//! else the image resembles, the gradient here is τ·(g_y − Σ_k p_k g_k)·∇f:
//! it pushes away from exactly the classes the image is currently taken for.
//!
//! As with CLIP guidance, each image's gradient is taken alone, so an image
//! gets the same bits whichever jobs share its UNet call.

use std::sync::Arc;

use tch::{Kind, Tensor};

use super::clip_guidance::ClipGuide;
use super::error::{PipelineError, Result};
use super::stage::IMAGE_CHANNELS;
use crate::diffusion::forward::NoiseLevel;
use crate::diffusion::guidance::classifier_guided_output;
use crate::diffusion::{NoiseSchedule, PredictionType};

/// Classifier guidance scales beyond this only push images off the data.
pub const MAX_CLASSIFIER_GUIDANCE: f32 = 100.0;

/// The request field every classifier-guidance error names.
pub const FIELD: &str = "classifier_guidance_scale";

/// One job's classifier guidance at the base stage.
pub struct ClassifierJob {
    /// `[n, D]`: each image's label, as a unit-norm CLIP text embedding.
    own: Tensor,
    /// `[K, D]`: the other classes, unit norm.
    others: Tensor,
    scale: f32,
    prediction: PredictionType,
    schedule: Arc<NoiseSchedule>,
}

impl ClassifierJob {
    /// Guidance towards label row i of `own` (`[n, D]`) against the classes
    /// `others` (`[K, D]`, K ≥ 1), both on the CLIP's device, at `scale`, for
    /// a model predicting `prediction` on `schedule`.
    pub fn new(own: Tensor, others: Tensor, scale: f32, prediction: PredictionType, schedule: Arc<NoiseSchedule>) -> Result<Self> {
        let (o, k) = (own.size(), others.size());
        if o.len() != 2 || k.len() != 2 || o[1] != k[1] || k[0] < 1 {
            return Err(PipelineError::invalid(FIELD, format!("labels {o:?} against classes {k:?}")));
        }
        Ok(Self { own, others, scale, prediction, schedule })
    }

    /// How many classes each image is told apart from, its own included.
    pub fn classes(&self) -> i64 {
        self.others.size()[0] + 1
    }

    /// log p(y | x_t) for each row of `x_t` (`[n, 3, S, S]`), no gradient: `[n]`.
    pub fn log_prob(&self, clip: &ClipGuide, x_t: &Tensor, t: i64) -> Result<Tensor> {
        let x_t = x_t.to_device(clip.device()).to_kind(Kind::Float);
        let timestep = Tensor::from_slice(&[t]).to_device(clip.device());
        let rows = (0..x_t.size()[0])
            .map(|i| tch::no_grad(|| Ok(self.row_log_prob(clip, &clip.model().image_embeds(&x_t.narrow(0, i, 1), &timestep)?, i))))
            .collect::<Result<Vec<Tensor>>>()?;
        Ok(Tensor::cat(&rows, 0))
    }

    /// log p(y_i | x) from image i's embedding `[1, D]`: `[1]`.
    fn row_log_prob(&self, clip: &ClipGuide, image: &Tensor, i: i64) -> Tensor {
        let classes = Tensor::cat(&[self.own.narrow(0, i, 1), self.others.shallow_clone()], 0);
        clip.model().logits(image, &classes).log_softmax(1, Kind::Float).select(1, 0)
    }

    /// ∇_{x_t} log p(y | x_t) for each row of `x_t` (`[n, 3, S, S]`), one image at a time.
    pub fn gradient(&self, clip: &ClipGuide, x_t: &Tensor, t: i64) -> Result<Tensor> {
        let n = x_t.size()[0];
        if self.own.size()[0] != n {
            return Err(PipelineError::invalid(FIELD, format!("{} labels for {n} images", self.own.size()[0])));
        }
        clip.row_gradients(x_t, t, &|image, i| Ok(self.row_log_prob(clip, image, i).sum(Kind::Float)))
    }

    /// The model `output` for `sample` at timestep `t` (`[n, 3 or 6, H, W]`)
    /// shifted by this guidance, in the same parameterisation and on
    /// `sample`'s device, f32.
    pub fn guide(&self, clip: &ClipGuide, output: &Tensor, sample: &Tensor, t: i64) -> Result<Tensor> {
        let n = sample.size()[0];
        let grad = self.gradient(clip, sample, t)?.to_device(sample.device());
        let level = NoiseLevel::new(self.schedule.alpha_bar(t));
        Ok(classifier_guided_output(output, sample, self.prediction, level, IMAGE_CHANNELS, &grad, &vec![self.scale; n as usize])?)
    }
}
