//! `UNet2DModel`: diffusers' UNet without text conditioning, as unCLIP's
//! super-resolution stages (Karlo's `super_res_first` / `super_res_last`) use
//! it: the upsampled low-resolution image concatenated to the noisy one (SR by
//! concatenation, ADM/SR3), conditioned on the timestep only.
//!
//! It shares the ResNet blocks of [`super::model::UNet2DConditionModel`]; what
//! differs, following diffusers' `UNet2DModel`: the timestep MLP and the output
//! activation are always SiLU (`act_fn` is the ResNets'), and the middle block
//! is `UNetMidBlock2D`, whose optional self-attention has no text keys, a
//! GroupNorm only with the `default` time shift, a residual and a rescale.
//! Supported blocks: `ResnetDownsampleBlock2D` / `ResnetUpsampleBlock2D` and
//! the `UNetMidBlock2D` middle (or none); other block types are an error
//! naming the key.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::blocks::{Conditioning, DownBlock, UpBlock};
use super::config::{PerBlock, SampleSize, UNetConfig};
use super::embeddings::{timestep_embedding, TimestepEmbedding};
use super::model::WEIGHTS_STEM;
use super::resnet::{Resample, ResnetBlock2D, ResnetShape};
use crate::nn::error::{NnError, Result};
use crate::nn::layers::{batch_strided, Activation, ApplyLinear, Conv2d, GroupNorm, Linear};
use crate::nn::config_file::{self as diffusers_config, invalid, unsupported};
use crate::nn::weights;

pub const CLASS_NAME: &str = "UNet2DModel";

/// The raw config: the keys and defaults of diffusers' `UNet2DModel.__init__`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UNet2DModelConfig {
    pub sample_size: Option<SampleSize>,
    pub in_channels: i64,
    pub out_channels: i64,
    pub center_input_sample: bool,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<i64>,
    pub freq_shift: f64,
    pub flip_sin_to_cos: bool,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub mid_block_scale_factor: f64,
    pub downsample_padding: i64,
    pub downsample_type: String,
    pub upsample_type: String,
    pub dropout: f64,
    pub act_fn: String,
    pub attention_head_dim: Option<i64>,
    pub norm_num_groups: Option<i64>,
    pub attn_norm_num_groups: Option<i64>,
    pub norm_eps: f64,
    pub resnet_time_scale_shift: String,
    pub add_attention: bool,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<i64>,
    pub num_train_timesteps: Option<i64>,
}

impl Default for UNet2DModelConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: s(&["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]),
            mid_block_type: Some("UNetMidBlock2D".into()),
            up_block_types: s(&["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            dropout: 0.0,
            act_fn: "silu".into(),
            attention_head_dim: Some(8),
            norm_num_groups: Some(32),
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".into(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }
}

impl UNet2DModelConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        diffusers_config::from_json(text, CLASS_NAME)
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        diffusers_config::from_dir(dir, CLASS_NAME)
    }

    /// The same network as a conditional UNet's config without text
    /// attention, from which the shared blocks are built; checks the options
    /// this model adds.
    fn as_conditional(&self) -> Result<UNetConfig> {
        if self.time_embedding_type != "positional" {
            return Err(unsupported("time_embedding_type", format!("`{}` (supported: positional)", self.time_embedding_type)));
        }
        if self.num_class_embeds.is_some() && self.class_embed_type.is_none() {
            return Err(unsupported("num_class_embeds", "learned class embeddings are not implemented"));
        }
        if let Some(other) = self.mid_block_type.as_deref().filter(|m| *m != "UNetMidBlock2D") {
            return Err(unsupported("mid_block_type", format!("`{other}` (supported: UNetMidBlock2D)")));
        }
        for (field, types) in [("down_block_types", &self.down_block_types), ("up_block_types", &self.up_block_types)] {
            let want = if field == "down_block_types" { "ResnetDownsampleBlock2D" } else { "ResnetUpsampleBlock2D" };
            if let Some(other) = types.iter().find(|t| *t != want) {
                return Err(unsupported(field, format!("block type `{other}` (supported: {want})")));
            }
        }
        let last = *self.block_out_channels.last().ok_or_else(|| invalid("block_out_channels", "empty"))?;
        Ok(UNetConfig {
            sample_size: self.sample_size.clone(),
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            center_input_sample: self.center_input_sample,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            down_block_types: self.down_block_types.clone(),
            mid_block_type: None,
            up_block_types: self.up_block_types.clone(),
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: PerBlock::One(self.layers_per_block),
            mid_block_scale_factor: self.mid_block_scale_factor,
            dropout: self.dropout,
            act_fn: self.act_fn.clone(),
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim: PerBlock::One(last),
            attention_head_dim: PerBlock::One(self.attention_head_dim.unwrap_or(last)),
            class_embed_type: self.class_embed_type.clone(),
            resnet_time_scale_shift: self.resnet_time_scale_shift.clone(),
            time_embedding_dim: self.time_embedding_dim,
            ..UNetConfig::default()
        })
    }
}

/// `mid_block.attentions.0`: self-attention over the pixels (diffusers'
/// `Attention` with `residual_connection` and `rescale_output_factor`).
#[derive(Debug)]
struct SelfAttention {
    group_norm: Option<GroupNorm>,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    rescale: f64,
}

impl SelfAttention {
    fn forward(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let (b, c) = (size[0], size[1]);
        let h = match &self.group_norm {
            Some(norm) => x.apply(norm),
            None => x.shallow_clone(),
        };
        let tokens = h.view([b, c, -1]).transpose(1, 2);
        let split = |t: Tensor| t.view([b, -1, self.heads, c / self.heads]).transpose(1, 2);
        let (q, k, v) = (split(tokens.apply_linear(&self.to_q)), split(tokens.apply_linear(&self.to_k)), split(tokens.apply_linear(&self.to_v)));
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        let out = out.transpose(1, 2).reshape([b, -1, c]).apply_linear(&self.to_out);
        // Back to an image with a batch's strides (see `batch_strided`).
        batch_strided(&((out.transpose(-1, -2).reshape(size.as_slice()) + x) / self.rescale))
    }
}

/// `UNetMidBlock2D`: ResNet, optional self-attention, ResNet.
#[derive(Debug)]
struct MidBlock2D {
    resnets: [ResnetBlock2D; 2],
    attention: Option<SelfAttention>,
}

#[derive(Debug)]
pub struct UNet2DModel {
    config: UNet2DModelConfig,
    time_channels: i64,
    time_embed_dim: i64,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    class_embedding: Option<Option<TimestepEmbedding>>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock2D>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DModel {
    pub fn new(p: &nn::Path, config: &UNet2DModelConfig) -> Result<Self> {
        let spec = config.as_conditional()?.spec()?;
        let layer = spec.layer;
        let first = config.block_out_channels[0];
        let last = *config.block_out_channels.last().expect("checked non-empty");
        let silu = Activation::Silu;
        let class_embedding = match config.class_embed_type.as_deref() {
            None => None,
            Some("timestep") => Some(Some(TimestepEmbedding::new(p / "class_embedding", first, spec.time_embed_dim, silu, None))),
            Some("identity") => Some(None),
            Some(other) => return Err(unsupported("class_embed_type", format!("`{other}` (supported: timestep, identity)"))),
        };
        let mid_block = config.mid_block_type.as_ref().map(|_| {
            let mp = p / "mid_block";
            let shape = ResnetShape { in_channels: last, out_channels: last, resample: Resample::None, output_scale_factor: config.mid_block_scale_factor };
            let head_dim = config.attention_head_dim.unwrap_or(last);
            // diffusers gives the attention a GroupNorm only with the default time shift.
            let groups = config.attn_norm_num_groups.or((config.resnet_time_scale_shift == "default").then_some(layer.groups));
            let ap = &(&mp / "attentions") / 0;
            let attention = config.add_attention.then(|| SelfAttention {
                group_norm: groups.map(|g| GroupNorm::new(&ap / "group_norm", g, last, config.norm_eps)),
                to_q: Linear::new(&ap / "to_q", last, last),
                to_k: Linear::new(&ap / "to_k", last, last),
                to_v: Linear::new(&ap / "to_v", last, last),
                to_out: Linear::new(&(&ap / "to_out") / 0, last, last),
                heads: last / head_dim,
                rescale: config.mid_block_scale_factor,
            });
            let resnet = |i: i64| ResnetBlock2D::new(&(&mp / "resnets") / i, shape, &layer);
            MidBlock2D { resnets: [resnet(0), resnet(1)], attention }
        });
        if let Some(head_dim) = config.attention_head_dim.filter(|_| config.add_attention && config.mid_block_type.is_some()) {
            if head_dim <= 0 || last % head_dim != 0 {
                return Err(invalid("attention_head_dim", format!("{head_dim} does not divide {last} channels")));
            }
        }
        let out_groups = config.norm_num_groups.unwrap_or((first / 4).min(32));
        Ok(Self {
            conv_in: Conv2d::new(p / "conv_in", config.in_channels, first, 3),
            time_embedding: TimestepEmbedding::new(p / "time_embedding", first, spec.time_embed_dim, silu, None),
            class_embedding,
            down_blocks: spec.down.iter().enumerate().map(|(i, b)| DownBlock::new(&(p / "down_blocks") / i, b, &layer)).collect(),
            mid_block,
            up_blocks: spec.up.iter().enumerate().map(|(i, b)| UpBlock::new(&(p / "up_blocks") / i, b, &layer)).collect(),
            conv_norm_out: GroupNorm::new(p / "conv_norm_out", out_groups, first, config.norm_eps),
            conv_out: Conv2d::new(p / "conv_out", first, config.out_channels, 3),
            time_channels: first,
            time_embed_dim: spec.time_embed_dim,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNet2DModelConfig {
        &self.config
    }

    /// `sample` `[B, in_channels, H, W]`, `timesteps` `[B]` or `[]`, and the
    /// class labels when the model has a class embedding (`[B]` noise levels
    /// for `timestep`, `[B, time_embed_dim]` for `identity`).
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, class_labels: Option<&Tensor>) -> Result<Tensor> {
        let s = sample.size();
        let m = 1 << (self.config.block_out_channels.len() - 1);
        if s.len() != 4 || s[1] != self.config.in_channels || s[2] % m != 0 || s[3] % m != 0 || s[2] == 0 || s[3] == 0 {
            return Err(NnError::input("sample", format!("shape {s:?}; expected [B, {}, H, W] with H and W positive multiples of {m}", self.config.in_channels)));
        }
        let b = s[0];
        if !(timesteps.size().is_empty() || timesteps.size() == [b]) {
            return Err(NnError::input("timesteps", format!("shape {:?}; expected [] or [{b}]", timesteps.size())));
        }
        let kind = sample.kind();
        let device = sample.device();
        let sinusoid = |t: &Tensor| {
            timestep_embedding(&t.to_device(device).expand([b], false), self.time_channels, self.config.flip_sin_to_cos, self.config.freq_shift).to_kind(kind)
        };
        let mut emb = self.time_embedding.forward(&sinusoid(timesteps));
        match (&self.class_embedding, class_labels) {
            (None, None) => {}
            (None, Some(_)) => return Err(NnError::input("class_labels", "given, but the model has no class embedding")),
            (Some(_), None) => return Err(NnError::input("class_labels", "required by this model (it has a class_embed_type)")),
            (Some(Some(embedding)), Some(labels)) => {
                if !(labels.size().is_empty() || labels.size() == [b]) {
                    return Err(NnError::input("class_labels", format!("shape {:?}; expected [] or [{b}]", labels.size())));
                }
                emb += embedding.forward(&sinusoid(labels));
            }
            (Some(None), Some(labels)) => {
                if labels.size() != [b, self.time_embed_dim] {
                    return Err(NnError::input("class_labels", format!("shape {:?}; expected [{b}, {}]", labels.size(), self.time_embed_dim)));
                }
                emb += labels.to_kind(kind);
            }
        }
        // The shared blocks read no text here (ResNet blocks only).
        let text = Tensor::zeros([b, 1, 1], (kind, device));
        let cond = Conditioning { temb: &emb, text: &text, text_bias: None, train: false, maps: None };
        let x = if self.config.center_input_sample { sample * 2.0 - 1.0 } else { sample.shallow_clone() };
        let mut h = x.apply(&self.conv_in);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &cond, &mut skips);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.resnets[0].forward(&h, &emb, false);
            if let Some(attention) = &mid.attention {
                h = attention.forward(&h);
            }
            h = mid.resnets[1].forward(&h, &emb, false);
        }
        for block in &self.up_blocks {
            h = block.forward(&h, &cond, &mut skips);
        }
        Ok(h.apply(&self.conv_norm_out).silu().apply(&self.conv_out))
    }
}

/// A `UNet2DModel` with the `VarStore` that owns its weights.
#[derive(Debug)]
pub struct LoadedUNet2D {
    pub vs: nn::VarStore,
    pub model: UNet2DModel,
}

impl LoadedUNet2D {
    /// Loads a diffusers `UNet2DModel` directory onto `device` in `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = UNet2DModelConfig::from_dir(dir)?;
        let (vs, model) = weights::load_frozen(dir, WEIGHTS_STEM, device, kind, |p| UNet2DModel::new(p, &config))?;
        Ok(Self { vs, model })
    }
}
