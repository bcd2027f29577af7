//! The UNet's down, middle and up blocks as DeepFloyd IF configures them.
//!
//! - `ResnetDownsampleBlock2D` / `SimpleCrossAttnDownBlock2D`: `layers` ResNets
//!   (each followed by added-KV attention in the attention variant), then a
//!   downsampling ResNet. Every output is kept for the skip connections.
//! - `UNetMidBlock2DSimpleCrossAttn`: ResNet, attention, ResNet.
//! - `ResnetUpsampleBlock2D` / `SimpleCrossAttnUpBlock2D`: `layers` ResNets, each
//!   fed the concatenation with one skip (newest first), then an upsampling ResNet.
//!
//! Parameter names (`resnets.N`, `attentions.N`, `downsamplers.0`, `upsamplers.0`)
//! are those of diffusers' `unet_2d_blocks.py`; both variants of a block are one
//! struct here because they differ only in the presence of attention.

use tch::{nn, Tensor};

use super::attention::{AddedKvAttention, AttentionMaps, AttentionShape};
use super::config::{BlockKind, BlockSpec, LayerSettings, MidSpec};
use super::resnet::{Resample, ResnetBlock2D, ResnetShape};

/// What a block's layers read besides the activations.
pub struct Conditioning<'a> {
    pub temb: &'a Tensor,
    pub text: &'a Tensor,
    /// `[B, L]`, additive: 0 for a text token that counts, −10000 for padding.
    pub text_bias: Option<&'a Tensor>,
    pub train: bool,
    /// Where attention layers record their maps of the text tokens, if asked.
    pub maps: Option<&'a AttentionMaps>,
}

fn attention(p: &nn::Path, i: usize, spec: &BlockSpec, settings: &LayerSettings) -> Option<AddedKvAttention> {
    (spec.kind == BlockKind::SimpleCrossAttn).then(|| {
        let shape = AttentionShape {
            channels: spec.out_channels,
            head_dim: spec.head_dim,
            added_kv_dim: spec.cross_attention_dim,
            only_cross_attention: spec.only_cross_attention,
        };
        AddedKvAttention::new(&(p / "attentions") / i, shape, settings)
    })
}

fn resampler(p: nn::Path, spec: &BlockSpec, resample: Resample, settings: &LayerSettings) -> ResnetBlock2D {
    let shape = ResnetShape {
        in_channels: spec.out_channels,
        out_channels: spec.out_channels,
        resample,
        output_scale_factor: spec.output_scale_factor,
    };
    ResnetBlock2D::new(&p / 0, shape, settings)
}

#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Option<AddedKvAttention>>,
    downsampler: Option<ResnetBlock2D>,
}

impl DownBlock {
    pub fn new(p: nn::Path, spec: &BlockSpec, settings: &LayerSettings) -> Self {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..spec.layers as usize {
            let shape = ResnetShape {
                in_channels: if i == 0 { spec.in_channels } else { spec.out_channels },
                out_channels: spec.out_channels,
                resample: Resample::None,
                output_scale_factor: spec.output_scale_factor,
            };
            resnets.push(ResnetBlock2D::new(&(&p / "resnets") / i, shape, settings));
            attentions.push(attention(&p, i, spec, settings));
        }
        let downsampler = spec.resample.then(|| resampler(&p / "downsamplers", spec, Resample::Down, settings));
        Self { resnets, attentions, downsampler }
    }

    /// Returns the block output and pushes every intermediate onto `skips`.
    pub fn forward(&self, x: &Tensor, cond: &Conditioning<'_>, skips: &mut Vec<Tensor>) -> Tensor {
        let mut h = x.shallow_clone();
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            h = resnet.forward(&h, cond.temb, cond.train);
            if let Some(attn) = attn {
                h = attn.forward(&h, cond.text, cond.text_bias, cond.maps);
            }
            skips.push(h.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h, cond.temb, cond.train);
            skips.push(h.shallow_clone());
        }
        h
    }
}

#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: AddedKvAttention,
}

impl MidBlock {
    pub fn new(p: nn::Path, spec: &MidSpec, settings: &LayerSettings) -> Self {
        let shape = ResnetShape {
            in_channels: spec.channels,
            out_channels: spec.channels,
            resample: Resample::None,
            output_scale_factor: spec.output_scale_factor,
        };
        let resnets = (0..2).map(|i| ResnetBlock2D::new(&(&p / "resnets") / i, shape, settings)).collect();
        let attn_shape = AttentionShape {
            channels: spec.channels,
            head_dim: spec.head_dim,
            added_kv_dim: spec.cross_attention_dim,
            only_cross_attention: spec.only_cross_attention,
        };
        Self { resnets, attention: AddedKvAttention::new(&(&p / "attentions") / 0, attn_shape, settings) }
    }

    pub fn forward(&self, x: &Tensor, cond: &Conditioning<'_>) -> Tensor {
        let h = self.resnets[0].forward(x, cond.temb, cond.train);
        let h = self.attention.forward(&h, cond.text, cond.text_bias, cond.maps);
        self.resnets[1].forward(&h, cond.temb, cond.train)
    }
}

#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Option<AddedKvAttention>>,
    upsampler: Option<ResnetBlock2D>,
}

impl UpBlock {
    pub fn new(p: nn::Path, spec: &BlockSpec, settings: &LayerSettings) -> Self {
        let n = spec.layers as usize;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..n {
            // The last ResNet takes the skip that entered this resolution's down block.
            let skip_channels = if i + 1 == n { spec.in_channels } else { spec.out_channels };
            let from_below = if i == 0 { spec.prev_output_channels } else { spec.out_channels };
            let shape = ResnetShape {
                in_channels: from_below + skip_channels,
                out_channels: spec.out_channels,
                resample: Resample::None,
                output_scale_factor: spec.output_scale_factor,
            };
            resnets.push(ResnetBlock2D::new(&(&p / "resnets") / i, shape, settings));
            attentions.push(attention(&p, i, spec, settings));
        }
        let upsampler = spec.resample.then(|| resampler(&p / "upsamplers", spec, Resample::Up, settings));
        Self { resnets, attentions, upsampler }
    }

    /// The number of skips this block consumes.
    pub fn depth(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes `self.depth()` skips from the end of `skips`.
    pub fn forward(&self, x: &Tensor, cond: &Conditioning<'_>, skips: &mut Vec<Tensor>) -> Tensor {
        let mut h = x.shallow_clone();
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            let skip = skips.pop().expect("the UNet pushes one skip per up-block layer");
            h = resnet.forward(&joined(&h, &skip), cond.temb, cond.train);
            if let Some(attn) = attn {
                h = attn.forward(&h, cond.text, cond.text_bias, cond.maps);
            }
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h, cond.temb, cond.train);
        }
        h
    }
}

/// `[h; skip]` along the channels, laid out as `h` is.
///
/// Why: `cat` lays its output out channels-last only when every input is, and
/// a skip's layout can differ between a batch of one and a larger batch with
/// the same values; the ResNet's GroupNorm after it then takes another kernel
/// and the sample's bits change with the batch around it.
fn joined(h: &Tensor, skip: &Tensor) -> Tensor {
    let out = Tensor::cat(&[h, skip], 1);
    if is_channels_last(h) && !is_channels_last(&out) {
        return to_channels_last(&out);
    }
    out
}

/// The same values with channels-last strides.
fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Channels-last strides (the batch's own stride aside, which a batch of one may set freely).
fn is_channels_last(t: &Tensor) -> bool {
    let (size, strides) = (t.size(), t.stride());
    size.len() == 4 && size[1] > 1 && strides[1] == 1 && strides[3] == size[1] && strides[2] == size[1] * size[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_keeps_the_layout_of_the_path_from_below() {
        let opts = (tch::Kind::Float, tch::Device::Cpu);
        for batch in [1, 2] {
            let h = to_channels_last(&Tensor::randn([batch, 8, 4, 4], opts));
            let skip = Tensor::randn([batch, 6, 4, 4], opts);
            // cat alone would fall back to NCHW because the skip is NCHW.
            assert!(!is_channels_last(&Tensor::cat(&[&h, &skip], 1)));
            let out = joined(&h, &skip);
            assert!(is_channels_last(&out), "batch {batch}");
            assert!(out.equal(&Tensor::cat(&[&h, &skip], 1)));
            let plain = joined(&h.contiguous(), &skip);
            assert!(!is_channels_last(&plain) && plain.is_contiguous());
        }
    }
}
