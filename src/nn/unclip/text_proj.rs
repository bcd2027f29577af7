//! `UnCLIPTextProjModel`: how DALL-E 2's decoder sees the CLIP image embedding
//! (Ramesh et al. 2022, §2.1, after GLIDE): projected and added to the
//! timestep embedding together with the pooled text embedding, and projected
//! into extra context tokens placed before the (projected, normalised) text
//! tokens. Under classifier-free guidance the unconditional rows get a learned
//! embedding in place of the image's. Follows diffusers' module of that name.

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use super::config::TextProjConfig;
use crate::nn::error::{NnError, Result};
use crate::nn::layers::{ApplyLinear, Linear};
use crate::nn::unet::model::WEIGHTS_STEM;
use crate::nn::weights;

#[derive(Debug)]
pub struct UnCLIPTextProjModel {
    config: TextProjConfig,
    learned_classifier_free_guidance_embeddings: Tensor,
    embedding_proj: Linear,
    clip_image_embeddings_project_to_time_embeddings: Linear,
    clip_extra_context_tokens_proj: Linear,
    encoder_hidden_states_proj: Linear,
    text_encoder_hidden_states_norm: nn::LayerNorm,
}

/// The decoder UNet's conditioning.
pub struct TextProjOutput {
    /// `[B, extra + L, cross_attention_dim]`: its `encoder_hidden_states`.
    pub hidden_states: Tensor,
    /// `[B, time_embed_dim]`: added to its timestep embedding.
    pub time_embeddings: Tensor,
}

impl UnCLIPTextProjModel {
    pub fn new(p: &nn::Path, config: &TextProjConfig) -> Self {
        let (clip, time, cross) = (config.clip_embeddings_dim, config.time_embed_dim, config.cross_attention_dim);
        Self {
            learned_classifier_free_guidance_embeddings: p.zeros("learned_classifier_free_guidance_embeddings", &[clip]),
            embedding_proj: Linear::new(p / "embedding_proj", clip, time),
            clip_image_embeddings_project_to_time_embeddings: Linear::new(
                p / "clip_image_embeddings_project_to_time_embeddings",
                clip,
                time,
            ),
            clip_extra_context_tokens_proj: Linear::new(
                p / "clip_extra_context_tokens_proj",
                clip,
                config.clip_extra_context_tokens * cross,
            ),
            encoder_hidden_states_proj: Linear::new(p / "encoder_hidden_states_proj", clip, cross),
            text_encoder_hidden_states_norm: nn::layer_norm(p / "text_encoder_hidden_states_norm", vec![cross], Default::default()),
            config: config.clone(),
        }
    }

    pub fn config(&self) -> &TextProjConfig {
        &self.config
    }

    /// The learned embedding that stands for "no image" (`[D]`): what the
    /// unconditional rows of classifier-free guidance read.
    pub fn null_image_embedding(&self) -> &Tensor {
        &self.learned_classifier_free_guidance_embeddings
    }

    /// `image_embeddings` `[B, D]` with the rows where `dropped` (`[B]`,
    /// bool) is true replaced by the learned unconditional embedding: the
    /// decoder's training drops the CLIP embedding so that it learns the row
    /// classifier-free guidance compares against.
    pub fn drop_image_embeddings(&self, image_embeddings: &Tensor, dropped: &Tensor) -> Tensor {
        let null = self.learned_classifier_free_guidance_embeddings.to_kind(image_embeddings.kind()).unsqueeze(0).expand_as(image_embeddings);
        null.where_self(&dropped.to_kind(Kind::Bool).to_device(image_embeddings.device()).view([-1, 1]), image_embeddings)
    }

    /// `image_embeddings` `[B, D]`; `prompt_embeds` `[B', D]` and
    /// `text_encoder_hidden_states` `[B', L, D]`, where B' = 2B when `guided`
    /// (unconditional rows first, as diffusers orders them) and B' = B otherwise.
    pub fn forward(&self, image_embeddings: &Tensor, prompt_embeds: &Tensor, text_encoder_hidden_states: &Tensor, guided: bool) -> Result<TextProjOutput> {
        let d = self.config.clip_embeddings_dim;
        let i = image_embeddings.size();
        if i.len() != 2 || i[1] != d {
            return Err(NnError::input("image_embeddings", format!("shape {i:?}; expected [B, {d}]")));
        }
        let image = if guided {
            let null = self.learned_classifier_free_guidance_embeddings.to_kind(image_embeddings.kind()).unsqueeze(0).expand([i[0], d], false);
            Tensor::cat(&[null, image_embeddings.shallow_clone()], 0)
        } else {
            image_embeddings.shallow_clone()
        };
        let b = image.size()[0];
        if prompt_embeds.size() != [b, d] {
            return Err(NnError::input("prompt_embeds", format!("shape {:?}; expected [{b}, {d}]", prompt_embeds.size())));
        }
        let t = text_encoder_hidden_states.size();
        if t.len() != 3 || t[0] != b || t[2] != d {
            return Err(NnError::input("text_encoder_hidden_states", format!("shape {t:?}; expected [{b}, L, {d}]")));
        }
        let time_embeddings = prompt_embeds.apply_linear(&self.embedding_proj)
            + image.apply_linear(&self.clip_image_embeddings_project_to_time_embeddings);
        // diffusers reads the projection as [B, cross, extra] and transposes it.
        let extra = image
            .apply_linear(&self.clip_extra_context_tokens_proj)
            .reshape([b, -1, self.config.clip_extra_context_tokens])
            .permute([0, 2, 1]);
        let text = text_encoder_hidden_states.apply_linear(&self.encoder_hidden_states_proj).apply(&self.text_encoder_hidden_states_norm);
        Ok(TextProjOutput { hidden_states: Tensor::cat(&[extra, text], 1), time_embeddings })
    }
}

/// A text projection with the `VarStore` that owns its weights.
#[derive(Debug)]
pub struct LoadedTextProj {
    pub vs: nn::VarStore,
    pub model: UnCLIPTextProjModel,
}

impl LoadedTextProj {
    /// Loads a diffusers `UnCLIPTextProjModel` directory onto `device` in `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = TextProjConfig::from_dir(dir)?;
        let (vs, model) = weights::load_frozen(dir, WEIGHTS_STEM, device, kind, |p| Ok(UnCLIPTextProjModel::new(p, &config)))?;
        Ok(Self { vs, model })
    }
}
