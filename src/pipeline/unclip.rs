//! DALL-E 2's unCLIP pipeline (Ramesh et al. 2022), as diffusers' `UnCLIPPipeline`
//! runs Karlo's folders: a CLIP text encoder; a diffusion prior that samples a
//! CLIP image embedding from the caption; a decoder conditioned on that
//! embedding (through `UnCLIPTextProjModel`) and the caption's tokens; and two
//! text-free super-resolution UNets, the first for every step but the last.
//!
//! The folder is what `UnCLIPPipeline.save_pretrained` writes: `text_encoder/`,
//! `tokenizer/`, `prior/`, `prior_scheduler/`, `text_proj/`, `decoder/`,
//! `decoder_scheduler/`, `super_res_first/`, `super_res_last/`,
//! `super_res_scheduler/`. Each stage's noise, the starting latents included,
//! comes from its own per-image stream, so a replayed stream reproduces
//! diffusers' draws and a seeded one makes an image independent of its batch.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::diffusion::guidance::classifier_free;
use crate::diffusion::{BatchNoise, SamplerKind, SamplerOptions, Scheduler};
use crate::nn::text::{TextEncoder, TextEncoderOptions};
use crate::nn::unclip::{LoadedPrior, LoadedTextProj, PriorInput, PriorTransformer};
use crate::nn::unet::unet2d::LoadedUNet2D;
use crate::nn::unet::{LoadedUNet, UNetInput};

use super::error::{PipelineError, Result};
use super::stage::load_scheduler;

/// Steps and guidance of the three stages (Karlo's defaults in [`Default`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnClipSettings {
    pub prior_steps: usize,
    pub decoder_steps: usize,
    pub super_res_steps: usize,
    pub prior_guidance_scale: f32,
    pub decoder_guidance_scale: f32,
}

impl Default for UnClipSettings {
    fn default() -> Self {
        Self { prior_steps: 25, decoder_steps: 25, super_res_steps: 7, prior_guidance_scale: 4.0, decoder_guidance_scale: 8.0 }
    }
}

/// Per-image noise streams of each stage.
pub struct UnClipNoise {
    pub prior: BatchNoise,
    pub decoder: BatchNoise,
    pub super_res: BatchNoise,
}

impl UnClipNoise {
    /// Seeded streams: stage k of image i draws from seed·3 + k.
    pub fn seeded(seeds: &[u64]) -> Self {
        let streams = |k: u64| BatchNoise::seeded(&seeds.iter().map(|s| s.wrapping_mul(3).wrapping_add(k)).collect::<Vec<_>>());
        Self { prior: streams(0), decoder: streams(1), super_res: streams(2) }
    }
}

/// What a generation produced, each `[B, …]` on the CPU in f32.
pub struct UnClipOutput {
    /// The prior's CLIP image embeddings (after `post_process_latents`).
    pub image_embeddings: Tensor,
    /// The decoder's image in [−1, 1].
    pub small: Tensor,
    /// The final image in [0, 1].
    pub image: Tensor,
}

pub struct UnClipPipeline {
    encoder: TextEncoder,
    prior: LoadedPrior,
    prior_scheduler: Scheduler,
    text_proj: LoadedTextProj,
    decoder: LoadedUNet,
    decoder_scheduler: Scheduler,
    super_res_first: LoadedUNet2D,
    super_res_last: LoadedUNet2D,
    super_res_scheduler: Scheduler,
}

impl UnClipPipeline {
    /// Loads an `UnCLIPPipeline` folder onto the CPU in f32.
    pub fn load(dir: &Path) -> Result<Self> {
        let (device, kind) = (Device::Cpu, Kind::Float);
        let options = TextEncoderOptions { tokenizer_dir: Some(dir.join("tokenizer")), ..Default::default() };
        Ok(Self {
            encoder: TextEncoder::load(&dir.join("text_encoder"), &options)?,
            prior: LoadedPrior::load(&dir.join("prior"), device, kind)?,
            prior_scheduler: load_scheduler(dir, "prior_scheduler")?,
            text_proj: LoadedTextProj::load(&dir.join("text_proj"), device, kind)?,
            decoder: LoadedUNet::load(&dir.join("decoder"), device, kind)?,
            decoder_scheduler: load_scheduler(dir, "decoder_scheduler")?,
            super_res_first: LoadedUNet2D::load(&dir.join("super_res_first"), device, kind)?,
            super_res_last: LoadedUNet2D::load(&dir.join("super_res_last"), device, kind)?,
            super_res_scheduler: load_scheduler(dir, "super_res_scheduler")?,
        })
    }

    /// The caption's CLIP embedding, tokens and mask, `[uncond; cond]` rows
    /// when `guided`. As diffusers does, the encoder runs on the ids alone
    /// (its causal mask keeps padding out of the real tokens), and the mask
    /// goes to the prior and decoder.
    fn encode(&self, prompts: &[&str], guided: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let all: Vec<&str> = if guided { prompts.iter().map(|_| "").chain(prompts.iter().copied()).collect() } else { prompts.to_vec() };
        let tokens = self.encoder.tokenizer().encode(&all)?;
        let unmasked = tokens.attention_mask.ones_like();
        let hidden = self.encoder.forward(&tokens.input_ids, &unmasked)?;
        let embeds = self
            .encoder
            .text_embeds(&tokens.input_ids, &unmasked)?
            .ok_or_else(|| PipelineError::model(self.encoder.dir().join("config.json"), "unCLIP needs a CLIP text encoder with a text_projection"))?;
        Ok((embeds, hidden, tokens.attention_mask.to_kind(Kind::Bool)))
    }

    pub fn generate(&self, prompts: &[&str], settings: &UnClipSettings, noise: &mut UnClipNoise) -> Result<UnClipOutput> {
        let b = prompts.len() as i64;
        if b == 0 {
            return Err(PipelineError::invalid("prompt", "no prompts"));
        }
        let guided = settings.prior_guidance_scale > 1.0 || settings.decoder_guidance_scale > 1.0;
        let twice = |t: &Tensor| if guided { Tensor::cat(&[t, t], 0) } else { t.shallow_clone() };
        let guide = |out: &Tensor, scale: f32, channels: i64| -> Result<Tensor> {
            if !guided {
                return Ok(out.shallow_clone());
            }
            Ok(classifier_free(out, &vec![scale; b as usize], channels)?)
        };
        let (prompt_embeds, text_hidden, text_mask) = self.encode(prompts, guided)?;

        // 1. The prior: a CLIP image embedding from the caption.
        let condition = PriorCondition { proj_embedding: &prompt_embeds, hidden: Some(&text_hidden), mask: Some(&text_mask), guided };
        let image_embeddings = sample_prior(&self.prior.model, &self.prior_scheduler, &condition, settings.prior_steps, settings.prior_guidance_scale, &mut noise.prior)?;

        // 2. The decoder, conditioned on the embedding and the caption.
        let projected = tch::no_grad(|| self.text_proj.model.forward(&image_embeddings, &prompt_embeds, &text_hidden, guided))?;
        let extra = self.text_proj.model.config().clip_extra_context_tokens;
        // The extra context tokens always count.
        let always = Tensor::ones([text_mask.size()[0], extra], (Kind::Int64, text_mask.device()));
        let decoder_mask = Tensor::cat(&[always, text_mask.to_kind(Kind::Int64)], 1);
        let config = self.decoder.model.config();
        let side = sample_side(config.sample_size.as_ref()).ok_or_else(|| PipelineError::invalid("decoder", "no sample_size"))?;
        let channels = config.in_channels;
        let mut sampler = self.decoder_scheduler.sampler(&SamplerOptions::new(SamplerKind::Ddpm, settings.decoder_steps))?;
        let mut small = noise.decoder.draw(&[b, channels, side, side], Kind::Float, Device::Cpu)?;
        while let Some(t) = sampler.current_timestep() {
            let input = twice(&small);
            let timesteps = Tensor::from(t as f32);
            let out = tch::no_grad(|| {
                self.decoder.model.forward(&UNetInput {
                    sample: &input,
                    timesteps: &timesteps,
                    encoder_hidden_states: &projected.hidden_states,
                    class_labels: Some(&projected.time_embeddings),
                    text_mask: Some(&decoder_mask),
                })
            })?;
            let out = guide(&out, settings.decoder_guidance_scale, channels)?;
            small = sampler.step(&out, &small, &mut noise.decoder)?.prev_sample;
        }
        let small = small.clamp(-1.0, 1.0);

        // 3. Super-resolution of the (bicubic, antialiased) upsampled image.
        let first = self.super_res_first.model.config();
        let side = sample_side(first.sample_size.as_ref()).ok_or_else(|| PipelineError::invalid("super_res_first", "no sample_size"))?;
        let upscaled = small.internal_upsample_bicubic2d_aa([side, side], false, None, None);
        let mut sampler = self.super_res_scheduler.sampler(&SamplerOptions::new(SamplerKind::Ddpm, settings.super_res_steps))?;
        let total = sampler.timesteps().len();
        let mut image = noise.super_res.draw(&[b, first.in_channels / 2, side, side], Kind::Float, Device::Cpu)?;
        while let Some(t) = sampler.current_timestep() {
            let unet = if sampler.step_index() + 1 == total { &self.super_res_last } else { &self.super_res_first };
            let input = Tensor::cat(&[&image, &upscaled], 1);
            let out = tch::no_grad(|| unet.model.forward(&input, &Tensor::from(t as f32), None))?;
            image = sampler.step(&out, &image, &mut noise.super_res)?.prev_sample;
        }
        let image = (image * 0.5 + 0.5).clamp(0.0, 1.0);
        Ok(UnClipOutput { image_embeddings, small, image })
    }
}

/// What a prior is conditioned on, for B captions: `[uncond; cond]` rows
/// (2B) when `guided`, else B.
pub struct PriorCondition<'a> {
    /// The captions' CLIP text embeddings.
    pub proj_embedding: &'a Tensor,
    /// Their encoder states and mask (Karlo's prior), if the prior reads tokens.
    pub hidden: Option<&'a Tensor>,
    pub mask: Option<&'a Tensor>,
    pub guided: bool,
}

/// Samples CLIP image embeddings `[B, clip_embed_dim]` with `prior` by DDPM
/// over `steps` of `scheduler`'s timesteps, classifier-free guided at
/// `guidance_scale` when the condition is, as `UnCLIPPipeline` does; the
/// latents are drawn from `noise` (one stream per caption) and returned
/// through `post_process_latents`.
pub fn sample_prior(prior: &PriorTransformer, scheduler: &Scheduler, condition: &PriorCondition<'_>, steps: usize, guidance_scale: f32, noise: &mut BatchNoise) -> Result<Tensor> {
    let rows = condition.proj_embedding.size()[0];
    let b = if condition.guided { rows / 2 } else { rows };
    let width = prior.config().embedding_dim;
    let device = condition.proj_embedding.device();
    let mut sampler = scheduler.sampler(&SamplerOptions::new(SamplerKind::Ddpm, steps))?;
    let mut latents = noise.draw(&[b, width], Kind::Float, device)?;
    while let Some(t) = sampler.current_timestep() {
        let input = if condition.guided { Tensor::cat(&[&latents, &latents], 0) } else { latents.shallow_clone() };
        let timesteps = Tensor::from(t);
        let out = tch::no_grad(|| {
            prior.forward(&PriorInput {
                hidden_states: &input,
                timesteps: &timesteps,
                proj_embedding: condition.proj_embedding,
                encoder_hidden_states: condition.hidden,
                attention_mask: condition.mask,
            })
        })?;
        let out = if condition.guided { classifier_free(&out, &vec![guidance_scale; b as usize], width)? } else { out };
        latents = sampler.step(&out, &latents, noise)?.prev_sample;
    }
    Ok(prior.post_process_latents(&latents))
}

fn sample_side(size: Option<&crate::nn::unet::config::SampleSize>) -> Option<i64> {
    use crate::nn::unet::config::SampleSize;
    match size? {
        SampleSize::Square(s) => Some(*s),
        SampleSize::HeightWidth([h, w]) if h == w => Some(*h),
        SampleSize::HeightWidth(_) => None,
    }
}
