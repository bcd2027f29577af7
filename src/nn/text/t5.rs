//! transformers' `T5EncoderModel`: the encoder stack of T5 (t5-v1_1 as DeepFloyd IF
//! uses it, and the original T5's ReLU variant), returning `last_hidden_state`.
//!
//! Reference: transformers `models/t5/modeling_t5.py` (`T5LayerNorm`,
//! `T5DenseActDense`, `T5DenseGatedActDense`, `T5Attention`, `T5Block`, `T5Stack`).
//! Parameter names equal its state-dict keys, e.g.
//! `encoder.block.0.layer.0.SelfAttention.q.weight`.
//!
//! T5's particulars, each mirrored here:
//! * no absolute positions: a learned bias per (bucket of relative position, head),
//!   computed by the first block's attention and shared by every block;
//! * no 1/√d scaling of the attention scores (folded into the initialisation);
//! * RMSNorm without mean subtraction or bias, variance accumulated in f32;
//! * pre-norm residual blocks, then a final norm;
//! * in f16, hidden states clamped after each sub-layer so that an overflow to
//!   inf does not propagate, and `wo` kept in f32 (transformers'
//!   `_keep_in_fp32_modules = ["wo"]`), so that from the first feed-forward on
//!   the residual stream is f32 exactly as in transformers;
//! * the token embedding is `shared.weight`, tied to `encoder.embed_tokens.weight`:
//!   a checkpoint may hold either or both, and `decoder.*` / `lm_head.*` of a
//!   full `T5ForConditionalGeneration` checkpoint are ignored.

use std::collections::BTreeSet;

use tch::{Kind, Tensor};

use super::config::T5Config;
use super::parts::{additive_mask, check_inputs, embedding, Linear};
use crate::nn::error::Result;
use crate::nn::layers::Activation;

/// Under which key the checkpoint stores the (tied) token embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingKey {
    /// `shared.weight`: what transformers saves.
    Shared,
    /// `encoder.embed_tokens.weight` only (some exported encoder-only checkpoints).
    EncoderEmbedTokens,
}

impl EmbeddingKey {
    /// `Shared` unless the checkpoint holds only `encoder.embed_tokens.weight`.
    pub fn for_checkpoint(names: &BTreeSet<String>) -> Self {
        if !names.contains("shared.weight") && names.contains("encoder.embed_tokens.weight") {
            Self::EncoderEmbedTokens
        } else {
            Self::Shared
        }
    }
}

/// Checkpoint tensors a T5 checkpoint may hold and the encoder does not use: the
/// decoder and LM head of a full model, and the tied alias of `shared.weight`.
pub fn ignorable(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("lm_head.") || name == "encoder.embed_tokens.weight"
}

/// `T5EncoderModel`.
#[derive(Debug)]
pub struct T5Encoder {
    embed_tokens: Tensor,
    block: Vec<Block>,
    final_layer_norm: RmsNorm,
    /// `encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight` [buckets, heads].
    relative_attention_bias: Tensor,
    num_buckets: i64,
    max_distance: i64,
}

/// `encoder.block.{i}`: `layer.0` self-attention, `layer.1` feed-forward.
#[derive(Debug)]
struct Block {
    attention_norm: RmsNorm,
    attention: Attention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

/// `layer.0.SelfAttention.{q, k, v, o}`, no biases.
#[derive(Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: i64,
    d_kv: i64,
}

/// `layer.1.DenseReluDense`: `wi_0`/`wi_1`/`wo` (gated) or `wi`/`wo`.
#[derive(Debug)]
enum FeedForward {
    Gated { wi_0: Linear, wi_1: Linear, wo: Linear, act: Activation },
    Plain { wi: Linear, wo: Linear, act: Activation },
}

/// `T5LayerNorm`: `weight · x / sqrt(mean(x²) + eps)`.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl T5Encoder {
    /// Declares every parameter under `p` (normally the `VarStore` root).
    pub fn new(p: &tch::nn::Path<'_>, cfg: &T5Config, key: EmbeddingKey) -> Self {
        let embed_tokens = match key {
            EmbeddingKey::Shared => embedding(p / "shared", cfg.vocab_size, cfg.d_model),
            EmbeddingKey::EncoderEmbedTokens => embedding(p / "encoder" / "embed_tokens", cfg.vocab_size, cfg.d_model),
        };
        let blocks = p / "encoder" / "block";
        let block: Vec<Block> = (0..cfg.num_layers).map(|i| Block::new(&(&blocks / i), cfg)).collect();
        let bias_path = &blocks / 0 / "layer" / 0 / "SelfAttention" / "relative_attention_bias";
        let relative_attention_bias = embedding(bias_path, cfg.relative_attention_num_buckets, cfg.num_heads);
        Self {
            embed_tokens,
            block,
            final_layer_norm: RmsNorm::new(p / "encoder" / "final_layer_norm", cfg),
            relative_attention_bias,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        }
    }

    /// `last_hidden_state` [B, L, d_model] for `input_ids` [B, L] and
    /// `attention_mask` [B, L] (1 = token, 0 = padding).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (_, len) = check_inputs(input_ids, attention_mask)?;
        let mut x = Tensor::f_embedding(&self.embed_tokens, input_ids, -1, false, false)?;
        // [1, H, L, L] + [B, 1, 1, L]: the shared bias with the padding mask folded in.
        let bias = self.position_bias(len)?.f_add(&additive_mask(attention_mask, x.kind())?)?;
        for block in &self.block {
            x = block.forward(&x, &bias)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// `T5Attention.compute_bias` for a bidirectional encoder: [1, heads, L, L].
    fn position_bias(&self, len: i64) -> Result<Tensor> {
        let device = self.relative_attention_bias.device();
        let query = Tensor::f_arange(len, (Kind::Int64, device))?.f_unsqueeze(1)?;
        let key = Tensor::f_arange(len, (Kind::Int64, device))?.f_unsqueeze(0)?;
        let buckets = relative_position_bucket(&key.f_sub(&query)?, self.num_buckets, self.max_distance)?;
        let values = Tensor::f_embedding(&self.relative_attention_bias, &buckets, -1, false, false)?;
        Ok(values.f_permute([2, 0, 1])?.f_unsqueeze(0)?)
    }
}

/// Maps relative positions (key − query) to buckets, as transformers'
/// `_relative_position_bucket(bidirectional=True)`: half the buckets per sign;
/// within a half, distances below a quarter of the buckets get one bucket each,
/// larger ones share logarithmically wider buckets up to `max_distance`, beyond
/// which all fall in the last. The float steps are the same libtorch ops in the
/// same order, so bucket boundaries round identically.
fn relative_position_bucket(relative: &Tensor, num_buckets: i64, max_distance: i64) -> Result<Tensor> {
    let half = num_buckets / 2;
    let max_exact = half / 2;
    let sign_offset = relative.f_gt(0)?.f_to_kind(Kind::Int64)?.f_mul_scalar(half)?;
    let distance = relative.f_abs()?;
    let is_small = distance.f_lt(max_exact)?;
    // log(0) = -inf at distance 0 is discarded by the `where` below.
    let large = distance
        .f_to_kind(Kind::Float)?
        .f_div_scalar(max_exact)?
        .f_log()?
        .f_div_scalar((max_distance as f64 / max_exact as f64).ln())?
        .f_mul_scalar(half - max_exact)?
        .f_to_kind(Kind::Int64)?
        .f_add_scalar(max_exact)?
        .f_clamp_max(half - 1)?;
    Ok(sign_offset.f_add(&distance.f_where_self(&is_small, &large)?)?)
}

impl Block {
    fn new(p: &tch::nn::Path<'_>, cfg: &T5Config) -> Self {
        let attn = p / "layer" / 0;
        let ff = p / "layer" / 1;
        Self {
            attention_norm: RmsNorm::new(&attn / "layer_norm", cfg),
            attention: Attention::new(&(&attn / "SelfAttention"), cfg),
            ff_norm: RmsNorm::new(&ff / "layer_norm", cfg),
            ff: FeedForward::new(&(&ff / "DenseReluDense"), cfg),
        }
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let attended = self.attention.forward(&self.attention_norm.forward(x)?, bias)?;
        let x = clamp_half(x.f_add(&attended)?)?;
        let fed = self.ff.forward(&self.ff_norm.forward(&x)?)?;
        clamp_half(x.f_add(&fed)?)
    }
}

impl Attention {
    fn new(p: &tch::nn::Path<'_>, cfg: &T5Config) -> Self {
        let inner = cfg.num_heads * cfg.d_kv;
        Self {
            q: Linear::new(p / "q", cfg.d_model, inner, false),
            k: Linear::new(p / "k", cfg.d_model, inner, false),
            v: Linear::new(p / "v", cfg.d_model, inner, false),
            o: Linear::new(p / "o", inner, cfg.d_model, false),
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        }
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let size = x.size();
        let (b, l) = (size[0], size[1]);
        let split = |t: Tensor| -> Result<Tensor> { Ok(t.f_view([b, l, self.heads, self.d_kv])?.f_transpose(1, 2)?) };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        // Scale 1: T5 does not divide the scores by √d_kv.
        let bias = bias.f_to_kind(q.kind())?;
        let out = Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(&bias), 0.0, false, 1.0, false)?;
        self.o.forward(&out.f_transpose(1, 2)?.f_reshape([b, l, self.heads * self.d_kv])?)
    }
}

impl FeedForward {
    fn new(p: &tch::nn::Path<'_>, cfg: &T5Config) -> Self {
        let (d, f, act) = (cfg.d_model, cfg.d_ff, cfg.feed_forward.act);
        let wo = Linear::new(p / "wo", f, d, false);
        if cfg.feed_forward.gated {
            Self::Gated { wi_0: Linear::new(p / "wi_0", d, f, false), wi_1: Linear::new(p / "wi_1", d, f, false), wo, act }
        } else {
            Self::Plain { wi: Linear::new(p / "wi", d, f, false), wo, act }
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (inner, wo) = match self {
            Self::Gated { wi_0, wi_1, wo, act } => (act.forward(&wi_0.forward(x)?).f_mul(&wi_1.forward(x)?)?, wo),
            Self::Plain { wi, wo, act } => (act.forward(&wi.forward(x)?), wo),
        };
        // `wo` may be kept in f32 under f16 (see the module docs): cast its input to match.
        wo.forward(&inner.f_to_kind(wo.kind())?)
    }
}

impl RmsNorm {
    fn new(p: tch::nn::Path<'_>, cfg: &T5Config) -> Self {
        Self { weight: p.var("weight", &[cfg.d_model], tch::nn::Init::Const(1.0)), eps: cfg.layer_norm_epsilon }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let variance = x.f_to_kind(Kind::Float)?.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
        // x · rsqrt(…) promotes to f32; the result returns to the weight's half kind.
        let normed = x.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        let normed = match self.weight.kind() {
            kind @ (Kind::Half | Kind::BFloat16) => normed.f_to_kind(kind)?,
            _ => normed,
        };
        Ok(self.weight.f_mul(&normed)?)
    }
}

/// The largest finite f16.
const F16_MAX: f64 = 65504.0;

/// transformers' f16 guard: clamp to ±max, or to ±(max − 1000) once an inf has
/// appeared, so later sums stay finite. Decided on the device, without a sync.
fn clamp_half(x: Tensor) -> Result<Tensor> {
    if x.kind() != Kind::Half {
        return Ok(x);
    }
    let limit = Tensor::f_where_scalar(&x.f_isinf()?.f_any()?, F16_MAX - 1000.0, F16_MAX)?.f_to_kind(Kind::Half)?;
    Ok(x.f_clamp_tensor(Some(&limit.f_neg()?), Some(&limit))?)
}

/// Keeps every `DenseReluDense.wo.weight` in f32 after the store was cast to
/// f16, as transformers does for T5 loaded in float16 (not for bf16).
pub fn keep_wo_in_f32(vs: &tch::nn::VarStore) -> Result<()> {
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            if name.ends_with(".DenseReluDense.wo.weight") {
                let upcast = var.f_to_kind(Kind::Float)?;
                var.f_set_data(&upcast)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::text::config::FeedForwardProj;

    fn tiny(gated: bool) -> T5Config {
        T5Config {
            vocab_size: 13,
            d_model: 8,
            d_kv: 3,
            d_ff: 5,
            num_layers: 2,
            num_heads: 2,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward: FeedForwardProj { gated, act: if gated { Activation::GeluTanh } else { Activation::Relu } },
        }
    }

    #[test]
    fn parameter_names_are_transformers_keys() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _ = T5Encoder::new(&vs.root(), &tiny(true), EmbeddingKey::Shared);
        let vars = vs.variables();
        for key in [
            "shared.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.1.layer.0.SelfAttention.o.weight",
            "encoder.block.1.layer.0.layer_norm.weight",
            "encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
            "encoder.block.1.layer.1.layer_norm.weight",
            "encoder.final_layer_norm.weight",
        ] {
            assert!(vars.contains_key(key), "missing {key}");
        }
        assert_eq!(vars.len(), 1 + 1 + 2 * 9 + 1);
        assert_eq!(vars["encoder.block.0.layer.0.SelfAttention.q.weight"].size(), [6, 8]);

        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _ = T5Encoder::new(&vs.root(), &tiny(false), EmbeddingKey::EncoderEmbedTokens);
        let vars = vs.variables();
        assert!(vars.contains_key("encoder.embed_tokens.weight") && !vars.contains_key("shared.weight"));
        assert!(vars.contains_key("encoder.block.1.layer.1.DenseReluDense.wi.weight"));
    }

    #[test]
    fn buckets_match_transformers() {
        // transformers' T5Attention._relative_position_bucket(arange(-10, 10) * 9, True, 32, 128)
        let rel = Tensor::arange_start(-10, 10, (Kind::Int64, tch::Device::Cpu)) * 9;
        let got: Vec<i64> = relative_position_bucket(&rel, 32, 128).unwrap().try_into().unwrap();
        let want = [14, 14, 14, 13, 13, 12, 12, 11, 10, 8, 0, 24, 26, 27, 28, 28, 29, 29, 30, 30];
        assert_eq!(got, want);
    }

    #[test]
    fn half_precision_clamps_infinities() {
        let x = Tensor::from_slice(&[1.0f32, f32::INFINITY, -70000.0]).to_kind(Kind::Half);
        let y: Vec<f32> = clamp_half(x).unwrap().to_kind(Kind::Float).try_into().unwrap();
        assert_eq!(y, [1.0, 64512.0, -64512.0]);
    }
}
