//! `PriorTransformer`: DALL-E 2's diffusion prior (Ramesh et al. 2022, §2.2).
//!
//! A decoder-only transformer over the sequence [text tokens; projected text
//! embedding; timestep embedding; noisy image embedding; PRD token], with a
//! causal mask. The PRD token's output, projected to the CLIP width, is the
//! prediction (Karlo predicts the clean embedding x₀). Follows diffusers'
//! `PriorTransformer.forward` for every option its config offers, with
//! `BasicTransformerBlock` as diffusers builds it here: pre-LayerNorm
//! self-attention with biased projections, then a GELU feed-forward of four
//! times the width, each with a residual.

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use super::config::{PriorConfig, PriorSpec};
use crate::nn::error::{NnError, Result};
use crate::nn::layers::{Activation, ApplyLinear, Linear};
use crate::nn::unet::model::WEIGHTS_STEM;
use crate::nn::unet::embeddings::timestep_embedding;
use crate::nn::weights;

/// The additive mask value diffusers uses for hidden positions (not −∞: a row
/// with every key hidden still has a defined softmax).
const MASKED: f64 = -10000.0;

/// One prior call's inputs; every tensor's first dimension is the batch `B`.
pub struct PriorInput<'a> {
    /// `[B, embedding_dim]`: the noisy CLIP image embedding.
    pub hidden_states: &'a Tensor,
    /// `[B]` or `[]`: diffusion timesteps.
    pub timesteps: &'a Tensor,
    /// `[B, embedding_proj_dim]`: the pooled CLIP text embedding.
    pub proj_embedding: &'a Tensor,
    /// `[B, L, embedding_dim]`: the CLIP text tokens (required iff the config projects them).
    pub encoder_hidden_states: Option<&'a Tensor>,
    /// `[B, L]`, true where a text token is real. With it the causal mask
    /// applies as well; without it, as in diffusers, attention is unmasked.
    pub attention_mask: Option<&'a Tensor>,
}

#[derive(Debug)]
struct TransformerBlock {
    norm1: nn::LayerNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm3: nn::LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    heads: i64,
}

impl TransformerBlock {
    fn new(p: nn::Path, dim: i64, heads: i64) -> Self {
        let attn = &p / "attn1";
        let ff = &(&p / "ff") / "net";
        Self {
            norm1: nn::layer_norm(&p / "norm1", vec![dim], Default::default()),
            to_q: Linear::new(&attn / "to_q", dim, dim),
            to_k: Linear::new(&attn / "to_k", dim, dim),
            to_v: Linear::new(&attn / "to_v", dim, dim),
            to_out: Linear::new(&(&attn / "to_out") / 0, dim, dim),
            norm3: nn::layer_norm(&p / "norm3", vec![dim], Default::default()),
            ff_in: Linear::new(&(&ff / 0) / "proj", dim, 4 * dim),
            ff_out: Linear::new(&ff / 2, 4 * dim, dim),
            heads,
        }
    }

    /// `x`: `[B, S, D]`; `mask`: additive, `[B, 1, S, S]`.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, s, d) = x.size3().expect("transformer tokens are [B, S, D]");
        let split = |t: Tensor| t.view([b, s, self.heads, d / self.heads]).transpose(1, 2);
        let h = x.apply(&self.norm1);
        let (q, k, v) = (split(h.apply_linear(&self.to_q)), split(h.apply_linear(&self.to_k)), split(h.apply_linear(&self.to_v)));
        let attended = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false);
        let x = attended.transpose(1, 2).reshape([b, s, d]).apply_linear(&self.to_out) + x;
        let ff = Activation::Gelu.forward(&x.apply(&self.norm3).apply_linear(&self.ff_in)).apply_linear(&self.ff_out);
        ff + x
    }
}

#[derive(Debug)]
pub struct PriorTransformer {
    config: PriorConfig,
    spec: PriorSpec,
    time_linear_1: Linear,
    time_linear_2: Linear,
    proj_in: Linear,
    embedding_proj_norm: Option<nn::LayerNorm>,
    embedding_proj: Linear,
    encoder_hidden_states_proj: Option<Linear>,
    positional_embedding: Tensor,
    prd_embedding: Option<Tensor>,
    norm_in: Option<nn::LayerNorm>,
    blocks: Vec<TransformerBlock>,
    norm_out: nn::LayerNorm,
    proj_to_clip_embeddings: Linear,
    clip_mean: Tensor,
    clip_std: Tensor,
}

impl PriorTransformer {
    /// Builds the model's variables under `p` (diffusers' initial values).
    pub fn new(p: &nn::Path, config: &PriorConfig) -> Result<Self> {
        let spec = config.spec()?;
        let inner = spec.inner_dim;
        let norm = |name: &str, dim: i64| nn::layer_norm(p / name, vec![dim], Default::default());
        let tokens = config.num_embeddings + config.additional_embeddings;
        let time = p / "time_embedding";
        Ok(Self {
            time_linear_1: Linear::new(&time / "linear_1", inner, spec.time_embed_dim),
            time_linear_2: Linear::new(&time / "linear_2", spec.time_embed_dim, inner),
            proj_in: Linear::new(p / "proj_in", config.embedding_dim, inner),
            embedding_proj_norm: spec.embedding_proj_norm.then(|| norm("embedding_proj_norm", spec.embedding_proj_dim)),
            embedding_proj: Linear::new(p / "embedding_proj", spec.embedding_proj_dim, inner),
            encoder_hidden_states_proj: spec
                .encoder_hid_proj
                .then(|| Linear::new(p / "encoder_hidden_states_proj", config.embedding_dim, inner)),
            positional_embedding: p.zeros("positional_embedding", &[1, tokens, inner]),
            prd_embedding: spec.prd.then(|| p.zeros("prd_embedding", &[1, 1, inner])),
            norm_in: spec.norm_in.then(|| norm("norm_in", inner)),
            blocks: (0..config.num_layers).map(|i| TransformerBlock::new(&(p / "transformer_blocks") / i, inner, spec.heads)).collect(),
            norm_out: norm("norm_out", inner),
            proj_to_clip_embeddings: Linear::new(p / "proj_to_clip_embeddings", inner, spec.clip_embed_dim),
            clip_mean: p.zeros("clip_mean", &[1, spec.clip_embed_dim]),
            clip_std: p.zeros("clip_std", &[1, spec.clip_embed_dim]),
            config: config.clone(),
            spec,
        })
    }

    pub fn config(&self) -> &PriorConfig {
        &self.config
    }

    /// Checks shapes so that a bad call is an error, not a libtorch abort.
    fn check(&self, input: &PriorInput<'_>) -> Result<i64> {
        let h = input.hidden_states.size();
        if h.len() != 2 || h[1] != self.config.embedding_dim {
            return Err(NnError::input("hidden_states", format!("shape {h:?}; expected [B, {}]", self.config.embedding_dim)));
        }
        let b = h[0];
        let t = input.timesteps.size();
        if !(t.is_empty() || t == [b]) {
            return Err(NnError::input("timesteps", format!("shape {t:?}; expected [] or [{b}]")));
        }
        let p = input.proj_embedding.size();
        if p != [b, self.spec.embedding_proj_dim] {
            return Err(NnError::input("proj_embedding", format!("shape {p:?}; expected [{b}, {}]", self.spec.embedding_proj_dim)));
        }
        match (input.encoder_hidden_states, self.spec.encoder_hid_proj) {
            (None, true) => return Err(NnError::input("encoder_hidden_states", "required by this prior (encoder_hid_proj_type = linear)")),
            (Some(e), _) => {
                let e = e.size();
                if e.len() != 3 || e[0] != b || e[2] != self.config.embedding_dim {
                    return Err(NnError::input("encoder_hidden_states", format!("shape {e:?}; expected [{b}, L, {}]", self.config.embedding_dim)));
                }
                if !self.spec.encoder_hid_proj {
                    return Err(NnError::input("encoder_hidden_states", "given, but this prior has no encoder_hidden_states_proj"));
                }
            }
            (None, false) => {}
        }
        if let Some(m) = input.attention_mask {
            let words = input.encoder_hidden_states.map_or(0, |e| e.size()[1]);
            if m.size() != [b, words] {
                return Err(NnError::input("attention_mask", format!("shape {:?}; expected [{b}, {words}]", m.size())));
            }
        }
        Ok(b)
    }

    /// The predicted image embedding: `[B, clip_embed_dim]` with a PRD token,
    /// else `[B, n, clip_embed_dim]` for the n tokens after the conditioning.
    pub fn forward(&self, input: &PriorInput<'_>) -> Result<Tensor> {
        let b = self.check(input)?;
        let kind = input.hidden_states.kind();
        let device = input.hidden_states.device();
        // 1. The conditioning tokens: timestep, pooled text, text tokens.
        let t = input.timesteps.to_device(device).expand([b], false);
        let sinusoid = timestep_embedding(&t, self.spec.inner_dim, true, 0.0).to_kind(kind);
        let time = self.spec.time_act.forward(&sinusoid.apply_linear(&self.time_linear_1)).apply_linear(&self.time_linear_2);
        let proj = match &self.embedding_proj_norm {
            Some(norm) => input.proj_embedding.apply(norm),
            None => input.proj_embedding.shallow_clone(),
        };
        let proj = proj.apply_linear(&self.embedding_proj);
        let mut tokens = Vec::new();
        if let (Some(e), Some(lin)) = (input.encoder_hidden_states, &self.encoder_hidden_states_proj) {
            tokens.push(e.apply_linear(lin));
        }
        let words = tokens.first().map_or(0, |t| t.size()[1]);
        tokens.push(proj.unsqueeze(1));
        tokens.push(time.unsqueeze(1));
        tokens.push(input.hidden_states.apply_linear(&self.proj_in).unsqueeze(1));
        if let Some(prd) = &self.prd_embedding {
            tokens.push(prd.to_kind(kind).expand([b, 1, self.spec.inner_dim], false));
        }
        let x = Tensor::cat(&tokens, 1);
        let seq = x.size()[1];
        // 2. Positions; a table shorter than the sequence covers the noisy
        // embedding only, padded with zeros before (conditioning) and after (PRD).
        let conditioning = words + 2;
        let mut positions = self.positional_embedding.to_kind(kind);
        let table = positions.size()[1];
        if table < seq {
            positions = positions.constant_pad_nd([0, 0, conditioning, i64::from(self.spec.prd)]);
        }
        if positions.size()[1] != seq {
            return Err(NnError::input(
                "encoder_hidden_states",
                format!("{seq} tokens in all for a positional table of {table} (num_embeddings + additional_embeddings)"),
            ));
        }
        let mut x = x + positions;
        // 3. The mask: hidden text tokens and the future, additively.
        let mask = match input.attention_mask {
            None => None,
            Some(m) => {
                if words + self.config.additional_embeddings != seq {
                    return Err(NnError::input("attention_mask", format!("masks {words} text tokens of a {seq}-token sequence")));
                }
                let padding = (m.to_kind(kind).neg() + 1.0) * MASKED;
                let padding = padding.constant_pad_nd([0, self.config.additional_embeddings]);
                let causal = Tensor::full([seq, seq], MASKED, (kind, device)).triu(1);
                Some((padding.unsqueeze(1) + causal.unsqueeze(0)).unsqueeze(1))
            }
        };
        // 4. The blocks and the read-out.
        if let Some(norm) = &self.norm_in {
            x = x.apply(norm);
        }
        for block in &self.blocks {
            x = block.forward(&x, mask.as_ref());
        }
        let x = x.apply(&self.norm_out);
        let out = if self.spec.prd { x.select(1, seq - 1) } else { x.narrow(1, conditioning, seq - conditioning) };
        Ok(out.apply_linear(&self.proj_to_clip_embeddings))
    }

    /// The prior's output in CLIP's own scale: `x · clip_std + clip_mean`.
    pub fn post_process_latents(&self, latents: &Tensor) -> Tensor {
        latents * self.clip_std.to_kind(latents.kind()) + self.clip_mean.to_kind(latents.kind())
    }
}

/// A prior with the `VarStore` that owns its weights.
#[derive(Debug)]
pub struct LoadedPrior {
    pub vs: nn::VarStore,
    pub model: PriorTransformer,
}

impl LoadedPrior {
    /// Loads a diffusers `PriorTransformer` directory onto `device` in `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = PriorConfig::from_dir(dir)?;
        let (vs, model) = weights::load_frozen(dir, WEIGHTS_STEM, device, kind, |p| PriorTransformer::new(p, &config))?;
        Ok(Self { vs, model })
    }

    /// A prior with diffusers' initial values (libtorch's generator draws the
    /// linear layers), on the CPU in f32, trainable.
    pub fn random(config: &PriorConfig) -> Result<Self> {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = PriorTransformer::new(&vs.root(), config)?;
        let prior = Self { vs, model };
        prior.freeze_statistics();
        Ok(prior)
    }

    /// Writes a diffusers `PriorTransformer` folder: `config.json` and the weights in `kind`.
    pub fn save(&self, dir: &Path, kind: Kind) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| NnError::io(dir, e))?;
        let config = dir.join("config.json");
        std::fs::write(&config, self.model.config().to_json()).map_err(|e| NnError::io(&config, e))?;
        weights::save(&self.vs, &dir.join(format!("{WEIGHTS_STEM}.safetensors")), kind)
    }

    /// Makes the weights trainable again (loading freezes them), all but
    /// `clip_mean` and `clip_std`: the statistics of the embeddings are set
    /// from data, not learned (see [`LoadedPrior::set_statistics`]).
    pub fn unfreeze(&mut self) {
        self.vs.unfreeze();
        self.freeze_statistics();
    }

    fn freeze_statistics(&self) {
        for (name, var) in self.vs.variables() {
            if name == "clip_mean" || name == "clip_std" {
                let _ = var.set_requires_grad(false);
            }
        }
    }

    /// Sets the scale the prior's latents are denoised in: an embedding e is
    /// the latent (e − mean) / std (`[clip_embed_dim]` each).
    pub fn set_statistics(&self, mean: &Tensor, std: &Tensor) -> Result<()> {
        let width = self.model.spec.clip_embed_dim;
        if mean.size() != [width] || std.size() != [width] {
            return Err(NnError::input("clip_mean", format!("statistics {:?} and {:?} for width {width}", mean.size(), std.size())));
        }
        tch::no_grad(|| {
            self.model.clip_mean.shallow_clone().copy_(&mean.view([1, width]));
            self.model.clip_std.shallow_clone().copy_(&std.view([1, width]));
        });
        Ok(())
    }

    /// Embeddings `[B, clip_embed_dim]` as the latents the prior denoises:
    /// the inverse of [`PriorTransformer::post_process_latents`].
    pub fn to_latents(&self, embeddings: &Tensor) -> Tensor {
        let m = &self.model;
        (embeddings - m.clip_mean.to_kind(embeddings.kind())) / m.clip_std.to_kind(embeddings.kind())
    }

    pub fn parameter_count(&self) -> i64 {
        self.vs.variables().values().map(Tensor::numel).sum::<usize>() as i64
    }
}
