//! `ResnetBlock2D`: the residual block of DDPM/ADM UNets, with optional 2×
//! resampling inside the block (BigGAN-style, as ADM uses for its up/down steps).
//!
//! The time embedding enters either additively before the second GroupNorm
//! (`"default"`, DDPM) or as AdaGN, `GroupNorm(h)·(1 + scale) + shift`
//! (`"scale_shift"`, Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", §3).
//! Arithmetic and parameter names follow diffusers' `resnet.py`.

use tch::{nn, Tensor};

use crate::nn::layers::{ApplyLinear, Conv2d, GroupNorm, Linear};

use super::config::{LayerSettings, TimeScaleShift};

/// 2× resampling done inside a ResNet block, to both branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    None,
    /// Nearest-neighbour 2× upsampling (`Upsample2D` without conv).
    Up,
    /// 2×2 average pooling (`Downsample2D` without conv).
    Down,
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    resample: Resample,
    settings: LayerSettings,
    output_scale_factor: f64,
}

/// The channel counts and resampling of one block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetShape {
    pub in_channels: i64,
    pub out_channels: i64,
    pub resample: Resample,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(p: nn::Path, shape: ResnetShape, settings: &LayerSettings) -> Self {
        let ResnetShape { in_channels, out_channels, resample, output_scale_factor } = shape;
        let temb_out = match settings.time_scale_shift {
            TimeScaleShift::Default => out_channels,
            TimeScaleShift::ScaleShift => 2 * out_channels,
        };
        Self {
            norm1: GroupNorm::new(&p / "norm1", settings.groups, in_channels, settings.eps),
            conv1: Conv2d::new(&p / "conv1", in_channels, out_channels, 3),
            time_emb_proj: Linear::new(&p / "time_emb_proj", settings.temb_channels, temb_out),
            norm2: GroupNorm::new(&p / "norm2", settings.groups, out_channels, settings.eps),
            conv2: Conv2d::new(&p / "conv2", out_channels, out_channels, 3),
            conv_shortcut: (in_channels != out_channels)
                .then(|| Conv2d::new(&p / "conv_shortcut", in_channels, out_channels, 1)),
            resample,
            settings: *settings,
            output_scale_factor,
        }
    }

    fn resample(&self, x: &Tensor) -> Tensor {
        match self.resample {
            Resample::None => x.shallow_clone(),
            Resample::Up => {
                let (h, w) = (x.size()[2], x.size()[3]);
                x.upsample_nearest2d([2 * h, 2 * w], 2.0, 2.0)
            }
            Resample::Down => x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None),
        }
    }

    /// `x`: `[B, C_in, H, W]`, `temb`: `[B, temb_channels]`.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, train: bool) -> Tensor {
        let act = self.settings.act;
        // 1. Pre-activation, resampling both branches, first conv.
        let h = act.forward(&x.apply(&self.norm1));
        let (h, skip) = (self.resample(&h), self.resample(x));
        let h = h.apply(&self.conv1);
        // 2. Time embedding.
        let temb = if self.settings.skip_time_act { temb.shallow_clone() } else { act.forward(temb) };
        let temb = temb.apply_linear(&self.time_emb_proj).unsqueeze(-1).unsqueeze(-1);
        let h = match self.settings.time_scale_shift {
            TimeScaleShift::Default => (h + temb).apply(&self.norm2),
            TimeScaleShift::ScaleShift => {
                let chunks = temb.chunk(2, 1);
                h.apply(&self.norm2) * (&chunks[0] + 1.0) + &chunks[1]
            }
        };
        // 3. Second conv and the residual.
        let h = act.forward(&h).dropout(self.settings.dropout, train).apply(&self.conv2);
        let skip = match &self.conv_shortcut {
            Some(conv) => skip.apply(conv),
            None => skip,
        };
        let out = skip + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}
