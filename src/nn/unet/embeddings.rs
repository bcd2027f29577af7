//! Conditioning embeddings of the UNet: the sinusoidal timestep embedding, the
//! MLP that lifts it (`TimestepEmbedding`), and the text pooling that GLIDE and
//! DeepFloyd IF add to it (`TextTimeEmbedding` with `AttentionPooling`).
//!
//! References: DDPM's sinusoidal embedding (Ho et al. 2020, from the Transformer's
//! positional encoding), GLIDE (Nichol et al. 2021) for adding a pooled text
//! token to the time embedding, and diffusers' `embeddings.py`
//! (`get_timestep_embedding`, `TimestepEmbedding`, `TextTimeEmbedding`,
//! `AttentionPooling`) for the exact arithmetic and parameter names.

use tch::{nn, Kind, Tensor};

use crate::nn::layers::{Activation, ApplyLinear, BatchOfOne, Linear};

/// Sinusoidal embedding of (possibly fractional) timesteps: `[N] -> [N, dim]` in f32.
///
/// Frequencies are `exp(-ln(10000)·i / (dim/2 - freq_shift))`; the halves are
/// `[sin, cos]`, or `[cos, sin]` when `flip_sin_to_cos` (diffusers' convention).
pub fn timestep_embedding(timesteps: &Tensor, dim: i64, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor {
    let half = dim / 2;
    let device = timesteps.device();
    let exponent = Tensor::arange(half, (Kind::Float, device)) * (-(10000f64.ln())) / (half as f64 - freq_shift);
    let args = timesteps.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    let (sin, cos) = (args.sin(), args.cos());
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1) } else { Tensor::cat(&[sin, cos], 1) };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// `TimestepEmbedding`: linear → activation → linear (→ optional post-activation).
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    pub fn new(p: nn::Path, in_dim: i64, dim: i64, act: Activation, post_act: Option<Activation>) -> Self {
        Self {
            linear_1: Linear::new(&p / "linear_1", in_dim, dim),
            linear_2: Linear::new(&p / "linear_2", dim, dim),
            act,
            post_act,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.act.forward(&x.apply_linear(&self.linear_1)).apply_linear(&self.linear_2);
        match self.post_act {
            Some(a) => a.forward(&h),
            None => h,
        }
    }
}

/// `AttentionPooling`: one query token (the mean of the sequence plus a learned
/// positional embedding) attends over [query token; sequence]; its output is the
/// pooled vector. Taken by diffusers from DeepFloyd IF.
#[derive(Debug)]
pub struct AttentionPooling {
    positional_embedding: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    heads: i64,
}

impl AttentionPooling {
    pub fn new(p: nn::Path, heads: i64, dim: i64) -> Self {
        let std = 1.0 / (dim as f64).sqrt();
        Self {
            positional_embedding: p.var("positional_embedding", &[1, dim], nn::Init::Randn { mean: 0.0, stdev: std }),
            q_proj: Linear::new(&p / "q_proj", dim, dim),
            k_proj: Linear::new(&p / "k_proj", dim, dim),
            v_proj: Linear::new(&p / "v_proj", dim, dim),
            heads,
        }
    }

    /// `[B, L, D] -> [B, D]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, _, d) = x.size3().expect("pooling input is [B, L, D]");
        let head_dim = d / self.heads;
        let class_token = x.mean_dim(1, true, None) + self.positional_embedding.to_kind(x.kind());
        let seq = Tensor::cat(&[&class_token, x], 1);
        // [B, T, D] -> [B, heads, T, head_dim]
        let split = |t: Tensor| t.view([b, -1, self.heads, head_dim]).transpose(1, 2);
        let q = split(class_token.apply_linear(&self.q_proj));
        let k = split(seq.apply_linear(&self.k_proj));
        let v = split(seq.apply_linear(&self.v_proj));
        // IF scales q and k by d^-1/4 each (more stable in f16 than scaling the
        // product) and takes the softmax in f32.
        let scale = 1.0 / (head_dim as f64).sqrt().sqrt();
        let weight = (q * scale).matmul(&(k * scale).transpose(-1, -2));
        let weight = weight.to_kind(Kind::Float).softmax(-1, Kind::Float).to_kind(x.kind());
        // [B, heads, 1, head_dim] -> [B, D]
        weight.matmul(&v).reshape([b, d])
    }
}

/// `TextTimeEmbedding`: LayerNorm → attention pooling → linear → LayerNorm; the
/// result is added to the time embedding (`addition_embed_type = "text"`).
#[derive(Debug)]
pub struct TextTimeEmbedding {
    norm1: nn::LayerNorm,
    pool: AttentionPooling,
    proj: Linear,
    norm2: nn::LayerNorm,
    /// The pooling's small products and norms take other kernels for one row
    /// (measured: the 6th digit); see [`BatchOfOne`].
    single: BatchOfOne,
}

impl TextTimeEmbedding {
    pub fn new(p: nn::Path, encoder_dim: i64, time_embed_dim: i64, heads: i64) -> Self {
        Self {
            norm1: nn::layer_norm(&p / "norm1", vec![encoder_dim], Default::default()),
            pool: AttentionPooling::new(&p / "pool", heads, encoder_dim),
            proj: Linear::new(&p / "proj", encoder_dim, time_embed_dim),
            norm2: nn::layer_norm(&p / "norm2", vec![time_embed_dim], Default::default()),
            single: BatchOfOne::default(),
        }
    }

    /// `[B, L, encoder_dim] -> [B, time_embed_dim]`.
    pub fn forward(&self, text: &Tensor) -> Tensor {
        self.single.apply(text, |t| self.pooled(t))
    }

    fn pooled(&self, text: &Tensor) -> Tensor {
        self.pool.forward(&text.apply(&self.norm1)).apply_linear(&self.proj).apply(&self.norm2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_embedding_matches_closed_form() {
        let t = Tensor::from_slice(&[0.0f32, 10.0, 999.0]);
        let e = timestep_embedding(&t, 8, true, 1.0);
        assert_eq!(e.size(), [3, 8]);
        // flip_sin_to_cos: the first half is cos; frequency i is 10000^(-i/(4-1)).
        let f1 = (-(10000f64.ln()) / 3.0).exp();
        assert!((e.double_value(&[1, 1]) - (10.0 * f1).cos()).abs() < 1e-5);
        assert!((e.double_value(&[1, 5]) - (10.0 * f1).sin()).abs() < 1e-5);
        assert_eq!(e.double_value(&[0, 0]), 1.0);
        assert_eq!(timestep_embedding(&t, 7, false, 0.0).size(), [3, 7]);
    }

    #[test]
    fn attention_pooling_of_identical_tokens_is_their_value_projection() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let pool = AttentionPooling::new(vs.root(), 2, 8);
        // Zero positional embedding: every token equals the class token, so the
        // attention is uniform and the output is v_proj(token).
        let _ = tch::no_grad(|| pool.positional_embedding.shallow_clone().zero_());
        let token = Tensor::randn([1, 1, 8], (Kind::Float, tch::Device::Cpu));
        let x = token.repeat([1, 5, 1]);
        let want = token.apply_linear(&pool.v_proj).reshape([1, 8]);
        let got = pool.forward(&x);
        assert!((got - want).abs().max().double_value(&[]) < 1e-5);
    }
}
