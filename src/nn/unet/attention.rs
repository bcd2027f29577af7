//! Self-attention over the image tokens with the text tokens' keys and values
//! added in front: GLIDE's text conditioning (Nichol et al. 2021, §2.3; also
//! DeepFloyd IF). Each head attends over `[text tokens; image tokens]`, so one
//! attention does both self- and cross-attention.
//!
//! Follows diffusers' `Attention` with `added_kv_proj_dim` and
//! `AttnAddedKVProcessor2_0`: GroupNorm on the image tokens, an optional
//! GroupNorm on the text tokens (`cross_attention_norm = "group_norm"`),
//! libtorch's scaled-dot-product attention, an output projection and the residual.
//!
//! Training can ask every layer for the attention its image tokens pay to each
//! text token ([`AttentionMaps`]): where a word "looks", which a grounding loss
//! ties to the object the word names (TokenCompose, Wang et al. 2024). Such a
//! call computes the attention explicitly, the same arithmetic without the
//! fused kernel.

use std::cell::RefCell;

use tch::{nn, Kind, Tensor};

use crate::nn::layers::{batch_strided, ApplyLinear, GroupNorm, Linear};

use super::config::LayerSettings;

/// The geometry of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Image channels (query dim, output dim).
    pub channels: i64,
    pub head_dim: i64,
    /// Width of the text tokens fed to `add_k_proj` / `add_v_proj`.
    pub added_kv_dim: i64,
    /// Attend to the text tokens only (no `to_k` / `to_v` on the image).
    pub only_cross_attention: bool,
}

#[derive(Debug)]
pub struct AddedKvAttention {
    group_norm: GroupNorm,
    norm_cross: Option<GroupNorm>,
    to_q: Linear,
    to_k: Option<Linear>,
    to_v: Option<Linear>,
    add_k_proj: Linear,
    add_v_proj: Linear,
    to_out: Linear,
    heads: i64,
}

/// The attention maps of one forward pass, one per text-attending layer in
/// call order: `[B, H·W, L]`, the weight each image token gives each of the
/// `L` text tokens, averaged over heads (a row sums to at most 1, the rest
/// going to the image tokens). They carry gradients.
#[derive(Debug, Default)]
pub struct AttentionMaps {
    maps: RefCell<Vec<Tensor>>,
}

impl AttentionMaps {
    fn record(&self, map: Tensor) {
        self.maps.borrow_mut().push(map);
    }

    /// The maps recorded so far, leaving none.
    pub fn take(&self) -> Vec<Tensor> {
        std::mem::take(&mut self.maps.borrow_mut())
    }
}

/// diffusers' `Attention` fixes the cross-attention GroupNorm at 32 groups and eps 1e-5.
const CROSS_NORM_GROUPS: i64 = 32;

impl AddedKvAttention {
    pub fn new(p: nn::Path, shape: AttentionShape, settings: &LayerSettings) -> Self {
        let AttentionShape { channels, head_dim, added_kv_dim, only_cross_attention } = shape;
        let inner = channels; // heads × head_dim, with heads = channels / head_dim
        let lin = |name: &str, i: i64, o: i64| Linear::new(&p / name, i, o);
        // The image GroupNorm uses Attention's default eps (1e-5), not the ResNets' norm_eps.
        Self {
            group_norm: GroupNorm::new(&p / "group_norm", settings.groups, channels, 1e-5),
            norm_cross: settings
                .cross_attention_norm
                .then(|| GroupNorm::new(&p / "norm_cross", CROSS_NORM_GROUPS, added_kv_dim, 1e-5)),
            to_q: lin("to_q", channels, inner),
            to_k: (!only_cross_attention).then(|| lin("to_k", channels, inner)),
            to_v: (!only_cross_attention).then(|| lin("to_v", channels, inner)),
            add_k_proj: lin("add_k_proj", added_kv_dim, inner),
            add_v_proj: lin("add_v_proj", added_kv_dim, inner),
            to_out: Linear::new(&(&p / "to_out") / 0, inner, channels),
            heads: channels / head_dim,
        }
    }

    /// `x`: `[B, C, H, W]`; `text`: `[B, L, added_kv_dim]`; `text_bias`:
    /// `[B, L]`, added to the scores of the text keys (padding: −10000). With
    /// `maps`, the layer records its attention on the text tokens there.
    pub fn forward(&self, x: &Tensor, text: &Tensor, text_bias: Option<&Tensor>, maps: Option<&AttentionMaps>) -> Tensor {
        let size = x.size();
        let (b, c) = (size[0], size[1]);
        let heads = self.heads;
        // [B, T, C] -> [B, heads, T, C/heads]
        let split = |t: Tensor| t.view([b, -1, heads, c / heads]).transpose(1, 2);

        // 1. Normalise the image tokens (and the text tokens, over channels).
        let tokens = x.apply(&self.group_norm).view([b, c, -1]).transpose(1, 2);
        let text = match &self.norm_cross {
            Some(norm) => text.transpose(1, 2).apply(norm).transpose(1, 2),
            None => text.shallow_clone(),
        };
        // 2. Queries from the image; keys and values from [text; image].
        let q = split(tokens.apply_linear(&self.to_q));
        let text_k = split(text.apply_linear(&self.add_k_proj));
        let text_v = split(text.apply_linear(&self.add_v_proj));
        let (k, v) = match (&self.to_k, &self.to_v) {
            (Some(to_k), Some(to_v)) => (
                Tensor::cat(&[text_k, split(tokens.apply_linear(to_k))], 2),
                Tensor::cat(&[text_v, split(tokens.apply_linear(to_v))], 2),
            ),
            _ => (text_k, text_v),
        };
        // 3. Attention, output projection, residual. The image keys are never
        // masked: the bias is padded with zeros over them, as diffusers pads it.
        let words = text.size()[1];
        let bias = text_bias.map(|t| t.to_kind(q.kind()).constant_pad_nd([0, k.size()[2] - words]).view([b, 1, 1, -1]));
        let out = match maps {
            None => Tensor::scaled_dot_product_attention(&q, &k, &v, bias.as_ref(), 0.0, false, None, false),
            Some(maps) => {
                let scale = 1.0 / ((c / heads) as f64).sqrt();
                let mut scores = q.matmul(&k.transpose(-2, -1)) * scale;
                if let Some(bias) = &bias {
                    scores += bias;
                }
                let weights = scores.softmax(-1, Kind::Float).to_kind(q.kind());
                maps.record(weights.narrow(-1, 0, words).mean_dim(1, false, Kind::Float));
                weights.matmul(&v)
            }
        };
        let out = out.transpose(1, 2).reshape([b, -1, c]).apply_linear(&self.to_out);
        // The reshape leaves a batch of one with an arbitrary batch stride;
        // restrided, its layout (and so every later kernel) is the batch's.
        batch_strided(&(out.transpose(-1, -2).reshape(size.as_slice()) + x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::layers::Activation;
    use crate::nn::unet::config::TimeScaleShift;

    #[test]
    fn a_single_sample_leaves_with_the_layout_it_has_in_a_batch() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let settings = LayerSettings {
            act: Activation::Silu,
            groups: 16,
            eps: 1e-5,
            temb_channels: 64,
            time_scale_shift: TimeScaleShift::ScaleShift,
            skip_time_act: false,
            dropout: 0.0,
            cross_attention_norm: true,
        };
        let shape = AttentionShape { channels: 96, head_dim: 32, added_kv_dim: 64, only_cross_attention: false };
        let attention = AddedKvAttention::new(vs.root(), shape, &settings);
        let opts = (Kind::Float, tch::Device::Cpu);
        let x = Tensor::randn([3, 96, 8, 8], opts);
        let text = Tensor::randn([3, 5, 64], opts);
        tch::no_grad(|| {
            let batch = attention.forward(&x, &text, None, None);
            let one = attention.forward(&x.narrow(0, 0, 1), &text.narrow(0, 0, 1), None, None);
            // The sample's values, and every stride, the batch's included:
            // libtorch reads the memory format off all four.
            assert!(one.get(0).equal(&batch.get(0)));
            assert_eq!(one.stride(), batch.stride(), "layout of a batch of one");
        });
    }
}
