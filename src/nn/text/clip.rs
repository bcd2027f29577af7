//! transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`: the text tower
//! of CLIP (Radford et al. 2021), as unCLIP (DALL-E 2, Karlo) conditions its
//! prior and decoder on it.
//!
//! Reference: transformers `models/clip/modeling_clip.py` (`CLIPTextEmbeddings`,
//! `CLIPAttention`, `CLIPMLP`, `CLIPEncoderLayer`, `CLIPTextTransformer`).
//! Parameter names equal its state-dict keys (`text_model.encoder.layers.0.
//! self_attn.q_proj.weight`, `text_projection.weight`).
//!
//! A pre-LN transformer with a causal mask (a token sees itself and the tokens
//! before it) on top of the padding mask, learned absolute positions, and a
//! final LayerNorm. The pooled output is the final state at the end-of-text
//! token, projected without bias to `projection_dim` when the checkpoint has a
//! `text_projection`.

use tch::{Kind, Tensor};

use super::config::ClipTextConfig;
use super::parts::{check_inputs, embedding, lowest, LayerNorm, Linear};
use crate::nn::error::{NnError, Result};

/// Checkpoint tensors the model may hold and does not use.
pub fn ignorable(name: &str) -> bool {
    name == "text_model.embeddings.position_ids"
}

/// The original CLIP configs name token 2 as end-of-text although it is not;
/// transformers then takes the highest id (OpenAI's tokenizer gives its
/// end-of-text token the highest id of the vocabulary).
const LEGACY_EOS: i64 = 2;

/// What the text tower returns.
#[derive(Debug)]
pub struct ClipTextOutput {
    /// `last_hidden_state` after the final LayerNorm, `[B, L, hidden_size]`.
    pub hidden: Tensor,
    /// The end-of-text states, `[B, hidden_size]`.
    pub pooled: Tensor,
    /// `text_embeds`: the pooled states through `text_projection`,
    /// `[B, projection_dim]`, when the model has one.
    pub text_embeds: Option<Tensor>,
}

#[derive(Debug)]
struct Layer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug)]
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// Declares every parameter under `p`; `projection`: whether the checkpoint
    /// is a `CLIPTextModelWithProjection` (has `text_projection.weight`).
    pub fn new(p: &tch::nn::Path<'_>, cfg: &ClipTextConfig, projection: bool) -> Self {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let text = p / "text_model";
        let emb = &text / "embeddings";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = &(&(&text / "encoder") / "layers") / i;
                let attn = &l / "self_attn";
                let mlp = &l / "mlp";
                Layer {
                    layer_norm1: LayerNorm::new(&l / "layer_norm1", h, eps),
                    q_proj: Linear::new(&attn / "q_proj", h, h, true),
                    k_proj: Linear::new(&attn / "k_proj", h, h, true),
                    v_proj: Linear::new(&attn / "v_proj", h, h, true),
                    out_proj: Linear::new(&attn / "out_proj", h, h, true),
                    layer_norm2: LayerNorm::new(&l / "layer_norm2", h, eps),
                    fc1: Linear::new(&mlp / "fc1", h, cfg.intermediate_size, true),
                    fc2: Linear::new(&mlp / "fc2", cfg.intermediate_size, h, true),
                }
            })
            .collect();
        Self {
            token_embedding: embedding(&emb / "token_embedding", cfg.vocab_size, h),
            position_embedding: embedding(&emb / "position_embedding", cfg.max_position_embeddings, h),
            layers,
            final_layer_norm: LayerNorm::new(&text / "final_layer_norm", h, eps),
            text_projection: projection.then(|| Linear::new(p / "text_projection", h, cfg.projection_dim, false)),
            config: cfg.clone(),
        }
    }

    /// `input_ids` and `attention_mask`: `[B, L]` (1 = token, 0 = padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<ClipTextOutput> {
        let (b, l) = check_inputs(input_ids, attention_mask)?;
        let cfg = &self.config;
        if l > cfg.max_position_embeddings {
            return Err(NnError::input("input_ids", format!("{l} tokens exceed max_position_embeddings {}", cfg.max_position_embeddings)));
        }
        let kind = self.token_embedding.kind();
        let device = self.token_embedding.device();
        let positions = self.position_embedding.f_narrow(0, 0, l)?;
        let mut x = self.token_embedding.f_index_select(0, &input_ids.f_reshape([-1])?)?.f_view([b, l, cfg.hidden_size])? + positions;
        // Causal and padding masks, each adding the most negative finite value.
        let causal = Tensor::f_full([l, l], lowest(kind), (kind, device))?.f_triu(1)?;
        let padding = (attention_mask.f_to_kind(kind)?.f_neg()? + 1.0) * lowest(kind);
        // Two masks on one score would overflow to −∞; clamping keeps transformers' finite bias.
        let bias = (causal.f_view([1, 1, l, l])? + padding.f_view([b, 1, 1, l])?).f_clamp_min(lowest(kind))?;
        let heads = cfg.num_attention_heads;
        let split = |t: Tensor| -> Result<Tensor> { Ok(t.f_view([b, l, heads, cfg.hidden_size / heads])?.f_transpose(1, 2)?) };
        for layer in &self.layers {
            let h = layer.layer_norm1.forward(&x)?;
            let (q, k, v) = (split(layer.q_proj.forward(&h)?)?, split(layer.k_proj.forward(&h)?)?, split(layer.v_proj.forward(&h)?)?);
            let attended = Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(&bias), 0.0, false, None, false)?;
            x = layer.out_proj.forward(&attended.f_transpose(1, 2)?.f_reshape([b, l, cfg.hidden_size])?)? + x;
            let h = cfg.hidden_act.forward(&layer.fc1.forward(&layer.layer_norm2.forward(&x)?)?);
            x = layer.fc2.forward(&h)? + x;
        }
        let hidden = self.final_layer_norm.forward(&x)?;
        // The end-of-text position: the highest id (legacy configs) or the first eos.
        let eos = if cfg.eos_token_id == LEGACY_EOS {
            input_ids.f_argmax(-1, false)?
        } else {
            input_ids.f_eq(cfg.eos_token_id)?.f_to_kind(Kind::Int)?.f_argmax(-1, false)?
        };
        let rows = Tensor::f_arange(b, (Kind::Int64, device))?;
        let pooled = hidden.f_index(&[Some(rows), Some(eos.f_to_device(device)?)])?;
        let text_embeds = self.text_projection.as_ref().map(|p| p.forward(&pooled)).transpose()?;
        Ok(ClipTextOutput { hidden, pooled, text_embeds })
    }
}
