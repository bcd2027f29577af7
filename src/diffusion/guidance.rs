//! Guidance: trading diversity for fidelity at sampling time.
//!
//! Classifier-free guidance (Ho & Salimans 2022, eq. 6, as GLIDE and Imagen use
//! it): ε̂ = ε(x, ∅) + s·(ε(x, y) − ε(x, ∅)), with the model run once on the
//! batch [unconditional; conditional]. The scale is per sample, so one batch may
//! mix requests with different scales. With a learned variance (ADM), the
//! variance channels come from the conditional half, as in DeepFloyd IF.
//!
//! Classifier guidance ("Diffusion Models Beat GANs", Algorithm 2 for DDIM):
//! ε̂ = ε − √(1 − ᾱ_t)·s·∇_x log p_φ(y | x_t).

use tch::{Kind, Tensor};

use super::error::{DiffusionError, Result};
use super::forward::{output_from_eps, per_sample, to_x0_and_eps, NoiseLevel, PredictionType};
use super::sampler::split_output;

/// Guided model output from the output on [uncond; cond] (2B samples), for a batch
/// of B with per-sample `scales`. `channels` is the image's channel count; an
/// output with 2·channels keeps the conditional half's variance channels.
pub fn classifier_free(output: &Tensor, scales: &[f32], channels: i64) -> Result<Tensor> {
    let size = output.size();
    let (batch2, out_channels) = (size[0], size[1]);
    let batch = scales.len() as i64;
    if batch2 != 2 * batch {
        return Err(DiffusionError::invalid("guidance_scale", format!("{} scales for a guided batch of {batch2}", scales.len())));
    }
    if out_channels != channels && out_channels != 2 * channels {
        return Err(DiffusionError::invalid("model_output", format!("{out_channels} channels for a {channels}-channel image")));
    }
    let uncond = output.narrow(0, 0, batch).narrow(1, 0, channels);
    let cond_all = output.narrow(0, batch, batch);
    let cond = cond_all.narrow(1, 0, channels);
    let guided = &uncond + (&cond - &uncond) * per_sample(scales, &uncond);
    if out_channels == channels {
        Ok(guided)
    } else {
        Ok(Tensor::cat(&[guided, cond_all.narrow(1, channels, channels)], 1))
    }
}

/// ε shifted along a classifier's gradient of log p(y | x_t), per-sample scales.
pub fn classifier_guided_eps(eps: &Tensor, grad_log_prob: &Tensor, level: NoiseLevel, scales: &[f32]) -> Tensor {
    let scaled: Vec<f32> = scales.iter().map(|s| s * level.sqrt_one_minus_alpha_bar).collect();
    eps - grad_log_prob * per_sample(&scaled, eps)
}

/// A model `output` for `sample` (`[n, C or 2C, H, W]`: the prediction of
/// kind `prediction`, then any learned-variance channels) with its ε shifted
/// by [`classifier_guided_eps`] along `grad_log_prob` at `scales`, handed back
/// in the model's own parameterisation (f32) so that every sampler steps
/// unchanged; variance channels pass through. Any gradient-based guide (a
/// noised CLIP, the UNet's own attention) corrects an output this way.
pub fn classifier_guided_output(
    output: &Tensor,
    sample: &Tensor,
    prediction: PredictionType,
    level: NoiseLevel,
    channels: i64,
    grad_log_prob: &Tensor,
    scales: &[f32],
) -> Result<Tensor> {
    tch::no_grad(|| {
        let (predicted, variance) = split_output(output, channels)?;
        let (_, eps) = to_x0_and_eps(prediction, &predicted.to_kind(Kind::Float), sample, level);
        let eps = classifier_guided_eps(&eps, grad_log_prob, level, scales);
        let guided = output_from_eps(prediction, &eps, sample, level);
        Ok(match variance {
            Some(v) => Tensor::cat(&[guided, v.to_kind(Kind::Float)], 1),
            None => guided,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn per_sample_scales_and_variance_from_the_conditional_half() {
        // Batch of 2, 1 image channel + 1 variance channel, 1x1 pixels.
        // uncond rows: eps 1, 2 (var 9, 9); cond rows: eps 3, 5 (var 7, 8).
        let out = Tensor::from_slice(&[1.0f32, 9.0, 2.0, 9.0, 3.0, 7.0, 5.0, 8.0]).view([4, 2, 1, 1]);
        let g = classifier_free(&out, &[1.0, 2.0], 1).unwrap();
        let got = Vec::<f32>::try_from(g.view(-1)).unwrap();
        // sample 0: 1 + 1·(3−1) = 3; sample 1: 2 + 2·(5−2) = 8.
        assert_eq!(got, vec![3.0, 7.0, 8.0, 8.0]);
    }

    #[test]
    fn scale_zero_is_unconditional_and_one_is_conditional() {
        let out = Tensor::randn([4, 3, 2, 2], (Kind::Float, Device::Cpu));
        let g0 = classifier_free(&out, &[0.0, 0.0], 3).unwrap();
        assert!(g0.equal(&out.narrow(0, 0, 2)));
        let g1 = classifier_free(&out, &[1.0, 1.0], 3).unwrap();
        assert!(g1.allclose(&out.narrow(0, 2, 2), 1e-6, 1e-6, false));
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let out = Tensor::zeros([4, 3, 2, 2], (Kind::Float, Device::Cpu));
        assert!(classifier_free(&out, &[1.0], 3).is_err());
        assert!(classifier_free(&out, &[1.0, 1.0], 4).is_err());
    }

    #[test]
    fn classifier_guidance_moves_against_the_gradient_scaled_by_noise_level() {
        let eps = Tensor::zeros([1, 1, 1, 1], (Kind::Float, Device::Cpu));
        let grad = Tensor::ones([1, 1, 1, 1], (Kind::Float, Device::Cpu));
        let level = NoiseLevel::new(0.36); // √(1 − ᾱ) = 0.8
        let g = classifier_guided_eps(&eps, &grad, level, &[2.0]);
        assert!((g.double_value(&[0, 0, 0, 0]) + 1.6).abs() < 1e-6);
    }
}
